//! libtransport
#![deny(missing_docs)]
pub mod proto;
pub mod store;
