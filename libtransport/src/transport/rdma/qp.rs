//! The hardware queue pair, its states as types: [`Reset`] -> [`Init`] -> [`ReadyToReceive`]
//! -> [`ReadyToSend`]. Each step consumes the previous state (a failed step hands it back),
//! so a skipped step does not compile; receives may be posted from `Init` on, sends and
//! writes only in `ReadyToSend`. Any state can be moved to the error state, which flushes all
//! outstanding work.

use std::io;
use std::marker::PhantomData;
use std::sync::Arc;

use super::sys::{Cq, MrLease, ProtectionDomain, QpHandle, RtrAttr, WorkTag};

/// Created; nothing may be posted.
#[derive(Debug)]
pub(super) struct Reset;
/// Bound to a port; receives may be posted.
#[derive(Debug)]
pub(super) struct Init;
/// Connected to the peer's queue pair; receives arrive.
#[derive(Debug)]
pub(super) struct ReadyToReceive;
/// Fully connected: sends and writes may be posted.
#[derive(Debug)]
pub(super) struct ReadyToSend;

/// States in which receives may be posted.
pub(super) trait Receiving {}
impl Receiving for Init {}
impl Receiving for ReadyToReceive {}
impl Receiving for ReadyToSend {}

/// A reliable-connected queue pair in state `S`.
pub(super) struct QueuePair<S> {
    handle: Arc<QpHandle>,
    _state: PhantomData<S>,
}

/// A failed state change: the queue pair, still in its old state, and the error.
pub(super) type Step<Next, Old> = Result<QueuePair<Next>, (QueuePair<Old>, io::Error)>;

impl<S> QueuePair<S> {
    fn step<Next>(self, result: io::Result<()>) -> Step<Next, S> {
        match result {
            Ok(()) => Ok(QueuePair {
                handle: self.handle,
                _state: PhantomData,
            }),
            Err(e) => Err((self, e)),
        }
    }

    /// The handle the completion path takes leases back from.
    pub(super) fn handle(&self) -> &Arc<QpHandle> {
        &self.handle
    }

    pub(super) fn qp_num(&self) -> u32 {
        self.handle.qp_num()
    }
}

impl QueuePair<Reset> {
    pub(super) fn create(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<Cq>,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> io::Result<Self> {
        Ok(Self {
            handle: Arc::new(QpHandle::create_rc(pd, cq, max_send_wr, max_recv_wr)?),
            _state: PhantomData,
        })
    }

    /// RESET -> INIT on `port`.
    pub(super) fn init(self, port: u8) -> Step<Init, Reset> {
        let result = self.handle.modify_to_init(port);
        self.step(result)
    }
}

impl QueuePair<Init> {
    /// INIT -> RTR: connects to the peer's queue pair.
    pub(super) fn ready_to_receive(self, rtr: &RtrAttr) -> Step<ReadyToReceive, Init> {
        let result = self.handle.modify_to_rtr(rtr);
        self.step(result)
    }
}

impl QueuePair<ReadyToReceive> {
    /// RTR -> RTS, with our starting packet sequence number.
    pub(super) fn ready_to_send(self, psn: u32) -> Step<ReadyToSend, ReadyToReceive> {
        let result = self
            .handle
            .modify_to_rts(psn, ACK_TIMEOUT, RETRY_COUNT, RNR_RETRY);
        self.step(result)
    }
}

impl<S: Receiving> QueuePair<S> {
    pub(super) fn post_recv(&self, tag: WorkTag, dst: MrLease) -> Result<(), (io::Error, MrLease)> {
        self.handle.post_recv(tag, dst)
    }
}

impl QueuePair<ReadyToSend> {
    pub(super) fn post_write_imm(
        &self,
        tag: WorkTag,
        src: MrLease,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), (io::Error, MrLease)> {
        self.handle.post_write_imm(tag, src, remote_addr, rkey, imm)
    }

    pub(super) fn post_send(&self, tag: WorkTag, src: MrLease) -> Result<(), (io::Error, MrLease)> {
        self.handle.post_send(tag, src)
    }
}

impl<S> std::fmt::Debug for QueuePair<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.handle.qp_num())
            .field("state", &std::any::type_name::<S>())
            .finish()
    }
}

/// The local ACK timeout: 4.096 µs * 2^14, about 67 ms.
const ACK_TIMEOUT: u8 = 14;

/// Transport retries before the work request fails (`RetryExceeded`): the most allowed.
const RETRY_COUNT: u8 = 7;

/// RNR retries: none, so a write or send without a posted receive fails at once
/// (`ReceiverNotReady`), as on the software device. The protocol's credits prevent it.
const RNR_RETRY: u8 = 0;

/// The minimum RNR NAK timer we ask the peer to use (12: 0.64 ms); irrelevant with no
/// retries, but required for RTR.
pub(super) const MIN_RNR_TIMER: u8 = 12;
