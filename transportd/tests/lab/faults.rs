//! Faults in the middle of transfers: a link cut, daemons killed with SIGKILL, random loss,
//! a full disk. Every transfer ends byte-identical, and nothing partial is ever visible.

use std::time::Duration;

use libtransport::proto::Digest;
use libtransport::store::digest_file;
use netlab::{Direction, Rate};

use crate::common::{half_chunks, intact_chunks, p, partial_in, settled, write_data};
use crate::util::{LabSite, report, wait_exit, wait_landed, wait_until};

/// The idle timeout both ends use in the scenarios that outlast it: short, so a cut past it
/// costs seconds rather than the default minute.
const IDLE: &str = "10s";

/// The node's configuration with `[limits] idle_timeout = IDLE`.
fn short_idle(toml: String) -> String {
    toml.replace(
        "chunk_size = \"1MiB\"",
        &format!("chunk_size = \"1MiB\"\nidle_timeout = \"{IDLE}\""),
    )
}

/// A canary that must never cross the wire in plaintext, and an object of `len` bytes made
/// of it in the dataset `scans` under a name that holds it too; returns (canary, object).
fn canary_object(s: &LabSite, len: usize) -> (String, String) {
    let canary = format!("PHI-CANARY-{:08x}-MRN-4417", std::process::id());
    let object = format!("scans/{canary}.bin");
    let content = canary.repeat(len / canary.len());
    std::fs::write(s.dataset_file(&object), content).unwrap();
    (canary, object)
}

/// Slows the GPU host's link so transfers last long enough to interrupt.
fn slow(s: &LabSite, mbit: u64) {
    for d in [Direction::Egress, Direction::Ingress] {
        s.host("gpu").set_rate(d, Some(Rate::mbit(mbit))).unwrap();
    }
}

#[test]
#[ignore = "netlab: needs root"]
fn a_link_cut_for_ten_seconds_mid_transfer_heals_by_itself() {
    let mut s = LabSite::new("link_cut", &[], |t| t);
    let data = write_data(&s.dataset_file("scans/big.bin"), 96 << 20, 1);
    s.start_node();
    slow(&s, 300);
    for path in ["quic", "tcp"] {
        let dest = s.site.path(&format!("big-{path}.bin"));
        let pull = s.client_process(
            "gpu",
            "loader",
            "pull",
            &["--path", path, "--json", "scans/big.bin", p(&dest)],
        );
        wait_landed(
            &s.site.path(""),
            &format!(".big-{path}.bin.transportd-partial"),
            4 << 20,
        );
        assert!(pull.is_running(), "the pull ended before the cut");
        s.host("gpu").cut().unwrap();
        std::thread::sleep(Duration::from_secs(10));
        s.host("gpu").restore().unwrap();
        let status = wait_exit(&pull, Duration::from_secs(120));
        assert!(status.success(), "{path}: {}", pull.log());
        assert_eq!(digest_file(&dest).unwrap(), Digest::of(&data), "{path}");
        let r = report(&pull.log());
        assert_eq!(r["verified"], true);
    }
}

#[test]
#[ignore = "netlab: needs root"]
fn a_serving_node_killed_mid_pull_restarts_and_the_pull_resumes() {
    let mut s = LabSite::new("kill_sender", &[], |t| t);
    let size = 96u64 << 20;
    let data = write_data(&s.dataset_file("scans/big.bin"), size as usize, 2);
    s.start_node();
    slow(&s, 300);
    let dest = s.site.path("big.bin");
    let pull = s.client_process(
        "gpu",
        "loader",
        "pull",
        &["--path", "quic", "--json", "scans/big.bin", p(&dest)],
    );
    wait_landed(&s.site.path(""), ".big.bin.transportd-partial", 4 << 20);
    s.node().kill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.restart_node();
    let status = wait_exit(&pull, Duration::from_secs(120));
    assert!(status.success(), "{}", pull.log());
    assert_eq!(digest_file(&dest).unwrap(), Digest::of(&data));
    let r = &report(&pull.log())["objects"][0]["report"];
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
    // Resumed, not restarted: what crossed the network is the object plus at most what was
    // in flight when the node died (8 chunks of 1 MiB).
    assert!(
        r["fetched_bytes"].as_u64().unwrap() <= size + (8 << 20),
        "{r}"
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn a_receiving_node_killed_mid_push_restarts_the_push_completes_and_acknowledged_pushes_stay() {
    let mut s = LabSite::new("kill_receiver", &[], |t| t);
    s.start_node();
    slow(&s, 300);
    let src = s.site.path("step-1.ckpt");
    let data = write_data(&src, 96 << 20, 3);
    let push = s.client_process(
        "gpu",
        "loader",
        "push",
        &["--json", p(&src), "checkpoints/run/step-1.ckpt"],
    );
    wait_landed(
        &s.dataset_file("checkpoints/run"),
        ".transportd-partial-",
        4 << 20,
    );
    s.node().kill().unwrap();
    let stored = s.dataset_file("checkpoints/run/step-1.ckpt");
    assert!(!stored.exists(), "a partial object became visible");
    std::thread::sleep(Duration::from_millis(500));
    s.restart_node();
    let status = wait_exit(&push, Duration::from_secs(120));
    assert!(status.success(), "{}", push.log());
    assert_eq!(digest_file(&stored).unwrap(), Digest::of(&data));
    let r = &report(&push.log())["objects"][0]["report"];
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");

    // A push that was acknowledged survives the node's death right after.
    let small = s.site.path("step-2.ckpt");
    let data2 = write_data(&small, 8 << 20, 4);
    let out = s.client(
        "gpu",
        "loader",
        "push",
        &[p(&small), "checkpoints/run/step-2.ckpt"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.node().kill().unwrap();
    s.restart_node();
    let back = s.site.path("step-2.back");
    let out = s.client(
        "gpu",
        "loader",
        "pull",
        &["checkpoints/run/step-2.ckpt", p(&back)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), data2);
}

#[test]
#[ignore = "netlab: needs root"]
fn random_loss_of_one_and_five_percent_each_way_still_ends_byte_identical() {
    let mut s = LabSite::new("loss", &[], |t| t);
    let data = write_data(&s.dataset_file("scans/a.bin"), 24 << 20, 5);
    s.start_node();
    for percent in [1.0, 5.0] {
        for d in [Direction::Egress, Direction::Ingress] {
            s.host("gpu").set_loss(d, percent).unwrap();
        }
        for path in ["quic", "tcp"] {
            let dest = s.site.path(&format!("a-{percent}-{path}.bin"));
            let out = s.client(
                "gpu",
                "loader",
                "pull",
                &["--path", path, "scans/a.bin", p(&dest)],
            );
            assert!(
                out.status.success(),
                "{percent}% {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(digest_file(&dest).unwrap(), Digest::of(&data));
        }
        let dropped = s.host("gpu").dropped_packets(Direction::Ingress).unwrap();
        assert!(dropped > 0, "the loss rule dropped nothing at {percent}%");
    }
}

#[test]
#[ignore = "netlab: needs root"]
fn the_receivers_disk_fills_mid_pull_with_a_clear_error_and_the_pull_completes_once_freed() {
    let mut s = LabSite::new("disk_full", &[], |t| t);
    let data = write_data(&s.dataset_file("scans/big.bin"), 48 << 20, 6);
    s.start_node();
    let fs = s.host("gpu").mount_tmpfs(64 << 20).unwrap();
    // Something else already holds half the disk.
    let filler = fs.outside_path().join("filler");
    std::fs::write(&filler, vec![0u8; 32 << 20]).unwrap();
    let dest = fs.path().join("big.bin");
    let out = s.client(
        "gpu",
        "loader",
        "pull",
        &["--retries", "0", "scans/big.bin", p(&dest)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is full: free space and run the same command again"),
        "{err}"
    );
    assert!(
        !fs.outside_path().join("big.bin").exists(),
        "a partial object is visible"
    );
    // Space is freed; the same command completes, keeping the chunks it had verified.
    std::fs::remove_file(&filler).unwrap();
    let out = s.client(
        "gpu",
        "loader",
        "pull",
        &["--json", "scans/big.bin", p(&dest)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["objects"][0]["report"]["chunks_reused"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(
        digest_file(&fs.outside_path().join("big.bin")).unwrap(),
        Digest::of(&data)
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn a_link_cut_past_the_idle_timeout_mid_pull_reconnects_and_resumes_where_it_was() {
    // Both ends give a silent connection up after IDLE (10 s); the cut lasts 15 s, so the
    // node drops the transfer and the client has to reconnect and resume.
    let mut s = LabSite::new("long_cut", &[], short_idle);
    let (canary, object) = canary_object(&s, 64 << 20);
    let size = std::fs::metadata(s.dataset_file(&object)).unwrap().len();
    s.start_node();
    slow(&s, 200);
    let capture = s.lab.capture().unwrap();
    let dest = s.site.path("long-cut.bin");
    let pull = s.client_process(
        "gpu",
        "loader",
        "pull",
        &[
            "--path",
            "quic",
            "--idle-timeout",
            IDLE,
            "--json",
            &object,
            p(&dest),
        ],
    );
    wait_landed(
        &s.site.path(""),
        ".long-cut.bin.transportd-partial",
        8 << 20,
    );
    s.host("gpu").cut().unwrap();
    // The node gives the connection up on its own (the transfer's end is in its trail), and
    // so does the client (it says it resumes); the link is still cut.
    wait_until(
        "the node ends the cut transfer",
        Duration::from_secs(30),
        || {
            s.trail()
                .iter()
                .any(|r| r["event"] == "transfer" && r["outcome"] != "complete")
        },
    );
    wait_until(
        "the client gives the connection up",
        Duration::from_secs(30),
        || pull.log().contains("pull interrupted; resuming"),
    );
    assert!(pull.is_running(), "the pull gave up during the cut");
    s.host("gpu").restore().unwrap();
    let status = wait_exit(&pull, Duration::from_secs(120));
    assert!(status.success(), "{}", pull.log());
    assert_eq!(
        digest_file(&dest).unwrap(),
        digest_file(&s.dataset_file(&object)).unwrap()
    );
    let r = report(&pull.log());
    assert_eq!(r["verified"], true, "{r}");
    let r = &r["objects"][0]["report"];
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");

    // The node's trail: two transfers of the object out, the first interrupted, the second
    // complete with only what the first had not sent.
    let trail = s.trail();
    let of_object = |event: &str| -> Vec<serde_json::Value> {
        trail
            .iter()
            .filter(|r| r["event"] == event && r["object"] == object["scans/".len()..])
            .cloned()
            .collect()
    };
    let started = of_object("transfer_started");
    let ended = of_object("transfer");
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_ne!(ended[0]["outcome"], "complete", "{ended:?}");
    let (first, second) = (
        ended[0]["bytes"].as_u64().unwrap(),
        ended[1]["bytes"].as_u64().unwrap(),
    );
    // The second sends what the first had not, plus at most what was in flight when the
    // link went (8 chunks of 1 MiB): it did not start from zero. (Its outcome reads
    // `incomplete`: the node cannot tell that the rest was already on the client.)
    assert!(first >= 8 << 20, "{ended:?}");
    assert!(second < size, "the resume started from zero: {ended:?}");
    assert!(second <= size - first + (8 << 20), "{ended:?}");
    assert!(first + second >= size, "{ended:?}");
    // Neither the content nor the name crossed the wire in the clear, cut or not.
    let wire = capture.stop().unwrap();
    assert!(wire.len() > 100, "the capture saw the transfer");
    assert!(
        !wire.contains(canary.as_bytes()),
        "the canary crossed the wire"
    );
}

/// Loads an nftables `script` on `host`.
fn nft(host: &netlab::Host, script: &str) {
    let out = host
        .command("sh")
        .args(["-c", &format!("nft -f - <<'EOF'\n{script}\nEOF")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Frames in `wire` (Ethernet, IPv4) sent to or from `addr`.
fn frames_with(wire: &netlab::Pcap, addr: std::net::Ipv4Addr) -> usize {
    let a = addr.octets();
    wire.frames()
        .iter()
        .filter(|f| f.len() >= 34 && (f[26..30] == a || f[30..34] == a))
        .count()
}

#[test]
#[ignore = "netlab: needs root"]
fn a_quic_pull_survives_the_clients_address_and_port_changing_mid_transfer() {
    let mut s = LabSite::new("rebind", &[], |t| t);
    let (canary, object) = canary_object(&s, 64 << 20);
    s.start_node();
    slow(&s, 200);
    let gpu = s.host("gpu");
    let node_ip = s.host("storage").addr();
    // The address the client moves to: a free one in the lab's subnet, on its own link.
    let moved = s.lab.subnet().host_addr(200).unwrap();
    let sh = |cmd: &str| {
        let out = gpu.command("sh").args(["-c", cmd]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&format!(
        "ip addr add {moved}/{} dev {}",
        s.lab.subnet().prefix_len(),
        gpu.interface()
    ));
    let capture = s.lab.capture().unwrap();
    let dest = s.site.path("rebind.bin");
    let pull = s.client_process(
        "gpu",
        "loader",
        "pull",
        &[
            "--path",
            "quic",
            "--connections",
            "1",
            "--json",
            &object,
            p(&dest),
        ],
    );
    wait_landed(&s.site.path(""), ".rebind.bin.transportd-partial", 8 << 20);
    // The client's port, as the node saw it at accept.
    let port = s
        .node()
        .log()
        .lines()
        .find_map(|l| {
            let rest = l.split_once(&format!("peer.addr={}:", gpu.addr()))?.1;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u16>()
                .ok()
        })
        .expect("the node logged the client's address");
    // A NAT rebinding, statelessly: from now on the client's datagrams leave from
    // {moved}:40000, and replies to that are handed back to its socket.
    nft(
        gpu,
        &format!(
            "table ip rebind {{
  chain out {{
    type filter hook postrouting priority 300;
    ip daddr {node_ip} udp dport 7443 ip saddr set {moved} udp sport set 40000
  }}
  chain in {{
    type filter hook prerouting priority -300;
    ip saddr {node_ip} udp sport 7443 udp dport 40000 udp dport set {port}
  }}
}}"
        ),
    );
    let status = wait_exit(&pull, Duration::from_secs(120));
    assert!(status.success(), "{}", pull.log());
    assert_eq!(
        digest_file(&dest).unwrap(),
        digest_file(&s.dataset_file(&object)).unwrap()
    );
    let r = report(&pull.log());
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["objects"][0]["report"]["retries"], 0, "{r}");
    let wire = capture.stop().unwrap();
    // The node did follow the client to its new address.
    assert!(
        frames_with(&wire, moved) > 100,
        "no traffic on the new path"
    );
    assert!(
        !wire.contains(canary.as_bytes()),
        "the canary crossed the wire"
    );

    // One connection, one identity, one complete transfer: the move changed nothing the
    // trail says about the peer.
    let trail = s.trail();
    let accepted: Vec<_> = trail
        .iter()
        .filter(|r| r["event"] == "connection_accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0]["peer"], "spiffe://hospital.example/gpu/loader");
    let ended: Vec<_> = trail.iter().filter(|r| r["event"] == "transfer").collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["peer"], accepted[0]["peer"]);
    assert_eq!(ended[0]["outcome"], "complete", "{ended:?}");
}

/// The size of the objects pushed in the mid-chunk scenarios: four chunks of 4 MiB.
const SIZE: usize = 16 << 20;

/// Waits until the node's partial file in `dir` holds at least one chunk of `data` whole
/// and another in part (chunks of `chunk` bytes): a push caught in the middle of a chunk.
/// Returns the file.
fn wait_mid_chunk(dir: &std::path::Path, data: &[u8], chunk: usize) -> std::path::PathBuf {
    let mut found = None;
    wait_until("a chunk half received", Duration::from_secs(60), || {
        found = partial_in(dir, ".transportd-partial-").filter(|f| {
            !intact_chunks(f, data, chunk).is_empty() && !half_chunks(f, data, chunk).is_empty()
        });
        found.is_some()
    });
    found.unwrap()
}

/// Waits until the node's trail holds `n` ends of pushes (`transfer`, direction `in`).
fn wait_push_ends(s: &LabSite, n: usize) {
    wait_until(
        "the node ends the cut push",
        Duration::from_secs(30),
        || {
            s.trail()
                .iter()
                .filter(|r| r["event"] == "transfer" && r["direction"] == "in")
                .count()
                >= n
        },
    );
}

/// The node's last push (of SIZE) completed with every chunk but the `kept` ones it held
/// whole: the half chunk was received again in full.
fn last_push_sent_all_but(s: &LabSite, kept: u64, chunk: usize) {
    let trail = s.trail();
    let last = trail
        .iter()
        .rfind(|r| r["event"] == "transfer" && r["direction"] == "in")
        .unwrap();
    assert_eq!(last["outcome"], "complete", "{last}");
    assert_eq!(
        last["bytes"].as_u64().unwrap(),
        SIZE as u64 - kept * chunk as u64,
        "the half chunk counted: {last}"
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn a_push_reset_or_closed_in_the_middle_of_a_chunk_keeps_no_half_chunk() {
    let mut s = LabSite::new("push_cut", &[], |t| t);
    s.start_node();
    // One chunk at a time (see the pushes below), slowly, with a small send buffer on the
    // client's host (which a process killed with SIGKILL still drains before its FIN): what
    // is in flight when the cut comes stays far below a chunk, so the chunk under way is
    // cut in its middle.
    slow(&s, 40);
    let out = s
        .host("gpu")
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_wmem=4096 16384 131072"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunk = 4 << 20;
    let dir = s.dataset_file("checkpoints/run");
    let stored = dir.join("step-1.ckpt");
    let node_ip = s.host("storage").addr();
    let gpu = s.host("gpu");
    let push = |src: &std::path::Path| {
        s.client_process(
            "gpu",
            "loader",
            "push",
            &[
                "--path",
                "tcp",
                "--parallel",
                "1",
                "--connections",
                "1",
                "--json",
                p(src),
                "checkpoints/run/step-1.ckpt",
            ],
        )
    };

    // A reset: once a chunk is half received, the client's host answers whatever the
    // node sends with a TCP reset. The client keeps retrying; the resets stop once the
    // node has ended the push and its partial file is measured.
    let src = s.site.path("step-1.ckpt");
    let data = write_data(&src, SIZE, 7);
    let first = push(&src);
    let partial = wait_mid_chunk(&dir, &data, chunk);
    nft(
        gpu,
        &format!(
            "table ip rst {{
  chain in {{
    type filter hook input priority 0;
    ip saddr {node_ip} tcp sport 7443 reject with tcp reset
  }}
}}"
        ),
    );
    wait_push_ends(&s, 1);
    // Measured while the reset still keeps the client's retries out.
    let (kept, half) = settled(&partial, &data, chunk);
    assert!(half, "no chunk was left half received");
    assert!(!stored.exists(), "a partial object became visible");
    nft(gpu, "delete table ip rst");
    let status = wait_exit(&first, Duration::from_secs(120));
    assert!(status.success(), "{}", first.log());
    let r = &report(&first.log())["objects"][0]["report"];
    assert!(r["retries"].as_u64().unwrap() >= 1, "{r}");
    last_push_sent_all_but(&s, kept, chunk);
    assert_eq!(digest_file(&stored).unwrap(), Digest::of(&data));

    // A FIN: the client dies (SIGKILL) in the middle of a chunk of a new version of the
    // object, and the same push run again completes.
    std::fs::remove_file(&stored).unwrap();
    let data = write_data(&src, SIZE, 8);
    let second = push(&src);
    let partial = wait_mid_chunk(&dir, &data, chunk);
    second.kill().unwrap();
    wait_push_ends(&s, 2);
    let (kept, half) = settled(&partial, &data, chunk);
    assert!(half, "no chunk was left half received");
    assert!(!stored.exists(), "a partial object became visible");
    let third = push(&src);
    let status = wait_exit(&third, Duration::from_secs(120));
    assert!(status.success(), "{}", third.log());
    let r = &report(&third.log())["objects"][0]["report"];
    assert_eq!(r["chunks_skipped"], kept, "the half chunk counted: {r}");
    last_push_sent_all_but(&s, kept, chunk);
    assert_eq!(digest_file(&stored).unwrap(), Digest::of(&data));
}
