//! A streaming job spread over two nodes of one embedded cluster, each
//! node with its own store: channels between hosts on different nodes
//! carry their large batches through object transfer, and the output is
//! still exactly once; a columnar job spread the same way (its Arrow
//! batches moved once between the stores, read in place) commits exactly
//! what the same job commits in one process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::plan::Plan;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

fn padded(params: &JobParams) -> StreamEnv {
    let records: u64 = params["records"].parse().unwrap_or(0);
    let out = PathBuf::from(&params["out"]);
    let env = StreamEnv::new(2);
    env.source("padded", move |s, p| {
        GeneratorSource::new(records, s, p, |i| (i, "y".repeat(200)))
    })
    .key_by(|r: &(u64, String)| r.0 % 7)
    .reduce(|a: &(u64, String), b: &(u64, String)| (a.0.max(b.0), b.1.clone()))
    .sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |(k, (i, _)): &(u64, (u64, String))| {
            format!("{k} {i}")
        })
    });
    env
}

braid_actors::stream_job!(PADDED, "padded", padded);

/// Per key, a running count of records (with their padding): the lines a
/// run commits are the same whatever order the records arrive in.
fn padded_counts(params: &JobParams) -> StreamEnv {
    let records: u64 = params["records"].parse().unwrap_or(0);
    let out = PathBuf::from(&params["out"]);
    let env = StreamEnv::new(2);
    env.source("padded", move |s, p| {
        GeneratorSource::new(records, s, p, |i| (i % 7, (1u64, "z".repeat(100))))
    })
    .key_by(|r: &(u64, (u64, String))| r.0)
    .columnar()
    .reduce(|a: &(u64, (u64, String)), b: &(u64, (u64, String))| {
        (a.0, (a.1 .0 + b.1 .0, b.1 .1.clone()))
    })
    .sink("out", move |_| {
        TransactionalFileSink::new(
            out.clone(),
            |(k, (_, (n, pad))): &(u64, (u64, (u64, String)))| format!("{k} {n} {}", pad.len()),
        )
    });
    env
}

braid_actors::stream_job!(PADDED_COUNTS, "padded_counts", padded_counts);

fn rt() -> &'static braid::Runtime {
    static RT: OnceLock<braid::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(
            braid::InitOptions::new()
                .num_cpus(2.0)
                .extra_node(2.0, braid::Resources::new()),
        )
        .expect("cluster")
    })
}

fn spread_job(name: &str, dir: &Path, records: u64) -> ClusterJob {
    let mut params = JobParams::new();
    params.insert("records".into(), records.to_string());
    params.insert("out".into(), dir.join("out").display().to_string());
    ClusterJob {
        job: name.into(),
        params,
        storage: StorageSpec {
            dir: dir.join("chk"),
            job: name.into(),
            retain: 2,
        },
        checkpoint_interval: Duration::from_millis(100),
        restart: RestartStrategy::fixed(3, Duration::ZERO),
        checkpoint_timeout: Duration::from_secs(60),
        resource_wait: Duration::from_secs(10),
        pace: SourcePace::default(),
        credits: 4,
        credit_bytes: braid_actors::stream::coordinator::DEFAULT_CREDIT_BYTES,
        on_running: None,
        spread: true,
        nodes_used: Default::default(),
        task_resources: Default::default(),
        placement: Default::default(),
    }
}

#[test]
fn a_columnar_job_spread_over_two_nodes_commits_what_it_commits_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = spread_job("padded_counts", &dir.path().join("cluster"), 20_000);
    let nodes_used = job.nodes_used.clone();
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    assert_eq!(*nodes_used.lock(), 2, "hosts ran on both nodes");
    let crossing: Vec<_> = report.edges.iter().filter(|e| e.batches > 0).collect();
    assert_eq!(crossing.len(), 1, "{:?}", report.edges);
    assert_eq!(crossing[0].codec_bytes, 0, "{:?}", crossing[0]);
    assert_eq!(
        crossing[0].copied_bytes,
        100 * 20_000,
        "only the strings are copied, once"
    );

    let local_dir = dir.path().join("local");
    let mut params = JobParams::new();
    params.insert("records".into(), "20000".into());
    params.insert("out".into(), local_dir.join("out").display().to_string());
    let plan = Plan::new(padded_counts(&params).into_graph());
    let storage = CheckpointStorage::local(local_dir.join("chk"), "padded_counts", 2).unwrap();
    let mut config = JobConfig::new(storage);
    config.checkpoint_interval = Duration::from_millis(100);
    braid_actors::stream::local::run(&plan, config).unwrap();

    let sorted = |out: PathBuf| {
        let mut lines = committed_lines(&out).unwrap();
        lines.sort();
        lines
    };
    let (cluster, local) = (
        sorted(dir.path().join("cluster").join("out")),
        sorted(local_dir.join("out")),
    );
    assert_eq!(cluster.len(), 20_000);
    assert!(
        cluster == local,
        "the spread columnar run committed other lines than the local run"
    );
}

#[test]
fn a_job_spread_over_two_nodes_commits_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = spread_job("padded", dir.path(), 20_000);
    let nodes_used = job.nodes_used.clone();
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    assert_eq!(*nodes_used.lock(), 2, "hosts ran on both nodes");
    let lines = committed_lines(&dir.path().join("out")).unwrap();
    assert_eq!(lines.len(), 20_000, "one committed line per record");
    let mut per_key: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in &lines {
        let mut parts = line.split_whitespace();
        let k: u64 = parts.next().unwrap().parse().unwrap();
        let i: u64 = parts.next().unwrap().parse().unwrap();
        per_key.entry(k).or_default().push(i);
    }
    for (k, maxes) in &per_key {
        let expected_last = (0..20_000u64).filter(|i| i % 7 == *k).max().unwrap();
        assert_eq!(maxes.iter().max(), Some(&expected_last), "key {k}");
        assert_eq!(
            maxes.len() as u64,
            (0..20_000u64).filter(|i| i % 7 == *k).count() as u64,
            "key {k}: one running result per record"
        );
    }
}
