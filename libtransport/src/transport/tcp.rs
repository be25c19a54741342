//! The TLS/TCP transport (tokio-rustls): TCP sockets with our options, TLS 1.3 over them,
//! and the multiplexer of `mux.rs` inside the TLS session; the [`Connector`] and
//! [`Listener`] the drivers use. The only file of the crate that names tokio-rustls.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    BoxFuture, Connection, Connector, Established, Handshaken, Incoming, Listener, Path, PeerProof,
    Refusal, mux,
};
use crate::clock::Clock;
use crate::config::TransportConfig;
use crate::error::{ConnectError, LocalFailure, LostReason, Rejection, TlsFailure};
use crate::identity::{FailureSlot, IdentityHandle, take_failure};
use crate::proto::connection::{ServerHello, handle_answer};

/// Connects with TLS 1.3 over TCP, presenting the newest SVID of an identity at each
/// handshake.
#[derive(Debug)]
pub struct TlsTcpConnector {
    identity: IdentityHandle,
    server_id: Option<certs::SpiffeId>,
    clock: Arc<dyn Clock>,
    transport: Arc<TransportConfig>,
}

impl TlsTcpConnector {
    /// A connector expecting the server to be `server_id` if given.
    pub(crate) fn new(
        identity: IdentityHandle,
        server_id: Option<certs::SpiffeId>,
        clock: Arc<dyn Clock>,
        transport: Arc<TransportConfig>,
    ) -> Self {
        Self {
            identity,
            server_id,
            clock,
            transport,
        }
    }

    async fn establish(&self, addr: SocketAddr) -> Result<Established, ConnectError> {
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
        let socket = connect(addr, timeout)
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::TimedOut => ConnectError::Timeout { addr, timeout },
                _ => ConnectError::Unreachable { addr, source },
            })?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let name = ServerName::try_from(crate::tls::SERVER_NAME)
            .map_err(|e| ConnectError::Local(LocalFailure::ServerName(e)))?;
        let mut stream =
            match tokio::time::timeout(timeout, connector.connect(name, buffered(socket))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(connect_error(e, &failure)),
                Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
            };
        let (_, session) = stream.get_ref();
        if session.alpn_protocol() != Some(crate::tls::ALPN) {
            return Err(ConnectError::Tls(TlsFailure::Alpn));
        }
        let chain = peer_chain(session);
        stream
            .get_mut()
            .1
            .set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
        let answer = match tokio::time::timeout(timeout, mux::hello(&mut stream)).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Err(ConnectError::Lost(LostReason::ServerClosed)),
            Ok(Err(e)) => return Err(connect_error(e, &failure)),
            Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
        };
        let ack = handle_answer(&answer)?;
        let connection = mux::start_client(stream, &ack, t.io_timeout, mux::TLS_READ_BUFFER);
        Ok(Established {
            connection,
            proof: PeerProof::chain(chain),
            ack,
        })
    }
}

impl Connector for TlsTcpConnector {
    fn path(&self) -> Path {
        Path::Tcp
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, Result<Established, ConnectError>> {
        Box::pin(self.establish(addr))
    }
}

/// Accepts TLS/TCP connections.
#[derive(Debug)]
pub struct TlsTcpListener {
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    transport: Arc<TransportConfig>,
    /// Connections past the limit that are still told they are busy.
    overflow: Arc<Semaphore>,
}

impl TlsTcpListener {
    /// Binds `addr`, serving `tls`.
    pub(crate) fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        transport: Arc<TransportConfig>,
    ) -> io::Result<Self> {
        Ok(Self {
            listener: listen(addr)?,
            tls,
            transport,
            overflow: Arc::new(Semaphore::new(MAX_BUSY_ANSWERS)),
        })
    }
}

impl Listener for TlsTcpListener {
    fn path(&self) -> Path {
        Path::Tcp
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>> {
        Box::pin(async {
            loop {
                match self.listener.accept().await {
                    Ok((socket, addr)) => {
                        tune(&socket);
                        return Some(Box::new(TlsTcpIncoming {
                            socket,
                            addr,
                            tls: self.tls.clone(),
                            transport: self.transport.clone(),
                            overflow: self.overflow.clone(),
                        }) as Box<dyn Incoming>);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }
}

struct TlsTcpIncoming {
    socket: TcpStream,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    transport: Arc<TransportConfig>,
    overflow: Arc<Semaphore>,
}

impl Incoming for TlsTcpIncoming {
    fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()> {
        // Tell the client it is busy (after its handshake, so the answer is authenticated),
        // within a small budget of its own; past that, just close.
        match self.overflow.clone().try_acquire_owned() {
            Ok(spare) => Box::pin(refuse_busy(*self, spare)),
            Err(_) => Box::pin(async {}),
        }
    }

    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>> {
        Box::pin(async move {
            // The ClientHello first: a client that offers no ALPN at all would otherwise
            // complete the handshake (RFC 7301 lets a server ignore a missing extension), and
            // only learn from a closed connection that it spoke the wrong protocol. It gets
            // the alert a mismatched ALPN gets, no_application_protocol, before any key is
            // derived. (A client offering other protocols only gets it from rustls.)
            let mut lazy = tokio_rustls::LazyConfigAcceptor::new(
                rustls::server::Acceptor::default(),
                buffered(self.socket),
            );
            let start = (&mut lazy).await.map_err(|e| Refusal::new(refusal(&e)))?;
            if start.client_hello().alpn().is_none() {
                let mut io = start.io;
                let answer = async {
                    io.write_all(&NO_APPLICATION_PROTOCOL).await?;
                    io.flush().await?;
                    io.shutdown().await
                };
                let _ = answer.await;
                return Err(Refusal::new(
                    "peer offered no ALPN (answered no_application_protocol)",
                ));
            }
            let tls = start
                .into_stream(self.tls.clone())
                .await
                .map_err(|e| Refusal::new(refusal(&e)))?;
            let (_, session) = tls.get_ref();
            if session.alpn_protocol() != Some(crate::tls::ALPN) {
                return Err(Refusal::new("peer did not negotiate our ALPN"));
            }
            let chain = peer_chain(session);
            Ok(Box::new(TlsTcpHandshaken {
                tls,
                chain,
                transport: self.transport,
            }) as Box<dyn Handshaken>)
        })
    }

    fn shed(self: Box<Self>) {
        // A reset, not an orderly close: nothing of it lingers in the kernel either.
        let _ = SockRef::from(&self.socket).set_linger(Some(Duration::ZERO));
    }
}

struct TlsTcpHandshaken {
    tls: tokio_rustls::server::TlsStream<BufferedStream>,
    chain: Vec<CertificateDer<'static>>,
    transport: Arc<TransportConfig>,
}

impl Handshaken for TlsTcpHandshaken {
    fn proof(&self) -> PeerProof {
        PeerProof::chain(self.chain.clone())
    }

    fn refuse(self: Box<Self>) {}

    fn busy(self: Box<Self>, timeout: Duration) -> BoxFuture<'static, ()> {
        let mut tls = self.tls;
        Box::pin(async move {
            let answer = async {
                mux::read_frame(&mut tls).await.ok()??;
                mux::write_frame(&mut tls, &ServerHello::busy())
                    .await
                    .ok()?;
                tls.shutdown().await.ok()
            };
            let _ = tokio::time::timeout(timeout, answer).await;
        })
    }

    fn hello(
        mut self: Box<Self>,
        hello: ServerHello,
        timeout: Duration,
    ) -> BoxFuture<'static, Option<Arc<dyn Connection>>> {
        self.tls
            .get_mut()
            .1
            .set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
        let io_timeout = self.transport.io_timeout;
        Box::pin(mux::serve(
            self.tls,
            hello,
            timeout,
            io_timeout,
            mux::TLS_READ_BUFFER,
        ))
    }
}

/// Completes a TLS handshake only to answer the hello with `Busy`, then closes.
async fn refuse_busy(incoming: TlsTcpIncoming, _spare: OwnedSemaphorePermit) {
    let timeout = incoming.transport.handshake_timeout;
    let answer = async {
        let mut tls = tokio_rustls::TlsAcceptor::from(incoming.tls.clone())
            .accept(buffered(incoming.socket))
            .await
            .ok()?;
        mux::read_frame(&mut tls).await.ok()??;
        mux::write_frame(&mut tls, &ServerHello::busy())
            .await
            .ok()?;
        tls.shutdown().await.ok()
    };
    let _ = tokio::time::timeout(timeout, answer).await;
}

fn peer_chain(session: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

fn connect_error(e: io::Error, failure: &FailureSlot) -> ConnectError {
    if let Some(svid) = take_failure(failure) {
        return ConnectError::ServerNotTrusted(svid);
    }
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::AlertReceived(alert)) => {
            ConnectError::Rejected(Rejection::from_alert(*alert))
        }
        Some(other) => ConnectError::Tls(TlsFailure::Rustls(other.clone())),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                ConnectError::Lost(LostReason::Io(e))
            }
            _ => ConnectError::Tls(TlsFailure::Io(e)),
        },
    }
}

fn refusal(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("TLS: {tls}"),
        None => e.to_string(),
    }
}

/// A fatal `no_application_protocol` alert (RFC 7301, description 120) as a plaintext TLS
/// record: before the ServerHello nothing is encrypted yet, in TLS 1.3 as before it.
const NO_APPLICATION_PROTOCOL: [u8; 7] = [
    21, // ContentType alert
    3, 3, // legacy_record_version TLS 1.2, as TLS 1.3 records carry
    0, 2,   // length
    2,   // AlertLevel fatal
    120, // AlertDescription no_application_protocol
];

/// Connections past the limit answered with `Busy` at once; more are closed unanswered.
const MAX_BUSY_ANSWERS: usize = 64;

/// TLS plaintext rustls accepts per write before pushing records out; large enough that a
/// 1 MiB frame is encrypted and sent in one go.
const TLS_SEND_BUFFER_BYTES: usize = 4 << 20;

/// Listens on `addr` with our socket options.
pub fn listen(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Connects to `addr` within `timeout`, with our socket options.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    tune(&stream);
    Ok(stream)
}

/// Options for every data connection: no Nagle delay (we write whole frames), keep-alive
/// so a vanished peer is noticed.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// A TCP stream read through a buffer, for TLS to run over. rustls asks the socket for at
/// most a few KiB at a time (one record or less), so a bare socket costs a system call per
/// few KiB; through this buffer it costs one per [`SOCKET_READ_BUFFER`]. Writes pass
/// straight through (rustls already hands the socket large vectored writes).
type BufferedStream = BufReader<TcpStream>;

/// Wraps `stream` for TLS to run over.
fn buffered(stream: TcpStream) -> BufferedStream {
    BufReader::with_capacity(SOCKET_READ_BUFFER, stream)
}

/// Bytes read from the socket per system call under TLS.
const SOCKET_READ_BUFFER: usize = 256 << 10;
