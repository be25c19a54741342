//! Shaping: rate limits per host link and direction with `tc tbf` (token bucket filter).
//!
//! Egress (what a host sends) is shaped on the host's own `eth0`, so the host's TCP stack
//! feels the back-pressure of a slow link; ingress (what it receives) is shaped on the
//! bridge's port toward the host, i.e. on the sending side of that wire.
//!
//! There is no latency emulation: it needs `tc netem` (the `sch_netem` kernel module), which
//! the machines this lab runs on (CI included) lack, and a sleep-based imitation would
//! distort what it claims to measure. A rate limit is the only shaping offered.

use std::fmt;

use crate::cmd::{self, CmdError};
use crate::link::{self, Direction, HOST_IFACE, LinkError};
use crate::node::Host;

/// A link rate, in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate {
    bits_per_sec: u64,
}

impl Rate {
    /// A rate of `n` bits per second.
    pub const fn bits_per_sec(n: u64) -> Self {
        Self { bits_per_sec: n }
    }

    /// A rate of `n` kilobits (1000 bits) per second.
    pub const fn kbit(n: u64) -> Self {
        Self::bits_per_sec(n.saturating_mul(1_000))
    }

    /// A rate of `n` megabits (10^6 bits) per second.
    pub const fn mbit(n: u64) -> Self {
        Self::bits_per_sec(n.saturating_mul(1_000_000))
    }

    /// A rate of `n` gigabits (10^9 bits) per second.
    pub const fn gbit(n: u64) -> Self {
        Self::bits_per_sec(n.saturating_mul(1_000_000_000))
    }

    /// The rate in bits per second.
    pub const fn as_bits_per_sec(self) -> u64 {
        self.bits_per_sec
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}bit", self.bits_per_sec)
    }
}

/// A rate limit could not be set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The link's MTU (needed for the bucket size) could not be read.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The rate is below what tbf shapes sensibly.
    #[error("rate {rate} is too low: use at least {MIN_RATE}")]
    TooSlow {
        /// The rate asked for.
        rate: Rate,
    },
}

impl Host {
    /// Limits the host's link in one direction to `rate`, or removes the limit with `None`.
    /// Setting a new rate replaces the old one.
    pub fn set_rate(&self, direction: Direction, rate: Option<Rate>) -> Result<(), ShapeError> {
        let (netns, device) = match direction {
            Direction::Egress => (self.netns(), HOST_IFACE),
            Direction::Ingress => (self.bridge_netns(), self.bridge_port()),
        };
        match rate {
            Some(rate) => {
                if rate < MIN_RATE {
                    return Err(ShapeError::TooSlow { rate });
                }
                let mtu = link::read_mtu(netns, device)?;
                let mut args = vec![
                    "qdisc".to_owned(),
                    "replace".into(),
                    "dev".into(),
                    device.to_owned(),
                    "root".into(),
                ];
                args.extend(tbf_args(rate, mtu));
                cmd::exec_in(
                    netns,
                    "tc",
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                    None,
                )?;
            }
            None => {
                let current = cmd::exec_in(netns, "tc", &["qdisc", "show", "dev", device], None)?;
                if current.contains("tbf") {
                    cmd::exec_in(netns, "tc", &["qdisc", "del", "dev", device, "root"], None)?;
                }
            }
        }
        Ok(())
    }
}

/// The `tbf ...` part of the `tc qdisc` command for a rate on a link with this MTU.
///
/// The bucket holds 10 ms worth of the rate, but at least two full frames (a bucket smaller
/// than one frame would never let that frame through); the queue holds 50 ms worth.
fn tbf_args(rate: Rate, mtu: u32) -> Vec<String> {
    let per_10ms = rate.as_bits_per_sec() / 8 / 100;
    let frames = 2 * (u64::from(mtu) + ETHERNET_OVERHEAD);
    let burst = per_10ms.max(frames).max(MIN_BURST_BYTES);
    vec![
        "tbf".into(),
        "rate".into(),
        rate.to_string(),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "50ms".into(),
    ]
}

/// The slowest rate offered; below it tbf's timing granularity dominates.
pub const MIN_RATE: Rate = Rate::kbit(64);
/// Ethernet header and VLAN tag on top of the MTU.
const ETHERNET_OVERHEAD: u64 = 18;
/// The smallest bucket, in bytes.
const MIN_BURST_BYTES: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_render_for_tc() {
        assert_eq!(Rate::mbit(8).to_string(), "8000000bit");
        assert_eq!(Rate::gbit(1).as_bits_per_sec(), 1_000_000_000);
        assert!(Rate::kbit(8) < MIN_RATE);
    }

    #[test]
    fn bucket_fits_jumbo_frames() {
        let args = tbf_args(Rate::mbit(8), 1500);
        assert_eq!(
            args.join(" "),
            "tbf rate 8000000bit burst 10000 latency 50ms"
        );
        let jumbo = tbf_args(Rate::mbit(1), 9000);
        assert_eq!(jumbo[4], "18036");
        let fast = tbf_args(Rate::gbit(10), 1500);
        assert_eq!(fast[4], "12500000");
    }
}
