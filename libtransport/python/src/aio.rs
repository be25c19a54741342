//! `transportd._native.AsyncClient`: the client for asyncio. Each call returns an awaitable
//! (pyo3-async-runtimes' `future_into_py`) whose work runs on the module's tokio runtime, the
//! same calls as the blocking client's (`ops.rs`), so the event loop never waits on the
//! network or the disk and never holds a lock of ours. Made by `connect`, it talks to a
//! node; made by `sidecar`, to this machine's sidecar (`ops::Inner` has both).
//!
//! ```text
//!   event loop (GIL)                   runtime (no GIL)
//!   await c.read_range(...) ──spawn──▶ Inner::read_range ──▶ libtransport::Client
//!        ▲                                   │             or sidecar::SidecarClient
//!        └── set_result (a blocking thread takes the GIL; the answer, or the
//!            exception its Failure becomes, is made there)
//! ```
//!
//! * One `libtransport::Client` serves every call of a client, concurrently: calls in flight
//!   are requests on streams of its connection (a whole-object pull or push may also stripe
//!   its chunks over a few more, as the blocking client's do). Through a sidecar, each call
//!   in flight has a connection to the sidecar of its own (idle ones are kept for the next).
//! * The runtime is the module's own (`runtime.rs`), not pyo3-async-runtimes' process-wide
//!   one: that one is set once per process, so a process forked from one that had it (a
//!   DataLoader worker) would be left with a runtime whose threads stayed in the parent.
//!   [`ModuleRuntime`] spawns on the runtime the caller entered.
//! * Cancelling the Python task cancels the Rust future (it is dropped): a pull stops, a push
//!   stops with nothing committed (the node commits an object only once every chunk is
//!   there and verified, and is never asked to; what it already has is kept for a later
//!   push to resume). Either way the node is told at once that the transfer is over
//!   (libtransport closes a transfer whose future is dropped), so the object is not left
//!   locked for writing and the connection's transfer table has room.
//! * Through a sidecar, cancelling cannot stop what the sidecar was asked: the exchange runs
//!   on a blocking thread (`SidecarClient` does every exchange there, on a connection that
//!   thread owns), which the dropped future does not stop. It reads the answer whole, and
//!   only then does its connection go back to the idle ones, so no later call is handed a
//!   connection with a cancelled call's answer still on it; the answer is dropped (a
//!   fetched object's mapping with it). So a cancelled push through a sidecar may
//!   still be stored; a cancelled `fetch_to_file` puts nothing in place (`SidecarClient`
//!   checks, before the rename, that its call is still awaited), and a cancelled
//!   `fetch_into` writes nothing into the buffer (the copy from the memory file comes
//!   after the answer, on the call's own task, which is gone).
//! * `fetch_into` holds the caller's buffer exported until the Rust side has let go of it,
//!   and says so through a callback, so the Python side returns, also on cancellation,
//!   only once nothing writes into the buffer any more.

use std::cell::OnceCell;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use pyo3::IntoPyObjectExt;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use pyo3_async_runtimes::generic::{self, ContextExt, Runtime as GenericRuntime};
use tokio::runtime::Runtime;

use crate::buffer::WritableBuffer;
use crate::error::Failure;
use crate::ops::{self, Connect, DEFAULT_MAX_BYTES, Inner};
use crate::runtime::runtime;

/// A connection to one node for asyncio; `transportd.aio.AsyncClient` wraps it.
#[pyclass(module = "transportd._native", frozen)]
pub(crate) struct AsyncClient {
    inner: Inner,
    rt: Arc<Runtime>,
    /// The process that made the client: a forked child cannot use it.
    pid: u32,
}

#[pymethods]
impl AsyncClient {
    /// Connects to `node` (`HOST:PORT`) and completes the first round trip; the awaitable
    /// gives the client. Options as for the blocking client.
    #[staticmethod]
    #[pyo3(signature = (
        node, *, identity=None, svid=None, key=None, bundle=None, workload_socket=None,
        workload_id=None, server_id=None, path="auto", connect_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments.
    fn connect<'py>(
        py: Python<'py>,
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
    ) -> PyResult<Bound<'py, PyAny>> {
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
        let client_rt = rt.clone();
        spawn(py, &rt, async move {
            let inner = connect.run(client_rt.clone()).await?;
            Ok(Self::made(inner, client_rt))
        })
    }

    /// Connects to the sidecar listening at `socket`; `node` names the storage node every
    /// call asks (one of the sidecar's; by default its first). The awaitable gives the
    /// client.
    #[staticmethod]
    #[pyo3(signature = (socket, *, node=None))]
    fn sidecar<'py>(
        py: Python<'py>,
        socket: PathBuf,
        node: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::log::refresh(py);
        let rt = runtime()?;
        let client_rt = rt.clone();
        spawn(py, &rt, async move {
            let inner = Inner::sidecar(socket, node).await?;
            Ok(Self::made(inner, client_rt))
        })
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
    fn list_datasets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move { inner.list_datasets().await })
    }

    /// Objects of `dataset` whose path starts with `prefix`, in path order.
    #[pyo3(signature = (dataset, prefix=String::new()))]
    fn list_objects<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        prefix: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let dataset = ops::dataset_name(dataset)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.list_objects(&dataset, &prefix).await
        })
    }

    /// An object's size, chunking and BLAKE3 root.
    fn stat<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let inner = self.inner.clone();
        spawn(
            py,
            &self.rt,
            async move { inner.stat(&dataset, &object).await },
        )
    }

    /// Bytes `start..end` of an object, every chunk they touch verified.
    fn read_range<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        start: u64,
        end: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (start, end) = ops::range(start, end)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.read_range(&dataset, &object, start, end).await
        })
    }

    /// A whole object, verified, in memory of ours; refuses one over `max_bytes`.
    #[pyo3(signature = (dataset, object, *, max_bytes=DEFAULT_MAX_BYTES))]
    fn fetch<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        max_bytes: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.fetch(&dataset, &object, max_bytes).await
        })
    }

    /// A whole object, verified, into the start of the caller's writable buffer. The buffer
    /// stays exported (a bytearray cannot be resized, an array not freed) until the Rust
    /// side has let go of it, when `on_release` is called, from another thread with the GIL
    /// held: after the awaitable's result, or after its cancellation.
    fn fetch_into<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        buffer: &Bound<'py, PyAny>,
        on_release: Py<PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let held = Held {
            parts: Some((WritableBuffer::get(buffer)?, on_release)),
        };
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            let mut held = held;
            // The pull borrows the buffer from `held`, so it is dropped (finished or
            // cancelled) before `held` releases the buffer.
            inner.fetch_into(&dataset, &object, held.slice()).await
        })
    }

    /// A whole object into the file `dest`, which appears only once complete and verified;
    /// a rerun after an interruption resumes.
    fn fetch_to_file<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        dest: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.fetch_to_file(&dataset, &object, &dest).await
        })
    }

    /// Stores the bytes of `data` (copied once, now) as `object` of `dataset`.
    fn push_bytes<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        data: PyBuffer<u8>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let data = Bytes::from(data.to_vec(py)?);
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.push_bytes(&dataset, &object, data).await
        })
    }

    /// Stores the file `src` as `object` of `dataset`.
    fn push_file<'py>(
        &self,
        py: Python<'py>,
        dataset: &str,
        object: &str,
        src: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let (dataset, object) = ops::names(dataset, object)?;
        let inner = self.inner.clone();
        spawn(py, &self.rt, async move {
            inner.push_file(&dataset, &object, &src).await
        })
    }

    /// Through a sidecar: asks it to fetch `objects` (`(dataset, object)` pairs, in the
    /// order wanted) into its cache meanwhile; the awaitable gives how many it took on.
    /// `TypeError` for a direct client.
    fn prefetch<'py>(
        &self,
        py: Python<'py>,
        objects: Vec<(String, String)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.usable(py)?;
        let sidecar = self.inner.sidecar_only("prefetch")?.clone();
        let objects = ops::object_names(&objects)?;
        spawn(py, &self.rt, async move {
            ops::prefetch(&sidecar, &objects).await
        })
    }

    /// Closes the connection; a later call reconnects. Calls in flight fail. Through a
    /// sidecar, nothing to close.
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

impl AsyncClient {
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
        ops::usable(self.pid, "AsyncClient")?;
        crate::log::refresh(py);
        Ok(())
    }
}

/// Runs `fut` on `rt` and returns an asyncio awaitable of its answer, on the running event
/// loop (there must be one: the Python wrapper's methods are coroutines). Cancelling the
/// awaitable drops the future.
fn spawn<'py, F, T>(py: Python<'py>, rt: &Runtime, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, Failure>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    // ModuleRuntime spawns on the runtime entered here, and tasks spawn on their own.
    let _entered = rt.enter();
    generic::future_into_py::<ModuleRuntime, _, Answer<T>>(py, async move { Ok(Answer(fut.await)) })
}

/// A call's answer on its way to Python: the value, or the exception its failure becomes,
/// made where the result is set (a blocking thread holding the GIL), not on a runtime
/// worker.
struct Answer<T>(Result<T, Failure>);

impl<'py, T: IntoPyObject<'py>> IntoPyObject<'py> for Answer<T> {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        match self.0 {
            Ok(value) => value.into_bound_py_any(py),
            Err(failure) => Err(failure.into_pyerr(py)),
        }
    }
}

/// The caller's buffer, exported while a pull writes into it, and the callback that says it
/// has been let go of.
struct Held {
    parts: Option<(WritableBuffer, Py<PyAny>)>,
}

impl Held {
    /// The buffer's memory (empty once released, which only `drop` does).
    fn slice(&mut self) -> &mut [u8] {
        match &mut self.parts {
            Some((buffer, _)) => buffer.as_mut_slice(),
            None => &mut [],
        }
    }
}

impl Drop for Held {
    /// Releases the export and calls the callback, both with the GIL, which a runtime
    /// worker should not wait for: on a blocking thread when there is a runtime.
    fn drop(&mut self) {
        let Some((buffer, on_release)) = self.parts.take() else {
            return;
        };
        let release = move || {
            // None while the interpreter shuts down: nothing is left to tell.
            let _ = Python::try_attach(|py| {
                drop(buffer);
                if let Err(e) = on_release.call0(py) {
                    e.write_unraisable(py, None);
                }
            });
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(release)),
            Err(_) => release(),
        }
    }
}

/// pyo3-async-runtimes' view of the module's runtime: it spawns on the runtime of the
/// calling context, which [`spawn`] enters for the first spawn and every later one runs in.
struct ModuleRuntime;

tokio::task_local! {
    /// The event loop and context of the Python call a task serves.
    static LOCALS: OnceCell<TaskLocals>;
}

impl GenericRuntime for ModuleRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = tokio::task::JoinHandle<()>;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(fut)
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        tokio::task::spawn_blocking(f)
    }
}

impl ContextExt for ModuleRuntime {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        Box::pin(LOCALS.scope(OnceCell::from(locals), fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        LOCALS.try_with(|c| c.get().cloned()).unwrap_or_default()
    }
}
