//! Links: the lab's bridge, the veth pair that joins each host to it, the lab's private
//! subnet and the addresses in it, and per-link MTU.
//!
//! Both ends of every veth are created directly inside namespaces (the host end as `eth0` in
//! the host's, the bridge end as the bridge's port in the bridge's), so no lab interface
//! ever appears in the machine's root namespace and names cannot clash between labs. Rates
//! live in `shape.rs`, loss and cuts in `fault.rs`.

use std::fmt;
use std::net::Ipv4Addr;

use crate::cmd::{self, CmdError};
use crate::netns::LabId;
use crate::node::Host;

/// A lab's private IPv4 subnet, `10.<id high>.<id low>.0/24`, unique per live lab.
///
/// It exists only inside the lab's namespaces: the root namespace has no route to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
}

impl Subnet {
    /// The subnet of the lab with this id.
    pub fn for_lab(id: LabId) -> Self {
        let [high, low] = id.0.to_be_bytes();
        Self {
            network: Ipv4Addr::new(10, high, low, 0),
        }
    }

    /// The network address (`10.x.y.0`).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length (always 24).
    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    /// The address of the host with this index (`.1` for the first), or `None` past
    /// [`MAX_HOSTS`].
    pub fn host_addr(&self, index: usize) -> Option<Ipv4Addr> {
        if index >= MAX_HOSTS {
            return None;
        }
        let [a, b, c, _] = self.network.octets();
        // index < MAX_HOSTS = 254, so index + 1 fits in a byte.
        let last = u8::try_from(index + 1).ok()?;
        Some(Ipv4Addr::new(a, b, c, last))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, PREFIX_LEN)
    }
}

/// A direction of traffic on a host's link, seen from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the host onto the wire (what it sends).
    Egress,
    /// From the wire into the host (what it receives).
    Ingress,
}

impl Direction {
    /// Both directions, egress first.
    pub const BOTH: [Self; 2] = [Self::Egress, Self::Ingress];

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Egress => 0,
            Self::Ingress => 1,
        }
    }
}

/// A link could not be set up or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The MTU is outside what Ethernet over veth allows.
    #[error("MTU {mtu} is out of range: use {MIN_MTU}..={MAX_MTU} (1500 and 9000 are typical)")]
    MtuOutOfRange {
        /// The MTU asked for.
        mtu: u32,
    },
    /// `ip link` printed something we could not read the MTU from.
    #[error("cannot read the MTU of {device} in {netns} from `ip link` output: {output}")]
    UnreadableMtu {
        /// The namespace.
        netns: String,
        /// The interface.
        device: String,
        /// What `ip` printed.
        output: String,
    },
}

impl Host {
    /// The MTU of the host's link, read back from the kernel (the host end of the veth).
    pub fn mtu(&self) -> Result<u32, LinkError> {
        read_mtu(self.netns(), HOST_IFACE)
    }

    /// Sets the MTU of the host's link, on both ends of its veth. Other hosts' links keep
    /// theirs; a frame larger than the receiving link's MTU is dropped by the bridge, as on
    /// a real switch.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), LinkError> {
        check_mtu(mtu)?;
        set_mtu(self.netns(), HOST_IFACE, mtu)?;
        set_mtu(self.bridge_netns(), self.bridge_port(), mtu)
    }
}

/// The name of the bridge port for host `index` called `host_name`: `v<index>-<name>`, cut
/// to the kernel's 15-character limit (the index keeps cut names distinct).
pub(crate) fn port_name(index: usize, host_name: &str) -> String {
    let mut name = format!("v{index}-{host_name}");
    if name.len() > MAX_IFNAME {
        let mut cut = MAX_IFNAME;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

/// Creates the lab's bridge (in its own namespace) and brings it up.
pub(crate) fn create_bridge(bridge_netns: &str) -> Result<(), LinkError> {
    cmd::ip_in(
        bridge_netns,
        &["link", "add", BRIDGE_IFACE, "type", "bridge"],
    )?;
    // No STP and no forwarding delay: ports forward the moment they are up.
    cmd::ip_in(
        bridge_netns,
        &[
            "link",
            "set",
            BRIDGE_IFACE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ],
    )?;
    cmd::ip_in(bridge_netns, &["link", "set", BRIDGE_IFACE, "up"])?;
    Ok(())
}

/// Joins a host namespace to the bridge with a veth pair, addresses it and brings it up.
pub(crate) fn connect(
    host_netns: &str,
    bridge_netns: &str,
    port: &str,
    addr: Ipv4Addr,
    subnet: Subnet,
    mtu: u32,
) -> Result<(), LinkError> {
    check_mtu(mtu)?;
    let mtu_text = mtu.to_string();
    cmd::ip_in(
        host_netns,
        &[
            "link",
            "add",
            HOST_IFACE,
            "mtu",
            &mtu_text,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "mtu",
            &mtu_text,
            "netns",
            bridge_netns,
        ],
    )?;
    cmd::ip_in(
        bridge_netns,
        &["link", "set", port, "master", BRIDGE_IFACE, "up"],
    )?;
    let cidr = format!("{addr}/{}", subnet.prefix_len());
    cmd::ip_in(host_netns, &["addr", "add", &cidr, "dev", HOST_IFACE])?;
    cmd::ip_in(host_netns, &["link", "set", HOST_IFACE, "up"])?;
    Ok(())
}

fn check_mtu(mtu: u32) -> Result<(), LinkError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(LinkError::MtuOutOfRange { mtu })
    }
}

fn set_mtu(netns: &str, device: &str, mtu: u32) -> Result<(), LinkError> {
    cmd::ip_in(
        netns,
        &["link", "set", "dev", device, "mtu", &mtu.to_string()],
    )?;
    Ok(())
}

pub(crate) fn read_mtu(netns: &str, device: &str) -> Result<u32, LinkError> {
    let output = cmd::ip_in(netns, &["-o", "link", "show", "dev", device])?;
    parse_mtu(&output).ok_or_else(|| LinkError::UnreadableMtu {
        netns: netns.to_owned(),
        device: device.to_owned(),
        output: output.trim().to_owned(),
    })
}

/// The number after `mtu` in `ip -o link show` output.
fn parse_mtu(output: &str) -> Option<u32> {
    let mut words = output.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// The host's end of its link, inside the host's namespace.
pub const HOST_IFACE: &str = "eth0";
/// The bridge, inside the lab's bridge namespace.
pub const BRIDGE_IFACE: &str = "br0";
/// Hosts per lab: the /24 has 254 usable addresses.
pub const MAX_HOSTS: usize = 254;
/// The lab subnet's prefix length.
const PREFIX_LEN: u8 = 24;
/// Linux interface names hold at most 15 bytes (IFNAMSIZ less the NUL).
pub(crate) const MAX_IFNAME: usize = 15;
/// The smallest MTU IPv4 allows.
const MIN_MTU: u32 = 68;
/// The largest MTU a veth takes.
const MAX_MTU: u32 = 65535;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_is_derived_from_the_id_one_to_one() {
        let s = Subnet::for_lab(LabId(0x3f9a));
        assert_eq!(s.to_string(), "10.63.154.0/24");
        assert_eq!(s.host_addr(0), Some(Ipv4Addr::new(10, 63, 154, 1)));
        assert_eq!(s.host_addr(253), Some(Ipv4Addr::new(10, 63, 154, 254)));
        assert_eq!(s.host_addr(254), None);
        let all: std::collections::HashSet<Subnet> =
            (0..=u16::MAX).map(|i| Subnet::for_lab(LabId(i))).collect();
        assert_eq!(all.len(), 65536, "distinct ids give distinct subnets");
    }

    #[test]
    fn port_names_fit_the_kernel_limit() {
        assert_eq!(port_name(0, "storage"), "v0-storage");
        assert_eq!(port_name(12, "a-very-long-host-name"), "v12-a-very-long");
        assert_eq!(port_name(12, "a-very-long-host-name").len(), MAX_IFNAME);
        assert_ne!(
            port_name(1, "samesamesamesame"),
            port_name(2, "samesamesamesame")
        );
    }

    #[test]
    fn mtu_parses_from_ip_output() {
        let out = "2: eth0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 qdisc noqueue state UP";
        assert_eq!(parse_mtu(out), Some(9000));
        assert_eq!(parse_mtu("garbage"), None);
        assert!(check_mtu(9000).is_ok());
        assert!(matches!(
            check_mtu(70000),
            Err(LinkError::MtuOutOfRange { mtu: 70000 })
        ));
    }
}
