//! The CA and the SVIDs it issues have the shape the X.509-SVID standard asks for, and
//! issuance refuses what it must.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::time::{Duration, SystemTime};

use certs::{
    Ca, CaError, CaParams, Csr, CsrError, IssueError, IssueParams, KeyAlgorithm, SpiffeId, Svid,
    TrustDomain, generate_key_and_csr,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME};
use x509_parser::prelude::FromDer;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("hospital.example").unwrap()
}

fn ca() -> Ca {
    Ca::generate(&td(), &CaParams::default(), now()).unwrap()
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ca_is_a_self_signed_p256_ca_naming_its_trust_domain() {
    let ca = ca();
    let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
    assert_eq!(cert.subject(), cert.issuer(), "self-signed");
    assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(uris(&cert), vec!["spiffe://hospital.example".to_owned()]);
    // ecdsa-with-SHA256
    assert_eq!(
        cert.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.2"
    );
    assert_eq!(ca.not_after(), now() + CaParams::default().validity);
    // And it reloads from its PEM files.
    let again = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(again.trust_domain(), &td());
    assert_eq!(again.cert_der(), ca.cert_der());
}

#[test]
fn svid_has_one_uri_san_ca_false_critical_digital_signature_and_both_ekus() {
    let ca = ca();
    let id = SpiffeId::parse("spiffe://hospital.example/node/gpu-0").unwrap();
    let (key, csr) = generate_key_and_csr(&id, KeyAlgorithm::default()).unwrap();
    let issued = ca.issue(&csr, &id, &IssueParams::default(), now()).unwrap();
    assert_eq!(issued.chain.len(), 1);
    let (_, cert) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    assert_eq!(uris(&cert), vec![id.to_string()]);
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basic constraints present");
    assert!(!bc.value.ca, "CA:false");
    let ku_ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid == OID_X509_EXT_KEY_USAGE)
        .unwrap();
    assert!(ku_ext.critical, "key usage is critical");
    let ParsedExtension::KeyUsage(ku) = ku_ext.parsed_extension() else {
        panic!("key usage did not parse");
    };
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // Exactly one SAN extension.
    let sans = cert
        .extensions()
        .iter()
        .filter(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
        .count();
    assert_eq!(sans, 1);
    // Default TTL: one hour from issuance; the start is backdated five minutes, so a peer
    // whose clock is a few minutes behind the issuer's accepts it.
    let v = cert.validity();
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(v.not_after.timestamp(), unix(now()) + 3600);
    assert_eq!(v.not_before.timestamp(), unix(now()) - 300);
    assert_eq!(issued.not_after, now() + Duration::from_secs(3600));
    // The key the node generated is the key certified, and the pair loads as an SVID.
    let svid = Svid::from_pem(&issued.chain_pem(), &key).unwrap();
    assert_eq!(svid.id(), &id);
    assert_eq!(svid.serial(), issued.serial);
    let csr_parsed =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr.der())
            .unwrap()
            .1;
    assert_eq!(
        cert.public_key().raw,
        csr_parsed.certification_request_info.subject_pki.raw
    );
}

#[test]
fn svids_never_outlive_their_ca() {
    let params = CaParams {
        validity: Duration::from_secs(1800),
        ..CaParams::default()
    };
    let ca = Ca::generate(&td(), &params, now()).unwrap();
    let id = SpiffeId::parse("spiffe://hospital.example/w").unwrap();
    let (_, csr) = generate_key_and_csr(&id, KeyAlgorithm::default()).unwrap();
    let issued = ca
        .issue(
            &csr,
            &id,
            &IssueParams {
                ttl: Duration::from_secs(7200),
            },
            now(),
        )
        .unwrap();
    assert_eq!(issued.not_after, ca.not_after());
    // And an expired CA issues nothing.
    let late = now() + Duration::from_secs(3600);
    assert!(matches!(
        ca.issue(&csr, &id, &IssueParams::default(), late),
        Err(IssueError::CaExpired { .. })
    ));
}

#[test]
fn issuance_refuses_foreign_ids_mismatched_requests_and_bad_ttls() {
    let ca = ca();
    let id = SpiffeId::parse("spiffe://hospital.example/node/a").unwrap();
    let (_, csr) = generate_key_and_csr(&id, KeyAlgorithm::default()).unwrap();
    let foreign = SpiffeId::parse("spiffe://other.example/node/a").unwrap();
    assert!(matches!(
        ca.issue(&csr, &foreign, &IssueParams::default(), now()),
        Err(IssueError::ForeignId { .. })
    ));
    let other = SpiffeId::parse("spiffe://hospital.example/node/b").unwrap();
    assert!(matches!(
        ca.issue(&csr, &other, &IssueParams::default(), now()),
        Err(IssueError::IdMismatch { .. })
    ));
    let root = td().id();
    let (_, root_csr) = generate_key_and_csr(&root, KeyAlgorithm::default()).unwrap();
    assert!(matches!(
        ca.issue(&root_csr, &root, &IssueParams::default(), now()),
        Err(IssueError::NoPath(_))
    ));
    for ttl in [Duration::ZERO, Duration::from_secs(400 * 24 * 3600)] {
        assert!(matches!(
            ca.issue(&csr, &id, &IssueParams { ttl }, now()),
            Err(IssueError::Ttl(_))
        ));
    }
}

#[test]
fn tampered_or_garbage_csrs_are_refused() {
    let id = SpiffeId::parse("spiffe://hospital.example/node/a").unwrap();
    let (_, csr) = generate_key_and_csr(&id, KeyAlgorithm::default()).unwrap();
    let der = csr.der().to_vec();
    // Flip a byte inside the signed part (in the public key, near the middle).
    let mut tampered = der.clone();
    let at = der.len() / 2;
    tampered[at] ^= 0x01;
    assert!(matches!(Csr::from_der(&tampered), Err(IssueError::Csr(_))));
    assert!(matches!(
        Csr::from_der(b"not a csr"),
        Err(IssueError::Csr(CsrError::Der(_)))
    ));
    let mut trailing = der.clone();
    trailing.push(0);
    assert!(matches!(
        Csr::from_der(&trailing),
        Err(IssueError::Csr(CsrError::TrailingBytes))
    ));
    assert!(matches!(
        Csr::from_der(&vec![0x30; 100_000]),
        Err(IssueError::Csr(CsrError::TooLarge(100_000)))
    ));
    assert!(matches!(
        Csr::from_pem(
            "-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n"
        ),
        Err(IssueError::Csr(CsrError::Pem(_)))
    ));
    // The genuine one round-trips through PEM.
    let back = Csr::from_pem(&csr.to_pem().unwrap()).unwrap();
    assert_eq!(back.requested_id(), Some(&id));
}

#[test]
fn every_key_algorithm_issues_and_loads() {
    let ca = ca();
    let id = SpiffeId::parse("spiffe://hospital.example/node/k").unwrap();
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let (key, csr) = generate_key_and_csr(&id, alg).unwrap();
        let issued = ca.issue(&csr, &id, &IssueParams::default(), now()).unwrap();
        Svid::from_pem(&issued.chain_pem(), &key).unwrap();
    }
}

#[test]
fn a_ca_key_that_does_not_match_its_certificate_is_refused() {
    let a = ca();
    let b = ca();
    let e = Ca::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(matches!(e, IssueError::Ca(CaError::KeyMismatch)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "CA: the private key does not belong to the CA certificate"
    );
}
