//! The hash chain, without I/O: how a record becomes a line, and how lines link.
//!
//! A line is one JSON object: `seq` (1, 2, 3, ... across the whole trail), `prev` (hex
//! BLAKE3 of the previous line's exact bytes, or 64 zeros for the first), `time`, then the
//! event's fields. Changing any byte of a line changes its hash, which the next line holds;
//! removing or reordering lines breaks the `seq` run. A checkpoint record signs
//! [`checkpoint_message`] for its own `seq` and `prev`, so the signer vouches for every
//! line before it.

use std::io::Write;

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
        let mut buf = unlinked(record)?;
        let (start, next) = self.link(&mut buf);
        buf.pop();
        buf.drain(..start);
        Ok((buf, next))
    }

    /// Links a record that [`unlinked`] encoded as the next line: writes `seq` and `prev`
    /// into the room ahead of it, and returns where the line starts in `buf` (it runs to
    /// the end, newline included) with the chain as it stands after it.
    pub(crate) fn link(&self, buf: &mut [u8]) -> (usize, Self) {
        let mut prefix = [0u8; PREFIX_ROOM + 1];
        let len = {
            let mut w = &mut prefix[..];
            // The room fits the longest prefix (a 20-digit seq); the writes cannot fail.
            let _ = write!(w, "{{\"seq\":{},\"prev\":\"", self.next_seq);
            let _ = w.write_all(&hex_digest(&self.prev));
            let _ = w.write_all(b"\",");
            PREFIX_ROOM + 1 - w.len()
        };
        // The record's own `{` at PREFIX_ROOM gives way to the prefix, which opens the line.
        let start = PREFIX_ROOM + 1 - len;
        buf[start..=PREFIX_ROOM].copy_from_slice(&prefix[..len]);
        let end = buf.len() - 1;
        let next = Self {
            next_seq: self.next_seq.saturating_add(1),
            prev: hash_line(&buf[start..end]),
        };
        (start, next)
    }
}

/// Room ahead of an unlinked record for its line's prefix, `{"seq":N,"prev":"HEX",`
/// (N of up to 20 digits), less the record's own `{`.
pub(crate) const PREFIX_ROOM: usize = r#"{"seq":,"prev":"","#.len() + 20 + 64 - 1;

/// A record encoded as JSON, its newline after it and room ahead for the chain's prefix:
/// the caller's one allocation for a record; [`Chain::link`] makes it a line in place.
pub(crate) fn unlinked(record: &AuditRecord) -> Result<Vec<u8>, AuditError> {
    let mut buf = Vec::with_capacity(PREFIX_ROOM + 384);
    buf.resize(PREFIX_ROOM, b' ');
    serde_json::to_writer(&mut buf, record).map_err(AuditError::Encode)?;
    buf.push(b'\n');
    Ok(buf)
}

fn hex_digest(d: &Digest) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in d.0.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out
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
    fn the_longest_sequence_number_fits_the_room_ahead_of_a_record() {
        let c = Chain::resume(u64::MAX - 1, Digest([0xa7; 32]));
        let (line, next) = c.encode(&record(1)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["seq"], u64::MAX);
        assert_eq!(v["prev"], "a7".repeat(32));
        assert_eq!(v["reason"], "line 1: nope");
        assert_eq!(next.prev(), hash_line(&line));
    }

    #[test]
    fn checkpoint_messages_bind_sequence_and_predecessor() {
        let a = checkpoint_message(7, &Digest([1; 32]));
        assert!(a.starts_with(CHECKPOINT_CONTEXT));
        assert_ne!(a, checkpoint_message(8, &Digest([1; 32])));
        assert_ne!(a, checkpoint_message(7, &Digest([2; 32])));
    }
}
