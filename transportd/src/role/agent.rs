//! The node agent inside `transportd node`: attests the node to the issuer, keeps its node
//! SVID and the trust bundle current, mints SVIDs for the node's registration entries, and
//! serves them to local workloads over the SPIFFE Workload API.
//!
//! Lifecycle:
//!
//! 1. [`bootstrap`]: a node SVID kept from an earlier run (`<data_dir>/node.pem`, key and
//!    chain in one file, mode 0600, replaced atomically) is used while it is valid;
//!    otherwise the node attests with its single-use join token, verifying the issuer
//!    against the bootstrap bundle. Only a CSR leaves the node.
//! 2. [`Agent::run`]: renews the node SVID at about half-life (jittered), syncs every few
//!    seconds (trust bundle, revoked serials, registration entries), keeps one SVID per
//!    entry (renewed at half-life), and publishes each change: the node's credentials
//!    through its [`IdentityHandle`] (new handshakes use them; open connections keep
//!    theirs) and the workloads' through a [`view::WorkloadView`] the Workload API pushes.
//! 3. Across restarts (`keep.rs`): the revoked serials and the workload SVIDs (keys sealed
//!    under the node's key) are kept beside the node SVID, so a node restarted while the
//!    issuer is unreachable still refuses revoked peers and serves its workloads while
//!    their SVIDs are valid.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use certs::{KeyAlgorithm, RegistrationEntry, SpiffeId, Svid, TrustBundle};
use hyper::Method;
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink};
use libtransport::clock::Clock;
use libtransport::{Credentials, IdentityHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::config::{AgentConfig, TokenSource};
use crate::fsutil;
use crate::role::issuer::http::{self, CallError};
use crate::role::issuer::wire::{
    AGENT_ALPN, AttestRequest, NodeSvid, RenewRequest, Sync, WorkloadRequest, WorkloadSvid,
};

mod authority;
mod keep;
pub(crate) mod peercred;
pub(crate) mod view;
pub(crate) mod workload_api;

use view::{ViewWatch, WorkloadView};

/// Reads the join token a node needs for its first attestation.
fn read_token(source: &TokenSource) -> anyhow::Result<certs::JoinToken> {
    let text = match source {
        TokenSource::File(p) => Zeroizing::new(std::fs::read_to_string(p).with_context(|| {
            format!(
                "the node has no valid SVID yet and needs its join token, but {} cannot \
                 be read",
                p.display()
            )
        })?),
        TokenSource::Env(var) => Zeroizing::new(std::env::var(var).with_context(|| {
            format!(
                "the node has no valid SVID yet and needs its join token: set {var} \
                 (from `transportd issuer token create`)"
            )
        })?),
    };
    Ok(certs::JoinToken::from_secret(&text)?)
}

/// What [`bootstrap`] found or obtained.
#[derive(Debug)]
pub(crate) struct Bootstrapped {
    pub(crate) agent: Arc<Agent>,
    pub(crate) identity: IdentityHandle,
    /// `kept` (an SVID from an earlier run) or `attested` (a join token was redeemed).
    pub(crate) how: &'static str,
}

/// Obtains the node's identity: a kept SVID that is still valid, or a fresh attestation.
pub(crate) async fn bootstrap(
    cfg: &AgentConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Bootstrapped> {
    fsutil::private_dir(&cfg.data_dir)?;
    let bootstrap_bundle = read_bundle(&cfg.bundle).context("agent.bundle")?;
    let issuer = IssuerClient {
        addr: cfg.issuer.clone(),
        id: match &cfg.issuer_id {
            Some(id) => id.clone(),
            None => crate::role::issuer::issuer_id(bootstrap_bundle.trust_domain())?,
        },
    };
    let now = clock.now();
    let kept = load_kept(&cfg.data_dir, now);
    let (svid, bundle, how, sync_interval, revoked) = match kept {
        Some((svid, bundle)) => {
            // The revocations as of the last sync hold until the issuer says otherwise.
            let revoked = keep::load_revoked(&cfg.data_dir)?;
            info!(peer.id = %svid.id(), revoked = revoked.len(), "using the node SVID kept from the last run");
            (svid, bundle, "kept", DEFAULT_SYNC_INTERVAL, revoked)
        }
        None => {
            let token = read_token(&cfg.join_token)?;
            let node = attest(&issuer, &bootstrap_bundle, &token).await?;
            info!(peer.id = %node.0.id(), "node attested with its join token");
            (node.0, node.1, "attested", node.2, HashSet::new())
        }
    };
    persist(&cfg.data_dir, &svid, &bundle)?;
    let creds = Credentials::new(svid.clone(), bundle.clone())?.with_revoked(revoked);
    let identity = IdentityHandle::new(creds);
    let (view_tx, _) = watch::channel(Arc::new(WorkloadView {
        bundle: bundle.clone(),
        svids: Vec::new(),
    }));
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        issuer,
        identity: identity.clone(),
        clock,
        status: Arc::new(AgentStatus {
            failing_since: std::sync::Mutex::new(None),
            view: view_tx.subscribe(),
        }),
        view: view_tx,
        sync_interval: std::sync::Mutex::new(sync_interval),
    });
    Ok(Bootstrapped {
        agent,
        identity,
        how,
    })
}

/// The running agent.
#[derive(Debug)]
pub(crate) struct Agent {
    cfg: AgentConfig,
    issuer: IssuerClient,
    identity: IdentityHandle,
    clock: Arc<dyn Clock>,
    view: watch::Sender<Arc<WorkloadView>>,
    sync_interval: std::sync::Mutex<Duration>,
    status: Arc<AgentStatus>,
}

/// How the agent stands with its issuer, for `/metrics` and `/readyz`: while the issuer
/// cannot be reached the node serves on what it holds (its SVID, the kept workload SVIDs
/// and revocations), for as long as they stay valid.
#[derive(Debug)]
pub(crate) struct AgentStatus {
    /// When the issuer first failed to answer since it last did.
    failing_since: std::sync::Mutex<Option<SystemTime>>,
    view: ViewWatch,
}

impl AgentStatus {
    /// How long the issuer has been unreachable, if it is.
    pub(crate) fn issuer_unreachable_for(&self, now: SystemTime) -> Option<Duration> {
        let since = *self
            .failing_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.map(|t| now.duration_since(t).unwrap_or_default())
    }

    /// Seconds until the soonest workload SVID served expires (negative: expired), if any
    /// is served.
    pub(crate) fn workload_svids_expiry(&self, now: SystemTime) -> Option<f64> {
        self.view
            .borrow()
            .svids
            .iter()
            .map(|w| w.svid.not_after())
            .min()
            .map(|t| libtransport::clock::seconds_until(now, t))
    }

    fn reached(&self, ok: bool, now: SystemTime) {
        let mut since = self
            .failing_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            *since = None;
        } else {
            since.get_or_insert(now);
        }
    }
}

impl Agent {
    /// The node's SPIFFE ID.
    pub(crate) fn node_id(&self) -> SpiffeId {
        self.identity.current().id().clone()
    }

    /// What the Workload API serves.
    pub(crate) fn view(&self) -> ViewWatch {
        self.view.subscribe()
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// How it stands with its issuer.
    pub(crate) fn status(&self) -> Arc<AgentStatus> {
        self.status.clone()
    }

    /// Keeps everything current until the task is dropped. The first sync runs at once, so
    /// workloads get their SVIDs as soon as the node is up.
    pub(crate) async fn run(self: Arc<Self>, audit: Arc<dyn AuditSink>) {
        let mut node_renew = self.node_renewal_time();
        let mut next_sync = self.clock.instant();
        let mut state = self.kept_workloads();
        if !state.workloads.is_empty() {
            // Served at once: the issuer may be unreachable for a while.
            self.publish(&state);
        }
        loop {
            let now = self.clock.now();
            if now >= node_renew {
                node_renew = match self.renew_node(&*audit).await {
                    Ok(()) => {
                        // The kept workload keys are sealed under the node's key: seal
                        // them again under the new one.
                        self.keep_workloads(&state);
                        self.node_renewal_time()
                    }
                    Err(e) => {
                        self.status.reached(false, now);
                        let svid_end = self.identity.current().svid().not_after();
                        warn!(error = %format!("{e:#}"), "node SVID renewal failed; retrying");
                        now + certs::retry_in(svid_end, now)
                    }
                };
            }
            if self.clock.instant() >= next_sync {
                let synced = self.sync(&mut state, &*audit).await;
                self.status.reached(synced.is_ok(), self.clock.now());
                if let Err(e) = synced {
                    let left = self
                        .status
                        .workload_svids_expiry(self.clock.now())
                        .map(|s| s.max(0.0) as u64);
                    warn!(
                        error = %format!("{e:#}"),
                        workload_svids_valid_for_s = left,
                        "sync with the issuer failed; serving on what this node holds; retrying"
                    );
                }
                next_sync = self.clock.instant() + self.interval();
            }
            if let Err(e) = self.renew_workloads(&mut state, &*audit).await {
                warn!(error = %format!("{e:#}"), "workload SVID renewal failed; retrying");
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// The workload SVIDs kept from the last run that are still valid, as a state to
    /// start from (the first sync keeps those whose entries still stand).
    fn kept_workloads(&self) -> Synced {
        let creds = self.identity.current();
        let node_key = certs::private_key_pem(creds.svid().key());
        let now = self.clock.now();
        let kept = keep::load_workloads(&self.cfg.data_dir, &node_key, creds.bundle(), now);
        let mut state = Synced::default();
        if let Some(soonest) = kept.iter().map(|(_, svid)| svid.not_after()).min() {
            let left = soonest.duration_since(now).unwrap_or_default().as_secs();
            info!(
                workloads = kept.len(),
                valid_for_s = left,
                "serving workload SVIDs kept from the last run until the issuer is reached"
            );
        }
        for (entry, svid) in kept {
            let renew_at = certs::renew_at(svid.not_before(), svid.not_after(), jitter());
            state.workloads.insert(
                entry.id.clone(),
                Minted {
                    entry,
                    svid,
                    renew_at,
                },
            );
        }
        state
    }

    /// Keeps the current workload SVIDs for the next run; a failure is logged (they are
    /// served all the same).
    fn keep_workloads(&self, state: &Synced) {
        let creds = self.identity.current();
        let node_key = certs::private_key_pem(creds.svid().key());
        let all = state.workloads.values().map(|m| (&m.entry, &m.svid));
        if let Err(e) = keep::save_workloads(&self.cfg.data_dir, &node_key, all) {
            warn!(error = %format!("{e:#}"), "workload SVIDs not kept for the next run");
        }
    }

    fn interval(&self) -> Duration {
        *self
            .sync_interval
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn node_renewal_time(&self) -> SystemTime {
        let creds = self.identity.current();
        let svid = creds.svid();
        certs::renew_at(svid.not_before(), svid.not_after(), jitter())
    }

    async fn renew_node(&self, audit: &dyn AuditSink) -> anyhow::Result<()> {
        let creds = self.identity.current();
        let id = creds.id().clone();
        let (key, csr) = certs::generate_key_and_csr(&id, KeyAlgorithm::default())?;
        let answer: NodeSvid = self
            .issuer
            .call(
                creds.bundle(),
                Some(creds.svid()),
                "/v1/renew",
                &RenewRequest { csr: csr.to_pem()? },
            )
            .await
            .map_err(|e| renewal_error(e, &id))?;
        let svid = Svid::from_pem(&answer.svid, &key).context("the renewed SVID")?;
        if svid.id() != &id {
            bail!("the issuer renewed {} as {}", id, svid.id());
        }
        let bundle = TrustBundle::from_pem(&answer.bundle).context("the issuer's bundle")?;
        persist(&self.cfg.data_dir, &svid, &bundle)?;
        let previous = creds.svid().serial().to_owned();
        // The renewal's bundle may be the first news of a CA added or retired: the trail
        // records that change as a sync would, so it is never missing from the record.
        let trust_changed = bundle.cas() != creds.bundle().cas();
        let cas = bundle.cas().len();
        let fresh = Credentials::new(svid.clone(), bundle)?.with_revoked(creds.revoked().clone());
        self.identity.update(fresh);
        info!(peer.id = %id, serial = %svid.serial(), "node SVID rotated");
        record(
            audit,
            &*self.clock,
            AuditEvent::IdentityRotated {
                id,
                serial: svid.serial().to_owned(),
                previous,
                not_after: svid.not_after(),
            },
        );
        if trust_changed {
            info!(cas, "trust updated (with the renewed SVID)");
            record(
                audit,
                &*self.clock,
                AuditEvent::TrustUpdated {
                    cas,
                    revoked: creds.revoked().len(),
                },
            );
        }
        Ok(())
    }

    async fn sync(&self, state: &mut Synced, audit: &dyn AuditSink) -> anyhow::Result<()> {
        let creds = self.identity.current();
        let answer: Sync = self
            .issuer
            .call(creds.bundle(), Some(creds.svid()), "/v1/sync", &())
            .await
            .map_err(|e| renewal_error(e, creds.id()))?;
        if state.last.as_ref() == Some(&answer) {
            return Ok(());
        }
        let bundle = TrustBundle::from_pem(&answer.bundle).context("the issuer's bundle")?;
        let revoked: HashSet<String> = answer.revoked.iter().cloned().collect();
        let trust_changed = bundle.cas() != creds.bundle().cas() || &revoked != creds.revoked();
        if trust_changed {
            let fresh = Credentials::new(creds.svid().clone(), bundle.clone())?
                .with_revoked(revoked.clone());
            self.identity.update(fresh);
            persist(&self.cfg.data_dir, creds.svid(), &bundle)?;
            keep::save_revoked(&self.cfg.data_dir, &revoked)?;
            info!(
                cas = bundle.cas().len(),
                revoked = revoked.len(),
                "trust updated"
            );
            record(
                audit,
                &*self.clock,
                AuditEvent::TrustUpdated {
                    cas: bundle.cas().len(),
                    revoked: revoked.len(),
                },
            );
        }
        // Entries: mint for new ones, drop removed ones.
        let wanted: HashMap<&str, &RegistrationEntry> =
            answer.entries.iter().map(|e| (e.id.as_str(), e)).collect();
        let before = state.workloads.len();
        state
            .workloads
            .retain(|id, w| wanted.get(id.as_str()).is_some_and(|e| **e == w.entry));
        let mut changed = state.workloads.len() != before || trust_changed;
        for (id, entry) in &wanted {
            if !state.workloads.contains_key(*id) {
                let svid = self.mint(entry, &creds).await?;
                state.workloads.insert((*id).to_owned(), svid);
                changed = true;
            }
        }
        state.bundle = Some(bundle);
        state.last = Some(answer);
        if changed {
            self.publish(state);
        }
        Ok(())
    }

    async fn renew_workloads(
        &self,
        state: &mut Synced,
        audit: &dyn AuditSink,
    ) -> anyhow::Result<()> {
        let now = self.clock.now();
        let due: Vec<String> = state
            .workloads
            .iter()
            .filter(|(_, w)| now >= w.renew_at)
            .map(|(id, _)| id.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let creds = self.identity.current();
        for id in due {
            let Some(old) = state.workloads.get(&id) else {
                continue;
            };
            let entry = old.entry.clone();
            let previous = old.svid.serial().to_owned();
            let fresh = self.mint(&entry, &creds).await?;
            info!(peer.id = %entry.spiffe_id, serial = %fresh.svid.serial(), "workload SVID rotated");
            record(
                audit,
                &*self.clock,
                AuditEvent::IdentityRotated {
                    id: entry.spiffe_id.clone(),
                    serial: fresh.svid.serial().to_owned(),
                    previous,
                    not_after: fresh.svid.not_after(),
                },
            );
            state.workloads.insert(id, fresh);
        }
        self.publish(state);
        Ok(())
    }

    async fn mint(&self, entry: &RegistrationEntry, creds: &Credentials) -> anyhow::Result<Minted> {
        let (key, csr) = certs::generate_key_and_csr(&entry.spiffe_id, KeyAlgorithm::default())?;
        let answer: WorkloadSvid = self
            .issuer
            .call(
                creds.bundle(),
                Some(creds.svid()),
                "/v1/workload",
                &WorkloadRequest {
                    entry: entry.id.clone(),
                    csr: csr.to_pem()?,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("SVID for entry {}: {e}", entry.id))?;
        let svid = Svid::from_pem(&answer.svid, &key).context("a workload SVID")?;
        let renew_at = certs::renew_at(svid.not_before(), svid.not_after(), jitter());
        Ok(Minted {
            entry: entry.clone(),
            svid,
            renew_at,
        })
    }

    fn publish(&self, state: &Synced) {
        let bundle = state
            .bundle
            .clone()
            .unwrap_or_else(|| self.identity.current().bundle().clone());
        let mut svids: Vec<view::WorkloadSvid> = state
            .workloads
            .values()
            .map(|m| view::WorkloadSvid {
                entry: m.entry.clone(),
                svid: m.svid.clone(),
            })
            .collect();
        svids.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        self.view
            .send_replace(Arc::new(WorkloadView { bundle, svids }));
        self.keep_workloads(state);
    }
}

/// What the agent last learned from the issuer.
#[derive(Debug, Default)]
struct Synced {
    last: Option<Sync>,
    bundle: Option<TrustBundle>,
    workloads: HashMap<String, Minted>,
}

#[derive(Debug)]
struct Minted {
    entry: RegistrationEntry,
    svid: Svid,
    renew_at: SystemTime,
}

/// Redeems the join token.
async fn attest(
    issuer: &IssuerClient,
    bundle: &TrustBundle,
    token: &certs::JoinToken,
) -> anyhow::Result<(Svid, TrustBundle, Duration)> {
    // The node does not know its ID before the issuer says; the CSR names none.
    let (key, csr) = certs::generate_key_and_bare_csr(KeyAlgorithm::default())?;
    let answer: NodeSvid = issuer
        .call(
            bundle,
            None,
            "/v1/attest",
            &AttestRequest {
                join_token: token.secret().to_owned(),
                csr: csr.to_pem()?,
            },
        )
        .await
        .map_err(|e| match e.status() {
            Some(s) if s.as_u16() == 401 || s.as_u16() == 403 => {
                anyhow::anyhow!("the issuer refused the join token: {e}")
            }
            _ => anyhow::anyhow!("attesting to the issuer at {}: {e}", issuer.addr),
        })?;
    let svid = Svid::from_pem(&answer.svid, &key).context("the node SVID")?;
    let bundle = TrustBundle::from_pem(&answer.bundle).context("the issuer's bundle")?;
    Ok((
        svid,
        bundle,
        Duration::from_secs(answer.sync_interval_secs.clamp(1, 300)),
    ))
}

fn renewal_error(e: CallError, node: &SpiffeId) -> anyhow::Error {
    match e.status().map(|s| s.as_u16()) {
        Some(403) => anyhow::anyhow!("the issuer refused node {node}: {e}"),
        _ => anyhow::anyhow!("{e}"),
    }
}

/// The issuer's agent API, one TLS connection per call.
#[derive(Debug, Clone)]
pub(crate) struct IssuerClient {
    /// `HOST:PORT`.
    pub(crate) addr: String,
    /// The SPIFFE ID it must present.
    pub(crate) id: SpiffeId,
}

impl IssuerClient {
    pub(crate) async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        bundle: &TrustBundle,
        client: Option<&Svid>,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let t = |m: String| CallError::Transport(m);
        let tls = libtransport::tls::control_client_config(bundle, &self.id, client, AGENT_ALPN)
            .map_err(|e| t(format!("TLS configuration: {e}")))?;
        let io = async {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| t(format!("cannot reach the issuer at {}: {e}", self.addr)))?;
            tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(libtransport::tls::control_server_name(), tcp)
                .await
                .map_err(|e| t(format!("TLS with the issuer at {}: {e}", self.addr)))
        };
        let stream = tokio::time::timeout(CALL_TIMEOUT, io)
            .await
            .map_err(|_| t(format!("the issuer at {} did not answer", self.addr)))??;
        tokio::time::timeout(
            CALL_TIMEOUT,
            http::call(stream, Method::POST, path, Some(body)),
        )
        .await
        .map_err(|_| t(format!("the issuer at {} did not answer", self.addr)))?
    }
}

/// The kept node SVID and bundle, if they are there, fit together and are valid now.
fn load_kept(dir: &Path, now: SystemTime) -> Option<(Svid, TrustBundle)> {
    let pem = Zeroizing::new(std::fs::read_to_string(dir.join(NODE_FILE)).ok()?);
    let bundle = read_bundle(&dir.join(BUNDLE_FILE)).ok()?;
    let svid = Svid::from_pem(&pem, &pem).ok()?;
    let creds = Credentials::new(svid.clone(), bundle.clone()).ok()?;
    let verified = bundle.verify(creds.svid().chain(), now, certs::Usage::Client);
    match verified {
        Ok(_) if svid.not_after() > now + KEPT_MARGIN => Some((svid, bundle)),
        _ => {
            info!("the kept node SVID is expired or no longer verifies; attesting again");
            None
        }
    }
}

/// Keeps the node SVID (chain and key in one file, so they never part) and the bundle.
fn persist(dir: &Path, svid: &Svid, bundle: &TrustBundle) -> anyhow::Result<()> {
    let key = certs::private_key_pem(svid.key());
    let mut both = Zeroizing::new(svid.chain_pem());
    both.push_str(&key);
    fsutil::write_atomic(&dir.join(NODE_FILE), both.as_bytes(), 0o600)?;
    fsutil::write_atomic(&dir.join(BUNDLE_FILE), bundle.to_pem().as_bytes(), 0o644)
}

fn read_bundle(path: &Path) -> anyhow::Result<TrustBundle> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    TrustBundle::from_pem(&text).with_context(|| path.display().to_string())
}

fn record(audit: &dyn AuditSink, clock: &dyn Clock, event: AuditEvent) {
    if let Err(e) = audit.record(&AuditRecord {
        time: clock.now(),
        event,
    }) {
        warn!(error = %e, "agent event not audited");
    }
}

/// A uniform draw from [-1, 1] for renewal jitter.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// The node SVID and its key, in the agent's data directory.
const NODE_FILE: &str = "node.pem";
/// The latest trust bundle.
const BUNDLE_FILE: &str = "bundle.pem";
/// A kept SVID this close to expiry is not worth starting with.
const KEPT_MARGIN: Duration = Duration::from_secs(5);
/// Until the issuer says otherwise.
const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How often the agent looks at its schedule.
const TICK: Duration = Duration::from_millis(500);
/// Longest one call to the issuer may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
