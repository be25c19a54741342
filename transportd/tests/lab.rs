//! netlab scenarios: the real `transportd` binaries on separate hosts (network namespaces
//! joined by a bridge), with a wire to sniff, links that drop and daemons that die. Each
//! scenario's lab keeps its captures, logs, configs and audit trail when it fails (netlab
//! prints where). Run as root: `cargo test -p transportd --test lab -- --ignored`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub, dead_code)] // Tests fail loudly.

mod common;
#[path = "lab/faults.rs"]
mod faults;
#[path = "lab/load.rs"]
mod load;
#[path = "lab/util.rs"]
mod util;
#[path = "lab/wire.rs"]
mod wire;
