//! What a stream job's subtasks count for `/metrics`: records into and
//! out of each operator, the time each subtask's output spent waiting to
//! send (backpressure: a full channel's sender waits for credit), and its
//! input watermark. Counting is a relaxed atomic add on the subtask's own
//! thread (no lock, no allocation); a thread of the process publishes the
//! totals every second ([`braid::telemetry::publish`]), which its node
//! serves. The coordinator publishes each job's checkpoints, failures and
//! recoveries ([`publish_job`]).
//!
//! A subtask's meter is entered on the thread that builds or runs it
//! ([`enter`]); its operators and output take it from there.

use super::operator::EventTime;
use braid::telemetry::{Family, Kind};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a process publishes its subtasks' figures.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The source key this process's subtask figures are published under.
const SOURCE: &str = "stream/subtasks";

/// One subtask's figures.
#[derive(Debug)]
pub struct SubtaskMeter {
    /// The job's name.
    pub job: Arc<str>,
    /// The task (vertex) the subtask runs.
    pub task: String,
    /// The task's place in the job's plan (sources first).
    pub task_index: usize,
    /// Its index.
    pub subtask: usize,
    /// The attempt.
    pub generation: u64,
    blocked_ns: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    codec_bytes: AtomicU64,
    watermark: AtomicI64,
    operators: Mutex<Vec<Arc<OperatorMeter>>>,
    /// When the publisher last read it, and its blocked time then.
    last: Mutex<Option<(Instant, u64)>>,
}

impl SubtaskMeter {
    /// The subtask's output waited `elapsed` to send.
    pub fn blocked(&self, elapsed: Duration) {
        self.blocked_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The subtask received a batch of `bytes` (as it crossed its channel).
    pub fn received(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The subtask sent a batch of `bytes`.
    pub fn sent(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// `bytes` went through serde (encoding or decoding a batch).
    pub fn codec(&self, bytes: usize) {
        self.codec_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The subtask's input watermark advanced to `watermark`.
    pub fn watermark(&self, watermark: EventTime) {
        self.watermark.store(watermark, Ordering::Relaxed);
    }
}

/// One operator instance's records.
#[derive(Debug)]
pub struct OperatorMeter {
    name: String,
    records_in: AtomicU64,
    records_out: AtomicU64,
    /// Its records in and out when the publisher last read them.
    last: Mutex<(u64, u64)>,
}

impl OperatorMeter {
    /// A record went in.
    #[inline]
    pub fn record_in(&self) {
        self.records_in.fetch_add(1, Ordering::Relaxed);
    }

    /// The operator emitted a record.
    #[inline]
    pub fn record_out(&self) {
        self.records_out.fetch_add(1, Ordering::Relaxed);
    }

    /// The operator emitted `n` records.
    #[inline]
    pub fn records_out_n(&self, n: u64) {
        self.records_out.fetch_add(n, Ordering::Relaxed);
    }
}

static SUBTASKS: Mutex<Vec<Weak<SubtaskMeter>>> = Mutex::new(Vec::new());

thread_local! {
    static CURRENT: RefCell<Option<Arc<SubtaskMeter>>> = const { RefCell::new(None) };
}

/// Makes the meter of `job`'s subtask `subtask` of `task` (the plan's
/// task number `task_index`; attempt `generation`) this thread's, creating it unless it exists, and starts
/// the process's publisher.
pub fn enter(
    job: &str,
    (task, task_index): (&str, usize),
    subtask: usize,
    generation: u64,
) -> Arc<SubtaskMeter> {
    let meter = {
        let mut all = SUBTASKS.lock();
        all.retain(|m| m.strong_count() > 0);
        let found = all.iter().filter_map(Weak::upgrade).find(|m| {
            &*m.job == job && m.task == task && m.subtask == subtask && m.generation == generation
        });
        match found {
            Some(meter) => meter,
            None => {
                let meter = Arc::new(SubtaskMeter {
                    job: Arc::from(job),
                    task: task.to_string(),
                    task_index,
                    subtask,
                    generation,
                    blocked_ns: AtomicU64::new(0),
                    bytes_in: AtomicU64::new(0),
                    bytes_out: AtomicU64::new(0),
                    codec_bytes: AtomicU64::new(0),
                    watermark: AtomicI64::new(EventTime::MIN),
                    operators: Mutex::new(Vec::new()),
                    last: Mutex::new(None),
                });
                all.push(Arc::downgrade(&meter));
                meter
            }
        }
    };
    CURRENT.with(|c| *c.borrow_mut() = Some(meter.clone()));
    start_publisher();
    meter
}

/// This thread's subtask meter, if one was entered.
pub fn current() -> Option<Arc<SubtaskMeter>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// A meter for operator `name` of this thread's subtask (none outside a
/// subtask).
pub fn operator(name: &str) -> Option<Arc<OperatorMeter>> {
    let subtask = current()?;
    let meter = Arc::new(OperatorMeter {
        name: name.to_string(),
        records_in: AtomicU64::new(0),
        records_out: AtomicU64::new(0),
        last: Mutex::new((0, 0)),
    });
    subtask.operators.lock().push(meter.clone());
    Some(meter)
}

fn start_publisher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("braid-stream-metrics".into())
            .spawn(|| loop {
                std::thread::sleep(PUBLISH_EVERY);
                publish_subtasks();
            });
    });
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Publishes the live subtasks' figures (or withdraws them when none
/// lives).
pub fn publish_subtasks() {
    let live: Vec<Arc<SubtaskMeter>> = {
        let mut all = SUBTASKS.lock();
        all.retain(|m| m.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    if live.is_empty() {
        braid::telemetry::withdraw(SOURCE);
        return;
    }
    braid::telemetry::publish(SOURCE, families(&live));
}

fn families(live: &[Arc<SubtaskMeter>]) -> Vec<Family> {
    let mut records_in = Family::new(
        "braid_stream_records_in",
        "Records into an operator",
        Kind::Counter,
    );
    let mut records_out = Family::new(
        "braid_stream_records_out",
        "Records an operator emitted",
        Kind::Counter,
    );
    let mut blocked = Family::new(
        "braid_stream_backpressure_seconds",
        "Time a subtask's output waited to send (credit-based backpressure)",
        Kind::Counter,
    );
    let mut bytes = [
        Family::new(
            "braid_stream_bytes_in",
            "Bytes of batches a subtask received",
            Kind::Counter,
        ),
        Family::new(
            "braid_stream_bytes_out",
            "Bytes of batches a subtask sent",
            Kind::Counter,
        ),
        Family::new(
            "braid_stream_codec_bytes",
            "Bytes a subtask encoded or decoded with serde (0 on columnar and in-process edges)",
            Kind::Counter,
        ),
    ];
    let mut lag = Family::new(
        "braid_stream_watermark_lag_seconds",
        "Wall-clock time minus a subtask's input watermark",
        Kind::Gauge,
    );
    let mut in_rate = Family::new(
        "braid_stream_records_in_per_second",
        "Records into an operator per second, since the last publish",
        Kind::Gauge,
    );
    let mut out_rate = Family::new(
        "braid_stream_records_out_per_second",
        "Records an operator emitted per second, since the last publish",
        Kind::Gauge,
    );
    let mut blocked_share = Family::new(
        "braid_stream_backpressure_ratio",
        "Share of the time since the last publish a subtask's output waited to send",
        Kind::Gauge,
    );
    let mut order = Family::new(
        "braid_stream_task_index",
        "A task's place in its job's plan (sources first)",
        Kind::Gauge,
    );
    let now = now_ms();
    for meter in live {
        let subtask = meter.subtask.to_string();
        let base = [
            ("job", &*meter.job),
            ("task", meter.task.as_str()),
            ("subtask", subtask.as_str()),
        ];
        blocked.push(&base, meter.blocked_ns.load(Ordering::Relaxed) as f64 / 1e9);
        for (family, counter) in
            bytes
                .iter_mut()
                .zip([&meter.bytes_in, &meter.bytes_out, &meter.codec_bytes])
        {
            family.push(&base, counter.load(Ordering::Relaxed) as f64);
        }
        let blocked_ns = meter.blocked_ns.load(Ordering::Relaxed);
        let elapsed = {
            let mut last = meter.last.lock();
            let now = Instant::now();
            let since = last.map(|(at, before)| {
                let seconds = now.duration_since(at).as_secs_f64();
                (seconds, blocked_ns.saturating_sub(before))
            });
            *last = Some((now, blocked_ns));
            since
        };
        if let Some((seconds, blocked)) = elapsed.filter(|(s, _)| *s > 0.0) {
            blocked_share.push(&base, (blocked as f64 / 1e9 / seconds).min(1.0));
        }
        if meter.subtask == 0 {
            order.push(
                &[("job", &*meter.job), ("task", meter.task.as_str())],
                meter.task_index as f64,
            );
        }
        let watermark = meter.watermark.load(Ordering::Relaxed);
        if watermark > EventTime::MIN && watermark < EventTime::MAX {
            lag.push(&base, (now - watermark) as f64 / 1e3);
        }
        for op in meter.operators.lock().iter() {
            let labels = [
                ("job", &*meter.job),
                ("task", meter.task.as_str()),
                ("operator", op.name.as_str()),
                ("subtask", subtask.as_str()),
            ];
            let (now_in, now_out) = (
                op.records_in.load(Ordering::Relaxed),
                op.records_out.load(Ordering::Relaxed),
            );
            records_in.push(&labels, now_in as f64);
            records_out.push(&labels, now_out as f64);
            let mut last = op.last.lock();
            if let Some((seconds, _)) = elapsed.filter(|(s, _)| *s > 0.0) {
                in_rate.push(&labels, now_in.saturating_sub(last.0) as f64 / seconds);
                out_rate.push(&labels, now_out.saturating_sub(last.1) as f64 / seconds);
            }
            *last = (now_in, now_out);
        }
    }
    let [bytes_in, bytes_out, codec] = bytes;
    vec![
        records_in,
        records_out,
        bytes_in,
        bytes_out,
        codec,
        in_rate,
        out_rate,
        blocked,
        blocked_share,
        lag,
        order,
    ]
}

/// A job's checkpoint and failure figures, as its coordinator knows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFigures {
    /// Checkpoints completed.
    pub checkpoints: u64,
    /// The last completed checkpoint: epoch, duration from barrier to
    /// commit, total state bytes, and when it completed (Unix seconds).
    pub last: Option<(u64, Duration, u64, f64)>,
    /// Attempts that failed.
    pub failures: u32,
    /// Attempts that recovered.
    pub recoveries: u32,
}

/// Publishes job `job`'s figures (the coordinator calls it at each
/// checkpoint, failure and recovery).
pub fn publish_job(job: &str, figures: &JobFigures) {
    let labels = [("job", job)];
    let mut out = vec![
        Family::new(
            "braid_stream_checkpoints",
            "Checkpoints completed",
            Kind::Counter,
        )
        .with(&labels, figures.checkpoints as f64),
        Family::new(
            "braid_stream_failures",
            "Attempts of the job that failed",
            Kind::Counter,
        )
        .with(&labels, f64::from(figures.failures)),
        Family::new(
            "braid_stream_recoveries",
            "Attempts of the job that recovered from a checkpoint",
            Kind::Counter,
        )
        .with(&labels, f64::from(figures.recoveries)),
    ];
    if let Some((epoch, duration, bytes, at)) = figures.last {
        out.extend([
            Family::new(
                "braid_stream_checkpoint_last_id",
                "Epoch of the last completed checkpoint",
                Kind::Gauge,
            )
            .with(&labels, epoch as f64),
            Family::new(
                "braid_stream_checkpoint_last_duration_seconds",
                "Barrier to commit of the last completed checkpoint",
                Kind::Gauge,
            )
            .with(&labels, duration.as_secs_f64()),
            Family::new(
                "braid_stream_checkpoint_last_bytes",
                "State bytes of the last completed checkpoint",
                Kind::Gauge,
            )
            .with(&labels, bytes as f64),
            Family::new(
                "braid_stream_checkpoint_last_completed_seconds",
                "When the last checkpoint completed (Unix time)",
                Kind::Gauge,
            )
            .with(&labels, at),
        ]);
    }
    braid::telemetry::publish(&format!("stream/job/{job}"), out);
}

/// Takes job `job`'s figures back (it ended).
pub fn withdraw_job(job: &str) {
    braid::telemetry::withdraw(&format!("stream/job/{job}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_and_subtasks_are_counted_under_their_job() {
        let meter = enter("metrics-test-job", ("count", 0), 1, 1);
        let op = operator("count").expect("a subtask entered");
        for _ in 0..5 {
            op.record_in();
        }
        op.record_out();
        meter.blocked(Duration::from_millis(250));
        let again = enter("metrics-test-job", ("count", 0), 1, 1);
        assert!(Arc::ptr_eq(&meter, &again), "one meter per subtask");
        let families = families(std::slice::from_ref(&meter));
        let sample = |name: &str| {
            families
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.samples.first())
                .map(|(labels, v)| (labels.clone(), v.clone()))
        };
        let (labels, value) = sample("braid_stream_records_in").expect("records in");
        assert!(labels.contains(&("operator".into(), "count".into())));
        assert!(labels.contains(&("job".into(), "metrics-test-job".into())));
        assert_eq!(value, braid::telemetry::family::Value::Number(5.0));
        let (_, blocked) = sample("braid_stream_backpressure_seconds").expect("backpressure");
        assert_eq!(blocked, braid::telemetry::family::Value::Number(0.25));
    }
}
