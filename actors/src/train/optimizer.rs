//! Per-key optimizers for sparse logistic regression — FTRL-Proximal, SGD and
//! AdaGrad — and [`Model`], a [`ParamTable`] run by one of them: the state
//! of a parameter-server shard, or a whole single-process learner.
//!
//! Every optimizer keeps a [`KeyState`] of two `f32` per key, so the table's
//! slots are 16 bytes (see [`super::table`] for the bytes-per-key bound). A
//! key never updated has the default state, whose weight is 0 under every
//! optimizer, so reads never insert.
//!
//! # FTRL-Proximal
//!
//! McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches",
//! Algorithm 1, with per-coordinate learning rates. Per key the state is
//! `[z, n]`; the weight is computed lazily from it:
//!
//! ```text
//! w = 0                                               if |z| ≤ λ1
//! w = −(z − sgn(z)·λ1) / ((β + √n)/α + λ2)           otherwise
//! ```
//!
//! and a gradient `g` updates it as `σ = (√(n + g²) − √n)/α`,
//! `z ← z + g − σ·w`, `n ← n + g²` (with `w` the weight before the update).
//!
//! # Matching Vowpal Wabbit
//!
//! `vw --ftrl --loss_function logistic` runs the same algorithm in `f32`
//! (its `--l1`/`--l2` are λ1/λ2 unscaled). To reproduce its progressive
//! predictions a [`Model`] adds, like VW by default, a constant feature of
//! value 1 to every row ([`BIAS_KEY`]); VW's −1/+1 labels give the same
//! gradient `p − y` as 0/1 labels here. The remaining differences (VW
//! clamps the logit to ±50 rather than ±35, its summation order) are far
//! below the 0.002 logloss tolerance the `train_optimizer` test holds us to.

use super::table::{DecodeError, ParamTable, SlotRef};

/// Per-key optimizer state, two `f32`:
///
/// * FTRL: `[z, n]` (the adjusted gradient sum and the squared-gradient sum);
/// * SGD: `[w, unused]`;
/// * AdaGrad: `[w, Σg²]`.
pub type KeyState = [f32; 2];

/// The feature key that stands for the constant (bias) feature of value 1
/// that [`Model::predict`] and [`Model::learn`] add to every row, as VW
/// does. `u64::MAX` lies outside any masked hash space (`gen_ctr.py` ids
/// are below 2^22), so it never collides with a real feature.
pub const BIAS_KEY: u64 = u64::MAX;

/// Logits are clamped to `±MAX_LOGIT` before the sigmoid.
pub const MAX_LOGIT: f32 = 35.0;

/// Probabilities are clamped to `[MIN_PROBABILITY, 1 − MIN_PROBABILITY]`
/// before taking logs in [`logloss`].
pub const MIN_PROBABILITY: f32 = 1e-7;

/// The logistic function of a logit clamped to `±`[`MAX_LOGIT`].
#[inline]
pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit.clamp(-MAX_LOGIT, MAX_LOGIT)).exp())
}

/// The logistic loss's gradient with respect to the margin, for a row
/// predicted at `p` whose label is `label`: each weight's gradient is this
/// times its feature's value. The one place logistic regression's
/// gradient is written (the chained trainer, the row learner and the
/// workers' pushes all use it).
#[inline]
pub fn margin_gradient(p: f32, label: f32) -> f32 {
    p - label
}

/// `p` clamped to `[MIN_PROBABILITY, 1 − MIN_PROBABILITY]` (NaN stays NaN).
#[inline]
pub fn clamp_probability(p: f32) -> f32 {
    p.clamp(MIN_PROBABILITY, 1.0 - MIN_PROBABILITY)
}

/// Logistic loss of predicting `p` for a 0/1 `label`, with `p` clamped by
/// [`clamp_probability`]; computed in `f64`.
#[inline]
pub fn logloss(p: f32, label: f32) -> f64 {
    let p = f64::from(clamp_probability(p));
    let y = f64::from(label);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// Hyper-parameters of FTRL-Proximal (McMahan et al. 2013, Algorithm 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FtrlParams {
    /// α: scale of the per-coordinate learning rate `α / (β + √n)`; > 0.
    pub alpha: f32,
    /// β: smoothing of the per-coordinate learning rate; ≥ 0.
    pub beta: f32,
    /// λ1: L1 regularization, which makes weights exactly 0 while
    /// `|z| ≤ λ1`; ≥ 0.
    pub l1: f32,
    /// λ2: L2 regularization; ≥ 0.
    pub l2: f32,
}

/// Which optimizer a shard runs per key.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerKind {
    /// FTRL-Proximal; state `[z, n]`.
    Ftrl(FtrlParams),
    /// Plain SGD, `w ← w − lr·g`; state `[w, _]`.
    Sgd {
        /// Learning rate; > 0.
        lr: f32,
    },
    /// AdaGrad, `G ← G + g²`, `w ← w − lr·g / (√G + eps)`; state `[w, G]`.
    AdaGrad {
        /// Learning rate; > 0.
        lr: f32,
        /// Added to `√G` in the denominator; ≥ 0.
        eps: f32,
    },
}

/// A hyper-parameter out of its range.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{name} must be finite and {bound}, got {value}")]
pub struct ParamsError {
    /// The hyper-parameter (`"alpha"`, `"lr"`, …).
    pub name: &'static str,
    /// What it must be: `"> 0"` or `">= 0"`.
    pub bound: &'static str,
    /// The value given.
    pub value: f32,
}

fn positive(name: &'static str, value: f32) -> Result<(), ParamsError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ParamsError {
            name,
            bound: "> 0",
            value,
        })
    }
}

fn non_negative(name: &'static str, value: f32) -> Result<(), ParamsError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ParamsError {
            name,
            bound: ">= 0",
            value,
        })
    }
}

/// A key's state as a prediction read it, with what the read computed:
/// the weight and, for FTRL, `√n`. The key's update reuses them while its
/// state is still those bits (a key repeated in a row changed in between),
/// so the result is bit for bit that of reading the state again.
#[derive(Debug, Clone, Copy)]
struct Seen {
    state: KeyState,
    weight: f32,
    sqrt_n: f32,
}

impl Seen {
    /// Whether `s` is still the state that was read.
    #[inline]
    fn holds(&self, s: &KeyState) -> bool {
        s[0].to_bits() == self.state[0].to_bits() && s[1].to_bits() == self.state[1].to_bits()
    }
}

/// What an update leaves that a key's new weight is computed from (FTRL:
/// `z` and `√n`; SGD and AdaGrad: the weight itself, in `a`). Turning a
/// list of them into weights afterwards ([`weights_of`]) is a loop the
/// compiler vectorizes, where a division per update inside the training
/// loop would sit on its critical path. The weight is bit for bit that of
/// the updated state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Fresh {
    a: f32,
    b: f32,
}

/// One optimizer's per-key rule, monomorphized into the row loops so the
/// hot path carries no per-feature dispatch. For every rule a zero gradient
/// is a no-op and the default state has weight 0.
trait Rule: Copy {
    fn weight(self, s: &KeyState) -> f32;
    fn apply(self, s: &mut KeyState, g: f32);
    /// Reads a key for a prediction: its weight, and what its update can
    /// reuse.
    #[inline]
    fn see(self, s: &KeyState) -> Seen {
        Seen {
            state: *s,
            weight: self.weight(s),
            sqrt_n: 0.0,
        }
    }
    /// [`Rule::apply`] to a key read as `seen`; what its new weight needs.
    #[inline]
    fn apply_seen(self, s: &mut KeyState, g: f32, _seen: &Seen) -> Fresh {
        self.apply(s, g);
        Fresh {
            a: self.weight(s),
            b: 0.0,
        }
    }
    /// The weights updates left, into `out` (as long as `fresh`).
    #[inline]
    fn weights_of(self, fresh: &[Fresh], out: &mut [f32]) {
        for (w, f) in out.iter_mut().zip(fresh) {
            *w = f.a;
        }
    }
}

impl FtrlParams {
    /// The weight for `z` and `√n`.
    #[inline]
    fn weight_from(self, z: f32, sqrt_n: f32) -> f32 {
        if z.abs() <= self.l1 {
            0.0
        } else {
            -(z - self.l1.copysign(z)) / ((self.beta + sqrt_n) / self.alpha + self.l2)
        }
    }

    /// [`FtrlParams::weight_from`] of each `fresh` into `out`, written
    /// without branches so that it vectorizes: `l1.copysign(z)` is
    /// `signum(z)·l1` (λ1 ≥ 0), and both sides of the choice are computed.
    fn weights_from(self, fresh: &[Fresh], out: &mut [f32]) {
        for (w, f) in out.iter_mut().zip(fresh) {
            let z = f.a;
            let v = -(z - self.l1.copysign(z)) / ((self.beta + f.b) / self.alpha + self.l2);
            *w = if z.abs() <= self.l1 { 0.0 } else { v };
        }
    }

    /// McMahan et al.'s update of `s` by gradient `g`, given the weight `w`
    /// and `√n` of `s`.
    #[inline]
    fn update(self, s: &mut KeyState, g: f32, w: f32, sqrt_n: f32) -> Fresh {
        let [z, n] = *s;
        let n_new = n + g * g;
        let sqrt_n_new = n_new.sqrt();
        let sigma = (sqrt_n_new - sqrt_n) / self.alpha;
        let z_new = z + g - sigma * w;
        *s = [z_new, n_new];
        Fresh {
            a: z_new,
            b: sqrt_n_new,
        }
    }

    /// Checks the ranges: α > 0; β, λ1, λ2 ≥ 0; all finite.
    pub fn validate(&self) -> Result<(), ParamsError> {
        positive("alpha", self.alpha)?;
        non_negative("beta", self.beta)?;
        non_negative("l1", self.l1)?;
        non_negative("l2", self.l2)
    }
}

impl Rule for FtrlParams {
    #[inline]
    fn weight(self, s: &KeyState) -> f32 {
        self.weight_from(s[0], s[1].sqrt())
    }

    #[inline]
    fn apply(self, s: &mut KeyState, g: f32) {
        let read = self.see(s);
        self.update(s, g, read.weight, read.sqrt_n);
    }

    #[inline]
    fn see(self, s: &KeyState) -> Seen {
        let sqrt_n = s[1].sqrt();
        Seen {
            state: *s,
            weight: self.weight_from(s[0], sqrt_n),
            sqrt_n,
        }
    }

    #[inline]
    fn apply_seen(self, s: &mut KeyState, g: f32, seen: &Seen) -> Fresh {
        let read = if seen.holds(s) { *seen } else { self.see(s) };
        self.update(s, g, read.weight, read.sqrt_n)
    }

    #[inline]
    fn weights_of(self, fresh: &[Fresh], out: &mut [f32]) {
        self.weights_from(fresh, out);
    }
}

#[derive(Clone, Copy)]
struct Sgd {
    lr: f32,
}

impl Rule for Sgd {
    #[inline]
    fn weight(self, s: &KeyState) -> f32 {
        s[0]
    }

    #[inline]
    fn apply(self, s: &mut KeyState, g: f32) {
        s[0] -= self.lr * g;
    }
}

#[derive(Clone, Copy)]
struct AdaGrad {
    lr: f32,
    eps: f32,
}

impl Rule for AdaGrad {
    #[inline]
    fn weight(self, s: &KeyState) -> f32 {
        s[0]
    }

    #[inline]
    fn apply(self, s: &mut KeyState, g: f32) {
        s[1] += g * g;
        let denom = s[1].sqrt() + self.eps;
        // Only 0 when eps = 0 and g² underflowed; then there is no step.
        if denom > 0.0 {
            s[0] -= self.lr * g / denom;
        }
    }
}

/// Runs `$body` with `$r` bound to the concrete [`Rule`] of `$kind`.
macro_rules! with_rule {
    ($kind:expr, $r:ident => $body:expr) => {
        match $kind {
            OptimizerKind::Ftrl(p) => {
                let $r = p;
                $body
            }
            OptimizerKind::Sgd { lr } => {
                let $r = Sgd { lr };
                $body
            }
            OptimizerKind::AdaGrad { lr, eps } => {
                let $r = AdaGrad { lr, eps };
                $body
            }
        }
    };
}

/// Appends the weights `fresh` leaves under `kind`, in order.
pub(crate) fn weights_of(kind: OptimizerKind, fresh: &[Fresh], out: &mut Vec<f32>) {
    fn run<R: Rule>(r: R, fresh: &[Fresh], out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + fresh.len(), 0.0);
        r.weights_of(fresh, &mut out[start..]);
    }
    with_rule!(kind, r => run(r, fresh, out));
}

impl OptimizerKind {
    /// Checks every hyper-parameter's range (see the fields' docs).
    pub fn validate(&self) -> Result<(), ParamsError> {
        match *self {
            OptimizerKind::Ftrl(p) => p.validate(),
            OptimizerKind::Sgd { lr } => positive("lr", lr),
            OptimizerKind::AdaGrad { lr, eps } => {
                positive("lr", lr)?;
                non_negative("eps", eps)
            }
        }
    }

    /// The weight a key with `state` has (for FTRL the closed form from
    /// `z` and `n`; 0 for the default state).
    #[inline]
    pub fn weight(&self, state: &KeyState) -> f32 {
        with_rule!(*self, r => r.weight(state))
    }

    /// Applies one gradient of the loss with respect to this key's weight.
    #[inline]
    pub fn apply(&self, state: &mut KeyState, gradient: f32) {
        with_rule!(*self, r => r.apply(state, gradient))
    }
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
    /// `grads` is not one per key.
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

/// Why [`Model::from_bytes`] refused a snapshot.
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

const MODEL_MAGIC: [u8; 4] = *b"BRMD";
const MODEL_VERSION: u8 = 1;
/// magic, version, optimizer tag, 4 × f32 hyper-parameters, bias flag, bias key.
const MODEL_HEADER_LEN: usize = 4 + 1 + 1 + 16 + 1 + 8;

/// Sum of `weight · value` over a row, bias included.
#[inline]
fn margin_with<R: Rule>(
    r: R,
    table: &ParamTable<KeyState>,
    bias: Option<u64>,
    features: &[u64],
    values: Option<&[f32]>,
) -> f32 {
    table.prefetch(features);
    let w = |k: u64| table.get(k).map_or(0.0, |s| r.weight(s));
    let mut m = bias.map_or(0.0, w);
    match values {
        None => {
            for &k in features {
                m += w(k);
            }
        }
        Some(values) => {
            for (&k, &x) in features.iter().zip(values) {
                m += w(k) * x;
            }
        }
    }
    m
}

/// Predicts, then applies the logistic-loss gradient `(p − y)·x` to every
/// feature in order (a repeated key is updated once per occurrence), then
/// to the bias. Each key is probed once: the predict pass inserts it and
/// keeps its slot in `scratch` for the update pass.
#[inline]
fn learn_with<R: Rule>(
    r: R,
    table: &mut ParamTable<KeyState>,
    scratch: &mut Vec<(SlotRef, f32, Seen)>,
    bias: Option<u64>,
    features: &[u64],
    values: Option<&[f32]>,
    label: f32,
) -> f32 {
    // No insert below may grow the table, or the slot refs would go stale.
    table.reserve(features.len() + 1);
    table.prefetch(features);
    scratch.clear();
    let mut m = 0.0;
    match values {
        None => {
            for &k in features {
                let at = table.locate_or_insert(k);
                let seen = r.see(&table.state(at));
                m += seen.weight;
                scratch.push((at, 1.0, seen));
            }
        }
        Some(values) => {
            for (&k, &x) in features.iter().zip(values) {
                // A zero value has a zero gradient: nothing to read or insert.
                if x != 0.0 {
                    let at = table.locate_or_insert(k);
                    let seen = r.see(&table.state(at));
                    m += seen.weight * x;
                    scratch.push((at, x, seen));
                }
            }
        }
    }
    let bias_at = bias.map(|b| {
        let at = table.locate_or_insert(b);
        (at, r.see(&table.state(at)))
    });
    if let Some((_, seen)) = &bias_at {
        m += seen.weight;
    }
    let p = sigmoid(m);
    let d = margin_gradient(p, label);
    if d != 0.0 {
        for (at, x, seen) in scratch.iter() {
            r.apply_seen(table.state_mut(*at), d * x, seen);
        }
        if let Some((at, seen)) = &bias_at {
            r.apply_seen(table.state_mut(*at), d, seen);
        }
    }
    p
}

/// [`learn_with`] over a model split into shards: `shard_of` picks each
/// key's table. Every key of the row (then `bias`, value 1) is probed once;
/// each one updated is reported to `touch` with its shard and [`Fresh`] state.
#[allow(clippy::too_many_arguments)]
#[inline]
fn learn_sharded_with<R: Rule, T: FnMut(usize, u64, Fresh)>(
    r: R,
    tables: &mut [&mut ParamTable<KeyState>],
    shard_of: &dyn Fn(u64) -> usize,
    scratch: &mut Vec<(u32, u64, SlotRef, f32, Seen)>,
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
    let mut m = 0.0;
    let x_at = |i: usize| values.map_or(1.0, |v| v[i]);
    for (i, &k) in features.iter().chain(std::iter::once(&bias)).enumerate() {
        let x = if i < features.len() { x_at(i) } else { 1.0 };
        if x != 0.0 {
            let s = if tables.len() == 1 { 0 } else { shard_of(k) };
            let t = &mut tables[s];
            let at = t.locate_or_insert(k);
            let seen = r.see(&t.state(at));
            m += seen.weight * x;
            scratch.push((s as u32, k, at, x, seen));
        }
    }
    let p = sigmoid(m);
    let d = margin_gradient(p, label);
    if d != 0.0 {
        for (s, k, at, x, seen) in scratch.iter() {
            let fresh = r.apply_seen(tables[*s as usize].state_mut(*at), d * x, seen);
            touch(*s as usize, *k, fresh);
        }
    }
    p
}

/// Trains a model split into shards row by row, in place: for each row,
/// predict (progressive validation), then apply `(p − y)·xᵢ` to every
/// feature and `p − y` to `bias` in its shard's table (`shard_of`), once
/// per occurrence. The same updates as [`Model::learn`] on one table.
/// `predictions` gets each row's prediction; `touch(shard, key, fresh)`
/// sees every update, in order (bias last in each row), with what the
/// key's new weight is computed from ([`weights_of`]). The models' own bias
/// keys are not used.
pub(crate) fn learn_sharded(
    models: &mut [&mut Model],
    shard_of: &dyn Fn(u64) -> usize,
    bias: u64,
    rows: super::data::FeatureBatchRef<'_>,
    predictions: &mut Vec<f32>,
    mut touch: impl FnMut(usize, u64, Fresh),
) -> Result<(), RowError> {
    let Some(kind) = models.first().map(|m| m.kind) else {
        return Ok(());
    };
    let mut scratch = Vec::new();
    let mut tables: Vec<&mut ParamTable<KeyState>> =
        models.iter_mut().map(|m| &mut m.table).collect();
    for i in 0..rows.rows() {
        if let ([t], true) = (tables.as_slice(), i + 1 < rows.rows()) {
            for &k in rows.row(i + 1).1 {
                t.prefetch_ahead(k);
            }
        }
        let (label, ids, values) = rows.row(i);
        Model::check_values(ids, values)?;
        if !(0.0..=1.0).contains(&label) {
            return Err(RowError::Label(label));
        }
        let p = with_rule!(kind, r => learn_sharded_with(
            r, &mut tables, shard_of, &mut scratch, &mut touch, bias, ids, values, label
        ));
        predictions.push(p);
    }
    Ok(())
}

/// A push is refused as a whole if `grads` (or the `noted` slots) are not
/// one per key, or a gradient is not finite.
fn check_push(keys: &[u64], grads: &[f32], noted: usize) -> Result<(), PushError> {
    if keys.len() != grads.len() || keys.len() != noted {
        return Err(PushError::Length {
            keys: keys.len(),
            grads: grads.len(),
        });
    }
    match grads.iter().position(|g| !g.is_finite()) {
        Some(i) => Err(PushError::NonFinite {
            key: keys[i],
            value: grads[i],
        }),
        None => Ok(()),
    }
}

/// Keys per [`ParamTable::prefetch`] in batch loops: enough misses in
/// flight to fill the core's line-fill buffers, few enough to stay cached
/// until the lookups come.
const PREFETCH_CHUNK: usize = 32;

/// A sparse logistic-regression model: a [`ParamTable`] of [`KeyState`]s
/// run by one [`OptimizerKind`].
///
/// * As a parameter-server shard: [`Model::pull`] weights, [`Model::push`]
///   gradients; the optimizer runs here, per key.
/// * As a local learner: [`Model::learn`] (predict, then train: progressive
///   validation) and [`Model::predict`], which add the bias feature
///   ([`BIAS_KEY`], value 1) unless [`Model::with_bias_key`] turned it off.
///
/// The row and key loops allocate nothing once warm (beyond the table's
/// own growth); [`Model::learn`] probes each key once and prefetches the
/// row's slots first.
///
/// ```
/// use braid_actors::train::optimizer::{FtrlParams, Model, OptimizerKind};
///
/// let ftrl = FtrlParams { alpha: 0.1, beta: 1.0, l1: 0.0, l2: 0.0 };
/// let mut model = Model::new(OptimizerKind::Ftrl(ftrl))?;
/// let p = model.learn(&[17, 4242], None, 1.0)?; // the prediction before training
/// assert_eq!(p, 0.5);
/// assert!(model.predict(&[17, 4242], None)? > 0.5);
///
/// let mut weights = Vec::new();
/// model.pull(&[17, 99], &mut weights); // 99 was never seen: weight 0
/// model.push(&[99], &[0.25])?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Model {
    kind: OptimizerKind,
    table: ParamTable<KeyState>,
    bias: Option<u64>,
    /// The slots of the row being learned (reused: no allocation per row).
    scratch: Vec<(SlotRef, f32, Seen)>,
}

impl Clone for Model {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            table: self.table.clone(),
            bias: self.bias,
            scratch: Vec::new(),
        }
    }

    /// Reuses `self`'s table buffer when it is large enough.
    fn clone_from(&mut self, source: &Self) {
        self.kind = source.kind;
        self.table.clone_from(&source.table);
        self.bias = source.bias;
    }
}

impl Model {
    /// An empty model with the bias feature [`BIAS_KEY`].
    pub fn new(kind: OptimizerKind) -> Result<Self, ParamsError> {
        Self::with_capacity(kind, 0)
    }

    /// An empty model whose table holds `keys` keys before it grows (see
    /// [`ParamTable::with_capacity`]; the way to hold 32 B/key).
    pub fn with_capacity(kind: OptimizerKind, keys: usize) -> Result<Self, ParamsError> {
        kind.validate()?;
        Ok(Self {
            kind,
            table: ParamTable::with_capacity(keys),
            bias: Some(BIAS_KEY),
            scratch: Vec::new(),
        })
    }

    /// Sets the key of the constant feature rows get in [`Model::predict`]
    /// and [`Model::learn`], or `None` for no bias.
    pub fn with_bias_key(mut self, bias: Option<u64>) -> Self {
        self.bias = bias;
        self
    }

    /// A model over an existing table (e.g. one restored from a snapshot).
    pub fn from_parts(
        kind: OptimizerKind,
        table: ParamTable<KeyState>,
        bias: Option<u64>,
    ) -> Result<Self, ParamsError> {
        kind.validate()?;
        Ok(Self {
            kind,
            table,
            bias,
            scratch: Vec::new(),
        })
    }

    /// The optimizer.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// The bias feature's key, if rows get one.
    pub fn bias_key(&self) -> Option<u64> {
        self.bias
    }

    /// The parameter table (size, bytes per key, iteration).
    pub fn table(&self) -> &ParamTable<KeyState> {
        &self.table
    }

    /// The parameter table for eviction ([`ParamTable::retain`]) and other
    /// maintenance.
    pub fn table_mut(&mut self) -> &mut ParamTable<KeyState> {
        &mut self.table
    }

    /// The current weight of `key` (0 if never updated).
    #[inline]
    pub fn weight(&self, key: u64) -> f32 {
        self.table.get(key).map_or(0.0, |s| self.kind.weight(s))
    }

    /// Replaces `out` with the weights of `keys`, in order. Absent keys read
    /// as 0 and are not inserted.
    pub fn pull(&self, keys: &[u64], out: &mut Vec<f32>) {
        out.clear();
        out.resize(keys.len(), 0.0);
        self.pull_into(keys, out);
    }

    /// [`Model::pull`] into `out`, which holds one weight per key (a
    /// store object's column, say); extra entries are left alone.
    pub fn pull_into(&self, keys: &[u64], out: &mut [f32]) {
        let table = &self.table;
        with_rule!(self.kind, r => {
            for (chunk, out) in keys.chunks(PREFETCH_CHUNK).zip(out.chunks_mut(PREFETCH_CHUNK)) {
                table.prefetch(chunk);
                for (w, &k) in out.iter_mut().zip(chunk) {
                    *w = table.get(k).map_or(0.0, |s| r.weight(s));
                }
            }
        });
    }

    /// Applies `grads[i]` to `keys[i]`, in order, so a key that repeats is
    /// updated once per occurrence. Zero gradients are no-ops and insert
    /// nothing. Refused as a whole if the lengths differ or a gradient is
    /// not finite.
    pub fn push(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), PushError> {
        check_push(keys, grads, keys.len())?;
        let table = &mut self.table;
        with_rule!(self.kind, r => {
            for (keys, grads) in keys.chunks(PREFETCH_CHUNK).zip(grads.chunks(PREFETCH_CHUNK)) {
                table.prefetch(keys);
                for (&k, &g) in keys.iter().zip(grads) {
                    if g != 0.0 {
                        r.apply(table.get_or_insert_default(k), g);
                    }
                }
            }
        });
        Ok(())
    }

    /// [`Model::pull`] that also notes where each key lives (`None`:
    /// absent), for [`Model::push_at`] to update without probing again.
    /// The table first makes room for every absent key, so the notes stay
    /// valid through `push_at`'s inserts; any other change to the table
    /// in between voids them.
    pub(crate) fn pull_at(
        &mut self,
        keys: &[u64],
        at: &mut Vec<Option<SlotRef>>,
        out: &mut Vec<f32>,
    ) {
        let table = &mut self.table;
        loop {
            at.clear();
            out.clear();
            at.reserve(keys.len());
            out.reserve(keys.len());
            let mut absent = 0usize;
            with_rule!(self.kind, r => {
                for chunk in keys.chunks(PREFETCH_CHUNK) {
                    table.prefetch(chunk);
                    for &k in chunk {
                        let slot = table.locate(k);
                        match slot {
                            Some(s) => out.push(r.weight(&table.state(s))),
                            None => {
                                absent += 1;
                                out.push(0.0);
                            }
                        }
                        at.push(slot);
                    }
                }
            });
            if table.has_room(absent) {
                return;
            }
            table.reserve(absent);
        }
    }

    /// [`Model::push`] with the slots [`Model::pull_at`] noted for the same
    /// `keys`: the same updates in the same order, without a second probe
    /// for keys that were present.
    pub(crate) fn push_at(
        &mut self,
        keys: &[u64],
        at: &[Option<SlotRef>],
        grads: &[f32],
    ) -> Result<(), PushError> {
        check_push(keys, grads, at.len())?;
        let table = &mut self.table;
        with_rule!(self.kind, r => {
            for ((&k, &slot), &g) in keys.iter().zip(at).zip(grads) {
                if g != 0.0 {
                    let s = match slot {
                        Some(s) => s,
                        None => table.locate_or_insert(k),
                    };
                    r.apply(table.state_mut(s), g);
                }
            }
        });
        Ok(())
    }

    fn check_values(features: &[u64], values: Option<&[f32]>) -> Result<(), RowError> {
        match values {
            Some(v) if v.len() != features.len() => Err(RowError::ValuesLength {
                features: features.len(),
                values: v.len(),
            }),
            _ => Ok(()),
        }
    }

    /// The logit of a row: the bias weight plus `Σ wᵢ·xᵢ` over `features`,
    /// with `xᵢ = values[i]`, or 1 when `values` is `None`.
    pub fn margin(&self, features: &[u64], values: Option<&[f32]>) -> Result<f32, RowError> {
        Self::check_values(features, values)?;
        let table = &self.table;
        Ok(with_rule!(self.kind, r => margin_with(r, table, self.bias, features, values)))
    }

    /// The click probability of a row: [`sigmoid`] of [`Model::margin`].
    pub fn predict(&self, features: &[u64], values: Option<&[f32]>) -> Result<f32, RowError> {
        self.margin(features, values).map(sigmoid)
    }

    /// Predicts the row, then trains on it with the logistic-loss gradient
    /// `(p − y)·xᵢ` for each feature (and `p − y` for the bias); returns the
    /// prediction made *before* the update (progressive validation).
    /// `label` is 0 or 1 (any value in `[0, 1]` is accepted as a soft label).
    /// Every feature with a non-zero value is inserted into the table.
    pub fn learn(
        &mut self,
        features: &[u64],
        values: Option<&[f32]>,
        label: f32,
    ) -> Result<f32, RowError> {
        Self::check_values(features, values)?;
        if !(0.0..=1.0).contains(&label) {
            return Err(RowError::Label(label));
        }
        let (table, scratch, bias) = (&mut self.table, &mut self.scratch, self.bias);
        Ok(with_rule!(self.kind, r => learn_with(r, table, scratch, bias, features, values, label)))
    }

    /// A snapshot for checkpoints: optimizer, bias key, then the table's
    /// [`ParamTable::to_bytes`]. Round-trips byte for byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The length of [`Model::to_bytes`]'s encoding.
    pub fn encoded_len(&self) -> usize {
        MODEL_HEADER_LEN + self.table.encoded_len()
    }

    /// Appends [`Model::to_bytes`]'s encoding to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MODEL_MAGIC);
        out.push(MODEL_VERSION);
        let (tag, params) = match self.kind {
            OptimizerKind::Ftrl(p) => (0u8, [p.alpha, p.beta, p.l1, p.l2]),
            OptimizerKind::Sgd { lr } => (1, [lr, 0.0, 0.0, 0.0]),
            OptimizerKind::AdaGrad { lr, eps } => (2, [lr, eps, 0.0, 0.0]),
        };
        out.push(tag);
        for v in params {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(u8::from(self.bias.is_some()));
        out.extend_from_slice(&self.bias.unwrap_or(0).to_le_bytes());
        self.table.write_to(out);
    }

    /// Reads a snapshot written by [`Model::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelDecodeError> {
        let header = bytes
            .get(..MODEL_HEADER_LEN)
            .ok_or(ModelDecodeError::Truncated)?;
        if header[..4] != MODEL_MAGIC {
            return Err(ModelDecodeError::BadMagic);
        }
        if header[4] != MODEL_VERSION {
            return Err(ModelDecodeError::UnsupportedVersion(header[4]));
        }
        let f = |i: usize| {
            let at = 6 + 4 * i;
            f32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let kind = match header[5] {
            0 => OptimizerKind::Ftrl(FtrlParams {
                alpha: f(0),
                beta: f(1),
                l1: f(2),
                l2: f(3),
            }),
            1 => OptimizerKind::Sgd { lr: f(0) },
            2 => OptimizerKind::AdaGrad {
                lr: f(0),
                eps: f(1),
            },
            tag => return Err(ModelDecodeError::UnknownOptimizer(tag)),
        };
        let mut key = [0u8; 8];
        key.copy_from_slice(&header[23..31]);
        let bias = (header[22] != 0).then_some(u64::from_le_bytes(key));
        let table = ParamTable::from_bytes(&bytes[MODEL_HEADER_LEN..])?;
        Ok(Self::from_parts(kind, table, bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: KeyState) -> [u32; 2] {
        [s[0].to_bits(), s[1].to_bits()]
    }

    /// States and gradients across FTRL's branches: z inside and outside
    /// [−λ1, λ1], n from 0 up, gradients of both signs and zero.
    fn cases() -> Vec<(KeyState, f32)> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut cases = vec![([0.0, 0.0], 0.5), ([0.0, 0.0], 0.0), ([-0.0, 1.0], -0.25)];
        for _ in 0..500 {
            let z = (next() - 0.5) * 4.0;
            let n = next() * next() * 50.0;
            let g = next() - 0.5;
            cases.push(([z, n], g));
        }
        cases
    }

    #[test]
    fn an_update_from_its_read_is_bit_for_bit_one_that_reads_again_and_so_are_its_weights() {
        let ftrl = |l1, l2| FtrlParams {
            alpha: 0.1,
            beta: 1.0,
            l1,
            l2,
        };
        for params in [ftrl(0.0, 0.0), ftrl(0.3, 1.0)] {
            let (mut fresh, mut want) = (Vec::new(), Vec::new());
            for (s0, g) in cases() {
                let mut reread = s0;
                params.apply(&mut reread, g);
                let mut reused = s0;
                let seen = params.see(&reused);
                assert_eq!(seen.weight.to_bits(), params.weight(&s0).to_bits());
                fresh.push(params.apply_seen(&mut reused, g, &seen));
                assert_eq!(bits(reused), bits(reread), "{s0:?} by {g}");
                want.push(params.weight(&reused).to_bits());
                // A read of another state is not reused.
                let mut stale = s0;
                let other = params.see(&[s0[0] + 1.0, s0[1] + 1.0]);
                params.apply_seen(&mut stale, g, &other);
                assert_eq!(bits(stale), bits(reread));
            }
            let mut got = vec![f32::NAN];
            weights_of(OptimizerKind::Ftrl(params), &fresh, &mut got);
            assert!(got[0].is_nan(), "appends after what the list held");
            let got: Vec<u32> = got[1..].iter().map(|w| w.to_bits()).collect();
            assert_eq!(got, want);
        }
        for kind in [
            OptimizerKind::Sgd { lr: 0.1 },
            OptimizerKind::AdaGrad { lr: 0.1, eps: 1e-6 },
        ] {
            let mut model = Model::new(kind).unwrap_or_else(|e| panic!("{e}"));
            model
                .learn(&[3, 9], None, 1.0)
                .unwrap_or_else(|e| panic!("{e}"));
            let states: Vec<KeyState> = [3, 9]
                .iter()
                .filter_map(|k| model.table().get(*k).copied())
                .collect();
            let fresh: Vec<Fresh> = states.iter().map(|s| Fresh { a: s[0], b: s[1] }).collect();
            let mut got = Vec::new();
            weights_of(kind, &fresh, &mut got);
            assert_eq!(got, vec![states[0][0], states[1][0]]);
        }
    }

    #[test]
    fn a_key_repeated_in_a_row_is_updated_twice_from_its_state_at_each_update() {
        let p = FtrlParams {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        };
        let mut model = Model::new(OptimizerKind::Ftrl(p)).unwrap_or_else(|e| panic!("{e}"));
        model
            .learn(&[7], None, 1.0)
            .unwrap_or_else(|e| panic!("{e}"));
        let before = model.table().get(7).copied().unwrap_or_default();
        let bias = model.table().get(BIAS_KEY).copied().unwrap_or_default();
        let got = model
            .learn(&[7, 7], None, 0.0)
            .unwrap_or_else(|e| panic!("{e}"));
        let want = sigmoid(2.0 * p.weight(&before) + p.weight(&bias));
        assert_eq!(got.to_bits(), want.to_bits());
        let mut s = before;
        p.apply(&mut s, want);
        p.apply(&mut s, want);
        assert_eq!(model.table().get(7).copied().map(bits), Some(bits(s)));
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let mut model =
            Model::new(OptimizerKind::Sgd { lr: 0.1 }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(model.encoded_len(), model.to_bytes().len());
        for k in 0..1000 {
            model
                .learn(&[k, k * 31], None, (k % 2) as f32)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(model.encoded_len(), model.to_bytes().len());
    }
}
