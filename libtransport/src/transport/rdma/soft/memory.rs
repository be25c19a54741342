//! A soft region's memory: one zeroed allocation whose ranges are lent out exclusively (to a
//! posted work request, to `with_mut`, to a write landing from the peer), without copying
//! and without unsafe code.
//!
//! [`BytesMut`] splits one allocation into disjoint, separately owned views and joins
//! neighbouring views back in O(1). The free ranges are kept as such views in a map by
//! their start; taking a range removes it from the map (so nobody else can take any part of
//! it), and giving it back merges it with its free neighbours. The lock covers only this
//! bookkeeping, never the use of the bytes, so the reader task can land data in one slot
//! while the CPU seals another.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;

/// Memory whose ranges are lent out exclusively.
pub(crate) struct Memory {
    len: usize,
    /// The ranges nobody holds, by start; never holds an empty piece.
    free: Mutex<BTreeMap<usize, BytesMut>>,
}

impl Memory {
    /// `len` zeroed bytes (the pages are mapped lazily by the allocator).
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(0, BytesMut::zeroed(len));
        }
        Self {
            len,
            free: Mutex::new(free),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Takes `range` out, or `None` if any part of it is held (or it is out of bounds).
    pub(crate) fn take(&self, range: Range<usize>) -> Option<BytesMut> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        if range.is_empty() {
            return Some(BytesMut::new());
        }
        let mut free = self.lock();
        let (&first, _) = free.range(..=range.start).next_back()?;
        // The free pieces from `first` on must be contiguous up to `range.end`.
        let mut starts = Vec::new();
        let mut pos = first;
        for (&start, piece) in free.range(first..) {
            if start != pos || pos >= range.end {
                break;
            }
            starts.push(start);
            pos = start + piece.len();
        }
        if pos < range.end {
            return None;
        }
        let mut pieces = starts.iter().filter_map(|s| free.remove(s));
        // `starts` is non-empty: `first` itself was found above.
        let mut piece = pieces.next()?;
        for next in pieces {
            join(&mut piece, next);
        }
        let mut taken = piece.split_off(range.start - first);
        let tail = taken.split_off(range.end - range.start);
        if !piece.is_empty() {
            free.insert(first, piece);
        }
        if !tail.is_empty() {
            free.insert(range.end, tail);
        }
        Some(taken)
    }

    /// Gives back a piece that [`Memory::take`] returned for a range starting at `start`.
    pub(crate) fn give_back(&self, start: usize, piece: BytesMut) {
        if piece.is_empty() {
            return;
        }
        let mut free = self.lock();
        let (mut start, mut piece) = (start, piece);
        let left = free
            .range(..start)
            .next_back()
            .filter(|(s, p)| *s + p.len() == start)
            .map(|(s, _)| *s);
        if let Some(left_start) = left
            && let Some(mut left) = free.remove(&left_start)
        {
            join(&mut left, piece);
            (start, piece) = (left_start, left);
        }
        if let Some(right) = free.remove(&(start + piece.len())) {
            join(&mut piece, right);
        }
        free.insert(start, piece);
    }

    /// Number of free pieces (for tests: fully given back means one piece).
    #[cfg(test)]
    pub(crate) fn free_pieces(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<usize, BytesMut>> {
        // The map stays consistent even if a holder panicked: every update is a whole
        // insert or remove.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Appends `right` (the range right after `left`) to `left`: O(1) for views of one
/// allocation, a copy otherwise (which keeps the bytes right, only slower).
fn join(left: &mut BytesMut, right: BytesMut) {
    if let Err(right) = left.try_unsplit(right) {
        left.unsplit(right);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_exclusive_and_come_back_whole() {
        let mem = Memory::zeroed(100);
        let mut a = mem.take(10..20).unwrap();
        a.fill(1);
        assert!(mem.take(15..25).is_none(), "overlap on the right");
        assert!(mem.take(5..11).is_none(), "overlap on the left");
        assert!(mem.take(0..100).is_none(), "covers the held range");
        let mut b = mem.take(20..30).unwrap();
        b.fill(2);
        let c = mem.take(0..10).unwrap();
        assert_eq!(mem.free_pieces(), 1, "only 30..100 is free");
        mem.give_back(10, a);
        mem.give_back(0, c);
        mem.give_back(20, b);
        assert_eq!(mem.free_pieces(), 1);
        let all = mem.take(0..100).unwrap();
        assert_eq!(&all[..10], &[0; 10]);
        assert_eq!(&all[10..20], &[1; 10]);
        assert_eq!(&all[20..30], &[2; 10]);
        assert_eq!(&all[30..], &[0; 70]);
        mem.give_back(0, all);
    }

    #[test]
    fn joins_do_not_copy() {
        let mem = Memory::zeroed(1 << 20);
        let whole = mem.take(0..1 << 20).unwrap();
        let base = whole.as_ptr();
        mem.give_back(0, whole);
        let a = mem.take(4096..8192).unwrap();
        assert_eq!(a.as_ptr(), base.wrapping_add(4096), "a view, not a copy");
        mem.give_back(4096, a);
        let whole = mem.take(0..1 << 20).unwrap();
        assert_eq!(whole.as_ptr(), base, "joined back in place");
        mem.give_back(0, whole);
    }

    #[test]
    fn bounds_and_empty_ranges() {
        let mem = Memory::zeroed(8);
        assert!(mem.take(0..9).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..4;
        assert!(mem.take(reversed).is_none());
        let held = mem.take(0..8).unwrap();
        assert_eq!(
            mem.take(3..3).map(|b| b.len()),
            Some(0),
            "empty ranges never conflict"
        );
        mem.give_back(0, held);
        assert_eq!(Memory::zeroed(0).take(0..0).map(|b| b.len()), Some(0));
    }
}
