//! What both clients do, without Python: the constructor's options checked, connecting (to a
//! node, or to this machine's sidecar), and each call as a future that checks nothing
//! Python-side, calls libtransport (its `Client`, or its `SidecarClient`) and converts its
//! answer into the module's value types or a [`Failure`].
//!
//! The blocking client (`client.rs`) runs these futures with `runtime::block_on`; the
//! asyncio client (`aio.rs`) hands them to the event loop. Neither holds the GIL while one
//! runs, and none of them touches Python: a failure stays a [`Failure`] until the caller
//! turns it into an exception with the GIL held. Through a sidecar the answers are the
//! same types: reports name the path `"sidecar"` and, having no manifest at hand, count
//! no chunks; a fetch's bytes are the sidecar's sealed memory file, mapped.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use certs::SpiffeId;
use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::sidecar::{SidecarClient, SidecarError};
use libtransport::workload::WorkloadIdentity;
use libtransport::{ClientConfig, FetchOptions, Path as Transport, PushOptions, TransportConfig};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::buffer::Buffer;
use crate::error::{self, Failure};
use crate::identity::IdentitySource;
use crate::reports::{FetchReport, ObjectEntry, ObjectStat, PushReport};

/// Who answers a client's calls, shared by the Python client and the calls it has in
/// flight: a storage node, directly, or the sidecar of this machine. Each call below is
/// written once for both, so the two Python clients (blocking and asyncio) get both.
#[derive(Clone)]
pub(crate) enum Inner {
    /// A storage node over QUIC or TLS/TCP, through the library's client.
    Direct(Arc<Shared>),
    /// A sidecar's local data API on a Unix socket. Its calls run on the runtime's
    /// blocking threads, and a dropped call's exchange still runs to its end there: a
    /// connection goes back to the idle ones only once its answer was read whole, so a
    /// cancelled call never leaves one mid-answer for the next (see `aio.rs`).
    Sidecar(SidecarClient),
}

impl Inner {
    /// Connects to the sidecar listening at `socket`; `node` names the storage node every
    /// call asks (one of the sidecar's; by default its first).
    pub(crate) async fn sidecar(socket: PathBuf, node: Option<String>) -> Result<Self, Failure> {
        let client = SidecarClient::connect(socket)
            .await
            .map_err(|e| error::sidecar(&e))?;
        Ok(Self::Sidecar(match node {
            Some(n) => client.with_node(n),
            None => client,
        }))
    }

    /// Who answers: the node's SPIFFE ID, as its SVID proved it; through a sidecar,
    /// `sidecar:` and its socket's path (the storage node's ID is the sidecar's business).
    pub(crate) fn server_id(&self) -> String {
        match self {
            Self::Direct(c) => c.server().id.to_string(),
            Self::Sidecar(s) => format!("sidecar:{}", s.socket().display()),
        }
    }

    /// The path the bytes take: `"quic"` or `"tcp"`, or `"sidecar"`.
    pub(crate) fn path(&self) -> String {
        match self {
            Self::Direct(c) => c.path().to_string(),
            Self::Sidecar(_) => "sidecar".to_owned(),
        }
    }

    /// Through a sidecar, the bytes read from its socket so far (frames and inline reads,
    /// never a handed-over object's contents); `None` for a direct client.
    pub(crate) fn bytes_through_socket(&self) -> Option<u64> {
        match self {
            Self::Direct(_) => None,
            Self::Sidecar(s) => Some(s.bytes_through_socket()),
        }
    }

    /// The sidecar's client, for the calls only a sidecar has (`what` names the call);
    /// `TypeError` for a direct client.
    pub(crate) fn sidecar_only(&self, what: &str) -> PyResult<&SidecarClient> {
        match self {
            Self::Sidecar(s) => Ok(s),
            Self::Direct(_) => Err(PyTypeError::new_err(format!(
                "{what} needs a sidecar client (Client.sidecar or AsyncClient.sidecar)"
            ))),
        }
    }

    /// Closes a direct client's connection (a later call reconnects). A sidecar client has
    /// nothing to close but idle connections, which go with the client. Must run in the
    /// runtime's context, without the GIL (closing takes quinn's connection lock).
    pub(crate) fn close(&self) {
        if let Self::Direct(c) = self {
            c.close();
        }
    }

    /// Datasets this caller may see.
    pub(crate) async fn list_datasets(&self) -> Result<Vec<String>, Failure> {
        let names = match self {
            Self::Direct(c) => c.list_datasets().await.map_err(|e| error::request(&e))?,
            Self::Sidecar(s) => s.list_datasets().await.map_err(|e| error::sidecar(&e))?,
        };
        Ok(names.iter().map(|n| n.as_str().to_owned()).collect())
    }

    /// Objects of `dataset` whose path starts with `prefix`, in path order.
    pub(crate) async fn list_objects(
        &self,
        dataset: &DatasetName,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, Failure> {
        let entries = match self {
            Self::Direct(c) => c
                .list_objects(dataset, prefix)
                .await
                .map_err(|e| error::request(&e))?,
            Self::Sidecar(s) => s
                .list_objects(dataset, prefix)
                .await
                .map_err(|e| error::sidecar(&e))?,
        };
        Ok(entries.into_iter().map(ObjectEntry::from).collect())
    }

    /// An object's size, chunking and BLAKE3 root.
    pub(crate) async fn stat(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> Result<ObjectStat, Failure> {
        match self {
            Self::Direct(c) => c
                .stat(dataset, object)
                .await
                .map(|m| ObjectStat::from(&m))
                .map_err(|e| error::request(&e)),
            Self::Sidecar(s) => s
                .stat(dataset, object)
                .await
                .map(|st| ObjectStat::sidecar(&st))
                .map_err(|e| error::sidecar(&e)),
        }
    }

    /// Bytes `start..end` of an object, every chunk they touch verified (a sidecar is asked
    /// in pieces of at most 1 MiB).
    pub(crate) async fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        start: u64,
        end: u64,
    ) -> Result<Buffer, Failure> {
        let data = match self {
            Self::Direct(c) => c
                .read_range(dataset, object, start..end)
                .await
                .map_err(|e| error::fetch(&e))?,
            Self::Sidecar(s) => s
                .read_range(dataset, object, start..end)
                .await
                .map_err(|e| error::sidecar(&e))?,
        };
        Ok(Buffer::new(data))
    }

    /// A whole object, verified, in memory of ours (through a sidecar: its sealed memory
    /// file, mapped read-only, no copy); refuses one over `max_bytes`.
    pub(crate) async fn fetch(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        max_bytes: u64,
    ) -> Result<Buffer, Failure> {
        let data = match self {
            Self::Direct(c) => c
                .fetch(dataset, object, max_bytes, &FetchOptions::default())
                .await
                .map_err(|e| error::fetch(&e))?,
            Self::Sidecar(s) => s
                .fetch(dataset, object, max_bytes)
                .await
                .map_err(|e| error::sidecar(&e))?,
        };
        Ok(Buffer::new(data))
    }

    /// A whole object, verified, into the start of `dest` (through a sidecar, read from its
    /// memory file once the answer is in, on the caller's task).
    pub(crate) async fn fetch_into(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &mut [u8],
    ) -> Result<FetchReport, Failure> {
        match self {
            Self::Direct(c) => c
                .fetch_into(dataset, object, dest, &FetchOptions::default())
                .await
                .map(FetchReport::from)
                .map_err(|e| error::fetch(&e)),
            Self::Sidecar(s) => {
                self.timed(s.fetch_into(dataset, object, dest), FetchReport::sidecar)
                    .await
            }
        }
    }

    /// A whole object into the file `dest`, which appears only once complete and verified.
    pub(crate) async fn fetch_to_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &Path,
    ) -> Result<FetchReport, Failure> {
        match self {
            Self::Direct(c) => c
                .fetch_to_file(dataset, object, dest, &FetchOptions::default())
                .await
                .map(FetchReport::from)
                .map_err(|e| error::fetch(&e)),
            Self::Sidecar(s) => {
                self.timed(s.fetch_to_file(dataset, object, dest), FetchReport::sidecar)
                    .await
            }
        }
    }

    /// Stores `data` as `object` of `dataset`; committed only once complete and verified
    /// (through a sidecar, the bytes go over in a sealed memory file).
    pub(crate) async fn push_bytes(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        data: Bytes,
    ) -> Result<PushReport, Failure> {
        match self {
            Self::Direct(c) => c
                .push_bytes(dataset, object, data, &PushOptions::default())
                .await
                .map(PushReport::from)
                .map_err(|e| error::push(&e)),
            Self::Sidecar(s) => {
                self.timed(s.push_bytes(dataset, object, data), PushReport::sidecar)
                    .await
            }
        }
    }

    /// Stores the file `src` as `object` of `dataset` (through a sidecar, the opened file
    /// goes over).
    pub(crate) async fn push_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        src: &Path,
    ) -> Result<PushReport, Failure> {
        match self {
            Self::Direct(c) => c
                .push_file(dataset, object, src, &PushOptions::default())
                .await
                .map(PushReport::from)
                .map_err(|e| error::push(&e)),
            Self::Sidecar(s) => {
                self.timed(s.push_file(dataset, object, src), PushReport::sidecar)
                    .await
            }
        }
    }

    /// A sidecar's whole-object call (`call`), timed, and the report `report` makes of its
    /// answer (no manifest at hand: it counts no chunks).
    async fn timed<T, R>(
        &self,
        call: impl Future<Output = Result<T, SidecarError>>,
        report: fn(&str, &T, Instant) -> R,
    ) -> Result<R, Failure> {
        let started = SystemClock.instant();
        let done = call.await.map_err(|e| error::sidecar(&e))?;
        Ok(report(&self.server_id(), &done, started))
    }
}

/// The library's client and what must live as long as it. The last holder to let go of it
/// closes and drops it on a blocking thread of the runtime, never on a thread that may hold
/// the GIL: quinn logs while it holds its connection's lock, and a record on its way to
/// Python waits for the GIL (`log.rs`), so a thread holding the GIL must never wait for
/// that lock.
pub(crate) struct Shared {
    client: Option<libtransport::Client>,
    /// Follows the Workload API's rotations while the client lives (None with files).
    workload: Option<WorkloadIdentity>,
    rt: Arc<Runtime>,
    /// The process that made it: a forked child leaves it alone.
    pid: u32,
}

impl Deref for Shared {
    type Target = libtransport::Client;

    fn deref(&self) -> &libtransport::Client {
        match &self.client {
            Some(c) => c,
            None => unreachable!("the client is taken out only when dropped"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let parts = (self.client.take(), self.workload.take());
        if std::process::id() != self.pid {
            // Its connections and tasks belong to the parent's runtime, whose threads did
            // not come along: touching them could wait forever. The memory stays.
            std::mem::forget(parts);
            return;
        }
        // Blocking threads run in the runtime's context, as closing needs.
        drop(self.rt.spawn_blocking(move || {
            if let Some(client) = &parts.0 {
                client.close();
            }
            drop(parts);
        }));
    }
}

/// A client's constructor options, checked.
#[derive(Debug)]
pub(crate) struct Connect {
    node: String,
    paths: &'static [Transport],
    server_id: Option<SpiffeId>,
    transport: TransportConfig,
    source: IdentitySource,
}

impl Connect {
    /// Checks the options both clients take (see `transportd.Client`); nothing is read or
    /// sent yet.
    #[allow(clippy::too_many_arguments)] // Python keyword arguments.
    pub(crate) fn new(
        node: String,
        identity: Option<PathBuf>,
        svid: Option<PathBuf>,
        key: Option<PathBuf>,
        bundle: Option<PathBuf>,
        workload_socket: Option<String>,
        workload_id: Option<String>,
        server_id: Option<String>,
        path: &str,
        connect_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let paths: &'static [Transport] = match path {
            "auto" => &[Transport::Quic, Transport::Tcp],
            "quic" => &[Transport::Quic],
            "tcp" => &[Transport::Tcp],
            _ => {
                return Err(PyValueError::new_err(
                    "path must be \"auto\", \"quic\" or \"tcp\"",
                ));
            }
        };
        let server_id = server_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("server_id: {e}")))?;
        let mut transport = TransportConfig::default();
        if let Some(secs) = connect_timeout {
            let d = Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err("connect_timeout must be positive"))?;
            transport.handshake_timeout(d);
        }
        Ok(Self {
            node,
            paths,
            server_id,
            transport,
            source: IdentitySource {
                dir: identity,
                svid,
                key,
                bundle,
                workload_socket,
                workload_id,
            },
        })
    }

    /// Loads the identity, resolves the node and connects: the TLS handshake and a first
    /// round trip. Runs on `rt`, the module's runtime.
    pub(crate) async fn run(self, rt: Arc<Runtime>) -> Result<Inner, Failure> {
        let identity = self.source.load().await?;
        let mut builder = ClientConfig::builder()
            .identity(identity.handle.clone())
            .transport(self.transport);
        if let Some(id) = self.server_id {
            builder = builder.server_id(id);
        }
        let addr = resolve(&self.node).await?;
        let client = libtransport::Client::connect_any(builder.build(), addr, self.paths)
            .await
            .map_err(|e| error::connect(&e))?;
        Ok(Inner::Direct(Arc::new(Shared {
            client: Some(client),
            workload: identity.workload,
            rt,
            pid: std::process::id(),
        })))
    }
}

/// Asks a sidecar to fetch `objects` (in the order wanted) into its cache meanwhile;
/// returns how many it took on.
pub(crate) async fn prefetch(
    sidecar: &SidecarClient,
    objects: &[(DatasetName, ObjectPath)],
) -> Result<u64, Failure> {
    sidecar
        .prefetch(objects)
        .await
        .map_err(|e| error::sidecar(&e))
}

/// `(dataset, object)` pairs, checked.
pub(crate) fn object_names(
    objects: &[(String, String)],
) -> Result<Vec<(DatasetName, ObjectPath)>, Failure> {
    objects.iter().map(|(d, o)| names(d, o)).collect()
}

/// Checks `end` against `start` before anything is sent.
pub(crate) fn range(start: u64, end: u64) -> PyResult<(u64, u64)> {
    if end < start {
        return Err(PyValueError::new_err("end is before start"));
    }
    Ok((start, end))
}

/// A dataset name, checked.
pub(crate) fn dataset_name(s: &str) -> Result<DatasetName, Failure> {
    DatasetName::new(s).map_err(|e| error::name("dataset", &e))
}

/// An object path, checked.
pub(crate) fn object_path(s: &str) -> Result<ObjectPath, Failure> {
    ObjectPath::new(s).map_err(|e| error::name("object", &e))
}

/// A dataset name and an object path, checked.
pub(crate) fn names(dataset: &str, object: &str) -> Result<(DatasetName, ObjectPath), Failure> {
    Ok((dataset_name(dataset)?, object_path(object)?))
}

/// Refuses to run in a process forked after the client was made (`pid`): its connections
/// and runtime threads stayed in the parent. `what` names the class for the message.
pub(crate) fn usable(pid: u32, what: &str) -> Result<(), Failure> {
    if std::process::id() == pid {
        Ok(())
    } else {
        Err(error::local(&format!(
            "this {what} was made before the process forked; make one in this process \
             (in a DataLoader, in each worker)"
        )))
    }
}

async fn resolve(node: &str) -> Result<SocketAddr, Failure> {
    let bad = |why: String| error::local(&format!("resolving {node:?}: {why}"));
    tokio::net::lookup_host(node)
        .await
        .map_err(|e| bad(format!("{e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| bad("no address".to_owned()))
}

/// `fetch`'s default limit: larger objects belong in a file or the caller's own buffer.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 16 << 30;
