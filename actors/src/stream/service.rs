//! Services one subtask offers the others of its job: request/response
//! calls beside the record channels (a parameter-server shard answering
//! pulls). In one process a caller finds a service in the [`registry`];
//! on the cluster runner it calls the subtask's host, wherever it runs,
//! through the [`Peers`] the host installs on its threads.
//!
//! A subtask on the cluster runner answers calls between its input
//! messages (see `cluster::call_server`), so a subtask blocked in a call
//! of its own answers none meanwhile: calls between subtasks must not
//! form a cycle (a shard that pulls from the worker pulling from it
//! would wait forever), as with Ray's synchronous calls between actors.
//!
//! [`registry`]: super::registry

use super::registry;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Answers requests, encoded by the caller and the service alike.
pub trait Service: Send + Sync + 'static {
    /// Answers one request (may block, e.g. until slower workers catch up).
    fn call(&self, request: &[u8]) -> Result<Vec<u8>, String>;

    /// Whether a call may wait on something other than memory (another
    /// subtask's progress, I/O). A host answers a call that cannot on the
    /// thread that received it, without a hop to its blocking pool.
    fn may_block(&self) -> bool {
        true
    }
}

/// Why a call on a service failed.
#[derive(Debug, Error)]
pub enum CallError {
    /// No subtask of that task, or no service of that name, in this attempt.
    #[error("no service {0:?}")]
    NoService(String),
    /// The service answered with an error.
    #[error("service {0:?} failed: {1}")]
    Failed(String, String),
    /// The host of the service could not be reached (its process died).
    #[error("service {0:?} unreachable: {1}")]
    Unreachable(String, String),
}

/// A registered service (the registry holds sized values).
struct Offered(Arc<dyn Service>);

fn key(name: &str) -> String {
    format!("{name}/service")
}

/// Offers `service` under `name` in this process, until the returned
/// [`ServiceGuard`] is dropped.
pub fn offer(name: &str, service: Arc<dyn Service>) -> ServiceGuard {
    let offered = Arc::new(Offered(service));
    registry::register(&key(name), offered.clone());
    ServiceGuard {
        name: name.to_string(),
        offered,
    }
}

/// Offers the service `make()` returns under `name` for the rest of this
/// process's life, unless one is offered under that name already (a
/// subtask built again in the same process keeps the first): for
/// services that answer after their subtask finished, such as a job's
/// final figures, until the job's processes stop.
pub fn offer_for_life(name: &str, make: impl FnOnce() -> Arc<dyn Service>) {
    if registry::get::<Offered>(&key(name)).is_err() {
        registry::register(&key(name), Arc::new(Offered(make())));
    }
}

/// Withdraws the service it was returned for when dropped.
pub struct ServiceGuard {
    name: String,
    offered: Arc<Offered>,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        registry::unregister(&key(&self.name), &self.offered);
    }
}

/// Service `name`, if it is offered in this process now.
pub fn find(name: &str) -> Option<Arc<dyn Service>> {
    registry::get::<Offered>(&key(name))
        .ok()
        .map(|offered| offered.0.clone())
}

/// Calls service `name` offered in this process, waiting up to `wait` for
/// it to be offered (a call may come before the subtask offering it is
/// built: hosts start one by one).
pub fn call_local(name: &str, request: &[u8], wait: Duration) -> Result<Vec<u8>, CallError> {
    let offered = registry::wait_for::<Offered>(&key(name), wait)
        .map_err(|_| CallError::NoService(name.to_string()))?;
    offered
        .0
        .call(request)
        .map_err(|e| CallError::Failed(name.to_string(), e))
}

/// One call of [`Peers::call_many`].
#[derive(Debug, Clone)]
pub struct PeerCall {
    /// The head vertex of the called subtask's task.
    pub task: String,
    /// The called subtask.
    pub subtask: usize,
    /// The service.
    pub service: String,
    /// The request.
    pub request: Vec<u8>,
}

/// The other subtasks of this attempt, wherever they run.
pub trait Peers: Send + Sync {
    /// Calls service `service` of subtask `subtask` of the task whose head
    /// vertex is `task`, blocking until it answers.
    fn call(
        &self,
        task: &str,
        subtask: usize,
        service: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, CallError>;

    /// Several calls at once (each as [`Peers::call`]), answered in order:
    /// their round trips overlap.
    fn call_many(&self, calls: Vec<PeerCall>) -> Vec<Result<Vec<u8>, CallError>> {
        calls
            .into_iter()
            .map(|c| self.call(&c.task, c.subtask, &c.service, c.request))
            .collect()
    }

    /// Where that subtask's process sits on its node's store (to lend it
    /// objects), if known.
    fn seat(&self, _task: &str, _subtask: usize) -> Option<braid::store::StoreSeat> {
        None
    }

    /// The meter of this subtask's channel to that subtask, if it has one:
    /// calls that carry data along the edge (a pull along a push edge)
    /// count on it.
    fn meter(&self, _task: &str, _subtask: usize) -> Option<&super::edges::ChannelMeter> {
        None
    }
}

thread_local! {
    static PEERS: RefCell<Option<Arc<dyn Peers>>> = const { RefCell::new(None) };
}

/// Makes `peers` this thread's (a host's threads, for the subtask it
/// builds and runs).
pub fn enter(peers: Arc<dyn Peers>) {
    PEERS.with(|p| *p.borrow_mut() = Some(peers));
}

/// This thread's peers: set on the cluster runner, none in one process.
pub fn peers() -> Option<Arc<dyn Peers>> {
    PEERS.with(|p| p.borrow().clone())
}
