//! Partial files of the pushes a node receives: a quota on the bytes they may claim, an age
//! after which an untouched one is removed, and one partial file per (owner, dataset,
//! object), so a resume with a different manifest replaces the old file instead of
//! orphaning it.
//!
//! A push's partial file is `.transportd-partial-<hash of owner, dataset, object>` beside
//! the final name, with a small sidecar `<that name>.meta` saying whose it is (owner,
//! dataset, object, manifest root, size). The store keeps a registry of them in memory: it
//! is filled by a walk of the data directory at the first sweep (at node start) and kept
//! current by every push after that, so later sweeps never walk the disk.
//!
//! A partial file *claims* its manifest's size: what pre-sizing would take if every chunk
//! arrived. The claims of all partial files together stay within
//! [`PartialLimits::quota_bytes`], and those of one identity within
//! [`PartialLimits::quota_bytes_per_identity`]; a push whose manifest would go past either
//! is refused before anything is written. A file found on disk without a readable sidecar
//! (an older version's, or a crash between the two) claims its length and is removed once
//! it is older than the age limit.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustix::fs::OFlags;
use tracing::{debug, warn};

use super::StoreError;
use crate::clock::Clock;
use crate::proto::{DatasetName, Digest, ObjectPath};

/// How much partial files may claim, and how long an untouched one is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialLimits {
    /// Bytes the partial files of all pushes may claim together, counted by their
    /// manifests' sizes.
    pub quota_bytes: u64,
    /// Bytes the partial files of one identity's pushes may claim together.
    pub quota_bytes_per_identity: u64,
    /// An untouched partial file (no writer open) older than this is removed.
    pub max_age: Duration,
}

impl PartialLimits {
    /// The default age limit: a day.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

    /// The defaults for a store on `root`: a quarter of the size of the file system holding
    /// it for all pushes, an eighth for one identity's, and a day.
    pub fn for_disk(root: &Path) -> io::Result<Self> {
        let disk = disk_bytes(root)?;
        Ok(Self {
            quota_bytes: disk / 4,
            quota_bytes_per_identity: disk / 8,
            max_age: Self::DEFAULT_MAX_AGE,
        })
    }
}

/// The size of the file system holding `path`, in bytes.
pub fn disk_bytes(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_blocks.saturating_mul(s.f_frsize))
}

/// Why a partial file was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemovalReason {
    /// Untouched for longer than [`PartialLimits::max_age`].
    Expired,
    /// Its owner resumed the object's push with a different manifest.
    Replaced,
}

impl RemovalReason {
    /// The name records and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Replaced => "replaced",
        }
    }
}

/// A partial file the store removed, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartialRemoved {
    /// The dataset it was in.
    pub dataset: DatasetName,
    /// The digest of the object's name ([`ObjectPath::digest`]); `None` for a file whose
    /// sidecar was missing or unreadable.
    pub object: Option<Digest>,
    /// The identity whose push it was, as given to [`super::Store::open_write`]; `None`
    /// when unknown.
    pub owner: Option<String>,
    /// What it claimed: its manifest's size (its length, when unknown).
    pub bytes: u64,
    /// How long it had been untouched.
    pub age: Duration,
    /// Why.
    pub reason: RemovalReason,
}

/// What partial files claim now, and how many were removed since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartialUsage {
    /// Partial files known to the store.
    pub files: u64,
    /// Bytes they claim together.
    pub claimed_bytes: u64,
    /// The quota for all of them.
    pub quota_bytes: u64,
    /// Removed for their age.
    pub expired: u64,
    /// Removed because their push resumed with a different manifest.
    pub replaced: u64,
}

/// Where a partial file is: its dataset, its directory beneath the dataset ("" for the
/// dataset's own directory), its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    dataset: DatasetName,
    dir: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Entry {
    owner: Option<String>,
    object: Option<Digest>,
    root: Option<Digest>,
    size: u64,
    /// When it was last opened or let go of (its mtime, for a file found on disk).
    touched: SystemTime,
    in_use: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, Entry>,
    scanned: bool,
}

/// The registry of partial files behind a [`super::Store`].
#[derive(Debug)]
pub(super) struct Pending {
    root: PathBuf,
    limits: PartialLimits,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    expired: AtomicU64,
    replaced: AtomicU64,
}

/// What [`Pending::claim`] found and did.
pub(super) struct Claimed {
    pub(super) guard: ClaimGuard,
    /// The earlier partial file of another manifest, removed.
    pub(super) replaced: Option<PartialRemoved>,
    /// Whether the file is new (its sidecar must be written).
    pub(super) fresh: bool,
}

impl Pending {
    pub(super) fn new(root: PathBuf, limits: PartialLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            root,
            limits,
            clock,
            state: Mutex::new(State::default()),
            expired: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
        }
    }

    pub(super) fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    pub(super) fn limits(&self) -> PartialLimits {
        self.limits
    }

    pub(super) fn usage(&self) -> PartialUsage {
        let state = self.lock();
        PartialUsage {
            files: state.entries.len() as u64,
            claimed_bytes: state.entries.values().map(|e| e.size).sum(),
            quota_bytes: self.limits.quota_bytes,
            expired: self.expired.load(Ordering::Relaxed),
            replaced: self.replaced.load(Ordering::Relaxed),
        }
    }

    /// Claims `size` bytes for `owner`'s partial file `name` in `dir` (the object's
    /// directory, open) and marks it in use. The same manifest as the file there resumes
    /// it; another manifest removes it first. Refused, touching nothing, past a quota.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn claim(
        self: &Arc<Self>,
        dataset: &DatasetName,
        object: &ObjectPath,
        dir: &File,
        name: &str,
        owner: &str,
        root: Digest,
        size: u64,
    ) -> Result<Claimed, StoreError> {
        let key = Key {
            dataset: dataset.clone(),
            dir: parent_of(object),
            name: name.to_owned(),
        };
        let limits = self.limits;
        if size > limits.quota_bytes || size > limits.quota_bytes_per_identity {
            return Err(StoreError::OverQuota {
                size,
                quota: limits.quota_bytes.min(limits.quota_bytes_per_identity),
            });
        }
        // Made first, so that nothing can fail between marking the file in use and handing
        // out the guard that lets go of it.
        let mut guard = ClaimGuard {
            pending: self.clone(),
            dir: dir.try_clone()?,
            key: key.clone(),
            end: End::Unclaimed,
        };
        let now = self.clock.now();
        let mut state = self.lock();
        if let Some(e) = state.entries.get_mut(&key)
            && e.root == Some(root)
        {
            // A resume: its claim is already counted.
            e.in_use = true;
            e.touched = now;
            guard.end = End::Release;
            return Ok(Claimed {
                guard,
                replaced: None,
                fresh: false,
            });
        }
        let (mut all, mut mine) = (0u64, 0u64);
        for (_, e) in state.entries.iter().filter(|(k, _)| **k != key) {
            all = all.saturating_add(e.size);
            if e.owner.as_deref() == Some(owner) {
                mine = mine.saturating_add(e.size);
            }
        }
        if all.saturating_add(size) > limits.quota_bytes {
            return Err(StoreError::QuotaFull {
                size,
                free: limits.quota_bytes.saturating_sub(all),
            });
        }
        if mine.saturating_add(size) > limits.quota_bytes_per_identity {
            return Err(StoreError::QuotaFull {
                size,
                free: limits.quota_bytes_per_identity.saturating_sub(mine),
            });
        }
        // The file this name had: from the registry or, if the registry does not know it
        // (no sweep has looked yet), from its sidecar on disk.
        let old = match state.entries.get(&key) {
            Some(e) => Some(e.clone()),
            None => on_disk(dir, &key, dataset, object)?,
        };
        let mut replaced = None;
        let mut fresh = true;
        match old {
            Some(e) if e.root == Some(root) => fresh = false,
            Some(e) => {
                // The same owner's push of this object, to another manifest: it cannot be
                // resumed any more, so it goes.
                remove_files(dir, name)?;
                self.replaced.fetch_add(1, Ordering::Relaxed);
                replaced = Some(removal(&key, &e, now, RemovalReason::Replaced));
            }
            None => remove_files(dir, name)?,
        }
        // Only now (the old files are gone) does the new claim take the old one's place.
        state.entries.insert(
            key,
            Entry {
                owner: Some(owner.to_owned()),
                object: Some(object.digest()),
                root: Some(root),
                size,
                touched: now,
                in_use: true,
            },
        );
        guard.end = End::Release;
        Ok(Claimed {
            guard,
            replaced,
            fresh,
        })
    }

    /// Removes every partial file not in use and untouched for longer than the age limit.
    /// The first call walks the data directory for partial files left by an earlier run.
    pub(super) fn sweep(&self) -> Vec<PartialRemoved> {
        let now = self.clock.now();
        let mut state = self.lock();
        if !state.scanned {
            state.scanned = true;
            if let Err(e) = self.scan(&mut state) {
                warn!(error = %e, "could not look for partial files left by an earlier run");
            }
        }
        let due: Vec<Key> = state
            .entries
            .iter()
            .filter(|(_, e)| !e.in_use && age(now, e.touched) >= self.limits.max_age)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in due {
            match self
                .open_key_dir(&key)
                .and_then(|d| remove_files(&d, &key.name))
            {
                Ok(()) => {
                    if let Some(e) = state.entries.remove(&key) {
                        self.expired.fetch_add(1, Ordering::Relaxed);
                        out.push(removal(&key, &e, now, RemovalReason::Expired));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Gone already (its directory too): nothing claimed any more.
                    state.entries.remove(&key);
                }
                Err(e) => {
                    warn!(dataset = %key.dataset, error = %e, "could not remove an expired partial file")
                }
            }
        }
        out
    }

    fn open_key_dir(&self, key: &Key) -> io::Result<File> {
        let ds = super::fs::open_dir(&self.root.join(key.dataset.as_str()))?;
        if key.dir.is_empty() {
            Ok(ds)
        } else {
            super::fs::open_beneath(&ds, &key.dir, OFlags::RDONLY | OFlags::DIRECTORY)
        }
    }

    /// Finds the partial files on disk (they are not followed through symlinked
    /// directories) and registers those the registry does not know.
    fn scan(&self, state: &mut State) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(dataset) = entry
                .file_name()
                .to_str()
                .and_then(|n| DatasetName::new(n).ok())
            else {
                continue;
            };
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                self.scan_dir(state, &dataset, &entry.path(), "")?;
            }
        }
        debug!(files = state.entries.len(), "partial files found");
        Ok(())
    }

    fn scan_dir(
        &self,
        state: &mut State,
        dataset: &DatasetName,
        path: &Path,
        rel: &str,
    ) -> io::Result<()> {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let ft = entry.file_type()?;
            if ft.is_dir() {
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                self.scan_dir(state, dataset, &entry.path(), &child)?;
                continue;
            }
            if !ft.is_file() || !name.starts_with(PARTIAL_PREFIX) {
                continue;
            }
            if let Some(data) = name.strip_suffix(META_SUFFIX) {
                // A sidecar whose file is gone: it claims nothing, so it just goes.
                if !path.join(data).exists() {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            let key = Key {
                dataset: dataset.clone(),
                dir: rel.to_owned(),
                name: name.clone(),
            };
            if state.entries.contains_key(&key) {
                continue;
            }
            let m = entry.metadata()?;
            let touched = mtime(&m);
            let meta = std::fs::read(path.join(format!("{name}{META_SUFFIX}")))
                .ok()
                .and_then(|b| Meta::decode(&b))
                .filter(|meta| meta.names(dataset, rel, &name));
            let e = match meta {
                Some(meta) => Entry {
                    object: Some(meta.object.digest()),
                    owner: Some(meta.owner),
                    root: Some(meta.root),
                    size: meta.size,
                    touched,
                    in_use: false,
                },
                None => Entry {
                    owner: None,
                    object: None,
                    root: None,
                    size: m.len(),
                    touched,
                    in_use: false,
                },
            };
            state.entries.insert(key, e);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change leaves the map consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a claim ends when its writer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The claim was refused: nothing to undo.
    Unclaimed,
    /// The push may resume: the file stays, and its age counts from now.
    Release,
    /// The object was committed: the file became the object; its sidecar goes.
    Commit,
    /// Opening failed on a new file: it and its claim go.
    Abandon,
}

/// Holds a partial file's claim in use until the writer is dropped.
#[derive(Debug)]
pub(super) struct ClaimGuard {
    pending: Arc<Pending>,
    dir: File,
    key: Key,
    end: End,
}

impl ClaimGuard {
    pub(super) fn committed(mut self) {
        self.end = End::Commit;
    }

    pub(super) fn abandon(mut self) {
        self.end = End::Abandon;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.end == End::Unclaimed {
            return;
        }
        let mut state = self.pending.lock();
        match self.end {
            End::Unclaimed => {}
            End::Release => {
                if let Some(e) = state.entries.get_mut(&self.key) {
                    e.in_use = false;
                    e.touched = self.pending.clock.now();
                }
            }
            End::Commit | End::Abandon => {
                state.entries.remove(&self.key);
                let name = &self.key.name;
                let r = if self.end == End::Commit {
                    super::fs::remove_in(&self.dir, &format!("{name}{META_SUFFIX}"))
                } else {
                    remove_files(&self.dir, name)
                };
                if let Err(e) = r {
                    debug!(error = %e, "could not remove a partial file's sidecar");
                }
            }
        }
    }
}

/// Writes the sidecar naming a new partial file's owner and object.
pub(super) fn write_meta(
    dir: &File,
    name: &str,
    owner: &str,
    dataset: &DatasetName,
    object: &ObjectPath,
    root: Digest,
    size: u64,
) -> io::Result<()> {
    let meta = serde_json::json!({
        "v": 1,
        "owner": owner,
        "dataset": dataset.as_str(),
        "object": object.as_str(),
        "root": root.to_hex(),
        "size": size,
    });
    let mut f = super::fs::create_in(dir, &format!("{name}{META_SUFFIX}"))?;
    f.set_len(0)?;
    io::Write::write_all(&mut f, meta.to_string().as_bytes())
}

/// The partial file name of `owner`'s push of `object` in `dataset`.
pub(super) fn partial_name(owner: &str, dataset: &DatasetName, object: &ObjectPath) -> String {
    let mut h = blake3::Hasher::new_derive_key(PARTIAL_CONTEXT);
    for part in [owner, dataset.as_str(), object.as_str()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    format!("{PARTIAL_PREFIX}{}", &h.finalize().to_hex()[..32])
}

/// A sidecar's contents.
struct Meta {
    owner: String,
    dataset: DatasetName,
    object: ObjectPath,
    root: Digest,
    size: u64,
}

impl Meta {
    fn decode(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        if v["v"] != 1 {
            return None;
        }
        Some(Self {
            owner: v["owner"].as_str()?.to_owned(),
            dataset: DatasetName::new(v["dataset"].as_str()?).ok()?,
            object: ObjectPath::new(v["object"].as_str()?).ok()?,
            root: Digest::from_hex(v["root"].as_str()?)?,
            size: v["size"].as_u64()?,
        })
    }

    /// True if this sidecar describes the file `name` in `rel` of `dataset` (a copied or
    /// edited sidecar does not attribute another file).
    fn names(&self, dataset: &DatasetName, rel: &str, name: &str) -> bool {
        self.dataset == *dataset
            && parent_of(&self.object) == rel
            && partial_name(&self.owner, &self.dataset, &self.object) == name
    }
}

/// The partial file `key` names in `dir` as its sidecar describes it, if both are there.
fn on_disk(
    dir: &File,
    key: &Key,
    dataset: &DatasetName,
    object: &ObjectPath,
) -> Result<Option<Entry>, StoreError> {
    let Ok(file) = super::fs::open_beneath(dir, &key.name, OFlags::RDONLY | OFlags::NOFOLLOW)
    else {
        return Ok(None);
    };
    let m = file.metadata()?;
    let meta = super::fs::open_beneath(
        dir,
        &format!("{}{META_SUFFIX}", key.name),
        OFlags::RDONLY | OFlags::NOFOLLOW,
    )
    .ok()
    .and_then(|mut f| {
        let mut b = Vec::new();
        io::Read::read_to_end(&mut f, &mut b).ok()?;
        Meta::decode(&b)
    })
    .filter(|meta| meta.names(dataset, &key.dir, &key.name) && meta.object == *object);
    Ok(meta.map(|meta| Entry {
        owner: Some(meta.owner),
        object: Some(object.digest()),
        root: Some(meta.root),
        size: meta.size,
        touched: mtime(&m),
        in_use: false,
    }))
}

fn mtime(m: &std::fs::Metadata) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(m.mtime()).unwrap_or(0),
            u32::try_from(m.mtime_nsec()).unwrap_or(0),
        )
}

fn parent_of(object: &ObjectPath) -> String {
    object
        .as_str()
        .rsplit_once('/')
        .map(|(dir, _)| dir.to_owned())
        .unwrap_or_default()
}

fn remove_files(dir: &File, name: &str) -> io::Result<()> {
    super::fs::remove_in(dir, name)?;
    super::fs::remove_in(dir, &format!("{name}{META_SUFFIX}"))
}

fn removal(key: &Key, e: &Entry, now: SystemTime, reason: RemovalReason) -> PartialRemoved {
    PartialRemoved {
        dataset: key.dataset.clone(),
        object: e.object,
        owner: e.owner.clone(),
        bytes: e.size,
        age: age(now, e.touched),
        reason,
    }
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

/// Partial files of pushes start with this: the store's reserved prefix, then
/// `-partial-` (checked by a test).
const PARTIAL_PREFIX: &str = ".transportd-partial-";

/// A partial file's sidecar is its name followed by this.
const META_SUFFIX: &str = ".meta";

/// Key-derivation context for partial file names (v2: the manifest root is no longer part
/// of the name, so one push has one partial file whatever its manifest).
const PARTIAL_CONTEXT: &str = "transportd 2026-12 partial file name v2";

#[cfg(test)]
#[test]
fn the_partial_prefix_is_reserved() {
    use crate::proto::name::RESERVED_PREFIX;
    assert_eq!(PARTIAL_PREFIX, format!("{RESERVED_PREFIX}-partial-"));
}
