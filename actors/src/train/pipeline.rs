//! The online-learning job: a replayable source of training micro-batches
//! → training workers → parameter-server shards → serving, with the
//! workers' predictions going to progressive evaluation.
//!
//! ```text
//! source ──seq mod W──▶ worker ×W ──push by shard──▶ shard ×S ──delta──▶ serving
//!                          │  ▲ pull (in place)        │
//!                          │  └────────────────────────┘
//!                          └──predictions──▶ eval
//! ```
//!
//! With one worker and [`PsConfig::chain`], the shards and serving run
//! inside the worker's subtask: `source ──▶ [worker+shards ─delta─▶ serving]`.
//!
//! ```
//! use braid_actors::stream::{coordinator::JobConfig, graph::StreamEnv, local, plan::Plan};
//! use braid_actors::checkpoint::storage::CheckpointStorage;
//! use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
//! use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
//! use braid_actors::train::pipeline::{self, PipelineConfig, SyntheticReader};
//! use braid_actors::train::ps::PsConfig;
//!
//! let ftrl = OptimizerKind::Ftrl(FtrlParams { alpha: 0.1, beta: 1.0, l1: 0.0, l2: 0.0 });
//! let ps = PsConfig::new("doc-job", 2, 2, ftrl);
//! let config = PipelineConfig::new(ps.clone());
//! let env = StreamEnv::new(1);
//! let handles = pipeline::build(&env, config, || {
//!     let stream = SyntheticStream::new(SyntheticConfig { rows: 20_000, ..Default::default() })?;
//!     Ok(Box::new(SyntheticReader(stream)) as Box<dyn pipeline::RowReader>)
//! })?;
//! let report = local::run(
//!     &Plan::new(env.into_graph()),
//!     JobConfig::new(CheckpointStorage::in_memory("doc-job", 2)),
//! )?;
//! assert_eq!(handles.serving.version().records, 20_000);
//! // The evaluation's final figures come back in the report too.
//! let figures = braid_actors::train::eval::final_figures(&report, "doc-job").unwrap()?;
//! assert_eq!(figures.rows, 20_000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::data::{
    CriteoConfig, CriteoParser, DataError, FeatureBatch, GenCtrParser, ParseStats, SyntheticStream,
};
use super::eval::{EvalHandle, EvalSink};
use super::messages::TrainBatch;
use super::model::{LogisticRegression, Model};
use super::ps::{Consistency, PsConfig};
use super::serving::{Serving, ServingSink};
use super::shard::FinalModels;
use super::shard::ShardOperator;
use super::worker::TrainWorker;
use crate::stream::graph::StreamEnv;
use crate::stream::operator::{decode_state, Collector, OperatorError, StateError};
use crate::stream::source::{Source, SourcePoll};
use braid::store::codec;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

/// Rows from an input, with a position to resume from.
pub trait RowReader: Send + 'static {
    /// Appends up to `max_rows` rows to `batch`; 0 at the end.
    fn read(&mut self, batch: &mut FeatureBatch, max_rows: usize) -> Result<usize, DataError>;
    /// The position after the last row read.
    fn offset(&self) -> Vec<u8>;
    /// Continues from a position [`RowReader::offset`] returned.
    fn seek(&mut self, offset: &[u8]) -> Result<(), DataError>;
    /// Malformed lines skipped so far.
    fn skipped(&self) -> u64 {
        0
    }
}

/// The built-in synthetic click stream as a [`RowReader`].
pub struct SyntheticReader(pub SyntheticStream);

impl RowReader for SyntheticReader {
    fn read(&mut self, batch: &mut FeatureBatch, max_rows: usize) -> Result<usize, DataError> {
        Ok(self.0.fill(batch, max_rows))
    }

    fn offset(&self) -> Vec<u8> {
        self.0.position().to_le_bytes().to_vec()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), DataError> {
        let bytes: [u8; 8] = offset
            .try_into()
            .map_err(|_| DataError::Io(std::io::Error::other("bad synthetic offset")))?;
        self.0.seek(u64::from_le_bytes(bytes))
    }
}

/// A text file's parser, for [`FileReader`].
pub enum LineFormat {
    /// `label id id …` lines (`shared/data/gen_ctr.py`).
    GenCtr(GenCtrParser),
    /// Criteo TSV.
    Criteo(CriteoParser),
}

impl LineFormat {
    fn read<R: BufRead>(
        &mut self,
        r: &mut R,
        batch: &mut FeatureBatch,
        max: usize,
    ) -> Result<ParseStats, DataError> {
        match self {
            LineFormat::GenCtr(p) => p.read_batch(r, batch, max),
            LineFormat::Criteo(p) => p.read_batch(r, batch, max),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            LineFormat::GenCtr(p) => p.bytes(),
            LineFormat::Criteo(p) => p.bytes(),
        }
    }

    fn skipped(&self) -> u64 {
        match self {
            LineFormat::GenCtr(p) => p.skipped(),
            LineFormat::Criteo(p) => p.skipped(),
        }
    }

    fn fresh(&self, bits: u32) -> Result<LineFormat, DataError> {
        Ok(match self {
            LineFormat::GenCtr(_) => LineFormat::GenCtr(GenCtrParser::with_bits(bits)?),
            LineFormat::Criteo(_) => LineFormat::Criteo(CriteoParser::new(CriteoConfig {
                bits,
                ..CriteoConfig::default()
            })?),
        })
    }
}

/// A gen_ctr or Criteo file as a [`RowReader`]; its offset is the byte
/// offset after the last line read.
pub struct FileReader {
    path: PathBuf,
    bits: u32,
    reader: BufReader<std::fs::File>,
    format: LineFormat,
    base: u64,
    skipped_before: u64,
}

impl FileReader {
    /// Reads a gen_ctr file, skipping ids not below `2^bits`.
    pub fn gen_ctr(path: impl Into<PathBuf>, bits: u32) -> Result<Self, DataError> {
        Self::open(
            path.into(),
            bits,
            LineFormat::GenCtr(GenCtrParser::with_bits(bits)?),
        )
    }

    /// Reads a Criteo TSV file, hashing features into `2^bits` buckets.
    pub fn criteo(path: impl Into<PathBuf>, bits: u32) -> Result<Self, DataError> {
        let format = LineFormat::Criteo(CriteoParser::new(CriteoConfig {
            bits,
            ..CriteoConfig::default()
        })?);
        Self::open(path.into(), bits, format)
    }

    fn open(path: PathBuf, bits: u32, format: LineFormat) -> Result<Self, DataError> {
        let file = std::fs::File::open(&path).map_err(DataError::Io)?;
        Ok(Self {
            path,
            bits,
            reader: BufReader::with_capacity(1 << 20, file),
            format,
            base: 0,
            skipped_before: 0,
        })
    }
}

impl RowReader for FileReader {
    fn read(&mut self, batch: &mut FeatureBatch, max_rows: usize) -> Result<usize, DataError> {
        let before = batch.rows();
        self.format.read(&mut self.reader, batch, max_rows)?;
        Ok(batch.rows() - before)
    }

    fn offset(&self) -> Vec<u8> {
        let mut out = (self.base + self.format.bytes()).to_le_bytes().to_vec();
        out.extend_from_slice(&self.skipped().to_le_bytes());
        out
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), DataError> {
        let bad = || DataError::Io(std::io::Error::other("bad file offset"));
        if offset.len() != 16 {
            return Err(bad());
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&offset[..8]);
        let at = u64::from_le_bytes(word);
        word.copy_from_slice(&offset[8..]);
        let skipped = u64::from_le_bytes(word);
        let mut file = std::fs::File::open(&self.path).map_err(DataError::Io)?;
        file.seek(SeekFrom::Start(at)).map_err(DataError::Io)?;
        self.reader = BufReader::with_capacity(1 << 20, file);
        self.format = self.format.fresh(self.bits)?;
        self.base = at;
        self.skipped_before = skipped;
        Ok(())
    }

    fn skipped(&self) -> u64 {
        self.skipped_before + self.format.skipped()
    }
}

/// Makes the reader of a source (called again on every recovery).
pub type MakeReader = Arc<dyn Fn() -> Result<Box<dyn RowReader>, DataError> + Send + Sync>;

/// The source of training micro-batches: per poll, one round of one batch
/// per worker (so that in BSP mode every step has a batch for every
/// worker, and a barrier always falls between rounds).
pub struct TrainSource {
    reader: Result<Box<dyn RowReader>, String>,
    workers: usize,
    batch_rows: usize,
    rows_left: u64,
    rate: Option<f64>,
    started: Instant,
    sent_since_start: u64,
    last_emit: Instant,
    seq: u64,
    rows: u64,
    pad_rounds: bool,
    skipped: Arc<AtomicU64>,
    name: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SourceOffset {
    reader: Vec<u8>,
    seq: u64,
    rows: u64,
}

impl TrainSource {
    fn new(
        reader: Result<Box<dyn RowReader>, String>,
        config: &PipelineConfig,
        skipped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            reader,
            workers: config.ps.workers,
            batch_rows: config.batch_rows.max(1),
            rows_left: config.rows.unwrap_or(u64::MAX),
            rate: config.rate.filter(|r| *r > 0.0),
            started: Instant::now(),
            sent_since_start: 0,
            last_emit: Instant::now(),
            seq: 0,
            rows: 0,
            pad_rounds: config.ps.consistency == Consistency::Bsp,
            skipped,
            name: config.ps.name.clone(),
        }
    }
}

impl TrainSource {
    fn exhausted(&mut self) -> SourcePoll {
        let skipped = self.skipped.load(Ordering::Relaxed);
        if let Err(e) = crate::stream::results::set(&skipped_result(&self.name), &skipped) {
            tracing::warn!("the training source cannot report its skipped lines: {e}");
        }
        SourcePoll::Exhausted
    }
}

/// The result name of the malformed input lines job `name`'s source
/// skipped (a `u64` in the job's report, [`crate::stream::results`]).
pub fn skipped_result(name: &str) -> String {
    format!("{name}/skipped")
}

impl Source for TrainSource {
    type Out = TrainBatch;

    fn poll(
        &mut self,
        out: &mut dyn Collector<TrainBatch>,
        _max: usize,
    ) -> Result<SourcePoll, OperatorError> {
        let reader = match &mut self.reader {
            Ok(r) => r,
            Err(e) => {
                return Err(OperatorError::Failed(format!(
                    "the training source cannot open its input: {e}"
                )))
            }
        };
        let round = (self.batch_rows * self.workers) as u64;
        let mut allowance = round;
        if let Some(rate) = self.rate {
            let due = (self.started.elapsed().as_secs_f64() * rate) as u64;
            allowance = allowance.min(due.saturating_sub(self.sent_since_start));
            // BSP keeps its batches whole (deterministic boundaries): it
            // waits for a full round, or the end of the input. The others
            // wait for one up to PARTIAL_ROUND_WAIT: polled often, a
            // throttled source would otherwise cut a round into slivers
            // of a few rows, each a step of its own.
            let partial = allowance < round.min(self.rows_left);
            let waited = self.last_emit.elapsed() >= PARTIAL_ROUND_WAIT;
            if allowance == 0 || (partial && (self.pad_rounds || !waited)) {
                return Ok(SourcePoll::Idle);
            }
        }
        allowance = allowance.min(self.rows_left);
        if allowance == 0 {
            return Ok(self.exhausted());
        }
        let per_worker = (allowance as usize).div_ceil(self.workers).max(1);
        let mut round = Vec::with_capacity(self.workers);
        let mut total = 0;
        for _ in 0..self.workers {
            let want = per_worker.min((allowance - total) as usize);
            let mut batch = FeatureBatch::with_capacity(want, want * 40);
            let ingest_ns = super::metrics::now_ns();
            let got = if want == 0 {
                0
            } else {
                reader.read(&mut batch, want).map_err(|e| {
                    OperatorError::Failed(format!("the training source cannot read its input: {e}"))
                })?
            };
            total += got as u64;
            round.push((batch, ingest_ns));
        }
        self.skipped.store(reader.skipped(), Ordering::Relaxed);
        if total == 0 {
            self.rows_left = 0;
            return Ok(self.exhausted());
        }
        let mut emitted = 0;
        for (batch, ingest_ns) in round {
            if batch.is_empty() && !self.pad_rounds {
                continue;
            }
            let rows = batch.rows() as u64;
            out.emit(
                TrainBatch {
                    seq: self.seq,
                    first_row: self.rows,
                    ingest_ns,
                    batch: batch.into(),
                },
                None,
            );
            self.seq += 1;
            self.rows += rows;
            emitted += 1;
        }
        self.rows_left -= total;
        self.sent_since_start += total;
        self.last_emit = Instant::now();
        Ok(SourcePoll::Emitted(emitted))
    }

    fn offset(&self) -> Vec<u8> {
        let reader = match &self.reader {
            Ok(r) => r.offset(),
            Err(_) => Vec::new(),
        };
        codec::encode(&SourceOffset {
            reader,
            seq: self.seq,
            rows: self.rows,
        })
        .unwrap_or_default()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        let o: SourceOffset = decode_state(offset)?;
        let reader = self
            .reader
            .as_mut()
            .map_err(|e| StateError::Decode(e.clone()))?;
        reader
            .seek(&o.reader)
            .map_err(|e| StateError::Decode(e.to_string()))?;
        self.rows_left = self.rows_left.saturating_sub(o.rows);
        self.seq = o.seq;
        self.rows = o.rows;
        Ok(())
    }
}

/// How the job is put together.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The parameter server (workers, shards, optimizer, consistency).
    pub ps: PsConfig,
    /// Most rows per worker per micro-batch.
    pub batch_rows: usize,
    /// Rows of the evaluation's sliding window.
    pub window: usize,
    /// Stop after this many rows.
    pub rows: Option<u64>,
    /// Rows per second the source reads at most.
    pub rate: Option<f64>,
    /// A file for every row's prediction, opened by the evaluation's
    /// subtask wherever it runs (another process, on the cluster runner),
    /// as [`EvalHandle::resume_predictions`] does: a recovery cuts it back
    /// to the restored checkpoint's rows.
    pub predictions: Option<std::path::PathBuf>,
}

impl PipelineConfig {
    /// Defaults: 256-row micro-batches, a 10,000-row window, no limits.
    pub fn new(ps: PsConfig) -> Self {
        Self {
            ps,
            batch_rows: 256,
            window: 10_000,
            rows: None,
            rate: None,
            predictions: None,
        }
    }
}

/// Why the job cannot be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The optimizer's hyper-parameters are out of range.
    #[error(transparent)]
    Params(#[from] super::optimizer::ParamsError),
    /// BSP needs serving refreshes by rows only (time-based ones would
    /// publish different versions on different shards).
    #[error("BSP refreshes serving by rows only: set refresh_ms to 0")]
    TimedRefreshUnderBsp,
}

/// How long a throttled source under ASP or SSP waits for a full round
/// of micro-batches before it sends what is due.
const PARTIAL_ROUND_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Micro-batches' predictions per message to evaluation, which no answer
/// waits for: fewer messages wake its thread less often.
const SCORED_PER_MESSAGE: usize = 64;

/// What the job's operators share with the code that built it, in the
/// builder's process: on the local runner every subtask's, on the cluster
/// runner those this process hosts (other processes read a running job
/// through [`super::client::JobClient`], and a finished one through its
/// report's results). Handed to the operators as they are made, and the
/// same across the job's recoveries in the process.
pub struct JobHandles<M: Model = LogisticRegression> {
    /// The serving model.
    pub serving: Arc<Serving<M>>,
    /// The evaluation's figures and predictions file.
    pub eval: Arc<EvalHandle>,
    /// The shards' models when their input ended.
    pub finals: Arc<FinalModels<M>>,
    /// Malformed input lines the source skipped so far (counted again
    /// after a recovery's seek: the count after the checkpoint's offset).
    pub skipped: Arc<AtomicU64>,
}

impl<M: Model> Clone for JobHandles<M> {
    fn clone(&self) -> Self {
        Self {
            serving: self.serving.clone(),
            eval: self.eval.clone(),
            finals: self.finals.clone(),
            skipped: self.skipped.clone(),
        }
    }
}

/// Adds the online-learning job to `env`, training logistic regression
/// with `config.ps.optimizer` on rows from `reader()`; returns the handles
/// its operators share with the caller.
pub fn build(
    env: &StreamEnv,
    config: PipelineConfig,
    reader: impl Fn() -> Result<Box<dyn RowReader>, DataError> + Send + Sync + 'static,
) -> Result<JobHandles, BuildError> {
    let model = LogisticRegression::new(config.ps.optimizer)?;
    build_model(env, config, model, reader)
}

/// [`build`] for any [`Model`]: workers, shards and serving are generic
/// over it (`config.ps.optimizer` is logistic regression's, and unused
/// here).
pub fn build_model<M: Model>(
    env: &StreamEnv,
    config: PipelineConfig,
    model: M,
    reader: impl Fn() -> Result<Box<dyn RowReader>, DataError> + Send + Sync + 'static,
) -> Result<JobHandles<M>, BuildError> {
    model.validate()?;
    if config.ps.consistency == Consistency::Bsp && config.ps.refresh_ms > 0 {
        return Err(BuildError::TimedRefreshUnderBsp);
    }
    let handles = JobHandles {
        serving: Arc::new(Serving::with_model(&config.ps, model.clone())),
        eval: Arc::new(EvalHandle::new()),
        finals: Arc::default(),
        skipped: Arc::default(),
    };
    let workers = config.ps.workers as u64;
    let source_config = config.clone();
    let skipped = handles.skipped.clone();
    let batches = env
        .source("source", move |_, _| {
            TrainSource::new(
                reader().map_err(|e| e.to_string()),
                &source_config,
                skipped.clone(),
            )
        })
        .parallelism(1)
        .batch_records(1)
        .columnar_with(Arc::new(super::messages::micro_batch::TrainBatchFormat));
    let ps = config.ps.clone();
    let chained = ps.workers == 1 && ps.chain;
    let worker_out = if chained {
        let (ps, model) = (ps.clone(), model.clone());
        let finals = handles.finals.clone();
        batches.transform_chained(super::worker::WORKER_TASK, move |i| {
            TrainWorker::chained_with(ps.clone(), model.clone(), finals.clone())
                .map_err(|e| OperatorError::Failed(format!("training worker {i}: {e}")))
        })
    } else {
        let (ps, model) = (ps.clone(), model.clone());
        batches.transform_routed(
            super::worker::WORKER_TASK,
            config.ps.workers,
            move |b: &TrainBatch| b.seq % workers,
            move |i| TrainWorker::with_model(ps.clone(), i, model.clone()),
        )
    };
    let scored = worker_out
        .local_flat_map(|o: super::worker::WorkerOut| o.scored())
        .batch_records(SCORED_PER_MESSAGE)
        .columnar_with(Arc::new(super::messages::scored::ScoredFormat));
    let deltas = if chained {
        worker_out.local_flat_map(|o: super::worker::WorkerOut| o.delta())
    } else {
        let pushes = worker_out
            .local_flat_map(|o: super::worker::WorkerOut| o.push())
            .batch_records(1)
            .columnar_with(Arc::new(super::messages::push::PushFormat));
        let (shard_ps, model) = (ps.clone(), model.clone());
        let finals = handles.finals.clone();
        pushes.transform_routed(
            super::shard::SHARD_TASK,
            ps.shards,
            |p: &super::messages::Push| p.shard as u64,
            move |i| match ShardOperator::with_model(shard_ps.clone(), i, model.clone()) {
                Ok(op) => Ok(super::pull::serve(op.reporting_to(finals.clone()))),
                Err(e) => Err(OperatorError::Failed(format!("shard {i}: {e}"))),
            },
        )
    }
    .batch_records(1)
    .columnar_with(Arc::new(super::messages::delta::DeltaFormat));
    let serving_ps = ps.clone();
    let serving = handles.serving.clone();
    let serving_sink = move |_| ServingSink::new(&serving_ps, serving.clone());
    if chained {
        let _ = deltas.transform_chained("serving", serving_sink);
    } else {
        let _ = deltas.transform_routed(super::serving::SERVING_TASK, 1, |_| 0, serving_sink);
    }
    let name = ps.name.clone();
    let window = config.window;
    let predictions = config.predictions.clone();
    let eval = handles.eval.clone();
    let _ = scored.transform_routed(
        super::eval::EVAL_TASK,
        1,
        |_| 0,
        move |_| {
            if let Some(path) = &predictions {
                if let Err(e) = eval.resume_predictions(path) {
                    return Err(OperatorError::io(
                        format!("evaluation: open {}", path.display()),
                        e,
                    ));
                }
            }
            Ok(EvalSink::new(&name, window, eval.clone()))
        },
    );
    Ok(handles)
}
