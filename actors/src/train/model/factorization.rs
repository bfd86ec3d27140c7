//! Factorization machines (Rendle 2010, "Factorization Machines") of
//! degree 2 for click prediction: besides a weight, each key has
//! [`FACTORS`] factors, and a row's margin adds every pair of its
//! features' interaction `⟨vᵢ, vⱼ⟩·xᵢ·xⱼ`, computed in linear time as
//!
//! ```text
//! margin = Σ wᵢ·xᵢ + ½ Σ_f [ (Σᵢ v_if·xᵢ)² − Σᵢ v_if²·xᵢ² ]
//! ```
//!
//! with `p = σ(margin)` and the logistic loss's gradients `(p − y)·xᵢ` for
//! `wᵢ` and `(p − y)·xᵢ·(Σⱼ v_jf·xⱼ − v_if·xᵢ)` for `v_if`. Every parameter
//! is trained by AdaGrad. A key's factors start at small values drawn from
//! its key ([`FactorizationMachine::init`]) at its first update: until
//! then it reads 0 everywhere, as a model's keys must (see
//! [`Rule`]). The bias feature is a feature like the others (its
//! factors add a learned linear term).

use super::{Model, ModelDecodeError, Rule, RuleJob};
use crate::train::optimizer::{self, sigmoid, ParamsError};

/// Factors per key.
pub const FACTORS: usize = 4;

/// Parameters per key: the weight, then the factors.
const WIDTH: usize = 1 + FACTORS;

/// A key's slot: its parameters, their AdaGrad squared-gradient sums, and
/// 1 once its factors were drawn (at its first update).
pub type FmState = [f32; 2 * WIDTH + 1];

/// Where [`FmState`]'s flag sits.
const DRAWN: usize = 2 * WIDTH;

/// A degree-2 factorization machine trained by per-parameter AdaGrad:
/// a key has a weight `w` and [`FACTORS`] factors `v`, and a row's margin
/// is `Σ wᵢ·xᵢ + ½ Σ_f [(Σᵢ v_if·xᵢ)² − Σᵢ v_if²·xᵢ²]` (every pair's
/// `⟨vᵢ, vⱼ⟩·xᵢ·xⱼ`, in linear time), with `p = σ(margin)` and logistic
/// loss. A key's factors are drawn from it
/// ([`FactorizationMachine::init`]) at its first update; until then it
/// reads 0 everywhere.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactorizationMachine {
    lr: f32,
    eps: f32,
    init: f32,
    seed: u64,
}

/// A row's sums: the linear part, and per factor `Σ v·x` and `Σ (v·x)²`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FmRow {
    linear: f32,
    sum: [f32; FACTORS],
    squares: [f32; FACTORS],
}

impl FmRow {
    /// The row's margin.
    pub fn margin(&self) -> f32 {
        let mut pairs = 0.0;
        for (s, q) in self.sum.iter().zip(&self.squares) {
            pairs += s * s - q;
        }
        self.linear + 0.5 * pairs
    }
}

impl FactorizationMachine {
    /// A factorization machine with AdaGrad's learning rate `lr` and
    /// `eps`, whose factors start uniform in `[−init, init]`, drawn from
    /// each key and `seed`. `lr > 0`, `eps ≥ 0`, `init ≥ 0`, all finite.
    pub fn new(lr: f32, eps: f32, init: f32, seed: u64) -> Result<Self, ParamsError> {
        let model = Self {
            lr,
            eps,
            init,
            seed,
        };
        model.validate()?;
        Ok(model)
    }

    /// The initial factor `f` of `key`: uniform in `[−init, init]`,
    /// a hash of the key, the factor and the seed (splitmix64).
    pub fn init(&self, key: u64, f: usize) -> f32 {
        let mut z =
            key ^ self.seed.rotate_left(17) ^ (f as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * unit - 1.0) * self.init
    }
}

fn range(name: &'static str, value: f32, positive: bool) -> Result<(), ParamsError> {
    let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(())
    } else {
        Err(ParamsError {
            name,
            bound: if positive { "> 0" } else { ">= 0" },
            value,
        })
    }
}

impl Rule<FactorizationMachine> for FactorizationMachine {
    #[inline]
    fn params(self, s: &FmState) -> [f32; WIDTH] {
        let mut p = [0.0; WIDTH];
        p.copy_from_slice(&s[..WIDTH]);
        p
    }

    #[inline]
    fn apply(self, key: u64, s: &mut FmState, g: &[f32]) {
        if s[DRAWN] == 0.0 {
            for f in 0..FACTORS {
                s[1 + f] = self.init(key, f);
            }
            s[DRAWN] = 1.0;
        }
        for (j, &g) in g.iter().enumerate().take(WIDTH) {
            if g != 0.0 {
                s[WIDTH + j] += g * g;
                let denom = s[WIDTH + j].sqrt() + self.eps;
                // Only 0 when eps = 0 and g² underflowed: no step then.
                if denom > 0.0 {
                    s[j] -= self.lr * g / denom;
                }
            }
        }
    }

    #[inline]
    fn see(self, s: &FmState) -> [f32; WIDTH] {
        Rule::params(self, s)
    }

    #[inline]
    fn apply_seen(
        self,
        key: u64,
        s: &mut FmState,
        g: &[f32],
        _seen: &[f32; WIDTH],
    ) -> [f32; WIDTH] {
        Rule::apply(self, key, s, g);
        Rule::params(self, s)
    }

    #[inline]
    fn params_of(self, updates: &[[f32; WIDTH]], out: &mut [f32]) {
        for (p, u) in out.chunks_exact_mut(WIDTH).zip(updates) {
            p.copy_from_slice(u);
        }
    }
}

/// AdaGrad's `lr` and `eps`, `init`, then the seed.
const HEADER_LEN: usize = 4 + 4 + 4 + 8;

impl Model for FactorizationMachine {
    type State = FmState;
    type Params = [f32; WIDTH];
    const WIDTH: usize = WIDTH;
    type Row = FmRow;
    type Seen = [f32; WIDTH];
    type Update = [f32; WIDTH];
    const HEADER_LEN: usize = HEADER_LEN;

    fn validate(&self) -> Result<(), ParamsError> {
        range("lr", self.lr, true)?;
        range("eps", self.eps, false)?;
        range("init", self.init, false)
    }

    #[inline]
    fn with_rule<J: RuleJob<Self>>(&self, job: J) -> J::Output {
        job.run(*self)
    }

    #[inline]
    fn seen_params(seen: &[f32; WIDTH]) -> [f32; WIDTH] {
        *seen
    }

    #[inline]
    fn add(&self, row: &mut FmRow, params: &[f32], x: f32) {
        row.linear += params[0] * x;
        for f in 0..FACTORS {
            let vx = params[1 + f] * x;
            row.sum[f] += vx;
            row.squares[f] += vx * vx;
        }
    }

    #[inline]
    fn predict(&self, row: &FmRow) -> f32 {
        sigmoid(row.margin())
    }

    #[inline]
    fn margin_gradient(&self, p: f32, label: f32) -> f32 {
        optimizer::margin_gradient(p, label)
    }

    #[inline]
    fn gradient(&self, row: &FmRow, d: f32, params: &[f32], x: f32) -> [f32; WIDTH] {
        let dx = d * x;
        let mut g = [0.0; WIDTH];
        g[0] = dx;
        for f in 0..FACTORS {
            g[1 + f] = dx * (row.sum[f] - params[1 + f] * x);
        }
        g
    }

    /// The weight's squared-gradient sum.
    #[inline]
    fn activity(state: &FmState) -> f32 {
        state[WIDTH]
    }

    fn write_header(&self, out: &mut Vec<u8>) {
        for v in [self.lr, self.eps, self.init] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.seed.to_le_bytes());
    }

    fn read_header(header: &[u8]) -> Result<Self, ModelDecodeError> {
        let header = header
            .get(..HEADER_LEN)
            .ok_or(ModelDecodeError::Truncated)?;
        let f = |at: usize| {
            f32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&header[12..20]);
        Ok(Self::new(f(0), f(4), f(8), u64::from_le_bytes(seed))?)
    }
}
