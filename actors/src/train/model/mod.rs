//! A model is a seam: the [`Model`] trait holds everything the training
//! job knows about what it learns, so that a new model (factorization
//! machines, embeddings) is a new implementation here and no edit to the
//! workers ([`super::worker`]), the shards ([`super::shard`]) or serving
//! ([`super::serving`]), which are generic over it.
//!
//! A model owns:
//!
//! * **the slot layout**: [`Model::State`], what a shard's [`ParamTable`]
//!   keeps per key (the parameters and their optimizer state);
//! * **what travels and is served**: [`Model::Params`], the
//!   [`Model::WIDTH`] floats per key a pull returns, a push carries as the
//!   gradient, a serving delta carries, and serving holds;
//! * **predict and gradient**: a row is summed feature by feature into a
//!   [`Model::Row`] ([`Model::add`]), whose probability is
//!   [`Model::predict`]; the loss's slope at the row's margin is
//!   [`Model::margin_gradient`] and each feature's gradient
//!   [`Model::gradient`];
//! * **apply**: its per-key optimizer [`Rule`], resolved once per batch by
//!   [`Model::with_rule`], so every loop over keys is monomorphized for
//!   the rule at hand (no call through a pointer per key);
//! * **its snapshot header** (hyper-parameters), before the table.
//!
//! [`Learner`] is a model's table run by its rule: a parameter-server
//! shard's state, or a whole single-process learner. Logistic regression
//! ([`LogisticRegression`], with FTRL-Proximal, SGD or AdaGrad) is the
//! model the pipeline builds by default; [`FactorizationMachine`] adds
//! pairwise interactions through [`FACTORS`] factors per key.
//!
//! Between processes, `Push` and `Delta` carry [`Model::WIDTH`] floats per
//! key as a `List<Float32>` column (a plain `Float32` column at width 1),
//! and a remote pull's answer is a flat column of `keys × WIDTH`, so a
//! model of any width runs on the actor graph too.

mod factorization;
mod logistic;

pub use factorization::{FactorizationMachine, FmRow, FmState, FACTORS};
pub use logistic::{LogisticLearner, LogisticRegression};

use super::data::FeatureBatchRef;
use super::optimizer::{ParamsError, BIAS_KEY};
use super::table::{DecodeError, ParamTable, SlotRef, SlotState};
use std::fmt;

/// What a training job learns: per-key state and its optimizer, the
/// per-key parameters pulled and served, and a row's prediction and
/// gradient. See the [module docs](self).
///
/// Models are binary classifiers scored by logistic loss (the job's
/// evaluation is progressive logloss and AUC).
pub trait Model: Clone + fmt::Debug + Send + Sync + 'static {
    /// A key's slot in a shard's table: its parameters and their optimizer
    /// state. The default is a key never updated, whose parameters are all
    /// 0; reads never insert.
    type State: SlotState + fmt::Debug + Send + Sync;
    /// A key's parameters, [`Model::WIDTH`] floats: what a pull returns,
    /// a push's gradient, a serving delta's entry and what serving holds.
    type Params: SlotState + fmt::Debug + Send + Sync + AsRef<[f32]> + AsMut<[f32]>;
    /// Floats in [`Model::Params`].
    const WIDTH: usize;
    /// A row's running sum of what its prediction needs (for logistic
    /// regression, the margin `Σ wᵢ·xᵢ`); starts at its default.
    type Row: Copy + Default + fmt::Debug + Send + Sync;
    /// What reading a key for a prediction computed, kept for its update
    /// in the same row ([`Rule::see`], [`Rule::apply_seen`]).
    type Seen: Copy + fmt::Debug + Send + Sync;
    /// What an update leaves that the key's new parameters are computed
    /// from ([`Rule::params_of`], in one pass over a delta's updates).
    type Update: Copy + fmt::Debug + Send + Sync;
    /// Bytes of [`Model::write_header`].
    const HEADER_LEN: usize;

    /// Checks the hyper-parameters' ranges.
    fn validate(&self) -> Result<(), ParamsError>;

    /// Runs `job` with this model's per-key rule as a concrete type: the
    /// one dispatch per batch, after which `job`'s loops are
    /// monomorphized for the rule.
    fn with_rule<J: RuleJob<Self>>(&self, job: J) -> J::Output;

    /// The parameters a read saw.
    fn seen_params(seen: &Self::Seen) -> Self::Params;

    /// Adds feature `x`, whose parameters are `params` ([`Model::WIDTH`]
    /// floats), to `row`.
    fn add(&self, row: &mut Self::Row, params: &[f32], x: f32);

    /// The probability of a positive label for a row summed into `row`.
    fn predict(&self, row: &Self::Row) -> f32;

    /// The loss's derivative with respect to the row's margin, for a row
    /// predicted at `p` whose label is `label`. A row whose slope is 0
    /// updates nothing.
    fn margin_gradient(&self, p: f32, label: f32) -> f32;

    /// The loss's gradient with respect to the parameters `params` of a
    /// feature of value `x` in `row`, given the row's margin slope `d`.
    fn gradient(&self, row: &Self::Row, d: f32, params: &[f32], x: f32) -> Self::Params;

    /// How much a key was trained, for eviction under a capacity policy:
    /// the least-trained keys go first.
    fn activity(state: &Self::State) -> f32;

    /// Writes [`Model::HEADER_LEN`] bytes: what [`Model::read_header`]
    /// needs to make this model again (its hyper-parameters).
    fn write_header(&self, out: &mut Vec<u8>);

    /// The model [`Model::write_header`] wrote into `header`
    /// ([`Model::HEADER_LEN`] bytes).
    fn read_header(header: &[u8]) -> Result<Self, ModelDecodeError>;
}

/// A model's per-key update rule (its optimizer), a concrete type for
/// [`RuleJob::run`]. For every rule a zero gradient is a no-op and the
/// default state's parameters are 0: a key never updated reads 0
/// everywhere (pulls, serving), and reads never insert. A model whose
/// parameters start elsewhere (factors drawn at random) sets them at a
/// key's first update, from its `key`.
pub trait Rule<M: Model>: Copy {
    /// The parameters of a key in state `s`.
    fn params(self, s: &M::State) -> M::Params;
    /// Applies gradient `g` ([`Model::WIDTH`] floats) to `key`'s state `s`.
    fn apply(self, key: u64, s: &mut M::State, g: &[f32]);
    /// Reads a key for a prediction: its parameters
    /// ([`Model::seen_params`]) and what its update can reuse.
    fn see(self, s: &M::State) -> M::Seen;
    /// [`Rule::apply`] to a key read as `seen` (its state may have changed
    /// since, when the key repeats in a row); what its new parameters are
    /// computed from.
    fn apply_seen(self, key: u64, s: &mut M::State, g: &[f32], seen: &M::Seen) -> M::Update;
    /// The parameters updates left, [`Model::WIDTH`] floats each, into
    /// `out` (that long).
    fn params_of(self, updates: &[M::Update], out: &mut [f32]);
}

/// A loop over keys to run with a model's concrete [`Rule`]
/// ([`Model::with_rule`]): a closure generic over the rule.
pub trait RuleJob<M: Model> {
    /// What the job returns.
    type Output;
    /// Runs the job with `rule`.
    fn run<R: Rule<M>>(self, rule: R) -> Self::Output;
}

/// A row's shape or label is wrong; nothing was read or updated.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RowError {
    /// `values` is not one per feature.
    #[error("{values} values for {features} features")]
    ValuesLength {
        /// Features in the row.
        features: usize,
        /// Values given.
        values: usize,
    },
    /// The label is not in `[0, 1]`.
    #[error("label {0} is not in [0, 1]")]
    Label(f32),
}

/// A push was refused as a whole; nothing was updated.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum PushError {
    /// `grads` is not [`Model::WIDTH`] per key.
    #[error("{grads} gradients for {keys} keys")]
    Length {
        /// Keys pushed.
        keys: usize,
        /// Gradients pushed.
        grads: usize,
    },
    /// A gradient is NaN or infinite (it would poison the key for good).
    #[error("gradient {value} for key {key} is not finite")]
    NonFinite {
        /// The key.
        key: u64,
        /// Its gradient.
        value: f32,
    },
}

/// Why [`Learner::from_bytes`] refused a snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelDecodeError {
    /// The bytes do not start with the model magic.
    #[error("not a model snapshot (bad magic)")]
    BadMagic,
    /// Unknown format version.
    #[error("unsupported model snapshot version {0}")]
    UnsupportedVersion(u8),
    /// The bytes end inside the model header.
    #[error("model snapshot truncated")]
    Truncated,
    /// Unknown optimizer tag.
    #[error("unknown optimizer tag {0}")]
    UnknownOptimizer(u8),
    /// The recorded hyper-parameters are out of range.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The parameter table after the header is malformed.
    #[error(transparent)]
    Table(#[from] DecodeError),
}

const MAGIC: [u8; 4] = *b"BRMD";
const VERSION: u8 = 1;
/// Bias flag and bias key, after the model's header.
const BIAS_LEN: usize = 1 + 8;

/// Keys per [`ParamTable::prefetch`] in batch loops: enough misses in
/// flight to fill the core's line-fill buffers, few enough to stay cached
/// until the lookups come.
const PREFETCH_CHUNK: usize = 32;

/// A model's parameter table run by its rule.
///
/// * As a parameter-server shard: [`Learner::pull`] parameters,
///   [`Learner::push`] gradients; the optimizer runs here, per key.
/// * As a local learner: [`Learner::learn`] (predict, then train:
///   progressive validation) and [`Learner::predict`], which add the bias
///   feature ([`BIAS_KEY`], value 1) unless [`Learner::with_bias_key`]
///   turned it off.
///
/// The row and key loops allocate nothing once warm (beyond the table's
/// own growth); [`Learner::learn`] probes each key once and prefetches the
/// row's slots first. Logistic regression's learner is
/// [`LogisticLearner`].
#[derive(Debug)]
pub struct Learner<M: Model> {
    model: M,
    table: ParamTable<M::State>,
    bias: Option<u64>,
    /// The slots of the row being learned (reused: no allocation per row).
    scratch: Vec<(u64, SlotRef, f32, M::Seen)>,
}

impl<M: Model> Clone for Learner<M> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            table: self.table.clone(),
            bias: self.bias,
            scratch: Vec::new(),
        }
    }

    /// Reuses `self`'s table buffer when it is large enough.
    fn clone_from(&mut self, source: &Self) {
        self.model = source.model.clone();
        self.table.clone_from(&source.table);
        self.bias = source.bias;
    }
}

/// Checks that `values`, when given, are one per feature.
fn check_values(features: &[u64], values: Option<&[f32]>) -> Result<(), RowError> {
    match values {
        Some(v) if v.len() != features.len() => Err(RowError::ValuesLength {
            features: features.len(),
            values: v.len(),
        }),
        _ => Ok(()),
    }
}

fn check_label(label: f32) -> Result<(), RowError> {
    if (0.0..=1.0).contains(&label) {
        Ok(())
    } else {
        Err(RowError::Label(label))
    }
}

/// A push is refused as a whole if `grads` are not `width` per key (or
/// the `noted` slots one per key), or a gradient is not finite.
fn check_push(keys: &[u64], grads: &[f32], noted: usize, width: usize) -> Result<(), PushError> {
    if keys.len().checked_mul(width) != Some(grads.len()) || keys.len() != noted {
        return Err(PushError::Length {
            keys: keys.len(),
            grads: grads.len(),
        });
    }
    match grads.iter().position(|g| !g.is_finite()) {
        Some(i) => Err(PushError::NonFinite {
            key: keys[i / width.max(1)],
            value: grads[i],
        }),
        None => Ok(()),
    }
}

/// Whether a gradient updates anything.
#[inline]
fn nonzero(g: &[f32]) -> bool {
    g.iter().any(|&v| v != 0.0)
}

impl<M: Model> Learner<M> {
    /// An empty learner of `model` with the bias feature [`BIAS_KEY`],
    /// whose table holds `keys` keys before it grows (see
    /// [`ParamTable::with_capacity`]).
    pub fn with_model(model: M, keys: usize) -> Result<Self, ParamsError> {
        model.validate()?;
        Ok(Self {
            model,
            table: ParamTable::with_capacity(keys),
            bias: Some(BIAS_KEY),
            scratch: Vec::new(),
        })
    }

    /// A learner of `model` over an existing table (e.g. one restored
    /// from a snapshot).
    pub fn with_table(
        model: M,
        table: ParamTable<M::State>,
        bias: Option<u64>,
    ) -> Result<Self, ParamsError> {
        model.validate()?;
        Ok(Self {
            model,
            table,
            bias,
            scratch: Vec::new(),
        })
    }

    /// Sets the key of the constant feature rows get in
    /// [`Learner::predict`] and [`Learner::learn`], or `None` for no bias.
    pub fn with_bias_key(mut self, bias: Option<u64>) -> Self {
        self.bias = bias;
        self
    }

    /// The model (its hyper-parameters).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The bias feature's key, if rows get one.
    pub fn bias_key(&self) -> Option<u64> {
        self.bias
    }

    /// The parameter table (size, bytes per key, iteration).
    pub fn table(&self) -> &ParamTable<M::State> {
        &self.table
    }

    /// The parameter table for eviction ([`ParamTable::retain`]) and other
    /// maintenance.
    pub fn table_mut(&mut self) -> &mut ParamTable<M::State> {
        &mut self.table
    }

    /// The current parameters of `key` (0 if never updated).
    pub fn params(&self, key: u64) -> M::Params {
        struct Job<'a, M: Model>(&'a ParamTable<M::State>, u64);
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = M::Params;
            fn run<R: Rule<M>>(self, r: R) -> M::Params {
                self.0
                    .get(self.1)
                    .map_or_else(M::Params::default, |s| r.params(s))
            }
        }
        self.model.with_rule(Job::<M>(&self.table, key))
    }

    /// Replaces `out` with the parameters of `keys`, [`Model::WIDTH`]
    /// floats per key, in order. Absent keys read as 0 and are not
    /// inserted.
    pub fn pull(&self, keys: &[u64], out: &mut Vec<f32>) {
        out.clear();
        out.resize(keys.len() * M::WIDTH, 0.0);
        self.pull_into(keys, out);
    }

    /// [`Learner::pull`] into `out`, which holds [`Model::WIDTH`] floats
    /// per key (a store object's column, say); extra entries are left
    /// alone.
    pub fn pull_into(&self, keys: &[u64], out: &mut [f32]) {
        struct Job<'a, M: Model>(&'a ParamTable<M::State>, &'a [u64], &'a mut [f32]);
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = ();
            fn run<R: Rule<M>>(self, r: R) {
                let Job(table, keys, out) = self;
                let w = M::WIDTH;
                for (chunk, out) in keys
                    .chunks(PREFETCH_CHUNK)
                    .zip(out.chunks_mut(PREFETCH_CHUNK * w))
                {
                    table.prefetch(chunk);
                    for (p, &k) in out.chunks_exact_mut(w).zip(chunk) {
                        match table.get(k) {
                            Some(s) => p.copy_from_slice(r.params(s).as_ref()),
                            None => p.fill(0.0),
                        }
                    }
                }
            }
        }
        self.model.with_rule(Job::<M>(&self.table, keys, out));
    }

    /// Applies the gradient `grads[i·W..(i+1)·W]` ([`Model::WIDTH`] `W`) to
    /// `keys[i]`, in order, so a key that repeats is updated once per
    /// occurrence. Zero gradients are no-ops and insert nothing. Refused
    /// as a whole if the lengths differ or a gradient is not finite.
    pub fn push(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), PushError> {
        check_push(keys, grads, keys.len(), M::WIDTH)?;
        struct Job<'a, M: Model>(&'a mut ParamTable<M::State>, &'a [u64], &'a [f32]);
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = ();
            fn run<R: Rule<M>>(self, r: R) {
                let Job(table, keys, grads) = self;
                let w = M::WIDTH;
                for (keys, grads) in keys
                    .chunks(PREFETCH_CHUNK)
                    .zip(grads.chunks(PREFETCH_CHUNK * w))
                {
                    table.prefetch(keys);
                    for (&k, g) in keys.iter().zip(grads.chunks_exact(w)) {
                        if nonzero(g) {
                            r.apply(k, table.get_or_insert_default(k), g);
                        }
                    }
                }
            }
        }
        self.model.with_rule(Job::<M>(&mut self.table, keys, grads));
        Ok(())
    }

    /// [`Learner::push`] that hands `note` each key's update as it is
    /// applied (what its new parameters are computed from,
    /// [`Rule::params_of`]): a serving delta then needs no second lookup.
    pub(crate) fn push_noting<F: FnMut(u64, M::Update)>(
        &mut self,
        keys: &[u64],
        grads: &[f32],
        note: &mut F,
    ) -> Result<(), PushError> {
        check_push(keys, grads, keys.len(), M::WIDTH)?;
        struct Job<'a, M: Model, F>(
            &'a mut ParamTable<M::State>,
            &'a [u64],
            &'a [f32],
            &'a mut F,
        );
        impl<M: Model, F: FnMut(u64, M::Update)> RuleJob<M> for Job<'_, M, F> {
            type Output = ();
            fn run<R: Rule<M>>(self, r: R) {
                let Job(table, keys, grads, note) = self;
                let w = M::WIDTH;
                for (keys, grads) in keys
                    .chunks(PREFETCH_CHUNK)
                    .zip(grads.chunks(PREFETCH_CHUNK * w))
                {
                    table.prefetch(keys);
                    for (&k, g) in keys.iter().zip(grads.chunks_exact(w)) {
                        if nonzero(g) {
                            let s = table.get_or_insert_default(k);
                            let seen = r.see(s);
                            note(k, r.apply_seen(k, s, g, &seen));
                        }
                    }
                }
            }
        }
        self.model
            .with_rule(Job::<M, F>(&mut self.table, keys, grads, note));
        Ok(())
    }

    /// [`Learner::pull`] that also notes where each key lives (`None`:
    /// absent), for [`Learner::push_at`] to update without probing again.
    /// The table first makes room for every absent key, so the notes stay
    /// valid through `push_at`'s inserts; any other change to the table
    /// in between voids them.
    pub(crate) fn pull_at(
        &mut self,
        keys: &[u64],
        at: &mut Vec<Option<SlotRef>>,
        out: &mut Vec<f32>,
    ) {
        struct Job<'a, M: Model>(
            &'a ParamTable<M::State>,
            &'a [u64],
            &'a mut Vec<Option<SlotRef>>,
            &'a mut Vec<f32>,
        );
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = usize;
            fn run<R: Rule<M>>(self, r: R) -> usize {
                let Job(table, keys, at, out) = self;
                let mut absent = 0usize;
                for chunk in keys.chunks(PREFETCH_CHUNK) {
                    table.prefetch(chunk);
                    for &k in chunk {
                        let slot = table.locate(k);
                        match slot {
                            Some(s) => out.extend_from_slice(r.params(&table.state(s)).as_ref()),
                            None => {
                                absent += 1;
                                out.extend_from_slice(M::Params::default().as_ref());
                            }
                        }
                        at.push(slot);
                    }
                }
                absent
            }
        }
        loop {
            at.clear();
            out.clear();
            at.reserve(keys.len());
            out.reserve(keys.len() * M::WIDTH);
            let absent = self
                .model
                .with_rule(Job::<M>(&self.table, keys, &mut *at, &mut *out));
            if self.table.has_room(absent) {
                return;
            }
            self.table.reserve(absent);
        }
    }

    /// [`Learner::push`] with the slots [`Learner::pull_at`] noted for the
    /// same `keys`: the same updates in the same order, without a second
    /// probe for keys that were present.
    pub(crate) fn push_at(
        &mut self,
        keys: &[u64],
        at: &[Option<SlotRef>],
        grads: &[f32],
    ) -> Result<(), PushError> {
        check_push(keys, grads, at.len(), M::WIDTH)?;
        struct Job<'a, M: Model>(
            &'a mut ParamTable<M::State>,
            &'a [u64],
            &'a [Option<SlotRef>],
            &'a [f32],
        );
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = ();
            fn run<R: Rule<M>>(self, r: R) {
                let Job(table, keys, at, grads) = self;
                for ((&k, &slot), g) in keys.iter().zip(at).zip(grads.chunks_exact(M::WIDTH)) {
                    if nonzero(g) {
                        let s = match slot {
                            Some(s) => s,
                            None => table.locate_or_insert(k),
                        };
                        r.apply(k, table.state_mut(s), g);
                    }
                }
            }
        }
        self.model
            .with_rule(Job::<M>(&mut self.table, keys, at, grads));
        Ok(())
    }

    /// A row summed over `features`, with `xᵢ = values[i]` (or 1 when
    /// `values` is `None`), then the bias (value 1): the order
    /// [`Learner::learn`], the workers and serving sum a row in, so all
    /// predict the same bits from the same parameters.
    pub fn row(&self, features: &[u64], values: Option<&[f32]>) -> Result<M::Row, RowError> {
        check_values(features, values)?;
        struct Job<'a, M: Model>(&'a Learner<M>, &'a [u64], Option<&'a [f32]>);
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = M::Row;
            fn run<R: Rule<M>>(self, r: R) -> M::Row {
                let Job(learner, features, values) = self;
                let (model, table) = (&learner.model, &learner.table);
                table.prefetch(features);
                let mut row = M::Row::default();
                let mut add = |k: u64, x: f32| {
                    let p = table
                        .get(k)
                        .map_or_else(M::Params::default, |s| r.params(s));
                    model.add(&mut row, p.as_ref(), x);
                };
                for (i, &k) in features.iter().enumerate() {
                    add(k, values.map_or(1.0, |v| v[i]));
                }
                if let Some(b) = learner.bias {
                    add(b, 1.0);
                }
                row
            }
        }
        Ok(self.model.with_rule(Job(self, features, values)))
    }

    /// The probability of a positive label for a row: [`Model::predict`]
    /// of [`Learner::row`].
    pub fn predict(&self, features: &[u64], values: Option<&[f32]>) -> Result<f32, RowError> {
        let row = self.row(features, values)?;
        Ok(self.model.predict(&row))
    }

    /// Predicts the row, then trains on it with the model's gradient for
    /// each feature (and the bias, value 1, last); returns the prediction
    /// made *before* the update (progressive validation). `label` is 0 or
    /// 1 (any value in `[0, 1]` is accepted as a soft label). Every
    /// feature with a non-zero value is inserted into the table.
    pub fn learn(
        &mut self,
        features: &[u64],
        values: Option<&[f32]>,
        label: f32,
    ) -> Result<f32, RowError> {
        check_values(features, values)?;
        check_label(label)?;
        struct Job<'a, M: Model> {
            model: &'a M,
            table: &'a mut ParamTable<M::State>,
            scratch: &'a mut Vec<(u64, SlotRef, f32, M::Seen)>,
            bias: Option<u64>,
            features: &'a [u64],
            values: Option<&'a [f32]>,
            label: f32,
        }
        impl<M: Model> RuleJob<M> for Job<'_, M> {
            type Output = f32;
            /// Each key is probed once: the predict pass inserts it and
            /// keeps its slot in `scratch` for the update pass.
            #[inline]
            fn run<R: Rule<M>>(self, r: R) -> f32 {
                let Job {
                    model,
                    table,
                    scratch,
                    bias,
                    features,
                    values,
                    label,
                } = self;
                // No insert below may grow the table, or the slot refs
                // would go stale.
                table.reserve(features.len() + 1);
                table.prefetch(features);
                scratch.clear();
                let mut row = M::Row::default();
                for (i, &k) in features.iter().enumerate() {
                    let x = values.map_or(1.0, |v| v[i]);
                    // A zero value has a zero gradient: nothing to read or
                    // insert.
                    if x != 0.0 {
                        let at = table.locate_or_insert(k);
                        let seen = r.see(&table.state(at));
                        model.add(&mut row, M::seen_params(&seen).as_ref(), x);
                        scratch.push((k, at, x, seen));
                    }
                }
                if let Some(b) = bias {
                    let at = table.locate_or_insert(b);
                    let seen = r.see(&table.state(at));
                    model.add(&mut row, M::seen_params(&seen).as_ref(), 1.0);
                    scratch.push((b, at, 1.0, seen));
                }
                let p = model.predict(&row);
                let d = model.margin_gradient(p, label);
                if d != 0.0 {
                    for (k, at, x, seen) in scratch.iter() {
                        let g = model.gradient(&row, d, M::seen_params(seen).as_ref(), *x);
                        r.apply_seen(*k, table.state_mut(*at), g.as_ref(), seen);
                    }
                }
                p
            }
        }
        let job = Job {
            model: &self.model,
            table: &mut self.table,
            scratch: &mut self.scratch,
            bias: self.bias,
            features,
            values,
            label,
        };
        Ok(self.model.with_rule(job))
    }

    /// A snapshot for checkpoints: the model's header, bias key, then the
    /// table's [`ParamTable::to_bytes`]. Round-trips byte for byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The length of [`Learner::to_bytes`]'s encoding.
    pub fn encoded_len(&self) -> usize {
        MAGIC.len() + 1 + M::HEADER_LEN + BIAS_LEN + self.table.encoded_len()
    }

    /// Appends [`Learner::to_bytes`]'s encoding to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        self.model.write_header(out);
        out.push(u8::from(self.bias.is_some()));
        out.extend_from_slice(&self.bias.unwrap_or(0).to_le_bytes());
        self.table.write_to(out);
    }

    /// Reads a snapshot written by [`Learner::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelDecodeError> {
        let head = MAGIC.len() + 1;
        let header_len = head + M::HEADER_LEN + BIAS_LEN;
        let header = bytes.get(..header_len).ok_or(ModelDecodeError::Truncated)?;
        if header[..4] != MAGIC {
            return Err(ModelDecodeError::BadMagic);
        }
        if header[4] != VERSION {
            return Err(ModelDecodeError::UnsupportedVersion(header[4]));
        }
        let model = M::read_header(&header[head..head + M::HEADER_LEN])?;
        let at = head + M::HEADER_LEN;
        let mut key = [0u8; 8];
        key.copy_from_slice(&header[at + 1..at + BIAS_LEN]);
        let bias = (header[at] != 0).then_some(u64::from_le_bytes(key));
        let table = ParamTable::from_bytes(&bytes[header_len..])?;
        Ok(Self::with_table(model, table, bias)?)
    }
}

/// Trains a model split into shards row by row, in place: for each row,
/// predict (progressive validation), then apply each feature's gradient,
/// and the bias's (value 1), in its shard's table (`shard_of`), once per
/// occurrence. The same updates as [`Learner::learn`] on one table.
/// `predictions` gets each row's prediction; `touch(shard, key, update)`
/// sees every update, in order (bias last in each row), with what the
/// key's new parameters are computed from ([`params_of`]). The learners'
/// own bias keys are not used.
pub(crate) fn learn_sharded<M: Model>(
    learners: &mut [&mut Learner<M>],
    shard_of: &dyn Fn(u64) -> usize,
    bias: u64,
    rows: FeatureBatchRef<'_>,
    predictions: &mut Vec<f32>,
    touch: impl FnMut(usize, u64, M::Update),
) -> Result<(), RowError> {
    struct Job<'a, 'b, M: Model, T> {
        model: M,
        tables: Vec<&'a mut ParamTable<M::State>>,
        shard_of: &'a dyn Fn(u64) -> usize,
        bias: u64,
        rows: FeatureBatchRef<'b>,
        predictions: &'a mut Vec<f32>,
        touch: T,
    }
    impl<M: Model, T: FnMut(usize, u64, M::Update)> RuleJob<M> for Job<'_, '_, M, T> {
        type Output = Result<(), RowError>;
        fn run<R: Rule<M>>(mut self, r: R) -> Result<(), RowError> {
            let mut scratch = Vec::new();
            let rows = self.rows;
            for i in 0..rows.rows() {
                if let ([t], true) = (self.tables.as_slice(), i + 1 < rows.rows()) {
                    for &k in rows.row(i + 1).1 {
                        t.prefetch_ahead(k);
                    }
                }
                let (label, ids, values) = rows.row(i);
                check_values(ids, values)?;
                check_label(label)?;
                let p = learn_row(
                    r,
                    &self.model,
                    &mut self.tables,
                    self.shard_of,
                    &mut scratch,
                    &mut self.touch,
                    self.bias,
                    ids,
                    values,
                    label,
                );
                self.predictions.push(p);
            }
            Ok(())
        }
    }
    let Some(model) = learners.first().map(|l| l.model.clone()) else {
        return Ok(());
    };
    let tables = learners.iter_mut().map(|l| &mut l.table).collect();
    let job = Job {
        model: model.clone(),
        tables,
        shard_of,
        bias,
        rows,
        predictions,
        touch,
    };
    model.with_rule(job)
}

/// One row of [`learn_sharded`]: every key of the row, then `bias` (of
/// value 1), is probed once; each one updated is reported to `touch` with
/// its shard and update.
#[allow(clippy::too_many_arguments)]
#[inline]
fn learn_row<M: Model, R: Rule<M>, T: FnMut(usize, u64, M::Update)>(
    r: R,
    model: &M,
    tables: &mut [&mut ParamTable<M::State>],
    shard_of: &dyn Fn(u64) -> usize,
    scratch: &mut Vec<(u32, u64, SlotRef, f32, M::Seen)>,
    touch: &mut T,
    bias: u64,
    features: &[u64],
    values: Option<&[f32]>,
    label: f32,
) -> f32 {
    for t in tables.iter_mut() {
        t.reserve(features.len() + 1);
    }
    scratch.clear();
    let mut row = M::Row::default();
    let x_at = |i: usize| values.map_or(1.0, |v| v[i]);
    for (i, &k) in features.iter().chain(std::iter::once(&bias)).enumerate() {
        let x = if i < features.len() { x_at(i) } else { 1.0 };
        if x != 0.0 {
            let s = if tables.len() == 1 { 0 } else { shard_of(k) };
            let t = &mut tables[s];
            let at = t.locate_or_insert(k);
            let seen = r.see(&t.state(at));
            model.add(&mut row, M::seen_params(&seen).as_ref(), x);
            scratch.push((s as u32, k, at, x, seen));
        }
    }
    let p = model.predict(&row);
    let d = model.margin_gradient(p, label);
    if d != 0.0 {
        for (s, k, at, x, seen) in scratch.iter() {
            let g = model.gradient(&row, d, M::seen_params(seen).as_ref(), *x);
            let update = r.apply_seen(*k, tables[*s as usize].state_mut(*at), g.as_ref(), seen);
            touch(*s as usize, *k, update);
        }
    }
    p
}

/// Appends the parameters `updates` leave under `model`, [`Model::WIDTH`]
/// floats each, in order.
pub(crate) fn params_of<M: Model>(model: &M, updates: &[M::Update], out: &mut Vec<f32>) {
    struct Job<'a, M: Model>(&'a [M::Update], &'a mut Vec<f32>);
    impl<M: Model> RuleJob<M> for Job<'_, M> {
        type Output = ();
        fn run<R: Rule<M>>(self, r: R) {
            let Job(updates, out) = self;
            let start = out.len();
            out.resize(start + updates.len() * M::WIDTH, 0.0);
            r.params_of(updates, &mut out[start..]);
        }
    }
    model.with_rule(Job::<M>(updates, out));
}
