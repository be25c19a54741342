//! When to try again: the one retry and backoff policy of the crate, without I/O.
//!
//! A transfer runs in attempts. After an attempt that did not complete, [`Attempts::next`]
//! decides, from what happened and how far the transfer has got, whether to go on at once
//! (the connection was renewed for an SVID rotation), to retry after a delay, or to give
//! up. Reconnecting loops that are not transfers (the CLI's first connect, the Workload API
//! stream) use [`Backoff`], the same doubling delay with a cap. Nothing here sleeps: the
//! caller waits for the delay it is handed, so tests drive it with virtual time.

use std::time::Duration;

/// How often and how patiently a transfer reconnects after a network failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Reconnect attempts after the first failure (0: fail at once).
    pub attempts: u32,
    /// Wait before the first attempt; doubles each time, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        Self {
            attempts: 0,
            backoff: Duration::ZERO,
        }
    }

    /// `attempts` retries with the default backoff.
    pub fn with_attempts(attempts: u32) -> Self {
        Self {
            attempts,
            ..Self::default()
        }
    }

    /// How long to wait before reconnect attempt `attempt` (from 0).
    pub fn delay(&self, attempt: u32) -> Duration {
        doubled(self.backoff, attempt, MAX_BACKOFF)
    }
}

/// What a transfer does after an attempt that did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on at once, on a fresh connection; no failure is counted.
    Renew,
    /// Retry after this delay; a failure is counted.
    Retry(Duration),
    /// Stop and report the error.
    GiveUp,
}

/// How an attempt that did not complete ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// It stopped between chunks because its connection became due for renewal.
    Renewal,
    /// It failed. `retriable`: the error may pass (a network failure, a busy server);
    /// `connection_retired`: its connection had ended, or was ending, for a reason a fresh
    /// connection cures (an SVID on it ended or was about to, or the server retired it at
    /// its maximum age), which makes a retriable failure a renewal.
    Failed {
        /// Whether the error may pass.
        retriable: bool,
        /// Whether the connection ended (or was ending) for a reason a fresh one cures.
        connection_retired: bool,
    },
}

/// Counts a transfer's attempts. Failures count against its [`RetryPolicy`]; attempts that
/// ended because an SVID on their connection ended (or was about to), or because the
/// server retired the connection at its maximum age, do not, as long as
/// the transfer makes progress between them (so a connection that keeps failing that way
/// still runs out of attempts).
#[derive(Debug, Clone)]
pub struct Attempts {
    policy: RetryPolicy,
    failures: u32,
    /// Renewals since the last progress.
    stalled: u32,
    /// Progress (bytes moved) at the last attempt.
    progress: u64,
}

impl Attempts {
    /// No attempt made yet.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            stalled: 0,
            progress: 0,
        }
    }

    /// Failures so far (what a report calls retries).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Decides after an attempt that ended as `end`, with `progress` bytes of the transfer
    /// moved so far (across all attempts).
    pub fn next(&mut self, end: AttemptEnd, progress: u64) -> Next {
        let (renewal, retriable) = match end {
            AttemptEnd::Renewal => (true, true),
            AttemptEnd::Failed {
                retriable,
                connection_retired,
            } => (retriable && connection_retired, retriable),
        };
        if progress > self.progress {
            self.progress = progress;
            self.stalled = 0;
        }
        if renewal && self.stalled < MAX_STALLED_RENEWALS {
            self.stalled += 1;
            return Next::Renew;
        }
        if retriable && self.failures < self.policy.attempts {
            let delay = self.policy.delay(self.failures);
            self.failures += 1;
            return Next::Retry(delay);
        }
        Next::GiveUp
    }
}

/// A doubling delay with a cap, for loops that reconnect for as long as they run.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `first`, doubling after each failure up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt, counting a failure.
    pub fn fail(&mut self) -> Duration {
        let delay = doubled(self.first, self.failures, self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The wait [`Self::fail`] would hand out next, without counting.
    pub fn peek(&self) -> Duration {
        doubled(self.first, self.failures, self.max)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

fn doubled(first: Duration, times: u32, max: Duration) -> Duration {
    first.saturating_mul(1 << times.min(16)).min(max)
}

/// Renewals in a row, without progress in between, after which a transfer counts them as
/// failures: connections that end before a chunk gets through are not a rotation.
pub const MAX_STALLED_RENEWALS: u32 = 3;

/// Longest wait between a transfer's reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED: AttemptEnd = AttemptEnd::Failed {
        retriable: true,
        connection_retired: false,
    };

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 30,
            backoff: Duration::from_millis(500),
        };
        assert_eq!(p.delay(0), Duration::from_millis(500));
        assert_eq!(p.delay(1), Duration::from_secs(1));
        assert_eq!(p.delay(3), Duration::from_secs(4));
        assert_eq!(p.delay(6), MAX_BACKOFF);
        assert_eq!(p.delay(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn retriable_failures_run_out_and_others_give_up_at_once() {
        let mut a = Attempts::new(RetryPolicy::with_attempts(2));
        assert_eq!(a.next(FAILED, 0), Next::Retry(Duration::from_millis(500)));
        assert_eq!(a.next(FAILED, 0), Next::Retry(Duration::from_secs(1)));
        assert_eq!(a.next(FAILED, 0), Next::GiveUp);
        assert_eq!(a.failures(), 2);

        let mut a = Attempts::new(RetryPolicy::with_attempts(5));
        let fatal = AttemptEnd::Failed {
            retriable: false,
            connection_retired: true,
        };
        assert_eq!(a.next(fatal, 0), Next::GiveUp);
        assert_eq!(a.failures(), 0);
    }

    #[test]
    fn renewals_are_free_while_the_transfer_progresses() {
        let mut a = Attempts::new(RetryPolicy::none());
        for progress in 1..=10 {
            assert_eq!(a.next(AttemptEnd::Renewal, progress), Next::Renew);
        }
        assert_eq!(a.failures(), 0);
        // A failure on a connection whose credentials ended counts as a renewal too.
        let ended = AttemptEnd::Failed {
            retriable: true,
            connection_retired: true,
        };
        assert_eq!(a.next(ended, 11), Next::Renew);
    }

    #[test]
    fn renewals_without_progress_become_failures() {
        let mut a = Attempts::new(RetryPolicy::with_attempts(1));
        for _ in 0..MAX_STALLED_RENEWALS {
            assert_eq!(a.next(AttemptEnd::Renewal, 0), Next::Renew);
        }
        assert_eq!(
            a.next(AttemptEnd::Renewal, 0),
            Next::Retry(Duration::from_millis(500))
        );
        assert_eq!(a.next(AttemptEnd::Renewal, 0), Next::GiveUp);
        // Progress makes renewals free again.
        let mut a = Attempts::new(RetryPolicy::none());
        for _ in 0..MAX_STALLED_RENEWALS {
            a.next(AttemptEnd::Renewal, 0);
        }
        assert_eq!(a.next(AttemptEnd::Renewal, 1), Next::Renew);
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.peek(), Duration::from_millis(100));
        assert_eq!(b.fail(), Duration::from_millis(100));
        assert_eq!(b.fail(), Duration::from_millis(200));
        assert_eq!(b.fail(), Duration::from_millis(400));
        assert_eq!(b.fail(), Duration::from_millis(800));
        assert_eq!(b.fail(), Duration::from_secs(1));
        assert_eq!(b.fail(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.fail(), Duration::from_millis(100));
    }
}
