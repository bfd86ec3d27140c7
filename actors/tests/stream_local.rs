//! The streaming engine in one process: chaining, keyed state, the
//! transactional sink's exactly-once output under crashes injected at
//! every point of the checkpoint protocol, and the backpressure bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::{FaultPoint, JobConfig};
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{Collector, EventTime, Operator, OperatorError};
use braid_actors::stream::plan::Plan;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEYS: u64 = 17;

fn key_of(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7) % KEYS
}

/// Counts records per key and emits `key count`.
#[derive(Default)]
struct CountPerKey {
    panic_at: Option<(u64, u64)>,
}

impl KeyedProcessFunction<u64, u64> for CountPerKey {
    type State = u64;
    type Out = String;

    fn process(
        &mut self,
        key: &u64,
        index: u64,
        _time: Option<EventTime>,
        count: &mut u64,
        ctx: &mut ProcessContext<'_, u64, String>,
    ) {
        if let Some((at, generation)) = self.panic_at {
            if index == at
                && braid_actors::stream::context::TaskContext::current().generation == generation
            {
                panic!("injected failure at record {index}");
            }
        }
        *count += 1;
        ctx.emit(format!("{key} {count}"), None);
    }
}

fn build(records: u64, out: &Path, panic_at: Option<(u64, u64)>, parallelism: usize) -> Plan {
    let env = StreamEnv::new(parallelism);
    let out = out.to_path_buf();
    env.source("numbers", move |s, p| {
        GeneratorSource::new(records, s, p, |i| i)
    })
    .key_by(|i: &u64| key_of(*i))
    .process(move || CountPerKey { panic_at })
    .sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
    });
    Plan::new(env.into_graph())
}

fn expected(records: u64) -> HashMap<u64, u64> {
    let mut n = HashMap::new();
    for i in 0..records {
        *n.entry(key_of(i)).or_insert(0) += 1;
    }
    n
}

/// Every key's counts are exactly 1..=n, each once.
fn check_exactly_once(out: &Path, records: u64) {
    let lines = committed_lines(out).unwrap();
    assert_eq!(lines.len() as u64, records, "one committed line per record");
    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in lines {
        let mut parts = line.split_whitespace();
        let key: u64 = parts.next().unwrap().parse().unwrap();
        let count: u64 = parts.next().unwrap().parse().unwrap();
        seen.entry(key).or_default().push(count);
    }
    for (key, n) in expected(records) {
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
    assert!(seen.is_empty(), "no unexpected keys");
}

fn config(dir: &Path) -> JobConfig {
    let mut config = JobConfig::new(CheckpointStorage::local(dir.join("chk"), "test", 3).unwrap());
    config.checkpoint_interval = Duration::from_millis(20);
    config.pace.rate = Some(40_000.0);
    config
}

#[test]
fn chained_vertices_share_a_task_and_key_by_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let plan = build(10, dir.path(), None, 2);
    assert_eq!(plan.tasks.len(), 2, "{:?}", plan.tasks);
    assert!(plan.tasks[0].is_source && plan.tasks[0].vertices.len() == 2);
    assert_eq!(plan.tasks[1].vertices.len(), 2, "process and sink chained");
    assert_eq!(plan.channels.len(), 4, "2 x 2 hash channels");
}

#[test]
fn a_run_without_failures_commits_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let plan = build(20_000, &out, None, 2);
    let report = braid_actors::stream::local::run(&plan, config(dir.path())).unwrap();
    assert_eq!(report.failures, 0);
    assert!(report.checkpoints >= 2, "{report:?}");
    check_exactly_once(&out, 20_000);
}

#[test]
fn a_panicking_operator_is_recovered_from_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let plan = build(20_000, &out, Some((12_345, 1)), 2);
    let report = braid_actors::stream::local::run(&plan, config(dir.path())).unwrap();
    assert_eq!(report.failures, 1, "{report:?}");
    check_exactly_once(&out, 20_000);
}

#[test]
fn crashes_at_every_point_of_the_protocol_lose_and_duplicate_nothing() {
    for point in [
        FaultPoint::BeforeBarrier(3),
        FaultPoint::DuringSnapshot(3),
        FaultPoint::BeforeCommit(3),
        FaultPoint::DuringRestore(2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let plan = build(20_000, &out, None, 2);
        let mut config = config(dir.path());
        let fired = Arc::new(AtomicU64::new(0));
        let fired2 = fired.clone();
        config.faults = Some(Arc::new(move |p| {
            let hit = p == point
                || (matches!(point, FaultPoint::DuringRestore(_))
                    && p == FaultPoint::BeforeBarrier(2));
            hit && fired2.fetch_add(1, Ordering::SeqCst) < 2
        }));
        let report = braid_actors::stream::local::run(&plan, config).unwrap();
        assert!(report.failures >= 1, "{point:?} fired: {report:?}");
        check_exactly_once(&out, 20_000);
    }
}

#[test]
fn too_many_failures_end_the_job_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let plan = build(5_000, &out, None, 1);
    let mut config = config(dir.path());
    config.restart = RestartStrategy::fixed(2, Duration::ZERO);
    config.faults = Some(Arc::new(|p| matches!(p, FaultPoint::BeforeBarrier(_))));
    let err = braid_actors::stream::local::run(&plan, config).unwrap_err();
    assert!(
        matches!(
            err,
            braid_actors::stream::coordinator::JobError::TooManyFailures { failures: 3, .. }
        ),
        "{err}"
    );
}

/// A sink that takes a millisecond per record and counts what it took.
struct Slow(Arc<AtomicU64>);

impl Operator for Slow {
    type In = u64;
    type Out = ();
    fn process(
        &mut self,
        _v: u64,
        _t: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        std::thread::sleep(Duration::from_micros(200));
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Records per batch of the slow-sink jobs: small, so the bound on what is
/// in flight is well below the records they send.
const SLOW_BATCH: u64 = 256;

#[test]
fn a_slow_sink_slows_the_source_and_buffers_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let max_gap = Arc::new(AtomicU64::new(0));
    let env = StreamEnv::new(1);
    let (p2, c2, g2) = (produced.clone(), consumed.clone(), max_gap.clone());
    env.source("fast", move |s, p| {
        let (p2, c2, g2) = (p2.clone(), c2.clone(), g2.clone());
        GeneratorSource::new(6_000, s, p, move |i| {
            let made = p2.fetch_add(1, Ordering::SeqCst) + 1;
            let gap = made.saturating_sub(c2.load(Ordering::SeqCst));
            g2.fetch_max(gap, Ordering::SeqCst);
            i
        })
    })
    .batch_records(SLOW_BATCH as usize)
    .rebalance()
    .sink("slow", {
        let consumed = consumed.clone();
        move |_| Slow(consumed.clone())
    });
    let plan = Plan::new(env.into_graph());
    let mut config = config(dir.path());
    config.pace.rate = None;
    config.credits = 2;
    braid_actors::stream::local::run(&plan, config).unwrap();
    let bound = (2 + 2) * SLOW_BATCH;
    let gap = max_gap.load(Ordering::SeqCst);
    assert!(
        gap <= bound,
        "records in flight peaked at {gap}, above credits x batch ({bound})"
    );
    assert_eq!(consumed.load(Ordering::SeqCst), 6_000);
}

/// Collects what reaches it into a shared list.
struct Collect<T>(Arc<std::sync::Mutex<Vec<T>>>);

impl<T: Send + 'static> Operator for Collect<T> {
    type In = T;
    type Out = ();
    fn process(
        &mut self,
        v: T,
        _t: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        if let Ok(mut all) = self.0.lock() {
            all.push(v);
        }
        Ok(())
    }
}

fn collect<T: Send + 'static>() -> (
    Arc<std::sync::Mutex<Vec<T>>>,
    impl Fn(usize) -> Collect<T> + Send + Sync + 'static,
) {
    let all: Arc<std::sync::Mutex<Vec<T>>> = Arc::default();
    let all2 = all.clone();
    (all, move |_| Collect(all2.clone()))
}

#[test]
fn a_broadcast_edge_gives_every_record_to_every_subtask() {
    let dir = tempfile::tempdir().unwrap();
    let env = StreamEnv::new(1);
    let (seen, sink) = collect::<(usize, u64)>();
    env.source("n", |s, p| GeneratorSource::new(100, s, p, |i| i))
        .broadcast()
        .transform("tag", |subtask| {
            braid_actors::stream::functions::Map::new(move |i: u64| (subtask, i))
        })
        .parallelism(3)
        .sink("all", sink);
    let plan = Plan::new(env.into_graph());
    braid_actors::stream::local::run(&plan, config(dir.path())).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    let expected: Vec<(usize, u64)> = (0..3).flat_map(|s| (0..100).map(move |i| (s, i))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn union_and_connect_merge_streams() {
    let dir = tempfile::tempdir().unwrap();
    let env = StreamEnv::new(2);
    let (seen, sink) = collect::<String>();
    let evens = env.source("evens", |s, p| GeneratorSource::new(50, s, p, |i| i * 2));
    let odds = env.source("odds", |s, p| GeneratorSource::new(50, s, p, |i| i * 2 + 1));
    let words = env.source("words", |s, p| {
        GeneratorSource::new(10, s, p, |i| format!("w{i}"))
    });
    evens
        .union(&[odds])
        .connect(&words)
        .map(
            |e: braid_actors::stream::graph::Either<u64, String>| match e {
                braid_actors::stream::graph::Either::Left(n) => format!("n{n}"),
                braid_actors::stream::graph::Either::Right(w) => w,
            },
        )
        .sink("all", sink);
    let plan = Plan::new(env.into_graph());
    braid_actors::stream::local::run(&plan, config(dir.path())).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut expected: Vec<String> = (0..100).map(|n| format!("n{n}")).collect();
    expected.extend((0..10).map(|i| format!("w{i}")));
    expected.sort();
    assert_eq!(seen, expected);
}

#[derive(Clone)]
struct SumU64;

impl braid_actors::stream::window::Aggregator<u64> for SumU64 {
    type Acc = u64;
    type Out = u64;
    fn create(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, v: &u64) {
        *acc += v;
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
}

#[test]
fn event_time_windows_fire_on_watermarks_carried_across_channels() {
    let dir = tempfile::tempdir().unwrap();
    let env = StreamEnv::new(2);
    let (seen, sink) = collect::<braid_actors::stream::window::WindowResult<u64, u64>>();
    env.source("timed", |s, p| {
        GeneratorSource::new(1_000, s, p, |i| i).with_event_time(|i| i as i64)
    })
    .key_by(|i: &u64| i % 3)
    .window(
        braid_actors::stream::window::WindowSpec::TumblingTime { size: 100 },
        SumU64,
    )
    .sink("windows", sink);
    let plan = Plan::new(env.into_graph());
    braid_actors::stream::local::run(&plan, config(dir.path())).unwrap();
    let mut got: Vec<(u64, i64, u64)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|w| (w.key, w.start, w.value))
        .collect();
    got.sort_unstable();
    let mut expected = Vec::new();
    for key in 0..3u64 {
        for start in (0..1000).step_by(100) {
            let sum: u64 = (start..start + 100).filter(|i| i % 3 == key).sum();
            expected.push((key, start as i64, sum));
        }
    }
    assert_eq!(got, expected, "every window fired once with its exact sum");
}
