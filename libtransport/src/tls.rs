//! rustls configurations: TLS 1.3 only, mutual authentication by SVID, our own ALPN.
//!
//! One crypto provider (aws-lc-rs) with AES-GCM suites first (AES-128 then AES-256, both
//! hardware-accelerated), ChaCha20-Poly1305 last for hosts without AES instructions. Session
//! resumption and 0-RTT are off: every connection presents and verifies a current SVID, and
//! no request can arrive before the handshake has authenticated the client.

use std::sync::Arc;

use certs::SpiffeId;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite;

use crate::clock::{Clock, RustlsTime};
use crate::identity::{CertResolver, FailureSlot, IdentityHandle, SvidVerifier};

/// The ALPN protocol ID of transportd's wire protocol, major version 1.
pub const ALPN: &[u8] = b"transportd/1";

/// The crypto provider every connection uses: aws-lc-rs, TLS 1.3 suites in the order above.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The server side: requires and verifies a client SVID.
pub(crate) fn server_config(
    identity: &IdentityHandle,
    clock: Arc<dyn Clock>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SvidVerifier::new(identity.watch(), &provider, None, None));
    let mut c = rustls::ServerConfig::builder_with_details(provider, Arc::new(RustlsTime(clock)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertResolver(identity.watch())));
    c.alpn_protocols = vec![ALPN.to_vec()];
    c.ignore_client_order = true;
    c.max_early_data_size = 0;
    c.send_tls13_tickets = 0;
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(c)
}

/// The client side: presents our SVID and verifies the server's, optionally insisting on a
/// particular server ID. A refusal's reason is left in `failure`.
pub(crate) fn client_config(
    identity: &IdentityHandle,
    expect: Option<SpiffeId>,
    failure: FailureSlot,
    clock: Arc<dyn Clock>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SvidVerifier::new(
        identity.watch(),
        &provider,
        expect,
        Some(failure),
    ));
    let mut c = rustls::ClientConfig::builder_with_details(provider, Arc::new(RustlsTime(clock)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CertResolver(identity.watch())));
    c.alpn_protocols = vec![ALPN.to_vec()];
    c.resumption = Resumption::disabled();
    c.enable_early_data = false;
    // SPIFFE authenticates by URI SAN, not by host name: send no SNI.
    c.enable_sni = false;
    Ok(c)
}

/// The placeholder server name rustls needs; no SNI is sent and no name is checked.
pub(crate) const SERVER_NAME: &str = "transportd.invalid";

/// A server configuration for a control plane of our own (the identity issuer's agent API):
/// TLS 1.3, our current SVID, and a client certificate that is *optional*, so a node with no
/// SVID yet can attest with a join token, but that is verified by the SVID rules (and the
/// revocation list) whenever one is presented. The caller decides, per request, what an
/// anonymous peer may do.
pub fn control_server_config(
    identity: &IdentityHandle,
    alpn: &[u8],
    clock: Arc<dyn Clock>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(OptionalClientAuth(SvidVerifier::new(
        identity.watch(),
        &provider,
        None,
        None,
    )));
    let mut c = rustls::ServerConfig::builder_with_details(provider, Arc::new(RustlsTime(clock)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertResolver(identity.watch())));
    c.alpn_protocols = vec![alpn.to_vec()];
    c.max_early_data_size = 0;
    c.send_tls13_tickets = 0;
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(c)
}

/// A client configuration for a control plane of our own: TLS 1.3, the server must present
/// an SVID for exactly `server` that verifies against `bundle` (by the SPIFFE rules), and we
/// present `client` if we have one (a node before its first SVID has none).
pub fn control_client_config(
    bundle: &certs::TrustBundle,
    server: &SpiffeId,
    client: Option<&certs::Svid>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(BundleVerifier {
        bundle: bundle.clone(),
        expect: server.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut c = match client {
        Some(svid) => {
            builder.with_client_auth_cert(svid.chain().to_vec(), svid.key().clone_key())?
        }
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    c.resumption = Resumption::disabled();
    c.enable_early_data = false;
    c.enable_sni = false;
    Ok(c)
}

/// The server name to give [`control_client_config`] connections: none is sent (no SNI)
/// and none is checked; the server is authenticated by its SPIFFE ID.
pub fn control_server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Our SVID verifier with the client certificate optional.
#[derive(Debug)]
struct OptionalClientAuth(SvidVerifier);

impl rustls::server::danger::ClientCertVerifier for OptionalClientAuth {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::server::danger::ClientCertVerifier::verify_tls12_signature(
            &self.0, message, cert, dss,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::server::danger::ClientCertVerifier::verify_tls13_signature(
            &self.0, message, cert, dss,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::server::danger::ClientCertVerifier::supported_verify_schemes(&self.0)
    }
}

/// Verifies a server's SVID against a bundle we hold (no credentials of our own needed).
#[derive(Debug)]
struct BundleVerifier {
    bundle: certs::TrustBundle,
    expect: SpiffeId,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for BundleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        let refuse = |m: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(std::io::Error::other(m)),
            )))
        };
        let v = self
            .bundle
            .verify(&chain, now, certs::Usage::Server)
            .map_err(|e| refuse(e.to_string()))?;
        if v.id != self.expect {
            return Err(refuse(format!(
                "server is {} but {} was expected",
                v.id, self.expect
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
