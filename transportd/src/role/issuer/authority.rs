//! The issuer's CAs: the one that signs, the bundle every node trusts, and rollover.
//!
//! A rollover has three steps, each a command an operator runs while traffic flows:
//! `prepare` creates the next CA and adds it to the bundle (nodes pick it up at their next
//! sync, so they trust it before anything it signs appears); `activate` makes it the
//! signing CA (SVIDs renew under it over their next half-life), the old one staying in the
//! bundle as `previous`; `retire` drops the old CA from the bundle once the last SVID it
//! signed has expired (`--force` to do it earlier, which cuts those SVIDs off).
//!
//! CA keys live in `<data_dir>/ca/<serial>.key`, mode 0600, encrypted under a passphrase
//! when one is configured; certificates and states live in the database.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use anyhow::{Context, bail};
use certs::{Ca, CaParams, TrustBundle, TrustDomain};
use zeroize::Zeroizing;

use super::state::{CaRow, CaState, State};
use crate::fsutil;

/// The signing CA and the bundle.
#[derive(Debug)]
pub(crate) struct Authority {
    td: TrustDomain,
    dir: PathBuf,
    passphrase: Option<Zeroizing<Vec<u8>>>,
    params: CaParams,
    current: RwLock<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    active: Arc<Ca>,
    serial: String,
    bundle: TrustBundle,
}

/// What changed, for the audit trail.
#[derive(Debug, Clone)]
pub(crate) struct CaChange {
    pub(crate) change: &'static str,
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
}

impl Authority {
    /// Loads the CAs from the database, creating the first one (imported from a
    /// `transportd ca init` directory, or generated) if there is none.
    pub(crate) fn open(
        state: &State,
        td: &TrustDomain,
        dir: &Path,
        passphrase: Option<Zeroizing<Vec<u8>>>,
        params: CaParams,
        import: Option<&Path>,
        now: SystemTime,
    ) -> anyhow::Result<(Self, Option<CaChange>)> {
        fsutil::private_dir(dir)?;
        let mut created = None;
        if !state.cas()?.iter().any(|c| c.state == CaState::Active) {
            let ca = match import {
                Some(from) => {
                    let cert = std::fs::read_to_string(from.join("ca.pem"))
                        .with_context(|| format!("ca.import: reading {}/ca.pem", from.display()))?;
                    let key =
                        Zeroizing::new(std::fs::read_to_string(from.join("ca.key")).with_context(
                            || format!("ca.import: reading {}/ca.key", from.display()),
                        )?);
                    let key = plain_key(&key, passphrase.as_ref().map(|p| p.as_slice()))?;
                    Ca::from_pem(&cert, &key).context("ca.import")?
                }
                None => Ca::generate(td, &params, now).context("generating the first CA")?,
            };
            if ca.trust_domain() != td {
                bail!(
                    "the CA to import is for trust domain {}, not {td}",
                    ca.trust_domain()
                );
            }
            let row = store(
                state,
                dir,
                passphrase.as_ref().map(|p| p.as_slice()),
                &ca,
                CaState::Active,
                now,
            )?;
            created = Some(CaChange {
                change: "created",
                serial: row.serial,
                not_after: row.not_after,
            });
        }
        let current = load(state, dir, passphrase.as_ref().map(|p| p.as_slice()))?;
        if current.active.trust_domain() != td {
            bail!(
                "the issuer's database holds a CA for {}, but the configuration says {td}",
                current.active.trust_domain()
            );
        }
        Ok((
            Self {
                td: td.clone(),
                dir: dir.to_path_buf(),
                passphrase,
                params,
                current: RwLock::new(current),
            },
            created,
        ))
    }

    /// The CA that signs now, and its serial.
    pub(crate) fn active(&self) -> (Arc<Ca>, String) {
        let c = self.read();
        (c.active.clone(), c.serial.clone())
    }

    /// Every CA peers must trust now.
    pub(crate) fn bundle(&self) -> TrustBundle {
        self.read().bundle.clone()
    }

    /// Creates the next CA and adds it to the bundle.
    pub(crate) fn prepare(&self, state: &State, now: SystemTime) -> anyhow::Result<CaChange> {
        let cas = state.cas()?;
        if let Some(p) = cas.iter().find(|c| c.state == CaState::Prepared) {
            bail!(
                "CA {} is already prepared: activate it (`transportd issuer ca activate`) first",
                p.serial
            );
        }
        let ca = Ca::generate(&self.td, &self.params, now).context("generating the next CA")?;
        let row = store(
            state,
            &self.dir,
            self.passphrase.as_ref().map(|p| p.as_slice()),
            &ca,
            CaState::Prepared,
            now,
        )?;
        self.reload(state)?;
        Ok(CaChange {
            change: "prepared",
            serial: row.serial,
            not_after: row.not_after,
        })
    }

    /// Makes the prepared CA the signing one; the old one stays in the bundle as previous.
    pub(crate) fn activate(&self, state: &State) -> anyhow::Result<CaChange> {
        let cas = state.cas()?;
        let Some(next) = cas.iter().find(|c| c.state == CaState::Prepared) else {
            bail!("no CA is prepared: run `transportd issuer ca prepare` first");
        };
        if let Some(prev) = cas.iter().find(|c| c.state == CaState::Previous) {
            bail!(
                "CA {} from the last rollover is still in the bundle: retire it \
                 (`transportd issuer ca retire`) before activating another",
                prev.serial
            );
        }
        let mut changes = vec![(next.serial.as_str(), CaState::Active)];
        if let Some(active) = cas.iter().find(|c| c.state == CaState::Active) {
            changes.push((active.serial.as_str(), CaState::Previous));
        }
        state.ca_transition(&changes)?;
        self.reload(state)?;
        Ok(CaChange {
            change: "activated",
            serial: next.serial.clone(),
            not_after: next.not_after,
        })
    }

    /// Drops the previous CA from the bundle, if no SVID it signed is still valid (unless
    /// `force`); its key file is deleted.
    pub(crate) fn retire(
        &self,
        state: &State,
        now: SystemTime,
        force: bool,
    ) -> anyhow::Result<CaChange> {
        let cas = state.cas()?;
        let Some(prev) = cas.iter().find(|c| c.state == CaState::Previous) else {
            bail!("there is no previous CA to retire (see `transportd issuer status`)");
        };
        let (live, last) = state.live_by_ca(&prev.serial, now)?;
        if live > 0 && !force {
            bail!(
                "{live} SVIDs signed by CA {} are still valid (the last until {}); wait until \
                 then, or pass --force to cut them off now",
                prev.serial,
                last.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_default()
            );
        }
        state.ca_transition(&[(prev.serial.as_str(), CaState::Retired)])?;
        self.reload(state)?;
        let key = self.dir.join(&prev.key_file);
        if let Err(e) = std::fs::remove_file(&key)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "could not delete the retired CA's key file");
        }
        Ok(CaChange {
            change: "retired",
            serial: prev.serial.clone(),
            not_after: prev.not_after,
        })
    }

    fn reload(&self, state: &State) -> anyhow::Result<()> {
        let fresh = load(
            state,
            &self.dir,
            self.passphrase.as_ref().map(|p| p.as_slice()),
        )?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Writes a CA's key file and database row.
fn store(
    state: &State,
    dir: &Path,
    passphrase: Option<&[u8]>,
    ca: &Ca,
    ca_state: CaState,
    now: SystemTime,
) -> anyhow::Result<CaRow> {
    let serial = ca.serial();
    let key_file = format!("{serial}.key");
    let key = match passphrase {
        Some(p) => certs::encrypt_key_pem(&ca.key_pem(), p)?,
        None => ca.key_pem(),
    };
    fsutil::write_atomic(&dir.join(&key_file), key.as_bytes(), 0o600)?;
    let row = CaRow {
        serial,
        state: ca_state,
        cert_pem: ca.cert_pem(),
        key_file,
        not_after: ca.not_after(),
        created_at: now,
    };
    state.ca_insert(&row)?;
    Ok(row)
}

/// Loads the active CA's key and builds the bundle from the database.
fn load(state: &State, dir: &Path, passphrase: Option<&[u8]>) -> anyhow::Result<Current> {
    let cas = state.cas()?;
    let Some(active) = cas.iter().find(|c| c.state == CaState::Active) else {
        bail!("the issuer's database has no active CA");
    };
    let key_path = dir.join(&active.key_file);
    let key = Zeroizing::new(
        std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading the CA key {}", key_path.display()))?,
    );
    let key = plain_key(&key, passphrase)?;
    let ca = Ca::from_pem(&active.cert_pem, &key)
        .with_context(|| format!("loading CA {}", active.serial))?;
    let mut pems = String::new();
    for c in cas.iter().filter(|c| c.state.in_bundle()) {
        pems.push_str(&c.cert_pem);
    }
    let bundle = TrustBundle::from_pem(&pems).context("building the trust bundle")?;
    Ok(Current {
        active: Arc::new(ca),
        serial: active.serial.clone(),
        bundle,
    })
}

/// The key as plain PKCS#8 PEM, decrypting it if it is encrypted.
fn plain_key(pem: &str, passphrase: Option<&[u8]>) -> anyhow::Result<Zeroizing<String>> {
    if certs::is_encrypted_key_pem(pem) {
        let Some(p) = passphrase else {
            bail!(
                "the CA key is encrypted: give its passphrase ([ca] passphrase_file or \
                 passphrase_env in the issuer configuration)"
            );
        };
        return Ok(certs::decrypt_key_pem(pem, p)?);
    }
    if passphrase.is_some() {
        tracing::warn!("a CA key is stored unencrypted although a passphrase is configured");
    }
    Ok(Zeroizing::new(pem.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)
    }

    fn open(
        state: &State,
        td: &TrustDomain,
        dir: &Path,
        pass: Option<&[u8]>,
    ) -> anyhow::Result<(Authority, Option<CaChange>)> {
        Authority::open(
            state,
            td,
            dir,
            pass.map(|p| Zeroizing::new(p.to_vec())),
            CaParams::default(),
            None,
            now(),
        )
    }

    #[test]
    fn rollover_moves_the_bundle_and_the_signer() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        let td = TrustDomain::new("td").unwrap();
        let ca_dir = dir.path().join("ca");
        let (a, created) = open(&state, &td, &ca_dir, Some(b"pass")).unwrap();
        let first = created.unwrap().serial;
        assert_eq!(a.bundle().cas().len(), 1);
        let key = std::fs::read_to_string(ca_dir.join(format!("{first}.key"))).unwrap();
        assert!(
            certs::is_encrypted_key_pem(&key),
            "the key is encrypted at rest"
        );
        assert!(a.activate(&state).is_err(), "nothing prepared");
        let next = a.prepare(&state, now()).unwrap().serial;
        assert_eq!(a.bundle().cas().len(), 2, "both CAs are trusted");
        assert_eq!(a.active().1, first, "the old CA still signs");
        assert!(a.prepare(&state, now()).is_err(), "one at a time");
        a.activate(&state).unwrap();
        assert_eq!(a.active().1, next);
        // An SVID of the old CA still live: retiring needs --force.
        state
            .ledger_insert(&super::super::state::LedgerEntry {
                serial: "01".into(),
                spiffe_id: certs::SpiffeId::parse("spiffe://td/node/a").unwrap(),
                kind: "node",
                node: None,
                ca_serial: first.clone(),
                issued_at: now(),
                not_after: now() + Duration::from_secs(60),
            })
            .unwrap();
        let e = a.retire(&state, now(), false).unwrap_err().to_string();
        assert!(e.contains("still valid"), "{e}");
        a.retire(&state, now() + Duration::from_secs(61), false)
            .unwrap();
        assert_eq!(a.bundle().cas().len(), 1);
        assert!(!ca_dir.join(format!("{first}.key")).exists());
        // Reopened (a restart) with the same passphrase: the new CA signs.
        drop(a);
        let (b, created) = open(&state, &td, &ca_dir, Some(b"pass")).unwrap();
        assert!(created.is_none());
        assert_eq!(b.active().1, next);
        // Without the passphrase the key cannot be read, and the error says why.
        let e = open(&state, &td, &ca_dir, None).unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");
    }
}
