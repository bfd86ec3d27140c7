//! Crashes: a client killed or panicking while it holds pins, unsealed
//! creations and leases loses exactly those (a pin held by a record batch
//! read in place included); a killed store gives its clients
//! typed errors and leaves nothing behind but a stale socket, which the next
//! store replaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_store::{
    ConnectionError, CreateError, GetError, ObjectId, PutError, StoreClient, StoreStats,
};
use std::io::Write;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;
use support::*;

const ENTRY: &str = "child_entry";
const SOCKET_VAR: &str = "BRAID_TEST_SOCKET";
const WAIT: Duration = Duration::from_secs(5);

/// Sealed objects the holder creates and keeps pinned.
const SEALED: [u64; 3] = [1000, 70_000, 1 << 20];
/// Objects the holder creates and never seals.
const UNSEALED: [u64; 2] = [5000, 2 << 20];
/// Small puts (leased blocks) the holder keeps pinned.
const PUTS: [u64; 3] = [10, 100, 3000];

fn round64(n: u64) -> u64 {
    n.div_ceil(64) * 64
}

/// Arena bytes the holder's sealed objects and puts occupy.
fn sealed_space() -> u64 {
    SEALED.iter().map(|&n| round64(n)).sum::<u64>()
        + PUTS
            .iter()
            .map(|&n| n.next_power_of_two().max(64))
            .sum::<u64>()
}

/// Runs the role this process was re-executed for; does nothing in a normal
/// test run.
#[test]
fn child_entry() {
    let Some(role) = current_role() else {
        return;
    };
    let client = StoreClient::connect(std::env::var(SOCKET_VAR).unwrap()).unwrap();
    if role == "batch-reader" {
        read_batch_and_hold(&client);
        return;
    }
    let mut views = Vec::new();
    for (i, &size) in SEALED.iter().enumerate() {
        let id = ObjectId::random();
        let mut buf = client.create(id, size).unwrap();
        buf.as_mut_slice()
            .copy_from_slice(&pattern(i as u64, size as usize));
        views.push(buf.seal().unwrap());
        println!("sealed={id}");
    }
    let mut unsealed = Vec::new();
    for &size in &UNSEALED {
        let mut buf = client.create(ObjectId::random(), size).unwrap();
        buf.as_mut_slice()[..100].fill(0xAB);
        unsealed.push(buf);
    }
    for (i, &size) in PUTS.iter().enumerate() {
        let view = client.put(&pattern(100 + i as u64, size as usize)).unwrap();
        println!("put={}", view.id());
        views.push(view);
    }
    // Every put's one-way seal is handled before this reply.
    client.stats().unwrap();
    println!("ready");
    match role.as_str() {
        "hold" => block_on_stdin(),
        "panic" => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            panic!("the holder panics while holding {} pins", views.len());
        }
        other => panic!("unknown role {other}"),
    }
    drop((views, unsealed));
}

/// Starts a holder child with a piped stdin and waits until it holds
/// everything; returns it with the ids of its sealed objects and puts.
fn start_holder(store: &StoreProcess, role: &str) -> (RoleChild, Vec<(ObjectId, Vec<u8>)>) {
    let mut cmd = role_command(
        ENTRY,
        role,
        &[(SOCKET_VAR, store.socket.display().to_string())],
    );
    cmd.stdin(Stdio::piped()).stderr(Stdio::null());
    let mut child = RoleChild::from_command(cmd);
    let mut objects = Vec::new();
    for (i, &size) in SEALED.iter().enumerate() {
        let id = child.read_tagged("sealed=").parse().unwrap();
        objects.push((id, pattern(i as u64, size as usize)));
    }
    for (i, &size) in PUTS.iter().enumerate() {
        let id = child.read_tagged("put=").parse().unwrap();
        objects.push((id, pattern(100 + i as u64, size as usize)));
    }
    child.read_tagged("ready");
    (child, objects)
}

/// Checks the holder's memory is in use as it should be while it lives.
fn assert_held(stats: &StoreStats) {
    assert_eq!(stats.clients, 2);
    assert_eq!(stats.pins, (SEALED.len() + PUTS.len()) as u64);
    assert_eq!(stats.sealed_objects, (SEALED.len() + PUTS.len()) as u64);
    assert_eq!(stats.unsealed_objects, UNSEALED.len() as u64);
    assert!(stats.leased_bytes > 0);
    let unsealed_space: u64 = UNSEALED.iter().map(|&n| round64(n)).sum();
    assert_eq!(
        stats.arena.used,
        sealed_space() + unsealed_space + stats.leased_bytes
    );
}

/// Once the store has noticed the holder is gone: its pins, unsealed objects
/// and leases are released, its sealed objects stay (intact) until deleted.
fn assert_released(client: &StoreClient, objects: &[(ObjectId, Vec<u8>)]) {
    eventually(Duration::from_secs(10), || {
        client.stats().unwrap().clients == 1
    });
    let stats = client.stats().unwrap();
    assert_eq!(stats.pins, 0);
    assert_eq!(stats.unsealed_objects, 0);
    assert_eq!(stats.leased_bytes, 0);
    assert_eq!(stats.sealed_objects, objects.len() as u64);
    assert_eq!(stats.arena.used, sealed_space());

    for (id, expected) in objects {
        let view = client.get(*id, WAIT).unwrap();
        assert_eq!(view.as_bytes(), &expected[..]);
    }
    // The views above are released before the deletes arrive (one
    // connection, in order), so each delete frees at once.
    for (id, _) in objects {
        client.delete(*id).unwrap();
    }
    let stats = client.stats().unwrap();
    assert_eq!(stats.arena.used, 0);
    assert_eq!(stats.sealed_objects, 0);
    assert_eq!(stats.pins, 0);
    assert!(braid_shm_files().is_empty());
}

#[test]
fn killed_client_loses_its_pins_creations_and_leases() {
    let store = StoreProcess::start(16 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let (mut child, objects) = start_holder(&store, "hold");
    assert_held(&client.stats().unwrap());

    let pid = child.pid();
    let status = child.kill();
    assert!(!status.success());
    assert!(!alive(pid));
    assert_released(&client, &objects);
}

#[test]
fn panicking_client_loses_its_pins_creations_and_leases() {
    let store = StoreProcess::start(16 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let (mut child, objects) = start_holder(&store, "panic");
    assert_held(&client.stats().unwrap());

    let pid = child.pid();
    child.stdin().unwrap().write_all(b"panic now\n").unwrap();
    let status = child.wait();
    assert_eq!(
        status.code(),
        Some(101),
        "the test harness reports the panic"
    );
    assert!(!alive(pid));
    assert_released(&client, &objects);
}

const BATCH_VAR: &str = "BRAID_TEST_BATCH";

/// The batch reader's role: views the object as an Arrow record batch,
/// drops the view (the batch's arrays keep the pin) and holds the batch.
fn read_batch_and_hold(client: &StoreClient) {
    let id: ObjectId = std::env::var(BATCH_VAR).unwrap().parse().unwrap();
    let view = client.get(id, WAIT).unwrap();
    let batch = view.record_batch().unwrap();
    drop(view);
    assert_eq!(batch.num_rows(), 1000);
    client.stats().unwrap();
    println!("ready");
    block_on_stdin();
    drop(batch);
}

#[test]
fn a_killed_reader_of_a_record_batch_releases_its_pin() {
    use braid_store::arrow_array::{Int64Array, RecordBatch};
    use braid_store::batch::{write_record_batch, BatchLayout};
    use std::sync::Arc;
    let store = StoreProcess::start(16 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let column = Arc::new(Int64Array::from_iter_values(0..1000));
    let batch = RecordBatch::try_from_iter([("n", column as _)]).unwrap();
    let layout = BatchLayout::of(&batch).unwrap();
    let id = ObjectId::random();
    let mut buf = client.create(id, layout.total_len() as u64).unwrap();
    write_record_batch(&layout, &batch, buf.as_mut_slice()).unwrap();
    drop(buf.seal().unwrap());

    let mut cmd = role_command(
        ENTRY,
        "batch-reader",
        &[
            (SOCKET_VAR, store.socket.display().to_string()),
            (BATCH_VAR, id.to_string()),
        ],
    );
    cmd.stdin(Stdio::piped()).stderr(Stdio::null());
    let mut child = RoleChild::from_command(cmd);
    child.read_tagged("ready");
    assert_eq!(
        client.stats().unwrap().pins,
        1,
        "the reader's batch holds the object's pin after its view is dropped"
    );
    let pid = child.pid();
    assert!(!child.kill().success());
    assert!(!alive(pid));
    eventually(Duration::from_secs(10), || {
        client.stats().unwrap().clients == 1
    });
    assert_eq!(client.stats().unwrap().pins, 0);
    client.delete(id).unwrap();
    assert_eq!(client.stats().unwrap().arena.used, 0);
}

fn disconnected(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::Disconnected(_))
}

#[test]
fn killed_store_gives_typed_errors_and_is_replaced() {
    let mut store = StoreProcess::start(16 << 20, false);
    let socket = store.socket.clone();
    let client = StoreClient::connect(&socket).unwrap();
    let held = client.put(&pattern(1, 1 << 20)).unwrap();
    let small = client.put(b"leased").unwrap();

    // A get that would wait a minute for an object nobody creates.
    let (tx, rx) = mpsc::channel();
    let getter = {
        let client = client.clone();
        std::thread::spawn(move || {
            let _ = tx.send(client.get(ObjectId::random(), Duration::from_secs(60)));
        })
    };

    let store_pid = store.pid();
    store.kill();
    assert!(!alive(store_pid));

    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(GetError::Connection(e))) => assert!(disconnected(&e), "{e:?}"),
        Ok(other) => panic!("expected a disconnection, got {other:?}"),
        Err(_) => panic!("the waiting get hung after the store died"),
    }
    getter.join().unwrap();
    match client.stats() {
        Err(e) => assert!(disconnected(&e), "{e:?}"),
        Ok(stats) => panic!("stats from a dead store: {stats:?}"),
    }
    match client.create(ObjectId::random(), 100) {
        Err(CreateError::Connection(e)) => assert!(disconnected(&e), "{e:?}"),
        other => panic!("expected a disconnection, got {other:?}"),
    }
    match client.put(b"another small one") {
        Err(PutError::Create(CreateError::Connection(e))) => assert!(disconnected(&e), "{e:?}"),
        other => panic!("expected a disconnection, got {other:?}"),
    }
    match client.get(ObjectId::random(), WAIT) {
        Err(GetError::Connection(e)) => assert!(disconnected(&e), "{e:?}"),
        other => panic!("expected a disconnection, got {other:?}"),
    }

    // Views stay readable: this process's mapping keeps the arena alive.
    assert_eq!(held.as_bytes(), &pattern(1, 1 << 20)[..]);
    assert_eq!(small.as_bytes(), b"leased");
    drop((held, small, client));

    // The socket file is left behind, and nobody answers on it.
    assert!(socket.exists());
    match StoreClient::connect(&socket) {
        Err(ConnectionError::Connect { path, .. }) => assert_eq!(path, socket),
        other => panic!("connected to a dead store: {other:?}"),
    }

    // A new store on the same path replaces the stale socket.
    let replacement = StoreProcess::start_with(StoreOptions {
        socket: Some(socket.clone()),
        ..StoreOptions::default()
    });
    let client = StoreClient::connect(&socket).unwrap();
    assert_eq!(client.store_pid(), replacement.pid());
    let view = client.put(b"after the restart").unwrap();
    let other = StoreClient::connect(&socket).unwrap();
    assert_eq!(
        other.get(view.id(), WAIT).unwrap().as_bytes(),
        b"after the restart"
    );
    drop((view, client, other, replacement));
    drop(store);
    assert!(braid_shm_files().is_empty());
}
