//! Network namespaces: the lab's id and the namespace names derived from it, reserving an id
//! so that labs in parallel (even in different processes) never collide, creating, emptying
//! and deleting namespaces, moving a thread into one, and sweeping what crashed labs left.
//!
//! Every lab owns the namespaces `nl<id>-br` (its bridge) and `nl<id>-h<index>` (one per
//! host), where `<id>` is four hex digits. An id is taken by creating
//! `/run/netlab/<id>.lock` (holding the owner's pid and start time) *before* any namespace
//! exists, and given back only after all of them are deleted, so a namespace without a live
//! owner is always debris. What runs inside a namespace is `node.rs`'s business.

use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, CmdError};

/// The short id that makes a lab's names and subnet unique on this machine.
///
/// It is 16 bits: the lab's subnet is `10.<high byte>.<low byte>.0/24`, so two labs with
/// different ids never share a subnet, and the reservation (a lock file under `/run/netlab`,
/// taken before any namespace exists) makes sure no two live labs share an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LabId(pub u16);

impl LabId {
    /// Takes a free id: random, skipping any whose lock exists, taken by creating the lock
    /// atomically. Fails when every try found a live lab (or `/run/netlab` is unwritable).
    pub(crate) fn reserve() -> Result<Self, NetnsError> {
        std::fs::create_dir_all(LOCK_DIR).map_err(|source| NetnsError::Lock {
            path: LOCK_DIR.into(),
            source,
        })?;
        let me = std::process::id();
        let contents = format!("{me} {}\n", start_time(me).unwrap_or(0));
        let mut last_error = None;
        for attempt in 0..MAX_RESERVE_ATTEMPTS {
            let id = Self(random_u16(attempt));
            let prefix = id.netns_prefix();
            if list()?.iter().any(|n| n.starts_with(&prefix)) {
                // Namespaces of that id exist (debris not yet swept): leave it alone.
                continue;
            }
            // Write the lock under a private name, then hard-link it into place: the link
            // fails if the lock exists, and a lock is never seen half-written.
            let tmp = Path::new(LOCK_DIR).join(format!("{id}.tmp.{me}.{attempt}"));
            let lock = id.lock_path();
            let taken =
                std::fs::write(&tmp, &contents).and_then(|()| std::fs::hard_link(&tmp, &lock));
            let _ = std::fs::remove_file(&tmp);
            match taken {
                Ok(()) => return Ok(id),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => last_error = Some(NetnsError::Lock { path: lock, source }),
            }
        }
        Err(last_error.unwrap_or(NetnsError::NoFreeId))
    }

    /// Gives the id back. Call only once every namespace of the lab is deleted.
    pub(crate) fn release(self) -> Result<(), NetnsError> {
        let path = self.lock_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetnsError::Lock { path, source }),
        }
    }

    /// The prefix of every namespace of this lab: `nl<id>-`.
    pub fn netns_prefix(self) -> String {
        format!("nl{self}-")
    }

    /// The namespace that holds the lab's bridge.
    pub fn bridge_netns(self) -> String {
        format!("nl{self}-br")
    }

    /// The namespace of the host with this index.
    pub fn host_netns(self, index: usize) -> String {
        format!("nl{self}-h{index}")
    }

    fn lock_path(self) -> PathBuf {
        Path::new(LOCK_DIR).join(format!("{self}.lock"))
    }

    /// Parses the id out of a namespace name made by [`Self::netns_prefix`].
    fn from_netns(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("nl")?;
        let (hex, _) = rest.split_once('-')?;
        if hex.len() != 4 {
            return None;
        }
        u16::from_str_radix(hex, 16).ok().map(Self)
    }
}

impl fmt::Display for LabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}", self.0)
    }
}

/// A namespace operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The lab's lock file could not be written or removed.
    #[error("cannot use the lab lock {path}: {source}; netlab needs a writable /run (run as root)")]
    Lock {
        /// The lock file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Every id tried belongs to a live lab.
    #[error(
        "no free lab id after {MAX_RESERVE_ATTEMPTS} tries; too many labs are alive, or old ones were left behind: see `ip netns list` and {LOCK_DIR}"
    )]
    NoFreeId,
    /// The namespace could not be entered.
    #[error(
        "cannot enter network namespace {netns}: {source}; it is gone (was the lab dropped?) or we lack CAP_SYS_ADMIN"
    )]
    Enter {
        /// The namespace name.
        netns: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Processes inside the namespace would not die.
    #[error("processes {pids:?} in network namespace {netns} survived SIGKILL")]
    Unkillable {
        /// The namespace name.
        netns: String,
        /// Their pids.
        pids: Vec<u32>,
    },
}

/// Removes namespaces (and their processes and locks) left behind by labs whose owning
/// process is gone, e.g. a test binary that was killed. Labs of live processes are left
/// alone, so this is safe while other labs run. Returns the namespaces removed.
///
/// [`crate::Lab`] calls this before building, so debris never piles up.
pub fn sweep_stale() -> Result<Vec<String>, NetnsError> {
    // One sweep at a time on the machine: two sweeps could otherwise both judge an id
    // stale, one release it, a new lab take it, and the other delete the new lab's
    // namespaces from its outdated list.
    let _sweeping = lock_sweeps()?;
    let mut removed = Vec::new();
    let names = list()?;
    let mut ids: Vec<LabId> = names.iter().filter_map(|n| LabId::from_netns(n)).collect();
    if let Ok(entries) = std::fs::read_dir(LOCK_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".lock")
                && let Ok(id) = u16::from_str_radix(hex, 16)
            {
                ids.push(LabId(id));
            }
        }
    }
    ids.sort_by_key(|id| id.0);
    ids.dedup();
    for id in ids {
        if owner_alive(id) {
            continue;
        }
        let prefix = id.netns_prefix();
        for name in names.iter().filter(|n| n.starts_with(&prefix)) {
            kill_all_in(name)?;
            delete(name)?;
            removed.push(name.clone());
        }
        id.release()?;
    }
    Ok(removed)
}

/// Takes the machine-wide sweep lock (released when the guard drops).
fn lock_sweeps() -> Result<Flock<File>, NetnsError> {
    let path = Path::new(LOCK_DIR).join("sweep.lock");
    let lock_error = |source| NetnsError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(lock_error)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_error)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| lock_error(errno.into()))
}

/// Names of all network namespaces on the machine (those under `/run/netns`).
pub(crate) fn list() -> Result<Vec<String>, NetnsError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetnsError::Lock {
                path: NETNS_DIR.into(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Creates a network namespace with its loopback up and IPv6 off (the lab is IPv4; this
/// keeps router solicitations and DAD out of captures).
pub(crate) fn create(name: &str) -> Result<(), NetnsError> {
    cmd::run("ip", &["netns", "add", name])?;
    cmd::ip_in(name, &["link", "set", "lo", "up"])?;
    cmd::exec_in(
        name,
        "sh",
        &[
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ],
        None,
    )?;
    Ok(())
}

/// Deletes a namespace; one that is already gone is fine.
pub(crate) fn delete(name: &str) -> Result<(), NetnsError> {
    if !netns_exists(name) {
        return Ok(());
    }
    match cmd::run("ip", &["netns", "delete", name]) {
        // Someone else (a sweep) deleted it meanwhile: just as good.
        Err(_) if !netns_exists(name) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(()),
    }
}

/// Pids of the processes whose network namespace is `name`.
pub(crate) fn pids_in(name: &str) -> Result<Vec<u32>, NetnsError> {
    if !netns_exists(name) {
        return Ok(Vec::new());
    }
    let out = cmd::run("ip", &["netns", "pids", name])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs every process in the namespace and waits until none is left.
pub(crate) fn kill_all_in(name: &str) -> Result<(), NetnsError> {
    let mut pids = pids_in(name)?;
    for _ in 0..KILL_POLLS {
        if pids.is_empty() {
            return Ok(());
        }
        for &pid in &pids {
            // Already gone is fine; we only care that it is gone.
            let _ = kill(pid_of(pid), Signal::SIGKILL);
        }
        std::thread::sleep(KILL_POLL_INTERVAL);
        pids = pids_in(name)?;
    }
    if pids.is_empty() {
        Ok(())
    } else {
        Err(NetnsError::Unkillable {
            netns: name.to_owned(),
            pids,
        })
    }
}

/// Moves the calling thread into the network namespace `name`. Only this thread moves:
/// call it on a thread of your own, never on a shared (async runtime) worker.
pub(crate) fn enter(name: &str) -> Result<(), NetnsError> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|source| NetnsError::Enter {
        netns: name.to_owned(),
        source,
    })?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
        netns: name.to_owned(),
        source: errno.into(),
    })
}

/// Whether a namespace of that name exists.
pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// A pid in nix's type. Pids fit in `i32` on Linux (`pid_max` is at most 2^22).
pub(crate) fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Whether the process that holds the lab id's lock is still the one that took it.
fn owner_alive(id: LabId) -> bool {
    let Ok(text) = std::fs::read_to_string(id.lock_path()) else {
        return false;
    };
    let mut fields = text.split_whitespace();
    let (Some(pid), Some(started)) = (fields.next(), fields.next()) else {
        return false;
    };
    let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else {
        return false;
    };
    // Same pid and same start time: not a recycled pid.
    start_time(pid) == Some(started)
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A random 16-bit value: std's per-instance random hash keys, mixed with pid and attempt.
fn random_u16(attempt: u32) -> u16 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u32(attempt);
    let v = hasher.finish();
    // Fold the 64 bits down; truncation is the point.
    (v ^ (v >> 16) ^ (v >> 32) ^ (v >> 48)) as u16
}

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Where lab id locks live: on /run so a reboot clears them together with the namespaces.
const LOCK_DIR: &str = "/run/netlab";
/// How many random ids to try before giving up; with 65536 ids, only a machine full of
/// labs exhausts this.
const MAX_RESERVE_ATTEMPTS: u32 = 64;
/// How often to look again for survivors after SIGKILL (50 × 20 ms = 1 s).
const KILL_POLLS: u32 = 50;
/// Pause between looks for survivors.
const KILL_POLL_INTERVAL: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_parse_back() {
        let id = LabId(0x3f9a);
        assert_eq!(id.bridge_netns(), "nl3f9a-br");
        assert_eq!(id.host_netns(12), "nl3f9a-h12");
        assert_eq!(id.netns_prefix(), "nl3f9a-");
        assert!(id.host_netns(999).len() <= 15);
        assert_eq!(LabId::from_netns("nl3f9a-h12"), Some(id));
        assert_eq!(LabId::from_netns("nl3f9a-br"), Some(id));
        assert_eq!(LabId::from_netns("nlx-br"), None);
        assert_eq!(LabId::from_netns("nl3f9ab-br"), None);
        assert_eq!(LabId::from_netns("other"), None);
    }

    #[test]
    fn random_ids_vary() {
        let ids: std::collections::HashSet<u16> = (0..64).map(random_u16).collect();
        assert!(ids.len() > 50, "only {} distinct ids", ids.len());
    }

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }
}
