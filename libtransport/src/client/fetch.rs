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

use bytes::Bytes;
use certs::SpiffeId;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::attempt::{self, Attempt, Kind, Ran};
use super::connection::Connection;
use super::memory::ChunkSlots;
use super::pace::{Gate, Pace};
use super::rdma::Deliver;
use super::reply::{Landed, next_data, next_data_into};
use super::stripe::{OpenTransfer, Stripe, close, close_stripes, stripe_group};
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
    /// Connections the last attempt's chunks moved over (see
    /// [`TransferOptions::connections`](super::TransferOptions::connections)); 1 by RDMA.
    pub connections: u32,
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
        let group = stripe_group(opts.stripes(self.config())).map_err(FetchError::Local)?;
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
                    group,
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
        let (conn, manifest, rdma, connections) = done.value;
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
            connections,
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
        let (range, slots) = self
            .read_into_memory(dataset, object, Pull::whole(limit), Dest::Ours, opts)
            .await?;
        slots.into_bytes(range)
    }

    /// Pulls a whole object into the start of `dest` (memory the caller owns and may reuse
    /// for the next pull, such as a pinned buffer), verifying every chunk, and returns what
    /// the pull did (`size` bytes of `dest` now hold the object). Refuses an object larger
    /// than `dest`. Nothing of the object's size is allocated: chunks land in place. If the
    /// pull fails, `dest` holds an unspecified mix of old and new bytes.
    pub async fn fetch_into(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &mut [u8],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        let started = self.config().clock.instant();
        let limit = dest.len() as u64;
        let (_, slots) = self
            .read_into_memory(
                dataset,
                object,
                Pull::whole(limit),
                Dest::Caller(dest),
                opts,
            )
            .await?;
        let (conn, manifest, rdma, retries, connections) = (
            slots.conn.clone(),
            slots.manifest.clone(),
            slots.rdma,
            slots.retries,
            slots.connections,
        );
        let report = FetchReport {
            server: conn.peer.id.clone(),
            path: if rdma {
                TransferPath::Rdma
            } else {
                conn.peer.path.into()
            },
            size: manifest.size(),
            fetched_bytes: slots.fetched,
            chunks: manifest.chunk_count(),
            chunks_reused: 0,
            chunks_fetched: manifest.chunk_count(),
            root: manifest.root(),
            elapsed: self
                .config()
                .clock
                .instant()
                .saturating_duration_since(started),
            retries,
            connections,
        };
        self.audit_pull(&conn, dataset, object, &report, Outcome::Complete);
        Ok(report)
    }

    /// Reads `range` of an object, verifying every chunk it touches.
    pub async fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let (range, slots) = self
            .read_into_memory(
                dataset,
                object,
                Pull::range(range),
                Dest::Ours,
                &FetchOptions::default(),
            )
            .await?;
        slots.into_bytes(range)
    }

    /// Pulls `pull` into memory: ours or the caller's. Returns the bytes of the object the
    /// pull wanted and the chunks' memory, every chunk verified.
    async fn read_into_memory<'a>(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        pull: Pull,
        dest: Dest<'a>,
        opts: &FetchOptions,
    ) -> Result<(Range<u64>, Pulled<'a>), FetchError> {
        let pace = Arc::new(Pace::new(opts.max_rate, self.config().clock.clone()));
        let group = stripe_group(opts.stripes(self.config())).map_err(FetchError::Local)?;
        let moved = Arc::new(AtomicU64::new(0));
        // The pull's machine and the memory its verified chunks are in.
        let state: (Pull, Dest<'a>) = (pull, dest);
        let done = attempt::run(
            Kind::Read,
            opts.retry,
            &moved,
            state,
            |(mut pull, mut dest)| {
                let attempt = MemoryAttempt {
                    dataset,
                    object,
                    group,
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
        let (pull, dest) = done.state;
        let Dest::Slots(slots) = dest else {
            return Err(FetchError::Corrupt(ChunkIndex(0)));
        };
        let (conn, manifest, rdma, connections) = done.value;
        Ok((
            pull.bytes(),
            Pulled {
                slots,
                conn,
                manifest,
                rdma,
                connections,
                retries: done.retries,
                fetched: moved.load(Ordering::Relaxed),
            },
        ))
    }

    async fn read_once<'a>(
        &self,
        a: MemoryAttempt<'_>,
        pull: &mut Pull,
        dest: &mut Dest<'a>,
        used: &mut Option<Arc<Connection>>,
    ) -> Result<Attempt<(Arc<Connection>, Arc<Manifest>, bool, u32)>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object, a.group).await?;
        let open = OpenTransfer::new(&conn, transfer);
        // Whole objects may move by RDMA; a session is not worth it for a range.
        let whole = pull.is_whole();
        let opened = match pull.handle_opened(manifest) {
            Err(refused) => {
                open.close().await;
                return Err(refused.into());
            }
            Ok(o) => o,
        };
        let Some(manifest) = pull.manifest().cloned() else {
            // handle_opened has just set it.
            open.close().await;
            return Err(FetchError::Corrupt(ChunkIndex(0)));
        };
        if opened == Opened::Fresh
            && let Err(e) = dest.shape(&manifest, pull.chunks())
        {
            open.close().await;
            return Err(e);
        }
        let Dest::Slots(slots) = &*dest else {
            open.close().await;
            return Err(FetchError::Corrupt(ChunkIndex(0)));
        };
        let done = Arc::new(AtomicU64::new(pull.progress().0));
        let work: VecDeque<ChunkIndex> = pull.missing().collect();
        let total = pull.progress().1;
        let rdma = if !whole {
            Ok(false)
        } else if a.pace.is_paced() {
            self.rdma_for_paced_pull()
        } else {
            let (done, progress, moved) = (done.clone(), a.opts.progress.clone(), a.moved.clone());
            let on_chunk: super::rdma::OnChunk = Arc::new(move |n| {
                moved.fetch_add(n, Ordering::Relaxed);
                let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &progress {
                    p(so_far, total);
                }
            });
            self.pull_rdma(
                &conn,
                transfer,
                &manifest,
                &work,
                Deliver::Memory(slots),
                on_chunk,
            )
            .await
        };
        let used_rdma = matches!(rdma, Ok(true));
        let gate = Gate::new(a.pace.clone(), conn.clone());
        // Whether a further connection of a striped pull became due for renewal.
        let mut renewing = false;
        let mut connections = 1;
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
                let stripes = self
                    .stripes(
                        Stripe::first(&conn, transfer, &gate),
                        work.len(),
                        a.opts.stripes(self.config()),
                        a.pace,
                        |c| open_part(c, a.dataset, a.object, a.group, &manifest),
                    )
                    .await;
                let reads = &*pull;
                let schedule = ChunkSchedule::new(&manifest, work);
                // The workers run on this task and borrow the chunks' memory: each data
                // frame is hashed and copied into place here, while it is in cache.
                let (schedule, result) =
                    run_workers(a.opts.parallel(self.config()), schedule, |worker, index| {
                        let (stripe, manifest, done) =
                            (&stripes[worker % stripes.len()], &manifest, &done);
                        async move {
                            let len = manifest.chunk_range(index).map_or(0, |r| r.end - r.start);
                            if !stripe.gate.admit(len).await {
                                return Ok(Turn::NotAsked);
                            }
                            let req = reads
                                .read_request(stripe.transfer, index)
                                .ok_or(FetchError::Corrupt(index))?;
                            let mut slot = slots.take(index).ok_or(FetchError::Corrupt(index))?;
                            read_chunk_mem(&stripe.conn, &req, manifest, index, &mut slot).await?;
                            drop(slot);
                            a.moved.fetch_add(len, Ordering::Relaxed);
                            let so_far = done.fetch_add(len, Ordering::Relaxed) + len;
                            if let Some(p) = &a.opts.progress {
                                p(so_far, total);
                            }
                            Ok::<_, FetchError>(Turn::Verified)
                        }
                    })
                    .await;
                renewing = close_stripes(&stripes).await;
                connections = stripes.len() as u32;
                // What stream reads verified is in place, whatever else failed.
                pull.handle_schedule(&schedule);
                if result.is_err() {
                    pull.handle_failed(true);
                }
                result
            }
        };
        open.close().await;
        result?;
        match pull.poll_end(renewing || gate.is_renewing()) {
            PullEnd::Complete => Ok(Attempt::Done((conn, manifest, used_rdma, connections))),
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
    ) -> Result<Attempt<(Arc<Connection>, Manifest, bool, u32)>, FetchError> {
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (transfer, manifest) = open_read(&conn, a.dataset, a.object, a.group).await?;
        let open = OpenTransfer::new(&conn, transfer);
        let opened = match pull.handle_opened(manifest) {
            Ok(o) => o,
            Err(refused) => {
                open.close().await;
                return Err(refused.into());
            }
        };
        let partial = match (opened, kept.take()) {
            // Its chunks are known verified: no need to read the file again.
            (Opened::Resume, Some(p)) => p,
            _ => {
                let Some(manifest) = pull.manifest().cloned() else {
                    open.close().await;
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
        // Whether a further connection of a striped pull became due for renewal.
        let mut renewing = false;
        let mut connections = 1;
        let result = match rdma {
            Ok(true) => {
                for i in &work {
                    pull.handle_verified(*i);
                }
                Ok(())
            }
            Err(e) => Err(e),
            Ok(false) => {
                let stripes = self
                    .stripes(
                        Stripe::first(&conn, transfer, &gate),
                        work.len(),
                        a.opts.stripes(self.config()),
                        a.pace,
                        |c| open_part(c, a.dataset, a.object, a.group, &manifest),
                    )
                    .await;
                let reads = &*pull;
                let schedule = ChunkSchedule::new(&manifest, work);
                let (schedule, result) =
                    run_workers(a.opts.parallel(self.config()), schedule, |worker, index| {
                        let (stripe, partial, done) =
                            (&stripes[worker % stripes.len()], partial.clone(), &done);
                        async move {
                            let len = partial
                                .manifest()
                                .chunk_range(index)
                                .map_or(0, |r| r.end - r.start);
                            if !stripe.gate.admit(len).await {
                                return Ok(Turn::NotAsked);
                            }
                            let req = reads
                                .read_request(stripe.transfer, index)
                                .ok_or(FetchError::Corrupt(index))?;
                            let n = read_chunk_file(&stripe.conn, &req, partial, index, a.fetched)
                                .await?;
                            let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                            if let Some(p) = &a.opts.progress {
                                p(so_far, total);
                            }
                            Ok::<_, FetchError>(Turn::Verified)
                        }
                    })
                    .await;
                renewing = close_stripes(&stripes).await;
                connections = stripes.len() as u32;
                pull.handle_schedule(&schedule);
                result
            }
        };
        open.close().await;
        if let Err(e) = result {
            // The next attempt reads the partial file again for what it holds.
            pull.handle_failed(false);
            return Err(e);
        }
        match pull.poll_end(renewing || gate.is_renewing()) {
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
        Ok(Attempt::Done((
            conn,
            (*manifest).clone(),
            used_rdma,
            connections,
        )))
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
    /// The striped pull's id, when it stripes.
    group: Option<[u8; 16]>,
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
    /// The striped pull's id, when it stripes.
    group: Option<[u8; 16]>,
    opts: &'a FetchOptions,
    pace: &'a Arc<Pace>,
    /// Bytes of verified chunks received, across attempts.
    moved: &'a Arc<AtomicU64>,
}

/// Where a pull into memory puts its chunks, across its attempts.
enum Dest<'a> {
    /// A buffer of ours, made once the manifest says how large.
    Ours,
    /// The caller's memory, not yet split into chunks.
    Caller(&'a mut [u8]),
    /// Split into a slot per chunk.
    Slots(ChunkSlots<'a>),
}

impl<'a> Dest<'a> {
    /// Readies the memory for a fresh pull of `chunks` of `manifest`: split the first time,
    /// kept when a new manifest has the same layout. Caller memory cannot be split again,
    /// so an object that changed its layout between attempts fails the pull.
    fn shape(&mut self, manifest: &Manifest, chunks: Range<u32>) -> Result<(), FetchError> {
        let next = match std::mem::replace(self, Self::Ours) {
            Self::Slots(s) if s.fits(manifest, &chunks) => Self::Slots(s),
            Self::Slots(s) if !s.is_owned() => {
                *self = Self::Slots(s);
                return Err(FetchError::Changed {
                    size: manifest.size(),
                });
            }
            Self::Ours | Self::Slots(_) => Self::Slots(ChunkSlots::owned(manifest, chunks)),
            Self::Caller(mem) => {
                let len = mem.len() as u64;
                match ChunkSlots::borrowed(manifest, chunks, mem) {
                    Some(s) => Self::Slots(s),
                    None => {
                        return Err(FetchError::TooLarge {
                            size: manifest.size(),
                            limit: len,
                        });
                    }
                }
            }
        };
        *self = next;
        Ok(())
    }
}

/// A pull into memory that completed: its chunks, verified, and how it went.
struct Pulled<'a> {
    slots: ChunkSlots<'a>,
    conn: Arc<Connection>,
    manifest: Arc<Manifest>,
    rdma: bool,
    retries: u32,
    /// Connections the last attempt's chunks moved over.
    connections: u32,
    /// Bytes of verified chunks received, across attempts.
    fetched: u64,
}

impl Pulled<'_> {
    /// The bytes `range` of the object (a pull into memory of ours).
    fn into_bytes(self, range: Range<u64>) -> Result<Bytes, FetchError> {
        self.slots.into_bytes(range)
    }
}

/// Opens a further stripe of a pull: the object, as a part of the striped pull `group`, on
/// `conn`, if it opens there with the pull's `manifest` (it may have changed since).
async fn open_part(
    conn: Arc<Connection>,
    dataset: &DatasetName,
    object: &ObjectPath,
    group: Option<[u8; 16]>,
    manifest: &Manifest,
) -> Option<TransferId> {
    match open_read(&conn, dataset, object, group).await {
        Ok((transfer, m)) if m == *manifest => Some(transfer),
        Ok((transfer, _)) => {
            close(&conn, transfer).await;
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "striping: a further transfer did not open");
            None
        }
    }
}

/// Opens the object for reading: a part of the striped pull `group`, if it stripes.
async fn open_read(
    conn: &Connection,
    dataset: &DatasetName,
    object: &ObjectPath,
    group: Option<[u8; 16]>,
) -> Result<(TransferId, Manifest), RequestError> {
    let req = match group {
        None => Pull::open_request(dataset, object),
        Some(group) => Request::OpenReadPart {
            dataset: dataset.clone(),
            object: object.clone(),
            group,
        },
    };
    let answer = conn.call(&req).await?;
    Ok(Answer::opened_read(answer)?)
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

/// Reads one chunk into `buf`: each data frame lands in place (straight from the transport
/// where it reads on this task) and is hashed there while it is in cache; `Ok` only if the
/// whole chunk arrived and verified.
async fn read_chunk_mem(
    conn: &Connection,
    req: &Request,
    manifest: &Manifest,
    index: ChunkIndex,
    buf: &mut [u8],
) -> Result<(), FetchError> {
    let mut check = ChunkCheck::new(manifest, index).map_err(|_| FetchError::Corrupt(index))?;
    if check.len() != buf.len() as u64 {
        return Err(FetchError::Corrupt(index));
    }
    let mut source = request_chunk(conn, req).await?;
    loop {
        let at = check.received() as usize;
        let rest = buf.get_mut(at..).ok_or(FetchError::Corrupt(index))?;
        match next_data_into(&mut source, rest).await? {
            Landed::Data(n) => {
                check
                    .handle_data(&rest[..n])
                    .map_err(|_| FetchError::Corrupt(index))?;
            }
            Landed::TooLong => return Err(FetchError::Corrupt(index)),
            Landed::End => break,
        }
    }
    check
        .finish(manifest)
        .map_err(|_| FetchError::Corrupt(index))
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

/// Runs `f` over the chunks `schedule` hands out, with `parallel` workers (`f` learns which
/// worker, `0..parallel`, runs the chunk). A chunk whose
/// stream was reset is asked for again, first, as the schedule allows; any other error, or
/// a reset past that, stops everything. Hands the schedule back as the workers left it
/// (which chunks verified), with the outcome.
///
/// The workers run concurrently on the caller's task, so they may borrow (the chunks'
/// memory, the pull's state); what blocks for long (file writes) they hand to blocking
/// threads themselves. When one fails, the others are dropped where they wait.
pub(crate) async fn run_workers<F, Fut, E>(
    parallel: usize,
    schedule: ChunkSchedule,
    f: F,
) -> (ChunkSchedule, Result<(), E>)
where
    F: Fn(usize, ChunkIndex) -> Fut,
    Fut: Future<Output = Result<Turn, E>>,
    E: ChunkFailure,
{
    let schedule = Mutex::new(schedule);
    let lock = || schedule.lock().unwrap_or_else(PoisonError::into_inner);
    let (f, lock) = (&f, &lock);
    let worker = |w| async move {
        loop {
            let Some(i) = lock().poll_next() else {
                return Ok(());
            };
            let turn = f(w, i).await;
            let mut s = lock();
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
    };
    let mut workers: FuturesUnordered<_> = (0..parallel).map(worker).collect();
    let mut outcome = Ok(());
    while let Some(ended) = workers.next().await {
        if let Err(e) = ended {
            outcome = Err(e);
            break;
        }
    }
    // Dropping the workers left ends their chunks' streams; a chunk they held was not
    // reported verified, so it stays missing.
    drop(workers);
    let left = lock().clone();
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
