//! The gRPC layer of a braid cluster (protocol `braid.v1`, see
//! `proto/braid.proto`).
//!
//! * The **head** serves the `Head` service ([`serve_head`]): the cluster's
//!   metadata, in memory: nodes and their heartbeats, jobs, actors (names,
//!   states), node picking and placement groups. It schedules nothing on
//!   the hot path. Nodes, drivers and `braid status` reach it with a
//!   [`HeadClient`].
//! * Every **node daemon** serves the `Node` service: it implements
//!   [`NodeService`] (the generated trait; implement it with
//!   `#[tonic::async_trait]`) and serves it with [`serve_node`] or adds
//!   [`node_service`] to its own server. Object transfer between nodes is
//!   in [`transfer`]. The head and the nodes reach it with a
//!   [`NodeClient`].
//! * Every call carries the cluster token ([`auth`]); a wrong or missing
//!   token is refused with `UNAUTHENTICATED` ([`crate::error::Error::Unauthenticated`]).
//!
//! On the wire, node, job, actor and placement-group ids are 32-hex-digit
//! strings, object ids 16 bytes, and resources maps from a name (`"CPU"`,
//! `"memory"` in bytes, custom names) to an amount. The Rust API takes and
//! returns the records of [`types`] and [`crate::error::Error`].

pub mod auth;
mod channel;
mod head;
mod head_client;
mod head_http;
mod head_service;
mod head_state;
pub mod job_manager;
pub mod job_package;
mod node_client;
pub mod proto;
mod server;
pub mod transfer;
pub mod types;

pub use auth::{AuthError, ClientAuth, ServerAuth};
pub use channel::{AuthChannel, ClientOptions};
pub use head::{serve_head, HeadConfig, HeadRunning};
pub use head_client::HeadClient;
pub use node_client::NodeClient;
pub use proto::node_server::{Node as NodeService, NodeServer};
pub(crate) use server::incoming;
pub use server::{
    node_service, serve_node, HandshakeDeadline, HeadError, NodeRunning, ServeError, ServerRunning,
    StopHandle,
};
pub use transfer::{pull_into, pull_stream, StoreFailure, TransferError, DEFAULT_CHUNK_SIZE};
pub use types::{
    ActorLookup, ActorRecord, ActorSpec, ActorState, ActorUpdate, Bundle, ClusterStatusRecord,
    InvalidMessage, JobInfo, JobRecord, NodeAffinity, NodeHeartbeat, NodeInfo, NodeRecord,
    PickNodeOptions, PlacementGroupRecord, PlacementGroupSpec, PlacementStrategy, ResourceMap,
    SchedulingStrategy,
};
