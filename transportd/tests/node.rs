//! A real node's policy, audit trail and telemetry: policy commands, reload on change and
//! on SIGHUP (a bad policy refused, the old one kept), `audit verify` catching tampering,
//! the admin endpoint, no canary in any log, and a full audit disk stopping new transfers
//! until space returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::time::Duration;

use serde_json::Value;

mod common;

use common::{NODE_TOML, Node, Site, bin, client, json, ok, p, run, write_data};

const POLICY: &str = r#"
[[dataset]]
name = "scans"
class = "phi"

[[rule]]
name = "loader reads scans"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["scans"]
actions = ["list", "read"]
"#;

/// The node of `Site`, with its access from `policy.toml` instead of `[[allow]]` rules.
fn site_with_policy_file() -> Site {
    let site = Site::new();
    let toml = NODE_TOML.split("[[allow]]").next().unwrap().to_owned()
        + "[policy]\nfile = \"policy.toml\"\n\n[limits]\nchunk_size = \"1MiB\"\n";
    std::fs::write(site.config(), toml).unwrap();
    std::fs::write(site.path("storage/policy.toml"), POLICY).unwrap();
    site
}

fn ls(site: &Site, who: &str, node: &Node) -> Value {
    let mut args = vec!["ls".to_owned()];
    args.extend(client(site, who, node, "tcp"));
    args.push("--json".into());
    json(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..150 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after 15 s waiting for {what}");
}

fn trail(site: &Site) -> Vec<Value> {
    libtransport::audit::query(&site.path("storage/audit"), &Default::default()).unwrap()
}

#[test]
fn policy_commands_check_explain_and_name_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let example = ok(&["policy", "example"]);
    std::fs::write(&file, &example.stdout).unwrap();
    let out = ok(&["policy", "check", p(&file)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 rules"));

    // A PHI dataset read by a loader outside the PHI path: allowed by one rule, denied by
    // the class rule, and the explanation says so with lines.
    let out = ok(&[
        "policy",
        "explain",
        "--policy",
        p(&file),
        "--peer",
        "spiffe://hospital.example/gpu/loader-1",
        "--dataset",
        "ct-head",
        "--object",
        "train/1.dcm",
        "--action",
        "read",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("class phi"), "{text}");
    assert!(
        text.contains("DENY by rule \"PHI stays with the PHI workloads\""),
        "{text}"
    );
    assert!(
        text.contains("allow \"GPU loaders list and read training data\" (line "),
        "{text}"
    );
    assert!(text.contains("<- decided"), "{text}");
    let out = ok(&[
        "policy",
        "explain",
        "--policy",
        p(&file),
        "--peer",
        "spiffe://hospital.example/gpu/phi/loader-2",
        "--dataset",
        "ct-head",
        "--object",
        "train/1.dcm",
        "--action",
        "read",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["decision"]["decision"], "allow");
    assert_eq!(v["deciding"], "GPU loaders list and read training data");
    let out = ok(&[
        "policy",
        "explain",
        "--policy",
        p(&file),
        "--peer",
        "spiffe://hospital.example/cpu/x",
        "--dataset",
        "imagenet",
        "--action",
        "list",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("default deny"));

    // Errors name the line and exit 78.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nname = \"x\"\nsubjects = [\"*\"]\ndatasets = [\"d\"]\nactions = [\"erase\"]\n",
    )
    .unwrap();
    let out = run(&["policy", "check", p(&bad)]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("erase"), "{err}");
}

#[test]
fn a_node_reloads_its_policy_on_change_and_keeps_the_old_one_when_the_new_is_bad() {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 1000, 1);
    let mut node = Node::start(&site);
    assert_eq!(
        ls(&site, "loader", &node)["datasets"],
        serde_json::json!(["scans"])
    );

    // The file changes: the node picks it up by itself.
    let narrower = POLICY.replace(
        "spiffe://hospital.example/gpu/*",
        "spiffe://hospital.example/gpu/trainer",
    );
    std::fs::write(site.path("storage/policy.toml"), &narrower).unwrap();
    wait_until("the narrower policy", || {
        ls(&site, "loader", &node)["datasets"] == serde_json::json!([])
    });

    // A broken policy is refused with its line, audited, and the narrower one stays.
    std::fs::write(
        site.path("storage/policy.toml"),
        "[[rule]]\nname = \"x\"\nsubjects = \"*\"\n",
    )
    .unwrap();
    wait_until("the refusal in the audit trail", || {
        trail(&site).iter().any(|r| {
            r["event"] == "policy_refused"
                && r["reason"].as_str().is_some_and(|s| s.contains("line 3"))
        })
    });
    assert_eq!(
        ls(&site, "loader", &node)["datasets"],
        serde_json::json!([])
    );

    // SIGHUP re-reads it too.
    std::fs::write(site.path("storage/policy.toml"), POLICY).unwrap();
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    wait_until("the restored policy", || {
        ls(&site, "loader", &node)["datasets"] == serde_json::json!(["scans"])
    });
    let loads = trail(&site)
        .iter()
        .filter(|r| r["event"] == "policy_loaded")
        .count();
    assert!(loads >= 3, "{loads} policy loads audited");
    node.stop();
}

#[test]
fn audit_verify_accepts_a_clean_trail_and_names_a_tampered_record() {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 100_000, 1);
    let mut node = Node::start(&site);
    for path in ["quic", "tcp"] {
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "loader", &node, path));
        args.extend([
            "scans/a.bin".into(),
            p(&site.path(&format!("a-{path}.bin"))).into(),
        ]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    node.stop();
    let dir = site.path("storage/audit");
    let bundle = site.path("ca/bundle.pem");
    let out = ok(&["audit", "verify", p(&dir), "--bundle", p(&bundle)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("verified") && text.contains("signers checked"),
        "{text}"
    );
    let v = json(&ok(&["audit", "verify", p(&dir), "--json"]));
    assert_eq!(v["report"]["unsealed"], 0, "a clean stop seals the trail");

    // Someone edits the bytes of a transfer record.
    let seg = dir.join("audit-000001.jsonl");
    let text = std::fs::read_to_string(&seg).unwrap();
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"event\":\"transfer\""))
        .unwrap();
    let seq = serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap();
    std::fs::write(
        &seg,
        text.replacen("\"bytes\":100000", "\"bytes\":100001", 1),
    )
    .unwrap();
    let out = run(&["audit", "verify", p(&dir)]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "audit-000001.jsonl line {} (seq {seq})",
            index + 1
        )),
        "{err}"
    );

    // Queries filter by peer and event, as JSON.
    std::fs::write(&seg, &text).unwrap();
    let out = ok(&[
        "audit",
        "query",
        p(&dir),
        "--peer",
        "spiffe://hospital.example/gpu/",
        "--event",
        "transfer",
        "--json",
    ]);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|r| r["object"] == "a.bin" && r["outcome"] == "complete")
    );
}

#[test]
fn a_node_restarted_on_a_cut_trail_records_the_break_and_keeps_reporting_it() {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 50_000, 1);
    let mut node = Node::start(&site);
    for _ in 0..3 {
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "loader", &node, "tcp"));
        args.extend(["scans/a.bin".into(), p(&site.path("a.bin")).into()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    node.stop();
    let dir = site.path("storage/audit");
    ok(&["audit", "verify", p(&dir)]);
    // Someone removes the last eight records, then the node starts again.
    let seg = dir.join("audit-000001.jsonl");
    let text = std::fs::read_to_string(&seg).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines.len() - 8;
    std::fs::write(&seg, format!("{}\n", lines[..kept].join("\n"))).unwrap();
    for start in 0..4 {
        let mut node = Node::start(&site);
        let (status, body) = node.admin_get("/readyz");
        assert_eq!(status, 200, "start {start}: {body}");
        assert!(
            body.contains("audit trail: 1 break(s) on record"),
            "start {start}: {body}"
        );
        // Only the first start finds it; later ones carry it on.
        assert_eq!(
            body.contains("found broken at this start: cut"),
            start == 0,
            "start {start}: {body}"
        );
        let (_, metrics) = node.admin_get("/metrics");
        assert!(
            metrics.contains("\ntransportd_audit_trail_breaks 1\n"),
            "start {start}: {metrics}"
        );
        node.stop();
        let out = run(&["audit", "verify", p(&dir)]);
        assert_eq!(out.status.code(), Some(65), "start {start}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("broken when it opened it (cut)"),
            "start {start}: {err}"
        );
    }
}

#[test]
fn the_admin_endpoint_reports_health_and_counters_that_move() {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 50_000, 1);
    let node = Node::start(&site);
    assert!(
        node.admin.starts_with("127.0.0.1:"),
        "admin on loopback: {}",
        node.admin
    );
    assert_eq!(node.admin_get("/healthz").0, 200);
    assert_eq!(node.admin_get("/readyz"), (200, "ready\n".into()));
    assert_eq!(node.admin_get("/nope").0, 404);
    let (_, before) = node.admin_get("/metrics");
    assert!(!before.contains("transportd_bytes_total{"));
    assert!(
        before.contains("\ntransportd_audit_trail_breaks 0\n"),
        "{before}"
    );
    let mut args = vec!["pull".to_owned()];
    args.extend(client(&site, "loader", &node, "quic"));
    args.extend(["scans/a.bin".into(), p(&site.path("a.bin")).into()]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = vec!["pull".to_owned()];
    args.extend(client(&site, "intruder", &node, "quic"));
    args.extend([
        "--retries".into(),
        "0".into(),
        "checkpoints/x".into(),
        p(&site.path("x")).into(),
    ]);
    assert_eq!(
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .code(),
        Some(66)
    );
    let (status, text) = node.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"transportd_bytes_total{path="quic",direction="out"} 50000"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"transportd_authorization_denials_total{action="read",reason="no_rule"} 1"#
        ),
        "{text}"
    );
    let expiry: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("transportd_svid_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > 3000.0 && expiry <= 3600.0, "{expiry}");
}

#[test]
fn a_canary_in_object_names_and_contents_reaches_no_log_line() {
    const CANARY: &str = "PHI-CANARY-7731-JANE-DOE";
    let site = site_with_policy_file();
    let name = format!("{CANARY}.bin");
    let mut content = CANARY.repeat(20_000).into_bytes();
    content.extend(write_data(&site.path("tmp.bin"), 1000, 3));
    std::fs::write(
        site.path(&format!("storage/datasets/scans/{name}")),
        &content,
    )
    .unwrap();
    let node = Node::start(&site);
    let mut client_logs = String::new();
    for path in ["quic", "tcp"] {
        for (cmd, target) in [
            ("ls", "scans".to_owned()),
            ("pull", format!("scans/{name}")),
        ] {
            let mut args = vec![cmd.to_owned()];
            args.extend(client(&site, "loader", &node, path));
            args.push(target);
            if cmd == "pull" {
                args.push(p(&site.path(&format!("out-{path}.bin"))).into());
            }
            let out = bin()
                .args(&args)
                .env("TRANSPORTD_LOG", "trace")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            client_logs.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        assert_eq!(
            std::fs::read(site.path(&format!("out-{path}.bin"))).unwrap(),
            content
        );
    }
    let node_log = std::fs::read_to_string(&node.log).unwrap();
    assert!(
        node_log.contains("transfer ended"),
        "the check read a log with no transfers in it"
    );
    assert!(
        !node_log.contains("CANARY"),
        "the canary reached the node's log"
    );
    assert!(
        !client_logs.contains("CANARY"),
        "the canary reached the client's log"
    );
    // The control: the audit trail, which is protected, does name the object.
    assert!(
        trail(&site)
            .iter()
            .any(|r| r["object"].as_str() == Some(name.as_str()))
    );
}

#[test]
#[ignore = "needs root (mount namespaces): run with --ignored"]
fn a_full_audit_disk_stops_new_transfers_until_space_returns() {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 10_000, 1);
    let audit_dir = site.path("storage/audit");
    std::fs::create_dir_all(&audit_dir).unwrap();
    // The node runs in its own mount namespace with a 1 MiB tmpfs as its audit directory.
    let mut wrapper = std::process::Command::new("unshare");
    wrapper.args(["--mount", "--propagation", "private", "sh", "-c"]);
    wrapper.arg("mount -t tmpfs -o size=1m,mode=0700 transportd-audit \"$0\" && exec \"$@\"");
    wrapper
        .arg(&audit_dir)
        .arg(env!("CARGO_BIN_EXE_transportd"))
        .stdin(std::process::Stdio::null());
    let node = Node::start_with(&site, wrapper);
    // Its view of the directory, through its own mount namespace.
    let inside = std::path::PathBuf::from(format!(
        "/proc/{}/root{}",
        node.child.id(),
        audit_dir.display()
    ));
    assert!(
        inside.join("checkpoint.json").exists(),
        "the node's trail is not on the tmpfs"
    );
    assert!(
        !audit_dir.join("checkpoint.json").exists(),
        "the tmpfs is visible outside the namespace"
    );

    let pull = |dest: &str| {
        let mut args = vec!["pull".to_owned()];
        args.extend(client(&site, "loader", &node, "tcp"));
        args.extend([
            "--retries".into(),
            "0".into(),
            "scans/a.bin".into(),
            p(&site.path(dest)).into(),
        ]);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(pull("before.bin").status.success());

    // Fill the disk.
    let filler = inside.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 << 10];
    loop {
        if let Err(e) = std::io::Write::write_all(&mut f, &block) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            break;
        }
    }
    drop(f);
    let out = pull("during.bin");
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("audit trail cannot be written"));
    assert!(!site.path("during.bin").exists());
    wait_until("/readyz to report the audit trail", || {
        node.admin_get("/readyz").0 == 503
    });
    assert!(node.admin_get("/readyz").1.contains("audit trail"));

    // Space returns: no restart, and transfers are accepted again.
    std::fs::remove_file(&filler).unwrap();
    wait_until("/readyz to recover", || node.admin_get("/readyz").0 == 200);
    let out = pull("after.bin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, metrics) = node.admin_get("/metrics");
    let errors: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("transportd_audit_write_errors_total ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no transportd_audit_write_errors_total in {metrics}"));
    assert!(errors >= 1.0, "{metrics}");
}

#[test]
fn logs_into_a_file_carry_no_colour_codes_unless_asked() {
    let site = site_with_policy_file();
    // Default: stderr is a file here, so plain text.
    let mut node = Node::start_with(&site, bin());
    ls(&site, "loader", &node);
    node.stop();
    let plain = std::fs::read_to_string(&node.log).unwrap();
    assert!(plain.contains("connection accepted"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "escape codes in a log file: {plain:?}"
    );
    // The control: asked for colour, the same log does carry escape codes, so the check
    // above can fail.
    let mut cmd = bin();
    cmd.env("TRANSPORTD_LOG_COLOR", "always");
    let mut node = Node::start_with(&site, cmd);
    ls(&site, "loader", &node);
    node.stop();
    let coloured = std::fs::read_to_string(&node.log).unwrap();
    assert!(coloured.contains("\x1b["), "{coloured}");
    // A bad value is a configuration error that says what is allowed.
    let out = bin()
        .env("TRANSPORTD_LOG_COLOR", "sometimes")
        .args(["config", "check", p(&site.config())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected auto, always or never"));
}

#[test]
fn logs_come_as_json_lines_when_asked_and_a_bad_format_is_refused() {
    let site = site_with_policy_file();
    let mut cmd = bin();
    cmd.env("TRANSPORTD_LOG_FORMAT", "json");
    let mut node = Node::start_with(&site, cmd);
    ls(&site, "loader", &node);
    node.stop();
    let log = std::fs::read_to_string(&node.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "connection accepted"
            && l["peer.id"] == "spiffe://hospital.example/gpu/loader"),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    let out = bin()
        .env("TRANSPORTD_LOG_FORMAT", "xml")
        .args(["config", "check", p(&site.config())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected plain or json"));
}
