//! A running online-learning job as any process of the cluster sees it:
//! predictions from its serving (tagged with the model version that
//! answered), serving's statistics, and the evaluation's figures, through
//! the services those subtasks offer. The job runs on the cluster runner
//! ([`crate::stream::cluster`]); the client finds its hosts by name, and
//! follows them across recoveries.
//!
//! ```no_run
//! use braid_actors::train::client::JobClient;
//!
//! let rt = braid::init_blocking()?;
//! // The job checkpointed as "ctr-run-7", whose parameter server is named "ctr".
//! let job = JobClient::new(&rt, "ctr-run-7", "ctr");
//! let (version, p) = job.predict(vec![vec![17, 4_242, 90_001]])?;
//! println!("version {version:?} predicts {}", p[0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::eval::{self, EvalFigures};
use super::messages::ModelVersion;
use super::serving::{self, ServingAnswer, ServingQuery, ServingStats};
use crate::stream::cluster::JobServices;
use crate::stream::service::CallError;
use braid::store::codec;
use braid::Runtime;
use std::time::Duration;
use thiserror::Error;

/// Why a query of a running job failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The job's subtask could not be reached, or failed the call.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The answer is not what the query asks for.
    #[error("unexpected answer: {0}")]
    Answer(String),
}

/// How long a query waits by default for the job's subtask (which may be
/// starting, or recovering) before it fails.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Queries a running online-learning job.
pub struct JobClient {
    services: JobServices,
    name: String,
    wait: Duration,
}

impl JobClient {
    /// The job checkpointed as `job` (its
    /// [`StorageSpec::job`](crate::stream::cluster::StorageSpec::job)),
    /// whose parameter server is named `name` ([`PsConfig::name`](super::ps::PsConfig::name)).
    pub fn new(rt: &Runtime, job: &str, name: &str) -> Self {
        JobClient {
            services: JobServices::new(rt, job),
            name: name.to_string(),
            wait: DEFAULT_WAIT,
        }
    }

    /// Waits up to `wait` per query (default [`DEFAULT_WAIT`]).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    fn ask_serving(&self, query: &ServingQuery) -> Result<ServingAnswer, ClientError> {
        let request = codec::encode(query).map_err(|e| ClientError::Answer(e.to_string()))?;
        let answer = self.services.call(
            serving::SERVING_TASK,
            0,
            &serving::service_name(&self.name),
            &request,
            self.wait,
        )?;
        codec::decode(&answer).map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Predicts rows (each its hashed feature ids) with the live model:
    /// the version that answered, and each row's click probability.
    pub fn predict(&self, rows: Vec<Vec<u64>>) -> Result<(ModelVersion, Vec<f32>), ClientError> {
        match self.ask_serving(&ServingQuery::Predict(rows))? {
            ServingAnswer::Predicted(version, p) => Ok((version, p)),
            other => Err(ClientError::Answer(format!("{other:?}"))),
        }
    }

    /// Serving's statistics so far; `take_interval` starts a new interval
    /// of [`ServingStats::interval_latency`].
    pub fn serving_stats(&self, take_interval: bool) -> Result<ServingStats, ClientError> {
        match self.ask_serving(&ServingQuery::Stats { take_interval })? {
            ServingAnswer::Stats(stats) => Ok(stats),
            other => Err(ClientError::Answer(format!("{other:?}"))),
        }
    }

    /// The evaluation's figures so far.
    pub fn figures(&self) -> Result<EvalFigures, ClientError> {
        let answer = self.services.call(
            eval::EVAL_TASK,
            0,
            &eval::service_name(&self.name),
            &[],
            self.wait,
        )?;
        codec::decode(&answer).map_err(|e| ClientError::Answer(e.to_string()))
    }
}
