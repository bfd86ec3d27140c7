//! Why a stream job's parts stop, as plain data: a channel's failure, an
//! operator's (named by operator, phase and epoch), a subtask's, and an
//! attempt's. Every one is a serde value, so a subtask in another process
//! reports the same value the local runner does, and the caller matches on
//! it as if the failure were local.

use super::operator::StateError;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Why a channel's bytes could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ChannelError {
    /// A batch did not decode as the records this input expects.
    #[error("a batch does not decode: {0}")]
    Decode(String),
    /// The receiving end is gone.
    #[error("channel {0} is closed")]
    Closed(usize),
    /// A batch could not be encoded or laid out.
    #[error("a batch cannot be encoded: {0}")]
    Encode(String),
    /// The node's store refused a batch (full, or the batch is larger
    /// than the store), or lost one before it was read.
    #[error("the store refused a batch: {0}")]
    Store(String),
}

/// What an operator was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Handling records.
    Process,
    /// Handling a watermark.
    Watermark,
    /// Handling the end of its input.
    End,
    /// Freezing its state at a barrier (a sink's pre-commit).
    Snapshot,
    /// Making a completed checkpoint's output visible (a sink's commit).
    Commit,
    /// Restoring its state from a checkpoint.
    Restore,
    /// Reading its input (a source).
    Read,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Process => "processing records",
            Phase::Watermark => "handling a watermark",
            Phase::End => "ending its input",
            Phase::Snapshot => "taking its snapshot (pre-commit)",
            Phase::Commit => "committing",
            Phase::Restore => "restoring",
            Phase::Read => "reading its input",
        })
    }
}

/// Why a chain stopped: the first failure of one of its operators or
/// channels. Plain data, so it crosses processes as the same value.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum StageError {
    /// An operator returned an error.
    #[error("operator {operator:?} failed {phase} of epoch {epoch}: {cause}")]
    Operator {
        /// The operator's name in the graph (a sink's name, say).
        operator: String,
        /// What it was doing.
        phase: Phase,
        /// The checkpoint epoch concerned: the one whose records it was
        /// handling, snapshotting or committing, or the one restored.
        epoch: u64,
        /// The operator's error, in words.
        cause: String,
    },
    /// An output channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// Why a subtask stopped with an error. Plain data: a subtask in another
/// process reports it to the coordinator as the same value.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum TaskError {
    /// Its channels failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Its source's offset could not be restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// One of its operators failed, or an output channel.
    #[error(transparent)]
    Stage(StageError),
}

impl From<StageError> for TaskError {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Channel(c) => TaskError::Channel(c),
            e => TaskError::Stage(e),
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum AttemptFailure {
    /// A subtask stopped with an error (an operator's, a channel's).
    #[error("subtask {subtask}: {error}")]
    Subtask {
        /// Which.
        subtask: String,
        /// Why.
        error: TaskError,
    },
    /// A subtask's thread or process died (a panic, a killed worker, a
    /// dead node).
    #[error("subtask {subtask} was lost: {cause}")]
    Lost {
        /// Which.
        subtask: String,
        /// What the runtime said.
        cause: String,
    },
    /// Checkpoint storage failed: writing a state, committing, or reading
    /// a checkpoint back.
    #[error("checkpoint storage failed at epoch {epoch}: {cause}")]
    Storage {
        /// The checkpoint concerned (0: none).
        epoch: u64,
        /// The storage's error.
        cause: String,
    },
    /// A checkpoint did not complete in time.
    #[error("checkpoint {epoch} did not complete within {timeout_ms} ms")]
    CheckpointTimeout {
        /// Its epoch.
        epoch: u64,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The attempt's subtasks could not be placed or started.
    #[error("cannot place the job's subtasks: {cause}")]
    Placement {
        /// What the cluster said.
        cause: String,
    },
    /// A test hook crashed the attempt.
    #[error("injected fault: {0}")]
    Injected(String),
}
