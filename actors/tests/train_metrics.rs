//! Progressive metrics against exact reference computations that follow
//! `shared/bench/eval_predictions.py`, and latency quantiles against exact
//! order statistics.

use std::time::Duration;

use braid::store::codec;
use braid_actors::train::metrics::{
    LatencyHistogram, MetricsError, Progressive, ProgressiveSnapshot, AUC_BIN_BITS,
};
use proptest::prelude::*;

fn clip(p: f32) -> f64 {
    let p = if p.is_nan() { 0.5 } else { f64::from(p) };
    p.clamp(1e-7, 1.0 - 1e-7)
}

fn exact_logloss(rows: &[(f32, f32)]) -> f64 {
    let sum: f64 = rows
        .iter()
        .map(|&(y, p)| {
            let y = if y >= 0.5 { 1.0 } else { 0.0 };
            let p = clip(p);
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / rows.len() as f64
}

/// The script's AUC: rank all (clipped) predictions, give each group of
/// equal predictions the average of its ranks, then
/// `(sum of positive ranks - P(P+1)/2) / (P N)`; `0/0` is NaN.
fn exact_auc(rows: &[(f32, f32)]) -> f64 {
    let mut v: Vec<(f64, bool)> = rows.iter().map(|&(y, p)| (clip(p), y >= 0.5)).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut pos_rank_sum = 0.0f64;
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let positives = v[i..j].iter().filter(|r| r.1).count();
        pos_rank_sum += avg_rank * positives as f64;
        i = j;
    }
    let npos = v.iter().filter(|r| r.1).count() as f64;
    let nneg = v.len() as f64 - npos;
    (pos_rank_sum - npos * (npos + 1.0) / 2.0) / (npos * nneg)
}

fn pairs(rows: &[(f32, f32)]) -> f64 {
    let npos = rows.iter().filter(|r| r.0 >= 0.5).count() as f64;
    npos * (rows.len() as f64 - npos)
}

fn assert_rel(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-300),
        "{what}: got {got}, want {want}"
    );
}

/// AUC check: never off by more than the reported bound, and within 1e-4
/// whenever that bound can be met (no ties across bins possible, or enough
/// pairs that one shared bin moves the AUC by well under 1e-4).
fn assert_auc(got: f64, bound: f64, rows: &[(f32, f32)], grid: bool, what: &str) {
    let want = exact_auc(rows);
    if want.is_nan() {
        assert!(
            got.is_nan() && bound.is_nan(),
            "{what}: got {got}, want NaN"
        );
        return;
    }
    assert!(
        (got - want).abs() <= bound + 1e-12,
        "{what}: got {got}, want {want}, bound {bound}"
    );
    if grid || pairs(rows) >= 1e5 {
        assert!((got - want).abs() <= 1e-4, "{what}: got {got}, want {want}");
    }
}

struct Lcg(u64);

impl Lcg {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
    fn unit(&mut self) -> f64 {
        self.next_u64() as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-300);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A CTR-like stream: logit ~ N(-2, 1), label ~ Bernoulli(sigmoid(logit +
/// noise)), prediction `sigmoid(logit)` as f32.
fn ctr_stream(n: usize, seed: u64) -> Vec<(f32, f32)> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| {
            let z = -2.0 + rng.normal();
            let truth = 1.0 / (1.0 + (-(z + 0.5 * rng.normal())).exp());
            let y = if rng.unit() < truth { 1.0 } else { 0.0 };
            (y, (1.0 / (1.0 + (-z).exp())) as f32)
        })
        .collect()
}

fn prediction() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => 0.0f32..=1.0,
        2 => (0u32..=20).prop_map(|k| k as f32 / 20.0),
        1 => Just(0.0f32),
        1 => Just(1.0f32),
        1 => prop_oneof![Just(1e-9f32), Just(1e-7f32), Just(0.999_999_9f32), Just(-3.0f32)],
        1 => (1u32..200).prop_map(|k| k as f32 * 1e-6),
    ]
}

/// Streams whose predictions are `k / m` for one random `m <= 1000`: heavy
/// ties, distinct values never closer than 1e-3.
fn grid_rows(max: usize) -> impl Strategy<Value = Vec<(f32, f32)>> {
    (2u32..=1000).prop_flat_map(move |m| {
        prop::collection::vec(
            (
                prop::bool::ANY.prop_map(f32::from),
                (0..=m).prop_map(move |k| k as f32 / m as f32),
            ),
            0..max,
        )
    })
}

fn rows_of(p: impl Strategy<Value = f32>, max: usize) -> impl Strategy<Value = Vec<(f32, f32)>> {
    prop::collection::vec((prop::bool::ANY.prop_map(f32::from), p), 0..max)
}

fn feed(rows: &[(f32, f32)], window: usize) -> Progressive {
    let mut m = Progressive::new(window);
    for &(y, p) in rows {
        m.record(y, p);
    }
    m
}

fn check_whole(m: &Progressive, rows: &[(f32, f32)], grid: bool) {
    assert_eq!(m.rows(), rows.len() as u64);
    if rows.is_empty() {
        assert!(m.logloss().is_nan() && m.auc().is_nan());
        return;
    }
    assert_rel(m.logloss(), exact_logloss(rows), 1e-9, "logloss");
    assert_auc(m.auc(), m.auc_error_bound(), rows, grid, "auc");
}

fn check_window(m: &Progressive, rows: &[(f32, f32)], window: usize, grid: bool) {
    let tail = &rows[rows.len().saturating_sub(window)..];
    assert_eq!(m.window_rows(), tail.len());
    if tail.is_empty() {
        assert!(m.window_logloss().is_nan() && m.window_auc().is_nan());
        return;
    }
    assert_rel(
        m.window_logloss(),
        exact_logloss(tail),
        1e-9,
        "window logloss",
    );
    assert_auc(
        m.window_auc(),
        m.window_auc_error_bound(),
        tail,
        grid,
        "window auc",
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn whole_stream_matches_exact(rows in rows_of(prediction(), 1500)) {
        check_whole(&feed(&rows, 50), &rows, false);
    }

    #[test]
    fn whole_stream_with_heavy_ties_is_exact(rows in grid_rows(1500)) {
        let m = feed(&rows, 50);
        check_whole(&m, &rows, true);
        let want = exact_auc(&rows);
        if !want.is_nan() {
            prop_assert!((m.auc() - want).abs() <= 1e-12, "{} vs {}", m.auc(), want);
        }
    }

    #[test]
    fn window_with_heavy_ties_matches_exact(
        rows in grid_rows(1200),
        window in 1usize..300,
        checkpoints in prop::collection::vec(0usize..1200, 1..6),
    ) {
        let mut m = Progressive::new(window);
        let mut cuts: Vec<usize> = checkpoints.into_iter().map(|c| c.min(rows.len())).collect();
        cuts.sort_unstable();
        let mut fed = 0;
        for cut in cuts {
            for &(y, p) in &rows[fed..cut] {
                m.record(y, p);
            }
            fed = cut;
            check_window(&m, &rows[..fed], window, true);
        }
    }

    #[test]
    fn latency_quantiles_within_one_percent(
        log_ms in prop::collection::vec(-3.0f64..6.556, 1..2000),
        qs in prop::collection::vec(0.0f64..=1.0, 1..10),
    ) {
        let values: Vec<f64> = log_ms.iter().map(|l| 10f64.powf(*l)).collect();
        let mut h = LatencyHistogram::new();
        for &v in &values {
            h.record_ms(v);
        }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        prop_assert_eq!(h.count(), values.len() as u64);
        for q in qs.into_iter().chain([0.0, 0.5, 0.99, 1.0]) {
            let want = order_statistic(&sorted, q);
            let got = h.quantile(q);
            prop_assert!((got - want).abs() <= 0.01 * want, "q {}: {} vs {}", q, got, want);
        }
    }

    #[test]
    fn latency_merge_equals_recording_everything(
        a in prop::collection::vec(0.0f64..5000.0, 0..500),
        b in prop::collection::vec(0.0f64..5000.0, 0..500),
    ) {
        let mut ha = LatencyHistogram::new();
        let mut hb = LatencyHistogram::new();
        let mut all = LatencyHistogram::new();
        for &v in &a {
            ha.record_ms(v);
            all.record_ms(v);
        }
        for &v in &b {
            hb.record_ms(v);
            all.record_ms(v);
        }
        ha.merge(&hb);
        prop_assert_eq!(&ha, &all);
        let bytes = codec::encode(&ha).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: LatencyHistogram =
            codec::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &all);
        let json = serde_json::to_string(&ha).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: LatencyHistogram =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.count(), all.count());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let (x, y) = (back.quantile(q), all.quantile(q));
            prop_assert!(same(x, y) || (x - y).abs() <= 1e-12 * y.abs());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn window_matches_exact_at_checkpoints(
        rows in rows_of(prediction(), 1200),
        window in 1usize..300,
        checkpoints in prop::collection::vec(0usize..1200, 1..6),
    ) {
        let mut m = Progressive::new(window);
        let mut cuts: Vec<usize> = checkpoints.into_iter().map(|c| c.min(rows.len())).collect();
        cuts.sort_unstable();
        let mut fed = 0;
        for cut in cuts {
            for &(y, p) in &rows[fed..cut] {
                m.record(y, p);
            }
            fed = cut;
            check_window(&m, &rows[..fed], window, false);
            check_whole(&m, &rows[..fed], false);
        }
    }

    #[test]
    fn recording_a_batch_is_recording_each_row(
        rows in rows_of(prediction(), 600),
        window in 0usize..100,
        cut in 0usize..600,
    ) {
        let cut = cut.min(rows.len());
        let one_by_one = feed(&rows, window);
        let mut batched = Progressive::new(window);
        for part in [&rows[..cut], &rows[cut..]] {
            let (labels, predictions): (Vec<f32>, Vec<f32>) = part.iter().copied().unzip();
            batched.record_all(&labels, &predictions);
        }
        prop_assert_eq!(one_by_one.snapshot(), batched.snapshot());
        prop_assert!(same(one_by_one.logloss(), batched.logloss()));
        prop_assert!(same(one_by_one.auc(), batched.auc()));
        prop_assert!(same(one_by_one.window_logloss(), batched.window_logloss()));
        prop_assert!(same(one_by_one.window_auc(), batched.window_auc()));
    }

    #[test]
    fn snapshot_round_trip_continues_identically(
        rows in rows_of(prediction(), 600),
        window in 0usize..100,
        cut in 0usize..600,
    ) {
        let cut = cut.min(rows.len());
        let mut a = feed(&rows[..cut], window);
        let json = serde_json::to_string(&a).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut b: Progressive =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bytes = codec::encode(&a).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut c: Progressive =
            codec::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for &(y, p) in &rows[cut..] {
            a.record(y, p);
            b.record(y, p);
            c.record(y, p);
        }
        for m in [&b, &c] {
            prop_assert_eq!(a.snapshot(), m.snapshot());
            prop_assert_eq!(a.rows(), m.rows());
            prop_assert!(same(a.logloss(), m.logloss()));
            prop_assert!(same(a.auc(), m.auc()));
            prop_assert!(same(a.window_logloss(), m.window_logloss()));
            prop_assert!(same(a.window_auc(), m.window_auc()));
        }
        if window > 0 {
            check_window(&b, &rows, window, false);
        }
    }
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn order_statistic(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

#[test]
fn all_equal_predictions_give_half() {
    let rows: Vec<(f32, f32)> = (0..1000)
        .map(|i| ((i % 3 == 0) as u8 as f32, 0.37))
        .collect();
    let m = feed(&rows, 100);
    assert_eq!(m.auc(), 0.5);
    assert_eq!(m.window_auc(), 0.5);
    assert_eq!(exact_auc(&rows), 0.5);
    let m = feed(&[(1.0, 0.0), (0.0, 1e-9), (1.0, -1.0), (0.0, 0.0)], 4);
    assert_eq!(m.auc(), 0.5, "predictions equal after clipping are ties");
}

#[test]
fn one_class_only_gives_nan_like_the_script() {
    for label in [0.0f32, 1.0] {
        let rows: Vec<(f32, f32)> = (0..50).map(|i| (label, i as f32 / 50.0)).collect();
        let m = feed(&rows, 10);
        assert!(exact_auc(&rows).is_nan());
        assert!(m.auc().is_nan() && m.auc_error_bound().is_nan());
        assert!(m.window_auc().is_nan());
        assert_rel(m.logloss(), exact_logloss(&rows), 1e-9, "logloss");
    }
    let empty = Progressive::new(10);
    assert!(empty.auc().is_nan() && empty.logloss().is_nan());
    assert!(empty.window_auc().is_nan() && empty.window_logloss().is_nan());
}

#[test]
fn clipping_matches_the_script() {
    let m = feed(&[(1.0, 0.0), (0.0, 1.0), (1.0, 2.0), (0.0, -1.0)], 4);
    let lo = 1e-7f64;
    let hi = 1.0 - 1e-7f64;
    let want = (-lo.ln() - (1.0 - hi).ln() - hi.ln() - (1.0 - lo).ln()) / 4.0;
    assert_rel(m.logloss(), want, 1e-15, "clipped");
    assert_eq!(m.auc(), 0.5);
}

#[test]
fn nan_predictions_count_as_half() {
    let mut m = Progressive::new(4);
    m.record(1.0, f32::NAN);
    m.record(0.0, 0.5);
    assert_eq!(m.nan_predictions(), 1);
    assert_eq!(m.auc(), 0.5);
    assert_rel(m.logloss(), std::f64::consts::LN_2, 1e-12, "nan");
}

#[test]
fn window_zero_disables_window_metrics() {
    let m = feed(&ctr_stream(100, 3), 0);
    assert_eq!(m.window_rows(), 0);
    assert!(m.window_logloss().is_nan() && m.window_auc().is_nan());
    assert!(!m.logloss().is_nan());
}

#[test]
fn realistic_stream_auc_within_1e4_and_bound_below_1e4() {
    let rows = ctr_stream(300_000, 42);
    let window = 100_000;
    let m = feed(&rows, window);
    check_whole(&m, &rows, false);
    check_window(&m, &rows, window, false);
    let exact = exact_auc(&rows);
    eprintln!(
        "auc {} exact {exact} bound {}; window auc {} exact {} bound {}",
        m.auc(),
        m.auc_error_bound(),
        m.window_auc(),
        exact_auc(&rows[rows.len() - window..]),
        m.window_auc_error_bound()
    );
    assert!((m.auc() - exact).abs() <= 1e-4, "{} vs {exact}", m.auc());
    assert!(m.auc_error_bound() <= 1e-4, "bound {}", m.auc_error_bound());
    assert!(m.window_auc_error_bound() <= 1e-4);
}

/// Distinct predictions closer than a bin are counted as ties: the error
/// can then exceed 1e-4, but never the reported bound.
#[test]
fn near_ties_stay_within_the_reported_bound() {
    let rows: Vec<(f32, f32)> = (0..2000)
        .map(|i| {
            let above = i % 2 == 0;
            let p = if above { 0.300_001 } else { 0.3 };
            (
                if above {
                    1.0
                } else {
                    (i % 4 == 1) as u8 as f32
                },
                p,
            )
        })
        .collect();
    let m = feed(&rows, 500);
    let exact = exact_auc(&rows);
    let err = (m.auc() - exact).abs();
    assert!(err > 1e-4, "the two clusters share a bin: {err}");
    assert!(err <= m.auc_error_bound() + 1e-12);
    let tail = &rows[1500..];
    assert!((m.window_auc() - exact_auc(tail)).abs() <= m.window_auc_error_bound() + 1e-12);
}

#[test]
fn bad_snapshots_are_rejected() {
    let m = feed(&ctr_stream(200, 7), 50);
    let good = m.snapshot();
    let restored = Progressive::restore(&good).map(|r| r.snapshot());
    assert_eq!(restored, Ok(good.clone()));

    let wrong_bits = ProgressiveSnapshot {
        bin_bits: AUC_BIN_BITS + 1,
        ..good.clone()
    };
    assert!(matches!(
        Progressive::restore(&wrong_bits),
        Err(MetricsError::BinBits { .. })
    ));
    let wrong_rows = ProgressiveSnapshot {
        rows: good.rows + 1,
        ..good.clone()
    };
    assert!(matches!(
        Progressive::restore(&wrong_rows),
        Err(MetricsError::RowCount { .. })
    ));
    let mut bad_bin = good.clone();
    bad_bin.bins.push((u32::MAX, 1, 0));
    bad_bin.rows += 1;
    assert_eq!(
        Progressive::restore(&bad_bin).err(),
        Some(MetricsError::BinOutOfRange(u32::MAX))
    );
    let short_window = ProgressiveSnapshot {
        window: 10,
        ..good.clone()
    };
    assert!(matches!(
        Progressive::restore(&short_window),
        Err(MetricsError::RecentTooLong { .. })
    ));
    let json = serde_json::to_string(&wrong_rows).unwrap_or_default();
    assert!(serde_json::from_str::<Progressive>(&json).is_err());
}

#[test]
fn latency_edges_and_durations() {
    let mut h = LatencyHistogram::new();
    assert!(h.quantile(0.5).is_nan());
    assert_eq!(h.count(), 0);
    h.record(Duration::from_micros(1500));
    h.record(Duration::from_secs(3600));
    h.record(Duration::from_nanos(200));
    h.record_ms(f64::NAN);
    h.record_ms(-1.0);
    assert_eq!(h.count(), 4);
    assert_eq!(h.quantile(0.0), 0.0);
    assert_eq!(h.min_ms(), 0.0);
    assert_eq!(h.quantile(1.0), 3_600_000.0);
    assert!((h.quantile(0.75) - 1.5).abs() <= 0.015);
    let lag: Vec<f64> = (0..100).map(|i| f64::from(i % 4)).collect();
    let mut versions = LatencyHistogram::new();
    for &v in &lag {
        versions.record_ms(v);
    }
    assert_eq!(versions.quantile(0.1), 0.0);
    assert!((versions.quantile(0.99) - 3.0).abs() <= 0.03);
    let empty: LatencyHistogram =
        serde_json::from_str(&serde_json::to_string(&LatencyHistogram::new()).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(empty.count(), 0);
}

/// Compares with `shared/bench/eval_predictions.py` itself. Needs Python
/// with numpy: `BRAID_BENCH_PYTHON` (default the bench venv's python).
#[test]
#[ignore = "needs Python with numpy; run with --ignored"]
fn matches_eval_predictions_script() {
    let python = std::env::var("BRAID_BENCH_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/braid-bench-venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/bench/eval_predictions.py"
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut rows = ctr_stream(50_000, 11);
    for (i, r) in rows.iter_mut().enumerate().step_by(7) {
        r.1 = (i % 5) as f32 / 4.0;
    }
    let data: String = rows
        .iter()
        .map(|r| format!("{} 1 2\n", r.0 as u8))
        .collect();
    let preds: String = rows
        .iter()
        .map(|r| format!("{:?}\n", f64::from(r.1)))
        .collect();
    let data_path = dir.path().join("data");
    let pred_path = dir.path().join("preds");
    std::fs::write(&data_path, data).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&pred_path, preds).unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&data_path)
        .arg(&pred_path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let tenth = rows.len() / 10;
    let m = feed(&rows, tenth);
    let field = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    assert_eq!(field("rows"), rows.len() as f64);
    assert!((m.logloss() - field("logloss")).abs() <= 5e-6);
    assert!((m.auc() - field("auc")).abs() <= 5e-6 + 1e-4);
    assert!((m.window_logloss() - field("last10_logloss")).abs() <= 5e-6);
    assert!((m.window_auc() - field("last10_auc")).abs() <= 5e-6 + 1e-4);
    eprintln!(
        "script {v}; ours logloss {:.7} auc {:.7} last10 {:.7} {:.7}",
        m.logloss(),
        m.auc(),
        m.window_logloss(),
        m.window_auc()
    );
}
