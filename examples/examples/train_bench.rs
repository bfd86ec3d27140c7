//! The cost of crossing processes for online learning: the training job
//! (source → workers → parameter-server shards → serving, with progressive
//! evaluation) on the local runner (every subtask a thread of this
//! process) and on the cluster runner (every subtask an actor in a worker
//! process of its own), in one run.
//!
//! ```text
//! cargo run --release --example train_bench -- --workers 2 --shards 2 --sync asp
//! ```
//!
//! Micro-batches, pushes and pulls cross processes as Arrow batches lent
//! through the node's store; the cluster run's `edges` show what each edge
//! carried and how much of it went through serde or was copied. Rates are
//! rows per second of wall time, the cluster's from the moment every host
//! runs (process start-up excluded). The last stdout line is one JSON
//! object with medians of `--runs` runs.

use anyhow::Context as _;
use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::cluster::{ClusterJob, JobParams, OnRunning, StorageSpec};
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::plan::Plan;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, FileReader, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::PsConfig;
use clap::Parser;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    about = "Online learning on the local and the cluster runner; the last stdout line is JSON."
)]
struct Args {
    /// Rows to train (of the synthetic stream, or the first of `--input`).
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// A `gen_ctr.py` file to train on instead of the synthetic stream.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Training workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Parameter-server shards.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// `bsp`, `asp` or `ssp:τ`.
    #[arg(long, default_value = "asp")]
    sync: String,
    /// Rows per worker per micro-batch.
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// Hashed feature space, in bits.
    #[arg(long, default_value_t = 20)]
    bits: u32,
    /// Runs per runner (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn training(params: &JobParams) -> StreamEnv {
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    let number = |k: &str, default: u64| get(k).parse().unwrap_or(default);
    let optimizer = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 1.0,
        l2: 1.0,
    });
    let rows = number("rows", 1_000_000);
    let bits = number("bits", 20) as u32;
    let mut ps = PsConfig::new(
        &get("name"),
        number("workers", 2) as usize,
        number("shards", 2) as usize,
        optimizer,
    );
    ps.consistency = get("sync").parse().unwrap_or(ps.consistency);
    ps.capacity = (rows.min(1 << bits) as usize).max(1 << 10);
    ps.feature_bits = Some(bits);
    let mut config = PipelineConfig::new(ps);
    config.batch_rows = number("batch_rows", 256) as usize;
    config.rows = Some(rows);
    let input = params.get("input").map(PathBuf::from);
    let env = StreamEnv::new(1);
    let built = pipeline::build(&env, config, move || {
        Ok(match &input {
            Some(path) => Box::new(FileReader::gen_ctr(path, bits)?) as Box<dyn RowReader>,
            None => Box::new(SyntheticReader(SyntheticStream::new(SyntheticConfig {
                rows,
                bits,
                ..SyntheticConfig::default()
            })?)),
        })
    });
    if let Err(e) = built {
        eprintln!("train_bench: the job cannot be built: {e}");
    }
    env
}

braid_actors::stream_job!(TRAIN_BENCH, "train_bench", training);

fn params(args: &Args, name: &str) -> JobParams {
    let mut p = JobParams::new();
    p.insert("name".into(), name.into());
    p.insert("rows".into(), args.rows.to_string());
    p.insert("workers".into(), args.workers.to_string());
    p.insert("shards".into(), args.shards.to_string());
    p.insert("sync".into(), args.sync.clone());
    p.insert("batch_rows".into(), args.batch_rows.to_string());
    p.insert("bits".into(), args.bits.to_string());
    if let Some(input) = &args.input {
        p.insert("input".into(), input.display().to_string());
    }
    p
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    braid_examples::init_logging();
    let args = Args::parse();
    args.sync
        .parse::<braid_actors::train::ps::Consistency>()
        .map_err(|e| anyhow::anyhow!("--sync: {e}"))?;
    let rt = braid::init_blocking().context("start an embedded cluster")?;
    let mut local = Vec::new();
    let mut cluster = Vec::new();
    let mut edges = Vec::new();
    for run in 0..args.runs {
        let name = format!("train-bench-local-{}-{run}", std::process::id());
        let plan = Plan::new(training(&params(&args, &name)).into_graph());
        let mut config = JobConfig::new(CheckpointStorage::in_memory(&name, 2));
        config.checkpoint_interval = Duration::from_secs(3600);
        let started = Instant::now();
        braid_actors::stream::local::run(&plan, config)?;
        let rate = args.rows as f64 / started.elapsed().as_secs_f64();
        eprintln!("run {run}: local runner -> {rate:.0} rows/s");
        local.push(rate);

        let dir = tempfile::tempdir_in(rt.scratch_dir()?)?;
        let name = format!("train-bench-cluster-{}-{run}", std::process::id());
        let running: Arc<Mutex<Option<Instant>>> = Arc::default();
        let seen = running.clone();
        let on_running: OnRunning = Arc::new(move |_, _| {
            if let Ok(mut at) = seen.lock() {
                at.get_or_insert_with(Instant::now);
            }
        });
        let job = ClusterJob {
            checkpoint_interval: Duration::from_secs(3600),
            on_running: Some(on_running),
            ..ClusterJob::new(
                "train_bench",
                params(&args, &name),
                StorageSpec {
                    dir: dir.path().to_path_buf(),
                    job: name.clone(),
                    retain: 2,
                },
            )
        };
        let started = Instant::now();
        let report = braid_actors::stream::cluster::run(&rt, job)?;
        let from = running.lock().ok().and_then(|at| *at).unwrap_or(started);
        let rate = args.rows as f64 / from.elapsed().as_secs_f64();
        eprintln!("run {run}: cluster runner -> {rate:.0} rows/s");
        cluster.push(rate);
        edges = report.edges;
    }
    let (local, cluster) = (median(&mut local), median(&mut cluster));
    println!(
        "{}",
        serde_json::json!({
            "rows": args.rows,
            "workers": args.workers,
            "shards": args.shards,
            "sync": args.sync,
            "batch_rows": args.batch_rows,
            "rows_per_s_local": local,
            "rows_per_s_cluster": cluster,
            "cluster_over_local": cluster / local.max(1e-9),
            "edges": edges,
        })
    );
    Ok(())
}
