//! `transportd._native.SidecarClient`: the blocking client's calls answered by a sidecar (a
//! `transportd node` on this machine, over its Unix socket) rather than by a storage node
//! over the network; `transportd.Client.sidecar` wraps it in the same Python class.
//!
//! The calls and what they return are `Client`'s (`client.rs`): a fetch's bytes are the
//! sidecar's sealed memory file, mapped (no copy); `fetch_into` reads it into the caller's
//! buffer. Reports name the path `"sidecar"` and, having no manifest at hand, count no
//! chunks. Every call runs with the GIL released (`runtime::block_on`).

use std::path::PathBuf;
use std::sync::Arc;

use libtransport::clock::{Clock, SystemClock};
use libtransport::sidecar::SidecarClient as Inner;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::buffer::{Buffer, WritableBuffer};
use crate::error::{self, Failure};
use crate::ops::{self, DEFAULT_MAX_BYTES};
use crate::reports::{FetchReport, ObjectEntry, ObjectStat, PushReport};
use crate::runtime::{block_on, runtime};

/// A client of the sidecar at a Unix socket.
#[pyclass(module = "transportd._native", frozen)]
pub(crate) struct SidecarClient {
    inner: Inner,
    rt: Arc<Runtime>,
    /// The process that made the client: a forked child cannot use it (its connections
    /// would be shared with the parent's).
    pid: u32,
}

#[pymethods]
impl SidecarClient {
    /// Connects to the sidecar listening at `socket`; `node` names the storage node every
    /// call asks (one of the sidecar's; by default its first).
    #[new]
    #[pyo3(signature = (socket, *, node=None))]
    fn new(py: Python<'_>, socket: PathBuf, node: Option<String>) -> PyResult<Self> {
        crate::log::refresh(py);
        let rt = runtime()?;
        let inner = block_on(py, &rt, Inner::connect(socket))?.map_err(|e| error::sidecar(&e))?;
        let inner = match node {
            Some(n) => inner.with_node(n),
            None => inner,
        };
        Ok(Self {
            inner,
            rt,
            pid: std::process::id(),
        })
    }

    /// Who answers: `sidecar:` and the socket's path (the storage node's SPIFFE ID is the
    /// sidecar's business).
    #[getter]
    fn server_id(&self) -> String {
        format!("sidecar:{}", self.inner.socket().display())
    }

    /// The path the bytes take: `"sidecar"`.
    #[getter]
    fn path(&self) -> &'static str {
        "sidecar"
    }

    /// The storage node calls ask, if one was named.
    #[getter]
    fn node(&self) -> Option<String> {
        self.inner.node().map(str::to_owned)
    }

    /// Bytes read from the socket so far (frames and inline reads, never a handed-over
    /// object's contents).
    #[getter]
    fn bytes_through_socket(&self) -> u64 {
        self.inner.bytes_through_socket()
    }

    /// Datasets this caller may see.
    fn list_datasets(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.usable(py)?;
        let names = block_on(py, &self.rt, self.inner.list_datasets())?.map_err(fail)?;
        Ok(names.iter().map(|n| n.as_str().to_owned()).collect())
    }

    /// Objects of `dataset` whose path starts with `prefix`.
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
        let entries = block_on(py, &self.rt, fut)?.map_err(fail)?;
        Ok(entries.into_iter().map(ObjectEntry::from).collect())
    }

    /// An object's size, chunking and BLAKE3 root.
    fn stat(&self, py: Python<'_>, dataset: &str, object: &str) -> PyResult<ObjectStat> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let s = block_on(py, &self.rt, self.inner.stat(&dataset, &object))?.map_err(fail)?;
        Ok(ObjectStat::sidecar(&s))
    }

    /// Bytes `start..end` of an object (asked for in pieces of at most 1 MiB).
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
        let fut = self.inner.read_range(&dataset, &object, start..end);
        Ok(Buffer::new(block_on(py, &self.rt, fut)?.map_err(fail)?))
    }

    /// A whole object: the sidecar's sealed memory file, mapped read-only (no copy);
    /// refuses one over `max_bytes`.
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
        Ok(Buffer::new(block_on(py, &self.rt, fut)?.map_err(fail)?))
    }

    /// A whole object into the start of the caller's writable buffer.
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
        let started = SystemClock.instant();
        let fut = self
            .inner
            .fetch_into(&dataset, &object, dest.as_mut_slice());
        let done = block_on(py, &self.rt, fut)?.map_err(fail)?;
        Ok(FetchReport::sidecar(&self.server_id(), &done, started))
    }

    /// A whole object into the file `dest`, which appears only once complete.
    fn fetch_to_file(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        dest: PathBuf,
    ) -> PyResult<FetchReport> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let started = SystemClock.instant();
        let fut = self.inner.fetch_to_file(&dataset, &object, &dest);
        let done = block_on(py, &self.rt, fut)?.map_err(fail)?;
        Ok(FetchReport::sidecar(&self.server_id(), &done, started))
    }

    /// Stores the bytes of `data` (copied once, into a sealed memory file the sidecar
    /// reads) as `object` of `dataset`.
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
        let started = SystemClock.instant();
        let fut = self.inner.push_bytes(&dataset, &object, data);
        let done = block_on(py, &self.rt, fut)?.map_err(fail)?;
        Ok(PushReport::sidecar(&self.server_id(), &done, started))
    }

    /// Stores the file `src` as `object` of `dataset` (the sidecar reads the opened file).
    fn push_file(
        &self,
        py: Python<'_>,
        dataset: &str,
        object: &str,
        src: PathBuf,
    ) -> PyResult<PushReport> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let started = SystemClock.instant();
        let fut = self.inner.push_file(&dataset, &object, &src);
        let done = block_on(py, &self.rt, fut)?.map_err(fail)?;
        Ok(PushReport::sidecar(&self.server_id(), &done, started))
    }

    /// Asks the sidecar to fetch `objects` (`(dataset, object)` pairs, in the order
    /// wanted) into its cache meanwhile; returns how many it took on.
    fn prefetch(&self, py: Python<'_>, objects: Vec<(String, String)>) -> PyResult<u64> {
        self.usable(py)?;
        let objects = objects
            .iter()
            .map(|(d, o)| ops::names(d, o))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(block_on(py, &self.rt, self.inner.prefetch(&objects))?.map_err(fail)?)
    }

    /// Nothing to close but idle connections, which go with the client.
    fn close(&self) {}
}

impl SidecarClient {
    /// Refuses to run in a process forked after the client was made.
    fn usable(&self, py: Python<'_>) -> Result<(), Failure> {
        ops::usable(self.pid, "sidecar client")?;
        crate::log::refresh(py);
        Ok(())
    }
}

fn fail(e: libtransport::sidecar::SidecarError) -> Failure {
    error::sidecar(&e)
}
