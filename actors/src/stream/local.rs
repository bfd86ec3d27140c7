//! Runs a plan inside this process: one thread per subtask, bounded
//! channels between them (a channel's capacity is its credit: a full
//! channel blocks its sender, so a slow consumer slows its producers and
//! memory stays bounded), and the checkpoint coordinator on the calling
//! thread. A failing subtask fails the attempt: every subtask is stopped
//! and the job restarts from the last completed checkpoint with a higher
//! generation, up to a maximum number of failures.

use super::channel::{ChannelError, ChannelMsg, Outbox};
use super::context::TaskContext;
use super::coordinator::{Coordinator, CoordinatorEvent, JobConfig, JobError, JobReport};
use super::plan::{Plan, SubtaskId};
use super::runner::{self, Command, Inbox, Reporter, TaskExit};
use super::stage::ChainSnapshot;
use crossbeam_channel::{Receiver, Select, Sender};
use std::collections::HashMap;
use std::time::Duration;

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
        let mut commands: HashMap<SubtaskId, Sender<Command>> = HashMap::new();
        let mut threads = Vec::new();
        for id in plan.subtasks() {
            let outputs: Vec<Sender<ChannelMsg>> = plan
                .outputs_of(id)
                .into_iter()
                .map(|c| senders[c].clone())
                .collect();
            let inputs: Vec<Receiver<ChannelMsg>> = plan
                .inputs_of(id)
                .into_iter()
                .filter_map(|c| receivers[c].take())
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
            let head = {
                TaskContext {
                    subtask: id.subtask,
                    parallelism,
                    generation,
                    restored_epoch,
                }
                .enter();
                let outbox = move || -> Box<dyn Outbox> {
                    Box::new(LocalOutbox {
                        senders: outputs.clone(),
                    })
                };
                plan_ref.build(id, &outbox)
            };
            let inbox: Option<Box<dyn Inbox>> = if inputs.is_empty() {
                None
            } else {
                Some(Box::new(LocalInbox { receivers: inputs }))
            };
            let thread = std::thread::Builder::new()
                .name(format!("braid-{id}"))
                .spawn(move || {
                    TaskContext {
                        subtask: id.subtask,
                        parallelism,
                        generation,
                        restored_epoch,
                    }
                    .enter();
                    let mut head = head;
                    let mut reporter = LocalReporter {
                        id,
                        commands: cmd_rx,
                        events: events.clone(),
                    };
                    if let Some((states, offset)) = restored {
                        if let Err(e) = runner::restore(&mut head, &states, offset.as_deref()) {
                            let _ = events.send(CoordinatorEvent::Failed(id, e.to_string()));
                            return;
                        }
                    }
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runner::run(head, inbox, &mut reporter, pace)
                    }));
                    let event = match outcome {
                        Ok(Ok(TaskExit::Finished)) => return,
                        Ok(Ok(TaskExit::Stopped)) => return,
                        Ok(Err(e)) => CoordinatorEvent::Failed(id, e.to_string()),
                        Err(_) => CoordinatorEvent::Failed(id, "panicked".into()),
                    };
                    let _ = events.send(event);
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = events_tx.send(CoordinatorEvent::Failed(id, e.to_string()));
                }
            }
        }
        drop(senders);
        drop(events_tx);
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
        for t in threads {
            let _ = t.join();
        }
        match outcome {
            Ok(Some(report)) => return Ok(report),
            Ok(None) => continue,
            Err(e) => return Err(e),
        }
    }
}

struct LocalOutbox {
    senders: Vec<Sender<ChannelMsg>>,
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
}

struct LocalInbox {
    receivers: Vec<Receiver<ChannelMsg>>,
}

impl Inbox for LocalInbox {
    fn recv(
        &mut self,
        blocked: &[bool],
        timeout: Duration,
    ) -> Result<Option<(usize, ChannelMsg)>, ChannelError> {
        recv_unblocked(&self.receivers, blocked, timeout)
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
