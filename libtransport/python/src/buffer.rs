//! Bytes across the boundary without copies: the pulled bytes handed to Python
//! ([`Buffer`]), and the caller's memory a pull lands in ([`WritableBuffer`]).
//!
//! These are the crate's only unsafe code, two blocks that the buffer protocol cannot do
//! without: exporting memory we own (`__getbuffer__`, which pyo3 declares `unsafe`), and
//! writing into memory a caller exported to us (pyo3's safe views of it are slices of
//! `Cell`s, which `Client::fetch_into` cannot take). Each sits behind a safe interface.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};

use bytes::Bytes;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

/// Verified bytes of an object, in memory Rust owns, read through the buffer protocol:
/// `memoryview(b)`, `numpy.frombuffer(b)` and `torch.frombuffer(b)` see this memory itself,
/// no copy. Read-only; `bytes(b)` makes a copy.
#[pyclass(module = "transportd._native", frozen)]
pub(crate) struct Buffer {
    data: Bytes,
}

impl Buffer {
    /// Hands `data` to Python.
    pub(crate) fn new(data: Bytes) -> Self {
        Self { data }
    }
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// The length only: the bytes may be anything (a patient record).
    fn __repr__(&self) -> String {
        format!("<transportd.Buffer of {} bytes>", self.data.len())
    }

    /// Exports the bytes read-only. CPython calls this with a `view` to fill.
    unsafe fn __getbuffer__(
        slf: PyRef<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let len = isize::try_from(slf.data.len())
            .map_err(|_| PyValueError::new_err("buffer larger than isize::MAX"))?;
        let ptr = slf.data.as_ptr().cast::<c_void>().cast_mut();
        // SAFETY: `view` is the Py_buffer CPython passed to this slot, valid for writes.
        // `ptr` and `len` describe `slf.data`, which the object owns and, being frozen,
        // never changes or frees while it lives; PyBuffer_FillInfo stores a new reference
        // to the object in `view.obj`, so the object and its memory outlive the export.
        // Exported with readonly = 1 (a request for a writable view fails with
        // BufferError), so nothing writes to memory Rust reads as `&[u8]`.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, len, 1, flags) };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// Nothing to release: the export holds a reference to the object, which owns the
    /// memory.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// A caller's writable, C-contiguous buffer (bytearray, numpy array, pinned torch tensor,
/// ...), exported to us for as long as this value lives: the exporter can neither free nor
/// resize it meanwhile (a bytearray refuses to resize while exported).
///
/// The caller's side of the contract, as for `readinto`: no other code touches the buffer
/// until the call that writes into it returns (for the asyncio client: until its awaitable
/// is over, which `transportd.aio` makes wait, also on cancellation, for this value to be
/// dropped). It may be dropped on any thread: releasing the export takes the GIL there.
pub(crate) struct WritableBuffer {
    buf: PyUntypedBuffer,
}

impl WritableBuffer {
    /// Takes `obj`'s buffer, refusing one that is read-only or not C-contiguous.
    pub(crate) fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = PyUntypedBuffer::get(obj)?;
        if buf.readonly() {
            return Err(PyTypeError::new_err(
                "the buffer is read-only: give a writable one (bytearray, numpy array, tensor)",
            ));
        }
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("the buffer is not C-contiguous"));
        }
        Ok(Self { buf })
    }

    /// The buffer's memory, to write into.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.buf.len_bytes();
        let ptr = self.buf.buf_ptr().cast::<u8>();
        if len == 0 || ptr.is_null() {
            return &mut [];
        }
        // SAFETY: the exporter keeps `len` bytes at `ptr` valid and in place until the
        // export ends, and the export ends only when `self.buf` drops, which the borrow of
        // `self` prevents for the slice's lifetime. The buffer is writable (checked in
        // `get`) and C-contiguous, so those `len` bytes are exactly its memory, and any bit
        // pattern is a valid `u8`. `&mut self` keeps this value from handing out a second
        // slice; other Python code keeps off the memory meanwhile by the contract above.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}
