//! What the daemon-loss tests share: finding the processes this test
//! process started, and its own CPU time.
#![allow(dead_code)]

use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::coordinator::{JobError, JobReport};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Process ids of this process's children named `comm` (a daemon of its
/// embedded cluster: `braid-node`, `braid-head`).
pub fn children_named(comm: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name == comm && ppid == Some(me) {
            found.push(pid);
        }
    }
    found
}

/// Sends `signal` to `pid`, one of this test's own processes.
pub fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// CPU time (user + system) this process used so far, its threads'
/// included (from `/proc/self/stat`, in the kernel's fixed 100 Hz ticks).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields; `after` starts at the 3rd.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Records `0..records`, throttled to `rate` per second per subtask, over
/// two subtasks and a channel into a file sink writing `out`.
pub fn numbers(params: &JobParams) -> StreamEnv {
    let records: u64 = params["records"].parse().unwrap_or(0);
    let out = PathBuf::from(&params["out"]);
    let env = StreamEnv::new(2);
    env.source("numbers", move |s, p| {
        GeneratorSource::new(records, s, p, |i| i)
    })
    .rebalance()
    .sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |i: &u64| i.to_string())
    });
    env
}

/// The `numbers` job (registered by the test file as "numbers") over
/// `records` records at `rate` per subtask, writing under `dir`.
pub fn numbers_job(dir: &Path, records: u64, rate: f64) -> ClusterJob {
    let mut params = JobParams::new();
    params.insert("records".into(), records.to_string());
    params.insert("out".into(), dir.join("out").display().to_string());
    ClusterJob {
        checkpoint_interval: Duration::from_millis(100),
        pace: SourcePace {
            batch: 64,
            rate: Some(rate),
        },
        ..ClusterJob::new(
            "numbers",
            params,
            StorageSpec {
                dir: dir.join("chk"),
                job: "numbers".into(),
                retain: 3,
            },
        )
    }
}

/// Runs `job` on `rt` in a thread: its outcome, and a channel that gets
/// the worker pids of every attempt once it runs.
pub fn run_in_background(
    rt: &braid::Runtime,
    mut job: ClusterJob,
) -> (
    std::thread::JoinHandle<Result<JobReport, JobError>>,
    crossbeam_channel::Receiver<Vec<u32>>,
) {
    let (pids_tx, pids_rx) = crossbeam_channel::unbounded();
    job.on_running = Some(std::sync::Arc::new(move |_, pids| {
        let _ = pids_tx.send(pids);
    }));
    let rt = rt.clone();
    let driver = std::thread::spawn(move || braid_actors::stream::cluster::run(&rt, job));
    (driver, pids_rx)
}

/// Every record `0..records` committed under `dir/out` exactly once.
pub fn assert_exactly_once(dir: &Path, records: u64) {
    let mut got: Vec<u64> = committed_lines(&dir.join("out"))
        .unwrap()
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..records).collect::<Vec<_>>(), "every record once");
}
