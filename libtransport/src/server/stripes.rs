//! Striped pulls on a node: the parts a peer opens over several connections with one pull
//! id are one transfer in the trail.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use certs::SpiffeId;

use crate::proto::Digest;

/// A striped pull: its peer, the id its client picked, the object version.
pub(crate) type GroupKey = (SpiffeId, [u8; 16], Digest);

/// The striped pulls with parts open on this node: a striped pull is one transfer in the
/// trail, started when its first part opens and ended when its last part ends, with all
/// parts' bytes. Parts join by the peer's own identity: another peer's parts, or parts of
/// another version of the object, are another pull.
#[derive(Debug, Default)]
pub(crate) struct StripeGroups(Mutex<HashMap<GroupKey, Group>>);

#[derive(Debug)]
struct Group {
    parts: usize,
    bytes: u64,
    rdma: bool,
    started: Instant,
}

/// What a part's end means for its striped pull.
#[derive(Debug, PartialEq)]
pub(crate) enum PartEnd {
    /// Other parts are still open.
    Open,
    /// It was the last: the pull moved this many bytes, from `started`.
    Last {
        bytes: u64,
        rdma: bool,
        started: Instant,
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
                    },
                );
                true
            }
        }
    }

    /// A part ends, having moved `bytes`.
    pub(crate) fn leave(&self, key: &GroupKey, bytes: u64, rdma: bool) -> PartEnd {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(key) else {
            return PartEnd::Open;
        };
        g.parts = g.parts.saturating_sub(1);
        g.bytes += bytes;
        g.rdma |= rdma;
        if g.parts > 0 {
            return PartEnd::Open;
        }
        let (bytes, rdma, started) = (g.bytes, g.rdma, g.started);
        groups.remove(key);
        PartEnd::Last {
            bytes,
            rdma,
            started,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
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
        assert_eq!(groups.leave(&k, 10, false), PartEnd::Open);
        assert_eq!(groups.leave(&k, 20, true), PartEnd::Open);
        assert_eq!(
            groups.leave(&k, 30, false),
            PartEnd::Last {
                bytes: 60,
                rdma: true,
                started: now
            }
        );
        // Ended: the same id starts a new pull (a later attempt).
        assert!(groups.join(&k, now));
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
            groups.leave(&theirs, 1 << 20, false),
            PartEnd::Last { bytes, .. } if bytes == 1 << 20
        ));
        assert!(matches!(
            groups.leave(&other_version, 5, false),
            PartEnd::Last { .. }
        ));
        assert_eq!(
            groups.leave(&ours, 3, false),
            PartEnd::Last {
                bytes: 3,
                rdma: false,
                started: now
            }
        );
        // A part of a pull that is not open is nobody's.
        assert_eq!(groups.leave(&ours, 3, false), PartEnd::Open);
    }
}
