//! `transportd audit verify | query | report`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use hyper::Method;
use libtransport::audit::{Query, Receipt, query, read_receipts, verify, verify_witnessed};
use libtransport::clock::{Clock, SystemClock};

use crate::config::issuer::IssuerConfig;
use crate::role::issuer::admin::AdminClient;
use crate::role::issuer::wire::WitnessExport;

pub(crate) mod report;

/// The witness's receipts for the trail in `dir`: from a file (`--witness`), or from the
/// running issuer (`--witness-issuer`) for the node whose key signed the trail.
pub(crate) async fn receipts(
    dir: &Path,
    file: Option<&Path>,
    issuer: Option<&Path>,
) -> anyhow::Result<Option<Vec<Receipt>>> {
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return read_receipts(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()));
    }
    let Some(config) = issuer else {
        return Ok(None);
    };
    let checkpoints = query(
        dir,
        &Query {
            event: Some("checkpoint".into()),
            ..Query::default()
        },
    )?;
    let node = checkpoints
        .last()
        .and_then(|c| c["signer"].as_str())
        .context("the trail holds no signed checkpoint, so it names no node to ask about")?;
    let node = certs::SpiffeId::parse(node).context("the trail's signer")?;
    let socket = IssuerConfig::load(config)?.admin_socket;
    let receipts = AdminClient::new(socket)
        .call(
            Method::POST,
            "/v1/witness/export",
            Some(&WitnessExport { node }),
        )
        .await?;
    Ok(Some(receipts))
}

/// `audit verify DIR`, with the witness's receipts if given.
pub(crate) fn verify_cmd(
    dir: &Path,
    bundle: Option<&Path>,
    witness: Option<&[Receipt]>,
    json: bool,
) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory holding an audit trail",
            dir.display()
        );
    }
    let bundle = bundle
        .map(|b| {
            let text =
                std::fs::read_to_string(b).with_context(|| format!("reading {}", b.display()))?;
            certs::TrustBundle::from_pem(&text).with_context(|| format!("{}", b.display()))
        })
        .transpose()?;
    let report = verify(dir, bundle.as_ref()).context("audit trail does not verify")?;
    let witnessed = witness
        .map(|receipts| {
            verify_witnessed(dir, receipts, bundle.as_ref())
                .context("audit trail does not match what its witness holds")
        })
        .transpose()?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "verified": true, "report": report, "witness": witnessed })
        );
        return Ok(());
    }
    println!(
        "{}: verified: {} records in {} segments, {} signed checkpoints{}",
        dir.display(),
        report.records,
        report.segments,
        report.checkpoints,
        if report.signers_verified {
            " (signers checked against the bundle)"
        } else {
            ""
        }
    );
    if report.unsealed > 0 {
        println!(
            "  {} records after the latest checkpoint (seq {}) are not sealed yet: the node is running or did not shut down cleanly",
            report.unsealed, report.last_checkpoint
        );
    }
    if report.stalls > 0 {
        println!(
            "  {} stall(s) of the trail's disk on record (audit_stalled): {} records refused \
             meanwhile, with the work they were about",
            report.stalls, report.refused_in_stalls
        );
    }
    if report.unclean_stops > 0 {
        println!(
            "  {} start(s) after an unclean stop on record (unclean_stop): records acknowledged \
             just before each and not yet fsynced may have been lost",
            report.unclean_stops
        );
    }
    if let Some(w) = &witnessed {
        println!(
            "  matches its witness: {} witnessed checkpoints, the latest seq {}{}",
            w.witnessed,
            w.last_witnessed,
            if w.witnesses_verified {
                " (countersigners checked against the bundle)"
            } else {
                ""
            }
        );
    }
    if !report.signers_verified {
        println!("  pass --bundle bundle.pem to check who signed the checkpoints");
    }
    Ok(())
}

/// The filters of `audit query`.
#[derive(Debug)]
pub(crate) struct QueryArgs<'a> {
    pub(crate) peer: Option<&'a str>,
    pub(crate) dataset: Option<&'a str>,
    pub(crate) event: Option<&'a str>,
    pub(crate) since: Option<&'a str>,
    pub(crate) until: Option<&'a str>,
    pub(crate) json: bool,
}

/// `audit query DIR`.
pub(crate) fn query_cmd(dir: &Path, a: &QueryArgs<'_>) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let q = Query {
        peer: a.peer.map(str::to_owned),
        dataset: a.dataset.map(str::to_owned),
        event: a.event.map(str::to_owned),
        since: a
            .since
            .map(|s| when(s, now))
            .transpose()
            .context("--since")?,
        until: a
            .until
            .map(|s| when(s, now))
            .transpose()
            .context("--until")?,
    };
    let records = query(dir, &q)?;
    for r in &records {
        if a.json {
            println!("{r}");
        } else {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            let detail = match s("event").as_str() {
                "transfer" => format!(
                    "{} {}/{} {} bytes over {}: {}",
                    s("direction"),
                    s("dataset"),
                    s("object"),
                    r["bytes"],
                    s("path"),
                    s("outcome")
                ),
                "authorization" => format!(
                    "{} {} {}{}",
                    s("decision"),
                    s("action"),
                    s("dataset"),
                    r["object"]
                        .as_str()
                        .map(|o| format!("/{o}"))
                        .unwrap_or_default()
                ),
                _ => String::new(),
            };
            println!(
                "{:>6} {} {:<22} {} {}",
                r["seq"],
                s("time"),
                s("event"),
                s("peer"),
                detail
            );
        }
    }
    if !a.json {
        eprintln!("{} records", records.len());
    }
    Ok(())
}

/// An RFC 3339 time, or an age such as `2h` counted back from `now`.
pub(crate) fn when(s: &str, now: SystemTime) -> anyhow::Result<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let age: Duration = humantime::parse_duration(s)
        .with_context(|| format!("{s:?} is neither an RFC 3339 time nor an age like 2h"))?;
    Ok(now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH))
}
