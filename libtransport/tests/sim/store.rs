//! A stored object that no longer matches its manifest is never served as good: the store's
//! cached manifest and the client's verification, through the real drivers over the sim
//! (moved from `tests/access.rs`).

use certs::test_util::TestPki;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::sim::SimNet;
use libtransport::test_util::{random_bytes, trace_init};
use libtransport::{FetchError, FetchOptions};

use super::support::{client_as, server};
use super::{CHUNK, tuning};

#[tokio::test(start_paused = true)]
async fn a_stored_file_changed_after_its_manifest_is_corrupt_never_good() {
    let _trace = trace_init();
    let net = SimNet::new(109);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(
        &net,
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        tuning(),
    )
    .await;
    let data = random_bytes(16 * CHUNK as usize, 7);
    let file = server.put("scans", "shard.bin", &data);
    let scans = DatasetName::new("scans").unwrap();
    let obj = ObjectPath::new("shard.bin").unwrap();
    let out = tempfile::tempdir().unwrap();
    let client = client_as(&net, &pki, "/gpu/loader").await.unwrap();

    // The manifest is built and cached from the good bytes.
    let manifest = client.stat(&scans, &obj).await.unwrap();
    assert_eq!(manifest.chunk_count(), 16, "{seed}");

    // Bit rot: one byte of chunk 5 changes, and size and mtime stay as they were.
    let chunk = CHUNK as usize;
    let meta = std::fs::metadata(&file).unwrap();
    let mtime = filetime::FileTime::from_last_modification_time(&meta);
    let mut rotten = data.clone();
    rotten[5 * chunk + 100] ^= 0x20;
    std::fs::write(&file, &rotten).unwrap();
    filetime::set_file_mtime(&file, mtime).unwrap();

    let dest = out.path().join("shard.bin");
    let e = client
        .fetch_to_file(&scans, &obj, &dest, &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, FetchError::Corrupt(i) if i.0 == 5),
        "{seed}: {e}"
    );
    assert!(!dest.exists(), "{seed}: a corrupt object became visible");
    let e = client
        .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Corrupt(_)), "{seed}: {e}");
    // A range outside the damaged chunk still reads; one touching it does not.
    let good = client
        .read_range(&scans, &obj, 0..CHUNK as u64)
        .await
        .unwrap();
    assert_eq!(&good[..], &data[..chunk], "{seed}");
    let start = 5 * u64::from(CHUNK);
    assert!(
        client
            .read_range(&scans, &obj, start..start + 10)
            .await
            .is_err(),
        "{seed}: a range of the damaged chunk was served"
    );

    // Repaired, the same object is served whole again.
    std::fs::write(&file, &data).unwrap();
    filetime::set_file_mtime(&file, mtime).unwrap();
    let got = client
        .fetch(&scans, &obj, 1 << 20, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..], "{seed}");
}
