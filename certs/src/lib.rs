//! SPIFFE-style identities for transportd.
//!
//! This crate owns the identity types every other crate uses and the issuer's pure logic:
//!
//! * [`SpiffeId`] and [`TrustDomain`], validated by the SPIFFE ID standard;
//! * [`Ca`]: a trust domain's certificate authority, which issues X.509-SVIDs from CSRs
//!   ([`generate_key_and_csr`], [`Csr`]) so private keys never travel;
//! * [`Svid`]: our own certificate chain and key;
//! * [`TrustBundle`]: the CAs of a trust domain, and [`TrustBundle::verify`], which both TLS
//!   sides use on the peer's chain: WebPKI path validation plus the SPIFFE rules WebPKI
//!   lacks;
//! * attestation decisions: single-use [`JoinToken`]s, Unix [`Selector`]s and
//!   [`RegistrationEntry`]s, and the renewal schedule ([`renew_at`]).
//!
//! ```text
//!   node: generate_key_and_csr(id) ──CSR──▶ Ca::issue(csr, id, ttl, now) ──chain──▶ Svid
//!   peer: TrustBundle::verify(chain, now, usage) ──▶ VerifiedSvid { id, serial, not_after }
//! ```
//!
//! Nothing here does I/O or reads the clock: every check that depends on time takes `now`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod attest;
mod bundle;
mod ca;
mod id;
mod issue;
mod key;
mod rotate;
mod sealed_key;
mod svid;

#[cfg(fuzzing)]
pub mod fuzzing;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use attest::{
    AttestError, EntryError, JoinToken, MAX_SELECTORS, RegistrationEntry, Selector, TokenHash,
    TokenRecord, TokenRefusal, Workload, entries_for, redeem,
};
pub use bundle::{BundleError, MAX_BUNDLE_CAS, TrustBundle};
pub use ca::{Ca, CaParams};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use issue::{
    CaError, CryptoError, CsrError, DEFAULT_SVID_TTL, IssueError, IssueParams, Issued, MAX_SVID_TTL,
};
pub use key::{
    Csr, KeyAlgorithm, generate_key_and_bare_csr, generate_key_and_csr, private_key_pem,
};
pub use rotate::{
    MIN_CA_TO_SVID_RATIO, RENEWAL_JITTER, TtlError, check_svid_ttl, renew_at, retry_in,
};
pub use sealed_key::{decrypt_key_pem, encrypt_key_pem, is_encrypted_key_pem};
pub use svid::{MAX_CHAIN_LEN, MalformedCert, PemError, Svid, SvidError, Usage, VerifiedSvid};

/// PEM with LF line endings.
pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
