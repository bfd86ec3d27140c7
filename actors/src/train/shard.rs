//! The parameter server's shards: each a stream operator that applies the
//! gradients the training workers push to it and answers their pulls
//! (configuration and messages: [`super::ps`]).
//!
//! * **Keys** are spread over the shards by consistent hashing with virtual
//!   nodes ([`ConsistentHash`](super::sharding::ConsistentHash)).
//! * **Pushes travel in the stream** (worker → shard, keyed by shard), so
//!   a shard aligns the checkpoint barrier from every worker before it
//!   snapshots: a checkpoint holds exactly the updates of the records
//!   before it, and after a recovery the records after it are trained
//!   again, once.
//! * **Pulls read the shard in place**: a shard registers its state in the
//!   process ([`registry`]) and a worker reads the weights it needs under
//!   the shard's lock, waiting while the consistency mode requires.
//! * **Consistency** ([`Consistency`](super::ps::Consistency)): BSP applies a step's pushes only
//!   when every worker's has arrived, in worker order, so a run (and its
//!   replay) is deterministic; SSP lets a worker run at most τ steps ahead
//!   of the slowest; ASP never waits.
//! * **Serving refresh**: after every `refresh_rows` rows (or
//!   `refresh_ms`), a shard emits a [`Delta`] of the keys it changed, for
//!   the serving model.
//! * **Key policies** ([`KeyPolicy`]): admission after a minimum count and
//!   eviction above a capacity are hooks a shard runs on its table.

use super::data::FeatureBatchRef;
use super::messages::{AppliedBatch, Delta, ModelVersion, Push, TrainBatch};
use super::model::{learn_sharded, params_of, Learner, LogisticRegression, Model};
use super::optimizer::BIAS_KEY;
use super::ps::{first_crash, ApplyError, Crash, KeyPolicy, PsConfig, PullError, PullStats};
use super::shard_page::{PageAddr, PageError, ShardPage, OWN_LAG};
use super::table::{prefetch_line, ParamTable, SlotRef};
use crate::stream::context::TaskContext;
use crate::stream::operator::{
    write_part, Collector, EventTime, Operator, OperatorError, Snapshot, StateError,
};
use crate::stream::registry;
use crate::stream::service::{self, Service, ServiceGuard};
use braid::store::codec;
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Clone, Serialize, Deserialize)]
struct ShardMeta {
    clocks: Vec<u64>,
    next_step: Vec<u64>,
    done: Vec<bool>,
    pending: BTreeMap<u64, Vec<Option<Push>>>,
    records: u64,
    epoch: u64,
    counts: Vec<(u64, u32)>,
    max_staleness: u64,
}

struct ShardState<M: Model> {
    model: Learner<M>,
    meta: ShardMeta,
    counts: ParamTable<[f32; 2]>,
    stopped: bool,
}

/// A shard's state, shared between its operator (which applies pushes)
/// and the workers that pull from it; `M` is the model it trains.
pub struct ShardCell<M: Model = LogisticRegression> {
    index: usize,
    state: Mutex<ShardState<M>>,
    changed: Condvar,
    staleness: Option<u64>,
    /// Where workers in other processes on this machine read the table in
    /// place ([`ShardCell::open_page`]).
    page: OnceLock<ShardPage>,
}

impl<M: Model> ShardCell<M> {
    fn min_clock(meta: &ShardMeta) -> u64 {
        meta.clocks
            .iter()
            .zip(&meta.done)
            .filter(|(_, d)| !**d)
            .map(|(c, _)| *c)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The shard's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Reads the parameters of `keys` into `out` ([`Model::WIDTH`] floats
    /// per key; absent keys read 0) for worker `worker`'s step `step`, once
    /// the consistency mode allows it and the worker's own pushes are
    /// applied up to [`OWN_LAG`] steps back, as through the shard's page.
    pub fn pull(
        &self,
        worker: usize,
        step: u64,
        keys: &[u64],
        out: &mut Vec<f32>,
        timeout: Duration,
    ) -> Result<PullStats, PullError> {
        self.when_ready(worker, step, timeout, |model| model.pull(keys, out))
    }

    /// [`ShardCell::pull`] into `out`, [`Model::WIDTH`] floats per key.
    pub fn pull_into(
        &self,
        worker: usize,
        step: u64,
        keys: &[u64],
        out: &mut [f32],
        timeout: Duration,
    ) -> Result<PullStats, PullError> {
        self.when_ready(worker, step, timeout, |model| model.pull_into(keys, out))
    }

    /// Runs `read` on the model once the consistency mode lets worker
    /// `worker`'s step `step` read it.
    fn when_ready(
        &self,
        worker: usize,
        step: u64,
        timeout: Duration,
        read: impl FnOnce(&Learner<M>),
    ) -> Result<PullStats, PullError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut state = self.state.lock();
        loop {
            if state.stopped {
                return Err(PullError::Stopped(self.index));
            }
            let min = Self::min_clock(&state.meta);
            let mine = state.meta.clocks.get(worker).copied().unwrap_or(u64::MAX);
            let ready = self
                .staleness
                .is_none_or(|tau| min.saturating_add(tau) >= step)
                && mine.saturating_add(OWN_LAG) >= step;
            if ready {
                let staleness = step.saturating_sub(min.min(step));
                state.meta.max_staleness = state.meta.max_staleness.max(staleness);
                read(&state.model);
                return Ok(PullStats {
                    min_clock: min,
                    staleness,
                });
            }
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(PullError::Timeout {
                    shard: self.index,
                    step,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
    }

    /// The largest staleness any pull saw.
    pub fn max_staleness(&self) -> u64 {
        self.state.lock().meta.max_staleness
    }

    /// Keys held and the table's bytes per key.
    pub fn footprint(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.model.table().len(), s.model.table().bytes())
    }

    fn stop(&self) {
        self.state.lock().stopped = true;
        self.changed.notify_all();
        if let Some(page) = self.page.get() {
            page.stop();
        }
    }

    /// Moves the table into shared memory and opens the page through which
    /// workers in other processes on this machine read it in place
    /// ([`super::shard_page`]); its address.
    pub fn open_page(&self) -> Result<PageAddr, PageError> {
        if self.page.get().is_none() {
            let page = ShardPage::create(self.state.lock().meta.clocks.len())?;
            let _ = self.page.set(page);
        }
        let mut state = self.state.lock();
        self.publish(&mut state);
        self.page
            .get()
            .map(ShardPage::addr)
            .ok_or_else(|| PageError::NotAPage("no page".into()))
    }

    /// Publishes the table and the clock on the page, if there is one:
    /// after every change to either.
    fn publish(&self, state: &mut ShardState<M>) {
        let Some(page) = self.page.get() else {
            return;
        };
        let table = state.model.table_mut();
        if table.shared_fd().is_none() {
            if let Err(e) = table.share() {
                tracing::warn!("shard {}: pulls stay calls: {e}", self.index);
            }
        }
        table.publish_side();
        if let Some(fd) = table.shared_fd() {
            page.set_table(fd);
        }
        if state.stopped {
            page.stop();
        }
        page.set_clocks(Self::min_clock(&state.meta), &state.meta.clocks);
    }
}

/// The keys changed since the last serving delta, each once.
///
/// Adding a key appends it to `pending`, repeats included: one sequential
/// store in the training loop, no random access. [`DirtyKeys::compact`]
/// folds `pending` into the distinct `keys` list, with a bit per key over a
/// hashed feature space (when its size is known and at most 2^26), else by
/// sorting; it runs when a delta takes the keys, or once `pending` holds
/// [`COMPACT_AT`] keys, so memory stays bounded however rare deltas are.
/// Its loop is branch-free: each key is written past the end of the list
/// and the length grows by one only if its bit was clear, so the CPU
/// overlaps the bitmap's cache misses instead of taking them one by one
/// inside the training loop.
struct DirtyKeys {
    pending: Vec<u64>,
    /// `keys[..len]` are the distinct keys compacted so far; the rest is
    /// scratch room.
    keys: Vec<u64>,
    len: usize,
    bits: Vec<u64>,
    big: Vec<u64>,
}

/// Keys [`DirtyKeys`] holds, repeats included, before it compacts them.
const COMPACT_AT: usize = 1 << 16;

/// How many keys ahead [`DirtyKeys::compact`] starts loading bitmap words.
const PREFETCH_DISTANCE: usize = 16;

impl DirtyKeys {
    fn new(feature_bits: Option<u32>) -> Self {
        let bits = match feature_bits {
            Some(b) if b <= 26 => vec![0u64; (1usize << b).div_ceil(64)],
            _ => Vec::new(),
        };
        Self {
            pending: Vec::new(),
            keys: Vec::new(),
            len: 0,
            bits,
            big: Vec::new(),
        }
    }

    fn add(&mut self, keys: &[u64]) {
        for &k in keys {
            self.add_one(k);
        }
    }

    #[inline]
    fn add_one(&mut self, k: u64) {
        if self.pending.len() >= COMPACT_AT {
            self.compact();
        }
        self.pending.push(k);
    }

    fn compact(&mut self) {
        let limit = self.bits.len() as u64 * 64;
        if limit == 0 {
            self.keys.truncate(self.len);
            self.keys.append(&mut self.pending);
            self.keys.sort_unstable();
            self.keys.dedup();
            self.len = self.keys.len();
            return;
        }
        if self.keys.len() < self.len + self.pending.len() {
            self.keys.resize(self.len + self.pending.len(), 0);
        }
        for (i, &k) in self.pending.iter().enumerate() {
            if let Some(&ahead) = self.pending.get(i + PREFETCH_DISTANCE) {
                if let Some(word) = self.bits.get((ahead / 64) as usize) {
                    prefetch_line(word);
                }
            }
            if k < limit {
                let word = &mut self.bits[(k / 64) as usize];
                let mask = 1u64 << (k % 64);
                let fresh = usize::from(*word & mask == 0);
                *word |= mask;
                self.keys[self.len] = k;
                self.len += fresh;
            } else if !self.big.contains(&k) {
                self.big.push(k);
            }
        }
        self.pending.clear();
    }

    fn take(&mut self) -> Vec<u64> {
        self.compact();
        let mut keys = self.keys[..self.len].to_vec();
        self.len = 0;
        for &k in &keys {
            if let Some(word) = self.bits.get_mut((k / 64) as usize) {
                *word &= !(1 << (k % 64));
            }
        }
        keys.append(&mut self.big);
        keys
    }

    fn clear(&mut self) {
        let _ = self.take();
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.len == 0 && self.big.is_empty()
    }
}

/// The updates the chained training loop made, in update order, as what
/// each key's new weight is computed from ([`Fresh`]): a serving delta
/// without a second lookup per key, whose weights are computed in one
/// vectorized pass when it is sent. A key may repeat (the last entry holds
/// its weight), which costs serving a cached store, where keeping the keys
/// distinct would cost a bitmap test per update; the bias, updated every
/// row, is kept once. Past [`COMPACT_AT`] entries they move to the
/// [`DirtyKeys`], which pulls their weights at the delta.
struct FreshWeights<M: Model> {
    keys: Vec<u64>,
    fresh: Vec<M::Update>,
    bias: Option<M::Update>,
}

impl<M: Model> Default for FreshWeights<M> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            fresh: Vec::new(),
            bias: None,
        }
    }
}

impl<M: Model> FreshWeights<M> {
    #[inline]
    fn note(&mut self, key: u64, fresh: M::Update, dirty: &mut DirtyKeys) {
        if key == BIAS_KEY {
            self.bias = Some(fresh);
            return;
        }
        if self.keys.len() >= COMPACT_AT {
            self.move_to(dirty);
        }
        self.keys.push(key);
        self.fresh.push(fresh);
    }

    /// Hands the keys to `dirty` (their weights are pulled later).
    fn move_to(&mut self, dirty: &mut DirtyKeys) {
        dirty.add(&self.keys);
        if self.bias.take().is_some() {
            dirty.add_one(BIAS_KEY);
        }
        self.keys.clear();
        self.fresh.clear();
    }

    /// The keys and their parameters under `model`, the bias last; the
    /// next delta's key list starts with this one's room, so a steady
    /// stream does not regrow it.
    fn take(&mut self, model: &M) -> (Vec<u64>, Vec<f32>) {
        let room = self.keys.len() + 1;
        let mut keys = std::mem::replace(&mut self.keys, Vec::with_capacity(room));
        let mut weights = Vec::with_capacity(room * M::WIDTH);
        params_of(model, &self.fresh, &mut weights);
        self.fresh.clear();
        if let Some(b) = self.bias.take() {
            keys.push(BIAS_KEY);
            params_of(model, &[b], &mut weights);
        }
        (keys, weights)
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.fresh.clear();
        self.bias = None;
    }
}

/// One parameter-server shard of model `M` as a stream operator: pushes
/// in, serving deltas out.
pub struct ShardOperator<M: Model = LogisticRegression> {
    config: PsConfig,
    model: M,
    cell: Arc<ShardCell<M>>,
    name: String,
    dirty: DirtyKeys,
    fresh: FreshWeights<M>,
    batches: Vec<AppliedBatch>,
    rows_since: u64,
    last_delta: Instant,
    sent_full: bool,
    /// A model buffer the last snapshot encoded and gave back: the next
    /// snapshot copies into it instead of allocating (and faulting in)
    /// a fresh table while the shard waits.
    spare: Arc<Mutex<Option<Learner<M>>>>,
    /// Workers in other processes pull through it (cluster runner; see
    /// [`ShardOperator::offer`]).
    service: Option<ServiceGuard>,
    /// Where its model goes when its input ends, if anyone in this
    /// process wants it.
    finals: Option<Arc<FinalModels<M>>>,
}

/// Tables of at least this many keys get their snapshot buffer made
/// ahead ([`prepare_spare`]).
const PREPARED_SPARE_KEYS: usize = 1 << 16;

/// Makes the buffer the first snapshot copies the model into, on a thread
/// of its own: a table sized for `keys` whose pages are already faulted
/// (`ParamTable::with_capacity` writes every slot). Otherwise the first
/// checkpoint allocates and faults the copy while the shard holds its
/// lock and the stream waits: tens of milliseconds for a million keys,
/// which set the p99 latency of a short run. A snapshot taken before the
/// buffer is ready allocates one, as it did before.
fn prepare_spare<M: Model>(spare: &Arc<Mutex<Option<Learner<M>>>>, model: &M, keys: usize) {
    if keys < PREPARED_SPARE_KEYS {
        return;
    }
    let (spare, model) = (spare.clone(), model.clone());
    let made = std::thread::Builder::new()
        .name("braid-spare".into())
        .spawn(move || {
            if let Ok(model) = Learner::with_model(model, keys) {
                spare.lock().get_or_insert(model.with_bias_key(None));
            }
        });
    if let Err(e) = made {
        tracing::debug!("the snapshot buffer is made at the first checkpoint: {e}");
    }
}

/// The head vertex of the shards' task in [`pipeline::build`]'s graph:
/// the task a worker calls for remote pulls.
///
/// [`pipeline::build`]: super::pipeline::build
pub const SHARD_TASK: &str = "shard";

impl ShardOperator {
    /// Shard `index` of `config`, training logistic regression with
    /// `config.optimizer`, registered for the workers of the current
    /// attempt.
    pub fn new(config: PsConfig, index: usize) -> Result<Self, StateError> {
        let model = LogisticRegression::new(config.optimizer)
            .map_err(|e| StateError::Decode(e.to_string()))?;
        Self::with_model(config, index, model)
    }
}

impl<M: Model> ShardOperator<M> {
    /// Shard `index` of `config`, training `model`, registered for the
    /// workers of the current attempt.
    pub fn with_model(config: PsConfig, index: usize, model: M) -> Result<Self, StateError> {
        let ctx = TaskContext::current();
        let learner = Learner::with_model(model.clone(), config.capacity)
            .map_err(|e| StateError::Decode(e.to_string()))?
            .with_bias_key(None);
        let workers = config.workers;
        let cell = Arc::new(ShardCell {
            index,
            state: Mutex::new(ShardState {
                model: learner,
                meta: ShardMeta {
                    clocks: vec![0; workers],
                    next_step: vec![0; workers],
                    done: vec![false; workers],
                    pending: BTreeMap::new(),
                    records: 0,
                    epoch: 0,
                    counts: Vec::new(),
                    max_staleness: 0,
                },
                counts: ParamTable::new(),
                stopped: false,
            }),
            changed: Condvar::new(),
            staleness: config.consistency.staleness(),
            page: OnceLock::new(),
        });
        let name = config.shard_name(ctx.generation, index);
        let feature_bits = config.feature_bits;
        registry::register(&name, cell.clone());
        let spare = Arc::new(Mutex::new(None));
        prepare_spare(&spare, &model, config.capacity);
        Ok(Self {
            config,
            model,
            cell,
            name,
            service: None,
            dirty: DirtyKeys::new(feature_bits),
            fresh: FreshWeights::default(),
            batches: Vec::new(),
            rows_since: 0,
            last_delta: Instant::now(),
            sent_full: false,
            spare,
            finals: None,
        })
    }

    /// Leaves a copy of its model in `finals` when its input ends.
    pub fn reporting_to(mut self, finals: Arc<FinalModels<M>>) -> Self {
        self.finals = Some(finals);
        self
    }

    /// The shard's shared state.
    pub fn cell(&self) -> &Arc<ShardCell<M>> {
        &self.cell
    }

    /// The shard's configuration.
    pub fn config(&self) -> &PsConfig {
        &self.config
    }

    /// Offers `service` under the shard's name in this process, for as
    /// long as the shard lives: how workers in other processes reach it
    /// ([`super::pull::serve`]).
    pub fn offer(&mut self, service: Arc<dyn Service>) {
        self.service = Some(service::offer(&self.name, service));
    }

    fn apply_one(
        state: &mut ShardState<M>,
        policy: KeyPolicy,
        push: &Push,
        at: Option<&[Option<SlotRef>]>,
        dirty: &mut DirtyKeys,
        fresh: &mut FreshWeights<M>,
    ) -> Result<(), ApplyError> {
        match policy {
            KeyPolicy::MinCount(min) if min > 1 => {
                let mut keys = Vec::with_capacity(push.keys.len());
                let mut grads = Vec::with_capacity(push.grads.len());
                for (&k, g) in push.keys.iter().zip(push.grads.chunks_exact(M::WIDTH)) {
                    if state.model.table().contains_key(k) {
                        keys.push(k);
                        grads.extend_from_slice(g);
                        continue;
                    }
                    let c = state.counts.get_or_insert_default(k);
                    c[0] += 1.0;
                    if c[0] >= min as f32 {
                        state.counts.remove(k);
                        keys.push(k);
                        grads.extend_from_slice(g);
                    }
                }
                state.model.push(&keys, &grads)?;
                dirty.add(&keys);
            }
            _ => {
                match at {
                    Some(at) => {
                        state.model.push_at(&push.keys, at, &push.grads)?;
                        dirty.add(&push.keys);
                    }
                    // Eviction may drop keys the updates reported: their
                    // weights are looked up at the delta.
                    None if matches!(policy, KeyPolicy::Capacity(_)) => {
                        state.model.push(&push.keys, &push.grads)?;
                        dirty.add(&push.keys);
                    }
                    // The delta takes the weights the updates left.
                    None => {
                        state
                            .model
                            .push_noting(&push.keys, &push.grads, &mut |k, update| {
                                fresh.note(k, update, dirty)
                            })?
                    }
                }
            }
        }
        Self::evict(state, policy);
        state.meta.records += push.rows;
        Ok(())
    }

    /// Under [`KeyPolicy::Capacity`], evicts the least-updated keys once
    /// the table holds more than its maximum.
    fn evict(state: &mut ShardState<M>, policy: KeyPolicy) {
        if let KeyPolicy::Capacity(max) = policy {
            let table = state.model.table_mut();
            if max > 0 && table.len() > max {
                let mut ns: Vec<f32> = table.iter().map(|(_, s)| M::activity(s)).collect();
                let keep = max * 9 / 10;
                let cut_at = ns.len() - keep;
                ns.select_nth_unstable_by(cut_at, |a, b| a.total_cmp(b));
                let threshold = ns[cut_at];
                table.retain(|_, s| M::activity(s) >= threshold);
            }
        }
    }

    /// Applies `push`; `at` holds the slots [`Learner::pull_at`] noted for
    /// its keys when the worker is chained to this shard.
    fn apply(&mut self, push: Push, at: Option<&[Option<SlotRef>]>) -> Result<(), ApplyError> {
        let workers = self.config.workers;
        let w = push.worker as usize;
        if w >= workers {
            return Err(ApplyError::UnknownWorker {
                worker: push.worker,
                workers,
            });
        }
        let cell = self.cell.clone();
        let mut state = cell.state.lock();
        let state = &mut *state;
        if push.step != state.meta.next_step[w] {
            return Err(ApplyError::OutOfOrder {
                worker: push.worker,
                step: push.step,
                expected: state.meta.next_step[w],
            });
        }
        if push.done {
            state.meta.done[w] = true;
        } else {
            state.meta.next_step[w] = push.step + 1;
        }
        let policy = self.config.policy;
        let this_step = push.step;
        if self.cell.staleness == Some(0) {
            if !push.done {
                let slots = state
                    .meta
                    .pending
                    .entry(push.step)
                    .or_insert_with(|| vec![None; workers]);
                slots[w] = Some(push);
            }
            while let Some((&step, slots)) = state.meta.pending.iter().next() {
                let complete = slots
                    .iter()
                    .zip(&state.meta.done)
                    .all(|(s, done)| s.is_some() || *done);
                if !complete {
                    break;
                }
                let slots = state.meta.pending.remove(&step).unwrap_or_default();
                for push in slots.into_iter().flatten() {
                    let noted = at.filter(|_| push.worker as usize == w && step == this_step);
                    Self::apply_one(
                        state,
                        policy,
                        &push,
                        noted,
                        &mut self.dirty,
                        &mut self.fresh,
                    )?;
                    self.note_batch(&push);
                    let worker = push.worker as usize;
                    state.meta.clocks[worker] = step + 1;
                }
            }
        } else if !push.done {
            Self::apply_one(state, policy, &push, at, &mut self.dirty, &mut self.fresh)?;
            self.note_batch(&push);
            state.meta.clocks[w] = push.step + 1;
        }
        self.cell.publish(state);
        self.cell.changed.notify_all();
        Ok(())
    }

    fn note_batch(&mut self, push: &Push) {
        self.rows_since += push.rows;
        self.batches.push(AppliedBatch {
            seq: push.seq,
            rows: push.rows,
            ingest_ns: push.ingest_ns,
        });
    }

    /// A copy of `model`, made in the spare copy a written checkpoint gave
    /// back (allocated and touched already) when there is one.
    fn copy_of(&self, model: &Learner<M>) -> Learner<M> {
        match self.spare.lock().take() {
            Some(mut copy) => {
                copy.clone_from(model);
                copy
            }
            None => model.clone(),
        }
    }

    fn emit_delta(&mut self, out: &mut dyn Collector<Delta>, force: bool) {
        let due = !self.sent_full
            || force
            || self.rows_since >= self.config.refresh_rows.max(1)
            || (self.config.refresh_ms > 0
                && self.last_delta.elapsed() >= Duration::from_millis(self.config.refresh_ms)
                && self.rows_since > 0);
        if !due {
            return;
        }
        let state = self.cell.state.lock();
        let full = !self.sent_full;
        let (keys, weights) = if full {
            let mut keys: Vec<u64> = state.model.table().iter().map(|(k, _)| k).collect();
            keys.sort_unstable();
            let mut weights = Vec::new();
            state.model.pull(&keys, &mut weights);
            (keys, weights)
        } else if self.dirty.is_empty() {
            self.fresh.take(&self.model)
        } else {
            self.fresh.move_to(&mut self.dirty);
            let keys = self.dirty.take();
            let mut weights = Vec::new();
            state.model.pull(&keys, &mut weights);
            (keys, weights)
        };
        let version = ModelVersion {
            epoch: state.meta.epoch,
            records: state.meta.records,
        };
        drop(state);
        self.dirty.clear();
        self.fresh.clear();
        self.sent_full = true;
        self.rows_since = 0;
        self.last_delta = Instant::now();
        out.emit(
            Delta {
                shard: self.cell.index as u32,
                version,
                full,
                keys: keys.into(),
                weights: weights.into(),
                batches: std::mem::take(&mut self.batches),
            },
            None,
        );
    }
}

impl<M: Model> ShardOperator<M> {
    /// Applies one push (a failure stops the shard and fails the subtask,
    /// which the job recovers from its last checkpoint), then emits a
    /// serving delta if one is due.
    fn handle(
        &mut self,
        push: Push,
        at: Option<&[Option<SlotRef>]>,
        out: &mut dyn Collector<Delta>,
    ) -> Result<(), OperatorError> {
        if let Some(Crash::Shard(i, step)) = self.config.crash {
            if i == self.cell.index && push.step >= step && first_crash(&self.config) {
                self.cell.stop();
                panic!("shard {i} crashed at step {} (injected)", push.step);
            }
        }
        if let Err(e) = self.apply(push, at) {
            self.cell.stop();
            return Err(OperatorError::Failed(format!(
                "parameter-server shard {}: {e}",
                self.cell.index
            )));
        }
        self.emit_delta(out, false);
        Ok(())
    }

    /// Trains the chained worker's step `step` on `shards` (all of the
    /// job's, in order) row by row, in place ([`learn_sharded`]); then
    /// does what a push of the step does to each shard: clocks, records,
    /// eviction, dirty keys and a serving delta if one is due.
    /// `predictions` gets each row's prediction before its update; `rows`
    /// are the batch's rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_chained(
        shards: &mut [ShardOperator<M>],
        shard_of: &dyn Fn(u64) -> usize,
        worker: usize,
        step: u64,
        batch: &TrainBatch,
        rows: FeatureBatchRef<'_>,
        predictions: &mut Vec<f32>,
        out: &mut dyn Collector<Delta>,
    ) -> Result<(), OperatorError> {
        let cells: Vec<Arc<ShardCell<M>>> = shards.iter().map(|s| s.cell.clone()).collect();
        for shard in shards.iter() {
            if let Some(Crash::Shard(i, at)) = shard.config.crash {
                if i == shard.cell.index && step >= at && first_crash(&shard.config) {
                    for c in &cells {
                        c.stop();
                    }
                    panic!("shard {i} crashed at step {step} (injected)");
                }
            }
        }
        let mut states: Vec<_> = cells.iter().map(|c| c.state.lock()).collect();
        // Fails with the shards locked: stop them through the guards held
        // (`ShardCell::stop` would lock again), then release and wake them.
        let fail_locked = |mut states: Vec<MutexGuard<'_, ShardState<M>>>,
                           e: &dyn std::fmt::Display| {
            for state in &mut states {
                state.stopped = true;
            }
            drop(states);
            for c in &cells {
                c.changed.notify_all();
            }
            OperatorError::Failed(format!("chained parameter-server shards: {e}"))
        };
        let behind = states.iter().enumerate().find_map(|(s, state)| {
            let expected = state.meta.next_step.get(worker).copied();
            (expected != Some(step)).then(|| {
                format!("shard {s}: worker {worker} trained step {step}, expected {expected:?}")
            })
        });
        if let Some(e) = behind {
            return Err(fail_locked(states, &e));
        }
        {
            let mut models: Vec<&mut Learner<M>> =
                states.iter_mut().map(|s| &mut s.model).collect();
            // Eviction drops keys the loop reported: their deltas pull.
            let evicts = matches!(shards.first(), Some(s) if matches!(s.config.policy, KeyPolicy::Capacity(_)));
            let mut noted: Vec<(&mut DirtyKeys, &mut FreshWeights<M>)> = shards
                .iter_mut()
                .map(|s| (&mut s.dirty, &mut s.fresh))
                .collect();
            let learned = learn_sharded(
                &mut models,
                shard_of,
                BIAS_KEY,
                rows,
                predictions,
                |s, k, w| {
                    let (dirty, fresh) = &mut noted[s];
                    if evicts {
                        dirty.add_one(k);
                    } else {
                        fresh.note(k, w, dirty);
                    }
                },
            );
            if let Err(e) = learned {
                drop(models);
                drop(noted);
                return Err(fail_locked(states, &e));
            }
        }
        let applied = AppliedBatch {
            seq: batch.seq,
            rows: rows.rows() as u64,
            ingest_ns: batch.ingest_ns,
        };
        for (shard, state) in shards.iter_mut().zip(states.iter_mut()) {
            let state = &mut **state;
            state.meta.next_step[worker] = step + 1;
            state.meta.clocks[worker] = step + 1;
            state.meta.records += applied.rows;
            Self::evict(state, shard.config.policy);
            shard.rows_since += applied.rows;
            shard.batches.push(applied);
        }
        drop(states);
        for shard in shards.iter_mut() {
            shard.cell.changed.notify_all();
            shard.emit_delta(out, false);
        }
        Ok(())
    }

    /// A pull by the one worker chained to this shard (in its subtask, so
    /// no other worker's step can be pending): the weights of `keys`, and
    /// where each lives for [`ShardOperator::push_chained`].
    pub(crate) fn pull_chained(
        &self,
        keys: &[u64],
        at: &mut Vec<Option<SlotRef>>,
        out: &mut Vec<f32>,
    ) {
        self.cell.state.lock().model.pull_at(keys, at, out);
    }

    /// The chained worker's push of the step it just pulled for, with the
    /// slots that pull noted.
    pub(crate) fn push_chained(
        &mut self,
        push: Push,
        at: &[Option<SlotRef>],
        out: &mut dyn Collector<Delta>,
    ) -> Result<(), OperatorError> {
        self.handle(push, Some(at), out)
    }
}

/// The length-prefixed parts [`write_part`] wrote; a truncated or
/// over-long encoding is refused.
pub(crate) fn split_parts(mut bytes: &[u8]) -> Result<Vec<&[u8]>, StateError> {
    let mut parts = Vec::new();
    while !bytes.is_empty() {
        let bad = || StateError::Decode("truncated state parts".into());
        let len: [u8; 8] = bytes
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad())?;
        let rest = &bytes[8..];
        parts.push(rest.get(..len).ok_or_else(bad)?);
        bytes = &rest[len..];
    }
    Ok(parts)
}

impl<M: Model> Drop for ShardOperator<M> {
    fn drop(&mut self) {
        self.cell.stop();
        registry::unregister(&self.name, &self.cell);
    }
}

/// Bytes a shard's snapshot reserves beyond its tables, for its metadata
/// and the states that follow it in the subtask's blob.
const SNAPSHOT_SLACK: usize = 1 << 20;

struct ShardSnapshot {
    meta: ShardMeta,
}

/// A shard's snapshot: its metadata, model and admission counts, each a
/// part [`write_part`] wrote.
#[allow(clippy::type_complexity)]
fn decode_snapshot<M: Model>(
    bytes: &[u8],
) -> Result<(ShardSnapshot, Learner<M>, ParamTable<[f32; 2]>), StateError> {
    let [meta, model, counts] = split_parts(bytes)?[..] else {
        return Err(StateError::Decode(
            "a shard snapshot has three parts".into(),
        ));
    };
    let snap = ShardSnapshot {
        meta: crate::stream::operator::decode_state(meta)?,
    };
    let model = Learner::from_bytes(model).map_err(|e| StateError::Decode(e.to_string()))?;
    let counts = ParamTable::from_bytes(counts).map_err(|e| StateError::Decode(e.to_string()))?;
    Ok((snap, model, counts))
}

/// Decodes a logistic-regression parameter-server shard's snapshot as its
/// restore does, and returns the number of keys in its model. A snapshot comes from
/// checkpoint storage: any bytes give a count or a
/// [`StateError::Decode`], never a panic. Public for the fuzz targets.
#[doc(hidden)]
pub fn check_shard_snapshot(bytes: &[u8]) -> Result<usize, StateError> {
    let (_, model, _) = decode_snapshot::<LogisticRegression>(bytes)?;
    Ok(model.table().len())
}

impl<M: Model> Operator for ShardOperator<M> {
    type In = Push;
    type Out = Delta;

    fn process(
        &mut self,
        push: Push,
        _time: Option<EventTime>,
        out: &mut dyn Collector<Delta>,
    ) -> Result<(), OperatorError> {
        self.handle(push, None, out)
    }

    fn on_end(&mut self, out: &mut dyn Collector<Delta>) -> Result<(), OperatorError> {
        self.emit_delta(out, true);
        let (figures, model) = {
            let state = self.cell.state.lock();
            let figures = ShardFigures {
                keys: state.model.table().len() as u64,
                bytes: state.model.table().bytes() as u64,
            };
            let model = self.finals.is_some().then(|| self.copy_of(&state.model));
            (figures, model)
        };
        if let (Some(finals), Some(model)) = (&self.finals, model) {
            finals
                .0
                .lock()
                .insert(self.cell.index, Arc::new(FinalModel(model)));
        }
        crate::stream::results::set(&shard_result(&self.config.name, self.cell.index), &figures)
            .map_err(|e| OperatorError::Failed(e.to_string()))
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        Ok(self.freeze())
    }

    fn barrier_passed(&mut self, epoch: u64) {
        self.cell.state.lock().meta.epoch = epoch;
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        Ok(self.restore_state(bytes)?)
    }
}

impl<M: Model> ShardOperator<M> {
    /// Freezes the shard's state at a barrier (a copy of its tables into
    /// the spare buffer), encoded later into the checkpoint blob.
    pub(crate) fn freeze(&mut self) -> Snapshot {
        let state = self.cell.state.lock();
        let meta = state.meta.clone();
        let model = self.copy_of(&state.model);
        let counts = state.counts.clone();
        drop(state);
        let give_back = self.spare.clone();
        Snapshot::writer(move |out| {
            // Room for the rest of the subtask's blob too: growing a blob
            // this size later would copy it whole.
            out.reserve(SNAPSHOT_SLACK + model.encoded_len() + counts.encoded_len());
            write_part(out, |o| {
                codec::encode_append(&meta, o)
                    .map(drop)
                    .map_err(|e| StateError::Encode(e.to_string()))
            })?;
            write_part(out, |o| {
                model.write_to(o);
                Ok(())
            })?;
            *give_back.lock() = Some(model);
            write_part(out, |o| {
                counts.write_to(o);
                Ok(())
            })
        })
    }

    /// Restores the state a snapshot saved.
    pub(crate) fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let (snap, model, counts) = decode_snapshot(bytes)?;
        if snap.meta.clocks.len() != self.config.workers {
            return Err(StateError::Decode(format!(
                "the snapshot has {} workers, the job {}",
                snap.meta.clocks.len(),
                self.config.workers
            )));
        }
        let mut state = self.cell.state.lock();
        state.model = model;
        state.counts = counts;
        state.meta = snap.meta;
        let restored = TaskContext::current().restored_epoch;
        if restored > 0 {
            state.meta.epoch = restored;
        }
        self.cell.publish(&mut state);
        drop(state);
        self.cell.changed.notify_all();
        self.sent_full = false;
        self.dirty.clear();
        self.fresh.clear();
        self.batches.clear();
        Ok(())
    }
}

/// A copy of a shard's model at the end of the input.
pub struct FinalModel<M: Model = LogisticRegression>(pub Learner<M>);

/// What a shard held when its input ended, in the job's report
/// ([`shard_result`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFigures {
    /// Live keys.
    pub keys: u64,
    /// Bytes of its table.
    pub bytes: u64,
}

/// The result name of shard `shard`'s [`ShardFigures`] in job `name`'s
/// report ([`crate::stream::results`]).
pub fn shard_result(name: &str, shard: usize) -> String {
    format!("{name}/shard/{shard}")
}

/// The models a job's shards held when their input ended, for whoever
/// built the job in the same process ([`ShardOperator::reporting_to`]).
pub struct FinalModels<M: Model = LogisticRegression>(Mutex<BTreeMap<usize, Arc<FinalModel<M>>>>);

impl<M: Model> Default for FinalModels<M> {
    fn default() -> Self {
        Self(Mutex::new(BTreeMap::new()))
    }
}

impl<M: Model> FinalModels<M> {
    /// Shard `shard`'s model, if it ended in this process.
    pub fn get(&self, shard: usize) -> Option<Arc<FinalModel<M>>> {
        self.0.lock().get(&shard).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::{DirtyKeys, ShardOperator, COMPACT_AT, OWN_LAG};
    use crate::stream::operator::Operator;
    use crate::train::messages::Push;
    use crate::train::model::LogisticRegression;
    use crate::train::optimizer::OptimizerKind;
    use crate::train::ps::{Consistency, PsConfig, PullError};
    use std::time::Duration;

    #[test]
    fn an_asp_pull_waits_for_the_workers_own_pushes_but_never_for_another_workers() {
        let optimizer = OptimizerKind::Sgd { lr: 0.1 };
        let mut config = PsConfig::new("own-lag", 2, 1, optimizer);
        config.consistency = Consistency::Asp;
        let model = LogisticRegression::new(optimizer).expect("a model");
        let mut shard = ShardOperator::with_model(config, 0, model).expect("a shard");
        let cell = shard.cell().clone();
        let (step, short) = (OWN_LAG + 1, Duration::from_millis(50));
        let mut out = Vec::new();
        // No push applied: worker 0's step OWN_LAG may read, the next waits.
        cell.pull(0, OWN_LAG, &[7], &mut out, short)
            .expect("within the lag");
        assert!(matches!(
            cell.pull(0, step, &[7], &mut out, short),
            Err(PullError::Timeout { .. })
        ));
        // Worker 0's first push lets its step read, and worker 1, which
        // pushed nothing, still reads at its own pace.
        let push = Push {
            shard: 0,
            worker: 0,
            step: 0,
            keys: vec![7u64].into(),
            grads: vec![0.5f32].into(),
            rows: 1,
            seq: 0,
            ingest_ns: 0,
            done: false,
        };
        shard.process(push, None, &mut Vec::new()).expect("applied");
        cell.pull(0, step, &[7], &mut out, short)
            .expect("its own push is applied");
        assert_ne!(out, vec![0.0], "the pull reads the push");
        cell.pull(1, OWN_LAG, &[7], &mut out, short)
            .expect("another worker's clock holds no one back");
    }

    fn distinct_in_first_seen_order(keys: &[u64]) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        keys.iter().copied().filter(|k| seen.insert(*k)).collect()
    }

    #[test]
    fn dirty_keys_take_each_key_once_across_compactions() {
        let keys: Vec<u64> = (0..3 * COMPACT_AT as u64)
            .map(|i| (i * 7919) % 5000)
            .chain([u64::MAX, 1 << 40, u64::MAX])
            .collect();
        let mut dirty = DirtyKeys::new(Some(16));
        dirty.add(&keys);
        assert_eq!(dirty.take(), distinct_in_first_seen_order(&keys));
        assert!(dirty.take().is_empty(), "take clears");
        dirty.add(&[3, 3, 9]);
        assert_eq!(dirty.take(), vec![3, 9], "bits are cleared by take");
    }

    #[test]
    fn dirty_keys_without_a_bitmap_sort_and_dedup() {
        let keys: Vec<u64> = (0..2 * COMPACT_AT as u64 + 5)
            .map(|i| (i * 104_729) % 70_001 + (1 << 50))
            .collect();
        let mut dirty = DirtyKeys::new(None);
        dirty.add(&keys);
        let mut want = keys.clone();
        want.sort_unstable();
        want.dedup();
        assert_eq!(dirty.take(), want);
        dirty.add(&[5, 5]);
        assert_eq!(dirty.take(), vec![5]);
    }
}
