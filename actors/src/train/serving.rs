//! The serving model: the parameters the shards last published
//! ([`Model::WIDTH`] floats per key), answering prediction requests
//! tagged with their model version, predicted by the job's [`Model`].
//!
//! * **Refresh**: the shards' [`Delta`]s (changed keys only) reach a
//!   [`ServingSink`] at the end of the stream, which applies them to the
//!   [`Serving`] handle the job's builder gave it.
//! * **Atomic swap**: one copy of the weights behind a sequence lock. The
//!   writer makes the sequence odd, applies the delta in place and makes it
//!   even again with the new version; a read ([`Serving::read`]) counts only
//!   if the sequence was the same even number before and after it, and is
//!   retried otherwise. A prediction thus runs entirely on one version, and
//!   readers never hold up the writer (the training loop), nor does a
//!   delta have to be applied twice, as two copies (left-right) would need.
//!   A reader that keeps losing the race takes the writer's lock for one
//!   attempt, holding off one refresh.
//! * **Versions**: with BSP, a version is published only once every shard
//!   reached it, so a version id always names the same weights; otherwise
//!   every delta publishes, and the version is the oldest shard's.
//! * **Latency**: a batch counts as served at the first prediction
//!   answered by a version that holds it on every shard; the time from
//!   its ingest to then is its latency.
//! * **Other processes** ask the serving subtask's process through the
//!   service it offers ([`ServingQuery`], answered by [`ServingAnswer`];
//!   [`client::JobClient`](super::client::JobClient) calls it), and its
//!   final [`ServingStats`] come back in the job's report
//!   ([`SERVING_RESULT`]).

use super::messages::{AppliedBatch, Delta, ModelVersion};
use super::metrics::LatencyHistogram;
use super::model::{LogisticRegression, Model};
use super::optimizer::BIAS_KEY;
use super::ps::PsConfig;
use super::sharding::ConsistentHash;
use super::table::{prefetch_line, ParamTable};
use crate::stream::operator::{Collector, EventTime, Operator, OperatorError};
use crate::stream::{results, service};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Keys ahead whose dense weights a delta's apply loop prefetches.
const PREFETCH_DISTANCE: usize = 16;

/// Largest hashed feature space served from a dense array (2^26 weights,
/// 256 MiB).
pub const MAX_DENSE_BITS: u32 = 26;

/// Reads tried without the writer's lock before a reader takes it.
const OPTIMISTIC_READS: usize = 4;

/// Spins a reader waits for a writer in the middle of a delta before it
/// tries again.
const WRITER_SPINS: usize = 256;

/// The served weights, one copy, written only by the publisher and read
/// between two checks of [`Serving`]'s sequence.
///
/// A hashed feature space of at most [`MAX_DENSE_BITS`] is a dense array
/// ([`Model::WIDTH`] floats per key: one load per parameter, no probing);
/// the bias has a slot of its own; any other key lives in its shard's
/// table (each behind a lock that makes reading it during a write safe;
/// the sequence makes it consistent).
struct Weights<M: Model> {
    dense: Vec<AtomicU32>,
    bias: Vec<AtomicU32>,
    tables: Vec<RwLock<ParamTable<M::Params>>>,
    ring: ConsistentHash,
    shards: usize,
}

/// Loads `from` into `out`.
#[inline]
fn load(from: &[AtomicU32], out: &mut [f32]) {
    for (x, o) in from.iter().zip(out) {
        *o = f32::from_bits(x.load(Ordering::Relaxed));
    }
}

/// Stores `values` into `to`.
#[inline]
fn store(to: &[AtomicU32], values: &[f32]) {
    for (x, v) in to.iter().zip(values) {
        x.store(v.to_bits(), Ordering::Relaxed);
    }
}

fn is_zero(x: &[AtomicU32]) -> bool {
    x.iter()
        .all(|x| f32::from_bits(x.load(Ordering::Relaxed)) == 0.0)
}

/// The shard of `key` among `shards` on `ring`.
fn shard_in(shards: usize, ring: &ConsistentHash, key: u64) -> usize {
    if shards == 1 {
        0
    } else {
        ring.shard_of(key).unwrap_or(0) as usize
    }
}

impl<M: Model> Weights<M> {
    fn empty(config: &PsConfig) -> Self {
        let dense = match config.feature_bits {
            Some(bits) if bits <= MAX_DENSE_BITS => {
                super::hugepages::filled_with((1usize << bits) * M::WIDTH, || AtomicU32::new(0))
            }
            _ => Vec::new(),
        };
        Self {
            dense,
            bias: (0..M::WIDTH).map(|_| AtomicU32::new(0)).collect(),
            tables: (0..config.shards)
                .map(|_| RwLock::new(ParamTable::new()))
                .collect(),
            ring: config.ring(),
            shards: config.shards,
        }
    }

    fn shard_of(&self, key: u64) -> usize {
        shard_in(self.shards, &self.ring, key)
    }

    /// The dense parameters of `key`, if it has some.
    #[inline]
    fn dense_slot(&self, key: u64) -> Option<&[AtomicU32]> {
        let at = usize::try_from(key).ok()?.checked_mul(M::WIDTH)?;
        self.dense.get(at..at.checked_add(M::WIDTH)?)
    }

    #[inline]
    fn get(&self, key: u64) -> M::Params {
        let mut p = M::Params::default();
        if let Some(x) = self.dense_slot(key) {
            load(x, p.as_mut());
        } else if key == BIAS_KEY {
            load(&self.bias, p.as_mut());
        } else if let Some(t) = self.tables.get(self.shard_of(key)) {
            if let Some(got) = t.read().get(key) {
                p = *got;
            }
        }
        p
    }

    fn len(&self) -> usize {
        let w = M::WIDTH.max(1);
        self.dense.chunks_exact(w).filter(|x| !is_zero(x)).count()
            + usize::from(!is_zero(&self.bias))
            + self.tables.iter().map(|t| t.read().len()).sum::<usize>()
    }

    fn clear_shard(&self, s: usize) {
        if self.shards == 1 {
            for x in &self.dense {
                x.store(0, Ordering::Relaxed);
            }
        } else {
            for (k, x) in self.dense.chunks_exact(M::WIDTH.max(1)).enumerate() {
                if !is_zero(x) && self.shard_of(k as u64) == s {
                    store(x, M::Params::default().as_ref());
                }
            }
        }
        if self.shard_of(BIAS_KEY) == s {
            store(&self.bias, M::Params::default().as_ref());
        }
        if let Some(t) = self.tables.get(s) {
            t.write().clear();
        }
    }

    fn apply(&self, delta: &Delta) {
        if delta.full {
            self.clear_shard(delta.shard as usize);
        }
        // Every key of a delta is its shard's (the ring that routed it is
        // this one): the shard's table is locked once, when a key needs it.
        let mut table = None;
        let params = delta.weights.chunks_exact(M::WIDTH);
        for (i, (&k, w)) in delta.keys.iter().zip(params).enumerate() {
            if let Some(x) = delta
                .keys
                .get(i + PREFETCH_DISTANCE)
                .and_then(|&ahead| self.dense_slot(ahead))
                .and_then(|x| x.first())
            {
                prefetch_line(x);
            }
            if let Some(x) = self.dense_slot(k) {
                store(x, w);
            } else if k == BIAS_KEY {
                store(&self.bias, w);
            } else if let Some(t) = table
                .get_or_insert_with(|| self.tables.get(delta.shard as usize).map(|t| t.write()))
            {
                if w.iter().all(|&v| v == 0.0) {
                    t.remove(k);
                } else {
                    let mut p = M::Params::default();
                    p.as_mut().copy_from_slice(w);
                    t.insert(k, p);
                }
            }
        }
    }
}

/// The serving model as one read sees it: every parameter and the version
/// from the same publish.
pub struct ServedView<'a, M: Model = LogisticRegression> {
    serving: &'a Serving<M>,
}

impl<M: Model> ServedView<'_, M> {
    /// The version.
    pub fn version(&self) -> ModelVersion {
        ModelVersion {
            epoch: self.serving.epoch.load(Ordering::Relaxed),
            records: self.serving.records.load(Ordering::Relaxed),
        }
    }

    /// Keys with a non-zero parameter.
    pub fn len(&self) -> usize {
        self.serving.weights.len()
    }

    /// Whether every parameter is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parameters of `key` (0 if absent).
    #[inline]
    pub fn params(&self, key: u64) -> M::Params {
        self.serving.weights.get(key)
    }

    /// The first parameter of `key` (0 if absent): logistic regression's
    /// weight.
    #[inline]
    pub fn weight(&self, key: u64) -> f32 {
        self.params(key).as_ref().first().copied().unwrap_or(0.0)
    }

    /// The click probability of a row, summed as a worker sums it (its
    /// features in order, then the bias feature, value 1), so that both
    /// predict the same bits from the same parameters.
    pub fn predict(&self, ids: &[u64], values: Option<&[f32]>) -> f32 {
        let model = &self.serving.model;
        let mut row = M::Row::default();
        for (i, &k) in ids.iter().enumerate() {
            let x = values.map_or(1.0, |v| v.get(i).copied().unwrap_or(0.0));
            model.add(&mut row, self.params(k).as_ref(), x);
        }
        model.add(&mut row, self.params(BIAS_KEY).as_ref(), 1.0);
        model.predict(&row)
    }
}

#[derive(Default)]
struct Tracking {
    /// Batch → shards that applied it.
    applied: BTreeMap<u64, (usize, AppliedBatch)>,
    /// Batches in the live version, not yet served.
    unserved: VecDeque<AppliedBatch>,
    newest_ingest_ns: u64,
    first_ingest_ns: u64,
    last_publish_ns: u64,
    latency: LatencyHistogram,
    lag: LatencyHistogram,
    interval_latency: LatencyHistogram,
}

struct Writer {
    /// Each shard's version in the served weights.
    shard_versions: Vec<ModelVersion>,
    /// BSP: each shard's deltas since the last publish, in order.
    synced: Vec<Vec<Delta>>,
}

/// The serving model, shared by the stream's serving sink (which
/// refreshes it) and whoever asks for predictions; `M` predicts.
pub struct Serving<M: Model = LogisticRegression> {
    model: M,
    weights: Weights<M>,
    /// Odd while a publish is writing the weights.
    seq: AtomicU64,
    epoch: AtomicU64,
    records: AtomicU64,
    writer: Mutex<Writer>,
    tracking: Mutex<Tracking>,
    has_unserved: AtomicBool,
    /// Rows the job's input held, once its source reached the end
    /// (`u64::MAX` before).
    input_rows: AtomicU64,
    /// An answer served a version holding every input row: the model can
    /// no longer lag the stream, so answers stop counting lag (as in
    /// separate mode).
    final_served: AtomicBool,
    swaps: AtomicU64,
    shards: usize,
    sync_versions: bool,
    /// Prediction requests answered.
    answers: AtomicU64,
}

impl Serving {
    /// An empty logistic-regression model for the shards of `config`.
    pub fn new(config: &PsConfig) -> Self {
        Self::with_model(config, LogisticRegression::unchecked(config.optimizer))
    }
}

impl<M: Model> Serving<M> {
    /// An empty `model` for the shards of `config`.
    pub fn with_model(config: &PsConfig, model: M) -> Self {
        Self {
            model,
            weights: Weights::empty(config),
            seq: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            records: AtomicU64::new(0),
            writer: Mutex::new(Writer {
                shard_versions: vec![ModelVersion::default(); config.shards],
                synced: vec![Vec::new(); config.shards],
            }),
            tracking: Mutex::new(Tracking::default()),
            has_unserved: AtomicBool::new(false),
            input_rows: AtomicU64::new(u64::MAX),
            final_served: AtomicBool::new(false),
            swaps: AtomicU64::new(0),
            shards: config.shards,
            sync_versions: config.consistency == super::ps::Consistency::Bsp,
            answers: AtomicU64::new(0),
        }
    }

    /// Runs `read` on one published version and returns what it returned.
    ///
    /// `read` may run more than once: a run that overlapped a publish is
    /// discarded (what it saw may mix two versions) and retried, so it
    /// should only compute from the view. Only the returned run's result
    /// is guaranteed to come from one version.
    pub fn read<R>(&self, mut read: impl FnMut(&ServedView<'_, M>) -> R) -> R {
        let view = ServedView { serving: self };
        for _ in 0..OPTIMISTIC_READS {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                for _ in 0..WRITER_SPINS {
                    std::hint::spin_loop();
                }
                continue;
            }
            let result = read(&view);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return result;
            }
        }
        let _writer = self.writer.lock();
        read(&view)
    }

    /// The live version's id.
    pub fn version(&self) -> ModelVersion {
        self.read(|m| m.version())
    }

    /// How many versions were published.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Predicts rows (`ids` of each row, as slices) with one version, and
    /// says which.
    pub fn predict<'a>(
        &self,
        rows: impl IntoIterator<Item = (&'a [u64], Option<&'a [f32]>)>,
    ) -> (ModelVersion, Vec<f32>) {
        let rows: Vec<(&[u64], Option<&[f32]>)> = rows.into_iter().collect();
        let mut out = Vec::with_capacity(rows.len());
        let version = self.read(|model| {
            out.clear();
            out.extend(rows.iter().map(|&(ids, v)| model.predict(ids, v)));
            model.version()
        });
        self.note_served(version);
        (version, out)
    }

    /// The job's source reached the end of its input after `rows` rows.
    pub fn input_ended(&self, rows: u64) {
        self.input_rows.store(rows, Ordering::Release);
    }

    fn note_served(&self, version: ModelVersion) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        let now = super::metrics::now_ns();
        let mut t = self.tracking.lock();
        if self.has_unserved.swap(false, Ordering::AcqRel) {
            while let Some(b) = t.unserved.pop_front() {
                let ms = now.saturating_sub(b.ingest_ns) as f64 / 1e6;
                for _ in 0..b.rows.min(1 << 16) {
                    t.latency.record_ms(ms);
                }
                t.interval_latency.record_ms(ms);
            }
        }
        if t.newest_ingest_ns > 0 && !self.final_served.load(Ordering::Acquire) {
            let lag = now.saturating_sub(t.newest_ingest_ns) as f64 / 1e6;
            t.lag.record_ms(lag);
            if version.records >= self.input_rows.load(Ordering::Acquire) {
                self.final_served.store(true, Ordering::Release);
            }
        }
    }

    /// From the ingest of the first batch published to the latest publish
    /// ([`super::metrics::now_ns`] stamps): the span over which serving
    /// kept up with the stream, start-up and shutdown excluded.
    pub fn span_ns(&self) -> (u64, u64) {
        let t = self.tracking.lock();
        (t.first_ingest_ns, t.last_publish_ns)
    }

    /// Ingest-to-serving latency of every row served so far.
    pub fn latency(&self) -> LatencyHistogram {
        self.tracking.lock().latency.clone()
    }

    /// Model-version lag of every answer so far, until an answer served
    /// the final version after the input ended.
    pub fn lag(&self) -> LatencyHistogram {
        self.tracking.lock().lag.clone()
    }

    /// Latency of the batches served since the last call (one entry per
    /// batch), then cleared.
    pub fn take_interval_latency(&self) -> LatencyHistogram {
        std::mem::take(&mut self.tracking.lock().interval_latency)
    }

    /// Applies a shard's delta and publishes the result.
    pub fn apply(&self, delta: Delta) {
        let mut w = self.writer.lock();
        if self.sync_versions {
            let s = delta.shard as usize;
            if let Some(held) = w.synced.get_mut(s) {
                // Held deltas are applied in order, so the newest write of
                // a key wins, as in one merged delta; a full one replaces
                // what the shard's earlier ones held.
                if delta.full {
                    held.clear();
                }
                held.push(delta);
            }
            let versions: Vec<Option<ModelVersion>> = w
                .synced
                .iter()
                .map(|held| held.last().map(|d| d.version))
                .collect();
            let all_same = versions.iter().all(|v| v.is_some() && *v == versions[0]);
            if !all_same {
                return;
            }
            let deltas: Vec<Delta> = w.synced.iter_mut().flat_map(std::mem::take).collect();
            self.publish(&mut w, &deltas);
        } else if (delta.shard as usize) < self.shards {
            self.publish(&mut w, std::slice::from_ref(&delta));
        }
    }

    fn publish(&self, w: &mut Writer, deltas: &[Delta]) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for d in deltas {
            self.weights.apply(d);
            if let Some(v) = w.shard_versions.get_mut(d.shard as usize) {
                *v = d.version;
            }
        }
        let version = w.shard_versions.iter().copied().min().unwrap_or_default();
        self.epoch.store(version.epoch, Ordering::Relaxed);
        self.records.store(version.records, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tracking.lock();
        for d in deltas {
            if d.full {
                t.applied.clear();
            }
            for b in &d.batches {
                let entry = t.applied.entry(b.seq).or_insert((0, *b));
                entry.0 += 1;
            }
        }
        let shards = self.shards;
        let done: Vec<u64> = t
            .applied
            .iter()
            .filter(|(_, (n, _))| *n >= shards)
            .map(|(s, _)| *s)
            .collect();
        for seq in done {
            if let Some((_, b)) = t.applied.remove(&seq) {
                t.newest_ingest_ns = t.newest_ingest_ns.max(b.ingest_ns);
                if t.first_ingest_ns == 0 || b.ingest_ns < t.first_ingest_ns {
                    t.first_ingest_ns = b.ingest_ns;
                }
                t.last_publish_ns = super::metrics::now_ns();
                t.unserved.push_back(b);
            }
        }
        if !t.unserved.is_empty() {
            self.has_unserved.store(true, Ordering::Release);
        }
    }
}

/// What another process asks a job's serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServingQuery {
    /// Predict rows, each its hashed feature ids.
    Predict(Vec<Vec<u64>>),
    /// The statistics so far; `take_interval` starts a new interval.
    Stats {
        /// Clear the interval latency after reading it.
        take_interval: bool,
    },
}

/// Serving's answer to a [`ServingQuery`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServingAnswer {
    /// The version that answered, and each row's click probability.
    Predicted(ModelVersion, Vec<f32>),
    /// The statistics.
    Stats(ServingStats),
}

/// What serving measured so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServingStats {
    /// The live version.
    pub version: ModelVersion,
    /// Versions published.
    pub swaps: u64,
    /// Ingest-to-serving latency of every row served.
    pub latency: LatencyHistogram,
    /// Model-version lag of every answer until the final version.
    pub lag: LatencyHistogram,
    /// Latency of the batches served in the interval (one entry each).
    pub interval_latency: LatencyHistogram,
    /// [`Serving::span_ns`].
    pub span_ns: (u64, u64),
}

impl<M: Model> Serving<M> {
    /// Its statistics; `take_interval` clears the interval latency.
    pub fn stats(&self, take_interval: bool) -> ServingStats {
        ServingStats {
            version: self.version(),
            swaps: self.swaps(),
            latency: self.latency(),
            lag: self.lag(),
            interval_latency: if take_interval {
                self.take_interval_latency()
            } else {
                self.tracking.lock().interval_latency.clone()
            },
            span_ns: self.span_ns(),
        }
    }

    /// Answers another process's query.
    pub fn answer(&self, query: ServingQuery) -> ServingAnswer {
        match query {
            ServingQuery::Predict(rows) => {
                let (version, p) = self.predict(rows.iter().map(|r| (r.as_slice(), None)));
                ServingAnswer::Predicted(version, p)
            }
            ServingQuery::Stats { take_interval } => {
                ServingAnswer::Stats(self.stats(take_interval))
            }
        }
    }
}

/// The service name of job `name`'s serving (offered by the process that
/// hosts its [`ServingSink`], on task [`SERVING_TASK`]).
pub fn service_name(name: &str) -> String {
    format!("{name}/serving")
}

/// The task serving runs as on the cluster runner (on the local runner
/// with one chained worker, it runs inside the worker's task).
pub const SERVING_TASK: &str = "serving";

/// The result under which serving's final [`ServingStats`] come back in
/// the job's report ([`crate::stream::results`]), after the job's name
/// and a slash.
pub const SERVING_RESULT: &str = "serving";

/// Serving's final statistics in a finished job's report.
pub fn final_stats(
    report: &crate::stream::coordinator::JobReport,
    name: &str,
) -> Option<Result<ServingStats, results::ResultError>> {
    results::get(&report.results, &format!("{name}/{SERVING_RESULT}"))
}

struct ServingService<M: Model>(Arc<Serving<M>>);

impl<M: Model> service::Service for ServingService<M> {
    fn call(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let query: ServingQuery =
            braid::store::codec::decode(request).map_err(|e| format!("bad query: {e}"))?;
        braid::store::codec::encode(&self.0.answer(query)).map_err(|e| e.to_string())
    }
}

/// The stream's end: applies the shards' deltas to the job's [`Serving`],
/// which it offers to other processes as a service.
pub struct ServingSink<M: Model = LogisticRegression> {
    serving: Arc<Serving<M>>,
    name: String,
    /// When it last published its figures for `/metrics`, and the
    /// latency and lag histograms then.
    published: Option<(std::time::Instant, LatencyHistogram, LatencyHistogram)>,
}

impl<M: Model> ServingSink<M> {
    /// The sink of `config`'s job, refreshing `serving`.
    pub fn new(config: &PsConfig, serving: Arc<Serving<M>>) -> Self {
        let offered = serving.clone();
        // Offered for the process's life: it answers after the stream
        // ended, until the job's hosts stop.
        service::offer_for_life(&service_name(&config.name), || {
            Arc::new(ServingService(offered))
        });
        Self {
            serving,
            name: config.name.clone(),
            published: None,
        }
    }

    /// Publishes serving's figures for `/metrics` at most once per
    /// [`PUBLISH_EVERY`]: the model version, and the latency and model
    /// lag of the answers since the last time.
    fn publish(&mut self, force: bool) {
        use braid::telemetry::{Family, Kind};
        if !force
            && self
                .published
                .as_ref()
                .is_some_and(|(at, _, _)| at.elapsed() < PUBLISH_EVERY)
        {
            return;
        }
        let (latency, lag) = {
            let t = self.serving.tracking.lock();
            (t.latency.clone(), t.lag.clone())
        };
        let (recent_latency, recent_lag) = match &self.published {
            Some((_, l, g)) => (latency.since(l), lag.since(g)),
            None => (latency.clone(), lag.clone()),
        };
        let job = [("job", self.name.as_str())];
        let seconds = |ms: f64| if ms.is_finite() { ms / 1e3 } else { 0.0 };
        let mut families = vec![
            Family::new(
                "braid_learning_model_version",
                "Rows trained into the model serving answers with",
                Kind::Gauge,
            )
            .with(&job, self.serving.version().records as f64),
            Family::new(
                "braid_serving_requests",
                "Prediction requests serving answered",
                Kind::Counter,
            )
            .with(&job, self.serving.answers.load(Ordering::Relaxed) as f64),
        ];
        if recent_lag.count() > 0 {
            families.push(
                Family::new(
                    "braid_learning_model_lag_seconds",
                    "Ingest of the newest row to an answer, p99 over the last second",
                    Kind::Gauge,
                )
                .with(&job, seconds(recent_lag.quantile(0.99))),
            );
        }
        if recent_latency.count() > 0 {
            families.push(
                Family::new(
                    "braid_serving_latency_seconds",
                    "Ingest of a row to the first answer holding it, over the last second",
                    Kind::Gauge,
                )
                .with(
                    &[("job", self.name.as_str()), ("quantile", "0.5")],
                    seconds(recent_latency.quantile(0.5)),
                )
                .with(
                    &[("job", self.name.as_str()), ("quantile", "0.99")],
                    seconds(recent_latency.quantile(0.99)),
                ),
            );
        }
        braid::telemetry::publish(&format!("learning/serving/{}", self.name), families);
        self.published = Some((std::time::Instant::now(), latency, lag));
    }
}

/// How often serving and the evaluation publish their figures for
/// `/metrics`.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl<M: Model> Operator for ServingSink<M> {
    type In = Delta;
    type Out = ();

    fn process(
        &mut self,
        delta: Delta,
        _time: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        self.serving.apply(delta);
        self.publish(false);
        Ok(())
    }

    /// Every delta is in: the served version is final, so answers stop
    /// counting lag, and the final statistics go to the job's report.
    fn on_end(&mut self, _out: &mut dyn Collector<()>) -> Result<(), OperatorError> {
        self.serving.input_ended(self.serving.version().records);
        self.publish(true);
        results::set(
            &format!("{}/{SERVING_RESULT}", self.name),
            &self.serving.stats(false),
        )
        .map_err(|e| OperatorError::Failed(e.to_string()))
    }
}
