//! Packet capture: `tcpdump` on the lab's bridge (every frame between hosts crosses it) or
//! on one host's link, into a pcap file among the lab's artifacts, and a search of what was
//! captured for a canary byte string (see [`Pcap::contains`]).
//!
//! tcpdump writes the pcap to its stdout, which we point at the file, so its dropping of
//! privileges (to the `tcpdump` user on Debian) never meets file permissions.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};

pub use self::pcap::{Pcap, PcapError};
use crate::cmd::{self, CmdError};
use crate::link::HOST_IFACE;
use crate::netns::pid_of;
use crate::node::Host;
use crate::wait;

mod pcap;

/// A running capture; [`Capture::stop`] it to read what it saw. Dropping it stops tcpdump
/// and keeps the file.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    log_path: PathBuf,
}

/// A capture could not be started, stopped or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// tcpdump could not be started.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// A file could not be created or read.
    #[error("cannot use capture file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// tcpdump did not report that it was listening.
    #[error("tcpdump on {interface} did not start listening within {timeout:?}: {log}")]
    NotListening {
        /// The interface.
        interface: String,
        /// How long we waited.
        timeout: Duration,
        /// Its output so far.
        log: String,
    },
    /// tcpdump saw packets that it did not write (the kernel dropped them, or they were
    /// still buffered when it stopped): a search of the file could miss something.
    #[error(
        "capture {path} is incomplete: tcpdump wrote {captured} of {received} packets ({dropped} dropped by the kernel); capture less, or on a less loaded machine"
    )]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// Packets written to the file.
        captured: u64,
        /// Packets that matched (all of them: there is no filter).
        received: u64,
        /// Packets the kernel dropped for want of buffer.
        dropped: u64,
    },
    /// The file is not a pcap we can read.
    #[error("cannot read capture {path}: {source}")]
    Pcap {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: PcapError,
    },
}

impl Capture {
    /// Starts tcpdump on `interface` inside `netns`, writing to `path`; returns once it is
    /// listening, so nothing sent afterwards is missed.
    pub(crate) fn start(netns: &str, interface: &str, path: PathBuf) -> Result<Self, CaptureError> {
        let log_path = path.with_extension("tcpdump.log");
        let file_error = |path: &Path| {
            let path = path.to_owned();
            move |source| CaptureError::File { path, source }
        };
        let out = File::create(&path).map_err(file_error(&path))?;
        let log = File::create(&log_path).map_err(file_error(&log_path))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, "tcpdump", "-i", interface])
            // No name lookups, full frames, every packet written at once, no buffering delay.
            .args(["-n", "-s", "0", "-U", "--immediate-mode", "-w", "-"])
            // A 64 MiB kernel buffer, so a burst on a fast bridge is not dropped.
            .args(["-B", "65536"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        let child = cmd::spawn(&mut command)?;
        let mut capture = Self {
            child: Some(child),
            path,
            log_path,
        };
        let listening = wait::poll_until(START_TIMEOUT, START_POLL, || {
            capture.log().contains("listening on") || !capture.running()
        });
        if listening && capture.running() {
            Ok(capture)
        } else {
            capture.halt();
            Err(CaptureError::NotListening {
                interface: interface.to_owned(),
                timeout: START_TIMEOUT,
                log: capture.log().trim().to_owned(),
            })
        }
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// tcpdump's own messages (start, packet counts at the end).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until tcpdump has written what it saw (the file stops growing), stops it
    /// (SIGTERM, so it flushes; SIGKILL if it hangs) and reads the file. Fails with
    /// [`CaptureError::Incomplete`] if tcpdump reports packets it did not write, so a search
    /// for something that must be absent never passes on a partial capture.
    pub fn stop(mut self) -> Result<Pcap, CaptureError> {
        self.settle();
        self.halt();
        if let Some(stats) = Stats::parse(&self.log())
            && (stats.captured < stats.received || stats.dropped > 0)
        {
            return Err(CaptureError::Incomplete {
                path: self.path.clone(),
                captured: stats.captured,
                received: stats.received,
                dropped: stats.dropped,
            });
        }
        Pcap::read(&self.path)
    }

    /// Waits (at most [`SETTLE_TIMEOUT`]) until the file has not grown for [`SETTLE_QUIET`].
    fn settle(&self) {
        let size = || std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let mut last = size();
        let mut quiet = 0;
        let quiet_polls = SETTLE_QUIET.as_millis() / SETTLE_POLL.as_millis();
        wait::poll_until(SETTLE_TIMEOUT, SETTLE_POLL, || {
            let now = size();
            if now == last {
                quiet += 1;
            } else {
                quiet = 0;
                last = now;
            }
            quiet >= quiet_polls
        });
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn halt(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(pid_of(child.id()), Signal::SIGTERM);
        let exited = wait::poll_until(STOP_TIMEOUT, START_POLL, || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The counts tcpdump prints when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stats {
    captured: u64,
    received: u64,
    dropped: u64,
}

impl Stats {
    /// Reads "N packets captured", "N packets received by filter", "N packets dropped by
    /// kernel" from tcpdump's log; `None` unless all three are there.
    fn parse(log: &str) -> Option<Self> {
        let count = |suffix: &str| {
            log.lines()
                .find_map(|l| l.trim().strip_suffix(suffix)?.trim().parse::<u64>().ok())
        };
        Some(Self {
            captured: count("packets captured")?,
            received: count("packets received by filter")?,
            dropped: count("packets dropped by kernel")?,
        })
    }
}

impl Host {
    /// Starts a capture on the host's own link (`eth0` inside its namespace): it sees what
    /// the host sends before egress loss and what it receives after ingress loss.
    pub fn capture(&self) -> Result<Capture, CaptureError> {
        let n = self.next_serial();
        let path = self.dir().join(format!("{HOST_IFACE}-{n}.pcap"));
        Capture::start(self.netns(), HOST_IFACE, path)
    }
}

impl Pcap {
    /// Reads and parses a pcap file.
    pub fn read(path: &Path) -> Result<Self, CaptureError> {
        let bytes = std::fs::read(path).map_err(|source| CaptureError::File {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes).map_err(|source| CaptureError::Pcap {
            path: path.to_owned(),
            source,
        })
    }
}

/// How long tcpdump may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpdump may take to flush and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the file must stay the same size before we believe tcpdump has caught up.
const SETTLE_QUIET: Duration = Duration::from_millis(200);
/// The longest we wait for tcpdump to catch up before stopping it anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to look at the file's size.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How often to look at tcpdump's progress.
const START_POLL: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcpdump_counts_parse() {
        let log = "tcpdump: listening on br0, link-type EN10MB (Ethernet), snapshot length 262144 bytes\n33 packets captured\n44 packets received by filter\n0 packets dropped by kernel\n";
        assert_eq!(
            Stats::parse(log),
            Some(Stats {
                captured: 33,
                received: 44,
                dropped: 0
            })
        );
        assert_eq!(Stats::parse("tcpdump: listening on br0"), None);
    }
}
