//! When to renew an SVID, and the lifetime rules renewal depends on. Pure functions of the
//! SVID's validity, the time now and a jitter the caller draws, so the schedule is
//! testable without a clock.
//!
//! An SVID is renewed at about half its lifetime (as SPIRE does), moved by up to
//! [`RENEWAL_JITTER`] of the lifetime either way so that nodes issued together do not all
//! come back at once; a renewal that fails is retried after [`retry_in`], well before
//! expiry.

use std::time::{Duration, SystemTime};

/// The time to renew an SVID valid from `not_before` to `not_after`. `jitter` is drawn by
/// the caller from `[-1, 1]` (values outside are clamped): 0 renews at exactly half-life.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let half = life / 2;
    let shift = life.mul_f64(RENEWAL_JITTER * jitter.clamp(-1.0, 1.0).abs());
    if jitter < 0.0 {
        not_before + half.saturating_sub(shift)
    } else {
        not_before + half + shift
    }
}

/// How long to wait before trying again after a renewal failed at `now`: a tenth of the
/// time left, between one second and a minute, so a short-lived SVID gets many tries.
pub fn retry_in(not_after: SystemTime, now: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Checks an SVID lifetime against the CA lifetime: like SPIRE, an SVID may live at most a
/// sixth of its CA, so that a CA has room to be rolled over while SVIDs it signed are out.
pub fn check_svid_ttl(svid_ttl: Duration, ca_ttl: Duration) -> Result<(), TtlError> {
    if svid_ttl.is_zero() {
        return Err(TtlError::Zero);
    }
    let max = ca_ttl / MIN_CA_TO_SVID_RATIO;
    if svid_ttl > max {
        return Err(TtlError::TooLong {
            svid_ttl,
            ca_ttl,
            max,
        });
    }
    Ok(())
}

/// Why [`check_svid_ttl`] refused an SVID lifetime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    /// The SVID TTL is zero.
    #[error("the SVID TTL must be more than zero")]
    Zero,
    /// The SVID TTL is more than the CA TTL divided by [`MIN_CA_TO_SVID_RATIO`].
    #[error(
        "SVID TTL {} is more than the CA TTL {} divided by {MIN_CA_TO_SVID_RATIO} ({}): \
         shorten the SVID TTL or lengthen the CA TTL",
        humantime::format_duration(*.svid_ttl),
        humantime::format_duration(*.ca_ttl),
        humantime::format_duration(Duration::from_secs(.max.as_secs())),
    )]
    TooLong {
        /// The SVID TTL asked for.
        svid_ttl: Duration,
        /// The CA TTL it was checked against.
        ca_ttl: Duration,
        /// The longest SVID TTL that CA TTL allows.
        max: Duration,
    },
}

/// How far renewal may move from half-life, as a fraction of the lifetime.
pub const RENEWAL_JITTER: f64 = 0.1;

/// A CA lives at least this many times as long as the SVIDs it signs.
pub const MIN_CA_TO_SVID_RATIO: u32 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_at_half_life_within_the_jitter() {
        assert_eq!(renew_at(t(1000), t(4600), 0.0), t(2800));
        assert_eq!(renew_at(t(1000), t(4600), 1.0), t(2800 + 360));
        assert_eq!(renew_at(t(1000), t(4600), -1.0), t(2800 - 360));
        assert_eq!(renew_at(t(1000), t(4600), 7.0), t(2800 + 360), "clamped");
        for j in [-1.0, -0.5, 0.0, 0.3, 1.0] {
            let at = renew_at(t(0), t(20), j);
            assert!(at >= t(8) && at <= t(12), "{j}: {at:?}");
        }
    }

    #[test]
    fn a_broken_validity_renews_at_once() {
        assert_eq!(renew_at(t(10), t(5), 0.5), t(10));
    }

    #[test]
    fn retries_come_sooner_as_expiry_nears() {
        assert_eq!(retry_in(t(3600), t(0)), Duration::from_secs(60));
        assert_eq!(retry_in(t(100), t(0)), Duration::from_secs(10));
        assert_eq!(retry_in(t(100), t(99)), Duration::from_secs(1));
        assert_eq!(retry_in(t(100), t(200)), Duration::from_secs(1));
    }

    #[test]
    fn svid_ttl_is_at_most_a_sixth_of_the_ca_ttl() {
        let day = Duration::from_secs(86_400);
        assert!(check_svid_ttl(Duration::from_secs(4 * 3600), day).is_ok());
        let e = check_svid_ttl(Duration::from_secs(4 * 3600 + 1), day).unwrap_err();
        assert_eq!(
            e,
            TtlError::TooLong {
                svid_ttl: Duration::from_secs(4 * 3600 + 1),
                ca_ttl: day,
                max: Duration::from_secs(4 * 3600),
            }
        );
        assert_eq!(
            e.to_string(),
            "SVID TTL 4h 1s is more than the CA TTL 1day divided by 6 (4h): \
             shorten the SVID TTL or lengthen the CA TTL"
        );
        assert_eq!(check_svid_ttl(Duration::ZERO, day), Err(TtlError::Zero));
    }
}
