//! Fuzz targets for what training decodes from checkpoints and from other
//! processes: parameter tables, models, a parameter-server shard's
//! snapshot, and feature batches read in place from the object store.
//!
//! Under `cargo test` each target runs for about a second on random input
//! (bolero's default); a longer campaign of one target is one command (see
//! the README's "Fuzzing" section). Every target asserts that decoding never
//! panics and that the memory it holds is bounded by its input, never by a
//! length field it read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../object-store/tests/support/alloc_meter.rs"]
mod alloc_meter;

use bolero::check;
use braid::store::arrow_buffer::Buffer;
use braid::store::batch::{read_record_batch, BatchWriter};
use braid_actors::train::data::{FeatureBatch, FeatureBatchRef};
use braid_actors::train::model::LogisticLearner as Model;
use braid_actors::train::optimizer::OptimizerKind;
use braid_actors::train::shard::check_shard_snapshot;
use braid_actors::train::table::ParamTable;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// Slack for allocations no input drives, and for a table's smallest
/// allocations.
const SLACK: usize = 4 << 20;

/// The header of an empty table's snapshot up to the slot count: magic,
/// version and state width, so the fuzzer reaches the counts and entries.
fn table_prefix() -> Vec<u8> {
    ParamTable::<[f32; 2]>::new().to_bytes()[..9].to_vec()
}

#[test]
fn param_tables_from_bytes() {
    let prefix = table_prefix();
    check!().for_each(|bytes: &[u8]| {
        let mut guided = prefix.clone();
        guided.extend_from_slice(bytes);
        alloc_meter::assert_bounded(guided.len(), SLACK, || {
            let _ = ParamTable::<[f32; 2]>::from_bytes(bytes);
            if let Ok(table) = ParamTable::<[f32; 2]>::from_bytes(&guided) {
                assert!(table.len() <= guided.len() / 16);
                let again = ParamTable::<[f32; 2]>::from_bytes(&table.to_bytes()).unwrap();
                assert_eq!(again.len(), table.len());
            }
        });
    });
}

/// Snapshot headers with plausible slot and entry counts (a power of two,
/// entries backed by exactly enough bytes), so the fuzzer reaches the
/// checks a random header never passes.
#[test]
fn param_table_headers() {
    let prefix = table_prefix();
    check!()
        .with_type::<(u8, u16, Vec<u8>)>()
        .for_each(|(log2, entries, fill)| {
            let mut bytes = prefix.clone();
            bytes.extend_from_slice(&(1u64 << (log2 % 64)).to_le_bytes());
            bytes.extend_from_slice(&u64::from(*entries).to_le_bytes());
            let body = usize::from(*entries) * 16;
            bytes.extend(fill.iter().copied().cycle().take(body));
            alloc_meter::assert_bounded(bytes.len(), SLACK, || {
                if let Ok(table) = ParamTable::<[f32; 2]>::from_bytes(&bytes) {
                    assert!(table.len() <= usize::from(*entries));
                }
            });
        });
}

#[test]
fn param_tables_round_trip() {
    check!()
        .with_type::<Vec<(u64, f32, f32)>>()
        .for_each(|entries| {
            let mut table = ParamTable::<[f32; 2]>::new();
            for &(k, a, b) in entries {
                *table.get_or_insert_default(k) = [a, b];
            }
            let bytes = table.to_bytes();
            let got = ParamTable::<[f32; 2]>::from_bytes(&bytes).expect("a snapshot decodes");
            assert_eq!(got.to_bytes(), bytes);
            assert_eq!(got.len(), table.len());
            for &(k, _, _) in entries {
                let (x, y) = (got.get(k).unwrap(), table.get(k).unwrap());
                assert_eq!(x.map(f32::to_bits), y.map(f32::to_bits));
            }
        });
}

#[test]
fn models_from_bytes() {
    let mut prefix = Model::new(OptimizerKind::Sgd { lr: 0.1 })
        .expect("a model")
        .to_bytes();
    prefix.truncate(31);
    prefix.extend_from_slice(&table_prefix());
    check!().for_each(|bytes: &[u8]| {
        let mut guided = prefix.clone();
        guided.extend_from_slice(bytes);
        alloc_meter::assert_bounded(guided.len(), SLACK, || {
            let _ = Model::from_bytes(bytes);
            let _ = Model::from_bytes(&guided);
        });
    });
}

#[test]
fn shard_snapshots_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            let _ = check_shard_snapshot(bytes);
        });
    });
}

/// `bytes` copied into a buffer aligned as a store object is.
fn aligned(bytes: &[u8]) -> Buffer {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    Buffer::from_vec(words).slice_with_length(0, bytes.len())
}

/// Reads every row of a batch that was accepted, as a trainer would.
fn read_rows(batch: &FeatureBatchRef<'_>) {
    let mut ids = 0;
    for i in 0..batch.rows() {
        let (_, row, values) = batch.row(i);
        assert_eq!(values.map_or(row.len(), <[f32]>::len), row.len());
        ids += row.len();
        let _ = (batch.times().get(i), batch.positions()[i]);
    }
    assert_eq!(ids, batch.len_ids());
}

/// A valid feature batch's Arrow bytes, with values, event times and
/// positions, for the fuzzer to mutate.
fn seed_batch() -> Vec<u8> {
    let mut batch = FeatureBatch::new();
    batch
        .push_row_at(1.0, &[1, 2, 3], Some(&[0.5, 1.0, 2.0]), Some(10), 100)
        .unwrap();
    batch.push_row(0.0, &[4], None).unwrap();
    batch.push_row_at(1.0, &[], None, None, 7).unwrap();
    let layout = batch.batch_layout().unwrap();
    let mut words = vec![0u64; layout.total_len().div_ceil(8)];
    let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).unwrap();
    batch.write_to(&mut writer).unwrap();
    bytemuck::cast_slice::<u64, u8>(&words)[..layout.total_len()].to_vec()
}

#[test]
fn feature_batches_from_bytes() {
    let seed = seed_batch();
    check!()
        .with_type::<(Vec<u8>, Vec<(u16, u8)>)>()
        .for_each(|(bytes, edits)| {
            // The bytes raw, and a valid batch with a few bytes changed, so
            // the fuzzer reaches the columns (random bytes are rarely an
            // Arrow stream).
            let mut guided = seed.clone();
            for &(at, xor) in edits {
                let at = usize::from(at) % guided.len();
                guided[at] ^= xor;
            }
            for input in [&bytes[..], &guided[..]] {
                let buffer = aligned(input);
                alloc_meter::assert_bounded(input.len(), SLACK, || {
                    if let Ok(rb) = read_record_batch(buffer.clone()) {
                        if let Ok(batch) = FeatureBatchRef::from_record_batch(&rb) {
                            read_rows(&batch);
                        }
                    }
                });
            }
        });
}

#[test]
fn feature_batches_round_trip() {
    check!()
        .with_type::<Vec<(f32, Vec<u64>, bool, Option<(Option<i64>, u64)>)>>()
        .for_each(|rows| {
            let mut batch = FeatureBatch::new();
            for (label, ids, valued, at) in rows {
                let values: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
                let values = valued.then_some(&values[..]);
                match at {
                    None => batch.push_row(*label, ids, values),
                    Some((time, position)) => {
                        batch.push_row_at(*label, ids, values, *time, *position)
                    }
                }
                .expect("a row fits");
            }
            let rb = batch.to_record_batch().expect("a batch lays out");
            let got = FeatureBatchRef::from_record_batch(&rb).expect("a written batch reads");
            assert_eq!(got.ids(), batch.ids());
            assert_eq!(got.offsets(), batch.offsets());
            let bits = |xs: &[f32]| xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got.labels()), bits(batch.labels()));
            assert_eq!(got.values().map(bits), batch.values().map(bits));
            assert_eq!(got.times(), batch.times());
            assert_eq!(got.positions(), batch.positions());
        });
}
