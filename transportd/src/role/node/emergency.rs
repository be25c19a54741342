//! Emergency (break-glass) access on a node: grants given, approved, revoked and listed
//! through the node's admin socket, kept in its data directory across restarts, expired
//! by the clock, every step in the audit trail.
//!
//! The decisions are `libtransport::policy::EmergencyAccess`'s (over whatever policy is in
//! force, so a policy reload keeps the grants). This file owns the rest:
//!
//! * **Grant** (`POST /v1/emergency`): one peer, one dataset, read (and list; write if
//!   asked), an optional object prefix, a TTL no longer than `[emergency] max_ttl`, and a
//!   non-empty reason of at most [`MAX_REASON_BYTES`]. The operator is the socket peer's
//!   uid. With `require_approval` the grant is pending (allows nothing) until a second
//!   operator, of another uid, approves it (`POST /v1/emergency/<id>/approve`). The TTL
//!   runs from the grant: approval does not extend it, and a grant never approved expires
//!   unused.
//! * **Expiry**: judged by the clock at every decision; [`Emergency::tick`] (every second)
//!   writes one `emergency_expired` record per grant once its time passes, then drops it.
//! * **Revoke** (`DELETE /v1/emergency/<id>`) ends a grant early.
//! * **Persistence**: `grants.json` in `[emergency] dir` (mode 0600), rewritten atomically
//!   at each change, so a restart neither loses a grant nor extends it (expiry is an
//!   absolute time). A grant that expired while the node was down is recorded as expired
//!   at the next start. If the node stops between the expiry record and the rewrite, the
//!   next start records that expiry again (a duplicate rather than a missing record).
//! * Every change moves the policy's epoch, so sidecars that keep a storage node's
//!   decisions drop them at once.
//! * The reason is the operator's free text: it goes to the trail, never to the log.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use certs::SpiffeId;
use hyper::{Method, StatusCode};
use libtransport::PolicyHandle;
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink};
use libtransport::clock::Clock;
use libtransport::metrics::Metrics;
use libtransport::policy::{Authorizer, EmergencyAccess, EmergencyGrant, EmergencyGrants};
use libtransport::proto::{DatasetName, ObjectPath};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::EmergencyConfig;
use crate::fsutil;
use crate::role::issuer::http::{self, ApiError, Call};

/// `POST /v1/emergency`: a grant asked for.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantRequest {
    /// The one peer.
    pub(crate) peer: SpiffeId,
    /// The one dataset.
    pub(crate) dataset: DatasetName,
    /// Allow writes too.
    #[serde(default)]
    pub(crate) write: bool,
    /// Only objects under this prefix.
    #[serde(default)]
    pub(crate) object_prefix: Option<String>,
    /// Seconds until it expires.
    pub(crate) ttl_secs: u64,
    /// Why.
    pub(crate) reason: String,
}

/// A grant as the admin API reports it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantView {
    /// Its ID.
    pub(crate) id: String,
    /// `pending`, `active` or `expired` (not yet recorded as expired).
    pub(crate) state: String,
    /// The peer.
    pub(crate) peer: String,
    /// The dataset.
    pub(crate) dataset: String,
    /// What it allows.
    pub(crate) actions: Vec<String>,
    /// Only objects under this prefix, if set.
    pub(crate) object_prefix: Option<String>,
    /// Why.
    pub(crate) reason: String,
    /// RFC 3339.
    pub(crate) granted_at: String,
    /// RFC 3339.
    pub(crate) expires_at: String,
    /// Seconds left.
    pub(crate) remaining_secs: u64,
    /// The granting operator's uid.
    pub(crate) granted_by: u32,
    /// The approving operator's uid.
    pub(crate) approved_by: Option<u32>,
}

/// A node's emergency grants: the shared set the authorizer reads, and the admin side.
#[derive(Debug)]
pub(crate) struct Emergency {
    cfg: EmergencyConfig,
    grants: Arc<EmergencyGrants>,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    policy: PolicyHandle,
    /// One change at a time, so memory, file and trail agree.
    changing: Mutex<()>,
}

impl Emergency {
    /// Reads the grants kept in `cfg.dir` (none if the file is absent).
    pub(crate) fn load(cfg: &EmergencyConfig) -> anyhow::Result<Arc<EmergencyGrants>> {
        let file = grants_file(cfg);
        let grants = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<Vec<EmergencyGrant>>(&bytes)
                .with_context(|| format!("reading emergency grants from {}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading emergency grants from {}", file.display()));
            }
        };
        Ok(Arc::new(EmergencyGrants::with(grants)))
    }

    /// `policy` with `grants` laid over it: what the node publishes.
    pub(crate) fn wrap(
        policy: Arc<dyn Authorizer>,
        grants: &Arc<EmergencyGrants>,
        clock: &Arc<dyn Clock>,
    ) -> Arc<dyn Authorizer> {
        Arc::new(EmergencyAccess::new(policy, grants.clone(), clock.clone()))
    }

    pub(crate) fn new(
        cfg: EmergencyConfig,
        grants: Arc<EmergencyGrants>,
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        policy: PolicyHandle,
    ) -> Self {
        Self {
            cfg,
            grants,
            audit,
            clock,
            metrics,
            policy,
            changing: Mutex::new(()),
        }
    }

    /// Records expiries that are due and updates the gauge. Called every second (and at
    /// start, before anything is served).
    pub(crate) fn tick(&self) {
        let now = self.clock.now();
        let expired = self.grants.expired(now);
        if !expired.is_empty() {
            let _one = self.lock();
            for g in expired {
                let record = self.record(AuditEvent::EmergencyExpired {
                    grant: g.id.clone(),
                    peer: g.peer.clone(),
                    dataset: g.dataset.clone(),
                    expires_at: g.expires_at,
                    reason: g.reason.clone(),
                    approved: !g.pending,
                });
                if let Err(e) = record {
                    // It allows nothing already; the record is tried again next tick.
                    warn!(grant = %g.id, error = %e, "emergency grant expired; record not yet written");
                    continue;
                }
                info!(grant = %g.id, peer.id = %g.peer, dataset = %g.dataset, "emergency grant expired");
                self.grants.remove(&g.id);
                if let Err(e) = self.persist() {
                    warn!(error = %format!("{e:#}"), "emergency grants not saved");
                }
            }
            self.policy_changed();
        }
        self.metrics
            .set_emergency_grants_active(self.grants.active(now));
    }

    /// Gives a grant for operator `uid`.
    pub(crate) fn grant(&self, req: GrantRequest, uid: u32) -> Result<GrantView, ApiError> {
        let refuse = |e: ApiError| {
            self.refused("grant", None, Some(&req.peer), Some(&req.dataset), uid, &e);
            e
        };
        let reason = req.reason.trim();
        if reason.is_empty() {
            return Err(refuse(ApiError::bad_request(
                "give a reason (--reason): it is recorded with every use",
            )));
        }
        if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
            return Err(refuse(ApiError::bad_request(format!(
                "the reason must be one line of at most {MAX_REASON_BYTES} bytes"
            ))));
        }
        let ttl = Duration::from_secs(req.ttl_secs);
        if ttl < MIN_TTL || ttl > self.cfg.max_ttl {
            return Err(refuse(ApiError::bad_request(format!(
                "the TTL must be between {} and this node's [emergency] max_ttl ({})",
                humantime::format_duration(MIN_TTL),
                humantime::format_duration(self.cfg.max_ttl)
            ))));
        }
        let object_prefix = match req.object_prefix.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => {
                ObjectPath::new(p.trim_end_matches('/'))
                    .map_err(|e| refuse(ApiError::bad_request(format!("object prefix: {e}"))))?;
                Some(p.to_owned())
            }
        };
        let mut raw = [0u8; 6];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| ApiError::internal(&anyhow::anyhow!("no randomness")))?;
        let now = self.clock.now();
        let grant = EmergencyGrant {
            id: format!(
                "eg-{}",
                raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            peer: req.peer.clone(),
            dataset: req.dataset.clone(),
            write: req.write,
            object_prefix,
            reason: reason.to_owned(),
            granted_at: now,
            expires_at: now + ttl,
            granted_by: uid,
            pending: self.cfg.require_approval,
            approved_by: None,
        };
        let _one = self.lock();
        if !self.grants.insert(grant.clone()) {
            return Err(ApiError::conflict("grant ID taken; try again"));
        }
        // Kept on disk first, then recorded; a grant that cannot be recorded is undone.
        let done = self
            .persist()
            .map_err(|e| ApiError::internal(&e))
            .and_then(|()| {
                self.record(AuditEvent::EmergencyGranted {
                    grant: grant.id.clone(),
                    peer: grant.peer.clone(),
                    dataset: grant.dataset.clone(),
                    actions: grant.actions(),
                    object_prefix: grant.object_prefix.clone(),
                    ttl_secs: ttl.as_secs(),
                    expires_at: grant.expires_at,
                    reason: grant.reason.clone(),
                    operator_uid: uid,
                    pending: grant.pending,
                })
            });
        if let Err(e) = done {
            self.grants.remove(&grant.id);
            let _ = self.persist();
            return Err(e);
        }
        warn!(
            grant = %grant.id,
            peer.id = %grant.peer,
            dataset = %grant.dataset,
            write = grant.write,
            ttl_secs = ttl.as_secs(),
            operator.uid = uid,
            pending = grant.pending,
            "emergency access granted"
        );
        self.policy_changed();
        self.metrics
            .set_emergency_grants_active(self.grants.active(now));
        Ok(self.view(&grant, now))
    }

    /// Approves a pending grant for operator `uid`, who must not be the one who gave it.
    pub(crate) fn approve(&self, id: &str, uid: u32) -> Result<GrantView, ApiError> {
        let _one = self.lock();
        let now = self.clock.now();
        let found = self.grants.get(id);
        let refuse = |e: ApiError| {
            let g = found.as_ref();
            self.refused(
                "approve",
                Some(id),
                g.map(|g| &g.peer),
                g.map(|g| &g.dataset),
                uid,
                &e,
            );
            e
        };
        let Some(mut grant) = found.clone() else {
            return Err(refuse(ApiError::not_found(format!(
                "no emergency grant {id}"
            ))));
        };
        if !grant.pending {
            return Err(refuse(ApiError::conflict(format!(
                "{id} needs no approval (it is active)"
            ))));
        }
        if grant.expires_at <= now {
            return Err(refuse(ApiError::conflict(format!("{id} has expired"))));
        }
        if grant.granted_by == uid {
            return Err(refuse(ApiError::forbidden(format!(
                "{id} was granted by uid {uid}: a second operator (another uid) must approve it"
            ))));
        }
        grant.pending = false;
        grant.approved_by = Some(uid);
        self.grants.replace(grant.clone());
        let done = self
            .persist()
            .map_err(|e| ApiError::internal(&e))
            .and_then(|()| {
                self.record(AuditEvent::EmergencyApproved {
                    grant: grant.id.clone(),
                    peer: grant.peer.clone(),
                    dataset: grant.dataset.clone(),
                    operator_uid: uid,
                    granted_by: grant.granted_by,
                    expires_at: grant.expires_at,
                })
            });
        if let Err(e) = done {
            grant.pending = true;
            grant.approved_by = None;
            self.grants.replace(grant);
            let _ = self.persist();
            return Err(e);
        }
        warn!(grant = %grant.id, peer.id = %grant.peer, dataset = %grant.dataset, operator.uid = uid, "emergency grant approved");
        self.policy_changed();
        self.metrics
            .set_emergency_grants_active(self.grants.active(now));
        Ok(self.view(&grant, now))
    }

    /// Revokes a grant for operator `uid`.
    pub(crate) fn revoke(&self, id: &str, uid: u32) -> Result<GrantView, ApiError> {
        let _one = self.lock();
        let now = self.clock.now();
        let Some(grant) = self.grants.remove(id) else {
            let e = ApiError::not_found(format!("no emergency grant {id}"));
            self.refused("revoke", Some(id), None, None, uid, &e);
            return Err(e);
        };
        // Revocation takes effect before anything else: the record follows.
        self.policy_changed();
        if let Err(e) = self.persist() {
            warn!(error = %format!("{e:#}"), "emergency grants not saved");
        }
        if let Err(e) = self.record(AuditEvent::EmergencyRevoked {
            grant: grant.id.clone(),
            peer: grant.peer.clone(),
            dataset: grant.dataset.clone(),
            operator_uid: uid,
            reason: grant.reason.clone(),
        }) {
            warn!(grant = %grant.id, error = %e, "emergency grant revoked; record not written");
        }
        info!(grant = %grant.id, operator.uid = uid, "emergency grant revoked");
        self.metrics
            .set_emergency_grants_active(self.grants.active(now));
        Ok(self.view(&grant, now))
    }

    /// Every grant held.
    pub(crate) fn list(&self) -> Vec<GrantView> {
        let now = self.clock.now();
        self.grants
            .list()
            .iter()
            .map(|g| self.view(g, now))
            .collect()
    }

    fn view(&self, g: &EmergencyGrant, now: SystemTime) -> GrantView {
        let state = if g.expires_at <= now {
            "expired"
        } else if g.pending {
            "pending"
        } else {
            "active"
        };
        GrantView {
            id: g.id.clone(),
            state: state.into(),
            peer: g.peer.to_string(),
            dataset: g.dataset.to_string(),
            actions: g.actions().iter().map(ToString::to_string).collect(),
            object_prefix: g.object_prefix.clone(),
            reason: g.reason.clone(),
            granted_at: humantime::format_rfc3339_seconds(g.granted_at).to_string(),
            expires_at: humantime::format_rfc3339_seconds(g.expires_at).to_string(),
            remaining_secs: g.remaining(now).as_secs(),
            granted_by: g.granted_by,
            approved_by: g.approved_by,
        }
    }

    fn refused(
        &self,
        op: &str,
        grant: Option<&str>,
        peer: Option<&SpiffeId>,
        dataset: Option<&DatasetName>,
        uid: u32,
        e: &ApiError,
    ) {
        warn!(
            op,
            grant = grant.unwrap_or_default(),
            operator.uid = uid,
            "emergency request refused"
        );
        let _ = self.record(AuditEvent::EmergencyRefused {
            op: op.into(),
            grant: grant.map(str::to_owned),
            peer: peer.cloned(),
            dataset: dataset.cloned(),
            operator_uid: uid,
            error: e.message.clone(),
        });
    }

    fn record(&self, event: AuditEvent) -> Result<(), ApiError> {
        self.audit
            .record(&AuditRecord {
                time: self.clock.now(),
                event,
            })
            .map_err(|e| ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("not done: {e}"),
            })
    }

    fn persist(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.grants.list())?;
        fsutil::write_atomic(&grants_file(&self.cfg), &bytes, 0o600)
    }

    /// Publishes the policy again: its epoch moves, so cached decisions elsewhere go.
    fn policy_changed(&self) {
        self.policy.update(self.policy.current());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running admin socket; dropping it stops serving and removes the socket file.
#[derive(Debug)]
pub(crate) struct AdminSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl AdminSocket {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes the grants directory and binds the admin socket: mode 0600 (the node's user and
/// root), or 0660 with `[emergency] group`, whose members may then use it too.
pub(crate) async fn serve(emergency: Arc<Emergency>) -> anyhow::Result<AdminSocket> {
    let cfg = &emergency.cfg;
    let gid = cfg
        .group
        .as_deref()
        .map(crate::role::sidecar::resolve_group)
        .transpose()
        .context("emergency.group")?;
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    // The directory holds the grants: only the node's user lists it; a group may pass
    // through to the socket, if the socket is in it.
    let dir_mode = if gid.is_some() { 0o710 } else { 0o700 };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&cfg.dir, None, Some(gid))
            .with_context(|| format!("giving {} to its group", cfg.dir.display()))?;
    }
    std::fs::set_permissions(&cfg.dir, std::fs::Permissions::from_mode(dir_mode))
        .with_context(|| format!("restricting {}", cfg.dir.display()))?;
    let path = cfg.socket.clone();
    crate::role::agent::workload_api::prepare_socket_path(&path)?;
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("emergency.socket {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&path, None, Some(gid))
            .with_context(|| format!("giving {} to its group", path.display()))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    let task = tokio::spawn(accept(listener, emergency.clone(), gid));
    Ok(AdminSocket { path, task })
}

async fn accept(listener: UnixListener, emergency: Arc<Emergency>, gid: Option<u32>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(uid) = operator(&stream, me, gid) else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let emergency = emergency.clone();
        tokio::spawn(async move {
            http::serve_connection(stream, Duration::from_secs(60), move |call| {
                let emergency = emergency.clone();
                async move {
                    tokio::task::spawn_blocking(move || route(&emergency, &call, uid))
                        .await
                        .unwrap_or_else(|e| Err(ApiError::internal(&e.into())))
                }
            })
            .await;
            drop(permit);
        });
    }
}

/// The caller's uid if it may use the socket: the node's user, root, or (with a group) a
/// member of the group, by its gid or supplementary groups. The socket's mode already
/// keeps others out; this is the second lock.
fn operator(stream: &UnixStream, me: u32, gid: Option<u32>) -> Option<u32> {
    let cred = stream.peer_cred().ok()?;
    let uid = cred.uid();
    let member = gid.is_some_and(|g| {
        cred.gid() == g
            || cred
                .pid()
                .and_then(|pid| supplementary_groups(pid).ok())
                .is_some_and(|groups| groups.contains(&g))
    });
    if uid == me || uid == 0 || member {
        Some(uid)
    } else {
        warn!(
            uid,
            "emergency admin socket caller is not the node's user, root or of its group; refused"
        );
        None
    }
}

/// The supplementary groups of process `pid` (`Groups:` in `/proc/<pid>/status`).
fn supplementary_groups(pid: i32) -> std::io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect())
}

fn route(emergency: &Emergency, call: &Call, uid: u32) -> Result<(StatusCode, Vec<u8>), ApiError> {
    debug!(method = %call.method, path = %call.path, operator.uid = uid, "admin call");
    let path = call.path.as_str();
    match (&call.method, path) {
        (&Method::GET, "/v1/emergency") => http::ok(&emergency.list()),
        (&Method::POST, "/v1/emergency") => http::ok(&emergency.grant(call.json()?, uid)?),
        (&Method::POST, p) if p.starts_with("/v1/emergency/") && p.ends_with("/approve") => {
            let id = &p["/v1/emergency/".len()..p.len() - "/approve".len()];
            http::ok(&emergency.approve(id, uid)?)
        }
        (&Method::DELETE, p) if p.starts_with("/v1/emergency/") => {
            http::ok(&emergency.revoke(&p["/v1/emergency/".len()..], uid)?)
        }
        _ => Err(ApiError::not_found(format!(
            "no route {} {path}",
            call.method
        ))),
    }
}

fn grants_file(cfg: &EmergencyConfig) -> PathBuf {
    cfg.dir.join("grants.json")
}

/// Longest reason: a sentence or two, bounded before it reaches every use's record.
pub(crate) const MAX_REASON_BYTES: usize = 512;

/// Shortest TTL a grant may have.
const MIN_TTL: Duration = Duration::from_secs(1);

/// Admin connections at once.
const MAX_CONNECTIONS: usize = 16;
