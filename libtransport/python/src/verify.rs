//! `manifest_root`: the BLAKE3 manifest root of local bytes, for checking a copy kept outside
//! the node (the node-local cache, `transportd.cache`) against the root the node's `stat`
//! answers.
//!
//! The root is libtransport's own (`ManifestBuilder`), so it equals the node's root exactly
//! when the bytes are the object's and the chunk size is the node's (`stat().chunk_bytes`).
//! Hashing runs with the GIL released.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use libtransport::proto::{Manifest, ManifestBuilder, ManifestError};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::buffer::WritableBuffer;
use crate::error;

/// The BLAKE3 manifest root (hex) of `data` cut into chunks of `chunk_bytes`.
///
/// `data` is a file (`str` or `os.PathLike`, read in pieces) or a buffer of bytes. A
/// writable C-contiguous buffer (bytearray, numpy array, a tensor's `numpy()`) is hashed in
/// place; a read-only one (`bytes`, `transportd.Buffer`) is copied once first. Keep other
/// code off a writable buffer until the call returns, as for `fetch_into`.
#[pyfunction]
pub(crate) fn manifest_root(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    chunk_bytes: u32,
) -> PyResult<String> {
    if data.is_instance_of::<PyString>() || data.hasattr("__fspath__")? {
        let path: PathBuf = data.extract()?;
        return py.detach(|| file_root(&path, chunk_bytes));
    }
    if let Ok(mut writable) = WritableBuffer::get(data) {
        let bytes: &[u8] = writable.as_mut_slice();
        return py.detach(|| bytes_root(bytes, chunk_bytes));
    }
    let Ok(buf) = PyBuffer::<u8>::get(data) else {
        return Err(PyValueError::new_err(
            "data must be a path (str, os.PathLike) or a buffer of bytes",
        ));
    };
    let copy = buf.to_vec(py)?;
    py.detach(|| bytes_root(&copy, chunk_bytes))
}

/// The root of bytes in memory.
fn bytes_root(data: &[u8], chunk_bytes: u32) -> PyResult<String> {
    Manifest::of_bytes(data, chunk_bytes)
        .map(|m| m.root().to_hex())
        .map_err(|e| layout(&e))
}

/// The root of a file, read in pieces of [`READ_BYTES`]. A file that changes size while it
/// is read fails (`LocalError`): its root would describe no version of it.
fn file_root(path: &Path, chunk_bytes: u32) -> PyResult<String> {
    let io = |e: std::io::Error| PyErr::from(error::local(&format!("hashing a file: {e}")));
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut builder = ManifestBuilder::new(size, chunk_bytes).map_err(|e| layout(&e))?;
    let mut piece = vec![0; READ_BYTES];
    loop {
        let n = file.read(&mut piece).map_err(io)?;
        if n == 0 {
            break;
        }
        builder.update(&piece[..n]).map_err(|e| layout(&e))?;
    }
    builder
        .finish()
        .map(|m| m.root().to_hex())
        .map_err(|e| layout(&e))
}

/// A chunk size the manifest refuses is the caller's mistake (`ValueError`); bytes that
/// changed size while hashed are a local failure.
fn layout(e: &ManifestError) -> PyErr {
    match e {
        ManifestError::ChunkSize(_)
        | ManifestError::TooManyChunks(_)
        | ManifestError::TooLarge(_) => PyValueError::new_err(format!("chunk_bytes: {e}")),
        _ => error::local(&format!("computing a manifest root: {e}")).into(),
    }
}

/// How much of a file is read at a time.
const READ_BYTES: usize = 1 << 20;
