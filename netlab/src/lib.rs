//! netlab: separate hosts on one machine, for tests and benchmarks that loopback cannot
//! serve (a wire to sniff, links that drop, daemons that die).
//!
//! A [`Lab`] builds N hosts, each its own network namespace with one link (`eth0`), joined
//! by veth pairs to a Linux bridge that lives in a namespace of its own, on a private
//! `10.x.y.0/24` subnet that exists only inside the lab:
//!
//! ```text
//!  nl<id>-h0            nl<id>-br                nl<id>-h1
//! ┌──────────────┐     ┌──────────────────────┐     ┌──────────────┐
//! │ eth0 10.x.y.1├─veth┤v0-a   br0    v1-b   ├veth─┤eth0 10.x.y.2 │
//! │  tbf (egress)│     │ tbf (ingress of a/b) │     │              │
//! │  nft: to_host│     │ nft: from_h0/from_h1 │     │ tmpfs (opt.) │
//! └──────────────┘     │ tcpdump → pcap       │     └──────────────┘
//!                      └──────────────────────┘
//! ```
//!
//! - hosts run commands ([`Host::command`]), supervised processes that can be killed,
//!   terminated and restarted ([`Host::process`], [`Process`]), and Rust closures on threads
//!   moved into their namespace ([`Host::run`], [`Host::spawn_thread`]);
//! - links have an MTU ([`Host::set_mtu`]; 1500 and 9000 both work) and rate limits per
//!   direction ([`Host::set_rate`], `tc tbf`);
//! - faults: random loss per direction and cuts that can be restored ([`Host::set_loss`],
//!   [`Host::cut`], [`Host::restore`]; nftables), process kills ([`Process::kill`]);
//! - a host can get a small tmpfs that fills up ([`Host::mount_tmpfs`]);
//! - captures on the bridge ([`Lab::capture`]) are searched for a canary
//!   ([`Pcap::contains`]).
//!
//! There is **no latency emulation**: that needs `tc netem`, which the machines this runs
//! on lack, and netlab does not fake it.
//!
//! Labs in parallel, even from different processes, never collide: each reserves a random
//! 16-bit id (`/run/netlab/<id>.lock`) from which its namespace names and subnet are derived.
//! Dropping a lab kills its processes and deletes its namespaces, also during a panic; it
//! then keeps its artifacts (process logs, pcaps) under `<target>/netlab/<name>-<id>/` and
//! prints that path. Debris of killed test processes is swept by the next lab
//! ([`sweep_stale`]).
//!
//! Needs root (or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and Debian's `iproute2`, `nftables`,
//! `tcpdump` and `util-linux`; [`preflight`] says what is missing.
//!
//! # Quick start
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lab = netlab::Lab::builder("quick_start").host("server").host("client").build()?;
//! let (server, client) = (&lab.hosts()[0], &lab.hosts()[1]);
//! let addr = (server.addr(), 7000);
//! let listener = server.run(move || TcpListener::bind(addr))??;
//! let capture = lab.capture()?;
//! let accepted = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
//!     let (mut stream, _) = listener.accept()?;
//!     let mut got = Vec::new();
//!     stream.read_to_end(&mut got)?;
//!     Ok(got)
//! });
//! client.run(move || TcpStream::connect(addr)?.write_all(b"CANARY-42"))??;
//! assert_eq!(accepted.join().expect("server thread")?, b"CANARY-42");
//! assert!(capture.stop()?.contains(b"CANARY-42"), "plaintext is visible on the wire");
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use self::capture::{Capture, CaptureError, Pcap, PcapError};
pub use self::cmd::CmdError;
pub use self::fault::FaultError;
pub use self::fs::MIN_SIZE_BYTES;
pub use self::fs::{FsError, TmpFs};
pub use self::lab::{HostConfig, Lab, LabBuilder, LabError, TeardownError};
pub use self::link::{BRIDGE_IFACE, Direction, HOST_IFACE, LinkError, MAX_HOSTS, Subnet};
pub use self::netns::{LabId, NetnsError, sweep_stale};
pub use self::node::{Host, Process, ProcessBuilder, ProcessError, RunError};
pub use self::shape::{MIN_RATE, Rate, ShapeError};
pub use nix::sys::signal::Signal;

mod capture;
mod cmd;
mod fault;
pub mod faultyfs;
mod fs;
mod lab;
mod link;
mod netns;
mod node;
mod shape;
mod wait;

/// Checks that a lab can be built on this machine.
pub fn preflight() -> Result<(), LabError> {
    let uid = effective_uid();
    if uid == 0 {
        Ok(())
    } else {
        Err(LabError::NotRoot { uid })
    }
}

/// The effective uid, read from `/proc/self/status` (no unsafe call needed).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_matches_the_uid() {
        let uid = effective_uid();
        assert_ne!(uid, u32::MAX, "uid readable from /proc");
        match preflight() {
            Ok(()) => assert_eq!(uid, 0),
            Err(LabError::NotRoot { uid: u }) => {
                assert_eq!(u, uid);
                assert!(
                    LabError::NotRoot { uid: u }
                        .to_string()
                        .contains("needs root")
                );
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
}
