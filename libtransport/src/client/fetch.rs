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
use super::reply::next_data;
use super::{Client, FetchOptions};
use crate::audit::{AuditEvent, AuditRecord};
use crate::error::{FetchError, NoRdmaReason, PushError, RequestError, StreamError};
use crate::proto::request::Answer;
use crate::proto::schedule::{AfterReset, ChunkSchedule};
use crate::proto::transfer::{ChunkCheck, Opened, Pull, PullEnd};
use crate::proto::{
    ChunkError, ChunkIndex, DatasetName, Digest, Manifest, ObjectPath, Request, TransferId,
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
        // The pull's machine, and the partial file of an attempt that ended for a renewal,
        // still open.
        let state: (Pull, Option<Arc<PartialFile>>) = (Pull::whole(u64::MAX), None);
        let done = attempt::run(
            Kind::Pull,
            opts.retry,
            &fetched,
            state,
            |(mut pull, mut kept)| {
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
                        .fetch_file_once(attempt, &mut pull, &mut used, &mut kept)
                        .await;
                    Ran {
                        state: (pull, kept),
                        used,
                        result,
                    }
                }
            },
        )
        .await?;
        let (conn, manifest, rdma) = done.value;
        let reused = done.state.0.chunks_reused();
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
            chunks_reused: reused,
            chunks_fetched: manifest.chunk_count() - reused,
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
        self.read_into_memory(dataset, object, Pull::whole(limit), opts)
            .await
    }

    /// Reads `range` of an object, verifying every chunk it touches.
    pub async fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        self.read_into_memory(
            dataset,
            object,
            Pull::range(range),
            &FetchOptions::default(),
        )
        .await
    }

    async fn read_into_memory(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        pull: Pull,
        opts: &FetchOptions,
    ) -> Result<Bytes, FetchError> {
        let pace = Arc::new(Pace::new(opts.max_rate, self.config().clock.clone()));
        let moved = Arc::new(AtomicU64::new(0));
        // The pull's machine and the buffers its verified chunks are in.
        let state: (Pull, Option<MemoryDest>) = (pull, None);
        let done = attempt::run(
            Kind::Read,
            opts.retry,
            &moved,
            state,
            |(mut pull, mut dest)| {
                let attempt = MemoryAttempt {
                    dataset,
                    object,
                    opts,
                    pace: &pace,
                    moved: &moved,
                };
                async move {
                    let mut used = None;
                    let result = self
                        .read_once(attempt, &mut pull, &mut dest, &mut used)
                        .await;
                    Ran {
                        state: (pull, dest),
                        used,
                        result,
                    }
                }
            },
        )
        .await?;
        Ok(done.value)
    }

    async fn read_once(
        &self,
        a: MemoryAttempt<'_>,
        pull: &mut Pull,
        kept: &mut Option<MemoryDest>,
        used: &mut Option<Arc<Connection>>,
    ) -> Result<Attempt<Bytes>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object).await?;
        // Whole objects may move by RDMA; a session is not worth it for a range.
        let whole = pull.is_whole();
        let dest = match pull.handle_opened(manifest) {
            Err(refused) => {
                close(&conn, transfer).await;
                return Err(refused.into());
            }
            Ok(Opened::Resume) => kept.take(),
            Ok(Opened::Fresh) => None,
        };
        let Some(manifest) = pull.manifest().cloned() else {
            // handle_opened has just set it.
            close(&conn, transfer).await;
            return Err(FetchError::Corrupt(ChunkIndex(0)));
        };
        let dest = dest.unwrap_or_else(|| MemoryDest::new(&manifest, pull));
        dest.done.store(pull.progress().0, Ordering::Relaxed);
        let work: VecDeque<ChunkIndex> = pull.missing().collect();
        dest.prepare(&manifest, &work);
        let (base, total) = (dest.chunks.start, pull.progress().1);
        let rdma = if !whole {
            Ok(false)
        } else if a.pace.is_paced() {
            self.rdma_for_paced_pull()
        } else {
            let (done, progress) = (dest.done.clone(), a.opts.progress.clone());
            let on_chunk: super::rdma::OnChunk = Arc::new(move |n| {
                let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &progress {
                    p(so_far, total);
                }
            });
            let deliver = Deliver::Memory {
                slots: dest.slots.clone(),
                base,
            };
            self.pull_rdma(&conn, transfer, &manifest, &work, deliver, on_chunk)
                .await
        };
        let gate = Gate::new(a.pace.clone(), conn.clone());
        let result = match rdma {
            Ok(true) => {
                for i in &work {
                    pull.handle_verified(*i);
                }
                Ok(())
            }
            Err(e) => {
                // Chunks an RDMA session wrote are not known one by one: after a failed
                // session the next attempt starts over.
                pull.handle_failed(false);
                Err(e)
            }
            Ok(false) => {
                let (conn, slots, done, moved, progress, gate) = (
                    conn.clone(),
                    dest.slots.clone(),
                    dest.done.clone(),
                    a.moved.clone(),
                    a.opts.progress.clone(),
                    gate.clone(),
                );
                let (reads, manifest) = (Arc::new(pull.clone()), manifest.clone());
                let schedule = ChunkSchedule::new(&manifest, work);
                let (schedule, result) =
                    run_workers(a.opts.parallel(self.config()), schedule, move |index| {
                        let (conn, manifest, slots, done, moved, progress, gate, reads) = (
                            conn.clone(),
                            manifest.clone(),
                            slots.clone(),
                            done.clone(),
                            moved.clone(),
                            progress.clone(),
                            gate.clone(),
                            reads.clone(),
                        );
                        async move {
                            let len = manifest.chunk_range(index).map_or(0, |r| r.end - r.start);
                            if !gate.admit(len).await {
                                return Ok(Turn::NotAsked);
                            }
                            let req = reads
                                .read_request(transfer, index)
                                .ok_or(FetchError::Corrupt(index))?;
                            let slot = (index.0 - base) as usize;
                            // A read whose stream was reset took its buffer with it: the
                            // chunk lands in a fresh one (rejoining then copies, which only a
                            // reset costs).
                            let buf = slots
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_mut(slot)
                                .ok_or(FetchError::Corrupt(index))?
                                .take()
                                .unwrap_or_else(|| BytesMut::zeroed(len as usize));
                            let buf = read_chunk_mem(&conn, &req, &manifest, index, buf).await?;
                            let n = buf.len() as u64;
                            slots.lock().unwrap_or_else(PoisonError::into_inner)[slot] = Some(buf);
                            moved.fetch_add(n, Ordering::Relaxed);
                            let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                            if let Some(p) = &progress {
                                p(so_far, total);
                            }
                            Ok::<_, FetchError>(Turn::Verified)
                        }
                    })
                    .await;
                // What stream reads verified is in the buffers, whatever else failed.
                pull.handle_schedule(&schedule);
                if result.is_err() {
                    pull.handle_failed(true);
                }
                result
            }
        };
        close(&conn, transfer).await;
        *kept = Some(dest);
        result?;
        match pull.poll_end(gate.is_renewing()) {
            PullEnd::Complete => {
                let dest = kept.take().ok_or(FetchError::Corrupt(ChunkIndex(base)))?;
                Ok(Attempt::Done(dest.assemble(pull.bytes())))
            }
            PullEnd::Renew => Ok(Attempt::Renew),
            PullEnd::Incomplete(i) => Err(FetchError::Corrupt(i)),
        }
    }

    async fn fetch_file_once(
        &self,
        a: FileAttempt<'_>,
        pull: &mut Pull,
        used: &mut Option<Arc<Connection>>,
        kept: &mut Option<Arc<PartialFile>>,
    ) -> Result<Attempt<(Arc<Connection>, Manifest, bool)>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object).await?;
        let opened = match pull.handle_opened(manifest) {
            Ok(o) => o,
            Err(refused) => {
                close(&conn, transfer).await;
                return Err(refused.into());
            }
        };
        let partial = match (opened, kept.take()) {
            // Its chunks are known verified: no need to read the file again.
            (Opened::Resume, Some(p)) => p,
            _ => {
                let Some(manifest) = pull.manifest().cloned() else {
                    close(&conn, transfer).await;
                    return Err(FetchError::Corrupt(ChunkIndex(0)));
                };
                let tmp = format!(".{}.transportd-partial", a.name);
                let (dir, name) = (a.dir.to_path_buf(), a.name.to_owned());
                let opened = tokio::task::spawn_blocking(move || {
                    let d = std::fs::File::open(&dir)?;
                    PartialFile::open(d, tmp, name, manifest)
                })
                .await
                .map_err(|e| FetchError::Local(std::io::Error::other(e)))??;
                pull.handle_held(&opened.have());
                Arc::new(opened)
            }
        };
        let manifest = partial.manifest().clone();
        let work: VecDeque<ChunkIndex> = pull.missing().collect();
        tracing::debug!(
            object.digest = %a.object.digest().short(),
            chunks = manifest.chunk_count(),
            reused = manifest.chunk_count() as usize - work.len(),
            "pull starting"
        );
        let (so_far, total) = pull.progress();
        let done = Arc::new(AtomicU64::new(so_far));
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
            Ok(true) => {
                for i in &work {
                    pull.handle_verified(*i);
                }
                Ok(())
            }
            Err(e) => Err(e),
            Ok(false) => {
                let (conn, partial, fetched, progress, gate) = (
                    conn.clone(),
                    partial.clone(),
                    a.fetched.clone(),
                    a.opts.progress.clone(),
                    gate.clone(),
                );
                let reads = Arc::new(pull.clone());
                let schedule = ChunkSchedule::new(&manifest, work);
                let (schedule, result) =
                    run_workers(a.opts.parallel(self.config()), schedule, move |index| {
                        let (conn, partial, fetched, done, progress, gate, reads) = (
                            conn.clone(),
                            partial.clone(),
                            fetched.clone(),
                            done.clone(),
                            progress.clone(),
                            gate.clone(),
                            reads.clone(),
                        );
                        async move {
                            let len = partial
                                .manifest()
                                .chunk_range(index)
                                .map_or(0, |r| r.end - r.start);
                            if !gate.admit(len).await {
                                return Ok(Turn::NotAsked);
                            }
                            let req = reads
                                .read_request(transfer, index)
                                .ok_or(FetchError::Corrupt(index))?;
                            let n = read_chunk_file(&conn, &req, partial, index, &fetched).await?;
                            let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                            if let Some(p) = &progress {
                                p(so_far, total);
                            }
                            Ok::<_, FetchError>(Turn::Verified)
                        }
                    })
                    .await;
                pull.handle_schedule(&schedule);
                result
            }
        };
        close(&conn, transfer).await;
        if let Err(e) = result {
            // The next attempt reads the partial file again for what it holds.
            pull.handle_failed(false);
            return Err(e);
        }
        match pull.poll_end(gate.is_renewing()) {
            PullEnd::Complete => {}
            PullEnd::Renew => {
                // Every worker has returned, so no chunk writer holds the file: keep it for
                // the next attempt.
                *kept = Some(partial);
                return Ok(Attempt::Renew);
            }
            PullEnd::Incomplete(i) => return Err(FetchError::Corrupt(i)),
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
    opts: &'a FetchOptions,
    pace: &'a Arc<Pace>,
    /// Bytes of verified chunks received, across attempts.
    moved: &'a Arc<AtomicU64>,
}

/// Where a pull into memory puts its chunks: one buffer, split into a view per chunk and
/// rejoined without copying at the end. Which of them hold verified chunks is the pull's
/// machine's to say.
struct MemoryDest {
    chunks: Range<u32>,
    /// Where the first chunk starts in the object.
    first: u64,
    /// `slots[i - chunks.start]` holds chunk `i` (none while a worker fills it).
    slots: Arc<Mutex<Vec<Option<BytesMut>>>>,
    /// Bytes of verified chunks, for progress.
    done: Arc<AtomicU64>,
}

impl MemoryDest {
    fn new(manifest: &Manifest, pull: &Pull) -> Self {
        let chunks = pull.chunks();
        let first = manifest
            .chunk_range(ChunkIndex(chunks.start))
            .map_or(0, |r| r.start);
        let last = manifest
            .chunk_range(ChunkIndex(chunks.end.saturating_sub(1)))
            .map_or(0, |r| r.end);
        let mut all = BytesMut::zeroed((last.max(first) - first) as usize);
        let mut slots = Vec::new();
        for i in chunks.clone() {
            let r = manifest.chunk_range(ChunkIndex(i)).unwrap_or(0..0);
            slots.push(Some(all.split_to((r.end - r.start) as usize)));
        }
        Self {
            chunks,
            first,
            slots: Arc::new(Mutex::new(slots)),
            done: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Gives each chunk of `work` a buffer: a slot a failed attempt's worker took with it
    /// gets a fresh one (rejoining then copies, which only a failure costs).
    fn prepare(&self, manifest: &Manifest, work: &VecDeque<ChunkIndex>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        for i in work {
            if let Some(s @ None) = slots.get_mut(i.0.wrapping_sub(self.chunks.start) as usize) {
                let r = manifest.chunk_range(*i).unwrap_or(0..0);
                *s = Some(BytesMut::zeroed((r.end - r.start) as usize));
            }
        }
    }

    /// The bytes `range` of the object, from the verified chunks.
    fn assemble(self, range: Range<u64>) -> Bytes {
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner));
        let mut joined = BytesMut::new();
        for piece in slots.into_iter().flatten() {
            joined.unsplit(piece);
        }
        let joined = joined.freeze();
        joined.slice((range.start - self.first) as usize..(range.end - self.first) as usize)
    }
}

async fn open_read(
    conn: &Connection,
    dataset: &DatasetName,
    object: &ObjectPath,
) -> Result<(TransferId, Manifest), RequestError> {
    let answer = conn.call(&Pull::open_request(dataset, object)).await?;
    Ok(Answer::opened_read(answer)?)
}

async fn close(conn: &Connection, transfer: TransferId) {
    // Best effort: the server also ends transfers when the connection ends.
    let _ = conn.call(&Request::Close { transfer }).await;
}

/// Sends a chunk's read request: its data frames follow on the stream handed back.
async fn request_chunk(conn: &Connection, req: &Request) -> Result<FrameSource, RequestError> {
    let mut s = conn.open(req).await?;
    s.sink.finish();
    Ok(s.source)
}

/// Reads one chunk into its place in the partial file; it counts once its hash matches.
async fn read_chunk_file(
    conn: &Connection,
    req: &Request,
    partial: Arc<PartialFile>,
    index: ChunkIndex,
    fetched: &AtomicU64,
) -> Result<u64, FetchError> {
    let range = partial
        .manifest()
        .chunk_range(index)
        .ok_or(FetchError::Corrupt(index))?;
    let mut source = request_chunk(conn, req).await?;
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

/// Reads one chunk into `buf`; it comes back only if it verified.
async fn read_chunk_mem(
    conn: &Connection,
    req: &Request,
    manifest: &Manifest,
    index: ChunkIndex,
    mut buf: BytesMut,
) -> Result<BytesMut, FetchError> {
    let mut check = ChunkCheck::new(manifest, index).map_err(|_| FetchError::Corrupt(index))?;
    if check.len() != buf.len() as u64 {
        return Err(FetchError::Corrupt(index));
    }
    let mut source = request_chunk(conn, req).await?;
    while let Some(piece) = next_data(&mut source).await? {
        let (b, c) = tokio::task::spawn_blocking(move || {
            let at = check.handle_data(&piece)?;
            buf[at].copy_from_slice(&piece);
            Ok::<_, ChunkError>((buf, check))
        })
        .await
        .map_err(|e| FetchError::Local(std::io::Error::other(e)))?
        .map_err(|_| FetchError::Corrupt(index))?;
        buf = b;
        check = c;
    }
    check
        .finish(manifest)
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
/// a reset past that, stops everything. Hands the schedule back as the workers left it
/// (which chunks verified), with the outcome.
pub(crate) async fn run_workers<F, Fut, E>(
    parallel: usize,
    schedule: ChunkSchedule,
    f: F,
) -> (ChunkSchedule, Result<(), E>)
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
    let mut outcome = Ok(());
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                set.abort_all();
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
            // A worker panicked: surface it rather than report a partial success.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    // Every worker has ended (returned or aborted): the schedule is as they left it.
    let left = schedule
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    (left, outcome)
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
