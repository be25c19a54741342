//! The daemon's long-running roles.

pub(crate) mod agent;
pub(crate) mod issuer;
pub(crate) mod node;
pub(crate) mod sidecar;
pub(crate) mod witness;
