//! Runs a plan on a braid cluster: every subtask is a [`SubtaskHost`]
//! actor in a worker process; the driver runs the coordinator.
//!
//! * **Jobs** are built by a function registered with [`stream_job!`](crate::stream_job),
//!   so every process of the job's binary can rebuild the same graph from
//!   the job's name and parameters, and a host picks out its subtask.
//! * **Channels** between hosts on one machine (one store) are rings in
//!   the receiver's [mailbox](super::mailbox::Receiver), written and read by the
//!   two subtasks' own threads. Between machines they are actor calls:
//!   an upstream host calls `deliver(slot, seq, message)` on the
//!   downstream host, answered once the downstream subtask has taken the
//!   message off its queue; sequence numbers put messages back in channel
//!   order, since calls to an async actor may start out of order. Either
//!   way an upstream keeps at most `credits` messages (and `credit_bytes`
//!   of batches in the store or the receiver's arena) not yet taken per
//!   channel, so a slow consumer slows its producers and queues stay
//!   bounded. A columnar batch for a receiver on this machine is built in
//!   place in the receiver's mailbox arena, and read in place from it.
//! * **Snapshots** are encoded and written to checkpoint storage by the
//!   host that took them; the driver hears of the stored handle.
//! * **Failures**: the driver long-polls every host for events; a host's
//!   process dying fails that call with `ActorDied`, which fails the
//!   attempt. The driver then kills every host of that generation and
//!   starts the next one from the newest valid checkpoint. A host of an
//!   old generation that is still running cannot publish anything: its
//!   sink is fenced, and the coordinator ignores its acknowledgements.

use super::channel::{ArrowBatch, ChannelMsg, Outbox};
use super::context::TaskContext;
use super::coordinator::{
    Coordinator, CoordinatorEvent, JobConfig, JobError, JobReport, Restored,
    DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_CHECKPOINT_TIMEOUT, DEFAULT_CREDITS, DEFAULT_CREDIT_BYTES,
    DEFAULT_RESOURCE_WAIT,
};
use super::edges::{ChannelCounts, Meters};
use super::failure::{AttemptFailure, ChannelError, TaskError};
use super::graph::StreamEnv;
use super::mailbox;

mod call_server;
mod channels;
mod peers;

use super::plan::{Plan, SubtaskId};
use super::restart::RestartStrategy;
use super::runner::{self, Command, Inbox, Reporter, SourcePace, TaskExit};
use super::service::{CallError, Peers};
use super::stage::ChainSnapshot;
use crate::checkpoint::storage::{CheckpointStorage, Epoch, StateHandle};
use braid::{Runtime, TypedHandle};
use channels::{ActorOutbox, HostInbox, ViewBytes};
pub use channels::{ChannelTarget, Delivery, STORE_BATCH_BYTES};
use parking_lot::Mutex;
pub use peers::{HostMailboxes, PeerHost};
use peers::{HostPeers, SERVICE_WAIT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Parameters a job's build function reads (sizes, paths, rates).
pub type JobParams = BTreeMap<String, String>;

/// A registered job: its name and the function building its graph.
pub struct JobEntry {
    /// The name [`run`] is given.
    pub name: &'static str,
    /// Builds the graph from the job's parameters.
    pub build: fn(&JobParams) -> StreamEnv,
}

/// Every job registered with [`stream_job!`](crate::stream_job) in this
/// binary.
#[braid::__private::linkme::distributed_slice]
#[linkme(crate = braid::__private::linkme)]
pub static STREAM_JOBS: [JobEntry];

/// Registers a job's build function under a name, so that workers can
/// rebuild its graph.
///
/// ```ignore
/// fn wordcount(params: &JobParams) -> StreamEnv { ... }
/// braid_actors::stream_job!(WORDCOUNT, "wordcount", wordcount);
/// ```
#[macro_export]
macro_rules! stream_job {
    ($static_name:ident, $name:expr, $build:path) => {
        #[$crate::braid::__private::linkme::distributed_slice($crate::stream::cluster::STREAM_JOBS)]
        #[linkme(crate = $crate::braid::__private::linkme)]
        static $static_name: $crate::stream::cluster::JobEntry =
            $crate::stream::cluster::JobEntry {
                name: $name,
                build: $build,
            };
    };
}

fn plan_of(job: &str, params: &JobParams) -> Result<Plan, String> {
    let entry = STREAM_JOBS
        .iter()
        .find(|e| e.name == job)
        .ok_or_else(|| format!("no stream job named {job:?} is registered in this binary"))?;
    Ok(Plan::new((entry.build)(params).into_graph()))
}

/// Where checkpoints of a cluster job go: a directory every node can
/// reach (on one machine, any local directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageSpec {
    /// The directory.
    pub dir: std::path::PathBuf,
    /// The job's name in it.
    pub job: String,
    /// Checkpoints kept.
    pub retain: usize,
}

impl StorageSpec {
    fn open(&self) -> Result<CheckpointStorage, String> {
        CheckpointStorage::local(&self.dir, &self.job, self.retain).map_err(|e| e.to_string())
    }
}

/// How a host is set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSpec {
    /// The registered job.
    pub job: String,
    /// Its parameters.
    pub params: JobParams,
    /// Which task.
    pub task: usize,
    /// Which subtask of it.
    pub subtask: usize,
    /// The attempt.
    pub generation: u64,
    /// The checkpoint epoch the attempt restored (0: fresh).
    pub restored_epoch: u64,
    /// Checkpoint storage.
    pub storage: StorageSpec,
    /// Records per source poll.
    pub batch: usize,
    /// Source records per second per subtask, if throttled.
    pub rate: Option<f64>,
    /// Messages not yet taken per output channel.
    pub credits: usize,
    /// Batch bytes (in the store or a mailbox arena) not yet taken per
    /// output channel.
    pub credit_bytes: usize,
}

/// What a host reports to the driver.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostEvent {
    /// State of an epoch stored.
    Stored(u64, StateHandle),
    /// A source read all its input.
    Exhausted,
    /// The subtask finished; what its ends of each channel counted.
    Finished(Finished),
    /// The subtask failed, or storing its snapshot did.
    Failed(AttemptFailure),
}

type SlotReceiver = crossbeam_channel::Receiver<(u64, ChannelMsg)>;

/// Called with an attempt's generation and its hosts' process ids.
pub type OnRunning = Arc<dyn Fn(u64, Vec<u32>) + Send + Sync>;

struct Slot {
    next: u64,
    reorder: BTreeMap<u64, ChannelMsg>,
    tx: crossbeam_channel::Sender<(u64, ChannelMsg)>,
    consumed: tokio::sync::watch::Sender<u64>,
}

struct Shared {
    spec: HostSpec,
    slots: Mutex<Vec<Slot>>,
    receivers: Mutex<Option<Vec<SlotReceiver>>>,
    consumed_rx: Vec<tokio::sync::watch::Receiver<u64>>,
    events: Mutex<Vec<HostEvent>>,
    events_ready: tokio::sync::Notify,
    commands: crossbeam_channel::Sender<Command>,
    command_rx: Mutex<Option<crossbeam_channel::Receiver<Command>>>,
    targets: Mutex<Vec<ChannelTarget>>,
    peers: Mutex<HashMap<(String, usize), PeerHost>>,
    /// The job's checkpoint storage, or why it cannot be opened here (a
    /// snapshot then fails the attempt, rather than going nowhere).
    storage: Result<CheckpointStorage, String>,
    /// The plan channel of each input slot.
    inputs: Vec<usize>,
    /// What this subtask's ends of its channels counted.
    meters: Meters,
    /// The rings senders on this machine write this subtask's inputs to,
    /// taken by its thread when it starts.
    mailbox: Mutex<Option<mailbox::Receiver>>,
    /// Where peers find this host's mailboxes.
    mailboxes: HostMailboxes,
    /// Answers calls from peers on this machine, once it knows them;
    /// taken by the subtask's thread or a thread of its own.
    call_server: Mutex<Option<call_server::CallServer>>,
    /// Answers to this subtask's calls, taken by its peers.
    replies: Mutex<Option<mailbox::Receiver>>,
    /// This subtask's number among the plan's subtasks.
    index: usize,
    /// Wakes the subtask's thread when it waits on its mailbox.
    doorbell: Option<mailbox::Doorbell>,
}

impl Shared {
    fn push_event(&self, event: HostEvent) {
        self.events.lock().push(event);
        self.events_ready.notify_one();
    }

    /// Fails the attempt: an input of this subtask is broken.
    fn fail(&self, error: ChannelError) {
        self.push_event(HostEvent::Failed(AttemptFailure::Subtask {
            subtask: format!("{}-{}", self.spec.task, self.spec.subtask),
            error: TaskError::Channel(error),
        }));
    }
}

/// What a host hands the driver when its subtask finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    /// What its input channels carried.
    pub counts: Vec<ChannelCounts>,
    /// What its subtask handed back ([`super::results`]).
    pub results: super::results::JobResults,
    /// CPU seconds its process had used, if the system says.
    pub cpu_seconds: Option<f64>,
}

/// CPU seconds (user and system) this process has used, from
/// `/proc/self/stat` (Linux reports them in 1/100 s ticks).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// One subtask of a stream job, hosted in a worker process.
#[braid::actor]
pub struct SubtaskHost {
    shared: Arc<Shared>,
}

#[braid::actor]
impl SubtaskHost {
    fn new(spec: HostSpec) -> Self {
        let plan = plan_of(&spec.job, &spec.params);
        let id = SubtaskId {
            task: spec.task,
            subtask: spec.subtask,
        };
        let (inputs, meters, subtasks) = match &plan {
            Ok(p) => (p.inputs_of(id), Meters::new(p.channels.len()), p.subtasks()),
            Err(_) => (Vec::new(), Meters::default(), Vec::new()),
        };
        let index = subtasks.iter().position(|s| *s == id).unwrap_or(0);
        let mut slots = Vec::new();
        let mut receivers = Vec::new();
        let mut consumed_rx = Vec::new();
        for _ in 0..inputs.len() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let (consumed, watch_rx) = tokio::sync::watch::channel(0u64);
            slots.push(Slot {
                next: 0,
                reorder: BTreeMap::new(),
                tx,
                consumed,
            });
            receivers.push(rx);
            consumed_rx.push(watch_rx);
        }
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let storage = spec.storage.open();
        let create = |slots: usize, what: &str| {
            if slots == 0 {
                return None;
            }
            mailbox::Receiver::create(slots)
                .map_err(|e| tracing::warn!("{id}: no mailbox for {what}, they go by calls: {e}"))
                .ok()
        };
        let mailbox = create(inputs.len() + subtasks.len(), "inputs and calls");
        let replies = create(subtasks.len(), "answers");
        let mailboxes = HostMailboxes {
            inputs: mailbox.as_ref().map(|m| m.addr()),
            calls: mailbox.as_ref().map(|m| (m.addr(), inputs.len())),
            replies: replies.as_ref().map(|m| m.addr()),
        };
        let doorbell = mailbox.as_ref().and_then(|m| m.doorbell().ok());
        SubtaskHost {
            shared: Arc::new(Shared {
                spec,
                slots: Mutex::new(slots),
                receivers: Mutex::new(Some(receivers)),
                consumed_rx,
                events: Mutex::new(Vec::new()),
                events_ready: tokio::sync::Notify::new(),
                commands,
                command_rx: Mutex::new(Some(command_rx)),
                targets: Mutex::new(Vec::new()),
                peers: Mutex::new(HashMap::new()),
                storage,
                inputs,
                meters,
                mailbox: Mutex::new(mailbox),
                mailboxes,
                call_server: Mutex::new(None),
                replies: Mutex::new(replies),
                index,
                doorbell,
            }),
        }
    }

    /// Where this host's process sits on its node's store: senders on the
    /// same node lend it their batches there.
    fn seat(&self) -> Result<braid::store::StoreSeat, String> {
        braid::current()
            .map(|rt| rt.store_seat())
            .map_err(|e| e.to_string())
    }

    /// Where senders and callers on this machine find this host's
    /// mailboxes.
    fn mailboxes(&self) -> HostMailboxes {
        self.shared.mailboxes
    }

    /// Where this subtask's output channels lead, per channel.
    fn connect(&self, targets: Vec<ChannelTarget>) -> bool {
        *self.shared.targets.lock() = targets;
        true
    }

    /// Every subtask of the attempt, by its task's head vertex and its
    /// index: whose services this subtask may call.
    fn peers(&self, peers: Vec<PeerHost>) -> bool {
        let server = call_server::CallServer::new(
            self.shared.inputs.len(),
            self.shared.index,
            peers.clone(),
        );
        if self.shared.inputs.is_empty() {
            if let Some(mailbox) = self.shared.mailbox.lock().take() {
                if let Err(e) = server.spawn(mailbox, Arc::downgrade(&self.shared)) {
                    tracing::warn!("no call server, calls to this host fail: {e}");
                }
            }
        } else {
            *self.shared.call_server.lock() = Some(server);
        }
        *self.shared.peers.lock() = peers
            .into_iter()
            .map(|p| ((p.task.clone(), p.subtask), p))
            .collect();
        true
    }

    /// Calls service `service` offered in this host's process (one that
    /// may block runs on the blocking pool, so it holds up no other call).
    async fn call(&self, service: String, request: Vec<u8>) -> Result<Vec<u8>, String> {
        if let Some(offered) = super::service::find(&service).filter(|s| !s.may_block()) {
            return offered
                .call(&request)
                .map_err(|e| CallError::Failed(service, e).to_string());
        }
        let name = service.clone();
        tokio::task::spawn_blocking(move || {
            super::service::call_local(&service, &request, SERVICE_WAIT).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("service {name:?} panicked: {e}"))?
    }

    /// Builds the subtask, restores it, and starts its thread.
    fn start(&self, restored: Option<Restored>) -> Result<(), AttemptFailure> {
        let spec = &self.shared.spec;
        let id = SubtaskId {
            task: spec.task,
            subtask: spec.subtask,
        };
        let lost = |cause: String| AttemptFailure::Lost {
            subtask: id.to_string(),
            cause,
        };
        let plan = plan_of(&spec.job, &spec.params).map_err(lost)?;
        let parallelism = plan.tasks.get(spec.task).map_or(1, |t| t.parallelism);
        let context = TaskContext {
            subtask: spec.subtask,
            parallelism,
            generation: spec.generation,
            restored_epoch: spec.restored_epoch,
        };
        context.enter();
        let task_name = plan
            .tasks
            .get(spec.task)
            .map_or_else(|| spec.task.to_string(), |t| t.name.clone());
        let meter = super::metrics::enter(
            &spec.storage.job,
            (&task_name, spec.task),
            spec.subtask,
            spec.generation,
        );
        let rt = braid::current().map_err(|e| lost(e.to_string()))?;
        let channels = plan
            .outputs_of(id)
            .into_iter()
            .filter_map(|c| {
                let (head, subtask) = plan.channels.get(c)?.to;
                let task = plan.tasks.iter().find(|t| t.head == head)?;
                Some(((task.head_name.clone(), subtask), c))
            })
            .collect();
        let peers: Arc<dyn Peers> = Arc::new(HostPeers::new(
            rt.clone(),
            self.shared.peers.lock().clone(),
            channels,
            self.shared.meters.clone(),
            self.shared.index,
            self.shared.replies.lock().take(),
        ));
        super::service::enter(peers.clone());
        let targets = self.shared.targets.lock().clone();
        let outputs = plan.outputs_of(id);
        let (credits, credit_bytes) = (spec.credits.max(1), spec.credit_bytes);
        let meters = self.shared.meters.clone();
        let inbox_rt = rt.clone();
        let outbox = move || -> Box<dyn Outbox> {
            Box::new(ActorOutbox::new(
                rt.clone(),
                targets.clone(),
                (credits, credit_bytes),
                outputs.clone(),
                meters.clone(),
            ))
        };
        let mut head = plan.build(id, &outbox);
        if let Some((states, offset)) = restored {
            runner::restore(&mut head, &states, offset.as_deref()).map_err(|error| {
                AttemptFailure::Subtask {
                    subtask: id.to_string(),
                    error,
                }
            })?;
        }
        let started = || lost("the subtask was already started".into());
        let receivers = self.shared.receivers.lock().take().ok_or_else(started)?;
        let command_rx = self.shared.command_rx.lock().take().ok_or_else(started)?;
        let inbox: Option<Box<dyn Inbox>> = if receivers.is_empty() {
            None
        } else {
            let mailbox = self.shared.mailbox.lock().take();
            let server = self.shared.call_server.lock().take();
            Some(Box::new(HostInbox::new(
                self.shared.clone(),
                receivers,
                mailbox,
                server,
                inbox_rt,
            )))
        };
        let shared = self.shared.clone();
        let pace = SourcePace {
            batch: spec.batch.max(1),
            rate: spec.rate,
        };
        std::thread::Builder::new()
            .name(format!("braid-{id}"))
            .spawn(move || {
                context.enter();
                super::metrics::enter(
                    &meter.job,
                    (&meter.task, meter.task_index),
                    meter.subtask,
                    meter.generation,
                );
                super::service::enter(peers);
                let mut reporter = HostReporter {
                    shared: shared.clone(),
                    commands: command_rx,
                    id,
                };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runner::run(head, inbox, &mut reporter, pace)
                }));
                match outcome {
                    Ok(Ok(TaskExit::Finished)) | Ok(Ok(TaskExit::Stopped)) => {}
                    Ok(Err(error)) => {
                        shared.push_event(HostEvent::Failed(AttemptFailure::Subtask {
                            subtask: id.to_string(),
                            error,
                        }))
                    }
                    Err(panic) => shared.push_event(HostEvent::Failed(AttemptFailure::Lost {
                        subtask: id.to_string(),
                        cause: format!("panicked: {}", super::local::panic_message(&panic)),
                    })),
                }
            })
            .map_err(|e| lost(format!("cannot start its thread: {e}")))?;
        Ok(())
    }

    /// A message on input slot `slot`; answered once the subtask took it.
    async fn deliver(&self, slot: usize, seq: u64, delivery: Delivery) -> bool {
        let msg = match delivery {
            Delivery::Inline(ChannelMsg::Columnar(stored)) => {
                let Ok(rt) = braid::current() else {
                    return false;
                };
                match rt.get_batch_lent(&stored.object).await {
                    Ok(batch) => ChannelMsg::Arrow(ArrowBatch(batch)),
                    Err(e) => {
                        self.shared.fail(ChannelError::Store(format!(
                            "a columnar batch cannot be read: {e}"
                        )));
                        return false;
                    }
                }
            }
            Delivery::Inline(msg) => msg,
            Delivery::Stored(batch) => {
                let Ok(rt) = braid::current() else {
                    return false;
                };
                match rt.get_array(&batch).await {
                    Ok(view) => {
                        ChannelMsg::Shared(super::channel::SharedBatch(Arc::new(ViewBytes(view))))
                    }
                    Err(e) => {
                        self.shared
                            .fail(ChannelError::Decode(format!("a stored batch is lost: {e}")));
                        return false;
                    }
                }
            }
        };
        {
            let mut slots = self.shared.slots.lock();
            let Some(s) = slots.get_mut(slot) else {
                return false;
            };
            s.reorder.insert(seq, msg);
            while let Some(next) = s.reorder.remove(&s.next) {
                if s.tx.send((s.next, next)).is_err() {
                    return false;
                }
                s.next += 1;
            }
        }
        if let Some(doorbell) = &self.shared.doorbell {
            doorbell.ring();
        }
        let Some(consumed) = self.shared.consumed_rx.get(slot) else {
            return false;
        };
        let mut consumed = consumed.clone();
        let taken = consumed.wait_for(|c| *c > seq).await.is_ok();
        taken
    }

    /// A command from the coordinator.
    fn command(&self, command: WireCommand) -> bool {
        let sent = self.shared.commands.send(command.into()).is_ok();
        if let Some(doorbell) = &self.shared.doorbell {
            doorbell.ring();
        }
        sent
    }

    /// Waits up to a second for events, and returns them.
    async fn events(&self) -> Vec<HostEvent> {
        loop {
            let notified = self.shared.events_ready.notified();
            {
                let mut events = self.shared.events.lock();
                if !events.is_empty() {
                    return std::mem::take(&mut *events);
                }
            }
            if tokio::time::timeout(Duration::from_secs(1), notified)
                .await
                .is_err()
            {
                return Vec::new();
            }
        }
    }

    /// The worker's process id (for tests and chaos runs).
    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The node the host runs on.
    fn node(&self) -> String {
        braid::current()
            .map(|rt| rt.node_id().to_string())
            .unwrap_or_default()
    }
}

/// The name of the host of subtask `subtask` of task `task` (its head
/// vertex's name) of the cluster job checkpointed as `job`
/// ([`StorageSpec::job`]): hosts are named so that any process of the
/// cluster can find them and call the services their subtasks offer
/// ([`JobServices`]).
pub fn host_name(job: &str, task: &str, subtask: usize) -> String {
    format!("{job}/{task}/{subtask}")
}

/// The services a running cluster job's subtasks offer, as any process of
/// the cluster calls them (the driver, a worker, another driver): a
/// serving subtask's predictions, an evaluation's figures.
///
/// A call finds the subtask's host by its name ([`host_name`]) and calls
/// it; when the host died (the job is recovering), it looks the name up
/// again and calls the new generation's host, until the call's deadline.
pub struct JobServices {
    rt: Runtime,
    job: String,
    hosts: Mutex<HashMap<(String, usize), SubtaskHostHandle>>,
}

impl JobServices {
    /// The services of the cluster job checkpointed as `job`.
    pub fn new(rt: &Runtime, job: impl Into<String>) -> Self {
        JobServices {
            rt: rt.clone(),
            job: job.into(),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Calls service `service` of subtask `subtask` of task `task`,
    /// giving up after `wait` (the job not running yet, or its hosts
    /// gone for good).
    pub fn call(
        &self,
        task: &str,
        subtask: usize,
        service: &str,
        request: &[u8],
        wait: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let deadline = std::time::Instant::now() + wait;
        let key = (task.to_string(), subtask);
        let name = host_name(&self.job, task, subtask);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let why = match self.host(&key, &name, left) {
                Ok(host) => {
                    let call = host.call(service.to_string(), request.to_vec());
                    let answer = self
                        .rt
                        .block_on(async move { tokio::time::timeout(left, call).await });
                    match answer {
                        Ok(Ok(answer)) => {
                            self.hosts.lock().insert(key, host);
                            return Ok(answer);
                        }
                        Ok(Err(e)) => match e.downcast::<String>() {
                            // The service itself answered with an error.
                            Some(why) => return Err(CallError::Failed(service.to_string(), why)),
                            None => {
                                self.hosts.lock().remove(&key);
                                e.to_string()
                            }
                        },
                        Err(_) => format!("no answer within {} ms", wait.as_millis()),
                    }
                }
                Err(why) => why,
            };
            if std::time::Instant::now() >= deadline {
                return Err(CallError::Unreachable(format!("{name}: {service}"), why));
            }
            std::thread::sleep(JOB_SERVICES_RETRY.min(left));
        }
    }
}

impl JobServices {
    fn host(
        &self,
        key: &(String, usize),
        name: &str,
        wait: Duration,
    ) -> Result<SubtaskHostHandle, String> {
        if let Some(host) = self.hosts.lock().get(key).cloned() {
            return Ok(host);
        }
        let rt = self.rt.clone();
        let name = name.to_string();
        self.rt.block_on(async move {
            match tokio::time::timeout(wait, rt.get_actor::<SubtaskHostHandle>(&name)).await {
                Ok(found) => found.map_err(|e| e.to_string()),
                Err(_) => Err("the lookup timed out".to_string()),
            }
        })
    }

    /// The process id of the host of subtask `subtask` of task `task` in
    /// the running attempt (chaos runs pick their victims with it).
    pub fn pid(&self, task: &str, subtask: usize, wait: Duration) -> Result<u32, CallError> {
        let key = (task.to_string(), subtask);
        let name = host_name(&self.job, task, subtask);
        let unreachable = |why: String| CallError::Unreachable(name.clone(), why);
        let host = self.host(&key, &name, wait).map_err(unreachable)?;
        self.rt
            .block_on(async move {
                match tokio::time::timeout(wait, host.pid()).await {
                    Ok(pid) => pid.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", wait.as_millis())),
                }
            })
            .map_err(unreachable)
    }
}

/// How long [`JobServices::call`] waits before looking a host up again
/// (a recovery kills the old generation's hosts before it names new ones).
const JOB_SERVICES_RETRY: Duration = Duration::from_millis(20);

/// [`Command`] on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum WireCommand {
    /// See [`Command::Trigger`].
    Trigger(u64),
    /// See [`Command::Complete`].
    Complete(u64),
    /// See [`Command::Finish`].
    Finish,
    /// See [`Command::Stop`].
    Stop,
}

impl From<WireCommand> for Command {
    fn from(c: WireCommand) -> Command {
        match c {
            WireCommand::Trigger(e) => Command::Trigger(e),
            WireCommand::Complete(e) => Command::Complete(e),
            WireCommand::Finish => Command::Finish,
            WireCommand::Stop => Command::Stop,
        }
    }
}

impl From<Command> for WireCommand {
    fn from(c: Command) -> WireCommand {
        match c {
            Command::Trigger(e) => WireCommand::Trigger(e),
            Command::Complete(e) => WireCommand::Complete(e),
            Command::Finish => WireCommand::Finish,
            Command::Stop => WireCommand::Stop,
        }
    }
}

struct HostReporter {
    shared: Arc<Shared>,
    commands: crossbeam_channel::Receiver<Command>,
    id: SubtaskId,
}

impl Reporter for HostReporter {
    fn snapshot_taken(&mut self, epoch: u64, states: ChainSnapshot, offset: Option<Vec<u8>>) {
        let shared = self.shared.clone();
        let id = self.id;
        let generation = shared.spec.generation;
        let storage_failed = move |cause: String| {
            HostEvent::Failed(AttemptFailure::Storage {
                epoch,
                cause: format!("{id}: {cause}"),
            })
        };
        let Ok(rt) = braid::current() else {
            shared.push_event(storage_failed("no runtime".into()));
            return;
        };
        rt.spawn(async move {
            let encoded = tokio::task::spawn_blocking(move || {
                super::coordinator::encode_subtask(states, offset)
            })
            .await;
            let bytes = match encoded {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    shared.push_event(HostEvent::Failed(AttemptFailure::Subtask {
                        subtask: id.to_string(),
                        error: TaskError::State(e),
                    }));
                    return;
                }
                Err(e) => {
                    shared.push_event(storage_failed(format!("encoding panicked: {e}")));
                    return;
                }
            };
            let stored = match &shared.storage {
                Ok(storage) => storage
                    .write_state(Epoch(epoch), generation, &id.to_string(), bytes)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            match stored {
                Ok(handle) => shared.push_event(HostEvent::Stored(epoch, handle)),
                Err(e) => shared.push_event(storage_failed(e)),
            }
        });
    }

    fn exhausted(&mut self) {
        self.shared.push_event(HostEvent::Exhausted);
    }

    fn finished(&mut self) {
        self.shared.push_event(HostEvent::Finished(Finished {
            counts: self.shared.meters.counts(),
            results: super::results::take(),
            cpu_seconds: process_cpu_seconds(),
        }));
    }

    fn command(&mut self, timeout: Duration) -> Option<Command> {
        if timeout.is_zero() {
            self.commands.try_recv().ok()
        } else {
            self.commands.recv_timeout(timeout).ok()
        }
    }
}

/// How a job runs on the cluster. [`ClusterJob::new`] fills in defaults.
pub struct ClusterJob {
    /// The registered job's name.
    pub job: String,
    /// Its parameters.
    pub params: JobParams,
    /// Checkpoint storage (a directory every node reaches).
    pub storage: StorageSpec,
    /// Time between checkpoints.
    pub checkpoint_interval: Duration,
    /// A checkpoint not completed this long after its barrier fails the
    /// attempt.
    pub checkpoint_timeout: Duration,
    /// When failed attempts restart, and when the job gives up.
    pub restart: RestartStrategy,
    /// How long attempts may fail to be placed (no node can host the
    /// subtasks, or the head is gone) before the job fails.
    pub resource_wait: Duration,
    /// Source pace.
    pub pace: SourcePace,
    /// Messages not yet taken per channel.
    pub credits: usize,
    /// Batch bytes not yet taken per channel (columnar batches in the
    /// store or a mailbox arena, large encoded ones) before the sender
    /// waits.
    pub credit_bytes: usize,
    /// Called with every host's process id once an attempt is running
    /// (chaos runs pick their victims from these).
    pub on_running: Option<OnRunning>,
    /// Spread the subtasks over every live node round robin (each task's
    /// subtask `i` on node `i mod n`), instead of leaving placement to the
    /// scheduler (which packs them on the driver's node while it fits).
    pub spread: bool,
    /// How many nodes the last attempt's hosts ran on (filled in when
    /// `spread` is set).
    pub nodes_used: Arc<Mutex<usize>>,
    /// Resources the hosts of a task ask for, by the name of the task's
    /// head operator (as Ray places an actor by its resources): with
    /// custom resources on nodes, this puts a task's subtasks on the nodes
    /// that offer them, e.g. a training job's shards on other hosts than
    /// its workers.
    pub task_resources: BTreeMap<String, braid::Resources>,
    /// Where the last attempt's hosts ran: per task (by the name of its
    /// head operator), the node of each subtask.
    pub placement: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl ClusterJob {
    /// Job `job` with `params`, checkpointed to `storage`, with the
    /// defaults of [`JobConfig::new`]: checkpoints every second, the
    /// default restart strategy, 8 s of waiting for resources, 8 credits
    /// and 32 MiB of store bytes in flight per channel,
    /// unthrottled sources, placement left to the scheduler.
    pub fn new(job: impl Into<String>, params: JobParams, storage: StorageSpec) -> Self {
        ClusterJob {
            job: job.into(),
            params,
            storage,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_timeout: DEFAULT_CHECKPOINT_TIMEOUT,
            restart: RestartStrategy::default(),
            resource_wait: DEFAULT_RESOURCE_WAIT,
            pace: SourcePace::default(),
            credits: DEFAULT_CREDITS,
            credit_bytes: DEFAULT_CREDIT_BYTES,
            on_running: None,
            spread: false,
            nodes_used: Arc::default(),
            task_resources: Default::default(),
            placement: Default::default(),
        }
    }
}

/// Runs a registered job on the cluster `rt` belongs to, from the driver.
///
/// A failed attempt (a subtask's error, a host's process dying) is
/// restarted from the last completed checkpoint as `job.restart` says; an
/// attempt that cannot be placed is tried again for up to
/// `job.resource_wait`, then the job fails with [`JobError::NoResources`].
pub fn run(rt: &Runtime, job: ClusterJob) -> Result<JobReport, JobError> {
    let plan = plan_of(&job.job, &job.params).map_err(JobError::UnknownJob)?;
    let storage = job.storage.open().map_err(JobError::Runtime)?;
    let mut config = JobConfig::new(storage);
    config.checkpoint_interval = job.checkpoint_interval;
    config.checkpoint_timeout = job.checkpoint_timeout;
    config.restart = job.restart.clone();
    config.resource_wait = job.resource_wait;
    config.pace = job.pace;
    config.credits = job.credits;
    config.credit_bytes = job.credit_bytes;
    let mut coordinator = Coordinator::new(&plan, config)?;
    loop {
        let attempt = coordinator.begin_attempt()?;
        let generation = attempt.generation;
        let tried_at = std::time::Instant::now();
        let spawned = spawn_hosts(rt, &plan, &job, generation, attempt.restored_epoch);
        let hosts = match spawned {
            Ok(h) => h,
            Err(why) => {
                coordinator.note_placement_failure(why, tried_at)?;
                continue;
            }
        };
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let started = start_hosts(rt, &plan, &hosts, &attempt);
        if let Err(failure) = started {
            kill_hosts(rt, &hosts);
            coordinator.note_failure(failure)?;
            continue;
        }
        let nodes: HashMap<SubtaskId, String> = hosts
            .iter()
            .filter_map(|(id, h)| Some((*id, bounded(rt, CONTROL_WAIT, h.node()).ok()?)))
            .collect();
        {
            let mut placement = BTreeMap::<String, Vec<String>>::new();
            let mut ids: Vec<&SubtaskId> = nodes.keys().collect();
            ids.sort_by_key(|id| (id.task, id.subtask));
            for id in ids {
                let head = plan.tasks.get(id.task).map(|t| t.head_name.clone());
                if let (Some(head), Some(node)) = (head, nodes.get(id)) {
                    placement.entry(head).or_default().push(node.clone());
                }
            }
            *job.placement.lock() = placement;
        }
        if job.spread {
            let used: std::collections::BTreeSet<&String> = nodes.values().collect();
            tracing::info!("generation {generation} runs on {} nodes", used.len());
            *job.nodes_used.lock() = used.len();
        }
        if let Some(on_running) = &job.on_running {
            let pids: Vec<u32> = hosts
                .values()
                .filter_map(|h| bounded(rt, CONTROL_WAIT, h.pid()).ok())
                .collect();
            on_running(generation, pids);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts: Arc<Mutex<Vec<ChannelCounts>>> = Arc::default();
        let results: Arc<Mutex<super::results::JobResults>> = Arc::default();
        let cpu: Arc<Mutex<f64>> = Arc::default();
        for (&id, host) in &hosts {
            let host = host.clone();
            let tx = events_tx.clone();
            let stop = stop.clone();
            let counts = counts.clone();
            let results = results.clone();
            let cpu = cpu.clone();
            rt.spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    match host.events().await {
                        Ok(events) => {
                            for event in events {
                                let event = match event {
                                    HostEvent::Stored(epoch, handle) => {
                                        CoordinatorEvent::Stored { id, epoch, handle }
                                    }
                                    HostEvent::Failed(failure) => CoordinatorEvent::Failed(failure),
                                    HostEvent::Exhausted => CoordinatorEvent::Exhausted(id),
                                    HostEvent::Finished(f) => {
                                        counts.lock().extend(f.counts);
                                        results.lock().extend(f.results);
                                        *cpu.lock() += f.cpu_seconds.unwrap_or(0.0);
                                        CoordinatorEvent::Finished(id)
                                    }
                                };
                                if tx.send(event).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(CoordinatorEvent::Failed(AttemptFailure::Lost {
                                subtask: id.to_string(),
                                cause: e.to_string(),
                            }));
                            return;
                        }
                    }
                }
            });
        }
        watch_nodes(rt, nodes, events_tx.clone(), stop.clone());
        drop(events_tx);
        let rt2 = rt.clone();
        let hosts2 = hosts.clone();
        let outcome = coordinator.drive(&attempt, &events_rx, &move |id, command| {
            if let Some(host) = hosts2.get(&id) {
                let call = host.command(WireCommand::from(command));
                rt2.spawn(call);
            }
        });
        stop.store(true, std::sync::atomic::Ordering::Release);
        kill_hosts(rt, &hosts);
        match outcome {
            Ok(Some(mut report)) => {
                report.edges = plan.edge_stats(&counts.lock());
                report.results = std::mem::take(&mut *results.lock());
                report.hosts_cpu_seconds = Some(*cpu.lock());
                return Ok(report);
            }
            Ok(None) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn spawn_hosts(
    rt: &Runtime,
    plan: &Plan,
    job: &ClusterJob,
    generation: u64,
    restored_epoch: u64,
) -> Result<HashMap<SubtaskId, SubtaskHostHandle>, String> {
    let nodes: Vec<braid::NodeId> = if job.spread {
        let rt2 = rt.clone();
        let mut nodes: Vec<braid::NodeId> = rt
            .block_on(async move { rt2.nodes().await })
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|n| n.alive)
            .map(|n| n.info.node_id)
            .collect();
        nodes.sort();
        nodes
    } else {
        Vec::new()
    };
    let mut builders = Vec::new();
    for id in plan.subtasks() {
        let spec = HostSpec {
            job: job.job.clone(),
            params: job.params.clone(),
            task: id.task,
            subtask: id.subtask,
            generation,
            restored_epoch,
            storage: job.storage.clone(),
            batch: job.pace.batch,
            rate: job.pace.rate,
            credits: job.credits,
            credit_bytes: job.credit_bytes,
        };
        let mut builder = SubtaskHost::remote(rt, spec).max_concurrency(4096);
        // A head name two tasks share finds neither: such hosts stay unnamed.
        let head = plan.tasks.get(id.task).map(|t| t.head_name.as_str());
        if let Some(head) =
            head.filter(|h| plan.tasks.iter().filter(|t| t.head_name == *h).count() == 1)
        {
            builder = builder.name(host_name(&job.storage.job, head, id.subtask));
        }
        if !nodes.is_empty() {
            builder = builder.node_affinity(nodes[id.subtask % nodes.len()], false);
        }
        let wanted = plan
            .tasks
            .get(id.task)
            .and_then(|t| job.task_resources.get(&t.head_name));
        for (name, amount) in wanted.iter().flat_map(|r| r.0.iter()) {
            builder = builder.resource(name, *amount);
        }
        builders.push((id, builder));
    }
    let rt2 = rt.clone();
    let wait = job.resource_wait;
    rt.block_on(async move {
        let spawning = futures::future::join_all(
            builders
                .into_iter()
                .map(|(id, b)| async move { (id, b.spawn().await) }),
        );
        let Ok(spawned) = tokio::time::timeout(wait, spawning).await else {
            return Err(format!(
                "the subtasks' actors were not created within {} ms",
                wait.as_millis()
            ));
        };
        let mut hosts = HashMap::new();
        let mut failure = None;
        for (id, h) in spawned {
            match h {
                Ok(h) => {
                    hosts.insert(id, h);
                }
                Err(e) => failure = Some(format!("{id}: {e}")),
            }
        }
        if let Some(why) = failure {
            for h in hosts.values() {
                let _ = rt2.kill_actor(h.raw()).await;
            }
            return Err(why);
        }
        Ok(hosts)
    })
}

fn start_hosts(
    rt: &Runtime,
    plan: &Plan,
    hosts: &HashMap<SubtaskId, SubtaskHostHandle>,
    attempt: &super::coordinator::Attempt,
) -> Result<(), AttemptFailure> {
    let mut slot_of: HashMap<usize, (SubtaskId, usize)> = HashMap::new();
    for id in plan.subtasks() {
        for (slot, channel) in plan.inputs_of(id).into_iter().enumerate() {
            slot_of.insert(channel, (id, slot));
        }
    }
    let mut calls = Vec::new();
    for id in plan.subtasks() {
        let targets: Vec<(SubtaskId, usize)> = plan
            .outputs_of(id)
            .into_iter()
            .filter_map(|c| slot_of.get(&c).copied())
            .collect();
        let host = hosts
            .get(&id)
            .ok_or_else(|| AttemptFailure::Placement {
                cause: format!("no host for {id}"),
            })?
            .clone();
        calls.push((id, host, targets, attempt.restored(id)));
    }
    let index_of: HashMap<SubtaskId, usize> = plan
        .subtasks()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let heads: HashMap<SubtaskId, String> = hosts
        .keys()
        .filter_map(|id| Some((*id, plan.tasks.get(id.task)?.head_name.clone())))
        .collect();
    let lost = |id: &SubtaskId, e: braid::Error| AttemptFailure::Lost {
        subtask: id.to_string(),
        cause: e.to_string(),
    };
    let hosts = hosts.clone();
    let starting = async move {
        let mut seats = HashMap::new();
        let mut mailboxes = HashMap::new();
        for (id, host) in &hosts {
            let seat = host.seat().await.map_err(|e| AttemptFailure::Lost {
                subtask: id.to_string(),
                cause: e.downcast::<String>().unwrap_or_else(|| e.to_string()),
            })?;
            seats.insert(*id, seat);
            mailboxes.insert(*id, host.mailboxes().await.map_err(|e| lost(id, e))?);
        }
        let peers: Vec<PeerHost> = hosts
            .iter()
            .filter_map(|(id, host)| {
                Some(PeerHost {
                    task: heads.get(id)?.clone(),
                    subtask: id.subtask,
                    host: host.clone(),
                    seat: *seats.get(id)?,
                    index: *index_of.get(id)?,
                    mailboxes: mailboxes.get(id).copied().unwrap_or_default(),
                })
            })
            .collect();
        for (id, host, outputs, _) in &calls {
            let targets: Vec<ChannelTarget> = outputs
                .iter()
                .filter_map(|(to, slot)| {
                    Some(ChannelTarget {
                        host: hosts.get(to)?.clone(),
                        slot: *slot,
                        seat: *seats.get(to)?,
                        mailbox: mailboxes.get(to).and_then(|m| m.inputs),
                    })
                })
                .collect();
            host.connect(targets).await.map_err(|e| lost(id, e))?;
            host.peers(peers.clone()).await.map_err(|e| lost(id, e))?;
        }
        for (id, host, _, restored) in calls {
            host.start(restored)
                .await
                .map_err(|e| match e.downcast::<AttemptFailure>() {
                    Some(failure) => failure,
                    None => lost(&id, e),
                })?;
        }
        Ok(())
    };
    rt.block_on(async move {
        tokio::time::timeout(START_WAIT, starting)
            .await
            .unwrap_or_else(|_| {
                Err(AttemptFailure::Lost {
                    subtask: "a host".into(),
                    cause: format!(
                        "the attempt's hosts did not start within {} s",
                        START_WAIT.as_secs()
                    ),
                })
            })
    })
}

/// How long connecting, restoring and starting an attempt's hosts may take
/// (a large state restores in seconds; a host that never answers fails
/// the attempt).
const START_WAIT: Duration = Duration::from_secs(120);

/// How long the driver waits on a call that controls a host (kill it, ask
/// its process id or node) before it gives up on it: a host on a stopped
/// node never answers.
const CONTROL_WAIT: Duration = Duration::from_secs(5);

/// Kills an attempt's hosts, giving up on those that do not answer within
/// [`CONTROL_WAIT`] (their node is gone or stopped; they die with it).
fn kill_hosts(rt: &Runtime, hosts: &HashMap<SubtaskId, SubtaskHostHandle>) {
    let rt2 = rt.clone();
    let hosts: Vec<SubtaskHostHandle> = hosts.values().cloned().collect();
    let killing = async move {
        futures::future::join_all(hosts.iter().map(|h| rt2.kill_actor(h.raw()))).await;
    };
    if bounded(rt, CONTROL_WAIT, async move {
        killing.await;
        Ok(())
    })
    .is_err()
    {
        tracing::warn!(
            "some hosts of the failed attempt did not answer the kill within {} s",
            CONTROL_WAIT.as_secs()
        );
    }
}

/// Runs `call` on `rt`, failing it after `wait`.
fn bounded<T: Send + 'static>(
    rt: &Runtime,
    wait: Duration,
    call: impl std::future::Future<Output = braid::Result<T>> + Send + 'static,
) -> Result<T, String> {
    rt.block_on(async move {
        match tokio::time::timeout(wait, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", wait.as_millis())),
        }
    })
}

/// How often the driver asks the head which nodes are alive.
const NODE_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Fails the attempt once the head declares dead a node that hosts one of
/// its subtasks (a node that stopped answering, SIGSTOPped or cut off,
/// whose processes' connections stay open). Ends with `stop`. The head
/// being unreachable fails nothing: the job runs without it.
fn watch_nodes(
    rt: &Runtime,
    nodes: HashMap<SubtaskId, String>,
    events: crossbeam_channel::Sender<CoordinatorEvent>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let rt2 = rt.clone();
    rt.spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(NODE_WATCH_EVERY).await;
            let Ok(Ok(all)) = tokio::time::timeout(CONTROL_WAIT, rt2.nodes()).await else {
                continue;
            };
            let dead = all.iter().filter(|n| !n.alive).find_map(|n| {
                let node = n.info.node_id.to_string();
                nodes
                    .iter()
                    .find(|(_, on)| **on == node)
                    .map(|(id, _)| (*id, node))
            });
            if let Some((id, node)) = dead {
                let _ = events.send(CoordinatorEvent::Failed(AttemptFailure::Lost {
                    subtask: id.to_string(),
                    cause: format!("its node {node} was declared dead (no heartbeat)"),
                }));
                return;
            }
        }
    });
}
