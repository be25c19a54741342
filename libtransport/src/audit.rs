//! The audit trail: who connected, who was refused, who moved what.
//!
//! Records name identities, datasets, objects, sizes, digests and outcomes; never payload
//! bytes. They are not log lines: they go through an [`AuditSink`] (see `audit/file.rs` for
//! the JSON-lines file). A transfer is recorded once, when it ends, not per chunk, so the
//! trail never limits throughput.

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use certs::SpiffeId;
use serde::Serialize;

use crate::policy::Action;
use crate::proto::{DatasetName, Digest, ObjectPath};
use crate::transport::Path;

mod file;

pub use file::FileSink;

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
    },
    /// A request was denied by policy (the peer was told "not found").
    AccessDenied {
        /// Who asked.
        peer: SpiffeId,
        /// For what.
        action: Action,
        /// Which dataset.
        dataset: DatasetName,
        /// Which object, if named.
        #[serde(skip_serializing_if = "Option::is_none")]
        object: Option<ObjectPath>,
        /// Why it was denied.
        reason: String,
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
        path: Path,
        /// How it ended.
        outcome: Outcome,
        /// How long it took.
        duration_ms: u64,
    },
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

/// Which way bytes moved, seen from the node writing the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Bytes left this node (we served a read or pushed).
    Out,
    /// Bytes arrived (we accepted a write or pulled).
    In,
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every byte moved and verified (for writes: committed durably).
    Complete,
    /// Closed before completion; an uncommitted write keeps its verified chunks.
    Incomplete,
    /// The connection ended with the transfer open.
    Interrupted,
    /// Verification failed.
    Corrupt,
    /// Another failure.
    Failed,
}

/// Writes audit records somewhere durable.
pub trait AuditSink: fmt::Debug + Send + Sync {
    /// Appends one record. An error means the record may be lost: callers refuse the work
    /// the record was about rather than proceed unrecorded.
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError>;
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The trail's storage failed.
    #[error("audit trail: {0}")]
    Io(#[from] std::io::Error),
}

/// Discards everything. For embedding where the host application keeps its own trail.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _record: &AuditRecord) -> Result<(), AuditError> {
        Ok(())
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
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
                path: Path::Quic,
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
