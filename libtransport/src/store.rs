//! Local objects: datasets as directories, manifests, confined reads, verified writes.
//!
//! A dataset is a directory named by a [`DatasetName`] under the store's root; its objects
//! are the regular files beneath it. Every path a peer names is resolved beneath the
//! dataset's directory (see `store/fs.rs`), so `..`, absolute paths and symlinks pointing
//! outside never reach a file. Names starting with `.transportd` belong to the store.
//!
//! Manifests are computed once per file version and cached, in memory and (if a state
//! directory is configured) on disk, keyed by the file's size, mtime and inode. A file whose
//! bytes change without its metadata changing (bit rot, a careless in-place edit) keeps its
//! old manifest, so receivers detect the damage instead of accepting it as good.
//!
//! A store counts the bytes it reads for peers and the bytes it hashes for manifests
//! ([`Store::io_counters`]), so tests and operators can see that a file is hashed once per
//! version and read once per pull.
//!
//! A push is received into a partial file beside its final name, one per (owner,
//! dataset, object); partial files have a quota and an age limit (`store/pending.rs`).
//!
//! All methods here block; the server calls them from `spawn_blocking`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::proto::manifest::chunk_bytes_for;
use crate::proto::name::RESERVED_PREFIX;
use crate::proto::{DatasetName, Digest, Manifest, ManifestBuilder, ObjectEntry, ObjectPath};

mod builds;
mod fs;
pub mod partial;
mod pending;

pub use builds::DEFAULT_MAX_MANIFEST_BUILDS;
pub use partial::{ChunkWriter, PartialFile, WriteError};
pub use pending::{PartialLimits, PartialRemoved, PartialUsage, RemovalReason, disk_bytes};

/// The objects this node serves and receives.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    state_dir: Option<PathBuf>,
    chunk_bytes: u32,
    manifests: Mutex<ManifestCache>,
    writing: Arc<Mutex<HashSet<(DatasetName, ObjectPath)>>>,
    io: Arc<IoCounters>,
    builds: builds::BuildGate,
    pending: Arc<pending::Pending>,
}

impl Store {
    /// Opens a store over the datasets under `root`. `state_dir`, if given, keeps computed
    /// manifests across restarts. `chunk_bytes` is the preferred chunk size for manifests.
    /// Partial files of pushes get [`PartialLimits::for_disk`] until
    /// [`Store::with_partial_limits`] says otherwise.
    pub fn open(
        root: impl Into<PathBuf>,
        state_dir: Option<PathBuf>,
        chunk_bytes: u32,
    ) -> Result<Self, StoreError> {
        let root = root.into();
        let meta = std::fs::metadata(&root).map_err(|e| StoreError::Root {
            path: root.clone(),
            source: e,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Root {
                path: root,
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        if let Some(dir) = &state_dir {
            std::fs::create_dir_all(dir.join("manifests")).map_err(|e| StoreError::Root {
                path: dir.clone(),
                source: e,
            })?;
        }
        let limits = PartialLimits::for_disk(&root).map_err(|e| StoreError::Root {
            path: root.clone(),
            source: e,
        })?;
        Ok(Self {
            pending: Arc::new(pending::Pending::new(
                root.clone(),
                limits,
                Arc::new(crate::clock::SystemClock),
            )),
            root,
            state_dir,
            chunk_bytes: chunk_bytes_for(0, chunk_bytes)
                .unwrap_or(crate::proto::manifest::DEFAULT_CHUNK_BYTES),
            manifests: Mutex::new(HashMap::new()),
            writing: Arc::new(Mutex::new(HashSet::new())),
            io: Arc::new(IoCounters::default()),
            builds: builds::BuildGate::new(DEFAULT_MAX_MANIFEST_BUILDS),
        })
    }

    /// At most `n` manifests computed at once (default [`DEFAULT_MAX_MANIFEST_BUILDS`]):
    /// each reads and hashes a whole object, so this bounds what requests for objects not
    /// yet hashed can make the node read at once. More wait their turn.
    pub fn with_max_manifest_builds(mut self, n: usize) -> Self {
        self.builds = builds::BuildGate::new(n);
        self
    }

    /// Sets the quota and age limit of partial files. Call it before the store is used.
    pub fn with_partial_limits(mut self, limits: PartialLimits) -> Self {
        let clock = self.pending.clock();
        self.pending = Arc::new(pending::Pending::new(self.root.clone(), limits, clock));
        self
    }

    /// Sets the clock partial files' ages are judged by. Call it before the store is used.
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        let limits = self.pending.limits();
        self.pending = Arc::new(pending::Pending::new(self.root.clone(), limits, clock));
        self
    }

    /// The quota and age limit of partial files.
    pub fn partial_limits(&self) -> PartialLimits {
        self.pending.limits()
    }

    /// What partial files claim now, and how many were removed.
    pub fn partial_usage(&self) -> PartialUsage {
        self.pending.usage()
    }

    /// Removes every partial file that no writer has open and that has been untouched for
    /// longer than [`PartialLimits::max_age`], and returns what it removed, for the audit
    /// trail. Blocking. The first call also walks the whole data directory for partial
    /// files left by an earlier run (directories only, not file contents): a node calls it
    /// once before it serves, so their claims count from the start, then periodically.
    pub fn sweep_partials(&self) -> Vec<PartialRemoved> {
        self.pending.sweep()
    }

    /// What this store has read and hashed since it was opened.
    pub fn io_counters(&self) -> StoreCounters {
        let (builds_running, builds_waiting, builds_waited) = self.builds.snapshot();
        StoreCounters {
            builds_running,
            builds_waiting,
            builds_waited,
            ..self.io.snapshot()
        }
    }

    /// The directory holding the datasets.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The preferred chunk size of manifests this store builds.
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Every dataset: the root's subdirectories with valid names, sorted.
    pub fn datasets(&self) -> Result<Vec<DatasetName>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| DatasetName::new(n).ok())
            else {
                continue;
            };
            // Follows a symlink at this level: the operator may link a dataset in.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// One page of a dataset's objects in path order, with a flag saying whether more follow.
    pub fn list(
        &self,
        dataset: &DatasetName,
        prefix: &str,
        start_after: Option<&ObjectPath>,
        limit: usize,
    ) -> Result<(Vec<ObjectEntry>, bool), StoreError> {
        let dir = self.dataset_dir(dataset)?;
        let base = self.root.join(dataset.as_str());
        let mut all = Vec::new();
        walk(&dir, &base, "", &mut all)?;
        all.sort_by(|a, b| a.path.cmp(&b.path));
        let mut page: Vec<ObjectEntry> = all
            .into_iter()
            .filter(|e| e.path.as_str().starts_with(prefix))
            .filter(|e| start_after.is_none_or(|s| e.path > *s))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    /// Opens an object for reading and returns it with its manifest, computing the manifest
    /// if this version of the file has none yet (which reads the whole file).
    pub fn open_read(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> Result<ObjectReader, StoreError> {
        let dir = self.dataset_dir(dataset)?;
        let file = fs::open_file_beneath(&dir, object).map_err(not_found)?;
        let stamp = Stamp::of(&file.metadata()?);
        let manifest = self.manifest_for(dataset, object, &file, stamp)?;
        Ok(ObjectReader {
            file,
            manifest,
            io: self.io.clone(),
        })
    }

    /// Starts (or resumes) receiving an object. `owner` scopes the temporary file, so one
    /// identity never resumes another's upload. Fails with `Conflict` while another transfer
    /// writes the same object, and with `OverQuota` or `QuotaFull`, before touching any
    /// file, if the manifest's size does not fit the partial-file quota. A partial file the
    /// same owner left for this object with another manifest is removed (see
    /// [`ObjectWriter::take_replaced`]); one with the same manifest is resumed.
    pub fn open_write(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        manifest: Arc<Manifest>,
        owner: &str,
    ) -> Result<ObjectWriter, StoreError> {
        let key = (dataset.clone(), object.clone());
        if !self
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone())
        {
            return Err(StoreError::Conflict);
        }
        let guard = WriteGuard {
            set: self.writing.clone(),
            key,
        };
        let dir = self.dataset_dir(dataset)?;
        let parent = fs::create_parent_beneath(&dir, object).map_err(not_found)?;
        let final_name = object.segments().last().unwrap_or_default().to_owned();
        let tmp_name = pending::partial_name(owner, dataset, object);
        let claimed = self.pending.claim(
            dataset,
            object,
            &parent,
            &tmp_name,
            owner,
            manifest.root(),
            manifest.size(),
        )?;
        let opened = (|| {
            if claimed.fresh {
                pending::write_meta(
                    &parent,
                    &tmp_name,
                    owner,
                    dataset,
                    object,
                    manifest.root(),
                    manifest.size(),
                )?;
            }
            PartialFile::open(parent, tmp_name, final_name, manifest)
        })();
        let partial = match opened {
            Ok(p) => Arc::new(p),
            Err(e) => {
                if claimed.fresh {
                    claimed.guard.abandon();
                }
                return Err(e.into());
            }
        };
        Ok(ObjectWriter {
            partial,
            claim: Some(claimed.guard),
            replaced: claimed.replaced,
            _guard: guard,
        })
    }

    /// Records the manifest of an object just committed, so it is not recomputed.
    pub fn remember(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        manifest: Arc<Manifest>,
    ) -> Result<(), StoreError> {
        let dir = self.dataset_dir(dataset)?;
        let file = fs::open_file_beneath(&dir, object).map_err(not_found)?;
        let stamp = Stamp::of(&file.metadata()?);
        self.cache(dataset, object, stamp, manifest);
        Ok(())
    }

    fn dataset_dir(&self, dataset: &DatasetName) -> Result<File, StoreError> {
        fs::open_dir(&self.root.join(dataset.as_str())).map_err(not_found)
    }

    fn manifest_for(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        file: &File,
        stamp: Stamp,
    ) -> Result<Arc<Manifest>, StoreError> {
        let key = (dataset.clone(), object.clone());
        if let Some((s, m)) = self.lock_manifests().get(&key)
            && *s == stamp
        {
            return Ok(m.clone());
        }
        if let Some(m) = self.load_persisted(dataset, object, stamp) {
            let m = Arc::new(m);
            self.lock_manifests().insert(key, (stamp, m.clone()));
            return Ok(m);
        }
        let (_place, waited) = self.builds.enter();
        // Another request may have built it while this one waited.
        if waited
            && let Some((s, m)) = self.lock_manifests().get(&key)
            && *s == stamp
        {
            return Ok(m.clone());
        }
        let m = Arc::new(hash_manifest(
            file,
            stamp.len,
            self.chunk_bytes,
            &self.io.hashed,
        )?);
        debug!(
            dataset = %dataset,
            object.digest = %object.digest().short(),
            bytes = stamp.len,
            chunks = m.chunk_count(),
            "manifest computed"
        );
        self.cache(dataset, object, stamp, m.clone());
        Ok(m)
    }

    fn cache(&self, dataset: &DatasetName, object: &ObjectPath, stamp: Stamp, m: Arc<Manifest>) {
        {
            let mut map = self.lock_manifests();
            if map.len() >= MAX_CACHED_MANIFESTS {
                // Cheap bound: forget everything; manifests on disk survive.
                map.clear();
            }
            map.insert((dataset.clone(), object.clone()), (stamp, m.clone()));
        }
        if let Err(e) = self.persist(dataset, object, stamp, &m) {
            warn!(error = %e, "could not persist a manifest; it will be recomputed after restart");
        }
    }

    fn persisted_path(&self, dataset: &DatasetName, object: &ObjectPath) -> Option<PathBuf> {
        let dir = self.state_dir.as_ref()?;
        Some(
            dir.join("manifests")
                .join(dataset.as_str())
                .join(object.digest().to_hex()),
        )
    }

    fn persist(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        stamp: Stamp,
        m: &Manifest,
    ) -> io::Result<()> {
        let Some(path) = self.persisted_path(dataset, object) else {
            return Ok(());
        };
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        std::fs::create_dir_all(parent)?;
        let mut buf = BytesMut::new();
        buf.extend_from_slice(PERSIST_MAGIC);
        stamp.encode(&mut buf);
        buf.extend_from_slice(&(object.as_str().len() as u32).to_be_bytes());
        buf.extend_from_slice(object.as_str().as_bytes());
        m.encode(&mut buf);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, &path)
    }

    fn load_persisted(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        stamp: Stamp,
    ) -> Option<Manifest> {
        let bytes = std::fs::read(self.persisted_path(dataset, object)?).ok()?;
        let mut r = bytes.strip_prefix(PERSIST_MAGIC.as_slice())?;
        if Stamp::decode(&mut r)? != stamp {
            return None;
        }
        let n = u32::from_be_bytes(r.get(..4)?.try_into().ok()?) as usize;
        // The digest names the file; the stored path guards against a digest collision.
        if r.get(4..4 + n)? != object.as_str().as_bytes() {
            return None;
        }
        r = &r[4 + n..];
        let m = Manifest::decode(&mut r).ok()?;
        (r.is_empty() && m.size() == stamp.len).then_some(m)
    }

    fn lock_manifests(&self) -> std::sync::MutexGuard<'_, ManifestCache> {
        self.manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Manifests by object, with the file version each describes.
type ManifestCache = HashMap<(DatasetName, ObjectPath), (Stamp, Arc<Manifest>)>;

/// Bytes a [`Store`] has read and hashed since it was opened: a snapshot of counters that
/// only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCounters {
    /// Object bytes read through [`ObjectReader`] (every read path: streamed pieces and
    /// RDMA staging), counted when a read succeeds.
    pub bytes_read: u64,
    /// Object bytes read and hashed to compute manifests (zero for a file version whose
    /// manifest is cached in memory or persisted in the state directory).
    pub bytes_hashed: u64,
    /// Manifests being computed now (at most the store's cap).
    pub builds_running: usize,
    /// Requests waiting for a place to compute a manifest now.
    pub builds_waiting: usize,
    /// Manifest builds that had to wait for a place, since the store was opened.
    pub builds_waited: u64,
}

/// The live counters behind [`StoreCounters`], shared by a store and its readers.
#[derive(Debug, Default)]
struct IoCounters {
    read: AtomicU64,
    hashed: AtomicU64,
}

impl IoCounters {
    fn snapshot(&self) -> StoreCounters {
        StoreCounters {
            bytes_read: self.read.load(Ordering::Relaxed),
            bytes_hashed: self.hashed.load(Ordering::Relaxed),
            builds_running: 0,
            builds_waiting: 0,
            builds_waited: 0,
        }
    }
}

/// An object open for reading, pinned to the file version its manifest describes: a file
/// replaced by rename while a transfer runs keeps serving the old version.
#[derive(Debug)]
pub struct ObjectReader {
    file: File,
    manifest: Arc<Manifest>,
    io: Arc<IoCounters>,
}

impl ObjectReader {
    /// The object's manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Reads `len` bytes at `offset` into a new buffer. Blocking. A file that has become
    /// shorter than its manifest says fails with `Corrupt`.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let mut buf = BytesMut::zeroed(len);
        self.read_into(offset, &mut buf)?;
        Ok(buf.freeze())
    }

    /// Fills `buf` from `offset` (the RDMA sender reads straight into its staging slot).
    /// Blocking; a short file fails with `Corrupt`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt
            } else {
                StoreError::Io(e)
            }
        })?;
        self.io.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// An object being received; holds the object's write lock, and its partial file's claim on
/// the quota, until dropped.
#[derive(Debug)]
pub struct ObjectWriter {
    partial: Arc<PartialFile>,
    claim: Option<pending::ClaimGuard>,
    replaced: Option<PartialRemoved>,
    _guard: WriteGuard,
}

impl ObjectWriter {
    /// The temporary file, shared with chunk writers.
    pub fn partial(&self) -> &Arc<PartialFile> {
        &self.partial
    }

    /// The partial file of another manifest this push replaced, once (for the audit
    /// trail).
    pub fn take_replaced(&mut self) -> Option<PartialRemoved> {
        self.replaced.take()
    }

    /// Makes the object durable under its name. Blocking. Fails with `Incomplete` if a
    /// chunk is missing or a chunk writer is still running.
    pub fn commit(mut self) -> Result<Arc<Manifest>, WriteError> {
        let m = self.partial.manifest().clone();
        let partial = Arc::into_inner(self.partial).ok_or(WriteError::Incomplete)?;
        partial.commit()?;
        if let Some(c) = self.claim.take() {
            c.committed();
        }
        Ok(m)
    }
}

#[derive(Debug)]
struct WriteGuard {
    set: Arc<Mutex<HashSet<(DatasetName, ObjectPath)>>>,
    key: (DatasetName, ObjectPath),
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store's root or state directory is unusable.
    #[error("store directory {path}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// No such dataset or object (or the path leaves its dataset).
    #[error("not found")]
    NotFound,
    /// Another transfer is writing this object.
    #[error("object is being written by another transfer")]
    Conflict,
    /// The stored file does not match its manifest.
    #[error("stored object does not match its manifest")]
    Corrupt,
    /// The object cannot be described by one manifest.
    #[error(transparent)]
    Manifest(#[from] crate::proto::ManifestError),
    /// A push larger than the partial-file quota (the node's, or one identity's): it
    /// can never be received here.
    #[error(
        "a push of {size} bytes is larger than the receiver's quota for partial files ({quota} bytes): split the object, or ask the operator to raise [limits] partial_quota"
    )]
    OverQuota {
        /// The object's size.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// Partial files of other pushes already claim so much of the quota that this push
    /// does not fit now.
    #[error(
        "the receiver's quota for partial files has {free} bytes free, not the {size} this push needs: retry once other pushes finish or expire"
    )]
    QuotaFull {
        /// The object's size.
        size: u64,
        /// What the quota has left.
        free: u64,
    },
    /// The file system failed.
    #[error("storage: {0}")]
    Io(#[from] io::Error),
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.mtime_ns.to_be_bytes());
        out.extend_from_slice(&self.ino.to_be_bytes());
        out.extend_from_slice(&self.dev.to_be_bytes());
    }

    fn decode(r: &mut &[u8]) -> Option<Self> {
        let take = |r: &mut &[u8], n: usize| -> Option<Vec<u8>> {
            let head = r.get(..n)?.to_vec();
            *r = &r[n..];
            Some(head)
        };
        Some(Self {
            len: u64::from_be_bytes(take(r, 8)?.try_into().ok()?),
            mtime_ns: i128::from_be_bytes(take(r, 16)?.try_into().ok()?),
            ino: u64::from_be_bytes(take(r, 8)?.try_into().ok()?),
            dev: u64::from_be_bytes(take(r, 8)?.try_into().ok()?),
        })
    }
}

/// Computes the manifest of the first `len` bytes of `file`.
pub fn compute_manifest(
    file: &File,
    len: u64,
    preferred_chunk_bytes: u32,
) -> Result<Manifest, StoreError> {
    hash_manifest(file, len, preferred_chunk_bytes, &AtomicU64::new(0))
}

/// [`compute_manifest`], adding every byte hashed to `hashed`.
fn hash_manifest(
    mut file: &File,
    len: u64,
    preferred_chunk_bytes: u32,
    hashed: &AtomicU64,
) -> Result<Manifest, StoreError> {
    let chunk_bytes = chunk_bytes_for(len, preferred_chunk_bytes)?;
    let mut b = ManifestBuilder::new(len, chunk_bytes)?;
    let mut buf = vec![0u8; READ_BUF_BYTES];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(StoreError::Corrupt);
        }
        b.update(&buf[..n])?;
        hashed.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    Ok(b.finish()?)
}

fn walk(dir: &File, base: &Path, rel: &str, out: &mut Vec<ObjectEntry>) -> Result<(), StoreError> {
    let path = if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    };
    for entry in std::fs::read_dir(&path)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let Ok(obj) = ObjectPath::new(&child) else {
            continue;
        };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk(dir, base, &child, out)?;
        } else if ft.is_file() {
            out.push(ObjectEntry {
                path: obj,
                size: entry.metadata()?.len(),
            });
        } else if ft.is_symlink() {
            // Listed only if it resolves to a regular file inside the dataset; symlinked
            // directories are not descended, so a loop cannot trap the walk.
            if let Ok(f) = fs::open_file_beneath(dir, &obj) {
                out.push(ObjectEntry {
                    path: obj,
                    size: f.metadata()?.len(),
                });
            }
        }
        if out.len() > MAX_WALK_ENTRIES {
            return Err(StoreError::Io(io::Error::other(
                "dataset holds too many objects to list",
            )));
        }
    }
    Ok(())
}

fn not_found(e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => StoreError::NotFound,
        _ => StoreError::Io(e),
    }
}

/// Digest of a file's bytes, for tests and reports that compare whole files.
pub fn digest_file(path: &Path) -> io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; READ_BUF_BYTES];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest(h.finalize().into()))
}

/// Marks a persisted manifest file, version 1.
const PERSIST_MAGIC: &[u8; 8] = b"TPDMAN01";

/// Read size when hashing files: large reads keep the syscall count low.
const READ_BUF_BYTES: usize = 4 << 20;

/// Manifests kept in memory; each is at most 512 KiB, usually a few hundred bytes.
const MAX_CACHED_MANIFESTS: usize = 65_536;

/// Listing walks the whole dataset; this bounds the work one request can cause.
const MAX_WALK_ENTRIES: usize = 1_000_000;

#[cfg(test)]
mod tests;
