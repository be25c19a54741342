//! The serving side: accepts QUIC and TLS/TCP connections, authenticates peers by SVID,
//! and answers requests against the store under the policy.
//!
//! Call order per connection: TLS handshake (the client's SVID is verified by
//! `identity.rs`; a refusal is audited and nothing is read) → ALPN check → `Hello` /
//! `HelloAck` → requests, each on its own stream, at most `max_streams` at once. When the
//! connection ends, transfers still open are audited as interrupted.
//!
//! A connection lasts no longer than the client's credentials: once its SVID expires (by the
//! injected clock) or its serial is revoked (new credentials published on the
//! [`crate::IdentityHandle`] list it), the requests in flight are cut, the connection is
//! closed (QUIC: with a close code of its own) and the closure is audited.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use certs::Usage;
use quinn::Endpoint;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::audit::{AuditEvent, AuditRecord};
use crate::config::ServerConfig;
use crate::identity::{CredentialsEnd, Peer, peer_credentials_end, peer_identity};
use crate::proto::message::PROTOCOL_VERSION;
use crate::proto::{ErrorCode, Frame, FrameKind, Hello, HelloAck};
use crate::transport::{FrameSink, FrameSource, Path, RequestStream, mux, quic, tcp};

mod conn;
mod handler;
mod rdma;

use conn::ConnCtx;

/// A server bound to its addresses, not yet serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    quic: Option<Endpoint>,
    tcp: Option<TcpListener>,
}

/// What every connection of a server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    slots: Arc<Semaphore>,
    tls: Arc<rustls::ServerConfig>,
    /// Connections past the limit that are still told they are busy.
    overflow: Arc<Semaphore>,
    next_conn: AtomicU64,
    /// Flips to true on shutdown: accept no more connections or requests.
    stop: watch::Sender<bool>,
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
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let quic = match quic {
            Some(addr) => Some(
                quic::server_endpoint(addr, tls.clone(), &config.transport)
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let tcp = match tcp {
            Some(addr) => {
                Some(tcp::listen(addr).map_err(|source| ServeError::Bind { addr, source })?)
            }
            None => None,
        };
        let slots = Arc::new(Semaphore::new(config.transport.max_connections as usize));
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                slots,
                tls: Arc::new(tls),
                overflow: Arc::new(Semaphore::new(MAX_BUSY_ANSWERS)),
                next_conn: AtomicU64::new(1),
                stop: watch::Sender::new(false),
            }),
            quic,
            tcp,
        })
    }

    /// The QUIC address actually bound (useful with port 0).
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// The TCP address actually bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves in background tasks until the handle is shut down or dropped.
    pub fn spawn(self) -> ServerHandle {
        let quic_addr = self.quic_addr();
        let tcp_addr = self.tcp_addr();
        let mut tasks = JoinSet::new();
        if let Some(endpoint) = self.quic.clone() {
            tasks.spawn(accept_quic(self.shared.clone(), endpoint));
        }
        if let Some(listener) = self.tcp {
            tasks.spawn(accept_tcp(self.shared.clone(), listener));
        }
        info!(quic = ?quic_addr, tcp = ?tcp_addr, "listening");
        ServerHandle {
            shared: self.shared,
            tasks,
            quic: self.quic,
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
    quic: Option<Endpoint>,
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
        if let Some(endpoint) = &self.quic {
            endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        self.tasks.abort_all();
        if let Some(endpoint) = &self.quic {
            endpoint.close(quinn::VarInt::from_u32(0), b"server stopped");
        }
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
    Tls(String),
}

async fn accept_quic(shared: Arc<Shared>, endpoint: Endpoint) {
    let mut stop = shared.stop.subscribe();
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            warn!(peer.addr = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let addr = incoming.remote_address();
        let span = info_span!("conn", conn.id = id, peer.addr = %addr, path = "quic");
        conns.spawn(serve_quic(shared.clone(), incoming, permit).instrument(span));
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    // Connections see the stop too: they finish their requests in flight and close.
    while conns.join_next().await.is_some() {}
}

async fn serve_quic(shared: Arc<Shared>, incoming: quinn::Incoming, _permit: OwnedSemaphorePermit) {
    let addr = incoming.remote_address();
    let timeout = shared.config.transport.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refused(&shared, addr, Path::Quic, quic_refusal(&e)),
        Err(_) => return refused(&shared, addr, Path::Quic, "handshake timed out".into()),
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(crate::tls::ALPN) {
        conn.close(quinn::VarInt::from_u32(ErrorCode::Version as u32), b"ALPN");
        return refused(
            &shared,
            addr,
            Path::Quic,
            "peer did not negotiate our ALPN".into(),
        );
    }
    let chain = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default();
    let Some(peer) = authenticate(&shared, &chain, addr, Path::Quic) else {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Protocol as u32),
            b"identity",
        );
        return;
    };
    let io = shared.config.transport.io_timeout;
    // The client's first stream carries Hello.
    let hello = tokio::time::timeout(timeout, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = hello else {
        debug!("no hello; closing");
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Protocol as u32),
            b"no hello",
        );
        return;
    };
    let mut first = RequestStream {
        sink: FrameSink::quic(send, io),
        source: FrameSource::quic(recv, io),
    };
    if !hello_exchange(&shared, &mut first).await {
        conn.close(quinn::VarInt::from_u32(ErrorCode::Version as u32), b"hello");
        return;
    }
    drop(first);
    let ctx = Arc::new(ConnCtx::new(shared.clone(), peer, Some(conn.clone())));
    let mut requests = JoinSet::new();
    let mut stop = shared.stop.subscribe();
    let ended = credentials_end(&shared, &ctx.peer, true);
    tokio::pin!(ended);
    let cut = loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            _ = stop.wait_for(|s| *s) => break None,
            end = &mut ended => break Some(end),
        };
        let Ok((send, recv)) = accepted else {
            break None;
        };
        let stream = RequestStream {
            sink: FrameSink::quic(send, io),
            source: FrameSource::quic(recv, io),
        };
        requests.spawn(handler::handle(ctx.clone(), None, stream).in_current_span());
        while requests.try_join_next().is_some() {}
    };
    match end_requests(&mut requests, io, cut, ended).await {
        Some(end) => {
            conn.close(end.quic_code(), end.reason().as_bytes());
            closed_for_credentials(&shared, &ctx.peer, end);
        }
        None => conn.close(quinn::VarInt::from_u32(0), b"server shutting down"),
    }
    let stats = conn.stats();
    debug!(
        mtu = stats.path.current_mtu,
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        black_holes = stats.path.black_holes_detected,
        congestion_events = stats.path.congestion_events,
        rtt_us = stats.path.rtt.as_micros() as u64,
        "QUIC connection ended"
    );
    ctx.finish();
}

async fn accept_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.subscribe();
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (socket, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            warn!(peer.addr = %addr, "connection limit reached; refusing");
            // Tell the client it is busy (after its handshake, so the answer is
            // authenticated), within a small budget of its own; past that, just close.
            if let Ok(spare) = shared.overflow.clone().try_acquire_owned() {
                tcp::tune(&socket);
                conns.spawn(refuse_busy(shared.clone(), socket, spare));
            }
            continue;
        };
        tcp::tune(&socket);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", conn.id = id, peer.addr = %addr, path = "tcp");
        conns.spawn(serve_tcp(shared.clone(), socket, addr, permit).instrument(span));
        while conns.try_join_next().is_some() {}
    }
    // Connections see the stop too: they finish their requests in flight and close.
    while conns.join_next().await.is_some() {}
}

async fn serve_tcp(
    shared: Arc<Shared>,
    socket: tokio::net::TcpStream,
    addr: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let timeout = shared.config.transport.handshake_timeout;
    let mut tls = match tokio::time::timeout(
        timeout,
        tokio_rustls::TlsAcceptor::from(shared.tls.clone()).accept(tcp::buffered(socket)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(&shared, addr, Path::Tcp, tls_refusal(&e)),
        Err(_) => return refused(&shared, addr, Path::Tcp, "handshake timed out".into()),
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(crate::tls::ALPN) {
        return refused(
            &shared,
            addr,
            Path::Tcp,
            "peer did not negotiate our ALPN".into(),
        );
    }
    let chain: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let Some(peer) = authenticate(&shared, &chain, addr, Path::Tcp) else {
        return;
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
    serve_mux(shared, tls, peer, mux::TLS_READ_BUFFER, true).await;
}

/// Completes a TLS handshake only to answer the hello with `Busy`, then closes.
async fn refuse_busy(
    shared: Arc<Shared>,
    socket: tokio::net::TcpStream,
    _spare: OwnedSemaphorePermit,
) {
    use tokio::io::AsyncWriteExt;
    let timeout = shared.config.transport.handshake_timeout;
    let answer = async {
        let mut tls = tokio_rustls::TlsAcceptor::from(shared.tls.clone())
            .accept(tcp::buffered(socket))
            .await
            .ok()?;
        mux::read_frame(&mut tls).await.ok()??;
        let busy = Frame::new(FrameKind::Error, 0, ErrorCode::Busy.encode());
        mux::write_frame(&mut tls, &busy).await.ok()?;
        tls.shutdown().await.ok()
    };
    let _ = tokio::time::timeout(timeout, answer).await;
}

/// Serves the bench's plaintext baseline: one byte stream whose peer is assumed, with no
/// SVID whose end could be watched.
#[cfg(feature = "bench-plaintext")]
pub(crate) async fn serve_stream<S>(shared: Arc<Shared>, io: S, peer: Peer, read_buffer: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    serve_mux(shared, io, peer, read_buffer, false).await;
}

/// Serves one authenticated byte stream (TLS/TCP, or the bench's plaintext baseline), until
/// the peer's credentials end if `watch_credentials`.
async fn serve_mux<S>(
    shared: Arc<Shared>,
    mut io: S,
    peer: Peer,
    read_buffer: usize,
    watch_credentials: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use tokio::io::AsyncWriteExt;
    let timeout = shared.config.transport.handshake_timeout;
    let hello = tokio::time::timeout(timeout, mux::read_frame(&mut io)).await;
    let reply = match hello {
        Ok(Ok(Some(f))) if f.kind == FrameKind::Hello && f.stream == 0 => hello_reply(&shared, &f),
        Ok(Ok(_)) | Err(_) => {
            debug!("no hello; closing");
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before hello");
            return;
        }
    };
    let ok = reply.kind == FrameKind::HelloAck;
    if mux::write_frame(&mut io, &reply).await.is_err() || io.flush().await.is_err() || !ok {
        return;
    }
    let cfg = &shared.config.transport;
    let (mux, mut incoming) = mux::server(io, cfg.max_streams, cfg.io_timeout, read_buffer);
    let ctx = Arc::new(ConnCtx::new(shared.clone(), peer, None));
    let mut requests = JoinSet::new();
    let mut stop = shared.stop.subscribe();
    let ended = credentials_end(&shared, &ctx.peer, watch_credentials);
    tokio::pin!(ended);
    let cut = loop {
        let next = tokio::select! {
            n = incoming.recv() => n,
            _ = stop.wait_for(|s| *s) => break None,
            end = &mut ended => break Some(end),
        };
        let Some((frame, stream)) = next else {
            break None;
        };
        requests.spawn(handler::handle(ctx.clone(), Some(frame), stream).in_current_span());
        while requests.try_join_next().is_some() {}
    };
    // Requests arriving from now on are turned away; those in flight finish.
    let refuse = tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.recv().await {
            let _ = stream.sink.send_error(ErrorCode::Unavailable).await;
        }
    });
    let cut = end_requests(&mut requests, cfg.io_timeout, cut, ended).await;
    refuse.abort();
    // Frames already queued still go out before the connection closes.
    match cut {
        Some(end) => {
            mux.close(end.reason());
            closed_for_credentials(&shared, &ctx.peer, end);
        }
        None => mux.close("server shutting down"),
    }
    ctx.finish();
}

/// Resolves when `peer`'s credentials end (never, unless `watch`).
async fn credentials_end(shared: &Shared, peer: &Peer, watch: bool) -> CredentialsEnd {
    if !watch {
        return std::future::pending().await;
    }
    let creds = shared.config.identity.watch();
    peer_credentials_end(&peer.serial, peer.not_after, &*shared.config.clock, creds).await
}

/// Ends a connection's requests. Those in flight may finish (within the I/O timeout)
/// unless the peer's credentials end first (`cut`, or `ended` meanwhile): then they are cut
/// at once, and the reason is returned.
async fn end_requests(
    requests: &mut JoinSet<()>,
    io_timeout: Duration,
    cut: Option<CredentialsEnd>,
    ended: Pin<&mut impl Future<Output = CredentialsEnd>>,
) -> Option<CredentialsEnd> {
    let cut = match cut {
        Some(end) => Some(end),
        None => tokio::select! {
            () = finish_requests(requests, io_timeout) => None,
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

/// Lets requests in flight finish (each is bounded by the I/O timeout), then ends the rest.
async fn finish_requests(requests: &mut JoinSet<()>, io_timeout: Duration) {
    let all = async { while requests.join_next().await.is_some() {} };
    if tokio::time::timeout(io_timeout, all).await.is_err() {
        requests.abort_all();
    }
}

/// Shared state for serving without a TLS listener (the bench's plaintext baseline).
#[cfg(feature = "bench-plaintext")]
pub(crate) fn shared_for_bench(config: ServerConfig) -> Arc<Shared> {
    let tls = crate::tls::server_config(&config.identity, config.clock.clone())
        .map(Arc::new)
        .expect("a TLS config for valid credentials");
    Arc::new(Shared {
        slots: Arc::new(Semaphore::new(config.transport.max_connections as usize)),
        config,
        tls,
        overflow: Arc::new(Semaphore::new(MAX_BUSY_ANSWERS)),
        next_conn: AtomicU64::new(1),
        stop: watch::Sender::new(false),
    })
}

async fn hello_exchange(shared: &Shared, stream: &mut RequestStream) -> bool {
    let frame = match stream.source.recv().await {
        Ok(Some(f)) if f.kind == FrameKind::Hello => f,
        _ => return false,
    };
    let reply = hello_reply(shared, &frame);
    let ok = reply.kind == FrameKind::HelloAck;
    if stream.sink.send(reply.kind, reply.payload).await.is_err() {
        return false;
    }
    stream.sink.finish();
    ok
}

fn hello_reply(shared: &Shared, frame: &Frame) -> Frame {
    let cfg = &shared.config.transport;
    match Hello::decode(&frame.payload)
        .ok()
        .and_then(|h| h.negotiate())
    {
        Some(version) => {
            debug_assert_eq!(version, PROTOCOL_VERSION);
            let ack = HelloAck {
                version,
                max_streams: cfg.max_streams,
                max_transfers: cfg.max_transfers,
                chunk_bytes: shared.config.store.chunk_bytes(),
            };
            Frame::new(FrameKind::HelloAck, 0, ack.encode())
        }
        None => {
            info!("peer speaks no protocol version we know");
            Frame::new(FrameKind::Error, 0, ErrorCode::Version.encode())
        }
    }
}

/// Derives and audits the peer's identity from its verified chain.
fn authenticate(
    shared: &Shared,
    chain: &[CertificateDer<'static>],
    addr: SocketAddr,
    path: Path,
) -> Option<Peer> {
    let creds = shared.config.identity.current();
    let now = shared.config.clock.now();
    match peer_identity(chain, &creds, now, Usage::Client) {
        Ok(v) => {
            let peer = Peer {
                id: v.id,
                serial: v.serial,
                not_after: v.not_after,
                addr,
                path,
            };
            info!(peer.id = %peer.id, "connection accepted");
            record(
                shared,
                AuditEvent::ConnectionAccepted {
                    peer: peer.id.clone(),
                    serial: peer.serial.clone(),
                    addr,
                    path,
                },
            );
            Some(peer)
        }
        Err(e) => {
            refused(shared, addr, path, format!("peer identity: {e}"));
            None
        }
    }
}

fn refused(shared: &Shared, addr: SocketAddr, path: Path, reason: String) {
    info!(reason = %reason, "connection refused");
    shared
        .config
        .metrics
        .handshake_failed(refusal_class(&reason));
    record(shared, AuditEvent::ConnectionRefused { addr, path, reason });
}

/// A bounded label for a refusal reason.
fn refusal_class(reason: &str) -> &'static str {
    if reason.contains("timed out") {
        "timeout"
    } else if reason.contains("ALPN") {
        "alpn"
    } else if reason.to_ascii_lowercase().contains("revoked") {
        // rustls says "invalid peer certificate: Revoked"; our own check "... revoked".
        "revoked"
    } else if reason.contains("certificate") || reason.contains("identity") {
        "certificate"
    } else if reason.contains("version") {
        "protocol_version"
    } else {
        "tls"
    }
}

/// Records an event; a failure is counted and logged by the sink.
pub(crate) fn record(shared: &Shared, event: AuditEvent) {
    let _ = record_or_refuse(shared, event);
}

/// Records an event that work depends on: if it cannot be written, the work is refused.
pub(crate) fn record_or_refuse(shared: &Shared, event: AuditEvent) -> Result<(), ErrorCode> {
    let record = AuditRecord {
        time: shared.config.clock.now(),
        event,
    };
    shared.config.audit.record(&record).map_err(|e| {
        shared.config.metrics.audit_error();
        tracing::debug!(error = %e, "audit record not written");
        ErrorCode::AuditUnavailable
    })
}

fn quic_refusal(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(t) => format!("TLS: {}", t.reason),
        other => quic::describe(other),
    }
}

fn tls_refusal(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("TLS: {tls}"),
        None => e.to_string(),
    }
}

/// Connections past the limit answered with `Busy` at once; more are closed unanswered.
const MAX_BUSY_ANSWERS: usize = 64;

/// TLS plaintext rustls accepts per write before pushing records out; large enough that a
/// 1 MiB frame is encrypted and sent in one go.
const TLS_SEND_BUFFER_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests;
