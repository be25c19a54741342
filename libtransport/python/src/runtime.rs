//! The module's tokio runtime, and blocking on it with the GIL released.
//!
//! One runtime serves every client of a process. A process forked from one that had a
//! runtime (a DataLoader worker) inherits its memory but none of its threads, so the child
//! starts a runtime of its own; clients made before the fork refuse to run in the child
//! (`client.rs`).
//!
//! A child also inherits the random generator of the thread that forked (rand's
//! `ThreadRng`, which does not reseed on fork), and quinn draws connection IDs from it on
//! the thread that connects. Two DataLoader workers forked from one process would then open
//! QUIC connections with the same IDs, and the node would route the second's handshake to
//! the first's connection. The module registers [`reseed_after_fork`] to reseed it.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::error;

/// The runtime of this process, started on first use.
pub(crate) fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, rt)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(rt.clone());
    }
    if let Some((_, inherited)) = slot.take() {
        // Its worker threads live only in the parent: dropping it here would wait for them
        // forever. Its memory stays with this process, as everything else it inherited.
        std::mem::forget(inherited);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .clamp(1, MAX_WORKER_THREADS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("transportd")
        .enable_all()
        .build()
        .map_err(|e| error::local(&format!("starting the runtime: {e}")))?;
    let rt = Arc::new(rt);
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}

/// Runs `fut` to completion on `rt` with the GIL released. Every [`SIGNAL_POLL`] it takes
/// the GIL for a moment to let Python handle signals: Ctrl-C (KeyboardInterrupt) drops the
/// future, which cancels the request or transfer, and raises.
pub(crate) fn block_on<F>(py: Python<'_>, rt: &Runtime, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    py.detach(|| {
        rt.block_on(async {
            let mut fut = std::pin::pin!(fut);
            loop {
                tokio::select! {
                    out = &mut fut => return Ok(out),
                    () = tokio::time::sleep(SIGNAL_POLL) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

/// Registers, with `os.register_at_fork`, a reseeding of the forking thread's random
/// generator in each child: the thread that forked is the child's only thread then.
pub(crate) fn reseed_after_fork(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("after_in_child", wrap_pyfunction!(reseed_thread_rng, m)?)?;
    py.import("os")?
        .call_method("register_at_fork", (), Some(&kwargs))?;
    Ok(())
}

/// Reseeds this thread's `ThreadRng` from the operating system.
#[pyfunction]
fn reseed_thread_rng() -> PyResult<()> {
    rand::rng()
        .reseed()
        .map_err(|e| error::local(&format!("reseeding after fork: {e}")).into())
}

/// The runtime and the process that started it.
static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// Most worker threads of the runtime: pulls run their chunk workers on the caller's task
/// and the runtime's threads mostly hash and decrypt; more than four only adds threads to
/// every data loader worker process.
const MAX_WORKER_THREADS: usize = 4;

/// How often a blocked call lets Python see signals: short enough that Ctrl-C feels
/// immediate, long enough to cost nothing.
const SIGNAL_POLL: Duration = Duration::from_millis(100);
