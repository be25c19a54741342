//! SPIFFE-style identities for transportd.
//!
//! This crate owns the identity types every other crate uses: [`SpiffeId`] and [`TrustDomain`].
//! It holds no I/O and reads no clock: every check that depends on time takes `now`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod id;

pub use id::{IdError, SpiffeId, TrustDomain};
