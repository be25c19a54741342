//! The sidecar: a node's local data API for the training processes on it.
//!
//! A Unix socket beside the Workload API's (mode 0660, group as configured). Each request
//! is attested as the Workload API attests a call (peer uid, gid and executable, the
//! process pinned by a pidfd so that a reused pid cannot borrow another's entry) and mapped
//! to the SPIFFE ID of the caller's registration entry; a caller that matches none gets
//! `permission_denied` and nothing else.
//!
//! The node then acts *as that workload*: it reaches storage nodes with the workload SVID
//! its agent holds for the entry ([`upstream`]), so the storage node's policy decides and
//! its trail records the workload, as if the loader had connected itself. Whole objects
//! land in one cache shared by all callers (sealed at rest, see
//! [`libtransport::cache::SealedCache`]) and are handed over as sealed read-only memory
//! files passed with `SCM_RIGHTS`; an object already handed out stays mapped in memory
//! (within a byte budget) for the next caller. A cached object is given to a caller only
//! after the storage node said yes to that caller's identity for that object.
//!
//! Every request is recorded in the node's trail (`local_request`: caller, uid, pid,
//! request, dataset, object, bytes, whence, outcome) before its answer goes out: no record,
//! no answer.
//!
//! Connections are served on threads of their own (blocking frames; the network work runs
//! on the node's runtime), at most `sidecar.max_callers` at once; a caller past that is
//! answered `busy` at once rather than left waiting. A connection idle for
//! `sidecar.idle_timeout`, or that
//! starts a request and stops part-way for [`FRAME_TIMEOUT`], is closed, so idle callers
//! cannot keep the slots from others. While a request is served (a fetch from a storage
//! node can take a while) the caller hears [`LocalAnswer::Working`] every [`HEARTBEAT`], so
//! that its client can tell a slow answer from a hung daemon.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;
use certs::SpiffeId;
use libtransport::IdentityHandle;
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink};
use libtransport::clock::Clock;
use libtransport::metrics::SidecarCounters;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::server::refusals::{RefusalTally, TallyKey};
use libtransport::sidecar::{
    FrameError, HEARTBEAT, LocalAnswer, LocalRequest, recv_frame, request_body, send_frame,
};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config::SidecarConfig;
use crate::role::agent::peercred::PeerCred;
use crate::role::agent::view::ViewWatch;
use crate::role::agent::workload_api::{granted, prepare_socket_path};

mod upstream;

use upstream::Upstreams;

/// How long a request that has started may pause between its bytes.
const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Refusals of callers that cannot be attested: the first per uid in each window is
/// recorded on its own, the rest of the window counted into one record.
const DENIED_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Uids tallied apart at once; callers of more share one count.
const DENIED_TALLIES: usize = 1024;

/// How long an answer may wait for a caller that does not read it.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Objects one prefetch hint may name; the rest are ignored.
const MAX_PREFETCH: usize = 256;

/// Serves the local data API on `cfg.socket` until the handle is dropped.
pub(crate) async fn serve(
    cfg: SidecarConfig,
    node: SpiffeId,
    view: ViewWatch,
    node_identity: IdentityHandle,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    counters: Arc<SidecarCounters>,
) -> anyhow::Result<SidecarHandle> {
    let socket = cfg.socket.clone();
    prepare_socket_path(&socket)?;
    let upstreams = Upstreams::open(&cfg, node_identity, clock.clone(), counters.clone())
        .await
        .with_context(|| format!("sidecar.cache_dir {}", cfg.cache_dir.display()))?;
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("binding the sidecar socket {}", socket.display()))?;
    if let Some(group) = &cfg.group {
        let gid = resolve_group(group).context("sidecar.group")?;
        std::os::unix::fs::chown(&socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {group}", socket.display()))?;
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("opening {} to its group", socket.display()))?;
    counters.enable();
    if let Some(huge) = libtransport::cache::memfd_huge_pages()
        && matches!(huge.as_str(), "never" | "deny")
    {
        // Objects reach callers in memory files: 4 KiB pages make filling one from the
        // cache or the network several times slower (see the benchmark results).
        warn!(
            shmem_enabled = %huge,
            "the kernel gives memory files 4 KiB pages: set \
             /sys/kernel/mm/transparent_hugepage/shmem_enabled to within_size for faster \
             hand-offs of cached objects"
        );
    }
    let shared = Arc::new(Shared {
        node,
        view,
        audit,
        clock,
        counters,
        upstreams,
        runtime: tokio::runtime::Handle::current(),
        idle_timeout: cfg.idle_timeout,
        denied: RefusalTally::new(DENIED_WINDOW, DENIED_TALLIES),
    });
    let limit = Arc::new(Semaphore::new(cfg.max_callers));
    let tasks = vec![
        tokio::spawn(accept_loop(listener, limit, shared.clone())),
        tokio::spawn(report_denied(shared.clone())),
    ];
    info!(path = %socket.display(), "sidecar data API listening");
    Ok(SidecarHandle {
        path: socket,
        tasks,
        shared,
    })
}

/// Records the counts of refused callers as their windows end.
async fn report_denied(shared: Arc<Shared>) {
    loop {
        let wait = shared
            .denied
            .next_due(shared.clock.instant())
            .unwrap_or(DENIED_WINDOW)
            .max(std::time::Duration::from_millis(100));
        tokio::time::sleep(wait).await;
        for event in shared.denied.due(shared.clock.instant()) {
            let _ = shared.write(event);
        }
    }
}

/// The running data API. Dropping it stops accepting, records the counts of refused
/// callers still open and removes the socket; connections already open end when their
/// callers close them or the process exits.
#[derive(Debug)]
pub(crate) struct SidecarHandle {
    path: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl SidecarHandle {
    /// The socket.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SidecarHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
        for event in self.shared.denied.drain() {
            let _ = self.shared.write(event);
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    node: SpiffeId,
    view: ViewWatch,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    counters: Arc<SidecarCounters>,
    upstreams: Upstreams,
    runtime: tokio::runtime::Handle,
    /// How long a connection may sit between requests.
    idle_timeout: std::time::Duration,
    /// Callers refused for matching no entry, counted by uid.
    denied: RefusalTally<Unattested>,
}

async fn accept_loop(listener: UnixListener, limit: Arc<Semaphore>, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "sidecar cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let cred = match PeerCred::capture(&stream) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "sidecar caller without peer credentials: closed");
                continue;
            }
        };
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "sidecar connection unusable");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Told at once (the caller reads it as the answer to its first request), not
            // left waiting; the socket's buffer takes the frame without blocking.
            shared.counters.busy.fetch_add(1, Relaxed);
            debug!(
                pid = cred.pid,
                uid = cred.uid,
                "sidecar full: caller turned away"
            );
            let a = error(
                "busy",
                "the sidecar serves as many local callers as it takes at once; retry shortly",
            );
            let _ = answer(&shared, &stream, &a, &[], None);
            continue;
        };
        debug!(pid = cred.pid, uid = cred.uid, "sidecar connection");
        let shared = shared.clone();
        // A thread per caller: frames are blocking reads, and a thread outside the
        // runtime's blocking pool never holds the runtime's shutdown up.
        let spawned = std::thread::Builder::new()
            .name("transportd-sidecar".into())
            .spawn(move || serve_caller(&shared, &stream, &cred, permit));
        if let Err(e) = spawned {
            warn!(error = %e, "sidecar cannot start a caller's thread");
        }
    }
}

/// Serves one connection's requests in order until the caller closes it.
fn serve_caller(
    shared: &Shared,
    sock: &StdUnixStream,
    cred: &PeerCred,
    _permit: OwnedSemaphorePermit,
) {
    shared.counters.callers.fetch_add(1, Relaxed);
    loop {
        match next_request(sock, shared.idle_timeout) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                shared.counters.timeouts.fetch_add(1, Relaxed);
                debug!(pid = cred.pid, error = %e, "idle sidecar connection closed");
                break;
            }
        }
        let (req, _, fd) = match recv_frame::<LocalRequest>(sock, request_body, 0) {
            Ok(f) => f,
            Err(FrameError::Io(e)) => {
                if is_timeout(&e) {
                    shared.counters.timeouts.fetch_add(1, Relaxed);
                    debug!(pid = cred.pid, "sidecar request stalled part-way: closed");
                }
                break;
            }
            Err(FrameError::Malformed(why)) => {
                debug!(pid = cred.pid, reason = %why, "malformed sidecar request");
                let _ = answer(
                    shared,
                    sock,
                    &error("invalid", "malformed request"),
                    &[],
                    None,
                );
                break;
            }
            Err(_) => break,
        };
        if !shared.serve_one(sock, cred, req, fd) {
            break;
        }
    }
    shared.counters.callers.fetch_sub(1, Relaxed);
}

impl Shared {
    /// Serves one request; false when the connection should end.
    fn serve_one(
        &self,
        sock: &StdUnixStream,
        cred: &PeerCred,
        req: LocalRequest,
        fd: Option<OwnedFd>,
    ) -> bool {
        let mut record = Record::of(&req, cred);
        // Attestation first, for every request: the process behind the socket now.
        let identity = match cred.attest() {
            Ok(workload) => {
                let view = self.view.borrow().clone();
                let svids = granted(&view, &self.node, &workload);
                svids.first().map(|s| ((*s).clone(), view.bundle.clone()))
            }
            Err(why) => {
                debug!(pid = cred.pid, reason = %why, "sidecar caller not attested");
                None
            }
        };
        let Some((svid, bundle)) = identity else {
            self.counters.denied.fetch_add(1, Relaxed);
            record.outcome = "permission_denied";
            let a = error(
                "permission_denied",
                "this process matches no registration entry of this node: ask for an entry \
                 for its uid and executable (`transportd issuer entry create`)",
            );
            // A refused caller gets its answer and the connection ends.
            let noted = self.denied.note_key(
                Unattested(Some(cred.uid)),
                self.clock.instant(),
                self.clock.now(),
            );
            if let Some(ended) = noted.ended {
                let _ = self.write(ended);
            }
            // The first of its uid's window is recorded on its own (no record, no answer);
            // the rest are counted into one record when the window ends.
            if !noted.record || self.record(&record).is_ok() {
                let _ = answer(self, sock, &a, &[], None);
            }
            return false;
        };
        record.id = Some(svid.id().clone());
        let result = self.runtime.block_on(async {
            let work = self.upstreams.serve(&svid, &bundle, req, fd);
            tokio::pin!(work);
            // The caller hears that the request is in hand until its answer comes; one that
            // stopped reading stops hearing it (the answer will not reach it either).
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.reset();
            let mut listening = true;
            loop {
                tokio::select! {
                    served = &mut work => break served,
                    _ = beat.tick(), if listening => {
                        listening = answer(self, sock, &LocalAnswer::Working, &[], None).is_ok();
                    }
                }
            }
        });
        let (header, body, fd) = match result {
            Ok(served) => {
                let handed = match served.source {
                    "memory" => Some(&self.counters.bytes_memory),
                    "cache" => Some(&self.counters.bytes_cache),
                    "network" => Some(&self.counters.bytes_network),
                    _ => None,
                };
                if let Some(c) = handed {
                    c.fetch_add(served.bytes, Relaxed);
                }
                record.bytes = served.bytes;
                record.source = served.source;
                record.node = served.node.clone();
                (served.answer, served.body, served.fd)
            }
            Err(f) => {
                record.outcome = f.code;
                record.node = f.node.clone();
                (error(f.code, &f.message), Vec::new(), None)
            }
        };
        if self.record(&record).is_err() {
            let a = error(
                "unavailable",
                "the node's audit trail cannot record this request now; retry later",
            );
            return answer(self, sock, &a, &[], None).is_ok();
        }
        answer(self, sock, &header, &body, fd.as_ref().map(|f| f.as_fd())).is_ok()
    }

    fn record(&self, r: &Record) -> Result<(), ()> {
        self.write(AuditEvent::LocalRequest {
            id: r.id.clone(),
            pid: r.pid,
            uid: r.uid,
            op: r.op.to_owned(),
            node: r.node.clone(),
            dataset: r.dataset.clone(),
            object: r.object.clone(),
            bytes: r.bytes,
            source: r.source.to_owned(),
            outcome: r.outcome.to_owned(),
        })
    }

    fn write(&self, event: AuditEvent) -> Result<(), ()> {
        self.audit
            .record(&AuditRecord {
                time: self.clock.now(),
                event,
            })
            .map_err(|e| warn!(error = %e, "audit trail unavailable: refusing a sidecar answer"))
    }
}

/// Unattested callers' refusals are tallied by uid (`None`: the count shared past
/// [`DENIED_TALLIES`] uids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Unattested(Option<u32>);

impl TallyKey for Unattested {
    fn shared(self) -> Self {
        Self(None)
    }

    fn report(
        self,
        count: u64,
        first: std::time::SystemTime,
        last: std::time::SystemTime,
    ) -> AuditEvent {
        AuditEvent::LocalRequestsRefused {
            uid: self.0,
            count,
            first,
            last,
        }
    }
}

/// Waits for the caller's next request: `Ok(true)` once its first byte is there (the rest
/// must then follow within [`FRAME_TIMEOUT`], or `idle` if shorter), `Ok(false)` if the caller closed, an error
/// if it sent nothing for `idle`.
fn next_request(sock: &StdUnixStream, idle: std::time::Duration) -> std::io::Result<bool> {
    sock.set_read_timeout(Some(idle))?;
    let mut byte = [0u8; 1];
    let n = match rustix::net::recv(sock, &mut byte, rustix::net::RecvFlags::PEEK) {
        Ok((n, _)) => n,
        Err(rustix::io::Errno::AGAIN) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle for the sidecar's idle timeout",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    sock.set_read_timeout(Some(FRAME_TIMEOUT.min(idle)))?;
    Ok(n > 0)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A group name or number as a gid.
pub(crate) fn resolve_group(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => anyhow::bail!("{g:?}: no such group on this machine"),
        Err(e) => anyhow::bail!("{g:?}: {e}"),
    }
}

/// Writes an answer and counts what crossed the socket.
fn answer(
    shared: &Shared,
    sock: &StdUnixStream,
    header: &LocalAnswer,
    body: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), FrameError> {
    let sent = send_frame(sock, header, body, fd)?;
    shared.counters.socket_bytes.fetch_add(sent, Relaxed);
    Ok(())
}

fn error(code: &str, message: &str) -> LocalAnswer {
    LocalAnswer::Error {
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

/// One request's line in the trail, filled in as it is served.
#[derive(Debug)]
struct Record {
    id: Option<SpiffeId>,
    pid: Option<u32>,
    uid: u32,
    op: &'static str,
    node: Option<String>,
    dataset: Option<DatasetName>,
    object: Option<ObjectPath>,
    bytes: u64,
    source: &'static str,
    outcome: &'static str,
}

impl Record {
    fn of(req: &LocalRequest, cred: &PeerCred) -> Self {
        let (op, dataset, object) = match req {
            LocalRequest::Datasets { .. } => ("datasets", None, None),
            LocalRequest::List { dataset, .. } => ("list", Some(dataset.as_str()), None),
            LocalRequest::Stat {
                dataset, object, ..
            } => ("stat", Some(dataset.as_str()), Some(object.as_str())),
            LocalRequest::Read {
                dataset, object, ..
            } => ("read", Some(dataset.as_str()), Some(object.as_str())),
            LocalRequest::Fetch {
                dataset, object, ..
            } => ("fetch", Some(dataset.as_str()), Some(object.as_str())),
            LocalRequest::Push {
                dataset, object, ..
            } => ("push", Some(dataset.as_str()), Some(object.as_str())),
            LocalRequest::Prefetch { objects, .. } => (
                "prefetch",
                objects.first().map(|o| o.0.as_str()),
                objects.first().map(|o| o.1.as_str()),
            ),
        };
        Self {
            id: None,
            pid: cred.pid,
            uid: cred.uid,
            op,
            node: None,
            // Names that do not parse are refused later; the trail keeps valid ones only.
            dataset: dataset.and_then(|d| DatasetName::new(d).ok()),
            object: object.and_then(|o| ObjectPath::new(o).ok()),
            bytes: 0,
            source: "none",
            outcome: "ok",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_by_number_or_name_and_unknown_names_are_refused() {
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-here").unwrap_err();
        assert!(e.to_string().contains("no such group"), "{e}");
    }

    #[test]
    fn unattested_callers_are_counted_by_uid_and_past_the_bound_together() {
        use libtransport::clock::SystemClock;
        let t = RefusalTally::new(DENIED_WINDOW, 2);
        let (at, now) = (SystemClock.instant(), SystemClock.now());
        assert!(t.note_key(Unattested(Some(1000)), at, now).record);
        for _ in 0..4 {
            assert!(!t.note_key(Unattested(Some(1000)), at, now).record);
        }
        assert!(t.note_key(Unattested(Some(1001)), at, now).record);
        // A third uid shares the count of every uid past the bound.
        assert!(t.note_key(Unattested(Some(1002)), at, now).record);
        assert!(!t.note_key(Unattested(Some(1003)), at, now).record);
        let mut ended: Vec<_> = t
            .due(at + DENIED_WINDOW)
            .into_iter()
            .map(|e| match e {
                AuditEvent::LocalRequestsRefused { uid, count, .. } => (uid, count),
                other => panic!("{other:?}"),
            })
            .collect();
        ended.sort();
        assert_eq!(ended, vec![(None, 1), (Some(1000), 4)]);
    }
}
