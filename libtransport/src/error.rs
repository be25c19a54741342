//! Errors of the client API, one enum per operation.
//!
//! "The server refused us" ([`ConnectError::Rejected`]), "we refused the server"
//! ([`ConnectError::ServerNotTrusted`]), "the server said no" ([`RequestError::Remote`]) and
//! "the bytes did not verify" ([`FetchError::Corrupt`]) are kept apart, so callers can
//! tell a configuration problem from a network problem from an attack.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use certs::SvidError;

use crate::proto::connection::HelloError;
use crate::proto::{ChunkIndex, ErrorCode, FrameError, ManifestError};

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The address could not be reached.
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// Where we tried.
        addr: SocketAddr,
        /// What the network said.
        source: io::Error,
    },
    /// No answer in time (for QUIC this is also what a UDP firewall looks like).
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// Where we tried.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// We refused the server's certificate.
    #[error("server is not trusted: {0}")]
    ServerNotTrusted(SvidError),
    /// The server refused our certificate or our TLS parameters.
    #[error("server refused us: {0}")]
    Rejected(Rejection),
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The server is at its connection limit.
    #[error("the node is at its connection limit; retry later")]
    Busy,
    /// The server speaks no protocol version we know.
    #[error("server speaks no protocol version we know (we speak version 1)")]
    Version,
    /// The connection ended during set-up.
    #[error("connection lost during set-up: {0}")]
    Lost(String),
    /// Local set-up failed (sockets, TLS configuration).
    #[error("local set-up failed: {0}")]
    Local(String),
}

impl From<HelloError> for ConnectError {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::Busy => Self::Busy,
            HelloError::Version => Self::Version,
            other => Self::Lost(other.to_string()),
        }
    }
}

impl ConnectError {
    /// True for failures that another path (TCP instead of QUIC) might avoid.
    pub fn is_network(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }

    /// True if reconnecting later may succeed (the network, not the credentials, failed).
    pub fn is_retriable(&self) -> bool {
        self.is_network() || matches!(self, Self::Lost(_) | Self::Busy)
    }
}

/// Why the server refused us, from the TLS alert it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// Our SVID has expired (or is not yet valid).
    CertificateExpired,
    /// Our SVID's serial is on the server's revocation list.
    Revoked,
    /// Our SVID is not signed by a CA the server trusts.
    UnknownCa,
    /// Our SVID broke a rule (SPIFFE ID, trust domain, key usage).
    BadCertificate,
    /// We presented no certificate.
    CertificateRequired,
    /// We offered no TLS version the server accepts (it requires TLS 1.3).
    ProtocolVersion,
    /// We offered no ALPN protocol the server speaks.
    NoApplicationProtocol,
    /// The server denied access.
    AccessDenied,
    /// Another alert, by its TLS code.
    Other(u8),
}

impl Rejection {
    pub(crate) fn from_alert(alert: rustls::AlertDescription) -> Self {
        use rustls::AlertDescription as A;
        match alert {
            A::CertificateExpired => Self::CertificateExpired,
            A::CertificateRevoked => Self::Revoked,
            A::UnknownCA => Self::UnknownCa,
            A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => {
                Self::BadCertificate
            }
            A::CertificateRequired => Self::CertificateRequired,
            A::ProtocolVersion => Self::ProtocolVersion,
            A::NoApplicationProtocol => Self::NoApplicationProtocol,
            A::AccessDenied => Self::AccessDenied,
            other => Self::Other(u8::from(other)),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CertificateExpired => {
                f.write_str("our certificate has expired or is not yet valid")
            }
            Self::Revoked => f.write_str("our certificate has been revoked"),
            Self::UnknownCa => {
                f.write_str("our certificate is not signed by a CA the server trusts")
            }
            Self::BadCertificate => {
                f.write_str("our certificate is not a valid SVID for the server's trust domain")
            }
            Self::CertificateRequired => f.write_str("we presented no certificate"),
            Self::ProtocolVersion => {
                f.write_str("we offered no TLS version it accepts (TLS 1.3 is required)")
            }
            Self::NoApplicationProtocol => f.write_str("we offered no protocol it speaks"),
            Self::AccessDenied => f.write_str("access denied"),
            Self::Other(code) => write!(f, "TLS alert {code}"),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server answered with an error code.
    #[error("{0}")]
    Remote(ErrorCode),
    /// The stream or connection failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The server sent something the protocol does not allow.
    #[error("server broke the protocol: {0}")]
    Protocol(String),
}

impl RequestError {
    /// The server's error code, if it sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote(c) => Some(*c),
            _ => None,
        }
    }

    /// True if the connection failed (a retry on a new connection may succeed).
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Self::Stream(StreamError::ConnectionLost(_) | StreamError::Timeout(_))
        )
    }

    /// True if the same request may succeed later: the connection failed, its stream was
    /// reset (what arrived of it does not count; the chunk is asked for again), or the
    /// server could not take new work just then (it was shutting down, say).
    pub fn is_retriable(&self) -> bool {
        self.is_connection()
            || matches!(self, Self::Stream(StreamError::Reset(_)))
            || matches!(
                self.code(),
                Some(ErrorCode::Unavailable | ErrorCode::AuditUnavailable)
            )
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Reconnecting failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A chunk did not match its hash: it was not accepted.
    #[error("chunk {0} failed verification")]
    Corrupt(ChunkIndex),
    /// The object is larger than the caller allowed.
    #[error("object is {size} bytes, more than the {limit} allowed")]
    TooLarge {
        /// The object's size.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The range asked for lies outside the object.
    #[error("range {start}..{end} is outside the object of {size} bytes")]
    Range {
        /// Start asked for.
        start: u64,
        /// End asked for.
        end: u64,
        /// The object's size.
        size: u64,
    },
    /// Writing the destination failed.
    #[error("destination: {0}")]
    Local(#[from] io::Error),
    /// RDMA was required (`TransportConfig::rdma_required`) but cannot be used.
    #[error("RDMA is required but cannot be used: {0}")]
    NoRdma(String),
}

impl FetchError {
    /// True if running the pull again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Request(r) => r.is_retriable(),
            Self::Connect(c) => c.is_retriable(),
            _ => false,
        }
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Reconnecting failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The source cannot be described by a manifest (too large).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The server refused a chunk: the source changed while it was being pushed.
    #[error("chunk {0} failed verification at the server (did the source change during the push?)")]
    Corrupt(ChunkIndex),
    /// Reading the source failed.
    #[error("source: {0}")]
    Local(#[from] io::Error),
}

impl PushError {
    /// True if running the push again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Request(r) => r.is_retriable(),
            Self::Connect(c) => c.is_retriable(),
            _ => false,
        }
    }
}

/// Why a stream failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer reset or stopped the stream.
    #[error("stream reset by peer (code {0})")]
    Reset(u64),
    /// The peer sent bytes that are not a valid frame.
    #[error("peer sent an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// No progress for longer than the I/O timeout.
    #[error("no progress for {0:?}")]
    Timeout(Duration),
}
