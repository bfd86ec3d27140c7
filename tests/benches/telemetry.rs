//! What telemetry costs and how fast it answers, for issue 21's targets:
//!
//! * `braid microbenchmark` with recording on and off (`BRAID_METRICS=0`),
//!   interleaved (which goes first alternates by round, as the order
//!   alone moves rates here), `ROUNDS` runs each: the median change of
//!   every op, over each setting's runs and over each round's ratio.
//! * What recording adds to one call, timed in a loop in this process
//!   (the caller's count, the worker's counts, histograms and span, and
//!   the span's share of its report), and that time as a share of each
//!   op's time per call: a bound the machine's noise does not move, where
//!   the on/off rates of a shared 2-core machine differ by more than the
//!   recording costs.
//! * A timeline of 100,000 tasks: `braid timeline` from the command to a
//!   written file.
//! * `/metrics` of a node hosting 1,000 actors while a stream job runs:
//!   the median answer time of the node's and of the head's (which
//!   includes the node's).
//! * The dashboard's first page in headless Chromium: time from the
//!   navigation's start to the first view drawn with its data
//!   (Navigation Timing's origin; browser start-up excluded).
//!
//! Needs a release `braid` binary and `chromium`:
//! `cargo build --release -p braid --bin braid && cargo bench -p
//! braid-tests --bench telemetry` (`-- --recording-only` times only the
//! recording, in seconds). Prints progress on stderr and one JSON line on
//! stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::telemetry::http::get;
use braid::Runtime;
use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::PsConfig;
use braid_tests::browser::{first_view_ms, load};
use braid_tests::hosts::braid_binary;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// Microbenchmark runs per setting.
const ROUNDS: usize = 5;
/// Tasks in the timeline.
const TASKS: usize = 100_000;
/// Worker processes that run them.
const WORKERS: usize = 8;
/// Actors on the node whose `/metrics` is timed.
const ACTORS: usize = 1_000;
/// `/metrics` answers timed.
const SCRAPES: usize = 20;
/// Dashboard loads timed.
const LOADS: usize = 5;

#[braid::remote]
fn noop(x: u32) -> u32 {
    x
}

/// An actor that does nothing: what a node hosting many holds.
#[braid::actor]
pub struct Idle {
    n: u32,
}

#[braid::actor]
impl Idle {
    fn new(n: u32) -> Self {
        Idle { n }
    }

    fn n(&self) -> u32 {
        self.n
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One `braid microbenchmark --json` run with recording on or off.
fn microbenchmark(on: bool) -> BTreeMap<String, f64> {
    let out = Command::new(braid_binary())
        .args(["microbenchmark", "--json"])
        .env("BRAID_METRICS", if on { "1" } else { "0" })
        .env_remove("BRAID_ADDRESS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "microbenchmark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap()).unwrap()
}

/// How much slower `op` ran with recording (positive: slower): latencies
/// (µs) grow when slower, rates shrink.
fn slowdown_of(op: &str, with: f64, without: f64) -> f64 {
    if op.ends_with("_us") || op.contains("latency") {
        with / without - 1.0
    } else {
        without / with - 1.0
    }
}

/// The median slowdown of each op with recording on (positive: slower),
/// and every run's figures.
fn overhead() -> Value {
    let mut on: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut off: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for setting in order {
            eprintln!(
                "microbenchmark round {} with recording {}",
                round + 1,
                if setting { "on" } else { "off" }
            );
            let into = if setting { &mut on } else { &mut off };
            for (k, v) in microbenchmark(setting) {
                into.entry(k).or_default().push(v);
            }
        }
    }
    let mut changes = Map::new();
    let mut all = Vec::new();
    for (op, values) in &on {
        // Reference figures of the machine, not braid ops.
        if op.starts_with("memcpy") || op.starts_with("uds") {
            continue;
        }
        let Some(base) = off.get(op) else { continue };
        let (with, without) = (median(values.clone()), median(base.clone()));
        let slowdown = slowdown_of(op, with, without);
        let per_round = median(
            values
                .iter()
                .zip(base)
                .map(|(&w, &wo)| slowdown_of(op, w, wo))
                .collect(),
        );
        all.push(slowdown);
        changes.insert(
            op.clone(),
            json!({"on": with, "off": without, "slowdown": slowdown,
                   "slowdown_per_round_median": per_round,
                   "runs_on": values, "runs_off": base}),
        );
    }
    json!({
        "median_slowdown": median(all.clone()),
        "max_slowdown": all.iter().copied().fold(f64::MIN, f64::max),
        "ops": changes,
    })
}

/// Calls timed per round of [`recording_cost`].
const RECORDED_CALLS: usize = 2_000_000;

/// Nanoseconds that recording adds to one call: what its caller and its
/// worker do only when `BRAID_METRICS` is on. With `timed`, every call
/// is one of a second's first `spans::PER_REPORT` (the submitted count
/// and stamp, the worker's three clock reads, the run's counts and
/// histograms under its name, its span, and taking the spans for the
/// report as the process does every second); without, calls are past
/// them (counted by name only). The median of five rounds.
fn recording_cost(timed: bool) -> f64 {
    use braid::telemetry::recorder::{Event, MethodCounters, Work};
    use braid::telemetry::spans::{self, Run};
    assert!(
        braid::telemetry::enabled(),
        "recording is off here (BRAID_METRICS): nothing to time"
    );
    let job = braid::JobId::random();
    let task = braid::TaskId::random();
    // As an actor's client and its host keep them.
    let caller = MethodCounters::methods("Bench");
    let worker = MethodCounters::methods("Bench");
    let method = String::from("small_value");
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let begun = Instant::now();
        for i in 0..RECORDED_CALLS {
            caller.count("small_value", Event::Submitted);
            let submitted_ns = spans::submitted_ns();
            if !spans::admit() {
                worker.of(&method).count(Event::Finished);
                continue;
            }
            let received = Instant::now();
            let started = Instant::now();
            let ran = started.elapsed();
            let started_ns = spans::unix_ns(started);
            let run = Run {
                task,
                job,
                work: Work::ActorCall,
                submitted_ns,
                received_ns: spans::unix_ns(received),
                started_ns,
                ended_ns: started_ns + ran.as_nanos() as u64,
            };
            let name =
                worker
                    .of(&method)
                    .ran(started.saturating_duration_since(received), ran, true);
            spans::record_named(run, name, true);
            if timed && i % spans::PER_REPORT == spans::PER_REPORT - 1 {
                std::hint::black_box(spans::take());
            }
        }
        if !timed {
            std::hint::black_box(spans::take());
        }
        rounds.push(begun.elapsed().as_nanos() as f64 / RECORDED_CALLS as f64);
    }
    std::hint::black_box(spans::take());
    median(rounds)
}

/// Processes whose timed runs [`recording_share`] counts per op (each
/// times its own `spans::PER_REPORT` a second): more than any op's
/// workers, so the share is an upper bound.
const TIMING_PROCESSES: f64 = 4.0;

/// Each task or call op's share of a second that recording takes at the
/// op's rate with recording off: `timed_ns` for up to
/// [`TIMING_PROCESSES`] × `spans::PER_REPORT` calls, `counted_ns` for the
/// rest.
fn recording_share(timed_ns: f64, counted_ns: f64, overhead: &Value) -> Value {
    let mut shares = Map::new();
    if let Some(ops) = overhead["ops"].as_object() {
        for (op, figures) in ops {
            let per_call = op.contains("tasks") || op.contains("actor_calls");
            if let (true, Some(rate)) = (per_call, figures["off"].as_f64()) {
                let timed = rate.min(TIMING_PROCESSES * braid::telemetry::spans::PER_REPORT as f64);
                let ns = timed * timed_ns + (rate - timed) * counted_ns;
                shares.insert(op.clone(), json!(ns / 1e9));
            }
        }
    }
    Value::Object(shares)
}

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Runs `TASKS` no-op tasks on up to `WORKERS` processes, waits until
/// their spans reached the node, and times `braid timeline` writing their
/// trace.
fn timeline(rt: &Runtime) -> Value {
    eprintln!("timeline: running {TASKS} tasks");
    let started = Instant::now();
    let refs: Vec<_> = (0..TASKS as u32)
        .map(|i| noop::remote(rt, i).unwrap())
        .collect();
    for r in &refs {
        rt.get_blocking(r).unwrap();
    }
    let ran = started.elapsed();
    let job = rt.job_id().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trace.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let begun = Instant::now();
        let out = Command::new(braid_binary())
            .args(["timeline", "--job", &job, "-o"])
            .arg(&file)
            .args(["--address", rt.address(), "--token", rt.token()])
            .output()
            .unwrap();
        let took = begun.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&file).unwrap();
        let runs = text.matches("\"name\":\"noop\"").count();
        if runs >= TASKS {
            let parsed: Value = serde_json::from_str(&text).unwrap();
            let events = parsed["traceEvents"].as_array().map_or(0, Vec::len);
            eprintln!("timeline: {runs} runs, {events} events in {took:?}");
            return json!({
                "tasks": TASKS,
                "workers": WORKERS,
                "tasks_ran_s": ran.as_secs_f64(),
                "timeline_s": took.as_secs_f64(),
                "trace_bytes": text.len(),
                "trace_events": events,
            });
        }
        assert!(
            Instant::now() < deadline,
            "only {runs} of {TASKS} runs reached the nodes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Starts an online-learning job in this process that runs for about
/// `seconds`.
fn start_stream_job(seconds: u64) -> std::thread::JoinHandle<()> {
    let ftrl = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let rows = 20_000 * seconds;
    let mut config = PipelineConfig::new(PsConfig::new("bench-telemetry", 2, 2, ftrl));
    config.rows = Some(rows);
    config.rate = Some(20_000.0);
    let env = StreamEnv::new(1);
    pipeline::build(&env, config, move || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows,
            bits: 18,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    })
    .unwrap();
    let plan = Plan::new(env.into_graph());
    std::thread::spawn(move || {
        let mut config = JobConfig::new(CheckpointStorage::in_memory("bench-telemetry", 3));
        config.checkpoint_interval = Duration::from_millis(500);
        local::run(&plan, config).unwrap();
    })
}

/// Median milliseconds of `SCRAPES` GETs of `path` at `address`.
fn time_scrapes(address: &str, path: &str, token: &str) -> (f64, usize) {
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let begun = Instant::now();
        let answer = block(get(address, path, Some(token), Duration::from_secs(30))).unwrap();
        times.push(begun.elapsed().as_secs_f64() * 1e3);
        assert_eq!(answer.status, 200);
        bytes = answer.body.len();
    }
    (median(times), bytes)
}

/// The dashboard's first view, loaded `LOADS` times in headless Chromium:
/// milliseconds from navigation to the first view drawn.
fn dashboard_loads(address: &str, token: &str, page: &str) -> Vec<f64> {
    let profile = tempfile::tempdir().unwrap();
    (0..LOADS)
        .map(|_| {
            let url = format!("http://{address}/?token={token}#{page}");
            let dom = load(profile.path(), &url, &["--dump-dom"]);
            first_view_ms(&dom)
                .unwrap_or_else(|| panic!("no first-draw time in the {page} page:\n{dom}"))
                as f64
        })
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let recording_ns = recording_cost(true);
    let past_cap_ns = recording_cost(false);
    eprintln!(
        "recording: {recording_ns:.0} ns per call with its span, {past_cap_ns:.0} ns past the span cap"
    );
    if std::env::args().any(|a| a == "--recording-only") {
        println!(
            "{}",
            json!({"bench": "telemetry", "recording_ns_per_call": recording_ns,
                   "recording_ns_per_call_past_span_cap": past_cap_ns})
        );
        return;
    }
    let overhead = overhead();
    eprintln!("metrics_overhead: {overhead}");
    let share = recording_share(recording_ns, past_cap_ns, &overhead);
    // Eight workers, so no process runs more tasks a second than it keeps
    // spans of (spans::PER_REPORT): the timeline holds every task.
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(WORKERS as f64)).unwrap();
    let timeline = timeline(&rt);
    eprintln!("timeline: {timeline}");

    eprintln!("metrics: starting {ACTORS} actors");
    let started = Instant::now();
    let pending: Vec<_> = (0..ACTORS as u32)
        .map(|i| {
            let mine = rt.clone();
            rt.spawn(async move { Idle::remote(&mine, i).num_cpus(0.0).spawn().await })
        })
        .collect();
    let actors: Vec<_> = pending
        .into_iter()
        .map(|p| block(p).unwrap().unwrap())
        .collect();
    for a in actors.iter().take(10) {
        block(a.n()).unwrap();
    }
    let actors_started = started.elapsed();
    eprintln!("metrics: {ACTORS} actors in {actors_started:?}; starting a stream job");
    let job = start_stream_job(40);
    std::thread::sleep(Duration::from_secs(3));
    let status = block(async {
        braid::rpc::HeadClient::connect(rt.address(), rt.token())
            .await
            .unwrap()
            .cluster_status()
            .await
            .unwrap()
    });
    let head = status.metrics_address.clone();
    let node = status.nodes[0].info.metrics_address.clone();
    let (node_ms, node_bytes) = time_scrapes(&node, "/metrics", rt.token());
    let (head_ms, head_bytes) = time_scrapes(&head, "/metrics", rt.token());
    eprintln!("metrics: node {node_ms:.1} ms ({node_bytes} B), head {head_ms:.1} ms");
    let overview = dashboard_loads(&head, rt.token(), "overview");
    let actors_page = dashboard_loads(&head, rt.token(), "actors");
    eprintln!("dashboard: overview {overview:?} ms, actors {actors_page:?} ms");
    job.join().unwrap();
    drop(actors);
    println!(
        "{}",
        json!({
            "bench": "telemetry",
            "metrics_overhead": overhead,
            "recording_ns_per_call": recording_ns,
            "recording_ns_per_call_past_span_cap": past_cap_ns,
            "recording_share_of_call": share,
            "timeline": timeline,
            "metrics_1000_actors": {
                "actors": ACTORS,
                "actors_started_s": actors_started.as_secs_f64(),
                "node_metrics_ms_p50": node_ms,
                "node_metrics_bytes": node_bytes,
                "head_metrics_ms_p50": head_ms,
                "head_metrics_bytes": head_bytes,
            },
            "dashboard_first_view_ms": {
                "overview_p50": median(overview.clone()),
                "overview_runs": overview,
                "actors_page_p50": median(actors_page.clone()),
                "actors_page_runs": actors_page,
            },
        })
    );
}
