//! The verbs abstraction the RDMA protocol is written against: a reliable-connected queue
//! pair, registered regions, work requests and their completions.
//!
//! Two implementations: [`soft`](super::soft) (a software device over TCP, for tests,
//! benchmarks and machines without RDMA) and, with the cargo feature `rdma`, the ibverbs
//! hardware device. Sealing, credits and the control messages live above this layer; nothing
//! here encrypts.
//!
//! # Call order
//!
//! 1. Create the device (one queue pair per device), send [`Verbs::local_info`] to the peer
//!    over the control channel and receive the peer's.
//! 2. [`Verbs::register`] regions and [`Verbs::post_recv`] receives (allowed before connecting).
//! 3. [`Verbs::connect`] with the peer's parameters; both sides call it.
//! 4. Send [`Region::remote`] (encoded with [`RemoteRegion::encode`]) to the peer over the
//!    control channel; post writes and sends; take every completion with [`Verbs::poll`].
//!
//! # Ownership of memory
//!
//! A range of a region belongs to one user at a time:
//!
//! * a posted send's or write's source range and a posted receive's range belong to the
//!   device from the post until its completion has been polled; the region stays alive (its
//!   owner moves into the in-flight table) for as long;
//! * [`Region::with_mut`] lends a range to the CPU for the duration of a closure;
//! * a range the peer writes into is the device's while the data lands.
//!
//! Overlapping uses are refused: `with_mut` and posts fail with [`VerbsError::RangeBusy`], and
//! the software device refuses a peer's write into a range in use with
//! [`RemoteAccessError::RangeBusy`] (hardware cannot check this: such a write races with the
//! CPU, and the seal above detects the damage). So keep the receive buffers for SENDs apart
//! from the slots the peer writes into: a receive that only takes a WRITE_WITH_IMM can have
//! length 0.
//!
//! # Errors
//!
//! As on RC hardware, a failed work request moves the queue pair to the error state: every
//! other outstanding work request completes with [`CompletionError::Flushed`], later posts
//! fail with [`VerbsError::Broken`], and once every completion has been polled,
//! [`Verbs::poll`] fails with [`VerbsError::Broken`] too. The session above then tears down
//! and falls back (to QUIC) or reconnects with a new device.

use std::fmt;
use std::future::Future;
use std::ops::Range;

/// A remote key: lets the peer write into one of our regions. Sent only over the control
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RKey(pub u32);

/// A local key: names a registered region in our own work requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LKey(pub u32);

/// The caller's name for a work request, returned in its [`Completion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkId(pub u64);

/// A region of the peer's memory that we may write into; sent over the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// The region's first byte in the peer's address space (an opaque number to us).
    pub addr: u64,
    /// The region's length in bytes.
    pub len: u64,
    /// The key that grants access.
    pub rkey: RKey,
}

impl RemoteRegion {
    /// Bytes of [`RemoteRegion::encode`]'s output.
    pub const ENCODED_LEN: usize = 20;

    /// Encodes as `addr u64 BE | len u64 BE | rkey u32 BE`.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..8].copy_from_slice(&self.addr.to_be_bytes());
        out[8..16].copy_from_slice(&self.len.to_be_bytes());
        out[16..20].copy_from_slice(&self.rkey.0.to_be_bytes());
        out
    }

    /// Decodes exactly [`RemoteRegion::ENCODED_LEN`] bytes from the peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, RemoteRegionError> {
        match bytes.len() {
            n if n < Self::ENCODED_LEN => {
                return Err(RemoteRegionError::Incomplete {
                    needed: Self::ENCODED_LEN,
                    got: n,
                });
            }
            n if n > Self::ENCODED_LEN => return Err(RemoteRegionError::TrailingBytes(n)),
            _ => {}
        }
        let addr = u64::from_be_bytes(array(&bytes[0..8]));
        let len = u64::from_be_bytes(array(&bytes[8..16]));
        let rkey = RKey(u32::from_be_bytes(array(&bytes[16..20])));
        if addr.checked_add(len).is_none() {
            return Err(RemoteRegionError::Overflow);
        }
        Ok(Self { addr, len, rkey })
    }

    /// The peer address of `len` bytes at `offset` into this region, if they lie within it.
    pub fn target(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| self.addr.checked_add(offset))?
    }
}

/// What kind of work completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// Our RDMA WRITE WITH IMMEDIATE (the writer's side).
    Write,
    /// The peer's RDMA WRITE WITH IMMEDIATE consumed one of our receives; `len` bytes landed
    /// in the region it targeted.
    WriteWithImm {
        /// The immediate value the writer attached.
        imm: u32,
        /// Bytes written.
        len: u32,
    },
    /// Our SEND.
    Send,
    /// The peer's SEND landed in one of our receives.
    Recv {
        /// Bytes received, at the receive's offset (0 for a flushed or failed receive).
        len: u32,
    },
}

/// A finished work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The caller's ID from the post.
    pub id: WorkId,
    /// What completed. For a failed work request this is the kind that was posted (a failed
    /// receive says `Recv { len: 0 }`).
    pub kind: CompletionKind,
    /// Whether it succeeded.
    pub status: Result<(), CompletionError>,
}

/// A verbs device with one reliable-connected queue pair. See the [module docs](self) for the
/// call order, the ownership of memory and the error state.
pub trait Verbs: Send + Sync + 'static {
    /// A registered region of this device.
    type Region: Region;

    /// This side's connection parameters, for the peer (sent over the control channel).
    fn local_info(&self) -> Vec<u8>;

    /// Connects the (reliable-connected) queue pair to the peer's parameters.
    fn connect(&self, peer: &[u8]) -> impl Future<Output = Result<(), VerbsError>> + Send;

    /// Registers a zeroed buffer of `len` bytes with local write and remote write access.
    fn register(&self, len: usize) -> Result<Self::Region, VerbsError>;

    /// Posts a receive work request, consumed by the peer's next SEND or WRITE_WITH_IMM
    /// (for SEND the data lands in `region[offset..offset+len]`).
    fn post_recv(
        &self,
        id: WorkId,
        region: &Self::Region,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError>;

    /// RDMA WRITE WITH IMMEDIATE of `src[offset..offset+len]` into `dst` at `dst_offset`;
    /// the peer gets a WriteWithImm completion (consuming one of its posted receives) once
    /// the data is in place; we get a Write completion once the peer has it.
    #[allow(clippy::too_many_arguments)]
    fn post_write_imm(
        &self,
        id: WorkId,
        src: &Self::Region,
        offset: usize,
        len: usize,
        dst: &RemoteRegion,
        dst_offset: u64,
        imm: u32,
    ) -> Result<(), VerbsError>;

    /// SEND of `src[offset..offset+len]` into the peer's next posted receive.
    fn post_send(
        &self,
        id: WorkId,
        src: &Self::Region,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError>;

    /// The next completion (async; cancel-safe).
    fn poll(&self) -> impl Future<Output = Result<Completion, VerbsError>> + Send;
}

/// A registered memory region.
pub trait Region: Send + Sync + 'static {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The local key.
    fn lkey(&self) -> LKey;

    /// What the peer needs to write into this region.
    fn remote(&self) -> RemoteRegion;

    /// Runs `f` on `region[range]` with exclusive CPU access (the protocol only does this for
    /// parts no posted work request uses: sealing in a send staging slot, opening in place in
    /// a receive slot after its completion).
    fn with_mut<R>(
        &self,
        range: Range<usize>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, VerbsError>;
}

/// Why a verbs call failed (the call itself, not a work request: those fail with a
/// [`CompletionError`] in their [`Completion`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    /// A send or write was posted before [`Verbs::connect`] succeeded.
    #[error("the queue pair is not connected: call connect with the peer's parameters first")]
    NotConnected,
    /// [`Verbs::connect`] was called twice, or while another call was connecting.
    #[error(
        "the queue pair is already connected or connecting: create a new device to connect again"
    )]
    AlreadyConnected,
    /// The queue pair is in the error state.
    #[error(
        "the queue pair is in the error state ({0}): poll the remaining completions, then tear the session down and fall back or reconnect with a new device"
    )]
    Broken(BrokenReason),
    /// The peer's connection parameters could not be decoded.
    #[error(
        "the peer's connection parameters are invalid ({0}): pass the bytes the peer's local_info produced"
    )]
    PeerInfo(#[from] InfoError),
    /// Connecting to the peer failed.
    #[error("connecting to the peer failed: {0}")]
    Connect(#[source] std::io::Error),
    /// The peer did not connect, or did not answer, in time.
    #[error(
        "the peer did not connect within {0:?}: check that both sides call connect with each other's parameters"
    )]
    ConnectTimeout(std::time::Duration),
    /// A range lies outside its region.
    #[error("range {start}..{end} is outside the region of {len} bytes")]
    OutOfBounds {
        /// First byte of the range.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The region's length.
        len: u64,
    },
    /// The range is in use by a posted work request or another `with_mut`.
    #[error(
        "the range is in use by a posted work request or another with_mut: wait for its completion"
    )]
    RangeBusy,
    /// The region was registered on another device.
    #[error("the region belongs to another device: register it on the device that posts it")]
    ForeignRegion,
    /// Too many work requests on one queue.
    #[error(
        "{max} work requests are outstanding on this queue: poll completions before posting more"
    )]
    QueueFull {
        /// The queue's depth.
        max: usize,
    },
    /// A region larger than the device allows.
    #[error(
        "a region of {len} bytes is larger than the device allows ({max}): register smaller regions"
    )]
    RegionTooLarge {
        /// Requested bytes.
        len: usize,
        /// The largest region.
        max: usize,
    },
    /// The device's budget of registered memory is spent.
    #[error(
        "registering {len} more bytes would exceed the device's {max} bytes of registered memory: drop unused regions first"
    )]
    MemoryLimit {
        /// Requested bytes.
        len: usize,
        /// The budget.
        max: usize,
    },
    /// A message larger than one work request may carry.
    #[error("a message of {len} bytes is larger than one work request may carry ({max})")]
    MessageTooLarge {
        /// Requested bytes.
        len: usize,
        /// The largest message.
        max: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid device configuration: {0}")]
    InvalidConfig(&'static str),
    /// The device or the operating system refused an operation.
    #[error("{op} failed: {source}")]
    Device {
        /// What we were doing.
        op: &'static str,
        /// The error the OS or the driver reported.
        #[source]
        source: std::io::Error,
    },
}

impl From<VerbsError> for std::io::Error {
    fn from(e: VerbsError) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            VerbsError::NotConnected => ErrorKind::NotConnected,
            VerbsError::AlreadyConnected => ErrorKind::AlreadyExists,
            VerbsError::Broken(_) => ErrorKind::ConnectionAborted,
            VerbsError::PeerInfo(_) => ErrorKind::InvalidData,
            VerbsError::ConnectTimeout(_) => ErrorKind::TimedOut,
            VerbsError::Connect(e) | VerbsError::Device { source: e, .. } => e.kind(),
            VerbsError::RangeBusy => ErrorKind::ResourceBusy,
            VerbsError::QueueFull { .. } | VerbsError::MemoryLimit { .. } => ErrorKind::OutOfMemory,
            _ => ErrorKind::InvalidInput,
        };
        Self::new(kind, e)
    }
}

/// Why the queue pair is in the error state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokenReason {
    /// This side disconnected (or dropped the device).
    Disconnected,
    /// The peer closed the connection.
    PeerClosed,
    /// The connection failed with an I/O error of this kind.
    Io(std::io::ErrorKind),
    /// One of our work requests failed, which breaks a reliable connection.
    WorkRequestFailed(CompletionError),
    /// We refused one of the peer's requests (the peer's work request fails with this
    /// error), which breaks a reliable connection.
    RefusedPeerRequest(CompletionError),
    /// The peer broke the device's wire protocol.
    PeerMisbehaved(PeerMisbehaved),
    /// The device reported a fatal error.
    Device,
}

impl fmt::Display for BrokenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disconnected => f.write_str("disconnected by this side"),
            Self::PeerClosed => f.write_str("the peer closed the connection"),
            Self::Io(kind) => write!(f, "connection failed: {kind}"),
            Self::WorkRequestFailed(e) => write!(f, "a work request failed: {e}"),
            Self::RefusedPeerRequest(e) => write!(f, "refused a request of the peer: {e}"),
            Self::PeerMisbehaved(why) => write!(f, "the peer broke the protocol: {why}"),
            Self::Device => f.write_str("the device reported a fatal error"),
        }
    }
}

/// How a peer broke the software device's wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// A message header that is not valid.
    #[error("invalid message header")]
    InvalidHeader,
    /// A message longer than the device allows.
    #[error("message longer than the device allows")]
    MessageTooLarge,
    /// A request out of sequence.
    #[error("request out of sequence")]
    OutOfSequence,
    /// An acknowledgement for nothing we sent.
    #[error("acknowledgement without a request")]
    UnexpectedAck,
}

/// Why a work request failed, as its [`Completion`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompletionError {
    /// The peer refused our write into its memory.
    #[error("remote access error: {0}")]
    RemoteAccess(RemoteAccessError),
    /// The peer had no receive posted for our SEND or WRITE_WITH_IMM.
    #[error(
        "receiver not ready: the peer had no receive posted; post receives before granting credits"
    )]
    ReceiverNotReady,
    /// Our SEND was longer than the peer's posted receive (or otherwise invalid for it).
    #[error(
        "remote invalid request: the message did not fit the peer's posted receive; keep SENDs within the receive buffers"
    )]
    RemoteInvalidRequest,
    /// The peer failed to carry out the request (e.g. its receive buffer was in use).
    #[error("remote operation error: the peer could not place the message")]
    RemoteOperation,
    /// An incoming SEND was longer than this receive's buffer.
    #[error(
        "local length error: the incoming message was longer than the posted receive; post larger receives"
    )]
    LocalLength,
    /// This receive's buffer was in use by the CPU when data arrived, or a local key was
    /// invalid.
    #[error(
        "local protection error: the buffer was not available to the device; do not touch posted buffers"
    )]
    LocalProtection,
    /// The queue pair went to the error state before the work request completed.
    #[error(
        "flushed: the connection broke before this work request completed; the data may or may not have arrived"
    )]
    Flushed,
    /// The peer stopped answering (transport or RNR retries exhausted).
    #[error("retries exceeded: the peer stopped answering; the connection is lost")]
    RetryExceeded,
    /// Any other status the hardware reported.
    #[error("the device reported work completion status {status} (vendor error {vendor})")]
    Device {
        /// `ibv_wc_status`.
        status: u32,
        /// The vendor's error code.
        vendor: u32,
    },
}

/// Why the peer refused a write into its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteAccessError {
    /// No region of the peer has this rkey (never registered, or dropped since).
    #[error(
        "the peer has no region with this rkey; write only into regions the peer advertised and still holds"
    )]
    UnknownKey,
    /// The write falls outside the region the rkey names.
    #[error(
        "the write falls outside the peer's region; keep dst_offset + len within the advertised length"
    )]
    OutOfBounds,
    /// The target range was in use by the peer's CPU or a posted work request (a race in
    /// the protocol above; only the software device detects it).
    #[error(
        "the target range was in use at the peer (CPU or posted work request); write only into slots the peer granted"
    )]
    RangeBusy,
    /// The hardware refused the access without saying why (rkey or bounds).
    #[error("the peer refused the access (bad rkey or out of bounds)")]
    Unspecified,
}

/// Why a [`RemoteRegion`] could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteRegionError {
    /// Fewer bytes than an encoded region.
    #[error("remote region incomplete: {got} of {needed} bytes")]
    Incomplete {
        /// Bytes an encoded region has.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// More bytes than an encoded region.
    #[error("remote region has trailing bytes: {0} bytes given")]
    TrailingBytes(usize),
    /// `addr + len` overflows.
    #[error("remote region wraps around the address space")]
    Overflow,
}

/// Why a peer's connection parameters (from its `local_info`) could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// Fewer bytes than the parameters need.
    #[error("incomplete: {got} of {needed} bytes")]
    Incomplete {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// Parameters of another device kind or version (e.g. hardware parameters given to the
    /// software device).
    #[error("not parameters of this device kind and version")]
    WrongKind,
    /// A field with an invalid value.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// More bytes than the parameters have.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// Checks that `range` lies within `len` bytes.
pub(crate) fn check_range(range: &Range<usize>, len: usize) -> Result<(), VerbsError> {
    if range.start <= range.end && range.end <= len {
        Ok(())
    } else {
        Err(VerbsError::OutOfBounds {
            start: range.start as u64,
            end: range.end as u64,
            len: len as u64,
        })
    }
}

/// `offset..offset + len`, checked against `region_len`.
pub(crate) fn span(
    offset: usize,
    len: usize,
    region_len: usize,
) -> Result<Range<usize>, VerbsError> {
    let end = offset.checked_add(len).ok_or(VerbsError::OutOfBounds {
        start: offset as u64,
        end: u64::MAX,
        len: region_len as u64,
    })?;
    let range = offset..end;
    check_range(&range, region_len)?;
    Ok(range)
}

/// The peer address for a write of `len` bytes at `dst_offset` into `dst`.
pub(crate) fn write_target(
    dst: &RemoteRegion,
    dst_offset: u64,
    len: usize,
) -> Result<u64, VerbsError> {
    dst.target(dst_offset, len as u64)
        .ok_or(VerbsError::OutOfBounds {
            start: dst_offset,
            end: dst_offset.saturating_add(len as u64),
            len: dst.len,
        })
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn remote_region_known_bytes() {
        let r = RemoteRegion {
            addr: 0x0102_0304_0506_0708,
            len: 0x10,
            rkey: RKey(0xaabb_ccdd),
        };
        let bytes = r.encode();
        assert_eq!(
            bytes,
            [
                1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0x10, 0xaa, 0xbb, 0xcc, 0xdd
            ]
        );
        assert_eq!(RemoteRegion::decode(&bytes), Ok(r));
    }

    #[test]
    fn remote_region_refuses_bad_input() {
        let good = RemoteRegion {
            addr: 4096,
            len: 10,
            rkey: RKey(7),
        }
        .encode();
        assert_eq!(
            RemoteRegion::decode(&good[..19]),
            Err(RemoteRegionError::Incomplete {
                needed: 20,
                got: 19
            })
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            RemoteRegion::decode(&long),
            Err(RemoteRegionError::TrailingBytes(21))
        );
        let wraps = RemoteRegion {
            addr: u64::MAX - 1,
            len: 0,
            rkey: RKey(1),
        };
        let mut bytes = wraps.encode();
        bytes[15] = 2;
        assert_eq!(
            RemoteRegion::decode(&bytes),
            Err(RemoteRegionError::Overflow)
        );
    }

    #[test]
    fn target_stays_within_the_region() {
        let r = RemoteRegion {
            addr: 1000,
            len: 100,
            rkey: RKey(1),
        };
        assert_eq!(r.target(0, 100), Some(1000));
        assert_eq!(r.target(99, 1), Some(1099));
        assert_eq!(r.target(100, 0), Some(1100));
        assert_eq!(r.target(99, 2), None);
        assert_eq!(r.target(u64::MAX, 2), None);
        assert!(write_target(&r, 50, 51).is_err());
        assert_eq!(span(3, 4, 7).ok(), Some(3..7));
        assert!(span(3, 5, 7).is_err());
        assert!(span(usize::MAX, 1, 7).is_err());
    }

    proptest! {
        #[test]
        fn remote_region_round_trips(addr in any::<u64>(), len in any::<u64>(), rkey in any::<u32>()) {
            let len = len.min(u64::MAX - addr);
            let r = RemoteRegion { addr, len, rkey: RKey(rkey) };
            let bytes = r.encode();
            prop_assert_eq!(bytes.len(), RemoteRegion::ENCODED_LEN);
            prop_assert_eq!(RemoteRegion::decode(&bytes), Ok(r));
        }

        #[test]
        fn remote_region_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = RemoteRegion::decode(&bytes);
        }
    }
}
