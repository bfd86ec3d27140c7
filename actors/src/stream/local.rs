//! Runs a plan inside this process: one thread per subtask, bounded
//! channels between them (a channel's capacity is its credit: a full
//! channel blocks its sender, so a slow consumer slows its producers and
//! memory stays bounded), and the checkpoint coordinator on the calling
//! thread. A failing subtask fails the attempt: every subtask is stopped
//! and the job restarts from the last completed checkpoint with a higher
//! generation, up to a maximum number of failures.

use super::channel::{ChannelMsg, Outbox};
use super::context::TaskContext;
use super::coordinator::{Coordinator, CoordinatorEvent, JobConfig, JobError, JobReport};
use super::edges::{ChannelMeter, Meters};
use super::failure::{AttemptFailure, ChannelError};
use super::plan::{Plan, SubtaskId};
use super::results::JobResults;
use super::runner::{self, Command, Inbox, Reporter, TaskExit};
use super::stage::ChainSnapshot;
use crossbeam_channel::{Receiver, Select, Sender};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopped attempt's threads get to finish before they are
/// left behind (a thread stuck in a hung write cannot be stopped; its
/// sink is fenced off by the next generation).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `plan` to completion in this process.
pub fn run(plan: &Plan, config: JobConfig) -> Result<JobReport, JobError> {
    let mut coordinator = Coordinator::new(plan, config)?;
    loop {
        let attempt = coordinator.begin_attempt()?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let mut senders: Vec<Sender<ChannelMsg>> = Vec::new();
        let mut receivers: Vec<Option<Receiver<ChannelMsg>>> = Vec::new();
        for _ in &plan.channels {
            let (tx, rx) = crossbeam_channel::bounded(coordinator.config().credits);
            senders.push(tx);
            receivers.push(Some(rx));
        }
        let meters = Meters::new(plan.channels.len());
        let results: Arc<Mutex<JobResults>> = Arc::default();
        let mut commands: HashMap<SubtaskId, Sender<Command>> = HashMap::new();
        let (alive_tx, alive_rx) = crossbeam_channel::bounded::<()>(0);
        for id in plan.subtasks() {
            let output_ids = plan.outputs_of(id);
            let outputs: Vec<Sender<ChannelMsg>> =
                output_ids.iter().map(|&c| senders[c].clone()).collect();
            let input_ids = plan.inputs_of(id);
            let inputs: Vec<Receiver<ChannelMsg>> = input_ids
                .iter()
                .filter_map(|&c| receivers[c].take())
                .collect();
            let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
            commands.insert(id, cmd_tx);
            let restored = attempt.restored(id);
            let events = events_tx.clone();
            let pace = coordinator.config().pace;
            let generation = attempt.generation;
            let restored_epoch = attempt.restored_epoch;
            let parallelism = plan.tasks[id.task].parallelism;
            let plan_ref: &Plan = plan;
            let job_name = coordinator.config().storage.job().to_string();
            let task_name = plan.tasks[id.task].name.clone();
            let head = {
                TaskContext {
                    subtask: id.subtask,
                    parallelism,
                    generation,
                    restored_epoch,
                }
                .enter();
                super::metrics::enter(&job_name, (&task_name, id.task), id.subtask, generation);
                let meters = meters.clone();
                let outbox = move || -> Box<dyn Outbox> {
                    Box::new(LocalOutbox {
                        senders: outputs.clone(),
                        ids: output_ids.clone(),
                        meters: meters.clone(),
                    })
                };
                plan_ref.build(id, &outbox)
            };
            let inbox: Option<Box<dyn Inbox>> = if inputs.is_empty() {
                None
            } else {
                Some(Box::new(LocalInbox {
                    receivers: inputs,
                    ids: input_ids,
                    meters: meters.clone(),
                }))
            };
            let alive = alive_tx.clone();
            let results = results.clone();
            let thread = std::thread::Builder::new()
                .name(format!("braid-{id}"))
                .spawn(move || {
                    let _alive = alive;
                    TaskContext {
                        subtask: id.subtask,
                        parallelism,
                        generation,
                        restored_epoch,
                    }
                    .enter();
                    let _meter = super::metrics::enter(
                        &job_name,
                        (&task_name, id.task),
                        id.subtask,
                        generation,
                    );
                    let mut head = head;
                    let mut reporter = LocalReporter {
                        id,
                        results,
                        commands: cmd_rx,
                        events: events.clone(),
                    };
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if let Some((states, offset)) = restored {
                            runner::restore(&mut head, &states, offset.as_deref())?;
                        }
                        runner::run(head, inbox, &mut reporter, pace)
                    }));
                    let failure = match outcome {
                        Ok(Ok(TaskExit::Finished | TaskExit::Stopped)) => return,
                        Ok(Err(error)) => AttemptFailure::Subtask {
                            subtask: id.to_string(),
                            error,
                        },
                        Err(panic) => AttemptFailure::Lost {
                            subtask: id.to_string(),
                            cause: format!("panicked: {}", panic_message(&panic)),
                        },
                    };
                    let _ = events.send(CoordinatorEvent::Failed(failure));
                });
            if let Err(e) = thread {
                let _ = events_tx.send(CoordinatorEvent::Failed(AttemptFailure::Lost {
                    subtask: id.to_string(),
                    cause: format!("cannot start its thread: {e}"),
                }));
            }
        }
        drop(senders);
        drop(events_tx);
        drop(alive_tx);
        let outcome = coordinator.drive(&attempt, &events_rx, &|id, command| {
            if let Some(tx) = commands.get(&id) {
                let _ = tx.send(command);
            }
        });
        for tx in commands.values() {
            let _ = tx.send(Command::Stop);
        }
        drop(commands);
        drop(events_rx);
        // Every thread holds a sender: the channel disconnects when the
        // last one has exited.
        if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = alive_rx.recv_timeout(STOP_GRACE)
        {
            tracing::error!(
                "subtask threads of generation {} did not stop within {} s (stuck in I/O?); \
                 leaving them behind",
                attempt.generation,
                STOP_GRACE.as_secs()
            );
        }
        match outcome {
            Ok(Some(mut report)) => {
                report.edges = plan.edge_stats(&meters.counts());
                report.results = std::mem::take(&mut *results.lock());
                return Ok(report);
            }
            Ok(None) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

struct LocalOutbox {
    senders: Vec<Sender<ChannelMsg>>,
    /// The plan channel of each output.
    ids: Vec<usize>,
    meters: Meters,
}

impl Outbox for LocalOutbox {
    fn send(&mut self, channel: usize, msg: ChannelMsg) -> Result<(), ChannelError> {
        self.senders
            .get(channel)
            .ok_or(ChannelError::Closed(channel))?
            .send(msg)
            .map_err(|_| ChannelError::Closed(channel))
    }

    fn channels(&self) -> usize {
        self.senders.len()
    }

    fn in_process(&self) -> bool {
        true
    }

    fn meter(&self, channel: usize) -> Option<&ChannelMeter> {
        self.meters.get(*self.ids.get(channel)?)
    }
}

struct LocalInbox {
    receivers: Vec<Receiver<ChannelMsg>>,
    /// The plan channel of each input.
    ids: Vec<usize>,
    meters: Meters,
}

impl Inbox for LocalInbox {
    fn recv(
        &mut self,
        blocked: &[bool],
        timeout: Duration,
    ) -> Result<Option<(usize, ChannelMsg)>, ChannelError> {
        recv_unblocked(&self.receivers, blocked, timeout)
    }

    fn meter(&self, channel: usize) -> Option<&ChannelMeter> {
        self.meters.get(*self.ids.get(channel)?)
    }
}

/// The next item on any of `receivers` whose `blocked` entry is false,
/// waiting up to `timeout`: what both runners' inboxes do during barrier
/// alignment.
pub(crate) fn recv_unblocked<T>(
    receivers: &[Receiver<T>],
    blocked: &[bool],
    timeout: Duration,
) -> Result<Option<(usize, T)>, ChannelError> {
    let mut select = Select::new();
    let mut index = Vec::new();
    for (i, rx) in receivers.iter().enumerate() {
        if !blocked.get(i).copied().unwrap_or(false) {
            select.recv(rx);
            index.push(i);
        }
    }
    if index.is_empty() {
        std::thread::sleep(timeout.min(Duration::from_millis(1)));
        return Ok(None);
    }
    let Ok(op) = select.select_timeout(timeout) else {
        return Ok(None);
    };
    let channel = index[op.index()];
    op.recv(&receivers[channel])
        .map(|item| Some((channel, item)))
        .map_err(|_| ChannelError::Closed(channel))
}

struct LocalReporter {
    id: SubtaskId,
    results: Arc<Mutex<JobResults>>,
    commands: Receiver<Command>,
    events: Sender<CoordinatorEvent>,
}

impl Reporter for LocalReporter {
    fn snapshot_taken(&mut self, epoch: u64, states: ChainSnapshot, offset: Option<Vec<u8>>) {
        let _ = self.events.send(CoordinatorEvent::Snapshot {
            id: self.id,
            epoch,
            states,
            offset,
        });
    }

    fn exhausted(&mut self) {
        let _ = self.events.send(CoordinatorEvent::Exhausted(self.id));
    }

    fn finished(&mut self) {
        self.results.lock().extend(super::results::take());
        let _ = self.events.send(CoordinatorEvent::Finished(self.id));
    }

    fn command(&mut self, timeout: Duration) -> Option<Command> {
        if timeout.is_zero() {
            self.commands.try_recv().ok()
        } else {
            self.commands.recv_timeout(timeout).ok()
        }
    }
}
