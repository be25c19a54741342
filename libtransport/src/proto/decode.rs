//! Why a message payload could not be decoded: shared by the request/response messages
//! (`message.rs`) and the RDMA control messages (`rdma.rs`).

use super::manifest::ManifestError;
use super::name::NameError;

/// Why a payload could not be decoded. Every variant means the bytes are wrong (a frame
/// payload is always complete), so the peer misbehaved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload ended early.
    #[error("message is truncated")]
    Truncated,
    /// Bytes were left after the message.
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
    /// An unknown tag or variant.
    #[error("unknown tag {0}")]
    Tag(u8),
    /// The hello does not start with our magic.
    #[error("hello does not carry the transportd magic")]
    Magic,
    /// A string was not UTF-8.
    #[error("string is not UTF-8")]
    Utf8,
    /// A string or list longer than allowed.
    #[error("field of {len} exceeds the limit of {max}")]
    TooLong {
        /// Claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An invalid dataset name or object path.
    #[error("invalid name: {0}")]
    Name(#[from] NameError),
    /// An invalid manifest or chunk set.
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
}
