//! The audit trail on disk.
//!
//! ```text
//!   DIR/audit-000001.jsonl   segments, each a run of hash-chained JSON lines (mode 0600)
//!   DIR/audit-000002.jsonl   the chain continues across segments
//!   DIR/checkpoint.json      the latest checkpoint's seq and hash, replaced atomically
//!   DIR/.lock                held by the one process that appends
//! ```
//!
//! Each record is one `write` of a whole line with `O_APPEND`. A write that fails (disk full,
//! permissions) is cut back off the file, the chain does not advance, and the error goes to
//! the caller, who refuses the work it was about: the trail fails closed. The next write that
//! succeeds makes the sink healthy again. Checkpoints, signed with the node's SVID key, are
//! written when the sink opens, by [`FileSink::tick`] (call it every second or so: it signs
//! once `checkpoint_interval` has passed since the last one with records after it), when a
//! segment is sealed, and by [`FileSink::close`] at shutdown; each is fsynced and recorded
//! in `checkpoint.json`, so a trail cut back past a checkpoint no longer matches it, and, with
//! [`FileSinkConfig::witness`], queued for a witness off the node (`audit/witness.rs`).
//! Segments are sealed by size and age and never deleted by the daemon.
//!
//! On open the sink checks the trail from the latest checkpoint to its end: records cut off
//! after it, a record there changed, a half-written last line, or records without a
//! `checkpoint.json` are never papered over. Each break is logged, kept in
//! [`FileSink::breaks`] for the node's metrics and `/readyz`, and recorded as a
//! `trail_broken` record (naming the old checkpoint) before the sink's first checkpoint, so
//! `audit verify` reports it after any number of restarts.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use certs::SpiffeId;

use super::chain::{Chain, checkpoint_message, hash_line};
use super::witness::{WitnessQueue, WitnessedCheckpoint};
use super::{AuditError, AuditEvent, AuditRecord, AuditSink, TrailBreakKind};
use crate::clock::Clock;
use crate::proto::Digest;

/// Where and how the trail is kept.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// The trail's directory.
    pub dir: PathBuf,
    /// A segment is sealed once it holds this many bytes (default 64 MiB).
    pub segment_max_bytes: u64,
    /// A segment is sealed once it is this old (default 1 day).
    pub segment_max_age: Duration,
    /// A checkpoint follows new records at most this long after the last (default 10 s).
    pub checkpoint_interval: Duration,
    /// How long to wait for another process that holds the trail (default 10 s).
    pub lock_wait: Duration,
    /// Where each checkpoint also goes, to be sent to a witness outside the node (none by
    /// default).
    pub witness: Option<WitnessQueue>,
}

impl FileSinkConfig {
    /// Defaults for a trail in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_max_bytes: 64 << 20,
            segment_max_age: Duration::from_secs(24 * 3600),
            checkpoint_interval: Duration::from_secs(10),
            lock_wait: Duration::from_secs(10),
            witness: None,
        }
    }
}

/// Signs checkpoints: the node's identity.
pub trait Signer: std::fmt::Debug + Send + Sync {
    /// Signs `message` with the current key.
    fn sign_checkpoint(&self, message: &[u8]) -> Result<CheckpointSignature, SignError>;
}

/// Why a [`Signer`] could not sign a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key cannot make any of the signatures a checkpoint may carry (ECDSA P-256 or
    /// P-384, Ed25519).
    #[error("the SVID's key type cannot sign audit checkpoints (use ECDSA or Ed25519)")]
    UnsupportedKey,
    /// The key chose a signature scheme it was not offered.
    #[error("unexpected signature scheme")]
    UnexpectedScheme,
    /// The key failed to sign.
    #[error(transparent)]
    Crypto(rustls::Error),
    /// Another signer's own failure (a key held elsewhere, such as an HSM).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// A checkpoint signature and what a verifier needs to check it.
#[derive(Debug, Clone)]
pub struct CheckpointSignature {
    /// Who signed.
    pub signer: SpiffeId,
    /// `ecdsa_p256_sha256`, `ecdsa_p384_sha384` or `ed25519`.
    pub alg: String,
    /// The signer's certificate chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// A break the sink found in its trail when it opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailBreak {
    /// What was found.
    pub found: TrailBreakKind,
    /// Where, in words.
    pub detail: String,
    /// The latest checkpoint on record before it (seq and line hash), if any.
    pub checkpoint: Option<(u64, Digest)>,
    /// The last record the trail held.
    pub last_seq: u64,
}

impl std::fmt::Display for TrailBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.found, self.detail)
    }
}

/// The hash-chained, checkpointed trail in a directory.
#[derive(Debug)]
pub struct FileSink {
    cfg: FileSinkConfig,
    signer: Arc<dyn Signer>,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    healthy: AtomicBool,
    breaks: Vec<TrailBreak>,
    breaks_on_record: u64,
    _lock: File,
}

#[derive(Debug)]
struct Inner {
    chain: Chain,
    file: File,
    segment: u64,
    bytes: u64,
    opened: SystemTime,
    /// Sequence number of the last checkpoint.
    sealed_seq: u64,
    last_checkpoint: Instant,
}

impl FileSink {
    /// Opens (creating if needed) the trail in `cfg.dir` and writes a checkpoint. A record
    /// left half-written (by a crash, say) is cut off first; a trail whose last record does
    /// not parse is refused (run `transportd audit verify` on it). What is found broken
    /// since the latest checkpoint is recorded before that checkpoint (see the module's
    /// documentation) and kept in [`FileSink::breaks`].
    pub fn open(
        cfg: FileSinkConfig,
        signer: Arc<dyn Signer>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.dir)?;
        let lock = lock_dir(&cfg.dir, cfg.lock_wait)?;
        let segments = segments(&cfg.dir)?;
        let now = clock.now();
        let (segment, chain, opened, breaks) = match segments.last() {
            None => (1, Chain::new(), now, check_head(&cfg.dir, &segments, 0)),
            Some(&(last, _)) => {
                let r = recover(&cfg.dir, &segments)?;
                (last, r.chain, r.first_time.unwrap_or(now), r.breaks)
            }
        };
        // Breaks recorded before this start, as the latest checkpoint carries them.
        let earlier_breaks = read_head(&cfg.dir).ok().flatten().map_or(0, |h| h.breaks);
        let file = open_segment(&cfg.dir, segment)?;
        let bytes = file.metadata()?.len();
        let started = clock.instant();
        let sink = Self {
            signer,
            clock,
            inner: Mutex::new(Inner {
                chain,
                file,
                segment,
                bytes,
                opened,
                sealed_seq: 0,
                last_checkpoint: started,
            }),
            healthy: AtomicBool::new(true),
            breaks_on_record: earlier_breaks + breaks.len() as u64,
            breaks,
            cfg,
            _lock: lock,
        };
        {
            let mut g = sink.lock();
            for b in &sink.breaks {
                tracing::error!(
                    dir = %sink.cfg.dir.display(),
                    found = %b.found,
                    detail = %b.detail,
                    "the audit trail was found broken; recording the break"
                );
                let record = AuditRecord {
                    time: sink.clock.now(),
                    event: AuditEvent::TrailBroken {
                        found: b.found,
                        detail: b.detail.clone(),
                        checkpoint_seq: b.checkpoint.map(|c| c.0),
                        checkpoint_hash: b.checkpoint.map(|c| c.1),
                        last_seq: b.last_seq,
                    },
                };
                sink.write(&mut g, &record)?;
            }
        }
        sink.checkpoint()?;
        Ok(sink)
    }

    /// What the sink found broken in its trail when it opened it (empty for a trail intact
    /// since its latest checkpoint). Each is also a `trail_broken` record in the trail.
    pub fn breaks(&self) -> &[TrailBreak] {
        &self.breaks
    }

    /// The `trail_broken` records in the trail, these included: found at this start or at
    /// an earlier one (the count goes from checkpoint to checkpoint in `checkpoint.json`).
    pub fn breaks_on_record(&self) -> u64 {
        self.breaks_on_record
    }

    /// The trail's directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Writes a signed checkpoint now, and fsyncs.
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        let mut g = self.lock();
        self.checkpoint_locked(&mut g)
    }

    /// Writes a checkpoint if records arrived since the last one and the interval has
    /// passed, or if the last write failed (a probe: success makes the sink healthy again).
    /// Call it periodically.
    pub fn tick(&self) -> Result<(), AuditError> {
        let mut g = self.lock();
        let due = g.chain.next_seq() > g.sealed_seq + 1
            && self
                .clock
                .instant()
                .saturating_duration_since(g.last_checkpoint)
                >= self.cfg.checkpoint_interval;
        if due || !self.is_healthy() {
            self.checkpoint_locked(&mut g)?;
        }
        Ok(())
    }

    /// Seals the trail for shutdown: a final checkpoint if anything followed the last one.
    pub fn close(&self) -> Result<(), AuditError> {
        let mut g = self.lock();
        if g.chain.next_seq() > g.sealed_seq + 1 {
            self.checkpoint_locked(&mut g)?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, g: &mut Inner, record: &AuditRecord) -> Result<(), AuditError> {
        let (mut line, next) = g.chain.encode(record)?;
        line.push(b'\n');
        match g.file.write_all(&line) {
            Ok(()) => {
                g.chain = next;
                g.bytes += line.len() as u64;
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Cut a partial line back off, so the trail stays a whole chain.
                let _ = g.file.set_len(g.bytes);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, dir = %self.cfg.dir.display(), "audit trail not writable; refusing new transfers until it is");
                }
                Err(e.into())
            }
        }
    }

    fn checkpoint_locked(&self, g: &mut Inner) -> Result<(), AuditError> {
        let seq = g.chain.next_seq();
        let prev = g.chain.prev();
        let msg = checkpoint_message(seq, &prev);
        let sig = self.signer.sign_checkpoint(&msg)?;
        let record = AuditRecord {
            time: self.clock.now(),
            event: AuditEvent::Checkpoint {
                signer: sig.signer,
                alg: sig.alg,
                chain: sig.chain.iter().map(|c| hex(c)).collect(),
                signature: hex(&sig.signature),
            },
        };
        self.write(g, &record)?;
        let synced = g.file.sync_data().and_then(|()| {
            write_head(
                &self.cfg.dir,
                &Head {
                    segment: segment_name(g.segment),
                    seq,
                    hash: g.chain.prev(),
                    breaks: self.breaks_on_record,
                },
            )
        });
        if let Err(e) = synced {
            self.healthy.store(false, Ordering::Relaxed);
            return Err(e.into());
        }
        g.sealed_seq = seq;
        g.last_checkpoint = self.clock.instant();
        if let Some(q) = &self.cfg.witness {
            let hash = g.chain.prev();
            q.push(WitnessedCheckpoint { seq, prev, hash }, g.last_checkpoint);
        }
        Ok(())
    }

    fn rotate_if_due(&self, g: &mut Inner) -> Result<(), AuditError> {
        let age = self
            .clock
            .now()
            .duration_since(g.opened)
            .unwrap_or_default();
        if g.bytes < self.cfg.segment_max_bytes && age < self.cfg.segment_max_age {
            return Ok(());
        }
        let name = segment_name(g.segment);
        let sealed = AuditRecord {
            time: self.clock.now(),
            event: AuditEvent::SegmentSealed {
                segment: name.clone(),
                last_seq: g.chain.next_seq() + 1,
            },
        };
        self.write(g, &sealed)?;
        self.checkpoint_locked(g)?;
        let next = open_segment(&self.cfg.dir, g.segment + 1)?;
        g.segment += 1;
        g.file = next;
        g.bytes = 0;
        g.opened = self.clock.now();
        tracing::info!(segment = %name, "audit segment sealed");
        Ok(())
    }
}

impl AuditSink for FileSink {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let mut g = self.lock();
        self.rotate_if_due(&mut g)?;
        // Checkpoints (a signature and an fsync) are left to `tick`, off the request path.
        self.write(&mut g, record)
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The latest checkpoint, as `checkpoint.json` holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Head {
    pub(crate) segment: String,
    pub(crate) seq: u64,
    pub(crate) hash: Digest,
    /// `trail_broken` records in the trail so far, carried from checkpoint to checkpoint.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) breaks: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub(crate) const HEAD_FILE: &str = "checkpoint.json";

pub(crate) fn segment_name(index: u64) -> String {
    format!("audit-{index:06}.jsonl")
}

/// The segments in `dir`, by index.
pub(crate) fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("audit-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((index, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Where a trail stands when a sink opens it.
struct Recovered {
    chain: Chain,
    /// The time of the last segment's first record.
    first_time: Option<SystemTime>,
    breaks: Vec<TrailBreak>,
}

/// Finds where the chain stands, cutting off a half-written last line, and what is broken
/// since the latest checkpoint.
fn recover(dir: &Path, segments: &[(u64, PathBuf)]) -> Result<Recovered, AuditError> {
    let mut first_time = None;
    let mut torn = None;
    let mut chain = None;
    for (i, (index, path)) in segments.iter().enumerate().rev() {
        let mut f = OpenOptions::new().read(true).write(true).open(path)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if whole < bytes.len() {
            tracing::warn!(segment = %path.display(), bytes = bytes.len() - whole, "cutting off a half-written audit record");
            f.set_len(whole as u64)?;
            f.seek(SeekFrom::End(0))?;
            f.sync_data()?;
            torn.get_or_insert((*index, bytes.len() - whole));
        }
        let lines: Vec<&[u8]> = bytes[..whole]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if i == segments.len() - 1 {
            first_time = lines.first().and_then(|l| record_time(l));
        }
        if let Some(last) = lines.last() {
            let seq = serde_json::from_slice::<serde_json::Value>(last)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                .ok_or_else(|| {
                    AuditError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the last record of {} does not parse; run `transportd audit verify {}`",
                            path.display(),
                            dir.display()
                        ),
                    ))
                })?;
            chain = Some(Chain::resume(seq, hash_line(last)));
            break;
        }
    }
    let chain = chain.unwrap_or_default();
    let last_seq = chain.next_seq() - 1;
    let mut breaks = check_head(dir, segments, last_seq);
    if let Some((index, bytes)) = torn {
        let head = read_head(dir).ok().flatten();
        breaks.push(TrailBreak {
            found: TrailBreakKind::Torn,
            detail: format!(
                "{bytes} bytes of a half-written record at the end of {} (after seq {last_seq}) were cut off",
                segment_name(index)
            ),
            checkpoint: head.map(|h| (h.seq, h.hash)),
            last_seq,
        });
    }
    Ok(Recovered {
        chain,
        first_time,
        breaks,
    })
}

/// `checkpoint.json`, if there is one.
fn read_head(dir: &Path) -> Result<Option<Head>, String> {
    match std::fs::read(dir.join(HEAD_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{HEAD_FILE} does not parse ({e})")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{HEAD_FILE} cannot be read ({e})")),
    }
}

/// Checks the trail from its latest checkpoint (as `checkpoint.json` names it) to its last
/// record, `last_seq`: that record is there, unchanged, and every record after it follows.
fn check_head(dir: &Path, segments: &[(u64, PathBuf)], last_seq: u64) -> Vec<TrailBreak> {
    let broken = |found, detail: String, head: Option<&Head>| {
        vec![TrailBreak {
            found,
            detail,
            checkpoint: head.map(|h| (h.seq, h.hash)),
            last_seq,
        }]
    };
    let head = match read_head(dir) {
        Ok(Some(h)) => h,
        Ok(None) if last_seq == 0 => return Vec::new(),
        Ok(None) => {
            return broken(
                TrailBreakKind::CheckpointMissing,
                format!("the trail holds records up to seq {last_seq}, but {HEAD_FILE} is missing"),
                None,
            );
        }
        Err(why) => return broken(TrailBreakKind::CheckpointMissing, why, None),
    };
    let h = Some(&head);
    if last_seq < head.seq {
        let detail = if last_seq == 0 {
            format!(
                "the trail holds no records, but its latest checkpoint is seq {} in {}",
                head.seq, head.segment
            )
        } else {
            format!(
                "the trail ends at seq {last_seq}, before its latest checkpoint (seq {} in {}): \
                 records after seq {last_seq} were cut off",
                head.seq, head.segment
            )
        };
        return broken(TrailBreakKind::Cut, detail, h);
    }
    // Usually from the segment the checkpoint names; if its record is not there or after,
    // from the first segment (as `verify` looks for it, by sequence number).
    let named = segments
        .iter()
        .position(|(i, _)| segment_name(*i) == head.segment);
    let found = match named.map(|start| follow(&segments[start..], &head)) {
        Some(Ok(Some(()))) => Ok(Some(())),
        Some(Err(e)) => Err(e),
        Some(Ok(None)) | None => follow(segments, &head),
    };
    match found {
        Ok(Some(())) => Vec::new(),
        Ok(None) => broken(
            TrailBreakKind::Changed,
            format!(
                "no record with the latest checkpoint's seq {} (in {})",
                head.seq, head.segment
            ),
            h,
        ),
        Err(detail) => broken(TrailBreakKind::Changed, detail, h),
    }
}

/// Follows `segments` from the record of `head` to the end: `Some` if that record is there
/// unchanged and every record after it follows; `None` if it is not there; what is wrong
/// otherwise.
fn follow(segments: &[(u64, PathBuf)], head: &Head) -> Result<Option<()>, String> {
    // From the checkpoint's record on: (seq, hash) of the record before.
    let mut before: Option<(u64, Digest)> = None;
    for (index, path) in segments {
        let name = segment_name(*index);
        let bytes = std::fs::read(path).map_err(|e| format!("{name}: {e}"))?;
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let v: Option<serde_json::Value> = serde_json::from_slice(line).ok();
            let seq = v.as_ref().and_then(|v| v["seq"].as_u64());
            let prev = v
                .as_ref()
                .and_then(|v| v["prev"].as_str().and_then(Digest::from_hex));
            let (Some(seq), Some(prev)) = (seq, prev) else {
                if before.is_none() {
                    continue;
                }
                return Err(format!(
                    "{name} line {}: the record no longer parses",
                    n + 1
                ));
            };
            let hash = hash_line(line);
            match before {
                None if seq == head.seq => {
                    if hash != head.hash {
                        return Err(format!(
                            "{name} line {}: the record at seq {seq} no longer matches the \
                             latest checkpoint",
                            n + 1
                        ));
                    }
                }
                None => continue,
                Some((s, p)) if seq != s + 1 || prev != p => {
                    return Err(format!(
                        "{name} line {}: the record at seq {seq} does not follow the record \
                         before it (seq {s})",
                        n + 1
                    ));
                }
                Some(_) => {}
            }
            before = Some((seq, hash));
        }
    }
    Ok(before.map(|_| ()))
}

fn record_time(line: &[u8]) -> Option<SystemTime> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    humantime::parse_rfc3339(v["time"].as_str()?).ok()
}

fn open_segment(dir: &Path, index: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(segment_name(index)))
}

fn write_head(dir: &Path, head: &Head) -> io::Result<()> {
    let tmp = dir.join(format!("{HEAD_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(head).map_err(io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(HEAD_FILE))?;
    File::open(dir)?.sync_all()
}

/// Takes the directory's lock, waiting up to `wait` for another writer to let go.
fn lock_dir(dir: &Path, wait: Duration) -> Result<File, AuditError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".lock"))?;
    for _ in 0..=wait.as_millis() / 50 {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    Err(AuditError::Io(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("audit trail {} is held by another process", dir.display()),
    )))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    /// A signer whose key cannot sign checkpoints.
    #[derive(Debug)]
    struct RsaOnly;

    impl Signer for RsaOnly {
        fn sign_checkpoint(&self, _message: &[u8]) -> Result<CheckpointSignature, SignError> {
            Err(SignError::UnsupportedKey)
        }
    }

    #[test]
    fn a_checkpoint_that_cannot_be_signed_refuses_the_trail_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let e = FileSink::open(
            FileSinkConfig::new(dir.path()),
            Arc::new(RsaOnly),
            Arc::new(SystemClock),
        )
        .unwrap_err();
        assert!(
            matches!(e, AuditError::Sign(SignError::UnsupportedKey)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "audit checkpoint: the SVID's key type cannot sign audit checkpoints \
             (use ECDSA or Ed25519)"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
