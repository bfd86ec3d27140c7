//! Job binaries shipped between nodes, as Ray's `runtime_env` ships a
//! working directory. A node asked to run workers for a job whose binary
//! it lacks (no file at the driver's path, or one of another build) fetches
//! it from the driver's node over gRPC (`Node.FetchBinary`), content
//! addressed by the job's build hash: streamed in CRC-checked chunks to a
//! hidden file, its build hash checked over the whole, then renamed into
//! `<node dir>/binaries/<hash>/<name>`. Concurrent needs of one binary
//! share one fetch; the copy is removed with the last job that uses it. A
//! copy whose hash differs from the job's is never kept, so never run.
//!
//! The serving side streams a binary one of its jobs runs, found by hash
//! and checked against the file on disk first.

use crate::error::{Error, Result};
use crate::ids::JobId;
use crate::rpc::proto::ObjectChunk;
use crate::rpc::NodeClient;
use futures::Stream;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

/// Bytes per chunk on the wire.
const CHUNK_SIZE: usize = 1 << 20;

/// How long a fetch waits for the next chunk before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The binaries this node fetched, by build hash.
pub(crate) struct BinaryCache {
    dir: PathBuf,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

/// One fetched (or being fetched) binary and the jobs using it.
#[derive(Default)]
struct Entry {
    path: tokio::sync::OnceCell<PathBuf>,
    jobs: Mutex<HashSet<JobId>>,
}

/// Whether `hash` has the form of a build hash: it names a directory.
fn well_formed(hash: &str) -> bool {
    !hash.is_empty() && hash.len() <= 40 && hash.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl BinaryCache {
    /// A cache keeping its copies under `dir`.
    pub(crate) fn new(dir: PathBuf) -> BinaryCache {
        BinaryCache {
            dir,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A verified copy of the binary with build hash `hash` (whose file is
    /// called `name`), for `job`, fetched from `source` unless this node
    /// has it already.
    pub(crate) async fn obtain(
        &self,
        job: JobId,
        hash: &str,
        name: &str,
        source: &NodeClient,
    ) -> Result<PathBuf> {
        if !well_formed(hash) || name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::BadRequest(format!(
                "cannot ship binary {name:?} of build {hash:?}"
            )));
        }
        let entry = self
            .entries
            .lock()
            .entry(hash.to_owned())
            .or_default()
            .clone();
        entry.jobs.lock().insert(job);
        let fetched = entry
            .path
            .get_or_try_init(|| self.fetch(hash, name, source))
            .await
            .cloned();
        if fetched.is_err() {
            self.release(job);
        }
        fetched
    }

    /// `job` ended: a copy no other job uses is removed.
    pub(crate) fn release(&self, job: JobId) {
        let mut unused = Vec::new();
        self.entries.lock().retain(|hash, entry| {
            let mut jobs = entry.jobs.lock();
            if !jobs.remove(&job) || !jobs.is_empty() {
                return true;
            }
            unused.push(hash.clone());
            false
        });
        for hash in unused {
            let dir = self.dir.join(&hash);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::debug!("removed shipped binary {}", dir.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("removing shipped binary {}: {e}", dir.display()),
            }
        }
    }

    async fn fetch(&self, hash: &str, name: &str, source: &NodeClient) -> Result<PathBuf> {
        let dir = self.dir.join(hash);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let partial = dir.join(format!(".{name}.partial"));
        let path = dir.join(name);
        let started = std::time::Instant::now();
        let result = receive(hash, &partial, source).await;
        match result {
            Ok(bytes) => {
                tokio::fs::rename(&partial, &path)
                    .await
                    .map_err(|e| Error::io(format!("rename into {}", path.display()), e))?;
                tracing::info!(
                    "shipped binary {name} ({bytes} bytes, build {hash}) from {} in {:?}",
                    source.address(),
                    started.elapsed()
                );
                Ok(path)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(e)
            }
        }
    }
}

/// Streams the binary into `partial` (executable, this user's only),
/// checking each chunk and the build hash of the whole; its size.
async fn receive(hash: &str, partial: &Path, source: &NodeClient) -> Result<u64> {
    let peer = source.address().to_owned();
    let failed = |message: String| Error::Unreachable {
        address: peer.clone(),
        message,
    };
    let mut stream = source.fetch_binary_raw(hash).await.map_err(|status| {
        if status.code() == tonic::Code::NotFound {
            Error::BadRequest(format!(
                "node {peer} has no binary of build {hash} to ship: {}",
                status.message()
            ))
        } else {
            failed(format!("fetching binary {hash}: {}", status.message()))
        }
    })?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(partial)
        .await
        .map_err(|e| Error::io(format!("create {}", partial.display()), e))?;
    let mut crc = crc32fast::Hasher::new();
    let mut received = 0u64;
    let mut total = None;
    loop {
        let next = tokio::time::timeout(IDLE_TIMEOUT, stream.message())
            .await
            .map_err(|_| failed(format!("no chunk of binary {hash} for {IDLE_TIMEOUT:?}")))?
            .map_err(|status| failed(format!("fetching binary {hash}: {}", status.message())))?;
        let Some(chunk) = next else { break };
        let expected = *total.get_or_insert(chunk.total_size);
        crate::rpc::transfer::chunk_range(&chunk, received, expected).map_err(|reason| {
            failed(format!(
                "corrupt chunk of binary {hash} at offset {}: {reason}",
                chunk.offset
            ))
        })?;
        file.write_all(&chunk.data)
            .await
            .map_err(|e| Error::io(format!("write {}", partial.display()), e))?;
        crc.update(&chunk.data);
        received += chunk.data.len() as u64;
    }
    if Some(received) != total {
        return Err(failed(format!(
            "binary {hash} ended after {received} of {total:?} bytes"
        )));
    }
    let found = format!("{:08x}-{:x}", crc.finalize(), received);
    if found != hash {
        return Err(Error::BuildMismatch {
            expected: hash.to_owned(),
            found,
        });
    }
    file.sync_all()
        .await
        .map_err(|e| Error::io(format!("sync {}", partial.display()), e))?;
    Ok(received)
}

/// Serves `Node.FetchBinary`: the file at `path` in CRC-checked chunks,
/// read as they are sent. The first chunk carries the size even for an
/// empty file.
pub(crate) async fn stream_file(
    path: PathBuf,
) -> std::result::Result<impl Stream<Item = std::result::Result<ObjectChunk, Status>>, Status> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Status::not_found(format!("open {}: {e}", path.display())))?;
    let total = file
        .metadata()
        .await
        .map_err(|e| Status::internal(format!("stat {}: {e}", path.display())))?
        .len();
    let state = Some((file, 0u64, true));
    let path = Arc::new(path);
    Ok(futures::stream::unfold(state, move |state| {
        let path = path.clone();
        async move {
            let (mut file, offset, first) = state?;
            if offset >= total && !first {
                return None;
            }
            let want = usize::try_from(total - offset)
                .unwrap_or(CHUNK_SIZE)
                .min(CHUNK_SIZE);
            let mut data = vec![0u8; want];
            if let Err(e) = file.read_exact(&mut data).await {
                return Some((
                    Err(Status::internal(format!("read {}: {e}", path.display()))),
                    None,
                ));
            }
            let chunk = ObjectChunk {
                total_size: total,
                offset,
                crc32: crc32fast::hash(&data),
                data: data.into(),
            };
            Some((Ok(chunk), Some((file, offset + want as u64, false))))
        }
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_build_hashes_name_directories() {
        assert!(well_formed("1a2b3c4d-5f00"));
        assert!(!well_formed(""));
        assert!(!well_formed("../etc"));
        assert!(!well_formed("abc/def"));
        assert!(!well_formed(&"a".repeat(41)));
    }

    #[test]
    fn release_removes_a_copy_with_its_last_job() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BinaryCache::new(dir.path().to_path_buf());
        let (a, b) = (JobId::random(), JobId::random());
        let entry = cache
            .entries
            .lock()
            .entry("abcd-10".into())
            .or_default()
            .clone();
        entry.jobs.lock().extend([a, b]);
        std::fs::create_dir_all(dir.path().join("abcd-10")).unwrap();
        std::fs::write(dir.path().join("abcd-10/prog"), b"x").unwrap();
        cache.release(a);
        assert!(dir.path().join("abcd-10/prog").exists(), "b still uses it");
        cache.release(b);
        assert!(!dir.path().join("abcd-10").exists());
        assert!(cache.entries.lock().is_empty());
    }
}
