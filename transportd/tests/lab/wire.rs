//! What an eavesdropper and an impostor get: nothing.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{ok, p, write_data};
use crate::util::{BIN, LabSite};

/// The bench's binary, built beside this test's (the workspace's tests build it).
fn bench_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("transport-bench");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p benches, or test the whole workspace)",
        bin.display()
    );
    bin
}

#[test]
#[ignore = "netlab: needs root"]
fn a_plaintext_canary_never_crosses_the_wire_in_secure_modes_but_does_in_the_baseline() {
    let mut s = LabSite::new("wire_canary", &[], |t| t);
    // A link speed a capture keeps up with on this machine, so no packet goes unsearched.
    for d in [netlab::Direction::Egress, netlab::Direction::Ingress] {
        s.host("gpu")
            .set_rate(d, Some(netlab::Rate::mbit(400)))
            .unwrap();
    }
    let canary = format!("PHI-CANARY-{:08x}-MRN-4417", std::process::id());
    let name = format!("{canary}.txt");
    let content = canary.repeat((4 << 20) / canary.len());
    std::fs::write(s.dataset_file(&format!("scans/{name}")), &content).unwrap();
    s.start_node();

    // transportd over QUIC/mTLS and TLS/TCP: neither the content nor the object's name.
    let capture = s.lab.capture().unwrap();
    for path in ["quic", "tcp"] {
        let dest = s.site.path(&format!("pulled-{path}.txt"));
        let out = s.client(
            "gpu",
            "loader",
            "pull",
            &["--path", path, &format!("scans/{name}"), p(&dest)],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), content);
    }
    let secure = capture.stop().unwrap();
    assert!(secure.len() > 100, "the capture saw the transfers");
    assert!(
        !secure.contains(canary.as_bytes()),
        "the canary crossed the wire in a secure mode"
    );

    // The bench's secure modes, for good measure, then its plaintext baseline: the control
    // that shows this capture and search do find a canary that is there.
    let storage = s.host("storage").addr();
    let bench = bench_server(&s, &name);
    let run = |modes: &str| {
        let out = s
            .host("gpu")
            .command(bench_bin())
            .args(["client", "--server", &format!("{storage}:7543")])
            .args([
                "--plaintext-server",
                &format!("{storage}:7544"),
                "--dangerous-plaintext",
            ])
            .args(["--identity", p(&s.site.path("loader")), "--modes", modes])
            .args(["--runs", "1", "--requests", "5", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            bench.log()
        );
    };
    let capture = s.lab.capture().unwrap();
    run("tls-tcp,quic");
    let secure = capture.stop().unwrap();
    assert!(!secure.contains(canary.as_bytes()));
    let capture = s.lab.capture().unwrap();
    run("plaintext-tcp");
    let plain = capture.stop().unwrap();
    assert!(
        plain.contains(canary.as_bytes()),
        "the control failed: the check cannot see plaintext"
    );
}

/// `transport-bench server` on the storage host, serving `scans/{name}`, with its plaintext
/// baselines allowed; returns once it listens.
fn bench_server(s: &LabSite, name: &str) -> netlab::Process {
    let storage = s.host("storage").addr();
    let bench = s
        .host("storage")
        .process(bench_bin())
        .args(["server", "--listen", &format!("{storage}:7543")])
        .args([
            "--plaintext",
            &format!("{storage}:7544"),
            "--dangerous-plaintext",
            "--no-audit",
        ])
        .args(["--identity", p(&s.site.path("storage/identity"))])
        .args(["--object", p(&s.dataset_file(&format!("scans/{name}")))])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if bench.log().contains("\"event\":\"listening\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bench
}

#[test]
#[ignore = "netlab: needs root"]
fn the_soft_rdma_device_carries_sealed_chunks_and_the_plaintext_baseline_shows_the_canary() {
    let s = LabSite::new("rdma_canary", &[], |t| t);
    for d in [netlab::Direction::Egress, netlab::Direction::Ingress] {
        s.host("gpu")
            .set_rate(d, Some(netlab::Rate::mbit(400)))
            .unwrap();
    }
    let canary = format!("PHI-CANARY-{:08x}-RDMA-0815", std::process::id());
    let name = format!("{canary}.txt");
    let content = canary.repeat((4 << 20) / canary.len());
    std::fs::write(s.dataset_file(&format!("scans/{name}")), &content).unwrap();
    let storage = s.host("storage").addr();
    let bench = bench_server(&s, &name);
    let run = |modes: &str| {
        let out = s
            .host("gpu")
            .command(bench_bin())
            .args(["client", "--server", &format!("{storage}:7543")])
            .args([
                "--plaintext-server",
                &format!("{storage}:7544"),
                "--dangerous-plaintext",
            ])
            .args(["--identity", p(&s.site.path("loader")), "--modes", modes])
            .args(["--runs", "1", "--requests", "5", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            bench.log()
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Sealed: the soft device's TCP stream (and the QUIC control) carry no plaintext.
    let capture = s.lab.capture().unwrap();
    let doc = run("rdma-soft");
    let sealed = capture.stop().unwrap();
    assert_eq!(doc["modes"][0]["mode"], "rdma-soft");
    let seen: usize = sealed.frames().iter().map(Vec::len).sum();
    assert!(
        seen > content.len(),
        "the capture saw the whole transfer ({seen} bytes)"
    );
    assert!(
        !sealed.contains(canary.as_bytes()),
        "the canary crossed the wire in rdma-soft"
    );
    // The bench's plaintext baseline over the same wire, the same capture finds it: the
    // check can fire. (rdma-soft-plain, the unsealed RDMA baseline, runs inside the bench's
    // own process and never crosses the wire, so it cannot be the control.)
    let capture = s.lab.capture().unwrap();
    run("plaintext-tcp");
    let plain = capture.stop().unwrap();
    assert!(
        plain.contains(canary.as_bytes()),
        "the control failed: the capture does not see plaintext chunks"
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn a_rogue_host_with_another_cas_or_an_expired_svid_gets_nothing() {
    let mut s = LabSite::new("rogue_host", &["rogue"], |t| t);
    let secret = write_data(&s.dataset_file("scans/secret.bin"), 100_000, 1);
    // An SVID for the loader's very ID, from another CA; and a real one that has expired.
    let other = s.site.path("other-ca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "hospital.example",
        "--out",
        p(&other),
    ]);
    let forged = s.site.path("forged");
    ok(&[
        "ca",
        "issue",
        "--ca",
        p(&other),
        "--id",
        "spiffe://hospital.example/gpu/loader",
        "--out",
        p(&forged),
    ]);
    std::fs::copy(s.site.path("ca/bundle.pem"), forged.join("bundle.pem")).unwrap();
    let expired = s.site.path("expired");
    ok(&[
        "ca",
        "issue",
        "--ca",
        p(&s.site.path("ca")),
        "--id",
        "spiffe://hospital.example/gpu/loader",
        "--ttl",
        "1s",
        "--out",
        p(&expired),
    ]);
    // Until it has expired by the clock the node reads (certificate times are whole
    // seconds, and so is the time they are checked at).
    let pem = std::fs::read_to_string(expired.join("svid.pem")).unwrap();
    let key = std::fs::read_to_string(expired.join("svid.key")).unwrap();
    let not_after = certs::Svid::from_pem(&pem, &key).unwrap().not_after();
    while libtransport::clock::Clock::now(&libtransport::clock::SystemClock)
        <= not_after + Duration::from_secs(1)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    s.start_node();

    let capture = s.lab.capture().unwrap();
    for who in ["forged", "expired"] {
        let dest = s.site.path(&format!("{who}.bin"));
        let out = s.client(
            "rogue",
            who,
            "pull",
            &["--retries", "0", "scans/secret.bin", p(&dest)],
        );
        assert_eq!(
            out.status.code(),
            Some(77),
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dest.exists());
        let out = s.client("rogue", who, "ls", &["--json"]);
        assert_eq!(out.status.code(), Some(77));
        assert!(out.stdout.is_empty(), "{who} was told something");
    }
    let seen = capture.stop().unwrap();
    // On the wire: the rogue host's attempts were captured, and what the node sent it is
    // handshakes only: far less than the object, and none of its bytes.
    let rogue_ip = s.host("rogue").addr();
    let (from_rogue, to_rogue) = ipv4_bytes(&seen, rogue_ip);
    assert!(from_rogue > 0, "the capture saw nothing of the rogue host");
    assert!(
        to_rogue < secret.len() / 2,
        "the node sent the rogue host {to_rogue} bytes"
    );
    assert!(
        !seen.contains(&secret[50_000..50_064]),
        "object bytes on the wire"
    );
    // The control for the byte count: the loader's pull below, captured the same way, does
    // carry the object's size to the GPU host.
    let capture = s.lab.capture().unwrap();
    // The node refused them by name of their address, and served them nothing.
    let refused = s.wait_refusals(s.host("rogue").addr(), None, 4, Duration::from_secs(10));
    assert!(refused >= 4, "{refused} refusals audited");
    assert!(!s.trail().iter().any(|r| r["event"] == "transfer_started"));
    // The control: the real loader on the GPU host is served.
    let out = s.client(
        "gpu",
        "loader",
        "pull",
        &["scans/secret.bin", p(&s.site.path("ok.bin"))],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, to_gpu) = ipv4_bytes(&capture.stop().unwrap(), s.host("gpu").addr());
    assert!(
        to_gpu >= secret.len(),
        "the control saw {to_gpu} bytes to the GPU host"
    );
    let _ = BIN;
}

/// IPv4 bytes (headers included) in the captured Ethernet frames from `addr`, and to it.
fn ipv4_bytes(pcap: &netlab::Pcap, addr: std::net::Ipv4Addr) -> (usize, usize) {
    let octets = addr.octets();
    let (mut from, mut to) = (0, 0);
    for f in pcap.frames() {
        // Ethernet (14 bytes), then IPv4: source at 12..16, destination at 16..20.
        if f.len() < 34 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        if f[26..30] == octets {
            from += f.len() - 14;
        }
        if f[30..34] == octets {
            to += f.len() - 14;
        }
    }
    (from, to)
}
