//! The sidecar with the real binaries: an issuer, a storage node and a GPU node whose
//! `[sidecar]` serves local callers. The callers are separate processes speaking the local
//! API's frames (a small Python program run from copies of the Python interpreter, so that
//! each copy is its own executable and matches its own registration entry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use libtransport::clock::{Clock, SystemClock};
use serde_json::Value;

use super::{AgentNode, Domain, bin, id, p, stderr, wait_for, write_data};
use crate::common::metric;

/// A local caller: sends one request per argument (JSON), prints one JSON line per answer
/// with what it learned (never the bytes), and how many bytes came through the socket;
/// `{"working": N}` for each frame saying the request is still being served.
/// For a mapped answer it maps the descriptor read-only, tries to write it (it must not
/// be able to), and compares it with `--expect FILE` if given.
const CALLER: &str = r#"
import hashlib, json, mmap, os, socket, struct, sys

args = sys.argv[1:]
expect = None
if args and args[0] == "--expect":
    expect, args = args[1], args[2:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["SIDECAR"])
through = 0

def exact(n):
    global through
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise EOFError("the sidecar closed the connection")
        out += got
    through += n
    return out

for req in args:
    req = json.loads(req)
    send = req.pop("_file", None)
    h = json.dumps(req).encode()
    frame = struct.pack(">I", len(h)) + h
    try:
        if send is None:
            sock.sendall(frame)
        else:
            with open(send, "rb") as f:
                socket.send_fds(sock, [frame], [f.fileno()])
    except (BrokenPipeError, ConnectionResetError):
        pass  # turned away (busy): the answer it left is read below
    beats = 0
    try:
        while True:
            first, fds, _, _ = socket.recv_fds(sock, 4, 1)
            if not first:
                raise EOFError("the sidecar closed the connection")
            through += len(first)
            prefix = first + exact(4 - len(first)) if len(first) < 4 else first
            (n,) = struct.unpack(">I", prefix)
            answer = json.loads(exact(n))
            if answer.get("answer") != "working":
                break
            beats += 1
            print(json.dumps({"working": beats}), flush=True)
        body = exact(answer["body"]) if answer.get("answer") == "inline" else b""
    except (EOFError, ConnectionError) as e:
        print(json.dumps({"answer": "lost", "error": str(e)}), flush=True)
        sys.exit(3)
    out = {"answer": answer, "through": through, "body_sha256": hashlib.sha256(body).hexdigest()}
    if fds:
        fd = fds[0]
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
        out["mapped"] = size
        out["sha256"] = hashlib.sha256(m).hexdigest()
        if expect is not None:
            with open(expect, "rb") as f:
                out["identical"] = hashlib.sha256(f.read()).hexdigest() == out["sha256"]
        try:
            os.pwrite(fd, b"x", 0)
            out["writable"] = True
        except OSError:
            out["writable"] = False
    print(json.dumps(out), flush=True)
"#;

/// The Python interpreter the callers are copies of.
fn python() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, os; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 (the sidecar tests' callers)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A storage node, and a GPU node with a sidecar; callers run from `bin/<name>` copies.
struct SidecarSite {
    storage: AgentNode,
    gpu: AgentNode,
    socket: String,
    bin: PathBuf,
    script: PathBuf,
}

impl SidecarSite {
    /// `reader` may read `scans`; `intruder` has an entry but no rule; `stranger` has no
    /// entry at all.
    fn start(d: &Domain) -> Self {
        Self::start_with(d, "")
    }

    /// [`SidecarSite::start`] with more `[sidecar]` settings.
    fn start_with(d: &Domain, settings: &str) -> Self {
        let bin = d.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let py = python();
        for name in ["reader", "intruder", "stranger"] {
            std::fs::copy(&py, bin.join(name)).unwrap();
        }
        let script = d.path("caller.py");
        std::fs::write(&script, CALLER).unwrap();
        // The loader runs as a Python program, or as `transportd pull --sidecar`.
        let cli = std::fs::canonicalize(env!("CARGO_BIN_EXE_transportd")).unwrap();
        for (who, exe) in [
            ("/gpu/loader", bin.join("reader")),
            ("/gpu/loader", cli),
            ("/gpu/intruder", bin.join("intruder")),
        ] {
            d.admin_ok(&[
                "entry",
                "create",
                "--spiffe-id",
                &id(who),
                "--parent-id",
                &id("/node/gpu-0"),
                "--selector",
                &format!("unix:path:{}", exe.display()),
            ]);
        }
        let allow = format!(
            "[[allow]]\npeer = \"{}\"\ndataset = \"scans\"\nactions = [\"read\", \"write\"]\n",
            id("/gpu/loader"),
        );
        let storage = d.node_dir("storage", Some(&d.token("/node/storage")), &allow);
        let storage = AgentNode::start(&storage);
        let sidecar = format!(
            "[sidecar]\nsocket = \"run/data.sock\"\nstorage = [\"{}\"]\nmemory_size = \"1GiB\"\ncache_size = \"2GiB\"\n{settings}",
            storage.quic
        );
        let gpu = d.node_dir("gpu-0", Some(&d.token("/node/gpu-0")), &sidecar);
        let gpu = AgentNode::start(&gpu);
        let socket = gpu.dir.join("run/data.sock").display().to_string();
        let site = Self {
            storage,
            gpu,
            socket,
            bin,
            script,
        };
        // The agent holds the loader's SVID once its entry synced.
        wait_for(
            "the loader's SVID at the sidecar",
            Duration::from_secs(20),
            || {
                let out = site.call("reader", &[r#"{"op":"datasets"}"#]);
                out.status.success() && answers(&out)[0]["answer"]["answer"] == "datasets"
            },
        );
        site
    }

    fn caller(&self, exe: &str, reqs: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join(exe));
        cmd.arg(&self.script)
            .args(reqs)
            .env("SIDECAR", &self.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn call(&self, exe: &str, reqs: &[&str]) -> Output {
        self.caller(exe, reqs).output().unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.gpu.admin_get("/metrics");
        metric(&body, name).unwrap_or_else(|| panic!("{name} not exported"))
    }
}

/// The answers a caller printed (its `working` lines left out).
fn answers(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("working").is_none())
        .collect()
}

fn fetch(object: &str) -> String {
    format!(r#"{{"op":"fetch","dataset":"scans","object":"{object}"}}"#)
}

fn transfers_of(storage: &AgentNode, object: &str) -> Vec<Value> {
    storage
        .trail("transfer")
        .into_iter()
        .filter(|r| r["object"] == object && r["direction"] == "out")
        .collect()
}

#[test]
fn eight_local_readers_get_one_pull_from_storage_as_the_workload_and_no_copy_through_the_socket() {
    let d = Domain::start("1h");
    let s = SidecarSite::start(&d);
    let file = s.storage.dir.join("datasets/scans/shard-0.bin");
    let data = write_data(&file, 256 << 20, 31);
    let want = p(&file).to_owned();
    let readers: Vec<Child> = (0..8)
        .map(|_| {
            s.caller("reader", &["--expect", &want, &fetch("shard-0.bin")])
                .spawn()
                .unwrap()
        })
        .collect();
    for r in readers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let a = &answers(&out)[0];
        assert_eq!(a["answer"]["answer"], "mapped", "{a}");
        assert_eq!(a["mapped"], data.len() as u64, "{a}");
        assert_eq!(a["identical"], true, "{a}");
        assert_eq!(
            a["writable"], false,
            "the caller could change the shared object"
        );
        // The frame alone crossed the socket: a sliver of the 256 MiB.
        let through = a["through"].as_u64().unwrap();
        assert!(through < 1024, "{through} bytes through the socket");
    }
    // The storage node served its bytes once, to the workload, not to the GPU node.
    let pulls = transfers_of(&s.storage, "shard-0.bin");
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert_eq!(pulls[0]["peer"], id("/gpu/loader"), "{pulls:?}");
    assert_eq!(pulls[0]["bytes"], data.len() as u64);
    // The GPU node's trail has each reader's request, and whence it was served.
    let local: Vec<Value> = s
        .gpu
        .trail("local_request")
        .into_iter()
        .filter(|r| r["op"] == "fetch")
        .collect();
    assert_eq!(local.len(), 8, "{local:?}");
    assert!(local.iter().all(|r| r["id"] == id("/gpu/loader")
        && r["outcome"] == "ok"
        && r["bytes"] == data.len() as u64
        && r["pid"].is_u64()));
    let network = local.iter().filter(|r| r["source"] == "network").count();
    assert_eq!(network, 1, "{local:?}");
    assert_eq!(s.metric("transportd_sidecar_cache_misses_total"), 1.0);
    assert_eq!(s.metric("transportd_sidecar_cache_hits_total"), 7.0);
    let handed = |source: &str| {
        s.metric(&format!(
            "transportd_sidecar_handed_bytes_total{{source=\"{source}\"}}"
        ))
    };
    assert_eq!(handed("network"), data.len() as f64);
    assert_eq!(handed("memory"), 7.0 * data.len() as f64);
    let socket_bytes = s.metric("transportd_sidecar_socket_bytes_total");
    assert!(socket_bytes < 8.0 * 1024.0, "{socket_bytes}");
}

#[test]
fn unregistered_callers_get_permission_denied_and_denied_workloads_not_found_even_when_cached_or_pushing()
 {
    let d = Domain::start("1h");
    let s = SidecarSite::start(&d);
    write_data(&s.storage.dir.join("datasets/scans/a.bin"), 3 << 20, 32);
    // The reader's pull puts the object in the cache.
    let out = s.call("reader", &[&fetch("a.bin")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(answers(&out)[0]["answer"]["answer"], "mapped");
    // No entry for this executable: refused before anything else, and nothing handed over.
    let denied = s.metric("transportd_sidecar_local_denied_total");
    let out = s.call("stranger", &[&fetch("a.bin")]);
    let a = &answers(&out)[0];
    assert_eq!(a["answer"]["code"], "permission_denied", "{a}");
    assert!(a.get("mapped").is_none(), "{a}");
    // An entry, but the storage node's policy has no rule for it: not found, although the
    // very object is in the cache from the reader's pull. Likewise a small read.
    let read = r#"{"op":"read","dataset":"scans","object":"a.bin","start":0,"end":100}"#;
    let out = s.call("intruder", &[&fetch("a.bin"), read]);
    let got = answers(&out);
    for a in &got {
        assert_eq!(a["answer"]["code"], "not_found", "{a}");
        assert!(a.get("mapped").is_none(), "{a}");
        assert_eq!(a["answer"].get("body"), None, "{a}");
    }
    assert_eq!(got.len(), 2);
    // Both refusals are on the GPU node's trail, with who asked.
    let local = s.gpu.trail("local_request");
    assert!(
        local
            .iter()
            .any(|r| r["outcome"] == "permission_denied" && r.get("id").is_none())
    );
    assert!(
        local
            .iter()
            .any(|r| r["outcome"] == "not_found" && r["id"] == id("/gpu/intruder"))
    );
    assert_eq!(
        s.metric("transportd_sidecar_local_denied_total"),
        denied + 1.0
    );
    // Pushes too go as the caller: the reader's is stored, the intruder's refused.
    let src = d.path("upload.bin");
    let data = write_data(&src, (2 << 20) + 5, 34);
    let push = |object: &str| {
        format!(
            r#"{{"op":"push","dataset":"scans","object":"{object}","_file":"{}"}}"#,
            p(&src)
        )
    };
    let out = s.call("intruder", &[&push("intruded.bin")]);
    assert_eq!(answers(&out)[0]["answer"]["code"], "not_found");
    assert!(!s.storage.dir.join("datasets/scans/intruded.bin").exists());
    let out = s.call("reader", &[&push("pushed.bin")]);
    let a = &answers(&out)[0];
    assert_eq!(a["answer"]["answer"], "pushed", "{a}");
    assert_eq!(a["answer"]["size"], data.len() as u64);
    let stored = std::fs::read(s.storage.dir.join("datasets/scans/pushed.bin")).unwrap();
    assert!(stored == data, "the pushed object differs");
    let writes: Vec<Value> = s
        .storage
        .trail("transfer")
        .into_iter()
        .filter(|r| r["object"] == "pushed.bin" && r["direction"] == "in")
        .collect();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0]["peer"], id("/gpu/loader"));

    // A caller with no entry that keeps asking is refused every time, but fills no trail:
    // its uid's first refusal of the window is recorded on its own (above, or the loader's
    // while its SVID was on the way: same uid), the rest are counted into one record,
    // written when the window ends or, here, when the node stops. None goes unaccounted.
    let flood: u32 = 20;
    for _ in 0..flood {
        let out = s.call("stranger", &[&fetch("a.bin")]);
        assert_eq!(answers(&out)[0]["answer"]["code"], "permission_denied");
    }
    let refused = s.metric("transportd_sidecar_local_denied_total");
    assert_eq!(refused, denied + 1.0 + f64::from(flood));
    let mut s = s;
    s.gpu.stop();
    let alone = s
        .gpu
        .trail("local_request")
        .iter()
        .filter(|r| r["outcome"] == "permission_denied")
        .count();
    assert_eq!(alone, 1, "one record on its own per uid and window");
    let counted = s.gpu.trail("local_requests_refused");
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert_eq!(counted[0]["uid"], rustix::process::geteuid().as_raw());
    let count = counted[0]["count"].as_u64().unwrap();
    assert!(count >= u64::from(flood), "{counted:?}");
    assert_eq!(count + alone as u64, refused as u64, "{counted:?}");
}

/// A decision is reused for its TTL (30 s here), but never past a policy change the storage
/// node reports: once the reader's rule is gone, its next fetch of the object it holds in
/// memory is refused, well inside the TTL.
#[test]
fn a_storage_policy_change_reaches_callers_at_once_though_their_decision_is_fresh() {
    let d = Domain::start("1h");
    let s = SidecarSite::start(&d);
    write_data(&s.storage.dir.join("datasets/scans/b.bin"), 2 << 20, 35);
    let started = SystemClock.instant();
    let out = s.call("reader", &[&fetch("b.bin"), &fetch("b.bin")]);
    let got = answers(&out);
    assert!(
        got.iter().all(|a| a["answer"]["answer"] == "mapped"),
        "{got:?}"
    );
    // The storage node drops the reader's rule (its config carries the rules; SIGHUP
    // reloads them).
    let config = s.storage.dir.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without = text.replace(
        &format!("peer = \"{}\"", id("/gpu/loader")),
        &format!("peer = \"{}\"", id("/gpu/someone-else")),
    );
    assert_ne!(text, without);
    std::fs::write(&config, without).unwrap();
    let loaded = s.storage.trail("policy_loaded").len();
    let pid = rustix::process::Pid::from_raw(s.storage.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    wait_for(
        "the storage node's new policy",
        Duration::from_secs(10),
        || s.storage.trail("policy_loaded").len() > loaded,
    );
    wait_for(
        "the refusal at the sidecar",
        Duration::from_secs(10),
        || {
            let out = s.call("reader", &[&fetch("b.bin")]);
            answers(&out)[0]["answer"]["code"] == "not_found"
        },
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "only after {took:?}: the TTL, not the change"
    );
}

#[test]
fn no_plaintext_reaches_the_nodes_disk_and_a_restart_empties_the_cache() {
    let d = Domain::start("1h");
    let mut s = SidecarSite::start(&d);
    let canary: Vec<u8> = b"PHI-CANARY-7f3a9c-"
        .iter()
        .copied()
        .cycle()
        .take(6 << 20)
        .collect();
    let file = s.storage.dir.join("datasets/scans/canary.bin");
    std::fs::write(&file, &canary).unwrap();
    let out = s.call("reader", &["--expect", p(&file), &fetch("canary.bin")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(answers(&out)[0]["identical"], true);
    let cache = s.gpu.dir.join("agent/sidecar-cache");
    let sealed = files_under(&cache);
    assert!(!sealed.is_empty(), "the cache holds nothing");
    let held: u64 = sealed.iter().map(|f| f.metadata().unwrap().len()).sum();
    assert!(held >= canary.len() as u64, "{held} bytes sealed");
    // Nowhere under the GPU node's directory, nor in the machine's temporary directories.
    let needle = b"PHI-CANARY-7f3a9c-PHI-CANARY";
    // The test's whole tree (both nodes, the callers' directory) but the storage node's
    // datasets, and the machine's shared memory and long-lived temporary directory.
    let mut searched = files_under(d.dir.path());
    for tmp in ["/var/tmp", "/dev/shm"] {
        searched.extend(files_under(Path::new(tmp)));
    }
    let found: Vec<&PathBuf> = searched
        .iter()
        .filter(|f| !f.starts_with(s.storage.dir.join("datasets")))
        .filter(|f| contains(f, needle))
        .collect();
    assert!(found.is_empty(), "plaintext in {found:?}");
    // The control: the search finds the canary where it is in plaintext.
    assert!(contains(&file, needle));
    // A restart loses the key: the cache is empty, and the next fetch goes to storage.
    s.gpu.stop();
    s.gpu = AgentNode::start(&s.gpu.dir);
    assert!(files_under(&cache).is_empty(), "{:?}", files_under(&cache));
    wait_for(
        "the sidecar after its restart",
        Duration::from_secs(20),
        || {
            let out = s.call("reader", &["--expect", p(&file), &fetch("canary.bin")]);
            out.status.success() && answers(&out)[0]["identical"] == true
        },
    );
    assert_eq!(transfers_of(&s.storage, "canary.bin").len(), 2);
}

/// `transportd pull --sidecar` (the Rust client, `SidecarClient`): a sidecar killed in the
/// middle of its fetch leaves the command a typed, retriable error (exit 75, saying to
/// retry), and the same command succeeds once the node is back.
#[test]
fn a_sidecar_killed_mid_fetch_leaves_its_caller_a_clear_loss_and_serves_once_restarted() {
    let d = Domain::start("1h");
    let mut s = SidecarSite::start(&d);
    let file = s.storage.dir.join("datasets/scans/big.bin");
    let data = write_data(&file, 512 << 20, 33);
    let dest = d.path("pulled/big.bin");
    let pull = || {
        let mut c = bin();
        c.args([
            "pull",
            "--sidecar",
            &s.socket,
            "--json",
            "scans/big.bin",
            p(&dest),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    };
    let caller = pull().spawn().unwrap();
    // Killed while the storage node is still sending.
    wait_for("the fetch under way", Duration::from_secs(30), || {
        let (_, body) = s.storage.admin_get("/metrics");
        metric(&body, "transportd_store_read_bytes_total").unwrap_or(0.0) > 0.0
    });
    let _ = s.gpu.child.kill();
    let _ = s.gpu.child.wait();
    let out = caller.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not running or was restarted, retry"),
        "{}",
        stderr(&out)
    );
    assert!(!dest.exists(), "a partial object under its name");
    s.gpu = AgentNode::start(&s.gpu.dir);
    wait_for(
        "the same pull after the restart",
        Duration::from_secs(60),
        || pull().output().unwrap().status.success(),
    );
    assert!(std::fs::read(&dest).unwrap() == data, "bytes differ");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

fn contains(file: &Path, needle: &[u8]) -> bool {
    // Files past 1 GiB are not ours (the test writes none).
    let small = file.metadata().is_ok_and(|m| m.len() < 1 << 30);
    small && std::fs::read(file).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
}

#[test]
fn idle_or_stalled_callers_cannot_keep_others_out_and_a_slow_answer_is_heard_working() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let d = Domain::start("1h");
    let s = SidecarSite::start_with(&d, "idle_timeout = \"1s\"\nmax_callers = 2\n");
    let datasets = r#"{"op":"datasets"}"#;
    let wait_closed = |c: &mut UnixStream| {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 64];
        // End of file: the daemon closed it (a timeout here would be an error).
        c.read(&mut b)
            .expect("closed by the sidecar, not left open")
    };
    // Two connections that never ask take both slots...
    wait_for("no caller connected", Duration::from_secs(10), || {
        s.metric("transportd_sidecar_local_callers") == 0.0
    });
    let mut idle: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&s.socket).unwrap())
        .collect();
    wait_for("both slots taken", Duration::from_secs(10), || {
        s.metric("transportd_sidecar_local_callers") == 2.0
    });
    // ... so the next caller is told `busy` at once rather than left waiting ...
    let turned = answers(&s.call("reader", &[datasets]));
    assert_eq!(turned[0]["answer"]["code"], "busy", "{turned:?}");
    assert!(s.metric("transportd_sidecar_local_busy_total") >= 1.0);
    // ... until the sidecar closes the idle ones, after which callers are served again.
    for c in &mut idle {
        assert_eq!(wait_closed(c), 0);
    }
    wait_for("the slots given back", Duration::from_secs(10), || {
        s.metric("transportd_sidecar_local_callers") == 0.0
    });
    let served = answers(&s.call("reader", &[datasets]));
    assert_eq!(served[0]["answer"]["answer"], "datasets", "{served:?}");
    // A request that stops part-way is closed too (within the idle timeout here).
    let mut half = UnixStream::connect(&s.socket).unwrap();
    half.write_all(&[0, 0]).unwrap();
    assert_eq!(wait_closed(&mut half), 0);
    assert!(s.metric("transportd_sidecar_local_timeouts_total") >= 3.0);

    // The storage node stops answering (SIGSTOP) under a fetch: the caller keeps hearing
    // that its request is in hand, and gets the object once the node answers again.
    let file = s.storage.dir.join("datasets/scans/slow.bin");
    write_data(&file, 1 << 20, 35);
    let pid = rustix::process::Pid::from_raw(s.storage.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let mut slow = s
        .caller("reader", &["--expect", p(&file), &fetch("slow.bin")])
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(slow.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["working"],
        1,
        "{first}"
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(slow.wait().unwrap().success(), "{rest}");
    let last: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(last["answer"]["answer"], "mapped", "{rest}");
    assert_eq!(last["identical"], true, "{rest}");
}
