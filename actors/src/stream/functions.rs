//! The built-in operators behind `map`, `flat_map`, `filter`, keyed
//! `process` (keyed state and event-time timers), and running keyed
//! `reduce` / `aggregate`. Keyed state lives in persistent maps, so a
//! snapshot at a barrier is a constant-time clone encoded later.

use super::operator::{
    decode_state, imbl_de, Collector, EventTime, Operator, OperatorError, Snapshot,
};
use super::window::Aggregator;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;

/// `map`: one record in, one out.
pub struct Map<F, A, B> {
    f: F,
    _types: PhantomData<fn(A) -> B>,
}

impl<F, A, B> Map<F, A, B> {
    /// An operator applying `f` to every record.
    pub fn new(f: F) -> Self {
        Map {
            f,
            _types: PhantomData,
        }
    }
}

impl<F, A, B> Operator for Map<F, A, B>
where
    F: FnMut(A) -> B + Send + 'static,
    A: Send + 'static,
    B: Send + 'static,
{
    type In = A;
    type Out = B;
    fn process(
        &mut self,
        value: A,
        time: Option<EventTime>,
        out: &mut dyn Collector<B>,
    ) -> Result<(), OperatorError> {
        out.emit((self.f)(value), time);
        Ok(())
    }
}

/// `flat_map`: one record in, any number out.
pub struct FlatMap<F, A, I> {
    f: F,
    _types: PhantomData<fn(A) -> I>,
}

impl<F, A, I> FlatMap<F, A, I> {
    /// An operator emitting everything `f` returns for each record.
    pub fn new(f: F) -> Self {
        FlatMap {
            f,
            _types: PhantomData,
        }
    }
}

impl<F, A, I> Operator for FlatMap<F, A, I>
where
    F: FnMut(A) -> I + Send + 'static,
    A: Send + 'static,
    I: IntoIterator + 'static,
    I::Item: Send + 'static,
{
    type In = A;
    type Out = I::Item;
    fn process(
        &mut self,
        value: A,
        time: Option<EventTime>,
        out: &mut dyn Collector<I::Item>,
    ) -> Result<(), OperatorError> {
        for item in (self.f)(value) {
            out.emit(item, time);
        }
        Ok(())
    }
}

/// `filter`: keeps the records `f` accepts.
pub struct Filter<F, A> {
    f: F,
    _types: PhantomData<fn(A)>,
}

impl<F, A> Filter<F, A> {
    /// An operator keeping the records for which `f` is true.
    pub fn new(f: F) -> Self {
        Filter {
            f,
            _types: PhantomData,
        }
    }
}

impl<F, A> Operator for Filter<F, A>
where
    F: FnMut(&A) -> bool + Send + 'static,
    A: Send + 'static,
{
    type In = A;
    type Out = A;
    fn process(
        &mut self,
        value: A,
        time: Option<EventTime>,
        out: &mut dyn Collector<A>,
    ) -> Result<(), OperatorError> {
        if (self.f)(&value) {
            out.emit(value, time);
        }
        Ok(())
    }
}

/// What a keyed process function can do besides reading its state.
pub struct ProcessContext<'a, K, O> {
    out: &'a mut dyn Collector<O>,
    timers: &'a mut imbl::OrdSet<(EventTime, K)>,
    key: &'a K,
    watermark: EventTime,
}

impl<K: Clone + Ord, O> ProcessContext<'_, K, O> {
    /// Emits a record.
    pub fn emit(&mut self, value: O, time: Option<EventTime>) {
        self.out.emit(value, time);
    }

    /// Calls `on_timer` for the current key once the watermark reaches
    /// `time`. Registering the same time twice fires once.
    pub fn register_timer(&mut self, time: EventTime) {
        self.timers.insert((time, self.key.clone()));
    }

    /// The subtask's current watermark (`i64::MIN` before the first).
    pub fn watermark(&self) -> EventTime {
        self.watermark
    }
}

/// Per-key logic with state and event-time timers (Flink's
/// `KeyedProcessFunction`). Each key has its own `State`, created by
/// `Default` on the key's first record.
pub trait KeyedProcessFunction<K, V>: Send + 'static {
    /// The state kept per key.
    type State: Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What it emits.
    type Out: Send + 'static;

    /// Handles one record of `key`.
    fn process(
        &mut self,
        key: &K,
        value: V,
        time: Option<EventTime>,
        state: &mut Self::State,
        ctx: &mut ProcessContext<'_, K, Self::Out>,
    );

    /// A timer registered for `key` fired at `time`.
    fn on_timer(
        &mut self,
        key: &K,
        time: EventTime,
        state: &mut Self::State,
        ctx: &mut ProcessContext<'_, K, Self::Out>,
    ) {
        let _ = (key, time, state, ctx);
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(bound(
    serialize = "K: Serialize, S: Serialize",
    deserialize = "K: Deserialize<'de>, S: Deserialize<'de>"
))]
struct KeyedState<K: Ord + Hash + Clone, S: Clone> {
    #[serde(deserialize_with = "imbl_de::hash_map")]
    states: imbl::HashMap<K, S>,
    #[serde(deserialize_with = "imbl_de::ord_set")]
    timers: imbl::OrdSet<(EventTime, K)>,
    watermark: EventTime,
}

/// Runs a [`KeyedProcessFunction`] over `(key, value)` records.
pub struct KeyedProcess<K: Ord + Hash + Clone, V, P: KeyedProcessFunction<K, V>> {
    function: P,
    state: KeyedState<K, P::State>,
    _value: PhantomData<fn(V)>,
}

impl<K, V, P> KeyedProcess<K, V, P>
where
    K: Ord + Hash + Clone,
    P: KeyedProcessFunction<K, V>,
{
    /// An operator running `function` per key.
    pub fn new(function: P) -> Self {
        KeyedProcess {
            function,
            state: KeyedState {
                states: imbl::HashMap::new(),
                timers: imbl::OrdSet::new(),
                watermark: EventTime::MIN,
            },
            _value: PhantomData,
        }
    }

    fn fire_until(&mut self, watermark: EventTime, out: &mut dyn Collector<P::Out>) {
        while let Some((time, key)) = self.state.timers.get_min().cloned() {
            if time > watermark {
                break;
            }
            self.state.timers.remove(&(time, key.clone()));
            let mut state = self.state.states.get(&key).cloned().unwrap_or_default();
            let mut ctx = ProcessContext {
                out: &mut *out,
                timers: &mut self.state.timers,
                key: &key,
                watermark,
            };
            self.function.on_timer(&key, time, &mut state, &mut ctx);
            self.state.states.insert(key, state);
        }
    }
}

impl<K, V, P> Operator for KeyedProcess<K, V, P>
where
    K: Ord + Hash + Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    V: Send + 'static,
    P: KeyedProcessFunction<K, V>,
{
    type In = (K, V);
    type Out = P::Out;

    fn process(
        &mut self,
        (key, value): (K, V),
        time: Option<EventTime>,
        out: &mut dyn Collector<P::Out>,
    ) -> Result<(), OperatorError> {
        let watermark = self.state.watermark;
        let state = self.state.states.entry(key.clone()).or_default();
        let mut ctx = ProcessContext {
            out,
            timers: &mut self.state.timers,
            key: &key,
            watermark,
        };
        self.function.process(&key, value, time, state, &mut ctx);
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut dyn Collector<P::Out>,
    ) -> Result<(), OperatorError> {
        self.state.watermark = self.state.watermark.max(watermark);
        self.fire_until(watermark, out);
        Ok(())
    }

    fn on_end(&mut self, out: &mut dyn Collector<P::Out>) -> Result<(), OperatorError> {
        self.fire_until(EventTime::MAX, out);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        Ok(Snapshot::of(self.state.clone()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        if !bytes.is_empty() {
            self.state = decode_state(bytes)?;
        }
        Ok(())
    }
}

/// Running keyed aggregation: after every record, emits the key and the
/// aggregate of all its records so far (Flink's keyed `reduce` / `sum`).
pub struct RunningAggregate<K: Hash + Eq + Clone, V, A: Aggregator<V>> {
    aggregator: A,
    accs: imbl::HashMap<K, A::Acc>,
    _value: PhantomData<fn(V)>,
}

impl<K: Hash + Eq + Clone, V, A: Aggregator<V>> RunningAggregate<K, V, A> {
    /// An operator folding each key's records with `aggregator`.
    pub fn new(aggregator: A) -> Self {
        RunningAggregate {
            aggregator,
            accs: imbl::HashMap::new(),
            _value: PhantomData,
        }
    }
}

impl<K, V, A> Operator for RunningAggregate<K, V, A>
where
    K: Hash + Eq + Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    V: Send + 'static,
    A: Aggregator<V>,
    A::Acc: Sync,
{
    type In = (K, V);
    type Out = (K, A::Out);

    fn process(
        &mut self,
        (key, value): (K, V),
        time: Option<EventTime>,
        out: &mut dyn Collector<(K, A::Out)>,
    ) -> Result<(), OperatorError> {
        let aggregator = &self.aggregator;
        let acc = self
            .accs
            .entry(key.clone())
            .or_insert_with(|| aggregator.create());
        aggregator.add(acc, &value);
        let result = aggregator.result(acc);
        out.emit((key, result), time);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        Ok(Snapshot::of(self.accs.clone()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        if !bytes.is_empty() {
            self.accs = decode_state::<HashMap<K, A::Acc>>(bytes)?
                .into_iter()
                .collect();
        }
        Ok(())
    }
}
