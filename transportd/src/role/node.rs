//! The node role: serve datasets to, and accept pushes from, authenticated and authorized
//! peers, record everything in the audit trail, and expose metrics and health, until told
//! to stop.
//!
//! Reloads: SIGHUP re-reads the identity files and the policy; a policy file is also
//! re-read when it changes. Whatever does not validate is refused, audited, and the running
//! identity or policy stays. Listeners, store and audit settings need a restart.
//!
//! Emergency grants (`node/emergency.rs`) lie over whichever policy is in force, so a
//! reload keeps them; they are given on the node's admin socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink, FileSink, WitnessQueue};
use libtransport::clock::{Clock, SystemClock};
use libtransport::metrics::Metrics;
use libtransport::policy::EmergencyGrants;
use libtransport::store::Store;
use libtransport::{IdentityHandle, PolicyHandle, Server, ServerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::admin;
use crate::config::{IdentitySource, NodeConfig, PolicySource};
use crate::role::agent::{self, IssuerClient, workload_api};
use crate::role::sidecar;
use crate::role::witness::Witness;

mod emergency;

use emergency::Emergency;
pub(crate) use emergency::{GrantRequest, GrantView};

/// Runs a node with the configuration at `path`.
pub(crate) async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(path)?;
    for w in cfg.check(SystemClock.now())? {
        warn!("{w}");
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (identity, agent) = match &cfg.identity {
        IdentitySource::Files(paths) => (
            IdentityHandle::new(crate::config::load_credentials(paths)?),
            None,
        ),
        IdentitySource::Agent(a) => {
            let b = agent::bootstrap(a, clock.clone())
                .await
                .context("obtaining the node's identity from the issuer")?;
            info!(peer.id = %b.identity.current().id(), how = b.how, "node identity from the issuer");
            (b.identity, Some(b.agent))
        }
    };
    // Checkpoints queue for the witness from the first one on; the sender starts below.
    let mut audit_cfg = cfg.audit.clone();
    let witness = match &cfg.witness {
        Some(target) => {
            let queue = WitnessQueue::new(MAX_UNWITNESSED);
            audit_cfg.witness = Some(queue.clone());
            let addr = match (&target.addr, &agent) {
                (Some(a), _) => a.clone(),
                (None, Some(agent)) => agent.config().issuer.clone(),
                (None, None) => anyhow::bail!("audit.witness: give HOST:PORT (no [agent])"),
            };
            let id = match (&target.id, &agent) {
                (Some(id), _) => id.clone(),
                (None, Some(agent)) => match &agent.config().issuer_id {
                    Some(id) => id.clone(),
                    None => {
                        crate::role::issuer::issuer_id(&identity.current().id().trust_domain())?
                    }
                },
                (None, None) => {
                    crate::role::issuer::issuer_id(&identity.current().id().trust_domain())?
                }
            };
            Some(Witness {
                client: IssuerClient { addr, id },
                identity: identity.clone(),
                queue,
                dir: cfg.audit.dir.clone(),
            })
        }
        None => None,
    };
    let audit = Arc::new(
        FileSink::open(audit_cfg, Arc::new(identity.clone()), clock.clone())
            .with_context(|| format!("opening the audit trail in {}", cfg.audit.dir.display()))?,
    );
    let grants = Emergency::load(&cfg.emergency)?;
    let node = Node {
        audit: audit.clone(),
        clock: clock.clone(),
        grants: grants.clone(),
    };
    node.record(AuditEvent::ConfigLoaded {
        source: path.display().to_string(),
        digest: cfg.digest,
    })?;
    node.identity_loaded(&identity)?;
    // The agent keeps the identity current from here on, and serves local workloads.
    let mut agent_task = None;
    let agent_status = agent.as_ref().map(|a| a.status());
    let mut workload_api = None;
    let mut sidecar_api = None;
    let metrics = Arc::new(Metrics::new());
    if let Some(agent) = agent {
        let sink: Arc<dyn AuditSink> = audit.clone();
        if let Some(socket) = agent.config().workload_socket.clone() {
            workload_api = Some(
                workload_api::serve(
                    &socket,
                    agent.node_id(),
                    agent.view(),
                    sink.clone(),
                    clock.clone(),
                )
                .await
                .with_context(|| format!("agent.workload_socket {}", socket.display()))?,
            );
        }
        if let Some(sc) = cfg.sidecar.clone() {
            let socket = sc.socket.clone();
            sidecar_api = Some(
                sidecar::serve(
                    sc,
                    agent.node_id(),
                    agent.view(),
                    identity.clone(),
                    sink.clone(),
                    clock.clone(),
                    metrics.sidecar(),
                )
                .await
                .with_context(|| format!("sidecar.socket {}", socket.display()))?,
            );
        }
        agent_task = Some(tokio::spawn(agent.run(sink)));
    }
    let (policy, digest, source) = cfg.policy.load()?;
    node.record(AuditEvent::policy_loaded(source, digest, &policy))?;
    let policy = PolicyHandle::new(Emergency::wrap(Arc::new(policy), &grants, &clock));
    let emergency = Arc::new(Emergency::new(
        cfg.emergency.clone(),
        grants,
        audit.clone(),
        clock.clone(),
        metrics.clone(),
        policy.clone(),
    ));
    // Grants that expired while the node was down are recorded before anything is served.
    emergency.tick();
    let emergency_socket =
        if cfg.emergency.socket_named || cfg.emergency.socket.as_os_str().len() < MAX_SOCKET_PATH {
            Some(
                emergency::serve(emergency.clone()).await.with_context(|| {
                    format!("emergency.socket {}", cfg.emergency.socket.display())
                })?,
            )
        } else {
            // Grants already given still hold and expire; new ones need the socket.
            warn!(
                path = %cfg.emergency.socket.display(),
                "the default emergency admin socket path is too long for a Unix socket; \
                 set [emergency] socket to give emergency grants on this node"
            );
            None
        };
    let disk = libtransport::store::disk_bytes(&cfg.store_root)
        .with_context(|| format!("store.root {}", cfg.store_root.display()))?;
    let limits = cfg.partials.resolve(disk);
    let store = Arc::new(
        Store::open(&cfg.store_root, cfg.state_dir.clone(), cfg.chunk_bytes)
            .context("opening the store")?
            .with_max_manifest_builds(cfg.max_manifest_builds)
            .with_partial_limits(limits)
            .with_clock(clock.clone()),
    );
    info!(
        quota_bytes = limits.quota_bytes,
        per_identity_bytes = limits.quota_bytes_per_identity,
        max_age_secs = limits.max_age.as_secs(),
        "partial files of pushes: limits"
    );
    // Partial files an earlier run left: found (their claims count from the first push)
    // and, if past their age, removed, before anything is served.
    node.sweep_partials(&store).await?;
    metrics.set_audit_trail_breaks(audit.breaks_on_record());
    let config = ServerConfig::builder()
        .identity(identity.clone())
        .policy(policy.clone())
        .store(store.clone())
        .audit(audit.clone())
        .metrics(metrics.clone())
        .transport(cfg.transport.clone())
        .clock(clock.clone())
        .build();
    let server = Server::bind(config, cfg.quic, cfg.tcp).await?;
    let admin = match cfg.admin {
        Some(addr) => Some(
            admin::serve(
                addr,
                admin::State {
                    metrics,
                    identity: identity.clone(),
                    audit: audit.clone(),
                    clock: clock.clone(),
                    witness: witness
                        .as_ref()
                        .zip(cfg.witness.as_ref())
                        .map(|(w, t)| (w.queue.clone(), t.lag)),
                    agent: agent_status,
                },
            )
            .await
            .with_context(|| format!("admin.listen {addr}"))?,
        ),
        None => None,
    };
    let id = identity.current().id().clone();
    let ready = serde_json::json!({
        "event": "listening",
        "id": id.as_str(),
        "quic": server.quic_addr().map(|a| a.to_string()),
        "tcp": server.tcp_addr().map(|a| a.to_string()),
        "admin": admin.as_ref().map(|a| a.addr.to_string()),
        "workload_socket": workload_api.as_ref().map(|w| w.path().display().to_string()),
        "sidecar_socket": sidecar_api.as_ref().map(|s| s.path().display().to_string()),
        "admin_socket": emergency_socket.as_ref().map(|s| s.path().display().to_string()),
    });
    // Signals are ours before anyone learns we are up.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    // One line on stdout for whoever started us (scripts, the demo): where we listen.
    println!("{ready}");
    info!(id = %id, "node started");
    crate::notify::ready(&format!("serving as {id}"));
    let handle = server.spawn();
    let witness = witness.map(Arc::new);
    let witness_task = witness.clone().map(|w| tokio::spawn(w.run()));

    let mut tick = tokio::time::interval(Duration::from_secs(1));

    let mut watched = PolicyWatch::new(&cfg.policy);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                info!("SIGHUP: reloading identity and policy");
                crate::notify::reloading();
                node.reload(path, &identity, &policy);
                watched = PolicyWatch::new(&cfg.policy);
                crate::notify::ready(&format!("serving as {id}"));
            }
            _ = tick.tick() => {
                emergency.tick();
                if let Err(e) = audit.tick() {
                    warn!(error = %e, "audit checkpoint failed");
                }
                // The registry in memory: no disk walk after the first sweep.
                if let Err(e) = node.sweep_partials(&store).await {
                    warn!(error = %e, "partial files removed without an audit record");
                }
                if watched.changed() {
                    info!("policy file changed: reloading");
                    node.reload_policy(&cfg.policy, &policy);
                }
            }
        }
    }
    info!("stopping: finishing in-flight requests");
    crate::notify::stopping();
    if let Some(w) = workload_api {
        w.shutdown().await;
    }
    drop(sidecar_api);
    drop(emergency_socket);
    if let Some(t) = agent_task {
        t.abort();
    }
    handle.shutdown(Duration::from_secs(10)).await;
    if let Some(a) = admin {
        a.task.abort();
    }
    if let Some(t) = witness_task {
        t.abort();
    }
    audit.close().context("sealing the audit trail")?;
    if let Some(w) = &witness {
        // The closing checkpoint, if the witness answers quickly.
        w.flush(Duration::from_secs(3)).await;
    }
    info!("stopped");
    Ok(())
}

struct Node {
    audit: Arc<FileSink>,
    clock: Arc<dyn Clock>,
    /// Emergency grants, laid over every policy taken into use.
    grants: Arc<EmergencyGrants>,
}

impl Node {
    fn record(&self, event: AuditEvent) -> anyhow::Result<()> {
        self.audit
            .record(&AuditRecord {
                time: self.clock.now(),
                event,
            })
            .context("writing the audit trail")
    }

    /// Removes partial files past their age, recording each removal.
    async fn sweep_partials(&self, store: &Arc<Store>) -> anyhow::Result<()> {
        let s = store.clone();
        let removed = tokio::task::spawn_blocking(move || s.sweep_partials())
            .await
            .context("sweeping partial files")?;
        for r in removed {
            info!(
                dataset = %r.dataset,
                object.digest = %r.object.map(|d| d.short()).unwrap_or_default(),
                bytes = r.bytes,
                age_secs = r.age.as_secs(),
                "partial file removed: untouched past partial_max_age"
            );
            self.record(r.into())?;
        }
        Ok(())
    }

    fn identity_loaded(&self, identity: &IdentityHandle) -> anyhow::Result<()> {
        let creds = identity.current();
        self.record(AuditEvent::IdentityLoaded {
            id: creds.id().clone(),
            serial: creds.svid().serial().to_owned(),
            not_after: creds.svid().not_after(),
        })
    }

    /// Re-reads identity and policy; what does not validate is refused and audited.
    fn reload(&self, path: &Path, identity: &IdentityHandle, policy: &PolicyHandle) {
        let cfg = match NodeConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "reload refused; keeping the running configuration");
                return;
            }
        };
        match cfg.credentials() {
            // The agent keeps an issuer's identity current; nothing to re-read.
            Ok(None) => {}
            Ok(Some(creds)) => {
                info!(id = %creds.id(), "identity reloaded");
                identity.update(creds);
                if let Err(e) = self.identity_loaded(identity) {
                    error!(error = %e, "identity change not audited");
                }
            }
            Err(e) => {
                error!(error = %e, "new identity refused; keeping the running one");
                let _ = self.record(AuditEvent::IdentityRefused {
                    reason: e.to_string(),
                });
            }
        }
        self.reload_policy(&cfg.policy, policy);
    }

    fn reload_policy(&self, source: &PolicySource, policy: &PolicyHandle) {
        match source.load() {
            Ok((p, digest, name)) => {
                info!(rules = p.rules().len(), "policy reloaded");
                let record = AuditEvent::policy_loaded(name, digest, &p);
                policy.update(Emergency::wrap(Arc::new(p), &self.grants, &self.clock));
                let _ = self.record(record);
            }
            Err(e) => {
                error!(error = %e, "new policy refused; the previous one stays in force");
                let _ = self.record(AuditEvent::PolicyRefused {
                    source: match source {
                        PolicySource::File(p) => p.display().to_string(),
                        PolicySource::Inline(_) => "node configuration".into(),
                    },
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Notices when a policy file changes (size, mtime, inode: an editor's rename counts).
struct PolicyWatch {
    path: Option<PathBuf>,
    seen: Option<(u64, SystemTime, u64)>,
}

impl PolicyWatch {
    fn new(source: &PolicySource) -> Self {
        let path = match source {
            PolicySource::File(p) => Some(p.clone()),
            PolicySource::Inline(_) => None,
        };
        let seen = path.as_deref().and_then(stamp);
        Self { path, seen }
    }

    fn changed(&mut self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let now = stamp(path);
        if now.is_some() && now != self.seen {
            self.seen = now;
            return true;
        }
        false
    }
}

fn stamp(path: &Path) -> Option<(u64, SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// Longest path a Unix socket can be bound at (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 108;

/// Checkpoints that wait for the witness at most; beyond, the oldest are dropped (a newer
/// witnessed checkpoint vouches for everything before it). At the default interval of 10 s,
/// about 40 minutes of an unreachable witness.
const MAX_UNWITNESSED: usize = 256;
