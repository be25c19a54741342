//! `transportd demo`: the whole path on one machine, with nothing set up beforehand.
//!
//! It starts an identity issuer for a new trust domain, creates a join token for a storage
//! node and one for a GPU node and a registration entry for a data loader on the GPU node,
//! writes a synthetic multi-shard dataset, and starts both nodes as separate processes:
//! their agents attest with the tokens and the GPU node serves the SPIFFE Workload API.
//! The data loader (a separate process) takes its SVID from that socket, pulls the dataset
//! over QUIC/mTLS and over TLS/TCP and pushes a checkpoint back. Every byte is compared by
//! BLAKE3 against the source, independently of the transfer's own verification, and every
//! audit trail (issuer, both nodes, the loader) is verified.
//!
//! Beside each path's GB/s the report puts what one bare TCP connection moves over loopback
//! on the same machine in the same run ([`probe`]), and the ratio of the two: the distance
//! from the path to the machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{SpiffeId, TrustDomain};
use libtransport::clock::{Clock, SystemClock};
use libtransport::store::digest_file;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::cmd::ca::write_secret;
use crate::role::issuer::admin::AdminClient;
use crate::role::issuer::wire::{EntryCreate, TokenCreate, TokenCreated};

mod probe;

const TRUST_DOMAIN: &str = "demo.transportd.internal";
const STORAGE: &str = "/node/storage";
const GPU: &str = "/node/gpu-0";
const LOADER: &str = "/gpu/loader";
/// The audit trails the demo verifies, by directory.
const TRAILS: [&str; 4] = ["issuer", "storage", "gpu", "loader"];

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
    let storage_id = SpiffeId::from_parts(&td, STORAGE)?;
    let gpu_id = SpiffeId::from_parts(&td, GPU)?;
    let loader_id = SpiffeId::from_parts(&td, LOADER)?;
    write_issuer_config(&dir)?;
    say("starting the identity issuer");
    let (mut issuer, ready) =
        Role::start(&dir, "issuer", &["issuer", "--config"], "issuer.toml").await?;
    let issuer_addr = field(&ready, "listen")?;
    let admin = AdminClient::new(PathBuf::from(field(&ready, "admin_socket")?));
    let prepared =
        prepare_identities(&dir, &admin, &storage_id, &gpu_id, &loader_id, &issuer_addr).await;
    if let Err(e) = prepared {
        issuer.stop().await;
        return Err(e);
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

    say("starting the storage node and the GPU node (their agents attest with join tokens)");
    let result = async {
        let (storage, ready) =
            Role::start(&dir, "storage", &["node", "--config"], "node.toml").await?;
        let addrs = Addrs {
            quic: field(&ready, "quic")?,
            tcp: field(&ready, "tcp")?,
        };
        // The GPU node's sidecar reaches the storage node as its workloads.
        write_node_config(&dir, "gpu", &issuer_addr, &gpu_sidecar(&addrs.quic))?;
        let (gpu, ready) = Role::start(&dir, "gpu", &["node", "--config"], "node.toml").await?;
        let socket = PathBuf::from(field(&ready, "workload_socket")?);
        let sidecar = PathBuf::from(field(&ready, "sidecar_socket")?);
        let admin = field(&ready, "admin")?;
        let nodes = [storage, gpu];
        say("the data loader takes its SVID from the GPU node's Workload API");
        let run = async {
            wait_for_workload_svid(&socket, &loader_id).await?;
            let mut report = exercise(&dir, &addrs, &socket, &sources, size, &say).await?;
            report["sidecar"] =
                through_sidecar(&dir, &sidecar, &admin, &sources, size, &say).await?;
            if report["sidecar"]["verified"].as_bool() != Some(true) {
                report["verified"] = json!(false);
            }
            Ok::<_, anyhow::Error>(report)
        }
        .await;
        for mut n in nodes {
            n.stop().await;
        }
        run
    }
    .await;
    issuer.stop().await;
    let mut report = result?;
    report["identities"] = json!({
        "issuer": crate::role::issuer::issuer_id(&td)?,
        "storage": storage_id,
        "gpu": gpu_id,
        "loader": loader_id,
    });
    report["trust_domain"] = json!(TRUST_DOMAIN);
    report["dir"] = json!(if _tmp.is_some() {
        Value::Null
    } else {
        json!(dir)
    });
    // Both audit trails must verify too: every link, every signed checkpoint.
    let bundle = certs::TrustBundle::from_pem(&std::fs::read_to_string(
        dir.join("storage/agent/bundle.pem"),
    )?)?;
    let mut trails = serde_json::Map::new();
    let mut trails_ok = true;
    for node in TRAILS {
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
    socket: &Path,
    sources: &[(String, PathBuf, u64)],
    size: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let probe_bytes = probe::probe_bytes(size);
    say(&format!(
        "measuring what one bare TCP connection moves here ({} over loopback)",
        human(probe_bytes)
    ));
    let bare = probe::bare_tcp(probe_bytes).await?;
    let to_bare = |gbps: f64| round3(gbps / bare.gbps());
    let mut paths = Vec::new();
    let mut all_ok = true;
    for (path, addr) in [("quic", &addrs.quic), ("tcp", &addrs.tcp)] {
        say(&format!(
            "the data loader on the GPU node pulls the dataset over {path}"
        ));
        let dest = dir.join("gpu/data").join(path);
        let started = SystemClock.instant();
        let out = gpu_command(
            dir,
            socket,
            addr,
            path,
            &["pull", "scans", path_str(&dest)?],
        )
        .await?;
        let command_secs = started.elapsed().as_secs_f64();
        // The pulls' own time (handshake to the last rename), not the loader's start-up.
        let secs = transfer_seconds(&out).unwrap_or(command_secs);
        let mut ok = out["verified"].as_bool() == Some(true);
        for (name, src, _) in sources {
            let got = dest.join(name);
            ok &= same_bytes(src, &got).await?;
        }
        all_ok &= ok;
        let gbps = size as f64 / secs / 1e9;
        paths.push(json!({
            "path": path,
            "bytes": size,
            "seconds": round3(secs),
            "command_seconds": round3(command_secs),
            "gbps": round3(gbps),
            "ratio_to_bare_tcp": to_bare(gbps),
            "verified": ok,
        }));
    }

    let ckpt_len = (size / 8).clamp(1 << 20, 256 << 20);
    say(&format!(
        "the data loader pushes a {} checkpoint back over quic",
        human(ckpt_len)
    ));
    let ckpt = dir.join("gpu/checkpoints/step-1000.ckpt");
    let c = ckpt.clone();
    tokio::task::spawn_blocking(move || synth(&c, ckpt_len, 1000)).await??;
    let started = SystemClock.instant();
    let out = gpu_command(
        dir,
        socket,
        &addrs.quic,
        "quic",
        &["push", path_str(&ckpt)?, "checkpoints/step-1000.ckpt"],
    )
    .await?;
    let command_secs = started.elapsed().as_secs_f64();
    let secs = transfer_seconds(&out).unwrap_or(command_secs);
    let stored = dir.join("storage/datasets/checkpoints/step-1000.ckpt");
    let push_ok = out["verified"].as_bool() == Some(true) && same_bytes(&ckpt, &stored).await?;
    all_ok &= push_ok;
    let push_gbps = ckpt_len as f64 / secs / 1e9;
    Ok(json!({
        "verified": all_ok,
        "dataset": { "name": "scans", "bytes": size, "shards": sources.len() },
        "bare_tcp_gbps": round3(bare.gbps()),
        "bare_tcp_bytes": bare.bytes,
        "bare_tcp_seconds": round3(bare.seconds),
        "paths": paths,
        "push": {
            "path": "quic",
            "bytes": ckpt_len,
            "seconds": round3(secs),
            "command_seconds": round3(command_secs),
            "gbps": round3(push_gbps),
            "ratio_to_bare_tcp": to_bare(push_gbps),
            "verified": push_ok,
        },
    }))
}

/// The data loader's workers pull the dataset through the GPU node's sidecar, twice: the
/// first pull reaches the storage node (as the loader's identity), the second is served
/// from the node's sealed cache. Reports each pull and what the sidecar's metrics counted.
async fn through_sidecar(
    dir: &Path,
    sidecar: &Path,
    admin: &str,
    sources: &[(String, PathBuf, u64)],
    size: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let mut pulls = Vec::new();
    let mut ok = true;
    for (i, what) in ["first", "second"].into_iter().enumerate() {
        say(&format!(
            "a data loader worker pulls the dataset through the GPU node's sidecar ({what} time)"
        ));
        let dest = dir.join(format!("gpu/data/sidecar-{i}"));
        let started = SystemClock.instant();
        let exe = std::env::current_exe().context("locating the transportd binary")?;
        let out = Command::new(exe)
            .arg("pull")
            .arg("--sidecar")
            .arg(sidecar)
            .args(["--json", "scans"])
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .await
            .context("starting the data loader's pull through the sidecar")?;
        if !out.status.success() {
            bail!(
                "the data loader's pull through the sidecar failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let report: Value =
            serde_json::from_slice(&out.stdout).context("reading the sidecar pull's report")?;
        let command_secs = started.elapsed().as_secs_f64();
        let secs = transfer_seconds(&report).unwrap_or(command_secs);
        let mut same = report["verified"].as_bool() == Some(true);
        for (name, src, _) in sources {
            same &= same_bytes(src, &dest.join(name)).await?;
        }
        ok &= same;
        let objects = report["objects"].as_array().cloned().unwrap_or_default();
        let cached = objects
            .iter()
            .filter(|o| o["report"]["cached"].as_bool() == Some(true))
            .count();
        pulls.push(json!({
            "seconds": round3(secs),
            "gbps": round3(size as f64 / secs / 1e9),
            "objects": objects.len(),
            "from_cache": cached,
            "socket_bytes": report["socket_bytes"],
            "verified": same,
        }));
    }
    let metrics = admin_get(admin, "/metrics").await.unwrap_or_default();
    // Counters, whole numbers in the exposition's float text.
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Ok(json!({
        "verified": ok,
        "pulls": pulls,
        "cache_hits": metric("transportd_sidecar_cache_hits_total"),
        "cache_misses": metric("transportd_sidecar_cache_misses_total"),
        "from_storage_bytes": metric("transportd_sidecar_handed_bytes_total{source=\"network\"}"),
    }))
}

/// `GET path` from an admin endpoint; the body.
async fn admin_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default())
}

/// Runs a client command as the data loader (its own process, its SVID from the GPU node's
/// Workload API); returns its JSON.
async fn gpu_command(
    dir: &Path,
    socket: &Path,
    addr: &str,
    path: &str,
    args: &[&str],
) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("locating the transportd binary")?;
    let out = Command::new(exe)
        .arg(args[0])
        .args(["--node", addr, "--path", path, "--json"])
        .arg("--audit")
        .arg(dir.join("loader/audit"))
        .args(&args[1..])
        .env(
            libtransport::workload::ENDPOINT_ENV,
            format!("unix://{}", socket.display()),
        )
        .env_remove(crate::env::IDENTITY_DIR)
        .env_remove(crate::env::SVID)
        .env_remove(crate::env::KEY)
        .env_remove(crate::env::BUNDLE)
        .stdin(Stdio::null())
        .output()
        .await
        .context("starting the data loader's command")?;
    if !out.status.success() {
        bail!(
            "the data loader's `{}` failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the data loader's report")
}

#[derive(Debug)]
struct Addrs {
    quic: String,
    tcp: String,
}

/// A role (issuer or node) running as a child process of the demo.
struct Role {
    child: Child,
}

impl Role {
    /// Starts `transportd ARGS <dir>/<name>/<config>` and reads its one-line ready report.
    async fn start(
        dir: &Path,
        name: &str,
        args: &[&str],
        config: &str,
    ) -> anyhow::Result<(Self, Value)> {
        let exe = std::env::current_exe().context("locating the transportd binary")?;
        let log_path = dir.join(name).join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(exe)
            .args(args)
            .arg(dir.join(name).join(config))
            .env(crate::env::LOG, "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .with_context(|| format!("the {name} did not start within 30 s"))??
            .with_context(|| {
                format!(
                    "the {name} exited at start: {}",
                    std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .lines()
                        .last()
                        .unwrap_or("")
                )
            })?;
        let ready: Value =
            serde_json::from_str(&line).with_context(|| format!("the {name}'s ready line"))?;
        Ok((Self { child }, ready))
    }

    /// SIGTERM (it drains and seals its audit trail), then waits.
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

fn field(v: &Value, k: &str) -> anyhow::Result<String> {
    v[k].as_str()
        .map(str::to_owned)
        .with_context(|| format!("the ready line has no {k}"))
}

/// Join tokens for both nodes, the loader's registration entry, and the node configurations
/// (with the issuer's bundle to authenticate it at first contact).
async fn prepare_identities(
    dir: &Path,
    admin: &AdminClient,
    storage: &SpiffeId,
    gpu: &SpiffeId,
    loader: &SpiffeId,
    issuer_addr: &str,
) -> anyhow::Result<()> {
    let bundle: Value = admin
        .call(hyper::Method::GET, "/v1/bundle", None::<&()>)
        .await?;
    let bundle = bundle["bundle"].as_str().unwrap_or_default().to_owned();
    for (name, id) in [("storage", storage), ("gpu", gpu)] {
        let t: TokenCreated = admin
            .call(
                hyper::Method::POST,
                "/v1/tokens",
                Some(&TokenCreate {
                    node: id.clone(),
                    ttl_secs: 600,
                }),
            )
            .await?;
        let node_dir = dir.join(name);
        std::fs::create_dir_all(node_dir.join("datasets"))?;
        write_secret(&node_dir.join("join-token"), t.token.as_bytes())?;
        std::fs::write(node_dir.join("bootstrap-bundle.pem"), &bundle)?;
    }
    let uid = rustix::process::geteuid().as_raw();
    let _: certs::RegistrationEntry = admin
        .call(
            hyper::Method::POST,
            "/v1/entries",
            Some(&EntryCreate {
                spiffe_id: loader.clone(),
                parent_id: gpu.clone(),
                selectors: vec![certs::Selector::Uid(uid)],
                ttl_secs: None,
            }),
        )
        .await?;
    std::fs::create_dir_all(dir.join("loader"))?;
    write_node_config(dir, "storage", issuer_addr, &storage_policy())?;
    Ok(())
}

/// Waits until the GPU node's agent holds the loader's SVID.
async fn wait_for_workload_svid(socket: &Path, loader: &SpiffeId) -> anyhow::Result<()> {
    let started = SystemClock.instant();
    loop {
        if let Ok(c) = libtransport::workload::WorkloadClient::connect(socket).await
            && let Ok(ctx) = c.fetch_x509().await
            && ctx.svid(loader).is_some()
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the GPU node's Workload API did not serve {loader} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_issuer_config(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("issuer"))?;
    std::fs::write(
        dir.join("issuer/issuer.toml"),
        format!(
            r#"# Written by `transportd demo`.
trust_domain = "{TRUST_DOMAIN}"
listen = "127.0.0.1:0"
data_dir = "data"

[svid]
ttl = "1h"
sync_interval = "2s"

[audit]
dir = "audit"
"#
        ),
    )?;
    Ok(())
}

fn storage_policy() -> String {
    format!(
        r#"[[allow]]
peer = "spiffe://{TRUST_DOMAIN}{LOADER}"
dataset = "scans"
actions = ["read"]

[[allow]]
peer = "spiffe://{TRUST_DOMAIN}{LOADER}"
dataset = "checkpoints"
actions = ["read", "write"]
"#
    )
}

/// The GPU node's `[sidecar]`: the storage node at `storage`, a small cache.
fn gpu_sidecar(storage: &str) -> String {
    format!(
        r#"[sidecar]
socket = "run/data.sock"
storage = ["{storage}"]
cache_size = "8GiB"
memory_size = "2GiB"
"#
    )
}

fn write_node_config(dir: &Path, name: &str, issuer: &str, policy: &str) -> anyhow::Result<()> {
    let text = format!(
        r#"# Written by `transportd demo`.
[agent]
issuer = "{issuer}"
bundle = "bootstrap-bundle.pem"
join_token_file = "join-token"
data_dir = "agent"
workload_socket = "run/workload.sock"

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

{policy}"#
    );
    std::fs::write(dir.join(name).join("node.toml"), text)?;
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

/// The time a `pull` or `push` command's transfers took, by their own reports (milliseconds
/// each): without the command's start-up, which would dominate small transfers.
fn transfer_seconds(out: &Value) -> Option<f64> {
    let ms: u64 = out["objects"]
        .as_array()?
        .iter()
        .map(|o| o["report"]["elapsed"].as_u64())
        .sum::<Option<u64>>()?;
    (ms > 0).then(|| ms as f64 / 1000.0)
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
    for (label, key) in [
        ("issuer       ", "issuer"),
        ("storage node ", "storage"),
        ("GPU node     ", "gpu"),
        ("data loader  ", "loader"),
    ] {
        println!(
            "  {label}  {}",
            r["identities"][key].as_str().unwrap_or("?")
        );
    }
    println!("  identities     node SVIDs by join token, the loader's by the Workload API");
    println!(
        "  dataset        scans: {} in {} shards",
        human(r["dataset"]["bytes"].as_u64().unwrap_or(0)),
        r["dataset"]["shards"]
    );
    let bare = r["bare_tcp_gbps"].as_f64().unwrap_or(0.0);
    println!(
        "  bare TCP       {} over one loopback connection in {:.2} s = {bare:.2} GB/s \
         (no TLS, no protocol)",
        human(r["bare_tcp_bytes"].as_u64().unwrap_or(0)),
        r["bare_tcp_seconds"].as_f64().unwrap_or(0.0),
    );
    for p in r["paths"].as_array().into_iter().flatten() {
        println!(
            "  pull over {:<5} {} in {:.2} s = {:.2} GB/s = {:.2} of bare TCP ({bare:.2} GB/s), {}",
            p["path"].as_str().unwrap_or("?"),
            human(p["bytes"].as_u64().unwrap_or(0)),
            p["seconds"].as_f64().unwrap_or(0.0),
            p["gbps"].as_f64().unwrap_or(0.0),
            p["ratio_to_bare_tcp"].as_f64().unwrap_or(0.0),
            verdict(&p["verified"])
        );
    }
    let push = &r["push"];
    println!(
        "  push over quic  {} checkpoint in {:.2} s = {:.2} GB/s = {:.2} of bare TCP, {}",
        human(push["bytes"].as_u64().unwrap_or(0)),
        push["seconds"].as_f64().unwrap_or(0.0),
        push["gbps"].as_f64().unwrap_or(0.0),
        push["ratio_to_bare_tcp"].as_f64().unwrap_or(0.0),
        verdict(&push["verified"])
    );
    let sc = &r["sidecar"];
    for (i, p) in sc["pulls"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  {} {} in {:.2} s = {:.2} GB/s, {} of {} objects from the node's cache, {} bytes \
             through the socket, {}",
            if i == 0 {
                "via sidecar   "
            } else {
                "  again       "
            },
            human(r["dataset"]["bytes"].as_u64().unwrap_or(0)),
            p["seconds"].as_f64().unwrap_or(0.0),
            p["gbps"].as_f64().unwrap_or(0.0),
            p["from_cache"],
            p["objects"],
            p["socket_bytes"],
            verdict(&p["verified"])
        );
    }
    if sc.is_object() {
        println!(
            "  sidecar cache  {} hits, {} misses; {} fetched from the storage node (as the \
             loader), once",
            sc["cache_hits"],
            sc["cache_misses"],
            human(sc["from_storage_bytes"].as_u64().unwrap_or(0)),
        );
    }
    for (i, node) in TRAILS.into_iter().enumerate() {
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
