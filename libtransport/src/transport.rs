//! The transport seam: what a transport gives the client and server drivers, and the
//! product's two transports.
//!
//! A transport makes connections ([`Connector`] for clients; [`Listener`], [`Incoming`],
//! [`Handshaken`] for servers) whose peers the drivers then check (`identity.rs`), and
//! carries request streams of [`Frame`]s in each direction over an established
//! [`Connection`]. Over QUIC (`quic.rs`) each request is its own QUIC stream; over TLS/TCP
//! (`tcp.rs`) the multiplexer in `mux.rs` interleaves numbered streams on one connection.
//! Plug-in transports implement the same traits elsewhere: the bench's plaintext baseline
//! in `benches/`, the in-memory one of `test_util::sim`. Nothing above this module names
//! quinn or tokio-rustls, and nothing above it knows which transport it runs on, except for
//! reporting.
//!
//! ```text
//!   client driver (client.rs)        server driver (server.rs)
//!          │ Connector                      │ Listener → Incoming → Handshaken
//!          └──────────── Connection ────────┘
//!                 RequestStream: FrameSink / FrameSource
//!   ┌──────────────┬─────────────────┬─────────────────────────┐
//!   │ quic.rs      │ tcp.rs + mux.rs │ plug-ins (bench, tests) │
//!   └──────────────┴─────────────────┴─────────────────────────┘
//! ```

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::ConnectError;
pub use crate::error::{LostConnection, LostKind, QuicClose, StreamError};
use crate::identity::CredentialsEnd;
pub use crate::identity::PeerProof;
use crate::proto::connection::ServerHello;
use crate::proto::frame::MAX_DATA_PAYLOAD;
use crate::proto::{ErrorCode, Frame, FrameKind, HelloAck};
pub use crate::vocab::{Path, TransferPath};

pub mod mux;
pub mod quic;
pub mod rdma;
pub mod tcp;

/// Makes client connections over one transport. The client driver calls it for its first
/// connection and for every reconnection; each call runs the transport's handshake
/// (presenting the newest credentials the connector was given) and the protocol's hello
/// ([`crate::proto::connection`]), and hands back the connection with what the transport
/// learnt of the peer. The driver, not the transport, decides whether that peer is trusted
/// (`identity.rs`).
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    /// Which transport this is.
    fn path(&self) -> Path;

    /// Connects to `addr`.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, Result<Established, ConnectError>>;
}

/// A connection whose handshake and hello are done, with the peer's proof of identity.
#[derive(Debug)]
pub struct Established {
    /// The connection.
    pub connection: Arc<dyn Connection>,
    /// What the peer proved of itself.
    pub proof: PeerProof,
    /// The server's answer to our hello.
    pub ack: HelloAck,
}

/// Accepts connections for the server driver, on one transport.
pub trait Listener: Send + fmt::Debug + 'static {
    /// Which transport this is.
    fn path(&self) -> Path;

    /// The address it listens on.
    fn local_addr(&self) -> Option<SocketAddr>;

    /// The next connection attempt; `None` once the listener can accept no more.
    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>>;

    /// Stops accepting and closes what the listener still owns (QUIC: the endpoint).
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A connection attempt, before its handshake.
pub trait Incoming: Send + 'static {
    /// Where it comes from.
    fn remote_addr(&self) -> SocketAddr;

    /// Turns it away because the server is at its connection limit, as the transport can
    /// (QUIC refuses it at once; TLS/TCP answers its hello with `Busy`, within a small
    /// budget of its own).
    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// Runs the transport's handshake (TLS, ALPN).
    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>>;

    /// Turns it away unanswered and without any TLS work, as cheaply as the transport can:
    /// the server's handshake budget is spent. By default it is dropped (TCP: closed).
    fn shed(self: Box<Self>) {}

    /// Whether the peer has shown it receives at its source address (QUIC: it came back
    /// with a Retry token). Transports whose connection setup shows it (TCP) say `true`,
    /// the default.
    fn address_validated(&self) -> bool {
        true
    }

    /// Asks the peer to show it receives at its address before its attempt counts (QUIC:
    /// a stateless Retry; the peer comes back as a new attempt). Where the transport cannot
    /// ask, or the address is shown already, this is [`Incoming::shed`].
    fn retry(self: Box<Self>) {
        self.shed();
    }
}

/// A connection whose handshake is done, before the hello: the server driver checks the
/// proof first, and either runs the hello or refuses.
pub trait Handshaken: Send + 'static {
    /// What the peer proved of itself.
    fn proof(&self) -> PeerProof;

    /// Closes it: its proof did not verify.
    fn refuse(self: Box<Self>);

    /// Answers the client's hello with `Busy` (the server is at its connection limit, or
    /// the peer's identity at its own) within `timeout`, then closes. By default it is
    /// closed as by [`Handshaken::refuse`], unanswered.
    fn busy(self: Box<Self>, timeout: Duration) -> BoxFuture<'static, ()> {
        let _ = timeout;
        self.refuse();
        Box::pin(async {})
    }

    /// Reads the client's hello, sends what `hello` answers, and hands back the connection
    /// if the hello was accepted (`None`: the hello failed or was refused, and the
    /// connection is closed), within `timeout`.
    fn hello(
        self: Box<Self>,
        hello: ServerHello,
        timeout: Duration,
    ) -> BoxFuture<'static, Option<Arc<dyn Connection>>>;
}

/// Why a handshake did not complete: for the audit trail and a bounded metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of failure.
    pub class: RefusalClass,
    /// In words, for the audit trail (never peer-supplied free text).
    pub reason: String,
}

/// The kinds of handshake failure, as metrics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalClass {
    /// No handshake within the time allowed.
    Timeout,
    /// The peer did not negotiate our ALPN.
    Alpn,
    /// The peer's certificate is revoked.
    Revoked,
    /// The peer's certificate or identity did not verify.
    Certificate,
    /// No TLS version in common.
    ProtocolVersion,
    /// Another TLS failure.
    Tls,
}

impl RefusalClass {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Alpn => "alpn",
            Self::Revoked => "revoked",
            Self::Certificate => "certificate",
            Self::ProtocolVersion => "protocol_version",
            Self::Tls => "tls",
        }
    }

    /// Classifies a refusal reason in words.
    pub(crate) fn of(reason: &str) -> Self {
        if reason.contains("timed out") {
            Self::Timeout
        } else if reason.contains("ALPN") {
            Self::Alpn
        } else if reason.to_ascii_lowercase().contains("revoked") {
            // rustls says "invalid peer certificate: Revoked"; our own check "... revoked".
            Self::Revoked
        } else if reason.contains("certificate") || reason.contains("identity") {
            Self::Certificate
        } else if reason.contains("version") {
            Self::ProtocolVersion
        } else {
            Self::Tls
        }
    }
}

impl Refusal {
    /// A refusal described by `reason`, classified by its words.
    pub fn new(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self {
            class: RefusalClass::of(&reason),
            reason,
        }
    }
}

/// A QUIC connection's view of its path (see [`crate::Client::quic_path_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicPathStats {
    /// The datagram size in use: path-MTU discovery raises it up to the configured ceiling
    /// and falls back to 1200 when larger datagrams keep getting lost.
    pub mtu: u16,
    /// The smoothed round-trip time.
    pub rtt: Duration,
    /// Packets sent on the path.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Times losses of large datagrams made QUIC fall back to the minimum size.
    pub black_holes_detected: u64,
    /// Datagrams received from the server (their average size shows the server's MTU).
    pub received_datagrams: u64,
    /// Bytes of those datagrams.
    pub received_bytes: u64,
}

/// A future a transport hands out: boxed, so transports are trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An established, authenticated connection, as a transport gives it to the drivers: a way
/// to open and accept request streams, and to close. QUIC and TLS/TCP implement it in this
/// module; plug-in transports (the bench's plaintext baseline, the in-memory one of
/// `test_util`) implement it elsewhere.
pub trait Connection: Send + Sync + fmt::Debug + 'static {
    /// Opens a stream whose first frame is a `Request` carrying `request`.
    fn open(&self, request: Bytes) -> BoxFuture<'_, Result<RequestStream, StreamError>>;

    /// The next stream the peer opened, with its first frame if the transport had to read
    /// it already; `None` once the connection has ended.
    fn accept(&self) -> BoxFuture<'_, Option<IncomingStream>>;

    /// Ends the connection, telling the peer why where the transport can.
    fn close(&self, reason: Close);

    /// True once the connection has ended, for whatever reason.
    fn is_closed(&self) -> bool;

    /// Why the peer closed the connection, if it said it was for credentials that ended
    /// (transports that cannot carry the reason say `None`).
    fn closed_for_credentials(&self) -> Option<CredentialsEnd> {
        None
    }

    /// Tells the peer this side takes no new requests on the connection (a server retiring
    /// it at its maximum age): the peer opens its next streams on a fresh connection, and
    /// those in flight go on. QUIC sends a `GoAway` frame on a stream the server opens for
    /// it, TLS/TCP on stream 0. Transports that cannot say so do nothing; the peer learns
    /// at the close.
    fn go_away(&self) {}

    /// Whether the peer is retiring the connection: it sent `GoAway`, or closed the
    /// connection saying it reached its maximum age. New requests then go on a fresh
    /// connection.
    fn is_going_away(&self) -> bool {
        false
    }

    /// Fills `out` from the TLS session's keying-material exporter (RFC 8446 section 7.5)
    /// under `label` and `context`: the same bytes at both ends, never on the wire.
    fn export_keying_material(
        &self,
        out: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), NoKeyingMaterial> {
        let _ = (out, label, context);
        Err(NoKeyingMaterial)
    }

    /// The local address this connection runs over, where the transport knows it.
    fn local_ip(&self) -> Option<IpAddr> {
        None
    }

    /// What the transport has learnt of the path, for reports (QUIC only).
    fn path_stats(&self) -> Option<QuicPathStats> {
        None
    }
}

/// Why a connection is closed by this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Done with it (a client that is finished).
    Done,
    /// The server is shutting down.
    Shutdown,
    /// The peer's credentials ended while connected.
    Credentials(CredentialsEnd),
    /// The connection reached its maximum age (the server retires it).
    MaxAge,
}

impl Close {
    /// The reason in words, as the peer is told where the transport carries words.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Done => "closed by client",
            Self::Shutdown => "server shutting down",
            Self::Credentials(end) => end.reason(),
            Self::MaxAge => "max age",
        }
    }
}

/// The application close code of a connection closed at its maximum age ([`Close::MaxAge`]),
/// for transports that carry one: beside [`CredentialsEnd::close_code`]'s, outside the
/// `u16` range of [`ErrorCode`], so it is never mistaken for another reason.
pub const CLOSE_MAX_AGE: u32 = 0x1_0003;

/// The TLS session of a connection cannot export keying material (it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection has no TLS session to export keying material from")]
pub struct NoKeyingMaterial;

/// A stream the peer opened.
#[derive(Debug)]
pub struct IncomingStream {
    /// Its first frame, when the transport read it to learn of the stream.
    pub first: Option<Frame>,
    /// The stream.
    pub stream: RequestStream,
}

/// How a transport sends frames on one stream.
pub trait SendFrames: Send + fmt::Debug {
    /// Sends one frame (`payload` at most [`crate::proto::frame::MAX_FRAME_PAYLOAD`]).
    fn send(&mut self, kind: FrameKind, payload: Bytes) -> BoxFuture<'_, Result<(), StreamError>>;

    /// Ends the sending side cleanly.
    fn finish(&mut self);

    /// Ends the sending side and resolves once the peer has everything sent (or at once,
    /// where the transport delivers what is queued before it closes anyway).
    fn finish_delivered(&mut self) -> BoxFuture<'_, ()>;
}

/// How a transport receives frames on one stream.
pub trait RecvFrames: Send + fmt::Debug {
    /// The next frame; `None` when the peer ended the stream cleanly at a frame boundary.
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>, StreamError>>;

    /// Whether a `Cancel` frame is already here, without waiting (transports whose peers
    /// cancel by resetting the stream say `false`: the next send fails instead).
    fn try_recv_cancel(&mut self) -> bool {
        false
    }

    /// The next frame, a `Data` frame's payload read straight into the start of `dest` when
    /// it fits (transports that read on the caller's task save a copy so). By default the
    /// frame is received as by [`RecvFrames::recv`] and a fitting payload copied.
    fn recv_into<'a>(
        &'a mut self,
        dest: &'a mut [u8],
    ) -> BoxFuture<'a, Result<Option<Received>, StreamError>> {
        Box::pin(async move {
            Ok(self.recv().await?.map(|f| match f.kind {
                FrameKind::Data if f.payload.len() <= dest.len() => {
                    dest[..f.payload.len()].copy_from_slice(&f.payload);
                    Received::Data(f.payload.len())
                }
                _ => Received::Frame(f),
            }))
        })
    }
}

/// What [`FrameSource::recv_into`] received.
#[derive(Debug)]
pub enum Received {
    /// A `Data` frame whose payload, this many bytes, is now at the start of the buffer.
    Data(usize),
    /// Any other frame (or a `Data` frame larger than the buffer).
    Frame(Frame),
}

/// The sending half of a request stream, with the I/O timeout.
#[derive(Debug)]
pub struct FrameSink {
    inner: Box<dyn SendFrames>,
    timeout: Duration,
}

impl FrameSink {
    /// Wraps a transport's sending half; every send fails after `timeout` without progress.
    pub fn new(inner: Box<dyn SendFrames>, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: FrameKind, payload: Bytes) -> Result<(), StreamError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.inner.send(kind, payload))
            .await
            .map_err(|_| StreamError::Timeout(timeout))?
    }

    /// Sends object bytes as `Data` frames of at most [`MAX_DATA_PAYLOAD`], without copying.
    pub async fn send_data(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA_PAYLOAD));
            self.send(FrameKind::Data, piece).await?;
        }
        Ok(())
    }

    /// Sends an `Error` frame.
    pub async fn send_error(&mut self, code: ErrorCode) -> Result<(), StreamError> {
        self.send(FrameKind::Error, code.encode()).await
    }

    /// Ends the sending side and waits (within the I/O timeout) until the peer has
    /// everything sent, so closing the connection afterwards loses nothing.
    pub async fn finish_delivered(&mut self) {
        let _ = tokio::time::timeout(self.timeout, self.inner.finish_delivered()).await;
    }

    /// Ends the sending side cleanly.
    pub fn finish(&mut self) {
        self.inner.finish();
    }
}

/// The receiving half of a request stream, with the I/O timeout.
#[derive(Debug)]
pub struct FrameSource {
    inner: Box<dyn RecvFrames>,
    timeout: Duration,
}

impl FrameSource {
    /// Wraps a transport's receiving half; every receive fails after `timeout` without a
    /// frame.
    pub fn new(inner: Box<dyn RecvFrames>, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The next frame; `None` when the peer ended the stream cleanly at a frame boundary.
    pub async fn recv(&mut self) -> Result<Option<Frame>, StreamError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.inner.recv())
            .await
            .map_err(|_| StreamError::Timeout(timeout))?
    }

    /// The next frame; a `Data` frame whose payload fits in `dest` lands there (see
    /// [`RecvFrames::recv_into`]). `None` when the peer ended the stream cleanly.
    pub async fn recv_into(&mut self, dest: &mut [u8]) -> Result<Option<Received>, StreamError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.inner.recv_into(dest))
            .await
            .map_err(|_| StreamError::Timeout(timeout))?
    }

    /// A frame that is already here, without waiting (to notice a cancel between sends).
    pub fn try_recv_cancel(&mut self) -> bool {
        self.inner.try_recv_cancel()
    }
}

/// The RDMA session keys of `conn` for `session`, from the TLS keying-material exporter:
/// both ends of the connection get the same keys, and no secret crosses the wire.
pub(crate) fn rdma_keys(
    conn: &dyn Connection,
    session: [u8; 16],
) -> Result<crate::proto::seal::SessionKeys, NoKeyingMaterial> {
    use crate::proto::seal::{EXPORTER_BYTES, EXPORTER_LABEL, SessionKeys, exporter_context};
    let mut out = zeroize::Zeroizing::new([0u8; EXPORTER_BYTES]);
    conn.export_keying_material(&mut out[..], EXPORTER_LABEL, &exporter_context(&session))?;
    Ok(SessionKeys::derive(session, &out))
}

/// A request stream: both halves.
#[derive(Debug)]
pub struct RequestStream {
    /// What we send.
    pub sink: FrameSink,
    /// What the peer sends.
    pub source: FrameSource,
}

#[cfg(test)]
mod wire_tests;
