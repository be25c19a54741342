//! What a measured run is asked to do ([`Shape`], [`Destination`]) and what it returns
//! ([`RunResult`]): the shared vocabulary of the product's modes (`mode.rs`) and the
//! bench's own loops (`bare.rs`, `rdma_plain.rs`), which imports none of them.

use std::fmt;

use crate::stats::Latency;

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Which mode, as its rows are named: `tls-tcp` into memory, `tls-tcp>file` into a file
    /// (see `Mode::row_name`).
    pub mode: &'static str,
    /// Where the object went.
    pub into: Destination,
    /// Connections the pull was striped over (1 for the reference loops).
    pub stripes: u32,
    /// Bytes moved and verified.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub seconds: f64,
    /// Throughput, 10^9 bytes per second.
    pub gbps: f64,
    /// CPU seconds per 10^9 bytes, both sides (client and server).
    pub cpu_s_per_gb: f64,
    /// CPU seconds per 10^9 bytes on the client (this process).
    pub client_cpu_s_per_gb: f64,
    /// CPU seconds per 10^9 bytes on the server, when it could be measured.
    pub server_cpu_s_per_gb: Option<f64>,
    /// Connection set-up time (handshake and first round trip), microseconds.
    pub connect_us: u64,
    /// Latency of small requests (a `stat`, or a read of `--request-size` bytes).
    pub latency: Latency,
    /// The first connection's QUIC path after the pull, on QUIC modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic_path: Option<QuicPath>,
}

/// What QUIC learnt of the path during a run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct QuicPath {
    /// Datagram size in use at the end of the pull.
    pub mtu: u16,
    /// Packets sent by the client (acknowledgements, mostly).
    pub client_sent_packets: u64,
    /// Client packets declared lost.
    pub client_lost_packets: u64,
    /// Times losses of large datagrams made the client fall back to 1200-byte datagrams.
    pub black_holes_detected: u64,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u64,
    /// Average size of the datagrams the server sent: its datagram size in use.
    pub server_datagram_bytes: u64,
}

/// How each run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Chunks in flight per connection, each on its own stream.
    pub parallel: u32,
    /// Connections pulling the object at once (each its own client).
    pub connections: u32,
    /// Small requests timed for the latency percentiles.
    pub requests: u32,
    /// Bytes each latency request reads (0: a `stat`, one round trip without data).
    pub request_bytes: u64,
    /// Connections each client's pull stripes its chunks over (`FetchOptions::connections`).
    pub stripes: u32,
}

/// Where a run pulls the object to.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// Into memory (`Client::fetch_into`, a buffer kept across runs); the reference loops always read into memory.
    #[default]
    Memory,
    /// Into a file (`Client::fetch_to_file`): each chunk written in place and verified, the
    /// file fsynced and renamed when complete. Deleted after each run, so every run pulls
    /// the whole object.
    File,
}

impl Destination {
    /// Every destination, in the order runs take them.
    pub const ALL: [Self; 2] = [Self::Memory, Self::File];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::File => "file",
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown destination {s:?}: expected memory or file"))
    }
}
