//! A software RDMA device: the [`Verbs`] semantics between processes over one TCP connection,
//! so tests, benchmarks and the multi-host lab exercise the RDMA protocol on machines without
//! RDMA hardware.
//!
//! It models a fabric, so it does not encrypt: payloads cross the wire as they are in the
//! region (the protocol above seals them, and a capture shows exactly what an RDMA fabric
//! would carry). The random token in [`Verbs::local_info`] only keeps strangers from taking
//! the peer's place on the listener; it is no security boundary.
//!
//! What it models, as an RC queue pair does:
//!
//! * Regions are registered with random rkeys and addresses. A peer's write names an rkey
//!   and an address; a write with an unknown rkey or outside the region is refused with
//!   [`RemoteAccessError`] at the writer, and the memory is not touched.
//! * WRITE_WITH_IMM lands the data, then consumes the receiver's next posted receive for the
//!   `WriteWithImm` completion; with no receive posted it fails with
//!   [`CompletionError::ReceiverNotReady`] (RNR, without retries). SEND lands in the next
//!   posted receive; a SEND longer than it fails ([`CompletionError::RemoteInvalidRequest`]
//!   at the sender, [`CompletionError::LocalLength`] at the receiver).
//! * The writer's completion comes once the peer acknowledged placement. Completions come in
//!   posting order per queue.
//! * A failed work request, a disconnect or a lost connection moves both sides to the error
//!   state: outstanding work completes with [`CompletionError::Flushed`].
//! * Stricter than hardware: a write into a range the receiver's CPU holds (`with_mut`) or a
//!   posted work request uses is refused ([`RemoteAccessError::RangeBusy`]), where hardware
//!   would silently race.
//!
//! Performance: the writer sends header and payload with one vectored write straight from the
//! region, the reader task reads payloads straight into the target range, and neither
//! allocates per request. Memory is bounded: regions have a maximum size and the device a
//! budget of registered bytes; each queue has a maximum depth. The bytes on the wire are
//! described in `soft/wire.rs`.
//!
//! ```no_run
//! # async fn run() -> Result<(), libtransport::transport::rdma::verbs::VerbsError> {
//! use libtransport::transport::rdma::soft::SoftVerbs;
//! use libtransport::transport::rdma::verbs::{Region, Verbs, WorkId};
//!
//! let device = SoftVerbs::bind(Default::default()).await?;
//! let info = device.local_info(); // send to the peer over the control channel
//! # let peer_info = info.clone();
//! let region = device.register(1 << 20)?;
//! device.post_recv(WorkId(1), &region, 0, 0)?;
//! device.connect(&peer_info).await?; // the peer's local_info
//! let completion = device.poll().await?;
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::random;
use crate::transport::rdma::verbs::{
    Completion, CompletionKind, LKey, Region, RemoteRegion, Verbs, VerbsError, WorkId, check_range,
    span, write_target,
};

#[cfg(doc)]
use crate::transport::rdma::verbs::{CompletionError, RemoteAccessError};

mod driver;
mod memory;
mod queue;
mod region;
mod wire;

#[cfg(test)]
mod tests;

use driver::Shared;
use queue::{Depths, QueuePair};
use region::{Lease, RegionInner, RegionTable};
use wire::{Header, Info};

/// Settings of a [`SoftVerbs`] device. The defaults suit one connection over loopback or a
/// lab network: a listener on `127.0.0.1`, regions up to 1 GiB and 1 GiB registered in all,
/// 256 sends and 1024 receives outstanding, 10 s to connect.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
    max_region_bytes: usize,
    max_registered_bytes: usize,
    max_send_wr: usize,
    max_recv_wr: usize,
    connect_timeout: Duration,
}

impl Default for SoftConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise: None,
            max_region_bytes: MAX_REGION_BYTES,
            max_registered_bytes: MAX_REGION_BYTES,
            max_send_wr: 256,
            max_recv_wr: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl SoftConfig {
    /// Where the device listens for its peer (port 0: any free port).
    pub fn bind(&mut self, addr: SocketAddr) -> &mut Self {
        self.bind = addr;
        self
    }

    /// The address the peer should connect to, when it is not the bound one (needed when
    /// binding an unspecified address such as `0.0.0.0`); port 0 means the bound port.
    pub fn advertise(&mut self, addr: SocketAddr) -> &mut Self {
        self.advertise = Some(addr);
        self
    }

    /// The largest region, at most [`MAX_REGION_BYTES`].
    pub fn max_region_bytes(&mut self, bytes: usize) -> Result<&mut Self, VerbsError> {
        if bytes == 0 || bytes > MAX_REGION_BYTES {
            return Err(VerbsError::InvalidConfig(
                "max_region_bytes must be between 1 and MAX_REGION_BYTES",
            ));
        }
        self.max_region_bytes = bytes;
        Ok(self)
    }

    /// The device's budget of registered bytes, over all its regions.
    pub fn max_registered_bytes(&mut self, bytes: usize) -> Result<&mut Self, VerbsError> {
        if bytes == 0 {
            return Err(VerbsError::InvalidConfig(
                "max_registered_bytes must be positive",
            ));
        }
        self.max_registered_bytes = bytes;
        Ok(self)
    }

    /// Sends and writes outstanding (posted and not yet polled), at most [`MAX_QUEUE_DEPTH`].
    pub fn max_send_wr(&mut self, depth: usize) -> Result<&mut Self, VerbsError> {
        self.max_send_wr = queue_depth(depth)?;
        Ok(self)
    }

    /// Receives outstanding (posted and not yet polled), at most [`MAX_QUEUE_DEPTH`].
    pub fn max_recv_wr(&mut self, depth: usize) -> Result<&mut Self, VerbsError> {
        self.max_recv_wr = queue_depth(depth)?;
        Ok(self)
    }

    /// How long [`Verbs::connect`] waits for the peer.
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = timeout;
        self
    }
}

/// A software RDMA device with one queue pair. Dropping it disconnects.
pub struct SoftVerbs {
    shared: Arc<Shared>,
    own: Info,
    listener: tokio::sync::Mutex<Option<TcpListener>>,
    connect_timeout: Duration,
}

impl SoftVerbs {
    /// Creates a device and its listener (the peer connects to it, or we to the peer's).
    pub async fn bind(config: Arc<SoftConfig>) -> Result<Self, VerbsError> {
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| VerbsError::Device {
                    op: "binding the soft device's listener",
                    source,
                })?;
        let bound = listener.local_addr().map_err(|source| VerbsError::Device {
            op: "reading the soft device's listener address",
            source,
        })?;
        let addr = match config.advertise {
            Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), bound.port()),
            Some(a) => a,
            None if bound.ip().is_unspecified() => {
                return Err(VerbsError::InvalidConfig(
                    "the bind address is unspecified: set advertise to the address the peer should use",
                ));
            }
            None => bound,
        };
        let device = u64::from_be_bytes(random()?);
        let max_message = u32::try_from(config.max_region_bytes).unwrap_or(u32::MAX);
        let regions = RegionTable::new(config.max_region_bytes, config.max_registered_bytes);
        let qp = QueuePair::new(Depths {
            send: config.max_send_wr,
            recv: config.max_recv_wr,
        });
        Ok(Self {
            shared: Arc::new(Shared::new(device, regions, max_message, qp)),
            own: Info {
                addr,
                token: random()?,
            },
            listener: tokio::sync::Mutex::new(Some(listener)),
            connect_timeout: config.connect_timeout,
        })
    }

    /// The address the peer connects to (as carried in [`Verbs::local_info`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.own.addr
    }

    /// Closes the connection: the queue pair goes to the error state, outstanding work
    /// requests on both sides complete with [`CompletionError::Flushed`].
    pub fn disconnect(&self) {
        self.shared.disconnect();
    }

    fn check_region(&self, region: &SoftRegion) -> Result<(), VerbsError> {
        if region.inner.device == self.shared.device {
            Ok(())
        } else {
            Err(VerbsError::ForeignRegion)
        }
    }

    fn check_message(&self, len: usize) -> Result<u32, VerbsError> {
        u32::try_from(len)
            .ok()
            .filter(|&l| l <= self.shared.max_message)
            .ok_or(VerbsError::MessageTooLarge {
                len,
                max: self.shared.max_message as usize,
            })
    }

    fn post(
        &self,
        id: WorkId,
        kind: CompletionKind,
        src: &SoftRegion,
        range: Range<usize>,
        header: impl FnOnce(u32) -> Header,
    ) -> Result<(), VerbsError> {
        self.shared.update(|qp| {
            qp.check_send()?;
            let lease = Lease::take(&src.inner, range).ok_or(VerbsError::RangeBusy)?;
            qp.post_send(id, kind, lease, header)
        })
    }
}

impl Verbs for SoftVerbs {
    type Region = SoftRegion;

    fn local_info(&self) -> Vec<u8> {
        self.own.encode()
    }

    async fn connect(&self, peer: &[u8]) -> Result<(), VerbsError> {
        let peer = Info::decode(peer)?;
        driver::connect(
            &self.shared,
            &self.listener,
            self.own,
            peer,
            self.connect_timeout,
        )
        .await
    }

    fn register(&self, len: usize) -> Result<SoftRegion, VerbsError> {
        let inner = self.shared.regions.register(self.shared.device, len)?;
        Ok(SoftRegion { inner })
    }

    fn post_recv(
        &self,
        id: WorkId,
        region: &SoftRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.check_region(region)?;
        let range = span(offset, len, region.len())?;
        self.shared.update(|qp| {
            qp.check_recv()?;
            let lease = Lease::take(&region.inner, range).ok_or(VerbsError::RangeBusy)?;
            qp.post_recv(id, lease)
        })
    }

    fn post_write_imm(
        &self,
        id: WorkId,
        src: &SoftRegion,
        offset: usize,
        len: usize,
        dst: &RemoteRegion,
        dst_offset: u64,
        imm: u32,
    ) -> Result<(), VerbsError> {
        self.check_region(src)?;
        let range = span(offset, len, src.len())?;
        let wire_len = self.check_message(len)?;
        let addr = write_target(dst, dst_offset, len)?;
        let rkey = dst.rkey;
        self.post(id, CompletionKind::Write, src, range, |seq| {
            Header::write_imm(seq, wire_len, imm, rkey, addr)
        })
    }

    fn post_send(
        &self,
        id: WorkId,
        src: &SoftRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.check_region(src)?;
        let range = span(offset, len, src.len())?;
        let wire_len = self.check_message(len)?;
        self.post(id, CompletionKind::Send, src, range, |seq| {
            Header::send(seq, wire_len)
        })
    }

    async fn poll(&self) -> Result<Completion, VerbsError> {
        self.shared.poll().await
    }
}

impl Drop for SoftVerbs {
    fn drop(&mut self) {
        self.shared.disconnect();
    }
}

impl std::fmt::Debug for SoftVerbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVerbs")
            .field("addr", &self.own.addr)
            .finish_non_exhaustive()
    }
}

/// A region of a [`SoftVerbs`] device. Clones share the region; it is deregistered (its
/// rkey refused) once every clone is dropped and no posted work request uses it.
#[derive(Clone)]
pub struct SoftRegion {
    inner: Arc<RegionInner>,
}

impl Region for SoftRegion {
    fn len(&self) -> usize {
        self.inner.memory.len()
    }

    fn lkey(&self) -> LKey {
        self.inner.lkey
    }

    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.inner.addr,
            len: self.len() as u64,
            rkey: self.inner.rkey,
        }
    }

    fn with_mut<R>(
        &self,
        range: Range<usize>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, VerbsError> {
        check_range(&range, self.len())?;
        let mut lease = Lease::take(&self.inner, range).ok_or(VerbsError::RangeBusy)?;
        Ok(f(&mut lease))
    }
}

impl std::fmt::Debug for SoftRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents.
        f.debug_struct("SoftRegion")
            .field("len", &self.len())
            .field("lkey", &self.inner.lkey)
            .finish_non_exhaustive()
    }
}

/// The largest soft region, and the default budget of registered bytes per device: large
/// enough for the protocol's staging and receive slots, small enough that a test machine
/// survives a few devices.
pub const MAX_REGION_BYTES: usize = 1 << 30;

/// The deepest queue: bounds the in-flight table and the completion queue.
pub const MAX_QUEUE_DEPTH: usize = 16 << 10;

fn queue_depth(depth: usize) -> Result<usize, VerbsError> {
    if depth == 0 || depth > MAX_QUEUE_DEPTH {
        return Err(VerbsError::InvalidConfig(
            "queue depths must be between 1 and MAX_QUEUE_DEPTH",
        ));
    }
    Ok(depth)
}
