//! Per-key optimizers for sparse logistic regression — FTRL-Proximal, SGD and
//! AdaGrad: the rules that `train::model::LogisticRegression` runs over a
//! table of [`KeyState`]s (its learner, a shard's state or a whole
//! single-process one, is `train::model::LogisticLearner`).
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
//! predictions logistic regression's learner adds, like VW by default, a constant feature of
//! value 1 to every row ([`BIAS_KEY`]); VW's −1/+1 labels give the same
//! gradient `p − y` as 0/1 labels here. The remaining differences (VW
//! clamps the logit to ±50 rather than ±35, its summation order) are far
//! below the 0.002 logloss tolerance the `train_optimizer` test holds us to.

/// Per-key optimizer state, two `f32`:
///
/// * FTRL: `[z, n]` (the adjusted gradient sum and the squared-gradient sum);
/// * SGD: `[w, unused]`;
/// * AdaGrad: `[w, Σg²]`.
pub type KeyState = [f32; 2];

/// The feature key that stands for the constant (bias) feature of value 1
/// that logistic regression's learner adds in `predict` and `learn` to every row, as VW
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
/// gradient is written (logistic regression's, which the chained
/// trainer, the row learner and the workers' pushes all use).
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
pub struct Seen {
    state: KeyState,
    weight: f32,
    sqrt_n: f32,
}

impl Seen {
    /// The weight the read computed.
    #[inline]
    pub fn weight(&self) -> f32 {
        self.weight
    }

    /// Whether `s` is still the state that was read.
    #[inline]
    fn holds(&self, s: &KeyState) -> bool {
        s[0].to_bits() == self.state[0].to_bits() && s[1].to_bits() == self.state[1].to_bits()
    }
}

/// What an update leaves that a key's new weight is computed from (FTRL:
/// `z` and `√n`; SGD and AdaGrad: the weight itself, in `a`). Turning a
/// list of them into weights afterwards (the model's `Rule::params_of`) is a loop the
/// compiler vectorizes, where a division per update inside the training
/// loop would sit on its critical path. The weight is bit for bit that of
/// the updated state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fresh {
    pub(crate) a: f32,
    pub(crate) b: f32,
}

/// One optimizer's per-key rule, monomorphized into the row loops so the
/// hot path carries no per-feature dispatch. For every rule a zero gradient
/// is a no-op and the default state has weight 0.
pub(crate) trait KeyRule: Copy {
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
    /// [`KeyRule::apply`] to a key read as `seen`; what its new weight needs.
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

impl KeyRule for FtrlParams {
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
pub(crate) struct Sgd {
    pub(crate) lr: f32,
}

impl KeyRule for Sgd {
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
pub(crate) struct AdaGrad {
    pub(crate) lr: f32,
    pub(crate) eps: f32,
}

impl KeyRule for AdaGrad {
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

/// Runs `$body` with `$r` bound to the concrete [`KeyRule`] of `$kind`.
macro_rules! with_optimizer {
    ($kind:expr, $r:ident => $body:expr) => {
        match $kind {
            $crate::train::optimizer::OptimizerKind::Ftrl(p) => {
                let $r = p;
                $body
            }
            $crate::train::optimizer::OptimizerKind::Sgd { lr } => {
                let $r = $crate::train::optimizer::Sgd { lr };
                $body
            }
            $crate::train::optimizer::OptimizerKind::AdaGrad { lr, eps } => {
                let $r = $crate::train::optimizer::AdaGrad { lr, eps };
                $body
            }
        }
    };
}

pub(crate) use with_optimizer;

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
        with_optimizer!(*self, r => r.weight(state))
    }

    /// Applies one gradient of the loss with respect to this key's weight.
    #[inline]
    pub fn apply(&self, state: &mut KeyState, gradient: f32) {
        with_optimizer!(*self, r => r.apply(state, gradient))
    }
}
