//! The node role: serve datasets to, and accept pushes from, authenticated and authorized
//! peers, until told to stop.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use libtransport::audit::FileSink;
use libtransport::clock::{Clock, SystemClock};
use libtransport::store::Store;
use libtransport::{IdentityHandle, PolicyHandle, Server, ServerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::NodeConfig;

/// Runs a node with the configuration at `path`.
pub(crate) async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(path)?;
    for w in cfg.check(SystemClock.now())? {
        warn!("{w}");
    }
    let creds = cfg.credentials()?;
    let id = creds.id().clone();
    let store = Store::open(&cfg.store_root, cfg.state_dir.clone(), cfg.chunk_bytes)
        .context("opening the store")?;
    let audit = FileSink::open(&cfg.audit_file)
        .with_context(|| format!("opening the audit trail {}", cfg.audit_file.display()))?;
    let identity = IdentityHandle::new(creds);
    let policy = PolicyHandle::new(Arc::new(cfg.acl.clone()));
    let config = ServerConfig::builder()
        .identity(identity.clone())
        .policy(policy.clone())
        .store(Arc::new(store))
        .audit(Arc::new(audit))
        .transport(cfg.transport.clone())
        .build();
    let server = Server::bind(config, cfg.quic, cfg.tcp).await?;
    let ready = serde_json::json!({
        "event": "listening",
        "id": id.as_str(),
        "quic": server.quic_addr().map(|a| a.to_string()),
        "tcp": server.tcp_addr().map(|a| a.to_string()),
    });
    // One line on stdout for whoever started us (scripts, the demo): where we listen.
    println!("{ready}");
    info!(id = %id, "node started");
    let handle = server.spawn();

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(path, &identity, &policy),
        }
    }
    info!("stopping: finishing in-flight requests");
    handle.shutdown(Duration::from_secs(10)).await;
    info!("stopped");
    Ok(())
}

/// Re-reads the configuration and swaps in its identity and access list. A configuration
/// that does not validate is refused and the running one stays.
fn reload(path: &Path, identity: &IdentityHandle, policy: &PolicyHandle) {
    let result = NodeConfig::load(path).and_then(|cfg| Ok((cfg.credentials()?, cfg.acl)));
    match result {
        Ok((creds, acl)) => {
            info!(id = %creds.id(), rules = acl.grants().len(), "configuration reloaded");
            identity.update(creds);
            policy.update(Arc::new(acl));
        }
        Err(e) => error!(error = %e, "reload refused; keeping the running configuration"),
    }
}
