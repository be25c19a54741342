//! The plaintext baseline for `transport-bench`, compiled only with the `bench-plaintext`
//! feature. It runs the very same protocol, store and client code as the TLS/TCP path over
//! a bare TCP socket, so the benchmark's ratio isolates what encryption and authentication
//! cost. Nothing here authenticates anyone: each side asserts the other's identity.
//! Products must never enable this feature; `transportd` does not.

use std::net::SocketAddr;

use certs::SpiffeId;
use tokio::net::TcpListener;

use crate::config::{ClientConfig, ServerConfig};
use crate::error::ConnectError;
use crate::identity::Peer;
use crate::transport::{Path, tcp};

/// Serves `listener` in plaintext, treating every peer as `assumed_peer`. Runs until the
/// listener fails or the task is dropped.
pub async fn dangerous_serve_plaintext(
    config: ServerConfig,
    listener: TcpListener,
    assumed_peer: SpiffeId,
) {
    let shared = crate::server::shared_for_bench(config);
    loop {
        let Ok((socket, addr)) = listener.accept().await else {
            return;
        };
        tcp::tune(&socket);
        let peer = Peer {
            id: assumed_peer.clone(),
            serial: "plaintext".into(),
            not_after: std::time::SystemTime::UNIX_EPOCH,
            addr,
            path: Path::Tcp,
        };
        tokio::spawn(crate::server::serve_stream(
            shared.clone(),
            socket,
            peer,
            crate::transport::mux::PLAIN_READ_BUFFER,
        ));
    }
}

/// Connects in plaintext, treating the server as `assumed_server`.
pub async fn dangerous_connect_plaintext(
    config: ClientConfig,
    addr: SocketAddr,
    assumed_server: SpiffeId,
) -> Result<crate::Client, ConnectError> {
    crate::client::connect_plaintext(config, addr, assumed_server).await
}
