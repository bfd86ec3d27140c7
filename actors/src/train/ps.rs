//! The parameter server's configuration and vocabulary: how far workers
//! may drift apart ([`Consistency`]), what a shard does with its keys
//! ([`KeyPolicy`]), the job's [`PsConfig`], and the errors
//! of pulls and pushes. The shards themselves are [`super::shard`]; the
//! messages between the operators, [`super::messages`].

use super::model::PushError;
use super::optimizer::OptimizerKind;
use super::sharding::ConsistentHash;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// How far workers may drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Bulk-synchronous: step `c` reads the model after every worker's
    /// step `c − 1`, and a step's pushes are applied together, in worker
    /// order. Deterministic.
    Bsp,
    /// Asynchronous: pulls never wait for other workers (only for the
    /// worker's own pushes up to [`super::shard_page::OWN_LAG`] steps
    /// back); pushes apply as they arrive.
    Asp,
    /// Bounded staleness: step `c` waits until every worker finished step
    /// `c − 1 − τ`.
    Ssp(u64),
}

impl Consistency {
    /// The steps a worker may run ahead of the slowest one, if bounded.
    pub fn staleness(self) -> Option<u64> {
        match self {
            Consistency::Bsp => Some(0),
            Consistency::Ssp(t) => Some(t),
            Consistency::Asp => None,
        }
    }
}

/// A consistency mode that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown consistency {0:?}: expected bsp, asp or ssp:<steps>")]
pub struct ConsistencyParseError(pub String);

impl FromStr for Consistency {
    type Err = ConsistencyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConsistencyParseError(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "bsp" => Ok(Consistency::Bsp),
            "asp" => Ok(Consistency::Asp),
            other => {
                let tau = other.strip_prefix("ssp:").ok_or_else(bad)?;
                tau.parse().map(Consistency::Ssp).map_err(|_| bad())
            }
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consistency::Bsp => write!(f, "bsp"),
            Consistency::Asp => write!(f, "asp"),
            Consistency::Ssp(t) => write!(f, "ssp:{t}"),
        }
    }
}

/// Which keys a shard keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KeyPolicy {
    /// Every key pushed is kept.
    #[default]
    KeepAll,
    /// A key gets a weight only from its `min_count`-th push on; earlier
    /// pushes are counted, not applied.
    MinCount(u32),
    /// Above `max_keys` keys, the keys with the fewest updates (smallest
    /// accumulated squared gradient) are evicted down to 90% of it.
    Capacity(usize),
}

/// The parameter server's settings, shared by every worker and shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PsConfig {
    /// A name unique in the process (shards register under it).
    pub name: String,
    /// Shards.
    pub shards: usize,
    /// Training workers.
    pub workers: usize,
    /// Virtual nodes per shard on the hash ring.
    pub replicas: u32,
    /// The optimizer, run on the shards.
    pub optimizer: OptimizerKind,
    /// Consistency between workers.
    pub consistency: Consistency,
    /// Keys a shard's table holds before it grows.
    pub capacity: usize,
    /// Emit a serving delta after this many rows were applied…
    pub refresh_rows: u64,
    /// …or this much time passed since the last one (whichever first).
    pub refresh_ms: u64,
    /// Admission and eviction.
    pub policy: KeyPolicy,
    /// How long a pull waits for slower workers before it fails.
    pub pull_timeout: Duration,
    /// A failure to inject.
    pub crash: Option<Crash>,
    /// Whether `crash` fired: shared by this configuration's clones (the
    /// job's operators in one process), so it fires once. Not sent:
    /// every process has its own.
    #[serde(skip)]
    pub crashed: CrashLatch,
    /// Feature ids are below `2^feature_bits` (hashed features): serving
    /// then keeps its weights in a dense array.
    pub feature_bits: Option<u32>,
    /// With one worker, run the shards in the worker's subtask
    /// ([`super::worker::TrainWorker::chained`]): the same updates, without
    /// messages between them or a second lookup per key.
    pub chain: bool,
}

impl PsConfig {
    /// A configuration with one shard per worker, no serving throttle
    /// (a delta after every step), and FTRL's state kept for every key.
    pub fn new(name: &str, workers: usize, shards: usize, optimizer: OptimizerKind) -> Self {
        Self {
            name: name.to_string(),
            shards: shards.max(1),
            workers: workers.max(1),
            replicas: 64,
            optimizer,
            consistency: Consistency::Bsp,
            capacity: 0,
            refresh_rows: 1,
            refresh_ms: 0,
            policy: KeyPolicy::KeepAll,
            pull_timeout: Duration::from_secs(60),
            crash: None,
            crashed: CrashLatch::default(),
            feature_bits: None,
            chain: true,
        }
    }

    /// The hash ring of the shards.
    pub fn ring(&self) -> ConsistentHash {
        ConsistentHash::new(self.shards as u32, self.replicas)
    }

    pub(crate) fn shard_name(&self, generation: u64, shard: usize) -> String {
        format!("{}/g{generation}/shard{shard}", self.name)
    }
}

/// Why a pull failed.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullError {
    /// The shard is not registered in this process.
    #[error("parameter-server shard {0} is not reachable: {1}")]
    Unreachable(usize, String),
    /// Slower workers did not catch up in time.
    #[error("shard {shard}: step {step} waited {waited_ms} ms for slower workers")]
    Timeout {
        /// The shard.
        shard: usize,
        /// The step that waited.
        step: u64,
        /// For how long.
        waited_ms: u64,
    },
    /// The shard's operator stopped (its attempt failed).
    #[error("shard {0} stopped")]
    Stopped(usize),
}

/// Why a shard refused a push.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The push came from a worker this shard does not know.
    #[error("push from worker {worker}, but there are {workers} workers")]
    UnknownWorker {
        /// The worker.
        worker: u32,
        /// Workers configured.
        workers: usize,
    },
    /// A step was pushed twice, or out of order.
    #[error("worker {worker} pushed step {step}, expected {expected}")]
    OutOfOrder {
        /// The worker.
        worker: u32,
        /// The step pushed.
        step: u64,
        /// The step expected.
        expected: u64,
    },
    /// The optimizer refused the gradients.
    #[error(transparent)]
    Push(#[from] PushError),
}

/// Clock bookkeeping of one shard, also what a pull reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullStats {
    /// Steps the slowest unfinished worker had applied when the pull read.
    pub min_clock: u64,
    /// `step − min_clock`: how many steps of others the pull could not see
    /// (0 in BSP).
    pub staleness: u64,
}

/// A failure injected for tests and demos: the subtask panics when it
/// first reaches `step` in the job's first attempt (once per job in a
/// process), as if killed; the recovered attempts, in this process or in
/// new ones on the cluster runner, run through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Crash {
    /// Worker `0` fails before training its step `1`.
    Worker(usize, u64),
    /// Shard `0` fails before applying anything of step `1`.
    Shard(usize, u64),
}

/// Whether a configuration's injected [`Crash`] fired, shared by its
/// clones.
#[derive(Debug, Clone, Default)]
pub struct CrashLatch(Arc<AtomicBool>);

/// Whether an injected crash of `config`'s job has not happened yet (in
/// the operators sharing its latch) and the attempt is the job's first
/// (generation 1: fresh storage's first claim; true once).
pub(crate) fn first_crash(config: &PsConfig) -> bool {
    if crate::stream::context::TaskContext::current().generation > 1 {
        return false;
    }
    !config.crashed.0.swap(true, Ordering::AcqRel)
}
