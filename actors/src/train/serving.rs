//! The serving model: the weights the shards last published, answering
//! prediction requests tagged with their model version.
//!
//! * **Refresh**: the shards' [`Delta`]s (changed keys only) reach a
//!   [`ServingSink`] at the end of the stream, which applies them to a
//!   [`Serving`] handle registered in the process under the job's name.
//! * **Atomic swap**: two copies of the model; a delta is applied to the
//!   idle copy, which then replaces the live one in one pointer swap, and
//!   the delta is applied to the former live copy once its last reader
//!   left (left-right). A prediction runs entirely on one version.
//! * **Versions**: with BSP, a version is published only once every shard
//!   reached it, so a version id always names the same weights; otherwise
//!   every delta publishes, and the version is the oldest shard's.
//! * **Latency**: a batch counts as served at the first prediction
//!   answered by a version that holds it on every shard; the time from
//!   its ingest to then is its latency.

use super::metrics::LatencyHistogram;
use super::optimizer::{sigmoid, BIAS_KEY};
use super::ps::{AppliedBatch, Delta, ModelVersion, PsConfig};
use super::sharding::ConsistentHash;
use super::table::{prefetch_line, ParamTable};
use crate::stream::operator::{Collector, EventTime, Operator};
use crate::stream::registry;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Where a version keeps its weights: a dense array over a hashed
/// feature space (one load per feature, no probing), with the keys outside
/// it (the bias) in a table; or one table per shard.
enum Weights {
    Dense { w: Vec<f32>, extra: ParamTable<f32> },
    Sharded(Vec<ParamTable<f32>>),
}

impl Clone for Weights {
    fn clone(&self) -> Self {
        match self {
            Weights::Dense { w, extra } => Weights::Dense {
                w: super::hugepages::copied(w),
                extra: extra.clone(),
            },
            Weights::Sharded(t) => Weights::Sharded(t.clone()),
        }
    }
}

/// Keys ahead whose dense weights a delta's apply loop prefetches.
const PREFETCH_DISTANCE: usize = 16;

/// Largest hashed feature space served from a dense array (2^26 weights,
/// 256 MiB per copy).
pub const MAX_DENSE_BITS: u32 = 26;

/// One immutable version of the serving model.
#[derive(Clone)]
pub struct ServedModel {
    version: ModelVersion,
    shard_versions: Vec<ModelVersion>,
    weights: Weights,
    ring: ConsistentHash,
    shards: usize,
}

/// The shard of `key` among `shards` on `ring`.
fn shard_in(shards: usize, ring: &ConsistentHash, key: u64) -> usize {
    if shards == 1 {
        0
    } else {
        ring.shard_of(key).unwrap_or(0) as usize
    }
}

impl ServedModel {
    fn empty(config: &PsConfig) -> Self {
        let weights = match config.feature_bits {
            Some(bits) if bits <= MAX_DENSE_BITS => Weights::Dense {
                w: super::hugepages::filled(1usize << bits, 0.0),
                extra: ParamTable::new(),
            },
            _ => Weights::Sharded((0..config.shards).map(|_| ParamTable::new()).collect()),
        };
        Self {
            version: ModelVersion::default(),
            shard_versions: vec![ModelVersion::default(); config.shards],
            weights,
            ring: config.ring(),
            shards: config.shards,
        }
    }

    fn shard_of(&self, key: u64) -> usize {
        shard_in(self.shards, &self.ring, key)
    }

    /// Its version.
    pub fn version(&self) -> ModelVersion {
        self.version
    }

    /// Keys with a non-zero weight.
    pub fn len(&self) -> usize {
        match &self.weights {
            Weights::Dense { w, extra } => w.iter().filter(|x| **x != 0.0).count() + extra.len(),
            Weights::Sharded(t) => t.iter().map(ParamTable::len).sum(),
        }
    }

    /// Whether every weight is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight of `key` (0 if absent).
    #[inline]
    pub fn weight(&self, key: u64) -> f32 {
        match &self.weights {
            Weights::Dense { w, extra } => match w.get(key as usize) {
                Some(x) if key < w.len() as u64 => *x,
                _ => extra.get(key).copied().unwrap_or(0.0),
            },
            Weights::Sharded(t) => t
                .get(self.shard_of(key))
                .and_then(|t| t.get(key))
                .copied()
                .unwrap_or(0.0),
        }
    }

    /// The click probability of a row.
    pub fn predict(&self, ids: &[u64], values: Option<&[f32]>) -> f32 {
        let mut m = self.weight(BIAS_KEY);
        for (i, &k) in ids.iter().enumerate() {
            m += self.weight(k) * values.map_or(1.0, |v| v.get(i).copied().unwrap_or(0.0));
        }
        sigmoid(m)
    }

    fn clear_shard(&mut self, s: usize) {
        let shards = self.shards;
        let ring = self.ring.clone();
        let of = |k: u64| shard_in(shards, &ring, k) == s;
        match &mut self.weights {
            Weights::Dense { w, extra } => {
                for (k, x) in w.iter_mut().enumerate() {
                    if *x != 0.0 && of(k as u64) {
                        *x = 0.0;
                    }
                }
                extra.retain(|k, _| !of(k));
            }
            Weights::Sharded(t) => {
                if let Some(t) = t.get_mut(s) {
                    t.clear();
                }
            }
        }
    }

    fn apply(&mut self, delta: &Delta) {
        let s = delta.shard as usize;
        if s >= self.shards {
            return;
        }
        if delta.full {
            self.clear_shard(s);
        }
        match &mut self.weights {
            Weights::Dense { w: dense, extra } => {
                for (i, (&k, &w)) in delta.keys.iter().zip(&delta.weights).enumerate() {
                    if let Some(x) = delta
                        .keys
                        .get(i + PREFETCH_DISTANCE)
                        .and_then(|&ahead| dense.get(ahead as usize))
                    {
                        prefetch_line(x);
                    }
                    match dense.get_mut(k as usize) {
                        Some(x) => *x = w,
                        None if w == 0.0 => {
                            extra.remove(k);
                        }
                        None => {
                            extra.insert(k, w);
                        }
                    }
                }
            }
            Weights::Sharded(tables) => {
                for (&k, &w) in delta.keys.iter().zip(&delta.weights) {
                    if let Some(t) = tables.get_mut(shard_in(self.shards, &self.ring, k)) {
                        if w == 0.0 {
                            t.remove(k);
                        } else {
                            t.insert(k, w);
                        }
                    }
                }
            }
        }
        if let Some(v) = self.shard_versions.get_mut(s) {
            *v = delta.version;
        }
        self.version = self
            .shard_versions
            .iter()
            .copied()
            .min()
            .unwrap_or_default();
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
    standby: Option<Arc<ServedModel>>,
    log: Vec<Arc<Delta>>,
    synced: Vec<Option<Arc<Delta>>>,
}

/// The serving model, shared by the stream's serving sink (which
/// refreshes it) and whoever asks for predictions.
pub struct Serving {
    live: RwLock<Arc<ServedModel>>,
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
}

impl Serving {
    /// An empty model for the shards of `config`.
    pub fn new(config: &PsConfig) -> Self {
        let empty = ServedModel::empty(config);
        Self {
            live: RwLock::new(Arc::new(empty.clone())),
            writer: Mutex::new(Writer {
                standby: Some(Arc::new(empty)),
                log: Vec::new(),
                synced: vec![None; config.shards],
            }),
            tracking: Mutex::new(Tracking::default()),
            has_unserved: AtomicBool::new(false),
            input_rows: AtomicU64::new(u64::MAX),
            final_served: AtomicBool::new(false),
            swaps: AtomicU64::new(0),
            shards: config.shards,
            sync_versions: config.consistency == super::ps::Consistency::Bsp,
        }
    }

    /// The serving model of `config`'s job in this process (made if it
    /// does not exist yet).
    pub fn of(config: &PsConfig) -> Arc<Serving> {
        let name = format!("{}/serving", config.name);
        match registry::get_or_register(&name, || Arc::new(Serving::new(config))) {
            Ok(s) => s,
            Err(_) => Arc::new(Serving::new(config)),
        }
    }

    /// The live version (a reader keeps it alive while it holds it).
    pub fn current(&self) -> Arc<ServedModel> {
        self.live.read().clone()
    }

    /// The live version's id.
    pub fn version(&self) -> ModelVersion {
        self.live.read().version
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
        let model = self.current();
        let out: Vec<f32> = rows
            .into_iter()
            .map(|(ids, v)| model.predict(ids, v))
            .collect();
        self.note_served(model.version);
        (model.version, out)
    }

    /// The job's source reached the end of its input after `rows` rows.
    pub fn input_ended(&self, rows: u64) {
        self.input_rows.store(rows, Ordering::Release);
    }

    fn note_served(&self, version: ModelVersion) {
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
        let delta = Arc::new(delta);
        let mut w = self.writer.lock();
        if self.sync_versions {
            let s = delta.shard as usize;
            if let Some(slot) = w.synced.get_mut(s) {
                let merged = match slot.take() {
                    Some(prev) if !delta.full => Arc::new(merge(&prev, &delta)),
                    _ => delta.clone(),
                };
                *slot = Some(merged);
            }
            let versions: Vec<Option<ModelVersion>> = w
                .synced
                .iter()
                .map(|d| d.as_ref().map(|d| d.version))
                .collect();
            let all_same = versions.iter().all(|v| v.is_some() && *v == versions[0]);
            if !all_same {
                return;
            }
            let deltas: Vec<Arc<Delta>> = w.synced.iter_mut().filter_map(Option::take).collect();
            self.publish(&mut w, deltas);
        } else {
            self.publish(&mut w, vec![delta]);
        }
    }

    fn publish(&self, w: &mut Writer, deltas: Vec<Arc<Delta>>) {
        let Some(mut standby) = w.standby.take() else {
            return;
        };
        let model = loop {
            match Arc::get_mut(&mut standby) {
                Some(m) => break m,
                None => std::thread::yield_now(),
            }
        };
        for d in w.log.drain(..) {
            model.apply(&d);
        }
        for d in &deltas {
            model.apply(d);
        }
        let old = std::mem::replace(&mut *self.live.write(), standby);
        w.standby = Some(old);
        w.log = deltas.clone();
        self.swaps.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tracking.lock();
        for d in &deltas {
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

fn merge(a: &Delta, b: &Delta) -> Delta {
    let mut map: BTreeMap<u64, f32> = a
        .keys
        .iter()
        .copied()
        .zip(a.weights.iter().copied())
        .collect();
    for (&k, &w) in b.keys.iter().zip(&b.weights) {
        map.insert(k, w);
    }
    let mut batches = a.batches.clone();
    batches.extend_from_slice(&b.batches);
    Delta {
        shard: b.shard,
        version: b.version,
        full: a.full,
        keys: map.keys().copied().collect(),
        weights: map.values().copied().collect(),
        batches,
    }
}

/// The stream's end: applies the shards' deltas to the job's [`Serving`].
pub struct ServingSink {
    serving: Arc<Serving>,
}

impl ServingSink {
    /// The sink of `config`'s job.
    pub fn new(config: &PsConfig) -> Self {
        Self {
            serving: Serving::of(config),
        }
    }
}

impl Operator for ServingSink {
    type In = Delta;
    type Out = ();

    fn process(&mut self, delta: Delta, _time: Option<EventTime>, _out: &mut dyn Collector<()>) {
        self.serving.apply(delta);
    }
}
