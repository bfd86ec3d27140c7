//! The differential chaos run: a streaming job on an embedded cluster
//! (every subtask a worker process) counts a deterministic stream of
//! `(key, seq)` records into a transactional file sink while faults are
//! dealt from outside (SIGKILL or SIGSTOP of a worker, the sink's pending
//! directory replaced by a file, the sink's directory remounted
//! read-only); the committed output is then checked against the
//! failure-free reference. The keyed records cross processes as Arrow
//! record batches in the store (`.columnar()`).
//!
//! Run: `cargo run --release --example streaming_exactly_once -- --records 3000000 --kill-every-ms 800`
//!
//! A soak run, one fault per attempt from a seeded schedule, 20 runs:
//! `... -- --kill-every-ms 400 --faults kill,stop,sink-dir,read-only,corrupt --runs 20`
//! (`read-only` needs root).
//!
//! Each run prints one JSON object:
//! `{"records":N,"keys":K,"seed":S,"faults":{..},"checkpoints":c,"edges":[..],"lost":0,"duplicated":0,"matches_reference":true,"events_per_s":...}`;
//! with `--runs` the last stdout line sums them up. `lost` and
//! `duplicated` are counted from the sink's committed files (`--out DIR`,
//! lines `key seq`), which anyone can check without this program. The
//! exit status is non-zero when any run's output differs.

use anyhow::Context as _;
use braid_actors::stream::cluster::{ClusterJob, JobParams, StorageSpec};
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{Collector, EventTime, OperatorError, StateError};
use braid_actors::stream::runner::SourcePace;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::{Source, SourcePoll};
use clap::Parser;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Deal a fault this long after each (re)start (0: none).
    #[arg(long, default_value_t = 0)]
    kill_every_ms: u64,
    /// The faults to deal, one per attempt, chosen from the seed:
    /// `kill` (SIGKILL a worker), `stop` (SIGSTOP a worker for
    /// --fault-ms), `sink-dir` (the sink's .pending directory replaced by a
    /// file for --fault-ms), `read-only` (the sink's directory remounted
    /// read-only for --fault-ms; needs root), `corrupt` (8 bytes of the
    /// newest checkpoint flipped, then a worker SIGKILLed; once a run).
    #[arg(long, value_delimiter = ',', default_value = "kill")]
    faults: Vec<FaultKind>,
    /// How long a `stop`, `sink-dir` or `read-only` fault lasts.
    #[arg(long, default_value_t = 300)]
    fault_ms: u64,
    /// Run the job this many times, at seeds `seed`, `seed + 1`, ...; the
    /// last stdout line sums them up (a soak run).
    #[arg(long, default_value_t = 1)]
    runs: u64,
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

/// A fault the chaos run deals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FaultKind {
    /// SIGKILL a worker process.
    Kill,
    /// SIGSTOP a worker process, then SIGCONT it.
    Stop,
    /// Swap the sink's `.pending` directory for a file, then back.
    SinkDir,
    /// Remount the sink's directory read-only, then unmount it.
    ReadOnly,
    /// Flip 8 bytes of the newest committed checkpoint's largest state
    /// blob, then SIGKILL a worker: the restart falls back past it.
    Corrupt,
}

/// Deals `fault` to worker `victim`, to the sink's directory `out` or to
/// the checkpoints under `checkpoints`, holding it for `hold`.
fn deal(
    fault: FaultKind,
    victim: u32,
    out: &Path,
    checkpoints: &Path,
    hold: Duration,
) -> anyhow::Result<()> {
    match fault {
        FaultKind::Corrupt => {
            let committed = || {
                std::fs::read_dir(checkpoints)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("_COMMITTED").exists())
                    .max()
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let newest = loop {
                match committed() {
                    Some(newest) => break newest,
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    None => anyhow::bail!("no checkpoint was committed within 10 s"),
                }
            };
            let blob = std::fs::read_dir(newest.join("state"))?
                .flatten()
                .map(|e| e.path())
                .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                .ok_or_else(|| anyhow::anyhow!("no state in {}", newest.display()))?;
            let mut bytes = std::fs::read(&blob)?;
            let at = bytes.len() / 2;
            let end = (at + 8).min(bytes.len());
            bytes[at..end].iter_mut().for_each(|b| *b ^= 0xa5);
            std::fs::write(&blob, bytes)?;
            braid_examples::sigkill(victim)?;
        }
        FaultKind::Kill => braid_examples::sigkill(victim)?,
        FaultKind::Stop => {
            let pid = rustix::process::Pid::from_raw(victim as i32)
                .ok_or_else(|| anyhow::anyhow!("bad pid {victim}"))?;
            rustix::process::kill_process(pid, rustix::process::Signal::STOP)?;
            std::thread::sleep(hold);
            rustix::process::kill_process(pid, rustix::process::Signal::CONT)?;
        }
        FaultKind::SinkDir => {
            let (pending, file) = (out.join(".pending"), out.join(".pending-fault"));
            std::fs::write(&file, b"not a directory")?;
            let swap = || {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &pending,
                    rustix::fs::CWD,
                    &file,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
            };
            swap()?;
            std::thread::sleep(hold);
            swap()?;
            std::fs::remove_file(&file)?;
        }
        FaultKind::ReadOnly => {
            let dir = out.to_string_lossy().into_owned();
            let mount = |args: &[&str]| -> anyhow::Result<()> {
                let status = std::process::Command::new("mount").args(args).status()?;
                anyhow::ensure!(status.success(), "mount {args:?}: {status}");
                Ok(())
            };
            mount(&["--bind", &dir, &dir])?;
            let remounted = mount(&["-o", "remount,bind,ro", &dir, &dir]);
            if remounted.is_ok() {
                std::thread::sleep(hold);
            }
            let status = std::process::Command::new("umount").arg(&dir).status()?;
            anyhow::ensure!(status.success(), "umount {dir}: {status}");
            remounted?;
        }
    }
    Ok(())
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

    fn poll(
        &mut self,
        out: &mut dyn Collector<(u64, u64)>,
        max: usize,
    ) -> Result<SourcePoll, OperatorError> {
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
        Ok(if n == 0 && self.next >= self.records {
            SourcePoll::Exhausted
        } else {
            SourcePoll::Emitted(n)
        })
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
    .columnar()
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
    if args.faults.contains(&FaultKind::ReadOnly) && !rustix::process::geteuid().is_root() {
        anyhow::bail!("--faults read-only remounts the sink's directory: it needs root");
    }
    let rt = braid::init_blocking().context("start an embedded cluster")?;
    let mut totals = serde_json::Map::new();
    let (mut all_match, mut lost, mut duplicated) = (true, 0u64, 0u64);
    for run in 0..args.runs.max(1) {
        let mut args = args.clone();
        args.seed = args.seed.wrapping_add(run);
        if args.runs > 1 {
            args.out = args.out.as_ref().map(|o| o.join(format!("run-{run}")));
        }
        let summary = run_once(&rt, &args)?;
        all_match &= summary["matches_reference"] == true;
        lost += summary["lost"].as_u64().unwrap_or(0);
        duplicated += summary["duplicated"].as_u64().unwrap_or(0);
        if let Some(dealt) = summary["faults"].as_object() {
            for (kind, n) in dealt {
                let total = totals.get(kind).and_then(|t| t.as_u64()).unwrap_or(0);
                totals.insert(kind.clone(), (total + n.as_u64().unwrap_or(0)).into());
            }
        }
        println!("{summary}");
    }
    if args.runs > 1 {
        println!(
            "{}",
            serde_json::json!({
                "runs": args.runs,
                "first_seed": args.seed,
                "all_match_reference": all_match,
                "lost": lost,
                "duplicated": duplicated,
                "faults": totals,
            })
        );
    }
    drop(rt);
    anyhow::ensure!(all_match, "the committed output differs from the reference");
    Ok(())
}

/// Runs the job once at `args.seed`, dealing faults, and compares its
/// committed output with the reference.
fn run_once(rt: &braid::Runtime, args: &Args) -> anyhow::Result<serde_json::Value> {
    // Removed by the node however this driver exits.
    let scratch = tempfile::tempdir_in(rt.scratch_dir()?)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().join("out"));
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        anyhow::bail!("--out {} is not empty", out.display());
    }

    let mut params = JobParams::new();
    params.insert("records".into(), args.records.to_string());
    params.insert("keys".into(), args.keys.to_string());
    params.insert("seed".into(), args.seed.to_string());
    params.insert("parallelism".into(), args.parallelism.to_string());
    params.insert("out".into(), out.display().to_string());

    let dealt: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let current = Arc::new(AtomicU64::new(0));
    let killers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let on_running: Option<braid_actors::stream::cluster::OnRunning> = if args.kill_every_ms > 0
        && !args.faults.is_empty()
    {
        let (dealt, current, killers) = (dealt.clone(), current.clone(), killers.clone());
        let every = Duration::from_millis(args.kill_every_ms);
        let hold = Duration::from_millis(args.fault_ms);
        let (seed, faults, out) = (args.seed, args.faults.clone(), out.clone());
        let checkpoints = scratch.path().join("checkpoints").join("chaos");
        let corrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        Some(Arc::new(move |generation: u64, pids: Vec<u32>| {
            current.store(generation, Ordering::SeqCst);
            if pids.is_empty() {
                return;
            }
            let roll = mix(seed ^ generation);
            let victim = pids[(roll % pids.len() as u64) as usize];
            let fault = faults[((roll >> 32) % faults.len() as u64) as usize];
            // Corrupting the newest checkpoint on every attempt would undo
            // each attempt's progress: it is dealt once a run.
            if fault == FaultKind::Corrupt && corrupted.swap(true, Ordering::SeqCst) {
                return;
            }
            let (dealt, current, out, checkpoints) = (
                dealt.clone(),
                current.clone(),
                out.clone(),
                checkpoints.clone(),
            );
            let killer = std::thread::spawn(move || {
                std::thread::sleep(every);
                if current.load(Ordering::SeqCst) != generation {
                    return;
                }
                match deal(fault, victim, &out, &checkpoints, hold) {
                    Ok(()) => {
                        if let Ok(mut d) = dealt.lock() {
                            *d.entry(format!("{fault:?}").to_lowercase()).or_insert(0) += 1;
                        }
                        eprintln!("dealt {fault:?} to worker {victim} (generation {generation})");
                    }
                    Err(e) => eprintln!("could not deal {fault:?}: {e}"),
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
    let report = braid_actors::stream::cluster::run(rt, job);
    let seconds = started.elapsed().as_secs_f64();
    current.store(u64::MAX, Ordering::SeqCst);
    for killer in killers
        .lock()
        .map(|mut k| std::mem::take(&mut *k))
        .unwrap_or_default()
    {
        let _ = killer.join();
    }
    let report = report?;
    let dealt: HashMap<String, u64> = dealt.lock().map(|d| d.clone()).unwrap_or_default();

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
        "seed": args.seed,
        "kills": dealt.get("kill").copied().unwrap_or(0),
        "faults": dealt,
        "checkpoints": report.checkpoints,
        "failures": report.failures,
        "republished_epochs": report.republished_epochs,
        "recovery_ms_max": report.recovery_ms.iter().max().copied().unwrap_or(0),
        "edges": report.edges,
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "matches_reference": lost == 0 && duplicated == 0 && unexpected == 0,
        "events_per_s": args.records as f64 / seconds,
        "out": out.display().to_string(),
    });
    Ok(summary)
}
