//! X.509-SVIDs: our own (certificate chain plus private key) and the SPIFFE rules a peer's
//! leaf certificate must meet.
//!
//! The rules, from the X.509-SVID standard, that WebPKI verification alone does not apply:
//! the leaf carries exactly one URI SAN, which is a valid `spiffe://` ID with a path; it is
//! not a CA (`CA:false` or no basic constraints); its key usage includes digitalSignature
//! and excludes keyCertSign and cRLSign. [`crate::TrustBundle::verify`] applies them after
//! the chain has verified.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::ca::hex;
use crate::{IdError, SpiffeId, TrustDomain};

/// Our X.509-SVID: certificate chain (leaf first) and the leaf's private key.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// Reads an SVID from its chain (PEM, leaf first) and private key (PEM: PKCS#8, SEC1 or
    /// PKCS#1). The leaf must follow the SVID rules; the chain is not verified here (the
    /// bundle does that for peers).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, SvidError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Malformed(MalformedCert::ChainPem(PemError::new(e))))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| SvidError::Malformed(MalformedCert::KeyPem(PemError::new(e))))?;
        Self::from_der(chain, key)
    }

    /// An SVID from DER certificates (leaf first) and key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        if chain.len() > MAX_CHAIN_LEN {
            return Err(SvidError::Malformed(MalformedCert::ChainTooLong(
                chain.len(),
            )));
        }
        let info = parse_leaf(leaf)?;
        Ok(Self {
            id: info.id,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            chain,
            key,
        })
    }

    /// Builds an SVID without checking the leaf (tests that need broken SVIDs), claiming `id`.
    #[cfg(feature = "test-util")]
    pub(crate) fn unchecked(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        not_after: SystemTime,
    ) -> Self {
        Self {
            id,
            chain,
            key,
            serial: String::new(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after,
        }
    }

    /// The SPIFFE ID it certifies.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The leaf's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pem_encode("CERTIFICATE", c))
            .collect()
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            serial: self.serial.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Svid {
    // Never shows the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Which TLS side a peer's SVID is verified for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// The peer is a TLS client (extended key usage clientAuth, if the SVID lists any).
    Client,
    /// The peer is a TLS server (extended key usage serverAuth, if the SVID lists any).
    Server,
}

/// A peer's SVID that verified against a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub id: SpiffeId,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// Why a certificate chain is not a valid X.509-SVID for us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// No certificate was presented.
    #[error("no certificate was presented")]
    NoCertificate,
    /// A certificate could not be parsed.
    #[error("malformed certificate: {0}")]
    Malformed(#[source] MalformedCert),
    /// A certificate in the chain has expired. The message names the clock it was judged
    /// by: the usual cause of a certificate that should be current is a clock that is off.
    #[error(
        "certificate expired at {} by this machine's clock, which reads {}: if the clock is \
         wrong, correct it",
        rfc3339(*not_after),
        rfc3339(*now)
    )]
    Expired {
        /// Its expiry.
        not_after: SystemTime,
        /// The time it was verified at (this machine's clock).
        now: SystemTime,
    },
    /// A certificate in the chain is not valid yet (see [`SvidError::Expired`]).
    #[error(
        "certificate is not valid until {} by this machine's clock, which reads {}: if the \
         clock is wrong, correct it",
        rfc3339(*not_before),
        rfc3339(*now)
    )]
    NotYetValid {
        /// Its start of validity.
        not_before: SystemTime,
        /// The time it was verified at (this machine's clock).
        now: SystemTime,
    },
    /// The chain does not lead to a CA in the trust bundle.
    #[error("certificate is not signed by a CA of the trust bundle")]
    UnknownIssuer,
    /// The chain failed verification for another reason.
    #[error("certificate chain does not verify: {0}")]
    Chain(#[source] webpki::Error),
    /// The leaf does not carry exactly one URI SAN.
    #[error("leaf carries {0} URI SANs; an X.509-SVID carries exactly one")]
    UriSanCount(usize),
    /// The leaf's URI SAN is not a valid SPIFFE ID.
    #[error("leaf's URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(IdError),
    /// The leaf names the trust domain itself rather than a workload.
    #[error("leaf names the trust domain {0} itself, not a workload")]
    NoPath(SpiffeId),
    /// The leaf's ID belongs to another trust domain than the bundle's.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The leaf's ID.
        id: SpiffeId,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// The leaf is a CA certificate.
    #[error("leaf is a CA certificate (basic constraints CA:true)")]
    IsCa,
    /// The leaf may sign certificates or CRLs.
    #[error("leaf's key usage allows signing certificates or CRLs")]
    SigningKeyUsage,
    /// The leaf's key usage does not allow digital signatures.
    #[error("leaf's key usage lacks digitalSignature")]
    NoDigitalSignature,
    /// The leaf verified, but its serial is on the revocation list the issuer published
    /// (its node was banned, say).
    #[error("certificate {serial} has been revoked")]
    Revoked {
        /// The leaf's serial, lowercase hex.
        serial: String,
    },
    /// A bundle's certificate is not a CA (basic constraints CA:true missing).
    #[error("not a CA certificate (basic constraints CA:true missing)")]
    NotCa,
    /// A bundle's CA certificate names a workload, not just its trust domain.
    #[error(
        "CA certificate names {0}; a CA names its trust domain only (spiffe://{td})",
        td = .0.trust_domain_name()
    )]
    CaWithPath(SpiffeId),
    /// Another refusal, with its reason.
    #[error("{0}")]
    Other(String),
}

/// Why a certificate (or the PEM around it) could not be parsed.
// `PartialEq` but not `Eq` is derived because `X509Error` derives only `PartialEq`;
// its comparison is still an equivalence (it holds no floats), so `Eq` is implemented below.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedCert {
    /// The certificate chain's PEM could not be read.
    #[error("certificate chain PEM: {0}")]
    ChainPem(#[source] PemError),
    /// The private key's PEM could not be read.
    #[error("private key PEM: {0}")]
    KeyPem(#[source] PemError),
    /// The chain holds more than [`MAX_CHAIN_LEN`] certificates (the count).
    #[error("chain of {0} certificates; at most {MAX_CHAIN_LEN} are accepted")]
    ChainTooLong(usize),
    /// The bytes are not a DER X.509 certificate.
    #[error("{0}")]
    Der(#[source] x509_parser::nom::Err<X509Error>),
    /// Bytes follow the certificate's DER.
    #[error("trailing bytes after the certificate")]
    TrailingBytes,
    /// An extension could not be parsed (a duplicated one, say).
    #[error("{extension}: {source}")]
    Extension {
        /// Which: `basic constraints`, `key usage` or `subject alternative name`.
        extension: &'static str,
        /// What the parser said.
        #[source]
        source: X509Error,
    },
    /// WebPKI could not parse the certificate.
    #[error("{0}")]
    Webpki(#[source] webpki::Error),
}

impl Eq for MalformedCert {}

/// PEM that could not be read. The parser's error is shared so that the errors holding it
/// stay `Clone`; two compare equal when they say the same.
#[derive(Debug, Clone)]
pub struct PemError(Arc<rustls_pki_types::pem::Error>);

impl PemError {
    pub(crate) fn new(e: rustls_pki_types::pem::Error) -> Self {
        Self(Arc::new(e))
    }

    /// The PEM parser's error.
    pub fn get(&self) -> &rustls_pki_types::pem::Error {
        &self.0
    }
}

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for PemError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for PemError {}

/// What we read from a leaf certificate after checking the SVID rules.
#[derive(Debug)]
pub(crate) struct LeafInfo {
    pub(crate) id: SpiffeId,
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// Checks the SVID rules on a leaf certificate (not its chain or validity period).
pub(crate) fn parse_leaf(der: &CertificateDer<'_>) -> Result<LeafInfo, SvidError> {
    let cert = parse(der)?;
    let id = single_spiffe_id(&cert)?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath(id));
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| extension_error("basic constraints", e))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::IsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| extension_error("key usage", e))?
        .ok_or(SvidError::NoDigitalSignature)?;
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::SigningKeyUsage);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    let v = cert.validity();
    Ok(LeafInfo {
        id,
        serial: hex(cert.raw_serial()),
        not_before: system_time(v.not_before.timestamp()),
        not_after: system_time(v.not_after.timestamp()),
    })
}

/// What we read from a CA certificate of a trust bundle.
#[derive(Debug)]
pub(crate) struct CaInfo {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// The raw public key (the SPKI's bit string).
    pub(crate) public_key: Vec<u8>,
}

/// Checks that a certificate is a CA for a trust domain: `CA:true`, and exactly one URI SAN
/// which is a trust domain's own ID (`spiffe://<td>`, no path).
pub(crate) fn parse_ca_cert(der: &CertificateDer<'_>) -> Result<CaInfo, SvidError> {
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| extension_error("basic constraints", e))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::NotCa);
    }
    let id = single_spiffe_id(&cert)?;
    if !id.path().is_empty() {
        return Err(SvidError::CaWithPath(id));
    }
    let v = cert.validity();
    Ok(CaInfo {
        trust_domain: id.trust_domain(),
        not_before: system_time(v.not_before.timestamp()),
        not_after: system_time(v.not_after.timestamp()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, SvidError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(MalformedCert::Der(e)))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(MalformedCert::TrailingBytes));
    }
    Ok(cert)
}

fn extension_error(extension: &'static str, source: X509Error) -> SvidError {
    SvidError::Malformed(MalformedCert::Extension { extension, source })
}

/// The one URI SAN of a certificate, as a SPIFFE ID.
fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    // A duplicated SAN extension is an error here, not a second chance to hide a URI.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| extension_error("subject alternative name", e))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(SvidError::NotSpiffe),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

pub(crate) fn system_time(unix_secs: i64) -> SystemTime {
    u64::try_from(unix_secs).map_or(SystemTime::UNIX_EPOCH, |s| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    })
}

fn rfc3339(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

/// Longest chain accepted (leaf plus intermediates).
pub const MAX_CHAIN_LEN: usize = 8;
