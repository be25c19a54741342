//! The RDMA verbs layer: the [`verbs::Verbs`] abstraction the RDMA protocol is written
//! against, a software device ([`soft`]) that runs anywhere, and, with the cargo feature
//! `rdma`, the ibverbs hardware device (`hardware::HardwareVerbs`).
//!
//! ```text
//!   RDMA protocol (proto/seal.rs sealing; control messages, credits over QUIC)
//!          │ Verbs / Region
//!   ┌──────┴─────────────┬──────────────────────────────────────────────┐
//!   │ soft.rs            │ hardware.rs (feature `rdma`)                 │
//!   │ TCP, one task each │ device.rs  mr.rs  qp.rs  cq.rs  (safe owners) │
//!   │ way, no encryption │ sys.rs: every unsafe call (rdma-sys)         │
//!   └────────────────────┴──────────────────────────────────────────────┘
//! ```
//!
//! This layer moves bytes and reports completions; it does not encrypt, authenticate or
//! decide anything. Keys and addresses ([`verbs::RemoteRegion`], `local_info`) travel only
//! over the caller's control channel. [`discover`] lists the hardware devices so the daemon
//! can say "no RDMA device, using QUIC".

use serde::Serialize;

use super::Connection;

pub mod soft;
pub mod verbs;

#[cfg(feature = "rdma")]
mod cq;
#[cfg(feature = "rdma")]
mod device;
#[cfg(feature = "rdma")]
pub mod hardware;
#[cfg(feature = "rdma")]
mod mr;
#[cfg(feature = "rdma")]
mod qp;
#[cfg(feature = "rdma")]
mod sys;

/// The address `conn` runs over on this side: where an RDMA session's soft device listens,
/// so it crosses the same network as the connection (any address where the transport does
/// not know).
pub(crate) fn local_ip(conn: &dyn Connection) -> std::net::IpAddr {
    conn.local_ip()
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// A hardware RDMA device, as [`discover`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// The kernel's name for it, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Its node GUID.
    pub guid: u64,
    /// Its ports (empty if the device could not be opened to query them).
    pub ports: Vec<PortInfo>,
}

/// One port of a [`DeviceInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PortInfo {
    /// The port number (from 1).
    pub port: u8,
    /// Whether the port is up (`IBV_PORT_ACTIVE`).
    pub active: bool,
    /// InfiniBand, or Ethernet (RoCE).
    pub link_layer: LinkLayer,
    /// The active MTU in bytes.
    pub active_mtu: u32,
}

/// What a port runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LinkLayer {
    /// InfiniBand.
    InfiniBand,
    /// Ethernet: RoCE (including soft-RoCE, `rxe`).
    Ethernet,
    /// Something else, or not reported.
    Unknown,
}

/// The hardware RDMA devices on this machine. Always empty without the cargo feature `rdma`;
/// with it, empty (never an error or a panic) where there are no devices, no RDMA kernel
/// support or no verbs provider.
pub fn discover() -> Vec<DeviceInfo> {
    #[cfg(feature = "rdma")]
    {
        device::discover()
    }
    #[cfg(not(feature = "rdma"))]
    {
        Vec::new()
    }
}

/// `N` random bytes from the system's generator (keys, tokens, packet sequence numbers).
pub(crate) fn random<const N: usize>() -> Result<[u8; N], verbs::VerbsError> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| verbs::VerbsError::Device {
            op: "drawing random numbers",
            source: std::io::Error::other("the system random generator failed"),
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine has no RDMA hardware (and no RDMA kernel support): discovery says so with
    /// an empty list, with or without the `rdma` feature.
    #[test]
    fn discover_is_empty_without_devices() {
        let devices = discover();
        assert!(
            devices.is_empty(),
            "expected no RDMA devices on this machine, found {devices:?}"
        );
    }
}
