//! Arrow record batches in store objects, in the Arrow IPC stream format.
//!
//! Arrow is braid's one columnar format. A batch lives in one object laid
//! out as an Arrow IPC *stream*: the schema message, one record batch
//! message, its body, and the end-of-stream marker, so any Arrow reader
//! can read the object's bytes. Every body buffer starts at a multiple of
//! [`BUFFER_ALIGN`] bytes from the object's start, which the store aligns
//! the same way, so a reader in any process views the columns in place.
//!
//! * **Writing in place.** [`BatchLayout::new`] plans a batch from its
//!   columns' shapes ([`ColumnSpec`]: type, rows, nulls, the values of a
//!   variable-length column); [`BatchWriter::new`] writes the two message
//!   headers into the object and hands out each column's buffers as typed
//!   mutable slices ([`ColumnMut`]) for the producer to fill. Nothing is
//!   encoded or copied after the producer writes a value.
//! * **Writing a batch built elsewhere.** [`BatchLayout::of`] and
//!   [`write_record_batch`] copy an existing [`RecordBatch`]'s buffers into
//!   the object once.
//! * **Checked once, by the writer.** [`BatchWriter::finish`] checks what
//!   the producer wrote (offsets, UTF-8, null counts) while it is still in
//!   cache, and marks the batch checked with 8 bytes after the
//!   end-of-stream marker, where Arrow readers never look.
//!   [`write_record_batch`] marks the copies it makes of valid batches.
//! * **Reading in place.** [`read_record_batch`] takes an Arrow [`Buffer`]
//!   over the object's bytes (the store's [`ObjectView::record_batch`]
//!   makes one that holds the object's pin) and returns a [`RecordBatch`]
//!   whose arrays slice that buffer: the flatbuffer headers are verified,
//!   the buffers must be aligned (a misaligned one is an error, never a
//!   silent copy) and every array's buffers must be as long as its length
//!   needs. A batch marked checked is not scanned again, so reading costs
//!   the same at any size; an unmarked one is validated in full by Arrow
//!   (every offset, all UTF-8).
//!
//! Supported column types: the primitives of [`Primitive`], `Utf8`, and
//! `List` of a primitive, each nullable at the top level. Dictionaries and
//! compression are not used.
//!
//! ```
//! use braid_store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut, read_record_batch};
//! use arrow_array::cast::AsArray;
//! use arrow_array::types::UInt64Type;
//!
//! let layout = BatchLayout::new(3, &[ColumnSpec::primitive("id", Primitive::UInt64)]).unwrap();
//! let mut bytes = vec![0u64; layout.total_len().div_ceil(8)];
//! let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut bytes);
//! let mut writer = braid_store::batch::BatchWriter::new(&layout, buf).unwrap();
//! if let ValuesMut::UInt64(ids) = &mut writer.columns()[0].values {
//!     ids.copy_from_slice(&[7, 8, 9]);
//! }
//! writer.finish().unwrap();
//! let buffer = arrow_buffer::Buffer::from_vec(bytes);
//! let batch = read_record_batch(buffer).unwrap();
//! assert_eq!(batch.column(0).as_primitive::<UInt64Type>().values(), &[7, 8, 9]);
//! ```
//!
//! [`ObjectView::record_batch`]: crate::ObjectView::record_batch

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::Buffer;
use arrow_ipc::{MessageHeader, MetadataVersion};
use arrow_schema::{ArrowError, DataType, Field, Metadata, Schema, SchemaRef};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Alignment, in bytes, of every body buffer relative to the object start
/// (and of the object start in the arena).
pub const BUFFER_ALIGN: usize = 64;
/// Alignment the writer requires of a buffer's start: that of the widest
/// element (store objects start at multiples of [`BUFFER_ALIGN`]).
pub const START_ALIGN: usize = 8;
/// Most columns a batch may have.
pub const MAX_COLUMNS: usize = 1024;

const CONTINUATION: [u8; 4] = [0xff; 4];
const EOS: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
/// Follows the end-of-stream marker of a batch whose columns braid's
/// writer checked (Arrow readers stop at the marker and never see it).
const CHECKED: [u8; 8] = *b"braid:ok";

/// A fixed-width element type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Primitive {
    /// `i32`.
    Int32,
    /// `i64`.
    Int64,
    /// `u32`.
    UInt32,
    /// `u64`.
    UInt64,
    /// `f32`.
    Float32,
    /// `f64`.
    Float64,
}

impl Primitive {
    /// Every primitive.
    pub const ALL: [Primitive; 6] = [
        Primitive::Int32,
        Primitive::Int64,
        Primitive::UInt32,
        Primitive::UInt64,
        Primitive::Float32,
        Primitive::Float64,
    ];

    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            Primitive::Int32 | Primitive::UInt32 | Primitive::Float32 => 4,
            Primitive::Int64 | Primitive::UInt64 | Primitive::Float64 => 8,
        }
    }

    /// The Arrow type.
    pub fn data_type(self) -> DataType {
        match self {
            Primitive::Int32 => DataType::Int32,
            Primitive::Int64 => DataType::Int64,
            Primitive::UInt32 => DataType::UInt32,
            Primitive::UInt64 => DataType::UInt64,
            Primitive::Float32 => DataType::Float32,
            Primitive::Float64 => DataType::Float64,
        }
    }

    /// The primitive an Arrow type is, if it is one of ours.
    pub fn of(data_type: &DataType) -> Option<Primitive> {
        Some(match data_type {
            DataType::Int32 => Primitive::Int32,
            DataType::Int64 => Primitive::Int64,
            DataType::UInt32 => Primitive::UInt32,
            DataType::UInt64 => Primitive::UInt64,
            DataType::Float32 => Primitive::Float32,
            DataType::Float64 => Primitive::Float64,
            _ => return None,
        })
    }
}

/// The type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// Fixed-width values.
    Primitive(Primitive),
    /// UTF-8 strings (`i32` offsets, then the bytes).
    Utf8,
    /// A list of primitives per row (`i32` offsets, then the items).
    List(Primitive),
}

impl ColumnType {
    /// The Arrow type.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Primitive(p) => p.data_type(),
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::List(p) => {
                DataType::List(Arc::new(Field::new("item", p.data_type(), false)))
            }
        }
    }

    /// The column type an Arrow type is, if it is one of ours.
    pub fn of(data_type: &DataType) -> Option<ColumnType> {
        match data_type {
            DataType::Utf8 => Some(ColumnType::Utf8),
            DataType::List(item) if !item.is_nullable() => {
                Primitive::of(item.data_type()).map(ColumnType::List)
            }
            other => Primitive::of(other).map(ColumnType::Primitive),
        }
    }
}

/// The shape of one column of a batch to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    /// The field name.
    pub name: String,
    /// The type.
    pub ty: ColumnType,
    /// Whether the field is nullable.
    pub nullable: bool,
    /// How many rows are null (only for a nullable column).
    pub nulls: usize,
    /// For `Utf8`: the total bytes of all strings; for `List`: the total
    /// items of all lists; otherwise 0.
    pub values: usize,
}

impl ColumnSpec {
    /// A non-nullable primitive column.
    pub fn primitive(name: impl Into<String>, p: Primitive) -> Self {
        ColumnSpec {
            name: name.into(),
            ty: ColumnType::Primitive(p),
            nullable: false,
            nulls: 0,
            values: 0,
        }
    }

    /// A non-nullable string column holding `bytes` bytes in all.
    pub fn utf8(name: impl Into<String>, bytes: usize) -> Self {
        ColumnSpec {
            name: name.into(),
            ty: ColumnType::Utf8,
            nullable: false,
            nulls: 0,
            values: bytes,
        }
    }

    /// A non-nullable list column holding `items` items in all.
    pub fn list(name: impl Into<String>, p: Primitive, items: usize) -> Self {
        ColumnSpec {
            name: name.into(),
            ty: ColumnType::List(p),
            nullable: false,
            nulls: 0,
            values: items,
        }
    }

    /// The same column, nullable, with `nulls` null rows.
    pub fn with_nulls(mut self, nulls: usize) -> Self {
        self.nullable = true;
        self.nulls = nulls;
        self
    }

    fn field(&self) -> Field {
        Field::new(&self.name, self.ty.data_type(), self.nullable)
    }
}

/// A batch's shape could not be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// More columns than [`MAX_COLUMNS`], or none.
    #[error("a batch has 1 to {MAX_COLUMNS} columns, not {0}")]
    Columns(usize),
    /// A column's counts do not fit its type (more nulls than rows, a
    /// non-nullable column with nulls, values for a primitive column, or
    /// offsets beyond `i32`).
    #[error("column {column:?}: {why}")]
    Column {
        /// The column's name.
        column: String,
        /// What is wrong.
        why: String,
    },
    /// An Arrow type this module does not lay out.
    #[error("column {column:?} has type {data_type}, which braid does not lay out")]
    Unsupported {
        /// The column's name.
        column: String,
        /// Its type.
        data_type: DataType,
    },
    /// The buffer is shorter than the layout.
    #[error("the buffer has {available} bytes; the batch needs {needed}")]
    BufferTooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// The buffer does not start on a [`START_ALIGN`]-byte boundary.
    #[error("the buffer must start at a multiple of {START_ALIGN} bytes")]
    Misaligned,
}

/// Bytes could not be read as a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The bytes are not an Arrow IPC stream of one schema and one batch.
    #[error("not an Arrow IPC batch: {0}")]
    Malformed(String),
    /// Arrow refused the batch (a buffer misaligned or out of bounds, bad
    /// offsets, invalid UTF-8, a type it cannot read).
    #[error("invalid Arrow batch: {0}")]
    Invalid(String),
}

impl From<ArrowError> for BatchError {
    fn from(e: ArrowError) -> Self {
        BatchError::Invalid(e.to_string())
    }
}

/// What [`BatchWriter::finish`] found wrong in a column the producer
/// filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {why}")]
pub struct FinishError {
    /// The column.
    pub column: String,
    /// What is wrong.
    pub why: String,
}

impl From<FinishError> for LayoutError {
    fn from(e: FinishError) -> Self {
        LayoutError::Column {
            column: e.column,
            why: e.why,
        }
    }
}

/// Where one column's buffers lie, relative to the object's start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnPlan {
    name: String,
    ty: ColumnType,
    rows: usize,
    nulls: usize,
    validity: Range<usize>,
    offsets: Range<usize>,
    values: Range<usize>,
}

/// A planned batch: its schema, its headers and where every column's
/// buffers go in the object.
#[derive(Debug, Clone)]
pub struct BatchLayout {
    schema: SchemaRef,
    rows: usize,
    columns: Vec<ColumnPlan>,
    header: Vec<u8>,
    total_len: usize,
}

fn align(n: usize) -> usize {
    n.div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN
}

fn i64_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl BatchLayout {
    /// Plans a batch of `rows` rows with `columns`.
    pub fn new(rows: usize, columns: &[ColumnSpec]) -> Result<BatchLayout, LayoutError> {
        Self::with_metadata(rows, columns, Metadata::default())
    }

    /// [`BatchLayout::new`], with key-value metadata on the schema (what
    /// holds for the whole batch rather than per row; readers find it in
    /// the batch's `schema().metadata()`).
    pub fn with_metadata(
        rows: usize,
        columns: &[ColumnSpec],
        metadata: impl Into<Metadata>,
    ) -> Result<BatchLayout, LayoutError> {
        if columns.is_empty() || columns.len() > MAX_COLUMNS {
            return Err(LayoutError::Columns(columns.len()));
        }
        let limit = i32::MAX as usize;
        let bad = |c: &ColumnSpec, why: &str| LayoutError::Column {
            column: c.name.clone(),
            why: why.to_string(),
        };
        // Body offsets first (relative to the body), then the headers,
        // whose size does not depend on the offsets' values.
        let mut at = 0usize;
        let mut take = |len: usize| {
            let r = at..at + len;
            at = align(at + len);
            r
        };
        let mut plans = Vec::with_capacity(columns.len());
        let mut nodes = Vec::new();
        let mut buffers = Vec::new();
        for c in columns {
            if c.nulls > rows || (!c.nullable && c.nulls > 0) {
                return Err(bad(
                    c,
                    "more nulls than rows, or nulls in a non-nullable column",
                ));
            }
            if rows >= limit || c.values > limit {
                return Err(bad(c, "more rows or values than i32 offsets reach"));
            }
            let validity = take(if c.nulls > 0 { rows.div_ceil(8) } else { 0 });
            nodes.push((rows, c.nulls));
            let (offsets, values) = match c.ty {
                ColumnType::Primitive(p) => {
                    if c.values != 0 {
                        return Err(bad(c, "a primitive column has no variable values"));
                    }
                    (0..0, take(rows * p.width()))
                }
                ColumnType::Utf8 => (take((rows + 1) * 4), take(c.values)),
                ColumnType::List(p) => {
                    let offsets = take((rows + 1) * 4);
                    nodes.push((c.values, 0));
                    (offsets, take(c.values * p.width()))
                }
            };
            buffers.push(validity.clone());
            if !offsets.is_empty() {
                buffers.push(offsets.clone());
            }
            if let ColumnType::List(_) = c.ty {
                // The child's (empty) validity buffer.
                buffers.push(values.start..values.start);
            }
            buffers.push(values.clone());
            plans.push(ColumnPlan {
                name: c.name.clone(),
                ty: c.ty,
                rows,
                nulls: c.nulls,
                validity,
                offsets,
                values,
            });
        }
        let body_len = at;
        let schema = Arc::new(
            Schema::new(columns.iter().map(ColumnSpec::field).collect::<Vec<_>>())
                .with_metadata(metadata),
        );
        let header = encode_headers(&schema, rows, &nodes, &buffers, body_len);
        let shift = header.len();
        for p in &mut plans {
            p.validity = p.validity.start + shift..p.validity.end + shift;
            p.offsets = p.offsets.start + shift..p.offsets.end + shift;
            p.values = p.values.start + shift..p.values.end + shift;
        }
        Ok(BatchLayout {
            schema,
            rows,
            columns: plans,
            total_len: shift + body_len + EOS.len() + CHECKED.len(),
            header,
        })
    }

    /// Plans a copy of `batch` (see [`write_record_batch`]).
    pub fn of(batch: &RecordBatch) -> Result<BatchLayout, LayoutError> {
        let specs = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| spec_of(field, column))
            .collect::<Result<Vec<_>, _>>()?;
        BatchLayout::with_metadata(batch.num_rows(), &specs, batch.schema().metadata().clone())
    }

    /// Bytes the batch takes in its object.
    pub fn total_len(&self) -> usize {
        self.total_len
    }

    /// The batch's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

fn spec_of(field: &Field, column: &ArrayRef) -> Result<ColumnSpec, LayoutError> {
    let unsupported = || LayoutError::Unsupported {
        column: field.name().clone(),
        data_type: field.data_type().clone(),
    };
    let ty = ColumnType::of(field.data_type()).ok_or_else(unsupported)?;
    let values = match ty {
        ColumnType::Primitive(_) => 0,
        ColumnType::Utf8 => {
            let strings = column.as_any().downcast_ref::<arrow_array::StringArray>();
            let offsets = strings.ok_or_else(unsupported)?.value_offsets();
            span(offsets)
        }
        ColumnType::List(_) => {
            let lists = column.as_any().downcast_ref::<arrow_array::ListArray>();
            let lists = lists.ok_or_else(unsupported)?;
            if lists.values().null_count() > 0 {
                return Err(unsupported());
            }
            span(lists.value_offsets())
        }
    };
    let mut spec = ColumnSpec {
        name: field.name().clone(),
        ty,
        nullable: false,
        nulls: 0,
        values,
    };
    if field.is_nullable() {
        spec = spec.with_nulls(column.null_count());
    }
    Ok(spec)
}

fn span(offsets: &[i32]) -> usize {
    match (offsets.first(), offsets.last()) {
        (Some(&a), Some(&b)) => usize::try_from(b - a).unwrap_or(0),
        _ => 0,
    }
}

/// The schema message and the record batch message, each with its
/// continuation marker and length, padded so the body that follows starts
/// at a multiple of [`BUFFER_ALIGN`].
fn encode_headers(
    schema: &Schema,
    rows: usize,
    nodes: &[(usize, usize)],
    buffers: &[Range<usize>],
    body_len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + 32 * buffers.len());
    let schema_fb = {
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let root = arrow_ipc::convert::schema_to_fb_offset(&mut fbb, schema);
        let mut message = arrow_ipc::MessageBuilder::new(&mut fbb);
        message.add_version(MetadataVersion::V5);
        message.add_header_type(MessageHeader::Schema);
        message.add_bodyLength(0);
        message.add_header(root.as_union_value());
        let message = message.finish();
        fbb.finish(message, None);
        fbb.finished_data().to_vec()
    };
    push_message(&mut out, &schema_fb, 8);
    let batch_fb = {
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let nodes: Vec<arrow_ipc::FieldNode> = nodes
            .iter()
            .map(|&(len, nulls)| arrow_ipc::FieldNode::new(i64_of(len), i64_of(nulls)))
            .collect();
        let buffers: Vec<arrow_ipc::Buffer> = buffers
            .iter()
            .map(|r| arrow_ipc::Buffer::new(i64_of(r.start), i64_of(r.len())))
            .collect();
        let nodes = fbb.create_vector(&nodes);
        let buffers = fbb.create_vector(&buffers);
        let mut batch = arrow_ipc::RecordBatchBuilder::new(&mut fbb);
        batch.add_length(i64_of(rows));
        batch.add_nodes(nodes);
        batch.add_buffers(buffers);
        let batch = batch.finish();
        let mut message = arrow_ipc::MessageBuilder::new(&mut fbb);
        message.add_version(MetadataVersion::V5);
        message.add_header_type(MessageHeader::RecordBatch);
        message.add_bodyLength(i64_of(body_len));
        message.add_header(batch.as_union_value());
        let message = message.finish();
        fbb.finish(message, None);
        fbb.finished_data().to_vec()
    };
    push_message(&mut out, &batch_fb, BUFFER_ALIGN);
    out
}

/// Appends an encapsulated message, padded so it ends at a multiple of
/// `to` bytes.
fn push_message(out: &mut Vec<u8>, flatbuffer: &[u8], to: usize) {
    let start = out.len() + 8;
    let end = (start + flatbuffer.len()).div_ceil(to) * to;
    let len = u32::try_from(end - start).unwrap_or(u32::MAX);
    out.extend_from_slice(&CONTINUATION);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(flatbuffer);
    out.resize(end, 0);
}

/// One column's buffers, to be filled by the producer.
#[derive(Debug)]
pub struct ColumnMut<'a> {
    /// The validity bitmap (bit `i` set: row `i` is valid), zeroed; empty
    /// when the column has no nulls.
    pub validity: &'a mut [u8],
    /// `rows + 1` offsets for `Utf8` and `List` columns (the first 0, each
    /// the previous plus the row's length), empty otherwise.
    pub offsets: &'a mut [i32],
    /// The values: one per row, the strings' bytes, or the lists' items.
    pub values: ValuesMut<'a>,
}

/// A column's values, typed.
#[derive(Debug)]
pub enum ValuesMut<'a> {
    /// `i32` values.
    Int32(&'a mut [i32]),
    /// `i64` values.
    Int64(&'a mut [i64]),
    /// `u32` values.
    UInt32(&'a mut [u32]),
    /// `u64` values.
    UInt64(&'a mut [u64]),
    /// `f32` values.
    Float32(&'a mut [f32]),
    /// `f64` values.
    Float64(&'a mut [f64]),
    /// String bytes.
    Bytes(&'a mut [u8]),
}

/// Writes a planned batch's headers into a buffer and hands out its
/// columns' buffers.
#[derive(Debug)]
pub struct BatchWriter<'a> {
    layout: BatchLayout,
    body: &'a mut [u8],
}

impl<'a> BatchWriter<'a> {
    /// Writes `layout`'s headers and end marker into `buf` (at least
    /// [`BatchLayout::total_len`] bytes, starting at a multiple of
    /// [`START_ALIGN`]) and zeroes the padding and validity bitmaps.
    pub fn new(layout: &BatchLayout, buf: &'a mut [u8]) -> Result<BatchWriter<'a>, LayoutError> {
        if buf.len() < layout.total_len {
            return Err(LayoutError::BufferTooSmall {
                needed: layout.total_len,
                available: buf.len(),
            });
        }
        if buf.as_ptr() as usize % START_ALIGN != 0 {
            return Err(LayoutError::Misaligned);
        }
        let buf = &mut buf[..layout.total_len];
        let header = layout.header.len();
        buf[..header].copy_from_slice(&layout.header);
        let eos = layout.total_len - EOS.len() - CHECKED.len();
        buf[eos..eos + EOS.len()].copy_from_slice(&EOS);
        buf[eos + EOS.len()..].fill(0);
        // Zero what no column writes: padding between buffers, and the
        // validity bitmaps the producer sets bit by bit.
        let mut at = header;
        for c in &layout.columns {
            for r in [&c.validity, &c.offsets, &c.values] {
                if r.is_empty() {
                    continue;
                }
                buf[at.min(r.start)..r.start].fill(0);
                at = at.max(r.end);
            }
            buf[c.validity.clone()].fill(0);
        }
        buf[at.min(eos)..eos].fill(0);
        Ok(BatchWriter {
            layout: layout.clone(),
            body: buf,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// Checks what the producer wrote (offsets start at 0, never decrease
    /// and stay within the values; strings are UTF-8 and split at character
    /// boundaries; each validity bitmap has the declared number of nulls)
    /// and marks the batch checked, so readers verify only its headers and
    /// buffer sizes. A batch never finished is read all the same, with
    /// Arrow's full validation.
    pub fn finish(self) -> Result<(), FinishError> {
        for c in &self.layout.columns {
            let bad = |why: String| FinishError {
                column: c.name.clone(),
                why,
            };
            if !c.validity.is_empty() {
                let bits = &self.body[c.validity.clone()];
                let valid: usize = (0..c.rows)
                    .filter(|i| bits[i / 8] & (1 << (i % 8)) != 0)
                    .count();
                if c.rows - valid != c.nulls {
                    return Err(bad(format!(
                        "{} rows are null, the layout declares {}",
                        c.rows - valid,
                        c.nulls
                    )));
                }
            }
            if c.offsets.is_empty() {
                continue;
            }
            let offsets: &[i32] = bytemuck::cast_slice(&self.body[c.offsets.clone()]);
            let limit = match c.ty {
                ColumnType::List(p) => c.values.len() / p.width(),
                _ => c.values.len(),
            };
            let (first, last) = (offsets.first().copied(), offsets.last().copied());
            let ordered = offsets.windows(2).fold(true, |ok, w| ok & (w[0] <= w[1]));
            if first != Some(0) || !ordered || last.is_none_or(|l| l as usize > limit) {
                return Err(bad(format!(
                    "offsets must rise from 0 to at most {limit}, one per row and one more"
                )));
            }
            if let ColumnType::Utf8 = c.ty {
                let bytes = &self.body[c.values.clone()];
                let used = &bytes[..last.unwrap_or(0) as usize];
                if std::str::from_utf8(used).is_err() {
                    return Err(bad("the strings are not UTF-8".into()));
                }
                // A byte that is not a UTF-8 continuation byte starts a
                // character.
                let splits = offsets
                    .iter()
                    .all(|&o| used.get(o as usize).is_none_or(|&b| (b as i8) >= -0x40));
                if !splits {
                    return Err(bad("an offset splits a character".into()));
                }
            }
        }
        let end = self.layout.total_len;
        self.body[end - CHECKED.len()..end].copy_from_slice(&CHECKED);
        Ok(())
    }

    /// Every column's buffers, in column order.
    pub fn columns(&mut self) -> Vec<ColumnMut<'_>> {
        let mut rest: &mut [u8] = &mut self.body[..];
        let mut consumed = 0usize;
        let mut cut = |r: &Range<usize>| -> &mut [u8] {
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(r.start - consumed);
            let (piece, tail) = tail.split_at_mut(r.len());
            consumed = r.end;
            rest = tail;
            piece
        };
        let mut out = Vec::with_capacity(self.layout.columns.len());
        for c in &self.layout.columns {
            let validity = if c.validity.is_empty() {
                Default::default()
            } else {
                cut(&c.validity)
            };
            let offsets: &mut [i32] = if c.offsets.is_empty() {
                Default::default()
            } else {
                bytemuck::cast_slice_mut(cut(&c.offsets))
            };
            let values = cut(&c.values);
            let values = match c.ty {
                ColumnType::Utf8 => ValuesMut::Bytes(values),
                ColumnType::Primitive(p) | ColumnType::List(p) => typed(p, values),
            };
            out.push(ColumnMut {
                validity,
                offsets,
                values,
            });
        }
        out
    }
}

fn typed(p: Primitive, bytes: &mut [u8]) -> ValuesMut<'_> {
    match p {
        Primitive::Int32 => ValuesMut::Int32(bytemuck::cast_slice_mut(bytes)),
        Primitive::Int64 => ValuesMut::Int64(bytemuck::cast_slice_mut(bytes)),
        Primitive::UInt32 => ValuesMut::UInt32(bytemuck::cast_slice_mut(bytes)),
        Primitive::UInt64 => ValuesMut::UInt64(bytemuck::cast_slice_mut(bytes)),
        Primitive::Float32 => ValuesMut::Float32(bytemuck::cast_slice_mut(bytes)),
        Primitive::Float64 => ValuesMut::Float64(bytemuck::cast_slice_mut(bytes)),
    }
}

/// Copies `batch` into `buf` (planned by [`BatchLayout::of`]): each
/// buffer once, offsets rebased to 0 for sliced arrays.
pub fn write_record_batch(
    layout: &BatchLayout,
    batch: &RecordBatch,
    buf: &mut [u8],
) -> Result<(), LayoutError> {
    let mut writer = BatchWriter::new(layout, buf)?;
    let columns = writer.columns();
    for ((column, field), out) in batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .zip(columns)
    {
        copy_column(field, column, out)?;
    }
    Ok(writer.finish()?)
}

fn copy_column(field: &Field, column: &ArrayRef, out: ColumnMut<'_>) -> Result<(), LayoutError> {
    use arrow_array::cast::AsArray;
    let unsupported = || LayoutError::Unsupported {
        column: field.name().clone(),
        data_type: field.data_type().clone(),
    };
    if !out.validity.is_empty() {
        for i in 0..column.len() {
            if column.is_valid(i) {
                out.validity[i / 8] |= 1 << (i % 8);
            }
        }
    }
    let rebase = |from: &[i32], to: &mut [i32]| {
        let base = from.first().copied().unwrap_or(0);
        for (t, f) in to.iter_mut().zip(from) {
            *t = f - base;
        }
        let end = from.last().copied().unwrap_or(0);
        (base as usize, end as usize)
    };
    match out.values {
        ValuesMut::Bytes(bytes) => {
            let strings = column.as_string_opt::<i32>().ok_or_else(unsupported)?;
            let (a, b) = rebase(strings.value_offsets(), out.offsets);
            bytes.copy_from_slice(strings.values().get(a..b).ok_or_else(unsupported)?);
        }
        values if !out.offsets.is_empty() => {
            let lists = column.as_list_opt::<i32>().ok_or_else(unsupported)?;
            let (a, b) = rebase(lists.value_offsets(), out.offsets);
            copy_primitive(lists.values(), a..b, values).ok_or_else(unsupported)?;
        }
        values => {
            copy_primitive(column, 0..column.len(), values).ok_or_else(unsupported)?;
        }
    }
    Ok(())
}

fn copy_primitive(array: &ArrayRef, range: Range<usize>, out: ValuesMut<'_>) -> Option<()> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    match out {
        ValuesMut::Int32(o) => {
            o.copy_from_slice(array.as_primitive_opt::<Int32Type>()?.values().get(range)?)
        }
        ValuesMut::Int64(o) => {
            o.copy_from_slice(array.as_primitive_opt::<Int64Type>()?.values().get(range)?)
        }
        ValuesMut::UInt32(o) => o.copy_from_slice(
            array
                .as_primitive_opt::<UInt32Type>()?
                .values()
                .get(range)?,
        ),
        ValuesMut::UInt64(o) => o.copy_from_slice(
            array
                .as_primitive_opt::<UInt64Type>()?
                .values()
                .get(range)?,
        ),
        ValuesMut::Float32(o) => o.copy_from_slice(
            array
                .as_primitive_opt::<Float32Type>()?
                .values()
                .get(range)?,
        ),
        ValuesMut::Float64(o) => o.copy_from_slice(
            array
                .as_primitive_opt::<Float64Type>()?
                .values()
                .get(range)?,
        ),
        ValuesMut::Bytes(_) => return None,
    }
    Some(())
}

/// Reads the batch in `buffer` (an Arrow IPC stream of one schema and one
/// record batch) without copying: the returned arrays slice `buffer`.
pub fn read_record_batch(buffer: Buffer) -> Result<RecordBatch, BatchError> {
    let malformed = |why: &str| BatchError::Malformed(why.to_string());
    let (schema_msg, at) = message_at(&buffer, 0)?;
    let schema_msg = arrow_ipc::root_as_message(&schema_msg)
        .map_err(|e| BatchError::Malformed(format!("schema message: {e}")))?;
    let fb_schema = schema_msg
        .header_as_schema()
        .ok_or_else(|| malformed("the first message is not a schema"))?;
    let schema = arrow_ipc::convert::try_fb_to_schema(fb_schema)?;
    let (batch_msg, body_at) = message_at(&buffer, at)?;
    let batch_msg = arrow_ipc::root_as_message(&batch_msg)
        .map_err(|e| BatchError::Malformed(format!("batch message: {e}")))?;
    let fb_batch = batch_msg
        .header_as_record_batch()
        .ok_or_else(|| malformed("the second message is not a record batch"))?;
    if fb_batch.compression().is_some() {
        return Err(malformed("compressed batches are not read"));
    }
    let body_len =
        usize::try_from(batch_msg.bodyLength()).map_err(|_| malformed("a negative body length"))?;
    if body_at
        .checked_add(body_len)
        .is_none_or(|end| end > buffer.len())
    {
        return Err(malformed("the body runs past the end of the object"));
    }
    let body = buffer.slice_with_length(body_at, body_len);
    let dictionaries = HashMap::new();
    let version = batch_msg.version();
    let decoder = arrow_ipc::reader::RecordBatchDecoder::try_new(
        &body,
        fb_batch,
        Arc::new(schema),
        &dictionaries,
        &version,
    )?
    .with_require_alignment(true);
    let checked = buffer.as_slice().ends_with(&CHECKED);
    if !checked {
        return Ok(decoder.read_record_batch()?);
    }
    let mut skip = arrow_data::UnsafeFlag::new();
    // SAFETY: the object ends with `CHECKED`, which only braid's writer
    // puts there (`BatchWriter::finish`, `write_record_batch`), after the
    // headers were generated by `BatchLayout` and every column's offsets,
    // UTF-8 and null count were checked; `BatchWriter::new` clears the mark
    // first, so stale bytes cannot carry it. The object is sealed, so
    // nothing changed since. Every process that maps the arena is trusted
    // not to forge it, as each is trusted not to write sealed objects. The
    // structural checks (buffer sizes against lengths, types against the
    // schema) still run below on every array.
    unsafe { skip.set(true) };
    let batch = decoder.with_skip_validation(skip).read_record_batch()?;
    check_structure(&batch)?;
    Ok(batch)
}

/// The O(1) consistency checks of every array of `batch` (and of its
/// children): buffer counts and sizes against lengths and types, offsets'
/// first and last values, and each column's length and type against the
/// schema.
fn check_structure(batch: &RecordBatch) -> Result<(), BatchError> {
    fn check(data: &arrow_data::ArrayData) -> Result<(), ArrowError> {
        data.validate()?;
        data.child_data().iter().try_for_each(check)
    }
    for (column, field) in batch.columns().iter().zip(batch.schema_ref().fields()) {
        if column.len() != batch.num_rows() || column.data_type() != field.data_type() {
            return Err(BatchError::Invalid(format!(
                "column {} does not match the batch's rows or schema",
                field.name()
            )));
        }
        check(&column.to_data())?;
    }
    Ok(())
}

/// The flatbuffer bytes of the encapsulated message at `at`, and where
/// what follows it starts.
fn message_at(buffer: &Buffer, at: usize) -> Result<(Buffer, usize), BatchError> {
    let malformed = |why: String| BatchError::Malformed(why);
    let bytes = buffer.as_slice();
    let prefix = bytes
        .get(at..at + 8)
        .ok_or_else(|| malformed(format!("no message header at byte {at}")))?;
    if prefix[..4] != CONTINUATION {
        return Err(malformed(format!("no continuation marker at byte {at}")));
    }
    let len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    let start = at + 8;
    if len == 0 || start + len > bytes.len() {
        return Err(malformed(format!("a message of {len} bytes at byte {at}")));
    }
    Ok((buffer.slice_with_length(start, len), start + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{ListBuilder, PrimitiveBuilder, StringBuilder};
    use arrow_array::types::{Float32Type, Int64Type, UInt64Type};
    use arrow_array::{Float64Array, Int32Array};

    fn aligned(len: usize) -> Vec<u64> {
        vec![0u64; len.div_ceil(8)]
    }

    fn sample() -> RecordBatch {
        let mut ids = ListBuilder::new(PrimitiveBuilder::<UInt64Type>::new())
            .with_field(Arc::new(Field::new("item", DataType::UInt64, false)));
        ids.append_value([Some(1), Some(2)]);
        ids.append_value([]);
        ids.append_value([Some(3)]);
        let mut names = StringBuilder::new();
        names.append_value("a");
        names.append_null();
        names.append_value("ccc");
        let times = arrow_array::PrimitiveArray::<Int64Type>::from(vec![Some(5), None, Some(7)]);
        let mut weights = ListBuilder::new(PrimitiveBuilder::<Float32Type>::new())
            .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
        weights.append_value([Some(0.5)]);
        weights.append_value([Some(1.5), Some(2.5)]);
        weights.append_value([]);
        RecordBatch::try_from_iter_with_nullable(vec![
            (
                "k",
                Arc::new(Int32Array::from(vec![1, 2, 3])) as ArrayRef,
                false,
            ),
            (
                "x",
                Arc::new(Float64Array::from(vec![0.1, 0.2, 0.3])),
                false,
            ),
            ("ids", Arc::new(ids.finish()), false),
            ("name", Arc::new(names.finish()), true),
            ("t", Arc::new(times), true),
            ("w", Arc::new(weights.finish()), false),
        ])
        .expect("a valid batch")
    }

    fn round_trip(batch: &RecordBatch) -> RecordBatch {
        let layout = BatchLayout::of(batch).expect("laid out");
        let mut words = aligned(layout.total_len());
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        write_record_batch(&layout, batch, buf).expect("written");
        read_record_batch(Buffer::from_vec(words)).expect("read")
    }

    #[test]
    fn every_column_type_round_trips_with_nulls() {
        let batch = sample();
        assert_eq!(round_trip(&batch), batch);
    }

    #[test]
    fn a_sliced_batch_is_rebased() {
        let batch = sample().slice(1, 2);
        assert_eq!(round_trip(&batch), batch);
    }

    #[test]
    fn arrow_stream_readers_read_the_layout() {
        let batch = sample();
        let layout = BatchLayout::of(&batch).expect("laid out");
        let mut words = aligned(layout.total_len());
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        write_record_batch(&layout, &batch, buf).expect("written");
        let bytes = buf[..layout.total_len()].to_vec();
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .expect("a stream");
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("batches");
        assert_eq!(batches, vec![batch]);
    }

    #[test]
    fn buffers_are_aligned_and_point_into_the_input() {
        let batch = sample();
        let layout = BatchLayout::of(&batch).expect("laid out");
        let mut words = aligned(layout.total_len());
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        write_record_batch(&layout, &batch, buf).expect("written");
        let buffer = Buffer::from_vec(words);
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let read = read_record_batch(buffer.clone()).expect("read");
        for column in read.columns() {
            for b in column.to_data().buffers() {
                let at = b.as_ptr() as usize;
                assert!(b.is_empty() || range.contains(&at), "a buffer was copied");
                assert_eq!((at - range.start) % 8, 0);
            }
        }
    }

    #[test]
    fn bad_shapes_and_buffers_are_refused() {
        assert_eq!(
            BatchLayout::new(1, &[]).err(),
            Some(LayoutError::Columns(0))
        );
        let nulls = ColumnSpec::primitive("a", Primitive::Int32);
        let nulls = ColumnSpec { nulls: 1, ..nulls };
        assert!(matches!(
            BatchLayout::new(1, &[nulls]),
            Err(LayoutError::Column { .. })
        ));
        let layout =
            BatchLayout::new(4, &[ColumnSpec::primitive("a", Primitive::Int64)]).expect("laid out");
        let mut words = aligned(layout.total_len() + 8);
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        assert!(matches!(
            BatchWriter::new(&layout, &mut buf[..8]),
            Err(LayoutError::BufferTooSmall { .. })
        ));
        assert_eq!(
            BatchWriter::new(&layout, &mut buf[4..]).map(|_| ()),
            Err(LayoutError::Misaligned)
        );
    }

    /// A batch of one `Utf8` column with `strings`, one nullable `Int32`
    /// column with `nulls` nulls declared, and one `List<UInt64>` column;
    /// `fill` may spoil what the writer wrote before it is finished.
    fn written(
        nulls: usize,
        spoil: impl FnOnce(&mut [ColumnMut<'_>]),
    ) -> (Vec<u64>, Result<(), FinishError>) {
        let strings = ["ab", "", "ü€"];
        let bytes: usize = strings.iter().map(|s| s.len()).sum();
        let layout = BatchLayout::new(
            3,
            &[
                ColumnSpec {
                    name: "s".into(),
                    ty: ColumnType::Utf8,
                    nullable: false,
                    nulls: 0,
                    values: bytes,
                },
                ColumnSpec {
                    nullable: true,
                    nulls,
                    ..ColumnSpec::primitive("n", Primitive::Int32)
                },
                ColumnSpec::list("l", Primitive::UInt64, 4),
            ],
        )
        .expect("laid out");
        let mut words = aligned(layout.total_len());
        // A stale mark where this batch's will go must not survive.
        let end = layout.total_len();
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[end - 8..end].copy_from_slice(&CHECKED);
        let mut writer =
            BatchWriter::new(&layout, bytemuck::cast_slice_mut(&mut words)).expect("fits");
        let mut columns = writer.columns();
        {
            let [s, n, l] = &mut columns[..] else {
                panic!("three columns");
            };
            let mut at = 0;
            for (i, text) in strings.iter().enumerate() {
                s.offsets[i] = at as i32;
                if let ValuesMut::Bytes(b) = &mut s.values {
                    b[at..at + text.len()].copy_from_slice(text.as_bytes());
                }
                at += text.len();
            }
            s.offsets[3] = at as i32;
            n.validity[0] = 0b101;
            l.offsets.copy_from_slice(&[0, 1, 1, 4]);
        }
        spoil(&mut columns);
        drop(columns);
        let finished = writer.finish();
        (words, finished)
    }

    #[test]
    fn a_finished_batch_is_marked_and_read_without_a_scan() {
        let (words, finished) = written(1, |_| {});
        assert_eq!(finished, Ok(()));
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        assert!(bytes.ends_with(&CHECKED));
        let batch = read_record_batch(Buffer::from_vec(words)).expect("read");
        use arrow_array::cast::AsArray;
        assert_eq!(batch.column(0).as_string::<i32>().value(2), "ü€");
        assert_eq!(batch.column(1).null_count(), 1);
        assert_eq!(batch.column(2).as_list::<i32>().value(2).len(), 3);
    }

    #[test]
    fn finish_refuses_what_arrow_would_and_leaves_no_mark() {
        type Spoil = Box<dyn FnOnce(&mut [ColumnMut<'_>])>;
        let cases: Vec<(&str, usize, Spoil)> = vec![
            ("a wrong null count", 2, Box::new(|_| {})),
            (
                "falling offsets",
                1,
                Box::new(|c| c[2].offsets.copy_from_slice(&[0, 2, 1, 4])),
            ),
            (
                "offsets past the values",
                1,
                Box::new(|c| c[2].offsets[3] = 5),
            ),
            (
                "a first offset not 0 (Arrow allows it; the layout does not)",
                1,
                Box::new(|c| c[2].offsets[0] = 1),
            ),
            (
                "bytes that are not UTF-8",
                1,
                Box::new(|c| {
                    if let ValuesMut::Bytes(b) = &mut c[0].values {
                        b[0] = 0xff;
                    }
                }),
            ),
            (
                "an offset inside a character",
                1,
                Box::new(|c| c[0].offsets[2] = 3),
            ),
        ];
        for (what, nulls, spoil) in cases {
            let (words, finished) = written(nulls, spoil);
            assert!(finished.is_err(), "{what} was accepted");
            let bytes: &[u8] = bytemuck::cast_slice(&words);
            assert!(!bytes.ends_with(&CHECKED), "{what} left the mark");
            // Unmarked, the reader validates in full and refuses it too.
            let read = read_record_batch(Buffer::from_vec(words));
            assert!(
                read.is_err() || what.contains("Arrow allows"),
                "{what} was read"
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [
            vec![],
            vec![0xff; 8],
            vec![0; 64],
            b"BRDBATCH-old-format".to_vec(),
        ] {
            assert!(read_record_batch(Buffer::from_vec(bytes)).is_err());
        }
    }
}
