//! Drivers that move frames over QUIC and over TLS/TCP.
//!
//! Both transports give the layers above the same thing: request streams that carry
//! [`Frame`]s in each direction. Over QUIC each request is its own QUIC stream; over TLS/TCP
//! the multiplexer in `transport/mux.rs` interleaves numbered streams on one connection.
//! Nothing above this module knows which transport it runs on, except for reporting.
//!
//! ```text
//!   client/server request logic
//!          │ FrameSink / FrameSource
//!   ┌──────┴───────────────┐
//!   │ quic.rs   │ mux.rs   │
//!   │ (quinn)   │ tcp.rs   │
//!   │           │ (tokio-  │
//!   │           │  rustls) │
//!   └───────────┴──────────┘
//! ```

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;

use crate::proto::frame::{HEADER_LEN, MAX_DATA_PAYLOAD};
use crate::proto::{ErrorCode, Frame, FrameError, FrameHeader, FrameKind};

pub(crate) mod mux;
pub(crate) mod quic;
pub mod rdma;
pub(crate) mod tcp;

/// Which transport carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// QUIC with mutual TLS 1.3.
    Quic,
    /// TLS 1.3 over TCP, for networks that block UDP.
    Tcp,
    /// RDMA for the bulk data (each chunk sealed with AES-256-GCM under keys from the TLS
    /// session), QUIC for control. Only transfers take this path; connections are QUIC.
    Rdma,
}

impl Path {
    /// A lower-case label: `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
            Self::Rdma => "rdma",
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Path {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            "rdma" => Ok(Self::Rdma),
            other => Err(format!("unknown path {other:?}: expected quic or tcp")),
        }
    }
}

/// Why a stream failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer reset or stopped the stream.
    #[error("stream reset by peer (code {0})")]
    Reset(u64),
    /// The peer sent bytes that are not a valid frame.
    #[error("peer sent an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// No progress for longer than the I/O timeout.
    #[error("no progress for {0:?}")]
    Timeout(Duration),
}

/// The sending half of a request stream.
#[derive(Debug)]
pub(crate) struct FrameSink {
    inner: SinkInner,
    timeout: Duration,
}

#[derive(Debug)]
enum SinkInner {
    Quic(quinn::SendStream),
    Mux(mux::MuxSink),
}

impl FrameSink {
    pub(crate) fn quic(send: quinn::SendStream, timeout: Duration) -> Self {
        Self {
            inner: SinkInner::Quic(send),
            timeout,
        }
    }

    pub(crate) fn mux(sink: mux::MuxSink, timeout: Duration) -> Self {
        Self {
            inner: SinkInner::Mux(sink),
            timeout,
        }
    }

    /// Sends one frame.
    pub(crate) async fn send(
        &mut self,
        kind: FrameKind,
        payload: Bytes,
    ) -> Result<(), StreamError> {
        let timeout = self.timeout;
        let fut = async {
            match &mut self.inner {
                SinkInner::Quic(s) => {
                    let header = FrameHeader {
                        len: payload_len(&payload)?,
                        kind,
                        stream: 0,
                    }
                    .encode()?;
                    let mut parts = [Bytes::copy_from_slice(&header), payload];
                    s.write_all_chunks(&mut parts)
                        .await
                        .map_err(quic::write_error)
                }
                SinkInner::Mux(s) => s.send(kind, payload).await,
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| StreamError::Timeout(timeout))?
    }

    /// Sends object bytes as `Data` frames of at most [`MAX_DATA_PAYLOAD`], without copying.
    pub(crate) async fn send_data(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA_PAYLOAD));
            self.send(FrameKind::Data, piece).await?;
        }
        Ok(())
    }

    /// Sends an `Error` frame.
    pub(crate) async fn send_error(&mut self, code: ErrorCode) -> Result<(), StreamError> {
        self.send(FrameKind::Error, code.encode()).await
    }

    /// Ends the sending side and waits (within the I/O timeout) until the peer has
    /// everything sent, so closing the connection afterwards loses nothing.
    pub(crate) async fn finish_delivered(&mut self) {
        match &mut self.inner {
            SinkInner::Quic(s) => {
                if s.finish().is_ok() {
                    let _ = tokio::time::timeout(self.timeout, s.stopped()).await;
                }
            }
            // The writer task sends queued frames before it closes the connection.
            SinkInner::Mux(_) => {}
        }
    }

    /// Ends the sending side cleanly.
    pub(crate) fn finish(&mut self) {
        match &mut self.inner {
            // Finishing a stream the peer already reset is not our problem.
            SinkInner::Quic(s) => {
                let _ = s.finish();
            }
            SinkInner::Mux(_) => {}
        }
    }
}

/// The receiving half of a request stream.
#[derive(Debug)]
pub(crate) struct FrameSource {
    inner: SourceInner,
    timeout: Duration,
}

#[derive(Debug)]
enum SourceInner {
    Quic(quinn::RecvStream),
    Mux(mux::MuxSource),
}

impl FrameSource {
    pub(crate) fn quic(recv: quinn::RecvStream, timeout: Duration) -> Self {
        Self {
            inner: SourceInner::Quic(recv),
            timeout,
        }
    }

    pub(crate) fn mux(source: mux::MuxSource, timeout: Duration) -> Self {
        Self {
            inner: SourceInner::Mux(source),
            timeout,
        }
    }

    /// The next frame; `None` when the peer ended the stream cleanly at a frame boundary.
    pub(crate) async fn recv(&mut self) -> Result<Option<Frame>, StreamError> {
        let timeout = self.timeout;
        let fut = async {
            match &mut self.inner {
                SourceInner::Quic(r) => quic_recv(r).await,
                SourceInner::Mux(m) => m.recv().await,
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| StreamError::Timeout(timeout))?
    }

    /// A frame that is already here, without waiting (to notice a cancel between sends).
    pub(crate) fn try_recv_cancel(&mut self) -> bool {
        match &mut self.inner {
            // QUIC signals cancellation with a STOP_SENDING, which fails our next write.
            SourceInner::Quic(_) => false,
            SourceInner::Mux(m) => m.try_recv_cancel(),
        }
    }
}

async fn quic_recv(r: &mut quinn::RecvStream) -> Result<Option<Frame>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]).await.map_err(quic::read_error)? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Incomplete.into()),
        }
    }
    let h = FrameHeader::decode(&header)?;
    let len = h.len as usize;
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        match r
            .read_chunk(len - payload.len(), true)
            .await
            .map_err(quic::read_error)?
        {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Incomplete.into()),
        }
    }
    Ok(Some(Frame::new(h.kind, h.stream, payload.freeze())))
}

fn payload_len(payload: &Bytes) -> Result<u32, StreamError> {
    u32::try_from(payload.len()).map_err(|_| {
        StreamError::Frame(FrameError::TooLarge {
            len: u32::MAX,
            max: crate::proto::frame::MAX_FRAME_PAYLOAD,
        })
    })
}

/// A request stream: both halves.
#[derive(Debug)]
pub(crate) struct RequestStream {
    pub(crate) sink: FrameSink,
    pub(crate) source: FrameSource,
}
