//! `transportd workload fetch`: ask a SPIFFE Workload API (SPIRE's agent, or the one
//! `transportd node` serves) for this process's X.509-SVIDs, as `spire-agent api fetch
//! x509` does; print them, and optionally write them out as files a client command reads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use certs::{SpiffeId, Svid};
use libtransport::clock::{Clock, SystemClock};
use libtransport::workload::{WorkloadClient, X509Context, endpoint_path};
use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;
use zeroize::Zeroizing;

/// `transportd workload fetch`.
pub(crate) async fn fetch(
    socket: &str,
    out: Option<&Path>,
    id: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let path = socket_path(socket)?;
    let want = id.map(SpiffeId::parse).transpose().context("--id")?;
    let client = WorkloadClient::connect(&path).await?;
    let ctx = tokio::time::timeout(FETCH_TIMEOUT, client.fetch_x509())
        .await
        .with_context(|| {
            format!(
                "the Workload API at {} gave no answer within {}s",
                path.display(),
                FETCH_TIMEOUT.as_secs()
            )
        })??;
    let chosen = match &want {
        Some(w) => ctx.svid(w).with_context(|| {
            format!(
                "the Workload API offers no SVID for {w}; it offers {}",
                ctx.svids
                    .iter()
                    .map(|s| s.id().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => ctx
            .default_svid()
            .context("the Workload API answered without an SVID")?,
    };
    let written = match out {
        Some(dir) => write_files(dir, chosen, &ctx)?,
        None => Vec::new(),
    };
    let now = SystemClock.now();
    if json {
        let report = Report {
            socket: &path,
            svids: ctx.svids.iter().map(SvidReport::of).collect(),
            trust_domain: ctx.bundle.trust_domain().as_str(),
            bundle_cas: ctx.bundle.cas().len(),
            written,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "received {} SVID{} from {}",
        ctx.svids.len(),
        if ctx.svids.len() == 1 { "" } else { "s" },
        path.display()
    );
    for svid in &ctx.svids {
        println!();
        println!("  SPIFFE ID  {}", svid.id());
        println!("  serial     {}", svid.serial());
        println!(
            "  expires    {} ({})",
            humantime::format_rfc3339_seconds(svid.not_after()),
            remaining(svid.not_after(), now)
        );
        println!("  chain      {} certificate(s)", svid.chain().len());
    }
    println!();
    println!(
        "trust bundle of {}: {} CA certificate(s)",
        ctx.bundle.trust_domain(),
        ctx.bundle.cas().len()
    );
    if !written.is_empty() {
        println!();
        println!("wrote the SVID of {}:", chosen.id());
        for p in &written {
            println!("  {}", p.display());
        }
    }
    Ok(())
}

/// `--socket` as a plain path or as an `SPIFFE_ENDPOINT_SOCKET` URI (`unix:///path`).
fn socket_path(socket: &str) -> anyhow::Result<PathBuf> {
    if socket.starts_with('/') {
        return Ok(PathBuf::from(socket));
    }
    Ok(endpoint_path(socket)?)
}

/// svid.pem (chain, leaf first), svid.key (PKCS#8, mode 0600) and bundle.pem in `dir`.
fn write_files(dir: &Path, svid: &Svid, ctx: &X509Context) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let PrivateKeyDer::Pkcs8(key) = svid.key() else {
        anyhow::bail!("the Workload API's key for {} is not PKCS#8", svid.id());
    };
    let key_pem = Zeroizing::new(pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", key.secret_pkcs8_der()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    ));
    let (cert, key, bundle) = (
        dir.join("svid.pem"),
        dir.join("svid.key"),
        dir.join("bundle.pem"),
    );
    crate::cmd::ca::write_secret(&key, key_pem.as_bytes())?;
    std::fs::write(&cert, svid.chain_pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    std::fs::write(&bundle, ctx.bundle.to_pem())
        .with_context(|| format!("writing {}", bundle.display()))?;
    Ok(vec![cert, key, bundle])
}

fn remaining(not_after: SystemTime, now: SystemTime) -> String {
    match not_after.duration_since(now) {
        Ok(left) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        ),
        Err(_) => "expired".into(),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    socket: &'a Path,
    svids: Vec<SvidReport<'a>>,
    trust_domain: &'a str,
    bundle_cas: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    written: Vec<PathBuf>,
}

#[derive(Serialize)]
struct SvidReport<'a> {
    spiffe_id: &'a str,
    serial: &'a str,
    not_before: String,
    not_after: String,
    chain_len: usize,
}

impl<'a> SvidReport<'a> {
    fn of(s: &'a Svid) -> Self {
        Self {
            spiffe_id: s.id().as_str(),
            serial: s.serial(),
            not_before: humantime::format_rfc3339_seconds(s.not_before()).to_string(),
            not_after: humantime::format_rfc3339_seconds(s.not_after()).to_string(),
            chain_len: s.chain().len(),
        }
    }
}

/// How long to wait for the agent's first answer: a local agent answers at once or is
/// stuck.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
