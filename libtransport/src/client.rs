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

use crate::audit::{AuditEvent, AuditRecord};
use crate::clock::Clock;
use crate::config::ClientConfig;
use crate::error::{ConnectError, LocalFailure, LostReason, ProtocolViolation, RequestError};
use crate::identity::{
    CREDENTIALS_CHECK_INTERVAL, CredentialsEnd, IdentityHandle, Peer, peer_credentials_end,
    renewal_margin, verify_peer,
};
pub use crate::proto::retry::RetryPolicy;
use crate::proto::retry::{AttemptEnd, MAX_STALLED_RENEWALS};
pub(crate) use crate::proto::retry::{Attempts, Next};
use crate::proto::{
    DatasetName, ErrorCode, Frame, FrameKind, HelloAck, Manifest, ObjectEntry, ObjectPath, Request,
    Response,
};
use crate::transport::quic::QuicConnector;
use crate::transport::tcp::TlsTcpConnector;
use crate::transport::{self, Close, FrameSource, Path, RequestStream};
pub use crate::transport::{Connector, QuicPathStats};

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
    connector: Arc<dyn Connector>,
    conn: Mutex<Arc<Connection>>,
    /// Held while the connection is being replaced, so concurrent requests make one.
    reconnecting: tokio::sync::Mutex<()>,
    /// Whether we said why a pull does not use RDMA (said once per client).
    rdma_notice: std::sync::atomic::AtomicBool,
}

impl Client {
    /// Connects to `addr` over `path` and completes the first round trip.
    pub async fn connect(
        config: ClientConfig,
        addr: SocketAddr,
        path: Path,
    ) -> Result<Self, ConnectError> {
        let (identity, server_id, clock, transport) = (
            config.identity.clone(),
            config.server_id.clone(),
            config.clock.clone(),
            config.transport.clone(),
        );
        let connector: Arc<dyn Connector> = match path {
            Path::Quic => Arc::new(
                QuicConnector::new(addr, identity, server_id, clock, transport)
                    .map_err(|e| ConnectError::Local(LocalFailure::UdpSocket(e)))?,
            ),
            Path::Tcp => Arc::new(TlsTcpConnector::new(identity, server_id, clock, transport)),
            Path::Rdma => {
                return Err(ConnectError::Local(LocalFailure::RdmaPath));
            }
        };
        Self::connect_with(config, addr, connector).await
    }

    /// Connects to `addr` with a transport of the caller's (see [`Connector`]), and
    /// completes the first round trip. The server's identity is verified as for the
    /// built-in transports.
    pub async fn connect_with(
        config: ClientConfig,
        addr: SocketAddr,
        connector: Arc<dyn Connector>,
    ) -> Result<Self, ConnectError> {
        let conn = establish(&config, &*connector, addr).await?;
        let conn = adopt(&config, conn);
        Ok(Self {
            config,
            addr,
            connector,
            conn: Mutex::new(conn),
            reconnecting: tokio::sync::Mutex::new(()),
            rdma_notice: std::sync::atomic::AtomicBool::new(false),
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
        Err(last.unwrap_or_else(|| ConnectError::Local(LocalFailure::NoPath)))
    }

    /// The server, as authenticated by its SVID.
    pub fn server(&self) -> Peer {
        self.current().peer.clone()
    }

    /// The transport in use.
    pub fn path(&self) -> Path {
        self.connector.path()
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
        self.current().inner.path_stats()
    }

    /// One request, one response, on a fresh stream.
    pub(crate) async fn call(&self, req: &Request) -> Result<Response, RequestError> {
        self.connection()
            .await
            .map_err(|e| {
                RequestError::Stream(transport::StreamError::ConnectionLost(
                    transport::LostConnection::new(transport::LostKind::Reconnect(Arc::new(e))),
                ))
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
            tracing::info!(path = %self.path(), "reconnecting");
        } else {
            tracing::info!(
                path = %self.path(),
                peer.id = %current.peer.id,
                "renewing the connection: an SVID on it is about to expire"
            );
        }
        let mut fresh = establish(&self.config, &*self.connector, self.addr).await?;
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

/// Wraps a fresh connection and starts closing it once the server's credentials end.
fn adopt(config: &ClientConfig, conn: Connection) -> Arc<Connection> {
    let conn = Arc::new(conn);
    tokio::spawn(watch_server(Arc::downgrade(&conn), config.clone()));
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
    ConnectError::Lost(LostReason::RenewalsStalled(MAX_STALLED_RENEWALS))
}

/// One established, authenticated connection.
#[derive(Debug)]
pub(crate) struct Connection {
    inner: Arc<dyn transport::Connection>,
    pub(crate) peer: Peer,
    pub(crate) ack: HelloAck,
    /// When to replace it because an SVID on it is about to expire.
    renewal: Renewal,
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

impl Connection {
    /// Opens a request stream by sending `req`.
    pub(crate) async fn open(&self, req: &Request) -> Result<RequestStream, RequestError> {
        Ok(self.inner.open(req.encode()).await?)
    }

    /// Sends a request and waits for its single response.
    pub(crate) async fn call(&self, req: &Request) -> Result<Response, RequestError> {
        let mut s = self.open(req).await?;
        s.sink.finish();
        response(&mut s.source).await
    }

    /// The transport's connection underneath (RDMA key export and addresses).
    pub(crate) fn transport(&self) -> &dyn transport::Connection {
        &*self.inner
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Open, and not due for renewal: new requests may go on it.
    fn is_usable(&self) -> bool {
        !self.is_closed() && !self.is_due_for_renewal()
    }

    /// Whether new requests should go on a fresh connection because an SVID on this one is
    /// about to expire (see [`Renewal::is_due`]).
    pub(crate) fn is_due_for_renewal(&self) -> bool {
        self.renewal.is_due()
    }

    /// Whether the connection has ended because credentials on it ended, or as good as: we
    /// or the server closed it for an expired or revoked SVID (QUIC says so in its close
    /// code; TLS/TCP does not, so there an SVID near or past its end stands for it). A
    /// transfer then goes on, on a fresh connection, without counting a failure.
    pub(crate) fn ended_by_credentials(&self) -> bool {
        if !self.is_closed() {
            return false;
        }
        self.ended.get().is_some()
            || self.inner.closed_for_credentials().is_some()
            || self.renewal.is_near_end()
    }

    /// Takes over from `previous`: if the server presents the SVID that made `previous` due
    /// for renewal, renewing again would not help until it expires.
    fn succeed(&mut self, previous: &Self) {
        let (new, old) = (&mut self.renewal, &previous.renewal);
        if self.peer.serial == previous.peer.serial
            && old.peer_at.is_none_or(|at| old.clock.now() >= at)
        {
            new.peer_at = None;
        }
    }

    /// Closes the connection because the server's credentials ended.
    fn close_for(&self, end: CredentialsEnd) {
        let _ = self.ended.set(end);
        self.inner.close(Close::Credentials(end));
    }

    fn close(&self) {
        self.inner.close(Close::Done);
    }
}

/// Reads one `Response` (or `Error`) frame.
pub(crate) async fn response(source: &mut FrameSource) -> Result<Response, RequestError> {
    let frame = source
        .recv()
        .await?
        .ok_or(RequestError::Protocol(ProtocolViolation::NoResponse))?;
    match frame.kind {
        FrameKind::Response => Response::decode(&frame.payload)
            .map_err(|e| RequestError::Protocol(ProtocolViolation::Decode(e))),
        FrameKind::Error => Err(remote(&frame)),
        k => Err(RequestError::Protocol(ProtocolViolation::UnexpectedFrame(
            k,
        ))),
    }
}

pub(crate) fn remote(frame: &Frame) -> RequestError {
    match ErrorCode::decode(&frame.payload) {
        Ok(code) => RequestError::Remote(code),
        Err(e) => RequestError::Protocol(ProtocolViolation::MalformedError(e)),
    }
}

pub(crate) fn unexpected(r: &Response) -> RequestError {
    RequestError::Protocol(ProtocolViolation::UnexpectedResponse(
        std::mem::discriminant(r),
    ))
}

/// Connects through `connector`, verifies the server's identity and sets the renewal
/// schedule of the fresh connection.
async fn establish(
    config: &ClientConfig,
    connector: &dyn Connector,
    addr: SocketAddr,
) -> Result<Connection, ConnectError> {
    // Read before the handshake takes the credentials, so a rotation during it can only
    // make us renew early, never late.
    let own = config.identity.current();
    let established = connector.connect(addr).await?;
    let creds = config.identity.current();
    let now = config.clock.now();
    let verified = verify_peer(&established.proof, &creds, now, Usage::Server)
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
        inner: established.connection,
        peer: Peer {
            id: verified.id,
            serial: verified.serial,
            not_after: verified.not_after,
            addr,
            path: connector.path(),
        },
        ack: established.ack,
        renewal,
        ended: std::sync::OnceLock::new(),
    })
}
