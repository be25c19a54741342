//! libtransport: move datasets between nodes that know each other only by SPIFFE identity,
//! encrypted, mutually authenticated, and verified end to end.
//!
//! ```text
//!   data loader ── Client ──┐                          ┌── Server ── Store (datasets)
//!                           │  QUIC + mTLS (TLS 1.3)   │      │
//!                           ├──────────────────────────┤   Authorizer (default deny)
//!                           │  or TLS 1.3 over TCP     │      │
//!   SVID + trust bundle ────┘  chunks, BLAKE3-verified └── AuditSink
//! ```
//!
//! * Identity: an [`identity::IdentityHandle`] holds our X.509-SVID and the trust bundle;
//!   both TLS sides verify the peer's SVID with [`certs::TrustBundle::verify`], and the
//!   peer's SPIFFE ID is the identity every decision uses.
//! * Wire protocol ([`proto`]): versioned, bounded frames; pure code without I/O.
//! * Transfers: objects move in chunks listed with their BLAKE3 hashes in a
//!   [`proto::Manifest`]; the receiver verifies every chunk before it counts and makes the
//!   object visible only when complete (temporary file, fsync, atomic rename). A rerun
//!   resumes from the verified chunks.
//!
//! Quick start (a data loader pulling a shard):
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use libtransport::{Client, ClientConfig, Credentials, IdentityHandle, Path};
//! use libtransport::proto::{DatasetName, ObjectPath};
//!
//! let svid = certs::Svid::from_pem(
//!     &std::fs::read_to_string("svid.pem")?,
//!     &std::fs::read_to_string("svid.key")?,
//! )?;
//! let bundle = certs::TrustBundle::from_pem(&std::fs::read_to_string("bundle.pem")?)?;
//! let identity = IdentityHandle::new(Credentials::new(svid, bundle)?);
//! let config = ClientConfig::builder().identity(identity).build();
//! let client = Client::connect(config, "10.0.0.5:7443".parse()?, Path::Quic).await?;
//! let shard = client
//!     .fetch(&DatasetName::new("scans")?, &ObjectPath::new("train/shard-0001.bin")?,
//!            1 << 30, &Default::default())
//!     .await?;
//! println!("{} verified bytes", shard.len());
//! # Ok(()) }
//! ```
//!
//! A small blocking facade lives in [`blocking`]. To take the SVID from a SPIFFE Workload
//! API (SPIRE's agent, or `transportd node`) rather than from files, and follow its
//! rotations, use [`workload::WorkloadIdentity`].

#![deny(missing_docs)]

pub mod audit;
pub mod blocking;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod server;
pub mod sidecar;
pub mod store;
pub mod tls;
pub mod transport;
mod vocab;
pub mod workload;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use client::{
    Client, FetchOptions, FetchReport, PushOptions, PushReport, QuicPathStats, RetryPolicy,
    TransferOptions, default_stripes,
};
pub use config::{
    AddressValidation, ClientConfig, PolicyHandle, RdmaMode, ServerConfig, TransportConfig,
};
pub use error::{ConnectError, FetchError, PushError, Rejection, RequestError};
pub use identity::{Credentials, IdentityHandle, Peer};
pub use server::{Server, ServerHandle};
pub use transport::{Path, TransferPath};
