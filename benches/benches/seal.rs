//! Chunk sealing for the RDMA path: our seal plus open (header, additional data, nonce from
//! the sequence number, replay window, placement check) against raw aws-lc-rs AES-256-GCM
//! seal plus open of the same bytes, on one core, in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use libtransport::proto::seal::{
    Direction, EXPORTER_BYTES, HEADER_LEN, KeyLimits, Placement, SessionKeys, sealed_len,
};

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 4 << 20];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_open");
    for len in SIZES {
        g.throughput(Throughput::Bytes(len as u64));

        // Raw AEAD: seal in place, then open in place, a fresh nonce each time.
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
        let mut buf = vec![0x5au8; len];
        let mut seq = 0u64;
        g.bench_with_input(BenchmarkId::new("aws-lc-rs", len), &len, |b, _| {
            b.iter(|| {
                seq += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&seq.to_be_bytes());
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&[0u8; 48][..]),
                        &mut buf,
                    )
                    .unwrap();
                buf.extend_from_slice(tag.as_ref());
                let plain = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&[0u8; 48][..]),
                        &mut buf,
                    )
                    .unwrap();
                assert_eq!(plain.len(), len);
                buf.truncate(len);
            });
        });

        // Ours: what the RDMA sender and receiver do per chunk.
        let keys = SessionKeys::derive([3u8; 16], &[9u8; EXPORTER_BYTES]);
        let mut sealer = keys.sealer(Direction::ServerToClient, KeyLimits::default());
        let mut opener = keys.opener(Direction::ServerToClient);
        let mut slot = vec![0x5au8; sealed_len(len)];
        let at = Placement {
            transfer: 1,
            chunk: 0,
            offset: 0,
            len: len as u32,
        };
        g.bench_with_input(BenchmarkId::new("transportd", len), &len, |b, _| {
            b.iter(|| {
                sealer.seal(at, &mut slot).unwrap();
                let plain = opener.open(at, &mut slot).unwrap();
                assert_eq!(plain.len(), len);
            });
        });
        assert_eq!(slot.len() - len, HEADER_LEN + 16);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
