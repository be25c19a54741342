//! Lets gRPC clients built on grpc-core (Python's `grpcio`, and so py-spiffe; C++; Ruby)
//! reach the Workload API over its Unix socket.
//!
//! For a `unix:` target grpc-core sends the socket's path, percent-encoded, as the
//! `:authority` of every request (`%2Frun%2Ftransportd%2Fworkload.sock`). The HTTP/2 server
//! under tonic (h2) refuses an authority that is not `host[:port]` and resets the stream
//! before any service runs, so such a client sees `INTERNAL` and the node nothing. An
//! authority means nothing on a local socket, so the bytes a client sends pass through a
//! [`Rewriter`] on their way to h2: every header block is decoded (HPACK), an `:authority`
//! h2 would refuse becomes `localhost`, and the block is encoded again for h2 with an
//! encoder of our own, so the two compression contexts (the client's and h2's) each stay
//! in step with the one side that sees them. Every other frame passes unchanged; what the
//! server sends is not touched.

use std::borrow::Cow;

use bytes::{Buf, BufMut, BytesMut};

/// The client's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/2 frame header length.
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a client may send before the server says otherwise, and what h2
/// accepts by default: frames we write stay within it.
const MAX_FRAME: usize = 16_384;
/// The largest frame or header block accepted from a client (h2 refuses more anyway; the
/// Workload API's requests are tiny).
const MAX_INPUT: usize = 1 << 20;
/// The HPACK dynamic table size both sides start with and h2 keeps (it never asks for
/// another through SETTINGS).
const TABLE_SIZE: usize = 4096;
/// What an authority h2 would refuse becomes.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// Why a client's bytes cannot be passed on: the connection ends.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    /// Not an HTTP/2 client.
    #[error("not an HTTP/2 connection preface")]
    Preface,
    /// A frame or header block larger than [`MAX_INPUT`].
    #[error("frame or header block of {0} bytes is too large")]
    TooLarge(usize),
    /// A header block interrupted by another frame, or a continuation without one.
    #[error("malformed header block sequence")]
    Sequence,
    /// A HEADERS frame whose padding or priority does not fit it.
    #[error("malformed HEADERS frame")]
    Frame,
    /// The header block does not decode.
    #[error("header block does not decode: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

impl From<RewriteError> for std::io::Error {
    fn from(e: RewriteError) -> Self {
        Self::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct Pending {
    stream: u32,
    /// HEADERS flags to keep (END_STREAM, PRIORITY).
    flags: u8,
    /// The PRIORITY fields, if any.
    priority: Option<[u8; 5]>,
    block: BytesMut,
}

/// Rewrites what one client sends (see the module's documentation): bytes in with
/// [`Rewriter::feed`], bytes for h2 out with [`Rewriter::output`].
pub(crate) struct Rewriter {
    input: BytesMut,
    output: BytesMut,
    preface_seen: bool,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Authorities rewritten on this connection.
    rewritten: u64,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("buffered", &self.input.len())
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        decoder.set_max_table_size(TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(TABLE_SIZE);
        Self {
            input: BytesMut::new(),
            output: BytesMut::new(),
            preface_seen: false,
            pending: None,
            decoder,
            encoder,
            rewritten: 0,
        }
    }
}

impl Rewriter {
    /// Takes bytes the client sent; whole frames are rewritten into the output at once, a
    /// partial one waits for the rest.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), RewriteError> {
        self.input.extend_from_slice(bytes);
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                return Err(RewriteError::Preface);
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.output
                .extend_from_slice(&self.input.split_to(PREFACE.len()));
            self.preface_seen = true;
        }
        while self.input.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
            if len > MAX_INPUT {
                return Err(RewriteError::TooLarge(len));
            }
            if self.input.len() < FRAME_HEADER + len {
                break;
            }
            let mut frame = self.input.split_to(FRAME_HEADER + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            frame.advance(FRAME_HEADER);
            match (kind, &mut self.pending) {
                (HEADERS, None) => self.headers(stream, flags, frame)?,
                (CONTINUATION, Some(p)) if p.stream == stream => {
                    p.block.extend_from_slice(&frame);
                    if p.block.len() > MAX_INPUT {
                        return Err(RewriteError::TooLarge(p.block.len()));
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                // A header block is one run of frames on one stream (RFC 9113 §4.3).
                (HEADERS | CONTINUATION, _) | (_, Some(_)) => return Err(RewriteError::Sequence),
                _ => {
                    self.output
                        .extend_from_slice(&frame_header(len, kind, flags, stream));
                    self.output.extend_from_slice(&frame);
                }
            }
        }
        Ok(())
    }

    /// Takes the bytes ready for h2.
    pub(crate) fn output(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    /// Authorities rewritten so far.
    pub(crate) fn rewritten(&self) -> u64 {
        self.rewritten
    }

    fn headers(
        &mut self,
        stream: u32,
        flags: u8,
        mut payload: BytesMut,
    ) -> Result<(), RewriteError> {
        let pad = if flags & PADDED != 0 {
            if payload.is_empty() {
                return Err(RewriteError::Frame);
            }
            let pad = usize::from(payload[0]);
            payload.advance(1);
            pad
        } else {
            0
        };
        if pad > payload.len() {
            return Err(RewriteError::Frame);
        }
        payload.truncate(payload.len() - pad);
        let priority = if flags & PRIORITY != 0 {
            if payload.len() < 5 {
                return Err(RewriteError::Frame);
            }
            let mut p = [0u8; 5];
            p.copy_from_slice(&payload.split_to(5));
            Some(p)
        } else {
            None
        };
        self.pending = Some(Pending {
            stream,
            flags: flags & (END_STREAM | PRIORITY),
            priority,
            block: payload,
        });
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the gathered block, mends its authority, encodes it again and writes it out
    /// as HEADERS and as many CONTINUATION frames as it needs.
    fn finish_block(&mut self) -> Result<(), RewriteError> {
        let Some(p) = self.pending.take() else {
            return Err(RewriteError::Sequence);
        };
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&p.block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                fields.push((name.into_owned(), value.into_owned()));
            })
            .map_err(RewriteError::Hpack)?;
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = LOCAL_AUTHORITY.to_vec();
                self.rewritten += 1;
            }
        }
        let block = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut first = BytesMut::new();
        if let Some(prio) = p.priority {
            first.put_slice(&prio);
        }
        let room = MAX_FRAME - first.len();
        let (head, mut rest) = block.split_at(block.len().min(room));
        first.put_slice(head);
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        self.output
            .extend_from_slice(&frame_header(first.len(), HEADERS, p.flags | end, p.stream));
        self.output.extend_from_slice(&first);
        while !rest.is_empty() {
            let (piece, next) = rest.split_at(rest.len().min(MAX_FRAME));
            let end = if next.is_empty() { END_HEADERS } else { 0 };
            self.output
                .extend_from_slice(&frame_header(piece.len(), CONTINUATION, end, p.stream));
            self.output.extend_from_slice(piece);
            rest = next;
        }
        Ok(())
    }
}

/// Whether h2 takes `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; FRAME_HEADER] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's frames: its own encoder, as grpc-core's would be.
    struct Client {
        encoder: loona_hpack::Encoder<'static>,
    }

    impl Client {
        fn new() -> Self {
            Self {
                encoder: loona_hpack::Encoder::new(),
            }
        }

        fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
            self.encoder
                .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        }
    }

    fn request(authority: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "POST".into()),
            (":scheme", "http".into()),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID".into()),
            (":authority", authority.into()),
            ("content-type", "application/grpc".into()),
            ("workload.spiffe.io", "true".into()),
        ]
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = frame_header(payload.len(), kind, flags, stream).to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// A frame as h2 would see it: kind, flags, stream, the decoded fields of the header
    /// block it ends (if it ends one), payload.
    type Seen = (u8, u8, u32, Vec<(String, String)>, Vec<u8>);

    /// What h2 would see: the frames of the output, header blocks decoded with one decoder.
    fn h2_sees(out: &[u8]) -> Vec<Seen> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[FRAME_HEADER..FRAME_HEADER + len].to_vec();
            assert!(len <= MAX_FRAME, "a frame of {len} bytes");
            rest = &rest[FRAME_HEADER + len..];
            if kind == HEADERS || kind == CONTINUATION {
                let start = if kind == HEADERS && flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                assert_eq!(flags & PADDED, 0);
                block.extend_from_slice(&payload[start..]);
                if flags & END_HEADERS == 0 {
                    frames.push((kind, flags, stream, Vec::new(), payload));
                    continue;
                }
                let fields = decoder
                    .decode(&block)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                block.clear();
                frames.push((kind, flags, stream, fields, payload));
            } else {
                frames.push((kind, flags, stream, Vec::new(), payload));
            }
        }
        frames
    }

    fn authority(fields: &[(String, String)]) -> &str {
        &fields.iter().find(|(n, _)| n == ":authority").unwrap().1
    }

    #[test]
    fn a_percent_encoded_socket_path_becomes_localhost_and_everything_else_passes() {
        let mut client = Client::new();
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0x10, 0])); // SETTINGS
        let bad = request("%2Frun%2Ftransportd%2Fworkload.sock");
        let fields: Vec<(&str, &str)> = bad.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let block = client.block(&fields);
        sent.extend(frame(HEADERS, END_HEADERS, 1, &block));
        sent.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // A second request: grpc-core's encoder now refers to its dynamic table.
        let block = client.block(&fields);
        sent.extend(frame(HEADERS, END_HEADERS, 3, &block));
        // A valid authority is left as it is.
        let good = request("workload.spiffe.io:443");
        let fields: Vec<(&str, &str)> = good.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let block = client.block(&fields);
        sent.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &block));

        // Fed a few bytes at a time, as a socket may deliver them.
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for piece in sent.chunks(7) {
            r.feed(piece).unwrap();
            out.extend_from_slice(&r.output().split());
        }
        let seen = h2_sees(&out);
        assert_eq!(seen.len(), 5);
        assert_eq!((seen[0].0, seen[0].4.len()), (0x4, 6), "SETTINGS unchanged");
        assert_eq!(authority(&seen[1].3), "localhost");
        assert_eq!(seen[1].3.len(), 6, "every other field kept");
        assert!(
            seen[1]
                .3
                .contains(&("workload.spiffe.io".into(), "true".into())),
            "{:?}",
            seen[1].3
        );
        assert_eq!(
            (seen[2].0, seen[2].1, seen[2].4.clone()),
            (0x0, END_STREAM, vec![0, 0, 0, 0, 0])
        );
        assert_eq!(authority(&seen[3].3), "localhost");
        assert_eq!(authority(&seen[4].3), "workload.spiffe.io:443");
        assert_eq!(seen[4].1 & END_STREAM, END_STREAM, "END_STREAM kept");
        assert_eq!(r.rewritten(), 2);
    }

    #[test]
    fn padded_prioritised_and_continued_blocks_are_gathered_and_re_framed() {
        let mut client = Client::new();
        let long = "x".repeat(40_000);
        let mut fields: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":authority", "/run/workload.sock"),
            ("big", long.as_str()),
        ];
        fields.push((":path", "/p"));
        let block = client.block(&fields);
        let mut sent = PREFACE.to_vec();
        // HEADERS: padded (3 bytes), with priority, carrying the first 100 bytes.
        let mut first = vec![3u8];
        first.extend_from_slice(&[0, 0, 0, 1, 7]);
        first.extend_from_slice(&block[..100]);
        first.extend_from_slice(&[0, 0, 0]);
        sent.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 9, &first));
        for (i, piece) in block[100..].chunks(10_000).enumerate() {
            let last = 100 + (i + 1) * 10_000 >= block.len();
            sent.extend(frame(
                CONTINUATION,
                if last { END_HEADERS } else { 0 },
                9,
                piece,
            ));
        }
        let mut r = Rewriter::default();
        r.feed(&sent).unwrap();
        let out = r.output().split();
        let seen = h2_sees(&out);
        let (kind, flags, stream, _, payload) = &seen[0];
        assert_eq!((*kind, *stream), (HEADERS, 9));
        assert_eq!(flags & (PRIORITY | END_STREAM), PRIORITY | END_STREAM);
        assert_eq!(
            flags & END_HEADERS,
            0,
            "a block this large needs continuations"
        );
        assert_eq!(&payload[..5], &[0, 0, 0, 1, 7], "priority kept");
        let last = seen.last().unwrap();
        assert_eq!((last.0, last.1), (CONTINUATION, END_HEADERS));
        assert_eq!(authority(&last.3), "localhost");
        assert!(last.3.contains(&("big".into(), long.clone())));
        assert_eq!(last.3.len(), 4);
    }

    #[test]
    fn what_h2_would_refuse_anyway_ends_the_connection() {
        // Not HTTP/2 at all.
        assert!(matches!(
            Rewriter::default().feed(b"GET / HTTP/1.1\r\n"),
            Err(RewriteError::Preface)
        ));
        // A header block broken off by another frame.
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, 0, 1, &[0x82]));
        sent.extend(frame(0x0, 0, 1, b"data"));
        assert!(matches!(
            Rewriter::default().feed(&sent),
            Err(RewriteError::Sequence)
        ));
        // A block that does not decode: a size update with its integer cut short (a
        // decoder that panicked on it would take the connection's task down instead).
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f]));
        assert!(matches!(
            Rewriter::default().feed(&sent),
            Err(RewriteError::Hpack(_))
        ));
        // Padding longer than the frame.
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert!(matches!(
            Rewriter::default().feed(&sent),
            Err(RewriteError::Frame)
        ));
        // A frame beyond any size h2 would take.
        let mut sent = PREFACE.to_vec();
        sent.extend(frame_header(MAX_INPUT + 1, 0x0, 0, 1));
        assert!(matches!(
            Rewriter::default().feed(&sent),
            Err(RewriteError::TooLarge(_))
        ));
    }

    #[test]
    fn h2_takes_only_host_and_port_as_an_authority() {
        assert!(valid_authority(b"localhost"));
        assert!(valid_authority(b"workload.spiffe.io:443"));
        assert!(!valid_authority(b"/run/workload.sock"));
        assert!(!valid_authority(b"%2Frun%2Fworkload.sock"));
    }
}
