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
use braid_actors::train::data::{FeatureBatch, FeatureBatchRef, BATCH_HEADER_LEN};
use braid_actors::train::optimizer::{Model, OptimizerKind};
use braid_actors::train::ps::check_shard_snapshot;
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
fn aligned(bytes: &[u8]) -> (Vec<u64>, usize) {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    (words, bytes.len())
}

/// Reads every row of a batch that parsed, as a trainer would.
fn read_rows(batch: &FeatureBatchRef<'_>) {
    let mut ids = 0;
    for i in 0..batch.rows() {
        ids += batch.row(i).1.len();
    }
    assert_eq!(ids, batch.len_ids());
}

#[test]
fn feature_batches_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        // The same bytes raw, and behind a valid magic, version and CRC, so
        // the fuzzer reaches the columns (random bytes never pass the CRC).
        let mut guided = bytes.to_vec();
        guided.resize(guided.len().max(BATCH_HEADER_LEN), 0);
        guided[..8].copy_from_slice(b"BRDFEATS");
        guided[8..10].copy_from_slice(&1u16.to_le_bytes());
        guided[10] &= 1;
        guided[11] = 0;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&guided[0..12]);
        crc.update(&guided[16..32]);
        let crc = crc.finalize();
        guided[12..16].copy_from_slice(&crc.to_le_bytes());
        for input in [bytes, &guided[..]] {
            let (words, len) = aligned(input);
            let buf = &bytemuck::cast_slice::<u64, u8>(&words)[..len];
            alloc_meter::assert_bounded(len, SLACK, || {
                if let Ok(batch) = FeatureBatchRef::parse(buf) {
                    assert!(batch.encoded_len() <= len);
                    read_rows(&batch);
                }
            });
        }
    });
}

#[test]
fn feature_batches_round_trip() {
    check!()
        .with_type::<Vec<(f32, Vec<u64>, bool)>>()
        .for_each(|rows| {
            let mut batch = FeatureBatch::new();
            for (label, ids, valued) in rows {
                let values: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
                batch
                    .push_row(*label, ids, valued.then_some(&values[..]))
                    .expect("a row fits");
            }
            let mut bytes = Vec::new();
            batch.encode_into(&mut bytes);
            let (words, len) = aligned(&bytes);
            let buf = &bytemuck::cast_slice::<u64, u8>(&words)[..len];
            let got = FeatureBatchRef::parse(buf).expect("an encoded batch parses");
            assert_eq!(got.encoded_len(), bytes.len());
            assert_eq!(got.ids(), batch.ids());
            assert_eq!(got.offsets(), batch.offsets());
            let bits = |xs: &[f32]| xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got.labels()), bits(batch.labels()));
            assert_eq!(got.values().map(bits), batch.values().map(bits));
        });
}
