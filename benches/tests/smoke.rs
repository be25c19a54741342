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
    assert_eq!(names, ["plaintext-tcp", "tls-tcp", "quic"]);
    for m in modes {
        assert!(m["gbps"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["ratio_to_plaintext"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["p50_us"].as_u64().unwrap() > 0, "{m}");
        assert!(
            m["p99_us"].as_u64().unwrap() >= m["p50_us"].as_u64().unwrap(),
            "{m}"
        );
    }
    assert_eq!(modes[0]["ratio_to_plaintext"], 1.0);
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
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
