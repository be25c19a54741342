//! Private keys and certificate signing requests.
//!
//! A private key is generated where it will be used; only its CSR travels to the CA. A
//! [`Csr`] is parsed and its signature checked when it is read, so a value of that type is
//! always a request signed by the key it carries (proof of possession).

use std::fmt;

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};
use zeroize::Zeroizing;

use crate::SpiffeId;
use crate::issue::{CryptoError, CsrError, IssueError};
use crate::svid::PemError;

/// The kind of key to generate. ECDSA P-256 is the default: fast to sign and verify, and
/// what SPIFFE deployments use most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA over NIST P-256 with SHA-256.
    #[default]
    EcdsaP256,
    /// ECDSA over NIST P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    pub(crate) fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    pub(crate) fn generate(self) -> Result<rcgen::KeyPair, IssueError> {
        rcgen::KeyPair::generate_for(self.rcgen()).map_err(|e| CryptoError::Rcgen(e).into())
    }
}

/// Generates a private key and a CSR asking for an X.509-SVID for `id`. Returns the key as
/// PKCS#8 PEM (wiped from memory when dropped) and the request.
pub fn generate_key_and_csr(
    id: &SpiffeId,
    alg: KeyAlgorithm,
) -> Result<(Zeroizing<String>, Csr), IssueError> {
    let key = alg.generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.as_str().try_into().map_err(CryptoError::Rcgen)?,
    )];
    let request = params.serialize_request(&key).map_err(CryptoError::Rcgen)?;
    let csr = Csr::from_der(request.der())?;
    Ok((Zeroizing::new(key.serialize_pem()), csr))
}

/// Generates a private key and a CSR that names no SPIFFE ID: for a node's first contact
/// with an issuer, which decides the node's ID from its join token.
pub fn generate_key_and_bare_csr(
    alg: KeyAlgorithm,
) -> Result<(Zeroizing<String>, Csr), IssueError> {
    let key = alg.generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let request = params.serialize_request(&key).map_err(CryptoError::Rcgen)?;
    let csr = Csr::from_der(request.der())?;
    Ok((Zeroizing::new(key.serialize_pem()), csr))
}

/// A private key as PEM in its own format (PKCS#8 `PRIVATE KEY` for the keys we make),
/// wiped from memory when dropped.
pub fn private_key_pem(key: &rustls_pki_types::PrivateKeyDer<'_>) -> Zeroizing<String> {
    use rustls_pki_types::PrivateKeyDer;
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    Zeroizing::new(crate::pem_encode(label, key.secret_der()))
}

/// A certificate signing request whose signature has been checked.
#[derive(Clone)]
pub struct Csr {
    der: CertificateSigningRequestDer<'static>,
    spki: Vec<u8>,
    requested: Option<SpiffeId>,
}

impl Csr {
    /// Parses a DER request and checks its signature against the key it carries.
    pub fn from_der(der: &[u8]) -> Result<Self, IssueError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(der.len()).into());
        }
        let (rest, req) = X509CertificationRequest::from_der(der).map_err(CsrError::Der)?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingBytes.into());
        }
        req.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let info = &req.certification_request_info;
        let spki = info.subject_pki.raw.to_vec();
        let mut uris = Vec::new();
        for ext in req.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uris.push(*u);
                    }
                }
            }
        }
        let requested = match uris.as_slice() {
            [] => None,
            [one] => Some(SpiffeId::parse(one).map_err(IssueError::RequestedId)?),
            _ => {
                return Err(CsrError::UriCount(uris.len()).into());
            }
        };
        Ok(Self {
            der: CertificateSigningRequestDer::from(der.to_vec()),
            spki,
            requested,
        })
    }

    /// Parses a PEM request (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub fn from_pem(pem: &str) -> Result<Self, IssueError> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CsrError::Pem(PemError::new(e)))?;
        Self::from_der(&der)
    }

    /// The request as PEM.
    pub fn to_pem(&self) -> Result<String, IssueError> {
        Ok(crate::pem_encode("CERTIFICATE REQUEST", &self.der))
    }

    /// The request as DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The SPIFFE ID the request asks for, if it names one.
    pub fn requested_id(&self) -> Option<&SpiffeId> {
        self.requested.as_ref()
    }

    /// The requester's public key (DER SubjectPublicKeyInfo).
    pub(crate) fn spki(&self) -> &[u8] {
        &self.spki
    }
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr")
            .field("requested", &self.requested)
            .field("der_len", &self.der.len())
            .finish()
    }
}

/// Largest request accepted: real ones are well under 2 KiB.
pub(crate) const MAX_CSR_BYTES: usize = 16 * 1024;
