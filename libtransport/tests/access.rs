//! What only the real transports show of the server's limits and metrics: a node at its
//! connection limit answers Busy over QUIC (a refused connection attempt) and TLS/TCP (a Busy
//! answer after the handshake), one identity at its own limit is answered Busy after the
//! handshake on both, and the metrics count transfers per transport and handshake
//! failures. Default deny, path confinement, corrupt objects and an unwritable audit trail
//! are tested over the in-memory transport (`tests/sim/access.rs`, `tests/sim/store.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use certs::test_util::TestPki;
use libtransport::audit::AuditEvent;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::{TestServer, client_config, random_bytes, trace_init};
use libtransport::{Client, FetchOptions, Path, TransportConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_after_a_transfer_a_denial_and_a_refusal() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start(&pki, &[("/gpu/loader", "scans", true, false)]).await;
    server.put("scans", "a.bin", &random_bytes(100_000, 1));
    let metrics = server.config.metrics().clone();
    let before = metrics.encode();
    assert!(!before.contains("transportd_bytes_total{"), "{before}");
    let client = Client::connect(
        client_config(&pki, "/gpu/loader"),
        server.addr(Path::Quic),
        Path::Quic,
    )
    .await
    .unwrap();
    let scans = DatasetName::new("scans").unwrap();
    client
        .fetch(
            &scans,
            &ObjectPath::new("a.bin").unwrap(),
            1 << 20,
            &FetchOptions::default(),
        )
        .await
        .unwrap();
    let _ = client
        .stat(
            &DatasetName::new("secret").unwrap(),
            &ObjectPath::new("x").unwrap(),
        )
        .await;
    let other = TestPki::new("hospital.example");
    // A client whose SVID another CA signed (it trusts our CA, so the server refuses it).
    let rogue = libtransport::test_util::identity_of(other.svid("/gpu/rogue"), pki.bundle());
    let _ = Client::connect(
        libtransport::ClientConfig::builder()
            .identity(rogue)
            .build(),
        server.addr(Path::Tcp),
        Path::Tcp,
    )
    .await;
    server
        .audit
        .wait_for(|e| {
            e.iter()
                .any(|e| matches!(e, AuditEvent::ConnectionRefused { .. }))
        })
        .await;
    let text = metrics.encode();
    assert!(
        text.contains(r#"transportd_bytes_total{path="quic",direction="out"} 100000"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"transportd_transfers_total{path="quic",direction="out",outcome="complete"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"transportd_authorization_denials_total{action="read",reason="no_rule"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"transportd_handshake_failures_total{reason="certificate"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"transportd_connections_active{path="quic"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_connection_limit_says_busy_and_serves_again_later() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let mut t = TransportConfig::default();
    t.max_connections(1).unwrap();
    let server = TestServer::start_with(&pki, &[("/gpu/loader", "scans", true, false)], t).await;
    server.put("scans", "a.bin", b"scan bytes");
    for path in [Path::Quic, Path::Tcp] {
        let first = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        let second =
            Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path).await;
        let e = second.expect_err("a second connection past the limit was accepted");
        assert!(matches!(e, libtransport::ConnectError::Busy), "{path}: {e}");
        assert!(e.is_retriable());
        // Once the first goes, the slot frees and the next client is served.
        first.close();
        drop(first);
        let mut served = None;
        for _ in 0..50 {
            match Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path).await
            {
                Ok(c) => {
                    served = Some(c);
                    break;
                }
                Err(libtransport::ConnectError::Busy) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{path}: {e}"),
            }
        }
        let c = served.expect("the freed slot was never reused");
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
        c.close();
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_at_its_connection_limit_is_told_busy_while_others_are_served() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let mut t = TransportConfig::default();
    t.max_connections_per_identity(1).unwrap();
    let grants = [
        ("/gpu/loader", "scans", true, false),
        ("/gpu/other", "scans", true, false),
    ];
    for path in [Path::Quic, Path::Tcp] {
        // A node per transport: one identity's places are shared by both.
        let server = TestServer::start_with(&pki, &grants, t.clone()).await;
        server.put("scans", "a.bin", b"scan bytes");
        let first = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        // The same identity again: told busy after its handshake, and not audited as accepted.
        let accepted = accepted_connections(&server);
        let second =
            Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path).await;
        match second {
            Err(libtransport::ConnectError::Busy) => {}
            Err(e) => panic!("{path}: {e}"),
            Ok(_) => panic!("{path}: a second connection of one identity past its cap"),
        }
        assert_eq!(accepted_connections(&server), accepted, "{path}");
        // Another identity is served meanwhile.
        let other = Client::connect(client_config(&pki, "/gpu/other"), server.addr(path), path)
            .await
            .unwrap();
        let got = other
            .fetch(
                &DatasetName::new("scans").unwrap(),
                &ObjectPath::new("a.bin").unwrap(),
                1 << 20,
                &FetchOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(&got[..], b"scan bytes");
        // Once the first goes, its identity's place frees.
        first.close();
        drop(first);
        let mut again = None;
        for _ in 0..50 {
            match Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path).await
            {
                Ok(c) => {
                    again = Some(c);
                    break;
                }
                Err(libtransport::ConnectError::Busy) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{path}: {e}"),
            }
        }
        let again = again.expect("the identity's freed place was never reused");
        for c in [again, other] {
            c.close();
        }
        let text = server.config.metrics().encode();
        assert!(
            text.contains(r#"transportd_connections_busy_total{reason="per_identity"}"#),
            "{path}: {text}"
        );
    }
}

fn accepted_connections(server: &TestServer) -> usize {
    server
        .audit
        .events()
        .iter()
        .filter(|e| matches!(e, AuditEvent::ConnectionAccepted { .. }))
        .count()
}

/// A peer that reuses the server's decisions learns of every policy change: a watch with
/// an old epoch answers at once, one with the current epoch is held until the policy
/// changes and then answers with a new epoch, and the new policy is the one in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_watch_answers_when_the_policy_changes_and_not_before() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start(&pki, &[("/gpu/loader", "scans", true, false)]).await;
    server.put("scans", "a.bin", &random_bytes(1000, 2));
    let client = Client::connect(
        client_config(&pki, "/gpu/loader"),
        server.addr(Path::Quic),
        Path::Quic,
    )
    .await
    .unwrap();
    let (scans, a) = (
        DatasetName::new("scans").unwrap(),
        ObjectPath::new("a.bin").unwrap(),
    );
    client.stat(&scans, &a).await.unwrap();
    let first = client.policy_watch(0).await.unwrap();
    assert_ne!(first, 0);
    // Held while nothing changes.
    let client = std::sync::Arc::new(client);
    let c = client.clone();
    let mut held = tokio::spawn(async move { c.policy_watch(first).await });
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut held).await;
    assert!(early.is_err(), "answered with no change: {early:?}");
    // The loader loses its rule.
    server
        .config
        .policy()
        .update(std::sync::Arc::new(libtransport::policy::AccessList::new()));
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), held)
        .await
        .expect("the watch was not answered after the change")
        .unwrap()
        .unwrap();
    assert_ne!(next, first);
    let denied = client.stat(&scans, &a).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Some(libtransport::proto::ErrorCode::NotFound),
        "{denied}"
    );
}
