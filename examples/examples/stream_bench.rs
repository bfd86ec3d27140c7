//! Streaming benchmark on an embedded cluster (every subtask a worker
//! process): events per second per core with checkpoints on, the
//! checkpoint overhead (the same job with checkpoints on and off, in one
//! run), the cost of crossing processes (the same job on the local runner,
//! every subtask a thread of this process, in the same run), and recovery
//! time after a worker process is SIGKILLed (from the kill until the next
//! attempt is running).
//!
//! The job is source → map → key_by → reduce → sink; its keyed records
//! cross processes as Arrow record batches in the store (`.columnar()`),
//! or encoded with `--encoded`. Per-core figures divide by the machine's
//! cores, the same for both runners.
//!
//! Run: `cargo run --release --example stream_bench`
//!
//! Prints, as the last stdout line, one JSON object with medians of
//! `--runs` runs.

use anyhow::Context as _;
use braid_actors::stream::cluster::{ClusterJob, JobParams, OnRunning, StorageSpec};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{Collector, EventTime, Operator, OperatorError};
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::source::GeneratorSource;
use clap::Parser;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 4_000_000)]
    records: u64,
    /// Runs per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Subtasks per operator.
    #[arg(long, default_value_t = 1)]
    parallelism: usize,
    /// Checkpoint interval with checkpoints on.
    #[arg(long, default_value_t = 200)]
    checkpoint_ms: u64,
    /// Send the keyed records between processes encoded, not columnar.
    #[arg(long)]
    encoded: bool,
    /// Records per channel batch [default: the stream's, 65536 for a
    /// columnar stream, 4096 for an encoded one].
    #[arg(long)]
    batch_records: Option<usize>,
}

/// Counts what reaches it.
struct CountSink(u64);

impl Operator for CountSink {
    type In = (u64, u64);
    type Out = ();
    fn process(
        &mut self,
        _v: (u64, u64),
        _t: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        self.0 += 1;
        Ok(())
    }
}

fn bench_job(params: &JobParams) -> StreamEnv {
    let records: u64 = params
        .get("records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let parallelism: usize = params
        .get("parallelism")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let batch: Option<usize> = params.get("batch_records").and_then(|v| v.parse().ok());
    let env = StreamEnv::new(parallelism);
    let keyed = env
        .source("numbers", move |s, p| {
            GeneratorSource::new(records, s, p, |i| i)
        })
        .map(|i: u64| (i % 4096, 1u64))
        .key_by(|kv: &(u64, u64)| kv.0);
    let keyed = match batch {
        Some(records) => keyed.batch_records(records),
        None => keyed,
    };
    let keyed = if params.contains_key("encoded") {
        keyed
    } else {
        keyed.columnar()
    };
    keyed
        .reduce(|a: &(u64, u64), b: &(u64, u64)| (a.0, a.1 + b.1))
        .map(|(_, v): (u64, (u64, u64))| v)
        .sink("count", |_| CountSink(0));
    env
}

braid_actors::stream_job!(BENCH, "stream_bench", bench_job);

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn job(
    args: &Args,
    dir: &std::path::Path,
    interval: Duration,
    on_running: Option<OnRunning>,
) -> ClusterJob {
    let mut params = JobParams::new();
    params.insert("records".into(), args.records.to_string());
    params.insert("parallelism".into(), args.parallelism.to_string());
    if let Some(records) = args.batch_records {
        params.insert("batch_records".into(), records.to_string());
    }
    if args.encoded {
        params.insert("encoded".into(), String::new());
    }
    ClusterJob {
        checkpoint_interval: interval,
        pace: SourcePace {
            batch: 1024,
            rate: None,
        },
        on_running,
        ..ClusterJob::new(
            "stream_bench",
            params,
            StorageSpec {
                dir: dir.to_path_buf(),
                job: "bench".into(),
                retain: 2,
            },
        )
    }
}

/// One run of the job on the local runner (every subtask a thread of this
/// process), checkpoints on: its events per second.
fn run_local(args: &Args, rt: &braid::Runtime) -> anyhow::Result<f64> {
    use braid_actors::checkpoint::storage::CheckpointStorage;
    use braid_actors::stream::coordinator::JobConfig;
    use braid_actors::stream::plan::Plan;
    let dir = tempfile::tempdir_in(rt.scratch_dir()?)?;
    let mut params = JobParams::new();
    params.insert("records".into(), args.records.to_string());
    params.insert("parallelism".into(), args.parallelism.to_string());
    if let Some(records) = args.batch_records {
        params.insert("batch_records".into(), records.to_string());
    }
    let plan = Plan::new(bench_job(&params).into_graph());
    let mut config = JobConfig::new(CheckpointStorage::local(dir.path(), "bench", 2)?);
    config.checkpoint_interval = Duration::from_millis(args.checkpoint_ms);
    config.pace = SourcePace {
        batch: 1024,
        rate: None,
    };
    let started = Instant::now();
    braid_actors::stream::local::run(&plan, config)?;
    Ok(args.records as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    braid_examples::init_logging();
    let args = Args::parse();
    let rt = braid::init_blocking().context("start an embedded cluster")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut checkpoints = Vec::new();
    let mut local = Vec::new();
    let mut edges = Vec::new();
    for run in 0..args.runs {
        let rate = run_local(&args, &rt)?;
        eprintln!("run {run}: local runner, checkpoints on -> {rate:.0} events/s");
        local.push(rate);
        for on in [true, false] {
            let dir = tempfile::tempdir_in(rt.scratch_dir()?)?;
            let interval = if on {
                Duration::from_millis(args.checkpoint_ms)
            } else {
                Duration::from_secs(3600)
            };
            let started = Instant::now();
            let report =
                braid_actors::stream::cluster::run(&rt, job(&args, dir.path(), interval, None))?;
            let rate = args.records as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "run {run}: checkpoints {} -> {rate:.0} events/s ({} checkpoints)",
                if on { "on" } else { "off" },
                report.checkpoints
            );
            if on {
                with.push(rate);
                checkpoints.push(report.checkpoints as f64);
                edges = report.edges;
            } else {
                without.push(rate);
            }
        }
    }

    let mut recoveries = Vec::new();
    for _ in 0..args.runs {
        let dir = tempfile::tempdir_in(rt.scratch_dir()?)?;
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let recovered: Arc<Mutex<Option<Duration>>> = Arc::default();
        let (k2, r2) = (killed_at.clone(), recovered.clone());
        let on_running: OnRunning = Arc::new(move |generation, pids| {
            if generation == 1 {
                if let Some(&victim) = pids.last() {
                    let k3 = k2.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(300));
                        if let Some(pid) = rustix::process::Pid::from_raw(victim as i32) {
                            if let Ok(mut at) = k3.lock() {
                                *at = Some(Instant::now());
                            }
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    });
                }
            } else if generation == 2 {
                let at = k2.lock().ok().and_then(|a| *a);
                if let (Some(at), Ok(mut r)) = (at, r2.lock()) {
                    *r = Some(at.elapsed());
                }
            }
        });
        let report = braid_actors::stream::cluster::run(
            &rt,
            job(
                &args,
                dir.path(),
                Duration::from_millis(args.checkpoint_ms),
                Some(on_running),
            ),
        )?;
        if let Some(d) = recovered.lock().ok().and_then(|r| *r) {
            eprintln!(
                "recovery after a kill: {} ms ({} failures)",
                d.as_millis(),
                report.failures
            );
            recoveries.push(d.as_secs_f64() * 1000.0);
        }
    }

    let with_rate = median(&mut with);
    let without_rate = median(&mut without);
    let local_rate = median(&mut local);
    let summary = serde_json::json!({
        "records_per_run": args.records,
        "parallelism": args.parallelism,
        "cores": cores,
        "events_per_s_checkpoints_on": with_rate,
        "events_per_s_checkpoints_off": without_rate,
        "events_per_s_per_core": with_rate / cores,
        "columnar": !args.encoded,
        "batch_records": args.batch_records.unwrap_or(if args.encoded {
            braid_actors::stream::channel::BATCH_RECORDS
        } else {
            braid_actors::stream::channel::COLUMNAR_BATCH_RECORDS
        }),
        "events_per_s_per_core_cluster": with_rate / cores,
        "events_per_s_per_core_local": local_rate / cores,
        "cluster_over_local": with_rate / local_rate,
        "edges": edges,
        "checkpoint_overhead": 1.0 - with_rate / without_rate,
        "checkpoint_interval_ms": args.checkpoint_ms,
        "checkpoints_per_run": median(&mut checkpoints),
        "recovery_ms": median(&mut recoveries),
    });
    println!("{summary}");
    Ok(())
}
