//! TCP sockets for the TLS/TCP path: listener and connector with our socket options.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};

/// Listens on `addr`.
pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `addr` within `timeout`.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    tune(&stream);
    Ok(stream)
}

/// Options for every data connection: no Nagle delay (we write whole frames), keep-alive
/// so a vanished peer is noticed.
pub(crate) fn tune(stream: &TcpStream) {
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
pub(crate) type BufferedStream = BufReader<TcpStream>;

/// Wraps `stream` for TLS to run over.
pub(crate) fn buffered(stream: TcpStream) -> BufferedStream {
    BufReader::with_capacity(SOCKET_READ_BUFFER, stream)
}

/// Bytes read from the socket per system call under TLS.
pub(crate) const SOCKET_READ_BUFFER: usize = 256 << 10;
