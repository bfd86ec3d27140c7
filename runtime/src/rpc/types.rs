//! Plain Rust records of what the head knows, and their conversions to and
//! from the wire messages of [`proto`].
//!
//! Conversions to the wire cannot fail (`From`); conversions from the wire
//! check ids and amounts and fail with [`InvalidMessage`], which a server
//! answers as `INVALID_ARGUMENT`.

use super::proto;
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId};
use crate::wire::{Endpoint, MachineId};
use braid_store::ObjectId;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Amount per resource name: `"CPU"` (cores), `"memory"` (bytes) and custom
/// names.
pub type ResourceMap = BTreeMap<String, f64>;

/// A wire message had a malformed field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidMessage {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidMessage {
    /// A field is malformed.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidMessage {
            field,
            reason: reason.into(),
        }
    }
}

impl From<InvalidMessage> for tonic::Status {
    fn from(e: InvalidMessage) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Parses a 32-hex-digit id.
pub fn parse_id<T: FromStr>(field: &'static str, text: &str) -> Result<T, InvalidMessage> {
    if text.is_empty() || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidMessage::new(
            field,
            format!("{text:?} is not a 32-hex-digit id"),
        ));
    }
    text.parse()
        .map_err(|_| InvalidMessage::new(field, format!("{text:?} is not an id")))
}

/// Parses an id that may be absent (the empty string).
pub fn parse_optional_id<T: FromStr>(
    field: &'static str,
    text: &str,
) -> Result<Option<T>, InvalidMessage> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse_id(field, text).map(Some)
    }
}

/// Parses a 16-byte object id.
pub fn parse_object_id(bytes: &[u8]) -> Result<ObjectId, InvalidMessage> {
    let raw: [u8; ObjectId::LEN] = bytes.try_into().map_err(|_| {
        InvalidMessage::new(
            "object_id",
            format!("{} bytes, expected {}", bytes.len(), ObjectId::LEN),
        )
    })?;
    Ok(ObjectId::from_bytes(raw))
}

/// Checks a resource map off the wire: every amount finite and not negative.
pub fn parse_resources(
    field: &'static str,
    map: HashMap<String, f64>,
) -> Result<ResourceMap, InvalidMessage> {
    map.into_iter()
        .map(|(name, amount)| {
            if amount.is_finite() && amount >= 0.0 {
                Ok((name, amount))
            } else {
                Err(InvalidMessage::new(
                    field,
                    format!("amount {amount} of {name:?} is not a finite, non-negative number"),
                ))
            }
        })
        .collect()
}

/// Checks a map of resources free off the wire: every amount finite; a
/// negative amount (a node's rounding, or oversubscription) counts as 0.
pub fn parse_available(
    field: &'static str,
    map: HashMap<String, f64>,
) -> Result<ResourceMap, InvalidMessage> {
    let clamped = map.into_iter().map(|(name, amount)| {
        let amount = if amount < 0.0 { 0.0 } else { amount };
        (name, amount)
    });
    parse_resources(field, clamped.collect())
}

/// A resource map for the wire.
pub fn resources_to_wire(map: &ResourceMap) -> HashMap<String, f64> {
    map.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn path_to_wire(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

fn optional_to_wire<T: fmt::Display>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn required<T>(field: &'static str, value: Option<T>) -> Result<T, InvalidMessage> {
    value.ok_or_else(|| InvalidMessage::new(field, "missing"))
}

// ----------------------------------------------------------------- nodes --

/// What a node registers with the head.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// The node's id.
    pub node_id: NodeId,
    /// Host name of its machine.
    pub hostname: String,
    /// Process id of the node daemon.
    pub pid: u32,
    /// The node's gRPC endpoint, `"host:port"`.
    pub grpc_address: String,
    /// Where the runtime reaches the node's control plane (leases): its
    /// socket on its machine, TCP from others.
    pub control: Endpoint,
    /// Path of the node's object-store socket.
    pub store_socket: PathBuf,
    /// Where its object plane listens (`host:port`; empty if it has none).
    pub object_plane: String,
    /// The node's session directory.
    pub session_dir: PathBuf,
    /// Everything the node has.
    pub resources_total: ResourceMap,
    /// Object-store capacity in bytes.
    pub store_capacity: u64,
    /// Whether the node runs next to the head.
    pub is_head_node: bool,
    /// Where it serves `/metrics` (`host:port`; empty: nowhere).
    pub metrics_address: String,
}

impl From<&NodeInfo> for proto::NodeInfo {
    fn from(n: &NodeInfo) -> Self {
        proto::NodeInfo {
            node_id: n.node_id.to_string(),
            hostname: n.hostname.clone(),
            pid: n.pid,
            grpc_address: n.grpc_address.clone(),
            control_address: n.control.socket.clone(),
            control_tcp: n.control.tcp.clone().unwrap_or_default(),
            machine: n.control.machine.0.clone(),
            object_plane: n.object_plane.clone(),
            store_socket: path_to_wire(&n.store_socket),
            session_dir: path_to_wire(&n.session_dir),
            resources_total: resources_to_wire(&n.resources_total),
            store_capacity: n.store_capacity,
            is_head_node: n.is_head_node,
            metrics_address: n.metrics_address.clone(),
        }
    }
}

impl TryFrom<proto::NodeInfo> for NodeInfo {
    type Error = InvalidMessage;
    fn try_from(n: proto::NodeInfo) -> Result<Self, InvalidMessage> {
        Ok(NodeInfo {
            node_id: parse_id("node_id", &n.node_id)?,
            hostname: n.hostname,
            pid: n.pid,
            grpc_address: n.grpc_address,
            control: Endpoint {
                machine: MachineId(n.machine),
                socket: n.control_address,
                tcp: (!n.control_tcp.is_empty()).then_some(n.control_tcp),
            },
            store_socket: n.store_socket.into(),
            object_plane: n.object_plane,
            session_dir: n.session_dir.into(),
            resources_total: parse_resources("resources_total", n.resources_total)?,
            store_capacity: n.store_capacity,
            is_head_node: n.is_head_node,
            metrics_address: n.metrics_address,
        })
    }
}

/// A node's periodic report to the head.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHeartbeat {
    /// The reporting node.
    pub node_id: NodeId,
    /// Resources free now.
    pub resources_available: ResourceMap,
    /// Object-store bytes in use.
    pub store_used: u64,
    /// Object-store capacity.
    pub store_capacity: u64,
    /// Worker processes running.
    pub num_workers: u32,
}

impl From<&NodeHeartbeat> for proto::HeartbeatRequest {
    fn from(h: &NodeHeartbeat) -> Self {
        proto::HeartbeatRequest {
            node_id: h.node_id.to_string(),
            resources_available: resources_to_wire(&h.resources_available),
            store_used: h.store_used,
            store_capacity: h.store_capacity,
            num_workers: h.num_workers,
        }
    }
}

impl TryFrom<proto::HeartbeatRequest> for NodeHeartbeat {
    type Error = InvalidMessage;
    fn try_from(h: proto::HeartbeatRequest) -> Result<Self, InvalidMessage> {
        Ok(NodeHeartbeat {
            node_id: parse_id("node_id", &h.node_id)?,
            resources_available: parse_available("resources_available", h.resources_available)?,
            store_used: h.store_used,
            store_capacity: h.store_capacity,
            num_workers: h.num_workers,
        })
    }
}

/// A node as the head sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// What the node registered.
    pub info: NodeInfo,
    /// Resources free at the last heartbeat (the totals before the first).
    pub resources_available: ResourceMap,
    /// Object-store bytes in use at the last heartbeat.
    pub store_used: u64,
    /// Object-store capacity at the last heartbeat.
    pub store_capacity: u64,
    /// Worker processes at the last heartbeat.
    pub num_workers: u32,
    /// False once the node missed heartbeats for too long or unregistered.
    pub alive: bool,
    /// Time since the last heartbeat (or the registration).
    pub since_heartbeat: Duration,
}

impl From<&NodeRecord> for proto::NodeStatus {
    fn from(n: &NodeRecord) -> Self {
        proto::NodeStatus {
            info: Some((&n.info).into()),
            resources_available: resources_to_wire(&n.resources_available),
            store_used: n.store_used,
            store_capacity: n.store_capacity,
            num_workers: n.num_workers,
            alive: n.alive,
            millis_since_heartbeat: u64::try_from(n.since_heartbeat.as_millis())
                .unwrap_or(u64::MAX),
        }
    }
}

impl TryFrom<proto::NodeStatus> for NodeRecord {
    type Error = InvalidMessage;
    fn try_from(n: proto::NodeStatus) -> Result<Self, InvalidMessage> {
        Ok(NodeRecord {
            info: required("info", n.info)?.try_into()?,
            resources_available: parse_available("resources_available", n.resources_available)?,
            store_used: n.store_used,
            store_capacity: n.store_capacity,
            num_workers: n.num_workers,
            alive: n.alive,
            since_heartbeat: Duration::from_millis(n.millis_since_heartbeat),
        })
    }
}

// ------------------------------------------------------------------ jobs --

/// What a driver registers about its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id.
    pub job_id: JobId,
    /// Process id of the driver.
    pub driver_pid: u32,
    /// Address the driver's runtime listens on.
    pub driver_address: String,
    /// Path of the driver's executable.
    pub exe_path: PathBuf,
    /// Build hash of the driver's binary.
    pub build_hash: String,
}

impl From<&JobInfo> for proto::JobInfo {
    fn from(j: &JobInfo) -> Self {
        proto::JobInfo {
            job_id: j.job_id.to_string(),
            driver_pid: j.driver_pid,
            driver_address: j.driver_address.clone(),
            exe_path: path_to_wire(&j.exe_path),
            build_hash: j.build_hash.clone(),
        }
    }
}

impl TryFrom<proto::JobInfo> for JobInfo {
    type Error = InvalidMessage;
    fn try_from(j: proto::JobInfo) -> Result<Self, InvalidMessage> {
        Ok(JobInfo {
            job_id: parse_id("job_id", &j.job_id)?,
            driver_pid: j.driver_pid,
            driver_address: j.driver_address,
            exe_path: j.exe_path.into(),
            build_hash: j.build_hash,
        })
    }
}

/// A job as the head sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// What was registered.
    pub info: JobInfo,
    /// Whether the job finished.
    pub finished: bool,
    /// Registration time, milliseconds since the Unix epoch.
    pub start_time_ms: u64,
    /// Finish time, milliseconds since the Unix epoch.
    pub end_time_ms: Option<u64>,
}

impl From<&JobRecord> for proto::JobStatus {
    fn from(j: &JobRecord) -> Self {
        proto::JobStatus {
            info: Some((&j.info).into()),
            finished: j.finished,
            start_time_ms: j.start_time_ms,
            end_time_ms: j.end_time_ms.unwrap_or(0),
        }
    }
}

impl TryFrom<proto::JobStatus> for JobRecord {
    type Error = InvalidMessage;
    fn try_from(j: proto::JobStatus) -> Result<Self, InvalidMessage> {
        Ok(JobRecord {
            info: required("info", j.info)?.try_into()?,
            finished: j.finished,
            start_time_ms: j.start_time_ms,
            end_time_ms: (j.end_time_ms != 0).then_some(j.end_time_ms),
        })
    }
}

// ---------------------------------------------------------------- actors --

/// Life-cycle state of an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActorState {
    /// Registered, not yet running.
    #[default]
    Pending,
    /// Running.
    Alive,
    /// Its process died and it is being restarted.
    Restarting,
    /// Dead for good.
    Dead,
}

impl fmt::Display for ActorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActorState::Pending => "PENDING",
            ActorState::Alive => "ALIVE",
            ActorState::Restarting => "RESTARTING",
            ActorState::Dead => "DEAD",
        })
    }
}

impl From<ActorState> for proto::ActorState {
    fn from(s: ActorState) -> Self {
        match s {
            ActorState::Pending => proto::ActorState::Pending,
            ActorState::Alive => proto::ActorState::Alive,
            ActorState::Restarting => proto::ActorState::Restarting,
            ActorState::Dead => proto::ActorState::Dead,
        }
    }
}

impl From<proto::ActorState> for ActorState {
    fn from(s: proto::ActorState) -> Self {
        match s {
            proto::ActorState::Pending => ActorState::Pending,
            proto::ActorState::Alive => ActorState::Alive,
            proto::ActorState::Restarting => ActorState::Restarting,
            proto::ActorState::Dead => ActorState::Dead,
        }
    }
}

fn actor_state_from_wire(value: i32) -> Result<ActorState, InvalidMessage> {
    proto::ActorState::try_from(value)
        .map(ActorState::from)
        .map_err(|_| InvalidMessage::new("state", format!("unknown actor state {value}")))
}

/// What an actor is, fixed at creation.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorSpec {
    /// The actor's id.
    pub actor_id: ActorId,
    /// The job that created it.
    pub job_id: JobId,
    /// Its class.
    pub class_name: String,
    /// Its name, unique among live actors.
    pub name: Option<String>,
    /// Whether it outlives its job.
    pub detached: bool,
    /// Address of its owner (the process that created it).
    pub owner_address: String,
    /// How many restarts are allowed; negative means unlimited.
    pub max_restarts: i32,
    /// Resources it holds while alive.
    pub resources: ResourceMap,
}

impl From<&ActorSpec> for proto::ActorSpec {
    fn from(a: &ActorSpec) -> Self {
        proto::ActorSpec {
            actor_id: a.actor_id.to_string(),
            job_id: a.job_id.to_string(),
            class_name: a.class_name.clone(),
            name: a.name.clone().unwrap_or_default(),
            detached: a.detached,
            owner_address: a.owner_address.clone(),
            max_restarts: a.max_restarts,
            resources: resources_to_wire(&a.resources),
        }
    }
}

impl TryFrom<proto::ActorSpec> for ActorSpec {
    type Error = InvalidMessage;
    fn try_from(a: proto::ActorSpec) -> Result<Self, InvalidMessage> {
        Ok(ActorSpec {
            actor_id: parse_id("actor_id", &a.actor_id)?,
            job_id: parse_id("job_id", &a.job_id)?,
            class_name: a.class_name,
            name: (!a.name.is_empty()).then_some(a.name),
            detached: a.detached,
            owner_address: a.owner_address,
            max_restarts: a.max_restarts,
            resources: parse_resources("resources", a.resources)?,
        })
    }
}

/// A new state of an actor, reported by its owner or node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorUpdate {
    /// The actor.
    pub actor_id: ActorId,
    /// Its new state.
    pub state: ActorState,
    /// The node hosting it.
    pub node_id: Option<NodeId>,
    /// Address of the worker running it.
    pub worker_address: String,
    /// Process id of the worker running it.
    pub worker_pid: u32,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Why it died, if it did (empty otherwise).
    pub death_cause: String,
}

impl From<&ActorUpdate> for proto::UpdateActorRequest {
    fn from(u: &ActorUpdate) -> Self {
        proto::UpdateActorRequest {
            actor_id: u.actor_id.to_string(),
            state: proto::ActorState::from(u.state) as i32,
            node_id: optional_to_wire(u.node_id),
            worker_address: u.worker_address.clone(),
            worker_pid: u.worker_pid,
            restarts: u.restarts,
            death_cause: u.death_cause.clone(),
        }
    }
}

impl TryFrom<proto::UpdateActorRequest> for ActorUpdate {
    type Error = InvalidMessage;
    fn try_from(u: proto::UpdateActorRequest) -> Result<Self, InvalidMessage> {
        Ok(ActorUpdate {
            actor_id: parse_id("actor_id", &u.actor_id)?,
            state: actor_state_from_wire(u.state)?,
            node_id: parse_optional_id("node_id", &u.node_id)?,
            worker_address: u.worker_address,
            worker_pid: u.worker_pid,
            restarts: u.restarts,
            death_cause: u.death_cause,
        })
    }
}

/// An actor as the head sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorRecord {
    /// What the actor is.
    pub spec: ActorSpec,
    /// Its state.
    pub state: ActorState,
    /// The node hosting it.
    pub node_id: Option<NodeId>,
    /// Address of the worker running it.
    pub worker_address: String,
    /// Process id of the worker running it (0 when unknown).
    pub worker_pid: u32,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Why it died (DEAD) or last died (RESTARTING); empty otherwise.
    pub death_cause: String,
}

impl From<&ActorRecord> for proto::ActorInfo {
    fn from(a: &ActorRecord) -> Self {
        proto::ActorInfo {
            spec: Some((&a.spec).into()),
            state: proto::ActorState::from(a.state) as i32,
            node_id: optional_to_wire(a.node_id),
            worker_address: a.worker_address.clone(),
            worker_pid: a.worker_pid,
            restarts: a.restarts,
            death_cause: a.death_cause.clone(),
        }
    }
}

impl TryFrom<proto::ActorInfo> for ActorRecord {
    type Error = InvalidMessage;
    fn try_from(a: proto::ActorInfo) -> Result<Self, InvalidMessage> {
        Ok(ActorRecord {
            spec: required("spec", a.spec)?.try_into()?,
            state: actor_state_from_wire(a.state)?,
            node_id: parse_optional_id("node_id", &a.node_id)?,
            worker_address: a.worker_address,
            worker_pid: a.worker_pid,
            restarts: a.restarts,
            death_cause: a.death_cause,
        })
    }
}

/// Names one actor: by id, or by name (which matches live actors only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActorLookup {
    /// By id.
    Id(ActorId),
    /// By name.
    Name(String),
}

impl fmt::Display for ActorLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActorLookup::Id(id) => write!(f, "{id}"),
            ActorLookup::Name(name) => f.write_str(name),
        }
    }
}

impl From<ActorId> for ActorLookup {
    fn from(id: ActorId) -> Self {
        ActorLookup::Id(id)
    }
}

impl From<&str> for ActorLookup {
    fn from(name: &str) -> Self {
        ActorLookup::Name(name.to_owned())
    }
}

impl From<String> for ActorLookup {
    fn from(name: String) -> Self {
        ActorLookup::Name(name)
    }
}

impl From<&ActorLookup> for proto::ActorSelector {
    fn from(l: &ActorLookup) -> Self {
        use proto::actor_selector::Target;
        proto::ActorSelector {
            target: Some(match l {
                ActorLookup::Id(id) => Target::ActorId(id.to_string()),
                ActorLookup::Name(name) => Target::Name(name.clone()),
            }),
        }
    }
}

impl TryFrom<Option<proto::ActorSelector>> for ActorLookup {
    type Error = InvalidMessage;
    fn try_from(s: Option<proto::ActorSelector>) -> Result<Self, InvalidMessage> {
        use proto::actor_selector::Target;
        match required("actor", s.and_then(|s| s.target))? {
            Target::ActorId(id) => Ok(ActorLookup::Id(parse_id("actor_id", &id)?)),
            Target::Name(name) if name.is_empty() => {
                Err(InvalidMessage::new("name", "empty actor name"))
            }
            Target::Name(name) => Ok(ActorLookup::Name(name)),
        }
    }
}

// ------------------------------------------------------------ scheduling --

/// How [`pick_node`](super::HeadClient::pick_node) chooses among the nodes
/// that have the resources free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulingStrategy {
    /// The node least utilized once the resources are taken from it
    /// (utilization: the largest used share of its CPU or of any resource
    /// asked for).
    #[default]
    Default,
    /// Round-robin over the nodes.
    Spread,
}

impl From<SchedulingStrategy> for proto::SchedulingStrategy {
    fn from(s: SchedulingStrategy) -> Self {
        match s {
            SchedulingStrategy::Default => proto::SchedulingStrategy::Default,
            SchedulingStrategy::Spread => proto::SchedulingStrategy::Spread,
        }
    }
}

/// Asks for a particular node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeAffinity {
    /// The node.
    pub node_id: NodeId,
    /// When true, another node is chosen if this one is dead or lacks the
    /// resources; when false, that is an error.
    pub soft: bool,
}

/// What [`pick_node`](super::HeadClient::pick_node) looks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PickNodeOptions {
    /// What is needed.
    pub resources: ResourceMap,
    /// How to choose.
    pub strategy: SchedulingStrategy,
    /// Nodes not to choose.
    pub exclude: Vec<NodeId>,
    /// A node to prefer or require.
    pub affinity: Option<NodeAffinity>,
    /// Only nodes with the resources free now ([`Refusal`] `NotNow`
    /// otherwise).
    ///
    /// [`Refusal`]: super::head_state::Refusal
    pub available_only: bool,
    /// Only nodes whose utilization, once the resources are taken, stays
    /// below this.
    pub below_utilization: Option<f64>,
}

impl From<&PickNodeOptions> for proto::PickNodeRequest {
    fn from(p: &PickNodeOptions) -> Self {
        proto::PickNodeRequest {
            resources: resources_to_wire(&p.resources),
            strategy: proto::SchedulingStrategy::from(p.strategy) as i32,
            exclude: p.exclude.iter().map(ToString::to_string).collect(),
            affinity: p.affinity.map(|a| proto::NodeAffinity {
                node_id: a.node_id.to_string(),
                soft: a.soft,
            }),
            available_only: p.available_only,
            below_utilization: p.below_utilization,
        }
    }
}

impl TryFrom<proto::PickNodeRequest> for PickNodeOptions {
    type Error = InvalidMessage;
    fn try_from(p: proto::PickNodeRequest) -> Result<Self, InvalidMessage> {
        let strategy = match proto::SchedulingStrategy::try_from(p.strategy) {
            Ok(proto::SchedulingStrategy::Default) => SchedulingStrategy::Default,
            Ok(proto::SchedulingStrategy::Spread) => SchedulingStrategy::Spread,
            Err(_) => {
                return Err(InvalidMessage::new(
                    "strategy",
                    format!("unknown scheduling strategy {}", p.strategy),
                ))
            }
        };
        Ok(PickNodeOptions {
            resources: parse_resources("resources", p.resources)?,
            strategy,
            exclude: p
                .exclude
                .iter()
                .map(|id| parse_id("exclude", id))
                .collect::<Result<_, _>>()?,
            affinity: p
                .affinity
                .map(|a| {
                    Ok::<_, InvalidMessage>(NodeAffinity {
                        node_id: parse_id("affinity.node_id", &a.node_id)?,
                        soft: a.soft,
                    })
                })
                .transpose()?,
            available_only: p.available_only,
            below_utilization: p.below_utilization.filter(|u| u.is_finite()),
        })
    }
}

// ------------------------------------------------------ placement groups --

/// How the bundles of a placement group are spread over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PlacementStrategy {
    /// As few nodes as possible.
    #[default]
    Pack,
    /// Distinct nodes when possible.
    Spread,
    /// One node, or fail.
    StrictPack,
    /// Distinct nodes, or fail.
    StrictSpread,
}

impl From<PlacementStrategy> for proto::PlacementStrategy {
    fn from(s: PlacementStrategy) -> Self {
        match s {
            PlacementStrategy::Pack => proto::PlacementStrategy::Pack,
            PlacementStrategy::Spread => proto::PlacementStrategy::Spread,
            PlacementStrategy::StrictPack => proto::PlacementStrategy::StrictPack,
            PlacementStrategy::StrictSpread => proto::PlacementStrategy::StrictSpread,
        }
    }
}

impl From<proto::PlacementStrategy> for PlacementStrategy {
    fn from(s: proto::PlacementStrategy) -> Self {
        match s {
            proto::PlacementStrategy::Pack => PlacementStrategy::Pack,
            proto::PlacementStrategy::Spread => PlacementStrategy::Spread,
            proto::PlacementStrategy::StrictPack => PlacementStrategy::StrictPack,
            proto::PlacementStrategy::StrictSpread => PlacementStrategy::StrictSpread,
        }
    }
}

/// What a placement group is.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementGroupSpec {
    /// The group's id.
    pub pg_id: PlacementGroupId,
    /// Its name.
    pub name: Option<String>,
    /// The bundles, each a resource map.
    pub bundles: Vec<ResourceMap>,
    /// How to place them.
    pub strategy: PlacementStrategy,
    /// The job that owns it: the group is removed when the job finishes.
    /// `None`: it lives until removed.
    pub job_id: Option<JobId>,
}

impl From<&PlacementGroupSpec> for proto::PlacementGroupSpec {
    fn from(p: &PlacementGroupSpec) -> Self {
        proto::PlacementGroupSpec {
            pg_id: p.pg_id.to_string(),
            name: p.name.clone().unwrap_or_default(),
            bundles: p
                .bundles
                .iter()
                .map(|b| proto::Resources {
                    amounts: resources_to_wire(b),
                })
                .collect(),
            strategy: proto::PlacementStrategy::from(p.strategy) as i32,
            job_id: optional_to_wire(p.job_id),
        }
    }
}

impl TryFrom<proto::PlacementGroupSpec> for PlacementGroupSpec {
    type Error = InvalidMessage;
    fn try_from(p: proto::PlacementGroupSpec) -> Result<Self, InvalidMessage> {
        let strategy = proto::PlacementStrategy::try_from(p.strategy)
            .map(PlacementStrategy::from)
            .map_err(|_| {
                InvalidMessage::new(
                    "strategy",
                    format!("unknown placement strategy {}", p.strategy),
                )
            })?;
        Ok(PlacementGroupSpec {
            pg_id: parse_id("pg_id", &p.pg_id)?,
            name: (!p.name.is_empty()).then_some(p.name),
            bundles: p
                .bundles
                .into_iter()
                .map(|b| parse_resources("bundles", b.amounts))
                .collect::<Result<_, _>>()?,
            strategy,
            job_id: parse_optional_id("job_id", &p.job_id)?,
        })
    }
}

/// A placement group as the head sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementGroupRecord {
    /// What it is.
    pub spec: PlacementGroupSpec,
    /// The node of each bundle, in bundle order.
    pub bundle_nodes: Vec<NodeId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl From<&PlacementGroupRecord> for proto::PlacementGroupInfo {
    fn from(p: &PlacementGroupRecord) -> Self {
        proto::PlacementGroupInfo {
            spec: Some((&p.spec).into()),
            bundle_nodes: p.bundle_nodes.iter().map(ToString::to_string).collect(),
            created_ms: p.created_ms,
        }
    }
}

impl TryFrom<proto::PlacementGroupInfo> for PlacementGroupRecord {
    type Error = InvalidMessage;
    fn try_from(p: proto::PlacementGroupInfo) -> Result<Self, InvalidMessage> {
        Ok(PlacementGroupRecord {
            spec: required("spec", p.spec)?.try_into()?,
            bundle_nodes: parse_node_ids(&p.bundle_nodes)?,
            created_ms: p.created_ms,
        })
    }
}

/// Parses a list of node ids.
pub fn parse_node_ids(ids: &[String]) -> Result<Vec<NodeId>, InvalidMessage> {
    ids.iter().map(|id| parse_id("node_id", id)).collect()
}

/// One bundle of a placement group, as reserved on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// Its index in the group.
    pub index: u32,
    /// What it reserves.
    pub resources: ResourceMap,
}

impl From<&Bundle> for proto::Bundle {
    fn from(b: &Bundle) -> Self {
        proto::Bundle {
            index: b.index,
            resources: resources_to_wire(&b.resources),
        }
    }
}

impl TryFrom<proto::Bundle> for Bundle {
    type Error = InvalidMessage;
    fn try_from(b: proto::Bundle) -> Result<Self, InvalidMessage> {
        Ok(Bundle {
            index: b.index,
            resources: parse_resources("resources", b.resources)?,
        })
    }
}

// ---------------------------------------------------------------- status --

/// Everything the head knows, for `braid status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatusRecord {
    /// The cluster's id.
    pub cluster_id: String,
    /// The nodes, alive and dead.
    pub nodes: Vec<NodeRecord>,
    /// The actors.
    pub actors: Vec<ActorRecord>,
    /// The placement groups.
    pub placement_groups: Vec<PlacementGroupRecord>,
    /// The jobs.
    pub jobs: Vec<JobRecord>,
    /// Where the head serves `/metrics` and its dashboard (`host:port`;
    /// empty: nowhere).
    pub metrics_address: String,
}

impl From<&ClusterStatusRecord> for proto::ClusterStatusReply {
    fn from(c: &ClusterStatusRecord) -> Self {
        proto::ClusterStatusReply {
            cluster_id: c.cluster_id.clone(),
            nodes: c.nodes.iter().map(Into::into).collect(),
            actors: c.actors.iter().map(Into::into).collect(),
            placement_groups: c.placement_groups.iter().map(Into::into).collect(),
            jobs: c.jobs.iter().map(Into::into).collect(),
            metrics_address: c.metrics_address.clone(),
        }
    }
}

impl TryFrom<proto::ClusterStatusReply> for ClusterStatusRecord {
    type Error = InvalidMessage;
    fn try_from(c: proto::ClusterStatusReply) -> Result<Self, InvalidMessage> {
        Ok(ClusterStatusRecord {
            cluster_id: c.cluster_id,
            nodes: collect(c.nodes)?,
            actors: collect(c.actors)?,
            placement_groups: collect(c.placement_groups)?,
            jobs: collect(c.jobs)?,
            metrics_address: c.metrics_address,
        })
    }
}

/// Converts every message of a list.
pub(crate) fn collect<W, T>(items: Vec<W>) -> Result<Vec<T>, InvalidMessage>
where
    T: TryFrom<W, Error = InvalidMessage>,
{
    items.into_iter().map(T::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_strictly() {
        let id = NodeId::random();
        assert_eq!(parse_id::<NodeId>("n", &id.to_string()).unwrap(), id);
        assert!(parse_id::<NodeId>("n", "").is_err());
        assert!(parse_id::<NodeId>("n", "+12").is_err());
        assert!(parse_id::<NodeId>("n", "xyz").is_err());
        assert!(parse_id::<NodeId>("n", &"f".repeat(33)).is_err());
        assert_eq!(parse_optional_id::<NodeId>("n", "").unwrap(), None);
        assert!(parse_object_id(&[0; 15]).is_err());
        assert!(parse_object_id(&[7; 16]).is_ok());
    }

    #[test]
    fn resources_must_be_finite() {
        let bad = HashMap::from([("CPU".to_owned(), f64::NAN)]);
        assert!(parse_resources("r", bad).is_err());
        let bad = HashMap::from([("CPU".to_owned(), -1.0)]);
        assert!(parse_resources("r", bad.clone()).is_err());
        assert_eq!(
            parse_available("r", bad).unwrap(),
            ResourceMap::from([("CPU".to_owned(), 0.0)])
        );
        let bad = HashMap::from([("CPU".to_owned(), f64::INFINITY)]);
        assert!(parse_available("r", bad).is_err());
    }

    #[test]
    fn records_round_trip() {
        let spec = ActorSpec {
            actor_id: ActorId::random(),
            job_id: JobId::random(),
            class_name: "Counter".into(),
            name: Some("c".into()),
            detached: true,
            owner_address: "127.0.0.1:1".into(),
            max_restarts: -1,
            resources: ResourceMap::from([("CPU".into(), 1.0)]),
        };
        let record = ActorRecord {
            spec,
            state: ActorState::Restarting,
            node_id: Some(NodeId::random()),
            worker_address: "w".into(),
            worker_pid: 42,
            restarts: 3,
            death_cause: "oom".into(),
        };
        let back = ActorRecord::try_from(proto::ActorInfo::from(&record)).unwrap();
        assert_eq!(back, record);

        let pg = PlacementGroupSpec {
            pg_id: PlacementGroupId::random(),
            name: None,
            bundles: vec![ResourceMap::from([("GPU".into(), 2.0)])],
            strategy: PlacementStrategy::StrictSpread,
            job_id: None,
        };
        let back = PlacementGroupSpec::try_from(proto::PlacementGroupSpec::from(&pg)).unwrap();
        assert_eq!(back, pg);
    }
}
