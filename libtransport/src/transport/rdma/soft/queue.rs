//! The software queue pair's state: the send and receive queues with their leases, the
//! completion queue, the error state and the request sequence numbers. No I/O: the reader
//! and writer tasks (`driver.rs`) and the `Verbs` calls change it under one lock.
//!
//! Every posted work request holds a [`Lease`] on its range until its completion is queued
//! (a task working on it takes the lease out and brings it back). Completions are queued
//! from the front of each queue only, so they come in posting order per queue, and only
//! once the range is free again, so the caller may touch it as soon as it polls the
//! completion.

use std::collections::VecDeque;

use super::region::Lease;
use super::wire::{AckStatus, Header};
use crate::transport::rdma::verbs::{
    BrokenReason, Completion, CompletionError, CompletionKind, PeerMisbehaved, VerbsError, WorkId,
};

/// Where the queue pair is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Created; receives may be posted.
    Idle,
    /// `connect` is running.
    Connecting,
    /// Connected: everything may be posted.
    Connected,
    /// The error state: nothing more is posted; outstanding work is flushed.
    Broken(BrokenReason),
}

/// Limits of the queues.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Depths {
    pub(crate) send: usize,
    pub(crate) recv: usize,
}

/// The queue pair.
#[derive(Debug)]
pub(crate) struct QueuePair {
    phase: Phase,
    depths: Depths,
    send: VecDeque<SendWr>,
    /// How many entries at the back of `send` the writer has not taken yet.
    unsent: usize,
    recv: VecDeque<RecvWr>,
    /// Responses the writer owes the peer, in order.
    acks: Vec<Header>,
    cq: VecDeque<Completion>,
    /// Posted and not yet polled, per queue: bounds both queues and the completion queue.
    outstanding_send: usize,
    outstanding_recv: usize,
    /// Sequence number of our next request.
    next_seq: u32,
    /// Sequence number of the peer's next request.
    peer_seq: u32,
}

#[derive(Debug)]
struct SendWr {
    id: WorkId,
    kind: CompletionKind,
    header: Header,
    /// `None` while the writer holds it.
    lease: Option<Lease>,
    outcome: Option<Result<(), CompletionError>>,
}

#[derive(Debug)]
struct RecvWr {
    id: WorkId,
    /// `None` while the reader holds it.
    lease: Option<Lease>,
    outcome: Option<(CompletionKind, Result<(), CompletionError>)>,
}

/// A request the writer sends: its header and the lease on its payload.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) header: Header,
    pub(crate) lease: Lease,
}

/// A receive the reader consumes.
#[derive(Debug)]
pub(crate) struct Consumed {
    pub(crate) lease: Lease,
}

impl QueuePair {
    pub(crate) fn new(depths: Depths) -> Self {
        Self {
            phase: Phase::Idle,
            depths,
            send: VecDeque::new(),
            unsent: 0,
            recv: VecDeque::new(),
            acks: Vec::new(),
            cq: VecDeque::new(),
            outstanding_send: 0,
            outstanding_recv: 0,
            next_seq: 0,
            peer_seq: 0,
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        matches!(self.phase, Phase::Broken(_))
    }

    /// Idle -> Connecting.
    pub(crate) fn start_connect(&mut self) -> Result<(), VerbsError> {
        match &self.phase {
            Phase::Idle => {
                self.phase = Phase::Connecting;
                Ok(())
            }
            Phase::Broken(why) => Err(VerbsError::Broken(why.clone())),
            Phase::Connecting | Phase::Connected => Err(VerbsError::AlreadyConnected),
        }
    }

    /// Connecting -> Idle, after a failed or cancelled `connect`.
    pub(crate) fn abort_connect(&mut self) {
        if self.phase == Phase::Connecting {
            self.phase = Phase::Idle;
        }
    }

    /// Connecting -> Connected.
    pub(crate) fn finish_connect(&mut self) -> Result<(), VerbsError> {
        match &self.phase {
            Phase::Connecting => {
                self.phase = Phase::Connected;
                Ok(())
            }
            Phase::Broken(why) => Err(VerbsError::Broken(why.clone())),
            Phase::Idle | Phase::Connected => Err(VerbsError::AlreadyConnected),
        }
    }

    /// Checks that a send or write may be posted now.
    pub(crate) fn check_send(&self) -> Result<(), VerbsError> {
        match &self.phase {
            Phase::Connected => {}
            Phase::Broken(why) => return Err(VerbsError::Broken(why.clone())),
            Phase::Idle | Phase::Connecting => return Err(VerbsError::NotConnected),
        }
        if self.outstanding_send >= self.depths.send {
            return Err(VerbsError::QueueFull {
                max: self.depths.send,
            });
        }
        Ok(())
    }

    /// Queues a send or write (after [`QueuePair::check_send`]); `header` gets the sequence
    /// number.
    pub(crate) fn post_send(
        &mut self,
        id: WorkId,
        kind: CompletionKind,
        lease: Lease,
        header: impl FnOnce(u32) -> Header,
    ) -> Result<(), VerbsError> {
        self.check_send()?;
        let header = header(self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.send.push_back(SendWr {
            id,
            kind,
            header,
            lease: Some(lease),
            outcome: None,
        });
        self.unsent += 1;
        self.outstanding_send += 1;
        Ok(())
    }

    /// Checks that a receive may be posted now.
    pub(crate) fn check_recv(&self) -> Result<(), VerbsError> {
        if let Phase::Broken(why) = &self.phase {
            return Err(VerbsError::Broken(why.clone()));
        }
        if self.outstanding_recv >= self.depths.recv {
            return Err(VerbsError::QueueFull {
                max: self.depths.recv,
            });
        }
        Ok(())
    }

    /// Queues a receive (after [`QueuePair::check_recv`]).
    pub(crate) fn post_recv(&mut self, id: WorkId, lease: Lease) -> Result<(), VerbsError> {
        self.check_recv()?;
        self.recv.push_back(RecvWr {
            id,
            lease: Some(lease),
            outcome: None,
        });
        self.outstanding_recv += 1;
        Ok(())
    }

    /// The next completion; `Err` once the queue pair is broken and everything is polled.
    pub(crate) fn poll(&mut self) -> Option<Result<Completion, VerbsError>> {
        if let Some(c) = self.cq.pop_front() {
            match c.kind {
                CompletionKind::Write | CompletionKind::Send => {
                    self.outstanding_send = self.outstanding_send.saturating_sub(1);
                }
                CompletionKind::WriteWithImm { .. } | CompletionKind::Recv { .. } => {
                    self.outstanding_recv = self.outstanding_recv.saturating_sub(1);
                }
            }
            return Some(Ok(c));
        }
        match &self.phase {
            Phase::Broken(why) if self.outstanding_send == 0 && self.outstanding_recv == 0 => {
                Some(Err(VerbsError::Broken(why.clone())))
            }
            _ => None,
        }
    }

    /// Takes what the writer should send next: owed responses first, then requests, up to
    /// `max_requests` of them and about `max_bytes` of payload (at least one request).
    pub(crate) fn take_outgoing(
        &mut self,
        acks: &mut Vec<Header>,
        requests: &mut Vec<Outgoing>,
        max_requests: usize,
        max_bytes: usize,
    ) {
        acks.append(&mut self.acks);
        if self.phase != Phase::Connected {
            return;
        }
        let mut bytes = 0usize;
        let first = self.send.len() - self.unsent;
        for wr in self.send.iter_mut().skip(first) {
            if requests.len() >= max_requests || (bytes >= max_bytes && !requests.is_empty()) {
                break;
            }
            // A queued request without its lease cannot be: only the writer takes leases,
            // and it takes each one once.
            let Some(lease) = wr.lease.take() else { break };
            bytes += lease.len();
            requests.push(Outgoing {
                header: wr.header,
                lease,
            });
            self.unsent -= 1;
        }
    }

    /// The writer is done with these requests (written, or failed to write).
    pub(crate) fn return_outgoing(&mut self, requests: Vec<Outgoing>) {
        for out in requests {
            let seq = out.header.seq;
            match self
                .send
                .iter_mut()
                .find(|wr| wr.header.seq == seq && wr.lease.is_none())
            {
                Some(wr) => wr.lease = Some(out.lease),
                // Cannot happen: an entry leaves the queue only with its lease. Dropping the
                // lease frees the range all the same.
                None => drop(out.lease),
            }
        }
        self.drain();
    }

    /// The peer's request `seq` arrived: checks its sequence number.
    pub(crate) fn begin_request(&mut self, seq: u32) -> Result<(), PeerMisbehaved> {
        if seq != self.peer_seq {
            return Err(PeerMisbehaved::OutOfSequence);
        }
        self.peer_seq = self.peer_seq.wrapping_add(1);
        Ok(())
    }

    /// Takes the next posted receive for an incoming SEND or WRITE_WITH_IMM.
    pub(crate) fn consume_recv(&mut self) -> Option<Consumed> {
        let wr = self
            .recv
            .iter_mut()
            .find(|wr| wr.outcome.is_none() && wr.lease.is_some())?;
        wr.lease.take().map(|lease| Consumed { lease })
    }

    /// The reader is done with a receive it consumed: records the outcome (unless the
    /// receive was flushed meanwhile) and gives the range back.
    pub(crate) fn finish_recv(
        &mut self,
        consumed: Consumed,
        kind: CompletionKind,
        status: Result<(), CompletionError>,
    ) {
        // The reader holds one receive at a time: the one without its lease.
        if let Some(wr) = self.recv.iter_mut().find(|wr| wr.lease.is_none()) {
            wr.lease = Some(consumed.lease);
            if wr.outcome.is_none() {
                wr.outcome = Some((kind, status));
            }
        }
        self.drain();
    }

    /// Queues our response to the peer's request `seq`.
    pub(crate) fn respond(&mut self, seq: u32, status: AckStatus) {
        self.acks.push(Header::ack(seq, status));
    }

    /// The peer acknowledged (or refused) our request `seq`.
    pub(crate) fn handle_ack(&mut self, seq: u32, status: AckStatus) -> Result<(), PeerMisbehaved> {
        let first = self.send.len() - self.unsent;
        let wr = self
            .send
            .iter_mut()
            .take(first)
            .find(|wr| wr.outcome.is_none())
            .ok_or(PeerMisbehaved::UnexpectedAck)?;
        if wr.header.seq != seq {
            return Err(PeerMisbehaved::UnexpectedAck);
        }
        let result = status.into_result();
        wr.outcome = Some(result.clone());
        if let Err(e) = result {
            self.break_with(BrokenReason::WorkRequestFailed(e));
        }
        self.drain();
        Ok(())
    }

    /// Moves to the error state (once; the first reason stays) and flushes all outstanding
    /// work.
    pub(crate) fn break_with(&mut self, reason: BrokenReason) {
        if self.is_broken() {
            return;
        }
        self.phase = Phase::Broken(reason);
        for wr in &mut self.send {
            wr.outcome.get_or_insert(Err(CompletionError::Flushed));
        }
        for wr in &mut self.recv {
            let kind = CompletionKind::Recv { len: 0 };
            wr.outcome
                .get_or_insert((kind, Err(CompletionError::Flushed)));
        }
        self.drain();
    }

    /// Queues the completions of the finished work at the front of each queue, freeing their
    /// ranges first.
    fn drain(&mut self) {
        while self
            .send
            .front()
            .is_some_and(|wr| wr.outcome.is_some() && wr.lease.is_some())
        {
            let Some(wr) = self.send.pop_front() else {
                break;
            };
            if self.unsent > self.send.len() {
                // It was never sent (flushed first).
                self.unsent -= 1;
            }
            drop(wr.lease);
            self.cq.push_back(Completion {
                id: wr.id,
                kind: wr.kind,
                status: wr.outcome.unwrap_or(Err(CompletionError::Flushed)),
            });
        }
        while self
            .recv
            .front()
            .is_some_and(|wr| wr.outcome.is_some() && wr.lease.is_some())
        {
            let Some(wr) = self.recv.pop_front() else {
                break;
            };
            drop(wr.lease);
            let (kind, status) = wr.outcome.unwrap_or((
                CompletionKind::Recv { len: 0 },
                Err(CompletionError::Flushed),
            ));
            self.cq.push_back(Completion {
                id: wr.id,
                kind,
                status,
            });
        }
    }
}
