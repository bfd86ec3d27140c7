//! Starting worker processes from a job's binary, and checking that the
//! binary is the build the job registered.

use crate::error::{Error, Result};
use crate::ids::{JobId, WorkerId};
use crate::wire::messages::JobSpec;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The environment variable naming a process's braid role.
pub const ROLE_VAR: &str = "BRAID_ROLE";
/// The environment variable carrying a worker's configuration (JSON).
pub const WORKER_VAR: &str = "BRAID_WORKER";

/// What a worker needs to join its node, passed in [`WORKER_VAR`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// The node's control socket.
    pub node_socket: PathBuf,
    /// The cluster token.
    pub token: String,
    /// The job the worker serves.
    pub job: JobId,
    /// The worker's id.
    pub worker: WorkerId,
    /// The session directory.
    pub session_dir: PathBuf,
    /// The executable's identity when the node checked its build.
    pub exe_stamp: String,
    /// The build hash the node checked.
    pub build_hash: String,
    /// The node's address for other hosts, where the worker serves direct
    /// calls over TCP.
    pub direct_ip: std::net::IpAddr,
}

/// Identity of a file on disk: device, inode, size and modification time.
/// A rebuilt binary gets a new one.
pub fn file_stamp(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(format!(
        "{:x}:{:x}:{:x}:{:x}.{:x}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// Build hashes of executables, computed once per file identity.
#[derive(Default)]
pub(crate) struct BuildHashes {
    cache: Mutex<HashMap<String, String>>,
}

impl BuildHashes {
    /// The build hash of `exe` as it is on disk now, and its stamp.
    pub(crate) fn of(&self, exe: &Path) -> Result<(String, String)> {
        let stamp = file_stamp(exe)?;
        if let Some(h) = self.cache.lock().get(&stamp) {
            return Ok((h.clone(), stamp));
        }
        let hash = crate::registry::hash_file(exe)
            .map_err(|e| Error::io(format!("read {}", exe.display()), e))?;
        self.cache.lock().insert(stamp.clone(), hash.clone());
        Ok((hash, stamp))
    }

    /// Checks `exe` on disk is the build the job registered.
    pub(crate) fn check(&self, job: &JobSpec) -> Result<String> {
        let (hash, stamp) = self.of(Path::new(&job.exe))?;
        if hash != job.build_hash {
            return Err(Error::BuildMismatch {
                expected: job.build_hash.clone(),
                found: hash,
            });
        }
        Ok(stamp)
    }
}

/// Starts a worker process for `job`.
pub(crate) fn spawn_worker(
    job: &JobSpec,
    config: &WorkerConfig,
    log: &Path,
) -> Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io("duplicate log descriptor", e))?;
    let json = serde_json::to_string(config).map_err(|e| Error::Codec(e.to_string()))?;
    let mut command = tokio::process::Command::new(&job.exe);
    command
        .envs(job.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(ROLE_VAR, "worker")
        .env(WORKER_VAR, json)
        .env_remove("BRAID_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(false);
    command
        .spawn()
        .map_err(|e| Error::io(format!("start worker from {}", job.exe), e))
}
