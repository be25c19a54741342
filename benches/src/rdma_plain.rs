//! `rdma-soft-plain`: `rdma-soft`'s unsealed baseline, as a bare loop over two software RDMA
//! devices of libtransport's (`transport::rdma::soft::SoftVerbs`) in this process, on
//! loopback. The receiver registers a ring of slots and posts a receive per slot; it hands
//! the sender one chunk per free slot, and the sender copies the chunk into a staging slot
//! and writes it into the ring slot with WRITE WITH IMMEDIATE (the slot number). The
//! receiver copies each chunk out of its slot into the destination and hands the slot back.
//! No sealing and no protocol: the same work as `rdma-soft` minus what security adds, which
//! the library no longer offers at all (it always seals).
//!
//! It runs in this process whichever command runs it (`local`, or `client` against a remote
//! server): the baseline of a loopback device, not of the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use libtransport::transport::rdma::soft::{SoftConfig, SoftRegion, SoftVerbs};
use libtransport::transport::rdma::verbs::{CompletionKind, Region, Verbs, WorkId};
use tokio::sync::mpsc;

use crate::outcome::{Destination, RunResult, Shape};
use crate::stats::{Latency, cpu_time, latency_histogram};

/// Most ring slots, as the client's receive ring has.
const MAX_SLOTS: u32 = 16;

/// One `rdma-soft-plain` run: `shape.connections` device pairs each move `size` bytes in
/// chunks of `chunk_bytes`, `shape.parallel` (at most 16) in flight; then `shape.requests`
/// writes of `shape.request_bytes` (at least one byte) are timed on the first pair.
pub async fn run(size: u64, chunk_bytes: u32, shape: Shape) -> anyhow::Result<RunResult> {
    anyhow::ensure!(chunk_bytes > 0, "rdma-soft-plain: chunks of zero bytes");
    let connections = shape.connections.max(1);
    let slots = shape.parallel.clamp(1, MAX_SLOTS);
    let started = Instant::now();
    let mut pairs = Vec::new();
    for _ in 0..connections {
        pairs.push(Pair::new(slots, chunk_bytes as usize).await?);
    }
    let connect_us = started.elapsed().as_micros() as u64 / u64::from(connections);
    // What the server would read from its store: one chunk's worth of bytes, copied in for
    // every chunk.
    let source: Arc<Vec<u8>> = Arc::new(
        (0..chunk_bytes as usize)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect(),
    );
    let lens = |total: u64| {
        let cb = u64::from(chunk_bytes);
        (0..total.div_ceil(cb)).map(move |i| (total - i * cb).min(cb) as usize)
    };

    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let moves = pairs.iter().map(|p| async {
        // Into memory, as the other modes' pulls.
        let mut dest = vec![0u8; usize::try_from(size).context("--size")?];
        p.transfer(lens(size), &source, &mut dest).await?;
        anyhow::ensure!(
            dest.chunks(chunk_bytes as usize)
                .all(|c| c == &source[..c.len()]),
            "rdma-soft-plain: the bytes that arrived differ"
        );
        Ok(())
    });
    for moved in futures::future::join_all(moves).await {
        moved?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0);
    let bytes = size * u64::from(connections);

    let mut h = latency_histogram()?;
    let one = shape.request_bytes.clamp(1, u64::from(chunk_bytes));
    let mut dest = vec![0u8; one as usize];
    for _ in 0..shape.requests {
        let t = Instant::now();
        pairs[0].transfer(lens(one), &source, &mut dest).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    let gb = bytes as f64 / 1e9;
    let per_gb = |d: Duration| d.as_secs_f64() / gb;
    Ok(RunResult {
        mode: "rdma-soft-plain",
        into: Destination::Memory,
        stripes: 1,
        bytes,
        seconds: secs,
        gbps: bytes as f64 / secs / 1e9,
        // Both devices are in this process: its CPU time is both sides'.
        cpu_s_per_gb: per_gb(cpu),
        client_cpu_s_per_gb: per_gb(cpu),
        server_cpu_s_per_gb: None,
        connect_us,
        latency: Latency::of(&h),
        quic_path: None,
    })
}

/// Two connected soft devices: a receive ring on one, staging slots on the other.
struct Pair {
    rx: SoftVerbs,
    tx: SoftVerbs,
    ring: SoftRegion,
    staging: SoftRegion,
    slots: usize,
    slot_bytes: usize,
}

impl Pair {
    async fn new(slots: u32, slot_bytes: usize) -> anyhow::Result<Self> {
        let device = || async {
            let mut config = SoftConfig::default();
            config.bind("127.0.0.1:0".parse()?);
            SoftVerbs::bind(Arc::new(config))
                .await
                .context("binding a soft RDMA device")
        };
        let (rx, tx) = (device().await?, device().await?);
        let (rx_info, tx_info) = (rx.local_info(), tx.local_info());
        let (a, b) = tokio::join!(rx.connect(&tx_info), tx.connect(&rx_info));
        a.and(b).context("connecting the soft RDMA devices")?;
        let slots = slots as usize;
        let ring = rx.register(slots * slot_bytes)?;
        let staging = tx.register(slots * slot_bytes)?;
        for slot in 0..slots {
            rx.post_recv(WorkId(slot as u64), &ring, slot * slot_bytes, 0)?;
        }
        Ok(Self {
            rx,
            tx,
            ring,
            staging,
            slots,
            slot_bytes,
        })
    }

    /// Moves chunks of `lens` (each at most a slot) from `source` into `dest`, one after
    /// the other.
    async fn transfer(
        &self,
        lens: impl Iterator<Item = usize>,
        source: &[u8],
        dest: &mut [u8],
    ) -> anyhow::Result<()> {
        let mut work = lens.enumerate().map(|(i, len)| (i * self.slot_bytes, len));
        let mut left = dest.len().div_ceil(self.slot_bytes);
        // The receiver's grants: (slot, len).
        let (grant, mut granted) = mpsc::unbounded_channel::<(usize, usize)>();
        let mut holds: Vec<Option<(usize, usize)>> = vec![None; self.slots];
        for (slot, hold) in holds.iter_mut().enumerate() {
            if let Some((at, len)) = work.next() {
                *hold = Some((at, len));
                grant.send((slot, len))?;
            }
        }
        let receiving = async {
            while left > 0 {
                let c = self.rx.poll().await?;
                c.status.context("rdma-soft-plain: a write failed")?;
                let CompletionKind::WriteWithImm { imm, len } = c.kind else {
                    anyhow::bail!("rdma-soft-plain: unexpected completion {:?}", c.kind);
                };
                let slot = imm as usize;
                let (at, want) = holds
                    .get_mut(slot)
                    .and_then(Option::take)
                    .context("rdma-soft-plain: a write into a slot not handed out")?;
                anyhow::ensure!(len as usize == want, "rdma-soft-plain: short write");
                let from = slot * self.slot_bytes;
                self.ring.with_mut(from..from + want, |b| {
                    dest[at..at + want].copy_from_slice(b)
                })?;
                self.rx
                    .post_recv(WorkId(slot as u64), &self.ring, from, 0)?;
                left -= 1;
                if let Some((at, len)) = work.next() {
                    holds[slot] = Some((at, len));
                    grant.send((slot, len))?;
                }
            }
            drop(grant);
            Ok(())
        };
        let sending = async {
            let mut busy = vec![false; self.slots];
            let mut in_flight = 0usize;
            while let Some((slot, len)) = granted.recv().await {
                // The staging slot's previous write must be done before it is refilled.
                while busy[slot] {
                    busy[self.written().await?] = false;
                    in_flight -= 1;
                }
                let from = slot * self.slot_bytes;
                // The source is one chunk long: every chunk carries the same bytes.
                self.staging
                    .with_mut(from..from + len, |b| b.copy_from_slice(&source[..len]))?;
                self.tx.post_write_imm(
                    WorkId(slot as u64),
                    &self.staging,
                    from,
                    len,
                    &self.ring.remote(),
                    from as u64,
                    slot as u32,
                )?;
                busy[slot] = true;
                in_flight += 1;
            }
            while in_flight > 0 {
                self.written().await?;
                in_flight -= 1;
            }
            Ok::<_, anyhow::Error>(())
        };
        let (received, sent) = tokio::join!(receiving, sending);
        received.and(sent)
    }

    /// The staging slot whose write completed next.
    async fn written(&self) -> anyhow::Result<usize> {
        let c = self.tx.poll().await?;
        c.status.context("rdma-soft-plain: a write failed")?;
        anyhow::ensure!(
            c.kind == CompletionKind::Write,
            "rdma-soft-plain: unexpected completion {:?}",
            c.kind
        );
        Ok(c.id.0 as usize)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly.

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bare_loop_moves_every_byte_and_times_its_requests() {
        let shape = Shape {
            parallel: 4,
            connections: 2,
            requests: 3,
            request_bytes: 100,
            stripes: 1,
        };
        let size = 10 * (64 << 10) + 5;
        let r = run(size, 64 << 10, shape).await.unwrap();
        assert_eq!(r.mode, "rdma-soft-plain");
        assert_eq!(r.bytes, 2 * size);
        assert!(r.latency.p50_us > 0);
    }
}
