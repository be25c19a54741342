//! The sender's side of an RDMA session (see `proto/rdma.rs` for the exchange).
//!
//! The client offers its device and receive ring for an open read transfer; if this server
//! may and can use that kind of device, it opens one, answers with its own connection
//! parameters and a fresh session ID, and both sides derive the session's keys from the TLS
//! exporter of this very QUIC connection. Then, grant by grant, it reads the chunk straight
//! into a staging slot, seals it there and writes it into the granted ring slot with the slot
//! number as the immediate value. It never writes where it was not granted, and the ring
//! bounds what is in flight. Which grants it serves, and where each chunk goes, is decided
//! by the pure [`Sender`] machine (`proto/rdma/grant.rs`); this driver only moves frames,
//! staging slots and writes. An offer of unsealed chunks is always refused (`NoRdma`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tracing::{debug, info};

use super::conn::{ConnCtx, Transfer, TransferKind};
use super::failure::{Failure, store_code};
use crate::config::RdmaMode;
use crate::proto::rdma::grant::{Control, Sender, Work};
use crate::proto::rdma::{DeviceKind, RdmaOffer};
use crate::proto::seal::{Direction, HEADER_LEN, KeyLimits, Sealer};
use crate::proto::{ErrorCode, FrameKind, Response, TransferId};
use crate::transport::rdma::local_ip;
use crate::transport::rdma::soft::{SoftConfig, SoftVerbs};
use crate::transport::rdma::verbs::{
    Completion, CompletionKind, Region, RemoteRegion, Verbs, WorkId,
};
use crate::transport::{Connection, RequestStream, rdma_keys};

/// Staging slots: chunks sealed and in flight at once.
const MAX_STAGING: usize = 8;

/// Serves an `RdmaOpen` request to the end of its session.
pub(crate) async fn serve(
    ctx: &Arc<ConnCtx>,
    transfer: TransferId,
    offer: RdmaOffer,
    s: &mut RequestStream,
) -> Result<(), Failure> {
    let t = ctx.get(transfer)?;
    let TransferKind::Read(reader) = &t.kind else {
        return Err(ErrorCode::UnknownTransfer.into());
    };
    // RDMA sessions are offered on QUIC connections only, whose control streams carry
    // the grants.
    if ctx.peer.path != crate::vocab::Path::Quic {
        return Err(ErrorCode::NoRdma.into());
    }
    let conn = ctx.conn.clone();
    let config = &ctx.shared.config.transport;
    let grants = Sender::new(transfer.0, reader.manifest().clone(), &offer).map_err(|e| {
        debug!(peer.id = %ctx.peer.id, error = %e, "RDMA offer refused");
        e.code()
    })?;
    let slot_bytes = grants.slot_bytes();
    let session = Session {
        ctx,
        t: &t,
        offer: &offer,
        conn,
        slot_bytes,
    };
    match (offer.device, config.rdma_mode()) {
        (DeviceKind::Soft, RdmaMode::Soft) => {
            let mut soft = SoftConfig::default();
            soft.bind(SocketAddr::new(local_ip(&*session.conn), 0));
            soft.max_region_bytes(slot_bytes * MAX_STAGING)
                .and_then(|c| c.max_registered_bytes(slot_bytes * MAX_STAGING))
                .map_err(|_| ErrorCode::TooLarge)?;
            let device = SoftVerbs::bind(Arc::new(soft)).await.map_err(|e| {
                info!(error = %e, "soft RDMA device unavailable");
                ErrorCode::NoRdma
            })?;
            session.run(device, grants, s).await
        }
        #[cfg(feature = "rdma")]
        (DeviceKind::Hardware, RdmaMode::Auto)
            if !crate::transport::rdma::discover().is_empty() =>
        {
            use crate::transport::rdma::hardware::{HardwareConfig, HardwareVerbs};
            let device = HardwareVerbs::open(Arc::new(HardwareConfig::default()))
                .await
                .map_err(|e| {
                    info!(error = %e, "RDMA device unavailable");
                    ErrorCode::NoRdma
                })?;
            session.run(device, grants, s).await
        }
        (kind, mode) => {
            debug!(peer.id = %ctx.peer.id, ?kind, ?mode, "RDMA session refused");
            Err(ErrorCode::NoRdma.into())
        }
    }
}

struct Session<'a> {
    ctx: &'a Arc<ConnCtx>,
    t: &'a Arc<Transfer>,
    offer: &'a RdmaOffer,
    conn: Arc<dyn Connection>,
    slot_bytes: usize,
}

impl Session<'_> {
    async fn run<V: Verbs>(
        self,
        device: V,
        mut grants: Sender,
        s: &mut RequestStream,
    ) -> Result<(), Failure> {
        let session: [u8; 16] =
            crate::transport::rdma::random().map_err(|_| ErrorCode::Internal)?;
        let keys = rdma_keys(&*self.conn, session).map_err(|e| {
            info!(error = %e, "RDMA keys unavailable");
            ErrorCode::NoRdma
        })?;
        let mut sealer = keys.sealer(Direction::ServerToClient, KeyLimits::default());
        let ring = RemoteRegion {
            addr: self.offer.ring_addr,
            len: self.offer.ring_len,
            rkey: crate::transport::rdma::verbs::RKey(self.offer.ring_rkey),
        };
        let staging_slots = (self.offer.slots as usize).min(MAX_STAGING);
        let staging = Arc::new(
            device
                .register(self.slot_bytes * staging_slots)
                .map_err(|_| ErrorCode::TooLarge)?,
        );
        s.sink
            .send(
                FrameKind::Response,
                Response::RdmaAccepted {
                    session,
                    info: Bytes::from(device.local_info()),
                }
                .encode(),
            )
            .await?;
        device.connect(&self.offer.info).await.map_err(|e| {
            info!(peer.id = %self.ctx.peer.id, error = %e, "RDMA connection failed");
            ErrorCode::NoRdma
        })?;
        self.t.rdma.store(true, Ordering::Relaxed);
        debug!(
            peer.id = %self.ctx.peer.id,
            slots = self.offer.slots,
            "RDMA session started"
        );
        let mut free: Vec<usize> = (0..staging_slots).collect();
        let mut in_flight = 0usize;
        loop {
            let frame = s.source.recv().await?.ok_or(ErrorCode::Protocol)?;
            match frame.kind {
                FrameKind::Data => {}
                FrameKind::Cancel => return Err(ErrorCode::Cancelled.into()),
                _ => return Err(ErrorCode::Protocol.into()),
            }
            let work = match grants.handle_control(&frame.payload) {
                Ok(Control::Write(work)) => work,
                Ok(Control::Finish) => break,
                Err(e) => {
                    debug!(peer.id = %self.ctx.peer.id, error = %e, "bad RDMA grant");
                    return Err(e.code().into());
                }
            };
            while free.is_empty() {
                let c = device.poll().await.map_err(|_| ErrorCode::Cancelled)?;
                free.push(written(c)?);
                in_flight -= 1;
            }
            let stage = free.pop().ok_or(ErrorCode::Internal)?;
            let (len, sealed) = self.stage(&staging, stage, &work, sealer).await?;
            sealer = sealed;
            device
                .post_write_imm(
                    WorkId(stage as u64),
                    &staging,
                    stage * self.slot_bytes,
                    len,
                    &ring,
                    work.dst,
                    work.slot,
                )
                .map_err(|e| {
                    debug!(error = %e, "RDMA write refused");
                    ErrorCode::Range
                })?;
            in_flight += 1;
        }
        while in_flight > 0 {
            let c = device.poll().await.map_err(|_| ErrorCode::Cancelled)?;
            written(c)?;
            in_flight -= 1;
        }
        s.sink.send(FrameKind::End, Bytes::new()).await?;
        Ok(())
    }

    /// Reads the chunk of `work` into staging slot `stage` and seals it there (off the
    /// runtime's threads). Returns the bytes to write, and the sealer back.
    async fn stage<R: Region>(
        &self,
        staging: &Arc<R>,
        stage: usize,
        work: &Work,
        sealer: Sealer,
    ) -> Result<(usize, Sealer), Failure> {
        let len = (work.range.end - work.range.start) as usize;
        let (start, placement, sealed_len) = (work.range.start, work.placement, work.sealed_len);
        let (t, staging, at) = (self.t.clone(), staging.clone(), stage * self.slot_bytes);
        let (result, sealer) = tokio::task::spawn_blocking(move || {
            let mut sealer = sealer;
            let r = staging.with_mut(at..at + sealed_len, |buf| {
                let TransferKind::Read(reader) = &t.kind else {
                    return Err(ErrorCode::UnknownTransfer);
                };
                reader
                    .read_into(start, &mut buf[HEADER_LEN..HEADER_LEN + len])
                    .map_err(store_code)?;
                sealer.seal(placement, buf).map_err(|e| {
                    debug!(error = %e, "sealing failed");
                    ErrorCode::Internal
                })
            });
            (r, sealer)
        })
        .await
        .map_err(|_| ErrorCode::Internal)?;
        let n = result.map_err(|_| ErrorCode::Internal)??;
        self.t.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok((n, sealer))
    }
}

/// A staging slot whose write completed, or why the session is over.
fn written(c: Completion) -> Result<usize, Failure> {
    match (c.kind, c.status) {
        (CompletionKind::Write, Ok(())) => Ok(c.id.0 as usize),
        (kind, status) => {
            debug!(?kind, ?status, "RDMA write failed");
            Err(ErrorCode::Cancelled.into())
        }
    }
}
