//! Hosts: what runs inside a host's network namespace. Commands (`ip netns exec`, entered
//! through the host's mount namespace when it has a tmpfs), supervised processes that can be
//! killed, terminated and restarted with the same command line, and Rust closures on
//! dedicated threads moved into the namespace with `setns`.
//!
//! How hosts are created is `lab.rs`'s business; their links, rates, faults and filesystem
//! are in `link.rs`, `shape.rs`, `fault.rs` and `fs.rs`.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};

use crate::cmd::{self, CmdError};
use crate::fault::FaultState;
use crate::fs::MountHolder;
use crate::netns::{self, NetnsError, pid_of};
use crate::wait;

/// One host of a lab: a network namespace with one link (`eth0`) to the lab's bridge.
///
/// Cheap to clone; clones refer to the same host. Everything it starts is killed when the
/// [`crate::Lab`] is dropped.
#[derive(Debug, Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

/// A process started on a host with [`Host::process`]; its output goes to a log file in
/// the lab's artifacts directory.
///
/// Dropping the last handle kills the process (SIGKILL), as does dropping the lab.
#[derive(Debug)]
#[must_use = "dropping a Process kills it"]
pub struct Process {
    inner: Arc<ProcessInner>,
}

/// Describes a process to start on a host; see [`Host::process`].
#[derive(Debug, Clone)]
#[must_use = "a ProcessBuilder does nothing until spawned"]
pub struct ProcessBuilder {
    host: Host,
    spec: Spec,
}

/// A process could not be started, signalled or waited for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// Starting it failed.
    #[error("cannot start `{command}` on host {host}: {source}")]
    Spawn {
        /// The host.
        host: String,
        /// The command line.
        command: String,
        /// Why.
        source: CmdError,
    },
    /// Its log file could not be opened.
    #[error("cannot open the log {path} for a process on host {host}: {source}")]
    Log {
        /// The host.
        host: String,
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Sending a signal or waiting failed.
    #[error("cannot {action} process {pid} on host {host}: {source}")]
    Control {
        /// The host.
        host: String,
        /// The process.
        pid: u32,
        /// What we tried (`signal`, `wait for`).
        action: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A closure could not be run inside a host's namespace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The thread could not enter the namespace.
    #[error(transparent)]
    Enter(#[from] NetnsError),
    /// The thread could not be started.
    #[error("cannot start a thread for host {host}: {source}")]
    Thread {
        /// The host.
        host: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

impl Host {
    pub(crate) fn new(config: HostParts) -> Self {
        Self {
            inner: Arc::new(HostInner {
                parts: config,
                faults: Mutex::new(FaultState::default()),
                holder: Mutex::new(None),
                next_serial: AtomicUsize::new(0),
            }),
        }
    }

    /// The host's name, as given to the lab builder.
    pub fn name(&self) -> &str {
        &self.inner.parts.name
    }

    /// The host's position in the lab (0 for the first host).
    pub fn index(&self) -> usize {
        self.inner.parts.index
    }

    /// The host's IPv4 address on the lab subnet.
    pub fn addr(&self) -> Ipv4Addr {
        self.inner.parts.addr
    }

    /// The name of the host's network namespace (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.inner.parts.netns
    }

    /// The host's interface inside its namespace, [`crate::HOST_IFACE`].
    pub fn interface(&self) -> &str {
        crate::link::HOST_IFACE
    }

    /// The host's directory among the lab's artifacts (process logs, the tmpfs mount point).
    pub fn dir(&self) -> &Path {
        &self.inner.parts.dir
    }

    /// A [`Command`] that runs `program` inside the host: its network namespace, and its
    /// mount namespace when it has a tmpfs (see [`Host::mount_tmpfs`]).
    ///
    /// The lab does not track what such a command starts, but kills everything left in the
    /// host's namespace on teardown. Use [`Host::process`] for supervised processes.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let holder = self.holder_pid();
        let mut command;
        if let Some(pid) = holder {
            command = Command::new("nsenter");
            command.arg(format!("--mount=/proc/{pid}/ns/mnt")).arg("ip");
        } else {
            command = Command::new("ip");
        }
        command.args(["netns", "exec", self.netns()]).arg(program);
        command
    }

    /// Starts describing a supervised process running `program` on the host.
    pub fn process(&self, program: impl AsRef<OsStr>) -> ProcessBuilder {
        ProcessBuilder {
            host: self.clone(),
            spec: Spec {
                program: program.as_ref().to_owned(),
                args: Vec::new(),
                envs: Vec::new(),
                current_dir: None,
            },
        }
    }

    /// Starts `program args...` as a supervised process: shorthand for
    /// `host.process(program).args(args).spawn()`.
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Process, ProcessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.process(program).args(args).spawn()
    }

    /// Runs `f` on a new thread that has entered the host's network namespace, and waits
    /// for its result. Sockets it creates belong to the host (and stay there if handed to
    /// other threads). It does not see the host's tmpfs through its path (mount namespaces
    /// cannot be entered by one thread); use [`crate::TmpFs::outside_path`].
    ///
    /// A panic in `f` is resumed on the caller's thread, so assertions inside work as usual.
    /// Async code: build a current-thread runtime inside `f`, never enter a namespace on a
    /// shared runtime worker.
    pub fn run<F, T>(&self, f: F) -> Result<T, RunError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let netns = self.netns().to_owned();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netlab-{}", self.name()))
                .spawn_scoped(scope, move || {
                    netns::enter(&netns)?;
                    Ok(f())
                })
                .map_err(|source| RunError::Thread {
                    host: self.name().to_owned(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts `f` on a new thread inside the host's network namespace and returns once the
    /// thread is inside (an error if it could not get there), for servers that run while the
    /// test goes on. Join the handle to get `f`'s result.
    pub fn spawn_thread<F, T>(&self, f: F) -> Result<JoinHandle<T>, RunError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let netns = self.netns().to_owned();
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(format!("netlab-{}", self.name()))
            .spawn(move || {
                let entered = netns::enter(&netns);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if !ok {
                    // The caller gets the error from the channel and drops this handle.
                    std::panic::resume_unwind(Box::new("netlab: could not enter namespace"));
                }
                f()
            })
            .map_err(|source| RunError::Thread {
                host: self.name().to_owned(),
                source,
            })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RunError::Thread {
                host: self.name().to_owned(),
                source: std::io::Error::other("thread ended before entering the namespace"),
            }),
        }
    }

    pub(crate) fn bridge_netns(&self) -> &str {
        &self.inner.parts.bridge_netns
    }

    /// The host's port on the bridge (the bridge's end of the host's veth).
    pub fn bridge_port(&self) -> &str {
        &self.inner.parts.port
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, FaultState> {
        lock(&self.inner.faults)
    }

    pub(crate) fn holder(&self) -> MutexGuard<'_, Option<MountHolder>> {
        lock(&self.inner.holder)
    }

    /// A number unique within the host, for file names.
    pub(crate) fn next_serial(&self) -> usize {
        self.inner.next_serial.fetch_add(1, Ordering::Relaxed)
    }

    fn holder_pid(&self) -> Option<u32> {
        self.holder().as_ref().map(MountHolder::pid)
    }

    fn registry(&self) -> &Registry {
        &self.inner.parts.registry
    }
}

impl ProcessBuilder {
    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.spec.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spec
            .args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.spec
            .envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets the process's working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.spec.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Starts the process. Its stdin is empty; stdout and stderr go to
    /// `<host dir>/<program>-<n>.log` (see [`Process::log_path`]).
    pub fn spawn(self) -> Result<Process, ProcessError> {
        let n = self.host.next_serial();
        let program = Path::new(&self.spec.program)
            .file_name()
            .map_or_else(|| "process".into(), |n| n.to_string_lossy().into_owned());
        let log_path = self.host.dir().join(format!("{program}-{n}.log"));
        let child = start(&self.host, &self.spec, &log_path)?;
        let inner = Arc::new(ProcessInner {
            host: self.host.clone(),
            spec: self.spec,
            log_path,
            child: Mutex::new(child),
        });
        self.host.registry().add(&inner);
        Ok(Process { inner })
    }
}

impl Process {
    /// The process's pid (of the current run, after a restart the new one).
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The host it runs on.
    pub fn host(&self) -> &Host {
        &self.inner.host
    }

    /// The file that collects its stdout and stderr, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// The log so far, lossily decoded (empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read(&self.inner.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, ProcessError> {
        let mut child = self.child();
        let pid = child.id();
        child
            .try_wait()
            .map_err(|source| self.control_error(pid, "wait for", source))
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let mut last = Ok(None);
        let done = wait::poll_until(timeout, POLL_INTERVAL, || {
            last = self.try_wait();
            matches!(last, Ok(Some(_)) | Err(_))
        });
        if done { last } else { Ok(None) }
    }

    /// Kills it with SIGKILL and reaps it: a crash, no chance to clean up. Killing one that
    /// has already exited is fine.
    pub fn kill(&self) -> Result<ExitStatus, ProcessError> {
        let mut child = self.child();
        let pid = child.id();
        if let Some(status) = child
            .try_wait()
            .map_err(|source| self.control_error(pid, "wait for", source))?
        {
            return Ok(status);
        }
        child
            .kill()
            .map_err(|source| self.control_error(pid, "signal", source))?;
        child
            .wait()
            .map_err(|source| self.control_error(pid, "wait for", source))
    }

    /// Sends SIGTERM (an orderly shutdown request) without waiting; see [`Process::stop`].
    pub fn terminate(&self) -> Result<(), ProcessError> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends a signal (e.g. `SIGSTOP` to freeze it, `SIGCONT` to thaw it).
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        let mut child = self.child();
        let pid = child.id();
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Ok(());
        }
        kill(pid_of(pid), signal).map_err(|errno| self.control_error(pid, "signal", errno.into()))
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL. Returns how it ended.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        self.terminate()?;
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    /// Starts it again with the same command line (killing the current run first if it is
    /// still alive). The log file gets a marker line and keeps growing.
    pub fn restart(&self) -> Result<(), ProcessError> {
        self.kill()?;
        let new = start(&self.inner.host, &self.inner.spec, &self.inner.log_path)?;
        *self.child() = new;
        Ok(())
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        lock(&self.inner.child)
    }

    fn control_error(
        &self,
        pid: u32,
        action: &'static str,
        source: std::io::Error,
    ) -> ProcessError {
        ProcessError::Control {
            host: self.inner.host.name().to_owned(),
            pid,
            action,
            source,
        }
    }
}

/// What a lab knows about its host when it creates it.
#[derive(Debug)]
pub(crate) struct HostParts {
    pub(crate) name: String,
    pub(crate) index: usize,
    pub(crate) addr: Ipv4Addr,
    pub(crate) netns: String,
    pub(crate) bridge_netns: String,
    pub(crate) port: String,
    pub(crate) dir: PathBuf,
    pub(crate) registry: Arc<Registry>,
}

/// The processes a lab started, so teardown can kill them even if handles are still held.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    processes: Mutex<Vec<Weak<ProcessInner>>>,
}

impl Registry {
    fn add(&self, process: &Arc<ProcessInner>) {
        let mut list = lock(&self.processes);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(process));
    }

    /// Kills and reaps every process still alive.
    pub(crate) fn kill_all(&self) {
        let list = std::mem::take(&mut *lock(&self.processes));
        for process in list.iter().filter_map(Weak::upgrade) {
            process.kill_quietly();
        }
    }
}

#[derive(Debug)]
struct HostInner {
    parts: HostParts,
    faults: Mutex<FaultState>,
    holder: Mutex<Option<MountHolder>>,
    next_serial: AtomicUsize,
}

#[derive(Debug)]
struct ProcessInner {
    host: Host,
    spec: Spec,
    log_path: PathBuf,
    child: Mutex<Child>,
}

impl ProcessInner {
    fn kill_quietly(&self) {
        let mut child = lock(&self.child);
        // Best effort: it may have exited already, and then both calls are harmless.
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ProcessInner {
    fn drop(&mut self) {
        self.kill_quietly();
    }
}

/// A process's command line, kept for restarts.
#[derive(Debug, Clone)]
struct Spec {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
}

/// Starts one run of a process on a host, appending its output to the log.
fn start(host: &Host, spec: &Spec, log_path: &Path) -> Result<Child, ProcessError> {
    let log_error = |source| ProcessError::Log {
        host: host.name().to_owned(),
        path: log_path.to_owned(),
        source,
    };
    let mut log = open_log(log_path).map_err(log_error)?;
    let mut command = host.command(&spec.program);
    command.args(&spec.args);
    for (k, v) in &spec.envs {
        command.env(k, v);
    }
    if let Some(dir) = &spec.current_dir {
        command.current_dir(dir);
    }
    writeln!(log, "== netlab: starting `{}`", cmd::describe(&command)).map_err(log_error)?;
    let stderr = log.try_clone().map_err(log_error)?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr));
    cmd::spawn(&mut command).map_err(|source| ProcessError::Spawn {
        host: host.name().to_owned(),
        command: cmd::describe(&command),
        source,
    })
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Locks a mutex, going on after a panic elsewhere: the data it guards (child handles,
/// fault flags) stays meaningful, and teardown must run during unwinding.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often to look whether a process has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
