//! Fuzz targets for every decoder the runtime runs on bytes another process
//! wrote: braid frames (length prefix and bincode body) off a socket or a
//! shared-memory ring, the ring's cursors a peer writes into the shared
//! page, and the chunks of an object pulled from another node.
//!
//! Under `cargo test` each target runs for about a second on random input
//! (bolero's default); a longer campaign of one target is one command (see
//! the README's "Fuzzing" section). Every target asserts that decoding never
//! panics and that the memory it holds is bounded by its input, never by a
//! length field it read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../object-store/tests/support/alloc_meter.rs"]
mod alloc_meter;

use bolero::check;
use braid::address::Address;
use braid::error::Error;
use braid::rpc::proto::ObjectChunk;
use braid::rpc::transfer::chunk_range;
use braid::wire::conn::{decode_frame, encode_frame, next_frame};
use braid::wire::messages::{Body, Frame, Hello, Message, Reply, ReturnValue, TaskResult};
use braid::wire::ring::{raw_fd, RingPair, RING_CAPACITY};
use braid::wire::MAX_FRAME;
use braid::{ActorId, NodeId, TaskId, WorkerId};
use braid_store::ObjectId;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// Slack for allocations no input drives (error messages, serde's bounded
/// preallocation of a sequence).
const SLACK: usize = 4 << 20;

/// Splits `bytes` into frames and decodes each, as a ring's reader does
/// with what it read; stops at the first error.
fn decode_stream(bytes: &[u8]) -> usize {
    let mut at = 0;
    let mut frames = 0;
    while let Ok(Some(body)) = next_frame(&bytes[at..]) {
        assert!(body.end <= bytes.len() - at && body.len() <= MAX_FRAME);
        if decode_frame(&bytes[at..][body.clone()]).is_err() {
            break;
        }
        at += body.end;
        frames += 1;
    }
    frames
}

#[test]
fn frames_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            decode_stream(bytes);
            let _ = decode_frame(bytes);
        });
    });
}

/// A declared length above the limit is refused; one the bytes do not yet
/// hold waits for more, never allocates.
#[test]
fn frame_length_prefix_is_bounded() {
    check!()
        .with_type::<(u32, Vec<u8>)>()
        .for_each(|(len, body)| {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(body);
            let found = alloc_meter::assert_bounded(bytes.len(), SLACK, || next_frame(&bytes));
            match found {
                Err(_) => assert!(*len as usize > MAX_FRAME),
                Ok(None) => assert!(body.len() < *len as usize),
                Ok(Some(range)) => assert_eq!(range, 4..4 + *len as usize),
            }
        });
}

/// Fields a structured target picks frames from.
type Fields = (u8, u64, u128, u32, bool, String, Vec<u8>);

fn address(&(_, a, b, pid, _, ref text, _): &Fields) -> Address {
    Address {
        worker: WorkerId(b),
        node: NodeId(b.rotate_left(7) ^ u128::from(a)),
        endpoint: braid::wire::Endpoint {
            machine: braid::wire::MachineId(text.clone()),
            socket: text.clone(),
            tcp: flag_text(text),
        },
        pid,
    }
}

/// A TCP address drawn from the text, for half the texts.
fn flag_text(text: &str) -> Option<String> {
    (text.len() % 2 == 0).then(|| format!("{text}:1"))
}

fn frame(fields: &Fields) -> Frame {
    let &(tag, a, b, pid, flag, ref text, ref bytes) = fields;
    let id = ObjectId::from_bytes(b.to_le_bytes());
    let message = match tag % 12 {
        0 => Message::Hello(Hello::Peer {
            token: text.clone(),
            address: address(fields),
        }),
        1 => Message::ReturnLease {
            lease: a,
            kill: flag,
        },
        2 => Message::PullObject {
            id,
            from: vec![NodeId(b); usize::from(tag % 4)],
        },
        3 => Message::FreeObjects(vec![(id, vec![NodeId(b)])]),
        4 => Message::Log {
            pid,
            label: text.clone(),
            stderr: flag,
            line: text.repeat(2),
        },
        5 => Message::Cancel(TaskId(b)),
        6 => Message::GetObject(id),
        7 => Message::AddBorrower {
            id,
            borrower: address(fields),
        },
        8 => Message::RemoveBorrower {
            id,
            borrower: WorkerId(b),
        },
        9 => Message::OpenRing { pid, fd: a as i32 },
        10 => Message::NodeInfo,
        _ => Message::Exit,
    };
    let body = match tag / 12 % 4 {
        0 => Body::Request(message),
        1 => Body::OneWay(message),
        2 => Body::Reply(Ok(Reply::Done(TaskResult {
            value: ReturnValue::Inline(bytes.clone()),
            contained: vec![(id, address(fields))],
            borrowed: Vec::new(),
            executor: address(fields),
        }))),
        _ => Body::Reply(Err(Error::ActorDied {
            actor: ActorId(b),
            cause: text.clone(),
        })),
    };
    Frame { seq: a, body }
}

#[test]
fn frames_round_trip() {
    check!().with_type::<Fields>().for_each(|fields| {
        let sent = frame(fields);
        let bytes = encode_frame(&sent).expect("a frame encodes");
        let body = next_frame(&bytes)
            .expect("the length is within the limit")
            .expect("the frame is whole");
        assert_eq!(body.end, bytes.len());
        let got = decode_frame(&bytes[body]).expect("an encoded frame decodes");
        // Frames hold no `PartialEq`; equal encodings are equal frames.
        assert_eq!(encode_frame(&got).expect("it encodes again"), bytes);
        // Two frames back to back, then a torn third, split as written.
        let mut stream = bytes.repeat(2);
        stream.extend_from_slice(&bytes[..bytes.len() - 1]);
        assert_eq!(decode_stream(&stream), 2);
    });
}

/// Offsets of the ring pair's control words in its memfd (`wire::ring`'s
/// `Header`: a 64-byte line of magic, then per ring six 64-byte lines:
/// tail, head, data signal, consumer sleeping, space signal, producer
/// waiting), and of ring 0's data.
const RING_BASE: [u64; 2] = [64, 64 + 6 * 64];
const TAIL: u64 = 0;
const HEAD: u64 = 64;
const SLEEPING: u64 = 3 * 64;
const WAITING: u64 = 5 * 64;
const DATA: u64 = 4096;

/// One ring pair for the whole target: its dialing side's memfd (written
/// as a hostile peer would) and the accepting side mapped from it.
struct Rings {
    file: std::fs::File,
    peer: RingPair,
    _dialer: RingPair,
}

fn rings() -> &'static Mutex<Rings> {
    static RINGS: OnceLock<Mutex<Rings>> = OnceLock::new();
    RINGS.get_or_init(|| {
        let (dialer, fd) = RingPair::create().expect("create a ring pair");
        let peer = RingPair::open(std::process::id(), raw_fd(&fd)).expect("map it");
        let file = std::fs::File::from(fd);
        let rings = Rings {
            file,
            peer,
            _dialer: dialer,
        };
        // The offsets above are the layout: a write of ring 0's tail shows.
        put(&rings.file, RING_BASE[0] + TAIL, 5);
        put(&rings.file, RING_BASE[0] + HEAD, 0);
        assert_eq!(rings.peer.available().expect("5 bytes wait"), 5);
        Mutex::new(rings)
    })
}

fn put(file: &std::fs::File, at: u64, value: u64) {
    file.write_all_at(&value.to_le_bytes(), at)
        .expect("write the shared page");
}

/// What a peer controls of a ring pair: per ring a head cursor (and how
/// to place it), the tail's distance from it, two flags; and bytes in the
/// ring this side reads.
type RingInput = ([(u64, u8, u32); 2], [u32; 4], u32, Vec<u8>);

/// Both cursors of a ring: the head anywhere, near zero or near the top of
/// the `u64` range; the tail mostly within a ring's length of it (a
/// plausible ring), sometimes anywhere.
fn cursors((head, place, distance): (u64, u8, u32)) -> (u64, u64) {
    let head = match place % 3 {
        0 => head,
        1 => head % (1 << 20),
        _ => u64::MAX - head % (1 << 20),
    };
    let distance = u64::from(distance);
    let tail = match place / 3 % 4 {
        0 => head.wrapping_add(distance),
        1 => head.wrapping_sub(distance),
        _ => head.wrapping_add(distance % (RING_CAPACITY + 2)),
    };
    (head, tail)
}

/// The accepting side of a ring pair whose dialing peer wrote arbitrary
/// cursors, flags and frame bytes into the shared page: every operation
/// either works or reports a corrupt ring, and what it reads is bounded by
/// the ring, never by the cursors.
#[test]
fn ring_with_hostile_cursors() {
    check!()
        .with_type::<RingInput>()
        .for_each(|(places, flags, at, data)| {
            let rings = rings().lock().unwrap_or_else(|e| e.into_inner());
            for (ring, base) in RING_BASE.iter().enumerate() {
                let (head, tail) = cursors(places[ring]);
                put(&rings.file, base + TAIL, tail);
                put(&rings.file, base + HEAD, head);
                rings
                    .file
                    .write_all_at(&flags[2 * ring].to_le_bytes(), base + SLEEPING)
                    .expect("write a flag");
                rings
                    .file
                    .write_all_at(&flags[2 * ring + 1].to_le_bytes(), base + WAITING)
                    .expect("write a flag");
            }
            let data = &data[..data.len().min(RING_CAPACITY as usize)];
            let offset = u64::from(*at) % (RING_CAPACITY - data.len() as u64 + 1);
            rings
                .file
                .write_all_at(data, DATA + offset)
                .expect("write ring bytes");
            let peer = &rings.peer;
            alloc_meter::assert_bounded(data.len(), SLACK + 2 * RING_CAPACITY as usize, || {
                let mut buf = Vec::new();
                if let Ok(n) = peer.read_into(&mut buf) {
                    assert!(n as u64 <= RING_CAPACITY && buf.len() == n);
                    decode_stream(&buf);
                }
                let _ = peer.available();
                let _ = peer.fits(usize::from(places[0].1) << 12);
                if let Ok(n) = peer.write_some(&data[..data.len().min(64)]) {
                    assert!(n <= 64);
                }
                let _ = peer.prepare_sleep();
                peer.mark_polling();
                let _ = peer.end_polling();
                let _ = peer.wait_for_space(std::time::Duration::ZERO);
            });
        });
}

/// A chunk of a pulled object, decoded from the protobuf bytes a peer
/// node sent, checked against a transfer in progress.
#[test]
fn transfer_chunks_from_bytes() {
    check!()
        .with_type::<(u64, u64, Vec<u8>)>()
        .for_each(|(received, total, bytes)| {
            alloc_meter::assert_bounded(bytes.len(), SLACK, || {
                let Ok(chunk) = <ObjectChunk as prost::Message>::decode(&bytes[..]) else {
                    return;
                };
                if let Ok(range) = chunk_range(&chunk, *received, *total) {
                    assert_eq!(range.start as u64, *received);
                    assert_eq!(range.len(), chunk.data.len());
                    assert!(range.end as u64 <= *total);
                }
            });
        });
}

/// A chunk a well-behaved peer sends is accepted where it belongs, and
/// refused at any other offset.
#[test]
fn transfer_chunks_round_trip() {
    check!()
        .with_type::<(u32, u32, Vec<u8>)>()
        .for_each(|(received, extra, data)| {
            let received = u64::from(*received);
            let total = received + data.len() as u64 + u64::from(*extra);
            let chunk = ObjectChunk {
                total_size: total,
                offset: received,
                data: data.clone().into(),
                crc32: crc32fast::hash(data),
            };
            let bytes = prost::Message::encode_to_vec(&chunk);
            let got = <ObjectChunk as prost::Message>::decode(&bytes[..]).expect("it decodes");
            let range = chunk_range(&got, received, total).expect("a good chunk fits");
            assert_eq!(range, received as usize..received as usize + data.len());
            assert!(chunk_range(&got, received + 1, total).is_err());
            if !data.is_empty() {
                assert!(chunk_range(&got, received, total - 1 - u64::from(*extra)).is_err());
            }
        });
}
