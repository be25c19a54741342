//! The node configuration: parsed from TOML (`config/file.rs`), validated once, converted
//! into library configuration. Every error names the field it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use certs::SpiffeId;
use libtransport::audit::FileSinkConfig;
use libtransport::policy::{Action, Pattern, Policy, Rule, Subject};
use libtransport::proto::Digest;
use libtransport::{Credentials, TransportConfig};

mod file;
pub(crate) mod issuer;

use file::{ActionFile, FileConfig};
pub(crate) use file::{EXAMPLE, POLICY_EXAMPLE};

/// A validated node configuration.
#[derive(Debug)]
pub(crate) struct NodeConfig {
    pub(crate) identity: IdentitySource,
    pub(crate) quic: Option<SocketAddr>,
    pub(crate) tcp: Option<SocketAddr>,
    pub(crate) store_root: PathBuf,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) audit: FileSinkConfig,
    pub(crate) policy: PolicySource,
    /// Where metrics and health are served; `None` when turned off.
    pub(crate) admin: Option<SocketAddr>,
    /// Who witnesses the audit trail's checkpoints; `None` when no one does.
    pub(crate) witness: Option<WitnessTarget>,
    pub(crate) transport: TransportConfig,
    /// Preferred chunk size of manifests this node builds.
    pub(crate) chunk_bytes: u32,
    /// Manifests the store computes at once (`limits.max_manifest_builds`).
    pub(crate) max_manifest_builds: usize,
    /// Limits on partial files of pushes, before the data disk's size is known.
    pub(crate) partials: PartialSpec,
    /// The sidecar's local data API; `None` when the node serves none.
    pub(crate) sidecar: Option<SidecarConfig>,
    /// Emergency grants and the admin socket that gives them.
    pub(crate) emergency: EmergencyConfig,
    /// BLAKE3 of the configuration file's bytes.
    pub(crate) digest: Digest,
}

/// The `[sidecar]` section, validated.
#[derive(Debug, Clone)]
pub(crate) struct SidecarConfig {
    /// The local data API's socket.
    pub(crate) socket: PathBuf,
    /// The socket's group, a name or a number (resolved when the socket is made);
    /// `None` keeps the daemon's.
    pub(crate) group: Option<String>,
    /// Storage nodes, `HOST:PORT`, as callers name them; the first is the default.
    pub(crate) storage: Vec<String>,
    /// The SPIFFE ID storage nodes must present; `None`: any of the trust domain.
    pub(crate) storage_id: Option<SpiffeId>,
    /// Paths to try, in order.
    pub(crate) paths: Vec<libtransport::Path>,
    /// Where the sealed cache lives.
    pub(crate) cache_dir: PathBuf,
    /// Its byte budget.
    pub(crate) cache_bytes: u64,
    /// Bytes of objects held open in memory for hand-off.
    pub(crate) memory_bytes: u64,
    /// Largest object fetched whole.
    pub(crate) max_object: u64,
    /// How long a storage node's decision is reused.
    pub(crate) decision_ttl: std::time::Duration,
    /// How long a local connection may sit between requests before it is closed.
    pub(crate) idle_timeout: std::time::Duration,
    /// Local callers served at once; more are answered `busy`.
    pub(crate) max_callers: usize,
}

/// The `[emergency]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EmergencyConfig {
    /// The longest TTL a grant may have.
    pub(crate) max_ttl: std::time::Duration,
    /// Whether a grant waits for a second operator's approval.
    pub(crate) require_approval: bool,
    /// Where active grants are kept across restarts.
    pub(crate) dir: PathBuf,
    /// The admin socket.
    pub(crate) socket: PathBuf,
    /// Whether the file named the socket (a default path too long for a Unix socket is
    /// skipped with a warning; a named one that cannot be bound stops the start).
    pub(crate) socket_named: bool,
    /// The socket's group (name or number); `None`: mode 0600, the node's user and root.
    pub(crate) group: Option<String>,
}

/// The `[limits] partial_*` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PartialSpec {
    pub(crate) quota: Share,
    pub(crate) quota_per_identity: Share,
    pub(crate) max_age: std::time::Duration,
}

impl Default for PartialSpec {
    fn default() -> Self {
        Self {
            quota: Share::Disk(25.0),
            quota_per_identity: Share::Disk(12.5),
            max_age: libtransport::store::PartialLimits::DEFAULT_MAX_AGE,
        }
    }
}

impl PartialSpec {
    /// The limits for a data disk of `disk` bytes.
    pub(crate) fn resolve(&self, disk: u64) -> libtransport::store::PartialLimits {
        libtransport::store::PartialLimits {
            quota_bytes: self.quota.of(disk),
            quota_bytes_per_identity: self.quota_per_identity.of(disk),
            max_age: self.max_age,
        }
    }
}

/// A size: in bytes, or a share of the data disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Share {
    Bytes(u64),
    /// Percent of the file system holding the store's root.
    Disk(f64),
}

impl Share {
    fn parse(text: &str) -> Result<Self, String> {
        if let Some(p) = text.trim().strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Self::Disk(p)),
                _ => Err(format!(
                    "{text:?}: give a share of the data disk from 0% (exclusive) to 100%"
                )),
            };
        }
        match text.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => Ok(Self::Bytes(b.as_u64())),
            _ => Err(format!(
                "{text:?}: give a size (\"200GiB\") or a share of the data disk (\"25%\")"
            )),
        }
    }

    fn of(self, disk: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            Self::Disk(p) => (disk as f64 * p / 100.0) as u64,
        }
    }
}

/// Where the node's access policy comes from.
#[derive(Debug, Clone)]
pub(crate) enum PolicySource {
    /// A policy file, re-read when it changes.
    File(PathBuf),
    /// `[[allow]]` rules in the node configuration.
    Inline(Policy),
}

impl PolicySource {
    /// Loads the policy, with the digest of its source and a name for it.
    pub(crate) fn load(&self) -> Result<(Policy, Digest, String), ConfigError> {
        match self {
            Self::Inline(p) => Ok((
                p.clone(),
                Digest::of(b"inline"),
                "node configuration [[allow]]".into(),
            )),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let policy = Policy::parse(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                Ok((
                    policy,
                    Digest::of(text.as_bytes()),
                    path.display().to_string(),
                ))
            }
        }
    }
}

/// Where the node's identity comes from.
#[derive(Debug, Clone)]
pub(crate) enum IdentitySource {
    /// SVID, key and bundle files, renewed by someone else (re-read on SIGHUP).
    Files(IdentityPaths),
    /// The node agent, from the issuer.
    Agent(AgentConfig),
}

/// The `[agent]` section of a node configuration, validated.
#[derive(Debug, Clone)]
pub(crate) struct AgentConfig {
    /// The issuer's agent API, `HOST:PORT`.
    pub(crate) issuer: String,
    /// The issuer's SPIFFE ID; `spiffe://<trust domain>/issuer` when not given.
    pub(crate) issuer_id: Option<SpiffeId>,
    /// The bundle that authenticates the issuer at first contact.
    pub(crate) bundle: PathBuf,
    /// Where the join token is (read only when the node must attest).
    pub(crate) join_token: TokenSource,
    /// Where the node SVID and the latest bundle are kept.
    pub(crate) data_dir: PathBuf,
    /// Where the Workload API listens; `None` serves none.
    pub(crate) workload_socket: Option<PathBuf>,
}

/// Where the node sends its audit checkpoints to be witnessed.
#[derive(Debug, Clone)]
pub(crate) struct WitnessTarget {
    /// `HOST:PORT` of the witness's agent API; `None`: the agent's issuer.
    pub(crate) addr: Option<String>,
    /// Its SPIFFE ID; `None`: the issuer of the node's trust domain.
    pub(crate) id: Option<SpiffeId>,
    /// `/readyz` says so when a checkpoint has waited longer than this.
    pub(crate) lag: std::time::Duration,
}

/// Where a join token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    File(PathBuf),
    Env(String),
}

/// Where the identity files are.
#[derive(Debug, Clone)]
pub(crate) struct IdentityPaths {
    pub(crate) svid: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) bundle: PathBuf,
}

/// Why a configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl NodeConfig {
    /// Reads and validates the file at `path` (without touching the files it names).
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        load_with(path, Self::parse)
    }

    /// Parses TOML text; relative paths are taken relative to `base`. Pure: no I/O.
    pub(crate) fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("config"),
            message: e.to_string(),
        })?;
        if f.listen.quic.is_none() && f.listen.tcp.is_none() {
            return Err(invalid("listen", "give quic, tcp or both"));
        }
        let mut rules = Vec::new();
        for (i, a) in f.allow.iter().enumerate() {
            if a.actions.is_empty() {
                return Err(invalid(
                    &format!("allow[{i}].actions"),
                    "list at least one of \"read\", \"write\"",
                ));
            }
            let mut actions = vec![Action::List];
            if a.actions.contains(&ActionFile::Read) {
                actions.push(Action::Read);
            }
            if a.actions.contains(&ActionFile::Write) {
                actions.push(Action::Write);
            }
            let dataset = Pattern::new(a.dataset.as_str())
                .map_err(|e| invalid(&format!("allow[{i}].dataset"), &e.to_string()))?;
            rules.push(Rule {
                name: format!("allow[{i}]"),
                effect: libtransport::policy::Effect::Allow,
                subjects: vec![Subject::Exact(a.peer.clone())],
                except: Vec::new(),
                datasets: vec![dataset],
                objects: Vec::new(),
                classes: Vec::new(),
                actions,
                line: None,
            });
        }
        let mut t = TransportConfig::default();
        if let Some(r) = &f.rdma {
            t.rdma(r.mode);
        }
        let mut chunk_bytes = libtransport::proto::manifest::DEFAULT_CHUNK_BYTES;
        let l = &f.limits;
        let range = |field: &str, e: libtransport::config::ConfigError| {
            invalid(&format!("limits.{field}"), &e.to_string())
        };
        if let Some(n) = l.max_connections {
            t.max_connections(n)
                .map_err(|e| range("max_connections", e))?;
        }
        if let Some(n) = l.max_connections_per_identity {
            t.max_connections_per_identity(n)
                .map_err(|e| range("max_connections_per_identity", e))?;
        }
        if let Some(size) = l.max_memory {
            t.max_memory_bytes(size.as_u64())
                .map_err(|e| range("max_memory", e))?;
        }
        if let Some(n) = l.max_requests_per_identity {
            t.max_requests_per_identity(n)
                .map_err(|e| range("max_requests_per_identity", e))?;
        }
        let max_manifest_builds = match l.max_manifest_builds {
            None => libtransport::store::DEFAULT_MAX_MANIFEST_BUILDS,
            Some(n @ 1..=256) => n as usize,
            Some(_) => {
                return Err(invalid(
                    "limits.max_manifest_builds",
                    "must be between 1 and 256",
                ));
            }
        };
        if let Some(n) = l.max_handshakes {
            t.max_handshakes(n)
                .map_err(|e| range("max_handshakes", e))?;
        }
        if let Some(n) = l.max_handshakes_per_source {
            t.max_handshakes_per_source(n)
                .map_err(|e| range("max_handshakes_per_source", e))?;
        }
        if let Some(d) = l.handshake_timeout {
            if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(60) {
                return Err(invalid(
                    "limits.handshake_timeout",
                    "must be between 1s and 60s",
                ));
            }
            t.handshake_timeout(d);
        }
        if let Some(v) = l.address_validation {
            t.address_validation(v);
        }
        if let Some(d) = l.refusal_window {
            if d > std::time::Duration::from_secs(3600) {
                return Err(invalid("limits.refusal_window", "must be at most 1h"));
            }
            t.refusal_window(d);
        }
        if let Some(n) = l.max_streams {
            t.max_streams(n).map_err(|e| range("max_streams", e))?;
        }
        if let Some(n) = l.max_transfers {
            t.max_transfers(n).map_err(|e| range("max_transfers", e))?;
        }
        if let Some(size) = l.chunk_size {
            let n = u32::try_from(size.as_u64()).unwrap_or(u32::MAX);
            t.chunk_bytes(n).map_err(|e| range("chunk_size", e))?;
            chunk_bytes = n;
        }
        if let Some(d) = l.idle_timeout {
            if d.as_secs() < 5 {
                return Err(invalid("limits.idle_timeout", "must be at least 5s"));
            }
            t.idle_timeout(d);
        }
        if let Some(d) = l.io_timeout {
            if d.as_secs() < 1 {
                return Err(invalid("limits.io_timeout", "must be at least 1s"));
            }
            t.io_timeout(d);
        }
        if let Some(d) = l.max_connection_age {
            if d.as_secs() < 1 {
                return Err(invalid("limits.max_connection_age", "must be at least 1s"));
            }
            t.max_connection_age(d)
                .map_err(|e| range("max_connection_age", e))?;
        }
        if let Some(m) = l.max_mtu {
            t.mtu(1200, m).map_err(|e| range("max_mtu", e))?;
        }
        let mut partials = PartialSpec::default();
        if let Some(q) = &l.partial_quota {
            partials.quota = Share::parse(q).map_err(|e| invalid("limits.partial_quota", &e))?;
        }
        if let Some(q) = &l.partial_quota_per_identity {
            partials.quota_per_identity =
                Share::parse(q).map_err(|e| invalid("limits.partial_quota_per_identity", &e))?;
        }
        if let Some(d) = l.partial_max_age {
            if d < std::time::Duration::from_secs(1) {
                return Err(invalid("limits.partial_max_age", "must be at least 1s"));
            }
            partials.max_age = d;
        }
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let policy = match (&f.policy, rules.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    "policy",
                    "give a policy file or [[allow]] rules, not both",
                ));
            }
            (Some(p), true) => PolicySource::File(abs(&p.file)),
            (None, _) => PolicySource::Inline(
                Policy::new(Vec::new(), rules).map_err(|e| invalid("allow", &e.to_string()))?,
            ),
        };
        let admin = match f.admin.as_ref().map(|a| a.listen.as_str()) {
            None => Some(default_admin()),
            Some("off") => None,
            Some(addr) => Some(addr.parse().map_err(|e| {
                invalid(
                    "admin.listen",
                    &format!("{addr:?}: {e} (give HOST:PORT or \"off\")"),
                )
            })?),
        };
        let mut audit = FileSinkConfig::new(abs(&f.audit.dir));
        if let Some(size) = f.audit.segment_size {
            if size.as_u64() < 64 << 10 {
                return Err(invalid("audit.segment_size", "must be at least 64KiB"));
            }
            audit.segment_max_bytes = size.as_u64();
        }
        if let Some(age) = f.audit.segment_age {
            if age < std::time::Duration::from_secs(60) {
                return Err(invalid("audit.segment_age", "must be at least 1m"));
            }
            audit.segment_max_age = age;
        }
        if let Some(every) = f.audit.checkpoint_interval {
            if every.is_zero() {
                return Err(invalid("audit.checkpoint_interval", "must be more than 0s"));
            }
            audit.checkpoint_interval = every;
        }
        if let Some(bound) = f.audit.write_timeout {
            if bound < std::time::Duration::from_millis(100)
                || bound > std::time::Duration::from_secs(60)
            {
                return Err(invalid("audit.write_timeout", "must be from 100ms to 60s"));
            }
            audit.write_timeout = bound;
        }
        if let Some(fsync) = &f.audit.fsync {
            audit.fsync = libtransport::audit::FsyncSchedule::parse(fsync)
                .map_err(|e| invalid("audit.fsync", &e))?;
        }
        let witness_id = f
            .audit
            .witness_id
            .as_deref()
            .map(|s| SpiffeId::parse(s).map_err(|e| invalid("audit.witness_id", &e.to_string())))
            .transpose()?;
        let witness_lag = f.audit.witness_lag.unwrap_or(DEFAULT_WITNESS_LAG);
        let witness = match (f.audit.witness.as_deref(), f.agent.is_some()) {
            (Some("off"), _) | (None, false) => None,
            (Some("issuer") | None, true) => Some(WitnessTarget {
                addr: None,
                id: witness_id,
                lag: witness_lag,
            }),
            (Some("issuer"), false) => {
                return Err(invalid(
                    "audit.witness",
                    "\"issuer\" needs an [agent] section; give the witness as HOST:PORT, or \"off\"",
                ));
            }
            (Some(addr), _) => Some(WitnessTarget {
                addr: Some(addr.to_owned()),
                id: witness_id,
                lag: witness_lag,
            }),
        };
        let identity = match (&f.identity, &f.agent) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "agent",
                    "give [identity] files or an [agent] section, not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "identity",
                    "give [identity] files (svid, key, bundle) or an [agent] section",
                ));
            }
            (Some(i), None) => IdentitySource::Files(IdentityPaths {
                svid: abs(&i.svid),
                key: abs(&i.key),
                bundle: abs(&i.bundle),
            }),
            (None, Some(a)) => IdentitySource::Agent(agent_config(a, &abs)?),
        };
        let sidecar = match (&f.sidecar, &identity) {
            (None, _) => None,
            (Some(_), IdentitySource::Files(_)) => {
                return Err(invalid(
                    "sidecar",
                    "needs an [agent] section: the sidecar acts with the SVIDs the agent holds for its workloads",
                ));
            }
            (Some(sc), IdentitySource::Agent(a)) => Some(sidecar_config(sc, a, &abs)?),
        };
        let emergency = emergency_config(
            f.emergency.as_ref(),
            f.store.state_dir.as_deref().map(abs),
            &abs(&f.audit.dir),
            &abs,
        )?;
        Ok(Self {
            identity,
            quic: f.listen.quic,
            tcp: f.listen.tcp,
            store_root: abs(&f.store.root),
            state_dir: f.store.state_dir.as_deref().map(abs),
            audit,
            policy,
            admin,
            witness,
            sidecar,
            emergency,
            digest: Digest::of(text.as_bytes()),
            transport: t,
            chunk_bytes,
            max_manifest_builds,
            partials,
        })
    }

    /// Loads the identity files into credentials (`None` when the agent provides them).
    pub(crate) fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        match &self.identity {
            IdentitySource::Files(p) => load_credentials(p).map(Some),
            IdentitySource::Agent(_) => Ok(None),
        }
    }

    /// Checks what `parse` cannot: the files exist and fit together, the store root is a
    /// directory. Returns warnings that do not stop a start.
    pub(crate) fn check(&self, now: std::time::SystemTime) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        match &self.identity {
            IdentitySource::Files(_) => {
                if let Some(creds) = self.credentials()? {
                    let not_after = creds.svid().not_after();
                    if not_after <= now {
                        warnings.push(format!(
                            "identity.svid: expired at {}; peers will refuse it",
                            humantime::format_rfc3339_seconds(not_after)
                        ));
                    }
                }
            }
            IdentitySource::Agent(a) => {
                let text = std::fs::read_to_string(&a.bundle).map_err(|e| {
                    invalid(
                        "agent.bundle",
                        &format!("cannot read {}: {e}", a.bundle.display()),
                    )
                })?;
                certs::TrustBundle::from_pem(&text)
                    .map_err(|e| invalid("agent.bundle", &e.to_string()))?;
            }
        }
        if !self.store_root.is_dir() {
            return Err(invalid(
                "store.root",
                &format!("{} is not a directory", self.store_root.display()),
            ));
        }
        let (policy, _, source) = self.policy.load()?;
        if policy.rules().is_empty() {
            warnings.push(format!(
                "{source}: no rules, so every request will be denied"
            ));
        }
        Ok(warnings)
    }
}

/// Reads the file at `path` and parses it with `parse`, relative paths resolving against
/// the file's directory; a syntax error names the file.
pub(crate) fn load_with<T>(
    path: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|e| match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// Reads an SVID, its key and a bundle from files.
pub(crate) fn load_credentials(p: &IdentityPaths) -> Result<Credentials, ConfigError> {
    let read = |field: &str, path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| invalid(field, &format!("cannot read {}: {e}", path.display())))
    };
    let chain = read("identity.svid", &p.svid)?;
    let key = zeroize::Zeroizing::new(read("identity.key", &p.key)?);
    let bundle = read("identity.bundle", &p.bundle)?;
    let svid = certs::Svid::from_pem(&chain, &key)
        .map_err(|e| invalid("identity.svid", &e.to_string()))?;
    let bundle = certs::TrustBundle::from_pem(&bundle)
        .map_err(|e| invalid("identity.bundle", &e.to_string()))?;
    Credentials::new(svid, bundle).map_err(|e| invalid("identity", &e.to_string()))
}

fn agent_config(
    a: &file::AgentFile,
    abs: &dyn Fn(&Path) -> PathBuf,
) -> Result<AgentConfig, ConfigError> {
    if !a.issuer.contains(':') {
        return Err(invalid("agent.issuer", "give HOST:PORT"));
    }
    let join_token = match (&a.join_token_file, &a.join_token_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "agent",
                "give join_token_file or join_token_env, not both",
            ));
        }
        (Some(p), None) => TokenSource::File(abs(p)),
        (None, Some(v)) => TokenSource::Env(v.clone()),
        (None, None) => TokenSource::Env(crate::env::JOIN_TOKEN.to_owned()),
    };
    Ok(AgentConfig {
        issuer: a.issuer.clone(),
        issuer_id: a.issuer_id.clone(),
        bundle: abs(&a.bundle),
        join_token,
        data_dir: abs(&a.data_dir),
        workload_socket: a.workload_socket.as_deref().map(abs),
    })
}

fn sidecar_config(
    sc: &file::SidecarFile,
    agent: &AgentConfig,
    abs: &dyn Fn(&Path) -> PathBuf,
) -> Result<SidecarConfig, ConfigError> {
    if sc.storage.is_empty() {
        return Err(invalid(
            "sidecar.storage",
            "list at least one storage node, as HOST:PORT",
        ));
    }
    if let Some(bad) = sc.storage.iter().find(|s| !s.contains(':')) {
        return Err(invalid(
            "sidecar.storage",
            &format!("{bad:?}: give HOST:PORT"),
        ));
    }
    let paths = match sc.path.as_deref().unwrap_or("quic") {
        "quic" => vec![libtransport::Path::Quic],
        "tcp" => vec![libtransport::Path::Tcp],
        "auto" => vec![libtransport::Path::Quic, libtransport::Path::Tcp],
        other => {
            return Err(invalid(
                "sidecar.path",
                &format!("{other:?}: give \"quic\", \"tcp\" or \"auto\""),
            ));
        }
    };
    let group = match sc.group.as_deref().map(str::trim) {
        None => None,
        Some("") => return Err(invalid("sidecar.group", "give a group name or number")),
        Some(g) => Some(g.to_owned()),
    };
    let cache_bytes = sc.cache_size.map_or(DEFAULT_SIDECAR_CACHE, |b| b.as_u64());
    let memory_bytes = sc
        .memory_size
        .map_or(DEFAULT_SIDECAR_MEMORY, |b| b.as_u64());
    let max_object = sc
        .max_object
        .map_or(DEFAULT_SIDECAR_MAX_OBJECT, |b| b.as_u64());
    if memory_bytes == 0 || cache_bytes == 0 || max_object == 0 {
        return Err(invalid(
            "sidecar",
            "cache_size, memory_size and max_object must be more than 0",
        ));
    }
    let decision_ttl = sc.decision_ttl.unwrap_or(DEFAULT_DECISION_TTL);
    if decision_ttl > std::time::Duration::from_secs(300) {
        return Err(invalid(
            "sidecar.decision_ttl",
            "at most 5m: a storage node's refusal must reach callers soon",
        ));
    }
    let idle_timeout = sc.idle_timeout.unwrap_or(DEFAULT_SIDECAR_IDLE);
    if idle_timeout < std::time::Duration::from_secs(1) {
        return Err(invalid(
            "sidecar.idle_timeout",
            "at least 1s (clients keep idle connections up to 60s and notice a closed one)",
        ));
    }
    let max_callers = sc.max_callers.unwrap_or(DEFAULT_SIDECAR_CALLERS);
    if !(1..=4096).contains(&max_callers) {
        return Err(invalid(
            "sidecar.max_callers",
            "between 1 and 4096 (each caller is served by a thread of its own)",
        ));
    }
    Ok(SidecarConfig {
        socket: abs(&sc.socket),
        group,
        storage: sc.storage.clone(),
        storage_id: sc.storage_id.clone(),
        paths,
        cache_dir: sc
            .cache_dir
            .as_deref()
            .map_or_else(|| agent.data_dir.join("sidecar-cache"), abs),
        cache_bytes,
        memory_bytes,
        max_object,
        decision_ttl,
        idle_timeout,
        max_callers,
    })
}

fn emergency_config(
    e: Option<&file::EmergencyFile>,
    state_dir: Option<PathBuf>,
    audit_dir: &Path,
    abs: &dyn Fn(&Path) -> PathBuf,
) -> Result<EmergencyConfig, ConfigError> {
    let dir = e
        .and_then(|e| e.dir.as_deref())
        .map(abs)
        .or_else(|| state_dir.map(|d| d.join("emergency")))
        .unwrap_or_else(|| audit_dir.join("emergency"));
    let max_ttl = e
        .and_then(|e| e.max_ttl)
        .unwrap_or(DEFAULT_EMERGENCY_MAX_TTL);
    if !(MIN_EMERGENCY_MAX_TTL..=MAX_EMERGENCY_MAX_TTL).contains(&max_ttl) {
        return Err(invalid(
            "emergency.max_ttl",
            "between 1m and 7d: emergency access must end by itself",
        ));
    }
    let group = match e.and_then(|e| e.group.as_deref()).map(str::trim) {
        None => None,
        Some("") => return Err(invalid("emergency.group", "give a group name or number")),
        Some(g) => Some(g.to_owned()),
    };
    Ok(EmergencyConfig {
        max_ttl,
        require_approval: e.and_then(|e| e.require_approval).unwrap_or(false),
        socket: e
            .and_then(|e| e.socket.as_deref())
            .map_or_else(|| dir.join("admin.sock"), abs),
        socket_named: e.is_some_and(|e| e.socket.is_some()),
        dir,
        group,
    })
}

/// Emergency grants last at most a day unless the file says otherwise; the setting itself
/// is bounded so that no grant can be made to outlast a week.
const DEFAULT_EMERGENCY_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const MIN_EMERGENCY_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const MAX_EMERGENCY_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The sidecar's defaults. Idle connections: twice what clients keep them for.
const DEFAULT_SIDECAR_IDLE: std::time::Duration = std::time::Duration::from_secs(120);
const DEFAULT_SIDECAR_CALLERS: usize = 256;
const DEFAULT_SIDECAR_CACHE: u64 = 64 << 30;
const DEFAULT_SIDECAR_MEMORY: u64 = 4 << 30;
const DEFAULT_SIDECAR_MAX_OBJECT: u64 = 16 << 30;
const DEFAULT_DECISION_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The admin address when the file does not say: loopback only.
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// How long checkpoints may wait for the witness before `/readyz` says so, by default.
const DEFAULT_WITNESS_LAG: std::time::Duration = std::time::Duration::from_secs(300);

fn invalid(field: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new("/etc/transportd"))
    }

    const MINIMAL: &str = r#"
[identity]
svid = "svid.pem"
key = "/keys/svid.key"
bundle = "bundle.pem"
[listen]
quic = "127.0.0.1:7443"
[store]
root = "data"
[audit]
dir = "audit"
"#;

    #[test]
    fn emergency_defaults_follow_the_node_dirs_and_a_ttl_bound_is_itself_bounded() {
        let m = parse(MINIMAL).unwrap().emergency;
        assert_eq!(m.dir, Path::new("/etc/transportd/audit/emergency"));
        assert_eq!(
            m.socket,
            Path::new("/etc/transportd/audit/emergency/admin.sock")
        );
        assert_eq!(m.max_ttl, std::time::Duration::from_secs(24 * 3600));
        assert!(!m.require_approval && m.group.is_none() && !m.socket_named);
        let e = parse(EXAMPLE).unwrap().emergency;
        assert_eq!(e.dir, Path::new("/var/lib/transportd/emergency"));
        let set = format!(
            "{MINIMAL}[emergency]\nmax_ttl = \"4h\"\nrequire_approval = true\n\
             socket = \"/run/td/admin.sock\"\ngroup = \"oncall\"\n"
        );
        let c = parse(&set).unwrap().emergency;
        assert_eq!(c.max_ttl, std::time::Duration::from_secs(4 * 3600));
        assert!(c.require_approval);
        assert_eq!(c.socket, Path::new("/run/td/admin.sock"));
        assert!(c.socket_named);
        assert_eq!(c.group.as_deref(), Some("oncall"));
        for bad in ["30s", "8d"] {
            let e = parse(&format!("{MINIMAL}[emergency]\nmax_ttl = \"{bad}\"\n")).unwrap_err();
            assert!(e.to_string().contains("emergency.max_ttl"), "{e}");
        }
    }

    #[test]
    fn example_parses_and_paths_resolve_against_the_file() {
        let c = parse(EXAMPLE).unwrap();
        assert!(
            matches!(&c.policy, PolicySource::File(p) if p == Path::new("/etc/transportd/policy.toml"))
        );
        assert_eq!(c.admin, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.audit.dir, Path::new("/var/log/transportd/audit"));
        assert_eq!(c.audit.segment_max_bytes, 64 << 20);
        assert_eq!(c.audit.write_timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            c.audit.fsync,
            libtransport::audit::FsyncSchedule::Interval(std::time::Duration::from_secs(1))
        );
        // The example policy is valid too.
        assert_eq!(Policy::parse(POLICY_EXAMPLE).unwrap().rules().len(), 4);
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.audit.dir, Path::new("/etc/transportd/audit"));
        let IdentitySource::Files(ids) = &m.identity else {
            panic!("identity files expected");
        };
        assert_eq!(ids.svid, Path::new("/etc/transportd/svid.pem"));
        assert_eq!(ids.key, Path::new("/keys/svid.key"));
        assert_eq!(m.store_root, Path::new("/etc/transportd/data"));
        assert!(m.tcp.is_none());
    }

    #[test]
    fn the_examples_limits_are_the_defaults() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(
            format!("{:?}", c.transport),
            format!("{:?}", TransportConfig::default())
        );
        assert_eq!(
            c.max_manifest_builds,
            libtransport::store::DEFAULT_MAX_MANIFEST_BUILDS
        );
        assert_eq!(c.partials, PartialSpec::default());
        assert_eq!(parse(MINIMAL).unwrap().partials, PartialSpec::default());
        let l = c.partials.resolve(1 << 40);
        assert_eq!(
            (l.quota_bytes, l.quota_bytes_per_identity, l.max_age),
            (1 << 38, 1 << 37, std::time::Duration::from_secs(86_400))
        );
        let text = format!(
            "{MINIMAL}\n[limits]\npartial_quota = \"10GiB\"\npartial_quota_per_identity = \"50%\"\npartial_max_age = \"2h\"\n"
        );
        let l = parse(&text).unwrap().partials.resolve(1 << 40);
        assert_eq!(
            (l.quota_bytes, l.quota_bytes_per_identity, l.max_age),
            (10 << 30, 1 << 39, std::time::Duration::from_secs(7200))
        );
        let text = format!(
            "{MINIMAL}\n[limits]\nmax_handshakes = 8\nmax_handshakes_per_source = 2\nmax_connections_per_identity = 3\nmax_requests_per_identity = 5\nmax_manifest_builds = 1\nhandshake_timeout = \"3s\"\nrefusal_window = \"5s\"\naddress_validation = \"under_load\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.max_manifest_builds, 1);
        let t = format!("{:?}", c.transport);
        for field in [
            "max_handshakes: 8,",
            "max_handshakes_per_source: 2,",
            "max_connections_per_identity: 3,",
            "max_requests_per_identity: 5,",
            "handshake_timeout: 3s,",
            "refusal_window: 5s,",
            "address_validation: UnderLoad,",
        ] {
            assert!(t.contains(field), "{field}: {t}");
        }
        let t = parse(&format!(
            "{MINIMAL}\n[limits]\nmax_connection_age = \"15m\"\n"
        ))
        .unwrap();
        assert!(
            format!("{:?}", t.transport).contains("max_connection_age: 900s,"),
            "{:?}",
            t.transport
        );
        let t = parse(&format!("{MINIMAL}\n[limits]\nmax_memory = \"256MiB\"\n")).unwrap();
        assert!(format!("{:?}", t.transport).contains("max_memory_bytes: 268435456,"));
        for bad in [
            "max_manifest_builds = 0",
            "max_requests_per_identity = 0",
            "max_memory = \"1MiB\"",
        ] {
            let e = parse(&format!("{MINIMAL}\n[limits]\n{bad}\n")).unwrap_err();
            let field = bad.split(' ').next().unwrap();
            assert!(e.to_string().contains(&format!("limits.{field}")), "{e}");
        }
    }

    #[test]
    fn allow_rules_become_a_default_deny_policy() {
        let text = format!(
            "{MINIMAL}\n[[allow]]\npeer = \"spiffe://td/gpu/a\"\ndataset = \"scans\"\nactions = [\"read\"]\n\n[[allow]]\npeer = \"spiffe://td/gpu/a\"\ndataset = \"ckpt\"\nactions = [\"write\"]\n"
        );
        let c = parse(&text).unwrap();
        let PolicySource::Inline(p) = &c.policy else {
            panic!("inline rules expected");
        };
        use libtransport::policy::{Access, Authorizer};
        let peer = SpiffeId::parse("spiffe://td/gpu/a").unwrap();
        let decide = |action, d: &str| {
            p.decide(&Access {
                peer: &peer,
                action,
                dataset: &libtransport::proto::DatasetName::new(d).unwrap(),
                object: None,
            })
            .is_allow()
        };
        assert!(decide(Action::Read, "scans") && decide(Action::List, "scans"));
        assert!(!decide(Action::Write, "scans"));
        assert!(decide(Action::Write, "ckpt") && !decide(Action::Read, "ckpt"));
        assert!(!decide(Action::Read, "other"));
        // Both a policy file and allow rules: refused.
        let both = format!("{text}\n[policy]\nfile = \"p.toml\"\n");
        assert!(parse(&both).unwrap_err().to_string().starts_with("policy"));
        // The admin endpoint can be moved or turned off, and a bad address is named.
        let off = format!("{MINIMAL}\n[admin]\nlisten = \"off\"\n");
        assert_eq!(parse(&off).unwrap().admin, None);
        let bad = format!("{MINIMAL}\n[admin]\nlisten = \"localhost\"\n");
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("admin.listen")
        );
    }

    #[test]
    fn the_issuer_witnesses_an_agent_nodes_checkpoints_unless_told_otherwise() {
        let files =
            "[identity]\nsvid = \"svid.pem\"\nkey = \"/keys/svid.key\"\nbundle = \"bundle.pem\"\n";
        let agent = "[agent]\nissuer = \"issuer:8443\"\nbundle = \"boot.pem\"\njoin_token_file = \"token\"\ndata_dir = \"agent\"\n";
        let with_agent = MINIMAL.replace(files, agent);
        let w = parse(&with_agent).unwrap().witness.unwrap();
        assert_eq!((w.addr, w.id), (None, None));
        assert_eq!(w.lag, DEFAULT_WITNESS_LAG);
        let audit = |extra: &str| format!("[audit]\ndir = \"audit\"\n{extra}");
        let off = with_agent.replace(&audit(""), &audit("witness = \"off\"\n"));
        assert!(parse(&off).unwrap().witness.is_none());
        // Without an agent, none unless named.
        assert!(parse(MINIMAL).unwrap().witness.is_none());
        let named = MINIMAL.replace(
            &audit(""),
            &audit(
                "witness = \"witness.example:8443\"\nwitness_id = \"spiffe://td/witness\"\nwitness_lag = \"30s\"\n",
            ),
        );
        let w = parse(&named).unwrap().witness.unwrap();
        assert_eq!(w.addr.as_deref(), Some("witness.example:8443"));
        assert_eq!(w.id.unwrap().as_str(), "spiffe://td/witness");
        assert_eq!(w.lag, std::time::Duration::from_secs(30));
        let no_issuer = MINIMAL.replace(&audit(""), &audit("witness = \"issuer\"\n"));
        assert!(
            matches!(parse(&no_issuer), Err(ConfigError::Invalid { field, .. }) if field == "audit.witness")
        );
    }

    #[test]
    fn a_sidecar_needs_an_agent_and_storage_and_takes_its_defaults_from_it() {
        let files =
            "[identity]\nsvid = \"svid.pem\"\nkey = \"/keys/svid.key\"\nbundle = \"bundle.pem\"\n";
        let agent = "[agent]\nissuer = \"issuer:8443\"\nbundle = \"boot.pem\"\njoin_token_file = \"token\"\ndata_dir = \"agent\"\n";
        let sidecar = |extra: &str| {
            format!(
                "\n[sidecar]\nsocket = \"run/data.sock\"\nstorage = [\"storage:7443\"]\n{extra}"
            )
        };
        let with_agent = MINIMAL.replace(files, agent);
        let c = parse(&format!("{with_agent}{}", sidecar(""))).unwrap();
        let sc = c.sidecar.unwrap();
        assert_eq!(sc.socket, Path::new("/etc/transportd/run/data.sock"));
        assert_eq!(
            sc.cache_dir,
            Path::new("/etc/transportd/agent/sidecar-cache")
        );
        assert_eq!(sc.paths, vec![libtransport::Path::Quic]);
        assert_eq!(sc.decision_ttl, DEFAULT_DECISION_TTL);
        assert_eq!((sc.group, sc.cache_bytes), (None, DEFAULT_SIDECAR_CACHE));
        assert_eq!(
            (sc.idle_timeout, sc.max_callers),
            (DEFAULT_SIDECAR_IDLE, DEFAULT_SIDECAR_CALLERS)
        );
        let sc = parse(&format!(
            "{with_agent}{}",
            sidecar(
                "group = \"0\"\npath = \"auto\"\ndecision_ttl = \"0s\"\ncache_size = \"1GiB\"\n\
                 idle_timeout = \"5s\"\nmax_callers = 3\n"
            )
        ))
        .unwrap()
        .sidecar
        .unwrap();
        assert_eq!(sc.group.as_deref(), Some("0"));
        assert_eq!(sc.paths.len(), 2);
        assert!(sc.decision_ttl.is_zero());
        assert_eq!(sc.cache_bytes, 1 << 30);
        assert_eq!(
            (sc.idle_timeout, sc.max_callers),
            (std::time::Duration::from_secs(5), 3)
        );
        // Refused: without an agent, without storage, with a bad path, an empty group, a long
        // TTL, a sub-second idle timeout, no callers or too many.
        for (text, field) in [
            (format!("{MINIMAL}{}", sidecar("")), "sidecar"),
            (
                format!("{with_agent}\n[sidecar]\nsocket = \"s\"\nstorage = []\n"),
                "sidecar.storage",
            ),
            (
                format!("{with_agent}\n[sidecar]\nsocket = \"s\"\nstorage = [\"storage\"]\n"),
                "sidecar.storage",
            ),
            (
                format!("{with_agent}{}", sidecar("path = \"udp\"\n")),
                "sidecar.path",
            ),
            (
                format!("{with_agent}{}", sidecar("group = \" \"\n")),
                "sidecar.group",
            ),
            (
                format!("{with_agent}{}", sidecar("decision_ttl = \"1h\"\n")),
                "sidecar.decision_ttl",
            ),
            (
                format!("{with_agent}{}", sidecar("idle_timeout = \"0s\"\n")),
                "sidecar.idle_timeout",
            ),
            (
                format!("{with_agent}{}", sidecar("max_callers = 0\n")),
                "sidecar.max_callers",
            ),
            (
                format!("{with_agent}{}", sidecar("max_callers = 5000\n")),
                "sidecar.max_callers",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn an_agent_section_replaces_identity_files() {
        let files =
            "[identity]\nsvid = \"svid.pem\"\nkey = \"/keys/svid.key\"\nbundle = \"bundle.pem\"\n";
        let agent = "[agent]\nissuer = \"issuer:8443\"\nbundle = \"boot.pem\"\njoin_token_file = \"token\"\ndata_dir = \"agent\"\nworkload_socket = \"/run/w.sock\"\n";
        let with_agent = MINIMAL.replace(files, agent);
        let c = parse(&with_agent).unwrap();
        let IdentitySource::Agent(a) = &c.identity else {
            panic!("agent expected");
        };
        assert_eq!(a.bundle, Path::new("/etc/transportd/boot.pem"));
        assert_eq!(a.data_dir, Path::new("/etc/transportd/agent"));
        assert_eq!(
            a.join_token,
            TokenSource::File(PathBuf::from("/etc/transportd/token"))
        );
        assert_eq!(a.workload_socket.as_deref(), Some(Path::new("/run/w.sock")));
        assert!(a.issuer_id.is_none());
        // The token from the environment by default.
        let env_token = with_agent.replace("join_token_file = \"token\"\n", "");
        let IdentitySource::Agent(a) = parse(&env_token).unwrap().identity else {
            panic!("agent expected");
        };
        assert_eq!(
            a.join_token,
            TokenSource::Env("TRANSPORTD_JOIN_TOKEN".into())
        );
        // Both, or neither: refused, naming the field.
        let both = format!("{agent}{MINIMAL}");
        assert!(parse(&both).unwrap_err().to_string().starts_with("agent"));
        let neither = MINIMAL.replace(files, "");
        assert!(
            parse(&neither)
                .unwrap_err()
                .to_string()
                .starts_with("identity")
        );
        let bad = with_agent.replace("issuer:8443", "issuer");
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("agent.issuer")
        );
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let text = MINIMAL.replace("[audit]", "[audit]\nfiel = \"x\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("unknown field `fiel`"), "{e}");
        let text = format!("{MINIMAL}\n[limits]\nmax_stream = 3\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("max_stream"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (MINIMAL.replace("quic = \"127.0.0.1:7443\"", ""), "listen"),
            (
                format!("{MINIMAL}\n[limits]\nmax_streams = 0\n"),
                "limits.max_streams",
            ),
            (
                format!("{MINIMAL}\n[limits]\nchunk_size = \"3MB\"\n"),
                "limits.chunk_size",
            ),
            (
                format!("{MINIMAL}\n[limits]\nmax_handshakes_per_source = 0\n"),
                "limits.max_handshakes_per_source",
            ),
            (
                format!("{MINIMAL}\n[limits]\nhandshake_timeout = \"0s\"\n"),
                "limits.handshake_timeout",
            ),
            (
                format!("{MINIMAL}\n[limits]\nrefusal_window = \"2h\"\n"),
                "limits.refusal_window",
            ),
            (
                format!("{MINIMAL}\n[limits]\npartial_quota = \"150%\"\n"),
                "limits.partial_quota",
            ),
            (
                format!("{MINIMAL}\n[limits]\npartial_quota_per_identity = \"lots\"\n"),
                "limits.partial_quota_per_identity",
            ),
            (
                format!("{MINIMAL}\n[limits]\npartial_max_age = \"0s\"\n"),
                "limits.partial_max_age",
            ),
            (
                format!("{MINIMAL}\n[limits]\nmax_connection_age = \"0s\"\n"),
                "limits.max_connection_age",
            ),
            (
                format!("{MINIMAL}\n[limits]\nmax_connection_age = \"500ms\"\n"),
                "limits.max_connection_age",
            ),
            (
                format!(
                    "{MINIMAL}\n[[allow]]\npeer = \"spiffe://td/x\"\ndataset = \"d\"\nactions = []\n"
                ),
                "allow[0].actions",
            ),
            (
                MINIMAL.replace(
                    "dir = \"audit\"",
                    "dir = \"audit\"\nsegment_size = \"1KiB\"",
                ),
                "audit.segment_size",
            ),
            (
                MINIMAL.replace("dir = \"audit\"", "dir = \"audit\"\nfsync = \"sometimes\""),
                "audit.fsync",
            ),
            (
                MINIMAL.replace("dir = \"audit\"", "dir = \"audit\"\nwrite_timeout = \"0s\""),
                "audit.write_timeout",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        // Values with their own syntax: the TOML error points at the line.
        let bad_id = format!(
            "{MINIMAL}\n[[allow]]\npeer = \"spiffe://td/a/../b\"\ndataset = \"d\"\nactions = [\"read\"]\n"
        );
        let e = parse(&bad_id).unwrap_err().to_string();
        assert!(e.contains("peer") || e.contains("'.' or '..'"), "{e}");
        let bad_action = format!(
            "{MINIMAL}\n[[allow]]\npeer = \"spiffe://td/a\"\ndataset = \"d\"\nactions = [\"delete\"]\n"
        );
        let e = parse(&bad_action).unwrap_err().to_string();
        assert!(e.contains("delete"), "{e}");
    }
}
