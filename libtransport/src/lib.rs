//! libtransport
