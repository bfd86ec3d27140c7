//! The head's in-memory tables and the decisions made on them: node
//! liveness, actor names and states, node picking and placement-group
//! planning. Nothing here does I/O; the [service](super::head_service)
//! calls the nodes with what these methods return.

use super::types::{
    ActorLookup, ActorRecord, ActorSpec, ActorState, ActorUpdate, ClusterStatusRecord, JobInfo,
    JobRecord, NodeHeartbeat, NodeInfo, NodeRecord, PickNodeOptions, PlacementGroupRecord,
    PlacementGroupSpec, PlacementStrategy, ResourceMap, SchedulingStrategy,
};
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Tolerance when comparing resource amounts.
const EPSILON: f64 = 1e-9;

/// Death cause of actors whose job finished.
pub(crate) const CAUSE_JOB_FINISHED: &str = "owner job finished";
/// Death cause of actors killed through the head.
pub(crate) const CAUSE_KILLED: &str = "killed";
/// Death cause of actors whose node stopped heartbeating.
pub(crate) const CAUSE_NODE_DIED: &str = "node died";
/// Death cause of actors whose node unregistered.
pub(crate) const CAUSE_NODE_LEFT: &str = "node left the cluster";
/// Death cause: the node's connection to the head closed and it did not
/// answer a ping.
pub(crate) const CAUSE_NODE_LOST: &str = "node's connection to the head closed";

/// Why the head refused a request; the service turns it into a status.
mod metrics;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The thing asked for does not exist.
    NotFound(String),
    /// A name or id is taken.
    AlreadyExists(String),
    /// No node can ever satisfy the demand.
    Infeasible(String),
    /// The demand fits the cluster, but not what is free now.
    NotNow(String),
    /// The actor is dead; it cannot change state any more.
    ActorDead(String),
    /// The request makes no sense.
    Invalid(String),
}

/// A node the service has to call: its id and gRPC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeTarget {
    pub(crate) node_id: NodeId,
    pub(crate) address: String,
}

/// A worker the service has to tell a node to kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KillOrder {
    pub(crate) node: NodeTarget,
    pub(crate) actor_id: ActorId,
    pub(crate) worker_pid: u32,
    pub(crate) no_restart: bool,
}

/// What finishing a job requires of the service.
#[derive(Debug, Default)]
pub(crate) struct JobCleanup {
    /// Actors marked dead.
    pub(crate) dead_actors: Vec<ActorId>,
    /// Every alive node, to be told the job finished.
    pub(crate) nodes: Vec<NodeTarget>,
    /// Placement groups removed, with the nodes holding their bundles.
    pub(crate) placement_groups: Vec<(PlacementGroupId, Vec<NodeTarget>)>,
}

#[derive(Debug)]
struct NodeEntry {
    info: NodeInfo,
    available: ResourceMap,
    store_used: u64,
    store_capacity: u64,
    num_workers: u32,
    alive: bool,
    last_heard: Instant,
    /// When it was declared dead or left.
    ended: Option<Instant>,
}

#[derive(Debug)]
struct PgEntry {
    record: PlacementGroupRecord,
    /// False while the bundles are being reserved on the nodes.
    committed: bool,
}

/// How many dead actors' records the head keeps (Ray's head keeps up to
/// 100,000 destroyed actors); older ones are dropped.
pub(crate) const MAX_DEAD_ACTORS: usize = 10_000;

/// How long the head keeps what ended (dead actors and nodes, finished
/// jobs) for `braid list` and the dashboard: their death causes and exit
/// times stay readable for an hour, and a cluster up for months does not
/// keep every one.
pub(crate) const KEEP_ENDED: Duration = Duration::from_secs(3600);

/// The head's tables.
#[derive(Debug)]
pub(crate) struct HeadState {
    cluster_id: String,
    nodes: HashMap<NodeId, NodeEntry>,
    jobs: HashMap<JobId, JobRecord>,
    actors: HashMap<ActorId, ActorRecord>,
    /// Dead actors and when they died, oldest death first: past
    /// [`MAX_DEAD_ACTORS`] or [`KEEP_ENDED`] the oldest records are
    /// dropped, so a job that fails and restarts for days keeps the head's
    /// memory bounded.
    dead: VecDeque<(ActorId, Instant)>,
    pgs: HashMap<PlacementGroupId, PgEntry>,
    /// The node SPREAD picked last.
    spread_cursor: Option<NodeId>,
    /// Actor restarts reported since the head started.
    actor_restarts: u64,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn amount(map: &ResourceMap, name: &str) -> f64 {
    map.get(name).copied().unwrap_or(0.0)
}

/// Whether `have` covers `demand`.
fn fits(demand: &ResourceMap, have: &ResourceMap) -> bool {
    demand
        .iter()
        .all(|(name, &want)| want <= EPSILON || amount(have, name) + EPSILON >= want)
}

/// Takes `demand` out of `from`, never below zero.
fn subtract(from: &mut ResourceMap, demand: &ResourceMap) {
    for (name, &want) in demand {
        let have = from.entry(name.clone()).or_insert(0.0);
        *have = (*have - want).max(0.0);
    }
}

fn add(to: &mut ResourceMap, more: &ResourceMap) {
    for (name, &amount) in more {
        *to.entry(name.clone()).or_insert(0.0) += amount;
    }
}

fn describe(resources: &ResourceMap) -> String {
    if resources.is_empty() {
        return "{}".to_owned();
    }
    let parts: Vec<String> = resources
        .iter()
        .map(|(name, amount)| format!("{name}: {amount}"))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// How utilized `node` would be once `demand` is taken from it.
fn utilization(node: &NodeEntry, demand: &ResourceMap) -> f64 {
    use crate::resources::Resources;
    // The maps are small (a few resources), so copying them costs little
    // beside the pick's RPC.
    Resources(node.info.resources_total.clone()).utilization_after(
        &Resources(node.available.clone()),
        &Resources(demand.clone()),
    )
}

/// Weight used to order bundles from largest to smallest.
fn weight(resources: &ResourceMap) -> f64 {
    amount(resources, "CPU") * 1e6 + resources.values().sum::<f64>()
}

impl HeadState {
    /// Empty tables for a cluster.
    pub(crate) fn new(cluster_id: String) -> HeadState {
        HeadState {
            cluster_id,
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            actors: HashMap::new(),
            dead: VecDeque::new(),
            pgs: HashMap::new(),
            spread_cursor: None,
            actor_restarts: 0,
        }
    }

    /// The cluster's id.
    pub(crate) fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    // ------------------------------------------------------------ nodes --

    /// Registers a node, replacing an earlier registration of the same id.
    pub(crate) fn register_node(&mut self, info: NodeInfo, now: Instant) {
        let entry = NodeEntry {
            available: info.resources_total.clone(),
            store_used: 0,
            store_capacity: info.store_capacity,
            num_workers: 0,
            alive: true,
            last_heard: now,
            ended: None,
            info,
        };
        self.nodes.insert(entry.info.node_id, entry);
    }

    /// Records a heartbeat; false when the node is unknown or was declared
    /// dead, so it must register again.
    pub(crate) fn heartbeat(&mut self, beat: NodeHeartbeat, now: Instant) -> bool {
        match self.nodes.get_mut(&beat.node_id) {
            Some(node) if node.alive => {
                node.available = beat.resources_available;
                node.store_used = beat.store_used;
                node.store_capacity = beat.store_capacity;
                node.num_workers = beat.num_workers;
                node.last_heard = now;
                true
            }
            _ => false,
        }
    }

    /// Marks a node gone and its actors dead, or RESTARTING when they have
    /// restarts left (their owners restart them elsewhere); returns the
    /// actors that died for good.
    fn node_gone(&mut self, node_id: NodeId, cause: &str) -> Vec<ActorId> {
        if let Some(node) = self.nodes.get_mut(&node_id) {
            node.alive = false;
            node.ended.get_or_insert_with(Instant::now);
        }
        let mut dead = Vec::new();
        for actor in self.actors.values_mut() {
            if actor.node_id == Some(node_id) && actor.state != ActorState::Dead {
                let restarts_left = actor.spec.max_restarts < 0
                    || i64::from(actor.restarts) < i64::from(actor.spec.max_restarts);
                actor.death_cause = cause.to_owned();
                if restarts_left {
                    actor.state = ActorState::Restarting;
                } else {
                    actor.state = ActorState::Dead;
                    dead.push(actor.spec.actor_id);
                }
            }
        }
        self.buried(&dead);
        dead
    }

    /// Declares an alive node dead (its connection to the head closed and
    /// it did not answer); `None` when it was not alive.
    pub(crate) fn declare_dead(&mut self, node_id: NodeId, cause: &str) -> Option<Vec<ActorId>> {
        let alive = self.nodes.get(&node_id).is_some_and(|n| n.alive);
        alive.then(|| self.node_gone(node_id, cause))
    }

    /// Whether `node_id` is registered and alive.
    pub(crate) fn is_alive(&self, node_id: NodeId) -> bool {
        self.nodes.get(&node_id).is_some_and(|n| n.alive)
    }

    /// Every node declared dead.
    pub(crate) fn dead_nodes(&self) -> Vec<NodeId> {
        let mut dead: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.alive)
            .map(|n| n.info.node_id)
            .collect();
        dead.sort_unstable();
        dead
    }

    /// The gRPC address of a node.
    pub(crate) fn grpc_address(&self, node_id: NodeId) -> Option<String> {
        self.nodes
            .get(&node_id)
            .map(|n| n.info.grpc_address.clone())
    }

    /// Records deaths, dropping the oldest dead actors' records past
    /// [`MAX_DEAD_ACTORS`].
    fn buried(&mut self, ids: &[ActorId]) {
        let now = Instant::now();
        self.dead.extend(ids.iter().map(|&id| (id, now)));
        while self.dead.len() > MAX_DEAD_ACTORS {
            self.forget_oldest_dead();
        }
    }

    fn forget_oldest_dead(&mut self) {
        if let Some((oldest, _)) = self.dead.pop_front() {
            if self
                .actors
                .get(&oldest)
                .is_some_and(|a| a.state == ActorState::Dead)
            {
                self.actors.remove(&oldest);
            }
        }
    }

    /// Drops the records of actors and nodes dead, and jobs finished, for
    /// longer than `keep` at `now` (Unix ms `now_ms` for jobs).
    pub(crate) fn forget_ended(&mut self, now: Instant, now_ms: u64, keep: Duration) {
        while self
            .dead
            .front()
            .is_some_and(|&(_, died)| now.saturating_duration_since(died) >= keep)
        {
            self.forget_oldest_dead();
        }
        self.nodes.retain(|_, n| {
            n.alive
                || n.ended
                    .is_none_or(|e| now.saturating_duration_since(e) < keep)
        });
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        self.jobs.retain(|_, j| {
            !j.finished
                || j.end_time_ms
                    .is_none_or(|e| now_ms.saturating_sub(e) < keep_ms)
        });
    }

    /// A node leaves the cluster; returns the actors that died with it.
    pub(crate) fn unregister_node(&mut self, node_id: NodeId) -> Result<Vec<ActorId>, Refusal> {
        if !self.nodes.contains_key(&node_id) {
            return Err(Refusal::NotFound(format!("no node {node_id}")));
        }
        Ok(self.node_gone(node_id, CAUSE_NODE_LEFT))
    }

    /// Declares dead every alive node not heard from for `timeout`; returns
    /// each with the actors that died with it.
    pub(crate) fn expire_nodes(
        &mut self,
        now: Instant,
        timeout: Duration,
    ) -> Vec<(NodeId, Vec<ActorId>)> {
        let expired: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.alive && now.saturating_duration_since(n.last_heard) >= timeout)
            .map(|n| n.info.node_id)
            .collect();
        expired
            .into_iter()
            .map(|id| (id, self.node_gone(id, CAUSE_NODE_DIED)))
            .collect()
    }

    /// Every node, sorted by id.
    pub(crate) fn list_nodes(&self, now: Instant) -> Vec<NodeRecord> {
        let mut nodes: Vec<NodeRecord> = self
            .nodes
            .values()
            .map(|n| NodeRecord {
                info: n.info.clone(),
                resources_available: n.available.clone(),
                store_used: n.store_used,
                store_capacity: n.store_capacity,
                num_workers: n.num_workers,
                alive: n.alive,
                since_heartbeat: now.saturating_duration_since(n.last_heard),
            })
            .collect();
        nodes.sort_by_key(|n| n.info.node_id);
        nodes
    }

    fn target(&self, node_id: NodeId) -> Option<NodeTarget> {
        self.nodes
            .get(&node_id)
            .filter(|n| n.alive)
            .map(|n| NodeTarget {
                node_id,
                address: n.info.grpc_address.clone(),
            })
    }

    fn alive_targets(&self) -> Vec<NodeTarget> {
        let mut targets: Vec<NodeTarget> = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| NodeTarget {
                node_id: n.info.node_id,
                address: n.info.grpc_address.clone(),
            })
            .collect();
        targets.sort_by_key(|t| t.node_id);
        targets
    }

    // ------------------------------------------------------------- jobs --

    /// Registers a job (again: the registration is replaced).
    pub(crate) fn register_job(&mut self, info: JobInfo) {
        self.jobs.insert(
            info.job_id,
            JobRecord {
                info,
                finished: false,
                start_time_ms: unix_millis(),
                end_time_ms: None,
            },
        );
    }

    /// Marks a job finished, its non-detached actors dead and its placement
    /// groups removed, and says which nodes to tell.
    pub(crate) fn finish_job(&mut self, job_id: JobId) -> JobCleanup {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            if !job.finished {
                job.finished = true;
                job.end_time_ms = Some(unix_millis());
            }
        }
        let mut cleanup = JobCleanup::default();
        for actor in self.actors.values_mut() {
            if actor.spec.job_id == job_id
                && !actor.spec.detached
                && actor.state != ActorState::Dead
            {
                actor.state = ActorState::Dead;
                actor.death_cause = CAUSE_JOB_FINISHED.to_owned();
                cleanup.dead_actors.push(actor.spec.actor_id);
            }
        }
        let dead = cleanup.dead_actors.clone();
        self.buried(&dead);
        let owned: Vec<PlacementGroupId> = self
            .pgs
            .values()
            // Groups still being created go too: their creation then fails
            // and releases what it reserved.
            .filter(|pg| pg.record.spec.job_id == Some(job_id))
            .map(|pg| pg.record.spec.pg_id)
            .collect();
        for pg_id in owned {
            if let Some(targets) = self.remove_placement_group(pg_id) {
                cleanup.placement_groups.push((pg_id, targets));
            }
        }
        cleanup.nodes = self.alive_targets();
        cleanup
    }

    /// Every job, oldest first.
    pub(crate) fn list_jobs(&self) -> Vec<JobRecord> {
        let mut jobs: Vec<JobRecord> = self.jobs.values().cloned().collect();
        jobs.sort_by_key(|j| (j.start_time_ms, j.info.job_id));
        jobs
    }

    // ----------------------------------------------------------- actors --

    fn live_actor_named(&self, name: &str) -> Option<&ActorRecord> {
        self.actors
            .values()
            .find(|a| a.state != ActorState::Dead && a.spec.name.as_deref() == Some(name))
    }

    /// Registers an actor as PENDING. Registering the same id again is a
    /// no-op (a retried call); a name held by a live actor is refused.
    pub(crate) fn register_actor(&mut self, spec: ActorSpec) -> Result<(), Refusal> {
        if self.actors.contains_key(&spec.actor_id) {
            return Ok(());
        }
        if let Some(name) = &spec.name {
            if self.live_actor_named(name).is_some() {
                return Err(Refusal::AlreadyExists(format!(
                    "actor name {name} is taken"
                )));
            }
        }
        self.actors.insert(
            spec.actor_id,
            ActorRecord {
                spec,
                state: ActorState::Pending,
                node_id: None,
                worker_address: String::new(),
                worker_pid: 0,
                restarts: 0,
                death_cause: String::new(),
            },
        );
        Ok(())
    }

    /// Applies an actor's new state. DEAD is final.
    pub(crate) fn update_actor(&mut self, update: ActorUpdate) -> Result<(), Refusal> {
        let actor = self
            .actors
            .get_mut(&update.actor_id)
            .ok_or_else(|| Refusal::NotFound(format!("no actor {}", update.actor_id)))?;
        if actor.state == ActorState::Dead {
            return Err(Refusal::ActorDead(actor.death_cause.clone()));
        }
        actor.state = update.state;
        actor.node_id = update.node_id;
        actor.worker_address = update.worker_address;
        actor.worker_pid = update.worker_pid;
        self.actor_restarts += u64::from(update.restarts.saturating_sub(actor.restarts));
        actor.restarts = update.restarts;
        actor.death_cause = update.death_cause;
        if update.state == ActorState::Dead {
            self.buried(&[update.actor_id]);
        }
        Ok(())
    }

    fn find_actor(&self, lookup: &ActorLookup) -> Option<&ActorRecord> {
        match lookup {
            ActorLookup::Id(id) => self.actors.get(id),
            ActorLookup::Name(name) => self.live_actor_named(name),
        }
    }

    /// Looks an actor up: by id in any state, by name among live actors.
    pub(crate) fn get_actor(&self, lookup: &ActorLookup) -> Result<ActorRecord, Refusal> {
        self.find_actor(lookup)
            .cloned()
            .ok_or_else(|| Refusal::NotFound(format!("no actor {lookup}")))
    }

    /// Every actor, sorted by id.
    pub(crate) fn list_actors(&self) -> Vec<ActorRecord> {
        let mut actors: Vec<ActorRecord> = self.actors.values().cloned().collect();
        actors.sort_by_key(|a| a.spec.actor_id);
        actors
    }

    /// Kills an actor: DEAD, or RESTARTING when `no_restart` is false and it
    /// has restarts left. Returns the order for its node, if it has a live
    /// one and is not dead already.
    pub(crate) fn kill_actor(
        &mut self,
        lookup: &ActorLookup,
        no_restart: bool,
    ) -> Result<Option<KillOrder>, Refusal> {
        let id = self
            .find_actor(lookup)
            .map(|a| a.spec.actor_id)
            .ok_or_else(|| Refusal::NotFound(format!("no actor {lookup}")))?;
        let (node_id, worker_pid, final_death) = {
            let Some(actor) = self.actors.get_mut(&id) else {
                return Err(Refusal::NotFound(format!("no actor {lookup}")));
            };
            if actor.state == ActorState::Dead {
                return Ok(None);
            }
            let restarts_left = actor.spec.max_restarts < 0
                || i64::from(actor.restarts) < i64::from(actor.spec.max_restarts);
            let final_death = no_restart || !restarts_left;
            actor.state = if final_death {
                ActorState::Dead
            } else {
                ActorState::Restarting
            };
            actor.death_cause = CAUSE_KILLED.to_owned();
            (actor.node_id, actor.worker_pid, final_death)
        };
        if final_death {
            self.buried(&[id]);
        }
        Ok(node_id.and_then(|n| self.target(n)).map(|node| KillOrder {
            node,
            actor_id: id,
            worker_pid,
            no_restart: final_death,
        }))
    }

    // ------------------------------------------------------- scheduling --

    /// Chooses a node for `options.resources`: an alive node whose totals
    /// cover them, preferring nodes with them free now (DEFAULT: the least
    /// utilized once they are taken; SPREAD: round-robin). With
    /// `available_only` or `below_utilization` only such nodes qualify
    /// ([`Refusal::NotNow`] when none does). The chosen node's free view is
    /// debited until its next resource report, so a burst of picks
    /// spreads.
    pub(crate) fn pick_node(&mut self, options: &PickNodeOptions) -> Result<NodeInfo, Refusal> {
        let demand = &options.resources;
        if let Some(affinity) = options.affinity {
            let usable = self
                .nodes
                .get(&affinity.node_id)
                .is_some_and(|n| n.alive && fits(demand, &n.info.resources_total));
            if usable {
                return self.debit_pick(affinity.node_id, demand);
            }
            if !affinity.soft {
                return Err(Refusal::Infeasible(format!(
                    "node {} (required by affinity) is not alive or lacks {}",
                    affinity.node_id,
                    describe(demand)
                )));
            }
        }
        let mut feasible: Vec<&NodeEntry> = self
            .nodes
            .values()
            .filter(|n| {
                n.alive
                    && !options.exclude.contains(&n.info.node_id)
                    && fits(demand, &n.info.resources_total)
            })
            .collect();
        if feasible.is_empty() {
            return Err(Refusal::Infeasible(format!(
                "no alive node has {}",
                describe(demand)
            )));
        }
        feasible.sort_by_key(|n| n.info.node_id);
        let free: Vec<&NodeEntry> = feasible
            .iter()
            .copied()
            .filter(|n| fits(demand, &n.available))
            .filter(|n| {
                options
                    .below_utilization
                    .is_none_or(|bound| utilization(n, demand) < bound)
            })
            .collect();
        if free.is_empty() && (options.available_only || options.below_utilization.is_some()) {
            return Err(Refusal::NotNow(format!(
                "no other node has {} free",
                describe(demand)
            )));
        }
        let pool = if free.is_empty() { feasible } else { free };
        let chosen = match options.strategy {
            SchedulingStrategy::Default => pool
                .iter()
                .min_by(|a, b| {
                    utilization(a, demand)
                        .total_cmp(&utilization(b, demand))
                        // Equally utilized: the lower id wins.
                        .then_with(|| a.info.node_id.cmp(&b.info.node_id))
                })
                .map(|n| n.info.node_id),
            SchedulingStrategy::Spread => {
                let after = self.spread_cursor;
                pool.iter()
                    .find(|n| after.is_some_and(|c| n.info.node_id > c))
                    .or_else(|| pool.first())
                    .map(|n| n.info.node_id)
            }
        };
        let Some(chosen) = chosen else {
            return Err(Refusal::Infeasible(format!(
                "no alive node has {}",
                describe(demand)
            )));
        };
        if options.strategy == SchedulingStrategy::Spread {
            self.spread_cursor = Some(chosen);
        }
        self.debit_pick(chosen, demand)
    }

    fn debit_pick(&mut self, node_id: NodeId, demand: &ResourceMap) -> Result<NodeInfo, Refusal> {
        let node = self
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| Refusal::NotFound(format!("no node {node_id}")))?;
        subtract(&mut node.available, demand);
        Ok(node.info.clone())
    }

    // ------------------------------------------------- placement groups --

    /// What each alive node has for new bundles: its totals less the
    /// bundles of every placement group placed on it.
    fn pg_free(&self) -> Vec<(NodeId, ResourceMap)> {
        let mut reserved: HashMap<NodeId, ResourceMap> = HashMap::new();
        for pg in self.pgs.values() {
            for (bundle, node) in pg.record.spec.bundles.iter().zip(&pg.record.bundle_nodes) {
                add(reserved.entry(*node).or_default(), bundle);
            }
        }
        let mut free: Vec<(NodeId, ResourceMap)> = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| {
                let mut have = n.info.resources_total.clone();
                if let Some(r) = reserved.get(&n.info.node_id) {
                    subtract(&mut have, r);
                }
                (n.info.node_id, have)
            })
            .collect();
        free.sort_by_key(|(id, _)| *id);
        free
    }

    fn pg_totals(&self) -> Vec<(NodeId, ResourceMap)> {
        let mut totals: Vec<(NodeId, ResourceMap)> = self
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| (n.info.node_id, n.info.resources_total.clone()))
            .collect();
        totals.sort_by_key(|(id, _)| *id);
        totals
    }

    /// Chooses a node for every bundle and records the group as being
    /// reserved, so a concurrent creation cannot take the same resources.
    /// An existing group with the same id is answered with its placement.
    /// The caller reserves the bundles on the nodes, then calls
    /// [`commit_placement_group`](Self::commit_placement_group) or
    /// [`remove_placement_group`](Self::remove_placement_group).
    pub(crate) fn plan_placement_group(
        &mut self,
        spec: PlacementGroupSpec,
    ) -> Result<PgPlan, Refusal> {
        if let Some(existing) = self.pgs.get(&spec.pg_id) {
            if !existing.committed {
                return Err(Refusal::AlreadyExists(format!(
                    "placement group {} is being created",
                    spec.pg_id
                )));
            }
            return Ok(PgPlan::Existing(existing.record.bundle_nodes.clone()));
        }
        if spec.bundles.is_empty() {
            return Err(Refusal::Invalid("a placement group needs bundles".into()));
        }
        if place(spec.strategy, &spec.bundles, self.pg_totals()).is_none() {
            return Err(Refusal::Infeasible(format!(
                "placement group {} ({:?} of {}): the alive nodes can never hold it",
                spec.pg_id,
                spec.strategy,
                describe_bundles(&spec.bundles)
            )));
        }
        let Some(bundle_nodes) = place(spec.strategy, &spec.bundles, self.pg_free()) else {
            return Err(Refusal::NotNow(format!(
                "placement group {} ({:?} of {}): not enough resources are free now",
                spec.pg_id,
                spec.strategy,
                describe_bundles(&spec.bundles)
            )));
        };
        let mut per_node: BTreeMap<NodeId, Vec<(u32, ResourceMap)>> = BTreeMap::new();
        for (index, (bundle, node)) in spec.bundles.iter().zip(&bundle_nodes).enumerate() {
            per_node
                .entry(*node)
                .or_default()
                .push((u32::try_from(index).unwrap_or(u32::MAX), bundle.clone()));
        }
        let reservations = per_node
            .into_iter()
            .filter_map(|(node_id, bundles)| self.target(node_id).map(|t| (t, bundles)))
            .collect();
        self.pgs.insert(
            spec.pg_id,
            PgEntry {
                record: PlacementGroupRecord {
                    spec,
                    bundle_nodes: bundle_nodes.clone(),
                    created_ms: unix_millis(),
                },
                committed: false,
            },
        );
        Ok(PgPlan::New {
            bundle_nodes,
            reservations,
        })
    }

    /// The bundles were reserved on every node: the group exists. False
    /// if the group was removed meanwhile.
    pub(crate) fn commit_placement_group(&mut self, pg_id: PlacementGroupId) -> bool {
        match self.pgs.get_mut(&pg_id) {
            Some(pg) => {
                pg.committed = true;
                true
            }
            None => false,
        }
    }

    /// Forgets a group; returns the alive nodes holding its bundles, to be
    /// told to release them, or `None` if there is no such group.
    pub(crate) fn remove_placement_group(
        &mut self,
        pg_id: PlacementGroupId,
    ) -> Option<Vec<NodeTarget>> {
        let pg = self.pgs.remove(&pg_id)?;
        let mut nodes = pg.record.bundle_nodes;
        nodes.sort();
        nodes.dedup();
        Some(nodes.into_iter().filter_map(|n| self.target(n)).collect())
    }

    /// Looks a created group up.
    pub(crate) fn get_placement_group(
        &self,
        pg_id: PlacementGroupId,
    ) -> Result<PlacementGroupRecord, Refusal> {
        self.pgs
            .get(&pg_id)
            .filter(|pg| pg.committed)
            .map(|pg| pg.record.clone())
            .ok_or_else(|| Refusal::NotFound(format!("no placement group {pg_id}")))
    }

    /// Every created group, sorted by id.
    pub(crate) fn list_placement_groups(&self) -> Vec<PlacementGroupRecord> {
        let mut pgs: Vec<PlacementGroupRecord> = self
            .pgs
            .values()
            .filter(|pg| pg.committed)
            .map(|pg| pg.record.clone())
            .collect();
        pgs.sort_by_key(|pg| pg.spec.pg_id);
        pgs
    }

    // ----------------------------------------------------------- status --

    /// Everything at once.
    pub(crate) fn status(&self, now: Instant) -> ClusterStatusRecord {
        ClusterStatusRecord {
            cluster_id: self.cluster_id.clone(),
            nodes: self.list_nodes(now),
            actors: self.list_actors(),
            placement_groups: self.list_placement_groups(),
            jobs: self.list_jobs(),
            metrics_address: String::new(),
        }
    }
}

/// The outcome of planning a placement group.
#[derive(Debug)]
pub(crate) enum PgPlan {
    /// The group exists already; its placement.
    Existing(Vec<NodeId>),
    /// A new placement, to be reserved on the nodes.
    New {
        /// The node of each bundle.
        bundle_nodes: Vec<NodeId>,
        /// The bundles (index, resources) per node.
        reservations: Vec<(NodeTarget, Vec<(u32, ResourceMap)>)>,
    },
}

fn describe_bundles(bundles: &[ResourceMap]) -> String {
    let parts: Vec<String> = bundles.iter().map(describe).collect();
    format!("[{}]", parts.join(", "))
}

/// Chooses a node for each bundle out of `nodes` (id, what it has free), or
/// `None` if the strategy cannot be met. Bundles are placed largest first.
fn place(
    strategy: PlacementStrategy,
    bundles: &[ResourceMap],
    mut nodes: Vec<(NodeId, ResourceMap)>,
) -> Option<Vec<NodeId>> {
    let mut order: Vec<usize> = (0..bundles.len()).collect();
    order.sort_by(|&a, &b| weight(&bundles[b]).total_cmp(&weight(&bundles[a])));

    if matches!(
        strategy,
        PlacementStrategy::Pack | PlacementStrategy::StrictPack
    ) {
        let mut sum = ResourceMap::new();
        for bundle in bundles {
            add(&mut sum, bundle);
        }
        // Best fit: the fitting node with the least CPU free.
        let one = nodes
            .iter()
            .filter(|(_, free)| fits(&sum, free))
            .min_by(|a, b| amount(&a.1, "CPU").total_cmp(&amount(&b.1, "CPU")))
            .map(|(id, _)| *id);
        match (one, strategy) {
            (Some(node), _) => return Some(vec![node; bundles.len()]),
            (None, PlacementStrategy::StrictPack) => return None,
            (None, _) => {}
        }
    }

    let mut chosen: Vec<Option<usize>> = vec![None; bundles.len()];
    let mut used: Vec<usize> = Vec::new();
    for &b in &order {
        let bundle = &bundles[b];
        let fitting = |i: &usize| fits(bundle, &nodes[*i].1);
        let most_free = |a: &usize, b: &usize| {
            amount(&nodes[*a].1, "CPU").total_cmp(&amount(&nodes[*b].1, "CPU"))
        };
        let fresh = (0..nodes.len())
            .filter(|i| !used.contains(i))
            .filter(fitting)
            .max_by(most_free);
        let pick = match strategy {
            PlacementStrategy::Pack => used.iter().copied().find(|i| fitting(i)).or(fresh),
            PlacementStrategy::Spread => fresh.or_else(|| {
                used.iter()
                    .copied()
                    .filter(|i| fitting(i))
                    .max_by(most_free)
            }),
            PlacementStrategy::StrictSpread => fresh,
            PlacementStrategy::StrictPack => None,
        }?;
        subtract(&mut nodes[pick].1, bundle);
        if !used.contains(&pick) {
            used.push(pick);
        }
        chosen[b] = Some(pick);
    }
    chosen.into_iter().map(|c| c.map(|i| nodes[i].0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: f64) -> ResourceMap {
        ResourceMap::from([("CPU".to_owned(), cpu)])
    }

    fn node(id: u128, cpu: f64) -> NodeInfo {
        NodeInfo {
            node_id: NodeId(id),
            hostname: "h".into(),
            pid: 1,
            grpc_address: format!("127.0.0.1:{id}"),
            control: crate::wire::Endpoint {
                machine: crate::wire::MachineId("m".into()),
                socket: String::new(),
                tcp: None,
            },
            store_socket: "/s".into(),
            object_plane: String::new(),
            session_dir: "/d".into(),
            resources_total: res(cpu),
            store_capacity: 1 << 20,
            is_head_node: false,
            metrics_address: String::new(),
        }
    }

    fn state_with(nodes: &[(u128, f64)]) -> HeadState {
        let mut s = HeadState::new("c".into());
        let now = Instant::now();
        for &(id, cpu) in nodes {
            s.register_node(node(id, cpu), now);
        }
        s
    }

    fn pick(s: &mut HeadState, cpu: f64, strategy: SchedulingStrategy) -> Result<u128, Refusal> {
        s.pick_node(&PickNodeOptions {
            resources: res(cpu),
            strategy,
            ..Default::default()
        })
        .map(|n| n.node_id.0)
    }

    #[test]
    fn pick_prefers_free_cpu_and_debits() {
        let mut s = state_with(&[(1, 4.0), (2, 8.0)]);
        assert_eq!(pick(&mut s, 1.0, SchedulingStrategy::Default), Ok(2));
        assert_eq!(pick(&mut s, 4.0, SchedulingStrategy::Default), Ok(2));
        // Node 2 has 3 free now, node 1 has 4.
        assert_eq!(pick(&mut s, 1.0, SchedulingStrategy::Default), Ok(1));
        assert!(matches!(
            pick(&mut s, 16.0, SchedulingStrategy::Default),
            Err(Refusal::Infeasible(_))
        ));
    }

    #[test]
    fn spread_round_robins() {
        let mut s = state_with(&[(1, 4.0), (2, 4.0), (3, 4.0)]);
        let picks: Vec<u128> = (0..4)
            .map(|_| pick(&mut s, 0.0, SchedulingStrategy::Spread).unwrap())
            .collect();
        assert_eq!(picks, vec![1, 2, 3, 1]);
    }

    #[test]
    fn affinity_and_exclude() {
        let mut s = state_with(&[(1, 4.0), (2, 8.0)]);
        let mut options = PickNodeOptions {
            resources: res(1.0),
            exclude: vec![NodeId(2)],
            ..Default::default()
        };
        assert_eq!(s.pick_node(&options).unwrap().node_id, NodeId(1));
        options.exclude.clear();
        options.affinity = Some(super::super::types::NodeAffinity {
            node_id: NodeId(9),
            soft: false,
        });
        assert!(matches!(s.pick_node(&options), Err(Refusal::Infeasible(_))));
        options.affinity = Some(super::super::types::NodeAffinity {
            node_id: NodeId(9),
            soft: true,
        });
        assert!(s.pick_node(&options).is_ok());
    }

    #[test]
    fn placement_strategies() {
        let nodes = vec![(NodeId(1), res(4.0)), (NodeId(2), res(4.0))];
        let two = vec![res(2.0), res(2.0)];
        assert_eq!(
            place(PlacementStrategy::Pack, &two, nodes.clone()),
            Some(vec![NodeId(1), NodeId(1)])
        );
        let spread = place(PlacementStrategy::Spread, &two, nodes.clone()).unwrap();
        assert_ne!(spread[0], spread[1]);
        let three = vec![res(1.0), res(1.0), res(1.0)];
        let spread = place(PlacementStrategy::Spread, &three, nodes.clone()).unwrap();
        assert_eq!(spread.len(), 3);
        assert!(place(PlacementStrategy::StrictSpread, &three, nodes.clone()).is_none());
        let big = vec![res(3.0), res(3.0)];
        assert!(place(PlacementStrategy::StrictPack, &big, nodes.clone()).is_none());
        let packed = place(PlacementStrategy::Pack, &big, nodes.clone()).unwrap();
        assert_ne!(packed[0], packed[1]);
    }

    #[test]
    fn placement_ledger() {
        let mut s = state_with(&[(1, 4.0)]);
        let spec = |id: u128| PlacementGroupSpec {
            pg_id: PlacementGroupId(id),
            name: None,
            bundles: vec![res(3.0)],
            strategy: PlacementStrategy::Pack,
            job_id: None,
        };
        assert!(matches!(
            s.plan_placement_group(spec(1)),
            Ok(PgPlan::New { .. })
        ));
        // Reserved but not committed: a second group does not fit now.
        assert!(matches!(
            s.plan_placement_group(spec(2)),
            Err(Refusal::NotNow(_))
        ));
        assert!(s.commit_placement_group(PlacementGroupId(1)));
        assert!(matches!(
            s.plan_placement_group(spec(1)),
            Ok(PgPlan::Existing(_))
        ));
        assert_eq!(
            s.remove_placement_group(PlacementGroupId(1)).unwrap().len(),
            1
        );
        assert!(matches!(
            s.plan_placement_group(spec(2)),
            Ok(PgPlan::New { .. })
        ));
        let mut huge = spec(3);
        huge.bundles = vec![res(5.0)];
        assert!(matches!(
            s.plan_placement_group(huge),
            Err(Refusal::Infeasible(_))
        ));
    }

    /// An unnamed actor `id` of job 1, class `A`, with no restarts.
    fn plain_actor(id: u128) -> ActorSpec {
        ActorSpec {
            actor_id: ActorId(id),
            job_id: JobId(1),
            class_name: "A".into(),
            name: None,
            detached: false,
            owner_address: String::new(),
            max_restarts: 0,
            resources: ResourceMap::new(),
        }
    }

    #[test]
    fn the_head_keeps_a_bounded_number_of_dead_actors() {
        let mut s = state_with(&[(1, 4.0)]);
        let total = MAX_DEAD_ACTORS as u128 + 50;
        for id in 0..total {
            s.register_actor(plain_actor(id)).unwrap();
            s.kill_actor(&ActorLookup::Id(ActorId(id)), true).unwrap();
        }
        assert_eq!(s.list_actors().len(), MAX_DEAD_ACTORS);
        assert!(
            s.get_actor(&ActorLookup::Id(ActorId(0))).is_err(),
            "the oldest dead are dropped"
        );
        assert!(s.get_actor(&ActorLookup::Id(ActorId(total - 1))).is_ok());
    }

    #[test]
    fn what_ended_is_forgotten_after_keep_ended_and_not_before() {
        let mut s = state_with(&[(1, 4.0), (2, 4.0)]);
        s.register_actor(plain_actor(1)).unwrap();
        s.register_actor(plain_actor(2)).unwrap();
        s.kill_actor(&ActorLookup::Id(ActorId(1)), true).unwrap();
        for job in [1, 2] {
            s.register_job(JobInfo {
                job_id: JobId(job),
                driver_pid: 1,
                driver_address: String::new(),
                exe_path: std::path::PathBuf::new(),
                build_hash: String::new(),
            });
        }
        s.finish_job(JobId(2));
        s.unregister_node(NodeId(2)).unwrap();
        let (now, now_ms) = (Instant::now(), unix_millis());

        let soon = KEEP_ENDED / 2;
        s.forget_ended(now + soon, now_ms + soon.as_millis() as u64, KEEP_ENDED);
        assert!(s.get_actor(&ActorLookup::Id(ActorId(1))).is_ok());
        assert_eq!(s.list_jobs().len(), 2);
        assert_eq!(s.list_nodes(now).len(), 2);

        let late = KEEP_ENDED + Duration::from_secs(1);
        s.forget_ended(now + late, now_ms + late.as_millis() as u64, KEEP_ENDED);
        assert!(
            s.get_actor(&ActorLookup::Id(ActorId(1))).is_err(),
            "a dead actor is forgotten"
        );
        assert!(
            s.get_actor(&ActorLookup::Id(ActorId(2))).is_ok(),
            "a live actor stays"
        );
        let jobs: Vec<JobId> = s.list_jobs().iter().map(|j| j.info.job_id).collect();
        assert_eq!(jobs, vec![JobId(1)], "the finished job is forgotten");
        let nodes: Vec<NodeId> = s.list_nodes(now).iter().map(|n| n.info.node_id).collect();
        assert_eq!(nodes, vec![NodeId(1)], "the node that left is forgotten");
    }

    #[test]
    fn node_expiry_kills_actors() {
        let mut s = state_with(&[(1, 4.0)]);
        let spec = ActorSpec {
            actor_id: ActorId(7),
            job_id: JobId(1),
            class_name: "A".into(),
            name: Some("a".into()),
            detached: false,
            owner_address: String::new(),
            max_restarts: 0,
            resources: ResourceMap::new(),
        };
        s.register_actor(spec.clone()).unwrap();
        s.update_actor(ActorUpdate {
            actor_id: ActorId(7),
            state: ActorState::Alive,
            node_id: Some(NodeId(1)),
            worker_address: String::new(),
            worker_pid: 5,
            restarts: 0,
            death_cause: String::new(),
        })
        .unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let died = s.expire_nodes(later, Duration::from_secs(10));
        assert_eq!(died, vec![(NodeId(1), vec![ActorId(7)])]);
        let actor = s.get_actor(&ActorLookup::Id(ActorId(7))).unwrap();
        assert_eq!(actor.state, ActorState::Dead);
        assert_eq!(actor.death_cause, CAUSE_NODE_DIED);
        // The name is free again, and the dead node must re-register.
        assert!(s.get_actor(&ActorLookup::Name("a".into())).is_err());
        let mut again = spec;
        again.actor_id = ActorId(8);
        assert!(s.register_actor(again).is_ok());
        let beat = NodeHeartbeat {
            node_id: NodeId(1),
            resources_available: res(4.0),
            store_used: 0,
            store_capacity: 0,
            num_workers: 0,
        };
        assert!(!s.heartbeat(beat, later));
    }
}
