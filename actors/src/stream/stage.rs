//! A chain of operators inside one subtask, wired by pointer: each stage
//! hands what its operator emits straight to the next stage's `push`, so
//! records cross a forward edge between chained operators without being
//! copied, encoded or queued. Control events (watermarks, end of input,
//! snapshots) travel the same chain after the records before them.
//!
//! Every call returns the first failure of the chain: an operator's error
//! (named by operator, phase and epoch) or a channel's. An error raised
//! downstream while an upstream operator emits is held by the collector
//! between them and returned when the upstream's call returns; nothing
//! further is pushed into the failed stage.

use super::context::TaskContext;
use super::failure::{Phase, StageError};
use super::operator::{Collector, EventTime, Operator, OperatorError, Snapshot};
use std::collections::HashMap;

/// The states of a chain's operators at a barrier, named by operator.
pub type ChainSnapshot = Vec<(String, Snapshot)>;

/// One link of a chain, consuming `T`.
pub trait Stage<T>: Send {
    /// One record.
    fn push(&mut self, value: T, time: Option<EventTime>) -> Result<(), StageError>;
    /// Event time reached `watermark` on every input of the subtask.
    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError>;
    /// Every input ended.
    fn end(&mut self) -> Result<(), StageError>;
    /// Freezes the state of this stage and those after it at the barrier
    /// of `epoch`.
    fn snapshot(&mut self, epoch: u64, into: &mut ChainSnapshot) -> Result<(), StageError>;
    /// Restores this stage and those after it from saved states by name.
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StageError>;
    /// Sends buffered output on (before a barrier, or when idle).
    fn flush(&mut self) -> Result<(), StageError>;
    /// Checkpoint `epoch` completed everywhere.
    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError>;
    /// The barrier for `epoch` passes, after the chain's state was
    /// snapshotted: a channel end flushes and sends it on.
    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        let _ = epoch;
        Ok(())
    }
}

/// An operator followed by the rest of its chain.
pub struct OpStage<O: Operator> {
    name: String,
    op: O,
    next: Box<dyn Stage<O::Out>>,
    /// The epoch the records now flowing belong to: one past the last
    /// barrier (or past the restored checkpoint).
    epoch: u64,
    /// Its records in and out, for `/metrics` (none outside a subtask).
    meter: Option<std::sync::Arc<super::metrics::OperatorMeter>>,
}

impl<O: Operator> OpStage<O> {
    /// Puts `op`, known as `name` in snapshots, before `next`.
    pub fn new(name: String, op: O, next: Box<dyn Stage<O::Out>>) -> Self {
        let epoch = TaskContext::current().restored_epoch + 1;
        let meter = super::metrics::operator(&name);
        OpStage {
            name,
            op,
            next,
            epoch,
            meter,
        }
    }

    fn failed(&self, phase: Phase, epoch: u64, cause: OperatorError) -> StageError {
        StageError::Operator {
            operator: self.name.clone(),
            phase,
            epoch,
            cause: cause.to_string(),
        }
    }

    /// Runs `call` with a collector feeding the rest of the chain, and
    /// returns the first failure: downstream's, held by the collector,
    /// or the operator's own.
    fn emitting(
        &mut self,
        phase: Phase,
        call: impl FnOnce(&mut O, &mut Forward<'_, O::Out>) -> Result<(), OperatorError>,
    ) -> Result<(), StageError> {
        let mut forward = Forward {
            next: self.next.as_mut(),
            failed: None,
            meter: self.meter.as_deref(),
        };
        let result = call(&mut self.op, &mut forward);
        if let Some(e) = forward.failed {
            return Err(e);
        }
        result.map_err(|e| self.failed(phase, self.epoch, e))
    }
}

struct Forward<'a, T> {
    next: &'a mut dyn Stage<T>,
    failed: Option<StageError>,
    meter: Option<&'a super::metrics::OperatorMeter>,
}

impl<T> Collector<T> for Forward<'_, T> {
    fn emit(&mut self, value: T, time: Option<EventTime>) {
        if let Some(meter) = self.meter {
            meter.record_out();
        }
        if self.failed.is_none() {
            if let Err(e) = self.next.push(value, time) {
                self.failed = Some(e);
            }
        }
    }
}

impl<O: Operator> Stage<O::In> for OpStage<O> {
    fn push(&mut self, value: O::In, time: Option<EventTime>) -> Result<(), StageError> {
        if let Some(meter) = &self.meter {
            meter.record_in();
        }
        self.emitting(Phase::Process, |op, out| op.process(value, time, out))
    }

    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError> {
        self.emitting(Phase::Watermark, |op, out| op.on_watermark(watermark, out))?;
        self.next.watermark(watermark)
    }

    fn end(&mut self) -> Result<(), StageError> {
        self.emitting(Phase::End, |op, out| op.on_end(out))?;
        self.next.end()
    }

    fn snapshot(&mut self, epoch: u64, into: &mut ChainSnapshot) -> Result<(), StageError> {
        let snapshot = self
            .op
            .snapshot()
            .map_err(|e| self.failed(Phase::Snapshot, epoch, e))?;
        into.push((self.name.clone(), snapshot));
        self.next.snapshot(epoch, into)
    }

    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
        if let Some(bytes) = states.get(&self.name) {
            let restored = self.epoch - 1;
            self.op
                .restore(bytes)
                .map_err(|e| self.failed(Phase::Restore, restored, e))?;
        }
        self.next.restore(states)
    }

    fn flush(&mut self) -> Result<(), StageError> {
        self.next.flush()
    }

    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError> {
        self.op
            .notify_checkpoint_complete(epoch)
            .map_err(|e| self.failed(Phase::Commit, epoch, e))?;
        self.next.checkpoint_complete(epoch)
    }

    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        self.op.barrier_passed(epoch);
        self.epoch = epoch + 1;
        self.next.barrier(epoch)
    }
}

/// The end of a chain that keeps nothing: a sink already consumed it.
pub struct Discard;

impl<T> Stage<T> for Discard {
    fn push(&mut self, _value: T, _time: Option<EventTime>) -> Result<(), StageError> {
        Ok(())
    }
    fn watermark(&mut self, _watermark: EventTime) -> Result<(), StageError> {
        Ok(())
    }
    fn end(&mut self) -> Result<(), StageError> {
        Ok(())
    }
    fn snapshot(&mut self, _epoch: u64, _into: &mut ChainSnapshot) -> Result<(), StageError> {
        Ok(())
    }
    fn restore(&mut self, _states: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StageError> {
        Ok(())
    }
    fn checkpoint_complete(&mut self, _epoch: u64) -> Result<(), StageError> {
        Ok(())
    }
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

    fn each(
        &mut self,
        mut call: impl FnMut(&mut dyn Stage<T>) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        for out in &mut self.outs {
            call(out.as_mut())?;
        }
        Ok(())
    }
}

impl<T: Clone + Send> Stage<T> for Tee<T> {
    fn push(&mut self, value: T, time: Option<EventTime>) -> Result<(), StageError> {
        if let Some((last, rest)) = self.outs.split_last_mut() {
            for out in rest {
                out.push(value.clone(), time)?;
            }
            last.push(value, time)?;
        }
        Ok(())
    }
    fn watermark(&mut self, watermark: EventTime) -> Result<(), StageError> {
        self.each(|out| out.watermark(watermark))
    }
    fn end(&mut self) -> Result<(), StageError> {
        self.each(|out| out.end())
    }
    fn snapshot(&mut self, epoch: u64, into: &mut ChainSnapshot) -> Result<(), StageError> {
        self.each(|out| out.snapshot(epoch, into))
    }
    fn restore(&mut self, states: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
        self.each(|out| out.restore(states))
    }
    fn flush(&mut self) -> Result<(), StageError> {
        self.each(|out| out.flush())
    }
    fn checkpoint_complete(&mut self, epoch: u64) -> Result<(), StageError> {
        self.each(|out| out.checkpoint_complete(epoch))
    }
    fn barrier(&mut self, epoch: u64) -> Result<(), StageError> {
        self.each(|out| out.barrier(epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::operator::{decode_state, Snapshot};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(u64, Option<EventTime>)>>>;

    struct Record(Seen);
    impl Stage<u64> for Record {
        fn push(&mut self, value: u64, time: Option<EventTime>) -> Result<(), StageError> {
            if let Ok(mut v) = self.0.lock() {
                v.push((value, time));
            }
            Ok(())
        }
        fn watermark(&mut self, _w: EventTime) -> Result<(), StageError> {
            Ok(())
        }
        fn end(&mut self) -> Result<(), StageError> {
            Ok(())
        }
        fn snapshot(&mut self, _e: u64, _into: &mut ChainSnapshot) -> Result<(), StageError> {
            Ok(())
        }
        fn restore(&mut self, _s: &HashMap<String, Vec<u8>>) -> Result<(), StageError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), StageError> {
            Ok(())
        }
        fn checkpoint_complete(&mut self, _epoch: u64) -> Result<(), StageError> {
            Ok(())
        }
    }

    struct Sum(u64);
    impl Operator for Sum {
        type In = u64;
        type Out = u64;
        fn process(
            &mut self,
            v: u64,
            t: Option<EventTime>,
            out: &mut dyn Collector<u64>,
        ) -> Result<(), OperatorError> {
            self.0 += v;
            out.emit(self.0, t);
            Ok(())
        }
        fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
            Ok(Snapshot::of(self.0))
        }
        fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
            self.0 = decode_state(bytes)?;
            Ok(())
        }
    }

    /// Refuses records above a limit, and its pre-commit in epoch 3.
    struct Picky(u64);
    impl Operator for Picky {
        type In = u64;
        type Out = u64;
        fn process(
            &mut self,
            v: u64,
            t: Option<EventTime>,
            out: &mut dyn Collector<u64>,
        ) -> Result<(), OperatorError> {
            if v > self.0 {
                return Err(OperatorError::Failed(format!("{v} is too big")));
            }
            out.emit(v, t);
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
        chain.push(1, Some(5)).unwrap();
        chain.push(2, None).unwrap();
        assert_eq!(
            *seen.lock().unwrap_or_else(|e| e.into_inner()),
            vec![(101, Some(5)), (104, None)]
        );
        let mut snap = Vec::new();
        chain.snapshot(1, &mut snap).unwrap();
        let states: HashMap<String, Vec<u8>> = snap
            .into_iter()
            .map(|(n, s)| (n, s.encode().unwrap_or_default()))
            .collect();
        chain.push(10, None).unwrap();
        chain.restore(&states).unwrap_or_else(|e| panic!("{e}"));
        chain.push(1, None).unwrap();
        assert_eq!(
            seen.lock().unwrap_or_else(|e| e.into_inner()).last(),
            Some(&(108, None)),
            "state rolled back to the snapshot"
        );
    }

    #[test]
    fn a_failure_downstream_reaches_the_caller_named_by_operator_and_epoch() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut chain = OpStage::new(
            "sum".into(),
            Sum(0),
            Box::new(OpStage::new(
                "picky".into(),
                Picky(5),
                Box::new(Record(seen.clone())),
            )),
        );
        chain.push(2, None).unwrap();
        chain.barrier(1).unwrap();
        chain.barrier(2).unwrap();
        let err = chain.push(4, None).unwrap_err();
        assert_eq!(
            err,
            StageError::Operator {
                operator: "picky".into(),
                phase: Phase::Process,
                epoch: 3,
                cause: "6 is too big".into(),
            }
        );
        assert_eq!(
            *seen.lock().unwrap_or_else(|e| e.into_inner()),
            vec![(2, None)],
            "nothing past the failure"
        );
    }
}
