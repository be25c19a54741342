//! What the agent keeps across restarts besides its node SVID (`node.pem`, `bundle.pem`),
//! so a node restarted while the issuer is unreachable still refuses revoked peers and
//! serves its workloads while their SVIDs are valid:
//!
//! * `revoked.json`: the serials the issuer revoked, as of the last sync.
//! * `workloads.json` (mode 0600): the workload SVIDs the agent minted, each with its
//!   registration entry; each private key sealed with AES-256-GCM under a key derived
//!   (HKDF-SHA256) from the node's own private key, bound to its entry. A copy of the file
//!   alone gives no key away; whoever holds the node's key holds more than these anyway.
//!   The file is written again whenever the SVIDs or the node's key change.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use certs::{RegistrationEntry, Svid, TrustBundle};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::fsutil;

/// The revocation list, as of the last sync.
const REVOKED_FILE: &str = "revoked.json";
/// The workload SVIDs, keys sealed.
const WORKLOADS_FILE: &str = "workloads.json";
/// Domain separation for the sealing key.
const SEAL_SALT: &[u8] = b"transportd agent workload keys v1";

/// Keeps the revocation list.
pub(crate) fn save_revoked(dir: &Path, revoked: &HashSet<String>) -> anyhow::Result<()> {
    let mut serials: Vec<&String> = revoked.iter().collect();
    serials.sort();
    fsutil::write_atomic(
        &dir.join(REVOKED_FILE),
        &serde_json::to_vec(&serials)?,
        0o644,
    )
}

/// The kept revocation list: empty if none was kept. One that does not parse stops the
/// node: starting without it would accept peers revoked before the restart.
pub(crate) fn load_revoked(dir: &Path) -> anyhow::Result<HashSet<String>> {
    let path = dir.join(REVOKED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let serials: Vec<String> = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} does not parse; remove it to start without the kept revocations (peers revoked \
             before now are then accepted until the issuer is reachable)",
            path.display()
        )
    })?;
    Ok(serials.into_iter().collect())
}

/// One kept workload SVID.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    entry: RegistrationEntry,
    /// The certificate chain, PEM.
    chain: String,
    /// The nonce the key was sealed with, hex.
    nonce: String,
    /// The private key's PEM, sealed, hex.
    key: String,
}

/// Keeps `workloads`, their keys sealed under `node_key` (the node's private key, PEM).
pub(crate) fn save_workloads<'a>(
    dir: &Path,
    node_key: &str,
    workloads: impl Iterator<Item = (&'a RegistrationEntry, &'a Svid)>,
) -> anyhow::Result<()> {
    let sealer = sealing_key(node_key)?;
    let mut kept = Vec::new();
    for (entry, svid) in workloads {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness to seal a workload key"))?;
        let mut key = Zeroizing::new(certs::private_key_pem(svid.key()).as_bytes().to_vec());
        sealer
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(entry.id.as_bytes()),
                &mut *key,
            )
            .map_err(|_| anyhow::anyhow!("sealing a workload key failed"))?;
        kept.push(Kept {
            entry: entry.clone(),
            chain: svid.chain_pem(),
            nonce: hex(&nonce),
            key: hex(&key),
        });
    }
    fsutil::write_atomic(
        &dir.join(WORKLOADS_FILE),
        &serde_json::to_vec(&kept)?,
        0o600,
    )
}

/// The kept workload SVIDs that open under `node_key`, chain to `bundle` and are valid at
/// `now`; the others are left out, said in the log.
pub(crate) fn load_workloads(
    dir: &Path,
    node_key: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Vec<(RegistrationEntry, Svid)> {
    let path = dir.join(WORKLOADS_FILE);
    let kept: Vec<Kept> = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(k) => k,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "kept workload SVIDs do not parse; not used");
                return Vec::new();
            }
        },
        Err(_) => return Vec::new(),
    };
    let Ok(opener) = sealing_key(node_key) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for k in kept {
        let opened = open_key(&opener, &k).and_then(|key| {
            let svid = Svid::from_pem(&k.chain, &String::from_utf8_lossy(&key)).ok()?;
            let fresh = svid.not_after() > now
                && bundle
                    .verify(svid.chain(), now, certs::Usage::Client)
                    .is_ok_and(|v| v.id == k.entry.spiffe_id);
            fresh.then_some(svid)
        });
        match opened {
            Some(svid) => out.push((k.entry, svid)),
            None => {
                info!(peer.id = %k.entry.spiffe_id, "a kept workload SVID is expired, no longer verifies or does not open; not used")
            }
        }
    }
    out
}

fn open_key(opener: &LessSafeKey, k: &Kept) -> Option<Zeroizing<Vec<u8>>> {
    let nonce: [u8; NONCE_LEN] = unhex(&k.nonce)?.try_into().ok()?;
    let mut sealed = Zeroizing::new(unhex(&k.key)?);
    let plain = opener
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(k.entry.id.as_bytes()),
            &mut sealed,
        )
        .ok()?;
    Some(Zeroizing::new(plain.to_vec()))
}

/// The AES-256-GCM key workload keys are sealed with, from the node's private key.
fn sealing_key(node_key: &str) -> anyhow::Result<LessSafeKey> {
    let prk = Salt::new(HKDF_SHA256, SEAL_SALT).extract(node_key.as_bytes());
    let okm = prk
        .expand(&[b"workload keys"], &AES_256_GCM)
        .map_err(|_| anyhow::anyhow!("deriving the workload sealing key"))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use certs::test_util::TestPki;

    use super::*;

    fn entry(id: &str, pki: &TestPki) -> RegistrationEntry {
        RegistrationEntry {
            id: id.into(),
            spiffe_id: pki.id("/gpu/loader"),
            parent_id: pki.id("/node/gpu-0"),
            selectors: vec![certs::Selector::Uid(0)],
            ttl: None,
        }
    }

    #[test]
    fn kept_workloads_open_only_under_the_node_key_that_sealed_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new("hospital.example");
        let node = pki.svid("/node/gpu-0");
        let node_key = certs::private_key_pem(node.key());
        let loader = pki.svid("/gpu/loader");
        let e = entry("e1", &pki);
        save_workloads(dir.path(), &node_key, [(&e, &loader)].into_iter()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(WORKLOADS_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // No private key in the clear.
        let text = std::fs::read_to_string(dir.path().join(WORKLOADS_FILE)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        let now = libtransport::clock::Clock::now(&libtransport::clock::SystemClock);
        let back = load_workloads(dir.path(), &node_key, &pki.bundle(), now);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, e);
        assert_eq!(back[0].1.serial(), loader.serial());
        assert_eq!(back[0].1.key(), loader.key());
        // Another node key, another trust domain's bundle, or a time past its expiry: unused.
        let other_key = certs::private_key_pem(pki.svid("/node/gpu-1").key());
        assert!(load_workloads(dir.path(), &other_key, &pki.bundle(), now).is_empty());
        let stranger = TestPki::new("elsewhere.example");
        assert!(load_workloads(dir.path(), &node_key, &stranger.bundle(), now).is_empty());
        let later = loader.not_after() + Duration::from_secs(1);
        assert!(load_workloads(dir.path(), &node_key, &pki.bundle(), later).is_empty());
        // A sealed key moved to another entry does not open (the entry is bound to it).
        let moved = text.replace("\"e1\"", "\"e2\"");
        std::fs::write(dir.path().join(WORKLOADS_FILE), moved).unwrap();
        assert!(load_workloads(dir.path(), &node_key, &pki.bundle(), now).is_empty());
    }

    #[test]
    fn the_revocation_list_is_kept_and_a_broken_one_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_revoked(dir.path()).unwrap().is_empty());
        let revoked: HashSet<String> = ["0a1b".to_owned(), "ff00".to_owned()].into();
        save_revoked(dir.path(), &revoked).unwrap();
        assert_eq!(load_revoked(dir.path()).unwrap(), revoked);
        std::fs::write(dir.path().join(REVOKED_FILE), b"[\"0a1b\",").unwrap();
        let e = load_revoked(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("remove it"), "{e:#}");
    }
}
