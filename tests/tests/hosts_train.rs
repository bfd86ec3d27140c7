//! The online-learning job with its parameter shards on another test host
//! than its workers: every pull and push crosses hosts over TCP, and under
//! BSP the predictions are byte for byte those of the job run in one
//! process.
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
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::PsConfig;
use braid_actors::train::shard::SHARD_TASK;
use braid_actors::train::worker::WORKER_TASK;
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{child_role, Hosts};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROWS: u64 = 8_000;

/// Two workers and two shards under BSP on the synthetic stream, writing
/// every prediction to `params["predictions"]`.
fn training(params: &JobParams) -> StreamEnv {
    let optimizer = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let mut ps = PsConfig::new(&params["name"], 2, 2, optimizer);
    ps.capacity = 1 << 14;
    let mut config = PipelineConfig::new(ps);
    config.batch_rows = 64;
    config.rows = Some(ROWS);
    config.predictions = Some(PathBuf::from(&params["predictions"]));
    let env = StreamEnv::new(1);
    let reader = || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows: ROWS,
            bits: 16,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    };
    pipeline::build(&env, config, reader).expect("the job builds");
    env
}

braid_actors::stream_job!(TRAINING, "host_training", training);

fn params(name: &str, predictions: &Path) -> JobParams {
    let mut params = JobParams::new();
    params.insert("name".into(), name.into());
    params.insert("predictions".into(), predictions.display().to_string());
    params
}

/// Runs the job on the cluster from this driver: workers on the node
/// offering `workers`, shards on the one offering `shards`.
fn drive(dir: &Path) {
    let rt = braid::init_blocking().unwrap();
    let mut job = ClusterJob::new(
        "host_training",
        params("train-hosts", &dir.join("cluster.txt")),
        StorageSpec {
            dir: dir.join("chk"),
            job: "train-hosts".into(),
            retain: 2,
        },
    );
    job.checkpoint_interval = Duration::from_millis(300);
    job.restart = RestartStrategy::fixed(3, Duration::ZERO);
    job.resource_wait = Duration::from_secs(30);
    job.pace = SourcePace {
        batch: 256,
        rate: None,
    };
    job.credits = 4;
    for (task, resource) in [(WORKER_TASK, "workers"), (SHARD_TASK, "shards")] {
        let mut wants = braid::Resources::new();
        wants.set(resource, 1.0);
        job.task_resources.insert(task.into(), wants);
    }
    let placement = job.placement.clone();
    let report = braid_actors::stream::cluster::run(&rt, job).unwrap();
    println!("FAILURES={}", report.failures);
    // Each task's hosts, by the host name of the node they ran on.
    let rt2 = rt.clone();
    let nodes = rt.block_on(async move { rt2.nodes().await }).unwrap();
    for (task, on) in placement.lock().iter() {
        let mut names: Vec<String> = on
            .iter()
            .map(|id| {
                nodes
                    .iter()
                    .find(|n| n.info.node_id.to_string() == *id)
                    .map_or_else(|| format!("unknown node {id}"), |n| n.info.hostname.clone())
            })
            .collect();
        names.sort();
        names.dedup();
        println!("RAN {task} ON {}", names.join(","));
    }
}

/// Entry point of the processes the test starts on its hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    assert_eq!(role, "drive");
    drive(Path::new(&std::env::var("JOB_DIR").unwrap()));
}

#[test]
fn hosts_shards_on_another_host_than_workers_train_what_one_process_does() {
    let Some(hosts) = Hosts::for_test(
        "hosts_shards_on_another_host_than_workers_train_what_one_process_does",
        3,
    ) else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hosts-train-{}-{}",
        std::process::id(),
        hosts.bridge()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // The same job in this process, on the local runner.
    let local_path = dir.join("local.txt");
    let env = training(&params("train-local", &local_path));
    let config = JobConfig::new(CheckpointStorage::in_memory("train-local", 2));
    local::run(&Plan::new(env.into_graph()), config).expect("the local run");
    let expected = std::fs::read(&local_path).unwrap();
    assert_eq!(
        expected.iter().filter(|b| **b == b'\n').count() as u64,
        ROWS,
        "one prediction per row"
    );

    let cluster = HostCluster::start(&hosts, 0, 2).unwrap();
    cluster
        .add_node(1, 2, &["--resources", r#"{"workers": 4}"#])
        .unwrap();
    cluster
        .add_node(2, 2, &["--resources", r#"{"shards": 4}"#])
        .unwrap();
    let out = cluster
        .driver(0, "drive")
        .unwrap()
        .env("JOB_DIR", &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("FAILURES=0"),
        "driver failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (task, host) in [(WORKER_TASK, "braid-host-1"), (SHARD_TASK, "braid-host-2")] {
        let line = format!("RAN {task} ON {host}\n");
        assert!(
            stdout.contains(&line),
            "{task} not (only) on {host}:\n{stdout}"
        );
    }
    assert!(
        std::fs::read(dir.join("cluster.txt")).unwrap() == expected,
        "the predictions with shards on another host differ from one process's"
    );
    drop(cluster);
    std::fs::remove_dir_all(&dir).unwrap();
}
