//! The fuzzing entry point for `transportd`'s node configuration parser. transportd is a
//! binary crate with no library to call into, so its `config` module (with `config/file.rs`)
//! is compiled here from `../src`, unchanged, and [`node_config`] feeds it.

use std::path::Path;

use libtransport::proto::Digest;
use libtransport::proto::manifest::{MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};

#[path = "../../src"]
#[allow(dead_code, unused_imports, unreachable_pub)] // Only `NodeConfig::parse` is exercised.
mod daemon {
    pub(crate) mod config;
}

use daemon::config::NodeConfig;

/// `NodeConfig::parse` on UTF-8 text. An accepted configuration listens somewhere, resolves
/// every path against the base directory, carries the digest of its exact text and a chunk
/// size manifests accept.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/etc/transportd");
    let Ok(c) = NodeConfig::parse(text, base) else {
        return;
    };
    assert!(c.quic.is_some() || c.tcp.is_some());
    for p in [
        &c.identity.svid,
        &c.identity.key,
        &c.identity.bundle,
        &c.store_root,
        &c.audit.dir,
    ] {
        assert!(p.is_absolute(), "{} is relative", p.display());
    }
    assert_eq!(c.digest, Digest::of(text.as_bytes()));
    assert!(c.chunk_bytes.is_power_of_two());
    assert!((MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&c.chunk_bytes));
    assert!(!c.audit.checkpoint_interval.is_zero());
}
