//! The harness runs every mode end to end on a tiny object and reports in the documented
//! JSON shape. Numbers are not judged here: performance belongs to benchmark runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::process::Command;

#[test]
fn local_reports_every_mode_in_the_documented_shape() {
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args([
            "local",
            "--size",
            "4MiB",
            "--runs",
            "1",
            "--requests",
            "20",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes = doc["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "bare-tcp",
            "bare-tls",
            "bare-quic",
            "plaintext-tcp",
            "tls-tcp",
            "quic"
        ]
    );
    let floor = doc["floor_cpu_s_per_gb"].as_f64().expect("a floor");
    assert!(floor > 0.0 && floor.is_finite(), "{floor}");
    for m in modes {
        assert!(m["gbps"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["ratio_to_plaintext"].as_f64().unwrap() > 0.0, "{m}");
        // Each mode against its library's reference loop and the floor, both ends' CPU.
        assert!(m["ratio_to_bare"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["cost_over_floor"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["cpu_s_per_gb"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["client_cpu_s_per_gb"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["p50_us"].as_u64().unwrap() > 0, "{m}");
        assert!(
            m["p99_us"].as_u64().unwrap() >= m["p50_us"].as_u64().unwrap(),
            "{m}"
        );
    }
    // A reference loop is its own bare loop; plaintext-tcp is the plaintext baseline.
    assert_eq!(modes[0]["ratio_to_bare"], 1.0);
    assert_eq!(modes[3]["ratio_to_plaintext"], 1.0);
    // By default every pull goes into memory.
    for m in modes.iter().chain(doc["runs"].as_array().unwrap()) {
        assert_eq!(m["into"], "memory", "{m}");
        assert!(m["ratio_to_memory"].is_null(), "{m}");
    }
    assert_eq!(doc["params"]["into"], serde_json::json!(["memory"]));
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    // The host's one-core rates, measured in the same invocation, travel with the figures.
    for rate in [
        "aes_128_gcm_seal_gbps",
        "aes_128_gcm_open_gbps",
        "blake3_gbps",
        "memcpy_gbps",
    ] {
        let g = doc["machine"]["one_core"][rate].as_f64().unwrap();
        assert!(g.is_finite() && g > 0.0, "{rate}: {g}");
    }
}

#[test]
fn local_pulls_into_files_beside_memory_with_the_same_fields() {
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args([
            "local",
            "--size",
            "4MiB",
            "--modes",
            "bare-tcp,bare-tls,plaintext-tcp,tls-tcp",
            "--into",
            "memory,file",
            "--runs",
            "2",
            "--requests",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes = doc["modes"].as_array().unwrap();
    let rows: Vec<(&str, &str)> = modes
        .iter()
        .map(|m| (m["mode"].as_str().unwrap(), m["into"].as_str().unwrap()))
        .collect();
    // The loops read into memory only; each product mode pulls into memory, then a file.
    assert_eq!(
        rows,
        [
            ("bare-tcp", "memory"),
            ("bare-tls", "memory"),
            ("plaintext-tcp", "memory"),
            ("plaintext-tcp>file", "file"),
            ("tls-tcp", "memory"),
            ("tls-tcp>file", "file"),
        ]
    );
    let row = |name: &str| modes.iter().find(|m| m["mode"] == name).unwrap();
    for name in ["plaintext-tcp>file", "tls-tcp>file"] {
        let m = row(name);
        // The same fields as a pull into memory ...
        assert_eq!(m["runs_gbps"].as_array().unwrap().len(), 2, "{m}");
        for field in [
            "gbps",
            "ratio_to_plaintext",
            "ratio_to_bare",
            "cost_over_floor",
            "cpu_s_per_gb",
            "client_cpu_s_per_gb",
        ] {
            let v = m[field].as_f64().unwrap_or_else(|| panic!("{field}: {m}"));
            assert!(v.is_finite() && v > 0.0, "{field}: {m}");
        }
        assert!(m["p50_us"].as_u64().unwrap() > 0, "{m}");
        // ... and the ratio to the same mode's pull into memory.
        let memory = row(name.trim_end_matches(">file"));
        let ratio = m["ratio_to_memory"].as_f64().unwrap();
        let expected = m["gbps"].as_f64().unwrap() / memory["gbps"].as_f64().unwrap();
        assert!((ratio - expected).abs() < 0.01 * expected + 0.002, "{m}");
        assert!(memory["ratio_to_memory"].is_null(), "{memory}");
    }
    // A file pull is set against the baseline's file pull, and its loop like the rest.
    assert_eq!(row("plaintext-tcp>file")["ratio_to_plaintext"], 1.0);
    let tls_file = row("tls-tcp>file");
    let expected = tls_file["gbps"].as_f64().unwrap() / row("bare-tls")["gbps"].as_f64().unwrap();
    assert!(
        (tls_file["ratio_to_bare"].as_f64().unwrap() - expected).abs() < 0.01 * expected + 0.002
    );
    // Every run is recorded with where it pulled to, each file pull of the whole object.
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * 6);
    for r in runs {
        let file = r["mode"].as_str().unwrap().ends_with(">file");
        assert_eq!(r["into"], if file { "file" } else { "memory" }, "{r}");
        assert_eq!(r["bytes"], 4 << 20, "{r}");
    }
    assert_eq!(doc["params"]["into"], serde_json::json!(["memory", "file"]));
}

#[test]
fn local_reports_one_pull_striped_over_several_connections_as_rows_of_their_own() {
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args([
            "local",
            "--size",
            "4MiB",
            "--chunk-size",
            "256KiB",
            "--modes",
            "bare-tcp,tls-tcp,quic",
            "--stripes",
            "1,2,4",
            "--runs",
            "1",
            "--requests",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes = doc["modes"].as_array().unwrap();
    let rows: Vec<(&str, u64)> = modes
        .iter()
        .map(|m| (m["mode"].as_str().unwrap(), m["stripes"].as_u64().unwrap()))
        .collect();
    // The loop runs once, over one connection; each product mode over 1, 2 and 4.
    assert_eq!(
        rows,
        [
            ("bare-tcp", 1),
            ("tls-tcp", 1),
            ("tls-tcp*2", 2),
            ("tls-tcp*4", 4),
            ("quic", 1),
            ("quic*2", 2),
            ("quic*4", 4),
        ]
    );
    for m in &modes[1..] {
        for field in ["gbps", "cpu_s_per_gb", "cost_over_floor"] {
            let v = m[field].as_f64().unwrap_or_else(|| panic!("{field}: {m}"));
            assert!(v.is_finite() && v > 0.0, "{field}: {m}");
        }
    }
    assert_eq!(doc["params"]["stripes"], serde_json::json!([1, 2, 4]));
}

#[test]
fn unknown_destinations_are_refused_with_the_known_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args(["local", "--into", "disk"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory") && err.contains("file"), "{err}");
}

#[test]
fn unknown_modes_are_refused_with_the_list_of_known_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args(["local", "--modes", "carrier-pigeon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plaintext-tcp") && err.contains("quic"),
        "{err}"
    );
}

#[test]
fn out_writes_json_markdown_and_an_svg_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args([
            "local",
            "--size",
            "2MiB",
            "--runs",
            "1",
            "--requests",
            "5",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ext in ["json", "md", "svg"] {
        assert!(
            files.iter().any(|f| f.ends_with(ext)),
            "no .{ext} in {files:?}"
        );
    }
    let svg = files.iter().find(|f| f.ends_with("svg")).unwrap();
    let svg = std::fs::read_to_string(dir.path().join(svg)).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("quic") && svg.contains("GB/s"));
}

#[test]
fn plaintext_needs_the_dangerous_flag_on_both_sides() {
    for args in [
        vec!["server", "--identity", "x", "--plaintext", "127.0.0.1:1"],
        vec![
            "client",
            "--identity",
            "x",
            "--server",
            "127.0.0.1:1",
            "--plaintext-server",
            "127.0.0.1:2",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--dangerous-plaintext"),
            "{args:?}"
        );
    }
}

#[test]
#[ignore = "netlab: needs root"]
fn lab_reports_each_mode_across_a_wire_at_both_mtus() {
    for mtu in ["1500", "9000"] {
        let out = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
            .args([
                "lab",
                "--size",
                "64MiB",
                "--runs",
                "1",
                "--requests",
                "10",
                "--json",
                "--mtu",
                mtu,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["mtu"].to_string(), mtu);
        // The reference loops crossed the same wire, against the server host's own loops.
        assert_eq!(doc["params"]["reference_loops"], "server");
        let modes = doc["modes"].as_array().unwrap();
        assert_eq!(modes.len(), 6);
        for m in modes {
            assert!(m["gbps"].as_f64().unwrap() > 0.0);
            assert!(m["ratio_to_plaintext"].as_f64().unwrap() > 0.0);
        }
        // Both sides' CPU was measured: the server ran in another process on a lab host. The
        // kernel counts CPU time in 10 ms ticks, so one small run may read 0; all of them
        // together may not.
        let runs = doc["runs"].as_array().unwrap();
        let server: Vec<f64> = runs
            .iter()
            .map(|r| {
                r["server_cpu_s_per_gb"]
                    .as_f64()
                    .expect("server CPU measured")
            })
            .collect();
        assert!(server.iter().sum::<f64>() > 0.0, "{server:?}");
    }
}

/// `transport-bench server` serves a synthetic object from a temporary directory; stopped
/// with SIGTERM (as the lab and service managers stop it) it must take that directory with
/// it, or every run leaves the object's size behind in the temporary directory.
#[test]
fn a_server_stopped_with_sigterm_removes_its_synthetic_object() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let ca = benches::setup::new_ca().unwrap();
    let id = tmp.path().join("id");
    benches::setup::write_identity(&ca, "/bench/server", &id).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_transport-bench"))
        .args(["server", "--listen", "127.0.0.1:0", "--size", "8MiB"])
        .arg("--identity")
        .arg(&id)
        .env("TMPDIR", &scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"listening\""), "{line}");
    let served = || std::fs::read_dir(&scratch).unwrap().count();
    assert_eq!(served(), 1, "the synthetic object was not under TMPDIR");
    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(served(), 0, "the synthetic object outlived its server");
}

/// `sidecar` with the real `transportd` binary (built beside this one, as a workspace build
/// does): every phase reported, and what the storage node sent is what the phases promise,
/// counted from its metrics: each direct reader pulled the object itself, the sidecar pulled
/// it once for all its readers, and hits pulled nothing.
#[test]
fn sidecar_reports_its_phases_and_pulls_once_for_all_readers() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_transport-bench"));
    assert!(
        bench.with_file_name("transportd").exists(),
        "build the transportd binary too (cargo build --workspace, or cargo test --workspace)"
    );
    let size: u64 = 6 << 20;
    let out = Command::new(bench)
        .args([
            "sidecar",
            "--size",
            "6MiB",
            "--readers",
            "3",
            "--rounds",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases = doc["phases"].as_array().unwrap();
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "direct",
            "sidecar-cold",
            "sidecar-memory",
            "sidecar-memory-1",
            "sidecar-disk"
        ]
    );
    let net = |i: usize| phases[i]["network_bytes_per_reader"].as_f64().unwrap();
    assert_eq!(net(0), size as f64, "{doc}");
    assert_eq!(net(1), size as f64 / 3.0, "{doc}");
    assert_eq!((net(2), net(3), net(4)), (0.0, 0.0, 0.0), "{doc}");
    assert_eq!(phases[2]["fetches"], 6);
    for p in phases {
        for k in ["aggregate_gbps", "cpu_s_per_gb", "per_fetch_gbps"] {
            assert!(p[k].as_f64().unwrap() > 0.0, "{p}");
        }
    }
    assert!(doc["aes_256_gcm_open_gbps"].as_f64().unwrap() > 0.0);
    // The kernel's huge-page setting for memory files goes with the figures.
    assert!(doc["shmem_huge_pages"].is_string(), "{doc}");
    assert!(doc["targets"].is_object());
    assert!(doc["machine"]["one_core"].is_object());
}
