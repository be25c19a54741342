//! The serving side: accepts QUIC and TLS/TCP connections, authenticates peers by SVID,
//! and answers requests against the store under the policy.
//!
//! This is the server driver: it takes connections from [`Listener`]s (QUIC and TLS/TCP in
//! `transport/`, or a plug-in transport) and shuttles between them and the request
//! handlers; it names no transport. Call order per connection: a place in the handshake
//! budget (`server/admission.rs`; without one the attempt is shed unanswered, counted and
//! not audited) → the transport's handshake (TLS, ALPN) within the handshake timeout → the
//! peer's proof checked by `identity.rs` (a refusal is audited and nothing is read) → a
//! connection slot and a place among its identity's connections (or `Busy`) → `Hello` /
//! `HelloAck` ([`crate::proto::connection`]) → requests, each on its own stream, at most
//! `max_streams` at once. When the connection ends, transfers
//! still open are audited as interrupted.
//!
//! A connection lasts no longer than the client's credentials: once its SVID expires (by the
//! injected clock) or its serial is revoked (new credentials published on the
//! [`crate::IdentityHandle`] list it), the requests in flight are cut, the connection is
//! closed (QUIC: with a close code of its own) and the closure is audited.
//!
//! Nor does it last longer than its maximum age (automatic logoff:
//! [`crate::TransportConfig::max_connection_age`], counted from the accept, never more than
//! the lifetime of the server's own SVID). Then the server takes no new requests on it
//! (it tells the client with `GoAway`, and answers `Unavailable` to requests still
//! arriving), lets those in flight finish within
//! [`crate::TransportConfig::connection_age_grace`], closes it (QUIC: with the close code
//! [`crate::transport::CLOSE_MAX_AGE`]) and audits the closure (reason `max age`); the client
//! goes on over a fresh handshake.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use certs::Usage;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::audit::AuditEvent;
use crate::config::{AddressValidation, ServerConfig};
use crate::identity::{CredentialsEnd, Peer, peer_credentials_end, verify_peer};
use crate::proto::ErrorCode;
use crate::proto::connection::ServerHello;
use crate::transport::quic::QuicListener;
use crate::transport::tcp::TlsTcpListener;
use crate::transport::{Close, Connection, Incoming, IncomingStream, Listener, Refusal};
use crate::vocab::Path;

mod admission;
mod conn;
mod failure;
mod handler;
mod memory;
mod pool;
mod rdma;
pub mod refusals;
mod shared;
mod stripes;

use admission::{Budget, Full, ShedLog, Source, Ticket};
use conn::ConnCtx;
use refusals::RefusalTally;
use shared::{Shared, record};

/// A server bound to its addresses, not yet serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Box<dyn Listener>>,
}

impl Server {
    /// Binds QUIC on `quic` and TLS/TCP on `tcp` (either may be omitted, not both).
    pub async fn bind(
        config: ServerConfig,
        quic: Option<SocketAddr>,
        tcp: Option<SocketAddr>,
    ) -> Result<Self, ServeError> {
        if quic.is_none() && tcp.is_none() {
            return Err(ServeError::NoListener);
        }
        let tls = crate::tls::server_config(&config.identity, config.clock.clone())
            .map_err(ServeError::Tls)?;
        let transport = config.transport.clone();
        let mut listeners: Vec<Box<dyn Listener>> = Vec::new();
        if let Some(addr) = quic {
            let l = QuicListener::bind(addr, tls.clone(), transport.clone())
                .map_err(|source| ServeError::Bind { addr, source })?;
            listeners.push(Box::new(l));
        }
        if let Some(addr) = tcp {
            let l = TlsTcpListener::bind(addr, Arc::new(tls), transport)
                .map_err(|source| ServeError::Bind { addr, source })?;
            listeners.push(Box::new(l));
        }
        Ok(Self::with_listeners(config, listeners))
    }

    /// Serves on listeners of the caller's (see [`Listener`]): every peer is checked,
    /// authorized and audited as on the built-in transports.
    pub fn with_listeners(config: ServerConfig, listeners: Vec<Box<dyn Listener>>) -> Self {
        let t = &config.transport;
        let slots = Arc::new(Semaphore::new(t.max_connections as usize));
        let handshakes = Budget::new(
            t.max_handshakes as usize,
            t.max_handshakes_per_source as usize,
        );
        let identities = Budget::new(
            t.max_connections as usize,
            t.max_connections_per_identity as usize,
        );
        let requests = Budget::new(
            (t.max_connections as usize).saturating_mul(t.max_streams as usize),
            t.max_requests_per_identity as usize,
        );
        let memory = memory::MemoryBudget::new(t.max_memory_bytes);
        let refusals = RefusalTally::new(t.refusal_window, refusals::MAX_TALLIES);
        config.metrics.observe_store(&config.store);
        Self {
            shared: Arc::new(Shared {
                config,
                slots,
                handshakes,
                identities,
                requests,
                memory,
                shed_log: ShedLog::new(SHED_LOG_PERIOD),
                refusals,
                next_conn: AtomicU64::new(1),
                stop: watch::Sender::new(false),
                buffers: Arc::default(),
                stripes: Default::default(),
            }),
            listeners,
        }
    }

    /// The QUIC address actually bound (useful with port 0).
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.addr(Path::Quic)
    }

    /// The TCP address actually bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addr(Path::Tcp)
    }

    fn addr(&self, path: Path) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.path() == path)
            .and_then(|l| l.local_addr())
    }

    /// Serves in background tasks until the handle is shut down or dropped.
    pub fn spawn(self) -> ServerHandle {
        let quic_addr = self.quic_addr();
        let tcp_addr = self.tcp_addr();
        let mut tasks = JoinSet::new();
        for listener in self.listeners {
            tasks.spawn(accept(self.shared.clone(), listener));
        }
        tasks.spawn(report_refusals(self.shared.clone()));
        info!(quic = ?quic_addr, tcp = ?tcp_addr, "listening");
        ServerHandle {
            shared: self.shared,
            tasks,
            quic_addr,
            tcp_addr,
        }
    }
}

/// A running server. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    quic_addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
}

impl ServerHandle {
    /// The QUIC address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The TCP address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops accepting connections and requests, lets requests in flight finish for up to
    /// `grace`, then closes every connection.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shared.stop.send_replace(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(grace = ?grace, "requests still running at shutdown; closing them");
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        report_refusals_open(&self.shared);
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        self.tasks.abort_all();
        report_refusals_open(&self.shared);
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Neither QUIC nor TCP was asked for.
    #[error("nothing to listen on: give a QUIC address, a TCP address, or both")]
    NoListener,
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
}

/// Accepts connections on one listener until shutdown, each served in a task of its own;
/// then lets them finish and closes the listener. An attempt gets a place in the handshake
/// budget (in all and for its source) or is shed unanswered; a connection slot is taken only
/// once the peer is authenticated, so peers that are not anyone cannot fill the slots.
async fn accept(shared: Arc<Shared>, mut listener: Box<dyn Listener>) {
    let path = listener.path();
    let mut stop = shared.stop.subscribe();
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = listener.accept() => i,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(incoming) = incoming else { break };
        let addr = incoming.remote_addr();
        if shared.slots.available_permits() == 0 {
            // Only authenticated peers hold slots, so only they can bring this about.
            warn!(peer.addr = %addr, "connection limit reached; refusing");
            shared.config.metrics.busy(false);
            conns.spawn(incoming.refuse_busy());
            continue;
        }
        let proven = incoming.address_validated();
        let lenient = shared.config.transport.address_validation == AddressValidation::UnderLoad;
        let admitted = (proven || (lenient && !shared.handshakes.under_pressure()))
            .then(|| shared.handshakes.admit(Source::of(addr.ip(), proven)));
        let ticket = match admitted {
            Some(Ok(t)) => t,
            Some(Err(full)) if proven => {
                shed(&shared, incoming, full);
                continue;
            }
            // An unproven address (QUIC) is asked to prove it rather than taking a place or
            // being turned away: spoofed sources never come back with the token, and the host
            // whose address they use comes back proven, counted apart from them.
            _ => {
                shared.config.metrics.address_retry();
                incoming.retry();
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", conn.id = id, peer.addr = %addr, path = path.as_str());
        conns.spawn(serve(shared.clone(), incoming, path, ticket).instrument(span));
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    // Connections see the stop too: they finish their requests in flight and close.
    while conns.join_next().await.is_some() {}
    listener.close().await;
}

/// Closes an attempt the handshake budget has no place for: counted, logged at most once
/// per [`SHED_LOG_PERIOD`], never audited one by one (a sender that is not anyone must not
/// be able to flood the trail).
fn shed(shared: &Shared, incoming: Box<dyn Incoming>, full: Full) {
    let per_source = full == Full::Key;
    shared.config.metrics.handshake_shed(per_source);
    if let Some(n) = shared.shed_log.note(shared.config.clock.instant()) {
        warn!(
            peer.addr = %incoming.remote_addr(),
            shed = n,
            reason = if per_source { "per_source" } else { "budget" },
            "handshake budget spent; closing connection attempts unanswered"
        );
    }
    incoming.shed();
}

/// Serves one connection from its handshake to its end. `ticket` is its place in the
/// handshake budget, held until the peer is authenticated and has a slot, or the handshake
/// ends.
async fn serve(
    shared: Arc<Shared>,
    incoming: Box<dyn Incoming>,
    path: Path,
    ticket: Ticket<Source>,
) {
    let addr = incoming.remote_addr();
    // The connection's age counts from its accept.
    let age = max_age(&shared);
    let retire = tokio::time::sleep(age);
    let timeout = shared.config.transport.handshake_timeout;
    let handshaking = shared.config.metrics.handshake_started();
    let handshaken = match tokio::time::timeout(timeout, incoming.handshake()).await {
        Ok(Ok(h)) => h,
        Ok(Err(refusal)) => return refused(&shared, addr, path, refusal),
        Err(_) => return refused(&shared, addr, path, Refusal::new("handshake timed out")),
    };
    let Some(peer) = authenticate(&shared, &handshaken.proof(), addr, path) else {
        handshaken.refuse();
        return;
    };
    // A peer turned away here keeps its place in the handshake budget while it is told so,
    // which bounds those answers too.
    let Ok(_permit) = shared.slots.clone().try_acquire_owned() else {
        debug!(peer.id = %peer.id, "connection limit reached; answering busy");
        shared.config.metrics.busy(false);
        return handshaken.busy(timeout).await;
    };
    let Ok(_per_identity) = shared.identities.admit(peer.id.clone()) else {
        debug!(peer.id = %peer.id, "connection limit of this identity reached; answering busy");
        shared.config.metrics.busy(true);
        return handshaken.busy(timeout).await;
    };
    drop((handshaking, ticket));
    accepted(&shared, &peer);
    let hello = ServerHello {
        max_streams: shared.config.transport.max_streams,
        max_transfers: shared.config.transport.max_transfers,
        chunk_bytes: shared.config.store.chunk_bytes(),
    };
    let Some(conn) = handshaken.hello(hello, timeout).await else {
        return;
    };
    serve_requests(shared, conn, peer, retire).await;
}

/// The age at which the server retires a connection: the configured maximum, no longer than
/// the lifetime of the server's own SVID (where the trust domain issues shorter-lived SVIDs,
/// connections are retired as often as they rotate).
fn max_age(shared: &Shared) -> Duration {
    let configured = shared.config.transport.max_connection_age;
    let creds = shared.config.identity.current();
    let svid = creds.svid();
    match svid.not_after().duration_since(svid.not_before()) {
        Ok(lifetime) if !lifetime.is_zero() => configured.min(lifetime),
        _ => configured,
    }
}

/// Runs the requests of an authenticated connection until it ends, the server stops, the
/// peer's credentials end, or `retire` fires (the connection reached its maximum age).
async fn serve_requests(
    shared: Arc<Shared>,
    conn: Arc<dyn Connection>,
    peer: Peer,
    retire: tokio::time::Sleep,
) {
    let io = shared.config.transport.io_timeout;
    let ctx = Arc::new(ConnCtx::new(shared.clone(), peer, conn.clone()));
    let mut requests = JoinSet::new();
    let mut stop = shared.stop.subscribe();
    let ended = credentials_end(&shared, &ctx.peer);
    tokio::pin!(ended, retire);
    let mut aged = false;
    let cut = loop {
        let accepted = tokio::select! {
            a = conn.accept() => a,
            _ = stop.wait_for(|s| *s) => break None,
            end = &mut ended => break Some(end),
            () = &mut retire => {
                aged = true;
                break None;
            }
        };
        let Some(IncomingStream { first, stream }) = accepted else {
            break None;
        };
        match shared.requests.admit(ctx.peer.id.clone()) {
            Ok(place) => {
                let handled = handler::handle(ctx.clone(), first, stream);
                requests.spawn(
                    async move {
                        handled.await;
                        drop(place);
                    }
                    .in_current_span(),
                );
            }
            Err(_) => {
                // The identity has all the requests in flight it may, across its
                // connections: this one is told so at once, without reading it.
                shared.config.metrics.request_busy();
                debug!(peer.id = %ctx.peer.id, "requests in flight limit of this identity reached; answering busy");
                let mut stream = stream;
                requests.spawn(
                    async move {
                        if stream.sink.send_error(ErrorCode::Busy).await.is_ok() {
                            stream.sink.finish_delivered().await;
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        while requests.try_join_next().is_some() {}
    };
    if aged {
        // The peer opens its next requests on a fresh connection.
        conn.go_away();
    }
    // Requests arriving from now on are turned away; those in flight finish.
    let refusing = conn.clone();
    let refuse = tokio::spawn(async move {
        while let Some(mut s) = refusing.accept().await {
            let _ = s.stream.sink.send_error(ErrorCode::Unavailable).await;
        }
    });
    let grace = if aged {
        shared.config.transport.connection_age_grace
    } else {
        io
    };
    let cut = end_requests(&mut requests, grace, cut, ended).await;
    refuse.abort();
    match cut {
        Some(end) => {
            conn.close(Close::Credentials(end));
            closed_for_credentials(&shared, &ctx.peer, end);
        }
        None if aged => {
            conn.close(Close::MaxAge);
            aged_out(&shared, &ctx.peer);
        }
        None => conn.close(Close::Shutdown),
    }
    ctx.finish();
}

/// Resolves when `peer`'s credentials end.
async fn credentials_end(shared: &Shared, peer: &Peer) -> CredentialsEnd {
    let creds = shared.config.identity.watch();
    peer_credentials_end(&peer.serial, peer.not_after, &*shared.config.clock, creds).await
}

/// Ends a connection's requests. Those in flight may finish (within `within`: the I/O
/// timeout, or the grace of a connection retired at its maximum age) unless the peer's
/// credentials end first (`cut`, or `ended` meanwhile): then they are cut at once, and the
/// reason is returned.
async fn end_requests(
    requests: &mut JoinSet<()>,
    within: Duration,
    cut: Option<CredentialsEnd>,
    ended: Pin<&mut impl Future<Output = CredentialsEnd>>,
) -> Option<CredentialsEnd> {
    let cut = match cut {
        Some(end) => Some(end),
        None => tokio::select! {
            () = finish_requests(requests, within) => None,
            end = ended => Some(end),
        },
    };
    if cut.is_some() {
        requests.abort_all();
        while requests.join_next().await.is_some() {}
    }
    cut
}

/// Audits a connection closed because its peer's credentials ended.
fn closed_for_credentials(shared: &Shared, peer: &Peer, end: CredentialsEnd) {
    info!(peer.id = %peer.id, reason = end.reason(), "connection closed: peer's credentials ended");
    record(
        shared,
        AuditEvent::ConnectionClosed {
            peer: peer.id.clone(),
            serial: peer.serial.clone(),
            reason: end.reason().to_owned(),
        },
    );
}

/// Audits a connection closed because it reached its maximum age.
fn aged_out(shared: &Shared, peer: &Peer) {
    info!(peer.id = %peer.id, "connection closed: it reached its maximum age");
    shared.config.metrics.connection_aged_out();
    record(
        shared,
        AuditEvent::ConnectionClosed {
            peer: peer.id.clone(),
            serial: peer.serial.clone(),
            reason: Close::MaxAge.reason().to_owned(),
        },
    );
}

/// Lets requests in flight finish (each is bounded by the I/O timeout) for up to `within`,
/// then ends the rest.
async fn finish_requests(requests: &mut JoinSet<()>, within: Duration) {
    let all = async { while requests.join_next().await.is_some() {} };
    if tokio::time::timeout(within, all).await.is_err() {
        requests.abort_all();
    }
}

/// Checks the peer's identity from what its handshake proved; a refusal is audited.
fn authenticate(
    shared: &Shared,
    proof: &crate::transport::PeerProof,
    addr: SocketAddr,
    path: Path,
) -> Option<Peer> {
    let creds = shared.config.identity.current();
    let now = shared.config.clock.now();
    match verify_peer(proof, &creds, now, Usage::Client) {
        Ok(v) => Some(Peer {
            id: v.id,
            serial: v.serial,
            not_after: v.not_after,
            addr,
            path,
        }),
        Err(e) => {
            refused(
                shared,
                addr,
                path,
                Refusal::new(format!("peer identity: {e}")),
            );
            None
        }
    }
}

/// Audits an authenticated peer's connection, once it has a slot.
fn accepted(shared: &Shared, peer: &Peer) {
    info!(peer.id = %peer.id, "connection accepted");
    record(
        shared,
        AuditEvent::ConnectionAccepted {
            peer: peer.id.clone(),
            serial: peer.serial.clone(),
            addr: peer.addr,
            path: peer.path,
        },
    );
}

fn refused(shared: &Shared, addr: SocketAddr, path: Path, refusal: Refusal) {
    shared
        .config
        .metrics
        .handshake_failed(refusal.class.as_str());
    let clock = &shared.config.clock;
    let noted = shared.refusals.note(
        Source::of(addr.ip(), true),
        path,
        refusal.class,
        clock.instant(),
        clock.now(),
    );
    if let Some(ended) = noted.ended {
        record(shared, ended);
    }
    if !noted.record {
        // Counted into its source's `connections_refused` record when the window ends.
        debug!(reason = %refusal.reason, "connection refused");
        return;
    }
    info!(reason = %refusal.reason, "connection refused");
    record(
        shared,
        AuditEvent::ConnectionRefused {
            addr,
            path,
            reason: refusal.reason,
            class: refusal.class.as_str().to_owned(),
        },
    );
}

/// Records the counts of refusals before authentication as their windows end, and every
/// count still open when the server stops (see `server/refusals.rs`).
async fn report_refusals(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    if shared.config.transport.refusal_window.is_zero() {
        // Every refusal is recorded on its own: nothing is ever counted.
        return;
    }
    loop {
        let clock = &shared.config.clock;
        // A refusal noted meanwhile opens a window no earlier than one window from now.
        let wait = shared
            .refusals
            .next_due(clock.instant())
            .unwrap_or(shared.config.transport.refusal_window)
            .max(Duration::from_millis(100));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        for event in shared.refusals.due(shared.config.clock.instant()) {
            record(&shared, event);
        }
    }
    report_refusals_open(&shared);
}

/// Records the counts of every refusal window still open (the server is stopping).
fn report_refusals_open(shared: &Shared) {
    for event in shared.refusals.drain() {
        record(shared, event);
    }
}

/// Shortest time between two log lines about attempts shed for want of handshake budget.
const SHED_LOG_PERIOD: Duration = Duration::from_secs(10);
