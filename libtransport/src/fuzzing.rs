//! Fuzzing entry points, compiled only under `--cfg fuzzing` (cargo-fuzz sets it). Each takes
//! the fuzzer's bytes and feeds one parser, so the targets in `libtransport/fuzz/fuzz_targets/`
//! are one-liners. Each also checks what must hold for whatever the parser accepts: wire
//! messages re-encode to exactly the bytes they came from (one encoding per value), a trail
//! that verifies can be resumed by a node and still verifies, a policy never lets an allow
//! rule beat a matching deny rule, a sealed RDMA chunk opens only as sealed, once, in its
//! place. A wrong acceptance is a finding, not only a panic.
//!
//! Nothing here is part of the crate's API. The seed corpus in `libtransport/fuzz/corpus/` is
//! written by the ignored test at the bottom (`scripts/fuzz.sh --write-seeds` runs it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use certs::SpiffeId;

use crate::audit::{AuditEvent, AuditRecord, AuditSink, FileSink, FileSinkConfig};
use crate::clock::{Clock, SystemClock};
use crate::identity::{Credentials, IdentityHandle};
use crate::policy::{Access, Authorizer, Decision, Effect, Policy};
use crate::proto::frame::{HEADER_LEN as FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD};
use crate::proto::rdma::{RdmaControl, RdmaOffer};
use crate::proto::seal::{
    Direction, EXPORTER_BYTES, HEADER_LEN, KeyLimits, MAX_OPEN_FAILURES, OpenError, Opener,
    Placement, SessionKeys, TAG_LEN, sealed_len,
};
use crate::proto::{
    ChunkIndex, ChunkSet, DatasetName, Digest, ErrorCode, Frame, FrameError, FrameHeader,
    FrameKind, Hello, HelloAck, Manifest, ObjectPath, Request, Response,
};
use crate::vocab::Action;

/// A byte stream of frames, as a TLS/TCP peer sends it: every frame decoded from the front
/// re-encodes to exactly the bytes it took; "need more" consumes nothing; each payload goes
/// to the decoder its kind names.
pub fn frames(data: &[u8]) {
    if let Ok(h) = FrameHeader::decode(data) {
        assert!(h.len <= MAX_FRAME_PAYLOAD);
        let enc = h.encode().expect("a decoded header encodes");
        assert_eq!(&enc[..], &data[..FRAME_HEADER_LEN]);
    }
    let mut buf = BytesMut::from(data);
    loop {
        let start = data.len() - buf.len();
        match Frame::decode(&mut buf) {
            Ok(Some(frame)) => {
                let used = &data[start..data.len() - buf.len()];
                assert_eq!(used.len(), frame.encoded_len());
                let mut out = BytesMut::new();
                frame.encode(&mut out).expect("a decoded frame encodes");
                assert_eq!(&out[..], used);
                payload(frame.kind, &frame.payload);
            }
            Ok(None) => {
                assert_eq!(
                    data.len() - buf.len(),
                    start,
                    "an incomplete frame consumed bytes"
                );
                break;
            }
            Err(e) => {
                assert_ne!(e, FrameError::Incomplete);
                break;
            }
        }
    }
}

/// `Request::decode`: an accepted request re-encodes to the same bytes.
pub fn request(data: &[u8]) {
    if let Ok(req) = Request::decode(data) {
        assert_eq!(&req.encode()[..], data, "request {:?}", req.name());
    }
}

/// `Response::decode`, and the small messages (`Hello`, `HelloAck`, error codes) on the same
/// bytes: an accepted message re-encodes to the same bytes.
pub fn response(data: &[u8]) {
    if let Ok(resp) = Response::decode(data) {
        assert_eq!(&resp.encode()[..], data);
    }
    if let Ok(hello) = Hello::decode(data) {
        assert_eq!(&hello.encode()[..], data);
        if let Some(v) = hello.negotiate() {
            assert!((hello.min_version..=hello.max_version).contains(&v));
        }
    }
    if let Ok(ack) = HelloAck::decode(data) {
        assert_eq!(&ack.encode()[..], data);
    }
    if let Ok(code) = ErrorCode::decode(data) {
        // Unknown codes read as Internal, so only known ones come back byte for byte.
        assert_eq!(ErrorCode::decode(&code.encode()), Ok(code));
    }
    // The RDMA session's control messages: a receiver's offer and its grants.
    if let Ok(control) = RdmaControl::decode(data) {
        assert_eq!(&control.encode()[..], data);
    }
    let mut rest = data;
    if let Ok(offer) = RdmaOffer::decode(&mut rest) {
        let used = &data[..data.len() - rest.len()];
        assert_eq!(used.len(), offer.encoded_len());
        let mut out = BytesMut::new();
        offer.encode(&mut out);
        assert_eq!(&out[..], used);
    }
}

/// RDMA chunk sealing (`proto/seal.rs`). First the input itself is opened as a sealed chunk
/// (header parsing, placement and window checks on hostile bytes). Then the input scripts a
/// sender and a receiver under fixed keys, each 3 bytes one step: seal a chunk (and deliver
/// it at once or later), deliver an earlier chunk again, deliver one with a byte changed, or
/// deliver one at another place. Whatever the receiver opens must be exactly what was sealed
/// for that place, never twice and never altered; a chunk delivered as soon as it is sealed,
/// in the receiver's key epoch or the next, opens whatever was refused before it (below the
/// failure limit); past the limit nothing opens.
pub fn sealed_chunks(data: &[u8]) {
    let keys = SessionKeys::derive([7; 16], &[0x42; EXPORTER_BYTES]);
    // Raw bytes as a sealed chunk of their own length: without the key nothing opens.
    let mut raw = data.to_vec();
    let len = u32::try_from(raw.len().saturating_sub(HEADER_LEN + TAG_LEN)).unwrap_or(0);
    let expect = Placement {
        transfer: 1,
        chunk: 0,
        offset: 0,
        len,
    };
    let mut opener = keys.opener(Direction::ServerToClient);
    assert!(
        opener.open(expect, &mut raw).is_err(),
        "forged bytes opened"
    );

    let Some((&first, script)) = data.split_first() else {
        return;
    };
    let limits = KeyLimits {
        max_chunks: 1 + u64::from(first % 8),
        max_bytes: 1 << 20,
    };
    let mut sealer = keys.sealer(Direction::ClientToServer, limits);
    let mut opener = keys.opener(Direction::ClientToServer);
    let mut sent: Vec<Sent> = Vec::new();
    // The newest key epoch of any chunk opened so far: where an honest receiver stands.
    let mut opened_epoch = 0u32;
    for step in script.chunks_exact(3).take(256) {
        let (op, a, b) = (step[0] % 4, step[1], step[2]);
        if op == 0 || sent.is_empty() {
            let n = sent.len() as u32;
            let at = Placement {
                transfer: 9,
                chunk: n,
                offset: u64::from(n) << 8,
                len: u32::from(a),
            };
            let plain = vec![b; usize::from(a)];
            let mut buf = vec![0u8; sealed_len(plain.len())];
            buf[HEADER_LEN..HEADER_LEN + plain.len()].copy_from_slice(&plain);
            let total = sealer
                .seal(at, &mut buf)
                .expect("a chunk within limits seals");
            assert_eq!(total, buf.len());
            if plain.len() >= 16 {
                assert_ne!(&buf[HEADER_LEN..HEADER_LEN + plain.len()], &plain[..]);
            }
            let epoch = sealer.epoch();
            sent.push(Sent {
                at,
                plain,
                sealed: buf,
                epoch,
                opened: false,
            });
            let i = sent.len() - 1;
            if b % 2 == 0 {
                // The newest chunk, in the receiver's key epoch or the next: it opens, whatever
                // was refused before it (below the failure limit). Refused bytes are not
                // authenticated, so they must not move the receiver.
                let due = opener.failures() < MAX_OPEN_FAILURES
                    && (epoch == opened_epoch || epoch == opened_epoch.wrapping_add(1));
                let opened = deliver(&mut opener, &mut sent, &mut opened_epoch, i, i, None);
                assert!(!due || opened, "the newest chunk did not open");
            }
            continue;
        }
        let i = usize::from(a) % sent.len();
        match op {
            1 => {
                deliver(&mut opener, &mut sent, &mut opened_epoch, i, i, None);
            }
            2 => {
                let at = usize::from(b) % sent[i].sealed.len();
                deliver(&mut opener, &mut sent, &mut opened_epoch, i, i, Some(at));
            }
            _ => {
                let elsewhere = (i + 1 + usize::from(b)) % (sent.len() + 1);
                if elsewhere != i {
                    deliver(
                        &mut opener,
                        &mut sent,
                        &mut opened_epoch,
                        i,
                        elsewhere,
                        None,
                    );
                }
            }
        }
    }
}

/// A chunk the fuzzing sender sealed.
struct Sent {
    at: Placement,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    epoch: u32,
    opened: bool,
}

/// Delivers sealed chunk `i` where chunk `place` belongs, with one byte flipped if `flip`.
/// Checks the verdict and returns whether it opened.
fn deliver(
    opener: &mut Opener,
    sent: &mut [Sent],
    opened_epoch: &mut u32,
    i: usize,
    place: usize,
    flip: Option<usize>,
) -> bool {
    let expect = match sent.get(place) {
        Some(s) => s.at,
        // One past the last chunk: a place nothing was sealed for.
        None => Placement {
            chunk: u32::MAX,
            ..sent[i].at
        },
    };
    let mut bytes = sent[i].sealed.clone();
    if let Some(at) = flip {
        bytes[at] ^= 0x01;
    }
    let before = opener.failures();
    match opener.open(expect, &mut bytes) {
        Ok(plain) => {
            assert!(flip.is_none(), "a changed chunk opened");
            assert_eq!(place, i, "a chunk opened in another place");
            assert_eq!(plain, &sent[i].plain[..], "opened to other bytes");
            assert!(!sent[i].opened, "a chunk opened twice");
            assert!(before < MAX_OPEN_FAILURES);
            sent[i].opened = true;
            *opened_epoch = (*opened_epoch).max(sent[i].epoch);
            true
        }
        Err(e) => {
            if before >= MAX_OPEN_FAILURES {
                assert_eq!(e, OpenError::TooManyFailures);
            }
            false
        }
    }
}

/// `Manifest::decode` and `ChunkSet::decode` on the same bytes, then the manifest's chunk
/// arithmetic with indices and ranges taken from the input.
pub fn manifest(data: &[u8]) {
    let mut rest = data;
    if let Ok(m) = Manifest::decode(&mut rest) {
        let used = &data[..data.len() - rest.len()];
        assert_eq!(used.len(), m.encoded_len());
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(&out[..], used);
        // The layout covers the object exactly, chunk after chunk.
        let mut end = 0;
        for i in 0..m.chunk_count() {
            let r = m
                .chunk_range(ChunkIndex(i))
                .expect("listed chunk has a range");
            assert_eq!(r.start, end);
            assert!(r.end > r.start && r.end - r.start <= u64::from(m.chunk_bytes()));
            end = r.end;
        }
        assert_eq!(end, m.size());
        assert_eq!(m.chunk_range(ChunkIndex(m.chunk_count())), None);
        // Arbitrary ranges from the trailing bytes: covering chunks stay within the object.
        for pair in rest.chunks_exact(16) {
            let mut a = [0u8; 8];
            let mut b = [0u8; 8];
            a.copy_from_slice(&pair[..8]);
            b.copy_from_slice(&pair[8..]);
            let (a, b) = (u64::from_be_bytes(a), u64::from_be_bytes(b));
            let covering = m.chunks_covering(a..b);
            assert!(covering.end <= m.chunk_count());
            let index =
                ChunkIndex(u32::try_from(a % (u64::from(m.chunk_count()) + 2)).unwrap_or(0));
            let piece = &rest[..rest.len().min(64)];
            let _ = m.verify_chunk(index, piece);
            let _ = m.check_digest(index, Digest::of(piece));
        }
    }
    let mut rest = data;
    if let Ok(s) = ChunkSet::decode(&mut rest) {
        let used = &data[..data.len() - rest.len()];
        assert_eq!(used.len(), s.encoded_len());
        let mut out = BytesMut::new();
        s.encode(&mut out);
        assert_eq!(&out[..], used);
        assert!(s.count() <= s.len());
        assert_eq!(s.missing().count() as u32, s.len() - s.count());
    }
}

/// `audit::verify` and `audit::query` on a trail written to a scratch directory, then
/// `FileSink::open` (a node restarting on that trail) and verify again.
///
/// The input is the segments' bytes, separated by `0xFF` (at most 4 segments), then
/// optionally `0xFE` and `checkpoint.json`'s bytes, then optionally `0xFD` and a trust
/// bundle (PEM) to verify checkpoint signers with. A trail that verified must still verify
/// after a node resumed it, appended a record and closed it; one that failed must still fail.
pub fn audit_trail(data: &[u8]) {
    let (trail, bundle) = split_once(data, 0xFD);
    let (segments, head) = split_once(trail, 0xFE);
    let dir = scratch_dir();
    reset_dir(&dir);
    for (i, seg) in segments.split(|&b| b == 0xFF).take(4).enumerate() {
        let name = format!("audit-{:06}.jsonl", i + 1);
        std::fs::write(dir.join(name), seg).expect("scratch segment");
    }
    if let Some(head) = head {
        std::fs::write(dir.join("checkpoint.json"), head).expect("scratch checkpoint");
    }
    let bundle = bundle
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|b| certs::TrustBundle::from_pem(b).ok());
    let before = crate::audit::verify(&dir, bundle.as_ref());
    let broken = crate::audit::verify(&dir, None).is_err();
    if let Ok(report) = &before {
        assert_eq!(report.unsealed, report.last_seq - report.last_checkpoint);
        assert_eq!(report.records, report.last_seq);
        assert!(report.checkpoints <= report.records);
        let all = crate::audit::query(&dir, &crate::audit::Query::default())
            .expect("a trail that verifies can be queried");
        assert_eq!(all.len() as u64, report.records);
    }
    let mut cfg = FileSinkConfig::new(&dir);
    cfg.lock_wait = std::time::Duration::ZERO;
    let signer = fuzz_identity();
    let Ok(sink) = FileSink::open(cfg, Arc::new(signer.clone()), Arc::new(SystemClock)) else {
        // A trail whose last record does not parse is refused; that is the node's answer.
        return;
    };
    let record = AuditRecord {
        time: SystemClock.now(),
        event: AuditEvent::PolicyRefused {
            source: "fuzz".into(),
            reason: "resumed".into(),
        },
    };
    let appended = sink.record(&record).and_then(|()| sink.close());
    drop(sink);
    if broken && appended.is_ok() {
        // A node never papers over what it finds: a trail that failed stays failed.
        assert!(
            crate::audit::verify(&dir, None).is_err(),
            "a broken trail verified once a node resumed it"
        );
    }
    if let (Ok(report), Ok(())) = (&before, appended) {
        // A clean trail stays clean once a node has resumed it. (Its own checkpoints are
        // signed by the fuzzing identity, so the signer bundle is not applied here.)
        let after = crate::audit::verify(&dir, None).expect("a resumed clean trail verifies");
        assert!(after.records > report.records);
    }
}

/// `Policy::parse` on UTF-8 text, then decisions over a fixed set of peers, datasets,
/// objects and actions: a matching deny rule always wins, an allow names a matching allow
/// rule, and nothing is allowed without one.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::parse(text) {
        Ok(p) => p,
        Err(e) => {
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.split('\n').count(), "{e}");
            }
            return;
        }
    };
    let peers = [
        "spiffe://hospital.example/gpu/loader-0",
        "spiffe://hospital.example/gpu/phi/trainer-0",
        "spiffe://other.example/x",
    ]
    .map(|p| SpiffeId::parse(p).expect("fixed peer"));
    let datasets =
        ["ct-head", "imagenet", "checkpoints"].map(|d| DatasetName::new(d).expect("fixed dataset"));
    let objects = [
        None,
        Some(ObjectPath::new("train/a.bin").expect("fixed object")),
        Some(ObjectPath::new("val/x/y.npz").expect("fixed object")),
    ];
    for peer in &peers {
        for dataset in &datasets {
            for object in &objects {
                for action in [Action::List, Action::Read, Action::Write] {
                    let access = Access {
                        peer,
                        action,
                        dataset,
                        object: object.as_ref(),
                    };
                    let e = policy.explain(&access);
                    assert_eq!(policy.decide(&access), e.decision);
                    let denied = e.matched.iter().any(|m| m.effect == Effect::Deny);
                    let allowed = e.matched.iter().any(|m| m.effect == Effect::Allow);
                    match &e.decision {
                        Decision::Allow { rule } => {
                            assert!(!denied, "allow beat a matching deny rule");
                            assert!(e.matched.iter().any(|m| &m.name == rule));
                        }
                        Decision::Emergency { .. } => unreachable!("a policy has no grants"),
                        Decision::Deny { rule: None, .. } => assert!(!denied && !allowed),
                        Decision::Deny { rule: Some(_), .. } => assert!(denied),
                    }
                }
            }
        }
    }
}

/// Workload API answers as an agent sends them: the first byte picks the message
/// (`X509SVIDResponse`, `X509BundlesResponse`, or bare concatenated DER), the rest is
/// decoded with prost and then by `workload`'s parsers. Whatever is accepted re-encodes
/// consistently: the chain, key and bundle bytes come back exactly, and decoding the
/// re-encoding gives the same identities.
pub fn workload_response(data: &[u8]) {
    use prost::Message;

    use crate::workload::{
        decode_bundles_response, decode_x509_response, encode_bundles_response,
        encode_x509_response, pb, split_der,
    };

    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let Ok(m) = pb::X509svidResponse::decode(body) else {
                return;
            };
            let Ok(ctx) = decode_x509_response(&m) else {
                return;
            };
            assert_eq!(ctx.svids.len(), m.svids.len());
            let again = encode_x509_response(&ctx.svids, &ctx.bundle)
                .expect("a decoded SVID (PKCS#8, of its bundle's trust domain) encodes");
            for (orig, re) in m.svids.iter().zip(&again.svids) {
                assert_eq!(orig.spiffe_id, re.spiffe_id);
                assert_eq!(orig.x509_svid, re.x509_svid);
                assert_eq!(orig.x509_svid_key, re.x509_svid_key);
                assert_eq!(orig.bundle, re.bundle);
            }
            let back = pb::X509svidResponse::decode(&again.encode_to_vec()[..])
                .expect("our encoding decodes");
            let ctx2 = decode_x509_response(&back).expect("our encoding is accepted");
            assert_eq!(ctx2.bundle, ctx.bundle);
            for (a, b) in ctx.svids.iter().zip(&ctx2.svids) {
                assert_eq!(a.id(), b.id());
                assert_eq!(a.chain(), b.chain());
                assert_eq!(a.serial(), b.serial());
            }
        }
        1 => {
            let Ok(m) = pb::X509BundlesResponse::decode(body) else {
                return;
            };
            let Ok(bundles) = decode_bundles_response(&m) else {
                return;
            };
            assert_eq!(bundles.len(), m.bundles.len());
            let again = encode_bundles_response(&bundles);
            for b in &bundles {
                let key = b.trust_domain().id().to_string();
                let orig = m
                    .bundles
                    .get(&key)
                    .or_else(|| m.bundles.get(b.trust_domain().as_str()))
                    .expect("each bundle came from its trust domain's key");
                assert_eq!(again.bundles.get(&key), Some(orig));
            }
            let back = pb::X509BundlesResponse::decode(&again.encode_to_vec()[..])
                .expect("our encoding decodes");
            assert_eq!(decode_bundles_response(&back).expect("accepted"), bundles);
        }
        _ => {
            if let Ok(parts) = split_der(body, certs::MAX_BUNDLE_CAS) {
                assert!(!parts.is_empty() && parts.len() <= certs::MAX_BUNDLE_CAS);
                assert_eq!(parts.concat(), body);
            }
        }
    }
}

/// The message decoder for a frame of `kind`, as the server and client would call it.
fn payload(kind: FrameKind, p: &[u8]) {
    match kind {
        FrameKind::Hello => {
            if let Ok(h) = Hello::decode(p) {
                assert_eq!(&h.encode()[..], p);
            }
        }
        FrameKind::HelloAck => {
            if let Ok(a) = HelloAck::decode(p) {
                assert_eq!(&a.encode()[..], p);
            }
        }
        FrameKind::Request => request(p),
        FrameKind::Response => {
            if let Ok(r) = Response::decode(p) {
                assert_eq!(&r.encode()[..], p);
            }
        }
        FrameKind::Error => {
            let _ = ErrorCode::decode(p);
        }
        // Data, End, Cancel and GoAway carry no message; kinds added later start here too.
        _ => {}
    }
}

fn split_once(data: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

/// One scratch directory per fuzzing process, in memory where the system has `/dev/shm`.
fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        base.join(format!("transportd-fuzz-audit-{}", std::process::id()))
    })
    .clone()
}

fn reset_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("scratch dir");
}

/// The identity a resumed trail's checkpoints are signed with, made once per process.
fn fuzz_identity() -> IdentityHandle {
    static ID: OnceLock<IdentityHandle> = OnceLock::new();
    ID.get_or_init(|| {
        let now = SystemClock.now();
        let td = certs::TrustDomain::new("fuzz.example").expect("trust domain");
        let ca = certs::Ca::generate(&td, &certs::CaParams::default(), now).expect("CA");
        let id = SpiffeId::from_parts(&td, "/node/fuzz").expect("ID");
        let (key, csr) =
            certs::generate_key_and_csr(&id, certs::KeyAlgorithm::EcdsaP256).expect("CSR");
        let issued = ca
            .issue(&csr, &id, &certs::IssueParams::default(), now)
            .expect("SVID");
        let svid = certs::Svid::from_pem(&issued.chain_pem(), &key).expect("SVID parses");
        IdentityHandle::new(Credentials::new(svid, ca.bundle()).expect("credentials"))
    })
    .clone()
}

#[cfg(all(test, feature = "test-util"))]
mod seeds {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use certs::test_util::TestPki;

    use super::*;
    use crate::proto::manifest::MIN_CHUNK_BYTES;
    use crate::proto::{ObjectEntry, TransferId};
    use crate::test_util::identity;
    use crate::vocab::{DecisionKind, Direction, Outcome, Path as Via, TransferPath};

    fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        std::fs::write(d.join(name), bytes).expect("seed");
    }

    fn frame(kind: FrameKind, stream: u32, payload: Bytes) -> Vec<u8> {
        let mut out = BytesMut::new();
        Frame::new(kind, stream, payload)
            .encode(&mut out)
            .expect("seed frame");
        out.to_vec()
    }

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).expect("seed dataset")
    }

    fn obj(s: &str) -> ObjectPath {
        ObjectPath::new(s).expect("seed object")
    }

    fn manifests() -> Vec<(&'static str, Manifest)> {
        let three: Vec<u8> = (0..MIN_CHUNK_BYTES as usize * 2 + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        vec![
            (
                "empty",
                Manifest::of_bytes(b"", MIN_CHUNK_BYTES).expect("m"),
            ),
            (
                "one",
                Manifest::of_bytes(b"PHI-CANARY", MIN_CHUNK_BYTES).expect("m"),
            ),
            (
                "three",
                Manifest::of_bytes(&three, MIN_CHUNK_BYTES).expect("m"),
            ),
        ]
    }

    fn requests() -> Vec<(&'static str, Request)> {
        let m = manifests().remove(2).1;
        vec![
            ("list-datasets", Request::ListDatasets),
            (
                "list-objects",
                Request::ListObjects {
                    dataset: ds("ct-head"),
                    prefix: "train/".into(),
                    start_after: Some(obj("train/shard-0001.bin")),
                    limit: 100,
                },
            ),
            (
                "list-objects-first",
                Request::ListObjects {
                    dataset: ds("ct-head"),
                    prefix: String::new(),
                    start_after: None,
                    limit: 0,
                },
            ),
            (
                "stat",
                Request::Stat {
                    dataset: ds("scans"),
                    object: obj("a/b.bin"),
                },
            ),
            (
                "open-read",
                Request::OpenRead {
                    dataset: ds("scans"),
                    object: obj("x y/\u{fc}.npz"),
                },
            ),
            (
                "read",
                Request::Read {
                    transfer: TransferId(1),
                    offset: 4096,
                    len: 1 << 20,
                },
            ),
            (
                "open-read-part",
                Request::OpenReadPart {
                    dataset: ds("scans"),
                    object: obj("a/b.bin"),
                    group: [7; 16],
                },
            ),
            (
                "open-write",
                Request::OpenWrite {
                    dataset: ds("checkpoints"),
                    object: obj("step-1/model.bin"),
                    manifest: m.clone(),
                },
            ),
            (
                "open-write-part",
                Request::OpenWritePart {
                    dataset: ds("checkpoints"),
                    object: obj("step-1/model.bin"),
                    manifest: m,
                    group: [9; 16],
                },
            ),
            (
                "write-chunk",
                Request::WriteChunk {
                    transfer: TransferId(2),
                    chunk: ChunkIndex(2),
                },
            ),
            (
                "commit",
                Request::Commit {
                    transfer: TransferId(2),
                },
            ),
            (
                "close",
                Request::Close {
                    transfer: TransferId(1),
                },
            ),
            (
                "policy-watch",
                Request::PolicyWatch {
                    known: 0x0123_4567_89ab_cdef,
                },
            ),
        ]
    }

    fn responses() -> Vec<(&'static str, Response)> {
        let m = manifests().remove(2).1;
        let mut have = ChunkSet::new(m.chunk_count());
        have.insert(ChunkIndex(1));
        vec![
            (
                "datasets",
                Response::Datasets(vec![ds("ct-head"), ds("imagenet")]),
            ),
            (
                "objects",
                Response::Objects {
                    entries: vec![
                        ObjectEntry {
                            path: obj("train/a.bin"),
                            size: 10,
                        },
                        ObjectEntry {
                            path: obj("train/b.bin"),
                            size: 1 << 40,
                        },
                    ],
                    more: true,
                },
            ),
            ("manifest", Response::Manifest(m.clone())),
            (
                "opened-read",
                Response::OpenedRead {
                    transfer: TransferId(7),
                    manifest: m,
                },
            ),
            (
                "opened-write",
                Response::OpenedWrite {
                    transfer: TransferId(8),
                    have,
                },
            ),
            ("chunk-stored", Response::ChunkStored(ChunkIndex(3))),
            (
                "committed",
                Response::Committed {
                    root: Digest([0xab; 32]),
                },
            ),
            ("closed", Response::Closed),
            ("policy", Response::Policy { epoch: 42 }),
        ]
    }

    /// A trail a node wrote: records of every kind, two segments, signed checkpoints.
    fn trail(pki: &TestPki) -> Vec<u8> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cfg = FileSinkConfig::new(tmp.path());
        cfg.segment_max_bytes = 1500;
        let signer = identity(pki, "/node/storage");
        let sink = FileSink::open(cfg, Arc::new(signer), Arc::new(SystemClock)).expect("sink");
        let peer = pki.id("/gpu/loader-0");
        let addr: SocketAddr = "10.0.0.7:50123".parse().expect("addr");
        let m = manifests().remove(1).1;
        let events = vec![
            AuditEvent::ConnectionAccepted {
                peer: peer.clone(),
                serial: "0a1b".into(),
                addr,
                path: Via::Quic,
            },
            AuditEvent::ConnectionRefused {
                addr,
                path: Via::Tcp,
                reason: "TLS: peer sent no certificates".into(),
                class: "certificate".into(),
            },
            AuditEvent::Authorization {
                peer: peer.clone(),
                action: Action::Read,
                dataset: ds("ct-head"),
                object: Some(obj("train/a.bin")),
                class: Some(crate::policy::DataClass::Phi),
                decision: DecisionKind::Allow,
                rule: Some("loaders read".into()),
                reason: None,
            },
            AuditEvent::TransferStarted {
                peer: peer.clone(),
                direction: Direction::Out,
                dataset: ds("ct-head"),
                object: obj("train/a.bin"),
                size: m.size(),
                root: m.root(),
                path: TransferPath::Quic,
            },
            AuditEvent::Transfer {
                peer: peer.clone(),
                direction: Direction::Out,
                dataset: ds("ct-head"),
                object: obj("train/a.bin"),
                bytes: m.size(),
                root: m.root(),
                path: TransferPath::Quic,
                outcome: Outcome::Complete,
                duration_ms: 3,
            },
            AuditEvent::DatasetsListed { peer, visible: 2 },
        ];
        for event in events {
            let record = AuditRecord {
                time: SystemClock.now(),
                event,
            };
            sink.record(&record).expect("record");
        }
        sink.checkpoint().expect("checkpoint");
        sink.record(&AuditRecord {
            time: SystemClock.now(),
            event: AuditEvent::PolicyRefused {
                source: "policy.toml".into(),
                reason: "line 3: unknown field".into(),
            },
        })
        .expect("record");
        sink.close().expect("close");
        drop(sink);
        let mut out = Vec::new();
        let mut segments: Vec<PathBuf> = std::fs::read_dir(tmp.path())
            .expect("trail dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        segments.sort();
        assert!(segments.len() > 1, "the seed trail spans segments");
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                out.push(0xFF);
            }
            out.extend(std::fs::read(seg).expect("segment"));
        }
        out.push(0xFE);
        out.extend(std::fs::read(tmp.path().join("checkpoint.json")).expect("head"));
        out.push(0xFD);
        out.extend(pki.bundle().to_pem().into_bytes());
        out
    }

    const POLICY: &str = r#"[[dataset]]
name = "ct-*"
class = "phi"

[[dataset]]
name = "imagenet"
class = "public"

[[rule]]
name = "loaders read training scans"
effect = "allow"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["ct-*", "imagenet"]
objects = ["train/**"]
actions = ["read"]

[[rule]]
name = "loaders list"
subjects = ["spiffe://hospital.example/gpu/*"]
datasets = ["*"]
actions = ["list"]

[[rule]]
name = "PHI stays with the PHI trainers"
effect = "deny"
subjects = ["*"]
except = ["spiffe://hospital.example/gpu/phi/*"]
classes = ["phi"]
datasets = ["*"]
actions = ["list", "read", "write"]

[[rule]]
name = "trainers write checkpoints"
subjects = ["spiffe://hospital.example/gpu/phi/trainer-0"]
datasets = ["checkpoints"]
objects = ["*.bin", "step-*/**"]
actions = ["list", "read", "write"]
"#;

    #[test]
    #[ignore = "writes the seed corpus: scripts/fuzz.sh --write-seeds"]
    fn write_seed_corpus() {
        let dir = std::env::var("FUZZ_CORPUS_DIR").expect("FUZZ_CORPUS_DIR names the corpus");
        let dir = Path::new(&dir);

        for (name, req) in requests() {
            write(dir, "request", name, &req.encode());
        }
        for (name, resp) in responses() {
            write(dir, "response", name, &resp.encode());
        }
        write(dir, "response", "hello", &Hello::current().encode());
        let ack = HelloAck {
            version: 1,
            max_streams: 64,
            max_transfers: 64,
            chunk_bytes: 4 << 20,
        };
        write(dir, "response", "hello-ack", &ack.encode());
        write(dir, "response", "error", &ErrorCode::NotFound.encode());
        let grant = RdmaControl::Grant { slot: 3, chunk: 7 };
        write(dir, "response", "rdma-grant", &grant.encode());
        write(
            dir,
            "response",
            "rdma-finish",
            &RdmaControl::Finish.encode(),
        );

        let mut client = frame(FrameKind::Hello, 0, Hello::current().encode());
        for (i, (_, req)) in requests().into_iter().enumerate() {
            let id = 2 * u32::try_from(i).expect("few") + 1;
            client.extend(frame(FrameKind::Request, id, req.encode()));
        }
        client.extend(frame(
            FrameKind::Data,
            13,
            Bytes::from_static(b"chunk bytes"),
        ));
        client.extend(frame(FrameKind::End, 13, Bytes::new()));
        client.extend(frame(FrameKind::Cancel, 11, Bytes::new()));
        write(dir, "frames", "client", &client);
        let mut server = frame(FrameKind::HelloAck, 0, ack.encode());
        for (i, (_, resp)) in responses().into_iter().enumerate() {
            let id = 2 * u32::try_from(i).expect("few") + 1;
            server.extend(frame(FrameKind::Response, id, resp.encode()));
        }
        server.extend(frame(FrameKind::Data, 5, Bytes::from_static(b"PHI-CANARY")));
        server.extend(frame(FrameKind::End, 5, Bytes::new()));
        server.extend(frame(FrameKind::Error, 7, ErrorCode::Range.encode()));
        server.extend(frame(FrameKind::GoAway, 0, Bytes::new()));
        write(dir, "frames", "server", &server);
        // A whole frame, then one cut short.
        let mut cut = frame(FrameKind::Hello, 0, Hello::current().encode());
        cut.extend(&frame(FrameKind::Data, 1, Bytes::from_static(b"0123456789"))[..15]);
        write(dir, "frames", "cut", &cut);

        for (name, m) in manifests() {
            let mut b = BytesMut::new();
            m.encode(&mut b);
            // Two ranges for the chunk arithmetic.
            for v in [0u64, 70_000, 65_536, m.size() + 5] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            write(dir, "manifest", name, &b);
        }
        let mut set = ChunkSet::new(21);
        set.insert(ChunkIndex(0));
        set.insert(ChunkIndex(20));
        let mut b = BytesMut::new();
        set.encode(&mut b);
        write(dir, "manifest", "chunk-set", &b);

        let pki = TestPki::new("hospital.example");
        write(dir, "audit_trail", "trail", &trail(&pki));

        write(dir, "policy", "example", POLICY.as_bytes());
        write(
            dir,
            "policy",
            "deny-only",
            b"[[rule]]\nname = \"nobody\"\neffect = \"deny\"\nsubjects = [\"*\"]\ndatasets = [\"**\"]\nactions = [\"write\"]\n",
        );
        write(dir, "policy", "empty", b"");

        workload_seeds(dir, &pki);
    }

    /// Real Workload API encodings, behind the selector byte `workload_response` reads.
    fn workload_seeds(dir: &Path, pki: &TestPki) {
        use prost::Message;

        use crate::workload::{encode_bundles_response, encode_x509_response};

        let (a, b) = (pki.svid("/gpu/loader-0"), pki.svid("/gpu/trainer-0"));
        let bundle = pki.bundle();
        let one = encode_x509_response([&a], &bundle).expect("seed");
        let two = encode_x509_response([&a, &b], &bundle).expect("seed");
        let bundles = encode_bundles_response([&bundle]);
        let chain: Vec<u8> = a.chain().iter().flat_map(|c| c.to_vec()).collect();
        let cas: Vec<u8> = bundle.cas().iter().flat_map(|c| c.to_vec()).collect();
        let seeds = [
            ("x509-one", 0, one.encode_to_vec()),
            ("x509-two", 0, two.encode_to_vec()),
            ("bundles", 1, bundles.encode_to_vec()),
            ("der-chain", 2, [chain, cas].concat()),
        ];
        for (name, kind, body) in seeds {
            write(dir, "workload_response", name, &[vec![kind], body].concat());
        }
    }
}
