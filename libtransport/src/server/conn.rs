//! Per-connection state: the authenticated peer, its open transfers, its read budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Semaphore;

use super::shared::{Shared, record, record_emergency_use, record_or_refuse};
use super::stripes::{GroupKey, PartEnd, WriterSlot};
use crate::audit::AuditEvent;
use crate::identity::Peer;
use crate::metrics::ConnectionGuard;
use crate::policy::{Access, Decision};
use crate::proto::connection::TransferTable;
use crate::proto::frame::MAX_DATA_PAYLOAD;
use crate::proto::{DatasetName, Digest, ErrorCode, Manifest, ObjectPath, TransferId};
use crate::store::ObjectReader;
use crate::transport::Connection;
use crate::vocab::{Action, DecisionKind, Direction, Outcome, TransferPath};

/// The most a read request reads from disk in one blocking call (one default chunk): fewer
/// calls and task hand-offs than one per piece, and one buffer for the pieces to share.
pub(crate) const READ_BLOCK_BYTES: usize = 4 << 20;

/// One connection's state, shared by its request tasks.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: Peer,
    transfers: Mutex<TransferTable<Arc<Transfer>>>,
    /// Bytes read from disk ahead of the network, in KiB units: this connection's own...
    pub(crate) budget: Arc<Semaphore>,
    /// ... and its identity's share of the node's (`server/memory.rs`).
    pub(crate) identity_budget: Arc<Semaphore>,
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
    /// The striped transfer it is a part of, if any.
    group: Option<GroupKey>,
}

#[derive(Debug)]
pub(crate) enum TransferKind {
    Read(ObjectReader),
    /// Shared by the parts of a striped push.
    Write(Arc<WriterSlot>),
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
            .min(shared.memory.max_block_kib() * 1024)
            .clamp(MAX_DATA_PAYLOAD, READ_BLOCK_BYTES);
        let identity_budget = shared.memory.identity(&peer.id);
        let table = TransferTable::new(shared.config.transport.max_transfers as usize);
        Self {
            _open: shared.config.metrics.connection_opened(peer.path),
            shared,
            peer,
            conn,
            transfers: Mutex::new(table),
            budget: Arc::new(Semaphore::new(kib as usize)),
            identity_budget,
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
            Decision::Allow { .. } | Decision::Emergency { .. } => {
                (DecisionKind::Allow, decision.rule(), None)
            }
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
                class: policy.class_of(dataset),
                decision: kind,
                rule,
                reason,
            },
        )?;
        if let Decision::Emergency { grant, reason } = decision {
            record_emergency_use(
                &self.shared,
                &self.peer.id,
                action,
                dataset,
                object,
                grant,
                reason,
            )
        } else if decision.is_allow() {
            Ok(())
        } else {
            let by_rule = matches!(&decision, Decision::Deny { rule: Some(_), .. });
            self.shared.config.metrics.denial(action, by_rule);
            Err(ErrorCode::NotFound)
        }
    }

    /// Registers a transfer, within the per-connection limit, and records its start; a
    /// start that cannot be recorded is refused. For a part of the striped transfer `group`
    /// only the transfer's first part records its start.
    pub(crate) fn open(
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
                self.shared
                    .stripes
                    .leave(key, 0, false, Outcome::Incomplete);
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
            self.shared
                .stripes
                .leave(key, 0, false, Outcome::Incomplete);
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
    /// transfer only once it is the last, with the whole transfer's bytes: a pull complete
    /// if they are the object's, a push as its commit settled it.
    pub(crate) fn ended(&self, t: &Transfer, outcome: Outcome) {
        let direction = t.kind.direction();
        let (mut bytes, mut rdma, mut started) = (
            t.bytes.load(Ordering::Relaxed),
            t.rdma.load(Ordering::Relaxed),
            t.started,
        );
        let mut outcome = outcome;
        if let Some(key) = &t.group {
            match self.shared.stripes.leave(key, bytes, rdma, outcome) {
                PartEnd::Open => return,
                PartEnd::Last {
                    bytes: all,
                    rdma: any,
                    started: first,
                    outcome: settled,
                } => {
                    (bytes, rdma, started, outcome) = (all, any, first, settled);
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
