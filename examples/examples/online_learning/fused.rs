//! The fused mode: the whole pipeline (source → feature hashing →
//! parameter-server training → serving, with progressive evaluation) as
//! one braid stream job inside one actor's process on the embedded
//! cluster. Micro-batches pass between its subtasks by pointer or through
//! in-process channels, workers read the shards' weights in place, and
//! serving is refreshed after every training micro-batch.

use crate::common::{self, InputSpec, ModeReport, TimelinePoint};
use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::eval::EvalHandle;
use braid_actors::train::messages::ModelVersion;
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{
    self, FileReader, JobHandles, PipelineConfig, RowReader, SyntheticReader,
};
use braid_actors::train::ps::{Consistency, Crash, PsConfig};
use braid_actors::train::serving::Serving;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What the fused job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FusedConfig {
    /// The job's name: its checkpoints' directory under `checkpoint_dir`.
    pub name: String,
    /// The job ran before in a process that died: go on from its last
    /// checkpoint, predictions file included.
    pub resume: bool,
    /// The input.
    pub input: InputSpec,
    /// Rows to train (`None`: all).
    pub rows: Option<u64>,
    /// FTRL and hashing.
    pub hyper: common::Hyper,
    /// Training workers.
    pub workers: usize,
    /// Parameter-server shards.
    pub shards: usize,
    /// `bsp`, `asp` or `ssp:τ`.
    pub sync: String,
    /// Checkpoint interval.
    pub checkpoint_ms: u64,
    /// Where checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Source rows per second, if throttled.
    pub rate: Option<f64>,
    /// Rows per worker per micro-batch.
    pub batch_rows: usize,
    /// Rows of the evaluation window.
    pub window: usize,
    /// The predictions file.
    pub predictions: Option<PathBuf>,
    /// Keys each shard's table holds before it grows.
    pub capacity: usize,
    /// Inject a crash (`worker:i:step` or `shard:i:step`).
    pub crash: Option<String>,
}

/// Progress and, once done, the result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FusedStatus {
    /// The newest timeline point.
    pub point: Option<TimelinePoint>,
    /// The report, once the job ended.
    pub done: Option<Result<ModeReport, String>>,
    /// Failures recovered from.
    pub failures: u32,
    /// Bytes per live key of the shards' tables, and live keys.
    pub ps_bytes_per_key: f64,
    /// Live keys in the shards.
    pub ps_keys: u64,
    /// Resident memory of the job's process at the end, MiB.
    pub rss_mib: f64,
    /// Rows per second from the first batch's ingest to the publish of the
    /// last (start-up and shutdown excluded; as separate's `sustained`).
    pub sustained_per_s: f64,
    /// The checkpoint epoch this process's run started from, if any.
    pub resumed_from_epoch: Option<u64>,
    /// Rows evaluated when this status was taken (`point` is refreshed
    /// only every half second).
    pub live_rows: u64,
}

struct Shared {
    status: Mutex<FusedStatus>,
    /// The job's serving model, once the job is built.
    serving: Mutex<Option<Arc<Serving>>>,
    /// The job's evaluation, once the job is built.
    eval: Mutex<Option<Arc<EvalHandle>>>,
}

/// The fused job's host: started once, then polled.
#[braid::actor]
pub struct FusedJob {
    shared: Arc<Shared>,
}

#[braid::actor]
impl FusedJob {
    fn new() -> Self {
        FusedJob {
            shared: Arc::new(Shared {
                status: Mutex::new(FusedStatus::default()),
                serving: Mutex::new(None),
                eval: Mutex::new(None),
            }),
        }
    }

    /// Starts the job on its own thread.
    fn start(&mut self, config: FusedConfig) -> Result<(), String> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("fused-job".into())
            .spawn(move || {
                let result = run(&config, &shared).map_err(|e| format!("{e:#}"));
                shared.status.lock().done = Some(result);
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Progress so far.
    fn status(&mut self) -> FusedStatus {
        let eval = self.shared.eval.lock().clone();
        let mut status = self.shared.status.lock().clone();
        if let Some(eval) = eval {
            status.live_rows = eval.figures().rows;
        }
        status
    }

    /// Predicts rows (each row's hashed feature ids) with the live serving
    /// model, for callers in any process: the version that answered, and
    /// each row's click probability.
    fn predict(&mut self, rows: Vec<Vec<u64>>) -> Result<(ModelVersion, Vec<f32>), String> {
        let serving = self.shared.serving.lock().clone();
        let serving = serving.ok_or("the job has not started serving yet")?;
        Ok(serving.predict(rows.iter().map(|r| (r.as_slice(), None))))
    }

    /// The process the job runs in.
    fn pid(&mut self) -> u32 {
        std::process::id()
    }
}

fn parse_crash(s: &str) -> anyhow::Result<Crash> {
    let parts: Vec<&str> = s.split(':').collect();
    let [role, i, step] = parts.as_slice() else {
        anyhow::bail!("--crash wants worker:INDEX:STEP or shard:INDEX:STEP, got {s:?}");
    };
    let (i, step): (usize, u64) = (i.parse()?, step.parse()?);
    match *role {
        "worker" => Ok(Crash::Worker(i, step)),
        "shard" => Ok(Crash::Shard(i, step)),
        _ => anyhow::bail!("--crash wants worker:… or shard:…, got {s:?}"),
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The job `config` describes, added to a new environment, and its
/// parameter server's configuration. `actors`: every subtask its own actor
/// on the cluster runner (workers never chained to their shards, and the
/// evaluation's subtask writes the predictions file itself).
pub fn build_job(
    config: &FusedConfig,
    actors: bool,
) -> anyhow::Result<(StreamEnv, PsConfig, JobHandles)> {
    let consistency: Consistency = config.sync.parse()?;
    let optimizer = OptimizerKind::Ftrl(FtrlParams {
        alpha: config.hyper.alpha,
        beta: config.hyper.beta,
        l1: config.hyper.l1,
        l2: config.hyper.l2,
    });
    let name = config.name.clone();
    let mut ps = PsConfig::new(&name, config.workers, config.shards, optimizer);
    ps.consistency = consistency;
    ps.capacity = config.capacity;
    ps.feature_bits = Some(config.hyper.bits);
    ps.crash = config.crash.as_deref().map(parse_crash).transpose()?;
    ps.chain = !actors;
    let mut pc = PipelineConfig::new(ps.clone());
    if actors {
        pc.predictions = config.predictions.clone();
    }
    pc.batch_rows = config.batch_rows;
    pc.window = config.window;
    pc.rate = config.rate;
    pc.rows = match config.input {
        InputSpec::Synthetic { .. } => Some(config.rows.unwrap_or(common::DEFAULT_SYNTHETIC_ROWS)),
        _ => config.rows,
    };
    let input = config.input.clone();
    let bits = config.hyper.bits;
    let rows_total = pc.rows;
    let env = StreamEnv::new(1);
    let handles = pipeline::build(&env, pc, move || -> Result<Box<dyn RowReader>, _> {
        Ok(match &input {
            InputSpec::GenCtr(p) => Box::new(FileReader::gen_ctr(p, bits)?),
            InputSpec::Criteo(p) => Box::new(FileReader::criteo(p, bits)?),
            InputSpec::Synthetic { seed } => {
                Box::new(SyntheticReader(SyntheticStream::new(SyntheticConfig {
                    rows: rows_total.unwrap_or(common::DEFAULT_SYNTHETIC_ROWS),
                    bits,
                    seed: *seed,
                    ..SyntheticConfig::default()
                })?))
            }
        })
    })?;
    Ok((env, ps, handles))
}

fn run(config: &FusedConfig, shared: &Arc<Shared>) -> anyhow::Result<ModeReport> {
    let started = Instant::now();
    let cpu_start = common::self_cpu_seconds();
    let (env, ps, handles) = build_job(config, false)?;
    let name = ps.name.clone();
    let eval = handles.eval.clone();
    if let Some(path) = &config.predictions {
        if config.resume {
            eval.resume_predictions(path)?;
        } else {
            eval.write_predictions(path)?;
        }
    }
    let serving = handles.serving.clone();
    *shared.serving.lock() = Some(serving.clone());
    *shared.eval.lock() = Some(eval.clone());
    let stop = Arc::new(AtomicBool::new(false));
    // Dropping `end` wakes the progress thread at once.
    let (end, ended) = mpsc::channel::<()>();
    let query = {
        let serving = serving.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("serving-client".into())
            .spawn(move || {
                let probe: Vec<u64> = (0..20).map(|i| i * 7919).collect();
                while !stop.load(Ordering::Acquire) {
                    let _ = serving.predict([(probe.as_slice(), None)]);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })?
    };
    let monitor = {
        let serving = serving.clone();
        let eval = eval.clone();
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let mut last_rows = 0;
                let mut last_t = 0.0;
                let mut timeline = Vec::new();
                let mut next = Instant::now();
                let mut running = true;
                while running {
                    next += crate::common::POINT_EVERY;
                    running = matches!(
                        ended.recv_timeout(next.saturating_duration_since(Instant::now())),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    );
                    let f = eval.figures();
                    let t = started.elapsed().as_secs_f64();
                    let interval = serving.take_interval_latency();
                    let lag = serving.lag();
                    let point = TimelinePoint {
                        t_s: t,
                        rows: f.rows,
                        events_per_s: (f.rows - last_rows.min(f.rows)) as f64
                            / (t - last_t).max(1e-9),
                        window_auc: f.window_auc,
                        window_logloss: f.window_logloss,
                        latency_ms_p99: interval.quantile(0.99),
                        model_lag_ms: lag.quantile(0.5),
                    };
                    last_rows = f.rows;
                    last_t = t;
                    timeline.push(point);
                    shared.status.lock().point = Some(point);
                }
                timeline
            })?
    };
    if !config.resume {
        let _ = std::fs::remove_dir_all(config.checkpoint_dir.join(&name));
    }
    let storage = CheckpointStorage::local(&config.checkpoint_dir, &name, 2)?;
    let mut job = JobConfig::new(storage);
    job.checkpoint_interval = Duration::from_millis(config.checkpoint_ms.max(1));
    let outcome = local::run(&Plan::new(env.into_graph()), job);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = common::self_cpu_seconds() - cpu_start;
    stop.store(true, Ordering::Release);
    drop(end);
    let _ = query.join();
    let timeline = monitor.join().unwrap_or_default();
    eval.flush()?;
    let report = outcome?;
    let f = eval.figures();
    let latency = serving.latency();
    let lag = serving.lag();
    let mut keys = 0u64;
    let mut bytes = 0u64;
    for s in 0..ps.shards {
        if let Some(m) = handles.finals.get(s) {
            keys += m.0.table().len() as u64;
            bytes += m.0.table().bytes() as u64;
        }
    }
    {
        let mut st = shared.status.lock();
        st.failures = report.failures;
        st.resumed_from_epoch = report.resumed_from;
        st.ps_keys = keys;
        st.ps_bytes_per_key = bytes as f64 / keys.max(1) as f64;
        st.rss_mib = rss_mib();
        let (first, last) = serving.span_ns();
        st.sustained_per_s = f.rows as f64 / (last.saturating_sub(first) as f64 / 1e9).max(1e-9);
    }
    let _ = std::fs::remove_dir_all(config.checkpoint_dir.join(&name));
    Ok(ModeReport {
        rows: f.rows,
        seconds,
        events_per_s: f.rows as f64 / seconds.max(1e-9),
        logloss: f.logloss,
        auc: f.auc,
        latency_ms_p50: latency.quantile(0.5),
        latency_ms_p99: latency.quantile(0.99),
        model_lag_ms_p99: lag.quantile(0.99),
        cpu_seconds_per_million: cpu / (f.rows.max(1) as f64 / 1e6),
        skipped_lines: handles.skipped.load(Ordering::Relaxed),
        timeline,
        edges: report.edges,
    })
}
