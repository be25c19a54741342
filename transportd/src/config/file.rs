//! The node configuration file as TOML: the shape only. Unknown fields are refused, so a
//! typo never silently falls back to a default. `config.rs` turns this into validated
//! library configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use certs::SpiffeId;
use libtransport::proto::DatasetName;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) identity: IdentityFile,
    pub(crate) listen: ListenFile,
    pub(crate) store: StoreFile,
    pub(crate) audit: AuditFile,
    #[serde(default)]
    pub(crate) allow: Vec<AllowFile>,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
}

/// Where the node's SVID, key and trust bundle are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityFile {
    pub(crate) svid: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) bundle: PathBuf,
}

/// Addresses to serve on; at least one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenFile {
    pub(crate) quic: Option<SocketAddr>,
    pub(crate) tcp: Option<SocketAddr>,
}

/// The datasets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreFile {
    pub(crate) root: PathBuf,
    pub(crate) state_dir: Option<PathBuf>,
}

/// The audit trail.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditFile {
    pub(crate) file: PathBuf,
}

/// One access grant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AllowFile {
    pub(crate) peer: SpiffeId,
    pub(crate) dataset: DatasetName,
    pub(crate) actions: Vec<ActionFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ActionFile {
    Read,
    Write,
}

/// Tuning knobs; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    pub(crate) max_connections: Option<u32>,
    pub(crate) max_streams: Option<u32>,
    pub(crate) max_transfers: Option<u32>,
    pub(crate) chunk_size: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) idle_timeout: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) io_timeout: Option<std::time::Duration>,
    pub(crate) max_mtu: Option<u16>,
}

/// Durations written as "60s", "5m" (humantime).
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// An annotated example, printed by `transportd config example` and checked by a test.
pub(crate) const EXAMPLE: &str = r#"# transportd node configuration. Relative paths are relative to this file.

[identity]
svid = "svid.pem"          # our X.509-SVID, certificate chain with the leaf first
key = "svid.key"           # its private key (keep it mode 0600)
bundle = "bundle.pem"      # CA certificates of our trust domain

[listen]                   # at least one of the two
quic = "0.0.0.0:7443"      # QUIC with mutual TLS 1.3 (UDP)
tcp = "0.0.0.0:7443"       # TLS 1.3 over TCP, for networks that block UDP

[store]
root = "/srv/transportd/datasets"   # each subdirectory is a dataset
state_dir = "/var/lib/transportd"   # optional: keeps object manifests across restarts

[audit]
file = "/var/log/transportd/audit.jsonl"   # one JSON record per connection and transfer

# Access is denied unless a rule allows it. Listing a dataset comes with either action.
[[allow]]
peer = "spiffe://hospital.example/gpu/loader-0"
dataset = "ct-scans"
actions = ["read"]

[[allow]]
peer = "spiffe://hospital.example/gpu/trainer-0"
dataset = "checkpoints"
actions = ["read", "write"]

[limits]                   # optional; these are the defaults
max_connections = 1024
max_streams = 64           # requests in flight per connection
max_transfers = 64         # open transfers per connection
chunk_size = "4MiB"        # chunk size of manifests this node builds
idle_timeout = "60s"       # longest silence a connection survives
io_timeout = "60s"         # longest a stream may make no progress
max_mtu = 1452             # QUIC path-MTU ceiling; raise on jumbo-frame networks
"#;
