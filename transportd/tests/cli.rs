//! The real `transportd` binary: the demo, the CA and config commands, the generated man
//! pages and completions, a node with client commands against it, and a pull that resumes
//! after the serving process was killed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libtransport::proto::{DatasetName, Digest, ObjectPath};
use libtransport::store::digest_file;
use serde_json::Value;

mod common;

use common::{
    NODE_TOML, Node, Site, client, intact_chunks, json, kill_at_a_third, library_client, ok, p,
    partial_in, run, wait_for, write_data,
};

#[test]
fn demo_moves_64mib_over_both_paths_and_verifies() {
    let out = ok(&["demo", "--size", "64MiB", "--json"]);
    let report = json(&out);
    assert_eq!(report["verified"], true, "{report}");
    let paths = report["paths"].as_array().unwrap();
    let names: Vec<&str> = paths.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(names, ["quic", "tcp"]);
    // One bare TCP connection on loopback, measured in the same run: at least 256 MiB.
    let bare = report["bare_tcp_gbps"].as_f64().unwrap();
    assert!(bare.is_finite() && bare > 0.0, "{report}");
    assert_eq!(report["bare_tcp_bytes"], 256 << 20);
    assert!(report["bare_tcp_seconds"].as_f64().unwrap() > 0.0);
    for p in paths.iter().chain([&report["push"]]) {
        let gbps = p["gbps"].as_f64().unwrap();
        assert!(gbps > 0.0);
        // Each path against that figure (all three are rounded to three places).
        let ratio = p["ratio_to_bare_tcp"].as_f64().unwrap();
        assert!(ratio > 0.0, "{p}");
        assert!(
            (ratio * bare - gbps).abs() <= 0.001 + 0.001 * bare,
            "{p}: bare {bare}"
        );
    }
    for p in paths {
        assert_eq!(p["bytes"], 64 << 20);
    }
    assert_eq!(report["push"]["verified"], true);
    // Through the GPU node's sidecar: the first pull fetched every shard from storage, the
    // second was all from the node's cache; the storage node served the bytes once.
    let sc = &report["sidecar"];
    assert_eq!(sc["verified"], true, "{sc}");
    let pulls = sc["pulls"].as_array().unwrap();
    assert_eq!(pulls.len(), 2);
    let shards = report["dataset"]["shards"].as_u64().unwrap();
    assert_eq!(pulls[0]["from_cache"], 0, "{sc}");
    assert_eq!(pulls[1]["from_cache"], shards, "{sc}");
    assert_eq!(sc["cache_misses"], shards, "{sc}");
    assert_eq!(sc["from_storage_bytes"], 64 << 20, "{sc}");
}

#[test]
fn demo_keep_leaves_the_trust_domain_data_and_audit_trails() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let report = json(&ok(&[
        "demo",
        "--size",
        "8MiB",
        "--keep",
        p(&keep),
        "--json",
    ]));
    assert_eq!(report["verified"], true);
    for f in [
        "issuer/issuer.toml",
        "issuer/data/state.db",
        "issuer/audit/checkpoint.json",
        "storage/node.toml",
        "storage/agent/node.pem",
        "storage/agent/bundle.pem",
        "storage/audit/audit-000001.jsonl",
        "storage/audit/checkpoint.json",
        "gpu/audit/checkpoint.json",
        "loader/audit/audit-000001.jsonl",
        "loader/audit/checkpoint.json",
    ] {
        assert!(keep.join(f).is_file(), "{f} missing");
    }
    // Every trail verifies (the demo checked them too) and holds what happened.
    let bundle = keep.join("storage/agent/bundle.pem");
    for who in ["issuer", "storage", "gpu", "loader"] {
        assert_eq!(report["audit"][who]["verified"], true, "{report}");
        ok(&[
            "audit",
            "verify",
            p(&keep.join(who).join("audit")),
            "--bundle",
            p(&bundle),
        ]);
    }
    assert_eq!(
        report["identities"]["loader"],
        "spiffe://demo.transportd.internal/gpu/loader"
    );
    let issuer =
        libtransport::audit::query(&keep.join("issuer/audit"), &Default::default()).unwrap();
    for how in ["join_token", "entry"] {
        assert!(
            issuer
                .iter()
                .any(|r| r["event"] == "svid_issued" && r["how"] == how),
            "no SVID issued by {how}"
        );
    }
    let records =
        libtransport::audit::query(&keep.join("storage/audit"), &Default::default()).unwrap();
    assert!(records.iter().any(|r| r["event"] == "connection_accepted"
        && r["peer"] == "spiffe://demo.transportd.internal/gpu/loader"));
    let gpu = libtransport::audit::query(&keep.join("gpu/audit"), &Default::default()).unwrap();
    assert!(gpu.iter().any(|r| r["event"] == "workload_attested"));
    let loader =
        libtransport::audit::query(&keep.join("loader/audit"), &Default::default()).unwrap();
    assert!(
        loader
            .iter()
            .any(|r| r["event"] == "transfer" && r["direction"] == "in")
    );
    // A non-empty --keep directory is refused rather than mixed into.
    let again = run(&["demo", "--size", "8MiB", "--keep", p(&keep)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[test]
fn ca_keys_are_private_and_config_check_names_bad_fields() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    for key in ["ca/ca.key", "storage/identity/svid.key", "loader/svid.key"] {
        let mode = std::fs::metadata(site.path(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // Refuses to overwrite a CA without --force.
    let again = run(&[
        "ca",
        "init",
        "--trust-domain",
        "hospital.example",
        "--out",
        p(&site.path("ca")),
    ]);
    assert!(!again.status.success());

    let out = ok(&["config", "check", p(&site.config())]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("spiffe://hospital.example/node/storage")
    );
    let bad = site.path("storage/bad.toml");
    std::fs::write(&bad, NODE_TOML.replace("[store]", "[store]\nroots = \"x\"")).unwrap();
    let out = run(&["config", "check", p(&bad)]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("roots"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An identity file that does not exist is named.
    std::fs::write(
        &bad,
        NODE_TOML.replace("identity/svid.key", "identity/missing.key"),
    )
    .unwrap();
    let out = run(&["config", "check", p(&bad)]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity.key"));
    // The printed example is a valid file apart from its paths.
    let example = ok(&["config", "example"]);
    assert!(String::from_utf8_lossy(&example.stdout).contains("[[allow]]"));
}

#[test]
fn help_teaches_and_usage_errors_exit_64() {
    let out = ok(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo") && text.contains("ca") && text.contains("pull"));
    let out = ok(&["pull", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("interruption"));
    assert_eq!(run(&["pull"]).status.code(), Some(64));
    assert_eq!(run(&["no-such-command"]).status.code(), Some(64));
}

/// `generate man` writes a page for the command and for every subcommand, each a page
/// `man` renders; `generate completions` names the subcommands for each shell.
#[test]
fn generated_man_pages_render_and_completions_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&["generate", "man", p(dir.path())]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("man pages in"));
    let main_pages = [
        "transportd",
        "transportd-node",
        "transportd-issuer",
        "transportd-issuer-token-create",
        "transportd-health",
        "transportd-pull",
        "transportd-push",
        "transportd-ls",
        "transportd-audit-verify",
        "transportd-config-check",
        "transportd-workload-fetch",
    ];
    // `man -l` (man-db) renders a page file; without it, the roff header must be there.
    let has_man = std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_man {
        println!("`man` is not installed: checking the pages' roff headers only");
    }
    for name in main_pages {
        let page = dir.path().join(format!("{name}.1"));
        let roff = std::fs::read_to_string(&page)
            .unwrap_or_else(|e| panic!("no man page {}: {e}", page.display()));
        assert!(
            roff.starts_with(".ie \\n(.g .ds Aq") || roff.contains("\n.TH "),
            "{roff}"
        );
        assert!(roff.contains(&format!(".TH {name} 1")), "{name}: {roff}");
        if has_man {
            let shown = std::process::Command::new("man")
                .arg("-l")
                .arg(&page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&shown.stdout);
            assert!(
                shown.status.success(),
                "man -l {name}: {}",
                String::from_utf8_lossy(&shown.stderr)
            );
            assert!(
                text.contains("NAME") && text.contains("SYNOPSIS"),
                "{name}: {text}"
            );
        }
    }
    let node = std::fs::read_to_string(dir.path().join("transportd-node.1")).unwrap();
    assert!(
        node.contains("SIGHUP"),
        "the node's page carries its help: {node}"
    );

    let bash = ok(&["generate", "completions", "bash"]);
    let bash = String::from_utf8_lossy(&bash.stdout);
    for sub in [
        "node", "issuer", "health", "pull", "push", "audit", "generate", "workload",
    ] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    assert!(bash.contains("complete -F _transportd"), "{bash}");
    for shell in ["zsh", "fish"] {
        let out = ok(&["generate", "completions", shell]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("health"),
            "{shell}"
        );
    }
    assert_eq!(
        run(&["generate", "completions", "tcsh"]).status.code(),
        Some(64)
    );
}

#[test]
fn client_commands_against_a_node() {
    let site = Site::new();
    let data = write_data(
        &site.path("storage/datasets/scans/ward-7/patient-0042.bin"),
        (5 << 20) + 3,
        1,
    );
    let small = write_data(
        &site.path("storage/datasets/scans/ward-7/notes.bin"),
        1000,
        2,
    );
    let node = Node::start(&site);

    for path in ["quic", "tcp"] {
        let mut args = vec!["ls".to_owned()];
        args.extend(client(&site, "loader", &node, path));
        args.push("--json".into());
        let listed = json(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_eq!(
            listed["datasets"],
            serde_json::json!(["checkpoints", "scans"])
        );

        // Pull the whole dataset.
        let dest = site.path(&format!("gpu-{path}"));
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "loader", &node, path));
        args.extend(["--json".into(), "scans".into(), p(&dest).into()]);
        let report = json(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_eq!(report["verified"], true);
        assert_eq!(
            std::fs::read(dest.join("ward-7/patient-0042.bin")).unwrap(),
            data
        );
        assert_eq!(std::fs::read(dest.join("ward-7/notes.bin")).unwrap(), small);

        // Push a checkpoint back.
        let ckpt = site.path(&format!("step-{path}.ckpt"));
        let ck = write_data(&ckpt, (3 << 20) + 11, 3);
        let mut args = vec!["push".to_owned()];
        args.extend(client(&site, "loader", &node, path));
        args.extend([
            "--json".into(),
            p(&ckpt).into(),
            format!("checkpoints/run-1/step-{path}.ckpt"),
        ]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stored = site.path(&format!(
            "storage/datasets/checkpoints/run-1/step-{path}.ckpt"
        ));
        assert_eq!(std::fs::read(stored).unwrap(), ck);

        // An identity with no grant: a missing dataset and a forbidden one look alike.
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "intruder", &node, path));
        args.extend([
            "scans/ward-7/notes.bin".into(),
            p(&site.path("stolen.bin")).into(),
        ]);
        let denied = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            denied.status.code(),
            Some(66),
            "{}",
            String::from_utf8_lossy(&denied.stderr)
        );
        let at = args.len() - 2;
        args[at] = "no-such/ward-7/notes.bin".into();
        let missing = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(missing.status.code(), Some(66));
        assert!(!site.path("stolen.bin").exists());
    }

    // A client from another trust domain's CA is refused at the handshake (exit 77).
    let other = site.path("other-ca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "hospital.example",
        "--out",
        p(&other),
    ]);
    ok(&[
        "ca",
        "issue",
        "--ca",
        p(&other),
        "--id",
        "spiffe://hospital.example/gpu/loader",
        "--out",
        p(&site.path("rogue")),
    ]);
    // It trusts our node, so the refusal is the node's.
    std::fs::copy(site.path("ca/bundle.pem"), site.path("rogue/bundle.pem")).unwrap();
    let mut args = vec!["ls".to_owned()];
    args.extend(client(&site, "rogue", &node, "tcp"));
    let refused = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        refused.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused"));

    // The audit trail names who moved what; the debug log never names the object or
    // carries its bytes. The node may note the refusal just after the client has left.
    let query = || libtransport::audit::query(&site.path("storage/audit"), &Default::default());
    wait_for("the refusal in the trail", Duration::from_secs(10), || {
        query()
            .unwrap()
            .iter()
            .any(|r| r["event"] == "connection_refused")
    });
    let records = query().unwrap();
    let transfers: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "transfer")
        .collect();
    assert!(
        transfers
            .iter()
            .any(|r| r["object"] == "ward-7/patient-0042.bin"
                && r["peer"] == "spiffe://hospital.example/gpu/loader"
                && r["outcome"] == "complete"
                && r["root"].as_str().is_some_and(|s| s.len() == 64))
    );
    assert!(records.iter().any(|r| r["event"] == "authorization"
        && r["decision"] == "deny"
        && r["peer"] == "spiffe://hospital.example/gpu/intruder"));
    assert!(records.iter().any(|r| r["event"] == "connection_refused"));
    let log = std::fs::read(&node.log).unwrap();
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("connection accepted"),
        "the log check looked at an empty log"
    );
    assert!(
        !log.contains("patient-0042"),
        "an object name reached the log"
    );
    let needle = &data[1000..1016];
    assert!(!std::str::from_utf8(needle).is_ok_and(|s| log.contains(s)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_resumes_after_the_serving_node_is_killed() {
    let site = Site::new();
    let len = 96 << 20;
    let data = write_data(&site.path("storage/datasets/scans/big.bin"), len, 9);
    let mut node = Node::start(&site);
    let client = library_client(&site, &node.quic, libtransport::Path::Quic).await;
    let (killed, progress) = kill_at_a_third(&node);
    let opts = libtransport::FetchOptions {
        parallel: Some(2),
        retry: libtransport::RetryPolicy::none(),
        progress: Some(progress),
        max_rate: None,
        connections: None,
    };
    let dest = site.path("gpu/big.bin");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let dataset = DatasetName::new("scans").unwrap();
    let object = ObjectPath::new("big.bin").unwrap();
    let first = client.fetch_to_file(&dataset, &object, &dest, &opts).await;
    assert!(killed.load(Ordering::SeqCst), "the node was never killed");
    assert!(
        first.is_err(),
        "the pull finished although its node was killed"
    );
    assert!(!dest.exists(), "a partial object became visible");
    node.kill();

    // Restart the node and run the same pull again with the CLI.
    let node = Node::start(&site);
    let mut args = vec!["pull".to_owned()];
    args.extend(client_args(&site, &node));
    args.extend(["--json".into(), "scans/big.bin".into(), p(&dest).into()]);
    let out = tokio::task::spawn_blocking(move || {
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let report = &json(&out)["objects"][0]["report"];
    let chunks = report["chunks"].as_u64().unwrap();
    let reused = report["chunks_reused"].as_u64().unwrap();
    let fetched = report["fetched_bytes"].as_u64().unwrap();
    assert_eq!(chunks, 96, "1 MiB chunks");
    assert!(
        reused >= 30,
        "only {reused} chunks kept from the first attempt"
    );
    assert!(reused < chunks, "nothing was left to fetch");
    // Only the missing chunks crossed the network again.
    assert_eq!(fetched, (chunks - reused) << 20);
    assert_eq!(digest_file(&dest).unwrap(), Digest::of(&data));
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
}

fn client_args(site: &Site, node: &Node) -> Vec<String> {
    client(site, "loader", node, "quic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_resumes_after_the_receiving_node_is_killed() {
    let site = Site::new();
    let len = 96 << 20;
    let src = site.path("gpu/step-2000.ckpt");
    let data = write_data(&src, len, 11);
    let mut node = Node::start(&site);
    let lib = library_client(&site, &node.tcp, libtransport::Path::Tcp).await;
    let (killed, progress) = kill_at_a_third(&node);
    let opts = libtransport::PushOptions {
        parallel: Some(2),
        retry: libtransport::RetryPolicy::none(),
        progress: Some(progress),
        max_rate: None,
        connections: None,
    };
    let dataset = DatasetName::new("checkpoints").unwrap();
    let object = ObjectPath::new("run-1/step-2000.ckpt").unwrap();
    let first = lib.push_file(&dataset, &object, &src, &opts).await;
    assert!(killed.load(Ordering::SeqCst));
    assert!(
        first.is_err(),
        "the push committed although its node was killed"
    );
    let stored = site.path("storage/datasets/checkpoints/run-1/step-2000.ckpt");
    assert!(!stored.exists(), "a partial object became visible");
    node.kill();

    // Restart and push again with the CLI: only the missing chunks are sent.
    let node = Node::start(&site);
    let mut args = vec!["push".to_owned()];
    args.extend(client(&site, "loader", &node, "quic"));
    args.extend([
        "--json".into(),
        p(&src).into(),
        "checkpoints/run-1/step-2000.ckpt".into(),
    ]);
    let out = tokio::task::spawn_blocking(move || {
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let report = &json(&out)["objects"][0]["report"];
    let chunks = report["chunks"].as_u64().unwrap();
    let skipped = report["chunks_skipped"].as_u64().unwrap();
    assert_eq!(chunks, 24, "4 MiB chunks");
    assert!(skipped >= 8, "only {skipped} chunks kept by the node");
    assert!(skipped < chunks);
    assert_eq!(
        report["sent_bytes"].as_u64().unwrap(),
        (chunks - skipped) << 22
    );
    assert_eq!(digest_file(&stored).unwrap(), Digest::of(&data));
    // The temporary file is gone once committed.
    let dir = stored.parent().unwrap();
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn pulls_by_soft_rdma_between_processes_and_falls_back_to_quic_without_a_device() {
    let site = Site::new();
    let config = std::fs::read_to_string(site.config()).unwrap() + "\n[rdma]\nmode = \"soft\"\n";
    std::fs::write(site.config(), config).unwrap();
    let data = write_data(
        &site.path("storage/datasets/scans/ward-7/ct-0042.bin"),
        (9 << 20) + 5,
        11,
    );
    let node = Node::start(&site);
    let pull = |rdma: &str, dest: &Path, log: &str| {
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "loader", &node, "quic"));
        args.extend([
            "--json".into(),
            "--rdma".into(),
            rdma.into(),
            "scans/ward-7/ct-0042.bin".into(),
            p(dest).into(),
        ]);
        common::bin()
            .args(&args)
            .env("TRANSPORTD_LOG", log)
            .output()
            .unwrap()
    };

    // The node and this client are two processes; the chunks cross the soft device sealed.
    let dest = site.path("gpu/rdma.bin");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let out = pull("soft", &dest, "warn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    assert_eq!(report["objects"][0]["report"]["path"], "rdma");
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "the RDMA pull differs"
    );

    // Asked for RDMA on a machine without a device: QUIC, and the reason said once.
    let dest = site.path("gpu/auto.bin");
    let out = pull("auto", &dest, "info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["objects"][0]["report"]["path"], "quic");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("no RDMA device: using QUIC").count(),
        1,
        "{stderr}"
    );
    assert!(std::fs::read(&dest).unwrap() == data);
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib << 10
}

/// Starts counting the peak from what is resident now.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// Whether this test has its process to itself (nextest runs each test in its own); if not,
/// runs it again alone in a new process of this binary and says so (the caller then
/// returns): a memory measure of the process must not count other tests.
fn alone_in_process(name: &str) -> bool {
    let per_test = std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test");
    if per_test || std::env::var_os("TRANSPORTD_TEST_ALONE").is_some() {
        return true;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("TRANSPORTD_TEST_ALONE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{name} failed in its own process");
    false
}

#[test]
fn a_pull_into_the_callers_memory_allocates_nothing_of_the_objects_size() {
    if !alone_in_process("a_pull_into_the_callers_memory_allocates_nothing_of_the_objects_size") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let site = Site::new();
        let len = 256 << 20;
        let root = {
            let data = write_data(&site.path("storage/datasets/scans/shard.bin"), len, 13);
            blake3::hash(&data)
        };
        let node = Node::start(&site);
        let client = library_client(&site, &node.quic, libtransport::Path::Quic).await;
        let dataset = DatasetName::new("scans").unwrap();
        let object = ObjectPath::new("shard.bin").unwrap();
        let opts = libtransport::FetchOptions::default();
        // A first pull warms the connection (windows, buffers) and the node's manifest.
        client.stat(&dataset, &object).await.unwrap();

        // The caller's buffer, resident before the measure starts.
        let mut buf = vec![1u8; len];
        reset_peak_rss();
        let before = peak_rss();
        let report = client
            .fetch_into(&dataset, &object, &mut buf, &opts)
            .await
            .unwrap();
        let grew = peak_rss().saturating_sub(before);
        assert_eq!(report.size, len as u64);
        assert_eq!(blake3::hash(&buf), root, "the buffer holds the object");
        assert!(
            grew <= 32 << 20,
            "a 256 MiB pull into the caller's buffer raised the peak RSS by {} MiB",
            grew >> 20
        );

        // Control: a pull into memory of the library's own shows up in the same measure.
        drop(buf);
        reset_peak_rss();
        let before = peak_rss();
        let owned = client
            .fetch(&dataset, &object, len as u64, &opts)
            .await
            .unwrap();
        let grew_owned = peak_rss().saturating_sub(before);
        eprintln!(
            "peak RSS growth: {} KiB into the caller's buffer, {} KiB into the library's",
            grew >> 10,
            grew_owned >> 10
        );
        assert_eq!(blake3::hash(&owned), root);
        assert!(
            grew_owned >= 240 << 20,
            "the measure missed a 256 MiB allocation (peak grew {} MiB)",
            grew_owned >> 20
        );

        // A buffer too small for the object is refused before anything moves.
        let mut small = vec![0u8; len - 1];
        let e = client
            .fetch_into(&dataset, &object, &mut small, &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(e, libtransport::FetchError::TooLarge { size, limit } if size == len as u64 && limit == len as u64 - 1),
            "{e}"
        );
    });
}

/// Kills a paced client command once `at_least` chunks landed (see
/// [`common::kill_once_landed`]), then flips one bit in the first intact chunk. Returns the
/// chunks still intact (the flipped one excluded).
fn kill_mid_transfer_and_flip_a_bit(
    cmd: std::process::Command,
    find: impl Fn() -> Option<std::path::PathBuf>,
    data: &[u8],
    chunk: usize,
    at_least: usize,
) -> usize {
    let file = common::kill_once_landed(cmd, &find, data, chunk, at_least, false);
    let intact = intact_chunks(&file, data, chunk);
    let victim = intact[0];
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[victim * chunk + chunk / 2] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();
    assert_eq!(intact_chunks(&file, data, chunk).len(), intact.len() - 1);
    intact.len() - 1
}

/// A client killed mid-transfer leaves a partial file (its own for a pull, the node's for
/// a push); one bit of a chunk it had verified flips on disk before the transfer is run
/// again. The resume re-hashes what is on disk, so that chunk crosses the network again and
/// the result is byte-identical; every other intact chunk is kept.
#[test]
fn a_bit_flipped_in_a_partial_file_is_not_trusted_by_the_resume() {
    let site = Site::new();
    let data = write_data(&site.path("storage/datasets/scans/big.bin"), 16 << 20, 21);
    let node = Node::start(&site);

    // Pull side: the client's `.NAME.transportd-partial`, 1 MiB chunks.
    let gpu = site.path("gpu");
    std::fs::create_dir_all(&gpu).unwrap();
    let dest = gpu.join("big.bin");
    let pull = || {
        let mut c = common::bin();
        c.arg("pull")
            .args(client(&site, "loader", &node, "tcp"))
            .args(["--json", "scans/big.bin", p(&dest)]);
        c
    };
    let partial = gpu.join(".big.bin.transportd-partial");
    let kept =
        kill_mid_transfer_and_flip_a_bit(pull(), || Some(partial.clone()), &data, 1 << 20, 4);
    let out = pull().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    assert_eq!(r["verified"], true, "{r}");
    let report = &r["objects"][0]["report"];
    assert_eq!(report["chunks"], 16, "{report}");
    assert_eq!(report["chunks_reused"], kept as u64, "{report}");
    assert_eq!(digest_file(&dest).unwrap(), Digest::of(&data));

    // Push side: the node's `.transportd-partial-*`, 4 MiB chunks.
    let src = gpu.join("step-1.ckpt");
    let data = write_data(&src, 32 << 20, 22);
    let push = || {
        let mut c = common::bin();
        c.arg("push")
            .args(client(&site, "loader", &node, "tcp"))
            .args(["--json", p(&src), "checkpoints/run/step-1.ckpt"]);
        c
    };
    let dir = site.path("storage/datasets/checkpoints/run");
    let kept = kill_mid_transfer_and_flip_a_bit(
        push(),
        || partial_in(&dir, ".transportd-partial-"),
        &data,
        4 << 20,
        2,
    );
    let stored = dir.join("step-1.ckpt");
    assert!(!stored.exists(), "a partial object became visible");
    let out = push().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = &json(&out)["objects"][0]["report"];
    assert_eq!(report["chunks"], 8, "{report}");
    assert_eq!(report["chunks_skipped"], kept as u64, "{report}");
    assert_eq!(digest_file(&stored).unwrap(), Digest::of(&data));
}

/// `transportd` run with its wall clock moved by `offset` (libfaketime's `[+-]N[smhd]`,
/// preloaded: the `faketime` wrapper would stand between the test and the process it
/// kills); monotonic time is left alone.
fn skewed(offset: &str) -> std::process::Command {
    let lib = std::fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|l| l.exists())
        .expect("libfaketime (Debian package faketime; scripts/test.sh installs it)");
    let mut c = common::bin();
    c.env("LD_PRELOAD", lib)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c
}

/// Clock skew between nodes (libfaketime moves one process's wall clock). A client or a
/// node whose clock is four minutes off either way still works: SVIDs start a tenth of
/// their lifetime before issuance (5 minutes for the default hour). One whose clock is
/// two days off is refused with an error that names the clock, on the side that notices.
#[test]
fn minutes_of_clock_skew_still_work_and_days_get_an_error_naming_the_clock() {
    let site = Site::new();
    let data = write_data(&site.path("storage/datasets/scans/a.bin"), 100_000, 41);
    let dest = site.path("a.bin");
    let pull = |mut c: std::process::Command, node: &Node, path: &str| {
        let _ = std::fs::remove_file(&dest);
        c.arg("pull")
            .args(client(&site, "loader", node, path))
            .args(["--retries", "0", "scans/a.bin", p(&dest)])
            .output()
            .unwrap()
    };
    let works = |out: std::process::Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&dest).unwrap(), data, "{what}");
    };
    let refused = |out: std::process::Output, what: &str, says: &str| {
        assert_eq!(out.status.code(), Some(77), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says) && err.contains("clock"), "{what}: {err}");
    };

    // The client's clock is off; the node's is right.
    let node = Node::start(&site);
    for path in ["quic", "tcp"] {
        for off in ["-4m", "+4m"] {
            works(
                pull(skewed(off), &node, path),
                &format!("client {off} {path}"),
            );
        }
        refused(
            pull(skewed("-2d"), &node, path),
            &format!("client -2d {path}"),
            "is not valid until",
        );
        refused(
            pull(skewed("+2d"), &node, path),
            &format!("client +2d {path}"),
            "expired at",
        );
    }
    drop(node);

    // The node's clock is off; the client's is right.
    let node = Node::start_with(&site, skewed("-4m"));
    works(pull(common::bin(), &node, "quic"), "node -4m");
    drop(node);
    let node = Node::start_with(&site, skewed("+2d"));
    refused(
        pull(common::bin(), &node, "quic"),
        "node +2d",
        "by the server's clock",
    );
}

/// `--idle-timeout` below the node's own minimum (5 s) is refused before connecting.
#[test]
fn an_idle_timeout_below_five_seconds_is_refused() {
    let site = Site::new();
    let out = run(&[
        "pull",
        "--node",
        "127.0.0.1:9",
        "--identity",
        p(&site.path("loader")),
        "--idle-timeout",
        "4s",
        "scans/a.bin",
        p(&site.path("a.bin")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--idle-timeout must be at least 5s"), "{err}");
}

/// The evidence report of a known trail (written by the library's `FileSink`), opened in
/// headless chromium: the page renders, its tables hold the trail's accesses, refusal and
/// identity events, and the trail shows as verified; with one byte of a record changed,
/// the page marks the trail FAILED with the record, and the command exits 65.
#[test]
fn audit_report_renders_in_headless_chromium_and_marks_a_tampered_trail_failed() {
    let Some(chromium) = chromium() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let trail = tmp.path().join("audit");
    let pki = certs::test_util::TestPki::new("hospital.example");
    libtransport::test_util::sample_trail(&trail, &pki);
    let page = tmp.path().join("report.html");
    ok(&["audit", "report", p(&trail), "--out", p(&page)]);

    let dom = render(&chromium, &page, tmp.path());
    let verification = table_rows(&dom, "verification");
    assert_eq!(verification.len(), 1, "{verification:?}");
    assert_eq!(verification[0][0], "spiffe://hospital.example/node/storage");
    assert_eq!(verification[0][2], "verified");
    assert!(dom.contains("All trails VERIFIED"));
    let accesses = table_rows(&dom, "accesses");
    let access = |who: &str| {
        accesses
            .iter()
            .find(|r| r[0] == format!("spiffe://hospital.example/{who}"))
            .unwrap_or_else(|| panic!("no access row for {who}: {accesses:?}"))[1..6]
            .to_vec()
    };
    assert_eq!(access("gpu/0"), ["ct-head", "phi", "read", "2", "0"]);
    assert_eq!(access("gpu/1"), ["imagenet", "public", "list", "1", "0"]);
    assert_eq!(access("intruder"), ["ct-head", "phi", "read", "0", "1"]);
    let refusals = table_rows(&dom, "refusals");
    assert!(
        refusals
            .iter()
            .any(|r| r[3] == "spiffe://hospital.example/intruder"
                && r[4] == "read ct-head"
                && r[5] == "no rule allows it"),
        "{refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .any(|r| r[3] == "192.0.2.9:5000" && r[5].contains("peer sent no certificates")),
        "{refusals:?}"
    );
    let identity: Vec<(String, String)> = table_rows(&dom, "identity")
        .into_iter()
        .map(|r| (r[2].clone(), r[3].clone()))
        .collect();
    let td = "spiffe://hospital.example";
    assert_eq!(
        identity,
        [
            ("loaded".into(), format!("{td}/node/storage")),
            ("issued".into(), format!("{td}/gpu/2")),
            ("rotated".into(), format!("{td}/node/storage")),
            ("banned".into(), format!("{td}/node/bad")),
        ]
    );
    let policy = table_rows(&dom, "policy");
    assert_eq!(policy.len(), 2);
    assert!(
        policy[1][5].contains("+ deny \"no one reads ct-secret\""),
        "{policy:?}"
    );
    let transfers = table_rows(&dom, "transfers");
    assert_eq!(transfers[0][..3], ["quic", "out", "1"]);
    assert!(dom.contains("<svg id=\"timeline\"") && dom.contains("<svg id=\"bytes\""));
    // Object names stay out of the page.
    assert!(!dom.contains("train/a.bin"));

    // One byte of the denial's record: "intruder" becomes "intrudes".
    let segment = trail.join("audit-000001.jsonl");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes
        .windows(9)
        .position(|w| w == b"/intruder")
        .expect("the denial's record");
    bytes[at + 8] = b's';
    std::fs::write(&segment, bytes).unwrap();
    let out = run(&["audit", "report", p(&trail), "--out", p(&page)]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let dom = render(&chromium, &page, tmp.path());
    let verification = table_rows(&dom, "verification");
    assert_eq!(verification[0][2], "FAILED", "{verification:?}");
    assert!(
        verification[0][3].contains("this record was changed"),
        "{verification:?}"
    );
    assert!(dom.contains("Verification FAILED for 1 of 1 trails"));
    // The rest still renders: the accesses are there, marked as not to be trusted.
    assert_eq!(table_rows(&dom, "accesses").len(), 3);
}

/// The same known trail as JSON (the report's data) and CSV (access rows).
#[test]
fn audit_report_as_json_and_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let trail = tmp.path().join("audit");
    let pki = certs::test_util::TestPki::new("hospital.example");
    libtransport::test_util::sample_trail(&trail, &pki);

    let r = json(&ok(&["audit", "report", p(&trail), "--format", "json"]));
    assert_eq!(r["all_verified"], true);
    assert_eq!(r["nodes"][0]["verified"], true);
    assert_eq!(r["nodes"][0]["witness"]["status"], "not_checked");
    assert_eq!(r["accesses"].as_array().unwrap().len(), 3);
    assert_eq!(r["refusals"][0]["reason"], "no rule allows it");
    assert_eq!(r["identity_events"][3]["kind"], "banned");
    assert_eq!(r["transfers"][1]["bytes"], 500);

    // --class and --from narrow it (the trail starts 2026-11-20T10:01:00Z, a record a
    // minute).
    let r = json(&ok(&[
        "audit",
        "report",
        p(&trail),
        "--format",
        "json",
        "--class",
        "phi",
        "--from",
        "2026-11-20T10:05:30Z",
    ]));
    let accesses = r["accesses"].as_array().unwrap();
    assert_eq!(accesses.len(), 1, "{accesses:?}");
    assert_eq!(
        accesses[0]["identity"],
        "spiffe://hospital.example/intruder"
    );
    assert_eq!(r["transfers"].as_array().unwrap().len(), 0);

    let csv_file = tmp.path().join("accesses.csv");
    ok(&[
        "audit",
        "report",
        p(&trail),
        "--format",
        "csv",
        "--out",
        p(&csv_file),
    ]);
    let csv = std::fs::read_to_string(&csv_file).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "identity,dataset,class,action,allowed,denied,first,last,nodes"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[1].starts_with("spiffe://hospital.example/gpu/0,ct-head,phi,read,2,0,"));
    assert!(lines[3].starts_with("spiffe://hospital.example/intruder,ct-head,phi,read,0,1,"));
}

/// Debian's chromium, if installed. Under CI (`CI` set) its absence fails the test;
/// elsewhere the test is skipped with a notice.
fn chromium() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
            .find(|c| c.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed: the audit report's browser test needs it \
             (apt-get install chromium; scripts/test.sh installs it as root)"
        );
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// The DOM of `page` as headless chromium renders it, with a time limit.
fn render(chromium: &Path, page: &Path, tmp: &Path) -> String {
    let dump = tmp.join("dom.html");
    let mut child = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!(
            "--user-data-dir={}",
            tmp.join("chromium").display()
        ))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&dump).unwrap())
        .stderr(std::fs::File::create(tmp.join("chromium.log")).unwrap())
        .spawn()
        .expect("starting chromium");
    let mut status = None;
    let limit = Duration::from_secs(60);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("chromium to render the report", limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        })
    }));
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "chromium did not finish within {limit:?}: {}",
            std::fs::read_to_string(tmp.join("chromium.log")).unwrap_or_default()
        );
    }
    let dom = std::fs::read_to_string(&dump).unwrap();
    assert!(
        status.is_some_and(|s| s.success()) && dom.contains("</html>"),
        "chromium failed ({status:?}): {}",
        std::fs::read_to_string(tmp.join("chromium.log")).unwrap_or_default()
    );
    dom
}

/// The body rows of the table with `id` in a rendered DOM, as cell texts.
fn table_rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id} in the page"));
    let table = &dom[start..];
    let table = &table[..table.find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let cell = &cell[cell.find('>').unwrap() + 1..];
                    let cell = cell.split("</td>").next().unwrap();
                    unescape(&strip_tags(cell))
                })
                .collect()
        })
        .collect()
}

fn strip_tags(s: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}
