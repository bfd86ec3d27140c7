//! Concurrency: many client processes churning objects through one store at
//! once, and many threads sharing one client without a slow `get` holding up
//! the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_store::{ObjectId, StoreClient};
use std::sync::mpsc;
use std::time::Duration;
use support::*;

const ENTRY: &str = "child_entry";
const SOCKET_VAR: &str = "BRAID_TEST_SOCKET";
const SEED_VAR: &str = "BRAID_TEST_SEED";
const WAIT: Duration = Duration::from_secs(10);

const PROCESSES: u64 = 16;
const ITERATIONS: usize = 200;
/// Object sizes, 64 B to 256 KiB, straddling the leased-put limit and the
/// populate chunk.
const SIZES: [usize; 8] = [64, 100, 4096, 10_000, 65_536, 65_537, 200_000, 256 << 10];
/// Source of object contents; objects are slices of it at varying offsets.
const SOURCE_LEN: usize = 512 << 10;

/// Offset and length of iteration `i`'s object and small put.
fn shapes(seed: u64, i: usize) -> (usize, usize, usize) {
    let size = SIZES[(i + seed as usize) % SIZES.len()];
    let start = (i * 4099 + seed as usize * 977) % (SOURCE_LEN - (256 << 10));
    let small = 1 + (i * 37 + seed as usize) % 4000;
    (start, size, small)
}

/// One churning client process: creates, writes and seals objects with one
/// connection, reads them back through the store with a second, then
/// releases and deletes them.
fn churn(socket: &str, seed: u64) {
    let writer = StoreClient::connect(socket).unwrap();
    let reader = StoreClient::connect(socket).unwrap();
    let source = pattern(seed, SOURCE_LEN);
    let range = reader.arena_range();
    for i in 0..ITERATIONS {
        let (start, size, small) = shapes(seed, i);
        let data = &source[start..start + size];
        let id = ObjectId::random();
        let mut buf = writer.create(id, size as u64).unwrap();
        buf.as_mut_slice().copy_from_slice(data);
        let view = buf.seal().unwrap();
        let seen = reader.get(id, WAIT).unwrap();
        assert!(
            seen.as_bytes() == data,
            "object {i} of child {seed} differs"
        );
        assert_in_range(seen.as_bytes().as_ptr(), size, &range);
        drop((seen, view));
        writer.delete(id).unwrap();

        let data = &source[start..start + small];
        let put = writer.put(data).unwrap();
        let id = put.id();
        let seen = reader.get(id, WAIT).unwrap();
        assert!(seen.as_bytes() == data, "put {i} of child {seed} differs");
        drop((seen, put));
        writer.delete(id).unwrap();
    }
    assert_eq!(writer.pinned_objects(), 0);
    assert_eq!(reader.pinned_objects(), 0);
}

/// Runs the role this process was re-executed for; does nothing in a normal
/// test run.
#[test]
fn child_entry() {
    let Some(role) = current_role() else {
        return;
    };
    assert_eq!(role, "churn");
    let socket = std::env::var(SOCKET_VAR).unwrap();
    let seed = std::env::var(SEED_VAR).unwrap().parse().unwrap();
    churn(&socket, seed);
    println!("done");
}

#[test]
fn sixteen_processes_churn_one_store() {
    let store = StoreProcess::start(64 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let mut children: Vec<_> = (0..PROCESSES)
        .map(|seed| {
            RoleChild::spawn(
                ENTRY,
                "churn",
                &[
                    (SOCKET_VAR, store.socket.display().to_string()),
                    (SEED_VAR, seed.to_string()),
                ],
            )
        })
        .collect();
    for child in &mut children {
        child.read_tagged("done");
    }
    for child in &mut children {
        let pid = child.pid();
        assert!(child.wait().success(), "child {pid} failed");
        assert!(!alive(pid));
    }

    eventually(Duration::from_secs(10), || {
        client.stats().unwrap().clients == 1
    });
    let stats = client.stats().unwrap();
    assert_eq!(stats.arena.used, 0, "{stats:?}");
    assert_eq!(stats.pins, 0);
    assert_eq!(stats.sealed_objects, 0);
    assert_eq!(stats.unsealed_objects, 0);
    assert_eq!(stats.leased_bytes, 0);
    assert!(braid_shm_files().is_empty());
}

#[test]
fn threads_share_one_client_without_head_of_line_blocking() {
    const WORKERS: u64 = 7;
    let store = StoreProcess::start(64 << 20, false);
    let shared = StoreClient::connect(&store.socket).unwrap();
    let creator = StoreClient::connect(&store.socket).unwrap();

    let blocked = ObjectId::random();
    let mut blocked_buf = creator.create(blocked, 50_000).unwrap();
    blocked_buf
        .as_mut_slice()
        .copy_from_slice(&pattern(99, 50_000));
    let (started_tx, started_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let blocker = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let got = shared.get(blocked, Duration::from_secs(60));
            done_tx
                .send(got.map(|v| v.as_bytes() == &pattern(99, 50_000)[..]))
                .unwrap();
        })
    };
    started_rx.recv().unwrap();

    let workers: Vec<_> = (0..WORKERS)
        .map(|t| {
            let shared = shared.clone();
            let creator = creator.clone();
            std::thread::spawn(move || {
                let source = pattern(t, SOURCE_LEN);
                for i in 0..60 {
                    let (start, size, small) = shapes(t, i);
                    // Through the shared client: a put (leased or created)
                    // and a get of another client's object, which needs the
                    // store.
                    let mine = shared.put(&source[start..start + small]).unwrap();
                    let theirs = creator.put(&source[start..start + size]).unwrap();
                    let seen = shared.get(theirs.id(), WAIT).unwrap();
                    assert!(seen.as_bytes() == &source[start..start + size]);
                    let again = shared.get(mine.id(), WAIT).unwrap();
                    assert_eq!(again.as_bytes(), &source[start..start + small]);
                    let ids = [mine.id(), theirs.id()];
                    drop((mine, theirs, seen, again));
                    for id in ids {
                        shared.delete(id).unwrap();
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }

    // All that work went through the connection the blocked get waits on.
    assert!(matches!(done_rx.try_recv(), Err(mpsc::TryRecvError::Empty)));
    assert!(!blocker.is_finished());
    let view = blocked_buf.seal().unwrap();
    match done_rx.recv_timeout(WAIT) {
        Ok(Ok(true)) => {}
        other => panic!("the blocked get ended with {other:?}"),
    }
    blocker.join().unwrap();
    drop(view);
    creator.delete(blocked).unwrap();

    assert_eq!(shared.pinned_objects(), 0);
    // Releases are one-way: a round trip on each connection flushes them.
    shared.stats().unwrap();
    let stats = creator.stats().unwrap();
    assert_eq!(stats.pins, 0);
    assert_eq!(stats.sealed_objects, 0);
    assert_eq!(stats.arena.used, stats.leased_bytes);
}
