//! The audit trail: who connected, who was refused, every authorization decision, who
//! moved what, and what changed in the node's identity, policy and configuration.
//!
//! Records name identities, datasets, objects, sizes, digests and outcomes; never payload
//! bytes. They are not log lines: they go through an [`AuditSink`]. The node's sink is
//! [`FileSink`] (`audit/file.rs`): append-only JSON lines in segments, each record carrying
//! its sequence number and the BLAKE3 hash of the record before it (`audit/chain.rs`), with
//! checkpoints signed by the node's SVID key, so `verify` (`audit/verify.rs`) detects a
//! changed, removed, reordered or cut-off record; checkpoints countersigned by a witness off
//! the node (`audit/witness.rs`) also expose a trail rebuilt and signed again on the node. A transfer is recorded when it starts and
//! when it ends, not per chunk, so the trail never limits throughput.

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use certs::SpiffeId;
use serde::Serialize;

use crate::policy::{DataClass, Policy};
use crate::proto::{DatasetName, Digest, ObjectPath};
use crate::vocab::{Action, Path, TransferPath};

mod chain;
mod file;
mod report;
mod verify;
mod witness;

pub use chain::{CHECKPOINT_CONTEXT, Chain, GENESIS, checkpoint_message, hash_line};
pub use file::{
    CheckpointSignature, FileSink, FileSinkConfig, FsyncSchedule, SignError, Signer, TrailBreak,
};
pub use report::{
    AccessRow, EvidenceReport, IdentityRow, NodeSection, NodeTrail, PolicyChange, RefusalRow,
    ReportFilter, TimeBucket, TransferRow, WitnessCheck, evidence_report,
};
pub use verify::{
    Query, VerifyError, VerifyReport, WitnessReport, query, read_receipts, verify, verify_witnessed,
};
pub use witness::{
    Receipt, WITNESS_CONTEXT, WitnessDecision, WitnessQueue, WitnessRefusal, WitnessStatus,
    WitnessedCheckpoint, decide, witness_message,
};

pub use crate::vocab::{DecisionKind, Direction, Outcome};

/// Something worth recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A peer completed the handshake with a valid SVID.
    ConnectionAccepted {
        /// The peer's SPIFFE ID.
        peer: SpiffeId,
        /// Its SVID's serial.
        serial: String,
        /// Its address.
        addr: SocketAddr,
        /// The transport.
        path: Path,
    },
    /// A connection was refused before any request was read.
    ConnectionRefused {
        /// The peer's address.
        addr: SocketAddr,
        /// The transport.
        path: Path,
        /// Why.
        reason: String,
        /// The kind of refusal (`timeout`, `certificate`, `alpn`, ...), as
        /// `connections_refused` counts them.
        class: String,
    },
    /// Refusals before authentication beyond the first of a window, from one source over
    /// one transport and of one kind, counted rather than recorded one by one (see
    /// [`crate::TransportConfig::refusal_window`]).
    ConnectionsRefused {
        /// The source: an IPv4 address, or the /64 prefix of an IPv6 one.
        source: std::net::IpAddr,
        /// The transport.
        path: Path,
        /// The kind of refusal (`timeout`, `certificate`, `alpn`, ...).
        class: String,
        /// How many, besides the one recorded on its own when the window opened.
        count: u64,
        /// The first of them.
        #[serde(serialize_with = "rfc3339")]
        first: SystemTime,
        /// The last of them.
        #[serde(serialize_with = "rfc3339")]
        last: SystemTime,
    },
    /// An established connection was closed because the peer's credentials ended (its
    /// SVID expired while connected, or its serial was revoked), or because it reached its
    /// maximum age (automatic logoff).
    ConnectionClosed {
        /// The peer's SPIFFE ID.
        peer: SpiffeId,
        /// Its SVID's serial.
        serial: String,
        /// Why (`svid expired`, `svid revoked`, `max age`).
        reason: String,
    },
    /// An authorization decision (a denial reads as "not found" to the peer).
    Authorization {
        /// Who asked.
        peer: SpiffeId,
        /// For what.
        action: Action,
        /// Which dataset.
        dataset: DatasetName,
        /// Which object, if named.
        #[serde(skip_serializing_if = "Option::is_none")]
        object: Option<ObjectPath>,
        /// The dataset's data class, where the policy declares one.
        #[serde(skip_serializing_if = "Option::is_none")]
        class: Option<DataClass>,
        /// `allow` or `deny`.
        decision: DecisionKind,
        /// The rule that decided; none for the default deny.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Why it was denied.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A peer listed the datasets it may see.
    DatasetsListed {
        /// Who asked.
        peer: SpiffeId,
        /// How many datasets the policy let it see.
        visible: usize,
    },
    /// A transfer started.
    TransferStarted {
        /// The other side.
        peer: SpiffeId,
        /// Whether bytes will leave this node or arrive.
        direction: Direction,
        /// Which dataset.
        dataset: DatasetName,
        /// Which object.
        object: ObjectPath,
        /// Object size.
        size: u64,
        /// The object's BLAKE3 root.
        root: Digest,
        /// The transport.
        path: TransferPath,
    },
    /// A transfer ended.
    Transfer {
        /// The other side.
        peer: SpiffeId,
        /// Whether bytes left this node or arrived.
        direction: Direction,
        /// Which dataset.
        dataset: DatasetName,
        /// Which object.
        object: ObjectPath,
        /// Payload bytes moved.
        bytes: u64,
        /// The object's BLAKE3 root.
        root: Digest,
        /// The transport.
        path: TransferPath,
        /// How it ended.
        outcome: Outcome,
        /// How long it took.
        duration_ms: u64,
    },
    /// A partial file of a push was removed: untouched past the node's age limit
    /// (`expired`), or its owner resumed the push with another manifest (`replaced`).
    PartialRemoved {
        /// Which dataset.
        dataset: DatasetName,
        /// The digest of the object's name (never the name); absent for a file left
        /// without its sidecar, whose object is unknown.
        #[serde(skip_serializing_if = "Option::is_none")]
        object: Option<Digest>,
        /// Whose push it was, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<SpiffeId>,
        /// What it claimed of the quota: the manifest's size.
        bytes: u64,
        /// How long it had been untouched.
        age_secs: u64,
        /// `expired` or `replaced`.
        reason: String,
    },
    /// An RDMA session was aborted because sealed chunks kept failing to open (tampered,
    /// replayed, misplaced or from another session); nothing unverified was used.
    RdmaAborted {
        /// The sender.
        peer: SpiffeId,
        /// The chunk that failed last.
        chunk: u32,
        /// Chunks that failed to open.
        failures: u32,
    },
    /// The node took an identity into use (at start, or a rotated SVID).
    IdentityLoaded {
        /// Its SPIFFE ID.
        id: SpiffeId,
        /// The SVID's serial.
        serial: String,
        /// When the SVID expires.
        #[serde(serialize_with = "rfc3339")]
        not_after: SystemTime,
    },
    /// An identity was refused (an SVID file that does not verify, say).
    IdentityRefused {
        /// Why.
        reason: String,
    },
    /// The node replaced its SVID with a renewed one (open connections keep the old one
    /// until they end or it expires).
    IdentityRotated {
        /// Its SPIFFE ID.
        id: SpiffeId,
        /// The new SVID's serial.
        serial: String,
        /// The serial it replaces.
        previous: String,
        /// When the new SVID expires.
        #[serde(serialize_with = "rfc3339")]
        not_after: SystemTime,
    },
    /// The node took a new trust bundle or revocation list into use.
    TrustUpdated {
        /// How many CAs the bundle holds.
        cas: usize,
        /// How many SVID serials are revoked.
        revoked: usize,
    },
    /// The issuer signed an SVID (issuer trail).
    SvidIssued {
        /// The SPIFFE ID certified.
        id: SpiffeId,
        /// The new SVID's serial.
        serial: String,
        /// `node` (a node SVID) or `workload` (for an entry), or `issuer` (its own).
        kind: String,
        /// Who asked: the node that attested or renewed.
        #[serde(skip_serializing_if = "Option::is_none")]
        requester: Option<SpiffeId>,
        /// `join_token`, `renewal` or `entry`.
        how: String,
        /// When it expires.
        #[serde(serialize_with = "rfc3339")]
        not_after: SystemTime,
    },
    /// The issuer refused to issue (issuer trail): a bad token, a banned node, an entry
    /// that is not the node's.
    IssuanceRefused {
        /// The node it was for or from, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<SpiffeId>,
        /// The peer's address.
        #[serde(skip_serializing_if = "Option::is_none")]
        addr: Option<SocketAddr>,
        /// Why.
        reason: String,
    },
    /// A join token was created (issuer trail). Only its hash prefix is recorded.
    JoinTokenCreated {
        /// The node ID the token grants.
        node: SpiffeId,
        /// The first hex digits of the token's SHA-256.
        token: String,
        /// When it expires.
        #[serde(serialize_with = "rfc3339")]
        expires_at: SystemTime,
    },
    /// A registration entry was created or deleted (issuer trail).
    EntryChanged {
        /// `created` or `deleted`.
        change: String,
        /// The entry's ID.
        entry: String,
        /// The workload SPIFFE ID it grants.
        spiffe_id: SpiffeId,
        /// The node that may hand it out.
        parent_id: SpiffeId,
        /// Its selectors.
        selectors: Vec<String>,
    },
    /// A node was banned: it may not renew, and its live SVIDs are revoked (issuer trail).
    NodeBanned {
        /// The node.
        node: SpiffeId,
        /// Serials revoked with it (its own and its workloads').
        revoked: Vec<String>,
    },
    /// A CA rollover step (issuer trail): `prepared`, `activated`, `retired`.
    CaChanged {
        /// The step.
        change: String,
        /// The CA certificate's serial.
        serial: String,
        /// When that CA expires.
        #[serde(serialize_with = "rfc3339")]
        not_after: SystemTime,
    },
    /// A local workload received SVIDs from the Workload API (node trail).
    WorkloadAttested {
        /// The caller's process ID.
        pid: u32,
        /// Its user ID.
        uid: u32,
        /// Its group ID.
        gid: u32,
        /// The SPIFFE IDs it received.
        ids: Vec<SpiffeId>,
    },
    /// A local workload was refused by the Workload API (node trail).
    WorkloadRefused {
        /// The caller's process ID, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Its user ID, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// Why.
        reason: String,
    },
    /// A local caller's request to the sidecar's data API (node trail): who asked, for
    /// what, whence it was served, and how it ended.
    LocalRequest {
        /// The caller's SPIFFE ID, once attested.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<SpiffeId>,
        /// Its process ID, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Its user ID.
        uid: u32,
        /// The request: `datasets`, `list`, `stat`, `read`, `fetch`, `push`, `prefetch`.
        op: String,
        /// The storage node it went to.
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        #[serde(skip_serializing_if = "Option::is_none")]
        dataset: Option<DatasetName>,
        /// The object (the first of a prefetch).
        #[serde(skip_serializing_if = "Option::is_none")]
        object: Option<ObjectPath>,
        /// Bytes handed to the caller (or pushed for it).
        bytes: u64,
        /// `memory` (a mapping already held), `cache` (opened from the sealed cache),
        /// `network` (fetched from the storage node for this call), or `none`.
        source: String,
        /// `ok`, or the error code the caller got.
        outcome: String,
    },
    /// Local callers the sidecar could not attest (`permission_denied`), counted: the first
    /// of a window is a [`AuditEvent::LocalRequest`] of its own, the others of the window
    /// are this one record when it ends (node trail).
    LocalRequestsRefused {
        /// Their user ID; absent when the count is shared by callers of many uids.
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// How many, besides the one recorded on its own.
        count: u64,
        /// The first of them.
        #[serde(serialize_with = "rfc3339")]
        first: SystemTime,
        /// The last of them.
        #[serde(serialize_with = "rfc3339")]
        last: SystemTime,
    },
    /// A configuration file was loaded.
    ConfigLoaded {
        /// The file.
        source: String,
        /// BLAKE3 of its bytes.
        digest: Digest,
    },
    /// A policy was taken into use.
    PolicyLoaded {
        /// Where it came from.
        source: String,
        /// BLAKE3 of its bytes.
        digest: Digest,
        /// How many rules it holds.
        rules: usize,
        /// The policy as canonical lines ([`crate::policy::Policy::lines`]): its class
        /// declarations and rules, in file order, so a report can show what changed from
        /// one load to the next. At most [`MAX_POLICY_LINES`] lines of at most
        /// [`MAX_POLICY_LINE_BYTES`] each; longer ones are cut and end in `...`.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        policy: Vec<String>,
        /// True if the policy had more than [`MAX_POLICY_LINES`] lines: the rest are not in
        /// the record.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// A new policy was refused; the previous one stays in force.
    PolicyRefused {
        /// Where it came from.
        source: String,
        /// Why, with the line.
        reason: String,
    },
    /// An operator gave an emergency (break-glass) grant on the node's admin socket. It
    /// allows what it names from now (or from its approval, if `pending`) until
    /// `expires_at`, over the policy's deny rules too.
    EmergencyGranted {
        /// The grant's ID.
        grant: String,
        /// The one peer it is for.
        peer: SpiffeId,
        /// The one dataset it is for.
        dataset: DatasetName,
        /// What it allows.
        actions: Vec<Action>,
        /// Only objects under this prefix, if set.
        #[serde(skip_serializing_if = "Option::is_none")]
        object_prefix: Option<String>,
        /// Its time to live, seconds.
        ttl_secs: u64,
        /// When it expires.
        #[serde(serialize_with = "rfc3339")]
        expires_at: SystemTime,
        /// Why, as the operator gave it.
        reason: String,
        /// The operator's user ID (the admin socket's peer credentials).
        operator_uid: u32,
        /// True if it allows nothing until a second operator approves it.
        pending: bool,
    },
    /// A second operator approved a pending emergency grant; it allows what it names from
    /// now until its expiry.
    EmergencyApproved {
        /// The grant's ID.
        grant: String,
        /// The peer it is for.
        peer: SpiffeId,
        /// The dataset it is for.
        dataset: DatasetName,
        /// The approving operator's user ID.
        operator_uid: u32,
        /// The granting operator's user ID.
        granted_by: u32,
        /// When it expires.
        #[serde(serialize_with = "rfc3339")]
        expires_at: SystemTime,
    },
    /// An access the policy alone would have denied was allowed by an emergency grant
    /// (besides the `authorization` record, whose rule is `emergency:<grant>`).
    EmergencyUsed {
        /// The grant's ID.
        grant: String,
        /// Who used it.
        peer: SpiffeId,
        /// For what.
        action: Action,
        /// Which dataset.
        dataset: DatasetName,
        /// Which object, if named.
        #[serde(skip_serializing_if = "Option::is_none")]
        object: Option<ObjectPath>,
        /// The grant's reason.
        reason: String,
    },
    /// An emergency grant's time passed: it allows nothing from `expires_at` on (judged at
    /// every decision; this record follows within about a second, or at the node's next
    /// start if it was down then).
    EmergencyExpired {
        /// The grant's ID.
        grant: String,
        /// The peer it was for.
        peer: SpiffeId,
        /// The dataset it was for.
        dataset: DatasetName,
        /// When it expired.
        #[serde(serialize_with = "rfc3339")]
        expires_at: SystemTime,
        /// The grant's reason.
        reason: String,
        /// False if it was still waiting for approval, so never allowed anything.
        approved: bool,
    },
    /// An operator revoked an emergency grant before its expiry.
    EmergencyRevoked {
        /// The grant's ID.
        grant: String,
        /// The peer it was for.
        peer: SpiffeId,
        /// The dataset it was for.
        dataset: DatasetName,
        /// The revoking operator's user ID.
        operator_uid: u32,
        /// The grant's reason.
        reason: String,
    },
    /// An emergency grant, approval or revocation was refused: a TTL over the node's
    /// maximum, an empty reason, an operator approving their own grant, an unknown ID.
    EmergencyRefused {
        /// What was asked: `grant`, `approve` or `revoke`.
        op: String,
        /// The grant's ID, if the request named one.
        #[serde(skip_serializing_if = "Option::is_none")]
        grant: Option<String>,
        /// The peer, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<SpiffeId>,
        /// The dataset, if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        dataset: Option<DatasetName>,
        /// The operator's user ID.
        operator_uid: u32,
        /// Why it was refused.
        error: String,
    },
    /// A segment of the trail was closed; a checkpoint follows this record and the record
    /// after that starts a new segment.
    SegmentSealed {
        /// The segment's file name.
        segment: String,
        /// The last sequence number in it: the checkpoint that follows this record.
        last_seq: u64,
    },
    /// The node found its trail broken when it opened it: records cut off, changed or torn,
    /// or the latest checkpoint's record gone. The trail goes on after what it found, this
    /// record first; `audit verify` reports the break for as long as the record is there.
    TrailBroken {
        /// What was found.
        found: TrailBreakKind,
        /// Where, in words (segment, sequence numbers); never record contents.
        detail: String,
        /// The latest checkpoint on record before the break: its sequence number...
        #[serde(skip_serializing_if = "Option::is_none")]
        checkpoint_seq: Option<u64>,
        /// ... and the hash of its line.
        #[serde(skip_serializing_if = "Option::is_none")]
        checkpoint_hash: Option<Digest>,
        /// The last record the trail held when the node opened it; this record follows it.
        last_seq: u64,
    },
    /// The node found its trail not closed when it opened it: the process stopped without
    /// its closing checkpoint (a crash, a kill, a power cut). Not a break: the records on
    /// disk are whole. But records acknowledged after `last_seq` and not yet fsynced, if
    /// any, were lost with the page cache: at most what the `fsync` schedule leaves
    /// unsynced (nothing with `record`).
    UncleanStop {
        /// The last record the trail held; this record follows it.
        last_seq: u64,
        /// The last record known fsynced (the `synced` file), if known.
        #[serde(skip_serializing_if = "Option::is_none")]
        synced_seq: Option<u64>,
        /// The fsync schedule in force now (`record`, `checkpoint`, or a duration).
        fsync: String,
    },
    /// The trail could not be written for a while (a disk that failed or stopped
    /// answering): new records were refused, and the work they were about with them.
    /// Written by the node once the trail is writable again, after the records that had
    /// been queued when the stall began.
    AuditStalled {
        /// When the stall began.
        #[serde(serialize_with = "rfc3339")]
        since: SystemTime,
        /// How long it lasted.
        duration_ms: u64,
        /// Records refused meanwhile (each refused the work it was about; records of
        /// refused connections and denials among them are not in the trail).
        refused: u64,
        /// Records that were waiting when the stall began, written late (before this
        /// record); the work of those whose caller gave up waiting was refused.
        late: u64,
        /// The first of them.
        #[serde(skip_serializing_if = "Option::is_none")]
        late_first_seq: Option<u64>,
        /// What failed first (the I/O error, or the wait that ran out); never record
        /// contents.
        error: String,
    },
    /// A witness refused a node's checkpoint (issuer trail): it conflicts with the one held
    /// for its seq, or goes back before the latest held. Either means the node's trail was
    /// rewritten or cut back after it was witnessed.
    WitnessRefused {
        /// The node that sent it.
        node: SpiffeId,
        /// The checkpoint's sequence number.
        seq: u64,
        /// Why, naming the checkpoint held.
        reason: String,
    },
    /// A signed checkpoint: the signer vouches for every record up to this one.
    Checkpoint {
        /// The SPIFFE ID whose key signed.
        signer: SpiffeId,
        /// The signature algorithm (`ecdsa_p256_sha256`, `ecdsa_p384_sha384`, `ed25519`).
        alg: String,
        /// The signer's certificate chain, DER, hex, leaf first.
        chain: Vec<String>,
        /// The signature over [`checkpoint_message`] for this record's `seq` and `prev`,
        /// hex.
        signature: String,
    },
}

impl AuditEvent {
    /// The record of `policy` taken into use, its lines bounded by [`MAX_POLICY_LINES`] and
    /// [`MAX_POLICY_LINE_BYTES`].
    pub fn policy_loaded(source: String, digest: Digest, policy: &Policy) -> Self {
        let all = policy.lines();
        let truncated = all.len() > MAX_POLICY_LINES;
        let lines = all
            .into_iter()
            .take(MAX_POLICY_LINES)
            .map(|mut l| {
                if l.len() > MAX_POLICY_LINE_BYTES {
                    let mut cut = MAX_POLICY_LINE_BYTES - 3;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                    l.push_str("...");
                }
                l
            })
            .collect();
        Self::PolicyLoaded {
            source,
            digest,
            rules: policy.rules().len(),
            policy: lines,
            truncated,
        }
    }
}

impl From<crate::store::PartialRemoved> for AuditEvent {
    /// The record of a partial file the store removed.
    fn from(r: crate::store::PartialRemoved) -> Self {
        Self::PartialRemoved {
            dataset: r.dataset,
            object: r.object,
            owner: r.owner.and_then(|o| SpiffeId::parse(&o).ok()),
            bytes: r.bytes,
            age_secs: r.age.as_secs(),
            reason: r.reason.as_str().to_owned(),
        }
    }
}

/// What a node found wrong with its trail when it opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailBreakKind {
    /// Records after the latest checkpoint are gone: the trail ends before it.
    Cut,
    /// A record at or after the latest checkpoint no longer matches it or its neighbours.
    Changed,
    /// The last record was half-written (a crash while writing, or a cut mid-record); the
    /// node cut the partial line off.
    Torn,
    /// The trail has records but `checkpoint.json` is missing or unreadable, so a cut
    /// cannot be ruled out.
    CheckpointMissing,
}

impl TrailBreakKind {
    /// The name records and reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cut => "cut",
            Self::Changed => "changed",
            Self::Torn => "torn",
            Self::CheckpointMissing => "checkpoint_missing",
        }
    }
}

impl fmt::Display for TrailBreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record: a time and an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// When it happened, RFC 3339 UTC.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Writes audit records somewhere durable.
pub trait AuditSink: fmt::Debug + Send + Sync {
    /// Appends one record. An error means the record was not written: callers refuse the
    /// work the record was about rather than proceed unrecorded.
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError>;

    /// True while records can be written. A sink that failed reports false until a write
    /// succeeds again.
    fn is_healthy(&self) -> bool {
        true
    }
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The trail's storage failed (full, read-only, permissions).
    #[error("audit trail: {0}")]
    Io(#[from] std::io::Error),
    /// A record could not be encoded.
    #[error("audit record: {0}")]
    Encode(#[from] serde_json::Error),
    /// A checkpoint could not be signed.
    #[error("audit checkpoint: {0}")]
    Sign(#[from] SignError),
    /// The record was not written in time, or the trail's writer is stalled or closed.
    #[error("audit trail: {0}")]
    Unavailable(&'static str),
}

/// Discards everything. For embedding where the host application keeps its own trail.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _record: &AuditRecord) -> Result<(), AuditError> {
        Ok(())
    }
}

/// Policy lines a `policy_loaded` record holds at most: enough for any policy a person
/// writes, and a bound on the record's size (with [`MAX_POLICY_LINE_BYTES`], 1 MiB).
pub const MAX_POLICY_LINES: usize = 1024;
/// Bytes of one policy line a `policy_loaded` record holds at most.
pub const MAX_POLICY_LINE_BYTES: usize = 1024;

pub(crate) fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialise_as_flat_json_without_payload_fields() {
        let r = AuditRecord {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            event: AuditEvent::Transfer {
                peer: SpiffeId::parse("spiffe://td/gpu/0").unwrap(),
                direction: Direction::Out,
                dataset: DatasetName::new("scans").unwrap(),
                object: ObjectPath::new("a/b.bin").unwrap(),
                bytes: 42,
                root: Digest([0xab; 32]),
                path: TransferPath::Quic,
                outcome: Outcome::Complete,
                duration_ms: 7,
            },
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "transfer");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["peer"], "spiffe://td/gpu/0");
        assert_eq!(v["object"], "a/b.bin");
        assert_eq!(v["path"], "quic");
        assert_eq!(v["direction"], "out");
        assert_eq!(v["outcome"], "complete");
        assert_eq!(v["root"], "ab".repeat(32));
        assert_eq!(v["bytes"], 42);
    }
}
