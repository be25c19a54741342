//! Reading what a server answers on a request stream: one response, a read's data frames,
//! and the errors both may carry.

use bytes::Bytes;

use crate::error::{ProtocolViolation, RequestError};
use crate::proto::{ErrorCode, Frame, FrameKind, Response};
use crate::transport::FrameSource;

/// Reads one `Response` (or `Error`) frame.
pub(crate) async fn response(source: &mut FrameSource) -> Result<Response, RequestError> {
    let frame = source
        .recv()
        .await?
        .ok_or(RequestError::Protocol(ProtocolViolation::NoResponse))?;
    match frame.kind {
        FrameKind::Response => Response::decode(&frame.payload)
            .map_err(|e| RequestError::Protocol(ProtocolViolation::Decode(e))),
        FrameKind::Error => Err(remote(&frame)),
        k => Err(RequestError::Protocol(ProtocolViolation::UnexpectedFrame(
            k,
        ))),
    }
}

/// The error an `Error` frame carries.
fn remote(frame: &Frame) -> RequestError {
    match ErrorCode::decode(&frame.payload) {
        Ok(code) => RequestError::Remote(code),
        Err(e) => RequestError::Protocol(ProtocolViolation::MalformedError(e)),
    }
}

/// A response the request does not take.
pub(super) fn unexpected(r: &Response) -> RequestError {
    RequestError::Protocol(ProtocolViolation::UnexpectedResponse(
        std::mem::discriminant(r),
    ))
}

/// Reads one `Data` frame of a read: `None` at its `End`.
pub(super) async fn next_data(source: &mut FrameSource) -> Result<Option<Bytes>, RequestError> {
    let frame = source
        .recv()
        .await?
        .ok_or(RequestError::Protocol(ProtocolViolation::StreamEndedEarly))?;
    match frame.kind {
        FrameKind::Data => Ok(Some(frame.payload)),
        FrameKind::End => Ok(None),
        FrameKind::Error => Err(remote(&frame)),
        k => Err(RequestError::Protocol(ProtocolViolation::UnexpectedFrame(
            k,
        ))),
    }
}
