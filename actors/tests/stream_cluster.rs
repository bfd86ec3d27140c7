//! The streaming engine on a real embedded cluster: every subtask a braid
//! actor in its own worker process, channels as actor calls. A run
//! without failures, and a short chaos run that SIGKILLs worker processes
//! while the job runs, both commit every record exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::edges::EdgeStats;
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::EventTime;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const KEYS: u64 = 13;

fn key_of(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 9) % KEYS
}

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
    let pad: usize = params.get("pad").and_then(|p| p.parse().ok()).unwrap_or(0);
    let columnar = params.contains_key("columnar");
    let out = PathBuf::from(&params["out"]);
    let env = StreamEnv::new(2);
    let keyed = env
        .source("numbers", move |s, p| {
            GeneratorSource::new(records, s, p, move |i| (i, "x".repeat(pad)))
        })
        .key_by(|r: &(u64, String)| key_of(r.0));
    let keyed = if columnar { keyed.columnar() } else { keyed };
    keyed.process(Count::default).sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
    });
    env
}

braid_actors::stream_job!(COUNTS, "counts", counts);

fn read_count(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_count(path: &Path, n: u64) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, n.to_string()).is_ok() {
        let _ = std::fs::rename(tmp, path);
    }
}

/// Takes 200 µs per record and reports its progress in a file.
struct SlowSink {
    dir: PathBuf,
    consumed: u64,
}

impl braid_actors::stream::operator::Operator for SlowSink {
    type In = u64;
    type Out = ();
    fn process(
        &mut self,
        _v: u64,
        _t: Option<EventTime>,
        _out: &mut dyn braid_actors::stream::operator::Collector<()>,
    ) -> Result<(), braid_actors::stream::operator::OperatorError> {
        std::thread::sleep(Duration::from_micros(200));
        self.consumed += 1;
        if self.consumed % 64 == 0 {
            write_count(&self.dir.join("consumed"), self.consumed);
        }
        Ok(())
    }
}

/// Records per batch of the slow job: small, so the bounds on what is in
/// flight are well below the 8,000 records it sends.
const SLOW_BATCH: u64 = 256;

/// A fast source and a slow sink in different processes; the source
/// records the largest gap between what it emitted and what the sink took.
fn slow(params: &JobParams) -> StreamEnv {
    let dir = PathBuf::from(&params["progress"]);
    let columnar = params.contains_key("columnar");
    let env = StreamEnv::new(1);
    let source_dir = dir.clone();
    let fast = env.source("fast", move |s, p| {
        let dir = source_dir.clone();
        let mut max_gap = 0;
        GeneratorSource::new(8_000, s, p, move |i| {
            if i % 64 == 0 {
                let gap = i.saturating_sub(read_count(&dir.join("consumed")));
                if gap > max_gap {
                    max_gap = gap;
                    write_count(&dir.join("max_gap"), max_gap);
                }
            }
            i
        })
    });
    let fast = fast.batch_records(SLOW_BATCH as usize);
    let fast = if columnar { fast.columnar() } else { fast };
    fast.rebalance().sink("slow", move |_| SlowSink {
        dir: dir.clone(),
        consumed: 0,
    });
    env
}

braid_actors::stream_job!(SLOW, "slow", slow);

fn rt() -> &'static braid::Runtime {
    static RT: OnceLock<braid::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).expect("cluster")
    })
}

fn job(dir: &Path, records: u64, rate: Option<f64>) -> ClusterJob {
    let mut params = JobParams::new();
    params.insert("records".into(), records.to_string());
    params.insert("out".into(), dir.join("out").display().to_string());
    ClusterJob {
        job: "counts".into(),
        params,
        storage: StorageSpec {
            dir: dir.join("chk"),
            job: "counts".into(),
            retain: 3,
        },
        checkpoint_interval: Duration::from_millis(100),
        restart: RestartStrategy::fixed(10, Duration::ZERO),
        checkpoint_timeout: Duration::from_secs(60),
        resource_wait: Duration::from_secs(10),
        pace: SourcePace { batch: 256, rate },
        credits: 4,
        credit_bytes: braid_actors::stream::coordinator::DEFAULT_CREDIT_BYTES,
        on_running: None,
        spread: false,
        nodes_used: Default::default(),
        task_resources: Default::default(),
        placement: Default::default(),
    }
}

fn check_exactly_once(out: &Path, records: u64) {
    let lines = committed_lines(out).unwrap();
    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in &lines {
        let mut parts = line.split_whitespace();
        let key: u64 = parts.next().unwrap().parse().unwrap();
        let count: u64 = parts.next().unwrap().parse().unwrap();
        seen.entry(key).or_default().push(count);
    }
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for i in 0..records {
        *expected.entry(key_of(i)).or_insert(0) += 1;
    }
    for (key, n) in expected {
        let mut got = seen.remove(&key).unwrap_or_default();
        got.sort_unstable();
        let dup = got.windows(2).filter(|w| w[0] == w[1]).count();
        got.dedup();
        let lost = (1..=n).filter(|c| got.binary_search(c).is_err()).count();
        assert!(
            lost == 0 && dup == 0 && got.len() as u64 == n,
            "key {key}: {lost} counts lost, {dup} duplicated, {} of {n} present",
            got.len()
        );
    }
    assert!(seen.is_empty());
    assert_eq!(lines.len() as u64, records);
}

/// The one edge of the counts job that crosses processes.
fn keyed_edge(report: &braid_actors::stream::coordinator::JobReport) -> EdgeStats {
    let crossing: Vec<&EdgeStats> = report.edges.iter().filter(|e| e.batches > 0).collect();
    assert_eq!(crossing.len(), 1, "{:?}", report.edges);
    crossing[0].clone()
}

#[test]
fn a_job_of_actors_commits_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let report = braid_actors::stream::cluster::run(rt(), job(dir.path(), 30_000, None)).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    check_exactly_once(&dir.path().join("out"), 30_000);
    let edge = keyed_edge(&report);
    assert_eq!(
        edge.codec_bytes,
        2 * edge.bytes,
        "every encoded batch is encoded once and decoded once: {edge:?}"
    );
}

#[test]
fn a_columnar_stream_crosses_processes_as_references_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path(), 30_000, None);
    job.params.insert("columnar".into(), String::new());
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    check_exactly_once(&dir.path().join("out"), 30_000);
    let edge = keyed_edge(&report);
    assert_eq!(edge.codec_bytes, 0, "nothing went through serde: {edge:?}");
    assert_eq!(edge.copied_bytes, 0, "nothing was copied: {edge:?}");
    assert!(edge.bytes > 0 && edge.batches > 0, "{edge:?}");
}

#[test]
fn strings_of_a_columnar_stream_are_copied_once_into_the_receivers_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path(), 20_000, None);
    job.params.insert("columnar".into(), String::new());
    job.params.insert("pad".into(), "200".into());
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    check_exactly_once(&dir.path().join("out"), 20_000);
    let edge = keyed_edge(&report);
    assert_eq!(edge.codec_bytes, 0, "{edge:?}");
    assert_eq!(edge.copied_bytes, 200 * 20_000, "{edge:?}");
}

#[test]
fn batches_above_the_store_threshold_arrive_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path(), 20_000, None);
    job.params.insert("pad".into(), "200".into());
    const _: () = assert!(
        1024 * 200 > braid_actors::stream::cluster::STORE_BATCH_BYTES,
        "a full batch of these records is above the store threshold"
    );
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    check_exactly_once(&dir.path().join("out"), 20_000);
}

/// Runs the slow job with `configure` applied, and returns the most
/// records that were in flight between source and sink at once.
fn slow_run_gap(configure: impl FnOnce(&mut ClusterJob)) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path(), 0, None);
    job.job = "slow".into();
    job.params
        .insert("progress".into(), dir.path().display().to_string());
    configure(&mut job);
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    let gap = read_count(&dir.path().join("max_gap"));
    assert!(gap > 0, "the source saw the sink's progress");
    gap
}

#[test]
fn a_slow_sink_in_another_process_holds_back_the_source() {
    let gap = slow_run_gap(|job| job.credits = 2);
    let batch = SLOW_BATCH;
    let bound = batch * (2 + 2) + 2 * 64;
    assert!(
        gap <= bound,
        "records in flight peaked at {gap}, above {bound} (credits 2, batches of {batch})"
    );
}

#[test]
fn store_bytes_in_flight_hold_back_a_columnar_source() {
    let gap = slow_run_gap(|job| {
        job.credits = 8;
        job.credit_bytes = 1;
        job.params.insert("columnar".into(), String::new());
    });
    let batch = SLOW_BATCH;
    let bound = batch * (1 + 2) + 2 * 64;
    assert!(
        gap <= bound,
        "records in flight peaked at {gap}, above {bound} (one batch of store bytes in flight, \
         batches of {batch}; 8 message credits would allow {})",
        batch * (8 + 2)
    );
}

#[test]
fn killing_worker_processes_mid_run_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kills = Arc::new(AtomicU32::new(0));
    let victims: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let mut job = job(dir.path(), 40_000, Some(4_000.0));
    let (k2, v2) = (kills.clone(), victims.clone());
    job.on_running = Some(Arc::new(move |generation, pids| {
        if k2.load(Ordering::SeqCst) >= 3 || pids.is_empty() {
            return;
        }
        let victim = pids[(generation as usize * 7) % pids.len()];
        let k3 = k2.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let _ = std::process::Command::new("kill")
                .args(["-9", &victim.to_string()])
                .status();
            k3.fetch_add(1, Ordering::SeqCst);
        });
        if let Ok(mut v) = v2.lock() {
            v.push(t);
        }
    }));
    let report = braid_actors::stream::cluster::run(rt(), job).unwrap();
    for t in victims.lock().unwrap().drain(..) {
        let _ = t.join();
    }
    assert!(report.failures >= 3, "{report:?}");
    assert!(report.checkpoints >= 3, "{report:?}");
    check_exactly_once(&dir.path().join("out"), 40_000);
}
