//! The messages between the training operators, each with its Arrow form
//! for crossing processes in place: the source's micro-batches to the
//! workers ([`TrainBatch`]), the workers' gradients to the shards
//! ([`Push`]), the shards' changes to serving ([`Delta`]) and the workers'
//! predictions to the evaluation ([`Scored`]); model versions
//! ([`ModelVersion`]) tag what serving answers with.

pub mod columns;
pub mod delta;
pub mod micro_batch;
pub mod push;
pub mod scored;

pub use delta::Delta;
pub use micro_batch::TrainBatch;
pub use push::Push;
pub use scored::Scored;
use serde::{Deserialize, Serialize};

/// A model version: the checkpoint epoch the state last passed, and the
/// records whose gradients it holds. In BSP mode the records are an exact
/// prefix of the stream.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ModelVersion {
    /// The last checkpoint barrier passed.
    pub epoch: u64,
    /// Records trained.
    pub records: u64,
}

impl std::fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "e{}+{}", self.epoch, self.records)
    }
}

/// A batch the serving model includes once every shard applied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedBatch {
    /// Its stream index.
    pub seq: u64,
    /// Its rows.
    pub rows: u64,
    /// When its first row was read.
    pub ingest_ns: u64,
}
