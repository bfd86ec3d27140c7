//! The node's resource ledger and lease queue: what is free on the node and
//! in each placement-group bundle, which lease requests wait for it, in
//! arrival order, and the node's handling of leases (granting, spilling
//! back, returning) and of bundle reservations.

use super::worker_pool::kill_pid;
use super::{LeaseEntry, Waiting, WorkerState, RESERVE_WAIT};
use crate::error::{Error, Result};
use crate::ids::{JobId, PlacementGroupId};
use crate::resources::Resources;
use crate::rpc::{PickNodeOptions, SchedulingStrategy};
use crate::wire::messages::{Lease, LeaseRequest};
use crate::wire::{Conn, Reply, Responder};
use std::collections::HashMap;

/// The hybrid policy's threshold (Ray's `scheduler_spread_threshold`):
/// a node keeps leases while its utilization with them stays at or below
/// this share, then spills to the least utilized node.
pub const SPREAD_THRESHOLD: f64 = 0.5;

/// How long a node remembers that the head had no other node with room
/// (about one resource report).
const NO_ROOM_MEMORY: std::time::Duration = std::time::Duration::from_millis(100);

/// Waiting requests a busy node tries to move per pass.
const REBALANCE_BATCH: usize = 8;

/// Where a lease request goes.
enum Placement {
    /// Queue it on this node.
    Here,
    /// Ask the head for a node; this one if it has none.
    AskHead(PickNodeOptions),
}

/// Resources reserved for one placement-group bundle.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    pub total: Resources,
    pub available: Resources,
}

/// The node's resources.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub total: Resources,
    pub available: Resources,
    pub bundles: HashMap<(PlacementGroupId, u32), Bundle>,
}

/// Where a lease's resources come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    Node,
    Bundle(PlacementGroupId, u32),
}

impl Ledger {
    pub(crate) fn new(total: Resources) -> Ledger {
        Ledger {
            available: total.clone(),
            total,
            bundles: HashMap::new(),
        }
    }

    fn pool_of(request: &LeaseRequest) -> Pool {
        match request.bundle {
            Some((pg, i)) => Pool::Bundle(pg, i),
            None => Pool::Node,
        }
    }

    /// Whether the request could ever be granted here.
    pub(crate) fn feasible(&self, request: &LeaseRequest) -> Result<bool> {
        match Self::pool_of(request) {
            Pool::Node => Ok(self.total.fits(&request.resources)),
            Pool::Bundle(pg, i) => match self.bundles.get(&(pg, i)) {
                Some(b) => {
                    if b.total.fits(&request.resources) {
                        Ok(true)
                    } else {
                        Err(Error::Infeasible(format!(
                            "{} in bundle {i} of placement group {pg}, which holds {}",
                            request.resources, b.total
                        )))
                    }
                }
                None => Err(Error::BadRequest(format!(
                    "bundle {i} of placement group {pg} is not on this node"
                ))),
            },
        }
    }

    /// Takes the request's resources if they are free now.
    pub(crate) fn try_acquire(&mut self, request: &LeaseRequest) -> Option<Pool> {
        let pool = Self::pool_of(request);
        let avail = match pool {
            Pool::Node => &mut self.available,
            Pool::Bundle(pg, i) => &mut self.bundles.get_mut(&(pg, i))?.available,
        };
        if avail.fits(&request.resources) {
            avail.subtract(&request.resources);
            Some(pool)
        } else {
            None
        }
    }

    /// Gives a lease's resources back.
    pub(crate) fn release(&mut self, pool: Pool, resources: &Resources) {
        match pool {
            Pool::Node => self.available.add(resources, &self.total),
            Pool::Bundle(pg, i) => {
                if let Some(b) = self.bundles.get_mut(&(pg, i)) {
                    b.available.add(resources, &b.total);
                }
            }
        }
    }

    /// Reserves bundles out of the node's resources.
    pub(crate) fn reserve(
        &mut self,
        pg: PlacementGroupId,
        bundles: Vec<(u32, Resources)>,
    ) -> Result<()> {
        let mut need = Resources::new();
        for (_, r) in &bundles {
            for (k, v) in &r.0 {
                need.set(k, need.get(k) + v);
            }
        }
        if !self.available.fits(&need) {
            return Err(Error::Infeasible(format!(
                "bundles {need} on a node with {} free",
                self.available
            )));
        }
        self.available.subtract(&need);
        for (i, r) in bundles {
            self.bundles.insert(
                (pg, i),
                Bundle {
                    total: r.clone(),
                    available: r,
                },
            );
        }
        Ok(())
    }

    /// Releases every bundle of a placement group. Resources still leased
    /// from a bundle return to the node when those leases end.
    pub(crate) fn release_group(&mut self, pg: PlacementGroupId) {
        let keys: Vec<_> = self
            .bundles
            .keys()
            .filter(|(g, _)| *g == pg)
            .copied()
            .collect();
        for key in keys {
            if let Some(b) = self.bundles.remove(&key) {
                self.available.add(&b.available, &self.total);
            }
        }
    }
}

impl super::State {
    /// What is free on the node once the waiting requests that will be
    /// granted from it (as workers become ready) have taken theirs.
    pub(super) fn uncommitted(&self) -> Resources {
        let mut free = self.ledger.available.clone();
        for w in &self.queue {
            if w.request.bundle.is_none() && free.fits(&w.request.resources) {
                free.subtract(&w.request.resources);
            }
        }
        free
    }

    /// How many of `job`'s waiting requests the node has the resources for
    /// now (each wants a worker).
    pub(super) fn grantable(&self, job: JobId) -> usize {
        let mut free = self.ledger.available.clone();
        let mut bundles: HashMap<(PlacementGroupId, u32), Resources> = HashMap::new();
        let mut count = 0;
        for w in &self.queue {
            let r = &w.request;
            let pool = match r.bundle {
                None => &mut free,
                Some(key) => match self.ledger.bundles.get(&key) {
                    Some(b) => bundles.entry(key).or_insert_with(|| b.available.clone()),
                    None => continue,
                },
            };
            if pool.fits(&r.resources) {
                pool.subtract(&r.resources);
                if r.job == job {
                    count += 1;
                }
            }
        }
        count
    }

    /// The waiting requests, by queue index, that this node cannot grant
    /// until a lease ends, and that another node may take: no bundle, not
    /// bound to this node.
    fn stuck(&self) -> Vec<usize> {
        let mut free = self.ledger.available.clone();
        let mut out = Vec::new();
        for (i, w) in self.queue.iter().enumerate() {
            let r = &w.request;
            if r.bundle.is_some() {
                continue;
            }
            if free.fits(&r.resources) {
                free.subtract(&r.resources);
            } else if !r.strict_node {
                out.push(i);
            }
        }
        out
    }
}

/// Leases: answering requests, dispatching waiting ones as resources
/// and workers free up, and placement-group bundles.
impl super::Node {
    pub(super) fn fail_waiting(&self, job: JobId, e: Error) {
        let failed: Vec<Waiting> = {
            let mut state = self.state.lock();
            let (fail, keep): (Vec<_>, Vec<_>) =
                state.queue.drain(..).partition(|w| w.request.job == job);
            state.queue = keep.into();
            fail
        };
        for w in failed {
            w.responder.respond(Err(e.clone()));
        }
    }

    pub(super) fn request_lease(&self, conn: &Conn, request: LeaseRequest, responder: Responder) {
        let feasible = self.state.lock().ledger.feasible(&request);
        match feasible {
            Err(e) => responder.respond(Err(e)),
            Ok(false) if request.strict_node => responder.respond(Err(Error::Infeasible(format!(
                "{} on node {} (it has {})",
                request.resources,
                self.id,
                self.state.lock().ledger.total
            )))),
            Ok(false) => {
                let Some(node) = self.arc() else { return };
                tokio::spawn(async move {
                    let mut exclude = request.avoid.clone();
                    exclude.push(node.id);
                    let options = PickNodeOptions {
                        resources: request.resources.0.clone(),
                        exclude,
                        ..Default::default()
                    };
                    let picked = node.head.pick_node(&options).await;
                    responder.respond(picked.map(|n| Reply::Spillback {
                        node: n.node_id,
                        endpoint: n.control,
                    }));
                });
            }
            Ok(true) => {
                let job = request.job;
                let known = self.state.lock().jobs.contains_key(&job);
                if !known {
                    let Some(node) = self.arc() else { return };
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        match node.adopt_job(job).await {
                            Ok(()) => node.request_lease(&conn, request, responder),
                            Err(e) => responder.respond(Err(e)),
                        }
                    });
                    return;
                }
                match self.placement(&request) {
                    Placement::Here => self.enqueue(conn.id(), request, responder),
                    Placement::AskHead(_) if self.head_has_no_room() => {
                        self.enqueue(conn.id(), request, responder)
                    }
                    Placement::AskHead(options) => {
                        let Some(node) = self.arc() else { return };
                        let holder = conn.id();
                        tokio::spawn(async move {
                            match node.head.pick_node(&options).await {
                                Ok(n) if n.node_id != node.id => {
                                    tracing::debug!(to = %n.node_id, "lease spilled for load");
                                    responder.respond(Ok(Reply::Spillback {
                                        node: n.node_id,
                                        endpoint: n.control,
                                    }));
                                }
                                Ok(_) => node.enqueue(holder, request, responder),
                                Err(_) => {
                                    node.note_no_room();
                                    node.enqueue(holder, request, responder);
                                }
                            }
                        });
                    }
                }
            }
        }
    }

    /// Whether the head said within the last [`NO_ROOM_MEMORY`] that no
    /// other node has room: its view changes only with nodes' reports, so
    /// asking again sooner would only cost a round trip per lease.
    fn head_has_no_room(&self) -> bool {
        self.no_room_until
            .lock()
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    fn note_no_room(&self) {
        *self.no_room_until.lock() = Some(tokio::time::Instant::now() + NO_ROOM_MEMORY);
    }

    fn enqueue(&self, holder: u64, request: LeaseRequest, responder: Responder) {
        let job = request.job;
        self.state.lock().queue.push_back(Waiting {
            request,
            responder,
            holder,
        });
        self.dispatch();
        self.top_up(job);
    }

    /// Where a feasible request goes: a bundle's, a node-bound or an
    /// already spilled request stays; SPREAD asks the head for the next
    /// node round-robin; otherwise (hybrid) it stays while this node's
    /// utilization with it stays at or below [`SPREAD_THRESHOLD`], and
    /// else goes to the least utilized node with the resources free now, if
    /// that is less utilized than this one would be.
    fn placement(&self, request: &LeaseRequest) -> Placement {
        if request.bundle.is_some() || request.strict_node || request.spilled {
            return Placement::Here;
        }
        let state = self.state.lock();
        let ledger = &state.ledger;
        let free = state.uncommitted();
        let mut exclude = request.avoid.clone();
        let resources = request.resources.0.clone();
        if request.spread {
            exclude.retain(|n| *n != self.id);
            return Placement::AskHead(PickNodeOptions {
                resources,
                strategy: SchedulingStrategy::Spread,
                exclude,
                available_only: true,
                ..Default::default()
            });
        }
        let fits = free.fits(&request.resources);
        let after = ledger.total.utilization_after(&free, &request.resources);
        if fits && after <= SPREAD_THRESHOLD {
            return Placement::Here;
        }
        exclude.push(self.id);
        Placement::AskHead(PickNodeOptions {
            resources,
            exclude,
            available_only: true,
            below_utilization: fits.then_some(after),
            ..Default::default()
        })
    }

    /// Moves waiting requests that this node cannot grant now to nodes that
    /// can (a few per call): what a busy node does when others free up.
    pub(super) async fn rebalance(&self) {
        if self.head_has_no_room() {
            return;
        }
        let movable: Vec<(usize, PickNodeOptions)> = {
            let state = self.state.lock();
            state
                .stuck()
                .into_iter()
                .take(REBALANCE_BATCH)
                .filter_map(|i| Some((i, state.queue.get(i)?)))
                .map(|(i, w)| {
                    let mut exclude = w.request.avoid.clone();
                    exclude.push(self.id);
                    (
                        i,
                        PickNodeOptions {
                            resources: w.request.resources.0.clone(),
                            exclude,
                            available_only: true,
                            ..Default::default()
                        },
                    )
                })
                .collect()
        };
        let mut moves = Vec::new();
        for (i, options) in movable {
            match self.head.pick_node(&options).await {
                Ok(n) => moves.push((i, n)),
                Err(_) => {
                    self.note_no_room();
                    break;
                }
            }
        }
        let moved: Vec<(Waiting, crate::rpc::NodeInfo)> = {
            let mut state = self.state.lock();
            // Highest index first, so earlier removals do not shift later
            // ones; a request granted meanwhile is gone or has moved up,
            // which the resource check below tells.
            moves.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
            let mut out = Vec::new();
            let stuck = state.stuck();
            for (i, n) in moves {
                if stuck.contains(&i) {
                    if let Some(w) = state.queue.remove(i) {
                        out.push((w, n));
                    }
                }
            }
            out
        };
        for (w, n) in moved {
            tracing::debug!(to = %n.node_id, "waiting lease moved to a node with room");
            w.responder.respond(Ok(Reply::Spillback {
                node: n.node_id,
                endpoint: n.control,
            }));
        }
    }

    /// Grants waiting leases, in order, while resources and idle workers
    /// allow.
    pub(super) fn dispatch(&self) {
        let mut grants = Vec::new();
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let mut i = 0;
            while i < state.queue.len() {
                let job = state.queue[i].request.job;
                let idle = state
                    .workers
                    .iter()
                    .find(|(_, w)| {
                        w.job == job && matches!(w.state, WorkerState::Idle) && w.conn.is_some()
                    })
                    .map(|(id, _)| *id);
                let Some(worker) = idle else {
                    i += 1;
                    continue;
                };
                let Some(pool) = state.ledger.try_acquire(&state.queue[i].request) else {
                    i += 1;
                    continue;
                };
                let Some(waiting) = state.queue.remove(i) else {
                    break;
                };
                let lease = state.next_lease;
                state.next_lease += 1;
                let Some(w) = state.workers.get_mut(&worker) else {
                    continue;
                };
                w.state = WorkerState::Leased(lease);
                // An actor's lease is an event worth a line; tasks' are
                // too many.
                match waiting.request.actor {
                    Some(actor) => tracing::info!(
                        %job, %actor, pid = w.pid, resources = %waiting.request.resources,
                        "worker leased to an actor"
                    ),
                    None => tracing::debug!(%job, pid = w.pid, "worker leased to tasks"),
                }
                w.actor = waiting.request.actor;
                w.detached = waiting.request.detached;
                let Some(address) = w.address.clone() else {
                    continue;
                };
                state.leases.insert(
                    lease,
                    LeaseEntry {
                        worker,
                        resources: waiting.request.resources.clone(),
                        pool,
                        holder: waiting.holder,
                    },
                );
                grants.push((
                    waiting.responder,
                    Lease {
                        lease,
                        worker: address,
                    },
                ));
            }
            if !state.queue.is_empty() {
                let count = |f: fn(&WorkerState) -> bool| {
                    state.workers.values().filter(|w| f(&w.state)).count()
                };
                tracing::debug!(
                    waiting = state.queue.len(),
                    available = %state.ledger.available,
                    idle = count(|s| matches!(s, WorkerState::Idle)),
                    starting = count(|s| matches!(s, WorkerState::Starting)),
                    leased = count(|s| matches!(s, WorkerState::Leased(_))),
                    "leases waiting"
                );
            }
        }
        let granted = !grants.is_empty();
        for (responder, lease) in &grants {
            let _ = responder;
            tracing::debug!(
                lease = lease.lease,
                worker = lease.worker.pid,
                "lease granted"
            );
        }
        for (responder, lease) in grants {
            responder.respond(Ok(Reply::Leased(lease)));
        }
        if granted {
            let jobs: Vec<JobId> = self.state.lock().jobs.keys().copied().collect();
            for job in jobs {
                self.top_up(job);
            }
        }
    }

    pub(super) fn return_lease(&self, lease: u64, kill: bool) {
        let victim = {
            let mut state = self.state.lock();
            let Some(entry) = state.leases.remove(&lease) else {
                return;
            };
            state.ledger.release(entry.pool, &entry.resources);
            tracing::debug!(lease, kill, available = %state.ledger.available, "lease returned");
            match state.workers.get_mut(&entry.worker) {
                Some(w) if kill || w.actor.is_some() => Some(w.pid),
                Some(w) => {
                    w.state = WorkerState::Idle;
                    None
                }
                None => None,
            }
        };
        if let Some(pid) = victim {
            kill_pid(pid);
        }
        self.released.notify_waiters();
        self.dispatch();
    }

    /// Reserves placement-group bundles, waiting up to [`RESERVE_WAIT`] for
    /// leases to give the resources back when the node has them in total
    /// but not free now.
    pub(super) async fn reserve_bundles(
        &self,
        pg: PlacementGroupId,
        bundles: Vec<(u32, Resources)>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + RESERVE_WAIT;
        loop {
            let released = self.released.notified();
            let attempt = {
                let mut state = self.state.lock();
                let mut need = Resources::new();
                for (_, r) in &bundles {
                    for (k, v) in &r.0 {
                        need.set(k, need.get(k) + v);
                    }
                }
                if !state.ledger.total.fits(&need) {
                    return Err(Error::Infeasible(format!(
                        "bundles {need} on a node with {} in total",
                        state.ledger.total
                    )));
                }
                state.ledger.reserve(pg, bundles.clone())
            };
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    pub(super) fn release_bundles(&self, pg: PlacementGroupId) {
        self.state.lock().ledger.release_group(pg);
        self.dispatch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    fn req(cpus: f64, bundle: Option<(PlacementGroupId, u32)>) -> LeaseRequest {
        LeaseRequest {
            job: JobId(1),
            resources: Resources::cpus(cpus),
            bundle,
            actor: None,
            detached: false,
            strict_node: false,
            spread: false,
            spilled: false,
            avoid: Vec::new(),
        }
    }

    #[test]
    fn bundles_carve_out_node_resources() {
        let mut l = Ledger::new(Resources::cpus(4.0));
        let pg = PlacementGroupId(7);
        l.reserve(pg, vec![(0, Resources::cpus(2.0))]).unwrap();
        assert!(l.try_acquire(&req(3.0, None)).is_none());
        let p = l.try_acquire(&req(2.0, Some((pg, 0)))).unwrap();
        assert!(l.try_acquire(&req(1.0, Some((pg, 0)))).is_none());
        l.release(p, &Resources::cpus(2.0));
        l.release_group(pg);
        assert_eq!(l.available, Resources::cpus(4.0));
        assert!(l.feasible(&req(5.0, None)).is_ok_and(|f| !f));
    }
}
