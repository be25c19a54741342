//! Unit tests of the software device: the queue pair's bookkeeping without I/O, what crosses
//! the wire (in the clear, by design), and peers that break the wire protocol.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::queue::{Depths, QueuePair};
use super::region::{Lease, RegionTable};
use super::wire::{
    self, AckStatus, HEADER_LEN, HELLO_CONFIRM, HELLO_REPLY, Header, Info, TOKEN_LEN,
};
use super::*;
use crate::test_util::trace_init;
use crate::transport::rdma::verbs::{BrokenReason, CompletionError, PeerMisbehaved, RKey};

fn connected_qp() -> QueuePair {
    let mut qp = QueuePair::new(Depths { send: 8, recv: 8 });
    qp.start_connect().unwrap();
    qp.finish_connect().unwrap();
    qp
}

fn drain(qp: &mut QueuePair) -> Vec<Completion> {
    std::iter::from_fn(|| qp.poll().and_then(Result::ok)).collect()
}

#[test]
fn completions_wait_for_the_writer_and_keep_posting_order() {
    let table = RegionTable::new(1 << 20, 1 << 20);
    let region = table.register(1, 4096).unwrap();
    let mut qp = connected_qp();
    for i in 0..3u64 {
        let lease = Lease::take(&region, i as usize * 100..i as usize * 100 + 100).unwrap();
        qp.post_send(WorkId(i), CompletionKind::Send, lease, |seq| {
            Header::send(seq, 100)
        })
        .unwrap();
    }
    let (mut acks, mut out) = (Vec::new(), Vec::new());
    qp.take_outgoing(&mut acks, &mut out, 2, usize::MAX);
    assert_eq!(out.len(), 2, "at most two requests per batch");
    assert_eq!(
        qp.handle_ack(2, AckStatus::Ok),
        Err(PeerMisbehaved::UnexpectedAck),
        "not sent yet"
    );
    // Acknowledged while the writer still holds the lease: no completion yet, and the
    // range is still taken.
    qp.handle_ack(0, AckStatus::Ok).unwrap();
    assert!(qp.poll().is_none());
    assert!(Lease::take(&region, 0..1).is_none());
    qp.handle_ack(1, AckStatus::Ok).unwrap();
    qp.return_outgoing(out);
    assert!(Lease::take(&region, 0..1).is_some(), "free once completed");
    let done = drain(&mut qp);
    assert_eq!(
        done.iter().map(|c| c.id).collect::<Vec<_>>(),
        [WorkId(0), WorkId(1)]
    );
    assert_eq!(
        qp.handle_ack(1, AckStatus::Ok),
        Err(PeerMisbehaved::UnexpectedAck),
        "acknowledged twice"
    );

    // The third is flushed by the error state without ever being sent.
    qp.break_with(BrokenReason::PeerClosed);
    let flushed = drain(&mut qp);
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].id, WorkId(2));
    assert_eq!(flushed[0].status, Err(CompletionError::Flushed));
    assert!(matches!(qp.poll(), Some(Err(VerbsError::Broken(_)))));
    let (mut acks, mut out) = (Vec::new(), Vec::new());
    qp.take_outgoing(&mut acks, &mut out, 8, usize::MAX);
    assert!(out.is_empty(), "nothing is sent after the error state");
}

#[test]
fn a_flushed_receive_held_by_the_reader_completes_when_given_back() {
    let table = RegionTable::new(1 << 20, 1 << 20);
    let region = table.register(1, 4096).unwrap();
    let mut qp = connected_qp();
    for i in 0..2u64 {
        let lease = Lease::take(&region, i as usize * 10..i as usize * 10 + 10).unwrap();
        qp.post_recv(WorkId(i), lease).unwrap();
    }
    let held = qp.consume_recv().unwrap();
    qp.break_with(BrokenReason::Disconnected);
    assert!(qp.poll().is_none(), "the first waits for the reader");
    qp.finish_recv(held, CompletionKind::Recv { len: 10 }, Ok(()));
    let done = drain(&mut qp);
    assert_eq!(done.len(), 2);
    assert_eq!(
        done[0].status,
        Err(CompletionError::Flushed),
        "flushed first"
    );
    assert_eq!(done[1].status, Err(CompletionError::Flushed));
}

#[test]
fn requests_out_of_sequence_are_refused() {
    let mut qp = connected_qp();
    qp.begin_request(0).unwrap();
    qp.begin_request(1).unwrap();
    assert_eq!(qp.begin_request(3), Err(PeerMisbehaved::OutOfSequence));
}

/// Connects `a` and `b` through a relay that records every byte; returns the record.
async fn relayed_pair() -> (SoftVerbs, SoftVerbs, Arc<Mutex<Vec<u8>>>) {
    let a = SoftVerbs::bind(Default::default()).await.unwrap();
    let b = SoftVerbs::bind(Default::default()).await.unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    // The side with the smaller token dials: give it the relay's address for its peer.
    let (dialer, acceptor) = if a.own.token < b.own.token {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let target = acceptor.own.addr;
    let record = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&record);
    tokio::spawn(async move {
        let (inbound, _) = relay.accept().await.unwrap();
        let outbound = TcpStream::connect(target).await.unwrap();
        let (ri, wi) = inbound.into_split();
        let (ro, wo) = outbound.into_split();
        tokio::join!(copy(ri, wo, Arc::clone(&rec)), copy(ro, wi, rec));
    });
    let via_relay = Info {
        addr: relay_addr,
        token: acceptor.own.token,
    }
    .encode();
    let dialer_info = dialer.local_info();
    let (rd, ra) = tokio::join!(dialer.connect(&via_relay), acceptor.connect(&dialer_info));
    rd.unwrap();
    ra.unwrap();
    (a, b, record)
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// The device models a fabric: a payload crosses the wire exactly as it is in the region
/// (sealing is the protocol's job), so a capture can look for a canary. This test fails if
/// the device ever starts transforming payloads.
#[tokio::test]
async fn payloads_cross_the_wire_in_the_clear() {
    let _trace = trace_init();
    let (a, b, record) = relayed_pair().await;
    let dst = b.register(1 << 16).unwrap();
    b.post_recv(WorkId(1), &dst, 0, 0).unwrap();
    let src = a.register(1 << 16).unwrap();
    let canary = b"CANARY-soft-rdma-payload-0123456789".repeat(100);
    src.with_mut(0..canary.len(), |buf| buf.copy_from_slice(&canary))
        .unwrap();
    a.post_write_imm(WorkId(2), &src, 0, canary.len(), &dst.remote(), 0, 77)
        .unwrap();
    assert_eq!(a.poll().await.unwrap().status, Ok(()));
    let c = b.poll().await.unwrap();
    assert_eq!(
        c.kind,
        CompletionKind::WriteWithImm {
            imm: 77,
            len: canary.len() as u32
        }
    );
    let wire = record.lock().unwrap().clone();
    let header = Header::write_imm(
        0,
        canary.len() as u32,
        77,
        dst.remote().rkey,
        dst.remote().addr,
    )
    .encode();
    let mut expected = header.to_vec();
    expected.extend_from_slice(&canary);
    assert!(
        wire.windows(expected.len()).any(|w| w == expected),
        "header and payload appear verbatim on the wire"
    );
}

/// A hand-made peer that completes the handshake with `device` (it always dials: its
/// token is the smallest) and then sends `bytes`.
async fn misbehaving_peer(bytes: Vec<u8>) -> BrokenReason {
    let device = SoftVerbs::bind(Default::default()).await.unwrap();
    let region = device.register(4096).unwrap();
    device.post_recv(WorkId(1), &region, 0, 16).unwrap();
    let token = [0u8; TOKEN_LEN];
    let fake = Info {
        addr: "127.0.0.1:9".parse().unwrap(),
        token,
    };
    let own = device.own;
    let peer = tokio::spawn(async move {
        let mut s = TcpStream::connect(own.addr).await.unwrap();
        s.write_all(&wire::encode_hello(&token, &own.token))
            .await
            .unwrap();
        let mut reply = [0u8; HELLO_REPLY.len()];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, HELLO_REPLY);
        s.write_all(&HELLO_CONFIRM).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        // Keep the connection open: the device must close it, not us.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    device.connect(&fake.encode()).await.unwrap();
    let flushed = tokio::time::timeout(Duration::from_secs(10), device.poll())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flushed.status, Err(CompletionError::Flushed));
    let why = match device.poll().await {
        Err(VerbsError::Broken(why)) => why,
        other => panic!("expected the error state, got {other:?}"),
    };
    drop(device);
    tokio::time::timeout(Duration::from_secs(10), peer)
        .await
        .unwrap()
        .unwrap();
    assert!(
        region
            .with_mut(0..4096, |b| b.iter().all(|&x| x == 0))
            .unwrap(),
        "nothing landed"
    );
    why
}

#[tokio::test]
async fn peers_that_break_the_wire_protocol_are_cut_off() {
    let _trace = trace_init();
    let mut garbage = [0u8; HEADER_LEN];
    garbage[0] = 9;
    assert_eq!(
        misbehaving_peer(garbage.to_vec()).await,
        BrokenReason::PeerMisbehaved(PeerMisbehaved::InvalidHeader)
    );
    assert_eq!(
        misbehaving_peer(Header::ack(0, AckStatus::Ok).encode().to_vec()).await,
        BrokenReason::PeerMisbehaved(PeerMisbehaved::UnexpectedAck)
    );
    assert_eq!(
        misbehaving_peer(Header::send(5, 1).encode().to_vec()).await,
        BrokenReason::PeerMisbehaved(PeerMisbehaved::OutOfSequence)
    );
    assert_eq!(
        misbehaving_peer(Header::send(0, u32::MAX).encode().to_vec()).await,
        BrokenReason::PeerMisbehaved(PeerMisbehaved::MessageTooLarge)
    );
    // A write with a key the device never issued, its payload cut short.
    let mut write = Header::write_imm(0, 100, 0, RKey(1), 1 << 32)
        .encode()
        .to_vec();
    write.extend_from_slice(&[0xee; 10]);
    assert!(matches!(
        misbehaving_peer(write).await,
        BrokenReason::RefusedPeerRequest(_)
    ));
}

#[tokio::test]
async fn strangers_without_the_tokens_are_turned_away() {
    let _trace = trace_init();
    let a = SoftVerbs::bind(Default::default()).await.unwrap();
    let b = SoftVerbs::bind(Default::default()).await.unwrap();
    let acceptor = if a.own.token < b.own.token { &b } else { &a };
    // A stranger connects first and sends a hello with a wrong token.
    let mut stranger = TcpStream::connect(acceptor.own.addr).await.unwrap();
    stranger
        .write_all(&wire::encode_hello(&[7; TOKEN_LEN], &[8; TOKEN_LEN]))
        .await
        .unwrap();
    let (a_info, b_info) = (a.local_info(), b.local_info());
    let (ra, rb) = tokio::join!(a.connect(&b_info), b.connect(&a_info));
    ra.unwrap();
    rb.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        stranger.read(&mut buf).await.unwrap_or(0),
        0,
        "the stranger got no reply, only a close"
    );
}

/// Both roles give up after the connect timeout: the acceptor when nobody dials, the dialer
/// when nobody answers; and the acceptor skips a dialer's stale attempt afterwards.
#[tokio::test]
async fn connect_times_out_in_either_role() {
    let _trace = trace_init();
    let mut config = SoftConfig::default();
    config.connect_timeout(Duration::from_millis(200));
    let config = Arc::new(config);
    let a = SoftVerbs::bind(Arc::clone(&config)).await.unwrap();
    let b = SoftVerbs::bind(config).await.unwrap();
    let (dialer, acceptor) = if a.own.token < b.own.token {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let (dialer_info, acceptor_info) = (dialer.local_info(), acceptor.local_info());
    let err = acceptor.connect(&dialer_info).await.unwrap_err();
    assert!(matches!(err, VerbsError::ConnectTimeout(_)), "{err}");
    let err = dialer.connect(&acceptor_info).await.unwrap_err();
    assert!(matches!(err, VerbsError::ConnectTimeout(_)), "{err}");
    // The dialer's stale attempt waits in the acceptor's backlog; a new attempt still works.
    let (rd, ra) = tokio::join!(
        dialer.connect(&acceptor_info),
        acceptor.connect(&dialer_info)
    );
    rd.unwrap();
    ra.unwrap();
    let r = acceptor.register(16).unwrap();
    acceptor.post_recv(WorkId(1), &r, 0, 16).unwrap();
    let s = dialer.register(16).unwrap();
    dialer.post_send(WorkId(2), &s, 0, 16).unwrap();
    assert_eq!(dialer.poll().await.unwrap().status, Ok(()));
    assert_eq!(acceptor.poll().await.unwrap().status, Ok(()));
}
