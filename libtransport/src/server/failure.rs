//! Why a request did not complete, and the codes the peer is told.

use crate::proto::ErrorCode;
use crate::store::StoreError;
use crate::transport::StreamError;

/// Why a request did not complete.
pub(crate) enum Failure {
    /// Tell the peer.
    Code(ErrorCode),
    /// The stream itself is gone; nothing to tell.
    Stream(StreamError),
}

impl From<ErrorCode> for Failure {
    fn from(c: ErrorCode) -> Self {
        Self::Code(c)
    }
}

impl From<StreamError> for Failure {
    /// A frame the peer got wrong is answered with a code; a broken stream is not.
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Frame(f) => Self::Code(f.code()),
            other => Self::Stream(other),
        }
    }
}

/// The code a store failure answers with; one the peer need not know of is logged.
pub(crate) fn store_code(e: StoreError) -> ErrorCode {
    match e {
        StoreError::NotFound => ErrorCode::NotFound,
        StoreError::Conflict => ErrorCode::Conflict,
        StoreError::Corrupt => ErrorCode::Corrupt,
        StoreError::Manifest(_) => ErrorCode::TooLarge,
        // Can never fit: the same code as any other limit the request exceeds.
        StoreError::OverQuota { .. } => ErrorCode::TooLarge,
        // Does not fit now: like a full disk, it may once space is given back.
        StoreError::QuotaFull { .. } => ErrorCode::NoSpace,
        StoreError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => ErrorCode::NoSpace,
        other => {
            tracing::warn!(error = %other, "store failure");
            ErrorCode::Internal
        }
    }
}
