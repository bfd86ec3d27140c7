//! Feature data for online click-through learning.
//!
//! * [`FeatureBatch`]: columnar rows (labels, row offsets, feature ids,
//!   optional values), with a binary encoding that [`FeatureBatchRef::parse`]
//!   views in place, without copying.
//! * [`GenCtrParser`] and [`CriteoParser`]: streaming line parsers that fill
//!   a batch from any [`BufRead`], skipping and counting malformed lines.
//! * [`SyntheticStream`]: a deterministic, seekable click stream with drift,
//!   so demos and tests need no data file.
//!
//! Rows carry only their own features: no parser or generator adds a bias
//! feature, that is the learner's business.
//!
//! # Batch encoding
//!
//! All integers are little-endian. Header, 32 bytes:
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! |      0 |    8 | magic, [`BATCH_MAGIC`]                                 |
//! |      8 |    2 | format version, [`BATCH_VERSION`]                      |
//! |     10 |    2 | flags: bit 0 set when the values column is present     |
//! |     12 |    4 | CRC-32 (IEEE) of bytes `0..12` and `16..32`            |
//! |     16 |    8 | row count `r`                                          |
//! |     24 |    8 | feature id count `n`                                   |
//!
//! Then the columns, each starting at a multiple of 8 bytes from the start
//! of the batch, padded with zeros to a multiple of 8:
//!
//! 1. ids, `n` × `u64`;
//! 2. labels, `r` × `f32`;
//! 3. row offsets, `r + 1` × `u32`;
//! 4. values, `n` × `f32`, only when flag bit 0 is set.
//!
//! The first byte of an encoded batch must be 8-byte aligned in memory for
//! [`FeatureBatchRef::parse`] to view the columns in place; objects in the
//! braid object store are 64-byte aligned, so a batch written at the start
//! of a store object always is. [`FeatureBatch::encode_to_words`] gives an
//! aligned buffer for in-process use. A misaligned buffer is rejected with
//! [`DataError::Misaligned`], never copied.
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

use thiserror::Error;

/// The eight bytes every encoded [`FeatureBatch`] starts with.
pub const BATCH_MAGIC: [u8; 8] = *b"BRDFEATS";
/// The encoding version written by [`FeatureBatch::encode_into`] and the only
/// one [`FeatureBatchRef::parse`] accepts.
pub const BATCH_VERSION: u16 = 1;
/// Size in bytes of the encoded batch header.
pub const BATCH_HEADER_LEN: usize = 32;
/// Alignment, in bytes, that an encoded batch's first byte must have in
/// memory, and of every column within it.
pub const BATCH_ALIGN: usize = 8;

const FLAG_VALUES: u16 = 1;

/// Why feature data could not be built, encoded, decoded or read.
#[derive(Debug, Error)]
pub enum DataError {
    /// The underlying reader failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The buffer ends before the header or a column does.
    #[error("encoded batch truncated: needs {needed} bytes, buffer has {available}")]
    Truncated {
        /// Bytes the header says the batch occupies (at least).
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The buffer does not start with [`BATCH_MAGIC`].
    #[error("not an encoded feature batch (bad magic)")]
    BadMagic,
    /// The encoding version is not [`BATCH_VERSION`].
    #[error("unsupported feature batch version {0}")]
    UnsupportedVersion(u16),
    /// The header sets flag bits this version does not define.
    #[error("unknown feature batch flags {0:#06x}")]
    UnknownFlags(u16),
    /// The header checksum does not match its contents.
    #[error(
        "feature batch header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    HeaderChecksum {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum of the header as read.
        computed: u32,
    },
    /// The buffer is not aligned enough to view its columns in place.
    #[error(
        "encoded batch at {addr:#x} is not {align}-byte aligned; \
         store objects are 64-byte aligned, copy other buffers into aligned memory"
    )]
    Misaligned {
        /// Address of the buffer's first byte.
        addr: usize,
        /// Required alignment.
        align: usize,
    },
    /// A count does not fit the address space or the `u32` offset column.
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
    /// A column could not be viewed as its element type.
    #[error("cannot view the {column} column in place: {reason}")]
    Cast {
        /// Which column.
        column: &'static str,
        /// Why the view failed.
        reason: String,
    },
    /// In-place views of the little-endian encoding need a little-endian
    /// host.
    #[error("in-place feature batch views need a little-endian host")]
    BigEndian,
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

/// Columnar rows of sparse features.
///
/// Row `i` has label `labels()[i]` and features
/// `ids()[offsets()[i]..offsets()[i + 1]]`, with values from the same range
/// of `values()`, or all ones when there is no values column. The offsets
/// column always has `rows() + 1` entries, starts at 0, never decreases and
/// ends at `len_ids()`; every constructor and mutator keeps that true, so
/// row access cannot fail for an in-range index.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBatch {
    labels: Vec<f32>,
    offsets: Vec<u32>,
    ids: Vec<u64>,
    values: Option<Vec<f32>>,
}

impl Default for FeatureBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FeatureBatch {
    /// An empty batch without a values column.
    pub fn new() -> Self {
        Self {
            labels: Vec::new(),
            offsets: vec![0],
            ids: Vec::new(),
            values: None,
        }
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
        }
    }

    /// A batch from its columns, checked as [`FeatureBatchRef::parse`] checks
    /// a decoded batch.
    pub fn from_parts(
        labels: Vec<f32>,
        offsets: Vec<u32>,
        ids: Vec<u64>,
        values: Option<Vec<f32>>,
    ) -> Result<Self, DataError> {
        check_columns(&labels, &offsets, ids.len(), values.as_ref().map(Vec::len))?;
        Ok(Self {
            labels,
            offsets,
            ids,
            values,
        })
    }

    /// The columns: labels, offsets, ids and optional values.
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

    /// Appends a row. `values`, when given, must have one entry per id; the
    /// first row with values gives the batch a values column (earlier
    /// features get value 1), and later rows without values get ones.
    pub fn push_row(
        &mut self,
        label: f32,
        ids: &[u64],
        values: Option<&[f32]>,
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
        Ok(())
    }

    fn can_take(&self, ids: usize) -> bool {
        self.ids
            .len()
            .checked_add(ids)
            .is_some_and(|n| u32::try_from(n).is_ok())
    }

    /// Removes every row, keeping the allocations of the label, offset and
    /// id columns; the batch goes back to having no values column.
    pub fn clear(&mut self) {
        self.labels.clear();
        self.offsets.clear();
        self.offsets.push(0);
        self.ids.clear();
        self.values = None;
    }

    /// Size in bytes of this batch's encoding.
    pub fn encoded_len(&self) -> usize {
        let n = self.ids.len();
        let r = self.labels.len();
        BATCH_HEADER_LEN
            + 8 * n
            + pad8(4 * r)
            + pad8(4 * (r + 1))
            + if self.values.is_some() {
                pad8(4 * n)
            } else {
                0
            }
    }

    /// Appends the encoding of this batch (see the module docs) to `out` and
    /// returns the offset in `out` where it starts: `out` is first
    /// zero-padded to a multiple of 8 bytes, so batches appended one after
    /// another to one aligned buffer can each be parsed in place.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> usize {
        out.resize(pad8(out.len()), 0);
        let start = out.len();
        out.reserve(self.encoded_len());
        let flags = if self.values.is_some() {
            FLAG_VALUES
        } else {
            0
        };
        let mut header = [0u8; BATCH_HEADER_LEN];
        header[0..8].copy_from_slice(&BATCH_MAGIC);
        header[8..10].copy_from_slice(&BATCH_VERSION.to_le_bytes());
        header[10..12].copy_from_slice(&flags.to_le_bytes());
        header[16..24].copy_from_slice(&(self.labels.len() as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(self.ids.len() as u64).to_le_bytes());
        let crc = header_crc(&header);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&header);
        put_u64s(out, &self.ids);
        put_f32s(out, &self.labels);
        out.resize(pad8(out.len()), 0);
        put_u32s(out, &self.offsets);
        out.resize(pad8(out.len()), 0);
        if let Some(values) = &self.values {
            put_f32s(out, values);
            out.resize(pad8(out.len()), 0);
        }
        start
    }

    /// The encoding of this batch in an 8-byte-aligned buffer; view it with
    /// `bytemuck::cast_slice::<u64, u8>` and [`FeatureBatchRef::parse`].
    pub fn encode_to_words(&self) -> Vec<u64> {
        let mut bytes = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut bytes);
        let mut words = vec![0u64; bytes.len() / 8];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words).copy_from_slice(&bytes);
        words
    }
}

/// A borrowed, validated view of a feature batch: either of a
/// [`FeatureBatch`] ([`FeatureBatch::view`]) or of an encoded batch in a
/// byte buffer ([`FeatureBatchRef::parse`]), whose columns it reads in place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureBatchRef<'a> {
    labels: &'a [f32],
    offsets: &'a [u32],
    ids: &'a [u64],
    values: Option<&'a [f32]>,
}

impl<'a> FeatureBatchRef<'a> {
    /// Views the encoded batch at the start of `bytes` without copying.
    ///
    /// The buffer is untrusted: a bad magic, version, flags or header
    /// checksum, a truncated buffer, a misaligned buffer or row offsets that
    /// do not partition the id column give an error, never a panic. Bytes
    /// after the batch's [`encoded_len`](Self::encoded_len) are ignored
    /// (object stores round sizes up). Label, id and value bits are not
    /// checked: every bit pattern is a valid element.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DataError> {
        if cfg!(target_endian = "big") {
            return Err(DataError::BigEndian);
        }
        let header: &[u8; BATCH_HEADER_LEN] = bytes
            .get(..BATCH_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DataError::Truncated {
                needed: BATCH_HEADER_LEN,
                available: bytes.len(),
            })?;
        let addr = bytes.as_ptr() as usize;
        if addr % BATCH_ALIGN != 0 {
            return Err(DataError::Misaligned {
                addr,
                align: BATCH_ALIGN,
            });
        }
        if header[0..8] != BATCH_MAGIC {
            return Err(DataError::BadMagic);
        }
        let stored = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let computed = header_crc(header);
        if stored != computed {
            return Err(DataError::HeaderChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != BATCH_VERSION {
            return Err(DataError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([header[10], header[11]]);
        if flags & !FLAG_VALUES != 0 {
            return Err(DataError::UnknownFlags(flags));
        }
        let rows = read_u64(header, 16);
        let n_ids = read_u64(header, 24);
        if n_ids > u64::from(u32::MAX) {
            return Err(DataError::TooLarge {
                what: "more than u32::MAX feature ids in one batch",
            });
        }
        let layout =
            Layout::new(rows, n_ids, flags & FLAG_VALUES != 0).ok_or(DataError::TooLarge {
                what: "row or id count exceeds the address space",
            })?;
        if layout.total > bytes.len() {
            return Err(DataError::Truncated {
                needed: layout.total,
                available: bytes.len(),
            });
        }
        let ids: &[u64] = view_column(bytes, layout.ids, "ids")?;
        let labels: &[f32] = view_column(bytes, layout.labels, "labels")?;
        let offsets: &[u32] = view_column(bytes, layout.offsets, "offsets")?;
        let values: Option<&[f32]> = match layout.values {
            Some(range) => Some(view_column(bytes, range, "values")?),
            None => None,
        };
        check_columns(labels, offsets, ids.len(), values.map(<[f32]>::len))?;
        Ok(Self {
            labels,
            offsets,
            ids,
            values,
        })
    }

    /// Size in bytes of this batch's encoding, i.e. how many bytes
    /// [`parse`](Self::parse) consumed; the next batch in a buffer of
    /// concatenated batches starts there.
    pub fn encoded_len(&self) -> usize {
        let n = self.ids.len();
        let r = self.labels.len();
        BATCH_HEADER_LEN
            + 8 * n
            + pad8(4 * r)
            + pad8(4 * (r + 1))
            + if self.values.is_some() {
                pad8(4 * n)
            } else {
                0
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

    /// An owned copy.
    pub fn to_batch(&self) -> FeatureBatch {
        FeatureBatch {
            labels: self.labels.to_vec(),
            offsets: self.offsets.to_vec(),
            ids: self.ids.to_vec(),
            values: self.values.map(<[f32]>::to_vec),
        }
    }
}

struct Layout {
    ids: (usize, usize),
    labels: (usize, usize),
    offsets: (usize, usize),
    values: Option<(usize, usize)>,
    total: usize,
}

impl Layout {
    fn new(rows: u64, n_ids: u64, has_values: bool) -> Option<Self> {
        fn section(start: usize, count: u64, size: u64) -> Option<((usize, usize), usize)> {
            let len = usize::try_from(count.checked_mul(size)?).ok()?;
            let end = start.checked_add(len)?;
            let next = end.checked_add(7)? & !7;
            Some(((start, end), next))
        }
        let (ids, next) = section(BATCH_HEADER_LEN, n_ids, 8)?;
        let (labels, next) = section(next, rows, 4)?;
        let (offsets, next) = section(next, rows.checked_add(1)?, 4)?;
        let (values, total) = if has_values {
            let (v, next) = section(next, n_ids, 4)?;
            (Some(v), next)
        } else {
            (None, next)
        };
        Some(Self {
            ids,
            labels,
            offsets,
            values,
            total,
        })
    }
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

fn view_column<'a, T: bytemuck::Pod>(
    bytes: &'a [u8],
    (start, end): (usize, usize),
    column: &'static str,
) -> Result<&'a [T], DataError> {
    let cast = |reason: String| DataError::Cast { column, reason };
    let raw = bytes
        .get(start..end)
        .ok_or_else(|| cast(format!("bytes {start}..{end} out of range")))?;
    bytemuck::try_cast_slice(raw).map_err(|e| cast(e.to_string()))
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn read_u64(b: &[u8; BATCH_HEADER_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn header_crc(h: &[u8; BATCH_HEADER_LEN]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..12]);
    crc.update(&h[16..32]);
    crc.finalize()
}

fn put_u64s(out: &mut Vec<u8>, xs: &[u64]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(xs));
    } else {
        xs.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
}

fn put_u32s(out: &mut Vec<u8>, xs: &[u32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(xs));
    } else {
        xs.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
}

fn put_f32s(out: &mut Vec<u8>, xs: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(xs));
    } else {
        xs.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
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
            batch.labels.push(label);
            batch.ids.extend_from_slice(&self.scratch);
            if let Some(values) = &mut batch.values {
                values.resize(batch.ids.len(), 1.0);
            }
            batch.offsets.push(batch.ids.len() as u32);
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
            batch.labels.push(label);
            batch.ids.extend_from_slice(&ids);
            if let Some(values) = &mut batch.values {
                values.resize(batch.ids.len(), 1.0);
            }
            batch.offsets.push(batch.ids.len() as u32);
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
