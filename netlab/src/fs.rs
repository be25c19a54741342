//! A small filesystem per host that can fill up: a tmpfs of a given size, mounted in a mount
//! namespace of the host's own, so that processes started on the host see it and nothing
//! else on the machine does.
//!
//! The mount namespace is held by a long-lived process (`unshare --mount --propagation
//! private`, then `cat` on a pipe from us: if the test process dies, the pipe closes and the
//! holder exits). Host commands enter it with `nsenter --mount=/proc/<holder>/ns/mnt` before
//! `ip netns exec`. When the holder and every host process are gone, the tmpfs is gone.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::cmd::{self, CmdError};
use crate::node::Host;

/// A host's tmpfs; see [`Host::mount_tmpfs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpFs {
    path: PathBuf,
    holder_pid: u32,
    size_bytes: u64,
}

impl TmpFs {
    /// Where processes on the host see it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The same directory reached from outside the host (from the test itself, or from a
    /// closure run with [`Host::run`]): `/proc/<holder>/root/<path>`. At [`TmpFs::path`] the
    /// outside world sees only an empty directory.
    pub fn outside_path(&self) -> PathBuf {
        let relative = self.path.strip_prefix("/").unwrap_or(&self.path);
        Path::new("/proc")
            .join(self.holder_pid.to_string())
            .join("root")
            .join(relative)
    }

    /// Its size limit in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

/// A host's tmpfs could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The host already has one.
    #[error("host {host} already has a tmpfs at {path}; use it, or build another lab")]
    AlreadyMounted {
        /// The host.
        host: String,
        /// Where its tmpfs is.
        path: PathBuf,
    },
    /// The mount point could not be created.
    #[error("cannot create the mount point {path}: {source}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The mount namespace holder did not come up.
    #[error(
        "the mount namespace holder for host {host} exited before it was ready: {stderr}; netlab needs CAP_SYS_ADMIN and util-linux's unshare"
    )]
    Holder {
        /// The host.
        host: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The size is too small to be useful.
    #[error("tmpfs size {size_bytes} bytes is too small: use at least {MIN_SIZE_BYTES}")]
    TooSmall {
        /// What was asked for.
        size_bytes: u64,
    },
}

impl Host {
    /// Mounts a tmpfs of `size_bytes` at `<host dir>/fs` in the host's own mount namespace,
    /// visible to processes started on the host from now on ([`Host::command`],
    /// [`Host::process`]). Writing past its size fails with `ENOSPC`; deleting files frees
    /// space again. One per host; it goes away with the lab.
    pub fn mount_tmpfs(&self, size_bytes: u64) -> Result<TmpFs, FsError> {
        if size_bytes < MIN_SIZE_BYTES {
            return Err(FsError::TooSmall { size_bytes });
        }
        let mut holder = self.holder();
        if let Some(existing) = holder.as_ref() {
            return Err(FsError::AlreadyMounted {
                host: self.name().to_owned(),
                path: existing.fs.path.clone(),
            });
        }
        let path = self.dir().join("fs");
        std::fs::create_dir_all(&path).map_err(|source| FsError::MountPoint {
            path: path.clone(),
            source,
        })?;
        let mut started = MountHolder::start(self.name())?;
        let pid = started.child.id();
        let mut mount = Command::new("nsenter");
        mount
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .args(["mount", "-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=1777"))
            .arg("netlab")
            .arg(&path);
        if let Err(e) = cmd::output_of(&mut mount, None) {
            started.stop();
            return Err(e.into());
        }
        started.fs = TmpFs {
            path,
            holder_pid: pid,
            size_bytes,
        };
        let fs = started.fs.clone();
        *holder = Some(started);
        Ok(fs)
    }

    /// The host's tmpfs, if [`Host::mount_tmpfs`] made one.
    pub fn tmpfs(&self) -> Option<TmpFs> {
        self.holder().as_ref().map(|h| h.fs.clone())
    }
}

/// The process that holds a host's mount namespace.
#[derive(Debug)]
pub(crate) struct MountHolder {
    child: Child,
    /// Kept open: when it closes (we exit or stop it) the holder's `cat` ends.
    stdin: Option<ChildStdin>,
    fs: TmpFs,
}

impl MountHolder {
    /// Starts a holder and waits until its private mount namespace exists, so nothing is
    /// ever mounted into the machine's own namespace by mistake.
    fn start(host: &str) -> Result<Self, FsError> {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("echo ready; exec cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd::spawn(&mut command)?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        if line.trim() != "ready" {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(FsError::Holder {
                host: host.to_owned(),
                stderr: stderr.trim().to_owned(),
            });
        }
        let stdin = child.stdin.take();
        let holder_pid = child.id();
        Ok(Self {
            child,
            stdin,
            fs: TmpFs {
                path: PathBuf::new(),
                holder_pid,
                size_bytes: 0,
            },
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the holder; once host processes are gone too, the tmpfs is freed.
    pub(crate) fn stop(&mut self) {
        drop(self.stdin.take());
        // Best effort: it may already have exited on the closed pipe.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MountHolder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The smallest tmpfs offered (one page of data plus room for metadata).
pub const MIN_SIZE_BYTES: u64 = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_path_goes_through_the_holder() {
        let fs = TmpFs {
            path: PathBuf::from("/work/target/netlab/x/a/fs"),
            holder_pid: 42,
            size_bytes: 1 << 20,
        };
        assert_eq!(
            fs.outside_path(),
            PathBuf::from("/proc/42/root/work/target/netlab/x/a/fs")
        );
    }
}
