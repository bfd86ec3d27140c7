//! What crosses a channel between subtasks, and the two ends of a chain
//! that meet it: [`ChannelOut`] buffers a chain's output per target
//! channel, partitions it and sends batches; [`BatchIn`] reads a batch
//! and pushes its records into a chain. Barriers and watermarks travel in
//! band, after the records sent before them.
//!
//! A batch crosses in one of three forms: by pointer between subtasks of
//! one process; as an Arrow record batch built in the node's store, only
//! its reference sent, when the stream is columnar (see
//! [`columnar`](super::columnar)) and the outbox has a store; otherwise
//! bincode-encoded through the one codec.

use super::columnar::{Columnar, ColumnarError, RecordFormat};
use super::edges::ChannelMeter;
use super::failure::{ChannelError, StageError};
use super::operator::EventTime;
use super::stage::{ChainSnapshot, Stage};
use arrow_array::RecordBatch;
use braid::store::batch::{BatchLayout, BatchWriter};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Records per batch before a channel sends it.
pub const BATCH_RECORDS: usize = 4096;

/// Most records per batch of a columnar stream, by default: each batch
/// crossing processes costs a call and a few thread wake-ups, which a
/// batch of this size spreads thin. Sources flush every few milliseconds,
/// so a slow stream's batches are smaller and never wait long.
pub const COLUMNAR_BATCH_RECORDS: usize = 65536;

/// An encoded batch that lives in shared memory (a view of an object in
/// the node's store): the records are decoded straight out of it.
#[derive(Clone)]
pub struct SharedBatch(pub Arc<dyn AsRef<[u8]> + Send + Sync>);

impl SharedBatch {
    /// The encoded records.
    pub fn bytes(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for SharedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBatch({} bytes)", self.bytes().len())
    }
}

impl PartialEq for SharedBatch {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Serialize for SharedBatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.bytes())
    }
}

impl<'de> Deserialize<'de> for SharedBatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::Deserialize::deserialize(deserializer)?;
        Ok(SharedBatch(Arc::new(bytes)))
    }
}

/// Records handed to a subtask of the same process by pointer: a
/// `Vec<(T, Option<EventTime>)>`, taken once by the receiver. They never
/// leave the process (serializing them fails).
#[derive(Clone)]
pub struct LocalRecords(Arc<parking_lot::Mutex<Option<Box<dyn Any + Send>>>>, usize);

impl LocalRecords {
    /// Wraps a batch of records.
    pub fn new<T: Send + 'static>(records: Vec<(T, Option<EventTime>)>) -> Self {
        let bytes = std::mem::size_of_val(records.as_slice());
        LocalRecords(
            Arc::new(parking_lot::Mutex::new(Some(Box::new(records)))),
            bytes,
        )
    }

    /// The records' in-memory size (their heap parts not counted).
    pub fn bytes(&self) -> usize {
        self.1
    }

    /// The records, if they are of type `T` and were not taken yet.
    pub fn take<T: 'static>(&self) -> Option<Vec<(T, Option<EventTime>)>> {
        let boxed = self.0.lock().take()?;
        boxed
            .downcast::<Vec<(T, Option<EventTime>)>>()
            .ok()
            .map(|b| *b)
    }
}

impl std::fmt::Debug for LocalRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalRecords")
    }
}

impl PartialEq for LocalRecords {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Serialize for LocalRecords {
    fn serialize<S: serde::Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "records passed by pointer cannot leave their process",
        ))
    }
}

impl<'de> Deserialize<'de> for LocalRecords {
    fn deserialize<D: serde::Deserializer<'de>>(_deserializer: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "records passed by pointer cannot leave their process",
        ))
    }
}

/// A columnar batch read in place: its arrays point into this process's
/// mapping of the node's store and keep the object pinned until the last
/// of them is dropped. It never leaves its process (serializing it fails);
/// across processes its [`ColumnarRef`] travels.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrowBatch(pub RecordBatch);

impl Serialize for ArrowBatch {
    fn serialize<S: serde::Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "a batch read in place travels as its store reference",
        ))
    }
}

impl<'de> Deserialize<'de> for ArrowBatch {
    fn deserialize<D: serde::Deserializer<'de>>(_deserializer: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "a batch read in place travels as its store reference",
        ))
    }
}

/// A sealed columnar batch in the sender's node's store, lent to the
/// receiver (the sender keeps its reference until the receiver has read
/// the batch), and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnarRef {
    /// The object.
    pub object: braid::Lent<braid::Batch>,
    /// Its size in bytes.
    pub bytes: usize,
}

/// Where a batch lies in the receiver's mailbox arena for the channel:
/// its arena cursor and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailedBatch {
    /// The arena cursor it starts at.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// One message on a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChannelMsg {
    /// Records: bincode of `Vec<(T, Option<EventTime>)>`.
    Batch(Vec<u8>),
    /// The same, in shared memory.
    Shared(SharedBatch),
    /// Records by pointer, between subtasks of one process.
    Records(LocalRecords),
    /// Records as an Arrow record batch in the store: what a columnar
    /// stream sends between processes.
    Columnar(ColumnarRef),
    /// The same, read in place by the receiving process.
    Arrow(ArrowBatch),
    /// Records as an Arrow record batch the sender built in the
    /// receiver's mailbox arena (see [`mailbox`](super::mailbox)): what a
    /// columnar stream sends between processes on one machine.
    Mailed(MailedBatch),
    /// No earlier event time follows on this channel.
    Watermark(EventTime),
    /// Checkpoint barrier for an epoch.
    Barrier(u64),
    /// The channel's upstream finished.
    End,
}

/// Where a subtask's output channels lead; `send` waits while the
/// receiver has no room (credit-based backpressure).
pub trait Outbox: Send {
    /// Sends `msg` on output channel `channel`.
    fn send(&mut self, channel: usize, msg: ChannelMsg) -> Result<(), ChannelError>;
    /// How many output channels there are.
    fn channels(&self) -> usize;
    /// Whether every receiver lives in this process, so records may pass
    /// by pointer ([`ChannelMsg::Records`]) instead of encoded.
    fn in_process(&self) -> bool {
        false
    }
    /// The meter of output channel `channel`, if this outbox counts.
    fn meter(&self, _channel: usize) -> Option<&ChannelMeter> {
        None
    }
    /// Builds a record batch of `layout` for output channel `channel`
    /// where its receiver reads it in place (`fill` writes its columns):
    /// in the receiver's mailbox arena, or in the node's store, sealed and
    /// lent to the receiver when that shares the store. Returns the
    /// message that carries it ([`ChannelMsg::Mailed`] or
    /// [`ChannelMsg::Columnar`]); `None` when this outbox has neither, so
    /// columnar batches are encoded.
    fn put_batch(
        &mut self,
        _channel: usize,
        _layout: &BatchLayout,
        _fill: &mut dyn FnMut(&mut BatchWriter<'_>) -> Result<(), ColumnarError>,
    ) -> Option<Result<ChannelMsg, ChannelError>> {
        None
    }
}

/// A function hashing a record's key, to pick its subtask.
pub type KeyHash<T> = Arc<dyn Fn(&T) -> u64 + Send + Sync>;

/// How records of an edge are spread over the consumer's subtasks.
pub enum Partitioner<T> {
    /// Subtask i sends to subtask i.
    Forward,
    /// Round robin.
    Rebalance,
    /// Every record to every subtask.
    Broadcast,
    /// By a hash of the record's key.
    Hash(KeyHash<T>),
}

impl<T> Clone for Partitioner<T> {
    fn clone(&self) -> Self {
        match self {
            Partitioner::Forward => Partitioner::Forward,
            Partitioner::Rebalance => Partitioner::Rebalance,
            Partitioner::Broadcast => Partitioner::Broadcast,
            Partitioner::Hash(f) => Partitioner::Hash(f.clone()),
        }
    }
}

/// The hash that spreads keys over subtasks: the same in every process
/// of one build.
pub fn key_hash<K: Hash + ?Sized>(key: &K) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// One edge leaving a chain: its partitioner and the outbox channels of
/// the consumer's subtasks, in subtask order.
pub struct OutEdge<T> {
    /// How records are spread.
    pub partitioner: Partitioner<T>,
    /// Outbox channel per consumer subtask (one entry for forward edges).
    pub channels: Vec<usize>,
}

/// The end of a chain that sends its output to other subtasks.
pub struct ChannelOut<T> {
    edges: Vec<OutEdge<T>>,
    buffers: HashMap<usize, Vec<(T, Option<EventTime>)>>,
    next_round: Vec<usize>,
    outbox: Box<dyn Outbox>,
    failed: Option<ChannelError>,
    max_batch: usize,
    format: Option<Arc<dyn Format<T>>>,
    /// Its subtask's meter: time spent sending is backpressure.
    meter: Option<Arc<super::metrics::SubtaskMeter>>,
}

/// A record type's columnar format, erased from its [`Columnar`] bound so
/// the graph can hold it beside types that have none.
pub trait Format<T>: Send + Sync {
    /// See [`RecordFormat::layout`].
    fn layout(&self, records: &[(T, Option<EventTime>)]) -> Result<BatchLayout, ColumnarError>;
    /// See [`RecordFormat::fill`].
    fn fill(
        &self,
        records: &[(T, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError>;
    /// See [`RecordFormat::read`]: returns the bytes copied out of the
    /// batch.
    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(T, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError>;
}

impl<T: Columnar> Format<T> for RecordFormat<T> {
    fn layout(&self, records: &[(T, Option<EventTime>)]) -> Result<BatchLayout, ColumnarError> {
        RecordFormat::layout(self, records)
    }
    fn fill(
        &self,
        records: &[(T, Option<EventTime>)],
        writer: &mut BatchWriter<'_>,
    ) -> Result<(), ColumnarError> {
        RecordFormat::fill(self, records, writer)
    }
    fn read(
        &self,
        batch: &RecordBatch,
        push: &mut dyn FnMut(T, Option<EventTime>) -> Result<(), StageError>,
    ) -> Result<usize, StageError> {
        RecordFormat::read(self, batch, push)
    }
}

impl<T: Serialize + Clone + Send + 'static> ChannelOut<T> {
    /// A chain end sending along `edges` through `outbox`.
    pub fn new(edges: Vec<OutEdge<T>>, outbox: Box<dyn Outbox>) -> Self {
        let next_round = vec![0; edges.len()];
        ChannelOut {
            edges,
            buffers: HashMap::new(),
            next_round,
            outbox,
            failed: None,
            max_batch: BATCH_RECORDS,
            format: None,
            meter: super::metrics::current(),
        }
    }

    /// Sends batches to other processes as Arrow record batches in the
    /// store, laid out by `format`, when the outbox has a store.
    pub fn with_format(mut self, format: Arc<dyn Format<T>>) -> Self {
        self.format = Some(format);
        self
    }

    /// Sends a channel's records once `records` are buffered (at least 1).
    pub fn with_max_batch(mut self, records: usize) -> Self {
        self.max_batch = records.max(1);
        self
    }

    fn buffer(
        &mut self,
        channel: usize,
        value: T,
        time: Option<EventTime>,
    ) -> Result<(), ChannelError> {
        let buf = self.buffers.entry(channel).or_default();
        buf.push((value, time));
        if buf.len() >= self.max_batch {
            let batch = std::mem::take(buf);
            self.send_batch(channel, batch)?;
        }
        Ok(())
    }

    fn send_batch(
        &mut self,
        channel: usize,
        batch: Vec<(T, Option<EventTime>)>,
    ) -> Result<(), ChannelError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.outbox.in_process() {
            let records = LocalRecords::new(batch);
            if let Some(meter) = self.outbox.meter(channel) {
                meter.sent(records.bytes());
            }
            if let Some(subtask) = &self.meter {
                subtask.sent(records.bytes());
            }
            return self.send(channel, ChannelMsg::Records(records));
        }
        if let Some(format) = self.format.clone() {
            let layout = format.layout(&batch).map_err(columnar_error)?;
            let mut fill = |writer: &mut BatchWriter<'_>| format.fill(&batch, writer);
            if let Some(built) = self.outbox.put_batch(channel, &layout, &mut fill) {
                let built = built.inspect_err(|e| self.failed = Some(e.clone()))?;
                if let Some(meter) = self.outbox.meter(channel) {
                    meter.sent(layout.total_len());
                }
                if let Some(subtask) = &self.meter {
                    subtask.sent(layout.total_len());
                }
                return self.send(channel, built);
            }
        }
        let bytes =
            braid::store::codec::encode(&batch).map_err(|e| ChannelError::Encode(e.to_string()))?;
        if let Some(meter) = self.outbox.meter(channel) {
            meter.sent(bytes.len());
            meter.codec(bytes.len());
        }
        if let Some(subtask) = &self.meter {
            subtask.sent(bytes.len());
            subtask.codec(bytes.len());
        }
        self.send(channel, ChannelMsg::Batch(bytes))
    }

    /// Sends `msg`; after a failure, fails again without sending, so no
    /// message follows a lost one on any channel.
    fn send(&mut self, channel: usize, msg: ChannelMsg) -> Result<(), ChannelError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let started = self.meter.as_ref().map(|_| std::time::Instant::now());
        let sent = self.outbox.send(channel, msg);
        if let (Some(meter), Some(started)) = (&self.meter, started) {
            meter.blocked(started.elapsed());
        }
        sent.inspect_err(|e| {
            self.failed = Some(e.clone());
        })
    }

    fn flush_all(&mut self) -> Result<(), ChannelError> {
        let mut channels: Vec<usize> = self.buffers.keys().copied().collect();
        channels.sort_unstable();
        for channel in channels {
            if let Some(buf) = self.buffers.get_mut(&channel) {
                let batch = std::mem::take(buf);
                self.send_batch(channel, batch)?;
            }
        }
        Ok(())
    }

    fn all_channels(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self
            .edges
            .iter()
            .flat_map(|e| e.channels.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Flushes, then sends `msg` on every output channel.
    pub fn broadcast(&mut self, msg: ChannelMsg) -> Result<(), ChannelError> {
        self.flush_all()?;
        for channel in self.all_channels() {
            self.send(channel, msg.clone())?;
        }
        Ok(())
    }
}

impl<T: Serialize + Clone + Send + 'static> Stage<T> for ChannelOut<T> {
    fn push(&mut self, value: T, time: Option<EventTime>) -> Result<(), StageError> {
        let mut targets: Vec<usize> = Vec::new();
        for (i, edge) in self.edges.iter().enumerate() {
            match &edge.partitioner {
                Partitioner::Forward => targets.extend(edge.channels.first().copied()),
                Partitioner::Rebalance => {
                    if !edge.channels.is_empty() {
                        let at = self.next_round[i] % edge.channels.len();
                        self.next_round[i] = at + 1;
                        targets.push(edge.channels[at]);
                    }
                }
                Partitioner::Broadcast => targets.extend(edge.channels.iter().copied()),
                Partitioner::Hash(f) => {
                    if !edge.channels.is_empty() {
                        let at = (f(&value) % edge.channels.len() as u64) as usize;
                        targets.push(edge.channels[at]);
                    }
                }
            }
        }
        if let Some((last, rest)) = targets.split_last() {
            for &channel in rest {
                self.buffer(channel, value.clone(), time)?;
            }
            self.buffer(*last, value, time)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError> {
        Ok(self.broadcast(ChannelMsg::Watermark(watermark))?)
    }

    fn end(&mut self) -> Result<(), StageError> {
        Ok(self.broadcast(ChannelMsg::End)?)
    }

    fn snapshot(&mut self, _epoch: u64, _into: &mut ChainSnapshot) -> Result<(), StageError> {
        Ok(())
    }

    fn restore(&mut self, _states: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StageError> {
        Ok(self.flush_all()?)
    }

    fn checkpoint_complete(&mut self, _epoch: u64) -> Result<(), StageError> {
        Ok(())
    }

    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        Ok(self.broadcast(ChannelMsg::Barrier(epoch))?)
    }
}

fn columnar_error(e: ColumnarError) -> ChannelError {
    ChannelError::Encode(e.to_string())
}

/// The start of a chain fed by channels: decodes batches of `T`.
pub struct BatchIn<T> {
    chain: Box<dyn Stage<T>>,
    format: Option<Arc<dyn Format<T>>>,
}

impl<T> BatchIn<T> {
    /// Feeds `chain`.
    pub fn new(chain: Box<dyn Stage<T>>) -> Self {
        BatchIn {
            chain,
            format: None,
        }
    }

    /// Reads columnar batches with `format`.
    pub fn with_format(mut self, format: Option<Arc<dyn Format<T>>>) -> Self {
        self.format = format;
        self
    }
}

/// A chain head that takes encoded batches: what a subtask with inputs
/// drives.
pub trait BatchSink: Send {
    /// Decodes a batch and pushes its records through the chain.
    fn deliver(&mut self, bytes: &[u8]) -> Result<usize, StageError>;
    /// Pushes records passed by pointer through the chain.
    fn deliver_records(&mut self, records: &LocalRecords) -> Result<usize, StageError>;
    /// Reads a columnar batch in place and pushes its records through the
    /// chain; returns the records and the bytes copied out of the batch.
    fn deliver_arrow(&mut self, batch: &RecordBatch) -> Result<(usize, usize), StageError>;
    /// The chain itself, for control events.
    fn chain(&mut self) -> &mut dyn ChainControl;
}

/// The control half of a chain, independent of its record type.
pub trait ChainControl: Send {
    /// See [`Stage::watermark`].
    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError>;
    /// See [`Stage::end`].
    fn end(&mut self) -> Result<(), StageError>;
    /// See [`Stage::snapshot`].
    fn snapshot(&mut self, epoch: u64, into: &mut ChainSnapshot) -> Result<(), StageError>;
    /// See [`Stage::restore`].
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StageError>;
    /// See [`Stage::flush`].
    fn flush(&mut self) -> Result<(), StageError>;
    /// See [`Stage::barrier`].
    fn barrier(&mut self, epoch: u64) -> Result<(), StageError>;
    /// See [`Stage::checkpoint_complete`].
    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError>;
}

impl<T: 'static> ChainControl for Box<dyn Stage<T>> {
    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError> {
        (**self).watermark(watermark)
    }
    fn end(&mut self) -> Result<(), StageError> {
        (**self).end()
    }
    fn snapshot(&mut self, epoch: u64, into: &mut ChainSnapshot) -> Result<(), StageError> {
        (**self).snapshot(epoch, into)
    }
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
        (**self).restore(states)
    }
    fn flush(&mut self) -> Result<(), StageError> {
        (**self).flush()
    }
    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        (**self).barrier(epoch)
    }
    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError> {
        (**self).checkpoint_complete(epoch)
    }
}

impl<T: DeserializeOwned + Send + 'static> BatchSink for BatchIn<T> {
    fn deliver(&mut self, bytes: &[u8]) -> Result<usize, StageError> {
        let records: Vec<(T, Option<EventTime>)> =
            braid::store::codec::decode(bytes).map_err(|e| ChannelError::Decode(e.to_string()))?;
        let n = records.len();
        for (value, time) in records {
            self.chain.push(value, time)?;
        }
        Ok(n)
    }

    fn deliver_records(&mut self, records: &LocalRecords) -> Result<usize, StageError> {
        let records: Vec<(T, Option<EventTime>)> = records.take().ok_or_else(|| {
            ChannelError::Decode("records by pointer of another type, or taken twice".into())
        })?;
        let n = records.len();
        for (value, time) in records {
            self.chain.push(value, time)?;
        }
        Ok(n)
    }

    fn deliver_arrow(&mut self, batch: &RecordBatch) -> Result<(usize, usize), StageError> {
        let Some(format) = &self.format else {
            return Err(ChannelError::Decode(
                "a columnar batch reached an input whose upstream is not columnar".into(),
            )
            .into());
        };
        let chain = &mut self.chain;
        let copied = format.read(batch, &mut |value, time| chain.push(value, time))?;
        Ok((batch.num_rows(), copied))
    }

    fn chain(&mut self) -> &mut dyn ChainControl {
        &mut self.chain
    }
}
