//! Jobs and their workers on a node: registering and adopting jobs,
//! checking that a job's binary is the build it registered (shipping it
//! from the driver's node when missing, see `binaries`), starting
//! worker processes from it, keeping a warm pool, and reaping and killing
//! them.

use super::{JobEntry, WorkerEntry, WorkerState};
use crate::error::{Error, Result};
use crate::ids::{ActorId, JobId, WorkerId};
use crate::wire::messages::JobSpec;
use crate::wire::{Conn, Message};
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
    for key in crate::wire::messages::DRIVER_ENV {
        command.env_remove(key);
    }
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

/// Jobs and their workers: registering and adopting jobs, starting,
/// readying, reaping and killing workers, and forwarding their output.
impl super::Node {
    pub(super) fn worker_ready(&self, conn: &Conn) {
        {
            let mut state = self.state.lock();
            if let Some(w) = state
                .workers
                .values_mut()
                .find(|w| w.conn.as_ref().is_some_and(|c| c.id() == conn.id()))
            {
                if matches!(w.state, WorkerState::Starting) {
                    w.state = WorkerState::Idle;
                }
            }
        }
        self.dispatch();
    }

    pub(super) fn register_job(&self, conn: &Conn, spec: JobSpec) -> Result<()> {
        let stamp = self.hashes.check(&spec)?;
        let job = spec.job;
        {
            let mut state = self.state.lock();
            let driver = match state.jobs.get(&job) {
                Some(existing) => existing.driver,
                None => Some(conn.id()),
            };
            state.jobs.insert(
                job,
                JobEntry {
                    spec,
                    driver,
                    stamp,
                },
            );
        }
        self.top_up(job);
        Ok(())
    }

    /// Registers a job started elsewhere (its driver runs on another node),
    /// from what the head knows of it, so this node can start its workers.
    pub(super) async fn adopt_job(&self, job: JobId) -> Result<()> {
        let jobs = self.head.list_jobs().await?;
        let record = jobs
            .into_iter()
            .find(|j| j.info.job_id == job && !j.finished)
            .ok_or_else(|| Error::BadRequest(format!("job {job} is unknown or finished")))?;
        let mut spec = JobSpec {
            job,
            exe: record.info.exe_path.display().to_string(),
            build_hash: record.info.build_hash.clone(),
            driver: crate::address::Address::from_head_string(&record.info.driver_address)
                .ok_or_else(|| Error::BadRequest(format!("job {job} has no driver address")))?,
            env: Vec::new(),
        };
        let stamp = match self.hashes.check(&spec) {
            Ok(stamp) => stamp,
            Err(missing) if spec.driver.node != self.id => {
                tracing::info!(
                    "job {job}: {missing}; fetching its binary from node {}",
                    spec.driver.node
                );
                let name = record
                    .info
                    .exe_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let source = self.node_client(spec.driver.node).await?;
                let path = self
                    .binaries
                    .obtain(job, &spec.build_hash, &name, &source)
                    .await?;
                spec.exe = path.display().to_string();
                self.hashes.check(&spec)?
            }
            Err(e) => return Err(e),
        };
        self.state.lock().jobs.entry(job).or_insert(JobEntry {
            spec,
            driver: None,
            stamp,
        });
        Ok(())
    }

    /// The file of a job this node runs whose binary has build hash
    /// `hash`, checked on disk now (it may have been rebuilt since).
    pub(super) fn binary_of_build(&self, hash: &str) -> Option<PathBuf> {
        let candidates: Vec<String> = self
            .state
            .lock()
            .jobs
            .values()
            .filter(|j| j.spec.build_hash == hash)
            .map(|j| j.spec.exe.clone())
            .collect();
        candidates
            .into_iter()
            .map(PathBuf::from)
            .find(|path| self.hashes.of(path).is_ok_and(|(found, _)| found == hash))
    }

    /// Starts workers until the job has its warm pool.
    pub(super) fn top_up(&self, job: JobId) {
        let (want, spec, stamp) = {
            let state = self.state.lock();
            let Some(entry) = state.jobs.get(&job) else {
                return;
            };
            let spare = state
                .workers
                .values()
                .filter(|w| {
                    w.job == job && matches!(w.state, WorkerState::Idle | WorkerState::Starting)
                })
                .count();
            // Only requests the node has resources for now want a worker:
            // one that waits for a lease to end takes that lease's worker.
            let waiting = state.grantable(job);
            let want = (self.config.warm_workers + waiting).saturating_sub(spare);
            (want, entry.spec.clone(), entry.stamp.clone())
        };
        for _ in 0..want {
            if let Err(e) = self.start_worker(&spec, &stamp) {
                tracing::error!("cannot start a worker for job {job}: {e}");
                self.fail_waiting(job, e);
                return;
            }
        }
    }

    pub(super) fn start_worker(&self, spec: &JobSpec, stamp: &str) -> Result<()> {
        let fresh = self.hashes.check(spec)?;
        if fresh != stamp {
            if let Some(j) = self.state.lock().jobs.get_mut(&spec.job) {
                j.stamp = fresh.clone();
            }
        }
        let worker = WorkerId::random();
        let config = WorkerConfig {
            node_socket: self.control_socket.clone(),
            token: self.config.token.clone(),
            job: spec.job,
            worker,
            session_dir: self.config.session_dir.clone(),
            exe_stamp: fresh,
            build_hash: spec.build_hash.clone(),
            direct_ip: self.direct_ip,
        };
        let log = self
            .control_socket
            .with_file_name("logs")
            .join(format!("worker-{}.log", &worker.to_string()[..8]));
        let mut child = spawn_worker(spec, &config, &log)?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(job = %spec.job, pid, log = %log.display(), "worker started");
        self.worker_logs.lock().started(pid, spec.job, log.clone());
        self.state.lock().workers.insert(
            worker,
            WorkerEntry {
                pid,
                job: spec.job,
                conn: None,
                address: None,
                state: WorkerState::Starting,
                actor: None,
                detached: false,
            },
        );
        let node = self.self_ref.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Some(node) = node.upgrade() {
                node.worker_logs.lock().exited(pid);
                node.worker_exited(worker, status.ok());
            }
        });
        Ok(())
    }

    pub(super) fn worker_exited(&self, worker: WorkerId, status: Option<std::process::ExitStatus>) {
        let (job, conn) = {
            let mut state = self.state.lock();
            let Some(entry) = state.workers.remove(&worker) else {
                return;
            };
            match status {
                Some(s) if s.success() => {
                    tracing::info!(job = %entry.job, pid = entry.pid, "worker exited")
                }
                _ => tracing::info!(job = %entry.job, pid = entry.pid, ?status, "worker died"),
            }
            if let WorkerState::Leased(lease) = entry.state {
                if let Some(l) = state.leases.remove(&lease) {
                    state.ledger.release(l.pool, &l.resources);
                }
            }
            (entry.job, entry.conn)
        };
        if let Some(conn) = conn {
            conn.close();
        }
        self.released.notify_waiters();
        self.dispatch();
        if self.state.lock().jobs.contains_key(&job) {
            self.top_up(job);
        }
    }

    /// Kills the worker hosting an actor.
    pub(super) fn kill_actor(&self, actor: ActorId) {
        let pid = {
            let state = self.state.lock();
            state
                .workers
                .values()
                .find(|w| w.actor == Some(actor))
                .map(|w| w.pid)
        };
        if let Some(pid) = pid {
            kill_pid(pid);
        }
    }

    pub(super) fn kill_all_workers(&self) {
        let pids: Vec<u32> = self.state.lock().workers.values().map(|w| w.pid).collect();
        for pid in pids {
            kill_pid(pid);
        }
    }

    pub(super) fn forward_log(&self, conn: &Conn, message: Message) {
        let state = self.state.lock();
        let job = state
            .workers
            .values()
            .find(|w| w.conn.as_ref().is_some_and(|c| c.id() == conn.id()))
            .map(|w| w.job);
        let driver = job
            .and_then(|j| state.jobs.get(&j))
            .and_then(|j| j.driver)
            .and_then(|d| state.conns.get(&d))
            .cloned();
        drop(state);
        if let Some(driver) = driver {
            driver.send(message);
        }
    }
}

pub(super) fn kill_pid(pid: u32) {
    if pid == 0 {
        return;
    }
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}
