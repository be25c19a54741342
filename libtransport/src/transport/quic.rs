//! QUIC endpoints (quinn) with our TLS configs, tuned for bulk transfer, and the mapping of
//! quinn's errors to ours.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    AsyncUdpSocket, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    Runtime, UdpPoller, VarInt,
};
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
    endpoint(socket, Some(sc), cfg)
}

/// A client endpoint on an ephemeral port of the right address family.
pub(crate) fn client_endpoint(peer: SocketAddr, cfg: &TransportConfig) -> io::Result<Endpoint> {
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
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(SystemClock);
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

    /// With a jumbo ceiling on both sides, path-MTU discovery reaches it (loopback carries
    /// 65 535-byte frames): each side accepts datagrams that large, so the peer probes that far.
    /// With quinn's default acceptance (1472) both stop at 1472.
    #[tokio::test]
    async fn path_mtu_discovery_reaches_a_jumbo_ceiling() {
        let pki = TestPki::new("hospital.example");
        let mut cfg = TransportConfig::default();
        cfg.mtu(1200, 8972).unwrap();
        let (client, server, _ce, _se) = pair_with(&pki, cfg).await;
        let reached = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while client.stats().path.current_mtu != 8972 || server.stats().path.current_mtu != 8972
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
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
