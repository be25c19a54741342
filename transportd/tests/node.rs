//! A real node's policy, audit trail and telemetry: policy commands, reload on change and
//! on SIGHUP (a bad policy refused, the old one kept), `audit verify` catching tampering,
//! the admin endpoint, no canary in any log, a full audit disk stopping new transfers
//! until space returns, partial files of pushes held to a quota and an age (every removal
//! audited), a push into a full data disk, and what probes and systemd see: `transportd
//! health` and the `sd_notify` messages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::path::PathBuf;
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
    // The node records the load just after the policy takes effect.
    wait_until("three policy loads audited", || {
        trail(&site)
            .iter()
            .filter(|r| r["event"] == "policy_loaded")
            .count()
            >= 3
    });
    // Listing the dataset is decided with its class, as the policy declares it.
    let mut args = vec!["ls".to_owned()];
    args.extend(client(&site, "loader", &node, "tcp"));
    args.push("scans".into());
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    node.stop();
    assert!(
        trail(&site).iter().any(|r| r["event"] == "authorization"
            && r["dataset"] == "scans"
            && r["class"] == "phi"),
        "no authorization of scans with its class"
    );

    // The loads hold the policy's lines: the report shows what each changed.
    let report = json(&ok(&[
        "audit",
        "report",
        p(&site.path("storage/audit")),
        "--format",
        "json",
    ]));
    let changes = report["policy_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3, "{changes:?}");
    let line = |who: &str| {
        format!(
            "allow \"loader reads scans\": subjects spiffe://hospital.example/{who}; datasets scans; actions list, read"
        )
    };
    assert_eq!(
        changes[1]["diff"],
        serde_json::json!([
            format!("- {}", line("gpu/*")),
            format!("+ {}", line("gpu/trainer"))
        ])
    );
    assert_eq!(
        changes[2]["diff"],
        serde_json::json!([
            format!("- {}", line("gpu/trainer")),
            format!("+ {}", line("gpu/*"))
        ])
    );
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

/// `transportd health` against one node's admin endpoint: `(exit code, stdout, stderr)`.
fn health(args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["health", "--timeout", "5s"];
    all.extend_from_slice(args);
    let out = run(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The next `sd_notify` datagram, or panics after 15 s.
fn notified(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a message on NOTIFY_SOCKET within 15 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A node under a service manager (`NOTIFY_SOCKET` is a datagram socket this test binds)
/// says READY=1 once it serves, RELOADING=1 and READY=1 around a SIGHUP reload, and
/// STOPPING=1 on SIGTERM; `health` says 0 while it serves and 69 once it is gone (and for
/// a port nothing listens on), and a configuration with the admin endpoint off is a
/// configuration error (78).
#[test]
fn a_node_tells_systemd_and_health_how_it_stands() {
    let site = Site::new();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut cmd = bin();
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let mut node = Node::start_with(&site, cmd);
    let ready = notified(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains("STATUS=serving as spiffe://hospital.example/node/storage"),
        "{ready}"
    );

    let (code, stdout, stderr) = health(&["--admin", &node.admin]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "ready\n");

    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let reloading = notified(&socket);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let again = notified(&socket);
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");

    let admin = node.admin.clone();
    node.stop();
    let stopping = notified(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");

    let (code, _, stderr) = health(&["--admin", &admin]);
    assert_eq!(code, Some(69), "a stopped node: {stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let off = std::fs::read_to_string(site.config())
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"off\"");
    std::fs::write(site.config(), off).unwrap();
    let (code, _, stderr) = health(&["--config", p(&site.config())]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("admin.listen"), "{stderr}");
    assert_eq!(run(&["health"]).status.code(), Some(64));
}

/// A node that serves but is not ready: its SVID (3 s) expired. `health`, given the node's
/// own configuration file, exits 75 with `/readyz`'s reason on one line of stderr.
#[test]
fn health_exits_75_with_the_reason_when_the_node_is_not_ready() {
    let site = Site::new();
    // A fixed admin port, so that `--config` finds the node: one free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = std::fs::read_to_string(site.config()).unwrap().replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"0.0.0.0:{port}\""),
    );
    std::fs::write(site.config(), toml).unwrap();
    let identity = site.path("storage/identity");
    ok(&[
        "ca",
        "issue",
        "--ca",
        p(&site.path("ca")),
        "--id",
        "spiffe://hospital.example/node/storage",
        "--csr",
        p(&identity.join("svid.csr")),
        "--out",
        p(&identity),
        "--ttl",
        "3s",
    ]);
    let _node = Node::start(&site);
    let config = p(&site.config()).to_owned();
    let mut last = (None, String::new(), String::new());
    common::wait_for(
        "health to report the expired SVID",
        Duration::from_secs(20),
        || {
            last = health(&["--config", &config]);
            last.0 == Some(75)
        },
    );
    let (_, stdout, stderr) = last;
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("not ready: the node's SVID has expired"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "asked on loopback: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
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
    let inside = PathBuf::from(format!(
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

    let pull = |dest: &str| pull_once(&site, &node, dest);
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

const LOADER: &str = "spiffe://hospital.example/gpu/loader";

/// Leaves a partial file of the loader's push of `object` (in `checkpoints`) as an
/// interrupted push would: `chunks` of its chunks written. Returns the file's path.
fn leave_partial(site: &Site, object: &str, len: usize, seed: u64, chunks: u32) -> PathBuf {
    use libtransport::proto::{ChunkIndex, DatasetName, Manifest, ObjectPath};
    let data = libtransport::test_util::random_bytes(len, seed);
    let m = std::sync::Arc::new(Manifest::of_bytes(&data, 1 << 20).unwrap());
    let store =
        libtransport::store::Store::open(site.path("storage/datasets"), None, 1 << 20).unwrap();
    let w = store
        .open_write(
            &DatasetName::new("checkpoints").unwrap(),
            &ObjectPath::new(object).unwrap(),
            m.clone(),
            LOADER,
        )
        .unwrap();
    for i in 0..chunks {
        let r = m.chunk_range(ChunkIndex(i)).unwrap();
        w.partial()
            .write_chunk(
                ChunkIndex(i),
                &[data[r.start as usize..r.end as usize].to_vec().into()],
            )
            .unwrap();
    }
    drop(w);
    let dir = site
        .path("storage/datasets/checkpoints")
        .join(object)
        .parent()
        .unwrap()
        .to_path_buf();
    partial_files(&dir).pop().expect("a partial file")
}

/// The partial files (not their sidecars) in `dir`.
fn partial_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(".transportd-partial-") && !n.ends_with(".meta")
        })
        .collect()
}

fn push(site: &Site, node: &Node, src: &std::path::Path, dest: &str) -> std::process::Output {
    let mut args = vec!["push".to_owned()];
    args.extend(client(site, "loader", node, "tcp"));
    args.extend(["--retries".into(), "0".into(), p(src).into(), dest.into()]);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn metric(node: &Node, name: &str) -> f64 {
    let (_, metrics) = node.admin_get("/metrics");
    common::metric(&metrics, name).unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

fn removals(site: &Site) -> Vec<Value> {
    trail(site)
        .into_iter()
        .filter(|r| r["event"] == "partial_removed")
        .collect()
}

fn digest_of(object: &str) -> String {
    libtransport::proto::ObjectPath::new(object)
        .unwrap()
        .digest()
        .to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_files_are_held_to_a_quota_and_an_age_and_every_removal_is_audited() {
    let site = Site::new();
    let limits = |age: &str, quota: &str| {
        format!(
            "{NODE_TOML}partial_quota = \"{quota}\"\npartial_quota_per_identity = \"{quota}\"\npartial_max_age = \"{age}\"\n"
        )
    };
    std::fs::write(site.config(), limits("1h", "4MiB")).unwrap();
    // An earlier run left two partial files: one two days old, one fresh (3 MiB).
    let old = leave_partial(&site, "old/left.bin", 1 << 20, 1, 1);
    let two_days = libtransport::clock::Clock::now(&libtransport::clock::SystemClock)
        - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days)
        .unwrap();
    let fresh = leave_partial(&site, "ckpt/l2.bin", 3 << 20, 2, 1);
    let mut node = Node::start(&site);

    // The old one went at start, before the node served, with a record naming its dataset,
    // object digest (not its name), owner, size and age.
    assert!(!old.exists() && fresh.exists());
    let r = removals(&site);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["reason"], "expired");
    assert_eq!(r[0]["dataset"], "checkpoints");
    assert_eq!(r[0]["object"], digest_of("old/left.bin"));
    assert_eq!(r[0]["owner"], LOADER);
    assert_eq!(r[0]["bytes"], 1 << 20);
    assert!(r[0]["age_secs"].as_u64().unwrap() >= 2 * 86_400, "{r:?}");
    assert!(!r[0].to_string().contains("left.bin"), "{r:?}");

    // A push larger than the quota is refused up front, as too large (exit 73, as for no
    // space): nothing is written.
    let big = site.path("gpu/big.ckpt");
    write_data(&big, 5 << 20, 3);
    let out = push(&site, &node, &big, "checkpoints/new/big.ckpt");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("quota for partial files"), "{err}");
    let new_dir = site.path("storage/datasets/checkpoints/new");
    assert!(!new_dir.join("big.ckpt").exists());
    assert!(partial_files(&new_dir).is_empty());
    // One that fits the quota but not what the fresh partial file leaves of it: no space
    // (exit 73), nothing written either.
    let mid = site.path("gpu/mid.ckpt");
    write_data(&mid, 2 << 20, 4);
    let out = push(&site, &node, &mid, "checkpoints/new/mid.ckpt");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("no space left on the receiver"), "{err}");
    assert!(!new_dir.join("mid.ckpt").exists());
    assert!(partial_files(&new_dir).is_empty());
    // What is left fits.
    let small = site.path("gpu/small.ckpt");
    write_data(&small, 1 << 20, 5);
    assert!(
        push(&site, &node, &small, "checkpoints/new/small.ckpt")
            .status
            .success()
    );
    assert_eq!(
        metric(&node, "transportd_partial_claimed_bytes"),
        (3 << 20) as f64
    );

    // The fresh file's push resumed with another manifest (the file changed): the old
    // partial file is replaced, not orphaned, and the replacement is recorded.
    let changed = site.path("gpu/l2.ckpt");
    let data = write_data(&changed, 2 << 20, 6);
    let out = push(&site, &node, &changed, "checkpoints/ckpt/l2.bin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = site.path("storage/datasets/checkpoints/ckpt/l2.bin");
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    let names: Vec<_> = std::fs::read_dir(stored.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["l2.bin"],
        "the old partial file is gone with its sidecar"
    );
    let r = removals(&site);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[1]["reason"], "replaced");
    assert_eq!(r[1]["object"], digest_of("ckpt/l2.bin"));
    assert_eq!(r[1]["owner"], LOADER);
    assert_eq!(r[1]["bytes"], 3 << 20);
    assert_eq!(metric(&node, "transportd_partial_files_expired_total"), 1.0);
    assert_eq!(
        metric(&node, "transportd_partial_files_replaced_total"),
        1.0
    );
    assert_eq!(metric(&node, "transportd_partial_files"), 0.0);
    node.stop();

    // The periodic sweep, with a 2 s age: a push that takes longer than that (four 4 MiB
    // chunks at 3 MiB/s) is never swept while it runs, and an interrupted one is swept
    // soon after.
    std::fs::write(site.config(), limits("2s", "64MiB")).unwrap();
    let node = Node::start(&site);
    let lib = common::library_client(&site, &node.tcp, libtransport::Path::Tcp).await;
    let slow = site.path("gpu/slow.ckpt");
    let data = write_data(&slow, 16 << 20, 7);
    let paced = |progress| libtransport::PushOptions {
        parallel: Some(1),
        retry: libtransport::RetryPolicy::none(),
        progress,
        max_rate: Some(3 << 20),
        connections: Some(1),
    };
    let ckpts = libtransport::proto::DatasetName::new("checkpoints").unwrap();
    let target = libtransport::proto::ObjectPath::new("run/slow.ckpt").unwrap();
    let report = lib
        .push_file(&ckpts, &target, &slow, &paced(None))
        .await
        .unwrap();
    assert!(report.elapsed > Duration::from_secs(3), "{report:?}");
    assert_eq!(
        std::fs::read(site.path("storage/datasets/checkpoints/run/slow.ckpt")).unwrap(),
        data
    );
    assert_eq!(removals(&site).len(), 2, "nothing swept while in use");

    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = started.clone();
    let progress: common::Progress = std::sync::Arc::new(move |done, _| {
        if done > 0 {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let cut = libtransport::proto::ObjectPath::new("run/cut.ckpt").unwrap();
    let task = tokio::spawn(async move {
        let _ = lib
            .push_file(&ckpts, &cut, &slow, &paced(Some(progress)))
            .await;
    });
    while !started.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client goes away mid-push (its connection with it).
    task.abort();
    let _ = task.await;
    let run_dir = site.path("storage/datasets/checkpoints/run");
    tokio::task::spawn_blocking(move || {
        wait_until("the interrupted push's partial file to be swept", || {
            removals(&site).len() == 3
        });
        let r = removals(&site);
        assert_eq!(r[2]["reason"], "expired");
        assert_eq!(r[2]["object"], digest_of("run/cut.ckpt"));
        assert_eq!(r[2]["bytes"], 16 << 20);
        assert!(partial_files(&run_dir).is_empty());
        assert!(!run_dir.join("cut.ckpt").exists());
        assert_eq!(metric(&node, "transportd_partial_files_expired_total"), 1.0);
    })
    .await
    .unwrap();
}

#[test]
#[ignore = "needs root (mount namespaces): run with --ignored"]
fn a_push_into_a_full_data_disk_gets_no_space_and_completes_once_space_returns() {
    let site = Site::new();
    let ckpts = site.path("storage/datasets/checkpoints");
    // The node runs in its own mount namespace with an 8 MiB tmpfs as the `checkpoints`
    // dataset.
    let mut wrapper = std::process::Command::new("unshare");
    wrapper.args(["--mount", "--propagation", "private", "sh", "-c"]);
    wrapper.arg("mount -t tmpfs -o size=8m,mode=0755 transportd-data \"$0\" && exec \"$@\"");
    wrapper
        .arg(&ckpts)
        .arg(env!("CARGO_BIN_EXE_transportd"))
        .stdin(std::process::Stdio::null());
    let node = Node::start_with(&site, wrapper);
    let inside = PathBuf::from(format!("/proc/{}/root{}", node.child.id(), ckpts.display()));
    std::fs::write(inside.join("probe"), b"x").unwrap();
    assert!(
        !ckpts.join("probe").exists(),
        "the tmpfs is visible outside the namespace"
    );
    std::fs::remove_file(inside.join("probe")).unwrap();

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
    // ... but for 1 MiB: the push starts, and its chunk writes run out of space.
    let len = f.metadata().unwrap().len();
    f.set_len(len - (1 << 20)).unwrap();
    drop(f);
    let src = site.path("gpu/step-1.ckpt");
    let data = write_data(&src, 3 << 20, 9);
    let out = push(&site, &node, &src, "checkpoints/run/step-1.ckpt");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("no space left on the receiver"), "{err}");
    let run_dir = inside.join("run");
    assert!(!run_dir.join("step-1.ckpt").exists());
    // The partial file is kept for a resume, claiming its manifest's size within the
    // quota (the age limit removes it if the push never comes back).
    assert_eq!(partial_files(&run_dir).len(), 1);
    assert_eq!(
        metric(&node, "transportd_partial_claimed_bytes"),
        (3 << 20) as f64
    );
    assert!(
        metric(&node, "transportd_partial_claimed_bytes")
            <= metric(&node, "transportd_partial_quota_bytes")
    );

    // Space returns: the same push completes, with no restart, and leaves only the object.
    std::fs::remove_file(&filler).unwrap();
    let out = push(&site, &node, &src, "checkpoints/run/step-1.ckpt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(run_dir.join("step-1.ckpt")).unwrap(), data);
    let names: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["step-1.ckpt"]);
    assert_eq!(metric(&node, "transportd_partial_files"), 0.0);
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A forged QUIC Initial: a valid long header (version 1, random connection IDs) and a
/// random payload no key opens, padded to 1200 bytes.
fn forged_initial(seed: u64) -> Vec<u8> {
    let noise = libtransport::test_util::random_bytes(1200, seed);
    let mut d = vec![0xc3, 0, 0, 0, 1, 8];
    d.extend_from_slice(&noise[..8]);
    d.push(8);
    d.extend_from_slice(&noise[8..16]);
    d.push(0); // No token.
    let rest = 1200 - d.len() - 2;
    d.extend_from_slice(&(0x4000u16 | rest as u16).to_be_bytes());
    d.extend_from_slice(&noise[16..16 + rest]);
    d
}

/// The node's descriptors return to where they were at rest after hostile input: garbage
/// bytes on TCP, TLS handshakes abandoned half-way, forged QUIC Initials, and clients
/// killed mid-pull on both paths. The control: while the hostile connections are held, the
/// count is above the baseline, so the poll that waits for the return would see a leak.
#[test]
fn descriptors_return_to_baseline_after_hostile_input() {
    use std::io::Write;
    let site = Site::new();
    // A short idle timeout, so the QUIC connection of a killed client ends in seconds.
    let toml = NODE_TOML.replace(
        "chunk_size = \"1MiB\"",
        "chunk_size = \"1MiB\"\nidle_timeout = \"5s\"",
    );
    std::fs::write(site.config(), toml).unwrap();
    let data = write_data(&site.path("storage/datasets/scans/big.bin"), 16 << 20, 31);
    let node = Node::start(&site);
    let pid = node.child.id();
    let gpu = site.path("gpu");
    std::fs::create_dir_all(&gpu).unwrap();
    let pull = |path: &str, dest: &std::path::Path| {
        let mut c = bin();
        c.arg("pull")
            .args(client(&site, "loader", &node, path))
            .args(["scans/big.bin", p(dest)]);
        c
    };
    // One pull on each path first, so whatever the node opens once and keeps is open.
    for path in ["quic", "tcp"] {
        let out = pull(path, &gpu.join(format!("warm-{path}.bin")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let baseline = fds(pid);

    // Held: garbage on TCP, and ClientHellos cut off half-way (the record promises more).
    let mut held = Vec::new();
    for i in 0..20u64 {
        let mut s = std::net::TcpStream::connect(&node.tcp).unwrap();
        s.write_all(&libtransport::test_util::random_bytes(300, i))
            .unwrap();
        held.push(s);
        let mut s = std::net::TcpStream::connect(&node.tcp).unwrap();
        s.write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .unwrap();
        held.push(s);
    }
    // Forged Initials from one UDP socket.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200 {
        udp.send_to(&forged_initial(1000 + i), &node.quic).unwrap();
    }
    // The control: the hostile connections show in the count.
    wait_until(
        "the held connections to show in the node's descriptors",
        || fds(pid) >= baseline + 20,
    );
    let during = fds(pid);
    eprintln!("node descriptors: {baseline} at rest, {during} with hostile connections held");
    drop(held);

    // Clients killed mid-pull, one on each path.
    for path in ["quic", "tcp"] {
        let dest = gpu.join(format!("killed-{path}.bin"));
        let partial = gpu.join(format!(".killed-{path}.bin.transportd-partial"));
        common::kill_once_landed(
            pull(path, &dest),
            || Some(partial.clone()),
            &data,
            1 << 20,
            2,
            false,
        );
    }

    // Back to the baseline (the killed QUIC client's connection ends at the idle timeout).
    #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now_fds = fds(pid);
        if now_fds <= baseline {
            break;
        }
        #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
        let now = std::time::Instant::now();
        assert!(
            now < deadline,
            "{now_fds} descriptors open 60 s after the hostile input ({baseline} at rest, {during} during)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the node still serves.
    let out = pull("tcp", &gpu.join("after.bin")).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One pull of `scans/a.bin` by the loader over TLS/TCP, no retries, into `dest`.
fn pull_once(site: &Site, node: &Node, dest: &str) -> std::process::Output {
    let mut args = vec!["pull".to_owned()];
    args.extend(client(site, "loader", node, "tcp"));
    args.extend([
        "--retries".into(),
        "0".into(),
        "scans/a.bin".into(),
        p(&site.path(dest)).into(),
    ]);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A node whose audit directory is a disk that fails or hangs on demand (netlab's FUSE
/// `faultyfs`, served by this test process), with `write_timeout = "1s"`.
fn node_on_a_faulty_audit_disk() -> (Site, netlab::faultyfs::FaultyFs, Node) {
    let site = site_with_policy_file();
    write_data(&site.path("storage/datasets/scans/a.bin"), 10_000, 1);
    let backing = site.path("audit-disk");
    let mount = site.path("storage/audit");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mount).unwrap();
    let toml = std::fs::read_to_string(site.config()).unwrap().replace(
        "dir = \"audit\"",
        "dir = \"audit\"\nwrite_timeout = \"1s\"\nfsync = \"record\"",
    );
    std::fs::write(site.config(), toml).unwrap();
    let disk = netlab::faultyfs::FaultyFs::mount(&backing, &mount).unwrap();
    let node = Node::start_with(&site, bin());
    assert!(
        backing.join("checkpoint.json").exists(),
        "the node's trail is not on the faulty disk"
    );
    (site, disk, node)
}

/// A pull while the audit disk is faulty: refused with the audit-unavailable error within
/// a generous deadline (the bound is 1 s), nothing written; `/readyz` and the metric say so
/// while the node keeps answering.
fn refused_while_the_disk_is_faulty(site: &Site, node: &Node) {
    #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
    let started = std::time::Instant::now();
    let out = pull_once(site, node, "during.bin");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("audit trail cannot be written"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(!site.path("during.bin").exists());
    let (code, body) = node.admin_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("audit trail cannot be written"), "{body}");
    let (_, metrics) = node.admin_get("/metrics");
    assert!(
        metrics.lines().any(|l| l == "transportd_audit_writable 0"),
        "{metrics}"
    );
}

/// Recovery without a restart, and the stall on record: `audit verify` passes (a stall is
/// not a break) and the trail says what failed and how many records were refused.
fn recovers_and_records_the_stall(site: &Site, mut node: Node, error: &str) {
    wait_until("/readyz to recover", || node.admin_get("/readyz").0 == 200);
    let out = pull_once(site, &node, "after.bin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, metrics) = node.admin_get("/metrics");
    assert!(
        metrics.lines().any(|l| l == "transportd_audit_writable 1"),
        "{metrics}"
    );
    node.stop();
    let records = trail(site);
    let stall = records
        .iter()
        .find(|r| r["event"] == "audit_stalled")
        .expect("an audit_stalled record");
    assert!(stall["refused"].as_u64().unwrap() >= 1, "{stall}");
    assert!(stall["error"].as_str().unwrap().contains(error), "{stall}");
    let out = ok(&["audit", "verify", p(&site.path("storage/audit"))]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("1 stall(s) of the trail's disk on record"),
        "{said}"
    );
}

#[test]
#[ignore = "needs root (FUSE): run with --ignored"]
fn an_audit_disk_that_fails_refuses_new_transfers_until_it_works_again() {
    let (site, disk, node) = node_on_a_faulty_audit_disk();
    assert!(pull_once(&site, &node, "before.bin").status.success());
    disk.set(netlab::faultyfs::Mode::Fail);
    refused_while_the_disk_is_faulty(&site, &node);
    disk.set(netlab::faultyfs::Mode::Pass);
    recovers_and_records_the_stall(&site, node, "os error 5");
}

#[test]
#[ignore = "needs root (FUSE): run with --ignored"]
fn an_audit_disk_that_stops_answering_refuses_new_transfers_within_the_bound() {
    let (site, disk, node) = node_on_a_faulty_audit_disk();
    assert!(pull_once(&site, &node, "before.bin").status.success());
    disk.set(netlab::faultyfs::Mode::Hang);
    refused_while_the_disk_is_faulty(&site, &node);
    // A second one is refused as well (at once: the writer is known to be stuck).
    refused_while_the_disk_is_faulty(&site, &node);
    disk.set(netlab::faultyfs::Mode::Pass);
    recovers_and_records_the_stall(&site, node, "write_timeout");
}

/// A node whose policy lets the loader read `scans` only, with `extra` appended to its
/// config, and an object in each of `scans`, `checkpoints` and `notes`.
fn site_for_emergency(extra: &str) -> Site {
    let site = site_with_policy_file();
    let toml = std::fs::read_to_string(site.config()).unwrap() + extra;
    std::fs::write(site.config(), toml).unwrap();
    std::fs::write(
        site.path("storage/policy.toml"),
        r#"
[[rule]]
name = "loader reads scans"
subjects = ["spiffe://hospital.example/gpu/loader"]
datasets = ["scans"]
actions = ["list", "read"]
"#,
    )
    .unwrap();
    for (object, seed) in [
        ("scans/a.bin", 1),
        ("checkpoints/c.bin", 2),
        ("notes/n.bin", 3),
    ] {
        write_data(
            &site.path(&format!("storage/datasets/{object}")),
            100_000,
            seed,
        );
    }
    site
}

/// One pull by `who` over TLS/TCP, no retries: its output and where it went.
fn pull_as(site: &Site, node: &Node, who: &str, object: &str) -> (std::process::Output, PathBuf) {
    let dest = site.path(&format!("pulled-{}", common::rand_suffix()));
    let mut args = vec!["pull".to_owned()];
    args.extend(client(site, who, node, "tcp"));
    args.extend([
        "--retries".into(),
        "0".into(),
        object.into(),
        p(&dest).into(),
    ]);
    (
        run(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        dest,
    )
}

fn grant_args<'a>(site: &'a Site, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "policy",
        "grant",
        "--emergency",
        "--config",
        p(&site.config()),
        "--peer",
        "spiffe://hospital.example/gpu/loader",
        "--dataset",
        "checkpoints",
        "--json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn run_strings(args: &[String]) -> std::process::Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn events(site: &Site, event: &str) -> Vec<Value> {
    trail(site)
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

#[test]
fn an_emergency_grant_allows_exactly_what_it_names_until_its_ttl_and_leaves_its_records() {
    let site = site_for_emergency("\n[emergency]\nmax_ttl = \"1h\"\n");
    let node = Node::start(&site);
    let checkpoint = std::fs::read(site.path("storage/datasets/checkpoints/c.bin")).unwrap();

    // Default deny before anything is granted.
    let (out, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert_eq!(
        out.status.code(),
        Some(66),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Grants beyond the node's bound, without a reason, or without --emergency are refused
    // (and the refusals recorded).
    let long = run_strings(&grant_args(
        &site,
        &["--ttl", "2h", "--reason", "INC-1 restore"],
    ));
    assert_eq!(long.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&long.stderr).contains("max_ttl"));
    let blank = run_strings(&grant_args(&site, &["--ttl", "5s", "--reason", "  "]));
    assert_eq!(blank.status.code(), Some(64));
    let mut plain = grant_args(&site, &["--ttl", "5s", "--reason", "INC-1 restore"]);
    plain.retain(|a| a != "--emergency");
    assert_eq!(run_strings(&plain).status.code(), Some(64));
    assert_eq!(events(&site, "emergency_refused").len(), 2);
    assert!(events(&site, "emergency_granted").is_empty());

    // The grant: the loader may read checkpoints for 5 s.
    let out = run_strings(&grant_args(
        &site,
        &[
            "--ttl",
            "4s",
            "--reason",
            "INC-4711 stroke workup, PACS down",
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grant = json(&out);
    let id = grant["id"].as_str().unwrap().to_owned();
    assert_eq!(grant["state"], "active");
    let (read, dest) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(std::fs::read(dest).unwrap(), checkpoint);
    // Nothing else: not another dataset, not a write, not another peer.
    let (other, _) = pull_as(&site, &node, "loader", "notes/n.bin");
    assert_eq!(other.status.code(), Some(66));
    let src = site.path("upload.bin");
    write_data(&src, 1000, 9);
    let pushed = push(&site, &node, &src, "checkpoints/up.bin");
    assert!(!pushed.status.success());
    assert!(!site.path("storage/datasets/checkpoints/up.bin").exists());
    let (intruder, _) = pull_as(&site, &node, "intruder", "checkpoints/c.bin");
    assert_eq!(intruder.status.code(), Some(66));
    let listed = ok(&["policy", "list-emergency", "--config", p(&site.config())]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));
    assert_eq!(metric(&node, "transportd_emergency_grants_active"), 1.0);
    assert!(metric(&node, "transportd_emergency_uses_total") >= 1.0);

    // Its time passes with no one acting: refused, and its expiry recorded once.
    common::wait_for("the grant to run out", Duration::from_secs(10), || {
        pull_as(&site, &node, "loader", "checkpoints/c.bin")
            .0
            .status
            .code()
            == Some(66)
    });
    common::wait_for("the expiry record", Duration::from_secs(5), || {
        !events(&site, "emergency_expired").is_empty()
    });
    assert_eq!(metric(&node, "transportd_emergency_grants_active"), 0.0);
    let listed = ok(&["policy", "list-emergency", "--config", p(&site.config())]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("no emergency grants"));

    // The trail, as `audit query` shows it: granted (with the reason and the operator),
    // every use, expired; and the authorization records name the grant.
    let query = |event: &str| -> Vec<Value> {
        let out = ok(&[
            "audit",
            "query",
            p(&site.path("storage/audit")),
            "--event",
            event,
            "--json",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let granted = query("emergency_granted");
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0]["grant"], id.as_str());
    assert_eq!(granted[0]["peer"], "spiffe://hospital.example/gpu/loader");
    assert_eq!(granted[0]["dataset"], "checkpoints");
    assert_eq!(granted[0]["reason"], "INC-4711 stroke workup, PACS down");
    assert_eq!(granted[0]["actions"], serde_json::json!(["list", "read"]));
    assert_eq!(granted[0]["ttl_secs"], 4);
    assert_eq!(
        granted[0]["operator_uid"],
        rustix::process::geteuid().as_raw()
    );
    let used = query("emergency_used");
    assert!(!used.is_empty());
    assert!(used.iter().all(|u| u["grant"] == id.as_str()
        && u["dataset"] == "checkpoints"
        && u["peer"] == "spiffe://hospital.example/gpu/loader"
        && u["reason"] == "INC-4711 stroke workup, PACS down"));
    assert!(
        used.iter()
            .any(|u| u["action"] == "read" && u["object"] == "c.bin")
    );
    let by_grant: Vec<Value> = query("authorization")
        .into_iter()
        .filter(|a| a["rule"] == format!("emergency:{id}"))
        .collect();
    assert_eq!(by_grant.len(), used.len(), "{by_grant:?} {used:?}");
    let expired = query("emergency_expired");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["grant"], id.as_str());
    assert_eq!(expired[0]["reason"], "INC-4711 stroke workup, PACS down");
    assert_eq!(expired[0]["approved"], true);
    // The reason stays out of the log.
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(!log.contains("stroke workup"), "{log}");
    // The evidence report lists the grant: its reason, operator, uses and expiry.
    let report = run(&[
        "audit",
        "report",
        p(&site.path("storage/audit")),
        "--format",
        "json",
    ]);
    let report: Value = serde_json::from_slice(&report.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&report.stderr)));
    let rows = report["emergency"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["grant"], id.as_str());
    assert_eq!(rows[0]["reason"], "INC-4711 stroke workup, PACS down");
    assert_eq!(rows[0]["uses"], used.len());
    assert_eq!(rows[0]["ended"], "expired");
}

#[test]
fn a_pending_grant_allows_nothing_its_granter_cannot_approve_it_and_it_outlives_a_restart() {
    let site = site_for_emergency("\n[emergency]\nrequire_approval = true\n");
    let mut node = Node::start(&site);
    let out = run_strings(&grant_args(
        &site,
        &["--ttl", "1h", "--reason", "INC-7 audit"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grant = json(&out);
    let id = grant["id"].as_str().unwrap().to_owned();
    assert_eq!(grant["state"], "pending");
    // Pending: nothing allowed.
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert_eq!(read.status.code(), Some(66));
    assert_eq!(metric(&node, "transportd_emergency_grants_active"), 0.0);
    // The operator who granted it cannot approve it.
    let own = run(&["policy", "approve", &id, "--config", p(&site.config())]);
    assert_eq!(
        own.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert!(String::from_utf8_lossy(&own.stderr).contains("second operator"));
    let refused = events(&site, "emergency_refused");
    assert!(
        refused
            .iter()
            .any(|r| r["op"] == "approve" && r["grant"] == id.as_str())
    );
    assert!(events(&site, "emergency_approved").is_empty());
    // Nor can an unknown grant be approved or revoked.
    let unknown = run(&[
        "policy",
        "revoke-emergency",
        "eg-000000000000",
        "--config",
        p(&site.config()),
    ]);
    assert_eq!(unknown.status.code(), Some(66));

    // A restart keeps the pending grant (and its expiry); a policy reload too.
    node.stop();
    let node = Node::start(&site);
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let listed = json(&ok(&[
        "policy",
        "list-emergency",
        "--config",
        p(&site.config()),
        "--json",
    ]));
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["expires_at"], grant["expires_at"]);
    assert_eq!(listed["state"], "pending");

    // Revoked: gone, and recorded.
    ok(&[
        "policy",
        "revoke-emergency",
        &id,
        "--config",
        p(&site.config()),
    ]);
    let revoked = events(&site, "emergency_revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["grant"], id.as_str());
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert_eq!(read.status.code(), Some(66));
}

#[test]
#[ignore = "needs root: approves as another uid"]
fn another_operator_approves_a_grant_which_then_outlives_a_policy_reload_and_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    assert_eq!(rustix::process::geteuid().as_raw(), 0, "run as root");
    let nobody = 65534;
    // A socket the group may reach, and a copy of the binary anyone may run.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.path().join("admin.sock");
    let exe = open.path().join("transportd");
    std::fs::copy(env!("CARGO_BIN_EXE_transportd"), &exe).unwrap();
    let site = site_for_emergency(&format!(
        "\n[emergency]\nrequire_approval = true\nsocket = \"{}\"\ngroup = \"{nobody}\"\n",
        socket.display()
    ));
    let mut node = Node::start(&site);
    let out = run_strings(&grant_args(
        &site,
        &["--ttl", "1h", "--reason", "INC-9 restore"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = json(&out)["id"].as_str().unwrap().to_owned();
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert_eq!(read.status.code(), Some(66));
    // The second operator: another uid, of the socket's group.
    let approved = std::process::Command::new(&exe)
        .args(["policy", "approve", &id, "--socket", p(&socket), "--json"])
        .uid(nobody)
        .gid(nobody)
        .output()
        .unwrap();
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    assert_eq!(json(&approved)["state"], "active");
    assert_eq!(json(&approved)["approved_by"], nobody);
    let records = events(&site, "emergency_approved");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["operator_uid"], nobody);
    assert_eq!(records[0]["granted_by"], 0);
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    // A policy reload keeps it in force, and so does a restart.
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    wait_until("the reload", || events(&site, "policy_loaded").len() >= 2);
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    node.stop();
    let node = Node::start(&site);
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    ok(&["policy", "revoke-emergency", &id, "--socket", p(&socket)]);
    let (read, _) = pull_as(&site, &node, "loader", "checkpoints/c.bin");
    assert_eq!(read.status.code(), Some(66));
}
