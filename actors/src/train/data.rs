//! Feature data for online click-through learning.
//!
//! * [`FeatureBatch`]: columnar rows (labels, row offsets, feature ids,
//!   optional values, and per row an event time and a stream position).
//!   Outside one process a feature batch is an Arrow record batch:
//!   [`FeatureBatch::write_to`] fills one's columns in place (in a store
//!   object, say) and [`FeatureBatchRef::from_record_batch`] views one's
//!   columns in place, without copying.
//! * [`GenCtrParser`] and [`CriteoParser`]: streaming line parsers that fill
//!   a batch from any [`BufRead`], skipping and counting malformed lines.
//! * [`SyntheticStream`]: a deterministic, seekable click stream with drift,
//!   so demos and tests need no data file.
//!
//! Rows carry only their own features: no parser or generator adds a bias
//! feature, that is the learner's business.
//!
//! # Feature batches in Arrow
//!
//! A feature batch is an Arrow record batch, laid out by
//! [`braid::store::batch`], with these columns in this order:
//!
//! | column                  | Arrow type      | nulls | holds                                  |
//! |-------------------------|-----------------|-------|----------------------------------------|
//! | [`LABEL_COLUMN`]        | `Float32`       | no    | the row's label                        |
//! | [`IDS_COLUMN`]          | `List<UInt64>`  | no    | the row's feature ids                  |
//! | [`VALUES_COLUMN`]       | `List<Float32>` | no    | the ids' values, same offsets as `ids` |
//! | [`EVENT_TIME_COLUMN`]   | `Int64`         | yes   | the row's [`EventTime`], null if none  |
//! | [`POSITION_COLUMN`]     | `UInt64`        | no    | the row's offset in its source stream  |
//!
//! The `values` column is present only when the batch has values (without
//! it every value is 1). [`FeatureBatch::batch_layout`] plans such a batch,
//! [`FeatureBatch::write_to`] fills a [`BatchWriter`]'s columns in place,
//! and [`FeatureBatch::to_record_batch`] does both in an owned buffer.
//!
//! [`FeatureBatchRef::from_record_batch`] finds the columns by name (others
//! are ignored) and borrows them in place: labels, ids, values, event times
//! and positions are the Arrow arrays' value buffers, and the row offsets
//! are the `ids` list's `i32` offsets reinterpreted as `u32` (Arrow
//! validated them non-negative and non-decreasing). A batch read from a
//! store object with [`read_record_batch`] is thus trained on where it
//! lies. A batch that does not have this schema (a column missing or of
//! another type, a null label, id, value or position, offsets that do not
//! start at 0 or differ between `ids` and `values`) is a [`DataError`],
//! never a panic.
//!
//! # Event times and positions
//!
//! Every row has an event time, possibly none, and a position.
//! [`FeatureBatch::push_row`] appends a row without an event time whose
//! position is the previous row's plus one, or 0 for a batch's first row:
//! a batch built only with `push_row` (as the parsers and the synthetic
//! stream build theirs) numbers its rows 0, 1, 2, …, their index in the
//! batch. [`FeatureBatch::push_row_at`] appends a row with a given event
//! time and position (later `push_row`s count on from it), and
//! [`FeatureBatch::set_positions`] renumbers every row from a first
//! position. [`FeatureBatch::from_parts`] gives rows no event time and
//! their index as position.
//!
//! # Feature hashing
//!
//! [`splitmix64`] is the finalizer of Steele et al.'s SplitMix64 generator
//! (`z += 0x9E3779B97F4A7C15`, then two xor-shift-multiply rounds);
//! [`fnv1a64`] is 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime
//! `0x100000001b3`). Both are fixed, so ids are reproducible across processes
//! and machines. Ids are masked to `bits` low bits, i.e. `< 2^bits`.

use std::f64::consts::FRAC_PI_2;
use std::io::BufRead;

use arrow_array::cast::AsArray;
use arrow_array::types::{ArrowPrimitiveType, Float32Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, PrimitiveArray, RecordBatch};
use braid::store::arrow_buffer::Buffer;
use braid::store::arrow_schema::DataType;
use braid::store::batch::{
    read_record_batch, BatchError, BatchLayout, BatchWriter, ColumnMut, ColumnSpec, ColumnType,
    LayoutError, Primitive,
};
use thiserror::Error;

use crate::stream::columnar::PrimitiveColumn;
use crate::stream::operator::EventTime;

/// Name of the label column of a feature batch in Arrow.
pub const LABEL_COLUMN: &str = "label";
/// Name of the feature id column of a feature batch in Arrow.
pub const IDS_COLUMN: &str = "ids";
/// Name of the feature value column of a feature batch in Arrow.
pub const VALUES_COLUMN: &str = "values";
/// Name of the event time column of a feature batch in Arrow.
pub const EVENT_TIME_COLUMN: &str = "event_time";
/// Name of the stream position column of a feature batch in Arrow.
pub const POSITION_COLUMN: &str = "position";

/// Why feature data could not be built, written, read or parsed.
#[derive(Debug, Error)]
pub enum DataError {
    /// The underlying reader failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// A count does not fit the `u32` offset column.
    #[error("feature batch too large: {what}")]
    TooLarge {
        /// Which count overflowed.
        what: &'static str,
    },
    /// The row offsets are not a valid partition of the id column.
    #[error("invalid row offset at index {index}: {reason}")]
    BadOffsets {
        /// Index into the offsets column.
        index: usize,
        /// What was wrong.
        reason: &'static str,
    },
    /// Two columns that must agree in length do not.
    #[error("{what}: expected length {expected}, found {found}")]
    LengthMismatch {
        /// Which column.
        what: &'static str,
        /// Length implied by the other columns.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// A record batch lacks a column a feature batch needs.
    #[error("not a feature batch: the record batch has no {column:?} column")]
    MissingColumn {
        /// The column's name.
        column: &'static str,
    },
    /// A record batch's column has another type than a feature batch's.
    #[error("not a feature batch: column {column:?} is {found}, a feature batch's is {expected}")]
    WrongType {
        /// The column's name.
        column: &'static str,
        /// The type a feature batch has there.
        expected: DataType,
        /// The type the record batch has there.
        found: DataType,
    },
    /// A column that may hold no nulls (every one but the event time) holds
    /// some, at the top level or in its lists' items.
    #[error("not a feature batch: column {column:?} holds {nulls} nulls, it may hold none")]
    Null {
        /// The column's name.
        column: &'static str,
        /// How many nulls.
        nulls: usize,
    },
    /// The values column's row offsets differ from the ids column's.
    #[error("the {VALUES_COLUMN:?} column's row offsets differ from the {IDS_COLUMN:?} column's at index {index}")]
    ValueOffsets {
        /// The first index at which they differ.
        index: usize,
    },
    /// The batch cannot be laid out in Arrow (more ids than `i32` offsets
    /// reach, or a buffer too small or misaligned for the writer).
    #[error("cannot lay out the feature batch: {0}")]
    Layout(#[from] LayoutError),
    /// The Arrow batch just written could not be read back.
    #[error("cannot read the feature batch: {0}")]
    Batch(#[from] BatchError),
    /// A [`BatchWriter`] was planned for another batch than the one written
    /// into it.
    #[error(
        "the writer's layout is not this feature batch's (plan it with FeatureBatch::batch_layout)"
    )]
    LayoutMismatch,
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A seek past the end of a finite stream.
    #[error("cannot seek to row {position}: the stream has {rows} rows")]
    SeekOutOfRange {
        /// Requested position.
        position: u64,
        /// Rows in the stream.
        rows: u64,
    },
}

/// One row: its label, its feature ids and, when the batch has a values
/// column, the matching feature values (`None` means every value is 1).
pub type Row<'a> = (f32, &'a [u64], Option<&'a [f32]>);

/// The event times of a batch's rows, viewed in place: one `i64` per row
/// and a validity bitmap in Arrow's layout (bit `offset + i`, least
/// significant bit first, set when row `i` has an event time).
#[derive(Debug, Clone, Copy)]
pub struct EventTimes<'a> {
    values: &'a [i64],
    validity: Option<&'a [u8]>,
    offset: usize,
}

impl<'a> EventTimes<'a> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether row `i` has an event time (`false` past the end).
    pub fn is_valid(&self, i: usize) -> bool {
        i < self.values.len()
            && self.validity.is_none_or(|bits| {
                let bit = self.offset + i;
                bits.get(bit / 8).is_some_and(|b| (b >> (bit % 8)) & 1 == 1)
            })
    }

    /// Row `i`'s event time, `None` when it has none or past the end.
    pub fn get(&self, i: usize) -> Option<EventTime> {
        if self.is_valid(i) {
            self.values.get(i).copied()
        } else {
            None
        }
    }

    /// The raw values, one per row; a row without an event time holds an
    /// unspecified value (0 in batches built by [`FeatureBatch`]).
    pub fn values(&self) -> &'a [i64] {
        self.values
    }

    /// Number of rows without an event time.
    pub fn null_count(&self) -> usize {
        (0..self.len()).filter(|&i| !self.is_valid(i)).count()
    }

    /// The event times in row order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Option<EventTime>> + 'a {
        let times = *self;
        (0..times.len()).map(move |i| times.get(i))
    }
}

/// Equal when they have the same rows with the same event times (values
/// under null rows and the bitmaps' representation do not count).
impl PartialEq for EventTimes<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// Columnar rows of sparse features.
///
/// Row `i` has label `labels()[i]` and features
/// `ids()[offsets()[i]..offsets()[i + 1]]`, with values from the same range
/// of `values()`, or all ones when there is no values column; its event
/// time is `times().get(i)` and its stream position `positions()[i]` (see
/// the module docs for how rows get them). The offsets column always has
/// `rows() + 1` entries, starts at 0, never decreases and ends at
/// `len_ids()`; every constructor and mutator keeps that true, so row
/// access cannot fail for an in-range index.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBatch {
    labels: Vec<f32>,
    offsets: Vec<u32>,
    ids: Vec<u64>,
    values: Option<Vec<f32>>,
    /// One per row, 0 for a row without an event time.
    times: Vec<i64>,
    /// Bit `i` set: row `i` has an event time; bits past the rows are 0.
    time_validity: Vec<u8>,
    positions: Vec<u64>,
}

impl Default for FeatureBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FeatureBatch {
    /// An empty batch without a values column.
    pub fn new() -> Self {
        Self::with_capacity(0, 0)
    }

    /// An empty batch with room for `rows` rows and `ids` feature ids.
    pub fn with_capacity(rows: usize, ids: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows.saturating_add(1));
        offsets.push(0);
        Self {
            labels: Vec::with_capacity(rows),
            offsets,
            ids: Vec::with_capacity(ids),
            values: None,
            times: Vec::with_capacity(rows),
            time_validity: Vec::with_capacity(rows.div_ceil(8)),
            positions: Vec::with_capacity(rows),
        }
    }

    /// A batch from its columns, checked as
    /// [`FeatureBatchRef::from_record_batch`] checks a record batch. Rows
    /// get no event time and their index as position.
    pub fn from_parts(
        labels: Vec<f32>,
        offsets: Vec<u32>,
        ids: Vec<u64>,
        values: Option<Vec<f32>>,
    ) -> Result<Self, DataError> {
        check_columns(&labels, &offsets, ids.len(), values.as_ref().map(Vec::len))?;
        let rows = labels.len();
        Ok(Self {
            labels,
            offsets,
            ids,
            values,
            times: vec![0; rows],
            time_validity: vec![0; rows.div_ceil(8)],
            positions: (0..rows as u64).collect(),
        })
    }

    /// The columns: labels, offsets, ids and optional values (event times
    /// and positions are dropped).
    pub fn into_parts(self) -> (Vec<f32>, Vec<u32>, Vec<u64>, Option<Vec<f32>>) {
        (self.labels, self.offsets, self.ids, self.values)
    }

    /// A borrowed view of the columns.
    pub fn view(&self) -> FeatureBatchRef<'_> {
        FeatureBatchRef {
            labels: &self.labels,
            offsets: &self.offsets,
            ids: &self.ids,
            values: self.values.as_deref(),
            times: self.times(),
            positions: &self.positions,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Total number of feature ids over all rows.
    pub fn len_ids(&self) -> usize {
        self.ids.len()
    }

    /// Row `i`: label, feature ids and optional values.
    ///
    /// # Panics
    ///
    /// If `i >= self.rows()`.
    pub fn row(&self, i: usize) -> Row<'_> {
        self.view().row(i)
    }

    /// The rows in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Row<'_>> + '_ {
        let view = self.view();
        (0..view.rows()).map(move |i| view.row(i))
    }

    /// The label column.
    pub fn labels(&self) -> &[f32] {
        &self.labels
    }

    /// The row offsets column (`rows() + 1` entries).
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// The feature id column.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The feature value column, `None` when every value is 1.
    pub fn values(&self) -> Option<&[f32]> {
        self.values.as_deref()
    }

    /// The rows' event times.
    pub fn times(&self) -> EventTimes<'_> {
        EventTimes {
            values: &self.times,
            validity: Some(&self.time_validity),
            offset: 0,
        }
    }

    /// The rows' positions in their source stream.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Appends a row without an event time, at the position after the
    /// previous row's (0 for the first row). `values`, when given, must
    /// have one entry per id; the first row with values gives the batch a
    /// values column (earlier features get value 1), and later rows without
    /// values get ones.
    pub fn push_row(
        &mut self,
        label: f32,
        ids: &[u64],
        values: Option<&[f32]>,
    ) -> Result<(), DataError> {
        let position = self.next_position();
        self.push_row_at(label, ids, values, None, position)
    }

    /// Appends a row with event time `time` (`None`: none) at stream
    /// position `position`; otherwise as [`push_row`](Self::push_row).
    pub fn push_row_at(
        &mut self,
        label: f32,
        ids: &[u64],
        values: Option<&[f32]>,
        time: Option<EventTime>,
        position: u64,
    ) -> Result<(), DataError> {
        if let Some(v) = values {
            if v.len() != ids.len() {
                return Err(DataError::LengthMismatch {
                    what: "row values",
                    expected: ids.len(),
                    found: v.len(),
                });
            }
        }
        let end = self
            .ids
            .len()
            .checked_add(ids.len())
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(DataError::TooLarge {
                what: "more than u32::MAX feature ids in one batch",
            })?;
        match (&mut self.values, values) {
            (Some(col), Some(v)) => col.extend_from_slice(v),
            (Some(col), None) => col.resize(col.len() + ids.len(), 1.0),
            (None, Some(v)) => {
                let mut col = Vec::with_capacity(self.ids.capacity());
                col.resize(self.ids.len(), 1.0);
                col.extend_from_slice(v);
                self.values = Some(col);
            }
            (None, None) => {}
        }
        self.labels.push(label);
        self.ids.extend_from_slice(ids);
        self.offsets.push(end);
        self.push_time_and_position(time, position);
        Ok(())
    }

    /// Renumbers the rows' positions `first`, `first + 1`, … (wrapping past
    /// `u64::MAX`).
    pub fn set_positions(&mut self, first: u64) {
        let mut at = first;
        for p in &mut self.positions {
            *p = at;
            at = at.wrapping_add(1);
        }
    }

    /// The position the next row pushed without one gets.
    fn next_position(&self) -> u64 {
        self.positions.last().map_or(0, |p| p.wrapping_add(1))
    }

    /// The event time and position of the row just pushed (its label is
    /// already in).
    fn push_time_and_position(&mut self, time: Option<EventTime>, position: u64) {
        let row = self.labels.len().saturating_sub(1);
        if row % 8 == 0 {
            self.time_validity.push(0);
        }
        if let (Some(_), Some(byte)) = (time, self.time_validity.last_mut()) {
            *byte |= 1 << (row % 8);
        }
        self.times.push(time.unwrap_or(0));
        self.positions.push(position);
    }

    /// Appends a row of ids, each of value 1, without an event time at the
    /// next position; the caller checked [`can_take`](Self::can_take).
    fn push_ones(&mut self, label: f32, ids: &[u64]) {
        let position = self.next_position();
        self.labels.push(label);
        self.ids.extend_from_slice(ids);
        if let Some(values) = &mut self.values {
            values.resize(self.ids.len(), 1.0);
        }
        self.offsets.push(self.ids.len() as u32);
        self.push_time_and_position(None, position);
    }

    fn can_take(&self, ids: usize) -> bool {
        self.ids
            .len()
            .checked_add(ids)
            .is_some_and(|n| u32::try_from(n).is_ok())
    }

    /// Removes every row, keeping the allocations of the label, offset,
    /// id, event time and position columns; the batch goes back to having
    /// no values column.
    pub fn clear(&mut self) {
        self.labels.clear();
        self.offsets.clear();
        self.offsets.push(0);
        self.ids.clear();
        self.values = None;
        self.times.clear();
        self.time_validity.clear();
        self.positions.clear();
    }

    /// The Arrow layout of this batch (see the module docs for its
    /// schema): plan a store object of
    /// [`total_len`](BatchLayout::total_len) bytes with it, then
    /// [`write_to`](Self::write_to) a [`BatchWriter`] over the object.
    pub fn batch_layout(&self) -> Result<BatchLayout, DataError> {
        Ok(BatchLayout::new(self.rows(), &self.column_specs())?)
    }

    /// The columns of [`batch_layout`](Self::batch_layout), for a layout
    /// that adds columns or metadata of its own after them.
    pub fn column_specs(&self) -> Vec<ColumnSpec> {
        let n = self.ids.len();
        let mut columns = vec![
            ColumnSpec::primitive(LABEL_COLUMN, Primitive::Float32),
            ColumnSpec::list(IDS_COLUMN, Primitive::UInt64, n),
        ];
        if self.values.is_some() {
            columns.push(ColumnSpec::list(VALUES_COLUMN, Primitive::Float32, n));
        }
        columns.push(
            ColumnSpec::primitive(EVENT_TIME_COLUMN, Primitive::Int64)
                .with_nulls(self.times().null_count()),
        );
        columns.push(ColumnSpec::primitive(POSITION_COLUMN, Primitive::UInt64));
        columns
    }

    /// Fills the columns of `writer`, planned by
    /// [`batch_layout`](Self::batch_layout) for this batch, in place: the
    /// columns are copied once, straight into the writer's buffer. A
    /// writer planned for another batch gives [`DataError::LayoutMismatch`].
    pub fn write_to(&self, writer: &mut BatchWriter<'_>) -> Result<(), DataError> {
        let expected = self.batch_layout()?;
        let layout = writer.layout();
        if layout.rows() != expected.rows()
            || layout.schema() != expected.schema()
            || layout.total_len() != expected.total_len()
        {
            return Err(DataError::LayoutMismatch);
        }
        let mut columns = writer.columns().into_iter();
        self.write_columns(&mut columns)
    }

    /// Fills the first columns of a writer's (those of
    /// [`column_specs`](Self::column_specs)), taking them from `columns`.
    pub fn write_columns<'w>(
        &self,
        columns: &mut dyn Iterator<Item = ColumnMut<'w>>,
    ) -> Result<(), DataError> {
        let mut next = || columns.next().ok_or(DataError::LayoutMismatch);
        let label = next()?;
        copy_into(f32::slot(label.values), &self.labels)?;
        let ids = next()?;
        let offsets: &[i32] = bytemuck::cast_slice(&self.offsets);
        copy_into(Some(ids.offsets), offsets)?;
        copy_into(u64::slot(ids.values), &self.ids)?;
        if let Some(values) = &self.values {
            let column = next()?;
            copy_into(Some(column.offsets), offsets)?;
            copy_into(f32::slot(column.values), values)?;
        }
        let times: ColumnMut<'_> = next()?;
        if !times.validity.is_empty() {
            copy_into(Some(times.validity), &self.time_validity)?;
        }
        copy_into(i64::slot(times.values), &self.times)?;
        let positions = next()?;
        copy_into(u64::slot(positions.values), &self.positions)?;
        Ok(())
    }

    /// This batch as an Arrow record batch (see the module docs for its
    /// schema), written by [`write_to`](Self::write_to) into an owned
    /// 8-byte-aligned buffer and read back in place.
    pub fn to_record_batch(&self) -> Result<RecordBatch, DataError> {
        let layout = self.batch_layout()?;
        let mut words = vec![0u64; layout.total_len().div_ceil(8)];
        let mut writer = BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words))?;
        self.write_to(&mut writer)?;
        writer.finish().map_err(LayoutError::from)?;
        Ok(read_record_batch(Buffer::from_vec(words))?)
    }
}

/// Copies `from` into `out`, which must be exactly as long.
fn copy_into<T: Copy>(out: Option<&mut [T]>, from: &[T]) -> Result<(), DataError> {
    match out {
        Some(out) if out.len() == from.len() => {
            out.copy_from_slice(from);
            Ok(())
        }
        _ => Err(DataError::LayoutMismatch),
    }
}

/// A borrowed, validated view of a feature batch: either of a
/// [`FeatureBatch`] ([`FeatureBatch::view`]) or of an Arrow record batch
/// ([`FeatureBatchRef::from_record_batch`]), whose columns it reads in place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureBatchRef<'a> {
    labels: &'a [f32],
    offsets: &'a [u32],
    ids: &'a [u64],
    values: Option<&'a [f32]>,
    times: EventTimes<'a>,
    positions: &'a [u64],
}

impl<'a> FeatureBatchRef<'a> {
    /// Views a feature batch's record batch (see the module docs for its
    /// schema) without copying: every slice of the view points into the
    /// record batch's buffers.
    ///
    /// The batch may come from another process: a missing column, a column
    /// of another type, a null where none may be, list offsets that do not
    /// start at 0, values whose offsets differ from the ids', or row
    /// offsets that do not partition the ids give an error, never a panic.
    /// Columns of other names are ignored; list items past the last offset
    /// are left out of the view. Label, id, value, time and position bits
    /// are not checked: every bit pattern is a valid element.
    pub fn from_record_batch(batch: &'a RecordBatch) -> Result<Self, DataError> {
        let labels = primitive::<Float32Type>(batch, LABEL_COLUMN, Primitive::Float32)?;
        let labels = not_null(labels, LABEL_COLUMN)?.values();
        let (offsets, ids) = list::<u64>(column(batch, IDS_COLUMN)?, IDS_COLUMN)?;
        let values = match batch.column_by_name(VALUES_COLUMN) {
            None => None,
            Some(array) => {
                let (value_offsets, values) = list::<f32>(array, VALUES_COLUMN)?;
                if value_offsets != offsets {
                    let index = value_offsets
                        .iter()
                        .zip(offsets)
                        .position(|(a, b)| a != b)
                        .unwrap_or(value_offsets.len().min(offsets.len()));
                    return Err(DataError::ValueOffsets { index });
                }
                Some(values)
            }
        };
        let times = primitive::<Int64Type>(batch, EVENT_TIME_COLUMN, Primitive::Int64)?;
        let times = EventTimes {
            values: times.values(),
            validity: times.nulls().map(|n| n.validity()),
            offset: times.nulls().map_or(0, |n| n.offset()),
        };
        let positions = primitive::<UInt64Type>(batch, POSITION_COLUMN, Primitive::UInt64)?;
        let positions = not_null(positions, POSITION_COLUMN)?.values();
        check_columns(labels, offsets, ids.len(), values.map(<[f32]>::len))?;
        check_rows(labels.len(), &times, positions)?;
        Ok(Self {
            labels,
            offsets,
            ids,
            values,
            times,
            positions,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Total number of feature ids over all rows.
    pub fn len_ids(&self) -> usize {
        self.ids.len()
    }

    /// Row `i`: label, feature ids and optional values.
    ///
    /// # Panics
    ///
    /// If `i >= self.rows()`.
    pub fn row(&self, i: usize) -> Row<'a> {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (
            self.labels[i],
            &self.ids[a..b],
            self.values.map(|v| &v[a..b]),
        )
    }

    /// The rows in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Row<'a>> + 'a {
        let view = *self;
        (0..view.rows()).map(move |i| view.row(i))
    }

    /// The label column.
    pub fn labels(&self) -> &'a [f32] {
        self.labels
    }

    /// The row offsets column (`rows() + 1` entries).
    pub fn offsets(&self) -> &'a [u32] {
        self.offsets
    }

    /// The feature id column.
    pub fn ids(&self) -> &'a [u64] {
        self.ids
    }

    /// The feature value column, `None` when every value is 1.
    pub fn values(&self) -> Option<&'a [f32]> {
        self.values
    }

    /// The rows' event times.
    pub fn times(&self) -> EventTimes<'a> {
        self.times
    }

    /// The rows' positions in their source stream.
    pub fn positions(&self) -> &'a [u64] {
        self.positions
    }

    /// An owned copy (a row without an event time gets value 0 under its
    /// null).
    pub fn to_batch(&self) -> FeatureBatch {
        let rows = self.rows();
        let mut times = Vec::with_capacity(rows);
        let mut time_validity = vec![0u8; rows.div_ceil(8)];
        for (i, t) in self.times.iter().enumerate() {
            times.push(t.unwrap_or(0));
            if t.is_some() {
                time_validity[i / 8] |= 1 << (i % 8);
            }
        }
        FeatureBatch {
            labels: self.labels.to_vec(),
            offsets: self.offsets.to_vec(),
            ids: self.ids.to_vec(),
            values: self.values.map(<[f32]>::to_vec),
            times,
            time_validity,
            positions: self.positions.to_vec(),
        }
    }
}

/// The column `name` of `batch`.
fn column<'a>(batch: &'a RecordBatch, name: &'static str) -> Result<&'a ArrayRef, DataError> {
    batch
        .column_by_name(name)
        .ok_or(DataError::MissingColumn { column: name })
}

/// The column `name` of `batch`, of primitive type `T` (`p`).
fn primitive<'a, T: ArrowPrimitiveType>(
    batch: &'a RecordBatch,
    name: &'static str,
    p: Primitive,
) -> Result<&'a PrimitiveArray<T>, DataError> {
    let array = column(batch, name)?;
    array
        .as_primitive_opt::<T>()
        .filter(|a| a.data_type() == &p.data_type())
        .ok_or_else(|| DataError::WrongType {
            column: name,
            expected: p.data_type(),
            found: array.data_type().clone(),
        })
}

/// `array`, checked to hold no nulls.
fn not_null<'a, A: Array + ?Sized>(array: &'a A, name: &'static str) -> Result<&'a A, DataError> {
    match array.null_count() {
        0 => Ok(array),
        nulls => Err(DataError::Null {
            column: name,
            nulls,
        }),
    }
}

/// A list column of `T` items without nulls: its row offsets, reinterpreted
/// as `u32`, and its items up to the last offset.
fn list<'a, T>(array: &'a ArrayRef, name: &'static str) -> Result<(&'a [u32], &'a [T]), DataError>
where
    T: PrimitiveColumn,
{
    let expected = ColumnType::List(T::PRIMITIVE).data_type();
    let wrong = || DataError::WrongType {
        column: name,
        expected: expected.clone(),
        found: array.data_type().clone(),
    };
    let lists = array.as_list_opt::<i32>().ok_or_else(wrong)?;
    not_null(lists, name)?;
    let items = lists.values();
    if items.data_type() != &T::PRIMITIVE.data_type() {
        return Err(wrong());
    }
    not_null(items.as_ref(), name)?;
    let items = T::values(items).ok_or_else(wrong)?;
    let offsets = lists.value_offsets();
    if offsets.first().is_some_and(|&o| o != 0) {
        return Err(DataError::BadOffsets {
            index: 0,
            reason: "the first offset must be 0",
        });
    }
    // Sound: Arrow validated the offsets non-negative and non-decreasing,
    // and `i32` and `u32` have the same size and alignment.
    let offsets: &[u32] = bytemuck::cast_slice(offsets);
    let last = offsets.last().map_or(0, |&o| o as usize);
    Ok((offsets, items.get(..last).unwrap_or(items)))
}

fn check_rows(rows: usize, times: &EventTimes<'_>, positions: &[u64]) -> Result<(), DataError> {
    if times.len() != rows {
        return Err(DataError::LengthMismatch {
            what: "event times",
            expected: rows,
            found: times.len(),
        });
    }
    if positions.len() != rows {
        return Err(DataError::LengthMismatch {
            what: "positions",
            expected: rows,
            found: positions.len(),
        });
    }
    if let Some(bits) = times.validity {
        let needed = (times.offset + rows).div_ceil(8);
        if bits.len() < needed {
            return Err(DataError::LengthMismatch {
                what: "event time validity bytes",
                expected: needed,
                found: bits.len(),
            });
        }
    }
    Ok(())
}

fn check_columns(
    labels: &[f32],
    offsets: &[u32],
    n_ids: usize,
    n_values: Option<usize>,
) -> Result<(), DataError> {
    if u32::try_from(n_ids).is_err() {
        return Err(DataError::TooLarge {
            what: "more than u32::MAX feature ids in one batch",
        });
    }
    if offsets.len() != labels.len() + 1 {
        return Err(DataError::LengthMismatch {
            what: "row offsets",
            expected: labels.len() + 1,
            found: offsets.len(),
        });
    }
    if let Some(n) = n_values {
        if n != n_ids {
            return Err(DataError::LengthMismatch {
                what: "feature values",
                expected: n_ids,
                found: n,
            });
        }
    }
    if offsets.first() != Some(&0) {
        return Err(DataError::BadOffsets {
            index: 0,
            reason: "the first offset must be 0",
        });
    }
    if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(DataError::BadOffsets {
            index: i + 1,
            reason: "offsets decrease",
        });
    }
    let last = offsets.len() - 1;
    if offsets[last] as usize != n_ids {
        return Err(DataError::BadOffsets {
            index: last,
            reason: "the last offset must equal the number of feature ids",
        });
    }
    Ok(())
}

/// The SplitMix64 finalizer: a fixed bijective mix of 64 bits.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_extend(0xcbf2_9ce4_8422_2325, bytes)
}

fn fnv1a64_extend(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The mask keeping the low `bits` bits; `bits` must be in `1..=64`.
fn id_mask(bits: u32) -> Result<u64, DataError> {
    match bits {
        64 => Ok(u64::MAX),
        1..=63 => Ok((1u64 << bits) - 1),
        _ => Err(DataError::InvalidConfig(format!(
            "bits must be in 1..=64, got {bits}"
        ))),
    }
}

/// Why one input line was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineError {
    /// The line is empty or only whitespace.
    #[error("empty line")]
    Empty,
    /// The label is not `0` or `1`.
    #[error("label is not 0 or 1")]
    BadLabel,
    /// A feature id is not a decimal `u64`.
    #[error("feature id {index} is not a decimal u64")]
    BadId {
        /// Position of the id on the line (0 = first id after the label).
        index: usize,
    },
    /// A feature id is not below `2^bits`.
    #[error("feature id {index} is not below 2^bits")]
    IdOutOfRange {
        /// Position of the id on the line (0 = first id after the label).
        index: usize,
    },
    /// A Criteo line does not have 40 tab-separated columns.
    #[error("expected {expected} tab-separated columns, found {found}")]
    ColumnCount {
        /// Columns a line must have.
        expected: usize,
        /// Columns found.
        found: usize,
    },
    /// A Criteo integer feature is not a decimal `i64`.
    #[error("integer feature I{} is not a decimal integer", .field + 1)]
    BadInteger {
        /// Integer field index, 0-based (`0` is `I1`).
        field: usize,
    },
    /// The row alone has more feature ids than a batch can hold.
    #[error("row has more than u32::MAX feature ids")]
    TooManyIds,
}

/// A skipped line and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line number in the parser's input.
    pub line: u64,
    /// Why it was skipped.
    pub reason: LineError,
}

/// What one parser call did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParseStats {
    /// Rows appended to the batch.
    pub rows: usize,
    /// Malformed lines skipped.
    pub skipped: usize,
    /// Whether the reader reached end of input.
    pub eof: bool,
    /// The first line skipped in this call, if any.
    pub first_skip: Option<SkippedLine>,
}

#[derive(Debug, Default)]
struct LineState {
    buf: Vec<u8>,
    scratch: Vec<u64>,
    pending: Option<f32>,
    line: u64,
    bytes: u64,
    rows: u64,
    skipped: u64,
}

impl LineState {
    fn skip(&mut self, stats: &mut ParseStats, reason: LineError) {
        self.skipped += 1;
        stats.skipped += 1;
        if stats.first_skip.is_none() {
            stats.first_skip = Some(SkippedLine {
                line: self.line,
                reason,
            });
        }
    }

    fn emit(&mut self, stats: &mut ParseStats, batch: &mut FeatureBatch, label: f32) -> bool {
        if batch.can_take(self.scratch.len()) {
            batch.push_ones(label, &self.scratch);
            self.rows += 1;
            stats.rows += 1;
            true
        } else if batch.is_empty() && batch.ids.is_empty() {
            self.skip(stats, LineError::TooManyIds);
            true
        } else {
            self.pending = Some(label);
            false
        }
    }

    fn drive<R, F>(
        &mut self,
        reader: &mut R,
        batch: &mut FeatureBatch,
        max_rows: usize,
        mut parse: F,
    ) -> Result<ParseStats, DataError>
    where
        R: BufRead + ?Sized,
        F: FnMut(&[u8], &mut Vec<u64>) -> Result<f32, LineError>,
    {
        let mut stats = ParseStats::default();
        if max_rows == 0 {
            return Ok(stats);
        }
        if let Some(label) = self.pending.take() {
            if !self.emit(&mut stats, batch, label) {
                return Ok(stats);
            }
        }
        while stats.rows < max_rows {
            self.scratch.clear();
            let available = reader.fill_buf()?;
            if available.is_empty() {
                stats.eof = true;
                break;
            }
            // A line whole in the reader's buffer is parsed there; one that
            // runs past it is gathered into `buf` first.
            let (n, parsed) = match memchr::memchr(b'\n', available) {
                Some(end) => {
                    let parsed = parse(without_line_end(&available[..end]), &mut self.scratch);
                    reader.consume(end + 1);
                    (end + 1, parsed)
                }
                None => {
                    self.buf.clear();
                    let n = reader.read_until(b'\n', &mut self.buf)?;
                    (n, parse(without_line_end(&self.buf), &mut self.scratch))
                }
            };
            self.bytes += n as u64;
            self.line += 1;
            match parsed {
                Ok(label) => {
                    if !self.emit(&mut stats, batch, label) {
                        break;
                    }
                }
                Err(reason) => self.skip(&mut stats, reason),
            }
        }
        Ok(stats)
    }
}

/// `line` without its `\n` or `\r\n`.
fn without_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The leading decimal digits of the 8 bytes of `chunk` (little-endian, so
/// the first byte is the lowest): how many there are, and their value.
#[inline]
fn leading_digits(chunk: u64) -> (usize, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = chunk ^ (ONES * u64::from(b'0'));
    // A byte is a digit iff it is below 10 here: adding 0x76 sets the high
    // bit of any other (bytes from 0x80 have it already). A carry out of a
    // byte only leaves a non-digit, and changes only bytes after it.
    let non_digit = (x.wrapping_add(ONES * 0x76) | x) & (ONES * 0x80);
    let len = (non_digit.trailing_zeros() / 8) as usize;
    if len == 0 {
        return (0, 0);
    }
    // The digits moved to the top are an 8-digit number with leading zeros;
    // each step joins neighbouring groups: 2, then 4, then 8 digits.
    let v = x << (8 * (8 - len));
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    let v = (v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF;
    (len, v)
}

/// Parses the whitespace-separated decimal ids of `rest` into `ids` in one
/// pass over the bytes: what `split` + [`parse_u64`] per token accept,
/// without scanning each token twice or checking overflow per digit (only a
/// token of 20 or more digits can overflow; it is parsed again, checked).
/// A token's first 8 bytes are read as one word ([`leading_digits`]), so an
/// id of up to 7 digits costs no branch per digit.
fn scan_ids(rest: &[u8], ids: &mut Vec<u64>, max_id: u64) -> Result<(), LineError> {
    let (mut i, n) = (0, rest.len());
    let mut index = 0;
    while i < n {
        if rest[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let mut id = 0u64;
        if let Some(word) = rest.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
            let (len, value) = leading_digits(u64::from_le_bytes(word));
            id = value;
            i += len;
        }
        while i < n {
            let d = rest[i].wrapping_sub(b'0');
            if d > 9 {
                if rest[i].is_ascii_whitespace() {
                    break;
                }
                return Err(LineError::BadId { index });
            }
            id = id.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
        }
        if i - start >= 20 {
            id = parse_u64(&rest[start..i]).ok_or(LineError::BadId { index })?;
        }
        if id > max_id {
            return Err(LineError::IdOutOfRange { index });
        }
        ids.push(id);
        index += 1;
    }
    Ok(())
}

fn parse_label(token: &[u8]) -> Result<f32, LineError> {
    match token {
        b"0" => Ok(0.0),
        b"1" => Ok(1.0),
        _ => Err(LineError::BadLabel),
    }
}

fn parse_u64(token: &[u8]) -> Option<u64> {
    if token.is_empty() {
        return None;
    }
    token.iter().try_fold(0u64, |acc, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn parse_i64(token: &[u8]) -> Option<i64> {
    match token.strip_prefix(b"-") {
        Some(digits) => {
            let m = parse_u64(digits)?;
            if m <= i64::MAX as u64 {
                Some(-(m as i64))
            } else if m == i64::MAX as u64 + 1 {
                Some(i64::MIN)
            } else {
                None
            }
        }
        None => i64::try_from(parse_u64(token)?).ok(),
    }
}

/// Streaming parser for the `gen_ctr.py` format: one row per line,
/// `<label 0|1> <id> <id> ...`, whitespace-separated, ids decimal `u64`.
///
/// A line with a label and no ids is a row without features. Empty lines,
/// labels other than `0`/`1`, and non-numeric ids (or, with
/// [`with_bits`](Self::with_bits), ids not below `2^bits`) skip the line;
/// skipped lines are counted, never fatal. Only reader errors are.
#[derive(Debug, Default)]
pub struct GenCtrParser {
    state: LineState,
    max_id: Option<u64>,
}

impl GenCtrParser {
    /// A parser accepting any `u64` id.
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that skips lines with ids not below `2^bits`
    /// (`bits` in `1..=64`).
    pub fn with_bits(bits: u32) -> Result<Self, DataError> {
        Ok(Self {
            state: LineState::default(),
            max_id: Some(id_mask(bits)?),
        })
    }

    /// Appends up to `max_rows` rows read from `reader` to `batch` (which it
    /// does not clear). Returns fewer only at end of input, or when the
    /// batch's id column is full; the row that did not fit is kept and
    /// appended first by the next call.
    pub fn read_batch<R: BufRead + ?Sized>(
        &mut self,
        reader: &mut R,
        batch: &mut FeatureBatch,
        max_rows: usize,
    ) -> Result<ParseStats, DataError> {
        let max_id = self.max_id;
        self.state.drive(reader, batch, max_rows, |line, ids| {
            let start = line
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .ok_or(LineError::Empty)?;
            let line = &line[start..];
            let end = line
                .iter()
                .position(u8::is_ascii_whitespace)
                .unwrap_or(line.len());
            let label = parse_label(&line[..end])?;
            scan_ids(&line[end..], ids, max_id.unwrap_or(u64::MAX))?;
            Ok(label)
        })
    }

    /// Lines read so far.
    pub fn lines(&self) -> u64 {
        self.state.line
    }

    /// Bytes read so far: the input offset just after the last line read.
    pub fn bytes(&self) -> u64 {
        self.state.bytes
    }

    /// Rows produced so far.
    pub fn rows(&self) -> u64 {
        self.state.rows
    }

    /// Lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.state.skipped
    }
}

/// Number of integer features in a Criteo line (`I1..I13`).
pub const CRITEO_INT_FIELDS: usize = 13;
/// Number of categorical features in a Criteo line (`C1..C26`).
pub const CRITEO_CAT_FIELDS: usize = 26;
/// Columns in a Criteo line: the label and the 39 features.
pub const CRITEO_COLUMNS: usize = 1 + CRITEO_INT_FIELDS + CRITEO_CAT_FIELDS;
/// Non-positive integer values below `-CRITEO_NEG_CLAMP` share the bucket of
/// `-CRITEO_NEG_CLAMP`.
pub const CRITEO_NEG_CLAMP: u64 = 1000;
/// Bucket key of a missing integer feature (see [`criteo_int_bucket`]).
pub const CRITEO_MISSING_BUCKET: u32 = u32::MAX;

/// What a Criteo parser does with an empty feature column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingPolicy {
    /// An empty column produces no feature.
    #[default]
    Omit,
    /// An empty column produces its field's "missing" feature: for integer
    /// field `f`, [`criteo_int_id`] of bucket [`CRITEO_MISSING_BUCKET`]; for
    /// categorical field `f`, [`criteo_cat_id`] of the empty string.
    Feature,
}

/// Criteo parser settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriteoConfig {
    /// Feature ids are `< 2^bits`; `1..=64`.
    pub bits: u32,
    /// Treatment of empty feature columns.
    pub missing: MissingPolicy,
}

impl Default for CriteoConfig {
    fn default() -> Self {
        Self {
            bits: 22,
            missing: MissingPolicy::Omit,
        }
    }
}

/// Bucket key of Criteo integer value `v`: `floor(ln(v)^2)` (computed in
/// `f64`, `0..=1911`) for `v > 0`, the Criteo-competition trick; for
/// `v <= 0`, `0x8000_0000 | min(-v, CRITEO_NEG_CLAMP)`, one bucket per value.
pub fn criteo_int_bucket(v: i64) -> u32 {
    if v > 0 {
        let l = (v as f64).ln();
        (l * l).floor() as u32
    } else {
        0x8000_0000 | v.unsigned_abs().min(CRITEO_NEG_CLAMP) as u32
    }
}

/// Unmasked hash of integer field `field` (`0..13`, `I1` = 0) with bucket
/// key `bucket`: `splitmix64((field << 32) | bucket)`.
pub fn criteo_int_hash(field: usize, bucket: u32) -> u64 {
    splitmix64(((field as u64) << 32) | u64::from(bucket))
}

/// Unmasked hash of categorical column `column` (`13..39`: `C1` = 13, i.e.
/// its index among the 39 feature columns) with raw value `value`:
/// `splitmix64(fnv1a64(column as u32 little-endian bytes ++ value))`.
pub fn criteo_cat_hash(column: usize, value: &[u8]) -> u64 {
    let h = fnv1a64_extend(fnv1a64(&(column as u32).to_le_bytes()), value);
    splitmix64(h)
}

/// Feature id of integer field `field` (`0..13`) with value `v`, or of its
/// missing value when `v` is `None`: [`criteo_int_hash`] of its bucket key
/// `& mask`.
pub fn criteo_int_id(field: usize, v: Option<i64>, mask: u64) -> u64 {
    let bucket = v.map_or(CRITEO_MISSING_BUCKET, criteo_int_bucket);
    criteo_int_hash(field, bucket) & mask
}

/// Feature id of categorical field `cat` (`0..26`, `C1` = 0) with raw value
/// `value` (empty for missing): [`criteo_cat_hash`] of column `13 + cat`
/// `& mask`.
pub fn criteo_cat_id(cat: usize, value: &[u8], mask: u64) -> u64 {
    criteo_cat_hash(CRITEO_INT_FIELDS + cat, value) & mask
}

/// Streaming parser for Criteo display-advertising TSV: per line the label
/// (`0`/`1`), 13 integer columns (decimal, possibly negative or empty) and 26
/// categorical columns (usually 8 hex digits, possibly empty), separated by
/// tabs.
///
/// Each row gets, in column order, the id [`criteo_int_id`] of each integer
/// column (bucketized by [`criteo_int_bucket`]) and the id [`criteo_cat_id`]
/// of each categorical column (its raw bytes hashed, not decoded), all with
/// value 1; empty columns follow [`MissingPolicy`]. Lines with another column
/// count, a bad label or a non-integer integer column are skipped and
/// counted, never fatal. The label-less Criteo test set is not supported.
#[derive(Debug)]
pub struct CriteoParser {
    state: LineState,
    mask: u64,
    missing: MissingPolicy,
}

impl CriteoParser {
    /// A parser with the given settings.
    pub fn new(config: CriteoConfig) -> Result<Self, DataError> {
        Ok(Self {
            state: LineState::default(),
            mask: id_mask(config.bits)?,
            missing: config.missing,
        })
    }

    /// Appends up to `max_rows` rows read from `reader` to `batch` (which it
    /// does not clear). Returns fewer only at end of input, or when the
    /// batch's id column is full; the row that did not fit is kept and
    /// appended first by the next call.
    pub fn read_batch<R: BufRead + ?Sized>(
        &mut self,
        reader: &mut R,
        batch: &mut FeatureBatch,
        max_rows: usize,
    ) -> Result<ParseStats, DataError> {
        let (mask, missing) = (self.mask, self.missing);
        self.state.drive(reader, batch, max_rows, |line, ids| {
            if line.is_empty() {
                return Err(LineError::Empty);
            }
            let found = line.split(|&b| b == b'\t').count();
            if found != CRITEO_COLUMNS {
                return Err(LineError::ColumnCount {
                    expected: CRITEO_COLUMNS,
                    found,
                });
            }
            let mut cols = line.split(|&b| b == b'\t');
            let label = parse_label(cols.next().unwrap_or_default())?;
            for (field, col) in cols.by_ref().take(CRITEO_INT_FIELDS).enumerate() {
                if col.is_empty() {
                    if missing == MissingPolicy::Feature {
                        ids.push(criteo_int_id(field, None, mask));
                    }
                    continue;
                }
                let v = parse_i64(col).ok_or(LineError::BadInteger { field })?;
                ids.push(criteo_int_id(field, Some(v), mask));
            }
            for (cat, col) in cols.enumerate() {
                if !col.is_empty() || missing == MissingPolicy::Feature {
                    ids.push(criteo_cat_id(cat, col, mask));
                }
            }
            Ok(label)
        })
    }

    /// Lines read so far.
    pub fn lines(&self) -> u64 {
        self.state.line
    }

    /// Bytes read so far: the input offset just after the last line read.
    pub fn bytes(&self) -> u64 {
        self.state.bytes
    }

    /// Rows produced so far.
    pub fn rows(&self) -> u64 {
        self.state.rows
    }

    /// Lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.state.skipped
    }
}

/// Settings of a [`SyntheticStream`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticConfig {
    /// Rows in the stream; drift completes over this many rows.
    pub rows: u64,
    /// Categorical fields per row, each contributing one feature.
    pub fields: usize,
    /// Feature ids are `< 2^bits`; `1..=64`.
    pub bits: u32,
    /// Seed of the hidden weights and of the row draws.
    pub seed: u64,
    /// Bias of the hidden logit; `-2` gives a click rate near 18%.
    pub bias: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            fields: 20,
            bits: 22,
            seed: 42,
            bias: -2.0,
        }
    }
}

const ZIPF_EXPONENT: f64 = 1.1;
const SIGMA_STATIC: f64 = 0.25;
const SIGMA_DRIFT: f64 = 0.18;
const SLIDE_MIN_CARD: u64 = 1000;
const SLIDE_SLOTS: u128 = 100;

#[derive(Debug, Clone)]
struct SyntheticField {
    card: u64,
    zipf_c: f64,
}

/// A deterministic synthetic click stream with drift, after
/// `shared/data/gen_ctr.py` (same model, not the same numbers).
///
/// Field `j` of `F` has cardinality `round(10^(1 + 5j/(F-1)))` (10 to 10^6,
/// log-spaced) and draws value `v` from a Zipf-like law with exponent 1.1
/// truncated to the cardinality (value 0 is the most popular); in fields with
/// at least 1000 values the popular values slide by 100 slots over the
/// stream. Its feature id is `splitmix64((j << 32) | v) & (2^bits - 1)`, as
/// in `gen_ctr.py`. Row `t` of `N` clicks with probability
/// `sigmoid(bias + Σ_j ws_j[v_j] + cos(φ) wa_j[v_j] + sin(φ) wb_j[v_j])`,
/// `φ = (π/2) t/N`: the hidden weights rotate from `ws + wa` to `ws + wb`.
/// Weights (near-Gaussian, standard deviations 0.25, 0.18, 0.18) are hashes
/// of the seed, field and value, and each row's draws come from a generator
/// seeded by the seed and the row index, so any row can be produced on its
/// own: [`seek`](Self::seek) is O(1) and replays exactly.
#[derive(Debug, Clone)]
pub struct SyntheticStream {
    config: SyntheticConfig,
    mask: u64,
    fields: Vec<SyntheticField>,
    weight_seed: u64,
    row_seed: u64,
    position: u64,
    scratch: Vec<u64>,
}

impl SyntheticStream {
    /// A stream at position 0. Needs `fields >= 1`, `bits` in `1..=64` and
    /// a finite `bias`.
    pub fn new(config: SyntheticConfig) -> Result<Self, DataError> {
        let mask = id_mask(config.bits)?;
        if config.fields == 0 || config.fields > u32::MAX as usize {
            return Err(DataError::InvalidConfig(format!(
                "fields must be in 1..=2^32-1, got {}",
                config.fields
            )));
        }
        if !config.bias.is_finite() {
            return Err(DataError::InvalidConfig(format!(
                "bias must be finite, got {}",
                config.bias
            )));
        }
        let f = config.fields;
        let e = 1.0 - ZIPF_EXPONENT;
        let fields = (0..f)
            .map(|j| {
                let exponent = if f == 1 {
                    1.0
                } else {
                    1.0 + 5.0 * j as f64 / (f - 1) as f64
                };
                let card = 10f64.powf(exponent).round() as u64;
                SyntheticField {
                    card,
                    zipf_c: ((card + 1) as f64).powf(e) - 1.0,
                }
            })
            .collect();
        Ok(Self {
            config,
            mask,
            fields,
            weight_seed: splitmix64(config.seed ^ 0x5745_4947_4854_5321),
            row_seed: splitmix64(config.seed ^ 0x524f_5753_4545_4421),
            position: 0,
            scratch: Vec::with_capacity(f),
        })
    }

    /// The stream's settings.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Index of the next row to be produced.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Rows left before the end of the stream.
    pub fn remaining(&self) -> u64 {
        self.config.rows - self.position
    }

    /// Moves to row `position` (`<= rows`); the rows produced from there
    /// are the same as the first time.
    pub fn seek(&mut self, position: u64) -> Result<(), DataError> {
        if position > self.config.rows {
            return Err(DataError::SeekOutOfRange {
                position,
                rows: self.config.rows,
            });
        }
        self.position = position;
        Ok(())
    }

    /// Cardinality of each field.
    pub fn cardinalities(&self) -> Vec<u64> {
        self.fields.iter().map(|f| f.card).collect()
    }

    /// Appends up to `max_rows` rows to `batch` (which it does not clear)
    /// and returns how many: fewer only at the end of the stream or when the
    /// batch's id column is full.
    pub fn fill(&mut self, batch: &mut FeatureBatch, max_rows: usize) -> usize {
        self.fill_inner(batch, max_rows, None)
    }

    /// As [`fill`](Self::fill), also appending each row's true click
    /// probability to `oracle`.
    pub fn fill_with_oracle(
        &mut self,
        batch: &mut FeatureBatch,
        max_rows: usize,
        oracle: &mut Vec<f64>,
    ) -> usize {
        self.fill_inner(batch, max_rows, Some(oracle))
    }

    /// The true click probability of row `position`, `None` past the end.
    pub fn probability_at(&self, position: u64) -> Option<f64> {
        if position >= self.config.rows {
            return None;
        }
        let mut ids = Vec::with_capacity(self.fields.len());
        Some(self.generate(position, &mut ids).1)
    }

    fn fill_inner(
        &mut self,
        batch: &mut FeatureBatch,
        max_rows: usize,
        mut oracle: Option<&mut Vec<f64>>,
    ) -> usize {
        let n = usize::try_from(self.remaining()).map_or(max_rows, |r| r.min(max_rows));
        let mut ids = std::mem::take(&mut self.scratch);
        let mut done = 0;
        while done < n && batch.can_take(self.fields.len()) {
            ids.clear();
            let (label, p) = self.generate(self.position, &mut ids);
            batch.push_ones(label, &ids);
            if let Some(o) = oracle.as_deref_mut() {
                o.push(p);
            }
            self.position += 1;
            done += 1;
        }
        self.scratch = ids;
        done
    }

    fn weight(&self, field: usize, value: u64, part: u64) -> f64 {
        let key = ((((field as u64) << 2) | part) << 32) | value;
        let h = splitmix64(self.weight_seed ^ splitmix64(key));
        let sum: u64 = (0..4).map(|k| (h >> (16 * k)) & 0xffff).sum();
        (sum as f64 / 65536.0 - 2.0) * 3f64.sqrt()
    }

    fn generate(&self, t: u64, ids: &mut Vec<u64>) -> (f32, f64) {
        let n = self.config.rows.max(1);
        let phi = FRAC_PI_2 * t as f64 / n as f64;
        let (sin, cos) = phi.sin_cos();
        let slide = (u128::from(t) * SLIDE_SLOTS / u128::from(n)) as u64;
        let mut rng = splitmix64(self.row_seed ^ t);
        let mut uniform = || {
            rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            (splitmix64(rng) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
        };
        let inv_e = 1.0 / (1.0 - ZIPF_EXPONENT);
        let mut logit = self.config.bias;
        for (j, field) in self.fields.iter().enumerate() {
            let x = (1.0 + uniform() * field.zipf_c).powf(inv_e);
            let mut v = (x as u64).saturating_sub(1).min(field.card - 1);
            if field.card >= SLIDE_MIN_CARD {
                v = (v + slide) % field.card;
            }
            logit += SIGMA_STATIC * self.weight(j, v, 0)
                + SIGMA_DRIFT * (cos * self.weight(j, v, 1) + sin * self.weight(j, v, 2));
            ids.push(splitmix64(((j as u64) << 32) | v) & self.mask);
        }
        let p = 1.0 / (1.0 + (-logit).exp());
        let label = if uniform() < p { 1.0 } else { 0.0 };
        (label, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(s: &[u8]) -> u64 {
        let mut w = [b' '; 8];
        w[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(w)
    }

    #[test]
    fn leading_digits_counts_and_values_the_digits_before_the_first_other_byte() {
        assert_eq!(leading_digits(word(b"1234567 ")), (7, 1_234_567));
        assert_eq!(leading_digits(word(b"12345678")), (8, 12_345_678));
        assert_eq!(leading_digits(word(b"00000001")), (8, 1));
        assert_eq!(leading_digits(word(b"9\n")), (1, 9));
        assert_eq!(leading_digits(word(b" 1")), (0, 0));
        assert_eq!(leading_digits(word(b"42x9")), (2, 42));
        assert_eq!(leading_digits(word(b"7/:")), (1, 7));
        for high in [0x80u8, 0x8a, 0xb0, 0xb9, 0xff] {
            assert_eq!(leading_digits(word(&[b'3', b'1', high, b'5'])), (2, 31));
            assert_eq!(leading_digits(word(&[high, b'5'])), (0, 0));
        }
    }

    /// What `split_ascii_whitespace` + [`parse_u64`] make of `rest`.
    fn reference(rest: &[u8], max_id: u64) -> Result<Vec<u64>, LineError> {
        rest.split(u8::is_ascii_whitespace)
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(index, t)| match parse_u64(t) {
                None => Err(LineError::BadId { index }),
                Some(id) if id > max_id => Err(LineError::IdOutOfRange { index }),
                Some(id) => Ok(id),
            })
            .collect()
    }

    #[test]
    fn scan_ids_reads_long_and_short_tokens_as_the_reference_does() {
        let cases: [&[u8]; 12] = [
            b"1 22 333 4444 55555 666666 7777777 88888888 999999999\n",
            b"  12345678  87654321\t1\r\n",
            b"18446744073709551615 1",
            b"18446744073709551616 1",
            b"123456789012345678901234",
            b"1234567a 1",
            b"12345678a",
            b"1 2 3 4 5 6 7 8 9 10 11",
            b"00000000000000000000000000007",
            b"4194303 4194304 5",
            b"12\xb0 3",
            b"",
        ];
        for case in cases {
            for max_id in [u64::MAX, (1 << 22) - 1] {
                let mut ids = Vec::new();
                let got = scan_ids(case, &mut ids, max_id).map(|()| ids);
                assert_eq!(
                    got,
                    reference(case, max_id),
                    "{:?}",
                    String::from_utf8_lossy(case)
                );
            }
        }
    }
}
