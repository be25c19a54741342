//! Default-deny authorization and its audit records, confinement of paths to their dataset,
//! and a trail that cannot be written stopping new transfers: the server's handler, policy,
//! store and audit, through the real drivers over the sim (moved from `tests/access.rs`,
//! where they ran over QUIC and TLS/TCP sockets that added nothing to them).

use bytes::Bytes;
use certs::test_util::TestPki;
use libtransport::audit::{AuditEvent, DecisionKind};
use libtransport::policy::Action;
use libtransport::proto::{DatasetName, ErrorCode, ObjectPath};
use libtransport::test_util::sim::SimNet;
use libtransport::test_util::trace_init;
use libtransport::{FetchError, FetchOptions, PushError, PushOptions, RetryPolicy};

use super::support::{client_as, server};
use super::tuning;

fn fetch_code(e: &FetchError) -> Option<ErrorCode> {
    match e {
        FetchError::Request(r) => r.code(),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn no_access_looks_like_not_found_and_is_audited() {
    let _trace = trace_init();
    let net = SimNet::new(101);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(
        &net,
        &pki,
        &[
            ("/gpu/loader", "scans", true, false),
            ("/gpu/other", "public", true, false),
        ],
        tuning(),
    )
    .await;
    server.put("scans", "a.bin", b"scan bytes");
    let scans = DatasetName::new("scans").unwrap();
    let missing = DatasetName::new("no-such-dataset").unwrap();
    let obj = ObjectPath::new("a.bin").unwrap();

    let intruder = client_as(&net, &pki, "/gpu/other").await.unwrap();
    // The dataset it may not read and one that does not exist answer alike.
    let denied = intruder.stat(&scans, &obj).await.unwrap_err();
    let absent = intruder.stat(&missing, &obj).await.unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::NotFound), "{seed}");
    assert_eq!(absent.code(), Some(ErrorCode::NotFound), "{seed}");
    assert_eq!(denied.to_string(), absent.to_string(), "{seed}");
    let denied = intruder
        .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
        .await
        .unwrap_err();
    assert_eq!(fetch_code(&denied), Some(ErrorCode::NotFound), "{seed}");
    let denied = intruder.list_objects(&scans, "").await.unwrap_err();
    let absent = intruder.list_objects(&missing, "").await.unwrap_err();
    assert_eq!(denied.to_string(), absent.to_string(), "{seed}");
    // It cannot even see that the dataset exists.
    let visible = intruder.list_datasets().await.unwrap();
    assert!(!visible.contains(&scans), "{seed}: {visible:?}");

    // A reader may not write.
    let reader = client_as(&net, &pki, "/gpu/loader").await.unwrap();
    let e = reader
        .push_bytes(
            &scans,
            &obj,
            Bytes::from_static(b"overwrite"),
            &PushOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PushError::Request(r) if r.code() == Some(ErrorCode::NotFound)),
        "{seed}: {e}"
    );
    // The control: the reader reads.
    let got = reader
        .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(&got[..], b"scan bytes", "{seed}");
    assert_eq!(
        std::fs::read(server.data_dir().join("scans/a.bin")).unwrap(),
        b"scan bytes",
        "{seed}"
    );

    // Every denial is in the audit trail, with who, what and which dataset.
    let denials: Vec<_> = server
        .audit
        .events()
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Authorization {
                peer,
                action,
                dataset,
                decision: DecisionKind::Deny,
                ..
            } => Some((peer, action, dataset)),
            _ => None,
        })
        .collect();
    let other = pki.id("/gpu/other");
    for action in [Action::Read, Action::List] {
        assert!(
            denials
                .iter()
                .any(|(p, a, d)| *p == other && *a == action && *d == scans),
            "{seed}: {action} denial missing: {denials:?}"
        );
    }
    assert!(
        denials
            .iter()
            .any(|(p, a, d)| *p == pki.id("/gpu/loader") && *a == Action::Write && *d == scans),
        "{seed}: write denial missing: {denials:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn paths_never_leave_their_dataset() {
    let _trace = trace_init();
    let net = SimNet::new(103);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(
        &net,
        &pki,
        &[("/gpu/loader", "scans", true, true)],
        tuning(),
    )
    .await;
    server.put("scans", "inside.bin", b"inside");
    // Secrets next to the dataset and elsewhere on the host.
    server.put("private", "secret.bin", b"PRIVATE-CANARY");
    let outside = server.dir.path().join("outside.bin");
    std::fs::write(&outside, b"HOST-CANARY").unwrap();
    let scans_dir = server.data_dir().join("scans");
    std::os::unix::fs::symlink(&outside, scans_dir.join("link-abs.bin")).unwrap();
    std::os::unix::fs::symlink("../private/secret.bin", scans_dir.join("link-rel.bin")).unwrap();
    std::os::unix::fs::symlink(
        server.data_dir().join("private"),
        scans_dir.join("dir-link"),
    )
    .unwrap();
    // A link that stays inside is fine.
    std::os::unix::fs::symlink("inside.bin", scans_dir.join("alias.bin")).unwrap();

    // `..` and absolute paths cannot even be expressed.
    for bad in [
        "../private/secret.bin",
        "/etc/passwd",
        "a/../../private/secret.bin",
        "./x",
    ] {
        assert!(ObjectPath::new(bad).is_err(), "{bad} accepted");
    }
    assert!(DatasetName::new("..").is_err());

    let scans = DatasetName::new("scans").unwrap();
    let client = client_as(&net, &pki, "/gpu/loader").await.unwrap();
    for escape in ["link-abs.bin", "link-rel.bin", "dir-link/secret.bin"] {
        let o = ObjectPath::new(escape).unwrap();
        let e = client
            .fetch(&scans, &o, 1 << 20, &FetchOptions::default())
            .await
            .unwrap_err();
        assert_eq!(
            fetch_code(&e),
            Some(ErrorCode::NotFound),
            "{seed}: {escape}: {e}"
        );
    }
    // Writes through a symlinked directory are refused too.
    let w = client
        .push_bytes(
            &scans,
            &ObjectPath::new("dir-link/new.bin").unwrap(),
            Bytes::from_static(b"x"),
            &PushOptions::default(),
        )
        .await;
    assert!(w.is_err(), "{seed}: a write through a symlinked directory");
    let listed: Vec<String> = client
        .list_objects(&scans, "")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path.to_string())
        .collect();
    assert!(
        !listed
            .iter()
            .any(|p| p.contains("link") || p.contains("secret")),
        "{seed}: {listed:?}"
    );
    assert!(
        listed.iter().any(|p| p == "inside.bin"),
        "{seed}: {listed:?}"
    );
    let alias = client
        .fetch(
            &scans,
            &ObjectPath::new("alias.bin").unwrap(),
            1 << 20,
            &FetchOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(&alias[..], b"inside", "{seed}");
    assert!(
        !server.data_dir().join("private/new.bin").exists(),
        "{seed}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unwritable_audit_trail_stops_new_transfers_until_it_recovers() {
    let _trace = trace_init();
    let net = SimNet::new(107);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(
        &net,
        &pki,
        &[("/gpu/loader", "scans", true, true)],
        tuning(),
    )
    .await;
    server.put("scans", "a.bin", b"scan bytes");
    let scans = DatasetName::new("scans").unwrap();
    let obj = ObjectPath::new("a.bin").unwrap();
    let no_retry = FetchOptions {
        retry: RetryPolicy::none(),
        ..FetchOptions::default()
    };
    let client = client_as(&net, &pki, "/gpu/loader").await.unwrap();
    server.audit.set_failing(true);
    let e = client
        .fetch(&scans, &obj, 1 << 20, &no_retry)
        .await
        .unwrap_err();
    assert_eq!(
        fetch_code(&e),
        Some(ErrorCode::AuditUnavailable),
        "{seed}: {e}"
    );
    assert!(
        e.to_string().contains("audit trail cannot be written"),
        "{seed}: {e}"
    );
    let e = client
        .push_bytes(
            &scans,
            &ObjectPath::new("b.bin").unwrap(),
            Bytes::from_static(b"x"),
            &no_retry,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PushError::Request(r) if r.code() == Some(ErrorCode::AuditUnavailable)),
        "{seed}: {e}"
    );
    assert!(!server.data_dir().join("scans/b.bin").exists(), "{seed}");
    // Space is back: the same client is served again, without anyone restarting anything.
    server.audit.set_failing(false);
    let got = client
        .fetch(&scans, &obj, 1 << 20, &no_retry)
        .await
        .unwrap();
    assert_eq!(&got[..], b"scan bytes", "{seed}");
    // The metrics counted the failures.
    let text = server.config.metrics().encode();
    assert!(
        !text.contains("transportd_audit_write_errors_total 0\n"),
        "{seed}: {text}"
    );
    assert!(
        text.contains("transportd_audit_write_errors_total"),
        "{seed}: {text}"
    );
}
