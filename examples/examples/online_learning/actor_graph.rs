//! The fused job on the actor runner (`--runner cluster`): every subtask
//! (source, workers, shards, serving, evaluation) an actor in a worker
//! process of its own on the embedded cluster, run by the cluster runner
//! from the driver. Micro-batches, pulls, pushes and deltas cross between
//! the processes as Arrow batches lent through the node's store.
//!
//! The driver follows the run as any process of the cluster can: through
//! the services the job's evaluation and serving offer (figures, serving
//! statistics, predictions tagged with their model version). The final
//! figures come back in the job's report.

use crate::common::{self, ModeReport, TimelinePoint};
use crate::fused::{self, FusedConfig, FusedStatus};
use crate::RemoteServing;
use anyhow::Context as _;
use braid_actors::stream::cluster::{self, ClusterJob, JobParams, JobServices, StorageSpec};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::results;
use braid_actors::train::client::JobClient;
use braid_actors::train::{eval, pipeline, serving, shard};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The registered name of the job (every process of this binary can
/// build it from its parameters).
const JOB: &str = "online_learning";

/// The parameter holding the job's [`FusedConfig`], as JSON.
const CONFIG_PARAM: &str = "config";

fn job(params: &JobParams) -> StreamEnv {
    let built = params
        .get(CONFIG_PARAM)
        .context("the job has no config parameter")
        .and_then(|c| serde_json::from_str::<FusedConfig>(c).context("a bad config parameter"))
        .and_then(|config| fused::build_job(&config, true));
    match built {
        Ok((env, _, _)) => env,
        Err(e) => {
            // The driver built the same job before running it, so this
            // process's binary or environment differs from the driver's.
            eprintln!("the online-learning job cannot be built here: {e:#}");
            StreamEnv::new(1)
        }
    }
}

braid_actors::stream_job!(ONLINE_LEARNING_JOB, JOB, job);

/// How often the driver refreshes the live line and the timeline.
const TICK: Duration = crate::common::POINT_EVERY;

/// How long one of the driver's queries may wait (the job recovering).
const QUERY_WAIT: Duration = Duration::from_secs(2);

/// How long one of the serving client's queries may wait: it asks again
/// a millisecond later anyway, and its last call, when the job's hosts
/// stop, holds up the end of the run this long.
const PROBE_WAIT: Duration = Duration::from_millis(200);

/// Runs the job `config` describes on the cluster runner; `kill` =
/// `(rows, task)` SIGKILLs the process of subtask 0 of `task` once `rows`
/// rows were evaluated. Every live point goes to `show`.
pub fn run(
    rt: &braid::Runtime,
    config: &FusedConfig,
    kill: Option<(u64, &str)>,
    show: &mut dyn FnMut(&TimelinePoint),
) -> anyhow::Result<(ModeReport, FusedStatus, RemoteServing)> {
    let started = Instant::now();
    let (_, ps, _) = fused::build_job(config, true)?;
    let name = ps.name.clone();
    let _ = std::fs::remove_dir_all(config.checkpoint_dir.join(&name));
    let mut params = JobParams::new();
    params.insert(CONFIG_PARAM.into(), serde_json::to_string(config)?);
    let running_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let job = {
        let running_at = running_at.clone();
        ClusterJob {
            checkpoint_interval: Duration::from_millis(config.checkpoint_ms.max(1)),
            on_running: Some(Arc::new(move |_, _| {
                running_at.lock().get_or_insert_with(Instant::now);
            })),
            ..ClusterJob::new(
                JOB,
                params,
                StorageSpec {
                    dir: config.checkpoint_dir.clone(),
                    job: name.clone(),
                    retain: 2,
                },
            )
        }
    };
    let cluster = common::cluster_pids();
    let cpu_start = common::self_cpu_seconds() + common::cpu_of(&cluster);
    let (done_tx, done_rx) = mpsc::channel();
    let runner = {
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("cluster-runner".into())
            .spawn(move || {
                let _ = done_tx.send(cluster::run(&rt, job));
            })?
    };
    let client = JobClient::new(rt, &name, &name).with_wait(QUERY_WAIT);
    let stop = Arc::new(AtomicBool::new(false));
    // Queries serving every millisecond, as the fused job's in-process
    // client does: a batch counts as served at its first answer.
    let probe = {
        let client = JobClient::new(rt, &name, &name).with_wait(PROBE_WAIT);
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("serving-client".into())
            .spawn(move || {
                let probe: Vec<u64> = (1..=20).map(|i| i * 104_729).collect();
                let mut remote = RemoteServing::default();
                while !stop.load(Ordering::Acquire) {
                    if let Ok((version, p)) = client.predict(vec![probe.clone()]) {
                        if p.len() == 1 {
                            remote.note(version);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                remote
            })?
    };
    let services = JobServices::new(rt, &name);
    let mut timeline = Vec::new();
    let (mut last_rows, mut last_t) = (0u64, 0.0f64);
    let mut killed = false;
    let outcome = loop {
        match done_rx.recv_timeout(TICK) {
            Ok(outcome) => break outcome,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the cluster runner's thread ended without a result")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Ok(f) = client.figures() else { continue };
        let interval = client
            .serving_stats(true)
            .map(|s| (s.interval_latency.quantile(0.99), s.lag.quantile(0.5)))
            .unwrap_or_default();
        let t = started.elapsed().as_secs_f64();
        let point = TimelinePoint {
            t_s: t,
            rows: f.rows,
            events_per_s: f.rows.saturating_sub(last_rows) as f64 / (t - last_t).max(1e-9),
            window_auc: f.window_auc,
            window_logloss: f.window_logloss,
            latency_ms_p99: interval.0,
            model_lag_ms: interval.1,
        };
        (last_rows, last_t) = (f.rows, t);
        timeline.push(point);
        show(&point);
        if let Some((_, task)) = kill.filter(|(at, _)| !killed && f.rows >= *at) {
            killed = true;
            let pid = services
                .pid(task, 0, QUERY_WAIT)
                .with_context(|| format!("find {task} 0's process"))?;
            eprintln!("\n[actors] SIGKILL {task} 0 (pid {pid}) at {} rows", f.rows);
            braid_examples::sigkill(pid)?;
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let from_running = running_at
        .lock()
        .map_or(seconds, |at| at.elapsed().as_secs_f64());
    stop.store(true, Ordering::Release);
    let remote = probe.join().unwrap_or_default();
    let _ = runner.join();
    let report = outcome.context("the job failed")?;
    // Every process of the mode: this driver, the embedded cluster's head
    // and node processes, and the job's hosts (each reports its process's
    // CPU when its subtask finishes).
    let cpu = common::self_cpu_seconds() + common::cpu_of(&cluster) - cpu_start
        + report.hosts_cpu_seconds.unwrap_or(0.0);
    let f = eval::final_figures(&report, &name).context("the evaluation reported no figures")??;
    let stats =
        serving::final_stats(&report, &name).context("serving reported no statistics")??;
    let mut keys = 0u64;
    let mut bytes = 0u64;
    for s in 0..ps.shards {
        if let Some(Ok(figures)) =
            results::get::<shard::ShardFigures>(&report.results, &shard::shard_result(&name, s))
        {
            keys += figures.keys;
            bytes += figures.bytes;
        }
    }
    let skipped = results::get::<u64>(&report.results, &pipeline::skipped_result(&name))
        .and_then(Result::ok)
        .unwrap_or(0);
    let (first, last) = stats.span_ns;
    let status = FusedStatus {
        point: timeline.last().copied(),
        done: None,
        failures: report.failures,
        ps_bytes_per_key: bytes as f64 / keys.max(1) as f64,
        ps_keys: keys,
        rss_mib: 0.0,
        sustained_per_s: f.rows as f64 / (last.saturating_sub(first) as f64 / 1e9).max(1e-9),
        resumed_from_epoch: report.resumed_from,
        live_rows: f.rows,
    };
    eprintln!(
        "[actors] {} rows in {seconds:.2} s ({:.2} s once every host ran)",
        f.rows, from_running
    );
    let _ = std::fs::remove_dir_all(config.checkpoint_dir.join(&name));
    let report = ModeReport {
        rows: f.rows,
        seconds,
        events_per_s: f.rows as f64 / seconds.max(1e-9),
        logloss: f.logloss,
        auc: f.auc,
        latency_ms_p50: stats.latency.quantile(0.5),
        latency_ms_p99: stats.latency.quantile(0.99),
        model_lag_ms_p99: stats.lag.quantile(0.99),
        cpu_seconds_per_million: cpu / (f.rows.max(1) as f64 / 1e6),
        skipped_lines: skipped,
        timeline,
        edges: report.edges,
    };
    Ok((report, status, remote))
}
