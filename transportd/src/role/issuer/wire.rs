//! The JSON bodies of the issuer's two HTTP/1.1 interfaces: the agent API (over TLS 1.3,
//! node agents) and the admin API (a local Unix socket, the `transportd issuer ...`
//! commands). Certificates and keys travel as PEM; only CSRs ever leave a node, never a
//! private key.

use certs::{RegistrationEntry, Selector, SpiffeId};
use libtransport::audit::{Receipt, WitnessedCheckpoint};
use serde::{Deserialize, Serialize};

/// ALPN of the agent API.
pub(crate) const AGENT_ALPN: &[u8] = b"transportd-issuer/1";

/// Largest request or response body either side reads.
pub(crate) const MAX_BODY_BYTES: usize = 256 << 10;

// Agent API.

/// `POST /v1/attest`, without a client certificate: a node's first contact.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AttestRequest {
    /// The join token's secret.
    pub(crate) join_token: String,
    /// A CSR for the node's SVID (PEM).
    pub(crate) csr: String,
}

/// `POST /v1/renew`, with the node's current SVID as client certificate.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenewRequest {
    /// A CSR for the node's next SVID (a fresh key).
    pub(crate) csr: String,
}

/// The answer to attest and renew.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeSvid {
    /// The node's SPIFFE ID.
    pub(crate) id: SpiffeId,
    /// Its SVID chain, leaf first (PEM).
    pub(crate) svid: String,
    /// The trust bundle (PEM).
    pub(crate) bundle: String,
    /// How often to sync, in seconds.
    pub(crate) sync_interval_secs: u64,
}

/// The answer to `POST /v1/sync`: what a node must know now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Sync {
    /// The trust bundle (PEM): every CA peers may be signed by.
    pub(crate) bundle: String,
    /// Serials of SVIDs revoked before their expiry.
    pub(crate) revoked: Vec<String>,
    /// The registration entries this node may hand out.
    pub(crate) entries: Vec<RegistrationEntry>,
}

/// `POST /v1/workload`: an SVID for one of the node's entries.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadRequest {
    /// The entry's ID.
    pub(crate) entry: String,
    /// A CSR for the workload's SVID, made by the agent.
    pub(crate) csr: String,
}

/// The answer to a workload request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadSvid {
    /// The SVID chain (PEM).
    pub(crate) svid: String,
}

/// `POST /v1/witness`: checkpoints of the caller's audit trail, for the issuer to witness.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WitnessRequest {
    /// Oldest first.
    pub(crate) checkpoints: Vec<WitnessedCheckpoint>,
}

/// The answer to a witness request.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WitnessAnswer {
    /// Countersignatures of the checkpoints taken (or held already).
    pub(crate) receipts: Vec<Receipt>,
    /// Checkpoints refused, and why.
    pub(crate) refused: Vec<WitnessRefused>,
}

/// A checkpoint the witness refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WitnessRefused {
    /// Its seq.
    pub(crate) seq: u64,
    /// Why.
    pub(crate) reason: String,
}

/// Most checkpoints one witness request may carry.
pub(crate) const MAX_WITNESS_BATCH: usize = 256;

// Admin API.

/// `POST /v1/tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenCreate {
    /// The node ID the token grants.
    pub(crate) node: SpiffeId,
    /// Seconds until it expires.
    pub(crate) ttl_secs: u64,
}

/// A created token: the secret is shown this once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenCreated {
    /// The secret to hand to the node.
    pub(crate) token: String,
    /// The node ID.
    pub(crate) node: SpiffeId,
    /// RFC 3339.
    pub(crate) expires_at: String,
}

/// `POST /v1/entries`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EntryCreate {
    /// The workload ID to grant.
    pub(crate) spiffe_id: SpiffeId,
    /// The node whose agent hands it out.
    pub(crate) parent_id: SpiffeId,
    /// All must hold.
    pub(crate) selectors: Vec<Selector>,
    /// SVID lifetime for this entry, seconds; the issuer's default if absent.
    pub(crate) ttl_secs: Option<u64>,
}

/// `POST /v1/nodes/ban`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ban {
    /// The node.
    pub(crate) node: SpiffeId,
}

/// What a ban did.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Banned {
    /// The node.
    pub(crate) node: SpiffeId,
    /// Serials revoked with it.
    pub(crate) revoked: Vec<String>,
}

/// `POST /v1/witness/export`: the receipts held for a node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WitnessExport {
    /// The node.
    pub(crate) node: SpiffeId,
}

/// `POST /v1/ca/{prepare,activate,retire}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaStep {
    /// Retire although SVIDs signed by the CA are still valid (they stop working).
    #[serde(default)]
    pub(crate) force: bool,
}

/// A CA, as the admin API reports it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaInfo {
    /// Certificate serial (hex).
    pub(crate) serial: String,
    /// prepared, active, previous, retired.
    pub(crate) state: String,
    /// RFC 3339.
    pub(crate) not_after: String,
    /// Valid SVIDs it signed.
    pub(crate) live_svids: u64,
}

/// An error either API answers with (and an HTTP status).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub(crate) error: String,
}
