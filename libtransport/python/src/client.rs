//! `transportd._native.Client`: a blocking client over `libtransport::Client`, and the
//! small value types its methods return.
//!
//! Every method that touches the network or the disk runs on the module's runtime with
//! the GIL released (`runtime::block_on`). Names are checked here, before anything is
//! sent; failures become the typed exceptions of `transportd.errors` (`error.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use certs::SpiffeId;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::workload::WorkloadIdentity;
use libtransport::{ClientConfig, FetchOptions, Path as Transport, PushOptions, TransportConfig};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::buffer::{Buffer, WritableBuffer};
use crate::error::{self, Failure};
use crate::identity::IdentitySource;
use crate::runtime::{block_on, runtime};

/// A connection to one node, authenticated by our SVID, re-established on demand.
#[pyclass(module = "transportd._native", frozen)]
pub(crate) struct Client {
    inner: libtransport::Client,
    rt: Arc<Runtime>,
    /// The process that made the client: a forked child cannot use it.
    pid: u32,
    /// Follows the Workload API's rotations while the client lives (None with files).
    _workload: Option<WorkloadIdentity>,
}

#[pymethods]
impl Client {
    /// Connects to `node` (`HOST:PORT`) and completes the first round trip.
    /// `connect_timeout` (seconds) bounds each path's handshake (default 10 s).
    #[new]
    #[pyo3(signature = (
        node, *, identity=None, svid=None, key=None, bundle=None, workload_socket=None,
        workload_id=None, server_id=None, path="auto", connect_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments.
    fn new(
        py: Python<'_>,
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
        let paths: &[Transport] = match path {
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
        let source = IdentitySource {
            dir: identity,
            svid,
            key,
            bundle,
            workload_socket,
            workload_id,
        };
        let rt = runtime()?;
        let connected = block_on(py, &rt, async move {
            let identity = source.load().await?;
            let mut builder = ClientConfig::builder()
                .identity(identity.handle.clone())
                .transport(transport);
            if let Some(id) = server_id {
                builder = builder.server_id(id);
            }
            let addr = resolve(&node).await?;
            let client = libtransport::Client::connect_any(builder.build(), addr, paths)
                .await
                .map_err(|e| error::connect(&e))?;
            Ok::<_, Failure>((client, identity.workload))
        })?;
        let (inner, workload) = connected?;
        Ok(Self {
            inner,
            rt,
            pid: std::process::id(),
            _workload: workload,
        })
    }

    /// The server's SPIFFE ID, as its SVID proved it.
    #[getter]
    fn server_id(&self) -> String {
        self.inner.server().id.to_string()
    }

    /// The transport in use: `"quic"` or `"tcp"`.
    #[getter]
    fn path(&self) -> String {
        self.inner.path().to_string()
    }

    /// Datasets this identity may see.
    fn list_datasets(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.usable()?;
        let names =
            block_on(py, &self.rt, self.inner.list_datasets())?.map_err(|e| error::request(&e))?;
        Ok(names.iter().map(|n| n.as_str().to_owned()).collect())
    }

    /// Objects of `dataset` whose path starts with `prefix`, in path order.
    #[pyo3(signature = (dataset, prefix=""))]
    fn list_objects(
        &self,
        py: Python<'_>,
        dataset: &str,
        prefix: &str,
    ) -> PyResult<Vec<ObjectEntry>> {
        self.usable()?;
        let dataset = dataset_name(dataset)?;
        let entries = block_on(py, &self.rt, self.inner.list_objects(&dataset, prefix))?
            .map_err(|e| error::request(&e))?;
        Ok(entries
            .into_iter()
            .map(|e| ObjectEntry {
                path: e.path.as_str().to_owned(),
                size: e.size,
            })
            .collect())
    }

    /// An object's size, chunking and BLAKE3 root.
    fn stat(&self, py: Python<'_>, dataset: &str, object: &str) -> PyResult<ObjectStat> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let m = block_on(py, &self.rt, self.inner.stat(&dataset, &object))?
            .map_err(|e| error::request(&e))?;
        Ok(ObjectStat {
            size: m.size(),
            chunk_bytes: m.chunk_bytes(),
            chunk_count: m.chunk_count(),
            root: m.root().to_hex(),
        })
    }

    /// Bytes `start..end` of an object, every chunk they touch verified.
    fn read_range(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        start: u64,
        end: u64,
    ) -> PyResult<Buffer> {
        self.usable()?;
        if end < start {
            return Err(PyValueError::new_err("end is before start"));
        }
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let data = block_on(
            py,
            &self.rt,
            self.inner.read_range(&dataset, &object, start..end),
        )?
        .map_err(|e| error::fetch(&e))?;
        Ok(Buffer::new(data))
    }

    /// A whole object, verified, in memory of ours; refuses one over `max_bytes`.
    #[pyo3(signature = (dataset, object, *, max_bytes=DEFAULT_MAX_BYTES))]
    fn fetch(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        max_bytes: u64,
    ) -> PyResult<Buffer> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let opts = FetchOptions::default();
        let data = block_on(
            py,
            &self.rt,
            self.inner.fetch(&dataset, &object, max_bytes, &opts),
        )?
        .map_err(|e| error::fetch(&e))?;
        Ok(Buffer::new(data))
    }

    /// A whole object, verified, into the start of the caller's writable buffer.
    fn fetch_into(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<FetchReport> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let mut dest = WritableBuffer::get(buffer)?;
        let dest = dest.as_mut_slice();
        let opts = FetchOptions::default();
        let report = block_on(
            py,
            &self.rt,
            self.inner.fetch_into(&dataset, &object, dest, &opts),
        )?
        .map_err(|e| error::fetch(&e))?;
        Ok(FetchReport::from(report))
    }

    /// A whole object into the file `dest`, which appears only once complete and verified;
    /// a rerun after an interruption resumes.
    fn fetch_to_file(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        dest: PathBuf,
    ) -> PyResult<FetchReport> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let opts = FetchOptions::default();
        let report = block_on(
            py,
            &self.rt,
            self.inner.fetch_to_file(&dataset, &object, &dest, &opts),
        )?
        .map_err(|e| error::fetch(&e))?;
        Ok(FetchReport::from(report))
    }

    /// Stores the bytes of `data` (any C-contiguous buffer of bytes, copied once) as
    /// `object` of `dataset`.
    fn push_bytes(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        data: PyBuffer<u8>,
    ) -> PyResult<PushReport> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let data = Bytes::from(data.to_vec(py)?);
        let opts = PushOptions::default();
        let report = block_on(
            py,
            &self.rt,
            self.inner.push_bytes(&dataset, &object, data, &opts),
        )?
        .map_err(|e| error::push(&e))?;
        Ok(PushReport::from(report))
    }

    /// Stores the file `src` as `object` of `dataset`.
    fn push_file(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        src: PathBuf,
    ) -> PyResult<PushReport> {
        self.usable()?;
        let (dataset, object) = (dataset_name(dataset)?, object_path(object)?);
        let opts = PushOptions::default();
        let report = block_on(
            py,
            &self.rt,
            self.inner.push_file(&dataset, &object, &src, &opts),
        )?
        .map_err(|e| error::push(&e))?;
        Ok(PushReport::from(report))
    }

    /// Closes the connection; a later call reconnects.
    fn close(&self) {
        if std::process::id() == self.pid {
            let _rt = self.rt.enter();
            self.inner.close();
        }
    }
}

impl Client {
    /// Refuses to run in a process forked after the client was made: its connections and
    /// runtime threads stayed in the parent.
    fn usable(&self) -> Result<(), Failure> {
        if std::process::id() == self.pid {
            Ok(())
        } else {
            Err(error::local(
                "this Client was made before the process forked; make one in this process \
                 (in a DataLoader, in each worker)",
            ))
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

/// One object of a listing.
#[pyclass(module = "transportd._native", frozen, get_all)]
pub(crate) struct ObjectEntry {
    /// Path within the dataset.
    path: String,
    /// Size in bytes.
    size: u64,
}

#[pymethods]
impl ObjectEntry {
    fn __repr__(&self) -> String {
        format!("ObjectEntry(path={:?}, size={})", self.path, self.size)
    }
}

/// An object's manifest, in brief.
#[pyclass(module = "transportd._native", frozen, get_all)]
pub(crate) struct ObjectStat {
    /// Size in bytes.
    size: u64,
    /// Bytes per chunk (the last may be shorter).
    chunk_bytes: u32,
    /// Chunks in the object.
    chunk_count: u32,
    /// The BLAKE3 root over the chunks' hashes, hex.
    root: String,
}

#[pymethods]
impl ObjectStat {
    fn __repr__(&self) -> String {
        format!(
            "ObjectStat(size={}, chunk_bytes={}, chunk_count={}, root={:?})",
            self.size, self.chunk_bytes, self.chunk_count, self.root
        )
    }
}

/// What a pull did.
#[pyclass(module = "transportd._native", frozen, get_all)]
pub(crate) struct FetchReport {
    /// The server's SPIFFE ID.
    server: String,
    /// `quic`, `tcp` or `rdma`.
    path: String,
    /// Object size.
    size: u64,
    /// Bytes received over the network (less than `size` when resuming).
    fetched_bytes: u64,
    /// Chunks in the object.
    chunks: u32,
    /// Chunks already present and verified before this pull.
    chunks_reused: u32,
    /// Chunks fetched by this pull.
    chunks_fetched: u32,
    /// The object's BLAKE3 root, hex.
    root: String,
    /// Wall time in seconds.
    elapsed: f64,
    /// Reconnections needed.
    retries: u32,
}

impl From<libtransport::FetchReport> for FetchReport {
    fn from(r: libtransport::FetchReport) -> Self {
        Self {
            server: r.server.to_string(),
            path: r.path.as_str().to_owned(),
            size: r.size,
            fetched_bytes: r.fetched_bytes,
            chunks: r.chunks,
            chunks_reused: r.chunks_reused,
            chunks_fetched: r.chunks_fetched,
            root: r.root.to_hex(),
            elapsed: r.elapsed.as_secs_f64(),
            retries: r.retries,
        }
    }
}

#[pymethods]
impl FetchReport {
    fn __repr__(&self) -> String {
        format!(
            "FetchReport(size={}, path={:?}, root={:?}, elapsed={:.3})",
            self.size, self.path, self.root, self.elapsed
        )
    }
}

/// What a push did.
#[pyclass(module = "transportd._native", frozen, get_all)]
pub(crate) struct PushReport {
    /// The server's SPIFFE ID.
    server: String,
    /// `quic` or `tcp`.
    path: String,
    /// Object size.
    size: u64,
    /// Bytes sent over the network (less than `size` when resuming).
    sent_bytes: u64,
    /// Chunks in the object.
    chunks: u32,
    /// Chunks the server already held.
    chunks_skipped: u32,
    /// The object's BLAKE3 root as the server committed it, hex.
    root: String,
    /// Wall time in seconds, including hashing the source.
    elapsed: f64,
    /// Reconnections needed.
    retries: u32,
}

impl From<libtransport::PushReport> for PushReport {
    fn from(r: libtransport::PushReport) -> Self {
        Self {
            server: r.server.to_string(),
            path: r.path.to_string(),
            size: r.size,
            sent_bytes: r.sent_bytes,
            chunks: r.chunks,
            chunks_skipped: r.chunks_skipped,
            root: r.root.to_hex(),
            elapsed: r.elapsed.as_secs_f64(),
            retries: r.retries,
        }
    }
}

#[pymethods]
impl PushReport {
    fn __repr__(&self) -> String {
        format!(
            "PushReport(size={}, path={:?}, root={:?}, elapsed={:.3})",
            self.size, self.path, self.root, self.elapsed
        )
    }
}

/// The digest logs use in place of an object's path (which may carry a patient
/// identifier): BLAKE3 of the path, hex.
#[pyfunction]
pub(crate) fn object_digest(object: &str) -> PyResult<String> {
    Ok(object_path(object)?.digest().to_hex())
}

fn dataset_name(s: &str) -> Result<DatasetName, Failure> {
    DatasetName::new(s).map_err(|e| error::name("dataset", &e))
}

fn object_path(s: &str) -> Result<ObjectPath, Failure> {
    ObjectPath::new(s).map_err(|e| error::name("object", &e))
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
const DEFAULT_MAX_BYTES: u64 = 16 << 30;
