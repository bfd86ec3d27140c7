//! Every message braid processes exchange over [`Conn`](super::Conn)s.

use crate::address::Address;
use crate::error::Error;
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId, TaskId, WorkerId};
use crate::resources::Resources;
use braid_store::ObjectId;
use serde::{Deserialize, Serialize};

/// One frame on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct Frame {
    /// Request sequence number; replies echo it. Zero for one-way messages.
    pub seq: u64,
    /// What the frame carries.
    pub body: Body,
}

/// A frame's payload.
#[derive(Debug, Serialize, Deserialize)]
pub enum Body {
    /// A request expecting a reply with the same `seq`.
    Request(Message),
    /// A message expecting no reply.
    OneWay(Message),
    /// The answer to a request.
    Reply(Result<Reply, Error>),
}

/// Who opens a connection, sent first on every connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Hello {
    /// A driver joining its node.
    Driver {
        /// The cluster token.
        token: String,
        /// The driver's own address.
        address: Address,
    },
    /// A worker the node spawned, reporting in.
    Worker {
        /// The cluster token.
        token: String,
        /// The worker's address.
        address: Address,
        /// Its binary's build hash.
        build_hash: String,
    },
    /// A process calling another directly (tasks, actor calls, owners).
    Peer {
        /// The cluster token.
        token: String,
        /// The caller's address.
        address: Address,
    },
}

/// What a job registers with its node: where its binary is, so the node can
/// start workers from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job.
    pub job: JobId,
    /// Path of the binary workers are started from.
    pub exe: String,
    /// Build hash workers must match.
    pub build_hash: String,
    /// The driver's address.
    pub driver: Address,
    /// Environment for workers: the driver's `BRAID_*` and
    /// [`DRIVER_ENV`] variables, and those it declared.
    pub env: Vec<(String, String)>,
}

/// Variables every job's workers take from its driver, set or not (a
/// driver without `RUST_BACKTRACE` has workers without it, whatever the
/// node daemon's environment holds), as well as every `BRAID_*` variable
/// the driver has ([`JobSpec::env`]).
pub const DRIVER_ENV: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];

/// A request for a worker with some resources.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The job asking.
    pub job: JobId,
    /// Resources held while the lease lasts.
    pub resources: Resources,
    /// A placement-group bundle to take the resources from.
    pub bundle: Option<(PlacementGroupId, u32)>,
    /// The actor the worker will host, if any.
    pub actor: Option<ActorId>,
    /// Whether that actor outlives its job.
    pub detached: bool,
    /// Refuse rather than spill back to another node.
    pub strict_node: bool,
    /// SPREAD: the head picks among nodes round-robin, this one included.
    pub spread: bool,
    /// Sent here by another node's spillback, or by node affinity: the
    /// node queues it rather than spilling it for load (it may still move
    /// it while it waits, to a node that frees up first).
    pub spilled: bool,
    /// Nodes the caller could not reach: not to be spilled to.
    pub avoid: Vec<NodeId>,
}

/// A worker leased to a caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    /// The lease, returned with [`Message::ReturnLease`].
    pub lease: u64,
    /// The worker's address.
    pub worker: Address,
}

/// A task to run.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task.
    pub task: TaskId,
    /// The registered function's name.
    pub function: String,
    /// Its arguments.
    pub args: Vec<WireArg>,
    /// The object its return value becomes.
    pub returns: ObjectId,
    /// Who owns the return value.
    pub owner: Address,
    /// When the caller submitted it (Unix ns), for its span.
    pub submitted_ns: u64,
}

/// One argument on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireArg {
    /// The encoded value itself.
    Inline(Vec<u8>),
    /// A value in a node's object store.
    Stored {
        /// The object.
        id: ObjectId,
        /// Nodes holding a copy.
        nodes: Vec<NodeId>,
        /// Its owner, told of new copies.
        owner: Address,
    },
}

impl WireArg {
    /// About how many bytes it holds.
    pub fn size(&self) -> usize {
        match self {
            WireArg::Inline(bytes) => bytes.len(),
            WireArg::Stored { nodes, .. } => 64 + 16 * nodes.len(),
        }
    }
}

/// An actor to construct in a leased worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActorSpec {
    /// The actor.
    pub actor: ActorId,
    /// The registered class name.
    pub class: String,
    /// The constructor's arguments.
    pub args: Vec<WireArg>,
    /// Calls that may run at once.
    pub max_concurrency: u32,
    /// Who created it.
    pub owner: Address,
    /// Its name, if named.
    pub name: Option<String>,
}

/// A call on an actor.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallSpec {
    /// The call.
    pub task: TaskId,
    /// The actor it is for.
    pub actor: ActorId,
    /// The method's name.
    pub method: String,
    /// Its arguments.
    pub args: Vec<WireArg>,
    /// The object its return value becomes.
    pub returns: ObjectId,
    /// Who owns the return value.
    pub owner: Address,
    /// When the caller made the call (Unix ns), for its span.
    pub submitted_ns: u64,
}

/// A task's or call's outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskResult {
    /// The return value.
    pub value: ReturnValue,
    /// References nested in the return value; the caller now borrows them.
    pub contained: Vec<(ObjectId, Address)>,
    /// References the executor still holds after the task; the caller
    /// registers it as their borrower.
    pub borrowed: Vec<(ObjectId, Address)>,
    /// The process that ran it.
    pub executor: Address,
}

/// Where a return value is.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReturnValue {
    /// Small: the bytes themselves.
    Inline(Vec<u8>),
    /// Large: in the store of this node.
    Stored(NodeId),
}

/// The state of an object, as its owner reports it.
#[derive(Debug, Serialize, Deserialize)]
pub enum ObjectStatus {
    /// The value is small and here it is.
    Inline(Vec<u8>),
    /// The value is in the stores of these nodes.
    Stored(Vec<NodeId>),
}

/// Requests and one-way messages.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// First message on every connection.
    Hello(Hello),
    /// Driver → node: register the job's binary.
    RegisterJob(JobSpec),
    /// Caller → node: lease a worker.
    RequestLease(LeaseRequest),
    /// Caller → node: give a worker back (and kill it, for actors).
    ReturnLease {
        /// The lease.
        lease: u64,
        /// Kill the worker rather than reuse it.
        kill: bool,
    },
    /// Process → its node: copy an object from another node into this one.
    PullObject {
        /// The object.
        id: ObjectId,
        /// Nodes that hold it.
        from: Vec<NodeId>,
    },
    /// Owner → its node: delete these objects from the stores of the
    /// listed nodes (the node forwards to the others).
    FreeObjects(Vec<(ObjectId, Vec<NodeId>)>),
    /// Worker → node → driver: a line the worker printed.
    Log {
        /// The worker's pid.
        pid: u32,
        /// The task or actor it was running.
        label: String,
        /// Whether it went to stderr.
        stderr: bool,
        /// The line, without its newline.
        line: String,
    },
    /// Caller → worker: run a task.
    PushTask(TaskSpec),
    /// Caller → worker: construct an actor.
    CreateActor(ActorSpec),
    /// Caller → actor: call a method.
    CallActor(CallSpec),
    /// Caller → worker: cancel a task if it has not started (an async one
    /// at its next await).
    Cancel(TaskId),
    /// Caller → worker: cancel a task, and if it is running synchronously,
    /// exit (the worker's resources return to its node).
    CancelForce(TaskId),
    /// Borrower → owner: the object's status, once it is ready.
    GetObject(ObjectId),
    /// Anyone → owner: `borrower` holds a reference.
    AddBorrower {
        /// The object.
        id: ObjectId,
        /// Who holds it.
        borrower: Address,
    },
    /// Borrower → owner: it holds no reference any more.
    RemoveBorrower {
        /// The object.
        id: ObjectId,
        /// Who held it.
        borrower: WorkerId,
    },
    /// Process → owner: a copy of the object now lives on `node`.
    AddLocation {
        /// The object.
        id: ObjectId,
        /// Where.
        node: NodeId,
    },
    /// Node → worker: exit now.
    Exit,
    /// Node → its processes: the head declared `0` dead; connections to
    /// processes there are closed and objects held only there are lost.
    NodeDied(NodeId),
    /// Worker → node: its executor is up; it may be leased.
    WorkerReady,
    /// Process → its node: what its recorder counted so far (sent every
    /// second while it changes).
    Metrics(crate::telemetry::recorder::Snapshot),
    /// Process → its node: the spans of the tasks and calls it ran since
    /// it last sent them.
    Spans(Vec<crate::telemetry::spans::Span>),
    /// Anyone → node: describe the node.
    NodeInfo,
    /// Dialing end → accepting end, on the same machine: map the memfd
    /// this process holds open as `fd` and carry frames through its rings
    /// from now on.
    OpenRing {
        /// The dialing process.
        pid: u32,
        /// Its descriptor of the ring pair's memfd.
        fd: i32,
    },
}

/// Answers to requests.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Done, nothing to report.
    Ok,
    /// The node accepted the connection.
    Welcome {
        /// The node.
        node: NodeId,
        /// Its store's socket.
        store_socket: String,
        /// The session directory.
        session_dir: String,
        /// The head's gRPC address.
        head: String,
    },
    /// A worker was leased.
    Leased(Lease),
    /// Ask this node instead.
    Spillback {
        /// The node.
        node: NodeId,
        /// Where its control plane listens.
        endpoint: crate::wire::Endpoint,
    },
    /// A task or call finished.
    Done(TaskResult),
    /// An object's status.
    Object(ObjectStatus),
    /// Node description.
    Node(NodeSummary),
}

/// What a node reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The node.
    pub node: NodeId,
    /// Total resources.
    pub total: Resources,
    /// Resources not leased.
    pub available: Resources,
    /// Live workers.
    pub workers: u32,
    /// Idle workers.
    pub idle_workers: u32,
}
