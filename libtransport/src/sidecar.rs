//! The wire of a sidecar's local data API: what processes on a GPU node send to the node's
//! daemon over its Unix socket, and what comes back.
//!
//! A frame is a 4-byte big-endian length, a JSON header of that length, then as many raw
//! bytes as the header's `body` says (small reads come inline that way). Whole objects do
//! not cross the socket: the answer carries a file descriptor instead (`SCM_RIGHTS`, sent
//! with the frame's first byte), a sealed read-only memory file the caller maps or reads.
//! Headers are small and bounded ([`MAX_HEADER`]), and so are inline bodies
//! ([`MAX_INLINE`]); anything past those is refused before it is allocated.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

pub mod client;

pub use client::{SidecarClient, SidecarError};

/// The environment variable that names a sidecar's socket to clients that honour it.
pub const SOCKET_ENV: &str = "TRANSPORTD_SIDECAR_SOCKET";

/// Longest header accepted, in bytes.
pub const MAX_HEADER: u32 = 64 << 10;
/// Longest body that comes inline; larger answers come as a descriptor.
pub const MAX_INLINE: u64 = 1 << 20;

/// How often a sidecar tells a caller that its request is still being served
/// ([`LocalAnswer::Working`]), so that a caller can tell a long fetch from a hung daemon.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a local caller asks. Names are the same as on the network (`dataset`, `object`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LocalRequest {
    /// The datasets the caller may see.
    Datasets {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// The objects of a dataset under a prefix.
    List {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        dataset: String,
        /// Only paths starting with it.
        #[serde(default)]
        prefix: String,
    },
    /// An object's size and manifest root.
    Stat {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        dataset: String,
        /// The object.
        object: String,
    },
    /// Bytes `start..end` of an object, inline (at most [`MAX_INLINE`]).
    Read {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        dataset: String,
        /// The object.
        object: String,
        /// First byte.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// A whole object, as a sealed read-only memory file.
    Fetch {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        dataset: String,
        /// The object.
        object: String,
    },
    /// Stores the file that comes with the request (a regular file or a memfd, read from
    /// its start) as `object` of `dataset` on the storage node, as the caller.
    Push {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The dataset.
        dataset: String,
        /// The object.
        object: String,
    },
    /// Objects the caller will want next: fetched into the cache meanwhile.
    Prefetch {
        /// The storage node (one of the sidecar's; default its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// `(dataset, object)` pairs, in the order wanted.
        objects: Vec<(String, String)>,
    },
}

/// The answer's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum LocalAnswer {
    /// The datasets.
    Datasets {
        /// Their names.
        names: Vec<String>,
    },
    /// A listing.
    Listing {
        /// `(path, size)` of each object.
        objects: Vec<(String, u64)>,
    },
    /// An object's size and root.
    Stat {
        /// Size in bytes.
        size: u64,
        /// Manifest root, hex.
        root: String,
        /// Chunk size of the manifest.
        chunk_bytes: u64,
        /// Chunks.
        chunks: u64,
    },
    /// The bytes follow the header (`body` of them).
    Inline {
        /// How many.
        body: u64,
    },
    /// The object is in the descriptor that came with the frame.
    Mapped {
        /// Its size.
        size: u64,
        /// Its manifest root, hex.
        root: String,
        /// Served from the node's cache (true) or fetched for this call.
        cached: bool,
    },
    /// The pushed object is stored and durable on the storage node.
    Pushed {
        /// Its size.
        size: u64,
        /// Its manifest root, hex.
        root: String,
    },
    /// Prefetching started for this many objects.
    Prefetching {
        /// How many.
        count: u64,
    },
    /// Not an answer: the request is still being served (sent every [`HEARTBEAT`] while
    /// it is). The answer follows.
    Working,
    /// Refused or failed.
    Error {
        /// The stable code: a storage node's answer keeps its wire label (`not_found`, which
        /// also covers "not permitted", `busy`, `corrupt`, `changed`, `no_space`, ...); the
        /// sidecar's own are `permission_denied` (the caller matches no registration entry),
        /// `unreachable` (the storage node cannot be reached), `unavailable` (the sidecar
        /// cannot serve now: its audit trail, its identities), `too_large`, `range` and
        /// `invalid` (a request it does not take).
        code: String,
        /// In words, for the caller (never another caller's names).
        message: String,
    },
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("local socket: {0}")]
    Io(#[from] io::Error),
    /// A header or body past its limit, or not JSON of the expected shape.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Writes one frame: `header`, then `body` (its length must be what the header says), with
/// `fd` passed along the first byte. Returns the bytes written to the socket.
pub fn send_frame<H: Serialize>(
    sock: &UnixStream,
    header: &H,
    body: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<u64, FrameError> {
    let json = serde_json::to_vec(header).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|n| *n <= MAX_HEADER)
        .ok_or_else(|| FrameError::Malformed(format!("header of {} bytes", json.len())))?;
    let prefix = len.to_be_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let iov = [
        IoSlice::new(&prefix),
        IoSlice::new(&json),
        IoSlice::new(body),
    ];
    let total = prefix.len() + json.len() + body.len();
    let sent = rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        .map_err(io::Error::from)?;
    // The descriptor went with the first bytes; the rest, if the socket took less, plainly.
    let mut skip = sent.min(total);
    let mut w = sock;
    for part in [&prefix[..], &json, body] {
        let n = skip.min(part.len());
        skip -= n;
        w.write_all(&part[n..])?;
    }
    Ok(total as u64)
}

/// Reads one frame: its header, its body (at most `max_body` bytes, else refused), and the
/// descriptor that came with it, if any.
pub fn recv_frame<H: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    body_len: impl Fn(&H) -> u64,
    max_body: u64,
) -> Result<(H, Vec<u8>, Option<OwnedFd>), FrameError> {
    recv_frame_counted(sock, body_len, max_body, &mut 0)
}

/// [`recv_frame`], adding to `counted` every byte read from the socket (also those of a
/// frame that fails part-way), so a caller can show what crossed it.
pub fn recv_frame_counted<H: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    body_len: impl Fn(&H) -> u64,
    max_body: u64,
    counted: &mut u64,
) -> Result<(H, Vec<u8>, Option<OwnedFd>), FrameError> {
    let mut prefix = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut prefix)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                // More than one descriptor is not this protocol: keep the first, close the rest.
                fd.get_or_insert(f);
            }
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(FrameError::Malformed("too many descriptors".into()));
    }
    if got.bytes == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    *counted += got.bytes as u64;
    let mut r = Counted { sock, counted };
    r.read_exact(&mut prefix[got.bytes..])?;
    let len = u32::from_be_bytes(prefix);
    if len > MAX_HEADER {
        return Err(FrameError::Malformed(format!("header of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    let header: H =
        serde_json::from_slice(&json).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let n = body_len(&header);
    if n > max_body {
        return Err(FrameError::Malformed(format!(
            "body of {n} bytes (at most {max_body})"
        )));
    }
    let mut body = vec![0u8; n as usize];
    r.read_exact(&mut body)?;
    Ok((header, body, fd))
}

/// A socket's reads, counted.
struct Counted<'a> {
    sock: &'a UnixStream,
    counted: &'a mut u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&mut &*self.sock).read(buf)?;
        *self.counted += n as u64;
        Ok(n)
    }
}

/// The body length a request's header announces (requests carry none).
pub fn request_body(_: &LocalRequest) -> u64 {
    0
}

/// The body length an answer's header announces.
pub fn answer_body(a: &LocalAnswer) -> u64 {
    match a {
        LocalAnswer::Inline { body } => *body,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
