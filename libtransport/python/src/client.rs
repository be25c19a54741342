//! `transportd._native.Client`: the blocking client, over a node (`libtransport::Client`)
//! or, made by `Client.sidecar`, over this machine's sidecar
//! (`libtransport::sidecar::SidecarClient`): the same calls either way (`ops::Inner`). The
//! value types its methods return are in `reports.rs`.
//!
//! Every method that touches the network or the disk runs on the module's runtime with
//! the GIL released (`runtime::block_on`). Names are checked here, before anything is
//! sent; failures become the typed exceptions of `transportd.errors` (`error.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::buffer::{Buffer, WritableBuffer};
use crate::error::Failure;
use crate::ops::{self, Connect, DEFAULT_MAX_BYTES, Inner};
use crate::reports::{FetchReport, ObjectEntry, ObjectStat, PushReport};
use crate::runtime::{block_on, runtime};

/// A connection to one node, authenticated by our SVID, re-established on demand; or a
/// client of the sidecar at a Unix socket.
#[pyclass(module = "transportd._native", frozen)]
pub(crate) struct Client {
    inner: Inner,
    rt: Arc<Runtime>,
    /// The process that made the client: a forked child cannot use it.
    pid: u32,
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
        let connect = Connect::new(
            node,
            identity,
            svid,
            key,
            bundle,
            workload_socket,
            workload_id,
            server_id,
            path,
            connect_timeout,
        )?;
        crate::log::refresh(py);
        let rt = runtime()?;
        let inner = block_on(py, &rt, connect.run(rt.clone()))??;
        Ok(Self::made(inner, rt))
    }

    /// Connects to the sidecar listening at `socket`; `node` names the storage node every
    /// call asks (one of the sidecar's; by default its first).
    #[staticmethod]
    #[pyo3(signature = (socket, *, node=None))]
    fn sidecar(py: Python<'_>, socket: PathBuf, node: Option<String>) -> PyResult<Self> {
        crate::log::refresh(py);
        let rt = runtime()?;
        let inner = block_on(py, &rt, Inner::sidecar(socket, node))??;
        Ok(Self::made(inner, rt))
    }

    /// The server's SPIFFE ID, as its SVID proved it (`sidecar:` and the socket's path
    /// through a sidecar).
    #[getter]
    fn server_id(&self) -> String {
        self.inner.server_id()
    }

    /// The transport in use: `"quic"` or `"tcp"` (`"sidecar"` through one).
    #[getter]
    fn path(&self) -> String {
        self.inner.path()
    }

    /// Through a sidecar, bytes read from its socket so far; `None` for a direct client.
    #[getter]
    fn bytes_through_socket(&self) -> Option<u64> {
        self.inner.bytes_through_socket()
    }

    /// Datasets this identity may see.
    fn list_datasets(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.usable(py)?;
        Ok(block_on(py, &self.rt, self.inner.list_datasets())??)
    }

    /// Objects of `dataset` whose path starts with `prefix`, in path order.
    #[pyo3(signature = (dataset, prefix=""))]
    fn list_objects(
        &self,
        py: Python<'_>,
        dataset: &str,
        prefix: &str,
    ) -> PyResult<Vec<ObjectEntry>> {
        self.usable(py)?;
        let dataset = ops::dataset_name(dataset)?;
        let fut = self.inner.list_objects(&dataset, prefix);
        Ok(block_on(py, &self.rt, fut)??)
    }

    /// An object's size, chunking and BLAKE3 root.
    fn stat(&self, py: Python<'_>, dataset: &str, object: &str) -> PyResult<ObjectStat> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let fut = self.inner.stat(&dataset, &object);
        Ok(block_on(py, &self.rt, fut)??)
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
        self.usable(py)?;
        let (start, end) = ops::range(start, end)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let fut = self.inner.read_range(&dataset, &object, start, end);
        Ok(block_on(py, &self.rt, fut)??)
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
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let fut = self.inner.fetch(&dataset, &object, max_bytes);
        Ok(block_on(py, &self.rt, fut)??)
    }

    /// A whole object, verified, into the start of the caller's writable buffer.
    fn fetch_into(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<FetchReport> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let mut dest = WritableBuffer::get(buffer)?;
        let fut = self
            .inner
            .fetch_into(&dataset, &object, dest.as_mut_slice());
        Ok(block_on(py, &self.rt, fut)??)
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
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let fut = self.inner.fetch_to_file(&dataset, &object, &dest);
        Ok(block_on(py, &self.rt, fut)??)
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
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let data = bytes::Bytes::from(data.to_vec(py)?);
        let fut = self.inner.push_bytes(&dataset, &object, data);
        Ok(block_on(py, &self.rt, fut)??)
    }

    /// Stores the file `src` as `object` of `dataset`.
    fn push_file(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        src: PathBuf,
    ) -> PyResult<PushReport> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let fut = self.inner.push_file(&dataset, &object, &src);
        Ok(block_on(py, &self.rt, fut)??)
    }

    /// Through a sidecar: asks it to fetch `objects` (`(dataset, object)` pairs, in the
    /// order wanted) into its cache meanwhile; returns how many it took on. `TypeError`
    /// for a direct client.
    fn prefetch(&self, py: Python<'_>, objects: Vec<(String, String)>) -> PyResult<u64> {
        self.usable(py)?;
        let sidecar = self.inner.sidecar_only("prefetch")?;
        let objects = ops::object_names(&objects)?;
        Ok(block_on(py, &self.rt, ops::prefetch(sidecar, &objects))??)
    }

    /// Closes the connection; a later call reconnects (through a sidecar: nothing to do).
    fn close(&self, py: Python<'_>) {
        if std::process::id() == self.pid {
            // Without the GIL: closing takes quinn's connection lock (see `ops::Shared`).
            py.detach(|| {
                let _rt = self.rt.enter();
                self.inner.close();
            });
        }
    }
}

impl Client {
    fn made(inner: Inner, rt: Arc<Runtime>) -> Self {
        Self {
            inner,
            rt,
            pid: std::process::id(),
        }
    }

    /// Refuses to run in a process forked after the client was made, and brings the level
    /// of the Rust side's logs up to date with Python's (`log.rs`).
    fn usable(&self, py: Python<'_>) -> Result<(), Failure> {
        ops::usable(self.pid, "Client")?;
        crate::log::refresh(py);
        Ok(())
    }
}

/// The digest logs use in place of an object's path (which may carry a patient
/// identifier): BLAKE3 of the path, hex.
#[pyfunction]
pub(crate) fn object_digest(object: &str) -> PyResult<String> {
    Ok(ops::object_path(object)?.digest().to_hex())
}
