//! RDMA control messages, carried over the QUIC control stream of an RDMA session: what the
//! receiver offers (its device, its receive ring) and, chunk by chunk, which ring slot the
//! sender may write which chunk into. Pure code; bounded decoders.
//!
//! ```text
//!  client (receiver)                                   server (sender)
//!  Request::RdmaOpen { transfer, offer } ───────────▶  checks device, config, transfer
//!                                        ◀───────────  Response::RdmaAccepted { session, info }
//!  (both derive keys from the TLS exporter with the session's context)
//!  Grant { slot, chunk } ... ────────────────────────▶  seal chunk, RDMA WRITE WITH IMM (imm = slot)
//!  (WriteWithImm completion: open in place, verify, deliver, grant the slot again)
//!  Finish ───────────────────────────────────────────▶  ends the session
//! ```
//!
//! Both ends of the exchange are pure machines in [`grant`]; the drivers only move grants
//! and chunks between them and the devices.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::decode::DecodeError;

pub mod grant;

/// What a receiver offers when it asks for an RDMA session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOffer {
    /// The device kind: software (`soft`) or hardware (`hw`). Both sides must match.
    pub device: DeviceKind,
    /// The receiver's connection parameters for its queue pair.
    pub info: Bytes,
    /// The receive ring: where the sender may write.
    pub ring_addr: u64,
    /// Its length in bytes.
    pub ring_len: u64,
    /// Its remote key.
    pub ring_rkey: u32,
    /// Bytes per slot (a sealed chunk: header, chunk, tag).
    pub slot_bytes: u32,
    /// Slots in the ring: the most chunks in flight.
    pub slots: u32,
    /// Chunks move unsealed. Kept in the wire format, but no client offers it and every
    /// server refuses such an offer with [`crate::proto::ErrorCode::NoRdma`].
    pub unsealed: bool,
}

/// Which kind of verbs device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The software device over a socket.
    Soft,
    /// An RDMA NIC.
    Hardware,
}

impl DeviceKind {
    fn byte(self) -> u8 {
        match self {
            Self::Soft => 1,
            Self::Hardware => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            1 => Ok(Self::Soft),
            2 => Ok(Self::Hardware),
            t => Err(DecodeError::Tag(t)),
        }
    }
}

impl RdmaOffer {
    /// Appends the encoding to `b`.
    pub fn encode(&self, b: &mut BytesMut) {
        b.put_u8(self.device.byte());
        b.put_u8(u8::from(self.unsealed));
        b.put_u16(u16::try_from(self.info.len()).unwrap_or(u16::MAX));
        b.put_slice(&self.info[..self.info.len().min(usize::from(u16::MAX))]);
        b.put_u64(self.ring_addr);
        b.put_u64(self.ring_len);
        b.put_u32(self.ring_rkey);
        b.put_u32(self.slot_bytes);
        b.put_u32(self.slots);
    }

    /// Decodes from the front of `r`.
    pub fn decode(r: &mut &[u8]) -> Result<Self, DecodeError> {
        let device = DeviceKind::from_byte(get_u8(r)?)?;
        let unsealed = match get_u8(r)? {
            0 => false,
            1 => true,
            t => return Err(DecodeError::Tag(t)),
        };
        let n = usize::from(get_u16(r)?);
        if n > MAX_INFO_BYTES {
            return Err(DecodeError::TooLong {
                len: n,
                max: MAX_INFO_BYTES,
            });
        }
        let info = Bytes::copy_from_slice(take(r, n)?);
        let offer = Self {
            device,
            info,
            ring_addr: get_u64(r)?,
            ring_len: get_u64(r)?,
            ring_rkey: get_u32(r)?,
            slot_bytes: get_u32(r)?,
            slots: get_u32(r)?,
            unsealed,
        };
        if offer.slots == 0 || offer.slots > MAX_SLOTS {
            return Err(DecodeError::TooLong {
                len: offer.slots as usize,
                max: MAX_SLOTS as usize,
            });
        }
        if u64::from(offer.slot_bytes) * u64::from(offer.slots) > offer.ring_len {
            return Err(DecodeError::TooLong {
                len: (u64::from(offer.slot_bytes) * u64::from(offer.slots)) as usize,
                max: offer.ring_len as usize,
            });
        }
        Ok(offer)
    }

    /// Bytes of the encoding.
    pub fn encoded_len(&self) -> usize {
        1 + 1 + 2 + self.info.len() + 8 + 8 + 4 + 4 + 4
    }
}

/// A receiver's message during an RDMA session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaControl {
    /// Write chunk `chunk` into ring slot `slot`.
    Grant {
        /// The slot.
        slot: u32,
        /// The chunk.
        chunk: u32,
    },
    /// The receiver has what it wanted: end the session.
    Finish,
}

impl RdmaControl {
    /// Encodes to a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(9);
        match self {
            Self::Grant { slot, chunk } => {
                b.put_u8(1);
                b.put_u32(*slot);
                b.put_u32(*chunk);
            }
            Self::Finish => b.put_u8(2),
        }
        b.freeze()
    }

    /// Decodes a payload.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut buf;
        let m = match get_u8(r)? {
            1 => Self::Grant {
                slot: get_u32(r)?,
                chunk: get_u32(r)?,
            },
            2 => Self::Finish,
            t => return Err(DecodeError::Tag(t)),
        };
        if !r.is_empty() {
            return Err(DecodeError::Trailing(r.len()));
        }
        Ok(m)
    }
}

/// Longest queue-pair connection parameters accepted.
pub const MAX_INFO_BYTES: usize = 1024;

/// Most ring slots (chunks in flight) a receiver may offer.
pub const MAX_SLOTS: u32 = 256;

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if r.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Ok(head)
}

fn get_u8(r: &mut &[u8]) -> Result<u8, DecodeError> {
    Ok(take(r, 1)?[0])
}

fn get_u16(r: &mut &[u8]) -> Result<u16, DecodeError> {
    let mut b = take(r, 2)?;
    Ok(b.get_u16())
}

fn get_u32(r: &mut &[u8]) -> Result<u32, DecodeError> {
    let mut b = take(r, 4)?;
    Ok(b.get_u32())
}

fn get_u64(r: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut b = take(r, 8)?;
    Ok(b.get_u64())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn offer() -> impl Strategy<Value = RdmaOffer> {
        (
            prop_oneof![Just(DeviceKind::Soft), Just(DeviceKind::Hardware)],
            proptest::collection::vec(any::<u8>(), 0..MAX_INFO_BYTES),
            any::<u64>(),
            1u32..(64 << 20),
            1u32..=MAX_SLOTS,
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(device, info, addr, slot_bytes, slots, rkey, unsealed)| {
                RdmaOffer {
                    device,
                    info: Bytes::from(info),
                    ring_addr: addr,
                    ring_len: u64::from(slot_bytes) * u64::from(slots),
                    ring_rkey: rkey,
                    slot_bytes,
                    slots,
                    unsealed,
                }
            })
    }

    proptest! {
        #[test]
        fn offers_round_trip(o in offer()) {
            let mut b = BytesMut::new();
            o.encode(&mut b);
            prop_assert_eq!(b.len(), o.encoded_len());
            let mut r = &b[..];
            prop_assert_eq!(RdmaOffer::decode(&mut r).unwrap(), o);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn controls_round_trip(slot in any::<u32>(), chunk in any::<u32>()) {
            for m in [RdmaControl::Grant { slot, chunk }, RdmaControl::Finish] {
                prop_assert_eq!(RdmaControl::decode(&m.encode()).unwrap(), m);
            }
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RdmaControl::decode(&bytes);
            let _ = RdmaOffer::decode(&mut &bytes[..]);
        }
    }

    #[test]
    fn offers_that_overrun_their_ring_or_limits_are_refused() {
        let good = RdmaOffer {
            device: DeviceKind::Soft,
            info: Bytes::from_static(b"x"),
            ring_addr: 0,
            ring_len: 4096,
            ring_rkey: 1,
            slot_bytes: 1024,
            slots: 4,
            unsealed: false,
        };
        let enc = |o: &RdmaOffer| {
            let mut b = BytesMut::new();
            o.encode(&mut b);
            b
        };
        assert!(RdmaOffer::decode(&mut &enc(&good)[..]).is_ok());
        for bad in [
            RdmaOffer {
                slots: 5,
                ..good.clone()
            },
            RdmaOffer {
                slots: 0,
                ..good.clone()
            },
            RdmaOffer {
                slots: MAX_SLOTS + 1,
                ring_len: u64::MAX,
                ..good.clone()
            },
        ] {
            assert!(RdmaOffer::decode(&mut &enc(&bad)[..]).is_err(), "{bad:?}");
        }
        // An info length claiming more than allowed is refused before it is read.
        let mut b = BytesMut::new();
        b.put_u8(1);
        b.put_u8(0);
        b.put_u16(u16::MAX);
        assert!(matches!(
            RdmaOffer::decode(&mut &b[..]),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
