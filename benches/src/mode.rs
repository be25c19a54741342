//! One measured run of one mode: connect, move the object into memory or into a file, then
//! time small requests.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use certs::SpiffeId;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::{
    Client, ClientConfig, FetchOptions, IdentityHandle, Path, RdmaMode, RetryPolicy,
    TransportConfig,
};

pub use crate::outcome::{Destination, QuicPath, RunResult, Shape};
use crate::plaintext::PlaintextConnector;
use crate::stats::{Latency, cpu_time, latency_histogram, process_cpu_time};

/// A transport to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The protocol over bare TCP: the baseline.
    PlaintextTcp,
    /// The protocol over TLS 1.3 on TCP.
    TlsTcp,
    /// The protocol over QUIC with mutual TLS 1.3.
    Quic,
    /// Chunks by RDMA over the software device, sealed with AES-256-GCM under keys from
    /// the QUIC connection's TLS exporter; control over that QUIC connection.
    RdmaSoft,
    /// The same chunks unsealed, with no protocol: `rdma-soft`'s baseline, a bare loop over
    /// two soft devices in this process ([`crate::rdma_plain`]); the library always seals.
    RdmaSoftPlain,
    /// Chunks by RDMA over a hardware device, sealed (needs the `rdma` build feature and a
    /// device on both sides).
    Rdma,
    /// A TCP copy loop in this process: one connection's ceiling ([`crate::bare`]).
    BareTcp,
    /// rustls over TCP with the product's provider, in this process.
    BareTls,
    /// One quinn connection with the product's settings, in this process.
    BareQuic,
}

impl Mode {
    /// Every mode, reference loops and baselines first.
    pub const ALL: [Self; 9] = [
        Self::BareTcp,
        Self::BareTls,
        Self::BareQuic,
        Self::PlaintextTcp,
        Self::TlsTcp,
        Self::Quic,
        Self::RdmaSoftPlain,
        Self::RdmaSoft,
        Self::Rdma,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::PlaintextTcp => "plaintext-tcp",
            Self::TlsTcp => "tls-tcp",
            Self::Quic => "quic",
            Self::RdmaSoft => "rdma-soft",
            Self::RdmaSoftPlain => "rdma-soft-plain",
            Self::Rdma => "rdma",
            Self::BareTcp => crate::bare::Bare::Tcp.name(),
            Self::BareTls => crate::bare::Bare::Tls.name(),
            Self::BareQuic => crate::bare::Bare::Quic.name(),
        }
    }

    /// The reference loop of the library this mode runs on, which it is measured against
    /// (`ratio_to_bare`): bare-tcp for plaintext-tcp, bare-tls for tls-tcp, bare-quic for
    /// quic; a loop is its own. None for the RDMA modes.
    pub fn bare(self) -> Option<Self> {
        match self {
            Self::PlaintextTcp | Self::BareTcp => Some(Self::BareTcp),
            Self::TlsTcp | Self::BareTls => Some(Self::BareTls),
            Self::Quic | Self::BareQuic => Some(Self::BareQuic),
            Self::RdmaSoft | Self::RdmaSoftPlain | Self::Rdma => None,
        }
    }

    /// The reference loop behind this mode, if it is one.
    fn as_bare(self) -> Option<crate::bare::Bare> {
        match self {
            Self::BareTcp => Some(crate::bare::Bare::Tcp),
            Self::BareTls => Some(crate::bare::Bare::Tls),
            Self::BareQuic => Some(crate::bare::Bare::Quic),
            _ => None,
        }
    }

    /// The unencrypted mode this one is compared with.
    pub fn baseline(self) -> Self {
        match self {
            Self::RdmaSoft | Self::RdmaSoftPlain => Self::RdmaSoftPlain,
            _ => Self::PlaintextTcp,
        }
    }

    /// Whether the mode pulls the object through the product's client, so it can pull into
    /// a file too; the reference loops and `rdma-soft-plain` only move bytes into memory.
    pub fn pulls_object(self) -> bool {
        self.as_bare().is_none() && self != Self::RdmaSoftPlain
    }

    /// The name of this mode's rows in reports when it pulls `into`, striped over `stripes`
    /// connections: its own name into memory, `NAME>file` into a file (`tls-tcp>file`),
    /// with `*N` after it when striped (`tls-tcp*2`, `quic>file*4`). None for a file, or
    /// stripes, and a mode that pulls no object.
    pub fn row_name(self, into: Destination, stripes: u32) -> Option<&'static str> {
        let one = self.row_name_one(into)?;
        match stripes {
            1 => Some(one),
            0 => None,
            _ if !self.pulls_object() => None,
            n => Some(intern(format!("{one}*{n}"))),
        }
    }

    fn row_name_one(self, into: Destination) -> Option<&'static str> {
        match into {
            Destination::Memory => Some(self.name()),
            Destination::File => match self {
                Self::PlaintextTcp => Some("plaintext-tcp>file"),
                Self::TlsTcp => Some("tls-tcp>file"),
                Self::Quic => Some("quic>file"),
                Self::RdmaSoft => Some("rdma-soft>file"),
                Self::Rdma => Some("rdma>file"),
                Self::RdmaSoftPlain | Self::BareTcp | Self::BareTls | Self::BareQuic => None,
            },
        }
    }

    /// The mode, destination and stripes a row name (see [`Self::row_name`]) stands for.
    pub fn parse_row(row: &str) -> Option<(Self, Destination, u32)> {
        let (name, stripes) = match row.rsplit_once('*') {
            Some((name, n)) => (name, n.parse().ok()?),
            None => (row, 1),
        };
        let (mode, into) = match name.split_once('>') {
            Some((mode, into)) => (mode, into.parse().ok()?),
            None => (name, Destination::Memory),
        };
        let mode: Self = mode.parse().ok()?;
        (mode.row_name(into, stripes) == Some(row)).then_some((mode, into, stripes))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown mode {s:?}: expected bare-tcp, bare-tls, bare-quic, plaintext-tcp, \
                     tls-tcp, quic, rdma-soft, rdma-soft-plain or rdma"
                )
            })
    }
}

/// Where a run's server is and what it serves.
#[derive(Debug, Clone)]
pub struct Target {
    /// The client's identity.
    pub client: IdentityHandle,
    /// The server's SPIFFE ID (the plaintext baseline cannot learn it; it assumes it).
    pub server_id: SpiffeId,
    /// QUIC address.
    pub quic: SocketAddr,
    /// TLS/TCP address.
    pub tcp: SocketAddr,
    /// Plaintext baseline address, if the server runs one.
    pub plaintext: Option<SocketAddr>,
    /// The dataset.
    pub dataset: DatasetName,
    /// The object each run pulls.
    pub object: ObjectPath,
    /// Its size.
    pub size: u64,
    /// Bytes per chunk of the object (the last may be shorter).
    pub chunk_bytes: u32,
    /// Tuning.
    pub transport: TransportConfig,
    /// The server's process id, when it runs on this machine in another process: its CPU
    /// time is then measured too.
    pub server_pid: Option<u32>,
    /// Where pulls into a file land: each run in a directory of its own inside, removed
    /// after the run. On the same filesystem as the server's store when it runs here.
    pub pull_dir: PathBuf,
    /// The reference loops' server end, when the server runs them (`server --bare`): the
    /// loops then cross the same network as the product's modes. `None`: they run on this
    /// machine's loopback.
    pub bare: Option<crate::bare::RemoteBare>,
}

/// Runs `mode` once: `connections` clients each pull the object `into` memory or a file of
/// their own at once, then `requests` small requests are timed on one of them. When the
/// server shares this process (`local`), `cpu_s_per_gb` already holds both sides. The time
/// of a pull into a file ends when the file is complete: verified, fsynced and renamed; the
/// files are removed after that, outside the time.
pub async fn run(
    target: &Target,
    mode: Mode,
    into: Destination,
    shape: Shape,
) -> anyhow::Result<RunResult> {
    let row = mode
        .row_name(into, shape.stripes)
        .with_context(|| format!("{mode} pulls no object, so it cannot pull into a {into}"))?;
    if mode == Mode::RdmaSoftPlain {
        return crate::rdma_plain::run(target.size, target.chunk_bytes, shape).await;
    }
    if let Some(bare) = mode.as_bare() {
        return crate::bare::run(
            bare,
            target.size,
            shape,
            &target.transport,
            target.bare.as_ref(),
        )
        .await;
    }
    let mut transport = target.transport.clone();
    // The RDMA modes must not fall back to QUIC unnoticed; the others do not use RDMA.
    transport.rdma_required(true);
    match mode {
        Mode::RdmaSoft => transport.rdma(RdmaMode::Soft),
        Mode::Rdma => transport.rdma(RdmaMode::Auto),
        _ => transport.rdma(RdmaMode::Off),
    };
    let config = ClientConfig::builder()
        .identity(target.client.clone())
        .transport(transport)
        .build();
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..shape.connections.max(1) {
        clients.push(connect(target, mode, config.clone()).await?);
    }
    let connect_us = started.elapsed().as_micros() as u64 / u64::from(shape.connections.max(1));

    let opts = FetchOptions {
        parallel: Some(shape.parallel),
        retry: RetryPolicy::none(),
        progress: None,
        max_rate: None,
        connections: Some(shape.stripes.max(1)),
    };
    // A fresh directory per run: nothing an earlier run wrote can be resumed from.
    let scratch = tempfile::Builder::new()
        .prefix("pull-")
        .tempdir_in(&target.pull_dir)
        .with_context(|| format!("creating a directory in {}", target.pull_dir.display()))?;
    let mut buffers = match into {
        Destination::Memory => take_buffers(clients.len(), target.size)?,
        Destination::File => vec![Vec::new(); clients.len()],
    };
    let cpu0 = cpu_time();
    let server0 = target.server_pid.and_then(process_cpu_time);
    let t0 = Instant::now();
    let pulls = clients
        .iter()
        .zip(buffers.iter_mut())
        .enumerate()
        .map(|(i, (c, buf))| {
            let dest = scratch.path().join(format!("object-{i}.bin"));
            pull(c, target, into, dest, buf, &opts)
        });
    for pulled in futures::future::join_all(pulls).await {
        let pulled = pulled.with_context(|| format!("{row}: pulling the object"))?;
        anyhow::ensure!(pulled == target.size, "{row}: short read");
    }
    let secs = t0.elapsed().as_secs_f64();
    give_back_buffers(buffers);
    let cpu = cpu_time().saturating_sub(cpu0);
    let server_cpu = match (server0, target.server_pid.and_then(process_cpu_time)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    // The files go now, so the next run writes into free space again, not over them.
    tokio::task::spawn_blocking(move || scratch.close())
        .await?
        .context("removing the pulled files")?;
    let bytes = target.size * u64::from(shape.connections.max(1));
    let quic_path = clients[0].quic_path_stats().map(|p| QuicPath {
        mtu: p.mtu,
        client_sent_packets: p.sent_packets,
        client_lost_packets: p.lost_packets,
        black_holes_detected: p.black_holes_detected,
        rtt_us: p.rtt.as_micros() as u64,
        server_datagram_bytes: p.received_bytes / p.received_datagrams.max(1),
    });

    let client = &clients[0];
    let mut h = latency_histogram()?;
    let len = shape.request_bytes.min(target.size);
    for _ in 0..shape.requests {
        let t = Instant::now();
        if len == 0 {
            client.stat(&target.dataset, &target.object).await?;
        } else {
            client
                .read_range(&target.dataset, &target.object, 0..len)
                .await?;
        }
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    for c in &clients {
        c.close();
    }
    let gb = bytes as f64 / 1e9;
    let per_gb = |d: Duration| d.as_secs_f64() / gb;
    Ok(RunResult {
        mode: row,
        into,
        stripes: shape.stripes.max(1),
        bytes,
        seconds: secs,
        gbps: bytes as f64 / secs / 1e9,
        cpu_s_per_gb: per_gb(cpu + server_cpu.unwrap_or_default()),
        client_cpu_s_per_gb: per_gb(cpu),
        server_cpu_s_per_gb: server_cpu.map(per_gb),
        connect_us,
        latency: Latency::of(&h),
        quic_path,
    })
}

/// A row name made at run time, kept for the process's life (a few per invocation).
fn intern(name: String) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

/// Destination buffers, one per connection, kept across runs as a data loader keeps its
/// buffers: a run measures the pull, not the kernel handing out fresh pages.
static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn take_buffers(n: usize, size: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let size = usize::try_from(size).context("the object does not fit in memory")?;
    let mut pool = BUFFERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pool.retain(|b| b.len() == size);
    let keep = n.min(pool.len());
    let mut out: Vec<Vec<u8>> = pool.drain(..keep).collect();
    // New ones are written once, so their pages are resident before any run is timed.
    out.resize_with(n, || vec![0x5a; size]);
    Ok(out)
}

fn give_back_buffers(buffers: Vec<Vec<u8>>) {
    BUFFERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(buffers);
}

/// Pulls the whole object into `buf`, or into a file at `dest`; returns the bytes it holds.
async fn pull(
    client: &Client,
    target: &Target,
    into: Destination,
    dest: PathBuf,
    buf: &mut [u8],
    opts: &FetchOptions,
) -> anyhow::Result<u64> {
    match into {
        Destination::Memory => {
            let report = client
                .fetch_into(&target.dataset, &target.object, buf, opts)
                .await?;
            Ok(report.size)
        }
        Destination::File => {
            let report = client
                .fetch_to_file(&target.dataset, &target.object, &dest, opts)
                .await?;
            // The whole object came over the wire; nothing was resumed.
            anyhow::ensure!(
                report.chunks_reused == 0 && report.chunks_fetched == report.chunks,
                "{} of {} chunks were reused",
                report.chunks_reused,
                report.chunks
            );
            Ok(std::fs::metadata(&dest)?.len())
        }
    }
}

async fn connect(target: &Target, mode: Mode, config: ClientConfig) -> anyhow::Result<Client> {
    Ok(match mode {
        Mode::PlaintextTcp => {
            let addr = target
                .plaintext
                .context("the server runs no plaintext baseline (start it with --plaintext)")?;
            let connector = PlaintextConnector::dangerous_new(target.server_id.clone());
            Client::connect_with(config, addr, Arc::new(connector)).await?
        }
        Mode::TlsTcp => Client::connect(config, target.tcp, Path::Tcp).await?,
        Mode::RdmaSoftPlain | Mode::BareTcp | Mode::BareTls | Mode::BareQuic => {
            anyhow::bail!("{mode} makes no client connection")
        }
        Mode::Quic | Mode::RdmaSoft | Mode::Rdma => {
            Client::connect(config, target.quic, Path::Quic).await?
        }
    })
}

/// Gives the previous run's connections time to close before the next starts.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_striped_rows_are_named_after_their_mode_and_parse_back() {
        for mode in Mode::ALL {
            assert_eq!(mode.row_name(Destination::Memory, 1), Some(mode.name()));
            assert_eq!(
                Mode::parse_row(mode.name()),
                Some((mode, Destination::Memory, 1))
            );
            match mode.row_name(Destination::File, 1) {
                Some(row) => {
                    assert!(mode.pulls_object(), "{mode}");
                    assert_eq!(row, format!("{mode}>file"));
                    assert_eq!(Mode::parse_row(row), Some((mode, Destination::File, 1)));
                    let striped = mode.row_name(Destination::File, 4).unwrap();
                    assert_eq!(striped, format!("{mode}>file*4"));
                    assert_eq!(Mode::parse_row(striped), Some((mode, Destination::File, 4)));
                    let striped = mode.row_name(Destination::Memory, 2).unwrap();
                    assert_eq!(striped, format!("{mode}*2"));
                    assert_eq!(
                        Mode::parse_row(striped),
                        Some((mode, Destination::Memory, 2))
                    );
                }
                None => {
                    assert!(!mode.pulls_object(), "{mode}");
                    assert_eq!(mode.row_name(Destination::Memory, 2), None, "{mode}");
                }
            }
        }
        // The loops move no file and stripe nothing; unknown names and destinations are
        // nobody's rows.
        for row in [
            "bare-tcp>file",
            "bare-tcp*2",
            "rdma-soft-plain>file",
            "quic>disk",
            "quic*0",
            "quic*x",
            "pigeon",
            "quic>",
        ] {
            assert_eq!(Mode::parse_row(row), None, "{row}");
        }
        assert_eq!("file".parse(), Ok(Destination::File));
        assert!(
            "disk"
                .parse::<Destination>()
                .unwrap_err()
                .contains("memory")
        );
    }
}
