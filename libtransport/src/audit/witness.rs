//! Witnessed checkpoints: each checkpoint a node signs is also held by a witness outside the
//! node (the issuer, by default), which keeps them append-only and countersigns them.
//!
//! A node's checkpoint key sits on the node, so root on that node could rebuild the whole
//! trail and sign it again: `verify` alone cannot tell. A witness breaks that: it holds
//! `(seq, prev, hash)` of every checkpoint it was sent, refuses to replace one it holds or to
//! go back before the latest, and answers with a [`Receipt`]: its own signature over the node's
//! ID and the checkpoint. [`verify_witnessed`](super::verify_witnessed) then checks that every
//! witnessed checkpoint is still in the trail, record for record; a rebuilt trail is not.
//!
//! Sending is best effort and never on the request path: checkpoints wait in a bounded
//! [`WitnessQueue`] until the witness answers. When the queue is full the oldest go first: a
//! witnessed checkpoint vouches for every record before it, so the newest matter most.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use certs::{SpiffeId, TrustBundle};
use serde::{Deserialize, Serialize};

use super::file::{SignError, Signer, hex};
use crate::proto::Digest;

/// Domain separation for witness countersignatures.
pub const WITNESS_CONTEXT: &[u8] = b"transportd audit witness v1\n";

/// A checkpoint as a witness holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessedCheckpoint {
    /// The checkpoint record's sequence number.
    pub seq: u64,
    /// Its `prev`: the hash of the record before it, which the node signed.
    pub prev: Digest,
    /// The hash of the checkpoint record's own line.
    pub hash: Digest,
}

/// What a witness signs for `node`'s checkpoint `cp`, witnessed at `at_secs` (Unix seconds).
pub fn witness_message(node: &SpiffeId, cp: &WitnessedCheckpoint, at_secs: u64) -> Vec<u8> {
    let id = node.as_str().as_bytes();
    let mut m = Vec::with_capacity(WITNESS_CONTEXT.len() + 4 + id.len() + 8 + 64 + 8);
    m.extend_from_slice(WITNESS_CONTEXT);
    m.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(id);
    m.extend_from_slice(&cp.seq.to_be_bytes());
    m.extend_from_slice(&cp.prev.0);
    m.extend_from_slice(&cp.hash.0);
    m.extend_from_slice(&at_secs.to_be_bytes());
    m
}

/// A witness's countersignature of one checkpoint: what a node keeps beside its trail and an
/// auditor compares the trail with. One JSON object per line in `witness.jsonl` and in
/// `transportd issuer witness export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The node whose trail holds the checkpoint.
    pub node: SpiffeId,
    /// The checkpoint's sequence number.
    pub seq: u64,
    /// Its `prev`.
    pub prev: Digest,
    /// The hash of its line.
    pub hash: Digest,
    /// When the witness took it, RFC 3339 (whole seconds; signed).
    pub witnessed_at: String,
    /// The witness's SPIFFE ID.
    pub witness: SpiffeId,
    /// The countersignature's algorithm.
    pub alg: String,
    /// The witness's certificate chain, DER, hex, leaf first.
    pub chain: Vec<String>,
    /// The countersignature over [`witness_message`], hex.
    pub signature: String,
}

impl Receipt {
    /// Countersigns `node`'s checkpoint `cp` at `at` with `signer` (the witness's identity).
    pub fn sign(
        node: &SpiffeId,
        cp: &WitnessedCheckpoint,
        at: SystemTime,
        signer: &dyn Signer,
    ) -> Result<Self, SignError> {
        let secs = unix_secs(at);
        let sig = signer.sign_checkpoint(&witness_message(node, cp, secs))?;
        Ok(Self {
            node: node.clone(),
            seq: cp.seq,
            prev: cp.prev,
            hash: cp.hash,
            witnessed_at: humantime::format_rfc3339_seconds(at).to_string(),
            witness: sig.signer,
            alg: sig.alg,
            chain: sig.chain.iter().map(|c| hex(c)).collect(),
            signature: hex(&sig.signature),
        })
    }

    /// The checkpoint it is for.
    pub fn checkpoint(&self) -> WitnessedCheckpoint {
        WitnessedCheckpoint {
            seq: self.seq,
            prev: self.prev,
            hash: self.hash,
        }
    }

    /// Checks the countersignature; with `bundle`, also that the witness's chain verifies
    /// against it at the time of witnessing and names the witness the receipt claims.
    pub fn verify(&self, bundle: Option<&TrustBundle>) -> Result<(), String> {
        let at = humantime::parse_rfc3339(&self.witnessed_at)
            .map_err(|e| format!("witnessed_at: {e}"))?;
        let message = witness_message(&self.node, &self.checkpoint(), unix_secs(at));
        let signer = super::verify::check_signed(
            Some(self.alg.as_str()),
            &self.chain,
            &message,
            &self.signature,
            bundle.map(|b| (b, at)),
        )?;
        match signer {
            Some(id) if id != self.witness => {
                Err(format!("countersigned by {id} but claims {}", self.witness))
            }
            _ => Ok(()),
        }
    }
}

/// What a witness does with a checkpoint it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessDecision {
    /// New and after every one held: keep it and countersign.
    Accept,
    /// Exactly the one held for its `seq` (a retry): answer with the receipt held.
    Held,
    /// Refused; the witness records the refusal in its own trail.
    Refuse(WitnessRefusal),
}

/// Why a witness refused a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessRefusal {
    /// A different checkpoint is held for this `seq`: the trail was rewritten.
    Rewrite {
        /// The checkpoint sent.
        sent: WitnessedCheckpoint,
        /// The one held.
        held: WitnessedCheckpoint,
    },
    /// Its `seq` is not above the latest one held (and none is held for it): the trail went
    /// back.
    Stale {
        /// The checkpoint sent.
        sent: WitnessedCheckpoint,
        /// The latest `seq` held.
        last: u64,
    },
}

impl fmt::Display for WitnessRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rewrite { sent, held } => write!(
                f,
                "checkpoint seq {} conflicts with the one witnessed for that seq (prev {} / {}): \
                 the node's trail was rewritten after it was witnessed",
                sent.seq,
                sent.prev.short(),
                held.prev.short()
            ),
            Self::Stale { sent, last } => write!(
                f,
                "checkpoint seq {} is not above the latest witnessed (seq {last}): the node's \
                 trail went back",
                sent.seq
            ),
        }
    }
}

/// The append-only rule, without storage: `held` is what the witness holds for `cp.seq`,
/// `last` the latest `seq` it holds for the node.
pub fn decide(
    held: Option<&WitnessedCheckpoint>,
    last: Option<u64>,
    cp: &WitnessedCheckpoint,
) -> WitnessDecision {
    match (held, last) {
        (Some(h), _) if h == cp => WitnessDecision::Held,
        (Some(h), _) => WitnessDecision::Refuse(WitnessRefusal::Rewrite {
            sent: *cp,
            held: *h,
        }),
        (None, Some(last)) if cp.seq <= last => {
            WitnessDecision::Refuse(WitnessRefusal::Stale { sent: *cp, last })
        }
        _ => WitnessDecision::Accept,
    }
}

/// Checkpoints waiting for the witness, and how witnessing stands. Cheap to clone; the sink
/// pushes, the sender takes and acknowledges.
#[derive(Debug, Clone)]
pub struct WitnessQueue {
    inner: Arc<Mutex<QueueInner>>,
}

#[derive(Debug)]
struct QueueInner {
    pending: VecDeque<(WitnessedCheckpoint, Instant)>,
    capacity: usize,
    dropped: u64,
    last_witnessed: Option<u64>,
    refused: u64,
    last_refusal: Option<String>,
    last_error: Option<String>,
}

/// Where witnessing stands, for metrics and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessStatus {
    /// Checkpoints not yet witnessed.
    pub pending: usize,
    /// When the oldest of them was queued.
    pub oldest: Option<Instant>,
    /// The latest checkpoint witnessed since the node started.
    pub last_witnessed: Option<u64>,
    /// Checkpoints dropped unwitnessed because the queue was full (newer ones cover them).
    pub dropped: u64,
    /// Checkpoints the witness refused.
    pub refused: u64,
    /// Why it refused the last one.
    pub last_refusal: Option<String>,
    /// Why the last attempt to reach the witness failed, if it did.
    pub last_error: Option<String>,
}

impl WitnessQueue {
    /// A queue holding at most `capacity` checkpoints (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(QueueInner {
                pending: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
                last_witnessed: None,
                refused: 0,
                last_refusal: None,
                last_error: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a checkpoint, dropping the oldest waiting one if full.
    pub fn push(&self, cp: WitnessedCheckpoint, now: Instant) {
        let mut g = self.lock();
        if g.pending.len() >= g.capacity {
            g.pending.pop_front();
            g.dropped += 1;
        }
        g.pending.push_back((cp, now));
    }

    /// The waiting checkpoints, oldest first (they stay queued until acknowledged).
    pub fn waiting(&self) -> Vec<WitnessedCheckpoint> {
        self.lock().pending.iter().map(|(c, _)| *c).collect()
    }

    /// The witness holds `seq`: it and everything queued before it leave the queue.
    pub fn witnessed(&self, seq: u64) {
        let mut g = self.lock();
        g.pending.retain(|(c, _)| c.seq > seq);
        g.last_witnessed = Some(g.last_witnessed.map_or(seq, |l| l.max(seq)));
        g.last_error = None;
    }

    /// The witness refused `seq` for `reason`: it leaves the queue (it would be refused
    /// again) and the refusal is kept for `/readyz`.
    pub fn refused(&self, seq: u64, reason: String) {
        let mut g = self.lock();
        g.pending.retain(|(c, _)| c.seq != seq);
        g.refused += 1;
        g.last_refusal = Some(format!("seq {seq}: {reason}"));
        g.last_error = None;
    }

    /// The witness could not be reached (or failed): everything stays queued.
    pub fn unreachable(&self, error: String) {
        self.lock().last_error = Some(error);
    }

    /// Where witnessing stands.
    pub fn status(&self) -> WitnessStatus {
        let g = self.lock();
        WitnessStatus {
            pending: g.pending.len(),
            oldest: g.pending.front().map(|(_, t)| *t),
            last_witnessed: g.last_witnessed,
            dropped: g.dropped,
            refused: g.refused,
            last_refusal: g.last_refusal.clone(),
            last_error: g.last_error.clone(),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn cp(seq: u64, b: u8) -> WitnessedCheckpoint {
        WitnessedCheckpoint {
            seq,
            prev: Digest([b; 32]),
            hash: Digest([b.wrapping_add(1); 32]),
        }
    }

    #[test]
    fn a_witness_only_appends() {
        assert_eq!(decide(None, None, &cp(3, 1)), WitnessDecision::Accept);
        assert_eq!(decide(None, Some(3), &cp(9, 1)), WitnessDecision::Accept);
        assert_eq!(
            decide(Some(&cp(9, 1)), Some(9), &cp(9, 1)),
            WitnessDecision::Held
        );
        let rewrite = decide(Some(&cp(9, 1)), Some(12), &cp(9, 2));
        assert_eq!(
            rewrite,
            WitnessDecision::Refuse(WitnessRefusal::Rewrite {
                sent: cp(9, 2),
                held: cp(9, 1)
            })
        );
        // Between two held checkpoints, or at the latest with nothing held: the trail went
        // back.
        assert!(matches!(
            decide(None, Some(12), &cp(10, 1)),
            WitnessDecision::Refuse(WitnessRefusal::Stale { last: 12, .. })
        ));
        assert!(matches!(
            decide(None, Some(12), &cp(12, 1)),
            WitnessDecision::Refuse(WitnessRefusal::Stale { .. })
        ));
        let WitnessDecision::Refuse(r) = rewrite else {
            unreachable!()
        };
        assert!(r.to_string().contains("seq 9"), "{r}");
    }

    #[test]
    fn the_queue_keeps_the_newest_and_acknowledges_everything_up_to_a_seq() {
        let q = WitnessQueue::new(3);
        let t = SystemClock.instant();
        for s in [5, 10, 15, 20] {
            q.push(cp(s, 0), t);
        }
        let waiting: Vec<u64> = q.waiting().iter().map(|c| c.seq).collect();
        assert_eq!(waiting, vec![10, 15, 20]);
        assert_eq!(q.status().dropped, 1);
        q.unreachable("connection refused".into());
        assert_eq!(q.status().last_error.as_deref(), Some("connection refused"));
        q.witnessed(15);
        let s = q.status();
        assert_eq!(s.pending, 1);
        assert_eq!(s.last_witnessed, Some(15));
        assert_eq!(s.last_error, None);
        q.refused(20, "rewrite".into());
        let s = q.status();
        assert_eq!((s.pending, s.refused), (0, 1));
        assert_eq!(s.last_refusal.as_deref(), Some("seq 20: rewrite"));
        // A late acknowledgement never moves the last witnessed seq back.
        q.witnessed(10);
        assert_eq!(q.status().last_witnessed, Some(15));
    }
}
