//! Waiting with a deadline: the one place in netlab that reads the clock.
//!
//! The lab waits on the real world (processes exiting, tcpdump starting), so its deadlines
//! are wall-clock by nature; nothing here is simulated.

use std::time::{Duration, Instant};

/// Calls `done` every `interval` until it returns true or `timeout` has passed; returns
/// whether it did. `done` is always called at least once, and once more at the deadline.
pub(crate) fn poll_until(
    timeout: Duration,
    interval: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    #[allow(clippy::disallowed_methods)] // Lab deadlines are real time (see the module docs).
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= timeout {
            return done();
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_done_or_timeout() {
        let mut calls = 0;
        assert!(poll_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls += 1;
                calls == 3
            }
        ));
        assert_eq!(calls, 3);
        assert!(!poll_until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            || false
        ));
    }
}
