//! Wire frames: a fixed 12-byte header and a bounded payload.
//!
//! ```text
//!  0               4       5       6               8               12
//! +---------------+-------+-------+---------------+---------------+----------------
//! | payload len   | kind  | flags | reserved (0)  | stream        | payload ...
//! | u32 BE        | u8    | u8=0  | u16 BE        | u32 BE        | len bytes
//! +---------------+-------+-------+---------------+---------------+----------------
//! ```
//!
//! The length is checked against [`MAX_FRAME_PAYLOAD`] before anything is allocated, so a
//! peer that claims a 4 GiB frame gets an error, not a 4 GiB buffer. Decoding tells
//! "need more bytes" ([`FrameError::Incomplete`]) apart from "these bytes are wrong"
//! (every other variant). No I/O here; drivers read the header and payload themselves.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::message::ErrorCode;

/// One frame: kind, the stream it belongs to, and its payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload holds.
    pub kind: FrameKind,
    /// The logical stream. Over TLS/TCP it multiplexes requests on one connection; over
    /// QUIC each request has its own QUIC stream and this is 0. Stream 0 is the connection.
    pub stream: u32,
    /// The payload; its meaning depends on `kind`.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `kind` on `stream` carrying `payload`.
    pub fn new(kind: FrameKind, stream: u32, payload: Bytes) -> Self {
        Self {
            kind,
            stream,
            payload,
        }
    }

    /// The header for this frame.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            // Payload lengths are bounded by MAX_FRAME_PAYLOAD when frames are built for
            // sending (see `encode_header`), which fits in u32.
            len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
            kind: self.kind,
            stream: self.stream,
        }
    }

    /// The number of bytes this frame occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends header and payload to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let header = self.header().encode()?;
        out.reserve(self.encoded_len());
        out.put_slice(&header);
        out.put_slice(&self.payload);
        Ok(())
    }

    /// Decodes one frame from the front of `buf`, consuming it.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold a whole frame; nothing is consumed then.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, FrameError> {
        let header = match FrameHeader::decode(buf) {
            Ok(h) => h,
            Err(FrameError::Incomplete) => return Ok(None),
            Err(e) => return Err(e),
        };
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(header.len as usize).freeze();
        Ok(Some(Self::new(header.kind, header.stream, payload)))
    }
}

impl std::fmt::Debug for Frame {
    // Payload bytes may be dataset contents: show only their length.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("stream", &self.stream)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// Frame kind.
    pub kind: FrameKind,
    /// Logical stream.
    pub stream: u32,
}

impl FrameHeader {
    /// Encodes the header; refuses a payload longer than [`MAX_FRAME_PAYLOAD`].
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        if self.len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge {
                len: self.len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_be_bytes());
        out[4] = self.kind as u8;
        out[8..12].copy_from_slice(&self.stream.to_be_bytes());
        Ok(out)
    }

    /// Decodes a header from the first [`HEADER_LEN`] bytes of `buf` without consuming it.
    pub fn decode(buf: &[u8]) -> Result<Self, FrameError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Err(FrameError::Incomplete);
        };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let kind = FrameKind::from_u8(h[4]).ok_or(FrameError::UnknownKind(h[4]))?;
        if h[5] != 0 {
            return Err(FrameError::Flags(h[5]));
        }
        if h[6] != 0 || h[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let stream = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        Ok(Self { len, kind, stream })
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client's opening message (stream 0): versions it speaks.
    Hello = 0x01,
    /// Server's answer to `Hello`: the chosen version and its limits.
    HelloAck = 0x02,
    /// The sender will start no new streams and asks the peer to finish up.
    GoAway = 0x03,
    /// A request; opens a stream.
    Request = 0x10,
    /// A successful response header.
    Response = 0x11,
    /// Raw object bytes belonging to the stream's request or response.
    Data = 0x12,
    /// The end of a stream's data.
    End = 0x13,
    /// The request failed; carries an error code and closes the stream.
    Error = 0x14,
    /// The client abandons a stream (TLS/TCP only; QUIC resets the stream instead).
    Cancel = 0x15,
}

impl FrameKind {
    /// Maps a wire byte to a kind.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::HelloAck,
            0x03 => Self::GoAway,
            0x10 => Self::Request,
            0x11 => Self::Response,
            0x12 => Self::Data,
            0x13 => Self::End,
            0x14 => Self::Error,
            0x15 => Self::Cancel,
            _ => return None,
        })
    }
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes are needed; not an error in the bytes themselves.
    #[error("incomplete frame")]
    Incomplete,
    /// The header claims a payload larger than the protocol allows.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Claimed length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Flags were set; version 1 defines none.
    #[error("frame flags {0:#04x} are not defined")]
    Flags(u8),
    /// The reserved field was not zero.
    #[error("reserved frame field is not zero")]
    Reserved,
}

impl FrameError {
    /// The error code that answers a peer who sent such a frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Largest payload of a data frame: large enough that header costs vanish, small enough
/// that a stalled stream pins little memory.
pub const MAX_DATA_PAYLOAD: usize = 1 << 20;

/// Largest payload of any frame. It holds a data frame or the largest manifest
/// (16 384 chunk hashes, about 512 KiB) with room to spare; a peer claiming more is cut off
/// before anything is allocated.
pub const MAX_FRAME_PAYLOAD: u32 = (MAX_DATA_PAYLOAD as u32) + 4096;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn oversized_header_is_refused_before_payload_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_u8(FrameKind::Data as u8);
        buf.put_bytes(0, 3);
        buf.put_u32(1);
        // Only the header is present: the decoder must still refuse, not wait for 4 GiB.
        assert_eq!(
            Frame::decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: MAX_FRAME_PAYLOAD
            })
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = Frame::new(FrameKind::Request, 3, Bytes::from_static(b"x"));
        let mut bytes = BytesMut::new();
        good.encode(&mut bytes).unwrap();

        let mut unknown = bytes.clone();
        unknown[4] = 0x7f;
        assert_eq!(
            Frame::decode(&mut unknown),
            Err(FrameError::UnknownKind(0x7f))
        );

        let mut flags = bytes.clone();
        flags[5] = 1;
        assert_eq!(Frame::decode(&mut flags), Err(FrameError::Flags(1)));

        let mut reserved = bytes.clone();
        reserved[7] = 1;
        assert_eq!(Frame::decode(&mut reserved), Err(FrameError::Reserved));
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let frame = Frame::new(FrameKind::Data, 9, Bytes::from(vec![7u8; 100]));
        let mut all = BytesMut::new();
        frame.encode(&mut all).unwrap();
        for cut in [0, 5, HEADER_LEN, HEADER_LEN + 50] {
            let mut part = BytesMut::from(&all[..cut]);
            assert_eq!(Frame::decode(&mut part), Ok(None));
            assert_eq!(part.len(), cut, "nothing is consumed");
        }
        assert_eq!(Frame::decode(&mut all).unwrap(), Some(frame));
        assert!(all.is_empty());
    }

    #[test]
    fn encoding_refuses_oversized_payload() {
        let frame = Frame::new(
            FrameKind::Data,
            1,
            Bytes::from(vec![0u8; MAX_FRAME_PAYLOAD as usize + 1]),
        );
        assert!(matches!(
            frame.encode(&mut BytesMut::new()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn debug_does_not_show_payload() {
        let frame = Frame::new(FrameKind::Data, 1, Bytes::from_static(b"SECRET-CANARY"));
        let shown = format!("{frame:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("payload_len: 13"), "{shown}");
    }

    fn any_kind() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Hello),
            Just(FrameKind::HelloAck),
            Just(FrameKind::GoAway),
            Just(FrameKind::Request),
            Just(FrameKind::Response),
            Just(FrameKind::Data),
            Just(FrameKind::End),
            Just(FrameKind::Error),
            Just(FrameKind::Cancel),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(
            kind in any_kind(),
            stream in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let frame = Frame::new(kind, stream, Bytes::from(payload));
            let mut buf = BytesMut::new();
            frame.encode(&mut buf).unwrap();
            prop_assert_eq!(buf.len(), frame.encoded_len());
            let back = Frame::decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(back, frame);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Frame::decode(&mut buf);
        }

        #[test]
        fn headers_round_trip_and_claim_their_payload(
            len in 0..=MAX_FRAME_PAYLOAD,
            kind in any_kind(),
            stream in any::<u32>(),
        ) {
            let h = FrameHeader { len, kind, stream };
            let enc = h.encode().unwrap();
            prop_assert_eq!(enc.len(), HEADER_LEN);
            prop_assert_eq!(FrameHeader::decode(&enc), Ok(h));
            // The header alone says how many bytes follow; until they are all here the
            // frame is incomplete, and nothing is consumed.
            let mut buf = BytesMut::from(&enc[..]);
            buf.put_bytes(0xa5, (len as usize).min(64));
            if len as usize > 64 {
                prop_assert_eq!(Frame::decode(&mut buf), Ok(None));
                prop_assert_eq!(buf.len(), HEADER_LEN + 64);
            }
        }

        #[test]
        fn any_claim_over_the_limit_is_refused_from_the_header(
            len in (MAX_FRAME_PAYLOAD + 1)..=u32::MAX,
            kind in any_kind(),
            stream in any::<u32>(),
        ) {
            let h = FrameHeader { len, kind, stream };
            prop_assert_eq!(h.encode(), Err(FrameError::TooLarge { len, max: MAX_FRAME_PAYLOAD }));
            let mut raw = BytesMut::new();
            raw.put_u32(len);
            raw.put_u8(kind as u8);
            raw.put_bytes(0, 3);
            raw.put_u32(stream);
            prop_assert_eq!(
                Frame::decode(&mut raw),
                Err(FrameError::TooLarge { len, max: MAX_FRAME_PAYLOAD })
            );
        }

        #[test]
        fn frame_streams_decode_in_order_and_wait_at_any_cut(
            frames in proptest::collection::vec(
                (any_kind(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)),
                1..8,
            ),
            cut in any::<proptest::sample::Index>(),
        ) {
            let frames: Vec<Frame> = frames
                .into_iter()
                .map(|(k, s, p)| Frame::new(k, s, Bytes::from(p)))
                .collect();
            let mut all = BytesMut::new();
            for f in &frames {
                f.encode(&mut all).unwrap();
            }
            prop_assert_eq!(all.len(), frames.iter().map(Frame::encoded_len).sum::<usize>());
            // Cut anywhere: the frames wholly before the cut decode, the rest waits.
            let at = cut.index(all.len() + 1);
            let mut part = BytesMut::from(&all[..at]);
            let mut whole = 0;
            let mut n = 0;
            while let Some(f) = Frame::decode(&mut part).unwrap() {
                prop_assert_eq!(&f, &frames[n]);
                whole += f.encoded_len();
                n += 1;
            }
            prop_assert_eq!(part.len(), at - whole);
            let mut rest = BytesMut::from(&all[..]);
            for f in &frames {
                let next = Frame::decode(&mut rest).unwrap();
                prop_assert_eq!(next.as_ref(), Some(f));
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn headers_with_any_bytes_never_panic_nor_claim_too_much(
            header in any::<[u8; HEADER_LEN]>(),
            kind in any_kind(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // Half the cases carry a valid kind, so the length and the zero fields are what
            // is tested, not only the kind byte.
            let mut h = header;
            if tail.len() % 2 == 0 {
                h[4] = kind as u8;
            }
            if let Ok(d) = FrameHeader::decode(&h) {
                prop_assert!(d.len <= MAX_FRAME_PAYLOAD);
            }
            let mut buf = BytesMut::from(&h[..]);
            buf.extend_from_slice(&tail);
            let before = buf.len();
            match Frame::decode(&mut buf) {
                Ok(Some(f)) => prop_assert_eq!(before - buf.len(), f.encoded_len()),
                Ok(None) => prop_assert_eq!(buf.len(), before),
                Err(e) => prop_assert_ne!(e, FrameError::Incomplete),
            }
        }
    }
}
