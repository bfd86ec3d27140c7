//! Jobs submitted to the head (`braid job submit`), as Ray Jobs: the head
//! runs the entrypoint on its machine (beside its node) with
//! `BRAID_ADDRESS`, `BRAID_TOKEN` and `BRAID_JOB_ID` set, so the driver
//! joins this cluster and registers under the submission's id; it keeps
//! the job's output (the driver's, which holds its workers' prefixed
//! lines) in a log file rotated by size, and its state, exit code and
//! times. Stopping a job signals its process group (SIGTERM, then SIGKILL
//! after [`STOP_GRACE`]); a head that stops stops its jobs.
//!
//! A job runs in the directory it names when that is the same directory
//! on the head's machine, else in an uploaded copy of it
//! ([`super::job_package`]), which the head removes once no running job
//! uses it.
//!
//! ```text
//! PENDING ─spawned─▶ RUNNING ─exit 0─▶ SUCCEEDED
//!    └─spawn failed─▶ FAILED ◀─exit ≠ 0 or signal─┘      └─stop─▶ STOPPED
//! ```

use super::job_package::{self, DirIdentity, PackageError};
use crate::ids::JobId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Environment variable naming the job id a submitted driver registers
/// under.
pub const JOB_ID_VAR: &str = "BRAID_JOB_ID";
/// A job's log is rotated past this many bytes (one older file is kept).
pub const LOG_ROTATE_BYTES: u64 = 64 << 20;
/// How long a stopped job has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// The most log bytes one `logs` call returns.
pub const LOG_CHUNK: u64 = 1 << 20;

/// What `braid job submit` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// The command and its arguments (no shell).
    pub entrypoint: Vec<String>,
    /// Where it runs, on the head's machine [default: the head's].
    pub working_dir: Option<PathBuf>,
    /// When set, `working_dir` must be this very directory (the one the
    /// submitter sees), or the head refuses with
    /// [`JobRequestError::Elsewhere`] and the submitter uploads it.
    #[serde(default)]
    pub same_as: Option<DirIdentity>,
    /// Runs in this uploaded package instead (its name; see
    /// [`JobManager::store_package`]).
    #[serde(default)]
    pub package: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Where a submitted job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SubmittedState {
    /// Accepted, not started yet.
    Pending,
    /// Its entrypoint runs.
    Running,
    /// It exited with 0.
    Succeeded,
    /// It could not start, exited non-zero or was killed by a signal.
    Failed,
    /// Someone stopped it.
    Stopped,
}

impl SubmittedState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SubmittedState::Succeeded | SubmittedState::Failed | SubmittedState::Stopped
        )
    }
}

/// A submitted job, as `braid job status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    /// Its id (its driver registers under it).
    pub job_id: JobId,
    /// Its command.
    pub entrypoint: Vec<String>,
    /// Where it runs.
    pub working_dir: Option<PathBuf>,
    /// The uploaded package it runs in, if any.
    #[serde(default)]
    pub package: Option<String>,
    /// Where it is in its life.
    pub state: SubmittedState,
    /// Its process, while it has one.
    pub pid: Option<u32>,
    /// Its exit code (none if a signal ended it, or it has not ended).
    pub exit_code: Option<i32>,
    /// Why it failed or stopped, if it did.
    pub message: String,
    /// When it was submitted (Unix ms).
    pub start_time_ms: u64,
    /// When it ended (Unix ms).
    pub end_time_ms: Option<u64>,
    /// Bytes of output so far.
    pub log_bytes: u64,
}

/// A piece of a job's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChunk {
    /// The text (lossy UTF-8).
    pub text: String,
    /// The offset to ask for next.
    pub next: u64,
    /// Whether the job has ended (nothing follows `next` then).
    pub finished: bool,
}

/// Why a job request failed.
#[derive(Debug, thiserror::Error)]
pub enum JobRequestError {
    /// No job has that id.
    #[error("no submitted job {0}")]
    NotFound(JobId),
    /// The request makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// The working directory named is not that directory on the head's
    /// machine: upload it.
    #[error("{0} is not the submitter's directory on the head's machine")]
    Elsewhere(String),
    /// No uploaded package has that name (any more): upload it again.
    #[error("the head has no package {0}: upload it")]
    NoPackage(String),
    /// An upload was refused.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// The log could not be read.
    #[error("cannot read the job's log: {0}")]
    Io(#[from] std::io::Error),
}

/// A job's log file with rotation: bytes written so far overall, and how
/// many of them went to rotated-out files.
struct Log {
    path: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    rotated: u64,
}

impl Log {
    fn append(&mut self, bytes: &[u8]) {
        let current = self.written - self.rotated;
        if current + bytes.len() as u64 > LOG_ROTATE_BYTES && current > 0 {
            self.file = None;
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            self.rotated = self.written;
        }
        if self.file.is_none() {
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        if let Some(file) = self.file.as_mut() {
            if file.write_all(bytes).is_ok() {
                self.written += bytes.len() as u64;
            }
        }
    }
}

struct Entry {
    info: Submission,
    log: Arc<Mutex<Log>>,
    stopping: bool,
}

/// The head's submitted jobs.
pub struct JobManager {
    dir: PathBuf,
    head: String,
    token: String,
    jobs: Mutex<HashMap<JobId, Entry>>,
}

fn now_ms() -> u64 {
    super::head_state::unix_millis()
}

impl JobManager {
    /// A manager keeping logs in `dir`, starting drivers that join the
    /// head at `head` with `token`.
    pub fn new(dir: PathBuf, head: String, token: String) -> Arc<JobManager> {
        Arc::new(JobManager {
            dir,
            head,
            token,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    fn packages(&self) -> PathBuf {
        self.dir.join("packages")
    }

    /// Unpacks an uploaded working directory, named by its SHA-256, for
    /// jobs to run in (once; a package already there is kept). Blocking.
    pub fn store_package(&self, name: &str, bytes: &[u8]) -> Result<(), JobRequestError> {
        job_package::unpack(&self.packages(), name, bytes)?;
        Ok(())
    }

    /// Where `request`'s job runs: its package, or its directory if that
    /// is there (and is the submitter's, when `same_as` says which).
    fn working_dir(&self, request: &SubmitRequest) -> Result<Option<PathBuf>, JobRequestError> {
        match (&request.package, &request.working_dir) {
            (Some(_), Some(_)) => Err(JobRequestError::Invalid(
                "a job runs in a working directory or in a package, not both".into(),
            )),
            (Some(name), None) => {
                if !job_package::is_name(name) {
                    return Err(PackageError::BadName(name.clone()).into());
                }
                let dir = self.packages().join(name);
                if dir.is_dir() {
                    Ok(Some(dir))
                } else {
                    Err(JobRequestError::NoPackage(name.clone()))
                }
            }
            (None, Some(dir)) => {
                let shown = dir.display().to_string();
                match (&request.same_as, DirIdentity::of(dir)) {
                    (Some(theirs), Ok(ours)) if *theirs != ours => {
                        Err(JobRequestError::Elsewhere(shown))
                    }
                    (Some(_), Err(_)) => Err(JobRequestError::Elsewhere(shown)),
                    (None, Err(_)) => Err(JobRequestError::Invalid(format!(
                        "the working directory {shown} is not a directory on the head's machine"
                    ))),
                    (_, Ok(_)) => Ok(Some(dir.clone())),
                }
            }
            (None, None) => Ok(None),
        }
    }

    /// Removes `package` unless a job not over yet runs in it.
    fn release_package(&self, package: Option<&str>) {
        let Some(name) = package else { return };
        let jobs = self.jobs.lock();
        let used = jobs
            .values()
            .any(|e| !e.info.state.is_terminal() && e.info.package.as_deref() == Some(name));
        if !used {
            let _ = std::fs::remove_dir_all(self.packages().join(name));
        }
    }

    /// Starts `request`'s entrypoint; its submission as it stands.
    pub fn submit(self: &Arc<Self>, request: SubmitRequest) -> Result<Submission, JobRequestError> {
        if request.entrypoint.first().is_none_or(|c| c.is_empty()) {
            return Err(JobRequestError::Invalid("the entrypoint is empty".into()));
        }
        let cwd = self.working_dir(&request)?;
        std::fs::create_dir_all(&self.dir)?;
        let job_id = JobId::random();
        let log = Arc::new(Mutex::new(Log {
            path: self.dir.join(format!("job-{job_id}.log")),
            file: None,
            written: 0,
            rotated: 0,
        }));
        let info = Submission {
            job_id,
            entrypoint: request.entrypoint.clone(),
            working_dir: cwd.clone(),
            package: request.package.clone(),
            state: SubmittedState::Pending,
            pid: None,
            exit_code: None,
            message: String::new(),
            start_time_ms: now_ms(),
            end_time_ms: None,
            log_bytes: 0,
        };
        self.jobs.lock().insert(
            job_id,
            Entry {
                info,
                log: log.clone(),
                stopping: false,
            },
        );
        let mut command = tokio::process::Command::new(&request.entrypoint[0]);
        command
            .args(&request.entrypoint[1..])
            .envs(&request.env)
            .env(crate::cluster::ADDRESS_VAR, &self.head)
            .env(crate::cluster::TOKEN_VAR, &self.token)
            .env(JOB_ID_VAR, job_id.to_string())
            .env_remove(crate::node::worker_pool::ROLE_VAR)
            .env_remove(crate::cluster::DAEMON_VAR)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &cwd {
            command.current_dir(dir);
        }
        match command.spawn() {
            Ok(child) => {
                let pid = child.id();
                self.update(job_id, |e| {
                    e.info.state = SubmittedState::Running;
                    e.info.pid = pid;
                });
                tracing::info!(%job_id, ?pid, entrypoint = ?request.entrypoint, "job started");
                let this = self.clone();
                tokio::spawn(async move { this.supervise(job_id, child, log).await });
            }
            Err(e) => {
                let message = format!("cannot start {:?}: {e}", request.entrypoint[0]);
                log.lock().append(format!("{message}\n").as_bytes());
                self.update(job_id, |entry| {
                    entry.info.state = SubmittedState::Failed;
                    entry.info.message = message.clone();
                    entry.info.end_time_ms = Some(now_ms());
                });
                self.release_package(request.package.as_deref());
            }
        }
        self.get(job_id)
    }

    fn update(&self, job: JobId, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.jobs.lock().get_mut(&job) {
            change(entry);
        }
    }

    async fn supervise(
        self: Arc<Self>,
        job: JobId,
        mut child: tokio::process::Child,
        log: Arc<Mutex<Log>>,
    ) {
        let pumps: Vec<_> = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|mut out| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = out.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().append(&buf[..n]);
                }
            })
        })
        .collect();
        let status = child.wait().await;
        for pump in pumps {
            let _ = pump.await;
        }
        self.update(job, |e| {
            e.info.pid = None;
            e.info.end_time_ms = Some(now_ms());
            match status {
                Ok(status) => {
                    e.info.exit_code = status.code();
                    e.info.state = if e.stopping {
                        SubmittedState::Stopped
                    } else if status.success() {
                        SubmittedState::Succeeded
                    } else {
                        SubmittedState::Failed
                    };
                    if !status.success() && !e.stopping {
                        e.info.message = format!("the entrypoint {status}");
                    }
                }
                Err(err) => {
                    e.info.state = SubmittedState::Failed;
                    e.info.message = format!("cannot wait for the entrypoint: {err}");
                }
            }
            tracing::info!(%job, state = ?e.info.state, code = ?e.info.exit_code, "job ended");
        });
        let package = self
            .jobs
            .lock()
            .get(&job)
            .and_then(|e| e.info.package.clone());
        self.release_package(package.as_deref());
    }

    /// A job as it stands.
    pub fn get(&self, job: JobId) -> Result<Submission, JobRequestError> {
        let jobs = self.jobs.lock();
        let entry = jobs.get(&job).ok_or(JobRequestError::NotFound(job))?;
        let mut info = entry.info.clone();
        info.log_bytes = entry.log.lock().written;
        Ok(info)
    }

    /// Every submitted job, oldest first.
    pub fn list(&self) -> Vec<Submission> {
        let ids: Vec<JobId> = self.jobs.lock().keys().copied().collect();
        let mut all: Vec<Submission> = ids.into_iter().filter_map(|id| self.get(id).ok()).collect();
        all.sort_by_key(|s| (s.start_time_ms, s.job_id));
        all
    }

    /// The job's log from `offset` (bytes since it started; output already
    /// rotated out is skipped, with a line saying so).
    pub fn logs(&self, job: JobId, offset: u64) -> Result<LogChunk, JobRequestError> {
        let (log, finished) = {
            let jobs = self.jobs.lock();
            let entry = jobs.get(&job).ok_or(JobRequestError::NotFound(job))?;
            (entry.log.clone(), entry.info.state.is_terminal())
        };
        let (path, written, rotated) = {
            let log = log.lock();
            (log.path.clone(), log.written, log.rotated)
        };
        let mut text = String::new();
        let start = if offset < rotated {
            text.push_str(&format!(
                "[braid: {} bytes of this log were rotated out]\n",
                rotated - offset
            ));
            rotated
        } else {
            offset.min(written)
        };
        let want = (written - start).min(LOG_CHUNK);
        let bytes = read_at(&path, start - rotated, want)?;
        text.push_str(&String::from_utf8_lossy(&bytes));
        let next = start + bytes.len() as u64;
        Ok(LogChunk {
            text,
            next,
            finished: finished && next >= written,
        })
    }

    /// Stops a running job: SIGTERM to its process group, SIGKILL after
    /// [`STOP_GRACE`].
    pub fn stop(self: &Arc<Self>, job: JobId) -> Result<Submission, JobRequestError> {
        let pid = {
            let mut jobs = self.jobs.lock();
            let entry = jobs.get_mut(&job).ok_or(JobRequestError::NotFound(job))?;
            if entry.info.state.is_terminal() {
                return Err(JobRequestError::Invalid(format!(
                    "job {job} has already ended ({:?})",
                    entry.info.state
                )));
            }
            entry.stopping = true;
            entry.info.message = "stopped by request".into();
            entry.info.pid
        };
        if let Some(pid) = pid {
            signal_group(pid, rustix::process::Signal::TERM);
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(STOP_GRACE).await;
                if this.get(job).is_ok_and(|s| !s.state.is_terminal()) {
                    signal_group(pid, rustix::process::Signal::KILL);
                }
            });
        }
        self.get(job)
    }

    /// Kills every running job's process group (the head is stopping).
    pub fn stop_all(&self) {
        let pids: Vec<u32> = self
            .jobs
            .lock()
            .values_mut()
            .filter_map(|e| {
                e.stopping = true;
                e.info.pid
            })
            .collect();
        for pid in pids {
            signal_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager")
            .field("dir", &self.dir)
            .finish()
    }
}

fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_rotates_and_reads_from_offsets() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = Log {
            path: dir.path().join("job.log"),
            file: None,
            written: 0,
            rotated: 0,
        };
        log.append(b"hello\n");
        assert_eq!(read_at(&log.path, 0, 100).expect("read"), b"hello\n");
        let big = vec![b'x'; LOG_ROTATE_BYTES as usize];
        log.append(&big);
        assert_eq!(log.rotated, 6, "the first file rotated out");
        assert_eq!(log.written, 6 + LOG_ROTATE_BYTES);
        assert!(dir.path().join("job.log.1").is_file());
    }
}
