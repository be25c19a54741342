//! A cap on manifests computed at once. Computing a manifest reads and hashes the whole
//! object, so a peer that asks for the manifests of many large objects nobody has hashed
//! yet (a flood of `stat`s) would otherwise have the node read them all at once, on as many
//! blocking threads as there are requests. Builds past the cap wait their turn (on the
//! blocking thread that asked: builds run on tokio's blocking pool, never on its workers),
//! and a build that waited looks in the cache again first, so many requests for one object
//! hash it once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

/// Manifests computed at once by default: enough to keep a disk and two cores busy.
pub const DEFAULT_MAX_MANIFEST_BUILDS: usize = 4;

/// Counting gate for manifest builds.
#[derive(Debug)]
pub(super) struct BuildGate {
    max: usize,
    state: Mutex<Counts>,
    freed: Condvar,
    /// Builds that had to wait for a place, ever.
    waited: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    running: usize,
    waiting: usize,
    #[cfg(test)]
    peak: usize,
}

/// A place to build in; given back when dropped.
#[derive(Debug)]
pub(super) struct BuildPlace<'a>(&'a BuildGate);

impl BuildGate {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            state: Mutex::default(),
            freed: Condvar::new(),
            waited: AtomicU64::new(0),
        }
    }

    /// Waits (blocking this thread) for a place, and whether it had to wait.
    pub(super) fn enter(&self) -> (BuildPlace<'_>, bool) {
        let mut s = self.lock();
        let waited = s.running >= self.max;
        if waited {
            self.waited.fetch_add(1, Ordering::Relaxed);
            s.waiting += 1;
            while s.running >= self.max {
                s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.waiting -= 1;
        }
        s.running += 1;
        #[cfg(test)]
        {
            s.peak = s.peak.max(s.running);
        }
        (BuildPlace(self), waited)
    }

    /// Builds running now, builds waiting now, and builds that ever waited.
    pub(super) fn snapshot(&self) -> (usize, usize, u64) {
        let s = self.lock();
        (s.running, s.waiting, self.waited.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    pub(super) fn peak(&self) -> usize {
        self.lock().peak
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for BuildPlace<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.running -= 1;
        drop(s);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn no_more_than_the_cap_build_at_once_and_every_build_runs() {
        let gate = Arc::new(BuildGate::new(2));
        let done = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (gate, done) = (gate.clone(), done.clone());
                std::thread::spawn(move || {
                    let (_place, _) = gate.enter();
                    // Hold the place long enough for the others to pile up behind it.
                    std::thread::yield_now();
                    let mut x = 0u64;
                    for i in 0..200_000u64 {
                        x = x.wrapping_add(i * i);
                    }
                    std::hint::black_box(x);
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(done.load(Ordering::Relaxed), 12);
        assert!(gate.peak() <= 2, "{} builds at once", gate.peak());
        assert_eq!(gate.snapshot().0, 0, "a place was not given back");
        assert_eq!(gate.snapshot().1, 0);
    }

    #[test]
    fn a_gate_of_one_lets_one_through_and_the_next_after_it() {
        let gate = BuildGate::new(1);
        let (first, waited) = gate.enter();
        assert!(!waited);
        assert_eq!(gate.snapshot().0, 1);
        std::thread::scope(|s| {
            let second = s.spawn(|| gate.enter().1);
            // The second waits while the first holds the place.
            while gate.snapshot().1 == 0 {
                std::thread::yield_now();
            }
            assert_eq!(gate.snapshot().0, 1);
            drop(first);
            assert!(second.join().unwrap(), "the second build did not wait");
        });
        assert_eq!(gate.snapshot(), (0, 0, 1));
    }
}
