//! The fuzzing entry points for `transportd`'s configuration parsers (node and issuer).
//! transportd is a binary crate with no library to call into, so its `config` module (with
//! `config/file.rs` and `config/issuer.rs`) and the `env` names it uses are compiled here
//! from `../src`, unchanged, and [`node_config`] and [`issuer_config`] feed them.

use std::path::Path;

use libtransport::proto::Digest;
use libtransport::proto::manifest::{MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};

#[path = "../../src"]
#[allow(dead_code, unused_imports, unreachable_pub)] // Only `NodeConfig::parse` is exercised.
mod daemon {
    pub(crate) mod config;
}

/// The daemon's `crate::env`, which its config module names.
#[path = "../../src/env.rs"]
#[allow(dead_code, unreachable_pub)]
mod env;

use daemon::config::issuer::IssuerConfig;
use daemon::config::{IdentitySource, NodeConfig};

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
    let mut paths = vec![&c.store_root, &c.audit.dir];
    match &c.identity {
        IdentitySource::Files(i) => paths.extend([&i.svid, &i.key, &i.bundle]),
        IdentitySource::Agent(a) => {
            assert!(a.issuer.contains(':'));
            paths.extend([&a.bundle, &a.data_dir]);
            paths.extend(a.workload_socket.as_ref());
        }
    }
    for p in paths {
        assert!(p.is_absolute(), "{} is relative", p.display());
    }
    assert_eq!(c.digest, Digest::of(text.as_bytes()));
    assert!(c.chunk_bytes.is_power_of_two());
    assert!((MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&c.chunk_bytes));
    assert!(!c.audit.checkpoint_interval.is_zero());
}

/// `IssuerConfig::parse` on UTF-8 text. An accepted configuration keeps the SVID lifetime at
/// most a sixth of the CA's, syncs at least four times per SVID lifetime, and resolves
/// every path against the base directory.
pub fn issuer_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = IssuerConfig::parse(text, Path::new("/etc/transportd")) else {
        return;
    };
    assert!(c.svid_ttl * 6 <= c.ca_ttl, "{:?} vs {:?}", c.svid_ttl, c.ca_ttl);
    assert!(!c.sync_interval.is_zero() && c.sync_interval * 4 <= c.svid_ttl);
    for p in [&c.data_dir, &c.admin_socket, &c.audit.dir] {
        assert!(p.is_absolute(), "{} is relative", p.display());
    }
    assert!(c.db_path().starts_with(&c.data_dir));
}
