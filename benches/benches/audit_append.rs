//! Audit append: one record onto the hash chain, encoded and written to the trail's file.
//! The trail is written per transfer and per decision, never per chunk; this shows what
//! one such record costs (compare with a transfer's duration in transport-bench).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certs::test_util::TestPki;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use libtransport::audit::{
    AuditEvent, AuditRecord, AuditSink, Chain, Direction, FileSink, FileSinkConfig, Outcome,
};
use libtransport::proto::{DatasetName, Digest, ObjectPath};
use libtransport::{Credentials, IdentityHandle};

fn record() -> AuditRecord {
    AuditRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000),
        event: AuditEvent::Transfer {
            peer: certs::SpiffeId::parse("spiffe://hospital.example/gpu/loader-0").unwrap(),
            direction: Direction::Out,
            dataset: DatasetName::new("ct-scans").unwrap(),
            object: ObjectPath::new("train/shard-000123.bin").unwrap(),
            bytes: 4 << 30,
            root: Digest([7; 32]),
            path: libtransport::TransferPath::Quic,
            outcome: Outcome::Complete,
            duration_ms: 2100,
        },
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    let r = record();
    g.bench_function("chain_encode", |b| {
        let mut chain = Chain::new();
        b.iter(|| {
            let (line, next) = chain.encode(&r).unwrap();
            chain = next;
            line
        });
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("hospital.example");
    let identity =
        IdentityHandle::new(Credentials::new(pki.svid("/node/storage"), pki.bundle()).unwrap());
    let mut cfg = FileSinkConfig::new(dir.path().join("audit"));
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let sink = FileSink::open(
        cfg,
        Arc::new(identity),
        Arc::new(libtransport::clock::SystemClock),
    )
    .unwrap();
    g.bench_function("file_append", |b| b.iter(|| sink.record(&r).unwrap()));
    g.bench_function("signed_checkpoint", |b| {
        b.iter(|| sink.checkpoint().unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
