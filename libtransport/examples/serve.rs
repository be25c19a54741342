//! Serve the datasets under a directory to one allowed peer, over QUIC and TLS/TCP.
//!
//! ```sh
//! cargo run -p libtransport --example serve -- 0.0.0.0:7443 ./identity /srv/datasets \
//!     spiffe://hospital.example/gpu/loader scans
//! ```

use std::path::Path;
use std::sync::Arc;

use libtransport::policy::{AccessList, Grant};
use libtransport::proto::DatasetName;
use libtransport::store::Store;
use libtransport::{Credentials, IdentityHandle, PolicyHandle, Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, dir, root, peer, dataset] = args.as_slice() else {
        return Err(
            "usage: serve ADDR:PORT IDENTITY_DIR DATASETS_ROOT PEER_SPIFFE_ID DATASET".into(),
        );
    };
    let dir = Path::new(dir);
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let svid = certs::Svid::from_pem(&read("svid.pem")?, &read("svid.key")?)?;
    let bundle = certs::TrustBundle::from_pem(&read("bundle.pem")?)?;

    // Default deny: one peer may read one dataset.
    let mut acl = AccessList::new();
    acl.grant(Grant {
        peer: certs::SpiffeId::parse(peer)?,
        dataset: DatasetName::new(dataset)?,
        read: true,
        write: false,
    });
    let store = Store::open(
        root,
        None,
        libtransport::proto::manifest::DEFAULT_CHUNK_BYTES,
    )?;
    let config = ServerConfig::builder()
        .identity(IdentityHandle::new(Credentials::new(svid, bundle)?))
        .policy(PolicyHandle::new(Arc::new(acl)))
        .store(Arc::new(store))
        .build();
    let addr = listen.parse()?;
    let server = Server::bind(config, Some(addr), Some(addr)).await?;
    println!(
        "serving on {:?} (QUIC) and {:?} (TCP)",
        server.quic_addr(),
        server.tcp_addr()
    );
    let handle = server.spawn();
    tokio::signal::ctrl_c().await?;
    handle.shutdown(std::time::Duration::from_secs(10)).await;
    Ok(())
}
