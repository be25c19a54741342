//! One measured run of one mode: connect, move the object, then time small requests.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use libtransport::{Client, ClientConfig, FetchOptions, Path, RetryPolicy};

use crate::setup::Bench;
use crate::stats::{Latency, cpu_time, latency_histogram};

/// A transport to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The protocol over bare TCP: the baseline.
    PlaintextTcp,
    /// The protocol over TLS 1.3 on TCP.
    TlsTcp,
    /// The protocol over QUIC with mutual TLS 1.3.
    Quic,
}

impl Mode {
    /// Every mode, baseline first.
    pub const ALL: [Self; 3] = [Self::PlaintextTcp, Self::TlsTcp, Self::Quic];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::PlaintextTcp => "plaintext-tcp",
            Self::TlsTcp => "tls-tcp",
            Self::Quic => "quic",
        }
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
            .ok_or_else(|| format!("unknown mode {s:?}: expected plaintext-tcp, tls-tcp or quic"))
    }
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Which mode.
    pub mode: &'static str,
    /// Bytes moved and verified.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub seconds: f64,
    /// Throughput, 10^9 bytes per second.
    pub gbps: f64,
    /// CPU seconds (both sides: they share this process) per 10^9 bytes.
    pub cpu_s_per_gb: f64,
    /// Connection set-up time (handshake and first round trip), microseconds.
    pub connect_us: u64,
    /// Latency of small requests (`stat`, one round trip each).
    pub latency: Latency,
}

/// Runs `mode` once: one bulk pull of the object into memory, then `requests` small ones.
pub async fn run(
    bench: &Bench,
    mode: Mode,
    parallel: u32,
    requests: u32,
) -> anyhow::Result<RunResult> {
    let config = ClientConfig::builder()
        .identity(bench.client.clone())
        .transport(bench.transport.clone())
        .build();
    let started = Instant::now();
    let client = match mode {
        Mode::PlaintextTcp => {
            libtransport::bench::dangerous_connect_plaintext(
                config,
                bench.plaintext,
                bench.server_id.clone(),
            )
            .await?
        }
        Mode::TlsTcp => Client::connect(config, addr(bench, Path::Tcp)?, Path::Tcp).await?,
        Mode::Quic => Client::connect(config, addr(bench, Path::Quic)?, Path::Quic).await?,
    };
    let connect_us = started.elapsed().as_micros() as u64;

    let opts = FetchOptions {
        parallel: Some(parallel),
        retry: RetryPolicy::none(),
        progress: None,
    };
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let data = client
        .fetch(&bench.dataset, &bench.object, bench.size, &opts)
        .await
        .with_context(|| format!("{mode}: pulling the object"))?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0);
    anyhow::ensure!(data.len() as u64 == bench.size, "{mode}: short read");
    drop(data);

    let mut h = latency_histogram()?;
    for _ in 0..requests {
        let t = Instant::now();
        client.stat(&bench.dataset, &bench.object).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    client.close();
    Ok(RunResult {
        mode: mode.name(),
        bytes: bench.size,
        seconds: secs,
        gbps: bench.size as f64 / secs / 1e9,
        cpu_s_per_gb: cpu.as_secs_f64() / (bench.size as f64 / 1e9),
        connect_us,
        latency: Latency::of(&h),
    })
}

fn addr(bench: &Bench, path: Path) -> anyhow::Result<std::net::SocketAddr> {
    match path {
        Path::Quic => bench.server.quic_addr(),
        Path::Tcp => bench.server.tcp_addr(),
    }
    .context("server not listening")
}

/// Gives the previous run's connections time to close before the next starts.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}
