//! The RDMA grant exchange as two pure machines: the receiver's [`Receiver`] (which ring
//! slot holds which chunk, what to grant next, what a completion means) and the sender's
//! [`Sender`] (whether a control message is a grant it may serve, and where the chunk goes).
//! No I/O: the drivers in `client/rdma.rs` and `server/rdma.rs` move grants over the
//! control stream and chunks through the verbs device, and tell the machines what happened.
//!
//! Receiver, in this order per slot:
//!
//! ```text
//!  poll_grant() ─▶ Grant { slot, chunk } sent ─▶ WRITE WITH IMM (imm = slot) completes
//!  handle_completion(slot, len) ─▶ Landed (open the slot in place as `placement`)
//!      opened  ─▶ handle_opened(landed)  ─▶ the slot is free: poll_grant() grants the next
//!      refused ─▶ handle_refused(landed) ─▶ the same chunk asked for again in the same slot,
//!                                           or Aborted after MAX_OPEN_FAILURES refusals
//!  is_done() once every chunk of the work was delivered
//! ```
//!
//! Sender: `handle_control(bytes)` for each control message: a validated [`Work`] item to
//! seal and write, [`Control::Finish`], or a [`BadGrant`] whose [`BadGrant::code`] is the
//! wire error the session ends with.
//!
//! What the sender cannot check: whether a slot it is granted again still holds a chunk the
//! receiver has not consumed. The honest receiver grants a slot again as soon as its
//! WRITE WITH IMM completion arrived, which can be before the sender polled its own
//! completion of that write; and only the receiver knows when it has opened the slot. A
//! receiver that grants a busy slot again can only spoil its own chunks, which then fail to
//! open there. So there is no such rule.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use super::{RdmaControl, RdmaOffer};
use crate::proto::seal::{MAX_OPEN_FAILURES, Placement, sealed_len};
use crate::proto::{ChunkIndex, ErrorCode, Manifest};

/// The receiver's side of the exchange: one machine per session.
#[derive(Debug)]
pub struct Receiver {
    transfer: u64,
    manifest: Arc<Manifest>,
    slots: Vec<Slot>,
    /// Chunks not yet granted, in the order to grant them.
    work: VecDeque<ChunkIndex>,
    /// Grants decided but not yet handed out by [`Receiver::poll_grant`].
    ready: VecDeque<(u32, ChunkIndex)>,
    /// Chunks not yet delivered.
    left: usize,
    failures: u32,
}

/// What a ring slot holds, as the receiver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing granted.
    Free,
    /// Granted for this chunk; its write has not completed.
    Granted(ChunkIndex),
    /// The chunk's write completed; it is being opened.
    Landed(ChunkIndex),
}

/// A chunk whose write into a granted slot completed: open it in place, then hand it back
/// with [`Receiver::handle_opened`] or [`Receiver::handle_refused`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a landed chunk must be handed back as opened or refused"]
pub struct Landed {
    slot: u32,
    placement: Placement,
}

impl Landed {
    /// The ring slot it landed in.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// What the sealed chunk in the slot must say it is.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The chunk.
    pub fn chunk(&self) -> ChunkIndex {
        ChunkIndex(self.placement.chunk)
    }

    /// Bytes the sender writes for it: the sealed chunk.
    pub fn sealed_len(&self) -> usize {
        sealed_len(self.placement.len as usize)
    }
}

/// A completion the receiver did not expect.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompletionError {
    /// A write into a slot that holds no grant (or whose chunk already landed): the peer
    /// broke the protocol, and the session ends.
    #[error("a write into slot {slot}, which was not granted")]
    UngrantedSlot {
        /// The slot the write named.
        slot: u32,
    },
    /// A write of another length than the granted chunk's sealed length: the chunk is
    /// refused (hand `landed` to [`Receiver::handle_refused`]) and asked for again.
    #[error("{written} bytes written into slot {}, {} expected", .landed.slot, .landed.sealed_len())]
    WrongLength {
        /// The chunk that was expected there.
        landed: Landed,
        /// Bytes the write carried.
        written: usize,
    },
}

/// A refused chunk that will be asked for again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regrant {
    /// The chunk, granted again in the same slot.
    pub chunk: ChunkIndex,
    /// Refusals in this session so far.
    pub failures: u32,
}

/// Chunks kept failing to open: the transfer is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{failures} chunks failed to open; the last was chunk {}", chunk.0)]
pub struct Aborted {
    /// The last chunk that failed.
    pub chunk: ChunkIndex,
    /// Refusals in this session: [`MAX_OPEN_FAILURES`].
    pub failures: u32,
}

/// A receiver's work names a chunk its manifest does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk {} is not in the manifest", .0.0)]
pub struct UnknownChunk(pub ChunkIndex);

impl Receiver {
    /// A receiver of `work` (chunks of `manifest`, in the order to ask for them) for
    /// transfer `transfer` into a ring of `slots` slots. Grants one chunk per slot at first.
    pub fn new(
        transfer: u64,
        manifest: Arc<Manifest>,
        work: impl IntoIterator<Item = ChunkIndex>,
        slots: u32,
    ) -> Result<Self, UnknownChunk> {
        let mut work: VecDeque<ChunkIndex> = work.into_iter().collect();
        if let Some(&bad) = work.iter().find(|c| c.0 >= manifest.chunk_count()) {
            return Err(UnknownChunk(bad));
        }
        let mut ready = VecDeque::new();
        for slot in 0..slots {
            match work.pop_front() {
                Some(chunk) => ready.push_back((slot, chunk)),
                None => break,
            }
        }
        let left = work.len() + ready.len();
        Ok(Self {
            transfer,
            manifest,
            slots: vec![Slot::Free; slots as usize],
            work,
            ready,
            left,
            failures: 0,
        })
    }

    /// The next grant to send, if any. Its slot counts as granted from now on, so send it
    /// before handing the machine a completion for that slot.
    pub fn poll_grant(&mut self) -> Option<RdmaControl> {
        let (slot, chunk) = self.ready.pop_front()?;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Slot::Granted(chunk);
        }
        Some(RdmaControl::Grant {
            slot,
            chunk: chunk.0,
        })
    }

    /// A WRITE WITH IMM of `len` bytes into slot `slot` completed: the chunk to open there,
    /// or why not.
    pub fn handle_completion(&mut self, slot: u32, len: usize) -> Result<Landed, CompletionError> {
        let chunk = match self.slots.get(slot as usize) {
            Some(Slot::Granted(chunk)) => *chunk,
            _ => return Err(CompletionError::UngrantedSlot { slot }),
        };
        // `new` checked every chunk of the work against the manifest.
        let range = self
            .manifest
            .chunk_range(chunk)
            .ok_or(CompletionError::UngrantedSlot { slot })?;
        self.slots[slot as usize] = Slot::Landed(chunk);
        let landed = Landed {
            slot,
            placement: Placement {
                transfer: self.transfer,
                chunk: chunk.0,
                offset: range.start,
                len: (range.end - range.start) as u32,
            },
        };
        if len != landed.sealed_len() {
            return Err(CompletionError::WrongLength {
                landed,
                written: len,
            });
        }
        Ok(landed)
    }

    /// The chunk in `landed` opened and was delivered: its slot is free for the next grant.
    /// Returns where the chunk was (its length is what was delivered).
    pub fn handle_opened(&mut self, landed: Landed) -> Placement {
        if self.take_landed(&landed) {
            self.left = self.left.saturating_sub(1);
            if let Some(next) = self.work.pop_front() {
                self.ready.push_back((landed.slot, next));
            }
        }
        landed.placement
    }

    /// The chunk in `landed` failed to open (or was of the wrong length): it is asked for
    /// again in the same slot, unless this was the [`MAX_OPEN_FAILURES`]th refusal.
    pub fn handle_refused(&mut self, landed: Landed) -> Result<Regrant, Aborted> {
        let chunk = landed.chunk();
        if self.take_landed(&landed) {
            self.failures = self.failures.saturating_add(1);
        }
        if self.failures >= MAX_OPEN_FAILURES {
            return Err(Aborted {
                chunk,
                failures: self.failures,
            });
        }
        // The sender seals it afresh under a new sequence number.
        self.ready.push_back((landed.slot, chunk));
        Ok(Regrant {
            chunk,
            failures: self.failures,
        })
    }

    /// True once every chunk of the work was delivered.
    pub fn is_done(&self) -> bool {
        self.left == 0
    }

    /// Chunks refused so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Frees `landed`'s slot if it holds that chunk; false if it did not (a `Landed` of
    /// another machine).
    fn take_landed(&mut self, landed: &Landed) -> bool {
        match self.slots.get_mut(landed.slot as usize) {
            Some(s) if *s == Slot::Landed(landed.chunk()) => {
                *s = Slot::Free;
                true
            }
            _ => false,
        }
    }
}

/// The sender's side of the exchange: one machine per session.
#[derive(Debug)]
pub struct Sender {
    transfer: u64,
    manifest: Arc<Manifest>,
    slots: u32,
    slot_bytes: u32,
}

/// What a control message asks of the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Seal a chunk and write it into a ring slot.
    Write(Work),
    /// The receiver has what it wanted: wait for the writes in flight and end the session.
    Finish,
}

/// A validated grant: which chunk to seal, and where in the receiver's ring it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// The ring slot (the write's immediate value).
    pub slot: u32,
    /// The chunk.
    pub chunk: ChunkIndex,
    /// Its bytes in the object.
    pub range: Range<u64>,
    /// Where the sealed chunk starts in the receiver's ring.
    pub dst: u64,
    /// What the sealed chunk's header says.
    pub placement: Placement,
    /// Bytes to write: the sealed chunk.
    pub sealed_len: usize,
}

/// An offer the sender will not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadOffer {
    /// The receiver asked for unsealed chunks, which no product build moves.
    #[error("unsealed RDMA chunks are not served")]
    Unsealed,
    /// A slot cannot hold the object's largest sealed chunk.
    #[error("ring slots of {slot_bytes} bytes cannot hold a sealed chunk of {need} bytes")]
    SlotTooSmall {
        /// Bytes per slot offered.
        slot_bytes: u32,
        /// Bytes the largest sealed chunk needs.
        need: usize,
    },
}

impl BadOffer {
    /// The wire error the sender answers with.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Unsealed => ErrorCode::NoRdma,
            Self::SlotTooSmall { .. } => ErrorCode::Protocol,
        }
    }
}

/// A control message the sender refuses; the session ends with [`BadGrant::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadGrant {
    /// Not a control message.
    #[error("undecodable RDMA control message")]
    Undecodable(#[source] crate::proto::DecodeError),
    /// A slot past the end of the offered ring.
    #[error("slot {slot} outside a ring of {slots} slots")]
    SlotOutOfRing {
        /// The slot granted.
        slot: u32,
        /// Slots in the ring.
        slots: u32,
    },
    /// A chunk the transfer's manifest does not have.
    #[error("chunk {chunk} is not in the manifest")]
    UnknownChunk {
        /// The chunk granted.
        chunk: u32,
    },
    /// The chunk, sealed, would not fit in a slot.
    #[error("chunk {chunk} sealed is {sealed_len} bytes, more than a slot's {slot_bytes}")]
    ChunkTooLarge {
        /// The chunk granted.
        chunk: u32,
        /// Its sealed length.
        sealed_len: usize,
        /// Bytes per slot.
        slot_bytes: u32,
    },
}

impl BadGrant {
    /// The stable wire error the sender ends the session with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Undecodable(_) | Self::ChunkTooLarge { .. } => ErrorCode::Protocol,
            Self::SlotOutOfRing { .. } | Self::UnknownChunk { .. } => ErrorCode::Range,
        }
    }
}

impl Sender {
    /// A sender of `manifest`'s chunks for transfer `transfer` into the ring of `offer`.
    pub fn new(
        transfer: u64,
        manifest: Arc<Manifest>,
        offer: &RdmaOffer,
    ) -> Result<Self, BadOffer> {
        if offer.unsealed {
            return Err(BadOffer::Unsealed);
        }
        let largest = (0..manifest.chunk_count())
            .filter_map(|i| manifest.chunk_range(ChunkIndex(i)))
            .map(|r| r.end - r.start)
            .max()
            .unwrap_or(0) as usize;
        let need = sealed_len(largest);
        if (offer.slot_bytes as usize) < need {
            return Err(BadOffer::SlotTooSmall {
                slot_bytes: offer.slot_bytes,
                need,
            });
        }
        Ok(Self {
            transfer,
            manifest,
            slots: offer.slots,
            slot_bytes: offer.slot_bytes,
        })
    }

    /// Bytes per ring slot (and per staging slot).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes as usize
    }

    /// Reads a control message from the receiver.
    pub fn handle_control(&mut self, bytes: &[u8]) -> Result<Control, BadGrant> {
        let (slot, chunk) = match RdmaControl::decode(bytes).map_err(BadGrant::Undecodable)? {
            RdmaControl::Grant { slot, chunk } => (slot, chunk),
            RdmaControl::Finish => return Ok(Control::Finish),
        };
        if slot >= self.slots {
            return Err(BadGrant::SlotOutOfRing {
                slot,
                slots: self.slots,
            });
        }
        let range = self
            .manifest
            .chunk_range(ChunkIndex(chunk))
            .ok_or(BadGrant::UnknownChunk { chunk })?;
        let len = range.end - range.start;
        let sealed = sealed_len(len as usize);
        if sealed > self.slot_bytes as usize {
            return Err(BadGrant::ChunkTooLarge {
                chunk,
                sealed_len: sealed,
                slot_bytes: self.slot_bytes,
            });
        }
        Ok(Control::Write(Work {
            slot,
            chunk: ChunkIndex(chunk),
            placement: Placement {
                transfer: self.transfer,
                chunk,
                offset: range.start,
                len: len as u32,
            },
            range,
            dst: u64::from(slot) * u64::from(self.slot_bytes),
            sealed_len: sealed,
        }))
    }
}

#[cfg(test)]
mod tests;
