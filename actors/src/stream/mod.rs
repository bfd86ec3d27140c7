//! Stream processing: a DataStream API over a graph of operators, chained
//! over forward edges, connected by bounded channels, checkpointed with
//! aligned barriers.
//!
//! * [`operator`]: the contract every operator implements.
//! * [`graph`]: the DataStream API that builds a job's graph.
//! * [`functions`], [`window`], [`sink`], [`source`]: built-in operators,
//!   windows with watermarks, the transactional file sink, replayable
//!   sources ([`tcp_source`]: a TCP line source acknowledging at
//!   checkpoints).
//! * [`plan`]: chaining and channel numbering.
//! * [`stage`], [`channel`], [`runner`]: a subtask's chain, its channel
//!   ends, and its loop (barrier alignment, watermarks).
//! * [`failure`]: why a channel, an operator, a subtask or an attempt
//!   stopped, as plain data that crosses processes.
//! * [`coordinator`]: checkpoints and recovery; [`restart`]: when a failed
//!   job restarts, and when it gives up.
//! * [`local`]: runs a plan with one thread per subtask in this process.
//! * [`cluster`]: runs a registered job with every subtask a braid actor.
//! * [`service`]: request/response calls one subtask offers the others.
//! * [`results`]: named values finished subtasks hand back in the job's
//!   report (accumulators).

pub mod channel;
pub mod cluster;
pub mod columnar;
pub mod context;
pub mod coordinator;
pub mod edges;
pub mod failure;
pub mod functions;
pub mod graph;
pub mod local;
pub mod mailbox;
pub mod metrics;
pub mod operator;
pub mod plan;
pub mod registry;
pub mod restart;
pub mod results;
pub mod runner;
pub mod service;
pub mod sink;
pub mod source;
pub mod stage;
pub mod tcp_source;
pub mod window;
