//! Checkpoint storage conformance: every behaviour runs against a local
//! directory (`LocalFileSystem`) and against `InMemory`: round trips, epochs
//! without a commit marker, corrupt or missing state blobs, corrupt
//! manifests, markers beside a different manifest, retention and pruning,
//! re-commits and generation fencing, commit validation, and job isolation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use braid_actors::checkpoint::storage::{
    CheckpointStorage, Epoch, Manifest, StateHandle, StorageError,
};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use tempfile::TempDir;

const JOB: &str = "wordcount";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    Memory,
}

struct Fixture {
    storage: CheckpointStorage,
    dir: Option<TempDir>,
}

impl Fixture {
    fn new(backend: Backend, retain: usize) -> Self {
        match backend {
            Backend::Local => {
                let dir = tempfile::tempdir().unwrap();
                let storage =
                    CheckpointStorage::local(dir.path().join("checkpoints"), JOB, retain).unwrap();
                Self {
                    storage,
                    dir: Some(dir),
                }
            }
            Backend::Memory => Self {
                storage: CheckpointStorage::in_memory(JOB, retain),
                dir: None,
            },
        }
    }

    fn store(&self) -> &dyn ObjectStore {
        self.storage.store().as_ref()
    }

    fn disk_path(&self, object: &str) -> Option<std::path::PathBuf> {
        self.dir
            .as_ref()
            .map(|dir| dir.path().join("checkpoints").join(object))
    }

    /// Whether the object exists; for a local store also checks that the
    /// file on disk agrees.
    async fn exists(&self, object: &str) -> bool {
        let in_store = match self.store().head(&Path::parse(object).unwrap()).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => panic!("head {object}: {e}"),
        };
        if let Some(file) = self.disk_path(object) {
            assert_eq!(
                file.exists(),
                in_store,
                "store and disk disagree on {object}"
            );
        }
        in_store
    }

    /// Flips the first byte of an object: in the file on disk for a local
    /// store, by overwriting the object in memory otherwise.
    async fn flip_first_byte(&self, object: &str) {
        if let Some(file) = self.disk_path(object) {
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[0] ^= 0xff;
            std::fs::write(&file, bytes).unwrap();
        } else {
            let path = Path::parse(object).unwrap();
            let mut bytes = self
                .store()
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            bytes[0] ^= 0xff;
            self.store().put(&path, bytes.into()).await.unwrap();
        }
    }

    async fn overwrite(&self, path: &Path, bytes: &[u8]) {
        self.store().put(path, bytes.to_vec().into()).await.unwrap();
    }

    async fn delete(&self, object: &str) {
        self.store()
            .delete(&Path::parse(object).unwrap())
            .await
            .unwrap();
    }

    /// Every object path under the job, sorted.
    async fn objects(&self) -> Vec<String> {
        let root = Path::from(JOB);
        let mut paths: Vec<String> = self
            .store()
            .list(Some(&root))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap();
        paths.sort();
        paths
    }
}

fn state_bytes(epoch: u64, operator: &str) -> Vec<u8> {
    format!("state of {operator} at epoch {epoch}")
        .into_bytes()
        .repeat(8)
}

/// Writes one state per subtask for `epoch` and returns the (uncommitted)
/// manifest naming them.
async fn write_checkpoint(storage: &CheckpointStorage, epoch: u64, generation: u64) -> Manifest {
    let mut states = Vec::new();
    for operator in ["source-0", "count-0", "count-1"] {
        let handle = storage
            .write_state(
                Epoch(epoch),
                generation,
                operator,
                state_bytes(epoch, operator),
            )
            .await
            .unwrap();
        states.push(handle);
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("source-0/offset".to_owned(), epoch.to_le_bytes().to_vec());
    Manifest {
        job: JOB.to_owned(),
        epoch: Epoch(epoch),
        generation,
        states,
        metadata,
    }
}

async fn commit_checkpoint(storage: &CheckpointStorage, epoch: u64) -> Manifest {
    let manifest = write_checkpoint(storage, epoch, 1).await;
    storage.commit(&manifest).await.unwrap();
    manifest
}

fn assert_corrupt<T: std::fmt::Debug>(result: Result<T, StorageError>, object: &str) {
    match result {
        Err(StorageError::Corrupt { path, .. }) => assert_eq!(path, object),
        other => panic!("expected Corrupt for {object}, got {other:?}"),
    }
}

async fn no_checkpoint_is_none(backend: Backend) {
    let f = Fixture::new(backend, 3);
    assert_eq!(f.storage.latest().await.unwrap(), None);
    assert!(f.storage.committed_epochs().await.unwrap().is_empty());

    f.storage
        .write_state(Epoch(1), 1, "count-0", b"in flight".to_vec())
        .await
        .unwrap();
    assert_eq!(
        f.storage.latest().await.unwrap(),
        None,
        "states without a commit are not a checkpoint"
    );
}

async fn round_trip(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let mut manifest = write_checkpoint(&f.storage, 1, 7).await;
    let odd = f
        .storage
        .write_state(Epoch(1), 7, "sink/0 ü", b"odd operator name".to_vec())
        .await
        .unwrap();
    let empty = f
        .storage
        .write_state(Epoch(1), 7, "empty-0", Vec::new())
        .await
        .unwrap();
    manifest.states.push(odd.clone());
    manifest.states.push(empty.clone());
    f.storage.commit(&manifest).await.unwrap();

    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(1)]);
    let latest = f.storage.latest().await.unwrap().unwrap();
    assert_eq!(latest, manifest);
    for handle in &latest.states[..3] {
        assert_eq!(
            f.storage.read_state(handle).await.unwrap(),
            state_bytes(1, &handle.operator)
        );
    }
    assert_eq!(
        f.storage.read_state(&odd).await.unwrap(),
        b"odd operator name"
    );
    assert!(f.storage.read_state(&empty).await.unwrap().is_empty());
    assert_eq!(latest.states[3].operator, "sink/0 ü");
    assert_eq!(latest.metadata["source-0/offset"], 1u64.to_le_bytes());

    let handle = &latest.states[0];
    assert!(handle
        .path
        .starts_with(&format!("{JOB}/chk-{:020}/state/source-0-g7-", 1)));
    assert!(f.exists(f.storage.manifest_path(Epoch(1)).as_ref()).await);
    assert!(f.exists(f.storage.marker_path(Epoch(1)).as_ref()).await);
}

async fn epoch_without_marker_is_ignored(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let first = commit_checkpoint(&f.storage, 1).await;
    let second = write_checkpoint(&f.storage, 2, 1).await;
    f.storage.commit_without_marker(&second).await.unwrap();

    assert!(f.exists(f.storage.manifest_path(Epoch(2)).as_ref()).await);
    assert!(!f.exists(f.storage.marker_path(Epoch(2)).as_ref()).await);
    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(1)]);
    assert_eq!(f.storage.latest().await.unwrap(), Some(first));

    f.storage.commit(&second).await.unwrap();
    assert_eq!(f.storage.latest().await.unwrap(), Some(second));
}

async fn corrupt_state_blob_falls_back(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let first = commit_checkpoint(&f.storage, 1).await;
    let second = commit_checkpoint(&f.storage, 2).await;
    let bad = second.states[1].clone();
    f.flip_first_byte(&bad.path).await;

    assert_eq!(
        f.storage.committed_epochs().await.unwrap(),
        vec![Epoch(2), Epoch(1)],
        "the corrupt epoch is still committed"
    );
    assert_eq!(f.storage.latest().await.unwrap(), Some(first.clone()));
    assert_corrupt(f.storage.read_state(&bad).await, &bad.path);
    assert_eq!(
        f.storage.read_state(&second.states[0]).await.unwrap(),
        state_bytes(2, "source-0")
    );
    assert_eq!(
        f.storage.read_state(&first.states[1]).await.unwrap(),
        state_bytes(1, "count-0")
    );
}

async fn truncated_or_missing_blob_falls_back(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let first = commit_checkpoint(&f.storage, 1).await;
    let second = commit_checkpoint(&f.storage, 2).await;
    let third = commit_checkpoint(&f.storage, 3).await;

    let truncated = &third.states[0];
    f.overwrite(&Path::parse(&truncated.path).unwrap(), b"short")
        .await;
    assert_corrupt(f.storage.read_state(truncated).await, &truncated.path);
    assert_eq!(f.storage.latest().await.unwrap(), Some(second.clone()));

    let missing = &second.states[2];
    f.delete(&missing.path).await;
    assert_corrupt(f.storage.read_state(missing).await, &missing.path);
    assert_eq!(f.storage.latest().await.unwrap(), Some(first));
}

async fn corrupt_manifest_is_skipped(backend: Backend) {
    let f = Fixture::new(backend, 10);
    let first = commit_checkpoint(&f.storage, 1).await;
    commit_checkpoint(&f.storage, 2).await;
    f.overwrite(
        &f.storage.manifest_path(Epoch(2)),
        b"\x00\xffgarbage that is no manifest",
    )
    .await;
    assert_eq!(f.storage.latest().await.unwrap(), Some(first.clone()));

    commit_checkpoint(&f.storage, 3).await;
    let manifest = f.storage.manifest_path(Epoch(3)).to_string();
    f.flip_first_byte(&manifest).await;
    assert_eq!(
        f.storage.latest().await.unwrap(),
        Some(first.clone()),
        "a manifest with a damaged header is skipped too"
    );

    let fourth = commit_checkpoint(&f.storage, 4).await;
    let path = f.storage.manifest_path(Epoch(4));
    let mut bytes = f
        .store()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    f.overwrite(&path, &bytes).await;
    assert_eq!(
        f.storage.latest().await.unwrap(),
        Some(first),
        "a manifest whose body fails its checksum is skipped"
    );
    assert!(f.storage.read_state(&fourth.states[0]).await.is_ok());
}

async fn marker_beside_other_manifest_is_skipped(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let first = commit_checkpoint(&f.storage, 1).await;
    let mut second = commit_checkpoint(&f.storage, 2).await;
    second
        .metadata
        .insert("source-0/offset".to_owned(), vec![9; 8]);
    f.storage.commit_without_marker(&second).await.unwrap();

    assert_eq!(
        f.storage.committed_epochs().await.unwrap(),
        vec![Epoch(2), Epoch(1)]
    );
    assert_eq!(f.storage.latest().await.unwrap(), Some(first));

    f.overwrite(&f.storage.marker_path(Epoch(2)), b"not a marker")
        .await;
    assert_eq!(
        f.storage.latest().await.unwrap().map(|m| m.epoch),
        Some(Epoch(1))
    );
}

async fn retention_keeps_newest(backend: Backend) {
    let f = Fixture::new(backend, 2);
    let mut manifests = Vec::new();
    for epoch in 1..=5 {
        manifests.push(commit_checkpoint(&f.storage, epoch).await);
    }

    assert_eq!(
        f.storage.committed_epochs().await.unwrap(),
        vec![Epoch(5), Epoch(4)]
    );
    assert_eq!(f.storage.latest().await.unwrap().as_ref(), manifests.last());
    for manifest in &manifests[3..] {
        for handle in &manifest.states {
            assert!(f.exists(&handle.path).await, "{} was deleted", handle.path);
            assert!(f.storage.read_state(handle).await.is_ok());
        }
    }
    for manifest in &manifests[..3] {
        for handle in &manifest.states {
            assert!(!f.exists(&handle.path).await, "{} was kept", handle.path);
        }
        assert!(
            !f.exists(f.storage.marker_path(manifest.epoch).as_ref())
                .await
        );
        assert!(
            !f.exists(f.storage.manifest_path(manifest.epoch).as_ref())
                .await
        );
    }
    for epoch in 1..=3 {
        let dir = f.storage.checkpoint_dir(Epoch(epoch));
        if let Some(dir) = f.disk_path(dir.as_ref()) {
            assert!(!dir.exists(), "{} was left on disk", dir.display());
        }
    }
    let kept = |epoch: u64| format!("{JOB}/chk-{epoch:020}/");
    for object in f.objects().await {
        assert!(
            object.starts_with(&kept(4)) || object.starts_with(&kept(5)),
            "{object} survived retention"
        );
    }
}

async fn pruning_spares_in_flight_epochs(backend: Backend) {
    let f = Fixture::new(backend, 1);
    assert_eq!(f.storage.retain(), 1);
    let first = commit_checkpoint(&f.storage, 1).await;
    let abandoned = f
        .storage
        .write_state(Epoch(2), 1, "count-0", b"abandoned".to_vec())
        .await
        .unwrap();
    let in_flight = f
        .storage
        .write_state(Epoch(4), 1, "count-0", b"in flight".to_vec())
        .await
        .unwrap();
    let third = commit_checkpoint(&f.storage, 3).await;

    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(3)]);
    assert!(!f.exists(&first.states[0].path).await);
    assert!(
        !f.exists(&abandoned.path).await,
        "abandoned epoch 2 was kept"
    );
    assert!(
        f.exists(&in_flight.path).await,
        "in-flight epoch 4 was deleted"
    );
    assert_eq!(
        f.storage.read_state(&in_flight).await.unwrap(),
        b"in flight"
    );
    assert_eq!(f.storage.latest().await.unwrap(), Some(third));
}

async fn retain_zero_is_clamped(backend: Backend) {
    let f = Fixture::new(backend, 0);
    assert_eq!(f.storage.retain(), 1);
    commit_checkpoint(&f.storage, 1).await;
    let second = commit_checkpoint(&f.storage, 2).await;
    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(2)]);
    assert_eq!(f.storage.latest().await.unwrap(), Some(second));
}

async fn rewrites_never_clobber(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let original = f
        .storage
        .write_state(Epoch(1), 1, "count-0", b"original".to_vec())
        .await
        .unwrap();
    let manifest = Manifest {
        job: JOB.to_owned(),
        epoch: Epoch(1),
        generation: 1,
        states: vec![original.clone()],
        metadata: BTreeMap::new(),
    };
    f.storage.commit(&manifest).await.unwrap();

    let retry = f
        .storage
        .write_state(Epoch(1), 1, "count-0", b"retried".to_vec())
        .await
        .unwrap();
    let zombie = f
        .storage
        .write_state(Epoch(1), 0, "count-0", b"zombie".to_vec())
        .await
        .unwrap();
    assert_ne!(retry.path, original.path);
    assert_ne!(zombie.path, original.path);
    assert_eq!(f.storage.read_state(&original).await.unwrap(), b"original");
    assert_eq!(f.storage.latest().await.unwrap(), Some(manifest));
}

async fn recommit_and_generation_fencing(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let manifest = commit_checkpoint(&f.storage, 1).await;
    f.storage.commit(&manifest).await.unwrap();
    assert_eq!(f.storage.latest().await.unwrap(), Some(manifest.clone()));

    let same_generation = write_checkpoint(&f.storage, 1, 1).await;
    match f.storage.commit(&same_generation).await {
        Err(StorageError::Conflict { epoch, .. }) => assert_eq!(epoch, Epoch(1)),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let older = write_checkpoint(&f.storage, 1, 0).await;
    assert!(matches!(
        f.storage.commit(&older).await,
        Err(StorageError::Conflict { .. })
    ));
    assert_eq!(f.storage.latest().await.unwrap(), Some(manifest));

    let newer = write_checkpoint(&f.storage, 1, 2).await;
    f.storage.commit(&newer).await.unwrap();
    assert_eq!(f.storage.latest().await.unwrap(), Some(newer));
    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(1)]);
}

async fn recommit_replaces_corrupt_manifest(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let manifest = commit_checkpoint(&f.storage, 1).await;
    f.overwrite(&f.storage.manifest_path(Epoch(1)), b"garbage")
        .await;
    assert_eq!(f.storage.latest().await.unwrap(), None);
    f.storage.commit(&manifest).await.unwrap();
    assert_eq!(f.storage.latest().await.unwrap(), Some(manifest));
}

async fn commit_rejects_bad_manifests(backend: Backend) {
    let f = Fixture::new(backend, 3);
    let first = commit_checkpoint(&f.storage, 1).await;

    let mut borrowed = write_checkpoint(&f.storage, 2, 1).await;
    borrowed.states[0] = StateHandle {
        operator: "count-9".to_owned(),
        ..first.states[0].clone()
    };
    assert!(matches!(
        f.storage.commit(&borrowed).await,
        Err(StorageError::InvalidManifest {
            epoch: Epoch(2),
            ..
        })
    ));

    let mut foreign = write_checkpoint(&f.storage, 2, 1).await;
    foreign.job = "other-job".to_owned();
    assert!(matches!(
        f.storage.commit(&foreign).await,
        Err(StorageError::InvalidManifest { .. })
    ));

    let mut duplicated = write_checkpoint(&f.storage, 2, 1).await;
    let again = duplicated.states[0].clone();
    duplicated.states.push(again);
    assert!(matches!(
        f.storage.commit(&duplicated).await,
        Err(StorageError::InvalidManifest { .. })
    ));

    let missing = write_checkpoint(&f.storage, 2, 1).await;
    f.delete(&missing.states[2].path).await;
    assert_corrupt(f.storage.commit(&missing).await, &missing.states[2].path);

    let mut wrong_len = write_checkpoint(&f.storage, 2, 1).await;
    wrong_len.states[0].len += 1;
    assert_corrupt(
        f.storage.commit(&wrong_len).await,
        &wrong_len.states[0].path,
    );

    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(1)]);
    assert!(!f.exists(f.storage.marker_path(Epoch(2)).as_ref()).await);
    assert_eq!(f.storage.latest().await.unwrap(), Some(first));
}

async fn jobs_are_isolated(backend: Backend) {
    let f = Fixture::new(backend, 1);
    let other = CheckpointStorage::new(f.storage.store().clone(), &format!("{JOB}-2"), 1);
    let mine = commit_checkpoint(&f.storage, 1).await;

    let mut theirs = write_checkpoint(&other, 5, 1).await;
    theirs.job = other.job().to_owned();
    other.commit(&theirs).await.unwrap();
    let mut later = write_checkpoint(&other, 6, 1).await;
    later.job = other.job().to_owned();
    other.commit(&later).await.unwrap();

    assert_eq!(f.storage.committed_epochs().await.unwrap(), vec![Epoch(1)]);
    assert_eq!(f.storage.latest().await.unwrap(), Some(mine));
    assert_eq!(other.committed_epochs().await.unwrap(), vec![Epoch(6)]);
    assert_eq!(other.latest().await.unwrap(), Some(later));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod local_fs {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Local).await;
                }
            )*
        }
        mod in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Memory).await;
                }
            )*
        }
    };
}

conformance!(
    no_checkpoint_is_none,
    round_trip,
    epoch_without_marker_is_ignored,
    corrupt_state_blob_falls_back,
    truncated_or_missing_blob_falls_back,
    corrupt_manifest_is_skipped,
    marker_beside_other_manifest_is_skipped,
    retention_keeps_newest,
    pruning_spares_in_flight_epochs,
    retain_zero_is_clamped,
    rewrites_never_clobber,
    recommit_and_generation_fencing,
    recommit_replaces_corrupt_manifest,
    commit_rejects_bad_manifests,
    jobs_are_isolated,
);

#[tokio::test]
async fn local_creates_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a").join("b");
    let storage = CheckpointStorage::local(&nested, JOB, 2).unwrap();
    assert!(nested.is_dir());
    commit_checkpoint(&storage, 1).await;
    assert!(nested
        .join(JOB)
        .join(format!("chk-{:020}", 1))
        .join("_COMMITTED")
        .is_file());

    let reopened = CheckpointStorage::local(&nested, JOB, 2).unwrap();
    assert_eq!(
        reopened.latest().await.unwrap().map(|m| m.epoch),
        Some(Epoch(1))
    );
}
