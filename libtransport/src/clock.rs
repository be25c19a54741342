//! The one place that reads the operating system's clocks.
//!
//! Everything else takes a [`Clock`] (certificate checks, audit timestamps, transfer
//! durations), so tests can hold time still or move it.

use std::fmt::Debug;
use std::time::{Instant, SystemTime};

/// A source of wall-clock and monotonic time.
pub trait Clock: Debug + Send + Sync {
    /// Wall-clock time, for certificates and audit records.
    fn now(&self) -> SystemTime;
    /// Monotonic time, for durations and timeouts.
    fn instant(&self) -> Instant;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // This is the one place allowed to read the clock.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    #[allow(clippy::disallowed_methods)]
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// Adapts a [`Clock`] to rustls, so certificate validity is judged by the injected time.
#[derive(Debug)]
pub(crate) struct RustlsTime(pub(crate) std::sync::Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            self.0
                .now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        ))
    }
}

/// Seconds from `now` until `then` (negative once `then` has passed), as gauges report
/// time left.
pub fn seconds_until(now: SystemTime, then: SystemTime) -> f64 {
    match then.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    }
}
