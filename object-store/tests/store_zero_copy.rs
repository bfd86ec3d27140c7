//! Zero-copy sharing between processes: bytes, columnar batches, typed arrays
//! and codec values written by one process are read in place by another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::Array;
use braid_store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut};
use braid_store::{GetValueError, ObjectId, StoreClient, ViewError};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use support::*;

const ENTRY: &str = "child_entry";
const SOCKET_VAR: &str = "BRAID_TEST_SOCKET";
const WAIT: Duration = Duration::from_secs(5);

/// Size of the object the "bytes" child writes: odd, several pages.
const BYTES_LEN: usize = (3 << 20) + 123;
const BYTES_SEED: u64 = 7;

/// Rows in the batch the "batch" child builds.
const ROWS: usize = 4096;

const SMALL_PUT: &[u8] = b"a small object, placed in a leased block";

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Meta {
    name: String,
    dims: Vec<u32>,
    weights: Vec<f32>,
    tag: Option<u64>,
}

fn meta() -> Meta {
    Meta {
        name: "criteo-day-0".into(),
        dims: vec![13, 26, 1 << 20],
        weights: (0..100).map(|i| i as f32 / 8.0).collect(),
        tag: Some(42),
    }
}

fn big_array() -> Vec<f64> {
    (0..20_000).map(|i| f64::from(i) * 0.25 - 3.0).collect()
}

fn small_array() -> Vec<f64> {
    (0..16).map(|i| f64::from(i) * -1.5).collect()
}

/// Features of row `i`: `i % 5 + 1` hashed feature ids.
fn row_features(i: usize) -> impl Iterator<Item = u64> {
    (0..i % 5 + 1).map(move |j| (i as u64) << 8 | j as u64)
}

fn label(i: usize) -> f32 {
    if i % 3 == 0 {
        1.0
    } else {
        0.0
    }
}

fn nnz() -> usize {
    (0..ROWS).map(|i| i % 5 + 1).sum()
}

fn batch_layout() -> BatchLayout {
    BatchLayout::new(
        ROWS,
        &[
            ColumnSpec::primitive("label", Primitive::Float32),
            ColumnSpec::list("features", Primitive::UInt64, nnz()),
        ],
    )
    .unwrap()
}

/// Runs the role this process was re-executed for; does nothing in a normal
/// test run.
#[test]
fn child_entry() {
    let Some(role) = current_role() else {
        return;
    };
    let client = StoreClient::connect(std::env::var(SOCKET_VAR).unwrap()).unwrap();
    match role.as_str() {
        "bytes" => {
            let id = ObjectId::random();
            let mut buf = client.create(id, BYTES_LEN as u64).unwrap();
            let slice = buf.as_mut_slice();
            assert_in_range(slice.as_ptr(), slice.len(), &client.arena_range());
            slice.copy_from_slice(&pattern(BYTES_SEED, BYTES_LEN));
            drop(buf.seal().unwrap());
            println!("id={id}");
        }
        "batch" => {
            let layout = batch_layout();
            let id = ObjectId::random();
            let mut buf = client.create(id, layout.total_len() as u64).unwrap();
            {
                let mut writer = buf.batch_writer(&layout).unwrap();
                let mut columns = writer.columns().into_iter();
                let (Some(label_col), Some(feature_col)) = (columns.next(), columns.next()) else {
                    panic!("two columns");
                };
                let ValuesMut::Float32(labels) = label_col.values else {
                    panic!("f32 labels");
                };
                let offsets = feature_col.offsets;
                let ValuesMut::UInt64(features) = feature_col.values else {
                    panic!("u64 features");
                };
                let range = client.arena_range();
                assert_in_range(labels.as_ptr().cast(), labels.len() * 4, &range);
                assert_in_range(features.as_ptr().cast(), features.len() * 8, &range);
                let mut at = 0;
                for i in 0..ROWS {
                    labels[i] = label(i);
                    offsets[i] = at as i32;
                    for f in row_features(i) {
                        features[at] = f;
                        at += 1;
                    }
                }
                offsets[ROWS] = at as i32;
            }
            drop(buf.seal().unwrap());
            println!("id={id}");
        }
        "typed" => {
            let big = client.put_array(&big_array()).unwrap();
            let small = client.put_array(&small_array()).unwrap();
            let value = client.put_value(&meta()).unwrap();
            let odd = client.put(&[1u8; 12]).unwrap();
            println!("big={}", big.id());
            println!("small={}", small.id());
            println!("value={}", value.id());
            println!("odd={}", odd.id());
        }
        "small_put" => {
            let view = client.put(SMALL_PUT).unwrap();
            // The put took a block from a lease: the rest of the lease is
            // still this client's.
            assert!(client.stats().unwrap().leased_bytes > 0);
            println!("id={}", view.id());
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(store: &StoreProcess, role: &str) -> RoleChild {
    RoleChild::spawn(
        ENTRY,
        role,
        &[(SOCKET_VAR, store.socket.display().to_string())],
    )
}

fn read_id(child: &mut RoleChild, tag: &str) -> ObjectId {
    child.read_tagged(tag).parse().unwrap()
}

/// Waits for a child to exit successfully and checks its pid is gone.
fn finish(mut child: RoleChild) {
    let pid = child.pid();
    assert!(child.wait().success());
    assert!(!alive(pid));
}

/// Waits until the store has dropped every client but `client` (children
/// exit asynchronously to the store).
fn settle(client: &StoreClient) {
    eventually(Duration::from_secs(10), || {
        client.stats().unwrap().clients == 1
    });
}

#[test]
fn bytes_written_by_one_process_are_read_in_place_by_another() {
    let store = StoreProcess::start(32 << 20, false);
    let mut child = spawn(&store, "bytes");
    let id = read_id(&mut child, "id=");
    finish(child);

    let a = StoreClient::connect(&store.socket).unwrap();
    let b = StoreClient::connect(&store.socket).unwrap();
    let va = a.get(id, WAIT).unwrap();
    let vb = b.get(id, WAIT).unwrap();
    let expected = pattern(BYTES_SEED, BYTES_LEN);
    assert_eq!(va.as_bytes(), &expected[..]);
    assert_eq!(vb.as_bytes(), &expected[..]);

    // Each view lies in its own client's mapping of the arena, at the same
    // offset: two mappings of one copy, no copy made.
    let (ra, rb) = (a.arena_range(), b.arena_range());
    assert!(ra.end <= rb.start || rb.end <= ra.start, "mappings overlap");
    assert_in_range(va.as_bytes().as_ptr(), va.len(), &ra);
    assert_in_range(vb.as_bytes().as_ptr(), vb.len(), &rb);
    assert_eq!(
        va.as_bytes().as_ptr() as usize - ra.start,
        va.offset() as usize
    );
    assert_eq!(va.offset(), vb.offset());

    let stats = a.stats().unwrap();
    assert_eq!(stats.pins, 2);
    assert_eq!(stats.sealed_objects, 1);

    drop(vb);
    b.stats().unwrap(); // b's release is handled before this reply.
    drop(va);
    a.delete(id).unwrap();
    drop(b);
    settle(&a);
    let stats = a.stats().unwrap();
    assert_eq!(stats.arena.used, 0);
    assert_eq!(stats.sealed_objects, 0);
    assert!(braid_shm_files().is_empty());
}

#[test]
fn columnar_batch_built_in_place_is_read_in_place() {
    let store = StoreProcess::start(16 << 20, false);
    let mut child = spawn(&store, "batch");
    let id = read_id(&mut child, "id=");
    finish(child);

    let client = StoreClient::connect(&store.socket).unwrap();
    let view = client.get(id, WAIT).unwrap();
    let batch = view.record_batch().unwrap();
    assert_eq!(batch.num_columns(), 2);
    assert_eq!(batch.schema().as_ref(), batch_layout().schema().as_ref());
    assert_eq!(batch.num_rows(), ROWS);

    let labels = batch.column(0).as_primitive::<Float32Type>().values();
    let lists = batch.column(1).as_list::<i32>();
    let offsets = lists.value_offsets();
    let features = lists.values().as_primitive::<UInt64Type>().values();
    let range = client.arena_range();
    assert_in_range(
        labels.as_ptr().cast(),
        std::mem::size_of_val(&labels[..]),
        &range,
    );
    assert_in_range(
        offsets.as_ptr().cast(),
        std::mem::size_of_val(offsets),
        &range,
    );
    assert_in_range(
        features.as_ptr().cast(),
        std::mem::size_of_val(&features[..]),
        &range,
    );
    let bytes = view.as_bytes().as_ptr_range();
    assert!(bytes.contains(&features.as_ptr().cast()));

    assert_eq!(labels.len(), ROWS);
    assert_eq!(offsets.len(), ROWS + 1);
    assert_eq!(features.len(), nnz());
    for i in 0..ROWS {
        assert_eq!(labels[i], label(i), "label of row {i}");
        let row = &features[offsets[i] as usize..offsets[i + 1] as usize];
        assert!(
            row.iter().copied().eq(row_features(i)),
            "features of row {i}"
        );
    }

    // The batch holds the object's pin: with the view gone, the object
    // stays until the batch goes.
    drop(view);
    client.delete(id).unwrap();
    settle(&client);
    assert!(client.stats().unwrap().arena.used > 0);
    assert_eq!(lists.len(), ROWS);
    drop(batch);
    settle(&client);
    assert_eq!(client.stats().unwrap().arena.used, 0);
}

#[test]
fn a_batch_larger_than_the_store_is_refused() {
    let store = StoreProcess::start(1 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let layout =
        BatchLayout::new(1 << 20, &[ColumnSpec::primitive("x", Primitive::UInt64)]).unwrap();
    let err = client.create(ObjectId::random(), layout.total_len() as u64);
    assert!(
        matches!(err, Err(braid_store::CreateError::TooLarge { .. })),
        "{err:?}"
    );
    assert_eq!(client.stats().unwrap().arena.used, 0);
}

#[test]
fn typed_arrays_and_codec_values_cross_processes() {
    let store = StoreProcess::start(16 << 20, false);
    let mut child = spawn(&store, "typed");
    let big = read_id(&mut child, "big=");
    let small = read_id(&mut child, "small=");
    let value = read_id(&mut child, "value=");
    let odd = read_id(&mut child, "odd=");
    finish(child);

    let client = StoreClient::connect(&store.socket).unwrap();
    let range = client.arena_range();
    for (id, expected) in [(big, big_array()), (small, small_array())] {
        let view = client.get(id, WAIT).unwrap();
        let values = view.as_slice::<f64>().unwrap();
        assert_eq!(values, &expected[..]);
        assert_in_range(
            values.as_ptr().cast(),
            std::mem::size_of_val(values),
            &range,
        );
    }
    assert_eq!(client.get_value::<Meta>(value, WAIT).unwrap(), meta());
    match client.get_value::<Vec<String>>(value, WAIT) {
        Err(GetValueError::Decode { id, .. }) => assert_eq!(id, value),
        other => panic!("expected a decode error, got {other:?}"),
    }
    let view = client.get(odd, WAIT).unwrap();
    assert_eq!(
        view.as_slice::<f64>().unwrap_err(),
        ViewError::Length { len: 12, elem: 8 }
    );
    assert_eq!(view.as_slice::<u32>().unwrap(), &[0x0101_0101; 3]);
    drop(view);

    for id in [big, small, value, odd] {
        client.delete(id).unwrap();
    }
    settle(&client);
    let stats = client.stats().unwrap();
    assert_eq!(stats.arena.used, 0);
    assert_eq!(stats.pins, 0);
}

#[test]
fn small_put_is_visible_to_another_process() {
    let store = StoreProcess::start(16 << 20, false);
    let mut child = spawn(&store, "small_put");
    let id = read_id(&mut child, "id=");
    finish(child);

    let client = StoreClient::connect(&store.socket).unwrap();
    let view = client.get(id, WAIT).unwrap();
    assert_eq!(view.as_bytes(), SMALL_PUT);
    assert_in_range(view.as_bytes().as_ptr(), view.len(), &client.arena_range());

    // The creator is gone: its unused leased blocks went back to the arena,
    // the object it put stays, pinned only by this client.
    settle(&client);
    let stats = client.stats().unwrap();
    assert_eq!(stats.leased_bytes, 0);
    assert_eq!(stats.sealed_objects, 1);
    assert_eq!(stats.pins, 1);
    assert_eq!(stats.arena.used, 64, "one 64-byte block");
    drop(view);
    client.delete(id).unwrap();
    assert_eq!(client.stats().unwrap().arena.used, 0);
}

/// A value whose encoding is empty (`()`, a unit struct) must round-trip
/// like any other.
#[test]
fn empty_encoding_round_trips() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Marker;

    let store = StoreProcess::start(16 << 20, false);
    let client = StoreClient::connect(&store.socket).unwrap();
    let unit = client.put_value(&()).unwrap();
    let marker = client.put_value(&Marker).unwrap();
    let other = StoreClient::connect(&store.socket).unwrap();
    other.get_value::<()>(unit.id(), WAIT).unwrap();
    assert_eq!(
        other.get_value::<Marker>(marker.id(), WAIT).unwrap(),
        Marker
    );
}

#[test]
fn objects_built_in_place_are_read_by_another_client_and_a_failed_fill_stores_nothing() {
    let store = StoreProcess::start(16 << 20, false);
    let writer = StoreClient::connect(&store.socket).unwrap();
    let reader = StoreClient::connect(&store.socket).unwrap();
    // One leased (no round trip), one created and sealed by calls.
    for size in [1000usize, 1 << 20] {
        let id = ObjectId::random();
        let expected = pattern(size as u64, size);
        let view = writer
            .build_with_fresh_id(id, size as u64, |dst| {
                dst.copy_from_slice(&expected);
                Ok::<(), String>(())
            })
            .unwrap();
        assert_eq!(view.as_bytes(), &expected[..]);
        let read = reader.get(id, Duration::from_secs(5)).unwrap();
        assert_eq!(read.as_bytes(), &expected[..], "{size} bytes");

        let failed = ObjectId::random();
        let before = writer.stats().unwrap();
        let error = writer
            .build_with_fresh_id(failed, size as u64, |dst| {
                dst[..10].fill(7);
                Err("the operator failed".to_string())
            })
            .unwrap_err();
        assert!(
            matches!(&error, braid_store::BuildError::Fill(e) if e == "the operator failed"),
            "{error:?}"
        );
        let after = writer.stats().unwrap();
        assert!(!reader.contains(failed).unwrap(), "{size} bytes");
        assert_eq!(after.unsealed_objects, 0);
        assert_eq!(after.sealed_objects, before.sealed_objects);
        assert_eq!(
            after.arena.used, before.arena.used,
            "nothing half-done is left"
        );
    }
}
