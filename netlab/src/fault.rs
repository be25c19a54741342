//! Faults: random loss per direction and link cuts (nftables), which can be restored.
//! Killing processes is on [`crate::Process`] (`kill`, `stop`, `restart`).
//!
//! Drops happen silently on the *receiving* side of each wire, as on a real lossy link: what
//! a host sends is dropped at the bridge's port (a netdev `ingress` chain in the bridge's
//! namespace), what it receives at its own `eth0` (an `ingress` chain in its namespace).
//! Dropping at the sender's egress instead would hand the sender an error (`ENOBUFS`), which
//! no real wire does. So a capture on the bridge does not see what a host's egress loss
//! dropped, but does see what its ingress loss dropped.

use crate::cmd::{self, CmdError};
use crate::link::{Direction, HOST_IFACE};
use crate::node::Host;

/// Loss or a cut could not be set or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The loss is not a percentage.
    #[error("loss {percent}% is out of range: use a percentage from 0 to 100")]
    LossOutOfRange {
        /// What was asked for.
        percent: f64,
    },
}

impl Host {
    /// Drops this share of the packets in one direction at random (0 heals, 100 drops all).
    /// Resolution is a ten-thousandth of a percent.
    pub fn set_loss(&self, direction: Direction, percent: f64) -> Result<(), FaultError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(FaultError::LossOutOfRange { percent });
        }
        // In range 0..=100, so the product is in 0..=1_000_000 and fits a u32.
        let ppm = (percent * 10_000.0).round() as u32;
        let mut faults = self.faults();
        faults.loss_ppm[direction.index()] = ppm;
        self.apply(direction, &faults)
    }

    /// Cuts the link in both directions: every frame is dropped until [`Host::restore`].
    pub fn cut(&self) -> Result<(), FaultError> {
        for direction in Direction::BOTH {
            self.set_cut(direction, true)?;
        }
        Ok(())
    }

    /// Cuts (`true`) or reconnects (`false`) one direction of the link.
    pub fn set_cut(&self, direction: Direction, cut: bool) -> Result<(), FaultError> {
        let mut faults = self.faults();
        faults.cut[direction.index()] = cut;
        self.apply(direction, &faults)
    }

    /// Heals the link: no cut and no loss in either direction.
    pub fn restore(&self) -> Result<(), FaultError> {
        let mut faults = self.faults();
        *faults = FaultState::default();
        for direction in Direction::BOTH {
            self.apply(direction, &faults)?;
        }
        Ok(())
    }

    /// Packets dropped in this direction by loss or a cut since the last change to it.
    pub fn dropped_packets(&self, direction: Direction) -> Result<u64, FaultError> {
        let (netns, chain) = self.fault_chain(direction);
        let out = cmd::exec_in(
            netns,
            "nft",
            &["list", "chain", "netdev", TABLE, &chain],
            None,
        )?;
        Ok(sum_counters(&out))
    }

    /// Replaces the rules of one direction's chain with what `faults` says, atomically.
    fn apply(&self, direction: Direction, faults: &FaultState) -> Result<(), FaultError> {
        let (netns, chain) = self.fault_chain(direction);
        let i = direction.index();
        let script = chain_rules(&chain, faults.cut[i], faults.loss_ppm[i]);
        cmd::exec_in(netns, "nft", &["-f", "-"], Some(&script))?;
        Ok(())
    }

    /// Where one direction's drops happen: the namespace and chain name.
    fn fault_chain(&self, direction: Direction) -> (&str, String) {
        match direction {
            Direction::Egress => (self.bridge_netns(), format!("from_h{}", self.index())),
            Direction::Ingress => (self.netns(), "to_host".to_owned()),
        }
    }
}

/// The faults set on one host, per direction (indexed by [`Direction::index`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FaultState {
    pub(crate) cut: [bool; 2],
    pub(crate) loss_ppm: [u32; 2],
}

/// Creates the (empty) fault chains of a host: its ingress chain in its namespace and its
/// port's ingress chain in the bridge's namespace.
pub(crate) fn install(host: &Host) -> Result<(), FaultError> {
    let to_host = chain_decl("to_host", HOST_IFACE);
    cmd::exec_in(host.netns(), "nft", &["-f", "-"], Some(&to_host))?;
    let from_host = chain_decl(&format!("from_h{}", host.index()), host.bridge_port());
    cmd::exec_in(host.bridge_netns(), "nft", &["-f", "-"], Some(&from_host))?;
    Ok(())
}

/// An nft script declaring the lab's table and a netdev ingress chain on `device`.
fn chain_decl(chain: &str, device: &str) -> String {
    format!(
        "add table netdev {TABLE}\n\
         add chain netdev {TABLE} {chain} {{ type filter hook ingress device \"{device}\" priority 0; policy accept; }}\n"
    )
}

/// An nft script that replaces a chain's rules: a counted drop for a cut, else a counted
/// random drop for loss, else nothing.
fn chain_rules(chain: &str, cut: bool, loss_ppm: u32) -> String {
    let mut script = format!("flush chain netdev {TABLE} {chain}\n");
    if cut || loss_ppm >= PPM {
        script.push_str(&format!("add rule netdev {TABLE} {chain} counter drop\n"));
    } else if loss_ppm > 0 {
        script.push_str(&format!(
            "add rule netdev {TABLE} {chain} numgen random mod {PPM} < {loss_ppm} counter drop\n"
        ));
    }
    script
}

/// The sum of `counter packets N` in `nft list` output.
fn sum_counters(listing: &str) -> u64 {
    let words: Vec<&str> = listing.split_whitespace().collect();
    words
        .windows(3)
        .filter(|w| w[0] == "counter" && w[1] == "packets")
        .filter_map(|w| w[2].parse::<u64>().ok())
        .sum()
}

/// The nftables table that holds netlab's chains in each namespace.
const TABLE: &str = "netlab";
/// Loss is kept in parts per million.
const PPM: u32 = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_state() {
        assert_eq!(
            chain_rules("to_host", false, 0),
            "flush chain netdev netlab to_host\n"
        );
        assert!(chain_rules("to_host", true, 500_000).ends_with("to_host counter drop\n"));
        assert!(chain_rules("to_host", false, PPM).ends_with("to_host counter drop\n"));
        assert!(
            chain_rules("from_h1", false, 500_000)
                .contains("numgen random mod 1000000 < 500000 counter drop")
        );
        assert!(chain_decl("from_h0", "v0-a").contains("hook ingress device \"v0-a\""));
    }

    #[test]
    fn counters_add_up() {
        let listing = "table netdev netlab {\n chain to_host {\n type filter hook ingress device \"eth0\" priority filter; policy accept;\n numgen random mod 1000000 < 500000 counter packets 61 bytes 5978 drop\n counter packets 2 bytes 9 drop\n }\n}";
        assert_eq!(sum_counters(listing), 63);
        assert_eq!(sum_counters(""), 0);
    }
}
