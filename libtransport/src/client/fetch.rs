//! Pulling objects: into a file (resumable) or into memory, chunks verified before they count.
//!
//! A pull opens a read transfer (getting the manifest), then runs `parallel` workers, each
//! reading one chunk at a time on its own stream. Into a file, each `Data` frame is hashed
//! and written in place as it arrives; a chunk counts once its hash matches. The file lives
//! under a temporary name beside the destination until every chunk is verified, then is
//! fsynced and renamed. A later pull to the same destination keeps the chunks that still
//! verify and fetches only the rest.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use certs::SpiffeId;
use tokio::task::JoinSet;

use super::attempt::{self, Attempt, Kind, Ran};
use super::connection::Connection;
use super::pace::{Gate, Pace};
use super::rdma::Deliver;
use super::reply::{next_data, unexpected};
use super::{Client, FetchOptions};
use crate::audit::{AuditEvent, AuditRecord};
use crate::error::{FetchError, NoRdmaReason, PushError, RequestError, StreamError};
use crate::proto::schedule::{AfterReset, ChunkSchedule};
use crate::proto::{
    ChunkError, ChunkIndex, DatasetName, Digest, Manifest, ObjectPath, Request, Response,
    TransferId,
};
use crate::store::{ChunkWriter, PartialFile, WriteError};
use crate::transport::FrameSource;
use crate::vocab::{Direction, Outcome, TransferPath};

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    /// The server that served it.
    pub server: SpiffeId,
    /// How the bytes moved: over the connection's transport, or by RDMA.
    pub path: TransferPath,
    /// Object size.
    pub size: u64,
    /// Bytes received over the network (less than `size` when resuming).
    pub fetched_bytes: u64,
    /// Chunks in the object.
    pub chunks: u32,
    /// Chunks already present and verified before this pull.
    pub chunks_reused: u32,
    /// Chunks fetched by this pull.
    pub chunks_fetched: u32,
    /// The object's BLAKE3 root.
    pub root: Digest,
    /// Wall time.
    #[serde(serialize_with = "super::millis")]
    pub elapsed: Duration,
    /// Reconnections needed.
    pub retries: u32,
}

impl Client {
    /// Pulls an object into `dest`, resuming whatever an earlier pull left there. `dest`
    /// appears only once complete and verified.
    pub async fn fetch_to_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &FsPath,
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        let (dir, name) = split_dest(dest)?;
        let started = self.config().clock.instant();
        let fetched = Arc::new(AtomicU64::new(0));
        let pace = Arc::new(Pace::new(opts.max_rate, self.config().clock.clone()));
        // The chunks the first attempt found present, and the partial file of an attempt that
        // ended for a renewal, still in memory.
        let kept: (Option<u32>, Option<Arc<PartialFile>>) = (None, None);
        let done = attempt::run(
            Kind::Pull,
            opts.retry,
            &fetched,
            kept,
            |(mut first_reuse, mut kept)| {
                let attempt = FileAttempt {
                    dataset,
                    object,
                    dir: &dir,
                    name: &name,
                    opts,
                    pace: &pace,
                    fetched: &fetched,
                };
                async move {
                    let mut used = None;
                    let result = self
                        .fetch_file_once(attempt, &mut first_reuse, &mut used, &mut kept)
                        .await;
                    Ran {
                        state: (first_reuse, kept),
                        used,
                        result,
                    }
                }
            },
        )
        .await?;
        let (conn, manifest, rdma) = done.value;
        let first_reuse = done.state.0;
        let report = FetchReport {
            server: conn.peer.id.clone(),
            path: if rdma {
                TransferPath::Rdma
            } else {
                conn.peer.path.into()
            },
            size: manifest.size(),
            fetched_bytes: fetched.load(Ordering::Relaxed),
            chunks: manifest.chunk_count(),
            chunks_reused: first_reuse.unwrap_or(0),
            chunks_fetched: manifest.chunk_count() - first_reuse.unwrap_or(0),
            root: manifest.root(),
            elapsed: self
                .config()
                .clock
                .instant()
                .saturating_duration_since(started),
            retries: done.retries,
        };
        self.audit_pull(&conn, dataset, object, &report, Outcome::Complete);
        Ok(report)
    }

    /// Pulls a whole object into memory, refusing objects larger than `limit` bytes.
    pub async fn fetch(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        limit: u64,
        opts: &FetchOptions,
    ) -> Result<Bytes, FetchError> {
        self.read_range_limited(dataset, object, None, limit, opts)
            .await
    }

    /// Reads `range` of an object, verifying every chunk it touches.
    pub async fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let limit = range.end.saturating_sub(range.start);
        self.read_range_limited(
            dataset,
            object,
            Some(range),
            limit,
            &FetchOptions::default(),
        )
        .await
    }

    async fn read_range_limited(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Option<Range<u64>>,
        limit: u64,
        opts: &FetchOptions,
    ) -> Result<Bytes, FetchError> {
        let pace = Arc::new(Pace::new(opts.max_rate, self.config().clock.clone()));
        let moved = Arc::new(AtomicU64::new(0));
        // Chunks verified by earlier attempts.
        let state: Option<MemoryPull> = None;
        let done = attempt::run(Kind::Read, opts.retry, &moved, state, |mut state| {
            let attempt = MemoryAttempt {
                dataset,
                object,
                range: range.clone(),
                limit,
                opts,
                pace: &pace,
                moved: &moved,
            };
            async move {
                let mut used = None;
                let result = self.read_once(attempt, &mut state, &mut used).await;
                Ran {
                    state,
                    used,
                    result,
                }
            }
        })
        .await?;
        Ok(done.value)
    }

    async fn read_once(
        &self,
        a: MemoryAttempt<'_>,
        state: &mut Option<MemoryPull>,
        used: &mut Option<Arc<Connection>>,
    ) -> Result<Attempt<Bytes>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object).await?;
        let size = manifest.size();
        // Whole objects may move by RDMA; a session is not worth it for a range.
        let whole = a.range.is_none();
        let range = a.range.unwrap_or(0..size);
        if range.start > range.end || range.end > size {
            close(&conn, transfer).await;
            return Err(FetchError::Range {
                start: range.start,
                end: range.end,
                size,
            });
        }
        if range.end - range.start > a.limit {
            close(&conn, transfer).await;
            return Err(FetchError::TooLarge {
                size: range.end - range.start,
                limit: a.limit,
            });
        }
        // What earlier attempts verified counts only if the object is still the same.
        let pull = match state.take() {
            Some(p) if *p.manifest == manifest && p.range == range => p,
            _ => MemoryPull::new(Arc::new(manifest), range),
        };
        let work = pull.missing();
        let (base, total) = (pull.chunks.start, pull.total);
        let rdma = if !whole {
            Ok(false)
        } else if a.pace.is_paced() {
            self.rdma_for_paced_pull()
        } else {
            let (done, progress) = (pull.done.clone(), a.opts.progress.clone());
            let on_chunk: super::rdma::OnChunk = Arc::new(move |n| {
                let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &progress {
                    p(so_far, total);
                }
            });
            let deliver = Deliver::Memory {
                slots: pull.slots.clone(),
                base,
            };
            self.pull_rdma(&conn, transfer, &pull.manifest, &work, deliver, on_chunk)
                .await
        };
        let gate = Gate::new(a.pace.clone(), conn.clone());
        let streamed = matches!(rdma, Ok(false));
        let result = match rdma {
            Ok(true) => {
                pull.verified_all(&work);
                Ok(())
            }
            Err(e) => Err(e),
            Ok(false) => {
                let (conn, manifest, slots, verified, done, moved, progress, gate) = (
                    conn.clone(),
                    pull.manifest.clone(),
                    pull.slots.clone(),
                    pull.verified.clone(),
                    pull.done.clone(),
                    a.moved.clone(),
                    a.opts.progress.clone(),
                    gate.clone(),
                );
                let schedule = ChunkSchedule::new(&pull.manifest, work);
                run_workers(a.opts.parallel(self.config()), schedule, move |index| {
                    let (conn, manifest, slots, verified, done, moved, progress, gate) = (
                        conn.clone(),
                        manifest.clone(),
                        slots.clone(),
                        verified.clone(),
                        done.clone(),
                        moved.clone(),
                        progress.clone(),
                        gate.clone(),
                    );
                    async move {
                        let len = manifest.chunk_range(index).map_or(0, |r| r.end - r.start);
                        if !gate.admit(len).await {
                            return Ok(Turn::NotAsked);
                        }
                        let slot = (index.0 - base) as usize;
                        // A read whose stream was reset took its buffer with it: the chunk
                        // lands in a fresh one (rejoining then copies, which only a reset
                        // costs).
                        let buf = slots
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_mut(slot)
                            .ok_or(FetchError::Corrupt(index))?
                            .take()
                            .unwrap_or_else(|| BytesMut::zeroed(len as usize));
                        let buf = read_chunk_mem(&conn, transfer, &manifest, index, buf).await?;
                        let n = buf.len() as u64;
                        slots.lock().unwrap_or_else(PoisonError::into_inner)[slot] = Some(buf);
                        verified.lock().unwrap_or_else(PoisonError::into_inner)[slot] = true;
                        moved.fetch_add(n, Ordering::Relaxed);
                        let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                        if let Some(p) = &progress {
                            p(so_far, total);
                        }
                        Ok::<_, FetchError>(Turn::Verified)
                    }
                })
                .await
            }
        };
        close(&conn, transfer).await;
        if let Err(e) = result {
            // What stream reads verified is kept; chunks an RDMA session wrote are not known
            // one by one, so after a failed session the next attempt starts over.
            if streamed {
                *state = Some(pull);
            }
            return Err(e);
        }
        if !pull.is_complete() {
            if gate.is_renewing() {
                *state = Some(pull);
                return Ok(Attempt::Renew);
            }
            return Err(FetchError::Corrupt(ChunkIndex(base)));
        }
        Ok(Attempt::Done(pull.assemble()))
    }

    async fn fetch_file_once(
        &self,
        a: FileAttempt<'_>,
        first_reuse: &mut Option<u32>,
        used: &mut Option<Arc<Connection>>,
        kept: &mut Option<Arc<PartialFile>>,
    ) -> Result<Attempt<(Arc<Connection>, Manifest, bool)>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object).await?;
        let partial = match kept.take() {
            // Its chunks are known verified: no need to read the file again.
            Some(p) if **p.manifest() == manifest => p,
            _ => {
                let manifest = Arc::new(manifest);
                let tmp = format!(".{}.transportd-partial", a.name);
                let (dir, name) = (a.dir.to_path_buf(), a.name.to_owned());
                let opened = tokio::task::spawn_blocking(move || {
                    let d = std::fs::File::open(&dir)?;
                    PartialFile::open(d, tmp, name, manifest)
                })
                .await
                .map_err(|e| FetchError::Local(std::io::Error::other(e)))??;
                Arc::new(opened)
            }
        };
        let manifest = partial.manifest().clone();
        let have = partial.have();
        first_reuse.get_or_insert(have.count());
        let work: VecDeque<ChunkIndex> = have.missing().collect();
        tracing::debug!(
            object.digest = %a.object.digest().short(),
            chunks = manifest.chunk_count(),
            reused = have.count(),
            "pull starting"
        );
        let total = manifest.size();
        let done = Arc::new(AtomicU64::new(have.missing().fold(total, |left, i| {
            left - manifest.chunk_range(i).map_or(0, |r| r.end - r.start)
        })));
        let on_chunk = {
            let (done, progress) = (done.clone(), a.opts.progress.clone());
            super::rdma::counting(
                a.fetched.clone(),
                Some(Arc::new(move |n| {
                    let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                    if let Some(p) = &progress {
                        p(so_far, total);
                    }
                })),
            )
        };
        let rdma = if a.pace.is_paced() {
            self.rdma_for_paced_pull()
        } else {
            self.pull_rdma(
                &conn,
                transfer,
                &manifest,
                &work,
                Deliver::File(partial.clone()),
                on_chunk,
            )
            .await
        };
        let used_rdma = matches!(rdma, Ok(true));
        let gate = Gate::new(a.pace.clone(), conn.clone());
        let result = match rdma {
            Ok(true) => Ok(()),
            Err(e) => Err(e),
            Ok(false) => {
                let (conn, partial, fetched, progress, gate) = (
                    conn.clone(),
                    partial.clone(),
                    a.fetched.clone(),
                    a.opts.progress.clone(),
                    gate.clone(),
                );
                let schedule = ChunkSchedule::new(&manifest, work);
                run_workers(a.opts.parallel(self.config()), schedule, move |index| {
                    let (conn, partial, fetched, done, progress, gate) = (
                        conn.clone(),
                        partial.clone(),
                        fetched.clone(),
                        done.clone(),
                        progress.clone(),
                        gate.clone(),
                    );
                    async move {
                        let len = partial
                            .manifest()
                            .chunk_range(index)
                            .map_or(0, |r| r.end - r.start);
                        if !gate.admit(len).await {
                            return Ok(Turn::NotAsked);
                        }
                        let n = read_chunk_file(&conn, transfer, partial, index, &fetched).await?;
                        let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                        if let Some(p) = &progress {
                            p(so_far, total);
                        }
                        Ok::<_, FetchError>(Turn::Verified)
                    }
                })
                .await
            }
        };
        close(&conn, transfer).await;
        result?;
        if gate.is_renewing() && !partial.is_complete() {
            // Every worker has returned, so no chunk writer holds the file: keep it for the
            // next attempt.
            *kept = Some(partial);
            return Ok(Attempt::Renew);
        }
        let partial = Arc::into_inner(partial).ok_or_else(|| {
            FetchError::Local(std::io::Error::other("chunk writer still running"))
        })?;
        tokio::task::spawn_blocking(move || partial.commit())
            .await
            .map_err(|e| FetchError::Local(std::io::Error::other(e)))?
            .map_err(|e| match e {
                WriteError::Io(e) => FetchError::Local(e),
                other => FetchError::Local(std::io::Error::other(other)),
            })?;
        Ok(Attempt::Done((conn, (*manifest).clone(), used_rdma)))
    }

    /// A paced pull moves by stream reads: RDMA chunks are not paced. Fails if RDMA is
    /// required.
    fn rdma_for_paced_pull(&self) -> Result<bool, FetchError> {
        let transport = &self.config().transport;
        if transport.rdma_required && transport.rdma_mode() != crate::config::RdmaMode::Off {
            return Err(FetchError::NoRdma(NoRdmaReason::PacedPull));
        }
        Ok(false)
    }
    fn audit_pull(
        &self,
        conn: &Connection,
        dataset: &DatasetName,
        object: &ObjectPath,
        report: &FetchReport,
        outcome: Outcome,
    ) {
        let record = AuditRecord {
            time: self.config().clock.now(),
            event: AuditEvent::Transfer {
                peer: conn.peer.id.clone(),
                direction: Direction::In,
                dataset: dataset.clone(),
                object: object.clone(),
                bytes: report.fetched_bytes,
                root: report.root,
                path: report.path,
                outcome,
                duration_ms: report.elapsed.as_millis() as u64,
            },
        };
        if let Err(e) = self.config().audit.record(&record) {
            tracing::error!(error = %e, "audit record lost");
        }
    }
}

impl Client {
    /// Records a pull aborted because its RDMA chunks kept failing to open.
    pub(super) fn audit_rdma_abort(
        &self,
        conn: &Connection,
        transfer: TransferId,
        chunk: ChunkIndex,
        failures: u32,
    ) {
        tracing::error!(
            peer.id = %conn.peer.id,
            transfer = transfer.0,
            chunk = chunk.0,
            failures,
            "RDMA chunks kept failing to open: transfer aborted"
        );
        let record = AuditRecord {
            time: self.config().clock.now(),
            event: AuditEvent::RdmaAborted {
                peer: conn.peer.id.clone(),
                chunk: chunk.0,
                failures,
            },
        };
        if let Err(e) = self.config().audit.record(&record) {
            tracing::error!(error = %e, "audit record lost");
        }
    }
}

/// What one attempt of a pull into a file works with.
struct FileAttempt<'a> {
    dataset: &'a DatasetName,
    object: &'a ObjectPath,
    dir: &'a FsPath,
    name: &'a str,
    opts: &'a FetchOptions,
    pace: &'a Arc<Pace>,
    /// Bytes received over the network, across attempts.
    fetched: &'a Arc<AtomicU64>,
}

/// What one attempt of a pull into memory works with.
struct MemoryAttempt<'a> {
    dataset: &'a DatasetName,
    object: &'a ObjectPath,
    range: Option<Range<u64>>,
    limit: u64,
    opts: &'a FetchOptions,
    pace: &'a Arc<Pace>,
    /// Bytes of verified chunks received, across attempts.
    moved: &'a Arc<AtomicU64>,
}

/// A pull into memory: the chunks covering the range, and which of them are verified, kept
/// across attempts so a later attempt fetches only the rest.
struct MemoryPull {
    manifest: Arc<Manifest>,
    range: Range<u64>,
    chunks: Range<u32>,
    /// Where the first chunk starts in the object.
    first: u64,
    /// Bytes in the chunks.
    total: u64,
    /// `slots[i - chunks.start]` holds chunk `i` (none while a worker fills it).
    slots: Arc<Mutex<Vec<Option<BytesMut>>>>,
    verified: Arc<Mutex<Vec<bool>>>,
    /// Bytes of verified chunks, for progress.
    done: Arc<AtomicU64>,
}

impl MemoryPull {
    fn new(manifest: Arc<Manifest>, range: Range<u64>) -> Self {
        let chunks = manifest.chunks_covering(range.clone());
        let first = manifest
            .chunk_range(ChunkIndex(chunks.start))
            .map_or(0, |r| r.start);
        let last = manifest
            .chunk_range(ChunkIndex(chunks.end.saturating_sub(1)))
            .map_or(0, |r| r.end);
        // One buffer for all chunks, split into per-chunk views and rejoined without copying.
        let mut all = BytesMut::zeroed((last.max(first) - first) as usize);
        let mut slots = Vec::new();
        for i in chunks.clone() {
            let r = manifest.chunk_range(ChunkIndex(i)).unwrap_or(0..0);
            slots.push(Some(all.split_to((r.end - r.start) as usize)));
        }
        let count = slots.len();
        Self {
            manifest,
            range,
            chunks,
            first,
            total: last.max(first) - first,
            slots: Arc::new(Mutex::new(slots)),
            verified: Arc::new(Mutex::new(vec![false; count])),
            done: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The chunks still to fetch. A slot a failed attempt's worker took with it gets a fresh
    /// buffer (rejoining then copies, which only a failure costs).
    fn missing(&self) -> VecDeque<ChunkIndex> {
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut work = VecDeque::new();
        for (slot, i) in self.chunks.clone().enumerate() {
            if verified.get(slot).copied().unwrap_or(true) {
                continue;
            }
            if let Some(s @ None) = slots.get_mut(slot) {
                let r = self.manifest.chunk_range(ChunkIndex(i)).unwrap_or(0..0);
                *s = Some(BytesMut::zeroed((r.end - r.start) as usize));
            }
            work.push_back(ChunkIndex(i));
        }
        work
    }

    /// Marks `work` verified (an RDMA session delivered all of it).
    fn verified_all(&self, work: &VecDeque<ChunkIndex>) {
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        for i in work {
            if let Some(v) = verified.get_mut((i.0 - self.chunks.start) as usize) {
                *v = true;
            }
        }
    }

    fn is_complete(&self) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|v| *v)
    }

    /// The range asked for, from the verified chunks.
    fn assemble(self) -> Bytes {
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner));
        let mut joined = BytesMut::new();
        for piece in slots.into_iter().flatten() {
            joined.unsplit(piece);
        }
        let joined = joined.freeze();
        joined
            .slice((self.range.start - self.first) as usize..(self.range.end - self.first) as usize)
    }
}

async fn open_read(
    conn: &Connection,
    dataset: &DatasetName,
    object: &ObjectPath,
) -> Result<(TransferId, Manifest), RequestError> {
    let req = Request::OpenRead {
        dataset: dataset.clone(),
        object: object.clone(),
    };
    match conn.call(&req).await? {
        Response::OpenedRead { transfer, manifest } => Ok((transfer, manifest)),
        other => Err(unexpected(&other)),
    }
}

async fn close(conn: &Connection, transfer: TransferId) {
    // Best effort: the server also ends transfers when the connection ends.
    let _ = conn.call(&Request::Close { transfer }).await;
}

/// Asks for one chunk and hands each `Data` payload to the caller; `None` at `End`.
async fn request_chunk(
    conn: &Connection,
    transfer: TransferId,
    range: &Range<u64>,
) -> Result<FrameSource, RequestError> {
    let req = Request::Read {
        transfer,
        offset: range.start,
        len: range.end - range.start,
    };
    let mut s = conn.open(&req).await?;
    s.sink.finish();
    Ok(s.source)
}

/// Reads one chunk into its place in the partial file; it counts once its hash matches.
async fn read_chunk_file(
    conn: &Connection,
    transfer: TransferId,
    partial: Arc<PartialFile>,
    index: ChunkIndex,
    fetched: &AtomicU64,
) -> Result<u64, FetchError> {
    let range = partial
        .manifest()
        .chunk_range(index)
        .ok_or(FetchError::Corrupt(index))?;
    let mut source = request_chunk(conn, transfer, &range).await?;
    let mut writer = ChunkWriter::new(partial, index).map_err(|_| FetchError::Corrupt(index))?;
    while let Some(piece) = next_data(&mut source).await? {
        fetched.fetch_add(piece.len() as u64, Ordering::Relaxed);
        writer = tokio::task::spawn_blocking(move || writer.feed(&piece).map(|()| writer))
            .await
            .map_err(|e| FetchError::Local(std::io::Error::other(e)))?
            .map_err(|e| chunk_failure(e, index))?;
    }
    writer.finish().map_err(|e| chunk_failure(e, index))?;
    Ok(range.end - range.start)
}

/// Reads one chunk into `buf`, verified.
async fn read_chunk_mem(
    conn: &Connection,
    transfer: TransferId,
    manifest: &Manifest,
    index: ChunkIndex,
    mut buf: BytesMut,
) -> Result<BytesMut, FetchError> {
    let range = manifest
        .chunk_range(index)
        .ok_or(FetchError::Corrupt(index))?;
    let mut source = request_chunk(conn, transfer, &range).await?;
    let mut at = 0usize;
    let mut hasher = blake3::Hasher::new();
    while let Some(piece) = next_data(&mut source).await? {
        if at + piece.len() > buf.len() {
            return Err(FetchError::Corrupt(index));
        }
        let n = piece.len();
        let (b, h) = tokio::task::spawn_blocking(move || {
            buf[at..at + n].copy_from_slice(&piece);
            hasher.update(&piece);
            (buf, hasher)
        })
        .await
        .map_err(|e| FetchError::Local(std::io::Error::other(e)))?;
        buf = b;
        hasher = h;
        at += n;
    }
    if at != buf.len() {
        return Err(FetchError::Corrupt(index));
    }
    manifest
        .check_digest(index, Digest(hasher.finalize().into()))
        .map_err(|_| FetchError::Corrupt(index))?;
    Ok(buf)
}

fn chunk_failure(e: WriteError, index: ChunkIndex) -> FetchError {
    match e {
        WriteError::Chunk(ChunkError::Corrupt(i)) => FetchError::Corrupt(i),
        WriteError::Chunk(_) | WriteError::Incomplete => FetchError::Corrupt(index),
        WriteError::Io(e) => FetchError::Local(e),
    }
}

/// How one chunk's turn with a worker ended, when not with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// It arrived (or was stored) and verified.
    Verified,
    /// It was not asked for: the connection is due for renewal, so the worker stops and the
    /// chunk waits for the next attempt.
    NotAsked,
}

/// Errors a chunk's turn can end with, as the schedule needs to tell them apart.
pub(crate) trait ChunkFailure {
    /// The chunk's stream was reset before it verified (nothing of it counts).
    fn is_stream_reset(&self) -> bool;
}

impl ChunkFailure for FetchError {
    fn is_stream_reset(&self) -> bool {
        matches!(
            self,
            Self::Request(RequestError::Stream(StreamError::Reset(_)))
        )
    }
}

impl ChunkFailure for PushError {
    fn is_stream_reset(&self) -> bool {
        matches!(
            self,
            Self::Request(RequestError::Stream(StreamError::Reset(_)))
        )
    }
}

/// Runs `f` over the chunks `schedule` hands out, with `parallel` workers. A chunk whose
/// stream was reset is asked for again, first, as the schedule allows; any other error, or
/// a reset past that, stops everything.
pub(crate) async fn run_workers<F, Fut, E>(
    parallel: usize,
    schedule: ChunkSchedule,
    f: F,
) -> Result<(), E>
where
    F: Fn(ChunkIndex) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Turn, E>> + Send + 'static,
    E: ChunkFailure + Send + 'static,
{
    let schedule = Arc::new(Mutex::new(schedule));
    let lock = |s: &Arc<Mutex<ChunkSchedule>>| {
        s.lock().unwrap_or_else(PoisonError::into_inner).poll_next()
    };
    let mut set = JoinSet::new();
    for _ in 0..parallel {
        let (schedule, f) = (schedule.clone(), f.clone());
        set.spawn(async move {
            while let Some(i) = lock(&schedule) {
                let turn = f(i).await;
                let mut s = schedule.lock().unwrap_or_else(PoisonError::into_inner);
                // The schedule handed `i` to this worker alone: reporting on it cannot fail.
                match turn {
                    Ok(Turn::Verified) => {
                        let _ = s.handle_verified(i);
                    }
                    Ok(Turn::NotAsked) => {
                        let _ = s.handle_abandoned(i);
                        return Ok(());
                    }
                    Err(e) if e.is_stream_reset() => {
                        if s.handle_reset(i) == Ok(AfterReset::GiveUp) {
                            return Err(e);
                        }
                        tracing::debug!(chunk = i.0, "chunk stream reset; asking again");
                    }
                    Err(e) => {
                        let _ = s.handle_abandoned(i);
                        return Err(e);
                    }
                }
            }
            Ok(())
        });
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            // A worker panicked: surface it rather than report a partial success.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    Ok(())
}

fn split_dest(dest: &FsPath) -> Result<(std::path::PathBuf, String), FetchError> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            FetchError::Local(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "destination must name a file",
            ))
        })?
        .to_owned();
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    Ok((dir, name))
}
