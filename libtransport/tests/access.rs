//! Default-deny authorization, confinement of paths to their dataset, and detection of
//! stored objects that no longer match their manifest, over real connections.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use certs::test_util::TestPki;
use libtransport::audit::{AuditEvent, DecisionKind};
use libtransport::policy::Action;
use libtransport::proto::{DatasetName, ErrorCode, ObjectPath};
use libtransport::test_util::{TestServer, client_config, random_bytes, trace_init};
use libtransport::{
    Client, FetchError, FetchOptions, Path, PushOptions, RequestError, TransportConfig,
};

fn remote(e: &RequestError) -> Option<ErrorCode> {
    e.code()
}

fn fetch_code(e: &FetchError) -> Option<ErrorCode> {
    match e {
        FetchError::Request(r) => r.code(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_looks_like_not_found_and_is_audited() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start(
        &pki,
        &[
            ("/gpu/loader", "scans", true, false),
            ("/gpu/other", "public", true, false),
        ],
    )
    .await;
    server.put("scans", "a.bin", b"scan bytes");
    let scans = DatasetName::new("scans").unwrap();
    let missing = DatasetName::new("no-such-dataset").unwrap();
    let obj = ObjectPath::new("a.bin").unwrap();

    for path in [Path::Quic, Path::Tcp] {
        let intruder = Client::connect(client_config(&pki, "/gpu/other"), server.addr(path), path)
            .await
            .unwrap();
        // The dataset it may not read and one that does not exist answer alike.
        let denied = intruder.stat(&scans, &obj).await.unwrap_err();
        let absent = intruder.stat(&missing, &obj).await.unwrap_err();
        assert_eq!(remote(&denied), Some(ErrorCode::NotFound));
        assert_eq!(remote(&absent), Some(ErrorCode::NotFound));
        assert_eq!(denied.to_string(), absent.to_string());
        let denied = intruder
            .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
            .await
            .unwrap_err();
        assert_eq!(fetch_code(&denied), Some(ErrorCode::NotFound));
        let denied = intruder.list_objects(&scans, "").await.unwrap_err();
        let absent = intruder.list_objects(&missing, "").await.unwrap_err();
        assert_eq!(denied.to_string(), absent.to_string());
        // It cannot even see that the dataset exists.
        let visible = intruder.list_datasets().await.unwrap();
        assert!(!visible.contains(&scans), "{visible:?}");

        // A reader may not write.
        let reader = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        let e = reader
            .push_bytes(
                &scans,
                &obj,
                bytes::Bytes::from_static(b"overwrite"),
                &PushOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, libtransport::PushError::Request(r) if r.code() == Some(ErrorCode::NotFound)),
            "{e}"
        );
        // The control: the reader reads.
        let got = reader
            .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
            .await
            .unwrap();
        assert_eq!(&got[..], b"scan bytes");
    }
    assert_eq!(
        std::fs::read(server.data_dir().join("scans/a.bin")).unwrap(),
        b"scan bytes"
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
            "{action} denial missing: {denials:?}"
        );
    }
    assert!(
        denials
            .iter()
            .any(|(p, a, d)| *p == pki.id("/gpu/loader") && *a == Action::Write && *d == scans)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_never_leave_their_dataset() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start(&pki, &[("/gpu/loader", "scans", true, true)]).await;
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
    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        for escape in ["link-abs.bin", "link-rel.bin", "dir-link/secret.bin"] {
            let o = ObjectPath::new(escape).unwrap();
            let e = client
                .fetch(&scans, &o, 1 << 20, &FetchOptions::default())
                .await
                .unwrap_err();
            assert_eq!(
                fetch_code(&e),
                Some(ErrorCode::NotFound),
                "{escape} over {path}: {e}"
            );
            // Writes through a symlinked directory are refused too.
            let w = client
                .push_bytes(
                    &scans,
                    &ObjectPath::new("dir-link/new.bin").unwrap(),
                    bytes::Bytes::from_static(b"x"),
                    &PushOptions::default(),
                )
                .await;
            assert!(
                w.is_err(),
                "write through a symlinked directory over {path}"
            );
        }
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
            "{listed:?}"
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
        assert_eq!(&alias[..], b"inside");
    }
    assert!(!server.data_dir().join("private/new.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_file_changed_after_its_manifest_is_corrupt_never_good() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let mut t = TransportConfig::default();
    t.chunk_bytes(64 << 10).unwrap();
    let server = TestServer::start_with(&pki, &[("/gpu/loader", "scans", true, false)], t).await;
    let data = random_bytes(1 << 20, 7);
    let file = server.put("scans", "shard.bin", &data);
    let scans = DatasetName::new("scans").unwrap();
    let obj = ObjectPath::new("shard.bin").unwrap();
    let out = tempfile::tempdir().unwrap();

    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        // The manifest is built and cached from the good bytes.
        let manifest = client.stat(&scans, &obj).await.unwrap();
        assert_eq!(manifest.chunk_count(), 16);

        // Bit rot: one byte of chunk 5 changes, and size and mtime stay as they were.
        let meta = std::fs::metadata(&file).unwrap();
        let mtime = filetime::FileTime::from_last_modification_time(&meta);
        let mut rotten = data.clone();
        rotten[5 * 65_536 + 100] ^= 0x20;
        std::fs::write(&file, &rotten).unwrap();
        filetime::set_file_mtime(&file, mtime).unwrap();

        let dest = out.path().join(format!("{path}.bin"));
        let e = client
            .fetch_to_file(&scans, &obj, &dest, &FetchOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Corrupt(i) if i.0 == 5), "{e}");
        assert!(!dest.exists(), "a corrupt object became visible");
        let e = client
            .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Corrupt(_)), "{e}");
        // A range outside the damaged chunk still reads; one touching it does not.
        let good = client.read_range(&scans, &obj, 0..65_536).await.unwrap();
        assert_eq!(&good[..], &data[..65_536]);
        assert!(
            client
                .read_range(&scans, &obj, 5 * 65_536..5 * 65_536 + 10)
                .await
                .is_err()
        );

        // Repair the file for the next path.
        std::fs::write(&file, &data).unwrap();
        filetime::set_file_mtime(&file, mtime).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_trail_stops_new_transfers_until_it_recovers() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start(&pki, &[("/gpu/loader", "scans", true, true)]).await;
    server.put("scans", "a.bin", b"scan bytes");
    let scans = DatasetName::new("scans").unwrap();
    let obj = ObjectPath::new("a.bin").unwrap();
    let no_retry = FetchOptions {
        retry: libtransport::RetryPolicy::none(),
        ..FetchOptions::default()
    };
    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(client_config(&pki, "/gpu/loader"), server.addr(path), path)
            .await
            .unwrap();
        server.audit.set_failing(true);
        let e = client
            .fetch(&scans, &obj, 1 << 20, &no_retry)
            .await
            .unwrap_err();
        assert_eq!(fetch_code(&e), Some(ErrorCode::AuditUnavailable), "{e}");
        assert!(
            e.to_string().contains("audit trail cannot be written"),
            "{e}"
        );
        let e = client
            .push_bytes(
                &scans,
                &ObjectPath::new("b.bin").unwrap(),
                bytes::Bytes::from_static(b"x"),
                &no_retry,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, libtransport::PushError::Request(r) if r.code() == Some(ErrorCode::AuditUnavailable)),
            "{e}"
        );
        assert!(!server.data_dir().join("scans/b.bin").exists());
        // Space is back: the same client is served again, without anyone restarting anything.
        server.audit.set_failing(false);
        let got = client
            .fetch(&scans, &obj, 1 << 20, &no_retry)
            .await
            .unwrap();
        assert_eq!(&got[..], b"scan bytes");
    }
    // The metrics counted the failures.
    let text = server.config.metrics().encode();
    assert!(
        !text.contains("transportd_audit_write_errors_total 0\n"),
        "{text}"
    );
}

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
