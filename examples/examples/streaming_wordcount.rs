//! Streaming word count on an embedded cluster: lines from a file (or a
//! built-in generator) → words → `key_by(word)` → running count → a
//! transactional file sink that publishes only what a completed checkpoint
//! covers.
//!
//! Run: `cargo run --release --example streaming_wordcount -- --out /tmp/wc`
//! (`--input FILE` to count a file; the committed files are
//! `<out>/part-<epoch>-<subtask>`, lines `word count`, the last line of a
//! word holding its total.)

use anyhow::Context as _;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::{FileSource, GeneratorSource};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// A text file to count (default: generated lines).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Generated lines when there is no input file.
    #[arg(long, default_value_t = 100_000)]
    lines: u64,
    /// Where the sink commits (default: a fresh temporary directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Subtasks per operator.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// Checkpoint interval.
    #[arg(long, default_value_t = 200)]
    checkpoint_ms: u64,
}

const WORDS: [&str; 12] = [
    "stream", "actor", "barrier", "epoch", "state", "key", "window", "sink", "source", "braid",
    "ring", "store",
];

fn generated_line(i: u64) -> String {
    (0..6)
        .map(|j| WORDS[((i * 7 + j * 5 + i / 3) % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

fn words(line: String) -> Vec<String> {
    line.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn wordcount(params: &JobParams) -> StreamEnv {
    let parallelism: usize = params
        .get("parallelism")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let out = PathBuf::from(params.get("out").cloned().unwrap_or_default());
    let env = StreamEnv::new(parallelism);
    let lines = match params.get("input") {
        Some(input) => {
            let input = PathBuf::from(input);
            env.source("file", move |s, p| FileSource::new(input.clone(), s, p))
        }
        None => {
            let n: u64 = params
                .get("lines")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            env.source("generated", move |s, p| {
                GeneratorSource::new(n, s, p, generated_line)
            })
        }
    };
    lines
        .flat_map(words)
        .map(|w: String| (w, 1u64))
        .key_by(|wc: &(String, u64)| wc.0.clone())
        .columnar()
        .reduce(|a: &(String, u64), b: &(String, u64)| (a.0.clone(), a.1 + b.1))
        .sink("counts", move |_| {
            TransactionalFileSink::new(
                out.clone(),
                |(word, (_, count)): &(String, (String, u64))| format!("{word} {count}"),
            )
        });
    env
}

braid_actors::stream_job!(WORDCOUNT, "streaming_wordcount", wordcount);

fn main() -> anyhow::Result<()> {
    braid_examples::init_logging();
    let args = Args::parse();
    if let Some(out) = &args.out {
        if out.exists() && std::fs::read_dir(out)?.next().is_some() {
            anyhow::bail!("--out {} is not empty", out.display());
        }
    }
    let rt = braid::init_blocking().context("start an embedded cluster")?;
    // Removed by the node however this driver exits.
    let scratch = tempfile::tempdir_in(rt.scratch_dir()?)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().join("out"));
    let mut params = JobParams::new();
    if let Some(input) = &args.input {
        let input =
            std::fs::canonicalize(input).with_context(|| format!("--input {}", input.display()))?;
        params.insert("input".into(), input.display().to_string());
    }
    params.insert("lines".into(), args.lines.to_string());
    params.insert("parallelism".into(), args.parallelism.to_string());
    params.insert("out".into(), out.display().to_string());
    let started = Instant::now();
    let report = braid_actors::stream::cluster::run(
        &rt,
        ClusterJob {
            checkpoint_interval: Duration::from_millis(args.checkpoint_ms.max(1)),
            ..ClusterJob::new(
                "streaming_wordcount",
                params,
                StorageSpec {
                    dir: scratch.path().join("checkpoints"),
                    job: "wordcount".into(),
                    retain: 2,
                },
            )
        },
    )?;
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for line in committed_lines(&out)? {
        if let Some((word, count)) = line.rsplit_once(' ') {
            let count: u64 = count.parse()?;
            let total = totals.entry(word.to_string()).or_insert(0);
            *total = (*total).max(count);
        }
    }
    let mut top: Vec<(&String, &u64)> = totals.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (word, count) in top.iter().take(10) {
        println!("{count:>10}  {word}");
    }
    println!(
        "{} words, {} distinct, {} checkpoints, {:.2} s; committed output in {}",
        totals.values().sum::<u64>(),
        totals.len(),
        report.checkpoints,
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
