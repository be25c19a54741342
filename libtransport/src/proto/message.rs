//! Message payloads: hello, requests, responses and error codes, version 1.
//!
//! Every message encodes to a frame payload with a one-byte tag and fixed-width big-endian
//! fields; strings carry a u16 length, lists a u32 count checked against a limit before
//! anything is allocated. Decoding consumes the whole payload: trailing bytes are an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use super::decode::DecodeError;
use super::manifest::{ChunkIndex, ChunkSet, Digest, Manifest};
use super::name::{DatasetName, ObjectPath};

/// The client's opening message: the protocol versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version the client speaks.
    pub min_version: u16,
    /// Newest version the client speaks.
    pub max_version: u16,
}

impl Hello {
    /// A hello for the versions this build speaks.
    pub fn current() -> Self {
        Self {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }
    }

    /// Encodes to a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(8);
        b.put_slice(HELLO_MAGIC);
        b.put_u16(self.min_version);
        b.put_u16(self.max_version);
        b.freeze()
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let magic = take(r, 4)?;
        if magic != HELLO_MAGIC {
            return Err(DecodeError::Magic);
        }
        let hello = Self {
            min_version: get_u16(r)?,
            max_version: get_u16(r)?,
        };
        finish(r)?;
        Ok(hello)
    }

    /// The version a server speaking only [`PROTOCOL_VERSION`] picks, if any.
    pub fn negotiate(&self) -> Option<u16> {
        (self.min_version..=self.max_version)
            .contains(&PROTOCOL_VERSION)
            .then_some(PROTOCOL_VERSION)
    }
}

/// The server's answer to [`Hello`]: the chosen version and the limits it enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// The version both sides will speak.
    pub version: u16,
    /// Requests the server runs at once on this connection; more wait or are refused.
    pub max_streams: u32,
    /// Transfers a connection may hold open at once.
    pub max_transfers: u32,
    /// Chunk size the server uses for the manifests it builds.
    pub chunk_bytes: u32,
}

impl HelloAck {
    /// Encodes to a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(14);
        b.put_u16(self.version);
        b.put_u32(self.max_streams);
        b.put_u32(self.max_transfers);
        b.put_u32(self.chunk_bytes);
        b.freeze()
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let ack = Self {
            version: get_u16(r)?,
            max_streams: get_u32(r)?,
            max_transfers: get_u32(r)?,
            chunk_bytes: get_u32(r)?,
        };
        finish(r)?;
        Ok(ack)
    }
}

/// Identifies an open transfer on one connection. Assigned by the server; meaningless on
/// any other connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u64);

impl std::fmt::Display for TransferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A request; the payload of a `Request` frame, which opens a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Datasets the caller may see.
    ListDatasets,
    /// Objects in a dataset, in path order, one page at a time.
    ListObjects {
        /// Dataset to list.
        dataset: DatasetName,
        /// Only paths starting with this (may be empty).
        prefix: String,
        /// Resume after this path (the last one of the previous page).
        start_after: Option<ObjectPath>,
        /// Most entries wanted in this page.
        limit: u32,
    },
    /// An object's manifest.
    Stat {
        /// Dataset.
        dataset: DatasetName,
        /// Object.
        object: ObjectPath,
    },
    /// Opens a read transfer; answered with the manifest.
    OpenRead {
        /// Dataset.
        dataset: DatasetName,
        /// Object.
        object: ObjectPath,
    },
    /// Opens a read transfer as one part of a pull striped over several connections,
    /// answered as `OpenRead`. The parts a peer opens with the same `group` (a random id
    /// the client picks per pull) and the same object version are one transfer in the
    /// node's trail: started with the first part, ended with the last.
    OpenReadPart {
        /// Dataset.
        dataset: DatasetName,
        /// Object.
        object: ObjectPath,
        /// The striped pull this part belongs to.
        group: [u8; 16],
    },
    /// Reads bytes of an open read transfer; answered with `Data` frames and `End`.
    Read {
        /// The transfer.
        transfer: TransferId,
        /// First byte.
        offset: u64,
        /// Bytes wanted; at most [`MAX_READ_BYTES`].
        len: u64,
    },
    /// Opens a write transfer of an object with the given manifest; answered with the
    /// chunks the server already holds from an earlier, interrupted attempt.
    OpenWrite {
        /// Dataset.
        dataset: DatasetName,
        /// Object.
        object: ObjectPath,
        /// What the object will be.
        manifest: Manifest,
    },
    /// Opens a write transfer as one part of a push striped over several connections,
    /// answered as `OpenWrite`. The parts a peer opens with the same `group` (a random id
    /// the client picks per push) and the same manifest share one partial object: a chunk
    /// sent on any part counts for all, `Commit` on any part commits it, and the node's
    /// trail records them as one transfer.
    OpenWritePart {
        /// Dataset.
        dataset: DatasetName,
        /// Object.
        object: ObjectPath,
        /// What the object will be.
        manifest: Manifest,
        /// The striped push this part belongs to.
        group: [u8; 16],
    },
    /// Sends one chunk of an open write transfer in the `Data` frames that follow, then
    /// `End`; answered once the chunk is verified and stored.
    WriteChunk {
        /// The transfer.
        transfer: TransferId,
        /// Which chunk.
        chunk: ChunkIndex,
    },
    /// Answered when the server's access policy is no longer the one `known` names (at
    /// once if it is not), or after a while with the same epoch: a peer that reuses the
    /// server's decisions keeps one of these open to learn of every policy change.
    PolicyWatch {
        /// The epoch the caller knows; 0 for none.
        known: u64,
    },
    /// Completes a write transfer: the object appears under its name, durably.
    Commit {
        /// The transfer.
        transfer: TransferId,
    },
    /// Ends a transfer. An uncommitted write keeps its verified chunks for a later resume.
    Close {
        /// The transfer.
        transfer: TransferId,
    },
    /// Asks to move an open read transfer's chunks by RDMA (QUIC connections only). The
    /// stream stays open as the session's control channel: `Data` frames carry
    /// [`super::rdma::RdmaControl`] grants. Answered with `RdmaAccepted`, or an error such as
    /// [`ErrorCode::NoRdma`], after which the client uses the stream-based reads.
    RdmaOpen {
        /// The read transfer.
        transfer: TransferId,
        /// What the receiver offers.
        offer: super::rdma::RdmaOffer,
    },
}

impl Request {
    /// Encodes to a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        match self {
            Self::ListDatasets => b.put_u8(1),
            Self::ListObjects {
                dataset,
                prefix,
                start_after,
                limit,
            } => {
                b.put_u8(2);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, prefix);
                match start_after {
                    Some(p) => {
                        b.put_u8(1);
                        put_str(&mut b, p.as_str());
                    }
                    None => b.put_u8(0),
                }
                b.put_u32(*limit);
            }
            Self::Stat { dataset, object } => {
                b.put_u8(3);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, object.as_str());
            }
            Self::OpenRead { dataset, object } => {
                b.put_u8(4);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, object.as_str());
            }
            Self::Read {
                transfer,
                offset,
                len,
            } => {
                b.put_u8(5);
                b.put_u64(transfer.0);
                b.put_u64(*offset);
                b.put_u64(*len);
            }
            Self::OpenWrite {
                dataset,
                object,
                manifest,
            } => {
                b.put_u8(6);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, object.as_str());
                manifest.encode(&mut b);
            }
            Self::WriteChunk { transfer, chunk } => {
                b.put_u8(7);
                b.put_u64(transfer.0);
                b.put_u32(chunk.0);
            }
            Self::Commit { transfer } => {
                b.put_u8(8);
                b.put_u64(transfer.0);
            }
            Self::Close { transfer } => {
                b.put_u8(9);
                b.put_u64(transfer.0);
            }
            Self::RdmaOpen { transfer, offer } => {
                b.put_u8(10);
                b.put_u64(transfer.0);
                offer.encode(&mut b);
            }
            Self::OpenReadPart {
                dataset,
                object,
                group,
            } => {
                b.put_u8(11);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, object.as_str());
                b.put_slice(group);
            }
            Self::OpenWritePart {
                dataset,
                object,
                manifest,
                group,
            } => {
                b.put_u8(12);
                put_str(&mut b, dataset.as_str());
                put_str(&mut b, object.as_str());
                manifest.encode(&mut b);
                b.put_slice(group);
            }
            Self::PolicyWatch { known } => {
                b.put_u8(13);
                b.put_u64(*known);
            }
        }
        b.freeze()
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let req = match get_u8(r)? {
            1 => Self::ListDatasets,
            2 => Self::ListObjects {
                dataset: get_dataset(r)?,
                prefix: get_str(r, super::name::MAX_OBJECT_PATH_BYTES)?.to_owned(),
                start_after: match get_u8(r)? {
                    0 => None,
                    1 => Some(get_object(r)?),
                    t => return Err(DecodeError::Tag(t)),
                },
                limit: get_u32(r)?,
            },
            3 => Self::Stat {
                dataset: get_dataset(r)?,
                object: get_object(r)?,
            },
            4 => Self::OpenRead {
                dataset: get_dataset(r)?,
                object: get_object(r)?,
            },
            5 => Self::Read {
                transfer: TransferId(get_u64(r)?),
                offset: get_u64(r)?,
                len: get_u64(r)?,
            },
            6 => Self::OpenWrite {
                dataset: get_dataset(r)?,
                object: get_object(r)?,
                manifest: Manifest::decode(r)?,
            },
            7 => Self::WriteChunk {
                transfer: TransferId(get_u64(r)?),
                chunk: ChunkIndex(get_u32(r)?),
            },
            8 => Self::Commit {
                transfer: TransferId(get_u64(r)?),
            },
            9 => Self::Close {
                transfer: TransferId(get_u64(r)?),
            },
            10 => Self::RdmaOpen {
                transfer: TransferId(get_u64(r)?),
                offer: super::rdma::RdmaOffer::decode(r)?,
            },
            11 => Self::OpenReadPart {
                dataset: get_dataset(r)?,
                object: get_object(r)?,
                group: take(r, 16)?
                    .try_into()
                    .map_err(|_| DecodeError::Truncated)?,
            },
            12 => Self::OpenWritePart {
                dataset: get_dataset(r)?,
                object: get_object(r)?,
                manifest: Manifest::decode(r)?,
                group: take(r, 16)?
                    .try_into()
                    .map_err(|_| DecodeError::Truncated)?,
            },
            13 => Self::PolicyWatch { known: get_u64(r)? },
            t => return Err(DecodeError::Tag(t)),
        };
        finish(r)?;
        Ok(req)
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ListDatasets => "list-datasets",
            Self::ListObjects { .. } => "list-objects",
            Self::Stat { .. } => "stat",
            Self::OpenRead { .. } => "open-read",
            Self::OpenReadPart { .. } => "open-read-part",
            Self::Read { .. } => "read",
            Self::OpenWrite { .. } => "open-write",
            Self::OpenWritePart { .. } => "open-write-part",
            Self::WriteChunk { .. } => "write-chunk",
            Self::Commit { .. } => "commit",
            Self::Close { .. } => "close",
            Self::RdmaOpen { .. } => "rdma-open",
            Self::PolicyWatch { .. } => "policy-watch",
        }
    }
}

/// One entry of an object listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Path within the dataset.
    pub path: ObjectPath,
    /// Size in bytes.
    pub size: u64,
}

/// A successful answer; the payload of a `Response` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to `ListDatasets`.
    Datasets(Vec<DatasetName>),
    /// Answer to `ListObjects`.
    Objects {
        /// Entries in path order.
        entries: Vec<ObjectEntry>,
        /// True if more entries follow the last one.
        more: bool,
    },
    /// Answer to `Stat`.
    Manifest(Manifest),
    /// Answer to `OpenRead`.
    OpenedRead {
        /// The new transfer.
        transfer: TransferId,
        /// The object's manifest.
        manifest: Manifest,
    },
    /// Answer to `OpenWrite`.
    OpenedWrite {
        /// The new transfer.
        transfer: TransferId,
        /// Chunks the server already holds and verified.
        have: ChunkSet,
    },
    /// Answer to `WriteChunk`: the chunk is verified and stored.
    ChunkStored(ChunkIndex),
    /// Answer to `Commit`: the object is durable under its name.
    Committed {
        /// The object's root hash.
        root: Digest,
    },
    /// Answer to `Close`.
    Closed,
    /// Answer to `PolicyWatch`: the epoch of the server's access policy now. Epochs differ
    /// whenever policies may (a restarted server starts a new one).
    Policy {
        /// The epoch.
        epoch: u64,
    },
    /// Answer to `RdmaOpen`: the session is set up on the sender's side.
    RdmaAccepted {
        /// The session's ID: the context of its key derivation.
        session: [u8; 16],
        /// The sender's queue-pair connection parameters.
        info: Bytes,
    },
}

impl Response {
    /// Encodes to a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        match self {
            Self::Datasets(names) => {
                b.put_u8(1);
                put_count(&mut b, names.len());
                for n in names {
                    put_str(&mut b, n.as_str());
                }
            }
            Self::Objects { entries, more } => {
                b.put_u8(2);
                put_count(&mut b, entries.len());
                for e in entries {
                    put_str(&mut b, e.path.as_str());
                    b.put_u64(e.size);
                }
                b.put_u8(u8::from(*more));
            }
            Self::Manifest(m) => {
                b.put_u8(3);
                m.encode(&mut b);
            }
            Self::OpenedRead { transfer, manifest } => {
                b.put_u8(4);
                b.put_u64(transfer.0);
                manifest.encode(&mut b);
            }
            Self::OpenedWrite { transfer, have } => {
                b.put_u8(5);
                b.put_u64(transfer.0);
                have.encode(&mut b);
            }
            Self::ChunkStored(i) => {
                b.put_u8(6);
                b.put_u32(i.0);
            }
            Self::Committed { root } => {
                b.put_u8(7);
                b.put_slice(&root.0);
            }
            Self::Closed => b.put_u8(8),
            Self::RdmaAccepted { session, info } => {
                b.put_u8(9);
                b.put_slice(session);
                put_bytes16(&mut b, info);
            }
            Self::Policy { epoch } => {
                b.put_u8(10);
                b.put_u64(*epoch);
            }
        }
        b.freeze()
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let resp = match get_u8(r)? {
            1 => {
                let n = get_count(r, MAX_LIST_ENTRIES)?;
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(get_dataset(r)?);
                }
                Self::Datasets(names)
            }
            2 => {
                let n = get_count(r, MAX_LIST_ENTRIES)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(ObjectEntry {
                        path: get_object(r)?,
                        size: get_u64(r)?,
                    });
                }
                let more = match get_u8(r)? {
                    0 => false,
                    1 => true,
                    t => return Err(DecodeError::Tag(t)),
                };
                Self::Objects { entries, more }
            }
            3 => Self::Manifest(Manifest::decode(r)?),
            4 => Self::OpenedRead {
                transfer: TransferId(get_u64(r)?),
                manifest: Manifest::decode(r)?,
            },
            5 => Self::OpenedWrite {
                transfer: TransferId(get_u64(r)?),
                have: ChunkSet::decode(r)?,
            },
            6 => Self::ChunkStored(ChunkIndex(get_u32(r)?)),
            7 => {
                let mut root = [0u8; 32];
                root.copy_from_slice(take(r, 32)?);
                Self::Committed { root: Digest(root) }
            }
            8 => Self::Closed,
            9 => {
                let mut session = [0u8; 16];
                session.copy_from_slice(take(r, 16)?);
                let n = usize::from(get_u16(r)?);
                if n > super::rdma::MAX_INFO_BYTES {
                    return Err(DecodeError::TooLong {
                        len: n,
                        max: super::rdma::MAX_INFO_BYTES,
                    });
                }
                Self::RdmaAccepted {
                    session,
                    info: Bytes::copy_from_slice(take(r, n)?),
                }
            }
            10 => Self::Policy { epoch: get_u64(r)? },
            t => return Err(DecodeError::Tag(t)),
        };
        finish(r)?;
        Ok(resp)
    }
}

/// Why a request failed: the payload of an `Error` frame. Codes are stable across versions;
/// a peer that receives a code it does not know treats it as [`ErrorCode::Internal`].
///
/// "Forbidden" and "not found" share [`ErrorCode::NotFound`] so that a peer cannot probe for
/// datasets it may not see; the audit trail records which one it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer broke the protocol: a malformed or unexpected frame.
    Protocol = 1,
    /// No protocol version in common.
    Version = 2,
    /// A frame or request exceeded a limit.
    TooLarge = 3,
    /// No such dataset or object, or the caller may not access it.
    NotFound = 4,
    /// A byte range outside the object.
    Range = 5,
    /// Too many streams, transfers or connections; retry later.
    Busy = 6,
    /// Another transfer is writing this object.
    Conflict = 7,
    /// A chunk failed verification.
    Corrupt = 8,
    /// Commit before every chunk was stored.
    Incomplete = 9,
    /// The transfer is unknown on this connection.
    UnknownTransfer = 10,
    /// The object changed since its manifest was taken.
    Changed = 11,
    /// The server cannot accept new work now (for example, its audit trail is not writable).
    Unavailable = 12,
    /// The receiver's disk is full.
    NoSpace = 13,
    /// The stream was cancelled.
    Cancelled = 14,
    /// The server failed; not the client's fault.
    Internal = 15,
    /// The server's audit trail cannot be written, so it starts no new work; retry later.
    AuditUnavailable = 16,
    /// The server cannot move this transfer by RDMA (no device, or not allowed); use the
    /// stream-based reads.
    NoRdma = 17,
}

impl ErrorCode {
    /// Maps a wire code; unknown codes become [`ErrorCode::Internal`].
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::Protocol,
            2 => Self::Version,
            3 => Self::TooLarge,
            4 => Self::NotFound,
            5 => Self::Range,
            6 => Self::Busy,
            7 => Self::Conflict,
            8 => Self::Corrupt,
            9 => Self::Incomplete,
            10 => Self::UnknownTransfer,
            11 => Self::Changed,
            12 => Self::Unavailable,
            13 => Self::NoSpace,
            14 => Self::Cancelled,
            16 => Self::AuditUnavailable,
            17 => Self::NoRdma,
            _ => Self::Internal,
        }
    }

    /// Encodes to a payload.
    pub fn encode(self) -> Bytes {
        Bytes::copy_from_slice(&(self as u16).to_be_bytes())
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let c = get_u16(r)?;
        finish(r)?;
        Ok(Self::from_u16(c))
    }

    /// What the code means, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Protocol => "protocol violation",
            Self::Version => "no protocol version in common",
            Self::TooLarge => {
                "request exceeds a limit (for a push: larger than the receiver's quota for partial files)"
            }
            Self::NotFound => "not found or not permitted",
            Self::Range => "byte range outside the object",
            Self::Busy => "server busy, retry later",
            Self::Conflict => "object is being written by another transfer",
            Self::Corrupt => "chunk failed verification",
            Self::Incomplete => "not every chunk has been stored",
            Self::UnknownTransfer => "unknown transfer",
            Self::Changed => "object changed since its manifest was taken",
            Self::Unavailable => "server cannot accept new work now",
            Self::NoSpace => {
                "no space left on the receiver (its disk, or its quota for partial files of pushes in progress, is full): push again once space is freed; chunks already stored are kept"
            }
            Self::Cancelled => "cancelled",
            Self::Internal => "internal server error",
            Self::AuditUnavailable => {
                "the server's audit trail cannot be written; it starts no new transfers until it can"
            }
            Self::NoRdma => "the server cannot use RDMA for this transfer",
        }
    }

    /// A stable lower-case label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Protocol => "protocol",
            Self::Version => "version",
            Self::TooLarge => "too_large",
            Self::NotFound => "not_found",
            Self::Range => "range",
            Self::Busy => "busy",
            Self::Conflict => "conflict",
            Self::Corrupt => "corrupt",
            Self::Incomplete => "incomplete",
            Self::UnknownTransfer => "unknown_transfer",
            Self::Changed => "changed",
            Self::Unavailable => "unavailable",
            Self::NoSpace => "no_space",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
            Self::AuditUnavailable => "audit_unavailable",
            Self::NoRdma => "no_rdma",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    // Every string we send is a validated name or prefix, bounded far below u16::MAX.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    b.put_u16(len);
    b.put_slice(&s.as_bytes()[..len as usize]);
}

fn put_bytes16(b: &mut BytesMut, bytes: &[u8]) {
    // Callers pass at most MAX_INFO_BYTES; longer input is cut rather than mis-framed.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    b.put_u16(len);
    b.put_slice(&bytes[..usize::from(len)]);
}

fn put_count(b: &mut BytesMut, n: usize) {
    b.put_u32(u32::try_from(n).unwrap_or(u32::MAX));
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if r.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Ok(head)
}

fn get_u8(r: &mut &[u8]) -> Result<u8, DecodeError> {
    Ok(take(r, 1)?[0])
}

fn get_u16(r: &mut &[u8]) -> Result<u16, DecodeError> {
    Ok(take(r, 2)?.get_u16())
}

fn get_u32(r: &mut &[u8]) -> Result<u32, DecodeError> {
    Ok(take(r, 4)?.get_u32())
}

fn get_u64(r: &mut &[u8]) -> Result<u64, DecodeError> {
    Ok(take(r, 8)?.get_u64())
}

fn get_count(r: &mut &[u8], max: usize) -> Result<usize, DecodeError> {
    let n = get_u32(r)? as usize;
    if n > max {
        return Err(DecodeError::TooLong { len: n, max });
    }
    Ok(n)
}

fn get_str<'a>(r: &mut &'a [u8], max: usize) -> Result<&'a str, DecodeError> {
    let n = get_u16(r)? as usize;
    if n > max {
        return Err(DecodeError::TooLong { len: n, max });
    }
    std::str::from_utf8(take(r, n)?).map_err(|_| DecodeError::Utf8)
}

fn get_dataset(r: &mut &[u8]) -> Result<DatasetName, DecodeError> {
    Ok(DatasetName::new(get_str(
        r,
        super::name::MAX_DATASET_NAME_BYTES,
    )?)?)
}

fn get_object(r: &mut &[u8]) -> Result<ObjectPath, DecodeError> {
    Ok(ObjectPath::new(get_str(
        r,
        super::name::MAX_OBJECT_PATH_BYTES,
    )?)?)
}

fn finish(r: &[u8]) -> Result<(), DecodeError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Trailing(r.len()))
    }
}

/// The protocol version this build speaks. ALPN names the protocol family; this number
/// lets both ends evolve the message set without a new ALPN.
pub const PROTOCOL_VERSION: u16 = 1;

/// Opening bytes of every `Hello`, so a confused peer is told apart from an old one.
const HELLO_MAGIC: &[u8; 4] = b"TPD\x01";

/// Largest single read a request may ask for: one chunk of the largest size. Bounds the
/// work and memory one request can demand.
pub const MAX_READ_BYTES: u64 = super::manifest::MAX_CHUNK_BYTES as u64;

/// Most entries in one listing page; with paths up to 1 KiB it still fits in a frame.
pub const MAX_LIST_ENTRIES: usize = 1000;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::frame::FrameKind;
    use crate::proto::manifest::MIN_CHUNK_BYTES;
    use crate::proto::name::NameError;

    fn dataset() -> impl Strategy<Value = DatasetName> {
        "[a-z0-9][a-z0-9._-]{0,20}".prop_map(|s| DatasetName::new(&s).unwrap())
    }

    fn object() -> impl Strategy<Value = ObjectPath> {
        proptest::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._ -]{0,12}", 1..4)
            .prop_map(|segs| ObjectPath::new(&segs.join("/")).unwrap())
    }

    fn manifest() -> impl Strategy<Value = Manifest> {
        (0usize..200_000, any::<u8>()).prop_map(|(len, seed)| {
            let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed).collect();
            Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap()
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::ListDatasets),
            any::<u64>().prop_map(|known| Request::PolicyWatch { known }),
            (
                dataset(),
                "[a-z/]{0,10}",
                proptest::option::of(object()),
                any::<u32>()
            )
                .prop_map(|(dataset, prefix, start_after, limit)| {
                    Request::ListObjects {
                        dataset,
                        prefix,
                        start_after,
                        limit,
                    }
                }),
            (dataset(), object()).prop_map(|(dataset, object)| Request::Stat { dataset, object }),
            (dataset(), object())
                .prop_map(|(dataset, object)| Request::OpenRead { dataset, object }),
            (dataset(), object(), any::<[u8; 16]>()).prop_map(|(dataset, object, group)| {
                Request::OpenReadPart {
                    dataset,
                    object,
                    group,
                }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(t, offset, len)| {
                Request::Read {
                    transfer: TransferId(t),
                    offset,
                    len,
                }
            }),
            (dataset(), object(), manifest()).prop_map(|(dataset, object, manifest)| {
                Request::OpenWrite {
                    dataset,
                    object,
                    manifest,
                }
            }),
            (dataset(), object(), manifest(), any::<[u8; 16]>()).prop_map(
                |(dataset, object, manifest, group)| Request::OpenWritePart {
                    dataset,
                    object,
                    manifest,
                    group,
                }
            ),
            (any::<u64>(), any::<u32>()).prop_map(|(t, c)| Request::WriteChunk {
                transfer: TransferId(t),
                chunk: ChunkIndex(c)
            }),
            any::<u64>().prop_map(|t| Request::Commit {
                transfer: TransferId(t)
            }),
            any::<u64>().prop_map(|t| Request::Close {
                transfer: TransferId(t)
            }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            proptest::collection::vec(dataset(), 0..10).prop_map(Response::Datasets),
            (
                proptest::collection::vec((object(), any::<u64>()), 0..10),
                any::<bool>()
            )
                .prop_map(|(es, more)| Response::Objects {
                    entries: es
                        .into_iter()
                        .map(|(path, size)| ObjectEntry { path, size })
                        .collect(),
                    more
                }),
            manifest().prop_map(Response::Manifest),
            (any::<u64>(), manifest()).prop_map(|(t, manifest)| Response::OpenedRead {
                transfer: TransferId(t),
                manifest
            }),
            (
                any::<u64>(),
                0u32..300,
                proptest::collection::vec(any::<u32>(), 0..20)
            )
                .prop_map(|(t, n, picks)| {
                    let mut have = ChunkSet::new(n);
                    for p in picks {
                        if n > 0 {
                            have.insert(ChunkIndex(p % n));
                        }
                    }
                    Response::OpenedWrite {
                        transfer: TransferId(t),
                        have,
                    }
                }),
            any::<u32>().prop_map(|c| Response::ChunkStored(ChunkIndex(c))),
            any::<[u8; 32]>().prop_map(|r| Response::Committed { root: Digest(r) }),
            Just(Response::Closed),
            any::<u64>().prop_map(|epoch| Response::Policy { epoch }),
        ]
    }

    #[test]
    fn hello_negotiates_and_refuses() {
        let h = Hello::current();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.negotiate(), Some(PROTOCOL_VERSION));
        let future = Hello {
            min_version: 7,
            max_version: 9,
        };
        assert_eq!(future.negotiate(), None);
        assert_eq!(Hello::decode(b"HTTP/1.1"), Err(DecodeError::Magic));
    }

    #[test]
    fn error_codes_are_stable() {
        // These numbers are on the wire; changing one breaks deployed peers.
        assert_eq!(ErrorCode::NotFound as u16, 4);
        assert_eq!(ErrorCode::Busy as u16, 6);
        assert_eq!(ErrorCode::Corrupt as u16, 8);
        assert_eq!(ErrorCode::Internal as u16, 15);
        assert_eq!(ErrorCode::AuditUnavailable as u16, 16);
        for c in 1..=16u16 {
            assert_eq!(ErrorCode::from_u16(c) as u16, c);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Internal);
        assert_eq!(
            ErrorCode::decode(&ErrorCode::Range.encode()),
            Ok(ErrorCode::Range)
        );
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocation() {
        // A listing claiming u32::MAX entries in a 5-byte payload.
        let mut b = BytesMut::new();
        b.put_u8(1);
        b.put_u32(u32::MAX);
        assert_eq!(
            Response::decode(&b),
            Err(DecodeError::TooLong {
                len: u32::MAX as usize,
                max: MAX_LIST_ENTRIES
            })
        );
        // A path claiming 60 000 bytes.
        let mut b = BytesMut::new();
        b.put_u8(3);
        put_str(&mut b, "ds");
        b.put_u16(60_000);
        assert!(matches!(
            Request::decode(&b),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn traversal_in_requests_is_refused_at_decode() {
        let mut b = BytesMut::new();
        b.put_u8(4);
        put_str(&mut b, "ds");
        put_str(&mut b, "../../etc/passwd");
        assert_eq!(
            Request::decode(&b),
            Err(DecodeError::Name(NameError::DotSegment))
        );
        let mut b = BytesMut::new();
        b.put_u8(4);
        put_str(&mut b, "..");
        put_str(&mut b, "x");
        assert!(matches!(Request::decode(&b), Err(DecodeError::Name(_))));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut enc = BytesMut::from(&Request::ListDatasets.encode()[..]);
        enc.put_u8(0);
        assert_eq!(Request::decode(&enc), Err(DecodeError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            let enc = req.encode();
            prop_assert_eq!(Request::decode(&enc).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(resp in response()) {
            let enc = resp.encode();
            prop_assert_eq!(Response::decode(&enc).unwrap(), resp);
        }

        #[test]
        fn hello_ack_round_trips(v in any::<u16>(), s in any::<u32>(), t in any::<u32>(), c in any::<u32>()) {
            let ack = HelloAck { version: v, max_streams: s, max_transfers: t, chunk_bytes: c };
            prop_assert_eq!(HelloAck::decode(&ack.encode()).unwrap(), ack);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = HelloAck::decode(&bytes);
            let _ = ErrorCode::decode(&bytes);
        }

        #[test]
        fn hello_round_trips_and_negotiates(min in any::<u16>(), max in any::<u16>()) {
            let hello = Hello { min_version: min, max_version: max };
            let enc = hello.encode();
            prop_assert_eq!(enc.len(), 8);
            prop_assert_eq!(Hello::decode(&enc), Ok(hello.clone()));
            let speaks = min <= PROTOCOL_VERSION && PROTOCOL_VERSION <= max;
            prop_assert_eq!(hello.negotiate(), speaks.then_some(PROTOCOL_VERSION));
        }

        #[test]
        fn error_codes_round_trip_for_every_wire_value(c in any::<u16>()) {
            let code = ErrorCode::from_u16(c);
            let enc = code.encode();
            prop_assert_eq!(enc.len(), 2);
            prop_assert_eq!(ErrorCode::decode(&enc), Ok(code));
            if code != ErrorCode::Internal {
                prop_assert_eq!(code as u16, c);
            }
        }

        #[test]
        fn request_lengths_match_the_layout_and_the_frame_claim(req in request()) {
            let enc = req.encode();
            prop_assert_eq!(enc.len(), request_len(&req), "{}", req.name());
            prop_assert_eq!(framed(FrameKind::Request, &enc), enc.clone());
            prop_assert_eq!(Request::decode(&enc), Ok(req));
        }

        #[test]
        fn response_lengths_match_the_layout_and_the_frame_claim(resp in response()) {
            let enc = resp.encode();
            prop_assert_eq!(enc.len(), response_len(&resp));
            prop_assert_eq!(framed(FrameKind::Response, &enc), enc.clone());
            prop_assert_eq!(Response::decode(&enc), Ok(resp));
        }

        #[test]
        fn hello_ack_and_error_lengths_match_the_frame_claim(
            v in any::<u16>(), s in any::<u32>(), c in any::<u16>(),
        ) {
            let ack = HelloAck { version: v, max_streams: s, max_transfers: s, chunk_bytes: s };
            let enc = ack.encode();
            prop_assert_eq!(enc.len(), 14);
            prop_assert_eq!(framed(FrameKind::HelloAck, &enc), enc);
            let enc = Hello { min_version: v, max_version: c }.encode();
            prop_assert_eq!(framed(FrameKind::Hello, &enc), enc);
            let enc = ErrorCode::from_u16(c).encode();
            prop_assert_eq!(framed(FrameKind::Error, &enc), enc);
        }

        #[test]
        fn damaged_messages_never_panic_and_what_decodes_is_canonical(
            msg in prop_oneof![
                request().prop_map(|r| r.encode()),
                response().prop_map(|r| r.encode()),
            ],
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..6),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
            extra in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            // Valid messages with a few bytes changed, cut short or extended get deep into
            // the decoders, where random bytes rarely go.
            let mut bytes = msg.to_vec();
            for (at, b) in edits {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len() + 1));
            }
            bytes.extend_from_slice(&extra);
            if let Ok(r) = Request::decode(&bytes) {
                prop_assert_eq!(&r.encode()[..], &bytes[..]);
            }
            if let Ok(r) = Response::decode(&bytes) {
                prop_assert_eq!(&r.encode()[..], &bytes[..]);
            }
        }
    }

    /// Wraps a payload in a frame of `kind`, checks the header claims exactly the payload
    /// and the frame's length, and hands back the payload the frame decodes to.
    fn framed(kind: FrameKind, payload: &Bytes) -> Bytes {
        use crate::proto::frame::{Frame, HEADER_LEN};
        let frame = Frame::new(kind, 7, payload.clone());
        assert_eq!(frame.header().len as usize, payload.len());
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + payload.len());
        assert_eq!(buf.len(), frame.encoded_len());
        Frame::decode(&mut buf).unwrap().unwrap().payload
    }

    /// A string on the wire: u16 length, then the bytes.
    fn str_len(s: &str) -> usize {
        2 + s.len()
    }

    /// The encoded length of a request, from the layout the module documents.
    fn request_len(r: &Request) -> usize {
        1 + match r {
            Request::ListDatasets => 0,
            Request::ListObjects {
                dataset,
                prefix,
                start_after,
                ..
            } => {
                str_len(dataset.as_str())
                    + str_len(prefix)
                    + 1
                    + start_after.as_ref().map_or(0, |p| str_len(p.as_str()))
                    + 4
            }
            Request::Stat { dataset, object } | Request::OpenRead { dataset, object } => {
                str_len(dataset.as_str()) + str_len(object.as_str())
            }
            Request::OpenReadPart {
                dataset, object, ..
            } => str_len(dataset.as_str()) + str_len(object.as_str()) + 16,
            Request::Read { .. } => 8 + 8 + 8,
            Request::OpenWrite {
                dataset,
                object,
                manifest,
            } => str_len(dataset.as_str()) + str_len(object.as_str()) + manifest.encoded_len(),
            Request::OpenWritePart {
                dataset,
                object,
                manifest,
                ..
            } => str_len(dataset.as_str()) + str_len(object.as_str()) + manifest.encoded_len() + 16,
            Request::WriteChunk { .. } => 8 + 4,
            Request::Commit { .. } | Request::Close { .. } | Request::PolicyWatch { .. } => 8,
            Request::RdmaOpen { offer, .. } => 8 + offer.encoded_len(),
        }
    }

    /// The encoded length of a response, from the layout the module documents.
    fn response_len(r: &Response) -> usize {
        1 + match r {
            Response::Datasets(names) => {
                4 + names.iter().map(|n| str_len(n.as_str())).sum::<usize>()
            }
            Response::Objects { entries, .. } => {
                4 + entries
                    .iter()
                    .map(|e| str_len(e.path.as_str()) + 8)
                    .sum::<usize>()
                    + 1
            }
            Response::Manifest(m) => m.encoded_len(),
            Response::OpenedRead { manifest, .. } => 8 + manifest.encoded_len(),
            Response::OpenedWrite { have, .. } => 8 + have.encoded_len(),
            Response::ChunkStored(_) => 4,
            Response::Committed { .. } => 32,
            Response::Closed => 0,
            Response::RdmaAccepted { info, .. } => 16 + 2 + info.len(),
            Response::Policy { .. } => 8,
        }
    }
}
