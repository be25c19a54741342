//! The floor under `transport-bench lab`: a bare TCP loop against a bare rustls loop over
//! the same two netlab hosts, with none of our protocol, store, hashing or buffering.
//!
//! A server writes `--size` bytes per connection from one 256 KiB buffer; the client reads
//! them into another and throws them away. The TLS loop is rustls's blocking stream with
//! the product's crypto provider (`libtransport::tls::provider`, AES-128-GCM first), over a
//! self-signed certificate made for the run. The ratio of the two rates is what TLS costs on this path and processor
//! with nothing else in the way; `transport-bench lab` prints the same host's one-core
//! AES-GCM rate, which is what mostly decides it.
//!
//! ```sh
//! cargo run --release -p benches --example bare_loops -- --mtu 1500 --size 1GiB --rounds 3
//! ```
//! Needs root (network namespaces).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const BUFFER: usize = 256 << 10;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(Path::new(&args[1]), args[2].parse()?, args[3].parse()?),
        Some("pull") => pull(Path::new(&args[1]), args[2].parse()?, args[3] == "tls"),
        _ => lab(&args),
    }
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// Builds the lab, runs the server on one host and `rounds` pulls of each loop,
/// interleaved, from the other; prints each rate and the medians' ratio.
fn lab(args: &[String]) -> anyhow::Result<()> {
    let mtu: u32 = flag(args, "--mtu", "1500").parse()?;
    let size = flag(args, "--size", "1GiB")
        .parse::<bytesize::ByteSize>()
        .map_err(|e| anyhow::anyhow!("--size: {e}"))?
        .as_u64();
    let rounds: usize = flag(args, "--rounds", "3").parse()?;
    netlab::preflight()?;
    let lab = netlab::Lab::builder("bare-loops")
        .mtu(mtu)
        .host("server")
        .host("client")
        .build()?;
    let (server_host, client_host) = (&lab.hosts()[0], &lab.hosts()[1]);
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["bare-loops".to_owned()])?;
    std::fs::write(dir.path().join("cert.der"), cert.cert.der())?;
    std::fs::write(dir.path().join("key.der"), cert.signing_key.serialize_der())?;
    let exe = std::env::current_exe()?;
    let addr = SocketAddr::from((server_host.addr(), 7500));
    let server = server_host
        .process(&exe)
        .arg("serve")
        .arg(dir.path())
        .args([addr.to_string(), size.to_string()])
        .spawn()?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, mode) in ["tcp", "tls"].into_iter().enumerate() {
            let out = client_host
                .command(&exe)
                .arg("pull")
                .arg(dir.path())
                .args([addr.to_string(), mode.to_owned()])
                .output()?;
            if !out.status.success() {
                bail!(
                    "{mode} pull failed: {}\nserver log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    server.log()
                );
            }
            let gbps: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
            println!("{mode}: {gbps:.3} GB/s");
            rates[i].push(gbps);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _ = server.stop(Duration::from_secs(2));
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (tcp, tls) = (median(&mut rates[0]), median(&mut rates[1]));
    println!(
        "MTU {mtu}: bare TCP {tcp:.3} GB/s, bare rustls {tls:.3} GB/s, ratio {:.3}",
        tls / tcp
    );
    Ok(())
}

/// Serves `size` bytes per connection: plain TCP on `addr`, TLS on the next port.
fn serve(dir: &Path, addr: SocketAddr, size: u64) -> anyhow::Result<()> {
    let cert = CertificateDer::from(std::fs::read(dir.join("cert.der"))?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(
        dir.join("key.der"),
    )?));
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(libtransport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?,
    );
    let plain = TcpListener::bind(addr)?;
    let tls = TcpListener::bind(SocketAddr::new(addr.ip(), addr.port() + 1))?;
    std::thread::spawn(move || {
        for s in plain.incoming().flatten() {
            let _ = s.set_nodelay(true);
            let mut s = s;
            let _ = send(&mut s, size);
        }
    });
    for s in tls.incoming().flatten() {
        let _ = s.set_nodelay(true);
        let conn = rustls::ServerConnection::new(config.clone())?;
        let mut stream = rustls::StreamOwned::new(conn, s);
        if send(&mut stream, size).is_ok() {
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    }
    Ok(())
}

fn send(w: &mut impl Write, size: u64) -> std::io::Result<()> {
    let buf = vec![0x5a_u8; BUFFER];
    let mut left = size;
    while left > 0 {
        let n = left.min(BUFFER as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

/// Pulls one connection's bytes and prints the rate (10^9 bytes per second), timed from
/// the connect (the TLS handshake is inside, as it is in a real pull).
fn pull(dir: &Path, addr: SocketAddr, tls: bool) -> anyhow::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    let tls_config = if tls {
        let cert = CertificateDer::from(std::fs::read(dir.join("cert.der"))?);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let config = rustls::ClientConfig::builder_with_provider(libtransport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(Arc::new(config))
    } else {
        None
    };
    let port = if tls { addr.port() + 1 } else { addr.port() };
    let target = SocketAddr::new(addr.ip(), port);
    // The server may still be starting on its host: retry a refused connect for a while.
    let mut tries = 0;
    let (started, mut socket) = loop {
        let started = Instant::now();
        match TcpStream::connect(target) {
            Ok(s) => break (started, s),
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {target}")),
        }
    };
    let n = match tls_config {
        Some(config) => {
            let conn = rustls::ClientConnection::new(
                config,
                ServerName::try_from("bare-loops")?.to_owned(),
            )?;
            drain(&mut rustls::StreamOwned::new(conn, socket), &mut buf)?
        }
        None => drain(&mut socket, &mut buf)?,
    };
    let secs = started.elapsed().as_secs_f64();
    if n == 0 {
        bail!("nothing arrived");
    }
    println!("{}", n as f64 / secs / 1e9);
    Ok(())
}

fn drain(r: &mut impl Read, buf: &mut [u8]) -> anyhow::Result<u64> {
    let mut total = 0u64;
    loop {
        match r.read(buf).context("reading")? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}
