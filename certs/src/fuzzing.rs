//! Fuzzing entry points, compiled only under `--cfg fuzzing` (cargo-fuzz sets it). Each takes
//! the fuzzer's bytes and feeds one parser, so the targets in `certs/fuzz/fuzz_targets/` are
//! one-liners; each also checks what must hold for whatever the parser accepts (a parsed value
//! survives its own encoding), so a wrong acceptance is a finding too, not only a panic.
//!
//! Inputs that carry several certificates use [`parts`]: a run of `len: u16 BE, bytes[len]`
//! items, the last one taking what is left. [`encode_parts`] writes that form, for seeds.
//!
//! Nothing here is part of the crate's API. The seed corpus in `certs/fuzz/corpus/` is
//! written by the ignored test at the bottom (`scripts/fuzz.sh --write-seeds` runs it).

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Csr, SpiffeId, Svid, TrustBundle, TrustDomain, Usage};

/// Attestation inputs, from the issuer's admin API and a node's token file: `Selector`
/// text, join token secrets and stored hashes, and a registration entry as JSON. An accepted
/// selector prints back to its text; an accepted token hashes to a hash that parses; an
/// entry that validates matches only workloads that satisfy every one of its selectors.
pub fn attest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = text.parse::<crate::Selector>() {
        assert_eq!(sel.to_string(), text);
    }
    if let Ok(token) = crate::JoinToken::from_secret(text) {
        let hash = token.hash();
        assert_eq!(crate::TokenHash::parse(hash.as_str()).as_ref(), Ok(&hash));
    }
    if let Ok(hash) = crate::TokenHash::parse(text) {
        assert_eq!(hash.as_str(), text);
    }
    if let Ok(entry) = serde_json::from_str::<crate::RegistrationEntry>(text) {
        let td = entry.spiffe_id.trust_domain();
        if entry.validate(&td).is_ok() {
            let nobody = crate::Workload {
                uid: u32::MAX,
                gid: u32::MAX,
                path: None,
            };
            let satisfies_all = entry.selectors.iter().all(|s| nobody.satisfies(s));
            assert_eq!(entry.matches(&nobody), satisfies_all);
            let again: crate::RegistrationEntry =
                serde_json::from_str(&serde_json::to_string(&entry).unwrap_or_default())
                    .unwrap_or_else(|e| panic!("entry does not round-trip: {e}"));
            assert_eq!(again, entry);
        }
    }
}

/// `SpiffeId::parse` and `TrustDomain::new` on UTF-8 text. An accepted ID keeps its exact
/// text, splits into trust domain and path that rebuild it, and parses again to itself.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        let td = id.trust_domain();
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
            text
        );
        assert!(id.is_member_of(&td));
        assert_eq!(SpiffeId::from_parts(&td, id.path()).as_ref(), Ok(&id));
        assert_eq!(TrustDomain::new(td.as_str()).as_ref(), Ok(&td));
    }
    if let Ok(td) = TrustDomain::new(text) {
        assert_eq!(td.as_str(), text);
        assert_eq!(SpiffeId::parse(td.id().as_str()), Ok(td.id()));
    }
}

/// `Svid::from_pem` on a chain PEM and a key PEM (split at the first NUL byte), and the leaf
/// rules (`Svid::from_der`) on the whole input as one DER certificate. An accepted SVID reads
/// back the same from its own chain PEM.
pub fn svid(data: &[u8]) {
    let (chain, key) = split_at_nul(data);
    if let (Ok(chain), Ok(key)) = (std::str::from_utf8(chain), std::str::from_utf8(key))
        && let Ok(svid) = Svid::from_pem(chain, key)
    {
        let again = Svid::from_pem(&svid.chain_pem(), key).expect("an SVID's own PEM parses");
        assert_eq!(again.id(), svid.id());
        assert_eq!(again.chain(), svid.chain());
        assert_eq!(again.serial(), svid.serial());
        assert_eq!(again.not_after(), svid.not_after());
    }
    // The key is not looked at by `from_der`: the leaf rules are what is under test.
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(Vec::new()));
    if let Ok(svid) = Svid::from_der(vec![CertificateDer::from(data.to_vec())], key) {
        assert!(!svid.id().path().is_empty(), "an SVID names a workload");
    }
}

/// `TrustBundle::from_pem` on UTF-8 text, and `TrustBundle::from_der` on [`parts`]. An
/// accepted bundle reads back equal from its own PEM.
pub fn bundle(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(bundle) = TrustBundle::from_pem(text)
    {
        assert_eq!(
            TrustBundle::from_pem(&bundle.to_pem()).as_ref(),
            Ok(&bundle)
        );
        assert!(!bundle.cas().is_empty());
    }
    let cas = parts(data)
        .into_iter()
        .map(|p| CertificateDer::from(p.to_vec()))
        .collect();
    if let Ok(bundle) = TrustBundle::from_der(cas) {
        assert_eq!(
            TrustBundle::from_pem(&bundle.to_pem()).as_ref(),
            Ok(&bundle)
        );
    }
}

/// `TrustBundle::verify`: the input is `now` (u64 BE, Unix seconds), a usage byte (even:
/// client, odd: server), the number of bundle CAs, then [`parts`]: that many CA certificates
/// followed by the chain to verify, leaf first. What verifies is an SVID of the bundle's
/// trust domain, naming a workload, valid at `now`.
pub fn svid_chain(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<10>() else {
        return;
    };
    let mut secs = [0u8; 8];
    secs.copy_from_slice(&head[..8]);
    let secs = u64::from_be_bytes(secs);
    let Some(now) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)) else {
        return;
    };
    let usage = if head[8] % 2 == 0 {
        Usage::Client
    } else {
        Usage::Server
    };
    let all = parts(rest);
    let (cas, chain) = all.split_at(usize::from(head[9]).min(all.len()));
    let cas = cas
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let Ok(bundle) = TrustBundle::from_der(cas) else {
        return;
    };
    let chain: Vec<CertificateDer<'_>> = chain.iter().map(|c| CertificateDer::from(*c)).collect();
    if let Ok(v) = bundle.verify(&chain, now, usage) {
        assert!(v.id.is_member_of(bundle.trust_domain()));
        assert!(!v.id.path().is_empty());
        assert!(v.not_after >= now, "verified an expired SVID");
    }
}

/// `Csr::from_der` on the input, and `Csr::from_pem` on it as text. An accepted request keeps
/// its exact bytes and reads back the same from its own PEM.
pub fn csr(data: &[u8]) {
    if let Ok(csr) = Csr::from_der(data) {
        assert_eq!(csr.der(), data);
        let pem = csr.to_pem().expect("a parsed request encodes");
        let again = Csr::from_pem(&pem).expect("a request's own PEM parses");
        assert_eq!(again.der(), csr.der());
        assert_eq!(again.requested_id(), csr.requested_id());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Csr::from_pem(text);
    }
}

/// Splits `data` into `len: u16 BE, bytes[len]` items; the last item takes what is left if
/// it is short. At most [`MAX_PARTS`] items.
pub fn parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < MAX_PARTS {
        let Some((len, rest)) = data.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (part, rest) = rest.split_at(len);
        out.push(part);
        data = rest;
    }
    out
}

/// The inverse of [`parts`], for writing seeds.
pub fn encode_parts<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let len = u16::try_from(item.len()).expect("seed items are under 64 KiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn split_at_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Enough items for a bundle over its limit (64 CAs) plus a chain over its limit (8).
pub const MAX_PARTS: usize = 80;

#[cfg(all(test, feature = "test-util"))]
mod seeds {
    use std::path::Path;

    use super::*;
    use crate::KeyAlgorithm;
    use crate::test_util::{Defect, TestPki};

    /// A fixed "now" for the seeds, so `svid_chain` seeds verify whenever they are run.
    const NOW_SECS: u64 = 1_790_000_000;

    fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        std::fs::write(d.join(name), bytes).expect("seed");
    }

    /// Chain PEM and key PEM for [`svid`] seeds; the key is a placeholder, since `from_pem`
    /// only checks that a PEM private key is there (no real key is committed).
    fn svid_seed(chain_pem: &str) -> Vec<u8> {
        let key = crate::pem_encode("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        let mut out = chain_pem.as_bytes().to_vec();
        out.push(0);
        out.extend_from_slice(key.as_bytes());
        out
    }

    fn chain_input(now: u64, usage: u8, cas: &[&[u8]], chain: &[&[u8]]) -> Vec<u8> {
        let mut out = now.to_be_bytes().to_vec();
        out.push(usage);
        out.push(u8::try_from(cas.len()).expect("few CAs"));
        out.extend(encode_parts(cas.iter().chain(chain).copied()));
        out
    }

    #[test]
    #[ignore = "writes the seed corpus: scripts/fuzz.sh --write-seeds"]
    fn write_seed_corpus() {
        let dir = std::env::var("FUZZ_CORPUS_DIR").expect("FUZZ_CORPUS_DIR names the corpus");
        let dir = Path::new(&dir);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS);
        let pki = TestPki::at("hospital.example", now);
        let ca = pki.ca().cert_der().to_vec();

        for (name, id) in [
            ("workload", "spiffe://hospital.example/gpu/loader-0"),
            ("trust-domain", "spiffe://hospital.example"),
            ("deep", "spiffe://a-b_c.9/ns/prod/sa/x.y-z_1"),
            ("bad-dot", "spiffe://example.org/a/../b"),
            ("bad-port", "spiffe://example.org:443/a"),
        ] {
            write(dir, "spiffe_id", name, id.as_bytes());
        }

        let good = pki.svid("/gpu/loader-0");
        let leaf = good.chain()[0].to_vec();
        write(dir, "svid", "pem", &svid_seed(&good.chain_pem()));
        write(dir, "svid", "der", &leaf);
        for defect in [Defect::TwoUriSans, Defect::NoUriSan, Defect::CaAsLeaf] {
            let bad = pki.bad_svid("/gpu/loader-0", defect);
            write(dir, "svid", &format!("der-{defect:?}"), &bad.chain()[0]);
        }

        write(dir, "bundle", "pem", pki.bundle().to_pem().as_bytes());
        write(dir, "bundle", "der", &encode_parts([&ca[..]]));
        let other = TestPki::at("other.example", now);
        let two = [&ca[..], &other.ca().cert_der()[..]];
        write(dir, "bundle", "mixed-der", &encode_parts(two));

        write(
            dir,
            "svid_chain",
            "client",
            &chain_input(NOW_SECS, 0, &[&ca], &[&leaf]),
        );
        write(
            dir,
            "svid_chain",
            "server",
            &chain_input(NOW_SECS, 1, &[&ca], &[&leaf]),
        );
        for defect in Defect::ALL {
            let bad = pki.bad_svid("/gpu/loader-0", defect);
            write(
                dir,
                "svid_chain",
                &format!("{defect:?}"),
                &chain_input(NOW_SECS, 0, &[&ca], &[&bad.chain()[0]]),
            );
        }
        write(
            dir,
            "svid_chain",
            "expired",
            &chain_input(NOW_SECS + 30 * 24 * 3600, 0, &[&ca], &[&leaf]),
        );

        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
        ] {
            let (_key, csr) =
                crate::generate_key_and_csr(&pki.id("/gpu/loader-0"), alg).expect("CSR");
            write(dir, "csr", &format!("{alg:?}-der"), csr.der());
            write(
                dir,
                "csr",
                &format!("{alg:?}-pem"),
                csr.to_pem().expect("PEM").as_bytes(),
            );
        }
    }
}
