//! `transportd ca init | csr | issue`: a trust domain's CA and its X.509-SVIDs.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{Ca, CaParams, Csr, IssueParams, KeyAlgorithm, SpiffeId, TrustDomain};
use libtransport::clock::{Clock, SystemClock};

/// Creates a CA in `out`.
pub(crate) fn init(
    trust_domain: &str,
    out: &Path,
    validity: Duration,
    force: bool,
) -> anyhow::Result<()> {
    let td = TrustDomain::new(trust_domain).context("--trust-domain")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join("ca.key");
    if key_path.exists() && !force {
        bail!(
            "a CA already exists in {} (ca.key); pass --force to replace it, which invalidates every SVID it issued",
            out.display()
        );
    }
    let params = CaParams {
        validity,
        ..CaParams::default()
    };
    let ca = Ca::generate(&td, &params, SystemClock.now()).context("generating the CA")?;
    write_secret(&key_path, ca.key_pem().as_bytes())?;
    write_public(&out.join("ca.pem"), ca.cert_pem().as_bytes())?;
    write_public(&out.join("bundle.pem"), ca.bundle().to_pem().as_bytes())?;
    println!(
        "trust domain {td}: CA valid until {}",
        humantime::format_rfc3339_seconds(ca.not_after())
    );
    println!("  {}  CA certificate", out.join("ca.pem").display());
    println!(
        "  {}  CA private key (mode 0600; keep it off data nodes)",
        key_path.display()
    );
    println!(
        "  {}  trust bundle: copy to every node",
        out.join("bundle.pem").display()
    );
    Ok(())
}

/// Creates a key and CSR for `id` in `out`.
pub(crate) fn csr(id: &str, out: &Path) -> anyhow::Result<()> {
    let id = SpiffeId::parse(id).context("--id")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (key, csr) =
        certs::generate_key_and_csr(&id, KeyAlgorithm::default()).context("generating the key")?;
    write_secret(&out.join("svid.key"), key.as_bytes())?;
    write_public(
        &out.join("svid.csr"),
        csr.to_pem().context("encoding the CSR")?.as_bytes(),
    )?;
    println!("key and CSR for {id}:");
    println!(
        "  {}  private key (mode 0600; stays here)",
        out.join("svid.key").display()
    );
    println!(
        "  {}  send to the CA: transportd ca issue --csr svid.csr ...",
        out.join("svid.csr").display()
    );
    Ok(())
}

/// Issues an SVID for `id` from the CA in `ca_dir`.
pub(crate) fn issue(
    ca_dir: &Path,
    id: &str,
    csr: Option<&Path>,
    ttl: Duration,
    out: &Path,
) -> anyhow::Result<()> {
    let id = SpiffeId::parse(id).context("--id")?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca = Ca::from_pem(
        &read(&ca_dir.join("ca.pem"))?,
        &read(&ca_dir.join("ca.key"))?,
    )
    .with_context(|| format!("loading the CA from {}", ca_dir.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (csr, key) = match csr {
        Some(p) => (
            Csr::from_pem(&read(p)?).with_context(|| format!("parsing {}", p.display()))?,
            None,
        ),
        None => {
            let (key, csr) = certs::generate_key_and_csr(&id, KeyAlgorithm::default())
                .context("generating the key")?;
            (csr, Some(key))
        }
    };
    let issued = ca
        .issue(&csr, &id, &IssueParams { ttl }, SystemClock.now())
        .context("issuing the SVID")?;
    write_public(&out.join("svid.pem"), issued.chain_pem().as_bytes())?;
    if let Some(key) = key {
        write_secret(&out.join("svid.key"), key.as_bytes())?;
    }
    write_public(&out.join("bundle.pem"), ca.bundle().to_pem().as_bytes())?;
    println!(
        "{id}: serial {}, valid until {}",
        issued.serial,
        humantime::format_rfc3339_seconds(issued.not_after)
    );
    println!("  {}", out.join("svid.pem").display());
    Ok(())
}

/// Writes a file only its owner can read, replacing any previous content.
pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its old mode on open: tighten it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
