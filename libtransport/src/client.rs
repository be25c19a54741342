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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::ClientConfig;
use crate::error::{ConnectError, LocalFailure, RequestError};
use crate::identity::Peer;
use crate::proto::request::{Answer, ListObjects};
pub use crate::proto::retry::RetryPolicy;
use crate::proto::{DatasetName, HelloAck, Manifest, ObjectEntry, ObjectPath, Request, Response};
use crate::transport;
use crate::transport::quic::QuicConnector;
use crate::transport::tcp::TlsTcpConnector;
pub use crate::transport::{Connector, QuicPathStats};
use crate::vocab::Path;

mod attempt;
mod connection;
mod fetch;
mod memory;
mod pace;
mod push;
mod rdma;
pub(crate) mod reply;
mod stripe;

pub(crate) use connection::Connection;
use connection::{adopt, establish};

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
    /// Further connections to the same server that striped transfers use, kept for the
    /// next transfer; made on first use.
    stripes: tokio::sync::Mutex<Vec<Arc<Connection>>>,
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
            stripes: tokio::sync::Mutex::new(Vec::new()),
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
        Ok(Answer::datasets(self.call(&Request::ListDatasets).await?)?)
    }

    /// Every object of a dataset whose path starts with `prefix`, in path order.
    pub async fn list_objects(
        &self,
        dataset: &DatasetName,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, RequestError> {
        let mut listing = ListObjects::new(dataset.clone(), prefix.to_owned());
        while let Some(req) = listing.poll_request() {
            listing.handle_response(self.call(&req).await?)?;
        }
        Ok(listing.into_entries())
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
        Ok(Answer::manifest(self.call(&req).await?)?)
    }

    /// Waits for the server's access policy to differ from epoch `known` (0: any), or
    /// for the server's hold to end (about 15 s), and returns its epoch then. A caller that
    /// reuses the server's decisions (a sidecar) keeps one of these outstanding, and drops
    /// the decisions whenever the epoch moves.
    pub async fn policy_watch(&self, known: u64) -> Result<u64, RequestError> {
        Ok(Answer::policy(
            self.call(&Request::PolicyWatch { known }).await?,
        )?)
    }

    /// Closes the connection (and those striped transfers used).
    pub fn close(&self) {
        self.current().close();
        if let Ok(stripes) = self.stripes.try_lock() {
            for c in stripes.iter() {
                c.close();
            }
        }
    }

    /// What QUIC has learnt of the path so far, for reports; `None` on other transports.
    pub fn quic_path_stats(&self) -> Option<QuicPathStats> {
        self.current().transport().path_stats()
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
    /// SVID on it is about to expire, it reached its maximum age, or the server is retiring
    /// it). Requests in flight on a renewed connection go on;
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
        match current.due() {
            _ if current.is_closed() => tracing::info!(path = %self.path(), "reconnecting"),
            Some(due) => tracing::info!(
                path = %self.path(),
                peer.id = %current.peer.id,
                reason = due.reason(),
                "renewing the connection"
            ),
            None => {}
        }
        let mut fresh = establish(&self.config, &*self.connector, self.addr).await?;
        fresh.succeed(&current);
        let fresh = adopt(&self.config, fresh);
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }

    /// `n` further connections to the server for a striped transfer: those kept from an
    /// earlier one while usable, fresh ones for the rest.
    pub(crate) async fn stripe_connections(
        &self,
        n: usize,
    ) -> Result<Vec<Arc<Connection>>, ConnectError> {
        let mut kept = self.stripes.lock().await;
        kept.retain(|c| c.is_usable());
        while kept.len() < n {
            let fresh = establish(&self.config, &*self.connector, self.addr).await?;
            kept.push(adopt(&self.config, fresh));
        }
        Ok(kept[..n].to_vec())
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
    /// Connections one pull or push stripes its chunks over, each chunk on one of them, no
    /// more than make two chunks each (default `None`: [`default_stripes`]). The first is
    /// the client's own connection; the others are kept for later transfers. Resume,
    /// verification and the audit trails are as with one: the node authorizes each part on
    /// the connection it arrives on and records the transfer as one; a striped push's
    /// parts write one partial object, committed once.
    pub connections: Option<u32>,
}

/// How a pull runs.
pub type FetchOptions = TransferOptions;

/// How many connections a pull stripes over by default: one per core of this machine, at
/// most four. A connection is a chain of single tasks at each end (sealing and sending,
/// receiving and opening, hashing), each waiting at times for the other end's; over two of
/// them the gaps fill, which on a 2-core machine moved 8 to 17% more at the same CPU per GB,
/// and where there are more cores each stripe's tasks get cores of their own.
pub fn default_stripes() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    cores.clamp(1, 4) as u32
}

/// How a push runs.
pub type PushOptions = TransferOptions;

impl TransferOptions {
    pub(crate) fn parallel(&self, config: &ClientConfig) -> usize {
        self.parallel
            .unwrap_or(config.transport.parallel_chunks)
            .max(1) as usize
    }

    /// Connections to stripe over: at least one, and no more than chunks in flight.
    pub(crate) fn stripes(&self, config: &ClientConfig) -> usize {
        (self.connections.unwrap_or_else(default_stripes).max(1) as usize)
            .min(self.parallel(config))
    }
}

impl std::fmt::Debug for TransferOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferOptions")
            .field("parallel", &self.parallel)
            .field("retry", &self.retry)
            .field("progress", &self.progress.is_some())
            .field("max_rate", &self.max_rate)
            .field("connections", &self.connections)
            .finish()
    }
}

/// Durations in reports, as whole milliseconds.
fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
