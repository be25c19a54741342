//! The reference loops: what the libraries under the product move on this machine with
//! nothing of ours in the way. `bare-tcp` is a TCP copy loop, `bare-tls` the same over rustls
//! with the product's crypto provider (TLS 1.3, its suites), `bare-quic` one quinn
//! connection with the product's endpoint and transport settings. No protocol, no
//! verification, no store, no hashing.
//!
//! Each loop runs in this process on loopback, its server and its client each on a thread
//! of its own, so the CPU time of each end is measured apart (the thread's own clock); or,
//! where the product's modes cross a network (`client`, `lab`), against a server end in the
//! `server` process ([`serve_remote`]), whose CPU is that process's over the run. A
//! request is an 8-byte length; the server answers with that many bytes (a request of 0
//! ends the connection). The bulk transfer is one request of the object's size, read into
//! one reused 1 MiB buffer; then `requests` small requests of `--request-size` bytes (at
//! least one) time the round trip.

use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::outcome::{Destination, RunResult, Shape};
use crate::stats::{Latency, latency_histogram};

/// Bytes per write and per read of the copy loops.
const IO_BYTES: usize = 1 << 20;
/// The bytes rustls is handed per read of the socket: large, so it decrypts many records
/// per system call.
const TLS_READ_BYTES: usize = 1 << 20;
/// The name the loops' self-signed certificate is for.
const NAME: &str = "bare.transportd.internal";

/// Which library a loop measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare {
    /// A TCP copy loop.
    Tcp,
    /// rustls over TCP.
    Tls,
    /// One quinn connection, a stream per request.
    Quic,
}

impl Bare {
    /// The mode's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "bare-tcp",
            Self::Tls => "bare-tls",
            Self::Quic => "bare-quic",
        }
    }
}

/// What one end of a loop spent.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    cpu: Duration,
}

/// A reference loops' server in another process, perhaps on another host (`transport-bench
/// server --bare`): bare-tcp on `addr`'s TCP port, bare-tls on the next TCP port, bare-quic
/// on `addr`'s UDP port.
#[derive(Debug, Clone)]
pub struct RemoteBare {
    /// The loops' address.
    pub addr: SocketAddr,
    /// The self-signed certificate the server's TLS and QUIC loops present.
    pub cert: CertificateDer<'static>,
    /// The server's process id, when it runs on this machine (in a lab host's network
    /// namespace, say): its CPU time is the server end's. `None`: not measured.
    pub server_pid: Option<u32>,
}

/// Runs one loop: `size` bytes in one request, then the small requests of `shape`, against
/// a server end in this process on loopback, or the `remote` one. The QUIC loop takes the
/// product's transport settings `cfg` (path-MTU ceiling, windows), as the run's product
/// modes do.
pub async fn run(
    bare: Bare,
    size: u64,
    shape: Shape,
    cfg: &libtransport::TransportConfig,
    remote: Option<&RemoteBare>,
) -> anyhow::Result<RunResult> {
    let ask = Asks {
        size,
        requests: shape.requests,
        small: shape.request_bytes.max(1),
    };
    let cfg = cfg.clone();
    let remote = remote.cloned();
    tokio::task::spawn_blocking(move || match remote {
        None => local_loop(bare, ask, cfg),
        Some(r) => remote_loop(bare, ask, cfg, &r),
    })
    .await
    .context("the reference loop panicked")?
}

/// What a loop's client asks for: `size` bytes once, then `requests` of `small` bytes.
#[derive(Debug, Clone, Copy)]
struct Asks {
    size: u64,
    requests: u32,
    small: u64,
}

/// The client's measurements, before the server's CPU is known.
struct ClientSide {
    connect_us: u64,
    seconds: f64,
    latency: Histogram<u64>,
    spent: Spent,
}

fn result(bare: Bare, size: u64, client: ClientSide, server: Option<Spent>) -> RunResult {
    let gb = size as f64 / 1e9;
    let per_gb = |d: Duration| d.as_secs_f64() / gb;
    let server_cpu = server.map(|s| s.cpu);
    RunResult {
        mode: bare.name(),
        into: Destination::Memory,
        stripes: 1,
        bytes: size,
        seconds: client.seconds,
        gbps: size as f64 / client.seconds / 1e9,
        cpu_s_per_gb: per_gb(client.spent.cpu + server_cpu.unwrap_or_default()),
        client_cpu_s_per_gb: per_gb(client.spent.cpu),
        server_cpu_s_per_gb: server_cpu.map(per_gb),
        connect_us: client.connect_us,
        latency: Latency::of(&client.latency),
        quic_path: None,
    }
}

/// Both ends in this process on loopback, each on a thread of its own.
fn local_loop(
    bare: Bare,
    ask: Asks,
    cfg: libtransport::TransportConfig,
) -> anyhow::Result<RunResult> {
    let tls = TlsPair::new()?;
    let server_tls = tls.server.clone();
    let client_tls = tls.client;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_cfg = cfg.clone();
    let server = std::thread::spawn(move || -> anyhow::Result<Spent> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        match bare {
            Bare::Tcp | Bare::Tls => {
                let listener = TcpListener::bind(loopback)?;
                addr_tx.send(listener.local_addr()?)?;
                let (socket, _) = listener.accept()?;
                let tls = (bare == Bare::Tls).then_some(server_tls);
                serve_stream(socket, tls)
            }
            Bare::Quic => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let endpoint = libtransport::transport::quic::reference_server_endpoint(
                        loopback,
                        (*server_tls).clone(),
                        &server_cfg,
                    )?;
                    addr_tx.send(endpoint.local_addr()?)?;
                    let incoming = endpoint.accept().await.context("no connection")?;
                    let spent = serve_quic(incoming.await?).await;
                    endpoint.wait_idle().await;
                    spent
                })
            }
        }
    });
    let client = (|| {
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the server did not start")?;
        match bare {
            Bare::Tcp => pull_stream(addr, None, ask),
            Bare::Tls => pull_stream(addr, Some(client_tls), ask),
            Bare::Quic => pull_quic(addr, (*client_tls).clone(), &cfg, ask),
        }
    })();
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("{} server panicked", bare.name()))?;
    let client = client.with_context(|| format!("{}: client", bare.name()))?;
    let server = server.with_context(|| format!("{}: server", bare.name()))?;
    Ok(result(bare, ask.size, client, Some(server)))
}

/// The client here, the server end `remote`: its CPU is its process's over the run.
fn remote_loop(
    bare: Bare,
    ask: Asks,
    cfg: libtransport::TransportConfig,
    remote: &RemoteBare,
) -> anyhow::Result<RunResult> {
    let client_tls = TlsPair::client_trusting(remote.cert.clone())?;
    let server0 = remote.server_pid.and_then(crate::stats::process_cpu_time);
    let mut addr = remote.addr;
    let client = match bare {
        Bare::Tcp => pull_stream(addr, None, ask),
        Bare::Tls => {
            addr.set_port(addr.port() + 1);
            pull_stream(addr, Some(client_tls), ask)
        }
        Bare::Quic => pull_quic(addr, (*client_tls).clone(), &cfg, ask),
    }
    .with_context(|| format!("{} against the server's loops at {addr}", bare.name()))?;
    let server1 = remote.server_pid.and_then(crate::stats::process_cpu_time);
    let server = match (server0, server1) {
        (Some(a), Some(b)) => Some(Spent {
            cpu: b.saturating_sub(a),
        }),
        _ => None,
    };
    Ok(result(bare, ask.size, client, server))
}

/// Serves the reference loops at `addr` (see [`RemoteBare`]) until the process ends, one
/// connection at a time per loop, each in a thread of its own; returns the certificate the
/// TLS and QUIC loops present.
pub fn serve_remote(
    addr: SocketAddr,
    cfg: &libtransport::TransportConfig,
) -> anyhow::Result<CertificateDer<'static>> {
    let tls = TlsPair::new()?;
    let tcp = TcpListener::bind(addr).with_context(|| format!("bare-tcp on {addr}"))?;
    let mut tls_addr = addr;
    tls_addr.set_port(addr.port() + 1);
    let tls_listener =
        TcpListener::bind(tls_addr).with_context(|| format!("bare-tls on {tls_addr}"))?;
    for (listener, config) in [(tcp, None), (tls_listener, Some(tls.server.clone()))] {
        std::thread::spawn(move || {
            for socket in listener.incoming().flatten() {
                if let Err(e) = serve_stream(socket, config.clone()) {
                    eprintln!("a reference loop's connection failed: {e:#}");
                }
            }
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let endpoint = {
        let _guard = rt.enter();
        libtransport::transport::quic::reference_server_endpoint(addr, (*tls.server).clone(), cfg)
            .with_context(|| format!("bare-quic on {addr}"))?
    };
    std::thread::spawn(move || {
        rt.block_on(async move {
            while let Some(incoming) = endpoint.accept().await {
                let served = async { serve_quic(incoming.await?).await }.await;
                if let Err(e) = served {
                    eprintln!("a reference loop's connection failed: {e:#}");
                }
            }
        });
    });
    Ok(tls.cert)
}

/// The server's side of a stream loop on `socket`, over TLS with `tls`: answers requests
/// until a request of 0 or the end; what its thread spent.
fn serve_stream(
    socket: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Spent> {
    socket.set_nodelay(true)?;
    let t0 = thread_cpu();
    match tls {
        Some(config) => {
            let conn = rustls::ServerConnection::new(config)?;
            let mut s = rustls::StreamOwned::new(conn, TlsSocket::new(socket));
            serve(&mut s)?;
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        None => serve(&mut &socket)?,
    }
    Ok(Spent {
        cpu: thread_cpu().saturating_sub(t0),
    })
}

/// The client's side of a stream loop to `addr`, over TLS with `tls`.
fn pull_stream(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    ask: Asks,
) -> anyhow::Result<ClientSide> {
    let t0 = thread_cpu();
    let started = Instant::now();
    let socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    let mut buf = vec![0u8; IO_BYTES];
    match tls {
        Some(config) => {
            let conn =
                rustls::ClientConnection::new(config, ServerName::try_from(NAME)?.to_owned())?;
            let mut s = rustls::StreamOwned::new(conn, TlsSocket::new(socket));
            // The handshake completes with the first request.
            pull(&mut s, started, ask, &mut buf, t0)
        }
        None => pull(&mut &socket, started, ask, &mut buf, t0),
    }
}

/// The client's side of a stream loop: the bulk request, then the small ones, then the end.
fn pull(
    s: &mut (impl Read + Write),
    started: Instant,
    ask: Asks,
    buf: &mut [u8],
    cpu0: Duration,
) -> anyhow::Result<ClientSide> {
    let t = Instant::now();
    request(s, ask.size, buf)?;
    let seconds = t.elapsed().as_secs_f64();
    let connect_us = t.saturating_duration_since(started).as_micros() as u64;
    let mut latency = latency_histogram()?;
    for _ in 0..ask.requests {
        let t = Instant::now();
        request(s, ask.small, buf)?;
        latency.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    s.write_all(&0u64.to_be_bytes())?;
    s.flush()?;
    Ok(ClientSide {
        connect_us,
        seconds,
        latency,
        spent: Spent {
            cpu: thread_cpu().saturating_sub(cpu0),
        },
    })
}

/// One request of `n` bytes: sends it, reads the answer whole into `buf`, over and over.
fn request(s: &mut (impl Read + Write), n: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    s.write_all(&n.to_be_bytes())?;
    s.flush()?;
    let mut left = n;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let got = s.read(&mut buf[..want])?;
        anyhow::ensure!(got > 0, "the server closed after {} bytes", n - left);
        left -= got as u64;
    }
    Ok(())
}

/// The server's side of a stream loop: answers requests until a request of 0 or the end.
fn serve(s: &mut (impl Read + Write)) -> anyhow::Result<()> {
    let data = vec![0x5a_u8; IO_BYTES];
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).is_err() {
            return Ok(());
        }
        let mut left = u64::from_be_bytes(len);
        if left == 0 {
            return Ok(());
        }
        while left > 0 {
            let n = left.min(IO_BYTES as u64) as usize;
            s.write_all(&data[..n])?;
            left -= n as u64;
        }
        s.flush()?;
    }
}

/// A TCP socket whose reads go through a large buffer, so rustls decrypts many records per
/// system call (it asks for 4 to 16 KiB at a time otherwise).
#[derive(Debug)]
struct TlsSocket {
    reader: BufReader<TcpStream>,
}

impl TlsSocket {
    fn new(socket: TcpStream) -> Self {
        Self {
            reader: BufReader::with_capacity(TLS_READ_BYTES, socket),
        }
    }
}

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.reader.get_mut().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.reader.get_mut().flush()
    }
}

/// Server and client TLS configs for the loops: the product's provider and suites, TLS 1.3
/// only, a self-signed certificate made for the run.
struct TlsPair {
    cert: CertificateDer<'static>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl TlsPair {
    fn new() -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec![NAME.to_owned()])?;
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let mut server = rustls::ServerConfig::builder_with_provider(libtransport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)?;
        server.alpn_protocols = vec![b"bare".to_vec()];
        Ok(Self {
            client: Self::client_trusting(der.clone())?,
            cert: der,
            server: Arc::new(server),
        })
    }

    /// A client config that trusts only `cert`, the server loops' own.
    fn client_trusting(cert: CertificateDer<'static>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let mut client = rustls::ClientConfig::builder_with_provider(libtransport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"bare".to_vec()];
        Ok(Arc::new(client))
    }
}

/// The server's side of a QUIC loop: a stream per request, until a request of 0 or the
/// connection's end; what its thread spent.
async fn serve_quic(conn: quinn::Connection) -> anyhow::Result<Spent> {
    let t0 = thread_cpu();
    let data = bytes::Bytes::from(vec![0x5a_u8; IO_BYTES]);
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let mut len = [0u8; 8];
        recv.read_exact(&mut len).await?;
        let mut left = u64::from_be_bytes(len);
        if left == 0 {
            break;
        }
        while left > 0 {
            let n = left.min(IO_BYTES as u64) as usize;
            send.write_chunk(data.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
    }
    let spent = Spent {
        cpu: thread_cpu().saturating_sub(t0),
    };
    conn.closed().await;
    Ok(spent)
}

/// The client's side of a QUIC loop to `addr`: one quinn connection with the product's
/// settings, on a single-threaded runtime of this thread, so its CPU is this thread's.
fn pull_quic(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    cfg: &libtransport::TransportConfig,
    ask: Asks,
) -> anyhow::Result<ClientSide> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t0 = thread_cpu();
        let started = Instant::now();
        let (endpoint, config) =
            libtransport::transport::quic::reference_client_endpoint(addr, tls, cfg)?;
        let conn = endpoint.connect_with(config, addr, NAME)?.await?;
        let connect_us = started.elapsed().as_micros() as u64;
        let mut buf = vec![0u8; IO_BYTES];
        let request = |n: u64, buf: &mut Vec<u8>| {
            let conn = conn.clone();
            let mut buf = std::mem::take(buf);
            async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&n.to_be_bytes()).await?;
                send.finish()?;
                let mut got = 0u64;
                while let Some(k) = recv.read(&mut buf).await? {
                    got += k as u64;
                }
                anyhow::ensure!(got == n, "{got} of {n} bytes arrived");
                Ok::<_, anyhow::Error>(buf)
            }
        };
        let t = Instant::now();
        buf = request(ask.size, &mut buf).await?;
        let seconds = t.elapsed().as_secs_f64();
        let mut latency = latency_histogram()?;
        for _ in 0..ask.requests {
            let t = Instant::now();
            buf = request(ask.small, &mut buf).await?;
            latency.record(t.elapsed().as_micros().max(1) as u64)?;
        }
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&0u64.to_be_bytes()).await?;
        send.finish()?;
        let spent = Spent {
            cpu: thread_cpu().saturating_sub(t0),
        };
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(ClientSide {
            connect_us,
            seconds,
            latency,
            spent,
        })
    })
}

/// The CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly.

    use super::*;

    fn shape() -> Shape {
        Shape {
            parallel: 1,
            connections: 1,
            requests: 5,
            request_bytes: 0,
            stripes: 1,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_reference_loop_moves_every_byte_and_measures_both_ends() {
        for bare in [Bare::Tcp, Bare::Tls, Bare::Quic] {
            let size = (3 << 20) + 12_345;
            let r = run(bare, size, shape(), &Default::default(), None)
                .await
                .unwrap();
            assert_eq!(r.mode, bare.name());
            assert_eq!(r.bytes, size);
            assert!(r.gbps > 0.0, "{}", r.mode);
            assert!(r.client_cpu_s_per_gb > 0.0, "{}", r.mode);
            assert!(r.server_cpu_s_per_gb.unwrap() > 0.0, "{}", r.mode);
            assert_eq!(r.latency.count, 5, "{}", r.mode);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_reference_loop_reaches_a_server_end_elsewhere() {
        let cfg = libtransport::TransportConfig::default();
        // Ports that are free now: the loops take this one over TCP and UDP, and the next.
        let (addr, cert) = (0..20)
            .find_map(|_| {
                let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
                let addr = probe.local_addr().ok()?;
                drop(probe);
                serve_remote(addr, &cfg).ok().map(|cert| (addr, cert))
            })
            .expect("no free ports on loopback");
        let remote = RemoteBare {
            addr,
            cert,
            server_pid: Some(std::process::id()),
        };
        for bare in [Bare::Tcp, Bare::Tls, Bare::Quic] {
            let size = (2 << 20) + 7;
            let r = run(bare, size, shape(), &cfg, Some(&remote)).await.unwrap();
            assert_eq!((r.mode, r.bytes), (bare.name(), size));
            // The server end's process CPU, in clock ticks: measured, if not above zero for
            // so short a run.
            assert!(r.server_cpu_s_per_gb.is_some(), "{}", r.mode);
            assert_eq!(r.latency.count, 5, "{}", r.mode);
        }
        // A server end with another certificate is refused, as the product's peers are.
        let stranger = RemoteBare {
            cert: TlsPair::new().unwrap().cert,
            server_pid: None,
            ..remote
        };
        for bare in [Bare::Tls, Bare::Quic] {
            let refused = run(bare, 1 << 20, shape(), &cfg, Some(&stranger)).await;
            assert!(refused.is_err(), "{} trusted a stranger", bare.name());
        }
        // Without the server's process id, its CPU is not measured (nor guessed).
        let r = run(Bare::Tcp, 1 << 20, shape(), &cfg, Some(&stranger))
            .await
            .unwrap();
        assert_eq!(r.server_cpu_s_per_gb, None);
    }
}
