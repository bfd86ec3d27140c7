//! Records that map to Arrow columns, so a channel between processes can
//! carry them as one record batch in the node's store, read in place.
//!
//! A record type opts in by implementing [`Columnar`]: it is provided for
//! the primitives (`i32`, `i64`, `u32`, `u64`, `f32`, `f64`), `String`,
//! `Vec` of a primitive, and tuples of up to four `Columnar` values
//! (flattened: `(u64, (String, f64))` is three columns). A stream marked
//! [`DataStream::columnar`](super::graph::DataStream::columnar) then sends
//! its batches between processes as Arrow record batches built directly in
//! the store: the sender writes each record's fields into the batch's
//! column buffers once, seals the object and sends only its reference; the
//! receiver reads the columns in place. Primitives reach the receiving
//! operator without a copy; a `String` or `Vec` is copied out of the batch
//! into the owned value the operator takes (counted as copied bytes).
//!
//! ```
//! use braid_actors::stream::columnar::{Columnar, RecordFormat, Records};
//!
//! // (word id, count), with event times.
//! let records: Records<(u64, i64)> = vec![((7, 1), Some(10)), ((9, 2), None)];
//! let format = RecordFormat::<(u64, i64)>::new();
//! let layout = format.layout(&records).unwrap();
//! let mut words = vec![0u64; layout.total_len().div_ceil(8)];
//! let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
//! format.write(&records, &layout, buf).unwrap();
//! let batch = braid::store::batch::read_record_batch(braid::store::arrow_buffer::Buffer::from_vec(words)).unwrap();
//! let mut back = Vec::new();
//! format.read(&batch, &mut |r, t| { back.push((r, t)); Ok(()) }).unwrap();
//! assert_eq!(back, records);
//! ```

use super::failure::{ChannelError, StageError};
use super::operator::EventTime;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{ArrayRef, RecordBatch};
use braid::store::batch::{
    BatchLayout, BatchWriter, ColumnMut, ColumnSpec, ColumnType, LayoutError, Primitive, ValuesMut,
};
use std::marker::PhantomData;

/// Records as a channel buffers them: each with its event time.
pub type Records<T> = Vec<(T, Option<EventTime>)>;

/// The name of the event-time column a channel batch ends with.
pub const EVENT_TIME_COLUMN: &str = "__event_time";

/// A batch's columns do not match the record type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ColumnarError {
    /// The batch has fewer columns than the type needs.
    #[error("the batch has too few columns for the record type")]
    MissingColumn,
    /// A column has another type than the record's field.
    #[error("column {index} is {found}, the record type needs {expected}")]
    WrongType {
        /// The column's index.
        index: usize,
        /// What the batch holds.
        found: String,
        /// What the type needs.
        expected: String,
    },
    /// The batch could not be laid out.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A value in a column of a type without nulls is null.
    #[error("column {0} holds a null, which its record type cannot")]
    Null(usize),
    /// The records do not fit their format, or a batch is not of the
    /// format (a format of one's own, [`Format`](super::channel::Format),
    /// says why).
    #[error("{0}")]
    Invalid(String),
}

impl From<ColumnarError> for StageError {
    fn from(e: ColumnarError) -> Self {
        StageError::Channel(ChannelError::Decode(e.to_string()))
    }
}

/// Columns as a reader takes them: the batch's arrays, in order, each
/// with its index.
pub type ColumnIter<'b> = std::iter::Enumerate<std::slice::Iter<'b, ArrayRef>>;

/// A value that is one or more Arrow columns of a record batch.
///
/// Implementations write their fields into the column buffers of a batch
/// being built ([`write`](Self::write)) and read them back row by row
/// ([`get`](Self::get)) from columns viewed in place.
pub trait Columnar: Sized + Send + 'static {
    /// How columns of this type are viewed while reading.
    type Reader<'b>;

    /// Appends this type's column types, in order.
    fn types(out: &mut Vec<ColumnType>);

    /// Appends, per column, the variable-length values of `records` in
    /// all (string bytes, list items; 0 for a primitive column).
    fn extents<'a, I>(records: I, out: &mut Vec<usize>)
    where
        I: Iterator<Item = &'a Self> + Clone,
        Self: 'a;

    /// Writes `records` into the next columns of `columns`.
    fn write<'a, 'c, I>(
        records: I,
        columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
    ) -> Result<(), ColumnarError>
    where
        I: Iterator<Item = &'a Self> + Clone,
        Self: 'a;

    /// Views the next columns of a batch as this type's.
    fn reader<'b>(columns: &mut ColumnIter<'b>) -> Result<Self::Reader<'b>, ColumnarError>;

    /// The value in row `row`, and the bytes copied to make it.
    fn get(reader: &Self::Reader<'_>, row: usize) -> (Self, usize);
}

fn next_column<'b>(
    columns: &mut ColumnIter<'b>,
    expected: ColumnType,
) -> Result<(usize, &'b ArrayRef), ColumnarError> {
    let (index, array) = columns.next().ok_or(ColumnarError::MissingColumn)?;
    let found = ColumnType::of(array.data_type());
    if found != Some(expected) {
        return Err(ColumnarError::WrongType {
            index,
            found: array.data_type().to_string(),
            expected: expected.data_type().to_string(),
        });
    }
    if array.null_count() > 0 {
        return Err(ColumnarError::Null(index));
    }
    Ok((index, array))
}

fn next_out<'c>(
    columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
) -> Result<ColumnMut<'c>, ColumnarError> {
    columns.next().ok_or(ColumnarError::MissingColumn)
}

/// A fixed-width element of a primitive or list column.
pub trait PrimitiveColumn: Copy + Send + 'static {
    /// Its element type.
    const PRIMITIVE: Primitive;
    /// The typed values of a column of this element, if it is one.
    fn slot<'v>(values: ValuesMut<'v>) -> Option<&'v mut [Self]>;
    /// The values of an array of this element, if it is one.
    fn values(array: &ArrayRef) -> Option<&[Self]>;
}

macro_rules! primitive_column {
    ($t:ty, $p:ident, $arrow:ty) => {
        impl PrimitiveColumn for $t {
            const PRIMITIVE: Primitive = Primitive::$p;
            fn slot<'v>(values: ValuesMut<'v>) -> Option<&'v mut [Self]> {
                match values {
                    ValuesMut::$p(v) => Some(v),
                    _ => None,
                }
            }
            fn values(array: &ArrayRef) -> Option<&[Self]> {
                array.as_primitive_opt::<$arrow>().map(|a| &a.values()[..])
            }
        }

        impl Columnar for $t {
            type Reader<'b> = &'b [$t];

            fn types(out: &mut Vec<ColumnType>) {
                out.push(ColumnType::Primitive(Primitive::$p));
            }

            fn extents<'a, I>(_records: I, out: &mut Vec<usize>)
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                out.push(0);
            }

            fn write<'a, 'c, I>(
                records: I,
                columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
            ) -> Result<(), ColumnarError>
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                let column = next_out(columns)?;
                let slots = <$t>::slot(column.values).ok_or(ColumnarError::MissingColumn)?;
                for (slot, value) in slots.iter_mut().zip(records) {
                    *slot = *value;
                }
                Ok(())
            }

            fn reader<'b>(columns: &mut ColumnIter<'b>) -> Result<&'b [$t], ColumnarError> {
                let (index, array) = next_column(columns, ColumnType::Primitive(Primitive::$p))?;
                <$t>::values(array).ok_or(ColumnarError::WrongType {
                    index,
                    found: array.data_type().to_string(),
                    expected: stringify!($p).into(),
                })
            }

            fn get(reader: &&[$t], row: usize) -> ($t, usize) {
                (reader.get(row).copied().unwrap_or_default(), 0)
            }
        }

        impl Columnar for Vec<$t> {
            type Reader<'b> = (&'b [i32], &'b [$t]);

            fn types(out: &mut Vec<ColumnType>) {
                out.push(ColumnType::List(Primitive::$p));
            }

            fn extents<'a, I>(records: I, out: &mut Vec<usize>)
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                out.push(records.map(Vec::len).sum());
            }

            fn write<'a, 'c, I>(
                records: I,
                columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
            ) -> Result<(), ColumnarError>
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                let column = next_out(columns)?;
                let items = <$t>::slot(column.values).ok_or(ColumnarError::MissingColumn)?;
                write_offsets(records.clone().map(Vec::len), column.offsets);
                let mut at = 0;
                for list in records {
                    items[at..at + list.len()].copy_from_slice(list);
                    at += list.len();
                }
                Ok(())
            }

            fn reader<'b>(columns: &mut ColumnIter<'b>) -> Result<Self::Reader<'b>, ColumnarError> {
                let (index, array) = next_column(columns, ColumnType::List(Primitive::$p))?;
                let wrong = || ColumnarError::WrongType {
                    index,
                    found: array.data_type().to_string(),
                    expected: stringify!($p).into(),
                };
                let lists = array.as_list_opt::<i32>().ok_or_else(wrong)?;
                let items = <$t>::values(lists.values()).ok_or_else(wrong)?;
                Ok((&lists.value_offsets()[..], items))
            }

            fn get(reader: &Self::Reader<'_>, row: usize) -> (Self, usize) {
                let items = span(reader.0, row)
                    .and_then(|r| reader.1.get(r))
                    .unwrap_or_default();
                (items.to_vec(), std::mem::size_of_val(items))
            }
        }
    };
}

primitive_column!(i32, Int32, Int32Type);
primitive_column!(i64, Int64, Int64Type);
primitive_column!(u32, UInt32, UInt32Type);
primitive_column!(u64, UInt64, UInt64Type);
primitive_column!(f32, Float32, Float32Type);
primitive_column!(f64, Float64, Float64Type);

/// Row `row`'s range in a values buffer, from validated offsets.
fn span(offsets: &[i32], row: usize) -> Option<std::ops::Range<usize>> {
    let a = usize::try_from(*offsets.get(row)?).ok()?;
    let b = usize::try_from(*offsets.get(row + 1)?).ok()?;
    (a <= b).then_some(a..b)
}

fn write_offsets(lengths: impl Iterator<Item = usize>, offsets: &mut [i32]) {
    let mut at = 0i32;
    let mut slots = offsets.iter_mut();
    if let Some(first) = slots.next() {
        *first = 0;
    }
    for (slot, len) in slots.zip(lengths) {
        // The layout refused more values than i32 offsets reach.
        at = at.saturating_add(i32::try_from(len).unwrap_or(i32::MAX));
        *slot = at;
    }
}

impl Columnar for String {
    type Reader<'b> = &'b arrow_array::StringArray;

    fn types(out: &mut Vec<ColumnType>) {
        out.push(ColumnType::Utf8);
    }

    fn extents<'a, I>(records: I, out: &mut Vec<usize>)
    where
        I: Iterator<Item = &'a Self> + Clone,
    {
        out.push(records.map(String::len).sum());
    }

    fn write<'a, 'c, I>(
        records: I,
        columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
    ) -> Result<(), ColumnarError>
    where
        I: Iterator<Item = &'a Self> + Clone,
    {
        let column = next_out(columns)?;
        let ValuesMut::Bytes(bytes) = column.values else {
            return Err(ColumnarError::MissingColumn);
        };
        write_offsets(records.clone().map(String::len), column.offsets);
        let mut at = 0;
        for s in records {
            bytes[at..at + s.len()].copy_from_slice(s.as_bytes());
            at += s.len();
        }
        Ok(())
    }

    fn reader<'b>(columns: &mut ColumnIter<'b>) -> Result<Self::Reader<'b>, ColumnarError> {
        let (index, array) = next_column(columns, ColumnType::Utf8)?;
        array
            .as_string_opt::<i32>()
            .ok_or_else(|| ColumnarError::WrongType {
                index,
                found: array.data_type().to_string(),
                expected: "Utf8".into(),
            })
    }

    fn get(reader: &Self::Reader<'_>, row: usize) -> (Self, usize) {
        use arrow_array::Array;
        if row >= reader.len() {
            return (String::new(), 0);
        }
        let s = reader.value(row);
        (s.to_owned(), s.len())
    }
}

macro_rules! tuple_columnar {
    ($($name:ident $index:tt),+) => {
        impl<$($name: Columnar),+> Columnar for ($($name,)+) {
            type Reader<'b> = ($($name::Reader<'b>,)+);

            fn types(out: &mut Vec<ColumnType>) {
                $($name::types(out);)+
            }

            fn extents<'a, I>(records: I, out: &mut Vec<usize>)
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                $($name::extents(records.clone().map(|r| &r.$index), out);)+
            }

            fn write<'a, 'c, I>(
                records: I,
                columns: &mut std::vec::IntoIter<ColumnMut<'c>>,
            ) -> Result<(), ColumnarError>
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                $($name::write(records.clone().map(|r| &r.$index), columns)?;)+
                Ok(())
            }

            fn reader<'b>(columns: &mut ColumnIter<'b>) -> Result<Self::Reader<'b>, ColumnarError> {
                Ok(($($name::reader(columns)?,)+))
            }

            fn get(reader: &Self::Reader<'_>, row: usize) -> (Self, usize) {
                let mut copied = 0;
                let value = ($({
                    let (v, c) = $name::get(&reader.$index, row);
                    copied += c;
                    v
                },)+);
                (value, copied)
            }
        }
    };
}

tuple_columnar!(A 0);
tuple_columnar!(A 0, B 1);
tuple_columnar!(A 0, B 1, C 2);
tuple_columnar!(A 0, B 1, C 2, D 3);

/// How a channel lays batches of `T` out as record batches and reads them
/// back: `T`'s columns, then a nullable `Int64` event-time column.
pub struct RecordFormat<T>(PhantomData<fn() -> T>);

impl<T> Default for RecordFormat<T> {
    fn default() -> Self {
        RecordFormat(PhantomData)
    }
}

impl<T: Columnar> RecordFormat<T> {
    /// The format of `T`.
    pub fn new() -> Self {
        RecordFormat(PhantomData)
    }

    /// Plans the record batch holding `records`.
    pub fn layout(&self, records: &[(T, Option<EventTime>)]) -> Result<BatchLayout, ColumnarError> {
        let mut types = Vec::new();
        T::types(&mut types);
        let mut extents = Vec::with_capacity(types.len());
        T::extents(records.iter().map(|r| &r.0), &mut extents);
        let mut specs: Vec<ColumnSpec> = types
            .iter()
            .zip(extents)
            .enumerate()
            .map(|(i, (&ty, values))| ColumnSpec {
                name: i.to_string(),
                ty,
                nullable: false,
                nulls: 0,
                values: if matches!(ty, ColumnType::Primitive(_)) {
                    0
                } else {
                    values
                },
            })
            .collect();
        let untimed = records.iter().filter(|r| r.1.is_none()).count();
        specs.push(ColumnSpec::primitive(EVENT_TIME_COLUMN, Primitive::Int64).with_nulls(untimed));
        Ok(BatchLayout::new(records.len(), &specs)?)
    }

    /// Writes `records` into `buf` as `layout` (from [`Self::layout`]) plans.
    pub fn write(
        &self,
        records: &[(T, Option<EventTime>)],
        layout: &BatchLayout,
        buf: &mut [u8],
    ) -> Result<(), ColumnarError> {
        let mut writer = BatchWriter::new(layout, buf)?;
        self.fill(records, &mut writer)?;
        Ok(writer.finish().map_err(LayoutError::from)?)
    }

    /// Writes `records` into a batch being built (planned by
    /// [`Self::layout`]).
    pub fn fill(
        &self,
        records: &[(T, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        let mut columns = writer.columns().into_iter();
        T::write(records.iter().map(|r| &r.0), &mut columns)?;
        let time = next_out(&mut columns)?;
        let ValuesMut::Int64(times) = time.values else {
            return Err(ColumnarError::MissingColumn);
        };
        let with_nulls = !time.validity.is_empty();
        for (i, (slot, (_, t))) in times.iter_mut().zip(records).enumerate() {
            *slot = t.unwrap_or(0);
            if with_nulls && t.is_some() {
                time.validity[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(())
    }

    /// Reads every record of `batch` in order into `push`; returns the
    /// bytes copied out of the batch (strings and lists).
    pub fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(T, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        use arrow_array::Array;
        let mut columns = batch.columns().iter().enumerate();
        let reader = T::reader(&mut columns)?;
        let (index, time) = columns.next().ok_or(ColumnarError::MissingColumn)?;
        let times =
            time.as_primitive_opt::<Int64Type>()
                .ok_or_else(|| ColumnarError::WrongType {
                    index,
                    found: time.data_type().to_string(),
                    expected: "Int64".into(),
                })?;
        let mut copied = 0;
        for row in 0..batch.num_rows() {
            let (value, c) = T::get(&reader, row);
            copied += c;
            let t = times.is_valid(row).then(|| times.value(row));
            push(value, t)?;
        }
        Ok(copied)
    }
}
