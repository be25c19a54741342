//! SVID verification against a trust bundle: every SPIFFE rule refuses what it must, on
//! both TLS sides, including the cases WebPKI path validation alone lets through.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::time::{Duration, SystemTime};

use certs::test_util::{Defect, TestPki};
use certs::{
    BundleError, Ca, CaParams, MalformedCert, Svid, SvidError, TrustBundle, TrustDomain, Usage,
};
use proptest::prelude::*;
use rustls_pki_types::{CertificateDer, UnixTime};

fn pki() -> TestPki {
    TestPki::new("hospital.example")
}

#[test]
fn a_valid_svid_verifies_on_both_sides() {
    let pki = pki();
    let svid = pki.svid("/node/gpu-0");
    for usage in [Usage::Client, Usage::Server] {
        let v = pki.bundle().verify(svid.chain(), now(), usage).unwrap();
        assert_eq!(v.id, pki.id("/node/gpu-0"));
        assert_eq!(v.serial, svid.serial());
        assert_eq!(v.not_after, svid.not_after());
    }
}

#[test]
fn each_defect_is_refused_with_its_own_reason() {
    let pki = pki();
    for defect in Defect::ALL {
        let bad = pki.bad_svid("/node/gpu-0", defect);
        for usage in [Usage::Client, Usage::Server] {
            let e = pki
                .bundle()
                .verify(bad.chain(), now(), usage)
                .expect_err(&format!("{defect:?} must be refused"));
            let ok = match defect {
                Defect::Expired => matches!(e, SvidError::Expired { .. }),
                Defect::NotYetValid => matches!(e, SvidError::NotYetValid { .. }),
                Defect::ForeignTrustDomain => matches!(e, SvidError::ForeignTrustDomain { .. }),
                Defect::TwoUriSans => matches!(e, SvidError::UriSanCount(2)),
                Defect::NoUriSan => matches!(e, SvidError::UriSanCount(0)),
                Defect::CaAsLeaf => matches!(e, SvidError::IsCa),
                Defect::CertSignKeyUsage => matches!(e, SvidError::SigningKeyUsage),
            };
            assert!(ok, "{defect:?} refused for the wrong reason: {e}");
        }
    }
}

/// The control: rustls's WebPKI verification alone accepts these leaves, because our CA
/// signed them. Only the SPIFFE rules above refuse them.
#[test]
fn webpki_alone_accepts_what_the_spiffe_rules_refuse() {
    let pki = pki();
    let anchor = webpki::anchor_from_trusted_cert(pki.ca().cert_der())
        .unwrap()
        .to_owned();
    for defect in [
        Defect::ForeignTrustDomain,
        Defect::TwoUriSans,
        Defect::NoUriSan,
    ] {
        let bad = pki.bad_svid("/node/x", defect);
        let ee = webpki::EndEntityCert::try_from(&bad.chain()[0]).unwrap();
        let t = UnixTime::since_unix_epoch(now().duration_since(SystemTime::UNIX_EPOCH).unwrap());
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &[],
            t,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap_or_else(|e| {
            panic!("{defect:?}: webpki itself refused ({e:?}); the control no longer shows the gap")
        });
        assert!(
            pki.bundle()
                .verify(bad.chain(), now(), Usage::Client)
                .is_err()
        );
    }
}

#[test]
fn another_cas_svid_is_an_unknown_issuer() {
    let ours = pki();
    let theirs = TestPki::new("hospital.example");
    let svid = theirs.svid("/node/rogue");
    let e = ours
        .bundle()
        .verify(svid.chain(), now(), Usage::Client)
        .unwrap_err();
    assert_eq!(e, SvidError::UnknownIssuer);
    assert!(matches!(
        ours.bundle().verify(&[], now(), Usage::Client),
        Err(SvidError::NoCertificate)
    ));
}

#[test]
fn malformed_chains_say_what_is_wrong() {
    let pki = pki();
    let svid = pki.svid("/node/m");
    let leaf = svid.chain()[0].clone();
    let long = vec![leaf.clone(); certs::MAX_CHAIN_LEN + 1];
    assert_eq!(
        pki.bundle()
            .verify(&long, now(), Usage::Client)
            .unwrap_err(),
        SvidError::Malformed(MalformedCert::ChainTooLong(certs::MAX_CHAIN_LEN + 1))
    );
    let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
    assert!(matches!(
        pki.bundle().verify(&[garbage], now(), Usage::Client),
        Err(SvidError::Malformed(MalformedCert::Webpki(_)))
    ));
    let mut trailing = leaf.to_vec();
    trailing.push(0);
    let e =
        Svid::from_der(vec![CertificateDer::from(trailing)], svid.key().clone_key()).unwrap_err();
    assert_eq!(e, SvidError::Malformed(MalformedCert::TrailingBytes));
    assert_eq!(
        e.to_string(),
        "malformed certificate: trailing bytes after the certificate"
    );
    assert!(matches!(
        Svid::from_pem(&svid.chain_pem(), "not a key"),
        Err(SvidError::Malformed(MalformedCert::KeyPem(_)))
    ));
}

#[test]
fn validity_is_judged_at_the_time_given() {
    let pki = pki();
    let svid = pki.svid_with_ttl("/w", Duration::from_secs(600));
    let b = pki.bundle();
    assert!(b.verify(svid.chain(), now(), Usage::Server).is_ok());
    assert!(matches!(
        b.verify(
            svid.chain(),
            now() + Duration::from_secs(3600),
            Usage::Server
        ),
        Err(SvidError::Expired { .. })
    ));
    assert!(matches!(
        b.verify(
            svid.chain(),
            now() - Duration::from_secs(3600),
            Usage::Server
        ),
        Err(SvidError::NotYetValid { .. })
    ));
}

#[test]
fn bundles_hold_several_cas_of_one_trust_domain() {
    let a = pki();
    let b = pki();
    let pem = format!("{}{}", a.bundle().to_pem(), b.bundle().to_pem());
    let both = TrustBundle::from_pem(&pem).unwrap();
    assert_eq!(both.cas().len(), 2);
    assert_eq!(both.trust_domain().as_str(), "hospital.example");
    for pki in [&a, &b] {
        let svid = pki.svid("/node/n");
        both.verify(svid.chain(), now(), Usage::Client).unwrap();
    }
    assert_eq!(TrustBundle::from_pem(&both.to_pem()).unwrap(), both);
}

#[test]
fn malformed_bundles_are_refused() {
    assert!(matches!(TrustBundle::from_pem(""), Err(BundleError::Empty)));
    let a = pki();
    let other = TestPki::new("other.example");
    let mixed = format!("{}{}", a.bundle().to_pem(), other.bundle().to_pem());
    assert!(matches!(
        TrustBundle::from_pem(&mixed),
        Err(BundleError::MixedTrustDomains { .. })
    ));
    // A leaf is not a CA.
    let leaf = a.svid("/node/n");
    let e = TrustBundle::from_pem(&leaf.chain_pem()).unwrap_err();
    assert_eq!(
        e,
        BundleError::Ca {
            index: 0,
            reason: SvidError::NotCa
        }
    );
    assert_eq!(
        e.to_string(),
        "bundle certificate 0: not a CA certificate (basic constraints CA:true missing)"
    );
    assert!(matches!(
        TrustBundle::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n"),
        Err(BundleError::Pem(_))
    ));
}

#[test]
fn svid_files_with_broken_leaves_do_not_load() {
    let pki = pki();
    for defect in [
        Defect::TwoUriSans,
        Defect::NoUriSan,
        Defect::CaAsLeaf,
        Defect::CertSignKeyUsage,
    ] {
        let bad = pki.bad_svid("/node/n", defect);
        let key = pem_key(&bad);
        assert!(
            Svid::from_pem(&bad.chain_pem(), &key).is_err(),
            "{defect:?}"
        );
    }
    assert!(Svid::from_pem("", "").is_err());
}

#[test]
fn a_ca_of_another_trust_domain_does_not_vouch_for_ours() {
    // A bundle for other.example, and an SVID of hospital.example signed by other.example's
    // CA cannot exist: Ca::issue refuses foreign IDs. What a foreign bundle must refuse is an
    // SVID of its own CA naming our trust domain.
    let other = TestPki::new("other.example");
    let svid = other.bad_svid("/node/n", Defect::ForeignTrustDomain);
    assert!(matches!(
        other.bundle().verify(svid.chain(), now(), Usage::Client),
        Err(SvidError::ForeignTrustDomain { .. })
    ));
    let ca = Ca::generate(
        &TrustDomain::new("third.example").unwrap(),
        &CaParams::default(),
        now(),
    )
    .unwrap();
    assert!(
        ca.bundle()
            .verify(svid.chain(), now(), Usage::Client)
            .is_err()
    );
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = certs::Csr::from_der(&bytes);
        let _ = TrustBundle::from_der(vec![CertificateDer::from(bytes.clone())]);
        let _ = pki_verify(&bytes);
    }
}

fn pki_verify(bytes: &[u8]) -> Result<(), SvidError> {
    thread_local! { static PKI: TestPki = pki(); }
    PKI.with(|p| {
        p.bundle()
            .verify(
                &[CertificateDer::from(bytes.to_vec())],
                now(),
                Usage::Client,
            )
            .map(|_| ())
    })
}

fn pem_key(svid: &Svid) -> String {
    use rustls_pki_types::PrivateKeyDer;
    let PrivateKeyDer::Pkcs8(k) = svid.key() else {
        panic!("test keys are PKCS#8");
    };
    pem::encode(&pem::Pem::new("PRIVATE KEY", k.secret_pkcs8_der()))
}

#[allow(clippy::disallowed_methods)] // TestPki mints at real time.
fn now() -> SystemTime {
    SystemTime::now()
}
