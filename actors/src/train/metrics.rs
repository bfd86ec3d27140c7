//! Progressive-validation metrics for online learning: logloss and AUC over
//! the whole stream and over a sliding window of the last rows
//! ([`Progressive`]), and latency percentiles ([`LatencyHistogram`]).
//!
//! # Definitions
//!
//! Both the whole-stream and the windowed figures follow
//! `shared/bench/eval_predictions.py`:
//! predictions are clipped to `[1e-7, 1 - 1e-7]` in `f64` before anything
//! else, logloss is the mean of `-(y ln p + (1 - y) ln(1 - p))`, and AUC is
//! the Mann–Whitney statistic with tied predictions given their average rank,
//! so a positive and a negative with equal (clipped) predictions count as
//! half a correctly ordered pair. With one class only (or no rows) the AUC is
//! undefined and NaN is returned, as the script's `0/0` yields.
//!
//! # Logloss precision
//!
//! Per-row losses are summed in 2^-64 fixed point (`u128`), so adding a row
//! and later subtracting it from the window sum is exact. The only error is
//! rounding each loss to a multiple of 2^-64 (at most 2^-65 per row) and the
//! final conversion to `f64`: the result equals the exact mean to within
//! about one `f64` rounding.
//!
//! # AUC approximation and its error bound
//!
//! Whole-stream AUC in bounded memory uses per-class histograms of the
//! clipped prediction. Bins are log-linear in `q = min(p, 1 - p)`:
//! [`AUC_BIN_BITS`]` = 13` mantissa bits, i.e. 8192 bins per octave of `q`,
//! 23 octaves from 2^-24 to 2^-1 on each side of 0.5, plus one bin each for
//! exactly 0.5 and for the two clip bounds (where saturated predictions pile
//! up): [`AUC_BINS`]` = 376_835` bins per class. A bin spans at most
//! `2^-13 · q` in probability and at most `2^-12` (2.4e-4) in the logit,
//! everywhere in `[1e-7, 1 - 1e-7]`.
//!
//! The binning is monotone and equal predictions always share a bin, so ties
//! are handled exactly as by the script. The one source of error is a
//! positive and a negative with *different* predictions that share a bin:
//! such a pair counts as half instead of 0 or 1. Hence
//!
//! ```text
//! |AUC_binned - AUC_exact| <= sum_b pos_b * neg_b / (2 * P * N)
//! ```
//!
//! which [`Progressive::auc_error_bound`] and
//! [`Progressive::window_auc_error_bound`] compute from the histograms (the
//! bound is conservative: it also counts exactly tied pairs, so it is 0.5 when
//! every prediction is equal even though the AUC of 0.5 is then exact). For
//! scores whose logits have densities `g+` and `g-`, the bound is about
//! `2^-13 · ∫ g+ g- dz`; for logits spread with standard deviation `σ` that
//! is at most about `3.5e-5 / σ`. The realised error is usually far smaller,
//! since within a bin a positive is about as likely to be above a negative as
//! below it.
//!
//! Memory: the whole-stream histograms take 6 MB (`u64` counts), the window
//! histograms 3 MB (`u32` counts) plus 4 bytes per windowed row; pages that
//! are never touched are never faulted in. [`Progressive::auc`] and
//! [`Progressive::window_auc`] cost O(bins) (only the span of bins ever
//! used is scanned), independent of the stream and window length.
//!
//! ```
//! use braid_actors::train::metrics::{LatencyHistogram, Progressive};
//!
//! let mut m = Progressive::new(2);
//! m.record(1.0, 0.9);
//! m.record(0.0, 0.2);
//! m.record(1.0, 0.1);
//! assert_eq!(m.rows(), 3);
//! assert!((m.auc() - 0.5).abs() < 1e-12);
//! assert_eq!(m.window_auc(), 0.0);
//!
//! let mut lat = LatencyHistogram::new();
//! lat.record_ms(2.0);
//! lat.record_ms(40.0);
//! assert!((lat.quantile(0.99) - 40.0).abs() <= 0.4);
//! ```

use super::table::prefetch_line;
use std::fmt;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Predictions are clipped to `[CLIP_EPS, 1 - CLIP_EPS]`, as by
/// `eval_predictions.py`.
pub const CLIP_EPS: f64 = 1e-7;

/// Mantissa bits of `min(p, 1 - p)` that select an AUC bin: `2^AUC_BIN_BITS`
/// bins per octave.
pub const AUC_BIN_BITS: u32 = 13;

const HALF_BINS: usize = 23 << AUC_BIN_BITS;

/// Number of AUC histogram bins per class.
pub const AUC_BINS: usize = 2 * HALF_BINS + 3;

const LOWEST_BIN_KEY: u64 = 999 << AUC_BIN_BITS;

const LOSS_SCALE: f64 = 18_446_744_073_709_551_616.0;

const LABEL_BIT: u32 = 1 << 31;

/// Clips a prediction the way `eval_predictions.py` does, after mapping NaN
/// to 0.5.
pub fn clip_probability(p: f32) -> f64 {
    f64::from(sanitize(p)).clamp(CLIP_EPS, 1.0 - CLIP_EPS)
}

fn sanitize(p: f32) -> f32 {
    if p.is_nan() {
        0.5
    } else if p > 0.0 {
        p.min(1.0)
    } else {
        0.0
    }
}

fn lower_bin(q: f64) -> usize {
    let key = q.to_bits() >> (52 - AUC_BIN_BITS);
    usize::try_from(key.saturating_sub(LOWEST_BIN_KEY))
        .unwrap_or(HALF_BINS)
        .min(HALF_BINS)
}

fn auc_bin(p: f64) -> usize {
    if p <= CLIP_EPS {
        0
    } else if p >= 1.0 - CLIP_EPS {
        AUC_BINS - 1
    } else if p <= 0.5 {
        1 + lower_bin(p)
    } else {
        1 + 2 * HALF_BINS - lower_bin(1.0 - p)
    }
}

fn fixed_loss(positive: bool, p: f64) -> u128 {
    let loss = if positive { -p.ln() } else { -(1.0 - p).ln() };
    (loss * LOSS_SCALE).round() as u128
}

fn fixed_to_f64(sum: u128) -> f64 {
    sum as f64 / LOSS_SCALE
}

trait Counter: Copy + Default {
    fn inc(self) -> Self;
    fn dec(self) -> Self;
    fn wide(self) -> u128;
}

impl Counter for u32 {
    fn inc(self) -> Self {
        self.saturating_add(1)
    }
    fn dec(self) -> Self {
        self.saturating_sub(1)
    }
    fn wide(self) -> u128 {
        u128::from(self)
    }
}

impl Counter for u64 {
    fn inc(self) -> Self {
        self.saturating_add(1)
    }
    fn dec(self) -> Self {
        self.saturating_sub(1)
    }
    fn wide(self) -> u128 {
        u128::from(self)
    }
}

#[derive(Clone)]
struct ClassBins<C> {
    pos: Vec<C>,
    neg: Vec<C>,
    lo: usize,
    hi: usize,
}

#[derive(Clone, Copy)]
struct AucSummary {
    auc: f64,
    bound: f64,
}

impl<C: Counter> ClassBins<C> {
    fn new() -> Self {
        ClassBins {
            pos: vec![C::default(); AUC_BINS],
            neg: vec![C::default(); AUC_BINS],
            lo: AUC_BINS,
            hi: 0,
        }
    }

    fn empty() -> Self {
        ClassBins {
            pos: Vec::new(),
            neg: Vec::new(),
            lo: 0,
            hi: 0,
        }
    }

    fn get(&self, bin: usize, positive: bool) -> Option<&C> {
        if positive {
            self.pos.get(bin)
        } else {
            self.neg.get(bin)
        }
    }

    fn slot(&mut self, bin: usize, positive: bool) -> Option<&mut C> {
        if positive {
            self.pos.get_mut(bin)
        } else {
            self.neg.get_mut(bin)
        }
    }

    fn add(&mut self, bin: usize, positive: bool) {
        if let Some(c) = self.slot(bin, positive) {
            *c = c.inc();
            self.lo = self.lo.min(bin);
            self.hi = self.hi.max(bin + 1);
        }
    }

    fn remove(&mut self, bin: usize, positive: bool) {
        if let Some(c) = self.slot(bin, positive) {
            *c = c.dec();
        }
    }

    fn summary(&self) -> AucSummary {
        let hi = self.hi.min(self.pos.len()).min(self.neg.len());
        let lo = self.lo.min(hi);
        let mut twice_ordered: u128 = 0;
        let mut same_bin: u128 = 0;
        let mut neg_below: u128 = 0;
        let mut positives: u128 = 0;
        for (p, n) in self.pos[lo..hi].iter().zip(&self.neg[lo..hi]) {
            let (p, n) = (p.wide(), n.wide());
            if p != 0 {
                twice_ordered += p * (2 * neg_below + n);
                same_bin += p * n;
                positives += p;
            }
            neg_below += n;
        }
        if positives == 0 || neg_below == 0 {
            return AucSummary {
                auc: f64::NAN,
                bound: f64::NAN,
            };
        }
        let twice_pairs = 2.0 * positives as f64 * neg_below as f64;
        AucSummary {
            auc: twice_ordered as f64 / twice_pairs,
            bound: same_bin as f64 / twice_pairs,
        }
    }
}

/// Progressive-validation logloss and AUC over the whole stream and over
/// the last `window` rows.
///
/// Each [`record`](Self::record) costs O(1); memory is bounded independently
/// of the stream length (see the [module docs](self) for sizes and for the
/// AUC error bound). Serializes as a [`ProgressiveSnapshot`].
#[derive(Clone)]
pub struct Progressive {
    window: usize,
    rows: u64,
    nan_predictions: u64,
    loss: u128,
    bins: ClassBins<u64>,
    recent: Vec<u32>,
    /// Each recent row's fixed-point loss, so that leaving the window costs
    /// no logarithm.
    recent_loss: Vec<u128>,
    head: usize,
    window_loss: u128,
    window_bins: ClassBins<u32>,
}

impl Progressive {
    /// Metrics with a sliding window over the last `window` rows (capped at
    /// `u32::MAX`); with `window == 0` the window metrics are NaN.
    pub fn new(window: usize) -> Self {
        let window = window.min(u32::MAX as usize);
        Progressive {
            window,
            rows: 0,
            nan_predictions: 0,
            loss: 0,
            bins: ClassBins::new(),
            recent: Vec::new(),
            recent_loss: Vec::new(),
            head: 0,
            window_loss: 0,
            window_bins: if window == 0 {
                ClassBins::empty()
            } else {
                ClassBins::new()
            },
        }
    }

    /// [`Progressive::record`] of each `(labels[i], predictions[i])`, in
    /// order. The histogram slots rows a few ahead will count in are
    /// prefetched, so that their cache misses overlap instead of each
    /// stalling its row.
    pub fn record_all(&mut self, labels: &[f32], predictions: &[f32]) {
        const AHEAD: usize = 8;
        for (i, (&y, &p)) in labels.iter().zip(predictions).enumerate() {
            if let (Some(&y_ahead), Some(&p_ahead)) =
                (labels.get(i + AHEAD), predictions.get(i + AHEAD))
            {
                self.prefetch(y_ahead, p_ahead, AHEAD);
            }
            self.record(y, p);
        }
    }

    /// Prefetches the slots the row `ahead` rows on (`label`, `p`) will
    /// update.
    fn prefetch(&self, label: f32, p: f32, ahead: usize) {
        let positive = label >= 0.5;
        let bin = auc_bin(f64::from(sanitize(p)).clamp(CLIP_EPS, 1.0 - CLIP_EPS));
        if let Some(slot) = self.bins.get(bin, positive) {
            prefetch_line(slot);
        }
        if self.window == 0 {
            return;
        }
        if let Some(slot) = self.window_bins.get(bin, positive) {
            prefetch_line(slot);
        }
        if self.recent.len() == self.window {
            if let Some(&old) = self.recent.get((self.head + ahead) % self.window) {
                let (old_positive, old_p) = unpack(old);
                if let Some(slot) = self.window_bins.get(auc_bin(old_p), old_positive) {
                    prefetch_line(slot);
                }
            }
        }
    }

    /// Records one row: `label` is 1 for a click and 0 otherwise (values
    /// `>= 0.5` count as positive), `p` the probability predicted before
    /// training on the row. `p` is clipped to `[1e-7, 1 - 1e-7]`; a NaN
    /// prediction is recorded as 0.5 and counted in
    /// [`nan_predictions`](Self::nan_predictions).
    pub fn record(&mut self, label: f32, p: f32) {
        let positive = label >= 0.5;
        if p.is_nan() {
            self.nan_predictions += 1;
        }
        let stored = sanitize(p);
        let clipped = f64::from(stored).clamp(CLIP_EPS, 1.0 - CLIP_EPS);
        let bin = auc_bin(clipped);
        let loss = fixed_loss(positive, clipped);
        self.rows += 1;
        self.loss += loss;
        self.bins.add(bin, positive);
        if self.window == 0 {
            return;
        }
        let packed = stored.to_bits() | if positive { LABEL_BIT } else { 0 };
        if self.recent.len() < self.window {
            self.recent.push(packed);
            self.recent_loss.push(loss);
        } else if let (Some(slot), Some(slot_loss)) = (
            self.recent.get_mut(self.head),
            self.recent_loss.get_mut(self.head),
        ) {
            let (old_positive, old_p) = unpack(*slot);
            *slot = packed;
            let old_loss = std::mem::replace(slot_loss, loss);
            self.head += 1;
            if self.head == self.window {
                self.head = 0;
            }
            self.window_loss = self.window_loss.saturating_sub(old_loss);
            self.window_bins.remove(auc_bin(old_p), old_positive);
        }
        self.window_loss += loss;
        self.window_bins.add(bin, positive);
    }

    /// Rows recorded since the start of the stream.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows currently in the window: `min(rows, window)`.
    pub fn window_rows(&self) -> usize {
        self.recent.len()
    }

    /// The window length given to [`new`](Self::new).
    pub fn window(&self) -> usize {
        self.window
    }

    /// Rows whose prediction was NaN (recorded as 0.5).
    pub fn nan_predictions(&self) -> u64 {
        self.nan_predictions
    }

    /// Mean logloss over the whole stream; NaN before the first row.
    pub fn logloss(&self) -> f64 {
        if self.rows == 0 {
            return f64::NAN;
        }
        fixed_to_f64(self.loss) / self.rows as f64
    }

    /// AUC over the whole stream, ties counted as half; NaN unless both
    /// classes occur. Within [`auc_error_bound`](Self::auc_error_bound) of
    /// the exact value.
    pub fn auc(&self) -> f64 {
        self.bins.summary().auc
    }

    /// Upper bound on `|auc() - exact AUC|` (see the module docs); NaN
    /// unless both classes occur.
    pub fn auc_error_bound(&self) -> f64 {
        self.bins.summary().bound
    }

    /// Mean logloss over the last `window` rows; NaN when the window is
    /// empty.
    pub fn window_logloss(&self) -> f64 {
        if self.recent.is_empty() {
            return f64::NAN;
        }
        fixed_to_f64(self.window_loss) / self.recent.len() as f64
    }

    /// AUC over the last `window` rows, ties counted as half; NaN unless both
    /// classes occur there. Costs O(bins), not O(window).
    pub fn window_auc(&self) -> f64 {
        self.window_bins.summary().auc
    }

    /// Upper bound on `|window_auc() - exact window AUC|`.
    pub fn window_auc_error_bound(&self) -> f64 {
        self.window_bins.summary().bound
    }

    /// The state as plain data, for checkpoints.
    pub fn snapshot(&self) -> ProgressiveSnapshot {
        let bins = self
            .bins
            .pos
            .iter()
            .zip(&self.bins.neg)
            .enumerate()
            .skip(self.bins.lo)
            .take(self.bins.hi.saturating_sub(self.bins.lo))
            .filter(|(_, (&p, &n))| p != 0 || n != 0)
            .filter_map(|(b, (&p, &n))| Some((u32::try_from(b).ok()?, p, n)))
            .collect();
        let (newer, older) = self.recent.split_at(self.head.min(self.recent.len()));
        let recent = older
            .iter()
            .chain(newer)
            .map(|&packed| (packed & LABEL_BIT != 0, f32::from_bits(packed & !LABEL_BIT)))
            .collect();
        ProgressiveSnapshot {
            window: self.window as u64,
            bin_bits: AUC_BIN_BITS,
            rows: self.rows,
            nan_predictions: self.nan_predictions,
            loss_fixed: [(self.loss >> 64) as u64, self.loss as u64],
            bins,
            recent,
        }
    }

    /// Rebuilds the metrics from a [`snapshot`](Self::snapshot), checking its
    /// consistency.
    pub fn restore(snapshot: &ProgressiveSnapshot) -> Result<Self, MetricsError> {
        if snapshot.bin_bits != AUC_BIN_BITS {
            return Err(MetricsError::BinBits {
                found: snapshot.bin_bits,
                expected: AUC_BIN_BITS,
            });
        }
        let window = usize::try_from(snapshot.window)
            .ok()
            .filter(|&w| w <= u32::MAX as usize)
            .ok_or(MetricsError::WindowTooLarge(snapshot.window))?;
        let recent_len = snapshot.recent.len() as u64;
        if recent_len > snapshot.window || recent_len > snapshot.rows {
            return Err(MetricsError::RecentTooLong {
                recent: recent_len,
                window: snapshot.window,
                rows: snapshot.rows,
            });
        }
        let mut m = Progressive::new(window);
        let mut binned: u64 = 0;
        for &(bin, pos, neg) in &snapshot.bins {
            let b = bin as usize;
            let (Some(p), Some(n)) = (m.bins.pos.get_mut(b), m.bins.neg.get_mut(b)) else {
                return Err(MetricsError::BinOutOfRange(bin));
            };
            *p = p.saturating_add(pos);
            *n = n.saturating_add(neg);
            binned = binned.saturating_add(pos).saturating_add(neg);
            if pos != 0 || neg != 0 {
                m.bins.lo = m.bins.lo.min(b);
                m.bins.hi = m.bins.hi.max(b + 1);
            }
        }
        if binned != snapshot.rows {
            return Err(MetricsError::RowCount {
                rows: snapshot.rows,
                binned,
            });
        }
        m.rows = snapshot.rows;
        m.nan_predictions = snapshot.nan_predictions;
        m.loss = (u128::from(snapshot.loss_fixed[0]) << 64) | u128::from(snapshot.loss_fixed[1]);
        for &(positive, p) in &snapshot.recent {
            let stored = sanitize(p);
            let clipped = f64::from(stored).clamp(CLIP_EPS, 1.0 - CLIP_EPS);
            m.recent
                .push(stored.to_bits() | if positive { LABEL_BIT } else { 0 });
            let loss = fixed_loss(positive, clipped);
            m.recent_loss.push(loss);
            m.window_loss += loss;
            m.window_bins.add(auc_bin(clipped), positive);
        }
        Ok(m)
    }
}

fn unpack(packed: u32) -> (bool, f64) {
    let p = f32::from_bits(packed & !LABEL_BIT);
    (
        packed & LABEL_BIT != 0,
        f64::from(p).clamp(CLIP_EPS, 1.0 - CLIP_EPS),
    )
}

impl fmt::Debug for Progressive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progressive")
            .field("rows", &self.rows)
            .field("window", &self.window)
            .field("window_rows", &self.recent.len())
            .field("logloss", &self.logloss())
            .field("window_logloss", &self.window_logloss())
            .finish_non_exhaustive()
    }
}

impl Serialize for Progressive {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Progressive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let snapshot = ProgressiveSnapshot::deserialize(deserializer)?;
        Progressive::restore(&snapshot).map_err(D::Error::custom)
    }
}

/// Serializable state of a [`Progressive`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressiveSnapshot {
    /// Window length in rows.
    pub window: u64,
    /// [`AUC_BIN_BITS`] of the writer; restoring requires the same value.
    pub bin_bits: u32,
    /// Rows recorded since the start of the stream.
    pub rows: u64,
    /// Rows whose prediction was NaN.
    pub nan_predictions: u64,
    /// Whole-stream logloss sum in 2^-64 fixed point, high word first.
    pub loss_fixed: [u64; 2],
    /// Non-empty whole-stream bins: `(bin, positives, negatives)`.
    pub bins: Vec<(u32, u64, u64)>,
    /// The windowed rows, oldest first: `(positive, prediction)`.
    pub recent: Vec<(bool, f32)>,
}

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetricsError {
    /// The snapshot was written with a different AUC binning.
    #[error("snapshot uses {found} AUC bin bits, this build uses {expected}")]
    BinBits {
        /// Bits in the snapshot.
        found: u32,
        /// Bits of this build.
        expected: u32,
    },
    /// The window does not fit this platform or exceeds `u32::MAX`.
    #[error("window of {0} rows is too large")]
    WindowTooLarge(u64),
    /// More windowed rows than the window or the stream holds.
    #[error("{recent} windowed rows exceed the window ({window}) or the stream ({rows})")]
    RecentTooLong {
        /// Windowed rows in the snapshot.
        recent: u64,
        /// Window length.
        window: u64,
        /// Stream length.
        rows: u64,
    },
    /// A histogram bin index beyond the last bin.
    #[error("histogram bin {0} out of range")]
    BinOutOfRange(u32),
    /// The bins do not add up to the row count.
    #[error("bins hold {binned} rows but the stream has {rows}")]
    RowCount {
        /// Stream length.
        rows: u64,
        /// Rows counted in the bins.
        binned: u64,
    },
}

const SUB_BITS: u32 = 6;
const OCTAVES: usize = 32;
const LATENCY_BUCKETS: usize = (OCTAVES << SUB_BITS) + 2;
const OVERFLOW_BUCKET: usize = LATENCY_BUCKETS - 1;
const OVERFLOW_US: f64 = 4_294_967_296.0;

fn latency_bucket(us: f64) -> usize {
    if us < 1.0 {
        0
    } else if us >= OVERFLOW_US {
        OVERFLOW_BUCKET
    } else {
        let key = us.to_bits() >> (52 - SUB_BITS);
        let base = 1023u64 << SUB_BITS;
        usize::try_from(key.saturating_sub(base))
            .map_or(OVERFLOW_BUCKET, |k| (k + 1).min(OVERFLOW_BUCKET))
    }
}

fn bucket_midpoint_ms(bucket: usize) -> f64 {
    let k = bucket.saturating_sub(1);
    let octave = (k >> SUB_BITS) as i32;
    let sub = (k & ((1 << SUB_BITS) - 1)) as f64;
    let width = f64::from(1u32 << SUB_BITS);
    2f64.powi(octave) * (1.0 + (sub + 0.5) / width) / 1000.0
}

/// Latency histogram with log-linear (HDR-like) buckets: 64 per power of two
/// from 1 µs to 2^32 µs (about 71.6 minutes), so every quantile in that range
/// is within 1/128 (0.79 %) of the exact order statistic. Values below 1 µs
/// share one bucket, reported as the minimum; values above the range share
/// one, reported as the maximum. Reported quantiles are clamped to the exact
/// minimum and maximum. Serializes sparsely.
#[derive(Clone, PartialEq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    min_ms: f64,
    max_ms: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            counts: vec![0; LATENCY_BUCKETS],
            count: 0,
            min_ms: f64::INFINITY,
            max_ms: f64::NEG_INFINITY,
        }
    }

    /// Records a duration.
    pub fn record(&mut self, d: Duration) {
        self.record_ms(d.as_secs_f64() * 1000.0);
    }

    /// Records a value in milliseconds; negative values count as 0,
    /// non-finite ones are ignored.
    pub fn record_ms(&mut self, ms: f64) {
        if !ms.is_finite() {
            return;
        }
        let ms = ms.max(0.0);
        if let Some(c) = self.counts.get_mut(latency_bucket(ms * 1000.0)) {
            *c = c.saturating_add(1);
        }
        self.count = self.count.saturating_add(1);
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// What was recorded after `earlier`, a copy this histogram had then
    /// (its minimum is reported as 0 and its maximum as this one's).
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
            .map(|(now, then)| now.saturating_sub(*then))
            .collect();
        let count = self.count.saturating_sub(earlier.count);
        LatencyHistogram {
            counts,
            count,
            min_ms: if count == 0 { f64::INFINITY } else { 0.0 },
            max_ms: if count == 0 {
                f64::NEG_INFINITY
            } else {
                self.max_ms
            },
        }
    }

    /// Smallest value recorded, in ms; NaN when empty.
    pub fn min_ms(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.min_ms
        }
    }

    /// Largest value recorded, in ms; NaN when empty.
    pub fn max_ms(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.max_ms
        }
    }

    /// The `q`-quantile in ms (`q` in `[0, 1]`, clamped): the value of rank
    /// `max(1, ceil(q · count))` in ascending order, within 0.79 % inside the
    /// bucketed range. NaN when empty or when `q` is NaN.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 || q.is_nan() {
            return f64::NAN;
        }
        let n = self.count;
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen: u64 = 0;
        for (bucket, &c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen >= rank {
                return match bucket {
                    0 => self.min_ms,
                    OVERFLOW_BUCKET => self.max_ms,
                    b => bucket_midpoint_ms(b).clamp(self.min_ms, self.max_ms),
                };
            }
        }
        self.max_ms
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c = c.saturating_add(*o);
        }
        self.count = self.count.saturating_add(other.count);
        self.min_ms = self.min_ms.min(other.min_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("min_ms", &self.min_ms())
            .field("p50_ms", &self.quantile(0.5))
            .field("p99_ms", &self.quantile(0.99))
            .field("max_ms", &self.max_ms())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct LatencyRepr {
    buckets: Vec<(u32, u64)>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
}

impl Serialize for LatencyHistogram {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .filter_map(|(b, &c)| Some((u32::try_from(b).ok()?, c)))
            .collect();
        let nonempty = self.count != 0;
        LatencyRepr {
            buckets,
            min_ms: nonempty.then_some(self.min_ms),
            max_ms: nonempty.then_some(self.max_ms),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = LatencyRepr::deserialize(deserializer)?;
        let mut h = LatencyHistogram::new();
        for (bucket, c) in repr.buckets {
            let slot = h
                .counts
                .get_mut(bucket as usize)
                .ok_or_else(|| D::Error::custom(format!("latency bucket {bucket} out of range")))?;
            *slot = slot.saturating_add(c);
            h.count = h.count.saturating_add(c);
        }
        match (repr.min_ms, repr.max_ms) {
            (Some(lo), Some(hi)) if h.count != 0 && lo <= hi => {
                h.min_ms = lo;
                h.max_ms = hi;
            }
            (None, None) if h.count == 0 => {}
            _ => return Err(D::Error::custom("latency min/max inconsistent with counts")),
        }
        Ok(h)
    }
}

/// Wall-clock nanoseconds since the Unix epoch: the ingest stamp of a
/// batch, comparable across the processes of one machine (0 if the clock
/// is before 1970).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
