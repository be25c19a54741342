//! The issuer's admin API: HTTP/1.1 + JSON on a local Unix socket (mode 0600; callers other
//! than the issuer's own user and root are turned away by their peer credentials). The
//! `transportd issuer token|entry|node|ca|status` commands are its clients
//! ([`AdminClient`]); going through the running issuer keeps every change in its audit
//! trail and its view of the CAs current.
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/tokens` | creates a join token (the secret is in the answer only) |
//! | `GET /v1/entries`, `POST /v1/entries`, `DELETE /v1/entries/<id>` | registration entries |
//! | `POST /v1/nodes/ban` | bans a node and revokes its live SVIDs |
//! | `POST /v1/ca/prepare`, `/activate`, `/retire` | CA rollover |
//! | `GET /v1/status` | CAs, nodes, pending tokens, recent SVIDs |
//! | `GET /v1/bundle` | the trust bundle (PEM), for bootstrapping nodes |
//! | `GET /v1/bundle/all` | every CA ever used, retired ones too (to verify old audit trails) |
//! | `POST /v1/witness/export` | the countersigned audit checkpoints held for a node |

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::Issuer;
use super::http::{self, ApiError, Call, CallError};
use super::wire::CaStep;

/// The running admin socket; stopping it removes the socket file.
#[derive(Debug)]
pub(crate) struct Admin {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Admin {
    pub(crate) fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the admin socket and serves in the background.
pub(super) async fn serve(issuer: Arc<Issuer>) -> anyhow::Result<Admin> {
    let path = issuer.config().admin_socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    remove_stale(&path)?;
    let listener =
        UnixListener::bind(&path).with_context(|| format!("admin_socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let task = tokio::spawn(accept(listener, issuer));
    Ok(Admin { path, task })
}

fn remove_stale(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{}: another issuer is already serving on this socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)?;
            Ok(())
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or choose another admin_socket",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

async fn accept(listener: UnixListener, issuer: Arc<Issuer>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !matches!(uid, Some(u) if u == me || u == 0) {
            warn!(uid = ?uid, "admin socket caller is neither the issuer's user nor root; refused");
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let issuer = issuer.clone();
        tokio::spawn(async move {
            http::serve_connection(stream, Duration::from_secs(60), move |call| {
                let issuer = issuer.clone();
                async move {
                    tokio::task::spawn_blocking(move || route(&issuer, &call))
                        .await
                        .unwrap_or_else(|e| Err(ApiError::internal(&e.into())))
                }
            })
            .await;
            drop(permit);
        });
    }
}

fn route(issuer: &Issuer, call: &Call) -> Result<(StatusCode, Vec<u8>), ApiError> {
    debug!(method = %call.method, path = %call.path, "admin call");
    let path = call.path.as_str();
    match (&call.method, path) {
        (&Method::POST, "/v1/tokens") => http::ok(&issuer.token_create(&call.json()?)?),
        (&Method::GET, "/v1/entries") => http::ok(&issuer.entries()?),
        (&Method::POST, "/v1/entries") => http::ok(&issuer.entry_create(&call.json()?)?),
        (&Method::DELETE, p) if p.starts_with("/v1/entries/") => {
            http::ok(&issuer.entry_delete(&p["/v1/entries/".len()..])?)
        }
        (&Method::POST, "/v1/nodes/ban") => {
            let ban: super::wire::Ban = call.json()?;
            http::ok(&issuer.ban(&ban.node)?)
        }
        (&Method::POST, p) if p.starts_with("/v1/ca/") => {
            let step: CaStep = if call.body.is_empty() {
                CaStep::default()
            } else {
                call.json()?
            };
            http::ok(&issuer.ca_step(&p["/v1/ca/".len()..], step.force)?)
        }
        (&Method::GET, "/v1/status") => http::ok(&issuer.status()?),
        (&Method::POST, "/v1/witness/export") => {
            let req: super::wire::WitnessExport = call.json()?;
            http::ok(&issuer.witnessed(&req.node)?)
        }
        (&Method::GET, "/v1/bundle") => {
            http::ok(&serde_json::json!({ "bundle": issuer.bundle_pem() }))
        }
        (&Method::GET, "/v1/bundle/all") => {
            http::ok(&serde_json::json!({ "bundle": issuer.all_cas_pem()? }))
        }
        _ => Err(ApiError::not_found(format!(
            "no route {} {path}",
            call.method
        ))),
    }
}

/// A client of the admin socket.
#[derive(Debug, Clone)]
pub(crate) struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// One call.
    pub(crate) async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let stream = UnixStream::connect(&self.path).await.map_err(|e| {
            anyhow::Error::new(AdminUnreachable(format!(
                "cannot reach the issuer's admin socket {}: {e}; is `transportd issuer` \
                 running, and are you its user or root?",
                self.path.display()
            )))
        })?;
        match http::call(stream, method, route, body).await {
            Ok(v) => Ok(v),
            Err(CallError::Refused { status, message }) => Err(anyhow::Error::new(AdminRefused {
                status: status.as_u16(),
                message,
            })),
            Err(e) => Err(anyhow::Error::new(AdminUnreachable(e.to_string()))),
        }
    }
}

/// The issuer could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct AdminUnreachable(pub(crate) String);

/// The issuer refused a command.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct AdminRefused {
    pub(crate) status: u16,
    pub(crate) message: String,
}

/// Admin connections at once.
const MAX_CONNECTIONS: usize = 16;
