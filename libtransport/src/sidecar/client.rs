//! A local process's client of a sidecar: `transportd node` serving its local data API on a
//! Unix socket. The calls are [`crate::Client`]'s (list, stat, read, fetch, push), answered
//! by the node's daemon, which fetches from storage nodes with the caller's own workload
//! SVID and keeps a shared encrypted cache.
//!
//! * **Whole objects are not copied through the socket**: a fetch's answer carries a sealed
//!   read-only memory file (`memfd`), which [`SidecarClient::fetch`] maps (the returned
//!   [`Bytes`] owns the mapping), [`SidecarClient::fetch_into`] reads into the caller's
//!   memory and [`SidecarClient::fetch_to_file`] writes to a file beside the destination,
//!   renamed into place once complete. The file must be sealed against writes, growth and
//!   shrinking, and be the size the answer states; anything else is refused
//!   ([`SidecarError::NotSealed`], [`SidecarError::Protocol`]).
//! * **Small reads come inline**, at most [`MAX_INLINE`] bytes per request: a longer
//!   [`SidecarClient::read_range`] is several requests on one connection.
//! * **Pushes hand over a descriptor**: a sealed memfd holding the bytes, or the opened file.
//! * **Connections**: blocking `UnixStream`s, used on tokio's blocking threads, one request
//!   at a time each; a few idle ones are kept for the next calls, for at most
//!   [`MAX_IDLE_AGE`] (the daemon closes connections idle longer than that). A connection
//!   on which anything failed mid-exchange is dropped, never reused; an idle one the daemon
//!   closed (it restarted) is noticed and dropped before use.
//! * **A hung daemon is noticed**: while it serves a request the daemon says so every
//!   [`HEARTBEAT`](super::HEARTBEAT); a call that hears nothing for the answer timeout
//!   ([`DEFAULT_ANSWER_TIMEOUT`], [`SidecarClient::with_answer_timeout`]) fails with
//!   [`SidecarError::NoAnswer`], retriable, however long the fetch behind it takes.
//! * Every byte read from the socket is counted ([`SidecarClient::bytes_through_socket`]).
//!
//! Not here: the wire itself (the parent module), the daemon's side of it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::RecvFlags;

use super::{
    FrameError, LocalAnswer, LocalRequest, MAX_INLINE, SOCKET_ENV, answer_body, recv_frame_counted,
    send_frame,
};
use crate::clock::{Clock, SystemClock};
use crate::proto::{DatasetName, Digest, ObjectEntry, ObjectPath};

/// A client of a sidecar's local data API. Clones share the idle connections and the byte
/// counter; [`SidecarClient::with_node`] makes one that asks another storage node.
#[derive(Debug, Clone)]
pub struct SidecarClient {
    shared: Arc<Shared>,
    /// The storage node every request names (`None`: the sidecar's first).
    node: Option<String>,
    /// How long a call waits hearing nothing from the daemon.
    answer_timeout: Duration,
}

/// How long a call waits by default while the daemon sends nothing, not even that it is
/// still working (it says so every [`HEARTBEAT`](super::HEARTBEAT)).
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle connection is kept for the next call. The daemon closes connections
/// idle for twice as long, so a kept one is still open.
pub const MAX_IDLE_AGE: Duration = Duration::from_secs(60);

/// An object's size and manifest layout, as the sidecar states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarStat {
    /// Size in bytes.
    pub size: u64,
    /// The manifest's BLAKE3 root.
    pub root: Digest,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_bytes: u64,
    /// Chunks in the object.
    pub chunks: u64,
}

/// What a whole-object fetch into the caller's memory or a file got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarFetch {
    /// The object's size (the bytes written).
    pub size: u64,
    /// Its manifest root.
    pub root: Digest,
    /// Served from the node's cache (true), or fetched from the storage node for this call.
    pub cached: bool,
}

/// A push the storage node stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarPush {
    /// The object's size.
    pub size: u64,
    /// Its manifest root, as the storage node committed it.
    pub root: Digest,
}

/// Why a sidecar call failed. [`SidecarError::code`] gives a stable label: the sidecar's
/// own code when it answered with one, else this side's (`unavailable`, `protocol`,
/// `local`, `too_large`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// No socket was named, and the environment does not name one.
    #[error("no sidecar socket: set {SOCKET_ENV} to the path of the node's sidecar socket")]
    NoSocket,
    /// This process (its uid, gid and executable) matches no registration entry of the
    /// sidecar, so it has no identity there.
    #[error(
        "this process matches no registration entry of the sidecar: ask its operator for a \
         registration entry for this uid and executable ({message})"
    )]
    PermissionDenied {
        /// The sidecar's words.
        message: String,
    },
    /// No such dataset or object, or this caller may not access it: the same answer.
    #[error("not found: {message}")]
    NotFound {
        /// The sidecar's words.
        message: String,
    },
    /// Refused or failed with another of the sidecar's codes (`busy`, `unreachable`,
    /// `unavailable`, `corrupt`, `range`, ...), or refused here before anything was sent
    /// (`range`: an end before the start).
    #[error("sidecar refused the request ({code}): {message}")]
    Refused {
        /// The stable code.
        code: String,
        /// In words.
        message: String,
    },
    /// The object is larger than the caller's limit or buffer.
    #[error("object of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The object's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The descriptor handed over is not sealed against changes, so its contents could
    /// change while read: refused, never mapped.
    #[error("the object's memory file is not sealed against changes (seals {seals:#x})")]
    NotSealed {
        /// The seals it carries.
        seals: u32,
    },
    /// The socket failed: missing, refused, or closed in the middle of a call. The sidecar
    /// is not running or was restarted: retry.
    #[error("the sidecar is not running or was restarted, retry: {0}")]
    Unavailable(#[source] io::Error),
    /// The daemon took the connection but sent nothing, not even that it was still
    /// working, for this long: it is hung or overloaded. Retriable (code `unavailable`).
    #[error(
        "the sidecar sent nothing for {after:?}: it is hung or overloaded; retry, and if it \
         persists look at the node's transportd (its log and /readyz)"
    )]
    NoAnswer {
        /// How long the call waited.
        after: Duration,
    },
    /// The sidecar broke the protocol (a malformed or unexpected answer).
    #[error("sidecar protocol: {0}")]
    Protocol(String),
    /// Something failed on this side (a file, a thread).
    #[error("local: {0}")]
    Local(#[source] io::Error),
}

impl SidecarClient {
    /// Connects to the sidecar listening at `socket` (one connection, kept for the first
    /// call). Fails with [`SidecarError::Unavailable`] if nothing listens there.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, SidecarError> {
        let shared = Arc::new(Shared {
            socket: socket.as_ref().to_path_buf(),
            idle: Mutex::new(Vec::new()),
            through: AtomicU64::new(0),
        });
        let s = shared.clone();
        let sock = blocking(move || s.open()).await?;
        shared.put_idle(sock);
        Ok(Self {
            shared,
            node: None,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        })
    }

    /// The same client (sharing connections), whose calls give up after `timeout` without
    /// a word from the daemon ([`SidecarError::NoAnswer`]) instead of
    /// [`DEFAULT_ANSWER_TIMEOUT`]. A timeout shorter than twice the daemon's
    /// [`HEARTBEAT`](super::HEARTBEAT) may give up on a long fetch that is progressing.
    pub fn with_answer_timeout(&self, timeout: Duration) -> Self {
        Self {
            answer_timeout: timeout.max(Duration::from_millis(1)),
            ..self.clone()
        }
    }

    /// Connects to the socket `$TRANSPORTD_SIDECAR_SOCKET` names ([`SOCKET_ENV`]); without
    /// it, [`SidecarError::NoSocket`].
    pub async fn from_env() -> Result<Self, SidecarError> {
        Self::from_lookup(|name| std::env::var_os(name)).await
    }

    /// [`SidecarClient::from_env`] with the environment looked up by `lookup`.
    pub async fn from_lookup(
        lookup: impl FnOnce(&str) -> Option<OsString>,
    ) -> Result<Self, SidecarError> {
        match lookup(SOCKET_ENV) {
            Some(path) if !path.is_empty() => Self::connect(PathBuf::from(path)).await,
            _ => Err(SidecarError::NoSocket),
        }
    }

    /// The same client (sharing connections), asking the storage node `node` (one of the
    /// sidecar's) instead of the sidecar's first.
    pub fn with_node(&self, node: impl Into<String>) -> Self {
        Self {
            node: Some(node.into()),
            ..self.clone()
        }
    }

    /// The storage node requests name, if any.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The sidecar's socket.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// Bytes read from the socket so far, by this client and its clones: frames and inline
    /// bodies, never the contents of a descriptor handed over.
    pub fn bytes_through_socket(&self) -> u64 {
        self.shared.through.load(Ordering::Relaxed)
    }

    /// Datasets this caller may see.
    pub async fn list_datasets(&self) -> Result<Vec<DatasetName>, SidecarError> {
        let req = LocalRequest::Datasets {
            node: self.node.clone(),
        };
        self.call(req, |answer| {
            let LocalAnswer::Datasets { names } = answer else {
                return Err(unexpected(&answer));
            };
            names
                .iter()
                .map(|n| {
                    DatasetName::new(n)
                        .map_err(|_| SidecarError::Protocol("invalid dataset name listed".into()))
                })
                .collect()
        })
        .await
    }

    /// Every object of `dataset` whose path starts with `prefix`.
    pub async fn list_objects(
        &self,
        dataset: &DatasetName,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, SidecarError> {
        let req = LocalRequest::List {
            node: self.node.clone(),
            dataset: dataset.as_str().to_owned(),
            prefix: prefix.to_owned(),
        };
        self.call(req, |answer| {
            let LocalAnswer::Listing { objects } = answer else {
                return Err(unexpected(&answer));
            };
            objects
                .into_iter()
                .map(|(path, size)| {
                    let path = ObjectPath::new(&path)
                        .map_err(|_| SidecarError::Protocol("invalid object path listed".into()))?;
                    Ok(ObjectEntry { path, size })
                })
                .collect()
        })
        .await
    }

    /// An object's size, manifest root and chunk layout.
    pub async fn stat(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> Result<SidecarStat, SidecarError> {
        let req = LocalRequest::Stat {
            node: self.node.clone(),
            dataset: dataset.as_str().to_owned(),
            object: object.as_str().to_owned(),
        };
        self.call(req, |answer| {
            let LocalAnswer::Stat {
                size,
                root,
                chunk_bytes,
                chunks,
            } = answer
            else {
                return Err(unexpected(&answer));
            };
            Ok(SidecarStat {
                size,
                root: digest(&root)?,
                chunk_bytes,
                chunks,
            })
        })
        .await
    }

    /// Bytes `range` of an object. A range longer than [`MAX_INLINE`] is asked for in
    /// pieces of at most that, one after another on one connection.
    pub async fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, SidecarError> {
        if range.end < range.start {
            return Err(SidecarError::Refused {
                code: "range".into(),
                message: "the range ends before it starts".into(),
            });
        }
        let len = range.end - range.start;
        let total = usize::try_from(len).map_err(|_| SidecarError::TooLarge {
            size: len,
            limit: usize::MAX as u64,
        })?;
        let (node, dataset, object) = self.names(dataset, object);
        self.with_conn(move |conn| {
            let mut out: Option<BytesMut> = None;
            for piece in pieces(range, MAX_INLINE) {
                let want = piece.end - piece.start;
                let req = LocalRequest::Read {
                    node: node.clone(),
                    dataset: dataset.clone(),
                    object: object.clone(),
                    start: piece.start,
                    end: piece.end,
                };
                let (answer, body, _) = conn.exchange(&req, None)?;
                if !matches!(answer, LocalAnswer::Inline { .. }) {
                    return Err(unexpected(&answer));
                }
                if body.len() as u64 != want {
                    return Err(SidecarError::Protocol(format!(
                        "a read of {want} bytes answered with {}",
                        body.len()
                    )));
                }
                if total as u64 == want {
                    // One piece: its body is the answer, no copy.
                    return Ok(Bytes::from(body));
                }
                out.get_or_insert_with(|| BytesMut::with_capacity(total))
                    .extend_from_slice(&body);
            }
            Ok(out.map(BytesMut::freeze).unwrap_or_default())
        })
        .await
    }

    /// A whole object, refusing one over `limit` bytes: the sealed memory file the sidecar
    /// hands over, mapped read-only (no copy; the mapping lives as long as the returned
    /// bytes and their clones).
    pub async fn fetch(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        limit: u64,
    ) -> Result<Bytes, SidecarError> {
        let req = self.fetch_request(dataset, object);
        self.with_conn(move |conn| {
            let (sealed, _) = conn.fetch(&req)?;
            if sealed.size > limit {
                return Err(SidecarError::TooLarge {
                    size: sealed.size,
                    limit,
                });
            }
            sealed.map()
        })
        .await
    }

    /// A whole object into the start of `dest`, read from the sealed memory file the sidecar
    /// hands over (one copy). Refuses an object larger than `dest`.
    pub async fn fetch_into(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &mut [u8],
    ) -> Result<SidecarFetch, SidecarError> {
        let req = self.fetch_request(dataset, object);
        let (sealed, done) = self.with_conn(move |conn| conn.fetch(&req)).await?;
        let size = usize::try_from(sealed.size)
            .ok()
            .filter(|n| *n <= dest.len())
            .ok_or(SidecarError::TooLarge {
                size: sealed.size,
                limit: dest.len() as u64,
            })?;
        // A copy out of memory (the file lives in RAM), on the caller's task: `dest` is
        // borrowed, so it cannot go to a blocking thread.
        sealed
            .file
            .read_exact_at(&mut dest[..size], 0)
            .map_err(SidecarError::Local)?;
        Ok(done)
    }

    /// A whole object into the file `dest`: written beside it under a temporary name,
    /// synced, then renamed over `dest`. Nothing partial is ever left under `dest`'s name,
    /// and on a failure the temporary file is removed.
    pub async fn fetch_to_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &Path,
    ) -> Result<SidecarFetch, SidecarError> {
        let req = self.fetch_request(dataset, object);
        let dest = dest.to_path_buf();
        // The work runs on a blocking thread, which a dropped call does not stop: the
        // file is put in place only if the call is still awaited by then.
        let wanted = Arc::new(AtomicBool::new(true));
        let _dropped = Unwanted(wanted.clone());
        self.with_conn(move |conn| {
            // Made first, so an unwritable destination fails before the sidecar works.
            let mut tmp = TempFile::beside(&dest)?;
            let (sealed, done) = conn.fetch(&req)?;
            let data = sealed.map()?;
            tmp.file.write_all(&data).map_err(SidecarError::Local)?;
            if !wanted.load(Ordering::SeqCst) {
                return Err(SidecarError::Local(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the call was cancelled: nothing was put in place",
                )));
            }
            tmp.persist(&dest)?;
            Ok(done)
        })
        .await
    }

    /// Stores `data` as `object` of `dataset` on the storage node, as this caller: the bytes
    /// go to the sidecar in a sealed memory file.
    pub async fn push_bytes(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        data: Bytes,
    ) -> Result<SidecarPush, SidecarError> {
        let (node, dataset, object) = self.names(dataset, object);
        self.with_conn(move |conn| {
            let fd = sealed_memfd(&data).map_err(SidecarError::Local)?;
            let req = LocalRequest::Push {
                node,
                dataset,
                object,
            };
            let pushed = conn.push(&req, fd.as_fd())?;
            if pushed.size != data.len() as u64 {
                return Err(SidecarError::Protocol(format!(
                    "a push of {} bytes answered as {}",
                    data.len(),
                    pushed.size
                )));
            }
            Ok(pushed)
        })
        .await
    }

    /// Stores the file `src` as `object` of `dataset`: the opened file goes to the sidecar,
    /// which reads it from its start.
    pub async fn push_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        src: &Path,
    ) -> Result<SidecarPush, SidecarError> {
        let (node, dataset, object) = self.names(dataset, object);
        let src = src.to_path_buf();
        self.with_conn(move |conn| {
            let file = File::open(&src).map_err(SidecarError::Local)?;
            let meta = file.metadata().map_err(SidecarError::Local)?;
            if !meta.is_file() {
                return Err(SidecarError::Local(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only a regular file can be pushed",
                )));
            }
            let req = LocalRequest::Push {
                node,
                dataset,
                object,
            };
            conn.push(&req, file.as_fd())
        })
        .await
    }

    /// Asks the sidecar to fetch `objects` (`(dataset, object)`, in the order wanted) into
    /// its cache meanwhile; returns how many it took on.
    pub async fn prefetch(
        &self,
        objects: &[(DatasetName, ObjectPath)],
    ) -> Result<u64, SidecarError> {
        let req = LocalRequest::Prefetch {
            node: self.node.clone(),
            objects: objects
                .iter()
                .map(|(d, o)| (d.as_str().to_owned(), o.as_str().to_owned()))
                .collect(),
        };
        self.call(req, |answer| match answer {
            LocalAnswer::Prefetching { count } => Ok(count),
            other => Err(unexpected(&other)),
        })
        .await
    }

    /// One request, one answer (which carries no body or descriptor we keep), taken by
    /// `take` (on the connection's thread, so that an answer it refuses costs the
    /// connection).
    async fn call<T: Send + 'static>(
        &self,
        req: LocalRequest,
        take: impl FnOnce(LocalAnswer) -> Result<T, SidecarError> + Send + 'static,
    ) -> Result<T, SidecarError> {
        self.with_conn(move |conn| take(conn.exchange(&req, None)?.0))
            .await
    }

    /// Runs `work` with a connection, on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Conn<'_>) -> Result<T, SidecarError> + Send + 'static,
    ) -> Result<T, SidecarError> {
        let (shared, timeout) = (self.shared.clone(), self.answer_timeout);
        blocking(move || shared.run(timeout, work)).await
    }

    fn fetch_request(&self, dataset: &DatasetName, object: &ObjectPath) -> LocalRequest {
        let (node, dataset, object) = self.names(dataset, object);
        LocalRequest::Fetch {
            node,
            dataset,
            object,
        }
    }

    fn names(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> (Option<String>, String, String) {
        (
            self.node.clone(),
            dataset.as_str().to_owned(),
            object.as_str().to_owned(),
        )
    }
}

impl SidecarError {
    /// The stable label of what failed: the sidecar's code when it answered with one
    /// (`permission_denied`, `not_found`, `busy`, `unreachable`, ...), else this side's:
    /// `unavailable` (the socket failed), `protocol` (a malformed answer, or a descriptor
    /// not sealed), `too_large` (over the caller's limit), `local`.
    pub fn code(&self) -> &str {
        match self {
            Self::NoSocket | Self::Local(_) => "local",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::NotFound { .. } => "not_found",
            Self::Refused { code, .. } => code,
            Self::TooLarge { .. } => "too_large",
            Self::NotSealed { .. } | Self::Protocol(_) => "protocol",
            Self::Unavailable(_) | Self::NoAnswer { .. } => "unavailable",
        }
    }

    /// Whether the same call may succeed later: the sidecar was not there
    /// (`unavailable`, also the sidecar's own answer of that code), was busy, or could not
    /// reach the storage node.
    pub fn is_retriable(&self) -> bool {
        matches!(self.code(), "unavailable" | "busy" | "unreachable")
    }
}

impl From<SidecarError> for io::Error {
    fn from(e: SidecarError) -> Self {
        let kind = match &e {
            SidecarError::NotFound { .. } => io::ErrorKind::NotFound,
            SidecarError::PermissionDenied { .. } => io::ErrorKind::PermissionDenied,
            SidecarError::Unavailable(_) => io::ErrorKind::ConnectionAborted,
            SidecarError::NoAnswer { .. } => io::ErrorKind::TimedOut,
            SidecarError::NoSocket => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}

/// What clients share: the socket's path, idle connections, the byte counter.
#[derive(Debug)]
struct Shared {
    socket: PathBuf,
    /// Idle connections, with when each went idle.
    idle: Mutex<Vec<(UnixStream, Instant)>>,
    through: AtomicU64,
}

impl Shared {
    /// Runs `work` on an idle connection, or a new one; keeps the connection for the next
    /// call only if every exchange on it completed.
    fn run<T>(
        &self,
        timeout: Duration,
        work: impl FnOnce(&mut Conn<'_>) -> Result<T, SidecarError>,
    ) -> Result<T, SidecarError> {
        let sock = match self.take_idle() {
            Some(s) => s,
            None => self.open()?,
        };
        sock.set_read_timeout(Some(timeout))
            .and_then(|()| sock.set_write_timeout(Some(timeout)))
            .map_err(SidecarError::Local)?;
        let mut conn = Conn {
            sock,
            shared: self,
            in_step: true,
            timeout,
        };
        let out = work(&mut conn);
        // A connection whose peer broke the protocol is not trusted with another request.
        let broken = matches!(
            out,
            Err(SidecarError::Protocol(_) | SidecarError::NotSealed { .. })
        );
        if conn.in_step && !broken {
            self.put_idle(conn.sock);
        } else if matches!(out, Err(SidecarError::Unavailable(_))) {
            // The daemon went away: the other idle connections went with it.
            self.lock().clear();
        }
        out
    }

    fn open(&self) -> Result<UnixStream, SidecarError> {
        UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput => SidecarError::Local(
                io::Error::new(e.kind(), format!("opening the sidecar's socket: {e}")),
            ),
            _ => SidecarError::Unavailable(e),
        })
    }

    /// An idle connection the daemon has not closed meanwhile, nor is about to (idle for
    /// less than [`MAX_IDLE_AGE`]).
    fn take_idle(&self) -> Option<UnixStream> {
        let now = SystemClock.instant();
        loop {
            let (sock, since) = self.lock().pop()?;
            if now.saturating_duration_since(since) < MAX_IDLE_AGE && idle_and_open(&sock) {
                return Some(sock);
            }
        }
    }

    fn put_idle(&self, sock: UnixStream) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push((sock, SystemClock.instant()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(UnixStream, Instant)>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection in use.
struct Conn<'a> {
    sock: UnixStream,
    shared: &'a Shared,
    /// Every request sent so far was answered in full: the next may go on it.
    in_step: bool,
    /// The socket's read and write timeout: how long the daemon may say nothing.
    timeout: Duration,
}

impl Conn<'_> {
    /// Sends `req` (with `fd`) and reads its answer. An error answer becomes its
    /// [`SidecarError`], leaving the connection usable; a failed exchange does not.
    fn exchange(
        &mut self,
        req: &LocalRequest,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(LocalAnswer, Vec<u8>, Option<OwnedFd>), SidecarError> {
        self.in_step = false;
        if let Err(e) = send_frame(&self.sock, req, &[], fd) {
            return Err(self.unsent(e));
        }
        loop {
            let mut counted = 0;
            let got = recv_frame_counted(&self.sock, answer_body, MAX_INLINE, &mut counted);
            self.shared.through.fetch_add(counted, Ordering::Relaxed);
            match got.map_err(|e| self.silent(e))? {
                // The daemon is still at it: the timeout starts again.
                (LocalAnswer::Working, _, _) => continue,
                (LocalAnswer::Error { code, message }, _, _) => {
                    self.in_step = true;
                    return Err(refused(code, message));
                }
                answer => {
                    self.in_step = true;
                    return Ok(answer);
                }
            }
        }
    }

    /// A request that could not be sent. A daemon that turns a caller away (`busy`)
    /// answers and closes without reading the request: its answer, if it left one, says
    /// more than the broken pipe.
    fn unsent(&self, e: FrameError) -> SidecarError {
        let closed = matches!(&e, FrameError::Io(io) if matches!(
            io.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ));
        if closed {
            let mut counted = 0;
            let left = recv_frame_counted(&self.sock, answer_body, MAX_INLINE, &mut counted);
            self.shared.through.fetch_add(counted, Ordering::Relaxed);
            if let Ok((LocalAnswer::Error { code, message }, _, _)) = left {
                return refused(code, message);
            }
        }
        self.silent(e)
    }

    /// A frame that failed: the socket's timeout passing is the daemon saying nothing.
    fn silent(&self, e: FrameError) -> SidecarError {
        match e {
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                SidecarError::NoAnswer {
                    after: self.timeout,
                }
            }
            e => frame_error(e),
        }
    }

    /// A `Fetch`: the sealed memory file, checked, and what the answer said of it.
    fn fetch(&mut self, req: &LocalRequest) -> Result<(SealedFile, SidecarFetch), SidecarError> {
        let (answer, _, fd) = self.exchange(req, None)?;
        let LocalAnswer::Mapped { size, root, cached } = answer else {
            return Err(unexpected(&answer));
        };
        let fd =
            fd.ok_or_else(|| SidecarError::Protocol("a fetch answered without a file".into()))?;
        let sealed = SealedFile::check(fd, size)?;
        let done = SidecarFetch {
            size,
            root: digest(&root)?,
            cached,
        };
        Ok((sealed, done))
    }

    /// A `Push` handing over `fd`.
    fn push(
        &mut self,
        req: &LocalRequest,
        fd: BorrowedFd<'_>,
    ) -> Result<SidecarPush, SidecarError> {
        let (answer, _, _) = self.exchange(req, Some(fd))?;
        let LocalAnswer::Pushed { size, root } = answer else {
            return Err(unexpected(&answer));
        };
        Ok(SidecarPush {
            size,
            root: digest(&root)?,
        })
    }
}

/// A memory file sealed against writes, growth, shrinking and further seals, of the size
/// its answer stated: its contents cannot change for as long as it exists.
struct SealedFile {
    file: File,
    size: u64,
}

impl SealedFile {
    /// Checks `fd`'s seals and size; refuses a file that could change under a reader.
    fn check(fd: OwnedFd, size: u64) -> Result<Self, SidecarError> {
        // Not a memfd (a regular file, a pipe) has no seals to show: EINVAL.
        let seals =
            rustix::fs::fcntl_get_seals(&fd).map_err(|_| SidecarError::NotSealed { seals: 0 })?;
        if !seals.contains(REQUIRED_SEALS) {
            return Err(SidecarError::NotSealed {
                seals: seals.bits(),
            });
        }
        let file = File::from(fd);
        let len = file.metadata().map_err(SidecarError::Local)?.len();
        if len != size {
            return Err(SidecarError::Protocol(format!(
                "a file of {len} bytes for an object of {size}"
            )));
        }
        Ok(Self { file, size })
    }

    /// Maps the file read-only; the bytes own the mapping.
    #[allow(unsafe_code)] // The one map of the sidecar's client; see ARCHITECTURE.md.
    fn map(self) -> Result<Bytes, SidecarError> {
        if self.size == 0 {
            return Ok(Bytes::new());
        }
        let len = usize::try_from(self.size).map_err(|_| SidecarError::TooLarge {
            size: self.size,
            limit: usize::MAX as u64,
        })?;
        // SAFETY: a mapping is sound only if the file under it does not change while it
        // lives. `check` made sure it cannot, whoever else holds it: the file carries
        // F_SEAL_WRITE (no write(2) and no writable shared mapping, and the kernel would
        // not have let the seal on while one existed), F_SEAL_SHRINK and F_SEAL_GROW (its
        // length is fixed, so no page of the mapping can vanish into SIGBUS) and
        // F_SEAL_SEAL (seals can neither be added nor taken off), and its length is `len`.
        // The mapping is read-only and private to the returned `Bytes`, which unmaps it
        // when its last clone drops.
        // Populated up front (one call rather than a fault per page): a fetch is for all
        // of the object.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(len)
                .populate()
                .map(&self.file)
        }
        .map_err(SidecarError::Local)?;
        Ok(Bytes::from_owner(map))
    }
}

/// Clears its flag when dropped: a call's future was dropped (cancelled) or finished.
struct Unwanted(Arc<AtomicBool>);

impl Drop for Unwanted {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A file beside a destination, removed on drop unless renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    kept: bool,
}

impl TempFile {
    /// Creates a new file in `dest`'s directory, under a name of its own.
    fn beside(dest: &Path) -> Result<Self, SidecarError> {
        let name = dest.file_name().ok_or_else(|| {
            SidecarError::Local(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the destination must name a file",
            ))
        })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".sidecar-{}-{}.partial",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let path = dir.join(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(SidecarError::Local)?;
        Ok(Self {
            path,
            file,
            kept: false,
        })
    }

    /// Syncs the file and renames it over `dest`.
    fn persist(mut self, dest: &Path) -> Result<(), SidecarError> {
        self.file.sync_all().map_err(SidecarError::Local)?;
        std::fs::rename(&self.path, dest).map_err(SidecarError::Local)?;
        self.kept = true;
        // The rename is durable once the directory is synced; a failure here leaves the
        // complete file in place, so it is not reported.
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SidecarError> + Send + 'static,
) -> Result<T, SidecarError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SidecarError::Local(io::Error::other(e)))?
}

/// A memory file holding `data`, sealed against any change, its offset back at the start.
fn sealed_memfd(data: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        "transportd-push",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(data)?;
    file.rewind()?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS)?;
    Ok(fd)
}

/// `range` cut into consecutive pieces of at most `max` bytes (one empty piece for an
/// empty range, so the sidecar still checks it).
fn pieces(range: Range<u64>, max: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = range.start;
    loop {
        let end = range.end.min(at.saturating_add(max));
        out.push(at..end);
        at = end;
        if at >= range.end {
            return out;
        }
    }
}

/// Whether an idle connection is still open and quiet: the daemon closed it (it stopped or
/// restarted) if it reads as end of file, and broke the protocol if anything came unasked.
fn idle_and_open(sock: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let peeked = rustix::net::recv(sock, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT);
    matches!(peeked, Err(rustix::io::Errno::AGAIN))
}

/// A frame that failed: the socket (the sidecar went away) or its contents.
fn frame_error(e: FrameError) -> SidecarError {
    match e {
        FrameError::Io(io) => SidecarError::Unavailable(io),
        FrameError::Malformed(m) => SidecarError::Protocol(m),
    }
}

/// An error answer as its variant.
fn refused(code: String, message: String) -> SidecarError {
    match code.as_str() {
        "permission_denied" => SidecarError::PermissionDenied { message },
        "not_found" => SidecarError::NotFound { message },
        _ => SidecarError::Refused { code, message },
    }
}

/// An answer that does not answer the request (named by its kind only).
fn unexpected(answer: &LocalAnswer) -> SidecarError {
    let kind = match answer {
        LocalAnswer::Datasets { .. } => "datasets",
        LocalAnswer::Listing { .. } => "listing",
        LocalAnswer::Stat { .. } => "stat",
        LocalAnswer::Inline { .. } => "inline",
        LocalAnswer::Mapped { .. } => "mapped",
        LocalAnswer::Pushed { .. } => "pushed",
        LocalAnswer::Prefetching { .. } => "prefetching",
        LocalAnswer::Working => "working",
        LocalAnswer::Error { .. } => "error",
    };
    SidecarError::Protocol(format!("unexpected {kind} answer"))
}

fn digest(hex: &str) -> Result<Digest, SidecarError> {
    Digest::from_hex(hex)
        .ok_or_else(|| SidecarError::Protocol("a root that is not a digest".into()))
}

/// The seals a memory file must carry before it is mapped (and that pushes carry).
const REQUIRED_SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::GROW)
    .union(SealFlags::SHRINK)
    .union(SealFlags::SEAL);

/// Idle connections kept: a data loader process has a few calls in flight at most; more
/// would only hold the daemon's connection slots.
const MAX_IDLE: usize = 4;

/// Numbers temporary files of this process apart.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests;
