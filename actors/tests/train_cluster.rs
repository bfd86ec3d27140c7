//! The online-learning job on the cluster runner: source, workers, shards,
//! serving and evaluation each a braid actor in a worker process, workers
//! pulling from shards in other processes through the shards' hosts. Under
//! BSP its predictions are byte for byte those of the same job run in one
//! process, also when a process of the job is killed mid-run and the job
//! recovers from its last checkpoint, and when it is spread over two
//! nodes, each with its own store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::runner::SourcePace;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::model::FactorizationMachine;
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::{Consistency, PsConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const ROWS: u64 = 12_000;

/// Two workers and two shards under BSP (or `params["sync"]`), on the
/// synthetic stream, writing every prediction to `params["predictions"]`;
/// `params["rate"]` throttles the source (rows per second);
/// `params["model"] = "fm"` trains a factorization machine instead of
/// logistic regression.
fn training(params: &JobParams) -> StreamEnv {
    let optimizer = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let mut ps = PsConfig::new(&params["name"], 2, 2, optimizer);
    ps.consistency = params
        .get("sync")
        .map_or(Ok(Consistency::Bsp), |s| s.parse())
        .expect("a consistency");
    ps.capacity = 1 << 14;
    let mut config = PipelineConfig::new(ps);
    config.batch_rows = 64;
    config.rows = Some(ROWS);
    config.predictions = Some(PathBuf::from(&params["predictions"]));
    config.rate = params.get("rate").and_then(|r| r.parse().ok());
    let env = StreamEnv::new(1);
    let reader = || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows: ROWS,
            bits: 16,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    };
    if params.get("model").map(String::as_str) == Some("fm") {
        let fm = FactorizationMachine::new(0.05, 1e-6, 0.1, 7).expect("a model");
        pipeline::build_model(&env, config, fm, reader).expect("the job builds");
    } else {
        pipeline::build(&env, config, reader).expect("the job builds");
    }
    env
}

braid_actors::stream_job!(TRAINING, "training", training);

fn rt() -> &'static braid::Runtime {
    static RT: OnceLock<braid::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // A second node, for the spread job; the others are packed on the
        // driver's node.
        braid::init_blocking_with(
            braid::InitOptions::new()
                .num_cpus(2.0)
                .extra_node(2.0, braid::Resources::new()),
        )
        .expect("cluster")
    })
}

fn params(name: &str, predictions: &Path) -> JobParams {
    let mut params = JobParams::new();
    params.insert("name".into(), name.into());
    params.insert("predictions".into(), predictions.display().to_string());
    params
}

/// A job name no other test of this process uses (names key the process
/// registry and the checkpoints).
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The job in this process, on the local runner: its predictions file.
fn local_predictions(dir: &Path) -> Vec<u8> {
    local_predictions_of(dir, &JobParams::new())
}

/// [`local_predictions`] with `extra` parameters; one line per row.
fn local_predictions_of(dir: &Path, extra: &JobParams) -> Vec<u8> {
    let path = dir.join("local.txt");
    let name = unique("train-local");
    let mut params = params(&name, &path);
    params.extend(extra.clone());
    let env = training(&params);
    let job = JobConfig::new(CheckpointStorage::in_memory(&name, 2));
    local::run(&Plan::new(env.into_graph()), job).expect("the local run");
    let predictions = std::fs::read(&path).unwrap();
    assert_eq!(
        predictions.iter().filter(|b| **b == b'\n').count() as u64,
        ROWS,
        "one prediction per row"
    );
    predictions
}

fn cluster_job(dir: &Path, predictions: &Path) -> ClusterJob {
    let name = unique("train-cluster");
    ClusterJob {
        job: "training".into(),
        params: params(&name, predictions),
        storage: StorageSpec {
            dir: dir.join("chk"),
            job: name,
            retain: 2,
        },
        checkpoint_interval: Duration::from_millis(200),
        restart: RestartStrategy::fixed(3, Duration::ZERO),
        checkpoint_timeout: Duration::from_secs(60),
        resource_wait: Duration::from_secs(10),
        pace: SourcePace {
            batch: 256,
            rate: None,
        },
        credits: 4,
        credit_bytes: braid_actors::stream::coordinator::DEFAULT_CREDIT_BYTES,
        on_running: None,
        spread: false,
        nodes_used: Default::default(),
        task_resources: Default::default(),
        placement: Default::default(),
    }
}

/// The model is a seam on the actor graph too: a factorization machine
/// (five parameters per key in pulls, pushes and deltas) trains across
/// processes to the predictions it makes in one.
#[test]
fn a_factorization_machine_trains_across_processes_as_in_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut fm = JobParams::new();
    fm.insert("model".into(), "fm".into());
    let expected = local_predictions_of(dir.path(), &fm);
    let path = dir.path().join("cluster.txt");
    let mut job = cluster_job(dir.path(), &path);
    job.params.extend(fm);
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    assert!(
        std::fs::read(&path).unwrap() == expected,
        "the cluster's factorization machine predicts otherwise than one process's"
    );
    for edge in &report.edges {
        assert_eq!((edge.codec_bytes, edge.copied_bytes), (0, 0), "{edge:?}");
    }
}

#[test]
fn shards_in_other_processes_train_the_model_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let expected = local_predictions(dir.path());
    let path = dir.path().join("cluster.txt");
    let mut job = cluster_job(dir.path(), &path);
    let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
    let seen = pids.clone();
    job.on_running = Some(Arc::new(move |_, p| seen.lock().unwrap().extend(p)));
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0);
    let mut hosts = pids.lock().unwrap().clone();
    hosts.sort_unstable();
    hosts.dedup();
    // Source, two workers, two shards, serving, evaluation: each in its
    // own process, so every pull crossed processes.
    assert!(
        hosts.len() == 7 && !hosts.contains(&std::process::id()),
        "each subtask ran in a process of its own: {hosts:?}"
    );
    assert!(
        std::fs::read(&path).unwrap() == expected,
        "the cluster's predictions differ from one process's"
    );
    // Micro-batches reach the workers, pushes and pulls the shards,
    // deltas serving and predictions the evaluation, as Arrow batches in
    // the receivers' mailbox arenas or the store, read in place:
    // nothing encoded, nothing copied. Every micro-batch is one push and
    // one pull per shard (the weights, read in place from the shard's
    // table through its page).
    let sum = |to: &str| -> u64 {
        report
            .edges
            .iter()
            .filter(|e| e.to.starts_with(to))
            .map(|e| e.batches)
            .sum()
    };
    let shards = 2;
    assert!(
        sum("shard") >= 2 * shards * sum("worker"),
        "pulls are not counted on the push edge: {:?}",
        report.edges
    );
    // A pull through a call would count twice (keys, then weights).
    assert!(
        sum("shard") < 3 * shards * sum("worker"),
        "pulls went through calls, not the shards' pages: {:?}",
        report.edges
    );

    let columnar: Vec<_> = report
        .edges
        .iter()
        .filter(|e| {
            ["worker", "shard", "serving", "eval"]
                .iter()
                .any(|to| e.to.starts_with(to))
        })
        .collect();
    assert!(
        columnar
            .iter()
            .any(|e| e.to.starts_with("worker") && e.batches > 0)
            && columnar
                .iter()
                .any(|e| e.to.starts_with("shard") && e.batches > 0),
        "no batch or push edge in {:?}",
        report.edges
    );
    for edge in columnar {
        assert!(
            edge.bytes > 0 && edge.codec_bytes == 0 && edge.copied_bytes == 0,
            "{edge:?}"
        );
    }
}

/// Waits until the job's storage holds a committed checkpoint (up to a
/// minute), then SIGKILLs `victim`.
fn kill_after_a_checkpoint(chk: PathBuf, job: String, victim: u32, killed: Arc<AtomicU32>) {
    let storage = CheckpointStorage::local(&chk, &job, 2).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let committed = futures::executor::block_on(storage.committed_epochs()).unwrap_or_default();
        if !committed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    if status.is_ok_and(|s| s.success()) {
        killed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_process_killed_mid_run_recovers_to_the_same_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let expected = local_predictions(dir.path());
    let path = dir.path().join("cluster.txt");
    let mut job = cluster_job(dir.path(), &path);
    // About three seconds of input, so the kill lands mid-run.
    job.params.insert("rate".into(), (ROWS / 3).to_string());
    let killed = Arc::new(AtomicU32::new(0));
    let killer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let (chk, name) = (job.storage.dir.clone(), job.storage.job.clone());
    let (k, slot) = (killed.clone(), killer.clone());
    job.on_running = Some(Arc::new(move |generation, pids| {
        if generation != 1 || pids.is_empty() {
            return;
        }
        let victim = pids[pids.len() / 2];
        let (chk, name, k) = (chk.clone(), name.clone(), k.clone());
        let t = std::thread::spawn(move || kill_after_a_checkpoint(chk, name, victim, k));
        *slot.lock().unwrap() = Some(t);
    }));
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    if let Some(t) = killer.lock().unwrap().take() {
        t.join().unwrap();
    }
    assert_eq!(killed.load(Ordering::SeqCst), 1, "one process was killed");
    assert_eq!(report.failures, 1, "{report:?}");
    assert!(
        report.restored_from.first().is_some_and(|&epoch| epoch > 0),
        "the recovery restored a checkpoint: {report:?}"
    );
    assert!(
        std::fs::read(&path).unwrap() == expected,
        "the recovered run's predictions differ from one process's"
    );
}

#[test]
fn serving_answers_another_process_with_growing_versions_and_the_report_holds_the_final_figures() {
    use braid_actors::train::client::{ClientError, JobClient};
    use braid_actors::train::{eval, serving, shard};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.txt");
    let mut job = cluster_job(dir.path(), &path);
    // About two seconds of stream, so that queries meet a model in training;
    // under ASP, whose pulls the shards' hosts answer without waiting.
    job.params.insert("rate".into(), (ROWS / 2).to_string());
    job.params.insert("sync".into(), "asp".into());
    let name = job.params["name"].clone();
    // The first call waits for the job to start; later ones retry for a
    // shorter while (a call in flight when the job ends retries that long).
    let first = JobClient::new(rt(), &job.storage.job, &name).with_wait(Duration::from_secs(60));
    let client = JobClient::new(rt(), &job.storage.job, &name).with_wait(Duration::from_secs(3));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut versions = vec![first.predict(vec![vec![1]]).unwrap().0];
            while !done.load(Ordering::Acquire) {
                match client.predict(vec![vec![1, 2, 3], vec![4, 5]]) {
                    Ok((version, p)) => {
                        assert_eq!(p.len(), 2);
                        assert!(p.iter().all(|p| (0.0..=1.0).contains(p)));
                        versions.push(version);
                    }
                    // The job's hosts stop when it ends.
                    Err(_) if done.load(Ordering::Acquire) => break,
                    Err(e) => panic!("serving did not answer: {e}"),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            versions
        })
    };
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    done.store(true, Ordering::Release);
    let versions = asking.join().unwrap();
    assert!(versions.len() > 10, "{} answers", versions.len());
    assert!(
        versions.windows(2).all(|w| w[0].records <= w[1].records),
        "versions went back: {versions:?}"
    );
    assert!(
        versions.iter().any(|v| v.records > 0 && v.records < ROWS),
        "no answer came from a model in training"
    );
    let figures = eval::final_figures(&report, &name).unwrap().unwrap();
    assert_eq!(figures.rows, ROWS);
    assert!(figures.auc > 0.5, "{figures:?}");
    let stats = serving::final_stats(&report, &name).unwrap().unwrap();
    assert_eq!(stats.version.records, ROWS, "{stats:?}");
    assert!(versions.iter().all(|v| *v <= stats.version));
    assert!(stats.latency.count() > 0);
    for shard in 0..2 {
        let f: shard::ShardFigures =
            braid_actors::stream::results::get(&report.results, &shard::shard_result(&name, shard))
                .unwrap()
                .unwrap();
        assert!(f.keys > 0 && f.bytes > 0, "{f:?}");
    }
    assert!(report.hosts_cpu_seconds.is_some_and(|s| s > 0.0));

    // A job that does not run answers with an error within the wait.
    let nobody = JobClient::new(rt(), &unique("no-such-job"), "nobody")
        .with_wait(Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert!(matches!(
        nobody.predict(vec![vec![1]]),
        Err(ClientError::Call(
            braid_actors::stream::service::CallError::Unreachable(..)
        ))
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn spread_over_two_nodes_the_job_predicts_what_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let expected = local_predictions(dir.path());
    let path = dir.path().join("spread.txt");
    let mut job = cluster_job(dir.path(), &path);
    job.spread = true;
    let nodes_used = job.nodes_used.clone();
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0);
    assert_eq!(*nodes_used.lock(), 2, "the subtasks ran on both nodes");
    assert!(
        std::fs::read(&path).unwrap() == expected,
        "the spread job's predictions differ from one process's"
    );
}
