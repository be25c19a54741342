//! The reference loops: what the libraries under the product move on this machine with
//! nothing of ours in the way. `bare-tcp` is a TCP copy loop, `bare-tls` the same over rustls
//! with the product's crypto provider (TLS 1.3, its suites), `bare-quic` one quinn
//! connection with the product's endpoint and transport settings. No protocol, no
//! verification, no store, no hashing.
//!
//! Each loop runs in this process on loopback, its server and its client each on a thread
//! of its own, so the CPU time of each end is measured apart (the thread's own clock). A
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

/// Runs one loop: `size` bytes in one request, then the small requests of `shape`. The
/// QUIC loop takes the product's transport settings `cfg` (path-MTU ceiling, windows), as
/// the run's product modes do.
pub async fn run(
    bare: Bare,
    size: u64,
    shape: Shape,
    cfg: &libtransport::TransportConfig,
) -> anyhow::Result<RunResult> {
    let requests = shape.requests;
    let small = shape.request_bytes.max(1);
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || match bare {
        Bare::Tcp | Bare::Tls => stream_loop(bare, size, requests, small),
        Bare::Quic => quic_loop(size, requests, small, cfg),
    })
    .await
    .context("the reference loop panicked")?
}

/// The client's measurements, before the server's CPU is known.
struct ClientSide {
    connect_us: u64,
    seconds: f64,
    latency: Histogram<u64>,
    spent: Spent,
}

fn result(bare: Bare, size: u64, client: ClientSide, server: Spent) -> RunResult {
    let gb = size as f64 / 1e9;
    let per_gb = |d: Duration| d.as_secs_f64() / gb;
    RunResult {
        mode: bare.name(),
        into: Destination::Memory,
        stripes: 1,
        bytes: size,
        seconds: client.seconds,
        gbps: size as f64 / client.seconds / 1e9,
        cpu_s_per_gb: per_gb(client.spent.cpu + server.cpu),
        client_cpu_s_per_gb: per_gb(client.spent.cpu),
        server_cpu_s_per_gb: Some(per_gb(server.cpu)),
        connect_us: client.connect_us,
        latency: Latency::of(&client.latency),
        quic_path: None,
    }
}

/// TCP or rustls over TCP, blocking, a thread per end.
fn stream_loop(bare: Bare, size: u64, requests: u32, small: u64) -> anyhow::Result<RunResult> {
    let tls = match bare {
        Bare::Tls => Some(TlsPair::new()?),
        _ => None,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let server_tls = tls.as_ref().map(|t| t.server.clone());
    let server = std::thread::spawn(move || -> anyhow::Result<Spent> {
        let (socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        let t0 = thread_cpu();
        match server_tls {
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
    });
    let client = (|| -> anyhow::Result<ClientSide> {
        let t0 = thread_cpu();
        let started = Instant::now();
        let socket = TcpStream::connect(addr)?;
        socket.set_nodelay(true)?;
        let mut buf = vec![0u8; IO_BYTES];
        match &tls {
            Some(pair) => {
                let conn = rustls::ClientConnection::new(
                    pair.client.clone(),
                    ServerName::try_from(NAME)?.to_owned(),
                )?;
                let mut s = rustls::StreamOwned::new(conn, TlsSocket::new(socket));
                // The handshake completes with the first request.
                pull(&mut s, started, size, requests, small, &mut buf, t0)
            }
            None => pull(&mut &socket, started, size, requests, small, &mut buf, t0),
        }
    })();
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("{} server panicked", bare.name()))?;
    let client = client.with_context(|| format!("{}: client", bare.name()))?;
    let server = server.with_context(|| format!("{}: server", bare.name()))?;
    Ok(result(bare, size, client, server))
}

/// The client's side of a stream loop: the bulk request, then the small ones, then the end.
fn pull(
    s: &mut (impl Read + Write),
    started: Instant,
    size: u64,
    requests: u32,
    small: u64,
    buf: &mut [u8],
    cpu0: Duration,
) -> anyhow::Result<ClientSide> {
    let t = Instant::now();
    ask(s, size, buf)?;
    let seconds = t.elapsed().as_secs_f64();
    let connect_us = t.saturating_duration_since(started).as_micros() as u64;
    let mut latency = latency_histogram()?;
    for _ in 0..requests {
        let t = Instant::now();
        ask(s, small, buf)?;
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
fn ask(s: &mut (impl Read + Write), n: u64, buf: &mut [u8]) -> anyhow::Result<()> {
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
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl TlsPair {
    fn new() -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec![NAME.to_owned()])?;
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let provider = libtransport::tls::provider();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)?;
        server.alpn_protocols = vec![b"bare".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der)?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"bare".to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// One quinn connection with the product's settings; each end on a single-threaded runtime
/// of its own thread, so each end's CPU is that thread's.
fn quic_loop(
    size: u64,
    requests: u32,
    small: u64,
    cfg: libtransport::TransportConfig,
) -> anyhow::Result<RunResult> {
    let tls = TlsPair::new()?;
    let client_cfg = cfg.clone();
    let server_tls = (*tls.server).clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || -> anyhow::Result<Spent> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let endpoint = libtransport::transport::quic::reference_server_endpoint(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                server_tls,
                &cfg,
            )?;
            addr_tx.send(endpoint.local_addr()?)?;
            let conn = endpoint.accept().await.context("no connection")?.await?;
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
            endpoint.wait_idle().await;
            Ok(spent)
        })
    });
    let client_tls = (*tls.client).clone();
    let client = (|| -> anyhow::Result<ClientSide> {
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the server did not start")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let t0 = thread_cpu();
            let started = Instant::now();
            let (endpoint, config) = libtransport::transport::quic::reference_client_endpoint(
                addr,
                client_tls,
                &client_cfg,
            )?;
            let conn = endpoint.connect_with(config, addr, NAME)?.await?;
            let connect_us = started.elapsed().as_micros() as u64;
            let mut buf = vec![0u8; IO_BYTES];
            let ask = |n: u64, buf: &mut Vec<u8>| {
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
            buf = ask(size, &mut buf).await?;
            let seconds = t.elapsed().as_secs_f64();
            let mut latency = latency_histogram()?;
            for _ in 0..requests {
                let t = Instant::now();
                buf = ask(small, &mut buf).await?;
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
    })();
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("bare-quic server panicked"))?;
    let client = client.context("bare-quic: client")?;
    let server = server.context("bare-quic: server")?;
    Ok(result(Bare::Quic, size, client, server))
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
            let r = run(bare, size, shape(), &Default::default()).await.unwrap();
            assert_eq!(r.mode, bare.name());
            assert_eq!(r.bytes, size);
            assert!(r.gbps > 0.0, "{}", r.mode);
            assert!(r.client_cpu_s_per_gb > 0.0, "{}", r.mode);
            assert!(r.server_cpu_s_per_gb.unwrap() > 0.0, "{}", r.mode);
            assert_eq!(r.latency.count, 5, "{}", r.mode);
        }
    }
}
