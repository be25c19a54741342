//! Who we are and whom we trust, as both TLS sides see it.
//!
//! [`Credentials`] pair our SVID with the trust bundle. An [`IdentityHandle`] publishes them
//! through a `watch` channel: every new handshake reads the latest (so a rotated SVID or a
//! new bundle takes effect without a restart) while open connections keep theirs.
//!
//! The verifiers here replace rustls's WebPKI verifier on both sides with
//! [`certs::TrustBundle::verify`], which adds the SPIFFE rules WebPKI lacks: exactly one
//! `spiffe://` URI SAN, in our trust domain, on a leaf that is not a CA. The peer's
//! [`SpiffeId`] taken from a verified SVID is the identity every later decision uses.
//!
//! Credentials also carry the revocation list the issuer pushes: both verifiers refuse a
//! peer whose serial is on it ([`SvidError::Revoked`]). A peer's credentials also end while
//! it is connected, when its SVID expires or its serial is revoked;
//! `peer_credentials_end` resolves then, and both sides close such a connection.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use certs::{SpiffeId, Svid, SvidError, TrustBundle, Usage, VerifiedSvid};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::vocab::Path;

/// Our SVID, the trust bundle we verify peers against, and the serials we refuse.
pub struct Credentials {
    svid: Svid,
    bundle: TrustBundle,
    key: Arc<CertifiedKey>,
    revoked: HashSet<String>,
}

impl Credentials {
    /// Pairs an SVID with a bundle. The SVID must belong to the bundle's trust domain.
    pub fn new(svid: Svid, bundle: TrustBundle) -> Result<Self, IdentityError> {
        if !svid.id().is_member_of(bundle.trust_domain()) {
            return Err(IdentityError::ForeignSvid {
                id: svid.id().clone(),
                trust_domain: bundle.trust_domain().to_string(),
            });
        }
        // The key provider of `tls::provider()` (aws-lc-rs), named here so identity does
        // not depend on the TLS configuration that is built on it.
        let signing = rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let key = Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing));
        key.keys_match().map_err(|e| {
            IdentityError::Key(format!(
                "it does not belong to the SVID's certificate ({e})"
            ))
        })?;
        Ok(Self {
            svid,
            bundle,
            key,
            revoked: HashSet::new(),
        })
    }

    /// The same credentials refusing peers whose SVID serial is in `revoked` (lowercase hex,
    /// as [`Svid::serial`] and [`VerifiedSvid::serial`] give it; other case is lowered).
    /// New handshakes refuse such peers, and connections to them close once these
    /// credentials are published.
    pub fn with_revoked(mut self, revoked: HashSet<String>) -> Self {
        self.revoked = revoked
            .into_iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        self
    }

    /// The revoked SVID serials, lowercase hex.
    pub fn revoked(&self) -> &HashSet<String> {
        &self.revoked
    }

    /// Whether the SVID with `serial` (lowercase hex) is revoked.
    pub(crate) fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }

    /// Our SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        self.svid.id()
    }

    /// Our SVID.
    pub fn svid(&self) -> &Svid {
        &self.svid
    }

    /// The bundle peers are verified against.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", self.svid.id())
            .field("not_after", &self.svid.not_after())
            .field("trust_domain", self.bundle.trust_domain())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

/// Publishes our current credentials to every connection that starts from now on.
#[derive(Clone, Debug)]
pub struct IdentityHandle {
    tx: Arc<watch::Sender<Arc<Credentials>>>,
}

impl IdentityHandle {
    /// Starts publishing `creds`.
    pub fn new(creds: Credentials) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(creds))),
        }
    }

    /// Replaces the credentials: new handshakes use these; open connections keep theirs.
    pub fn update(&self, creds: Credentials) {
        self.tx.send_replace(Arc::new(creds));
    }

    /// The credentials new handshakes use now.
    pub fn current(&self) -> Arc<Credentials> {
        self.tx.borrow().clone()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<Arc<Credentials>> {
        self.tx.subscribe()
    }
}

impl crate::audit::Signer for IdentityHandle {
    /// Signs with the current SVID's key: the checkpoint names the SVID, so a verifier can
    /// check it against the trust bundle.
    fn sign_checkpoint(
        &self,
        message: &[u8],
    ) -> Result<crate::audit::CheckpointSignature, crate::audit::SignError> {
        const SCHEMES: [(SignatureScheme, &str); 3] = [
            (SignatureScheme::ECDSA_NISTP256_SHA256, "ecdsa_p256_sha256"),
            (SignatureScheme::ECDSA_NISTP384_SHA384, "ecdsa_p384_sha384"),
            (SignatureScheme::ED25519, "ed25519"),
        ];
        let creds = self.current();
        let signer = creds
            .key
            .key
            .choose_scheme(&SCHEMES.map(|(s, _)| s))
            .ok_or(crate::audit::SignError::UnsupportedKey)?;
        let alg = SCHEMES
            .iter()
            .find(|(s, _)| *s == signer.scheme())
            .map(|(_, name)| (*name).to_owned())
            .ok_or(crate::audit::SignError::UnexpectedScheme)?;
        let signature = signer
            .sign(message)
            .map_err(crate::audit::SignError::Crypto)?;
        Ok(crate::audit::CheckpointSignature {
            signer: creds.id().clone(),
            alg,
            chain: creds.svid().chain().iter().map(|c| c.to_vec()).collect(),
            signature,
        })
    }
}

/// The authenticated peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE ID from the peer's verified SVID.
    pub id: SpiffeId,
    /// The SVID's serial number, lowercase hex.
    pub serial: String,
    /// When the peer's SVID expires.
    pub not_after: SystemTime,
    /// The peer's network address.
    pub addr: SocketAddr,
    /// Which transport carries the connection.
    pub path: Path,
}

/// Why credentials could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The SVID names another trust domain than the bundle.
    #[error("SVID {id} is not in trust domain {trust_domain} of the bundle")]
    ForeignSvid {
        /// The SVID's ID.
        id: SpiffeId,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// The private key could not be loaded for signing.
    #[error("private key cannot be used for TLS: {0}")]
    Key(String),
}

/// Serves our current SVID to every handshake, on both sides.
#[derive(Debug)]
pub(crate) struct CertResolver(pub(crate) watch::Receiver<Arc<Credentials>>);

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().key.clone())
    }
}

/// Where a client verifier leaves the reason it refused a server, so the caller gets a
/// typed error rather than a TLS alert's string.
pub(crate) type FailureSlot = Arc<Mutex<Option<SvidError>>>;

/// Verifies the peer's SVID chain against the current bundle, then the SPIFFE rules.
#[derive(Debug)]
pub(crate) struct SvidVerifier {
    creds: watch::Receiver<Arc<Credentials>>,
    algorithms: WebPkiSupportedAlgorithms,
    /// For clients: the server ID to insist on, if any.
    expect: Option<SpiffeId>,
    failure: Option<FailureSlot>,
}

impl SvidVerifier {
    pub(crate) fn new(
        creds: watch::Receiver<Arc<Credentials>>,
        provider: &CryptoProvider,
        expect: Option<SpiffeId>,
        failure: Option<FailureSlot>,
    ) -> Self {
        Self {
            creds,
            algorithms: provider.signature_verification_algorithms,
            expect,
            failure,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<VerifiedSvid, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        // Hold the credentials (an Arc) rather than the borrow: verification takes a while.
        let creds = self.creds.borrow().clone();
        let result = creds
            .bundle
            .verify(&chain, now, usage)
            .and_then(|v| not_revoked(&creds, v))
            .and_then(|v| match &self.expect {
                Some(want) if *want != v.id => Err(SvidError::Other(format!(
                    "server is {} but {} was expected",
                    v.id, want
                ))),
                _ => Ok(v),
            });
        result.map_err(|e| {
            let mapped = to_rustls_error(&e);
            if let Some(slot) = &self.failure {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            }
            mapped
        })
    }
}

impl ServerCertVerifier for SvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, Usage::Server)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Our configs offer TLS 1.3 only; a 1.2 signature means something is very wrong.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SvidVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What a peer proved of its identity during a transport's handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerProof(ProofKind);

#[derive(Clone, PartialEq, Eq)]
enum ProofKind {
    /// The certificate chain the peer presented (leaf first), which TLS checked its
    /// possession of; the driver verifies it against the trust bundle.
    Chain(Vec<CertificateDer<'static>>),
    /// Nobody proved anything: the identity is taken on trust.
    Assumed(SpiffeId),
}

impl PeerProof {
    /// The chain a TLS handshake received from the peer, leaf first.
    pub fn chain(chain: Vec<CertificateDer<'static>>) -> Self {
        Self(ProofKind::Chain(chain))
    }

    /// Takes `id` on trust, without any authentication: for a benchmark's plaintext
    /// baseline only. A peer so "identified" is served as if it had proved to be `id`.
    pub fn dangerous_assumed(id: SpiffeId) -> Self {
        Self(ProofKind::Assumed(id))
    }
}

impl fmt::Debug for PeerProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ProofKind::Chain(c) => write!(f, "PeerProof::Chain({} certificates)", c.len()),
            ProofKind::Assumed(id) => write!(f, "PeerProof::Assumed({id})"),
        }
    }
}

/// Who the peer of a fresh connection is, from what its transport's handshake received:
/// a chain is verified against our trust bundle at `now` for `usage` and must not be
/// revoked; an identity taken on trust (the bench's plaintext baseline) is taken as it is,
/// valid for as long as the connection lasts. Every transport's peer passes through here.
pub(crate) fn verify_peer(
    proof: &PeerProof,
    creds: &Credentials,
    now: SystemTime,
    usage: Usage,
) -> Result<VerifiedSvid, SvidError> {
    match &proof.0 {
        ProofKind::Chain(chain) => creds
            .bundle
            .verify(chain, now, usage)
            .and_then(|v| not_revoked(creds, v)),
        ProofKind::Assumed(id) => Ok(VerifiedSvid {
            id: id.clone(),
            serial: ASSUMED_SERIAL.to_owned(),
            not_after: now + ASSUMED_LIFETIME,
        }),
    }
}

/// The serial a peer taken on trust is recorded with.
const ASSUMED_SERIAL: &str = "plaintext";

/// How long a peer taken on trust counts as identified: longer than any benchmark.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why an established connection's peer may no longer be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsEnd {
    /// The peer's SVID expired while connected.
    Expired,
    /// The peer's serial was revoked while connected.
    Revoked,
}

impl CredentialsEnd {
    /// The reason, as the audit trail and the QUIC close carry it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Expired => "svid expired",
            Self::Revoked => "svid revoked",
        }
    }

    /// The application close code for this reason, for transports that carry one. Outside
    /// the `u16` range of [`crate::proto::ErrorCode`], so a close for this reason is never
    /// mistaken for another.
    pub fn close_code(self) -> u32 {
        match self {
            Self::Expired => CLOSE_SVID_EXPIRED,
            Self::Revoked => CLOSE_SVID_REVOKED,
        }
    }

    /// The reason an application close code stands for, if it is one of ours.
    pub fn from_close_code(code: u32) -> Option<Self> {
        match code {
            CLOSE_SVID_EXPIRED => Some(Self::Expired),
            CLOSE_SVID_REVOKED => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// Takes the reason our verifier refused the server's SVID, if it did.
pub(crate) fn take_failure(failure: &FailureSlot) -> Option<SvidError> {
    failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// Resolves once a connected peer's credentials end: its SVID (`serial`, lowercase hex,
/// expiring at `not_after`) has expired by `clock`, or credentials published on `creds`
/// revoke `serial`. A revocation is seen as soon as it is published; expiry within
/// [`CREDENTIALS_CHECK_INTERVAL`] (the clock is injected, so it is polled, not slept on).
pub(crate) async fn peer_credentials_end(
    serial: &str,
    not_after: SystemTime,
    clock: &dyn Clock,
    mut creds: watch::Receiver<Arc<Credentials>>,
) -> CredentialsEnd {
    let mut publishing = true;
    loop {
        if creds.borrow_and_update().is_revoked(serial) {
            return CredentialsEnd::Revoked;
        }
        // An SVID is valid through its `not_after` second (certificate times are whole
        // seconds, and the handshake checks the time in whole seconds): it ends with that
        // second, when a handshake presenting it is refused too.
        let end = not_after + Duration::from_secs(1);
        let Ok(left) = end.duration_since(clock.now()) else {
            return CredentialsEnd::Expired;
        };
        if left.is_zero() {
            return CredentialsEnd::Expired;
        }
        let nap = left.clamp(Duration::from_millis(10), CREDENTIALS_CHECK_INTERVAL);
        tokio::select! {
            changed = creds.changed(), if publishing => {
                // No publisher left: no revocation can come; keep watching the clock.
                publishing = changed.is_ok();
            }
            () = tokio::time::sleep(nap) => {}
        }
    }
}

/// How long before an SVID's expiry a client stops opening requests on a connection that
/// presented it and makes a fresh one: 10% of the lifetime `left` when the connection was
/// made, at most [`MAX_RENEWAL_MARGIN`], so requests in flight finish before either side
/// closes the connection for expiry.
pub(crate) fn renewal_margin(left: Duration) -> Duration {
    (left / 10).min(MAX_RENEWAL_MARGIN)
}

fn not_revoked(creds: &Credentials, v: VerifiedSvid) -> Result<VerifiedSvid, SvidError> {
    if creds.is_revoked(&v.serial) {
        Err(SvidError::Revoked { serial: v.serial })
    } else {
        Ok(v)
    }
}

/// Picks the TLS alert that best tells the peer why, without saying more than it should.
fn to_rustls_error(e: &SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        SvidError::Expired { .. } => CertificateError::Expired,
        SvidError::NotYetValid { .. } => CertificateError::NotValidYet,
        SvidError::UnknownIssuer => CertificateError::UnknownIssuer,
        SvidError::Revoked { .. } => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(SvidRefusal(other.to_string())))),
    })
}

/// An SVID refusal carried inside a rustls error (which needs `Error + Send + Sync`).
#[derive(Debug)]
struct SvidRefusal(String);

impl fmt::Display for SvidRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SvidRefusal {}

/// How often a connection checks its peer's SVID against the clock: an expired peer is cut
/// within this of its expiry.
pub(crate) const CREDENTIALS_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The largest [`renewal_margin`]: long enough for a chunk request in flight to finish.
pub(crate) const MAX_RENEWAL_MARGIN: Duration = Duration::from_secs(2);

/// QUIC application close code: the peer's SVID expired while connected.
const CLOSE_SVID_EXPIRED: u32 = 0x1_0001;

/// QUIC application close code: the peer's SVID serial was revoked while connected.
const CLOSE_SVID_REVOKED: u32 = 0x1_0002;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use certs::test_util::TestPki;

    use super::*;
    use crate::clock::SystemClock;
    use crate::test_util::ManualClock;

    #[test]
    fn renewal_margin_is_a_tenth_of_the_lifetime_but_at_most_two_seconds() {
        assert_eq!(
            renewal_margin(Duration::from_secs(4)),
            Duration::from_millis(400)
        );
        assert_eq!(
            renewal_margin(Duration::from_secs(20)),
            Duration::from_secs(2)
        );
        assert_eq!(
            renewal_margin(Duration::from_secs(3600)),
            Duration::from_secs(2)
        );
        assert_eq!(renewal_margin(Duration::ZERO), Duration::ZERO);
    }

    fn proof(svid: &Svid) -> PeerProof {
        PeerProof::chain(svid.chain().to_vec())
    }

    #[test]
    fn revoked_serials_are_held_lowercase_and_a_revoked_peer_does_not_verify() {
        let pki = TestPki::new("hospital.example");
        let peer = pki.svid("/gpu/loader");
        let creds = Credentials::new(pki.svid("/node/storage"), pki.bundle())
            .unwrap()
            .with_revoked(HashSet::from([peer.serial().to_ascii_uppercase()]));
        assert!(creds.revoked().contains(peer.serial()));
        let now = SystemClock.now();
        assert_eq!(
            verify_peer(&proof(&peer), &creds, now, Usage::Client),
            Err(SvidError::Revoked {
                serial: peer.serial().to_owned()
            })
        );
        let other = proof(&pki.svid("/gpu/other"));
        assert!(verify_peer(&other, &creds, now, Usage::Client).is_ok());
        // A chain of another trust domain does not verify; only an identity taken on
        // trust (the bench's baseline, by a `dangerous_` constructor) skips the check.
        let foreign = proof(&TestPki::new("partner.example").svid("/gpu/loader"));
        assert!(verify_peer(&foreign, &creds, now, Usage::Client).is_err());
        let assumed = PeerProof::dangerous_assumed(peer.id().clone());
        assert_eq!(
            verify_peer(&assumed, &creds, now, Usage::Client).map(|v| v.id),
            Ok(peer.id().clone())
        );
        assert!(matches!(
            to_rustls_error(&SvidError::Revoked {
                serial: peer.serial().to_owned()
            }),
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peers_credentials_end_when_the_clock_passes_its_expiry_or_it_is_revoked() {
        let pki = TestPki::new("hospital.example");
        let handle =
            IdentityHandle::new(Credentials::new(pki.svid("/node/storage"), pki.bundle()).unwrap());
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Arc::new(ManualClock::new(start));
        let not_after = start + Duration::from_secs(60);

        // Expiry, by the injected clock only: valid through its last second, ended after.
        let ended = {
            let clock = clock.clone();
            let watch = handle.watch();
            tokio::spawn(
                async move { peer_credentials_end("0a1b", not_after, &*clock, watch).await },
            )
        };
        clock.advance(Duration::from_millis(60_500));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!ended.is_finished(), "ended within its not_after second");
        clock.advance(Duration::from_millis(500));
        let end = tokio::time::timeout(2 * CREDENTIALS_CHECK_INTERVAL, ended)
            .await
            .expect("expiry not noticed")
            .unwrap();
        assert_eq!(end, CredentialsEnd::Expired);

        // Revocation, as soon as credentials naming the serial are published.
        let ended = {
            let clock = clock.clone();
            let watch = handle.watch();
            tokio::spawn(async move {
                peer_credentials_end("0a1b", start + Duration::from_secs(1 << 32), &*clock, watch)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let other = Credentials::new(pki.svid("/node/storage"), pki.bundle())
            .unwrap()
            .with_revoked(HashSet::from(["ffff".to_owned()]));
        handle.update(other);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !ended.is_finished(),
            "ended for another serial's revocation"
        );
        let revoking = Credentials::new(pki.svid("/node/storage"), pki.bundle())
            .unwrap()
            .with_revoked(HashSet::from(["0A1B".to_owned()]));
        handle.update(revoking);
        let end = tokio::time::timeout(Duration::from_millis(1), ended)
            .await
            .expect("revocation not noticed at once")
            .unwrap();
        assert_eq!(end, CredentialsEnd::Revoked);
        assert_eq!(
            CredentialsEnd::from_close_code(CredentialsEnd::Revoked.close_code()),
            Some(CredentialsEnd::Revoked)
        );
        assert_eq!(CredentialsEnd::from_close_code(1), None);
    }
}
