//! The SPIFFE Workload API the node agent serves to local workloads: gRPC on a Unix
//! socket, wire-compatible with SPIRE's agent, so SPIFFE client libraries work unchanged.
//!
//! Every call is attested afresh from the connection's peer credentials (`peercred.rs`:
//! uid, gid and executable, guarded against pid reuse); the SVIDs a caller gets are those
//! of the registration entries of this node that it matches (`certs::entries_for` over
//! the agent's [`WorkloadView`]). `FetchX509SVID` answers at once and then again whenever a
//! new view changes what this caller gets (a rotation, a new bundle, entries added or
//! withdrawn); `FetchX509Bundles` likewise for the bundle. The JWT methods answer
//! `Unimplemented`. A call without the `workload.spiffe.io: true` header is refused with
//! `InvalidArgument`, a caller no entry matches with `PermissionDenied`, as SPIRE does.
//!
//! Each call is recorded once in the audit trail (`WorkloadAttested` with the IDs given,
//! or `WorkloadRefused` with the reason), not each update pushed on its stream; a trail
//! that cannot record refuses the answer. What is not here: minting and rotating the SVIDs
//! (the agent does that and publishes views), and the JWT profile.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use certs::{RegistrationEntry, SpiffeId, Svid, Workload};
use futures::{FutureExt, Stream};
use libtransport::audit::{AuditEvent, AuditRecord, AuditSink};
use libtransport::clock::Clock;
use libtransport::workload::pb::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use libtransport::workload::{
    MAX_MESSAGE_BYTES, SECURITY_HEADER, SECURITY_HEADER_VALUE, encode_bundles_response,
    encode_x509_response, pb,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::Connected;

use super::authority::Rewriter;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use super::peercred::PeerCred;
use super::view::{ViewWatch, WorkloadView};

/// Serves the Workload API on `socket` until the returned handle is shut down or dropped.
///
/// Creates the socket's directory if missing, replaces a stale socket (refusing to remove
/// anything that is not a socket, or a socket another server still answers on), binds,
/// and opens the socket to every local user: attestation decides who gets what, as with
/// SPIRE. `node` is this node's SPIFFE ID (the parent of the entries served); `view` the
/// agent's published identities.
pub(crate) async fn serve(
    socket: &Path,
    node: SpiffeId,
    view: ViewWatch,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<WorkloadApiHandle> {
    prepare_socket_path(socket)?;
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the Workload API socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("opening {} to local workloads", socket.display()))?;
    let meta = std::fs::symlink_metadata(socket)
        .with_context(|| format!("reading {}", socket.display()))?;
    let (stop, stopped) = watch::channel(false);
    let api = WorkloadApi {
        node,
        view,
        audit,
        clock,
        stopped: stopped.clone(),
    };
    let incoming = accept_loop(listener, Arc::new(Semaphore::new(MAX_CONNECTIONS)));
    let svc = SpiffeWorkloadApiServer::new(api)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut until = stopped;
    let task = tokio::spawn(async move {
        let result = Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(KEEPALIVE))
            .serve_with_incoming_shutdown(svc, incoming, async move {
                // Ends on shutdown, or when the handle (the sender) is gone.
                let _ = until.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            error!(error = %e, "workload API stopped");
        }
    });
    info!(path = %socket.display(), "workload API listening");
    Ok(WorkloadApiHandle {
        path: socket.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
        stop,
        task: Some(task),
    })
}

/// The running Workload API. Dropping it stops serving (every open stream ends) and
/// removes the socket file.
#[derive(Debug)]
pub(crate) struct WorkloadApiHandle {
    path: PathBuf,
    /// Device and inode of the socket we bound: only that file is removed at the end.
    inode: (u64, u64),
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl WorkloadApiHandle {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends every open stream, and waits (a few seconds at most) for the
    /// connections to close; the socket file is removed.
    pub(crate) async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            warn!("workload API connections did not close in time; dropping them");
            task.abort();
        }
    }
}

impl Drop for WorkloadApiHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        // Only the socket we bound: a successor may already have bound its own here.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.inode);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot remove the workload API socket");
        }
    }
}

/// The service: the agent's view, and where refusals and answers are recorded.
#[derive(Debug, Clone)]
struct WorkloadApi {
    node: SpiffeId,
    view: ViewWatch,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    stopped: watch::Receiver<bool>,
}

/// A stream of answers, ending with an error status when the caller loses its identity.
type AnswerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = AnswerStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = AnswerStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = AnswerStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&req)?;
        let mut view = self.view.clone();
        let current = view.borrow_and_update().clone();
        let (first, ids) = match x509_answer(&current, &self.node, &caller.workload) {
            Ok(answer) => answer,
            Err(status) => {
                self.refuse(Some(&caller), status.message());
                return Err(status);
            }
        };
        self.record(AuditEvent::WorkloadAttested {
            pid: caller.pid.unwrap_or(0),
            uid: caller.workload.uid,
            gid: caller.workload.gid,
            ids: ids.clone(),
        })?;
        debug!(
            pid = caller.pid,
            uid = caller.workload.uid,
            svids = ids.len(),
            "X.509-SVIDs served"
        );
        let (node, workload) = (self.node.clone(), caller.workload);
        Ok(Response::new(follow(
            first,
            view,
            self.stopped.clone(),
            move |v| x509_answer(v, &node, &workload).map(|(answer, _)| answer),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.admit(&req)?;
        let mut view = self.view.clone();
        let current = view.borrow_and_update().clone();
        // As SPIRE does by default: bundles go to workloads that have an identity here.
        let first = match bundles_answer(&current, &self.node, &caller.workload) {
            Ok(answer) => answer,
            Err(status) => {
                self.refuse(Some(&caller), status.message());
                return Err(status);
            }
        };
        debug!(
            pid = caller.pid,
            uid = caller.workload.uid,
            "X.509 bundles served"
        );
        let (node, workload) = (self.node.clone(), caller.workload);
        Ok(Response::new(follow(
            first,
            view,
            self.stopped.clone(),
            move |v| bundles_answer(v, &node, &workload),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        self.check_header(&req)?;
        Err(jwt_unimplemented())
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.check_header(&req)?;
        Err(jwt_unimplemented())
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        self.check_header(&req)?;
        Err(jwt_unimplemented())
    }
}

/// A caller that passed the header check and attestation.
#[derive(Debug)]
struct Caller {
    pid: Option<u32>,
    workload: Workload,
}

impl WorkloadApi {
    /// The security header, then attestation; refusals are recorded.
    fn admit<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.check_header(req)?;
        let peer = req.extensions().get::<PeerInfo>().map(|p| p.0.clone());
        let cred = match peer.as_deref() {
            Some(Ok(cred)) => cred,
            Some(Err(why)) => {
                self.refuse_raw(None, None, &format!("peer credentials unreadable: {why}"));
                return Err(Status::permission_denied("caller cannot be attested"));
            }
            None => {
                self.refuse_raw(None, None, "no peer credentials");
                return Err(Status::permission_denied("caller cannot be attested"));
            }
        };
        match cred.attest() {
            Ok(workload) => Ok(Caller {
                pid: cred.pid,
                workload,
            }),
            Err(why) => {
                self.refuse_raw(cred.pid, Some(cred.uid), &why.to_string());
                Err(Status::permission_denied(format!(
                    "caller cannot be attested: {why}"
                )))
            }
        }
    }

    /// `workload.spiffe.io: true`, exactly; without it, or with another value, the call is
    /// refused and recorded, saying which (never echoing the value).
    fn check_header<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let why = match req.metadata().get(SECURITY_HEADER) {
            Some(v) if v.as_bytes() == SECURITY_HEADER_VALUE.as_bytes() => return Ok(()),
            Some(_) => WRONG_HEADER,
            None => MISSING_HEADER,
        };
        let cred = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.0.as_ref().as_ref().ok().map(|c| (c.pid, c.uid)));
        let (pid, uid) = cred.map_or((None, None), |(p, u)| (p, Some(u)));
        self.refuse_raw(pid, uid, why);
        Err(Status::invalid_argument(why))
    }

    fn refuse(&self, caller: Option<&Caller>, reason: &str) {
        self.refuse_raw(
            caller.and_then(|c| c.pid),
            caller.map(|c| c.workload.uid),
            reason,
        );
    }

    /// Records and logs a refusal. A trail that cannot record it is logged: the caller is
    /// refused either way.
    fn refuse_raw(&self, pid: Option<u32>, uid: Option<u32>, reason: &str) {
        info!(pid, uid, reason, "workload API request refused");
        if let Err(e) = self.audit.record(&AuditRecord {
            time: self.clock.now(),
            event: AuditEvent::WorkloadRefused {
                pid,
                uid,
                reason: reason.to_owned(),
            },
        }) {
            warn!(error = %e, "cannot record a workload API refusal");
        }
    }

    /// Records an answer before it goes out; no record, no answer.
    fn record(&self, event: AuditEvent) -> Result<(), Status> {
        self.audit
            .record(&AuditRecord {
                time: self.clock.now(),
                event,
            })
            .map_err(|e| {
                warn!(error = %e, "audit trail unavailable: refusing workload API answer");
                Status::unavailable("audit trail unavailable")
            })
    }
}

/// The SVIDs `workload` gets from `view`, encoded, and their IDs.
fn x509_answer(
    view: &WorkloadView,
    node: &SpiffeId,
    workload: &Workload,
) -> Result<(pb::X509svidResponse, Vec<SpiffeId>), Status> {
    let svids = granted(view, node, workload);
    if svids.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    let ids = svids.iter().map(|s| s.id().clone()).collect();
    let answer = encode_x509_response(svids, &view.bundle).map_err(|e| {
        error!(error = %e, "cannot encode a workload SVID");
        Status::unavailable("the agent cannot serve this identity now")
    })?;
    Ok((answer, ids))
}

/// The bundle, for a workload that has an identity here.
fn bundles_answer(
    view: &WorkloadView,
    node: &SpiffeId,
    workload: &Workload,
) -> Result<pb::X509BundlesResponse, Status> {
    if granted(view, node, workload).is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    Ok(encode_bundles_response([&view.bundle]))
}

/// The SVIDs of the view's entries that `workload`, on `node`, is entitled to, in the
/// view's order (the first is the default).
pub(crate) fn granted<'a>(
    view: &'a WorkloadView,
    node: &SpiffeId,
    workload: &Workload,
) -> Vec<&'a Svid> {
    let entries: Vec<RegistrationEntry> = view.svids.iter().map(|s| s.entry.clone()).collect();
    let matched = certs::entries_for(&entries, node, workload);
    view.svids
        .iter()
        .zip(&entries)
        .filter(|(_, e)| matched.iter().any(|m| std::ptr::eq(*m, *e)))
        .map(|(s, _)| &s.svid)
        .collect()
}

/// `first`, then a new answer from `answer` on every view change that changes it; ends
/// with the status `answer` fails with, or quietly on shutdown.
fn follow<T, F>(
    first: T,
    view: ViewWatch,
    stopped: watch::Receiver<bool>,
    answer: F,
) -> AnswerStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: FnMut(&WorkloadView) -> Result<T, Status> + Send + 'static,
{
    struct State<T, F> {
        last: T,
        first: bool,
        done: bool,
        view: ViewWatch,
        stopped: watch::Receiver<bool>,
        answer: F,
    }
    let state = State {
        last: first,
        first: true,
        done: false,
        view,
        stopped,
        answer,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.first {
            st.first = false;
            return Some((Ok(st.last.clone()), st));
        }
        if st.done {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                () = st.stopped.wait_for(|s| *s).map(drop) => return None,
                changed = st.view.changed() => {
                    if changed.is_err() {
                        st.done = true;
                        return Some((Err(Status::unavailable("the node agent stopped")), st));
                    }
                    let view = st.view.borrow_and_update().clone();
                    match (st.answer)(&view) {
                        Ok(next) if next == st.last => {}
                        Ok(next) => {
                            st.last = next.clone();
                            return Some((Ok(next), st));
                        }
                        Err(status) => {
                            info!(reason = status.message(), "workload identity withdrawn from an open stream");
                            st.done = true;
                            return Some((Err(status), st));
                        }
                    }
                }
            }
        }
    }))
}

fn jwt_unimplemented() -> Status {
    Status::unimplemented("this agent serves X.509-SVIDs only; JWT-SVIDs are not implemented")
}

/// Makes way for our socket: creates the directory, removes a stale socket, refuses
/// anything else.
pub(crate) fn prepare_socket_path(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", socket.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it (remove it, or choose another workload socket path)",
            socket.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "another server answers on {}; is a second node agent running?",
            socket.display()
        );
    }
    std::fs::remove_file(socket)
        .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    Ok(())
}

/// Accepted connections with their peer credentials, at most [`MAX_CONNECTIONS`] at once:
/// a connection holds a permit until it closes, and accepting waits for one.
fn accept_loop(
    listener: UnixListener,
    limit: Arc<Semaphore>,
) -> impl Stream<Item = Result<PeerStream, io::Error>> {
    futures::stream::unfold((listener, limit), |(listener, limit)| async move {
        let permit = limit.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let cred = PeerCred::capture(&stream).map_err(|e| e.to_string());
                    if let Ok(c) = &cred {
                        debug!(
                            pid = c.pid,
                            uid = c.uid,
                            pinned = c.pinned_by(),
                            "workload API connection"
                        );
                    }
                    let conn = PeerStream {
                        stream,
                        peer: PeerInfo(Arc::new(cred)),
                        rewriter: Rewriter::default(),
                        read_buf: Box::new([0; READ_BYTES]),
                        _permit: permit,
                    };
                    return Some((Ok(conn), (listener, limit)));
                }
                Err(e) => {
                    // Out of descriptors, typically: wait rather than spin.
                    warn!(error = %e, "workload API cannot accept");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    })
}

/// What each call on a connection learns about its peer.
#[derive(Debug, Clone)]
struct PeerInfo(Arc<Result<PeerCred, String>>);

/// An accepted connection: the socket, its peer's credentials, and its place among the
/// [`MAX_CONNECTIONS`]. What the peer sends reaches the gRPC server through a
/// [`Rewriter`], so grpc-core clients' socket-path authorities do not get their calls
/// reset.
#[derive(Debug)]
struct PeerStream {
    stream: UnixStream,
    peer: PeerInfo,
    rewriter: Rewriter,
    read_buf: Box<[u8; READ_BYTES]>,
    _permit: OwnedSemaphorePermit,
}

/// Bytes read from a Workload API socket at a time.
const READ_BYTES: usize = 16 << 10;

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ready = this.rewriter.output();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.read_buf[..]);
            match Pin::new(&mut this.stream).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) if raw.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let before = this.rewriter.rewritten();
                    this.rewriter.feed(raw.filled())?;
                    if this.rewriter.rewritten() > before && before == 0 {
                        debug!(
                            pid = this.peer.0.as_ref().as_ref().ok().and_then(|c| c.pid),
                            "a socket-path :authority (grpc-core) read as localhost"
                        );
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What a caller no entry matches is told (SPIRE's words).
const NO_IDENTITY: &str = "no identity issued";
/// The refusal of a call without the security header (as SPIRE words it).
const MISSING_HEADER: &str = "security header missing from request";
/// The refusal of a call whose security header is not exactly `true`.
const WRONG_HEADER: &str = "security header workload.spiffe.io must be \"true\"";

/// Most Workload API connections open at once. Any local user may connect, and each
/// connection holds a descriptor and its streams a task's worth of memory; without a bound
/// one user could exhaust the descriptors the node's transfers need. Workloads hold one or
/// two connections each, so this leaves room for a few hundred processes.
const MAX_CONNECTIONS: usize = 256;

/// Most concurrent calls (HTTP/2 streams) on one connection: a client library keeps one
/// SVID stream and perhaps a bundle stream open; more is a client looping or an attack.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Largest request accepted: requests are empty or carry a few audiences.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Wait after a failed accept before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// HTTP/2 pings on idle connections, so a stuck peer is noticed and its slot freed.
const KEEPALIVE: Duration = Duration::from_secs(60);

/// How long shutdown waits for connections to close after their streams have ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::future::Future;

    use certs::test_util::TestPki;
    use certs::{Selector, TrustBundle, Usage};
    use libtransport::clock::SystemClock;
    use libtransport::test_util::{MemoryAudit, trace_init};
    use libtransport::workload::{WorkloadClient, WorkloadError, X509Context};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::super::view::WorkloadSvid;
    use super::*;

    /// A served Workload API over a view of `pki`'s identities.
    struct Fixture {
        pki: TestPki,
        node: SpiffeId,
        view: watch::Sender<Arc<WorkloadView>>,
        audit: Arc<MemoryAudit>,
        handle: WorkloadApiHandle,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn start(grants: &[(&str, Selector)]) -> Self {
            let pki = TestPki::new("td.example");
            let node = pki.id("/node/gpu-0");
            let view = watch::Sender::new(Arc::new(view_of(&pki, &node, grants)));
            let audit = Arc::new(MemoryAudit::default());
            let dir = tempfile::tempdir().unwrap();
            let handle = serve(
                &dir.path().join("agent/workload.sock"),
                node.clone(),
                view.subscribe(),
                audit.clone(),
                Arc::new(SystemClock),
            )
            .await
            .unwrap();
            Self {
                pki,
                node,
                view,
                audit,
                handle,
                _dir: dir,
            }
        }

        async fn client(&self) -> WorkloadClient {
            within(WorkloadClient::connect(self.handle.path()))
                .await
                .unwrap()
        }

        fn publish(&self, grants: &[(&str, Selector)]) -> WorkloadView {
            let v = view_of(&self.pki, &self.node, grants);
            self.view.send_replace(Arc::new(v.clone()));
            v
        }
    }

    /// A view granting each `(path, selector)` a fresh SVID, under `node`.
    fn view_of(pki: &TestPki, node: &SpiffeId, grants: &[(&str, Selector)]) -> WorkloadView {
        WorkloadView {
            bundle: pki.bundle(),
            svids: grants
                .iter()
                .map(|(path, sel)| WorkloadSvid {
                    entry: RegistrationEntry {
                        id: format!("entry{path}"),
                        spiffe_id: pki.id(path),
                        parent_id: node.clone(),
                        selectors: vec![sel.clone()],
                        ttl: None,
                    },
                    svid: pki.svid(path),
                })
                .collect(),
        }
    }

    fn my_uid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn me() -> Selector {
        Selector::Uid(my_uid())
    }

    fn someone_else() -> Selector {
        Selector::Uid(my_uid().wrapping_add(4242))
    }

    /// Bounds a test step: a hang fails the test instead of stalling the suite.
    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("the Workload API did not answer in time")
    }

    fn ids(ctx: &X509Context) -> Vec<String> {
        ctx.svids.iter().map(|s| s.id().to_string()).collect()
    }

    fn attested(events: &[AuditEvent]) -> Vec<Vec<SpiffeId>> {
        events
            .iter()
            .filter_map(|e| match e {
                AuditEvent::WorkloadAttested { ids, .. } => Some(ids.clone()),
                _ => None,
            })
            .collect()
    }

    fn refusals(events: &[AuditEvent]) -> Vec<(Option<u32>, Option<u32>, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                AuditEvent::WorkloadRefused { pid, uid, reason } => {
                    Some((*pid, *uid, reason.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_workload_gets_the_svids_its_uid_and_executable_match_and_they_verify() {
        let _trace = trace_init();
        let exe = std::env::current_exe().unwrap();
        let f = Fixture::start(&[
            ("/w/by-uid", me()),
            ("/w/not-mine", someone_else()),
            ("/w/by-exe", Selector::Path(exe)),
            (
                "/w/other-exe",
                Selector::Path("/usr/bin/not-this-test".into()),
            ),
        ])
        .await;
        let client = f.client().await;
        let ctx = within(client.fetch_x509()).await.unwrap();
        assert_eq!(
            ids(&ctx),
            [
                "spiffe://td.example/w/by-uid",
                "spiffe://td.example/w/by-exe"
            ]
        );
        assert_eq!(ctx.bundle, f.pki.bundle());
        for svid in &ctx.svids {
            let v = ctx
                .bundle
                .verify(svid.chain(), SystemClock.now(), Usage::Client)
                .unwrap();
            assert_eq!(&v.id, svid.id());
            // The key is the certificate's: TLS credentials accept the pair.
            libtransport::Credentials::new(svid.clone(), ctx.bundle.clone()).unwrap();
        }
        let bundles = within(client.fetch_bundles()).await.unwrap();
        assert_eq!(bundles, vec![f.pki.bundle()]);

        let events = f.audit.events();
        assert_eq!(
            attested(&events),
            vec![vec![f.pki.id("/w/by-uid"), f.pki.id("/w/by-exe")]]
        );
        assert!(events.iter().any(|e| matches!(
            e,
            AuditEvent::WorkloadAttested { pid, uid, .. }
                if *pid == std::process::id() && *uid == my_uid()
        )));
        assert!(refusals(&events).is_empty(), "{events:?}");
    }

    #[tokio::test]
    async fn a_new_view_pushes_an_update_on_the_open_stream_and_a_withdrawal_ends_it() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me())]).await;
        let client = f.client().await;
        let mut updates = within(client.watch_x509()).await.unwrap();
        let first = within(updates.next()).await.unwrap();

        // A view that gives this caller the same SVIDs pushes nothing...
        let unchanged = WorkloadView {
            bundle: f.pki.bundle(),
            svids: vec![
                WorkloadSvid {
                    entry: RegistrationEntry {
                        id: "entry/w/loader".into(),
                        spiffe_id: f.pki.id("/w/loader"),
                        parent_id: f.node.clone(),
                        selectors: vec![me()],
                        ttl: None,
                    },
                    svid: first.svids[0].clone(),
                },
                // ...even when someone else's identities change.
                WorkloadSvid {
                    entry: RegistrationEntry {
                        id: "entry/w/other".into(),
                        spiffe_id: f.pki.id("/w/other"),
                        parent_id: f.node.clone(),
                        selectors: vec![someone_else()],
                        ttl: None,
                    },
                    svid: f.pki.svid("/w/other"),
                },
            ],
        };
        f.view.send_replace(Arc::new(unchanged));
        // ...so the next answer is the rotation that follows.
        let rotated = f.publish(&[("/w/loader", me())]);
        let second = within(updates.next()).await.unwrap();
        assert_ne!(second.svids[0].serial(), first.svids[0].serial());
        assert_eq!(second.svids[0].serial(), rotated.svids[0].svid.serial());
        assert_eq!(second.svids[0].chain(), rotated.svids[0].svid.chain());

        // Entries gone: the stream ends with PermissionDenied.
        f.publish(&[("/w/loader", someone_else())]);
        let e = within(updates.next()).await.unwrap_err();
        assert!(matches!(e, WorkloadError::PermissionDenied(_)), "{e}");

        // One record for the call, none per pushed update.
        assert_eq!(attested(&f.audit.events()).len(), 1);
    }

    #[tokio::test]
    async fn a_caller_no_entry_matches_is_refused_and_recorded() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", someone_else())]).await;
        let client = f.client().await;
        let e = within(client.fetch_x509()).await.unwrap_err();
        match &e {
            WorkloadError::PermissionDenied(m) => assert!(m.contains(NO_IDENTITY), "{m}"),
            other => panic!("expected PermissionDenied, got {other}"),
        }
        let e = within(client.fetch_bundles()).await.unwrap_err();
        assert!(matches!(e, WorkloadError::PermissionDenied(_)), "{e}");
        let events = f.audit.events();
        assert!(attested(&events).is_empty());
        let refused = refusals(&events);
        assert_eq!(refused.len(), 2, "{events:?}");
        for (pid, uid, reason) in refused {
            assert_eq!(pid, Some(std::process::id()));
            assert_eq!(uid, Some(my_uid()));
            assert_eq!(reason, NO_IDENTITY);
        }
        // An entry of another node grants nothing here either.
        let other_node = view_of(&f.pki, &f.pki.id("/node/gpu-1"), &[("/w/loader", me())]);
        f.view.send_replace(Arc::new(other_node));
        let e = within(client.fetch_x509()).await.unwrap_err();
        assert!(matches!(e, WorkloadError::PermissionDenied(_)), "{e}");
    }

    #[tokio::test]
    async fn a_call_without_the_security_header_is_invalid_argument() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me())]).await;
        let channel = within(libtransport::workload::channel(f.handle.path()))
            .await
            .unwrap();
        let mut bare =
            pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel.clone());
        let status = within(bare.fetch_x509svid(pb::X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "security header missing from request");
        // The value is case sensitive.
        let mut wrong = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
            channel.clone(),
            |mut r: Request<()>| {
                r.metadata_mut().insert(
                    SECURITY_HEADER,
                    tonic::metadata::MetadataValue::from_static("True"),
                );
                Ok(r)
            },
        );
        let status = within(wrong.fetch_x509_bundles(pb::X509BundlesRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        // A wrong value is said as such, not as a missing header.
        assert_eq!(status.message(), WRONG_HEADER);

        let events = f.audit.events();
        assert!(attested(&events).is_empty());
        let refused = refusals(&events);
        assert_eq!(refused.len(), 2, "{events:?}");
        assert!(
            refused.iter().all(|(pid, uid, _)| {
                *pid == Some(std::process::id()) && *uid == Some(my_uid())
            })
        );
        let reasons: Vec<&str> = refused.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(reasons, [MISSING_HEADER, WRONG_HEADER]);

        // With the header, the JWT profile is not implemented.
        let mut jwt = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
            channel,
            |mut r: Request<()>| {
                r.metadata_mut().insert(
                    SECURITY_HEADER,
                    tonic::metadata::MetadataValue::from_static(SECURITY_HEADER_VALUE),
                );
                Ok(r)
            },
        );
        let status = within(jwt.fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        let status = within(jwt.validate_jwtsvid(pb::ValidateJwtsvidRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test]
    async fn the_spiffe_crate_client_fetches_an_svid_and_bundle_that_validate() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me()), ("/w/second", me())]).await;
        let endpoint = format!("unix:{}", f.handle.path().display());
        let client = within(spiffe::WorkloadApiClient::connect_to(&endpoint))
            .await
            .unwrap();
        let ctx = within(client.fetch_x509_context()).await.unwrap();
        let svid = ctx.default_svid().unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://td.example/w/loader");
        assert_eq!(ctx.svids().len(), 2);
        let td = spiffe::TrustDomain::new("td.example").unwrap();
        let bundle = ctx.bundle_set().get(&td).unwrap();

        // What the reference client parsed is a valid SVID and bundle to us too.
        let ours = TrustBundle::from_der(
            bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
        )
        .unwrap();
        assert_eq!(ours, f.pki.bundle());
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let verified = ours
            .verify(&chain, SystemClock.now(), Usage::Client)
            .unwrap();
        assert_eq!(verified.id, f.pki.id("/w/loader"));
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        libtransport::Credentials::new(Svid::from_der(chain, key).unwrap(), ours).unwrap();

        let set = within(client.fetch_x509_bundles()).await.unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.get(&td).is_some());
    }

    #[tokio::test]
    async fn the_fetch_command_writes_usable_files_and_maps_refusals_to_exit_codes() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me())]).await;
        let out = tempfile::tempdir().unwrap();
        let uri = format!("unix://{}", f.handle.path().display());
        within(crate::cmd::workload::fetch(
            &uri,
            Some(out.path()),
            None,
            true,
        ))
        .await
        .unwrap();
        let chain = std::fs::read_to_string(out.path().join("svid.pem")).unwrap();
        let key = std::fs::read_to_string(out.path().join("svid.key")).unwrap();
        let svid = Svid::from_pem(&chain, &key).unwrap();
        assert_eq!(svid.id(), &f.pki.id("/w/loader"));
        let bundle =
            TrustBundle::from_pem(&std::fs::read_to_string(out.path().join("bundle.pem")).unwrap())
                .unwrap();
        assert_eq!(bundle, f.pki.bundle());
        libtransport::Credentials::new(svid, bundle).unwrap();
        let mode = std::fs::metadata(out.path().join("svid.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // No identity for this caller: 77; nothing listening: 69.
        f.publish(&[("/w/loader", someone_else())]);
        let path = f.handle.path().display().to_string();
        let e = within(crate::cmd::workload::fetch(&path, None, None, false))
            .await
            .unwrap_err();
        assert_eq!(crate::cmd::exit_code(&e), 77, "{e:#}");
        let gone = out.path().join("nobody.sock").display().to_string();
        let e = within(crate::cmd::workload::fetch(&gone, None, None, false))
            .await
            .unwrap_err();
        assert_eq!(crate::cmd::exit_code(&e), 69, "{e:#}");
        let e = within(crate::cmd::workload::fetch(
            "tcp://127.0.0.1:1",
            None,
            None,
            false,
        ))
        .await
        .unwrap_err();
        assert_eq!(crate::cmd::exit_code(&e), 64, "{e:#}");
    }

    #[tokio::test]
    async fn an_unwritable_audit_trail_refuses_the_answer() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me())]).await;
        f.audit.set_failing(true);
        let e = within(f.client().await.fetch_x509()).await.unwrap_err();
        assert!(e.to_string().contains("audit trail unavailable"), "{e}");
    }

    #[tokio::test]
    async fn the_socket_is_open_to_all_replaced_when_stale_and_removed_at_the_end() {
        let _trace = trace_init();
        let f = Fixture::start(&[("/w/loader", me())]).await;
        let path = f.handle.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o777);

        // A second server on the same path is refused while the first answers.
        let second = serve(
            &path,
            f.node.clone(),
            f.view.subscribe(),
            f.audit.clone(),
            Arc::new(SystemClock),
        )
        .await
        .unwrap_err();
        assert!(
            format!("{second:#}").contains("another server answers"),
            "{second:#}"
        );

        // Shutdown ends open streams and removes the socket.
        let client = f.client().await;
        let mut updates = within(client.watch_x509()).await.unwrap();
        within(updates.next()).await.unwrap();
        let Fixture { handle, .. } = f;
        within(handle.shutdown()).await;
        assert!(within(updates.next()).await.is_err());
        assert!(!path.exists());

        // A stale socket (its server died without cleaning up) is replaced...
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let pki = TestPki::new("td.example");
        let (_tx, rx) = watch::channel(Arc::new(view_of(&pki, &pki.id("/n"), &[])));
        let audit: Arc<dyn AuditSink> = Arc::new(MemoryAudit::default());
        let handle = serve(
            &stale,
            pki.id("/n"),
            rx.clone(),
            audit.clone(),
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        drop(handle);
        assert!(!stale.exists(), "dropping the handle leaves the socket");

        // ...but a file that is not a socket is never removed.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = serve(&file, pki.id("/n"), rx, audit, Arc::new(SystemClock))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
