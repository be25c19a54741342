//! Pulls over the RDMA path with the software device: sealed chunks end byte-identical in
//! files and in memory; a client or server without RDMA falls back to QUIC and the pull
//! still completes; both ends name the path they used in the audit trail. (Chunks that fail
//! to open, and bad grants, are tested through the sim: `tests/sim.rs`, module `rdma`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::sync::Arc;

use certs::test_util::TestPki;
use libtransport::audit::{AuditEvent, Direction, Outcome};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::{MemoryAudit, TestServer, identity, random_bytes, trace_init};
use libtransport::{
    Client, ClientConfig, FetchOptions, Path, RdmaMode, TransferPath, TransportConfig,
};

fn transport(mode: RdmaMode) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.chunk_bytes(256 << 10).unwrap();
    t.rdma(mode);
    t
}

/// Object sizes: one byte, exactly a chunk, many chunks with a short last one (more chunks
/// than ring slots, so slots are reused).
const SIZES: [usize; 3] = [1, 256 << 10, (9 << 20) + 12_345];

async fn client(pki: &TestPki, server: &TestServer, mode: RdmaMode) -> (Client, Arc<MemoryAudit>) {
    let audit = Arc::new(MemoryAudit::default());
    let config = ClientConfig::builder()
        .identity(identity(pki, "/gpu/loader"))
        .audit(audit.clone())
        .transport(transport(mode))
        .build();
    let c = Client::connect(config, server.addr(Path::Quic), Path::Quic)
        .await
        .unwrap();
    (c, audit)
}

fn server_paths(server: &TestServer) -> Vec<TransferPath> {
    server
        .audit
        .events()
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Transfer {
                direction: Direction::Out,
                outcome: Outcome::Complete,
                path,
                ..
            } => Some(path),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_rdma_pulls_end_byte_identical_in_files_and_memory() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        transport(RdmaMode::Soft),
    )
    .await;
    let scans = DatasetName::new("scans").unwrap();
    let (client, audit) = client(&pki, &server, RdmaMode::Soft).await;
    let out = tempfile::tempdir().unwrap();
    for (i, len) in SIZES.iter().enumerate() {
        let data = random_bytes(*len, 40 + i as u64);
        let name = format!("shard-{i}.bin");
        server.put("scans", &name, &data);
        let object = ObjectPath::new(&name).unwrap();

        let dest = out.path().join(&name);
        let report = client
            .fetch_to_file(&scans, &object, &dest, &FetchOptions::default())
            .await
            .unwrap();
        assert_eq!(report.path, TransferPath::Rdma, "the pull used RDMA");
        assert_eq!(report.fetched_bytes, *len as u64);
        assert!(std::fs::read(&dest).unwrap() == data, "file differs");

        let got = client
            .fetch(&scans, &object, u64::MAX, &FetchOptions::default())
            .await
            .unwrap();
        assert!(got == data, "memory pull differs");
    }
    // The server names the path in its trail; so does the client.
    let paths = server_paths(&server);
    assert_eq!(paths.len(), 2 * SIZES.len(), "{paths:?}");
    assert!(paths.iter().all(|p| *p == TransferPath::Rdma), "{paths:?}");
    assert!(audit.events().iter().any(|e| matches!(
        e,
        AuditEvent::Transfer {
            path: TransferPath::Rdma,
            direction: Direction::In,
            outcome: Outcome::Complete,
            ..
        }
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_falls_back_to_quic_when_either_side_cannot() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let data = random_bytes((2 << 20) + 7, 9);
    let scans = DatasetName::new("scans").unwrap();
    let object = ObjectPath::new("x.bin").unwrap();
    let out = tempfile::tempdir().unwrap();

    // A server that does not allow RDMA: the client asks, is refused, uses QUIC.
    let off = TestServer::start_with(
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        transport(RdmaMode::Off),
    )
    .await;
    off.put("scans", "x.bin", &data);
    let (c, _) = client(&pki, &off, RdmaMode::Soft).await;
    let dest = out.path().join("refused.bin");
    let report = c
        .fetch_to_file(&scans, &object, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(report.path, TransferPath::Quic);
    assert!(std::fs::read(&dest).unwrap() == data);
    assert_eq!(server_paths(&off), vec![TransferPath::Quic]);

    // A client on a machine without an RDMA device, set to use one when there is one: this
    // machine has none, so it never asks and uses QUIC.
    assert!(libtransport::transport::rdma::discover().is_empty());
    let soft = TestServer::start_with(
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        transport(RdmaMode::Soft),
    )
    .await;
    soft.put("scans", "x.bin", &data);
    let (c, _) = client(&pki, &soft, RdmaMode::Auto).await;
    let dest = out.path().join("no-device.bin");
    let report = c
        .fetch_to_file(&scans, &object, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(report.path, TransferPath::Quic);
    assert!(std::fs::read(&dest).unwrap() == data);
    let got = c
        .fetch(&scans, &object, u64::MAX, &FetchOptions::default())
        .await
        .unwrap();
    assert!(got == data);
    assert_eq!(
        server_paths(&soft),
        vec![TransferPath::Quic, TransferPath::Quic]
    );

    // The control: the same pair with the client on the soft device does use RDMA.
    let (c, _) = client(&pki, &soft, RdmaMode::Soft).await;
    let report = c
        .fetch_to_file(
            &scans,
            &object,
            &out.path().join("soft.bin"),
            &FetchOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.path, TransferPath::Rdma);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_pull_over_rdma_fetches_only_the_missing_chunks() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = TestServer::start_with(
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        transport(RdmaMode::Soft),
    )
    .await;
    let data = random_bytes(4 << 20, 77);
    server.put("scans", "r.bin", &data);
    let scans = DatasetName::new("scans").unwrap();
    let object = ObjectPath::new("r.bin").unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("r.bin");
    // A first pull over QUIC, then a partial file as an interrupted pull leaves it: the
    // first half of the chunks in place.
    let (quic, _) = client(&pki, &server, RdmaMode::Off).await;
    quic.fetch_to_file(&scans, &object, &dest, &FetchOptions::default())
        .await
        .unwrap();
    let partial = out.path().join(".r.bin.transportd-partial");
    std::fs::rename(&dest, &partial).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0u8; 2 << 20], 2 << 20).unwrap();
    drop(f);

    let (c, _) = client(&pki, &server, RdmaMode::Soft).await;
    let report = c
        .fetch_to_file(&scans, &object, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(report.path, TransferPath::Rdma);
    assert_eq!(report.chunks_reused, 8);
    assert_eq!(report.chunks_fetched, 8);
    assert_eq!(report.fetched_bytes, 2 << 20);
    assert!(std::fs::read(&dest).unwrap() == data);
}
