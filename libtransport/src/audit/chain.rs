//! The hash chain, without I/O: how a record becomes a line, and how lines link.
//!
//! A line is one JSON object: `seq` (1, 2, 3, ... across the whole trail), `prev` (hex
//! BLAKE3 of the previous line's exact bytes, or 64 zeros for the first), `time`, then the
//! event's fields. Changing any byte of a line changes its hash, which the next line holds;
//! removing or reordering lines breaks the `seq` run. A checkpoint record signs
//! [`checkpoint_message`] for its own `seq` and `prev`, so the signer vouches for every
//! line before it.

use serde::Serialize;

use super::{AuditError, AuditRecord};
use crate::proto::Digest;

/// The `prev` of the first record of a trail.
pub const GENESIS: Digest = Digest([0; 32]);

/// Domain separation for checkpoint signatures.
pub const CHECKPOINT_CONTEXT: &[u8] = b"transportd audit checkpoint v1\n";

/// Where the chain stands: the next sequence number and the hash of the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    prev: Digest,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

impl Chain {
    /// A new trail.
    pub fn new() -> Self {
        Self {
            next_seq: 1,
            prev: GENESIS,
        }
    }

    /// Continues a trail whose last line had `last_seq` and `last_hash`.
    pub fn resume(last_seq: u64, last_hash: Digest) -> Self {
        Self {
            next_seq: last_seq.saturating_add(1),
            prev: last_hash,
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last line (what the next record's `prev` will be).
    pub fn prev(&self) -> Digest {
        self.prev
    }

    /// Encodes `record` as the next line (without its newline) and returns it with the
    /// chain as it stands after it. `self` is unchanged, so a line that fails to reach
    /// the disk leaves the chain where it was.
    pub fn encode(&self, record: &AuditRecord) -> Result<(Vec<u8>, Self), AuditError> {
        let line = serde_json::to_vec(&Line {
            seq: self.next_seq,
            prev: self.prev.to_hex(),
            record,
        })
        .map_err(AuditError::Encode)?;
        let next = Self {
            next_seq: self.next_seq.saturating_add(1),
            prev: hash_line(&line),
        };
        Ok((line, next))
    }
}

/// The hash of a line's exact bytes (without its newline).
pub fn hash_line(line: &[u8]) -> Digest {
    Digest(*blake3::hash(line).as_bytes())
}

/// What a checkpoint at `seq`, following the line whose hash is `prev`, signs.
pub fn checkpoint_message(seq: u64, prev: &Digest) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_CONTEXT.len() + 8 + 32);
    m.extend_from_slice(CHECKPOINT_CONTEXT);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&prev.0);
    m
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev: String,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::audit::AuditEvent;

    fn record(i: u64) -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i),
            event: AuditEvent::PolicyRefused {
                source: "policy.toml".into(),
                reason: format!("line {i}: nope"),
            },
        }
    }

    #[test]
    fn lines_link_by_hash_and_sequence() {
        let c = Chain::new();
        let (l1, c) = c.encode(&record(1)).unwrap();
        let (l2, c2) = c.encode(&record(2)).unwrap();
        let v1: serde_json::Value = serde_json::from_slice(&l1).unwrap();
        let v2: serde_json::Value = serde_json::from_slice(&l2).unwrap();
        assert_eq!(v1["seq"], 1);
        assert_eq!(v1["prev"], "0".repeat(64));
        assert_eq!(v2["seq"], 2);
        assert_eq!(v2["prev"], hash_line(&l1).to_hex());
        assert_eq!(v2["event"], "policy_refused");
        assert_eq!(v2["time"], "2026-09-21T14:13:22.000Z");
        assert_eq!(c2.next_seq(), 3);
        assert_eq!(c2.prev(), hash_line(&l2));
        // Known answer: the first line's bytes and hash are stable across versions.
        assert_eq!(
            std::str::from_utf8(&l1).unwrap(),
            r#"{"seq":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","time":"2026-09-21T14:13:21.000Z","event":"policy_refused","source":"policy.toml","reason":"line 1: nope"}"#
        );
        // Encoding does not move the chain it was called on.
        assert_eq!(c.next_seq(), 2);
    }

    #[test]
    fn checkpoint_messages_bind_sequence_and_predecessor() {
        let a = checkpoint_message(7, &Digest([1; 32]));
        assert!(a.starts_with(CHECKPOINT_CONTEXT));
        assert_ne!(a, checkpoint_message(8, &Digest([1; 32])));
        assert_ne!(a, checkpoint_message(7, &Digest([2; 32])));
    }
}
