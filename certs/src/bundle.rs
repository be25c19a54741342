//! Trust bundles: the CA certificates of one trust domain, and SVID verification against
//! them.
//!
//! [`TrustBundle::verify`] is what both TLS sides call on the peer's chain: WebPKI path
//! validation to a CA of the bundle at the given time, then the SPIFFE rules on the leaf
//! (see `svid.rs`), then the trust-domain check. WebPKI alone would accept a leaf with two
//! URI SANs, with none, or naming another trust domain, as long as our CA signed it.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::svid::{
    MAX_CHAIN_LEN, MalformedCert, PemError, SvidError, Usage, VerifiedSvid, parse_ca_cert,
    parse_leaf,
};
use crate::{TrustDomain, svid};

/// The CA certificates of one trust domain.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    cas: Vec<CertificateDer<'static>>,
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

impl TrustBundle {
    /// Reads a bundle: one or more CA certificates (PEM) of the same trust domain.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let cas = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(PemError::new(e)))?;
        Self::from_der(cas)
    }

    /// A bundle from DER CA certificates of the same trust domain.
    pub fn from_der(cas: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if cas.is_empty() {
            return Err(BundleError::Empty);
        }
        if cas.len() > MAX_BUNDLE_CAS {
            return Err(BundleError::TooMany(cas.len()));
        }
        let mut td: Option<TrustDomain> = None;
        for (index, ca) in cas.iter().enumerate() {
            let info = parse_ca_cert(ca).map_err(|reason| BundleError::Ca { index, reason })?;
            match &td {
                None => td = Some(info.trust_domain),
                Some(first) if *first != info.trust_domain => {
                    return Err(BundleError::MixedTrustDomains {
                        first: first.to_string(),
                        other: info.trust_domain.to_string(),
                    });
                }
                Some(_) => {}
            }
            webpki::anchor_from_trusted_cert(ca).map_err(|e| BundleError::Ca {
                index,
                reason: SvidError::Malformed(MalformedCert::Webpki(e)),
            })?;
        }
        let td = td.ok_or(BundleError::Empty)?;
        Ok(Self::from_trusted(td, cas))
    }

    /// A bundle from certificates already checked to be CAs of `td`.
    pub(crate) fn from_trusted(td: TrustDomain, cas: Vec<CertificateDer<'static>>) -> Self {
        // Every certificate here parsed as a CA, so turning it into an anchor succeeds; one
        // that somehow does not is left out, which can only make verification stricter.
        let anchors = cas
            .iter()
            .filter_map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        Self {
            trust_domain: td,
            cas,
            anchors: Arc::new(anchors),
        }
    }

    /// The trust domain whose SVIDs this bundle verifies.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates.
    pub fn cas(&self) -> &[CertificateDer<'static>] {
        &self.cas
    }

    /// The bundle as PEM.
    pub fn to_pem(&self) -> String {
        self.cas
            .iter()
            .map(|c| crate::pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// Verifies a peer's certificate chain (leaf first) at `now` for `usage`: the chain
    /// leads to a CA of this bundle, every certificate is valid at `now`, and the leaf is an
    /// X.509-SVID of this bundle's trust domain.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<VerifiedSvid, SvidError> {
        let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
        if chain.len() > MAX_CHAIN_LEN {
            return Err(SvidError::Malformed(MalformedCert::ChainTooLong(
                chain.len(),
            )));
        }
        let ee = EndEntityCert::try_from(leaf)
            .map_err(|e| SvidError::Malformed(MalformedCert::Webpki(e)))?;
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let eku = match usage {
            Usage::Client => KeyUsage::client_auth(),
            Usage::Server => KeyUsage::server_auth(),
        };
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            intermediates,
            time,
            eku,
            None,
            None,
        )
        .map_err(chain_error)?;
        let info = parse_leaf(leaf)?;
        if !info.id.is_member_of(&self.trust_domain) {
            return Err(SvidError::ForeignTrustDomain {
                id: info.id,
                trust_domain: self.trust_domain.to_string(),
            });
        }
        Ok(VerifiedSvid {
            id: info.id,
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("cas", &self.cas.len())
            .finish()
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain && self.cas == other.cas
    }
}

impl Eq for TrustBundle {}

/// Why a trust bundle could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The PEM could not be read.
    #[error("bundle PEM: {0}")]
    Pem(#[source] PemError),
    /// No certificate was found.
    #[error("bundle holds no CA certificate")]
    Empty,
    /// More CAs than we accept.
    #[error("bundle holds {0} certificates; at most {MAX_BUNDLE_CAS} are accepted")]
    TooMany(usize),
    /// A certificate is not a CA of a trust domain.
    #[error("bundle certificate {index}: {reason}")]
    Ca {
        /// Its position in the bundle, from 0.
        index: usize,
        /// What is wrong with it.
        reason: SvidError,
    },
    /// The CAs belong to different trust domains.
    #[error("bundle mixes trust domains {first} and {other}; keep one bundle per trust domain")]
    MixedTrustDomains {
        /// The first certificate's trust domain.
        first: String,
        /// Another certificate's.
        other: String,
    },
}

fn unix(t: UnixTime) -> SystemTime {
    svid::system_time(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

fn chain_error(e: webpki::Error) -> SvidError {
    match e {
        webpki::Error::CertExpired { not_after, time } => SvidError::Expired {
            not_after: unix(not_after),
            now: unix(time),
        },
        webpki::Error::CertNotValidYet { not_before, time } => SvidError::NotYetValid {
            not_before: unix(not_before),
            now: unix(time),
        },
        // A CA of the bundle with the same name as the real issuer, whose key did not sign
        // the chain, means the same thing to us: no CA of ours vouches for it.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidError::UnknownIssuer
        }
        webpki::Error::CaUsedAsEndEntity => SvidError::IsCa,
        other => SvidError::Chain(other),
    }
}

/// Most CAs a bundle may hold (several during a CA rollover, never many).
pub const MAX_BUNDLE_CAS: usize = 64;
