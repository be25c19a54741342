//! The software device's bytes: its connection parameters (`local_info`), the handshake, and
//! the message header. Pure code, no I/O. All integers are big-endian; nothing is encrypted
//! (the device models a fabric; the protocol above seals).
//!
//! ```text
//! local_info (28 or 40 bytes):
//!   "TDSV" | version u8 = 1 | family u8 (4|6) | port u16 | ip (4|16 bytes) | token (16 bytes)
//!
//! hello, dialer -> acceptor (40 bytes):  "TDSOFTv1" | dialer token | acceptor token
//! hello reply, acceptor -> dialer (8):   "TDSOFTok"
//! confirmation, dialer -> acceptor (8):  "TDSOFTgo"   (a dialer that gave up sends none)
//!
//! message header (32 bytes), followed by `len` payload bytes for WRITE_IMM and SEND:
//!  0    1        2          4          8         12        16        20         24
//! +----+--------+----------+----------+---------+---------+---------+----------+-----------+
//! | op | status | reserved | seq      | len     | imm     | rkey    | reserved | addr      |
//! | u8 | u8     | u16 = 0  | u32      | u32     | u32     | u32     | u32 = 0  | u64       |
//! +----+--------+----------+----------+---------+---------+---------+----------+-----------+
//!   op: 1 WRITE_IMM, 2 SEND, 3 ACK (status 0) or NAK (status names the error; no payload)
//! ```
//!
//! Requests carry consecutive sequence numbers; the responder acknowledges each, in order,
//! with the request's `seq`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::transport::rdma::verbs::{
    CompletionError, InfoError, PeerMisbehaved, RKey, RemoteAccessError,
};

/// Bytes of the random token in `local_info`.
pub(crate) const TOKEN_LEN: usize = 16;

/// Bytes of a message header.
pub(crate) const HEADER_LEN: usize = 32;

/// Bytes of the dialer's hello.
pub(crate) const HELLO_LEN: usize = 8 + 2 * TOKEN_LEN;

/// The acceptor's reply to a good hello.
pub(crate) const HELLO_REPLY: [u8; 8] = *b"TDSOFTok";

/// The dialer's confirmation that it is still there and takes the connection.
pub(crate) const HELLO_CONFIRM: [u8; 8] = *b"TDSOFTgo";

const INFO_MAGIC: [u8; 4] = *b"TDSV";
const INFO_VERSION: u8 = 1;
const HELLO_MAGIC: [u8; 8] = *b"TDSOFTv1";

/// A token naming one device for one connection.
pub(crate) type Token = [u8; TOKEN_LEN];

/// The software device's connection parameters: where to connect and what to present.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Info {
    pub(crate) addr: SocketAddr,
    pub(crate) token: Token,
}

impl std::fmt::Debug for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a (weak) credential: never print it.
        f.debug_struct("Info")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Info {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(36);
        out.extend_from_slice(&INFO_MAGIC);
        out.push(INFO_VERSION);
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&self.addr.port().to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&self.addr.port().to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.token);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, InfoError> {
        let need = |needed: usize| {
            if bytes.len() < needed {
                Err(InfoError::Incomplete {
                    needed,
                    got: bytes.len(),
                })
            } else {
                Ok(())
            }
        };
        need(6)?;
        if bytes[0..4] != INFO_MAGIC || bytes[4] != INFO_VERSION {
            return Err(InfoError::WrongKind);
        }
        let ip_len = match bytes[5] {
            4 => 4,
            6 => 16,
            _ => return Err(InfoError::Invalid("address family")),
        };
        let total = 8 + ip_len + TOKEN_LEN;
        need(total)?;
        if bytes.len() > total {
            return Err(InfoError::TrailingBytes(bytes.len() - total));
        }
        let port = u16::from_be_bytes([bytes[6], bytes[7]]);
        let ip = if ip_len == 4 {
            IpAddr::V4(Ipv4Addr::from(array::<4>(&bytes[8..12])))
        } else {
            IpAddr::V6(Ipv6Addr::from(array::<16>(&bytes[8..24])))
        };
        if port == 0 || ip.is_unspecified() || ip.is_multicast() {
            return Err(InfoError::Invalid("address"));
        }
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            token: array(&bytes[8 + ip_len..total]),
        })
    }
}

/// The dialer's hello: its own token and the token of the acceptor it means.
pub(crate) fn encode_hello(dialer: &Token, acceptor: &Token) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..8].copy_from_slice(&HELLO_MAGIC);
    out[8..8 + TOKEN_LEN].copy_from_slice(dialer);
    out[8 + TOKEN_LEN..].copy_from_slice(acceptor);
    out
}

/// Whether a hello comes from the peer we expect (`dialer`) and means us (`acceptor`).
/// Compares without early exit, so timing does not reveal how much of a token matched.
pub(crate) fn hello_matches(hello: &[u8; HELLO_LEN], dialer: &Token, acceptor: &Token) -> bool {
    let expected = encode_hello(dialer, acceptor);
    hello
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// A message's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    WriteImm,
    Send,
    Ack,
}

/// The responder's verdict on a request, carried by an ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckStatus {
    Ok,
    UnknownKey,
    OutOfBounds,
    RangeBusy,
    ReceiverNotReady,
    TooLong,
}

impl AckStatus {
    fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::UnknownKey => 1,
            Self::OutOfBounds => 2,
            Self::RangeBusy => 3,
            Self::ReceiverNotReady => 4,
            Self::TooLong => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Ok,
            1 => Self::UnknownKey,
            2 => Self::OutOfBounds,
            3 => Self::RangeBusy,
            4 => Self::ReceiverNotReady,
            5 => Self::TooLong,
            _ => return None,
        })
    }

    /// What the requester's completion says.
    pub(crate) fn into_result(self) -> Result<(), CompletionError> {
        Err(match self {
            Self::Ok => return Ok(()),
            Self::UnknownKey => CompletionError::RemoteAccess(RemoteAccessError::UnknownKey),
            Self::OutOfBounds => CompletionError::RemoteAccess(RemoteAccessError::OutOfBounds),
            Self::RangeBusy => CompletionError::RemoteAccess(RemoteAccessError::RangeBusy),
            Self::ReceiverNotReady => CompletionError::ReceiverNotReady,
            Self::TooLong => CompletionError::RemoteInvalidRequest,
        })
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) op: Op,
    pub(crate) status: AckStatus,
    pub(crate) seq: u32,
    pub(crate) len: u32,
    pub(crate) imm: u32,
    pub(crate) rkey: RKey,
    pub(crate) addr: u64,
}

impl Header {
    pub(crate) fn write_imm(seq: u32, len: u32, imm: u32, rkey: RKey, addr: u64) -> Self {
        Self {
            op: Op::WriteImm,
            status: AckStatus::Ok,
            seq,
            len,
            imm,
            rkey,
            addr,
        }
    }

    pub(crate) fn send(seq: u32, len: u32) -> Self {
        Self {
            op: Op::Send,
            status: AckStatus::Ok,
            seq,
            len,
            imm: 0,
            rkey: RKey(0),
            addr: 0,
        }
    }

    pub(crate) fn ack(seq: u32, status: AckStatus) -> Self {
        Self {
            op: Op::Ack,
            status,
            seq,
            len: 0,
            imm: 0,
            rkey: RKey(0),
            addr: 0,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = match self.op {
            Op::WriteImm => 1,
            Op::Send => 2,
            Op::Ack => 3,
        };
        out[1] = self.status.code();
        out[4..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..12].copy_from_slice(&self.len.to_be_bytes());
        out[12..16].copy_from_slice(&self.imm.to_be_bytes());
        out[16..20].copy_from_slice(&self.rkey.0.to_be_bytes());
        out[24..32].copy_from_slice(&self.addr.to_be_bytes());
        out
    }

    /// Decodes a header; `max_len` bounds a request's payload.
    pub(crate) fn decode(bytes: &[u8; HEADER_LEN], max_len: u32) -> Result<Self, PeerMisbehaved> {
        let op = match bytes[0] {
            1 => Op::WriteImm,
            2 => Op::Send,
            3 => Op::Ack,
            _ => return Err(PeerMisbehaved::InvalidHeader),
        };
        let status = AckStatus::from_code(bytes[1]).ok_or(PeerMisbehaved::InvalidHeader)?;
        if bytes[2..4] != [0, 0] || bytes[20..24] != [0; 4] {
            return Err(PeerMisbehaved::InvalidHeader);
        }
        let h = Self {
            op,
            status,
            seq: u32::from_be_bytes(array(&bytes[4..8])),
            len: u32::from_be_bytes(array(&bytes[8..12])),
            imm: u32::from_be_bytes(array(&bytes[12..16])),
            rkey: RKey(u32::from_be_bytes(array(&bytes[16..20]))),
            addr: u64::from_be_bytes(array(&bytes[24..32])),
        };
        match h.op {
            Op::Ack if h.len != 0 => Err(PeerMisbehaved::InvalidHeader),
            Op::WriteImm | Op::Send if h.status != AckStatus::Ok => {
                Err(PeerMisbehaved::InvalidHeader)
            }
            Op::WriteImm | Op::Send if h.len > max_len => Err(PeerMisbehaved::MessageTooLarge),
            _ => Ok(h),
        }
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn info_known_bytes() {
        let info = Info {
            addr: "127.0.0.1:4660".parse().unwrap(),
            token: [0xab; TOKEN_LEN],
        };
        let bytes = info.encode();
        let mut expected = b"TDSV\x01\x04\x12\x34\x7f\x00\x00\x01".to_vec();
        expected.extend_from_slice(&[0xab; TOKEN_LEN]);
        assert_eq!(bytes, expected);
        assert_eq!(Info::decode(&bytes), Ok(info));
    }

    #[test]
    fn info_refuses_bad_input() {
        let info = Info {
            addr: "[::1]:9".parse().unwrap(),
            token: [1; TOKEN_LEN],
        };
        let bytes = info.encode();
        assert_eq!(bytes.len(), 40);
        assert_eq!(
            Info::decode(&bytes[..39]),
            Err(InfoError::Incomplete {
                needed: 40,
                got: 39
            })
        );
        assert_eq!(
            Info::decode(&[bytes.as_slice(), &[0]].concat()),
            Err(InfoError::TrailingBytes(1))
        );
        let mut other = bytes.clone();
        other[4] = 2;
        assert_eq!(Info::decode(&other), Err(InfoError::WrongKind));
        let mut family = bytes.clone();
        family[5] = 5;
        assert_eq!(
            Info::decode(&family),
            Err(InfoError::Invalid("address family"))
        );
        let unspecified = Info {
            addr: "0.0.0.0:9".parse().unwrap(),
            token: [1; TOKEN_LEN],
        };
        assert_eq!(
            Info::decode(&unspecified.encode()),
            Err(InfoError::Invalid("address"))
        );
    }

    #[test]
    fn hello_checks_both_tokens() {
        let (a, b) = ([1u8; TOKEN_LEN], [2u8; TOKEN_LEN]);
        let hello = encode_hello(&a, &b);
        assert!(hello_matches(&hello, &a, &b));
        assert!(!hello_matches(&hello, &b, &a));
        let mut wrong = hello;
        wrong[HELLO_LEN - 1] ^= 1;
        assert!(!hello_matches(&wrong, &a, &b));
    }

    #[test]
    fn header_known_bytes() {
        let h = Header::write_imm(
            7,
            0x100,
            0xdead_beef,
            RKey(0x0102_0304),
            0x1122_3344_5566_7788,
        );
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [
                1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 1, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 0, 0, 0, 0,
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(Header::decode(&bytes, u32::MAX), Ok(h));
    }

    #[test]
    fn header_refuses_bad_input() {
        let ok = Header::send(1, 10).encode();
        assert_eq!(Header::decode(&ok, 9), Err(PeerMisbehaved::MessageTooLarge));
        for (at, value) in [(0, 0u8), (0, 4), (1, 1), (1, 200), (2, 1), (21, 1)] {
            let mut bad = ok;
            bad[at] = value;
            assert_eq!(
                Header::decode(&bad, u32::MAX),
                Err(PeerMisbehaved::InvalidHeader),
                "byte {at} = {value}"
            );
        }
        let mut ack_with_payload = Header::ack(1, AckStatus::Ok).encode();
        ack_with_payload[11] = 1;
        assert_eq!(
            Header::decode(&ack_with_payload, u32::MAX),
            Err(PeerMisbehaved::InvalidHeader)
        );
    }

    #[test]
    fn nak_statuses_map_to_completion_errors() {
        assert_eq!(AckStatus::Ok.into_result(), Ok(()));
        assert_eq!(
            AckStatus::UnknownKey.into_result(),
            Err(CompletionError::RemoteAccess(RemoteAccessError::UnknownKey))
        );
        assert_eq!(
            AckStatus::ReceiverNotReady.into_result(),
            Err(CompletionError::ReceiverNotReady)
        );
        for code in 0..=5 {
            let status = AckStatus::from_code(code).unwrap();
            assert_eq!(status.code(), code);
        }
        assert_eq!(AckStatus::from_code(6), None);
    }

    fn any_status() -> impl Strategy<Value = AckStatus> {
        (0u8..=5).prop_map(|c| AckStatus::from_code(c).unwrap())
    }

    proptest! {
        #[test]
        fn header_round_trips(
            op in 0u8..3, status in any_status(), seq in any::<u32>(), len in any::<u32>(),
            imm in any::<u32>(), rkey in any::<u32>(), addr in any::<u64>(),
        ) {
            let h = match op {
                0 => Header::write_imm(seq, len, imm, RKey(rkey), addr),
                1 => Header::send(seq, len),
                _ => Header::ack(seq, status),
            };
            let bytes = h.encode();
            prop_assert_eq!(bytes.len(), HEADER_LEN);
            prop_assert_eq!(Header::decode(&bytes, u32::MAX), Ok(h));
        }

        #[test]
        fn info_round_trips(v6 in any::<bool>(), ip in any::<[u8; 16]>(), port in 1u16.., token in any::<[u8; 16]>()) {
            let ip = if v6 { IpAddr::from(ip) } else { IpAddr::from(array::<4>(&ip[..4])) };
            prop_assume!(!ip.is_unspecified() && !ip.is_multicast());
            let info = Info { addr: SocketAddr::new(ip, port), token };
            let bytes = info.encode();
            prop_assert_eq!(bytes.len(), if v6 { 40 } else { 28 });
            prop_assert_eq!(Info::decode(&bytes), Ok(info));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Info::decode(&bytes);
            if let Ok(h) = <[u8; HEADER_LEN]>::try_from(&bytes[..bytes.len().min(HEADER_LEN)]) {
                let _ = Header::decode(&h, 1 << 20);
            }
        }
    }
}
