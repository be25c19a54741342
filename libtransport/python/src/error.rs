//! The library's errors as the exceptions of `transportd.errors`, each with its stable code.
//!
//! The classes are defined in Python (`python/transportd/errors.py`, one hierarchy under
//! `TransportError`); this file decides which class and code each library error becomes.
//! A server's answer keeps its wire code's label (`ErrorCode::label`: `not_found`,
//! `audit_unavailable`, ...) as `code` and its number as `wire_code`; failures on this side
//! have codes of their own (`unreachable`, `rejected`, `corrupt`, ...). `retriable` is the
//! library's own `is_retriable`, except that a `Busy` always is (the node said "not now";
//! the library leaves a full transfer table to its caller). Messages are the library's `Display`, which names no
//! object and carries no payload.
//!
//! A sidecar's failures (`sidecar`) keep the sidecar's code as `code`; the storage node's
//! codes it passes on become the classes the direct client gives them, and two classes are
//! the sidecar's own: `PermissionDenied` (no registration entry for this process) and
//! `SidecarUnavailable` (its socket missing or closed mid-call: retriable).

use std::borrow::Cow;

use libtransport::error::{
    ConnectError, FetchError, LostKind, PushError, Rejection, RequestError, StreamError, TlsFailure,
};
use libtransport::proto::{ErrorCode, NameError};
use libtransport::sidecar::SidecarError;
use libtransport::workload::WorkloadError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// An error on its way to Python: which exception, with what code and message.
#[derive(Debug)]
pub(crate) struct Failure {
    class: Class,
    code: Cow<'static, str>,
    wire_code: Option<u16>,
    retriable: bool,
    message: String,
}

/// The exception classes of `transportd.errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Transport,
    Unauthenticated,
    ServerNotTrusted,
    Identity,
    NotFound,
    Busy,
    Corrupt,
    TooLarge,
    OutOfRange,
    Changed,
    Conflict,
    NoSpace,
    Unreachable,
    ConnectionLost,
    Protocol,
    Local,
    InvalidName,
    PermissionDenied,
    SidecarUnavailable,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Self::Transport => "TransportError",
            Self::Unauthenticated => "Unauthenticated",
            Self::ServerNotTrusted => "ServerNotTrusted",
            Self::Identity => "IdentityError",
            Self::NotFound => "NotFound",
            Self::Busy => "Busy",
            Self::Corrupt => "Corrupt",
            Self::TooLarge => "TooLarge",
            Self::OutOfRange => "OutOfRange",
            Self::Changed => "Changed",
            Self::Conflict => "Conflict",
            Self::NoSpace => "NoSpace",
            Self::Unreachable => "Unreachable",
            Self::ConnectionLost => "ConnectionLost",
            Self::Protocol => "ProtocolError",
            Self::Local => "LocalError",
            Self::InvalidName => "InvalidName",
            Self::PermissionDenied => "PermissionDenied",
            Self::SidecarUnavailable => "SidecarUnavailable",
        }
    }
}

impl Failure {
    fn new(class: Class, code: impl Into<Cow<'static, str>>, message: impl ToString) -> Self {
        Self {
            class,
            code: code.into(),
            wire_code: None,
            retriable: class == Class::Busy,
            message: message.to_string(),
        }
    }

    /// Sets `retriable`; a `Busy` always is (the node said "not now", whatever the
    /// library's own retry loop makes of it: `RequestError::is_retriable` leaves a full
    /// transfer table to the caller).
    fn retriable(mut self, retriable: bool) -> Self {
        self.retriable = retriable || self.class == Class::Busy;
        self
    }
}

impl Failure {
    /// The exception, made with the GIL the caller holds.
    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        exception(py, &self).unwrap_or_else(|e| e)
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> Self {
        Python::attach(|py| f.into_pyerr(py))
    }
}

/// The exception `f` describes, made from its class in `transportd.errors`.
fn exception(py: Python<'_>, f: &Failure) -> PyResult<PyErr> {
    let class = py.import("transportd.errors")?.getattr(f.class.name())?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("code", f.code.as_ref())?;
    kwargs.set_item("wire_code", f.wire_code)?;
    kwargs.set_item("retriable", f.retriable)?;
    let exc = class.call((f.message.as_str(),), Some(&kwargs))?;
    Ok(PyErr::from_value(exc))
}

/// A connection that could not be made.
pub(crate) fn connect(e: &ConnectError) -> Failure {
    let retriable = e.is_retriable();
    let (class, code) = match e {
        ConnectError::Unreachable { .. } => (Class::Unreachable, "unreachable"),
        ConnectError::Timeout { .. } => (Class::Unreachable, "timeout"),
        ConnectError::ServerNotTrusted(_) => (Class::ServerNotTrusted, "server_not_trusted"),
        ConnectError::Rejected(r) => (Class::Unauthenticated, rejection(*r)),
        ConnectError::Tls(TlsFailure::Io(_) | TlsFailure::Quic { .. }) => {
            (Class::ConnectionLost, "tls_lost")
        }
        ConnectError::Tls(_) => (Class::Unauthenticated, "tls"),
        ConnectError::Busy => (Class::Busy, "busy"),
        ConnectError::Version => (Class::Protocol, "version"),
        ConnectError::Lost(_) => (Class::ConnectionLost, "connection_lost"),
        ConnectError::Local(_) => (Class::Local, "local"),
        _ => (Class::Transport, "connect"),
    };
    Failure::new(class, code, e).retriable(retriable)
}

/// A request (list, stat) that failed.
pub(crate) fn request(e: &RequestError) -> Failure {
    let retriable = e.is_retriable();
    match e {
        RequestError::Remote(code) => remote(*code, e).retriable(retriable),
        RequestError::Stream(StreamError::ConnectionLost(lost)) => match &lost.kind {
            // The connection ended and a new one could not be made: why not is what counts
            // (a revoked or expired SVID is `Unauthenticated`, not a lost connection).
            LostKind::Reconnect(c) => Failure {
                message: e.to_string(),
                ..connect(c)
            },
            _ => Failure::new(Class::ConnectionLost, "connection_lost", e).retriable(retriable),
        },
        RequestError::Stream(StreamError::Timeout(_)) => {
            Failure::new(Class::ConnectionLost, "timeout", e).retriable(retriable)
        }
        RequestError::Stream(StreamError::Reset(_)) => {
            Failure::new(Class::ConnectionLost, "reset", e).retriable(retriable)
        }
        RequestError::Stream(_) | RequestError::Protocol(_) => {
            Failure::new(Class::Protocol, "protocol", e)
        }
        _ => Failure::new(Class::Transport, "request", e).retriable(retriable),
    }
}

/// A pull (fetch, read_range, fetch_into, fetch_to_file) that failed.
pub(crate) fn fetch(e: &FetchError) -> Failure {
    let retriable = e.is_retriable();
    match e {
        FetchError::Request(r) => request(r),
        FetchError::Connect(c) => connect(c),
        FetchError::Corrupt(_) => Failure::new(Class::Corrupt, "corrupt", e),
        FetchError::TooLarge { .. } => Failure::new(Class::TooLarge, "too_large", e),
        FetchError::Changed { .. } => Failure::new(Class::Changed, "changed", e),
        FetchError::Range { .. } => Failure::new(Class::OutOfRange, "range", e),
        FetchError::Local(io) => local_io(io, e),
        FetchError::NoRdma(_) => Failure::new(Class::Transport, "no_rdma", e),
        _ => Failure::new(Class::Transport, "fetch", e).retriable(retriable),
    }
}

/// A push (push_bytes, push_file) that failed.
pub(crate) fn push(e: &PushError) -> Failure {
    let retriable = e.is_retriable();
    match e {
        PushError::Request(r) => request(r),
        PushError::Connect(c) => connect(c),
        PushError::Manifest(_) => Failure::new(Class::TooLarge, "too_large", e),
        PushError::Corrupt(_) => Failure::new(Class::Corrupt, "corrupt", e),
        PushError::Local(io) => local_io(io, e),
        _ => Failure::new(Class::Transport, "push", e).retriable(retriable),
    }
}

/// The Workload API gave us no identity.
pub(crate) fn workload(e: &WorkloadError) -> Failure {
    Failure::new(Class::Identity, "workload_api", e).retriable(e.is_retryable())
}

/// Our identity could not be loaded (files, or their contents).
pub(crate) fn identity(message: &str) -> Failure {
    Failure::new(Class::Identity, "identity", message)
}

/// A dataset name or object path that is not valid. `what` says which argument; the name
/// itself is not repeated (it may carry a patient identifier).
pub(crate) fn name(what: &str, e: &NameError) -> Failure {
    Failure::new(Class::InvalidName, "invalid_name", format!("{what}: {e}"))
}

/// Something failed on this side, outside the library.
pub(crate) fn local(message: &str) -> Failure {
    Failure::new(Class::Local, "local", message)
}

/// A local I/O failure: a full disk is `NoSpace`, the rest `LocalError`.
fn local_io(io: &std::io::Error, e: &dyn std::fmt::Display) -> Failure {
    if io.kind() == std::io::ErrorKind::StorageFull {
        Failure::new(Class::NoSpace, "no_space", e)
    } else {
        Failure::new(Class::Local, "local", e)
    }
}

/// A server's error code as an exception.
fn remote(code: ErrorCode, e: &RequestError) -> Failure {
    let class = match code {
        ErrorCode::NotFound => Class::NotFound,
        ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::AuditUnavailable => Class::Busy,
        ErrorCode::Corrupt => Class::Corrupt,
        ErrorCode::TooLarge => Class::TooLarge,
        ErrorCode::Range => Class::OutOfRange,
        ErrorCode::Changed => Class::Changed,
        ErrorCode::Conflict => Class::Conflict,
        ErrorCode::NoSpace => Class::NoSpace,
        ErrorCode::Cancelled => Class::ConnectionLost,
        ErrorCode::Protocol
        | ErrorCode::Version
        | ErrorCode::Incomplete
        | ErrorCode::UnknownTransfer => Class::Protocol,
        _ => Class::Transport,
    };
    Failure {
        wire_code: Some(code as u16),
        ..Failure::new(class, code.label(), e)
    }
}

/// A sidecar call that failed. The sidecar's own codes keep their labels, and a storage
/// node's codes it passes on map to the classes the direct client gives them.
pub(crate) fn sidecar(e: &SidecarError) -> Failure {
    let retriable = e.is_retriable();
    let class = match e {
        SidecarError::NoSocket => Class::Local,
        SidecarError::PermissionDenied { .. } => Class::PermissionDenied,
        SidecarError::NotFound { .. } => Class::NotFound,
        SidecarError::TooLarge { .. } => Class::TooLarge,
        SidecarError::NotSealed { .. } | SidecarError::Protocol(_) => Class::Protocol,
        SidecarError::Unavailable(_) | SidecarError::NoAnswer { .. } => Class::SidecarUnavailable,
        SidecarError::Local(io) if io.kind() == std::io::ErrorKind::StorageFull => Class::NoSpace,
        SidecarError::Local(_) => Class::Local,
        SidecarError::Refused { code, .. } => match code.as_str() {
            "busy" | "unavailable" | "audit_unavailable" => Class::Busy,
            "unreachable" => Class::Unreachable,
            "corrupt" => Class::Corrupt,
            "too_large" => Class::TooLarge,
            "range" => Class::OutOfRange,
            "changed" => Class::Changed,
            "conflict" => Class::Conflict,
            "no_space" => Class::NoSpace,
            "cancelled" => Class::ConnectionLost,
            "invalid" | "protocol" | "version" | "incomplete" | "unknown_transfer" => {
                Class::Protocol
            }
            _ => Class::Transport,
        },
        _ => Class::Transport,
    };
    let code = match e {
        SidecarError::Local(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            Cow::Borrowed("no_space")
        }
        _ => Cow::Owned(e.code().to_owned()),
    };
    Failure::new(class, code, e).retriable(retriable)
}

/// The code of a refusal by the server's TLS alert.
fn rejection(r: Rejection) -> &'static str {
    match r {
        Rejection::CertificateExpired => "certificate_expired",
        Rejection::Revoked => "revoked",
        Rejection::UnknownCa => "unknown_ca",
        Rejection::BadCertificate => "bad_certificate",
        Rejection::CertificateRequired => "certificate_required",
        Rejection::ProtocolVersion => "protocol_version",
        Rejection::NoApplicationProtocol => "no_application_protocol",
        Rejection::AccessDenied => "access_denied",
        _ => "rejected",
    }
}
