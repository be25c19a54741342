//! The agent API: HTTP/1.1 + JSON over TLS 1.3 (ALPN `transportd-issuer/1`).
//!
//! The issuer presents its own SVID. A client certificate is optional at the TLS layer (a
//! node's first contact has none) but verified by the SPIFFE rules and the revocation list
//! whenever one is presented; each route then says what it needs:
//!
//! | route | caller | does |
//! |---|---|---|
//! | `POST /v1/attest` | anyone with a join token | redeems it, signs the node's CSR |
//! | `POST /v1/renew` | a node, by its SVID | signs a CSR for its next SVID |
//! | `POST /v1/sync` | a node | bundle, revoked serials, its registration entries |
//! | `POST /v1/workload` | a node | signs a CSR for one of its entries |
//! | `POST /v1/witness` | a node | keeps its audit checkpoints append-only, countersigns |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use certs::{SpiffeId, Usage};
use hyper::{Method, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span};

use super::Issuer;
use super::http::{self, ApiError, Call};
use super::wire::AGENT_ALPN;

/// The running API.
#[derive(Debug)]
pub(super) struct Api {
    pub(super) addr: SocketAddr,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// Binds the configured address and serves in the background.
pub(super) async fn serve(issuer: Arc<Issuer>) -> anyhow::Result<Api> {
    let listen = issuer.config().listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen {listen}"))?;
    let addr = listener.local_addr()?;
    let tls = Arc::new(
        libtransport::tls::control_server_config(issuer.identity(), AGENT_ALPN, issuer.clock())
            .context("TLS configuration")?,
    );
    let task = tokio::spawn(accept(listener, tls, issuer));
    Ok(Api { addr, task })
}

async fn accept(listener: TcpListener, tls: Arc<rustls::ServerConfig>, issuer: Arc<Issuer>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (socket, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(peer.addr = %addr, "agent API connection limit reached; closing");
            continue;
        };
        let tls = tls.clone();
        let issuer = issuer.clone();
        let span = info_span!("agent", peer.addr = %addr);
        tokio::spawn(
            async move {
                connection(socket, addr, tls, issuer).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn connection(
    socket: tokio::net::TcpStream,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    issuer: Arc<Issuer>,
) {
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(tls).accept(socket),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "agent TLS handshake failed");
            let _ = issuer.record(libtransport::audit::AuditEvent::IssuanceRefused {
                node: None,
                addr: Some(addr),
                reason: format!("TLS: {e}"),
            });
            return;
        }
        Err(_) => return,
    };
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(AGENT_ALPN) {
        debug!("peer did not negotiate the agent ALPN");
        return;
    }
    let chain: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let peer = if chain.is_empty() {
        None
    } else {
        // The handshake verified it; this takes the ID out of the same chain.
        let creds = issuer.identity().current();
        match creds
            .bundle()
            .verify(&chain, issuer.clock().now(), Usage::Client)
        {
            Ok(v) if !creds.revoked().contains(&v.serial) => Some(v.id),
            _ => return,
        }
    };
    http::serve_connection(stream, CONNECTION_LIFETIME, move |call| {
        let issuer = issuer.clone();
        let peer = peer.clone();
        async move {
            tokio::task::spawn_blocking(move || route(&issuer, peer.as_ref(), addr, &call))
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(&e.into())))
        }
    })
    .await;
}

fn route(
    issuer: &Issuer,
    peer: Option<&SpiffeId>,
    addr: SocketAddr,
    call: &Call,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    if call.method != Method::POST {
        return Err(ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "POST only".into(),
        });
    }
    if call.path == "/v1/attest" {
        return http::ok(&issuer.attest(&call.json()?, addr)?);
    }
    let Some(node) = peer else {
        let e = ApiError::unauthenticated(
            "this call needs the node's SVID as client certificate; a new node attests first",
        );
        let _ = issuer.record(libtransport::audit::AuditEvent::IssuanceRefused {
            node: None,
            addr: Some(addr),
            reason: e.message.clone(),
        });
        return Err(e);
    };
    match call.path.as_str() {
        "/v1/renew" => http::ok(&issuer.renew(node, &call.json()?)?),
        "/v1/sync" => http::ok(&issuer.sync(node)?),
        "/v1/workload" => http::ok(&issuer.workload(node, &call.json()?)?),
        "/v1/witness" => http::ok(&issuer.witness(node, &call.json()?)?),
        other => Err(ApiError::not_found(format!("no route {other}"))),
    }
}

/// Agent connections at once: nodes call briefly every few seconds.
const MAX_CONNECTIONS: usize = 256;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a connection is served (agents open one per call).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
