//! Every call into libibverbs (through `rdma-sys`), each behind a small safe function or an
//! owning handle whose `Drop` releases the object. No raw pointer leaves this file.
//!
//! The owners in `device.rs`, `mr.rs`, `qp.rs` and `cq.rs` build on these handles. Lifetimes
//! follow the verbs object graph through `Arc`s: a protection domain keeps its context, a
//! memory region and a queue pair keep their protection domain, a queue pair keeps its
//! completion queue, which keeps its channel; so nothing is destroyed while something built
//! on it lives. Registered memory is lent out by range ([`MrLease`]); a lease posted to the
//! device moves into the queue pair's in-flight table and comes back only with the polled
//! completion ([`QpHandle::complete`]), so the CPU never touches memory the device may still
//! read or write.

// The one module of libtransport allowed to use `unsafe` (STYLE §6): libibverbs is a C
// library, and every object it hands out is a raw pointer.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rdma_sys as ffi;
use tokio::io::unix::AsyncFd;

/// `IBV_LINK_LAYER_ETHERNET` (a `#define` bindgen does not carry).
pub(super) const LINK_LAYER_ETHERNET: u8 = 2;
/// `IBV_LINK_LAYER_INFINIBAND`.
pub(super) const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_PORT_ACTIVE`.
pub(super) const PORT_ACTIVE: u32 = ffi::ibv_port_state::IBV_PORT_ACTIVE;

/// The list of RDMA devices.
pub(super) struct DeviceList {
    list: NonNull<*mut ffi::ibv_device>,
    len: usize,
}

impl DeviceList {
    /// The devices, or the error libibverbs reports (`ENOSYS` without kernel support).
    pub(super) fn get() -> io::Result<Self> {
        let mut n: std::os::raw::c_int = 0;
        // SAFETY: `n` is a valid out-pointer for the call; the returned array (if any) is
        // owned by us until `ibv_free_device_list` in `Drop`.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        let list = NonNull::new(list).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            list,
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn device(&self, index: usize) -> Option<NonNull<ffi::ibv_device>> {
        if index >= self.len {
            return None;
        }
        // SAFETY: the array holds `len` valid device pointers (NULL-terminated after them)
        // while the list lives, and `index < len`.
        NonNull::new(unsafe { *self.list.as_ptr().add(index) })
    }

    /// The kernel's name of device `index`.
    pub(super) fn name(&self, index: usize) -> Option<String> {
        let device = self.device(index)?;
        // SAFETY: `device` is valid while the list lives; the name is a NUL-terminated
        // string owned by the device, copied out before we return.
        let name = unsafe { ffi::ibv_get_device_name(device.as_ptr()) };
        if name.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, as above.
        Some(
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The node GUID of device `index`.
    pub(super) fn guid(&self, index: usize) -> Option<u64> {
        let device = self.device(index)?;
        // SAFETY: `device` is valid while the list lives.
        Some(u64::from_be(unsafe {
            ffi::ibv_get_device_guid(device.as_ptr())
        }))
    }

    /// Opens device `index`.
    pub(super) fn open(&self, index: usize) -> io::Result<Context> {
        let device = self
            .device(index)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // SAFETY: `device` is valid while the list lives; the context stays valid after the
        // list is freed (libibverbs keeps the device referenced by the context).
        let ctx = unsafe { ffi::ibv_open_device(device.as_ptr()) };
        NonNull::new(ctx)
            .map(|ptr| Context { ptr })
            .ok_or_else(io::Error::last_os_error)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once; contexts
        // opened from it stay valid.
        unsafe { ffi::ibv_free_device_list(self.list.as_ptr()) };
    }
}

/// An open device (`ibv_context`).
pub(super) struct Context {
    ptr: NonNull<ffi::ibv_context>,
}

// SAFETY: libibverbs objects may be used from any thread; its calls are thread-safe.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// What `ibv_query_device` says that we use.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeviceAttr {
    pub(super) phys_port_cnt: u8,
    pub(super) max_qp_wr: u32,
    pub(super) max_cqe: u32,
    pub(super) max_mr_size: u64,
}

/// What `ibv_query_port` says that we use.
#[derive(Debug, Clone, Copy)]
pub(super) struct PortAttr {
    pub(super) state: u32,
    /// `ibv_mtu` (1 = 256 bytes ... 5 = 4096 bytes).
    pub(super) active_mtu: u32,
    pub(super) lid: u16,
    pub(super) link_layer: u8,
    pub(super) max_msg_sz: u32,
}

impl Context {
    pub(super) fn query_device(&self) -> io::Result<DeviceAttr> {
        let mut attr = std::mem::MaybeUninit::<ffi::ibv_device_attr>::zeroed();
        // SAFETY: the context is open; `attr` is writable memory of the right type.
        let rc = unsafe { ffi::ibv_query_device(self.ptr.as_ptr(), attr.as_mut_ptr()) };
        check(rc)?;
        // SAFETY: the call succeeded and filled `attr` (a plain C struct, all-zero valid too).
        let attr = unsafe { attr.assume_init() };
        Ok(DeviceAttr {
            phys_port_cnt: attr.phys_port_cnt,
            max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
            max_cqe: u32::try_from(attr.max_cqe).unwrap_or(0),
            max_mr_size: attr.max_mr_size,
        })
    }

    pub(super) fn query_port(&self, port: u8) -> io::Result<PortAttr> {
        let mut attr = std::mem::MaybeUninit::<ffi::ibv_port_attr>::zeroed();
        // SAFETY: the context is open; `attr` is zeroed writable memory of the right type
        // (the inline `ibv_query_port` passes its size to the provider).
        let rc = unsafe { ffi::___ibv_query_port(self.ptr.as_ptr(), port, attr.as_mut_ptr()) };
        check(rc)?;
        // SAFETY: the call succeeded and filled `attr`.
        let attr = unsafe { attr.assume_init() };
        Ok(PortAttr {
            state: attr.state,
            active_mtu: attr.active_mtu,
            lid: attr.lid,
            link_layer: attr.link_layer,
            max_msg_sz: attr.max_msg_sz,
        })
    }

    pub(super) fn query_gid(&self, port: u8, index: u8) -> io::Result<[u8; 16]> {
        let mut gid = ffi::ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open; `gid` is a valid out-pointer.
        let rc = unsafe { ffi::ibv_query_gid(self.ptr.as_ptr(), port, i32::from(index), &mut gid) };
        check(rc)?;
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by `ibv_open_device`, closed once, after everything built on it
        // (those hold an `Arc<Context>`).
        unsafe { ffi::ibv_close_device(self.ptr.as_ptr()) };
    }
}

/// A protection domain.
pub(super) struct ProtectionDomain {
    ptr: NonNull<ffi::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub(super) fn alloc(ctx: &Arc<Context>) -> io::Result<Self> {
        // SAFETY: the context is open (we hold it).
        let pd = unsafe { ffi::ibv_alloc_pd(ctx.ptr.as_ptr()) };
        Ok(Self {
            ptr: NonNull::new(pd).ok_or_else(io::Error::last_os_error)?,
            ctx: Arc::clone(ctx),
        })
    }

    pub(super) fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_pd`, freed once, after its regions and queue pairs
        // (they hold an `Arc<ProtectionDomain>`).
        unsafe { ffi::ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

/// A completion channel: the file descriptor that wakes us when a completion arrives.
pub(super) struct CompChannel {
    ptr: NonNull<ffi::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for CompChannel {}
// SAFETY: as above.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    /// Creates a channel whose descriptor does not block.
    pub(super) fn create(ctx: &Arc<Context>) -> io::Result<Self> {
        // SAFETY: the context is open.
        let ch = unsafe { ffi::ibv_create_comp_channel(ctx.ptr.as_ptr()) };
        let channel = Self {
            ptr: NonNull::new(ch).ok_or_else(io::Error::last_os_error)?,
            _ctx: Arc::clone(ctx),
        };
        // SAFETY: the descriptor is open for as long as the channel; we only borrow it.
        let fd = unsafe { BorrowedFd::borrow_raw(channel.fd()) };
        let flags = rustix::fs::fcntl_getfl(fd)?;
        rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(channel)
    }

    /// The channel's descriptor (owned by the channel).
    fn fd(&self) -> RawFd {
        // SAFETY: the channel is valid; `fd` is a plain field.
        unsafe { (*self.ptr.as_ptr()).fd }
    }

    /// Registers the channel's descriptor with the tokio reactor (which must be running).
    pub(super) fn register(self: &Arc<Self>) -> io::Result<AsyncFd<ChannelFd>> {
        // SAFETY: the descriptor is open while the channel lives, and `ChannelFd` keeps the
        // channel alive for as long as the `AsyncFd`; it always returns the same descriptor.
        unsafe { AsyncFd::register(ChannelFd(Arc::clone(self))) }.map_err(io::Error::from)
    }
}

/// A completion channel's descriptor, for the reactor (the channel owns it).
pub(super) struct ChannelFd(Arc<CompChannel>);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd()
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_comp_channel`, destroyed once, after its completion
        // queue (which holds an `Arc<CompChannel>`).
        unsafe { ffi::ibv_destroy_comp_channel(self.ptr.as_ptr()) };
    }
}

/// A completion queue, bound to a channel.
pub(super) struct Cq {
    ptr: NonNull<ffi::ibv_cq>,
    channel: Arc<CompChannel>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

/// A polled work completion: plain data. Only this module makes them, so one is proof that
/// the device finished the work request (see [`QpHandle::complete`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkCompletion {
    pub(super) wr_id: u64,
    /// `ibv_wc_status`.
    pub(super) status: u32,
    /// `ibv_wc_opcode` (valid only when the status is success).
    pub(super) opcode: u32,
    pub(super) byte_len: u32,
    pub(super) imm: Option<u32>,
    pub(super) vendor_err: u32,
    qp_num: u32,
}

/// `IBV_WC_RECV`: a SEND landed in a receive.
#[cfg(test)]
pub(super) const OPCODE_RECV: u32 = ffi::ibv_wc_opcode::IBV_WC_RECV;
/// `IBV_WC_RECV_RDMA_WITH_IMM`: a WRITE_WITH_IMM consumed a receive.
pub(super) const OPCODE_RECV_RDMA_WITH_IMM: u32 = ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;

/// A completion as the device would report it, for tests of the mapping above `sys`.
#[cfg(test)]
pub(super) fn test_completion(
    status: u32,
    opcode: u32,
    byte_len: u32,
    imm: Option<u32>,
) -> WorkCompletion {
    WorkCompletion {
        wr_id: 1,
        status,
        opcode,
        byte_len,
        imm,
        vendor_err: 0,
        qp_num: 0,
    }
}

/// `ibv_wc_status` values we tell apart.
pub(super) mod wc_status {
    use rdma_sys::ibv_wc_status as s;

    pub(in crate::transport::rdma) const SUCCESS: u32 = s::IBV_WC_SUCCESS;
    pub(in crate::transport::rdma) const LOC_LEN_ERR: u32 = s::IBV_WC_LOC_LEN_ERR;
    pub(in crate::transport::rdma) const LOC_PROT_ERR: u32 = s::IBV_WC_LOC_PROT_ERR;
    pub(in crate::transport::rdma) const WR_FLUSH_ERR: u32 = s::IBV_WC_WR_FLUSH_ERR;
    pub(in crate::transport::rdma) const REM_INV_REQ_ERR: u32 = s::IBV_WC_REM_INV_REQ_ERR;
    pub(in crate::transport::rdma) const REM_ACCESS_ERR: u32 = s::IBV_WC_REM_ACCESS_ERR;
    pub(in crate::transport::rdma) const REM_OP_ERR: u32 = s::IBV_WC_REM_OP_ERR;
    pub(in crate::transport::rdma) const RETRY_EXC_ERR: u32 = s::IBV_WC_RETRY_EXC_ERR;
    pub(in crate::transport::rdma) const RNR_RETRY_EXC_ERR: u32 = s::IBV_WC_RNR_RETRY_EXC_ERR;
}

impl Cq {
    pub(super) fn create(
        ctx: &Arc<Context>,
        channel: &Arc<CompChannel>,
        entries: u32,
    ) -> io::Result<Self> {
        let entries = i32::try_from(entries).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the context and channel are open (we hold both).
        let cq = unsafe {
            ffi::ibv_create_cq(
                ctx.ptr.as_ptr(),
                entries,
                ptr::null_mut(),
                channel.ptr.as_ptr(),
                0,
            )
        };
        Ok(Self {
            ptr: NonNull::new(cq).ok_or_else(io::Error::last_os_error)?,
            channel: Arc::clone(channel),
        })
    }

    /// Appends up to `max` completions to `out`; returns how many.
    pub(super) fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> io::Result<usize> {
        let max = max.min(POLL_BATCH);
        let mut wcs: [std::mem::MaybeUninit<ffi::ibv_wc>; POLL_BATCH] =
            [const { std::mem::MaybeUninit::uninit() }; POLL_BATCH];
        // SAFETY: the CQ is valid; `wcs` has room for `max` entries.
        let n = unsafe {
            ffi::ibv_poll_cq(
                self.ptr.as_ptr(),
                max as i32,
                wcs.as_mut_ptr().cast::<ffi::ibv_wc>(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::other("ibv_poll_cq failed"))?;
        for wc in &wcs[..n.min(max)] {
            // SAFETY: the provider filled the first `n` entries.
            let wc = unsafe { wc.assume_init_ref() };
            let with_imm = wc.wc_flags & ffi::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            // SAFETY: both members of the union are `u32`, so any contents are a valid value;
            // with IBV_WC_WITH_IMM set it is the immediate, in network byte order.
            let raw_imm = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
            out.push(WorkCompletion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                imm: with_imm.then(|| u32::from_be(raw_imm)),
                vendor_err: wc.vendor_err,
                qp_num: wc.qp_num,
            });
        }
        Ok(n)
    }

    /// Asks for an event on the channel at the next completion.
    pub(super) fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ is valid.
        check(unsafe { ffi::ibv_req_notify_cq(self.ptr.as_ptr(), 0) })
    }

    /// Takes (and acknowledges) one event from the channel: `Ok(false)` if there is none.
    pub(super) fn take_event(&self) -> io::Result<bool> {
        let mut cq = ptr::null_mut();
        let mut cq_ctx = ptr::null_mut();
        // SAFETY: the channel is valid and non-blocking; the out-pointers are valid.
        let rc = unsafe { ffi::ibv_get_cq_event(self.channel.ptr.as_ptr(), &mut cq, &mut cq_ctx) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // SAFETY: `cq` is the CQ the event was for (ours: one CQ per channel); every event is
        // acknowledged once, so `ibv_destroy_cq` does not wait forever.
        unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_cq`, destroyed once, after its queue pair (which
        // holds an `Arc<Cq>`); all events were acknowledged.
        unsafe { ffi::ibv_destroy_cq(self.ptr.as_ptr()) };
    }
}

/// Registered memory: owns its buffer, deregisters before freeing it.
pub(super) struct Mr {
    mr: NonNull<ffi::ibv_mr>,
    buf: NonNull<u8>,
    len: usize,
    /// Ranges lent out (to `with_range_mut` or a posted work request).
    held: Mutex<RangeSet>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: the buffer is only reached through range locks (`held`); the verbs objects may be
// used from any thread.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// The range is held by someone else.
#[derive(Debug)]
pub(super) struct Busy;

impl Mr {
    /// Registers `len` zeroed bytes (at least one) with local and remote write access.
    pub(super) fn register(pd: &Arc<ProtectionDomain>, len: usize) -> io::Result<Self> {
        let alloc = len.max(1);
        let buf: Box<[u8]> = vec![0u8; alloc].into_boxed_slice();
        let buf = NonNull::from(Box::leak(buf)).cast::<u8>();
        let access = (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        // SAFETY: the PD is valid; `buf` is valid for `alloc` bytes and stays allocated until
        // after `ibv_dereg_mr` in `Drop`, so the device never accesses freed memory.
        let mr =
            unsafe { ffi::ibv_reg_mr(pd.ptr.as_ptr(), buf.as_ptr().cast(), alloc, access as i32) };
        let Some(mr) = NonNull::new(mr) else {
            let e = io::Error::last_os_error();
            // SAFETY: `buf` came from `Box::leak` of a boxed slice of `alloc` bytes and was
            // never registered.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(buf.as_ptr(), alloc)) });
            return Err(e);
        };
        Ok(Self {
            mr,
            buf,
            len: alloc,
            held: Mutex::new(RangeSet::default()),
            pd: Arc::clone(pd),
        })
    }

    pub(super) fn lkey(&self) -> u32 {
        // SAFETY: the MR is valid; `lkey` is a plain field.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub(super) fn rkey(&self) -> u32 {
        // SAFETY: the MR is valid; `rkey` is a plain field.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    /// The address the peer writes to (our virtual address of the buffer).
    pub(super) fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    pub(super) fn same_pd(&self, pd: &Arc<ProtectionDomain>) -> bool {
        Arc::ptr_eq(&self.pd, pd)
    }

    /// Runs `f` on `range` (within the buffer) while holding it exclusively.
    pub(super) fn with_range_mut<R>(
        &self,
        range: Range<usize>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, Busy> {
        if range.start > range.end || range.end > self.len {
            return Err(Busy);
        }
        if !self.lock().try_insert(&range) {
            return Err(Busy);
        }
        let _release = Release {
            mr: self,
            range: range.clone(),
        };
        // SAFETY: `range` lies within the buffer, which lives as long as `self`; the range
        // lock gives this closure the only CPU access to it, and no posted work request of
        // ours uses it (those hold their range until the completion). A peer writing into it
        // without a grant would race with us; bytes have no invalid values and the sealing
        // above detects the damage.
        let slice = unsafe {
            std::slice::from_raw_parts_mut(self.buf.as_ptr().add(range.start), range.len())
        };
        Ok(f(slice))
    }

    /// Lends `range` out for a work request.
    pub(super) fn lease(self: &Arc<Self>, range: Range<usize>) -> Result<MrLease, Busy> {
        if range.start > range.end || range.end > self.len || range.len() > u32::MAX as usize {
            return Err(Busy);
        }
        if !self.lock().try_insert(&range) {
            return Err(Busy);
        }
        Ok(MrLease {
            mr: Arc::clone(self),
            range,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RangeSet> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by `ibv_reg_mr`, deregistered once; no work request uses it
        // (posted leases hold an `Arc<Mr>`).
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            // The device may still reach the buffer: leak it rather than free it.
            tracing::error!(
                error = rc,
                "ibv_dereg_mr failed; leaking the region's buffer"
            );
            return;
        }
        // SAFETY: `buf` came from `Box::leak` of a boxed slice of `len` bytes; after the
        // deregistration the device can no longer reach it.
        drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(self.buf.as_ptr(), self.len)) });
    }
}

/// Gives a range back when `with_range_mut` ends (also on a panic in the closure).
struct Release<'a> {
    mr: &'a Mr,
    range: Range<usize>,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.mr.lock().remove(&self.range);
    }
}

/// A range of a region lent out for a work request.
pub(super) struct MrLease {
    mr: Arc<Mr>,
    range: Range<usize>,
}

impl MrLease {
    fn sge(&self) -> ffi::ibv_sge {
        ffi::ibv_sge {
            addr: self.mr.addr() + self.range.start as u64,
            // `lease` refuses ranges longer than u32::MAX.
            length: self.range.len() as u32,
            lkey: self.mr.lkey(),
        }
    }
}

impl Drop for MrLease {
    fn drop(&mut self) {
        self.mr.lock().remove(&self.range);
    }
}

/// What a posted work request was, as its owner labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WorkTag {
    pub(super) id: u64,
    pub(super) kind: PostKind,
}

/// The kind of a posted work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PostKind {
    WriteImm,
    Send,
    Recv,
}

/// The attributes of a queue pair's transitions.
#[derive(Debug, Clone, Copy)]
pub(super) struct RtrAttr {
    pub(super) path_mtu: u32,
    pub(super) dest_qp_num: u32,
    pub(super) rq_psn: u32,
    pub(super) dlid: u16,
    /// The peer's GID, when the path needs a global route header (RoCE, or across subnets).
    pub(super) dgid: Option<[u8; 16]>,
    pub(super) sgid_index: u8,
    pub(super) port: u8,
    pub(super) min_rnr_timer: u8,
}

/// A reliable-connected queue pair and its in-flight table.
pub(super) struct QpHandle {
    ptr: NonNull<ffi::ibv_qp>,
    in_flight: Mutex<HashMap<u64, (MrLease, WorkTag)>>,
    next_wr_id: AtomicU64,
    _pd: Arc<ProtectionDomain>,
    _cq: Arc<Cq>,
}

// SAFETY: libibverbs objects may be used from any thread; the table has its own lock.
unsafe impl Send for QpHandle {}
// SAFETY: as above.
unsafe impl Sync for QpHandle {}

impl QpHandle {
    /// Creates an RC queue pair (in RESET) whose both queues complete on `cq`.
    pub(super) fn create_rc(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<Cq>,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> io::Result<Self> {
        // SAFETY: all-zero is a valid `ibv_qp_init_attr` (null pointers, zero counts).
        let mut attr: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.ptr.as_ptr();
        attr.recv_cq = cq.ptr.as_ptr();
        attr.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 1;
        attr.cap.max_send_wr = max_send_wr;
        attr.cap.max_recv_wr = max_recv_wr;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        // SAFETY: the PD and CQ are valid (we keep both); `attr` is initialised.
        let qp = unsafe { ffi::ibv_create_qp(pd.ptr.as_ptr(), &mut attr) };
        Ok(Self {
            ptr: NonNull::new(qp).ok_or_else(io::Error::last_os_error)?,
            in_flight: Mutex::new(HashMap::new()),
            next_wr_id: AtomicU64::new(1),
            _pd: Arc::clone(pd),
            _cq: Arc::clone(cq),
        })
    }

    pub(super) fn qp_num(&self) -> u32 {
        // SAFETY: the QP is valid; `qp_num` is a plain field.
        unsafe { (*self.ptr.as_ptr()).qp_num }
    }

    /// RESET -> INIT: port, and local and remote write access.
    pub(super) fn modify_to_init(&self, port: u8) -> io::Result<()> {
        let mut attr = zeroed_qp_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        use ffi::ibv_qp_attr_mask as m;
        self.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
        )
    }

    /// INIT -> RTR: the peer's queue pair and path.
    pub(super) fn modify_to_rtr(&self, rtr: &RtrAttr) -> io::Result<()> {
        let mut attr = zeroed_qp_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = rtr.path_mtu;
        attr.dest_qp_num = rtr.dest_qp_num;
        attr.rq_psn = rtr.rq_psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = rtr.min_rnr_timer;
        attr.ah_attr.dlid = rtr.dlid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = rtr.port;
        if let Some(dgid) = rtr.dgid {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: dgid };
            attr.ah_attr.grh.sgid_index = rtr.sgid_index;
            attr.ah_attr.grh.hop_limit = 64;
        }
        use ffi::ibv_qp_attr_mask as m;
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
        )
    }

    /// RTR -> RTS.
    pub(super) fn modify_to_rts(
        &self,
        sq_psn: u32,
        timeout: u8,
        retry_cnt: u8,
        rnr_retry: u8,
    ) -> io::Result<()> {
        let mut attr = zeroed_qp_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        attr.sq_psn = sq_psn;
        attr.timeout = timeout;
        attr.retry_cnt = retry_cnt;
        attr.rnr_retry = rnr_retry;
        attr.max_rd_atomic = 1;
        use ffi::ibv_qp_attr_mask as m;
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Any state -> ERR: the device flushes every outstanding work request.
    pub(super) fn modify_to_error(&self) -> io::Result<()> {
        let mut attr = zeroed_qp_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut attr, ffi::ibv_qp_attr_mask::IBV_QP_STATE)
    }

    fn modify(&self, attr: &mut ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask) -> io::Result<()> {
        // SAFETY: the QP is valid; `attr` is initialised for every field `mask` names.
        check(unsafe { ffi::ibv_modify_qp(self.ptr.as_ptr(), attr, mask.0 as i32) })
    }

    /// Posts RDMA WRITE WITH IMMEDIATE of `src` to the peer's `remote_addr`. On success the
    /// lease stays in the in-flight table until its completion.
    pub(super) fn post_write_imm(
        &self,
        tag: WorkTag,
        src: MrLease,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), (io::Error, MrLease)> {
        let mut sge = src.sge();
        // SAFETY: all-zero is a valid `ibv_send_wr` (null pointers, zero fields, unions of
        // plain data).
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        wr.wr.rdma = ffi::rdma_t { remote_addr, rkey };
        self.post_send_wr(tag, src, &mut wr)
    }

    /// Posts SEND of `src`.
    pub(super) fn post_send(&self, tag: WorkTag, src: MrLease) -> Result<(), (io::Error, MrLease)> {
        let mut sge = src.sge();
        // SAFETY: all-zero is a valid `ibv_send_wr`, as above.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        self.post_send_wr(tag, src, &mut wr)
    }

    fn post_send_wr(
        &self,
        tag: WorkTag,
        src: MrLease,
        wr: &mut ffi::ibv_send_wr,
    ) -> Result<(), (io::Error, MrLease)> {
        let wr_id = self.next_wr_id.fetch_add(1, Ordering::Relaxed);
        wr.wr_id = wr_id;
        // The lease goes into the table before the device can see the request, so the
        // completion always finds it.
        let mut table = self.table();
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and its one SGE live across the call (the provider
        // copies them); the SGE's memory is registered and held by `src` until the
        // completion is polled, because `src` moves into the in-flight table.
        let rc = unsafe { ffi::ibv_post_send(self.ptr.as_ptr(), wr, &mut bad) };
        if rc != 0 {
            return Err((io::Error::from_raw_os_error(rc), src));
        }
        table.insert(wr_id, (src, tag));
        Ok(())
    }

    /// Posts a receive into `dst`.
    pub(super) fn post_recv(&self, tag: WorkTag, dst: MrLease) -> Result<(), (io::Error, MrLease)> {
        let wr_id = self.next_wr_id.fetch_add(1, Ordering::Relaxed);
        let mut sge = dst.sge();
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut table = self.table();
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and its SGE live across the call; the SGE's memory is
        // registered and held by `dst` until the completion is polled (it moves into the
        // in-flight table).
        let rc = unsafe { ffi::ibv_post_recv(self.ptr.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err((io::Error::from_raw_os_error(rc), dst));
        }
        table.insert(wr_id, (dst, tag));
        Ok(())
    }

    /// Takes back the lease of a completed work request, with its tag.
    pub(super) fn complete(&self, wc: &WorkCompletion) -> Option<(MrLease, WorkTag)> {
        if wc.qp_num != self.qp_num() {
            return None;
        }
        self.table().remove(&wc.wr_id)
    }

    /// Work requests posted and not completed.
    pub(super) fn in_flight(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<u64, (MrLease, WorkTag)>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for QpHandle {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp`, destroyed once; after this the device no longer
        // touches the in-flight buffers, whose leases drop with the table afterwards.
        unsafe { ffi::ibv_destroy_qp(self.ptr.as_ptr()) };
    }
}

fn zeroed_qp_attr() -> ffi::ibv_qp_attr {
    // SAFETY: all-zero is a valid `ibv_qp_attr` (plain integers and unions of plain data).
    unsafe { std::mem::zeroed() }
}

fn check(rc: std::os::raw::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        // Verbs return a positive errno, or -1 with errno set.
        rc if rc > 0 => Err(io::Error::from_raw_os_error(rc)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Disjoint held ranges, by start.
#[derive(Debug, Default)]
struct RangeSet {
    held: BTreeMap<usize, usize>,
}

impl RangeSet {
    /// Holds `range` unless it overlaps a held one (empty ranges never conflict).
    fn try_insert(&mut self, range: &Range<usize>) -> bool {
        if range.is_empty() {
            return true;
        }
        if let Some((_, &end)) = self.held.range(..range.end).next_back()
            && end > range.start
        {
            return false;
        }
        self.held.insert(range.start, range.end);
        true
    }

    fn remove(&mut self, range: &Range<usize>) {
        if !range.is_empty() {
            self.held.remove(&range.start);
        }
    }
}

/// Completions taken per `ibv_poll_cq` call.
const POLL_BATCH: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_refuses_overlaps() {
        let mut s = RangeSet::default();
        assert!(s.try_insert(&(10..20)));
        assert!(!s.try_insert(&(15..16)));
        assert!(!s.try_insert(&(0..11)));
        assert!(!s.try_insert(&(19..30)));
        assert!(s.try_insert(&(20..30)));
        assert!(s.try_insert(&(0..10)));
        assert!(s.try_insert(&(15..15)), "empty ranges never conflict");
        s.remove(&(10..20));
        assert!(s.try_insert(&(12..18)));
    }

    /// Hardware discovery on a machine without RDMA: an error from libibverbs, not a panic.
    #[test]
    fn device_list_without_devices_is_an_error_or_empty() {
        match DeviceList::get() {
            Ok(list) => assert_eq!(list.len(), 0, "this machine has no RDMA devices"),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}
