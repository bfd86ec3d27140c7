//! The online-learning job end to end in one process: workers, shards,
//! serving and evaluation; BSP determinism and replay after a crash;
//! SSP's staleness bound; accuracy against Vowpal Wabbit.

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::{FaultPoint, JobConfig, JobError, JobReport};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::train::data::FeatureBatch;
use braid_actors::train::data::{fnv1a64, SyntheticConfig, SyntheticStream};
use braid_actors::train::eval::EvalFigures;
use braid_actors::train::model::LogisticLearner as Model;
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind, BIAS_KEY};
use braid_actors::train::pipeline::{self, FileReader, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::{Consistency, Crash, KeyPolicy, PsConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn ftrl() -> OptimizerKind {
    OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    })
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Run {
    report: JobReport,
    /// Serving's non-zero weights, by key.
    weights: Vec<(u64, u32)>,
    figures: EvalFigures,
    models: Vec<u64>,
    serving: u64,
    version: braid_actors::train::messages::ModelVersion,
}

fn run(config: PipelineConfig, rows: u64, checkpoint_ms: u64) -> Run {
    let mut job = JobConfig::new(CheckpointStorage::in_memory(&config.ps.name, 3));
    job.checkpoint_interval = Duration::from_millis(checkpoint_ms);
    job.restart = RestartStrategy::fixed(3, Duration::ZERO);
    run_with(config, rows, job).unwrap_or_else(|e| panic!("run: {e}"))
}

fn run_with(mut config: PipelineConfig, rows: u64, job: JobConfig) -> Result<Run, JobError> {
    config.rows = Some(rows);
    let ps = config.ps.clone();
    let env = StreamEnv::new(1);
    let handles = pipeline::build(&env, config, move || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows,
            bits: 18,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    })
    .unwrap_or_else(|e| panic!("build: {e}"));
    let report = local::run(&Plan::new(env.into_graph()), job)?;
    let models = (0..ps.shards)
        .map(|s| {
            handles
                .finals
                .get(s)
                .map_or(0, |m| fnv1a64(&m.0.to_bytes()))
        })
        .collect();
    let (version, mut serving): (_, Vec<(u64, u32)>) = handles.serving.read(|served| {
        let weights = (0..1u64 << 18)
            .chain([u64::MAX])
            .map(|k| (k, served.weight(k).to_bits()))
            .filter(|(_, w)| *w != 0)
            .collect();
        (served.version(), weights)
    });
    serving.sort_unstable();
    assert!(!serving.is_empty());
    let hash = fnv1a64(&bincode_like(&serving));
    Ok(Run {
        report,
        weights: serving,
        figures: handles.eval.figures(),
        models,
        serving: hash,
        version,
    })
}

fn bincode_like(pairs: &[(u64, u32)]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|(k, w)| k.to_le_bytes().into_iter().chain(w.to_le_bytes()))
        .collect()
}

fn config(name: &str, workers: usize, shards: usize, consistency: Consistency) -> PipelineConfig {
    let mut ps = PsConfig::new(&unique(name), workers, shards, ftrl());
    ps.consistency = consistency;
    let mut c = PipelineConfig::new(ps);
    c.batch_rows = 64;
    c
}

#[test]
fn every_row_is_trained_scored_and_served_once() {
    let r = run(config("all-rows", 2, 3, Consistency::Bsp), 30_000, 10_000);
    assert_eq!(r.figures.rows, 30_000);
    assert_eq!(r.version.records, 30_000);
    assert!(r.figures.auc > 0.6, "auc {}", r.figures.auc);
    assert!(r.models.iter().all(|m| *m != 0));
    assert_eq!(r.report.failures, 0);
}

#[test]
fn bsp_is_deterministic_and_replays_a_crash_bitwise() {
    let clean_a = run(config("bsp-a", 2, 2, Consistency::Bsp), 20_000, 10_000);
    let clean_b = run(config("bsp-b", 2, 2, Consistency::Bsp), 20_000, 10_000);
    assert_eq!(clean_a.models, clean_b.models, "two BSP runs differ");
    assert_eq!(clean_a.serving, clean_b.serving);

    assert_crashes_replay(2, 2, [Crash::Worker(1, 120), Crash::Shard(0, 90)], &clean_a);
}

/// Each crash, in a BSP job of `workers` × `shards` over the stream
/// `clean` trained, recovers from a checkpoint and ends bitwise as `clean`.
fn assert_crashes_replay(workers: usize, shards: usize, crashes: [Crash; 2], clean: &Run) {
    for crash in crashes {
        let mut c = config("bsp-crash", workers, shards, Consistency::Bsp);
        c.ps.crash = Some(crash);
        c.rate = Some(40_000.0);
        let crashed = run(c, 20_000, 50);
        assert_eq!(crashed.report.failures, 1, "{crash:?}");
        assert!(
            crashed.report.restored_from.iter().any(|e| *e > 0),
            "{crash:?}: the crash came before any checkpoint: {:?}",
            crashed.report
        );
        assert_eq!(crashed.models, clean.models, "{crash:?}: replay differs");
        assert_eq!(crashed.serving, clean.serving, "{crash:?}");
        assert_eq!(crashed.figures.rows, 20_000);
        assert_eq!(
            crashed.figures.logloss.to_bits(),
            clean.figures.logloss.to_bits()
        );
    }
}

/// The synthetic stream `run` trains on, learned row by row by one
/// in-process [`Model`]: its non-zero weights, as `run` reports serving's.
fn learned_alone(rows: u64) -> Vec<(u64, u32)> {
    let stream = SyntheticStream::new(SyntheticConfig {
        rows,
        bits: 18,
        ..SyntheticConfig::default()
    })
    .unwrap_or_else(|e| panic!("stream: {e}"));
    let mut reader = SyntheticReader(stream);
    let mut model = Model::new(ftrl()).unwrap_or_else(|e| panic!("model: {e}"));
    let mut batch = FeatureBatch::new();
    loop {
        batch.clear();
        let n = reader
            .read(&mut batch, 1000)
            .unwrap_or_else(|e| panic!("read: {e}"));
        if n == 0 {
            break;
        }
        for (label, ids, values) in batch.iter() {
            model
                .learn(ids, values, label)
                .unwrap_or_else(|e| panic!("learn: {e}"));
        }
    }
    (0..1u64 << 18)
        .chain([BIAS_KEY])
        .map(|k| (k, model.weight(k).to_bits()))
        .filter(|(_, w)| *w != 0)
        .collect()
}

#[test]
fn a_chained_worker_trains_as_one_model_and_replays_a_crash_bitwise() {
    // One worker chains its two shards: rows train in place, one by one.
    let clean = run(config("chained", 1, 2, Consistency::Bsp), 20_000, 10_000);
    assert_eq!(clean.figures.rows, 20_000);
    assert_eq!(clean.version.records, 20_000);
    assert_eq!(
        clean.weights,
        learned_alone(20_000),
        "the sharded, chained job and one Model::learn loop differ"
    );
    assert_crashes_replay(1, 2, [Crash::Worker(0, 120), Crash::Shard(1, 90)], &clean);
}

#[test]
fn a_job_resumed_past_a_corrupt_newest_checkpoint_trains_the_same_model() {
    let clean = run(config("corrupt", 1, 2, Consistency::Bsp), 20_000, 10_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = config("corrupt", 1, 2, Consistency::Bsp);
    c.rate = Some(300.0);
    let name = c.ps.name.clone();
    let job = |crash_at: Option<u64>| {
        let storage =
            CheckpointStorage::local(dir.path(), &name, 3).unwrap_or_else(|e| panic!("{e}"));
        let mut job = JobConfig::new(storage);
        job.checkpoint_interval = Duration::from_millis(40);
        job.restart = RestartStrategy::NoRestart;
        if let Some(at) = crash_at {
            job.faults = Some(std::sync::Arc::new(move |p| {
                p == FaultPoint::BeforeBarrier(at)
            }));
        }
        job
    };
    // The job's process dies before checkpoint 6; checkpoint 5, the
    // newest, then has 8 bytes of its largest state blob flipped.
    let crashed = run_with(c.clone(), 20_000, job(Some(6)));
    assert!(crashed.is_err(), "the first run crashes");
    let state = dir
        .path()
        .join(&name)
        .join(format!("chk-{:020}", 5))
        .join("state");
    let blob = std::fs::read_dir(&state)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .unwrap_or_else(|| panic!("no state in {}", state.display()));
    let mut bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("{e}"));
    let at = bytes.len() / 2;
    for b in &mut bytes[at..at + 8] {
        *b ^= 0x5a;
    }
    std::fs::write(&blob, bytes).unwrap_or_else(|e| panic!("{e}"));

    c.rate = None;
    let resumed = run_with(c, 20_000, job(None)).unwrap_or_else(|e| panic!("resume: {e}"));
    assert_eq!(resumed.report.resumed_from, Some(4), "{:?}", resumed.report);
    assert_eq!(resumed.report.republished_epochs, vec![5]);
    assert_eq!(
        resumed.models, clean.models,
        "BSP resumes to the same model"
    );
    assert_eq!(resumed.serving, clean.serving);
}

#[test]
fn a_chained_worker_under_min_count_pushes_what_an_unchained_one_does() {
    let with = |chain: bool| {
        let mut c = config("min-count", 1, 2, Consistency::Bsp);
        c.ps.policy = KeyPolicy::MinCount(2);
        c.ps.chain = chain;
        run(c, 10_000, 10_000)
    };
    let (chained, apart) = (with(true), with(false));
    assert_eq!(chained.figures.rows, 10_000);
    assert_eq!(chained.weights, apart.weights);
    assert_eq!(
        chained.figures.logloss.to_bits(),
        apart.figures.logloss.to_bits()
    );
}

#[test]
fn ssp_never_exceeds_its_bound_and_asp_trains_everything() {
    for tau in [0u64, 2] {
        let mut c = config("ssp", 3, 2, Consistency::Ssp(tau));
        c.ps.refresh_rows = 256;
        let r = run(c, 30_000, 10_000);
        assert_eq!(r.figures.rows, 30_000);
        assert!(
            r.figures.max_staleness <= tau,
            "τ={tau}: {}",
            r.figures.max_staleness
        );
        assert_eq!(r.version.records, 30_000);
    }
    let r = run(config("asp", 3, 2, Consistency::Asp), 30_000, 10_000);
    assert_eq!(r.figures.rows, 30_000);
    assert_eq!(r.version.records, 30_000);
}

/// Progressive logloss of VW 9.x `--ftrl --ftrl_alpha 0.1 --ftrl_beta 1
/// --l1 0 --l2 0 -b 22 --loss_function logistic` on
/// `tests/data/ctr_10k.txt`, from `shared/bench/vw_ftrl.sh` (the same
/// figure `train_optimizer.rs` checks the single-process learner against).
const VW_LOGLOSS_CTR_10K: f64 = 0.36341;

#[test]
fn one_worker_one_shard_matches_vw_on_the_committed_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ctr_10k.txt");
    let mut ps = PsConfig::new(&unique("vw"), 1, 1, ftrl());
    ps.consistency = Consistency::Bsp;
    // The demo's micro-batches: the chained worker trains row by row.
    let c = PipelineConfig::new(ps.clone());
    let env = StreamEnv::new(1);
    let handles = pipeline::build(&env, c, move || {
        Ok(Box::new(FileReader::gen_ctr(&path, 22)?) as Box<dyn RowReader>)
    })
    .unwrap_or_else(|e| panic!("build: {e}"));
    let job = JobConfig::new(CheckpointStorage::in_memory(&ps.name, 2));
    local::run(&Plan::new(env.into_graph()), job).unwrap_or_else(|e| panic!("run: {e}"));
    let f = handles.eval.figures();
    assert_eq!(f.rows, 10_000);
    assert!(
        (f.logloss - VW_LOGLOSS_CTR_10K).abs() <= 0.002,
        "logloss {} vs VW {VW_LOGLOSS_CTR_10K}",
        f.logloss
    );
}
