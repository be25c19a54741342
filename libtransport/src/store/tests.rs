use std::os::unix::fs::symlink;

use super::*;
use crate::proto::manifest::MIN_CHUNK_BYTES;
use crate::proto::{ChunkIndex, ManifestError};

struct Fixture {
    tmp: tempfile::TempDir,
    store: Store,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(root.join("scans/train")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    std::fs::write(root.join("scans/train/a.bin"), vec![1u8; 200_000]).unwrap();
    std::fs::write(root.join("scans/train/b.bin"), vec![2u8; 10]).unwrap();
    std::fs::write(root.join("scans/z.txt"), b"zz").unwrap();
    std::fs::write(root.join("scans/.transportd-partial-x"), b"tmp").unwrap();
    std::fs::write(tmp.path().join("outside.txt"), b"secret").unwrap();
    symlink("../../outside.txt", root.join("scans/escape")).unwrap();
    symlink("train/b.bin", root.join("scans/alias")).unwrap();
    let store = Store::open(&root, Some(tmp.path().join("state")), MIN_CHUNK_BYTES).unwrap();
    Fixture { tmp, store }
}

fn ds(s: &str) -> DatasetName {
    DatasetName::new(s).unwrap()
}

fn obj(s: &str) -> ObjectPath {
    ObjectPath::new(s).unwrap()
}

#[test]
fn datasets_and_listing_skip_reserved_and_escaping_entries() {
    let f = fixture();
    assert_eq!(f.store.datasets().unwrap(), vec![ds("empty"), ds("scans")]);
    let (page, more) = f.store.list(&ds("scans"), "", None, 100).unwrap();
    let names: Vec<&str> = page.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["alias", "train/a.bin", "train/b.bin", "z.txt"]);
    assert!(!more);
    assert_eq!(page[0].size, 10);

    let (page, more) = f.store.list(&ds("scans"), "train/", None, 1).unwrap();
    assert_eq!(page.len(), 1);
    assert!(more);
    let (page2, more2) = f
        .store
        .list(&ds("scans"), "train/", Some(&page[0].path), 1)
        .unwrap();
    assert_eq!(page2[0].path.as_str(), "train/b.bin");
    assert!(!more2);

    assert!(matches!(
        f.store.list(&ds("missing"), "", None, 10),
        Err(StoreError::NotFound)
    ));
}

#[test]
fn reads_never_leave_the_dataset() {
    let f = fixture();
    assert!(matches!(
        f.store.open_read(&ds("scans"), &obj("escape")),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.open_read(&ds("scans"), &obj("train")),
        Err(StoreError::NotFound)
    ));
    let r = f.store.open_read(&ds("scans"), &obj("alias")).unwrap();
    assert_eq!(&r.read_at(0, 10).unwrap()[..], &[2u8; 10]);
}

#[test]
fn manifest_is_cached_per_file_version_and_survives_restart() {
    let f = fixture();
    let a = f
        .store
        .open_read(&ds("scans"), &obj("train/a.bin"))
        .unwrap();
    assert_eq!(a.manifest().size(), 200_000);
    assert_eq!(a.manifest().chunk_count(), 4);

    // A fresh store over the same state directory loads it instead of recomputing: prove
    // it by corrupting the file while keeping size and mtime (bit rot). The persisted
    // manifest still describes the good bytes, so the damage shows on verification.
    let path = f.tmp.path().join("data/scans/train/a.bin");
    let mtime = filetime::FileTime::from_last_modification_time(&std::fs::metadata(&path).unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[70_000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    filetime::set_file_mtime(&path, mtime).unwrap();

    let store2 = Store::open(
        f.tmp.path().join("data"),
        Some(f.tmp.path().join("state")),
        MIN_CHUNK_BYTES,
    )
    .unwrap();
    let again = store2.open_read(&ds("scans"), &obj("train/a.bin")).unwrap();
    assert_eq!(again.manifest().root(), a.manifest().root());
    let range = again.manifest().chunk_range(ChunkIndex(1)).unwrap();
    let chunk = again
        .read_at(range.start, (range.end - range.start) as usize)
        .unwrap();
    assert!(
        again
            .manifest()
            .verify_chunk(ChunkIndex(1), &chunk)
            .is_err()
    );
    let chunk0 = again.read_at(0, MIN_CHUNK_BYTES as usize).unwrap();
    assert!(
        again
            .manifest()
            .verify_chunk(ChunkIndex(0), &chunk0)
            .is_ok()
    );

    // A real new version (new mtime) gets a new manifest.
    std::fs::write(&path, vec![9u8; 100]).unwrap();
    let newer = store2.open_read(&ds("scans"), &obj("train/a.bin")).unwrap();
    assert_eq!(newer.manifest().size(), 100);
}

#[test]
fn truncated_file_reads_as_corrupt() {
    let f = fixture();
    let r = f
        .store
        .open_read(&ds("scans"), &obj("train/a.bin"))
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.tmp.path().join("data/scans/train/a.bin"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert!(matches!(r.read_at(0, 5000), Err(StoreError::Corrupt)));
}

#[test]
fn writes_are_exclusive_owner_scoped_and_atomic() {
    let f = fixture();
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 199) as u8).collect();
    let m = Arc::new(Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap());
    let target = obj("ckpt/step-1/model.bin");
    let w = f
        .store
        .open_write(&ds("empty"), &target, m.clone(), "spiffe://td/a")
        .unwrap();
    assert!(matches!(
        f.store
            .open_write(&ds("empty"), &target, m.clone(), "spiffe://td/b"),
        Err(StoreError::Conflict)
    ));
    let r0 = m.chunk_range(ChunkIndex(0)).unwrap();
    w.partial()
        .write_chunk(
            ChunkIndex(0),
            &[Bytes::copy_from_slice(&data[..r0.end as usize])],
        )
        .unwrap();
    drop(w);

    // Another identity does not see a's verified chunk; a does.
    let other = f
        .store
        .open_write(&ds("empty"), &target, m.clone(), "spiffe://td/b")
        .unwrap();
    assert_eq!(other.partial().have().count(), 0);
    drop(other);
    let w = f
        .store
        .open_write(&ds("empty"), &target, m.clone(), "spiffe://td/a")
        .unwrap();
    assert_eq!(w.partial().have().count(), 1);

    let final_path = f.tmp.path().join("data/empty/ckpt/step-1/model.bin");
    for i in 1..m.chunk_count() {
        let r = m.chunk_range(ChunkIndex(i)).unwrap();
        w.partial()
            .write_chunk(
                ChunkIndex(i),
                &[Bytes::copy_from_slice(
                    &data[r.start as usize..r.end as usize],
                )],
            )
            .unwrap();
        assert!(!final_path.exists(), "nothing visible before commit");
    }
    let committed = w.commit().unwrap();
    f.store.remember(&ds("empty"), &target, committed).unwrap();
    assert_eq!(std::fs::read(&final_path).unwrap(), data);
    // The lock is released with the writer.
    assert!(
        f.store
            .open_write(&ds("empty"), &target, m, "spiffe://td/b")
            .is_ok()
    );
    // Temporary files never show up in listings.
    let (page, _) = f.store.list(&ds("empty"), "", None, 100).unwrap();
    assert_eq!(page.len(), 1);
}

#[test]
fn writes_cannot_escape_through_symlinked_parents() {
    let f = fixture();
    symlink(f.tmp.path(), f.tmp.path().join("data/empty/out")).unwrap();
    let m = Arc::new(Manifest::of_bytes(b"x", MIN_CHUNK_BYTES).unwrap());
    assert!(matches!(
        f.store
            .open_write(&ds("empty"), &obj("out/planted.bin"), m, "spiffe://td/a"),
        Err(StoreError::NotFound)
    ));
    assert!(!f.tmp.path().join("planted.bin").exists());
}

#[test]
fn oversized_objects_are_refused_with_a_typed_error() {
    assert!(matches!(
        chunk_bytes_for(u64::MAX, MIN_CHUNK_BYTES),
        Err(ManifestError::TooLarge(_))
    ));
}

#[test]
fn manifest_builds_are_capped_and_requests_that_waited_for_one_object_hash_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(root.join("scans")).unwrap();
    for i in 0..12 {
        std::fs::write(root.join(format!("scans/{i}.bin")), vec![i as u8; 300_000]).unwrap();
    }
    // Twelve objects nobody has hashed, asked for at once: at most two hash at a time.
    let store = Store::open(&root, None, MIN_CHUNK_BYTES)
        .unwrap()
        .with_max_manifest_builds(2);
    std::thread::scope(|s| {
        for i in 0..12 {
            let store = &store;
            s.spawn(move || {
                store
                    .open_read(&ds("scans"), &obj(&format!("{i}.bin")))
                    .unwrap()
            });
        }
    });
    assert!(
        store.builds.peak() <= 2,
        "{} builds at once",
        store.builds.peak()
    );
    assert_eq!(store.io_counters().bytes_hashed, 12 * 300_000);
    assert_eq!(store.io_counters().builds_running, 0);

    // One object asked for by sixteen requests at once, one build at a time: those that
    // waited find it built, so it is read and hashed once, not sixteen times.
    let store = Store::open(&root, None, MIN_CHUNK_BYTES)
        .unwrap()
        .with_max_manifest_builds(1);
    let roots: Vec<Digest> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let store = &store;
                s.spawn(move || {
                    store
                        .open_read(&ds("scans"), &obj("0.bin"))
                        .unwrap()
                        .manifest()
                        .root()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(store.io_counters().bytes_hashed, 300_000);
}
