//! The SPIFFE Workload API: taking our identity from a local agent's Unix socket, and the
//! message encoding the node agent in `transportd` serves with.
//!
//! The Workload API is the standard way a process on a node gets its X.509-SVID: a gRPC
//! service (`SpiffeWorkloadAPI`, see `proto/workload.proto`) on a Unix socket whose address
//! the environment variable [`ENDPOINT_ENV`] names. SPIRE's agent serves it, and so does
//! `transportd node`; existing SPIFFE client libraries work with either.
//!
//! ```text
//!   agent ──FetchX509SVID (stream)──▶ WorkloadClient ──▶ X509Context { svids, bundle }
//!                                          │
//!   WorkloadIdentity: first SVID ──▶ IdentityHandle ◀── update on every rotation
//! ```
//!
//! * [`WorkloadClient`] connects to the socket and sends the `workload.spiffe.io: true`
//!   header the standard requires on every call; [`WorkloadClient::fetch_x509`] answers the
//!   current SVIDs, [`WorkloadClient::watch_x509`] every later change.
//! * [`WorkloadIdentity`] turns that into an [`IdentityHandle`](crate::IdentityHandle):
//!   it waits for the first SVID, then follows rotations in a background task (new
//!   handshakes use the newest SVID and bundle; open connections keep theirs), reconnecting
//!   with a capped backoff when the agent goes away.
//! * Decoding (`workload/codec.rs`) is bounded and never trusts a length beyond its buffer;
//!   the encoders are what the agent answers with. [`pb`] is the generated protocol code.
//!
//! What is not here: JWT-SVIDs (the agent answers `Unimplemented`), federated bundles and
//! CRLs (ignored when received), and TCP endpoints (refused: a Workload API on TCP cannot
//! attest its callers by kernel credentials).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use certs::SpiffeId;

use crate::identity::IdentityError;

mod client;
mod codec;
mod source;

pub use client::{BundleUpdates, WorkloadClient, X509Updates, channel};
pub use codec::{
    DerError, EncodeError, MalformedAnswer, X509Context, decode_bundles_response,
    decode_x509_response, encode_bundles_response, encode_x509_response, encode_x509_svid,
    split_der,
};
pub use source::WorkloadIdentity;

/// The protocol, generated at build time from `proto/workload.proto` (tonic and prost).
///
/// [`pb::X509svid`] and [`pb::Jwtsvid`] carry a private key and a bearer token; their
/// `Debug` shows lengths only.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::use_self
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The environment variable that names the Workload API socket (`unix:///path`).
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The gRPC metadata key every Workload API call must carry, with the value
/// [`SECURITY_HEADER_VALUE`]: a server-side request forgery cannot add it.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The only accepted value of [`SECURITY_HEADER`] (case sensitive).
pub const SECURITY_HEADER_VALUE: &str = "true";

/// Largest Workload API message either side accepts. An answer holds a few SVIDs and
/// bundles of a few KiB each; 4 MiB leaves room for many CAs and long chains while keeping
/// a misbehaving peer from making us buffer more.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Most SVIDs accepted in one answer (one per registration entry the caller matches).
pub const MAX_SVIDS: usize = 64;

/// Most trust domains accepted in one bundles answer.
pub const MAX_BUNDLES: usize = 64;

/// The socket path an endpoint value names: `unix:///run/x.sock` or `unix:/run/x.sock`
/// (RFC 3986; percent-escapes are decoded). Anything else is refused with the reason: TCP
/// endpoints (`tcp://127.0.0.1:8081`), a host (`unix://host/x`), a relative path, a query or
/// a fragment.
pub fn endpoint_path(value: &str) -> Result<PathBuf, WorkloadError> {
    let bad = |reason: &str| WorkloadError::Endpoint {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let Some((scheme, rest)) = value.split_once(':') else {
        return Err(if value.starts_with('/') {
            bad("a bare path; write it as unix://<path>")
        } else {
            bad("expected unix:///absolute/path/to/socket")
        });
    };
    if scheme.eq_ignore_ascii_case("tcp") {
        return Err(bad(
            "TCP endpoints are not supported: the Workload API attests callers by their Unix \
             socket credentials; use unix:///path/to/socket",
        ));
    }
    if !scheme.eq_ignore_ascii_case("unix") {
        return Err(bad(
            "unknown scheme; expected unix:///absolute/path/to/socket",
        ));
    }
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(_) => {
            return Err(bad(
                "a unix endpoint names no host; write unix:///path (three slashes)",
            ));
        }
        None => rest,
    };
    if path.contains(['?', '#']) {
        return Err(bad("a unix endpoint has no query or fragment"));
    }
    if !path.starts_with('/') {
        return Err(bad("the socket path must be absolute"));
    }
    let bytes = percent_decode(path).ok_or_else(|| bad("malformed percent-escape in the path"))?;
    if bytes.contains(&0) {
        return Err(bad("the socket path contains a NUL byte"));
    }
    if bytes.len() > MAX_SOCKET_PATH {
        return Err(bad(
            "the socket path is longer than a Unix socket address allows (107 bytes)",
        ));
    }
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

/// The socket [`ENDPOINT_ENV`] names in this process's environment.
pub fn endpoint_from_env() -> Result<PathBuf, WorkloadError> {
    match std::env::var(ENDPOINT_ENV) {
        Ok(v) => endpoint_path(&v),
        Err(std::env::VarError::NotPresent) => Err(WorkloadError::NoEndpoint),
        Err(std::env::VarError::NotUnicode(_)) => Err(WorkloadError::Endpoint {
            value: String::from("(not UTF-8)"),
            reason: "not valid UTF-8".into(),
        }),
    }
}

/// Why the Workload API did not give us an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The endpoint value is not a Unix socket address we can use.
    #[error("workload API endpoint {value:?}: {reason}")]
    Endpoint {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// [`ENDPOINT_ENV`] is not set.
    #[error(
        "{ENDPOINT_ENV} is not set; give the Workload API socket, e.g. unix:///run/transportd/workload.sock"
    )]
    NoEndpoint,
    /// Nothing answers on the socket, the connection broke, or the agent cannot serve now
    /// (gRPC `Unavailable`). Worth retrying with a backoff.
    #[error("workload API at {path} is unreachable: {reason}", path = path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The agent has no identity for this process (gRPC `PermissionDenied`): no
    /// registration entry matches its user, group or executable, or it cannot be attested.
    #[error("workload API issued no identity to this process: {0}")]
    PermissionDenied(String),
    /// The agent refused the request as malformed (gRPC `InvalidArgument`); retrying will
    /// not help.
    #[error("workload API refused the request as invalid: {0}")]
    InvalidArgument(String),
    /// Another gRPC failure.
    #[error("workload API failed ({code:?}): {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The agent's message, shortened and stripped of control characters.
        message: String,
    },
    /// The answer broke the protocol or carried unusable certificates or keys.
    #[error("malformed workload API answer: {0}")]
    Malformed(#[from] MalformedAnswer),
    /// The agent ended the stream.
    #[error("workload API closed the stream")]
    Closed,
    /// The SPIFFE ID asked for is not among those the agent offers this process.
    #[error("workload API offers no SVID for {want} (it offers {offered})")]
    NotOffered {
        /// The ID asked for.
        want: SpiffeId,
        /// The IDs offered, comma separated.
        offered: String,
    },
    /// The SVID and bundle could not become TLS credentials.
    #[error("workload API SVID cannot be used: {0}")]
    Credentials(#[from] IdentityError),
}

impl WorkloadError {
    /// Whether waiting and asking again may succeed: the agent was unreachable, had no
    /// identity for us yet (entries can arrive later), or closed the stream.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::PermissionDenied(_) | Self::Closed
        )
    }
}

/// `%XX` escapes to bytes; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hi = char::from(hex[0]).to_digit(16)?;
            let lo = char::from(hex[1]).to_digit(16)?;
            // Two hex digits: at most 255.
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Longest socket path `sun_path` holds (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_endpoints_parse_in_both_forms() {
        for v in [
            "unix:///run/x.sock",
            "unix:/run/x.sock",
            "UNIX:///run/x.sock",
        ] {
            assert_eq!(
                endpoint_path(v).unwrap(),
                PathBuf::from("/run/x.sock"),
                "{v}"
            );
        }
        assert_eq!(
            endpoint_path("unix:///run/a%20b.sock").unwrap(),
            PathBuf::from("/run/a b.sock")
        );
    }

    #[test]
    fn other_endpoints_are_refused_with_a_reason() {
        let cases = [
            ("tcp://127.0.0.1:8081", "TCP endpoints are not supported"),
            ("tcp:127.0.0.1:8081", "TCP endpoints are not supported"),
            ("http://x/y", "unknown scheme"),
            ("unix://host/run/x.sock", "names no host"),
            ("unix:run/x.sock", "must be absolute"),
            ("unix:", "must be absolute"),
            ("unix:///run/x.sock?x=1", "no query or fragment"),
            ("unix:///run/x.sock#f", "no query or fragment"),
            ("unix:///run/%zz", "percent-escape"),
            ("unix:///run/%0", "percent-escape"),
            ("unix:///run/%00x", "NUL"),
            ("/run/x.sock", "write it as unix://"),
            ("", "expected unix:///"),
        ];
        for (v, want) in cases {
            let e = endpoint_path(v).unwrap_err();
            assert!(matches!(e, WorkloadError::Endpoint { .. }), "{v}");
            assert!(e.to_string().contains(want), "{v}: {e}");
        }
        let long = format!("unix:///{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(
            endpoint_path(&long)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
        let fits = format!("unix:///{}", "a".repeat(MAX_SOCKET_PATH - 1));
        assert!(endpoint_path(&fits).is_ok());
    }

    #[test]
    fn secret_carrying_messages_debug_without_the_secret() {
        let m = pb::X509svid {
            spiffe_id: "spiffe://td/w".into(),
            x509_svid: vec![1; 10],
            x509_svid_key: b"SECRETKEYBYTES".to_vec(),
            bundle: vec![2; 3],
            hint: String::new(),
        };
        let s = format!("{m:?}");
        assert!(s.contains("spiffe://td/w") && s.contains("14"), "{s}");
        assert!(!s.contains("83, 69, 67") && !s.contains("SECRET"), "{s}");
        let j = pb::Jwtsvid {
            spiffe_id: "spiffe://td/w".into(),
            svid: "eyJ.secret.token".into(),
            hint: String::new(),
        };
        assert!(!format!("{j:?}").contains("secret"));
    }
}
