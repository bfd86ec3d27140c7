//! Sparse logistic regression: one weight per key, trained by FTRL-Proximal,
//! SGD or AdaGrad ([`OptimizerKind`], whose per-key rules live in
//! [`super::super::optimizer`]).

use super::{Model, ModelDecodeError, Rule, RuleJob};
use crate::train::optimizer::{
    self, sigmoid, with_optimizer, Fresh, FtrlParams, KeyRule, KeyState, OptimizerKind,
    ParamsError, Seen,
};

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
