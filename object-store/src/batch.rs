//! Columnar batches laid out in one contiguous byte buffer.
//!
//! A producer lays a batch out directly in a store object with
//! [`BatchWriter`]; readers in other processes view the same bytes in place
//! with [`BatchReader`], getting `&[T]` column slices without copying. Building
//! costs O(columns): only the header and directory are written, the producer
//! fills column data itself.
//!
//! # Binary layout
//!
//! All integers are little-endian; offsets are relative to the buffer start,
//! which must be [`COLUMN_ALIGN`]-byte aligned.
//!
//! Header, 32 bytes:
//!
//! | offset | size | field                                    |
//! |-------:|-----:|------------------------------------------|
//! |      0 |    8 | magic, [`MAGIC`] (`b"BRDBATCH"`)          |
//! |      8 |    4 | format version, [`FORMAT_VERSION`]        |
//! |     12 |    4 | column count `n`, `1..=`[`MAX_COLUMNS`]   |
//! |     16 |    8 | total length of the batch in bytes        |
//! |     24 |    4 | CRC-32 (IEEE) of header + directory       |
//! |     28 |    4 | reserved, zero                            |
//!
//! The CRC covers bytes `0..24` and `28..32 + 96 * n`, i.e. the header
//! without the CRC field plus the whole directory. It deliberately excludes
//! column data so building stays zero-copy; it detects a torn or garbage
//! header, not corrupted data.
//!
//! Directory, `n` entries of 96 bytes each, starting at offset 32:
//!
//! | offset | size | field                                           |
//! |-------:|-----:|-------------------------------------------------|
//! |      0 |    1 | name length, `1..=`[`MAX_NAME_LEN`]              |
//! |      1 |   64 | name, UTF-8, zero-padded to [`MAX_NAME_LEN`]     |
//! |     65 |    1 | dtype tag ([`DType::tag`])                       |
//! |     66 |    6 | reserved, zero                                  |
//! |     72 |    8 | element count                                   |
//! |     80 |    8 | byte offset of the column data                  |
//! |     88 |    8 | byte length of the column data (count × size)   |
//!
//! Column data follows the directory. Every column starts at a multiple of
//! [`COLUMN_ALIGN`], so any element type can be viewed in place. The writer
//! places columns in directory order with zeroed alignment padding; the reader
//! accepts any placement that is aligned, after the directory, within the
//! total length and non-overlapping. The buffer may be longer than the total
//! length (allocators round object sizes up); the excess is ignored.
//!
//! # Trust
//!
//! [`BatchReader::new`] treats the buffer as untrusted (another process wrote
//! it) and rejects anything malformed with a [`BatchError`]; no input makes it
//! panic, read out of bounds or hand out a misaligned slice. Column *values*
//! are not validated: every bit pattern is a valid element.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

/// Maximum number of columns in a batch.
pub const MAX_COLUMNS: usize = 256;
/// Maximum length of a column name in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 64;
/// Alignment, in bytes, of the buffer start and of every column's data.
pub const COLUMN_ALIGN: u64 = 64;
/// The eight bytes every batch starts with.
pub const MAGIC: [u8; 8] = *b"BRDBATCH";
/// The layout version written by [`BatchWriter`] and the only one
/// [`BatchReader`] accepts.
pub const FORMAT_VERSION: u32 = 1;

const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 96;
const CRC_FIELD: Range<usize> = 24..28;

// Header field offsets.
const H_VERSION: usize = 8;
const H_COUNT: usize = 12;
const H_TOTAL_LEN: usize = 16;
const H_CRC: usize = 24;
const H_RESERVED: usize = 28;

// Directory entry field offsets.
const E_NAME_LEN: usize = 0;
const E_NAME: usize = 1;
const E_DTYPE: usize = E_NAME + MAX_NAME_LEN;
const E_RESERVED: Range<usize> = (E_DTYPE + 1)..72;
const E_COUNT: usize = 72;
const E_OFFSET: usize = 80;
const E_BYTE_LEN: usize = 88;

/// The element type of a column.
///
/// The discriminant is the on-disk tag; variants must never be reordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum DType {
    /// `u8`
    U8,
    /// `u16`
    U16,
    /// `u32`
    U32,
    /// `u64`
    U64,
    /// `i8`
    I8,
    /// `i16`
    I16,
    /// `i32`
    I32,
    /// `i64`
    I64,
    /// `f32`
    F32,
    /// `f64`
    F64,
}

impl DType {
    /// Every dtype, in tag order.
    pub const ALL: [DType; 10] = [
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F32,
        DType::F64,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The tag that identifies this dtype in a batch directory.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// The dtype with the given directory tag, or `None` for an unknown tag.
    pub fn from_tag(tag: u8) -> Option<DType> {
        DType::ALL.get(usize::from(tag)).copied()
    }
}

mod sealed {
    /// Restricts [`super::Element`] to the primitive types with a [`super::DType`].
    pub trait Sealed {}
}

/// Element types a column can hold: plain old data with a fixed dtype tag.
///
/// Sealed: implemented exactly for `u8`..`u64`, `i8`..`i64`, `f32` and `f64`.
pub trait Element: bytemuck::Pod + sealed::Sealed {
    /// The dtype stored in the directory for columns of this type.
    const DTYPE: DType;
}

macro_rules! impl_element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t {
                const DTYPE: DType = DType::$d;
            }
        )*
    };
}

impl_element!(
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    f32 => F32, f64 => F64,
);

/// A batch schema was invalid, or a buffer cannot hold it.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The schema has no columns.
    #[error("a batch needs at least one column")]
    NoColumns,
    /// The schema has more than [`MAX_COLUMNS`] columns.
    #[error("{count} columns exceed the maximum of {MAX_COLUMNS}")]
    TooManyColumns {
        /// Number of columns given.
        count: usize,
    },
    /// A column name is empty.
    #[error("column {index} has an empty name")]
    EmptyName {
        /// Position of the column in the schema.
        index: usize,
    },
    /// A column name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("column name {name:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong {
        /// The offending name.
        name: String,
    },
    /// Two columns share a name.
    #[error("duplicate column name {name:?}")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// The batch size does not fit in `u64`.
    #[error("column {name:?} makes the batch size overflow")]
    TooLarge {
        /// The column whose size or offset overflowed.
        name: String,
    },
    /// The buffer is shorter than the batch's total length.
    #[error("buffer holds {available} bytes but the batch needs {needed}")]
    BufferTooSmall {
        /// The batch's total length.
        needed: u64,
        /// The buffer's length.
        available: usize,
    },
    /// The buffer does not start at a [`COLUMN_ALIGN`]-byte boundary.
    #[error("buffer at {addr:#x} is not {COLUMN_ALIGN}-byte aligned")]
    MisalignedBuffer {
        /// Address of the buffer start.
        addr: usize,
    },
}

/// A buffer is not a valid batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The buffer does not start at a [`COLUMN_ALIGN`]-byte boundary.
    #[error("buffer at {addr:#x} is not {COLUMN_ALIGN}-byte aligned")]
    MisalignedBuffer {
        /// Address of the buffer start.
        addr: usize,
    },
    /// The buffer is shorter than the header, directory or declared total
    /// length.
    #[error("buffer holds {available} bytes but the batch needs {needed}")]
    Truncated {
        /// Bytes the batch needs.
        needed: u64,
        /// The buffer's length.
        available: usize,
    },
    /// The buffer does not start with [`MAGIC`].
    #[error("not a batch (bad magic)")]
    BadMagic,
    /// The format version is not [`FORMAT_VERSION`].
    #[error("unsupported batch format version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// The column count is zero or above [`MAX_COLUMNS`].
    #[error("invalid column count {count}")]
    BadColumnCount {
        /// The count found.
        count: u32,
    },
    /// The header and directory do not match their CRC (torn or garbage
    /// write).
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChecksumMismatch {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes actually present.
        computed: u32,
    },
    /// A header field is inconsistent.
    #[error("invalid batch header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// A directory entry is invalid.
    #[error("invalid directory entry {index}: {reason}")]
    BadColumn {
        /// Position of the entry in the directory.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A column could not be accessed.
#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    /// The batch has no column with this name.
    #[error("no column named {name:?}")]
    NoSuchColumn {
        /// The requested name.
        name: String,
    },
    /// The column was requested with a different element type than it holds.
    #[error("column {name:?} holds {expected:?} but was accessed as {found:?}")]
    WrongType {
        /// The column's name.
        name: String,
        /// The dtype the column holds.
        expected: DType,
        /// The dtype of the requested element type.
        found: DType,
    },
    /// [`ColumnsMut::take`] was called twice for the same column.
    #[error("column {name:?} was already taken")]
    AlreadyTaken {
        /// The column's name.
        name: String,
    },
    /// The column's bytes cannot be viewed as its element type. Validation
    /// rules this out; it is reported instead of panicking should the
    /// invariants ever be broken.
    #[error("column {name:?} is out of bounds or misaligned")]
    InvalidSlice {
        /// The column's name.
        name: String,
    },
}

/// Name, element type and length of one column in a batch schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnSpec {
    /// Column name, unique within the batch, `1..=`[`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Number of elements (not bytes).
    pub len: u64,
}

impl ColumnSpec {
    /// A column of `len` elements of type `T`.
    pub fn new<T: Element>(name: impl Into<String>, len: u64) -> Self {
        ColumnSpec {
            name: name.into(),
            dtype: T::DTYPE,
            len,
        }
    }
}

/// A validated schema with every column's byte offset computed.
///
/// Build one with [`BatchLayout::new`] to learn how large the store object
/// must be ([`total_len`](Self::total_len)), then hand it to [`BatchWriter`].
#[derive(Clone, Debug)]
pub struct BatchLayout {
    columns: Vec<ColumnSpec>,
    /// Byte offset of each column's data; ascending, aligned, non-overlapping.
    offsets: Vec<u64>,
    total_len: u64,
}

fn align_up(x: u64) -> Option<u64> {
    Some(x.checked_add(COLUMN_ALIGN - 1)? & !(COLUMN_ALIGN - 1))
}

/// Length of the header plus a directory of `count` entries.
fn directory_end(count: usize) -> Option<usize> {
    count.checked_mul(ENTRY_LEN)?.checked_add(HEADER_LEN)
}

impl BatchLayout {
    /// Validates `columns` (count, names) and computes the layout, with
    /// columns placed in the given order.
    pub fn new(columns: &[ColumnSpec]) -> Result<BatchLayout, LayoutError> {
        if columns.is_empty() {
            return Err(LayoutError::NoColumns);
        }
        if columns.len() > MAX_COLUMNS {
            return Err(LayoutError::TooManyColumns {
                count: columns.len(),
            });
        }
        let mut seen = HashSet::with_capacity(columns.len());
        for (index, c) in columns.iter().enumerate() {
            if c.name.is_empty() {
                return Err(LayoutError::EmptyName { index });
            }
            if c.name.len() > MAX_NAME_LEN {
                return Err(LayoutError::NameTooLong {
                    name: c.name.clone(),
                });
            }
            if !seen.insert(c.name.as_str()) {
                return Err(LayoutError::DuplicateName {
                    name: c.name.clone(),
                });
            }
        }

        // At most MAX_COLUMNS entries, so this cannot overflow.
        let dir_end = directory_end(columns.len()).unwrap_or(usize::MAX) as u64;
        let mut offsets = Vec::with_capacity(columns.len());
        let mut cursor = dir_end;
        for c in columns {
            let too_large = || LayoutError::TooLarge {
                name: c.name.clone(),
            };
            let byte_len = c
                .len
                .checked_mul(c.dtype.size() as u64)
                .ok_or_else(too_large)?;
            let offset = align_up(cursor).ok_or_else(too_large)?;
            cursor = offset.checked_add(byte_len).ok_or_else(too_large)?;
            offsets.push(offset);
        }
        Ok(BatchLayout {
            columns: columns.to_vec(),
            offsets,
            total_len: cursor,
        })
    }

    /// Bytes the buffer (store object) must have to hold the batch.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// The columns, in directory order.
    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    /// Header and directory bytes, CRC included.
    fn encode_directory(&self) -> Vec<u8> {
        let count = self.columns.len();
        let mut out = Vec::with_capacity(directory_end(count).unwrap_or(0));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // count <= MAX_COLUMNS, checked in `new`.
        out.extend_from_slice(&(count as u32).to_le_bytes());
        out.extend_from_slice(&self.total_len.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, filled in below
        out.extend_from_slice(&[0; 4]); // reserved
        for (c, &offset) in self.columns.iter().zip(&self.offsets) {
            let name = c.name.as_bytes();
            let mut padded = [0u8; MAX_NAME_LEN];
            for (dst, src) in padded.iter_mut().zip(name) {
                *dst = *src;
            }
            // name.len() <= MAX_NAME_LEN (< 256), checked in `new`.
            out.push(name.len() as u8);
            out.extend_from_slice(&padded);
            out.push(c.dtype.tag());
            out.extend_from_slice(&[0; E_RESERVED.end - E_RESERVED.start]);
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            // Cannot overflow: `new` computed the same product.
            out.extend_from_slice(&(c.len * c.dtype.size() as u64).to_le_bytes());
        }
        let crc = checksum(&out);
        if let Some(slot) = out.get_mut(CRC_FIELD) {
            slot.copy_from_slice(&crc.to_le_bytes());
        }
        out
    }
}

/// CRC of a header + directory, skipping the CRC field itself.
fn checksum(header_and_directory: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_and_directory.get(..CRC_FIELD.start).unwrap_or(&[]));
    h.update(header_and_directory.get(CRC_FIELD.end..).unwrap_or(&[]));
    h.finalize()
}

fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize) % (COLUMN_ALIGN as usize) == 0
}

fn find_column(columns: &[ColumnSpec], name: &str, requested: DType) -> Result<usize, ColumnError> {
    // Linear scan: at most MAX_COLUMNS short names, cheaper than hashing.
    let (index, c) = columns
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == name)
        .ok_or_else(|| ColumnError::NoSuchColumn {
            name: name.to_owned(),
        })?;
    if c.dtype != requested {
        return Err(ColumnError::WrongType {
            name: name.to_owned(),
            expected: c.dtype,
            found: requested,
        });
    }
    Ok(index)
}

fn invalid_slice(name: &str) -> ColumnError {
    ColumnError::InvalidSlice {
        name: name.to_owned(),
    }
}

/// Lays a batch out in place in a caller-provided buffer (e.g. a store object
/// being created) and hands out its columns for filling.
///
/// [`new`](Self::new) writes the header and directory; column data is
/// whatever the buffer held until the producer writes it (fresh store objects
/// are zeroed).
pub struct BatchWriter<'a> {
    buf: &'a mut [u8],
    layout: BatchLayout,
    /// Byte range of each column, parallel to `layout.columns`; ascending,
    /// non-overlapping and within `buf`.
    ranges: Vec<Range<usize>>,
}

impl fmt::Debug for BatchWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchWriter")
            .field("layout", &self.layout)
            .field("buf_len", &self.buf.len())
            .finish()
    }
}

impl<'a> BatchWriter<'a> {
    /// Writes the header and directory for `layout` into `buf`, which must be
    /// [`COLUMN_ALIGN`]-aligned and at least `layout.total_len()` bytes.
    pub fn new(layout: &BatchLayout, buf: &'a mut [u8]) -> Result<Self, LayoutError> {
        if !is_aligned(buf) {
            return Err(LayoutError::MisalignedBuffer {
                addr: buf.as_ptr() as usize,
            });
        }
        let available = buf.len();
        let too_small = || LayoutError::BufferTooSmall {
            needed: layout.total_len,
            available,
        };
        match usize::try_from(layout.total_len) {
            Ok(total) if total <= buf.len() => {}
            _ => return Err(too_small()),
        }
        // Every offset and end is <= total_len <= buf.len(), so the
        // conversions below succeed; they are checked anyway.
        let mut ranges = Vec::with_capacity(layout.columns.len());
        for (c, &offset) in layout.columns.iter().zip(&layout.offsets) {
            let start = usize::try_from(offset).map_err(|_| too_small())?;
            let byte_len = c.len.checked_mul(c.dtype.size() as u64);
            let end = byte_len
                .and_then(|l| usize::try_from(l).ok())
                .and_then(|l| start.checked_add(l))
                .ok_or_else(too_small)?;
            ranges.push(start..end);
        }

        let directory = layout.encode_directory();
        buf.get_mut(..directory.len())
            .ok_or_else(too_small)?
            .copy_from_slice(&directory);
        // Zero the alignment padding so identical batches are byte-identical.
        let mut gap_start = directory.len();
        for r in &ranges {
            if let Some(gap) = buf.get_mut(gap_start..r.start) {
                gap.fill(0);
            }
            gap_start = r.end;
        }

        Ok(BatchWriter {
            buf,
            layout: layout.clone(),
            ranges,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// The column `name` as a mutable slice of `T`, for filling one column at
    /// a time; use [`split_columns_mut`](Self::split_columns_mut) to fill
    /// several at once.
    pub fn column_mut<T: Element>(&mut self, name: &str) -> Result<&mut [T], ColumnError> {
        let index = find_column(&self.layout.columns, name, T::DTYPE)?;
        let range = self.ranges.get(index).ok_or_else(|| invalid_slice(name))?;
        let bytes = self
            .buf
            .get_mut(range.clone())
            .ok_or_else(|| invalid_slice(name))?;
        bytemuck::try_cast_slice_mut(bytes).map_err(|_| invalid_slice(name))
    }

    /// Splits the buffer into every column at once, so a producer can hold
    /// mutable slices of several columns simultaneously.
    pub fn split_columns_mut(&mut self) -> Result<ColumnsMut<'_>, ColumnError> {
        let columns = &self.layout.columns;
        let mut slots = Vec::with_capacity(self.ranges.len());
        let mut rest: &mut [u8] = &mut *self.buf;
        let mut consumed = 0usize;
        for (c, r) in columns.iter().zip(&self.ranges) {
            let split = r
                .start
                .checked_sub(consumed)
                .and_then(|skip| std::mem::take(&mut rest).split_at_mut_checked(skip))
                .and_then(|(_, tail)| tail.split_at_mut_checked(r.len()))
                .ok_or_else(|| invalid_slice(&c.name))?;
            let (column, tail) = split;
            slots.push(Some(column));
            rest = tail;
            consumed = r.end;
        }
        Ok(ColumnsMut { columns, slots })
    }
}

/// Every column of a [`BatchWriter`], each of which can be taken mutably once.
///
/// Obtained from [`BatchWriter::split_columns_mut`]; use when filling several
/// columns together (labels, offsets and features of the same rows).
pub struct ColumnsMut<'b> {
    columns: &'b [ColumnSpec],
    /// `None` once taken.
    slots: Vec<Option<&'b mut [u8]>>,
}

impl fmt::Debug for ColumnsMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ColumnsMut")
            .field("columns", &self.columns)
            .field(
                "taken",
                &self.slots.iter().map(Option::is_none).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<'b> ColumnsMut<'b> {
    /// Takes column `name` as a mutable slice of `T`; each column can be taken
    /// once ([`ColumnError::AlreadyTaken`] afterwards).
    pub fn take<T: Element>(&mut self, name: &str) -> Result<&'b mut [T], ColumnError> {
        let index = find_column(self.columns, name, T::DTYPE)?;
        let bytes = self
            .slots
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| ColumnError::AlreadyTaken {
                name: name.to_owned(),
            })?;
        bytemuck::try_cast_slice_mut(bytes).map_err(|_| invalid_slice(name))
    }
}

struct ReadColumn<'a> {
    name: &'a str,
    dtype: DType,
    /// Exactly `count * dtype.size()` bytes at an aligned address in the
    /// batch buffer.
    data: &'a [u8],
}

/// A validated, read-only view of a batch in a buffer written by someone else
/// (typically another process), giving zero-copy column slices.
pub struct BatchReader<'a> {
    columns: Vec<ReadColumn<'a>>,
    total_len: u64,
}

impl fmt::Debug for BatchReader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns: Vec<_> = self
            .columns
            .iter()
            .map(|c| (c.name, c.dtype, c.data.len()))
            .collect();
        f.debug_struct("BatchReader")
            .field("columns", &columns)
            .field("total_len", &self.total_len)
            .finish()
    }
}

fn array_at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    array_at(bytes, at).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    array_at(bytes, at).map(u64::from_le_bytes)
}

struct Placement {
    index: usize,
    start: u64,
    end: u64,
}

impl<'a> BatchReader<'a> {
    /// Validates `buf` as a batch: alignment, magic, version, column count,
    /// CRC, and every directory entry (name, dtype, alignment, bounds,
    /// length, no overlap). Fails with an error on any malformed input.
    pub fn new(buf: &'a [u8]) -> Result<Self, BatchError> {
        if !is_aligned(buf) {
            return Err(BatchError::MisalignedBuffer {
                addr: buf.as_ptr() as usize,
            });
        }
        let truncated = |needed: u64| BatchError::Truncated {
            needed,
            available: buf.len(),
        };
        let header = buf.get(..HEADER_LEN).ok_or(truncated(HEADER_LEN as u64))?;
        // The header is HEADER_LEN bytes, so the field reads below succeed.
        let short = || truncated(HEADER_LEN as u64);
        if header.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(BatchError::BadMagic);
        }
        let version = u32_at(header, H_VERSION).ok_or_else(short)?;
        if version != FORMAT_VERSION {
            return Err(BatchError::UnsupportedVersion { version });
        }
        let count = u32_at(header, H_COUNT).ok_or_else(short)?;
        let n = usize::try_from(count).unwrap_or(usize::MAX);
        if n == 0 || n > MAX_COLUMNS {
            return Err(BatchError::BadColumnCount { count });
        }
        // n <= MAX_COLUMNS, so no overflow.
        let dir_end = directory_end(n).unwrap_or(usize::MAX);
        let header_and_dir = buf.get(..dir_end).ok_or(truncated(dir_end as u64))?;
        let stored = u32_at(header, H_CRC).ok_or_else(short)?;
        let computed = checksum(header_and_dir);
        if stored != computed {
            return Err(BatchError::ChecksumMismatch { stored, computed });
        }
        if u32_at(header, H_RESERVED).ok_or_else(short)? != 0 {
            return Err(BatchError::BadHeader {
                reason: "reserved bytes are not zero",
            });
        }
        let total_len = u64_at(header, H_TOTAL_LEN).ok_or_else(short)?;
        let dir_end = dir_end as u64;
        if total_len < dir_end {
            return Err(BatchError::BadHeader {
                reason: "total length is shorter than the directory",
            });
        }
        if total_len > buf.len() as u64 {
            return Err(truncated(total_len));
        }

        let mut columns = Vec::with_capacity(n);
        let mut placements = Vec::with_capacity(n);
        let mut names = HashSet::with_capacity(n);
        for index in 0..n {
            let bad = |reason| BatchError::BadColumn { index, reason };
            let entry = HEADER_LEN
                .checked_add(index * ENTRY_LEN)
                .and_then(|start| header_and_dir.get(start..start.checked_add(ENTRY_LEN)?))
                .ok_or(bad("entry outside the directory"))?;
            let (name, dtype, count, offset, byte_len) = parse_entry(entry).map_err(bad)?;
            if !names.insert(name) {
                return Err(bad("duplicate column name"));
            }
            let expected_len = count
                .checked_mul(dtype.size() as u64)
                .ok_or(bad("element count overflows"))?;
            if byte_len != expected_len {
                return Err(bad("byte length is not element count times dtype size"));
            }
            if offset % COLUMN_ALIGN != 0 {
                return Err(bad("data offset is not aligned"));
            }
            if offset < dir_end {
                return Err(bad("data overlaps the header or directory"));
            }
            let end = offset
                .checked_add(byte_len)
                .filter(|&end| end <= total_len)
                .ok_or(bad("data extends past the total length"))?;
            // end <= total_len <= buf.len(), so both conversions succeed.
            let data = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(s, e)| buf.get(s..e))
                .ok_or(bad("data extends past the buffer"))?;
            placements.push(Placement {
                index,
                start: offset,
                end,
            });
            columns.push(ReadColumn { name, dtype, data });
        }

        // Empty ranges sort before non-empty ones at the same offset, so
        // adjacent-pair checks catch every overlap of non-empty ranges.
        placements.sort_unstable_by_key(|p| (p.start, p.end));
        for pair in placements.windows(2) {
            if let [a, b] = pair {
                if a.end > b.start {
                    return Err(BatchError::BadColumn {
                        index: b.index.max(a.index),
                        reason: "data overlaps another column",
                    });
                }
            }
        }

        Ok(BatchReader { columns, total_len })
    }

    /// Number of columns in the batch.
    pub fn num_columns(&self) -> usize {
        self.columns.len()
    }

    /// The column names, in directory order.
    pub fn column_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.columns.iter().map(|c| c.name)
    }

    /// The element type of column `name`, or `None` if there is no such
    /// column.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.dtype)
    }

    /// The batch's total length in bytes as declared in its header.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// The column `name` as a slice of `T` pointing into the buffer (no
    /// copy).
    pub fn column<T: Element>(&self, name: &str) -> Result<&'a [T], ColumnError> {
        // Linear scan: at most MAX_COLUMNS short names, cheaper than hashing.
        let c = self
            .columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ColumnError::NoSuchColumn {
                name: name.to_owned(),
            })?;
        if c.dtype != T::DTYPE {
            return Err(ColumnError::WrongType {
                name: name.to_owned(),
                expected: c.dtype,
                found: T::DTYPE,
            });
        }
        bytemuck::try_cast_slice(c.data).map_err(|_| invalid_slice(name))
    }
}

type Entry<'a> = (&'a str, DType, u64, u64, u64);

/// Parses one directory entry into (name, dtype, count, offset, byte_len);
/// the error is the reason it is invalid.
fn parse_entry(entry: &[u8]) -> Result<Entry<'_>, &'static str> {
    const SHORT: &str = "entry is truncated";
    let name_len = usize::from(*entry.get(E_NAME_LEN).ok_or(SHORT)?);
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err("name length out of range");
    }
    let name_field = entry.get(E_NAME..E_NAME + MAX_NAME_LEN).ok_or(SHORT)?;
    let (name, padding) = name_field.split_at_checked(name_len).ok_or(SHORT)?;
    if padding.iter().any(|&b| b != 0) {
        return Err("name padding is not zero");
    }
    let name = std::str::from_utf8(name).map_err(|_| "name is not UTF-8")?;
    let tag = *entry.get(E_DTYPE).ok_or(SHORT)?;
    let dtype = DType::from_tag(tag).ok_or("unknown dtype tag")?;
    if entry.get(E_RESERVED).ok_or(SHORT)?.iter().any(|&b| b != 0) {
        return Err("reserved bytes are not zero");
    }
    let count = u64_at(entry, E_COUNT).ok_or(SHORT)?;
    let offset = u64_at(entry, E_OFFSET).ok_or(SHORT)?;
    let byte_len = u64_at(entry, E_BYTE_LEN).ok_or(SHORT)?;
    Ok((name, dtype, count, offset, byte_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A zeroed byte buffer whose start is COLUMN_ALIGN-aligned (offset into
    /// an over-allocated Vec; no unsafe needed).
    struct AlignedBuf {
        raw: Vec<u8>,
        start: usize,
        len: usize,
    }

    impl AlignedBuf {
        fn new(len: usize) -> Self {
            let raw = vec![0u8; len + COLUMN_ALIGN as usize];
            let start = raw.as_ptr().align_offset(COLUMN_ALIGN as usize);
            AlignedBuf { raw, start, len }
        }
        fn from_bytes(bytes: &[u8]) -> Self {
            let mut b = AlignedBuf::new(bytes.len());
            b.as_mut().copy_from_slice(bytes);
            b
        }
        fn as_ref(&self) -> &[u8] {
            &self.raw[self.start..self.start + self.len]
        }
        fn as_mut(&mut self) -> &mut [u8] {
            &mut self.raw[self.start..self.start + self.len]
        }
    }

    fn entry_start(index: usize) -> usize {
        HEADER_LEN + index * ENTRY_LEN
    }

    fn set_u64(buf: &mut [u8], at: usize, v: u64) {
        buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Recomputes the CRC so a deliberate corruption reaches entry checks.
    fn fix_crc(buf: &mut [u8]) {
        let n = u32::from_le_bytes(buf[H_COUNT..H_COUNT + 4].try_into().unwrap()) as usize;
        let Some(dir_end) = directory_end(n) else {
            return;
        };
        if n > MAX_COLUMNS || dir_end > buf.len() {
            return;
        }
        let crc = checksum(&buf[..dir_end]);
        buf[CRC_FIELD].copy_from_slice(&crc.to_le_bytes());
    }

    const ROWS: usize = 5;
    const NNZ: usize = 12;

    fn ctr_layout() -> BatchLayout {
        BatchLayout::new(&[
            ColumnSpec::new::<f32>("label", ROWS as u64),
            ColumnSpec::new::<u32>("offsets", ROWS as u64 + 1),
            ColumnSpec::new::<u64>("feature", NNZ as u64),
            ColumnSpec::new::<f64>("weight", NNZ as u64),
        ])
        .unwrap()
    }

    fn ctr_batch() -> AlignedBuf {
        let layout = ctr_layout();
        let mut buf = AlignedBuf::new(layout.total_len() as usize);
        let mut w = BatchWriter::new(&layout, buf.as_mut()).unwrap();
        let mut cols = w.split_columns_mut().unwrap();
        let label = cols.take::<f32>("label").unwrap();
        let offsets = cols.take::<u32>("offsets").unwrap();
        let feature = cols.take::<u64>("feature").unwrap();
        let weight = cols.take::<f64>("weight").unwrap();
        for (i, l) in label.iter_mut().enumerate() {
            *l = (i % 2) as f32;
        }
        for (i, o) in offsets.iter_mut().enumerate() {
            *o = (i * NNZ / ROWS) as u32;
        }
        for (i, (f, wt)) in feature.iter_mut().zip(weight.iter_mut()).enumerate() {
            *f = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            *wt = i as f64 * 0.5;
        }
        buf
    }

    fn within(buf: &[u8], slice: &[u8]) -> bool {
        let b = buf.as_ptr_range();
        let s = slice.as_ptr_range();
        b.start <= s.start && s.end <= b.end
    }

    #[test]
    fn dtype_tags_round_trip() {
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(d.tag() as usize, i);
            assert_eq!(DType::from_tag(d.tag()), Some(*d));
        }
        assert_eq!(DType::from_tag(10), None);
        assert_eq!(DType::from_tag(255), None);
        assert_eq!(<f64 as Element>::DTYPE.size(), 8);
        assert_eq!(<i16 as Element>::DTYPE.size(), 2);
    }

    #[test]
    fn ctr_round_trip_zero_copy() {
        let buf = ctr_batch();
        let bytes = buf.as_ref();
        let r = BatchReader::new(bytes).unwrap();
        assert_eq!(r.num_columns(), 4);
        assert_eq!(
            r.column_names().collect::<Vec<_>>(),
            ["label", "offsets", "feature", "weight"]
        );
        assert_eq!(r.dtype("offsets"), Some(DType::U32));
        assert_eq!(r.dtype("nope"), None);
        assert_eq!(r.total_len(), ctr_layout().total_len());

        let label = r.column::<f32>("label").unwrap();
        let offsets = r.column::<u32>("offsets").unwrap();
        let feature = r.column::<u64>("feature").unwrap();
        let weight = r.column::<f64>("weight").unwrap();
        assert_eq!(label, &[0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(offsets, &[0, 2, 4, 7, 9, 12]);
        assert_eq!(feature.len(), NNZ);
        assert_eq!(feature[3], 3u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_eq!(weight[11], 5.5);

        // Zero-copy: every slice points into the buffer, at an aligned address.
        for s in [
            bytemuck::cast_slice::<f32, u8>(label),
            bytemuck::cast_slice(offsets),
            bytemuck::cast_slice(feature),
            bytemuck::cast_slice(weight),
        ] {
            assert!(within(bytes, s));
            assert_eq!(s.as_ptr() as usize % COLUMN_ALIGN as usize, 0);
        }
    }

    #[test]
    fn column_mut_and_larger_buffer() {
        let layout = ctr_layout();
        // Objects are often rounded up; the excess is ignored.
        let mut buf = AlignedBuf::new(layout.total_len() as usize + 100);
        buf.as_mut().fill(0xEE);
        let mut w = BatchWriter::new(&layout, buf.as_mut()).unwrap();
        assert_eq!(w.layout().columns().len(), 4);
        w.column_mut::<u32>("offsets").unwrap().fill(7);
        w.column_mut::<f32>("label").unwrap()[0] = 2.5;
        let r = BatchReader::new(buf.as_ref()).unwrap();
        assert_eq!(r.column::<u32>("offsets").unwrap(), &[7; ROWS + 1]);
        assert_eq!(r.column::<f32>("label").unwrap()[0], 2.5);
    }

    #[test]
    fn wrong_type_and_missing_column() {
        let layout = ctr_layout();
        let mut buf = AlignedBuf::new(layout.total_len() as usize);
        let mut w = BatchWriter::new(&layout, buf.as_mut()).unwrap();
        assert!(matches!(
            w.column_mut::<f64>("label"),
            Err(ColumnError::WrongType {
                expected: DType::F32,
                found: DType::F64,
                ..
            })
        ));
        assert!(matches!(
            w.column_mut::<f32>("nope"),
            Err(ColumnError::NoSuchColumn { .. })
        ));
        let mut cols = w.split_columns_mut().unwrap();
        assert!(cols.take::<u32>("offsets").is_ok());
        assert!(matches!(
            cols.take::<u32>("offsets"),
            Err(ColumnError::AlreadyTaken { .. })
        ));
        assert!(matches!(
            cols.take::<i32>("offsets"),
            Err(ColumnError::WrongType { .. })
        ));
        assert!(matches!(
            cols.take::<u8>("x"),
            Err(ColumnError::NoSuchColumn { .. })
        ));

        let r = BatchReader::new(buf.as_ref()).unwrap();
        assert!(matches!(
            r.column::<u64>("weight"),
            Err(ColumnError::WrongType {
                expected: DType::F64,
                found: DType::U64,
                ..
            })
        ));
        assert!(matches!(
            r.column::<u64>("missing"),
            Err(ColumnError::NoSuchColumn { .. })
        ));
    }

    #[test]
    fn layout_validation() {
        assert!(matches!(BatchLayout::new(&[]), Err(LayoutError::NoColumns)));
        let many: Vec<_> = (0..=MAX_COLUMNS)
            .map(|i| ColumnSpec::new::<u8>(format!("c{i}"), 1))
            .collect();
        assert!(matches!(
            BatchLayout::new(&many),
            Err(LayoutError::TooManyColumns { count }) if count == MAX_COLUMNS + 1
        ));
        assert!(BatchLayout::new(&many[..MAX_COLUMNS]).is_ok());
        assert!(matches!(
            BatchLayout::new(&[ColumnSpec::new::<u8>("", 1)]),
            Err(LayoutError::EmptyName { index: 0 })
        ));
        assert!(matches!(
            BatchLayout::new(&[ColumnSpec::new::<u8>("x".repeat(MAX_NAME_LEN + 1), 1)]),
            Err(LayoutError::NameTooLong { .. })
        ));
        assert!(
            BatchLayout::new(&[ColumnSpec::new::<u8>("é".repeat(MAX_NAME_LEN / 2), 1)]).is_ok()
        );
        assert!(matches!(
            BatchLayout::new(&[
                ColumnSpec::new::<u8>("a", 1),
                ColumnSpec::new::<u16>("a", 1)
            ]),
            Err(LayoutError::DuplicateName { .. })
        ));
        assert!(matches!(
            BatchLayout::new(&[ColumnSpec::new::<u64>("a", u64::MAX / 4)]),
            Err(LayoutError::TooLarge { .. })
        ));
        assert!(matches!(
            BatchLayout::new(&[
                ColumnSpec::new::<u8>("a", u64::MAX - 200),
                ColumnSpec::new::<u8>("b", 1)
            ]),
            Err(LayoutError::TooLarge { .. })
        ));
    }

    #[test]
    fn layout_offsets_are_aligned() {
        let layout = BatchLayout::new(&[
            ColumnSpec::new::<u8>("a", 3),
            ColumnSpec::new::<u64>("empty", 0),
            ColumnSpec::new::<u16>("b", 100),
        ])
        .unwrap();
        // Directory ends at 32 + 3 * 96 = 320, already a multiple of 64.
        assert_eq!(layout.offsets, [320, 384, 384]);
        assert_eq!(layout.total_len(), 584);
    }

    #[test]
    fn writer_rejects_bad_buffers() {
        let layout = ctr_layout();
        let total = layout.total_len() as usize;
        let mut small = AlignedBuf::new(total - 1);
        assert!(matches!(
            BatchWriter::new(&layout, small.as_mut()),
            Err(LayoutError::BufferTooSmall { .. })
        ));
        let mut big = AlignedBuf::new(total + 1);
        assert!(matches!(
            BatchWriter::new(&layout, &mut big.as_mut()[1..]),
            Err(LayoutError::MisalignedBuffer { .. })
        ));
    }

    #[test]
    fn reader_rejects_misaligned_buffer() {
        let buf = ctr_batch();
        let mut shifted = AlignedBuf::new(buf.len + 1);
        shifted.as_mut()[1..].copy_from_slice(buf.as_ref());
        assert!(matches!(
            BatchReader::new(&shifted.as_ref()[1..]),
            Err(BatchError::MisalignedBuffer { .. })
        ));
    }

    #[test]
    fn every_header_or_directory_bit_flip_is_detected() {
        let good = ctr_batch();
        let dir_end = directory_end(4).unwrap();
        for i in 0..dir_end {
            for bit in [0x01u8, 0x80] {
                let mut buf = AlignedBuf::from_bytes(good.as_ref());
                buf.as_mut()[i] ^= bit;
                assert!(
                    BatchReader::new(buf.as_ref()).is_err(),
                    "byte {i} bit {bit:#x}"
                );
            }
        }
        let mut buf = AlignedBuf::from_bytes(good.as_ref());
        buf.as_mut()[HEADER_LEN + 5] ^= 1; // inside the first name
        assert!(matches!(
            BatchReader::new(buf.as_ref()),
            Err(BatchError::ChecksumMismatch { .. })
        ));
        let mut buf = AlignedBuf::from_bytes(good.as_ref());
        buf.as_mut()[0] = b'X';
        assert!(matches!(
            BatchReader::new(buf.as_ref()),
            Err(BatchError::BadMagic)
        ));
        let mut buf = AlignedBuf::from_bytes(good.as_ref());
        buf.as_mut()[H_VERSION] = 2;
        assert!(matches!(
            BatchReader::new(buf.as_ref()),
            Err(BatchError::UnsupportedVersion { version: 2 })
        ));
        for count in [0u32, MAX_COLUMNS as u32 + 1, u32::MAX] {
            let mut buf = AlignedBuf::from_bytes(good.as_ref());
            buf.as_mut()[H_COUNT..H_COUNT + 4].copy_from_slice(&count.to_le_bytes());
            assert!(matches!(
                BatchReader::new(buf.as_ref()),
                Err(BatchError::BadColumnCount { .. })
            ));
        }
    }

    #[test]
    fn truncated_buffers_are_rejected() {
        let good = ctr_batch();
        for len in 0..good.len {
            let buf = AlignedBuf::from_bytes(&good.as_ref()[..len]);
            assert!(
                matches!(
                    BatchReader::new(buf.as_ref()),
                    Err(BatchError::Truncated { .. })
                ),
                "len {len}"
            );
        }
    }

    /// Applies `corrupt` to a valid batch, fixes the CRC, and returns the
    /// reader's verdict.
    fn corrupted(corrupt: impl FnOnce(&mut [u8])) -> Result<(), BatchError> {
        let mut buf = ctr_batch();
        corrupt(buf.as_mut());
        fix_crc(buf.as_mut());
        BatchReader::new(buf.as_ref()).map(|_| ())
    }

    fn bad_column(r: Result<(), BatchError>) -> &'static str {
        match r {
            Err(BatchError::BadColumn { reason, .. }) => reason,
            other => panic!("expected BadColumn, got {other:?}"),
        }
    }

    #[test]
    fn bogus_directory_entries_are_rejected() {
        let e0 = entry_start(0);
        let e1 = entry_start(1);
        let total = ctr_layout().total_len();
        let first_offset = ctr_layout().offsets[0];

        assert!(
            bad_column(corrupted(|b| set_u64(b, e1 + E_OFFSET, first_offset + 8)))
                .contains("aligned")
        );
        assert!(bad_column(corrupted(|b| set_u64(b, e1 + E_OFFSET, 64))).contains("directory"));
        assert!(bad_column(corrupted(|b| set_u64(b, e1 + E_OFFSET, 0))).contains("directory"));
        assert!(bad_column(corrupted(|b| set_u64(
            b,
            e1 + E_OFFSET,
            total.next_multiple_of(64)
        )))
        .contains("past"));
        assert!(
            bad_column(corrupted(|b| set_u64(b, e1 + E_OFFSET, u64::MAX - 63))).contains("past")
        );
        assert!(
            bad_column(corrupted(|b| set_u64(b, e1 + E_OFFSET, first_offset))).contains("overlaps")
        );
        assert!(bad_column(corrupted(|b| set_u64(b, e1 + E_BYTE_LEN, 4))).contains("byte length"));
        assert!(bad_column(corrupted(|b| {
            set_u64(b, e1 + E_COUNT, u64::MAX);
            set_u64(b, e1 + E_BYTE_LEN, u64::MAX.wrapping_mul(4));
        }))
        .contains("overflow"));
        assert!(bad_column(corrupted(|b| {
            set_u64(b, e1 + E_COUNT, 1 << 40);
            set_u64(b, e1 + E_BYTE_LEN, 4 << 40);
        }))
        .contains("past"));
        assert!(bad_column(corrupted(|b| b[e0 + E_DTYPE] = 10)).contains("dtype"));
        assert!(bad_column(corrupted(|b| b[e0 + E_NAME_LEN] = 0)).contains("name length"));
        assert!(bad_column(corrupted(|b| b[e0 + E_NAME_LEN] = 65)).contains("name length"));
        assert!(bad_column(corrupted(|b| b[e0 + E_NAME_LEN] = 3)).contains("padding"));
        assert!(bad_column(corrupted(|b| b[e0 + E_NAME] = 0xFF)).contains("UTF-8"));
        assert!(bad_column(corrupted(|b| b[e0 + E_RESERVED.start] = 1)).contains("reserved"));
        assert!(bad_column(corrupted(|b| {
            // Rename "offsets" (7 bytes) to "label".
            b[e1 + E_NAME_LEN] = 5;
            b[e1 + E_NAME..e1 + E_NAME + 7].copy_from_slice(b"label\0\0");
        }))
        .contains("duplicate"));

        assert!(matches!(
            corrupted(|b| set_u64(b, H_TOTAL_LEN, total + 1)),
            Err(BatchError::Truncated { .. })
        ));
        assert!(matches!(
            corrupted(|b| set_u64(b, H_TOTAL_LEN, 100)),
            Err(BatchError::BadHeader { .. })
        ));
        assert!(matches!(
            corrupted(|b| b[H_RESERVED] = 1),
            Err(BatchError::BadHeader { .. })
        ));
        assert!(matches!(
            corrupted(|b| set_u64(b, H_TOTAL_LEN, total - 1)),
            Err(BatchError::BadColumn { index: 3, .. })
        ));
    }

    #[test]
    fn empty_columns_are_fine() {
        let layout = BatchLayout::new(&[
            ColumnSpec::new::<u64>("a", 0),
            ColumnSpec::new::<u8>("b", 0),
            ColumnSpec::new::<i32>("c", 2),
        ])
        .unwrap();
        let mut buf = AlignedBuf::new(layout.total_len() as usize);
        let mut w = BatchWriter::new(&layout, buf.as_mut()).unwrap();
        w.column_mut::<i32>("c").unwrap().copy_from_slice(&[-1, 2]);
        let mut cols = w.split_columns_mut().unwrap();
        assert!(cols.take::<u64>("a").unwrap().is_empty());
        let r = BatchReader::new(buf.as_ref()).unwrap();
        assert!(r.column::<u64>("a").unwrap().is_empty());
        assert!(r.column::<u8>("b").unwrap().is_empty());
        assert_eq!(r.column::<i32>("c").unwrap(), &[-1, 2]);
    }

    /// Calls `$f::<T>($args)` with `T` the Rust type of `$dtype`.
    macro_rules! with_dtype {
        ($dtype:expr, $f:ident ( $($args:expr),* )) => {
            match $dtype {
                DType::U8 => $f::<u8>($($args),*),
                DType::U16 => $f::<u16>($($args),*),
                DType::U32 => $f::<u32>($($args),*),
                DType::U64 => $f::<u64>($($args),*),
                DType::I8 => $f::<i8>($($args),*),
                DType::I16 => $f::<i16>($($args),*),
                DType::I32 => $f::<i32>($($args),*),
                DType::I64 => $f::<i64>($($args),*),
                DType::F32 => $f::<f32>($($args),*),
                DType::F64 => $f::<f64>($($args),*),
            }
        };
    }

    fn pattern(seed: usize, i: usize) -> u8 {
        (seed.wrapping_mul(131) ^ i.wrapping_mul(31)) as u8
    }

    fn fill<T: Element>(w: &mut BatchWriter<'_>, name: &str, seed: usize) {
        let col = w.column_mut::<T>(name).unwrap();
        for (i, b) in bytemuck::cast_slice_mut::<T, u8>(col)
            .iter_mut()
            .enumerate()
        {
            *b = pattern(seed, i);
        }
    }

    fn read_bytes<'a, T: Element>(r: &BatchReader<'a>, name: &str) -> &'a [u8] {
        bytemuck::cast_slice(r.column::<T>(name).unwrap())
    }

    /// Touches a column as `T`, checking any slice it hands out is in bounds.
    fn probe<T: Element>(r: &BatchReader<'_>, buf: &[u8], name: &str) {
        if let Ok(col) = r.column::<T>(name) {
            let bytes: &[u8] = bytemuck::cast_slice(col);
            assert!(within(buf, bytes) || bytes.is_empty());
            assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
        }
    }

    /// Validates `bytes` and, if accepted, accesses every column as every type.
    fn exercise(bytes: &[u8]) {
        let buf = AlignedBuf::from_bytes(bytes);
        let buf = buf.as_ref();
        if let Ok(r) = BatchReader::new(buf) {
            let names: Vec<&str> = r.column_names().collect();
            assert_eq!(names.len(), r.num_columns());
            for name in names.iter().copied().chain(["", "nope"]) {
                let _ = r.dtype(name);
                for d in DType::ALL {
                    with_dtype!(d, probe(&r, buf, name));
                }
            }
        }
    }

    fn schema_strategy() -> impl Strategy<Value = Vec<ColumnSpec>> {
        proptest::collection::vec(("[a-zé_]{1,30}", 0u8..10, 0u64..40), 1..12).prop_map(|cols| {
            cols.into_iter()
                .enumerate()
                .map(|(i, (name, tag, len))| ColumnSpec {
                    name: format!("{name}{i}"),
                    dtype: DType::from_tag(tag).unwrap(),
                    len,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            exercise(&bytes);
        }

        #[test]
        fn random_header_with_valid_magic_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 32..2048),
            count in 0u32..6,
            fix in any::<bool>(),
        ) {
            bytes[..8].copy_from_slice(&MAGIC);
            bytes[H_VERSION..H_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes[H_COUNT..H_COUNT + 4].copy_from_slice(&count.to_le_bytes());
            if fix {
                fix_crc(&mut bytes);
            }
            exercise(&bytes);
        }

        #[test]
        fn mutated_batches_never_panic(
            flips in proptest::collection::vec((any::<bool>(), any::<usize>(), 1u8..), 1..8),
            fix in any::<bool>(),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let good = ctr_batch();
            let mut bytes = good.as_ref().to_vec();
            let dir_end = directory_end(4).unwrap();
            for (in_dir, at, x) in flips {
                let at = if in_dir { at % dir_end } else { at % bytes.len() };
                bytes[at] ^= x;
            }
            if fix {
                fix_crc(&mut bytes);
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            exercise(&bytes);
        }

        #[test]
        fn valid_schemas_round_trip(specs in schema_strategy(), slack in 0usize..100) {
            let layout = BatchLayout::new(&specs).unwrap();
            let mut buf = AlignedBuf::new(layout.total_len() as usize + slack);
            let mut w = BatchWriter::new(&layout, buf.as_mut()).unwrap();
            for (seed, c) in specs.iter().enumerate() {
                with_dtype!(c.dtype, fill(&mut w, &c.name, seed));
            }
            let r = BatchReader::new(buf.as_ref()).unwrap();
            prop_assert_eq!(r.num_columns(), specs.len());
            prop_assert!(r.column_names().eq(specs.iter().map(|c| c.name.as_str())));
            for (seed, c) in specs.iter().enumerate() {
                prop_assert_eq!(r.dtype(&c.name), Some(c.dtype));
                let bytes = with_dtype!(c.dtype, read_bytes(&r, &c.name));
                prop_assert_eq!(bytes.len() as u64, c.len * c.dtype.size() as u64);
                prop_assert!(bytes.iter().enumerate().all(|(i, &b)| b == pattern(seed, i)));
                prop_assert!(within(buf.as_ref(), bytes));
            }
        }
    }
}
