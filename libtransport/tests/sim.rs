//! The real client and server drivers over the in-memory transport (`test_util::sim`):
//! no sockets, virtual time (`start_paused`), seeded faults. Each test prints its seed when
//! it fails, so the same run can be repeated.
//!
//! Tests moved here from the socket suites live in `sim/*.rs`; socket tests keep only what
//! real handshakes, the kernel and hostile bytes on a real wire show.

#[path = "sim/access.rs"]
mod access;
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
