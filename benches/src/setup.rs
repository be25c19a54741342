//! Everything a run needs: identities, a store holding one object, and the servers for
//! each mode (QUIC and TLS/TCP from libtransport, and the plaintext baseline).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use certs::{Ca, CaParams, IssueParams, KeyAlgorithm, SpiffeId, Svid, TrustBundle, TrustDomain};
use libtransport::audit::{FileSink, FileSinkConfig};
use libtransport::policy::{Action, Effect, Pattern, Policy, Rule, Subject};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::store::Store;
use libtransport::{
    Credentials, IdentityHandle, PolicyHandle, Server, ServerConfig, ServerHandle, TransportConfig,
};
use tokio::net::TcpListener;

use crate::plaintext::PlaintextListener;

/// The trust domain benchmarks mint when they make their own identities.
pub const TRUST_DOMAIN: &str = "bench.transportd.internal";

/// What to serve and how.
#[derive(Debug)]
pub struct ServeSpec {
    /// The server's identity.
    pub identity: IdentityHandle,
    /// QUIC and TLS/TCP listen here (the same port number for both).
    pub listen: SocketAddr,
    /// The plaintext baseline listens here, if given.
    pub plaintext: Option<SocketAddr>,
    /// The object.
    pub object: ObjectSource,
    /// Tuning.
    pub transport: TransportConfig,
    /// Chunk size of the object's manifest.
    pub chunk_bytes: u32,
    /// Keep a real audit trail, as a node does.
    pub audit: bool,
}

/// Where the served object comes from.
#[derive(Debug, Clone)]
pub enum ObjectSource {
    /// Pseudo-random bytes of this length.
    Synthetic(u64),
    /// A copy of this file.
    File(PathBuf),
}

/// Running servers and the object they serve.
#[derive(Debug)]
pub struct Served {
    /// Holds the store and the audit trail; removed on drop.
    pub dir: tempfile::TempDir,
    /// The QUIC and TLS/TCP server.
    pub server: ServerHandle,
    /// The plaintext baseline's address, if it runs.
    pub plaintext: Option<SocketAddr>,
    /// The server's SPIFFE ID.
    pub server_id: SpiffeId,
    /// The dataset holding the object.
    pub dataset: DatasetName,
    /// The object.
    pub object: ObjectPath,
    /// Its size.
    pub size: u64,
    /// The plaintext baseline's server, if it runs (stops on drop).
    _plaintext_server: Option<ServerHandle>,
}

/// Writes the object, computes its manifest (so no mode pays for it), starts the servers.
/// Any peer of the server's trust domain may read the object.
pub async fn serve(spec: ServeSpec) -> anyhow::Result<Served> {
    let dir = tempfile::Builder::new()
        .prefix("transport-bench-")
        .tempdir()?;
    let dataset = DatasetName::new("bench")?;
    let object = ObjectPath::new("object.bin")?;
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("bench"))?;
    let path = root.join("bench/object.bin");
    let source = spec.object.clone();
    let p = path.clone();
    let size = tokio::task::spawn_blocking(move || match source {
        ObjectSource::Synthetic(len) => write_object(&p, len).map(|()| len),
        ObjectSource::File(f) => std::fs::copy(&f, &p),
    })
    .await??;
    let store = Arc::new(Store::open(&root, None, spec.chunk_bytes)?);
    let (s2, d2, o2) = (store.clone(), dataset.clone(), object.clone());
    tokio::task::spawn_blocking(move || s2.open_read(&d2, &o2).map(|_| ())).await??;

    let server_id = spec.identity.current().id().clone();
    let td = server_id.trust_domain();
    let policy = Policy::new(
        Vec::new(),
        vec![Rule {
            name: "bench clients read the object".into(),
            effect: Effect::Allow,
            subjects: vec![Subject::Under {
                trust_domain: td.as_str().to_owned(),
                path: String::new(),
            }],
            except: Vec::new(),
            datasets: vec![Pattern::new("bench").map_err(anyhow::Error::msg)?],
            objects: Vec::new(),
            classes: Vec::new(),
            actions: vec![Action::List, Action::Read],
            line: None,
        }],
    )
    .map_err(anyhow::Error::msg)?;
    let mut builder = ServerConfig::builder()
        .identity(spec.identity.clone())
        .policy(PolicyHandle::new(Arc::new(policy)))
        .store(store)
        .transport(spec.transport.clone());
    if spec.audit {
        let sink = FileSink::open(
            FileSinkConfig::new(dir.path().join("audit")),
            Arc::new(spec.identity.clone()),
            Arc::new(libtransport::clock::SystemClock),
        )?;
        builder = builder.audit(Arc::new(sink));
    }
    let config = builder.build();
    let server = Server::bind(config.clone(), Some(spec.listen), Some(spec.listen))
        .await?
        .spawn();
    let (plaintext, plaintext_server) = match spec.plaintext {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            // Nobody is authenticated on the baseline: every peer is taken to be this one.
            let assumed = SpiffeId::from_parts(&td, "/bench/plaintext-client")?;
            let listener = PlaintextListener::dangerous_new(listener, assumed);
            let server = Server::with_listeners(config, vec![Box::new(listener)]).spawn();
            (Some(bound), Some(server))
        }
        None => (None, None),
    };
    Ok(Served {
        dir,
        server,
        plaintext,
        server_id,
        dataset,
        object,
        size,
        _plaintext_server: plaintext_server,
    })
}

/// A new CA for [`TRUST_DOMAIN`].
pub fn new_ca() -> anyhow::Result<Ca> {
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    Ok(Ca::generate(&td, &CaParams::default(), SystemTime::now())?)
}

/// Issues an SVID the real way: key and CSR generated here, certificate from the CA.
pub fn credentials(ca: &Ca, path: &str) -> anyhow::Result<Credentials> {
    let (svid, bundle) = issue(ca, path)?;
    Ok(Credentials::new(svid, bundle)?)
}

/// Writes an identity for `path` into `dir` (svid.pem, svid.key, bundle.pem), as
/// `transportd ca issue` does.
pub fn write_identity(ca: &Ca, path: &str, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let id = SpiffeId::from_parts(ca.trust_domain(), path)?;
    let (key, csr) = certs::generate_key_and_csr(&id, KeyAlgorithm::default())?;
    let issued = ca.issue(&csr, &id, &IssueParams::default(), SystemTime::now())?;
    std::fs::write(dir.join("svid.pem"), issued.chain_pem())?;
    std::fs::write(dir.join("bundle.pem"), ca.bundle().to_pem())?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(dir.join("svid.key"))?;
    std::io::Write::write_all(&mut f, key.as_bytes())?;
    Ok(())
}

/// Loads an identity written by [`write_identity`] or `transportd ca issue`.
pub fn load_identity(dir: &Path) -> anyhow::Result<IdentityHandle> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let svid = Svid::from_pem(&read("svid.pem")?, &read("svid.key")?)?;
    let bundle = TrustBundle::from_pem(&read("bundle.pem")?)?;
    Ok(IdentityHandle::new(Credentials::new(svid, bundle)?))
}

fn issue(ca: &Ca, path: &str) -> anyhow::Result<(Svid, TrustBundle)> {
    let id = SpiffeId::from_parts(ca.trust_domain(), path)?;
    let (key, csr) = certs::generate_key_and_csr(&id, KeyAlgorithm::default())?;
    let issued = ca.issue(&csr, &id, &IssueParams::default(), SystemTime::now())?;
    let svid = Svid::from_pem(&issued.chain_pem(), &key).context("loading issued SVID")?;
    Ok((svid, ca.bundle()))
}

/// Writes the bench's object: `len` pseudo-random bytes (a BLAKE3 output stream).
pub fn write_object(path: &Path, len: u64) -> std::io::Result<()> {
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
