//! One request stream: decode the request, authorize it, answer it.
//!
//! Every failure ends the stream with an `Error` frame carrying a stable code. A request
//! the policy denies and a request for something missing both answer `NotFound`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use tracing::{debug, trace};

use super::conn::{ConnCtx, Transfer, TransferKind};
use super::failure::{Failure, store_code};
use super::memory::BlockPermit;
use super::shared::{record_emergency_use, record_or_refuse};
use crate::audit::AuditEvent;
use crate::policy::Decision;
use crate::proto::frame::MAX_DATA_PAYLOAD;
use crate::proto::message::{MAX_LIST_ENTRIES, MAX_READ_BYTES};
use crate::proto::{
    ChunkIndex, DatasetName, DecodeError, ErrorCode, Frame, FrameKind, Manifest, ObjectPath,
    Request, Response, TransferId,
};
use crate::store::{ChunkWriter, StoreError, WriteError};
use crate::transport::{FrameSink, FrameSource, RequestStream};
use crate::vocab::{Action, Outcome};

/// Serves one request stream to its end.
pub(crate) async fn handle(ctx: Arc<ConnCtx>, first: Option<Frame>, mut stream: RequestStream) {
    let frame = match first {
        Some(f) => f,
        None => match stream.source.recv().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "request stream failed before its request");
                if let Failure::Code(code) = Failure::from(e) {
                    // A malformed frame: say why, then close the stream.
                    if stream.sink.send_error(code).await.is_ok() {
                        stream.sink.finish_delivered().await;
                    }
                }
                return;
            }
        },
    };
    let result = match decode(&frame) {
        Ok(req) => {
            let name = req.name();
            let r = serve(&ctx, req, &mut stream).await;
            trace!(req = name, ok = r.is_ok(), "request done");
            r
        }
        Err(e) => {
            debug!(peer.id = %ctx.peer.id, error = %e, "malformed request");
            Err(Failure::Code(ErrorCode::Protocol))
        }
    };
    match result {
        Ok(()) => stream.sink.finish_delivered().await,
        Err(Failure::Code(code)) => {
            if stream.sink.send_error(code).await.is_ok() {
                stream.sink.finish_delivered().await;
            }
        }
        Err(Failure::Stream(e)) => {
            debug!(error = %e, "request stream failed");
            // Every stream ends with a final frame (the multiplexer frees the client's slot
            // on it); on a lost connection this fails quietly.
            if stream.sink.send_error(ErrorCode::Cancelled).await.is_ok() {
                stream.sink.finish_delivered().await;
            }
        }
    }
}

/// How long a `PolicyWatch` is held when nothing changes: short enough that a node
/// stopping or a peer gone frees it soon, long enough to cost little.
const POLICY_WATCH_HOLD: std::time::Duration = std::time::Duration::from_secs(15);

fn decode(frame: &Frame) -> Result<Request, DecodeError> {
    if frame.kind != FrameKind::Request {
        return Err(DecodeError::Tag(frame.kind as u8));
    }
    Request::decode(&frame.payload)
}

async fn serve(ctx: &Arc<ConnCtx>, req: Request, s: &mut RequestStream) -> Result<(), Failure> {
    let store = ctx.shared.config.store.clone();
    match req {
        Request::ListDatasets => {
            let all = blocking(move || store.datasets()).await?;
            let policy = ctx.shared.config.policy.current();
            let mut visible = Vec::new();
            for d in all {
                if visible.len() == MAX_LIST_ENTRIES {
                    break;
                }
                let decision = policy.decide(&crate::policy::Access {
                    peer: &ctx.peer.id,
                    action: Action::List,
                    dataset: &d,
                    object: None,
                });
                // A dataset shown only by an emergency grant is a use of the grant.
                if let Decision::Emergency { grant, reason } = decision {
                    record_emergency_use(
                        &ctx.shared,
                        &ctx.peer.id,
                        Action::List,
                        &d,
                        None,
                        grant,
                        reason,
                    )?;
                    visible.push(d);
                } else if decision.is_allow() {
                    visible.push(d);
                }
            }
            record_or_refuse(
                &ctx.shared,
                AuditEvent::DatasetsListed {
                    peer: ctx.peer.id.clone(),
                    visible: visible.len(),
                },
            )?;
            respond(&mut s.sink, Response::Datasets(visible)).await
        }
        Request::ListObjects {
            dataset,
            prefix,
            start_after,
            limit,
        } => {
            ctx.authorize(Action::List, &dataset, None)?;
            let limit = (limit as usize).clamp(1, MAX_LIST_ENTRIES);
            let (entries, more) =
                blocking(move || store.list(&dataset, &prefix, start_after.as_ref(), limit))
                    .await?;
            respond(&mut s.sink, Response::Objects { entries, more }).await
        }
        Request::Stat { dataset, object } => {
            ctx.authorize(Action::Read, &dataset, Some(&object))?;
            let reader = blocking(move || store.open_read(&dataset, &object)).await?;
            respond(
                &mut s.sink,
                Response::Manifest((**reader.manifest()).clone()),
            )
            .await
        }
        Request::OpenRead { dataset, object } => {
            open_read(ctx, store, &mut s.sink, dataset, object, None).await
        }
        Request::OpenReadPart {
            dataset,
            object,
            group,
        } => open_read(ctx, store, &mut s.sink, dataset, object, Some(group)).await,
        Request::Read {
            transfer,
            offset,
            len,
        } => read(ctx, transfer, offset, len, s).await,
        Request::OpenWrite {
            dataset,
            object,
            manifest,
        } => open_write(ctx, store, &mut s.sink, (dataset, object, manifest), None).await,
        Request::OpenWritePart {
            dataset,
            object,
            manifest,
            group,
        } => {
            let target = (dataset, object, manifest);
            open_write(ctx, store, &mut s.sink, target, Some(group)).await
        }
        Request::WriteChunk { transfer, chunk } => {
            write_chunk(ctx, transfer, chunk, &mut s.source).await?;
            respond(&mut s.sink, Response::ChunkStored(chunk)).await
        }
        Request::Commit { transfer } => commit(ctx, transfer, &mut s.sink).await,
        Request::RdmaOpen { transfer, offer } => super::rdma::serve(ctx, transfer, offer, s).await,
        Request::PolicyWatch { known } => {
            let mut epoch = ctx.shared.config.policy.epoch();
            let mut stop = ctx.shared.stop.subscribe();
            if *epoch.borrow_and_update() == known {
                // Held until the policy changes, the node stops, or a while has passed.
                tokio::select! {
                    _ = epoch.changed() => {}
                    _ = stop.wait_for(|s| *s) => {}
                    () = tokio::time::sleep(POLICY_WATCH_HOLD) => {}
                }
            }
            let now = *epoch.borrow();
            respond(&mut s.sink, Response::Policy { epoch: now }).await
        }
        Request::Close { transfer } => {
            let t = ctx.remove(transfer)?;
            let outcome = match &t.kind {
                TransferKind::Read(r) if t.bytes.load(Ordering::Relaxed) >= r.manifest().size() => {
                    Outcome::Complete
                }
                _ => Outcome::Incomplete,
            };
            ctx.ended(&t, outcome);
            respond(&mut s.sink, Response::Closed).await
        }
    }
}

/// Opens a read transfer (a part of the striped pull `group`, if any) after authorizing it,
/// and answers with the manifest.
async fn open_read(
    ctx: &Arc<ConnCtx>,
    store: Arc<crate::store::Store>,
    sink: &mut FrameSink,
    dataset: DatasetName,
    object: ObjectPath,
    group: Option<[u8; 16]>,
) -> Result<(), Failure> {
    ctx.authorize(Action::Read, &dataset, Some(&object))?;
    let (d, o) = (dataset.clone(), object.clone());
    let reader = blocking(move || store.open_read(&d, &o)).await?;
    let manifest = (**reader.manifest()).clone();
    let transfer = ctx.open(
        dataset,
        object,
        &manifest,
        TransferKind::Read(reader),
        group,
    )?;
    respond(sink, Response::OpenedRead { transfer, manifest }).await
}

/// Opens a write transfer (a part of the striped push `group`, if any) after authorizing
/// it, and answers with the chunks already held. The parts of a striped push write through
/// one writer: the first part opens the object, the others join it.
async fn open_write(
    ctx: &Arc<ConnCtx>,
    store: Arc<crate::store::Store>,
    sink: &mut FrameSink,
    (dataset, object, manifest): (DatasetName, ObjectPath, Manifest),
    group: Option<[u8; 16]>,
) -> Result<(), Failure> {
    ctx.authorize(Action::Write, &dataset, Some(&object))?;
    let manifest = Arc::new(manifest);
    let (d, o, m) = (dataset.clone(), object.clone(), manifest.clone());
    let owner = ctx.peer.id.to_string();
    let open = blocking(move || store.open_write(&d, &o, m, &owner));
    let writer = match group {
        None => Arc::new(std::sync::Mutex::new(Some(open.await?))),
        Some(g) => {
            let key = (ctx.peer.id.clone(), g, manifest.root());
            ctx.shared.stripes.writer(&key, open).await?
        }
    };
    let (have, replaced) = writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .map(|w| (w.partial().have(), w.take_replaced()))
        // The push was committed on another part while this one opened.
        .ok_or(ErrorCode::Busy)?;
    if let Some(r) = replaced {
        debug!(
            peer.id = %ctx.peer.id,
            dataset = %r.dataset,
            bytes = r.bytes,
            "partial file of another manifest replaced"
        );
        record_or_refuse(&ctx.shared, r.into())?;
    }
    let transfer = ctx.open(
        dataset,
        object,
        &manifest,
        TransferKind::Write(writer),
        group,
    )?;
    respond(sink, Response::OpenedWrite { transfer, have }).await
}

async fn respond(sink: &mut FrameSink, r: Response) -> Result<(), Failure> {
    sink.send(FrameKind::Response, r.encode()).await?;
    Ok(())
}

/// Streams `len` bytes at `offset` of a read transfer as `Data` frames, then `End`. Disk
/// reads run one block ahead of the network, within the connection's read budget: a block
/// (up to [`READ_BLOCK_BYTES`](super::conn::READ_BLOCK_BYTES)) is read by one blocking
/// call into a pooled buffer and sent as pieces of at most [`MAX_DATA_PAYLOAD`] that share it; each piece gives its share of
/// the budget back once handed to the transport.
async fn read(
    ctx: &Arc<ConnCtx>,
    id: TransferId,
    offset: u64,
    len: u64,
    s: &mut RequestStream,
) -> Result<(), Failure> {
    let t = ctx.get(id)?;
    let TransferKind::Read(reader) = &t.kind else {
        return Err(ErrorCode::UnknownTransfer.into());
    };
    if len > MAX_READ_BYTES {
        return Err(ErrorCode::TooLarge.into());
    }
    let end = offset.checked_add(len).ok_or(ErrorCode::Range)?;
    if end > reader.manifest().size() {
        return Err(ErrorCode::Range.into());
    }
    let mut at = offset;
    let mut next = (at < end).then(|| spawn_read(ctx, &t, at, end));
    while let Some(pending) = next.take() {
        let mut block = pending
            .await
            .map_err(|_| ErrorCode::Internal)?
            .map_err(store_code)?;
        at += block.len() as u64;
        if at < end {
            next = Some(spawn_read(ctx, &t, at, end));
        }
        while !block.is_empty() {
            if s.source.try_recv_cancel() {
                return Err(ErrorCode::Cancelled.into());
            }
            let piece = block.split_to(block.len().min(MAX_DATA_PAYLOAD));
            let n = piece.len();
            s.sink.send(FrameKind::Data, piece).await?;
            t.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    s.sink.send(FrameKind::End, Bytes::new()).await?;
    Ok(())
}

type ReadBlock = tokio::task::JoinHandle<Result<Bytes, StoreError>>;

/// Reads the next block of `at..end`, once the connection's, its identity's and the node's
/// budgets have room for it (`server/memory.rs`). The block holds its share of them for as
/// long as it is in memory: until the transport has let go of its last piece (written to
/// the socket over TCP, acknowledged over QUIC), not merely been handed it.
fn spawn_read(ctx: &Arc<ConnCtx>, t: &Arc<Transfer>, at: u64, end: u64) -> ReadBlock {
    let n = (end - at).min(ctx.read_block_bytes as u64) as usize;
    let ctx2 = ctx.clone();
    let buffers = ctx.shared.buffers.clone();
    let t = t.clone();
    tokio::spawn(async move {
        let ctx = ctx2;
        let permit = BlockPermit::acquire(
            &ctx.budget,
            &ctx.identity_budget,
            ctx.shared.memory.node(),
            kib(n),
        )
        .await
        .map_err(|_| StoreError::Io(std::io::Error::other("connection closing")))?;
        let block = tokio::task::spawn_blocking(move || match &t.kind {
            TransferKind::Read(r) => buffers.fill_holding(n, |buf| r.read_into(at, buf), permit),
            TransferKind::Write(_) => Err(StoreError::NotFound),
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(block)
    })
}

/// Read-budget units (KiB) that `bytes` take; at least one.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// Receives one chunk of a write transfer: each `Data` frame is hashed and written as it
/// arrives; the chunk counts once `End` arrives and the hash matches.
async fn write_chunk(
    ctx: &Arc<ConnCtx>,
    id: TransferId,
    index: ChunkIndex,
    source: &mut FrameSource,
) -> Result<(), Failure> {
    let t = ctx.get(id)?;
    let TransferKind::Write(w) = &t.kind else {
        return Err(ErrorCode::UnknownTransfer.into());
    };
    let partial = w
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|w| w.partial().clone())
        .ok_or(ErrorCode::UnknownTransfer)?;
    let mut writer = ChunkWriter::new(partial, index).map_err(write_code)?;
    loop {
        let frame = source.recv().await?.ok_or(ErrorCode::Protocol)?;
        match frame.kind {
            FrameKind::Data => {
                let n = frame.payload.len() as u64;
                writer = tokio::task::spawn_blocking(move || {
                    writer.feed(&frame.payload).map(|()| writer)
                })
                .await
                .map_err(|_| ErrorCode::Internal)?
                .map_err(write_code)?;
                t.bytes.fetch_add(n, Ordering::Relaxed);
            }
            FrameKind::End => break,
            FrameKind::Cancel => return Err(ErrorCode::Cancelled.into()),
            _ => return Err(ErrorCode::Protocol.into()),
        }
    }
    writer.finish().map_err(|e| {
        debug!(peer.id = %ctx.peer.id, chunk = index.0, error = %e, "pushed chunk refused");
        if matches!(e, WriteError::Chunk(crate::proto::ChunkError::Corrupt(_))) {
            ctx.shared.config.metrics.chunk_failed();
        }
        write_code(e)
    })?;
    Ok(())
}

async fn commit(ctx: &Arc<ConnCtx>, id: TransferId, sink: &mut FrameSink) -> Result<(), Failure> {
    let t = ctx.get(id)?;
    let TransferKind::Write(w) = &t.kind else {
        return Err(ErrorCode::UnknownTransfer.into());
    };
    let writer = {
        let mut slot = w.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(wr) if wr.partial().is_complete() => slot.take(),
            Some(_) => return Err(ErrorCode::Incomplete.into()),
            None => return Err(ErrorCode::UnknownTransfer.into()),
        }
    };
    let Some(writer) = writer else {
        return Err(ErrorCode::UnknownTransfer.into());
    };
    let store = ctx.shared.config.store.clone();
    let (d, o) = (t.dataset.clone(), t.object.clone());
    let committed = tokio::task::spawn_blocking(move || {
        let m = writer.commit()?;
        // The object is durable; failing to cache its manifest only costs a rehash.
        let _ = store.remember(&d, &o, m.clone());
        Ok::<_, WriteError>(m)
    })
    .await
    .map_err(|_| ErrorCode::Internal)?;
    let _ = ctx.remove(id);
    match committed {
        Ok(m) => {
            ctx.ended(&t, Outcome::Complete);
            respond(sink, Response::Committed { root: m.root() }).await
        }
        Err(e) => {
            ctx.ended(&t, Outcome::Failed);
            Err(write_code(e).into())
        }
    }
}

async fn blocking<T, F>(f: F) -> Result<T, ErrorCode>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ErrorCode::Internal)?
        .map_err(store_code)
}

fn write_code(e: WriteError) -> ErrorCode {
    match e {
        WriteError::Chunk(crate::proto::ChunkError::Corrupt(_)) => ErrorCode::Corrupt,
        WriteError::Chunk(crate::proto::ChunkError::Length { .. }) => ErrorCode::TooLarge,
        WriteError::Chunk(_) => ErrorCode::Range,
        WriteError::Incomplete => ErrorCode::Incomplete,
        e if e.is_no_space() => ErrorCode::NoSpace,
        other => {
            tracing::warn!(error = %other, "write failure");
            ErrorCode::Internal
        }
    }
}
