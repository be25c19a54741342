//! The grant machines on known sequences: grants per slot, completions, refusals and
//! regrants, the abort, and every kind of bad grant with its wire code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use bytes::Bytes;

use super::*;
use crate::proto::rdma::DeviceKind;

const CHUNK: u32 = 64 << 10;

/// Five chunks, the last one short.
fn manifest() -> Arc<Manifest> {
    let data: Vec<u8> = (0..(4 * CHUNK as usize + 1000))
        .map(|i| (i % 251) as u8)
        .collect();
    Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap())
}

fn grant(slot: u32, chunk: u32) -> RdmaControl {
    RdmaControl::Grant { slot, chunk }
}

fn grants(r: &mut Receiver) -> Vec<RdmaControl> {
    std::iter::from_fn(|| r.poll_grant()).collect()
}

fn full(chunk: u32) -> usize {
    let m = manifest();
    let r = m.chunk_range(ChunkIndex(chunk)).unwrap();
    sealed_len((r.end - r.start) as usize)
}

fn receiver(work: &[u32], slots: u32) -> Receiver {
    Receiver::new(7, manifest(), work.iter().map(|&c| ChunkIndex(c)), slots).unwrap()
}

#[test]
fn the_receiver_grants_a_chunk_per_slot_then_each_freed_slot_the_next() {
    let mut r = receiver(&[0, 1, 2, 3, 4], 2);
    assert_eq!(grants(&mut r), vec![grant(0, 0), grant(1, 1)]);
    // Slot 1 lands first: it is opened and granted chunk 2.
    let landed = r.handle_completion(1, full(1)).unwrap();
    assert_eq!(landed.slot(), 1);
    assert_eq!(
        landed.placement(),
        Placement {
            transfer: 7,
            chunk: 1,
            offset: u64::from(CHUNK),
            len: CHUNK,
        }
    );
    assert_eq!(grants(&mut r), vec![], "nothing is granted before the open");
    assert_eq!(r.handle_opened(landed).chunk, 1);
    assert_eq!(grants(&mut r), vec![grant(1, 2)]);
    for (slot, chunk, next) in [(0, 0, Some(grant(0, 3))), (1, 2, Some(grant(1, 4)))] {
        let landed = r.handle_completion(slot, full(chunk)).unwrap();
        r.handle_opened(landed);
        assert_eq!(r.poll_grant(), next);
        assert!(!r.is_done());
    }
    // The short last chunk: its sealed length is its own.
    let landed = r.handle_completion(1, full(4)).unwrap();
    assert_eq!(landed.placement().len, 1000);
    r.handle_opened(landed);
    assert_eq!(r.poll_grant(), None);
    assert!(!r.is_done());
    let landed = r.handle_completion(0, full(3)).unwrap();
    r.handle_opened(landed);
    assert!(r.is_done());
    assert_eq!(r.failures(), 0);
}

#[test]
fn fewer_chunks_than_slots_and_no_work_at_all() {
    let mut r = receiver(&[4], 16);
    assert_eq!(grants(&mut r), vec![grant(0, 4)]);
    let landed = r.handle_completion(0, full(4)).unwrap();
    r.handle_opened(landed);
    assert!(r.is_done());
    let mut r = receiver(&[], 16);
    assert!(r.is_done());
    assert_eq!(r.poll_grant(), None);
}

#[test]
fn a_receiver_refuses_work_outside_its_manifest() {
    let e = Receiver::new(7, manifest(), [ChunkIndex(1), ChunkIndex(5)], 4).unwrap_err();
    assert_eq!(e, UnknownChunk(ChunkIndex(5)));
}

#[test]
fn a_write_into_a_slot_not_granted_is_a_violation() {
    let mut r = receiver(&[0, 1], 4);
    // Granted slots are 0 and 1 only once the grants were polled.
    assert_eq!(
        r.handle_completion(0, full(0)),
        Err(CompletionError::UngrantedSlot { slot: 0 })
    );
    grants(&mut r);
    for slot in [2, 3, 4, u32::MAX] {
        assert_eq!(
            r.handle_completion(slot, full(0)),
            Err(CompletionError::UngrantedSlot { slot })
        );
    }
    // A second write into a slot whose chunk landed and is being opened.
    let landed = r.handle_completion(0, full(0)).unwrap();
    assert_eq!(
        r.handle_completion(0, full(0)),
        Err(CompletionError::UngrantedSlot { slot: 0 })
    );
    // And after it was delivered, with nothing left to grant there.
    r.handle_opened(landed);
    assert_eq!(
        r.handle_completion(0, full(0)),
        Err(CompletionError::UngrantedSlot { slot: 0 })
    );
}

#[test]
fn a_write_of_the_wrong_length_is_refused_and_asked_for_again() {
    let mut r = receiver(&[2], 1);
    grants(&mut r);
    let Err(CompletionError::WrongLength { landed, written }) = r.handle_completion(0, 10) else {
        panic!("a short write must be refused");
    };
    assert_eq!(written, 10);
    assert_eq!(landed.chunk(), ChunkIndex(2));
    assert_eq!(
        r.handle_refused(landed),
        Ok(Regrant {
            chunk: ChunkIndex(2),
            failures: 1
        })
    );
    assert_eq!(grants(&mut r), vec![grant(0, 2)]);
    let landed = r.handle_completion(0, full(2)).unwrap();
    r.handle_opened(landed);
    assert!(r.is_done());
}

#[test]
fn a_refused_chunk_is_granted_again_in_its_slot_before_new_work() {
    let mut r = receiver(&[0, 1, 2], 2);
    grants(&mut r);
    let landed = r.handle_completion(1, full(1)).unwrap();
    assert_eq!(
        r.handle_refused(landed),
        Ok(Regrant {
            chunk: ChunkIndex(1),
            failures: 1
        })
    );
    // Slot 1 again, chunk 1 again; chunk 2 waits for a slot that delivers.
    assert_eq!(grants(&mut r), vec![grant(1, 1)]);
    let landed = r.handle_completion(1, full(1)).unwrap();
    r.handle_opened(landed);
    assert_eq!(grants(&mut r), vec![grant(1, 2)]);
}

#[test]
fn the_receiver_aborts_at_max_open_failures() {
    let mut r = receiver(&[0, 1, 2, 3], 2);
    grants(&mut r);
    for n in 1..MAX_OPEN_FAILURES {
        let slot = n % 2;
        let landed = r.handle_completion(slot, full(slot)).unwrap();
        assert_eq!(
            r.handle_refused(landed),
            Ok(Regrant {
                chunk: ChunkIndex(slot),
                failures: n
            })
        );
        assert_eq!(grants(&mut r), vec![grant(slot, slot)]);
    }
    let landed = r.handle_completion(0, full(0)).unwrap();
    assert_eq!(
        r.handle_refused(landed),
        Err(Aborted {
            chunk: ChunkIndex(0),
            failures: MAX_OPEN_FAILURES
        })
    );
    assert_eq!(r.poll_grant(), None, "nothing more is asked for");
    assert!(!r.is_done());
}

fn offer(slots: u32, slot_bytes: u32) -> RdmaOffer {
    RdmaOffer {
        device: DeviceKind::Soft,
        info: Bytes::from_static(b"info"),
        ring_addr: 0x1000,
        ring_len: u64::from(slots) * u64::from(slot_bytes),
        ring_rkey: 9,
        slot_bytes,
        slots,
        unsealed: false,
    }
}

fn sender() -> Sender {
    Sender::new(7, manifest(), &offer(4, full(0) as u32)).unwrap()
}

#[test]
fn the_sender_turns_grants_into_work_and_finish() {
    let mut s = sender();
    let slot_bytes = full(0) as u64;
    let Control::Write(w) = s.handle_control(&grant(3, 4).encode()).unwrap() else {
        panic!("a grant is work");
    };
    assert_eq!(
        w,
        Work {
            slot: 3,
            chunk: ChunkIndex(4),
            range: 4 * u64::from(CHUNK)..4 * u64::from(CHUNK) + 1000,
            dst: 3 * slot_bytes,
            placement: Placement {
                transfer: 7,
                chunk: 4,
                offset: 4 * u64::from(CHUNK),
                len: 1000,
            },
            sealed_len: sealed_len(1000),
        }
    );
    // The same slot granted again, as the honest receiver does once the write landed.
    assert!(matches!(
        s.handle_control(&grant(3, 0).encode()),
        Ok(Control::Write(Work { slot: 3, dst, .. })) if dst == 3 * slot_bytes
    ));
    assert_eq!(
        s.handle_control(&RdmaControl::Finish.encode()),
        Ok(Control::Finish)
    );
}

#[test]
fn every_bad_grant_is_refused_with_its_reason_and_code() {
    let mut s = sender();
    let cases: Vec<(Vec<u8>, BadGrant, ErrorCode)> = vec![
        (
            grant(4, 0).encode().to_vec(),
            BadGrant::SlotOutOfRing { slot: 4, slots: 4 },
            ErrorCode::Range,
        ),
        (
            grant(u32::MAX, 0).encode().to_vec(),
            BadGrant::SlotOutOfRing {
                slot: u32::MAX,
                slots: 4,
            },
            ErrorCode::Range,
        ),
        (
            grant(0, 5).encode().to_vec(),
            BadGrant::UnknownChunk { chunk: 5 },
            ErrorCode::Range,
        ),
        (
            vec![9],
            BadGrant::Undecodable(crate::proto::DecodeError::Tag(9)),
            ErrorCode::Protocol,
        ),
        (
            vec![1, 0, 0],
            BadGrant::Undecodable(crate::proto::DecodeError::Truncated),
            ErrorCode::Protocol,
        ),
    ];
    for (bytes, reason, code) in cases {
        let e = s.handle_control(&bytes).unwrap_err();
        assert_eq!(e, reason, "{bytes:?}");
        assert_eq!(e.code(), code, "{e}");
    }
    // A chunk larger than a slot: `new` refuses such a ring, so only a sender over a ring
    // smaller than its manifest's chunks (built here by hand) meets it.
    let fits_last = sealed_len(1000) as u32;
    let mut small = Sender {
        slot_bytes: fits_last,
        ..sender()
    };
    let e = small.handle_control(&grant(0, 0).encode()).unwrap_err();
    assert_eq!(
        e,
        BadGrant::ChunkTooLarge {
            chunk: 0,
            sealed_len: full(0),
            slot_bytes: fits_last
        }
    );
    assert_eq!(e.code(), ErrorCode::Protocol);
    // The short last chunk fits.
    assert!(small.handle_control(&grant(0, 4).encode()).is_ok());
}

#[test]
fn offers_the_sender_will_not_serve() {
    let unsealed = RdmaOffer {
        unsealed: true,
        ..offer(4, full(0) as u32)
    };
    let e = Sender::new(7, manifest(), &unsealed).unwrap_err();
    assert_eq!(e, BadOffer::Unsealed);
    assert_eq!(e.code(), ErrorCode::NoRdma);
    let small = offer(4, full(0) as u32 - 1);
    let e = Sender::new(7, manifest(), &small).unwrap_err();
    assert_eq!(
        e,
        BadOffer::SlotTooSmall {
            slot_bytes: full(0) as u32 - 1,
            need: full(0)
        }
    );
    assert_eq!(e.code(), ErrorCode::Protocol);
}
