//! Witnessed checkpoints without sockets: every checkpoint a sink writes is queued for the
//! witness; receipts countersigned by the witness verify against the trail; a trail rebuilt
//! and signed again with the node's own key passes `verify` but not `verify_witnessed`,
//! which names the first witnessed checkpoint it lost; forged or foreign receipts fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use certs::SpiffeId;
use certs::test_util::TestPki;
use libtransport::audit::{
    AuditEvent, AuditRecord, AuditSink, FileSink, FileSinkConfig, Receipt, Signer, WitnessQueue,
    read_receipts, verify, verify_witnessed,
};
use libtransport::clock::{Clock, SystemClock};
use libtransport::test_util::{identity, rebuild_trail};

struct Witnessed {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: TestPki,
    receipts: Vec<Receipt>,
}

/// A trail of 30 records with a checkpoint after every 10th, each checkpoint countersigned
/// by the issuer as it was queued.
fn witnessed() -> Witnessed {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let pki = TestPki::new("hospital.example");
    let node: Arc<dyn Signer> = Arc::new(identity(&pki, "/node/storage"));
    let issuer = identity(&pki, "/issuer");
    let queue = WitnessQueue::new(64);
    let mut cfg = FileSinkConfig::new(&dir);
    cfg.checkpoint_interval = Duration::from_secs(3600);
    cfg.witness = Some(queue.clone());
    let sink = FileSink::open(cfg, node, Arc::new(SystemClock)).unwrap();
    for i in 1..=30u64 {
        sink.record(&AuditRecord {
            time: SystemClock.now(),
            event: AuditEvent::PolicyRefused {
                source: "policy.toml".into(),
                reason: format!("line {i}"),
            },
        })
        .unwrap();
        if i.is_multiple_of(10) {
            sink.checkpoint().unwrap();
        }
    }
    drop(sink);
    let id = SpiffeId::parse("spiffe://hospital.example/node/storage").unwrap();
    let receipts: Vec<Receipt> = queue
        .waiting()
        .iter()
        .map(|cp| Receipt::sign(&id, cp, SystemClock.now(), &issuer).unwrap())
        .collect();
    // On open and after records 10, 20 and 30 (close adds none: nothing followed).
    assert_eq!(
        receipts.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 12, 23, 34]
    );
    Witnessed {
        _tmp: tmp,
        dir,
        pki,
        receipts,
    }
}

#[test]
fn receipts_of_an_untouched_trail_verify_with_the_bundle() {
    let w = witnessed();
    let report = verify_witnessed(&w.dir, &w.receipts, Some(&w.pki.bundle())).unwrap();
    assert_eq!((report.witnessed, report.last_witnessed), (4, 34));
    assert!(report.witnesses_verified);
    // As JSON lines and back, as a node keeps them and `issuer witness export` prints them.
    let text: String = w
        .receipts
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    assert_eq!(read_receipts(&text).unwrap(), w.receipts);
    // Nothing witnessed is nothing vouched for.
    let e = verify_witnessed(&w.dir, &[], None).unwrap_err();
    assert!(e.reason.contains("no checkpoints"), "{e}");
}

#[test]
fn a_trail_rebuilt_with_the_nodes_key_passes_verify_but_not_its_witness() {
    let w = witnessed();
    let node = identity(&w.pki, "/node/storage");
    // The record at seq 15 said something the insider wants gone.
    let changed = rebuild_trail(&w.dir, &node, None, |v| {
        if v["seq"] == 15 {
            v["reason"] = "nothing to see".into();
            return true;
        }
        false
    });
    assert_eq!(changed, Some(15));
    // The control: the node's own signatures cannot tell.
    let report = verify(&w.dir, Some(&w.pki.bundle())).unwrap();
    assert_eq!(report.checkpoints, 4);
    // The witness can: its checkpoint 23 is the first after the change.
    let e = verify_witnessed(&w.dir, &w.receipts, Some(&w.pki.bundle())).unwrap_err();
    assert_eq!(e.seq, Some(23), "{e}");
    assert!(e.reason.contains("rewritten after it was witnessed"), "{e}");
    // A trail rebuilt shorter loses witnessed checkpoints outright.
    rebuild_trail(&w.dir, &node, Some(20), |_| false);
    verify(&w.dir, None).unwrap();
    let e = verify_witnessed(&w.dir, &w.receipts, None).unwrap_err();
    assert_eq!(e.seq, Some(23), "{e}");
}

#[test]
fn a_forged_or_foreign_receipt_does_not_verify() {
    let w = witnessed();
    // A receipt moved to another checkpoint no longer matches its countersignature.
    let mut moved = w.receipts.clone();
    moved[1].seq = 13;
    let e = verify_witnessed(&w.dir, &moved, None).unwrap_err();
    assert!(e.reason.contains("does not verify"), "{e}");
    // A witness from another trust domain is not this domain's witness.
    let other = TestPki::new("hospital.example");
    let e = verify_witnessed(&w.dir, &w.receipts, Some(&other.bundle())).unwrap_err();
    assert!(e.reason.contains("signer's certificate"), "{e}");
    // Receipts for another node are not this trail's.
    let issuer = identity(&w.pki, "/issuer");
    let gpu = SpiffeId::parse("spiffe://hospital.example/node/gpu-0").unwrap();
    let theirs: Vec<Receipt> = w
        .receipts
        .iter()
        .map(|r| Receipt::sign(&gpu, &r.checkpoint(), SystemClock.now(), &issuer).unwrap())
        .collect();
    let e = verify_witnessed(&w.dir, &theirs, None).unwrap_err();
    assert!(e.reason.contains("signed by"), "{e}");
}
