//! One established, authenticated connection of a client: how it is made (the transport's
//! handshake, then the server's SVID verified and the renewal schedule set), when it is due
//! for a fresh handshake (an SVID on it near its end, the connection at its maximum age, or
//! the server retiring it), and how it is closed once the server's credentials end.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Instant, SystemTime};

use certs::Usage;

use super::reply::response;
use crate::audit::{AuditEvent, AuditRecord};
use crate::clock::Clock;
use crate::config::ClientConfig;
use crate::error::{ConnectError, RequestError};
use crate::identity::{
    CREDENTIALS_CHECK_INTERVAL, CredentialsEnd, IdentityHandle, Peer, peer_credentials_end,
    renewal_margin, verify_peer,
};
use crate::proto::{HelloAck, Request, Response};
use crate::transport::{self, Close, Connector, RequestStream};

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
    /// From then on the connection is older than `max_connection_age`.
    aged_at: Option<Instant>,
}

/// Why a connection is due for a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// An SVID on it is about to expire.
    Svid,
    /// It reached the maximum connection age.
    Age,
    /// The server is retiring it (it reached the server's maximum age).
    Retired,
}

impl Due {
    /// In words, for log lines.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Svid => "an SVID on it is about to expire",
            Self::Age => "it reached its maximum age",
            Self::Retired => "the server is retiring it",
        }
    }
}

impl Renewal {
    /// Whether a fresh handshake would help now: our SVID is near its end and a newer one is
    /// published, or the server's is near its end.
    fn is_due(&self) -> bool {
        let now = self.clock.now();
        let ours = now >= self.own_at && self.identity.current().svid().serial() != self.own_serial;
        ours || self.peer_at.is_some_and(|at| now >= at)
    }

    /// Whether the connection has reached its maximum age.
    fn is_aged(&self) -> bool {
        self.aged_at.is_some_and(|at| self.clock.instant() >= at)
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
    pub(super) fn is_usable(&self) -> bool {
        !self.is_closed() && !self.is_due_for_renewal()
    }

    /// Whether new requests should go on a fresh connection: an SVID on this one is about
    /// to expire (see [`Renewal::is_due`]), it reached its maximum age, or the server is
    /// retiring it.
    pub(crate) fn is_due_for_renewal(&self) -> bool {
        self.due().is_some()
    }

    /// Why new requests should go on a fresh connection, if they should.
    pub(crate) fn due(&self) -> Option<Due> {
        if self.inner.is_going_away() {
            Some(Due::Retired)
        } else if self.renewal.is_due() {
            Some(Due::Svid)
        } else if self.renewal.is_aged() {
            Some(Due::Age)
        } else {
            None
        }
    }

    /// Whether the connection has ended, or is ending, for a reason a fresh one cures: the
    /// server is retiring it at its maximum age (it said `GoAway`, or closed saying so), or
    /// we or the server closed it for an expired or revoked SVID (QUIC says so in its close
    /// code; TLS/TCP does not, so there an SVID near or past its end stands for it). A
    /// transfer then goes on, on a fresh connection, without counting a failure.
    pub(crate) fn ended_for_renewal(&self) -> bool {
        if self.inner.is_going_away() {
            return true;
        }
        if !self.is_closed() {
            return false;
        }
        self.ended.get().is_some()
            || self.inner.closed_for_credentials().is_some()
            || self.renewal.is_near_end()
    }

    /// Takes over from `previous`: if the server presents the SVID that made `previous` due
    /// for renewal, renewing again would not help until it expires.
    pub(super) fn succeed(&mut self, previous: &Self) {
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

    pub(super) fn close(&self) {
        self.inner.close(Close::Done);
    }
}

/// Connects through `connector`, verifies the server's identity and sets the renewal
/// schedule of the fresh connection.
pub(super) async fn establish(
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
        aged_at: config
            .clock
            .instant()
            .checked_add(config.transport.max_connection_age),
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

/// Wraps a fresh connection and starts closing it once the server's credentials end.
pub(super) fn adopt(config: &ClientConfig, conn: Connection) -> Arc<Connection> {
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
