//! Online learning on a click stream, fused: source → feature hashing →
//! parameter-server training (FTRL-Proximal) → serving, as one braid
//! stream job on an embedded cluster, with progressive evaluation and a
//! live progress line. The job runs in one actor's process (`--runner
//! local`, the default) or with every subtask an actor in its own process
//! (`--runner cluster`). `--mode separate` runs the same pipeline the way
//! separate systems do (stream job, trainer and server as three
//! processes, bincode batches over TCP, model deltas as files);
//! `--compare` runs every mode at the same input rate, with their ratios.
//!
//! Run: `cargo run --release --example online_learning`
//! (no file needed: the built-in synthetic click stream with drift).

mod actor_graph;
mod common;
mod fused;
mod report;
mod separate;

use anyhow::Context as _;
use braid::TypedHandle;
use clap::Parser;
use common::{Hyper, InputSpec, ModeReport, TimelinePoint};
use fused::{FusedConfig, FusedJob, FusedStatus};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Rows per second the built-in stream is paced at by default: its 1M rows
/// in about 25 s.
const DEMO_RATE: f64 = 40_000.0;

/// The embedded node's object store: the fused job passes its batches
/// inside one process, so the store needs little room.
const STORE_BYTES: u64 = 256 << 20;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Online learning (FTRL on a parameter server) over a click stream, fused or separate"
)]
struct Args {
    /// A gen_ctr file (`label id id …`; shared/data/gen_ctr.py).
    #[arg(long, conflicts_with = "criteo")]
    input: Option<PathBuf>,
    /// A Criteo display-advertising TSV file.
    #[arg(long)]
    criteo: Option<PathBuf>,
    /// Rows to train (default: the whole file, or 1M of the built-in stream).
    #[arg(long)]
    rows: Option<u64>,
    /// Seed of the built-in stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Parameter-server shards.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// FTRL alpha.
    #[arg(long, default_value_t = 0.1)]
    alpha: f32,
    /// FTRL beta.
    #[arg(long, default_value_t = 1.0)]
    beta: f32,
    /// L1 regularization.
    #[arg(long, default_value_t = 0.0)]
    l1: f32,
    /// L2 regularization.
    #[arg(long, default_value_t = 0.0)]
    l2: f32,
    /// Features are hashed into 2^bits buckets.
    #[arg(long, default_value_t = 22)]
    bits: u32,
    /// Consistency between workers: bsp, asp or ssp:τ.
    #[arg(long, default_value = "bsp")]
    sync: String,
    /// Checkpoint interval, ms.
    #[arg(long, default_value_t = 1000)]
    checkpoint_ms: u64,
    /// fused or separate.
    #[arg(long, default_value = "fused")]
    mode: String,
    /// How the fused job runs: `local` (every subtask a thread of one
    /// actor's process; one worker and one shard chain into one thread) or
    /// `cluster` (every subtask an actor in a process of its own).
    #[arg(long, default_value = "local", value_parser = ["local", "cluster"])]
    runner: String,
    /// Run every mode: `chained` (the local runner, one worker and one
    /// shard in one thread), `actors` (the cluster runner with
    /// `--workers`/`--shards`) and `separate`, unthrottled and then at 80%
    /// of separate's saturation rate; `fused` is the fused runner that
    /// keeps up with that rate at the lower CPU. One JSON object.
    #[arg(long)]
    compare: bool,
    /// Throttle the source to this many rows per second [default for the
    /// built-in stream: 40,000, so its 1M rows take about 25 s and the
    /// learning and the drift can be watched; see --quick].
    #[arg(long)]
    rate: Option<f64>,
    /// Run the built-in stream unthrottled (about 2 s) instead of paced.
    #[arg(long, conflicts_with = "rate")]
    quick: bool,
    /// Separate mode: publish/poll interval, ms (--compare finds it).
    #[arg(long, default_value_t = 10)]
    refresh_ms: u64,
    /// Write one prediction per input row (before training on it), in order.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Rows per worker per micro-batch (--compare also tries 64 and 128 at
    /// the shared rate, and keeps the smallest that keeps up).
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// Rows of the sliding evaluation window.
    #[arg(long, default_value_t = 10_000)]
    window: usize,
    /// Keys the model holds before its tables grow, split over the shards
    /// (default: the keys the input can have, min(rows, 2^bits), so a
    /// table never rehashes mid-stream; 0: start small and grow).
    #[arg(long)]
    capacity: Option<usize>,
    /// Inject a crash: worker:INDEX:STEP or shard:INDEX:STEP (fused).
    #[arg(long)]
    crash: Option<String>,
    /// Fused: SIGKILL the job's process once it has scored this many rows;
    /// the driver starts a new one, which goes on from the last checkpoint.
    /// On the cluster runner, SIGKILL the process of `--kill-subtask`, and
    /// the job recovers from its last checkpoint in new processes.
    #[arg(long)]
    kill_job_at_rows: Option<u64>,
    /// Cluster runner: whose process `--kill-job-at-rows` kills (subtask 0
    /// of that task).
    #[arg(long, default_value = "worker", value_parser = ["source", "worker", "shard", "serving", "eval"])]
    kill_subtask: String,
    /// Where the summary JSON and the plot go.
    #[arg(long, default_value = "target/online_learning")]
    out_dir: PathBuf,
    /// Print one JSON line on stdout at the end (logs go to stderr).
    #[arg(long)]
    json: bool,
}

impl Args {
    fn input(&self) -> InputSpec {
        match (&self.input, &self.criteo) {
            (Some(p), _) => InputSpec::GenCtr(p.clone()),
            (None, Some(p)) => InputSpec::Criteo(p.clone()),
            (None, None) => InputSpec::Synthetic { seed: self.seed },
        }
    }

    /// The source's pace: `--rate`, else [`DEMO_RATE`] for the built-in
    /// stream (not with `--quick` or `--compare`, which find their rates).
    fn pace(&self) -> Option<f64> {
        if self.rate.is_some() || self.quick || self.compare {
            return self.rate;
        }
        match self.input() {
            InputSpec::Synthetic { .. } => Some(DEMO_RATE),
            _ => None,
        }
    }

    /// `--capacity`, or the keys the input can have.
    fn capacity(&self) -> usize {
        self.capacity.unwrap_or_else(|| {
            let rows = common::expected_rows(&self.input(), self.rows);
            usize::try_from(rows)
                .unwrap_or(usize::MAX)
                .min(1usize << self.bits.min(40))
        })
    }

    fn hyper(&self) -> Hyper {
        Hyper {
            alpha: self.alpha,
            beta: self.beta,
            l1: self.l1,
            l2: self.l2,
            bits: self.bits,
        }
    }
}

/// The live line: redrawn on a terminal a few times a second when its text
/// changed, printed every 2 s otherwise.
struct Progress {
    tty: bool,
    last: Instant,
    shown: String,
}

/// How often a terminal's live line may be redrawn.
const REDRAW: Duration = Duration::from_millis(250);

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            shown: String::new(),
        }
    }

    fn show(&mut self, mode: &str, p: &TimelinePoint) {
        let line = report::progress_line(mode, p);
        let mut err = std::io::stderr();
        if self.tty {
            if line == self.shown || self.last.elapsed() < REDRAW {
                return;
            }
            let _ = write!(err, "\r{line}\x1b[K");
            self.last = Instant::now();
            self.shown = line;
        } else if self.last.elapsed() >= Duration::from_secs(2) {
            let _ = writeln!(err, "{line}");
            self.last = Instant::now();
        }
        let _ = err.flush();
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The driver's queries to the fused job's serving, from its process.
#[derive(Debug, Default)]
struct RemoteServing {
    /// Answers received.
    answers: u64,
    /// The version of the latest answer.
    version: Option<braid_actors::train::messages::ModelVersion>,
    /// Answers whose version held fewer rows than an earlier answer's.
    went_back: u64,
}

impl RemoteServing {
    /// One query; a job that is not serving yet (or gone) answers nothing.
    fn ask(&mut self, job: &fused::FusedJobHandle, probe: &[u64]) {
        if let Ok((version, p)) = job.predict(vec![probe.to_vec()]).blocking() {
            if p.len() == 1 {
                self.note(version);
            }
        }
    }

    /// An answer from `version`.
    fn note(&mut self, version: braid_actors::train::messages::ModelVersion) {
        self.answers += 1;
        if self.version.is_some_and(|v| v.records > version.records) {
            self.went_back += 1;
        }
        self.version = Some(version);
    }
}

/// Times the driver starts a fused job's process again after it died.
const MAX_JOB_RESTARTS: u32 = 3;

/// A fused job's actor, started on `config`.
fn start_fused(rt: &braid::Runtime, config: &FusedConfig) -> anyhow::Result<fused::FusedJobHandle> {
    let job = FusedJob::remote(rt)
        .spawn_blocking()
        .context("start the fused job's actor")?;
    job.start(config.clone())
        .blocking()
        .map_err(|e| anyhow::anyhow!("the fused job did not start: {e}"))?;
    Ok(job)
}

fn run_fused(
    rt: &braid::Runtime,
    args: &Args,
    rate: Option<f64>,
    batch_rows: usize,
    predictions: Option<PathBuf>,
    scratch: &std::path::Path,
) -> anyhow::Result<(ModeReport, FusedStatus, RemoteServing)> {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut config = FusedConfig {
        name: format!("online-learning-{}-{run}", std::process::id()),
        resume: false,
        input: args.input(),
        rows: args.rows,
        hyper: args.hyper(),
        workers: args.workers.max(1),
        shards: args.shards.max(1),
        sync: args.sync.clone(),
        checkpoint_ms: args.checkpoint_ms,
        checkpoint_dir: scratch.join("checkpoints"),
        rate,
        batch_rows: batch_rows.max(1),
        window: args.window.max(1),
        predictions,
        capacity: args.capacity().div_ceil(args.shards.max(1)),
        crash: args.crash.clone(),
    };
    config
        .sync
        .parse::<braid_actors::train::ps::Consistency>()
        .map_err(|e| anyhow::anyhow!("--sync: {e}"))?;
    if args.runner == "cluster" {
        let mut progress = Progress::new();
        let kill = args
            .kill_job_at_rows
            .map(|rows| (rows, args.kill_subtask.as_str()));
        let out = actor_graph::run(rt, &config, kill, &mut |p| progress.show("actors", p));
        progress.end();
        return out;
    }
    let started = Instant::now();
    let cluster = common::cluster_pids();
    let driver_cpu = common::self_cpu_seconds() + common::cpu_of(&cluster);
    let mut job = start_fused(rt, &config)?;
    let mut progress = Progress::new();
    // The driver also queries serving through the job's actor, as a client
    // in another process would.
    let probe: Vec<u64> = (1..=20).map(|i| i * 104_729).collect();
    let mut remote = RemoteServing::default();
    let mut restarts = 0u32;
    let mut killed = false;
    let mut status = loop {
        std::thread::sleep(Duration::from_millis(50));
        remote.ask(&job, &probe);
        let status = match job.status().blocking() {
            Ok(status) => status,
            Err(e) if restarts < MAX_JOB_RESTARTS => {
                restarts += 1;
                progress.end();
                eprintln!("[fused] the job's process died ({e}): starting a new one from the last checkpoint");
                config.resume = true;
                job = start_fused(rt, &config)?;
                continue;
            }
            Err(e) => return Err(e).context("the fused job's process died"),
        };
        if let Some(p) = &status.point {
            progress.show("fused", p);
        }
        if status.done.is_none()
            && !killed
            && args
                .kill_job_at_rows
                .is_some_and(|at| status.live_rows >= at)
        {
            killed = true;
            let pid = job.pid().blocking()?;
            braid_examples::sigkill(pid)?;
            continue;
        }
        if status.done.is_some() {
            break status;
        }
    };
    status.failures += restarts;
    progress.end();
    let seconds = started.elapsed().as_secs_f64();
    remote.ask(&job, &probe);
    // The driver's, the head's and the nodes' CPU; the job's process
    // counted its own.
    let driver_cpu = common::self_cpu_seconds() + common::cpu_of(&cluster) - driver_cpu;
    let (rt2, handle) = (rt.clone(), job.raw().clone());
    let _ = rt.block_on(async move { rt2.kill_actor(&handle).await });
    let mut report = match status.done.clone() {
        Some(Ok(r)) => r,
        Some(Err(e)) => anyhow::bail!("the fused job failed: {e}"),
        None => anyhow::bail!("the fused job ended without a result"),
    };
    report.seconds = seconds;
    report.events_per_s = report.rows as f64 / seconds.max(1e-9);
    report.cpu_seconds_per_million += driver_cpu / (report.rows.max(1) as f64 / 1e6);
    Ok((report, status, remote))
}

fn separate_config(
    args: &Args,
    rate: Option<f64>,
    refresh_ms: u64,
    predictions: Option<PathBuf>,
    scratch: &std::path::Path,
    run: usize,
) -> anyhow::Result<separate::SeparateConfig> {
    let workdir = scratch.join(format!("separate-{run}"));
    std::fs::create_dir_all(&workdir)?;
    Ok(separate::SeparateConfig {
        input: args.input(),
        rows: args.rows,
        hyper: args.hyper(),
        rate,
        refresh_ms,
        predictions,
        window: args.window.max(1),
        workdir,
        capacity: args.capacity(),
    })
}

/// Micro-batch sizes `--compare` tries for the fused mode at the shared
/// rate, smallest first (then `--batch-rows`); one keeps up when the rate
/// it sustained is what separate's interval must sustain
/// ([`separate::KEEP_UP_RATE_FRACTION`] of the rate).
const FUSED_BATCH_ROWS: [usize; 2] = [64, 128];

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

/// Each mode's timeline, for the plot.
type Series = Vec<(String, Vec<TimelinePoint>)>;

/// A fused mode's run at `--compare`'s shared rate.
struct AtRate {
    batch_rows: usize,
    report: ModeReport,
    sustained_per_s: f64,
    keeps_up: bool,
}

/// Runs a fused mode at `rate`, trying [`FUSED_BATCH_ROWS`] smallest
/// first, then `--batch-rows`: the first micro-batch that keeps up (or
/// the last tried).
fn fused_at_rate(
    rt: &braid::Runtime,
    args: &Args,
    label: &str,
    rate: f64,
    predictions: Option<PathBuf>,
    scratch: &std::path::Path,
) -> anyhow::Result<AtRate> {
    let mut candidates: Vec<usize> = FUSED_BATCH_ROWS
        .into_iter()
        .filter(|&b| b < args.batch_rows)
        .collect();
    candidates.push(args.batch_rows.max(1));
    let mut chosen = None;
    for batch_rows in candidates {
        let (report, status, _) = run_fused(
            rt,
            args,
            Some(rate),
            batch_rows,
            predictions.clone(),
            scratch,
        )?;
        let keeps_up = status.sustained_per_s >= separate::KEEP_UP_RATE_FRACTION * rate;
        eprintln!(
            "[{label}] {batch_rows}-row micro-batches at {rate:.0} rows/s: sustained {:.0} rows/s{}",
            status.sustained_per_s,
            if keeps_up { ": keeps up" } else { ": falls behind" }
        );
        chosen = Some(AtRate {
            batch_rows,
            report,
            sustained_per_s: status.sustained_per_s,
            keeps_up,
        });
        if keeps_up {
            break;
        }
    }
    chosen.context("no fused run")
}

/// `--compare`: every mode unthrottled, then at 80% of the separate
/// mode's saturation rate; the fused mode is the fused runner that keeps
/// up with that rate at the lower CPU per million rows.
fn compare(
    rt: &braid::Runtime,
    args: &Args,
    scratch: &std::path::Path,
) -> anyhow::Result<(serde_json::Value, Series)> {
    let chained_args = Args {
        runner: "local".into(),
        workers: 1,
        shards: 1,
        crash: None,
        kill_job_at_rows: None,
        ..args.clone()
    };
    let actors_args = Args {
        runner: "cluster".into(),
        crash: None,
        kill_job_at_rows: None,
        ..args.clone()
    };
    let mut run = 0;
    let mut next_run = || {
        run += 1;
        run
    };
    eprintln!("compare: separate mode at saturation …");
    let (_, separate_sat) = separate::run_separate(
        &separate_config(args, None, args.refresh_ms, None, scratch, next_run())?,
        &mut |p| Progress::new().show("separate", p),
    )?;
    eprintln!("compare: chained at saturation …");
    let (_, chained_sat, _) = run_fused(rt, &chained_args, None, args.batch_rows, None, scratch)?;
    eprintln!(
        "compare: actors ({} workers × {} shards) at saturation …",
        args.workers, args.shards
    );
    let (_, actors_sat, _) = run_fused(rt, &actors_args, None, args.batch_rows, None, scratch)?;
    let saturation = [
        ("separate", separate_sat),
        ("chained", chained_sat.sustained_per_s),
        ("actors", actors_sat.sustained_per_s),
    ];
    let rate = 0.8 * separate_sat;
    eprintln!("compare: separate at {rate:.0} rows/s, finding its refresh interval …");
    let base = separate_config(args, Some(rate), args.refresh_ms, None, scratch, next_run())?;
    let (refresh_ms, sep) =
        separate::find_refresh(&base, rate, &mut |p| Progress::new().show("separate", p))?;
    // Fused modes refresh serving after every micro-batch; like separate's
    // interval, their micro-batch is the smallest that keeps up.
    eprintln!("compare: chained at {rate:.0} rows/s, finding its micro-batch …");
    let chained = fused_at_rate(
        rt,
        &chained_args,
        "chained",
        rate,
        args.predictions.clone(),
        scratch,
    )?;
    eprintln!("compare: actors at {rate:.0} rows/s, finding its micro-batch …");
    let actors = fused_at_rate(rt, &actors_args, "actors", rate, None, scratch)?;
    let mode_json = |name: &str, r: &AtRate| {
        let mut j = report::report_json(&r.report);
        j["events_per_s_saturation"] = saturation
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, s)| *s)
            .into();
        j["batch_rows"] = r.batch_rows.into();
        j["sustained_per_s"] = r.sustained_per_s.into();
        j["keeps_up"] = r.keeps_up.into();
        j
    };
    let (chained_json, actors_json) =
        (mode_json("chained", &chained), mode_json("actors", &actors));
    // The fused mode for the rate: of those that sustain it, the one with
    // the lower CPU per million rows; if neither does, the faster.
    let pick_actors = match (chained.keeps_up, actors.keeps_up) {
        (true, true) => {
            actors.report.cpu_seconds_per_million < chained.report.cpu_seconds_per_million
        }
        (false, true) => true,
        (true, false) => false,
        (false, false) => actors.sustained_per_s > chained.sustained_per_s,
    };
    let (fused_name, fused, mut fused_json) = if pick_actors {
        ("actors", &actors, actors_json.clone())
    } else {
        ("chained", &chained, chained_json.clone())
    };
    fused_json["mode"] = fused_name.into();
    let mut separate_json = report::report_json(&sep);
    separate_json["events_per_s_saturation"] = separate_sat.into();
    separate_json["refresh_ms"] = refresh_ms.into();
    let f = &fused.report;
    let summary = serde_json::json!({
        "chained": chained_json,
        "actors": actors_json,
        "separate": separate_json,
        "fused": fused_json,
        "rate": rate,
        "workers": args.workers,
        "shards": args.shards,
        "sync": args.sync,
        "ratios": {
            "fused_over_separate": {
                "events_per_s_saturation": ratio(
                    if pick_actors { actors_sat.sustained_per_s } else { chained_sat.sustained_per_s },
                    separate_sat,
                ),
                "cpu_seconds_per_million": ratio(f.cpu_seconds_per_million, sep.cpu_seconds_per_million),
                "latency_ms_p50": ratio(f.latency_ms_p50, sep.latency_ms_p50),
                "latency_ms_p99": ratio(f.latency_ms_p99, sep.latency_ms_p99),
                "model_lag_ms_p99": ratio(f.model_lag_ms_p99, sep.model_lag_ms_p99),
            },
            "actors_over_chained": {
                "events_per_s_saturation": ratio(actors_sat.sustained_per_s, chained_sat.sustained_per_s),
                "cpu_seconds_per_million": ratio(
                    actors.report.cpu_seconds_per_million,
                    chained.report.cpu_seconds_per_million,
                ),
            },
        },
    });
    let series = vec![
        ("chained".into(), chained.report.timeline.clone()),
        ("actors".into(), actors.report.timeline.clone()),
        ("separate".into(), sep.timeline.clone()),
    ];
    Ok((summary, series))
}

fn main() -> anyhow::Result<()> {
    braid_examples::init_logging();
    if let Some(r) = separate::role_main() {
        return r;
    }
    let main_started = Instant::now();
    let args = Args::parse();
    if args.mode != "fused" && args.mode != "separate" {
        anyhow::bail!("--mode must be fused or separate, got {:?}", args.mode);
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        anyhow::bail!("--rate must be positive");
    }
    if let InputSpec::GenCtr(p) | InputSpec::Criteo(p) = args.input() {
        std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
    }
    args.sync
        .parse::<braid_actors::train::ps::Consistency>()
        .map_err(|e| anyhow::anyhow!("--sync: {e}"))?;
    // The fused and compare modes run on an embedded cluster, whose node
    // removes the driver's scratch directory however the driver exits;
    // the separate mode has no cluster.
    let mut rt = if args.compare || args.mode != "separate" {
        Some(
            braid::init_blocking_with(braid::InitOptions::new().object_store_memory(STORE_BYTES))
                .context("start an embedded cluster")?,
        )
    } else {
        None
    };
    if let Some(rt) = &rt {
        let asking = rt.clone();
        match rt.block_on(async move { asking.dashboard_url().await }) {
            Ok(Some(url)) => eprintln!("dashboard: {url}  (Online learning and Stream jobs pages)"),
            Ok(None) => {}
            Err(e) => eprintln!("no dashboard: {e}"),
        }
    }
    let scratch = match &rt {
        Some(rt) => tempfile::tempdir_in(rt.scratch_dir()?)?,
        None => tempfile::tempdir()?,
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let summary_path = args.out_dir.join("summary.json");
    let plot_path = args.out_dir.join("online_learning.svg");

    let (summary, series): (serde_json::Value, Series) = if args.compare {
        let rt = rt.take().context("no cluster")?;
        let out = compare(&rt, &args, scratch.path());
        drop(rt);
        out?
    } else if args.mode == "separate" {
        let cfg = separate_config(
            &args,
            args.pace(),
            args.refresh_ms,
            args.predictions.clone(),
            scratch.path(),
            0,
        )?;
        let mut progress = Progress::new();
        let (r, _) = separate::run_separate(&cfg, &mut |p| progress.show("separate", p))?;
        progress.end();
        let mut j = report::report_json(&r);
        j["refresh_ms"] = args.refresh_ms.into();
        (j, vec![("separate".into(), r.timeline)])
    } else {
        let rt = rt.take().context("no cluster")?;
        let (mut r, status, remote) = run_fused(
            &rt,
            &args,
            args.pace(),
            args.batch_rows,
            args.predictions.clone(),
            scratch.path(),
        )?;
        drop(rt);
        r.seconds = main_started.elapsed().as_secs_f64();
        r.events_per_s = r.rows as f64 / r.seconds.max(1e-9);
        let mut j = report::report_json(&r);
        j["failures"] = status.failures.into();
        j["resumed_from_epoch"] = status.resumed_from_epoch.into();
        j["ps_keys"] = status.ps_keys.into();
        j["ps_bytes_per_key"] = status.ps_bytes_per_key.into();
        j["job_rss_mib"] = status.rss_mib.into();
        j["sustained_per_s"] = status.sustained_per_s.into();
        j["remote_predictions"] = remote.answers.into();
        j["remote_version_records"] = remote.version.map_or(0, |v| v.records).into();
        j["remote_versions_went_back"] = remote.went_back.into();
        j["runner"] = args.runner.clone().into();
        j["workers"] = args.workers.into();
        j["shards"] = args.shards.into();
        j["sync"] = args.sync.clone().into();
        let series = if args.runner == "cluster" {
            "actors"
        } else {
            "fused"
        };
        (j, vec![(series.into(), r.timeline)])
    };

    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    let refs: Vec<(&str, &[TimelinePoint])> = series
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_slice()))
        .collect();
    report::write_plot_svg(&plot_path, &refs)?;
    eprintln!(
        "summary: {}  plot: {}",
        summary_path.display(),
        plot_path.display()
    );
    if args.json {
        println!("{summary}");
    } else {
        print!("{}", report::human_summary(&summary));
    }
    Ok(())
}
