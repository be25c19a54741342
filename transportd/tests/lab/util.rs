//! A lab with a storage host running the real `transportd node`, a GPU host for client
//! commands, and optional extra hosts. Its files (trust domain, configs, data, audit trail)
//! live in the lab's artifacts directory, which netlab keeps when a test fails, with the
//! hosts' process logs and captures.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use netlab::{Host, Lab, Process};
use serde_json::Value;

use crate::common::{NODE_TOML, Site, p};

pub const BIN: &str = env!("CARGO_BIN_EXE_transportd");

pub struct LabSite {
    pub lab: Lab,
    pub site: Site,
    pub node: Option<Process>,
}

impl LabSite {
    /// Hosts `storage` and `gpu`, then `extra`; the node's configuration is NODE_TOML with
    /// its addresses on the storage host, passed through `tweak`.
    pub fn new(name: &str, extra: &[&str], tweak: impl Fn(String) -> String) -> Self {
        let mut b = Lab::builder(name).host("storage").host("gpu");
        for h in extra {
            b = b.host(h);
        }
        let lab = b.build().expect("building the lab (needs root)");
        let site = Site::new_in(&lab.artifacts_dir().join("site"));
        let addr = lab.host("storage").unwrap().addr();
        let toml = NODE_TOML
            .replace("quic = \"127.0.0.1:0\"", &format!("quic = \"{addr}:7443\""))
            .replace("tcp = \"127.0.0.1:0\"", &format!("tcp = \"{addr}:7443\""))
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{addr}:9464\""),
            );
        std::fs::write(site.config(), tweak(toml)).unwrap();
        Self {
            lab,
            site,
            node: None,
        }
    }

    pub fn host(&self, name: &str) -> &Host {
        self.lab.host(name).unwrap()
    }

    /// The node's address for clients.
    pub fn node_addr(&self) -> String {
        format!("{}:7443", self.host("storage").addr())
    }

    /// Starts the node on the storage host and waits until it listens.
    pub fn start_node(&mut self) -> &Process {
        let node = self
            .host("storage")
            .process(BIN)
            .args(["node", "--config", p(&self.site.config())])
            .env("TRANSPORTD_LOG", "info")
            .spawn()
            .unwrap();
        wait_listening(&node, 0);
        self.node = Some(node);
        self.node.as_ref().unwrap()
    }

    /// Restarts the node's process (same command line) and waits until it listens again.
    pub fn restart_node(&self) {
        let node = self.node.as_ref().unwrap();
        let before = count_listening(&node.log());
        node.restart().unwrap();
        wait_listening(node, before);
    }

    pub fn node(&self) -> &Process {
        self.node.as_ref().unwrap()
    }

    /// `transportd CMD --node ... --identity WHO ARGS...` run to completion on `host`.
    pub fn client(&self, host: &str, who: &str, cmd: &str, args: &[&str]) -> Output {
        self.client_command(host, who, cmd, args).output().unwrap()
    }

    /// The same, as a supervised background process.
    pub fn client_process(&self, host: &str, who: &str, cmd: &str, args: &[&str]) -> Process {
        self.host(host)
            .process(BIN)
            .arg(cmd)
            .args([
                "--node",
                &self.node_addr(),
                "--identity",
                p(&self.site.path(who)),
            ])
            .args(args)
            .spawn()
            .unwrap()
    }

    fn client_command(
        &self,
        host: &str,
        who: &str,
        cmd: &str,
        args: &[&str],
    ) -> std::process::Command {
        let mut c = self.host(host).command(BIN);
        c.arg(cmd)
            .args([
                "--node",
                &self.node_addr(),
                "--identity",
                p(&self.site.path(who)),
            ])
            .args(args);
        c
    }

    /// A file in the storage node's dataset directory.
    pub fn dataset_file(&self, rel: &str) -> PathBuf {
        self.site.path(&format!("storage/datasets/{rel}"))
    }

    /// The node's audit records.
    pub fn trail(&self) -> Vec<Value> {
        libtransport::audit::query(&self.site.path("storage/audit"), &Default::default()).unwrap()
    }

    /// Polls the trail (up to `within`) until refusals before authentication from `ip`, of
    /// kind `class` or of any kind, account for `want`; returns how many they account for.
    /// The node records the first of a refusal window on its own and counts the rest into
    /// one `connections_refused` record at the window's end (NODE_TOML sets it to 1 s).
    #[allow(clippy::disallowed_methods)] // A deadline, not a measurement.
    pub fn wait_refusals(
        &self,
        ip: impl Into<std::net::IpAddr>,
        class: Option<&str>,
        want: u64,
        within: Duration,
    ) -> u64 {
        let ip = ip.into();
        let deadline = std::time::Instant::now() + within;
        loop {
            let n = refusals_from(&self.trail(), ip, class);
            if n >= want || std::time::Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Refusals before authentication from `ip` that `trail` accounts for: each
/// `connection_refused` on its own, plus the counts of `connections_refused`.
pub fn refusals_from(trail: &[Value], ip: impl Into<std::net::IpAddr>, class: Option<&str>) -> u64 {
    let ip = ip.into();
    let kind = |r: &Value| class.is_none_or(|c| r["class"] == c);
    let from = |a: &Value| {
        a.as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|a| a.ip() == ip)
    };
    trail
        .iter()
        .map(|r| match r["event"].as_str() {
            Some("connection_refused") if kind(r) && from(&r["addr"]) => 1,
            Some("connections_refused") if kind(r) && r["source"] == ip.to_string().as_str() => {
                r["count"].as_u64().unwrap_or(0)
            }
            _ => 0,
        })
        .sum()
}

fn count_listening(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"event\":\"listening\""))
        .count()
}

fn wait_listening(node: &Process, before: usize) {
    for _ in 0..300 {
        if count_listening(&node.log()) > before {
            return;
        }
        assert!(node.is_running(), "the node exited:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the node did not listen within 15 s:\n{}", node.log());
}

/// Waits until a file in `dir` whose name starts with `prefix` (a transfer's partial file,
/// pre-sized and sparse) holds at least `bytes` on disk: the transfer is under way, with
/// data landed, rather than merely started.
pub fn wait_landed(dir: &std::path::Path, prefix: &str, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let landed = || {
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name();
            let m = e.metadata().ok()?;
            (name.to_string_lossy().starts_with(prefix) && m.blocks() * 512 >= bytes).then_some(())
        })
    };
    let start = libtransport::clock::Clock::instant(&libtransport::clock::SystemClock);
    while landed().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {prefix}* in {} with {bytes} bytes landed within 60 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a background process to end, up to `limit`.
pub fn wait_exit(p: &Process, limit: Duration) -> std::process::ExitStatus {
    p.wait_timeout(limit)
        .unwrap()
        .unwrap_or_else(|| panic!("still running after {limit:?}:\n{}", p.log()))
}

/// The report a client command printed with --json (the last JSON line of its log).
pub fn report(log: &str) -> Value {
    log.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.is_object())
        })
        .unwrap_or_else(|| panic!("no JSON report in:\n{log}"))
}

/// Resident set high-water mark of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = libtransport::clock::Clock::instant(&libtransport::clock::SystemClock);
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
