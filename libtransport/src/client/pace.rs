//! When a transfer's workers may start their next chunk: at most `max_rate` payload bytes
//! per second across all of them, and only while their connection is not due for renewal.
//!
//! [`Pacer`] is the arithmetic, pure: each chunk reserves a start time no earlier than the
//! end of the chunk reserved before it, as if the bytes moved at exactly the rate. Idle time
//! earns no credit, so a transfer never bursts above the rate after a pause; one chunk per
//! worker may be on the wire at once, so the rate holds on average over a few chunks, not
//! within one. [`Pace`] is what workers share: it takes instants from the injected clock and
//! sleeps until the reservation starts. [`Gate`] adds the renewal check of one attempt.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::connection::Connection;
use crate::clock::Clock;

/// "Next allowed start" arithmetic for one rate.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    bytes_per_sec: u64,
    /// When the next reservation may start; none before the first.
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `bytes_per_sec` (at least 1).
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: None,
        }
    }

    /// Reserves `bytes` asked for at `now`: returns when they may start. The next
    /// reservation starts no earlier than these bytes take at the rate after that.
    pub(crate) fn reserve(&mut self, now: Instant, bytes: u64) -> Instant {
        let start = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        let spent = transmit_time(bytes, self.bytes_per_sec);
        // Past what an Instant can hold, nothing is going to be sent anyway.
        self.next = Some(start.checked_add(spent).unwrap_or(start));
        start
    }

    /// Gives back a reservation of `bytes` that will not be used (its worker stopped before
    /// sending): reservations from now on may start that much earlier, never before `now`.
    pub(crate) fn refund(&mut self, now: Instant, bytes: u64) {
        if let Some(next) = self.next {
            let back = next
                .checked_sub(transmit_time(bytes, self.bytes_per_sec))
                .unwrap_or(now);
            self.next = Some(back.max(now));
        }
    }
}

/// A transfer's pacing, shared by its workers (and kept across its attempts).
#[derive(Debug)]
pub(crate) struct Pace {
    pacer: Option<Mutex<Pacer>>,
    clock: Arc<dyn Clock>,
}

impl Pace {
    /// Paces at `max_rate` bytes per second; `None` or `Some(0)`: does not pace.
    pub(crate) fn new(max_rate: Option<u64>, clock: Arc<dyn Clock>) -> Self {
        Self {
            pacer: max_rate
                .filter(|r| *r > 0)
                .map(|r| Mutex::new(Pacer::new(r))),
            clock,
        }
    }

    /// Whether a rate is set.
    pub(crate) fn is_paced(&self) -> bool {
        self.pacer.is_some()
    }

    /// Waits until `bytes` may start moving. Dropped before then, it gives their turn back.
    pub(crate) async fn wait(&self, bytes: u64) {
        let Some(pacer) = &self.pacer else { return };
        let now = self.clock.instant();
        let start = lock(pacer).reserve(now, bytes);
        let delay = start.saturating_duration_since(now);
        if delay.is_zero() {
            return;
        }
        let turn = Turn { pace: self, bytes };
        tokio::time::sleep(delay).await;
        std::mem::forget(turn);
    }

    /// Gives back the turn of `bytes` that waited but will not be sent after all.
    pub(crate) fn refund(&self, bytes: u64) {
        if let Some(pacer) = &self.pacer {
            lock(pacer).refund(self.clock.instant(), bytes);
        }
    }
}

/// A turn being waited for; dropped (the wait was abandoned), it is refunded.
struct Turn<'a> {
    pace: &'a Pace,
    bytes: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.pace.refund(self.bytes);
    }
}

fn lock(pacer: &Mutex<Pacer>) -> std::sync::MutexGuard<'_, Pacer> {
    // The pacer is one timestamp, consistent between statements.
    pacer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lets the workers of one attempt of a transfer start their chunks: in turn at the paced
/// rate, and only while the attempt's connection is not due for renewal. Once it is, no
/// worker starts another chunk (chunks in flight finish), and the attempt ends so the
/// transfer can go on over a fresh connection.
#[derive(Debug)]
pub(crate) struct Gate {
    pace: Arc<Pace>,
    conn: Arc<Connection>,
    renewing: watch::Sender<bool>,
}

impl Gate {
    /// A gate for an attempt on `conn`.
    pub(crate) fn new(pace: Arc<Pace>, conn: Arc<Connection>) -> Arc<Self> {
        Arc::new(Self {
            pace,
            conn,
            renewing: watch::Sender::new(false),
        })
    }

    /// Waits for the turn of a chunk of `bytes`. False if the attempt ends for a renewal
    /// instead: the chunk is left for the next attempt.
    pub(crate) async fn admit(&self, bytes: u64) -> bool {
        if self.check_renewal() {
            return false;
        }
        let mut renewing = self.renewing.subscribe();
        tokio::select! {
            () = self.pace.wait(bytes) => {}
            // Another worker found the connection due: stop waiting (the turn goes back).
            _ = renewing.wait_for(|r| *r) => return false,
        }
        if self.check_renewal() {
            self.pace.refund(bytes);
            return false;
        }
        true
    }

    /// Whether the attempt is ending for a renewal.
    pub(crate) fn is_renewing(&self) -> bool {
        *self.renewing.borrow()
    }

    fn check_renewal(&self) -> bool {
        if self.is_renewing() {
            return true;
        }
        if self.conn.is_due_for_renewal() {
            self.renewing.send_replace(true);
            return true;
        }
        false
    }
}

/// How long `bytes` take at `bytes_per_sec` (which is not zero).
fn transmit_time(bytes: u64, bytes_per_sec: u64) -> Duration {
    let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(bytes_per_sec);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunks_are_spaced_at_the_rate_and_idle_time_earns_no_burst() {
        let t0 = SystemClock.instant();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 4 MiB/s: a 1 MiB chunk takes 250 ms.
        let mut p = Pacer::new(4 * MIB);
        assert_eq!(p.reserve(t0, MIB), t0, "the first chunk starts at once");
        // Asked for together (parallel workers), chunks start 250 ms apart.
        assert_eq!(p.reserve(t0, MIB), at(250));
        assert_eq!(p.reserve(t0, MIB), at(500));
        // A worker asking late, after its turn, goes at once.
        assert_eq!(p.reserve(at(900), MIB), at(900));
        // Its successor waits its turn.
        assert_eq!(p.reserve(at(900), MIB / 2), at(1150));
        // After a long pause there is no credit: the next two are spaced again.
        assert_eq!(p.reserve(at(10_000), MIB), at(10_000));
        assert_eq!(p.reserve(at(10_000), MIB), at(10_250));
        // Ten 1 MiB chunks asked for at once span 2.25 s: 10 MiB in 2.5 s of sending.
        let mut p = Pacer::new(4 * MIB);
        let last = (0..10).map(|_| p.reserve(t0, MIB)).last().unwrap();
        assert_eq!(last, at(2_250));
    }

    #[test]
    fn turns_given_back_let_later_chunks_start_earlier_but_never_in_the_past() {
        let t0 = SystemClock.instant();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Pacer::new(4 * MIB);
        // Four workers take turns at 0, 250, 500 and 750 ms; the last two stop waiting at
        // 100 ms: the next chunk goes at 500 ms, right after the two that were sent.
        for _ in 0..4 {
            p.reserve(t0, MIB);
        }
        p.refund(at(100), MIB);
        p.refund(at(100), MIB);
        assert_eq!(p.reserve(at(100), MIB), at(500));
        // Refunds cannot move turns before now: at 2 s, with 750 ms reserved ahead, giving
        // back more than was reserved leaves the next turn at now.
        let mut p = Pacer::new(4 * MIB);
        p.reserve(at(2_000), MIB);
        p.reserve(at(2_000), MIB);
        p.refund(at(2_100), 10 * MIB);
        assert_eq!(p.reserve(at(2_100), MIB), at(2_100));
        // A refund before any reservation is a no-op.
        let mut p = Pacer::new(4 * MIB);
        p.refund(t0, MIB);
        assert_eq!(p.reserve(t0, MIB), t0);
    }

    #[test]
    fn odd_sizes_and_rates_do_not_drift_or_overflow() {
        let t0 = SystemClock.instant();
        let mut p = Pacer::new(3);
        assert_eq!(p.reserve(t0, 1), t0);
        // 1 byte at 3 B/s is 333 333 333 ns; the error stays below a nanosecond per chunk.
        assert_eq!(p.reserve(t0, 1), t0 + Duration::from_nanos(333_333_333));
        // A zero rate is treated as 1 B/s rather than dividing by zero.
        let mut p = Pacer::new(0);
        p.reserve(t0, 2);
        assert_eq!(p.reserve(t0, 0), t0 + Duration::from_secs(2));
        // Enormous chunks do not overflow.
        let mut p = Pacer::new(1);
        p.reserve(t0, u64::MAX);
        p.refund(t0, u64::MAX);
        p.refund(t0, 1);
        let mut p = Pacer::new(1);
        p.reserve(t0, u64::MAX);
        p.reserve(t0, u64::MAX);
    }
}
