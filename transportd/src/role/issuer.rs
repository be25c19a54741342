//! The issuer role (`transportd issuer --config issuer.toml`): the trust domain's CA as a
//! service, in the manner of a SPIRE server.
//!
//! * Node agents reach it over TLS 1.3 (`api.rs`): a node attests once with a single-use
//!   join token and afterwards authenticates with its node SVID; it renews that SVID, fetches
//!   the trust bundle and the revocation list, and gets SVIDs for the registration entries
//!   of its workloads. Only CSRs arrive: every private key is made where it is used.
//! * Operators drive it through a local socket (`admin.rs`, mode 0600, owner or root only):
//!   join tokens, registration entries, node bans, CA rollover, status.
//! * Its state (`state.rs`: tokens as hashes, entries, nodes, the CAs, the ledger of issued
//!   SVIDs) is SQLite and survives restarts and crashes; its CAs (`authority.rs`) roll over
//!   in three steps; every issuance, renewal, refusal and change goes to its audit trail.
//! * It witnesses the nodes' audit checkpoints (`POST /v1/witness`): append-only per node,
//!   countersigned with its own SVID key, so a trail rebuilt on a node is caught by
//!   `transportd audit verify --witness` (see `libtransport::audit::Receipt`).
//!
//! The issuer has an SVID of its own (`spiffe://<trust-domain>/issuer`), issued by itself
//! and renewed at half-life; agents insist on that ID.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use certs::{
    CaParams, Csr, IssueParams, Issued, JoinToken, KeyAlgorithm, RegistrationEntry, SpiffeId,
    TrustDomain,
};
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink, FileSink, Receipt};
use libtransport::clock::{Clock, SystemClock};
use libtransport::{Credentials, IdentityHandle};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::config::issuer::IssuerConfig;
use crate::fsutil;

pub(crate) mod admin;
mod api;
mod authority;
pub(crate) mod http;
mod state;
pub(crate) mod wire;

use authority::{Authority, CaChange};
use http::ApiError;
use state::{LedgerEntry, State};
use wire::{
    AttestRequest, Banned, CaInfo, EntryCreate, MAX_WITNESS_BATCH, NodeSvid, RenewRequest, Sync,
    TokenCreate, TokenCreated, WitnessAnswer, WitnessRefused, WitnessRequest, WorkloadRequest,
    WorkloadSvid,
};

/// The issuer's own SPIFFE ID in a trust domain.
pub(crate) fn issuer_id(td: &TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::from_parts(td, ISSUER_PATH)?)
}

/// Runs the issuer until SIGTERM or SIGINT.
pub(crate) async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = IssuerConfig::load(path)?;
    let passphrase = cfg
        .passphrase
        .read(&|var| std::env::var(var).ok())
        .map_err(anyhow::Error::from)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    fsutil::private_dir(&cfg.data_dir)?;
    let state = State::open(&cfg.db_path())?;
    let now = clock.now();
    let (authority, created) = Authority::open(
        &state,
        &cfg.trust_domain,
        &cfg.ca_dir(),
        passphrase,
        CaParams {
            validity: cfg.ca_ttl,
            key: KeyAlgorithm::default(),
        },
        cfg.ca_import.as_deref(),
        now,
    )?;
    let id = issuer_id(&cfg.trust_domain)?;
    let (own, own_issued, ca_serial) = issue_own(&authority, &id, cfg.svid_ttl, now)?;
    let identity = IdentityHandle::new(own);
    let audit = Arc::new(
        FileSink::open(cfg.audit.clone(), Arc::new(identity.clone()), clock.clone())
            .with_context(|| format!("opening the audit trail in {}", cfg.audit.dir.display()))?,
    );
    let issuer = Arc::new(Issuer {
        cfg,
        state,
        authority,
        audit: audit.clone(),
        identity: identity.clone(),
        clock: clock.clone(),
        id: id.clone(),
    });
    issuer.record(AuditEvent::ConfigLoaded {
        source: path.display().to_string(),
        digest: libtransport::proto::Digest::of(&std::fs::read(path).unwrap_or_default()),
    })?;
    if let Some(c) = created {
        issuer.record_ca(&c)?;
    }
    issuer.ledger_own(&own_issued, &ca_serial)?;

    let api = api::serve(issuer.clone()).await?;
    let admin = admin::serve(issuer.clone()).await?;
    // Signals are ours before anyone learns we are up.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // Nothing of the issuer is reloadable (its configuration, CA and state need a
    // restart), but a stray SIGHUP (`kill -HUP`, a reload by habit) must not end it.
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let ready = serde_json::json!({
        "event": "listening",
        "id": id.as_str(),
        "listen": api.addr.to_string(),
        "admin_socket": issuer.cfg.admin_socket.display().to_string(),
    });
    println!("{ready}");
    info!(id = %id, listen = %api.addr, "issuer started");
    crate::notify::ready(&format!("issuing as {id}"));

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                warn!("SIGHUP: the issuer re-reads nothing; restart it to apply a changed configuration");
            }
            _ = tick.tick() => {
                if let Err(e) = audit.tick() {
                    warn!(error = %e, "audit checkpoint failed");
                }
                if let Err(e) = issuer.renew_own_if_due() {
                    warn!(error = %format!("{e:#}"), "renewing the issuer's own SVID failed");
                }
            }
        }
    }
    info!("stopping");
    crate::notify::stopping();
    api.task.abort();
    admin.stop();
    audit.close().context("sealing the audit trail")?;
    info!("stopped");
    Ok(())
}

/// Everything the interfaces share.
#[derive(Debug)]
pub(crate) struct Issuer {
    cfg: IssuerConfig,
    state: State,
    authority: Authority,
    audit: Arc<FileSink>,
    identity: IdentityHandle,
    clock: Arc<dyn Clock>,
    id: SpiffeId,
}

impl Issuer {
    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn record(&self, event: AuditEvent) -> anyhow::Result<()> {
        self.audit
            .record(&AuditRecord {
                time: self.now(),
                event,
            })
            .context("writing the issuer's audit trail")
    }

    /// Records an event the work depends on: if it cannot be written, the work is refused.
    fn record_or_refuse(&self, event: AuditEvent) -> Result<(), ApiError> {
        self.record(event).map_err(|e| ApiError::internal(&e))
    }

    fn refuse(
        &self,
        node: Option<&SpiffeId>,
        addr: Option<std::net::SocketAddr>,
        e: ApiError,
    ) -> ApiError {
        info!(node = ?node.map(SpiffeId::as_str), reason = %e.message, "issuance refused");
        let _ = self.record(AuditEvent::IssuanceRefused {
            node: node.cloned(),
            addr,
            reason: e.message.clone(),
        });
        e
    }

    /// Refuses a whole witness request from a caller whose checkpoints are never kept;
    /// recorded once per request, under the newest checkpoint it carried.
    fn refuse_witness(&self, node: &SpiffeId, req: &WitnessRequest, e: ApiError) -> ApiError {
        info!(node = %node, reason = %e.message, "audit checkpoints refused");
        let seq = req.checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
        let _ = self.record(AuditEvent::WitnessRefused {
            node: node.clone(),
            seq,
            reason: e.message.clone(),
        });
        e
    }

    fn record_ca(&self, c: &CaChange) -> anyhow::Result<()> {
        info!(change = c.change, serial = %c.serial, "CA changed");
        self.record(AuditEvent::CaChanged {
            change: c.change.into(),
            serial: c.serial.clone(),
            not_after: c.not_after,
        })
    }

    fn ledger_own(&self, issued: &Issued, ca_serial: &str) -> anyhow::Result<()> {
        self.state.ledger_insert(&LedgerEntry {
            serial: issued.serial.clone(),
            spiffe_id: issued.id.clone(),
            kind: "issuer",
            node: None,
            ca_serial: ca_serial.to_owned(),
            issued_at: self.now(),
            not_after: issued.not_after,
        })?;
        self.record(AuditEvent::SvidIssued {
            id: issued.id.clone(),
            serial: issued.serial.clone(),
            kind: "issuer".into(),
            requester: None,
            how: "self".into(),
            not_after: issued.not_after,
        })?;
        self.record(AuditEvent::IdentityLoaded {
            id: issued.id.clone(),
            serial: issued.serial.clone(),
            not_after: issued.not_after,
        })
    }

    /// Signs `csr` for `id` with the active CA, records it in the ledger and the trail.
    fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        kind: &'static str,
        node: &SpiffeId,
        how: &str,
    ) -> Result<Issued, ApiError> {
        let csr = Csr::from_pem(csr_pem)
            .map_err(|e| ApiError::bad_request(format!("certificate signing request: {e}")))?;
        let (ca, ca_serial) = self.authority.active();
        let now = self.now();
        let issued = ca
            .issue(&csr, id, &IssueParams { ttl }, now)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.state
            .ledger_insert(&LedgerEntry {
                serial: issued.serial.clone(),
                spiffe_id: id.clone(),
                kind,
                node: Some(node.clone()),
                ca_serial,
                issued_at: now,
                not_after: issued.not_after,
            })
            .map_err(|e| ApiError::internal(&e))?;
        self.record_or_refuse(AuditEvent::SvidIssued {
            id: id.clone(),
            serial: issued.serial.clone(),
            kind: kind.into(),
            requester: Some(node.clone()),
            how: how.into(),
            not_after: issued.not_after,
        })?;
        info!(peer.id = %id, serial = %issued.serial, how, "SVID issued");
        Ok(issued)
    }

    // The agent API.

    /// A node's first contact: redeem its join token, sign its CSR.
    pub(crate) fn attest(
        &self,
        req: &AttestRequest,
        addr: std::net::SocketAddr,
    ) -> Result<NodeSvid, ApiError> {
        let token = JoinToken::from_secret(&req.join_token)
            .map_err(|e| self.refuse(None, Some(addr), ApiError::unauthenticated(e.to_string())))?;
        let now = self.now();
        let node = match self.state.token_redeem(&token.hash(), now) {
            Ok(Ok(node)) => node,
            Ok(Err(refusal)) => {
                return Err(self.refuse(
                    None,
                    Some(addr),
                    ApiError::unauthenticated(format!(
                        "{refusal} (token {}): ask the issuer's operator for a new one \
                         (`transportd issuer token create`)",
                        token.hash().short()
                    )),
                ));
            }
            Err(e) => return Err(ApiError::internal(&e)),
        };
        if let Some(n) = self.state.node(&node).map_err(|e| ApiError::internal(&e))?
            && n.banned_at.is_some()
        {
            return Err(self.refuse(
                Some(&node),
                Some(addr),
                ApiError::forbidden(format!("node {node} is banned")),
            ));
        }
        self.state
            .node_attested(&node, now)
            .map_err(|e| ApiError::internal(&e))?;
        let issued = self
            .sign(
                &req.csr,
                &node,
                self.cfg.svid_ttl,
                "node",
                &node,
                "join_token",
            )
            .map_err(|e| self.refuse(Some(&node), Some(addr), e))?;
        Ok(self.node_svid(&node, &issued))
    }

    fn node_svid(&self, node: &SpiffeId, issued: &Issued) -> NodeSvid {
        NodeSvid {
            id: node.clone(),
            svid: issued.chain_pem(),
            bundle: self.authority.bundle().to_pem(),
            sync_interval_secs: self.cfg.sync_interval.as_secs(),
        }
    }

    /// Checks that an authenticated peer is a node in good standing.
    fn known_node(&self, node: &SpiffeId) -> Result<(), ApiError> {
        match self.state.node(node).map_err(|e| ApiError::internal(&e))? {
            None => Err(self.refuse(
                Some(node),
                None,
                ApiError::forbidden(format!(
                    "{node} is not an attested node: only node SVIDs may call the agent API"
                )),
            )),
            Some(n) if n.banned_at.is_some() => Err(self.refuse(
                Some(node),
                None,
                ApiError::forbidden(format!("node {node} is banned")),
            )),
            Some(_) => {
                let _ = self.state.node_seen(node, self.now());
                Ok(())
            }
        }
    }

    /// A node renews its SVID, authenticated by the current one.
    pub(crate) fn renew(&self, node: &SpiffeId, req: &RenewRequest) -> Result<NodeSvid, ApiError> {
        self.known_node(node)?;
        let issued = self
            .sign(&req.csr, node, self.cfg.svid_ttl, "node", node, "renewal")
            .map_err(|e| self.refuse(Some(node), None, e))?;
        Ok(self.node_svid(node, &issued))
    }

    /// What a node must know now: bundle, revocations, its entries.
    pub(crate) fn sync(&self, node: &SpiffeId) -> Result<Sync, ApiError> {
        self.known_node(node)?;
        let now = self.now();
        Ok(Sync {
            bundle: self.authority.bundle().to_pem(),
            revoked: self
                .state
                .revoked_live(now)
                .map_err(|e| ApiError::internal(&e))?,
            entries: self
                .state
                .entries_for_node(node)
                .map_err(|e| ApiError::internal(&e))?,
        })
    }

    /// An SVID for one of the node's entries.
    pub(crate) fn workload(
        &self,
        node: &SpiffeId,
        req: &WorkloadRequest,
    ) -> Result<WorkloadSvid, ApiError> {
        self.known_node(node)?;
        let entry = self
            .state
            .entry(&req.entry)
            .map_err(|e| ApiError::internal(&e))?
            .filter(|e| e.parent_id == *node)
            .ok_or_else(|| {
                self.refuse(
                    Some(node),
                    None,
                    ApiError::forbidden(format!(
                        "no registration entry {} for node {node}",
                        req.entry
                    )),
                )
            })?;
        let ttl = entry
            .ttl
            .unwrap_or(self.cfg.svid_ttl)
            .min(self.cfg.svid_ttl);
        let issued = self
            .sign(&req.csr, &entry.spiffe_id, ttl, "workload", node, "entry")
            .map_err(|e| self.refuse(Some(node), None, e))?;
        Ok(WorkloadSvid {
            svid: issued.chain_pem(),
        })
    }

    /// Witnesses a node's audit checkpoints: each is kept append-only and countersigned;
    /// one that would rewrite or go back is refused and the refusal recorded.
    pub(crate) fn witness(
        &self,
        node: &SpiffeId,
        req: &WitnessRequest,
    ) -> Result<WitnessAnswer, ApiError> {
        if req.checkpoints.len() > MAX_WITNESS_BATCH {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_WITNESS_BATCH} checkpoints per request"
            )));
        }
        // Nodes with an identity from files may be witnessed too, but not workloads: their
        // SVIDs come from registration entries.
        if let Some(n) = self.state.node(node).map_err(|e| ApiError::internal(&e))?
            && n.banned_at.is_some()
        {
            return Err(self.refuse_witness(
                node,
                req,
                ApiError::forbidden(format!("node {node} is banned")),
            ));
        }
        let entries = self.state.entries().map_err(|e| ApiError::internal(&e))?;
        if entries.iter().any(|e| e.spiffe_id == *node) || *node == self.id {
            return Err(self.refuse_witness(
                node,
                req,
                ApiError::forbidden(format!(
                    "{node} is a workload (or the issuer): only nodes' audit checkpoints are \
                     witnessed"
                )),
            ));
        }
        let mut sorted = req.checkpoints.clone();
        sorted.sort_by_key(|c| c.seq);
        let mut answer = WitnessAnswer::default();
        for cp in &sorted {
            let now = self.now();
            let taken = self
                .state
                .witness_append(node, cp, || {
                    Ok(Receipt::sign(node, cp, now, &self.identity)?)
                })
                .map_err(|e| ApiError::internal(&e))?;
            match taken {
                Ok(receipt) => answer.receipts.push(receipt),
                Err(refusal) => {
                    let reason = refusal.to_string();
                    warn!(node = %node, seq = cp.seq, reason = %reason, "audit checkpoint refused by the witness");
                    self.record_or_refuse(AuditEvent::WitnessRefused {
                        node: node.clone(),
                        seq: cp.seq,
                        reason: reason.clone(),
                    })?;
                    answer.refused.push(WitnessRefused {
                        seq: cp.seq,
                        reason,
                    });
                }
            }
        }
        Ok(answer)
    }

    /// The receipts held for `node`.
    pub(crate) fn witnessed(&self, node: &SpiffeId) -> Result<Vec<Receipt>, ApiError> {
        self.state
            .witnessed(node)
            .map_err(|e| ApiError::internal(&e))
    }

    // The admin API.

    /// Creates a join token for `node`.
    pub(crate) fn token_create(&self, req: &TokenCreate) -> Result<TokenCreated, ApiError> {
        self.check_node_id(&req.node)?;
        if req.ttl_secs == 0 || req.ttl_secs > MAX_TOKEN_TTL.as_secs() {
            return Err(ApiError::bad_request(format!(
                "token TTL must be between 1s and {}",
                humantime::format_duration(MAX_TOKEN_TTL)
            )));
        }
        let entries = self.state.entries().map_err(|e| ApiError::internal(&e))?;
        if entries.iter().any(|e| e.spiffe_id == req.node) {
            return Err(ApiError::conflict(format!(
                "{} is a workload ID of a registration entry; a node needs an ID of its own",
                req.node
            )));
        }
        let token = JoinToken::generate().map_err(|e| ApiError::internal(&e.into()))?;
        let now = self.now();
        let expires_at = now + Duration::from_secs(req.ttl_secs);
        self.state
            .token_insert(&token.hash(), &req.node, now, expires_at)
            .map_err(|e| ApiError::internal(&e))?;
        self.record_or_refuse(AuditEvent::JoinTokenCreated {
            node: req.node.clone(),
            token: token.hash().short().to_owned(),
            expires_at,
        })?;
        info!(node = %req.node, token = token.hash().short(), "join token created");
        Ok(TokenCreated {
            token: token.secret().to_owned(),
            node: req.node.clone(),
            expires_at: humantime::format_rfc3339_seconds(expires_at).to_string(),
        })
    }

    fn check_node_id(&self, id: &SpiffeId) -> Result<(), ApiError> {
        if !id.is_member_of(&self.cfg.trust_domain) {
            return Err(ApiError::bad_request(format!(
                "{id} is not in trust domain {}",
                self.cfg.trust_domain
            )));
        }
        if id.path().is_empty() || *id == self.id {
            return Err(ApiError::bad_request(format!(
                "{id} is reserved; give a node ID such as spiffe://{}/node/gpu-0",
                self.cfg.trust_domain
            )));
        }
        Ok(())
    }

    /// Creates a registration entry.
    pub(crate) fn entry_create(&self, req: &EntryCreate) -> Result<RegistrationEntry, ApiError> {
        let mut id = [0u8; 8];
        aws_lc_rs::rand::fill(&mut id)
            .map_err(|_| ApiError::internal(&anyhow::anyhow!("no randomness")))?;
        let ttl = req.ttl_secs.map(Duration::from_secs);
        if let Some(t) = ttl
            && (t < Duration::from_secs(10) || t > self.cfg.svid_ttl)
        {
            return Err(ApiError::bad_request(format!(
                "entry TTL must be between 10s and the issuer's SVID TTL ({})",
                humantime::format_duration(self.cfg.svid_ttl)
            )));
        }
        let entry = RegistrationEntry {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            spiffe_id: req.spiffe_id.clone(),
            parent_id: req.parent_id.clone(),
            selectors: req.selectors.clone(),
            ttl,
        };
        entry
            .validate(&self.cfg.trust_domain)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if entry.spiffe_id == self.id {
            return Err(ApiError::bad_request(format!(
                "{} is reserved for the issuer",
                self.id
            )));
        }
        let is_node = self
            .state
            .node(&entry.spiffe_id)
            .map_err(|e| ApiError::internal(&e))?
            .is_some()
            || self
                .state
                .tokens_pending(self.now())
                .map_err(|e| ApiError::internal(&e))?
                .iter()
                .any(|(_, n, _)| *n == entry.spiffe_id);
        if is_node {
            return Err(ApiError::conflict(format!(
                "{} is a node's ID; a workload needs an ID of its own",
                entry.spiffe_id
            )));
        }
        self.state
            .entry_insert(&entry, self.now())
            .map_err(|e| ApiError::internal(&e))?;
        self.record_entry("created", &entry)?;
        Ok(entry)
    }

    fn record_entry(&self, change: &str, e: &RegistrationEntry) -> Result<(), ApiError> {
        info!(entry = %e.id, peer.id = %e.spiffe_id, change, "registration entry changed");
        self.record_or_refuse(AuditEvent::EntryChanged {
            change: change.into(),
            entry: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
        })
    }

    /// Every entry.
    pub(crate) fn entries(&self) -> Result<Vec<RegistrationEntry>, ApiError> {
        self.state.entries().map_err(|e| ApiError::internal(&e))
    }

    /// Deletes an entry; SVIDs already issued for it run out at their expiry.
    pub(crate) fn entry_delete(&self, id: &str) -> Result<RegistrationEntry, ApiError> {
        let entry = self
            .state
            .entry_delete(id)
            .map_err(|e| ApiError::internal(&e))?
            .ok_or_else(|| ApiError::not_found(format!("no registration entry {id}")))?;
        self.record_entry("deleted", &entry)?;
        Ok(entry)
    }

    /// Bans a node: no more renewals, and its live SVIDs go out as revoked.
    pub(crate) fn ban(&self, node: &SpiffeId) -> Result<Banned, ApiError> {
        self.check_node_id(node)?;
        let revoked = self
            .state
            .node_ban(node, self.now())
            .map_err(|e| ApiError::internal(&e))?;
        self.record_or_refuse(AuditEvent::NodeBanned {
            node: node.clone(),
            revoked: revoked.clone(),
        })?;
        warn!(node = %node, revoked = revoked.len(), "node banned");
        Ok(Banned {
            node: node.clone(),
            revoked,
        })
    }

    /// A rollover step.
    pub(crate) fn ca_step(&self, step: &str, force: bool) -> Result<CaInfo, ApiError> {
        let now = self.now();
        let change = match step {
            "prepare" => self.authority.prepare(&self.state, now),
            "activate" => self.authority.activate(&self.state),
            "retire" => self.authority.retire(&self.state, now, force),
            other => return Err(ApiError::not_found(format!("no CA step {other}"))),
        }
        .map_err(|e| ApiError::conflict(format!("{e:#}")))?;
        self.record_ca(&change)
            .map_err(|e| ApiError::internal(&e))?;
        // The issuer trusts the new bundle at once, and after an activation presents an SVID
        // of the new CA, so agents see the change on their next call.
        self.refresh_own().map_err(|e| ApiError::internal(&e))?;
        self.ca_info(&change.serial)
    }

    fn ca_info(&self, serial: &str) -> Result<CaInfo, ApiError> {
        let now = self.now();
        let cas = self.state.cas().map_err(|e| ApiError::internal(&e))?;
        let c = cas
            .iter()
            .find(|c| c.serial == serial)
            .ok_or_else(|| ApiError::not_found(format!("no CA {serial}")))?;
        Ok(CaInfo {
            serial: c.serial.clone(),
            state: c.state.as_str().into(),
            not_after: humantime::format_rfc3339_seconds(c.not_after).to_string(),
            live_svids: self
                .state
                .live_by_ca(&c.serial, now)
                .map_err(|e| ApiError::internal(&e))?
                .0,
        })
    }

    /// The issuer at a glance.
    pub(crate) fn status(&self) -> Result<serde_json::Value, ApiError> {
        let now = self.now();
        let cas = self.state.cas().map_err(|e| ApiError::internal(&e))?;
        let cas: Vec<CaInfo> = cas
            .iter()
            .map(|c| self.ca_info(&c.serial))
            .collect::<Result<_, _>>()?;
        let tokens: Vec<serde_json::Value> = self
            .state
            .tokens_pending(now)
            .map_err(|e| ApiError::internal(&e))?
            .into_iter()
            .map(|(hash, node, exp)| {
                serde_json::json!({
                    "token": hash,
                    "node": node,
                    "expires_at": humantime::format_rfc3339_seconds(exp).to_string(),
                })
            })
            .collect();
        let ledger: Vec<serde_json::Value> = self
            .state
            .ledger(50)
            .map_err(|e| ApiError::internal(&e))?
            .into_iter()
            .map(|l| {
                serde_json::json!({
                    "serial": l.serial,
                    "id": l.spiffe_id,
                    "kind": l.kind,
                    "node": l.node,
                    "ca": l.ca_serial,
                    "issued_at": humantime::format_rfc3339_seconds(l.issued_at).to_string(),
                    "not_after": humantime::format_rfc3339_seconds(l.not_after).to_string(),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "trust_domain": self.cfg.trust_domain,
            "id": self.id,
            "svid_ttl_secs": self.cfg.svid_ttl.as_secs(),
            "cas": cas,
            "nodes": self.state.nodes().map_err(|e| ApiError::internal(&e))?,
            "pending_tokens": tokens,
            "counts": self.state.counts(now).map_err(|e| ApiError::internal(&e))?,
            "recent_svids": ledger,
        }))
    }

    /// Renews the issuer's own SVID at about half its lifetime.
    fn renew_own_if_due(&self) -> anyhow::Result<()> {
        let creds = self.identity.current();
        let svid = creds.svid();
        let due = certs::renew_at(svid.not_before(), svid.not_after(), 0.0);
        if self.now() >= due {
            self.refresh_own()?;
        }
        Ok(())
    }

    /// Issues a fresh SVID for the issuer from the active CA, with the current bundle.
    fn refresh_own(&self) -> anyhow::Result<()> {
        let previous = self.identity.current().svid().serial().to_owned();
        let (creds, issued, ca_serial) =
            issue_own(&self.authority, &self.id, self.cfg.svid_ttl, self.now())?;
        self.identity.update(creds);
        self.ledger_own(&issued, &ca_serial)?;
        self.record(AuditEvent::IdentityRotated {
            id: issued.id.clone(),
            serial: issued.serial.clone(),
            previous,
            not_after: issued.not_after,
        })
    }

    /// The trust bundle, PEM.
    pub(crate) fn bundle_pem(&self) -> String {
        self.authority.bundle().to_pem()
    }

    /// Every CA this issuer ever had, retired ones included, PEM: what verifies audit
    /// checkpoints signed before a rollover. Not a bundle to trust peers with.
    pub(crate) fn all_cas_pem(&self) -> Result<String, ApiError> {
        let cas = self.state.cas().map_err(|e| ApiError::internal(&e))?;
        Ok(cas.iter().map(|c| c.cert_pem.as_str()).collect())
    }

    pub(crate) fn config(&self) -> &IssuerConfig {
        &self.cfg
    }

    pub(crate) fn identity(&self) -> &IdentityHandle {
        &self.identity
    }

    pub(crate) fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }
}

/// An SVID for the issuer itself, signed by the active CA; the key never leaves memory.
fn issue_own(
    authority: &Authority,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> anyhow::Result<(Credentials, Issued, String)> {
    let (key, csr) = certs::generate_key_and_csr(id, KeyAlgorithm::default())?;
    let (ca, ca_serial) = authority.active();
    let issued = ca.issue(&csr, id, &IssueParams { ttl }, now)?;
    let svid = certs::Svid::from_pem(&issued.chain_pem(), &key)?;
    let creds = Credentials::new(svid, authority.bundle())?;
    Ok((creds, issued, ca_serial))
}

/// The path of the issuer's own SPIFFE ID.
const ISSUER_PATH: &str = "/issuer";

/// Longest a join token may stay valid.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
