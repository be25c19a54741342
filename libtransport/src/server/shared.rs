//! What every connection of a server shares, and recording to its audit trail.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use certs::SpiffeId;
use tokio::sync::{Semaphore, watch};

use super::admission::{Budget, ShedLog, Source};
use super::pool::BufferPool;
use crate::audit::{AuditEvent, AuditRecord};
use crate::config::ServerConfig;
use crate::proto::{DatasetName, ErrorCode, ObjectPath};
use crate::vocab::Action;

/// What every connection of a server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    /// Authenticated connections (taken once the peer is authenticated).
    pub(super) slots: Arc<Semaphore>,
    /// Handshakes of peers not yet authenticated, in all and per source.
    pub(super) handshakes: Arc<Budget<Source>>,
    /// Authenticated connections per identity.
    pub(super) identities: Arc<Budget<SpiffeId>>,
    /// Requests in flight per identity, across its connections.
    pub(super) requests: Arc<Budget<SpiffeId>>,
    /// Rate-limits the log line about shed attempts.
    pub(super) shed_log: ShedLog,
    /// Refusals before authentication, tallied so they cannot flood the trail.
    pub(super) refusals: super::refusals::RefusalTally,
    pub(super) next_conn: AtomicU64,
    /// Flips to true on shutdown: accept no more connections or requests.
    pub(super) stop: watch::Sender<bool>,
    /// Object bytes read ahead of the network: the node's ceiling and identities' shares.
    pub(crate) memory: super::memory::MemoryBudget,
    /// Buffers the send path reads object bytes into, reused once sent.
    pub(crate) buffers: Arc<BufferPool>,
    /// Striped pulls with parts open, across connections.
    pub(crate) stripes: super::stripes::StripeGroups,
}

/// Records one use of an emergency grant (an access the policy alone would deny) and counts
/// it; a use that cannot be recorded is refused, like the decision itself.
pub(crate) fn record_emergency_use(
    shared: &Shared,
    peer: &SpiffeId,
    action: Action,
    dataset: &DatasetName,
    object: Option<&ObjectPath>,
    grant: String,
    reason: String,
) -> Result<(), ErrorCode> {
    // The reason is the operator's free text: the trail keeps it, the log does not.
    tracing::info!(
        peer.id = %peer,
        dataset = %dataset,
        action = %action,
        grant = %grant,
        "access allowed by an emergency grant"
    );
    record_or_refuse(
        shared,
        AuditEvent::EmergencyUsed {
            grant,
            peer: peer.clone(),
            action,
            dataset: dataset.clone(),
            object: object.cloned(),
            reason,
        },
    )?;
    shared.config.metrics.emergency_used();
    Ok(())
}

/// Records an event; a failure is counted and logged by the sink.
pub(crate) fn record(shared: &Shared, event: AuditEvent) {
    let _ = record_or_refuse(shared, event);
}

/// Records an event that work depends on: if it cannot be written, the work is refused.
pub(crate) fn record_or_refuse(shared: &Shared, event: AuditEvent) -> Result<(), ErrorCode> {
    let record = AuditRecord {
        time: shared.config.clock.now(),
        event,
    };
    shared.config.audit.record(&record).map_err(|e| {
        shared.config.metrics.audit_error();
        tracing::debug!(error = %e, "audit record not written");
        ErrorCode::AuditUnavailable
    })
}
