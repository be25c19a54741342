//! The demo's bare-TCP probe: what one TCP connection moves over loopback on this machine
//! with nothing of ours in the way (no TLS, no protocol, no verification, no files), so the
//! demo can show each path's distance to the machine it ran on.
//!
//! A tokio copy loop in the demo's own process: the writer sends 1 MiB buffers and closes
//! its half, the reader drains them into one reused 1 MiB buffer and counts. The time runs
//! from the connect until the reader has seen every byte and the end of the stream. What it
//! does not measure: the demo's paths also start a process, take an SVID, handshake, hash
//! and write files, and the probe's figure holds none of that.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, ensure};
use libtransport::clock::{Clock, SystemClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the probe measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct BareTcp {
    /// Bytes the reader received.
    pub(super) bytes: u64,
    /// From the connect until the reader saw the end of the stream.
    pub(super) seconds: f64,
}

impl BareTcp {
    /// Throughput, 10^9 bytes per second.
    pub(super) fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
}

/// The bytes the probe moves for a demo of `size` bytes: as much as one pull, but at least
/// [`MIN_BYTES`] and at most [`MAX_BYTES`].
pub(super) fn probe_bytes(size: u64) -> u64 {
    size.clamp(MIN_BYTES, MAX_BYTES)
}

/// Copies `bytes` over one loopback TCP connection and times it.
pub(super) async fn bare_tcp(bytes: u64) -> anyhow::Result<BareTcp> {
    tokio::time::timeout(TIMEOUT, copy(bytes))
        .await
        .with_context(|| format!("the bare-TCP probe did not finish within {TIMEOUT:?}"))?
}

async fn copy(bytes: u64) -> anyhow::Result<BareTcp> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; IO_BYTES];
        let mut got = 0u64;
        loop {
            match socket.read(&mut buf).await? {
                0 => return Ok::<_, std::io::Error>(got),
                n => got += n as u64,
            }
        }
    });
    let started = SystemClock.instant();
    let mut socket = TcpStream::connect(addr)
        .await
        .context("connecting the probe")?;
    socket.set_nodelay(true)?;
    let buf = vec![0u8; IO_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(IO_BYTES as u64) as usize;
        socket.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    socket.shutdown().await?;
    let got = reader.await.context("the probe's reader panicked")??;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        got == bytes,
        "the probe's reader got {got} of {bytes} bytes"
    );
    Ok(BareTcp { bytes, seconds })
}

/// Bytes per write and per read.
const IO_BYTES: usize = 1 << 20;
/// Shorter copies are mostly start-up: 256 MiB.
const MIN_BYTES: u64 = 256 << 20;
/// Enough for a steady rate; more only makes the demo longer: 1 GiB.
const MAX_BYTES: u64 = 1 << 30;
/// A loopback copy of 1 GiB takes well under a second; a minute means something is stuck.
const TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_probe_moves_every_byte_and_times_it() {
        let _trace = libtransport::test_util::trace_init();
        let probe = bare_tcp(8 << 20).await.unwrap();
        assert_eq!(probe.bytes, 8 << 20);
        assert!(probe.seconds > 0.0);
        assert!(probe.gbps().is_finite() && probe.gbps() > 0.0);
        // Not a whole number of writes: the last one is short.
        assert_eq!(
            bare_tcp(IO_BYTES as u64 * 3 + 5).await.unwrap().bytes,
            3 << 20 | 5
        );
    }

    #[test]
    fn the_probe_moves_as_much_as_a_pull_within_bounds() {
        let _trace = libtransport::test_util::trace_init();
        assert_eq!(probe_bytes(64 << 20), MIN_BYTES);
        assert_eq!(probe_bytes(512 << 20), 512 << 20);
        assert_eq!(probe_bytes(8 << 30), MAX_BYTES);
    }
}
