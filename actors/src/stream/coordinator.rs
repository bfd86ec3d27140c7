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

use super::edges::EdgeStats;
use super::failure::{AttemptFailure, TaskError};
use super::operator::{write_part, StateError};
use super::plan::{Plan, SubtaskId};
use super::restart::{RestartStrategy, Restarts};
use super::runner::{Command, SourcePace};
use super::stage::ChainSnapshot;
use crate::checkpoint::storage::{CheckpointStorage, Epoch, Manifest, StateHandle, StorageError};
use braid::store::codec;
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
    /// Before the `n`th attempt (1, 2, ...) reads checkpoint storage, once
    /// the restart strategy's delay has passed: where a test lifts a fault
    /// it dealt.
    BeforeAttempt(u64),
}

/// A test hook: returning true crashes the attempt at that point.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> bool + Send + Sync>;

/// How a job runs.
pub struct JobConfig {
    /// Where checkpoints go.
    pub storage: CheckpointStorage,
    /// Time between checkpoints.
    pub checkpoint_interval: Duration,
    /// A checkpoint not completed this long after its barrier was injected
    /// (a hung fsync, a stuck subtask) fails the attempt.
    pub checkpoint_timeout: Duration,
    /// When a failed attempt is followed by another, and when the job
    /// gives up.
    pub restart: RestartStrategy,
    /// How long the cluster runner keeps trying to place an attempt's
    /// subtasks (every node that could host them gone, or the head) before
    /// the job fails with [`JobError::NoResources`], whatever `restart`.
    pub resource_wait: Duration,
    /// Sources' pace.
    pub pace: SourcePace,
    /// Messages a channel buffers before its sender waits.
    pub credits: usize,
    /// Batch bytes a channel between processes keeps in flight (batches
    /// in the store or the receiver's mailbox arena, not yet taken by
    /// their receiver) before its sender waits; at least one batch is
    /// always let through.
    pub credit_bytes: usize,
    /// Crash injection, for tests.
    pub faults: Option<FaultHook>,
}

impl JobConfig {
    /// Defaults: checkpoints every second, timing out after 10 minutes (as
    /// Flink's); the default restart strategy; 8 s of waiting for
    /// resources; 8 credits and 32 MiB of store bytes in flight per
    /// channel.
    pub fn new(storage: CheckpointStorage) -> Self {
        JobConfig {
            storage,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_timeout: DEFAULT_CHECKPOINT_TIMEOUT,
            restart: RestartStrategy::default(),
            resource_wait: DEFAULT_RESOURCE_WAIT,
            pace: SourcePace::default(),
            credits: DEFAULT_CREDITS,
            credit_bytes: DEFAULT_CREDIT_BYTES,
            faults: None,
        }
    }
}

/// How long a job waits for resources by default.
pub const DEFAULT_RESOURCE_WAIT: Duration = Duration::from_secs(8);
/// Time between checkpoints by default.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a checkpoint may take by default (Flink's 10 minutes).
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// Messages a channel buffers by default before its sender waits.
pub const DEFAULT_CREDITS: usize = 8;
/// Store bytes a channel keeps in flight by default before its sender
/// waits.
pub const DEFAULT_CREDIT_BYTES: usize = 32 << 20;

/// How a finished job went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Committed checkpoints a recovery fell back past because they failed
    /// verification (moved aside in storage). Their epochs' output was
    /// already published by transactional sinks and is published again by
    /// the replay: a file sink's duplicates are these epochs'.
    pub republished_epochs: Vec<u64>,
    /// What crossed each graph edge in the attempt that finished: batches,
    /// bytes, and bytes encoded or copied on the way.
    pub edges: Vec<EdgeStats>,
    /// What the finished attempt's subtasks handed back
    /// ([`results`](super::results)).
    pub results: super::results::JobResults,
    /// CPU seconds the processes of the finished attempt's hosts had used
    /// when their subtasks finished (cluster runner; start-up included,
    /// failed attempts' processes not).
    pub hosts_cpu_seconds: Option<f64>,
}

/// Why a job stopped without finishing.
#[derive(Debug, Error)]
pub enum JobError {
    /// More attempts failed than the restart strategy allows.
    #[error("the job failed {failures} times, more than its restart strategy allows; the last failure: {last}")]
    TooManyFailures {
        /// Failed attempts.
        failures: u32,
        /// What went wrong last.
        last: AttemptFailure,
    },
    /// No attempt could be placed for longer than the resource wait.
    #[error("no resources to run the job for {waited_ms} ms; the last failure: {last}")]
    NoResources {
        /// How long it waited.
        waited_ms: u64,
        /// What placing the last attempt failed with.
        last: AttemptFailure,
    },
    /// No job of that name is registered in this binary.
    #[error("{0}")]
    UnknownJob(String),
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
    /// The attempt failed.
    Failed(AttemptFailure),
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
    Failed(AttemptFailure),
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
        codec::decode(bytes).map_err(|e| StateError::Decode(e.to_string()))?;
    Ok((
        saved.states.into_iter().map(|s| (s.0, s.1)).collect(),
        saved.offset,
    ))
}

/// One attempt at running the job.
pub struct Attempt {
    /// Increases by one per attempt, and is above every generation the
    /// job's checkpoint storage has seen.
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

/// What a recovery read from checkpoint storage.
struct Recovered {
    generation: u64,
    restored_epoch: Option<Epoch>,
    states: HashMap<SubtaskId, Restored>,
    /// Committed checkpoints moved aside on the way.
    quarantined: Vec<Epoch>,
}

/// Drives checkpoints and recoveries of one job.
pub struct Coordinator {
    config: JobConfig,
    runtime: tokio::runtime::Runtime,
    subtasks: Vec<SubtaskId>,
    sources: Vec<SubtaskId>,
    generation: u64,
    report: JobReport,
    restarts: Restarts,
    failed_at: Option<Instant>,
    /// When the next attempt may start (a restart's delay).
    next_attempt_at: Option<Instant>,
    /// Since when, and how long apart, attempts could not be placed.
    placing: Option<(Instant, Duration)>,
    /// Attempts begun.
    attempts: u64,
    /// What it publishes for `/metrics`.
    figures: super::metrics::JobFigures,
}

impl Coordinator {
    /// A coordinator for `plan`.
    pub fn new(plan: &Plan, config: JobConfig) -> Result<Self, JobError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| JobError::Runtime(e.to_string()))?;
        let restarts = Restarts::new(config.restart.clone());
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
                republished_epochs: Vec::new(),
                edges: Vec::new(),
                results: Default::default(),
                hosts_cpu_seconds: None,
            },
            restarts,
            failed_at: None,
            next_attempt_at: None,
            placing: None,
            attempts: 0,
            figures: Default::default(),
        })
    }

    /// Publishes the job's checkpoint and failure figures for `/metrics`.
    fn publish_figures(&mut self) {
        self.figures.checkpoints = self.report.checkpoints;
        self.figures.failures = self.report.failures;
        self.figures.recoveries = self.report.recovery_ms.len() as u32;
        super::metrics::publish_job(self.config.storage.job(), &self.figures);
    }

    /// The job's configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    fn fault(&self, point: FaultPoint) -> bool {
        self.config.faults.as_ref().is_some_and(|f| f(point))
    }

    /// Records a failed attempt that got running; errors once the restart
    /// strategy gives up.
    pub fn note_failure(&mut self, failure: AttemptFailure) -> Result<(), JobError> {
        self.fail(failure)
    }

    /// Records an attempt whose subtasks could not be placed, having tried
    /// since `tried_at`. It does not count against the restart strategy:
    /// the next attempt is tried after a short wait (100 ms, doubling up to
    /// 1 s), and the job fails with [`JobError::NoResources`] once attempts
    /// have failed to be placed for [`JobConfig::resource_wait`].
    pub fn note_placement_failure(
        &mut self,
        cause: String,
        tried_at: Instant,
    ) -> Result<(), JobError> {
        let now = Instant::now();
        let failure = AttemptFailure::Placement { cause };
        let (since, last_wait) = *self
            .placing
            .get_or_insert((tried_at, Duration::from_millis(50)));
        let waited = now.duration_since(since);
        if waited >= self.config.resource_wait {
            tracing::error!(
                "attempt {} cannot be placed, and none could for {} ms: {failure}",
                self.generation,
                waited.as_millis()
            );
            return Err(JobError::NoResources {
                waited_ms: waited.as_millis() as u64,
                last: failure,
            });
        }
        let wait = (last_wait * 2)
            .min(Duration::from_secs(1))
            .min(self.config.resource_wait - waited);
        self.placing = Some((since, wait));
        self.failed_at.get_or_insert(now);
        self.next_attempt_at = Some(now + wait);
        tracing::warn!(
            "attempt {} cannot be placed ({failure}); trying again in {} ms",
            self.generation,
            wait.as_millis()
        );
        Ok(())
    }

    fn fail(&mut self, failure: AttemptFailure) -> Result<(), JobError> {
        let now = Instant::now();
        self.report.failures += 1;
        self.failed_at = Some(now);
        self.publish_figures();
        match self.restarts.failed(now) {
            Some(delay) => {
                tracing::warn!(
                    "attempt {} failed: {failure}; restarting from the last completed \
                     checkpoint in {} ms",
                    self.generation,
                    delay.as_millis()
                );
                self.next_attempt_at = Some(now + delay);
                Ok(())
            }
            None => {
                tracing::error!(
                    "attempt {} failed: {failure}; the restart strategy ({:?}) gives up \
                     after {} failures",
                    self.generation,
                    self.restarts.strategy(),
                    self.report.failures
                );
                Err(JobError::TooManyFailures {
                    failures: self.report.failures,
                    last: failure,
                })
            }
        }
    }

    /// Starts the next attempt, once the restart strategy's delay has
    /// passed: a new generation, restored from the newest valid
    /// checkpoint. A committed checkpoint that fails verification, or
    /// whose states do not decode, is moved aside and the one before it
    /// tried; a storage error fails the attempt.
    pub fn begin_attempt(&mut self) -> Result<Attempt, JobError> {
        loop {
            if let Some(at) = self.next_attempt_at.take() {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            self.attempts += 1;
            if self.fault(FaultPoint::BeforeAttempt(self.attempts)) {
                self.fail(AttemptFailure::Injected(format!(
                    "crash before attempt {}",
                    self.attempts
                )))?;
                continue;
            }
            let recovered = self.runtime.block_on(self.recover());
            let (generation, latest, restored) = match recovered {
                Ok(r) => {
                    self.published_again(&r.quarantined);
                    (r.generation, r.restored_epoch, r.states)
                }
                Err(e) => {
                    self.fail(AttemptFailure::Storage {
                        epoch: 0,
                        cause: e.to_string(),
                    })?;
                    continue;
                }
            };
            self.generation = generation;
            self.report.generation = generation;
            let restored_epoch = latest.map_or(0, |e| e.0);
            if self.fault(FaultPoint::DuringRestore(self.generation)) {
                self.fail(AttemptFailure::Injected(format!(
                    "crash while restoring generation {}",
                    self.generation
                )))?;
                continue;
            }
            if self.report.failures > 0 {
                self.report.restored_from.push(restored_epoch);
                tracing::info!(
                    "attempt {generation} restores checkpoint {restored_epoch} and starts"
                );
            } else if latest.is_some() {
                self.report.resumed_from = Some(restored_epoch);
                tracing::info!("the job resumes from checkpoint {restored_epoch}");
            }
            return Ok(Attempt {
                generation,
                restored_epoch,
                restored,
            });
        }
    }

    /// Claims a generation and reads the newest checkpoint whose states
    /// all decode, moving aside every newer one that does not verify.
    async fn recover(&self) -> Result<Recovered, StorageError> {
        let storage = &self.config.storage;
        let generation = storage.claim_generation(self.generation).await?;
        let mut quarantined = Vec::new();
        loop {
            let recovery = storage.recover().await?;
            quarantined.extend(recovery.quarantined);
            let Some(manifest) = recovery.manifest else {
                return Ok(Recovered {
                    generation,
                    restored_epoch: None,
                    states: HashMap::new(),
                    quarantined,
                });
            };
            match self.read_states(&manifest).await? {
                Ok(states) => {
                    return Ok(Recovered {
                        generation,
                        restored_epoch: Some(manifest.epoch),
                        states,
                        quarantined,
                    })
                }
                Err(why) => {
                    tracing::warn!(
                        epoch = manifest.epoch.0,
                        "moving aside a checkpoint whose state does not decode: {why}"
                    );
                    storage.quarantine(manifest.epoch, &why).await?;
                    quarantined.push(manifest.epoch);
                }
            }
        }
    }

    /// Reads and decodes every subtask's state of `manifest`; the inner
    /// error says why a blob that verified does not decode.
    async fn read_states(
        &self,
        manifest: &Manifest,
    ) -> Result<Result<HashMap<SubtaskId, Restored>, String>, StorageError> {
        let names: HashMap<String, SubtaskId> =
            self.subtasks.iter().map(|s| (s.to_string(), *s)).collect();
        let mut restored = HashMap::new();
        for handle in &manifest.states {
            let Some(id) = names.get(&handle.operator) else {
                continue;
            };
            let bytes = self.config.storage.read_state(handle).await?;
            match decode_subtask(&bytes) {
                Ok(saved) => {
                    restored.insert(*id, saved);
                }
                Err(e) => {
                    return Ok(Err(format!(
                        "state of {} does not decode: {e}",
                        handle.operator
                    )))
                }
            }
        }
        Ok(Ok(restored))
    }

    /// Committed epochs that recovery fell back past: their sinks' output
    /// was already published, and the replay publishes it again.
    fn published_again(&mut self, epochs: &[Epoch]) {
        if epochs.is_empty() {
            return;
        }
        let list: Vec<u64> = epochs.iter().map(|e| e.0).collect();
        tracing::error!(
            "recovery falls back past committed checkpoints {list:?}, which fail \
             verification (moved aside): output that transactional sinks published \
             for those epochs is published again"
        );
        self.report.republished_epochs.extend(list);
    }

    /// Runs an attempt's checkpoints until the job finishes (`Some`), the
    /// attempt fails (`None`: start another), or the job fails.
    pub fn drive(
        &mut self,
        attempt: &Attempt,
        events: &Receiver<CoordinatorEvent>,
        send: &dyn Fn(SubtaskId, Command),
    ) -> Result<Option<JobReport>, JobError> {
        self.placing = None;
        if let Some(at) = self.failed_at.take() {
            self.report
                .recovery_ms
                .push(at.elapsed().as_millis() as u64);
        }
        self.publish_figures();
        let (stored_tx, stored_rx) = crossbeam_channel::unbounded::<Stored>();
        let mut next_epoch = attempt.restored_epoch + 1;
        let mut next_trigger = Instant::now() + self.config.checkpoint_interval;
        let mut in_flight: Option<(u64, Instant, HashMap<SubtaskId, StateHandle>)> = None;
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
                    self.fail(AttemptFailure::Injected(format!(
                        "crash before barrier {epoch}"
                    )))?;
                    return Ok(None);
                }
                for s in &self.sources {
                    send(*s, Command::Trigger(epoch));
                }
                in_flight = Some((epoch, Instant::now(), HashMap::new()));
                if all_exhausted {
                    final_epoch = Some(epoch);
                }
            }
            if let Some((epoch, since, _)) = &in_flight {
                if since.elapsed() > self.config.checkpoint_timeout {
                    self.fail(AttemptFailure::CheckpointTimeout {
                        epoch: *epoch,
                        timeout_ms: self.config.checkpoint_timeout.as_millis() as u64,
                    })?;
                    return Ok(None);
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
                    Ok(CoordinatorEvent::Failed(failure)) => {
                        self.fail(failure)?;
                        return Ok(None);
                    }
                    Err(_) => {
                        self.fail(AttemptFailure::Lost {
                            subtask: "every subtask".into(),
                            cause: "stopped before the job finished".into(),
                        })?;
                        return Ok(None);
                    }
                },
                recv(stored_rx) -> stored => match stored {
                    Ok(Stored::Ok { id, epoch, handle }) => {
                        let complete = match &mut in_flight {
                            Some((e, _, acks)) if *e == epoch => {
                                acks.insert(id, handle);
                                acks.len() == self.subtasks.len()
                            }
                            _ => false,
                        };
                        if complete {
                            if let Some((epoch, since, acks)) = in_flight.take() {
                                if self.fault(FaultPoint::BeforeCommit(epoch)) {
                                    self.fail(AttemptFailure::Injected(format!(
                                        "crash before committing {epoch}"
                                    )))?;
                                    return Ok(None);
                                }
                                let bytes: u64 = acks.values().map(|h| h.len).sum();
                                if let Err(e) = self.commit(epoch, acks) {
                                    self.fail(AttemptFailure::Storage {
                                        epoch,
                                        cause: e.to_string(),
                                    })?;
                                    return Ok(None);
                                }
                                let at = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0.0, |d| d.as_secs_f64());
                                self.figures.last = Some((epoch, since.elapsed(), bytes, at));
                                self.publish_figures();
                                self.restarts.progress();
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
                    Ok(Stored::Failed(failure)) => {
                        self.fail(failure)?;
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
                    let _ = done.send(Stored::Failed(AttemptFailure::Subtask {
                        subtask: id.to_string(),
                        error: TaskError::State(e),
                    }));
                    return;
                }
                Err(e) => {
                    let _ = done.send(Stored::Failed(AttemptFailure::Lost {
                        subtask: id.to_string(),
                        cause: format!("encoding its snapshot of {epoch} panicked: {e}"),
                    }));
                    return;
                }
            };
            if crash {
                let _ = done.send(Stored::Failed(AttemptFailure::Injected(format!(
                    "{id}: crash while writing the snapshot of {epoch}"
                ))));
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
                    let _ = done.send(Stored::Failed(AttemptFailure::Storage {
                        epoch,
                        cause: format!("{id}: {e}"),
                    }));
                }
            }
        });
    }

    fn commit(
        &mut self,
        epoch: u64,
        acks: HashMap<SubtaskId, StateHandle>,
    ) -> Result<(), StorageError> {
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

impl Drop for Coordinator {
    fn drop(&mut self) {
        super::metrics::withdraw_job(self.config.storage.job());
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
    use braid::store::codec;

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
            let want = codec::encode(&SubtaskState {
                states: vec![
                    NamedState(
                        "op-a".into(),
                        codec::encode(&(1u64, "x".to_string())).unwrap(),
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
