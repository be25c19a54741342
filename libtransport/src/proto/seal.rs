//! RDMA chunk sealing: AES-256-GCM under per-direction keys exported from the authenticated
//! TLS session, sequence-number nonces, and a replay window. Pure code: no I/O, no clock.
//!
//! An RDMA fabric does not encrypt, so every chunk that crosses it is sealed:
//!
//! ```text
//!  0    1     2          4        8               16              24        28        32              40
//! +----+-----+----------+--------+---------------+---------------+---------+---------+---------------+-------------+-----+
//! | v1 | 0   | reserved | epoch  | seq           | transfer      | chunk   | len     | offset        | ciphertext  | tag |
//! | u8 | u8  | u16 = 0  | u32 BE | u64 BE        | u64 BE        | u32 BE  | u32 BE  | u64 BE        | len bytes   | 16  |
//! +----+-----+----------+--------+---------------+---------------+---------+---------+---------------+-------------+-----+
//! ```
//!
//! * Keys: both sides run the TLS keying-material exporter with [`EXPORTER_LABEL`] and a
//!   context naming the RDMA session ([`exporter_context`]); [`SessionKeys::derive`] splits
//!   the output into a key and an IV per direction. No secret crosses the control channel.
//! * Nonce: the direction's IV XOR the 64-bit sequence number (as TLS 1.3 does), so a nonce
//!   never repeats under one key.
//! * Additional data: the session ID, the direction and the whole header, so a chunk cannot
//!   be replayed into another session, turned around, or moved to another transfer, chunk
//!   or offset without failing authentication.
//! * The receiver ([`Opener`]) checks the header against what it expects in that place,
//!   keeps a replay window over sequence numbers, opens in place, and hands out plaintext
//!   only after the tag verified. After [`MAX_OPEN_FAILURES`] failures it refuses
//!   everything: the caller aborts the transfer.
//! * Keys are updated (epoch + 1, the next key derived from the current one) before the
//!   AEAD usage limits are near, in the spirit of RFC 8446 §5.5; see [`KeyLimits`].

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

/// Label of our TLS keying-material exporter (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-transportd-rdma-v1";

/// Bytes the exporter must produce: a 32-byte key and a 12-byte IV per direction.
pub const EXPORTER_BYTES: usize = 2 * (KEY_BYTES + NONCE_LEN);

/// Bytes of the sealed header.
pub const HEADER_LEN: usize = 40;

/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;

/// Largest chunk one seal covers.
pub const MAX_SEALED_CHUNK: usize = 64 << 20;

/// Failures an [`Opener`] tolerates before it refuses everything.
pub const MAX_OPEN_FAILURES: u32 = 8;

/// Sequence numbers the replay window remembers behind the highest seen.
pub const REPLAY_WINDOW: u64 = 256;

const KEY_BYTES: usize = 32;
const VERSION: u8 = 1;
const KEY_UPDATE_INFO: &[u8] = b"transportd rdma key update v1";

/// The exporter context for an RDMA session: its 16-byte ID, chosen by the server and
/// announced over the authenticated control channel.
pub fn exporter_context(session: &[u8; 16]) -> Vec<u8> {
    let mut c = b"transportd rdma session ".to_vec();
    c.extend_from_slice(session);
    c
}

/// Which way a chunk travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the TLS client to the TLS server (a push).
    ClientToServer,
    /// From the TLS server to the TLS client (a pull).
    ServerToClient,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Self::ClientToServer => 0x01,
            Self::ServerToClient => 0x02,
        }
    }
}

/// When to update a key: after this many chunks or bytes under it, whichever comes first.
/// The defaults stay far below AES-GCM's limits for the chunk sizes in use (RFC 8446 §5.5
/// allows about 2^24.5 full-size records, and the integrity bound of RFC 9001 §6.6 is
/// 2^52 forgery attempts; a key here seals at most 2^23 chunks or 2^36 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// Chunks sealed under one key.
    pub max_chunks: u64,
    /// Bytes sealed under one key.
    pub max_bytes: u64,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self {
            max_chunks: 1 << 23,
            max_bytes: 1 << 36,
        }
    }
}

/// The key material of one RDMA session, both directions.
pub struct SessionKeys {
    session: [u8; 16],
    c2s: Zeroizing<[u8; KEY_BYTES + NONCE_LEN]>,
    s2c: Zeroizing<[u8; KEY_BYTES + NONCE_LEN]>,
}

impl SessionKeys {
    /// Splits the exporter's output for `session` into per-direction keys and IVs.
    pub fn derive(session: [u8; 16], exported: &[u8; EXPORTER_BYTES]) -> Self {
        let mut c2s = Zeroizing::new([0u8; KEY_BYTES + NONCE_LEN]);
        let mut s2c = Zeroizing::new([0u8; KEY_BYTES + NONCE_LEN]);
        c2s.copy_from_slice(&exported[..KEY_BYTES + NONCE_LEN]);
        s2c.copy_from_slice(&exported[KEY_BYTES + NONCE_LEN..]);
        Self { session, c2s, s2c }
    }

    /// The session ID.
    pub fn session(&self) -> &[u8; 16] {
        &self.session
    }

    /// A sealer for chunks sent in `direction`.
    pub fn sealer(&self, direction: Direction, limits: KeyLimits) -> Sealer {
        Sealer {
            keys: DirectionKey::new(self.material(direction), self.session, direction),
            seq: 0,
            chunks: 0,
            bytes: 0,
            limits,
        }
    }

    /// An opener for chunks received from `direction`.
    pub fn opener(&self, direction: Direction) -> Opener {
        Opener {
            current: DirectionKey::new(self.material(direction), self.session, direction),
            previous: None,
            first_seq_of_current: 0,
            window: ReplayWindow::default(),
            failures: 0,
        }
    }

    fn material(&self, d: Direction) -> &[u8; KEY_BYTES + NONCE_LEN] {
        match d {
            Direction::ClientToServer => &self.c2s,
            Direction::ServerToClient => &self.s2c,
        }
    }
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys").finish_non_exhaustive()
    }
}

/// Where a sealed chunk belongs: the receiver names what it expects in a place, and the
/// header must say the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The transfer.
    pub transfer: u64,
    /// The chunk's index in its object.
    pub chunk: u32,
    /// The chunk's offset in its object.
    pub offset: u64,
    /// The chunk's plaintext length.
    pub len: u32,
}

/// Seals chunks for one direction, updating its key before the limits.
pub struct Sealer {
    keys: DirectionKey,
    seq: u64,
    chunks: u64,
    bytes: u64,
    limits: KeyLimits,
}

impl Sealer {
    /// Seals `buf[HEADER_LEN..HEADER_LEN + len]` in place for `at`: writes the header in
    /// front and the tag behind, so `buf` must hold `sealed_len(len)` bytes. Returns the
    /// sealed length.
    pub fn seal(&mut self, at: Placement, buf: &mut [u8]) -> Result<usize, SealError> {
        let len = at.len as usize;
        if len > MAX_SEALED_CHUNK {
            return Err(SealError::TooLarge(len));
        }
        let total = sealed_len(len);
        let Some(buf) = buf.get_mut(..total) else {
            return Err(SealError::Buffer {
                need: total,
                have: buf.len(),
            });
        };
        if self.chunks >= self.limits.max_chunks
            || self.bytes.saturating_add(len as u64) > self.limits.max_bytes
        {
            self.keys = self.keys.next();
            self.chunks = 0;
            self.bytes = 0;
        }
        let seq = self.seq;
        self.seq = self.seq.checked_add(1).ok_or(SealError::Exhausted)?;
        let header = Header {
            epoch: self.keys.epoch,
            seq,
            placement: at,
        };
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        header.encode(head);
        let (data, tag) = rest.split_at_mut(len);
        let aad = self.keys.aad(head);
        let t = self
            .keys
            .key
            .seal_in_place_separate_tag(self.keys.nonce(seq), Aad::from(&aad[..]), data)
            .map_err(|_| SealError::Crypto)?;
        tag.copy_from_slice(t.as_ref());
        self.chunks += 1;
        self.bytes += len as u64;
        Ok(total)
    }

    /// The current key epoch (0 until the first update).
    pub fn epoch(&self) -> u32 {
        self.keys.epoch
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("epoch", &self.keys.epoch)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// Opens chunks from one direction: checks placement, replay and tag.
pub struct Opener {
    current: DirectionKey,
    previous: Option<DirectionKey>,
    first_seq_of_current: u64,
    window: ReplayWindow,
    failures: u32,
}

impl Opener {
    /// Opens a sealed chunk in place, expecting it to be `expect`. On success returns the
    /// plaintext (a slice of `sealed`); on failure the bytes are not plaintext and must not
    /// be used, and the failure counts towards [`MAX_OPEN_FAILURES`].
    pub fn open<'a>(
        &mut self,
        expect: Placement,
        sealed: &'a mut [u8],
    ) -> Result<&'a [u8], OpenError> {
        let range = self.open_range(expect, sealed)?;
        Ok(&sealed[range])
    }

    /// As [`Opener::open`], returning where in `sealed` the plaintext lies.
    pub fn open_range(
        &mut self,
        expect: Placement,
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, OpenError> {
        if self.failures >= MAX_OPEN_FAILURES {
            return Err(OpenError::TooManyFailures);
        }
        self.try_open(expect, sealed).inspect_err(|_| {
            self.failures += 1;
        })
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn try_open(
        &mut self,
        expect: Placement,
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, OpenError> {
        let header = Header::decode(sealed)?;
        if header.placement != expect {
            return Err(OpenError::Relocated {
                expected: expect,
                found: header.placement,
            });
        }
        let len = expect.len as usize;
        let total = sealed_len(len);
        let sealed = sealed.get_mut(..total).ok_or(OpenError::Truncated)?;
        self.window.check(header.seq)?;
        // The sender may have moved to the next key. Follow it only once a chunk under that
        // key has authenticated: a header is not, and a forged one must not move us.
        let next = (header.epoch == self.current.epoch.wrapping_add(1)
            && header.seq >= self.first_seq_of_current)
            .then(|| self.current.next());
        let key = if header.epoch == self.current.epoch {
            &self.current
        } else if let Some(next) = &next {
            next
        } else if self
            .previous
            .as_ref()
            .is_some_and(|p| p.epoch == header.epoch && header.seq < self.first_seq_of_current)
        {
            self.previous
                .as_ref()
                .ok_or(OpenError::Epoch(header.epoch))?
        } else {
            return Err(OpenError::Epoch(header.epoch));
        };
        let (head, rest) = sealed.split_at_mut(HEADER_LEN);
        let aad = key.aad(head);
        let plain = key
            .key
            .open_in_place(key.nonce(header.seq), Aad::from(&aad[..]), rest)
            .map_err(|_| OpenError::Tampered)?;
        debug_assert_eq!(plain.len(), len);
        if let Some(next) = next {
            // Keep the old key for chunks of its epoch still in flight.
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.first_seq_of_current = header.seq;
        }
        self.window.accept(header.seq);
        Ok(HEADER_LEN..HEADER_LEN + len)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("epoch", &self.current.epoch)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// Bytes a sealed chunk of `len` plaintext bytes occupies.
pub const fn sealed_len(len: usize) -> usize {
    HEADER_LEN + len + TAG_LEN
}

/// Why a chunk could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The chunk is larger than one seal covers.
    #[error("chunk of {0} bytes is larger than a seal covers")]
    TooLarge(usize),
    /// The buffer cannot hold header, chunk and tag.
    #[error("sealing needs {need} bytes of buffer, {have} given")]
    Buffer {
        /// Needed.
        need: usize,
        /// Given.
        have: usize,
    },
    /// 2^64 chunks were sealed in one direction.
    #[error("sequence numbers exhausted; start a new session")]
    Exhausted,
    /// The AEAD failed.
    #[error("sealing failed")]
    Crypto,
}

/// Why a sealed chunk was refused. The receiver aborts the transfer after
/// [`MAX_OPEN_FAILURES`] of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Shorter than a header and tag.
    #[error("sealed chunk is truncated")]
    Truncated,
    /// An unknown version or non-zero reserved bits.
    #[error("sealed chunk has an unknown version")]
    Version,
    /// The header names another place than the one it arrived in.
    #[error("chunk was relocated: expected {expected:?}, found {found:?}")]
    Relocated {
        /// What the receiver expected.
        expected: Placement,
        /// What the header says.
        found: Placement,
    },
    /// A sequence number seen before.
    #[error("chunk {0} was replayed")]
    Replayed(u64),
    /// A sequence number too far behind the window.
    #[error("chunk {0} is outside the replay window")]
    OutOfWindow(u64),
    /// A key epoch the receiver does not hold.
    #[error("chunk sealed under unknown key epoch {0}")]
    Epoch(u32),
    /// The tag did not verify: the chunk, its header or its session was altered.
    #[error("chunk failed authentication")]
    Tampered,
    /// Too many failures: the transfer must be aborted.
    #[error("too many chunks failed; the transfer is aborted")]
    TooManyFailures,
}

/// One direction's key, IV and epoch.
struct DirectionKey {
    key: LessSafeKey,
    secret: Zeroizing<[u8; KEY_BYTES]>,
    iv: [u8; NONCE_LEN],
    session: [u8; 16],
    direction: Direction,
    epoch: u32,
}

impl DirectionKey {
    fn new(
        material: &[u8; KEY_BYTES + NONCE_LEN],
        session: [u8; 16],
        direction: Direction,
    ) -> Self {
        let mut secret = Zeroizing::new([0u8; KEY_BYTES]);
        secret.copy_from_slice(&material[..KEY_BYTES]);
        let mut iv = [0u8; NONCE_LEN];
        iv.copy_from_slice(&material[KEY_BYTES..]);
        Self::from_parts(secret, iv, session, direction, 0)
    }

    fn from_parts(
        secret: Zeroizing<[u8; KEY_BYTES]>,
        iv: [u8; NONCE_LEN],
        session: [u8; 16],
        direction: Direction,
        epoch: u32,
    ) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        let key = match UnboundKey::new(&AES_256_GCM, &secret[..]) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable_key(),
        };
        Self {
            key,
            secret,
            iv,
            session,
            direction,
            epoch,
        }
    }

    /// The next epoch's key: HKDF-Expand of the current secret (as TLS 1.3's KeyUpdate).
    fn next(&self) -> Self {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.secret[..]);
        let mut next = Zeroizing::new([0u8; KEY_BYTES]);
        let info = [KEY_UPDATE_INFO];
        // Expanding 32 bytes from SHA-256 is always within HKDF's limit.
        if let Ok(okm) = prk.expand(&info, KeyLen) {
            let _ = okm.fill(&mut next[..]);
        }
        Self::from_parts(
            next,
            self.iv,
            self.session,
            self.direction,
            self.epoch.wrapping_add(1),
        )
    }

    fn nonce(&self, seq: u64) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    fn aad(&self, header: &[u8]) -> [u8; 16 + 1 + HEADER_LEN] {
        let mut a = [0u8; 16 + 1 + HEADER_LEN];
        a[..16].copy_from_slice(&self.session);
        a[16] = self.direction.byte();
        a[17..].copy_from_slice(&header[..HEADER_LEN]);
        a
    }
}

#[cold]
fn unreachable_key() -> LessSafeKey {
    // UnboundKey::new fails only for a key of the wrong length, and ours is 32 bytes.
    panic!("AES-256 key of 32 bytes refused")
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        KEY_BYTES
    }
}

/// The sealed header.
struct Header {
    epoch: u32,
    seq: u64,
    placement: Placement,
}

impl Header {
    fn encode(&self, out: &mut [u8]) {
        out[0] = VERSION;
        out[1] = 0;
        out[2..4].copy_from_slice(&[0, 0]);
        out[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.placement.transfer.to_be_bytes());
        out[24..28].copy_from_slice(&self.placement.chunk.to_be_bytes());
        out[28..32].copy_from_slice(&self.placement.len.to_be_bytes());
        out[32..40].copy_from_slice(&self.placement.offset.to_be_bytes());
    }

    fn decode(b: &[u8]) -> Result<Self, OpenError> {
        let h = b.get(..HEADER_LEN).ok_or(OpenError::Truncated)?;
        if h[0] != VERSION || h[1] != 0 || h[2] != 0 || h[3] != 0 {
            return Err(OpenError::Version);
        }
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Ok(Self {
            epoch: u32_at(4),
            seq: u64_at(8),
            placement: Placement {
                transfer: u64_at(16),
                chunk: u32_at(24),
                len: u32_at(28),
                offset: u64_at(32),
            },
        })
    }
}

/// Which sequence numbers were seen: the highest, and a bitmap of the window behind it.
#[derive(Debug, Default)]
struct ReplayWindow {
    /// One more than the highest accepted sequence number (0: none yet).
    top: u64,
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn check(&self, seq: u64) -> Result<(), OpenError> {
        if seq >= self.top {
            return Ok(());
        }
        let behind = self.top - 1 - seq;
        if behind >= REPLAY_WINDOW {
            return Err(OpenError::OutOfWindow(seq));
        }
        if self.bit(behind) {
            return Err(OpenError::Replayed(seq));
        }
        Ok(())
    }

    fn accept(&mut self, seq: u64) {
        if seq >= self.top {
            let shift = seq + 1 - self.top;
            self.shift(shift);
            self.top = seq + 1;
            self.set(0);
        } else {
            self.set(self.top - 1 - seq);
        }
    }

    fn bit(&self, behind: u64) -> bool {
        self.seen[(behind / 64) as usize] & (1 << (behind % 64)) != 0
    }

    fn set(&mut self, behind: u64) {
        self.seen[(behind / 64) as usize] |= 1 << (behind % 64);
    }

    /// Moves every remembered bit `n` places further behind.
    fn shift(&mut self, n: u64) {
        if n >= REPLAY_WINDOW {
            self.seen = Default::default();
            return;
        }
        for _ in 0..n {
            let mut carry = 0;
            for w in self.seen.iter_mut() {
                let next = *w >> 63;
                *w = (*w << 1) | carry;
                carry = next;
            }
        }
    }
}

#[cfg(test)]
mod tests;
