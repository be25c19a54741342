//! The small value types the clients' methods return (`ObjectEntry`, `ObjectStat`,
//! `FetchReport`, `PushReport`), made from the library's own.

use std::time::Instant;

use libtransport::clock::{Clock, SystemClock};
use libtransport::sidecar::client::{SidecarFetch, SidecarPush, SidecarStat};
use pyo3::prelude::*;

/// One object of a listing.
#[pyclass(module = "transportd._native", frozen, get_all)]
pub(crate) struct ObjectEntry {
    /// Path within the dataset.
    path: String,
    /// Size in bytes.
    size: u64,
}

impl From<libtransport::proto::ObjectEntry> for ObjectEntry {
    fn from(e: libtransport::proto::ObjectEntry) -> Self {
        Self {
            path: e.path.as_str().to_owned(),
            size: e.size,
        }
    }
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

impl From<&libtransport::proto::Manifest> for ObjectStat {
    fn from(m: &libtransport::proto::Manifest) -> Self {
        Self {
            size: m.size(),
            chunk_bytes: m.chunk_bytes(),
            chunk_count: m.chunk_count(),
            root: m.root().to_hex(),
        }
    }
}

impl ObjectStat {
    /// A sidecar's stat.
    pub(crate) fn sidecar(s: &SidecarStat) -> Self {
        Self {
            size: s.size,
            chunk_bytes: u32::try_from(s.chunk_bytes).unwrap_or(u32::MAX),
            chunk_count: u32::try_from(s.chunks).unwrap_or(u32::MAX),
            root: s.root.to_hex(),
        }
    }
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

impl FetchReport {
    /// A fetch through a sidecar (`server` names it): the whole object, handed over, no
    /// chunks counted (the sidecar's answer has no manifest).
    pub(crate) fn sidecar(server: &str, done: &SidecarFetch, started: Instant) -> Self {
        Self {
            server: server.to_owned(),
            path: "sidecar".to_owned(),
            size: done.size,
            fetched_bytes: done.size,
            chunks: 0,
            chunks_reused: 0,
            chunks_fetched: 0,
            root: done.root.to_hex(),
            elapsed: elapsed(started),
            retries: 0,
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

impl PushReport {
    /// A push through a sidecar (`server` names it), no chunks counted.
    pub(crate) fn sidecar(server: &str, done: &SidecarPush, started: Instant) -> Self {
        Self {
            server: server.to_owned(),
            path: "sidecar".to_owned(),
            size: done.size,
            sent_bytes: done.size,
            chunks: 0,
            chunks_skipped: 0,
            root: done.root.to_hex(),
            elapsed: elapsed(started),
            retries: 0,
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

/// Seconds since `started`.
fn elapsed(started: Instant) -> f64 {
    SystemClock
        .instant()
        .saturating_duration_since(started)
        .as_secs_f64()
}
