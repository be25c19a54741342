//! A node-local cache of verified objects, sealed at rest: what a sidecar keeps so that an
//! object several local readers want is fetched once, without a byte of it landing on the
//! node's disk in plaintext.
//!
//! * **Keyed by manifest root.** An object enters only whole and only after every chunk
//!   verified against its manifest; the root names the content, so a changed object is
//!   another entry, never a stale hit.
//! * **Sealed.** Each chunk is sealed with AES-256-GCM under a key drawn when the cache is
//!   opened and held only in this process's memory; the additional data binds the sealed
//!   chunk to its entry, its object root and its place, so chunks cannot be swapped or
//!   replayed between entries. A restart loses the key, so [`SealedCache::open`] empties the
//!   directory: entries of an earlier run could not be opened anyway.
//! * **Bounded.** The sealed bytes on disk stay within a byte budget, least recently used
//!   entries going first; an entry someone is reading ([`CacheEntry`] held) is never
//!   evicted.
//! * **Handed over without copies through sockets**: [`CacheEntry::to_memfd`] opens the
//!   entry into an anonymous, sealed, read-only memory file a caller can map.
//!
//! No I/O happens under the lock but bookkeeping; reads and writes of entry files are the
//! caller's blocking work (call from a blocking thread in async code).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::proto::Digest;
use crate::proto::manifest::{ChunkIndex, Manifest};

/// The AES-GCM tag's length.
const TAG_LEN: usize = 16;
/// What names the cache's own files (and only those are removed on open).
const SUFFIX: &str = "sealed";
/// Most threads that open one entry's chunks at once.
pub const OPEN_THREADS: usize = 4;

/// Why the cache could not take or give an object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The bytes offered do not match their manifest: nothing was stored.
    #[error("object does not match its manifest at chunk {chunk}")]
    Corrupt {
        /// The first chunk that did not match.
        chunk: u32,
    },
    /// A sealed chunk did not open: the entry's file was changed on disk. The entry is
    /// dropped.
    #[error("cache entry {root} was changed on disk (chunk {chunk} does not open)")]
    Tampered {
        /// The entry's object root.
        root: String,
        /// The chunk that did not open.
        chunk: u32,
    },
    /// The destination is not the object's size.
    #[error("buffer of {got} bytes for an object of {want}")]
    Size {
        /// The buffer's size.
        got: usize,
        /// The object's.
        want: u64,
    },
    /// The cache's directory failed.
    #[error("cache: {0}")]
    Io(#[from] io::Error),
}

/// Counters of what the cache did since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found their object.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    /// Entries held now.
    pub entries: u64,
    /// Sealed bytes on disk now.
    pub bytes: u64,
}

/// The cache; cheap to share (`Arc` inside).
#[derive(Debug, Clone)]
pub struct SealedCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    budget: u64,
    key: LessSafeKey,
    /// Nonces are this counter, never repeated under the key.
    nonces: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Meta>,
    used: u64,
    clock: u64,
    next_id: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

#[derive(Debug)]
struct Meta {
    id: u64,
    manifest: Arc<Manifest>,
    sealed_bytes: u64,
    last_used: u64,
    readers: usize,
}

impl SealedCache {
    /// Opens the cache in `dir` (created, mode 0700) with at most `budget` sealed bytes on
    /// disk. Entries left by an earlier run are removed: their key is gone.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == SUFFIX) {
                std::fs::remove_file(&path)?;
            }
        }
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut secret[..]).map_err(|_| io::Error::other("no randomness"))?;
        let key = UnboundKey::new(&AES_256_GCM, &secret[..])
            .map_err(|_| io::Error::other("AES-256-GCM key"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                budget,
                key: LessSafeKey::new(key),
                nonces: AtomicU64::new(0),
                state: Mutex::default(),
            }),
        })
    }

    /// Seals `data`, an object whose manifest is `manifest`, into the cache after checking
    /// every chunk against it. Returns false, storing nothing, when it cannot fit: larger
    /// than the budget, or room held by entries being read. An object already held is only
    /// marked used.
    pub fn insert(&self, manifest: &Manifest, data: &[u8]) -> Result<bool, CacheError> {
        if data.len() as u64 != manifest.size() {
            return Err(CacheError::Size {
                got: data.len(),
                want: manifest.size(),
            });
        }
        let root = manifest.root();
        let sealed_bytes = sealed_len(manifest);
        let id = {
            let mut s = self.inner.lock();
            s.clock += 1;
            let now = s.clock;
            if let Some(m) = s.entries.get_mut(&root) {
                m.last_used = now;
                return Ok(true);
            }
            s.next_id += 1;
            s.next_id
        };
        for i in 0..manifest.chunk_count() {
            let r = chunk_range(manifest, i);
            manifest
                .verify_chunk(ChunkIndex(i), &data[r])
                .map_err(|_| CacheError::Corrupt { chunk: i })?;
        }
        if !self.make_room(sealed_bytes) {
            return Ok(false);
        }
        let path = self.inner.path_of(id);
        let written = self.write_sealed(&path, id, manifest, data);
        let mut s = self.inner.lock();
        if let Err(e) = written {
            s.used -= sealed_bytes;
            drop(s);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        s.clock += 1;
        let last_used = s.clock;
        s.entries.insert(
            root,
            Meta {
                id,
                manifest: Arc::new(manifest.clone()),
                sealed_bytes,
                last_used,
                readers: 0,
            },
        );
        Ok(true)
    }

    /// The entry of the object whose manifest root is `root`, if held; it cannot be
    /// evicted while the returned value lives.
    pub fn get(&self, root: &Digest) -> Option<CacheEntry> {
        let mut s = self.inner.lock();
        s.clock += 1;
        let now = s.clock;
        let Some(m) = s.entries.get_mut(root) else {
            s.misses += 1;
            return None;
        };
        m.last_used = now;
        m.readers += 1;
        let (id, manifest) = (m.id, m.manifest.clone());
        s.hits += 1;
        Some(CacheEntry {
            cache: self.inner.clone(),
            root: *root,
            id,
            manifest,
        })
    }

    /// What the cache did and holds.
    pub fn stats(&self) -> CacheStats {
        let s = self.inner.lock();
        CacheStats {
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            entries: s.entries.len() as u64,
            bytes: s.used,
        }
    }

    /// Reserves `bytes` of the budget, evicting least recently used entries nobody reads
    /// (their files are removed once the lock is let go).
    fn make_room(&self, bytes: u64) -> bool {
        if bytes > self.inner.budget {
            return false;
        }
        let mut evicted = Vec::new();
        let fits = {
            let mut s = self.inner.lock();
            loop {
                if s.used + bytes <= self.inner.budget {
                    s.used += bytes;
                    break true;
                }
                let victim = s
                    .entries
                    .iter()
                    .filter(|(_, m)| m.readers == 0)
                    .min_by_key(|(_, m)| m.last_used)
                    .map(|(root, _)| *root);
                let Some(m) = victim.and_then(|root| s.entries.remove(&root)) else {
                    break false;
                };
                s.used -= m.sealed_bytes;
                s.evictions += 1;
                evicted.push(self.inner.path_of(m.id));
            }
        };
        for path in evicted {
            let _ = std::fs::remove_file(path);
        }
        fits
    }

    fn write_sealed(
        &self,
        path: &Path,
        id: u64,
        manifest: &Manifest,
        data: &[u8],
    ) -> Result<(), CacheError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let root = manifest.root();
        let mut buf = Vec::with_capacity(manifest.chunk_bytes() as usize + NONCE_LEN + TAG_LEN);
        for i in 0..manifest.chunk_count() {
            let n = self.inner.nonces.fetch_add(1, Ordering::Relaxed);
            let mut nonce = [0u8; NONCE_LEN];
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            buf.clear();
            buf.extend_from_slice(&nonce);
            buf.extend_from_slice(&data[chunk_range(manifest, i)]);
            let aad = aad(&root, id, i);
            let tag = self
                .inner
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..]),
                    &mut buf[NONCE_LEN..],
                )
                .map_err(|_| io::Error::other("sealing a cache chunk"))?;
            buf.extend_from_slice(tag.as_ref());
            f.write_all(&buf)?;
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.{SUFFIX}"))
    }
}

/// An entry being read: it stays in the cache while this lives.
#[derive(Debug)]
pub struct CacheEntry {
    cache: Arc<Inner>,
    root: Digest,
    id: u64,
    manifest: Arc<Manifest>,
}

impl CacheEntry {
    /// The object's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Opens the whole object into `out`, which must be its size. A chunk that does not
    /// open (the file was changed on disk) fails with [`CacheError::Tampered`] and drops
    /// the entry.
    pub fn read_into(&self, out: &mut [u8]) -> Result<(), CacheError> {
        if out.len() as u64 != self.manifest.size() {
            return Err(CacheError::Size {
                got: out.len(),
                want: self.manifest.size(),
            });
        }
        self.open_chunks(0..self.manifest.chunk_count(), |at, plain| {
            out[at as usize..at as usize + plain.len()].copy_from_slice(plain);
            Ok(())
        })
    }

    /// Opens the whole object into an anonymous memory file sealed against any change
    /// (`F_SEAL_WRITE`, `F_SEAL_GROW`, `F_SEAL_SHRINK`, `F_SEAL_SEAL`): a descriptor to pass
    /// to a local reader, which maps it read-only.
    ///
    /// The chunks are opened on up to [`OPEN_THREADS`] threads at once (as many as the
    /// machine has cores), each taking a contiguous run of them, a chunk at a time straight
    /// into the file, so memory holds one chunk per thread.
    pub fn to_memfd(&self) -> Result<OwnedFd, CacheError> {
        let file = new_memfd(self.manifest.size())?;
        let chunks = self.manifest.chunk_count();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(OPEN_THREADS)
            .min(chunks as usize)
            .max(1) as u32;
        let put =
            |at: u64, plain: &[u8]| std::os::unix::fs::FileExt::write_all_at(&file, plain, at);
        let runs: Vec<_> = (0..threads)
            .map(|t| chunks * t / threads..chunks * (t + 1) / threads)
            .collect();
        std::thread::scope(|scope| {
            let (first, rest) = runs.split_first().expect("at least one run");
            let others: Vec<_> = rest
                .iter()
                .map(|run| scope.spawn(|| self.open_chunks(run.clone(), put)))
                .collect();
            // This thread opens the first run; every run's error is waited for.
            let mine = self.open_chunks(first.clone(), put);
            others.into_iter().fold(mine, |got, h| {
                let theirs = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                got.and(theirs)
            })
        })?;
        Ok(seal_memfd(file)?)
    }

    /// Opens the entry's chunks `run`, in order, handing each to `put` with its offset in
    /// the object.
    fn open_chunks(
        &self,
        run: std::ops::Range<u32>,
        mut put: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), CacheError> {
        let m = &*self.manifest;
        let f = File::open(self.cache.path_of(self.id))?;
        let mut buf = Vec::with_capacity(m.chunk_bytes() as usize + NONCE_LEN + TAG_LEN);
        for i in run {
            let r = chunk_range(m, i);
            buf.resize(NONCE_LEN + r.len() + TAG_LEN, 0);
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, sealed_offset(m, i))?;
            let (nonce, sealed) = buf.split_at_mut(NONCE_LEN);
            let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("nonce length");
            let aad = aad(&self.root, self.id, i);
            let opened = self
                .cache
                .key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..]),
                    sealed,
                )
                .map_err(|_| self.tampered(i))?;
            put(r.start as u64, opened)?;
        }
        Ok(())
    }

    /// Drops the entry whose chunk `i` did not open, and says so.
    fn tampered(&self, i: u32) -> CacheError {
        let dropped = {
            let mut s = self.cache.lock();
            let held = s.entries.get(&self.root).is_some_and(|m| m.id == self.id);
            let m = held.then(|| s.entries.remove(&self.root)).flatten();
            if let Some(m) = &m {
                s.used -= m.sealed_bytes;
            }
            m
        };
        if let Some(m) = dropped {
            let _ = std::fs::remove_file(self.cache.path_of(m.id));
        }
        CacheError::Tampered {
            root: self.root.to_hex(),
            chunk: i,
        }
    }
}

/// `data` in an anonymous memory file sealed against any change, as
/// [`CacheEntry::to_memfd`] gives: for objects handed to local readers straight from a
/// fetch.
pub fn sealed_memfd(data: &[u8]) -> io::Result<OwnedFd> {
    let file = new_memfd(data.len() as u64)?;
    std::os::unix::fs::FileExt::write_all_at(&file, data, 0)?;
    seal_memfd(file)
}

/// The kernel's setting for huge pages in memory files
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`, the chosen value: `never`,
/// `within_size`, `always`, ...), if it can be read. With `never` (or `deny`) a memory file
/// is filled a 4 KiB page at a time, which bounds how fast [`CacheEntry::to_memfd`] and
/// [`sealed_memfd`] run (several times slower than with `within_size` on the machines
/// measured; see the benchmark results).
pub fn memfd_huge_pages() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
    chosen_setting(&text)
}

/// The bracketed word of a sysfs choice (`always [never] deny`).
fn chosen_setting(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(text[start..start + len].to_owned())
}

/// An anonymous memory file of `size` bytes that can be sealed.
fn new_memfd(size: u64) -> io::Result<File> {
    use rustix::fs::MemfdFlags;
    let fd = rustix::fs::memfd_create(
        "transportd-object",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(File::from(fd))
}

/// Seals a memory file against writes, growth, shrinking and further seals.
fn seal_memfd(file: File) -> io::Result<OwnedFd> {
    use rustix::fs::SealFlags;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(fd)
}

impl Drop for CacheEntry {
    fn drop(&mut self) {
        let mut s = self.cache.lock();
        if let Some(m) = s.entries.get_mut(&self.root)
            && m.id == self.id
        {
            m.readers = m.readers.saturating_sub(1);
        }
    }
}

/// Bytes of chunk `i` within the object.
fn chunk_range(m: &Manifest, i: u32) -> std::ops::Range<usize> {
    let r = m
        .chunk_range(ChunkIndex(i))
        .expect("chunk within the manifest");
    r.start as usize..r.end as usize
}

/// Where chunk `i` starts in the entry's file: every chunk before it is its bytes plus a
/// nonce and a tag.
fn sealed_offset(m: &Manifest, i: u32) -> u64 {
    u64::from(i) * (u64::from(m.chunk_bytes()) + (NONCE_LEN + TAG_LEN) as u64)
}

/// The sealed size of an object.
fn sealed_len(m: &Manifest) -> u64 {
    m.size() + u64::from(m.chunk_count()) * (NONCE_LEN + TAG_LEN) as u64
}

/// What a sealed chunk is bound to: its object, its entry and its place.
fn aad(root: &Digest, id: u64, chunk: u32) -> [u8; 44] {
    let mut a = [0u8; 44];
    a[..32].copy_from_slice(&root.0);
    a[32..40].copy_from_slice(&id.to_be_bytes());
    a[40..].copy_from_slice(&chunk.to_be_bytes());
    a
}

#[cfg(test)]
mod tests;
