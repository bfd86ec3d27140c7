//! What the Arrow forms of the training messages share
//! ([`TrainBatchFormat`](super::micro_batch::TrainBatchFormat),
//! [`PushFormat`](super::push::PushFormat),
//! [`DeltaFormat`](super::delta::DeltaFormat)): one message per channel
//! batch, a `key: UInt64` and a `Float32` column read in place, and the
//! message's header as numbers in the schema metadata.

use crate::stream::columnar::ColumnarError;
use crate::stream::failure::StageError;
use crate::stream::operator::EventTime;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use braid::store::arrow_buffer::ScalarBuffer;
use braid::store::batch::{BatchLayout, BatchWriter, ColumnSpec, Primitive, ValuesMut};
use std::collections::HashMap;

/// The name of the key column.
pub const KEY_COLUMN: &str = "key";

/// A [`ColumnarError::Invalid`] saying `e`.
pub fn invalid(e: impl std::fmt::Display) -> ColumnarError {
    ColumnarError::Invalid(e.to_string())
}

/// A [`StageError`] for a batch that is not of the format, saying `e`.
pub fn refused(e: impl std::fmt::Display) -> StageError {
    StageError::from(invalid(e))
}

/// The one message of a channel batch (a training stream sends each at
/// once, `batch_records(1)`); `what` names the message in the error.
pub fn single<'r, T>(
    records: &'r [(T, Option<EventTime>)],
    what: &str,
) -> Result<&'r T, ColumnarError> {
    match records {
        [(message, _)] => Ok(message),
        _ => Err(invalid(format!(
            "a channel batch of {what}s holds one {what}, not {}",
            records.len()
        ))),
    }
}

/// Schema metadata of `header`'s numbers under their keys.
pub fn metadata<'k>(header: impl IntoIterator<Item = (&'k str, u64)>) -> HashMap<String, String> {
    header
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The number under `key` in `batch`'s schema metadata.
pub fn number(batch: &RecordBatch, key: &str) -> Result<u64, StageError> {
    batch
        .schema_ref()
        .metadata()
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| refused(format!("a batch without its {key}")))
}

/// The layout of `keys.len()` rows of a key and a `value_column`, with
/// `metadata` on the schema; `what` names the message in the error. The
/// values split evenly over the keys (a model's parameters per key): one
/// per key is a `Float32` column, more a `List<Float32>` of as many per
/// key, whose items are the values in order.
pub fn key_value_layout(
    keys: &[u64],
    values: &[f32],
    value_column: &str,
    metadata: HashMap<String, String>,
    what: &str,
) -> Result<BatchLayout, ColumnarError> {
    let width = width_of(keys.len(), values.len()).ok_or_else(|| {
        invalid(format!(
            "a {what} of {} keys and {} values",
            keys.len(),
            values.len()
        ))
    })?;
    let value_spec = if width == 1 {
        ColumnSpec::primitive(value_column, Primitive::Float32)
    } else {
        ColumnSpec::list(value_column, Primitive::Float32, values.len())
    };
    Ok(BatchLayout::with_metadata(
        keys.len(),
        &[
            ColumnSpec::primitive(KEY_COLUMN, Primitive::UInt64),
            value_spec,
        ],
        metadata,
    )?)
}

/// Whether `values` values split evenly over `keys` keys (as many per
/// key: a model's parameters).
pub fn splits_evenly(keys: usize, values: usize) -> bool {
    width_of(keys, values).is_some()
}

/// How many values each key has, when `values` split evenly over `keys`
/// (a model's parameters per key; 1 for no keys).
fn width_of(keys: usize, values: usize) -> Option<usize> {
    match (keys, values) {
        (0, 0) => Some(1),
        (0, _) => None,
        (k, v) if v % k == 0 && v > 0 => Some(v / k),
        _ => None,
    }
}

/// Fills a writer planned by [`key_value_layout`].
pub fn fill_key_values(
    writer: &mut BatchWriter<'_>,
    keys: &[u64],
    values: &[f32],
) -> Result<(), ColumnarError> {
    let mut columns = writer.columns().into_iter();
    let (Some(k), Some(v)) = (columns.next(), columns.next()) else {
        return Err(ColumnarError::MissingColumn);
    };
    let width = width_of(keys.len(), values.len());
    let lists = v.offsets;
    match (k.values, v.values, width) {
        (ValuesMut::UInt64(k), ValuesMut::Float32(v), Some(width))
            if k.len() == keys.len()
                && v.len() == values.len()
                && (lists.is_empty() || lists.len() == keys.len() + 1) =>
        {
            k.copy_from_slice(keys);
            v.copy_from_slice(values);
            for (i, offset) in lists.iter_mut().enumerate() {
                *offset = i32::try_from(i * width).map_err(invalid)?;
            }
            Ok(())
        }
        _ => Err(invalid("the layout is not a key-value one")),
    }
}

/// The key and `value_column` columns of `batch`, in place.
pub fn key_values(
    batch: &RecordBatch,
    value_column: &str,
) -> Result<(ScalarBuffer<u64>, ScalarBuffer<f32>), StageError> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .filter(|c| c.null_count() == 0)
            .ok_or_else(|| refused(format!("a batch without a {name} column")))
    };
    let keys = column(KEY_COLUMN)?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| refused("keys are not UInt64"))?
        .values()
        .clone();
    let values = column(value_column)?;
    let not_floats = || refused(format!("{value_column} is not Float32 or a list of them"));
    let values = match values.as_list_opt::<i32>() {
        None => values
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(not_floats)?
            .values()
            .clone(),
        Some(lists) => {
            let items = lists
                .values()
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(not_floats)?
                .values()
                .clone();
            let offsets = lists.value_offsets();
            let width = width_of(keys.len(), items.len()).ok_or_else(|| {
                refused(format!("{} values for {} keys", items.len(), keys.len()))
            })?;
            let even = offsets
                .iter()
                .enumerate()
                .all(|(i, &o)| usize::try_from(o).ok() == Some(i * width));
            if !even {
                return Err(refused(format!(
                    "{value_column} does not hold {width} values per key"
                )));
            }
            items
        }
    };
    Ok((keys, values))
}
