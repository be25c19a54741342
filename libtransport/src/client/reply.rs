//! Reading what a server answers on a request stream: one response, a read's data frames,
//! and the errors both may carry.

use bytes::Bytes;

use crate::error::{ProtocolViolation, RequestError};
use crate::proto::{ErrorCode, Frame, FrameKind, Response};
use crate::transport::{FrameSource, Received};

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

/// What [`next_data_into`] read.
pub(super) enum Landed {
    /// A `Data` frame's payload, this many bytes, is at the start of the buffer.
    Data(usize),
    /// A `Data` frame longer than the buffer (more than the chunk holds) came.
    TooLong,
    /// The read's `End`.
    End,
}

/// Reads one `Data` frame of a read into the start of `dest`.
pub(super) async fn next_data_into(
    source: &mut FrameSource,
    dest: &mut [u8],
) -> Result<Landed, RequestError> {
    let frame = match source
        .recv_into(dest)
        .await?
        .ok_or(RequestError::Protocol(ProtocolViolation::StreamEndedEarly))?
    {
        Received::Data(n) => return Ok(Landed::Data(n)),
        Received::Frame(f) => f,
    };
    match frame.kind {
        FrameKind::Data => Ok(Landed::TooLong),
        FrameKind::End => Ok(Landed::End),
        FrameKind::Error => Err(remote(&frame)),
        k => Err(RequestError::Protocol(ProtocolViolation::UnexpectedFrame(
            k,
        ))),
    }
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
