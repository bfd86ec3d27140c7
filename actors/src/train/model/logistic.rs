//! Sparse logistic regression: one weight per key, trained by FTRL-Proximal,
//! SGD or AdaGrad ([`OptimizerKind`], whose per-key rules live in
//! [`super::super::optimizer`]).

use super::{Learner, Model, ModelDecodeError, RowError, Rule, RuleJob};
use crate::train::optimizer::{
    self, sigmoid, with_optimizer, Fresh, FtrlParams, KeyRule, KeyState, OptimizerKind,
    ParamsError, Seen,
};
use crate::train::table::ParamTable;

/// Logistic regression: `p = σ(Σ wᵢ·xᵢ)`, with the logistic loss's
/// gradient `(p − y)·xᵢ` per weight ([`optimizer::margin_gradient`]).
/// A key's slot is its optimizer's [`KeyState`] (16-byte table slots);
/// pulls, pushes, deltas and serving carry its one weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogisticRegression {
    kind: OptimizerKind,
}

impl LogisticRegression {
    /// Logistic regression trained by `kind`, whose hyper-parameters are
    /// checked.
    pub fn new(kind: OptimizerKind) -> Result<Self, ParamsError> {
        kind.validate()?;
        Ok(Self { kind })
    }

    /// Logistic regression trained by `kind`, unchecked: for what only
    /// predicts (serving), where the optimizer plays no part.
    pub(crate) fn unchecked(kind: OptimizerKind) -> Self {
        Self { kind }
    }

    /// The optimizer.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }
}

/// An optimizer's per-key rule as the model's rule.
impl<O: KeyRule> Rule<LogisticRegression> for O {
    #[inline]
    fn params(self, s: &KeyState) -> [f32; 1] {
        [self.weight(s)]
    }

    #[inline]
    fn apply(self, _key: u64, s: &mut KeyState, g: &[f32]) {
        KeyRule::apply(self, s, g[0]);
    }

    #[inline]
    fn see(self, s: &KeyState) -> Seen {
        KeyRule::see(self, s)
    }

    #[inline]
    fn apply_seen(self, _key: u64, s: &mut KeyState, g: &[f32], seen: &Seen) -> Fresh {
        KeyRule::apply_seen(self, s, g[0], seen)
    }

    #[inline]
    fn params_of(self, updates: &[Fresh], out: &mut [f32]) {
        self.weights_of(updates, out);
    }
}

/// Optimizer tag, then 4 × f32 hyper-parameters.
const HEADER_LEN: usize = 1 + 16;

impl Model for LogisticRegression {
    type State = KeyState;
    type Params = [f32; 1];
    const WIDTH: usize = 1;
    type Row = f32;
    type Seen = Seen;
    type Update = Fresh;
    const HEADER_LEN: usize = HEADER_LEN;

    fn validate(&self) -> Result<(), ParamsError> {
        self.kind.validate()
    }

    #[inline]
    fn with_rule<J: RuleJob<Self>>(&self, job: J) -> J::Output {
        with_optimizer!(self.kind, r => job.run(r))
    }

    #[inline]
    fn seen_params(seen: &Seen) -> [f32; 1] {
        [seen.weight()]
    }

    #[inline]
    fn add(&self, margin: &mut f32, params: &[f32], x: f32) {
        *margin += params[0] * x;
    }

    #[inline]
    fn predict(&self, margin: &f32) -> f32 {
        sigmoid(*margin)
    }

    #[inline]
    fn margin_gradient(&self, p: f32, label: f32) -> f32 {
        optimizer::margin_gradient(p, label)
    }

    #[inline]
    fn gradient(&self, _margin: &f32, d: f32, _params: &[f32], x: f32) -> [f32; 1] {
        [d * x]
    }

    /// The squared-gradient sum of FTRL and AdaGrad (0 under SGD, which
    /// keeps no such state: eviction then keeps any 90%).
    #[inline]
    fn activity(state: &KeyState) -> f32 {
        state[1]
    }

    fn write_header(&self, out: &mut Vec<u8>) {
        let (tag, params) = match self.kind {
            OptimizerKind::Ftrl(p) => (0u8, [p.alpha, p.beta, p.l1, p.l2]),
            OptimizerKind::Sgd { lr } => (1, [lr, 0.0, 0.0, 0.0]),
            OptimizerKind::AdaGrad { lr, eps } => (2, [lr, eps, 0.0, 0.0]),
        };
        out.push(tag);
        for v in params {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn read_header(header: &[u8]) -> Result<Self, ModelDecodeError> {
        let header = header
            .get(..HEADER_LEN)
            .ok_or(ModelDecodeError::Truncated)?;
        let f = |i: usize| {
            let at = 1 + 4 * i;
            f32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let kind = match header[0] {
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
        Ok(Self::new(kind)?)
    }
}

/// Appends the weights `fresh` leaves under `kind`, in order.
#[cfg(test)]
fn weights_of(kind: OptimizerKind, fresh: &[Fresh], out: &mut Vec<f32>) {
    fn run<R: KeyRule>(r: R, fresh: &[Fresh], out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + fresh.len(), 0.0);
        r.weights_of(fresh, &mut out[start..]);
    }
    with_optimizer!(kind, r => run(r, fresh, out));
}

/// The logistic-regression learner: a table of [`KeyState`]s run by one
/// [`OptimizerKind`] ([`Learner`] of [`LogisticRegression`]).
///
/// * As a parameter-server shard: [`Learner::pull`] weights,
///   [`Learner::push`] gradients; the optimizer runs here, per key.
/// * As a local learner: [`Learner::learn`] (predict, then train:
///   progressive validation) and [`Learner::predict`], which add the bias
///   feature ([`BIAS_KEY`](crate::train::optimizer::BIAS_KEY), value 1) unless [`Learner::with_bias_key`]
///   turned it off.
///
/// ```
/// use braid_actors::train::model::LogisticLearner;
/// use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
///
/// let ftrl = FtrlParams { alpha: 0.1, beta: 1.0, l1: 0.0, l2: 0.0 };
/// let mut model = LogisticLearner::new(OptimizerKind::Ftrl(ftrl))?;
/// let p = model.learn(&[17, 4242], None, 1.0)?; // the prediction before training
/// assert_eq!(p, 0.5);
/// assert!(model.predict(&[17, 4242], None)? > 0.5);
///
/// let mut weights = Vec::new();
/// model.pull(&[17, 99], &mut weights); // 99 was never seen: weight 0
/// model.push(&[99], &[0.25])?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type LogisticLearner = Learner<LogisticRegression>;

impl Learner<LogisticRegression> {
    /// An empty model with the bias feature [`BIAS_KEY`](crate::train::optimizer::BIAS_KEY).
    pub fn new(kind: OptimizerKind) -> Result<Self, ParamsError> {
        Self::with_capacity(kind, 0)
    }

    /// An empty model whose table holds `keys` keys before it grows (see
    /// [`ParamTable::with_capacity`]; the way to hold 32 B/key).
    pub fn with_capacity(kind: OptimizerKind, keys: usize) -> Result<Self, ParamsError> {
        Self::with_model(LogisticRegression::new(kind)?, keys)
    }

    /// A model over an existing table (e.g. one restored from a snapshot).
    pub fn from_parts(
        kind: OptimizerKind,
        table: ParamTable<KeyState>,
        bias: Option<u64>,
    ) -> Result<Self, ParamsError> {
        Self::with_table(LogisticRegression::new(kind)?, table, bias)
    }

    /// The optimizer.
    pub fn kind(&self) -> OptimizerKind {
        self.model().kind()
    }

    /// The current weight of `key` (0 if never updated).
    #[inline]
    pub fn weight(&self, key: u64) -> f32 {
        self.params(key)[0]
    }

    /// The logit of a row: the bias weight plus `Σ wᵢ·xᵢ` over `features`,
    /// with `xᵢ = values[i]`, or 1 when `values` is `None`.
    pub fn margin(&self, features: &[u64], values: Option<&[f32]>) -> Result<f32, RowError> {
        self.row(features, values)
    }
}

#[cfg(test)]
mod tests {
    use super::{weights_of, LogisticLearner};
    use crate::train::optimizer::*;

    type Model = LogisticLearner;

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
                assert_eq!(seen.weight().to_bits(), params.weight(&s0).to_bits());
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
