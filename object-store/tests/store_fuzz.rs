//! Fuzz targets for every decoder the store runs on bytes another process
//! wrote: protocol frames (both directions) and columnar batch headers.
//!
//! Under `cargo test` each target runs for about a second on random input
//! (bolero's default). A coverage-guided campaign of one target is one
//! command (see the README's "Fuzzing" section), e.g.
//!
//! ```text
//! cargo bolero test -p braid-store --test store_fuzz protocol_frames_from_bytes
//! ```
//!
//! Every target asserts that decoding never panics and that the memory it
//! holds is bounded by its input, never by a length field it read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/alloc_meter.rs"]
mod alloc_meter;

use bolero::check;
use braid_store::allocator::AllocStats;
use braid_store::batch::{
    BatchLayout, BatchReader, BatchWriter, ColumnSpec, DType, COLUMN_ALIGN, FORMAT_VERSION, MAGIC,
};
use braid_store::protocol::{
    self, FrameError, Reply, ReplyFrame, Request, RequestFrame, WireError, MAX_FRAME,
};
use braid_store::{ObjectId, StoreStats};
use std::io::Cursor;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// Slack for allocations no input drives (error messages, serde's bounded
/// preallocation of a sequence).
const SLACK: usize = 4 << 20;

/// Reads frames of `T` off `bytes` until the first error, as the store's and
/// the client's readers do; returns how many decoded.
fn read_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> usize {
    let mut cursor = Cursor::new(bytes);
    let mut buf = Vec::new();
    let mut frames = 0;
    loop {
        match protocol::read_frame::<T>(&mut cursor, &mut buf) {
            Ok(_) => frames += 1,
            Err(FrameError::BadLength(len)) => {
                assert!(len == 0 || len > MAX_FRAME);
                return frames;
            }
            Err(_) => return frames,
        }
        assert!(buf.len() <= MAX_FRAME as usize);
    }
}

#[test]
fn protocol_frames_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            read_all::<RequestFrame>(bytes);
            read_all::<ReplyFrame>(bytes);
            let _ = protocol::decode_body::<RequestFrame>(bytes);
            let _ = protocol::decode_body::<ReplyFrame>(bytes);
        });
    });
}

/// A frame header declaring more than the body that follows, or more than
/// the limit, must not make the reader allocate what it declares.
#[test]
fn protocol_length_prefix_is_bounded() {
    check!()
        .with_type::<(u32, Vec<u8>)>()
        .for_each(|(len, body)| {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(body);
            alloc_meter::assert_bounded(bytes.len(), SLACK + MAX_FRAME as usize, || {
                read_all::<RequestFrame>(&bytes);
            });
        });
}

/// Fields a structured target picks messages from.
type Fields = (u8, [u8; 16], u64, u64, u32, bool, String, Vec<u64>);

fn request(&(tag, id, a, b, count, flag, _, _): &Fields) -> Request {
    let id = ObjectId::from_bytes(id);
    match tag % 11 {
        0 => Request::Create {
            id,
            size: a,
            evictable: flag,
        },
        1 => Request::Seal { id },
        2 => Request::Abort { id },
        3 => Request::Get { id, timeout_ms: a },
        4 => Request::Release { id },
        5 => Request::Delete { id },
        6 => Request::Contains { id },
        7 => Request::Stats,
        8 => Request::Lease { class: a, count },
        9 => Request::PutLeased {
            id,
            offset: a,
            size: b,
        },
        _ => Request::Get { id, timeout_ms: b },
    }
}

fn reply(&(tag, id, a, b, _, flag, ref text, ref offsets): &Fields) -> Result<Reply, WireError> {
    let id = ObjectId::from_bytes(id);
    Ok(match tag % 22 {
        0 => Reply::Created { offset: a },
        1 => Reply::Sealed,
        2 => Reply::Aborted,
        3 => Reply::Object { offset: a, size: b },
        4 => Reply::Released,
        5 => Reply::Deleted,
        6 => Reply::Contains(flag),
        7 => Reply::Stats(StoreStats {
            arena: AllocStats {
                capacity: a,
                used: b,
                ..AllocStats::default()
            },
            pins: a ^ b,
            ..StoreStats::default()
        }),
        8 => Reply::Leased {
            offsets: offsets.clone(),
        },
        9 => return Err(WireError::NotFound(id)),
        10 => return Err(WireError::AlreadyExists(id)),
        11 => return Err(WireError::AlreadySealed(id)),
        12 => return Err(WireError::NotCreator(id)),
        13 => {
            return Err(WireError::StoreFull {
                requested: a,
                free: b,
                largest_free: a / 2,
                pinned: b / 2,
            })
        }
        14 => {
            return Err(WireError::TooLarge {
                requested: a,
                capacity: b,
            })
        }
        15 => return Err(WireError::Timeout { id, timeout_ms: a }),
        16 => {
            return Err(WireError::Lost {
                id,
                reason: text.clone(),
            })
        }
        17 => return Err(WireError::NotPinned(id)),
        18 => return Err(WireError::BadLease(text.clone())),
        19 => return Err(WireError::Malformed(text.clone())),
        20 => return Err(WireError::Internal(text.clone())),
        _ => Reply::Contains(!flag),
    })
}

#[test]
fn protocol_messages_round_trip() {
    check!().with_type::<Fields>().for_each(|fields| {
        let seq = fields.2 ^ fields.3;
        let sent = RequestFrame {
            seq,
            body: request(fields),
        };
        let frame = protocol::encode_frame(&sent).expect("a request encodes");
        let mut buf = Vec::new();
        let got: RequestFrame =
            protocol::read_frame(&mut Cursor::new(&frame), &mut buf).expect("a request decodes");
        assert_eq!(got, sent);

        let sent = ReplyFrame {
            seq,
            body: reply(fields),
        };
        let frame = protocol::encode_frame(&sent).expect("a reply encodes");
        if frame.len() - protocol::HEADER_LEN > MAX_FRAME as usize {
            return;
        }
        let got: ReplyFrame =
            protocol::read_frame(&mut Cursor::new(&frame), &mut buf).expect("a reply decodes");
        assert_eq!(got, sent);
        // Any strict prefix is refused, never misread.
        for cut in [1, frame.len() / 2, frame.len() - 1] {
            let cut = cut.min(frame.len() - 1);
            let r = protocol::read_frame::<ReplyFrame>(&mut Cursor::new(&frame[..cut]), &mut buf);
            assert!(r.is_err());
        }
    });
}

/// `bytes` copied into a buffer aligned as a store object is.
fn aligned(bytes: &[u8]) -> (Vec<u8>, std::ops::Range<usize>) {
    let align = COLUMN_ALIGN as usize;
    let mut buf = vec![0u8; bytes.len() + align];
    let start = buf.as_ptr().align_offset(align);
    buf[start..start + bytes.len()].copy_from_slice(bytes);
    (buf, start..start + bytes.len())
}

/// Reads every column a reader accepted, as a consumer would.
fn read_columns(reader: &BatchReader<'_>) {
    let names: Vec<&str> = reader.column_names().collect();
    assert_eq!(names.len(), reader.num_columns());
    for name in names {
        let dtype = reader.dtype(name).expect("a listed column has a dtype");
        let len = match dtype {
            DType::U8 => reader.column::<u8>(name).map(<[u8]>::len),
            DType::U16 => reader.column::<u16>(name).map(<[u16]>::len),
            DType::U32 => reader.column::<u32>(name).map(<[u32]>::len),
            DType::U64 => reader.column::<u64>(name).map(<[u64]>::len),
            DType::I8 => reader.column::<i8>(name).map(<[i8]>::len),
            DType::I16 => reader.column::<i16>(name).map(<[i16]>::len),
            DType::I32 => reader.column::<i32>(name).map(<[i32]>::len),
            DType::I64 => reader.column::<i64>(name).map(<[i64]>::len),
            DType::F32 => reader.column::<f32>(name).map(<[f32]>::len),
            DType::F64 => reader.column::<f64>(name).map(<[f64]>::len),
        };
        let len = len.expect("a validated column views as its dtype");
        assert!((len * dtype.size()) as u64 <= reader.total_len());
    }
}

/// The CRC-32 the batch header carries: of the header without its CRC
/// field, and the directory (see `braid_store::batch`'s layout docs).
fn fix_crc(batch: &mut [u8]) {
    let Some(count) = batch.get(12..16) else {
        return;
    };
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
    let dir_end = (32 + 96 * count.min(256)).min(batch.len());
    if dir_end < 32 {
        return;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&batch[..24]);
    h.update(&batch[28..dir_end]);
    let crc = h.finalize();
    batch[24..28].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn batch_reader_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        let (buf, range) = aligned(bytes);
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            if let Ok(reader) = BatchReader::new(&buf[range.clone()]) {
                read_columns(&reader);
            }
        });
    });
}

/// Garbage behind a valid magic, version and CRC, so the fuzzer reaches
/// the directory checks (random bytes almost never pass the CRC).
#[test]
fn batch_reader_with_valid_header_crc() {
    check!().for_each(|bytes: &[u8]| {
        let mut batch = bytes.to_vec();
        if batch.len() < 32 {
            batch.resize(32, 0);
        }
        batch[..8].copy_from_slice(&MAGIC);
        batch[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        fix_crc(&mut batch);
        let (buf, range) = aligned(&batch);
        alloc_meter::assert_bounded(batch.len(), SLACK, || {
            if let Ok(reader) = BatchReader::new(&buf[range.clone()]) {
                read_columns(&reader);
            }
        });
    });
}

#[test]
fn batch_layout_round_trips() {
    check!()
        .with_type::<Vec<(u8, u8, u16)>>()
        .for_each(|columns| {
            let specs: Vec<ColumnSpec> = columns
                .iter()
                .take(16)
                .enumerate()
                .map(|(i, &(name, dtype, len))| ColumnSpec {
                    name: format!("c{i}-{}", "x".repeat(usize::from(name % 60))),
                    dtype: DType::ALL[usize::from(dtype) % DType::ALL.len()],
                    len: u64::from(len % 512),
                })
                .collect();
            let Ok(layout) = BatchLayout::new(&specs) else {
                assert!(specs.is_empty());
                return;
            };
            let total = layout.total_len() as usize;
            let (mut buf, range) = aligned(&vec![0xa5; total]);
            BatchWriter::new(&layout, &mut buf[range.clone()]).expect("the buffer fits");
            let reader = BatchReader::new(&buf[range.clone()]).expect("a written batch reads");
            assert_eq!(reader.total_len(), layout.total_len());
            for spec in &specs {
                assert_eq!(reader.dtype(&spec.name), Some(spec.dtype));
            }
            read_columns(&reader);
            // A flipped directory byte is caught by the CRC or the checks.
            let at = (usize::from(columns[0].2) % (32 + 96 * specs.len())).max(1);
            buf[range.start + at] ^= 0x40;
            assert!(BatchReader::new(&buf[range]).is_err());
        });
}
