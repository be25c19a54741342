//! The audit trail on disk.
//!
//! ```text
//!   DIR/audit-000001.jsonl   segments, each a run of hash-chained JSON lines (mode 0600)
//!   DIR/audit-000002.jsonl   the chain continues across segments
//!   DIR/checkpoint.json      the latest checkpoint's seq and hash, replaced atomically
//!   DIR/.lock                held by the one process that appends
//!   DIR/synced               the last fsynced record's seq and hash, rewritten in place
//! ```
//!
//! Records are written by a thread of the sink's own, the writer, never by the caller:
//! [`AuditSink::record`] encodes its record (the one allocation, with room ahead for the
//! chain's `seq` and `prev`), queues it, and waits for the writer to link and append it
//! (and, with [`FsyncSchedule::Record`], fsync it) for at most
//! [`FileSinkConfig::write_timeout`]. Each record is one `write` of a whole line with
//! `O_APPEND`; a write that fails is cut back off the file and the chain does not advance.
//!
//! **Stalls.** When a write or fsync fails (full, EIO) or a caller's wait runs out (a disk
//! that does not answer), or the queue ([`FileSinkConfig::queue`]) is full, the trail is
//! stalled: that caller gets [`AuditError::Unavailable`] and refuses the work its record was
//! about (the trail fails closed), [`AuditSink::is_healthy`] turns false, and from then on
//! every new record is refused at once without being queued. The writer keeps trying the
//! record it holds (pausing up to a second between attempts) and never drops one: records
//! queued before the stall are written when the disk answers again, and then an
//! `audit_stalled` record (since when, how long, what failed first, how many records were
//! refused, which were written late) is the probe whose success ends the stall. Only a
//! sink closed while its disk still fails gives up the records it holds (logged).
//!
//! **Checkpoints**, signed with the node's SVID key, are written by the writer when the sink
//! opens, once `checkpoint_interval` has passed since the last one with records after it
//! ([`FileSink::tick`] only wakes the writer), when a segment is sealed, by
//! [`FileSink::checkpoint`], and by [`FileSink::close`] at shutdown; each is fsynced and
//! recorded in `checkpoint.json`, so a trail cut back past a checkpoint no longer matches
//! it, and, with [`FileSinkConfig::witness`], queued for a witness off the node
//! (`audit/witness.rs`). Segments are sealed by size and age and never deleted by the
//! daemon. Records are fsynced on [`FileSinkConfig::fsync`]'s schedule, and after every
//! fsync `synced` names the last record on disk for sure.
//!
//! On open the sink checks the trail from the latest checkpoint to its end: records cut off
//! after it, a record there changed, a half-written last line, or records without a
//! `checkpoint.json` are never papered over. Each break is logged, kept in
//! [`FileSink::breaks`] for the node's metrics and `/readyz`, and recorded as a
//! `trail_broken` record (naming the old checkpoint) before the sink's first checkpoint, so
//! `audit verify` reports it after any number of restarts. A trail that ends before the
//! record `synced` names was cut after its records reached the disk: a `cut` break. A trail
//! with records after its latest checkpoint was not closed (a crash, a kill, a power cut):
//! an `unclean_stop` record says so, with the last record found and the last fsynced.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use certs::SpiffeId;

use super::chain::{Chain, checkpoint_message, hash_line, unlinked};
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
    /// How long [`AuditSink::record`] waits for its record to be written before it gives
    /// up and the work it was about is refused (default 2 s).
    pub write_timeout: Duration,
    /// When records reach the disk for sure (default: at most 1 s after they are written).
    pub fsync: FsyncSchedule,
    /// Records waiting for the writer at most; past it records are refused at once
    /// (default 4096).
    pub queue: usize,
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
            write_timeout: Duration::from_secs(2),
            fsync: FsyncSchedule::Interval(Duration::from_secs(1)),
            queue: 4096,
        }
    }
}

/// When the trail's records are fsynced. A record is acknowledged (its `record` call
/// returns) once it is written; a power cut loses what was written and not yet fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncSchedule {
    /// Before each record is acknowledged (records that arrive together share one fsync):
    /// a power cut loses no acknowledged record.
    Record,
    /// At most this long after a record: a power cut loses at most this much of the trail.
    Interval(Duration),
    /// Only with each signed checkpoint: a power cut loses at most `checkpoint_interval`
    /// of the trail.
    Checkpoint,
}

impl FsyncSchedule {
    /// Parses `record`, `checkpoint` or a duration such as `1s` (humantime).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "record" => Ok(Self::Record),
            "checkpoint" => Ok(Self::Checkpoint),
            d => match humantime::parse_duration(d) {
                Ok(d) if !d.is_zero() => Ok(Self::Interval(d)),
                _ => Err(format!(
                    "\"{s}\": give \"record\", \"checkpoint\" or a duration such as \"1s\""
                )),
            },
        }
    }
}

impl std::fmt::Display for FsyncSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Record => f.write_str("record"),
            Self::Checkpoint => f.write_str("checkpoint"),
            Self::Interval(d) => write!(f, "{}", humantime::format_duration(*d)),
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
///
/// Records are written by a thread of the sink's own (the writer), never by the caller:
/// [`AuditSink::record`] encodes its record, queues it and waits for it to be written (and
/// fsynced, with [`FsyncSchedule::Record`]) for at most
/// [`FileSinkConfig::write_timeout`]. See the module's documentation for a stall.
#[derive(Debug)]
pub struct FileSink {
    cfg: FileSinkConfig,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    breaks: Vec<TrailBreak>,
    breaks_on_record: u64,
    _lock: File,
}

/// What the callers and the writer share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for work.
    work: Condvar,
    /// Callers wait here for their ticket.
    done: Condvar,
    healthy: AtomicBool,
    /// Tests make the disk fail or hang here.
    #[cfg(test)]
    fault: tests::Fault,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<(u64, Job)>,
    /// The ticket the next job gets.
    next_ticket: u64,
    /// Every job with a ticket up to this one is done.
    done: u64,
    /// A control job (checkpoint, close) that failed: its ticket and why.
    failed: Option<(u64, String)>,
    stall: Option<Stall>,
    /// `tick` asked for a checkpoint if one is due.
    tick: bool,
    /// `close` was called: no more records.
    closing: bool,
}

#[derive(Debug)]
enum Job {
    /// A record from [`unlinked`], to be linked and appended.
    Line(Vec<u8>),
    /// A checkpoint now.
    Checkpoint,
    /// A closing checkpoint if records followed the last one; then the writer ends.
    Close,
}

/// The trail could not be written: since when, and what happened meanwhile.
#[derive(Debug)]
struct Stall {
    since: SystemTime,
    began: Instant,
    /// Records refused (not queued, or their caller gave up waiting).
    refused: u64,
    /// What went wrong first.
    error: String,
    /// Records queued before the stall (or whose caller gave up) written after it began:
    /// the first one's seq, and how many.
    late: Option<(u64, u64)>,
}

/// The writer's own state: the open segment and where the chain stands.
#[derive(Debug)]
struct Writer {
    cfg: FileSinkConfig,
    signer: Arc<dyn Signer>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    breaks_on_record: u64,
    chain: Chain,
    file: File,
    segment: u64,
    /// Bytes of whole records in the segment; anything past it is a failed write's.
    bytes: u64,
    /// A write failed: the file may hold part of a line past `bytes`.
    dirty: bool,
    opened: SystemTime,
    /// Sequence number of the last checkpoint.
    sealed_seq: u64,
    last_checkpoint: Instant,
    /// `synced`: the seq and hash of the last record fsynced.
    synced: File,
    /// Records written since the last fsync: the first one's time.
    unsynced_since: Option<Instant>,
}

/// How long the writer sleeps when idle before it looks at the clock (checkpoints,
/// fsyncs, a stall to close).
const WAKE: Duration = Duration::from_millis(200);
/// The writer's pauses between attempts while writing fails.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long `checkpoint` and `close` wait for the writer at least.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

impl FileSink {
    /// Opens (creating if needed) the trail in `cfg.dir`, writes a checkpoint, and starts
    /// the writer. A record left half-written (by a crash, say) is cut off first; a trail
    /// whose last record does not parse is refused (run `transportd audit verify` on it).
    /// What is found broken since the latest checkpoint is recorded before that checkpoint
    /// (see the module's documentation) and kept in [`FileSink::breaks`].
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
        let head = read_head(&cfg.dir).ok().flatten();
        let synced = read_synced(&cfg.dir);
        let (segment, chain, opened, mut breaks) = match segments.last() {
            None => (1, Chain::new(), now, check_head(&cfg.dir, &segments, 0)),
            Some(&(last, _)) => {
                let r = recover(&cfg.dir, &segments)?;
                (last, r.chain, r.first_time.unwrap_or(now), r.breaks)
            }
        };
        let last_seq = chain.next_seq() - 1;
        // Records fsynced once and gone now were removed, not lost in a crash.
        if let Some((s, _)) = synced
            && s > last_seq
            && !breaks.iter().any(|b| b.found == TrailBreakKind::Cut)
        {
            breaks.push(TrailBreak {
                found: TrailBreakKind::Cut,
                detail: format!(
                    "the trail ends at seq {last_seq}, but records up to seq {s} had been \
                     fsynced ({SYNCED_FILE}): records {}..={s} were removed after they \
                     reached the disk",
                    last_seq + 1
                ),
                checkpoint: head.as_ref().map(|h| (h.seq, h.hash)),
                last_seq,
            });
        }
        // Records after the latest checkpoint and no closing one: the node stopped without
        // closing its trail (a crash, a kill, a power cut).
        let unclean = head
            .as_ref()
            .filter(|h| breaks.is_empty() && last_seq > h.seq)
            .map(|_| AuditEvent::UncleanStop {
                last_seq,
                synced_seq: synced.map(|s| s.0),
                fsync: cfg.fsync.to_string(),
            });
        // Breaks recorded before this start, as the latest checkpoint carries them.
        let earlier_breaks = head.as_ref().map_or(0, |h| h.breaks);
        let file = open_segment(&cfg.dir, segment)?;
        let bytes = file.metadata()?.len();
        let synced_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(cfg.dir.join(SYNCED_FILE))?;
        let started = clock.instant();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(cfg.queue.min(1 << 16)),
                next_ticket: 1,
                done: 0,
                failed: None,
                stall: None,
                tick: false,
                closing: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            healthy: AtomicBool::new(true),
            #[cfg(test)]
            fault: tests::Fault::default(),
        });
        let breaks_on_record = earlier_breaks + breaks.len() as u64;
        let mut w = Writer {
            cfg: cfg.clone(),
            signer,
            clock: clock.clone(),
            shared: shared.clone(),
            breaks_on_record,
            chain,
            file,
            segment,
            bytes,
            dirty: false,
            opened,
            sealed_seq: 0,
            last_checkpoint: started,
            synced: synced_file,
            unsynced_since: None,
        };
        for b in &breaks {
            tracing::error!(
                dir = %cfg.dir.display(),
                found = %b.found,
                detail = %b.detail,
                "the audit trail was found broken; recording the break"
            );
            w.write_record(&AuditRecord {
                time: w.clock.now(),
                event: AuditEvent::TrailBroken {
                    found: b.found,
                    detail: b.detail.clone(),
                    checkpoint_seq: b.checkpoint.map(|c| c.0),
                    checkpoint_hash: b.checkpoint.map(|c| c.1),
                    last_seq: b.last_seq,
                },
            })?;
        }
        if let Some(event) = unclean {
            tracing::warn!(
                dir = %cfg.dir.display(),
                last_seq,
                synced_seq = ?synced.map(|s| s.0),
                fsync = %cfg.fsync,
                "the audit trail was not closed at the last stop (crash, kill or power cut): \
                 records acknowledged after its last record, if any, were lost; recording it"
            );
            w.write_record(&AuditRecord {
                time: w.clock.now(),
                event,
            })?;
        }
        w.checkpoint()?;
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run())?;
        Ok(Self {
            cfg,
            clock,
            shared,
            writer: Mutex::new(Some(writer)),
            breaks,
            breaks_on_record,
            _lock: lock,
        })
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

    /// Writes a signed checkpoint now (after the records queued before it), and fsyncs.
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        self.control(Job::Checkpoint)
    }

    /// Asks the writer for a checkpoint if records arrived since the last one and the
    /// interval has passed (the writer also looks by itself). Does not wait.
    pub fn tick(&self) -> Result<(), AuditError> {
        let mut st = self.shared.lock();
        st.tick = true;
        self.shared.work.notify_one();
        Ok(())
    }

    /// Seals the trail for shutdown: a final checkpoint if anything followed the last one;
    /// records after it are refused.
    pub fn close(&self) -> Result<(), AuditError> {
        if self.shared.lock().closing {
            return Ok(());
        }
        let r = self.control(Job::Close);
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // A writer stuck on a disk that does not answer is left behind, not waited for.
        if writer.as_ref().is_some_and(|w| w.is_finished())
            && let Some(w) = writer.take()
        {
            let _ = w.join();
        }
        r
    }

    /// Queues a control job and waits for it.
    fn control(&self, job: Job) -> Result<(), AuditError> {
        let mut st = self.shared.lock();
        if st.closing {
            return Err(AuditError::Unavailable("the trail is closed"));
        }
        if matches!(job, Job::Close) {
            st.closing = true;
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back((ticket, job));
        self.shared.work.notify_one();
        let wait = self.cfg.write_timeout.max(CONTROL_WAIT);
        let (st, _) = self
            .shared
            .done
            .wait_timeout_while(st, wait, |st| st.done < ticket)
            .unwrap_or_else(PoisonError::into_inner);
        if st.done < ticket {
            return Err(AuditError::Unavailable(
                "the audit writer did not answer (the disk fails or does not answer)",
            ));
        }
        match &st.failed {
            Some((t, why)) if *t == ticket => Err(AuditError::Io(io::Error::other(why.clone()))),
            _ => Ok(()),
        }
    }

    /// Marks the trail stalled (if it is not already) and counts a refused record.
    fn refuse(&self, st: &mut State, why: &'static str) -> AuditError {
        let stall = st.stall.get_or_insert_with(|| {
            self.shared.healthy.store(false, Ordering::Relaxed);
            tracing::error!(
                dir = %self.cfg.dir.display(),
                bound = ?self.cfg.write_timeout,
                "audit trail: {why}; refusing new records until it is written again"
            );
            Stall {
                since: self.clock.now(),
                began: self.clock.instant(),
                refused: 0,
                error: why.to_owned(),
                late: None,
            }
        });
        stall.refused += 1;
        AuditError::Unavailable(why)
    }
}

impl AuditSink for FileSink {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let buf = unlinked(record)?;
        let mut st = self.shared.lock();
        if st.closing {
            return Err(AuditError::Unavailable("the trail is closed"));
        }
        if st.stall.is_some() {
            return Err(self.refuse(&mut st, "the audit writer is stalled"));
        }
        if st.queue.len() >= self.cfg.queue {
            return Err(self.refuse(&mut st, "the audit writer's queue is full"));
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back((ticket, Job::Line(buf)));
        self.shared.work.notify_one();
        let (mut st, _) = self
            .shared
            .done
            .wait_timeout_while(st, self.cfg.write_timeout, |st| st.done < ticket)
            .unwrap_or_else(PoisonError::into_inner);
        if st.done < ticket {
            // The record stays queued: it is written when the disk answers again.
            return Err(self.refuse(
                &mut st,
                "a record was not written within audit.write_timeout (the disk fails or does not answer)",
            ));
        }
        if st.failed.as_ref().is_some_and(|(t, _)| *t == ticket) {
            return Err(AuditError::Unavailable(
                "the trail closed before the record was written",
            ));
        }
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Writer {
    /// The writer's loop: jobs in order; when idle, what the clock asks for.
    fn run(mut self) {
        loop {
            let job = {
                let mut st = self.shared.lock();
                if st.queue.is_empty() && !st.tick {
                    st = self
                        .shared
                        .work
                        .wait_timeout(st, WAKE)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                // `tick` only wakes the writer early: the clock decides below.
                st.tick = false;
                st.queue.pop_front()
            };
            match job {
                Some((ticket, Job::Line(mut buf))) => {
                    if !self.append_retrying(&mut buf) {
                        // Closing on a disk that fails: the record cannot be written.
                        tracing::error!(
                            dir = %self.cfg.dir.display(),
                            "audit record lost at shutdown: the trail cannot be written"
                        );
                        self.finish(
                            ticket,
                            Some("the trail closed before the record was written".into()),
                        );
                    } else if self.cfg.fsync != FsyncSchedule::Record {
                        self.finish(ticket, None);
                    } else if self.queue_is_idle() {
                        // With `record`, the records queued behind one share its fsync.
                        self.sync_retrying();
                        self.finish(ticket, None);
                    }
                    // Else the next job (a record, a checkpoint) fsyncs and answers for it.
                }
                Some((ticket, Job::Checkpoint)) => {
                    let r = self.checkpoint().err().map(|e| e.to_string());
                    self.finish(ticket, r);
                }
                Some((ticket, Job::Close)) => {
                    let r = if self.chain.next_seq() > self.sealed_seq + 1 {
                        self.checkpoint().err().map(|e| e.to_string())
                    } else {
                        None
                    };
                    self.finish(ticket, r);
                    return;
                }
                None => {}
            }
            if !self.queue_is_idle() {
                continue;
            }
            self.close_stall();
            let now = self.clock.instant();
            let due = self.chain.next_seq() > self.sealed_seq + 1
                && now.saturating_duration_since(self.last_checkpoint)
                    >= self.cfg.checkpoint_interval;
            if due
                && self.shared.healthy.load(Ordering::Relaxed)
                && let Err(e) = self.checkpoint()
            {
                tracing::warn!(error = %e, "audit checkpoint failed");
            }
            if let (FsyncSchedule::Interval(every), Some(since)) =
                (self.cfg.fsync, self.unsynced_since)
                && now.saturating_duration_since(since) >= every
                && let Err(e) = self.sync()
            {
                self.stalled(&e);
            }
        }
    }

    fn queue_is_idle(&self) -> bool {
        self.shared.lock().queue.is_empty()
    }

    /// Marks job `ticket` (and every one before it) done.
    fn finish(&self, ticket: u64, failed: Option<String>) {
        let mut st = self.shared.lock();
        st.done = ticket;
        if let Some(why) = failed {
            st.failed = Some((ticket, why));
        }
        self.shared.done.notify_all();
    }

    /// Writing failed: the trail is stalled from now (if it was not already).
    fn stalled(&self, e: &dyn std::fmt::Display) {
        let mut st = self.shared.lock();
        if st.stall.is_none() {
            self.shared.healthy.store(false, Ordering::Relaxed);
            tracing::error!(
                error = %e,
                dir = %self.cfg.dir.display(),
                "audit trail not writable; refusing new records until it is"
            );
            st.stall = Some(Stall {
                since: self.clock.now(),
                began: self.clock.instant(),
                refused: 0,
                error: e.to_string(),
                late: None,
            });
        }
    }

    /// Appends a queued record, trying again while the disk fails (never dropping it);
    /// false if the sink closed meanwhile and it was given up.
    fn append_retrying(&mut self, buf: &mut [u8]) -> bool {
        let mut pause = RETRY_MIN;
        loop {
            match self.append(buf) {
                Ok(seq) => {
                    let mut st = self.shared.lock();
                    if let Some(s) = &mut st.stall {
                        let late = s.late.get_or_insert((seq, 0));
                        late.1 += 1;
                    }
                    return true;
                }
                Err(e) => {
                    self.stalled(&e);
                    if self.shared.lock().closing {
                        return false;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Fsyncs, trying again while the disk fails.
    fn sync_retrying(&mut self) {
        let mut pause = RETRY_MIN;
        while let Err(e) = self.sync() {
            self.stalled(&e);
            if self.shared.lock().closing {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// Once the queue is empty after a stall: writes the `audit_stalled` record (the probe
    /// that the disk answers again) and takes new records again.
    fn close_stall(&mut self) {
        let (since, began, refused, error, late) = {
            let st = self.shared.lock();
            let Some(s) = &st.stall else { return };
            (s.since, s.began, s.refused, s.error.clone(), s.late)
        };
        // Records written and not fsynced must reach the disk first: a disk that takes
        // writes but fails fsyncs is still stalled.
        if self.cfg.fsync != FsyncSchedule::Checkpoint
            && self.unsynced_since.is_some()
            && let Err(e) = self.sync()
        {
            tracing::debug!(error = %e, "audit trail still not writable");
            std::thread::sleep(RETRY_MAX);
            return;
        }
        let now = self.clock.instant();
        let record = AuditRecord {
            time: self.clock.now(),
            event: AuditEvent::AuditStalled {
                since,
                duration_ms: u64::try_from(now.saturating_duration_since(began).as_millis())
                    .unwrap_or(u64::MAX),
                refused,
                late: late.map_or(0, |l| l.1),
                late_first_seq: late.map(|l| l.0),
                error,
            },
        };
        let written = self
            .write_record(&record)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if self.cfg.fsync == FsyncSchedule::Record {
                    self.sync().map_err(|e| e.to_string())
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            tracing::debug!(error = %e, "audit trail still not writable");
            std::thread::sleep(RETRY_MAX);
            return;
        }
        let mut st = self.shared.lock();
        // Refusals counted since the record was made are in the log, not lost: say so.
        let more = st.stall.take().map_or(0, |s| s.refused - refused);
        self.shared.healthy.store(true, Ordering::Relaxed);
        drop(st);
        tracing::warn!(
            dir = %self.cfg.dir.display(),
            stalled_ms = u64::try_from(now.saturating_duration_since(began).as_millis()).unwrap_or(u64::MAX),
            refused = refused + more,
            "audit trail writable again; the stall is recorded in it"
        );
    }

    /// Links and appends one record; its seq.
    fn append(&mut self, buf: &mut [u8]) -> Result<u64, AuditError> {
        self.rotate_if_due()?;
        let (start, next) = self.chain.link(buf);
        self.write_line(&buf[start..])?;
        let seq = self.chain.next_seq();
        self.chain = next;
        Ok(seq)
    }

    fn write_record(&mut self, record: &AuditRecord) -> Result<(), AuditError> {
        let mut buf = unlinked(record)?;
        let (start, next) = self.chain.link(&mut buf);
        self.write_line(&buf[start..])?;
        self.chain = next;
        Ok(())
    }

    /// Writes a whole line; a failed write is cut back off before the next one, so the
    /// trail stays a whole chain.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        self.shared.fault.check()?;
        if self.dirty {
            if self.file.metadata()?.len() != self.bytes {
                self.file.set_len(self.bytes)?;
            }
            self.dirty = false;
        }
        if let Err(e) = self.file.write_all(line) {
            self.dirty = true;
            let _ = self.file.set_len(self.bytes).map(|()| self.dirty = false);
            return Err(e);
        }
        self.bytes += line.len() as u64;
        self.unsynced_since
            .get_or_insert_with(|| self.clock.instant());
        Ok(())
    }

    /// Fsyncs the segment, then records in `synced` how far the trail is on the disk.
    fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        self.shared.fault.check()?;
        self.file.sync_data()?;
        let seq = self.chain.next_seq() - 1;
        let mut line = [b' '; SYNCED_LEN];
        {
            let mut w = &mut line[..];
            write!(w, "{seq:020} ")?;
            w.write_all(self.chain.prev().to_hex().as_bytes())?;
        }
        line[SYNCED_LEN - 1] = b'\n';
        self.synced.write_all_at(&line, 0)?;
        self.synced.sync_data()?;
        self.unsynced_since = None;
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), AuditError> {
        let seq = self.chain.next_seq();
        let prev = self.chain.prev();
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
        let synced = self.write_record(&record).map_err(|e| match e {
            AuditError::Io(e) => e,
            e => io::Error::other(e.to_string()),
        });
        let synced = synced.and_then(|()| self.sync()).and_then(|()| {
            write_head(
                &self.cfg.dir,
                &Head {
                    segment: segment_name(self.segment),
                    seq,
                    hash: self.chain.prev(),
                    breaks: self.breaks_on_record,
                },
            )
        });
        if let Err(e) = synced {
            self.stalled(&e);
            return Err(e.into());
        }
        self.sealed_seq = seq;
        self.last_checkpoint = self.clock.instant();
        if let Some(q) = &self.cfg.witness {
            let hash = self.chain.prev();
            q.push(
                WitnessedCheckpoint { seq, prev, hash },
                self.last_checkpoint,
            );
        }
        Ok(())
    }

    fn rotate_if_due(&mut self) -> Result<(), AuditError> {
        let age = self
            .clock
            .now()
            .duration_since(self.opened)
            .unwrap_or_default();
        if self.bytes < self.cfg.segment_max_bytes && age < self.cfg.segment_max_age {
            return Ok(());
        }
        let name = segment_name(self.segment);
        let sealed = AuditRecord {
            time: self.clock.now(),
            event: AuditEvent::SegmentSealed {
                segment: name.clone(),
                last_seq: self.chain.next_seq() + 1,
            },
        };
        self.write_record(&sealed)?;
        self.checkpoint()?;
        let next = open_segment(&self.cfg.dir, self.segment + 1)?;
        self.segment += 1;
        self.file = next;
        self.bytes = 0;
        self.opened = self.clock.now();
        tracing::info!(segment = %name, "audit segment sealed");
        Ok(())
    }
}

/// The seq and hash of the last record fsynced, kept beside the trail (one fixed-size line,
/// rewritten in place after each fsync): on open, a trail that ends before it was cut after
/// its records reached the disk.
pub(crate) const SYNCED_FILE: &str = "synced";
const SYNCED_LEN: usize = 20 + 1 + 64 + 1;

/// `synced`, if it is there and whole.
fn read_synced(dir: &Path) -> Option<(u64, Digest)> {
    let bytes = std::fs::read(dir.join(SYNCED_FILE)).ok()?;
    let text = std::str::from_utf8(bytes.get(..SYNCED_LEN - 1)?).ok()?;
    let (seq, hash) = text.split_once(' ')?;
    Some((seq.parse().ok()?, Digest::from_hex(hash)?))
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

    /// What the trail's disk does, for the writer's tests: pass through, fail every write
    /// and fsync (EIO), or block them until switched back.
    #[derive(Debug, Default)]
    pub(super) struct Fault {
        mode: Mutex<u8>,
        changed: Condvar,
    }

    const PASS: u8 = 0;
    const FAIL: u8 = 1;
    const HANG: u8 = 2;

    impl Fault {
        fn set(&self, mode: u8) {
            *self.mode.lock().unwrap() = mode;
            self.changed.notify_all();
        }

        pub(super) fn check(&self) -> io::Result<()> {
            let mut m = self.mode.lock().unwrap();
            while *m == HANG {
                m = self.changed.wait(m).unwrap();
            }
            if *m == FAIL {
                return Err(io::Error::from_raw_os_error(5));
            }
            Ok(())
        }
    }

    fn sink(dir: &Path, tune: impl FnOnce(&mut FileSinkConfig)) -> FileSink {
        let pki = certs::test_util::TestPki::new("hospital.example");
        let signer: Arc<dyn Signer> = Arc::new(crate::test_util::identity(&pki, "/node/storage"));
        let mut cfg = FileSinkConfig::new(dir);
        cfg.checkpoint_interval = Duration::from_secs(3600);
        cfg.write_timeout = Duration::from_millis(300);
        tune(&mut cfg);
        FileSink::open(cfg, signer, Arc::new(SystemClock)).unwrap()
    }

    fn rec(reason: &str) -> AuditRecord {
        AuditRecord {
            time: SystemClock.now(),
            event: AuditEvent::PolicyRefused {
                source: "policy.toml".into(),
                reason: reason.into(),
            },
        }
    }

    fn events(dir: &Path) -> Vec<serde_json::Value> {
        super::super::query(dir, &Default::default()).unwrap()
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..300 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}");
    }

    fn refused(sink: &FileSink) -> u64 {
        sink.shared.lock().stall.as_ref().map_or(0, |s| s.refused)
    }

    #[test]
    fn a_failing_disk_refuses_records_then_recovers_and_records_the_stall() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink(tmp.path(), |c| c.fsync = FsyncSchedule::Record);
        sink.record(&rec("before")).unwrap();
        sink.shared.fault.set(FAIL);
        let e = sink.record(&rec("during")).unwrap_err();
        assert!(matches!(e, AuditError::Unavailable(_)), "{e:?}");
        assert!(!sink.is_healthy());
        // While stalled, records are refused at once and never queued.
        for _ in 0..5 {
            assert!(sink.record(&rec("refused")).is_err());
        }
        assert!(sink.shared.lock().queue.is_empty());
        assert_eq!(refused(&sink), 6);
        sink.shared.fault.set(PASS);
        wait_until("the sink to recover", || sink.is_healthy());
        sink.record(&rec("after")).unwrap();
        sink.close().unwrap();
        let ev = events(tmp.path());
        let reasons: Vec<_> = ev.iter().filter_map(|r| r["reason"].as_str()).collect();
        // The record whose caller gave up is written late, never dropped; the refused ones
        // are not in the trail, but counted.
        assert_eq!(reasons, ["before", "during", "after"]);
        let stall = ev.iter().find(|r| r["event"] == "audit_stalled").unwrap();
        assert_eq!(stall["refused"], 6, "{stall}");
        assert_eq!(stall["late"], 1, "{stall}");
        let during = ev.iter().find(|r| r["reason"] == "during").unwrap();
        assert_eq!(stall["late_first_seq"], during["seq"]);
        assert!(
            stall["error"].as_str().unwrap().contains("os error 5"),
            "{stall}"
        );
        assert!(stall["seq"].as_u64() > during["seq"].as_u64());
        // A stall is not a break: the trail verifies, and the report counts it.
        let report = super::super::verify(tmp.path(), None).unwrap();
        assert_eq!((report.stalls, report.refused_in_stalls), (1, 6));
    }

    #[test]
    fn a_hung_disk_refuses_within_the_bound_bounds_the_queue_and_recovers() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink(tmp.path(), |c| {
            c.queue = 1;
            c.write_timeout = Duration::from_secs(30);
        });
        sink.shared.fault.set(HANG);
        std::thread::scope(|s| {
            // The writer takes the first and hangs on it; the second waits in the queue,
            // which is then full: the third is refused at once, well before the bound.
            let first = s.spawn(|| sink.record(&rec("first")));
            wait_until("the writer to take the first record", || {
                sink.shared.lock().next_ticket == 2 && sink.shared.lock().queue.is_empty()
            });
            let second = s.spawn(|| sink.record(&rec("second")));
            wait_until("the second record to queue", || {
                sink.shared.lock().queue.len() == 1
            });
            let e = sink.record(&rec("third")).unwrap_err();
            assert!(e.to_string().contains("queue is full"), "{e}");
            assert!(!sink.is_healthy());
            assert!(sink.record(&rec("fourth")).is_err());
            sink.shared.fault.set(PASS);
            // Both waiting callers are answered once the disk answers.
            first.join().unwrap().unwrap();
            second.join().unwrap().unwrap();
        });
        wait_until("the sink to recover", || sink.is_healthy());
        sink.record(&rec("after")).unwrap();
        sink.close().unwrap();
        let ev = events(tmp.path());
        let reasons: Vec<_> = ev.iter().filter_map(|r| r["reason"].as_str()).collect();
        assert_eq!(reasons, ["first", "second", "after"]);
        let stall = ev.iter().find(|r| r["event"] == "audit_stalled").unwrap();
        assert_eq!(stall["refused"], 2, "{stall}");
        assert_eq!(stall["late"], 2, "{stall}");
    }

    #[test]
    fn a_hung_disk_times_the_caller_out_at_the_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = sink(tmp.path(), |_| {});
        sink.shared.fault.set(HANG);
        let e = sink.record(&rec("waits")).unwrap_err();
        assert!(e.to_string().contains("write_timeout"), "{e}");
        let e = sink.record(&rec("at once")).unwrap_err();
        assert!(e.to_string().contains("stalled"), "{e}");
        sink.shared.fault.set(PASS);
        wait_until("the sink to recover", || sink.is_healthy());
        sink.close().unwrap();
        let ev = events(tmp.path());
        assert!(ev.iter().any(|r| r["reason"] == "waits"));
        assert!(!ev.iter().any(|r| r["reason"] == "at once"));
    }

    /// The trail as a crash would leave it: its files copied while the sink runs.
    fn crash_copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_name() != ".lock" {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    fn cut_to_last_checkpoint(dir: &Path) {
        let seg = dir.join(segment_name(1));
        let text = std::fs::read_to_string(&seg).unwrap();
        let keep = text.rfind("\"event\":\"checkpoint\"").unwrap();
        let end = keep + text[keep..].find('\n').unwrap() + 1;
        std::fs::write(&seg, &text[..end]).unwrap();
    }

    #[test]
    fn an_unclean_stop_is_recorded_and_fsynced_records_cut_off_are_a_break() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let sink = sink(&live, |c| c.fsync = FsyncSchedule::Record);
        for i in 0..3 {
            sink.record(&rec(&format!("r{i}"))).unwrap();
        }
        // Crashed with every record fsynced: reopened, the trail says the stop was unclean
        // and how far it was fsynced, and nothing is broken.
        let crashed = tmp.path().join("crashed");
        crash_copy(&live, &crashed);
        let reopened = self::sink(&crashed, |_| {});
        assert!(reopened.breaks().is_empty(), "{:?}", reopened.breaks());
        drop(reopened);
        let ev = events(&crashed);
        let unclean = ev.iter().find(|r| r["event"] == "unclean_stop").unwrap();
        let last = ev.iter().find(|r| r["reason"] == "r2").unwrap();
        assert_eq!(unclean["last_seq"], last["seq"]);
        assert_eq!(unclean["synced_seq"], last["seq"]);
        assert_eq!(unclean["fsync"], "1s");
        let report = super::super::verify(&crashed, None).unwrap();
        assert_eq!(report.unclean_stops, 1);

        // Fsynced records cut off back to the checkpoint: without `synced` this looks
        // like a clean stop (the control), with it the cut is a break naming the records.
        for keep_synced in [false, true] {
            let cut = tmp.path().join(format!("cut-{keep_synced}"));
            crash_copy(&live, &cut);
            cut_to_last_checkpoint(&cut);
            if !keep_synced {
                std::fs::remove_file(cut.join(SYNCED_FILE)).unwrap();
            }
            let reopened = self::sink(&cut, |_| {});
            let breaks = reopened.breaks().to_vec();
            drop(reopened);
            if keep_synced {
                assert_eq!(breaks.len(), 1, "{breaks:?}");
                assert_eq!(breaks[0].found, TrailBreakKind::Cut);
                let seq = last["seq"].as_u64().unwrap();
                assert!(
                    breaks[0].detail.contains(&format!("..={seq} were removed")),
                    "{}",
                    breaks[0].detail
                );
                assert!(super::super::verify(&cut, None).is_err());
            } else {
                assert!(breaks.is_empty(), "{breaks:?}");
            }
        }
        sink.close().unwrap();
    }

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
