//! The protocol core, without I/O: frames, messages, names, manifests, and the machines that
//! decide a connection's opening (`connection`), each request's answer (`request`), a
//! transfer's attempts (`transfer`, `schedule`, `retry`) and an RDMA session's sealing
//! (`seal`).
//!
//! Nothing in here touches a socket, a file, a clock or tokio. Drivers in
//! [`crate::transport`] read bytes, hand them to these decoders and write what the encoders
//! produce. Every decoder is bounded: lengths are checked against limits before any
//! allocation, and hostile input yields a typed error, never a panic.

pub mod connection;
mod decode;
pub mod frame;
pub mod manifest;
pub mod message;
pub mod name;
pub mod rdma;
pub mod request;
pub mod retry;
pub mod schedule;
pub mod seal;
pub mod transfer;

pub use decode::DecodeError;
pub use frame::{Frame, FrameError, FrameHeader, FrameKind};
pub use manifest::{
    ChunkError, ChunkIndex, ChunkSet, Digest, Manifest, ManifestBuilder, ManifestError,
};
pub use message::{ErrorCode, Hello, HelloAck, ObjectEntry, Request, Response, TransferId};
pub use name::{DatasetName, NameError, ObjectPath};
