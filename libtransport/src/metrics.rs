//! Telemetry for operators: what a node moved, who it refused, and whether its audit trail
//! and identity are healthy, in the Prometheus text format. The daemon serves it on its
//! admin address; a library user can encode it anywhere.
//!
//! A server also exports its store's counters ([`crate::store::StoreCounters`]): object bytes
//! read to serve peers and bytes hashed to compute manifests.
//!
//! Labels are bounded: paths, directions, outcomes, actions and refusal classes, never
//! identities or object names.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::Store;
use crate::vocab::{Action, Direction, Outcome, Path, TransferPath};

/// The node's metrics. Cheap to share (`Arc`); every method is lock-free or nearly.
pub struct Metrics {
    registry: Registry,
    bytes: Family<PathDirection, Counter>,
    transfers: Family<TransferLabels, Counter>,
    connections: Family<PathLabel, Gauge>,
    aged_out: Counter,
    handshake_failures: Family<ReasonLabel, Counter>,
    handshakes_shed: Family<ReasonLabel, Counter>,
    handshakes: Gauge,
    address_retries: Counter,
    busy: Family<ReasonLabel, Counter>,
    requests_busy: Counter,
    denials: Family<DenialLabels, Counter>,
    emergency_active: Gauge,
    emergency_uses: Counter,
    chunk_failures: Counter,
    audit_errors: Counter,
    audit_breaks: Gauge,
    audit_writable: Gauge,
    unwitnessed: Gauge,
    last_witnessed: Gauge,
    witness_refusals: Gauge,
    svid_expiry: Gauge<f64, AtomicU64>,
    issuer_unreachable: Gauge<f64, AtomicU64>,
    workload_svid_expiry: Gauge<f64, AtomicU64>,
    duration: Family<DirectionLabel, Histogram, fn() -> Histogram>,
    store: Arc<StoreIo>,
    sidecar: Arc<SidecarCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered under `transportd_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("transportd");
        let bytes = Family::<PathDirection, Counter>::default();
        registry.register(
            "bytes",
            "Object bytes moved, by path and direction (out: served or pushed; in: received)",
            bytes.clone(),
        );
        let transfers = Family::<TransferLabels, Counter>::default();
        registry.register(
            "transfers",
            "Transfers ended, by path, direction and outcome",
            transfers.clone(),
        );
        let connections = Family::<PathLabel, Gauge>::default();
        registry.register(
            "connections_active",
            "Authenticated connections open now",
            connections.clone(),
        );
        let aged_out = Counter::default();
        registry.register(
            "connections_aged_out",
            "Connections closed because they reached their maximum age (limits.max_connection_age: automatic logoff); their clients go on over fresh handshakes",
            aged_out.clone(),
        );
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "handshake_failures",
            "Connections refused before any request, by reason",
            handshake_failures.clone(),
        );
        let handshakes_shed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "handshakes_shed",
            "Connection attempts closed before any TLS work because the handshake budget was spent (not audited one by one), by reason (budget: every place taken; per_source: their source's places taken)",
            handshakes_shed.clone(),
        );
        let handshakes = Gauge::default();
        registry.register(
            "handshakes_in_progress",
            "Handshakes of peers not yet authenticated running now",
            handshakes.clone(),
        );
        let address_retries = Counter::default();
        registry.register(
            "quic_address_retries",
            "QUIC connection attempts asked to prove their address (Retry): the handshake budget was half spent or more, or their source's share for unproven addresses was",
            address_retries.clone(),
        );
        let busy = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_busy",
            "Connection attempts told the node is busy, by reason (max_connections: the node's limit; per_identity: the peer identity's limit)",
            busy.clone(),
        );
        let requests_busy = Counter::default();
        registry.register(
            "requests_busy",
            "Requests told the node is busy because their identity had max_requests_per_identity in flight already (across all its connections)",
            requests_busy.clone(),
        );
        let denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "authorization_denials",
            "Requests the policy denied, by action and reason (deny_rule: a deny rule matched; no_rule: default deny)",
            denials.clone(),
        );
        let emergency_active = Gauge::default();
        registry.register(
            "emergency_grants_active",
            "Emergency (break-glass) grants allowing access now: approved and not expired",
            emergency_active.clone(),
        );
        let emergency_uses = Counter::default();
        registry.register(
            "emergency_uses",
            "Accesses the policy alone would have denied that an emergency grant allowed (each is audited as emergency_used)",
            emergency_uses.clone(),
        );
        let chunk_failures = Counter::default();
        registry.register(
            "chunk_verification_failures",
            "Received chunks that did not match their BLAKE3 hash",
            chunk_failures.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit records that could not be written (each refused the work it was about)",
            audit_errors.clone(),
        );
        let audit_breaks = Gauge::default();
        registry.register(
            "audit_trail_breaks",
            "Breaks on record in this node's audit trail (records cut off, changed or torn, found when it started); `transportd audit verify` fails while there are any",
            audit_breaks.clone(),
        );
        let audit_writable = Gauge::default();
        registry.register(
            "audit_writable",
            "1 while the audit trail can be written; 0 while its disk fails or does not answer within audit.write_timeout (new transfers are refused meanwhile)",
            audit_writable.clone(),
        );
        let unwitnessed = Gauge::default();
        registry.register(
            "audit_checkpoints_unwitnessed",
            "Audit checkpoints waiting to be sent to the witness (the issuer by default)",
            unwitnessed.clone(),
        );
        let last_witnessed = Gauge::default();
        registry.register(
            "audit_last_witnessed_seq",
            "Sequence number of the latest audit checkpoint the witness countersigned since the node started (0: none yet)",
            last_witnessed.clone(),
        );
        let witness_refusals = Gauge::default();
        registry.register(
            "audit_witness_refusals",
            "Audit checkpoints the witness refused since the node started: the trail was rewritten or cut back after it was witnessed",
            witness_refusals.clone(),
        );
        let svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "svid_expiry_seconds",
            "Seconds until this node's SVID expires (negative: expired)",
            svid_expiry.clone(),
        );
        let issuer_unreachable = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "issuer_unreachable_seconds",
            "Seconds since this node's agent last failed to reach its issuer without reaching it since (0: reachable, or no agent); meanwhile it serves on what it holds",
            issuer_unreachable.clone(),
        );
        let workload_svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "workload_svid_expiry_seconds",
            "Seconds until the soonest of the workload SVIDs this node's agent serves expires (negative: expired; 0 when it serves none)",
            workload_svid_expiry.clone(),
        );
        let duration: Family<DirectionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 12)));
        registry.register(
            "transfer_duration_seconds",
            "Transfer durations, by direction",
            duration.clone(),
        );
        let store = Arc::new(StoreIo::default());
        registry.register_collector(Box::new(store.clone()));
        let sidecar = Arc::new(SidecarCounters::default());
        registry.register_collector(Box::new(SidecarIo(sidecar.clone())));
        Self {
            registry,
            bytes,
            transfers,
            connections,
            aged_out,
            handshake_failures,
            handshakes_shed,
            handshakes,
            address_retries,
            busy,
            requests_busy,
            denials,
            emergency_active,
            emergency_uses,
            chunk_failures,
            audit_errors,
            audit_breaks,
            audit_writable,
            unwitnessed,
            last_witnessed,
            witness_refusals,
            svid_expiry,
            issuer_unreachable,
            workload_svid_expiry,
            duration,
            store,
            sidecar,
        }
    }

    /// The sidecar's counters, which it updates; exported once a sidecar has
    /// [`SidecarCounters::enable`]d them.
    pub fn sidecar(&self) -> Arc<SidecarCounters> {
        self.sidecar.clone()
    }

    /// Exports `store`'s counters from now on (a server calls this with its store). The
    /// metrics do not keep the store alive.
    pub fn observe_store(&self, store: &Arc<Store>) {
        *self.store.0.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(store);
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A transfer ended.
    pub fn transfer_ended(
        &self,
        path: TransferPath,
        direction: Direction,
        outcome: Outcome,
        bytes: u64,
        elapsed: Duration,
    ) {
        let direction = direction_label(direction);
        self.bytes
            .get_or_create(&PathDirection {
                path: path.as_str().into(),
                direction: direction.into(),
            })
            .inc_by(bytes);
        self.transfers
            .get_or_create(&TransferLabels {
                path: path.as_str().into(),
                direction: direction.into(),
                outcome: format!("{outcome:?}").to_lowercase(),
            })
            .inc();
        self.duration
            .get_or_create(&DirectionLabel {
                direction: direction.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A connection was authenticated; the returned guard counts it until dropped.
    pub fn connection_opened(&self, path: Path) -> ConnectionGuard {
        let gauge = self
            .connections
            .get_or_create(&PathLabel {
                path: path.as_str().into(),
            })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// A connection was closed because it reached its maximum age.
    pub fn connection_aged_out(&self) {
        self.aged_out.inc();
    }

    /// A connection was refused before any request; `reason` is a short class.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// A connection attempt was closed unanswered: the handshake budget was spent.
    /// `per_source`: its source's share of it.
    pub fn handshake_shed(&self, per_source: bool) {
        self.handshakes_shed
            .get_or_create(&ReasonLabel {
                reason: if per_source { "per_source" } else { "budget" }.into(),
            })
            .inc();
    }

    /// A handshake of a peer not yet authenticated began; the guard counts it until dropped.
    pub fn handshake_started(&self) -> ConnectionGuard {
        self.handshakes.inc();
        ConnectionGuard(self.handshakes.clone())
    }

    /// A QUIC connection attempt was asked to prove its address first.
    pub fn address_retry(&self) {
        self.address_retries.inc();
    }

    /// A connection attempt was told the node is busy. `per_identity`: its identity holds
    /// all the connections it may; otherwise the node is at its connection limit.
    pub fn busy(&self, per_identity: bool) {
        self.busy
            .get_or_create(&ReasonLabel {
                reason: if per_identity {
                    "per_identity"
                } else {
                    "max_connections"
                }
                .into(),
            })
            .inc();
    }

    /// A request was told the node is busy: its identity had all the requests in flight it
    /// may.
    pub fn request_busy(&self) {
        self.requests_busy.inc();
    }

    /// The policy denied a request; `by_rule` if a deny rule matched rather than no rule
    /// allowing it.
    pub fn denial(&self, action: Action, by_rule: bool) {
        self.denials
            .get_or_create(&DenialLabels {
                action: action.as_str().into(),
                reason: if by_rule { "deny_rule" } else { "no_rule" }.into(),
            })
            .inc();
    }

    /// Sets how many emergency grants allow access now.
    pub fn set_emergency_grants_active(&self, n: usize) {
        self.emergency_active
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An emergency grant allowed an access the policy alone would have denied.
    pub fn emergency_used(&self) {
        self.emergency_uses.inc();
    }

    /// A received chunk failed verification.
    pub fn chunk_failed(&self) {
        self.chunk_failures.inc();
    }

    /// An audit record could not be written.
    pub fn audit_error(&self) {
        self.audit_errors.inc();
    }

    /// Sets whether the audit trail can be written now.
    pub fn set_audit_writable(&self, writable: bool) {
        self.audit_writable.set(i64::from(writable));
    }

    /// Sets the breaks on record in the node's audit trail.
    pub fn set_audit_trail_breaks(&self, breaks: u64) {
        self.audit_breaks
            .set(i64::try_from(breaks).unwrap_or(i64::MAX));
    }

    /// Sets where witnessing of the audit trail's checkpoints stands.
    pub fn set_audit_witness(&self, unwitnessed: usize, last_witnessed: u64, refusals: u64) {
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.unwitnessed.set(g(unwitnessed as u64));
        self.last_witnessed.set(g(last_witnessed));
        self.witness_refusals.set(g(refusals));
    }

    /// Sets the seconds until the node's SVID expires.
    pub fn set_svid_expiry(&self, seconds: f64) {
        self.svid_expiry.set(seconds);
    }

    /// Sets how the node's agent stands with its issuer: seconds it has been unreachable
    /// (0 when reachable), and seconds until the soonest workload SVID it serves expires
    /// (0 when it serves none).
    pub fn set_issuer_status(&self, unreachable_seconds: f64, workload_svid_expiry: f64) {
        self.issuer_unreachable.set(unreachable_seconds);
        self.workload_svid_expiry.set(workload_svid_expiry);
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// What a sidecar's local data API did: its cache's hits and misses, bytes handed to local
/// callers by where they came from, and its callers. Lock-free; read at each scrape.
#[derive(Debug, Default)]
pub struct SidecarCounters {
    enabled: std::sync::atomic::AtomicBool,
    /// Objects handed over from memory or the sealed cache.
    pub hits: AtomicU64,
    /// Objects that had to be fetched from a storage node.
    pub misses: AtomicU64,
    /// Bytes handed to callers from memory (a mapping already held).
    pub bytes_memory: AtomicU64,
    /// Bytes handed to callers from the sealed cache.
    pub bytes_cache: AtomicU64,
    /// Bytes handed to callers after a fetch from a storage node.
    pub bytes_network: AtomicU64,
    /// Bytes written to callers through the local socket itself (headers, inline reads).
    pub socket_bytes: AtomicU64,
    /// Entries the sealed cache evicted to make room.
    pub evictions: AtomicU64,
    /// Sealed bytes the cache holds on disk.
    pub cache_bytes: AtomicU64,
    /// Local callers connected now.
    pub callers: AtomicU64,
    /// Local requests refused: the caller matched no registration entry.
    pub denied: AtomicU64,
    /// Local callers turned away because the sidecar served as many as it takes at once.
    pub busy: AtomicU64,
    /// Local connections closed for idling, or for stalling in the middle of a request.
    pub timeouts: AtomicU64,
}

impl SidecarCounters {
    /// Exports these counters from now on.
    pub fn enable(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The sidecar counters' collector.
#[derive(Debug)]
struct SidecarIo(Arc<SidecarCounters>);

impl Collector for SidecarIo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0;
        if !c.enabled.load(Relaxed) {
            return Ok(());
        }
        for (name, help, value) in [
            (
                "sidecar_cache_hits",
                "Objects the sidecar handed over from memory or its sealed cache",
                c.hits.load(Relaxed),
            ),
            (
                "sidecar_cache_misses",
                "Objects the sidecar fetched from a storage node for a local caller",
                c.misses.load(Relaxed),
            ),
            (
                "sidecar_cache_evictions",
                "Entries the sidecar's sealed cache removed to make room",
                c.evictions.load(Relaxed),
            ),
            (
                "sidecar_local_denied",
                "Local requests refused because the caller matched no registration entry",
                c.denied.load(Relaxed),
            ),
            (
                "sidecar_local_busy",
                "Local callers the sidecar turned away because it served as many as it takes",
                c.busy.load(Relaxed),
            ),
            (
                "sidecar_local_timeouts",
                "Local connections the sidecar closed for idling or stalling mid-request",
                c.timeouts.load(Relaxed),
            ),
            (
                "sidecar_socket_bytes",
                "Bytes written to local callers through the sidecar's socket (headers, inline reads)",
                c.socket_bytes.load(Relaxed),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let family = ConstFamily([
            ("memory", c.bytes_memory.load(Relaxed)),
            ("cache", c.bytes_cache.load(Relaxed)),
            ("network", c.bytes_network.load(Relaxed)),
        ]);
        let metric = encoder.encode_descriptor(
            "sidecar_handed_bytes",
            "Object bytes the sidecar handed to local callers, by where they came from",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        family.encode(metric)?;
        for (name, help, value) in [
            (
                "sidecar_cache_bytes",
                "Sealed bytes the sidecar's cache holds on disk",
                c.cache_bytes.load(Relaxed),
            ),
            (
                "sidecar_local_callers",
                "Local callers connected to the sidecar now",
                c.callers.load(Relaxed),
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Counters labelled by where the bytes came from.
struct ConstFamily([(&'static str, u64); 3]);

impl ConstFamily {
    fn encode(&self, mut metric: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
        for (source, value) in self.0 {
            let labels = [("source", source)];
            let enc = metric.encode_family(&labels)?;
            ConstCounter::new(value).encode(enc)?;
        }
        Ok(())
    }
}

/// The store whose counters are read at each scrape.
#[derive(Debug, Default)]
struct StoreIo(Mutex<Weak<Store>>);

impl Collector for StoreIo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let store = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        let Some(store) = store else {
            return Ok(());
        };
        let c = store.io_counters();
        for (name, help, value) in [
            (
                "store_read_bytes",
                "Object bytes read from the store to serve peers (streamed and RDMA)",
                c.bytes_read,
            ),
            (
                "manifest_hashed_bytes",
                "Object bytes read and hashed to compute manifests",
                c.bytes_hashed,
            ),
            (
                "manifest_builds_waited",
                "Manifest builds that waited for a place (the store's cap on builds at once)",
                c.builds_waited,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (name, help, value) in [
            (
                "manifest_builds_running",
                "Manifests being computed now",
                c.builds_running,
            ),
            (
                "manifest_builds_waiting",
                "Requests waiting for a place to compute a manifest",
                c.builds_waiting,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let p = store.partial_usage();
        for (name, help, value) in [
            (
                "partial_files_expired",
                "Partial files of pushes removed because they were untouched past [limits] partial_max_age (each audited)",
                p.expired,
            ),
            (
                "partial_files_replaced",
                "Partial files of pushes removed because their push resumed with another manifest (each audited)",
                p.replaced,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (name, help, value) in [
            (
                "partial_files",
                "Partial files of pushes on the node now",
                p.files,
            ),
            (
                "partial_claimed_bytes",
                "Bytes the partial files of pushes claim now (their manifests' sizes)",
                p.claimed_bytes,
            ),
            (
                "partial_quota_bytes",
                "The quota on what partial files of pushes may claim ([limits] partial_quota)",
                p.quota_bytes,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Counts one open connection (or handshake in progress) until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::Out => "out",
        Direction::In => "in",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathDirection {
    path: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    path: String,
    direction: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    action: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_counters_are_exported_once_a_sidecar_enables_them() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = Metrics::new();
        let c = m.sidecar();
        c.hits.fetch_add(7, Relaxed);
        assert!(
            !m.encode().contains("sidecar"),
            "exported without a sidecar"
        );
        c.enable();
        c.misses.fetch_add(1, Relaxed);
        c.bytes_network.fetch_add(100, Relaxed);
        c.callers.fetch_add(2, Relaxed);
        let text = m.encode();
        for line in [
            "transportd_sidecar_cache_hits_total 7",
            "transportd_sidecar_cache_misses_total 1",
            "transportd_sidecar_handed_bytes_total{source=\"network\"} 100",
            "transportd_sidecar_handed_bytes_total{source=\"memory\"} 0",
            "transportd_sidecar_local_callers 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn counters_move_and_encode_with_bounded_labels() {
        let m = Metrics::new();
        m.transfer_ended(
            TransferPath::Rdma,
            Direction::Out,
            Outcome::Complete,
            1234,
            Duration::from_millis(20),
        );
        m.denial(Action::Read, false);
        m.handshake_failed("certificate");
        m.handshake_shed(true);
        m.busy(true);
        let h = m.handshake_started();
        let g = m.connection_opened(Path::Tcp);
        let text = m.encode();
        assert!(
            text.contains(r#"transportd_bytes_total{path="rdma",direction="out"} 1234"#),
            "{text}"
        );
        assert!(text.contains(
            r#"transportd_transfers_total{path="rdma",direction="out",outcome="complete"} 1"#
        ));
        assert!(text.contains(
            r#"transportd_authorization_denials_total{action="read",reason="no_rule"} 1"#
        ));
        assert!(text.contains(r#"transportd_handshake_failures_total{reason="certificate"} 1"#));
        assert!(text.contains(r#"transportd_connections_active{path="tcp"} 1"#));
        assert!(text.contains(r#"transportd_handshakes_shed_total{reason="per_source"} 1"#));
        assert!(text.contains(r#"transportd_connections_busy_total{reason="per_identity"} 1"#));
        assert!(
            text.contains("transportd_handshakes_in_progress 1\n"),
            "{text}"
        );
        drop(h);
        assert!(m.encode().contains("transportd_handshakes_in_progress 0\n"));
        assert!(text.contains("transportd_transfer_duration_seconds_count{direction=\"out\"} 1"));
        drop(g);
        assert!(
            m.encode()
                .contains(r#"transportd_connections_active{path="tcp"} 0"#)
        );
    }

    #[test]
    fn store_counters_are_exported_while_the_store_lives() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("scans")).unwrap();
        std::fs::write(tmp.path().join("scans/a.bin"), vec![3u8; 100_000]).unwrap();
        let store = Arc::new(Store::open(tmp.path(), None, 64 << 10).unwrap());
        let m = Metrics::new();
        assert!(!m.encode().contains("store_read_bytes"), "no store yet");
        m.observe_store(&store);
        let dataset = crate::proto::DatasetName::new("scans").unwrap();
        let object = crate::proto::ObjectPath::new("a.bin").unwrap();
        let reader = store.open_read(&dataset, &object).unwrap();
        reader.read_at(0, 1000).unwrap();
        let text = m.encode();
        assert!(
            text.contains("transportd_store_read_bytes_total 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("transportd_manifest_hashed_bytes_total 100000\n"),
            "{text}"
        );
        for line in [
            "transportd_partial_files 0\n",
            "transportd_partial_files_expired_total 0\n",
            "transportd_partial_files_replaced_total 0\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        drop((reader, store));
        assert!(!m.encode().contains("store_read_bytes"));
    }
}
