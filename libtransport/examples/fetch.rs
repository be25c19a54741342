//! A data loader's view: pull one object, verified, into memory and into a file.
//!
//! ```sh
//! cargo run -p libtransport --example fetch -- 10.0.0.5:7443 ./identity scans train/shard-0001.bin
//! ```
//! `./identity` holds `svid.pem`, `svid.key` and `bundle.pem` (as `transportd ca issue` writes them).

use std::path::Path;

use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::{Client, ClientConfig, Credentials, FetchOptions, IdentityHandle};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [node, dir, dataset, object] = args.as_slice() else {
        return Err("usage: fetch NODE:PORT IDENTITY_DIR DATASET OBJECT".into());
    };
    let dir = Path::new(dir);
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let svid = certs::Svid::from_pem(&read("svid.pem")?, &read("svid.key")?)?;
    let bundle = certs::TrustBundle::from_pem(&read("bundle.pem")?)?;
    let config = ClientConfig::builder()
        .identity(IdentityHandle::new(Credentials::new(svid, bundle)?))
        .build();
    // QUIC first, TLS over TCP if UDP is blocked.
    let paths = [libtransport::Path::Quic, libtransport::Path::Tcp];
    let client = Client::connect_any(config, node.parse()?, &paths).await?;
    println!("connected to {} over {}", client.server().id, client.path());

    let (dataset, object) = (DatasetName::new(dataset)?, ObjectPath::new(object)?);
    let bytes = client
        .fetch(&dataset, &object, 1 << 30, &FetchOptions::default())
        .await?;
    println!("{} verified bytes in memory", bytes.len());
    let dest = Path::new("fetched.bin");
    let report = client
        .fetch_to_file(&dataset, &object, dest, &FetchOptions::default())
        .await?;
    println!(
        "{} verified bytes in {} (root {})",
        report.size,
        dest.display(),
        report.root.short()
    );
    client.close();
    Ok(())
}
