//! `transportd demo`: the whole path on one machine, with nothing set up beforehand.
//!
//! It creates a trust domain, gives a storage node and a GPU node their own SVIDs (keys
//! generated locally, certificates issued from CSRs), writes a synthetic multi-shard
//! dataset, starts the storage node as a separate process, and has the GPU node (separate
//! processes with its own SVID) pull the dataset over QUIC/mTLS and over TLS/TCP and push a
//! checkpoint back. Every byte is compared by BLAKE3 against the source, independently of
//! the transfer's own verification.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{Ca, CaParams, IssueParams, KeyAlgorithm, SpiffeId, TrustDomain};
use libtransport::clock::{Clock, SystemClock};
use libtransport::store::digest_file;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::cmd::ca::write_secret;

const TRUST_DOMAIN: &str = "demo.transportd.internal";
const STORAGE: &str = "/node/storage";
const GPU: &str = "/node/gpu-0";

/// Runs the demo; fails (non-zero exit) unless everything verified.
pub(crate) async fn run(size: u64, keep: Option<PathBuf>, json_out: bool) -> anyhow::Result<()> {
    if size == 0 {
        bail!("--size must be more than zero");
    }
    let (_tmp, dir) = match keep {
        Some(d) => {
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                bail!("--keep {}: directory is not empty", d.display());
            }
            std::fs::create_dir_all(&d)?;
            (None, std::fs::canonicalize(&d)?)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("transportd-demo-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let say = |s: &str| {
        if !json_out {
            eprintln!("demo: {s}");
        }
    };

    say(&format!("trust domain {TRUST_DOMAIN} in {}", dir.display()));
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = Ca::generate(&td, &CaParams::default(), SystemClock.now())?;
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir)?;
    write_secret(&ca_dir.join("ca.key"), ca.key_pem().as_bytes())?;
    std::fs::write(ca_dir.join("bundle.pem"), ca.bundle().to_pem())?;
    let storage_id = SpiffeId::from_parts(&td, STORAGE)?;
    let gpu_id = SpiffeId::from_parts(&td, GPU)?;
    for (node, id) in [("storage", &storage_id), ("gpu", &gpu_id)] {
        issue(&ca, id, &dir.join(node).join("identity"))?;
    }

    let shards = shard_count(size);
    say(&format!(
        "writing a {} dataset in {shards} shards",
        human(size)
    ));
    let scans = dir.join("storage/datasets/scans");
    std::fs::create_dir_all(&scans)?;
    std::fs::create_dir_all(dir.join("storage/datasets/checkpoints"))?;
    let mut sources = Vec::new();
    for i in 0..shards {
        let len = size / shards + u64::from(i < size % shards);
        let path = scans.join(format!("train/shard-{i:04}.bin"));
        let p = path.clone();
        tokio::task::spawn_blocking(move || synth(&p, len, i)).await??;
        sources.push((format!("train/shard-{i:04}.bin"), path, len));
    }
    write_storage_config(&dir)?;

    say("starting the storage node");
    let mut node = StorageNode::start(&dir).await?;
    let result = exercise(&dir, &node.addrs, &sources, size, &say).await;
    node.stop().await;
    let mut report = result?;
    report["identities"] = json!({ "storage": storage_id, "gpu": gpu_id });
    report["trust_domain"] = json!(TRUST_DOMAIN);
    report["dir"] = json!(if _tmp.is_some() {
        Value::Null
    } else {
        json!(dir)
    });
    // Both audit trails must verify too: every link, every signed checkpoint.
    let bundle =
        certs::TrustBundle::from_pem(&std::fs::read_to_string(ca_dir.join("bundle.pem"))?)?;
    let mut trails = serde_json::Map::new();
    let mut trails_ok = true;
    for node in ["storage", "gpu"] {
        let trail = dir.join(node).join("audit");
        let checked = libtransport::audit::verify(&trail, Some(&bundle));
        trails_ok &= checked.is_ok();
        trails.insert(
            node.into(),
            json!({
                "dir": trail,
                "verified": checked.is_ok(),
                "records": checked.as_ref().map_or(0, |r| r.records),
                "error": checked.err().map(|e| e.to_string()),
            }),
        );
    }
    report["audit"] = Value::Object(trails);
    if !trails_ok {
        report["verified"] = json!(false);
    }
    let verified = report["verified"].as_bool() == Some(true);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, _tmp.is_some());
    }
    if !verified {
        bail!("verification failed; see the report above");
    }
    Ok(())
}

async fn exercise(
    dir: &Path,
    addrs: &Addrs,
    sources: &[(String, PathBuf, u64)],
    size: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let mut paths = Vec::new();
    let mut all_ok = true;
    for (path, addr) in [("quic", &addrs.quic), ("tcp", &addrs.tcp)] {
        say(&format!("GPU node pulls the dataset over {path}"));
        let dest = dir.join("gpu/data").join(path);
        let started = SystemClock.instant();
        let out = gpu_command(dir, addr, path, &["pull", "scans", path_str(&dest)?]).await?;
        let secs = started.elapsed().as_secs_f64();
        let mut ok = out["verified"].as_bool() == Some(true);
        for (name, src, _) in sources {
            let got = dest.join(name);
            ok &= same_bytes(src, &got).await?;
        }
        all_ok &= ok;
        paths.push(json!({
            "path": path,
            "bytes": size,
            "seconds": round3(secs),
            "gbps": round3(size as f64 / secs / 1e9),
            "verified": ok,
        }));
    }

    let ckpt_len = (size / 8).clamp(1 << 20, 256 << 20);
    say(&format!(
        "GPU node pushes a {} checkpoint back over quic",
        human(ckpt_len)
    ));
    let ckpt = dir.join("gpu/checkpoints/step-1000.ckpt");
    let c = ckpt.clone();
    tokio::task::spawn_blocking(move || synth(&c, ckpt_len, 1000)).await??;
    let started = SystemClock.instant();
    let out = gpu_command(
        dir,
        &addrs.quic,
        "quic",
        &["push", path_str(&ckpt)?, "checkpoints/step-1000.ckpt"],
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let stored = dir.join("storage/datasets/checkpoints/step-1000.ckpt");
    let push_ok = out["verified"].as_bool() == Some(true) && same_bytes(&ckpt, &stored).await?;
    all_ok &= push_ok;
    Ok(json!({
        "verified": all_ok,
        "dataset": { "name": "scans", "bytes": size, "shards": sources.len() },
        "paths": paths,
        "push": {
            "path": "quic",
            "bytes": ckpt_len,
            "seconds": round3(secs),
            "gbps": round3(ckpt_len as f64 / secs / 1e9),
            "verified": push_ok,
        },
    }))
}

/// Runs a client command as the GPU node (its own process and SVID); returns its JSON.
async fn gpu_command(dir: &Path, addr: &str, path: &str, args: &[&str]) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("locating the transportd binary")?;
    let gpu = dir.join("gpu");
    let out = Command::new(exe)
        .arg(args[0])
        .args(["--node", addr, "--path", path, "--json"])
        .arg("--identity")
        .arg(gpu.join("identity"))
        .arg("--audit")
        .arg(gpu.join("audit"))
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .await
        .context("starting the GPU node's command")?;
    if !out.status.success() {
        bail!(
            "GPU node's `{}` failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the GPU node's report")
}

#[derive(Debug)]
struct Addrs {
    quic: String,
    tcp: String,
}

/// The storage node, a child process.
struct StorageNode {
    child: Child,
    addrs: Addrs,
}

impl StorageNode {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the transportd binary")?;
        let log = std::fs::File::create(dir.join("storage/node.log"))?;
        let mut child = Command::new(exe)
            .args(["node", "--config"])
            .arg(dir.join("storage/node.toml"))
            .env(crate::env::LOG, "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the storage node")?;
        let stdout = child.stdout.take().context("storage node stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("storage node did not start within 30 s")??
            .with_context(|| {
                format!(
                    "storage node exited at start; see {}",
                    dir.join("storage/node.log").display()
                )
            })?;
        let ready: Value = serde_json::from_str(&line).context("storage node's ready line")?;
        let get = |k: &str| {
            ready[k]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("storage node reported no {k} address"))
        };
        Ok(Self {
            addrs: Addrs {
                quic: get("quic")?,
                tcp: get("tcp")?,
            },
            child,
        })
    }

    async fn stop(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn issue(ca: &Ca, id: &SpiffeId, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let (key, csr) = certs::generate_key_and_csr(id, KeyAlgorithm::default())?;
    let issued = ca.issue(&csr, id, &IssueParams::default(), SystemClock.now())?;
    write_secret(&out.join("svid.key"), key.as_bytes())?;
    std::fs::write(out.join("svid.pem"), issued.chain_pem())?;
    std::fs::write(out.join("bundle.pem"), ca.bundle().to_pem())?;
    Ok(())
}

fn write_storage_config(dir: &Path) -> anyhow::Result<()> {
    let text = format!(
        r#"# Written by `transportd demo`.
[identity]
svid = "identity/svid.pem"
key = "identity/svid.key"
bundle = "identity/bundle.pem"

[listen]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"

[store]
root = "datasets"
state_dir = "state"

[audit]
dir = "audit"

[admin]
listen = "127.0.0.1:0"

[[allow]]
peer = "spiffe://{TRUST_DOMAIN}{GPU}"
dataset = "scans"
actions = ["read"]

[[allow]]
peer = "spiffe://{TRUST_DOMAIN}{GPU}"
dataset = "checkpoints"
actions = ["read", "write"]
"#
    );
    std::fs::write(dir.join("storage/node.toml"), text)?;
    Ok(())
}

/// Writes `len` pseudo-random bytes (a BLAKE3 output stream of `seed`).
fn synth(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut xof = blake3::Hasher::new()
        .update(b"transportd demo shard")
        .update(&seed.to_le_bytes())
        .finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

async fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (a, b) = (a.to_path_buf(), b.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let da = digest_file(&a).with_context(|| format!("hashing {}", a.display()))?;
        Ok(match digest_file(&b) {
            Ok(db) => da == db,
            Err(_) => false,
        })
    })
    .await?
}

fn shard_count(size: u64) -> u64 {
    (size / (128 << 20)).clamp(4, 16).min(size.max(1))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn human(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

fn print_report(r: &Value, temporary: bool) {
    println!("transportd demo");
    println!(
        "  trust domain   {}",
        r["trust_domain"].as_str().unwrap_or("?")
    );
    println!(
        "  storage node   {}",
        r["identities"]["storage"].as_str().unwrap_or("?")
    );
    println!(
        "  GPU node       {}",
        r["identities"]["gpu"].as_str().unwrap_or("?")
    );
    println!(
        "  dataset        scans: {} in {} shards",
        human(r["dataset"]["bytes"].as_u64().unwrap_or(0)),
        r["dataset"]["shards"]
    );
    for p in r["paths"].as_array().into_iter().flatten() {
        println!(
            "  pull over {:<5} {} in {:.2} s = {:.2} GB/s, {}",
            p["path"].as_str().unwrap_or("?"),
            human(p["bytes"].as_u64().unwrap_or(0)),
            p["seconds"].as_f64().unwrap_or(0.0),
            p["gbps"].as_f64().unwrap_or(0.0),
            verdict(&p["verified"])
        );
    }
    let push = &r["push"];
    println!(
        "  push over quic  {} checkpoint in {:.2} s = {:.2} GB/s, {}",
        human(push["bytes"].as_u64().unwrap_or(0)),
        push["seconds"].as_f64().unwrap_or(0.0),
        push["gbps"].as_f64().unwrap_or(0.0),
        verdict(&push["verified"])
    );
    for (i, node) in ["storage", "gpu"].into_iter().enumerate() {
        let t = &r["audit"][node];
        println!(
            "  {}{} ({} records, {})",
            if i == 0 {
                "audit trails   "
            } else {
                "                 "
            },
            t["dir"].as_str().unwrap_or("?"),
            t["records"],
            if t["verified"].as_bool() == Some(true) {
                "chain and signatures verified".to_owned()
            } else {
                format!("DOES NOT VERIFY: {}", t["error"].as_str().unwrap_or("?"))
            }
        );
    }
    if temporary {
        println!(
            "  (everything was in a temporary directory, now removed; pass --keep DIR to keep it)"
        );
    } else {
        println!("  kept in        {}", r["dir"].as_str().unwrap_or("?"));
    }
    println!(
        "  result         {}",
        if r["verified"].as_bool() == Some(true) {
            "every byte verified (BLAKE3, compared with the source)"
        } else {
            "VERIFICATION FAILED"
        }
    );
}

fn verdict(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "verified"
    } else {
        "NOT verified"
    }
}
