//! What a serving node's store reads and hashes, counted through the store itself
//! (`Store::io_counters`), not by timing: each stored byte is read once per pull, over
//! QUIC, TLS/TCP and RDMA; a manifest is computed once per file version, survives a restart
//! in the state directory, and is computed again once the file changes; a range reads only
//! the chunks it touches.

use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use certs::SpiffeId;
use certs::test_util::TestPki;
use libtransport::metrics::Metrics;
use libtransport::policy::{AccessList, Grant};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::store::{Store, StoreCounters};
use libtransport::test_util::{identity, random_bytes, trace_init};
use libtransport::{
    Client, ClientConfig, FetchOptions, Path, PolicyHandle, RdmaMode, Server, ServerConfig,
    ServerHandle, TransferPath, TransportConfig,
};

/// 1 MiB chunks: the object below has seven, the last one short.
const CHUNK: u64 = 1 << 20;
const SIZE: usize = 6 * CHUNK as usize + 12_345;

fn transport(rdma: RdmaMode) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.chunk_bytes(CHUNK as u32).unwrap();
    t.rdma(rdma);
    t
}

/// A serving node over the store at `dir/data` with its state in `dir/state`.
struct Node {
    handle: ServerHandle,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Node {
    async fn start(pki: &TestPki, dir: &FsPath) -> Self {
        let store =
            Arc::new(Store::open(dir.join("data"), Some(dir.join("state")), CHUNK as u32).unwrap());
        let mut acl = AccessList::new();
        acl.grant(Grant {
            peer: SpiffeId::from_parts(pki.bundle().trust_domain(), "/gpu/loader").unwrap(),
            dataset: DatasetName::new("scans").unwrap(),
            read: true,
            write: false,
        });
        let config = ServerConfig::builder()
            .identity(identity(pki, "/node/storage"))
            .policy(PolicyHandle::new(Arc::new(acl)))
            .store(store.clone())
            .transport(transport(RdmaMode::Soft))
            .build();
        let metrics = config.metrics().clone();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = Server::bind(config, Some(loopback), Some(loopback))
            .await
            .unwrap();
        Self {
            handle: server.spawn(),
            store,
            metrics,
        }
    }

    async fn client(&self, pki: &TestPki, path: Path, rdma: RdmaMode) -> Client {
        let addr = match path {
            Path::Quic => self.handle.quic_addr(),
            Path::Tcp => self.handle.tcp_addr(),
        };
        let config = ClientConfig::builder()
            .identity(identity(pki, "/gpu/loader"))
            .transport(transport(rdma))
            .build();
        Client::connect(config, addr.unwrap(), path).await.unwrap()
    }

    /// What the store counted since `before`: (bytes read, bytes hashed).
    fn since(&self, before: StoreCounters) -> (u64, u64) {
        let now = self.store.io_counters();
        (
            now.bytes_read - before.bytes_read,
            now.bytes_hashed - before.bytes_hashed,
        )
    }
}

/// Pulls the whole object into memory over `client` and checks it is `data`.
async fn pull(client: &Client, data: &[u8]) {
    let got = client
        .fetch(&scans(), &object(), 64 << 20, &FetchOptions::default())
        .await
        .unwrap();
    assert!(
        got[..] == data[..],
        "pulled bytes differ from the stored object"
    );
}

fn scans() -> DatasetName {
    DatasetName::new("scans").unwrap()
}

fn object() -> ObjectPath {
    ObjectPath::new("train/shard-0000.bin").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_reads_each_byte_once_per_pull_and_hashes_only_new_file_versions() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data/scans").join(object().as_str());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let data = random_bytes(SIZE, 1);
    std::fs::write(&file, &data).unwrap();
    let size = SIZE as u64;

    let node = Node::start(&pki, dir.path()).await;
    assert_eq!(node.store.io_counters(), StoreCounters::default());
    let quic = node.client(&pki, Path::Quic, RdmaMode::Off).await;
    let tcp = node.client(&pki, Path::Tcp, RdmaMode::Off).await;

    // First pull: the manifest is computed (every byte hashed once), then every byte read
    // once to serve it.
    let before = node.store.io_counters();
    pull(&quic, &data).await;
    assert_eq!(node.since(before), (size, size), "first pull over QUIC");

    // Second pull, over TLS/TCP: read again, not hashed again.
    let before = node.store.io_counters();
    pull(&tcp, &data).await;
    assert_eq!(node.since(before), (size, 0), "second pull over TLS/TCP");

    // Over RDMA (the software device): the sender reads into its staging slots.
    let rdma = node.client(&pki, Path::Quic, RdmaMode::Soft).await;
    let before = node.store.io_counters();
    let report = rdma
        .fetch_to_file(
            &scans(),
            &object(),
            &dir.path().join("pulled.bin"),
            &FetchOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.path, TransferPath::Rdma);
    assert_eq!(std::fs::read(dir.path().join("pulled.bin")).unwrap(), data);
    assert_eq!(node.since(before), (size, 0), "pull over RDMA");

    // A range reads the chunks it touches (chunks are verified whole), and no others.
    let before = node.store.io_counters();
    let range = CHUNK + CHUNK / 2..2 * CHUNK + 1000;
    let got = quic
        .read_range(&scans(), &object(), range.clone())
        .await
        .unwrap();
    assert!(got[..] == data[range.start as usize..range.end as usize]);
    assert_eq!(
        node.since(before),
        (2 * CHUNK, 0),
        "range over chunks 1 and 2"
    );

    // The node exports the same counts.
    let c = node.store.io_counters();
    assert_eq!(c.bytes_read, 3 * size + 2 * CHUNK);
    let text = node.metrics.encode();
    assert!(
        text.contains(&format!(
            "transportd_store_read_bytes_total {}\n",
            c.bytes_read
        )),
        "{text}"
    );
    assert!(text.contains(&format!("transportd_manifest_hashed_bytes_total {size}\n")));
    for c in [quic, tcp, rdma] {
        c.close();
    }

    // Restart: a new store and server over the same root and state directory use the
    // persisted manifest.
    node.handle.shutdown(Duration::from_secs(5)).await;
    drop(node.store);
    let node = Node::start(&pki, dir.path()).await;
    let quic = node.client(&pki, Path::Quic, RdmaMode::Off).await;
    pull(&quic, &data).await;
    assert_eq!(
        node.since(StoreCounters::default()),
        (size, 0),
        "pull after a restart"
    );

    // Control: once the file changes (content and size), the next pull hashes the new
    // version, once.
    let changed = random_bytes(SIZE - 5000, 2);
    std::fs::write(&file, &changed).unwrap();
    let before = node.store.io_counters();
    pull(&quic, &changed).await;
    let new_size = changed.len() as u64;
    assert_eq!(
        node.since(before),
        (new_size, new_size),
        "pull of a changed file"
    );
    let before = node.store.io_counters();
    pull(&quic, &changed).await;
    assert_eq!(node.since(before), (new_size, 0), "pull of it again");
    quic.close();
}
