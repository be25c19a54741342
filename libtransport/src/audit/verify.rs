//! Reading a trail back: `verify` checks every link, every checkpoint signature and the
//! latest checkpoint; `verify_witnessed` compares the trail with a witness's receipts;
//! `query` filters records.
//!
//! What `verify` detects, naming the record: a changed byte anywhere (the next record's
//! `prev` no longer matches, or the record no longer parses, or a checkpoint signature
//! fails), a removed record (a gap in `seq`), swapped or moved records (`seq` out of order),
//! and a trail cut back past its latest checkpoint (`checkpoint.json` names a record that is
//! gone). Records after the latest checkpoint are reported as not yet sealed: a node that is
//! running, or that crashed, has such a tail; a clean shutdown leaves none.
//!
//! A `trail_broken` record (a node found its trail cut, changed or torn when it opened it,
//! and said so before going on) fails verification too, naming what was found: the trail
//! stays failed for as long as the record is in it.
//!
//! Limits: `checkpoint.json` and the signing key live beside the trail, so someone who can
//! rewrite both can rebuild the trail and sign it again. [`verify_witnessed`] rules that out
//! back to the latest checkpoint a witness off the node countersigned (`audit/witness.rs`).

use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use certs::{SpiffeId, TrustBundle, Usage};
use rustls::pki_types::CertificateDer;

use super::chain::{GENESIS, checkpoint_message, hash_line};
use super::file::{HEAD_FILE, Head, segments};
use super::witness::Receipt;
use crate::proto::Digest;

/// What a verified trail holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Segment files read.
    pub segments: usize,
    /// Records, checkpoints included.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// Sequence number of the last record.
    pub last_seq: u64,
    /// Sequence number of the latest checkpoint.
    pub last_checkpoint: u64,
    /// Records after the latest checkpoint (not yet sealed by a signature).
    pub unsealed: u64,
    /// `audit_stalled` records: times the trail could not be written for a while.
    pub stalls: u64,
    /// Records refused during those stalls, added up.
    pub refused_in_stalls: u64,
    /// `unclean_stop` records: starts after a stop without the closing checkpoint.
    pub unclean_stops: u64,
    /// True if checkpoint signers' chains were verified against a trust bundle.
    pub signers_verified: bool,
}

/// The first thing wrong with a trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{segment} line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct VerifyError {
    /// The segment file.
    pub segment: String,
    /// The line in it, from 1.
    pub line: usize,
    /// The record's sequence number, if it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// Verifies the trail in `dir`. With `bundle`, every checkpoint signer's certificate chain
/// must also verify against it, at the checkpoint's time.
pub fn verify(dir: &Path, bundle: Option<&TrustBundle>) -> Result<VerifyReport, VerifyError> {
    let files = segments(dir).map_err(|e| dir_error(dir, &e.to_string()))?;
    let head = read_head(dir)?;
    let mut report = VerifyReport {
        segments: files.len(),
        signers_verified: bundle.is_some(),
        ..VerifyReport::default()
    };
    let mut lines = Lines::new(&files).peekable();
    let mut prev: Option<Rec> = None;
    let mut head_seen = false;
    while let Some(item) = lines.next() {
        let raw = item?;
        let rec = parse(&raw)?;
        let expected = prev.as_ref().map_or(1, |p| p.seq + 1);
        if rec.seq != expected {
            let next_seq = peek_seq(&mut lines);
            let reason = if rec.seq > expected && next_seq == Some(expected) {
                format!("records {expected} and {} are swapped", rec.seq)
            } else if rec.seq > expected {
                format!(
                    "record{} {expected}{} missing before this one",
                    if rec.seq - expected > 1 { "s" } else { "" },
                    if rec.seq - expected > 1 {
                        format!("..{} are", rec.seq - 1)
                    } else {
                        " is".into()
                    }
                )
            } else {
                format!("out of order: seq {} follows seq {}", rec.seq, expected - 1)
            };
            return Err(raw.error(Some(rec.seq), reason));
        }
        let want_prev = prev.as_ref().map_or(GENESIS, |p| p.hash);
        if rec.prev != want_prev {
            // Which of the two changed? If the next record still links to this one, this one
            // is intact and the record before it was changed.
            let next_links = match peek_prev(&mut lines) {
                Some(p) => p == rec.hash,
                // The last record: checkpoint.json vouches for it if it names it.
                None => head
                    .as_ref()
                    .is_some_and(|h| h.seq == rec.seq && h.hash == rec.hash),
            };
            return Err(match (&prev, next_links) {
                (Some(p), true) => p.raw.error(
                    Some(p.seq),
                    "this record was changed: its hash no longer matches the one the next record holds".into(),
                ),
                (None, _) => raw.error(
                    Some(rec.seq),
                    "the trail does not start at its first record (prev is not the genesis value)".into(),
                ),
                (Some(_), false) => raw.error(
                    Some(rec.seq),
                    "this record was changed: it does not link to the record before it".into(),
                ),
            });
        }
        if rec.event == "trail_broken" {
            let field = |k: &str| rec.value[k].as_str().unwrap_or("?").to_owned();
            return Err(raw.error(
                Some(rec.seq),
                format!(
                    "the node found this trail broken when it opened it ({}): {}",
                    field("found"),
                    field("detail")
                ),
            ));
        }
        if rec.event == "audit_stalled" {
            report.stalls += 1;
            report.refused_in_stalls += rec.value["refused"].as_u64().unwrap_or(0);
        }
        if rec.event == "unclean_stop" {
            report.unclean_stops += 1;
        }
        if rec.event == "checkpoint" {
            check_signature(&raw, &rec, bundle)?;
            report.checkpoints += 1;
            report.last_checkpoint = rec.seq;
        }
        if let Some(h) = &head
            && h.seq == rec.seq
        {
            if h.hash != rec.hash {
                return Err(raw.error(
                    Some(rec.seq),
                    format!(
                        "this record does not match the latest checkpoint recorded in {HEAD_FILE}"
                    ),
                ));
            }
            head_seen = true;
        }
        report.records += 1;
        report.last_seq = rec.seq;
        prev = Some(Rec { raw, ..rec });
    }
    match (&head, &prev) {
        (Some(h), Some(last)) if !head_seen => {
            return Err(last.raw.error(
                Some(last.seq),
                format!(
                    "the trail ends here, but its latest checkpoint ({HEAD_FILE}) is seq {} in {}: records after seq {} were cut off",
                    h.seq, h.segment, last.seq
                ),
            ));
        }
        (Some(h), None) => {
            return Err(dir_error(
                dir,
                &format!(
                    "no records, but {HEAD_FILE} names seq {} in {}: the trail was removed",
                    h.seq, h.segment
                ),
            ));
        }
        (None, Some(last)) => {
            return Err(last.raw.error(
                Some(last.seq),
                format!("{HEAD_FILE} is missing: the trail cannot be checked for a cut-off tail"),
            ));
        }
        _ => {}
    }
    report.unsealed = report.last_seq - report.last_checkpoint;
    Ok(report)
}

/// How a trail compares with what its witness holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WitnessReport {
    /// Witnessed checkpoints found in the trail, record for record.
    pub witnessed: u64,
    /// The latest of them.
    pub last_witnessed: u64,
    /// True if the countersigners' chains were verified against a trust bundle.
    pub witnesses_verified: bool,
}

/// Compares the trail in `dir` with `receipts`, a witness's countersigned checkpoints for
/// the node: every one must verify (with `bundle`, its countersigner's chain too) and
/// appear in the trail as a checkpoint with the same `seq`, `prev` and line hash. A trail
/// rebuilt and signed again on the node fails at the first witnessed checkpoint it lost.
/// Run [`verify`] too: this checks only what the witness vouches for.
pub fn verify_witnessed(
    dir: &Path,
    receipts: &[Receipt],
    bundle: Option<&TrustBundle>,
) -> Result<WitnessReport, VerifyError> {
    if receipts.is_empty() {
        return Err(dir_error(
            dir,
            "the witness holds no checkpoints for this node: nothing to compare with (was \
             the node's witness reachable, and is this the node's ID?)",
        ));
    }
    let files = segments(dir).map_err(|e| dir_error(dir, &e.to_string()))?;
    // seq -> (where, prev, line hash, event, signer)
    let mut by_seq = std::collections::HashMap::new();
    let mut signer: Option<String> = None;
    for item in Lines::new(&files) {
        let raw = item?;
        let rec = parse(&raw)?;
        if rec.event == "checkpoint" {
            signer = rec.value["signer"].as_str().map(str::to_owned);
        }
        let at = Raw {
            bytes: Vec::new(),
            ..raw
        };
        by_seq.insert(rec.seq, (at, rec.prev, rec.hash, rec.event == "checkpoint"));
    }
    let mut sorted: Vec<&Receipt> = receipts.iter().collect();
    sorted.sort_by_key(|r| r.seq);
    let mut report = WitnessReport {
        witnesses_verified: bundle.is_some(),
        ..WitnessReport::default()
    };
    for r in sorted {
        let at_seq = |reason: String| VerifyError {
            segment: dir.display().to_string(),
            line: 0,
            seq: Some(r.seq),
            reason,
        };
        if let Some(s) = &signer
            && s != r.node.as_str()
        {
            return Err(at_seq(format!(
                "the witness's receipt is for {}, but this trail's checkpoints are signed by {s}",
                r.node
            )));
        }
        r.verify(bundle)
            .map_err(|e| at_seq(format!("the witness's receipt does not verify: {e}")))?;
        let lost = format!(
            "the witness holds checkpoint seq {} (prev {}, witnessed at {} by {})",
            r.seq,
            r.prev.short(),
            r.witnessed_at,
            r.witness
        );
        match by_seq.get(&r.seq) {
            None => {
                return Err(at_seq(format!(
                    "{lost}, but the trail has no record with that seq: it was cut back or \
                     rebuilt after it was witnessed"
                )));
            }
            Some((raw, prev, hash, is_checkpoint)) => {
                if !is_checkpoint || *prev != r.prev || *hash != r.hash {
                    return Err(raw.error(
                        Some(r.seq),
                        format!(
                            "{lost}, but this record is not that checkpoint: the trail was \
                             rewritten after it was witnessed"
                        ),
                    ));
                }
            }
        }
        report.witnessed += 1;
        report.last_witnessed = r.seq;
    }
    Ok(report)
}

/// Reads receipts as `transportd issuer witness export` writes them and a node keeps them
/// (`witness.jsonl`): one JSON object per line.
pub fn read_receipts(text: &str) -> Result<Vec<Receipt>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", n + 1)))
        .collect()
}

/// Which records `query` returns.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only records about this peer (exact SPIFFE ID, or a prefix ending in `/`).
    pub peer: Option<String>,
    /// Only records about this dataset.
    pub dataset: Option<String>,
    /// Only records of this event kind (`transfer`, `authorization`, ...).
    pub event: Option<String>,
    /// Only records at or after this time.
    pub since: Option<SystemTime>,
    /// Only records before this time.
    pub until: Option<SystemTime>,
}

/// The records of the trail in `dir` that match `q`, in order, as JSON objects. It does
/// not verify; run [`verify`] for that.
pub fn query(dir: &Path, q: &Query) -> Result<Vec<serde_json::Value>, VerifyError> {
    let files = segments(dir).map_err(|e| dir_error(dir, &e.to_string()))?;
    let mut out = Vec::new();
    for item in Lines::new(&files) {
        let raw = item?;
        let v: serde_json::Value = serde_json::from_slice(&raw.bytes)
            .map_err(|e| raw.error(None, format!("not a JSON record: {e}")))?;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        if let Some(p) = &q.peer {
            let peer = s("peer");
            let hit = if p.ends_with('/') {
                peer.starts_with(p.as_str())
            } else {
                peer == *p
            };
            if !hit {
                continue;
            }
        }
        if q.dataset.as_ref().is_some_and(|d| s("dataset") != *d) {
            continue;
        }
        if q.event.as_ref().is_some_and(|e| s("event") != *e) {
            continue;
        }
        if q.since.is_some() || q.until.is_some() {
            let Ok(t) = humantime::parse_rfc3339(&s("time")) else {
                continue;
            };
            if q.since.is_some_and(|since| t < since) || q.until.is_some_and(|until| t >= until) {
                continue;
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// One line as read, with where it came from.
#[derive(Debug, Clone)]
struct Raw {
    segment: String,
    line: usize,
    bytes: Vec<u8>,
}

impl Raw {
    fn error(&self, seq: Option<u64>, reason: String) -> VerifyError {
        VerifyError {
            segment: self.segment.clone(),
            line: self.line,
            seq,
            reason,
        }
    }
}

/// A parsed line.
#[derive(Debug, Clone)]
struct Rec {
    raw: Raw,
    seq: u64,
    prev: Digest,
    hash: Digest,
    event: String,
    value: serde_json::Value,
}

fn parse(raw: &Raw) -> Result<Rec, VerifyError> {
    let value: serde_json::Value = serde_json::from_slice(&raw.bytes).map_err(|e| {
        raw.error(
            None,
            format!("this record was changed: it is not valid JSON ({e})"),
        )
    })?;
    let seq = value["seq"].as_u64().ok_or_else(|| {
        raw.error(
            None,
            "this record was changed: it has no sequence number".into(),
        )
    })?;
    let prev = value["prev"]
        .as_str()
        .and_then(Digest::from_hex)
        .ok_or_else(|| {
            raw.error(
                Some(seq),
                "this record was changed: its prev is not a hash".into(),
            )
        })?;
    let event = value["event"].as_str().unwrap_or_default().to_owned();
    Ok(Rec {
        hash: hash_line(&raw.bytes),
        raw: raw.clone(),
        seq,
        prev,
        event,
        value,
    })
}

fn check_signature(raw: &Raw, rec: &Rec, bundle: Option<&TrustBundle>) -> Result<(), VerifyError> {
    let bad = |why: String| raw.error(Some(rec.seq), format!("checkpoint does not verify: {why}"));
    let v = &rec.value;
    let chain: Vec<String> = v["chain"]
        .as_array()
        .ok_or_else(|| bad("no certificate chain".into()))?
        .iter()
        .map(|c| c.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("certificate chain is not hex".into()))?;
    let signature = v["signature"].as_str().unwrap_or_default();
    let at = match bundle {
        Some(b) => Some((
            b,
            v["time"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .ok_or_else(|| bad("no time".into()))?,
        )),
        None => None,
    };
    let message = checkpoint_message(rec.seq, &rec.prev);
    let signer = check_signed(v["alg"].as_str(), &chain, &message, signature, at).map_err(bad)?;
    if let Some(signer) = signer
        && v["signer"].as_str() != Some(signer.as_str())
    {
        return Err(bad(format!(
            "signed by {signer} but claims {}",
            v["signer"]
        )));
    }
    Ok(())
}

/// Checks `signature` (hex) over `message` with the leaf of `chain` (DER, hex); with a
/// bundle and a time, also that the chain verifies against it then: the signer's ID.
pub(crate) fn check_signed(
    alg: Option<&str>,
    chain: &[String],
    message: &[u8],
    signature: &str,
    bundle: Option<(&TrustBundle, SystemTime)>,
) -> Result<Option<SpiffeId>, String> {
    let chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| unhex(c).map(CertificateDer::from))
        .collect::<Option<_>>()
        .ok_or("certificate chain is not hex")?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    let signature = unhex(signature).ok_or("signature is not hex")?;
    let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match alg {
        Some("ecdsa_p256_sha256") => webpki::aws_lc_rs::ECDSA_P256_SHA256,
        Some("ecdsa_p384_sha384") => webpki::aws_lc_rs::ECDSA_P384_SHA384,
        Some("ed25519") => webpki::aws_lc_rs::ED25519,
        other => return Err(format!("unknown algorithm {other:?}")),
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("certificate: {e:?}"))?;
    ee.verify_signature(alg, message, &signature)
        .map_err(|_| "the signature does not match what it covers".to_owned())?;
    let Some((bundle, at)) = bundle else {
        return Ok(None);
    };
    let signer = bundle
        .verify(&chain, at + Duration::from_secs(0), Usage::Client)
        .map_err(|e| format!("signer's certificate: {e}"))?;
    Ok(Some(signer.id))
}

fn read_head(dir: &Path) -> Result<Option<Head>, VerifyError> {
    match std::fs::read(dir.join(HEAD_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| dir_error(dir, &format!("{HEAD_FILE} does not parse: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(dir_error(dir, &format!("{HEAD_FILE}: {e}"))),
    }
}

fn dir_error(dir: &Path, reason: &str) -> VerifyError {
    VerifyError {
        segment: dir.display().to_string(),
        line: 0,
        seq: None,
        reason: reason.to_owned(),
    }
}

fn peek_seq(lines: &mut Peekable<Lines<'_>>) -> Option<u64> {
    match lines.peek() {
        Some(Ok(raw)) => parse(raw).ok().map(|r| r.seq),
        _ => None,
    }
}

fn peek_prev(lines: &mut Peekable<Lines<'_>>) -> Option<Digest> {
    match lines.peek() {
        Some(Ok(raw)) => parse(raw).ok().map(|r| r.prev),
        _ => None,
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A segment's name and its numbered lines.
type Segment = (String, std::vec::IntoIter<(usize, Vec<u8>)>);

/// Every line of every segment, in order, one segment in memory at a time.
struct Lines<'a> {
    files: std::slice::Iter<'a, (u64, PathBuf)>,
    current: Option<Segment>,
}

impl<'a> Lines<'a> {
    fn new(files: &'a [(u64, PathBuf)]) -> Self {
        Self {
            files: files.iter(),
            current: None,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = Result<Raw, VerifyError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((segment, lines)) = &mut self.current
                && let Some((line, bytes)) = lines.next()
            {
                return Some(Ok(Raw {
                    segment: segment.clone(),
                    line,
                    bytes,
                }));
            }
            let (_, path) = self.files.next()?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    return Some(Err(VerifyError {
                        segment: name,
                        line: 0,
                        seq: None,
                        reason: e.to_string(),
                    }));
                }
            };
            if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
                let line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
                return Some(Err(VerifyError {
                    segment: name,
                    line,
                    seq: None,
                    reason:
                        "the last record is incomplete (cut mid-record, or a crash while writing; \
                             a restarted node cuts it off)"
                            .into(),
                }));
            }
            let lines: Vec<(usize, Vec<u8>)> = bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(i, l)| (i + 1, l.to_vec()))
                .collect();
            self.current = Some((name, lines.into_iter()));
        }
    }
}
