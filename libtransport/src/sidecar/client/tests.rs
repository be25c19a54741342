//! The client against a small sidecar played by a thread of the test: a real Unix socket in
//! a temporary directory, real frames, real sealed memory files (from the real cache).

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::*;
use crate::cache::SealedCache;
use crate::proto::manifest::Manifest;
use crate::sidecar::{recv_frame, request_body};
use crate::test_util::{random_bytes, trace_init};

/// What the played sidecar does with one request: answers on `sock` (or not), and says
/// whether to keep the connection.
type Handler = dyn Fn(&UnixStream, LocalRequest, Option<OwnedFd>) -> bool + Send + Sync;

/// A played sidecar listening at `path`.
struct Sidecar {
    path: PathBuf,
    accepted: Arc<AtomicU64>,
    /// The accepted connections, shut down when the sidecar stops.
    conns: Arc<Mutex<Vec<UnixStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sidecar {
    fn start(path: &Path, handler: Arc<Handler>) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (a, st, cs) = (accepted.clone(), stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            for sock in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(sock) = sock else { return };
                a.fetch_add(1, Ordering::SeqCst);
                cs.lock().unwrap().push(sock.try_clone().unwrap());
                let h = handler.clone();
                std::thread::spawn(move || {
                    while let Ok((req, _, fd)) = recv_frame(&sock, request_body, 0) {
                        if !h(&sock, req, fd) {
                            // Closed, though `conns` holds a clone.
                            let _ = sock.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                });
            }
        });
        Self {
            path: path.to_path_buf(),
            accepted,
            conns,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Sidecar {
    /// Stops as a killed daemon would: stops listening (a connection wakes the accepting
    /// thread), removes the socket and shuts every accepted connection down.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn answer(sock: &UnixStream, a: &LocalAnswer) {
    send_frame(sock, a, &[], None).unwrap();
}

fn answer_fd(sock: &UnixStream, a: &LocalAnswer, fd: &OwnedFd) {
    send_frame(sock, a, &[], Some(fd.as_fd())).unwrap();
}

/// The object as the real cache hands it over: a sealed memfd, and its root.
fn cached_memfd(data: &[u8]) -> (OwnedFd, Digest) {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let m = Manifest::of_bytes(data, 1 << 20).unwrap();
    assert!(cache.insert(&m, data).unwrap());
    let fd = cache.get(&m.root()).unwrap().to_memfd().unwrap();
    (fd, m.root())
}

/// A memfd holding `data` with only `seals`.
fn memfd_with(data: &[u8], seals: SealFlags) -> OwnedFd {
    let fd =
        rustix::fs::memfd_create("test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    let f = File::from(fd);
    f.write_all_at(data, 0).unwrap();
    let fd = OwnedFd::from(f);
    rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    fd
}

/// A sidecar answering every `Fetch` with `fd` as an object of `size` bytes.
fn fetch_server(path: &Path, fd: OwnedFd, size: u64) -> Sidecar {
    let fd = Arc::new(fd);
    Sidecar::start(
        path,
        Arc::new(move |sock, req, _| {
            assert!(matches!(req, LocalRequest::Fetch { .. }), "{req:?}");
            let a = LocalAnswer::Mapped {
                size,
                root: Digest([7; 32]).to_hex(),
                cached: true,
            };
            answer_fd(sock, &a, &fd);
            true
        }),
    )
}

fn scans() -> (DatasetName, ObjectPath) {
    (
        DatasetName::new("scans").unwrap(),
        ObjectPath::new("train/a.bin").unwrap(),
    )
}

#[tokio::test]
async fn a_fetch_maps_the_sealed_memfd_and_only_the_frame_crosses_the_socket() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let data = random_bytes(5 << 20, 1);
    let (fd, root) = cached_memfd(&data);
    let fd = Arc::new(fd);
    let _s = Sidecar::start(
        &path,
        Arc::new(move |sock, req, _| {
            let LocalRequest::Fetch {
                dataset, object, ..
            } = req
            else {
                panic!("{req:?}")
            };
            assert_eq!(
                (dataset.as_str(), object.as_str()),
                ("scans", "train/a.bin")
            );
            let a = LocalAnswer::Mapped {
                size: 5 << 20,
                root: root.to_hex(),
                cached: true,
            };
            answer_fd(sock, &a, &fd);
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let got = client.fetch(&d, &o, 1 << 30).await.unwrap();
    assert!(got == data[..], "the mapped bytes differ");
    let through = client.bytes_through_socket();
    assert!(through < 200, "{through} bytes through the socket");
    // The limit is the caller's: over it, refused.
    let e = client.fetch(&d, &o, (5 << 20) - 1).await.unwrap_err();
    assert!(
        matches!(e, SidecarError::TooLarge { size, .. } if size == 5 << 20),
        "{e}"
    );
    assert_eq!(e.code(), "too_large");
}

#[tokio::test]
async fn a_memfd_not_sealed_against_writes_is_refused_and_never_mapped() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let data = random_bytes(100_000, 2);
    // Everything but the write seal: someone could still change it under a mapping.
    let fd = memfd_with(&data, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL);
    let s = fetch_server(&path, fd, data.len() as u64);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let e = client.fetch(&d, &o, 1 << 30).await.unwrap_err();
    assert!(
        matches!(e, SidecarError::NotSealed { seals } if seals & SealFlags::WRITE.bits() == 0),
        "{e}"
    );
    assert_eq!(e.code(), "protocol");
    assert!(!e.is_retriable());
    let mut buf = vec![0u8; data.len()];
    let e = client.fetch_into(&d, &o, &mut buf).await.unwrap_err();
    assert!(matches!(e, SidecarError::NotSealed { .. }), "{e}");
    assert!(buf.iter().all(|b| *b == 0), "bytes were read from it");
    // A connection whose peer sent that is not reused.
    assert_eq!(s.accepted(), 2);
    drop(s);

    // A regular file has no seals at all.
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&data).unwrap();
    let _s = fetch_server(&path, OwnedFd::from(f), data.len() as u64);
    let e = client.fetch(&d, &o, 1 << 30).await.unwrap_err();
    assert!(matches!(e, SidecarError::NotSealed { seals: 0 }), "{e}");
}

#[tokio::test]
async fn a_memfd_of_another_size_than_the_answer_states_is_refused() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let data = random_bytes(4096, 3);
    let (fd, _) = cached_memfd(&data);
    let _s = fetch_server(&path, fd, 4097);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let e = client.fetch(&d, &o, 1 << 30).await.unwrap_err();
    assert!(
        matches!(e, SidecarError::Protocol(ref m) if m.contains("4096")),
        "{e}"
    );
}

#[tokio::test]
async fn fetch_into_reads_the_object_into_the_callers_buffer() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let data = random_bytes((2 << 20) + 5, 4);
    let (fd, _) = cached_memfd(&data);
    let _s = fetch_server(&path, fd, data.len() as u64);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let mut buf = vec![0xAAu8; data.len() + 10];
    let done = client.fetch_into(&d, &o, &mut buf).await.unwrap();
    assert_eq!(done.size, data.len() as u64);
    assert!(done.cached);
    assert!(buf[..data.len()] == data[..] && buf[data.len()..].iter().all(|b| *b == 0xAA));
    let mut small = vec![0u8; data.len() - 1];
    let e = client.fetch_into(&d, &o, &mut small).await.unwrap_err();
    assert!(matches!(e, SidecarError::TooLarge { .. }), "{e}");
    assert!(client.bytes_through_socket() < 400);
}

#[tokio::test]
async fn a_read_range_past_the_inline_limit_is_split_into_reads_of_at_most_that() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let data = Arc::new(random_bytes(4 << 20, 5));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (d2, a2) = (data.clone(), asked.clone());
    let s = Sidecar::start(
        &path,
        Arc::new(move |sock, req, _| {
            let LocalRequest::Read { start, end, .. } = req else {
                panic!("{req:?}")
            };
            a2.lock().unwrap().push(start..end);
            if end - start > MAX_INLINE {
                answer(
                    sock,
                    &LocalAnswer::Error {
                        code: "too_large".into(),
                        message: "read of more than 1 MiB".into(),
                    },
                );
                return true;
            }
            let body = &d2[start as usize..end as usize];
            let a = LocalAnswer::Inline {
                body: body.len() as u64,
            };
            send_frame(sock, &a, body, None).unwrap();
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let range = 100..(100 + (2 << 20) + (1 << 19));
    let got = client.read_range(&d, &o, range.clone()).await.unwrap();
    assert!(got == data[range.start as usize..range.end as usize]);
    let asked = std::mem::take(&mut *asked.lock().unwrap());
    assert_eq!(
        asked,
        vec![
            100..100 + MAX_INLINE,
            100 + MAX_INLINE..100 + 2 * MAX_INLINE,
            100 + 2 * MAX_INLINE..range.end,
        ]
    );
    // The inline bytes cross the socket, and are counted.
    assert!(client.bytes_through_socket() >= range.end - range.start);
    // A small one is one read; an empty one still asks (the sidecar checks the range).
    let got = client.read_range(&d, &o, 10..20).await.unwrap();
    assert!(got == data[10..20]);
    assert!(client.read_range(&d, &o, 7..7).await.unwrap().is_empty());
    // A range ending before it starts is refused here.
    #[allow(clippy::reversed_empty_ranges)]
    let e = client.read_range(&d, &o, 20..10).await.unwrap_err();
    assert_eq!(e.code(), "range");
    // All of it on the one connection.
    assert_eq!(s.accepted(), 1);
}

#[tokio::test]
async fn error_answers_map_to_their_variants_and_keep_the_connection() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let s = Sidecar::start(
        &path,
        Arc::new(|sock, req, _| {
            let LocalRequest::Stat { object, .. } = req else {
                panic!("{req:?}")
            };
            // The object's name says which code to answer with.
            answer(
                sock,
                &LocalAnswer::Error {
                    code: object.clone(),
                    message: "refused in a test".into(),
                },
            );
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let d = DatasetName::new("scans").unwrap();
    let stat = |code: &str| {
        let c = client.clone();
        let (d, o) = (d.clone(), ObjectPath::new(code).unwrap());
        async move { c.stat(&d, &o).await.unwrap_err() }
    };
    let e = stat("permission_denied").await;
    assert!(matches!(e, SidecarError::PermissionDenied { .. }), "{e}");
    assert!(e.to_string().contains("registration entry"), "{e}");
    assert!(e.to_string().contains("uid and executable"), "{e}");
    assert!(!e.is_retriable());
    let e = stat("not_found").await;
    assert!(matches!(e, SidecarError::NotFound { .. }), "{e}");
    assert_eq!(e.code(), "not_found");
    for (code, retriable) in [
        ("busy", true),
        ("unreachable", true),
        ("unavailable", true),
        ("corrupt", false),
        ("invalid", false),
    ] {
        let e = stat(code).await;
        assert!(
            matches!(e, SidecarError::Refused { code: ref c, .. } if c == code),
            "{e}"
        );
        assert_eq!((e.code(), e.is_retriable()), (code, retriable));
    }
    assert_eq!(s.accepted(), 1, "an error answer cost the connection");
}

#[tokio::test]
async fn malformed_or_unexpected_answers_are_protocol_errors_and_cost_the_connection() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let s = Sidecar::start(
        &path,
        Arc::new(|sock, req, _| {
            match req {
                // A listing for a stat.
                LocalRequest::Stat { .. } => {
                    answer(sock, &LocalAnswer::Listing { objects: vec![] })
                }
                // Not an answer at all.
                LocalRequest::Datasets { .. } => {
                    send_frame(sock, &serde_json::json!({"answer": "hello"}), &[], None).unwrap();
                }
                // A root that is no digest.
                _ => answer(
                    sock,
                    &LocalAnswer::Pushed {
                        size: 3,
                        root: "zz".into(),
                    },
                ),
            }
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let e = client.stat(&d, &o).await.unwrap_err();
    assert!(
        matches!(e, SidecarError::Protocol(ref m) if m.contains("listing")),
        "{e}"
    );
    let e = client.list_datasets().await.unwrap_err();
    assert!(matches!(e, SidecarError::Protocol(_)), "{e}");
    let e = client
        .push_bytes(&d, &o, Bytes::from_static(b"abc"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SidecarError::Protocol(ref m) if m.contains("digest")),
        "{e}"
    );
    assert_eq!(s.accepted(), 3);
}

#[tokio::test]
async fn a_sidecar_gone_mid_answer_is_unavailable_and_the_next_call_on_a_fresh_one_succeeds() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    // Nothing listening: unavailable, retriable.
    let e = SidecarClient::connect(&path).await.unwrap_err();
    assert!(matches!(e, SidecarError::Unavailable(_)), "{e}");
    assert!(e.is_retriable() && e.code() == "unavailable");
    assert!(
        e.to_string().contains("not running or was restarted"),
        "{e}"
    );

    // A sidecar killed part-way through an answer: half a frame, then the socket closes.
    let s = Sidecar::start(
        &path,
        Arc::new(|sock, _, _| {
            let mut w = sock;
            w.write_all(&100u32.to_be_bytes()).unwrap();
            w.write_all(b"{\"answer\":").unwrap();
            false
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let e = client.list_datasets().await.unwrap_err();
    assert!(matches!(e, SidecarError::Unavailable(_)), "{e}");
    assert!(e.is_retriable());
    drop(s);

    // The restarted sidecar answers the next call on a new connection.
    let s = Sidecar::start(
        &path,
        Arc::new(|sock, _, _| {
            let names = vec!["scans".to_owned()];
            answer(sock, &LocalAnswer::Datasets { names });
            true
        }),
    );
    let names = client.list_datasets().await.unwrap();
    assert_eq!(names, vec![DatasetName::new("scans").unwrap()]);
    assert_eq!(s.accepted(), 1);
}

#[tokio::test]
async fn an_idle_connection_of_a_sidecar_that_restarted_is_not_used_again() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let prefetching: Arc<Handler> = Arc::new(|sock, _, _| {
        answer(sock, &LocalAnswer::Prefetching { count: 2 });
        true
    });
    let (d, o) = scans();
    let objects = [(d.clone(), o.clone()), (d, o)];
    let s = Sidecar::start(&path, prefetching.clone());
    let client = SidecarClient::connect(&path).await.unwrap();
    assert_eq!(client.prefetch(&objects).await.unwrap(), 2);
    // The daemon restarts between two calls: the idle connection is dead, and the next
    // call goes on a new one rather than failing.
    drop(s);
    let s = Sidecar::start(&path, prefetching);
    assert_eq!(client.prefetch(&objects).await.unwrap(), 2);
    assert_eq!(client.prefetch(&objects).await.unwrap(), 2);
    assert_eq!(s.accepted(), 1);
}

#[tokio::test]
async fn listings_stats_and_nodes_go_through() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let root = Digest([9; 32]);
    let _s = Sidecar::start(
        &path,
        Arc::new(move |sock, req, _| {
            let a = match req {
                LocalRequest::List {
                    node,
                    dataset,
                    prefix,
                } => {
                    assert_eq!(
                        (node.as_deref(), dataset.as_str()),
                        (Some("storage-1"), "scans")
                    );
                    LocalAnswer::Listing {
                        objects: vec![
                            (format!("{prefix}a.bin"), 10),
                            (format!("{prefix}b.bin"), 20),
                        ],
                    }
                }
                LocalRequest::Stat { node, .. } => {
                    assert_eq!(node, None);
                    LocalAnswer::Stat {
                        size: 30,
                        root: root.to_hex(),
                        chunk_bytes: 1 << 20,
                        chunks: 1,
                    }
                }
                other => panic!("{other:?}"),
            };
            answer(sock, &a);
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let on1 = client.with_node("storage-1");
    assert_eq!(on1.node(), Some("storage-1"));
    let (d, o) = scans();
    let list = on1.list_objects(&d, "train/").await.unwrap();
    let got: Vec<_> = list.iter().map(|e| (e.path.as_str(), e.size)).collect();
    assert_eq!(got, vec![("train/a.bin", 10), ("train/b.bin", 20)]);
    let stat = client.stat(&d, &o).await.unwrap();
    assert_eq!(
        stat,
        SidecarStat {
            size: 30,
            root,
            chunk_bytes: 1 << 20,
            chunks: 1
        }
    );
}

/// A sidecar that takes pushes, sending what it read from each descriptor to `seen`.
fn push_server(path: &Path, seen: mpsc::Sender<(Option<SealFlags>, Vec<u8>)>) -> Sidecar {
    let seen = Mutex::new(seen);
    Sidecar::start(
        path,
        Arc::new(move |sock, req, fd| {
            assert!(matches!(req, LocalRequest::Push { .. }), "{req:?}");
            let fd = fd.expect("a descriptor with the push");
            let seals = rustix::fs::fcntl_get_seals(&fd).ok();
            // Read from offset 0, as the daemon does.
            let f = File::from(fd);
            let len = f.metadata().unwrap().len() as usize;
            let mut bytes = vec![0u8; len];
            f.read_exact_at(&mut bytes, 0).unwrap();
            let root = Manifest::of_bytes(&bytes, 1 << 20).unwrap().root();
            let a = LocalAnswer::Pushed {
                size: len as u64,
                root: root.to_hex(),
            };
            seen.lock().unwrap().send((seals, bytes)).unwrap();
            answer(sock, &a);
            true
        }),
    )
}

#[tokio::test]
async fn push_bytes_hands_over_a_sealed_memfd_holding_the_bytes() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let (tx, rx) = mpsc::channel();
    let _s = push_server(&path, tx);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let data = random_bytes(3 << 20, 6);
    let pushed = client
        .push_bytes(&d, &o, Bytes::from(data.clone()))
        .await
        .unwrap();
    let (seals, seen) = rx.recv().unwrap();
    assert!(seen == data, "the sidecar read other bytes");
    assert!(seals.unwrap().contains(REQUIRED_SEALS), "{seals:?}");
    assert_eq!(pushed.size, data.len() as u64);
    assert_eq!(
        pushed.root,
        Manifest::of_bytes(&data, 1 << 20).unwrap().root()
    );
    assert!(client.bytes_through_socket() < 200);
}

#[tokio::test]
async fn push_file_hands_over_the_opened_file() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let (tx, rx) = mpsc::channel();
    let _s = push_server(&path, tx);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let data = random_bytes(200_000, 7);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let pushed = client.push_file(&d, &o, &src).await.unwrap();
    let (seals, seen) = rx.recv().unwrap();
    assert!(seen == data);
    assert_eq!(seals, None, "a regular file");
    assert_eq!(pushed.size, data.len() as u64);
    // A directory is not a file to push, and nothing is sent for it.
    let e = client.push_file(&d, &o, dir.path()).await.unwrap_err();
    assert!(matches!(e, SidecarError::Local(_)), "{e}");
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn fetch_to_file_renames_a_complete_file_into_place_and_leaves_nothing_on_a_failure() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("a.bin");
    let data = random_bytes((3 << 20) + 17, 8);
    let (fd, _) = cached_memfd(&data);
    let s = fetch_server(&path, fd, data.len() as u64);
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let done = client.fetch_to_file(&d, &o, &dest).await.unwrap();
    assert_eq!(done.size, data.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == data);
    assert_eq!(done.root, Digest([7; 32]));
    drop(s);

    // Failures after the temporary file was made: an unsealed file, a sidecar gone
    // mid-answer. The old file stays as it was and no other file is left.
    let fd = memfd_with(b"other bytes", SealFlags::GROW | SealFlags::SHRINK);
    let s = fetch_server(&path, fd, 11);
    let e = client.fetch_to_file(&d, &o, &dest).await.unwrap_err();
    assert!(matches!(e, SidecarError::NotSealed { .. }), "{e}");
    drop(s);
    let _s = Sidecar::start(
        &path,
        Arc::new(|sock, _, _| {
            (&*sock).write_all(&[0, 0]).unwrap();
            false
        }),
    );
    let e = client.fetch_to_file(&d, &o, &dest).await.unwrap_err();
    assert!(matches!(e, SidecarError::Unavailable(_)), "{e}");
    let fresh = out.path().join("b.bin");
    let e = client.fetch_to_file(&d, &o, &fresh).await.unwrap_err();
    assert!(matches!(e, SidecarError::Unavailable(_)), "{e}");
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("a.bin")]);
    assert!(std::fs::read(&dest).unwrap() == data);
}

#[tokio::test]
async fn without_the_variable_the_error_says_to_set_it() {
    let _trace = trace_init();
    let e = SidecarClient::from_lookup(|_| None).await.unwrap_err();
    assert!(matches!(e, SidecarError::NoSocket));
    assert!(e.to_string().contains(SOCKET_ENV), "{e}");
    let e = SidecarClient::from_lookup(|_| Some(OsString::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, SidecarError::NoSocket));
    // Named but absent: the sidecar is not running.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let e = SidecarClient::from_lookup(|name| {
        assert_eq!(name, SOCKET_ENV);
        Some(missing.clone().into_os_string())
    })
    .await
    .unwrap_err();
    assert!(matches!(e, SidecarError::Unavailable(_)), "{e}");
}

#[test]
fn pieces_cover_the_range_in_order_and_none_is_longer_than_the_limit() {
    assert_eq!(pieces(0..0, 4), vec![0..0]);
    assert_eq!(pieces(3..7, 4), vec![3..7]);
    assert_eq!(pieces(3..12, 4), vec![3..7, 7..11, 11..12]);
    assert_eq!(
        pieces(u64::MAX - 2..u64::MAX, 4),
        vec![u64::MAX - 2..u64::MAX]
    );
}

#[tokio::test]
async fn answers_that_do_not_hold_what_they_claim_are_refused() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let _s = Sidecar::start(
        &path,
        Arc::new(|sock, req, _| {
            match req {
                // One byte short of the read.
                LocalRequest::Read { start, end, .. } => {
                    let body = vec![0u8; (end - start - 1) as usize];
                    let a = LocalAnswer::Inline {
                        body: body.len() as u64,
                    };
                    send_frame(sock, &a, &body, None).unwrap();
                }
                // A whole object, but no file with it.
                LocalRequest::Fetch { .. } => answer(
                    sock,
                    &LocalAnswer::Mapped {
                        size: 10,
                        root: Digest([1; 32]).to_hex(),
                        cached: false,
                    },
                ),
                // Names that are not names.
                LocalRequest::Datasets { .. } => answer(
                    sock,
                    &LocalAnswer::Datasets {
                        names: vec!["../etc".into()],
                    },
                ),
                LocalRequest::List { .. } => answer(
                    sock,
                    &LocalAnswer::Listing {
                        objects: vec![("/abs/path".into(), 1)],
                    },
                ),
                // Another size than was pushed.
                LocalRequest::Push { .. } => answer(
                    sock,
                    &LocalAnswer::Pushed {
                        size: 2,
                        root: Digest([1; 32]).to_hex(),
                    },
                ),
                other => panic!("{other:?}"),
            }
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let protocol = |e: SidecarError, what: &str| {
        assert!(
            matches!(e, SidecarError::Protocol(ref m) if m.contains(what)),
            "{e} (wanted {what})"
        );
    };
    protocol(
        client.read_range(&d, &o, 0..100).await.unwrap_err(),
        "answered with 99",
    );
    protocol(
        client.fetch(&d, &o, 100).await.unwrap_err(),
        "without a file",
    );
    protocol(client.list_datasets().await.unwrap_err(), "dataset name");
    protocol(
        client.list_objects(&d, "").await.unwrap_err(),
        "object path",
    );
    let e = client
        .push_bytes(&d, &o, Bytes::from_static(b"abc"))
        .await
        .unwrap_err();
    protocol(e, "answered as 2");
}

/// A played sidecar that says it is working `beats` times, `every` apart, before it answers
/// a prefetch (or, with `answers` false, says nothing more and keeps the connection open).
fn slow_server(path: &Path, beats: u32, every: Duration, answers: bool) -> Sidecar {
    Sidecar::start(
        path,
        Arc::new(move |sock, _, _| {
            for _ in 0..beats {
                std::thread::sleep(every);
                answer(sock, &LocalAnswer::Working);
            }
            if answers {
                answer(sock, &LocalAnswer::Prefetching { count: 1 });
                return true;
            }
            // Hung: holds the connection, says nothing, until the test is over.
            let mut byte = [0u8; 1];
            let _ = (&mut &*sock).read(&mut byte);
            false
        }),
    )
}

#[tokio::test]
async fn a_daemon_saying_it_is_working_keeps_a_call_alive_past_the_answer_timeout() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    // Ten beats 100 ms apart: a second of work, five times the timeout of 200 ms.
    let _s = slow_server(&path, 10, Duration::from_millis(100), true);
    let client = SidecarClient::connect(&path)
        .await
        .unwrap()
        .with_answer_timeout(Duration::from_millis(200));
    let (d, o) = scans();
    assert_eq!(client.prefetch(&[(d, o)]).await.unwrap(), 1);
    // The beats crossed the socket and were counted, though no call returned them.
    assert!(client.bytes_through_socket() > 10 * 4);
}

#[tokio::test]
async fn a_daemon_that_says_nothing_is_given_up_on_as_retriable_no_answer() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    // Two beats, then silence: the call waits the timeout after the last beat, no more.
    let _s = slow_server(&path, 2, Duration::from_millis(50), false);
    let client = SidecarClient::connect(&path)
        .await
        .unwrap()
        .with_answer_timeout(Duration::from_millis(300));
    let (d, o) = scans();
    let e = client
        .prefetch(&[(d.clone(), o.clone())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, SidecarError::NoAnswer { after } if after == Duration::from_millis(300)),
        "{e:?}"
    );
    assert_eq!(e.code(), "unavailable");
    assert!(e.is_retriable());
    assert!(e.to_string().contains("hung or overloaded"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn a_connection_idle_past_its_age_is_not_used_again() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let s = Sidecar::start(
        &path,
        Arc::new(|sock, _, _| {
            answer(sock, &LocalAnswer::Prefetching { count: 1 });
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    assert_eq!(client.prefetch(&[(d.clone(), o.clone())]).await.unwrap(), 1);
    assert_eq!(s.accepted(), 1);
    // Age the idle connection past what the daemon keeps: the next call opens another.
    for (_, since) in client.shared.lock().iter_mut() {
        *since -= MAX_IDLE_AGE;
    }
    assert_eq!(client.prefetch(&[(d.clone(), o.clone())]).await.unwrap(), 1);
    assert_eq!(s.accepted(), 2);
    // A young one is reused.
    assert_eq!(client.prefetch(&[(d, o)]).await.unwrap(), 1);
    assert_eq!(s.accepted(), 2);
}

#[test]
fn a_caller_turned_away_before_it_asked_gets_the_busy_answer_not_a_broken_pipe() {
    let (daemon, caller) = UnixStream::pair().unwrap();
    answer(
        &daemon,
        &LocalAnswer::Error {
            code: "busy".into(),
            message: "full".into(),
        },
    );
    // Closed without reading: the request's send fails with a broken pipe.
    drop(daemon);
    let shared = Shared {
        socket: PathBuf::from("unused"),
        idle: Mutex::new(Vec::new()),
        through: AtomicU64::new(0),
    };
    let mut conn = Conn {
        sock: caller,
        shared: &shared,
        in_step: true,
        timeout: Duration::from_secs(5),
    };
    let (d, o) = scans();
    let req = LocalRequest::Stat {
        node: None,
        dataset: d.as_str().into(),
        object: o.as_str().into(),
    };
    let e = conn.exchange(&req, None).unwrap_err();
    assert!(
        matches!(&e, SidecarError::Refused { code, .. } if code == "busy"),
        "{e:?}"
    );
    assert!(e.is_retriable());
    assert!(!conn.in_step, "a connection turned away is not kept");
}

#[tokio::test]
async fn a_cancelled_fetch_to_file_puts_nothing_in_place() {
    let _trace = trace_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.sock");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("a.bin");
    let data = random_bytes(1 << 20, 9);
    let (fd, _) = cached_memfd(&data);
    let fd = Arc::new(fd);
    // The sidecar holds its answer until the test lets it go.
    let (asked_tx, asked) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let (asked_tx, go_rx) = (Mutex::new(asked_tx), Mutex::new(go_rx));
    let size = data.len() as u64;
    let _s = Sidecar::start(
        &path,
        Arc::new(move |sock, _, _| {
            asked_tx.lock().unwrap().send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            let a = LocalAnswer::Mapped {
                size,
                root: Digest([7; 32]).to_hex(),
                cached: true,
            };
            answer_fd(sock, &a, &fd);
            true
        }),
    );
    let client = SidecarClient::connect(&path).await.unwrap();
    let (d, o) = scans();
    let call = {
        let (client, dest) = (client.clone(), dest.clone());
        tokio::spawn(async move { client.fetch_to_file(&d, &o, &dest).await })
    };
    tokio::task::spawn_blocking(move || asked.recv().unwrap())
        .await
        .unwrap();
    // Cancelled while the sidecar works; then the answer comes.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    go.send(()).unwrap();
    // The blocking thread finishes the exchange and gives the connection back.
    let start = SystemClock.instant();
    while client.shared.lock().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the exchange never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dest.exists(), "a cancelled call put its file in place");
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "a file was left"
    );
}
