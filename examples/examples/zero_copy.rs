//! Two processes share one object with no copy.
//!
//! ```text
//! cargo run --release --example zero_copy
//! ```
//!
//! This process starts a braid object store, builds an Arrow record batch of
//! features (`label: Float32`, `features: List<UInt64>`) directly in shared
//! memory, in Arrow IPC layout, seals it, and starts a second process: a copy
//! of this program in the reader role. The reader gets the batch by id as an
//! Arrow `RecordBatch`, checks that every buffer of every column lies inside
//! its own mapping of the store's arena (so nothing was copied or decoded),
//! sums the columns in place and reports back. The writer checks the sums
//! against its own.

use anyhow::{bail, ensure, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use braid_store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut};
use braid_store::{ObjectId, StoreClient, StoreConfig, StoreServer};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: usize = 1 << 20;
const FEATURES_PER_ROW: usize = 16;

const USAGE: &str = "\
Usage: zero_copy

Starts an object store, writes a 1M-row feature batch into shared memory and
has a second process (this program again, with the internal `--reader
SOCKET ID` role) read it in place, with no copy. Takes no arguments.

Options:
  -h, --help  Print this help";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--reader") => {
            let socket = args.get(2).context("socket path")?;
            let id = args.get(3).context("object id")?;
            reader(socket, id.parse()?)
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("error: unexpected argument {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
        None => writer(),
    }
}

fn writer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("store.sock");
    let runtime = tokio::runtime::Runtime::new()?;
    let server = runtime.block_on(StoreServer::bind(StoreConfig::with_capacity(
        &socket,
        1 << 30,
    )))?;
    let store = server.handle();
    runtime.spawn(server.run());
    println!("store listening on {}", socket.display());

    let client = StoreClient::connect(&socket)?;
    let layout = BatchLayout::new(
        ROWS,
        &[
            ColumnSpec::primitive("label", Primitive::Float32),
            ColumnSpec::list("features", Primitive::UInt64, ROWS * FEATURES_PER_ROW),
        ],
    )?;
    let id = ObjectId::random();
    let started = Instant::now();
    let mut buf = client.create(id, layout.total_len() as u64)?;
    {
        let mut batch = buf.batch_writer(&layout)?;
        let mut cols = batch.columns().into_iter();
        let (Some(label_col), Some(feature_col)) = (cols.next(), cols.next()) else {
            bail!("the layout has two columns");
        };
        let (ValuesMut::Float32(labels), ValuesMut::UInt64(features)) =
            (label_col.values, feature_col.values)
        else {
            bail!("label is f32 and features u64");
        };
        for (row, label) in labels.iter_mut().enumerate() {
            *label = (row % 7 == 0) as u32 as f32;
        }
        for (row, offset) in feature_col.offsets.iter_mut().enumerate() {
            *offset = i32::try_from(row * FEATURES_PER_ROW)?;
        }
        for (i, feature) in features.iter_mut().enumerate() {
            *feature = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        }
        batch.finish()?;
    }
    let batch = buf.seal()?;
    let (label_sum, feature_sum) = sums(&batch.record_batch()?)?;
    println!(
        "writer: built a {:.1} MiB batch of {ROWS} rows in place in {:.1} ms (object {id})",
        layout.total_len() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64() * 1e3
    );

    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--reader")
        .arg(&socket)
        .arg(id.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("reader stdout")?;
    let mut reported = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("reader: sums ") {
            let mut parts = rest.split_whitespace();
            let l: f64 = parts.next().context("label sum")?.parse()?;
            let f: u64 = parts.next().context("feature sum")?.parse()?;
            reported = Some((l, f));
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "the reader failed: {status}");
    let Some((l, f)) = reported else {
        bail!("the reader reported no sums");
    };
    ensure!(
        l == label_sum && f == feature_sum,
        "reader saw different data"
    );
    println!("writer: the reader's sums match ({label_sum}, {feature_sum}); zero copies made");
    drop(batch);
    println!("store: {:?}", store.stats().arena);
    store.shutdown();
    Ok(())
}

fn sums(batch: &RecordBatch) -> Result<(f64, u64)> {
    let labels = batch
        .column(0)
        .as_primitive_opt::<Float32Type>()
        .context("label is Float32")?;
    let features = batch
        .column(1)
        .as_list_opt::<i32>()
        .context("features is a list")?
        .values()
        .as_primitive_opt::<UInt64Type>()
        .context("of UInt64")?;
    let label_sum: f64 = labels.values().iter().map(|&x| f64::from(x)).sum();
    let feature_sum = features
        .values()
        .iter()
        .fold(0u64, |a, &x| a.wrapping_add(x));
    Ok((label_sum, feature_sum))
}

fn reader(socket: &str, id: ObjectId) -> Result<()> {
    let connected = Instant::now();
    let client = StoreClient::connect(socket)?;
    let view = client.get(id, Duration::from_secs(5))?;
    let batch = view.record_batch()?;
    let latency = connected.elapsed();
    drop(view);
    let arena = client.arena_range();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let mut data = vec![column.to_data()];
        while let Some(d) = data.pop() {
            for buffer in d.buffers() {
                let start = buffer.as_ptr() as usize;
                ensure!(
                    arena.contains(&start) && start + buffer.len() <= arena.end,
                    "a buffer of column {} is not in the shared arena",
                    field.name()
                );
                println!(
                    "reader (pid {}): column {:8} buffer of {:>9} bytes at {start:#x}, inside this process's arena mapping {:#x}..{:#x}",
                    std::process::id(),
                    field.name(),
                    buffer.len(),
                    arena.start,
                    arena.end
                );
            }
            data.extend(d.child_data().iter().cloned());
        }
    }
    let (label_sum, feature_sum) = sums(&batch)?;
    println!(
        "reader: connected and read the {}-row RecordBatch in place in {:.2} ms",
        batch.num_rows(),
        latency.as_secs_f64() * 1e3
    );
    println!("reader: sums {label_sum} {feature_sum}");
    Ok(())
}
