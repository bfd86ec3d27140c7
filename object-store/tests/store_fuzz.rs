//! Fuzz targets for every decoder the store runs on bytes another process
//! wrote: protocol frames (both directions) and Arrow record batches.
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

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use bolero::check;
use braid_store::allocator::AllocStats;
use braid_store::batch::{
    read_record_batch, BatchLayout, BatchWriter, ColumnSpec, Primitive, ValuesMut,
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
    let lend_to = flag.then(|| braid_store::ClientId::new(b % 4));
    match tag % 13 {
        0 => Request::Create {
            id,
            size: a,
            evictable: flag,
        },
        1 => Request::Seal { id, lend_to },
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
            lend_to,
        },
        10 => Request::Lend {
            id,
            to: braid_store::ClientId::new(a % 4),
        },
        11 => Request::ReleaseLent { id },
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
fn aligned(bytes: &[u8]) -> Buffer {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    Buffer::from_vec(words).slice_with_length(0, bytes.len())
}

/// Reads every value of a batch the reader accepted, as a consumer would.
fn read_columns(batch: &RecordBatch) {
    for column in batch.columns() {
        assert_eq!(column.len(), batch.num_rows());
        column
            .to_data()
            .validate_full()
            .expect("an accepted batch is valid");
    }
}

#[test]
fn batch_reader_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        let buffer = aligned(bytes);
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            if let Ok(batch) = read_record_batch(buffer.clone()) {
                read_columns(&batch);
            }
        });
    });
}

/// A valid batch of every column type, `rows` rows.
fn valid_batch(rows: usize) -> Vec<u8> {
    let specs = [
        ColumnSpec::primitive("a", Primitive::Int64).with_nulls(rows / 3),
        ColumnSpec::utf8("s", rows * 2),
        ColumnSpec::list("l", Primitive::UInt32, rows),
        ColumnSpec::primitive("f", Primitive::Float64),
    ];
    let layout = BatchLayout::new(rows, &specs).expect("laid out");
    let mut words = vec![0u64; layout.total_len().div_ceil(8)];
    {
        let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let mut writer = BatchWriter::new(&layout, buf).expect("fits");
        for (c, column) in writer.columns().into_iter().enumerate() {
            for i in 0..rows {
                if i >= rows / 3 && !column.validity.is_empty() {
                    column.validity[i / 8] |= 1 << (i % 8);
                }
            }
            for (i, o) in column.offsets.iter_mut().enumerate() {
                *o = i32::try_from(i * if c == 1 { 2 } else { 1 }).expect("small");
            }
            match column.values {
                ValuesMut::Bytes(b) => b.fill(b'x'),
                ValuesMut::Int64(v) => v.iter_mut().enumerate().for_each(|(i, x)| *x = i as i64),
                ValuesMut::UInt32(v) => v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32),
                ValuesMut::Float64(v) => v.fill(0.5),
                _ => {}
            }
        }
    }
    bytemuck::cast_slice::<u64, u8>(&words)[..layout.total_len()].to_vec()
}

/// Garbage written over a valid batch, so the fuzzer reaches the checks
/// behind the headers (random bytes rarely pass the flatbuffer verifier).
#[test]
fn batch_reader_with_valid_headers() {
    let valid = valid_batch(100);
    assert_eq!(
        read_record_batch(aligned(&valid)).map(|b| b.num_rows()),
        Ok(100)
    );
    check!().with_type::<Vec<(u16, u8)>>().for_each(|edits| {
        let mut bytes = valid.clone();
        for &(at, value) in edits {
            let at = usize::from(at) % bytes.len();
            bytes[at] = value;
        }
        let buffer = aligned(&bytes);
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            if let Ok(batch) = read_record_batch(buffer.clone()) {
                read_columns(&batch);
            }
        });
    });
}

#[test]
fn batch_layout_round_trips() {
    check!()
        .with_type::<(u8, Vec<(u8, bool, u16)>)>()
        .for_each(|(rows, columns)| {
            let rows = usize::from(*rows);
            let specs: Vec<ColumnSpec> = columns
                .iter()
                .take(16)
                .enumerate()
                .map(|(i, &(ty, nullable, values))| {
                    let p = Primitive::ALL[usize::from(ty) % Primitive::ALL.len()];
                    let name = format!("c{i}");
                    let spec = match ty / 64 {
                        0 => ColumnSpec::utf8(name, usize::from(values % 512)),
                        1 => ColumnSpec::list(name, p, usize::from(values % 512)),
                        _ => ColumnSpec::primitive(name, p),
                    };
                    if nullable {
                        spec.with_nulls(0)
                    } else {
                        spec
                    }
                })
                .collect();
            let Ok(layout) = BatchLayout::new(rows, &specs) else {
                assert!(specs.is_empty());
                return;
            };
            let mut words = vec![0xa5a5_a5a5_a5a5_a5a5u64; layout.total_len().div_ceil(8)];
            let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            let mut writer = BatchWriter::new(&layout, buf).expect("the buffer fits");
            for (column, spec) in writer.columns().into_iter().zip(&specs) {
                // Every value in the last row, so offsets are monotonic.
                if let Some((last, rest)) = column.offsets.split_last_mut() {
                    rest.fill(0);
                    *last = i32::try_from(spec.values).expect("small");
                }
                if let ValuesMut::Bytes(b) = column.values {
                    b.fill(b'z');
                }
            }
            let batch = read_record_batch(Buffer::from_vec(words)).expect("a written batch reads");
            assert_eq!(batch.num_rows(), rows);
            assert_eq!(batch.schema().as_ref(), layout.schema().as_ref());
            read_columns(&batch);
        });
}
