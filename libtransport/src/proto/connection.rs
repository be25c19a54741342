//! The connection's opening, without I/O: the client's `Hello`, the server's answer (the
//! version both speak and the limits it enforces), and what the client makes of it.
//!
//! Every transport runs this exchange right after its handshake has authenticated the
//! peer, at the point its framing allows (QUIC: on the first stream; TLS/TCP: as stream 0
//! before the multiplexer starts), so the rules live here once:
//!
//! 1. the client sends [`hello_frame`];
//! 2. the server hands what arrived to [`ServerHello::answer`] and sends the frame it gets
//!    back, if any; it goes on serving only if that answer accepted the hello;
//! 3. the client hands the answer to [`handle_answer`], which yields the server's
//!    [`HelloAck`] or says why the connection is of no use.
//!
//! Once open, the server keeps the connection's open transfers in a [`TransferTable`].

use crate::proto::message::PROTOCOL_VERSION;
use crate::proto::{DecodeError, ErrorCode, Frame, FrameKind, Hello, HelloAck};

mod table;

pub use table::{TableError, TransferTable};

/// The client's first frame on a fresh connection.
pub fn hello_frame() -> Frame {
    Frame::new(FrameKind::Hello, 0, Hello::current().encode())
}

/// What the client makes of the server's answer to its hello.
pub fn handle_answer(frame: &Frame) -> Result<HelloAck, HelloError> {
    match frame.kind {
        FrameKind::HelloAck => {
            let ack = HelloAck::decode(&frame.payload).map_err(HelloError::Malformed)?;
            if ack.version != PROTOCOL_VERSION {
                return Err(HelloError::Version);
            }
            Ok(ack)
        }
        FrameKind::Error => match ErrorCode::decode(&frame.payload) {
            Ok(ErrorCode::Busy) => Err(HelloError::Busy),
            Ok(ErrorCode::Version) => Err(HelloError::Version),
            Ok(other) => Err(HelloError::Refused(other)),
            Err(e) => Err(HelloError::Malformed(e)),
        },
        kind => Err(HelloError::Unexpected(kind)),
    }
}

/// Why a hello did not open a usable connection, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// The server is at its connection limit.
    #[error("the node is at its connection limit")]
    Busy,
    /// The server speaks no version we speak, or chose one we do not.
    #[error("no protocol version in common")]
    Version,
    /// The server refused for another reason.
    #[error("server refused: {}", .0.describe())]
    Refused(ErrorCode),
    /// The answer did not decode.
    #[error("malformed hello answer: {0}")]
    Malformed(DecodeError),
    /// The server answered with a frame that is no answer to a hello.
    #[error("unexpected {0:?} frame instead of hello answer")]
    Unexpected(FrameKind),
}

/// The server's side of the hello: the limits it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// Requests it runs at once on a connection.
    pub max_streams: u32,
    /// Transfers a connection may hold open.
    pub max_transfers: u32,
    /// The chunk size of its store.
    pub chunk_bytes: u32,
}

impl ServerHello {
    /// The answer to the client's first frame, and whether it accepted the hello (the
    /// server serves the connection only then; otherwise it sends the answer and closes).
    pub fn answer(&self, first: &Frame) -> HelloAnswer {
        if first.kind != FrameKind::Hello || first.stream != 0 {
            return HelloAnswer::NotAHello;
        }
        // A hello we cannot read is from a version we do not know.
        match Hello::decode(&first.payload)
            .ok()
            .and_then(|h| h.negotiate())
        {
            Some(version) => {
                let ack = HelloAck {
                    version,
                    max_streams: self.max_streams,
                    max_transfers: self.max_transfers,
                    chunk_bytes: self.chunk_bytes,
                };
                HelloAnswer::Accepted {
                    frame: Frame::new(FrameKind::HelloAck, 0, ack.encode()),
                    ack,
                }
            }
            None => HelloAnswer::Version {
                frame: error_frame(ErrorCode::Version),
            },
        }
    }

    /// The answer for a client that is to be turned away because the server is full.
    pub fn busy() -> Frame {
        error_frame(ErrorCode::Busy)
    }
}

/// What the server answers to a client's first frame.
#[derive(Debug, Clone)]
pub enum HelloAnswer {
    /// A version in common: send `frame` and serve the connection with these limits.
    Accepted {
        /// The `HelloAck` to send.
        frame: Frame,
        /// What it says.
        ack: HelloAck,
    },
    /// No version in common: send `frame`, then close.
    Version {
        /// The `Error` frame to send.
        frame: Frame,
    },
    /// The first frame was no hello on stream 0: close without an answer.
    NotAHello,
}

impl HelloAnswer {
    /// The frame to send back, if any.
    pub fn frame(&self) -> Option<&Frame> {
        match self {
            Self::Accepted { frame, .. } | Self::Version { frame } => Some(frame),
            Self::NotAHello => None,
        }
    }

    /// Whether the connection goes on.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }
}

fn error_frame(code: ErrorCode) -> Frame {
    Frame::new(FrameKind::Error, 0, code.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ServerHello = ServerHello {
        max_streams: 16,
        max_transfers: 4,
        chunk_bytes: 1 << 20,
    };

    #[test]
    fn a_current_hello_is_accepted_with_the_servers_limits() {
        let answer = LIMITS.answer(&hello_frame());
        assert!(answer.is_accepted());
        let ack = handle_answer(answer.frame().unwrap()).unwrap();
        assert_eq!(ack.version, PROTOCOL_VERSION);
        assert_eq!(
            (ack.max_streams, ack.max_transfers, ack.chunk_bytes),
            (16, 4, 1 << 20)
        );
    }

    #[test]
    fn a_hello_of_other_versions_is_refused_and_the_client_says_version() {
        let future = Hello {
            min_version: 7,
            max_version: 9,
        };
        let answer = LIMITS.answer(&Frame::new(FrameKind::Hello, 0, future.encode()));
        let HelloAnswer::Version { frame } = &answer else {
            panic!("accepted a hello of versions 7 to 9");
        };
        assert_eq!(handle_answer(frame), Err(HelloError::Version));
        // A hello that does not decode is from a version we do not know.
        let garbage = Frame::new(FrameKind::Hello, 0, bytes::Bytes::from_static(b"HTTP/1.1"));
        assert!(matches!(
            LIMITS.answer(&garbage),
            HelloAnswer::Version { .. }
        ));
        // An ack naming a version we do not speak is as bad.
        let odd = HelloAck {
            version: PROTOCOL_VERSION + 1,
            max_streams: 1,
            max_transfers: 1,
            chunk_bytes: 1 << 20,
        };
        let frame = Frame::new(FrameKind::HelloAck, 0, odd.encode());
        assert_eq!(handle_answer(&frame), Err(HelloError::Version));
    }

    #[test]
    fn anything_but_a_hello_on_stream_zero_goes_unanswered() {
        let request = Frame::new(FrameKind::Request, 0, Hello::current().encode());
        let on_stream_one = Frame::new(FrameKind::Hello, 1, Hello::current().encode());
        for first in [request, on_stream_one] {
            let answer = LIMITS.answer(&first);
            assert!(!answer.is_accepted(), "{first:?} accepted");
            assert!(answer.frame().is_none(), "{first:?} answered");
        }
    }

    #[test]
    fn the_client_tells_busy_refusals_and_nonsense_apart() {
        assert_eq!(handle_answer(&ServerHello::busy()), Err(HelloError::Busy));
        let denied = error_frame(ErrorCode::AuditUnavailable);
        assert_eq!(
            handle_answer(&denied),
            Err(HelloError::Refused(ErrorCode::AuditUnavailable))
        );
        let data = Frame::new(FrameKind::Data, 0, bytes::Bytes::new());
        assert_eq!(
            handle_answer(&data),
            Err(HelloError::Unexpected(FrameKind::Data))
        );
        let short = Frame::new(FrameKind::HelloAck, 0, bytes::Bytes::from_static(b"\x00"));
        assert!(matches!(
            handle_answer(&short),
            Err(HelloError::Malformed(_))
        ));
    }
}
