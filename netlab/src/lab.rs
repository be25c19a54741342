//! The lab: builds hosts (one network namespace each) joined by veth pairs to one bridge in a
//! namespace of its own, on a private subnet, and owns all of it. Dropping a [`Lab`] tears
//! everything down (processes, namespaces, bridge, tmpfs mounts), also while a test panics;
//! the artifacts directory (process logs, pcaps) is kept when the lab is dropped during a
//! panic, and removed otherwise.
//!
//! Names, ids and subnets are derived in `netns.rs` and `link.rs`; what runs on a host is in
//! `node.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::capture::{Capture, CaptureError};
use crate::fault::{self, FaultError};
use crate::link::{self, BRIDGE_IFACE, LinkError, MAX_HOSTS, Subnet};
use crate::netns::{self, LabId, NetnsError};
use crate::node::{Host, HostParts, Registry};

/// A lab of hosts on one bridge; see the crate docs for a quick start.
#[derive(Debug)]
pub struct Lab {
    id: LabId,
    name: String,
    subnet: Subnet,
    dir: PathBuf,
    bridge_netns: String,
    hosts: Vec<Host>,
    registry: Arc<Registry>,
    /// Namespaces created so far, in creation order (bridge first).
    created: Vec<String>,
    keep_artifacts: AtomicBool,
    next_capture: AtomicUsize,
    torn_down: bool,
}

/// Describes a lab to build; see [`Lab::builder`].
#[derive(Debug, Clone)]
#[must_use = "a LabBuilder does nothing until built"]
pub struct LabBuilder {
    name: String,
    hosts: Vec<HostConfig>,
    mtu: u32,
    artifacts_root: Option<PathBuf>,
}

/// One host to build: its name and link settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    name: String,
    mtu: Option<u32>,
}

/// Why a lab cannot be built here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// Network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
    #[error(
        "netlab needs root to create network namespaces (running as uid {uid}); run the lab tests as root, e.g. with sudo"
    )]
    NotRoot {
        /// The effective uid we run as.
        uid: u32,
    },
    /// A host name is not usable.
    #[error(
        "host name {name:?} {reason}: use 1 to {MAX_HOST_NAME} characters from a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    InvalidHostName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two hosts have the same name.
    #[error("two hosts are named {name:?}: give each host its own name")]
    DuplicateHost {
        /// The name.
        name: String,
    },
    /// Too few or too many hosts.
    #[error("a lab needs 1 to {MAX_HOSTS} hosts, not {count}")]
    HostCount {
        /// How many were asked for.
        count: usize,
    },
    /// Creating a namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Creating the bridge or a link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Installing the fault chains failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The artifacts directory could not be created.
    #[error("cannot create the lab's artifacts directory {path}: {source}")]
    Artifacts {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A lab was not completely torn down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lab {lab} was not fully torn down: {}; look with `ip netns list` and remove what is left with `ip netns delete`, or call netlab::sweep_stale() once this process has exited",
    problems.join("; ")
)]
pub struct TeardownError {
    /// The lab's name.
    pub lab: String,
    /// What went wrong, one entry per failed step.
    pub problems: Vec<String>,
}

impl Lab {
    /// Starts describing a lab. `name` (e.g. the test's name) goes into the artifacts
    /// directory's name, `<target>/netlab/<name>-<id>`.
    pub fn builder(name: &str) -> LabBuilder {
        LabBuilder {
            name: sanitize(name),
            hosts: Vec::new(),
            mtu: DEFAULT_MTU,
            artifacts_root: None,
        }
    }

    /// The lab's name: the builder's name and the lab id, `<name>-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab's id, unique among live labs on this machine.
    pub fn id(&self) -> LabId {
        self.id
    }

    /// The lab's private subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The hosts, in the order they were added.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host of this name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name() == name)
    }

    /// The namespace that holds the bridge (`br0`).
    pub fn bridge_netns(&self) -> &str {
        &self.bridge_netns
    }

    /// Every namespace of the lab: the bridge's, then the hosts'.
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// Where the lab keeps process logs and pcaps.
    pub fn artifacts_dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the artifacts directory after teardown even if nothing panicked.
    pub fn keep_artifacts(&self) {
        self.keep_artifacts.store(true, Ordering::Relaxed);
    }

    /// Starts a capture on the bridge, which every frame between hosts crosses, into
    /// `<artifacts>/bridge-<n>.pcap`.
    pub fn capture(&self) -> Result<Capture, CaptureError> {
        let n = self.next_capture.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("bridge-{n}.pcap"));
        Capture::start(&self.bridge_netns, BRIDGE_IFACE, path)
    }

    /// Tears the lab down now and says whether everything went. Dropping does the same but
    /// can only print its problems.
    pub fn teardown(mut self) -> Result<(), TeardownError> {
        let problems = self.teardown_inner();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TeardownError {
                lab: self.name.clone(),
                problems,
            })
        }
    }

    /// Kills every process, deletes every namespace (taking bridge and veths along), ends
    /// the tmpfs holders, gives the id back and removes or keeps the artifacts. Runs once.
    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut problems = Vec::new();
        self.registry.kill_all();
        // Newest first: hosts, then the bridge (and its captures).
        for name in self.created.iter().rev() {
            if let Err(e) = netns::kill_all_in(name) {
                problems.push(e.to_string());
            }
        }
        for host in &self.hosts {
            if let Some(mut holder) = host.holder().take() {
                holder.stop();
            }
        }
        let mut deleted = true;
        for name in self.created.iter().rev() {
            if let Err(e) = netns::delete(name) {
                deleted = false;
                problems.push(e.to_string());
            }
        }
        // A lock whose namespaces could not be deleted stays, so sweep_stale() finds them
        // once we are gone.
        if deleted && let Err(e) = self.id.release() {
            problems.push(e.to_string());
        }
        let keep = self.keep_artifacts.load(Ordering::Relaxed)
            || std::thread::panicking()
            || !problems.is_empty();
        if keep {
            eprintln!(
                "netlab: kept the artifacts of lab {} (logs, pcaps) in {}",
                self.name,
                self.dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        problems
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let problems = self.teardown_inner();
        if !problems.is_empty() {
            eprintln!(
                "netlab: {}",
                TeardownError {
                    lab: self.name.clone(),
                    problems,
                }
            );
        }
    }
}

impl LabBuilder {
    /// Adds a host with the lab's default link settings.
    pub fn host(mut self, name: &str) -> Self {
        self.hosts.push(HostConfig::new(name));
        self
    }

    /// Adds a host with its own settings.
    pub fn host_config(mut self, config: HostConfig) -> Self {
        self.hosts.push(config);
        self
    }

    /// The MTU of hosts that do not set their own (default 1500).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Where to put the lab's artifacts directory. By default `<target>/netlab`, found from
    /// the running executable (the cargo target directory holding `CACHEDIR.TAG`), else
    /// `<temp>/netlab`.
    pub fn artifacts_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.artifacts_root = Some(dir.into());
        self
    }

    /// Builds the lab: checks privileges, sweeps debris of dead labs, reserves an id, and
    /// creates bridge, hosts and links. On failure, whatever was created is torn down.
    pub fn build(self) -> Result<Lab, LabError> {
        crate::preflight()?;
        validate_hosts(&self.hosts)?;
        // Debris of crashed runs only; labs of live processes are left alone. A failure
        // here does not stop this lab, which uses names of its own.
        let _ = netns::sweep_stale();
        let id = LabId::reserve()?;
        let name = format!("{}-{id}", self.name);
        let root = self.artifacts_root.unwrap_or_else(default_artifacts_root);
        let mut lab = Lab {
            id,
            subnet: Subnet::for_lab(id),
            dir: root.join(&name),
            name,
            bridge_netns: id.bridge_netns(),
            hosts: Vec::new(),
            registry: Arc::default(),
            created: Vec::new(),
            keep_artifacts: AtomicBool::new(false),
            next_capture: AtomicUsize::new(0),
            torn_down: false,
        };
        // From here on, an early return drops `lab`, which tears down what exists.
        let _ = std::fs::remove_dir_all(&lab.dir);
        std::fs::create_dir_all(&lab.dir).map_err(|source| LabError::Artifacts {
            path: lab.dir.clone(),
            source,
        })?;
        lab.created.push(lab.bridge_netns.clone());
        netns::create(&lab.bridge_netns)?;
        link::create_bridge(&lab.bridge_netns)?;
        for (index, config) in self.hosts.iter().enumerate() {
            let host_netns = id.host_netns(index);
            lab.created.push(host_netns.clone());
            netns::create(&host_netns)?;
            let dir = lab.dir.join(&config.name);
            std::fs::create_dir_all(&dir).map_err(|source| LabError::Artifacts {
                path: dir.clone(),
                source,
            })?;
            // validate_hosts capped the count at MAX_HOSTS, so every index has an address.
            let addr = lab
                .subnet
                .host_addr(index)
                .ok_or(LabError::HostCount { count: index + 1 })?;
            let port = link::port_name(index, &config.name);
            link::connect(
                &host_netns,
                &lab.bridge_netns,
                &port,
                addr,
                lab.subnet,
                config.mtu.unwrap_or(self.mtu),
            )?;
            let host = Host::new(HostParts {
                name: config.name.clone(),
                index,
                addr,
                netns: host_netns,
                bridge_netns: lab.bridge_netns.clone(),
                port,
                dir,
                registry: Arc::clone(&lab.registry),
            });
            fault::install(&host)?;
            lab.hosts.push(host);
        }
        Ok(lab)
    }
}

impl HostConfig {
    /// A host called `name` (1 to 32 characters from a-z, 0-9, '-' and '_').
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            mtu: None,
        }
    }

    /// The MTU of this host's link (both ends of its veth).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }
}

fn validate_hosts(hosts: &[HostConfig]) -> Result<(), LabError> {
    if hosts.is_empty() || hosts.len() > MAX_HOSTS {
        return Err(LabError::HostCount { count: hosts.len() });
    }
    for (i, host) in hosts.iter().enumerate() {
        check_host_name(&host.name)?;
        if hosts[..i].iter().any(|h| h.name == host.name) {
            return Err(LabError::DuplicateHost {
                name: host.name.clone(),
            });
        }
    }
    Ok(())
}

fn check_host_name(name: &str) -> Result<(), LabError> {
    let invalid = |reason| {
        Err(LabError::InvalidHostName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_HOST_NAME {
        return invalid("has the wrong length");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return invalid("has characters other than a-z, 0-9, '-' and '_'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return invalid("does not start with a letter or digit");
    }
    Ok(())
}

/// A lab name fit for a directory: unsafe characters become '_', long names are cut.
fn sanitize(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_LAB_NAME)
        .collect();
    if clean.is_empty() {
        "lab".into()
    } else {
        clean
    }
}

/// `<cargo target dir>/netlab`, else `<temp>/netlab`.
fn default_artifacts_root() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| target_dir_of(&exe))
        .unwrap_or_else(std::env::temp_dir)
        .join("netlab")
}

/// The nearest ancestor holding cargo's `CACHEDIR.TAG`, i.e. the target directory.
fn target_dir_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

/// The MTU of hosts that do not set one: plain Ethernet.
const DEFAULT_MTU: u32 = 1500;
/// Host names are short; they go into interface and file names.
const MAX_HOST_NAME: usize = 32;
/// Lab names go into directory names.
const MAX_LAB_NAME: usize = 48;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        assert!(check_host_name("storage-0").is_ok());
        assert!(check_host_name("gpu_1").is_ok());
        for bad in ["", "Storage", "a b", "-x", &"x".repeat(33)] {
            let err = check_host_name(bad).unwrap_err();
            assert!(err.to_string().contains("use 1 to 32"), "{err}");
        }
        let dup = [HostConfig::new("a"), HostConfig::new("a")];
        assert!(matches!(
            validate_hosts(&dup),
            Err(LabError::DuplicateHost { .. })
        ));
        assert!(matches!(
            validate_hosts(&[]),
            Err(LabError::HostCount { count: 0 })
        ));
    }

    #[test]
    fn lab_names_are_made_safe() {
        assert_eq!(sanitize("tests::tcp works/now"), "tests__tcp_works_now");
        assert_eq!(sanitize(""), "lab");
        assert_eq!(sanitize(&"y".repeat(100)).len(), MAX_LAB_NAME);
    }

    #[test]
    fn artifacts_go_under_the_target_dir() {
        let exe = std::env::current_exe().unwrap();
        let target = target_dir_of(&exe).expect("tests run from a cargo target dir");
        assert!(target.join("CACHEDIR.TAG").is_file());
        assert!(default_artifacts_root().ends_with("netlab"));
    }
}
