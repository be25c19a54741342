//! Errors of the client API, one enum per operation.
//!
//! "The server refused us" ([`ConnectError::Rejected`]), "we refused the server"
//! ([`ConnectError::ServerNotTrusted`]), "the server said no" ([`RequestError::Remote`]) and
//! "the bytes did not verify" ([`FetchError::Corrupt`]) are kept apart, so callers can
//! tell a configuration problem from a network problem from an attack.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::SvidError;

use crate::proto::connection::HelloError;
use crate::proto::{
    ChunkIndex, DecodeError, ErrorCode, FrameError, FrameKind, ManifestError, Response,
};
use crate::transport::rdma::verbs::{CompletionError, CompletionKind, VerbsError};

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
    Tls(#[source] TlsFailure),
    /// The server is at its connection limit.
    #[error("the node is at its connection limit; retry later")]
    Busy,
    /// The server speaks no protocol version we know.
    #[error("server speaks no protocol version we know (we speak version 1)")]
    Version,
    /// The connection ended during set-up.
    #[error("connection lost during set-up: {0}")]
    Lost(#[source] LostReason),
    /// Local set-up failed (sockets, TLS configuration).
    #[error("local set-up failed: {0}")]
    Local(#[source] LocalFailure),
}

/// Why a TLS handshake failed, when the server neither refused us nor was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The handshake finished without the server agreeing on our ALPN.
    #[error("server did not agree on our ALPN")]
    Alpn,
    /// rustls failed the handshake.
    #[error(transparent)]
    Rustls(rustls::Error),
    /// The QUIC connection ended during the handshake.
    #[error("{detail}")]
    Quic {
        /// How it ended.
        close: QuicClose,
        /// QUIC's account of it, for a person.
        detail: String,
    },
    /// The TCP stream failed during the handshake.
    #[error(transparent)]
    Io(io::Error),
}

/// Why a connection ended during set-up (after the network let us reach the server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LostReason {
    /// The handshake did not finish before QUIC's idle timeout.
    #[error("handshake timed out")]
    HandshakeTimedOut,
    /// The server closed the connection before answering our hello.
    #[error("server closed the connection")]
    ServerClosed,
    /// The server closed the hello stream without answering.
    #[error("server closed the hello stream")]
    HelloStream,
    /// The server's answer to our hello opened no usable connection.
    #[error(transparent)]
    Hello(HelloError),
    /// The hello stream failed.
    #[error(transparent)]
    Stream(StreamError),
    /// The connection ended before the hello stream opened.
    #[error("{0}")]
    Connection(LostConnection),
    /// The byte stream failed during the TLS handshake or the hello (TLS/TCP).
    #[error(transparent)]
    Io(io::Error),
    /// Connections kept being renewed without a chunk getting through: the transfer
    /// gave up after this many renewals.
    #[error("the connection was renewed {0} times without a chunk getting through")]
    RenewalsStalled(u32),
}

/// Why set-up failed on this side, before or beside the network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalFailure {
    /// The UDP socket for QUIC could not be opened.
    #[error("UDP socket: {0}")]
    UdpSocket(#[source] io::Error),
    /// Our TLS configuration could not be built (from our credentials).
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The transport's configuration could not be built, or its endpoint refused to
    /// start the connection.
    #[error(transparent)]
    Transport(io::Error),
    /// The server name we verify is not a valid DNS name.
    #[error(transparent)]
    ServerName(rustls::pki_types::InvalidDnsNameError),
    /// The blocking client's runtime could not be started.
    #[error("runtime: {0}")]
    Runtime(#[source] io::Error),
    /// `Path::Rdma` was asked of `connect`: RDMA runs over a QUIC connection.
    #[error(
        "RDMA carries transfers over a QUIC connection: connect with Path::Quic and enable TransportConfig::rdma"
    )]
    RdmaPath,
    /// No path was given to try.
    #[error("no path to try")]
    NoPath,
}

impl From<HelloError> for ConnectError {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::Busy => Self::Busy,
            HelloError::Version => Self::Version,
            other => Self::Lost(LostReason::Hello(other)),
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
            Self::CertificateExpired => f.write_str(
                "our certificate has expired or is not yet valid by the server's clock (if it \
                 is current, that clock or this machine's is wrong)",
            ),
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
    Protocol(#[source] ProtocolViolation),
}

/// What the server sent that the protocol does not allow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A `Response` frame did not decode.
    #[error(transparent)]
    Decode(DecodeError),
    /// An `Error` frame's code did not decode.
    #[error("malformed error frame: {0}")]
    MalformedError(#[source] DecodeError),
    /// A frame of a kind the stream does not carry at this point.
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameKind),
    /// A response that does not answer the request (which of `Response`'s variants).
    #[error("unexpected response {0:?}")]
    UnexpectedResponse(std::mem::Discriminant<Response>),
    /// The stream ended before its response.
    #[error("stream ended without a response")]
    NoResponse,
    /// The stream ended before its `End` frame.
    #[error("stream ended before End")]
    StreamEndedEarly,
    /// An answer the transfer cannot take (a held-chunk set of another size, another
    /// committed root, a chunk outside the object).
    #[error(transparent)]
    Transfer(#[from] crate::proto::transfer::TransferViolation),
    /// Data frames on an RDMA session's control stream.
    #[error("data on an RDMA control stream")]
    RdmaControlData,
    /// The RDMA session's control stream closed while chunks were being granted.
    #[error("the control stream closed")]
    RdmaControlClosed,
    /// The peer wrote into a ring slot we had not granted.
    #[error("a write into a slot that was not granted")]
    UngrantedSlot,
    /// A completion that is not a granted write, or a failed one.
    #[error("RDMA completion {kind:?}: {status:?}")]
    RdmaCompletion {
        /// What completed.
        kind: CompletionKind,
        /// Whether it succeeded.
        status: Result<(), CompletionError>,
    },
    /// Polling the RDMA device for completions failed.
    #[error("RDMA session failed: {0}")]
    RdmaSession(#[source] VerbsError),
    /// Re-posting a receive on the RDMA device failed.
    #[error("re-posting a receive: {0}")]
    RdmaRepost(#[source] VerbsError),
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
    /// The object changed its size while it was pulled into the caller's memory, which
    /// holds the old layout's chunks: pull it again.
    #[error("the object changed while it was pulled (it is now {size} bytes): pull it again")]
    Changed {
        /// The object's size now.
        size: u64,
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
    NoRdma(#[source] NoRdmaReason),
}

/// Why a pull cannot use RDMA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoRdmaReason {
    /// No RDMA device was found on this machine (or RDMA support is not built in).
    #[error("no RDMA device")]
    NoDevice,
    /// A paced pull moves by stream reads: RDMA chunks are not paced.
    #[error("a paced pull (max_rate) moves by stream reads, not RDMA")]
    PacedPull,
    /// The connection is not QUIC (RDMA's control stream runs over QUIC).
    #[error("RDMA needs a QUIC connection")]
    NeedsQuic,
    /// The server cannot use RDMA for this transfer.
    #[error("the server cannot use RDMA for this transfer")]
    ServerRefused,
    /// The RDMA device could not be opened.
    #[error("RDMA device unavailable ({0})")]
    DeviceUnavailable(#[source] VerbsError),
    /// The software RDMA device (`RdmaMode::Soft`) could not be opened.
    #[error("soft RDMA device unavailable ({0})")]
    SoftDeviceUnavailable(#[source] VerbsError),
    /// The RDMA connection to the server's device failed.
    #[error("RDMA connection failed ({0})")]
    ConnectFailed(#[source] VerbsError),
}

impl NoRdmaReason {
    /// What a pull that may fall back does instead, for the notice it logs.
    pub(crate) fn fallback(&self) -> &'static str {
        match self {
            Self::NeedsQuic => "using TLS over TCP",
            _ => "using QUIC",
        }
    }
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
    ConnectionLost(LostConnection),
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

/// Why a stream's connection is gone: a kind to match on and, where the transport gave
/// one, its account in words.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LostConnection {
    /// What ended it.
    pub kind: LostKind,
    /// The transport's own account, for a person (a QUIC close in words, the I/O failure
    /// that ended a TLS/TCP connection); shown instead of the kind's words when present.
    pub detail: Option<String>,
}

impl LostConnection {
    /// A loss of `kind`, described by the kind alone.
    pub fn new(kind: LostKind) -> Self {
        Self { kind, detail: None }
    }

    /// A loss of `kind`, described by `detail` (text for a person).
    pub fn with_detail(kind: LostKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: Some(detail.into()),
        }
    }
}

impl fmt::Display for LostConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(d) => f.write_str(d),
            None => self.kind.fmt(f),
        }
    }
}

/// The kinds of [`LostConnection`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LostKind {
    /// The connection was closed, by either side or by the network.
    Closed,
    /// The QUIC connection ended, as QUIC tells it.
    Quic(QuicClose),
    /// The stream can no longer be used though the connection may live on (QUIC: the
    /// stream was already closed on this side, or its 0-RTT data was rejected).
    Stream,
    /// Every stream number of the TLS/TCP connection is spent: reconnect.
    StreamsExhausted,
    /// The server is retiring the connection (it reached its maximum age): open new
    /// streams on a fresh one.
    GoingAway,
    /// This side is the server, which opens no streams.
    ServerOpensNoStreams,
    /// The connection had ended and a new one could not be made.
    Reconnect(Arc<ConnectError>),
}

impl fmt::Display for LostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed"),
            Self::Quic(c) => write!(f, "{c}"),
            Self::Stream => f.write_str("the stream is closed"),
            Self::StreamsExhausted => f.write_str("stream numbers exhausted; reconnect"),
            Self::GoingAway => f.write_str("the server is retiring the connection; reconnect"),
            Self::ServerOpensNoStreams => f.write_str("a server opens no streams"),
            Self::Reconnect(e) => write!(f, "{e}"),
        }
    }
}

/// How a QUIC connection ended, in this crate's terms (`transport/quic.rs` converts
/// quinn's): what a caller can match on, beside the close in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuicClose {
    /// The peer speaks no QUIC version we do.
    VersionMismatch,
    /// This side detected a QUIC transport error (RFC 9000 section 20.1), by its code.
    TransportError(u64),
    /// The peer closed the connection with a transport error code (QUIC carries TLS
    /// alerts as CRYPTO_ERROR codes `0x100 + alert`: see [`QuicClose::alert`]).
    ConnectionClosed(u64),
    /// The peer's application closed the connection, with its code.
    ApplicationClosed(u64),
    /// The peer reset the connection.
    Reset,
    /// No packets for the idle timeout.
    TimedOut,
    /// This side closed the connection.
    LocallyClosed,
    /// Connection IDs ran out.
    CidsExhausted,
}

impl QuicClose {
    /// The TLS alert the peer closed the connection with, if any.
    pub fn alert(self) -> Option<u8> {
        match self {
            Self::ConnectionClosed(code) => (0x100..=0x1ff)
                .contains(&code)
                .then(|| (code - 0x100) as u8),
            _ => None,
        }
    }
}

impl fmt::Display for QuicClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VersionMismatch => f.write_str("peer doesn't implement any supported version"),
            Self::TransportError(code) => write!(f, "transport error {code:#x}"),
            Self::ConnectionClosed(code) => write!(f, "closed by peer: error {code:#x}"),
            Self::ApplicationClosed(code) => write!(f, "closed by peer application: {code}"),
            Self::Reset => f.write_str("reset by peer"),
            Self::TimedOut => f.write_str("timed out"),
            Self::LocallyClosed => f.write_str("closed"),
            Self::CidsExhausted => f.write_str("connection IDs exhausted"),
        }
    }
}

impl From<crate::proto::transfer::PullRefusal> for FetchError {
    fn from(r: crate::proto::transfer::PullRefusal) -> Self {
        use crate::proto::transfer::PullRefusal;
        match r {
            PullRefusal::Range { start, end, size } => Self::Range { start, end, size },
            PullRefusal::TooLarge { size, limit } => Self::TooLarge { size, limit },
        }
    }
}

impl From<crate::proto::transfer::TransferViolation> for RequestError {
    fn from(v: crate::proto::transfer::TransferViolation) -> Self {
        Self::Protocol(v.into())
    }
}

impl From<crate::proto::request::UnexpectedResponse> for RequestError {
    fn from(u: crate::proto::request::UnexpectedResponse) -> Self {
        Self::Protocol(ProtocolViolation::UnexpectedResponse(u.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::proto::Frame;
    use crate::proto::connection::{ServerHello, handle_answer};
    use crate::transport::{BoxFuture, FrameSource, RecvFrames};

    /// A stream that yields `frames`, then ends.
    #[derive(Debug)]
    struct Frames(VecDeque<Frame>);

    impl RecvFrames for Frames {
        fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>, StreamError>> {
            Box::pin(async move { Ok(self.0.pop_front()) })
        }
    }

    async fn response_to(frames: Vec<Frame>) -> Result<Response, RequestError> {
        let mut source = FrameSource::new(Box::new(Frames(frames.into())), Duration::from_secs(5));
        crate::client::reply::response(&mut source).await
    }

    fn frame(kind: FrameKind, payload: &'static [u8]) -> Frame {
        Frame::new(kind, 1, Bytes::from_static(payload))
    }

    #[test]
    fn a_hello_answered_by_another_frame_is_a_typed_loss() {
        let data = frame(FrameKind::Data, b"");
        let e = ConnectError::from(handle_answer(&data).unwrap_err());
        assert!(
            matches!(
                e,
                ConnectError::Lost(LostReason::Hello(HelloError::Unexpected(FrameKind::Data)))
            ),
            "{e:?}"
        );
        assert!(e.is_retriable() && !e.is_network());
        assert_eq!(
            e.to_string(),
            "connection lost during set-up: unexpected Data frame instead of hello answer"
        );
        // Busy and Version keep variants of their own.
        let busy = ConnectError::from(handle_answer(&ServerHello::busy()).unwrap_err());
        assert!(matches!(busy, ConnectError::Busy), "{busy:?}");
    }

    #[tokio::test]
    async fn responses_that_break_the_protocol_say_how() {
        let e = response_to(vec![frame(FrameKind::Response, b"\xff")])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::Protocol(ProtocolViolation::Decode(DecodeError::Tag(0xff)))
            ),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "server broke the protocol: unknown tag 255");
        assert!(!e.is_retriable());

        let e = response_to(vec![frame(FrameKind::End, b"")])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::Protocol(ProtocolViolation::UnexpectedFrame(FrameKind::End))
            ),
            "{e:?}"
        );

        let e = response_to(vec![frame(FrameKind::Error, b"")])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::Protocol(ProtocolViolation::MalformedError(DecodeError::Truncated))
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "server broke the protocol: malformed error frame: message is truncated"
        );

        let e = response_to(vec![]).await.unwrap_err();
        assert!(
            matches!(e, RequestError::Protocol(ProtocolViolation::NoResponse)),
            "{e:?}"
        );

        let closed = Frame::new(FrameKind::Response, 1, Response::Closed.encode());
        assert!(matches!(
            response_to(vec![closed]).await,
            Ok(Response::Closed)
        ));
    }

    #[test]
    fn a_failed_reconnect_is_a_lost_connection_that_keeps_its_cause() {
        let e = RequestError::Stream(StreamError::ConnectionLost(LostConnection::new(
            LostKind::Reconnect(Arc::new(ConnectError::Busy)),
        )));
        assert!(e.is_connection() && e.is_retriable());
        assert_eq!(
            e.to_string(),
            "connection lost: the node is at its connection limit; retry later"
        );
        let RequestError::Stream(StreamError::ConnectionLost(lost)) = &e else {
            unreachable!()
        };
        assert!(matches!(&lost.kind, LostKind::Reconnect(c) if matches!(**c, ConnectError::Busy)));
        // A transport's words stand in for the kind's.
        let quic = LostConnection::with_detail(LostKind::Quic(QuicClose::TimedOut), "timed out");
        assert_eq!(quic.to_string(), "timed out");
        assert_eq!(
            LostConnection::new(LostKind::Closed).to_string(),
            "connection closed"
        );
    }

    #[test]
    fn typed_set_up_failures_keep_their_words_and_retriability() {
        let alpn = ConnectError::Tls(TlsFailure::Alpn);
        assert_eq!(
            alpn.to_string(),
            "TLS handshake failed: server did not agree on our ALPN"
        );
        assert!(!alpn.is_retriable());
        let tls = ConnectError::Tls(TlsFailure::Rustls(rustls::Error::HandshakeNotComplete));
        assert!(!tls.is_retriable());
        let local = ConnectError::Local(LocalFailure::NoPath);
        assert_eq!(local.to_string(), "local set-up failed: no path to try");
        assert!(!local.is_retriable());
        let timed_out = ConnectError::Lost(LostReason::HandshakeTimedOut);
        assert!(timed_out.is_retriable() && !timed_out.is_network());
        assert_eq!(
            timed_out.to_string(),
            "connection lost during set-up: handshake timed out"
        );
        // A TLS alert of a QUIC close is at hand.
        assert_eq!(QuicClose::ConnectionClosed(0x12a).alert(), Some(0x2a));
        assert_eq!(QuicClose::ApplicationClosed(0x12a).alert(), None);
    }

    #[test]
    fn no_rdma_says_why_and_is_final() {
        let e = FetchError::NoRdma(NoRdmaReason::NeedsQuic);
        assert!(!e.is_retriable());
        assert_eq!(
            e.to_string(),
            "RDMA is required but cannot be used: RDMA needs a QUIC connection"
        );
        assert_eq!(NoRdmaReason::NeedsQuic.fallback(), "using TLS over TCP");
        assert_eq!(NoRdmaReason::NoDevice.fallback(), "using QUIC");
    }
}
