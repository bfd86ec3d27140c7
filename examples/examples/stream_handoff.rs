//! How long a feature batch takes to cross from an operator process to a
//! trainer process through the node's store, against what serializing or
//! copying it would cost, all measured in one run.
//!
//! ```text
//! cargo run --release --example stream_handoff
//! ```
//!
//! The sender (this process, which also runs the store server on a thread,
//! as a node daemon would) builds each batch as an Arrow record batch in
//! place in a store object (`label: Float32`, `ids: List<UInt64>`), seals
//! it lending one pin to the receiver's store connection in the same request
//! (`braid_store::lend`), stamps the monotonic clock and sends the lend
//! ticket over a shared-memory ring. The receiver (a child process) adopts the ticket,
//! which holds the object without a round trip to the store, and reads it
//! as an Arrow `RecordBatch` in place; the figure is the time from the seal
//! to the receiver holding the batch. The receiver either polls the ring or
//! sleeps on its futex until woken; a third run has the polling receiver
//! `get` the object from the store instead (a round trip), for comparison. The receiver checks that
//! every buffer of the batch lies inside its mapping of the store's arena
//! (a buffer outside it would count as copied bytes).
//!
//! Beside them: the same handoff of a hand format (the three columns back
//! to back, 64-byte aligned, read as typed slices after checking the row
//! offsets, as a reader of untrusted bytes must), serde (bincode) encode
//! plus decode of the same columns, and a memcpy of the batch's bytes. Logs go to stderr; the last stdout
//! line is one JSON object.

use anyhow::{bail, Context, Result};
use braid::store::arrow_array::{cast::AsArray, Array};
use braid::store::batch::{BatchLayout, BatchWriter, ColumnSpec, ColumnType, Primitive, ValuesMut};
use braid::store::{LendTicket, ObjectId, StoreClient, StoreConfig, StoreSeat, StoreServer};
use braid::wire::ring::{raw_fd, RingPair, Woken};
use serde::{Deserialize, Serialize};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Feature ids per row.
const IDS_PER_ROW: usize = 16;
/// Batch sizes, in bytes of columns.
const SIZES: [usize; 2] = [64 << 10, 4 << 20];
/// Timed handoffs per size and mode (after warm-up).
const SAMPLES: usize = 400;
const WARMUP: usize = 20;
/// sender → receiver: seal time (ns), rows, ticket length, codec bytes of
/// the lend ticket; rows of `u64::MAX` end the run. receiver → sender, at
/// start: length and codec bytes of its store seat, in the same frame.
const MSG: usize = 128;
/// Where a message's ticket (or seat) bytes start.
const TICKET_AT: usize = 20;
/// receiver → sender: latency (ns), of which getting the object (ns),
/// copied bytes.
const ACK: usize = 24;

fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn rows_for(bytes: usize) -> usize {
    (bytes / (4 + 4 + 8 * IDS_PER_ROW)).max(1)
}

fn layout(rows: usize) -> Result<BatchLayout> {
    Ok(BatchLayout::new(
        rows,
        &[
            ColumnSpec::primitive("label", Primitive::Float32),
            ColumnSpec {
                name: "ids".into(),
                ty: ColumnType::List(Primitive::UInt64),
                nullable: false,
                nulls: 0,
                values: rows * IDS_PER_ROW,
            },
        ],
    )?)
}

/// Byte ranges of the hand format's columns for `rows` rows: labels,
/// offsets, ids, and the total length.
fn hand_layout(
    rows: usize,
) -> (
    std::ops::Range<usize>,
    std::ops::Range<usize>,
    std::ops::Range<usize>,
    usize,
) {
    let up = |n: usize| n.div_ceil(64) * 64;
    let labels = 0..4 * rows;
    let offsets = up(labels.end)..up(labels.end) + 4 * (rows + 1);
    let ids = up(offsets.end)..up(offsets.end) + 8 * rows * IDS_PER_ROW;
    let total = ids.end;
    (labels, offsets, ids, total)
}

/// The same columns as plain vectors, for the serde comparison.
#[derive(Serialize, Deserialize)]
struct OwnedBatch {
    labels: Vec<f32>,
    offsets: Vec<i32>,
    ids: Vec<u64>,
}

fn owned(rows: usize, seed: u64) -> OwnedBatch {
    OwnedBatch {
        labels: (0..rows).map(|r| ((r as u64 + seed) % 2) as f32).collect(),
        offsets: (0..=rows).map(|r| (r * IDS_PER_ROW) as i32).collect(),
        ids: (0..rows * IDS_PER_ROW)
            .map(|i| (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect(),
    }
}

fn fill(writer: &mut BatchWriter<'_>, batch: &OwnedBatch) -> Result<()> {
    let mut columns = writer.columns().into_iter();
    let (Some(label), Some(ids)) = (columns.next(), columns.next()) else {
        bail!("the layout has two columns");
    };
    let (ValuesMut::Float32(l), ValuesMut::UInt64(i)) = (label.values, ids.values) else {
        bail!("unexpected column types");
    };
    l.copy_from_slice(&batch.labels);
    ids.offsets.copy_from_slice(&batch.offsets);
    i.copy_from_slice(&batch.ids);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role-receiver") {
        return receiver(&args[1..]);
    }
    if let Some(arg) = args.first() {
        if arg == "-h" || arg == "--help" {
            println!("Usage: stream_handoff\n\nMeasures the store handoff of 64 KiB and 4 MiB feature batches between two processes; the last stdout line is JSON.");
            return Ok(());
        }
        bail!("unexpected argument {arg:?} (try --help)");
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("store.sock");
    let config = StoreConfig::with_capacity(&socket, 256 << 20);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_thread = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let server = StoreServer::bind(config).await?;
            let handle = server.handle();
            let _ = ready_tx.send(handle);
            server.run().await?;
            anyhow::Ok(())
        })
    });
    let handle = ready_rx.recv().context("the store server did not start")?;
    let client = StoreClient::connect(&socket)?;
    let mut sizes = Vec::new();
    for &bytes in &SIZES {
        let rows = rows_for(bytes);
        let layout = layout(rows)?;
        let batch = owned(rows, 7);
        let mut poll = handoff(&client, &socket, &layout, &batch, "poll")?;
        let mut blocked = handoff(&client, &socket, &layout, &batch, "block")?;
        let mut round_trip = handoff(&client, &socket, &layout, &batch, "get")?;
        let mut hand = handoff(&client, &socket, &layout, &batch, "hand")?;
        let (mut codec, codec_len) = serde_round_trips(&batch)?;
        let mut copy = memcpy(layout.total_len());
        let entry = serde_json::json!({
            "bytes": layout.total_len(),
            "rows": rows,
            "poll_us_p50": median(&mut poll.latencies_us),
            "poll_hold_us_p50": median(&mut poll.get_us),
            "blocked_us_p50": median(&mut blocked.latencies_us),
            "poll_store_get_us_p50": median(&mut round_trip.latencies_us),
            "hand_format_poll_us_p50": median(&mut hand.latencies_us),
            "bincode_us_p50": median(&mut codec),
            "memcpy_us_p50": median(&mut copy),
            "codec_bytes": 0,
            "copied_bytes": poll.copied + blocked.copied,
            "bincode_bytes": codec_len,
        });
        eprintln!("{entry}");
        sizes.push(entry);
    }
    handle.shutdown();
    drop(client);
    let _ = server_thread.join();
    println!("{}", serde_json::json!({ "sizes": sizes }));
    Ok(())
}

struct Handoffs {
    latencies_us: Vec<f64>,
    /// Of each latency, the part until the receiver held the object (the
    /// rest is reading it as a record batch: Arrow's validation, and first
    /// touches of its pages in the receiver's mapping).
    get_us: Vec<f64>,
    copied: u64,
}

/// A receiver process, killed by pid if it is still running when dropped.
struct Receiver(Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn handoff(
    client: &StoreClient,
    socket: &std::path::Path,
    layout: &BatchLayout,
    batch: &OwnedBatch,
    mode: &str,
) -> Result<Handoffs> {
    let (ring, fd) = RingPair::create()?;
    let mut child = Receiver(
        Command::new(std::env::current_exe()?)
            .args([
                "--role-receiver",
                &socket.to_string_lossy(),
                &std::process::id().to_string(),
                &raw_fd(&fd).to_string(),
                mode,
            ])
            .spawn()
            .context("starting the receiver")?,
    );
    let mut acks = Vec::new();
    let hello = recv(&ring, &mut acks, MSG, &mut child.0)?;
    let seat: StoreSeat = decode_framed(&hello)?;
    let mut out = Handoffs {
        latencies_us: Vec::new(),
        get_us: Vec::new(),
        copied: 0,
    };
    for i in 0..WARMUP + SAMPLES {
        let id = ObjectId::random();
        let (sealed, ticket) = if mode == "hand" {
            let (labels, offsets, ids, total) = hand_layout(layout.rows());
            let mut buf = client.create(id, total as u64)?;
            let bytes = buf.as_mut_slice();
            bytes[labels].copy_from_slice(bytemuck::cast_slice(&batch.labels));
            bytes[offsets].copy_from_slice(bytemuck::cast_slice(&batch.offsets));
            bytes[ids].copy_from_slice(bytemuck::cast_slice(&batch.ids));
            buf.seal_lent(&seat)?
        } else {
            let mut buf = client.create(id, layout.total_len() as u64)?;
            let mut writer = BatchWriter::new(layout, buf.as_mut_slice())?;
            fill(&mut writer, batch)?;
            writer.finish()?;
            buf.seal_lent(&seat)?
        };
        let t0 = now_ns();
        let mut msg = framed(&ticket)?;
        msg[..8].copy_from_slice(&t0.to_le_bytes());
        msg[8..16].copy_from_slice(&(layout.rows() as u64).to_le_bytes());
        send(&ring, &msg)?;
        let ack = recv(&ring, &mut acks, ACK, &mut child.0)?;
        let latency = u64::from_le_bytes(ack[..8].try_into()?);
        let got = u64::from_le_bytes(ack[8..16].try_into()?);
        let copied = u64::from_le_bytes(ack[16..24].try_into()?);
        drop(sealed);
        client.delete(id)?;
        if i >= WARMUP {
            out.latencies_us.push(latency as f64 / 1e3);
            out.get_us.push(got as f64 / 1e3);
            out.copied += copied;
        }
        // Let the receiver go back to polling or sleeping.
        let pause = Instant::now();
        while pause.elapsed() < Duration::from_micros(200) {
            std::hint::spin_loop();
        }
    }
    let mut end = [0u8; MSG];
    end[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    send(&ring, &end)?;
    let status = child.0.wait()?;
    if !status.success() {
        bail!("the {mode} receiver failed: {status}");
    }
    Ok(out)
}

/// A message whose ticket bytes hold `value` (the first bytes are left for
/// the caller).
fn framed<T: Serialize>(value: &T) -> Result<[u8; MSG]> {
    let bytes = braid::store::codec::encode(value)?;
    let mut msg = [0u8; MSG];
    let len = u32::try_from(bytes.len())?;
    if TICKET_AT + bytes.len() > MSG {
        bail!("a ticket of {len} bytes does not fit a message");
    }
    msg[16..TICKET_AT].copy_from_slice(&len.to_le_bytes());
    msg[TICKET_AT..TICKET_AT + bytes.len()].copy_from_slice(&bytes);
    Ok(msg)
}

fn decode_framed<T: serde::de::DeserializeOwned>(msg: &[u8]) -> Result<T> {
    let len = u32::from_le_bytes(msg[16..TICKET_AT].try_into()?) as usize;
    let bytes = msg
        .get(TICKET_AT..TICKET_AT + len)
        .context("a ticket longer than its message")?;
    Ok(braid::store::codec::decode(bytes)?)
}

fn send(ring: &RingPair, msg: &[u8]) -> Result<()> {
    let mut at = 0;
    while at < msg.len() {
        at += ring.write_some(&msg[at..])?;
        if at < msg.len() {
            ring.wait_for_space(Duration::from_millis(10))?;
        }
    }
    Ok(())
}

/// Reads one `len`-byte message, polling; fails if `child` exits first.
fn recv(ring: &RingPair, pending: &mut Vec<u8>, len: usize, child: &mut Child) -> Result<Vec<u8>> {
    let started = Instant::now();
    while pending.len() < len {
        if ring.read_into(pending)? == 0 {
            std::hint::spin_loop();
            if started.elapsed() > Duration::from_secs(10) {
                if let Some(status) = child.try_wait()? {
                    bail!("the receiver exited: {status}");
                }
                bail!("no answer from the receiver within 10 s");
            }
        }
    }
    Ok(pending.drain(..len).collect())
}

fn receiver(args: &[String]) -> Result<()> {
    let [socket, pid, fd, mode] = args else {
        bail!("receiver wants SOCKET PID FD MODE");
    };
    let client = StoreClient::connect(socket)?;
    let arena = client.arena_range();
    let ring = RingPair::open(pid.parse()?, fd.parse()?)?;
    let polling = mode != "block";
    let hand = mode == "hand";
    let round_trip = mode == "get";
    send(&ring, &framed(&client.seat())?)?;
    let mut pending = Vec::new();
    loop {
        while pending.len() < MSG {
            if polling {
                ring.mark_polling();
                if ring.read_into(&mut pending)? == 0 {
                    std::hint::spin_loop();
                }
            } else if let Some(signal) = ring.prepare_sleep()? {
                if ring.sleep(signal, Duration::from_secs(10)) == Woken::TimedOut
                    && ring.available()? == 0
                {
                    bail!("no batch within 10 s");
                }
            } else {
                ring.read_into(&mut pending)?;
            }
        }
        let msg: Vec<u8> = pending.drain(..MSG).collect();
        let t0 = u64::from_le_bytes(msg[..8].try_into()?);
        let rows = u64::from_le_bytes(msg[8..16].try_into()?);
        if rows == u64::MAX {
            return Ok(());
        }
        let ticket: LendTicket = decode_framed(&msg)?;
        let view = if round_trip {
            let view = client.get(ticket.id(), Duration::from_secs(5))?;
            drop(client.adopt(&ticket)?);
            view
        } else {
            client.adopt(&ticket)?
        };
        let got = now_ns();
        if hand {
            let t1 = read_hand(view.as_bytes(), rows as usize)?;
            drop(view);
            let mut ack = [0u8; ACK];
            ack[..8].copy_from_slice(&t1.saturating_sub(t0).to_le_bytes());
            ack[8..16].copy_from_slice(&got.saturating_sub(t0).to_le_bytes());
            send(&ring, &ack)?;
            continue;
        }
        let batch = view.record_batch()?;
        let t1 = now_ns();
        if batch.num_rows() as u64 != rows {
            bail!("the batch has {} rows, not {rows}", batch.num_rows());
        }
        let mut copied = 0u64;
        for column in batch.columns() {
            let data = column.to_data();
            let mut buffers: Vec<&braid::store::arrow_buffer::Buffer> =
                data.buffers().iter().collect();
            for child in data.child_data() {
                buffers.extend(child.buffers());
            }
            for b in buffers {
                let at = b.as_ptr() as usize;
                if !(arena.contains(&at) && at + b.len() <= arena.end) {
                    copied += b.len() as u64;
                }
            }
        }
        let labels = batch
            .column(0)
            .as_primitive::<braid::store::arrow_array::types::Float32Type>();
        std::hint::black_box(labels.value(labels.len().saturating_sub(1)));
        drop(batch);
        drop(view);
        let mut ack = [0u8; ACK];
        ack[..8].copy_from_slice(&t1.saturating_sub(t0).to_le_bytes());
        ack[8..16].copy_from_slice(&got.saturating_sub(t0).to_le_bytes());
        ack[16..].copy_from_slice(&copied.to_le_bytes());
        send(&ring, &ack)?;
    }
}

/// Views the hand format's columns in place, checks that the row offsets
/// partition the ids, and returns the time it was done.
fn read_hand(bytes: &[u8], rows: usize) -> Result<u64> {
    let (labels, offsets, ids, total) = hand_layout(rows);
    if bytes.len() < total {
        bail!("the object is {} bytes, not {total}", bytes.len());
    }
    let labels: &[f32] =
        bytemuck::try_cast_slice(&bytes[labels]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let offsets: &[u32] =
        bytemuck::try_cast_slice(&bytes[offsets]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: &[u64] = bytemuck::try_cast_slice(&bytes[ids]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let partitions = offsets.first() == Some(&0)
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets.last().map(|&l| l as usize) == Some(ids.len());
    let t1 = now_ns();
    if !partitions || labels.len() != rows {
        bail!("the hand-format batch is malformed");
    }
    std::hint::black_box(labels.last());
    Ok(t1)
}

/// Medians of serde encode + decode of the batch's columns, and the
/// encoded length.
fn serde_round_trips(batch: &OwnedBatch) -> Result<(Vec<f64>, usize)> {
    let mut times = Vec::new();
    let mut len = 0;
    for _ in 0..SAMPLES.min(100) {
        let t = Instant::now();
        let bytes = braid::store::codec::encode(batch)?;
        let back: OwnedBatch = braid::store::codec::decode(&bytes)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        len = bytes.len();
        std::hint::black_box(back);
    }
    Ok((times, len))
}

/// Times of copying `bytes` bytes into a buffer already touched.
fn memcpy(bytes: usize) -> Vec<f64> {
    let src = vec![7u8; bytes];
    let mut dst = vec![0u8; bytes];
    (0..SAMPLES.min(100))
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}
