use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

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

/// A store over `f`'s data with a small quota and a clock the test moves.
fn limited(
    f: &Fixture,
    quota: u64,
    per_identity: u64,
) -> (Store, Arc<crate::test_util::ManualClock>) {
    let clock = Arc::new(crate::test_util::ManualClock::new(
        crate::clock::Clock::now(&crate::clock::SystemClock),
    ));
    let store = Store::open(f.tmp.path().join("data"), None, MIN_CHUNK_BYTES)
        .unwrap()
        .with_partial_limits(PartialLimits {
            quota_bytes: quota,
            quota_bytes_per_identity: per_identity,
            max_age: Duration::from_secs(3600),
        })
        .with_clock(clock.clone());
    (store, clock)
}

fn manifest_of(len: usize, seed: u8) -> (Vec<u8>, Arc<Manifest>) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let m = Arc::new(Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap());
    (data, m)
}

fn write_first_chunk(w: &ObjectWriter, data: &[u8]) {
    let r = w.partial().manifest().chunk_range(ChunkIndex(0)).unwrap();
    w.partial()
        .write_chunk(
            ChunkIndex(0),
            &[Bytes::copy_from_slice(&data[..r.end as usize])],
        )
        .unwrap();
}

/// Names of the store's files (partial files and sidecars) in `dir`.
fn reserved_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with(RESERVED_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const A: &str = "spiffe://td/a";
const B: &str = "spiffe://td/b";

#[test]
fn partial_files_claim_their_manifests_size_within_the_quotas() {
    let f = fixture();
    // 500 kB for all pushes, 300 kB for one identity's.
    let (store, _) = limited(&f, 500_000, 300_000);
    let (data, big) = manifest_of(250_000, 3);
    let (_, small) = manifest_of(100_000, 5);
    let (_, huge) = manifest_of(400_000, 7);

    // Larger than a quota: refused for good, and no file is made.
    assert!(matches!(
        store.open_write(&ds("empty"), &obj("x/huge.bin"), huge.clone(), A),
        Err(StoreError::OverQuota {
            size: 400_000,
            quota: 300_000
        })
    ));
    assert!(
        !f.tmp.path().join("data/empty/x").exists()
            || reserved_in(&f.tmp.path().join("data/empty/x")).is_empty()
    );

    let w1 = store
        .open_write(&ds("empty"), &obj("x/1.bin"), big.clone(), A)
        .unwrap();
    write_first_chunk(&w1, &data);
    assert_eq!(store.partial_usage().claimed_bytes, 250_000);
    // A's second push would take A past its 300 kB: refused now (it may fit later).
    assert!(matches!(
        store.open_write(&ds("empty"), &obj("x/2.bin"), small.clone(), A),
        Err(StoreError::QuotaFull {
            size: 100_000,
            free: 50_000
        })
    ));
    // B has its own share, but the node's quota is what is left after A's.
    let w2 = store
        .open_write(&ds("empty"), &obj("x/2.bin"), big.clone(), B)
        .unwrap();
    assert_eq!(store.partial_usage().claimed_bytes, 500_000);
    assert!(matches!(
        store.open_write(&ds("empty"), &obj("x/3.bin"), small.clone(), B),
        Err(StoreError::QuotaFull { free: 0, .. })
    ));
    // A refused push left no file behind.
    let names = reserved_in(&f.tmp.path().join("data/empty/x"));
    assert_eq!(
        names.len(),
        4,
        "two partial files and their sidecars: {names:?}"
    );
    // Pre-sizing took no more than the claim.
    for n in names.iter().filter(|n| !n.ends_with(".meta")) {
        let len = std::fs::metadata(f.tmp.path().join("data/empty/x").join(n))
            .unwrap()
            .len();
        assert_eq!(len, 250_000);
    }

    // Dropping a writer keeps its claim (the push may resume), and a resume with the same
    // manifest is let in even while the quota is full: its bytes are already counted.
    drop(w1);
    assert_eq!(store.partial_usage().claimed_bytes, 500_000);
    let w1 = store
        .open_write(&ds("empty"), &obj("x/1.bin"), big.clone(), A)
        .unwrap();
    assert_eq!(w1.partial().have().count(), 1, "the written chunk is kept");
    drop(w2);

    // A commit gives its claim back, and leaves only the object.
    let mut w1 = w1;
    for i in 1..big.chunk_count() {
        let r = big.chunk_range(ChunkIndex(i)).unwrap();
        w1.partial()
            .write_chunk(
                ChunkIndex(i),
                &[Bytes::copy_from_slice(
                    &data[r.start as usize..r.end as usize],
                )],
            )
            .unwrap();
    }
    assert!(w1.take_replaced().is_none());
    w1.commit().unwrap();
    let usage = store.partial_usage();
    assert_eq!((usage.files, usage.claimed_bytes), (1, 250_000));
    assert_eq!(
        std::fs::read(f.tmp.path().join("data/empty/x/1.bin")).unwrap(),
        data
    );
    let names = reserved_in(&f.tmp.path().join("data/empty/x"));
    assert_eq!(
        names.len(),
        2,
        "only B's partial file and sidecar: {names:?}"
    );
    // Now A's second push fits.
    store
        .open_write(&ds("empty"), &obj("x/2.bin"), small, A)
        .unwrap();
}

#[test]
fn a_resume_with_another_manifest_replaces_the_partial_file() {
    let f = fixture();
    let (store, clock) = limited(&f, 1 << 30, 1 << 30);
    let target = obj("ckpt/model.bin");
    let (d1, m1) = manifest_of(200_000, 3);
    let (_, m2) = manifest_of(150_000, 11);
    let w = store
        .open_write(&ds("empty"), &target, m1.clone(), A)
        .unwrap();
    write_first_chunk(&w, &d1);
    drop(w);
    let dir = f.tmp.path().join("data/empty/ckpt");
    let before = reserved_in(&dir);
    assert_eq!(before.len(), 2, "{before:?}");

    // Another owner's push of the same object has a file of its own and replaces nothing.
    let mut other = store
        .open_write(&ds("empty"), &target, m2.clone(), B)
        .unwrap();
    assert!(other.take_replaced().is_none());
    drop(other);
    assert_eq!(reserved_in(&dir).len(), 4);

    clock.advance(Duration::from_secs(90));
    let mut w = store
        .open_write(&ds("empty"), &target, m2.clone(), A)
        .unwrap();
    let r = w.take_replaced().expect("the old partial file is reported");
    assert_eq!(r.reason, RemovalReason::Replaced);
    assert_eq!(r.dataset, ds("empty"));
    assert_eq!(r.object, Some(target.digest()));
    assert_eq!(r.owner.as_deref(), Some(A));
    assert_eq!(r.bytes, 200_000);
    assert_eq!(r.age, Duration::from_secs(90));
    assert!(w.take_replaced().is_none(), "reported once");
    // Nothing of the old manifest is kept, and the file is sized for the new one.
    assert_eq!(w.partial().have().count(), 0);
    let now = reserved_in(&dir);
    assert_eq!(now.len(), 4, "the same name, not a second file: {now:?}");
    assert!(before.iter().all(|n| now.contains(n)), "{now:?}");
    let len = std::fs::metadata(dir.join(&before[0])).unwrap().len();
    assert_eq!(len, 150_000);
    let usage = store.partial_usage();
    assert_eq!(
        (usage.files, usage.claimed_bytes, usage.replaced),
        (2, 300_000, 1)
    );
    drop(w);

    // The same happens when the registry does not know the file yet (a store opened
    // after a restart, before any sweep): the sidecar on disk names the old manifest.
    let (fresh, _) = limited(&f, 1 << 30, 1 << 30);
    let mut w = fresh
        .open_write(&ds("empty"), &target, m1.clone(), A)
        .unwrap();
    let r = w.take_replaced().expect("found from the sidecar");
    assert_eq!((r.bytes, r.owner.as_deref()), (150_000, Some(A)));
    drop(w);
    // ... and a resume with the same manifest keeps the file and its chunks.
    let w = fresh.open_write(&ds("empty"), &target, m1, A).unwrap();
    write_first_chunk(&w, &d1);
    drop(w);
    let (again, _) = limited(&f, 1 << 30, 1 << 30);
    let (_, m1_again) = manifest_of(200_000, 3);
    let mut w = again
        .open_write(&ds("empty"), &target, m1_again, A)
        .unwrap();
    assert!(w.take_replaced().is_none());
    assert_eq!(w.partial().have().count(), 1);
}

#[test]
fn the_sweep_removes_partial_files_past_their_age_but_never_one_in_use() {
    let f = fixture();
    let (store, clock) = limited(&f, 1 << 30, 1 << 30);
    let (d, m) = manifest_of(200_000, 3);
    let dir = f.tmp.path().join("data/empty/run");
    // The first sweep finds the fixture's stray file (no sidecar: unattributed).
    assert!(store.sweep_partials().is_empty());
    assert_eq!(store.partial_usage().files, 1);

    let idle = store
        .open_write(&ds("empty"), &obj("run/idle.bin"), m.clone(), A)
        .unwrap();
    write_first_chunk(&idle, &d);
    drop(idle);
    let busy = store
        .open_write(&ds("empty"), &obj("run/busy.bin"), m.clone(), B)
        .unwrap();
    clock.advance(Duration::from_secs(3599));
    assert!(store.sweep_partials().is_empty(), "not yet an hour");
    assert_eq!(reserved_in(&dir).len(), 4);

    clock.advance(Duration::from_secs(2));
    let mut removed = store.sweep_partials();
    removed.sort_by_key(|r| r.object.is_none());
    assert_eq!(removed.len(), 2, "{removed:?}");
    let r = &removed[0];
    assert_eq!(r.reason, RemovalReason::Expired);
    assert_eq!(r.dataset, ds("empty"));
    assert_eq!(r.object, Some(obj("run/idle.bin").digest()));
    assert_eq!(r.owner.as_deref(), Some(A));
    assert_eq!(r.bytes, 200_000);
    assert_eq!(r.age, Duration::from_secs(3601));
    // The stray file: its dataset and length, no owner or object.
    assert_eq!(
        (
            &removed[1].dataset,
            removed[1].owner.as_ref(),
            removed[1].object,
            removed[1].bytes
        ),
        (&ds("scans"), None, None, 3)
    );
    assert!(
        !f.tmp
            .path()
            .join("data/scans/.transportd-partial-x")
            .exists()
    );
    // The busy one stays, however old: its writer is open.
    let names = reserved_in(&dir);
    assert_eq!(names.len(), 2, "{names:?}");
    clock.advance(Duration::from_secs(100 * 3600));
    assert!(store.sweep_partials().is_empty());
    // Once let go, its age counts from then.
    drop(busy);
    assert!(store.sweep_partials().is_empty());
    clock.advance(Duration::from_secs(3601));
    let removed = store.sweep_partials();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].owner.as_deref(), Some(B));
    assert!(reserved_in(&dir).is_empty());
    let usage = store.partial_usage();
    assert_eq!((usage.files, usage.claimed_bytes, usage.expired), (0, 0, 3));
}

#[test]
fn partial_files_left_by_an_earlier_run_are_found_counted_and_aged() {
    let f = fixture();
    let (d, m) = manifest_of(200_000, 3);
    {
        let (store, _) = limited(&f, 1 << 30, 1 << 30);
        let w = store
            .open_write(&ds("empty"), &obj("a/b/left.bin"), m.clone(), A)
            .unwrap();
        write_first_chunk(&w, &d);
    }
    // A restart: the first sweep finds the file, attributes it by its sidecar and counts
    // its claim; its age is its mtime's.
    let (store, clock) = limited(&f, 250_000, 250_000);
    assert!(store.sweep_partials().is_empty());
    let usage = store.partial_usage();
    assert_eq!((usage.files, usage.claimed_bytes), (2, 200_003));
    let (_, other) = manifest_of(100_000, 5);
    assert!(matches!(
        store.open_write(&ds("empty"), &obj("c.bin"), other.clone(), B),
        Err(StoreError::QuotaFull { .. })
    ));
    clock.advance(Duration::from_secs(3601));
    let removed = store.sweep_partials();
    assert_eq!(removed.len(), 2);
    let r = removed.iter().find(|r| r.owner.is_some()).unwrap();
    assert_eq!(r.object, Some(obj("a/b/left.bin").digest()));
    assert!(r.age >= Duration::from_secs(3601));
    assert!(reserved_in(&f.tmp.path().join("data/empty/a/b")).is_empty());
    store
        .open_write(&ds("empty"), &obj("c.bin"), other, B)
        .unwrap();
}
