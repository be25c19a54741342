//! A file being received: chunks verified before they count, then an atomic, durable rename.
//!
//! Both the server (a pushed object) and the client (a pulled object) receive into a
//! temporary file next to the final name. Each chunk is checked against the manifest before
//! it is written; only a complete set of verified chunks is fsynced and renamed into place,
//! so nothing partial is ever visible under the final name. A temporary file left by an
//! interrupted attempt is re-verified chunk by chunk when reopened: chunks that still match
//! the manifest are kept, and only the others are fetched again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::proto::{ChunkError, ChunkIndex, ChunkSet, Digest, Manifest};

/// A temporary file filling up with verified chunks.
#[derive(Debug)]
pub struct PartialFile {
    dir: File,
    tmp_name: String,
    final_name: String,
    file: File,
    manifest: Arc<Manifest>,
    have: Mutex<ChunkSet>,
}

impl PartialFile {
    /// Opens or creates `tmp_name` in `dir` for an object described by `manifest`, keeping
    /// the chunks an earlier attempt already wrote if they still verify. Blocking.
    pub fn open(
        dir: File,
        tmp_name: String,
        final_name: String,
        manifest: Arc<Manifest>,
    ) -> io::Result<Self> {
        let file = super::fs::create_in(&dir, &tmp_name)?;
        let existing = file.metadata()?.len();
        let have = verify_existing(&file, existing, &manifest)?;
        file.set_len(manifest.size())?;
        Ok(Self {
            dir,
            tmp_name,
            final_name,
            file,
            manifest,
            have: Mutex::new(have),
        })
    }

    /// The manifest this file is being filled to.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Chunks verified and written so far.
    pub fn have(&self) -> ChunkSet {
        self.lock().clone()
    }

    /// True if every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.lock().is_full()
    }

    /// Verifies a chunk held in pieces and, if it matches, writes it in place. Blocking.
    /// Safe to call from several threads for different chunks.
    pub fn write_chunk(
        self: &Arc<Self>,
        index: ChunkIndex,
        pieces: &[Bytes],
    ) -> Result<(), WriteError> {
        let mut w = ChunkWriter::new(self.clone(), index)?;
        for p in pieces {
            w.feed(p)?;
        }
        w.finish()
    }

    /// Makes the object durable under its final name: fsync, rename, fsync the directory.
    /// Fails with `Incomplete` unless every chunk is present. Blocking.
    pub fn commit(self) -> Result<(), WriteError> {
        if !self.is_complete() {
            return Err(WriteError::Incomplete);
        }
        self.file.sync_all()?;
        super::fs::rename_in(&self.dir, &self.tmp_name, &self.final_name)?;
        Ok(())
    }

    /// Deletes the temporary file (an abandoned attempt that must not be resumed). Blocking.
    pub fn discard(self) -> io::Result<()> {
        super::fs::remove_in(&self.dir, &self.tmp_name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChunkSet> {
        // The set is always consistent between statements, so a poisoned lock is usable.
        self.have.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Receives one chunk in pieces: each piece is hashed and written in place as it arrives,
/// and the chunk counts only once the whole of it matches the manifest. Memory stays at
/// one piece, whatever the chunk size. Blocking calls; move it into `spawn_blocking`.
#[derive(Debug)]
pub struct ChunkWriter {
    partial: Arc<PartialFile>,
    index: ChunkIndex,
    start: u64,
    len: u64,
    written: u64,
    hasher: blake3::Hasher,
}

impl ChunkWriter {
    /// Starts receiving chunk `index`.
    pub fn new(partial: Arc<PartialFile>, index: ChunkIndex) -> Result<Self, WriteError> {
        let range = partial
            .manifest
            .chunk_range(index)
            .ok_or(ChunkError::OutOfRange(index))?;
        Ok(Self {
            partial,
            index,
            start: range.start,
            len: range.end - range.start,
            written: 0,
            hasher: blake3::Hasher::new(),
        })
    }

    /// The chunk being received.
    pub fn index(&self) -> ChunkIndex {
        self.index
    }

    /// Hashes and writes the next piece. Fails, writing nothing, if the chunk would grow
    /// past its length.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if self.written + data.len() as u64 > self.len {
            return Err(ChunkError::Length {
                index: self.index,
                expected: self.len,
                actual: self.written + data.len() as u64,
            }
            .into());
        }
        self.hasher.update(data);
        self.partial
            .file
            .write_all_at(data, self.start + self.written)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks length and hash; only then does the chunk count.
    pub fn finish(self) -> Result<(), WriteError> {
        if self.written != self.len {
            return Err(ChunkError::Length {
                index: self.index,
                expected: self.len,
                actual: self.written,
            }
            .into());
        }
        self.partial
            .manifest
            .check_digest(self.index, Digest(self.hasher.finalize().into()))?;
        self.partial.lock().insert(self.index);
        Ok(())
    }
}

/// Why a chunk could not be stored or an object committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The chunk does not match the manifest.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Commit was asked for before every chunk was stored.
    #[error("not every chunk has been stored")]
    Incomplete,
    /// The file system failed (for example, it is full).
    #[error("storage: {0}")]
    Io(#[from] io::Error),
}

impl WriteError {
    /// True if the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::StorageFull)
    }
}

/// Which chunks of the first `len` bytes of `file` already match `manifest`.
fn verify_existing(file: &File, len: u64, manifest: &Manifest) -> io::Result<ChunkSet> {
    let mut have = ChunkSet::new(manifest.chunk_count());
    if len == 0 {
        return Ok(have);
    }
    let mut buf = vec![0u8; manifest.chunk_bytes() as usize];
    for i in 0..manifest.chunk_count() {
        let index = ChunkIndex(i);
        let Some(range) = manifest.chunk_range(index) else {
            break;
        };
        if range.end > len {
            break;
        }
        let n = (range.end - range.start) as usize;
        file.read_exact_at(&mut buf[..n], range.start)?;
        if manifest.verify_chunk(index, &buf[..n]).is_ok() {
            have.insert(index);
        }
    }
    Ok(have)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::manifest::MIN_CHUNK_BYTES;

    fn object() -> (Vec<u8>, Arc<Manifest>) {
        let data: Vec<u8> = (0..(MIN_CHUNK_BYTES as usize * 3 + 100))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let m = Arc::new(Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap());
        (data, m)
    }

    fn chunk(data: &[u8], m: &Manifest, i: u32) -> Bytes {
        let r = m.chunk_range(ChunkIndex(i)).unwrap();
        Bytes::copy_from_slice(&data[r.start as usize..r.end as usize])
    }

    #[test]
    fn nothing_is_visible_until_commit_and_bad_chunks_never_count() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, m) = object();
        let open = || {
            PartialFile::open(
                super::super::fs::open_dir(tmp.path()).unwrap(),
                ".x.part".into(),
                "x.bin".into(),
                m.clone(),
            )
            .unwrap()
        };
        let p = Arc::new(open());
        let mut bad = chunk(&data, &m, 1).to_vec();
        bad[0] ^= 0xff;
        assert!(matches!(
            p.write_chunk(ChunkIndex(1), &[Bytes::from(bad)]),
            Err(WriteError::Chunk(ChunkError::Corrupt(ChunkIndex(1))))
        ));
        for i in [0, 2] {
            p.write_chunk(ChunkIndex(i), &[chunk(&data, &m, i)])
                .unwrap();
        }
        assert!(!tmp.path().join("x.bin").exists());
        drop(p);

        // Reopen: chunks 0 and 2 survive; 1 and 3 are missing.
        let p = Arc::new(open());
        let have = p.have();
        assert!(have.contains(ChunkIndex(0)) && have.contains(ChunkIndex(2)));
        assert_eq!(
            have.missing().collect::<Vec<_>>(),
            vec![ChunkIndex(1), ChunkIndex(3)]
        );
        let p = {
            let p = Arc::into_inner(p).unwrap();
            assert!(matches!(p.commit(), Err(WriteError::Incomplete)));
            Arc::new(open())
        };
        // A chunk that would grow past its length is refused before anything is written.
        let mut w = ChunkWriter::new(p.clone(), ChunkIndex(3)).unwrap();
        assert!(w.feed(&[0u8; 101]).is_err());
        drop(w);
        // A chunk in two pieces.
        let c1 = chunk(&data, &m, 1);
        p.write_chunk(ChunkIndex(1), &[c1.slice(..10), c1.slice(10..)])
            .unwrap();
        p.write_chunk(ChunkIndex(3), &[chunk(&data, &m, 3)])
            .unwrap();
        Arc::into_inner(p).unwrap().commit().unwrap();
        assert_eq!(std::fs::read(tmp.path().join("x.bin")).unwrap(), data);
        assert!(!tmp.path().join(".x.part").exists());
    }
}
