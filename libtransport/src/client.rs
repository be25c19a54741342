//! The API a data loader uses: connect with an identity, then list, stat, read, fetch, push.
//!
//! [`Client::connect`] returns only after the TLS handshake *and* a first round trip
//! (`Hello` / `HelloAck`) have succeeded: in TLS 1.3 a server refuses a client certificate
//! only after the client has finished its side of the handshake, so without that round trip
//! a refused client would look connected. A refusal comes back as a typed
//! [`ConnectError::Rejected`].
//!
//! Transfers verify every chunk against the manifest before it counts, keep many chunks in
//! flight on separate streams, resume from what a previous attempt left, and reconnect on
//! network failures as their [`RetryPolicy`] allows.
//!
//! SVIDs are short-lived and rotate, on both sides, while a connection is open. Before a new
//! request goes on the current connection, the client replaces the connection with a fresh
//! handshake (which presents the newest SVID from the [`crate::IdentityHandle`]) once our
//! SVID on it is about to expire and a newer one is there, or the server's is about to
//! expire. A transfer that meets such a renewal between chunks finishes its chunks in
//! flight, then resumes on the new connection from its verified chunks; so does one whose
//! connection was closed because an SVID on it expired. Neither counts against its
//! [`RetryPolicy`]. The client also closes a connection itself once the server's SVID has
//! expired or its serial is revoked.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use certs::Usage;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;

use crate::audit::{AuditEvent, AuditRecord};
use crate::clock::Clock;
use crate::config::ClientConfig;
use crate::error::{ConnectError, Rejection, RequestError};
use crate::identity::{
    CREDENTIALS_CHECK_INTERVAL, CredentialsEnd, FailureSlot, IdentityHandle, Peer,
    peer_credentials_end, peer_identity, renewal_margin,
};
pub use crate::proto::retry::RetryPolicy;
use crate::proto::retry::{AttemptEnd, MAX_STALLED_RENEWALS};
pub(crate) use crate::proto::retry::{Attempts, Next};
use crate::proto::{
    DatasetName, ErrorCode, Frame, FrameKind, Hello, HelloAck, Manifest, ObjectEntry, ObjectPath,
    Request, Response,
};
use crate::transport::{FrameSink, FrameSource, Path, RequestStream, mux, quic, tcp};

mod attempt;
mod fetch;
mod pace;
mod push;
mod rdma;

pub use fetch::FetchReport;
pub use push::PushReport;

/// A connection to one server, re-established on demand.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    addr: SocketAddr,
    path: Path,
    endpoint: Option<quinn::Endpoint>,
    conn: Mutex<Arc<Connection>>,
    /// Held while the connection is being replaced, so concurrent requests make one.
    reconnecting: tokio::sync::Mutex<()>,
    /// Whether we said why a pull does not use RDMA (said once per client).
    rdma_notice: std::sync::atomic::AtomicBool,
    /// Set only for the bench's plaintext baseline: the server identity we assume.
    #[cfg(feature = "bench-plaintext")]
    plaintext: Option<certs::SpiffeId>,
}

impl Client {
    /// Connects to `addr` over `path` and completes the first round trip.
    pub async fn connect(
        config: ClientConfig,
        addr: SocketAddr,
        path: Path,
    ) -> Result<Self, ConnectError> {
        let endpoint = match path {
            Path::Quic => Some(
                quic::client_endpoint(addr, &config.transport)
                    .map_err(|e| ConnectError::Local(format!("UDP socket: {e}")))?,
            ),
            Path::Tcp => None,
            Path::Rdma => {
                return Err(ConnectError::Local(
                    "RDMA carries transfers over a QUIC connection: connect with Path::Quic and enable TransportConfig::rdma".into(),
                ));
            }
        };
        let conn = establish(&config, endpoint.as_ref(), addr, path).await?;
        let conn = adopt(&config, conn);
        Ok(Self {
            config,
            addr,
            path,
            endpoint,
            conn: Mutex::new(conn),
            reconnecting: tokio::sync::Mutex::new(()),
            rdma_notice: std::sync::atomic::AtomicBool::new(false),
            #[cfg(feature = "bench-plaintext")]
            plaintext: None,
        })
    }

    /// Tries each path in order, moving on only after a network failure (an unreachable
    /// address or a timeout, which is what blocked UDP looks like); a refusal is final.
    pub async fn connect_any(
        config: ClientConfig,
        addr: SocketAddr,
        paths: &[Path],
    ) -> Result<Self, ConnectError> {
        let mut last = None;
        for &path in paths {
            match Self::connect(config.clone(), addr, path).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_network() => {
                    tracing::warn!(path = %path, error = %e, "path failed; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Local("no path to try".into())))
    }

    /// The server, as authenticated by its SVID.
    pub fn server(&self) -> Peer {
        self.current().peer.clone()
    }

    /// The transport in use.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The server's limits and chunk size, from its `HelloAck`.
    pub fn server_limits(&self) -> HelloAck {
        self.current().ack.clone()
    }

    /// Datasets this identity may see.
    pub async fn list_datasets(&self) -> Result<Vec<DatasetName>, RequestError> {
        match self.call(&Request::ListDatasets).await? {
            Response::Datasets(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    /// Every object of a dataset whose path starts with `prefix`, in path order.
    pub async fn list_objects(
        &self,
        dataset: &DatasetName,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, RequestError> {
        let mut out = Vec::new();
        let mut start_after = None;
        loop {
            let req = Request::ListObjects {
                dataset: dataset.clone(),
                prefix: prefix.to_owned(),
                start_after: start_after.clone(),
                limit: crate::proto::message::MAX_LIST_ENTRIES as u32,
            };
            match self.call(&req).await? {
                Response::Objects { entries, more } => {
                    start_after = entries.last().map(|e| e.path.clone());
                    out.extend(entries);
                    if !more || start_after.is_none() {
                        return Ok(out);
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// An object's manifest: size, chunk hashes, root hash.
    pub async fn stat(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> Result<Manifest, RequestError> {
        let req = Request::Stat {
            dataset: dataset.clone(),
            object: object.clone(),
        };
        match self.call(&req).await? {
            Response::Manifest(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.current().close();
    }

    /// What QUIC has learnt of the path so far, for reports; `None` on other transports.
    pub fn quic_path_stats(&self) -> Option<QuicPathStats> {
        let conn = self.current();
        let stats = conn.quic()?.stats();
        Some(QuicPathStats {
            mtu: stats.path.current_mtu,
            rtt: stats.path.rtt,
            sent_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            black_holes_detected: stats.path.black_holes_detected,
            received_datagrams: stats.udp_rx.datagrams,
            received_bytes: stats.udp_rx.bytes,
        })
    }

    /// One request, one response, on a fresh stream.
    pub(crate) async fn call(&self, req: &Request) -> Result<Response, RequestError> {
        self.connection()
            .await
            .map_err(|e| {
                RequestError::Stream(crate::transport::StreamError::ConnectionLost(e.to_string()))
            })?
            .call(req)
            .await
    }

    /// The current connection, re-established if it has ended or is due for renewal (an
    /// SVID on it is about to expire). Requests in flight on a renewed connection go on;
    /// it closes once the last of them lets go of it.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, ConnectError> {
        let current = self.current();
        if current.is_usable() {
            return Ok(current);
        }
        let _one = self.reconnecting.lock().await;
        // Another request may have replaced it while we waited.
        let current = self.current();
        if current.is_usable() {
            return Ok(current);
        }
        if current.is_closed() {
            tracing::info!(path = %self.path, "reconnecting");
        } else {
            tracing::info!(
                path = %self.path,
                peer.id = %current.peer.id,
                "renewing the connection: an SVID on it is about to expire"
            );
        }
        #[cfg(feature = "bench-plaintext")]
        if let Some(server) = &self.plaintext {
            let fresh = Arc::new(establish_plaintext(&self.config, self.addr, server).await?);
            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
            return Ok(fresh);
        }
        let mut fresh =
            establish(&self.config, self.endpoint.as_ref(), self.addr, self.path).await?;
        fresh.succeed(&current);
        let fresh = adopt(&self.config, fresh);
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }

    fn current(&self) -> Arc<Connection> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }
}

/// Wraps a fresh connection and, unless it is the bench's plaintext one, starts closing it
/// once the server's credentials end.
fn adopt(config: &ClientConfig, conn: Connection) -> Arc<Connection> {
    let conn = Arc::new(conn);
    if conn.renewal.is_some() {
        tokio::spawn(watch_server(Arc::downgrade(&conn), config.clone()));
    }
    conn
}

/// Closes `conn` when the server's SVID expires or its serial is revoked; ends early once
/// the connection is closed or dropped.
async fn watch_server(conn: Weak<Connection>, config: ClientConfig) {
    let Some((serial, not_after)) = conn
        .upgrade()
        .map(|c| (c.peer.serial.clone(), c.peer.not_after))
    else {
        return;
    };
    let ended = peer_credentials_end(&serial, not_after, &*config.clock, config.identity.watch());
    tokio::pin!(ended);
    let end = loop {
        tokio::select! {
            end = &mut ended => break end,
            () = tokio::time::sleep(CREDENTIALS_CHECK_INTERVAL) => {
                match conn.upgrade() {
                    Some(c) if !c.is_closed() => {}
                    _ => return,
                }
            }
        }
    };
    let Some(conn) = conn.upgrade() else { return };
    if conn.is_closed() {
        return;
    }
    conn.close_for(end);
    tracing::info!(
        peer.id = %conn.peer.id,
        reason = end.reason(),
        "connection closed: the server's credentials ended"
    );
    let record = AuditRecord {
        time: config.clock.now(),
        event: AuditEvent::ConnectionClosed {
            peer: conn.peer.id.clone(),
            serial: conn.peer.serial.clone(),
            reason: end.reason().to_owned(),
        },
    };
    if let Err(e) = config.audit.record(&record) {
        tracing::error!(error = %e, "audit record lost");
    }
}

/// How a pull or push runs.
#[derive(Clone, Default)]
pub struct TransferOptions {
    /// Chunks in flight at once, each on its own stream (default: the client's
    /// `parallel_chunks`).
    pub parallel: Option<u32>,
    /// Reconnects after network failures.
    pub retry: RetryPolicy,
    /// Called with (bytes verified or acknowledged so far, total bytes) as chunks complete.
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    /// Most payload bytes per second, across all of the transfer's parallel chunks (default
    /// `None`: as fast as the network goes; `Some(0)` is taken as `None`). Chunks start
    /// spaced at this rate, so it holds on average over a few chunks; for a smooth flow keep
    /// chunks small against the rate. A paced pull does not use RDMA.
    pub max_rate: Option<u64>,
}

/// How a pull runs.
pub type FetchOptions = TransferOptions;

/// How a push runs.
pub type PushOptions = TransferOptions;

impl TransferOptions {
    pub(crate) fn parallel(&self, config: &ClientConfig) -> usize {
        self.parallel
            .unwrap_or(config.transport.parallel_chunks)
            .max(1) as usize
    }
}

impl std::fmt::Debug for TransferOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferOptions")
            .field("parallel", &self.parallel)
            .field("retry", &self.retry)
            .field("progress", &self.progress.is_some())
            .field("max_rate", &self.max_rate)
            .finish()
    }
}

/// Durations in reports, as whole milliseconds.
fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How one attempt of a transfer ended, when not with an error.
#[derive(Debug)]
pub(crate) enum Attempt<T> {
    /// The transfer is complete.
    Done(T),
    /// The connection became due for renewal between chunks: the chunks in flight finished,
    /// the others wait for the next attempt, on a fresh connection.
    Renew,
}

/// Decides what a transfer does after an attempt that ended for a renewal (`failed` none)
/// or failed (`failed`: whether its error is retriable). A retriable failure on a connection
/// that ended with its credentials (`used`) counts as a renewal too.
pub(crate) fn after_attempt(
    attempts: &mut Attempts,
    failed: Option<bool>,
    used: Option<&Connection>,
    progress: u64,
) -> Next {
    let end = match failed {
        None => AttemptEnd::Renewal,
        Some(retriable) => AttemptEnd::Failed {
            retriable,
            credentials_ended: used.is_some_and(Connection::ended_by_credentials),
        },
    };
    attempts.next(end, progress)
}

/// The error of a transfer whose connections kept needing renewal without progress.
pub(crate) fn renewals_stalled() -> ConnectError {
    ConnectError::Lost(format!(
        "the connection was renewed {MAX_STALLED_RENEWALS} times without a chunk getting through"
    ))
}

/// One established, authenticated connection.
#[derive(Debug)]
pub(crate) struct Connection {
    inner: Inner,
    pub(crate) peer: Peer,
    pub(crate) ack: HelloAck,
    timeout: Duration,
    /// When to replace it because an SVID on it is about to expire; none for the bench's
    /// plaintext baseline, which has no SVIDs.
    renewal: Option<Renewal>,
    /// Set once we closed it because the server's credentials ended.
    ended: std::sync::OnceLock<CredentialsEnd>,
}

/// When a connection is due for a fresh handshake.
#[derive(Debug)]
struct Renewal {
    identity: IdentityHandle,
    clock: Arc<dyn Clock>,
    /// The serial of our SVID on this connection.
    own_serial: String,
    /// From then on our SVID is too close to its expiry for new requests.
    own_at: SystemTime,
    /// From then on the server's SVID is; none when this connection already replaced one
    /// for that and the server presented the same SVID again (it has not rotated yet).
    peer_at: Option<SystemTime>,
}

impl Renewal {
    /// Whether a fresh handshake would help now: our SVID is near its end and a newer one is
    /// published, or the server's is near its end.
    fn is_due(&self) -> bool {
        let now = self.clock.now();
        let ours = now >= self.own_at && self.identity.current().svid().serial() != self.own_serial;
        ours || self.peer_at.is_some_and(|at| now >= at)
    }

    /// Whether either SVID is near its end (whether or not a newer one exists).
    fn is_near_end(&self) -> bool {
        let now = self.clock.now();
        now >= self.own_at || self.peer_at.is_some_and(|at| now >= at)
    }
}

/// A QUIC connection's view of its path (see [`Client::quic_path_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicPathStats {
    /// The datagram size in use: path-MTU discovery raises it up to the configured ceiling
    /// and falls back to 1200 when larger datagrams keep getting lost.
    pub mtu: u16,
    /// The smoothed round-trip time.
    pub rtt: Duration,
    /// Packets sent on the path.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Times losses of large datagrams made QUIC fall back to the minimum size.
    pub black_holes_detected: u64,
    /// Datagrams received from the server (their average size shows the server's MTU).
    pub received_datagrams: u64,
    /// Bytes of those datagrams.
    pub received_bytes: u64,
}

#[derive(Debug)]
enum Inner {
    Quic(quinn::Connection),
    Mux(mux::MuxClient),
}

impl Connection {
    /// Opens a request stream by sending `req`.
    pub(crate) async fn open(&self, req: &Request) -> Result<RequestStream, RequestError> {
        match &self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(|e| {
                    RequestError::Stream(crate::transport::StreamError::ConnectionLost(
                        quic::describe(&e),
                    ))
                })?;
                let mut s = RequestStream {
                    sink: FrameSink::quic(send, self.timeout),
                    source: FrameSource::quic(recv, self.timeout),
                };
                s.sink.send(FrameKind::Request, req.encode()).await?;
                Ok(s)
            }
            Inner::Mux(m) => Ok(m.open(req.encode()).await?),
        }
    }

    /// Sends a request and waits for its single response.
    pub(crate) async fn call(&self, req: &Request) -> Result<Response, RequestError> {
        let mut s = self.open(req).await?;
        s.sink.finish();
        response(&mut s.source).await
    }

    /// The QUIC connection underneath (RDMA key export; tests that speak raw bytes).
    pub(crate) fn quic(&self) -> Option<&quinn::Connection> {
        match &self.inner {
            Inner::Quic(c) => Some(c),
            Inner::Mux(_) => None,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        match &self.inner {
            Inner::Quic(c) => c.close_reason().is_some(),
            Inner::Mux(m) => m.is_closed(),
        }
    }

    /// Open, and not due for renewal: new requests may go on it.
    fn is_usable(&self) -> bool {
        !self.is_closed() && !self.is_due_for_renewal()
    }

    /// Whether new requests should go on a fresh connection because an SVID on this one is
    /// about to expire (see [`Renewal::is_due`]).
    pub(crate) fn is_due_for_renewal(&self) -> bool {
        self.renewal.as_ref().is_some_and(Renewal::is_due)
    }

    /// Whether the connection has ended because credentials on it ended, or as good as: we
    /// or the server closed it for an expired or revoked SVID (QUIC says so in its close
    /// code; TLS/TCP does not, so there an SVID near or past its end stands for it). A
    /// transfer then goes on, on a fresh connection, without counting a failure.
    pub(crate) fn ended_by_credentials(&self) -> bool {
        if !self.is_closed() {
            return false;
        }
        if self.ended.get().is_some() {
            return true;
        }
        if let Inner::Quic(c) = &self.inner
            && let Some(quinn::ConnectionError::ApplicationClosed(close)) = c.close_reason()
            && CredentialsEnd::from_quic_code(close.error_code).is_some()
        {
            return true;
        }
        self.renewal.as_ref().is_some_and(Renewal::is_near_end)
    }

    /// Takes over from `previous`: if the server presents the SVID that made `previous` due
    /// for renewal, renewing again would not help until it expires.
    fn succeed(&mut self, previous: &Self) {
        let (Some(new), Some(old)) = (self.renewal.as_mut(), previous.renewal.as_ref()) else {
            return;
        };
        if self.peer.serial == previous.peer.serial
            && old.peer_at.is_none_or(|at| old.clock.now() >= at)
        {
            new.peer_at = None;
        }
    }

    /// Closes the connection because the server's credentials ended.
    fn close_for(&self, end: CredentialsEnd) {
        let _ = self.ended.set(end);
        match &self.inner {
            Inner::Quic(c) => c.close(end.quic_code(), end.reason().as_bytes()),
            Inner::Mux(m) => m.close(end.reason()),
        }
    }

    fn close(&self) {
        match &self.inner {
            Inner::Quic(c) => c.close(quinn::VarInt::from_u32(0), b"done"),
            Inner::Mux(m) => m.close("closed by client"),
        }
    }
}

/// Reads one `Response` (or `Error`) frame.
pub(crate) async fn response(source: &mut FrameSource) -> Result<Response, RequestError> {
    let frame = source
        .recv()
        .await?
        .ok_or_else(|| RequestError::Protocol("stream ended without a response".into()))?;
    match frame.kind {
        FrameKind::Response => {
            Response::decode(&frame.payload).map_err(|e| RequestError::Protocol(e.to_string()))
        }
        FrameKind::Error => Err(remote(&frame)),
        k => Err(RequestError::Protocol(format!("unexpected {k:?} frame"))),
    }
}

pub(crate) fn remote(frame: &Frame) -> RequestError {
    match ErrorCode::decode(&frame.payload) {
        Ok(code) => RequestError::Remote(code),
        Err(e) => RequestError::Protocol(format!("malformed error frame: {e}")),
    }
}

pub(crate) fn unexpected(r: &Response) -> RequestError {
    RequestError::Protocol(format!(
        "unexpected response {:?}",
        std::mem::discriminant(r)
    ))
}

async fn establish(
    config: &ClientConfig,
    endpoint: Option<&quinn::Endpoint>,
    addr: SocketAddr,
    path: Path,
) -> Result<Connection, ConnectError> {
    let failure = FailureSlot::default();
    // Read before the handshake takes the credentials, so a rotation during it can only
    // make us renew early, never late.
    let own = config.identity.current();
    let tls = crate::tls::client_config(
        &config.identity,
        config.server_id.clone(),
        failure.clone(),
        config.clock.clone(),
    )
    .map_err(|e| ConnectError::Local(format!("TLS configuration: {e}")))?;
    let t = &config.transport;
    let timeout = t.handshake_timeout;
    let (inner, chain, ack) = match (path, endpoint) {
        (Path::Quic, Some(endpoint)) => {
            let qc = quic::client_config(tls, t).map_err(|e| ConnectError::Local(e.to_string()))?;
            let connecting = endpoint
                .connect_with(qc, addr, crate::tls::SERVER_NAME)
                .map_err(|e| ConnectError::Local(e.to_string()))?;
            let conn = match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(quic_connect_error(&e, &failure)),
                Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
            };
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            if alpn.as_deref() != Some(crate::tls::ALPN) {
                return Err(ConnectError::Tls("server did not agree on our ALPN".into()));
            }
            let chain = conn
                .peer_identity()
                .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|c| *c)
                .unwrap_or_default();
            let ack = match tokio::time::timeout(timeout, quic_hello(&conn, t.io_timeout)).await {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) => {
                    // A server that refused our certificate closed with a TLS alert.
                    return Err(match conn.close_reason() {
                        Some(reason) => quic_connect_error(&reason, &failure),
                        None => e,
                    });
                }
                Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
            };
            (Inner::Quic(conn), chain, ack)
        }
        (Path::Tcp | Path::Rdma, _) | (Path::Quic, None) => {
            let socket =
                tcp::connect(addr, timeout)
                    .await
                    .map_err(|source| match source.kind() {
                        std::io::ErrorKind::TimedOut => ConnectError::Timeout { addr, timeout },
                        _ => ConnectError::Unreachable { addr, source },
                    })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
            let name = ServerName::try_from(crate::tls::SERVER_NAME)
                .map_err(|e| ConnectError::Local(e.to_string()))?;
            let mut stream =
                match tokio::time::timeout(timeout, connector.connect(name, tcp::buffered(socket)))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(tls_connect_error(&e, &failure)),
                    Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
                };
            let (_, session) = stream.get_ref();
            if session.alpn_protocol() != Some(crate::tls::ALPN) {
                return Err(ConnectError::Tls("server did not agree on our ALPN".into()));
            }
            let chain: Vec<CertificateDer<'static>> = session
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            stream.get_mut().1.set_buffer_limit(Some(4 << 20));
            let ack = match tokio::time::timeout(timeout, stream_hello(&mut stream)).await {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) => return Err(tls_connect_error(&e, &failure)),
                Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
            }?;
            let m = mux::client(stream, ack.max_streams, t.io_timeout, mux::TLS_READ_BUFFER);
            (Inner::Mux(m), chain, ack)
        }
    };
    let creds = config.identity.current();
    let now = config.clock.now();
    let verified = peer_identity(&chain, &creds, now, Usage::Server)
        .map_err(ConnectError::ServerNotTrusted)?;
    let svid = own.svid();
    let own_life = svid
        .not_after()
        .duration_since(svid.not_before())
        .unwrap_or_default();
    // We do not know when the server's SVID was issued: what is left of it now stands for
    // its lifetime (which makes the margin smaller, never larger).
    let peer_left = verified.not_after.duration_since(now).unwrap_or_default();
    let renewal = Renewal {
        identity: config.identity.clone(),
        clock: config.clock.clone(),
        own_serial: svid.serial().to_owned(),
        own_at: svid.not_after() - renewal_margin(own_life),
        peer_at: Some(verified.not_after - renewal_margin(peer_left)),
    };
    Ok(Connection {
        inner,
        peer: Peer {
            id: verified.id,
            serial: verified.serial,
            not_after: verified.not_after,
            addr,
            path,
        },
        ack,
        timeout: t.io_timeout,
        renewal: Some(renewal),
        ended: std::sync::OnceLock::new(),
    })
}

/// The bench's plaintext baseline: same protocol, bare TCP, assumed identities.
#[cfg(feature = "bench-plaintext")]
pub(crate) async fn connect_plaintext(
    config: ClientConfig,
    addr: SocketAddr,
    server: certs::SpiffeId,
) -> Result<Client, ConnectError> {
    let conn = establish_plaintext(&config, addr, &server).await?;
    Ok(Client {
        config,
        addr,
        path: Path::Tcp,
        endpoint: None,
        conn: Mutex::new(Arc::new(conn)),
        reconnecting: tokio::sync::Mutex::new(()),
        rdma_notice: std::sync::atomic::AtomicBool::new(false),
        plaintext: Some(server),
    })
}

#[cfg(feature = "bench-plaintext")]
async fn establish_plaintext(
    config: &ClientConfig,
    addr: SocketAddr,
    server: &certs::SpiffeId,
) -> Result<Connection, ConnectError> {
    let t = &config.transport;
    let mut socket = tcp::connect(addr, t.handshake_timeout)
        .await
        .map_err(|source| ConnectError::Unreachable { addr, source })?;
    let ack = stream_hello(&mut socket)
        .await
        .map_err(|e| ConnectError::Lost(e.to_string()))??;
    Ok(Connection {
        inner: Inner::Mux(mux::client(
            socket,
            ack.max_streams,
            t.io_timeout,
            mux::PLAIN_READ_BUFFER,
        )),
        peer: Peer {
            id: server.clone(),
            serial: "plaintext".into(),
            not_after: SystemTime::UNIX_EPOCH,
            addr,
            path: Path::Tcp,
        },
        ack,
        timeout: t.io_timeout,
        renewal: None,
        ended: std::sync::OnceLock::new(),
    })
}

async fn quic_hello(conn: &quinn::Connection, timeout: Duration) -> Result<HelloAck, ConnectError> {
    let lost = |e: &dyn std::fmt::Display| ConnectError::Lost(e.to_string());
    let (send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let mut sink = FrameSink::quic(send, timeout);
    let mut source = FrameSource::quic(recv, timeout);
    sink.send(FrameKind::Hello, Hello::current().encode())
        .await
        .map_err(|e| lost(&e))?;
    sink.finish();
    let frame = source
        .recv()
        .await
        .map_err(|e| lost(&e))?
        .ok_or_else(|| ConnectError::Lost("server closed the hello stream".into()))?;
    hello_ack(&frame)
}

/// Hello over a byte stream; an I/O error is returned as such so a TLS alert can be read.
async fn stream_hello<S>(stream: &mut S) -> std::io::Result<Result<HelloAck, ConnectError>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = Frame::new(FrameKind::Hello, 0, Hello::current().encode());
    mux::write_frame(stream, &hello).await?;
    stream.flush().await?;
    Ok(match mux::read_frame(stream).await? {
        Some(frame) => hello_ack(&frame),
        None => Err(ConnectError::Lost("server closed the connection".into())),
    })
}

fn hello_ack(frame: &Frame) -> Result<HelloAck, ConnectError> {
    match frame.kind {
        FrameKind::HelloAck => {
            let ack = HelloAck::decode(&frame.payload)
                .map_err(|e| ConnectError::Lost(format!("malformed hello answer: {e}")))?;
            if ack.version != crate::proto::message::PROTOCOL_VERSION {
                return Err(ConnectError::Version);
            }
            Ok(ack)
        }
        FrameKind::Error => Err(match ErrorCode::decode(&frame.payload) {
            Ok(ErrorCode::Busy) => ConnectError::Busy,
            Ok(ErrorCode::Version) => ConnectError::Version,
            Ok(other) => ConnectError::Lost(format!("server refused: {}", other.describe())),
            Err(e) => ConnectError::Lost(format!("malformed hello answer: {e}")),
        }),
        k => Err(ConnectError::Lost(format!(
            "unexpected {k:?} frame instead of hello answer"
        ))),
    }
}

fn take_failure(failure: &FailureSlot) -> Option<certs::SvidError> {
    failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

fn quic_connect_error(e: &quinn::ConnectionError, failure: &FailureSlot) -> ConnectError {
    if let Some(svid) = take_failure(failure) {
        return ConnectError::ServerNotTrusted(svid);
    }
    if let quinn::ConnectionError::ConnectionClosed(c) = e
        && c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    {
        return ConnectError::Busy;
    }
    if let Some(alert) = quic::alert_of(e) {
        return ConnectError::Rejected(Rejection::from_alert(rustls::AlertDescription::from(
            alert,
        )));
    }
    match e {
        quinn::ConnectionError::TimedOut => ConnectError::Lost("handshake timed out".into()),
        other => ConnectError::Tls(other.to_string()),
    }
}

fn tls_connect_error(e: &std::io::Error, failure: &FailureSlot) -> ConnectError {
    if let Some(svid) = take_failure(failure) {
        return ConnectError::ServerNotTrusted(svid);
    }
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::AlertReceived(alert)) => {
            ConnectError::Rejected(Rejection::from_alert(*alert))
        }
        Some(other) => ConnectError::Tls(other.to_string()),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                ConnectError::Lost(e.to_string())
            }
            _ => ConnectError::Tls(e.to_string()),
        },
    }
}
