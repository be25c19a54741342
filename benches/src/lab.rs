//! `transport-bench lab`: the server and the client on two netlab hosts joined by a bridge
//! (veth, a real MTU, optional rate limits), so the modes cross a wire rather than
//! loopback. Needs root, like every lab.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::setup::{new_ca, write_identity};

/// How a lab run is set up.
#[derive(Debug, Clone)]
pub struct LabArgs {
    /// Object size.
    pub size: u64,
    /// Link MTU.
    pub mtu: u32,
    /// Rate limit per direction, Mbit/s.
    pub rate_mbit: Option<u64>,
    /// Modes, comma-separated names.
    pub modes: String,
    /// Destinations of the pulls, comma-separated (`memory`, `file`).
    pub into: String,
    /// Runs per mode.
    pub runs: u32,
    /// Chunks in flight.
    pub parallel: u32,
    /// Chunk size.
    pub chunk_bytes: u32,
    /// Small requests per run.
    pub requests: u32,
    /// Connections per run.
    pub connections: u32,
    /// Bytes per latency request.
    pub request_bytes: u64,
}

/// Runs the server and client subcommands of this binary on two lab hosts and returns the
/// client's report with the lab's parameters added.
pub fn run(a: &LabArgs) -> anyhow::Result<Value> {
    netlab::preflight()?;
    let lab = netlab::Lab::builder("transport-bench")
        .mtu(a.mtu)
        .host("server")
        .host("client")
        .build()
        .context("building the lab")?;
    let (server_host, client_host) = (&lab.hosts()[0], &lab.hosts()[1]);
    if let Some(mbit) = a.rate_mbit {
        for h in [server_host, client_host] {
            h.set_rate(netlab::Direction::Egress, Some(netlab::Rate::mbit(mbit)))?;
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("transport-bench-lab-")
        .tempdir()?;
    let ca = new_ca()?;
    write_identity(&ca, "/bench/server", &tmp.path().join("server"))?;
    write_identity(&ca, "/bench/client", &tmp.path().join("client"))?;
    let exe = std::env::current_exe().context("locating transport-bench")?;
    // QUIC datagrams as large as the link carries: the MTU less IPv4 and UDP headers.
    let max_mtu = (a.mtu.saturating_sub(28)).clamp(1200, 65_527).to_string();
    let listen = format!("{}:7443", server_host.addr());
    let plaintext = format!("{}:7444", server_host.addr());
    // The reference loops cross the same wire: bare-tcp and bare-quic on 7450, bare-tls on
    // 7451.
    let bare = format!("{}:7450", server_host.addr());
    let server = server_host
        .process(&exe)
        .args([
            "server",
            "--listen",
            &listen,
            "--plaintext",
            &plaintext,
            "--dangerous-plaintext",
            "--bare",
            &bare,
        ])
        .arg("--identity")
        .arg(tmp.path().join("server"))
        .args([
            "--size",
            &a.size.to_string(),
            "--chunk-size",
            &a.chunk_bytes.to_string(),
        ])
        .args(["--max-mtu", &max_mtu])
        .spawn()
        .context("starting the server on its lab host")?;
    let ready = wait_ready(server.log_path(), || server.is_running())?;
    let id = ready["id"]
        .as_str()
        .context("server reported no identity")?;
    let bare_cert = tmp.path().join("bare-cert.pem");
    std::fs::write(
        &bare_cert,
        ready["bare_cert"]
            .as_str()
            .context("server reported no reference loops")?,
    )?;
    let out = client_host
        .command(&exe)
        .args([
            "client",
            "--server",
            &listen,
            "--plaintext-server",
            &plaintext,
            "--dangerous-plaintext",
        ])
        .args(["--server-id", id, "--server-pid", &server.pid().to_string()])
        .args(["--bare-server", &bare])
        .arg("--bare-cert")
        .arg(&bare_cert)
        .arg("--identity")
        .arg(tmp.path().join("client"))
        .args(["--modes", &a.modes, "--into", &a.into])
        .args(["--runs", &a.runs.to_string()])
        .args([
            "--parallel",
            &a.parallel.to_string(),
            "--requests",
            &a.requests.to_string(),
        ])
        .args(["--max-mtu", &max_mtu, "--json"])
        .output()
        .context("running the client on its lab host")?;
    let _ = server.stop(Duration::from_secs(5));
    if !out.status.success() {
        bail!(
            "the client failed ({}): {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            server.log()
        );
    }
    let mut doc: Value =
        serde_json::from_slice(&out.stdout).context("reading the client's report")?;
    doc["mtu"] = a.mtu.into();
    doc["params"]["kind"] = "lab".into();
    doc["params"]["mtu"] = a.mtu.into();
    doc["params"]["rate_mbit"] = a.rate_mbit.map_or(Value::Null, Value::from);
    doc["params"]["chunk_bytes"] = a.chunk_bytes.into();
    Ok(doc)
}

/// Waits for the server's ready line (a JSON object on a line of its log).
fn wait_ready(log: &Path, running: impl Fn() -> bool) -> anyhow::Result<Value> {
    for _ in 0..1200 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(v) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == "listening")
        {
            return Ok(v);
        }
        if !running() {
            bail!("the server exited before it was ready:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the server was not ready within 120 s")
}
