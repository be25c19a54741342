//! The ibverbs hardware device (cargo feature `rdma`): one reliable-connected queue pair on
//! one port of an RDMA device (InfiniBand or RoCE, soft-RoCE `rxe` included), behind
//! [`Verbs`]. Same semantics as the [software device](super::soft), with two differences
//! the hardware imposes: a refused remote access does not say why
//! ([`RemoteAccessError::Unspecified`]), and a peer's write into a range our CPU holds is not
//! detected (the seal above detects the damage).
//!
//! Connection parameters (`local_info`, 33 bytes, big-endian):
//! `"TDHV" | version u8 = 1 | qpn u32 | psn u32 | lid u16 | active mtu u8 | link layer u8 |
//! gid (16 bytes)`.
//!
//! Registered memory is pinned: the process's `RLIMIT_MEMLOCK` must allow the regions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::cq::{self, CompletionQueue};
use super::device::Device;
use super::qp::{Init, QueuePair, ReadyToSend};
use super::sys::{self, PostKind, QpHandle, RtrAttr, WorkTag};
use super::verbs::{
    BrokenReason, Completion, CompletionKind, InfoError, Region, RemoteRegion, Verbs, VerbsError,
    WorkId, span, write_target,
};

pub use super::mr::HardwareRegion;

#[cfg(doc)]
use super::verbs::{CompletionError, RemoteAccessError};

/// Settings of a [`HardwareVerbs`] device. The defaults: the first device, port 1, GID
/// index 0, 256 sends and 1024 receives outstanding, regions up to 1 GiB.
#[derive(Debug, Clone)]
pub struct HardwareConfig {
    device: Option<String>,
    port: u8,
    gid_index: u8,
    max_send_wr: u32,
    max_recv_wr: u32,
    max_region_bytes: usize,
}

impl Default for HardwareConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: 0,
            max_send_wr: 256,
            max_recv_wr: 1024,
            max_region_bytes: 1 << 30,
        }
    }
}

impl HardwareConfig {
    /// The device to open by its kernel name (`mlx5_0`, `rxe0`); the first one by default.
    pub fn device(&mut self, name: impl Into<String>) -> &mut Self {
        self.device = Some(name.into());
        self
    }

    /// The port (from 1).
    pub fn port(&mut self, port: u8) -> Result<&mut Self, VerbsError> {
        if port == 0 {
            return Err(VerbsError::InvalidConfig("ports are numbered from 1"));
        }
        self.port = port;
        Ok(self)
    }

    /// The GID index for RoCE (see `show_gids`; RoCE v2 over IPv4 is often 1 or 3).
    pub fn gid_index(&mut self, index: u8) -> &mut Self {
        self.gid_index = index;
        self
    }

    /// Sends and writes outstanding, at most the device's `max_qp_wr`.
    pub fn max_send_wr(&mut self, depth: u32) -> Result<&mut Self, VerbsError> {
        self.max_send_wr = depth_in_range(depth)?;
        Ok(self)
    }

    /// Receives outstanding, at most the device's `max_qp_wr`.
    pub fn max_recv_wr(&mut self, depth: u32) -> Result<&mut Self, VerbsError> {
        self.max_recv_wr = depth_in_range(depth)?;
        Ok(self)
    }

    /// The largest region.
    pub fn max_region_bytes(&mut self, bytes: usize) -> Result<&mut Self, VerbsError> {
        if bytes == 0 {
            return Err(VerbsError::InvalidConfig(
                "max_region_bytes must be positive",
            ));
        }
        self.max_region_bytes = bytes;
        Ok(self)
    }
}

/// An RDMA device with one RC queue pair. Dropping it moves the queue pair to the error
/// state (the peer's outstanding work fails) and releases the device's objects.
pub struct HardwareVerbs {
    inner: Mutex<Inner>,
    handle: Arc<QpHandle>,
    cq: CompletionQueue,
    local: Info,
    depths: (usize, usize),
    max_region_bytes: usize,
    /// Declared last: dropped after the queue pair (which also keeps what it needs alive).
    device: Device,
}

struct Inner {
    qp: Slot,
    broken: Option<BrokenReason>,
    /// Completions taken from the device and not yet handed out.
    pending: VecDeque<Completion>,
    /// Posted and not yet handed out by `poll`, per queue.
    send_outstanding: usize,
    recv_outstanding: usize,
}

enum Slot {
    Init(QueuePair<Init>),
    Ready(QueuePair<ReadyToSend>),
    /// A transition failed half-way; the queue pair is in the error state.
    Gone,
}

impl HardwareVerbs {
    /// Opens the device and creates the queue pair (in INIT, so receives may be posted
    /// before connecting). Must run inside a tokio runtime.
    pub async fn open(config: Arc<HardwareConfig>) -> Result<Self, VerbsError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(VerbsError::InvalidConfig(
                "the hardware device needs a tokio runtime for its completion channel",
            ));
        }
        let device = Device::open(config.device.as_deref(), config.port, config.gid_index)?;
        let max_wr = device.attr.max_qp_wr.max(1);
        let (send, recv) = (
            config.max_send_wr.min(max_wr),
            config.max_recv_wr.min(max_wr),
        );
        let entries = (send + recv).min(device.attr.max_cqe.max(1));
        let dev_err = |op| move |source| VerbsError::Device { op, source };
        let cq = CompletionQueue::new(device.context(), entries)
            .map_err(dev_err("creating the completion queue"))?;
        let qp = QueuePair::create(&device.pd, cq.raw(), send, recv)
            .map_err(dev_err("creating the queue pair"))?
            .init(device.port)
            .map_err(|(_, source)| VerbsError::Device {
                op: "moving the queue pair to INIT",
                source,
            })?;
        let psn = u32::from_be_bytes(super::random()?) & 0x00ff_ffff;
        let local = Info {
            qpn: qp.qp_num(),
            psn,
            lid: device.port_attr.lid,
            mtu: device.port_attr.active_mtu as u8,
            link_layer: device.port_attr.link_layer,
            gid: device.gid,
        };
        let max_region_bytes = config
            .max_region_bytes
            .min(usize::try_from(device.attr.max_mr_size).unwrap_or(usize::MAX));
        Ok(Self {
            handle: Arc::clone(qp.handle()),
            inner: Mutex::new(Inner {
                qp: Slot::Init(qp),
                broken: None,
                pending: VecDeque::new(),
                send_outstanding: 0,
                recv_outstanding: 0,
            }),
            cq,
            local,
            depths: (send as usize, recv as usize),
            max_region_bytes,
            device,
        })
    }

    /// Moves the queue pair to the error state: outstanding work requests on both sides
    /// complete with [`CompletionError::Flushed`].
    pub fn disconnect(&self) {
        let mut inner = self.lock();
        inner.broken.get_or_insert(BrokenReason::Disconnected);
        if let Err(e) = self.handle.modify_to_error() {
            tracing::warn!(error = %e, "could not move the RDMA queue pair to the error state");
        }
    }

    /// The device's kernel name.
    pub fn device_name(&self) -> &str {
        &self.device.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_region(&self, region: &HardwareRegion) -> Result<(), VerbsError> {
        if region.mr.same_pd(&self.device.pd) {
            Ok(())
        } else {
            Err(VerbsError::ForeignRegion)
        }
    }

    fn check_message(&self, len: usize) -> Result<(), VerbsError> {
        let max = self.device.port_attr.max_msg_sz as usize;
        if len > max {
            return Err(VerbsError::MessageTooLarge { len, max });
        }
        Ok(())
    }

    /// Posts a send-queue work request with `post` once the queue pair may send.
    fn post_send_queue(
        &self,
        post: impl FnOnce(&QueuePair<ReadyToSend>) -> Result<(), (std::io::Error, sys::MrLease)>,
    ) -> Result<(), VerbsError> {
        let mut inner = self.lock();
        if let Some(why) = &inner.broken {
            return Err(VerbsError::Broken(why.clone()));
        }
        let Slot::Ready(qp) = &inner.qp else {
            return Err(VerbsError::NotConnected);
        };
        if inner.send_outstanding >= self.depths.0 {
            return Err(VerbsError::QueueFull { max: self.depths.0 });
        }
        post(qp).map_err(|(source, _lease)| VerbsError::Device {
            op: "posting a send work request",
            source,
        })?;
        inner.send_outstanding += 1;
        Ok(())
    }
}

impl Verbs for HardwareVerbs {
    type Region = HardwareRegion;

    fn local_info(&self) -> Vec<u8> {
        self.local.encode().to_vec()
    }

    async fn connect(&self, peer: &[u8]) -> Result<(), VerbsError> {
        let peer = Info::decode(peer)?;
        let mut inner = self.lock();
        if let Some(why) = &inner.broken {
            return Err(VerbsError::Broken(why.clone()));
        }
        let qp = match std::mem::replace(&mut inner.qp, Slot::Gone) {
            Slot::Init(qp) => qp,
            other => {
                inner.qp = other;
                return Err(VerbsError::AlreadyConnected);
            }
        };
        let global = self.local.link_layer == sys::LINK_LAYER_ETHERNET || peer.lid == 0;
        let rtr = RtrAttr {
            path_mtu: u32::from(self.local.mtu.min(peer.mtu)),
            dest_qp_num: peer.qpn,
            rq_psn: peer.psn,
            dlid: peer.lid,
            dgid: global.then_some(peer.gid),
            sgid_index: self.device.gid_index,
            port: self.device.port,
            min_rnr_timer: super::qp::MIN_RNR_TIMER,
        };
        let qp = match qp.ready_to_receive(&rtr) {
            Ok(qp) => qp,
            Err((qp, source)) => {
                inner.qp = Slot::Init(qp);
                return Err(VerbsError::Device {
                    op: "moving the queue pair to RTR (check the peer's parameters and the GID index)",
                    source,
                });
            }
        };
        match qp.ready_to_send(self.local.psn) {
            Ok(qp) => {
                inner.qp = Slot::Ready(qp);
                tracing::debug!(device = %self.device.name, "rdma queue pair connected");
                Ok(())
            }
            Err((_, source)) => {
                let _ = self.handle.modify_to_error();
                inner.broken = Some(BrokenReason::Device);
                Err(VerbsError::Device {
                    op: "moving the queue pair to RTS",
                    source,
                })
            }
        }
    }

    fn register(&self, len: usize) -> Result<HardwareRegion, VerbsError> {
        if len > self.max_region_bytes {
            return Err(VerbsError::RegionTooLarge {
                len,
                max: self.max_region_bytes,
            });
        }
        HardwareRegion::register(&self.device.pd, len)
    }

    fn post_recv(
        &self,
        id: WorkId,
        region: &HardwareRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.check_region(region)?;
        let range = span(offset, len, region.len())?;
        let mut inner = self.lock();
        if let Some(why) = &inner.broken {
            return Err(VerbsError::Broken(why.clone()));
        }
        if inner.recv_outstanding >= self.depths.1 {
            return Err(VerbsError::QueueFull { max: self.depths.1 });
        }
        let lease = region.lease(range)?;
        let tag = WorkTag {
            id: id.0,
            kind: PostKind::Recv,
        };
        let posted = match &inner.qp {
            Slot::Init(qp) => qp.post_recv(tag, lease),
            Slot::Ready(qp) => qp.post_recv(tag, lease),
            Slot::Gone => return Err(VerbsError::Broken(BrokenReason::Device)),
        };
        posted.map_err(|(source, _lease)| VerbsError::Device {
            op: "posting a receive",
            source,
        })?;
        inner.recv_outstanding += 1;
        Ok(())
    }

    fn post_write_imm(
        &self,
        id: WorkId,
        src: &HardwareRegion,
        offset: usize,
        len: usize,
        dst: &RemoteRegion,
        dst_offset: u64,
        imm: u32,
    ) -> Result<(), VerbsError> {
        self.check_region(src)?;
        let range = span(offset, len, src.len())?;
        self.check_message(len)?;
        let addr = write_target(dst, dst_offset, len)?;
        let tag = WorkTag {
            id: id.0,
            kind: PostKind::WriteImm,
        };
        let lease = src.lease(range)?;
        self.post_send_queue(|qp| qp.post_write_imm(tag, lease, addr, dst.rkey.0, imm))
    }

    fn post_send(
        &self,
        id: WorkId,
        src: &HardwareRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.check_region(src)?;
        let range = span(offset, len, src.len())?;
        self.check_message(len)?;
        let tag = WorkTag {
            id: id.0,
            kind: PostKind::Send,
        };
        let lease = src.lease(range)?;
        self.post_send_queue(|qp| qp.post_send(tag, lease))
    }

    async fn poll(&self) -> Result<Completion, VerbsError> {
        let device_error = |source| VerbsError::Device {
            op: "polling the completion queue",
            source,
        };
        let mut polled = Vec::new();
        loop {
            {
                // Polling happens under the lock, so completions keep the device's order.
                let mut inner = self.lock();
                if let Some(c) = inner.pending.pop_front() {
                    match c.kind {
                        CompletionKind::Write | CompletionKind::Send => {
                            inner.send_outstanding = inner.send_outstanding.saturating_sub(1);
                        }
                        _ => inner.recv_outstanding = inner.recv_outstanding.saturating_sub(1),
                    }
                    return Ok(c);
                }
                self.cq.poll_into(&mut polled).map_err(device_error)?;
                if polled.is_empty() {
                    // Arm, then look once more: a completion between the two would not wake us.
                    self.cq.arm().map_err(device_error)?;
                    self.cq.poll_into(&mut polled).map_err(device_error)?;
                }
                for wc in polled.drain(..) {
                    // The lease comes back only now: the device is done with the range.
                    let Some((lease, tag)) = self.handle.complete(&wc) else {
                        continue;
                    };
                    drop(lease);
                    let c = cq::completion(tag, &wc);
                    if let Err(e) = &c.status {
                        inner
                            .broken
                            .get_or_insert(BrokenReason::WorkRequestFailed(e.clone()));
                    }
                    inner.pending.push_back(c);
                }
                if !inner.pending.is_empty() {
                    continue;
                }
                if let Some(why) = &inner.broken
                    && inner.send_outstanding == 0
                    && inner.recv_outstanding == 0
                    && self.handle.in_flight() == 0
                {
                    return Err(VerbsError::Broken(why.clone()));
                }
            }
            self.cq.wait().await.map_err(device_error)?;
        }
    }
}

impl Drop for HardwareVerbs {
    fn drop(&mut self) {
        // The peer sees its outstanding work fail rather than hang; our leases come back
        // when the queue pair is destroyed.
        let _ = self.handle.modify_to_error();
    }
}

impl std::fmt::Debug for HardwareVerbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HardwareVerbs")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// A hardware queue pair's connection parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Info {
    qpn: u32,
    psn: u32,
    lid: u16,
    mtu: u8,
    link_layer: u8,
    gid: [u8; 16],
}

impl Info {
    const LEN: usize = 33;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5..9].copy_from_slice(&self.qpn.to_be_bytes());
        out[9..13].copy_from_slice(&self.psn.to_be_bytes());
        out[13..15].copy_from_slice(&self.lid.to_be_bytes());
        out[15] = self.mtu;
        out[16] = self.link_layer;
        out[17..33].copy_from_slice(&self.gid);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, InfoError> {
        if bytes.len() >= 5 && (bytes[0..4] != MAGIC || bytes[4] != VERSION) {
            return Err(InfoError::WrongKind);
        }
        if bytes.len() < Self::LEN {
            return Err(InfoError::Incomplete {
                needed: Self::LEN,
                got: bytes.len(),
            });
        }
        if bytes.len() > Self::LEN {
            return Err(InfoError::TrailingBytes(bytes.len() - Self::LEN));
        }
        let field = |r: Range<usize>| &bytes[r];
        let info = Self {
            qpn: u32::from_be_bytes(
                field(5..9)
                    .try_into()
                    .map_err(|_| InfoError::Invalid("qpn"))?,
            ),
            psn: u32::from_be_bytes(
                field(9..13)
                    .try_into()
                    .map_err(|_| InfoError::Invalid("psn"))?,
            ),
            lid: u16::from_be_bytes(
                field(13..15)
                    .try_into()
                    .map_err(|_| InfoError::Invalid("lid"))?,
            ),
            mtu: bytes[15],
            link_layer: bytes[16],
            gid: field(17..33)
                .try_into()
                .map_err(|_| InfoError::Invalid("gid"))?,
        };
        if info.qpn > 0x00ff_ffff || info.psn > 0x00ff_ffff {
            return Err(InfoError::Invalid(
                "queue pair number or packet sequence number",
            ));
        }
        if !(1..=5).contains(&info.mtu) {
            return Err(InfoError::Invalid("mtu"));
        }
        Ok(info)
    }
}

const MAGIC: [u8; 4] = *b"TDHV";
const VERSION: u8 = 1;

fn depth_in_range(depth: u32) -> Result<u32, VerbsError> {
    if depth == 0 || depth > 1 << 16 {
        return Err(VerbsError::InvalidConfig(
            "queue depths must be between 1 and 65536",
        ));
    }
    Ok(depth)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::rdma::verbs::CompletionError;

    #[test]
    fn info_round_trips_and_refuses_other_kinds() {
        let info = Info {
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            lid: 7,
            mtu: 5,
            link_layer: sys::LINK_LAYER_ETHERNET,
            gid: [9; 16],
        };
        let bytes = info.encode();
        assert_eq!(Info::decode(&bytes), Ok(info));
        assert_eq!(
            Info::decode(&bytes[..20]),
            Err(InfoError::Incomplete {
                needed: 33,
                got: 20
            })
        );
        assert_eq!(Info::decode(b"TDSV\x01\x04"), Err(InfoError::WrongKind));
        let mut bad = bytes;
        bad[15] = 9;
        assert_eq!(Info::decode(&bad), Err(InfoError::Invalid("mtu")));
    }

    /// No device here: opening one fails with a device error, not a panic.
    #[tokio::test]
    async fn open_without_a_device_fails_cleanly() {
        if !super::super::discover().is_empty() {
            return;
        }
        let err = HardwareVerbs::open(Default::default()).await.unwrap_err();
        assert!(matches!(err, VerbsError::Device { .. }), "{err}");
    }

    async fn loopback_pair() -> (HardwareVerbs, HardwareVerbs) {
        let a = HardwareVerbs::open(Default::default()).await.unwrap();
        let b = HardwareVerbs::open(Default::default()).await.unwrap();
        let (ia, ib) = (a.local_info(), b.local_info());
        a.connect(&ib).await.unwrap();
        b.connect(&ia).await.unwrap();
        (a, b)
    }

    async fn next(v: &HardwareVerbs) -> Completion {
        tokio::time::timeout(Duration::from_secs(10), v.poll())
            .await
            .expect("no completion within 10 s")
            .expect("poll failed")
    }

    #[tokio::test]
    #[ignore = "needs RDMA device"]
    async fn hardware_write_imm_and_send_on_one_device() {
        let (a, b) = loopback_pair().await;
        let dst = b.register(1 << 20).unwrap();
        b.post_recv(WorkId(1), &dst, 0, 0).unwrap();
        b.post_recv(WorkId(2), &dst, 1 << 19, 4096).unwrap();
        let src = a.register(1 << 20).unwrap();
        src.with_mut(0..8192, |buf| buf.fill(0xab)).unwrap();
        a.post_write_imm(WorkId(10), &src, 0, 8192, &dst.remote(), 4096, 0xfeed)
            .unwrap();
        assert_eq!(next(&a).await.status, Ok(()));
        let c = next(&b).await;
        assert_eq!(c.id, WorkId(1));
        assert_eq!(
            c.kind,
            CompletionKind::WriteWithImm {
                imm: 0xfeed,
                len: 8192
            }
        );
        assert!(
            dst.with_mut(4096..12288, |b| b.iter().all(|&x| x == 0xab))
                .unwrap()
        );
        a.post_send(WorkId(11), &src, 0, 100).unwrap();
        assert_eq!(next(&a).await.kind, CompletionKind::Send);
        assert_eq!(next(&b).await.kind, CompletionKind::Recv { len: 100 });
    }

    #[tokio::test]
    #[ignore = "needs RDMA device"]
    async fn hardware_refuses_a_wrong_rkey_and_flushes() {
        let (a, b) = loopback_pair().await;
        let dst = b.register(4096).unwrap();
        b.post_recv(WorkId(1), &dst, 0, 0).unwrap();
        let src = a.register(4096).unwrap();
        let mut remote = dst.remote();
        remote.rkey.0 ^= 0x5a5a;
        a.post_write_imm(WorkId(2), &src, 0, 64, &remote, 0, 0)
            .unwrap();
        assert!(matches!(
            next(&a).await.status,
            Err(CompletionError::RemoteAccess(_))
        ));
        assert!(
            dst.with_mut(0..4096, |b| b.iter().all(|&x| x == 0))
                .unwrap()
        );
        a.disconnect();
        assert!(matches!(a.poll().await, Err(VerbsError::Broken(_))));
    }

    #[tokio::test]
    #[ignore = "needs RDMA device"]
    async fn hardware_write_imm_without_a_receive_is_receiver_not_ready() {
        let (a, b) = loopback_pair().await;
        let dst = b.register(4096).unwrap();
        let src = a.register(4096).unwrap();
        a.post_write_imm(WorkId(1), &src, 0, 64, &dst.remote(), 0, 0)
            .unwrap();
        assert_eq!(
            next(&a).await.status,
            Err(CompletionError::ReceiverNotReady)
        );
    }
}
