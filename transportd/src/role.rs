//! The daemon's long-running roles.

pub(crate) mod node;
pub(crate) mod agent;
pub(crate) mod issuer;
