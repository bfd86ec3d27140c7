//! What braid keeps on disk, and how it goes away.
//!
//! Everything lives in one per-user directory, `braid-<uid>` under
//! `BRAID_TMPDIR` (or the system temp directory), which must be this user's
//! own with mode 0700: braid refuses to use it otherwise, since the cluster
//! token and every socket live there. It holds:
//!
//! * `cluster-<address>.json`: the token files of clusters `braid start`
//!   started;
//! * `session-<ms>-<pid>-<n>/`: one directory per cluster (embedded or
//!   started with `braid start`): daemon logs, `node-<id>/` (the node's
//!   `node.sock`, `store.sock` and `logs/` of its workers), `sockets/` (one
//!   socket per driver and worker), `scratch/<job>/` (each job's
//!   [scratch directory](scratch_dir), removed by the node when the job's
//!   driver goes, however it goes) and `session.lock`;
//! * `logs/<session>/`: the logs of ended sessions, the newest kept within
//!   [`LOG_BUDGET`].
//!
//! **Live or ended.** Every head and node daemon holds a shared `flock` on
//! its session's `session.lock` for as long as it runs (the kernel drops it
//! however the process dies, and a recycled pid cannot fake it). A session
//! whose lock nobody holds has ended: [`clean_up`] (run by `braid start`,
//! `braid stop` and every embedded cluster's start) takes the lock
//! exclusively, moves the session's logs to `logs/`, and removes the rest —
//! sockets, scratch, the lock. A new session directory is made under a
//! staging name and renamed into place with its lock already held, so a
//! cleaner never sees a session before its lock.

use crate::error::{Error, Result};
use crate::ids::JobId;
use rustix::fs::FlockOperation;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

/// The lock file every daemon of a session holds shared while it runs.
pub const LOCK_FILE: &str = "session.lock";

/// The directory of a session holding its jobs' scratch directories.
pub const SCRATCH_DIR: &str = "scratch";

/// The directory of the per-user directory holding ended sessions' logs.
pub const LOGS_DIR: &str = "logs";

/// How many bytes of ended sessions' logs are kept: the newest sessions'
/// logs whose sizes add up to at most this (the newest session's logs are
/// kept whatever their size).
pub const LOG_BUDGET: u64 = 64 << 20;

const SESSION_PREFIX: &str = "session-";
const STAGING_PREFIX: &str = ".new-";
const ENDING_PREFIX: &str = ".ending-";

/// How old a staging directory must be before a cleaner takes it for the
/// leftover of a start that died (with its lock file free, or without one).
const STAGING_GRACE: Duration = Duration::from_secs(60);

/// The per-user directory's path (nothing is created or checked): where
/// braid keeps this user's sessions, token files and logs.
pub fn user_dir() -> PathBuf {
    let base = std::env::var_os("BRAID_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("braid-{}", rustix::process::getuid().as_raw()))
}

/// The per-user directory, created with mode 0700 if missing; an
/// existing one must be owned by this user with mode 0700, else
/// [`Error::UnsafeDirectory`].
pub fn private_user_dir() -> Result<PathBuf> {
    let dir = user_dir();
    if let Some(base) = dir.parent() {
        std::fs::create_dir_all(base)
            .map_err(|e| Error::io(format!("create {}", base.display()), e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            // The umask may have taken bits off; this directory is ours.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    check_private(&dir)?;
    Ok(dir)
}

/// The per-user directory if it exists and is safe to read from (`None`
/// if it does not exist yet).
pub fn existing_user_dir() -> Result<Option<PathBuf>> {
    let dir = user_dir();
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => check_private(&dir).map(|()| Some(dir)),
    }
}

/// Checks that `dir` is a directory (not a symbolic link) owned by this
/// user with mode 0700.
pub fn check_private(dir: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("inspect {}", dir.display()), e))?;
    let uid = rustix::process::getuid().as_raw();
    let kind = if meta.file_type().is_symlink() {
        "symbolic link"
    } else if meta.is_dir() {
        "directory"
    } else {
        "file"
    };
    let mode = meta.mode() & 0o7777;
    if kind != "directory" || meta.uid() != uid || mode != 0o700 {
        return Err(Error::UnsafeDirectory {
            path: dir.to_path_buf(),
            kind: kind.to_string(),
            owner: meta.uid(),
            mode,
            user: uid,
        });
    }
    Ok(())
}

/// Creates one directory (not its parents) with mode 0700; one that exists
/// already is fine.
fn make_private(path: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(Error::io(format!("create {}", path.display()), e)),
    }
}

/// A shared hold on a session's lock: while any exists, the session is
/// live and no cleaner touches it. The kernel drops it when the process
/// dies, however it dies.
#[derive(Debug)]
pub struct SessionLock {
    _file: File,
}

impl SessionLock {
    /// Holds session `dir` live for as long as the returned value lives.
    /// Fails if the session directory is gone or being cleaned up.
    pub fn hold(dir: &Path) -> Result<SessionLock> {
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared).map_err(|e| {
            Error::io(
                format!("lock {}", path.display()),
                format!("{e} (the session is being cleaned up)"),
            )
        })?;
        Ok(SessionLock { _file: file })
    }
}

/// A new session directory, held live while this value lives (daemons
/// started in it take their own holds).
#[derive(Debug)]
pub struct SessionDir {
    path: PathBuf,
    _lock: SessionLock,
}

impl SessionDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates a new session directory in the per-user directory (after
/// cleaning up ended sessions there).
pub fn new_session_dir() -> Result<SessionDir> {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let user = private_user_dir()?;
    clean_up(&user);
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let name = format!(
        "{SESSION_PREFIX}{stamp}-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    );
    let staging = user.join(format!("{STAGING_PREFIX}{name}"));
    make_private(&staging)?;
    let lock = match SessionLock::hold(&staging) {
        Ok(lock) => lock,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let path = user.join(&name);
    if let Err(e) = std::fs::rename(&staging, &path) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::io(format!("create {}", path.display()), e));
    }
    Ok(SessionDir { path, _lock: lock })
}

/// Where job `job`'s scratch directory is in session `session`.
pub fn scratch_dir(session: &Path, job: JobId) -> PathBuf {
    session.join(SCRATCH_DIR).join(job.to_string())
}

/// Creates job `job`'s scratch directory (mode 0700) in session `session`
/// if it is not there yet. Never creates the session directory itself: a
/// session cleaned up stays gone.
pub fn create_scratch_dir(session: &Path, job: JobId) -> Result<PathBuf> {
    let dir = scratch_dir(session, job);
    if let Some(parent) = dir.parent() {
        make_private(parent)?;
    }
    make_private(&dir)?;
    Ok(dir)
}

/// Removes job `job`'s scratch directory in session `session`, if any.
pub fn remove_scratch_dir(session: &Path, job: JobId) {
    let dir = scratch_dir(session, job);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::debug!("removed scratch directory {}", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove scratch directory {}: {e}", dir.display()),
    }
}

/// What [`clean_up`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleanup {
    /// Ended sessions whose directories were removed (their logs kept).
    pub ended: Vec<PathBuf>,
    /// Ended sessions' log directories removed to stay within
    /// [`LOG_BUDGET`].
    pub logs_removed: usize,
    /// Token files of clusters whose session has ended.
    pub cluster_files_removed: usize,
}

/// Cleans up per-user directory `user`: every session no daemon holds
/// live is ended (its logs moved to `logs/`, the rest removed), token files
/// of ended sessions go, and the kept logs are trimmed to [`LOG_BUDGET`].
/// Best effort: what cannot be removed is logged and left.
pub fn clean_up(user: &Path) -> Cleanup {
    let mut cleanup = Cleanup::default();
    let Ok(entries) = std::fs::read_dir(user) else {
        return cleanup;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ended = if name.starts_with(SESSION_PREFIX) {
            end_if_unheld(&path)
        } else if name.starts_with(ENDING_PREFIX) {
            finish_ending(&path)
        } else if name.starts_with(STAGING_PREFIX) {
            drop_dead_staging(&path)
        } else {
            Ok(false)
        };
        match ended {
            Ok(true) => cleanup.ended.push(path),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot clean up {}: {e}", path.display()),
        }
    }
    cleanup.cluster_files_removed = remove_stale_cluster_files(user);
    cleanup.logs_removed = rotate_logs(&user.join(LOGS_DIR), LOG_BUDGET);
    cleanup
}

/// Ends session `dir` if no daemon holds it live; returns whether it did.
/// A directory without a lock file (from an older braid, or not a session
/// at all) is left alone.
pub fn end_if_unheld(dir: &Path) -> Result<bool> {
    let Some(lock) = try_lock_exclusive(dir)? else {
        return Ok(false);
    };
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(false);
    };
    let claimed = parent.join(format!("{ENDING_PREFIX}{}", name.to_string_lossy()));
    match std::fs::rename(dir, &claimed) {
        Ok(()) => {}
        // Another cleaner claimed it first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("rename {}", dir.display()), e)),
    }
    let done = finish(&claimed);
    drop(lock);
    done.map(|()| true)
}

/// The session's lock taken exclusively, if no one holds it; `None` if
/// someone does or there is no lock file.
fn try_lock_exclusive(dir: &Path) -> Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(Error::io(format!("lock {}", path.display()), e)),
    }
}

/// Build hashes the per-user directory remembers; the oldest go past it.
const REMEMBERED_HASHES: usize = 256;

/// Where the build hash of executable `exe` is remembered, under
/// `build-hashes/` of the per-user directory: named by what changes when
/// the file is rebuilt or replaced (a running binary that was replaced
/// keeps its old inode), so a driver started again from the same file
/// need not read it again (a debug binary takes hundreds of milliseconds).
fn remembered_hash_path(exe: &Path) -> Option<PathBuf> {
    let meta = std::fs::metadata(exe).ok()?;
    let dir = existing_user_dir().ok()??;
    Some(dir.join("build-hashes").join(format!(
        "{:x}-{:x}-{:x}-{:x}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    )))
}

/// The build hash remembered for executable `exe`, if any.
pub(crate) fn remembered_build_hash(exe: &Path) -> Option<String> {
    std::fs::read_to_string(remembered_hash_path(exe)?)
        .ok()
        .filter(|h| !h.is_empty())
}

/// Remembers `hash` for executable `exe` (whole or not at all), dropping
/// the oldest past [`REMEMBERED_HASHES`]. Best effort: a failure only
/// means hashing again next time.
pub(crate) fn remember_build_hash(exe: &Path, hash: &str) {
    let Some(path) = remembered_hash_path(exe) else {
        return;
    };
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, hash).is_err() || std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if kept.len() > REMEMBERED_HASHES {
        kept.sort();
        for (_, old) in &kept[..kept.len() - REMEMBERED_HASHES] {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// Whether a head or node holds session `dir` live. Probing takes the
/// session's lock for an instant when nobody holds it.
pub fn is_held(dir: &Path) -> bool {
    dir.join(LOCK_FILE).exists() && matches!(try_lock_exclusive(dir), Ok(None))
}

/// A session a cleaner claimed but did not finish (it died): finishes it
/// unless, against all odds, someone holds it again.
fn finish_ending(dir: &Path) -> Result<bool> {
    if dir.join(LOCK_FILE).exists() {
        let Some(lock) = try_lock_exclusive(dir)? else {
            return Ok(false);
        };
        let done = finish(dir);
        drop(lock);
        return done.map(|()| true);
    }
    finish(dir).map(|()| true)
}

/// A staging directory whose creator died before renaming it into place.
fn drop_dead_staging(dir: &Path) -> Result<bool> {
    // A young staging directory is left alone even with its lock file
    // there and free: its creator may be between creating the lock file
    // and taking the lock (removing it then made the creator's rename fail
    // with "No such file or directory").
    let young = std::fs::symlink_metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age < STAGING_GRACE);
    if young {
        return Ok(false);
    }
    if dir.join(LOCK_FILE).exists() {
        let Some(lock) = try_lock_exclusive(dir)? else {
            return Ok(false);
        };
        let removed = std::fs::remove_dir_all(dir);
        drop(lock);
        return removed
            .map(|()| true)
            .map_err(|e| Error::io(format!("remove {}", dir.display()), e));
    }
    std::fs::remove_dir_all(dir)
        .map(|()| true)
        .map_err(|e| Error::io(format!("remove {}", dir.display()), e))
}

/// Moves a claimed session's logs to `logs/<session>/` beside it and
/// removes the directory.
fn finish(claimed: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (claimed.parent(), claimed.file_name()) else {
        return Ok(());
    };
    let name = name.to_string_lossy();
    let session = name.strip_prefix(ENDING_PREFIX).unwrap_or(&name);
    let logs = parent.join(LOGS_DIR).join(session);
    let mut made = false;
    move_logs(claimed, claimed, &logs, &mut made)?;
    std::fs::remove_dir_all(claimed)
        .map_err(|e| Error::io(format!("remove {}", claimed.display()), e))
}

/// Moves every `*.log` file under `dir` to the same relative
/// path under `to`.
fn move_logs(root: &Path, dir: &Path, to: &Path, made: &mut bool) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            move_logs(root, &path, to, made)?;
            continue;
        }
        let is_log = kind.is_file() && path.extension().is_some_and(|e| e == "log");
        if !is_log {
            continue;
        }
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let target = to.join(relative);
        if !*made {
            if let Some(logs) = to.parent() {
                make_private(logs)?;
            }
            make_private(to)?;
            *made = true;
        }
        if let Some(parent) = target.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        std::fs::rename(&path, &target)
            .map_err(|e| Error::io(format!("move {}", path.display()), e))?;
    }
    Ok(())
}

/// Removes token files whose session directory is gone; returns how many.
fn remove_stale_cluster_files(user: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(user) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("cluster-") && name.ends_with(".json")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(file) = serde_json::from_str::<crate::cluster::ClusterFile>(&text) else {
            continue;
        };
        if !file.session_dir.exists() && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// When session `name` started (the stamp in its name), for ordering.
fn session_stamp(name: &str) -> Option<u128> {
    name.strip_prefix(SESSION_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Total size of the files under `dir`.
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Keeps the newest sessions' logs in `logs` whose total size stays within
/// `budget` (always the newest one); removes the older ones and returns
/// how many.
pub fn rotate_logs(logs: &Path, budget: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return 0;
    };
    let mut sessions: Vec<(u128, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let stamp = session_stamp(&e.file_name().to_string_lossy()).unwrap_or(0);
            (stamp, e.path())
        })
        .collect();
    sessions.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let mut total = 0u64;
    let mut removed = 0;
    for (i, (_, dir)) in sessions.iter().enumerate() {
        total = total.saturating_add(tree_size(dir));
        if i > 0 && total > budget {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("cannot remove old logs {}: {e}", dir.display()),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_stamped_by_its_name() {
        assert_eq!(session_stamp("session-1712-42-0"), Some(1712));
        assert_eq!(session_stamp("other"), None);
    }
}
