//! Reading classic pcap files (what `tcpdump -w` writes) and searching them for a canary.
//!
//! The search looks in each frame as captured *and* in each IPv4 TCP or UDP flow's payload
//! stream, so a canary split across two TCP segments is still found. Retransmitted bytes are
//! skipped by sequence number; out-of-order segments are appended as they come. No pcapng,
//! no IPv6 (the lab is IPv4), no reassembly of IP fragments (their bytes are still searched
//! frame by frame).

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The frames of a capture file.
#[derive(Clone, PartialEq, Eq)]
pub struct Pcap {
    link_type: u32,
    frames: Vec<Vec<u8>>,
    truncated: bool,
}

/// A capture file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PcapError {
    /// The file is shorter than a pcap header.
    #[error("not a pcap file: only {len} bytes (did tcpdump start? see its log)")]
    TooShort {
        /// How long it is.
        len: usize,
    },
    /// The file does not start with a classic pcap magic number.
    #[error(
        "not a classic pcap file (magic {magic:#010x}); pcapng is not supported, capture with `tcpdump -w`"
    )]
    BadMagic {
        /// What it starts with.
        magic: u32,
    },
}

impl Pcap {
    /// Parses a classic pcap file (either byte order, micro- or nanosecond timestamps). A
    /// record cut short at the end (a capture killed mid-write) is left out and noted in
    /// [`Pcap::truncated`].
    pub fn parse(bytes: &[u8]) -> Result<Self, PcapError> {
        if bytes.len() < GLOBAL_HEADER {
            return Err(PcapError::TooShort { len: bytes.len() });
        }
        let magic_le = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let little = match magic_le {
            MAGIC_MICROS | MAGIC_NANOS => true,
            m if m.swap_bytes() == MAGIC_MICROS || m.swap_bytes() == MAGIC_NANOS => false,
            magic => return Err(PcapError::BadMagic { magic }),
        };
        let word = |at: usize| -> Option<u32> {
            let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
            Some(if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            })
        };
        let link_type = word(20).unwrap_or(0);
        let mut frames = Vec::new();
        let mut at = GLOBAL_HEADER;
        let mut truncated = false;
        while at < bytes.len() {
            let Some(incl_len) = word(at + 8) else {
                truncated = true;
                break;
            };
            let start = at + RECORD_HEADER;
            let end = start.saturating_add(incl_len as usize);
            let Some(data) = bytes.get(start..end) else {
                truncated = true;
                break;
            };
            frames.push(data.to_vec());
            at = end;
        }
        Ok(Self {
            link_type,
            frames,
            truncated,
        })
    }

    /// The captured frames, in order.
    pub fn frames(&self) -> &[Vec<u8>] {
        &self.frames
    }

    /// How many frames were captured.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The link type from the file header (1 is Ethernet).
    pub fn link_type(&self) -> u32 {
        self.link_type
    }

    /// Whether the last record was cut short.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Whether `needle` occurs in any frame, or in any TCP or UDP flow's payload stream.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.frames.iter().any(|f| find(f, needle))
            || self.streams().values().any(|s| find(s, needle))
    }

    /// The payload streams of IPv4 TCP and UDP flows in Ethernet frames, one per direction.
    fn streams(&self) -> HashMap<Flow, Vec<u8>> {
        let mut streams: HashMap<Flow, Vec<u8>> = HashMap::new();
        let mut next_seq: HashMap<Flow, u32> = HashMap::new();
        if self.link_type != LINKTYPE_ETHERNET {
            return streams;
        }
        for frame in &self.frames {
            let Some(segment) = parse_ethernet_ipv4(frame) else {
                continue;
            };
            let stream = streams.entry(segment.flow).or_default();
            let Some(seq) = segment.tcp_seq else {
                stream.extend_from_slice(segment.payload);
                continue;
            };
            let len = u32::try_from(segment.payload.len()).unwrap_or(u32::MAX);
            let data_seq = if segment.syn {
                seq.wrapping_add(1)
            } else {
                seq
            };
            let skip = match next_seq.get(&segment.flow) {
                // Bytes before `next` were seen already; a gap (negative) is appended as is.
                Some(&next) => {
                    let behind = next.wrapping_sub(data_seq);
                    if behind < u32::MAX / 2 { behind } else { 0 }
                }
                None => 0,
            };
            if skip < len {
                stream.extend_from_slice(&segment.payload[skip as usize..]);
                next_seq.insert(segment.flow, data_seq.wrapping_add(len));
            } else {
                next_seq
                    .entry(segment.flow)
                    .or_insert_with(|| data_seq.wrapping_add(len));
            }
        }
        streams
    }
}

impl std::fmt::Debug for Pcap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Frames may carry payload: lengths only.
        f.debug_struct("Pcap")
            .field("link_type", &self.link_type)
            .field("frames", &self.frames.len())
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// One direction of a transport flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Flow {
    protocol: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
}

/// What the search needs from one TCP or UDP packet.
struct Segment<'a> {
    flow: Flow,
    tcp_seq: Option<u32>,
    syn: bool,
    payload: &'a [u8],
}

/// The TCP or UDP payload of an unfragmented IPv4 packet in an Ethernet frame.
fn parse_ethernet_ipv4(frame: &[u8]) -> Option<Segment<'_>> {
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut ip_start = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        ip_start = 18;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ip_start..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
    // More-fragments flag or a fragment offset: not a whole packet.
    if fragment & 0x3fff != 0 || header_len < 20 {
        return None;
    }
    let protocol = *ip.get(9)?;
    let src_ip = Ipv4Addr::new(*ip.get(12)?, *ip.get(13)?, *ip.get(14)?, *ip.get(15)?);
    let dst_ip = Ipv4Addr::new(*ip.get(16)?, *ip.get(17)?, *ip.get(18)?, *ip.get(19)?);
    // Ethernet pads short frames; the IP length says where the packet ends (the capture may
    // also end earlier when cut by the snap length).
    let l4 = ip.get(header_len..total_len.min(ip.len()))?;
    let ports = |l4: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
            u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
        ))
    };
    let (sport, dport) = ports(l4)?;
    let flow = Flow {
        protocol,
        src: (src_ip, sport),
        dst: (dst_ip, dport),
    };
    match protocol {
        PROTO_TCP => {
            let seq = u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?);
            let data_offset = usize::from(l4.get(12)? >> 4) * 4;
            let syn = l4.get(13)? & 0x02 != 0;
            Some(Segment {
                flow,
                tcp_seq: Some(seq),
                syn,
                payload: l4.get(data_offset..)?,
            })
        }
        PROTO_UDP => Some(Segment {
            flow,
            tcp_seq: None,
            syn: false,
            payload: l4.get(8..)?,
        }),
        _ => None,
    }
}

/// Whether `needle` occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

const GLOBAL_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;
const MAGIC_MICROS: u32 = 0xa1b2_c3d4;
const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pcap file (little-endian, microseconds, Ethernet) holding these frames.
    pub(crate) fn pcap_file(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC_MICROS.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            let len = u32::try_from(f.len()).unwrap();
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    /// An Ethernet frame with an IPv4 TCP segment from 10.0.0.1:1000 to 10.0.0.2:2000.
    pub(crate) fn tcp_frame(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = u16::try_from(20 + 20 + payload.len()).unwrap();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&1000u16.to_be_bytes());
        f.extend_from_slice(&2000u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn finds_a_canary_in_one_frame() {
        let file = pcap_file(&[tcp_frame(100, 0x18, b"xx CANARY-1234 yy")]);
        let pcap = Pcap::parse(&file).unwrap();
        assert_eq!(pcap.len(), 1);
        assert!(pcap.contains(b"CANARY-1234"));
        assert!(!pcap.contains(b"CANARY-9999"));
    }

    #[test]
    fn finds_a_canary_split_across_segments_despite_retransmits() {
        let file = pcap_file(&[
            tcp_frame(99, 0x02, b""),
            tcp_frame(100, 0x18, b"head CANA"),
            tcp_frame(100, 0x18, b"head CANA"),
            tcp_frame(109, 0x18, b"RY-1234 tail"),
        ]);
        let pcap = Pcap::parse(&file).unwrap();
        assert!(pcap.frames().iter().all(|f| !find(f, b"CANARY-1234")));
        assert!(pcap.contains(b"CANARY-1234"));
        assert!(!pcap.contains(b"CANACANA"), "retransmit not appended twice");
    }

    #[test]
    fn rejects_what_is_not_pcap_and_tolerates_a_cut_tail() {
        assert_eq!(Pcap::parse(&[0; 3]), Err(PcapError::TooShort { len: 3 }));
        let mut ng = vec![0x0a, 0x0d, 0x0d, 0x0a];
        ng.resize(32, 0);
        assert!(matches!(Pcap::parse(&ng), Err(PcapError::BadMagic { .. })));
        let mut file = pcap_file(&[tcp_frame(1, 0x18, b"abc"), tcp_frame(4, 0x18, b"def")]);
        file.truncate(file.len() - 2);
        let pcap = Pcap::parse(&file).unwrap();
        assert_eq!(pcap.len(), 1);
        assert!(pcap.truncated());
    }

    #[test]
    fn reads_big_endian_files() {
        let mut file = pcap_file(&[]);
        file[..4].copy_from_slice(&MAGIC_MICROS.to_be_bytes());
        file[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_be_bytes());
        let pcap = Pcap::parse(&file).unwrap();
        assert!(pcap.is_empty());
        assert_eq!(pcap.link_type(), 1);
    }
}
