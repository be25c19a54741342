//! Configuration: tuning knobs ([`TransportConfig`]) and the security choices of servers and
//! clients ([`ServerConfig`], [`ClientConfig`]), which can only be built once identity,
//! policy and store are given.

use std::sync::Arc;
use std::time::Duration;

use certs::SpiffeId;
use tokio::sync::watch;

use crate::audit::{AuditSink, NoAudit};
use crate::clock::{Clock, SystemClock};
use crate::identity::IdentityHandle;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::proto::manifest::{DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use crate::store::Store;

/// Tuning knobs. The defaults suit a data-center network between storage and GPU nodes:
/// large windows so one connection can fill a fast link, limits that keep a hostile or
/// broken peer from holding more than a few hundred MiB.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub(crate) max_streams: u32,
    pub(crate) max_transfers: u32,
    pub(crate) max_connections: u32,
    pub(crate) max_connections_per_identity: u32,
    pub(crate) max_requests_per_identity: u32,
    pub(crate) max_handshakes: u32,
    pub(crate) max_handshakes_per_source: u32,
    pub(crate) max_buffered_bytes: u64,
    pub(crate) max_memory_bytes: u64,
    pub(crate) parallel_chunks: u32,
    pub(crate) chunk_bytes: u32,
    pub(crate) handshake_timeout: Duration,
    pub(crate) refusal_window: Duration,
    pub(crate) address_validation: AddressValidation,
    pub(crate) idle_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) io_timeout: Duration,
    pub(crate) max_connection_age: Duration,
    pub(crate) connection_age_grace: Duration,
    pub(crate) stream_window: u32,
    pub(crate) connection_window: u32,
    pub(crate) initial_mtu: u16,
    pub(crate) max_mtu: u16,
    pub(crate) socket_buffer_bytes: usize,
    pub(crate) rdma: RdmaMode,
    pub(crate) rdma_required: bool,
}

/// When a QUIC server asks a client to prove its address (a Retry: one more round trip)
/// before any handshake work. Until an address is proven, RFC 9000 lets a server send at
/// most three times what it received from it; a server that answers an unproven Initial
/// with its first flight and its retransmissions can go past that (one datagram past it,
/// with quinn), which makes it an amplifier for spoofed sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressValidation {
    /// Every new QUIC client proves its address first (the default): replies to an
    /// address never heard from again stay within the three-times limit.
    #[default]
    Always,
    /// Only once half the handshake budget is in use, or the source's share of it is:
    /// one round trip less per new connection, at the cost of the limit above.
    UnderLoad,
}

/// Whether bulk transfers may move by RDMA. Either way the control channel is QUIC, and
/// RDMA is used only when both sides can; otherwise the transfer uses QUIC, with the reason
/// logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RdmaMode {
    /// Never.
    Off,
    /// With an RDMA NIC when both sides have one (needs the `rdma` build feature).
    #[default]
    Auto,
    /// With the software device (tests, benchmarks and labs on machines without RDMA).
    Soft,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_streams: 64,
            max_transfers: 64,
            max_connections: 1024,
            max_connections_per_identity: 256,
            max_requests_per_identity: 1024,
            max_handshakes: 256,
            max_handshakes_per_source: 64,
            max_buffered_bytes: 64 << 20,
            max_memory_bytes: 1 << 30,
            parallel_chunks: 8,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            handshake_timeout: Duration::from_secs(10),
            refusal_window: Duration::from_secs(60),
            address_validation: AddressValidation::default(),
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(5),
            io_timeout: Duration::from_secs(60),
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            connection_age_grace: Duration::from_secs(30),
            stream_window: 2 << 20,
            connection_window: 8 << 20,
            initial_mtu: 1200,
            max_mtu: 1452,
            socket_buffer_bytes: 8 << 20,
            rdma: RdmaMode::default(),
            rdma_required: false,
        }
    }
}

impl TransportConfig {
    /// Requests a server runs at once per connection (default 64).
    pub fn max_streams(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_streams = in_range("max_streams", n, 1, 4096)?;
        Ok(self)
    }

    /// Transfers a connection may hold open (default 64).
    pub fn max_transfers(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_transfers = in_range("max_transfers", n, 1, 4096)?;
        Ok(self)
    }

    /// Connections a server serves at once; more are turned away (default 1024).
    pub fn max_connections(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_connections = in_range("max_connections", n, 1, 1 << 20)?;
        Ok(self)
    }

    /// Authenticated connections one identity (SPIFFE ID) may hold on a server at once;
    /// more are answered `Busy` (default 256: a quarter of the default connection limit, so
    /// one workload, however many processes share its identity, leaves room for others).
    pub fn max_connections_per_identity(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_connections_per_identity =
            in_range("max_connections_per_identity", n, 1, 1 << 20)?;
        Ok(self)
    }

    /// Requests one identity may have in flight across all its connections (default 1024:
    /// sixteen connections' worth of streams, room for a node's DataLoader workers sharing
    /// one workload identity). More are answered `Busy` at once, so one peer flooding
    /// requests cannot take the node from everyone else.
    pub fn max_requests_per_identity(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_requests_per_identity = in_range("max_requests_per_identity", n, 1, 1 << 20)?;
        Ok(self)
    }

    /// Handshakes a server runs at once for peers not yet authenticated, a budget apart
    /// from [`TransportConfig::max_connections`]: peers past it are closed at once, before
    /// any TLS work, and only counted (default 256). A handshake holds its place until it
    /// completes, fails or reaches the handshake timeout.
    pub fn max_handshakes(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_handshakes = in_range("max_handshakes", n, 1, 1 << 20)?;
        Ok(self)
    }

    /// Of [`TransportConfig::max_handshakes`], how many one source may hold (an IPv4
    /// address, or an IPv6 /64), so one host that opens connections and says nothing
    /// cannot take them all (default 64: above the bursts of a GPU node's data loaders,
    /// which finish their handshakes in milliseconds).
    pub fn max_handshakes_per_source(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.max_handshakes_per_source = in_range("max_handshakes_per_source", n, 1, 1 << 20)?;
        Ok(self)
    }

    /// Bytes a server reads from disk ahead of the network, per connection (default 64 MiB).
    pub fn max_buffered_bytes(&mut self, n: u64) -> Result<&mut Self, ConfigError> {
        if n < (1 << 20) {
            return Err(ConfigError::Range {
                field: "max_buffered_bytes",
                min: 1 << 20,
                max: u64::MAX,
            });
        }
        self.max_buffered_bytes = n;
        Ok(self)
    }

    /// Bytes a server reads from disk ahead of the network across all its connections
    /// (default 1 GiB), of which one identity may hold a quarter: the node's ceiling on
    /// memory for object bytes however many peers hold reads they never take (each
    /// connection's own share is [`TransportConfig::max_buffered_bytes`]). Reads past it
    /// wait for bytes to leave. Besides it, each connection's transport buffers what it has
    /// been handed (TLS/TCP: up to 4 MiB; QUIC: up to its send window). At least 16 MiB.
    pub fn max_memory_bytes(&mut self, n: u64) -> Result<&mut Self, ConfigError> {
        if n < (16 << 20) {
            return Err(ConfigError::Range {
                field: "max_memory_bytes",
                min: 16 << 20,
                max: u64::MAX,
            });
        }
        self.max_memory_bytes = n;
        Ok(self)
    }

    /// Chunks a client keeps in flight per transfer, each on its own stream (default 8).
    pub fn parallel_chunks(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        self.parallel_chunks = in_range("parallel_chunks", n, 1, 256)?;
        Ok(self)
    }

    /// Preferred chunk size for manifests this side builds (default 4 MiB; a power of two
    /// between 64 KiB and 64 MiB).
    pub fn chunk_bytes(&mut self, n: u32) -> Result<&mut Self, ConfigError> {
        if !n.is_power_of_two() || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&n) {
            return Err(ConfigError::Range {
                field: "chunk_bytes",
                min: u64::from(MIN_CHUNK_BYTES),
                max: u64::from(MAX_CHUNK_BYTES),
            });
        }
        self.chunk_bytes = n;
        Ok(self)
    }

    /// Longest a TLS handshake plus hello may take (default 10 s); on a server, also how
    /// long a peer that never finishes its handshake holds a place of the handshake budget
    /// ([`TransportConfig::max_handshakes`]).
    pub fn handshake_timeout(&mut self, d: Duration) -> &mut Self {
        self.handshake_timeout = d;
        self
    }

    /// On a server, how refusals before authentication reach the audit trail (default
    /// 60 s): of the refusals from one source (an IPv4 address or IPv6 /64), over one
    /// transport and of one kind (timed out, certificate, ALPN, ...), the first in each
    /// window is recorded on its own (`connection_refused`) and the rest are counted into one
    /// `connections_refused` record when the window ends (and at shutdown), so a sender that
    /// is not anyone cannot flood the trail, and no refusal goes unrecorded. Zero records
    /// each one on its own.
    pub fn refusal_window(&mut self, d: Duration) -> &mut Self {
        self.refusal_window = d;
        self
    }

    /// On a QUIC server, when clients must prove their address before any handshake work
    /// (default [`AddressValidation::Always`]).
    pub fn address_validation(&mut self, v: AddressValidation) -> &mut Self {
        self.address_validation = v;
        self
    }

    /// A connection with no traffic for this long is closed (default 60 s). Keep it well
    /// above the longest network outage transfers should survive.
    pub fn idle_timeout(&mut self, d: Duration) -> &mut Self {
        self.idle_timeout = d;
        self
    }

    /// Interval of keep-alive packets on idle QUIC connections (default 5 s).
    pub fn keep_alive(&mut self, d: Duration) -> &mut Self {
        self.keep_alive = d;
        self
    }

    /// A stream with no progress for this long fails (default 60 s).
    pub fn io_timeout(&mut self, d: Duration) -> &mut Self {
        self.io_timeout = d;
        self
    }

    /// The longest a connection is used (default 1 h, [`DEFAULT_MAX_CONNECTION_AGE`]: the
    /// default SVID lifetime), the automatic logoff of HIPAA's 164.312(a)(2)(iii). A server
    /// retires a connection at this age, counted from its accept, and never later than its
    /// own SVID's lifetime: it tells the peer to take new requests elsewhere, lets requests
    /// in flight finish within [`TransportConfig::connection_age_grace`], then closes the
    /// connection and records the closure (`connection_closed`, reason `max age`). A client
    /// makes a fresh connection (a new handshake, which checks the peer's current SVID and
    /// revocations again) for requests once its connection reaches this age or the server
    /// retires it; a transfer goes on over the fresh one from its verified chunks. Zero is
    /// refused.
    pub fn max_connection_age(&mut self, d: Duration) -> Result<&mut Self, ConfigError> {
        if d.is_zero() {
            return Err(ConfigError::Zero {
                field: "max_connection_age",
            });
        }
        self.max_connection_age = d;
        Ok(self)
    }

    /// How long a server lets requests in flight on a connection it retires at its
    /// [`TransportConfig::max_connection_age`] finish before it closes the connection
    /// (default 30 s: a chunk in flight need not be cut).
    pub fn connection_age_grace(&mut self, d: Duration) -> &mut Self {
        self.connection_age_grace = d;
        self
    }

    /// The QUIC flow-control window per stream.
    pub fn stream_window(&self) -> u32 {
        self.stream_window
    }

    /// The QUIC flow-control window per connection.
    pub fn connection_window(&self) -> u32 {
        self.connection_window
    }

    /// QUIC flow-control windows per stream and per connection (defaults 2 and 8 MiB: more
    /// than a data-center path's bandwidth-delay product, and no more than the UDP socket
    /// buffer holds, so a busy receiver does not drop what it allowed the sender to send).
    pub fn windows(&mut self, stream: u32, connection: u32) -> &mut Self {
        self.stream_window = stream;
        self.connection_window = connection.max(stream);
        self
    }

    /// QUIC datagram sizes: the size to start with and the ceiling path-MTU discovery may
    /// reach (defaults 1200 and 1452; raise the ceiling on jumbo-frame networks, to the link
    /// MTU less 28 bytes of IPv4 and UDP headers, or 48 for IPv6). The ceiling is also the
    /// largest datagram this side accepts, and each endpoint's receive buffers grow with it:
    /// about 3 MiB at 1452, 18 MiB at 8972.
    pub fn mtu(&mut self, initial: u16, max: u16) -> Result<&mut Self, ConfigError> {
        let initial = in_range("initial_mtu", u32::from(initial), 1200, 65_527)?;
        let max = in_range("max_mtu", u32::from(max), initial, 65_527)?;
        // Both are bounded by 65 527 above.
        self.initial_mtu = initial as u16;
        self.max_mtu = max as u16;
        Ok(self)
    }

    /// Whether bulk transfers may move by RDMA (default [`RdmaMode::Auto`]).
    pub fn rdma(&mut self, mode: RdmaMode) -> &mut Self {
        self.rdma = mode;
        self
    }

    /// The RDMA mode.
    pub fn rdma_mode(&self) -> RdmaMode {
        self.rdma
    }

    /// Fail a pull that cannot use RDMA instead of falling back to QUIC (default: fall
    /// back). For benchmarks and deployments that must not silently change paths.
    pub fn rdma_required(&mut self, required: bool) -> &mut Self {
        self.rdma_required = required;
        self
    }

    /// Socket send and receive buffer sizes to ask the kernel for (default 8 MiB).
    pub fn socket_buffer_bytes(&mut self, n: usize) -> &mut Self {
        self.socket_buffer_bytes = n;
        self
    }
}

/// A knob set out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The value is outside the allowed range.
    #[error("{field} must be between {min} and {max}")]
    Range {
        /// Which knob.
        field: &'static str,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// The value must not be zero.
    #[error("{field} must not be zero")]
    Zero {
        /// Which knob.
        field: &'static str,
    },
}

/// The default [`TransportConfig::max_connection_age`]: the default SVID lifetime (1 h).
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

fn in_range(field: &'static str, v: u32, min: u32, max: u32) -> Result<u32, ConfigError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Range {
            field,
            min: u64::from(min),
            max: u64::from(max),
        })
    }
}

/// Publishes the current authorization policy; requests decide against the latest.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    tx: Arc<watch::Sender<Arc<dyn Authorizer>>>,
    /// The policy's epoch: random at start (so that a restarted server's differs from
    /// any before), moved on by every update; never 0.
    epoch: Arc<watch::Sender<u64>>,
}

impl PolicyHandle {
    /// Starts publishing `policy`.
    pub fn new(policy: Arc<dyn Authorizer>) -> Self {
        let mut start = [0u8; 8];
        // A fresh random start; if the system cannot give one, the time will do.
        if aws_lc_rs::rand::fill(&mut start).is_err() {
            start = u64::try_from(
                std::time::UNIX_EPOCH
                    .elapsed()
                    .unwrap_or_default()
                    .as_nanos()
                    & u128::from(u64::MAX),
            )
            .unwrap_or(1)
            .to_be_bytes();
        }
        Self {
            tx: Arc::new(watch::Sender::new(policy)),
            epoch: Arc::new(watch::Sender::new(u64::from_be_bytes(start).max(1))),
        }
    }

    /// Replaces the policy for every request from now on.
    pub fn update(&self, policy: Arc<dyn Authorizer>) {
        self.tx.send_replace(policy);
        self.epoch
            .send_modify(|e| *e = e.checked_add(1).unwrap_or(1).max(1));
    }

    /// The policy's epoch, to watch for changes (see `Request::PolicyWatch`).
    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<dyn Authorizer> {
        self.tx.borrow().clone()
    }
}

/// Everything a server needs. Build with [`ServerConfig::builder`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) identity: IdentityHandle,
    pub(crate) policy: PolicyHandle,
    pub(crate) store: Arc<Store>,
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) transport: Arc<TransportConfig>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) metrics: Arc<Metrics>,
}

impl ServerConfig {
    /// Starts a builder; identity, policy and store must be given before `build`.
    pub fn builder() -> ServerConfigBuilder<(), (), ()> {
        ServerConfigBuilder {
            identity: (),
            policy: (),
            store: (),
            audit: Arc::new(NoAudit),
            transport: Arc::new(TransportConfig::default()),
            clock: Arc::new(SystemClock),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where the server's audit records go.
    pub fn audit(&self) -> &Arc<dyn AuditSink> {
        &self.audit
    }

    /// The server's identity handle (to rotate its SVID).
    pub fn identity(&self) -> &IdentityHandle {
        &self.identity
    }

    /// The policy handle (to reload the policy).
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }
}

/// Builds a [`ServerConfig`]: `.identity(..).policy(..).store(..)` in any order, then `build`.
#[derive(Debug)]
pub struct ServerConfigBuilder<I, P, S> {
    identity: I,
    policy: P,
    store: S,
    audit: Arc<dyn AuditSink>,
    transport: Arc<TransportConfig>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl<I, P, S> ServerConfigBuilder<I, P, S> {
    /// Who the server is and whom it trusts.
    pub fn identity(self, identity: IdentityHandle) -> ServerConfigBuilder<IdentityHandle, P, S> {
        ServerConfigBuilder {
            identity,
            policy: self.policy,
            store: self.store,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
            metrics: self.metrics,
        }
    }

    /// Who may do what.
    pub fn policy(self, policy: PolicyHandle) -> ServerConfigBuilder<I, PolicyHandle, S> {
        ServerConfigBuilder {
            identity: self.identity,
            policy,
            store: self.store,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
            metrics: self.metrics,
        }
    }

    /// The datasets served and received.
    pub fn store(self, store: Arc<Store>) -> ServerConfigBuilder<I, P, Arc<Store>> {
        ServerConfigBuilder {
            identity: self.identity,
            policy: self.policy,
            store,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
            metrics: self.metrics,
        }
    }

    /// Where audit records go (default: nowhere; a node daemon always sets one).
    pub fn audit(mut self, audit: Arc<dyn AuditSink>) -> Self {
        self.audit = audit;
        self
    }

    /// Tuning knobs.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = Arc::new(transport);
        self
    }

    /// The clock (tests inject one).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where the metrics go (default: a fresh set, read with [`ServerConfig::metrics`]).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

impl ServerConfigBuilder<IdentityHandle, PolicyHandle, Arc<Store>> {
    /// Finishes the configuration.
    pub fn build(self) -> ServerConfig {
        ServerConfig {
            identity: self.identity,
            policy: self.policy,
            store: self.store,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
            metrics: self.metrics,
        }
    }
}

/// Everything a client needs. Build with [`ClientConfig::builder`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub(crate) identity: IdentityHandle,
    pub(crate) server_id: Option<SpiffeId>,
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) transport: Arc<TransportConfig>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl ClientConfig {
    /// Starts a builder; the identity must be given before `build`.
    pub fn builder() -> ClientConfigBuilder<()> {
        ClientConfigBuilder {
            identity: (),
            server_id: None,
            audit: Arc::new(NoAudit),
            transport: Arc::new(TransportConfig::default()),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Builds a [`ClientConfig`].
#[derive(Debug)]
pub struct ClientConfigBuilder<I> {
    identity: I,
    server_id: Option<SpiffeId>,
    audit: Arc<dyn AuditSink>,
    transport: Arc<TransportConfig>,
    clock: Arc<dyn Clock>,
}

impl<I> ClientConfigBuilder<I> {
    /// Who the client is and whom it trusts.
    pub fn identity(self, identity: IdentityHandle) -> ClientConfigBuilder<IdentityHandle> {
        ClientConfigBuilder {
            identity,
            server_id: self.server_id,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
        }
    }

    /// Insist that the server presents this SPIFFE ID (default: any ID of the trust domain).
    pub fn server_id(mut self, id: SpiffeId) -> Self {
        self.server_id = Some(id);
        self
    }

    /// Where the client records its transfers (default: nowhere).
    pub fn audit(mut self, audit: Arc<dyn AuditSink>) -> Self {
        self.audit = audit;
        self
    }

    /// Tuning knobs.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = Arc::new(transport);
        self
    }

    /// The clock (tests inject one).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl ClientConfigBuilder<IdentityHandle> {
    /// Finishes the configuration.
    pub fn build(self) -> ClientConfig {
        ClientConfig {
            identity: self.identity,
            server_id: self.server_id,
            audit: self.audit,
            transport: self.transport,
            clock: self.clock,
        }
    }
}
