//! The software RDMA device between two endpoints on loopback (two tasks, and two processes):
//! writes with immediate land and complete on both sides, sends land in posted receives,
//! bad keys, out-of-bounds writes and writes without a posted receive are refused without
//! touching memory, a disconnect flushes what is in flight, and many requests in flight
//! complete in order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use libtransport::test_util::trace_init;
use libtransport::transport::rdma::soft::{SoftConfig, SoftRegion, SoftVerbs};
use libtransport::transport::rdma::verbs::{
    BrokenReason, Completion, CompletionError, CompletionKind, RKey, Region, RemoteAccessError,
    RemoteRegion, Verbs, VerbsError, WorkId,
};

/// Two connected devices with default settings.
async fn pair() -> (SoftVerbs, SoftVerbs) {
    pair_with(SoftConfig::default()).await
}

async fn pair_with(config: SoftConfig) -> (SoftVerbs, SoftVerbs) {
    let config = Arc::new(config);
    let a = SoftVerbs::bind(Arc::clone(&config)).await.unwrap();
    let b = SoftVerbs::bind(config).await.unwrap();
    let (a_info, b_info) = (a.local_info(), b.local_info());
    let (ra, rb) = tokio::join!(a.connect(&b_info), b.connect(&a_info));
    ra.unwrap();
    rb.unwrap();
    (a, b)
}

/// The next completion, or a test failure after 10 s.
async fn next(v: &SoftVerbs) -> Completion {
    tokio::time::timeout(Duration::from_secs(10), v.poll())
        .await
        .expect("no completion within 10 s")
        .expect("poll failed")
}

/// The poll result once all completions are taken: the queue pair's error.
async fn broken(v: &SoftVerbs) -> BrokenReason {
    match tokio::time::timeout(Duration::from_secs(10), v.poll()).await {
        Ok(Err(VerbsError::Broken(why))) => why,
        other => panic!("expected the error state, got {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn fill(region: &SoftRegion, offset: usize, data: &[u8]) {
    region
        .with_mut(offset..offset + data.len(), |buf| buf.copy_from_slice(data))
        .unwrap();
}

fn read(region: &SoftRegion, range: std::ops::Range<usize>) -> Vec<u8> {
    region.with_mut(range, |buf| buf.to_vec()).unwrap()
}

fn ok(id: u64, kind: CompletionKind) -> Completion {
    Completion {
        id: WorkId(id),
        kind,
        status: Ok(()),
    }
}

#[tokio::test]
async fn write_imm_lands_and_completes_on_both_sides() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let dst = b.register(1 << 20).unwrap();
    b.post_recv(WorkId(70), &dst, 0, 0).unwrap();
    let src = a.register(64 << 10).unwrap();
    let data = pattern(5000, 7);
    fill(&src, 100, &data);

    let remote = RemoteRegion::decode(&dst.remote().encode()).unwrap();
    a.post_write_imm(WorkId(1), &src, 100, 5000, &remote, 4096, 0x00c0_ffee)
        .unwrap();

    assert_eq!(next(&a).await, ok(1, CompletionKind::Write));
    assert_eq!(
        next(&b).await,
        ok(
            70,
            CompletionKind::WriteWithImm {
                imm: 0x00c0_ffee,
                len: 5000
            }
        )
    );
    assert_eq!(
        read(&dst, 4096..9096),
        data,
        "the data landed at dst_offset"
    );
    assert!(
        read(&dst, 0..4096).iter().all(|&b| b == 0),
        "nothing before it"
    );
    assert!(
        read(&dst, 9096..1 << 20).iter().all(|&b| b == 0),
        "nothing after it"
    );
    // The source range is free again once its completion was polled.
    fill(&src, 100, &[0; 5000]);
}

#[tokio::test]
async fn send_lands_in_the_next_posted_receive() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let inbox = b.register(8192).unwrap();
    b.post_recv(WorkId(1), &inbox, 128, 1000).unwrap();
    b.post_recv(WorkId(2), &inbox, 4096, 1000).unwrap();
    let src = a.register(4096).unwrap();
    let first = pattern(600, 1);
    let second = pattern(1000, 2);
    fill(&src, 0, &first);
    fill(&src, 1000, &second);

    a.post_send(WorkId(10), &src, 0, 600).unwrap();
    a.post_send(WorkId(11), &src, 1000, 1000).unwrap();

    assert_eq!(next(&a).await, ok(10, CompletionKind::Send));
    assert_eq!(next(&a).await, ok(11, CompletionKind::Send));
    assert_eq!(next(&b).await, ok(1, CompletionKind::Recv { len: 600 }));
    assert_eq!(next(&b).await, ok(2, CompletionKind::Recv { len: 1000 }));
    assert_eq!(read(&inbox, 128..728), first);
    assert!(
        read(&inbox, 728..1128).iter().all(|&b| b == 0),
        "a short SEND fills only its length"
    );
    assert_eq!(read(&inbox, 4096..5096), second);
}

#[tokio::test]
async fn write_with_a_wrong_rkey_is_refused_and_memory_untouched() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let dst = b.register(4096).unwrap();
    b.post_recv(WorkId(5), &dst, 0, 0).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(4096, 3));

    let mut remote = dst.remote();
    remote.rkey = RKey(remote.rkey.0 ^ 0x5a5a_5a5a);
    a.post_write_imm(WorkId(1), &src, 0, 4096, &remote, 0, 1)
        .unwrap();

    let c = next(&a).await;
    assert_eq!(c.id, WorkId(1));
    assert_eq!(c.kind, CompletionKind::Write);
    assert_eq!(
        c.status,
        Err(CompletionError::RemoteAccess(RemoteAccessError::UnknownKey))
    );
    // As on an RC queue pair, the failure breaks the connection on both sides: the
    // receive is flushed, never completed with data.
    let flushed = next(&b).await;
    assert_eq!(flushed.id, WorkId(5));
    assert_eq!(flushed.status, Err(CompletionError::Flushed));
    assert!(
        read(&dst, 0..4096).iter().all(|&b| b == 0),
        "memory untouched"
    );
    assert!(matches!(
        broken(&a).await,
        BrokenReason::WorkRequestFailed(CompletionError::RemoteAccess(_))
    ));
    assert!(matches!(
        a.post_send(WorkId(2), &src, 0, 1),
        Err(VerbsError::Broken(_))
    ));
    broken(&b).await;
}

#[tokio::test]
async fn write_out_of_bounds_is_refused_and_memory_untouched() {
    let _trace = trace_init();
    // Past the end: the advertised region is widened by a lie, the peer checks the truth.
    let (a, b) = pair().await;
    let dst = b.register(4096).unwrap();
    b.post_recv(WorkId(5), &dst, 0, 0).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(4096, 4));
    let mut remote = dst.remote();
    remote.len += 4096;
    a.post_write_imm(WorkId(1), &src, 0, 100, &remote, 4096 - 10, 1)
        .unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::RemoteAccess(
            RemoteAccessError::OutOfBounds
        ))
    );
    assert!(
        read(&dst, 0..4096).iter().all(|&b| b == 0),
        "not even the in-bounds part was written"
    );

    // Before the start: an address below the region.
    let (a, b) = pair().await;
    let dst = b.register(4096).unwrap();
    b.post_recv(WorkId(5), &dst, 0, 0).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(4096, 4));
    let mut remote = dst.remote();
    remote.addr -= 64;
    a.post_write_imm(WorkId(1), &src, 0, 128, &remote, 0, 1)
        .unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::RemoteAccess(
            RemoteAccessError::OutOfBounds
        ))
    );
    assert!(read(&dst, 0..4096).iter().all(|&b| b == 0));
    assert_eq!(next(&b).await.status, Err(CompletionError::Flushed));

    // A write beyond what the advertised region says never leaves this side.
    let (a, b) = pair().await;
    let dst = b.register(4096).unwrap();
    let src = a.register(8192).unwrap();
    assert!(matches!(
        a.post_write_imm(WorkId(1), &src, 0, 4097, &dst.remote(), 0, 1),
        Err(VerbsError::OutOfBounds { .. })
    ));
}

#[tokio::test]
async fn write_imm_without_a_posted_receive_is_receiver_not_ready() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let dst = b.register(4096).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(4096, 5));
    a.post_write_imm(WorkId(1), &src, 0, 4096, &dst.remote(), 0, 9)
        .unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::ReceiverNotReady)
    );
    assert!(
        read(&dst, 0..4096).iter().all(|&b| b == 0),
        "memory untouched"
    );
    assert!(matches!(
        broken(&b).await,
        BrokenReason::RefusedPeerRequest(CompletionError::ReceiverNotReady)
    ));

    // The same for a SEND.
    let (a, b) = pair().await;
    let src = a.register(16).unwrap();
    a.post_send(WorkId(1), &src, 0, 16).unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::ReceiverNotReady)
    );
    broken(&b).await;
}

#[tokio::test]
async fn send_longer_than_the_receive_fails_on_both_sides() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let inbox = b.register(4096).unwrap();
    b.post_recv(WorkId(1), &inbox, 0, 100).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(101, 6));
    a.post_send(WorkId(2), &src, 0, 101).unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::RemoteInvalidRequest)
    );
    let c = next(&b).await;
    assert_eq!(c.id, WorkId(1));
    assert_eq!(c.status, Err(CompletionError::LocalLength));
    assert!(read(&inbox, 0..4096).iter().all(|&b| b == 0));
}

#[tokio::test]
async fn disconnect_flushes_requests_in_flight() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let dst = b.register(16 << 20).unwrap();
    for i in 0..16 {
        b.post_recv(WorkId(100 + i), &dst, 0, 0).unwrap();
    }
    let src = a.register(16 << 20).unwrap();
    for i in 0..16u64 {
        let at = (i as usize) << 20;
        a.post_write_imm(WorkId(i), &src, at, 1 << 20, &dst.remote(), at as u64, 0)
            .unwrap();
    }
    // On this (current-thread) runtime the writer task has not run yet: all 16 are still
    // in flight when we disconnect.
    a.disconnect();
    for i in 0..16 {
        let c = next(&a).await;
        assert_eq!(c.id, WorkId(i), "flushed in posting order");
        assert_eq!(c.kind, CompletionKind::Write);
        assert_eq!(c.status, Err(CompletionError::Flushed));
    }
    assert_eq!(broken(&a).await, BrokenReason::Disconnected);
    assert!(matches!(
        a.post_send(WorkId(99), &src, 0, 1),
        Err(VerbsError::Broken(BrokenReason::Disconnected))
    ));
    // The peer sees the connection go: its receives are flushed too.
    for i in 0..16 {
        let c = next(&b).await;
        assert_eq!(c.id, WorkId(100 + i));
        assert_eq!(c.status, Err(CompletionError::Flushed));
    }
    assert_eq!(broken(&b).await, BrokenReason::PeerClosed);
    // And the flushed ranges are free again.
    fill(&src, 0, &[1; 16]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_by_the_peer_mid_transfer_accounts_for_every_request() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    // 64 writes of 4 MiB: after the first has landed, the rest take tens of milliseconds.
    let dst = b.register(256 << 20).unwrap();
    for i in 0..64 {
        b.post_recv(WorkId(i), &dst, 0, 0).unwrap();
    }
    let src = a.register(256 << 20).unwrap();
    for i in 0..64u64 {
        let at = (i as usize) << 22;
        a.post_write_imm(WorkId(i), &src, at, 4 << 20, &dst.remote(), at as u64, 0)
            .unwrap();
    }
    // Let a few land, then the receiver goes away.
    let first = next(&b).await;
    assert_eq!(first.status, Ok(()));
    drop(b);
    let mut flushed = 0;
    for i in 0..64 {
        let c = next(&a).await;
        assert_eq!(c.id, WorkId(i), "every request completes once, in order");
        match c.status {
            Ok(()) => assert_eq!(flushed, 0, "nothing succeeds after a flush"),
            Err(CompletionError::Flushed) => flushed += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(flushed > 0, "the disconnect caught requests in flight");
    assert_eq!(broken(&a).await, BrokenReason::PeerClosed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writes_in_flight_complete_in_order() {
    let _trace = trace_init();
    const N: u64 = 200;
    const SLOT: usize = 8192;
    let (a, b) = pair().await;
    let dst = b.register(N as usize * SLOT).unwrap();
    for i in 0..N {
        b.post_recv(WorkId(1000 + i), &dst, 0, 0).unwrap();
    }
    let src = a.register(N as usize * SLOT).unwrap();
    for i in 0..N {
        let len = 1 + (i as usize * 37) % SLOT;
        let at = i as usize * SLOT;
        fill(&src, at, &pattern(len, i as u8));
        a.post_write_imm(WorkId(i), &src, at, len, &dst.remote(), at as u64, i as u32)
            .unwrap();
    }
    for i in 0..N {
        assert_eq!(next(&a).await, ok(i, CompletionKind::Write));
    }
    for i in 0..N {
        let len = 1 + (i as usize * 37) % SLOT;
        assert_eq!(
            next(&b).await,
            ok(
                1000 + i,
                CompletionKind::WriteWithImm {
                    imm: i as u32,
                    len: len as u32
                }
            )
        );
        let at = i as usize * SLOT;
        assert_eq!(read(&dst, at..at + len), pattern(len, i as u8), "slot {i}");
    }
}

#[tokio::test]
async fn both_directions_at_once() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let (ra, rb) = (a.register(1 << 20).unwrap(), b.register(1 << 20).unwrap());
    fill(&ra, 0, &pattern(1 << 19, 1));
    fill(&rb, 0, &pattern(1 << 19, 2));
    a.post_recv(WorkId(1), &ra, 0, 0).unwrap();
    b.post_recv(WorkId(1), &rb, 0, 0).unwrap();
    let half = 1u64 << 19;
    a.post_write_imm(WorkId(2), &ra, 0, 1 << 19, &rb.remote(), half, 1)
        .unwrap();
    b.post_write_imm(WorkId(2), &rb, 0, 1 << 19, &ra.remote(), half, 2)
        .unwrap();
    let mut seen_a = vec![next(&a).await.kind, next(&a).await.kind];
    let mut seen_b = vec![next(&b).await.kind, next(&b).await.kind];
    seen_a.sort_by_key(|k| format!("{k:?}"));
    seen_b.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        seen_a,
        [
            CompletionKind::Write,
            CompletionKind::WriteWithImm {
                imm: 2,
                len: 1 << 19
            }
        ]
    );
    assert_eq!(
        seen_b,
        [
            CompletionKind::Write,
            CompletionKind::WriteWithImm {
                imm: 1,
                len: 1 << 19
            }
        ]
    );
    assert_eq!(read(&ra, 1 << 19..1 << 20), pattern(1 << 19, 2));
    assert_eq!(read(&rb, 1 << 19..1 << 20), pattern(1 << 19, 1));
}

#[tokio::test]
async fn posted_ranges_belong_to_the_device_until_their_completion() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let inbox = b.register(4096).unwrap();
    b.post_recv(WorkId(1), &inbox, 0, 1024).unwrap();
    assert!(matches!(
        inbox.with_mut(512..600, |_| ()),
        Err(VerbsError::RangeBusy)
    ));
    assert!(matches!(
        b.post_recv(WorkId(2), &inbox, 1000, 10),
        Err(VerbsError::RangeBusy)
    ));
    inbox.with_mut(1024..4096, |_| ()).unwrap();

    let src = a.register(4096).unwrap();
    // While the CPU holds a range, it cannot be posted.
    src.with_mut(0..100, |_| {
        assert!(matches!(
            a.post_send(WorkId(3), &src, 50, 10),
            Err(VerbsError::RangeBusy)
        ));
    })
    .unwrap();
    a.post_send(WorkId(3), &src, 0, 1024).unwrap();
    assert!(matches!(
        src.with_mut(0..1, |_| ()),
        Err(VerbsError::RangeBusy)
    ));
    assert_eq!(next(&a).await.status, Ok(()));
    src.with_mut(0..1, |_| ()).unwrap();
    assert_eq!(next(&b).await, ok(1, CompletionKind::Recv { len: 1024 }));
    inbox.with_mut(0..1024, |_| ()).unwrap();
}

#[tokio::test]
async fn a_write_into_a_range_in_use_at_the_peer_is_refused() {
    let _trace = trace_init();
    let (a, b) = pair().await;
    let dst = b.register(8192).unwrap();
    // A receive buffer for SENDs overlaps the slot the writer targets: a protocol bug
    // hardware would not notice.
    b.post_recv(WorkId(1), &dst, 0, 4096).unwrap();
    let src = a.register(4096).unwrap();
    fill(&src, 0, &pattern(100, 8));
    a.post_write_imm(WorkId(2), &src, 0, 100, &dst.remote(), 4000, 0)
        .unwrap();
    assert_eq!(
        next(&a).await.status,
        Err(CompletionError::RemoteAccess(RemoteAccessError::RangeBusy))
    );
    assert_eq!(next(&b).await.status, Err(CompletionError::Flushed));
    assert!(read(&dst, 0..8192).iter().all(|&b| b == 0));
}

#[tokio::test]
async fn limits_and_misuse_are_refused() {
    let _trace = trace_init();
    let mut config = SoftConfig::default();
    config
        .max_region_bytes(1 << 20)
        .unwrap()
        .max_registered_bytes(3 << 19)
        .unwrap()
        .max_send_wr(2)
        .unwrap()
        .max_recv_wr(1)
        .unwrap();
    assert!(config.max_send_wr(0).is_err());
    assert!(config.max_region_bytes(2 << 30).is_err());
    let v = SoftVerbs::bind(Arc::new(config.clone())).await.unwrap();
    assert!(matches!(
        v.register((1 << 20) + 1),
        Err(VerbsError::RegionTooLarge { .. })
    ));
    let r = v.register(1 << 20).unwrap();
    assert!(matches!(
        v.register(1 << 20),
        Err(VerbsError::MemoryLimit { .. })
    ));
    let small = v.register(1 << 19).unwrap();
    drop(small);
    let _again = v.register(1 << 19).unwrap(); // the budget came back

    assert!(matches!(
        v.post_send(WorkId(1), &r, 0, 1),
        Err(VerbsError::NotConnected)
    ));
    v.post_recv(WorkId(1), &r, 0, 1).unwrap();
    assert!(matches!(
        v.post_recv(WorkId(2), &r, 1, 1),
        Err(VerbsError::QueueFull { max: 1 })
    ));
    assert!(matches!(
        v.post_recv(WorkId(2), &r, (1 << 20) - 1, 2),
        Err(VerbsError::OutOfBounds { .. })
    ));
    assert!(matches!(
        r.with_mut(0..(1 << 20) + 1, |_| ()),
        Err(VerbsError::OutOfBounds { .. })
    ));
    assert!(matches!(
        v.connect(b"not parameters").await,
        Err(VerbsError::PeerInfo(_))
    ));
    assert!(matches!(
        v.connect(&v.local_info()).await,
        Err(VerbsError::PeerInfo(_))
    ));

    let other = SoftVerbs::bind(Arc::new(config)).await.unwrap();
    let foreign = other.register(16).unwrap();
    assert!(matches!(
        v.post_recv(WorkId(3), &foreign, 0, 1),
        Err(VerbsError::ForeignRegion)
    ));

    let (a, b) = pair().await;
    assert!(matches!(
        a.connect(&b.local_info()).await,
        Err(VerbsError::AlreadyConnected)
    ));
}

#[tokio::test]
async fn send_queue_depth_is_bounded_until_completions_are_polled() {
    let _trace = trace_init();
    let mut config = SoftConfig::default();
    config.max_send_wr(2).unwrap();
    let (a, b) = pair_with(config).await;
    let inbox = b.register(64).unwrap();
    for i in 0..3 {
        b.post_recv(WorkId(i), &inbox, i as usize * 8, 8).unwrap();
    }
    let src = a.register(64).unwrap();
    a.post_send(WorkId(1), &src, 0, 8).unwrap();
    a.post_send(WorkId(2), &src, 8, 8).unwrap();
    assert!(matches!(
        a.post_send(WorkId(3), &src, 16, 8),
        Err(VerbsError::QueueFull { max: 2 })
    ));
    assert_eq!(next(&a).await.id, WorkId(1));
    a.post_send(WorkId(3), &src, 16, 8).unwrap();
}

#[tokio::test]
async fn connect_times_out_when_the_peer_never_connects() {
    let _trace = trace_init();
    let mut config = SoftConfig::default();
    config.connect_timeout(Duration::from_millis(200));
    let config = Arc::new(config);
    let a = SoftVerbs::bind(Arc::clone(&config)).await.unwrap();
    let b = SoftVerbs::bind(config).await.unwrap();
    // Whichever side accepts waits for a dialer that never comes; whichever dials waits
    // for an answer that never comes.
    let err = a.connect(&b.local_info()).await.unwrap_err();
    assert!(matches!(err, VerbsError::ConnectTimeout(_)), "{err}");
    // The attempt can be repeated once the peer is there (a stale attempt left in a
    // listener's backlog is skipped).
    let (a_info, b_info) = (a.local_info(), b.local_info());
    let (ra, rb) = tokio::join!(a.connect(&b_info), b.connect(&a_info));
    ra.unwrap();
    rb.unwrap();
}

/// The environment variable that makes `soft_device_child` act as the other process.
const CHILD_ENV: &str = "TRANSPORTD_TEST_RDMA_SOFT_CHILD";

/// The region the child advertises, and where the parent writes into it.
const CHILD_REGION: usize = 1 << 20;
const CHILD_WRITE_AT: usize = 12_345;
const CHILD_WRITE_LEN: usize = 100_000;

/// Two processes: this test re-runs its own binary as the peer (`soft_device_child`); the
/// control channel is the child's stdin and stdout. The parent writes with immediate into the
/// child's region and sends a message; the child checks both and sends back what landed.
#[test]
fn two_processes_write_and_send() {
    let _trace = trace_init();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "soft_device_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let (child_info, child_region) = loop {
        line.clear();
        assert!(
            from_child.read_line(&mut line).unwrap() > 0,
            "the child exited early"
        );
        // libtest may print "test soft_device_child ... " before it on the same line.
        if let Some(at) = line.find("INFO ") {
            let rest = line[at + 5..].trim();
            let (info, region) = rest.split_once(' ').unwrap();
            break (unhex(info), RemoteRegion::decode(&unhex(region)).unwrap());
        }
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = SoftVerbs::bind(Default::default()).await.unwrap();
        writeln!(to_child, "INFO {}", hex(&a.local_info())).unwrap();
        to_child.flush().unwrap();
        let region = a.register(CHILD_REGION).unwrap();
        let data = pattern(CHILD_WRITE_LEN, 42);
        fill(&region, 0, &data);
        fill(&region, CHILD_WRITE_LEN, b"hello from the parent");
        a.post_recv(
            WorkId(9),
            &region,
            CHILD_REGION - CHILD_WRITE_LEN,
            CHILD_WRITE_LEN,
        )
        .unwrap();
        a.connect(&child_info).await.unwrap();

        a.post_write_imm(
            WorkId(1),
            &region,
            0,
            CHILD_WRITE_LEN,
            &child_region,
            CHILD_WRITE_AT as u64,
            0xfeed,
        )
        .unwrap();
        a.post_send(WorkId(2), &region, CHILD_WRITE_LEN, 21)
            .unwrap();
        assert_eq!(next(&a).await, ok(1, CompletionKind::Write));
        assert_eq!(next(&a).await, ok(2, CompletionKind::Send));
        // The child sends back what landed in its region.
        assert_eq!(
            next(&a).await,
            ok(
                9,
                CompletionKind::Recv {
                    len: CHILD_WRITE_LEN as u32
                }
            )
        );
        let echoed = read(&region, CHILD_REGION - CHILD_WRITE_LEN..CHILD_REGION);
        assert_eq!(echoed, data, "the child saw exactly what we wrote");
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
}

/// The other process of `two_processes_write_and_send` (does nothing when run on its own).
#[test]
#[ignore = "the peer process of two_processes_write_and_send"]
fn soft_device_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (b, region) = rt.block_on(async {
        let b = SoftVerbs::bind(Default::default()).await.unwrap();
        let region = b.register(CHILD_REGION).unwrap();
        b.post_recv(WorkId(1), &region, 0, 0).unwrap();
        b.post_recv(WorkId(2), &region, CHILD_REGION - 64, 64)
            .unwrap();
        (b, region)
    });
    println!(
        "INFO {} {}",
        hex(&b.local_info()),
        hex(&region.remote().encode())
    );
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let parent_info = unhex(line.trim().strip_prefix("INFO ").unwrap());
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            b.connect(&parent_info).await.unwrap();
            assert_eq!(
                next(&b).await,
                ok(
                    1,
                    CompletionKind::WriteWithImm {
                        imm: 0xfeed,
                        len: CHILD_WRITE_LEN as u32
                    }
                )
            );
            assert_eq!(next(&b).await, ok(2, CompletionKind::Recv { len: 21 }));
            assert_eq!(
                read(&region, CHILD_REGION - 64..CHILD_REGION - 43),
                b"hello from the parent"
            );
            b.post_send(WorkId(3), &region, CHILD_WRITE_AT, CHILD_WRITE_LEN)
                .unwrap();
            assert_eq!(next(&b).await, ok(3, CompletionKind::Send));
        })
        .await
        .expect("the child timed out");
    });
}

/// Throughput of 4 MiB writes with immediate over loopback, 8 in flight (run by name with
/// `--ignored --nocapture`; the numbers go to stdout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by name with --ignored --nocapture"]
#[allow(clippy::disallowed_methods)] // A measurement of wall time.
async fn soft_throughput_4mib_write_imm() {
    const WRITE: usize = 4 << 20;
    const DEPTH: usize = 8;
    const TOTAL: usize = 4 << 30;
    const RECVS: u64 = 1024;
    let count = (TOTAL / WRITE) as u64;
    let (a, b) = pair().await;
    let dst = b.register(DEPTH * WRITE).unwrap();
    let remote = dst.remote();
    let src = a.register(DEPTH * WRITE).unwrap();
    fill(&src, 0, &pattern(DEPTH * WRITE, 9));
    // Plenty of receives, re-posted as they complete (the protocol's credits do this job).
    for i in 0..RECVS {
        b.post_recv(WorkId(i), &dst, 0, 0).unwrap();
    }
    let receiver = tokio::spawn(async move {
        for i in 0..count {
            assert_eq!(next(&b).await.status, Ok(()));
            b.post_recv(WorkId(RECVS + i), &dst, 0, 0).unwrap();
        }
        (b, dst)
    });
    let post = |i: u64| {
        let slot = (i as usize % DEPTH) * WRITE;
        a.post_write_imm(WorkId(i), &src, slot, WRITE, &remote, slot as u64, i as u32)
            .unwrap();
    };
    let started = std::time::Instant::now();
    let mut posted = 0;
    while posted < (DEPTH as u64).min(count) {
        post(posted);
        posted += 1;
    }
    for _ in 0..count {
        assert_eq!(next(&a).await.status, Ok(()));
        if posted < count {
            post(posted);
            posted += 1;
        }
    }
    let elapsed = started.elapsed();
    let _peer = receiver.await.unwrap();
    let bytes = count as f64 * WRITE as f64;
    println!(
        "soft device: {count} x 4 MiB write_imm, {DEPTH} in flight: {:.2} GB/s ({:.2} GiB/s) in {:.2} s",
        bytes / elapsed.as_secs_f64() / 1e9,
        bytes / elapsed.as_secs_f64() / (1u64 << 30) as f64,
        elapsed.as_secs_f64()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
