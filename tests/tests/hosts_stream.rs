//! The streaming exactly-once job spread over three test hosts that share
//! only a network: its subtasks run on every host, channels cross hosts
//! over TCP, and worker processes killed mid-run on any host, or a whole
//! host dying mid-run, lose and duplicate nothing. Checkpoints and the sink's output go to a directory
//! every host reaches (as Flink needs a shared file system or S3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::EventTime;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{child_role, Hosts};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEYS: u64 = 13;
const RECORDS: u64 = 30_000;

fn key_of(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 9) % KEYS
}

/// A running count per key: one line `key count` per record.
#[derive(Default)]
struct Count;

impl KeyedProcessFunction<u64, (u64, String)> for Count {
    type State = u64;
    type Out = String;
    fn process(
        &mut self,
        key: &u64,
        _record: (u64, String),
        _time: Option<EventTime>,
        count: &mut u64,
        ctx: &mut ProcessContext<'_, u64, String>,
    ) {
        *count += 1;
        ctx.emit(format!("{key} {count}"), None);
    }
}

fn counts(params: &JobParams) -> StreamEnv {
    let records: u64 = params["records"].parse().unwrap_or(0);
    let out = PathBuf::from(&params["out"]);
    let env = StreamEnv::new(3);
    env.source("numbers", move |s, p| {
        GeneratorSource::new(records, s, p, |i| (i, "x".repeat(64)))
    })
    .key_by(|r: &(u64, String)| key_of(r.0))
    .process(Count::default)
    .sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
    });
    env
}

braid_actors::stream_job!(COUNTS, "host_counts", counts);

/// Runs the job from this driver, killing one subtask process in each of
/// the first two attempts, or, with `KILL_HOST` set, printing `RUNNING`
/// once for the test to kill a whole host; prints how many hosts it ran
/// on and its report.
fn drive(dir: &Path) {
    let kill_whole = std::env::var("KILL_HOST").is_ok();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nodes_used: Arc<parking_lot::Mutex<usize>> = Arc::default();
    let nodes_at_start = nodes_used.clone();
    let rt = braid::init_blocking().unwrap();
    let mut params = JobParams::new();
    params.insert("records".into(), RECORDS.to_string());
    params.insert("out".into(), dir.join("out").display().to_string());
    let kills = Arc::new(AtomicU32::new(0));
    let killers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let (k2, v2) = (kills.clone(), killers.clone());
    let job = ClusterJob {
        job: "host_counts".into(),
        params,
        storage: StorageSpec {
            dir: dir.join("chk"),
            job: "host_counts".into(),
            retain: 3,
        },
        checkpoint_interval: Duration::from_millis(150),
        restart: RestartStrategy::fixed(10, Duration::ZERO),
        checkpoint_timeout: Duration::from_secs(60),
        resource_wait: Duration::from_secs(20),
        pace: SourcePace {
            batch: 256,
            rate: Some(4_000.0),
        },
        credits: 4,
        credit_bytes: braid_actors::stream::coordinator::DEFAULT_CREDIT_BYTES,
        on_running: Some(Arc::new(move |generation, pids| {
            if kill_whole {
                if !armed.swap(true, Ordering::SeqCst) {
                    use std::io::Write;
                    println!("\nNODES_AT_START={}", *nodes_at_start.lock());
                    println!("\nRUNNING");
                    let _ = std::io::stdout().flush();
                }
                return;
            }
            if k2.load(Ordering::SeqCst) >= 2 || pids.is_empty() {
                return;
            }
            // The hosts share the machine's pids: a subtask process on any
            // host is killed by its pid.
            let victim = pids[(generation as usize * 5 + 1) % pids.len()];
            let k3 = k2.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(800));
                let _ = std::process::Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .status();
                k3.fetch_add(1, Ordering::SeqCst);
            });
            v2.lock().unwrap().push(t);
        })),
        spread: true,
        nodes_used,
        task_resources: Default::default(),
        placement: Default::default(),
    };
    let nodes_used = job.nodes_used.clone();
    let report = braid_actors::stream::cluster::run(&rt, job).unwrap();
    for t in killers.lock().unwrap().drain(..) {
        let _ = t.join();
    }
    println!("NODES={}", *nodes_used.lock());
    println!("KILLS={}", kills.load(Ordering::SeqCst));
    println!("FAILURES={}", report.failures);
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

/// The value of `KEY=` in a driver's output.
fn field(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.split_once(&format!("{key}=")).map(|(_, v)| v))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn hosts_the_exactly_once_stream_job_spread_over_three_hosts_survives_kills() {
    run_spread_job(
        "hosts_the_exactly_once_stream_job_spread_over_three_hosts_survives_kills",
        false,
    );
}

#[test]
fn hosts_the_exactly_once_stream_job_loses_a_host_mid_run() {
    run_spread_job(
        "hosts_the_exactly_once_stream_job_loses_a_host_mid_run",
        true,
    );
}

/// Runs the job over three hosts, killing subtask processes (or, with
/// `whole_host`, every process of host 2 once), and checks its output is
/// exact.
fn run_spread_job(test: &str, whole_host: bool) {
    let Some(hosts) = Hosts::for_test(test, 3) else {
        return;
    };
    // A directory every host sees: under the build's target directory.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hosts-stream-{}-{}",
        std::process::id(),
        hosts.bridge()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = HostCluster::start(&hosts, 0, 2).unwrap();
    cluster.add_node(1, 2, &[]).unwrap();
    cluster.add_node(2, 2, &[]).unwrap();
    let mut driver = cluster.driver(0, "drive").unwrap();
    driver
        .env("JOB_DIR", &dir)
        .stdout(std::process::Stdio::piped());
    if whole_host {
        driver.env("KILL_HOST", "2");
    }
    let mut driver = driver.spawn().unwrap();
    let mut stdout = String::new();
    let mut host_kills = 0;
    for line in std::io::BufRead::lines(std::io::BufReader::new(driver.stdout.take().unwrap()))
        .map_while(Result::ok)
    {
        if line.trim() == "RUNNING" {
            // Host 2 dies with its node and the subtasks there, mid-run.
            std::thread::sleep(Duration::from_millis(800));
            assert!(
                hosts
                    .host(2)
                    .signal_all(rustix::process::Signal::KILL)
                    .unwrap()
                    > 0
            );
            host_kills += 1;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let out = driver.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "driver failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kills = if whole_host {
        assert_eq!(host_kills, 1, "host 2 was killed mid-run");
        assert_eq!(
            field(&stdout, "NODES_AT_START"),
            3,
            "subtasks on every host, host 2's included, when it died"
        );
        assert_eq!(
            field(&stdout, "NODES"),
            2,
            "the job recovered on the two hosts left"
        );
        1
    } else {
        assert_eq!(field(&stdout, "NODES"), 3, "subtasks on every host");
        assert_eq!(field(&stdout, "KILLS"), 2);
        2
    };
    assert!(field(&stdout, "FAILURES") >= kills, "{stdout}");

    // Exactly once: per key, the counts 1..=n, each once.
    let lines = committed_lines(&dir.join("out")).unwrap();
    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in &lines {
        let (key, count) = line.split_once(' ').unwrap();
        seen.entry(key.parse().unwrap())
            .or_default()
            .push(count.parse().unwrap());
    }
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for i in 0..RECORDS {
        *expected.entry(key_of(i)).or_insert(0) += 1;
    }
    for (key, n) in expected {
        let mut got = seen.remove(&key).unwrap_or_default();
        got.sort_unstable();
        assert_eq!(got, (1..=n).collect::<Vec<_>>(), "key {key}");
    }
    assert!(seen.is_empty(), "keys that were never sent: {seen:?}");
    assert_eq!(lines.len() as u64, RECORDS);
    drop(cluster);
    std::fs::remove_dir_all(&dir).unwrap();
}
