//! The checkpoint coordinator (Carbone et al. 2015, aligned barriers):
//! every interval it asks each source to inject barrier *n*; each subtask
//! snapshots its chain when the barrier has arrived on all its inputs and
//! reports the frozen state, which is encoded and written to checkpoint
//! storage off the record path; when every subtask's state of epoch *n* is
//! stored, the coordinator commits the manifest (its commit marker last)
//! and tells every subtask that *n* completed, which is when transactional
//! sinks publish. A failure anywhere ends the attempt; the next attempt
//! restores every subtask from the newest valid checkpoint.
//!
//! When every source has read all of its input, one last checkpoint is
//! taken, and only after it completes are the sources told to finish, so
//! a bounded job's output is committed in full.

use super::operator::{write_part, StateError};
use super::plan::{Plan, SubtaskId};
use super::runner::{Command, SourcePace};
use super::stage::ChainSnapshot;
use crate::checkpoint::storage::{CheckpointStorage, Epoch, Manifest, StateHandle, StorageError};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Where a test hook may make an attempt crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Before the barrier of this epoch is injected.
    BeforeBarrier(u64),
    /// While a subtask's state of this epoch is being written.
    DuringSnapshot(u64),
    /// After every subtask acknowledged this epoch, before the commit
    /// marker is written.
    BeforeCommit(u64),
    /// While restoring an attempt of this generation.
    DuringRestore(u64),
}

/// A test hook: returning true crashes the attempt at that point.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> bool + Send + Sync>;

/// How a job runs.
pub struct JobConfig {
    /// Where checkpoints go.
    pub storage: CheckpointStorage,
    /// Time between checkpoints.
    pub checkpoint_interval: Duration,
    /// Failed attempts tolerated before the job fails.
    pub max_failures: u32,
    /// Sources' pace.
    pub pace: SourcePace,
    /// Messages a channel buffers before its sender waits.
    pub credits: usize,
    /// Crash injection, for tests.
    pub faults: Option<FaultHook>,
}

impl JobConfig {
    /// Defaults: checkpoints every second, 10 failures tolerated, 8
    /// credits per channel.
    pub fn new(storage: CheckpointStorage) -> Self {
        JobConfig {
            storage,
            checkpoint_interval: Duration::from_secs(1),
            max_failures: 10,
            pace: SourcePace::default(),
            credits: 8,
            faults: None,
        }
    }
}

/// How a finished job went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// Checkpoints completed (over all attempts).
    pub checkpoints: u64,
    /// Attempts that failed and were recovered from.
    pub failures: u32,
    /// The last attempt's generation.
    pub generation: u64,
    /// The epoch each recovery restored (0 = from the start).
    pub restored_from: Vec<u64>,
    /// Time from each failure until the next attempt was running.
    pub recovery_ms: Vec<u64>,
    /// The epoch of the checkpoint the first attempt found in storage and
    /// restored (a job resumed after its process died), if any.
    pub resumed_from: Option<u64>,
}

/// Why a job stopped without finishing.
#[derive(Debug, Error)]
pub enum JobError {
    /// More attempts failed than allowed.
    #[error("the job failed {failures} times; the last failure: {last}")]
    TooManyFailures {
        /// Failed attempts.
        failures: u32,
        /// What went wrong last.
        last: String,
    },
    /// Checkpoint storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A checkpoint's state does not fit this job.
    #[error(transparent)]
    State(#[from] StateError),
    /// The I/O runtime could not start.
    #[error("cannot start the coordinator's runtime: {0}")]
    Runtime(String),
}

/// What subtasks and state writers tell the coordinator.
pub enum CoordinatorEvent {
    /// A subtask's frozen state at a barrier.
    Snapshot {
        /// Whose.
        id: SubtaskId,
        /// The barrier's epoch.
        epoch: u64,
        /// The chain's states.
        states: ChainSnapshot,
        /// A source's offset.
        offset: Option<Vec<u8>>,
    },
    /// A source read all of its input.
    Exhausted(SubtaskId),
    /// A subtask finished after end of input.
    Finished(SubtaskId),
    /// A subtask failed.
    Failed(SubtaskId, String),
    /// A subtask stored its state of an epoch itself.
    Stored {
        /// Whose.
        id: SubtaskId,
        /// The epoch.
        epoch: u64,
        /// Where it went.
        handle: StateHandle,
    },
}

enum Stored {
    Ok {
        id: SubtaskId,
        epoch: u64,
        handle: StateHandle,
    },
    Failed(String),
}

/// One subtask's saved state.
#[derive(Serialize, Deserialize)]
struct SubtaskState {
    states: Vec<NamedState>,
    offset: Option<Vec<u8>>,
}

/// One operator's state (encoded as bytes, not element by element).
#[derive(Serialize, Deserialize)]
struct NamedState(String, #[serde(with = "serde_bytes")] Vec<u8>);

/// What a subtask restores: its chain's states by operator, and a
/// source's offset.
pub type Restored = (HashMap<String, Vec<u8>>, Option<Vec<u8>>);

/// Decodes a subtask's state blob as [`encode_subtask`] wrote it (bincode
/// of its operators' named states and its source offset). The blob comes
/// from checkpoint storage: any bytes give a state or a
/// [`StateError::Decode`], never a panic. Recovery calls it for every
/// subtask it restores; it is public for the fuzz targets.
#[doc(hidden)]
pub fn decode_subtask(bytes: &[u8]) -> Result<Restored, StateError> {
    let saved: SubtaskState =
        bincode::deserialize(bytes).map_err(|e| StateError::Decode(e.to_string()))?;
    Ok((
        saved.states.into_iter().map(|s| (s.0, s.1)).collect(),
        saved.offset,
    ))
}

/// One attempt at running the job.
pub struct Attempt {
    /// Increases by one per attempt.
    pub generation: u64,
    /// The epoch restored (0 when starting fresh).
    pub restored_epoch: u64,
    restored: HashMap<SubtaskId, Restored>,
}

impl Attempt {
    /// What subtask `id` restores, if the attempt starts from a checkpoint.
    pub fn restored(&self, id: SubtaskId) -> Option<Restored> {
        self.restored.get(&id).cloned()
    }
}

/// Drives checkpoints and recoveries of one job.
pub struct Coordinator {
    config: JobConfig,
    runtime: tokio::runtime::Runtime,
    subtasks: Vec<SubtaskId>,
    sources: Vec<SubtaskId>,
    generation: u64,
    report: JobReport,
    failed_at: Option<Instant>,
    last_failure: String,
}

impl Coordinator {
    /// A coordinator for `plan`.
    pub fn new(plan: &Plan, config: JobConfig) -> Result<Self, JobError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| JobError::Runtime(e.to_string()))?;
        Ok(Coordinator {
            config,
            runtime,
            subtasks: plan.subtasks(),
            sources: plan.sources(),
            generation: 0,
            report: JobReport {
                checkpoints: 0,
                failures: 0,
                generation: 0,
                restored_from: Vec::new(),
                recovery_ms: Vec::new(),
                resumed_from: None,
            },
            failed_at: None,
            last_failure: String::new(),
        })
    }

    /// The job's configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    fn fault(&self, point: FaultPoint) -> bool {
        self.config.faults.as_ref().is_some_and(|f| f(point))
    }

    /// Records a failed attempt that never got running (its subtasks could
    /// not be placed or started); errors once too many attempts failed.
    pub fn note_failure(&mut self, why: String) -> Result<(), JobError> {
        self.fail(why)
    }

    fn fail(&mut self, why: String) -> Result<(), JobError> {
        tracing::warn!("attempt {} failed: {why}", self.generation);
        self.report.failures += 1;
        self.failed_at = Some(Instant::now());
        self.last_failure = why;
        if self.report.failures > self.config.max_failures {
            return Err(JobError::TooManyFailures {
                failures: self.report.failures,
                last: self.last_failure.clone(),
            });
        }
        Ok(())
    }

    /// Starts the next attempt: a new generation, restored from the newest
    /// valid checkpoint.
    pub fn begin_attempt(&mut self) -> Result<Attempt, JobError> {
        loop {
            self.generation += 1;
            self.report.generation = self.generation;
            let latest = self.runtime.block_on(self.config.storage.latest())?;
            let mut restored = HashMap::new();
            let restored_epoch = latest.as_ref().map_or(0, |m| m.epoch.0);
            if let Some(manifest) = &latest {
                let names: HashMap<String, SubtaskId> =
                    self.subtasks.iter().map(|s| (s.to_string(), *s)).collect();
                for handle in &manifest.states {
                    let Some(id) = names.get(&handle.operator) else {
                        continue;
                    };
                    let bytes = self
                        .runtime
                        .block_on(self.config.storage.read_state(handle))?;
                    restored.insert(*id, decode_subtask(&bytes)?);
                }
            }
            if self.fault(FaultPoint::DuringRestore(self.generation)) {
                self.fail(format!(
                    "crash while restoring generation {}",
                    self.generation
                ))?;
                continue;
            }
            if self.generation > 1 {
                self.report.restored_from.push(restored_epoch);
            } else if latest.is_some() {
                self.report.resumed_from = Some(restored_epoch);
            }
            return Ok(Attempt {
                generation: self.generation,
                restored_epoch,
                restored,
            });
        }
    }

    /// Runs an attempt's checkpoints until the job finishes (`Some`), the
    /// attempt fails (`None`: start another), or the job fails.
    pub fn drive(
        &mut self,
        attempt: &Attempt,
        events: &Receiver<CoordinatorEvent>,
        send: &dyn Fn(SubtaskId, Command),
    ) -> Result<Option<JobReport>, JobError> {
        if let Some(at) = self.failed_at.take() {
            self.report
                .recovery_ms
                .push(at.elapsed().as_millis() as u64);
        }
        let (stored_tx, stored_rx) = crossbeam_channel::unbounded::<Stored>();
        let mut next_epoch = attempt.restored_epoch + 1;
        let mut next_trigger = Instant::now() + self.config.checkpoint_interval;
        let mut in_flight: Option<(u64, HashMap<SubtaskId, StateHandle>)> = None;
        let mut exhausted: HashSet<SubtaskId> = HashSet::new();
        let mut finished: HashSet<SubtaskId> = HashSet::new();
        let mut finishing = false;
        let mut final_epoch: Option<u64> = None;
        loop {
            let all_exhausted =
                !self.sources.is_empty() && self.sources.iter().all(|s| exhausted.contains(s));
            if in_flight.is_none()
                && final_epoch.is_none()
                && (Instant::now() >= next_trigger || all_exhausted)
            {
                let epoch = next_epoch;
                if self.fault(FaultPoint::BeforeBarrier(epoch)) {
                    self.fail(format!("crash before barrier {epoch}"))?;
                    return Ok(None);
                }
                for s in &self.sources {
                    send(*s, Command::Trigger(epoch));
                }
                in_flight = Some((epoch, HashMap::new()));
                if all_exhausted {
                    final_epoch = Some(epoch);
                }
            }
            let wait = next_trigger
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            crossbeam_channel::select! {
                recv(events) -> event => match event {
                    Ok(CoordinatorEvent::Snapshot { id, epoch, states, offset }) => {
                        self.store(id, epoch, states, offset, &stored_tx);
                    }
                    Ok(CoordinatorEvent::Stored { id, epoch, handle }) => {
                        let _ = stored_tx.send(Stored::Ok { id, epoch, handle });
                    }
                    Ok(CoordinatorEvent::Exhausted(id)) => {
                        exhausted.insert(id);
                    }
                    Ok(CoordinatorEvent::Finished(id)) => {
                        finished.insert(id);
                        if finishing && self.subtasks.iter().all(|s| finished.contains(s)) {
                            return Ok(Some(self.report.clone()));
                        }
                    }
                    Ok(CoordinatorEvent::Failed(id, why)) => {
                        self.fail(format!("{id}: {why}"))?;
                        return Ok(None);
                    }
                    Err(_) => {
                        self.fail("every subtask stopped before the job finished".into())?;
                        return Ok(None);
                    }
                },
                recv(stored_rx) -> stored => match stored {
                    Ok(Stored::Ok { id, epoch, handle }) => {
                        let complete = match &mut in_flight {
                            Some((e, acks)) if *e == epoch => {
                                acks.insert(id, handle);
                                acks.len() == self.subtasks.len()
                            }
                            _ => false,
                        };
                        if complete {
                            if let Some((epoch, acks)) = in_flight.take() {
                                if self.fault(FaultPoint::BeforeCommit(epoch)) {
                                    self.fail(format!("crash before committing {epoch}"))?;
                                    return Ok(None);
                                }
                                self.commit(epoch, acks)?;
                                for s in &self.subtasks {
                                    send(*s, Command::Complete(epoch));
                                }
                                next_epoch = epoch + 1;
                                next_trigger = Instant::now() + self.config.checkpoint_interval;
                                if final_epoch == Some(epoch) {
                                    finishing = true;
                                    for s in &self.sources {
                                        send(*s, Command::Finish);
                                    }
                                }
                            }
                        }
                    }
                    Ok(Stored::Failed(why)) => {
                        self.fail(why)?;
                        return Ok(None);
                    }
                    Err(_) => {}
                },
                default(wait) => {}
            }
        }
    }

    fn store(
        &self,
        id: SubtaskId,
        epoch: u64,
        states: ChainSnapshot,
        offset: Option<Vec<u8>>,
        done: &Sender<Stored>,
    ) {
        let storage = self.config.storage.clone();
        let generation = self.generation;
        let crash = self.fault(FaultPoint::DuringSnapshot(epoch));
        let done = done.clone();
        self.runtime.spawn(async move {
            let encoded = tokio::task::spawn_blocking(move || encode_subtask(states, offset)).await;
            let bytes = match encoded {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    let _ = done.send(Stored::Failed(format!("{id}: {e}")));
                    return;
                }
                Err(e) => {
                    let _ = done.send(Stored::Failed(format!("{id}: {e}")));
                    return;
                }
            };
            if crash {
                let _ = done.send(Stored::Failed(format!(
                    "{id}: crash while writing the snapshot of {epoch}"
                )));
                return;
            }
            match storage
                .write_state(Epoch(epoch), generation, &id.to_string(), bytes)
                .await
            {
                Ok(handle) => {
                    let _ = done.send(Stored::Ok { id, epoch, handle });
                }
                Err(e) => {
                    let _ = done.send(Stored::Failed(format!("{id}: {e}")));
                }
            }
        });
    }

    fn commit(
        &mut self,
        epoch: u64,
        acks: HashMap<SubtaskId, StateHandle>,
    ) -> Result<(), JobError> {
        let mut states: Vec<(SubtaskId, StateHandle)> = acks.into_iter().collect();
        states.sort_by_key(|(id, _)| *id);
        let manifest = Manifest {
            job: self.config.storage.job().to_string(),
            epoch: Epoch(epoch),
            generation: self.generation,
            states: states.into_iter().map(|(_, h)| h).collect(),
            metadata: BTreeMap::new(),
        };
        self.runtime
            .block_on(self.config.storage.commit(&manifest))?;
        self.report.checkpoints += 1;
        Ok(())
    }
}

/// Encodes a subtask's frozen chain state and source offset into the blob
/// checkpoint storage keeps.
///
/// The blob is bincode of [`SubtaskState`], written by hand so that each
/// operator's snapshot is encoded straight into it
/// ([`Snapshot::encode_into`](super::operator::Snapshot::encode_into))
/// rather than into a buffer of its own that is then copied: bincode lays a
/// sequence or string out as its length (u64 little-endian) and then its
/// elements, and an option as a tag byte (0 or 1) and then its value.
#[doc(hidden)]
pub fn encode_subtask(
    states: ChainSnapshot,
    offset: Option<Vec<u8>>,
) -> Result<Vec<u8>, StateError> {
    fn put_len(out: &mut Vec<u8>, len: usize) {
        out.extend_from_slice(&(len as u64).to_le_bytes());
    }
    let mut out = Vec::new();
    put_len(&mut out, states.len());
    for (name, snapshot) in states {
        put_len(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        write_part(&mut out, |o| snapshot.encode_into(o))?;
    }
    match offset {
        None => out.push(0),
        Some(offset) => {
            out.push(1);
            put_len(&mut out, offset.len());
            out.extend_from_slice(&offset);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{encode_subtask, NamedState, SubtaskState};
    use crate::stream::operator::Snapshot;

    #[test]
    fn a_subtask_blob_is_bincode_of_its_states_and_offset() {
        for offset in [None, Some(vec![7u8, 8, 9])] {
            let states = vec![
                ("op-a".to_string(), Snapshot::of((1u64, "x".to_string()))),
                ("op-b".to_string(), Snapshot::empty()),
                (
                    "op-c".to_string(),
                    Snapshot::writer(|out| {
                        out.extend_from_slice(&[1, 2, 3]);
                        Ok(())
                    }),
                ),
            ];
            let blob = encode_subtask(states, offset.clone()).unwrap();
            let want = bincode::serialize(&SubtaskState {
                states: vec![
                    NamedState(
                        "op-a".into(),
                        bincode::serialize(&(1u64, "x".to_string())).unwrap(),
                    ),
                    NamedState("op-b".into(), Vec::new()),
                    NamedState("op-c".into(), vec![1, 2, 3]),
                ],
                offset,
            })
            .unwrap();
            assert_eq!(blob, want);
        }
    }
}
