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
    pub(crate) identity: Option<IdentityFile>,
    pub(crate) agent: Option<AgentFile>,
    pub(crate) listen: ListenFile,
    pub(crate) store: StoreFile,
    pub(crate) audit: AuditFile,
    pub(crate) policy: Option<PolicyFile>,
    #[serde(default)]
    pub(crate) allow: Vec<AllowFile>,
    pub(crate) admin: Option<AdminFile>,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
    pub(crate) rdma: Option<RdmaFile>,
    pub(crate) sidecar: Option<SidecarFile>,
    pub(crate) emergency: Option<EmergencyFile>,
}

/// Emergency (break-glass) grants and the node's admin socket that gives them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmergencyFile {
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) max_ttl: Option<std::time::Duration>,
    pub(crate) require_approval: Option<bool>,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) group: Option<String>,
}

/// The sidecar's local data API (needs `[agent]`: it acts with its workloads' SVIDs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SidecarFile {
    pub(crate) socket: PathBuf,
    pub(crate) group: Option<String>,
    pub(crate) storage: Vec<String>,
    pub(crate) storage_id: Option<SpiffeId>,
    pub(crate) path: Option<String>,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) cache_size: Option<bytesize::ByteSize>,
    pub(crate) memory_size: Option<bytesize::ByteSize>,
    pub(crate) max_object: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) decision_ttl: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) idle_timeout: Option<std::time::Duration>,
    pub(crate) max_callers: Option<usize>,
}

/// Whether transfers may move by RDMA.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RdmaFile {
    pub(crate) mode: libtransport::RdmaMode,
}

/// Where the node's SVID, key and trust bundle are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityFile {
    pub(crate) svid: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) bundle: PathBuf,
}

/// The node agent: identity from the issuer instead of files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentFile {
    pub(crate) issuer: String,
    pub(crate) issuer_id: Option<SpiffeId>,
    pub(crate) bundle: PathBuf,
    pub(crate) join_token_file: Option<PathBuf>,
    pub(crate) join_token_env: Option<String>,
    pub(crate) data_dir: PathBuf,
    pub(crate) workload_socket: Option<PathBuf>,
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
    pub(crate) dir: PathBuf,
    pub(crate) segment_size: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) segment_age: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) checkpoint_interval: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) write_timeout: Option<std::time::Duration>,
    pub(crate) fsync: Option<String>,
    pub(crate) witness: Option<String>,
    pub(crate) witness_id: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) witness_lag: Option<std::time::Duration>,
}

/// The access policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub(crate) file: PathBuf,
}

/// The admin endpoint: metrics and health.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    pub(crate) listen: String,
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
    pub(crate) max_connections_per_identity: Option<u32>,
    pub(crate) max_requests_per_identity: Option<u32>,
    pub(crate) max_manifest_builds: Option<u32>,
    pub(crate) max_handshakes: Option<u32>,
    pub(crate) max_handshakes_per_source: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) handshake_timeout: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) refusal_window: Option<std::time::Duration>,
    pub(crate) address_validation: Option<libtransport::AddressValidation>,
    pub(crate) max_streams: Option<u32>,
    pub(crate) max_transfers: Option<u32>,
    pub(crate) chunk_size: Option<bytesize::ByteSize>,
    pub(crate) max_memory: Option<bytesize::ByteSize>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) idle_timeout: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) io_timeout: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) max_connection_age: Option<std::time::Duration>,
    pub(crate) max_mtu: Option<u16>,
    pub(crate) partial_quota: Option<String>,
    pub(crate) partial_quota_per_identity: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    pub(crate) partial_max_age: Option<std::time::Duration>,
}

/// Durations written as "60s", "5m" (humantime).
pub(super) mod humantime_serde_opt {
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

# The node's identity: from an issuer (`transportd issuer`), renewed automatically ...
# [agent]
# issuer = "issuer.hospital.example:8443"   # the issuer's agent API
# bundle = "bootstrap-bundle.pem"   # authenticates the issuer at first contact
# join_token_file = "join-token"    # single use, from `transportd issuer token create`;
#                                   # or join_token_env = "TRANSPORTD_JOIN_TOKEN"
# data_dir = "/var/lib/transportd/agent"   # keeps the node SVID (mode 0600) across restarts
# workload_socket = "/run/transportd/workload.sock"   # SPIFFE Workload API for local workloads
#
# The sidecar: a local data API for training processes on this node (needs [agent]).
# Callers are attested as the Workload API attests them; the node fetches for each with that
# caller's own workload SVID, keeps one encrypted cache for all, and hands objects over as
# sealed read-only memory files.
# [sidecar]
# socket = "/run/transportd/data.sock"   # mode 0660
# group = "train"                        # optional: the socket's group (name or number)
# storage = ["storage-1.hospital.example:7443"]   # storage nodes; requests name one, the
#                                        # first is the default
# storage_id = "spiffe://hospital.example/storage/1"   # optional: insist on this server ID
# path = "quic"                          # quic, tcp or auto (QUIC, then TLS/TCP)
# cache_dir = "/var/lib/transportd/sidecar-cache"   # default: <agent data_dir>/sidecar-cache;
#                                        # AES-256-GCM sealed, key in memory only
# cache_size = "64GiB"                   # sealed bytes on disk at most
# memory_size = "4GiB"                   # objects held open in memory for hand-off, and
#                                        # being fetched, at most (a larger one is handed
#                                        # over, not kept)
# max_object = "16GiB"                   # larger objects are refused (read ranges instead)
# decision_ttl = "30s"                   # reuse a storage node's yes for this long (0s: never)
# idle_timeout = "2m"                    # close local connections idle this long
# max_callers = 256                      # local callers served at once; more get `busy`
# ... or from files you renew yourself (not both):
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

[audit]                    # hash-chained, signed, never deleted by the daemon
dir = "/var/log/transportd/audit"
segment_size = "64MiB"     # optional: a segment is sealed at this size
segment_age = "1d"         # optional: ... or at this age
checkpoint_interval = "10s"  # optional: a signed checkpoint at most this long after records
fsync = "1s"               # optional: when records reach the disk for sure: "record" (before
                           # each is acknowledged; the trail loses nothing acknowledged in a
                           # power cut), a duration (at most this long after a record: a power
                           # cut loses at most that much), or "checkpoint" (with each signed
                           # checkpoint). A loss is recorded at the next start (unclean_stop)
write_timeout = "2s"       # optional: longest a request waits for its audit record to be
                           # written (100ms to 60s); past it, or while the trail's disk fails
                           # or hangs, new transfers are refused (audit unavailable) until
                           # the disk answers again, and the stall is recorded (audit_stalled)
witness = "off"            # optional: who else keeps each checkpoint, append-only, and
                           # countersigns it, so a trail rebuilt on this node is caught
                           # (`audit verify --witness`): "issuer" (the default with
                           # [agent]), HOST:PORT of an issuer's agent API, or "off"
#witness_id = "spiffe://hospital.example/issuer"  # optional: that witness's SPIFFE ID
witness_lag = "5m"         # optional: /readyz says so when checkpoints wait longer

# Who may do what: a policy file (see `transportd policy example`) ...
[policy]
file = "policy.toml"
# ... or, for a simple node, allow rules right here (not both). Either way, anything not
# allowed is denied; listing a dataset comes with either action.
# [[allow]]
# peer = "spiffe://hospital.example/gpu/loader-0"
# dataset = "ct-scans"
# actions = ["read"]

[admin]                    # optional; this is the default
listen = "127.0.0.1:9464"  # /metrics (Prometheus), /healthz, /readyz; "off" to disable

[emergency]                # optional; these are the defaults. Break-glass grants, given with
                           # `transportd policy grant --emergency` (see its --help) on this
                           # node's admin socket: one peer, one dataset, read (and --write),
                           # for a TTL, over the policy (deny rules too); audited at grant,
                           # every use and expiry
max_ttl = "24h"            # longest TTL a grant may have (1m to 7d); longer ones are refused
require_approval = false   # true: a grant allows nothing until a second operator (another
                           # uid) runs `transportd policy approve ID`
#dir = "/var/lib/transportd/emergency"  # active grants, kept across restarts; default:
                           # <store.state_dir>/emergency, or <audit.dir>/emergency
#socket = "/var/lib/transportd/emergency/admin.sock"  # default: <dir>/admin.sock (skipped,
                           # with a warning, if that path is too long for a Unix socket);
                           # mode 0600 (the node's user and root), or 0660 with group
#group = "oncall"          # optional: operators of this group may use the socket too

[rdma]                     # optional; this is the default
mode = "auto"              # "auto": RDMA when both sides have a device (build feature `rdma`),
                           # else QUIC; "soft": the software device (labs, benchmarks);
                           # "off": never. Chunks are sealed with AES-256-GCM either way.

[limits]                   # optional; these are the defaults
max_connections = 1024     # authenticated connections at once; more are told "busy"
max_connections_per_identity = 256  # of those, how many one SPIFFE ID may hold
max_requests_per_identity = 1024    # requests one SPIFFE ID may have in flight across its
                           # connections; more are told "busy" (transportd_requests_busy_total)
max_manifest_builds = 4    # manifests computed at once (each reads and hashes a whole object
                           # the first time it is asked for); more requests wait their turn
max_memory = "1GiB"        # object bytes held in memory to send, across all connections (at
                           # least 16MiB; one SPIFFE ID may hold a quarter of it): reads past
                           # it wait. Besides it, each connection's TLS layer holds up to
                           # 4MiB, and QUIC what its peer has not yet acknowledged
max_handshakes = 256       # handshakes of peers not yet authenticated, a budget apart from
                           # max_connections: attempts past it are closed at once, before any
                           # TLS work, and only counted (transportd_handshakes_shed_total),
                           # not audited one by one
max_handshakes_per_source = 64     # of those, how many one IPv4 address or IPv6 /64 may hold
                           # (QUIC attempts from addresses not yet proven count apart, and
                           # past it are asked to Retry rather than refused)
handshake_timeout = "10s"  # longest a handshake may take, and hold its place (1s to 60s)
address_validation = "always"  # QUIC clients prove their address (a Retry: one round
                           # trip more per new connection) before any handshake work, so
                           # replies to a spoofed source stay within RFC 9000's 3x of what it
                           # sent; "under_load": only once half of max_handshakes is in use
                           # (or the source's share is), saving the round trip at the cost
                           # of that limit (quinn may send one datagram past it)
refusal_window = "60s"     # handshakes refused before the peer is authenticated (timed out,
                           # certificate, ALPN): of those from one source, over one transport
                           # and of one kind, the first in each window is audited on its own
                           # (connection_refused, with its reason) and the rest are counted
                           # into one connections_refused record when the window ends, so an
                           # unauthenticated sender cannot flood the trail and no refusal
                           # goes unrecorded; "0s" audits each one on its own (at most 1h)
max_streams = 64           # requests in flight per connection
max_transfers = 64         # open transfers per connection
chunk_size = "4MiB"        # chunk size of manifests this node builds
idle_timeout = "60s"       # longest silence a connection survives
io_timeout = "60s"         # longest a stream may make no progress
max_connection_age = "1h"  # automatic logoff: a connection is retired at this age (at
                           # least 1s; never later than the lifetime of this node's SVID).
                           # The node takes no new requests on it, gives those in flight
                           # 30s, closes it and audits connection_closed (reason "max
                           # age"; transportd_connections_aged_out_total); clients go on
                           # over a fresh handshake, transfers from their verified chunks
                           # (clients also renew their own at their maximum age, 1h by
                           # default)
max_mtu = 1452             # QUIC path-MTU ceiling; raise on jumbo-frame networks
partial_quota = "25%"      # what the partial files of pushes being received may claim
                           # together, counted by their manifests' sizes (what a finished
                           # push takes): a size ("200GiB") or a share of the file system
                           # holding store.root. A push that would go past it is refused up
                           # front: "no space" while other pushes hold the room, "too
                           # large" if it could never fit
partial_quota_per_identity = "12.5%"  # of that, what one SPIFFE ID's pushes may claim
partial_max_age = "24h"    # a partial file no push has touched for this long is removed
                           # (at start, then checked every second; never while a push has
                           # it open; each removal is audited as partial_removed); an
                           # interrupted push can resume until then
"#;

/// An annotated example policy, printed by `transportd policy example`.
pub(crate) const POLICY_EXAMPLE: &str = r#"# transportd access policy. Default deny: a request is allowed only if an allow rule
# matches it and no deny rule does (deny rules win, whatever their order).

# Data classes: phi, deidentified, public. The first declaration that matches a dataset
# gives its class.
[[dataset]]
name = "ct-*"
class = "phi"

[[dataset]]
name = "imagenet"
class = "public"

# Subjects: an exact SPIFFE ID, everything below a path ("spiffe://td/gpu/*"), or "*".
# Datasets and objects: names or globs ("*" stays within one directory, "**" crosses them).
# Actions: list, read, write. A rule with objects covers only requests naming a matching
# object (listing a dataset needs a rule without objects).
[[rule]]
name = "GPU loaders list and read training data"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["ct-*", "imagenet"]
objects = ["train/**"]
actions = ["read"]

[[rule]]
name = "GPU loaders list datasets"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["*"]
actions = ["list"]

[[rule]]
name = "PHI stays with the PHI workloads"
effect = "deny"
subjects = ["*"]
except = ["spiffe://hospital.example/gpu/phi/*"]
classes = ["phi"]
datasets = ["*"]
actions = ["list", "read", "write"]

[[rule]]
name = "trainers write checkpoints"
subjects = ["spiffe://hospital.example/gpu/phi/trainer-0"]
datasets = ["checkpoints"]
actions = ["list", "read", "write"]
"#;
