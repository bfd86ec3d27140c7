//! A streaming job spread over two nodes of one embedded cluster, each
//! node with its own store: channels between hosts on different nodes
//! carry their large batches through object transfer, and the output is
//! still exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::collections::HashMap;
use std::path::PathBuf;
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

#[test]
fn a_job_spread_over_two_nodes_commits_every_record_once() {
    let rt = braid::init_blocking_with(
        braid::InitOptions::new()
            .num_cpus(2.0)
            .extra_node(2.0, braid::Resources::new()),
    )
    .expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let mut params = JobParams::new();
    params.insert("records".into(), "20000".into());
    params.insert("out".into(), dir.path().join("out").display().to_string());
    let job = ClusterJob {
        job: "padded".into(),
        params,
        storage: StorageSpec {
            dir: dir.path().join("chk"),
            job: "padded".into(),
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
    };
    let nodes_used = job.nodes_used.clone();
    let report = braid_actors::stream::cluster::run(&rt, job).unwrap();
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
