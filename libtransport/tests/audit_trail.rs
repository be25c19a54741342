//! The audit trail on disk: a clean trail verifies, and every kind of tampering (a changed
//! byte, a removed record, swapped records, a tail cut back past a checkpoint, a forged
//! checkpoint, a removed segment) is detected by `verify`, naming the record. A node that
//! opens a trail cut, changed or torn since its latest checkpoint records the break before
//! it goes on, so `verify` keeps reporting it after any number of restarts; queries filter
//! records.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certs::test_util::TestPki;
use libtransport::audit::{
    AuditEvent, AuditRecord, AuditSink, FileSink, FileSinkConfig, Query, Signer, TrailBreakKind,
    query, verify,
};
use libtransport::clock::SystemClock;
use libtransport::proto::{DatasetName, Digest, ObjectPath};
use libtransport::test_util::identity;

fn event(i: u64) -> AuditEvent {
    AuditEvent::Transfer {
        peer: certs::SpiffeId::parse(&format!("spiffe://hospital.example/gpu/loader-{}", i % 3))
            .unwrap(),
        direction: libtransport::audit::Direction::Out,
        dataset: DatasetName::new(if i.is_multiple_of(2) {
            "scans"
        } else {
            "notes"
        })
        .unwrap(),
        object: ObjectPath::new(&format!("train/shard-{i:04}.bin")).unwrap(),
        bytes: 1000 + i,
        root: Digest([i as u8; 32]),
        path: libtransport::TransferPath::Quic,
        outcome: libtransport::audit::Outcome::Complete,
        duration_ms: i,
    }
}

fn record(i: u64) -> AuditRecord {
    AuditRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i * 60),
        event: event(i),
    }
}

struct Trail {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: TestPki,
}

/// A trail of `n` records with a checkpoint after every 10th, closed cleanly.
fn trail(n: u64, segment_max_bytes: u64) -> Trail {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let pki = TestPki::new("hospital.example");
    let signer: Arc<dyn Signer> = Arc::new(identity(&pki, "/node/storage"));
    let mut cfg = FileSinkConfig::new(&dir);
    cfg.segment_max_bytes = segment_max_bytes;
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let sink = FileSink::open(cfg, signer, Arc::new(SystemClock)).unwrap();
    for i in 1..=n {
        sink.record(&record(i)).unwrap();
        if i.is_multiple_of(10) {
            sink.checkpoint().unwrap();
        }
    }
    sink.close().unwrap();
    drop(sink);
    Trail {
        _tmp: tmp,
        dir,
        pki,
    }
}

/// Every line of every segment, with its file.
fn lines(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text.lines().map(str::to_owned).collect())
        })
        .collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_clean_trail_verifies_with_its_signers() {
    let t = trail(35, 1 << 20);
    let report = verify(&t.dir, None).unwrap();
    // 35 records, a checkpoint on open, after every 10th and at close.
    assert_eq!(report.records, 35 + 1 + 3 + 1);
    assert_eq!(report.checkpoints, 5);
    assert_eq!(report.unsealed, 0);
    assert_eq!(report.last_seq, report.last_checkpoint);
    let report = verify(&t.dir, Some(&t.pki.bundle())).unwrap();
    assert!(report.signers_verified);
    // Another trust domain's bundle does not vouch for the signer.
    let other = TestPki::new("hospital.example");
    let e = verify(&t.dir, Some(&other.bundle())).unwrap_err();
    assert!(e.reason.contains("signer"), "{e}");
    // Files hold records only the owner may read.
    use std::os::unix::fs::PermissionsExt;
    for (f, _) in lines(&t.dir) {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[test]
fn a_changed_byte_in_any_record_is_detected_naming_it() {
    let t = trail(25, 1 << 20);
    let (file, original) = lines(&t.dir).remove(0);
    for index in 0..original.len() {
        let mut l = original.clone();
        let seq = seq_of(&l[index]);
        // Change one byte in the record's content (not its seq), keeping it valid JSON
        // where possible: the last hex digit or digit of the line's final value.
        let pos = l[index]
            .rfind(|c: char| c.is_ascii_hexdigit() && c != '0')
            .unwrap();
        let mut bytes = l[index].clone().into_bytes();
        bytes[pos] = if bytes[pos] == b'1' { b'2' } else { b'1' };
        l[index] = String::from_utf8(bytes).unwrap();
        rewrite(&file, &l);
        let e = verify(&t.dir, None).expect_err(&format!("change in seq {seq} not detected"));
        assert_eq!(
            e.seq,
            Some(seq),
            "named the wrong record for a change in seq {seq}: {e}"
        );
        assert!(
            e.reason.contains("changed") || e.reason.contains("checkpoint"),
            "{e}"
        );
    }
    rewrite(&file, &original);
    verify(&t.dir, None).unwrap();
}

#[test]
fn removed_swapped_and_cut_records_are_detected() {
    let t = trail(25, 1 << 20);
    let (file, original) = lines(&t.dir).remove(0);

    // A removed record.
    let mut l = original.clone();
    let gone = seq_of(&l[7]);
    l.remove(7);
    rewrite(&file, &l);
    let e = verify(&t.dir, None).unwrap_err();
    assert!(
        e.reason.contains(&format!("record {gone} is missing")),
        "{e}"
    );

    // Two records swapped.
    let mut l = original.clone();
    l.swap(4, 5);
    rewrite(&file, &l);
    let e = verify(&t.dir, None).unwrap_err();
    assert!(e.reason.contains("swapped"), "{e}");

    // The tail cut back to an earlier checkpoint: the cut ends on a checkpoint, so the
    // chain itself is intact; checkpoint.json still names the later one.
    let cut_at = original
        .iter()
        .position(|l| l.contains("\"event\":\"checkpoint\"") && seq_of(l) == 12)
        .expect("a checkpoint after the 10th record");
    rewrite(&file, &original[..=cut_at]);
    let e = verify(&t.dir, None).unwrap_err();
    assert!(e.reason.contains("cut off"), "{e}");
    assert_eq!(e.seq, Some(12));

    // A forged checkpoint: valid JSON and linked, but the signature is someone else's.
    let mut l = original.clone();
    let cp = l
        .iter()
        .rposition(|l| l.contains("\"event\":\"checkpoint\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&l[cp]).unwrap();
    let sig = v["signature"].as_str().unwrap();
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 20 {
                if c == 'a' { 'b' } else { 'a' }
            } else {
                c
            }
        })
        .collect();
    l[cp] = l[cp].replace(sig, &flipped);
    rewrite(&file, &l);
    let e = verify(&t.dir, None).unwrap_err();
    assert_eq!(e.seq, Some(seq_of(&original[cp])), "{e}");

    // checkpoint.json removed.
    rewrite(&file, &original);
    std::fs::remove_file(t.dir.join("checkpoint.json")).unwrap();
    assert!(
        verify(&t.dir, None)
            .unwrap_err()
            .reason
            .contains("checkpoint.json")
    );
}

#[test]
fn segments_rotate_by_size_chain_across_and_a_missing_one_is_detected() {
    let t = trail(60, 4096);
    let files = lines(&t.dir);
    assert!(files.len() >= 3, "only {} segments", files.len());
    let report = verify(&t.dir, Some(&t.pki.bundle())).unwrap();
    assert_eq!(report.segments, files.len());
    // Each sealed segment ends with its seal and a checkpoint.
    for (f, l) in &files[..files.len() - 1] {
        let n = l.len();
        assert!(
            l[n - 2].contains("\"event\":\"segment_sealed\""),
            "{}",
            f.display()
        );
        assert!(
            l[n - 1].contains("\"event\":\"checkpoint\""),
            "{}",
            f.display()
        );
    }
    std::fs::remove_file(&files[1].0).unwrap();
    let e = verify(&t.dir, None).unwrap_err();
    assert!(e.reason.contains("missing"), "{e}");
}

#[test]
fn a_half_written_record_is_reported_then_cut_off_on_restart() {
    let t = trail(5, 1 << 20);
    let (file, _) = lines(&t.dir).remove(0);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":99,\"prev\":\"ab").unwrap();
    drop(f);
    let e = verify(&t.dir, None).unwrap_err();
    assert!(e.reason.contains("incomplete"), "{e}");
    // The node restarts: the partial line goes and the chain continues, but the tear is
    // recorded, and the trail reports it from then on.
    let sink = reopen(&t);
    assert_eq!(kinds(&sink), [TrailBreakKind::Torn]);
    sink.record(&record(6)).unwrap();
    sink.close().unwrap();
    drop(sink);
    let e = verify(&t.dir, None).unwrap_err();
    assert!(
        e.reason.contains("broken") && e.reason.contains("torn"),
        "{e}"
    );
    // A second writer on the same trail waits, then gives up with a clear error.
    let signer: Arc<dyn Signer> = Arc::new(identity(&t.pki, "/node/storage"));
    let mut cfg = FileSinkConfig::new(&t.dir);
    cfg.lock_wait = Duration::from_millis(300);
    let first = FileSink::open(cfg.clone(), signer.clone(), Arc::new(SystemClock)).unwrap();
    let e = FileSink::open(cfg, signer, Arc::new(SystemClock)).unwrap_err();
    assert!(e.to_string().contains("another process"), "{e}");
    drop(first);
}

/// The node restarts on the trail.
fn reopen(t: &Trail) -> FileSink {
    let signer: Arc<dyn Signer> = Arc::new(identity(&t.pki, "/node/storage"));
    FileSink::open(FileSinkConfig::new(&t.dir), signer, Arc::new(SystemClock)).unwrap()
}

fn kinds(sink: &FileSink) -> Vec<TrailBreakKind> {
    sink.breaks().iter().map(|b| b.found).collect()
}

/// Restarts the node on the trail `times` times, a record each time: no new break is
/// found, and `verify` still fails, naming the first.
fn restarts_keep_it_failed(t: &Trail, times: u64, naming: &str) {
    for i in 0..times {
        let sink = reopen(t);
        assert!(sink.breaks().is_empty(), "restart {i}: {:?}", sink.breaks());
        assert_eq!(
            sink.breaks_on_record(),
            1,
            "restart {i}: the break is still on record"
        );
        sink.record(&record(100 + i)).unwrap();
        sink.close().unwrap();
        drop(sink);
        let e = verify(&t.dir, None).unwrap_err();
        assert!(
            e.reason.contains("broken when it opened it") && e.reason.contains(naming),
            "restart {i}: {e}"
        );
    }
}

#[test]
fn a_trail_cut_changed_or_torn_is_recorded_on_restart_and_stays_failed() {
    // Control: a node restarted on an intact trail finds nothing, and it verifies.
    let t = trail(25, 1 << 20);
    for _ in 0..2 {
        let sink = reopen(&t);
        assert!(sink.breaks().is_empty(), "{:?}", sink.breaks());
        assert_eq!(sink.breaks_on_record(), 0);
        sink.record(&record(26)).unwrap();
        drop(sink);
        verify(&t.dir, None).unwrap();
    }

    // The last eight records cut off (the reproduction).
    let t = trail(25, 1 << 20);
    let (file, original) = lines(&t.dir).remove(0);
    let kept = original.len() - 8;
    rewrite(&file, &original[..kept]);
    let sink = reopen(&t);
    assert_eq!(kinds(&sink), [TrailBreakKind::Cut]);
    let b = &sink.breaks()[0];
    let (last_seq, head_seq) = (
        seq_of(&original[kept - 1]),
        seq_of(original.last().unwrap()),
    );
    assert_eq!(b.last_seq, last_seq);
    assert_eq!(
        b.checkpoint.map(|c| c.0),
        Some(head_seq),
        "the old checkpoint is on record"
    );
    assert!(b.detail.contains("cut off"), "{}", b.detail);
    drop(sink);
    // The break is a record of its own, right after the last record that was left.
    let broken = query(
        &t.dir,
        &Query {
            event: Some("trail_broken".into()),
            ..Query::default()
        },
    )
    .unwrap();
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0]["found"], "cut");
    assert_eq!(broken[0]["seq"].as_u64(), Some(last_seq + 1));
    assert_eq!(broken[0]["checkpoint_seq"].as_u64(), Some(head_seq));
    restarts_keep_it_failed(&t, 3, "cut");

    // The latest checkpoint's own record changed (a byte of its time: the signature does
    // not cover it, so only checkpoint.json shows it).
    let t = trail(25, 1 << 20);
    let (file, mut l) = lines(&t.dir).remove(0);
    let last = l.len() - 1;
    l[last] = l[last].replacen("\"time\":\"20", "\"time\":\"19", 1);
    rewrite(&file, &l);
    let sink = reopen(&t);
    assert_eq!(kinds(&sink), [TrailBreakKind::Changed]);
    drop(sink);
    restarts_keep_it_failed(&t, 3, "changed");

    // A torn last line.
    let t = trail(25, 1 << 20);
    let (file, _) = lines(&t.dir).remove(0);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":41,\"pr").unwrap();
    drop(f);
    let sink = reopen(&t);
    assert_eq!(kinds(&sink), [TrailBreakKind::Torn]);
    drop(sink);
    restarts_keep_it_failed(&t, 3, "torn");

    // checkpoint.json removed, so a cut could not be told.
    let t = trail(25, 1 << 20);
    std::fs::remove_file(t.dir.join("checkpoint.json")).unwrap();
    let sink = reopen(&t);
    assert_eq!(kinds(&sink), [TrailBreakKind::CheckpointMissing]);
    drop(sink);
    restarts_keep_it_failed(&t, 1, "checkpoint_missing");
}

#[test]
fn queries_filter_by_peer_dataset_event_and_time() {
    let t = trail(30, 1 << 20);
    let all = query(&t.dir, &Query::default()).unwrap();
    // 30 records, a checkpoint on open and after every 10th; none needed at close.
    assert_eq!(all.len(), 30 + 1 + 3);
    let q = Query {
        peer: Some("spiffe://hospital.example/gpu/loader-1".into()),
        dataset: Some("notes".into()),
        ..Query::default()
    };
    let got = query(&t.dir, &q).unwrap();
    // i % 3 == 1 and odd: 1, 7, 13, 19, 25
    let objects: Vec<&str> = got.iter().map(|r| r["object"].as_str().unwrap()).collect();
    assert_eq!(
        objects,
        [
            "train/shard-0001.bin",
            "train/shard-0007.bin",
            "train/shard-0013.bin",
            "train/shard-0019.bin",
            "train/shard-0025.bin"
        ]
    );
    let q = Query {
        peer: Some("spiffe://hospital.example/gpu/".into()),
        event: Some("transfer".into()),
        since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + 10 * 60)),
        until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + 15 * 60)),
        ..Query::default()
    };
    let got = query(&t.dir, &q).unwrap();
    assert_eq!(got.len(), 5, "records 10..=14");
}
