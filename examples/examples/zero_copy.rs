//! Two processes share one object with no copy.
//!
//! ```text
//! cargo run --release --example zero_copy
//! ```
//!
//! This process starts a braid object store, builds a columnar feature batch
//! (`label: f32`, `offsets: u32`, `feature: u64`) directly in shared memory,
//! seals it, and starts a second process: a copy of this program in the
//! reader role. The reader gets the batch by id, checks that every column it
//! reads lies inside its own mapping of the store's arena (so nothing was
//! copied), sums the columns in place and reports back. The writer checks the
//! sums against its own.

use anyhow::{bail, ensure, Context, Result};
use braid_store::batch::{BatchLayout, ColumnSpec};
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
    let layout = BatchLayout::new(&[
        ColumnSpec::new::<f32>("label", ROWS as u64),
        ColumnSpec::new::<u32>("offsets", ROWS as u64 + 1),
        ColumnSpec::new::<u64>("feature", (ROWS * FEATURES_PER_ROW) as u64),
    ])?;
    let id = ObjectId::random();
    let started = Instant::now();
    let mut buf = client.create(id, layout.total_len())?;
    {
        let mut batch = buf.batch_writer(&layout)?;
        let mut cols = batch.split_columns_mut()?;
        let labels = cols.take::<f32>("label")?;
        let offsets = cols.take::<u32>("offsets")?;
        let features = cols.take::<u64>("feature")?;
        for (row, label) in labels.iter_mut().enumerate() {
            *label = (row % 7 == 0) as u32 as f32;
        }
        for (row, offset) in offsets.iter_mut().enumerate() {
            *offset = (row * FEATURES_PER_ROW) as u32;
        }
        for (i, feature) in features.iter_mut().enumerate() {
            *feature = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        }
    }
    let batch = buf.seal()?;
    let (label_sum, feature_sum) = sums(&batch)?;
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

fn sums(view: &braid_store::ObjectView) -> Result<(f64, u64)> {
    let batch = view.batch()?;
    let labels = batch.column::<f32>("label")?;
    let features = batch.column::<u64>("feature")?;
    let label_sum: f64 = labels.iter().map(|&x| f64::from(x)).sum();
    let feature_sum = features.iter().fold(0u64, |a, &x| a.wrapping_add(x));
    Ok((label_sum, feature_sum))
}

fn reader(socket: &str, id: ObjectId) -> Result<()> {
    let connected = Instant::now();
    let client = StoreClient::connect(socket)?;
    let view = client.get(id, Duration::from_secs(5))?;
    let latency = connected.elapsed();
    let arena = client.arena_range();
    let batch = view.batch()?;
    for name in batch.column_names() {
        let bytes: &[u8] = match batch.dtype(name) {
            Some(braid_store::batch::DType::F32) => {
                bytemuck::cast_slice(batch.column::<f32>(name)?)
            }
            Some(braid_store::batch::DType::U32) => {
                bytemuck::cast_slice(batch.column::<u32>(name)?)
            }
            Some(braid_store::batch::DType::U64) => {
                bytemuck::cast_slice(batch.column::<u64>(name)?)
            }
            other => bail!("unexpected column type {other:?}"),
        };
        let start = bytes.as_ptr() as usize;
        ensure!(
            arena.contains(&start) && start + bytes.len() <= arena.end,
            "column {name} is not in the shared arena"
        );
        println!(
            "reader (pid {}): column {name:8} {:>9} bytes at {start:#x}, inside this process's arena mapping {:#x}..{:#x}",
            std::process::id(),
            bytes.len(),
            arena.start,
            arena.end
        );
    }
    let (label_sum, feature_sum) = sums(&view)?;
    println!(
        "reader: connected and got the batch in {:.2} ms",
        latency.as_secs_f64() * 1e3
    );
    println!("reader: sums {label_sum} {feature_sum}");
    Ok(())
}
