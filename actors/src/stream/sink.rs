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
use super::operator::{decode_state, Collector, EventTime, Operator, Snapshot, StateError};
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
pub struct TransactionalFileSink<T, F> {
    dir: PathBuf,
    format: F,
    subtask: usize,
    generation: u64,
    state: SinkState,
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
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
                epoch: 1,
            },
            file: None,
            error: None,
            _type: PhantomData,
        };
        if let Err(e) = sink.raise_fence() {
            sink.error = Some(e.to_string());
        }
        sink
    }

    /// The first I/O error the sink hit, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join(".pending")
    }

    fn fence_path(&self) -> PathBuf {
        self.dir.join("_FENCE")
    }

    fn fence(&self) -> u64 {
        std::fs::read_to_string(self.fence_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn raise_fence(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.pending_dir())?;
        if self.fence() < self.generation {
            let tmp = self
                .pending_dir()
                .join(format!("fence-{}-{}", self.subtask, self.generation));
            std::fs::write(&tmp, self.generation.to_string())?;
            std::fs::rename(tmp, self.fence_path())?;
        }
        Ok(())
    }

    fn current(&mut self) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        if self.file.is_none() {
            let path = self.pending_dir().join(format!(
                "e{:020}-s{:04}-g{}",
                self.state.epoch, self.subtask, self.generation
            ));
            let file = std::fs::File::create(&path)?;
            self.file = Some((path, std::io::BufWriter::new(file)));
        }
        match self.file.as_mut() {
            Some((_, w)) => Ok(w),
            None => Err(std::io::Error::other("no pending file")),
        }
    }

    fn pre_commit(&mut self) -> std::io::Result<()> {
        if let Some((path, mut writer)) = self.file.take() {
            writer.flush()?;
            writer.get_ref().sync_all()?;
            self.state.pending.push((self.state.epoch, path));
        }
        Ok(())
    }

    fn final_path(&self, epoch: u64) -> PathBuf {
        self.dir
            .join(format!("part-{epoch:020}-{:04}", self.subtask))
    }

    /// Commits pre-committed files of epochs up to `epoch`; refuses when a
    /// newer generation has fenced this one off.
    fn commit_through(&mut self, epoch: u64) -> Result<(), String> {
        let fence = self.fence();
        if fence > self.generation {
            return Err(format!(
                "sink of generation {} fenced off by generation {fence}",
                self.generation
            ));
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
            if path.exists() {
                if let Err(err) = std::fs::rename(&path, &target) {
                    failure = Some(format!("commit {}: {err}", path.display()));
                    kept.push((e, path));
                }
            } else if !target.exists() {
                failure = Some(format!(
                    "pre-committed file {} is missing and was never committed",
                    path.display()
                ));
                kept.push((e, path));
            }
        }
        self.state.pending = kept;
        if let Some(failure) = failure {
            return Err(failure);
        }
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
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

    fn process(&mut self, value: T, _time: Option<EventTime>, _out: &mut dyn Collector<()>) {
        if self.error.is_some() {
            return;
        }
        let line = (self.format)(&value);
        let written = self.current().and_then(|w| {
            w.write_all(line.as_bytes())
                .and_then(|()| w.write_all(b"\n"))
        });
        if let Err(e) = written {
            self.error = Some(e.to_string());
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        if let Err(e) = self.pre_commit() {
            self.error = Some(e.to_string());
        }
        let state = self.state.clone();
        self.state.epoch += 1;
        Snapshot::of(state)
    }

    fn notify_checkpoint_complete(&mut self, epoch: u64) {
        if let Err(e) = self.commit_through(epoch) {
            tracing::error!("{e}");
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.file = None;
        let restored: SinkState = if bytes.is_empty() {
            SinkState::default()
        } else {
            decode_state(bytes)?
        };
        let through = restored.pending.iter().map(|(e, _)| *e).max().unwrap_or(0);
        self.state = restored;
        self.commit_through(through).map_err(StateError::Decode)?;
        self.state.epoch += 1;
        self.clean_strays();
        Ok(())
    }
}
