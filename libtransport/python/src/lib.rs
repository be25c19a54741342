//! `transportd._native`: libtransport's client for Python, the extension module under the
//! pure-Python package `transportd` (`python/transportd/`).
//!
//! ```text
//!   Python (GIL held)                 Rust (GIL released)
//!   transportd.Client ──────▶ client::Client ──▶ runtime: block_on ─┐      ┌▶ libtransport::Client
//!   transportd.AsyncClient ─▶ aio::AsyncClient ─▶ runtime: spawn ───┴▶ ops ┤   (connect)
//!                                                                          └▶ libtransport::sidecar::
//!                                                                             SidecarClient (.sidecar)
//!        ▲   errors.py ◀── error (typed exceptions, stable codes)
//!        ├── buffer::Buffer (fetch, read_range: the pulled bytes, no copy)
//!        └── logging "transportd.native.*" ◀── log (libtransport's tracing events)
//! ```
//!
//! * Every call that touches the network or the disk runs with the GIL released
//!   (`Python::detach`) on the module's tokio runtime (`runtime.rs`), checking for Ctrl-C
//!   while it waits.
//! * Bytes cross into Python once: `Buffer` (`buffer.rs`) hands out the memory a pull landed
//!   in through the buffer protocol, and `fetch_into` lands a pull in the caller's own
//!   writable buffer. The buffer protocol's two unsafe spots live in `buffer.rs`, behind
//!   safe functions; nothing else here is unsafe.
//! * Library errors become the exceptions of `transportd.errors`, each with its stable code.
//! * `manifest_root` (`verify.rs`) hashes local bytes as the node does, so the node-local
//!   cache (`transportd.cache`, pure Python like the PyTorch datasets of
//!   `transportd.pytorch`) can check its entries against the node's root.
//! * The two clients make the same calls (`ops.rs`); the asyncio one hands them to the event
//!   loop as awaitables (`aio.rs`). Both return the value types of `reports.rs`.
//! * Each client talks to a node, or (made by `Client.sidecar`, `AsyncClient.sidecar`) to a
//!   sidecar on this machine: `ops::Inner` writes each call once for both, and a fetch
//!   through a sidecar maps the sealed memory file it hands over.
//! * libtransport's `tracing` events go to Python's `logging` (`log.rs`), only those Python
//!   would keep.

use pyo3::prelude::*;

mod aio;
mod buffer;
mod client;
mod error;
mod identity;
mod log;
mod ops;
mod reports;
mod runtime;
mod verify;

/// The extension module `transportd._native`.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    log::install(m.py());
    m.add_class::<client::Client>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_class::<reports::ObjectEntry>()?;
    m.add_class::<reports::ObjectStat>()?;
    m.add_class::<reports::FetchReport>()?;
    m.add_class::<reports::PushReport>()?;
    m.add_class::<buffer::Buffer>()?;
    m.add_function(wrap_pyfunction!(client::object_digest, m)?)?;
    m.add_function(wrap_pyfunction!(verify::manifest_root, m)?)?;
    m.add_function(wrap_pyfunction!(log::forwarded_events, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    runtime::reseed_after_fork(m)?;
    Ok(())
}
