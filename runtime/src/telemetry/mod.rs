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

/// Environment variable turning the recording of tasks, calls and spans
/// off (`0` or `off`): for measuring what recording costs. The daemons'
/// own families are served either way.
pub const METRICS_VAR: &str = "BRAID_METRICS";

/// Whether this process records tasks, calls and spans ([`METRICS_VAR`]
/// read once).
#[inline]
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var(METRICS_VAR).as_deref(),
            Ok("0") | Ok("off") | Ok("false")
        )
    })
}
pub use published::{publish, withdraw};
