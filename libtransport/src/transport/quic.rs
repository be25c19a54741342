//! QUIC endpoints (quinn) with our TLS configs, tuned for bulk transfer, and the mapping of
//! quinn's errors to ours.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use super::StreamError;
use crate::config::TransportConfig;

/// A server endpoint on `addr` speaking our TLS config.
pub(crate) fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &TransportConfig,
) -> io::Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(transport_config(cfg, true)?));
    let socket = bind_udp(addr, cfg.socket_buffer_bytes)?;
    Endpoint::new(
        EndpointConfig::default(),
        Some(sc),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A client endpoint on an ephemeral port of the right address family.
pub(crate) fn client_endpoint(peer: SocketAddr, cfg: &TransportConfig) -> io::Result<Endpoint> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = bind_udp(bind, cfg.socket_buffer_bytes)?;
    Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The quinn client config for one connection attempt.
pub(crate) fn client_config(
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
    // Only clients open streams; each carries one request.
    t.max_concurrent_bidi_streams(VarInt::from_u32(if server { cfg.max_streams } else { 0 }));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
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
pub(crate) fn local_ip(conn: &quinn::Connection) -> std::net::IpAddr {
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

/// The RDMA session keys of `conn` for `session`, from the TLS keying-material exporter:
/// both ends of the connection get the same keys, and no secret crosses the wire.
pub(crate) fn rdma_keys(
    conn: &quinn::Connection,
    session: [u8; 16],
) -> Result<crate::proto::seal::SessionKeys, String> {
    use crate::proto::seal::{EXPORTER_BYTES, EXPORTER_LABEL, SessionKeys, exporter_context};
    let mut out = zeroize::Zeroizing::new([0u8; EXPORTER_BYTES]);
    conn.export_keying_material(&mut out[..], EXPORTER_LABEL, &exporter_context(&session))
        .map_err(|_| "the TLS session cannot export keying material".to_owned())?;
    Ok(SessionKeys::derive(session, &out))
}

pub(crate) fn write_error(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(code) => StreamError::Reset(code.into_inner()),
        quinn::WriteError::ConnectionLost(c) => StreamError::ConnectionLost(describe(&c)),
        other => StreamError::ConnectionLost(other.to_string()),
    }
}

pub(crate) fn read_error(e: quinn::ReadError) -> StreamError {
    match e {
        quinn::ReadError::Reset(code) => StreamError::Reset(code.into_inner()),
        quinn::ReadError::ConnectionLost(c) => StreamError::ConnectionLost(describe(&c)),
        other => StreamError::ConnectionLost(other.to_string()),
    }
}

/// A human-readable reason, naming the TLS alert if the peer closed with one.
pub(crate) fn describe(c: &ConnectionError) -> String {
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
pub(crate) fn alert_of(c: &ConnectionError) -> Option<u8> {
    let code = match c {
        ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        _ => return None,
    };
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| (code - 0x100) as u8)
}
