//! The QUIC transport (quinn): endpoints with our TLS configs, tuned for bulk transfer; the
//! [`Connector`] and [`Listener`] the drivers use; each request on a QUIC stream of its own;
//! and the mapping of quinn's errors to ours. The only file of the crate that names quinn.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    AsyncUdpSocket, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    Runtime, UdpPoller, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;

use super::{
    BoxFuture, CLOSE_MAX_AGE, Close, Connection, Connector, Established, FrameSink, FrameSource,
    Handshaken, Incoming, IncomingStream, Listener, LostConnection, LostKind, NoKeyingMaterial,
    Path, PeerProof, QuicClose, QuicPathStats, Received, RecvFrames, Refusal, RequestStream,
    SendFrames, StreamError,
};
use crate::clock::Clock;
use crate::config::TransportConfig;
use crate::error::{ConnectError, LocalFailure, LostReason, Rejection, TlsFailure};
use crate::identity::{CredentialsEnd, FailureSlot, IdentityHandle, take_failure};
use crate::proto::connection::{ServerHello, handle_answer, hello_frame};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{ErrorCode, Frame, FrameError, FrameHeader, FrameKind};

/// A server endpoint on `addr` with the product's QUIC endpoint and transport settings
/// (`cfg`) and the caller's TLS config, for reference loops that measure quinn itself under
/// the product's settings (`transport-bench`'s `bare-quic`). The product's own listener,
/// which verifies peers and speaks the protocol, is [`QuicListener`].
pub fn reference_server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &TransportConfig,
) -> io::Result<Endpoint> {
    server_endpoint(addr, tls, cfg)
}

/// The client side of [`reference_server_endpoint`]: an endpoint for `peer`, and the
/// connection config to dial it with.
pub fn reference_client_endpoint(
    peer: SocketAddr,
    tls: rustls::ClientConfig,
    cfg: &TransportConfig,
) -> io::Result<(Endpoint, quinn::ClientConfig)> {
    Ok((client_endpoint(peer, cfg)?, client_config(tls, cfg)?))
}

/// A server endpoint on `addr` speaking our TLS config.
fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &TransportConfig,
) -> io::Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(transport_config(cfg, true)?));
    let socket = bind_udp(addr, cfg.socket_buffer_bytes)?;
    endpoint(socket, Some(sc), cfg)
}

/// A client endpoint on an ephemeral port of the right address family.
fn client_endpoint(peer: SocketAddr, cfg: &TransportConfig) -> io::Result<Endpoint> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = bind_udp(bind, cfg.socket_buffer_bytes)?;
    endpoint(socket, None, cfg)
}

fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    cfg: &TransportConfig,
) -> io::Result<Endpoint> {
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = CappedBatches {
        inner: runtime.wrap_udp_socket(socket)?,
        max_segments: max_batch_segments(cfg.max_mtu),
    };
    Endpoint::new_with_abstract_socket(endpoint_config(cfg)?, server, Arc::new(socket), runtime)
}

/// The most datagrams of `mtu` bytes one batched send (UDP GSO) may carry: the batch goes
/// to the kernel as a single UDP datagram, whose payload cannot exceed 65 507 bytes over
/// IPv4. quinn batches up to 10, which overshoots from 6 551-byte datagrams up; the kernel
/// then refuses the send and the whole batch is lost, each time.
fn max_batch_segments(mtu: u16) -> usize {
    const MAX_UDP_PAYLOAD: usize = 65_507;
    (MAX_UDP_PAYLOAD / usize::from(mtu.max(1))).max(1)
}

/// quinn's UDP socket, with batched sends capped by [`max_batch_segments`].
#[derive(Debug)]
struct CappedBatches {
    inner: Arc<dyn AsyncUdpSocket>,
    max_segments: usize,
}

impl AsyncUdpSocket for CappedBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The endpoint settings shared by both sides. The largest UDP payload we accept is the
/// path-MTU ceiling: quinn announces it to the peer, which never probes beyond it, so with
/// quinn's default (1472) jumbo frames would go unused. The receive buffers grow with it
/// (quinn sizes them for a batch of coalesced datagrams of this size).
fn endpoint_config(cfg: &TransportConfig) -> io::Result<EndpointConfig> {
    let mut e = EndpointConfig::default();
    e.max_udp_payload_size(cfg.max_mtu)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    Ok(e)
}

/// The quinn client config for one connection attempt.
fn client_config(
    tls: rustls::ClientConfig,
    cfg: &TransportConfig,
) -> io::Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport_config(cfg, false)?));
    Ok(c)
}

fn transport_config(cfg: &TransportConfig, server: bool) -> io::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Only clients open request streams, each carrying one request; a server may open one
    // unidirectional stream, to say `GoAway` when it retires the connection.
    t.max_concurrent_bidi_streams(VarInt::from_u32(if server { cfg.max_streams } else { 0 }));
    t.max_concurrent_uni_streams(VarInt::from_u32(if server { 0 } else { 1 }));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(cfg.idle_timeout).map_err(io::Error::other)?,
    ));
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.stream_receive_window(VarInt::from_u32(cfg.stream_window));
    t.receive_window(VarInt::from_u32(cfg.connection_window));
    t.send_window(u64::from(cfg.connection_window));
    t.initial_mtu(cfg.initial_mtu);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_mtu);
    t.mtu_discovery_config(Some(mtu));
    t.datagram_receive_buffer_size(None);
    Ok(t)
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Serve IPv4 too where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // The kernel caps these at net.core.[rw]mem_max; a smaller buffer only costs speed.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The address `conn` runs over on this side: where an RDMA session's soft device listens,
/// so it crosses the same network as the connection.
fn local_ip(conn: &quinn::Connection) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    if let Some(ip) = conn.local_ip() {
        return ip.to_canonical();
    }
    // Clients are not told: ask the routing table which source address reaches the peer
    // (connecting a UDP socket sends nothing).
    let remote = SocketAddr::new(
        conn.remote_address().ip().to_canonical(),
        conn.remote_address().port(),
    );
    let any: IpAddr = if remote.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| {
            s.connect(remote)?;
            s.local_addr()
        })
        .map_or(any, |a| a.ip())
}

/// Connects over QUIC from an endpoint of its own, presenting the newest SVID of an
/// identity at each handshake.
#[derive(Debug)]
pub struct QuicConnector {
    endpoint: Endpoint,
    identity: IdentityHandle,
    server_id: Option<certs::SpiffeId>,
    clock: Arc<dyn Clock>,
    transport: Arc<TransportConfig>,
}

impl QuicConnector {
    /// A connector for peers of `peer`'s address family, expecting the server to be
    /// `server_id` if given.
    pub(crate) fn new(
        peer: SocketAddr,
        identity: IdentityHandle,
        server_id: Option<certs::SpiffeId>,
        clock: Arc<dyn Clock>,
        transport: Arc<TransportConfig>,
    ) -> io::Result<Self> {
        Ok(Self {
            endpoint: client_endpoint(peer, &transport)?,
            identity,
            server_id,
            clock,
            transport,
        })
    }

    async fn establish(&self, addr: SocketAddr) -> Result<Established, ConnectError> {
        let (conn, chain, ack) = self.handshake(addr).await?;
        Ok(Established {
            connection: Arc::new(QuicConnection::client(conn, self.transport.io_timeout)),
            proof: PeerProof::chain(chain),
            ack,
        })
    }

    /// The TLS handshake, the ALPN check and the hello.
    async fn handshake(
        &self,
        addr: SocketAddr,
    ) -> Result<
        (
            quinn::Connection,
            Vec<CertificateDer<'static>>,
            crate::proto::HelloAck,
        ),
        ConnectError,
    > {
        let failure = FailureSlot::default();
        let tls = crate::tls::client_config(
            &self.identity,
            self.server_id.clone(),
            failure.clone(),
            self.clock.clone(),
        )
        .map_err(|e| ConnectError::Local(LocalFailure::TlsConfig(e)))?;
        let t = &self.transport;
        let timeout = t.handshake_timeout;
        let qc =
            client_config(tls, t).map_err(|e| ConnectError::Local(LocalFailure::Transport(e)))?;
        let connecting = self
            .endpoint
            .connect_with(qc, addr, crate::tls::SERVER_NAME)
            .map_err(|e| ConnectError::Local(LocalFailure::Transport(io::Error::other(e))))?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(connect_error(&e, &failure)),
            Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
        };
        if alpn(&conn).as_deref() != Some(crate::tls::ALPN) {
            return Err(ConnectError::Tls(TlsFailure::Alpn));
        }
        let chain = peer_chain(&conn);
        let ack = match tokio::time::timeout(timeout, client_hello(&conn, t.io_timeout)).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                // A server that refused our certificate closed with a TLS alert.
                return Err(match conn.close_reason() {
                    Some(reason) => connect_error(&reason, &failure),
                    None => e,
                });
            }
            Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
        };
        Ok((conn, chain, ack))
    }

    /// A raw QUIC connection past the hello, for tests that write bytes of their own.
    #[cfg(test)]
    pub(crate) async fn connect_raw(&self, addr: SocketAddr) -> quinn::Connection {
        self.handshake(addr).await.expect("QUIC handshake").0
    }
}

impl Connector for QuicConnector {
    fn path(&self) -> Path {
        Path::Quic
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, Result<Established, ConnectError>> {
        Box::pin(self.establish(addr))
    }
}

/// Accepts QUIC connections on an endpoint of its own.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: Endpoint,
    transport: Arc<TransportConfig>,
}

impl QuicListener {
    /// Binds `addr`, serving `tls`.
    pub(crate) fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        transport: Arc<TransportConfig>,
    ) -> io::Result<Self> {
        Ok(Self {
            endpoint: server_endpoint(addr, tls, &transport)?,
            transport,
        })
    }
}

impl Listener for QuicListener {
    fn path(&self) -> Path {
        Path::Quic
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>> {
        Box::pin(async {
            let incoming = self.endpoint.accept().await?;
            Some(Box::new(QuicIncoming {
                incoming,
                io_timeout: self.transport.io_timeout,
            }) as Box<dyn Incoming>)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.endpoint
                .close(VarInt::from_u32(0), b"server shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        })
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"server stopped");
    }
}

struct QuicIncoming {
    incoming: quinn::Incoming,
    io_timeout: Duration,
}

impl Incoming for QuicIncoming {
    fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.incoming.refuse();
        Box::pin(async {})
    }

    fn shed(self: Box<Self>) {
        // One small close packet, smaller than the peer's padded Initial: no amplification.
        self.incoming.refuse();
    }

    fn address_validated(&self) -> bool {
        self.incoming.remote_address_validated()
    }

    fn retry(self: Box<Self>) {
        if self.incoming.may_retry()
            && let Err(e) = self.incoming.retry()
        {
            e.into_incoming().refuse();
        }
    }

    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>> {
        Box::pin(async move {
            let conn = self.incoming.await.map_err(|e| Refusal::new(refusal(&e)))?;
            if alpn(&conn).as_deref() != Some(crate::tls::ALPN) {
                conn.close(VarInt::from_u32(ErrorCode::Version as u32), b"ALPN");
                return Err(Refusal::new("peer did not negotiate our ALPN"));
            }
            Ok(Box::new(QuicHandshaken {
                chain: peer_chain(&conn),
                conn,
                io_timeout: self.io_timeout,
            }) as Box<dyn Handshaken>)
        })
    }
}

struct QuicHandshaken {
    conn: quinn::Connection,
    chain: Vec<CertificateDer<'static>>,
    io_timeout: Duration,
}

impl Handshaken for QuicHandshaken {
    fn proof(&self) -> PeerProof {
        PeerProof::chain(self.chain.clone())
    }

    fn refuse(self: Box<Self>) {
        self.conn
            .close(VarInt::from_u32(ErrorCode::Protocol as u32), b"identity");
    }

    fn busy(self: Box<Self>, timeout: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let conn = QuicConnection::server(self.conn, self.io_timeout.min(timeout));
            let answer = async {
                let (send, recv) = conn.conn.accept_bi().await.ok()?;
                let mut stream = conn.stream(send, recv);
                stream.source.recv().await.ok()??;
                let busy = ServerHello::busy();
                stream.sink.send(busy.kind, busy.payload).await.ok()?;
                stream.sink.finish_delivered().await;
                // Closing now could discard the answer before the client has read it; the
                // client closes once it has.
                conn.conn.closed().await;
                Some(())
            };
            let _ = tokio::time::timeout(timeout, answer).await;
            conn.conn
                .close(VarInt::from_u32(ErrorCode::Busy as u32), b"busy");
        })
    }

    fn hello(
        self: Box<Self>,
        hello: ServerHello,
        timeout: Duration,
    ) -> BoxFuture<'static, Option<Arc<dyn Connection>>> {
        Box::pin(async move {
            let conn = QuicConnection::server(self.conn, self.io_timeout);
            // The client's first stream carries Hello.
            let first = tokio::time::timeout(timeout, conn.conn.accept_bi()).await;
            let Ok(Ok((send, recv))) = first else {
                tracing::debug!("no hello; closing");
                conn.conn
                    .close(VarInt::from_u32(ErrorCode::Protocol as u32), b"no hello");
                return None;
            };
            let mut stream = conn.stream(send, recv);
            let accepted = match stream.source.recv().await {
                Ok(Some(frame)) => {
                    let answer = hello.answer(&frame);
                    send_answer(&mut stream.sink, answer.frame()).await && answer.is_accepted()
                }
                _ => false,
            };
            if !accepted {
                conn.conn
                    .close(VarInt::from_u32(ErrorCode::Version as u32), b"hello");
                return None;
            }
            Some(Arc::new(conn) as Arc<dyn Connection>)
        })
    }
}

/// Sends the answer to a hello and ends the stream; whether it went out.
async fn send_answer(sink: &mut FrameSink, frame: Option<&Frame>) -> bool {
    let Some(frame) = frame else { return false };
    if sink.send(frame.kind, frame.payload.clone()).await.is_err() {
        return false;
    }
    sink.finish();
    true
}

/// An established QUIC connection; each request is a bidirectional stream of its own.
#[derive(Debug)]
struct QuicConnection {
    conn: quinn::Connection,
    timeout: Duration,
    /// Client: set once the server said `GoAway` (on the one stream it may open).
    going_away: Arc<AtomicBool>,
    /// Client: dropped with the connection, which ends the task listening for `GoAway` (it
    /// holds a handle of the connection, which would otherwise keep it open).
    _listening: Option<oneshot::Sender<()>>,
}

impl QuicConnection {
    /// The server's end.
    fn server(conn: quinn::Connection, timeout: Duration) -> Self {
        Self {
            conn,
            timeout,
            going_away: Arc::default(),
            _listening: None,
        }
    }

    /// The client's end, listening for the server's `GoAway`.
    fn client(conn: quinn::Connection, timeout: Duration) -> Self {
        let going_away = Arc::new(AtomicBool::new(false));
        let (listening, dropped) = oneshot::channel();
        tokio::spawn(hear_go_away(conn.clone(), going_away.clone(), dropped));
        Self {
            conn,
            timeout,
            going_away,
            _listening: Some(listening),
        }
    }

    fn stream(&self, send: quinn::SendStream, recv: quinn::RecvStream) -> RequestStream {
        RequestStream {
            sink: FrameSink::new(Box::new(QuicSend(send)), self.timeout),
            source: FrameSource::new(Box::new(QuicRecv(recv)), self.timeout),
        }
    }
}

impl Connection for QuicConnection {
    fn open(&self, request: Bytes) -> BoxFuture<'_, Result<RequestStream, StreamError>> {
        Box::pin(async move {
            if self.going_away.load(Ordering::Relaxed) {
                return Err(StreamError::ConnectionLost(LostConnection::new(
                    LostKind::GoingAway,
                )));
            }
            let (send, recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| StreamError::ConnectionLost(lost(&e)))?;
            let mut s = self.stream(send, recv);
            s.sink.send(FrameKind::Request, request).await?;
            Ok(s)
        })
    }

    fn accept(&self) -> BoxFuture<'_, Option<IncomingStream>> {
        Box::pin(async move {
            let (send, recv) = self.conn.accept_bi().await.ok()?;
            Some(IncomingStream {
                first: None,
                stream: self.stream(send, recv),
            })
        })
    }

    fn close(&self, reason: Close) {
        let code = match reason {
            Close::Done | Close::Shutdown => VarInt::from_u32(0),
            Close::Credentials(end) => VarInt::from_u32(end.close_code()),
            Close::MaxAge => VarInt::from_u32(CLOSE_MAX_AGE),
        };
        let words: &[u8] = match reason {
            Close::Done => b"done",
            other => other.reason().as_bytes(),
        };
        self.conn.close(code, words);
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    fn closed_for_credentials(&self) -> Option<CredentialsEnd> {
        self.close_code().and_then(CredentialsEnd::from_close_code)
    }

    fn go_away(&self) {
        let (conn, timeout) = (self.conn.clone(), self.timeout);
        // The stream waits for the client's leave to open it (older clients give none);
        // either way the task ends with the connection.
        tokio::spawn(async move {
            let say = async {
                let send = conn.open_uni().await.ok()?;
                let mut sink = FrameSink::new(Box::new(QuicSend(send)), timeout);
                sink.send(FrameKind::GoAway, Bytes::new()).await.ok()?;
                sink.finish();
                Some(())
            };
            tokio::select! {
                _ = say => {}
                _ = conn.closed() => {}
            }
        });
    }

    fn is_going_away(&self) -> bool {
        self.going_away.load(Ordering::Relaxed) || self.close_code() == Some(CLOSE_MAX_AGE)
    }

    fn export_keying_material(
        &self,
        out: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), NoKeyingMaterial> {
        self.conn
            .export_keying_material(out, label, context)
            .map_err(|_| NoKeyingMaterial)
    }

    fn local_ip(&self) -> Option<std::net::IpAddr> {
        Some(local_ip(&self.conn))
    }

    fn path_stats(&self) -> Option<QuicPathStats> {
        let stats = self.conn.stats();
        Some(QuicPathStats {
            mtu: stats.path.current_mtu,
            rtt: stats.path.rtt,
            sent_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            black_holes_detected: stats.path.black_holes_detected,
            received_datagrams: stats.udp_rx.datagrams,
            received_bytes: stats.udp_rx.bytes,
        })
    }
}

impl QuicConnection {
    /// The application close code the peer closed the connection with, if it did.
    fn close_code(&self) -> Option<u32> {
        match self.conn.close_reason()? {
            ConnectionError::ApplicationClosed(close) => {
                u32::try_from(close.error_code.into_inner()).ok()
            }
            _ => None,
        }
    }
}

/// Client: waits for the server's `GoAway` on the one unidirectional stream it may open,
/// and notes it in `going_away`; ends once the connection does or `dropped` fires.
async fn hear_go_away(
    conn: quinn::Connection,
    going_away: Arc<AtomicBool>,
    dropped: oneshot::Receiver<()>,
) {
    let hear = async {
        let mut recv = conn.accept_uni().await.ok()?;
        let frame = quic_recv(&mut recv).await.ok()??;
        (frame.kind == FrameKind::GoAway).then_some(())
    };
    tokio::select! {
        heard = hear => {
            if heard.is_some() {
                tracing::debug!("server is retiring the connection");
                going_away.store(true, Ordering::Relaxed);
            }
        }
        _ = dropped => {}
    }
}

impl Drop for QuicConnection {
    fn drop(&mut self) {
        let stats = self.conn.stats();
        tracing::debug!(
            mtu = stats.path.current_mtu,
            sent_packets = stats.path.sent_packets,
            lost_packets = stats.path.lost_packets,
            black_holes = stats.path.black_holes_detected,
            congestion_events = stats.path.congestion_events,
            rtt_us = stats.path.rtt.as_micros() as u64,
            "QUIC connection ended"
        );
    }
}

#[derive(Debug)]
struct QuicSend(quinn::SendStream);

impl SendFrames for QuicSend {
    fn send(&mut self, kind: FrameKind, payload: Bytes) -> BoxFuture<'_, Result<(), StreamError>> {
        Box::pin(async move {
            let header = FrameHeader {
                len: payload_len(&payload)?,
                kind,
                stream: 0,
            }
            .encode()?;
            let mut parts = [Bytes::copy_from_slice(&header), payload];
            self.0
                .write_all_chunks(&mut parts)
                .await
                .map_err(write_error)
        })
    }

    fn finish(&mut self) {
        // Finishing a stream the peer already reset is not our problem.
        let _ = self.0.finish();
    }

    fn finish_delivered(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.0.finish().is_ok() {
                let _ = self.0.stopped().await;
            }
        })
    }
}

#[derive(Debug)]
struct QuicRecv(quinn::RecvStream);

impl RecvFrames for QuicRecv {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>, StreamError>> {
        Box::pin(quic_recv(&mut self.0))
    }

    fn recv_into<'a>(
        &'a mut self,
        dest: &'a mut [u8],
    ) -> BoxFuture<'a, Result<Option<Received>, StreamError>> {
        Box::pin(quic_recv_into(&mut self.0, dest))
    }
}

/// As [`quic_recv`], reading a `Data` payload that fits straight from quinn's receive
/// buffer into `dest`.
async fn quic_recv_into(
    r: &mut quinn::RecvStream,
    dest: &mut [u8],
) -> Result<Option<Received>, StreamError> {
    let Some(h) = quic_header(r).await? else {
        return Ok(None);
    };
    let len = h.len as usize;
    if h.kind != FrameKind::Data || len > dest.len() {
        return Ok(Some(Received::Frame(quic_payload(r, h).await?)));
    }
    let mut got = 0;
    while got < len {
        match r.read(&mut dest[got..len]).await.map_err(read_error)? {
            Some(n) => got += n,
            None => return Err(FrameError::Incomplete.into()),
        }
    }
    Ok(Some(Received::Data(len)))
}

async fn quic_recv(r: &mut quinn::RecvStream) -> Result<Option<Frame>, StreamError> {
    match quic_header(r).await? {
        Some(h) => Ok(Some(quic_payload(r, h).await?)),
        None => Ok(None),
    }
}

/// A frame's header; `None` when the stream ended cleanly before it.
async fn quic_header(r: &mut quinn::RecvStream) -> Result<Option<FrameHeader>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]).await.map_err(read_error)? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Incomplete.into()),
        }
    }
    Ok(Some(FrameHeader::decode(&header)?))
}

/// The payload of the frame `h` heads.
async fn quic_payload(r: &mut quinn::RecvStream, h: FrameHeader) -> Result<Frame, StreamError> {
    let len = h.len as usize;
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        match r
            .read_chunk(len - payload.len(), true)
            .await
            .map_err(read_error)?
        {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Incomplete.into()),
        }
    }
    Ok(Frame::new(h.kind, h.stream, payload.freeze()))
}

fn payload_len(payload: &Bytes) -> Result<u32, StreamError> {
    u32::try_from(payload.len()).map_err(|_| {
        StreamError::Frame(FrameError::TooLarge {
            len: u32::MAX,
            max: crate::proto::frame::MAX_FRAME_PAYLOAD,
        })
    })
}

/// The client's hello on the connection's first stream.
async fn client_hello(
    conn: &quinn::Connection,
    timeout: Duration,
) -> Result<crate::proto::HelloAck, ConnectError> {
    let stream = |e| ConnectError::Lost(LostReason::Stream(e));
    let (send, recv) = conn.open_bi().await.map_err(|e| {
        ConnectError::Lost(LostReason::Connection(LostConnection::with_detail(
            LostKind::Quic(quic_close(&e)),
            e.to_string(),
        )))
    })?;
    let mut sink = FrameSink::new(Box::new(QuicSend(send)), timeout);
    let mut source = FrameSource::new(Box::new(QuicRecv(recv)), timeout);
    let hello = hello_frame();
    sink.send(hello.kind, hello.payload).await.map_err(stream)?;
    sink.finish();
    let frame = source
        .recv()
        .await
        .map_err(stream)?
        .ok_or(ConnectError::Lost(LostReason::HelloStream))?;
    handle_answer(&frame).map_err(ConnectError::from)
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
}

fn peer_chain(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default()
}

fn connect_error(e: &ConnectionError, failure: &FailureSlot) -> ConnectError {
    if let Some(svid) = take_failure(failure) {
        return ConnectError::ServerNotTrusted(svid);
    }
    if let ConnectionError::ConnectionClosed(c) = e
        && c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    {
        return ConnectError::Busy;
    }
    if let Some(alert) = alert_of(e) {
        return ConnectError::Rejected(Rejection::from_alert(rustls::AlertDescription::from(
            alert,
        )));
    }
    match e {
        ConnectionError::TimedOut => ConnectError::Lost(LostReason::HandshakeTimedOut),
        other => ConnectError::Tls(TlsFailure::Quic {
            close: quic_close(other),
            detail: other.to_string(),
        }),
    }
}

fn refusal(e: &ConnectionError) -> String {
    match e {
        ConnectionError::TransportError(t) => format!("TLS: {}", t.reason),
        other => describe(other),
    }
}

fn write_error(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(code) => StreamError::Reset(code.into_inner()),
        quinn::WriteError::ConnectionLost(c) => StreamError::ConnectionLost(lost(&c)),
        other => StreamError::ConnectionLost(LostConnection::with_detail(
            LostKind::Stream,
            other.to_string(),
        )),
    }
}

fn read_error(e: quinn::ReadError) -> StreamError {
    match e {
        quinn::ReadError::Reset(code) => StreamError::Reset(code.into_inner()),
        quinn::ReadError::ConnectionLost(c) => StreamError::ConnectionLost(lost(&c)),
        other => StreamError::ConnectionLost(LostConnection::with_detail(
            LostKind::Stream,
            other.to_string(),
        )),
    }
}

/// A lost connection: quinn's close as ours, with its words.
fn lost(c: &ConnectionError) -> LostConnection {
    LostConnection::with_detail(LostKind::Quic(quic_close(c)), describe(c))
}

/// quinn's account of a closed connection, as this crate's.
fn quic_close(c: &ConnectionError) -> QuicClose {
    match c {
        ConnectionError::VersionMismatch => QuicClose::VersionMismatch,
        ConnectionError::TransportError(t) => QuicClose::TransportError(u64::from(t.code)),
        ConnectionError::ConnectionClosed(close) => {
            QuicClose::ConnectionClosed(u64::from(close.error_code))
        }
        ConnectionError::ApplicationClosed(close) => {
            QuicClose::ApplicationClosed(close.error_code.into_inner())
        }
        ConnectionError::Reset => QuicClose::Reset,
        ConnectionError::TimedOut => QuicClose::TimedOut,
        ConnectionError::LocallyClosed => QuicClose::LocallyClosed,
        ConnectionError::CidsExhausted => QuicClose::CidsExhausted,
    }
}

/// A human-readable reason, naming the TLS alert if the peer closed with one.
fn describe(c: &ConnectionError) -> String {
    match alert_of(c) {
        Some(alert) => format!(
            "peer refused the TLS handshake: {:?}",
            rustls::AlertDescription::from(alert)
        ),
        None => c.to_string(),
    }
}

/// The TLS alert a peer closed the connection with, if any (QUIC carries alerts as
/// CRYPTO_ERROR codes 0x100 + alert).
fn alert_of(c: &ConnectionError) -> Option<u8> {
    quic_close(c).alert()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use certs::test_util::TestPki;

    use super::*;
    use crate::clock::SystemClock;
    use crate::proto::seal::{
        Direction, HEADER_LEN, KeyLimits, OpenError, Placement, SessionKeys, sealed_len,
    };
    use crate::test_util::identity;
    use crate::tls;

    /// A mutually authenticated QUIC connection on loopback: (client side, server side),
    /// and the endpoints that keep it alive.
    async fn pair(pki: &TestPki) -> (quinn::Connection, quinn::Connection, Endpoint, Endpoint) {
        pair_with(pki, TransportConfig::default()).await
    }

    async fn pair_with(
        pki: &TestPki,
        cfg: TransportConfig,
    ) -> (quinn::Connection, quinn::Connection, Endpoint, Endpoint) {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let server_tls =
            tls::server_config(&identity(pki, "/node/storage"), clock.clone()).unwrap();
        let server = server_endpoint("127.0.0.1:0".parse().unwrap(), server_tls, &cfg).unwrap();
        let addr = server.local_addr().unwrap();
        let client_tls = tls::client_config(
            &identity(pki, "/gpu/loader"),
            None,
            Default::default(),
            clock,
        )
        .unwrap();
        let client = client_endpoint(addr, &cfg).unwrap();
        let connecting = client
            .connect_with(
                client_config(client_tls, &cfg).unwrap(),
                addr,
                tls::SERVER_NAME,
            )
            .unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        (c.unwrap(), s.unwrap(), client, server)
    }

    /// A server retiring a connection says `GoAway` on the one stream it may open: the
    /// client opens no further requests there though the connection is still up. A client
    /// that did not hear it learns the same from the close code of the retirement.
    #[tokio::test]
    async fn the_servers_go_away_reaches_the_client_and_so_does_a_retiring_close() {
        let pki = TestPki::new("hospital.example");
        let t = Duration::from_secs(10);
        let (c, s, _ce, _se) = pair(&pki).await;
        let (client, server) = (QuicConnection::client(c, t), QuicConnection::server(s, t));
        assert!(!client.is_going_away());
        server.go_away();
        let heard = tokio::time::timeout(t, async {
            while !client.is_going_away() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(heard.is_ok(), "GoAway never reached the client");
        assert!(!client.is_closed(), "GoAway closed the connection");
        match client.open(Bytes::from_static(b"request")).await {
            Err(StreamError::ConnectionLost(lost)) => {
                assert!(matches!(lost.kind, LostKind::GoingAway), "{lost}");
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a stream opened after GoAway"),
        }

        // A client end that cannot hear GoAway (built as a server's) reads the close code.
        let (c, s, _ce2, _se2) = pair(&pki).await;
        let (deaf, server) = (QuicConnection::server(c, t), QuicConnection::server(s, t));
        server.close(Close::MaxAge);
        let closed = tokio::time::timeout(t, async {
            while !deaf.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the close never reached the client");
        assert!(deaf.is_going_away());
        assert_eq!(deaf.closed_for_credentials(), None);
    }

    /// With a jumbo ceiling on both sides, path-MTU discovery reaches it (loopback carries
    /// 65 535-byte frames): each side accepts datagrams that large, so the peer probes that far.
    /// With quinn's default acceptance (1472) both stop at 1472.
    #[tokio::test]
    async fn path_mtu_discovery_reaches_a_jumbo_ceiling() {
        let pki = TestPki::new("hospital.example");
        let mut cfg = TransportConfig::default();
        cfg.mtu(1200, 8972).unwrap();
        let (client, server, _ce, _se) = pair_with(&pki, cfg).await;
        let reached = tokio::time::timeout(Duration::from_secs(20), async {
            while client.stats().path.current_mtu != 8972 || server.stats().path.current_mtu != 8972
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "MTU stayed at client {} / server {}",
            client.stats().path.current_mtu,
            server.stats().path.current_mtu
        );
    }

    /// A batch of jumbo datagrams as large as the cap allows crosses loopback whole; one of
    /// quinn's own size (10) is refused by the kernel and lost, which is what the cap is for.
    #[tokio::test]
    async fn batched_jumbo_datagrams_are_capped_to_what_the_kernel_sends() {
        const MTU: u16 = 8972;
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let dest = rx.local_addr().unwrap();
        let tx = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(tx).unwrap();
        if inner.max_transmit_segments() < 10 {
            eprintln!("no UDP segmentation offload here; nothing to cap");
            return;
        }
        let socket = Arc::new(CappedBatches {
            inner,
            max_segments: max_batch_segments(MTU),
        });
        let capped = socket.max_transmit_segments();
        assert_eq!(capped, 7);
        let mut poller = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();

        // Count what arrives of one batch of `n` datagrams.
        let arrived = |n: usize| {
            let contents = vec![0x5a; n * usize::from(MTU)];
            socket
                .try_send(&quinn::udp::Transmit {
                    destination: dest,
                    ecn: None,
                    contents: &contents,
                    segment_size: Some(usize::from(MTU)),
                    src_ip: None,
                })
                .unwrap();
            let mut buf = vec![0u8; 65_536];
            let mut got = 0;
            while let Ok(len) = rx.recv(&mut buf) {
                assert_eq!(len, usize::from(MTU));
                got += 1;
                if got == n {
                    break;
                }
            }
            got
        };
        assert_eq!(
            arrived(capped),
            capped,
            "a capped batch did not arrive whole"
        );
        assert_eq!(arrived(10), 0, "the kernel sent a batch over 64 KiB");
        // Ordinary datagrams keep quinn's own batch size.
        assert_eq!(max_batch_segments(1452).min(10), 10);
    }

    fn place(chunk: u32, len: u32) -> Placement {
        Placement {
            transfer: 7,
            chunk,
            offset: u64::from(chunk) << 22,
            len,
        }
    }

    /// Seals `data` under `keys` and opens it under `other`.
    fn crosses(keys: &SessionKeys, other: &SessionKeys, data: &[u8]) -> Result<Vec<u8>, OpenError> {
        let len = u32::try_from(data.len()).unwrap();
        let mut sealer = keys.sealer(Direction::ServerToClient, KeyLimits::default());
        let mut buf = vec![0u8; sealed_len(data.len())];
        buf[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
        sealer.seal(place(3, len), &mut buf).unwrap();
        let mut opener = other.opener(Direction::ServerToClient);
        opener.open(place(3, len), &mut buf).map(<[u8]>::to_vec)
    }

    /// The RDMA keys `conn` exports for `session`, through the transport seam.
    fn rdma_keys(
        conn: &quinn::Connection,
        session: [u8; 16],
    ) -> Result<SessionKeys, NoKeyingMaterial> {
        let conn = QuicConnection::server(conn.clone(), Duration::from_secs(10));
        crate::transport::rdma_keys(&conn, session)
    }

    /// The two ends of one real connection export the same RDMA keys; another session on
    /// that connection, and the same session ID on another connection, get different ones.
    #[tokio::test]
    async fn both_ends_of_a_connection_export_the_same_keys_and_nothing_else_does() {
        let pki = TestPki::new("hospital.example");
        let (client, server, _ce, _se) = pair(&pki).await;
        let session = [0x5a; 16];
        let at_client = rdma_keys(&client, session).unwrap();
        let at_server = rdma_keys(&server, session).unwrap();
        let data = b"chunk of a scan".to_vec();
        assert_eq!(crosses(&at_server, &at_client, &data).unwrap(), data);

        let other_session = rdma_keys(&client, [0xa5; 16]).unwrap();
        assert_eq!(
            crosses(&at_server, &other_session, &data),
            Err(OpenError::Tampered)
        );

        let (client2, server2, _ce2, _se2) = pair(&pki).await;
        let same_id_other_connection = rdma_keys(&client2, session).unwrap();
        assert_eq!(
            crosses(&at_server, &same_id_other_connection, &data),
            Err(OpenError::Tampered)
        );
        let at_server2 = rdma_keys(&server2, session).unwrap();
        assert_eq!(
            crosses(&at_server2, &same_id_other_connection, &data).unwrap(),
            data
        );
    }
}
