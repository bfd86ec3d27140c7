//! Progressive evaluation at the end of the stream: the workers'
//! predictions (made before training on each row) are put back in stream
//! order, scored (logloss and AUC over a sliding window and over the whole
//! stream) and optionally written out, one line per row.
//!
//! Other processes read the figures through the service the evaluation's
//! process offers ([`service_name`]); the final figures come back in the
//! job's report ([`final_figures`]).

use super::messages::Scored;
use super::metrics::{Progressive, ProgressiveSnapshot};
use crate::stream::operator::{
    decode_state, Collector, EventTime, Operator, OperatorError, Snapshot, StateError,
};
use crate::stream::{results, service};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

/// Figures of the evaluation so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalFigures {
    /// Rows scored.
    pub rows: u64,
    /// Logloss over every row.
    pub logloss: f64,
    /// AUC over every row.
    pub auc: f64,
    /// Logloss over the window.
    pub window_logloss: f64,
    /// AUC over the window.
    pub window_auc: f64,
    /// The largest staleness a worker's pull saw.
    pub max_staleness: u64,
}

/// Where the evaluation publishes its figures, and the predictions file
/// (kept across recoveries in one process: rows already written are not
/// written again; a job resumed in a new process cuts the file back to its
/// checkpoint's length, [`EvalHandle::resume_predictions`]).
pub struct EvalHandle {
    figures: Mutex<EvalFigures>,
    predictions: Mutex<Option<PredictionsFile>>,
}

struct PredictionsFile {
    out: std::io::BufWriter<std::fs::File>,
    /// Rows written.
    written: u64,
    /// Bytes written.
    bytes: u64,
    /// Opened by [`EvalHandle::resume_predictions`] and not restored yet.
    resumed: bool,
}

impl Default for EvalHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl EvalHandle {
    /// A handle with no figures yet and no predictions file.
    pub fn new() -> Self {
        EvalHandle {
            figures: Mutex::new(EvalFigures::default()),
            predictions: Mutex::new(None),
        }
    }

    /// Writes every row's prediction to `path` (created or truncated).
    pub fn write_predictions(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.open_predictions(std::fs::File::create(path)?, false);
        Ok(())
    }

    /// Goes on with the predictions file of a job that ran in a process
    /// that died: restoring the job's checkpoint cuts `path` back to the
    /// rows that checkpoint had written (each snapshot flushes the file),
    /// and the replay writes the rest. A job that restores no checkpoint
    /// starts the file over.
    pub fn resume_predictions(&self, path: &std::path::Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        self.open_predictions(file, true);
        Ok(())
    }

    fn open_predictions(&self, file: std::fs::File, resumed: bool) {
        *self.predictions.lock() = Some(PredictionsFile {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            written: 0,
            bytes: 0,
            resumed,
        });
    }

    /// Flushes the predictions file.
    pub fn flush(&self) -> std::io::Result<()> {
        match self.predictions.lock().as_mut() {
            Some(p) => p.out.flush(),
            None => Ok(()),
        }
    }

    /// The latest figures.
    pub fn figures(&self) -> EvalFigures {
        *self.figures.lock()
    }
}

/// How often the figures are recomputed for [`EvalHandle::figures`]
/// (AUC sums over every score bin).
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Scores the workers' predictions in stream order.
pub struct EvalSink {
    name: String,
    handle: Arc<EvalHandle>,
    progressive: Progressive,
    next_row: u64,
    waiting: BTreeMap<u64, Scored>,
    max_staleness: u64,
    line: String,
    published: std::time::Instant,
    /// When it last published its figures for `/metrics`, and its rows
    /// then.
    telemetry_at: Option<(std::time::Instant, u64)>,
}

#[derive(Serialize, Deserialize)]
struct EvalState {
    progressive: ProgressiveSnapshot,
    next_row: u64,
    waiting: Vec<Scored>,
    max_staleness: u64,
    /// Rows and bytes of the predictions file, flushed, if there is one.
    predictions: Option<(u64, u64)>,
}

/// The service name of job `name`'s evaluation figures (offered by the
/// process that hosts its [`EvalSink`], on task [`EVAL_TASK`]; any request
/// is answered with the encoded [`EvalFigures`]).
pub fn service_name(name: &str) -> String {
    format!("{name}/eval")
}

/// The task the evaluation runs as.
pub const EVAL_TASK: &str = "eval";

/// The result under which the final [`EvalFigures`] come back in the
/// job's report, after the job's name and a slash.
pub const EVAL_RESULT: &str = "eval";

/// The evaluation's final figures in a finished job's report.
pub fn final_figures(
    report: &crate::stream::coordinator::JobReport,
    name: &str,
) -> Option<Result<EvalFigures, results::ResultError>> {
    results::get(&report.results, &format!("{name}/{EVAL_RESULT}"))
}

struct FiguresService(Arc<EvalHandle>);

impl service::Service for FiguresService {
    fn call(&self, _request: &[u8]) -> Result<Vec<u8>, String> {
        braid::store::codec::encode(&self.0.figures()).map_err(|e| e.to_string())
    }
}

impl EvalSink {
    /// The evaluation of job `name`, with a sliding window of `window`
    /// rows, publishing to `handle`.
    pub fn new(name: &str, window: usize, handle: Arc<EvalHandle>) -> Self {
        let offered = handle.clone();
        service::offer_for_life(&service_name(name), || Arc::new(FiguresService(offered)));
        Self {
            name: name.to_string(),
            handle,
            progressive: Progressive::new(window.max(1)),
            next_row: 0,
            waiting: BTreeMap::new(),
            max_staleness: 0,
            line: String::new(),
            published: std::time::Instant::now(),
            telemetry_at: None,
        }
    }

    fn take(&mut self, scored: Scored) -> Result<(), OperatorError> {
        self.max_staleness = self.max_staleness.max(scored.staleness);
        let mut predictions = self.handle.predictions.lock();
        if let Some(file) = predictions.as_mut().filter(|f| f.resumed) {
            // Resumed with no checkpoint to restore: the run starts over.
            if file.out.get_mut().set_len(0).is_ok() {
                file.resumed = false;
            }
        }
        self.progressive
            .record_all(&scored.labels, &scored.predictions);
        if let Some(file) = predictions.as_mut() {
            let rows = scored.labels.len();
            for (i, &p) in scored.predictions.iter().take(rows).enumerate() {
                if scored.first_row + i as u64 == file.written {
                    use std::fmt::Write as _;
                    self.line.clear();
                    let _ = writeln!(self.line, "{p:.6}");
                    file.out
                        .write_all(self.line.as_bytes())
                        .map_err(|e| OperatorError::io("write the predictions file", e))?;
                    file.written += 1;
                    file.bytes += self.line.len() as u64;
                }
            }
        }
        self.next_row = scored.first_row + scored.labels.len() as u64;
        Ok(())
    }

    fn publish(&mut self) {
        self.published = std::time::Instant::now();
        let figures = EvalFigures {
            rows: self.progressive.rows(),
            logloss: self.progressive.logloss(),
            auc: self.progressive.auc(),
            window_logloss: self.progressive.window_logloss(),
            window_auc: self.progressive.window_auc(),
            max_staleness: self.max_staleness,
        };
        *self.handle.figures.lock() = figures;
        if self
            .telemetry_at
            .is_none_or(|(at, _)| at.elapsed() >= super::serving::PUBLISH_EVERY)
        {
            let now = std::time::Instant::now();
            let per_second = self.telemetry_at.map(|(at, rows)| {
                figures.rows.saturating_sub(rows) as f64
                    / now.duration_since(at).as_secs_f64().max(1e-3)
            });
            self.telemetry_at = Some((now, figures.rows));
            publish_figures(&self.name, &figures, per_second);
        }
    }
}

impl Operator for EvalSink {
    type In = Scored;
    type Out = ();

    fn process(
        &mut self,
        scored: Scored,
        _time: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        self.waiting.insert(scored.first_row, scored);
        while let Some(next) = self.waiting.remove(&self.next_row) {
            self.take(next)?;
        }
        if self.published.elapsed() >= PUBLISH_EVERY {
            self.publish();
        }
        Ok(())
    }

    fn on_end(&mut self, _out: &mut dyn Collector<()>) -> Result<(), OperatorError> {
        let rest: Vec<Scored> = std::mem::take(&mut self.waiting).into_values().collect();
        for s in rest {
            self.take(s)?;
        }
        self.publish();
        results::set(
            &format!("{}/{EVAL_RESULT}", self.name),
            &self.handle.figures(),
        )
        .map_err(|e| OperatorError::Failed(e.to_string()))?;
        self.handle
            .flush()
            .map_err(|e| OperatorError::io("flush the predictions file", e))
    }

    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        let predictions = match self.handle.predictions.lock().as_mut() {
            Some(file) => {
                file.out
                    .flush()
                    .map_err(|e| OperatorError::io("flush the predictions file", e))?;
                Some((file.written, file.bytes))
            }
            None => None,
        };
        Ok(Snapshot::of(EvalState {
            progressive: self.progressive.snapshot(),
            next_row: self.next_row,
            waiting: self.waiting.values().cloned().collect(),
            max_staleness: self.max_staleness,
            predictions,
        }))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let state: EvalState = decode_state(bytes)?;
        self.progressive = Progressive::restore(&state.progressive)
            .map_err(|e| StateError::Decode(e.to_string()))?;
        self.next_row = state.next_row;
        self.waiting = state
            .waiting
            .into_iter()
            .map(|s| (s.first_row, s))
            .collect();
        self.max_staleness = state.max_staleness;
        if let Some(file) = self.handle.predictions.lock().as_mut() {
            if file.resumed {
                let (rows, bytes) = state.predictions.unwrap_or((0, 0));
                let cut = file
                    .out
                    .get_mut()
                    .set_len(bytes)
                    .and_then(|()| file.out.seek(SeekFrom::Start(bytes)));
                cut.map_err(|e| OperatorError::io("cut the predictions file back", e))?;
                file.written = rows;
                file.bytes = bytes;
                file.resumed = false;
            }
        }
        self.publish();
        Ok(())
    }
}

/// Publishes job `job`'s evaluation figures for `/metrics`: rows scored,
/// and logloss and AUC over the window and over every row.
fn publish_figures(job: &str, figures: &EvalFigures, rows_per_second: Option<f64>) {
    use braid::telemetry::{Family, Kind};
    let labels = [("job", job)];
    let gauge = |name: &str, help: &str, v: f64| {
        Family::new(name, help, Kind::Gauge).with(&labels, if v.is_finite() { v } else { 0.0 })
    };
    let mut families = vec![
        Family::new(
            "braid_learning_rows",
            "Rows scored before training",
            Kind::Counter,
        )
        .with(&labels, figures.rows as f64),
        gauge(
            "braid_learning_logloss",
            "Progressive logloss over the window",
            figures.window_logloss,
        ),
        gauge(
            "braid_learning_auc",
            "Progressive AUC over the window",
            figures.window_auc,
        ),
        gauge(
            "braid_learning_progressive_logloss",
            "Progressive logloss over every row",
            figures.logloss,
        ),
        gauge(
            "braid_learning_progressive_auc",
            "Progressive AUC over every row",
            figures.auc,
        ),
    ];
    if let Some(rate) = rows_per_second {
        families.push(gauge(
            "braid_learning_rows_per_second",
            "Rows scored per second since the last publish",
            rate,
        ));
    }
    braid::telemetry::publish(&format!("learning/eval/{job}"), families);
}
