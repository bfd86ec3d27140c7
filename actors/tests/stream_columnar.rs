//! Columnar record formats: every supported record type round-trips
//! through an Arrow record batch laid out as a store object (event times
//! and empty values included), and a batch of the wrong shape is refused
//! with a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::store::arrow_buffer::Buffer;
use braid::store::batch::read_record_batch;
use braid_actors::stream::columnar::{Columnar, ColumnarError, RecordFormat, Records};
use proptest::prelude::*;

/// Writes `records` as one batch in an 8-aligned buffer (as the store
/// hands out), reads it back in place, and returns the records and the
/// bytes the reader copied.
fn round_trip<T: Columnar>(records: &Records<T>) -> (Records<T>, usize) {
    let batch = batch_of(records);
    assert_eq!(batch.num_rows(), records.len());
    let mut back = Vec::new();
    let copied = RecordFormat::<T>::new()
        .read(&batch, &mut |r, t| {
            back.push((r, t));
            Ok(())
        })
        .unwrap();
    (back, copied)
}

fn records<T: std::fmt::Debug>(
    value: impl Strategy<Value = T>,
) -> impl Strategy<Value = Records<T>> {
    prop::collection::vec((value, prop::option::of(any::<i64>())), 0..40)
}

fn text() -> impl Strategy<Value = String> {
    prop::string::string_regex("[a-zé中 ]{0,12}").unwrap()
}

proptest! {
    #[test]
    fn primitives_round_trip_without_copies(rs in records((any::<i32>(), any::<i64>(), any::<u32>(), any::<u64>()))) {
        let (back, copied) = round_trip(&rs);
        prop_assert_eq!(back, rs);
        prop_assert_eq!(copied, 0);
    }

    #[test]
    fn floats_round_trip_bit_for_bit(rs in records((any::<f32>(), any::<f64>()))) {
        let (back, _) = round_trip(&rs);
        prop_assert_eq!(back.len(), rs.len());
        for (((a, b), t), ((x, y), u)) in back.iter().zip(&rs) {
            prop_assert_eq!(a.to_bits(), x.to_bits());
            prop_assert_eq!(b.to_bits(), y.to_bits());
            prop_assert_eq!(t, u);
        }
    }

    #[test]
    fn strings_and_lists_round_trip_and_count_their_copies(
        rs in records((text(), (prop::collection::vec(any::<u64>(), 0..6), prop::collection::vec(any::<i32>(), 0..3))))
    ) {
        let (back, copied) = round_trip(&rs);
        let expected: usize = rs
            .iter()
            .map(|((s, (a, b)), _)| s.len() + 8 * a.len() + 4 * b.len())
            .sum();
        prop_assert_eq!(back, rs);
        prop_assert_eq!(copied, expected);
    }

    #[test]
    fn a_single_column_round_trips(rs in records(text())) {
        let (back, _) = round_trip(&rs);
        prop_assert_eq!(back, rs);
    }
}

/// `records` as one batch written into an 8-aligned buffer (as the store
/// hands out) and read back in place.
fn batch_of<T: Columnar>(records: &Records<T>) -> braid::RecordBatch {
    let format = RecordFormat::<T>::new();
    let layout = format.layout(records).unwrap();
    let mut words = vec![0u64; layout.total_len().div_ceil(8)];
    format
        .write(records, &layout, bytemuck::cast_slice_mut(&mut words))
        .unwrap();
    read_record_batch(Buffer::from_vec(words)).unwrap()
}

#[test]
fn a_batch_of_another_shape_is_refused_with_a_typed_error() {
    let records: Records<(u64, String)> = vec![((1, "a".into()), Some(3)), ((2, "b".into()), None)];
    let batch = batch_of(&records);
    let error = RecordFormat::<(u64, u64)>::new()
        .read(&batch, &mut |_, _| Ok(()))
        .unwrap_err();
    let expected = ColumnarError::WrongType {
        index: 1,
        found: "Utf8".into(),
        expected: "UInt64".into(),
    };
    assert!(error.to_string().contains(&expected.to_string()), "{error}");
    let error = RecordFormat::<(u64, String, u64, u64)>::new()
        .read(&batch, &mut |_, _| Ok(()))
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&ColumnarError::MissingColumn.to_string())
            || error.to_string().contains("column 2"),
        "{error}"
    );
}
