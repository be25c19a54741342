//! The rules every X.509-SVID we issue follows, and what issuance returns.
//!
//! An SVID carries exactly one URI SAN (its SPIFFE ID), `CA:false`, a critical key usage of
//! digitalSignature only, and the extended key usages serverAuth and clientAuth, so the same
//! SVID serves both TLS sides. Its lifetime is the requested TTL (1 hour by default),
//! never past the CA's own expiry.

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use crate::{IdError, SpiffeId};

/// How an SVID is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueParams {
    /// Lifetime from issuance; cut short at the CA's expiry.
    pub ttl: Duration,
}

impl Default for IssueParams {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_SVID_TTL,
        }
    }
}

/// A freshly issued X.509-SVID: the certificate chain, leaf first (the private key stays
/// with whoever made the CSR).
#[derive(Clone)]
pub struct Issued {
    /// The SPIFFE ID certified.
    pub id: SpiffeId,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Leaf, then any intermediates up to (not including) the trust anchor.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Issued {
    /// The chain as PEM, leaf first: what a node keeps as `svid.pem`.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pem_encode("CERTIFICATE", c))
            .collect()
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

/// Why a CA could not be made or loaded, or an SVID not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The ID to certify belongs to another trust domain than the CA's.
    #[error("{id} is not in trust domain {trust_domain} of this CA")]
    ForeignId {
        /// The ID asked for.
        id: SpiffeId,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The ID to certify is the trust domain itself, which names the CA, not a workload.
    #[error("{0} names the trust domain itself; an SVID needs a path such as /node/gpu-0")]
    NoPath(SpiffeId),
    /// The CSR names another SPIFFE ID than the one to certify.
    #[error("the request asks for {requested} but {id} was to be certified")]
    IdMismatch {
        /// What the CSR asks for.
        requested: SpiffeId,
        /// What was to be certified.
        id: SpiffeId,
    },
    /// The CSR names a URI that is not a valid SPIFFE ID.
    #[error("the request names an invalid SPIFFE ID: {0}")]
    RequestedId(IdError),
    /// The CSR could not be parsed or its signature does not verify.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// The CA has expired (or is not valid yet) at the time of issuance.
    #[error("the CA is not valid now (valid until {not_after:?}); create or activate another")]
    CaExpired {
        /// The CA's expiry.
        not_after: SystemTime,
    },
    /// The TTL asked for is zero or too long.
    #[error("TTL {0:?} is out of range; give between 1 second and 1 year")]
    Ttl(Duration),
    /// The CA certificate or key could not be read.
    #[error("CA: {0}")]
    Ca(String),
    /// Key generation or signing failed.
    #[error("cryptography: {0}")]
    Crypto(String),
}

/// Default SVID lifetime. Short enough that a stolen key is soon worthless; rotation renews
/// at half-life.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);

/// Longest SVID lifetime we issue.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Certificates start this much before issuance, to tolerate small clock differences between
/// nodes (as SPIRE does).
pub(crate) const BACKDATE: Duration = Duration::from_secs(10);
