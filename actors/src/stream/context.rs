//! Which subtask, of which attempt, is being built on this thread: what an
//! operator's factory may read when it needs more than its subtask index
//! (a sink fencing off older generations, a source splitting its input).

use std::cell::Cell;

/// The subtask an operator instance belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskContext {
    /// Its parallel instance.
    pub subtask: usize,
    /// How many instances its task has.
    pub parallelism: usize,
    /// The job's attempt: increases by one on every recovery. Work of an
    /// older generation must not become visible.
    pub generation: u64,
    /// The checkpoint epoch the attempt restored (0: it started fresh).
    pub restored_epoch: u64,
}

thread_local! {
    static CURRENT: Cell<Option<TaskContext>> = const { Cell::new(None) };
}

impl TaskContext {
    /// The context of the subtask being built or run on this thread.
    pub fn current() -> TaskContext {
        CURRENT.with(Cell::get).unwrap_or(TaskContext {
            subtask: 0,
            parallelism: 1,
            generation: 0,
            restored_epoch: 0,
        })
    }

    /// Makes this the current context for the rest of the thread's life.
    pub fn enter(self) {
        CURRENT.with(|c| c.set(Some(self)));
    }
}
