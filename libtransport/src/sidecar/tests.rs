use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use super::*;
use crate::cache::SealedCache;
use crate::proto::manifest::Manifest;
use crate::test_util::random_bytes;

#[test]
fn a_fetch_answer_hands_over_a_sealed_memfd_and_only_its_header_crosses_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let data = random_bytes(3 << 20, 7);
    let m = Manifest::of_bytes(&data, 1 << 20).unwrap();
    assert!(cache.insert(&m, &data).unwrap());
    let fd = cache.get(&m.root()).unwrap().to_memfd().unwrap();
    let (daemon, caller) = UnixStream::pair().unwrap();
    send_frame(
        &caller,
        &LocalRequest::Fetch {
            node: None,
            dataset: "scans".into(),
            object: "a.bin".into(),
        },
        &[],
        None,
    )
    .unwrap();
    let (req, body, none): (LocalRequest, _, _) = recv_frame(&daemon, request_body, 0).unwrap();
    assert!(body.is_empty() && none.is_none());
    assert!(matches!(req, LocalRequest::Fetch { ref object, .. } if object == "a.bin"));
    let answer = LocalAnswer::Mapped {
        size: data.len() as u64,
        root: m.root().to_hex(),
        cached: true,
    };
    send_frame(&daemon, &answer, &[], Some(fd.as_fd())).unwrap();
    drop(fd);
    // Count what crosses the socket: the frame alone, far less than the object.
    let pending = rustix::io::ioctl_fionread(&caller).unwrap();
    assert!(pending < 200, "{pending} bytes through the socket");
    let (got, body, fd): (LocalAnswer, _, _) =
        recv_frame(&caller, answer_body, MAX_INLINE).unwrap();
    assert_eq!(got, answer);
    assert!(body.is_empty());
    let f = std::fs::File::from(fd.expect("a descriptor"));
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == data);
    assert!(f.write_at(b"x", 0).is_err(), "the caller could change it");
}

#[test]
fn a_small_read_comes_inline_after_its_header() {
    let (daemon, caller) = UnixStream::pair().unwrap();
    let bytes = random_bytes(5000, 8);
    send_frame(
        &daemon,
        &LocalAnswer::Inline {
            body: bytes.len() as u64,
        },
        &bytes,
        None,
    )
    .unwrap();
    let (a, body, fd): (LocalAnswer, _, _) = recv_frame(&caller, answer_body, MAX_INLINE).unwrap();
    assert_eq!(a, LocalAnswer::Inline { body: 5000 });
    assert!(body == bytes && fd.is_none());
}

#[test]
fn oversized_or_malformed_frames_are_refused_before_anything_is_allocated() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut w = &a;
    // A header longer than allowed.
    w.write_all(&(MAX_HEADER + 1).to_be_bytes()).unwrap();
    assert!(matches!(
        recv_frame::<LocalRequest>(&b, request_body, 0),
        Err(FrameError::Malformed(m)) if m.contains("header")
    ));
    // A body longer than the reader takes (announced by an answer's header).
    let (a, b) = UnixStream::pair().unwrap();
    send_frame(&a, &LocalAnswer::Inline { body: 1 << 40 }, &[], None).unwrap();
    assert!(matches!(
        recv_frame::<LocalAnswer>(&b, answer_body, MAX_INLINE),
        Err(FrameError::Malformed(m)) if m.contains("body")
    ));
    // Not a request.
    let (a, b) = UnixStream::pair().unwrap();
    send_frame(&a, &serde_json::json!({"op": "format_disk"}), &[], None).unwrap();
    assert!(matches!(
        recv_frame::<LocalRequest>(&b, request_body, 0),
        Err(FrameError::Malformed(_))
    ));
    // A closed socket.
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(matches!(
        recv_frame::<LocalRequest>(&b, request_body, 0),
        Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
    ));
}
