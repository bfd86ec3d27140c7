//! Durable checkpoint storage behind the [`ObjectStore`] interface.
//!
//! Every operator subtask writes its state snapshot with
//! [`CheckpointStorage::write_state`]; once every subtask has acknowledged,
//! the coordinator calls [`CheckpointStorage::commit`] with a [`Manifest`]
//! listing the returned [`StateHandle`]s. Recovery calls
//! [`CheckpointStorage::latest`]. Any [`ObjectStore`] works: a local
//! directory ([`CheckpointStorage::local`]), memory
//! ([`CheckpointStorage::in_memory`]) or an S3-compatible service
//! ([`CheckpointStorage::new`]).
//!
//! # Layout
//!
//! All objects of one job live under a single path segment named after the
//! job (percent-encoded by [`object_store::path`] if it holds a `/` or other
//! reserved characters):
//!
//! ```text
//! <job>/chk-<epoch>/state/<operator>-g<generation>-<nonce>   one state blob per write
//! <job>/chk-<epoch>/manifest.json                             the manifest
//! <job>/chk-<epoch>/_COMMITTED                                the commit marker
//! ```
//!
//! * `<epoch>` is zero-padded to 20 digits, so listing order is numeric order.
//! * `<nonce>` is 16 hex digits, fresh for every write, so no write (a retry
//!   within one generation, or a zombie subtask of an older generation) ever
//!   replaces a blob that a manifest already names.
//! * `manifest.json` is one header line followed by the manifest as JSON:
//!   `braid-manifest v1 crc32=<8 hex digits> len=<bytes>\n<json>`, where the
//!   CRC32 and length cover the JSON body exactly.
//! * `_COMMITTED` is a JSON object naming the epoch, the generation and the
//!   CRC32 and total length of the `manifest.json` it commits, so a marker
//!   left beside a different manifest fails verification.
//!
//! # Guarantees
//!
//! * **Atomic visibility.** [`commit`](CheckpointStorage::commit) checks that
//!   every named blob exists with the recorded length, writes the manifest,
//!   and only after that write returned `Ok` writes the marker. A crash at
//!   any point before the marker leaves an uncommitted epoch that
//!   [`latest`](CheckpointStorage::latest) ignores. Each `put` is atomic
//!   (the local store writes a temporary file and renames it).
//! * **Verified recovery.** [`latest`](CheckpointStorage::latest) returns the
//!   newest committed epoch whose marker, manifest and every state blob
//!   (length and CRC32) verify; anything else is skipped with a
//!   `tracing::warn!` giving the reason. Failures of the store itself
//!   (other than a missing object) are returned as errors instead, so a
//!   transient outage never silently rolls recovery back.
//! * **Retention.** After each commit, committed epochs older than the newest
//!   `retain` ones are deleted, and so are uncommitted epochs older than the
//!   newest committed one. Epochs newer than the newest commit are in flight
//!   and never touched. A checkpoint is deleted marker first, so a half
//!   deleted one is never mistaken for a committed one.
//! * **Fencing by generation.** Re-committing an identical manifest is a
//!   no-op. A different manifest for an already committed epoch replaces it
//!   only if it comes from a newer generation (or the committed one no
//!   longer decodes); otherwise [`StorageError::Conflict`] is returned.
//!
//! One coordinator per job is expected to call `commit`; `write_state` may be
//! called concurrently from any number of subtasks.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

const CHECKPOINT_DIR_PREFIX: &str = "chk-";
const STATE_DIR: &str = "state";
const MANIFEST_FILE: &str = "manifest.json";
const MARKER_FILE: &str = "_COMMITTED";
const MANIFEST_MAGIC: &str = "braid-manifest v1";
const QUARANTINE_DIR: &str = "corrupt";
const GENERATION_FILE: &str = "_GENERATION";
const IO_CONCURRENCY: usize = 8;

/// A checkpoint's number; increases by one per checkpoint within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where one subtask's state was written (returned by
/// [`CheckpointStorage::write_state`], listed in the [`Manifest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHandle {
    /// The subtask that wrote the state: vertex name and subtask index,
    /// e.g. `"count-2"`.
    pub operator: String,
    /// The object's path in the store, as returned by
    /// [`object_store::path::Path`]'s `Display` (already percent-encoded).
    pub path: String,
    /// Length of the state in bytes.
    pub len: u64,
    /// CRC32 (IEEE) of the state bytes.
    pub crc32: u32,
}

/// What a committed checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The job the checkpoint belongs to; must match the storage's job.
    pub job: String,
    /// The checkpoint's epoch.
    pub epoch: Epoch,
    /// The job's attempt number (bumped on every failover) that took the
    /// checkpoint.
    pub generation: u64,
    /// One handle per subtask state, each written for this epoch.
    pub states: Vec<StateHandle>,
    /// Opaque per-source offsets and other job-level data.
    pub metadata: BTreeMap<String, Vec<u8>>,
}

/// Why a checkpoint storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object store failed an operation.
    #[error("object store {op} of {path} failed: {source}")]
    Store {
        /// The operation attempted (`put`, `get`, `list`, ...).
        op: &'static str,
        /// The object path or prefix involved.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// An object exists (or should exist) but does not verify.
    #[error("corrupt checkpoint object {path}: {reason}")]
    Corrupt {
        /// The object path that failed verification.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A manifest or commit marker could not be serialized.
    #[error("cannot encode checkpoint data: {0}")]
    Encode(String),
    /// `commit` was given a manifest that cannot be committed as is.
    #[error("invalid manifest for epoch {epoch}: {reason}")]
    InvalidManifest {
        /// The manifest's epoch.
        epoch: Epoch,
        /// What was wrong with it.
        reason: String,
    },
    /// The epoch is already committed with a different manifest from the
    /// same or a newer generation.
    #[error("epoch {epoch} is already committed: {reason}")]
    Conflict {
        /// The epoch being committed.
        epoch: Epoch,
        /// Which generations collided.
        reason: String,
    },
    /// The local checkpoint directory could not be created.
    #[error("cannot create checkpoint directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The file system's error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`CheckpointStorage::recover`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The newest checkpoint that verifies, if any.
    pub manifest: Option<Manifest>,
    /// Newer committed checkpoints that failed verification, newest
    /// first: each was moved aside (see [`CheckpointStorage::quarantine`]).
    pub quarantined: Vec<Epoch>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CommitMarker {
    epoch: Epoch,
    generation: u64,
    manifest_crc32: u32,
    manifest_len: u64,
}

#[derive(Debug, Default)]
struct EpochObjects {
    committed: bool,
    objects: Vec<Path>,
}

enum ExistingCommit {
    None,
    Identical,
    Replaceable,
}

/// Checkpoint storage for one job; see the [module docs](self) for layout
/// and guarantees.
#[derive(Debug, Clone)]
pub struct CheckpointStorage {
    store: Arc<dyn ObjectStore>,
    job: String,
    root: Path,
    retain: usize,
}

impl CheckpointStorage {
    /// Storage for `job` on any object store, keeping the newest `retain`
    /// committed checkpoints (`retain` is clamped to at least 1).
    pub fn new(store: Arc<dyn ObjectStore>, job: &str, retain: usize) -> Self {
        Self {
            store,
            job: job.to_owned(),
            root: Path::from_iter([job]),
            retain: retain.max(1),
        }
    }

    /// Storage for `job` in the local directory `dir`, which is created if
    /// missing. Deleting a checkpoint also removes its emptied directories.
    pub fn local(dir: impl AsRef<FsPath>, job: &str, retain: usize) -> Result<Self, StorageError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|source| StorageError::Store {
                op: "open",
                path: dir.display().to_string(),
                source,
            })?
            .with_automatic_cleanup(true);
        Ok(Self::new(Arc::new(store), job, retain))
    }

    /// Storage for `job` in a fresh in-memory store (tests and local runs).
    pub fn in_memory(job: &str, retain: usize) -> Self {
        Self::new(Arc::new(InMemory::new()), job, retain)
    }

    /// The job this storage belongs to.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// How many committed checkpoints are kept (at least 1).
    pub fn retain(&self) -> usize {
        self.retain
    }

    /// The underlying object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The directory holding everything of `epoch`.
    pub fn checkpoint_dir(&self, epoch: Epoch) -> Path {
        self.root
            .child(format!("{CHECKPOINT_DIR_PREFIX}{:020}", epoch.0))
    }

    /// The manifest object of `epoch`.
    pub fn manifest_path(&self, epoch: Epoch) -> Path {
        self.checkpoint_dir(epoch).child(MANIFEST_FILE)
    }

    /// The commit marker object of `epoch`.
    pub fn marker_path(&self, epoch: Epoch) -> Path {
        self.checkpoint_dir(epoch).child(MARKER_FILE)
    }

    fn state_dir(&self, epoch: Epoch) -> Path {
        self.checkpoint_dir(epoch).child(STATE_DIR)
    }

    /// Writes one subtask's state for `epoch` to a path no other write
    /// uses, and returns the handle to list in the epoch's manifest.
    pub async fn write_state(
        &self,
        epoch: Epoch,
        generation: u64,
        operator: &str,
        bytes: Vec<u8>,
    ) -> Result<StateHandle, StorageError> {
        let len = bytes.len() as u64;
        let crc32 = crc32fast::hash(&bytes);
        let name = format!("{operator}-g{generation}-{:016x}", write_nonce());
        let path = self.state_dir(epoch).child(name);
        self.put(&path, Bytes::from(bytes)).await?;
        Ok(StateHandle {
            operator: operator.to_owned(),
            path: path.to_string(),
            len,
            crc32,
        })
    }

    /// Commits `manifest`: checks that it belongs to this job, that every
    /// state was written for its epoch and exists with the recorded length,
    /// writes the manifest and then, last, the commit marker. Only then is
    /// the checkpoint visible to [`latest`](Self::latest). Afterwards prunes
    /// old checkpoints (see [`prune`](Self::prune)); a pruning failure is
    /// logged, not returned, since the commit itself succeeded.
    ///
    /// Committing an identical manifest again succeeds without writing. A
    /// different manifest for an epoch that is already committed replaces
    /// it only when its generation is newer, or the committed one no longer
    /// decodes; otherwise [`StorageError::Conflict`].
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), StorageError> {
        self.validate(manifest)?;
        self.check_states_present(manifest).await?;
        match self.existing_commit(manifest).await? {
            ExistingCommit::Identical => {
                self.prune_logged().await;
                return Ok(());
            }
            ExistingCommit::Replaceable => {
                self.delete_if_present(&self.marker_path(manifest.epoch))
                    .await?;
            }
            ExistingCommit::None => {}
        }
        let (bytes, manifest_crc32) = encode_manifest(manifest)?;
        let marker = CommitMarker {
            epoch: manifest.epoch,
            generation: manifest.generation,
            manifest_crc32,
            manifest_len: bytes.len() as u64,
        };
        let marker =
            serde_json::to_vec(&marker).map_err(|e| StorageError::Encode(e.to_string()))?;
        self.put(&self.manifest_path(manifest.epoch), Bytes::from(bytes))
            .await?;
        self.put(&self.marker_path(manifest.epoch), Bytes::from(marker))
            .await?;
        self.prune_logged().await;
        Ok(())
    }

    /// Test hook: performs the first half of [`commit`](Self::commit) (the
    /// manifest write) and stops, as a coordinator crashing before the
    /// marker write would.
    #[doc(hidden)]
    pub async fn commit_without_marker(&self, manifest: &Manifest) -> Result<(), StorageError> {
        self.validate(manifest)?;
        let (bytes, _) = encode_manifest(manifest)?;
        self.put(&self.manifest_path(manifest.epoch), Bytes::from(bytes))
            .await
    }

    /// The newest committed checkpoint whose marker, manifest and every
    /// state blob verify (length and CRC32). A checkpoint that fails
    /// verification is skipped with a warning naming why, falling back to
    /// the previous one. `Ok(None)` when no checkpoint verifies. Errors of
    /// the store itself, other than a missing object, are returned.
    pub async fn latest(&self) -> Result<Option<Manifest>, StorageError> {
        Ok(self.newest_verified(false).await?.manifest)
    }

    /// Like [`latest`](Self::latest), but a committed checkpoint that fails
    /// verification is moved aside ([`quarantine`](Self::quarantine)) rather
    /// than skipped, so it is never found again, never reused, and its epoch
    /// can be committed anew. What a recovering coordinator calls.
    pub async fn recover(&self) -> Result<Recovery, StorageError> {
        self.newest_verified(true).await
    }

    /// The newest committed checkpoint that verifies, and the newer ones
    /// that do not: skipped with a warning, and moved aside if `move_aside`.
    async fn newest_verified(&self, move_aside: bool) -> Result<Recovery, StorageError> {
        let mut failed = Vec::new();
        for epoch in self.committed_epochs().await? {
            match self.load_verified(epoch).await {
                Ok(manifest) => {
                    return Ok(Recovery {
                        manifest: Some(manifest),
                        quarantined: failed,
                    })
                }
                Err(e @ StorageError::Store { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        job = %self.job,
                        epoch = epoch.0,
                        error = %e,
                        moved_aside = move_aside,
                        "skipping a committed checkpoint that fails verification"
                    );
                    if move_aside {
                        self.quarantine(epoch, &e.to_string()).await?;
                    }
                    failed.push(epoch);
                }
            }
        }
        Ok(Recovery {
            manifest: None,
            quarantined: failed,
        })
    }

    /// Moves every object of `epoch` under `<job>/corrupt/chk-<epoch>-<nonce>/`
    /// (its commit marker first, so a half-moved checkpoint is never
    /// committed), beside a `REASON` file saying why: kept for inspection,
    /// never restored, and the epoch is free to be committed again.
    pub async fn quarantine(&self, epoch: Epoch, reason: &str) -> Result<(), StorageError> {
        let dir = self.checkpoint_dir(epoch);
        let aside = self.root.child(QUARANTINE_DIR).child(format!(
            "{CHECKPOINT_DIR_PREFIX}{:020}-{:016x}",
            epoch.0,
            write_nonce()
        ));
        self.put(&aside.child("REASON"), Bytes::from(reason.to_owned()))
            .await?;
        let mut objects = self
            .scan()
            .await?
            .remove(&epoch)
            .unwrap_or_default()
            .objects;
        let marker = self.marker_path(epoch);
        objects.sort_by_key(|path| *path != marker);
        for path in objects {
            let Some(rest) = path.prefix_match(&dir) else {
                continue;
            };
            let target = rest.fold(aside.clone(), |to, part| to.child(part.as_ref()));
            match self.store.rename(&path, &target).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(store_error("rename", &path, source)),
            }
        }
        Ok(())
    }

    /// A generation number above every one this job's storage has seen
    /// (in state blobs' names, moved-aside checkpoints included, and in the
    /// last claim), and at least `above + 1`; recorded, so the next claim
    /// goes higher still. A coordinator that starts over (its process died)
    /// claims one, so no name it writes can collide with an earlier
    /// process's and no sink fence holds it off.
    pub async fn claim_generation(&self, above: u64) -> Result<u64, StorageError> {
        let claimed_path = self.root.child(GENERATION_FILE);
        let mut highest = above;
        match self.store.get(&claimed_path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| store_error("read", &claimed_path, e))?;
                if let Some(g) = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    highest = highest.max(g);
                }
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(store_error("get", &claimed_path, source)),
        }
        let mut listing = self.store.list(Some(&self.root));
        while let Some(item) = listing.next().await {
            let meta = match item {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(source) => return Err(store_error("list", &self.root, source)),
            };
            if let Some(g) = meta.location.filename().and_then(state_generation) {
                highest = highest.max(g);
            }
        }
        let next = highest.saturating_add(1);
        self.put(&claimed_path, Bytes::from(next.to_string()))
            .await?;
        Ok(next)
    }

    /// Reads one state blob, verifying its length and CRC32;
    /// [`StorageError::Corrupt`] on a mismatch or when it is missing.
    pub async fn read_state(&self, handle: &StateHandle) -> Result<Vec<u8>, StorageError> {
        let path = parse_path(&handle.path)?;
        let bytes = self.get_required(&path).await?;
        check_state(&path, handle, bytes.len() as u64, crc32fast::hash(&bytes))?;
        Ok(Vec::from(bytes))
    }

    /// Epochs that are committed (marker present), newest first. Says
    /// nothing about whether they verify.
    pub async fn committed_epochs(&self) -> Result<Vec<Epoch>, StorageError> {
        Ok(self
            .scan()
            .await?
            .into_iter()
            .rev()
            .filter(|(_, objects)| objects.committed)
            .map(|(epoch, _)| epoch)
            .collect())
    }

    /// Deletes committed checkpoints older than the newest
    /// [`retain`](Self::retain) committed ones, and uncommitted epochs older
    /// than the newest committed one. Epochs newer than the newest commit
    /// are left alone. [`commit`](Self::commit) calls this; call it to retry
    /// after a failure.
    pub async fn prune(&self) -> Result<(), StorageError> {
        let epochs = self.scan().await?;
        let committed: Vec<Epoch> = epochs
            .iter()
            .rev()
            .filter(|(_, objects)| objects.committed)
            .map(|(epoch, _)| *epoch)
            .collect();
        let Some(&newest) = committed.first() else {
            return Ok(());
        };
        let keep: HashSet<Epoch> = committed.iter().take(self.retain).copied().collect();
        for (epoch, objects) in epochs {
            if epoch < newest && !keep.contains(&epoch) {
                self.delete_checkpoint(epoch, objects.objects).await?;
            }
        }
        Ok(())
    }

    async fn prune_logged(&self) {
        if let Err(e) = self.prune().await {
            tracing::warn!(
                job = %self.job,
                error = %e,
                "checkpoint committed, but pruning old checkpoints failed"
            );
        }
    }

    fn validate(&self, manifest: &Manifest) -> Result<(), StorageError> {
        let invalid = |reason: String| StorageError::InvalidManifest {
            epoch: manifest.epoch,
            reason,
        };
        if manifest.job != self.job {
            return Err(invalid(format!(
                "manifest is for job {:?}, this storage for {:?}",
                manifest.job, self.job
            )));
        }
        let mut operators = HashSet::new();
        for handle in &manifest.states {
            if !operators.insert(handle.operator.as_str()) {
                return Err(invalid(format!(
                    "operator {:?} is listed twice",
                    handle.operator
                )));
            }
            if let Some(reason) = self.misplaced_state(manifest.epoch, handle) {
                return Err(invalid(reason));
            }
        }
        Ok(())
    }

    fn misplaced_state(&self, epoch: Epoch, handle: &StateHandle) -> Option<String> {
        let Ok(path) = Path::parse(&handle.path) else {
            return Some(format!(
                "state path {:?} is not a valid object path",
                handle.path
            ));
        };
        let dir = self.state_dir(epoch);
        let in_dir = path
            .prefix_match(&dir)
            .is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none());
        (!in_dir).then(|| {
            format!(
                "state {} of {:?} was not written for epoch {epoch} (expected it under {dir})",
                handle.path, handle.operator
            )
        })
    }

    async fn check_states_present(&self, manifest: &Manifest) -> Result<(), StorageError> {
        futures::stream::iter(manifest.states.iter().map(|handle| async move {
            let path = parse_path(&handle.path)?;
            let meta = self
                .store
                .head(&path)
                .await
                .map_err(|e| missing_or_store("head", &path, e))?;
            if meta.size != handle.len {
                return Err(corrupt(
                    &path,
                    format!(
                        "state blob is {} bytes, its handle says {}",
                        meta.size, handle.len
                    ),
                ));
            }
            Ok(())
        }))
        .buffer_unordered(IO_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }

    async fn existing_commit(&self, manifest: &Manifest) -> Result<ExistingCommit, StorageError> {
        let marker_path = self.marker_path(manifest.epoch);
        match self.store.head(&marker_path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(ExistingCommit::None),
            Err(source) => return Err(store_error("head", &marker_path, source)),
        }
        match self.load_committed_manifest(manifest.epoch).await {
            Ok(old) if old == *manifest => Ok(ExistingCommit::Identical),
            Ok(old) if old.generation < manifest.generation => Ok(ExistingCommit::Replaceable),
            Ok(old) => Err(StorageError::Conflict {
                epoch: manifest.epoch,
                reason: format!(
                    "committed by generation {}; refusing a different manifest from generation {}",
                    old.generation, manifest.generation
                ),
            }),
            Err(e @ StorageError::Store { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(
                    job = %self.job,
                    epoch = manifest.epoch.0,
                    error = %e,
                    "replacing a committed checkpoint that does not verify"
                );
                Ok(ExistingCommit::Replaceable)
            }
        }
    }

    async fn load_committed_manifest(&self, epoch: Epoch) -> Result<Manifest, StorageError> {
        let marker_path = self.marker_path(epoch);
        let marker_bytes = self.get_required(&marker_path).await?;
        let marker: CommitMarker = serde_json::from_slice(&marker_bytes)
            .map_err(|e| corrupt(&marker_path, format!("commit marker does not decode: {e}")))?;
        if marker.epoch != epoch {
            return Err(corrupt(
                &marker_path,
                format!("commit marker names epoch {}", marker.epoch),
            ));
        }
        let manifest_path = self.manifest_path(epoch);
        let manifest_bytes = self.get_required(&manifest_path).await?;
        let (manifest, crc32) = decode_manifest(&manifest_path, &manifest_bytes)?;
        if crc32 != marker.manifest_crc32 || manifest_bytes.len() as u64 != marker.manifest_len {
            return Err(corrupt(
                &marker_path,
                format!(
                    "commit marker is for a manifest with crc32 {:08x} and {} bytes, \
                     found crc32 {crc32:08x} and {} bytes",
                    marker.manifest_crc32,
                    marker.manifest_len,
                    manifest_bytes.len()
                ),
            ));
        }
        if manifest.epoch != epoch || manifest.generation != marker.generation {
            return Err(corrupt(
                &manifest_path,
                format!(
                    "manifest is for epoch {} generation {}, its marker for epoch {epoch} generation {}",
                    manifest.epoch, manifest.generation, marker.generation
                ),
            ));
        }
        if manifest.job != self.job {
            return Err(corrupt(
                &manifest_path,
                format!("manifest belongs to job {:?}", manifest.job),
            ));
        }
        Ok(manifest)
    }

    async fn load_verified(&self, epoch: Epoch) -> Result<Manifest, StorageError> {
        let manifest = self.load_committed_manifest(epoch).await?;
        if let Some(handle) = manifest
            .states
            .iter()
            .find(|handle| self.misplaced_state(epoch, handle).is_some())
        {
            return Err(corrupt(
                &self.manifest_path(epoch),
                format!("state {} lies outside the checkpoint", handle.path),
            ));
        }
        futures::stream::iter(
            manifest
                .states
                .iter()
                .map(|handle| self.verify_state(handle)),
        )
        .buffer_unordered(IO_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(manifest)
    }

    async fn verify_state(&self, handle: &StateHandle) -> Result<(), StorageError> {
        let path = parse_path(&handle.path)?;
        let mut chunks = self
            .store
            .get(&path)
            .await
            .map_err(|e| missing_or_store("get", &path, e))?
            .into_stream();
        let mut hasher = crc32fast::Hasher::new();
        let mut len = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| missing_or_store("read", &path, e))?;
            len = len.saturating_add(chunk.len() as u64);
            if len > handle.len {
                return Err(corrupt(
                    &path,
                    format!(
                        "state blob is longer than the {} bytes its handle says",
                        handle.len
                    ),
                ));
            }
            hasher.update(&chunk);
        }
        check_state(&path, handle, len, hasher.finalize())
    }

    async fn scan(&self) -> Result<BTreeMap<Epoch, EpochObjects>, StorageError> {
        let mut listing = self.store.list(Some(&self.root));
        let mut epochs: BTreeMap<Epoch, EpochObjects> = BTreeMap::new();
        while let Some(item) = listing.next().await {
            let meta = match item {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(source) => return Err(store_error("list", &self.root, source)),
            };
            let Some((epoch, is_marker)) = self.classify(&meta.location) else {
                continue;
            };
            let entry = epochs.entry(epoch).or_default();
            entry.committed |= is_marker;
            entry.objects.push(meta.location);
        }
        Ok(epochs)
    }

    fn classify(&self, location: &Path) -> Option<(Epoch, bool)> {
        let mut parts = location.prefix_match(&self.root)?;
        let epoch = parse_checkpoint_dir(parts.next()?.as_ref())?;
        let rest: Vec<_> = parts.collect();
        let is_marker = matches!(rest.as_slice(), [file] if file.as_ref() == MARKER_FILE);
        Some((epoch, is_marker))
    }

    async fn delete_checkpoint(
        &self,
        epoch: Epoch,
        objects: Vec<Path>,
    ) -> Result<(), StorageError> {
        let marker = self.marker_path(epoch);
        let manifest = self.manifest_path(epoch);
        self.delete_if_present(&marker).await?;
        self.delete_if_present(&manifest).await?;
        futures::stream::iter(
            objects
                .iter()
                .filter(|path| **path != marker && **path != manifest)
                .map(|path| self.delete_if_present(path)),
        )
        .buffer_unordered(IO_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
        tracing::debug!(job = %self.job, epoch = epoch.0, "deleted checkpoint");
        Ok(())
    }

    async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), StorageError> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map_err(|source| store_error("put", path, source))?;
        Ok(())
    }

    async fn get_required(&self, path: &Path) -> Result<Bytes, StorageError> {
        self.store
            .get(path)
            .await
            .map_err(|e| missing_or_store("get", path, e))?
            .bytes()
            .await
            .map_err(|e| missing_or_store("read", path, e))
    }

    async fn delete_if_present(&self, path: &Path) -> Result<(), StorageError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(store_error("delete", path, source)),
        }
    }
}

fn store_error(op: &'static str, path: &Path, source: object_store::Error) -> StorageError {
    StorageError::Store {
        op,
        path: path.to_string(),
        source,
    }
}

fn missing_or_store(op: &'static str, path: &Path, source: object_store::Error) -> StorageError {
    match source {
        object_store::Error::NotFound { .. } => corrupt(path, "object is missing".to_owned()),
        source => store_error(op, path, source),
    }
}

fn corrupt(path: &Path, reason: String) -> StorageError {
    StorageError::Corrupt {
        path: path.to_string(),
        reason,
    }
}

fn parse_path(raw: &str) -> Result<Path, StorageError> {
    Path::parse(raw).map_err(|e| StorageError::Corrupt {
        path: raw.to_owned(),
        reason: format!("not a valid object path: {e}"),
    })
}

/// The generation in a state blob's name, `<operator>-g<generation>-<16 hex>`.
fn state_generation(name: &str) -> Option<u64> {
    let (rest, nonce) = name.rsplit_once('-')?;
    if nonce.len() != 16 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (_, generation) = rest.rsplit_once("-g")?;
    generation.parse().ok()
}

fn parse_checkpoint_dir(name: &str) -> Option<Epoch> {
    let digits = name.strip_prefix(CHECKPOINT_DIR_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Epoch)
}

fn check_state(
    path: &Path,
    handle: &StateHandle,
    len: u64,
    crc32: u32,
) -> Result<(), StorageError> {
    if len != handle.len {
        return Err(corrupt(
            path,
            format!("state blob is {len} bytes, its handle says {}", handle.len),
        ));
    }
    if crc32 != handle.crc32 {
        return Err(corrupt(
            path,
            format!(
                "state blob crc32 is {crc32:08x}, its handle says {:08x}",
                handle.crc32
            ),
        ));
    }
    Ok(())
}

fn encode_manifest(manifest: &Manifest) -> Result<(Vec<u8>, u32), StorageError> {
    let body = serde_json::to_vec(manifest).map_err(|e| StorageError::Encode(e.to_string()))?;
    let crc32 = crc32fast::hash(&body);
    let mut out = format!("{MANIFEST_MAGIC} crc32={crc32:08x} len={}\n", body.len()).into_bytes();
    out.extend_from_slice(&body);
    Ok((out, crc32))
}

fn decode_manifest(path: &Path, bytes: &[u8]) -> Result<(Manifest, u32), StorageError> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt(path, "manifest has no header line".to_owned()))?;
    let (header, body) = bytes.split_at(newline);
    let body = body.get(1..).unwrap_or_default();
    let fields = std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.strip_prefix(MANIFEST_MAGIC))
        .and_then(|h| h.strip_prefix(' '))
        .ok_or_else(|| {
            corrupt(
                path,
                "manifest header is not a braid manifest v1 header".to_owned(),
            )
        })?;
    let mut crc32 = None;
    let mut len = None;
    for field in fields.split(' ') {
        match field.split_once('=') {
            // Only the canonical spelling the encoder writes (lowercase
            // hex, plain digits) is accepted, so no flipped byte decodes
            // as the same header.
            Some(("crc32", value))
                if value.len() == 8
                    && value
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                crc32 = u32::from_str_radix(value, 16).ok();
            }
            Some(("len", value))
                if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) =>
            {
                len = value.parse::<usize>().ok();
            }
            _ => {
                return Err(corrupt(
                    path,
                    format!("unexpected manifest header field {field:?}"),
                ))
            }
        }
    }
    let (Some(crc32), Some(len)) = (crc32, len) else {
        return Err(corrupt(
            path,
            "manifest header lacks a valid crc32 or len".to_owned(),
        ));
    };
    if body.len() != len {
        return Err(corrupt(
            path,
            format!(
                "manifest body is {} bytes, its header says {len}",
                body.len()
            ),
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc32 {
        return Err(corrupt(
            path,
            format!("manifest crc32 is {actual:08x}, its header says {crc32:08x}"),
        ));
    }
    let manifest = serde_json::from_slice(body)
        .map_err(|e| corrupt(path, format!("manifest does not decode: {e}")))?;
    Ok((manifest, crc32))
}

/// Decodes a `manifest.json` object as [`CheckpointStorage::commit`]
/// writes it: the header line, the body's length and CRC32 checked, then
/// the JSON. Returns the manifest and the CRC32. Recovery reads manifests
/// through [`CheckpointStorage::latest`]; this is public for the fuzz
/// targets. Any bytes give a manifest or [`StorageError::Corrupt`].
#[doc(hidden)]
pub fn decode_manifest_object(bytes: &[u8]) -> Result<(Manifest, u32), StorageError> {
    decode_manifest(&Path::from(MANIFEST_FILE), bytes)
}

/// Encodes `manifest` as [`CheckpointStorage::commit`] writes its
/// `manifest.json`; the inverse of [`decode_manifest_object`].
#[doc(hidden)]
pub fn encode_manifest_object(manifest: &Manifest) -> Result<Vec<u8>, StorageError> {
    encode_manifest(manifest).map(|(bytes, _)| bytes)
}

/// A per-write name suffix that in practice never repeats, within this
/// process or across processes: a randomly keyed SipHash of a call counter,
/// the process id and the clock.
fn write_nonce() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}
