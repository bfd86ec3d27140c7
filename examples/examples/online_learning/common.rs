//! What both modes share: the input, the hyper-parameters, the pacing of
//! the source, the ingest-to-serving latency bookkeeping and the report.

use anyhow::Context as _;
use braid_actors::train::data::{
    CriteoConfig, CriteoParser, FeatureBatch, GenCtrParser, SyntheticConfig, SyntheticStream,
};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Rows the built-in stream has when `--rows` is not given.
pub const DEFAULT_SYNTHETIC_ROWS: u64 = 1_000_000;

/// Most rows one source batch holds (the separate mode's wire batches
/// hold at most this many too).
pub const MAX_BATCH_ROWS: usize = 4096;

/// Where the rows come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InputSpec {
    /// `label id id …` lines (`shared/data/gen_ctr.py`).
    GenCtr(PathBuf),
    /// Criteo display-advertising TSV.
    Criteo(PathBuf),
    /// The built-in drifting click stream.
    Synthetic {
        /// Its seed.
        seed: u64,
    },
}

/// The rows a run reads: `rows`, else the built-in stream's default, else
/// a file's size over the mean length of its first lines (0 if it cannot
/// be read; opening it later reports the error).
pub fn expected_rows(input: &InputSpec, rows: Option<u64>) -> u64 {
    if let Some(rows) = rows {
        return rows;
    }
    let path = match input {
        InputSpec::Synthetic { .. } => return DEFAULT_SYNTHETIC_ROWS,
        InputSpec::GenCtr(p) | InputSpec::Criteo(p) => p,
    };
    let Ok(mut f) = std::fs::File::open(path) else {
        return 0;
    };
    let size = f.metadata().map_or(0, |m| m.len());
    let mut head = vec![0u8; 1 << 16];
    let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
    let lines = head[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    if lines == 0 {
        return u64::from(size > 0);
    }
    size.div_ceil((n as u64 / lines).max(1))
}

/// FTRL hyper-parameters and the feature space.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Hyper {
    /// FTRL alpha.
    pub alpha: f32,
    /// FTRL beta.
    pub beta: f32,
    /// L1 strength.
    pub l1: f32,
    /// L2 strength.
    pub l2: f32,
    /// Feature ids are hashed into `2^bits` buckets.
    pub bits: u32,
}

/// Reads batches of rows from an [`InputSpec`], at most `rows` in all.
pub struct BatchReader {
    kind: ReaderKind,
    left: u64,
    skipped: u64,
}

enum ReaderKind {
    GenCtr(GenCtrParser, Box<dyn BufRead + Send>),
    Criteo(CriteoParser, Box<dyn BufRead + Send>),
    Synthetic(SyntheticStream),
}

impl BatchReader {
    /// Opens the input; `rows` caps how many rows it yields (`None`: the
    /// whole file, or [`DEFAULT_SYNTHETIC_ROWS`] of the built-in stream).
    pub fn open(input: &InputSpec, rows: Option<u64>, bits: u32) -> anyhow::Result<Self> {
        let open = |p: &PathBuf| -> anyhow::Result<Box<dyn BufRead + Send>> {
            let f =
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f)))
        };
        let (kind, left) = match input {
            InputSpec::GenCtr(p) => (
                ReaderKind::GenCtr(GenCtrParser::with_bits(bits)?, open(p)?),
                rows.unwrap_or(u64::MAX),
            ),
            InputSpec::Criteo(p) => {
                let config = CriteoConfig {
                    bits,
                    ..CriteoConfig::default()
                };
                (
                    ReaderKind::Criteo(CriteoParser::new(config)?, open(p)?),
                    rows.unwrap_or(u64::MAX),
                )
            }
            InputSpec::Synthetic { seed } => {
                let n = rows.unwrap_or(DEFAULT_SYNTHETIC_ROWS);
                let stream = SyntheticStream::new(SyntheticConfig {
                    rows: n,
                    bits,
                    seed: *seed,
                    ..SyntheticConfig::default()
                })?;
                (ReaderKind::Synthetic(stream), n)
            }
        };
        Ok(Self {
            kind,
            left,
            skipped: 0,
        })
    }

    /// Appends up to `max_rows` rows to `batch`; returns how many (0 at
    /// the end of the input).
    pub fn read(&mut self, batch: &mut FeatureBatch, max_rows: usize) -> anyhow::Result<usize> {
        let want = (max_rows as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let before = batch.rows();
        match &mut self.kind {
            ReaderKind::GenCtr(p, r) => {
                let stats = p.read_batch(r.as_mut(), batch, want)?;
                self.skipped = p.skipped();
                let _ = stats;
            }
            ReaderKind::Criteo(p, r) => {
                let stats = p.read_batch(r.as_mut(), batch, want)?;
                self.skipped = p.skipped();
                let _ = stats;
            }
            ReaderKind::Synthetic(s) => {
                s.fill(batch, want);
            }
        }
        let got = batch.rows() - before;
        self.left -= got as u64;
        Ok(got)
    }

    /// Malformed lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// Throttles a source to `rate` rows per second (no throttle if `None`).
pub struct Pacer {
    rate: Option<f64>,
    start: Instant,
    sent: u64,
}

impl Pacer {
    /// A pacer starting now.
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            rate: rate.filter(|r| *r > 0.0),
            start: Instant::now(),
            sent: 0,
        }
    }

    /// How many rows may be read now, at most `max` (at least 1: waits
    /// until one row is due).
    pub fn allowance(&mut self, max: usize) -> usize {
        let Some(rate) = self.rate else {
            return max;
        };
        loop {
            let due = (self.start.elapsed().as_secs_f64() * rate) as u64;
            if due > self.sent {
                return ((due - self.sent) as usize).min(max);
            }
            let wait = (self.sent + 1) as f64 / rate - self.start.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs_f64(wait.clamp(0.0, 0.005)));
        }
    }

    /// Records that `rows` were sent.
    pub fn sent(&mut self, rows: usize) {
        self.sent += rows as u64;
    }
}

pub use braid_actors::train::metrics::now_ns;

/// CPU seconds (user + system) of process `pid` and of its waited-for
/// children, from `/proc/<pid>/stat` (clock ticks are 1/100 s: Linux
/// fixes `USER_HZ` at 100 for user space).
pub fn cpu_seconds_of(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<f64> { Some(fields.get(i)?.parse::<f64>().ok()? / 100.0) };
    Some((tick(11)? + tick(12)?, tick(13)? + tick(14)?))
}

/// CPU seconds (user + system) this process has used.
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds_of(std::process::id()).map_or(0.0, |(own, _)| own)
}

/// The process ids of the embedded cluster's head and nodes: this
/// process's children (`braid::init` starts them from this binary; the
/// workers are the nodes' children).
pub fn cluster_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.get(stat.rfind(')')? + 2..)?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect()
}

/// CPU seconds the processes `pids` used so far.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&pid| cpu_seconds_of(pid))
        .map(|(own, _)| own)
        .sum()
}

/// CPU seconds (user + system) of this process's waited-for children.
pub fn children_cpu_seconds() -> f64 {
    cpu_seconds_of(std::process::id()).map_or(0.0, |(_, children)| children)
}

/// How often a run adds a point to its timeline: 125 points in the
/// default 25-second run.
pub const POINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// One point of the run's timeline (for the progress line and the plot).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Rows trained so far.
    pub rows: u64,
    /// Rows per second over the last interval.
    pub events_per_s: f64,
    /// AUC over the sliding window.
    pub window_auc: f64,
    /// Logloss over the sliding window.
    pub window_logloss: f64,
    /// p99 ingest-to-serving latency over the last interval, in ms.
    pub latency_ms_p99: f64,
    /// Model-version lag at serving, in ms.
    pub model_lag_ms: f64,
}

/// What one mode measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModeReport {
    /// Rows trained.
    pub rows: u64,
    /// Wall seconds of the whole run, start-up included.
    pub seconds: f64,
    /// `rows / seconds`.
    pub events_per_s: f64,
    /// Progressive logloss over the whole stream.
    pub logloss: f64,
    /// Progressive AUC over the whole stream.
    pub auc: f64,
    /// Median ingest-to-serving latency, ms.
    pub latency_ms_p50: f64,
    /// 99th percentile ingest-to-serving latency, ms.
    pub latency_ms_p99: f64,
    /// 99th percentile model-version lag at serving, ms.
    pub model_lag_ms_p99: f64,
    /// CPU seconds per million rows, every process of the mode counted.
    pub cpu_seconds_per_million: f64,
    /// Malformed input lines skipped.
    pub skipped_lines: u64,
    /// The timeline.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub timeline: Vec<TimelinePoint>,
    /// What crossed each edge of the mode's stream job: batches, bytes,
    /// and bytes encoded or copied on the way.
    #[serde(default)]
    pub edges: Vec<braid_actors::stream::edges::EdgeStats>,
}
