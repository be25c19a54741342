use std::path::Path;
use std::time::{Duration, SystemTime};

use certs::test_util::TestPki;

use super::*;
use crate::test_util::{sample_trail, sample_trail_start};

fn trail(dir: &Path) -> TestPki {
    let pki = TestPki::new("hospital.example");
    sample_trail(dir, &pki);
    pki
}

fn report(dirs: &[&Path], filter: &ReportFilter) -> EvidenceReport {
    let trails: Vec<NodeTrail> = dirs
        .iter()
        .map(|d| NodeTrail {
            dir: d.to_path_buf(),
            receipts: None,
        })
        .collect();
    evidence_report(&trails, None, filter, SystemTime::UNIX_EPOCH)
}

fn at(minutes: u64) -> SystemTime {
    sample_trail_start() + Duration::from_secs(60 * minutes)
}

#[test]
fn a_known_trail_adds_up_to_its_accesses_refusals_identities_policies_and_transfers() {
    let dir = tempfile::tempdir().unwrap();
    trail(dir.path());
    let r = report(&[dir.path()], &ReportFilter::default());

    assert!(r.all_verified);
    assert_eq!(r.nodes.len(), 1);
    let n = &r.nodes[0];
    assert!(n.verified, "{n:?}");
    assert_eq!(
        n.node.as_deref(),
        Some("spiffe://hospital.example/node/storage")
    );
    assert_eq!(n.witness, WitnessCheck::NotChecked);
    assert_eq!(n.unreadable, 0);

    let rows: Vec<_> = r
        .accesses
        .iter()
        .map(|a| {
            (
                a.identity.as_str(),
                a.dataset.as_str(),
                a.class.as_deref(),
                a.action.as_str(),
                a.allowed,
                a.denied,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "spiffe://hospital.example/gpu/0",
                "ct-head",
                Some("phi"),
                "read",
                2,
                0
            ),
            (
                "spiffe://hospital.example/gpu/1",
                "imagenet",
                Some("public"),
                "list",
                1,
                0
            ),
            (
                "spiffe://hospital.example/intruder",
                "ct-head",
                Some("phi"),
                "read",
                0,
                1
            ),
        ]
    );

    let refusals: Vec<_> = r
        .refusals
        .iter()
        .map(|f| (f.event.as_str(), f.who.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(
        refusals,
        [
            (
                "authorization",
                "spiffe://hospital.example/intruder",
                "no rule allows it"
            ),
            (
                "connection_refused",
                "192.0.2.9:5000",
                "TLS: peer sent no certificates (certificate)"
            ),
            ("policy_refused", "", "line 3: unknown field `subject`"),
        ]
    );

    let identity: Vec<_> = r
        .identity_events
        .iter()
        .map(|i| (i.kind.as_str(), i.id.as_str(), i.serial.as_str()))
        .collect();
    assert_eq!(
        identity,
        [
            ("loaded", "spiffe://hospital.example/node/storage", "01aa"),
            ("issued", "spiffe://hospital.example/gpu/2", "02bb"),
            ("rotated", "spiffe://hospital.example/node/storage", "03cc"),
            ("banned", "spiffe://hospital.example/node/bad", "04dd"),
        ]
    );

    assert_eq!(r.policy_changes.len(), 2);
    let first = &r.policy_changes[0];
    assert!(!first.has_previous && first.lines_recorded);
    assert_eq!(first.rules, 1);
    assert!(first.diff.contains(&"+ class phi: ct-*".to_owned()));
    assert_eq!(
        r.policy_changes[1].diff,
        ["+ deny \"no one reads ct-secret\": subjects *; datasets ct-secret; actions read"]
    );

    let transfers: Vec<_> = r
        .transfers
        .iter()
        .map(|t| (t.path.as_str(), t.direction.as_str(), t.transfers, t.bytes))
        .collect();
    assert_eq!(
        transfers,
        [("quic", "out", 1, 1000), ("tcp", "out", 1, 500)]
    );

    assert_eq!(r.bucket_secs, 60);
    let decisions: u64 = r.timeline.iter().map(|b| b.allowed + b.denied).sum();
    assert_eq!(decisions, 4);
    assert_eq!(r.timeline.iter().map(|b| b.denied).sum::<u64>(), 1);

    // Object names stay out of the report.
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains("train/a.bin") && !json.contains("val/x.jpg"));
}

#[test]
fn filters_narrow_data_records_by_time_dataset_and_class() {
    let dir = tempfile::tempdir().unwrap();
    trail(dir.path());

    let phi = report(
        &[dir.path()],
        &ReportFilter {
            class: Some(DataClass::Phi),
            ..ReportFilter::default()
        },
    );
    assert!(phi.accesses.iter().all(|a| a.dataset == "ct-head"));
    assert_eq!(phi.accesses.len(), 2);
    // The transfer of imagenet (public) is gone; the class came from its decision.
    assert_eq!(phi.transfers.len(), 1);
    assert_eq!(phi.transfers[0].bytes, 1000);
    // Records about no dataset stay.
    assert_eq!(phi.identity_events.len(), 4);
    assert_eq!(phi.class, Some(DataClass::Phi));

    let imagenet = report(
        &[dir.path()],
        &ReportFilter {
            dataset: Some("imagenet".into()),
            ..ReportFilter::default()
        },
    );
    assert_eq!(imagenet.accesses.len(), 1);
    assert_eq!(imagenet.transfers[0].path, "tcp");

    // Minutes 6..12: the denial, imagenet, the refused connection, issuance and rotation.
    let window = report(
        &[dir.path()],
        &ReportFilter {
            from: Some(at(6)),
            to: Some(at(12)),
            ..ReportFilter::default()
        },
    );
    assert_eq!(window.accesses.len(), 2);
    assert_eq!(window.refusals.len(), 2);
    let kinds: Vec<_> = window.identity_events.iter().map(|i| &i.kind).collect();
    assert_eq!(kinds, ["issued", "rotated"]);
    assert!(window.policy_changes.is_empty());

    // The second load, alone in its window, is still diffed against the first.
    let late = report(
        &[dir.path()],
        &ReportFilter {
            from: Some(at(13)),
            ..ReportFilter::default()
        },
    );
    assert_eq!(late.policy_changes.len(), 1);
    assert!(late.policy_changes[0].has_previous);
    assert_eq!(late.policy_changes[0].diff.len(), 1);
}

#[test]
fn a_tampered_trail_is_reported_failed_and_its_records_still_counted() {
    let good = tempfile::tempdir().unwrap();
    let bad = tempfile::tempdir().unwrap();
    trail(good.path());
    trail(bad.path());
    // One byte of the denial's record: the intruder becomes someone else.
    let seg = bad.path().join("audit-000001.jsonl");
    let text = std::fs::read_to_string(&seg).unwrap();
    let changed = text.replacen("/intruder", "/intrudes", 1);
    assert_ne!(text, changed);
    std::fs::write(&seg, changed).unwrap();

    let r = report(&[good.path(), bad.path()], &ReportFilter::default());
    assert!(!r.all_verified);
    assert!(r.nodes[0].verified);
    let n = &r.nodes[1];
    assert!(!n.verified);
    assert!(n.verify.is_none());
    let failure = n.failure.as_deref().unwrap();
    assert!(failure.contains("was changed"), "{failure}");
    // Both trails' records are counted: four decisions each.
    let decisions: u64 = r.accesses.iter().map(|a| a.allowed + a.denied).sum();
    assert_eq!(decisions, 8);
    let gpu0 = r
        .accesses
        .iter()
        .find(|a| a.identity.ends_with("/gpu/0"))
        .unwrap();
    assert_eq!(gpu0.allowed, 4);
    assert_eq!(gpu0.nodes.len(), 1, "both trails name the same signer");
}

#[test]
fn a_trail_that_does_not_match_its_witness_fails() {
    let dir = tempfile::tempdir().unwrap();
    trail(dir.path());
    let trails = [NodeTrail {
        dir: dir.path().to_path_buf(),
        receipts: Some(Vec::new()),
    }];
    let r = evidence_report(
        &trails,
        None,
        &ReportFilter::default(),
        SystemTime::UNIX_EPOCH,
    );
    assert!(r.nodes[0].verified);
    assert!(matches!(r.nodes[0].witness, WitnessCheck::Failed { .. }));
    assert!(!r.all_verified);
}

#[test]
fn policy_diffs_list_removed_then_added_lines() {
    let a = ["x".to_owned(), "y".to_owned()];
    let b = ["y".to_owned(), "z".to_owned()];
    assert_eq!(diff(&a, &b), ["- x", "+ z"]);
    assert!(diff(&a, &a).is_empty());
}

#[test]
fn the_timeline_keeps_at_most_48_buckets() {
    let t0 = sample_trail_start();
    let decisions: Vec<_> = (0..100)
        .map(|i| (t0 + Duration::from_secs(i * 3600), i % 2 == 0))
        .collect();
    let (buckets, width) = timeline(&decisions);
    assert_eq!(width, 3 * 3600);
    assert!(buckets.len() <= 48);
    assert_eq!(buckets.iter().map(|b| b.allowed).sum::<u64>(), 50);
}

#[test]
fn emergency_grants_are_listed_with_their_reason_approval_uses_and_end() {
    use crate::audit::{AuditEvent, AuditRecord, AuditSink, FileSink, FileSinkConfig, Signer};
    use crate::proto::DatasetName;
    use crate::test_util::{ManualClock, identity};
    use crate::vocab::Action;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("hospital.example");
    let start = sample_trail_start();
    let clock = Arc::new(ManualClock::new(start));
    let signer: Arc<dyn Signer> = Arc::new(identity(&pki, "/node/storage"));
    let sink = FileSink::open(FileSinkConfig::new(dir.path()), signer, clock.clone()).unwrap();
    let peer = pki.id("/oncall/radiologist");
    let ds = DatasetName::new("ct-head").unwrap();
    let expires = start + Duration::from_secs(4 * 3600);
    let used = || AuditEvent::EmergencyUsed {
        grant: "g1".into(),
        peer: peer.clone(),
        action: Action::Read,
        dataset: ds.clone(),
        object: None,
        reason: "stroke case 4411".into(),
    };
    let events = [
        AuditEvent::EmergencyGranted {
            grant: "g1".into(),
            peer: peer.clone(),
            dataset: ds.clone(),
            actions: vec![Action::Read, Action::List],
            object_prefix: None,
            ttl_secs: 4 * 3600,
            expires_at: expires,
            reason: "stroke case 4411".into(),
            operator_uid: 1001,
            pending: true,
        },
        AuditEvent::EmergencyApproved {
            grant: "g1".into(),
            peer: peer.clone(),
            dataset: ds.clone(),
            operator_uid: 1002,
            granted_by: 1001,
            expires_at: expires,
        },
        used(),
        used(),
        AuditEvent::EmergencyRefused {
            op: "approve".into(),
            grant: Some("g2".into()),
            peer: None,
            dataset: None,
            operator_uid: 1001,
            error: "an operator cannot approve their own grant".into(),
        },
        AuditEvent::EmergencyExpired {
            grant: "g1".into(),
            peer: peer.clone(),
            dataset: ds.clone(),
            expires_at: expires,
            reason: "stroke case 4411".into(),
            approved: true,
        },
    ];
    for (i, event) in events.into_iter().enumerate() {
        let time = start + Duration::from_secs(60 * (i as u64 + 1));
        clock.advance(Duration::from_secs(60));
        sink.record(&AuditRecord { time, event }).unwrap();
    }
    sink.close().unwrap();

    let r = report(&[dir.path()], &ReportFilter::default());
    assert!(r.all_verified, "{:?}", r.nodes);
    assert_eq!(r.emergency.len(), 1, "{:?}", r.emergency);
    let g = &r.emergency[0];
    assert_eq!(g.grant, "g1");
    assert_eq!(g.peer, peer.to_string());
    assert_eq!(g.dataset, "ct-head");
    assert_eq!(g.actions, ["read", "list"]);
    assert_eq!(g.reason, "stroke case 4411");
    assert_eq!((g.granted_by, g.approved_by), (Some(1001), Some(1002)));
    assert_eq!(g.uses, 2);
    assert_eq!(g.ended, "expired");
    assert!(!g.granted_at.is_empty() && !g.ended_at.is_empty());
    let refused: Vec<_> = r
        .refusals
        .iter()
        .filter(|f| f.event == "emergency_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{:?}", r.refusals);
    assert!(refused[0].reason.contains("own grant"), "{refused:?}");

    // Another dataset's report holds none of it.
    let other = report(
        &[dir.path()],
        &ReportFilter {
            dataset: Some("imagenet".into()),
            ..ReportFilter::default()
        },
    );
    assert!(other.emergency.is_empty(), "{:?}", other.emergency);
}
