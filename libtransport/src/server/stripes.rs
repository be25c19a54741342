//! Striped transfers on a node: the parts a peer opens over several connections with one
//! transfer id are one transfer in the trail, and the parts of a striped push write one
//! partial object.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use certs::SpiffeId;

use crate::proto::{Digest, ErrorCode};
use crate::store::ObjectWriter;
use crate::vocab::Outcome;

/// A striped transfer: its peer, the id its client picked, the object version (for a push,
/// the manifest the client sent).
pub(crate) type GroupKey = (SpiffeId, [u8; 16], Digest);

/// An object being written, shared by the parts of a striped push (one part for a push
/// over one connection); `None` once committed. The object's write lock is held while any
/// part holds it.
pub(crate) type WriterSlot = Mutex<Option<ObjectWriter>>;

/// The striped transfers with parts open on this node: a striped transfer is one transfer
/// in the trail, started when its first part opens and ended when its last part ends, with
/// all parts' bytes. Parts join by the peer's own identity: another peer's parts, or parts
/// of another version of the object, are another transfer.
#[derive(Debug, Default)]
pub(crate) struct StripeGroups {
    groups: Mutex<HashMap<GroupKey, Group>>,
    /// The writers of striped pushes, while a part holds one or one is being opened.
    writers: Mutex<HashMap<GroupKey, Arc<tokio::sync::Mutex<Weak<WriterSlot>>>>>,
}

#[derive(Debug)]
struct Group {
    parts: usize,
    bytes: u64,
    rdma: bool,
    started: Instant,
    /// The outcome a part settled for the whole transfer: a push's commit (complete or
    /// failed) on whichever connection it came.
    settled: Option<Outcome>,
}

/// What a part's end means for its striped pull.
#[derive(Debug, PartialEq)]
pub(crate) enum PartEnd {
    /// Other parts are still open.
    Open,
    /// It was the last: the transfer moved this many bytes, from `started`, and ended so.
    Last {
        bytes: u64,
        rdma: bool,
        started: Instant,
        outcome: Outcome,
    },
}

impl StripeGroups {
    /// A part opens: whether it is the pull's first.
    pub(crate) fn join(&self, key: &GroupKey, now: Instant) -> bool {
        let mut groups = self.lock();
        match groups.get_mut(key) {
            Some(g) => {
                g.parts += 1;
                false
            }
            None => {
                groups.insert(
                    key.clone(),
                    Group {
                        parts: 1,
                        bytes: 0,
                        rdma: false,
                        started: now,
                        settled: None,
                    },
                );
                true
            }
        }
    }

    /// A part ends, having moved `bytes`, with `outcome` as far as it knows. A commit's
    /// outcome (complete or failed) settles the transfer's; otherwise the last part's is.
    pub(crate) fn leave(
        &self,
        key: &GroupKey,
        bytes: u64,
        rdma: bool,
        outcome: Outcome,
    ) -> PartEnd {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(key) else {
            return PartEnd::Open;
        };
        g.parts = g.parts.saturating_sub(1);
        g.bytes += bytes;
        g.rdma |= rdma;
        if matches!(outcome, Outcome::Complete | Outcome::Failed) {
            g.settled.get_or_insert(outcome);
        }
        if g.parts > 0 {
            return PartEnd::Open;
        }
        let (bytes, rdma, started) = (g.bytes, g.rdma, g.started);
        let outcome = g.settled.unwrap_or(outcome);
        groups.remove(key);
        PartEnd::Last {
            bytes,
            rdma,
            started,
            outcome,
        }
    }

    /// The writer a part of the striped push `key` writes through: the one the push's
    /// other parts hold, or, for its first part, the one `open` opens. Parts that arrive
    /// while the first opens wait for it, so they never race it for the object's lock; if
    /// the first fails to open, the next tries in turn.
    pub(crate) async fn writer<F>(
        &self,
        key: &GroupKey,
        open: F,
    ) -> Result<Arc<WriterSlot>, ErrorCode>
    where
        F: Future<Output = Result<ObjectWriter, ErrorCode>>,
    {
        let gate = {
            let mut writers = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
            // Forget pushes whose parts have all ended and that nobody is opening.
            writers.retain(|_, g| {
                Arc::strong_count(g) > 1 || g.try_lock().map_or(true, |w| w.strong_count() > 0)
            });
            writers.entry(key.clone()).or_default().clone()
        };
        let mut held = gate.lock().await;
        if let Some(w) = held.upgrade() {
            return Ok(w);
        }
        let w = Arc::new(Mutex::new(Some(open.await?)));
        *held = Arc::downgrade(&w);
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(peer: &str, group: u8, root: u8) -> GroupKey {
        (
            SpiffeId::parse(&format!("spiffe://hospital.example/{peer}")).unwrap(),
            [group; 16],
            Digest([root; 32]),
        )
    }

    #[test]
    fn a_striped_pull_ends_once_with_every_parts_bytes() {
        let groups = StripeGroups::default();
        let now = crate::clock::Clock::instant(&crate::clock::SystemClock);
        let k = key("gpu/loader", 1, 1);
        assert!(groups.join(&k, now), "the first part starts the pull");
        assert!(!groups.join(&k, now));
        assert!(!groups.join(&k, now));
        assert_eq!(
            groups.leave(&k, 10, false, Outcome::Incomplete),
            PartEnd::Open
        );
        assert_eq!(
            groups.leave(&k, 20, true, Outcome::Interrupted),
            PartEnd::Open
        );
        assert_eq!(
            groups.leave(&k, 30, false, Outcome::Incomplete),
            PartEnd::Last {
                bytes: 60,
                rdma: true,
                started: now,
                outcome: Outcome::Incomplete,
            }
        );
        // Ended: the same id starts a new pull (a later attempt).
        assert!(groups.join(&k, now));
    }

    #[test]
    fn a_commit_on_any_part_settles_a_striped_push() {
        let groups = StripeGroups::default();
        let now = crate::clock::Clock::instant(&crate::clock::SystemClock);
        let k = key("gpu/writer", 3, 9);
        for first in [true, false, false] {
            assert_eq!(groups.join(&k, now), first);
        }
        // A further part is closed, the first commits, then a part's connection drops: the
        // push is complete, with every part's bytes.
        assert_eq!(
            groups.leave(&k, 5, false, Outcome::Incomplete),
            PartEnd::Open
        );
        assert_eq!(groups.leave(&k, 7, false, Outcome::Complete), PartEnd::Open);
        assert_eq!(
            groups.leave(&k, 1, false, Outcome::Interrupted),
            PartEnd::Last {
                bytes: 13,
                rdma: false,
                started: now,
                outcome: Outcome::Complete,
            }
        );
        // A failed commit settles it as failed; without a commit the last part's outcome
        // stands.
        assert!(groups.join(&k, now));
        assert!(!groups.join(&k, now));
        assert_eq!(groups.leave(&k, 0, false, Outcome::Failed), PartEnd::Open);
        assert!(matches!(
            groups.leave(&k, 0, false, Outcome::Incomplete),
            PartEnd::Last {
                outcome: Outcome::Failed,
                ..
            }
        ));
        assert!(groups.join(&k, now));
        assert!(matches!(
            groups.leave(&k, 0, false, Outcome::Interrupted),
            PartEnd::Last {
                outcome: Outcome::Interrupted,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn the_parts_of_a_striped_push_share_one_writer_and_another_push_waits_its_turn() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::proto::manifest::MIN_CHUNK_BYTES;
        use crate::proto::{DatasetName, Manifest, ObjectPath};
        use crate::store::{Store, StoreError};

        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("data/ckpt")).unwrap();
        let store = Arc::new(Store::open(tmp.path().join("data"), None, MIN_CHUNK_BYTES).unwrap());
        let data = vec![7u8; 3 * MIN_CHUNK_BYTES as usize];
        let manifest = Arc::new(Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap());
        let (ckpt, object) = (
            DatasetName::new("ckpt").unwrap(),
            ObjectPath::new("model.bin").unwrap(),
        );
        let opened = AtomicUsize::new(0);
        let open = |owner: &'static str| {
            let (store, m, d, o, opened) =
                (store.clone(), manifest.clone(), &ckpt, &object, &opened);
            async move {
                opened.fetch_add(1, Ordering::SeqCst);
                // Lets the other parts arrive while this one opens.
                tokio::task::yield_now().await;
                store.open_write(d, o, m, owner).map_err(|e| match e {
                    StoreError::Conflict => ErrorCode::Busy,
                    _ => ErrorCode::Internal,
                })
            }
        };
        let groups = StripeGroups::default();
        let ours = key("gpu/writer", 1, 1);
        let (a, b, c) = tokio::join!(
            groups.writer(&ours, open("a")),
            groups.writer(&ours, open("a")),
            groups.writer(&ours, open("a")),
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert!(
            Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c),
            "one writer for every part"
        );
        assert_eq!(opened.load(Ordering::SeqCst), 1, "the object opened once");
        // Another push of the object (another id) finds it locked while any part is open.
        let theirs = key("gpu/writer", 2, 1);
        assert_eq!(
            groups.writer(&theirs, open("a")).await.err(),
            Some(ErrorCode::Busy)
        );
        drop((a, b));
        assert_eq!(
            groups.writer(&theirs, open("a")).await.err(),
            Some(ErrorCode::Busy)
        );
        // Once the last part lets go, the lock is free and the next push opens its own.
        drop(c);
        let next = groups.writer(&theirs, open("a")).await.unwrap();
        assert!(next.lock().unwrap().is_some());
        assert_eq!(opened.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn another_peer_or_another_object_version_never_joins_a_pull() {
        let groups = StripeGroups::default();
        let now = crate::clock::Clock::instant(&crate::clock::SystemClock);
        let ours = key("gpu/loader", 7, 1);
        assert!(groups.join(&ours, now));
        // The same group id from another identity, or for another version of the object,
        // is a pull of its own: it cannot end ours or add to its bytes.
        let theirs = key("gpu/intruder", 7, 1);
        let other_version = key("gpu/loader", 7, 2);
        assert!(groups.join(&theirs, now));
        assert!(groups.join(&other_version, now));
        assert!(matches!(
            groups.leave(&theirs, 1 << 20, false, Outcome::Incomplete),
            PartEnd::Last { bytes, .. } if bytes == 1 << 20
        ));
        assert!(matches!(
            groups.leave(&other_version, 5, false, Outcome::Incomplete),
            PartEnd::Last { .. }
        ));
        assert_eq!(
            groups.leave(&ours, 3, false, Outcome::Incomplete),
            PartEnd::Last {
                bytes: 3,
                rdma: false,
                started: now,
                outcome: Outcome::Incomplete,
            }
        );
        // A part of a pull that is not open is nobody's.
        assert_eq!(
            groups.leave(&ours, 3, false, Outcome::Complete),
            PartEnd::Open
        );
    }
}
