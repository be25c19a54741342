//! Pulls and pushes of a multi-shard dataset over QUIC and TLS/TCP on loopback end
//! byte-identical to the source; ranges, listing and the audit trail agree.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

#[path = "transfer/store_io.rs"]
mod store_io;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use certs::test_util::TestPki;
use libtransport::audit::{AuditEvent, Direction, Outcome};
use libtransport::proto::{DatasetName, Digest, Manifest, ObjectPath};
use libtransport::store::digest_file;
use libtransport::test_util::{TestServer, identity, random_bytes, trace_init};
use libtransport::{Client, ClientConfig, FetchOptions, Path, PushOptions, TransportConfig};

/// 64 KiB chunks, so a few MiB make many chunks and many streams.
fn small_chunks() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.chunk_bytes(64 << 10).unwrap();
    t
}

/// Longer than any pull here takes; a read that stalls fails the test instead of hanging it.
const STALL: Duration = Duration::from_secs(30);

/// Shard sizes around the chunk boundaries, and an empty one.
const SHARDS: [usize; 6] = [0, 1, 65_536, 65_537, 1_000_003, (3 << 20) + 5];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_dataset_moves_byte_identical_over_quic_and_tcp() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(
        &pki,
        &[
            ("/gpu/loader", "scans", true, false),
            ("/gpu/loader", "checkpoints", true, true),
        ],
        small_chunks(),
    )
    .await;
    let scans = DatasetName::new("scans").unwrap();
    let ckpt = DatasetName::new("checkpoints").unwrap();
    let mut sources = Vec::new();
    for (i, len) in SHARDS.iter().enumerate() {
        let name = format!("train/shard-{i:04}.bin");
        let data = random_bytes(*len, i as u64);
        server.put("scans", &name, &data);
        sources.push((ObjectPath::new(&name).unwrap(), data));
    }
    let config = ClientConfig::builder()
        .identity(identity(&pki, "/gpu/loader"))
        .transport(small_chunks())
        .build();
    let out = tempfile::tempdir().unwrap();

    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(config.clone(), server.addr(path), path)
            .await
            .unwrap();
        assert_eq!(client.server().id, server.id);
        assert_eq!(client.path(), path);
        assert_eq!(
            client.list_datasets().await.unwrap(),
            vec![ckpt.clone(), scans.clone()]
        );
        let listed = client.list_objects(&scans, "train/").await.unwrap();
        assert_eq!(listed.len(), SHARDS.len());

        // Pull every shard into files, with progress reported.
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let opts = FetchOptions {
            parallel: Some(8),
            progress: Some(Arc::new(move |done, _total| {
                s2.fetch_max(done, Ordering::Relaxed);
            })),
            ..FetchOptions::default()
        };
        for (object, data) in &sources {
            let entry = listed.iter().find(|e| &e.path == object).unwrap();
            assert_eq!(entry.size, data.len() as u64);
            let dest = out.path().join(path.as_str()).join(object.as_str());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            let report = client
                .fetch_to_file(&scans, object, &dest, &opts)
                .await
                .unwrap();
            assert_eq!(report.size, data.len() as u64);
            assert_eq!(report.chunks_reused, 0);
            assert_eq!(report.fetched_bytes, data.len() as u64);
            assert_eq!(
                digest_file(&dest).unwrap(),
                Digest::of(data),
                "{object:?} over {path}"
            );
            // Into memory too.
            let mem = client
                .fetch(&scans, object, 16 << 20, &FetchOptions::default())
                .await
                .unwrap();
            assert_eq!(&mem[..], &data[..]);
        }
        assert_eq!(seen.load(Ordering::Relaxed), (3 << 20) + 5);

        // A range across chunk boundaries.
        let (big, data) = &sources[5];
        let range = 60_000..200_000u64;
        let got = client.read_range(&scans, big, range.clone()).await.unwrap();
        assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);

        // Push a checkpoint from a file and another from memory.
        let ck = random_bytes((2 << 20) + 123, 99);
        let src = out.path().join(format!("{path}-step.ckpt"));
        std::fs::write(&src, &ck).unwrap();
        let name = ObjectPath::new(&format!("{path}/step-1.ckpt")).unwrap();
        let report = client
            .push_file(&ckpt, &name, &src, &PushOptions::default())
            .await
            .unwrap();
        assert_eq!(
            report.root,
            Manifest::of_bytes(&ck, 64 << 10).unwrap().root()
        );
        assert_eq!(report.chunks_skipped, 0);
        let stored = server.data_dir().join("checkpoints").join(name.as_str());
        assert_eq!(std::fs::read(&stored).unwrap(), ck);
        let name2 = ObjectPath::new(&format!("{path}/step-2.ckpt")).unwrap();
        client
            .push_bytes(&ckpt, &name2, ck.clone().into(), &PushOptions::default())
            .await
            .unwrap();
        let stored2 = server.data_dir().join("checkpoints").join(name2.as_str());
        assert_eq!(std::fs::read(&stored2).unwrap(), ck);
        // Pushed objects can be pulled back.
        let back = client
            .fetch(&ckpt, &name, 16 << 20, &FetchOptions::default())
            .await
            .unwrap();
        assert_eq!(&back[..], &ck[..]);
        client.close();
    }

    // The server recorded each completed transfer with its direction, path and root.
    let events = server.audit.events();
    let transfers: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::Transfer {
                direction,
                path,
                outcome,
                dataset,
                ..
            } => Some((*direction, *path, *outcome, dataset.clone())),
            _ => None,
        })
        .collect();
    for path in [Path::Quic, Path::Tcp] {
        let writes = transfers
            .iter()
            .filter(|t| t.0 == Direction::In && t.1 == path.into() && t.2 == Outcome::Complete)
            .count();
        assert_eq!(writes, 2, "two pushes committed over {path}");
        let reads = transfers
            .iter()
            .filter(|t| t.0 == Direction::Out && t.1 == path.into() && t.3 == scans)
            .count();
        assert!(reads >= SHARDS.len() * 2, "reads over {path}: {reads}");
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AuditEvent::ConnectionAccepted { peer, .. } if *peer == pki.id("/gpu/loader")))
    );
}

/// The server reads a chunk in blocks (up to 4 MiB, at most half the connection's read
/// budget) and sends each block as pieces of at most 1 MiB sharing one buffer. Chunks
/// larger than a block, blocks that are not whole pieces, and a budget that holds only two
/// blocks all end byte-identical, and the budget comes back (a later pull still runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_larger_than_a_read_block_move_byte_identical_within_small_read_budgets() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let scans = DatasetName::new("scans").unwrap();
    let object = ObjectPath::new("big.bin").unwrap();
    let data = random_bytes((16 << 20) + 12_345, 7);
    // Default budget: 4 MiB blocks of four pieces; 3 MiB: blocks of a piece and a half.
    for budget in [64 << 20, 3 << 20] {
        let mut t = TransportConfig::default();
        t.chunk_bytes(8 << 20).unwrap();
        t.max_buffered_bytes(budget).unwrap();
        let server =
            TestServer::start_with(&pki, &[("/gpu/loader", "scans", true, false)], t).await;
        server.put("scans", object.as_str(), &data);
        for path in [Path::Quic, Path::Tcp] {
            let client = Client::connect(
                libtransport::test_util::client_config(&pki, "/gpu/loader"),
                server.addr(path),
                path,
            )
            .await
            .unwrap();
            // Budget that never came back would stall a later read: fail instead of hanging.
            for _ in 0..2 {
                let got = tokio::time::timeout(
                    STALL,
                    client.fetch(&scans, &object, 32 << 20, &FetchOptions::default()),
                )
                .await
                .expect("pull stalled")
                .unwrap();
                assert!(got[..] == data[..], "budget {budget} over {path}");
            }
            let range = (8 << 20) - 10..(8 << 20) + (3 << 20);
            let got =
                tokio::time::timeout(STALL, client.read_range(&scans, &object, range.clone()))
                    .await
                    .expect("range read stalled")
                    .unwrap();
            assert!(got[..] == data[range.start as usize..range.end as usize]);
            client.close();
        }
    }
}

#[test]
fn the_blocking_facade_works_without_a_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = TestPki::new("hospital.example");
    let server = rt.block_on(TestServer::start(
        &pki,
        &[("/gpu/loader", "scans", true, true)],
    ));
    let data = random_bytes((1 << 20) + 7, 3);
    server.put("scans", "a.bin", &data);
    let scans = DatasetName::new("scans").unwrap();
    let a = ObjectPath::new("a.bin").unwrap();
    for path in [Path::Quic, Path::Tcp] {
        let c = libtransport::blocking::BlockingClient::connect(
            libtransport::test_util::client_config(&pki, "/gpu/loader"),
            server.addr(path),
            path,
        )
        .unwrap();
        assert_eq!(c.list_datasets().unwrap(), vec![scans.clone()]);
        assert_eq!(c.stat(&scans, &a).unwrap().size(), data.len() as u64);
        let got = c.fetch(&scans, &a, 4 << 20).unwrap();
        assert_eq!(&got[..], &data[..]);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("a.bin");
        c.fetch_to_file(&scans, &a, &dest, &FetchOptions::default())
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        let name = ObjectPath::new(&format!("back-{path}.bin")).unwrap();
        c.push_bytes(&scans, &name, data.clone().into()).unwrap();
        assert_eq!(
            std::fs::read(server.data_dir().join("scans").join(name.as_str())).unwrap(),
            data
        );
    }
}

/// What the server recorded sending of `object`, one entry per transfer, and how many
/// read decisions it recorded for it (one per part opened).
fn served(server: &TestServer, object: &ObjectPath) -> (Vec<(u64, Outcome)>, usize) {
    moved(server, object, Direction::Out)
}

/// The node's trail for `object`: its transfers `direction`, and how many authorizations.
fn moved(
    server: &TestServer,
    object: &ObjectPath,
    direction: Direction,
) -> (Vec<(u64, Outcome)>, usize) {
    let events = server.audit.events();
    let transfers = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::Transfer {
                direction: d,
                object: o,
                bytes,
                outcome,
                ..
            } if o == object && *d == direction => Some((*bytes, *outcome)),
            _ => None,
        })
        .collect();
    let opened = events
        .iter()
        .filter(|e| matches!(e, AuditEvent::Authorization { object: Some(o), .. } if o == object))
        .count();
    (transfers, opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_striped_push_spreads_its_chunks_over_several_connections_and_commits_once() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(
        &pki,
        &[("/gpu/trainer", "checkpoints", false, true)],
        small_chunks(),
    )
    .await;
    let ckpt = DatasetName::new("checkpoints").unwrap();
    let data = random_bytes((2 << 20) + 77, 6);
    let config = ClientConfig::builder()
        .identity(identity(&pki, "/gpu/trainer"))
        .transport(small_chunks())
        .build();
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("model.bin");
    std::fs::write(&file, &data).unwrap();
    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(config.clone(), server.addr(path), path)
            .await
            .unwrap();
        for stripes in [1u32, 3] {
            let opts = PushOptions {
                parallel: Some(6),
                connections: Some(stripes),
                ..PushOptions::default()
            };
            // From memory and from a file.
            for from_file in [false, true] {
                let what = format!("{path} x{stripes} from file {from_file}");
                let object = ObjectPath::new(&format!("{path}/{stripes}/{from_file}.bin")).unwrap();
                let report = if from_file {
                    client.push_file(&ckpt, &object, &file, &opts).await
                } else {
                    client
                        .push_bytes(&ckpt, &object, data.clone().into(), &opts)
                        .await
                }
                .unwrap();
                assert_eq!(report.sent_bytes, data.len() as u64, "{what}");
                assert_eq!(report.chunks_skipped, 0, "{what}");
                assert_eq!(report.connections, stripes, "{what}");
                let stored = server.data_dir().join("checkpoints").join(object.as_str());
                assert!(
                    std::fs::read(&stored).unwrap() == data,
                    "{what}: stored bytes"
                );
                assert!(
                    server
                        .audit
                        .wait_for(|_| !moved(&server, &object, Direction::In).0.is_empty())
                        .await,
                    "{what}: the server never recorded the push"
                );
                // Each part was authorized on its own connection; the trail holds one
                // transfer, complete, with every byte, whichever part sent them.
                let (transfers, opened) = moved(&server, &object, Direction::In);
                assert_eq!(opened, stripes as usize, "{what}");
                assert_eq!(
                    transfers,
                    [(data.len() as u64, Outcome::Complete)],
                    "{what}: one transfer in the node's trail"
                );
            }
        }
        client.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_striped_pull_spreads_its_chunks_over_several_connections_and_lands_the_same_bytes() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        small_chunks(),
    )
    .await;
    let scans = DatasetName::new("scans").unwrap();
    let data = random_bytes((2 << 20) + 77, 5);
    server.put("scans", "striped.bin", &data);
    let object = ObjectPath::new("striped.bin").unwrap();
    let config = ClientConfig::builder()
        .identity(identity(&pki, "/gpu/loader"))
        .transport(small_chunks())
        .build();
    let out = tempfile::tempdir().unwrap();
    for path in [Path::Quic, Path::Tcp] {
        let client = Client::connect(config.clone(), server.addr(path), path)
            .await
            .unwrap();
        for stripes in [1u32, 3] {
            let opts = FetchOptions {
                parallel: Some(6),
                connections: Some(stripes),
                ..FetchOptions::default()
            };
            // Into the caller's memory, into memory of the library's, into a file.
            let (before, opened_before) = served(&server, &object);
            let mut mem = vec![0u8; data.len()];
            let report = client
                .fetch_into(&scans, &object, &mut mem, &opts)
                .await
                .unwrap();
            assert_eq!(report.size, data.len() as u64);
            assert_eq!(report.connections, stripes, "{path} x{stripes}");
            assert!(mem == data, "{path} x{stripes}: caller's memory");
            assert!(
                server
                    .audit
                    .wait_for(|_| served(&server, &object).0.len() > before.len())
                    .await,
                "{path} x{stripes}: the server never recorded the transfer"
            );
            let (after, opened) = served(&server, &object);
            // Each part was authorized on its own connection; the trail holds one transfer,
            // complete, with every byte.
            assert_eq!(
                opened - opened_before,
                stripes as usize,
                "{path} x{stripes}"
            );
            assert_eq!(
                after[before.len()..],
                [(data.len() as u64, Outcome::Complete)],
                "{path} x{stripes}: one transfer in the node's trail"
            );
            let owned = client
                .fetch(&scans, &object, 16 << 20, &opts)
                .await
                .unwrap();
            assert!(owned == data, "{path} x{stripes}: library's memory");
            let dest = out.path().join(format!("{path}-{stripes}.bin"));
            let report = client
                .fetch_to_file(&scans, &object, &dest, &opts)
                .await
                .unwrap();
            assert_eq!(
                report.connections, stripes,
                "{path} x{stripes}: into a file"
            );
            assert_eq!(std::fs::read(&dest).unwrap(), data);
        }
        client.close();
    }
}
