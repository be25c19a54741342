//! Object manifests: chunk layout, per-chunk BLAKE3 hashes and the object's root hash.
//!
//! An object of `size` bytes is cut into chunks of `chunk_bytes` (the last may be short).
//! The manifest lists each chunk's BLAKE3 hash; the root hash binds the size, the chunk
//! size and every chunk hash in order, so two manifests with the same root describe the
//! same bytes. A receiver verifies each chunk against its hash before the chunk counts.
//!
//! Chunk size starts at [`DEFAULT_CHUNK_BYTES`] and doubles for very large objects so a
//! manifest never lists more than [`MAX_CHUNKS`] chunks (and always fits in one frame).

use std::fmt;
use std::ops::Range;

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(blake3::hash(data).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(h.into()))
    }

    /// The first 16 hex characters, enough to tell objects apart in logs.
    pub fn short(&self) -> String {
        let mut hex = self.to_hex();
        hex.truncate(16);
        hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex characters"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// The index of a chunk within its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIndex(pub u32);

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An object's manifest. Construct with [`ManifestBuilder`] or [`Manifest::from_parts`];
/// every constructor checks the layout and computes or checks the root.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    size: u64,
    chunk_bytes: u32,
    chunks: Vec<Digest>,
    root: Digest,
}

impl Manifest {
    /// Builds a manifest from its parts, checking the layout and computing the root.
    pub fn from_parts(
        size: u64,
        chunk_bytes: u32,
        chunks: Vec<Digest>,
    ) -> Result<Self, ManifestError> {
        check_layout(size, chunk_bytes, chunks.len())?;
        let root = root_of(size, chunk_bytes, &chunks);
        Ok(Self {
            size,
            chunk_bytes,
            chunks,
            root,
        })
    }

    /// Like [`Manifest::from_parts`], and also checks a root received from a peer.
    pub fn from_parts_with_root(
        size: u64,
        chunk_bytes: u32,
        chunks: Vec<Digest>,
        root: Digest,
    ) -> Result<Self, ManifestError> {
        let m = Self::from_parts(size, chunk_bytes, chunks)?;
        if m.root != root {
            return Err(ManifestError::RootMismatch);
        }
        Ok(m)
    }

    /// Builds the manifest of an in-memory object.
    pub fn of_bytes(data: &[u8], chunk_bytes: u32) -> Result<Self, ManifestError> {
        let mut b = ManifestBuilder::new(data.len() as u64, chunk_bytes)?;
        b.update(data)?;
        b.finish()
    }

    /// Object size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes (the last chunk may be shorter).
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // check_layout bounds the count by MAX_CHUNKS.
        self.chunks.len() as u32
    }

    /// Chunk hashes in order.
    pub fn chunks(&self) -> &[Digest] {
        &self.chunks
    }

    /// The root hash: the object's identity.
    pub fn root(&self) -> Digest {
        self.root
    }

    /// Byte range of a chunk within the object, or `None` if out of range.
    pub fn chunk_range(&self, index: ChunkIndex) -> Option<Range<u64>> {
        if index.0 >= self.chunk_count() {
            return None;
        }
        let start = u64::from(index.0) * u64::from(self.chunk_bytes);
        let end = (start + u64::from(self.chunk_bytes)).min(self.size);
        Some(start..end)
    }

    /// The chunks covering `range` of the object.
    pub fn chunks_covering(&self, range: Range<u64>) -> Range<u32> {
        if range.start >= range.end || range.start >= self.size {
            return 0..0;
        }
        let cb = u64::from(self.chunk_bytes);
        let first = range.start / cb;
        let last = (range.end.min(self.size) - 1) / cb;
        // Both are below chunk_count, which fits in u32.
        (first as u32)..(last as u32 + 1)
    }

    /// Checks a whole chunk against its hash.
    pub fn verify_chunk(&self, index: ChunkIndex, data: &[u8]) -> Result<(), ChunkError> {
        let range = self
            .chunk_range(index)
            .ok_or(ChunkError::OutOfRange(index))?;
        if data.len() as u64 != range.end - range.start {
            return Err(ChunkError::Length {
                index,
                expected: range.end - range.start,
                actual: data.len() as u64,
            });
        }
        self.check_digest(index, Digest::of(data))
    }

    /// Checks a chunk's hash, computed by the caller (for chunks held in pieces).
    pub fn check_digest(&self, index: ChunkIndex, digest: Digest) -> Result<(), ChunkError> {
        let want = self
            .chunks
            .get(index.0 as usize)
            .ok_or(ChunkError::OutOfRange(index))?;
        if *want != digest {
            return Err(ChunkError::Corrupt(index));
        }
        Ok(())
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        8 + 4 + 32 + 4 + 32 * self.chunks.len()
    }

    /// Appends the wire encoding: size u64, chunk_bytes u32, root, count u32, hashes.
    pub fn encode(&self, out: &mut bytes::BytesMut) {
        use bytes::BufMut;
        out.reserve(self.encoded_len());
        out.put_u64(self.size);
        out.put_u32(self.chunk_bytes);
        out.put_slice(&self.root.0);
        out.put_u32(self.chunk_count());
        for c in &self.chunks {
            out.put_slice(&c.0);
        }
    }

    /// Decodes from the front of `buf`, advancing it. The chunk count is checked against
    /// the layout and [`MAX_CHUNKS`] before anything is allocated, and the root is checked.
    pub fn decode(buf: &mut &[u8]) -> Result<Self, ManifestError> {
        use bytes::Buf;
        if buf.remaining() < 8 + 4 + 32 + 4 {
            return Err(ManifestError::Truncated);
        }
        let size = buf.get_u64();
        let chunk_bytes = buf.get_u32();
        let mut root = [0u8; 32];
        buf.copy_to_slice(&mut root);
        let count = buf.get_u32() as usize;
        check_layout(size, chunk_bytes, count)?;
        if buf.remaining() < count * 32 {
            return Err(ManifestError::Truncated);
        }
        let mut chunks = Vec::with_capacity(count);
        for _ in 0..count {
            let mut d = [0u8; 32];
            buf.copy_to_slice(&mut d);
            chunks.push(Digest(d));
        }
        Self::from_parts_with_root(size, chunk_bytes, chunks, Digest(root))
    }
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("size", &self.size)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("chunks", &self.chunks.len())
            .field("root", &self.root)
            .finish()
    }
}

/// Computes a manifest from an object's bytes, fed in order in pieces of any size.
#[derive(Debug)]
pub struct ManifestBuilder {
    size: u64,
    chunk_bytes: u32,
    fed: u64,
    in_chunk: u64,
    hasher: blake3::Hasher,
    chunks: Vec<Digest>,
}

impl ManifestBuilder {
    /// Starts a manifest for an object of `size` bytes with chunks of `chunk_bytes`.
    pub fn new(size: u64, chunk_bytes: u32) -> Result<Self, ManifestError> {
        let count = chunk_count_for(size, chunk_bytes)?;
        check_layout(size, chunk_bytes, count)?;
        Ok(Self {
            size,
            chunk_bytes,
            fed: 0,
            in_chunk: 0,
            hasher: blake3::Hasher::new(),
            chunks: Vec::with_capacity(count),
        })
    }

    /// Feeds the next bytes of the object.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), ManifestError> {
        if self.fed + data.len() as u64 > self.size {
            return Err(ManifestError::SizeMismatch {
                expected: self.size,
                actual: self.fed + data.len() as u64,
            });
        }
        self.fed += data.len() as u64;
        while !data.is_empty() {
            let room = u64::from(self.chunk_bytes) - self.in_chunk;
            let take = room.min(data.len() as u64) as usize;
            self.hasher.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == u64::from(self.chunk_bytes) {
                self.push_chunk();
            }
        }
        Ok(())
    }

    /// Finishes; fails if fewer than `size` bytes were fed.
    pub fn finish(mut self) -> Result<Manifest, ManifestError> {
        if self.fed != self.size {
            return Err(ManifestError::SizeMismatch {
                expected: self.size,
                actual: self.fed,
            });
        }
        if self.in_chunk > 0 {
            self.push_chunk();
        }
        Manifest::from_parts(self.size, self.chunk_bytes, self.chunks)
    }

    fn push_chunk(&mut self) {
        self.chunks.push(Digest(self.hasher.finalize().into()));
        self.hasher.reset();
        self.in_chunk = 0;
    }
}

/// The chunk size for an object of `size` bytes: `preferred`, doubled until the manifest
/// lists at most [`MAX_CHUNKS`] chunks. Fails if even [`MAX_CHUNK_BYTES`] is not enough.
pub fn chunk_bytes_for(size: u64, preferred: u32) -> Result<u32, ManifestError> {
    let mut cb = preferred
        .clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        .next_power_of_two();
    while size.div_ceil(u64::from(cb)) > MAX_CHUNKS as u64 {
        if cb >= MAX_CHUNK_BYTES {
            return Err(ManifestError::TooLarge(size));
        }
        cb *= 2;
    }
    Ok(cb)
}

/// A set of chunk indices, such as the chunks a receiver already holds.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkSet {
    bits: Vec<u8>,
    len: u32,
}

impl ChunkSet {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Self {
            bits: vec![0; (len as usize).div_ceil(8)],
            len,
        }
    }

    /// Number of chunks the set ranges over.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True if the set ranges over no chunks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a chunk; indices past the end are ignored.
    pub fn insert(&mut self, i: ChunkIndex) {
        if i.0 < self.len {
            self.bits[(i.0 / 8) as usize] |= 1 << (i.0 % 8);
        }
    }

    /// True if the chunk is in the set.
    pub fn contains(&self, i: ChunkIndex) -> bool {
        i.0 < self.len && self.bits[(i.0 / 8) as usize] & (1 << (i.0 % 8)) != 0
    }

    /// Number of chunks in the set.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// True if every chunk is present.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// Chunks not in the set, in order.
    pub fn missing(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        (0..self.len).map(ChunkIndex).filter(|i| !self.contains(*i))
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        4 + self.bits.len()
    }

    /// Appends the wire encoding: len u32 then the bitmap, chunk 0 in bit 0 of byte 0.
    pub fn encode(&self, out: &mut bytes::BytesMut) {
        use bytes::BufMut;
        out.put_u32(self.len);
        out.put_slice(&self.bits);
    }

    /// Decodes from the front of `buf`; bounded by [`MAX_CHUNKS`]; stray high bits refused.
    pub fn decode(buf: &mut &[u8]) -> Result<Self, ManifestError> {
        use bytes::Buf;
        if buf.remaining() < 4 {
            return Err(ManifestError::Truncated);
        }
        let len = buf.get_u32();
        if len > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks(len as usize));
        }
        let n = (len as usize).div_ceil(8);
        if buf.remaining() < n {
            return Err(ManifestError::Truncated);
        }
        let bits = buf[..n].to_vec();
        buf.advance(n);
        if !len.is_multiple_of(8) && bits.last().is_some_and(|b| b >> (len % 8) != 0) {
            return Err(ManifestError::StrayBits);
        }
        Ok(Self { bits, len })
    }
}

impl fmt::Debug for ChunkSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkSet({}/{})", self.count(), self.len)
    }
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The encoding ended early.
    #[error("manifest is truncated")]
    Truncated,
    /// The chunk size is not a power of two within the allowed range.
    #[error("chunk size {0} is not a power of two between 64 KiB and 64 MiB")]
    ChunkSize(u32),
    /// More chunks than a manifest may list.
    #[error("manifest lists {0} chunks; at most 16384 are allowed")]
    TooManyChunks(usize),
    /// The chunk count does not match size and chunk size.
    #[error("manifest lists {actual} chunks but its size needs {expected}")]
    ChunkCount {
        /// Chunks the layout needs.
        expected: usize,
        /// Chunks listed.
        actual: usize,
    },
    /// The root does not match the chunk hashes.
    #[error("manifest root does not match its chunk hashes")]
    RootMismatch,
    /// The object is larger than the largest manifest can describe.
    #[error("object of {0} bytes is too large for one manifest")]
    TooLarge(u64),
    /// A builder was fed a different number of bytes than announced.
    #[error("object has {actual} bytes but {expected} were announced")]
    SizeMismatch {
        /// Announced size.
        expected: u64,
        /// Bytes fed.
        actual: u64,
    },
    /// A chunk set carries bits past its length.
    #[error("chunk set has bits set past its end")]
    StrayBits,
}

/// Why a chunk was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The chunk's bytes do not hash to the manifest's value.
    #[error("chunk {0} failed verification")]
    Corrupt(ChunkIndex),
    /// The chunk has the wrong length.
    #[error("chunk {index} has {actual} bytes, expected {expected}")]
    Length {
        /// Which chunk.
        index: ChunkIndex,
        /// Expected length.
        expected: u64,
        /// Received length.
        actual: u64,
    },
    /// No such chunk.
    #[error("chunk {0} is outside the object")]
    OutOfRange(ChunkIndex),
}

fn chunk_count_for(size: u64, chunk_bytes: u32) -> Result<usize, ManifestError> {
    if !valid_chunk_bytes(chunk_bytes) {
        return Err(ManifestError::ChunkSize(chunk_bytes));
    }
    let count = size.div_ceil(u64::from(chunk_bytes));
    if count > u64::from(MAX_CHUNKS) {
        return Err(ManifestError::TooLarge(size));
    }
    Ok(count as usize)
}

fn check_layout(size: u64, chunk_bytes: u32, count: usize) -> Result<(), ManifestError> {
    if count > MAX_CHUNKS as usize {
        return Err(ManifestError::TooManyChunks(count));
    }
    let expected = chunk_count_for(size, chunk_bytes)?;
    if expected != count {
        return Err(ManifestError::ChunkCount {
            expected,
            actual: count,
        });
    }
    Ok(())
}

fn valid_chunk_bytes(cb: u32) -> bool {
    cb.is_power_of_two() && (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&cb)
}

fn root_of(size: u64, chunk_bytes: u32, chunks: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(&size.to_le_bytes());
    h.update(&chunk_bytes.to_le_bytes());
    for c in chunks {
        h.update(&c.0);
    }
    Digest(h.finalize().into())
}

/// BLAKE3 key-derivation context for root hashes, so a root can never be confused with the
/// hash of some chunk's bytes.
const ROOT_CONTEXT: &str = "transportd 2026-11 manifest root v1";

/// Default chunk size: big enough to amortise per-request costs, small enough that a resume
/// loses little and many chunks fit in flight.
pub const DEFAULT_CHUNK_BYTES: u32 = 4 << 20;

/// Smallest chunk size a manifest may use.
pub const MIN_CHUNK_BYTES: u32 = 64 << 10;

/// Largest chunk size: bounds the memory a receiver holds per chunk in flight.
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;

/// Most chunks a manifest may list: 16 384 hashes are 512 KiB, one frame. With
/// [`MAX_CHUNK_BYTES`] this caps an object at 1 TiB.
pub const MAX_CHUNKS: u32 = 16_384;

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn root_known_answer_is_stable() {
        // Pin the root derivation: a change here breaks every stored manifest and peer.
        let m = Manifest::of_bytes(b"", MIN_CHUNK_BYTES).unwrap();
        assert_eq!(m.chunk_count(), 0);
        let m2 = Manifest::of_bytes(&[0x5a; 100], MIN_CHUNK_BYTES).unwrap();
        assert_eq!(m2.chunks()[0], Digest::of(&[0x5a; 100]));
        assert_ne!(m.root(), m2.root());
        let again = Manifest::of_bytes(&[0x5a; 100], MIN_CHUNK_BYTES).unwrap();
        assert_eq!(m2.root(), again.root());
        assert_eq!(
            m2.root().to_hex(),
            "75545bbc1a53d36d1fb24e468d7c5e703019a7acde28b5e176152417e5f22a00"
        );
        // Same bytes with another chunk size is another manifest.
        let other = Manifest::of_bytes(&[0x5a; 100], MIN_CHUNK_BYTES * 2).unwrap();
        assert_ne!(m2.root(), other.root());
    }

    #[test]
    fn chunk_ranges_and_verification() {
        let data: Vec<u8> = (0..(MIN_CHUNK_BYTES as usize * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let m = Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap();
        assert_eq!(m.chunk_count(), 3);
        let last = m.chunk_range(ChunkIndex(2)).unwrap();
        assert_eq!(last.end - last.start, 10);
        assert_eq!(m.chunk_range(ChunkIndex(3)), None);
        for i in 0..3 {
            let r = m.chunk_range(ChunkIndex(i)).unwrap();
            m.verify_chunk(ChunkIndex(i), &data[r.start as usize..r.end as usize])
                .unwrap();
        }
        let mut bad = data[..MIN_CHUNK_BYTES as usize].to_vec();
        bad[17] ^= 1;
        assert_eq!(
            m.verify_chunk(ChunkIndex(0), &bad),
            Err(ChunkError::Corrupt(ChunkIndex(0)))
        );
        assert!(matches!(
            m.verify_chunk(ChunkIndex(2), &[0; 9]),
            Err(ChunkError::Length { .. })
        ));
        assert_eq!(m.chunks_covering(0..1), 0..1);
        assert_eq!(
            m.chunks_covering(u64::from(MIN_CHUNK_BYTES) - 1..u64::from(MIN_CHUNK_BYTES) + 1),
            0..2
        );
        assert_eq!(m.chunks_covering(5..5), 0..0);
        assert_eq!(m.chunks_covering(0..u64::MAX), 0..3);
    }

    #[test]
    fn builder_in_pieces_matches_whole() {
        let data = vec![3u8; 300_000];
        let whole = Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap();
        let mut b = ManifestBuilder::new(data.len() as u64, MIN_CHUNK_BYTES).unwrap();
        for piece in data.chunks(7777) {
            b.update(piece).unwrap();
        }
        assert_eq!(b.finish().unwrap(), whole);

        let mut short = ManifestBuilder::new(10, MIN_CHUNK_BYTES).unwrap();
        short.update(&[0; 5]).unwrap();
        assert!(matches!(
            short.finish(),
            Err(ManifestError::SizeMismatch { .. })
        ));
        let mut long = ManifestBuilder::new(10, MIN_CHUNK_BYTES).unwrap();
        assert!(long.update(&[0; 11]).is_err());
    }

    #[test]
    fn chunk_size_scales_for_huge_objects() {
        assert_eq!(
            chunk_bytes_for(1 << 30, DEFAULT_CHUNK_BYTES).unwrap(),
            4 << 20
        );
        // 1 TiB needs 64 MiB chunks to stay within 16384 chunks.
        assert_eq!(
            chunk_bytes_for(1 << 40, DEFAULT_CHUNK_BYTES).unwrap(),
            64 << 20
        );
        assert!(chunk_bytes_for((1 << 40) + 1, DEFAULT_CHUNK_BYTES).is_err());
        assert_eq!(chunk_bytes_for(10, 1).unwrap(), MIN_CHUNK_BYTES);
    }

    #[test]
    fn decoding_refuses_bad_layouts_without_allocating_claims() {
        let m = Manifest::of_bytes(&[1u8; 1000], MIN_CHUNK_BYTES).unwrap();
        let mut enc = BytesMut::new();
        m.encode(&mut enc);

        // A claimed count of u32::MAX is refused by the layout check before any Vec.
        let mut huge = enc.clone();
        huge[44..48].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Manifest::decode(&mut &huge[..]),
            Err(ManifestError::TooManyChunks(_))
        ));

        let mut bad_root = enc.clone();
        bad_root[12] ^= 1;
        assert_eq!(
            Manifest::decode(&mut &bad_root[..]),
            Err(ManifestError::RootMismatch)
        );

        let mut bad_cb = enc.clone();
        bad_cb[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(
            Manifest::decode(&mut &bad_cb[..]),
            Err(ManifestError::ChunkSize(1000))
        );

        assert_eq!(
            Manifest::decode(&mut &enc[..enc.len() - 1]),
            Err(ManifestError::Truncated)
        );
    }

    #[test]
    fn chunk_set_operations() {
        let mut s = ChunkSet::new(10);
        s.insert(ChunkIndex(0));
        s.insert(ChunkIndex(9));
        s.insert(ChunkIndex(10)); // ignored
        assert_eq!(s.count(), 2);
        assert!(s.contains(ChunkIndex(9)) && !s.contains(ChunkIndex(10)));
        assert_eq!(s.missing().count(), 8);
        let mut enc = BytesMut::new();
        s.encode(&mut enc);
        assert_eq!(ChunkSet::decode(&mut &enc[..]).unwrap(), s);
        let mut stray = enc.clone();
        stray[5] |= 0x80;
        assert_eq!(
            ChunkSet::decode(&mut &stray[..]),
            Err(ManifestError::StrayBits)
        );
    }

    proptest! {
        #[test]
        fn manifest_round_trips(len in 0usize..400_000, seed in any::<u8>(), shift in 0u32..3) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let m = Manifest::of_bytes(&data, MIN_CHUNK_BYTES << shift).unwrap();
            let mut enc = BytesMut::new();
            m.encode(&mut enc);
            prop_assert_eq!(enc.len(), m.encoded_len());
            let mut slice = &enc[..];
            let back = Manifest::decode(&mut slice).unwrap();
            prop_assert!(slice.is_empty());
            prop_assert_eq!(back, m);
        }

        #[test]
        fn manifest_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Manifest::decode(&mut &bytes[..]);
            let _ = ChunkSet::decode(&mut &bytes[..]);
        }

        #[test]
        fn chunk_set_round_trips(len in 0u32..2000, picks in proptest::collection::vec(any::<u32>(), 0..50)) {
            let mut s = ChunkSet::new(len);
            for p in picks { if len > 0 { s.insert(ChunkIndex(p % len)); } }
            let mut enc = BytesMut::new();
            s.encode(&mut enc);
            prop_assert_eq!(enc.len(), s.encoded_len());
            prop_assert_eq!(ChunkSet::decode(&mut &enc[..]).unwrap(), s);
        }

        #[test]
        fn manifests_from_parts_round_trip_at_every_size(
            size in prop_oneof![0u64..1 << 20, any::<u64>()],
            shift in 0u32..11,
            seed in any::<u8>(),
        ) {
            // Layouts of any size the limits allow, up to 1 TiB, without hashing that much:
            // the chunk hashes are made up, the root is computed from them.
            let chunk_bytes = MIN_CHUNK_BYTES << shift;
            let Ok(count) = chunk_count_for(size, chunk_bytes) else {
                prop_assert!(size.div_ceil(u64::from(chunk_bytes)) > u64::from(MAX_CHUNKS));
                return Ok(());
            };
            let chunks = (0..count).map(|i| Digest([(i as u8) ^ seed; 32])).collect();
            let m = Manifest::from_parts(size, chunk_bytes, chunks).unwrap();
            let mut enc = BytesMut::new();
            m.encode(&mut enc);
            prop_assert_eq!(enc.len(), m.encoded_len());
            prop_assert_eq!(m.encoded_len(), 48 + 32 * count);
            let mut slice = &enc[..];
            prop_assert_eq!(Manifest::decode(&mut slice).unwrap(), m.clone());
            prop_assert!(slice.is_empty());
            // The chunks cover the object exactly, in order.
            let mut end = 0;
            for i in 0..m.chunk_count() {
                let r = m.chunk_range(ChunkIndex(i)).unwrap();
                prop_assert_eq!(r.start, end);
                prop_assert!(r.end > r.start);
                end = r.end;
            }
            prop_assert_eq!(end, size);
        }

        #[test]
        fn claimed_counts_are_refused_unless_the_bytes_are_there(
            size in any::<u64>(),
            chunk_bytes in prop_oneof![Just(MIN_CHUNK_BYTES), Just(MAX_CHUNK_BYTES), any::<u32>()],
            count in prop_oneof![0u32..4, Just(MAX_CHUNKS), Just(MAX_CHUNKS + 1), any::<u32>()],
            present in 0usize..5,
            set_len in any::<u32>(),
        ) {
            // A header claiming `count` hashes with only `present` behind it: the claim is
            // checked against MAX_CHUNKS, the layout and the bytes actually there before the
            // decoder allocates for it.
            let mut b = BytesMut::new();
            b.put_u64(size);
            b.put_u32(chunk_bytes);
            b.put_slice(&[0; 32]);
            b.put_u32(count);
            b.put_bytes(7, 32 * present);
            match Manifest::decode(&mut &b[..]) {
                Ok(m) => prop_assert!(m.chunk_count() as usize <= present),
                Err(ManifestError::Truncated) => prop_assert!((count as usize) > present),
                Err(ManifestError::TooManyChunks(n)) => prop_assert!(n > MAX_CHUNKS as usize),
                Err(_) => {}
            }
            let mut b = BytesMut::new();
            b.put_u32(set_len);
            b.put_bytes(0, present);
            match ChunkSet::decode(&mut &b[..]) {
                Ok(s) => prop_assert!((s.len() as usize).div_ceil(8) <= present),
                Err(ManifestError::TooManyChunks(n)) => prop_assert!(n > MAX_CHUNKS as usize),
                Err(e) => prop_assert_eq!(e, ManifestError::Truncated),
            }
        }

        #[test]
        fn damaged_manifests_never_panic_and_what_decodes_is_canonical(
            len in 0usize..300_000,
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let data = vec![0x5a; len];
            let m = Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap();
            let mut enc = BytesMut::new();
            m.encode(&mut enc);
            let mut have = ChunkSet::new(m.chunk_count());
            have.insert(ChunkIndex(0));
            have.encode(&mut enc);
            let mut bytes = enc.to_vec();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len() + 1));
            }
            let mut rest = &bytes[..];
            if let Ok(back) = Manifest::decode(&mut rest) {
                let mut again = BytesMut::new();
                back.encode(&mut again);
                prop_assert_eq!(&again[..], &bytes[..bytes.len() - rest.len()]);
                if let Ok(s) = ChunkSet::decode(&mut rest) {
                    prop_assert!(s.count() <= s.len());
                }
            }
        }
    }
}
