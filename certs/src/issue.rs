//! The rules every X.509-SVID we issue follows, and what issuance returns.
//!
//! An SVID carries exactly one URI SAN (its SPIFFE ID), `CA:false`, a critical key usage of
//! digitalSignature only, and the extended key usages serverAuth and clientAuth, so the same
//! SVID serves both TLS sides. Its lifetime is the requested TTL (1 hour by default),
//! never past the CA's own expiry.

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use crate::key::MAX_CSR_BYTES;
use crate::svid::PemError;
use crate::{IdError, SpiffeId, SvidError};

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
    Csr(#[from] CsrError),
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
    Ca(#[from] CaError),
    /// Key generation or signing failed.
    #[error("cryptography: {0}")]
    Crypto(#[from] CryptoError),
}

/// Why a certificate signing request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The request is longer than we accept (its length).
    #[error("request is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    /// No PEM certificate request could be read.
    #[error("no PEM certificate request found: {0}")]
    Pem(#[source] PemError),
    /// The bytes are not a DER PKCS#10 request.
    #[error("not a PKCS#10 request: {0}")]
    Der(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// Bytes follow the request's DER.
    #[error("trailing bytes after the request")]
    TrailingBytes,
    /// The request's signature does not verify with the public key it carries.
    #[error("signature does not verify with the key it carries")]
    BadSignature,
    /// The request names more than one URI (how many).
    #[error("request names {0} URIs; an SVID carries exactly one")]
    UriCount(usize),
    /// The request's public key cannot be used.
    #[error("public key: {0}")]
    PublicKey(#[source] rcgen::Error),
}

/// Why a CA (or a key sealed under a passphrase) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// No PEM certificate could be read.
    #[error("no PEM certificate found: {0}")]
    CertPem(#[source] PemError),
    /// The certificate is not a CA certificate of a trust domain.
    #[error("{0}")]
    Cert(#[source] SvidError),
    /// The private key could not be read.
    #[error("private key: {0}")]
    Key(#[source] rcgen::Error),
    /// The private key does not belong to the CA certificate.
    #[error("the private key does not belong to the CA certificate")]
    KeyMismatch,
    /// The certificate and key cannot make an issuer.
    #[error("{0}")]
    Issuer(#[source] rcgen::Error),
    /// An empty passphrase was given to seal a key.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// The key to seal is not PEM.
    #[error("private key PEM: {0}")]
    KeyPem(#[source] pkcs8::der::Error),
    /// The key to seal is PEM of another kind than `PRIVATE KEY` (the label found).
    #[error("expected a PKCS#8 PRIVATE KEY, found {0}")]
    NotPkcs8(String),
    /// The key to seal is not a PKCS#8 private key.
    #[error("private key: {0}")]
    KeyDer(#[source] pkcs8::der::Error),
    /// The sealed key is not PEM.
    #[error("encrypted key PEM: {0}")]
    EncryptedPem(#[source] pkcs8::der::Error),
    /// The sealed key is PEM of another kind than `ENCRYPTED PRIVATE KEY` (the label found).
    #[error("expected an ENCRYPTED PRIVATE KEY, found {0}")]
    NotEncrypted(String),
    /// The sealed key is not a PKCS#8 encrypted private key.
    #[error("encrypted key: {0}")]
    EncryptedDer(#[source] pkcs8::der::Error),
    /// The sealed key does not decrypt to a private key under the passphrase given.
    #[error("cannot decrypt the CA key: wrong passphrase?")]
    WrongPassphrase,
}

/// Why key generation, signing or key sealing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The system's random number generator failed.
    #[error("no randomness")]
    NoRandomness,
    /// Generating a key, building or signing a certificate or request failed.
    #[error("{0}")]
    Rcgen(#[source] rcgen::Error),
    /// The scrypt parameters were refused.
    #[error("scrypt parameters: {0}")]
    Scrypt(pkcs8::pkcs5::scrypt::errors::InvalidParams),
    /// The PBES2 parameters were refused.
    #[error("PBES2 parameters: {0}")]
    Pbes2(pkcs8::pkcs5::Error),
    /// Encrypting a key failed.
    #[error("encrypting the key: {0}")]
    Encrypt(#[source] pkcs8::Error),
    /// Encoding a key as PEM failed.
    #[error("encoding the key: {0}")]
    Encode(#[source] pkcs8::der::Error),
}

/// Default SVID lifetime. Short enough that a stolen key is soon worthless; rotation renews
/// at half-life.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);

/// Longest SVID lifetime we issue.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long before issuance a certificate valid for `ttl` starts, so a peer whose clock is
/// behind the issuer's still accepts it: a tenth of the lifetime, between 10 s and 5 minutes
/// (an SVID of the default hour tolerates a clock 5 minutes behind). Bounded by the
/// lifetime, because renewal at half-life counts from the start.
pub(crate) fn backdate(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(10), Duration::from_secs(5 * 60))
}
