//! The daemon's long-running roles.

pub(crate) mod node;
