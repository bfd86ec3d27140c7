//! Sources with replayable offsets. A source reads its share of the input
//! (subtask `i` of `n`), reports where it is as opaque offset bytes that a
//! checkpoint saves, and seeks back to them on recovery, so the records
//! after a restored checkpoint are read again exactly once.

use super::channel::ChainControl;
use super::context::TaskContext;
use super::failure::{Phase, StageError};
use super::operator::{Collector, EventTime, OperatorError, StateError};
use super::stage::Stage;
use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;

/// What one poll of a source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// Emitted this many records (maybe zero when throttled).
    Emitted(usize),
    /// Nothing available now; poll again later.
    Idle,
    /// The input is exhausted.
    Exhausted,
}

/// A replayable input.
pub trait Source: Send + 'static {
    /// The records it produces.
    type Out: Send + 'static;

    /// Emits up to `max` records; an error when the input cannot be read
    /// (the subtask fails, and the job recovers from its last checkpoint
    /// or, out of restarts, fails with it), never a silent end.
    fn poll(
        &mut self,
        out: &mut dyn Collector<Self::Out>,
        max: usize,
    ) -> Result<SourcePoll, OperatorError>;

    /// Where the source is: the position after the last record emitted.
    fn offset(&self) -> Vec<u8>;

    /// Continues from a position `offset` returned.
    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError>;

    /// Event time reached by what was emitted, if the source has one.
    fn watermark(&self) -> Option<EventTime> {
        None
    }

    /// Checkpoint `epoch` completed: a source that acknowledges its input
    /// only at checkpoints does so now.
    fn notify_checkpoint_complete(&mut self, epoch: u64) {
        let _ = epoch;
    }
}

/// A source subtask with its chain, independent of the record type.
pub trait SourceDriver: Send {
    /// Emits up to `max` records into the chain, and the watermark if it
    /// advanced; the chain's first failure, if it failed.
    fn poll(&mut self, max: usize) -> Result<SourcePoll, StageError>;
    /// The chain the source feeds.
    fn chain(&mut self) -> &mut dyn ChainControl;
    /// See [`Source::offset`].
    fn offset(&self) -> Vec<u8>;
    /// See [`Source::seek`].
    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError>;
    /// Sends barrier `epoch` down the chain: what it reads next belongs to
    /// the epoch after.
    fn barrier(&mut self, epoch: u64) -> Result<(), StageError>;
    /// See [`Source::notify_checkpoint_complete`]; then the chain's.
    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError>;
}

/// Drives a [`Source`] into its chain.
pub struct SourceRunner<S: Source> {
    name: String,
    source: S,
    chain: Box<dyn Stage<S::Out>>,
    watermark: Option<EventTime>,
    /// The epoch of the records it reads now.
    epoch: u64,
}

impl<S: Source> SourceRunner<S> {
    /// `source`, named `name` in the graph, feeding `chain`.
    pub fn new(name: String, source: S, chain: Box<dyn Stage<S::Out>>) -> Self {
        SourceRunner {
            name,
            source,
            chain,
            watermark: None,
            epoch: TaskContext::current().restored_epoch + 1,
        }
    }
}

/// Feeds the chain, holding its first failure (nothing is pushed after it).
struct Feed<'a, T> {
    chain: &'a mut dyn Stage<T>,
    failed: Option<StageError>,
}

impl<T> Collector<T> for Feed<'_, T> {
    fn emit(&mut self, value: T, time: Option<EventTime>) {
        if self.failed.is_none() {
            if let Err(e) = self.chain.push(value, time) {
                self.failed = Some(e);
            }
        }
    }
}

impl<S: Source> SourceDriver for SourceRunner<S>
where
    S::Out: 'static,
{
    fn poll(&mut self, max: usize) -> Result<SourcePoll, StageError> {
        let mut feed = Feed {
            chain: self.chain.as_mut(),
            failed: None,
        };
        let polled = self.source.poll(&mut feed, max);
        if let Some(e) = feed.failed {
            return Err(e);
        }
        let polled = polled.map_err(|e| StageError::Operator {
            operator: self.name.clone(),
            phase: Phase::Read,
            epoch: self.epoch,
            cause: e.to_string(),
        })?;
        if let Some(w) = self.source.watermark() {
            if self.watermark.is_none_or(|old| w > old) {
                self.watermark = Some(w);
                self.chain.watermark(w)?;
            }
        }
        Ok(polled)
    }

    fn chain(&mut self) -> &mut dyn ChainControl {
        &mut self.chain
    }

    fn offset(&self) -> Vec<u8> {
        self.source.offset()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        self.source.seek(offset)
    }

    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        self.epoch = epoch + 1;
        self.chain.barrier(epoch)
    }

    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError> {
        self.source.notify_checkpoint_complete(epoch);
        self.chain.checkpoint_complete(epoch)
    }
}

/// A deterministic generator: record `i` (for `i` in `0..count`, the
/// subtask taking every `parallelism`-th) is `make(i)`. Its offset is the
/// next index, so a replay produces exactly the same records.
pub struct GeneratorSource<T, F> {
    make: F,
    next: u64,
    count: u64,
    step: u64,
    time: Option<fn(u64) -> EventTime>,
    last_time: Option<EventTime>,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T, F: FnMut(u64) -> T> GeneratorSource<T, F> {
    /// Subtask `subtask` of `parallelism` generating `make(i)` for its
    /// share of `0..count`.
    pub fn new(count: u64, subtask: usize, parallelism: usize, make: F) -> Self {
        GeneratorSource {
            make,
            next: subtask as u64,
            count,
            step: parallelism.max(1) as u64,
            time: None,
            last_time: None,
            _type: std::marker::PhantomData,
        }
    }

    /// Stamps record `i` with event time `time(i)` (non-decreasing in
    /// `i`), and emits watermarks as it goes.
    pub fn with_event_time(mut self, time: fn(u64) -> EventTime) -> Self {
        self.time = Some(time);
        self
    }
}

impl<T: Send + 'static, F: FnMut(u64) -> T + Send + 'static> Source for GeneratorSource<T, F> {
    type Out = T;

    fn poll(
        &mut self,
        out: &mut dyn Collector<T>,
        max: usize,
    ) -> Result<SourcePoll, OperatorError> {
        let mut n = 0;
        while n < max && self.next < self.count {
            let time = self.time.map(|f| f(self.next));
            out.emit((self.make)(self.next), time);
            self.last_time = time.or(self.last_time);
            self.next += self.step;
            n += 1;
        }
        Ok(if n == 0 && self.next >= self.count {
            SourcePoll::Exhausted
        } else {
            SourcePoll::Emitted(n)
        })
    }

    fn offset(&self) -> Vec<u8> {
        self.next.to_le_bytes().to_vec()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        self.next = decode_offset(offset)?;
        Ok(())
    }

    fn watermark(&self) -> Option<EventTime> {
        self.last_time
    }
}

fn decode_offset(offset: &[u8]) -> Result<u64, StateError> {
    let bytes: [u8; 8] = offset
        .try_into()
        .map_err(|_| StateError::Decode(format!("an offset of {} bytes", offset.len())))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Lines of a text file. Subtask `i` of `n` takes lines `i, i+n, ...`;
/// its offset is the byte position and line number of the next line. A
/// file that cannot be opened or read fails the poll.
pub struct FileSource {
    path: PathBuf,
    reader: Option<std::io::BufReader<std::fs::File>>,
    position: u64,
    line: u64,
    subtask: u64,
    parallelism: u64,
}

impl FileSource {
    /// Subtask `subtask` of `parallelism` reading `path`.
    pub fn new(path: impl Into<PathBuf>, subtask: usize, parallelism: usize) -> Self {
        FileSource {
            path: path.into(),
            reader: None,
            position: 0,
            line: 0,
            subtask: subtask as u64,
            parallelism: parallelism.max(1) as u64,
        }
    }
}

impl Source for FileSource {
    type Out = String;

    fn poll(
        &mut self,
        out: &mut dyn Collector<String>,
        max: usize,
    ) -> Result<SourcePoll, OperatorError> {
        let (subtask, parallelism) = (self.subtask, self.parallelism);
        let mut emitted = 0;
        let mut line = String::new();
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => {
                let (path, position) = (&self.path, self.position);
                let opened = std::fs::File::open(path).and_then(|mut f| {
                    f.seek(SeekFrom::Start(position))?;
                    Ok(std::io::BufReader::with_capacity(1 << 20, f))
                });
                let opened =
                    opened.map_err(|e| OperatorError::io(format!("open {}", path.display()), e))?;
                self.reader.insert(opened)
            }
        };
        while emitted < max {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .map_err(|e| OperatorError::io(format!("read {}", self.path.display()), e))?;
            if read == 0 {
                return Ok(if emitted == 0 {
                    SourcePoll::Exhausted
                } else {
                    SourcePoll::Emitted(emitted)
                });
            }
            self.position += read as u64;
            let index = self.line;
            self.line += 1;
            if index % parallelism == subtask {
                let text = line.trim_end_matches(['\n', '\r']).to_string();
                out.emit(text, None);
                emitted += 1;
            }
        }
        Ok(SourcePoll::Emitted(emitted))
    }

    fn offset(&self) -> Vec<u8> {
        let mut v = self.position.to_le_bytes().to_vec();
        v.extend_from_slice(&self.line.to_le_bytes());
        v
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), StateError> {
        if offset.len() != 16 {
            return Err(StateError::Decode(format!(
                "a file offset of {} bytes",
                offset.len()
            )));
        }
        self.position = decode_offset(&offset[..8])?;
        self.line = decode_offset(&offset[8..])?;
        self.reader = None;
        Ok(())
    }
}
