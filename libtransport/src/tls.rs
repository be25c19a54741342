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

/// The crypto provider every connection uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
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
