//! Keyed windows over record counts and over event time, aggregated
//! incrementally, fired by record counts or by watermarks.
//!
//! A [`WindowOperator`] consumes `(key, value)` pairs of one parallel
//! subtask (the input is already partitioned by key), folds every value
//! into the accumulator of each window it belongs to with an
//! [`Aggregator`], and emits one [`WindowResult`] per fired window.
//!
//! # Count windows
//!
//! [`WindowSpec::TumblingCount`] and [`WindowSpec::SlidingCount`] ignore
//! event time and watermarks entirely; records with or without a time are
//! counted alike. Each key numbers its records 1, 2, 3, …; a result's
//! `start..end` is the 1-based index range `[first, last + 1)` of the
//! records it covers.
//!
//! * Tumbling: records `n·size + 1 ..= (n + 1)·size` of a key form one
//!   window, fired by the record that completes it.
//! * Sliding: every `slide`-th record of a key fires a window over that
//!   key's last `size` records (fewer at the start of the stream), as
//!   Flink's `countWindow(size, slide)`. Only the last `size` values per key
//!   are kept.
//!
//! A count window is emitted immediately, while the completing record is
//! processed, carrying that record's event time. As in Flink, count windows
//! fire only when full: [`Operator::on_end`] does **not** emit the
//! incomplete tumbling window a key may have pending, nor a partial slide.
//!
//! # Event-time windows
//!
//! [`WindowSpec::TumblingTime`] windows are `[start, start + size)` with
//! `start` a multiple of `size` (negative times included).
//! [`WindowSpec::SlidingTime`] windows have length `size` and start at every
//! multiple of `slide`; a record at time `t` belongs to each of them that
//! contains `t` (`ceil(size / slide)` windows when `slide` divides `size`,
//! none if it falls in a gap between windows when `slide > size`), as
//! Flink's sliding event-time windows.
//!
//! A watermark `w` promises that no record earlier than `w` follows, so a
//! window `[start, end)` is complete, and fires, once the watermark reaches
//! `end`. Windows firing on one watermark are emitted ordered by
//! `(end, start, key)`, so the output is deterministic. A result carries the
//! event time `end - 1`, the window's last instant.
//!
//! Records without an event time are dropped and counted by
//! [`WindowOperator::untimed_records`].
//!
//! With the default allowed lateness of 0, a window's state is discarded
//! when it fires; a record whose windows have all fired is dropped and
//! counted by [`WindowOperator::late_records`]. With an allowed lateness
//! `l > 0` ([`WindowOperator::allowed_lateness`]), a fired window's state is
//! kept until the watermark reaches `end + l`; a record arriving for such a
//! window is added to it and the window fires again at once with the
//! updated result (one result per such window, in `(end, start)` order), as
//! Flink's allowed lateness. A record is late, dropped and counted, when it
//! joins no window still kept and its time is earlier than
//! `watermark - l`. (A record falling in a gap of a sliding window is
//! dropped but counted late only under that same condition.)
//!
//! [`Operator::on_end`] fires every time window that has not fired yet, as
//! if the watermark had reached `+∞`, and then discards all time-window
//! state.
//!
//! # Checkpoints
//!
//! All state lives in persistent `imbl` maps: [`Operator::snapshot`] clones
//! them in O(1) and the returned [`Snapshot`] encodes the frozen copy with
//! bincode later. The snapshot holds the watermark, the late and untimed
//! counters, the pending and retained windows and the per-key count-window
//! state, together with the spec and allowed lateness it was taken under;
//! [`Operator::restore`] refuses a snapshot taken under another
//! configuration. Restoring and replaying the rest of the input reproduces
//! exactly the output an uninterrupted operator would have produced.
//!
//! ```
//! use braid_actors::stream::operator::Operator;
//! use braid_actors::stream::window::{Reduce, WindowOperator, WindowResult, WindowSpec};
//!
//! let mut op: WindowOperator<String, u32, _> = WindowOperator::new(
//!     WindowSpec::TumblingTime { size: 10 },
//!     Reduce(|a: &u32, b: &u32| a + b),
//! );
//! let mut out = Vec::new();
//! op.process(("a".to_string(), 1), Some(3), &mut out);
//! op.process(("a".to_string(), 2), Some(8), &mut out);
//! op.process(("a".to_string(), 5), Some(12), &mut out);
//! op.on_watermark(10, &mut out);
//! let fired = WindowResult { key: "a".to_string(), start: 0, end: 10, value: 3 };
//! assert_eq!(out, vec![(fired, Some(9))]);
//! ```

use std::collections::VecDeque;

use imbl::OrdMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::operator::{
    decode_state, imbl_de, Collector, EventTime, Operator, OperatorError, Snapshot, StateError,
};

/// How records are grouped into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    /// Every `size` records of a key form one window.
    TumblingCount {
        /// Records per window; positive.
        size: u64,
    },
    /// Every `slide` records of a key, a window over that key's last `size`
    /// records (Flink's `countWindow(size, slide)`).
    SlidingCount {
        /// Most records a window covers; positive.
        size: u64,
        /// Records between firings; positive.
        slide: u64,
    },
    /// Event-time windows `[start, start + size)` with `start` a multiple of
    /// `size`.
    TumblingTime {
        /// Window length in milliseconds; positive.
        size: i64,
    },
    /// Event-time windows of length `size` starting at every multiple of
    /// `slide` (Flink's sliding event-time windows).
    SlidingTime {
        /// Window length in milliseconds; positive.
        size: i64,
        /// Milliseconds between window starts; positive.
        slide: i64,
    },
}

impl WindowSpec {
    /// Checks that every size and slide is positive.
    pub fn validate(&self) -> Result<(), WindowSpecError> {
        let (size_ok, slide_ok) = match *self {
            WindowSpec::TumblingCount { size } => (size > 0, true),
            WindowSpec::SlidingCount { size, slide } => (size > 0, slide > 0),
            WindowSpec::TumblingTime { size } => (size > 0, true),
            WindowSpec::SlidingTime { size, slide } => (size > 0, slide > 0),
        };
        if !size_ok {
            Err(WindowSpecError::Size(*self))
        } else if !slide_ok {
            Err(WindowSpecError::Slide(*self))
        } else {
            Ok(())
        }
    }

    fn is_time(&self) -> bool {
        matches!(
            self,
            WindowSpec::TumblingTime { .. } | WindowSpec::SlidingTime { .. }
        )
    }

    /// The `(start, end)` of every time window containing `t`, ordered by
    /// end (and so by start). Empty for count windows.
    fn time_windows(&self, t: EventTime) -> Vec<(i64, i64)> {
        match *self {
            WindowSpec::TumblingTime { size } if size > 0 => t
                .checked_sub(t.rem_euclid(size))
                .map(|start| (start, start.saturating_add(size)))
                .into_iter()
                .collect(),
            WindowSpec::SlidingTime { size, slide } if size > 0 && slide > 0 => {
                let mut windows = Vec::new();
                let lowest_excluded = t.saturating_sub(size);
                let Some(mut start) = t.checked_sub(t.rem_euclid(slide)) else {
                    return windows;
                };
                while start > lowest_excluded {
                    windows.push((start, start.saturating_add(size)));
                    match start.checked_sub(slide) {
                        Some(s) => start = s,
                        None => break,
                    }
                }
                windows.reverse();
                windows
            }
            _ => Vec::new(),
        }
    }
}

/// Why a [`WindowSpec`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowSpecError {
    /// The window size is zero or negative.
    #[error("window size must be positive in {0:?}")]
    Size(WindowSpec),
    /// The slide is zero or negative.
    #[error("window slide must be positive in {0:?}")]
    Slide(WindowSpec),
}

/// One fired window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowResult<K, R> {
    /// The key whose records the window holds.
    pub key: K,
    /// Time windows: the first instant of `[start, end)`. Count windows:
    /// the 1-based index, among the key's records, of the first record
    /// covered.
    pub start: i64,
    /// Time windows: the end of `[start, end)`, excluded. Count windows:
    /// one past the index of the last record covered.
    pub end: i64,
    /// The aggregate of the window's records.
    pub value: R,
}

/// Incremental aggregation of a window's values (Flink's
/// `AggregateFunction`): an accumulator is created, every value is added
/// to it, and the result is read when the window fires.
///
/// The operator only reads results of accumulators to which at least one
/// value was added. Accumulators are `Sync` because they live in shared,
/// persistent maps that a snapshot hands to another thread.
pub trait Aggregator<V>: Send + Clone + 'static {
    /// The running state of one window.
    type Acc: Clone + Send + Sync + Serialize + DeserializeOwned + 'static;
    /// What a fired window yields.
    type Out: Send + 'static;

    /// An accumulator holding no values.
    fn create(&self) -> Self::Acc;
    /// Folds one value into an accumulator.
    fn add(&self, acc: &mut Self::Acc, value: &V);
    /// The window's result.
    fn result(&self, acc: &Self::Acc) -> Self::Out;
}

/// `reduce` as an [`Aggregator`]: combines a window's values pairwise with
/// the function, in arrival order. The accumulator is `Option<V>` and the
/// result is `V`; the window operator fires only windows that hold at least
/// one value.
#[derive(Debug, Clone, Copy)]
pub struct Reduce<F>(pub F);

impl<V, F> Aggregator<V> for Reduce<F>
where
    F: Fn(&V, &V) -> V + Send + Clone + 'static,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    type Acc = Option<V>;
    type Out = V;

    fn create(&self) -> Option<V> {
        None
    }

    fn add(&self, acc: &mut Option<V>, value: &V) {
        *acc = Some(match acc.take() {
            Some(current) => (self.0)(&current, value),
            None => value.clone(),
        });
    }

    /// # Panics
    ///
    /// If nothing was added to `acc`: an empty reduction has no value.
    /// [`WindowOperator`] never asks for one.
    fn result(&self, acc: &Option<V>) -> V {
        match acc {
            Some(v) => v.clone(),
            None => panic!("Reduce::result of an accumulator with no values"),
        }
    }
}

/// A time window's key in the state maps; the order is the firing order.
type WindowKey<K> = (i64, i64, K);

#[derive(Clone, Serialize, Deserialize)]
#[serde(bound(
    serialize = "K: Serialize + Ord + Clone, V: Serialize + Clone, Acc: Serialize + Clone",
    deserialize = "K: Deserialize<'de> + Ord + Clone, V: Deserialize<'de> + Clone, \
                   Acc: Deserialize<'de> + Clone"
))]
struct State<K, V, Acc> {
    spec: WindowSpec,
    allowed_lateness: i64,
    watermark: EventTime,
    late_records: u64,
    untimed_records: u64,
    /// Time windows that have not fired yet.
    #[serde(deserialize_with = "imbl_de::ord_map")]
    pending: OrdMap<WindowKey<K>, Acc>,
    /// Fired time windows kept for late records until `end + lateness`.
    #[serde(deserialize_with = "imbl_de::ord_map")]
    retained: OrdMap<WindowKey<K>, Acc>,
    /// Tumbling count windows: records seen per key and the open window.
    #[serde(deserialize_with = "imbl_de::ord_map")]
    tumbling: OrdMap<K, (u64, Acc)>,
    /// Sliding count windows: records seen per key and the last `size`
    /// values.
    #[serde(deserialize_with = "imbl_de::ord_map")]
    sliding: OrdMap<K, (u64, VecDeque<V>)>,
}

/// Windows keyed records by count or event time and aggregates each
/// window incrementally; see the [module documentation](self) for the
/// semantics.
pub struct WindowOperator<K, V, A: Aggregator<V>> {
    agg: A,
    state: State<K, V, A::Acc>,
}

impl<K, V, A> WindowOperator<K, V, A>
where
    K: Ord + Clone,
    V: Clone,
    A: Aggregator<V>,
{
    /// A window operator with no allowed lateness.
    ///
    /// # Panics
    ///
    /// If a size or slide of `spec` is not positive; [`Self::try_new`]
    /// reports that as an error instead.
    pub fn new(spec: WindowSpec, agg: A) -> Self {
        match Self::try_new(spec, agg) {
            Ok(op) => op,
            Err(e) => panic!("{e}"),
        }
    }

    /// A window operator with no allowed lateness, or why `spec` is
    /// invalid.
    pub fn try_new(spec: WindowSpec, agg: A) -> Result<Self, WindowSpecError> {
        spec.validate()?;
        Ok(WindowOperator {
            agg,
            state: State {
                spec,
                allowed_lateness: 0,
                watermark: EventTime::MIN,
                late_records: 0,
                untimed_records: 0,
                pending: OrdMap::new(),
                retained: OrdMap::new(),
                tumbling: OrdMap::new(),
                sliding: OrdMap::new(),
            },
        })
    }

    /// Keeps fired time windows for `ms` more milliseconds of event time
    /// so that late records still update them (negative counts as 0). Has
    /// no effect on count windows.
    pub fn allowed_lateness(mut self, ms: i64) -> Self {
        self.state.allowed_lateness = ms.max(0);
        self
    }

    /// The spec the operator windows by.
    pub fn spec(&self) -> WindowSpec {
        self.state.spec
    }

    /// Time-window records dropped because they arrived too late.
    pub fn late_records(&self) -> u64 {
        self.state.late_records
    }

    /// Time-window records dropped because they carried no event time.
    pub fn untimed_records(&self) -> u64 {
        self.state.untimed_records
    }

    /// The last watermark a time-window operator received (`i64::MAX` after
    /// the end of input); `None` before the first one and always for count
    /// windows, which ignore watermarks.
    pub fn watermark(&self) -> Option<EventTime> {
        (self.state.watermark != EventTime::MIN).then_some(self.state.watermark)
    }

    fn emit_window(
        agg: &A,
        (end, start, key): WindowKey<K>,
        acc: &A::Acc,
        out: &mut dyn Collector<WindowResult<K, A::Out>>,
    ) {
        let result = WindowResult {
            key,
            start,
            end,
            value: agg.result(acc),
        };
        out.emit(result, Some(end.saturating_sub(1)));
    }

    fn expired(&self, end: i64) -> bool {
        end.saturating_add(self.state.allowed_lateness) <= self.state.watermark
    }

    fn accumulate<W: Ord + Clone>(agg: &A, map: &mut OrdMap<W, A::Acc>, key: W, value: &V) {
        match map.get_mut(&key) {
            Some(acc) => agg.add(acc, value),
            None => {
                let mut acc = agg.create();
                agg.add(&mut acc, value);
                map.insert(key, acc);
            }
        }
    }

    fn process_timed(
        &mut self,
        key: K,
        value: &V,
        t: EventTime,
        out: &mut dyn Collector<WindowResult<K, A::Out>>,
    ) {
        let mut kept = false;
        for (start, end) in self.state.spec.time_windows(t) {
            if self.expired(end) {
                continue;
            }
            kept = true;
            let window = (end, start, key.clone());
            if end <= self.state.watermark {
                Self::accumulate(&self.agg, &mut self.state.retained, window.clone(), value);
                if let Some(acc) = self.state.retained.get(&window) {
                    Self::emit_window(&self.agg, window, acc, out);
                }
            } else {
                Self::accumulate(&self.agg, &mut self.state.pending, window, value);
            }
        }
        if !kept && t.saturating_add(self.state.allowed_lateness) < self.state.watermark {
            self.state.late_records += 1;
        }
    }

    fn process_tumbling_count(
        &mut self,
        key: K,
        value: &V,
        size: u64,
        time: Option<EventTime>,
        out: &mut dyn Collector<WindowResult<K, A::Out>>,
    ) {
        if !self.state.tumbling.contains_key(&key) {
            let fresh = (0, self.agg.create());
            self.state.tumbling.insert(key.clone(), fresh);
        }
        let Some((seen, acc)) = self.state.tumbling.get_mut(&key) else {
            return;
        };
        *seen += 1;
        self.agg.add(acc, value);
        if *seen % size != 0 {
            return;
        }
        let aggregate = self.agg.result(acc);
        *acc = self.agg.create();
        let result = WindowResult {
            key,
            start: index(*seen - size + 1),
            end: index(*seen).saturating_add(1),
            value: aggregate,
        };
        out.emit(result, time);
    }

    fn process_sliding_count(
        &mut self,
        key: K,
        value: &V,
        (size, slide): (u64, u64),
        time: Option<EventTime>,
        out: &mut dyn Collector<WindowResult<K, A::Out>>,
    ) {
        if !self.state.sliding.contains_key(&key) {
            self.state.sliding.insert(key.clone(), (0, VecDeque::new()));
        }
        let Some((seen, recent)) = self.state.sliding.get_mut(&key) else {
            return;
        };
        *seen += 1;
        if u64::try_from(recent.len()).unwrap_or(u64::MAX) >= size {
            recent.pop_front();
        }
        recent.push_back(value.clone());
        if *seen % slide != 0 {
            return;
        }
        let mut acc = self.agg.create();
        for v in recent.iter() {
            self.agg.add(&mut acc, v);
        }
        let covered = u64::try_from(recent.len()).unwrap_or(u64::MAX);
        let result = WindowResult {
            key,
            start: index(*seen - covered + 1),
            end: index(*seen).saturating_add(1),
            value: self.agg.result(&acc),
        };
        out.emit(result, time);
    }

    /// Fires pending windows with `end <= up_to` in `(end, start, key)`
    /// order, keeping those still within the allowed lateness of the
    /// current watermark.
    fn fire_pending(&mut self, up_to: i64, out: &mut dyn Collector<WindowResult<K, A::Out>>) {
        loop {
            let window = match self.state.pending.get_min() {
                Some((window, _)) if window.0 <= up_to => window.clone(),
                _ => break,
            };
            let Some(acc) = self.state.pending.remove(&window) else {
                break;
            };
            Self::emit_window(&self.agg, window.clone(), &acc, out);
            if !self.expired(window.0) {
                self.state.retained.insert(window, acc);
            }
        }
    }

    fn purge_retained(&mut self) {
        loop {
            let window = match self.state.retained.get_min() {
                Some((window, _)) if self.expired(window.0) => window.clone(),
                _ => break,
            };
            self.state.retained.remove(&window);
        }
    }
}

fn index(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<K, V, A> Operator for WindowOperator<K, V, A>
where
    K: Clone + Ord + Send + Sync + Serialize + DeserializeOwned + 'static,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    A: Aggregator<V>,
{
    type In = (K, V);
    type Out = WindowResult<K, A::Out>;

    fn process(
        &mut self,
        (key, value): (K, V),
        time: Option<EventTime>,
        out: &mut dyn Collector<Self::Out>,
    ) -> Result<(), OperatorError> {
        match self.state.spec {
            WindowSpec::TumblingCount { size } => {
                self.process_tumbling_count(key, &value, size, time, out)
            }
            WindowSpec::SlidingCount { size, slide } => {
                self.process_sliding_count(key, &value, (size, slide), time, out)
            }
            WindowSpec::TumblingTime { .. } | WindowSpec::SlidingTime { .. } => match time {
                Some(t) => self.process_timed(key, &value, t, out),
                None => self.state.untimed_records += 1,
            },
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut dyn Collector<Self::Out>,
    ) -> Result<(), OperatorError> {
        if !self.state.spec.is_time() || watermark <= self.state.watermark {
            return Ok(());
        }
        self.state.watermark = watermark;
        self.fire_pending(watermark, out);
        self.purge_retained();
        Ok(())
    }

    fn on_end(&mut self, out: &mut dyn Collector<Self::Out>) -> Result<(), OperatorError> {
        if !self.state.spec.is_time() {
            return Ok(());
        }
        self.state.watermark = EventTime::MAX;
        self.fire_pending(EventTime::MAX, out);
        self.state.pending = OrdMap::new();
        self.state.retained = OrdMap::new();
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        Ok(Snapshot::of(self.state.clone()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        let state: State<K, V, A::Acc> = decode_state(bytes)?;
        if state.spec != self.state.spec || state.allowed_lateness != self.state.allowed_lateness {
            return Err(OperatorError::State(StateError::Decode(format!(
                "snapshot of {:?} with allowed lateness {} ms cannot restore an operator \
                 configured with {:?} and {} ms",
                state.spec, state.allowed_lateness, self.state.spec, self.state.allowed_lateness
            ))));
        }
        self.state = state;
        Ok(())
    }
}
