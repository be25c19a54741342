//! Who gets a place before and after authentication, without I/O: the budget of handshakes
//! in progress (unauthenticated peers: in all, and per source address) and the cap on one
//! identity's connections (authenticated peers). A place is a ticket that gives itself back
//! when dropped, so a handshake that completes, fails or runs out of time frees its place
//! by ending, whatever way it ends.
//!
//! The server driver (`server.rs`) asks [`Budget::admit`] before any TLS work: a peer over
//! the budget is closed at once, unanswered, and only counted (metrics, and a log line at
//! most every [`ShedLog`] period), never audited one by one, so a sender that is not
//! anyone cannot flood the trail. The handshake deadline is the driver's: it drops the
//! handshake, and with it the ticket, when the deadline passes.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Places for peers, in all and per key (a source address, an identity).
#[derive(Debug)]
pub(crate) struct Budget<K: Hash + Eq + Clone> {
    max_total: usize,
    max_per_key: usize,
    counts: Mutex<Counts<K>>,
}

#[derive(Debug)]
struct Counts<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

/// Why a peer got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// Every place is taken.
    Total,
    /// Every place its key may hold is taken.
    Key,
}

/// A place held; given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket<K: Hash + Eq + Clone> {
    budget: Arc<Budget<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Budget<K> {
    /// At most `max_total` places in all and `max_per_key` per key (each at least 1).
    pub(crate) fn new(max_total: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_key: max_per_key.max(1),
            counts: Mutex::new(Counts {
                total: 0,
                by_key: HashMap::new(),
            }),
        })
    }

    /// A place for `key`, if one is free in all and for it.
    pub(crate) fn admit(self: &Arc<Self>, key: K) -> Result<Ticket<K>, Full> {
        let mut c = self.lock();
        if c.total >= self.max_total {
            return Err(Full::Total);
        }
        let held = c.by_key.entry(key.clone()).or_insert(0);
        if *held >= self.max_per_key {
            return Err(Full::Key);
        }
        *held += 1;
        c.total += 1;
        Ok(Ticket {
            budget: self.clone(),
            key,
        })
    }

    /// Places held now.
    pub(crate) fn held(&self) -> usize {
        self.lock().total
    }

    /// Whether half the places or more are held: the server driver then asks QUIC peers to
    /// prove their address (Retry) before they count, so spoofed sources cannot take places.
    pub(crate) fn under_pressure(&self) -> bool {
        self.held() * 2 >= self.max_total
    }

    fn release(&self, key: &K) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(held) = c.by_key.get_mut(key) {
            *held -= 1;
            if *held == 0 {
                // Keys with no place leave the map: it holds at most `max_total` entries.
                c.by_key.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn held_by(&self, key: &K) -> usize {
        self.lock().by_key.get(key).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, Counts<K>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Hash + Eq + Clone> Drop for Ticket<K> {
    fn drop(&mut self) {
        self.budget.release(&self.key);
    }
}

/// The source a handshake counts against: an IPv4 address (also when mapped into IPv6), or
/// an IPv6 address's /64 prefix, the least a single host is usually given; and whether the
/// peer has shown it receives there. Attempts from unproven addresses (QUIC Initials
/// without a Retry token, which anyone can send with any source address) count apart, so
/// a sender spoofing a host's address cannot use up that host's own share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source {
    prefix: IpAddr,
    proven: bool,
}

impl Source {
    pub(crate) fn of(ip: IpAddr, proven: bool) -> Self {
        let prefix = match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !0u128 << 64).into()),
            },
        };
        Self { prefix, proven }
    }

    /// The address, or its /64 for IPv6.
    pub(crate) fn prefix(&self) -> IpAddr {
        self.prefix
    }
}

/// A log line about shed peers at most once per period, with how many were shed since the
/// last one: the log cannot be flooded either.
#[derive(Debug)]
pub(crate) struct ShedLog {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl ShedLog {
    pub(crate) fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Notes one shed peer at `now`; `Some(n)` when a line is due, `n` the peers shed since
    /// the last line (this one included).
    pub(crate) fn note(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.1 += 1;
        let due =
            s.0.is_none_or(|last| now.saturating_duration_since(last) >= self.period);
        if !due {
            return None;
        }
        let n = s.1;
        *s = (Some(now), 0);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), true)
    }

    #[test]
    fn one_source_holds_no_more_than_its_cap_and_others_still_get_in() {
        let b = Budget::new(10, 3);
        let held: Vec<_> = (0..3).map(|_| b.admit(v4(1)).unwrap()).collect();
        assert_eq!(b.admit(v4(1)).unwrap_err(), Full::Key);
        let other = b.admit(v4(2)).unwrap();
        assert_eq!((b.held(), b.held_by(&v4(1))), (4, 3));
        drop(other);
        drop(held);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn the_total_caps_many_sources_together() {
        let b = Budget::new(4, 3);
        let held: Vec<_> = (0..4).map(|i| b.admit(v4(i)).unwrap()).collect();
        assert_eq!(b.admit(v4(9)).unwrap_err(), Full::Total);
        assert!(b.under_pressure());
        drop(held);
        assert!(b.admit(v4(9)).is_ok());
    }

    #[test]
    fn a_place_comes_back_however_its_holder_ends() {
        let b = Budget::new(2, 1);
        // Completed: the ticket is dropped after the handshake.
        let done = b.admit(v4(1)).unwrap();
        assert_eq!(b.admit(v4(1)).unwrap_err(), Full::Key);
        drop(done);
        // Failed or out of time: the handshake's future, holding the ticket, is dropped.
        let stalled = std::future::ready(b.admit(v4(1)).unwrap());
        assert_eq!(b.admit(v4(1)).unwrap_err(), Full::Key);
        drop(stalled);
        assert_eq!((b.held(), b.held_by(&v4(1))), (0, 0));
        assert!(b.admit(v4(1)).is_ok());
    }

    #[test]
    fn sources_leave_the_map_once_they_hold_nothing() {
        let b = Budget::new(1000, 1);
        for i in 0..=255 {
            drop(b.admit(v4(i)).unwrap());
        }
        assert!(b.lock().by_key.is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_mapped_ipv4_as_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a.into(), true), Source::of(b.into(), true));
        assert_ne!(Source::of(a.into(), true), Source::of(c.into(), true));
        let mapped = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(Source::of(mapped.into(), true), v4(1));
    }

    #[test]
    fn unproven_attempts_from_an_address_do_not_use_up_its_proven_share() {
        let b = Budget::new(10, 2);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let spoofed: Vec<_> = (0..2)
            .map(|_| b.admit(Source::of(ip, false)).unwrap())
            .collect();
        assert_eq!(b.admit(Source::of(ip, false)).unwrap_err(), Full::Key);
        assert!(b.admit(Source::of(ip, true)).is_ok());
        drop(spoofed);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // A starting point, not a measurement.
    fn shed_peers_are_logged_at_most_once_per_period_with_their_count() {
        let log = ShedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1));
        for i in 1..100 {
            assert_eq!(log.note(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(t0 + Duration::from_secs(10)), Some(100));
    }
}
