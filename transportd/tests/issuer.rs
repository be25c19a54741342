//! The identity lifecycle with the real binaries: an issuer, nodes whose agents attest with
//! join tokens, registration entries served over the Workload API, rotation during a
//! transfer, CA rollover during traffic, bans, and an issuer restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "issuer/sidecar.rs"]
mod sidecar;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::{bin, json, metric, p, rand_suffix, spawn_ready, wait_for, write_data};
use libtransport::clock::{Clock, SystemClock};
use serde_json::Value;

const TD: &str = "hospital.example";

/// A trust domain run by an issuer process, with nodes that get their identity from it.
struct Domain {
    dir: tempfile::TempDir,
    issuer: Option<Child>,
    issuer_addr: String,
    svid_ttl: &'static str,
}

impl Domain {
    fn start(svid_ttl: &'static str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("transportd-issuer-test-")
            .tempdir()
            .unwrap();
        // Workload API callers of other users must reach the nodes' sockets below it.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut d = Self {
            dir,
            issuer: None,
            issuer_addr: String::new(),
            svid_ttl,
        };
        d.write_issuer_config("127.0.0.1:0");
        d.start_issuer();
        // From now on the issuer keeps its port across restarts.
        let addr = d.issuer_addr.clone();
        d.write_issuer_config(&addr);
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self) -> PathBuf {
        self.path("issuer/issuer.toml")
    }

    fn write_issuer_config(&self, listen: &str) {
        std::fs::create_dir_all(self.path("issuer")).unwrap();
        std::fs::write(
            self.config(),
            format!(
                r#"
trust_domain = "{TD}"
listen = "{listen}"
data_dir = "data"
[ca]
ttl = "12h"
[svid]
ttl = "{}"
sync_interval = "1s"
[audit]
dir = "audit"
"#,
                self.svid_ttl
            ),
        )
        .unwrap();
    }

    fn start_issuer(&mut self) {
        let log = self.path(&format!("issuer-{}.log", rand_suffix()));
        let mut cmd = bin();
        cmd.args(["issuer", "--config", p(&self.config())]);
        let (child, ready) =
            spawn_ready(cmd, &log).unwrap_or_else(|log| panic!("issuer did not start: {log}"));
        self.issuer_addr = ready["listen"].as_str().unwrap().to_owned();
        self.issuer = Some(child);
    }

    /// SIGKILL: what a crash looks like.
    fn crash_issuer(&mut self) {
        if let Some(mut c) = self.issuer.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// `transportd issuer ARGS --config issuer.toml`.
    fn admin(&self, args: &[&str]) -> Output {
        let mut all = vec!["issuer"];
        all.extend_from_slice(args);
        let config = self.config();
        all.extend_from_slice(&["--config", p(&config)]);
        bin().args(&all).output().unwrap()
    }

    fn admin_ok(&self, args: &[&str]) -> Output {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "issuer {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn token(&self, node: &str) -> String {
        let out = self.admin_ok(&["token", "create", "--node", &id(node)]);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn bundle_pem(&self) -> String {
        String::from_utf8(self.admin_ok(&["bundle"]).stdout).unwrap()
    }

    /// A node directory with an `[agent]` configuration and, if given, a join token.
    fn node_dir(&self, name: &str, token: Option<&str>, allow: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(dir.join("datasets/scans")).unwrap();
        std::fs::create_dir_all(dir.join("datasets/checkpoints")).unwrap();
        std::fs::write(dir.join("bootstrap-bundle.pem"), self.bundle_pem()).unwrap();
        if let Some(t) = token {
            std::fs::write(dir.join("join-token"), t).unwrap();
        }
        // The Workload API socket lives where any local user may reach it.
        let sock_dir = dir.join("run");
        std::fs::create_dir_all(&sock_dir).unwrap();
        std::fs::set_permissions(
            &sock_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(
            dir.join("node.toml"),
            format!(
                r#"
[agent]
issuer = "{}"
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
checkpoint_interval = "1s"
witness_lag = "2s"

[admin]
listen = "127.0.0.1:0"

{allow}

[limits]
chunk_size = "1MiB"
"#,
                self.issuer_addr
            ),
        )
        .unwrap();
        dir
    }

    fn issuer_trail(&self, event: &str) -> Vec<Value> {
        trail(&self.path("issuer/audit"), event)
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.crash_issuer();
    }
}

fn id(path: &str) -> String {
    format!("spiffe://{TD}{path}")
}

/// A node started with an agent configuration.
struct AgentNode {
    child: Child,
    dir: PathBuf,
    id: String,
    quic: String,
    tcp: String,
    socket: String,
    admin: String,
    log: PathBuf,
}

impl AgentNode {
    fn try_start(dir: &Path) -> Result<Self, String> {
        let log = dir.join(format!("node-{}.log", rand_suffix()));
        let mut cmd = bin();
        cmd.args(["node", "--config", p(&dir.join("node.toml"))]);
        let (child, ready) = spawn_ready(cmd, &log)?;
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
            id: ready["id"].as_str().unwrap().to_owned(),
            quic: ready["quic"].as_str().unwrap().to_owned(),
            tcp: ready["tcp"].as_str().unwrap().to_owned(),
            socket: ready["workload_socket"].as_str().unwrap().to_owned(),
            admin: ready["admin"].as_str().unwrap().to_owned(),
            log,
        })
    }

    fn start(dir: &Path) -> Self {
        Self::try_start(dir).unwrap_or_else(|log| panic!("node did not start: {log}"))
    }

    fn stop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "node exited with {status}: {}",
            std::fs::read_to_string(&self.log).unwrap()
        );
    }

    fn trail(&self, event: &str) -> Vec<Value> {
        trail(&self.dir.join("audit"), event)
    }

    /// GET `path` from the node's admin endpoint: (status code, body).
    fn admin_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// A gauge from `/metrics`; panics if it is not exported.
    fn gauge(&self, name: &str) -> i64 {
        let (_, body) = self.admin_get("/metrics");
        let prefix = format!("transportd_{name} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name} is not exported: {body}"))
            .parse()
            .unwrap()
    }

    fn workload_env(&self) -> (String, String) {
        (
            "SPIFFE_ENDPOINT_SOCKET".into(),
            format!("unix://{}", self.socket),
        )
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of `event` in the audit trail in `dir`.
fn trail(dir: &Path, event: &str) -> Vec<Value> {
    let out = bin()
        .args(["audit", "query", p(dir), "--event", event, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Runs a client command with the Workload API of `node` as its identity.
fn as_workload(node: &AgentNode, args: &[&str]) -> Output {
    let (k, v) = node.workload_env();
    bin()
        .args(args)
        .env(k, v)
        .env_remove("TRANSPORTD_IDENTITY")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_join_token_attests_a_node_once_and_bad_tokens_are_refused_and_audited() {
    let d = Domain::start("1h");
    let token = d.token("/node/storage");
    let dir = d.node_dir("storage", Some(&token), "");
    let mut node = AgentNode::start(&dir);
    assert_eq!(node.id, id("/node/storage"));
    let issued = d.issuer_trail("svid_issued");
    assert!(
        issued
            .iter()
            .any(|r| r["id"] == id("/node/storage") && r["how"] == "join_token"),
        "{issued:?}"
    );
    node.stop();

    // Restarted with its kept SVID: no token needed (the file is gone).
    std::fs::remove_file(dir.join("join-token")).unwrap();
    let mut again = AgentNode::start(&dir);
    assert_eq!(again.id, id("/node/storage"));
    again.stop();

    // Without the kept SVID, the used token is refused.
    std::fs::remove_dir_all(dir.join("agent")).unwrap();
    std::fs::write(dir.join("join-token"), &token).unwrap();
    let log = AgentNode::try_start(&dir)
        .err()
        .expect("a reused token is refused");
    assert!(log.contains("already used"), "{log}");

    // An unknown token.
    std::fs::write(dir.join("join-token"), "ab".repeat(32)).unwrap();
    let log = AgentNode::try_start(&dir)
        .err()
        .expect("an unknown token is refused");
    assert!(log.contains("unknown join token"), "{log}");

    // An expired token.
    let short = d.admin_ok(&[
        "token",
        "create",
        "--node",
        &id("/node/late"),
        "--ttl",
        "1s",
    ]);
    std::thread::sleep(Duration::from_millis(2100));
    let late = d.node_dir(
        "late",
        Some(String::from_utf8_lossy(&short.stdout).trim()),
        "",
    );
    let log = AgentNode::try_start(&late)
        .err()
        .expect("an expired token is refused");
    assert!(log.contains("expired"), "{log}");

    let refused = d.issuer_trail("issuance_refused");
    for what in ["already used", "unknown join token", "expired"] {
        assert!(
            refused
                .iter()
                .any(|r| r["reason"].as_str().unwrap().contains(what)),
            "no refusal for {what}: {refused:?}"
        );
    }
    // The trail records token hashes, never the secret.
    let raw = std::fs::read_to_string(d.path("issuer/audit/audit-000001.jsonl")).unwrap();
    assert!(
        !raw.contains(&token),
        "a join token's secret reached the audit trail"
    );
}

#[test]
fn the_issuer_keeps_entries_tokens_and_ledger_across_a_crash() {
    let mut d = Domain::start("1h");
    let out = d.admin_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("/gpu/loader"),
        "--parent-id",
        &id("/node/gpu-0"),
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--json",
    ]);
    let entry: Value = json(&out);
    let unused = d.token("/node/gpu-0");
    let status_before: Value = json(&d.admin_ok(&["status", "--json"]));
    assert!(!status_before["recent_svids"].as_array().unwrap().is_empty());

    // `health --config issuer.toml` asks the issuer's admin socket: ready while it serves,
    // also after a stray SIGHUP (which it ignores), 69 while it is down.
    let health = |d: &Domain| {
        let out = bin()
            .args(["health", "--config", p(&d.config())])
            .output()
            .unwrap();
        (out.status.code(), stderr(&out))
    };
    assert_eq!(health(&d), (Some(0), String::new()));
    let pid = d.issuer.as_ref().unwrap().id() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    assert_eq!(health(&d), (Some(0), String::new()));
    let child = d.issuer.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the issuer"
    );

    d.crash_issuer();
    let (code, said) = health(&d);
    assert_eq!(code, Some(69), "{said}");
    assert!(said.contains("issuer admin socket"), "{said}");
    d.start_issuer();
    assert_eq!(health(&d).0, Some(0));

    let list: Value = json(&d.admin_ok(&["entry", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], entry["id"]);
    let status: Value = json(&d.admin_ok(&["status", "--json"]));
    assert_eq!(status["counts"]["unused_tokens"], 1);
    assert_eq!(
        status["cas"][0]["serial"], status_before["cas"][0]["serial"],
        "same CA"
    );
    let before: Vec<&Value> = status_before["recent_svids"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let after = status["recent_svids"].as_array().unwrap();
    for s in before {
        assert!(after.contains(s), "ledger lost {s}");
    }
    // The token made before the crash still attests its node, whose workload entry works.
    let dir = d.node_dir("gpu-0", Some(&unused), "");
    let node = AgentNode::start(&dir);
    assert_eq!(node.id, id("/node/gpu-0"));
    let mut got = None;
    wait_for("the workload SVID", Duration::from_secs(15), || {
        let out = as_workload(&node, &["workload", "fetch", "--json"]);
        got = Some(out.clone());
        out.status.success()
    });
    let fetched: Value = json(&got.unwrap());
    assert_eq!(fetched["svids"][0]["spiffe_id"], id("/gpu/loader"));
}

#[test]
fn workloads_get_exactly_the_svids_their_uid_and_executable_entries_grant() {
    let d = Domain::start("1h");
    let dir = d.node_dir("gpu-0", Some(&d.token("/node/gpu-0")), "");
    let node = AgentNode::start(&dir);
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_transportd")).unwrap();
    for (who, selector, parent) in [
        ("/gpu/by-uid", format!("unix:uid:{}", uid()), "/node/gpu-0"),
        (
            "/gpu/by-exe",
            format!("unix:path:{}", exe.display()),
            "/node/gpu-0",
        ),
        (
            "/gpu/other-uid",
            format!("unix:uid:{}", uid() + 4242),
            "/node/gpu-0",
        ),
        (
            "/gpu/other-node",
            format!("unix:uid:{}", uid()),
            "/node/gpu-1",
        ),
    ] {
        d.admin_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &id(who),
            "--parent-id",
            &id(parent),
            "--selector",
            &selector,
        ]);
    }
    let mut ids: Vec<String> = Vec::new();
    wait_for("both SVIDs", Duration::from_secs(15), || {
        let out = as_workload(&node, &["workload", "fetch", "--json"]);
        if !out.status.success() {
            return false;
        }
        ids = json(&out)["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
            .collect();
        ids.len() == 2
    });
    ids.sort();
    assert_eq!(ids, vec![id("/gpu/by-exe"), id("/gpu/by-uid")]);
    // What the Workload API hands out validates against the bundle it hands out too.
    let out_dir = d.path("fetched");
    let out = as_workload(&node, &["workload", "fetch", "--out", p(&out_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svid = certs::Svid::from_pem(
        &std::fs::read_to_string(out_dir.join("svid.pem")).unwrap(),
        &std::fs::read_to_string(out_dir.join("svid.key")).unwrap(),
    )
    .unwrap();
    let bundle =
        certs::TrustBundle::from_pem(&std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap())
            .unwrap();
    bundle
        .verify(svid.chain(), SystemClock.now(), certs::Usage::Client)
        .unwrap();
    let attested = node.trail("workload_attested");
    assert!(attested.iter().any(|r| r["uid"] == uid()), "{attested:?}");
}

#[test]
#[ignore = "needs root: runs Workload API callers as another uid"]
fn another_uid_running_another_executable_gets_permission_denied() {
    assert_eq!(uid(), 0, "run as root");
    let d = Domain::start("1h");
    let dir = d.node_dir("gpu-0", Some(&d.token("/node/gpu-0")), "");
    let node = AgentNode::start(&dir);
    // Two copies of the binary where any user may run them: the entry names the first.
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_transportd")).unwrap();
    let copies = tempfile::tempdir().unwrap();
    let open_dir = |p: &Path| {
        std::fs::create_dir_all(p).unwrap();
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    open_dir(copies.path());
    let trusted = copies.path().join("trusted/transportd");
    let copy = copies.path().join("other/transportd");
    for c in [&trusted, &copy] {
        open_dir(c.parent().unwrap());
        std::fs::copy(&exe, c).unwrap();
    }
    d.admin_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("/gpu/root-loader"),
        "--parent-id",
        &id("/node/gpu-0"),
        "--selector",
        "unix:uid:0",
    ]);
    d.admin_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("/gpu/by-exe"),
        "--parent-id",
        &id("/node/gpu-0"),
        "--selector",
        &format!("unix:path:{}", trusted.display()),
    ]);
    wait_for("root's SVID", Duration::from_secs(15), || {
        let out = as_workload(&node, &["workload", "fetch", "--json"]);
        out.status.success() && json(&out)["svids"].as_array().unwrap().len() == 1
    });
    let nobody = 65534;
    let run_as = |program: &Path| {
        use std::os::unix::process::CommandExt;
        let (k, v) = node.workload_env();
        std::process::Command::new(program)
            .args(["workload", "fetch", "--json"])
            .env(k, v)
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap()
    };
    // The agent syncs entries as the issuer hands them out: root's SVID can arrive before the
    // executable's, so poll until the copy the entry names (run as nobody) is served.
    let mut by_exe = None;
    wait_for("the executable's SVID", Duration::from_secs(15), || {
        let out = run_as(&trusted);
        let ok = out.status.success();
        by_exe = Some(out);
        ok
    });
    let by_exe = by_exe.expect("polled at least once");
    // Now that the agent holds both entries' SVIDs, the other copy as nobody matches neither.
    let denied = run_as(&copy);
    assert_eq!(denied.status.code(), Some(77), "{}", stderr(&denied));
    assert!(
        stderr(&denied).contains("no identity issued"),
        "{}",
        stderr(&denied)
    );
    let svids = json(&by_exe)["svids"].clone();
    assert_eq!(svids.as_array().unwrap().len(), 1);
    assert_eq!(svids[0]["spiffe_id"], id("/gpu/by-exe"));
    let refused = node.trail("workload_refused");
    assert!(refused.iter().any(|r| r["uid"] == nobody), "{refused:?}");
}

/// The Python client py-spiffe (grpc-core underneath, which sends the socket's path,
/// percent-encoded, as every call's `:authority`) fetches its X.509-SVID and the bundles
/// from a node's Workload API socket, unchanged.
#[test]
#[ignore = "needs py-spiffe: PY_SPIFFE_PYTHON names a Python with it (scripts/test.sh sets one up)"]
fn py_spiffe_fetches_the_svid_and_bundles_from_the_workload_api() {
    let python = std::env::var("PY_SPIFFE_PYTHON")
        .expect("PY_SPIFFE_PYTHON: a Python with py-spiffe (`pip install spiffe`)");
    let d = Domain::start("1h");
    let dir = d.node_dir("gpu-0", Some(&d.token("/node/gpu-0")), "");
    let node = AgentNode::start(&dir);
    d.admin_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("/gpu/notebook"),
        "--parent-id",
        &id("/node/gpu-0"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    wait_for("the workload's SVID", Duration::from_secs(15), || {
        as_workload(&node, &["workload", "fetch", "--json"])
            .status
            .success()
    });
    let script = r#"
import json, os
from spiffe import WorkloadApiClient
with WorkloadApiClient(os.environ["SPIFFE_ENDPOINT_SOCKET"]) as client:
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    print(json.dumps({
        "id": str(svid.spiffe_id),
        "chain": len(svid.cert_chain),
        "domains": sorted(str(b.trust_domain) for b in bundles.bundles),
    }))
"#;
    let (k, v) = node.workload_env();
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .env(k, v)
        .output()
        .unwrap();
    assert!(out.status.success(), "py-spiffe: {}", stderr(&out));
    let got = json(&out);
    assert_eq!(got["id"], id("/gpu/notebook"));
    assert!(got["chain"].as_u64().unwrap() >= 1);
    assert_eq!(got["domains"], serde_json::json!([TD]));
}

/// A storage node and a GPU node of one domain, the GPU node's loader workload allowed to
/// read `scans` and write `checkpoints` on the storage node.
fn storage_and_gpu(d: &Domain) -> (AgentNode, AgentNode) {
    let allow = format!(
        "[[allow]]\npeer = \"{}\"\ndataset = \"scans\"\nactions = [\"read\"]\n\n\
         [[allow]]\npeer = \"{}\"\ndataset = \"scans\"\nactions = [\"read\"]\n",
        id("/gpu/loader"),
        id("/node/gpu-1"),
    );
    let storage = d.node_dir("storage", Some(&d.token("/node/storage")), &allow);
    let gpu = d.node_dir("gpu-0", Some(&d.token("/node/gpu-0")), "");
    d.admin_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id("/gpu/loader"),
        "--parent-id",
        &id("/node/gpu-0"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    let storage = AgentNode::start(&storage);
    let gpu = AgentNode::start(&gpu);
    wait_for("the loader's SVID", Duration::from_secs(15), || {
        as_workload(&gpu, &["workload", "fetch"]).status.success()
    });
    (storage, gpu)
}

#[test]
fn a_paced_pull_spans_two_rotations_on_both_sides_and_ends_byte_identical() {
    let d = Domain::start("20s");
    let (mut storage, mut gpu) = storage_and_gpu(&d);
    let data = write_data(&storage.dir.join("datasets/scans/big.bin"), 48 << 20, 7);
    let dest = d.path("pulled/big.bin");
    // 48 MiB at 1.5 MiB/s: about 32 s, past the 20 s lifetime of every SVID in play and
    // across at least two renewals (at about half-life) on each side.
    let out = as_workload(
        &gpu,
        &[
            "pull",
            "--node",
            &storage.quic,
            "--path",
            "quic",
            "--max-rate",
            "1536KiB",
            "--json",
            "scans/big.bin",
            p(&dest),
        ],
    );
    assert!(out.status.success(), "pull failed: {}", stderr(&out));
    assert!(std::fs::read(&dest).unwrap() == data, "bytes differ");
    let report: Value = json(&out);
    assert_eq!(report["verified"], true, "{report}");
    storage.stop();
    gpu.stop();
    let storage_rotations: Vec<Value> = storage
        .trail("identity_rotated")
        .into_iter()
        .filter(|r| r["id"] == id("/node/storage"))
        .collect();
    assert!(storage_rotations.len() >= 2, "{storage_rotations:?}");
    let loader_rotations: Vec<Value> = gpu
        .trail("identity_rotated")
        .into_iter()
        .filter(|r| r["id"] == id("/gpu/loader"))
        .collect();
    assert!(loader_rotations.len() >= 2, "{loader_rotations:?}");
    // The loader's connection outlived its first SVID: it reconnected with a newer one.
    let accepted: Vec<Value> = storage
        .trail("connection_accepted")
        .into_iter()
        .filter(|r| r["peer"] == id("/gpu/loader"))
        .collect();
    let serials: std::collections::HashSet<&str> = accepted
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    assert!(serials.len() >= 2, "{accepted:?}");
}

#[test]
fn a_ca_rollover_during_traffic_breaks_nothing_and_retire_cuts_off_the_old_ca() {
    let d = Domain::start("20s");
    let (storage, gpu) = storage_and_gpu(&d);
    let data = write_data(&storage.dir.join("datasets/scans/roll.bin"), 64 << 20, 9);
    // The old CA, kept aside to mint an SVID under it later (as a stolen CA key would).
    let status: Value = json(&d.admin_ok(&["status", "--json"]));
    let old_serial = status["cas"][0]["serial"].as_str().unwrap().to_owned();
    let old_ca = d.path("old-ca");
    std::fs::create_dir_all(&old_ca).unwrap();
    std::fs::write(old_ca.join("ca.pem"), d.bundle_pem()).unwrap();
    std::fs::copy(
        d.path(&format!("issuer/data/ca/{old_serial}.key")),
        old_ca.join("ca.key"),
    )
    .unwrap();
    let mint_old = |out: &Path| {
        common::ok(&[
            "ca",
            "issue",
            "--ca",
            p(&old_ca),
            "--id",
            &id("/node/gpu-1"),
            "--ttl",
            "1h",
            "--out",
            p(out),
        ]);
    };
    let ls_as = |ident: &Path| {
        bin()
            .args([
                "ls",
                "--node",
                &storage.tcp,
                "--path",
                "tcp",
                "--identity",
                p(ident),
                "scans",
            ])
            .output()
            .unwrap()
    };
    let before = d.path("old-svid-before");
    mint_old(&before);
    let ok_before = ls_as(&before);
    assert!(
        ok_before.status.success(),
        "control: {}",
        stderr(&ok_before)
    );

    // A pull runs through the whole rollover.
    let dest = d.path("pulled/roll.bin");
    let (k, v) = gpu.workload_env();
    let pull = bin()
        .args([
            "pull",
            "--node",
            &storage.quic,
            "--path",
            "quic",
            "--max-rate",
            "1MiB",
            "--json",
            "scans/roll.bin",
            p(&dest),
        ])
        .env(k, v)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The pull is under way once its partial file exists (it is rate-limited to 64 s).
    let partial = d.path("pulled/.roll.bin.transportd-partial");
    wait_for("the pull to start", Duration::from_secs(30), || {
        partial.exists()
    });
    d.admin_ok(&["ca", "prepare"]);
    // Both nodes trust the two-CA bundle before the new CA signs anything.
    let trusts = |node: &AgentNode, cas: u64| {
        let updates = node.trail("trust_updated");
        updates.last().is_some_and(|r| r["cas"] == cas)
    };
    wait_for(
        "the nodes to sync the two-CA bundle",
        Duration::from_secs(30),
        || trusts(&storage, 2) && trusts(&gpu, 2),
    );
    d.admin_ok(&["ca", "activate"]);
    // Every SVID of the old CA runs out within its 20 s lifetime; retire as soon as allowed.
    wait_for("retire to be allowed", Duration::from_secs(60), || {
        d.admin(&["ca", "retire"]).status.success()
    });
    let out = pull.wait_with_output().unwrap();
    assert!(out.status.success(), "pull failed: {}", stderr(&out));
    assert!(std::fs::read(&dest).unwrap() == data, "bytes differ");

    // After retire, an SVID signed by the old CA is refused, although valid in time.
    wait_for(
        "the bundle without the old CA to reach the node",
        Duration::from_secs(30),
        || trusts(&storage, 1),
    );
    let after = d.path("old-svid-after");
    mint_old(&after);
    let refused = ls_as(&after);
    assert_eq!(refused.status.code(), Some(77), "{}", stderr(&refused));
    // And the nodes' new SVIDs come from the new CA: a fresh workload fetch verifies against
    // a bundle that no longer holds the old one.
    let status: Value = json(&d.admin_ok(&["status", "--json"]));
    let states: Vec<&str> = status["cas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["retired", "active"]);
    // The storage node's trail holds checkpoints signed under both CAs: it verifies against
    // every CA the issuer ever had.
    let all_cas = d.path("all-cas.pem");
    std::fs::write(&all_cas, d.admin_ok(&["bundle", "--all"]).stdout).unwrap();
    let verified = bin()
        .args([
            "audit",
            "verify",
            p(&storage.dir.join("audit")),
            "--bundle",
            p(&all_cas),
        ])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", stderr(&verified));
    let changes = d.issuer_trail("ca_changed");
    let steps: Vec<&str> = changes
        .iter()
        .map(|c| c["change"].as_str().unwrap())
        .collect();
    assert_eq!(steps, vec!["created", "prepared", "activated", "retired"]);
}

#[test]
fn a_node_restarted_while_the_issuer_is_down_keeps_its_revocations_and_workload_svids() {
    let mut d = Domain::start("1h");
    let (mut storage, mut gpu) = storage_and_gpu(&d);
    let rogue_dir = d.node_dir("gpu-1", Some(&d.token("/node/gpu-1")), "");
    AgentNode::start(&rogue_dir).stop();
    // The rogue node's own SVID, as an attacker holding its disk would use it.
    let node_pem = rogue_dir.join("agent/node.pem");
    let bundle = rogue_dir.join("agent/bundle.pem");
    let rogue_ls = |storage: &AgentNode| {
        bin()
            .args(["ls", "--node", &storage.quic, "--path", "quic"])
            .args(["--svid", p(&node_pem), "--key", p(&node_pem)])
            .args(["--bundle", p(&bundle), "scans"])
            .output()
            .unwrap()
    };
    let control = rogue_ls(&storage);
    assert!(control.status.success(), "control: {}", stderr(&control));
    d.admin_ok(&["node", "ban", &id("/node/gpu-1")]);
    wait_for(
        "the storage node to refuse gpu-1",
        Duration::from_secs(10),
        || rogue_ls(&storage).status.code() == Some(77),
    );
    // While the issuer answers, the GPU node says nothing of serving offline.
    let (_, ready) = gpu.admin_get("/readyz");
    assert!(!ready.contains("issuer unreachable"), "{ready}");
    assert_eq!(
        metric(
            &gpu.admin_get("/metrics").1,
            "transportd_issuer_unreachable_seconds"
        ),
        Some(0.0)
    );
    // The issuer goes away, then both nodes restart.
    d.crash_issuer();
    let (storage_dir, gpu_dir) = (storage.dir.clone(), gpu.dir.clone());
    storage.stop();
    gpu.stop();
    drop((storage, gpu));
    let mut storage = AgentNode::start(&storage_dir);
    let gpu = AgentNode::start(&gpu_dir);
    // At once, with no issuer to ask: the ban from before the restart holds...
    let refused = rogue_ls(&storage);
    assert_eq!(refused.status.code(), Some(77), "{}", stderr(&refused));
    // ... and the GPU node serves its loader the SVID it kept, which the storage node
    // accepts.
    let fetched = as_workload(&gpu, &["workload", "fetch", "--json"]);
    assert!(fetched.status.success(), "{}", stderr(&fetched));
    assert_eq!(json(&fetched)["svids"][0]["spiffe_id"], id("/gpu/loader"));
    let ls = as_workload(
        &gpu,
        &["ls", "--node", &storage.quic, "--path", "quic", "scans"],
    );
    assert!(ls.status.success(), "{}", stderr(&ls));
    // And it says how long it can go on so: in `/readyz` (still ready) and the metrics.
    let mut ready = String::new();
    wait_for(
        "the GPU node to report the issuer unreachable",
        Duration::from_secs(20),
        || {
            let (code, body) = gpu.admin_get("/readyz");
            ready = body;
            code == 200 && ready.contains("issuer unreachable for")
        },
    );
    let left = |what: &str| -> u64 {
        let after = ready
            .split(what)
            .nth(1)
            .unwrap_or_else(|| panic!("{what}: {ready}"));
        after[..after.find('s').unwrap()].parse().unwrap()
    };
    assert!(left("its SVID valid for ") > 1800, "{ready}");
    assert!(left("the soonest workload SVID for ") > 1800, "{ready}");
    let metrics = gpu.admin_get("/metrics").1;
    assert!(metric(&metrics, "transportd_issuer_unreachable_seconds").unwrap() > 0.0);
    assert!(metric(&metrics, "transportd_workload_svid_expiry_seconds").unwrap() > 1800.0);
    // Control: without the kept revocations a restarted node would take the rogue back.
    storage.stop();
    drop(storage);
    std::fs::remove_file(storage_dir.join("agent/revoked.json")).unwrap();
    let storage = AgentNode::start(&storage_dir);
    let accepted = rogue_ls(&storage);
    assert!(accepted.status.success(), "{}", stderr(&accepted));
}

#[test]
fn peers_refuse_a_banned_node_within_seconds() {
    let d = Domain::start("1h");
    let (storage, _gpu) = storage_and_gpu(&d);
    let rogue_dir = d.node_dir("gpu-1", Some(&d.token("/node/gpu-1")), "");
    let mut rogue = AgentNode::start(&rogue_dir);
    rogue.stop();
    // The rogue node's own SVID, as an attacker holding its disk would use it.
    let node_pem = rogue_dir.join("agent/node.pem");
    let bundle = rogue_dir.join("agent/bundle.pem");
    let ls = || {
        bin()
            .args([
                "ls",
                "--node",
                &storage.quic,
                "--path",
                "quic",
                "--svid",
                p(&node_pem),
                "--key",
                p(&node_pem),
                "--bundle",
                p(&bundle),
                "scans",
            ])
            .output()
            .unwrap()
    };
    let control = ls();
    assert!(control.status.success(), "control: {}", stderr(&control));
    let banned = d.admin_ok(&["node", "ban", &id("/node/gpu-1")]);
    assert!(String::from_utf8_lossy(&banned.stdout).contains("revoked"));
    let start = SystemClock.instant();
    let mut last = None;
    wait_for(
        "the storage node to refuse gpu-1",
        Duration::from_secs(10),
        || {
            let out = ls();
            let refused = out.status.code() == Some(77);
            last = Some(out);
            refused
        },
    );
    eprintln!("refused {:?} after the ban", start.elapsed());
    // The node notes the refusal as the client leaves, perhaps just after.
    wait_for("the refusal in the trail", Duration::from_secs(10), || {
        storage.trail("connection_refused").iter().any(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("revoked")
        })
    });
    // The SVID itself is still within its lifetime: this is revocation, not expiry.
    let svid = certs::Svid::from_pem(
        &std::fs::read_to_string(&node_pem).unwrap(),
        &std::fs::read_to_string(&node_pem).unwrap(),
    )
    .unwrap();
    assert!(svid.not_after() > SystemClock.now() + Duration::from_secs(600));
    // And the banned node can neither renew nor attest again.
    std::fs::write(rogue_dir.join("join-token"), d.token("/node/gpu-1")).unwrap();
    std::fs::remove_dir_all(rogue_dir.join("agent")).unwrap();
    let log = AgentNode::try_start(&rogue_dir)
        .err()
        .expect("a banned node cannot attest");
    assert!(log.contains("banned"), "{log}");
    drop(last);
}

/// The checkpoints the issuer witnessed for `node`, as `issuer witness export` prints them.
fn witnessed(d: &Domain, node: &str) -> (Vec<u64>, String) {
    let out = d.admin_ok(&["witness", "export", "--node", &id(node)]);
    let text = String::from_utf8(out.stdout).unwrap();
    let seqs = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    (seqs, text)
}

/// A pull of a small file by the GPU node's loader; the seq of the storage node's record
/// of it.
fn pull_one(d: &Domain, storage: &AgentNode, gpu: &AgentNode, name: &str) -> u64 {
    write_data(
        &storage.dir.join(format!("datasets/scans/{name}")),
        256 << 10,
        5,
    );
    let dest = d.path(&format!("pulled/{name}"));
    let out = as_workload(
        gpu,
        &[
            "pull",
            "--node",
            &storage.quic,
            "--path",
            "quic",
            &format!("scans/{name}"),
            p(&dest),
        ],
    );
    assert!(out.status.success(), "pull: {}", stderr(&out));
    let mut seq = None;
    wait_for("the transfer record", Duration::from_secs(10), || {
        seq = storage
            .trail("transfer")
            .iter()
            .find(|r| r["object"] == name)
            .and_then(|r| r["seq"].as_u64());
        seq.is_some()
    });
    seq.unwrap()
}

fn verify_trail(dir: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["audit", "verify", p(dir)])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_trail_rebuilt_with_the_nodes_key_fails_against_its_witness_which_refuses_the_rewrite() {
    let d = Domain::start("1h");
    let (mut storage, gpu) = storage_and_gpu(&d);
    let transfer = pull_one(&d, &storage, &gpu, "witnessed.bin");
    wait_for(
        "a checkpoint after the transfer at the witness",
        Duration::from_secs(15),
        || witnessed(&d, "/node/storage").0.last() > Some(&transfer),
    );
    storage.stop();
    let (seqs, text) = witnessed(&d, "/node/storage");
    let receipts = d.path("receipts.jsonl");
    std::fs::write(&receipts, text).unwrap();
    let bundle = d.path("all-cas.pem");
    std::fs::write(&bundle, d.admin_ok(&["bundle", "--all"]).stdout).unwrap();
    let audit = storage.dir.join("audit");
    let witness_args = ["--bundle", p(&bundle), "--witness", p(&receipts)];
    // The untouched trail matches its witness, countersignatures checked...
    let ok = verify_trail(&audit, &witness_args);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("matches its witness"));
    // ... also asked of the running issuer...
    let asked = verify_trail(&audit, &["--witness-issuer", p(&d.config())]);
    assert!(asked.status.success(), "{}", stderr(&asked));
    // ... and so do the receipts the node kept beside it.
    let kept = verify_trail(&audit, &["--witness", p(&audit.join("witness.jsonl"))]);
    assert!(kept.status.success(), "{}", stderr(&kept));

    // Root on the node rebuilds the trail with the node's own key: the transfer now reads
    // as another object.
    let pem = std::fs::read_to_string(storage.dir.join("agent/node.pem")).unwrap();
    let node_bundle = std::fs::read_to_string(storage.dir.join("agent/bundle.pem")).unwrap();
    let node_key = libtransport::test_util::identity_of(
        certs::Svid::from_pem(&pem, &pem).unwrap(),
        certs::TrustBundle::from_pem(&node_bundle).unwrap(),
    );
    let changed = libtransport::test_util::rebuild_trail(&audit, &node_key, None, |v| {
        let hit = v["event"] == "transfer" && v["object"] == "witnessed.bin";
        if hit {
            v["object"] = "something-else.bin".into();
        }
        hit
    });
    assert_eq!(changed, Some(transfer));
    let first_lost = *seqs.iter().find(|s| **s > transfer).unwrap();
    // The control: the node's own signatures cannot tell...
    let plain = verify_trail(&audit, &["--bundle", p(&bundle)]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    // ... its witness can, naming the first witnessed checkpoint the trail lost.
    let caught = verify_trail(&audit, &witness_args);
    assert_eq!(caught.status.code(), Some(65), "{}", stderr(&caught));
    assert!(
        stderr(&caught).contains(&format!("(seq {first_lost})")),
        "{}",
        stderr(&caught)
    );
    let asked = verify_trail(&audit, &["--witness-issuer", p(&d.config())]);
    assert_eq!(asked.status.code(), Some(65), "{}", stderr(&asked));
    assert!(stderr(&asked).contains(&format!("(seq {first_lost})")));

    // Cut back to just before that checkpoint and restarted, the node checkpoints that seq
    // again over other records: the witness refuses it and records the refusal, and the
    // node says so.
    libtransport::test_util::rebuild_trail(&audit, &node_key, Some(first_lost - 1), |_| false);
    let storage = AgentNode::start(&storage.dir);
    wait_for(
        "the refusal in the issuer's trail",
        Duration::from_secs(15),
        || {
            d.issuer_trail("witness_refused")
                .iter()
                .any(|r| r["node"] == id("/node/storage") && r["seq"] == first_lost)
        },
    );
    let refusal = d.issuer_trail("witness_refused");
    assert!(
        refusal[0]["reason"].as_str().unwrap().contains("rewritten"),
        "{refusal:?}"
    );
    assert_eq!(
        witnessed(&d, "/node/storage").0,
        seqs,
        "the witness kept what it held"
    );
    wait_for("the node to report it", Duration::from_secs(10), || {
        storage.gauge("audit_witness_refusals") >= 1
    });
    let (status, body) = storage.admin_get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("audit witness refused"), "{body}");
}

/// Only nodes' checkpoints are witnessed: a node configured with a workload's SVID (here
/// the loader's, from the Workload API) is refused, the refusal is in the issuer's trail,
/// and nothing of it is kept. Control: the storage node beside it is witnessed.
#[test]
fn the_witness_refuses_checkpoints_from_a_workloads_svid() {
    let d = Domain::start("1h");
    let (_storage, gpu) = storage_and_gpu(&d);
    let dir = d.path("impostor");
    std::fs::create_dir_all(dir.join("datasets/scans")).unwrap();
    let fetched = as_workload(
        &gpu,
        &["workload", "fetch", "--out", p(&dir.join("identity"))],
    );
    assert!(fetched.status.success(), "{}", stderr(&fetched));
    let witness = format!(
        "[audit]\ndir = \"audit\"\nwitness = \"{}\"\nwitness_id = \"{}\"\n",
        d.issuer_addr,
        id("/issuer")
    );
    let toml = common::NODE_TOML.replace("[audit]\ndir = \"audit\"\n", &witness);
    assert!(toml.contains("witness_id"));
    std::fs::write(dir.join("node.toml"), toml).unwrap();
    let mut cmd = bin();
    cmd.current_dir(&dir)
        .args(["node", "--config", p(&dir.join("node.toml"))]);
    let log = dir.join("node.log");
    let (mut impostor, _) = spawn_ready(cmd, &log).unwrap();
    let refused = || {
        d.issuer_trail("witness_refused")
            .iter()
            .any(|r| r["node"] == id("/gpu/loader"))
    };
    let start = SystemClock.instant();
    while !refused() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no refusal at the issuer; the node's log: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let refusal = d.issuer_trail("witness_refused");
    assert!(
        refusal[0]["reason"].as_str().unwrap().contains("workload"),
        "{refusal:?}"
    );
    assert!(witnessed(&d, "/gpu/loader").0.is_empty());
    // The control: a node's checkpoints are kept.
    wait_for(
        "the storage node's checkpoints",
        Duration::from_secs(20),
        || !witnessed(&d, "/node/storage").0.is_empty(),
    );
    impostor.kill().unwrap();
    impostor.wait().unwrap();
}

#[test]
fn checkpoints_wait_while_the_issuer_is_down_and_reach_it_when_it_is_back() {
    let mut d = Domain::start("1h");
    let (storage, gpu) = storage_and_gpu(&d);
    d.crash_issuer();
    // Transfers go on without the witness...
    let transfer = pull_one(&d, &storage, &gpu, "offline.bin");
    let mut sealed = 0;
    wait_for(
        "a checkpoint after the transfer",
        Duration::from_secs(10),
        || {
            sealed = storage
                .trail("checkpoint")
                .last()
                .and_then(|r| r["seq"].as_u64())
                .unwrap_or(0);
            sealed > transfer
        },
    );
    // ... while its checkpoints wait, and the node says so once they wait too long.
    wait_for(
        "a checkpoint waiting for the witness",
        Duration::from_secs(10),
        || storage.gauge("audit_checkpoints_unwitnessed") >= 1,
    );
    wait_for("the lag in /readyz", Duration::from_secs(10), || {
        storage
            .admin_get("/readyz")
            .1
            .contains("audit witness lags")
    });
    let (status, body) = storage.admin_get("/readyz");
    assert_eq!(status, 200, "still ready: {body}");
    // Back, the issuer gets them.
    d.start_issuer();
    wait_for(
        "the checkpoints at the witness",
        Duration::from_secs(20),
        || witnessed(&d, "/node/storage").0.last() >= Some(&sealed),
    );
    wait_for("the queue to drain", Duration::from_secs(10), || {
        storage.gauge("audit_checkpoints_unwitnessed") == 0
    });
    assert!(storage.gauge("audit_last_witnessed_seq") >= sealed as i64);
    assert!(
        !storage
            .admin_get("/readyz")
            .1
            .contains("audit witness lags")
    );
}
