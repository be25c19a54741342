//! Everything a run needs: a trust domain, a server and a client identity, a store holding
//! one object, and the servers for each mode on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use certs::{Ca, CaParams, IssueParams, KeyAlgorithm, SpiffeId, Svid, TrustBundle, TrustDomain};
use libtransport::audit::{FileSink, FileSinkConfig};
use libtransport::policy::{AccessList, Grant};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::store::Store;
use libtransport::{
    Credentials, IdentityHandle, PolicyHandle, Server, ServerConfig, ServerHandle, TransportConfig,
};
use tokio::net::TcpListener;

/// A prepared benchmark: servers running, object in place.
#[derive(Debug)]
pub struct Bench {
    /// Holds the store; removed on drop.
    pub dir: tempfile::TempDir,
    /// The QUIC and TLS/TCP server.
    pub server: ServerHandle,
    /// The plaintext baseline's address.
    pub plaintext: SocketAddr,
    /// The client's identity.
    pub client: IdentityHandle,
    /// The server's SPIFFE ID.
    pub server_id: SpiffeId,
    /// The dataset holding the object.
    pub dataset: DatasetName,
    /// The object every mode moves.
    pub object: ObjectPath,
    /// Its size.
    pub size: u64,
    /// Tuning used on both sides.
    pub transport: TransportConfig,
    plaintext_task: tokio::task::JoinHandle<()>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.plaintext_task.abort();
    }
}

/// Builds identities, writes the object and starts the servers. With `audit`, the server
/// keeps a real audit trail (hash chain, signed checkpoints) as a node does.
pub async fn setup(
    size: u64,
    transport: TransportConfig,
    chunk_bytes: u32,
    audit: bool,
) -> anyhow::Result<Bench> {
    let dir = tempfile::Builder::new()
        .prefix("transport-bench-")
        .tempdir()?;
    let td = TrustDomain::new("bench.transportd.internal")?;
    let now = SystemTime::now();
    let ca = Ca::generate(&td, &CaParams::default(), now)?;
    let bundle = ca.bundle();
    let server_id = SpiffeId::from_parts(&td, "/bench/server")?;
    let client_id = SpiffeId::from_parts(&td, "/bench/client")?;
    let server_creds = credentials(&ca, &bundle, &server_id, now)?;
    let client = IdentityHandle::new(credentials(&ca, &bundle, &client_id, now)?);

    let dataset = DatasetName::new("bench")?;
    let object = ObjectPath::new("object.bin")?;
    let root = dir.path().join("data");
    let path = root.join("bench/object.bin");
    std::fs::create_dir_all(root.join("bench"))?;
    let p = path.clone();
    tokio::task::spawn_blocking(move || write_object(&p, size)).await??;

    let mut acl = AccessList::new();
    acl.grant(Grant {
        peer: client_id.clone(),
        dataset: dataset.clone(),
        read: true,
        write: true,
    });
    let store = Store::open(&root, None, chunk_bytes)?;
    // Compute the manifest now (and warm the page cache) so no mode pays for it.
    let s = Arc::new(store);
    let (s2, d2, o2) = (s.clone(), dataset.clone(), object.clone());
    tokio::task::spawn_blocking(move || s2.open_read(&d2, &o2).map(|_| ())).await??;
    let server_identity = IdentityHandle::new(server_creds);
    let mut builder = ServerConfig::builder()
        .identity(server_identity.clone())
        .policy(PolicyHandle::new(Arc::new(acl)))
        .store(s)
        .transport(transport.clone());
    if audit {
        let sink = FileSink::open(
            FileSinkConfig::new(dir.path().join("audit")),
            Arc::new(server_identity),
            Arc::new(libtransport::clock::SystemClock),
        )?;
        builder = builder.audit(Arc::new(sink));
    }
    let config = builder.build();
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let server = Server::bind(config.clone(), Some(loopback), Some(loopback))
        .await?
        .spawn();
    let listener = TcpListener::bind(loopback).await?;
    let plaintext = listener.local_addr()?;
    let plaintext_task = tokio::spawn(libtransport::bench::dangerous_serve_plaintext(
        config, listener, client_id,
    ));
    Ok(Bench {
        dir,
        server,
        plaintext,
        client,
        server_id,
        dataset,
        object,
        size,
        transport,
        plaintext_task,
    })
}

/// Issues an SVID the real way: key and CSR generated here, certificate from the CA.
fn credentials(
    ca: &Ca,
    bundle: &TrustBundle,
    id: &SpiffeId,
    now: SystemTime,
) -> anyhow::Result<Credentials> {
    let (key, csr) = certs::generate_key_and_csr(id, KeyAlgorithm::default())?;
    let issued = ca.issue(&csr, id, &IssueParams::default(), now)?;
    let svid = Svid::from_pem(&issued.chain_pem(), &key).context("loading issued SVID")?;
    Ok(Credentials::new(svid, bundle.clone())?)
}

fn write_object(path: &std::path::Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut xof = blake3::Hasher::new()
        .update(b"transport-bench")
        .finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}
