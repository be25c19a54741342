//! Credentials that end while they are in use, over real QUIC and TLS/TCP sockets: a revoked
//! serial is refused at the handshake both ways; a connection whose peer is revoked, or
//! whose peer's SVID expires, is closed promptly, the closure audited and the reconnection
//! refused by the handshake. A connection older than its maximum age (automatic logoff) is
//! retired, by the server or by the client, and transfers on it resume byte-identical on a
//! fresh handshake. SVID rotation during paced transfers and a client closing its
//! connections to a server it revokes are driver logic, tested over the in-memory transport
//! in virtual time (`tests/sim/credentials.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use certs::test_util::TestPki;
use certs::{SpiffeId, SvidError};
use libtransport::audit::{AuditEvent, Outcome};
use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::{TestServer, identity, random_bytes, trace_init};
use libtransport::{
    Client, ClientConfig, ConnectError, Credentials, FetchError, FetchOptions, IdentityHandle,
    Path, Rejection, TransportConfig,
};

const GRANTS: &[(&str, &str, bool, bool)] = &[("/gpu/loader", "scans", true, true)];
const LOADER: &str = "/gpu/loader";

/// 64 KiB chunks, so a few MiB make many chunks and pacing has something to space.
fn small_chunks() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.chunk_bytes(64 << 10).unwrap();
    t.handshake_timeout(Duration::from_secs(10));
    t
}

fn config(id: IdentityHandle) -> ClientConfig {
    ClientConfig::builder()
        .identity(id)
        .transport(small_chunks())
        .build()
}

/// `handle`'s SVID and bundle again, with `revoked` refused from now on.
fn revoking(handle: &IdentityHandle, pki: &TestPki, revoked: &[&str]) -> Credentials {
    Credentials::new(handle.current().svid().clone(), pki.bundle())
        .unwrap()
        .with_revoked(revoked.iter().map(|s| (*s).to_owned()).collect())
}

/// Waits up to `within` for `pred` to hold, polling.
async fn eventually(within: Duration, pred: impl Fn() -> bool) -> bool {
    let polls = within.as_millis() / 20;
    for _ in 0..polls {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pred()
}

/// Bounds a step of a test: it must finish, but no duration is measured.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

fn closed(events: &[AuditEvent], who: &SpiffeId, why: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e, AuditEvent::ConnectionClosed { peer, reason, .. }
                if peer == who && reason == why)
        })
        .count()
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_at_the_handshake_and_the_refusal_audited() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(&pki, GRANTS, small_chunks()).await;
    server.put("scans", "a.bin", b"scan bytes");
    let banned = identity(&pki, LOADER);
    let serial = banned.current().svid().serial().to_owned();
    let server_id = server.config.identity().clone();
    server_id.update(revoking(&server_id, &pki, &[&serial]));

    for path in [Path::Quic, Path::Tcp] {
        let before = server.audit.events().len();
        match Client::connect(config(banned.clone()), server.addr(path), path).await {
            Err(ConnectError::Rejected(Rejection::Revoked)) => {}
            Err(other) => panic!("over {path}: refused for another reason: {other}"),
            Ok(_) => panic!("over {path}: a revoked client connected"),
        }
        let audited = server
            .audit
            .wait_for(|events| {
                events[before..].iter().any(|e| {
                    matches!(e, AuditEvent::ConnectionRefused { path: p, reason, .. }
                        if *p == path && reason.contains("Revoked"))
                })
            })
            .await;
        let events = server.audit.events();
        assert!(
            audited,
            "over {path}: refusal not audited: {:?}",
            &events[before..]
        );
        assert!(
            accepted(&events[before..], &pki.id(LOADER)).is_empty(),
            "over {path}: got past the handshake"
        );
    }
    let metrics = server.config.metrics().encode();
    assert!(
        metrics.contains(r#"reason="revoked""#),
        "refusals not counted as revoked: {metrics}"
    );

    // The control: another SVID of the same workload is served.
    let renewed = identity(&pki, LOADER);
    for path in [Path::Quic, Path::Tcp] {
        let c = Client::connect(config(renewed.clone()), server.addr(path), path)
            .await
            .unwrap();
        let got = c
            .fetch(
                &DatasetName::new("scans").unwrap(),
                &ObjectPath::new("a.bin").unwrap(),
                1 << 20,
                &FetchOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(&got[..], b"scan bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_revoked_server() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(&pki, GRANTS, small_chunks()).await;
    let server_serial = server
        .config
        .identity()
        .current()
        .svid()
        .serial()
        .to_owned();
    let client_id = identity(&pki, LOADER);
    client_id.update(revoking(&client_id, &pki, &[&server_serial]));
    for path in [Path::Quic, Path::Tcp] {
        match Client::connect(config(client_id.clone()), server.addr(path), path).await {
            Err(ConnectError::ServerNotTrusted(SvidError::Revoked { serial })) => {
                assert_eq!(serial, server_serial);
            }
            Err(other) => panic!("over {path}: refused for another reason: {other}"),
            Ok(_) => panic!("over {path}: trusted a revoked server"),
        }
    }
    assert!(
        !server
            .audit
            .events()
            .iter()
            .any(|e| matches!(e, AuditEvent::Authorization { .. })),
        "a request reached the revoked server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_revoked_while_pulling_is_cut_off_and_the_closure_audited() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(&pki, GRANTS, small_chunks()).await;
    let size = 4 << 20;
    let data = random_bytes(size, 7);
    server.put("scans", "big.bin", &data);
    let scans = DatasetName::new("scans").unwrap();
    let big = ObjectPath::new("big.bin").unwrap();
    let out = tempfile::tempdir().unwrap();
    let server_id = server.config.identity().clone();
    let loader = pki.id(LOADER);

    for path in [Path::Quic, Path::Tcp] {
        let client_id = identity(&pki, LOADER);
        let serial = client_id.current().svid().serial().to_owned();
        let client = Arc::new(
            Client::connect(config(client_id), server.addr(path), path)
                .await
                .unwrap(),
        );
        let seen = Arc::new(AtomicU64::new(0));
        let opts = FetchOptions {
            parallel: Some(4),
            // About 16 s for the whole object: the revocation lands mid-pull.
            max_rate: Some(256 << 10),
            // One connection, whose closure the trail must show once.
            connections: Some(1),
            progress: Some({
                let seen = seen.clone();
                Arc::new(move |done, _| {
                    seen.fetch_max(done, Ordering::Relaxed);
                })
            }),
            ..FetchOptions::default()
        };
        let dest = out.path().join(format!("{path}.bin"));
        let pull = tokio::spawn({
            let (client, scans, big, dest) =
                (client.clone(), scans.clone(), big.clone(), dest.clone());
            async move { client.fetch_to_file(&scans, &big, &dest, &opts).await }
        });
        assert!(
            eventually(Duration::from_secs(20), || seen.load(Ordering::Relaxed) > 0).await,
            "over {path}: the pull never started"
        );
        let before = server.audit.events().len();
        server_id.update(revoking(&server_id, &pki, &[&serial]));

        // Cut off well before the pull could finish (or an I/O timeout could pass), and
        // refused when it reconnects.
        let result = within(Duration::from_secs(15), "the revoked pull", pull)
            .await
            .unwrap();
        match result {
            Err(FetchError::Connect(ConnectError::Rejected(Rejection::Revoked))) => {}
            Err(other) => panic!("over {path}: ended for another reason: {other}"),
            Ok(_) => panic!("over {path}: a revoked client pulled the whole object"),
        }
        let events = server.audit.events();
        let new = &events[before..];
        assert_eq!(
            closed(new, &loader, "svid revoked"),
            1,
            "over {path}: {new:?}"
        );
        let interrupted: Vec<u64> = new
            .iter()
            .filter_map(|e| match e {
                AuditEvent::Transfer {
                    outcome: Outcome::Interrupted,
                    bytes,
                    ..
                } => Some(*bytes),
                _ => None,
            })
            .collect();
        assert_eq!(interrupted.len(), 1, "over {path}: {new:?}");
        assert!(
            interrupted[0] < size as u64,
            "over {path}: everything was sent"
        );
        assert!(
            accepted(new, &loader).is_empty(),
            "over {path}: reconnected"
        );
        assert!(
            !new.iter()
                .any(|e| matches!(e, AuditEvent::Authorization { .. })),
            "over {path}: served a request after the revocation: {new:?}"
        );
        assert!(seen.load(Ordering::Relaxed) < size as u64);
        assert!(
            !dest.exists(),
            "over {path}: a partial object became visible"
        );
        // Lift the ban for the next path.
        server_id.update(revoking(&server_id, &pki, &[]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_when_the_clients_svid_expires() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(&pki, GRANTS, small_chunks()).await;
    let short = Duration::from_secs(5);
    let client_id = IdentityHandle::new(
        Credentials::new(
            pki.svid_issued_at(LOADER, short, SystemClock.now()),
            pki.bundle(),
        )
        .unwrap(),
    );
    let mut clients = Vec::new();
    for path in [Path::Quic, Path::Tcp] {
        let c = Client::connect(config(client_id.clone()), server.addr(path), path)
            .await
            .unwrap();
        c.list_datasets().await.unwrap();
        clients.push(c);
    }
    // Nobody renews it: each connection is closed soon after the SVID's expiry, without
    // waiting for a request, and no new one is accepted with it.
    let loader = pki.id(LOADER);
    assert!(
        eventually(Duration::from_secs(20), || {
            closed(&server.audit.events(), &loader, "svid expired") == 2
        })
        .await,
        "expired connections left open: {:?}",
        server.audit.events()
    );
    // Nothing more is served; once the client has seen the close, reconnecting is refused
    // for the expired SVID.
    for c in &clients {
        let mut refused = false;
        for _ in 0..50 {
            let e = c.list_datasets().await.unwrap_err();
            // The handshake refusal, not the close that preceded it.
            if e.to_string()
                .contains("refused us: our certificate has expired")
            {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused, "reconnecting was not refused for the expired SVID");
    }
    assert_eq!(accepted(&server.audit.events(), &loader).len(), 2);
}

/// [`small_chunks`], with connections retired at `age` and 1 s for requests in flight.
fn aging(age: Duration) -> TransportConfig {
    let mut t = small_chunks();
    t.max_connection_age(age).unwrap();
    t.connection_age_grace(Duration::from_secs(1));
    t
}

/// Paced to about 1 s for 1 MiB, over one connection and 4 streams.
fn slow() -> FetchOptions {
    FetchOptions {
        parallel: Some(4),
        max_rate: Some(1 << 20),
        connections: Some(1),
        ..FetchOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_maximum_age_is_closed_and_its_transfers_resume_byte_identical() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    // The server retires connections after half a second; the client would keep them for
    // an hour (the default), so every retirement seen is the server's.
    let server = TestServer::start_with(&pki, GRANTS, aging(Duration::from_millis(500))).await;
    let size = 1 << 20;
    let pulled = random_bytes(size, 11);
    server.put("scans", "big.bin", &pulled);
    let scans = DatasetName::new("scans").unwrap();
    let big = ObjectPath::new("big.bin").unwrap();
    let out = tempfile::tempdir().unwrap();
    let loader = pki.id(LOADER);

    for (i, path) in [Path::Quic, Path::Tcp].into_iter().enumerate() {
        let client = Client::connect(config(identity(&pki, LOADER)), server.addr(path), path)
            .await
            .unwrap();
        // A pull, paced over about two maximum ages.
        let before = server.audit.events().len();
        let dest = out.path().join(format!("{path}.bin"));
        let report = within(
            Duration::from_secs(30),
            "the pull",
            client.fetch_to_file(&scans, &big, &dest, &slow()),
        )
        .await
        .unwrap();
        assert_eq!(
            blake3::hash(&std::fs::read(&dest).unwrap()),
            blake3::hash(&pulled),
            "over {path}: the pulled object differs"
        );
        assert_eq!(
            report.retries, 0,
            "over {path}: a retirement counted as a failure"
        );
        let aged = server
            .audit
            .wait_for(|e| closed(&e[before..], &loader, "max age") >= 1)
            .await;
        let new = &server.audit.events()[before..];
        assert!(aged, "over {path}: no connection retired for age: {new:?}");
        assert!(
            !accepted(new, &loader).is_empty(),
            "over {path}: the pull did not go on over a new connection: {new:?}"
        );

        // A push, the same way.
        let pushed = random_bytes(size, 12 + i as u64);
        let src = out.path().join(format!("{path}-up.bin"));
        std::fs::write(&src, &pushed).unwrap();
        let up = ObjectPath::new(&format!("up-{path}.bin")).unwrap();
        let before = server.audit.events().len();
        let report = within(
            Duration::from_secs(30),
            "the push",
            client.push_file(&scans, &up, &src, &slow()),
        )
        .await
        .unwrap();
        assert_eq!(
            report.retries, 0,
            "over {path}: a retirement counted as a failure"
        );
        let stored = std::fs::read(server.data_dir().join("scans").join(up.as_str())).unwrap();
        assert_eq!(
            blake3::hash(&stored),
            blake3::hash(&pushed),
            "over {path}: the pushed object differs"
        );
        let aged = server
            .audit
            .wait_for(|e| closed(&e[before..], &loader, "max age") >= 1)
            .await;
        let new = &server.audit.events()[before..];
        assert!(aged, "over {path}: no connection retired for age: {new:?}");
        assert!(
            !accepted(new, &loader).is_empty(),
            "over {path}: the push did not go on over a new connection: {new:?}"
        );
    }
    // Each transfer saw a retirement of its own, each counted.
    let retired = closed(&server.audit.events(), &loader, "max age");
    assert!(retired >= 4, "{retired} retirements");
    let metrics = server.config.metrics().encode();
    let aged_out: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("transportd_connections_aged_out_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(aged_out >= retired, "retirements not counted: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_renews_its_connections_at_its_own_maximum_age() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    // The server keeps connections for an hour (the default); the client renews its own
    // after a quarter of a second.
    let server = TestServer::start_with(&pki, GRANTS, small_chunks()).await;
    let size = 1 << 20;
    let data = random_bytes(size, 21);
    server.put("scans", "big.bin", &data);
    let client_config = ClientConfig::builder()
        .identity(identity(&pki, LOADER))
        .transport(aging(Duration::from_millis(250)))
        .build();
    let client = Client::connect(client_config, server.addr(Path::Tcp), Path::Tcp)
        .await
        .unwrap();
    let got = within(
        Duration::from_secs(30),
        "the pull",
        client.fetch(
            &DatasetName::new("scans").unwrap(),
            &ObjectPath::new("big.bin").unwrap(),
            size as u64,
            &slow(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(blake3::hash(&got), blake3::hash(&data));
    let events = server.audit.events();
    let loader = pki.id(LOADER);
    assert!(
        accepted(&events, &loader).len() >= 3,
        "the client kept a connection past its maximum age: {events:?}"
    );
    assert_eq!(closed(&events, &loader, "max age"), 0, "{events:?}");
}
