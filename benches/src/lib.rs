//! transport-bench: measures what security costs by running the plaintext baseline, TLS/TCP
//! and QUIC/mTLS over the same workload, on the same machine, in one invocation.
//!
//! Every mode moves the same object through the same protocol, store and client code; only
//! the transport underneath differs. The plaintext baseline exists only here
//! ([`plaintext`], a plug-in transport of libtransport's); the daemon cannot run without
//! TLS. So does `rdma-soft`'s unsealed baseline ([`rdma_plain`], a bare loop over two
//! software RDMA devices): the library always seals RDMA chunks.

#![forbid(unsafe_code)]
// A benchmark reads the clock directly; the product injects it.
#![allow(clippy::disallowed_methods)]

pub mod bare;
pub mod chart;
pub mod host;
pub mod lab;
pub mod mode;
pub mod outcome;
pub mod plaintext;
pub mod rdma_plain;
pub mod report;
pub mod setup;
pub mod sidecar;
pub mod stats;
