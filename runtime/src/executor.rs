//! The worker side: runs pushed tasks one after another, or hosts one actor
//! and runs its calls in arrival order (or up to its declared concurrency).
//! Arguments are resolved before a task runs; a panic becomes
//! [`Error::TaskError`] carrying the message and the function's name.

use crate::address::Address;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::ids::{ActorId, TaskId};
use crate::registry::{self, ActorObject, Invoke};
use crate::telemetry::recorder::{short_name, Counter, Counters, Event, MethodCounters, Work};
use crate::telemetry::spans;
use crate::value::{ArgData, Args, Encoded};
use crate::wire::messages::{ActorSpec, CallSpec, ReturnValue, TaskResult, TaskSpec, WireArg};
use crate::wire::{Message, Reply, Responder, INLINE_LIMIT};
use braid_store::ObjectId;
use futures::FutureExt;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;
use tokio::sync::mpsc;

/// The task or actor this worker is running, for prefixing its output.
pub(crate) fn current_label() -> &'static Mutex<String> {
    static LABEL: OnceLock<Mutex<String>> = OnceLock::new();
    LABEL.get_or_init(|| Mutex::new(String::from("worker")))
}

struct Hosted {
    actor: ActorId,
    calls: mpsc::UnboundedSender<(CallSpec, Responder, Arrival)>,
    instance: Arc<dyn ActorObject>,
    class: Arc<HostedClass>,
    /// One permit per call that may run at once; calls from the loop and
    /// calls run on a ring's reader thread take the same permits.
    lane: Arc<tokio::sync::Semaphore>,
    max_concurrency: u32,
}

/// The hosted actor's class: its name and its methods' counters.
struct HostedClass {
    name: String,
    counters: MethodCounters,
}

/// When a task or call reached this worker, or started: one clock read
/// for a timed run, none for the others (recording off, or past
/// [`spans::PER_REPORT`] runs this second: see [`spans::admit`]).
#[derive(Clone, Copy)]
struct Arrival(Option<Instant>);

impl Arrival {
    /// A run reaching this worker.
    fn received() -> Arrival {
        Arrival(spans::admit().then(Instant::now))
    }

    /// The start of the run that arrived `received`.
    fn started(received: Arrival) -> Arrival {
        Arrival(received.0.map(|_| Instant::now()))
    }
}

/// Records a run that just ended under the counter `counter` gives: its
/// counts and times (`recorder`) and its span (nothing while recording
/// is off).
fn record_run(
    work: Work,
    counter: impl FnOnce() -> Counter,
    (task, job, submitted_ns): (TaskId, crate::ids::JobId, u64),
    (received, started): (Arrival, Arrival),
    ok: bool,
) {
    if !crate::telemetry::enabled() {
        return;
    }
    let (Arrival(Some(received)), Arrival(Some(started))) = (received, started) else {
        counter().count(if ok { Event::Finished } else { Event::Failed });
        return;
    };
    let ran = started.elapsed();
    let name = counter().ran(started.saturating_duration_since(received), ran, ok);
    let started_ns = spans::unix_ns(started);
    spans::record_named(
        spans::Run {
            task,
            job,
            work,
            submitted_ns,
            received_ns: spans::unix_ns(received),
            started_ns,
            ended_ns: started_ns + ran.as_nanos() as u64,
        },
        name,
        ok,
    );
}

/// Runs what callers push to this worker.
pub(crate) struct Executor {
    core: Weak<Core>,
    tasks: mpsc::UnboundedSender<(TaskSpec, Responder, Arrival)>,
    actor: Mutex<Option<Hosted>>,
    cancelled: Mutex<HashSet<TaskId>>,
    /// The task running, its abort handle, and whether it runs
    /// synchronously (an abort cannot stop it).
    running: Mutex<Option<(TaskId, tokio::task::AbortHandle, bool)>>,
    self_ref: Weak<Executor>,
}

/// A worker's exit code when it exits to end a task cancelled by force.
pub(crate) const EXIT_FORCE_CANCELLED: i32 = 137;

impl crate::core::Inbox for Executor {
    fn on_request(&self, message: Message, responder: Responder) {
        match self.self_ref.upgrade() {
            Some(this) => this.serve(message, responder),
            None => responder.respond(Err(Error::NotRunning("worker shutting down".into()))),
        }
    }

    fn cancel(&self, task: TaskId) {
        self.cancel_task(task);
    }

    fn cancel_force(&self, task: TaskId) {
        let running_sync = matches!(
            self.running.lock().as_ref(),
            Some((running, _, true)) if *running == task
        );
        if running_sync {
            // A thread cannot be stopped from outside; the process can.
            tracing::warn!(%task, "exiting: the task was cancelled by force while running");
            std::process::exit(EXIT_FORCE_CANCELLED);
        }
        self.cancel_task(task);
    }
}

impl Executor {
    /// Starts the executor's task loop.
    pub(crate) fn start(core: &Arc<Core>) -> Arc<Executor> {
        let (tx, rx) = mpsc::unbounded_channel();
        let executor = Arc::new_cyclic(|self_ref| Executor {
            core: Arc::downgrade(core),
            tasks: tx,
            actor: Mutex::new(None),
            cancelled: Mutex::new(HashSet::new()),
            running: Mutex::new(None),
            self_ref: self_ref.clone(),
        });
        core.handle.spawn(task_loop(Arc::downgrade(&executor), rx));
        executor
    }

    fn serve(self: &Arc<Self>, message: Message, responder: Responder) {
        match message {
            Message::PushTask(spec) => {
                let _ = self.tasks.send((spec, responder, Arrival::received()));
            }
            Message::CreateActor(spec) => {
                let this = self.clone();
                if let Some(core) = self.core.upgrade() {
                    core.handle.spawn(async move {
                        let result = this.create_actor(spec).await;
                        responder.respond(result.map(|_| Reply::Ok));
                    });
                }
            }
            Message::CallActor(spec) => {
                let actor = self.actor.lock();
                match actor.as_ref() {
                    Some(hosted)
                        if hosted.actor == spec.actor
                            && hosted.max_concurrency == 1
                            && crate::wire::conn::on_serving_ring_thread() =>
                    {
                        let instance = hosted.instance.clone();
                        let class = hosted.class.clone();
                        let lane = hosted.lane.clone();
                        drop(actor);
                        let Some(core) = self.core.upgrade() else {
                            responder
                                .respond(Err(Error::NotRunning("worker shutting down".into())));
                            return;
                        };
                        let handle = core.handle.clone();
                        let received = Arrival::received();
                        handle.block_on(async move {
                            // A free lane starts the call as it arrives:
                            // one clock read stamps both.
                            let (_permit, started) = match lane.try_acquire() {
                                Ok(permit) => (permit, received),
                                Err(_) => match lane.acquire().await {
                                    Ok(permit) => (permit, Arrival::started(received)),
                                    Err(_) => return,
                                },
                            };
                            let stamps = (received, started);
                            run_call(&core, instance, &class, spec, responder, stamps).await;
                        });
                    }
                    Some(hosted) if hosted.actor == spec.actor => {
                        let _ = hosted.calls.send((spec, responder, Arrival::received()));
                    }
                    _ => responder.respond(Err(Error::ActorDied {
                        actor: spec.actor,
                        cause: "this worker does not host the actor".into(),
                    })),
                }
            }
            _ => responder.respond(Err(Error::BadRequest("not an executor request".into()))),
        }
    }

    /// Cancels a task: one not started never runs; a running async task is
    /// aborted.
    fn cancel_task(&self, task: TaskId) {
        self.cancelled.lock().insert(task);
        if let Some((running, abort, _)) = self.running.lock().as_ref() {
            if *running == task {
                abort.abort();
            }
        }
    }

    async fn create_actor(&self, spec: ActorSpec) -> Result<()> {
        let core = self
            .core
            .upgrade()
            .ok_or_else(|| Error::NotRunning("worker shutting down".into()))?;
        if self.actor.lock().is_some() {
            return Err(Error::BadRequest(
                "this worker already hosts an actor".into(),
            ));
        }
        let entry = registry::actor_class(&spec.class)?;
        let args = resolve(&core, spec.args).await?;
        *current_label().lock() = short_name(&spec.class).to_string();
        let construct = entry.construct;
        let instance =
            std::panic::catch_unwind(AssertUnwindSafe(|| construct(args))).map_err(|p| {
                Error::TaskError {
                    function: format!("{}::new", spec.class),
                    message: panic_message(p),
                }
            })??;
        let (tx, rx) = mpsc::unbounded_channel();
        let instance: Arc<dyn ActorObject> = Arc::from(instance);
        let class = Arc::new(HostedClass {
            counters: MethodCounters::methods(&spec.class),
            name: spec.class,
        });
        let max_concurrency = spec.max_concurrency.max(1);
        let lane = Arc::new(tokio::sync::Semaphore::new(max_concurrency as usize));
        *self.actor.lock() = Some(Hosted {
            actor: spec.actor,
            calls: tx,
            instance: instance.clone(),
            class: class.clone(),
            lane: lane.clone(),
            max_concurrency,
        });
        core.handle.spawn(actor_loop(
            Arc::downgrade(&core),
            instance,
            class,
            lane,
            max_concurrency,
            rx,
        ));
        Ok(())
    }
}

async fn task_loop(
    executor: Weak<Executor>,
    mut rx: mpsc::UnboundedReceiver<(TaskSpec, Responder, Arrival)>,
) {
    while let Some((spec, responder, received)) = rx.recv().await {
        let Some(executor) = executor.upgrade() else {
            return;
        };
        let Some(core) = executor.core.upgrade() else {
            return;
        };
        if executor.cancelled.lock().remove(&spec.task) {
            responder.respond(Err(Error::Cancelled));
            continue;
        }
        *current_label().lock() = short_name(&spec.function).to_string();
        let task = spec.task;
        let caller = spec.owner.clone();
        let returns = spec.returns;
        let function = spec.function.clone();
        let core2 = core.clone();
        let started = Arrival::started(received);
        let submitted_ns = spec.submitted_ns;
        let sync = registry::function(&function)
            .is_ok_and(|entry| matches!(entry.invoke, Invoke::Sync(_)));
        let run = tokio::spawn(async move { run_task(&core2, spec).await });
        *executor.running.lock() = Some((task, run.abort_handle(), sync));
        let outcome = match run.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Err(Error::Cancelled),
            Err(e) => Err(Error::TaskError {
                function: function.clone(),
                message: e.to_string(),
            }),
        };
        *executor.running.lock() = None;
        executor.cancelled.lock().remove(&task);
        record_run(
            Work::Task,
            || Counters::functions().of(&function),
            (task, core.job, submitted_ns),
            (received, started),
            outcome.is_ok(),
        );
        let reply = match outcome {
            Ok(encoded) => finish(&core, encoded, returns, &caller)
                .await
                .map(Reply::Done),
            Err(e) => Err(e),
        };
        responder.respond(reply);
    }
}

async fn run_task(core: &Core, spec: TaskSpec) -> Result<Encoded> {
    let entry = registry::function(&spec.function)?;
    let args = resolve(core, spec.args).await?;
    match entry.invoke {
        Invoke::Sync(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(args))).map_err(|p| {
            Error::TaskError {
                function: spec.function.clone(),
                message: panic_message(p),
            }
        })?,
        Invoke::Async(f) => AssertUnwindSafe(f(args))
            .catch_unwind()
            .await
            .map_err(|p| Error::TaskError {
                function: spec.function.clone(),
                message: panic_message(p),
            })?,
    }
}

async fn actor_loop(
    core: Weak<Core>,
    instance: Arc<dyn ActorObject>,
    class: Arc<HostedClass>,
    permits: Arc<tokio::sync::Semaphore>,
    max_concurrency: u32,
    mut rx: mpsc::UnboundedReceiver<(CallSpec, Responder, Arrival)>,
) {
    while let Some((spec, responder, received)) = rx.recv().await {
        let Some(core) = core.upgrade() else { return };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let instance = instance.clone();
        let class = class.clone();
        let call = async move {
            let stamps = (received, Arrival::started(received));
            run_call(&core, instance, &class, spec, responder, stamps).await;
            drop(permit);
        };
        if max_concurrency == 1 {
            call.await;
        } else {
            tokio::spawn(call);
        }
    }
}

/// Runs one actor call, stamped when it reached this worker and when it
/// started, and answers it.
async fn run_call(
    core: &Core,
    instance: Arc<dyn ActorObject>,
    class: &HostedClass,
    spec: CallSpec,
    responder: Responder,
    (received, started): (Arrival, Arrival),
) {
    let caller = spec.owner.clone();
    let returns = spec.returns;
    let (task, submitted_ns) = (spec.task, spec.submitted_ns);
    let outcome = match resolve(core, spec.args).await {
        Ok(args) => AssertUnwindSafe(instance.invoke(&spec.method, args))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| {
                Err(Error::TaskError {
                    function: format!("{}::{}", short_name(&class.name), spec.method),
                    message: panic_message(p),
                })
            }),
        Err(e) => Err(e),
    };
    record_run(
        Work::ActorCall,
        || class.counters.of(&spec.method),
        (task, core.job, submitted_ns),
        (received, started),
        outcome.is_ok(),
    );
    let reply = match outcome {
        Ok(encoded) => finish(core, encoded, returns, &caller)
            .await
            .map(Reply::Done),
        Err(e) => Err(e),
    };
    responder.respond(reply);
}

/// Turns wire arguments into values the function can decode, fetching
/// stored ones (from other nodes if need be).
pub(crate) async fn resolve(core: &Core, args: Vec<WireArg>) -> Result<Args> {
    let mut items = Vec::with_capacity(args.len());
    for arg in args {
        items.push(match arg {
            WireArg::Inline(bytes) => ArgData::Inline(bytes),
            WireArg::Stored { id, nodes, owner } => {
                ArgData::Stored(core.objects.fetch_stored(id, &nodes, &owner).await?)
            }
        });
    }
    Ok(Args { items })
}

/// Packs a return value: inline when small, into this node's store when
/// large; registers the caller as borrower of the references inside it, and
/// lists the borrows this process still holds.
pub(crate) async fn finish(
    core: &Core,
    encoded: Encoded,
    returns: ObjectId,
    caller: &Address,
) -> Result<TaskResult> {
    let value = if encoded.bytes.len() <= INLINE_LIMIT {
        ReturnValue::Inline(encoded.bytes)
    } else {
        let mut buf = core
            .store
            .create(returns, encoded.bytes.len() as u64)
            .map_err(|e| match e {
                braid_store::CreateError::StoreFull { .. } => Error::StoreFull(e.to_string()),
                e => Error::io("store create", e),
            })?;
        buf.as_mut_slice().copy_from_slice(&encoded.bytes);
        buf.seal().map_err(|e| Error::io("store seal", e))?;
        ReturnValue::Stored(core.node_id)
    };
    let mut contained = Vec::with_capacity(encoded.refs.len());
    for handle in &encoded.refs {
        if handle.owner.worker == core.me.worker {
            core.refs.add_borrower(handle.id, caller.worker);
        } else if handle.owner.worker != caller.worker {
            if let Ok(conn) = core.peers.to(&handle.owner).await {
                conn.send(Message::AddBorrower {
                    id: handle.id,
                    borrower: caller.clone(),
                });
            }
        }
        contained.push((handle.id, (*handle.owner).clone()));
    }
    let borrowed = core.refs.take_unregistered();
    drop(encoded.refs);
    Ok(TaskResult {
        value,
        contained,
        borrowed,
        executor: (*core.me).clone(),
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    crate::panics::message(payload.as_ref())
}
