//! Helpers shared by the tests that run the real `transportd` binary: a trust domain made
//! with the CLI, nodes started as child processes, client arguments.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)] // Each test uses a part.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_transportd"));
    c.env_remove("TRANSPORTD_LOG").stdin(Stdio::null());
    c
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("transportd runs")
}

pub fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "transportd {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn write_data(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = libtransport::test_util::random_bytes(len, seed);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, &data).unwrap();
    data
}

/// A trust domain made with the CLI, a storage node's identity (key made on the node, CSR
/// signed by the CA) and client identities.
pub struct Site {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Site {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut site = Self::new_in(tmp.path());
        site._tmp = Some(tmp);
        site
    }

    /// A site in `dir`, which outlives it (a lab's artifacts directory, kept on failure).
    pub fn new_in(dir: &Path) -> Self {
        let dir = Root(dir.to_path_buf());
        let ca = dir.path().join("ca");
        ok(&[
            "ca",
            "init",
            "--trust-domain",
            "hospital.example",
            "--out",
            p(&ca),
            "--validity",
            "30d",
        ]);
        let node = dir.path().join("storage/identity");
        ok(&[
            "ca",
            "csr",
            "--id",
            "spiffe://hospital.example/node/storage",
            "--out",
            p(&node),
        ]);
        ok(&[
            "ca",
            "issue",
            "--ca",
            p(&ca),
            "--id",
            "spiffe://hospital.example/node/storage",
            "--csr",
            p(&node.join("svid.csr")),
            "--out",
            p(&node),
        ]);
        for client in ["loader", "intruder"] {
            let out = dir.path().join(client);
            ok(&[
                "ca",
                "issue",
                "--ca",
                p(&ca),
                "--id",
                &format!("spiffe://hospital.example/gpu/{client}"),
                "--out",
                p(&out),
            ]);
        }
        std::fs::create_dir_all(dir.path().join("storage/datasets/scans")).unwrap();
        std::fs::create_dir_all(dir.path().join("storage/datasets/checkpoints")).unwrap();
        std::fs::write(dir.path().join("storage/node.toml"), NODE_TOML).unwrap();
        Self {
            root: dir.0,
            _tmp: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("storage/node.toml")
    }
}

struct Root(PathBuf);

impl Root {
    fn path(&self) -> &Path {
        &self.0
    }
}

pub const NODE_TOML: &str = r#"
[identity]
svid = "identity/svid.pem"
key = "identity/svid.key"
bundle = "identity/bundle.pem"

[listen]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"

[store]
root = "datasets"
state_dir = "state"

[audit]
dir = "audit"

[admin]
listen = "127.0.0.1:0"

[[allow]]
peer = "spiffe://hospital.example/gpu/loader"
dataset = "scans"
actions = ["read"]

[[allow]]
peer = "spiffe://hospital.example/gpu/loader"
dataset = "checkpoints"
actions = ["read", "write"]

[limits]
chunk_size = "1MiB"
refusal_window = "1s"
"#;

/// Starts a role (node, issuer) with debug logs into `log` and reads the one JSON line it
/// prints once it serves. Err holds the log of a role that exited instead.
pub fn spawn_ready(mut cmd: Command, log: &Path) -> Result<(Child, Value), String> {
    let mut child = cmd
        .env("TRANSPORTD_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    match serde_json::from_str::<Value>(&line) {
        Ok(ready) => Ok((child, ready)),
        Err(_) => {
            let _ = child.wait();
            Err(std::fs::read_to_string(log).unwrap())
        }
    }
}

/// A running `transportd node`, killed when dropped.
pub struct Node {
    pub child: Child,
    pub quic: String,
    pub tcp: String,
    pub admin: String,
    pub log: PathBuf,
}

impl Node {
    pub fn start(site: &Site) -> Self {
        Self::start_with(site, bin())
    }

    /// Starts the node through `cmd` (the binary, or a wrapper that runs it).
    pub fn start_with(site: &Site, mut cmd: Command) -> Self {
        let log = site.path(&format!("node-{}.log", rand_suffix()));
        cmd.args(["node", "--config", p(&site.config())]);
        let (child, ready) =
            spawn_ready(cmd, &log).unwrap_or_else(|log| panic!("node did not start: {log}"));
        Self {
            child,
            quic: ready["quic"].as_str().unwrap().to_owned(),
            tcp: ready["tcp"].as_str().unwrap().to_owned(),
            admin: ready["admin"].as_str().unwrap_or_default().to_owned(),
            log,
        }
    }

    pub fn addr(&self, path: &str) -> &str {
        if path == "tcp" { &self.tcp } else { &self.quic }
    }

    /// Stops the node with SIGTERM (it drains and seals its audit trail) and waits.
    pub fn stop(&mut self) {
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

    /// GET `path` from the admin endpoint: (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
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

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn client<'a>(site: &'a Site, who: &str, node: &'a Node, path: &'a str) -> Vec<String> {
    vec![
        "--node".into(),
        node.addr(path).into(),
        "--path".into(),
        path.into(),
        "--identity".into(),
        p(&site.path(who)).into(),
    ]
}

/// The loader's library client, quick to notice a dead node (5 s rather than a minute).
pub async fn library_client(
    site: &Site,
    addr: &str,
    path: libtransport::Path,
) -> libtransport::Client {
    let read = |f: &str| std::fs::read_to_string(site.path("loader").join(f)).unwrap();
    let svid = certs::Svid::from_pem(&read("svid.pem"), &read("svid.key")).unwrap();
    let bundle = certs::TrustBundle::from_pem(&read("bundle.pem")).unwrap();
    let mut t = libtransport::TransportConfig::default();
    t.idle_timeout(std::time::Duration::from_secs(5))
        .io_timeout(std::time::Duration::from_secs(5));
    let config = libtransport::ClientConfig::builder()
        .identity(libtransport::IdentityHandle::new(
            libtransport::Credentials::new(svid, bundle).unwrap(),
        ))
        .transport(t)
        .build();
    libtransport::Client::connect(config, addr.parse().unwrap(), path)
        .await
        .unwrap()
}

pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A progress callback that SIGKILLs `node` once a third of the transfer is done.
pub fn kill_at_a_third(node: &Node) -> (Arc<AtomicBool>, Progress) {
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let progress = Arc::new(move |done: u64, total: u64| {
        if done * 3 >= total && !k.swap(true, Ordering::SeqCst) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    });
    (killed, progress)
}

/// The value of an unlabelled metric in a Prometheus text exposition, if it is there.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The chunks of `chunk` bytes that `file` holds exactly as `data` has them.
pub fn intact_chunks(file: &Path, data: &[u8], chunk: usize) -> Vec<usize> {
    let held = std::fs::read(file).unwrap_or_default();
    data.chunks(chunk)
        .enumerate()
        .filter(|(i, c)| held.get(i * chunk..i * chunk + c.len()) == Some(*c))
        .map(|(i, _)| i)
        .collect()
}

/// The partial file in `dir` whose name starts with `prefix` (not a sidecar), if any.
pub fn partial_in(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        (n.starts_with(prefix) && !n.ends_with(".meta")).then(|| e.path())
    })
}

/// The chunks of `chunk` bytes that `file` holds in part: not intact (see
/// [`intact_chunks`]), but with data written (a pre-sized partial file reads zeros where
/// nothing was written, and `data` is random).
pub fn half_chunks(file: &Path, data: &[u8], chunk: usize) -> Vec<usize> {
    let held = std::fs::read(file).unwrap_or_default();
    let intact = intact_chunks(file, data, chunk);
    held.chunks(chunk)
        .enumerate()
        .filter(|(i, c)| !intact.contains(i) && c.iter().any(|b| *b != 0))
        .map(|(i, _)| i)
        .collect()
}

/// The number of chunks of `data` the partial file holds whole, and whether it holds one in
/// part, once they stop changing (data still queued when a connection went may land after
/// its transfer ended), within 30 s.
pub fn settled(partial: &Path, data: &[u8], chunk: usize) -> (u64, bool) {
    let look = || {
        (
            intact_chunks(partial, data, chunk).len() as u64,
            !half_chunks(partial, data, chunk).is_empty(),
        )
    };
    let mut last = look();
    for _ in 0..150 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = look();
        if std::mem::replace(&mut last, now) == now {
            return now;
        }
    }
    panic!("{} kept changing for 30 s", partial.display());
}

/// Runs a client command paced to 4 MiB/s, one chunk at a time over one connection, until
/// the partial file that `find` locates holds `at_least` intact chunks of `data` (and, if
/// `mid_chunk`, a chunk written in part), then kills it with SIGKILL. Returns the partial
/// file's path once it has [`settled`].
pub fn kill_once_landed(
    mut cmd: Command,
    find: impl Fn() -> Option<PathBuf>,
    data: &[u8],
    chunk: usize,
    at_least: usize,
    mid_chunk: bool,
) -> PathBuf {
    let mut child = cmd
        .args([
            "--parallel",
            "1",
            "--connections",
            "1",
            "--max-rate",
            "4MiB",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if find().is_some_and(|f| {
            intact_chunks(&f, data, chunk).len() >= at_least
                && (!mid_chunk || !half_chunks(&f, data, chunk).is_empty())
        }) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the transfer ended before it could be interrupted"
        );
        #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
        let now = std::time::Instant::now();
        assert!(now < deadline, "no {at_least} chunks landed within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let file = find().unwrap();
    settled(&file, data, chunk);
    file
}

/// Polls `f` every 200 ms until it holds, failing the test after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> bool) {
    use libtransport::clock::Clock as _;
    let start = libtransport::clock::SystemClock.instant();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
