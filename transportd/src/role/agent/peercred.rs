//! Who is calling the Workload API: the kernel's peer credentials of a Unix socket, and the
//! caller's executable, read so that a recycled process ID cannot lend one process's
//! executable to another. The decisions (which entry a [`Workload`] gets) live in
//! `certs::attest`; this file only does the I/O and the pid-reuse check.
//!
//! At accept, [`PeerCred::capture`] takes `SO_PEERCRED` (uid, gid, pid: the connecting
//! process, fixed by the kernel at `connect()`) and pins that process with a pidfd: from
//! `SO_PEERPIDFD` (Linux 6.5+), which names the very process that connected, or, where the
//! kernel lacks it, from `pidfd_open(pid)` right away. [`PeerCred::attest`] runs on every
//! call: it reads the start time in `/proc/<pid>/stat`, the link `/proc/<pid>/exe`, the
//! start time again, and then asks the pidfd whether its process is still alive.
//! [`pid_verdict`] (pure) accepts only if the pinned process is alive (a pid is reused
//! only after its process has exited and been reaped, so an alive pinned process still owns
//! the pid and the exe read was its own), both start times agree (no exit and reuse during
//! the reads), and the process started no later than the connection was accepted.
//!
//! What remains, documented rather than closed:
//! * With `SO_PEERPIDFD` nothing of pid reuse remains. With the `pidfd_open` fallback, a
//!   process that connects and exits before we accept, its pid then reused by a new process
//!   also before the accept, lends the newcomer's executable: the window is the time
//!   between the caller's `connect()` and our `accept()`, and the pid must wrap around
//!   `pid_max` inside it.
//! * The connecting process is attested, not whoever holds the socket later: a process
//!   that connects, then forks or passes the descriptor and execs a trusted binary, makes
//!   its helper receive the trusted binary's SVID. SPIRE has the same limit; the socket
//!   itself is the capability, so `unix:path` selectors are only as strong as the
//!   executables they name (those should not run arbitrary code).
//! * uid and gid are those at `connect()`; a process that changes them later keeps the
//!   old ones for this connection.

use std::fmt;
use std::os::fd::OwnedFd;

use certs::Workload;
use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{Pid, PidfdFlags, pidfd_open};
use rustix::time::{ClockId, Timespec, clock_gettime};
use tokio::net::UnixStream;

/// The kernel's word on the process at the other end of a Workload API connection, taken
/// when the connection was accepted.
#[derive(Debug)]
pub(crate) struct PeerCred {
    /// Effective user ID at `connect()`.
    pub(crate) uid: u32,
    /// Effective group ID at `connect()`.
    pub(crate) gid: u32,
    /// The connecting process, when the kernel names one (0 or absent when it lives in
    /// another pid namespace).
    pub(crate) pid: Option<u32>,
    pin: Pin,
    /// Boot-time clock ticks (the unit of `/proc/<pid>/stat`'s start time) at accept.
    accepted_at: Option<u64>,
}

/// How the calling process is held on to.
enum Pin {
    /// `SO_PEERPIDFD`: the process that connected, exactly.
    PeerPidfd(OwnedFd),
    /// `pidfd_open(pid)` at accept, where the kernel has no `SO_PEERPIDFD`.
    Opened(OwnedFd),
    /// Neither worked (no pid, or the process was already gone): the executable is not
    /// read, so `unix:path` selectors match nothing for this caller.
    Unpinned(String),
}

impl PeerCred {
    /// Reads the peer credentials of a just-accepted connection and pins the peer process.
    /// Fails only if the kernel gives no credentials at all.
    pub(crate) fn capture(stream: &UnixStream) -> std::io::Result<Self> {
        let accepted_at = boot_ticks();
        let cred = stream.peer_cred()?;
        let pid = cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p != 0);
        let pin = match pid {
            None => Pin::Unpinned("the kernel names no process for this peer".into()),
            Some(p) => {
                match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd) {
                    Ok(fd) => Pin::PeerPidfd(fd),
                    Err(peer_err) => match open_pidfd(p) {
                        Ok(fd) => Pin::Opened(fd),
                        Err(e) => {
                            Pin::Unpinned(format!("SO_PEERPIDFD: {peer_err}; pidfd_open: {e}"))
                        }
                    },
                }
            }
        };
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            pin,
            accepted_at,
        })
    }

    /// Whether the process is held by a pidfd, and how.
    pub(crate) fn pinned_by(&self) -> Option<&'static str> {
        match self.pin {
            Pin::PeerPidfd(_) => Some("SO_PEERPIDFD"),
            Pin::Opened(_) => Some("pidfd_open"),
            Pin::Unpinned(_) => None,
        }
    }

    /// What the caller is now: its uid and gid, and its executable if it can be read
    /// without doubt about which process it belongs to. Refuses when the connecting
    /// process is gone or its pid names another process.
    pub(crate) fn attest(&self) -> Result<Workload, AttestRefusal> {
        let fd = match (&self.pin, self.pid) {
            (Pin::PeerPidfd(fd) | Pin::Opened(fd), Some(pid)) => (fd, pid),
            _ => {
                return Ok(Workload {
                    uid: self.uid,
                    gid: self.gid,
                    path: None,
                });
            }
        };
        let (fd, pid) = fd;
        let before = start_time(pid)?;
        // Unreadable (another user's process while we are not root): no path; selectors
        // naming a path then do not match.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let after = start_time(pid)?;
        pid_verdict(self.accepted_at, before, after, is_alive(fd))?;
        Ok(Workload {
            uid: self.uid,
            gid: self.gid,
            path: exe,
        })
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerPidfd(_) => f.write_str("PeerPidfd"),
            Self::Opened(_) => f.write_str("Opened"),
            Self::Unpinned(why) => write!(f, "Unpinned({why})"),
        }
    }
}

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttestRefusal {
    /// The process that connected has exited.
    #[error("the calling process exited")]
    Exited,
    /// The pid names a process other than the one that connected.
    #[error("the calling process's pid now names another process")]
    PidReused,
    /// `/proc/<pid>/stat` could not be read or parsed.
    #[error("cannot read the calling process's status: {0}")]
    Proc(String),
}

/// The pid-reuse decision. `accepted_at` is when the connection was accepted, `before`
/// and `after` the process's start time read before and after its executable, all in
/// boot-time clock ticks; `alive` is what the pidfd says after the reads.
pub(crate) fn pid_verdict(
    accepted_at: Option<u64>,
    before: u64,
    after: u64,
    alive: bool,
) -> Result<(), AttestRefusal> {
    if !alive {
        return Err(AttestRefusal::Exited);
    }
    if before != after {
        return Err(AttestRefusal::PidReused);
    }
    // A process that started after we accepted the connection cannot have made it.
    if accepted_at.is_some_and(|at| before > at) {
        return Err(AttestRefusal::PidReused);
    }
    Ok(())
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time, in clock ticks since boot.
/// The command name (field 2) is in parentheses and may hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name come field 3 (state) onwards: field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

fn start_time(pid: u32) -> Result<u64, AttestRefusal> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AttestRefusal::Exited
        } else {
            AttestRefusal::Proc(e.to_string())
        }
    })?;
    parse_start_time(&stat).ok_or_else(|| AttestRefusal::Proc("unexpected /proc/<pid>/stat".into()))
}

fn open_pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// A pidfd becomes readable when its process exits.
fn is_alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(0) => true,
        // Readable, hung up or an error: the process is not there to vouch for itself.
        _ => false,
    }
}

/// Now on the boot-time clock, in the clock ticks `/proc` counts start times in. Not a
/// wall-clock or monotonic reading for durations (those go through `Clock`): it only
/// places the accept on the same axis as the kernel's process start times.
fn boot_ticks() -> Option<u64> {
    let t = clock_gettime(ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second();
    let secs = u64::try_from(t.tv_sec).ok()?;
    let nanos = u64::try_from(t.tv_nsec).ok()?;
    secs.checked_mul(hz)?
        .checked_add(nanos * hz / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_accepts_only_an_alive_process_that_predates_the_accept() {
        assert_eq!(pid_verdict(Some(1000), 900, 900, true), Ok(()));
        assert_eq!(pid_verdict(Some(1000), 1000, 1000, true), Ok(()));
        assert_eq!(pid_verdict(None, 5000, 5000, true), Ok(()));
        // Started after we accepted: someone else's pid now.
        assert_eq!(
            pid_verdict(Some(1000), 1001, 1001, true),
            Err(AttestRefusal::PidReused)
        );
        // Exited and replaced between the two reads.
        assert_eq!(
            pid_verdict(Some(1000), 900, 1200, true),
            Err(AttestRefusal::PidReused)
        );
        // The pinned process is gone, whatever the pid says now.
        assert_eq!(
            pid_verdict(Some(1000), 900, 900, false),
            Err(AttestRefusal::Exited)
        );
    }

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        let stat = format!("4242 (we ird) (name)) {}\n", fields.join(" "));
        assert_eq!(parse_start_time(&stat), Some(22));
        assert_eq!(parse_start_time("4242 (x) S 1 2"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_start_time(&own).is_some());
    }

    #[tokio::test]
    async fn peer_credentials_of_this_process_attest_to_its_uid_and_exe() {
        let _trace = libtransport::test_util::trace_init();
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = PeerCred::capture(&a).unwrap();
        assert_eq!(cred.uid, rustix::process::geteuid().as_raw());
        assert_eq!(cred.gid, rustix::process::getegid().as_raw());
        assert_eq!(cred.pid, Some(std::process::id()));
        assert!(cred.pinned_by().is_some(), "{cred:?}");
        let w = cred.attest().unwrap();
        assert_eq!(w.uid, cred.uid);
        assert_eq!(
            w.path.as_deref(),
            Some(std::env::current_exe().unwrap().as_path())
        );
        // Our own start time predates the accept: the check is live, not vacuous.
        let started = start_time(std::process::id()).unwrap();
        assert!(cred.accepted_at.is_some_and(|at| started <= at));
    }

    #[tokio::test]
    async fn a_peer_that_exited_is_refused() {
        let _trace = libtransport::test_util::trace_init();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // A child (this test binary, running only the helper below) connects and exits;
        // we hold its pidfd from the accept.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--ignored", "--quiet", HELPER])
            .env(HELPER_ENV, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let cred = PeerCred::capture(&stream).unwrap();
        assert!(child.wait().unwrap().success());
        assert_ne!(cred.pid, Some(std::process::id()));
        match cred.pinned_by() {
            Some(_) => assert_eq!(cred.attest().unwrap_err(), AttestRefusal::Exited),
            None => assert_eq!(cred.attest().unwrap().path, None),
        }
    }

    const HELPER: &str = "role::agent::peercred::tests::connect_and_exit";
    const HELPER_ENV: &str = "TRANSPORTD_TEST_PEERCRED_SOCKET";

    #[test]
    #[ignore = "helper: a_peer_that_exited_is_refused runs it in a child process"]
    fn connect_and_exit() {
        if let Some(path) = std::env::var_os(HELPER_ENV) {
            let _s = std::os::unix::net::UnixStream::connect(path).unwrap();
        }
    }
}
