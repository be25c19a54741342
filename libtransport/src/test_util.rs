//! Test helpers (feature `test-util`): a tracing subscriber, an in-memory audit sink,
//! identities minted per test, a clock that moves when told, a loopback server over a
//! temporary store, and an in-memory transport with seeded faults ([`sim`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use certs::SpiffeId;
use certs::test_util::TestPki;

use crate::audit::{AuditError, AuditEvent, AuditRecord, AuditSink};
use crate::clock::{Clock, SystemClock};
use crate::config::{ClientConfig, PolicyHandle, ServerConfig, TransportConfig};
use crate::identity::{Credentials, IdentityHandle};
use crate::policy::{AccessList, Grant};
use crate::proto::DatasetName;
use crate::server::{Server, ServerHandle};
use crate::store::Store;

pub mod sim;

/// Routes `tracing` output to the test harness for the rest of the test. Set
/// `TRANSPORTD_TEST_LOG` (an env-filter) for more than warnings.
pub fn trace_init() -> tracing::subscriber::DefaultGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRANSPORTD_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let sub = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .finish();
    tracing::subscriber::set_default(sub)
}

/// Keeps audit records in memory; can be told to fail, like a full disk.
#[derive(Debug, Default)]
pub struct MemoryAudit {
    records: Mutex<Vec<AuditRecord>>,
    failing: std::sync::atomic::AtomicBool,
}

impl MemoryAudit {
    /// Every event so far, in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|r| r.event.clone())
            .collect()
    }

    /// Waits up to 5 s until the events satisfy `pred`: a server records a refusal just
    /// after it has sent it, so a test may see the refusal first.
    pub async fn wait_for(&self, pred: impl Fn(&[AuditEvent]) -> bool) -> bool {
        for _ in 0..500 {
            if pred(&self.events()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pred(&self.events())
    }
}

impl MemoryAudit {
    /// From now on every write fails (`true`) or succeeds again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::Relaxed);
    }
}

impl AuditSink for MemoryAudit {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(AuditError::Io(std::io::Error::from(
                std::io::ErrorKind::StorageFull,
            )));
        }
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record.clone());
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A clock that stands still until told to move; wall time and monotonic time move together.
#[derive(Debug)]
pub struct ManualClock {
    wall: SystemTime,
    mono: Instant,
    moved: Mutex<Duration>,
}

impl ManualClock {
    /// A clock reading `now`.
    pub fn new(now: SystemTime) -> Self {
        Self {
            wall: now,
            mono: SystemClock.instant(),
            moved: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.moved.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }

    fn moved(&self) -> Duration {
        *self.moved.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.wall + self.moved()
    }

    fn instant(&self) -> Instant {
        self.mono + self.moved()
    }
}

/// Credentials for `spiffe://<pki's trust domain><path>`, issued through the CSR path.
pub fn identity(pki: &TestPki, path: &str) -> IdentityHandle {
    identity_of(pki.svid(path), pki.bundle())
}

/// Credentials from any SVID (broken ones too) and a bundle.
pub fn identity_of(svid: certs::Svid, bundle: certs::TrustBundle) -> IdentityHandle {
    IdentityHandle::new(Credentials::new(svid, bundle).expect("test credentials"))
}

/// A client config for `path` in `pki`'s trust domain.
pub fn client_config(pki: &TestPki, path: &str) -> ClientConfig {
    ClientConfig::builder()
        .identity(identity(pki, path))
        .build()
}

/// Rebuilds the audit trail in `dir` as root on its node could, with the node's key in
/// `signer`: the records up to `keep` (all if `None`), each passed through `edit` (which
/// returns whether it changed the record). From the first changed record on, every record
/// is chained again and every checkpoint signed again; the lines before it stay byte for
/// byte. The result is one segment and a `checkpoint.json` naming its last record, so
/// `verify` passes it. Returns the seq of the first changed record.
pub fn rebuild_trail(
    dir: &std::path::Path,
    signer: &dyn crate::audit::Signer,
    keep: Option<u64>,
    mut edit: impl FnMut(&mut serde_json::Value) -> bool,
) -> Option<u64> {
    use crate::audit::{checkpoint_message, hash_line};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("trail directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    segments.sort();
    let mut out = Vec::new();
    let mut prev = crate::audit::GENESIS;
    let mut changed_at = None;
    let mut last = 0;
    for segment in &segments {
        let text = std::fs::read(segment).expect("segment");
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut v: serde_json::Value = serde_json::from_slice(line).expect("record");
            let seq = v["seq"].as_u64().expect("seq");
            if keep.is_some_and(|k| seq > k) {
                break;
            }
            if edit(&mut v) && changed_at.is_none() {
                changed_at = Some(seq);
            }
            let bytes = if changed_at.is_none() {
                line.to_vec()
            } else {
                v["prev"] = prev.to_hex().into();
                if v["event"] == "checkpoint" {
                    let sig = signer
                        .sign_checkpoint(&checkpoint_message(seq, &prev))
                        .expect("sign");
                    v["signer"] = sig.signer.as_str().into();
                    v["alg"] = sig.alg.into();
                    v["chain"] = sig.chain.iter().map(|c| hex(c)).collect();
                    v["signature"] = hex(&sig.signature).into();
                }
                serde_json::to_vec(&v).expect("encode")
            };
            prev = hash_line(&bytes);
            last = seq;
            out.extend_from_slice(&bytes);
            out.push(b'\n');
        }
    }
    for segment in &segments {
        std::fs::remove_file(segment).expect("remove segment");
    }
    std::fs::write(dir.join("audit-000001.jsonl"), out).expect("write segment");
    let head = serde_json::json!({
        "segment": "audit-000001.jsonl",
        "seq": last,
        "hash": prev.to_hex(),
    });
    std::fs::write(dir.join("checkpoint.json"), head.to_string()).expect("checkpoint.json");
    // And, as an insider would, the note of the last fsynced record, which would otherwise
    // give a trail cut back away at the next start.
    let _ = std::fs::remove_file(dir.join("synced"));
    changed_at
}

/// Deterministic pseudo-random bytes (BLAKE3 output stream of `seed`).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Refusals before authentication that `events` account for: each `ConnectionRefused`
/// recorded on its own, plus the counts of `ConnectionsRefused` (see
/// [`TransportConfig::refusal_window`]), of one kind (`"timeout"`, `"certificate"`, ...) or
/// of every kind.
pub fn refusals_accounted(events: &[AuditEvent], class: Option<&str>) -> u64 {
    let wanted = |c: &str| class.is_none_or(|want| want == c);
    events
        .iter()
        .map(|e| match e {
            AuditEvent::ConnectionRefused { class, .. } if wanted(class) => 1,
            AuditEvent::ConnectionsRefused { class, count, .. } if wanted(class) => *count,
            _ => 0,
        })
        .sum()
}

/// A server on loopback (QUIC and TCP) over a temporary store.
#[derive(Debug)]
pub struct TestServer {
    /// The running server.
    pub handle: ServerHandle,
    /// Holds the store and state directories.
    pub dir: tempfile::TempDir,
    /// What the server audited.
    pub audit: Arc<MemoryAudit>,
    /// The server's SPIFFE ID.
    pub id: SpiffeId,
    /// The configuration it runs with.
    pub config: ServerConfig,
}

/// One access grant for [`TestServer::start`]: peer path, dataset, read, write.
pub type TestGrant<'a> = (&'a str, &'a str, bool, bool);

impl TestServer {
    /// Starts a server identified as `/node/storage`, granting `grants` (peer paths are in
    /// `pki`'s trust domain) and creating each granted dataset directory.
    pub async fn start(pki: &TestPki, grants: &[TestGrant<'_>]) -> Self {
        Self::start_with(pki, grants, TransportConfig::default()).await
    }

    /// Like [`TestServer::start`] with tuning knobs.
    pub async fn start_with(
        pki: &TestPki,
        grants: &[TestGrant<'_>],
        transport: TransportConfig,
    ) -> Self {
        Self::start_as(pki, identity(pki, "/node/storage"), grants, transport).await
    }

    /// Like [`TestServer::start_with`], presenting `identity` (which may be broken).
    pub async fn start_as(
        pki: &TestPki,
        identity: IdentityHandle,
        grants: &[TestGrant<'_>],
        transport: TransportConfig,
    ) -> Self {
        Self::start_on(
            pki,
            identity,
            grants,
            transport,
            None,
            Arc::new(SystemClock),
        )
        .await
    }

    /// Like [`TestServer::start_with`], serving on `net` at [`sim::SERVER_ADDR`] instead
    /// of loopback sockets.
    pub async fn start_sim(
        pki: &TestPki,
        grants: &[TestGrant<'_>],
        transport: TransportConfig,
        net: &sim::SimNet,
    ) -> Self {
        let id = identity(pki, "/node/storage");
        Self::start_sim_as(pki, id, grants, transport, net, Arc::new(SystemClock)).await
    }

    /// Like [`TestServer::start_sim`], presenting `identity` and reading time from `clock`.
    pub async fn start_sim_as(
        pki: &TestPki,
        identity: IdentityHandle,
        grants: &[TestGrant<'_>],
        transport: TransportConfig,
        net: &sim::SimNet,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::start_on(pki, identity, grants, transport, Some(net), clock).await
    }

    async fn start_on(
        pki: &TestPki,
        identity: IdentityHandle,
        grants: &[TestGrant<'_>],
        transport: TransportConfig,
        net: Option<&sim::SimNet>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        let mut acl = AccessList::new();
        let td = pki.bundle().trust_domain().clone();
        for (peer, dataset, read, write) in grants {
            std::fs::create_dir_all(root.join(dataset)).expect("dataset dir");
            acl.grant(Grant {
                peer: SpiffeId::from_parts(&td, peer).expect("peer id"),
                dataset: DatasetName::new(dataset).expect("dataset name"),
                read: *read,
                write: *write,
            });
        }
        std::fs::create_dir_all(&root).expect("store root");
        let store = Store::open(&root, Some(dir.path().join("state")), transport.chunk_bytes)
            .expect("store");
        let id = identity.current().id().clone();
        let audit = Arc::new(MemoryAudit::default());
        let config = ServerConfig::builder()
            .identity(identity)
            .policy(PolicyHandle::new(Arc::new(acl)))
            .store(Arc::new(store))
            .audit(audit.clone())
            .transport(transport)
            .clock(clock)
            .build();
        let server = match net {
            Some(net) => {
                let listener = net.listen(sim::SERVER_ADDR, config.identity.clone());
                Server::with_listeners(config.clone(), vec![Box::new(listener)])
            }
            None => {
                let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
                Server::bind(config.clone(), Some(loopback), Some(loopback))
                    .await
                    .expect("bind")
            }
        };
        Self {
            handle: server.spawn(),
            dir,
            audit,
            id,
            config,
        }
    }

    /// The store's root directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes an object straight into the store.
    pub fn put(&self, dataset: &str, path: &str, bytes: &[u8]) -> PathBuf {
        let p = self.data_dir().join(dataset).join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("object dir");
        }
        std::fs::write(&p, bytes).expect("object");
        p
    }

    /// The address for `path`.
    pub fn addr(&self, path: crate::vocab::Path) -> SocketAddr {
        match path {
            crate::vocab::Path::Quic => self.handle.quic_addr(),
            crate::vocab::Path::Tcp => self.handle.tcp_addr(),
        }
        .expect("listening")
    }
}

/// A rustls server-certificate verifier that accepts any certificate (signatures are still
/// checked). For raw test clients that probe a server's refusals: they test the server, not
/// themselves.
#[derive(Debug)]
pub struct AcceptAnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// When [`sample_trail`]'s first record was made: 2026-11-20T10:00:00Z.
pub fn sample_trail_start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_168_800)
}

/// Writes a known audit trail into `dir` with a [`crate::audit::FileSink`], signed by
/// `spiffe://<pki>/node/storage`, one record a minute after [`sample_trail_start`], and
/// closes it. It holds, in order: a policy load (`ct-*` is phi, `imagenet` public; GPU
/// workloads read and list), the node's identity loaded, `gpu/0` allowed to read `ct-head`
/// twice and a transfer of 1000 bytes over QUIC, `intruder` denied reading `ct-head` (no
/// rule allows it), `gpu/1` allowed to list `imagenet` and a transfer of 500 bytes over
/// TCP, a connection refused from 192.0.2.9 (no certificate), an SVID issued to `gpu/2`,
/// the node's identity rotated, `node/bad` banned, a second policy load (adds a deny rule
/// for `ct-secret`), and a policy refused.
pub fn sample_trail(dir: &std::path::Path, pki: &TestPki) {
    use crate::audit::{FileSink, FileSinkConfig, Signer};
    use crate::policy::{DataClass, Policy};
    use crate::proto::{Digest, ObjectPath};
    use crate::vocab::{Action, DecisionKind, Direction, Outcome, Path, TransferPath};

    let start = sample_trail_start();
    let clock = Arc::new(ManualClock::new(start));
    let signer: Arc<dyn Signer> = Arc::new(identity(pki, "/node/storage"));
    let mut cfg = FileSinkConfig::new(dir);
    cfg.checkpoint_interval = Duration::from_secs(24 * 3600);
    let sink = FileSink::open(cfg, signer, clock.clone()).expect("opening the sample trail");
    let td = pki.id("/node").trust_domain_name().to_owned();
    let policy_v1 = format!(
        r#"
[[dataset]]
name = "ct-*"
class = "phi"

[[dataset]]
name = "imagenet"
class = "public"

[[rule]]
name = "loaders read"
subjects = ["spiffe://{td}/gpu/*"]
datasets = ["ct-*", "imagenet"]
actions = ["read", "list"]
"#
    );
    let policy_v2 = format!(
        "{policy_v1}
[[rule]]
name = \"no one reads ct-secret\"
effect = \"deny\"
subjects = [\"*\"]
datasets = [\"ct-secret\"]
actions = [\"read\"]
"
    );
    let policy = |text: &str| Policy::parse(text).expect("sample policy");
    let ds = |n: &str| DatasetName::new(n).expect("dataset name");
    let obj = |n: &str| ObjectPath::new(n).expect("object path");
    let node = pki.id("/node/storage");
    let gpu0 = pki.id("/gpu/0");
    let gpu1 = pki.id("/gpu/1");
    let root = Digest([7; 32]);
    let addr: SocketAddr = "192.0.2.9:5000".parse().expect("address");
    let events = vec![
        AuditEvent::policy_loaded(
            "/etc/transportd/policy.toml".into(),
            Digest::of(policy_v1.as_bytes()),
            &policy(&policy_v1),
        ),
        AuditEvent::IdentityLoaded {
            id: node.clone(),
            serial: "01aa".into(),
            not_after: start + Duration::from_secs(3600),
        },
        AuditEvent::Authorization {
            peer: gpu0.clone(),
            action: Action::Read,
            dataset: ds("ct-head"),
            object: Some(obj("train/a.bin")),
            class: Some(DataClass::Phi),
            decision: DecisionKind::Allow,
            rule: Some("loaders read".into()),
            reason: None,
        },
        AuditEvent::Authorization {
            peer: gpu0.clone(),
            action: Action::Read,
            dataset: ds("ct-head"),
            object: Some(obj("train/b.bin")),
            class: Some(DataClass::Phi),
            decision: DecisionKind::Allow,
            rule: Some("loaders read".into()),
            reason: None,
        },
        AuditEvent::Transfer {
            peer: gpu0.clone(),
            direction: Direction::Out,
            dataset: ds("ct-head"),
            object: obj("train/a.bin"),
            bytes: 1000,
            root,
            path: TransferPath::Quic,
            outcome: Outcome::Complete,
            duration_ms: 5,
        },
        AuditEvent::Authorization {
            peer: pki.id("/intruder"),
            action: Action::Read,
            dataset: ds("ct-head"),
            object: Some(obj("train/a.bin")),
            class: Some(DataClass::Phi),
            decision: DecisionKind::Deny,
            rule: None,
            reason: Some("no rule allows it".into()),
        },
        AuditEvent::Authorization {
            peer: gpu1.clone(),
            action: Action::List,
            dataset: ds("imagenet"),
            object: None,
            class: Some(DataClass::Public),
            decision: DecisionKind::Allow,
            rule: Some("loaders read".into()),
            reason: None,
        },
        AuditEvent::Transfer {
            peer: gpu1,
            direction: Direction::Out,
            dataset: ds("imagenet"),
            object: obj("val/x.jpg"),
            bytes: 500,
            root,
            path: TransferPath::Tcp,
            outcome: Outcome::Complete,
            duration_ms: 2,
        },
        AuditEvent::ConnectionRefused {
            addr,
            path: Path::Tcp,
            reason: "TLS: peer sent no certificates".into(),
            class: "certificate".into(),
        },
        AuditEvent::SvidIssued {
            id: pki.id("/gpu/2"),
            serial: "02bb".into(),
            kind: "node".into(),
            requester: None,
            how: "join_token".into(),
            not_after: start + Duration::from_secs(7200),
        },
        AuditEvent::IdentityRotated {
            id: node,
            serial: "03cc".into(),
            previous: "01aa".into(),
            not_after: start + Duration::from_secs(7200),
        },
        AuditEvent::NodeBanned {
            node: pki.id("/node/bad"),
            revoked: vec!["04dd".into()],
        },
        AuditEvent::policy_loaded(
            "/etc/transportd/policy.toml".into(),
            Digest::of(policy_v2.as_bytes()),
            &policy(&policy_v2),
        ),
        AuditEvent::PolicyRefused {
            source: "/etc/transportd/policy.toml".into(),
            reason: "line 3: unknown field `subject`".into(),
        },
    ];
    for (i, event) in events.into_iter().enumerate() {
        clock.advance(Duration::from_secs(60));
        let time = start + Duration::from_secs(60 * (i as u64 + 1));
        sink.record(&AuditRecord { time, event })
            .expect("writing the sample trail");
    }
    sink.close().expect("closing the sample trail");
}
