//! The real client and server drivers over the in-memory transport (`test_util::sim`):
//! no sockets, virtual time (`start_paused`), seeded faults. Each test prints its seed when
//! it fails, so the same run can be repeated.
//!
//! Tests moved here from the socket suites live in `sim/*.rs`; socket tests keep only what
//! real handshakes, the kernel and hostile bytes on a real wire show.

#[path = "sim/access.rs"]
mod access;
#[path = "sim/admission.rs"]
mod admission;
#[path = "sim/credentials.rs"]
mod credentials;
#[path = "sim/store.rs"]
mod store;
#[path = "sim/support.rs"]
mod support;
#[path = "sim/transfers.rs"]
mod transfers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use certs::test_util::TestPki;
use libtransport::audit::{AuditEvent, Direction, Outcome};
use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::sim::{SERVER_ADDR, SimConnector, SimNet};
use libtransport::test_util::{ManualClock, TestServer, identity, random_bytes, trace_init};
use libtransport::{
    Client, ClientConfig, ConnectError, Credentials, FetchError, FetchOptions, IdentityHandle,
    PushOptions, RequestError, RetryPolicy, TransportConfig,
};

/// 64 KiB chunks (the smallest), so a small object has many.
const CHUNK: u32 = 64 << 10;

/// Chunks of four `Data` frames (of 1 MiB), so a fault can land in the middle of one.
const BIG_CHUNK: u32 = 4 << 20;

fn tuning() -> TransportConfig {
    tuned(CHUNK)
}

fn tuned(chunk: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.chunk_bytes(chunk).expect("chunk size");
    t
}

struct Sim {
    net: SimNet,
    pki: TestPki,
    server: TestServer,
}

impl Sim {
    async fn start(seed: u64) -> Self {
        Self::start_with(seed, tuning()).await
    }

    async fn start_with(seed: u64, transport: TransportConfig) -> Self {
        let net = SimNet::new(seed);
        let pki = TestPki::new("hospital.example");
        let server = TestServer::start_sim(
            &pki,
            &[("/gpu/loader", "scans", true, true)],
            transport,
            &net,
        )
        .await;
        Self { net, pki, server }
    }

    async fn client(&self) -> Result<Client, ConnectError> {
        connect(&self.net, &self.pki, |c| c).await
    }

    fn seed(&self) -> String {
        format!("seed {}", self.net.seed())
    }
}

/// A client of `pki`'s `/gpu/loader` over `net`, its connector changed by `shape`.
async fn connect(
    net: &SimNet,
    pki: &TestPki,
    shape: impl FnOnce(SimConnector) -> SimConnector,
) -> Result<Client, ConnectError> {
    let id = identity(pki, "/gpu/loader");
    let config = ClientConfig::builder()
        .identity(id.clone())
        .transport(tuning())
        .build();
    Client::connect_with(config, SERVER_ADDR, Arc::new(shape(net.connector(id)))).await
}

fn names(object: &str) -> (DatasetName, ObjectPath) {
    (
        DatasetName::new("scans").expect("dataset name"),
        ObjectPath::new(object).expect("object path"),
    )
}

fn patient(retries: u32) -> FetchOptions {
    FetchOptions {
        retry: RetryPolicy {
            attempts: retries,
            backoff: Duration::from_millis(100),
        },
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_pull_and_a_push_of_a_multi_chunk_object_arrive_byte_identical() {
    let _trace = trace_init();
    let sim = Sim::start(1).await;
    let data = random_bytes(10 * CHUNK as usize + 12_345, 1);
    sim.server.put("scans", "a.bin", &data);
    let client = sim.client().await.unwrap();
    let (dataset, object) = names("a.bin");

    let got = client
        .fetch(&dataset, &object, 1 << 30, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..], "{}", sim.seed());

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.bin");
    let report = client
        .fetch_to_file(&dataset, &object, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(report.chunks, 11);
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    let upload = random_bytes(7 * CHUNK as usize + 3, 2);
    let (_, pushed) = names("up/b.bin");
    let report = client
        .push_bytes(
            &dataset,
            &pushed,
            Bytes::from(upload.clone()),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.chunks, 8);
    let stored = std::fs::read(sim.server.data_dir().join("scans/up/b.bin")).unwrap();
    assert_eq!(stored, upload, "{}", sim.seed());
}

#[tokio::test(start_paused = true)]
async fn a_stream_reset_mid_chunk_does_not_count_and_the_chunk_is_asked_for_again() {
    let _trace = trace_init();
    let sim = Sim::start_with(7, tuned(BIG_CHUNK)).await;
    // Chunks of several Data frames each, so a reset lands in the middle of one.
    let data = random_bytes(8 * BIG_CHUNK as usize, 3);
    sim.server.put("scans", "a.bin", &data);
    let client = sim.client().await.unwrap();
    let (dataset, object) = names("a.bin");
    sim.net.reset_data_frames(0.15);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.bin");
    let report = client
        .fetch_to_file(&dataset, &object, &dest, &patient(50))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
    assert!(sim.net.resets() > 0, "{}: no stream was reset", sim.seed());
    assert_eq!(std::fs::read(&dest).unwrap(), data, "{}", sim.seed());
    // Every reset chunk was fetched again, so more came over the network than the object.
    assert!(report.fetched_bytes > data.len() as u64, "{}", sim.seed());
    // Into memory as well: nothing of a reset stream is kept.
    let got = client
        .fetch(&dataset, &object, 1 << 30, &patient(50))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
    assert_eq!(&got[..], &data[..], "{}", sim.seed());
}

#[tokio::test(start_paused = true)]
async fn a_connection_lost_mid_transfer_reconnects_and_resumes_from_verified_chunks() {
    let _trace = trace_init();
    let sim = Sim::start(11).await;
    let data = random_bytes(32 * CHUNK as usize, 4);
    sim.server.put("scans", "a.bin", &data);
    let client = sim.client().await.unwrap();
    let (dataset, object) = names("a.bin");
    let (net, cut) = (sim.net.clone(), Arc::new(AtomicBool::new(false)));
    let opts = FetchOptions {
        parallel: Some(2),
        // One connection, whose loss and replacement the test counts.
        connections: Some(1),
        progress: Some(Arc::new({
            let cut = cut.clone();
            move |done, total| {
                if done * 2 >= total && !cut.swap(true, Ordering::Relaxed) {
                    net.cut();
                }
            }
        })),
        ..patient(5)
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.bin");
    let report = client
        .fetch_to_file(&dataset, &object, &dest, &opts)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
    assert!(cut.load(Ordering::Relaxed));
    assert_eq!(std::fs::read(&dest).unwrap(), data, "{}", sim.seed());
    assert_eq!(sim.net.connections(), 2, "{}: one reconnection", sim.seed());
    assert!(report.retries >= 1);
    // Resumed, not restarted: at most the chunks in flight at the cut came twice.
    let again = report.fetched_bytes - data.len() as u64;
    assert!(
        again <= 2 * u64::from(CHUNK),
        "{}: {again} bytes fetched twice",
        sim.seed()
    );
    // The server saw the first transfer interrupted by the cut, and the second end (having
    // served only what was missing).
    let outcomes: Vec<Outcome> = sim
        .server
        .audit
        .events()
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Transfer {
                direction: Direction::Out,
                outcome,
                ..
            } => Some(outcome),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[0], Outcome::Interrupted, "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_holds_bounded_memory_and_times_out_with_a_typed_error() {
    let _trace = trace_init();
    let sim = Sim::start(13).await;
    let data = random_bytes(64 * CHUNK as usize, 5);
    sim.server.put("scans", "a.bin", &data);
    let client = sim.client().await.unwrap();
    let (dataset, object) = names("a.bin");
    sim.net.stall_client_reads(true);
    let started = tokio::time::Instant::now();
    let e = client
        .fetch(&dataset, &object, 1 << 30, &patient(0))
        .await
        .expect_err("a pull nobody reads completed");
    assert!(
        matches!(
            e,
            FetchError::Request(RequestError::Stream(
                libtransport::transport::StreamError::Timeout(_)
            ))
        ),
        "{}: {e:?}",
        sim.seed()
    );
    // It took the I/O timeout (60 s of virtual time), not forever.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(60) && waited < Duration::from_secs(180),
        "{waited:?}"
    );
    // What the server queued for the reader stayed within the streams' queues: a few
    // frames per stream in flight, never the object.
    let high = sim.net.queued_high_water();
    assert!(high > 0, "nothing was sent");
    assert!(high <= 8 * 4 * (1 << 20), "{high} bytes queued");
    assert!(high < data.len(), "{high} bytes queued");
}

#[tokio::test(start_paused = true)]
async fn a_client_of_another_protocol_version_is_refused_with_version() {
    let _trace = trace_init();
    let sim = Sim::start(17).await;
    let e = connect(&sim.net, &sim.pki, |c| c.speaking(7, 9))
        .await
        .expect_err("a hello of versions 7 to 9 was accepted");
    assert!(matches!(e, ConnectError::Version), "{e:?}");
    // This build's version is served.
    assert!(sim.client().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_peer_of_another_trust_domain_is_refused_over_the_sim_too() {
    let _trace = trace_init();
    let sim = Sim::start(19).await;
    let stranger = TestPki::new("partner.example");
    let e = connect(&sim.net, &stranger, |c| c)
        .await
        .expect_err("a stranger connected");
    // The server refused it before its hello (in TLS the stranger's own verifier would
    // have refused the server first) and audited why.
    assert!(
        !matches!(e, ConnectError::Version | ConnectError::Busy),
        "{e:?}"
    );
    let refused = sim.server.audit.events().into_iter().any(|e| {
        matches!(e, AuditEvent::ConnectionRefused { reason, .. } if reason.starts_with("peer identity"))
    });
    assert!(refused, "no refusal audited");
    assert_eq!(sim.net.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_servers_svid_rotating_mid_transfer_renews_the_connection_without_a_failure() {
    let _trace = trace_init();
    let net = SimNet::new(23);
    let pki = TestPki::new("hospital.example");
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let issue = |ttl| {
        let svid = pki.svid_issued_at("/node/storage", ttl, clock.now());
        Credentials::new(svid, pki.bundle()).expect("server credentials")
    };
    let server_id = IdentityHandle::new(issue(SERVER_TTL));
    let first_serial = server_id.current().svid().serial().to_owned();
    let server = TestServer::start_sim_as(
        &pki,
        server_id.clone(),
        &[("/gpu/loader", "scans", true, true)],
        tuning(),
        &net,
        clock.clone(),
    )
    .await;
    let data = random_bytes(32 * CHUNK as usize, 6);
    server.put("scans", "a.bin", &data);
    let id = identity(&pki, "/gpu/loader");
    let config = ClientConfig::builder()
        .identity(id.clone())
        .transport(tuning())
        .clock(clock.clone())
        .build();
    let client = Client::connect_with(config, SERVER_ADDR, Arc::new(net.connector(id)))
        .await
        .unwrap();
    // Half-way, the server's SVID is rotated, and the old one comes within its renewal
    // margin of expiry (still valid: the connection on it is not cut, only replaced).
    let rotated = Arc::new(AtomicBool::new(false));
    let opts = FetchOptions {
        parallel: Some(2),
        retry: RetryPolicy::none(),
        // One connection, whose renewal the test counts.
        connections: Some(1),
        progress: Some(Arc::new({
            let (rotated, clock, server_id) = (rotated.clone(), clock.clone(), server_id.clone());
            let fresh = std::sync::Mutex::new(Some(issue(SERVER_TTL)));
            move |done, total| {
                if done * 2 >= total && !rotated.swap(true, Ordering::Relaxed) {
                    let creds = fresh.lock().unwrap().take().expect("rotated once");
                    server_id.update(creds);
                    clock.advance(SERVER_TTL - Duration::from_secs(1));
                }
            }
        })),
        ..Default::default()
    };
    let (dataset, object) = names("a.bin");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.bin");
    let report = client
        .fetch_to_file(&dataset, &object, &dest, &opts)
        .await
        .unwrap_or_else(|e| panic!("seed {}: {e}", net.seed()));
    assert!(rotated.load(Ordering::Relaxed));
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(report.retries, 0, "the renewal counted as a failure");
    assert_eq!(net.connections(), 2, "the connection was not renewed");
    // The new connection presents the new SVID, which the client verified.
    let serial = client.server().serial;
    assert_ne!(serial, first_serial);
    assert_eq!(serial, server_id.current().svid().serial());
    // Nothing fetched twice: the chunks in flight finished on the old connection.
    assert_eq!(report.fetched_bytes, data.len() as u64);
}

/// The server's SVIDs in the rotation test live this long.
const SERVER_TTL: Duration = Duration::from_secs(60);

/// RDMA sessions through the sim: the real server driver and client driver, the control
/// stream in memory, chunks on the software device over loopback.
///
/// These tests run in real time, not paused: the soft device moves chunks over a loopback
/// TCP socket, and a paused clock would jump to the next timer (a stream's I/O timeout, the
/// device's connect timeout) whenever the runtime waits on that socket.
mod rdma {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

    use libtransport::proto::rdma::{DeviceKind, RdmaControl, RdmaOffer};
    use libtransport::proto::seal::{
        Direction as SealDirection, EXPORTER_BYTES, EXPORTER_LABEL, MAX_OPEN_FAILURES, Placement,
        SessionKeys, exporter_context, sealed_len,
    };
    use libtransport::proto::{ErrorCode, FrameKind, Manifest, Request, Response, TransferId};
    use libtransport::transport::rdma::soft::{SoftConfig, SoftRegion, SoftVerbs};
    use libtransport::transport::rdma::verbs::{CompletionKind, Region, Verbs, WorkId};
    use libtransport::transport::{Connection, Connector, RequestStream};
    use libtransport::{RdmaMode, TransferPath};

    use super::*;

    /// Bytes either side of the offered ring in the region that holds it.
    const GUARD: usize = 4096;
    /// What the region holds before anything is written.
    const FILL: u8 = 0xa5;

    async fn rdma_sim(seed: u64) -> Sim {
        let mut t = tuning();
        t.rdma(RdmaMode::Soft);
        Sim::start_with(seed, t).await
    }

    /// A raw connection of `/gpu/loader`, and an open read transfer of `object`.
    async fn raw_read(
        sim: &Sim,
        object: &str,
    ) -> (Arc<dyn Connection>, RequestStream, TransferId, Manifest) {
        let id = identity(&sim.pki, "/gpu/loader");
        let established = sim
            .net
            .connector(id)
            .connect(SERVER_ADDR)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
        let conn = established.connection;
        let (dataset, object) = names(object);
        let mut s = conn
            .open(Request::OpenRead { dataset, object }.encode())
            .await
            .unwrap();
        let frame = s.source.recv().await.unwrap().expect("an answer");
        assert_eq!(frame.kind, FrameKind::Response, "{}", sim.seed());
        let Response::OpenedRead { transfer, manifest } = Response::decode(&frame.payload).unwrap()
        else {
            panic!("{}: not an open read", sim.seed());
        };
        (conn, s, transfer, manifest)
    }

    /// A soft device on loopback and a region of `GUARD`, a ring of `slots` slots of
    /// `slot_bytes`, and `GUARD` again, filled with `FILL`, a receive posted per slot.
    async fn ring(slots: u32, slot_bytes: u32) -> (SoftVerbs, SoftRegion, RdmaOffer) {
        let mut config = SoftConfig::default();
        config.bind("127.0.0.1:0".parse().unwrap());
        let device = SoftVerbs::bind(Arc::new(config)).await.unwrap();
        let ring_len = slots as usize * slot_bytes as usize;
        let region = device.register(GUARD + ring_len + GUARD).unwrap();
        let len = region.len();
        region.with_mut(0..len, |b| b.fill(FILL)).unwrap();
        for slot in 0..slots as usize {
            device
                .post_recv(
                    WorkId(slot as u64),
                    &region,
                    GUARD + slot * slot_bytes as usize,
                    0,
                )
                .unwrap();
        }
        let remote = region.remote();
        let offer = RdmaOffer {
            device: DeviceKind::Soft,
            info: Bytes::from(device.local_info()),
            ring_addr: remote.addr + GUARD as u64,
            ring_len: ring_len as u64,
            ring_rkey: remote.rkey.0,
            slot_bytes,
            slots,
            unsealed: false,
        };
        (device, region, offer)
    }

    /// The first frame the server answers `s` with after what was sent.
    async fn error_code(s: &mut RequestStream) -> ErrorCode {
        let frame = s.source.recv().await.unwrap().expect("an answer");
        assert_eq!(frame.kind, FrameKind::Error, "{frame:?}");
        ErrorCode::decode(&frame.payload).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rdma_grant_exchange_with_a_bad_grant_is_refused_with_its_code_and_writes_nothing_outside_the_ring()
     {
        let _trace = trace_init();
        let sim = rdma_sim(41).await;
        let data = random_bytes(3 * CHUNK as usize, 41);
        sim.server.put("scans", "g.bin", &data);
        let (conn, _open, transfer, manifest) = raw_read(&sim, "g.bin").await;
        assert_eq!(manifest.chunk_count(), 3);
        let slot_bytes = sealed_len(CHUNK as usize) as u32;
        // Each kind of bad grant, after a good one, in a session of its own.
        let cases: [(&str, Bytes, ErrorCode); 3] = [
            (
                "a slot past the ring",
                RdmaControl::Grant { slot: 2, chunk: 1 }.encode(),
                ErrorCode::Range,
            ),
            (
                "a chunk not in the manifest",
                RdmaControl::Grant { slot: 1, chunk: 3 }.encode(),
                ErrorCode::Range,
            ),
            (
                "not a control message",
                Bytes::from_static(&[7, 0, 0]),
                ErrorCode::Protocol,
            ),
        ];
        for (what, bad, code) in cases {
            let (device, region, offer) = ring(2, slot_bytes).await;
            let mut s = conn
                .open(Request::RdmaOpen { transfer, offer }.encode())
                .await
                .unwrap();
            let frame = s.source.recv().await.unwrap().expect("an answer");
            let Ok(Response::RdmaAccepted { session, info }) = Response::decode(&frame.payload)
            else {
                panic!(
                    "{}: {what}: the session was not accepted: {frame:?}",
                    sim.seed()
                );
            };
            device.connect(&info).await.unwrap();

            // A good grant first: chunk 0 lands sealed in slot 0, as the session's keys say.
            s.sink
                .send(
                    FrameKind::Data,
                    RdmaControl::Grant { slot: 0, chunk: 0 }.encode(),
                )
                .await
                .unwrap();
            let c = device.poll().await.unwrap();
            c.status.unwrap();
            assert_eq!(
                c.kind,
                CompletionKind::WriteWithImm {
                    imm: 0,
                    len: slot_bytes
                },
                "{}: {what}",
                sim.seed()
            );
            let mut exported = [0u8; EXPORTER_BYTES];
            conn.export_keying_material(&mut exported, EXPORTER_LABEL, &exporter_context(&session))
                .unwrap();
            let mut opener =
                SessionKeys::derive(session, &exported).opener(SealDirection::ServerToClient);
            let expect = Placement {
                transfer: transfer.0,
                chunk: 0,
                offset: 0,
                len: CHUNK,
            };
            let at = GUARD..GUARD + slot_bytes as usize;
            let mut sealed = region.with_mut(at, |b| b.to_vec()).unwrap();
            let plain = opener.open(expect, &mut sealed).unwrap();
            assert!(plain == &data[..CHUNK as usize], "{}: {what}", sim.seed());

            // Then the bad one: refused with its code, and the session ends.
            s.sink.send(FrameKind::Data, bad).await.unwrap();
            assert_eq!(error_code(&mut s).await, code, "{}: {what}", sim.seed());

            // Nothing was written but the granted slot: both guards and slot 1 as they were.
            let len = region.len();
            let all = region.with_mut(0..len, |b| b.to_vec()).unwrap();
            let untouched = |r: std::ops::Range<usize>| all[r].iter().all(|&b| b == FILL);
            let ring_end = GUARD + 2 * slot_bytes as usize;
            assert!(
                untouched(0..GUARD),
                "{}: {what}: before the ring",
                sim.seed()
            );
            assert!(
                untouched(GUARD + slot_bytes as usize..ring_end),
                "{}: {what}: slot 1 was never granted",
                sim.seed()
            );
            assert!(
                untouched(ring_end..len),
                "{}: {what}: after the ring",
                sim.seed()
            );
        }
        // The transfer is still good for a pull of the real client, over RDMA.
        let mut t = tuning();
        t.rdma(RdmaMode::Soft);
        let client = rdma_client(&sim, t).await;
        let (dataset, object) = names("g.bin");
        let got = client
            .fetch(&dataset, &object, 1 << 30, &FetchOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
        assert!(got == data, "{}", sim.seed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_of_unsealed_rdma_chunks_is_refused_with_no_rdma() {
        let _trace = trace_init();
        let sim = rdma_sim(43).await;
        sim.server
            .put("scans", "u.bin", &random_bytes(CHUNK as usize, 43));
        let (conn, _open, transfer, _) = raw_read(&sim, "u.bin").await;
        let (_device, region, mut offer) = ring(1, sealed_len(CHUNK as usize) as u32).await;
        offer.unsealed = true;
        let mut s = conn
            .open(Request::RdmaOpen { transfer, offer }.encode())
            .await
            .unwrap();
        assert_eq!(
            error_code(&mut s).await,
            ErrorCode::NoRdma,
            "{}",
            sim.seed()
        );
        let len = region.len();
        assert!(
            region
                .with_mut(0..len, |b| b.iter().all(|&b| b == FILL))
                .unwrap(),
            "{}",
            sim.seed()
        );
    }

    async fn rdma_client(sim: &Sim, transport: TransportConfig) -> Client {
        let config = ClientConfig::builder()
            .identity(identity(&sim.pki, "/gpu/loader"))
            .audit(sim_audit())
            .transport(transport)
            .build();
        Client::connect_with(
            config,
            SERVER_ADDR,
            Arc::new(sim.net.connector(identity(&sim.pki, "/gpu/loader"))),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()))
    }

    fn sim_audit() -> Arc<libtransport::test_util::MemoryAudit> {
        Arc::new(libtransport::test_util::MemoryAudit::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rdma_chunks_that_fail_to_open_abort_the_pull_land_nowhere_and_are_audited() {
        let _trace = trace_init();
        let sim = rdma_sim(47).await;
        let data = random_bytes(3 << 20, 5);
        sim.server.put("scans", "t.bin", &data);
        let (dataset, object) = names("t.bin");
        // The two ends of the client's connection derive different RDMA keys: every chunk
        // fails to open, as one damaged in flight would.
        sim.net.skew_keying_material(true);
        let audit = sim_audit();
        let mut t = tuning();
        t.rdma(RdmaMode::Soft);
        let id = identity(&sim.pki, "/gpu/loader");
        let config = ClientConfig::builder()
            .identity(id.clone())
            .audit(audit.clone())
            .transport(t)
            .build();
        let c = Client::connect_with(config, SERVER_ADDR, Arc::new(sim.net.connector(id)))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
        let opts = FetchOptions {
            retry: RetryPolicy::none(),
            ..FetchOptions::default()
        };
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("t.bin");
        let e = c
            .fetch_to_file(&dataset, &object, &dest, &opts)
            .await
            .expect_err("chunks that fail to open must not make a file");
        assert!(matches!(e, FetchError::Corrupt(_)), "{}: {e}", sim.seed());
        assert!(!dest.exists());
        // Nothing that failed to open was written, not even into the partial file.
        let partial =
            std::fs::read(out.path().join(".t.bin.transportd-partial")).unwrap_or_default();
        assert!(
            partial.iter().all(|&b| b == 0),
            "{}: unverified bytes were written",
            sim.seed()
        );
        let aborted: Vec<_> = audit
            .events()
            .into_iter()
            .filter_map(|e| match e {
                AuditEvent::RdmaAborted { peer, failures, .. } => Some((peer, failures)),
                _ => None,
            })
            .collect();
        assert_eq!(
            aborted,
            vec![(sim.server.id.clone(), MAX_OPEN_FAILURES)],
            "{}",
            sim.seed()
        );
        // In memory too; and the control: the same server's chunks over the stream are fine.
        let e = c
            .fetch(&dataset, &object, u64::MAX, &opts)
            .await
            .expect_err("chunks that fail to open must not be returned");
        assert!(matches!(e, FetchError::Corrupt(_)), "{}: {e}", sim.seed());
        let mut off = tuning();
        off.rdma(RdmaMode::Off);
        let quic = rdma_client(&sim, off).await;
        assert!(
            quic.fetch(&dataset, &object, u64::MAX, &opts)
                .await
                .unwrap()
                == data
        );
        // And a connection whose ends agree moves the same chunks by RDMA.
        sim.net.skew_keying_material(false);
        let mut soft = tuning();
        soft.rdma(RdmaMode::Soft);
        let good = rdma_client(&sim, soft).await;
        let report = good
            .fetch_to_file(&dataset, &object, &dest, &opts)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sim.seed()));
        assert_eq!(report.path, TransferPath::Rdma, "{}", sim.seed());
        assert!(std::fs::read(&dest).unwrap() == data, "{}", sim.seed());
    }
}
