//! A trust domain's certificate authority: creates itself, loads from PEM, issues SVIDs.
//!
//! The CA certificate is self-signed with `CA:true`, key usage keyCertSign and cRLSign, and
//! the trust domain's own SPIFFE ID (`spiffe://<trust-domain>`) as its only URI SAN, so a
//! bundle built from it says which trust domain it vouches for.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::bundle::TrustBundle;
use crate::issue::{
    CaError, CryptoError, CsrError, IssueError, IssueParams, Issued, MAX_SVID_TTL, backdate,
};
use crate::key::{Csr, KeyAlgorithm};
use crate::svid::{PemError, parse_ca_cert};
use crate::{SpiffeId, TrustDomain};

/// How a CA is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaParams {
    /// How long the CA certificate is valid.
    pub validity: Duration,
    /// The CA's key type.
    pub key: KeyAlgorithm,
}

impl Default for CaParams {
    fn default() -> Self {
        Self {
            validity: Duration::from_secs(365 * 24 * 3600),
            key: KeyAlgorithm::default(),
        }
    }
}

/// A trust domain's CA: its certificate and signing key.
pub struct Ca {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    key_pem: Zeroizing<String>,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Ca {
    /// Creates a new CA for `td`, valid from `now` for `params.validity`.
    pub fn generate(
        td: &TrustDomain,
        params: &CaParams,
        now: SystemTime,
    ) -> Result<Self, IssueError> {
        let key = params.key.generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "transportd");
        dn.push(DnType::CommonName, format!("{td} CA"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![uri_san(&td.id())?];
        p.not_before = (now - backdate(params.validity)).into();
        p.not_after = (now + params.validity).into();
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = false;
        let cert = p.self_signed(&key).map_err(CryptoError::Rcgen)?;
        Self::from_parts(cert.der().clone(), key)
    }

    /// Loads a CA from its certificate and private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::CertPem(PemError::new(e)))?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        Self::from_parts(cert, key)
    }

    fn from_parts(cert: CertificateDer<'static>, key: KeyPair) -> Result<Self, IssueError> {
        let info = parse_ca_cert(&cert).map_err(CaError::Cert)?;
        if info.public_key != key.der_bytes() {
            return Err(CaError::KeyMismatch.into());
        }
        let key_pem = Zeroizing::new(key.serialize_pem());
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(CaError::Issuer)?;
        Ok(Self {
            trust_domain: info.trust_domain,
            cert,
            key_pem,
            issuer,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// The trust domain this CA vouches for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        crate::pem_encode("CERTIFICATE", &self.cert)
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's private key as PKCS#8 PEM (wiped from memory when dropped).
    pub fn key_pem(&self) -> Zeroizing<String> {
        self.key_pem.clone()
    }

    /// When the CA certificate expires; no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the CA certificate became valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The CA certificate's serial number, lowercase hex: names the CA in rollovers.
    pub fn serial(&self) -> String {
        use x509_parser::prelude::FromDer;
        x509_parser::certificate::X509Certificate::from_der(&self.cert)
            .map(|(_, c)| hex(c.raw_serial()))
            .unwrap_or_default()
    }

    /// A trust bundle holding just this CA.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_trusted(self.trust_domain.clone(), vec![self.cert.clone()])
    }

    /// Issues an X.509-SVID for `id` to the key in `csr`, valid from `now` for `params.ttl`
    /// (cut short at the CA's expiry). The CSR's own wishes (extensions, subject) are
    /// ignored, except that a SPIFFE ID it names must be `id`.
    pub fn issue(
        &self,
        csr: &Csr,
        id: &SpiffeId,
        params: &IssueParams,
        now: SystemTime,
    ) -> Result<Issued, IssueError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(IssueError::ForeignId {
                id: id.clone(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if id.path().is_empty() {
            return Err(IssueError::NoPath(id.clone()));
        }
        if let Some(requested) = csr.requested_id()
            && requested != id
        {
            return Err(IssueError::IdMismatch {
                requested: requested.clone(),
                id: id.clone(),
            });
        }
        if params.ttl.is_zero() || params.ttl > MAX_SVID_TTL {
            return Err(IssueError::Ttl(params.ttl));
        }
        if now >= self.not_after || now < self.not_before {
            return Err(IssueError::CaExpired {
                not_after: self.not_after,
            });
        }
        let not_before = (now - backdate(params.ttl)).max(self.not_before);
        let not_after = (now + params.ttl).min(self.not_after);
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.spki()).map_err(CsrError::PublicKey)?;
        let serial = random_serial()?;
        let p = svid_params(id, not_before, not_after, serial.clone())?;
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(CryptoError::Rcgen)?;
        Ok(Issued {
            id: id.clone(),
            serial: hex(&serial.to_bytes()),
            // X.509 keeps whole seconds; report what the certificate says.
            not_before: whole_seconds(not_before),
            not_after: whole_seconds(not_after),
            chain: vec![cert.der().clone()],
        })
    }

    /// Signs arbitrary certificate parameters (tests that need broken SVIDs).
    #[cfg(feature = "test-util")]
    pub(crate) fn sign_raw(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, IssueError> {
        params
            .signed_by(key, &self.issuer)
            .map(|c| c.der().clone())
            .map_err(|e| CryptoError::Rcgen(e).into())
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The certificate parameters of an SVID for `id`.
pub(crate) fn svid_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: SerialNumber,
) -> Result<CertificateParams, IssueError> {
    let mut p = CertificateParams::default();
    // SPIFFE identifies by URI SAN; the subject carries nothing a peer should rely on.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "transportd");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![uri_san(id)?];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p.serial_number = Some(serial);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

pub(crate) fn uri_san(id: &SpiffeId) -> Result<SanType, IssueError> {
    Ok(SanType::URI(
        id.as_str().try_into().map_err(CryptoError::Rcgen)?,
    ))
}

/// A random 128-bit positive serial number.
pub(crate) fn random_serial() -> Result<SerialNumber, IssueError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CryptoError::NoRandomness)?;
    // Positive, and without a leading zero byte that DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
