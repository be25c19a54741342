//! How refusals before authentication reach the audit trail without letting a sender that
//! is not anyone flood it, and without leaving any refusal unrecorded.
//!
//! Refusals are tallied by source (an IPv4 address or IPv6 /64, as the handshake budget
//! counts them), transport and kind. The first of a tally's window is recorded on its own,
//! with its reason in words (`connection_refused`); the others of the window are counted,
//! and one `connections_refused` record carries the count when the window ends or the
//! server stops. A tally whose window ends with nothing counted leaves nothing behind. The
//! number of tallies is bounded: past `MAX_TALLIES` sources at once, further sources
//! share one tally under the unspecified address, so memory stays bounded under a flood of
//! spoofed sources, and the trail grows by at most one record per tally per window.
//!
//! No I/O here: the server driver asks `RefusalTally::note` (or [`RefusalTally::note_key`]) whether to record a refusal,
//! and writes what [`RefusalTally::due`] and [`RefusalTally::drain`] return.
//!
//! The tally is generic over what refusals are kept apart by ([`TallyKey`]), so that other
//! refusals of the same shape use it too: a sidecar tallies the local callers it cannot
//! attest by their uid.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::admission::Source;
use crate::audit::AuditEvent;
use crate::transport::RefusalClass;
use crate::vocab::Path;

/// Sources tallied on their own at once; more share one tally.
pub(crate) const MAX_TALLIES: usize = 4096;

/// What refusals are tallied apart by, and the record of a window's count.
pub trait TallyKey: Copy + Eq + Hash + Debug {
    /// The key that every key past the bound on tallies shares.
    fn shared(self) -> Self;
    /// The record of `count` refusals under this key (besides the one recorded on its own
    /// when the window opened), the first at `first` and the last at `last`.
    fn report(self, count: u64, first: SystemTime, last: SystemTime) -> AuditEvent;
}

/// Refusals tallied by key (before authentication: by source, transport and kind), the
/// first of each window recorded on its own and the rest counted.
#[derive(Debug)]
pub struct RefusalTally<K = Key> {
    window: Duration,
    max_tallies: usize,
    tallies: Mutex<HashMap<K, Tally>>,
}

/// A refusal before authentication's tally: its source, transport and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    source: IpAddr,
    path: Path,
    class: RefusalClass,
}

impl TallyKey for Key {
    fn shared(self) -> Self {
        Self {
            source: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ..self
        }
    }

    fn report(self, count: u64, first: SystemTime, last: SystemTime) -> AuditEvent {
        AuditEvent::ConnectionsRefused {
            source: self.source,
            path: self.path,
            class: self.class.as_str().to_owned(),
            count,
            first,
            last,
        }
    }
}

#[derive(Debug)]
struct Tally {
    opened: Instant,
    counted: u64,
    first: SystemTime,
    last: SystemTime,
}

/// What to do with a refusal just noted.
#[derive(Debug, PartialEq, Eq)]
pub struct Noted {
    /// Record it on its own: it opens its tally's window.
    pub record: bool,
    /// The count of its tally's previous window, ended and not yet reported.
    pub ended: Option<AuditEvent>,
}

impl RefusalTally<Key> {
    /// Notes a refusal before authentication from `source` at `at` (monotonic) / `now`
    /// (wall clock).
    pub(crate) fn note(
        &self,
        source: Source,
        path: Path,
        class: RefusalClass,
        at: Instant,
        now: SystemTime,
    ) -> Noted {
        let key = Key {
            source: source.prefix(),
            path,
            class,
        };
        self.note_key(key, at, now)
    }
}

impl<K: TallyKey> RefusalTally<K> {
    /// Windows of `window` (zero: every refusal is recorded on its own), at most
    /// `max_tallies` keys tallied apart (the rest share [`TallyKey::shared`]).
    pub fn new(window: Duration, max_tallies: usize) -> Self {
        Self {
            window,
            max_tallies: max_tallies.max(1),
            tallies: Mutex::default(),
        }
    }

    /// Notes a refusal under `key` at `at` (monotonic) / `now` (wall clock).
    pub fn note_key(&self, key: K, at: Instant, now: SystemTime) -> Noted {
        if self.window.is_zero() {
            return Noted {
                record: true,
                ended: None,
            };
        }
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = key;
        if !tallies.contains_key(&key) && tallies.len() >= self.max_tallies {
            key = key.shared();
        }
        let mut ended = None;
        if let Some(t) = tallies.get_mut(&key) {
            if at.saturating_duration_since(t.opened) < self.window {
                if t.counted == 0 {
                    t.first = now;
                }
                t.counted += 1;
                t.last = now;
                return Noted {
                    record: false,
                    ended: None,
                };
            }
            ended = tallies.remove(&key).and_then(|t| t.report(key));
        }
        tallies.insert(
            key,
            Tally {
                opened: at,
                counted: 0,
                first: now,
                last: now,
            },
        );
        Noted {
            record: true,
            ended,
        }
    }

    /// Ends the windows that have run their time by `at`: the counts to record.
    pub fn due(&self, at: Instant) -> Vec<AuditEvent> {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        tallies.retain(|key, t| {
            if at.saturating_duration_since(t.opened) < self.window {
                return true;
            }
            out.extend(t.report(*key));
            false
        });
        out
    }

    /// Ends every window (the server is stopping): the counts to record.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        tallies
            .drain()
            .filter_map(|(key, t)| t.report(key))
            .collect()
    }

    /// How long until the earliest window ends, if any is open.
    pub fn next_due(&self, at: Instant) -> Option<Duration> {
        let tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        tallies
            .values()
            .map(|t| {
                self.window
                    .saturating_sub(at.saturating_duration_since(t.opened))
            })
            .min()
    }
}

impl Tally {
    fn report<K: TallyKey>(&self, key: K) -> Option<AuditEvent> {
        (self.counted > 0).then(|| key.report(self.counted, self.first, self.last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap(), false)
    }

    fn count_of(e: &AuditEvent) -> (IpAddr, u64) {
        match e {
            AuditEvent::ConnectionsRefused { source, count, .. } => (*source, *count),
            other => panic!("not a count: {other:?}"),
        }
    }

    #[test]
    fn the_first_of_a_window_is_recorded_and_the_rest_are_counted_once_it_ends() {
        let t = RefusalTally::new(Duration::from_secs(60), 16);
        let t0 = SystemClock.instant();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = src("192.0.2.7");
        let first = t.note(a, Path::Quic, RefusalClass::Tls, t0, wall);
        assert!(first.record && first.ended.is_none());
        for i in 1..=999u64 {
            let n = t.note(
                a,
                Path::Quic,
                RefusalClass::Tls,
                t0 + Duration::from_millis(i * 10),
                wall + Duration::from_millis(i * 10),
            );
            assert!(!n.record, "refusal {i} recorded on its own");
        }
        assert!(t.due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(
            t.next_due(t0 + Duration::from_secs(59)),
            Some(Duration::from_secs(1))
        );
        let due = t.due(t0 + Duration::from_secs(60));
        assert_eq!(due.len(), 1);
        match &due[0] {
            AuditEvent::ConnectionsRefused {
                source,
                path,
                class,
                count,
                first,
                last,
            } => {
                assert_eq!(*source, "192.0.2.7".parse::<IpAddr>().unwrap());
                assert_eq!(*path, Path::Quic);
                assert_eq!(class, "tls");
                assert_eq!(*count, 999);
                assert_eq!(*first, wall + Duration::from_millis(10));
                assert_eq!(*last, wall + Duration::from_millis(9990));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.next_due(t0 + Duration::from_secs(60)), None);
        // A new window opens with a record of its own.
        assert!(
            t.note(
                a,
                Path::Quic,
                RefusalClass::Tls,
                t0 + Duration::from_secs(61),
                wall
            )
            .record
        );
    }

    #[test]
    fn sources_transports_and_kinds_are_tallied_apart_and_ipv6_by_its_64() {
        let t = RefusalTally::new(Duration::from_secs(60), 16);
        let t0 = SystemClock.instant();
        let wall = SystemTime::UNIX_EPOCH;
        for (s, path, class) in [
            ("192.0.2.7", Path::Quic, RefusalClass::Tls),
            ("192.0.2.8", Path::Quic, RefusalClass::Tls),
            ("192.0.2.7", Path::Tcp, RefusalClass::Tls),
            ("192.0.2.7", Path::Quic, RefusalClass::Timeout),
            ("2001:db8::1", Path::Tcp, RefusalClass::Certificate),
        ] {
            assert!(t.note(src(s), path, class, t0, wall).record, "{s}");
        }
        // Another address of the same /64 joins its tally.
        assert!(
            !t.note(
                src("2001:db8::ffff:1"),
                Path::Tcp,
                RefusalClass::Certificate,
                t0,
                wall
            )
            .record
        );
        let drained = t.drain();
        assert_eq!(drained.len(), 1, "only the tally that counted any");
        assert_eq!(
            count_of(&drained[0]),
            ("2001:db8::".parse().unwrap(), 1),
            "IPv6 tallied by its /64"
        );
    }

    #[test]
    fn a_flood_of_spoofed_sources_shares_one_tally_past_the_bound() {
        let t = RefusalTally::new(Duration::from_secs(60), 4);
        let t0 = SystemClock.instant();
        let wall = SystemTime::UNIX_EPOCH;
        let mut recorded = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            if t.note(
                Source::of(ip, false),
                Path::Quic,
                RefusalClass::Tls,
                t0,
                wall,
            )
            .record
            {
                recorded += 1;
            }
        }
        // Four sources of their own and one shared tally: five records on their own.
        assert_eq!(recorded, 5);
        let drained = t.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(count_of(&drained[0]), (Ipv4Addr::UNSPECIFIED.into(), 995));
        assert_eq!(t.tallies.lock().unwrap().len(), 0);
    }

    #[test]
    fn a_window_that_ended_unreported_is_reported_by_the_next_refusal() {
        let t = RefusalTally::new(Duration::from_secs(60), 16);
        let t0 = SystemClock.instant();
        let wall = SystemTime::UNIX_EPOCH;
        let a = src("198.51.100.1");
        t.note(a, Path::Tcp, RefusalClass::Timeout, t0, wall);
        t.note(a, Path::Tcp, RefusalClass::Timeout, t0, wall);
        t.note(a, Path::Tcp, RefusalClass::Timeout, t0, wall);
        let n = t.note(
            a,
            Path::Tcp,
            RefusalClass::Timeout,
            t0 + Duration::from_secs(90),
            wall,
        );
        assert!(n.record);
        assert_eq!(
            count_of(&n.ended.expect("the ended window's count")),
            ("198.51.100.1".parse().unwrap(), 2)
        );
        assert!(t.drain().is_empty(), "the new window counted nothing yet");
    }

    #[test]
    fn a_zero_window_records_every_refusal_on_its_own() {
        let t = RefusalTally::new(Duration::ZERO, 16);
        let t0 = SystemClock.instant();
        for _ in 0..10 {
            let n = t.note(
                src("192.0.2.1"),
                Path::Quic,
                RefusalClass::Tls,
                t0,
                SystemTime::UNIX_EPOCH,
            );
            assert!(n.record && n.ended.is_none());
        }
        assert!(t.drain().is_empty());
        assert_eq!(t.next_due(t0), None);
    }
}
