//! Credentials that change while they are in use, as the drivers handle them: short-lived
//! SVIDs rotating on both sides during paced transfers cost the transfers nothing, and a
//! client closes its connections to a server it revokes. Over the sim, in virtual time
//! (moved from `tests/credentials.rs`, where the paced transfers took 10 s of real time
//! each; what only real handshakes show stays there).

#![allow(clippy::unwrap_used)] // Helpers fail loudly too.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use certs::SpiffeId;
use certs::test_util::TestPki;
use libtransport::audit::AuditEvent;
use libtransport::clock::Clock;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::sim::{SERVER_ADDR, SimNet};
use libtransport::test_util::{MemoryAudit, TestServer, identity, random_bytes, trace_init};
use libtransport::{
    Client, ClientConfig, Credentials, FetchOptions, IdentityHandle, PushOptions, RetryPolicy,
};

use super::support::{VirtualClock, server};
use super::tuning;

const GRANTS: &[(&str, &str, bool, bool)] = &[("/gpu/loader", "scans", true, true)];
const LOADER: &str = "/gpu/loader";
const STORAGE: &str = "/node/storage";

/// SVIDs that live this long, renewed on both sides every half of it.
const TTL: Duration = Duration::from_secs(4);

/// The rate of the paced transfers: 10 s for their objects, longer than two lifetimes.
const RATE: u64 = 256 << 10;

fn accepted(events: &[AuditEvent], who: &SpiffeId) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::ConnectionAccepted { peer, serial, .. } if peer == who => {
                Some(serial.clone())
            }
            _ => None,
        })
        .collect()
}

/// A server and a client identity on `net` with short-lived SVIDs, both renewed every
/// half-life (of `clock`'s virtual time) until the returned task is aborted.
async fn rotating(
    net: &SimNet,
    pki: &Arc<TestPki>,
    clock: &Arc<VirtualClock>,
) -> (TestServer, IdentityHandle, tokio::task::JoinHandle<()>) {
    let fresh = |path: &str| {
        Credentials::new(pki.svid_issued_at(path, TTL, clock.now()), pki.bundle()).unwrap()
    };
    let server_id = IdentityHandle::new(fresh(STORAGE));
    let client_id = IdentityHandle::new(fresh(LOADER));
    let server =
        TestServer::start_sim_as(pki, server_id.clone(), GRANTS, tuning(), net, clock.clone())
            .await;
    let renewer = tokio::spawn({
        let (pki, client_id, clock) = (pki.clone(), client_id.clone(), clock.clone());
        async move {
            loop {
                tokio::time::sleep(TTL / 2).await;
                for (handle, path) in [(&server_id, STORAGE), (&client_id, LOADER)] {
                    let svid = pki.svid_issued_at(path, TTL, clock.now());
                    handle.update(Credentials::new(svid, pki.bundle()).unwrap());
                }
            }
        }
    });
    (server, client_id, renewer)
}

async fn rotating_client(net: &SimNet, id: IdentityHandle, clock: &Arc<VirtualClock>) -> Client {
    let config = ClientConfig::builder()
        .identity(id.clone())
        .transport(tuning())
        .clock(clock.clone())
        .build();
    Client::connect_with(config, SERVER_ADDR, Arc::new(net.connector(id)))
        .await
        .unwrap_or_else(|e| panic!("seed {}: {e}", net.seed()))
}

/// What a transfer across rotations must show: no failure, it spanned more than two
/// lifetimes, and the client reconnected with more than one SVID, never refused.
fn assert_rotated(net: &SimNet, server: &TestServer, pki: &TestPki, retries: u32, took: Duration) {
    let seed = net.seed();
    assert_eq!(retries, 0, "seed {seed}: rotation counted as a failure");
    assert!(
        took > 2 * TTL,
        "seed {seed}: the transfer took only {took:?}"
    );
    let serials = accepted(&server.audit.events(), &pki.id(LOADER));
    let distinct: HashSet<_> = serials.iter().collect();
    assert!(
        serials.len() > 1 && distinct.len() > 1,
        "seed {seed}: the client never reconnected with a renewed SVID: {serials:?}"
    );
    assert!(net.connections() > 1, "seed {seed}: never reconnected");
    assert!(
        !server
            .audit
            .events()
            .iter()
            .any(|e| matches!(e, AuditEvent::ConnectionRefused { .. })),
        "seed {seed}: a connection was refused: {:?}",
        server.audit.events()
    );
}

#[tokio::test(start_paused = true)]
async fn a_paced_pull_survives_svid_rotation_on_both_sides() {
    let _trace = trace_init();
    let net = SimNet::new(127);
    let pki = Arc::new(TestPki::new("hospital.example"));
    let clock = Arc::new(VirtualClock::new());
    let (server, client_id, renewer) = rotating(&net, &pki, &clock).await;
    let data = random_bytes(10 * RATE as usize + 12_345, 11);
    server.put("scans", "big.bin", &data);
    let client = rotating_client(&net, client_id, &clock).await;
    let opts = FetchOptions {
        parallel: Some(4),
        max_rate: Some(RATE),
        connections: None,
        // Any failure the caller would see fails the pull.
        retry: RetryPolicy::none(),
        ..FetchOptions::default()
    };
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("big.bin");
    let started = tokio::time::Instant::now();
    let report = client
        .fetch_to_file(
            &DatasetName::new("scans").unwrap(),
            &ObjectPath::new("big.bin").unwrap(),
            &dest,
            &opts,
        )
        .await
        .unwrap_or_else(|e| panic!("seed {}: the pull failed across rotations: {e}", net.seed()));
    let took = started.elapsed();
    renewer.abort();
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "seed {}: bytes differ",
        net.seed()
    );
    assert_eq!(
        report.fetched_bytes,
        data.len() as u64,
        "seed {}",
        net.seed()
    );
    assert_rotated(&net, &server, &pki, report.retries, took);
}

#[tokio::test(start_paused = true)]
async fn a_paced_push_survives_svid_rotation_on_both_sides() {
    let _trace = trace_init();
    let net = SimNet::new(131);
    let pki = Arc::new(TestPki::new("hospital.example"));
    let clock = Arc::new(VirtualClock::new());
    let (server, client_id, renewer) = rotating(&net, &pki, &clock).await;
    let data = Bytes::from(random_bytes(10 * RATE as usize + 777, 13));
    let client = rotating_client(&net, client_id, &clock).await;
    let opts = PushOptions {
        parallel: Some(4),
        max_rate: Some(RATE),
        connections: None,
        retry: RetryPolicy::none(),
        ..PushOptions::default()
    };
    let started = tokio::time::Instant::now();
    let report = client
        .push_bytes(
            &DatasetName::new("scans").unwrap(),
            &ObjectPath::new("up.bin").unwrap(),
            data.clone(),
            &opts,
        )
        .await
        .unwrap_or_else(|e| panic!("seed {}: the push failed across rotations: {e}", net.seed()));
    let took = started.elapsed();
    renewer.abort();
    let stored = std::fs::read(server.data_dir().join("scans/up.bin")).unwrap();
    assert!(stored == data, "seed {}: bytes differ", net.seed());
    assert_rotated(&net, &server, &pki, report.retries, took);
}

#[tokio::test(start_paused = true)]
async fn a_client_closes_its_connections_to_a_server_it_revokes() {
    let _trace = trace_init();
    let net = SimNet::new(137);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(&net, &pki, GRANTS, tuning()).await;
    let server_serial = server
        .config
        .identity()
        .current()
        .svid()
        .serial()
        .to_owned();
    server.put("scans", "a.bin", b"scan bytes");
    let (scans, object) = (
        DatasetName::new("scans").unwrap(),
        ObjectPath::new("a.bin").unwrap(),
    );
    let client_id = identity(&pki, LOADER);
    let audit = Arc::new(MemoryAudit::default());
    let mut clients = Vec::new();
    for _ in 0..2 {
        let config = ClientConfig::builder()
            .identity(client_id.clone())
            .transport(tuning())
            .audit(audit.clone())
            .build();
        let c = Client::connect_with(
            config,
            SERVER_ADDR,
            Arc::new(net.connector(client_id.clone())),
        )
        .await
        .unwrap();
        c.stat(&scans, &object).await.unwrap();
        clients.push(c);
    }
    // Each stat was authorized and audited: a request that reaches the server shows.
    let authorized = authorizations(&server);
    assert_eq!(authorized, 2, "{seed}");
    let revoked = Credentials::new(client_id.current().svid().clone(), pki.bundle())
        .unwrap()
        .with_revoked(HashSet::from([server_serial]));
    client_id.update(revoked);
    let closed = |events: &[AuditEvent]| {
        events
            .iter()
            .filter(|e| {
                matches!(e, AuditEvent::ConnectionClosed { peer, reason, .. }
                    if *peer == server.id && reason == "svid revoked")
            })
            .count()
            == 2
    };
    assert!(
        audit.wait_for(closed).await,
        "{seed}: connections to the revoked server left open: {:?}",
        audit.events()
    );
    // A new connection is refused by the client's check of the server's SVID (over the sim
    // after the server has accepted it: there is no TLS handshake to refuse it in; that the
    // handshakes refuse a revoked server is `tests/credentials.rs`), and nothing reaches
    // the revoked server.
    for c in &clients {
        let e = c.stat(&scans, &object).await.unwrap_err();
        assert!(e.to_string().contains("revoked"), "{seed}: {e}");
    }
    assert_eq!(
        authorizations(&server),
        authorized,
        "{seed}: a request reached the revoked server"
    );
}

fn authorizations(server: &TestServer) -> usize {
    server
        .audit
        .events()
        .iter()
        .filter(|e| matches!(e, AuditEvent::Authorization { .. }))
        .count()
}
