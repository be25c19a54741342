//! Pushing objects from a file or from memory into a writable dataset.
//!
//! The client builds the manifest, opens a write transfer (learning which chunks the server
//! already holds from an interrupted attempt), sends the missing chunks on parallel streams,
//! then commits. The server verifies every chunk before it counts and makes the object
//! visible only at commit, durably; a `Committed` answer means the object is on disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use certs::SpiffeId;

use super::attempt::{self, Attempt, Kind, Ran};
use super::connection::Connection;
use super::fetch::{Turn, run_workers};
use super::pace::{Gate, Pace};
use super::reply::response;
use super::stripe::{OpenTransfer, Stripe, close_stripes, stripe_group};
use super::{Client, PushOptions};
use crate::audit::{AuditEvent, AuditRecord};
use crate::error::{PushError, RequestError};
use crate::proto::manifest::chunk_bytes_for;
use crate::proto::request::Answer;
use crate::proto::transfer::{Push, PushEnd};
use crate::proto::{
    ChunkIndex, DatasetName, Digest, ErrorCode, FrameKind, Manifest, ObjectPath, TransferId,
};
use crate::vocab::{Direction, Outcome, Path};

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// The server that stored it.
    pub server: SpiffeId,
    /// The transport used.
    pub path: Path,
    /// Object size.
    pub size: u64,
    /// Bytes sent over the network (less than `size` when resuming).
    pub sent_bytes: u64,
    /// Chunks in the object.
    pub chunks: u32,
    /// Chunks the server already held.
    pub chunks_skipped: u32,
    /// The object's BLAKE3 root, as the server committed it.
    pub root: Digest,
    /// Wall time, including hashing the source.
    #[serde(serialize_with = "super::millis")]
    pub elapsed: Duration,
    /// Reconnections needed.
    pub retries: u32,
    /// Connections the last attempt's chunks moved over (see
    /// [`TransferOptions::connections`](super::TransferOptions::connections)).
    pub connections: u32,
}

/// What one attempt of a push works with.
struct PushAttempt<'a> {
    dataset: &'a DatasetName,
    object: &'a ObjectPath,
    /// The striped push's id, when it stripes.
    group: Option<[u8; 16]>,
    source: &'a Source,
    opts: &'a PushOptions,
    pace: &'a Arc<Pace>,
    /// Bytes sent over the network, across attempts.
    sent: &'a Arc<AtomicU64>,
}

/// Where chunk bytes come from.
#[derive(Debug, Clone)]
enum Source {
    File(Arc<File>),
    Memory(Bytes),
}

impl Source {
    /// Reads one chunk. Blocking for files.
    fn chunk(&self, range: std::ops::Range<u64>) -> std::io::Result<Bytes> {
        match self {
            Self::Memory(b) => Ok(b.slice(range.start as usize..range.end as usize)),
            Self::File(f) => {
                let mut buf = BytesMut::zeroed((range.end - range.start) as usize);
                f.read_exact_at(&mut buf, range.start)?;
                Ok(buf.freeze())
            }
        }
    }
}

impl Client {
    /// Pushes a local file as `object` of `dataset`.
    pub async fn push_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        src: &FsPath,
        opts: &PushOptions,
    ) -> Result<PushReport, PushError> {
        let src = src.to_path_buf();
        let file = tokio::task::spawn_blocking(move || File::open(&src))
            .await
            .map_err(|e| PushError::Local(std::io::Error::other(e)))??;
        self.push_open_file(dataset, object, file, opts).await
    }

    /// Pushes an open file (read from its start, by position: its offset is left alone) as
    /// `object` of `dataset`: for a file handed over as a descriptor, such as a sidecar's
    /// caller's.
    pub async fn push_open_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        file: File,
        opts: &PushOptions,
    ) -> Result<PushReport, PushError> {
        let started = self.config().clock.instant();
        let preferred = self.config().transport.chunk_bytes;
        let (file, manifest) = tokio::task::spawn_blocking(move || {
            let len = file.metadata()?.len();
            let m = crate::store::compute_manifest(&file, len, preferred).map_err(|e| match e {
                crate::store::StoreError::Manifest(m) => PushError::Manifest(m),
                crate::store::StoreError::Io(e) => PushError::Local(e),
                other => PushError::Local(std::io::Error::other(other)),
            })?;
            Ok::<_, PushError>((file, m))
        })
        .await
        .map_err(|e| PushError::Local(std::io::Error::other(e)))??;
        self.push(
            dataset,
            object,
            Source::File(Arc::new(file)),
            manifest,
            opts,
            started,
        )
        .await
    }

    /// Pushes bytes held in memory as `object` of `dataset`.
    pub async fn push_bytes(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        data: Bytes,
        opts: &PushOptions,
    ) -> Result<PushReport, PushError> {
        let started = self.config().clock.instant();
        let cb = chunk_bytes_for(data.len() as u64, self.config().transport.chunk_bytes)?;
        let d = data.clone();
        let manifest = tokio::task::spawn_blocking(move || Manifest::of_bytes(&d, cb))
            .await
            .map_err(|e| PushError::Local(std::io::Error::other(e)))??;
        self.push(
            dataset,
            object,
            Source::Memory(data),
            manifest,
            opts,
            started,
        )
        .await
    }

    async fn push(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        source: Source,
        manifest: Manifest,
        opts: &PushOptions,
        started: std::time::Instant,
    ) -> Result<PushReport, PushError> {
        let sent = Arc::new(AtomicU64::new(0));
        let pace = Arc::new(Pace::new(opts.max_rate, self.config().clock.clone()));
        let group = stripe_group(opts.stripes(self.config())).map_err(PushError::Local)?;
        let push = Push::new(Arc::new(manifest));
        let done = attempt::run(Kind::Push, opts.retry, &sent, push, |mut push| {
            let attempt = PushAttempt {
                dataset,
                object,
                group,
                source: &source,
                opts,
                pace: &pace,
                sent: &sent,
            };
            async move {
                let mut used = None;
                let result = self.push_once(attempt, &mut push, &mut used).await;
                Ran {
                    state: push,
                    used,
                    result,
                }
            }
        })
        .await?;
        let ((conn, root, connections), push) = (done.value, done.state);
        let manifest = push.manifest();
        let report = PushReport {
            server: conn.peer.id.clone(),
            path: conn.peer.path,
            size: manifest.size(),
            sent_bytes: sent.load(Ordering::Relaxed),
            chunks: manifest.chunk_count(),
            chunks_skipped: push.chunks_skipped(),
            root,
            elapsed: self
                .config()
                .clock
                .instant()
                .saturating_duration_since(started),
            retries: done.retries,
            connections,
        };
        let record = AuditRecord {
            time: self.config().clock.now(),
            event: AuditEvent::Transfer {
                peer: conn.peer.id.clone(),
                direction: Direction::Out,
                dataset: dataset.clone(),
                object: object.clone(),
                bytes: report.sent_bytes,
                root,
                path: conn.peer.path.into(),
                outcome: Outcome::Complete,
                duration_ms: report.elapsed.as_millis() as u64,
            },
        };
        if let Err(e) = self.config().audit.record(&record) {
            tracing::error!(error = %e, "audit record lost");
        }
        Ok(report)
    }

    async fn push_once(
        &self,
        a: PushAttempt<'_>,
        push: &mut Push,
        used: &mut Option<Arc<Connection>>,
    ) -> Result<Attempt<(Arc<Connection>, Digest, u32)>, PushError> {
        let PushAttempt {
            dataset,
            object,
            group,
            source,
            opts,
            pace,
            sent,
        } = a;
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let open = match group {
            None => push.open_request(dataset, object),
            Some(g) => push.open_part_request(dataset, object, g),
        };
        let answer = conn.call(&open).await?;
        let (transfer, have) = Answer::opened_write(answer).map_err(RequestError::from)?;
        let open = OpenTransfer::new(&conn, transfer);
        let schedule = push.handle_opened(&have).map_err(RequestError::from)?;
        let manifest = push.manifest().clone();
        let total = manifest.size();
        let missing = (manifest.chunk_count() - have.count()) as usize;
        let done = AtomicU64::new(push.held_bytes(&have));
        let gate = Gate::new(pace.clone(), conn.clone());
        let writes = &*push;
        let stripes = self
            .stripes(
                Stripe::first(&conn, transfer, &gate),
                missing,
                opts.stripes(self.config()),
                pace,
                |c| open_part(c, writes, dataset, object, group),
            )
            .await;
        let (_, result) = run_workers(opts.parallel(self.config()), schedule, |worker, index| {
            let (stripe, manifest, done) = (&stripes[worker % stripes.len()], &manifest, &done);
            async move {
                let len = manifest.chunk_range(index).map_or(0, |r| r.end - r.start);
                if !stripe.gate.admit(len).await {
                    return Ok(Turn::NotAsked);
                }
                let n = send_chunk(&stripe.conn, stripe.transfer, writes, source, index).await?;
                sent.fetch_add(n, Ordering::Relaxed);
                let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &opts.progress {
                    p(so_far, total);
                }
                Ok::<_, PushError>(Turn::Verified)
            }
        })
        .await;
        // The further parts end before the commit, so the node records the push, as one
        // transfer, when it commits.
        let renewing = close_stripes(&stripes).await;
        if let Err(e) = result {
            open.close().await;
            return Err(e);
        }
        match push.poll_end(transfer, renewing || gate.is_renewing()) {
            PushEnd::Renew(close) => {
                // Chunks were left for the next attempt, which reopens the transfer on a
                // fresh connection and learns what the server holds; close this one first,
                // so the object is not still open for writing when it does.
                let _ = conn.call(&close).await;
                open.ended();
                Ok(Attempt::Renew)
            }
            PushEnd::Commit(commit) => {
                // However the commit went, the server has ended the transfer.
                let answer = conn.call(&commit).await;
                open.ended();
                let answer = answer?;
                let root = Answer::committed(answer).map_err(RequestError::from)?;
                let root = push.handle_committed(root).map_err(RequestError::from)?;
                Ok(Attempt::Done((conn, root, stripes.len() as u32)))
            }
        }
    }
}

/// Opens a further stripe of a push: the object, as a part of the striped push `group`,
/// on `conn`.
async fn open_part(
    conn: Arc<Connection>,
    push: &Push,
    dataset: &DatasetName,
    object: &ObjectPath,
    group: Option<[u8; 16]>,
) -> Option<TransferId> {
    let req = push.open_part_request(dataset, object, group?);
    let opened = conn.call(&req).await.and_then(|answer| {
        let (transfer, _) = Answer::opened_write(answer)?;
        Ok(transfer)
    });
    opened
        .inspect_err(|e| tracing::debug!(error = %e, "striping: a further transfer did not open"))
        .ok()
}

async fn send_chunk(
    conn: &Connection,
    transfer: TransferId,
    push: &Push,
    source: &Source,
    index: ChunkIndex,
) -> Result<u64, PushError> {
    let (req, range) = push
        .write_request(transfer, index)
        .map_err(RequestError::from)?;
    let src = source.clone();
    let r = range.clone();
    let data = tokio::task::spawn_blocking(move || src.chunk(r))
        .await
        .map_err(|e| PushError::Local(std::io::Error::other(e)))??;
    let n = data.len() as u64;
    let mut s = conn.open(&req).await?;
    let sent = match s.sink.send_data(data).await {
        Ok(()) => s.sink.send(FrameKind::End, Bytes::new()).await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        // The server may refuse a chunk before it has read all of it (a full disk): it
        // answers, then stops our side of the stream (QUIC's STOP_SENDING), which fails
        // our sending. Its answer, not the stop, says why; without one, the stop does.
        return match response(&mut s.source).await {
            Err(RequestError::Remote(code)) => Err(chunk_refused(code, index)),
            _ => Err(RequestError::from(e).into()),
        };
    }
    s.sink.finish();
    match response(&mut s.source).await {
        Ok(answer) => {
            Answer::chunk_stored(answer, index).map_err(RequestError::from)?;
            Ok(n)
        }
        Err(RequestError::Remote(code)) => Err(chunk_refused(code, index)),
        Err(e) => Err(e.into()),
    }
}

/// A chunk the server answered with an error code.
fn chunk_refused(code: ErrorCode, index: ChunkIndex) -> PushError {
    match code {
        ErrorCode::Corrupt => PushError::Corrupt(index),
        code => RequestError::Remote(code).into(),
    }
}
