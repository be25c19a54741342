use std::os::unix::fs::FileExt;

use super::*;
use crate::test_util::random_bytes;

const CHUNK: u32 = 64 << 10;

fn object(len: usize, seed: u64) -> (Manifest, Vec<u8>) {
    let data = random_bytes(len, seed);
    (Manifest::of_bytes(&data, CHUNK).unwrap(), data)
}

/// The one file in `dir`.
fn only_file(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            found.push(path);
        }
    }
    found
}

#[test]
fn an_object_goes_in_sealed_and_comes_out_whole_through_memory_or_a_sealed_memfd() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let (m, data) = object(300_001, 1);
    assert!(cache.get(&m.root()).is_none());
    assert!(cache.insert(&m, &data).unwrap());
    let e = cache.get(&m.root()).expect("held");
    let mut out = vec![0u8; data.len()];
    e.read_into(&mut out).unwrap();
    assert!(out == data);
    // The memory file holds the object and refuses any change.
    let fd = e.to_memfd().unwrap();
    let f = File::from(fd);
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == data);
    assert!(f.write_at(b"x", 0).is_err(), "a sealed memfd took a write");
    assert!(f.set_len(1).is_err(), "a sealed memfd shrank");
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
    assert_eq!(
        s.bytes,
        data.len() as u64 + 5 * 28,
        "5 chunks, each with nonce and tag"
    );
}

#[test]
fn no_plaintext_reaches_the_disk_and_a_reopened_cache_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let mut data = random_bytes(200_000, 2);
    let canary = b"PATIENT-CANARY-7f3a9c-do-not-leak";
    data[100_000..100_000 + canary.len()].copy_from_slice(canary);
    let m = Manifest::of_bytes(&data, CHUNK).unwrap();
    assert!(cache.insert(&m, &data).unwrap());
    assert!(files_holding(dir.path(), canary).is_empty());
    assert!(files_holding(dir.path(), &data[..64]).is_empty());
    // The control: the search finds the canary in a file that holds it.
    std::fs::write(dir.path().join("control"), &data).unwrap();
    assert_eq!(files_holding(dir.path(), canary).len(), 1);
    std::fs::remove_file(dir.path().join("control")).unwrap();
    // A new run's cache cannot open the old entries: it removes them.
    drop(cache);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(cache.get(&m.root()).is_none());
    assert_eq!(cache.stats().entries, 0);
}

#[test]
fn bytes_that_do_not_match_their_manifest_are_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let (m, mut data) = object(200_000, 3);
    data[150_000] ^= 1;
    match cache.insert(&m, &data) {
        Err(CacheError::Corrupt { chunk: 2 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(cache.get(&m.root()).is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(cache.stats().bytes, 0);
}

#[test]
fn an_entry_changed_on_disk_does_not_open_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SealedCache::open(dir.path(), 64 << 20).unwrap();
    let (m, data) = object(200_000, 4);
    assert!(cache.insert(&m, &data).unwrap());
    let file = only_file(dir.path());
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(&file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 70_000).unwrap();
    f.write_at(&[b[0] ^ 0x20], 70_000).unwrap();
    let e = cache.get(&m.root()).unwrap();
    let mut out = vec![0u8; data.len()];
    match e.read_into(&mut out) {
        Err(CacheError::Tampered { chunk: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    drop(e);
    assert!(
        cache.get(&m.root()).is_none(),
        "the tampered entry was kept"
    );
    assert!(!file.exists());
    // Chunks swapped between two places of one entry do not open either.
    let (m2, data2) = object(200_000, 5);
    assert!(cache.insert(&m2, &data2).unwrap());
    let file = only_file(dir.path());
    let mut sealed = std::fs::read(&file).unwrap();
    let one = (CHUNK as usize) + 28;
    let (a, b) = sealed.split_at_mut(one);
    a.swap_with_slice(&mut b[..one]);
    std::fs::write(&file, &sealed).unwrap();
    let e = cache.get(&m2.root()).unwrap();
    assert!(matches!(
        e.to_memfd(),
        Err(CacheError::Tampered { chunk: 0, .. })
    ));
}

#[test]
fn the_budget_evicts_the_least_recently_used_and_never_an_entry_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let (a, da) = object(100_000, 10);
    let (b, db) = object(100_000, 11);
    let (c, dc) = object(100_000, 12);
    let one = sealed_len(&a);
    let cache = SealedCache::open(dir.path(), 2 * one).unwrap();
    assert!(cache.insert(&a, &da).unwrap());
    assert!(cache.insert(&b, &db).unwrap());
    // a is used, so b is the least recently used when c comes.
    drop(cache.get(&a.root()).unwrap());
    assert!(cache.insert(&c, &dc).unwrap());
    assert!(cache.get(&b.root()).is_none());
    assert_eq!(cache.stats().evictions, 1);
    assert_eq!(cache.stats().bytes, 2 * one);
    // Both held by readers: nothing can make room, and b is not stored.
    let ra = cache.get(&a.root()).unwrap();
    let rc = cache.get(&c.root()).unwrap();
    assert!(!cache.insert(&b, &db).unwrap());
    let mut out = vec![0u8; da.len()];
    ra.read_into(&mut out).unwrap();
    assert!(out == da);
    // Once c's reader is done, c can go.
    drop(rc);
    assert!(cache.insert(&b, &db).unwrap());
    assert!(cache.get(&c.root()).is_none());
    assert!(cache.get(&a.root()).is_some());
    // Larger than the whole budget: never stored.
    let (big, dbig) = object(300_000, 13);
    drop(ra);
    assert!(!cache.insert(&big, &dbig).unwrap());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "files on disk match the entries"
    );
}

#[test]
fn the_kernels_huge_page_choice_is_the_bracketed_word() {
    assert_eq!(
        chosen_setting("always within_size advise [never] deny force\n").as_deref(),
        Some("never")
    );
    assert_eq!(
        chosen_setting("always [within_size] advise never deny force").as_deref(),
        Some("within_size")
    );
    assert_eq!(chosen_setting("always never"), None);
    assert_eq!(chosen_setting("[never"), None);
}
