//! One subtask's loop, independent of how its channels are carried: a
//! source subtask polls its source and injects barriers when the
//! coordinator asks; a subtask with inputs reads its channels, aligns
//! barriers (a channel that delivered barrier *n* is not read again until
//! every input delivered it), snapshots its chain, passes the barrier on,
//! and tracks the minimum watermark over its inputs.

use super::channel::{BatchSink, ChannelMsg};
use super::edges::ChannelMeter;
use super::failure::{ChannelError, StageError, TaskError};
use super::operator::EventTime;
use super::source::{SourceDriver, SourcePoll};
use super::stage::ChainSnapshot;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What drives a subtask.
pub enum TaskHead {
    /// A source and its chain.
    Source(Box<dyn SourceDriver>),
    /// A chain fed by `channels` input channels.
    Inputs {
        /// The chain's decoder.
        sink: Box<dyn BatchSink>,
        /// How many input channels feed it.
        channels: usize,
    },
}

/// What the coordinator tells a subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Sources only: inject the barrier of this epoch.
    Trigger(u64),
    /// The checkpoint of this epoch completed everywhere.
    Complete(u64),
    /// Sources only: the job is finishing; send end of input downstream.
    Finish,
    /// Stop now (the job failed or was cancelled).
    Stop,
}

/// Where a subtask's messages come from.
pub trait Inbox: Send {
    /// The next message on a channel whose `blocked` entry is false,
    /// waiting up to `timeout`; `Ok(None)` when none arrived.
    fn recv(
        &mut self,
        blocked: &[bool],
        timeout: Duration,
    ) -> Result<Option<(usize, ChannelMsg)>, ChannelError>;
    /// The meter of input channel `channel`, if this inbox counts.
    fn meter(&self, _channel: usize) -> Option<&ChannelMeter> {
        None
    }
}

/// What a subtask reports to its coordinator.
pub trait Reporter: Send {
    /// The chain's state at barrier `epoch` (and the source's offset):
    /// encode, store, and acknowledge it, off this thread.
    fn snapshot_taken(&mut self, epoch: u64, states: ChainSnapshot, offset: Option<Vec<u8>>);
    /// A source read all of its input.
    fn exhausted(&mut self);
    /// The subtask finished after end of input.
    fn finished(&mut self);
    /// A command, if one is waiting; waits up to `timeout` for one.
    fn command(&mut self, timeout: Duration) -> Option<Command>;
}

/// How a subtask's loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskExit {
    /// End of input reached it and it finished.
    Finished,
    /// The coordinator stopped it.
    Stopped,
}

/// Limits of a source's pace.
#[derive(Debug, Clone, Copy)]
pub struct SourcePace {
    /// Records per poll.
    pub batch: usize,
    /// At most this many records per second (per subtask), if set.
    pub rate: Option<f64>,
}

impl Default for SourcePace {
    fn default() -> Self {
        SourcePace {
            batch: 512,
            rate: None,
        }
    }
}

/// Restores a subtask's head from saved chain states and, for a source,
/// its offset.
pub fn restore(
    head: &mut TaskHead,
    states: &HashMap<String, Vec<u8>>,
    offset: Option<&[u8]>,
) -> Result<(), TaskError> {
    match head {
        TaskHead::Source(driver) => {
            if let Some(offset) = offset {
                driver.seek(offset)?;
            }
            Ok(driver.chain().restore(states)?)
        }
        TaskHead::Inputs { sink, .. } => Ok(sink.chain().restore(states)?),
    }
}

/// Runs a subtask until it finishes or is stopped.
pub fn run(
    head: TaskHead,
    inbox: Option<Box<dyn Inbox>>,
    reporter: &mut dyn Reporter,
    pace: SourcePace,
) -> Result<TaskExit, TaskError> {
    match head {
        TaskHead::Source(driver) => run_source(driver, reporter, pace),
        TaskHead::Inputs { sink, channels } => match inbox {
            Some(inbox) => run_inputs(sink, channels, inbox, reporter),
            None => Err(TaskError::Channel(ChannelError::Closed(0))),
        },
    }
}

const FLUSH_EVERY: Duration = Duration::from_millis(5);

fn run_source(
    mut driver: Box<dyn SourceDriver>,
    reporter: &mut dyn Reporter,
    pace: SourcePace,
) -> Result<TaskExit, TaskError> {
    let mut exhausted = false;
    let mut last_flush = Instant::now();
    let started = Instant::now();
    let mut emitted: u64 = 0;
    // The source's records out (its chained operators count their own).
    let meter = super::metrics::current().and_then(|m| super::metrics::operator(&m.task));
    loop {
        let wait = if exhausted {
            Duration::from_millis(50)
        } else {
            Duration::ZERO
        };
        if let Some(command) = reporter.command(wait) {
            match command {
                Command::Trigger(epoch) => {
                    let offset = driver.offset();
                    let mut states = Vec::new();
                    driver.chain().snapshot(epoch, &mut states)?;
                    driver.barrier(epoch)?;
                    reporter.snapshot_taken(epoch, states, Some(offset));
                    last_flush = Instant::now();
                }
                Command::Complete(epoch) => driver.checkpoint_complete(epoch)?,
                Command::Finish => {
                    driver.chain().end()?;
                    reporter.finished();
                    return Ok(TaskExit::Finished);
                }
                Command::Stop => return Ok(TaskExit::Stopped),
            }
            continue;
        }
        if exhausted {
            continue;
        }
        let mut batch = pace.batch;
        if let Some(rate) = pace.rate {
            let allowed = (started.elapsed().as_secs_f64() * rate) as u64;
            let room = allowed.saturating_sub(emitted) as usize;
            if room == 0 {
                flush_if_due(driver.as_mut(), &mut last_flush)?;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            batch = batch.min(room);
        }
        match driver.poll(batch)? {
            SourcePoll::Emitted(n) => {
                emitted += n as u64;
                if let Some(meter) = &meter {
                    meter.records_out_n(n as u64);
                }
            }
            SourcePoll::Idle => std::thread::sleep(Duration::from_millis(1)),
            SourcePoll::Exhausted => {
                exhausted = true;
                driver.chain().flush()?;
                reporter.exhausted();
            }
        }
        flush_if_due(driver.as_mut(), &mut last_flush)?;
    }
}

/// Flushes the chain's buffered output once it is `FLUSH_EVERY` old, busy
/// or idle: a flush per idle poll (every millisecond when throttled) would
/// wake each buffered edge's consumer that often.
fn flush_if_due(driver: &mut dyn SourceDriver, last_flush: &mut Instant) -> Result<(), StageError> {
    if last_flush.elapsed() >= FLUSH_EVERY {
        driver.chain().flush()?;
        *last_flush = Instant::now();
    }
    Ok(())
}

/// Barrier alignment and watermark tracking over a subtask's inputs.
struct Inputs {
    blocked: Vec<bool>,
    ended: Vec<bool>,
    watermarks: Vec<EventTime>,
    watermark: EventTime,
    aligning: Option<u64>,
}

impl Inputs {
    fn new(channels: usize) -> Self {
        Inputs {
            blocked: vec![false; channels],
            ended: vec![false; channels],
            watermarks: vec![EventTime::MIN; channels],
            watermark: EventTime::MIN,
            aligning: None,
        }
    }

    /// The new combined watermark, if it advanced.
    fn advance(&mut self) -> Option<EventTime> {
        let min = self
            .watermarks
            .iter()
            .zip(&self.ended)
            .filter(|(_, ended)| !**ended)
            .map(|(w, _)| *w)
            .min()
            .unwrap_or(EventTime::MAX);
        (min > self.watermark).then(|| {
            self.watermark = min;
            min
        })
    }

    /// The epoch whose barrier every live input has delivered.
    fn aligned(&mut self) -> Option<u64> {
        let epoch = self.aligning?;
        if self.blocked.iter().all(|b| *b) {
            self.aligning = None;
            for (blocked, ended) in self.blocked.iter_mut().zip(&self.ended) {
                *blocked = *ended;
            }
            Some(epoch)
        } else {
            None
        }
    }

    fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }
}

fn run_inputs(
    mut sink: Box<dyn BatchSink>,
    channels: usize,
    mut inbox: Box<dyn Inbox>,
    reporter: &mut dyn Reporter,
) -> Result<TaskExit, TaskError> {
    let mut inputs = Inputs::new(channels);
    let subtask_meter = super::metrics::current();
    let mut dirty = false;
    let mut snapshotted = 0u64;
    let mut completed = 0u64;
    loop {
        while let Some(command) = reporter.command(Duration::ZERO) {
            match command {
                Command::Complete(epoch) => {
                    completed = completed.max(epoch);
                    sink.chain().checkpoint_complete(epoch)?;
                }
                Command::Stop => return Ok(TaskExit::Stopped),
                Command::Trigger(_) | Command::Finish => {}
            }
        }
        let timeout = if dirty {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        };
        let Some((channel, msg)) = inbox.recv(&inputs.blocked, timeout)? else {
            if dirty {
                sink.chain().flush()?;
                dirty = false;
            }
            continue;
        };
        let meter = inbox.meter(channel);
        match msg {
            ChannelMsg::Batch(bytes) => {
                if let Some(m) = meter {
                    m.codec(bytes.len());
                }
                if let Some(subtask) = &subtask_meter {
                    subtask.received(bytes.len());
                    subtask.codec(bytes.len());
                }
                sink.deliver(&bytes)?;
                dirty = true;
            }
            ChannelMsg::Shared(batch) => {
                if let Some(m) = meter {
                    m.codec(batch.bytes().len());
                }
                if let Some(subtask) = &subtask_meter {
                    subtask.received(batch.bytes().len());
                    subtask.codec(batch.bytes().len());
                }
                sink.deliver(batch.bytes())?;
                dirty = true;
            }
            ChannelMsg::Arrow(batch) => {
                if let Some(subtask) = &subtask_meter {
                    subtask.received(batch.0.get_array_memory_size());
                }
                let (_, copied) = sink.deliver_arrow(&batch.0)?;
                if let Some(m) = meter {
                    m.copied(copied);
                }
                dirty = true;
            }
            ChannelMsg::Columnar(_) | ChannelMsg::Mailed(_) => {
                return Err(TaskError::Channel(ChannelError::Decode(
                    "a columnar batch arrived that its host did not read in".into(),
                )));
            }
            ChannelMsg::Records(records) => {
                if let Some(subtask) = &subtask_meter {
                    subtask.received(records.bytes());
                }
                sink.deliver_records(&records)?;
                dirty = true;
            }
            ChannelMsg::Watermark(w) => {
                if let Some(slot) = inputs.watermarks.get_mut(channel) {
                    *slot = (*slot).max(w);
                }
                if let Some(w) = inputs.advance() {
                    if let Some(subtask) = &subtask_meter {
                        subtask.watermark(w);
                    }
                    sink.chain().watermark(w)?;
                }
            }
            ChannelMsg::Barrier(epoch) => {
                if let Some(slot) = inputs.blocked.get_mut(channel) {
                    *slot = true;
                }
                inputs.aligning = Some(inputs.aligning.map_or(epoch, |e| e.max(epoch)));
            }
            ChannelMsg::End => {
                if let Some(slot) = inputs.ended.get_mut(channel) {
                    *slot = true;
                }
                if let Some(slot) = inputs.blocked.get_mut(channel) {
                    *slot = true;
                }
                if let Some(w) = inputs.advance() {
                    if let Some(subtask) = &subtask_meter {
                        subtask.watermark(w);
                    }
                    sink.chain().watermark(w)?;
                }
            }
        }
        if let Some(epoch) = inputs.aligned() {
            let mut states = Vec::new();
            sink.chain().snapshot(epoch, &mut states)?;
            sink.chain().barrier(epoch)?;
            reporter.snapshot_taken(epoch, states, None);
            snapshotted = epoch;
            dirty = false;
        }
        if inputs.aligning.is_none() && inputs.all_ended() {
            // End of input follows the job's last checkpoint; its
            // completion may still be on its way, and the chain (a sink)
            // publishes only when it hears of it.
            while completed < snapshotted {
                match reporter.command(Duration::from_millis(50)) {
                    Some(Command::Complete(epoch)) => {
                        completed = completed.max(epoch);
                        sink.chain().checkpoint_complete(epoch)?;
                    }
                    Some(Command::Stop) => return Ok(TaskExit::Stopped),
                    _ => {}
                }
            }
            sink.chain().end()?;
            reporter.finished();
            return Ok(TaskExit::Finished);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Inputs;

    #[test]
    fn a_barrier_blocks_its_channel_until_every_input_delivered_it() {
        let mut inputs = Inputs::new(3);
        inputs.blocked[0] = true;
        inputs.aligning = Some(1);
        assert_eq!(inputs.aligned(), None);
        inputs.blocked[2] = true;
        assert_eq!(inputs.aligned(), None);
        inputs.blocked[1] = true;
        assert_eq!(inputs.aligned(), Some(1));
        assert_eq!(inputs.blocked, vec![false; 3], "all channels read again");
    }

    #[test]
    fn an_ended_input_does_not_hold_back_alignment_or_watermarks() {
        let mut inputs = Inputs::new(2);
        inputs.watermarks[0] = 10;
        assert_eq!(inputs.advance(), None, "channel 1 has no watermark yet");
        inputs.ended[1] = true;
        inputs.blocked[1] = true;
        assert_eq!(inputs.advance(), Some(10));
        inputs.blocked[0] = true;
        inputs.aligning = Some(4);
        assert_eq!(inputs.aligned(), Some(4));
        assert_eq!(
            inputs.blocked,
            vec![false, true],
            "an ended channel stays closed"
        );
    }
}
