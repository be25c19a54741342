//! The plaintext baseline: the product's protocol, store and client code over a bare TCP
//! socket, as a plug-in transport of libtransport's ([`Connector`], [`Listener`]).
//!
//! It exists only here, so that the benchmark's ratio isolates what encryption and
//! authentication cost; libtransport has no switch that turns TLS off. Nothing here
//! authenticates anyone: each side takes the other to be a given identity
//! ([`PeerProof::dangerous_assumed`]). The streams are multiplexed exactly as over TLS/TCP
//! (libtransport's `transport::mux`), read through a larger buffer since nothing below
//! buffers for us.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::SpiffeId;
use libtransport::error::{ConnectError, LostReason};
use libtransport::proto::connection::{ServerHello, handle_answer};
use libtransport::transport::{
    BoxFuture, Connection, Connector, Established, Handshaken, Incoming, Listener, Path, PeerProof,
    Refusal, mux, tcp,
};
use tokio::net::{TcpListener, TcpStream};

/// Connects over bare TCP, taking the server to be `server`.
#[derive(Debug)]
pub struct PlaintextConnector {
    server: SpiffeId,
}

impl PlaintextConnector {
    /// A connector that takes whatever answers to be `server`.
    pub fn dangerous_new(server: SpiffeId) -> Self {
        Self { server }
    }
}

impl Connector for PlaintextConnector {
    fn path(&self) -> Path {
        Path::Tcp
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, Result<Established, ConnectError>> {
        Box::pin(async move {
            let mut socket = tcp::connect(addr, HANDSHAKE_TIMEOUT)
                .await
                .map_err(|source| ConnectError::Unreachable { addr, source })?;
            let answer = mux::hello(&mut socket)
                .await
                .map_err(|e| ConnectError::Lost(LostReason::Io(e)))?
                .ok_or(ConnectError::Lost(LostReason::ServerClosed))?;
            let ack = handle_answer(&answer)?;
            let connection = mux::start_client(socket, &ack, IO_TIMEOUT, mux::PLAIN_READ_BUFFER);
            Ok(Established {
                connection,
                proof: PeerProof::dangerous_assumed(self.server.clone()),
                ack,
            })
        })
    }
}

/// Accepts bare TCP connections, taking every peer to be `client`.
#[derive(Debug)]
pub struct PlaintextListener {
    listener: TcpListener,
    client: SpiffeId,
}

impl PlaintextListener {
    /// Serves `listener`, taking every peer to be `client`.
    pub fn dangerous_new(listener: TcpListener, client: SpiffeId) -> Self {
        Self { listener, client }
    }
}

impl Listener for PlaintextListener {
    fn path(&self) -> Path {
        Path::Tcp
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>> {
        Box::pin(async {
            let (socket, addr) = self.listener.accept().await.ok()?;
            tcp::tune(&socket);
            Some(Box::new(Plain {
                socket,
                addr,
                client: self.client.clone(),
            }) as Box<dyn Incoming>)
        })
    }
}

/// One plaintext connection: no handshake, so it is "handshaken" at once.
struct Plain {
    socket: TcpStream,
    addr: SocketAddr,
    client: SpiffeId,
}

impl Incoming for Plain {
    fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>> {
        Box::pin(async move { Ok(self as Box<dyn Handshaken>) })
    }
}

impl Handshaken for Plain {
    fn proof(&self) -> PeerProof {
        PeerProof::dangerous_assumed(self.client.clone())
    }

    fn refuse(self: Box<Self>) {}

    fn hello(
        self: Box<Self>,
        hello: ServerHello,
        timeout: Duration,
    ) -> BoxFuture<'static, Option<Arc<dyn Connection>>> {
        Box::pin(mux::serve(
            self.socket,
            hello,
            timeout,
            IO_TIMEOUT,
            mux::PLAIN_READ_BUFFER,
        ))
    }
}

/// Connect timeout: the library's default handshake timeout (the bench does not change it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Stream timeout: the library's default I/O timeout (the bench does not change it).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
