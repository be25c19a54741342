//! Lab tests: real namespaces, veths, a bridge, tc, nftables, tcpdump and tmpfs. They need
//! root and are ignored otherwise; run them one lab at a time:
//!
//! ```sh
//! cargo test -p netlab -- --ignored --test-threads=1
//! ```
//!
//! Every test asserts something that fails when the feature it covers breaks.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Transfer times are measured on the real clock: shaping is about wall time.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netlab::{Direction, Host, HostConfig, Lab, LabBuilder, Rate, Signal};

#[test]
#[ignore = "netlab: needs root"]
fn two_hosts_talk_tcp_across_the_bridge() {
    let lab = built(Lab::builder("tcp").host("a").host("b"));
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    assert_ne!(a.addr(), b.addr());
    assert_eq!(lab.subnet().prefix_len(), 24);

    let server = serve_once(b, 7000);
    let data = pattern(1 << 20);
    send(a, b.addr(), 7000, &data).unwrap();
    let (got, peer) = server.join().unwrap().unwrap();
    assert_eq!(got, data, "bytes arrive intact");
    assert_eq!(
        peer.ip(),
        a.addr(),
        "the server sees the other host's address"
    );

    // A thread parked in b's namespace (spawn_thread) hears a datagram from a.
    let listen = sock(b.addr(), 7001);
    let receiver = b
        .spawn_thread(move || -> std::io::Result<(Vec<u8>, SocketAddr)> {
            let socket = std::net::UdpSocket::bind(listen)?;
            socket.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = [0u8; 64];
            let (n, from) = socket.recv_from(&mut buf)?;
            Ok((buf[..n].to_vec(), from))
        })
        .unwrap();
    let to = sock(b.addr(), 7001);
    a.run(move || -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind(sock(Ipv4Addr::UNSPECIFIED, 0))?;
        // b's thread may not have bound yet: repeat until it answers by finishing.
        for _ in 0..50 {
            socket.send_to(b"hello b", to)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
    .unwrap()
    .unwrap();
    let (got, from) = receiver.join().unwrap().unwrap();
    assert_eq!(
        (got.as_slice(), from.ip()),
        (&b"hello b"[..], a.addr().into())
    );

    // The lab lives in its own namespaces: the machine's root namespace has none of it.
    let root_addrs = run("ip", &["-o", "addr"]);
    assert!(!root_addrs.contains(&b.addr().to_string()), "{root_addrs}");
    let root_links = run("ip", &["-o", "link"]);
    assert!(!root_links.contains(b.bridge_port()), "{root_links}");
    let list = run("ip", &["netns", "list"]);
    for ns in lab.namespaces() {
        assert!(list.contains(ns.as_str()), "{ns} missing from {list}");
    }
}

#[test]
#[ignore = "netlab: needs root"]
fn mtu_9000_carries_jumbo_frames_and_1500_does_not() {
    let lab = built(
        Lab::builder("mtu")
            .host_config(HostConfig::new("a").mtu(9000))
            .host_config(HostConfig::new("b").mtu(9000)),
    );
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    assert_eq!(a.mtu().unwrap(), 9000);
    assert_eq!(b.mtu().unwrap(), 9000);
    let port = run(
        "ip",
        &[
            "-n",
            lab.bridge_netns(),
            "-o",
            "link",
            "show",
            a.bridge_port(),
        ],
    );
    assert!(port.contains("mtu 9000"), "bridge end of the veth: {port}");
    let jumbo = ["-M", "do", "-s", "8000", "-c", "1", "-W", "2"];
    let (ok, out) = ping(a, b.addr(), &jumbo);
    assert!(ok, "8000-byte ping with DF at MTU 9000: {out}");

    for host in [a, b] {
        host.set_mtu(1500).unwrap();
        assert_eq!(host.mtu().unwrap(), 1500);
    }
    let (ok, out) = ping(a, b.addr(), &jumbo);
    assert!(!ok, "8000-byte ping with DF must fail at MTU 1500: {out}");
    let (ok, out) = ping(
        a,
        b.addr(),
        &["-M", "do", "-s", "1400", "-c", "1", "-W", "2"],
    );
    assert!(ok, "a 1400-byte ping still fits: {out}");
    assert!(a.set_mtu(70_000).is_err());
}

#[test]
#[ignore = "netlab: needs root"]
fn rate_limit_slows_a_transfer() {
    let lab = built(Lab::builder("rate").host("a").host("b"));
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    let size = 2 << 20; // 2 MiB: 2.1 s at 8 Mbit/s.
    let free = timed_transfer(a, b, 7001, size);

    a.set_rate(Direction::Egress, Some(Rate::mbit(8))).unwrap();
    let egress = timed_transfer(a, b, 7002, size);
    a.set_rate(Direction::Egress, None).unwrap();

    b.set_rate(Direction::Ingress, Some(Rate::mbit(8))).unwrap();
    let ingress = timed_transfer(a, b, 7003, size);
    b.set_rate(Direction::Ingress, None).unwrap();

    let again = timed_transfer(a, b, 7004, size);
    eprintln!(
        "2 MiB: free {free:?}, egress 8 Mbit {egress:?}, ingress 8 Mbit {ingress:?}, free again {again:?}"
    );
    // 2 MiB at 8 Mbit/s is 2.1 s (less the 10 kB bucket); unshaped it takes milliseconds.
    // Load on the machine only slows transfers down, so: generous upper bounds for the
    // unshaped runs, and the physical lower bound for the shaped ones.
    for unshaped in [free, again] {
        assert!(
            unshaped < Duration::from_secs(1),
            "unshaped took {unshaped:?}"
        );
    }
    for shaped in [egress, ingress] {
        assert!(
            shaped >= Duration::from_millis(1500),
            "shaped took {shaped:?}"
        );
    }
    assert!(
        a.set_rate(Direction::Egress, Some(Rate::kbit(1))).is_err(),
        "absurd rates are refused"
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn cuts_and_loss_drop_traffic_and_restore_heals() {
    let lab = built(Lab::builder("faults").host("a").host("b"));
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    let quick = ["-c", "3", "-i", "0.2", "-W", "1"];
    assert!(ping(a, b.addr(), &quick).0, "baseline");

    a.cut().unwrap();
    let (ok, out) = ping(a, b.addr(), &quick);
    assert!(!ok && out.contains(" 0 received"), "cut link: {out}");
    let to = sock(b.addr(), 7010);
    let refused = a.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)));
    assert!(refused.unwrap().is_err(), "no TCP over a cut link");
    assert!(a.dropped_packets(Direction::Egress).unwrap() > 0);
    a.restore().unwrap();
    assert!(ping(a, b.addr(), &quick).0, "restored after cut");
    let server = serve_once(b, 7011);
    send(a, b.addr(), 7011, b"after the cut").unwrap();
    assert_eq!(server.join().unwrap().unwrap().0, b"after the cut");

    // Each direction on its own: 100% loss on what b receives.
    b.set_loss(Direction::Ingress, 100.0).unwrap();
    let (ok, out) = ping(a, b.addr(), &quick);
    assert!(
        !ok && out.contains(" 0 received"),
        "100% ingress loss: {out}"
    );
    assert!(b.dropped_packets(Direction::Ingress).unwrap() >= 3);
    b.set_loss(Direction::Ingress, 0.0).unwrap();
    assert!(ping(a, b.addr(), &quick).0, "loss back to 0");

    // 50% loss on what a sends: about half the echo requests vanish.
    a.set_loss(Direction::Egress, 50.0).unwrap();
    let (_, out) = ping(a, b.addr(), &["-c", "100", "-i", "0.01", "-W", "1"]);
    let received = received_count(&out);
    eprintln!("50% egress loss: {received}/100 received");
    assert!((15..=85).contains(&received), "50% loss: {out}");
    let dropped = a.dropped_packets(Direction::Egress).unwrap();
    assert!(dropped >= 15, "counted drops: {dropped}");
    a.restore().unwrap();
    assert!(ping(a, b.addr(), &quick).0, "restored after loss");
    assert!(a.set_loss(Direction::Egress, 150.0).is_err());
}

#[test]
#[ignore = "netlab: needs root"]
fn a_plaintext_canary_shows_in_the_bridge_capture_and_random_bytes_do_not() {
    let lab = built(Lab::builder("capture").host("a").host("b"));
    let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
    let canary = b"NETLAB-CANARY-7f3a9c51";

    // The control: plaintext with the canary in the middle must be found.
    let capture = lab.capture().unwrap();
    assert!(capture.path().starts_with(lab.artifacts_dir()));
    let mut data = pattern(200_000);
    data.splice(100_000..100_000, canary.iter().copied());
    let server = serve_once(b, 7020);
    send(a, b.addr(), 7020, &data).unwrap();
    assert_eq!(server.join().unwrap().unwrap().0, data);
    let pcap = capture.stop().unwrap();
    assert!(
        captured_bytes(&pcap) > data.len(),
        "capture saw the transfer: {pcap:?}"
    );
    assert!(
        pcap.contains(canary),
        "the canary crossed the bridge in plaintext"
    );

    // Bytes without the canary: the search must not fire.
    let capture = lab.capture().unwrap();
    let noise = random_bytes(1 << 20, 0x9e37_79b9_7f4a_7c15);
    assert!(!contains(&noise, canary));
    let server = serve_once(b, 7021);
    send(a, b.addr(), 7021, &noise).unwrap();
    assert_eq!(server.join().unwrap().unwrap().0.len(), noise.len());
    let pcap = capture.stop().unwrap();
    assert!(
        captured_bytes(&pcap) > noise.len(),
        "capture saw the transfer: {pcap:?}"
    );
    assert!(!pcap.contains(canary), "no canary in random bytes");
}

#[test]
#[ignore = "netlab: needs root"]
fn a_host_tmpfs_fills_up_and_frees_again() {
    let lab = built(Lab::builder("tmpfs").host("a"));
    let a = lab.host("a").unwrap();
    let fs = a.mount_tmpfs(1 << 20).unwrap();
    assert!(a.mount_tmpfs(1 << 20).is_err(), "one per host");
    let dir = fs.path().to_str().unwrap().to_owned();

    let fill = format!("dd if=/dev/zero of={dir}/big bs=64k count=32");
    let out = a.command("sh").args(["-c", &fill]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "2 MiB into 1 MiB must fail");
    assert!(stderr.contains("No space left on device"), "{stderr}");

    // Only the host sees it: the machine sees an empty directory at that path.
    assert!(!Path::new(&dir).join("big").exists());
    assert!(fs.outside_path().join("big").exists());

    let out = a
        .command("sh")
        .args([
            "-c",
            &format!("rm {dir}/big && dd if=/dev/zero of={dir}/half bs=64k count=8"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let half = std::fs::metadata(fs.outside_path().join("half")).unwrap();
    assert_eq!(half.len(), 512 * 1024);

    // Supervised processes see it too.
    let writer = a
        .process("sh")
        .args(["-c", &format!("echo hello > {dir}/from-process")])
        .spawn()
        .unwrap();
    let status = writer.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.unwrap().success(), "{}", writer.log());
    let text = std::fs::read_to_string(fs.outside_path().join("from-process")).unwrap();
    assert_eq!(text, "hello\n");
}

#[test]
#[ignore = "netlab: needs root"]
fn processes_are_killed_terminated_and_restarted() {
    let lab = built(Lab::builder("process").host("a"));
    let a = lab.host("a").unwrap();
    // Prints "42-ready" once the trap is set (the log's first line holds the command line,
    // so the word waited for must not appear in it).
    let script =
        "trap 'echo got-term; exit 7' TERM; echo $((6*7))-ready; while :; do sleep 0.05; done";
    let process = a.process("sh").args(["-c", script]).spawn().unwrap();
    wait_for_log(&process, "42-ready", 1);
    assert_eq!(
        run("ip", &["netns", "identify", &process.pid().to_string()]).trim(),
        a.netns()
    );

    process.terminate().unwrap();
    let status = process
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(7), "SIGTERM ran the handler");
    assert!(process.log().contains("got-term"));

    let first = process.pid();
    process.restart().unwrap();
    assert_ne!(process.pid(), first);
    wait_for_log(&process, "42-ready", 2);
    assert!(process.is_running());

    let status = process.kill().unwrap();
    assert_eq!(status.signal(), Some(9), "SIGKILL");
    assert!(!process.is_running());

    process.restart().unwrap();
    wait_for_log(&process, "42-ready", 3);
    process.signal(Signal::SIGSTOP).unwrap();
    let status = process.stop(Duration::from_millis(300)).unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "a stopped process ignores SIGTERM and gets SIGKILL"
    );
}

#[test]
#[ignore = "netlab: needs root"]
fn dropping_a_lab_removes_namespaces_processes_and_mounts() {
    let lab = built(Lab::builder("teardown").host("a").host("b"));
    let a = lab.host("a").unwrap().clone();
    let process = a.spawn("sleep", ["1000"]).unwrap();
    let mut raw = a.command("sleep").arg("1000").spawn().unwrap();
    let fs = a.mount_tmpfs(1 << 20).unwrap();
    let capture = lab.capture().unwrap();
    let namespaces = lab.namespaces().to_vec();
    let dir = lab.artifacts_dir().to_owned();
    let pids = [process.pid(), raw.id()];
    assert!(pids.iter().all(|p| alive(*p)));
    assert!(fs.outside_path().exists());

    lab.teardown().unwrap();
    assert_gone(&namespaces, &pids);
    assert!(
        a.run(|| ()).is_err(),
        "a host handle outliving its lab cannot enter it"
    );
    assert!(!fs.outside_path().exists(), "tmpfs holder gone");
    assert!(!dir.exists(), "artifacts removed after a clean run");
    assert!(!process.is_running());
    assert_eq!(
        raw.wait().unwrap().signal(),
        Some(9),
        "untracked commands are killed too"
    );
    drop(capture);
}

#[test]
#[ignore = "netlab: needs root"]
fn a_panic_inside_a_lab_still_tears_down_and_keeps_artifacts() {
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = built(Lab::builder("panics").host("a"));
        let a = lab.host("a").unwrap();
        let process = a.process("sleep").arg("1000").spawn().unwrap();
        *seen.lock().unwrap() = Some((
            lab.namespaces().to_vec(),
            process.pid(),
            lab.artifacts_dir().to_owned(),
            process.log_path().to_owned(),
        ));
        panic!("deliberate panic inside a lab");
    }));
    assert!(result.is_err());
    let (namespaces, pid, dir, log) = seen.lock().unwrap().take().unwrap();
    assert_gone(&namespaces, &[pid]);
    assert!(
        log.exists(),
        "logs kept for the failed test in {}",
        dir.display()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[ignore = "netlab: needs root"]
fn two_labs_at_once_do_not_collide() {
    let build = || built(Lab::builder("twins").host("a").host("b"));
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(build);
        let two = s.spawn(build);
        (one.join().unwrap(), two.join().unwrap())
    });
    assert_ne!(one.id(), two.id());
    assert_ne!(one.subnet(), two.subnet());
    assert_ne!(one.artifacts_dir(), two.artifacts_dir());
    assert!(
        one.namespaces()
            .iter()
            .all(|n| !two.namespaces().contains(n))
    );
    for lab in [&one, &two] {
        let (a, b) = (lab.host("a").unwrap(), lab.host("b").unwrap());
        assert!(
            ping(a, b.addr(), &["-c", "1", "-W", "2"]).0,
            "inside {}",
            lab.name()
        );
    }
    let (ok, out) = ping(
        one.host("a").unwrap(),
        two.host("b").unwrap().addr(),
        &["-c", "1", "-W", "1"],
    );
    assert!(!ok, "labs are isolated from each other: {out}");

    // A lab in another process at the same time.
    let mut child = child_lab();
    let theirs = read_ready(&mut child);
    assert!(
        theirs
            .0
            .iter()
            .all(|n| !one.namespaces().contains(n) && !two.namespaces().contains(n))
    );
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_gone(&theirs.0, &[theirs.1]);
    assert!(!theirs.2.exists(), "a clean exit removes the artifacts");
}

#[test]
#[ignore = "netlab: needs root"]
fn debris_of_a_killed_test_process_is_swept() {
    let mut child = child_lab();
    let (namespaces, sleeper, dir) = read_ready(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let list = run("ip", &["netns", "list"]);
    assert!(
        namespaces.iter().all(|n| list.contains(n.as_str())),
        "left behind: {list}"
    );
    assert!(alive(sleeper), "its host process outlived it");

    // (When tests run in parallel, another lab's build may sweep them first.)
    let swept = netlab::sweep_stale().unwrap();
    eprintln!("swept {swept:?}");
    assert_gone(&namespaces, &[sleeper]);
    // A killed lab cannot remove its artifacts; they are evidence, but not needed here.
    std::fs::remove_dir_all(dir).unwrap();
}

/// Not a test on its own: the other process of the two tests above. Does nothing unless
/// started by them.
#[test]
#[ignore = "netlab: needs root"]
fn child_lab_helper() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let lab = built(Lab::builder("child").host("a").host("b"));
    let sleeper = lab
        .host("a")
        .unwrap()
        .process("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let dir = lab.artifacts_dir().display();
    println!(
        "{READY} {} {dir} {}",
        sleeper.pid(),
        lab.namespaces().join(" ")
    );
    std::io::stdout().flush().unwrap();
    // Until the parent closes our stdin (or kills us).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn helpers_find_and_generate_bytes() {
    assert!(contains(b"abcdef", b"cde"));
    assert!(!contains(b"abcdef", b"ced"));
    assert_ne!(random_bytes(64, 1), random_bytes(64, 2));
    assert_eq!(
        received_count("3 packets transmitted, 2 received, 33% packet loss"),
        2
    );
}

const CHILD_ENV: &str = "NETLAB_TEST_CHILD_LAB";
const READY: &str = "NETLAB-CHILD-READY";

/// Starts this test binary again, running only `child_lab_helper`.
fn child_lab() -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_lab_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The namespaces, the sleeper's pid and the artifacts directory the child lab reports. The child's stdout is drained
/// to its end on a thread, so the child never writes into a closed pipe.
fn read_ready(child: &mut std::process::Child) -> (Vec<String>, u32, PathBuf) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // libtest may print "test child_lab_helper ... " on the same line first.
            if let Some((_, rest)) = line.split_once(READY) {
                let mut words = rest.split_whitespace();
                let pid: u32 = words.next().unwrap().parse().unwrap();
                let dir = PathBuf::from(words.next().unwrap());
                let _ = tx.send((words.map(str::to_owned).collect(), pid, dir));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("child lab never became ready")
}

/// Builds a lab, failing the test with the error's message (which says what to do, e.g.
/// run as root).
fn built(builder: LabBuilder) -> Lab {
    builder.build().unwrap_or_else(|e| panic!("{e}"))
}

/// Namespaces gone from `ip netns list`, processes gone, lab interfaces not in the root.
fn assert_gone(namespaces: &[String], pids: &[u32]) {
    let list = run("ip", &["netns", "list"]);
    for ns in namespaces {
        assert!(!list.contains(ns.as_str()), "{ns} still in {list}");
    }
    for pid in pids {
        assert!(!alive(*pid), "process {pid} survived the lab");
    }
    let links = run("ip", &["-o", "link"]);
    assert!(
        !links.contains("br0"),
        "no lab bridge in the root namespace: {links}"
    );
}

/// Whether a process runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            state != Some("Z")
        })
        .unwrap_or(false)
}

fn wait_for_log(process: &netlab::Process, word: &str, times: usize) {
    for _ in 0..500 {
        if process.log().matches(word).count() >= times {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{word:?} not {times}x in the log: {}", process.log());
}

/// Accepts one connection on `host`, reads to the end, answers by closing.
fn serve_once(host: &Host, port: u16) -> JoinHandle<std::io::Result<(Vec<u8>, SocketAddr)>> {
    let addr = sock(host.addr(), port);
    let listener = host.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got)?;
        Ok((got, peer))
    })
}

/// Sends `data` from `host` and waits until the server has read it all and closed; returns
/// how long that took.
fn send(host: &Host, to: Ipv4Addr, port: u16, data: &[u8]) -> std::io::Result<Duration> {
    let data = data.to_vec();
    host.run(move || {
        let mut stream = TcpStream::connect_timeout(&sock(to, port), Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let start = Instant::now();
        stream.write_all(&data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        Ok(start.elapsed())
    })
    .unwrap()
}

fn timed_transfer(from: &Host, to: &Host, port: u16, size: usize) -> Duration {
    let server = serve_once(to, port);
    let took = send(from, to.addr(), port, &pattern(size)).unwrap();
    assert_eq!(server.join().unwrap().unwrap().0.len(), size);
    took
}

/// Runs ping on `host`; whether every reply came back, and ping's output.
fn ping(host: &Host, to: Ipv4Addr, args: &[&str]) -> (bool, String) {
    let out = host
        .command("ping")
        .args(args)
        .arg(to.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn received_count(ping_output: &str) -> u32 {
    let words: Vec<&str> = ping_output.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].starts_with("received"))
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Compressible text, no canary in it.
fn pattern(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// All bytes captured (frames on veths can be GSO-sized, up to 64 KiB each).
fn captured_bytes(pcap: &netlab::Pcap) -> usize {
    pcap.frames().iter().map(Vec::len).sum()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
