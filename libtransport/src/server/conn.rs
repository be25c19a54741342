//! Per-connection state: the authenticated peer, its open transfers, its read budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use certs::SpiffeId;
use tokio::sync::Semaphore;

use super::handler::READ_BLOCK_BYTES;
use super::shared::{Shared, record, record_or_refuse};
use crate::audit::AuditEvent;
use crate::identity::Peer;
use crate::metrics::ConnectionGuard;
use crate::policy::{Access, Decision};
use crate::proto::connection::TransferTable;
use crate::proto::frame::MAX_DATA_PAYLOAD;
use crate::proto::{DatasetName, Digest, ErrorCode, Manifest, ObjectPath, TransferId};
use crate::store::{ObjectReader, ObjectWriter};
use crate::transport::Connection;
use crate::vocab::{Action, DecisionKind, Direction, Outcome, TransferPath};

/// One connection's state, shared by its request tasks.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: Peer,
    transfers: Mutex<TransferTable<Arc<Transfer>>>,
    /// Bytes read from disk ahead of the network, in KiB units.
    pub(crate) budget: Arc<Semaphore>,
    /// The most one disk read takes of the budget: half of it, so a read can run ahead of
    /// the block being sent, between one piece and [`READ_BLOCK_BYTES`].
    pub(crate) read_block_bytes: usize,
    /// The transport's connection underneath (for RDMA sessions' key export).
    pub(crate) conn: Arc<dyn Connection>,
    /// Counts this connection in the metrics while it lives.
    _open: ConnectionGuard,
}

/// An open transfer.
#[derive(Debug)]
pub(crate) struct Transfer {
    pub(crate) dataset: DatasetName,
    pub(crate) object: ObjectPath,
    pub(crate) root: Digest,
    pub(crate) kind: TransferKind,
    pub(crate) started: Instant,
    pub(crate) bytes: AtomicU64,
    /// Whether its chunks moved by RDMA (the audit record and metrics name the path).
    pub(crate) rdma: AtomicBool,
    /// The striped pull it is a part of, if any.
    group: Option<GroupKey>,
}

/// A striped pull: its peer, the id its client picked, the object version.
type GroupKey = (SpiffeId, [u8; 16], Digest);

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
enum PartEnd {
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
    fn join(&self, key: &GroupKey, now: Instant) -> bool {
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
    fn leave(&self, key: &GroupKey, bytes: u64, rdma: bool) -> PartEnd {
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

#[derive(Debug)]
pub(crate) enum TransferKind {
    Read(ObjectReader),
    /// `None` once committed.
    Write(Mutex<Option<ObjectWriter>>),
}

impl TransferKind {
    /// Which way bytes move, seen from this node.
    pub(crate) fn direction(&self) -> Direction {
        match self {
            Self::Read(_) => Direction::Out,
            Self::Write(_) => Direction::In,
        }
    }
}

impl ConnCtx {
    pub(crate) fn new(shared: Arc<Shared>, peer: Peer, conn: Arc<dyn Connection>) -> Self {
        let kib = (shared.config.transport.max_buffered_bytes / 1024).min(u64::from(u32::MAX));
        let read_block_bytes = usize::try_from(kib * 1024 / 2)
            .unwrap_or(usize::MAX)
            .clamp(MAX_DATA_PAYLOAD, READ_BLOCK_BYTES);
        let table = TransferTable::new(shared.config.transport.max_transfers as usize);
        Self {
            _open: shared.config.metrics.connection_opened(peer.path),
            shared,
            peer,
            conn,
            transfers: Mutex::new(table),
            budget: Arc::new(Semaphore::new(kib as usize)),
            read_block_bytes,
        }
    }

    /// Asks the policy and records the decision. A denial reads as "not found" to the peer;
    /// a decision that cannot be recorded refuses the request (the trail fails closed).
    pub(crate) fn authorize(
        &self,
        action: Action,
        dataset: &DatasetName,
        object: Option<&ObjectPath>,
    ) -> Result<(), ErrorCode> {
        let policy = self.shared.config.policy.current();
        let decision = policy.decide(&Access {
            peer: &self.peer.id,
            action,
            dataset,
            object,
        });
        let (kind, rule, reason) = match &decision {
            Decision::Allow { rule } => (DecisionKind::Allow, Some(rule.clone()), None),
            Decision::Deny { rule, reason } => {
                tracing::info!(
                    peer.id = %self.peer.id,
                    dataset = %dataset,
                    action = %action,
                    decision = "deny",
                    "access denied"
                );
                (DecisionKind::Deny, rule.clone(), Some(reason.clone()))
            }
        };
        record_or_refuse(
            &self.shared,
            AuditEvent::Authorization {
                peer: self.peer.id.clone(),
                action,
                dataset: dataset.clone(),
                object: object.cloned(),
                decision: kind,
                rule,
                reason,
            },
        )?;
        if decision.is_allow() {
            Ok(())
        } else {
            let by_rule = matches!(&decision, Decision::Deny { rule: Some(_), .. });
            self.shared.config.metrics.denial(action, by_rule);
            Err(ErrorCode::NotFound)
        }
    }

    /// Registers a transfer, within the per-connection limit, and records its start; a
    /// start that cannot be recorded is refused.
    pub(crate) fn open(
        &self,
        dataset: DatasetName,
        object: ObjectPath,
        manifest: &Manifest,
        kind: TransferKind,
    ) -> Result<TransferId, ErrorCode> {
        self.open_part(dataset, object, manifest, kind, None)
    }

    /// As [`ConnCtx::open`], for a part of the striped pull `group` (if any): only the
    /// pull's first part records its start.
    pub(crate) fn open_part(
        &self,
        dataset: DatasetName,
        object: ObjectPath,
        manifest: &Manifest,
        kind: TransferKind,
        group: Option<[u8; 16]>,
    ) -> Result<TransferId, ErrorCode> {
        self.lock().check_room()?;
        let now = self.shared.config.clock.instant();
        let group = group.map(|g| (self.peer.id.clone(), g, manifest.root()));
        if let Some(key) = &group
            && !self.shared.stripes.join(key, now)
        {
            return self.insert(dataset, object, manifest, kind, group, now);
        }
        let started = record_or_refuse(
            &self.shared,
            AuditEvent::TransferStarted {
                peer: self.peer.id.clone(),
                direction: kind.direction(),
                dataset: dataset.clone(),
                object: object.clone(),
                size: manifest.size(),
                root: manifest.root(),
                path: self.peer.path.into(),
            },
        );
        if let Err(e) = started {
            if let Some(key) = &group {
                self.shared.stripes.leave(key, 0, false);
            }
            return Err(e);
        }
        self.insert(dataset, object, manifest, kind, group, now)
    }

    fn insert(
        &self,
        dataset: DatasetName,
        object: ObjectPath,
        manifest: &Manifest,
        kind: TransferKind,
        group: Option<GroupKey>,
        now: Instant,
    ) -> Result<TransferId, ErrorCode> {
        let inserted = self.lock().insert(Arc::new(Transfer {
            dataset,
            object,
            root: manifest.root(),
            kind,
            started: now,
            bytes: AtomicU64::new(0),
            rdma: AtomicBool::new(false),
            group: group.clone(),
        }));
        if inserted.is_err()
            && let Some(key) = &group
        {
            self.shared.stripes.leave(key, 0, false);
        }
        Ok(inserted?)
    }

    pub(crate) fn get(&self, id: TransferId) -> Result<Arc<Transfer>, ErrorCode> {
        Ok(self.lock().get(id)?.clone())
    }

    pub(crate) fn remove(&self, id: TransferId) -> Result<Arc<Transfer>, ErrorCode> {
        Ok(self.lock().remove(id)?)
    }

    /// Records a transfer's end in the audit trail and the metrics; a part of a striped
    /// pull only once it is the last, with the whole pull's bytes, complete if they are the
    /// object's.
    pub(crate) fn ended(&self, t: &Transfer, outcome: Outcome) {
        let direction = t.kind.direction();
        let (mut bytes, mut rdma, mut started) = (
            t.bytes.load(Ordering::Relaxed),
            t.rdma.load(Ordering::Relaxed),
            t.started,
        );
        let mut outcome = outcome;
        if let Some(key) = &t.group {
            match self.shared.stripes.leave(key, bytes, rdma) {
                PartEnd::Open => return,
                PartEnd::Last {
                    bytes: all,
                    rdma: any,
                    started: first,
                } => {
                    (bytes, rdma, started) = (all, any, first);
                    if let TransferKind::Read(r) = &t.kind
                        && bytes >= r.manifest().size()
                    {
                        outcome = Outcome::Complete;
                    }
                }
            }
        }
        let path = if rdma {
            TransferPath::Rdma
        } else {
            self.peer.path.into()
        };
        let elapsed = self
            .shared
            .config
            .clock
            .instant()
            .saturating_duration_since(started);
        tracing::info!(
            peer.id = %self.peer.id,
            dataset = %t.dataset,
            object.digest = %t.object.digest().short(),
            bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            outcome = ?outcome,
            "transfer ended"
        );
        self.shared
            .config
            .metrics
            .transfer_ended(path, direction, outcome, bytes, elapsed);
        record(
            &self.shared,
            AuditEvent::Transfer {
                peer: self.peer.id.clone(),
                direction,
                dataset: t.dataset.clone(),
                object: t.object.clone(),
                bytes,
                root: t.root,
                path,
                outcome,
                duration_ms: elapsed.as_millis() as u64,
            },
        );
    }

    /// The connection is over: transfers still open were interrupted.
    pub(crate) fn finish(&self) {
        let open = self.lock().drain();
        for t in open {
            self.ended(&t, Outcome::Interrupted);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TransferTable<Arc<Transfer>>> {
        self.transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
