//! Task and actor-call spans: when each one was submitted, reached its
//! worker, started and ended, for `braid timeline` (a Chrome trace) and
//! `braid list tasks`. The worker that ran it records the span (one
//! uncontended lock and no allocation: names are the recorder's, which
//! live for the process); every second the process sends what it recorded
//! to its node ([`crate::wire::Message::Spans`]), which keeps the newest
//! [`NODE_KEEP`] and serves them to the head.
//!
//! A process times at most [`PER_REPORT`] runs between two reports (as
//! Ray bounds its task events; [`admit`]): their queue and run times go
//! to the recorder's histograms and their spans here. Past that, in a
//! second of hundreds of thousands of calls, a run reads no clock, is
//! counted by name, and in [`dropped`] (`braid_spans_dropped_total`).
//! Shipping every span of such a second cost the calls a fifth of their
//! rate, and its clock reads and histograms alone several percent.

use super::recorder::Work;
use crate::ids::{JobId, TaskId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Runs a process times and keeps as spans between two reports to its
/// node (each second; Ray sends at most as many task events a second);
/// runs past them are only counted ([`dropped`]).
pub const PER_REPORT: usize = super::recorder::TIMED_PER_SECOND;
/// Spans a node keeps, newest last.
pub const NODE_KEEP: usize = 500_000;

/// One task or actor call, as its worker saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The task or call.
    pub task: TaskId,
    /// The job of the worker that ran it.
    pub job: JobId,
    /// Task or actor call.
    pub work: Work,
    /// The function, or `Class.method`.
    pub name: String,
    /// The worker's process.
    pub pid: u32,
    /// When the caller submitted it (Unix ns; 0 if unknown).
    pub submitted_ns: u64,
    /// When it reached the worker.
    pub received_ns: u64,
    /// When it started running.
    pub started_ns: u64,
    /// When it ended.
    pub ended_ns: u64,
    /// Whether it ran to an answer.
    pub ok: bool,
}

struct Pending {
    task: TaskId,
    job: JobId,
    work: Work,
    name: &'static str,
    submitted_ns: u64,
    received_ns: u64,
    started_ns: u64,
    ended_ns: u64,
    ok: bool,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
/// Runs recorded or refused since the last [`take`].
static SINCE_TAKE: AtomicUsize = AtomicUsize::new(0);
/// Runs not recorded, past [`PER_REPORT`], before the last [`take`].
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many runs this process did not record as spans (past
/// [`PER_REPORT`] in a report's second).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed) + past_cap(SINCE_TAKE.load(Ordering::Relaxed))
}

fn past_cap(runs: usize) -> u64 {
    runs.saturating_sub(PER_REPORT) as u64
}

/// Now, in Unix nanoseconds.
pub fn now_ns() -> u64 {
    unix_ns(Instant::now())
}

/// A caller's stamp for what it submits: now, or 0 (unknown) while
/// recording is off. Every submission is stamped: the caller cannot know
/// which runs their workers will time, and a burst to many workers keeps
/// its submit phases in the timeline.
pub fn submitted_ns() -> u64 {
    if super::enabled() {
        now_ns()
    } else {
        0
    }
}

/// `at` in Unix nanoseconds: the wall clock read once per process, plus
/// the monotonic time since, so a span's stamps cost one clock read each
/// and stay ordered if the wall clock is stepped.
pub fn unix_ns(at: Instant) -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (then, then_ns) = *ANCHOR.get_or_init(|| {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (Instant::now(), ns)
    });
    match at.checked_duration_since(then) {
        Some(since) => then_ns.saturating_add(since.as_nanos() as u64),
        None => then_ns.saturating_sub(then.duration_since(at).as_nanos() as u64),
    }
}

/// What a worker knows of one run, to record as a span.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// The task or call.
    pub task: TaskId,
    /// The worker's job.
    pub job: JobId,
    /// Task or actor call.
    pub work: Work,
    /// When the caller submitted it (Unix ns).
    pub submitted_ns: u64,
    /// When it reached the worker (Unix ns).
    pub received_ns: u64,
    /// When it started (Unix ns).
    pub started_ns: u64,
    /// When it ended (Unix ns).
    pub ended_ns: u64,
}

/// Whether a run reaching this process is timed and kept as a span: one
/// of the first [`PER_REPORT`] since the last report, with recording on.
/// Runs past them are only counted, by their name
/// ([`super::recorder::Counter::count`]) and here ([`dropped`]), at the
/// cost of one atomic add and no clock read.
pub fn admit() -> bool {
    super::enabled() && SINCE_TAKE.fetch_add(1, Ordering::Relaxed) < PER_REPORT
}

/// Records a run that just ended, named by `parts` as the recorder names
/// it, if [`admit`] lets it in.
pub fn record(run: Run, parts: &[&str], ok: bool) {
    if !admit() {
        return;
    }
    record_named(
        run,
        super::recorder::Counter::of(run.work, parts).name(),
        ok,
    );
}

/// Records a run [`admit`] let in, with the name the recorder found.
pub fn record_named(run: Run, name: &'static str, ok: bool) {
    PENDING.lock().push(Pending {
        task: run.task,
        job: run.job,
        work: run.work,
        name,
        submitted_ns: run.submitted_ns,
        received_ns: run.received_ns,
        started_ns: run.started_ns,
        ended_ns: run.ended_ns,
        ok,
    });
}

/// Takes what this process recorded since the last call.
pub fn take() -> Vec<Span> {
    let pending = std::mem::take(&mut *PENDING.lock());
    let runs = SINCE_TAKE.swap(0, Ordering::Relaxed);
    DROPPED.fetch_add(past_cap(runs), Ordering::Relaxed);
    let pid = std::process::id();
    pending
        .into_iter()
        .map(|p| Span {
            task: p.task,
            job: p.job,
            work: p.work,
            name: p.name.to_string(),
            pid,
            submitted_ns: p.submitted_ns,
            received_ns: p.received_ns,
            started_ns: p.started_ns,
            ended_ns: p.ended_ns,
            ok: p.ok,
        })
        .collect()
}

/// A node's spans, newest last, at most [`NODE_KEEP`].
#[derive(Debug, Default)]
pub struct SpanLog {
    spans: VecDeque<Span>,
}

impl SpanLog {
    /// Adds spans a process sent.
    pub fn add(&mut self, spans: Vec<Span>) {
        for span in spans {
            if self.spans.len() >= NODE_KEEP {
                self.spans.pop_front();
            }
            self.spans.push_back(span);
        }
    }

    /// The spans of `job` (all with `None`), oldest first.
    pub fn of(&self, job: Option<JobId>) -> Vec<Span> {
        self.spans
            .iter()
            .filter(|s| job.is_none_or(|j| s.job == j))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_taken_once_and_kept_by_job() {
        let job = JobId::random();
        let task = TaskId::random();
        let now = now_ns();
        record(
            Run {
                task,
                job,
                // Tasks' table may be full: the recorder's tests overflow it.
                work: Work::ActorCall,
                submitted_ns: now,
                received_ns: now + 10,
                started_ns: now + 20,
                ended_ns: now + 30,
            },
            &["spans_test_fn"],
            true,
        );
        let taken: Vec<Span> = take().into_iter().filter(|s| s.task == task).collect();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].name, "spans_test_fn");
        assert_eq!(taken[0].ended_ns, now + 30);
        assert!(!take().iter().any(|s| s.task == task), "taken twice");

        // Past PER_REPORT runs before a report, runs are counted, not kept.
        let before = dropped();
        let run = Run {
            task,
            job,
            work: Work::ActorCall,
            submitted_ns: now,
            received_ns: now,
            started_ns: now,
            ended_ns: now,
        };
        for _ in 0..PER_REPORT + 100 {
            record(run, &["spans_test_fn"], true);
        }
        assert!(dropped() >= before + 100, "runs past the bound are counted");
        let kept = take();
        assert!(kept.len() <= PER_REPORT, "{} spans kept", kept.len());
        record(run, &["spans_test_fn"], true);
        assert!(
            take().iter().any(|s| s.task == task),
            "a report starts afresh"
        );
        let mut log = SpanLog::default();
        log.add(taken);
        assert_eq!(log.of(Some(job)).len(), 1);
        assert!(log.of(Some(JobId::random())).is_empty());
        assert_eq!(log.of(None).len(), 1);
    }
}
