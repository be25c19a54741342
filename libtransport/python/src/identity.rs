//! Where a client's identity comes from: SVID files, or the SPIFFE Workload API.
//!
//! As `transportd ls | pull | push` decide it: files when any is named (a directory
//! holding `svid.pem`, `svid.key` and `bundle.pem`, or each file by its path), otherwise the
//! Workload API at the socket given or named by `SPIFFE_ENDPOINT_SOCKET`, whose rotations
//! are then followed for as long as the client lives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::SpiffeId;
use libtransport::workload::{WorkloadIdentity, endpoint_from_env, endpoint_path};
use libtransport::{Credentials, IdentityHandle};
use zeroize::Zeroizing;

use crate::error::{self, Failure};

/// What the caller said about the identity to use.
#[derive(Debug, Default)]
pub(crate) struct IdentitySource {
    /// A directory with `svid.pem`, `svid.key` and `bundle.pem`.
    pub(crate) dir: Option<PathBuf>,
    /// The SVID chain (PEM).
    pub(crate) svid: Option<PathBuf>,
    /// The SVID's private key (PEM).
    pub(crate) key: Option<PathBuf>,
    /// The trust bundle (PEM).
    pub(crate) bundle: Option<PathBuf>,
    /// The Workload API socket (`unix:///path` or a path); default `SPIFFE_ENDPOINT_SOCKET`.
    pub(crate) workload_socket: Option<String>,
    /// The SPIFFE ID to take from the Workload API when it offers several.
    pub(crate) workload_id: Option<String>,
}

/// An identity, and the task that keeps a Workload API identity current.
pub(crate) struct Identity {
    pub(crate) handle: IdentityHandle,
    pub(crate) workload: Option<WorkloadIdentity>,
}

impl IdentitySource {
    /// Loads the identity (runs on the runtime: the Workload API is a gRPC call).
    pub(crate) async fn load(self) -> Result<Identity, Failure> {
        let files = self.dir.is_some()
            || self.svid.is_some()
            || self.key.is_some()
            || self.bundle.is_some();
        if files {
            let pick = |explicit: Option<PathBuf>, name: &str| {
                explicit
                    .or_else(|| self.dir.as_ref().map(|d| d.join(name)))
                    .ok_or_else(|| {
                        error::identity(&format!(
                            "no {name}: give identity=DIR (holding svid.pem, svid.key and \
                             bundle.pem), or svid=, key= and bundle= together"
                        ))
                    })
            };
            let svid = pick(self.svid.clone(), "svid.pem")?;
            let key = pick(self.key.clone(), "svid.key")?;
            let bundle = pick(self.bundle.clone(), "bundle.pem")?;
            let creds = tokio::task::spawn_blocking(move || from_files(&svid, &key, &bundle))
                .await
                .map_err(|e| error::local(&format!("loading the identity: {e}")))??;
            return Ok(Identity {
                handle: IdentityHandle::new(creds),
                workload: None,
            });
        }
        let socket = match &self.workload_socket {
            Some(s) if s.starts_with('/') => PathBuf::from(s),
            Some(s) => endpoint_path(s).map_err(|e| error::workload(&e))?,
            None => endpoint_from_env().map_err(|e| {
                error::identity(&format!(
                    "no identity: give identity=DIR (or svid=, key=, bundle=), or a Workload \
                     API socket (workload_socket= or SPIFFE_ENDPOINT_SOCKET): {e}"
                ))
            })?,
        };
        let want = self
            .workload_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .map_err(|e| error::identity(&format!("workload_id: {e}")))?;
        let started = tokio::time::timeout(WORKLOAD_WAIT, WorkloadIdentity::start(&socket, want))
            .await
            .map_err(|_| {
                error::identity(&format!(
                    "the Workload API at {} offered no SVID within {} s",
                    socket.display(),
                    WORKLOAD_WAIT.as_secs()
                ))
            })?
            .map_err(|e| error::workload(&e))?;
        Ok(Identity {
            handle: started.handle().clone(),
            workload: Some(started),
        })
    }
}

/// Credentials from PEM files; the key is wiped from memory once parsed.
fn from_files(svid: &Path, key: &Path, bundle: &Path) -> Result<Credentials, Failure> {
    let read = |what: &str, path: &Path| {
        std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| error::identity(&format!("cannot read {what} {}: {e}", path.display())))
    };
    let chain = read("the SVID", svid)?;
    let key = read("the key", key)?;
    let bundle = read("the bundle", bundle)?;
    let svid = certs::Svid::from_pem(&chain, &key)
        .map_err(|e| error::identity(&format!("the SVID: {e}")))?;
    let bundle = certs::TrustBundle::from_pem(&bundle)
        .map_err(|e| error::identity(&format!("the bundle: {e}")))?;
    Credentials::new(svid, bundle).map_err(|e| error::identity(&e.to_string()))
}

/// How long a client waits for the Workload API's first SVID.
const WORKLOAD_WAIT: Duration = Duration::from_secs(30);
