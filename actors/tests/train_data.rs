//! Feature data: gen_ctr and Criteo parsing, feature batches as Arrow
//! record batches, synthetic stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufReader, Cursor};

use std::sync::Arc;

use braid::store::arrow_array::cast::AsArray;
use braid::store::arrow_array::types::{
    ArrowPrimitiveType, Float32Type, Int64Type, UInt32Type, UInt64Type,
};
use braid::store::arrow_array::{
    Array, ArrayRef, Float32Array, Float64Array, Int32Array, ListArray, PrimitiveArray,
    RecordBatch, UInt64Array,
};
use braid::store::arrow_buffer::{Buffer, NullBuffer, OffsetBuffer};
use braid::store::arrow_schema::{DataType, Field, Schema};
use braid::store::batch::{read_record_batch, BatchWriter};
use braid_actors::train::data::{
    CriteoConfig, CriteoParser, DataError, FeatureBatch, FeatureBatchRef, GenCtrParser, LineError,
    MissingPolicy, SyntheticConfig, SyntheticStream, EVENT_TIME_COLUMN, IDS_COLUMN, LABEL_COLUMN,
    POSITION_COLUMN, VALUES_COLUMN,
};
use proptest::prelude::*;

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const BITS: u32 = 20;
const MASK: u64 = (1 << BITS) - 1;

fn int_id(field: u64, bucket: u32) -> u64 {
    splitmix((field << 32) | bucket as u64) & MASK
}

fn cat_id(cat: u32, value: &str) -> u64 {
    let mut bytes = (13 + cat).to_le_bytes().to_vec();
    bytes.extend_from_slice(value.as_bytes());
    splitmix(fnv(&bytes)) & MASK
}

fn rows_of(batch: &FeatureBatch) -> Vec<(f32, Vec<u64>)> {
    batch.iter().map(|(l, ids, _)| (l, ids.to_vec())).collect()
}

#[test]
fn gen_ctr_rows_and_malformed_lines() {
    let input = "1 5 7 9\n\
                 0 3\r\n\
                 \n\
                 2 5 6\n\
                 1 5 x 7\n\
                 yes 1\n\
                 \t  \n\
                 1\n\
                 0   11\t12  \n\
                 1 18446744073709551616\n\
                 0 18446744073709551615";
    let mut parser = GenCtrParser::new();
    let mut batch = FeatureBatch::new();
    let stats = parser
        .read_batch(&mut Cursor::new(input), &mut batch, 100)
        .unwrap();
    assert_eq!(stats.rows, 5);
    assert_eq!(stats.skipped, 6);
    assert!(stats.eof);
    let first = stats.first_skip.unwrap();
    assert_eq!((first.line, first.reason), (3, LineError::Empty));
    assert_eq!(
        rows_of(&batch),
        vec![
            (1.0, vec![5, 7, 9]),
            (0.0, vec![3]),
            (1.0, vec![]),
            (0.0, vec![11, 12]),
            (0.0, vec![u64::MAX]),
        ]
    );
    assert_eq!(batch.offsets(), &[0, 3, 4, 4, 6, 7]);
    assert_eq!(batch.values(), None);
    assert_eq!(batch.len_ids(), 7);
    assert_eq!(
        (parser.lines(), parser.rows(), parser.skipped()),
        (11, 5, 6)
    );
    assert_eq!(parser.bytes(), input.len() as u64);
}

#[test]
fn gen_ctr_skip_reasons_and_bits() {
    let mut parser = GenCtrParser::with_bits(4).unwrap();
    let mut batch = FeatureBatch::new();
    let mut reasons = Vec::new();
    for line in ["2 1", "1 1 z", "1 15 16", "", "0 15"] {
        let stats = parser
            .read_batch(&mut Cursor::new(line), &mut batch, 10)
            .unwrap();
        reasons.push(stats.first_skip.map(|s| s.reason));
    }
    assert_eq!(
        reasons,
        vec![
            Some(LineError::BadLabel),
            Some(LineError::BadId { index: 1 }),
            Some(LineError::IdOutOfRange { index: 1 }),
            None,
            None,
        ]
    );
    assert_eq!(rows_of(&batch), vec![(0.0, vec![15])]);
    assert!(GenCtrParser::with_bits(0).is_err());
    assert!(GenCtrParser::with_bits(65).is_err());
}

#[test]
fn gen_ctr_streams_in_chunks() {
    let text: String = (0..25)
        .map(|i| format!("{} {} {}\n", i % 2, i, i + 100))
        .collect();
    let mut reader = BufReader::with_capacity(7, Cursor::new(text.into_bytes()));
    let mut parser = GenCtrParser::new();
    let mut batch = FeatureBatch::new();
    let mut all = Vec::new();
    let mut calls = 0;
    loop {
        batch.clear();
        let stats = parser.read_batch(&mut reader, &mut batch, 10).unwrap();
        calls += 1;
        assert_eq!(stats.rows, batch.rows());
        all.extend(rows_of(&batch));
        if stats.eof {
            break;
        }
        assert_eq!(stats.rows, 10);
    }
    assert_eq!(calls, 3);
    let expected: Vec<_> = (0..25u64)
        .map(|i| ((i % 2) as f32, vec![i, i + 100]))
        .collect();
    assert_eq!(all, expected);
    let stats = parser.read_batch(&mut reader, &mut batch, 0).unwrap();
    assert_eq!((stats.rows, stats.eof), (0, false));
}

fn criteo_line(label: &str, ints: [&str; 13], cats: [&str; 26]) -> String {
    let mut cols = vec![label];
    cols.extend(ints);
    cols.extend(cats);
    cols.join("\t")
}

const INTS: [&str; 13] = [
    "5",
    "0",
    "-3",
    "",
    "1",
    "2",
    "100",
    "",
    "-2000",
    "3",
    "",
    "7",
    "12345678901",
];
const CATS: [&str; 26] = [
    "68fd1e64", "", "0b153874", "a73ee510", "", "", "b2cb9c98", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "3a171ecb",
];

fn expected_criteo_ids(missing: bool) -> Vec<u64> {
    let buckets: [Option<u32>; 13] = [
        Some(2),
        Some(0x8000_0000),
        Some(0x8000_0003),
        None,
        Some(0),
        Some(0),
        Some(21),
        None,
        Some(0x8000_0000 | 1000),
        Some(1),
        None,
        Some(3),
        Some(539),
    ];
    let mut ids = Vec::new();
    for (f, b) in buckets.iter().enumerate() {
        match b {
            Some(b) => ids.push(int_id(f as u64, *b)),
            None if missing => ids.push(int_id(f as u64, u32::MAX)),
            None => {}
        }
    }
    for (c, v) in CATS.iter().enumerate() {
        if !v.is_empty() || missing {
            ids.push(cat_id(c as u32, v));
        }
    }
    ids
}

#[test]
fn criteo_bucket_constants_match_ln_squared() {
    for (v, b) in [
        (5f64, 2),
        (100.0, 21),
        (3.0, 1),
        (7.0, 3),
        (12345678901.0, 539),
    ] {
        assert_eq!((v.ln() * v.ln()).floor() as u32, b, "v = {v}");
    }
}

#[test]
fn criteo_valid_lines_hash_as_documented() {
    let input = format!(
        "{}\n{}\r\n",
        criteo_line("1", INTS, CATS),
        criteo_line("0", [""; 13], [""; 26])
    );
    let mut parser = CriteoParser::new(CriteoConfig {
        bits: BITS,
        missing: MissingPolicy::Omit,
    })
    .unwrap();
    let mut batch = FeatureBatch::new();
    let stats = parser
        .read_batch(&mut Cursor::new(&input), &mut batch, 10)
        .unwrap();
    assert_eq!((stats.rows, stats.skipped, stats.eof), (2, 0, true));
    assert_eq!(
        rows_of(&batch),
        vec![(1.0, expected_criteo_ids(false)), (0.0, vec![])]
    );
    assert_eq!(batch.row(0).1.len(), 10 + 5);

    let mut parser = CriteoParser::new(CriteoConfig {
        bits: BITS,
        missing: MissingPolicy::Feature,
    })
    .unwrap();
    let mut batch = FeatureBatch::new();
    parser
        .read_batch(&mut Cursor::new(&input), &mut batch, 10)
        .unwrap();
    assert_eq!(batch.row(0).1, expected_criteo_ids(true).as_slice());
    assert_eq!(batch.row(0).1.len(), 39);
    let all_missing: Vec<u64> = (0..13)
        .map(|f| int_id(f, u32::MAX))
        .chain((0..26).map(|c| cat_id(c, "")))
        .collect();
    assert_eq!(batch.row(1).1, all_missing.as_slice());
    assert!(batch.ids().iter().all(|&id| id <= MASK));
}

#[test]
fn criteo_malformed_lines_are_skipped_and_reported() {
    let good = criteo_line("0", INTS, CATS);
    let mut short = CATS.to_vec();
    short.pop();
    let too_few = format!("1\t{}\t{}", INTS.join("\t"), short.join("\t"));
    let too_many = format!("{good}\t");
    let bad_label = criteo_line("2", INTS, CATS);
    let empty_label = criteo_line("", INTS, CATS);
    let mut ints = INTS;
    ints[4] = "abc";
    let bad_int = criteo_line("1", ints, CATS);
    ints[4] = "1.5";
    let frac_int = criteo_line("1", ints, CATS);
    ints[4] = "99999999999999999999";
    let huge_int = criteo_line("1", ints, CATS);
    let space_sep = good.replace('\t', " ");
    let lines = [
        too_few.as_str(),
        good.as_str(),
        too_many.as_str(),
        bad_label.as_str(),
        "",
        empty_label.as_str(),
        bad_int.as_str(),
        frac_int.as_str(),
        huge_int.as_str(),
        space_sep.as_str(),
        good.as_str(),
    ];
    let mut parser = CriteoParser::new(CriteoConfig {
        bits: BITS,
        missing: MissingPolicy::Omit,
    })
    .unwrap();
    let mut batch = FeatureBatch::new();
    let mut reasons = Vec::new();
    for line in lines {
        let stats = parser
            .read_batch(&mut Cursor::new(format!("{line}\n")), &mut batch, 10)
            .unwrap();
        assert_eq!(stats.rows + stats.skipped, 1, "{line:?}");
        if let Some(s) = stats.first_skip {
            reasons.push(s.reason);
        }
    }
    assert_eq!(
        reasons,
        vec![
            LineError::ColumnCount {
                expected: 40,
                found: 39
            },
            LineError::ColumnCount {
                expected: 40,
                found: 41
            },
            LineError::BadLabel,
            LineError::Empty,
            LineError::BadLabel,
            LineError::BadInteger { field: 4 },
            LineError::BadInteger { field: 4 },
            LineError::BadInteger { field: 4 },
            LineError::ColumnCount {
                expected: 40,
                found: 1
            },
        ]
    );
    assert_eq!(
        (parser.rows(), parser.skipped(), parser.lines()),
        (2, 9, 11)
    );
    assert_eq!(batch.rows(), 2);
    assert_eq!(batch.row(1).1, expected_criteo_ids(false).as_slice());
    assert_eq!(
        LineError::BadInteger { field: 4 }.to_string(),
        "integer feature I5 is not a decimal integer"
    );

    let all = lines.join("\n");
    let mut parser = CriteoParser::new(CriteoConfig::default()).unwrap();
    let mut batch = FeatureBatch::new();
    let stats = parser
        .read_batch(&mut Cursor::new(all), &mut batch, 1)
        .unwrap();
    assert_eq!((stats.rows, stats.skipped), (1, 1));
    assert_eq!(stats.first_skip.map(|s| s.line), Some(1));
    assert!(CriteoParser::new(CriteoConfig {
        bits: 0,
        missing: MissingPolicy::Omit
    })
    .is_err());
}

#[test]
fn push_row_values_and_clear() {
    let mut b = FeatureBatch::new();
    assert!(b.is_empty());
    assert_eq!(b.offsets(), &[0]);
    b.push_row(1.0, &[1, 2], None).unwrap();
    b.push_row(0.0, &[3], Some(&[0.5])).unwrap();
    b.push_row(1.0, &[4, 5], None).unwrap();
    assert_eq!(b.values(), Some(&[1.0, 1.0, 0.5, 1.0, 1.0][..]));
    assert_eq!(b.row(1), (0.0, &[3u64][..], Some(&[0.5f32][..])));
    assert!(matches!(
        b.push_row(0.0, &[1, 2], Some(&[1.0])),
        Err(DataError::LengthMismatch { .. })
    ));
    assert_eq!(b.rows(), 3);
    b.clear();
    assert_eq!(b, FeatureBatch::new());
    assert!(FeatureBatch::from_parts(vec![1.0], vec![0, 2], vec![1, 2], None).is_ok());
    assert!(FeatureBatch::from_parts(vec![1.0], vec![0, 3], vec![1, 2], None).is_err());
    assert!(FeatureBatch::from_parts(vec![1.0], vec![1, 2], vec![1, 2], None).is_err());
    assert!(FeatureBatch::from_parts(vec![1.0, 0.0], vec![0, 2, 1], vec![1], None).is_err());
    assert!(FeatureBatch::from_parts(vec![1.0], vec![0, 1], vec![1], Some(vec![])).is_err());
}

/// How a row of [`arb_batch`] is pushed.
#[derive(Debug, Clone)]
enum Push {
    /// `push_row`: no event time, the next position.
    Plain,
    /// `push_row_at` with this event time and position.
    At(Option<i64>, u64),
}

fn arb_batch() -> impl Strategy<Value = FeatureBatch> {
    let push = prop_oneof![
        Just(Push::Plain),
        (proptest::option::of(any::<i64>()), any::<u64>()).prop_map(|(t, p)| Push::At(t, p)),
    ];
    let row = (
        prop_oneof![Just(0.0f32), Just(1.0f32), -10.0f32..10.0],
        prop::collection::vec(any::<u64>(), 0..6),
        push,
    );
    (
        prop::collection::vec(row, 0..20),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(|(rows, with_values, salt)| {
            let mut b = FeatureBatch::new();
            for (k, (label, ids, push)) in rows.iter().enumerate() {
                let values: Vec<f32> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, _)| ((salt as usize + k * 7 + i) % 13) as f32 * 0.25)
                    .collect();
                let values = with_values.then_some(values.as_slice());
                match push {
                    Push::Plain => b.push_row(*label, ids, values).unwrap(),
                    Push::At(t, p) => b.push_row_at(*label, ids, values, *t, *p).unwrap(),
                }
            }
            b
        })
}

/// What a gen_ctr line parses to, by the plain definition: whitespace
/// tokens, a 0/1 label, then decimal u64 ids below `2^bits`.
fn gen_ctr_reference(line: &str, bits: u32) -> Option<(f32, Vec<u64>)> {
    let mut tokens = line.split_ascii_whitespace();
    let label = match tokens.next()? {
        "0" => 0.0,
        "1" => 1.0,
        _ => return None,
    };
    let mut ids = Vec::new();
    for t in tokens {
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let id: u64 = t.parse().ok()?;
        if bits < 64 && id >= 1u64 << bits {
            return None;
        }
        ids.push(id);
    }
    Some((label, ids))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gen_ctr_lines_parse_as_the_reference_does(
        lines in prop::collection::vec(
            prop_oneof![
                "[01] ( {1,2}[0-9]{1,7}){0,6}",
                "[01x]?[ \t]{0,2}([0-9]{1,22}[ \t]?){0,4}[a-z-]?",
            ],
            1..20,
        ),
        bits in prop_oneof![Just(20u32), Just(64u32)],
        buffer in 1usize..48,
    ) {
        let text = lines.join("\n");
        let mut parser = GenCtrParser::with_bits(bits).unwrap();
        let mut batch = FeatureBatch::new();
        parser.read_batch(&mut text.as_bytes(), &mut batch, 1000).unwrap();
        // Lines that run past the reader's buffer parse the same.
        let mut small = GenCtrParser::with_bits(bits).unwrap();
        let mut small_batch = FeatureBatch::new();
        let mut reader = BufReader::with_capacity(buffer, text.as_bytes());
        small.read_batch(&mut reader, &mut small_batch, 1000).unwrap();
        prop_assert_eq!(&small_batch, &batch);
        prop_assert_eq!((small.skipped(), small.bytes()), (parser.skipped(), parser.bytes()));
        prop_assert_eq!(parser.bytes(), text.len() as u64);
        let expected: Vec<(f32, Vec<u64>)> =
            lines.iter().filter_map(|l| gen_ctr_reference(l, bits)).collect();
        let got: Vec<(f32, Vec<u64>)> =
            batch.iter().map(|(y, ids, _)| (y, ids.to_vec())).collect();
        prop_assert_eq!(got, expected);
        // An empty last line is no line at all.
        let read = lines.len() - usize::from(lines.last().is_some_and(|l| l.is_empty()));
        prop_assert_eq!(parser.skipped(), (read - batch.rows()) as u64);
    }

    #[test]
    fn record_batch_round_trip(b in arb_batch()) {
        let rb = b.to_record_batch().unwrap();
        let names: Vec<&str> = rb.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        let mut expected = vec![LABEL_COLUMN, IDS_COLUMN];
        if b.values().is_some() {
            expected.push(VALUES_COLUMN);
        }
        expected.extend([EVENT_TIME_COLUMN, POSITION_COLUMN]);
        prop_assert_eq!(names, expected);
        prop_assert_eq!(rb.num_rows(), b.rows());
        let view = FeatureBatchRef::from_record_batch(&rb).unwrap();
        prop_assert_eq!(view, b.view());
        prop_assert_eq!(view.to_batch(), b.clone());
        prop_assert_eq!(view.times().iter().collect::<Vec<_>>(), b.times().iter().collect::<Vec<_>>());
        prop_assert_eq!(view.positions(), b.positions());
        for (i, row) in view.iter().enumerate() {
            prop_assert_eq!(row, b.row(i));
        }
        assert_in_place(&rb, &view);
    }

    #[test]
    fn write_to_fills_a_writer_in_place(b in arb_batch(), extra in 0usize..100) {
        let layout = b.batch_layout().unwrap();
        // A store object: 64-byte aligned, rounded up.
        let mut words = vec![0xdead_beef_u64; (layout.total_len() + extra).div_ceil(8) + 8];
        let skip = (64 - (words.as_ptr() as usize % 64)) % 64 / 8;
        let object: &mut [u8] = bytemuck::cast_slice_mut(&mut words[skip..]);
        let mut writer = BatchWriter::new(&layout, object).unwrap();
        b.write_to(&mut writer).unwrap();
        let buffer = Buffer::from_vec(words).slice(skip * 8);
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let rb = read_record_batch(buffer.clone()).unwrap();
        let view = FeatureBatchRef::from_record_batch(&rb).unwrap();
        prop_assert_eq!(view.to_batch(), b.clone());
        let inside = |p: *const u8, len: usize| len == 0 || range.contains(&(p as usize));
        prop_assert!(inside(view.labels().as_ptr().cast(), view.rows()));
        prop_assert!(inside(view.ids().as_ptr().cast(), view.len_ids()));
        prop_assert!(inside(view.offsets().as_ptr().cast(), 1));
        prop_assert!(inside(view.positions().as_ptr().cast(), view.rows()));
        prop_assert!(inside(view.times().values().as_ptr().cast(), view.rows()));
        if let Some(values) = view.values() {
            prop_assert!(inside(values.as_ptr().cast(), values.len()));
        }
    }

    #[test]
    fn corrupted_bytes_never_panic(b in arb_batch(), pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let layout = b.batch_layout().unwrap();
        let mut words = vec![0u64; layout.total_len().div_ceil(8)];
        let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).unwrap();
        b.write_to(&mut writer).unwrap();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let pos = pos.index(bytes.len());
        bytes[pos] ^= xor;
        if let Ok(rb) = read_record_batch(Buffer::from_vec(words)) {
            if let Ok(view) = FeatureBatchRef::from_record_batch(&rb) {
                let n: usize = view.iter().map(|(_, ids, v)| {
                    assert_eq!(v.map(<[f32]>::len).unwrap_or(ids.len()), ids.len());
                    ids.len()
                }).sum();
                prop_assert_eq!(n, view.len_ids());
                prop_assert_eq!(view.times().len(), view.rows());
                prop_assert_eq!(view.positions().len(), view.rows());
            }
        }
    }

    #[test]
    fn corrupted_offsets_are_rejected(
        b in arb_batch().prop_filter("rows", |b| b.rows() > 0),
        k in any::<prop::sample::Index>(),
        bump in 1u32..1000,
    ) {
        let layout = b.batch_layout().unwrap();
        let mut words = vec![0u64; layout.total_len().div_ceil(8)];
        let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).unwrap();
        b.write_to(&mut writer).unwrap();
        // Where the ids column's offsets lie in the buffer.
        let at = {
            let buffer = Buffer::from_vec(words.clone());
            let rb = read_record_batch(buffer.clone()).unwrap();
            let view = FeatureBatchRef::from_record_batch(&rb).unwrap();
            view.offsets().as_ptr() as usize - buffer.as_ptr() as usize
        };
        let k = k.index(b.rows() + 1);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let at = at + 4 * k;
        let old = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let ids = b.len_ids() as u32;
        let new = if k == 0 { old + bump } else { ids + bump };
        bytes[at..at + 4].copy_from_slice(&new.to_le_bytes());
        // Arrow's validation refuses offsets past the items; none get to a
        // view.
        let read = read_record_batch(Buffer::from_vec(words));
        if let Ok(rb) = read {
            let err = FeatureBatchRef::from_record_batch(&rb).unwrap_err();
            prop_assert!(matches!(err, DataError::BadOffsets { .. }), "{:?}", err);
        }
    }
}

/// Asserts that every slice of `view` is the matching Arrow array's
/// buffer in `rb`, by address.
fn assert_in_place(rb: &RecordBatch, view: &FeatureBatchRef<'_>) {
    let col = |name: &str| rb.column_by_name(name).unwrap();
    let labels = col(LABEL_COLUMN).as_primitive::<Float32Type>();
    assert_eq!(view.labels().as_ptr(), labels.values().as_ptr());
    let ids = col(IDS_COLUMN).as_list::<i32>();
    assert_eq!(
        view.ids().as_ptr(),
        ids.values().as_primitive::<UInt64Type>().values().as_ptr()
    );
    assert_eq!(
        view.offsets().as_ptr() as usize,
        ids.value_offsets().as_ptr() as usize
    );
    if let Some(values) = view.values() {
        let list = col(VALUES_COLUMN).as_list::<i32>();
        let items = list.values().as_primitive::<Float32Type>();
        assert_eq!(values.as_ptr(), items.values().as_ptr());
    }
    let times = col(EVENT_TIME_COLUMN).as_primitive::<Int64Type>();
    assert_eq!(view.times().values().as_ptr(), times.values().as_ptr());
    let positions = col(POSITION_COLUMN).as_primitive::<UInt64Type>();
    assert_eq!(view.positions().as_ptr(), positions.values().as_ptr());
}

/// A sample batch with values, event times (one null) and positions.
fn sample() -> FeatureBatch {
    let mut b = FeatureBatch::new();
    b.push_row_at(1.0, &[1, 2, 3], Some(&[0.5, 1.5, 2.5]), Some(100), 40)
        .unwrap();
    b.push_row(0.0, &[4], None).unwrap();
    b.push_row_at(1.0, &[], None, Some(-7), 7).unwrap();
    b
}

/// `rb` with column `name` replaced by `column` (or removed).
fn with_column(rb: &RecordBatch, name: &str, column: Option<(Field, ArrayRef)>) -> RecordBatch {
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, array) in rb.schema_ref().fields().iter().zip(rb.columns()) {
        if field.name() == name {
            if let Some((f, a)) = column.clone() {
                fields.push(Arc::new(f));
                columns.push(a);
            }
        } else {
            fields.push(field.clone());
            columns.push(array.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

fn item_list<T: ArrowPrimitiveType>(
    offsets: Vec<i32>,
    items: Vec<T::Native>,
    nulls: Option<Vec<bool>>,
) -> ArrayRef {
    let item = Arc::new(Field::new("item", T::DATA_TYPE, false));
    Arc::new(
        ListArray::try_new(
            item,
            OffsetBuffer::new(offsets.into()),
            Arc::new(PrimitiveArray::<T>::from_iter_values(items)),
            nulls.map(NullBuffer::from),
        )
        .unwrap(),
    )
}

#[test]
fn event_times_and_positions() {
    let b = sample();
    assert_eq!(b.positions(), &[40, 41, 7]);
    assert_eq!(
        b.times().iter().collect::<Vec<_>>(),
        vec![Some(100), None, Some(-7)]
    );
    assert_eq!(b.times().null_count(), 1);
    let mut renumbered = b.clone();
    renumbered.set_positions(1000);
    assert_eq!(renumbered.positions(), &[1000, 1001, 1002]);
    let rb = b.to_record_batch().unwrap();
    let times = rb
        .column_by_name(EVENT_TIME_COLUMN)
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(times.null_count(), 1);
    assert!(times.is_null(1));
    assert_eq!((times.value(0), times.value(2)), (100, -7));
    let view = FeatureBatchRef::from_record_batch(&rb).unwrap();
    assert_eq!(view.to_batch(), b);
    // Rows pushed without a time or position: null times, 0, 1, 2, ...
    let mut plain = FeatureBatch::new();
    for i in 0..10 {
        plain.push_row(1.0, &[i], None).unwrap();
    }
    assert_eq!(plain.positions(), &(0..10).collect::<Vec<_>>()[..]);
    assert_eq!(plain.times().null_count(), 10);
    let from_parts =
        FeatureBatch::from_parts(vec![1.0, 0.0], vec![0, 1, 1], vec![5], None).unwrap();
    assert_eq!(from_parts.positions(), &[0, 1]);
    assert_eq!(
        from_parts.times().iter().collect::<Vec<_>>(),
        vec![None, None]
    );
    // A slice from row 1 (whose ids offsets still start at 0, as row 0
    // has no ids): its times' bitmap starts at bit 1, its ids run past
    // its last offset.
    let empty_first = {
        let mut e = FeatureBatch::new();
        e.push_row(1.0, &[], None).unwrap();
        for i in 0..12 {
            e.push_row_at(0.0, &[i], None, (i % 3 != 0).then_some(i as i64), 50 + i)
                .unwrap();
        }
        e
    };
    let rb = empty_first.to_record_batch().unwrap();
    let sliced = rb.slice(1, 11);
    let view = FeatureBatchRef::from_record_batch(&sliced).unwrap();
    assert_eq!(view.rows(), 11);
    assert_eq!(view.len_ids(), 11);
    assert_eq!(
        view.times().iter().collect::<Vec<_>>(),
        empty_first
            .times()
            .iter()
            .skip(1)
            .take(11)
            .collect::<Vec<_>>()
    );
    assert_eq!(view.positions(), &empty_first.positions()[1..12]);
    assert_eq!(view.ids(), &empty_first.ids()[..11]);
}

#[test]
fn schema_mismatches_are_typed_errors() {
    let b = sample();
    let rb = b.to_record_batch().unwrap();
    let check = |rb: &RecordBatch, what: &str, ok: &dyn Fn(&DataError) -> bool| {
        let err = FeatureBatchRef::from_record_batch(rb).unwrap_err();
        assert!(ok(&err), "{what}: {err:?}");
        assert!(!err.to_string().is_empty());
    };
    for name in [LABEL_COLUMN, IDS_COLUMN, EVENT_TIME_COLUMN, POSITION_COLUMN] {
        let missing = with_column(&rb, name, None);
        check(
            &missing,
            name,
            &|e| matches!(e, DataError::MissingColumn { column } if *column == name),
        );
        let err = FeatureBatchRef::from_record_batch(&missing).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
    // Without values the batch is one with every value 1.
    let no_values = with_column(&rb, VALUES_COLUMN, None);
    let view = FeatureBatchRef::from_record_batch(&no_values).unwrap();
    assert_eq!(view.values(), None);
    assert_eq!(view.ids(), b.ids());
    // Extra columns are ignored.
    let extra = {
        let mut fields: Vec<_> = rb.schema_ref().fields().iter().cloned().collect();
        let mut columns = rb.columns().to_vec();
        fields.push(Arc::new(Field::new("extra", DataType::Int32, false)));
        columns.push(Arc::new(Int32Array::from(vec![1, 2, 3])));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    };
    assert_eq!(
        FeatureBatchRef::from_record_batch(&extra)
            .unwrap()
            .to_batch(),
        b
    );

    let wrong_label = with_column(
        &rb,
        LABEL_COLUMN,
        Some((
            Field::new(LABEL_COLUMN, DataType::Float64, false),
            Arc::new(Float64Array::from(vec![1.0, 0.0, 1.0])),
        )),
    );
    check(&wrong_label, "label type", &|e| {
        matches!(
            e,
            DataError::WrongType {
                column: "label",
                expected: DataType::Float32,
                found: DataType::Float64
            }
        )
    });
    let null_label = with_column(
        &rb,
        LABEL_COLUMN,
        Some((
            Field::new(LABEL_COLUMN, DataType::Float32, true),
            Arc::new(Float32Array::from(vec![Some(1.0), None, Some(1.0)])),
        )),
    );
    check(&null_label, "null label", &|e| {
        matches!(
            e,
            DataError::Null {
                column: "label",
                nulls: 1
            }
        )
    });
    let u32_ids = item_list::<UInt32Type>(vec![0, 3, 4, 4], vec![1, 2, 3, 4], None);
    let wrong_ids = with_column(
        &rb,
        IDS_COLUMN,
        Some((
            Field::new(IDS_COLUMN, u32_ids.data_type().clone(), false),
            u32_ids,
        )),
    );
    check(&wrong_ids, "ids type", &|e| {
        matches!(e, DataError::WrongType { column: "ids", .. })
    });
    let not_a_list = with_column(
        &rb,
        IDS_COLUMN,
        Some((
            Field::new(IDS_COLUMN, DataType::UInt64, false),
            Arc::new(UInt64Array::from(vec![1, 2, 3])),
        )),
    );
    check(&not_a_list, "ids not a list", &|e| {
        matches!(e, DataError::WrongType { column: "ids", .. })
    });
    let null_ids = item_list::<UInt64Type>(
        vec![0, 3, 4, 4],
        vec![1, 2, 3, 4],
        Some(vec![true, false, true]),
    );
    let null_ids = with_column(
        &rb,
        IDS_COLUMN,
        Some((
            Field::new(IDS_COLUMN, null_ids.data_type().clone(), true),
            null_ids,
        )),
    );
    check(&null_ids, "null ids", &|e| {
        matches!(
            e,
            DataError::Null {
                column: "ids",
                nulls: 1
            }
        )
    });
    let other_offsets = item_list::<Float32Type>(vec![0, 2, 4, 4], vec![1.0; 4], None);
    let other_offsets = with_column(
        &rb,
        VALUES_COLUMN,
        Some((
            Field::new(VALUES_COLUMN, other_offsets.data_type().clone(), false),
            other_offsets,
        )),
    );
    check(&other_offsets, "value offsets", &|e| {
        matches!(e, DataError::ValueOffsets { index: 1 })
    });
    let wrong_time = with_column(
        &rb,
        EVENT_TIME_COLUMN,
        Some((
            Field::new(EVENT_TIME_COLUMN, DataType::UInt64, true),
            Arc::new(UInt64Array::from(vec![1, 2, 3])),
        )),
    );
    check(&wrong_time, "time type", &|e| {
        matches!(
            e,
            DataError::WrongType {
                column: "event_time",
                ..
            }
        )
    });
    let null_position = with_column(
        &rb,
        POSITION_COLUMN,
        Some((
            Field::new(POSITION_COLUMN, DataType::UInt64, true),
            Arc::new(UInt64Array::from(vec![Some(1), None, None])),
        )),
    );
    check(&null_position, "null position", &|e| {
        matches!(
            e,
            DataError::Null {
                column: "position",
                nulls: 2
            }
        )
    });
    // A slice that does not start at row 0 has offsets that do not start
    // at 0.
    check(&rb.slice(1, 2), "sliced", &|e| {
        matches!(e, DataError::BadOffsets { index: 0, .. })
    });
}

#[test]
fn a_writer_for_another_batch_is_refused() {
    let b = sample();
    let mut other = sample();
    other.push_row(1.0, &[9], None).unwrap();
    let layout = other.batch_layout().unwrap();
    let mut words = vec![0u64; layout.total_len().div_ceil(8)];
    let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).unwrap();
    assert!(matches!(
        b.write_to(&mut writer),
        Err(DataError::LayoutMismatch)
    ));
    let without_values = FeatureBatch::from_parts(vec![1.0], vec![0, 1], vec![1], None).unwrap();
    let with_values =
        FeatureBatch::from_parts(vec![1.0], vec![0, 1], vec![1], Some(vec![2.0])).unwrap();
    let layout = with_values.batch_layout().unwrap();
    let mut words = vec![0u64; layout.total_len().div_ceil(8)];
    let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).unwrap();
    assert!(matches!(
        without_values.write_to(&mut writer),
        Err(DataError::LayoutMismatch)
    ));
}

fn config(rows: u64, seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        rows,
        fields: 10,
        bits: 16,
        seed,
        bias: -2.0,
    }
}

fn drain(s: &mut SyntheticStream, chunk: usize) -> FeatureBatch {
    let mut all = FeatureBatch::new();
    let mut b = FeatureBatch::new();
    loop {
        b.clear();
        let n = s.fill(&mut b, chunk);
        assert_eq!(n, b.rows());
        if n == 0 {
            return all;
        }
        for (l, ids, _) in b.iter() {
            all.push_row(l, ids, None).unwrap();
        }
    }
}

#[test]
fn synthetic_is_deterministic_and_in_range() {
    let mut a = SyntheticStream::new(config(3000, 7)).unwrap();
    let mut b = SyntheticStream::new(config(3000, 7)).unwrap();
    let mut c = SyntheticStream::new(config(3000, 8)).unwrap();
    let (xa, xb, xc) = (drain(&mut a, 1000), drain(&mut b, 333), drain(&mut c, 1000));
    assert_eq!(xa, xb);
    assert_ne!(xa.labels(), xc.labels());
    assert_eq!(xa.rows(), 3000);
    assert_eq!(xa.len_ids(), 3000 * 10);
    assert!(xa.iter().all(|(_, ids, _)| ids.len() == 10));
    assert!(xa.ids().iter().all(|&id| id < 1 << 16));
    assert!(xa.labels().iter().all(|&l| l == 0.0 || l == 1.0));
    assert_eq!(a.position(), 3000);
    assert_eq!(a.remaining(), 0);
    let card = a.cardinalities();
    assert_eq!((card[0], card[9]), (10, 1_000_000));
    let row0: Vec<u64> = xa.row(0).1.to_vec();
    for (j, id) in row0.iter().enumerate() {
        let hit =
            (0..card[j].min(200_000)).any(|v| splitmix(((j as u64) << 32) | v) & 0xffff == *id);
        assert!(
            hit,
            "field {j}: id {id} is not splitmix64((j << 32) | v) & mask"
        );
    }
}

#[test]
fn synthetic_seek_replays_and_oracle() {
    let mut s = SyntheticStream::new(config(1000, 3)).unwrap();
    let mut first = FeatureBatch::new();
    let mut oracle = Vec::new();
    assert_eq!(s.fill_with_oracle(&mut first, 700, &mut oracle), 700);
    assert_eq!(s.fill(&mut first, 700), 300);
    assert_eq!(s.fill(&mut first, 700), 0);
    s.seek(250).unwrap();
    let mut again = FeatureBatch::new();
    let mut oracle2 = Vec::new();
    assert_eq!(s.fill_with_oracle(&mut again, 100, &mut oracle2), 100);
    assert_eq!(s.position(), 350);
    for i in 0..100 {
        assert_eq!(again.row(i), first.row(250 + i));
    }
    assert_eq!(oracle2, oracle[250..350]);
    assert_eq!(s.probability_at(260), Some(oracle[260]));
    assert_eq!(s.probability_at(1000), None);
    assert!(oracle.iter().all(|p| *p > 0.0 && *p < 1.0));
    assert!(matches!(
        s.seek(1001),
        Err(DataError::SeekOutOfRange {
            position: 1001,
            rows: 1000
        })
    ));
    s.seek(1000).unwrap();
    assert_eq!(s.fill(&mut again, 5), 0);
}

#[test]
fn synthetic_rejects_bad_config() {
    for cfg in [
        SyntheticConfig {
            fields: 0,
            ..SyntheticConfig::default()
        },
        SyntheticConfig {
            bits: 0,
            ..SyntheticConfig::default()
        },
        SyntheticConfig {
            bias: f64::NAN,
            ..SyntheticConfig::default()
        },
    ] {
        assert!(matches!(
            SyntheticStream::new(cfg),
            Err(DataError::InvalidConfig(_))
        ));
    }
    let one = SyntheticStream::new(SyntheticConfig {
        fields: 1,
        bits: 64,
        rows: 10,
        ..SyntheticConfig::default()
    })
    .unwrap();
    assert_eq!(one.cardinalities(), vec![10]);
}

#[test]
fn synthetic_click_rate_is_plausible() {
    let cfg = SyntheticConfig {
        rows: 20_000,
        ..SyntheticConfig::default()
    };
    let mut s = SyntheticStream::new(cfg).unwrap();
    let mut b = FeatureBatch::new();
    let mut oracle = Vec::new();
    s.fill_with_oracle(&mut b, 20_000, &mut oracle);
    let ctr = b.labels().iter().sum::<f32>() as f64 / 20_000.0;
    let mean_p = oracle.iter().sum::<f64>() / 20_000.0;
    assert!((0.05..0.40).contains(&ctr), "click rate {ctr}");
    assert!(
        (ctr - mean_p).abs() < 0.015,
        "ctr {ctr} vs oracle mean {mean_p}"
    );
    let spread = oracle.iter().map(|p| (p - mean_p).powi(2)).sum::<f64>() / 20_000.0;
    assert!(
        spread.sqrt() > 0.05,
        "oracle too flat: sd {}",
        spread.sqrt()
    );
}

#[test]
fn synthetic_drifts() {
    let rows = 100_000u64;
    let cfg = SyntheticConfig {
        rows,
        fields: 6,
        bits: 22,
        seed: 11,
        bias: -1.5,
    };
    let mut s = SyntheticStream::new(cfg).unwrap();
    let tenth = (rows / 10) as usize;
    let mut head = FeatureBatch::new();
    s.fill(&mut head, tenth);
    s.seek(rows - tenth as u64).unwrap();
    let mut tail = FeatureBatch::new();
    s.fill(&mut tail, tenth);
    let rates = |b: &FeatureBatch| {
        let mut m: HashMap<u64, (f64, f64)> = HashMap::new();
        for (l, ids, _) in b.iter() {
            for id in ids {
                let e = m.entry(*id).or_default();
                e.0 += l as f64;
                e.1 += 1.0;
            }
        }
        m
    };
    let (h, t) = (rates(&head), rates(&tail));
    let mut best = 0.0f64;
    for (id, (ch, nh)) in &h {
        let Some((ct, nt)) = t.get(id) else { continue };
        if *nh < 1000.0 || *nt < 1000.0 {
            continue;
        }
        let (ph, pt) = (ch / nh, ct / nt);
        let pool = (ch + ct) / (nh + nt);
        let se = (pool * (1.0 - pool) * (1.0 / nh + 1.0 / nt)).sqrt();
        best = best.max((ph - pt).abs() / se);
    }
    assert!(best > 5.0, "no popular feature drifted: best z = {best}");
}
