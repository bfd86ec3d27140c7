//! A chain of operators inside one subtask, wired by pointer: each stage
//! hands what its operator emits straight to the next stage's `push`, so
//! records cross a forward edge between chained operators without being
//! copied, encoded or queued. Control events (watermarks, end of input,
//! snapshots) travel the same chain after the records before them.

use super::operator::{Collector, EventTime, Operator, Snapshot, StateError};
use std::collections::HashMap;

/// The states of a chain's operators at a barrier, named by operator.
pub type ChainSnapshot = Vec<(String, Snapshot)>;

/// One link of a chain, consuming `T`.
pub trait Stage<T>: Send {
    /// One record.
    fn push(&mut self, value: T, time: Option<EventTime>);
    /// Event time reached `watermark` on every input of the subtask.
    fn watermark(&mut self, watermark: EventTime);
    /// Every input ended.
    fn end(&mut self);
    /// Freezes the state of this stage and those after it.
    fn snapshot(&mut self, into: &mut ChainSnapshot);
    /// Restores this stage and those after it from saved states by name.
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StateError>;
    /// Sends buffered output on (before a barrier, or when idle).
    fn flush(&mut self);
    /// Checkpoint `epoch` completed everywhere.
    fn checkpoint_complete(&mut self, epoch: u64);
    /// The barrier for `epoch` passes, after the chain's state was
    /// snapshotted: a channel end flushes and sends it on.
    fn barrier(&mut self, epoch: u64) {
        let _ = epoch;
    }
    /// A failure sending output, if one happened: the subtask must stop.
    fn take_failure(&mut self) -> Option<super::channel::ChannelError> {
        None
    }
}

/// An operator followed by the rest of its chain.
pub struct OpStage<O: Operator> {
    name: String,
    op: O,
    next: Box<dyn Stage<O::Out>>,
}

impl<O: Operator> OpStage<O> {
    /// Puts `op`, known as `name` in snapshots, before `next`.
    pub fn new(name: String, op: O, next: Box<dyn Stage<O::Out>>) -> Self {
        OpStage { name, op, next }
    }
}

struct Forward<'a, T>(&'a mut dyn Stage<T>);

impl<T> Collector<T> for Forward<'_, T> {
    fn emit(&mut self, value: T, time: Option<EventTime>) {
        self.0.push(value, time);
    }
}

impl<O: Operator> Stage<O::In> for OpStage<O> {
    fn push(&mut self, value: O::In, time: Option<EventTime>) {
        self.op
            .process(value, time, &mut Forward(self.next.as_mut()));
    }

    fn watermark(&mut self, watermark: EventTime) {
        self.op
            .on_watermark(watermark, &mut Forward(self.next.as_mut()));
        self.next.watermark(watermark);
    }

    fn end(&mut self) {
        self.op.on_end(&mut Forward(self.next.as_mut()));
        self.next.end();
    }

    fn snapshot(&mut self, into: &mut ChainSnapshot) {
        into.push((self.name.clone(), self.op.snapshot()));
        self.next.snapshot(into);
    }

    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StateError> {
        if let Some(bytes) = states.get(&self.name) {
            self.op.restore(bytes)?;
        }
        self.next.restore(states)
    }

    fn flush(&mut self) {
        self.next.flush();
    }

    fn checkpoint_complete(&mut self, epoch: u64) {
        self.op.notify_checkpoint_complete(epoch);
        self.next.checkpoint_complete(epoch);
    }

    fn barrier(&mut self, epoch: u64) {
        self.op.barrier_passed(epoch);
        self.next.barrier(epoch);
    }

    fn take_failure(&mut self) -> Option<super::channel::ChannelError> {
        self.next.take_failure()
    }
}

/// The end of a chain that keeps nothing: a sink already consumed it.
pub struct Discard;

impl<T> Stage<T> for Discard {
    fn push(&mut self, _value: T, _time: Option<EventTime>) {}
    fn watermark(&mut self, _watermark: EventTime) {}
    fn end(&mut self) {}
    fn snapshot(&mut self, _into: &mut ChainSnapshot) {}
    fn restore(&mut self, _states: &HashMap<String, Vec<u8>>) -> Result<(), StateError> {
        Ok(())
    }
    fn flush(&mut self) {}
    fn checkpoint_complete(&mut self, _epoch: u64) {}
}

/// Fans a chain out to several consumers of the same stream (one
/// upstream feeding two operators, or an operator and a channel).
pub struct Tee<T: Clone> {
    outs: Vec<Box<dyn Stage<T>>>,
}

impl<T: Clone> Tee<T> {
    /// A stage copying every record to each of `outs`.
    pub fn new(outs: Vec<Box<dyn Stage<T>>>) -> Self {
        Tee { outs }
    }
}

impl<T: Clone + Send> Stage<T> for Tee<T> {
    fn push(&mut self, value: T, time: Option<EventTime>) {
        if let Some((last, rest)) = self.outs.split_last_mut() {
            for out in rest {
                out.push(value.clone(), time);
            }
            last.push(value, time);
        }
    }
    fn watermark(&mut self, watermark: EventTime) {
        for out in &mut self.outs {
            out.watermark(watermark);
        }
    }
    fn end(&mut self) {
        for out in &mut self.outs {
            out.end();
        }
    }
    fn snapshot(&mut self, into: &mut ChainSnapshot) {
        for out in &mut self.outs {
            out.snapshot(into);
        }
    }
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StateError> {
        for out in &mut self.outs {
            out.restore(states)?;
        }
        Ok(())
    }
    fn flush(&mut self) {
        for out in &mut self.outs {
            out.flush();
        }
    }
    fn checkpoint_complete(&mut self, epoch: u64) {
        for out in &mut self.outs {
            out.checkpoint_complete(epoch);
        }
    }
    fn barrier(&mut self, epoch: u64) {
        for out in &mut self.outs {
            out.barrier(epoch);
        }
    }
    fn take_failure(&mut self) -> Option<super::channel::ChannelError> {
        self.outs.iter_mut().find_map(|o| o.take_failure())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::operator::Snapshot;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(u64, Option<EventTime>)>>>;

    struct Record(Seen);
    impl Stage<u64> for Record {
        fn push(&mut self, value: u64, time: Option<EventTime>) {
            if let Ok(mut v) = self.0.lock() {
                v.push((value, time));
            }
        }
        fn watermark(&mut self, _w: EventTime) {}
        fn end(&mut self) {}
        fn snapshot(&mut self, _into: &mut ChainSnapshot) {}
        fn restore(&mut self, _s: &HashMap<String, Vec<u8>>) -> Result<(), StateError> {
            Ok(())
        }
        fn flush(&mut self) {}
        fn checkpoint_complete(&mut self, _epoch: u64) {}
    }

    struct Sum(u64);
    impl Operator for Sum {
        type In = u64;
        type Out = u64;
        fn process(&mut self, v: u64, t: Option<EventTime>, out: &mut dyn Collector<u64>) {
            self.0 += v;
            out.emit(self.0, t);
        }
        fn snapshot(&mut self) -> Snapshot {
            Snapshot::of(self.0)
        }
        fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
            self.0 = crate::stream::operator::decode_state(bytes)?;
            Ok(())
        }
    }

    #[test]
    fn a_chain_passes_records_through_and_snapshots_every_operator() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut chain = OpStage::new(
            "a".into(),
            Sum(0),
            Box::new(OpStage::new(
                "b".into(),
                Sum(100),
                Box::new(Record(seen.clone())),
            )),
        );
        chain.push(1, Some(5));
        chain.push(2, None);
        assert_eq!(
            *seen.lock().unwrap_or_else(|e| e.into_inner()),
            vec![(101, Some(5)), (104, None)]
        );
        let mut snap = Vec::new();
        chain.snapshot(&mut snap);
        let states: HashMap<String, Vec<u8>> = snap
            .into_iter()
            .map(|(n, s)| (n, s.encode().unwrap_or_default()))
            .collect();
        chain.push(10, None);
        chain.restore(&states).unwrap_or_else(|e| panic!("{e}"));
        chain.push(1, None);
        assert_eq!(
            seen.lock().unwrap_or_else(|e| e.into_inner()).last(),
            Some(&(108, None)),
            "state rolled back to the snapshot"
        );
    }
}
