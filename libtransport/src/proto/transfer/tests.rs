#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use proptest::prelude::*;

use super::*;

const CHUNK: u32 = 64 << 10;

fn data(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251) as u8) ^ salt)
        .collect()
}

/// A manifest of `chunks` full chunks and a short last one.
fn manifest(chunks: u32, salt: u8) -> Manifest {
    let len = (chunks as usize - 1) * CHUNK as usize + 1000;
    Manifest::of_bytes(&data(len, salt), CHUNK).unwrap()
}

/// Runs an attempt's schedule to its end: `verify` says which chunks verify.
fn run(pull: &mut Pull, verify: impl Fn(ChunkIndex) -> bool) {
    let mut s = pull.schedule().expect("opened");
    while let Some(i) = s.poll_next() {
        if verify(i) {
            s.handle_verified(i).unwrap();
        } else {
            s.handle_abandoned(i).unwrap();
            break;
        }
    }
    pull.handle_schedule(&s);
}

#[test]
fn a_whole_pull_asks_for_every_chunk_and_completes() {
    let m = manifest(4, 1);
    let mut pull = Pull::whole(u64::MAX);
    assert_eq!(pull.handle_opened(m.clone()), Ok(Opened::Fresh));
    let reqs: Vec<Request> = pull
        .missing()
        .map(|i| pull.read_request(TransferId(9), i).unwrap())
        .collect();
    assert_eq!(reqs.len(), 4);
    assert_eq!(
        reqs[3],
        Request::Read {
            transfer: TransferId(9),
            offset: 3 * u64::from(CHUNK),
            len: 1000
        }
    );
    assert_eq!(pull.poll_end(false), PullEnd::Incomplete(ChunkIndex(0)));
    run(&mut pull, |_| true);
    assert_eq!(pull.poll_end(false), PullEnd::Complete);
    assert_eq!(pull.progress(), (m.size(), m.size()));
}

#[test]
fn an_attempt_that_renews_resumes_from_its_verified_chunks_only() {
    let m = manifest(5, 2);
    let mut pull = Pull::whole(u64::MAX);
    pull.handle_opened(m.clone()).unwrap();
    // Two chunks verify, then the connection is due for renewal.
    run(&mut pull, |i| i.0 < 2);
    assert_eq!(pull.poll_end(true), PullEnd::Renew);
    // The next attempt sees the same object: it goes on, asking only for the rest.
    assert_eq!(pull.handle_opened(m), Ok(Opened::Resume));
    let missing: Vec<u32> = pull.missing().map(|i| i.0).collect();
    assert_eq!(missing, [2, 3, 4]);
    run(&mut pull, |_| true);
    assert_eq!(pull.poll_end(false), PullEnd::Complete);
}

#[test]
fn another_object_under_the_same_name_starts_over() {
    let mut pull = Pull::whole(u64::MAX);
    pull.handle_opened(manifest(3, 1)).unwrap();
    run(&mut pull, |i| i.0 == 0);
    pull.handle_failed(true);
    // The object was replaced between attempts: nothing verified of the old one counts.
    assert_eq!(pull.handle_opened(manifest(3, 7)), Ok(Opened::Fresh));
    assert_eq!(pull.missing().count(), 3);
}

#[test]
fn a_destination_that_lost_its_account_starts_over_and_reports_what_it_holds() {
    let m = manifest(4, 3);
    let mut pull = Pull::whole(u64::MAX);
    assert_eq!(pull.handle_opened(m.clone()), Ok(Opened::Fresh));
    // A partial file from an earlier run holds chunks 1 and 3.
    let mut held = ChunkSet::new(4);
    held.insert(ChunkIndex(1));
    held.insert(ChunkIndex(3));
    pull.handle_held(&held);
    assert_eq!(pull.chunks_reused(), 2);
    run(&mut pull, |i| i.0 == 0);
    // The attempt failed and the file is to be read again: the next attempt starts afresh
    // and the file reports what it still holds; the first attempt's reuse count stays.
    pull.handle_failed(false);
    assert_eq!(pull.handle_opened(m), Ok(Opened::Fresh));
    let mut held = ChunkSet::new(4);
    for i in [0, 1, 3] {
        held.insert(ChunkIndex(i));
    }
    pull.handle_held(&held);
    assert_eq!(pull.missing().map(|i| i.0).collect::<Vec<_>>(), [2]);
    assert_eq!(pull.chunks_reused(), 2);
}

#[test]
fn a_held_set_of_another_size_is_ignored() {
    let mut pull = Pull::whole(u64::MAX);
    pull.handle_opened(manifest(4, 3)).unwrap();
    let mut held = ChunkSet::new(9);
    held.insert(ChunkIndex(0));
    pull.handle_held(&held);
    assert_eq!(pull.missing().count(), 4);
}

#[test]
fn a_range_covers_only_its_chunks_and_out_of_bounds_ranges_are_refused() {
    let m = manifest(4, 4);
    let size = m.size();
    let mut pull = Pull::range(u64::from(CHUNK) + 5..2 * u64::from(CHUNK) + 5);
    pull.handle_opened(m.clone()).unwrap();
    assert_eq!(pull.chunks(), 1..3);
    assert_eq!(pull.missing().map(|i| i.0).collect::<Vec<_>>(), [1, 2]);
    run(&mut pull, |_| true);
    assert_eq!(pull.poll_end(false), PullEnd::Complete);

    let mut past = Pull::range(10..size + 1);
    assert_eq!(
        past.handle_opened(m.clone()),
        Err(PullRefusal::Range {
            start: 10,
            end: size + 1,
            size
        })
    );
    #[allow(clippy::reversed_empty_ranges)]
    let mut backwards = Pull::range(20..10);
    assert!(matches!(
        backwards.handle_opened(m.clone()),
        Err(PullRefusal::Range { .. })
    ));
    let mut small = Pull::whole(size - 1);
    assert_eq!(
        small.handle_opened(m),
        Err(PullRefusal::TooLarge {
            size,
            limit: size - 1
        })
    );
}

#[test]
fn chunks_verified_outside_the_range_do_not_count() {
    let mut pull = Pull::range(0..10);
    pull.handle_opened(manifest(3, 5)).unwrap();
    pull.handle_verified(ChunkIndex(2));
    assert_eq!(pull.poll_end(false), PullEnd::Incomplete(ChunkIndex(0)));
    pull.handle_verified(ChunkIndex(0));
    assert_eq!(pull.poll_end(false), PullEnd::Complete);
}

#[test]
fn a_push_sends_what_the_server_lacks_and_commits_only_the_manifests_root() {
    let m = Arc::new(manifest(4, 6));
    let mut push = Push::new(m.clone());
    let mut have = ChunkSet::new(4);
    have.insert(ChunkIndex(2));
    let mut s = push.handle_opened(&have).unwrap();
    assert_eq!(push.chunks_skipped(), 1);
    assert_eq!(push.held_bytes(&have), u64::from(CHUNK));
    let mut sent = vec![];
    while let Some(i) = s.poll_next() {
        let (req, range) = push.write_request(TransferId(3), i).unwrap();
        assert_eq!(
            req,
            Request::WriteChunk {
                transfer: TransferId(3),
                chunk: i
            }
        );
        assert_eq!(range, m.chunk_range(i).unwrap());
        sent.push(i.0);
        s.handle_verified(i).unwrap();
    }
    assert_eq!(sent, [0, 1, 3]);
    assert_eq!(
        push.poll_end(TransferId(3), false),
        PushEnd::Commit(Request::Commit {
            transfer: TransferId(3)
        })
    );
    assert_eq!(push.handle_committed(m.root()), Ok(m.root()));
    assert_eq!(
        push.handle_committed(Digest([0; 32])),
        Err(TransferViolation::WrongRoot)
    );
}

#[test]
fn a_push_due_for_renewal_closes_and_a_later_attempt_keeps_the_first_skip_count() {
    let m = Arc::new(manifest(3, 7));
    let mut push = Push::new(m);
    push.handle_opened(&ChunkSet::new(3)).unwrap();
    assert_eq!(
        push.poll_end(TransferId(1), true),
        PushEnd::Renew(Request::Close {
            transfer: TransferId(1)
        })
    );
    let mut have = ChunkSet::new(3);
    have.insert(ChunkIndex(0));
    have.insert(ChunkIndex(1));
    let mut s = push.handle_opened(&have).unwrap();
    assert_eq!(s.poll_next(), Some(ChunkIndex(2)));
    assert_eq!(s.poll_next(), None);
    assert_eq!(push.chunks_skipped(), 0);
}

#[test]
fn a_push_refuses_a_held_set_of_another_size_and_chunks_outside_the_object() {
    let mut push = Push::new(Arc::new(manifest(3, 8)));
    assert_eq!(
        push.handle_opened(&ChunkSet::new(4)).unwrap_err(),
        TransferViolation::ChunkSetMismatch
    );
    assert_eq!(
        push.write_request(TransferId(1), ChunkIndex(3))
            .unwrap_err(),
        TransferViolation::ChunkOutsideObject(ChunkIndex(3))
    );
}

#[test]
fn a_chunk_check_places_pieces_and_counts_only_a_whole_matching_chunk() {
    let bytes = data(3 * CHUNK as usize, 9);
    let m = Manifest::of_bytes(&bytes, CHUNK).unwrap();
    let chunk = &bytes[CHUNK as usize..2 * CHUNK as usize];
    let mut c = ChunkCheck::new(&m, ChunkIndex(1)).unwrap();
    assert_eq!(c.len(), u64::from(CHUNK));
    assert_eq!(c.handle_data(&chunk[..100]).unwrap(), 0..100);
    assert_eq!(c.handle_data(&chunk[100..]).unwrap(), 100..CHUNK as usize);
    c.finish(&m).unwrap();

    // A flipped bit.
    let mut bad = chunk.to_vec();
    bad[7] ^= 1;
    let mut c = ChunkCheck::new(&m, ChunkIndex(1)).unwrap();
    c.handle_data(&bad).unwrap();
    assert_eq!(c.finish(&m), Err(ChunkError::Corrupt(ChunkIndex(1))));
    // Short, and too long.
    let mut c = ChunkCheck::new(&m, ChunkIndex(1)).unwrap();
    c.handle_data(&chunk[..10]).unwrap();
    assert!(matches!(c.finish(&m), Err(ChunkError::Length { .. })));
    let mut c = ChunkCheck::new(&m, ChunkIndex(1)).unwrap();
    c.handle_data(chunk).unwrap();
    assert!(matches!(
        c.handle_data(&[0]),
        Err(ChunkError::Length { .. })
    ));
    // Another chunk's bytes.
    let mut c = ChunkCheck::new(&m, ChunkIndex(0)).unwrap();
    c.handle_data(chunk).unwrap();
    assert_eq!(c.finish(&m), Err(ChunkError::Corrupt(ChunkIndex(0))));
    assert!(ChunkCheck::new(&m, ChunkIndex(3)).is_err());
}

proptest! {
    /// Over any sequence of attempts that verify some chunks and then renew or fail (keeping
    /// the destination or not), a chunk is asked for again only if it is not verified, and
    /// the pull completes exactly when every chunk has verified in an attempt whose
    /// destination was kept.
    #[test]
    fn resume_sets_never_lose_or_invent_a_verified_chunk(
        chunks in 1u32..12,
        attempts in proptest::collection::vec((any::<u16>(), any::<bool>(), any::<bool>()), 1..8),
    ) {
        let m = manifest(chunks, 11);
        let mut pull = Pull::whole(u64::MAX);
        // What the destination really holds, as the model sees it.
        let mut holds = vec![false; chunks as usize];
        for (mask, renew, kept) in attempts {
            match pull.handle_opened(m.clone()).unwrap() {
                Opened::Resume => {}
                Opened::Fresh => {
                    // A fresh destination reports what it still holds (as a file would).
                    let mut held = ChunkSet::new(chunks);
                    for (i, h) in holds.iter().enumerate() {
                        if *h {
                            held.insert(ChunkIndex(i as u32));
                        }
                    }
                    pull.handle_held(&held);
                }
            }
            let missing: Vec<u32> = pull.missing().map(|i| i.0).collect();
            for i in &missing {
                prop_assert!(!holds[*i as usize], "chunk {i} asked for although held");
            }
            run(&mut pull, |i| mask & (1 << (i.0 % 16)) != 0);
            for i in 0..chunks {
                if !pull.missing().any(|m| m.0 == i) {
                    holds[i as usize] = true;
                }
            }
            match pull.poll_end(renew) {
                PullEnd::Complete => {
                    prop_assert!(holds.iter().all(|h| *h));
                    return Ok(());
                }
                PullEnd::Renew => prop_assert!(renew),
                PullEnd::Incomplete(i) => {
                    prop_assert!(!renew);
                    prop_assert!(!holds[i.0 as usize]);
                    pull.handle_failed(kept);
                }
            }
        }
    }
}
