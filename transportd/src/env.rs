//! Environment variables the daemon and its commands read, in one place.

/// Log filter (tracing env-filter syntax), e.g. `info` or `libtransport=debug`.
pub(crate) const LOG: &str = "TRANSPORTD_LOG";
/// Log format: `plain` (default) or `json`.
pub(crate) const LOG_FORMAT: &str = "TRANSPORTD_LOG_FORMAT";
/// Colour in plain logs: `auto` (default: only when stderr is a terminal and `NO_COLOR` is
/// unset), `always` or `never`.
pub(crate) const LOG_COLOR: &str = "TRANSPORTD_LOG_COLOR";
/// The informal standard's switch (<https://no-color.org>): set and not empty, no colour
/// under `auto`.
pub(crate) const NO_COLOR: &str = "NO_COLOR";
/// Certificate chain (leaf first) of the SVID client commands present.
pub(crate) const SVID: &str = "TRANSPORTD_SVID";
/// Private key of that SVID.
pub(crate) const KEY: &str = "TRANSPORTD_KEY";
/// Trust bundle client commands verify servers against.
pub(crate) const BUNDLE: &str = "TRANSPORTD_BUNDLE";
/// Directory holding svid.pem, svid.key and bundle.pem.
pub(crate) const IDENTITY_DIR: &str = "TRANSPORTD_IDENTITY";
/// The SPIFFE Workload API socket (`unix:///path`), the standard's own variable: the
/// default of `workload fetch --socket`.
pub(crate) const SPIFFE_ENDPOINT_SOCKET: &str = libtransport::workload::ENDPOINT_ENV;
/// A join token for the node agent, when the configuration names no token file.
pub(crate) const JOIN_TOKEN: &str = "TRANSPORTD_JOIN_TOKEN";
/// The sidecar's socket: client commands go through the node's sidecar when it is set.
pub(crate) const SIDECAR_SOCKET: &str = libtransport::sidecar::SOCKET_ENV;
