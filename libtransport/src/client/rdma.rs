//! The receiver's side of an RDMA session (see `proto/rdma.rs` for the exchange).
//!
//! The client registers a receive ring of `slots` sealed-chunk slots, posts a receive per
//! slot and offers the ring on a QUIC stream of the connection the transfer is open on. Once
//! the server accepts, both derive the session's keys from that connection's TLS exporter,
//! and the client grants one chunk per slot. Each WRITE WITH IMMEDIATE names its slot; the
//! client opens the chunk in place (placement, replay window, tag), and only then copies the
//! plaintext into the destination, where the chunk's BLAKE3 digest is checked as on the
//! stream path. A chunk that fails to open is not used and is asked for again; after
//! [`MAX_OPEN_FAILURES`] failures the transfer is aborted.
//!
//! When RDMA cannot be used (configuration, no device, or the server refuses), the caller
//! falls back to the stream reads, and the client says why once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Client;
use super::connection::Connection;
use super::reply::{next_data, response, unexpected};
use crate::config::RdmaMode;
use crate::error::{FetchError, NoRdmaReason, ProtocolViolation, RequestError};
use crate::proto::rdma::grant::{Aborted, CompletionError, Landed, Receiver, UnknownChunk};
use crate::proto::rdma::{DeviceKind, MAX_SLOTS, RdmaControl, RdmaOffer};
use crate::proto::seal::{Direction, OpenError, Opener, SessionKeys, sealed_len};
use crate::proto::{
    ChunkIndex, Digest, ErrorCode, FrameKind, Manifest, Request, Response, TransferId,
};
use crate::store::{ChunkWriter, PartialFile, WriteError};
use crate::transport::rdma::local_ip;
use crate::transport::rdma::soft::{SoftConfig, SoftVerbs};
use crate::transport::rdma::verbs::{CompletionKind, Region, Verbs, WorkId};
use crate::transport::rdma_keys;
use crate::vocab::Path;

/// Most slots in a receive ring.
const RING_SLOTS: usize = 16;
/// Most bytes in a receive ring.
const RING_BYTES: usize = 256 << 20;

/// Where verified chunks go.
#[derive(Clone)]
pub(super) enum Deliver<'d> {
    /// Into a resumable partial file.
    File(Arc<PartialFile>),
    /// Into memory, a place per chunk.
    Memory(&'d (dyn FillChunk + Sync)),
}

/// Memory that takes a pull's chunks whole, once they are verified.
pub(super) trait FillChunk {
    /// Copies chunk `index` into its place.
    fn fill(&self, index: ChunkIndex, bytes: &[u8]) -> Result<(), FetchError>;
}

impl FillChunk for super::memory::ChunkSlots<'_> {
    fn fill(&self, index: ChunkIndex, bytes: &[u8]) -> Result<(), FetchError> {
        super::memory::ChunkSlots::fill(self, index, bytes)
    }
}

/// Called with each chunk's length as it is delivered.
pub(super) type OnChunk = Arc<dyn Fn(u64) + Send + Sync>;

impl Client {
    /// Moves `work` by RDMA when the configuration and both sides allow. `Ok(false)`: RDMA
    /// is not available and nothing was moved (use the stream reads).
    pub(super) async fn pull_rdma(
        &self,
        conn: &Connection,
        transfer: TransferId,
        manifest: &Arc<Manifest>,
        work: &VecDeque<ChunkIndex>,
        deliver: Deliver<'_>,
        on_chunk: OnChunk,
    ) -> Result<bool, FetchError> {
        let transport = &self.config().transport;
        let kind = match transport.rdma_mode() {
            RdmaMode::Off => return Ok(false),
            RdmaMode::Soft => DeviceKind::Soft,
            RdmaMode::Auto if crate::transport::rdma::discover().is_empty() => {
                return self.rdma_fallback(NoRdmaReason::NoDevice);
            }
            RdmaMode::Auto => DeviceKind::Hardware,
        };
        if work.is_empty() {
            return Ok(true);
        }
        if conn.peer.path != Path::Quic {
            return self.rdma_fallback(NoRdmaReason::NeedsQuic);
        }
        let session = Session {
            client: self,
            conn,
            transfer,
            manifest,
            kind,
        };
        match kind {
            DeviceKind::Soft => {
                let mut soft = SoftConfig::default();
                soft.bind(SocketAddr::new(local_ip(conn.transport()), 0));
                match SoftVerbs::bind(Arc::new(soft)).await {
                    Ok(device) => session.run(device, work, deliver, on_chunk).await,
                    Err(e) => self.rdma_fallback(NoRdmaReason::SoftDeviceUnavailable(e)),
                }
            }
            #[cfg(feature = "rdma")]
            DeviceKind::Hardware => {
                use crate::transport::rdma::hardware::{HardwareConfig, HardwareVerbs};
                match HardwareVerbs::open(Arc::new(HardwareConfig::default())).await {
                    Ok(device) => session.run(device, work, deliver, on_chunk).await,
                    Err(e) => self.rdma_fallback(NoRdmaReason::DeviceUnavailable(e)),
                }
            }
            #[cfg(not(feature = "rdma"))]
            DeviceKind::Hardware => self.rdma_fallback(NoRdmaReason::NoDevice),
        }
    }

    /// Falls back to QUIC, saying why the first time; or fails, if RDMA is required.
    fn rdma_fallback(&self, why: NoRdmaReason) -> Result<bool, FetchError> {
        if self.config().transport.rdma_required {
            return Err(FetchError::NoRdma(why));
        }
        if !self.rdma_notice.swap(true, Ordering::Relaxed) {
            tracing::info!("{why}: {}", why.fallback());
        }
        Ok(false)
    }
}

struct Session<'a> {
    client: &'a Client,
    conn: &'a Connection,
    transfer: TransferId,
    manifest: &'a Arc<Manifest>,
    kind: DeviceKind,
}

impl Session<'_> {
    async fn run<V: Verbs>(
        self,
        device: V,
        work: &VecDeque<ChunkIndex>,
        deliver: Deliver<'_>,
        on_chunk: OnChunk,
    ) -> Result<bool, FetchError> {
        let ring = Ring::new(device, self.manifest, work.len())
            .map_err(|e| FetchError::Local(std::io::Error::other(e)))?;
        let offer = RdmaOffer {
            device: self.kind,
            info: Bytes::from(ring.device.local_info()),
            ring_addr: ring.region.remote().addr,
            ring_len: ring.region.remote().len,
            ring_rkey: ring.region.remote().rkey.0,
            slot_bytes: ring.slot_bytes as u32,
            slots: ring.slots as u32,
            // Chunks are always sealed; the byte stays in the wire format.
            unsealed: false,
        };
        let req = Request::RdmaOpen {
            transfer: self.transfer,
            offer,
        };
        let mut s = self.conn.open(&req).await?;
        let (session, info) = match response(&mut s.source).await {
            Ok(Response::RdmaAccepted { session, info }) => (session, info),
            Err(RequestError::Remote(ErrorCode::NoRdma)) => {
                return self.client.rdma_fallback(NoRdmaReason::ServerRefused);
            }
            Err(e) => return Err(e.into()),
            Ok(other) => return Err(unexpected(&other).into()),
        };
        let keys: SessionKeys = rdma_keys(self.conn.transport(), session)
            .map_err(|e| FetchError::Local(std::io::Error::other(e)))?;
        let opener = keys.opener(Direction::ServerToClient);
        if let Err(e) = ring.device.connect(&info).await {
            return self.client.rdma_fallback(NoRdmaReason::ConnectFailed(e));
        }
        tracing::debug!(slots = ring.slots, "RDMA session started");
        let (grants, mut rx) = mpsc::unbounded_channel();
        let receiving = ring.receive(
            self.transfer.0,
            self.manifest,
            opener,
            work.clone(),
            &deliver,
            grants,
            &on_chunk,
        );
        let forwarding = async {
            while let Some(g) = rx.recv().await {
                s.sink
                    .send(FrameKind::Data, RdmaControl::encode(&g))
                    .await
                    .map_err(RequestError::from)?;
            }
            Ok::<_, FetchError>(())
        };
        let (received, forwarded) = tokio::join!(receiving, forwarding);
        if let Err(e) = received {
            if let Some((index, failures)) = e.aborted {
                self.client
                    .audit_rdma_abort(self.conn, self.transfer, index, failures);
            }
            return Err(e.error);
        }
        forwarded?;
        s.sink
            .send(FrameKind::Data, RdmaControl::Finish.encode())
            .await
            .map_err(RequestError::from)?;
        s.sink.finish();
        match next_data(&mut s.source).await? {
            None => Ok(true),
            Some(_) => Err(protocol(ProtocolViolation::RdmaControlData)),
        }
    }
}

/// Why a receive loop stopped.
#[derive(Debug)]
pub(super) struct ReceiveError {
    /// The failure.
    pub(super) error: FetchError,
    /// Set when chunks kept failing to open and the transfer was aborted: the last chunk
    /// that failed, and how many failed.
    pub(super) aborted: Option<(ChunkIndex, u32)>,
}

impl From<FetchError> for ReceiveError {
    fn from(error: FetchError) -> Self {
        Self {
            error,
            aborted: None,
        }
    }
}

/// A receive ring on a device.
pub(super) struct Ring<V: Verbs> {
    pub(super) device: V,
    pub(super) region: Arc<V::Region>,
    pub(super) slot_bytes: usize,
    pub(super) slots: usize,
}

impl<V: Verbs> Ring<V> {
    /// Registers a ring for `chunks` chunks of `manifest` and posts a receive per slot.
    pub(super) fn new(
        device: V,
        manifest: &Manifest,
        chunks: usize,
    ) -> Result<Self, crate::transport::rdma::verbs::VerbsError> {
        let largest = (0..manifest.chunk_count())
            .filter_map(|i| manifest.chunk_range(ChunkIndex(i)))
            .map(|r| (r.end - r.start) as usize)
            .max()
            .unwrap_or(0);
        let slot_bytes = sealed_len(largest).max(1).next_multiple_of(64);
        let slots = chunks
            .clamp(1, RING_SLOTS)
            .min((RING_BYTES / slot_bytes).max(1))
            .min(MAX_SLOTS as usize);
        let region = Arc::new(device.register(slot_bytes * slots)?);
        for slot in 0..slots {
            device.post_recv(WorkId(slot as u64), &region, slot * slot_bytes, 0)?;
        }
        Ok(Self {
            device,
            region,
            slot_bytes,
            slots,
        })
    }

    /// Grants chunks slot by slot and delivers each one that opens, until `work` is done.
    /// Grants go out through `grants`; `on_chunk` hears of each delivered chunk. What each
    /// completion means, and what to grant next, is the pure [`Receiver`]'s decision; this
    /// loop moves grants, completions and slots between it, the device and the opener.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive(
        &self,
        transfer: u64,
        manifest: &Arc<Manifest>,
        opener: Opener,
        work: VecDeque<ChunkIndex>,
        deliver: &Deliver<'_>,
        grants: mpsc::UnboundedSender<RdmaControl>,
        on_chunk: &OnChunk,
    ) -> Result<(), ReceiveError> {
        // `slots` is at most MAX_SLOTS (see `new`).
        let mut machine = Receiver::new(transfer, manifest.clone(), work, self.slots as u32)
            .map_err(|UnknownChunk(chunk)| FetchError::Corrupt(chunk))?;
        let send = |machine: &mut Receiver| {
            while let Some(g) = machine.poll_grant() {
                grants
                    .send(g)
                    .map_err(|_| protocol(ProtocolViolation::RdmaControlClosed))?;
            }
            Ok::<_, FetchError>(())
        };
        send(&mut machine)?;
        let mut opener = Some(opener);
        while !machine.is_done() {
            let c = self
                .device
                .poll()
                .await
                .map_err(|e| protocol(ProtocolViolation::RdmaSession(e)))?;
            let (slot, len) = match (c.kind, c.status) {
                (CompletionKind::WriteWithImm { imm, len }, Ok(())) => (imm, len as usize),
                (kind, status) => {
                    return Err(protocol(ProtocolViolation::RdmaCompletion { kind, status }).into());
                }
            };
            let (landed, opened) = match machine.handle_completion(slot, len) {
                Ok(landed) => {
                    let (opened, back) = self
                        .open_and_deliver(&landed, opener.take(), deliver, manifest)
                        .await?;
                    opener = back;
                    (landed, opened)
                }
                // Not what a sealer writes for this chunk: refused, as the opener would.
                Err(CompletionError::WrongLength { landed, .. }) => {
                    (landed, Err(OpenError::Truncated))
                }
                Err(CompletionError::UngrantedSlot { .. }) => {
                    return Err(protocol(ProtocolViolation::UngrantedSlot).into());
                }
            };
            let slot = landed.slot() as usize;
            self.device
                .post_recv(WorkId(slot as u64), &self.region, slot * self.slot_bytes, 0)
                .map_err(|e| protocol(ProtocolViolation::RdmaRepost(e)))?;
            match opened {
                Ok(()) => {
                    let delivered = machine.handle_opened(landed);
                    on_chunk(u64::from(delivered.len));
                }
                Err(e) => {
                    let chunk = landed.chunk();
                    match machine.handle_refused(landed) {
                        Ok(again) => {
                            tracing::warn!(chunk = chunk.0, error = %e, failures = again.failures, "RDMA chunk refused");
                        }
                        Err(Aborted { chunk, failures }) => {
                            tracing::warn!(chunk = chunk.0, error = %e, failures, "RDMA chunk refused");
                            return Err(ReceiveError {
                                error: FetchError::Corrupt(chunk),
                                aborted: Some((chunk, failures)),
                            });
                        }
                    }
                }
            }
            send(&mut machine)?;
        }
        Ok(())
    }

    /// Opens `landed`'s slot in place and, if it opens, delivers the plaintext. Opening,
    /// checking the digest and writing a file run off the runtime's threads; the copy into
    /// memory runs here, as memory of the caller's cannot move to another thread. The outer
    /// error ends the transfer; the inner one is a refused chunk. The opener comes back
    /// unless the blocking task was lost.
    async fn open_and_deliver(
        &self,
        landed: &Landed,
        opener: Option<Opener>,
        deliver: &Deliver<'_>,
        manifest: &Arc<Manifest>,
    ) -> Result<(Result<(), OpenError>, Option<Opener>), FetchError> {
        let Some(mut opener) = opener else {
            return Err(FetchError::Local(std::io::Error::other(
                "the RDMA opener was lost",
            )));
        };
        let expect = landed.placement();
        let chunk = ChunkIndex(expect.chunk);
        let at = landed.slot() as usize * self.slot_bytes;
        let span = landed.sealed_len();
        let file = match deliver {
            Deliver::File(p) => Some(p.clone()),
            Deliver::Memory(_) => None,
        };
        let (region, manifest) = (self.region.clone(), manifest.clone());
        let (opened, opener) = tokio::task::spawn_blocking(move || {
            let r = region.with_mut(at..at + span, |buf| {
                let plain = match opener.open_range(expect, buf) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(e)),
                };
                match &file {
                    Some(partial) => put_file(partial, chunk, &buf[plain.clone()])?,
                    None => manifest
                        .check_digest(chunk, Digest(blake3::hash(&buf[plain.clone()]).into()))
                        .map_err(|_| FetchError::Corrupt(chunk))?,
                }
                Ok(Ok(plain))
            });
            match r {
                Ok(Ok(opened)) => Ok((opened, opener)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(FetchError::Local(std::io::Error::other(e))),
            }
        })
        .await
        .map_err(|e| FetchError::Local(std::io::Error::other(e)))??;
        let opened = match (opened, deliver) {
            (Ok(plain), Deliver::Memory(memory)) => {
                let range = at + plain.start..at + plain.end;
                self.region
                    .with_mut(range, |p| memory.fill(chunk, p))
                    .map_err(|e| FetchError::Local(std::io::Error::other(e)))??;
                Ok(())
            }
            (Ok(_), Deliver::File(_)) => Ok(()),
            (Err(e), _) => Err(e),
        };
        Ok((opened, Some(opener)))
    }
}

/// Writes a chunk that opened into the partial file; its digest is checked there.
fn put_file(partial: &Arc<PartialFile>, index: ChunkIndex, plain: &[u8]) -> Result<(), FetchError> {
    let chunk_failure = |e: WriteError| match e {
        WriteError::Io(e) => FetchError::Local(e),
        _ => FetchError::Corrupt(index),
    };
    let mut w = ChunkWriter::new(partial.clone(), index).map_err(chunk_failure)?;
    w.feed(plain).map_err(chunk_failure)?;
    w.finish().map_err(chunk_failure)
}

fn protocol(what: ProtocolViolation) -> FetchError {
    FetchError::Request(RequestError::Protocol(what))
}

/// Bytes delivered by RDMA, for the pull's report.
pub(super) fn counting(fetched: Arc<AtomicU64>, then: Option<OnChunk>) -> OnChunk {
    Arc::new(move |n| {
        fetched.fetch_add(n, Ordering::Relaxed);
        if let Some(f) = &then {
            f(n);
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

    use super::*;
    use crate::client::memory::ChunkSlots;
    use crate::proto::seal::{
        EXPORTER_BYTES, HEADER_LEN, KeyLimits, MAX_OPEN_FAILURES, Placement, Sealer,
    };

    const CHUNK: usize = 64 << 10;
    const CHUNKS: usize = 4;

    /// What the test's sender does to each chunk it is granted.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Sender {
        Honest,
        FlipBody,
        FlipTag,
        /// Writes a correctly sealed chunk, but another one than granted.
        Relocate,
        /// Seals under another session's keys.
        OtherSession,
        /// Seals the first grant honestly, then sends those same bytes again.
        Replay,
    }

    fn data() -> Vec<u8> {
        (0..CHUNK * CHUNKS)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect()
    }

    fn keys(session: u8) -> SessionKeys {
        SessionKeys::derive([session; 16], &[0x5a; EXPORTER_BYTES])
    }

    /// Runs a receive loop against a sender that behaves as `sender`, over two soft devices.
    async fn run(sender: Sender, work: &[u32]) -> (Result<(), ReceiveError>, Vec<Vec<u8>>) {
        let data = Arc::new(data());
        let manifest = Arc::new(Manifest::of_bytes(&data, CHUNK as u32).unwrap());
        let rx = SoftVerbs::bind(Default::default()).await.unwrap();
        let tx = SoftVerbs::bind(Default::default()).await.unwrap();
        let ring = Ring::new(rx, &manifest, CHUNKS).unwrap();
        let (tx_info, rx_info) = (tx.local_info(), ring.device.local_info());
        let (a, b) = tokio::join!(ring.device.connect(&tx_info), tx.connect(&rx_info));
        a.unwrap();
        b.unwrap();
        let staging = tx.register(ring.slot_bytes).unwrap();
        let remote = ring.region.remote();
        let slot_bytes = ring.slot_bytes as u64;
        let mut memory = vec![0u8; CHUNK * CHUNKS];
        let slots = ChunkSlots::borrowed(&manifest, 0..CHUNKS as u32, &mut memory).unwrap();
        let deliver = Deliver::Memory(&slots);
        let (grants, mut granted) = mpsc::unbounded_channel();
        let on_chunk: OnChunk = Arc::new(|_| {});
        let receiving = ring.receive(
            7,
            &manifest,
            keys(1).opener(Direction::ServerToClient),
            work.iter().map(|&c| ChunkIndex(c)).collect(),
            &deliver,
            grants,
            &on_chunk,
        );
        let sending = async {
            let mut sealer: Sealer = match sender {
                Sender::OtherSession => keys(2),
                _ => keys(1),
            }
            .sealer(Direction::ServerToClient, KeyLimits::default());
            let mut first: Option<Vec<u8>> = None;
            while let Some(g) = granted.recv().await {
                let RdmaControl::Grant { slot, chunk } = g else {
                    break;
                };
                let sealed_chunk = match sender {
                    Sender::Relocate => (chunk + 1) % CHUNKS as u32,
                    _ => chunk,
                };
                let range = manifest.chunk_range(ChunkIndex(sealed_chunk)).unwrap();
                let len = (range.end - range.start) as usize;
                let at = Placement {
                    transfer: 7,
                    chunk: sealed_chunk,
                    offset: range.start,
                    len: len as u32,
                };
                let n = staging
                    .with_mut(0..sealed_len(len), |buf| {
                        match (&first, sender) {
                            (Some(saved), Sender::Replay) => buf.copy_from_slice(saved),
                            _ => {
                                buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(
                                    &data[range.start as usize..range.end as usize],
                                );
                                sealer.seal(at, buf).unwrap();
                            }
                        }
                        match sender {
                            Sender::FlipBody => buf[HEADER_LEN + 100] ^= 0x01,
                            Sender::FlipTag => buf[sealed_len(len) - 1] ^= 0x80,
                            Sender::Replay if first.is_none() => first = Some(buf.to_vec()),
                            _ => {}
                        }
                        buf.len()
                    })
                    .unwrap();
                tx.post_write_imm(
                    WorkId(0),
                    &staging,
                    0,
                    n,
                    &remote,
                    u64::from(slot) * slot_bytes,
                    slot,
                )
                .unwrap();
                let c = tx.poll().await.unwrap();
                assert_eq!(c.kind, CompletionKind::Write);
                c.status.unwrap();
            }
        };
        let (received, ()) = tokio::join!(receiving, sending);
        for i in 0..CHUNKS as u32 {
            assert!(
                slots.take(ChunkIndex(i)).is_some(),
                "every chunk's memory is back"
            );
        }
        drop(deliver);
        drop(slots);
        let out = memory.chunks(CHUNK).map(<[u8]>::to_vec).collect();
        (received, out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_honest_sender_delivers_every_chunk() {
        let (r, out) = run(Sender::Honest, &[0, 1, 2, 3]).await;
        r.unwrap();
        assert!(out.concat() == data());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_chunks_are_refused_nothing_lands_and_the_transfer_aborts() {
        for sender in [
            Sender::FlipBody,
            Sender::FlipTag,
            Sender::Relocate,
            Sender::OtherSession,
        ] {
            let (r, out) = run(sender, &[0, 1, 2, 3]).await;
            let e = r.expect_err("a tampering sender must not succeed");
            let (_, failures) = e.aborted.expect("aborted after repeated failures");
            assert_eq!(failures, MAX_OPEN_FAILURES, "{sender:?}");
            assert!(matches!(e.error, FetchError::Corrupt(_)), "{sender:?}");
            assert!(
                out.iter().all(|c| c.iter().all(|&b| b == 0)),
                "{sender:?}: unverified bytes reached the destination"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_chunk_is_refused() {
        // Chunk 0 asked for twice: the second time the sender replays the first write.
        let (r, out) = run(Sender::Replay, &[0, 0]).await;
        let e = r.expect_err("a replay must not be accepted");
        assert_eq!(e.aborted.map(|a| a.1), Some(MAX_OPEN_FAILURES));
        // Only the genuine first delivery landed.
        assert!(out[0][..] == data()[..CHUNK]);
        assert!(out[1..].iter().all(|c| c.iter().all(|&b| b == 0)));
    }
}
