//! The DataStream API: a job is built as a graph of vertices (a source, an
//! operator, a sink), each with a parallelism, joined by edges that say
//! how records are spread (forward, rebalance, broadcast, by key). Every
//! vertex keeps type-erased factories that build its operator for one
//! subtask, so the planner can chain vertices over forward edges into one
//! subtask without knowing their record types.

use super::channel::{key_hash, ChannelOut, Format, KeyHash, OutEdge, Outbox, Partitioner};
use super::columnar::{Columnar, RecordFormat};
use super::functions::{
    Filter, FlatMap, KeyedProcess, KeyedProcessFunction, Map, RunningAggregate,
};
use super::operator::{Collector, EventTime, Operator, OperatorError};
use super::source::Source;
use super::stage::{OpStage, Stage, Tee};
use super::window::{Aggregator, Reduce, WindowOperator, WindowResult, WindowSpec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::cell::RefCell;
use std::hash::Hash;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

/// What can flow on a stream: cloned for fan-out and broadcast, encoded
/// when it crosses a channel.
pub trait Data: Clone + Send + Serialize + DeserializeOwned + 'static {}
impl<T: Clone + Send + Serialize + DeserializeOwned + 'static> Data for T {}

/// What a key can be.
pub trait Key: Data + Hash + Eq + Ord + Sync {}
impl<T: Data + Hash + Eq + Ord + Sync> Key for T {}

/// A vertex's index in its graph.
pub type VertexId = usize;

pub(crate) type AnyBox = Box<dyn Any + Send>;

/// A [`KeyHash`] of some record type, type-erased.
pub(crate) type ErasedHash = Arc<dyn Any + Send + Sync>;

/// An edge leaving a chain: how it spreads, its erased key hash, and the
/// outbox channels of the consumer's subtasks.
pub(crate) type ExternalEdge = (Partitioning, Option<ErasedHash>, Vec<usize>);

/// How an edge spreads records, before the record type is erased.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioning {
    /// Subtask i to subtask i (same parallelism), so the two can chain.
    Forward,
    /// Round robin over the consumer's subtasks.
    Rebalance,
    /// Every record to every consumer subtask.
    Broadcast,
    /// By key hash.
    Hash,
}

/// An edge between two vertices.
pub(crate) struct Edge {
    pub from: VertexId,
    pub to: VertexId,
    pub partitioning: Partitioning,
    /// For `Hash`: an `Arc<dyn Fn(&T) -> u64 + Send + Sync>` of the
    /// upstream's record type.
    pub hash: Option<ErasedHash>,
}

pub(crate) type MakeOperator = Arc<dyn Fn(usize, AnyBox) -> AnyBox + Send + Sync>;
pub(crate) type MakeSource =
    Arc<dyn Fn(usize, usize, AnyBox) -> Box<dyn super::source::SourceDriver> + Send + Sync>;
pub(crate) type MakeFanOut = Arc<dyn Fn(Vec<AnyBox>) -> AnyBox + Send + Sync>;
pub(crate) type MakeChannelOut =
    Arc<dyn Fn(Vec<ExternalEdge>, Box<dyn Outbox>, usize) -> AnyBox + Send + Sync>;
pub(crate) type MakeBatchIn =
    Arc<dyn Fn(AnyBox, Option<&AnyFormat>) -> Box<dyn super::channel::BatchSink> + Send + Sync>;
/// An `Arc<dyn Format<T>>` of a vertex's output type.
pub(crate) type AnyFormat = Arc<dyn Any + Send + Sync>;

/// What a vertex runs.
pub(crate) enum VertexKind {
    /// Produces records; `(subtask, parallelism, next stage)`.
    Source(MakeSource),
    /// Transforms records; `(subtask, next stage)` → its own stage.
    Operator {
        make: MakeOperator,
        /// Wraps a stage of this vertex's input type as a batch decoder.
        batch_in: MakeBatchIn,
    },
}

/// One vertex of the logical graph.
pub(crate) struct Vertex {
    /// The name, numbered to be unique in the graph (`shard#4`).
    pub name: String,
    /// The name as the graph was given it (`shard`).
    pub given_name: String,
    pub parallelism: usize,
    pub kind: VertexKind,
    /// Joins several stages consuming this vertex's output into one.
    pub fan_out: MakeFanOut,
    /// A stage sending this vertex's output over channels.
    pub channel_out: MakeChannelOut,
    /// Most records per channel batch, if set (see
    /// [`Vertex::batch_records`]).
    pub out_batch: Option<usize>,
    /// The output's columnar format, if the stream is columnar.
    pub format: Option<AnyFormat>,
}

impl Vertex {
    /// Most records per channel batch: as set with
    /// [`DataStream::batch_records`], else a columnar stream's default
    /// (its batches cross processes through the store, and larger ones
    /// spread the cost of each crossing) or the default.
    pub fn batch_records(&self) -> usize {
        self.out_batch.unwrap_or(if self.format.is_some() {
            super::channel::COLUMNAR_BATCH_RECORDS
        } else {
            super::channel::BATCH_RECORDS
        })
    }
}

/// A job's logical graph.
#[derive(Default)]
pub struct Graph {
    pub(crate) vertices: Vec<Vertex>,
    pub(crate) edges: Vec<Edge>,
}

impl Graph {
    /// Vertex names in id order (for plans, logs and tests).
    pub fn vertex_names(&self) -> Vec<String> {
        self.vertices.iter().map(|v| v.name.clone()).collect()
    }
}

/// Builds a job's graph. Cheap to clone; every stream made from it adds
/// to the same graph.
#[derive(Clone)]
pub struct StreamEnv {
    graph: Rc<RefCell<Graph>>,
    parallelism: usize,
}

impl StreamEnv {
    /// An empty graph whose vertices default to `parallelism` subtasks.
    pub fn new(parallelism: usize) -> Self {
        StreamEnv {
            graph: Rc::new(RefCell::new(Graph::default())),
            parallelism: parallelism.max(1),
        }
    }

    /// The finished graph.
    pub fn into_graph(self) -> Graph {
        match Rc::try_unwrap(self.graph) {
            Ok(cell) => cell.into_inner(),
            Err(shared) => std::mem::take(&mut *shared.borrow_mut()),
        }
    }

    /// A source; `make(subtask, parallelism)` builds each subtask's
    /// instance, which reads its share of the input.
    pub fn source<S, F>(&self, name: &str, make: F) -> DataStream<S::Out>
    where
        S: Source,
        S::Out: Data,
        F: Fn(usize, usize) -> S + Send + Sync + 'static,
    {
        let vertex = name.to_string();
        let make: MakeSource = Arc::new(move |subtask, parallelism, next: AnyBox| {
            let next = downcast_stage::<S::Out>(next);
            Box::new(super::source::SourceRunner::new(
                vertex.clone(),
                make(subtask, parallelism),
                next,
            )) as Box<dyn super::source::SourceDriver>
        });
        let id = self.add_vertex::<S::Out>(name, self.parallelism, VertexKind::Source(make));
        DataStream::new(self.clone(), id)
    }

    fn add_vertex<T: Data>(&self, name: &str, parallelism: usize, kind: VertexKind) -> VertexId {
        let mut graph = self.graph.borrow_mut();
        let id = graph.vertices.len();
        graph.vertices.push(Vertex {
            name: format!("{name}#{id}"),
            given_name: name.to_string(),
            parallelism,
            kind,
            fan_out: Arc::new(fan_out::<T>),
            channel_out: Arc::new(channel_out::<T>),
            out_batch: None,
            format: None,
        });
        id
    }

    fn add_edge(&self, edge: Edge) {
        self.graph.borrow_mut().edges.push(edge);
    }

    fn parallelism_of(&self, vertex: VertexId) -> usize {
        self.graph
            .borrow()
            .vertices
            .get(vertex)
            .map_or(1, |v| v.parallelism)
    }
}

pub(crate) fn downcast_stage<T: 'static>(next: AnyBox) -> Box<dyn Stage<T>> {
    match next.downcast::<Box<dyn Stage<T>>>() {
        Ok(stage) => *stage,
        Err(_) => Box::new(super::stage::Discard),
    }
}

fn fan_out<T: Data>(stages: Vec<AnyBox>) -> AnyBox {
    let mut stages: Vec<Box<dyn Stage<T>>> = stages.into_iter().map(downcast_stage::<T>).collect();
    let stage: Box<dyn Stage<T>> = if stages.len() == 1 {
        stages.remove(0)
    } else {
        Box::new(Tee::new(stages))
    };
    Box::new(stage)
}

fn channel_out<T: Data>(edges: Vec<ExternalEdge>, outbox: Box<dyn Outbox>, max: usize) -> AnyBox {
    channel_out_with::<T>(edges, outbox, max, None)
}

fn channel_out_with<T: Data>(
    edges: Vec<ExternalEdge>,
    outbox: Box<dyn Outbox>,
    max: usize,
    format: Option<Arc<dyn Format<T>>>,
) -> AnyBox {
    let edges = edges
        .into_iter()
        .map(|(partitioning, hash, channels)| {
            let partitioner = match partitioning {
                Partitioning::Forward => Partitioner::Forward,
                Partitioning::Rebalance => Partitioner::Rebalance,
                Partitioning::Broadcast => Partitioner::Broadcast,
                Partitioning::Hash => match hash.and_then(|h| h.downcast::<KeyHash<T>>().ok()) {
                    Some(f) => Partitioner::Hash((*f).clone()),
                    None => Partitioner::Rebalance,
                },
            };
            OutEdge {
                partitioner,
                channels,
            }
        })
        .collect();
    let mut out = ChannelOut::new(edges, outbox).with_max_batch(max);
    if let Some(format) = format {
        out = out.with_format(format);
    }
    let stage: Box<dyn Stage<T>> = Box::new(out);
    Box::new(stage)
}

fn batch_in<T: Data>(
    head: AnyBox,
    format: Option<&AnyFormat>,
) -> Box<dyn super::channel::BatchSink> {
    let format = format
        .and_then(|f| f.clone().downcast::<Arc<dyn Format<T>>>().ok())
        .map(|f| (*f).clone());
    Box::new(super::channel::BatchIn::new(downcast_stage::<T>(head)).with_format(format))
}

/// A stream of `T` records.
pub struct DataStream<T> {
    env: StreamEnv,
    vertex: VertexId,
    partitioning: Option<Partitioning>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DataStream<T> {
    fn clone(&self) -> Self {
        DataStream {
            env: self.env.clone(),
            vertex: self.vertex,
            partitioning: self.partitioning,
            _type: PhantomData,
        }
    }
}

impl<T: Data> DataStream<T> {
    fn new(env: StreamEnv, vertex: VertexId) -> Self {
        DataStream {
            env,
            vertex,
            partitioning: None,
            _type: PhantomData,
        }
    }

    /// The vertex producing this stream.
    pub fn vertex(&self) -> VertexId {
        self.vertex
    }

    /// Runs the producing vertex with `n` subtasks.
    pub fn parallelism(self, n: usize) -> Self {
        if let Some(v) = self.env.graph.borrow_mut().vertices.get_mut(self.vertex) {
            v.parallelism = n.max(1);
        }
        self
    }

    /// Sends this stream's records to other subtasks in batches of at most
    /// `records` (default [`BATCH_RECORDS`](super::channel::BATCH_RECORDS),
    /// or [`COLUMNAR_BATCH_RECORDS`](super::channel::COLUMNAR_BATCH_RECORDS)
    /// for a [columnar](Self::columnar) stream;
    /// 1 sends each record as soon as it is emitted: for records that are
    /// themselves large batches, or when a consumer's answer is awaited).
    pub fn batch_records(self, records: usize) -> Self {
        if let Some(v) = self.env.graph.borrow_mut().vertices.get_mut(self.vertex) {
            v.out_batch = Some(records.max(1));
        }
        self
    }

    /// Sends this stream's batches between processes as Arrow record
    /// batches built in the node's store, only their reference crossing
    /// (see [`columnar`](super::columnar)); within one process records
    /// still pass by pointer. The records' type decides whether it can:
    /// it must map to Arrow columns ([`Columnar`]).
    pub fn columnar(self) -> Self
    where
        T: Columnar,
    {
        self.columnar_with(Arc::new(RecordFormat::<T>::new()))
    }

    /// [`columnar`](Self::columnar) with a format of one's own: for a
    /// record type that is itself a batch of rows (a training micro-batch,
    /// say), which `format` lays out as one Arrow record batch.
    pub fn columnar_with(self, format: Arc<dyn Format<T>>) -> Self {
        if let Some(v) = self.env.graph.borrow_mut().vertices.get_mut(self.vertex) {
            let out = format.clone();
            v.channel_out = Arc::new(move |edges, outbox, max| {
                channel_out_with::<T>(edges, outbox, max, Some(out.clone()))
            });
            v.format = Some(Arc::new(format));
        }
        self
    }

    /// Sends every record to every subtask of the next operator.
    pub fn broadcast(mut self) -> Self {
        self.partitioning = Some(Partitioning::Broadcast);
        self
    }

    /// Spreads records round robin over the next operator's subtasks.
    pub fn rebalance(mut self) -> Self {
        self.partitioning = Some(Partitioning::Rebalance);
        self
    }

    /// Adds an operator vertex fed by this stream. `make(subtask)` builds
    /// each subtask's instance. The edge is forward unless this stream
    /// asked for another spreading or the parallelism differs.
    pub fn transform<O, F>(&self, name: &str, make: F) -> DataStream<O::Out>
    where
        O: Operator<In = T>,
        O::Out: Data,
        F: Fn(usize) -> O + Send + Sync + 'static,
    {
        self.transform_with(name, self.env.parallelism, None, make)
    }

    /// Adds an operator vertex with `parallelism` subtasks, each record
    /// going to subtask `route(record) mod parallelism` (a parameter-server
    /// shard by its index, a training worker by its batch number).
    pub fn transform_routed<O, F, R>(
        &self,
        name: &str,
        parallelism: usize,
        route: R,
        make: F,
    ) -> DataStream<O::Out>
    where
        O: Operator<In = T>,
        O::Out: Data,
        F: Fn(usize) -> O + Send + Sync + 'static,
        R: Fn(&T) -> u64 + Send + Sync + 'static,
    {
        let hash: KeyHash<T> = Arc::new(route);
        self.transform_with(name, parallelism.max(1), Some(hash), make)
    }

    fn transform_with<O, F>(
        &self,
        name: &str,
        parallelism: usize,
        hash: Option<KeyHash<T>>,
        make: F,
    ) -> DataStream<O::Out>
    where
        O: Operator<In = T>,
        O::Out: Data,
        F: Fn(usize) -> O + Send + Sync + 'static,
    {
        let stage_name = name.to_string();
        let make: MakeOperator = Arc::new(move |subtask, next: AnyBox| {
            let next = downcast_stage::<O::Out>(next);
            let stage: Box<dyn Stage<T>> =
                Box::new(OpStage::new(stage_name.clone(), make(subtask), next));
            Box::new(stage)
        });
        let id = self.env.add_vertex::<O::Out>(
            name,
            parallelism,
            VertexKind::Operator {
                make,
                batch_in: Arc::new(batch_in::<T>),
            },
        );
        self.connect_to(id, hash);
        DataStream::new(self.env.clone(), id)
    }

    fn connect_to(&self, to: VertexId, hash: Option<KeyHash<T>>) {
        let from_p = self.env.parallelism_of(self.vertex);
        let to_p = self.env.parallelism_of(to);
        let partitioning = match (&hash, self.partitioning) {
            (Some(_), _) => Partitioning::Hash,
            (None, Some(p)) => p,
            (None, None) if from_p == to_p => Partitioning::Forward,
            (None, None) => Partitioning::Rebalance,
        };
        self.env.add_edge(Edge {
            from: self.vertex,
            to,
            partitioning,
            hash: hash.map(|h| Arc::new(h) as ErasedHash),
        });
    }

    /// One record in, one out.
    pub fn map<U: Data, F>(&self, f: F) -> DataStream<U>
    where
        F: FnMut(T) -> U + Clone + Send + Sync + 'static,
    {
        self.transform("map", move |_| Map::new(f.clone()))
    }

    /// One record in, any number out.
    pub fn flat_map<I, F>(&self, f: F) -> DataStream<I::Item>
    where
        I: IntoIterator + 'static,
        I::Item: Data,
        F: FnMut(T) -> I + Clone + Send + Sync + 'static,
    {
        self.transform("flat_map", move |_| FlatMap::new(f.clone()))
    }

    /// [`flat_map`](Self::flat_map) with the upstream's parallelism, so it
    /// runs chained in each upstream subtask (its records by pointer).
    pub fn local_flat_map<I, F>(&self, f: F) -> DataStream<I::Item>
    where
        I: IntoIterator + 'static,
        I::Item: Data,
        F: FnMut(T) -> I + Clone + Send + Sync + 'static,
    {
        self.transform_chained("flat_map", move |_| FlatMap::new(f.clone()))
    }

    /// [`transform`](Self::transform) with the upstream's parallelism and a
    /// forward edge, so each instance runs chained in its upstream subtask:
    /// records by pointer, no channel, no thread to wake.
    pub fn transform_chained<O, F>(&self, name: &str, make: F) -> DataStream<O::Out>
    where
        O: Operator<In = T>,
        O::Out: Data,
        F: Fn(usize) -> O + Send + Sync + 'static,
    {
        let p = self.env.parallelism_of(self.vertex);
        self.transform_with(name, p, None, make)
    }

    /// Keeps the records `f` accepts.
    pub fn filter<F>(&self, f: F) -> DataStream<T>
    where
        F: FnMut(&T) -> bool + Clone + Send + Sync + 'static,
    {
        self.transform("filter", move |_| Filter::new(f.clone()))
    }

    /// Partitions by `key`: records of one key reach one subtask of the
    /// next (keyed) operator, paired with their key.
    pub fn key_by<K: Key, F>(&self, key: F) -> KeyedStream<K, T>
    where
        F: Fn(&T) -> K + Clone + Send + Sync + 'static,
    {
        let keyed = self.map(move |t: T| (key(&t), t));
        KeyedStream { inner: keyed }
    }

    /// Merges this stream with others of the same type.
    pub fn union(&self, others: &[DataStream<T>]) -> DataStream<T> {
        let id = self.env.add_vertex::<T>(
            "union",
            self.env.parallelism,
            VertexKind::Operator {
                make: Arc::new(|_, next: AnyBox| {
                    let next = downcast_stage::<T>(next);
                    let stage: Box<dyn Stage<T>> = Box::new(OpStage::new(
                        String::from("union"),
                        Identity::<T>::new(),
                        next,
                    ));
                    Box::new(stage)
                }),
                batch_in: Arc::new(batch_in::<T>),
            },
        );
        for stream in std::iter::once(self).chain(others) {
            let mut stream = stream.clone();
            if stream.partitioning.is_none() {
                stream.partitioning = Some(Partitioning::Rebalance);
            }
            stream.connect_to(id, None);
        }
        DataStream::new(self.env.clone(), id)
    }

    /// Pairs this stream with another of a different type, for an
    /// operator that sees both (Flink's `connect`).
    pub fn connect<U: Data>(&self, other: &DataStream<U>) -> DataStream<Either<T, U>> {
        let left = self.map(Either::Left);
        let right = other.map(Either::Right);
        left.union(&[right])
    }

    /// Consumes the stream with a sink operator (one producing nothing).
    pub fn sink<O, F>(&self, name: &str, make: F)
    where
        O: Operator<In = T, Out = ()>,
        F: Fn(usize) -> O + Send + Sync + 'static,
    {
        let _ = self.transform(name, make);
    }
}

/// A record of one of two connected streams.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Either<A, B> {
    /// From the first stream.
    Left(A),
    /// From the second.
    Right(B),
}

struct Identity<T>(PhantomData<fn(T)>);

impl<T> Identity<T> {
    fn new() -> Self {
        Identity(PhantomData)
    }
}

impl<T: Send + 'static> Operator for Identity<T> {
    type In = T;
    type Out = T;
    fn process(
        &mut self,
        value: T,
        time: Option<EventTime>,
        out: &mut dyn Collector<T>,
    ) -> Result<(), OperatorError> {
        out.emit(value, time);
        Ok(())
    }
}

/// A stream partitioned by key: its records are `(key, value)` pairs and
/// the next operator keeps state per key.
pub struct KeyedStream<K, V> {
    inner: DataStream<(K, V)>,
}

impl<K: Key, V: Data> KeyedStream<K, V> {
    fn keyed<O, F>(&self, name: &str, make: F) -> DataStream<O::Out>
    where
        O: Operator<In = (K, V)>,
        O::Out: Data,
        F: Fn(usize) -> O + Send + Sync + 'static,
    {
        let hash: KeyHash<(K, V)> = Arc::new(|kv: &(K, V)| key_hash(&kv.0));
        self.inner
            .transform_with(name, self.inner.env.parallelism, Some(hash), make)
    }

    /// Sends a channel's keyed records once `records` are buffered (see
    /// [`DataStream::batch_records`]).
    pub fn batch_records(self, records: usize) -> Self {
        KeyedStream {
            inner: self.inner.batch_records(records),
        }
    }

    /// Sends the keyed records between processes as Arrow record batches
    /// in the store (see [`DataStream::columnar`]); key and value must
    /// both map to Arrow columns.
    pub fn columnar(self) -> Self
    where
        (K, V): Columnar,
    {
        KeyedStream {
            inner: self.inner.columnar(),
        }
    }

    /// Per-key logic with state and timers.
    pub fn process<P, F>(&self, make: F) -> DataStream<P::Out>
    where
        P: KeyedProcessFunction<K, V>,
        P::Out: Data,
        F: Fn() -> P + Send + Sync + 'static,
    {
        self.keyed("process", move |_| KeyedProcess::new(make()))
    }

    /// Running reduce per key: emits `(key, reduced)` after every record.
    pub fn reduce<F>(&self, f: F) -> DataStream<(K, V)>
    where
        F: Fn(&V, &V) -> V + Clone + Send + Sync + 'static,
        V: Sync,
    {
        self.keyed("reduce", move |_| RunningAggregate::new(Reduce(f.clone())))
    }

    /// Running aggregate per key: emits `(key, result)` after every record.
    pub fn aggregate<A>(&self, aggregator: A) -> DataStream<(K, A::Out)>
    where
        A: Aggregator<V> + Sync,
        A::Out: Data,
        A::Acc: Sync,
    {
        self.keyed("aggregate", move |_| {
            RunningAggregate::new(aggregator.clone())
        })
    }

    /// Windows per key, aggregated incrementally.
    pub fn window<A>(&self, spec: WindowSpec, aggregator: A) -> DataStream<WindowResult<K, A::Out>>
    where
        A: Aggregator<V> + Sync,
        A::Out: Data,
        V: Sync,
    {
        self.keyed("window", move |_| {
            WindowOperator::new(spec, aggregator.clone())
        })
    }
}
