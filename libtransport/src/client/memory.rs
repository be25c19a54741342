//! Where a pull into memory puts its chunks: one contiguous piece of memory (the caller's, or
//! one buffer of ours), split into a disjoint view per chunk, so chunk workers fill their
//! chunks in place without copying them together at the end.

use std::ops::{Deref, DerefMut, Range};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;

use crate::error::FetchError;
use crate::proto::{ChunkIndex, Manifest};

/// One chunk's memory.
#[derive(Debug)]
enum Piece<'a> {
    /// Part of a buffer of ours, rejoined without copying at the end.
    Owned(BytesMut),
    /// Part of the caller's memory.
    Borrowed(&'a mut [u8]),
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Owned(b) => b.len(),
            Self::Borrowed(b) => b.len(),
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Self::Owned(b) => b,
            Self::Borrowed(b) => b,
        }
    }
}

/// The memory of a pull's chunks `chunks`, one slot per chunk. A worker takes a chunk's slot
/// while it fills it; the slot comes back when the worker is done or dropped, so a failed or
/// cancelled read never loses memory (the next attempt refills the same place).
#[derive(Debug)]
pub(super) struct ChunkSlots<'a> {
    chunks: Range<u32>,
    /// Where the first chunk starts in the object.
    first: u64,
    slots: Mutex<Vec<Option<Piece<'a>>>>,
}

impl<'a> ChunkSlots<'a> {
    /// Slots in a new buffer of ours, for the chunks `chunks` of `manifest`. The buffer is
    /// zeroed memory the kernel hands out lazily: its pages are cleared as chunks land.
    pub(super) fn owned(manifest: &Manifest, chunks: Range<u32>) -> Self {
        let span = span(manifest, &chunks);
        let mut all = BytesMut::zeroed((span.end - span.start) as usize);
        let slots = chunks
            .clone()
            .map(|i| {
                let len = chunk_len(manifest, i);
                Some(Piece::Owned(all.split_to(len)))
            })
            .collect();
        Self {
            chunks,
            first: span.start,
            slots: Mutex::new(slots),
        }
    }

    /// The bytes `range` of the object, once every chunk is back in its slot. Rejoining the
    /// pieces of our buffer does not copy.
    pub(super) fn into_bytes(self, range: Range<u64>) -> Result<bytes::Bytes, FetchError> {
        let first = self.first;
        let slots = self
            .slots
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let mut joined = BytesMut::new();
        for (i, piece) in slots.into_iter().enumerate() {
            match piece {
                Some(Piece::Owned(b)) => joined.unsplit(b),
                // Every worker has returned its slot before the pull completes.
                _ => return Err(FetchError::Corrupt(ChunkIndex(i as u32))),
            }
        }
        let joined = joined.freeze();
        let (start, end) = ((range.start - first) as usize, (range.end - first) as usize);
        if end > joined.len() || start > end {
            return Err(FetchError::Corrupt(ChunkIndex(0)));
        }
        Ok(joined.slice(start..end))
    }

    /// Whether the slots hold the chunks `chunks` of `manifest`, piece for piece (so a new
    /// manifest of the same layout reuses them).
    pub(super) fn fits(&self, manifest: &Manifest, chunks: &Range<u32>) -> bool {
        let slots = self.lock();
        *chunks == self.chunks
            && span(manifest, chunks).start == self.first
            && chunks.clone().zip(slots.iter()).all(|(i, s)| {
                s.as_ref()
                    .is_some_and(|p| p.len() == chunk_len(manifest, i))
            })
    }

    /// Whether the memory is ours (rather than the caller's).
    pub(super) fn is_owned(&self) -> bool {
        self.lock()
            .iter()
            .any(|s| matches!(s, Some(Piece::Owned(_))))
    }

    /// Slots in the caller's memory `dest`, whose start is the start of chunk `chunks.start`.
    /// `None` if `dest` is shorter than the chunks.
    pub(super) fn borrowed(
        manifest: &Manifest,
        chunks: Range<u32>,
        mut dest: &'a mut [u8],
    ) -> Option<Self> {
        let span = span(manifest, &chunks);
        if (dest.len() as u64) < span.end - span.start {
            return None;
        }
        let mut slots = Vec::with_capacity(chunks.len());
        for i in chunks.clone() {
            let (piece, rest) = dest.split_at_mut(chunk_len(manifest, i));
            slots.push(Some(Piece::Borrowed(piece)));
            dest = rest;
        }
        Some(Self {
            chunks,
            first: span.start,
            slots: Mutex::new(slots),
        })
    }

    /// Chunk `index`'s slot, for one worker to fill; `None` if it is not one of ours or
    /// another worker holds it.
    pub(super) fn take(&self, index: ChunkIndex) -> Option<Slot<'_, 'a>> {
        let at = self.position(index)?;
        let piece = self.lock().get_mut(at)?.take()?;
        Some(Slot {
            slots: self,
            at,
            piece: Some(piece),
        })
    }

    /// Copies a whole chunk into its slot (what RDMA delivers, already verified).
    pub(super) fn fill(&self, index: ChunkIndex, bytes: &[u8]) -> Result<(), FetchError> {
        let mut slot = self.take(index).ok_or(FetchError::Corrupt(index))?;
        if slot.len() != bytes.len() {
            return Err(FetchError::Corrupt(index));
        }
        slot.copy_from_slice(bytes);
        Ok(())
    }

    fn position(&self, index: ChunkIndex) -> Option<usize> {
        self.chunks
            .contains(&index.0)
            .then(|| (index.0 - self.chunks.start) as usize)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<Piece<'a>>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A chunk's memory while one worker fills it; back in its slot when dropped.
#[derive(Debug)]
pub(super) struct Slot<'s, 'a> {
    slots: &'s ChunkSlots<'a>,
    at: usize,
    piece: Option<Piece<'a>>,
}

impl Deref for Slot<'_, '_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.piece {
            Some(Piece::Owned(b)) => b,
            Some(Piece::Borrowed(b)) => b,
            None => &[],
        }
    }
}

impl DerefMut for Slot<'_, '_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.piece.as_mut().map_or(&mut [], Piece::bytes)
    }
}

impl Drop for Slot<'_, '_> {
    fn drop(&mut self) {
        if let Some(piece) = self.piece.take()
            && let Some(s) = self.slots.lock().get_mut(self.at)
        {
            *s = Some(piece);
        }
    }
}

/// Where the chunks `chunks` start and end in the object.
fn span(manifest: &Manifest, chunks: &Range<u32>) -> Range<u64> {
    let first = manifest
        .chunk_range(ChunkIndex(chunks.start))
        .map_or(0, |r| r.start);
    let last = manifest
        .chunk_range(ChunkIndex(chunks.end.saturating_sub(1)))
        .map_or(first, |r| r.end);
    first..last.max(first)
}

fn chunk_len(manifest: &Manifest, i: u32) -> usize {
    manifest
        .chunk_range(ChunkIndex(i))
        .map_or(0, |r| (r.end - r.start) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: usize = 64 << 10;
    const LEN: usize = 2 * C + 1000;

    fn manifest() -> Manifest {
        let data: Vec<u8> = (0..LEN).map(|i| i as u8).collect();
        Manifest::of_bytes(&data, C as u32).unwrap()
    }

    #[test]
    fn a_slot_comes_back_when_its_worker_drops_it() {
        let m = manifest();
        let mut mem = vec![0u8; LEN];
        let slots = ChunkSlots::borrowed(&m, 0..3, &mut mem).unwrap();
        {
            let mut s = slots.take(ChunkIndex(1)).unwrap();
            assert_eq!(s.len(), C);
            s.fill(7);
            // Held: nobody else gets it.
            assert!(slots.take(ChunkIndex(1)).is_none());
        }
        assert_eq!(slots.take(ChunkIndex(2)).unwrap().len(), 1000);
        assert!(slots.take(ChunkIndex(1)).is_some(), "back after the drop");
        assert!(slots.take(ChunkIndex(3)).is_none(), "not one of ours");
        assert!(!slots.is_owned());
        drop(slots);
        assert!(mem[C..2 * C].iter().all(|&b| b == 7));
        assert!(mem[..C].iter().all(|&b| b == 0));
    }

    #[test]
    fn caller_memory_shorter_than_the_chunks_is_refused() {
        let m = manifest();
        let mut mem = vec![0u8; LEN - 1];
        assert!(ChunkSlots::borrowed(&m, 0..3, &mut mem).is_none());
        // A longer buffer is fine: the chunks fill its start.
        let mut mem = vec![0u8; 2 * LEN];
        let slots = ChunkSlots::borrowed(&m, 0..3, &mut mem).unwrap();
        assert!(slots.fits(&m, &(0..3)));
        let other = Manifest::of_bytes(&[1u8; LEN + 1], C as u32).unwrap();
        assert!(!slots.fits(&other, &(0..3)), "another layout");
    }

    #[test]
    fn owned_pieces_rejoin_into_the_range_asked_for() {
        let m = manifest();
        let slots = ChunkSlots::owned(&m, 1..3);
        assert!(slots.is_owned());
        slots.fill(ChunkIndex(1), &[1u8; C]).expect("chunk 1 fits");
        assert!(
            slots.fill(ChunkIndex(2), &[2u8; 10]).is_err(),
            "wrong length"
        );
        let bytes = slots.into_bytes(C as u64 + 10..2 * C as u64 + 500).unwrap();
        assert_eq!(bytes.len(), C + 490);
        assert!(bytes[..C - 10].iter().all(|&b| b == 1));
        assert!(bytes[C - 10..].iter().all(|&b| b == 0));
    }
}
