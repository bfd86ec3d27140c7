//! Per-key optimizers and the parameter table: FTRL-Proximal, SGD and AdaGrad
//! against hand-computed steps, the table against `std::collections::HashMap`,
//! the table-backed model against a straightforward `f64` FTRL, and
//! progressive logloss against Vowpal Wabbit's FTRL on a committed
//! `gen_ctr.py` stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use braid_actors::train::model::{LogisticLearner as Model, PushError, RowError};
use braid_actors::train::optimizer::{
    logloss, sigmoid, FtrlParams, KeyState, OptimizerKind, BIAS_KEY,
};
use braid_actors::train::table::{DecodeError, ParamTable};
use proptest::prelude::*;

const TOL: f32 = 1e-6;

fn close(a: f32, b: f64) -> bool {
    (f64::from(a) - b).abs() <= f64::from(TOL)
}

fn ftrl(alpha: f32, beta: f32, l1: f32, l2: f32) -> OptimizerKind {
    OptimizerKind::Ftrl(FtrlParams {
        alpha,
        beta,
        l1,
        l2,
    })
}

/// Applies `grads` to one fresh key; returns the states and weights after each.
fn steps(kind: OptimizerKind, grads: &[f32]) -> Vec<(KeyState, f32)> {
    let mut s = KeyState::default();
    grads
        .iter()
        .map(|&g| {
            kind.apply(&mut s, g);
            (s, kind.weight(&s))
        })
        .collect()
}

fn assert_step(got: (KeyState, f32), z_or_w: f64, n_or_g: f64, w: f64) {
    let ([a, b], weight) = got;
    assert!(
        close(a, z_or_w) && close(b, n_or_g) && close(weight, w),
        "got state [{a}, {b}] weight {weight}, want [{z_or_w}, {n_or_g}] weight {w}"
    );
}

#[test]
fn ftrl_two_steps_by_hand() {
    // α = 0.1, β = 1, λ1 = λ2 = 0; one key, gradients 0.5 then −0.3.
    // Step 1 (z = n = 0, so w = 0):
    //   σ = (√0.25 − √0)/0.1 = 0.5/0.1 = 5
    //   z = 0 + 0.5 − 5·0 = 0.5,   n = 0.25
    //   w = −0.5 / ((1 + √0.25)/0.1 + 0) = −0.5/15 = −0.0333333…
    // Step 2 (w = −1/30):
    //   n' = 0.25 + 0.09 = 0.34,  √0.34 = 0.58309519
    //   σ = (0.58309519 − 0.5)/0.1 = 0.83095189
    //   z = 0.5 − 0.3 − 0.83095189·(−1/30) = 0.2 + 0.02769840 = 0.22769840
    //   w = −0.22769840 / ((1 + 0.58309519)/0.1) = −0.22769840/15.8309519 = −0.01438311
    let s = steps(ftrl(0.1, 1.0, 0.0, 0.0), &[0.5, -0.3]);
    assert_step(s[0], 0.5, 0.25, -1.0 / 30.0);
    assert_step(s[1], 0.227_698_396_5, 0.34, -0.014_383_114_7);
}

#[test]
fn ftrl_l1_zeroes_the_weight_while_z_is_within_it() {
    // λ1 = 0.3, otherwise as above. z and n do not depend on λ1 except
    // through w in z's correction term.
    // Step 1: z = 0.5, n = 0.25; |z| > λ1 so w = −(0.5 − 0.3)/15 = −0.0133333
    // Step 2: σ = 0.83095189; z = 0.2 − 0.83095189·(−0.0133333) = 0.21107936
    //         |z| = 0.211 ≤ λ1 = 0.3, so w = 0 exactly.
    let s = steps(ftrl(0.1, 1.0, 0.3, 0.0), &[0.5, -0.3]);
    assert_step(s[0], 0.5, 0.25, -0.2 / 15.0);
    assert_step(s[1], 0.211_079_358_6, 0.34, 0.0);
    assert_eq!(s[1].1, 0.0);
}

#[test]
fn ftrl_l2_shrinks_the_weight() {
    // λ2 = 1, λ1 = 0: the denominator gains λ2.
    // Step 1: z = 0.5, n = 0.25; w = −0.5/(15 + 1) = −0.03125
    // Step 2: σ = 0.83095189; z = 0.2 − 0.83095189·(−0.03125) = 0.22596725
    //         w = −0.22596725/(15.8309519 + 1) = −0.01342570
    let s = steps(ftrl(0.1, 1.0, 0.0, 1.0), &[0.5, -0.3]);
    assert_step(s[0], 0.5, 0.25, -0.03125);
    assert_step(s[1], 0.225_967_246_7, 0.34, -0.013_425_696_2);
}

#[test]
fn sgd_and_adagrad_by_hand() {
    // SGD, lr 0.1: w = 0 − 0.1·0.5 = −0.05; then −0.05 − 0.1·(−0.3) = −0.02.
    let s = steps(OptimizerKind::Sgd { lr: 0.1 }, &[0.5, -0.3]);
    assert!(close(s[0].1, -0.05) && close(s[1].1, -0.02), "{s:?}");

    // AdaGrad, lr 0.1, eps 0: G = 0.25, w = −0.1·0.5/√0.25 = −0.1;
    // G = 0.34, w = −0.1 − 0.1·(−0.3)/0.58309519 = −0.1 + 0.05144958 = −0.04855042.
    let s = steps(OptimizerKind::AdaGrad { lr: 0.1, eps: 0.0 }, &[0.5, -0.3]);
    assert_step(s[0], -0.1, 0.25, -0.1);
    assert_step(s[1], -0.048_550_424_5, 0.34, -0.048_550_424_5);

    // eps 0.1: w = −0.05/(0.5 + 0.1) = −0.0833333;
    // w = −0.0833333 + 0.03/(0.58309519 + 0.1) = −0.0833333 + 0.0439178 = −0.0394156.
    let s = steps(OptimizerKind::AdaGrad { lr: 0.1, eps: 0.1 }, &[0.5, -0.3]);
    assert_step(s[0], -0.05 / 0.6, 0.25, -0.05 / 0.6);
    assert_step(s[1], -0.039_415_588_8, 0.34, -0.039_415_588_8);
}

#[test]
fn learn_returns_the_prediction_before_the_update() {
    // One row {7} with label 1 on an empty model: p = σ(0) = 0.5 comes back;
    // key 7 and the bias each get g = p − y = −0.5: z = −0.5, n = 0.25,
    // w = 0.5/15 = 1/30. The next prediction is σ(2/30) = 0.51666050.
    let mut m = Model::new(ftrl(0.1, 1.0, 0.0, 0.0)).unwrap();
    assert_eq!(m.learn(&[7], None, 1.0).unwrap(), 0.5);
    assert!(close(m.weight(7), 1.0 / 30.0));
    assert!(close(m.weight(BIAS_KEY), 1.0 / 30.0));
    assert!(close(m.predict(&[7], None).unwrap(), 0.516_660_496_6));
    // Values scale the feature's contribution and its gradient.
    assert!(close(m.margin(&[7], Some(&[2.0])).unwrap(), 3.0 / 30.0));
    // Without the bias only the features count.
    let m = m.with_bias_key(None);
    assert!(close(m.margin(&[7, 8], None).unwrap(), 1.0 / 30.0));
}

#[test]
fn bad_rows_pushes_and_params_are_refused() {
    let mut m = Model::new(ftrl(0.1, 1.0, 0.0, 0.0)).unwrap();
    assert_eq!(
        m.learn(&[1, 2], Some(&[1.0]), 1.0),
        Err(RowError::ValuesLength {
            features: 2,
            values: 1
        })
    );
    assert_eq!(m.learn(&[1], None, 2.0), Err(RowError::Label(2.0)));
    assert!(m.learn(&[1], None, f32::NAN).is_err());
    assert_eq!(
        m.push(&[1, 2], &[0.1]),
        Err(PushError::Length { keys: 2, grads: 1 })
    );
    assert_eq!(
        m.push(&[1, 2], &[0.1, f32::INFINITY]),
        Err(PushError::NonFinite {
            key: 2,
            value: f32::INFINITY
        })
    );
    assert!(
        m.table().is_empty(),
        "refused calls must not touch the table"
    );
    assert!(Model::new(ftrl(0.0, 1.0, 0.0, 0.0)).is_err());
    assert!(Model::new(ftrl(0.1, 1.0, -1.0, 0.0)).is_err());
    assert!(Model::new(OptimizerKind::Sgd { lr: f32::NAN }).is_err());
    assert!(Model::new(OptimizerKind::AdaGrad { lr: 0.1, eps: -1.0 }).is_err());
}

#[test]
fn pull_reads_without_inserting_and_push_repeats_apply_in_order() {
    let kind = ftrl(0.1, 1.0, 0.0, 0.0);
    let mut m = Model::new(kind).unwrap();
    // Key 5 twice in one push is two sequential steps, as in the hand test.
    m.push(&[5, 0, 5], &[0.5, 0.25, -0.3]).unwrap();
    let mut out = Vec::new();
    m.pull(&[5, 0, 6], &mut out);
    assert!(close(out[0], -0.014_383_114_7), "{out:?}");
    // Key 0 is a key like any other: g = 0.25 gives z = 0.25, n = 0.0625,
    // w = −0.25/((1 + 0.25)/0.1) = −0.02.
    assert!(close(out[1], -0.02), "{out:?}");
    assert_eq!(out[2], 0.0);
    assert_eq!(m.table().len(), 2, "pull must not insert");
    // Zero gradients insert nothing.
    m.push(&[9], &[0.0]).unwrap();
    assert!(!m.table().contains_key(9));
}

#[test]
fn sigmoid_and_logloss_clamp() {
    assert_eq!(sigmoid(0.0), 0.5);
    assert_eq!(sigmoid(1e9), sigmoid(35.0));
    assert_eq!(sigmoid(-1e9), sigmoid(-35.0));
    // p = 1 is clamped to 1 − 1e-7 (0.99999988 in f32): −ln(1.19e-7) ≈ 15.94.
    let worst = logloss(1.0, 0.0);
    assert!(worst > 15.0 && worst < 17.0, "{worst}");
    assert!(logloss(0.0, 1.0).is_finite());
    assert!((logloss(0.5, 1.0) - std::f64::consts::LN_2).abs() < 1e-7);
}

#[test]
fn bytes_per_key_is_16_over_load_and_at_most_32_from_half_full() {
    let mut t = ParamTable::<KeyState>::new();
    assert_eq!(ParamTable::<KeyState>::slot_bytes(), 16);
    for k in 1..=200_000u64 {
        t.get_or_insert_default(k);
        let bpk = t.bytes_per_key();
        assert_eq!(t.bytes(), 16 * t.capacity());
        if t.len() * 2 >= t.capacity() {
            assert!(
                bpk <= 32.0,
                "{bpk} B/key at len {} cap {}",
                t.len(),
                t.capacity()
            );
        }
        if t.capacity() > 8 {
            assert!(bpk < 16.0 / 0.375, "{bpk} B/key after growth");
        }
        assert!(bpk >= 16.0 / 0.75);
    }
    // Pre-sized for 3/4 of its slots: 21.3 B/key when full, no growth.
    let mut t = ParamTable::<KeyState>::with_capacity(196_608);
    assert_eq!(t.capacity(), 1 << 18);
    for k in 0..196_608u64 {
        t.get_or_insert_default(k);
    }
    assert_eq!(t.capacity(), 1 << 18);
    assert!((t.bytes_per_key() - 16.0 / 0.75).abs() < 1e-9);
}

#[test]
fn snapshots_round_trip_and_reject_garbage() {
    let mut m = Model::new(ftrl(0.1, 1.0, 0.5, 0.25)).unwrap();
    for i in 0..500u64 {
        let label = (i % 3 == 0) as u8 as f32;
        m.learn(&[i % 97, i % 13, 0, i * 1_000_003], None, label)
            .unwrap();
    }
    m.table_mut().retain(|k, _| k % 5 != 1);
    let bytes = m.to_bytes();
    let back = Model::from_bytes(&bytes).unwrap();
    assert_eq!(back.to_bytes(), bytes, "byte-exact round trip");
    assert_eq!(back.kind(), m.kind());
    assert_eq!(back.bias_key(), Some(BIAS_KEY));
    for (k, s) in m.table().iter() {
        assert_eq!(back.table().get(k), Some(s));
    }
    assert_eq!(back.table().len(), m.table().len());

    let t = m.table().to_bytes();
    assert!(matches!(
        ParamTable::<KeyState>::from_bytes(&t[..t.len() - 1]),
        Err(DecodeError::Truncated { .. })
    ));
    assert_eq!(
        ParamTable::<f32>::from_bytes(&t).err(),
        Some(DecodeError::StateWidth {
            expected: 4,
            found: 8
        })
    );
    let mut bad = t.clone();
    bad[0] = b'X';
    assert_eq!(
        ParamTable::<KeyState>::from_bytes(&bad).err(),
        Some(DecodeError::BadMagic)
    );
    let mut long = t.clone();
    long.push(0);
    assert_eq!(
        ParamTable::<KeyState>::from_bytes(&long).err(),
        Some(DecodeError::TrailingBytes { extra: 1 })
    );
}

// ---------------------------------------------------------------------------
// The table against std's HashMap.

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, f32),
    Bump(u64),
    Remove(u64),
    Get(u64),
    Retain(u64),
    Snapshot,
}

fn key() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..64,
        1 => Just(0u64),
        1 => Just(u64::MAX),
        2 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), -10f32..10.0).prop_map(|(k, v)| Op::Insert(k, v)),
        6 => key().prop_map(Op::Bump),
        4 => key().prop_map(Op::Remove),
        3 => key().prop_map(Op::Get),
        1 => (2u64..7).prop_map(Op::Retain),
        1 => Just(Op::Snapshot),
    ]
}

proptest! {
    #[test]
    fn table_matches_hashmap(ops in prop::collection::vec(op(), 1..600)) {
        let mut t = ParamTable::<KeyState>::new();
        let mut r: HashMap<u64, KeyState> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k, v) => prop_assert_eq!(t.insert(k, [v, -v]), r.insert(k, [v, -v])),
                Op::Bump(k) => {
                    t.get_or_insert_default(k)[1] += 1.0;
                    r.entry(k).or_default()[1] += 1.0;
                }
                Op::Remove(k) => prop_assert_eq!(t.remove(k), r.remove(&k)),
                Op::Get(k) => prop_assert_eq!(t.get(k), r.get(&k)),
                Op::Retain(m) => {
                    let mut visits = 0;
                    t.retain(|k, s| { visits += 1; s[0] += 1.0; k % m != 0 });
                    prop_assert_eq!(visits, r.len());
                    r.retain(|k, s| { s[0] += 1.0; k % m != 0 });
                }
                Op::Snapshot => {
                    let bytes = t.to_bytes();
                    let back = ParamTable::<KeyState>::from_bytes(&bytes).unwrap();
                    prop_assert_eq!(back.to_bytes(), bytes);
                    t = back;
                }
            }
            prop_assert_eq!(t.len(), r.len());
            prop_assert!(t.load_factor() <= 0.75);
        }
        let mut got: Vec<(u64, KeyState)> = t.iter().map(|(k, s)| (k, *s)).collect();
        let mut want: Vec<(u64, KeyState)> = r.iter().map(|(k, s)| (*k, *s)).collect();
        got.sort_by_key(|e| e.0);
        want.sort_by_key(|e| e.0);
        prop_assert_eq!(got, want);
        for (k, s) in t.iter_mut() {
            s[0] = k as f32;
        }
        for (k, s) in t.iter() {
            prop_assert_eq!(s[0], k as f32);
        }
    }
}

// ---------------------------------------------------------------------------
// The table-backed model against a straightforward f64 FTRL.

/// FTRL-Proximal written directly from the paper, in f64, over a HashMap.
struct RefFtrl {
    p: FtrlParams,
    zn: HashMap<u64, (f64, f64)>,
}

impl RefFtrl {
    fn w(&self, k: u64) -> f64 {
        let (a, b, l1, l2) = (
            f64::from(self.p.alpha),
            f64::from(self.p.beta),
            f64::from(self.p.l1),
            f64::from(self.p.l2),
        );
        let (z, n) = self.zn.get(&k).copied().unwrap_or((0.0, 0.0));
        if z.abs() <= l1 {
            0.0
        } else {
            -(z - z.signum() * l1) / ((b + n.sqrt()) / a + l2)
        }
    }

    fn update(&mut self, k: u64, g: f64) {
        let w = self.w(k);
        let a = f64::from(self.p.alpha);
        let (z, n) = self.zn.entry(k).or_insert((0.0, 0.0));
        let sigma = ((*n + g * g).sqrt() - n.sqrt()) / a;
        *z += g - sigma * w;
        *n += g * g;
    }

    /// Predict, then train; the bias is key BIAS_KEY with value 1.
    fn learn(&mut self, keys: &[u64], values: &[f64], y: f64) -> f64 {
        let m: f64 = self.w(BIAS_KEY)
            + keys
                .iter()
                .zip(values)
                .map(|(&k, x)| self.w(k) * x)
                .sum::<f64>();
        let p = 1.0 / (1.0 + (-m.clamp(-35.0, 35.0)).exp());
        for (&k, x) in keys.iter().zip(values) {
            self.update(k, (p - y) * x);
        }
        self.update(BIAS_KEY, p - y);
        p
    }
}

fn rel_close(a: f32, b: f64) -> bool {
    (f64::from(a) - b).abs() <= 1e-4 * b.abs().max(1.0)
}

fn row() -> impl Strategy<Value = (Vec<(u64, f32)>, bool)> {
    (
        prop::collection::vec(
            (
                0u64..40,
                prop_oneof![4 => Just(1.0f32), 1 => Just(0.0f32), 4 => -2f32..2.0],
            ),
            1..12,
        ),
        any::<bool>(),
    )
}

proptest! {
    #[test]
    fn model_matches_f64_reference_ftrl(
        alpha in 0.01f32..1.0,
        beta in 0f32..2.0,
        l1 in prop_oneof![Just(0f32), 0f32..2.0],
        l2 in prop_oneof![Just(0f32), 0f32..2.0],
        use_values in any::<bool>(),
        rows in prop::collection::vec(row(), 1..80),
    ) {
        let p = FtrlParams { alpha, beta, l1, l2 };
        let mut m = Model::new(OptimizerKind::Ftrl(p)).unwrap();
        let mut r = RefFtrl { p, zn: HashMap::new() };
        for (feats, click) in &rows {
            let keys: Vec<u64> = feats.iter().map(|f| f.0).collect();
            let values: Vec<f32> = feats.iter().map(|f| if use_values { f.1 } else { 1.0 }).collect();
            let values64: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
            let y = if *click { 1.0 } else { 0.0 };
            let got = m.learn(&keys, use_values.then_some(&values[..]), y).unwrap();
            let want = r.learn(&keys, &values64, f64::from(y));
            prop_assert!(rel_close(got, want), "prediction {} vs {}", got, want);
        }
        let mut keys: Vec<u64> = r.zn.keys().copied().collect();
        keys.sort_unstable();
        let mut weights = Vec::new();
        m.pull(&keys, &mut weights);
        for (k, w) in keys.iter().zip(&weights) {
            prop_assert!(rel_close(*w, r.w(*k)), "key {}: {} vs {}", k, w, r.w(*k));
        }
    }

    #[test]
    fn push_matches_f64_reference_ftrl(
        pushes in prop::collection::vec(
            prop::collection::vec((0u64..30, -3f32..3.0), 1..20), 1..30),
    ) {
        let p = FtrlParams { alpha: 0.1, beta: 1.0, l1: 0.05, l2: 0.1 };
        let mut m = Model::new(OptimizerKind::Ftrl(p)).unwrap();
        let mut r = RefFtrl { p, zn: HashMap::new() };
        for push in &pushes {
            let keys: Vec<u64> = push.iter().map(|e| e.0).collect();
            let grads: Vec<f32> = push.iter().map(|e| e.1).collect();
            m.push(&keys, &grads).unwrap();
            for (&k, &g) in keys.iter().zip(&grads) {
                r.update(k, f64::from(g));
            }
        }
        for k in 0..30u64 {
            prop_assert!(rel_close(m.weight(k), r.w(k)), "key {}: {} vs {}", k, m.weight(k), r.w(k));
        }
    }
}

// ---------------------------------------------------------------------------
// Progressive validation against Vowpal Wabbit.

/// VW 9.11.9's progressive figures on `tests/data/ctr_10k.txt`, produced from
/// the repository root `/work/main` by
///
/// ```text
/// ~/.cache/braid-bench-venv/bin/python ../shared/data/gen_ctr.py --rows 10000 --seed 7 \
///     --out actors/tests/data/ctr_10k.txt
///     # rows=10000 ctr=0.1214 oracle_logloss=0.2966 oracle_auc=0.8101
/// bash ../shared/bench/vw_ftrl.sh actors/tests/data/ctr_10k.txt 0.1 1 0 0 22
///     # {"rows": 10000, "logloss": 0.36341, "auc": 0.6039, "last10_logloss": 0.35271,
///     #  "last10_auc": 0.60044, "learner": "vw --ftrl", ...}
/// ```
///
/// i.e. `vw --ftrl --ftrl_alpha 0.1 --ftrl_beta 1 --l1 0 --l2 0 -b 22
/// --loss_function logistic --link logistic` with labels mapped 0 → −1, and
/// VW's default constant feature. (10k rows keep the file at 1.5 MB.)
const VW_LOGLOSS: f64 = 0.36341;
const VW_AUC: f64 = 0.6039;

/// Mann-Whitney AUC, ties given their average rank.
fn auc(labels: &[f32], preds: &[f32]) -> f64 {
    let mut idx: Vec<usize> = (0..preds.len()).collect();
    idx.sort_by(|&a, &b| preds[a].total_cmp(&preds[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && preds[idx[j + 1]] == preds[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] == 1.0 {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let npos = labels.iter().filter(|&&y| y == 1.0).count() as f64;
    let nneg = labels.len() as f64 - npos;
    (rank_sum_pos - npos * (npos + 1.0) / 2.0) / (npos * nneg)
}

#[test]
fn progressive_logloss_matches_vowpal_wabbit_ftrl() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ctr_10k.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let mut m = Model::new(ftrl(0.1, 1.0, 0.0, 0.0)).unwrap();
    let mask = (1u64 << 22) - 1;
    let mut feats = Vec::with_capacity(32);
    let (mut labels, mut preds) = (Vec::new(), Vec::new());
    let mut loss = 0.0;
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let y: f32 = it.next().unwrap().parse().unwrap();
        feats.clear();
        feats.extend(it.map(|t| t.parse::<u64>().unwrap() & mask));
        assert_eq!(feats.len(), 20);
        let p = m.learn(&feats, None, y).unwrap();
        loss += logloss(p, y);
        labels.push(y);
        preds.push(p);
    }
    let n = labels.len();
    assert_eq!(n, 10_000);
    let loss = loss / n as f64;
    let auc = auc(&labels, &preds);
    eprintln!(
        "braid FTRL: logloss {loss:.5} auc {auc:.5}; VW: logloss {VW_LOGLOSS} auc {VW_AUC}; \
         {} keys, {:.1} B/key",
        m.table().len(),
        m.table().bytes_per_key()
    );
    assert!(
        (loss - VW_LOGLOSS).abs() <= 0.002,
        "logloss {loss} vs VW {VW_LOGLOSS}"
    );
    assert!((auc - VW_AUC).abs() <= 0.005, "AUC {auc} vs VW {VW_AUC}");
}
