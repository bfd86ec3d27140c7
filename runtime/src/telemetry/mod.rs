//! Telemetry: what the cluster's daemons expose for people and Prometheus.
//!
//! ```text
//! process (driver, worker) ── recorder: atomic adds ──▶ Snapshot ─Message::Metrics (1 s)─▶ node
//!                          ── publish(source, families) ──┘  (stream operators, learning)
//! node: its ledger, workers, store, transfers + Σ snapshots ──▶ /metrics (node's port)
//! head: nodes, resources, actors, placement groups, jobs ──▶ /metrics (head's port)
//!       + its local node's series, fetched at each scrape
//! ```
//!
//! Families are built at scrape time ([`family::Family`]) from state the
//! daemons keep anyway; only tasks and actor calls are recorded as they
//! happen ([`recorder`]), without locks or allocation. Every endpoint
//! wants the cluster token ([`http`]).

pub mod family;
pub mod http;
pub mod published;
pub mod recorder;
pub mod spans;
pub mod timeline;

pub use family::{Family, Kind};
pub use published::{publish, withdraw};
