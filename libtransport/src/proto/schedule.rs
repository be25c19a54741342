//! Which chunks a transfer still needs, and which to ask for next: the chunk schedule of a
//! pull or a push, without I/O.
//!
//! A transfer starts from the chunks it lacks (its resume set: a pull's missing chunks, a
//! push's chunks the server does not hold). Workers take the next chunk with
//! [`ChunkSchedule::poll_next`] and report how it went: [`handle_verified`] when it counts,
//! [`handle_reset`] when its stream was reset before it verified (what arrived of it does
//! not count; it goes back to the front of the queue, up to [`MAX_RESETS_PER_CHUNK`] times),
//! [`handle_abandoned`] when the attempt stops before the chunk was asked for or while it
//! was under way (it stays missing for the next attempt). The schedule never counts a chunk
//! twice, and a chunk is only ever handed to one worker at a time.
//!
//! [`handle_verified`]: ChunkSchedule::handle_verified
//! [`handle_reset`]: ChunkSchedule::handle_reset
//! [`handle_abandoned`]: ChunkSchedule::handle_abandoned

use std::collections::VecDeque;

use crate::proto::{ChunkIndex, Manifest};

/// The chunk schedule of one transfer.
#[derive(Debug, Clone)]
pub struct ChunkSchedule {
    /// Per chunk of the manifest.
    chunks: Vec<Chunk>,
    /// Chunks to hand out, in order.
    queue: VecDeque<ChunkIndex>,
    /// Bytes of the chunks the transfer wants, and of those verified.
    total_bytes: u64,
    verified_bytes: u64,
    in_flight: u32,
    max_resets: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    len: u64,
    state: State,
    resets: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not part of this transfer (already held, or outside its range).
    NotWanted,
    Missing,
    InFlight,
    Verified,
}

/// What the schedule makes of a chunk whose stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReset {
    /// Asked for again: it is next in the queue.
    Again,
    /// Reset too often: the attempt should fail (and retry as its policy says).
    GiveUp,
}

/// A report about a chunk the schedule did not hand out, or no longer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The index is not a chunk of the manifest.
    #[error("chunk {0} is not in the manifest")]
    Unknown(u32),
    /// The chunk was not handed out (or was already reported).
    #[error("chunk {0} is not in flight")]
    NotInFlight(u32),
}

impl ChunkSchedule {
    /// A schedule for the chunks of `manifest` listed in `wanted` (ascending or not; those
    /// out of range and repeats are ignored), asked for in that order.
    pub fn new(manifest: &Manifest, wanted: impl IntoIterator<Item = ChunkIndex>) -> Self {
        let mut chunks: Vec<Chunk> = (0..manifest.chunk_count())
            .map(|i| Chunk {
                len: manifest
                    .chunk_range(ChunkIndex(i))
                    .map_or(0, |r| r.end - r.start),
                state: State::NotWanted,
                resets: 0,
            })
            .collect();
        let mut queue = VecDeque::new();
        let mut total_bytes = 0;
        for i in wanted {
            if let Some(c) = chunks.get_mut(i.0 as usize)
                && c.state == State::NotWanted
            {
                c.state = State::Missing;
                total_bytes += c.len;
                queue.push_back(i);
            }
        }
        Self {
            chunks,
            queue,
            total_bytes,
            verified_bytes: 0,
            in_flight: 0,
            max_resets: MAX_RESETS_PER_CHUNK,
        }
    }

    /// The next chunk to ask for, now handed to the caller; `None` when no chunk waits (the
    /// transfer may still have chunks in flight).
    pub fn poll_next(&mut self) -> Option<ChunkIndex> {
        while let Some(i) = self.queue.pop_front() {
            let c = &mut self.chunks[i.0 as usize];
            if c.state == State::Missing {
                c.state = State::InFlight;
                self.in_flight += 1;
                return Some(i);
            }
        }
        None
    }

    /// Chunk `i` arrived whole and matched its hash: it counts. Returns its length.
    pub fn handle_verified(&mut self, i: ChunkIndex) -> Result<u64, ScheduleError> {
        let c = self.in_flight_chunk(i)?;
        c.state = State::Verified;
        let len = c.len;
        self.in_flight -= 1;
        self.verified_bytes += len;
        Ok(len)
    }

    /// Chunk `i`'s stream was reset before it verified.
    pub fn handle_reset(&mut self, i: ChunkIndex) -> Result<AfterReset, ScheduleError> {
        let max = self.max_resets;
        let c = self.in_flight_chunk(i)?;
        c.state = State::Missing;
        c.resets += 1;
        let again = c.resets <= max;
        if !again {
            // Left missing: the next attempt asks for it, afresh.
            c.resets = 0;
        }
        self.in_flight -= 1;
        if again {
            self.queue.push_front(i);
            Ok(AfterReset::Again)
        } else {
            self.queue.push_back(i);
            Ok(AfterReset::GiveUp)
        }
    }

    /// Chunk `i` was under way when its attempt stopped (a failure elsewhere, a renewal):
    /// it stays missing, for the next attempt.
    pub fn handle_abandoned(&mut self, i: ChunkIndex) -> Result<(), ScheduleError> {
        let c = self.in_flight_chunk(i)?;
        c.state = State::Missing;
        self.in_flight -= 1;
        self.queue.push_back(i);
        Ok(())
    }

    /// Every chunk the transfer wants is verified.
    pub fn is_complete(&self) -> bool {
        self.in_flight == 0 && self.missing().next().is_none()
    }

    /// Whether chunk `i` is verified.
    pub fn is_verified(&self, i: ChunkIndex) -> bool {
        self.chunks
            .get(i.0 as usize)
            .is_some_and(|c| c.state == State::Verified)
    }

    /// The chunks still wanted and not verified (in flight ones included), ascending: the
    /// resume set of the next attempt.
    pub fn missing(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.state, State::Missing | State::InFlight))
            .map(|(i, _)| ChunkIndex(i as u32))
    }

    /// Chunks handed out and not yet reported.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Bytes of the chunks verified so far, and of all the transfer wants.
    pub fn progress(&self) -> (u64, u64) {
        (self.verified_bytes, self.total_bytes)
    }

    fn in_flight_chunk(&mut self, i: ChunkIndex) -> Result<&mut Chunk, ScheduleError> {
        let c = self
            .chunks
            .get_mut(i.0 as usize)
            .ok_or(ScheduleError::Unknown(i.0))?;
        if c.state != State::InFlight {
            return Err(ScheduleError::NotInFlight(i.0));
        }
        Ok(c)
    }
}

/// Times a chunk is asked for again after its stream was reset, within one attempt, before
/// the reset fails the attempt: a stream that keeps being reset is a broken path, which the
/// retry policy's backoff should handle, not a tight loop.
pub const MAX_RESETS_PER_CHUNK: u32 = 3;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::ManifestBuilder;

    /// A manifest of `chunks` chunks of 64 KiB (the last shorter by 100 bytes).
    fn manifest(chunks: u32) -> Manifest {
        let chunk = 64 << 10;
        let size = u64::from(chunks) * chunk - 100;
        let data = vec![7u8; size as usize];
        let mut b = ManifestBuilder::new(size, chunk as u32).unwrap();
        b.update(&data).unwrap();
        b.finish().unwrap()
    }

    fn all(m: &Manifest) -> impl Iterator<Item = ChunkIndex> {
        (0..m.chunk_count()).map(ChunkIndex)
    }

    #[test]
    fn every_wanted_chunk_is_handed_out_once_and_counts_once() {
        let m = manifest(5);
        let mut s = ChunkSchedule::new(&m, [1, 3, 4, 3, 9].map(ChunkIndex));
        assert_eq!(s.progress(), (0, 3 * 65536 - 100));
        let mut got = Vec::new();
        while let Some(i) = s.poll_next() {
            got.push(i.0);
        }
        assert_eq!(
            got,
            [1, 3, 4],
            "repeats and out-of-range chunks are ignored"
        );
        assert_eq!(s.in_flight(), 3);
        assert!(!s.is_complete());
        for i in got {
            s.handle_verified(ChunkIndex(i)).unwrap();
        }
        assert!(s.is_complete());
        assert_eq!(s.progress(), (3 * 65536 - 100, 3 * 65536 - 100));
        // Reports about chunks not in flight are refused, and change nothing.
        assert_eq!(
            s.handle_verified(ChunkIndex(1)),
            Err(ScheduleError::NotInFlight(1))
        );
        assert_eq!(
            s.handle_reset(ChunkIndex(0)),
            Err(ScheduleError::NotInFlight(0))
        );
        assert_eq!(
            s.handle_verified(ChunkIndex(99)),
            Err(ScheduleError::Unknown(99))
        );
        assert!(s.is_complete());
    }

    #[test]
    fn a_reset_chunk_is_asked_for_again_first_then_given_up_on() {
        let m = manifest(3);
        let mut s = ChunkSchedule::new(&m, all(&m));
        let first = s.poll_next().unwrap();
        for _ in 0..MAX_RESETS_PER_CHUNK {
            assert_eq!(s.handle_reset(first), Ok(AfterReset::Again));
            assert_eq!(s.poll_next(), Some(first), "a reset chunk goes first");
        }
        assert_eq!(s.handle_reset(first), Ok(AfterReset::GiveUp));
        // Nothing of it counted; it is still missing, for the next attempt.
        assert_eq!(s.progress().0, 0);
        assert!(s.missing().any(|i| i == first));
        assert!(!s.is_verified(first));
    }

    #[test]
    fn abandoned_chunks_stay_missing_for_the_next_attempt() {
        let m = manifest(4);
        let mut s = ChunkSchedule::new(&m, all(&m));
        let a = s.poll_next().unwrap();
        let b = s.poll_next().unwrap();
        s.handle_verified(a).unwrap();
        s.handle_abandoned(b).unwrap();
        let next: Vec<u32> = s.missing().map(|i| i.0).collect();
        assert_eq!(next, [1, 2, 3]);
        // The next attempt starts from what is missing.
        let mut again = ChunkSchedule::new(&m, s.missing());
        assert_eq!(again.poll_next(), Some(ChunkIndex(1)));
        assert_eq!(again.progress().1, 2 * 65536 + 65536 - 100);
    }

    proptest! {
        /// Whatever the workers report, in any order: a chunk is never in flight twice,
        /// verified bytes never exceed what is wanted, and once every wanted chunk has
        /// verified the schedule is complete.
        #[test]
        fn the_schedule_never_double_counts(
            chunks in 1u32..12,
            events in proptest::collection::vec((0u8..3, any::<u8>()), 0..200),
        ) {
            let m = manifest(chunks);
            let mut s = ChunkSchedule::new(&m, all(&m));
            let mut out: Vec<ChunkIndex> = Vec::new();
            for (kind, pick) in events {
                if out.is_empty() || pick % 3 == 0 {
                    if let Some(i) = s.poll_next() {
                        prop_assert!(!out.contains(&i), "chunk {} handed out twice", i.0);
                        out.push(i);
                    }
                    continue;
                }
                let i = out.remove(pick as usize % out.len());
                match kind {
                    0 => { s.handle_verified(i).unwrap(); }
                    1 => { s.handle_reset(i).unwrap(); }
                    _ => s.handle_abandoned(i).unwrap(),
                }
                let (done, total) = s.progress();
                prop_assert!(done <= total);
                prop_assert_eq!(s.in_flight() as usize, out.len());
            }
            for i in out.drain(..) {
                s.handle_verified(i).unwrap();
            }
            while let Some(i) = s.poll_next() {
                s.handle_verified(i).unwrap();
            }
            prop_assert!(s.is_complete());
            prop_assert_eq!(s.progress().0, m.size());
        }
    }
}
