//! Memory pressure: LRU eviction of evictable objects, `StoreFull` and
//! `TooLarge`, spilling and restoring primary objects (and losing a corrupt
//! spill), and `get` waiting for a seal or timing out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_store::{CreateError, GetError, ObjectId, ObjectView, PutError, StoreClient, StoreStats};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

const MIB: u64 = 1 << 20;
const CAPACITY: u64 = 16 * MIB;
/// A quarter of the store: four of these fill it.
const QUARTER: u64 = 4 * MIB;
const WAIT: Duration = Duration::from_secs(5);

/// Creates, fills and seals an object of `size` bytes with `pattern(seed)`.
fn make(client: &StoreClient, size: u64, seed: u64, evictable: bool) -> ObjectView {
    let id = ObjectId::random();
    let mut buf = if evictable {
        client.create_evictable(id, size).unwrap()
    } else {
        client.create(id, size).unwrap()
    };
    buf.as_mut_slice()
        .copy_from_slice(&pattern(seed, size as usize));
    buf.seal().unwrap()
}

/// Stats without the page-provisioning figure, which the store's background
/// thread moves on its own.
fn stats(client: &StoreClient) -> StoreStats {
    StoreStats {
        provisioned_bytes: 0,
        ..client.stats().unwrap()
    }
}

fn assert_content(client: &StoreClient, id: ObjectId, size: u64, seed: u64) {
    let view = client.get(id, WAIT).unwrap();
    assert!(
        view.as_bytes() == &pattern(seed, size as usize)[..],
        "{id} differs"
    );
}

#[test]
fn eviction_drops_least_recently_released_first() {
    let store = StoreProcess::start(CAPACITY, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let views: Vec<_> = (0..3).map(|i| make(&client, QUARTER, i, true)).collect();
    let ids: Vec<_> = views.iter().map(ObjectView::id).collect();
    // Released A, B, C in that order (one connection: the store sees the
    // releases in this order, before the next create).
    for view in views {
        drop(view);
    }
    let before = stats(&client);
    assert_eq!(before.arena.used, 3 * QUARTER);
    assert_eq!(before.pins, 0);

    // Room for two of them: 4 MiB free at the end, then A's and B's blocks.
    let big = make(&client, 2 * QUARTER, 9, false);
    let after = stats(&client);
    assert_eq!(after.evictions, 2);
    assert!(!client.contains(ids[0]).unwrap());
    assert!(!client.contains(ids[1]).unwrap());
    assert!(client.contains(ids[2]).unwrap());
    assert_content(&client, ids[2], QUARTER, 2);
    assert!(matches!(
        client.get(ids[0], Duration::from_millis(50)),
        Err(GetError::Timeout { .. })
    ));
    assert_eq!(after.arena.used, 3 * QUARTER);
    drop(big);
}

#[test]
fn get_refreshes_lru_position_and_primaries_are_never_evicted() {
    let store = StoreProcess::start(CAPACITY, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let views: Vec<_> = (0..3).map(|i| make(&client, QUARTER, i, true)).collect();
    let ids: Vec<_> = views.iter().map(ObjectView::id).collect();
    // A primary object fills the last quarter; unpinned, but without a spill
    // directory it can never leave.
    let primary = make(&client, QUARTER, 3, false).id();
    for view in views {
        drop(view);
    }
    // A is used again: the order becomes B, C, A.
    drop(client.get(ids[0], WAIT).unwrap());

    let d = make(&client, QUARTER, 10, false);
    assert_eq!(stats(&client).evictions, 1);
    assert!(client.contains(ids[0]).unwrap());
    assert!(!client.contains(ids[1]).unwrap());
    assert!(client.contains(ids[2]).unwrap());

    let e = make(&client, QUARTER, 11, false);
    assert_eq!(stats(&client).evictions, 2);
    assert!(!client.contains(ids[2]).unwrap());
    assert_content(&client, ids[0], QUARTER, 0);

    let f = make(&client, QUARTER, 12, false);
    assert_eq!(stats(&client).evictions, 3);
    assert!(!client.contains(ids[0]).unwrap());

    // Only pinned objects and one unpinned primary are left: full.
    match client.create(ObjectId::random(), QUARTER) {
        Err(CreateError::StoreFull { pinned, .. }) => assert_eq!(pinned, 3 * QUARTER),
        other => panic!("expected StoreFull, got {other:?}"),
    }
    assert_content(&client, primary, QUARTER, 3);
    drop((d, e, f));
}

#[test]
fn store_full_when_everything_is_pinned_changes_nothing() {
    let store = StoreProcess::start(CAPACITY, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let mut views: Vec<_> = (0..4).map(|i| make(&client, QUARTER, i, false)).collect();
    let before = stats(&client);
    assert_eq!(before.arena.free, 0);

    for evictable in [false, true] {
        let id = ObjectId::random();
        let result = if evictable {
            client.create_evictable(id, MIB)
        } else {
            client.create(id, MIB)
        };
        match result {
            Err(CreateError::StoreFull {
                requested,
                free,
                largest_free,
                pinned,
            }) => {
                assert_eq!(requested, MIB);
                assert_eq!(free, 0);
                assert_eq!(largest_free, 0);
                assert_eq!(pinned, CAPACITY);
            }
            other => panic!("expected StoreFull, got {other:?}"),
        }
        assert!(!client.contains(id).unwrap());
    }
    match client.put(b"tiny") {
        Err(PutError::Create(CreateError::StoreFull { requested, .. })) => {
            assert!(requested <= 64 << 10);
        }
        other => panic!("expected StoreFull, got {other:?}"),
    }
    for requested in [CAPACITY + 1, u64::MAX] {
        match client.create(ObjectId::random(), requested) {
            Err(CreateError::TooLarge {
                requested: r,
                capacity,
            }) => {
                assert_eq!(r, requested);
                assert_eq!(capacity, CAPACITY);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
    assert_eq!(stats(&client), before, "a refused create changed the store");

    // The store keeps serving: other clients read, and an unpinned primary
    // (no spill directory) still cannot make room, a deleted one can.
    let other = StoreClient::connect(&store.socket).unwrap();
    assert_content(&other, views[1].id(), QUARTER, 1);
    drop(other);
    let first = views.remove(0);
    let first_id = first.id();
    drop(first);
    match client.create(ObjectId::random(), MIB) {
        Err(CreateError::StoreFull { pinned, .. }) => assert_eq!(pinned, 3 * QUARTER),
        other => panic!("expected StoreFull, got {other:?}"),
    }
    client.delete(first_id).unwrap();
    let fresh = make(&client, MIB, 42, false);
    assert_content(&client, fresh.id(), MIB, 42);
    assert_eq!(stats(&client).arena.used, 3 * QUARTER + MIB);
}

/// Names in the spill directory: there must never be any (the spill file is
/// anonymous).
fn assert_no_named_files(dir: &Path) {
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "named files in the spill dir: {names:?}");
}

/// Fills the store with four released primary objects, then two more:
/// returns the six ids with their seeds (the first two are spilled) and the
/// last two views when `keep` is set.
fn spill_two(client: &StoreClient, keep: bool) -> (Vec<(ObjectId, u64)>, Vec<ObjectView>) {
    let mut ids = Vec::new();
    let mut kept = Vec::new();
    for seed in 0..6 {
        let view = make(client, QUARTER, seed, false);
        ids.push((view.id(), seed));
        if keep && seed >= 4 {
            kept.push(view);
        }
    }
    (ids, kept)
}

#[test]
fn spilled_objects_come_back_intact() {
    let store = StoreProcess::start(CAPACITY, true);
    let spill_dir = store.spill_dir.clone().unwrap();
    let client = StoreClient::connect(&store.socket).unwrap();
    let checksums: Vec<u32> = (0..6)
        .map(|seed| crc32fast::hash(&pattern(seed, QUARTER as usize)))
        .collect();
    assert_no_named_files(&spill_dir);

    let (ids, _) = spill_two(&client, false);
    let s = stats(&client);
    assert_eq!(s.spills, 2);
    assert_eq!(s.spilled_objects, 2);
    assert_eq!(s.spilled_bytes, 2 * QUARTER);
    assert_eq!(s.spilled_bytes_total, 2 * QUARTER);
    assert_eq!(s.restored_bytes_total, 0);
    assert_eq!(s.sealed_objects, 4);
    assert_eq!(s.arena.used, CAPACITY);
    assert!(ids.iter().all(|&(id, _)| client.contains(id).unwrap()));
    assert_no_named_files(&spill_dir);

    // The oldest spilled object comes back; the least recently used resident
    // one goes out to make room.
    let (first, seed) = ids[0];
    let view = client.get(first, WAIT).unwrap();
    assert_eq!(crc32fast::hash(view.as_bytes()), checksums[seed as usize]);
    let s = stats(&client);
    assert_eq!(s.restores, 1);
    assert_eq!(s.spills, 3);
    assert_eq!(s.spilled_objects, 2);
    assert_eq!(s.restored_bytes_total, QUARTER);
    assert_eq!(s.spilled_bytes_total, 3 * QUARTER);
    assert_no_named_files(&spill_dir);

    // Everything pinned but the spilled ones: a restore finds no room, and
    // the object stays spilled.
    let mut pinned = vec![view];
    for &(id, _) in &ids[3..] {
        pinned.push(client.get(id, WAIT).unwrap());
    }
    let spilled: Vec<_> = ids
        .iter()
        .filter(|(id, _)| !pinned.iter().any(|v| v.id() == *id))
        .collect();
    assert_eq!(spilled.len(), 2);
    match client.get(spilled[0].0, WAIT) {
        Err(GetError::StoreFull(_)) => {}
        other => panic!("expected StoreFull, got {other:?}"),
    }
    assert!(client.contains(spilled[0].0).unwrap());
    assert!(matches!(
        client.create(ObjectId::random(), MIB),
        Err(CreateError::StoreFull { .. })
    ));
    drop(pinned);

    // Every object, one at a time, many spills and restores.
    for _ in 0..2 {
        for &(id, seed) in &ids {
            let view = client.get(id, WAIT).unwrap();
            assert_eq!(crc32fast::hash(view.as_bytes()), checksums[seed as usize]);
        }
        assert_no_named_files(&spill_dir);
    }
    let s = stats(&client);
    assert!(s.restores >= 6, "{s:?}");

    for &(id, _) in &ids {
        client.delete(id).unwrap();
    }
    let s = stats(&client);
    assert_eq!(s.arena.used, 0);
    assert_eq!(s.spilled_objects, 0);
    assert_eq!(s.spilled_bytes, 0);
    assert_no_named_files(&spill_dir);
}

/// The store's spill file, found among its open descriptors: the link
/// target names the spill directory and says the file is deleted.
fn spill_fd_path(store_pid: u32, spill_dir: &Path) -> PathBuf {
    let dir = spill_dir.to_str().unwrap();
    let fds = std::fs::read_dir(format!("/proc/{store_pid}/fd")).unwrap();
    let mut found = Vec::new();
    for fd in fds {
        let path = fd.unwrap().path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        let target = target.to_string_lossy();
        if target.contains(dir) && target.ends_with(" (deleted)") {
            found.push(path);
        }
    }
    assert_eq!(found.len(), 1, "expected one spill file: {found:?}");
    found.remove(0)
}

#[test]
fn corrupt_spill_is_reported_lost() {
    let store = StoreProcess::start(CAPACITY, true);
    let spill_dir = store.spill_dir.clone().unwrap();
    let client = StoreClient::connect(&store.socket).unwrap();
    let (ids, kept) = spill_two(&client, true);
    assert_eq!(stats(&client).spilled_objects, 2);

    // The first object spilled sits in the first extent, at offset 0.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(spill_fd_path(store.pid(), &spill_dir))
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 12_345).unwrap();
    assert_eq!(byte[0], pattern(0, QUARTER as usize)[12_345]);
    file.write_all_at(&[!byte[0]], 12_345).unwrap();
    drop(file);

    let (lost, _) = ids[0];
    match client.get(lost, WAIT) {
        Err(GetError::Lost { id, reason }) => {
            assert_eq!(id, lost);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(!client.contains(lost).unwrap());
    // Making room for the restore spilled one more object before the read
    // failed; the lost object's block went back to the arena.
    let s = stats(&client);
    assert_eq!(s.spills, 3);
    assert_eq!(s.restores, 0);
    assert_eq!(
        s.restored_bytes_total, 0,
        "a failed restore reads nothing back"
    );
    assert_eq!(s.spilled_objects, 2);
    assert_eq!(s.arena.used, 3 * QUARTER);

    // The other spilled object and the resident ones are fine.
    for &(id, seed) in &ids[1..] {
        assert_content(&client, id, QUARTER, seed);
    }
    drop(kept);
    assert_no_named_files(&spill_dir);
}

#[test]
fn get_times_out_on_an_object_nobody_seals() {
    let store = StoreProcess::start(CAPACITY, false);
    let creator = StoreClient::connect(&store.socket).unwrap();
    let getter = StoreClient::connect(&store.socket).unwrap();
    let id = ObjectId::random();
    let mut buf = creator.create(id, 1000).unwrap();

    for target in [id, ObjectId::random()] {
        let timeout = Duration::from_millis(300);
        let start = Instant::now();
        match getter.get(target, timeout) {
            Err(GetError::Timeout { id, timeout: t }) => {
                assert_eq!(id, target);
                assert_eq!(t, timeout);
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        let waited = start.elapsed();
        assert!(waited >= timeout, "gave up early, after {waited:?}");
        assert!(waited < timeout + Duration::from_secs(2), "took {waited:?}");
    }

    // The timed-out waiters hold nothing once the object is sealed.
    buf.as_mut_slice().fill(7);
    let view = buf.seal().unwrap();
    let s = stats(&creator);
    assert_eq!(s.pins, 1);
    assert_eq!(s.sealed_objects, 1);
    drop(view);
}

#[test]
fn get_waits_for_another_clients_seal() {
    let store = StoreProcess::start(CAPACITY, false);
    let creator = StoreClient::connect(&store.socket).unwrap();
    let getter = StoreClient::connect(&store.socket).unwrap();
    let id = ObjectId::random();
    let mut buf = creator.create(id, 100_000).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(5, 100_000));

    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let start = Instant::now();
        let got = getter.get(id, WAIT).map(|v| v.as_bytes().to_vec());
        tx.send((got, start.elapsed())).unwrap();
    });
    let view = buf.seal().unwrap();
    let (got, waited) = rx.recv().unwrap();
    thread.join().unwrap();
    assert_eq!(got.unwrap(), pattern(5, 100_000));
    assert!(waited < WAIT, "the get ran into its timeout: {waited:?}");
    drop(view);
}
