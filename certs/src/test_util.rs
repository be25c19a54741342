//! Test helpers (feature `test-util`): a trust domain per test, valid SVIDs issued through
//! the real CSR path, and deliberately broken SVIDs signed by the same CA, for tests that
//! must show each SPIFFE rule rejecting.

use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::{random_serial, svid_params, uri_san};
use crate::{
    Ca, CaParams, IssueParams, KeyAlgorithm, SpiffeId, Svid, TrustBundle, TrustDomain,
    generate_key_and_csr,
};

/// A trust domain with its CA, for one test.
#[derive(Debug)]
pub struct TestPki {
    ca: Ca,
    now: SystemTime,
}

/// A way an SVID can be wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// Expired an hour ago.
    Expired,
    /// Valid only from an hour from now.
    NotYetValid,
    /// Names an ID in another trust domain, signed by our CA.
    ForeignTrustDomain,
    /// Carries two URI SANs.
    TwoUriSans,
    /// Carries no URI SAN (a DNS name instead).
    NoUriSan,
    /// Is itself a CA certificate (CA:true, keyCertSign), signed by our CA.
    CaAsLeaf,
    /// CA:false, but its key usage allows signing certificates.
    CertSignKeyUsage,
}

impl Defect {
    /// Every defect, for tests that try them all.
    pub const ALL: [Self; 7] = [
        Self::Expired,
        Self::NotYetValid,
        Self::ForeignTrustDomain,
        Self::TwoUriSans,
        Self::NoUriSan,
        Self::CaAsLeaf,
        Self::CertSignKeyUsage,
    ];
}

impl TestPki {
    /// A new CA for trust domain `td`, valid from a day ago for 30 days.
    pub fn new(td: &str) -> Self {
        #[allow(clippy::disallowed_methods)] // Test identities are minted at real time.
        let now = SystemTime::now();
        Self::at(td, now)
    }

    /// A new CA for `td` whose notion of "now" is `now`.
    pub fn at(td: &str, now: SystemTime) -> Self {
        let td = TrustDomain::new(td).expect("test trust domain");
        let params = CaParams {
            validity: Duration::from_secs(31 * 24 * 3600),
            key: KeyAlgorithm::EcdsaP256,
        };
        let ca = Ca::generate(&td, &params, now - Duration::from_secs(24 * 3600)).expect("test CA");
        Self { ca, now }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A bundle holding the CA.
    pub fn bundle(&self) -> TrustBundle {
        self.ca.bundle()
    }

    /// `spiffe://<td><path>`.
    pub fn id(&self, path: &str) -> SpiffeId {
        SpiffeId::from_parts(self.trust_domain(), path).expect("test SPIFFE ID")
    }

    /// A valid SVID for `path`, issued from a CSR with the default TTL.
    pub fn svid(&self, path: &str) -> Svid {
        self.svid_with_ttl(path, IssueParams::default().ttl)
    }

    /// A valid SVID for `path` living `ttl` from now.
    pub fn svid_with_ttl(&self, path: &str, ttl: Duration) -> Svid {
        self.svid_issued_at(path, ttl, self.now)
    }

    /// An SVID for `path` issued at `issued` (not this PKI's "now") and living `ttl` from
    /// then: what a renewal at `issued` hands out, for tests that rotate short-lived SVIDs
    /// while time runs. `issued` must lie within the CA's validity.
    pub fn svid_issued_at(&self, path: &str, ttl: Duration, issued: SystemTime) -> Svid {
        let id = self.id(path);
        let (key, csr) = generate_key_and_csr(&id, KeyAlgorithm::EcdsaP256).expect("CSR");
        let issued = self
            .ca
            .issue(&csr, &id, &IssueParams { ttl }, issued)
            .expect("issue");
        Svid::from_pem(&issued.chain_pem(), &key).expect("issued SVID parses")
    }

    /// An SVID for `path` with `defect`, signed by this CA. It claims the ID `path` names
    /// (whatever its certificate says), so it can be loaded as credentials and presented.
    pub fn bad_svid(&self, path: &str, defect: Defect) -> Svid {
        let id = self.id(path);
        let hour = Duration::from_secs(3600);
        let (nb, na) = match defect {
            Defect::Expired => (self.now - 2 * hour, self.now - hour),
            Defect::NotYetValid => (self.now + hour, self.now + 2 * hour),
            _ => (self.now - Duration::from_secs(60), self.now + hour),
        };
        let mut p = svid_params(&id, nb, na, random_serial().expect("serial")).expect("params");
        match defect {
            Defect::Expired | Defect::NotYetValid => {}
            Defect::ForeignTrustDomain => {
                let foreign = SpiffeId::parse(&format!("spiffe://foreign.example{path}"))
                    .expect("foreign ID");
                p.subject_alt_names = vec![uri_san(&foreign).expect("SAN")];
            }
            Defect::TwoUriSans => {
                p.subject_alt_names
                    .push(uri_san(&self.id("/second")).expect("SAN"));
            }
            Defect::NoUriSan => {
                p.subject_alt_names = vec![SanType::DnsName(
                    "node.example".try_into().expect("DNS name"),
                )];
            }
            Defect::CaAsLeaf => {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                ];
            }
            Defect::CertSignKeyUsage => {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = self.ca.sign_raw(&p, &key).expect("sign");
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Svid::unchecked(id, vec![cert], key_der, na)
    }
}
