//! The differential chaos run: a streaming job on an embedded cluster
//! (every subtask a worker process) counts a deterministic stream of
//! `(key, seq)` records into a transactional file sink while worker
//! processes are SIGKILLed; the committed output is then checked against
//! the failure-free reference.
//!
//! Run: `cargo run --release --example streaming_exactly_once -- --records 3000000 --kill-every-ms 800`
//!
//! The last stdout line is one JSON object:
//! `{"records":N,"keys":K,"kills":k,"checkpoints":c,"lost":0,"duplicated":0,"matches_reference":true,"events_per_s":...}`.
//! `lost` and `duplicated` are counted from the sink's committed files
//! (`--out DIR`, lines `key seq`), which anyone can check without this
//! program.

use anyhow::Context as _;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{Collector, EventTime, StateError};
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::{Source, SourcePoll};
use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Flags.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Records in the stream.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Distinct keys (Zipf-skewed).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Seed of the key sequence and of the choice of victims.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Source throttle, events per second over all sources (0: unthrottled).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Kill a random worker process this long after each (re)start (0: none).
    #[arg(long, default_value_t = 0)]
    kill_every_ms: u64,
    /// Checkpoint interval.
    #[arg(long, default_value_t = 500)]
    checkpoint_ms: u64,
    /// Subtasks per operator.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// Where the sink commits (default: a fresh temporary directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The key of record `i`: Zipf(1.1) over `keys`, from a seeded hash.
struct Keys {
    cdf: Vec<f64>,
    seed: u64,
}

impl Keys {
    fn new(keys: u64, seed: u64) -> Keys {
        let weights: Vec<f64> = (1..=keys.max(1))
            .map(|k| 1.0 / (k as f64).powf(1.1))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Keys { cdf, seed }
    }

    fn key(&self, i: u64) -> u64 {
        let u = (mix(self.seed ^ mix(i)) >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) as u64
    }
}

/// Subtask `s` of `p` emits the records whose key is `s` mod `p`, each
/// with its key's sequence number; its offset is the next index and the
/// per-key counters, so a replay produces exactly the same records.
struct ChaosSource {
    keys: Keys,
    records: u64,
    subtask: u64,
    parallelism: u64,
    next: u64,
    seqs: HashMap<u64, u64>,
}

impl Source for ChaosSource {
    type Out = (u64, u64);

    fn poll(&mut self, out: &mut dyn Collector<(u64, u64)>, max: usize) -> SourcePoll {
        let mut n = 0;
        while n < max && self.next < self.records {
            let key = self.keys.key(self.next);
            self.next += 1;
            if key % self.parallelism == self.subtask {
                let seq = self.seqs.entry(key).or_insert(0);
                *seq += 1;
                out.emit((key, *seq), None);
                n += 1;
            }
        }
        if n == 0 && self.next >= self.records {
            SourcePoll::Exhausted
        } else {
            SourcePoll::Emitted(n)
        }
    }

    fn offset(&self) -> Vec<u8> {
        let mut seqs: Vec<(u64, u64)> = self.seqs.iter().map(|(k, v)| (*k, *v)).collect();
        seqs.sort_unstable();
        serde_json::to_vec(&(self.next, seqs)).unwrap_or_default()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        let (next, seqs): (u64, Vec<(u64, u64)>) =
            serde_json::from_slice(offset).map_err(|e| StateError::Decode(e.to_string()))?;
        self.next = next;
        self.seqs = seqs.into_iter().collect();
        Ok(())
    }
}

/// Checks each key's sequence and keeps its running count.
#[derive(Default)]
struct CheckSeq;

impl KeyedProcessFunction<u64, (u64, u64)> for CheckSeq {
    type State = (u64, u64);
    type Out = String;

    fn process(
        &mut self,
        key: &u64,
        (_, seq): (u64, u64),
        _time: Option<EventTime>,
        state: &mut (u64, u64),
        ctx: &mut ProcessContext<'_, u64, String>,
    ) {
        let (last, count) = state;
        if seq != *last + 1 {
            tracing_line(&format!("key {key}: seq {seq} after {last}"));
        }
        *last = seq;
        *count += 1;
        ctx.emit(format!("{key} {seq}"), None);
    }
}

fn tracing_line(line: &str) {
    eprintln!("sequence check: {line}");
}

fn param<T: std::str::FromStr>(params: &JobParams, name: &str, default: T) -> T {
    params
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn chaos_job(params: &JobParams) -> StreamEnv {
    let records = param(params, "records", 0u64);
    let keys = param(params, "keys", 1u64);
    let seed = param(params, "seed", 0u64);
    let parallelism = param(params, "parallelism", 1usize);
    let out = PathBuf::from(params.get("out").cloned().unwrap_or_default());
    let env = StreamEnv::new(parallelism);
    env.source("records", move |s, p| ChaosSource {
        keys: Keys::new(keys, seed),
        records,
        subtask: s as u64,
        parallelism: p as u64,
        next: 0,
        seqs: HashMap::new(),
    })
    .key_by(|r: &(u64, u64)| r.0)
    .process(CheckSeq::default)
    .sink("committed", move |_| {
        TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
    });
    env
}

braid_actors::stream_job!(CHAOS, "streaming_exactly_once", chaos_job);

fn main() -> anyhow::Result<()> {
    braid_examples::init_logging();
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().join("out"));
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        anyhow::bail!("--out {} is not empty", out.display());
    }
    let rt = braid::init_blocking().context("start an embedded cluster")?;

    let mut params = JobParams::new();
    params.insert("records".into(), args.records.to_string());
    params.insert("keys".into(), args.keys.to_string());
    params.insert("seed".into(), args.seed.to_string());
    params.insert("parallelism".into(), args.parallelism.to_string());
    params.insert("out".into(), out.display().to_string());

    let kills = Arc::new(AtomicU32::new(0));
    let current = Arc::new(AtomicU64::new(0));
    let killers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let on_running: Option<braid_actors::stream::cluster::OnRunning> = if args.kill_every_ms > 0 {
        let (kills, current, killers) = (kills.clone(), current.clone(), killers.clone());
        let every = Duration::from_millis(args.kill_every_ms);
        let seed = args.seed;
        Some(Arc::new(move |generation: u64, pids: Vec<u32>| {
            current.store(generation, Ordering::SeqCst);
            if pids.is_empty() {
                return;
            }
            let victim = pids[(mix(seed ^ generation) % pids.len() as u64) as usize];
            let (kills, current) = (kills.clone(), current.clone());
            let killer = std::thread::spawn(move || {
                std::thread::sleep(every);
                if current.load(Ordering::SeqCst) != generation {
                    return;
                }
                if braid_examples::sigkill(victim).is_ok() {
                    kills.fetch_add(1, Ordering::SeqCst);
                    eprintln!("killed worker {victim} (generation {generation})");
                }
            });
            if let Ok(mut k) = killers.lock() {
                k.push(killer);
            }
        }))
    } else {
        None
    };

    let rate = (args.rate > 0.0).then(|| args.rate / args.parallelism.max(1) as f64);
    let job = ClusterJob {
        checkpoint_interval: Duration::from_millis(args.checkpoint_ms.max(1)),
        pace: SourcePace { batch: 512, rate },
        on_running,
        ..ClusterJob::new(
            "streaming_exactly_once",
            params,
            StorageSpec {
                dir: scratch.path().join("checkpoints"),
                job: "chaos".into(),
                retain: 3,
            },
        )
    };
    let started = Instant::now();
    let report = braid_actors::stream::cluster::run(&rt, job)?;
    let seconds = started.elapsed().as_secs_f64();
    current.store(u64::MAX, Ordering::SeqCst);
    for killer in killers
        .lock()
        .map(|mut k| std::mem::take(&mut *k))
        .unwrap_or_default()
    {
        let _ = killer.join();
    }

    let keys = Keys::new(args.keys, args.seed);
    let mut reference: HashMap<u64, u64> = HashMap::new();
    for i in 0..args.records {
        *reference.entry(keys.key(i)).or_insert(0) += 1;
    }
    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in committed_lines(&out)? {
        let mut parts = line.split_whitespace();
        let (Some(k), Some(s)) = (parts.next(), parts.next()) else {
            anyhow::bail!("malformed committed line {line:?}");
        };
        seen.entry(k.parse()?).or_default().push(s.parse()?);
    }
    let (mut lost, mut duplicated, mut unexpected) = (0u64, 0u64, 0u64);
    for (key, n) in &reference {
        let mut got = seen.remove(key).unwrap_or_default();
        got.sort_unstable();
        let before = got.len() as u64;
        got.dedup();
        duplicated += before - got.len() as u64;
        unexpected += got.iter().filter(|s| **s == 0 || **s > *n).count() as u64;
        lost += (1..=*n).filter(|s| got.binary_search(s).is_err()).count() as u64;
    }
    unexpected += seen.values().map(|v| v.len() as u64).sum::<u64>();
    let summary = serde_json::json!({
        "records": args.records,
        "keys": args.keys,
        "kills": kills.load(Ordering::SeqCst),
        "checkpoints": report.checkpoints,
        "failures": report.failures,
        "recovery_ms_max": report.recovery_ms.iter().max().copied().unwrap_or(0),
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "matches_reference": lost == 0 && duplicated == 0 && unexpected == 0,
        "events_per_s": args.records as f64 / seconds,
        "out": out.display().to_string(),
    });
    println!("{summary}");
    drop(rt);
    Ok(())
}
