//! The online-learning job on the cluster runner: source, workers, shards,
//! serving and evaluation each a braid actor in a worker process, workers
//! pulling from shards in other processes through the shards' hosts. Under
//! BSP its predictions are byte for byte those of the same job run in one
//! process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::stream::runner::SourcePace;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::{Consistency, PsConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const ROWS: u64 = 12_000;

/// Two workers and two shards under BSP, on the synthetic stream, writing
/// every prediction to `params["predictions"]`.
fn training(params: &JobParams) -> StreamEnv {
    let optimizer = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let mut ps = PsConfig::new(&params["name"], 2, 2, optimizer);
    ps.consistency = Consistency::Bsp;
    ps.capacity = 1 << 14;
    let mut config = PipelineConfig::new(ps);
    config.batch_rows = 64;
    config.rows = Some(ROWS);
    config.predictions = Some(PathBuf::from(&params["predictions"]));
    let env = StreamEnv::new(1);
    pipeline::build(&env, config, || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows: ROWS,
            bits: 16,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    })
    .expect("the job builds");
    env
}

braid_actors::stream_job!(TRAINING, "training", training);

fn rt() -> &'static braid::Runtime {
    static RT: OnceLock<braid::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).expect("cluster")
    })
}

fn params(name: &str, predictions: &Path) -> JobParams {
    let mut params = JobParams::new();
    params.insert("name".into(), name.into());
    params.insert("predictions".into(), predictions.display().to_string());
    params
}

/// The job in this process, on the local runner: its predictions file.
fn local_predictions(dir: &Path) -> Vec<u8> {
    let path = dir.join("local.txt");
    let name = format!("train-local-{}", std::process::id());
    let env = training(&params(&name, &path));
    let job = JobConfig::new(CheckpointStorage::in_memory(&name, 2));
    local::run(&Plan::new(env.into_graph()), job).expect("the local run");
    std::fs::read(&path).unwrap()
}

fn cluster_job(dir: &Path, predictions: &Path) -> ClusterJob {
    let name = format!("train-cluster-{}", std::process::id());
    ClusterJob {
        job: "training".into(),
        params: params(&name, predictions),
        storage: StorageSpec {
            dir: dir.join("chk"),
            job: name,
            retain: 2,
        },
        checkpoint_interval: Duration::from_millis(200),
        max_failures: 3,
        pace: SourcePace {
            batch: 256,
            rate: None,
        },
        credits: 4,
        on_running: None,
        spread: false,
        nodes_used: Default::default(),
    }
}

#[test]
fn shards_in_other_processes_train_the_model_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let expected = local_predictions(dir.path());
    assert_eq!(
        expected.iter().filter(|b| **b == b'\n').count() as u64,
        ROWS,
        "one prediction per row"
    );
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
}
