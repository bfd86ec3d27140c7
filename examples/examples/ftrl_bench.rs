//! Learning-only FTRL throughput: rows already parsed into memory, learned
//! one by one by a single thread (`Model::learn`: predict, then update),
//! so the figure is examples per second per core. Parsing is timed
//! separately on the same input.
//!
//! Run: `cargo run --release --example ftrl_bench -- --input FILE`
//! (a `gen_ctr.py` file; without one, the built-in synthetic stream).
//!
//! Prints, as the last stdout line, one JSON object with medians of
//! `--runs` runs.

use anyhow::Context as _;
use braid_actors::train::data::{FeatureBatch, SyntheticConfig, SyntheticStream};
use braid_actors::train::metrics::Progressive;
use braid_actors::train::model::LogisticLearner as Model;
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{FileReader, RowReader, SyntheticReader};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// A gen_ctr file (`label id id …`); default: the synthetic stream.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Rows of the synthetic stream.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Hashed feature space, bits.
    #[arg(long, default_value_t = 22)]
    bits: u32,
    /// Runs (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn reader(args: &Args) -> anyhow::Result<Box<dyn RowReader>> {
    Ok(match &args.input {
        Some(path) => Box::new(FileReader::gen_ctr(path, args.bits)?),
        None => Box::new(SyntheticReader(SyntheticStream::new(SyntheticConfig {
            rows: args.rows,
            bits: args.bits,
            ..SyntheticConfig::default()
        })?)),
    })
}

/// Reads the whole input into batches of 4096 rows; returns them and the
/// seconds it took.
fn load(args: &Args) -> anyhow::Result<(Vec<FeatureBatch>, f64)> {
    let mut reader = reader(args)?;
    let started = Instant::now();
    let mut batches = Vec::new();
    loop {
        let mut batch = FeatureBatch::with_capacity(4096, 4096 * 40);
        if reader.read(&mut batch, 4096).context("read the input")? == 0 {
            break;
        }
        batches.push(batch);
    }
    Ok((batches, started.elapsed().as_secs_f64()))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ftrl = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let (mut parse_rates, mut learn_rates) = (Vec::new(), Vec::new());
    let (mut rows, mut logloss, mut auc) = (0u64, 0.0, 0.0);
    for run in 0..args.runs.max(1) {
        let (batches, parse_s) = load(&args)?;
        rows = batches.iter().map(|b| b.rows() as u64).sum();
        anyhow::ensure!(rows > 0, "the input has no rows");
        let mut model = Model::with_capacity(ftrl, rows as usize)?;
        let mut metrics = Progressive::new(10_000);
        let started = Instant::now();
        let mut scores = Vec::with_capacity(4096);
        for batch in &batches {
            scores.clear();
            for (label, ids, values) in batch.iter() {
                scores.push(model.learn(ids, values, label)?);
            }
            metrics.record_all(batch.labels(), &scores);
        }
        let learn_s = started.elapsed().as_secs_f64();
        parse_rates.push(rows as f64 / parse_s);
        learn_rates.push(rows as f64 / learn_s);
        (logloss, auc) = (metrics.logloss(), metrics.auc());
        eprintln!(
            "run {run}: parse {:.0} rows/s, learn {:.0} examples/s",
            rows as f64 / parse_s,
            rows as f64 / learn_s
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "runs": args.runs.max(1),
            "learn_examples_per_s_per_core": median(learn_rates),
            "parse_rows_per_s_per_core": median(parse_rates),
            "logloss": logloss,
            "auc": auc,
        })
    );
    Ok(())
}
