//! The server driver's admission of connection attempts, without sockets and in virtual
//! time: attempts whose handshake never completes hold at most their source's share of the
//! handshake budget, and only until the handshake deadline; the rest are shed at once,
//! counted, and not audited; once half the budget is held, or their source's unproven share
//! is, attempts from unproven addresses are asked to prove them (QUIC's Retry) instead of
//! taking a place.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use libtransport::audit::AuditEvent;
use libtransport::metrics::Metrics;
use libtransport::test_util::sim::SimNet;
use libtransport::test_util::{TestServer, refusals_accounted, trace_init};
use libtransport::transport::{BoxFuture, Handshaken, Incoming, Listener, Path, Refusal};
use libtransport::{AddressValidation, Server, ServerHandle};
use tokio::sync::mpsc;

use super::tuned;

#[tokio::test(start_paused = true)]
async fn stalled_handshakes_hold_their_sources_share_until_the_deadline_and_the_rest_are_shed() {
    let _trace = trace_init();
    let (server, handle, attempts) = start(40, 16, AddressValidation::UnderLoad).await;
    let metrics = server.config.metrics().clone();
    // 100 attempts from one source, then 30 from as many others.
    for _ in 0..100 {
        attempts.send(Attempt::from(source(1), true)).unwrap();
    }
    for i in 0..30 {
        attempts.send(Attempt::from(source(100 + i), true)).unwrap();
    }
    settle(|| shed(&metrics, "per_source") + shed(&metrics, "budget") == 90).await;
    assert_eq!(metric(&metrics, "transportd_handshakes_in_progress"), 40);
    assert_eq!(shed(&metrics, "per_source"), 84, "{}", metrics.encode());
    assert_eq!(shed(&metrics, "budget"), 6, "{}", metrics.encode());
    assert_eq!(refusals(&server), 0, "shed attempts were audited");

    // At the handshake deadline every held place comes back. The first refusal of each
    // source is recorded on its own: source 1's (it held 16) and the 24 others'.
    tokio::time::advance(Duration::from_secs(10)).await;
    settle(|| metric(&metrics, "transportd_handshakes_in_progress") == 0).await;
    assert_eq!(refusals(&server), 25);
    // And the crowded source is let in again.
    attempts.send(Attempt::from(source(1), true)).unwrap();
    settle(|| metric(&metrics, "transportd_handshakes_in_progress") == 1).await;
    // Source 1's other 15 are counted into one record, written at the latest when the
    // server stops: every refusal is accounted for, once.
    handle.shutdown(Duration::ZERO).await;
    let events = server.audit.events();
    assert_eq!(refusals_accounted(&events, Some("timeout")), 40);
    let counted: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::ConnectionsRefused {
                source: s, count, ..
            } => Some((*s, *count)),
            _ => None,
        })
        .collect();
    assert_eq!(counted, [(source(1), 15)]);
}

#[tokio::test(start_paused = true)]
async fn by_default_every_unproven_address_is_asked_to_prove_it_and_takes_no_place() {
    let _trace = trace_init();
    let (server, _handle, attempts) = start(40, 16, AddressValidation::default()).await;
    let metrics = server.config.metrics().clone();
    for i in 0..30 {
        attempts.send(Attempt::from(source(i), false)).unwrap();
    }
    settle(|| metric(&metrics, "transportd_quic_address_retries_total") == 30).await;
    assert_eq!(metric(&metrics, "transportd_handshakes_in_progress"), 0);
    // A proven address gets a place.
    attempts.send(Attempt::from(source(1), true)).unwrap();
    settle(|| metric(&metrics, "transportd_handshakes_in_progress") == 1).await;
    assert_eq!(shed(&metrics, "per_source") + shed(&metrics, "budget"), 0);
}

#[tokio::test(start_paused = true)]
async fn unproven_addresses_are_asked_to_prove_them_once_half_the_budget_is_held() {
    let _trace = trace_init();
    let (server, _handle, attempts) = start(40, 16, AddressValidation::UnderLoad).await;
    let metrics = server.config.metrics().clone();
    for i in 0..30 {
        attempts.send(Attempt::from(source(i), false)).unwrap();
    }
    settle(|| metric(&metrics, "transportd_quic_address_retries_total") == 10).await;
    assert_eq!(metric(&metrics, "transportd_handshakes_in_progress"), 20);
    // A proven address still gets a place while the budget lasts.
    attempts.send(Attempt::from(source(1), true)).unwrap();
    settle(|| metric(&metrics, "transportd_handshakes_in_progress") == 21).await;
    assert_eq!(shed(&metrics, "per_source") + shed(&metrics, "budget"), 0);
}

#[tokio::test(start_paused = true)]
async fn attempts_spoofing_a_hosts_address_do_not_use_up_its_share() {
    let _trace = trace_init();
    let (server, _handle, attempts) = start(40, 16, AddressValidation::UnderLoad).await;
    let metrics = server.config.metrics().clone();
    // 20 unproven attempts with host 1's address: 16 take places, the rest are asked to
    // prove it (never shed, so the host's genuine attempt would be asked too, not refused).
    for _ in 0..20 {
        attempts.send(Attempt::from(source(1), false)).unwrap();
    }
    settle(|| metric(&metrics, "transportd_quic_address_retries_total") == 4).await;
    assert_eq!(metric(&metrics, "transportd_handshakes_in_progress"), 16);
    // Host 1 itself, its address proven, still gets a place.
    attempts.send(Attempt::from(source(1), true)).unwrap();
    settle(|| metric(&metrics, "transportd_handshakes_in_progress") == 17).await;
    assert_eq!(shed(&metrics, "per_source") + shed(&metrics, "budget"), 0);
}

/// A server whose only listener yields the attempts sent on the returned channel.
async fn start(
    max_handshakes: u32,
    per_source: u32,
    validation: AddressValidation,
) -> (TestServer, ServerHandle, mpsc::UnboundedSender<Attempt>) {
    let pki = certs::test_util::TestPki::new("hospital.example");
    let mut t = tuned(64 << 10);
    t.max_handshakes(max_handshakes).expect("budget");
    t.max_handshakes_per_source(per_source).expect("share");
    t.handshake_timeout(Duration::from_secs(10));
    t.address_validation(validation);
    // The test server only lends its configuration (audit trail, metrics, identity).
    let server = TestServer::start_sim(&pki, &[], t, &SimNet::new(1)).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = StalledListener(rx);
    let handle = Server::with_listeners(server.config.clone(), vec![Box::new(listener)]).spawn();
    (server, handle, tx)
}

/// Lets the server's tasks run until `cond` holds, without letting virtual time pass.
async fn settle(cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

fn source(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, i))
}

fn shed(metrics: &Metrics, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("transportd_handshakes_shed_total{{reason=\"{reason}\"}}"),
    )
}

/// A metric's value (a name with its labels names one series). A counter's series that
/// was never touched is not exported yet and reads 0; a gauge is always exported, so a
/// renamed or removed gauge fails here rather than reading as 0.
fn metric(metrics: &Metrics, series: &str) -> u64 {
    let text = metrics.encode();
    let family = series.split('{').next().unwrap_or(series);
    let gauge = !family.ends_with("_total");
    assert!(
        !gauge
            || text.lines().any(|l| l
                .strip_prefix("# TYPE ")
                .is_some_and(|t| t.split(' ').next() == Some(family))),
        "metric {family} is not exported:\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn refusals(server: &TestServer) -> usize {
    server
        .audit
        .events()
        .iter()
        .filter(|e| matches!(e, AuditEvent::ConnectionRefused { reason, .. } if reason.contains("timed out")))
        .count()
}

#[derive(Debug)]
struct StalledListener(mpsc::UnboundedReceiver<Attempt>);

impl Listener for StalledListener {
    fn path(&self) -> Path {
        Path::Quic
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }

    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>> {
        Box::pin(async { Some(Box::new(self.0.recv().await?) as Box<dyn Incoming>) })
    }
}

/// A connection attempt whose handshake never completes.
#[derive(Debug)]
struct Attempt {
    addr: SocketAddr,
    validated: bool,
}

impl Attempt {
    fn from(ip: IpAddr, validated: bool) -> Self {
        Self {
            addr: SocketAddr::new(ip, 40_000),
            validated,
        }
    }
}

impl Incoming for Attempt {
    fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>> {
        Box::pin(std::future::pending())
    }

    fn address_validated(&self) -> bool {
        self.validated
    }
}
