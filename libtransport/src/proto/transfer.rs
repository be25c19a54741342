//! The transfer machines of the core: what a pull and a push know across attempts, and what
//! each attempt asks for and how it ends, without I/O.
//!
//! A transfer runs in attempts ([`super::retry`] decides whether another one follows). Each
//! attempt opens the transfer on a connection, moves the chunks still missing and ends
//! complete, due for a renewal of its connection, or failed. A [`Pull`] and a [`Push`] hold
//! what lasts across attempts (the manifest, the resume set of verified chunks, what the
//! first attempt found already in place) and decide, from the answers the driver hands in,
//! what is asked for and what happens at the end. A [`ChunkCheck`] decides whether one
//! received chunk counts. The client driver (`client/fetch.rs`, `client/push.rs`) sends the
//! requests these machines hand out, moves the bytes, and reports each chunk back.
//!
//! Call order of a [`Pull`], per attempt:
//! 1. send [`Pull::open_request`]; hand the answer's manifest to [`Pull::handle_opened`],
//!    which refuses a range outside the object or an object over the caller's limit, and
//!    says whether the destination an earlier attempt left is still good ([`Opened::Resume`])
//!    or must be made afresh ([`Opened::Fresh`]);
//! 2. after [`Opened::Fresh`], a destination that can hold chunks from before (a partial
//!    file) reports the chunks it found verified with [`Pull::handle_held`];
//! 3. [`Pull::schedule`] hands out the chunk schedule of what is missing; each chunk is
//!    asked for with [`Pull::read_request`] and checked with a [`ChunkCheck`]; the schedule
//!    goes back through [`Pull::handle_schedule`] when the attempt's workers are done
//!    (chunks moved another way, such as an RDMA session, through [`Pull::handle_verified`]);
//! 4. [`Pull::poll_end`] says whether to commit, renew or fail; an attempt that failed
//!    reports with [`Pull::handle_failed`] whether its destination still holds what it
//!    verified.
//!
//! A [`Push`] is the mirror image: [`Push::handle_opened`] takes the chunks the server
//! holds and gives the schedule of the rest; [`Push::poll_end`] says whether to commit or to
//! close and renew; [`Push::handle_committed`] checks the root the server committed.

use std::ops::Range;
use std::sync::Arc;

use super::schedule::ChunkSchedule;
use super::{
    ChunkError, ChunkIndex, ChunkSet, DatasetName, Digest, Manifest, ObjectPath, Request,
    TransferId,
};

/// A pull (into a file or into memory, of a whole object or a range) across its attempts.
#[derive(Debug, Clone)]
pub struct Pull {
    want: Want,
    /// The manifest of the latest attempt; `None` before the first answer.
    manifest: Option<Arc<Manifest>>,
    /// The bytes of the object wanted, and the chunks covering them.
    bytes: Range<u64>,
    chunks: Range<u32>,
    /// Verified chunks of the manifest (over all of its chunks).
    verified: ChunkSet,
    /// Whether the destination still holds the verified chunks.
    kept: bool,
    /// Chunks already in place at the first attempt.
    reused: u32,
    /// Attempts that opened the transfer.
    opened: u32,
}

/// What a pull wants of the object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// All of it, if it is at most `limit` bytes.
    Whole { limit: u64 },
    /// These bytes, which must lie within the object.
    Range(Range<u64>),
}

/// What [`Pull::handle_opened`] makes of an attempt's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The object is the one an earlier attempt pulled from, and the destination it left
    /// still holds its verified chunks: go on with them.
    Resume,
    /// First attempt, another object under the same name, or a destination that no longer
    /// holds what it verified: make the destination afresh (a partial file then reports the
    /// chunks it still finds verified with [`Pull::handle_held`]).
    Fresh,
}

/// How a pull's attempt ends, once its chunk workers are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullEnd {
    /// Every chunk is verified: commit the destination.
    Complete,
    /// The connection is due for renewal and chunks wait: the next attempt goes on, over a
    /// fresh connection, with what this one verified.
    Renew,
    /// The workers stopped without every chunk and without a renewal: this chunk (the first
    /// missing) never verified.
    Incomplete(ChunkIndex),
}

/// Why a pull cannot go on with the object the server opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PullRefusal {
    /// The range lies outside the object.
    #[error("range {start}..{end} is outside the object of {size} bytes")]
    Range {
        /// Start asked for.
        start: u64,
        /// End asked for.
        end: u64,
        /// The object's size.
        size: u64,
    },
    /// The object (or range) is larger than the caller allows.
    #[error("object is {size} bytes, more than the {limit} allowed")]
    TooLarge {
        /// Bytes wanted.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },
}

/// What a server answered that a transfer cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferViolation {
    /// The server's set of chunks it holds is not the size of the manifest's.
    #[error("chunk set does not match the manifest")]
    ChunkSetMismatch,
    /// The server committed an object of another root hash than the manifest's.
    #[error("server committed another root than the manifest's")]
    WrongRoot,
    /// A chunk index past the object's last chunk.
    #[error("chunk {0} outside the object")]
    ChunkOutsideObject(ChunkIndex),
}

impl Pull {
    /// A pull of a whole object of at most `limit` bytes (`u64::MAX`: any size).
    pub fn whole(limit: u64) -> Self {
        Self::new(Want::Whole { limit })
    }

    /// A pull of `range` of an object.
    pub fn range(range: Range<u64>) -> Self {
        Self::new(Want::Range(range))
    }

    fn new(want: Want) -> Self {
        Self {
            want,
            manifest: None,
            bytes: 0..0,
            chunks: 0..0,
            verified: ChunkSet::new(0),
            kept: false,
            reused: 0,
            opened: 0,
        }
    }

    /// The request that opens the transfer, at the start of each attempt.
    pub fn open_request(dataset: &DatasetName, object: &ObjectPath) -> Request {
        Request::OpenRead {
            dataset: dataset.clone(),
            object: object.clone(),
        }
    }

    /// The server opened the transfer with `manifest`. Refuses a range outside the object
    /// and more bytes than the caller allows (the driver then closes the transfer).
    pub fn handle_opened(&mut self, manifest: Manifest) -> Result<Opened, PullRefusal> {
        let size = manifest.size();
        let bytes = match &self.want {
            Want::Whole { limit } => {
                if size > *limit {
                    return Err(PullRefusal::TooLarge {
                        size,
                        limit: *limit,
                    });
                }
                0..size
            }
            Want::Range(r) => {
                if r.start > r.end || r.end > size {
                    return Err(PullRefusal::Range {
                        start: r.start,
                        end: r.end,
                        size,
                    });
                }
                r.clone()
            }
        };
        self.opened += 1;
        let same = self.manifest.as_deref() == Some(&manifest);
        if same && self.kept {
            return Ok(Opened::Resume);
        }
        self.chunks = manifest.chunks_covering(bytes.clone());
        self.bytes = bytes;
        self.verified = ChunkSet::new(manifest.chunk_count());
        self.manifest = Some(Arc::new(manifest));
        self.kept = true;
        Ok(Opened::Fresh)
    }

    /// A fresh destination found these chunks already verified (a partial file left by an
    /// earlier pull). Only the first attempt's count is reported as reused.
    pub fn handle_held(&mut self, held: &ChunkSet) {
        if held.len() != self.verified.len() {
            return;
        }
        let mut count = 0;
        for i in self.chunks.clone().map(ChunkIndex) {
            if held.contains(i) {
                self.verified.insert(i);
                count += 1;
            }
        }
        if self.opened == 1 {
            self.reused = count;
        }
    }

    /// The manifest of the open transfer (none before the first answer).
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// Whether the pull wants the whole object (not a range of it).
    pub fn is_whole(&self) -> bool {
        matches!(self.want, Want::Whole { .. })
    }

    /// The bytes of the object wanted.
    pub fn bytes(&self) -> Range<u64> {
        self.bytes.clone()
    }

    /// The chunks covering what is wanted.
    pub fn chunks(&self) -> Range<u32> {
        self.chunks.clone()
    }

    /// The chunks still missing, ascending.
    pub fn missing(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.chunks
            .clone()
            .map(ChunkIndex)
            .filter(|i| !self.verified.contains(*i))
    }

    /// The schedule of this attempt: the missing chunks, in order.
    pub fn schedule(&self) -> Option<ChunkSchedule> {
        let manifest = self.manifest.as_deref()?;
        Some(ChunkSchedule::new(manifest, self.missing()))
    }

    /// The request for chunk `index` of the open transfer `transfer`.
    pub fn read_request(&self, transfer: TransferId, index: ChunkIndex) -> Option<Request> {
        let range = self.manifest.as_deref()?.chunk_range(index)?;
        Some(Request::Read {
            transfer,
            offset: range.start,
            len: range.end - range.start,
        })
    }

    /// The attempt's workers are done: the chunks `schedule` saw verified count.
    pub fn handle_schedule(&mut self, schedule: &ChunkSchedule) {
        for i in self.chunks.clone().map(ChunkIndex) {
            if schedule.is_verified(i) {
                self.verified.insert(i);
            }
        }
    }

    /// Chunk `index` verified (moved another way than by the schedule's workers).
    pub fn handle_verified(&mut self, index: ChunkIndex) {
        if self.chunks.contains(&index.0) {
            self.verified.insert(index);
        }
    }

    /// The attempt failed. `kept`: whether the destination still holds every chunk verified
    /// so far (a memory buffer filled by stream reads does; one an RDMA session wrote into
    /// without a per-chunk account, or a partial file to be read again, does not).
    pub fn handle_failed(&mut self, kept: bool) {
        self.kept = kept;
    }

    /// How the attempt ends, its workers done: `renewing` says whether its connection is
    /// due for renewal.
    pub fn poll_end(&self, renewing: bool) -> PullEnd {
        match self.missing().next() {
            None => PullEnd::Complete,
            Some(_) if renewing => PullEnd::Renew,
            Some(first) => PullEnd::Incomplete(first),
        }
    }

    /// Chunks already in place at the first attempt.
    pub fn chunks_reused(&self) -> u32 {
        self.reused
    }

    /// Bytes of the covered chunks verified so far, and of all of them.
    pub fn progress(&self) -> (u64, u64) {
        let Some(m) = self.manifest.as_deref() else {
            return (0, 0);
        };
        let len = |i: ChunkIndex| m.chunk_range(i).map_or(0, |r| r.end - r.start);
        let all = self.chunks.clone().map(ChunkIndex);
        let total = all.clone().map(len).sum();
        let done = all.filter(|i| self.verified.contains(*i)).map(len).sum();
        (done, total)
    }
}

/// A push across its attempts.
#[derive(Debug, Clone)]
pub struct Push {
    manifest: Arc<Manifest>,
    /// Chunks the server held at the first attempt.
    skipped: Option<u32>,
}

/// How a push's attempt ends, once its chunk workers are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEnd {
    /// Every chunk was stored: send this commit.
    Commit(Request),
    /// The connection is due for renewal: send this close, so the object is not still open
    /// for writing when the next attempt reopens it and learns what the server holds.
    Renew(Request),
}

impl Push {
    /// A push of the object `manifest` describes.
    pub fn new(manifest: Arc<Manifest>) -> Self {
        Self {
            manifest,
            skipped: None,
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// The request that opens the transfer, at the start of each attempt.
    pub fn open_request(&self, dataset: &DatasetName, object: &ObjectPath) -> Request {
        Request::OpenWrite {
            dataset: dataset.clone(),
            object: object.clone(),
            manifest: (*self.manifest).clone(),
        }
    }

    /// The request that opens one part of the transfer striped over several connections,
    /// `group` naming the striped push, at the start of each attempt and on each further
    /// connection.
    pub fn open_part_request(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        group: [u8; 16],
    ) -> Request {
        Request::OpenWritePart {
            dataset: dataset.clone(),
            object: object.clone(),
            manifest: (*self.manifest).clone(),
            group,
        }
    }

    /// The server opened the transfer holding `have`: the schedule of the chunks to send.
    pub fn handle_opened(&mut self, have: &ChunkSet) -> Result<ChunkSchedule, TransferViolation> {
        if have.len() != self.manifest.chunk_count() {
            return Err(TransferViolation::ChunkSetMismatch);
        }
        self.skipped.get_or_insert(have.count());
        Ok(ChunkSchedule::new(&self.manifest, have.missing()))
    }

    /// Bytes of the chunks the server holds, of `have`.
    pub fn held_bytes(&self, have: &ChunkSet) -> u64 {
        (0..self.manifest.chunk_count())
            .map(ChunkIndex)
            .filter(|i| have.contains(*i))
            .map(|i| self.manifest.chunk_range(i).map_or(0, |r| r.end - r.start))
            .sum()
    }

    /// The request that carries chunk `index`, and the bytes of the object it holds.
    pub fn write_request(
        &self,
        transfer: TransferId,
        index: ChunkIndex,
    ) -> Result<(Request, Range<u64>), TransferViolation> {
        let range = self
            .manifest
            .chunk_range(index)
            .ok_or(TransferViolation::ChunkOutsideObject(index))?;
        Ok((
            Request::WriteChunk {
                transfer,
                chunk: index,
            },
            range,
        ))
    }

    /// How the attempt ends, its workers done without an error: `renewing` says whether its
    /// connection is due for renewal (chunks may then be left for the next attempt).
    pub fn poll_end(&self, transfer: TransferId, renewing: bool) -> PushEnd {
        if renewing {
            PushEnd::Renew(Request::Close { transfer })
        } else {
            PushEnd::Commit(Request::Commit { transfer })
        }
    }

    /// The server committed an object whose root is `root`: it must be the manifest's.
    pub fn handle_committed(&self, root: Digest) -> Result<Digest, TransferViolation> {
        if root != self.manifest.root() {
            return Err(TransferViolation::WrongRoot);
        }
        Ok(root)
    }

    /// Chunks the server already held at the first attempt.
    pub fn chunks_skipped(&self) -> u32 {
        self.skipped.unwrap_or(0)
    }
}

/// Whether one received chunk counts: it places each piece of a chunk's data, hashes it, and
/// at the end checks length and hash against the manifest. Nothing of a chunk counts before
/// [`ChunkCheck::finish`] says so.
#[derive(Debug, Clone)]
pub struct ChunkCheck {
    index: ChunkIndex,
    len: u64,
    at: u64,
    hasher: blake3::Hasher,
}

impl ChunkCheck {
    /// A check of chunk `index` of `manifest`.
    pub fn new(manifest: &Manifest, index: ChunkIndex) -> Result<Self, ChunkError> {
        let range = manifest
            .chunk_range(index)
            .ok_or(ChunkError::OutOfRange(index))?;
        Ok(Self {
            index,
            len: range.end - range.start,
            at: 0,
            hasher: blake3::Hasher::new(),
        })
    }

    /// The chunk's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the chunk received so far: where the next piece goes.
    pub fn received(&self) -> u64 {
        self.at
    }

    /// The next piece of the chunk arrived: where it goes within the chunk. Refuses a piece
    /// that runs past the chunk's end.
    pub fn handle_data(&mut self, piece: &[u8]) -> Result<Range<usize>, ChunkError> {
        let end = self.at + piece.len() as u64;
        if end > self.len {
            return Err(ChunkError::Length {
                index: self.index,
                expected: self.len,
                actual: end,
            });
        }
        self.hasher.update(piece);
        let at = self.at as usize;
        self.at = end;
        Ok(at..end as usize)
    }

    /// The chunk's data ended: it counts if it is whole and matches its hash.
    pub fn finish(self, manifest: &Manifest) -> Result<(), ChunkError> {
        if self.at != self.len {
            return Err(ChunkError::Length {
                index: self.index,
                expected: self.len,
                actual: self.at,
            });
        }
        manifest.check_digest(self.index, Digest(self.hasher.finalize().into()))
    }
}

#[cfg(test)]
mod tests;
