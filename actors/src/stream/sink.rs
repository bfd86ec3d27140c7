//! A transactional file sink (two-phase commit, as Flink's
//! `TwoPhaseCommitSinkFunction`). Records go to a pending file per epoch;
//! at the barrier the file is synced and becomes part of the snapshot
//! (pre-commit); when the checkpoint completes it is renamed to its final
//! name (commit). After a recovery the restored snapshot's pre-committed
//! files are committed again (renaming is idempotent: a file already in
//! place is left alone) and pending files of the failed attempt are
//! deleted, so only records before a completed checkpoint are ever
//! visible, each once.
//!
//! Generation fencing: each sink instance writes its job generation into
//! `<dir>/_FENCE` when it starts; a sink of an older generation (a zombie
//! of a failed attempt that is still running) finds a newer fence and
//! refuses to commit.
//!
//! Layout: `<dir>/.pending/e<epoch>-s<subtask>-g<generation>` while
//! pending, `<dir>/part-<epoch>-<subtask>` once committed (numbers
//! zero-padded, so names sort by epoch).

use super::context::TaskContext;
use super::operator::{
    decode_state, Collector, EventTime, Operator, OperatorError, Snapshot, StateError,
};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// Lines written by a [`TransactionalFileSink`]: the committed files of
/// `dir`, in epoch order.
pub fn committed_lines(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-"))
        })
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        lines.extend(std::fs::read_to_string(f)?.lines().map(str::to_string));
    }
    Ok(lines)
}

#[derive(Clone, Serialize, Deserialize, Default)]
struct SinkState {
    /// Pre-committed files not yet known to be committed: (epoch, path).
    pending: Vec<(u64, PathBuf)>,
    /// The epoch the current file belongs to.
    epoch: u64,
}

/// Writes each record as one line (`format(record)`), exactly once.
///
/// Every I/O failure is returned to the runtime, which fails the attempt:
/// a write or pre-commit error fails that epoch's checkpoint (no
/// checkpoint completes over records that were not made durable), a
/// commit error fails the attempt and the restore commits the completed
/// checkpoint's files again before new records flow.
pub struct TransactionalFileSink<T, F> {
    dir: PathBuf,
    format: F,
    subtask: usize,
    generation: u64,
    state: SinkState,
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    /// The error raising the fence hit; every call returns it.
    error: Option<String>,
    _type: PhantomData<fn(T)>,
}

impl<T, F: Fn(&T) -> String> TransactionalFileSink<T, F> {
    /// A sink for the current subtask (see [`TaskContext`]) writing to
    /// `dir`, which it creates.
    pub fn new(dir: impl Into<PathBuf>, format: F) -> Self {
        let ctx = TaskContext::current();
        let dir = dir.into();
        let mut sink = TransactionalFileSink {
            dir,
            format,
            subtask: ctx.subtask,
            generation: ctx.generation,
            state: SinkState {
                pending: Vec::new(),
                epoch: ctx.restored_epoch + 1,
            },
            file: None,
            error: None,
            _type: PhantomData,
        };
        if let Err(e) = sink.raise_fence() {
            sink.error = Some(format!(
                "cannot raise the fence in {}: {e}",
                sink.dir.display()
            ));
        }
        sink
    }

    /// The error the sink hit when it started (creating its directories or
    /// raising its fence), if any; every call on it then fails with it.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn ready(&self) -> Result<(), OperatorError> {
        match &self.error {
            Some(e) => Err(OperatorError::Failed(e.clone())),
            None => Ok(()),
        }
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join(".pending")
    }

    fn fence_path(&self) -> PathBuf {
        self.dir.join("_FENCE")
    }

    /// The newest generation that raised the fence (0: none yet). A fence
    /// that cannot be read is an error, never "no fence".
    fn fence(&self) -> std::io::Result<u64> {
        match std::fs::read_to_string(self.fence_path()) {
            Ok(s) => s.trim().parse().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} holds {s:?}: {e}", self.fence_path().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn raise_fence(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.pending_dir())?;
        if self.fence()? < self.generation {
            let tmp = self
                .pending_dir()
                .join(format!("fence-{}-{}", self.subtask, self.generation));
            std::fs::write(&tmp, self.generation.to_string())?;
            std::fs::rename(tmp, self.fence_path())?;
        }
        Ok(())
    }

    fn current(&mut self) -> Result<&mut std::io::BufWriter<std::fs::File>, OperatorError> {
        if self.file.is_none() {
            let path = self.pending_dir().join(format!(
                "e{:020}-s{:04}-g{}",
                self.state.epoch, self.subtask, self.generation
            ));
            let file = std::fs::File::create(&path)
                .map_err(|e| OperatorError::io(format!("create {}", path.display()), e))?;
            self.file = Some((path, std::io::BufWriter::new(file)));
        }
        match self.file.as_mut() {
            Some((_, w)) => Ok(w),
            None => Err(OperatorError::Failed("no pending file".into())),
        }
    }

    /// Makes the current epoch's file durable and lists it in the state.
    fn pre_commit(&mut self) -> Result<(), OperatorError> {
        if let Some((path, mut writer)) = self.file.take() {
            let synced = writer.flush().and_then(|()| writer.get_ref().sync_all());
            synced.map_err(|e| OperatorError::io(format!("sync {}", path.display()), e))?;
            self.state.pending.push((self.state.epoch, path));
        }
        Ok(())
    }

    fn final_path(&self, epoch: u64) -> PathBuf {
        self.dir
            .join(format!("part-{epoch:020}-{:04}", self.subtask))
    }

    /// Commits pre-committed files of epochs up to `epoch`; refuses when a
    /// newer generation has fenced this one off. A file that cannot be
    /// committed stays listed, so a retry (or the restore) commits it.
    fn commit_through(&mut self, epoch: u64) -> Result<(), OperatorError> {
        let fence = self
            .fence()
            .map_err(|e| OperatorError::io(format!("read {}", self.fence_path().display()), e))?;
        if fence > self.generation {
            return Err(OperatorError::Failed(format!(
                "sink of generation {} fenced off by generation {fence}",
                self.generation
            )));
        }
        let mut failure = None;
        let pending = std::mem::take(&mut self.state.pending);
        let mut kept = Vec::with_capacity(pending.len());
        for (e, path) in pending {
            if e > epoch || failure.is_some() {
                kept.push((e, path));
                continue;
            }
            let target = self.final_path(e);
            match std::fs::rename(&path, &target) {
                Ok(()) => {}
                // Committed before: a replayed completion, or a restore
                // after a commit that had gone through.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && target.exists() => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    failure = Some(OperatorError::Failed(format!(
                        "pre-committed file {} is missing and was never committed",
                        path.display()
                    )));
                    kept.push((e, path));
                }
                Err(err) => {
                    failure = Some(OperatorError::io(
                        format!("commit {} as {}", path.display(), target.display()),
                        err,
                    ));
                    kept.push((e, path));
                }
            }
        }
        self.state.pending = kept;
        if let Some(failure) = failure {
            return Err(failure);
        }
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| OperatorError::io(format!("sync {}", self.dir.display()), e))
    }

    /// Deletes this subtask's pending files that no snapshot refers to.
    fn clean_strays(&self) {
        let mine = format!("-s{:04}-g", self.subtask);
        let Ok(entries) = std::fs::read_dir(self.pending_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('e')
                && name.contains(&mine)
                && !self.state.pending.iter().any(|(_, p)| *p == path)
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl<T, F> Operator for TransactionalFileSink<T, F>
where
    T: Send + 'static,
    F: Fn(&T) -> String + Send + 'static,
{
    type In = T;
    type Out = ();

    fn process(
        &mut self,
        value: T,
        _time: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        self.ready()?;
        let line = (self.format)(&value);
        let w = self.current()?;
        let written = w
            .write_all(line.as_bytes())
            .and_then(|()| w.write_all(b"\n"));
        written.map_err(|e| {
            let path = self.file.take().map(|(p, _)| p).unwrap_or_default();
            OperatorError::io(format!("write {}", path.display()), e)
        })
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        self.ready()?;
        self.pre_commit()?;
        let state = self.state.clone();
        self.state.epoch += 1;
        Ok(Snapshot::of(state))
    }

    fn notify_checkpoint_complete(&mut self, epoch: u64) -> Result<(), OperatorError> {
        self.ready()?;
        self.commit_through(epoch)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        self.ready()?;
        self.file = None;
        let restored: SinkState = if bytes.is_empty() {
            SinkState::default()
        } else {
            decode_state(bytes)?
        };
        let pending_dir = self.pending_dir();
        if let Some((_, stray)) = restored
            .pending
            .iter()
            .find(|(_, p)| p.parent() != Some(pending_dir.as_path()))
        {
            return Err(OperatorError::State(StateError::Decode(format!(
                "the snapshot lists {}, outside this sink's {}",
                stray.display(),
                pending_dir.display()
            ))));
        }
        let through = restored.pending.iter().map(|(e, _)| *e).max().unwrap_or(0);
        self.state = restored;
        self.commit_through(through)?;
        self.state.epoch += 1;
        self.clean_strays();
        Ok(())
    }
}
