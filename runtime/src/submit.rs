//! The task submitter: leases workers from nodes and pushes tasks to them
//! directly, as Ray's core worker does. Tasks with the same scheduling key
//! (resource shape, placement-group bundle, node affinity) share a pool of
//! leased workers; a worker takes up to [`PIPELINE_DEPTH`] tasks at once
//! while everything it holds is of functions seen to finish within
//! [`QUICK_TASK`], so the round trip overlaps with execution but nothing
//! waits behind a long task; an idle lease goes back to its node after
//! [`IDLE_LEASE`].

use crate::address::Address;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::ids::{NodeId, PlacementGroupId, TaskId};
use crate::lineage::{LineageTable, Liveness, Rebuilder, MAX_LINEAGE_BYTES};
use crate::object_ref::{ObjectRef, RefHandle};
use crate::refs::ValueState;
use crate::resources::Resources;
use crate::telemetry::recorder::{Counters, Event};
use crate::value::Arg;
use crate::wire::messages::{Lease, LeaseRequest, ReturnValue, TaskResult, TaskSpec, WireArg};
use crate::wire::{Conn, Endpoint, Message, Reply};
use braid_store::ObjectId;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Tasks a leased worker may hold at once.
pub const PIPELINE_DEPTH: u32 = 4;
/// A function whose last run took less than this, from push to reply, is
/// quick: tasks may queue behind it on a worker. Behind anything else (a
/// function not yet seen, or seen to be slow) nothing queues, and the pool
/// leases another worker instead.
pub const QUICK_TASK: Duration = Duration::from_millis(1);
/// Lease requests a pool keeps in flight at once for tasks not known to be
/// quick (Ray's `max_pending_lease_requests_per_scheduling_category`).
pub const MAX_PENDING_LEASES: usize = 10;
/// How long a task of a function never seen to finish may run before the
/// function counts as slow, and its pool leases workers in parallel.
pub const UNKNOWN_PROBE: Duration = Duration::from_millis(5);
/// How long an unused lease is kept before it is returned.
pub const IDLE_LEASE: Duration = Duration::from_millis(200);

/// How a task is scheduled and retried.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    pub(crate) resources: Resources,
    pub(crate) max_retries: u32,
    pub(crate) node: Option<NodeId>,
    pub(crate) soft_affinity: bool,
    pub(crate) bundle: Option<(PlacementGroupId, u32)>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) spread: bool,
    pub(crate) deterministic: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            resources: Resources::cpus(1.0),
            max_retries: 3,
            node: None,
            soft_affinity: false,
            bundle: None,
            timeout: None,
            spread: false,
            deterministic: true,
        }
    }
}

impl TaskOptions {
    /// Default options: one CPU, three retries.
    pub fn new() -> Self {
        TaskOptions::default()
    }

    /// CPUs the task holds while it runs (default 1).
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.set(crate::resources::CPU, n);
        self
    }

    /// Memory, in bytes, the task holds while it runs.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.resources.set(crate::resources::MEMORY, bytes as f64);
        self
    }

    /// A custom resource the task holds while it runs.
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        self.resources.set(name, amount);
        self
    }

    /// Retries when the worker dies mid-task (default 3).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Run on this node; with `soft`, elsewhere if it cannot.
    pub fn node_affinity(mut self, node: NodeId, soft: bool) -> Self {
        self.node = Some(node);
        self.soft_affinity = soft;
        self
    }

    /// SPREAD: lease workers round-robin over the nodes with room, rather
    /// than on this process's node until it is busy (the default, hybrid
    /// policy: the local node until half its CPUs are leased, then the
    /// least utilized node).
    pub fn spread(mut self) -> Self {
        self.spread = true;
        self
    }

    /// Whether running the task again gives the same value (default
    /// true). A stored output of a deterministic task whose every copy is
    /// lost with its node is rebuilt by running the task again (up to
    /// `max_retries` times); one of a task marked otherwise fails with
    /// [`Error::ObjectLost`].
    pub fn deterministic(mut self, yes: bool) -> Self {
        self.deterministic = yes;
        self
    }

    /// Run inside bundle `index` of a placement group.
    pub fn placement_group(mut self, group: &crate::PlacementGroup, index: u32) -> Self {
        self.bundle = Some((group.id(), index));
        self.node = group.node_of(index);
        self
    }

    /// Fail the task with [`Error::Timeout`] if it has not finished in `d`;
    /// a synchronous run still going then ends with its worker process
    /// (as [`crate::Runtime::cancel_force`]), freeing its CPU.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct SchedKey {
    resources: String,
    node: Option<NodeId>,
    bundle: Option<(PlacementGroupId, u32)>,
    spread: bool,
}

struct QueuedTask {
    task: TaskId,
    function: &'static str,
    args: Vec<WireArg>,
    /// References the arguments hold, kept alive while the task may run
    /// (again).
    _keep: Vec<Arc<RefHandle>>,
    returns: ObjectId,
    /// The owner's reference to the output, while it lives.
    output: Liveness,
    attempts: u32,
    max_retries: u32,
    /// Whether the output may be rebuilt by running the task again.
    deterministic: bool,
    /// How many times the output has been rebuilt.
    rebuilds: u32,
    timeout: Option<Duration>,
    /// When it was last pushed, and whether it then counted as unproven.
    pushed: Option<(Instant, bool)>,
    /// When it was submitted (Unix ns).
    submitted_ns: u64,
}

enum PoolMsg {
    Ready(Box<QueuedTask>),
    Granted(Result<(Lease, Conn)>),
    Finished {
        lease: u64,
        task: Box<QueuedTask>,
        outcome: Result<TaskResult>,
        worker: Address,
    },
}

struct Leased {
    lease: Lease,
    node: Conn,
    conn: Option<Conn>,
    inflight: u32,
    /// In-flight tasks of functions not known to be quick.
    unproven: u32,
    idle_since: Instant,
    dead: bool,
}

impl QueuedTask {
    /// What its output fails with when the task does with `e`: `e`, or,
    /// for a run that was rebuilding a lost output, [`Error::ObjectLost`]
    /// saying why the rebuild failed.
    fn failure(&self, e: Error) -> Error {
        if self.rebuilds == 0 {
            return e;
        }
        Error::lost_because(self.returns, format!("rebuilding it failed: {e}"))
    }
}

/// How to run a task again to rebuild its lost output: the task as it
/// was queued, and the pool that ran it.
struct Recipe {
    task: QueuedTask,
    pool: mpsc::UnboundedSender<PoolMsg>,
}

/// Cancellation state of submitted tasks, by return object.
struct Submitted {
    task: TaskId,
    worker: Option<Conn>,
}

/// Submits tasks for one process.
pub(crate) struct Submitter {
    core: Weak<Core>,
    pools: Mutex<HashMap<SchedKey, mpsc::UnboundedSender<PoolMsg>>>,
    submitted: Arc<Mutex<HashMap<ObjectId, Submitted>>>,
    lineage: Arc<Mutex<LineageTable<Recipe>>>,
}

impl Submitter {
    pub(crate) fn new(core: Weak<Core>) -> Submitter {
        Submitter {
            core,
            pools: Mutex::new(HashMap::new()),
            submitted: Arc::new(Mutex::new(HashMap::new())),
            lineage: Arc::new(Mutex::new(LineageTable::new(MAX_LINEAGE_BYTES))),
        }
    }

    /// Submits a task; its value lands in the returned reference.
    pub(crate) fn submit<R>(
        &self,
        function: &'static str,
        opts: &TaskOptions,
        args: Result<Vec<Arg>>,
    ) -> Result<ObjectRef<R>> {
        let core = self
            .core
            .upgrade()
            .ok_or_else(|| Error::NotRunning("runtime shut down".into()))?;
        let args = args?;
        Counters::functions().count(function, Event::Submitted);
        let returns = core.new_object_id();
        let handle = core.refs.new_owned(returns, ValueState::Pending);
        let task = TaskId::random();
        self.submitted
            .lock()
            .insert(returns, Submitted { task, worker: None });
        let key = SchedKey {
            resources: opts.resources.to_string(),
            node: opts.node,
            bundle: opts.bundle,
            spread: opts.spread,
        };
        let pool = {
            let mut pools = self.pools.lock();
            pools
                .entry(key)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let request = LeaseRequest {
                        job: core.job,
                        resources: opts.resources.clone(),
                        bundle: opts.bundle,
                        actor: None,
                        detached: false,
                        strict_node: opts.node.is_some() && !opts.soft_affinity,
                        spread: opts.spread,
                        spilled: opts.node.is_some(),
                        avoid: Vec::new(),
                    };
                    core.handle.spawn(run_pool(
                        self.core.clone(),
                        request,
                        opts.node,
                        tx.clone(),
                        rx,
                        self.submitted.clone(),
                        self.lineage.clone(),
                    ));
                    tx
                })
                .clone()
        };
        let output: Liveness = {
            let strong: Arc<dyn std::any::Any + Send + Sync> = handle.clone();
            Arc::downgrade(&strong)
        };
        let queued = QueuedTask {
            task,
            function,
            args: Vec::new(),
            _keep: Vec::new(),
            returns,
            output,
            attempts: 0,
            max_retries: opts.max_retries,
            deterministic: opts.deterministic,
            rebuilds: 0,
            timeout: opts.timeout,
            pushed: None,
            submitted_ns: crate::telemetry::spans::submitted_ns(),
        };
        match prepare_inline(args) {
            Ok((wire, keep)) => {
                let _ = pool.send(PoolMsg::Ready(Box::new(QueuedTask {
                    args: wire,
                    _keep: keep,
                    ..queued
                })));
            }
            Err(args) => {
                let core2 = core.clone();
                core.handle.spawn(async move {
                    match resolve_args(&core2, args).await {
                        Ok((wire, keep)) => {
                            let _ = pool.send(PoolMsg::Ready(Box::new(QueuedTask {
                                args: wire,
                                _keep: keep,
                                ..queued
                            })));
                        }
                        Err(e) => core2.refs.set_state(returns, ValueState::Failed(e)),
                    }
                });
            }
        }
        Ok(ObjectRef::from_handle(handle))
    }

    /// Cancels the task producing `returns`: a queued task never runs, a
    /// running one is told to stop, and its reference resolves to
    /// [`Error::Cancelled`] at once.
    pub(crate) fn cancel(&self, returns: ObjectId, force: bool) -> bool {
        let Some(core) = self.core.upgrade() else {
            return false;
        };
        let Some(entry) = self.submitted.lock().remove(&returns) else {
            return false;
        };
        if let Some(conn) = entry.worker {
            conn.send(if force {
                Message::CancelForce(entry.task)
            } else {
                Message::Cancel(entry.task)
            });
        }
        core.refs
            .set_state(returns, ValueState::Failed(Error::Cancelled));
        true
    }
}

impl Rebuilder for Submitter {
    fn rebuild(&self, lost: Vec<ObjectId>) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        for id in lost {
            let recipe = self.lineage.lock().take(id);
            let fail = |reason: String| {
                core.refs
                    .set_state(id, ValueState::Failed(Error::lost_because(id, reason)));
            };
            let Some(Recipe { mut task, pool }) = recipe else {
                fail(
                    "no lineage to rebuild it from (made by put or an actor call, by a task \
                     marked not deterministic, or its lineage was dropped past the bound)"
                        .into(),
                );
                continue;
            };
            if task.rebuilds >= task.max_retries {
                fail(format!(
                    "rebuilt {} times already (max_retries {})",
                    task.rebuilds, task.max_retries
                ));
                continue;
            }
            tracing::info!(object = %id, function = task.function, "rebuilding a lost object");
            task.rebuilds += 1;
            task.attempts = 0;
            task.pushed = None;
            task.task = TaskId::random();
            self.submitted.lock().insert(
                id,
                Submitted {
                    task: task.task,
                    worker: None,
                },
            );
            let core2 = core.clone();
            core.handle.spawn(async move {
                // Stored arguments may have moved (or be rebuilt
                // themselves): ask where they are now.
                match refresh_args(&core2, &task.args).await {
                    Ok(args) => {
                        task.args = args;
                        if pool.send(PoolMsg::Ready(Box::new(task))).is_err() {
                            core2.refs.set_state(
                                id,
                                ValueState::Failed(Error::lost_because(
                                    id,
                                    "its task pool is gone",
                                )),
                            );
                        }
                    }
                    Err(e) => core2.refs.set_state(id, ValueState::Failed(e)),
                }
            });
        }
    }
}

/// Where the stored arguments of a task to run again are now.
async fn refresh_args(core: &Core, args: &[WireArg]) -> Result<Vec<WireArg>> {
    let mut fresh = Vec::with_capacity(args.len());
    for arg in args {
        match arg {
            WireArg::Inline(bytes) => fresh.push(WireArg::Inline(bytes.clone())),
            WireArg::Stored { id, owner, .. } => match core.objects.resolve(*id, owner).await? {
                ValueState::Inline(bytes) => fresh.push(WireArg::Inline(bytes.to_vec())),
                ValueState::Stored(nodes) => fresh.push(WireArg::Stored {
                    id: *id,
                    nodes,
                    owner: owner.clone(),
                }),
                ValueState::Failed(e) => return Err(e),
                ValueState::Pending => return Err(Error::lost(*id)),
            },
        }
    }
    Ok(fresh)
}

/// Arguments ready to ship, and the references to keep alive meanwhile.
pub(crate) type Prepared = (Vec<WireArg>, Vec<Arc<RefHandle>>);

/// Encodes arguments that need no waiting; hands them back otherwise.
pub(crate) fn prepare_inline(args: Vec<Arg>) -> std::result::Result<Prepared, Vec<Arg>> {
    if args.iter().any(|a| matches!(a, Arg::Ref(_))) {
        return Err(args);
    }
    let mut wire = Vec::with_capacity(args.len());
    let mut keep = Vec::new();
    for arg in args {
        if let Arg::Value { bytes, nested } = arg {
            wire.push(WireArg::Inline(bytes));
            keep.extend(nested);
        }
    }
    Ok((wire, keep))
}

/// Waits for every referenced argument to be ready and encodes the lot.
pub(crate) async fn resolve_args(core: &Core, args: Vec<Arg>) -> Result<Prepared> {
    let mut wire = Vec::with_capacity(args.len());
    let mut keep = Vec::new();
    for arg in args {
        match arg {
            Arg::Value { bytes, nested } => {
                wire.push(WireArg::Inline(bytes));
                keep.extend(nested);
            }
            Arg::Ref(handle) => {
                match core.objects.resolve(handle.id, &handle.owner).await? {
                    ValueState::Inline(bytes) => wire.push(WireArg::Inline(bytes.to_vec())),
                    ValueState::Stored(nodes) => wire.push(WireArg::Stored {
                        id: handle.id,
                        nodes,
                        owner: (*handle.owner).clone(),
                    }),
                    ValueState::Failed(e) => return Err(e),
                    ValueState::Pending => return Err(Error::lost(handle.id)),
                }
                keep.push(handle);
            }
        }
    }
    Ok((wire, keep))
}

/// Records a finished task's or call's result at its owner (this process):
/// takes over the references nested in the value, registers the borrows
/// the executor kept, and sets the value.
pub(crate) async fn record_result(core: &Core, returns: ObjectId, result: TaskResult) {
    let TaskResult {
        value,
        contained,
        borrowed,
        executor,
    } = result;
    let inner: Vec<Arc<RefHandle>> = contained
        .into_iter()
        .map(|(id, owner)| core.refs.new_registered(id, crate::address::intern(owner)))
        .collect();
    for (id, owner) in borrowed {
        if owner.worker == core.me.worker {
            core.refs.add_borrower(id, executor.worker);
        } else if let Ok(conn) = core.peers.to(&owner).await {
            conn.send(Message::AddBorrower {
                id,
                borrower: executor.clone(),
            });
        }
    }
    if !inner.is_empty() {
        core.refs.set_contained(returns, inner);
    }
    let state = match value {
        ReturnValue::Inline(bytes) => ValueState::Inline(bytes.into()),
        ReturnValue::Stored(node) => ValueState::Stored(vec![node]),
    };
    core.refs.set_state(returns, state);
}

/// Leases a worker, following spillbacks to other nodes. A node asked by
/// soft affinity that is gone or unreachable gives way to this process's
/// node; a node a spillback named that cannot be reached sends the request
/// back to this process's node, which will not pick it again once the head
/// knows it is dead.
pub(crate) async fn lease_worker(
    core: &Core,
    mut request: LeaseRequest,
    node: Option<NodeId>,
) -> Result<(Lease, Conn)> {
    let mut conn = match node {
        Some(n) if n != core.node_id => {
            let affine = async {
                let endpoint = core.node_endpoint_of(n).await?;
                core.peers.node(&endpoint).await
            };
            match affine.await {
                Ok(conn) => conn,
                Err(_) if !request.strict_node => {
                    request.spilled = false;
                    core.node.clone()
                }
                Err(e) => return Err(e),
            }
        }
        _ => core.node.clone(),
    };
    let mut at = node.filter(|n| *n != core.node_id && conn.id() != core.node.id());
    for _ in 0..8 {
        match conn.request(Message::RequestLease(request.clone())).await {
            Ok(Reply::Leased(lease)) => return Ok((lease, conn)),
            Ok(Reply::Spillback { node, endpoint }) => {
                request.spilled = true;
                conn = match core.peers.node(&endpoint).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!("spilled to unreachable node {node}: {e}");
                        request.spilled = false;
                        request.avoid.push(node);
                        core.node.clone()
                    }
                };
                at = Some(node);
            }
            Err(Error::Unreachable { .. })
                if conn.id() != core.node.id() && !request.strict_node =>
            {
                request.spilled = false;
                request.avoid.extend(at);
                conn = core.node.clone();
                at = None;
            }
            Err(e) => return Err(e),
            _ => return Err(Error::BadRequest("node answered a lease oddly".into())),
        }
    }
    Err(Error::Infeasible(format!(
        "{} (too many spillbacks)",
        request.resources
    )))
}

async fn run_pool(
    core: Weak<Core>,
    request: LeaseRequest,
    node: Option<NodeId>,
    tx: mpsc::UnboundedSender<PoolMsg>,
    mut rx: mpsc::UnboundedReceiver<PoolMsg>,
    submitted: Arc<Mutex<HashMap<ObjectId, Submitted>>>,
    lineage: Arc<Mutex<LineageTable<Recipe>>>,
) {
    let mut queue: VecDeque<QueuedTask> = VecDeque::new();
    let mut workers: Vec<Leased> = Vec::new();
    let mut leasing: usize = 0;
    let mut backoff: Option<Instant> = None;
    // When a task of a function never seen to finish was pushed, while
    // none has finished since: past [`UNKNOWN_PROBE`] such a function
    // counts as slow for leasing.
    let mut unknown_since: Option<Instant> = None;
    let mut quick: HashMap<&'static str, bool> = HashMap::new();
    let mut tick = tokio::time::interval(IDLE_LEASE / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Woken once when the probe ends (not again after: it has counted).
        let probe = unknown_since
            .map(|t| t + UNKNOWN_PROBE)
            .filter(|at| *at > Instant::now())
            .map(tokio::time::Instant::from_std);
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => Some(m), None => return },
            _ = tick.tick() => None,
            () = async { if let Some(at) = probe { tokio::time::sleep_until(at).await } }, if probe.is_some() => None,
        };
        let Some(core) = core.upgrade() else { return };
        match msg {
            Some(PoolMsg::Ready(task)) => queue.push_back(*task),
            Some(PoolMsg::Granted(Ok((lease, node_conn))))
                if queue.is_empty() && workers.iter().any(|w| !w.dead) =>
            {
                // Asked for work that others have taken meanwhile: give it
                // back at once rather than hold its resources idle.
                leasing = leasing.saturating_sub(1);
                node_conn.send(Message::ReturnLease {
                    lease: lease.lease,
                    kill: false,
                });
            }
            Some(PoolMsg::Granted(Ok((lease, node_conn)))) => {
                leasing = leasing.saturating_sub(1);
                tracing::debug!(
                    lease = lease.lease,
                    worker = lease.worker.pid,
                    queued = queue.len(),
                    "lease granted"
                );
                match core.peers.to(&lease.worker).await {
                    Ok(conn) => workers.push(Leased {
                        lease,
                        node: node_conn,
                        conn: Some(conn),
                        inflight: 0,
                        unproven: 0,
                        idle_since: Instant::now(),
                        dead: false,
                    }),
                    Err(e) => {
                        tracing::warn!("leased worker unreachable: {e}");
                        node_conn.send(Message::ReturnLease {
                            lease: lease.lease,
                            kill: true,
                        });
                    }
                }
            }
            Some(PoolMsg::Granted(Err(e))) if leasing > 1 || workers.iter().any(|w| !w.dead) => {
                // Other requests or workers may still serve the queue.
                leasing = leasing.saturating_sub(1);
                backoff = Some(Instant::now() + IDLE_LEASE / 2);
                tracing::debug!("a lease request failed: {e}");
            }
            Some(PoolMsg::Granted(Err(e))) => {
                leasing = leasing.saturating_sub(1);
                for task in queue.drain(..) {
                    submitted.lock().remove(&task.returns);
                    core.refs
                        .set_state(task.returns, ValueState::Failed(task.failure(e.clone())));
                }
            }
            Some(PoolMsg::Finished {
                lease,
                mut task,
                outcome,
                worker,
            }) => {
                let mut died = false;
                let mut unproven = false;
                if let Some((pushed, counted)) = task.pushed.take() {
                    quick.insert(task.function, pushed.elapsed() < QUICK_TASK);
                    unproven = counted;
                }
                unknown_since = None;
                // Lease numbers are per node: the worker tells them apart.
                if let Some(w) = workers
                    .iter_mut()
                    .find(|w| w.lease.lease == lease && w.lease.worker.worker == worker.worker)
                {
                    w.inflight = w.inflight.saturating_sub(1);
                    if unproven {
                        w.unproven = w.unproven.saturating_sub(1);
                    }
                    w.idle_since = Instant::now();
                    if matches!(outcome, Err(Error::Unreachable { .. })) {
                        w.dead = true;
                        died = true;
                    }
                }
                let cancelled = !submitted.lock().contains_key(&task.returns);
                match outcome {
                    _ if cancelled => {}
                    Ok(result) => {
                        submitted.lock().remove(&task.returns);
                        let returns = task.returns;
                        if task.deterministic && matches!(result.value, ReturnValue::Stored(_)) {
                            let bytes = task.args.iter().map(WireArg::size).sum::<usize>() + 256;
                            let output = task.output.clone();
                            lineage.lock().record(
                                returns,
                                Recipe {
                                    task: *task,
                                    pool: tx.clone(),
                                },
                                bytes,
                                output,
                            );
                        }
                        record_result(&core, returns, result).await;
                    }
                    Err(Error::Unreachable { message, .. }) if died => {
                        if task.attempts <= task.max_retries {
                            tracing::info!(
                                "worker {} died running {}; retrying ({}/{})",
                                worker.pid,
                                task.function,
                                task.attempts,
                                task.max_retries
                            );
                            Counters::functions().count(task.function, Event::Retried);
                            queue.push_front(*task);
                        } else {
                            submitted.lock().remove(&task.returns);
                            Counters::functions().count(task.function, Event::Failed);
                            let e = Error::WorkerDied {
                                function: task.function.to_string(),
                                attempts: task.attempts,
                                cause: message,
                            };
                            core.refs
                                .set_state(task.returns, ValueState::Failed(task.failure(e)));
                        }
                    }
                    Err(e) => {
                        submitted.lock().remove(&task.returns);
                        core.refs
                            .set_state(task.returns, ValueState::Failed(task.failure(e)));
                    }
                }
            }
            None => {}
        }
        workers.retain(|w| {
            if w.dead && w.inflight == 0 {
                w.node.send(Message::ReturnLease {
                    lease: w.lease.lease,
                    kill: true,
                });
                false
            } else {
                true
            }
        });
        while !queue.is_empty() {
            let Some(w) = workers
                .iter_mut()
                .filter(|w| {
                    !w.dead && (w.inflight == 0 || (w.inflight < PIPELINE_DEPTH && w.unproven == 0))
                })
                .min_by_key(|w| w.inflight)
            else {
                break;
            };

            let Some(mut task) = queue.pop_front() else {
                break;
            };
            if !submitted.lock().contains_key(&task.returns) {
                continue;
            }
            let Some(conn) = w.conn.clone() else { break };
            if let Some(s) = submitted.lock().get_mut(&task.returns) {
                s.worker = Some(conn.clone());
            }
            task.attempts += 1;
            w.inflight += 1;
            let unproven = !quick.get(task.function).copied().unwrap_or(false);
            if unproven {
                w.unproven += 1;
            }
            if !quick.contains_key(task.function) && unknown_since.is_none() {
                unknown_since = Some(Instant::now());
            }
            task.pushed = Some((Instant::now(), unproven));
            let spec = TaskSpec {
                task: task.task,
                function: task.function.to_string(),
                args: task.args.clone(),
                returns: task.returns,
                owner: (*core.me).clone(),
                submitted_ns: task.submitted_ns,
            };
            let reply = conn.request(Message::PushTask(spec));
            let lease = w.lease.lease;
            let worker = w.lease.worker.clone();
            let tx = tx.clone();
            let timeout = task.timeout;
            tokio::spawn(async move {
                let outcome = match timeout {
                    Some(d) => match tokio::time::timeout(d, reply).await {
                        Ok(r) => r,
                        Err(_) => {
                            // Its worker exits if it still runs it, so
                            // the CPU it holds returns at once.
                            conn.send(Message::CancelForce(task.task));
                            Err(Error::Timeout(d))
                        }
                    },
                    None => reply.await,
                };
                let outcome = match outcome {
                    Ok(Reply::Done(result)) => Ok(result),
                    Ok(_) => Err(Error::BadRequest("worker answered a task oddly".into())),
                    Err(e) => Err(e),
                };
                let _ = tx.send(PoolMsg::Finished {
                    lease,
                    task: Box::new(task),
                    outcome,
                    worker,
                });
            });
        }
        // Quick tasks pipeline on the workers the pool has, so one lease
        // request at a time keeps up; tasks that run long each want a
        // worker of their own, leased in parallel (spread over the cluster
        // by the nodes' hybrid policy). A function not seen to finish yet
        // is probed with one lease until one of its tasks has run
        // `UNKNOWN_PROBE`.
        let probed_slow = unknown_since.is_some_and(|t| t.elapsed() >= UNKNOWN_PROBE);
        let wanted = match queue.front() {
            _ if backoff.is_some_and(|until| Instant::now() < until) => 0,
            Some(t) => match quick.get(t.function) {
                Some(true) => 1,
                Some(false) => queue.len().min(MAX_PENDING_LEASES),
                None if probed_slow => queue.len().min(MAX_PENDING_LEASES),
                None => 1,
            },
            None => 0,
        };
        while leasing < wanted {
            leasing += 1;
            tracing::debug!(
                queued = queue.len(),
                workers = workers.len(),
                leasing,
                "requesting a lease"
            );
            let tx = tx.clone();
            let request = request.clone();
            let core2 = core.clone();
            tokio::spawn(async move {
                let granted = lease_worker(&core2, request, node).await;
                let _ = tx.send(PoolMsg::Granted(granted));
            });
        }
        let now = Instant::now();
        workers.retain(|w| {
            if queue.is_empty() && w.inflight == 0 && now.duration_since(w.idle_since) >= IDLE_LEASE
            {
                w.node.send(Message::ReturnLease {
                    lease: w.lease.lease,
                    kill: false,
                });
                false
            } else {
                true
            }
        });
    }
}

impl Core {
    /// Where another node's control plane listens, from the head.
    pub(crate) async fn node_endpoint_of(&self, node: NodeId) -> Result<Endpoint> {
        let head = self.head().await?;
        let nodes = head.list_nodes().await?;
        nodes
            .into_iter()
            .find(|n| n.info.node_id == node && n.alive)
            .map(|n| n.info.control)
            .ok_or(Error::NodeDied(node))
    }
}
