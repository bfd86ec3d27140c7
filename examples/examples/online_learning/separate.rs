//! `--mode separate`: the pipeline as separate systems run it, as a fair
//! baseline for the fused mode.
//!
//! Three OS processes, each a re-execution of this binary (see
//! [`role_main`]):
//!
//! * **stream** reads the input at the configured rate and sends rows to
//!   the trainer over one TCP connection: bincode-encoded batches of at
//!   most [`MAX_BATCH_ROWS`] rows, each length-prefixed. It never waits to
//!   fill a batch: it sends whatever the pacer allows now, so a throttled
//!   stream sends small batches and adds no batching delay.
//! * **trainer** runs the same FTRL [`Model`] as the fused mode,
//!   predict-then-train per row, and every `refresh_ms` publishes a delta
//!   file: the keys updated since the previous delta with their current
//!   weights, the model version (rows trained) and the `(rows_end,
//!   ingest_ns)` of the batches it includes. Files are written as
//!   `delta-<seq>.tmp` and renamed to `delta-<seq>.bin`, so a reader never
//!   sees a partial file.
//! * **server** polls the directory every `refresh_ms` for the next delta,
//!   applies it to its serving weights under a write lock (a query sees a
//!   whole version or none of it), and answers one query every
//!   millisecond, tagging the answer with the serving version. A batch's
//!   ingest-to-serving latency is the time of the first answer served by a
//!   version that includes it, minus its ingest time; the model lag of an
//!   answer is its time minus the ingest time of the newest batch its
//!   version includes.
//!
//! The processes report to the parent in JSON lines on stdout (a timeline
//! point about every 500 ms, a summary at the end) and log to stderr. Each
//! child dies with the parent (`PR_SET_PDEATHSIG`), and the parent kills
//! the children it spawned, by pid, when anything fails.

use crate::common::{
    self, BatchReader, Hyper, InputSpec, ModeReport, Pacer, TimelinePoint, MAX_BATCH_ROWS,
};
use anyhow::{anyhow, bail, ensure, Context as _};
use braid_actors::train::data::FeatureBatch;
use braid_actors::train::metrics::{LatencyHistogram, Progressive};
use braid_actors::train::model::LogisticLearner as Model;
use braid_actors::train::optimizer::{sigmoid, FtrlParams, OptimizerKind, BIAS_KEY};
use braid_actors::train::table::ParamTable;
use braid_store::codec;
use rustix::event::{PollFd, PollFlags, Timespec};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::io::{BufRead as _, BufReader, BufWriter, Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

/// First argument that makes the binary run one role of the separate mode.
const ROLE_FLAG: &str = "--separate-role";

/// Publish/poll intervals [`find_refresh`] tries, shortest first.
pub const REFRESH_CANDIDATES_MS: [u64; 5] = [10, 30, 100, 300, 1000];

/// [`find_refresh`] accepts an interval when the run achieved at least this
/// fraction of the offered rate.
pub const KEEP_UP_RATE_FRACTION: f64 = 0.95;

/// [`find_refresh`] accepts an interval when the p99 model lag is at most
/// this many intervals plus [`KEEP_UP_LAG_SLACK_MS`].
pub const KEEP_UP_LAG_INTERVALS: f64 = 3.0;

/// Fixed allowance of the lag bound: writing, reading and applying a
/// delta, and scheduling noise with three busy processes.
pub const KEEP_UP_LAG_SLACK_MS: f64 = 100.0;

const POINT_INTERVAL: Duration = crate::common::POINT_EVERY;
const QUERY_INTERVAL: Duration = Duration::from_millis(1);
/// Rows of the input the server cycles through as queries.
const SAMPLE_ROWS: usize = 1024;
/// The parent gives up when no child says anything for this long (the
/// trainer and the server report every [`POINT_INTERVAL`]).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_FRAME_BYTES: usize = 1 << 30;
/// Above this many feature bits the trainer tracks updated keys in a hash
/// set instead of a bitmap.
const MAX_BITMAP_BITS: u32 = 30;

/// Settings of one separate-mode run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeparateConfig {
    /// The input.
    pub input: InputSpec,
    /// Rows to read (`None`: see [`BatchReader::open`]).
    pub rows: Option<u64>,
    /// FTRL hyper-parameters and feature bits.
    pub hyper: Hyper,
    /// Rows per second the stream offers (`None`: as fast as it can).
    pub rate: Option<f64>,
    /// Interval at which the trainer publishes and the server polls, ms.
    pub refresh_ms: u64,
    /// When set, the trainer writes each row's prediction (`{:.6}`, one
    /// line per row, input order) to this file.
    pub predictions: Option<PathBuf>,
    /// Rows of the sliding window of the progressive metrics.
    pub window: usize,
    /// A fresh directory for the delta files.
    pub workdir: PathBuf,
    /// Keys the trainer's and the server's tables hold before they grow.
    pub capacity: usize,
}

/// What each role process gets, as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoleArgs {
    cfg: SeparateConfig,
    /// `common::now_ns()` when the parent started the run: `t_s` origin.
    start_ns: u64,
    /// The parent's pid: a child whose parent already died exits.
    parent_pid: u32,
    /// The trainer's port (stream only).
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Stream,
    Trainer,
    Server,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Stream => "stream",
            Role::Trainer => "trainer",
            Role::Server => "server",
        }
    }
}

/// A line a role process writes on stdout. Non-finite figures travel as
/// `None` (JSON has no NaN).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum ChildMsg {
    Ready {
        port: u16,
    },
    TrainerPoint {
        t_s: f64,
        rows: u64,
        events_per_s: f64,
        window_auc: Option<f64>,
        window_logloss: Option<f64>,
    },
    ServerPoint {
        t_s: f64,
        latency_ms_p99: Option<f64>,
        model_lag_ms: Option<f64>,
    },
    StreamDone(StreamDone),
    TrainerDone(TrainerDone),
    ServerDone(ServerDone),
}

/// The stream's summary.
#[derive(Debug, Serialize, Deserialize)]
struct StreamDone {
    rows: u64,
    skipped_lines: u64,
    cpu_seconds: f64,
    /// When the first row was read.
    first_ns: u64,
}

/// The trainer's summary.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerDone {
    rows: u64,
    logloss: Option<f64>,
    auc: Option<f64>,
    cpu_seconds: f64,
    deltas: u64,
    /// When the last row was trained.
    end_ns: u64,
}

/// The server's summary.
#[derive(Debug, Serialize, Deserialize)]
struct ServerDone {
    latency_ms_p50: Option<f64>,
    latency_ms_p99: Option<f64>,
    model_lag_ms_p99: Option<f64>,
    cpu_seconds: f64,
    answers: u64,
    deltas: u64,
}

/// Rows on the wire. Serialized from borrowed columns, deserialized owned.
#[derive(Debug, Serialize, Deserialize)]
struct WireBatch<'a> {
    first_row: u64,
    /// `common::now_ns()` when the batch's first row was read.
    ingest_ns: u64,
    labels: Cow<'a, [f32]>,
    offsets: Cow<'a, [u32]>,
    ids: Cow<'a, [u64]>,
    values: Option<Cow<'a, [f32]>>,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireMsg<'a> {
    Batch(WireBatch<'a>),
    End { rows: u64 },
}

/// One published model delta.
#[derive(Debug, Serialize, Deserialize)]
struct Delta {
    seq: u64,
    /// Rows trained when it was taken.
    version: u64,
    /// The trainer's last delta.
    last: bool,
    /// `(rows_end, ingest_ns)` of the batches trained since the previous
    /// delta, in order.
    batches: Vec<(u64, u64)>,
    keys: Vec<u64>,
    weights: Vec<f32>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn seconds_since(start_ns: u64, now_ns: u64) -> f64 {
    now_ns.saturating_sub(start_ns) as f64 / 1e9
}

fn emit(msg: &ChildMsg) -> anyhow::Result<()> {
    let line = serde_json::to_string(msg)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("cannot write to the parent")?;
    out.flush().context("cannot write to the parent")?;
    Ok(())
}

fn delta_path(dir: &Path, seq: u64, ext: &str) -> PathBuf {
    dir.join(format!("delta-{seq:08}.{ext}"))
}

/// Runs a separate-mode role when the binary was started as one
/// (`<exe> --separate-role <stream|trainer|server> <json>`): returns its
/// result, or `None` when the binary was started normally. Call it first
/// thing in `main`.
pub fn role_main() -> Option<anyhow::Result<()>> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(ROLE_FLAG) {
        return None;
    }
    let role = args.next();
    let json = args.next();
    Some(run_role(role, json))
}

fn run_role(role: Option<String>, json: Option<String>) -> anyhow::Result<()> {
    let role = role.context("missing role after --separate-role")?;
    let json = json.context("missing role configuration")?;
    let args: RoleArgs = serde_json::from_str(&json).context("bad role configuration")?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("cannot set the parent-death signal")?;
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    ensure!(
        u32::try_from(parent).ok() == Some(args.parent_pid),
        "the parent process is gone"
    );
    match role.as_str() {
        "stream" => stream_role(&args),
        "trainer" => trainer_role(&args),
        "server" => server_role(&args),
        other => bail!("unknown role {other:?}"),
    }
    .with_context(|| format!("separate {role}"))
}

// ---------------------------------------------------------------- stream

fn write_frame(
    out: &mut impl std::io::Write,
    msg: &WireMsg<'_>,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    buf.clear();
    codec::encode_append(msg, buf)?;
    let len = u32::try_from(buf.len()).context("frame too large")?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(buf)?;
    Ok(())
}

fn stream_role(args: &RoleArgs) -> anyhow::Result<()> {
    let cfg = &args.cfg;
    let mut reader = BatchReader::open(&cfg.input, cfg.rows, cfg.hyper.bits)?;
    let sock = TcpStream::connect((Ipv4Addr::LOCALHOST, args.port))
        .with_context(|| format!("cannot connect to the trainer on port {}", args.port))?;
    sock.set_nodelay(true)?;
    let mut out = BufWriter::with_capacity(1 << 20, sock);
    let mut batch = FeatureBatch::with_capacity(MAX_BATCH_ROWS, MAX_BATCH_ROWS * 40);
    let mut buf = Vec::new();
    let mut rows = 0u64;
    let mut batches = 0u64;
    let mut first_ns = None;
    let mut pacer = Pacer::new(cfg.rate);
    loop {
        let allowed = pacer.allowance(MAX_BATCH_ROWS);
        let ingest_ns = common::now_ns();
        batch.clear();
        let got = reader.read(&mut batch, allowed)?;
        if got == 0 {
            break;
        }
        pacer.sent(got);
        first_ns.get_or_insert(ingest_ns);
        let msg = WireMsg::Batch(WireBatch {
            first_row: rows,
            ingest_ns,
            labels: Cow::Borrowed(batch.labels()),
            offsets: Cow::Borrowed(batch.offsets()),
            ids: Cow::Borrowed(batch.ids()),
            values: batch.values().map(Cow::Borrowed),
        });
        write_frame(&mut out, &msg, &mut buf).context("cannot send to the trainer")?;
        out.flush().context("cannot send to the trainer")?;
        rows += got as u64;
        batches += 1;
    }
    write_frame(&mut out, &WireMsg::End { rows }, &mut buf)?;
    let sock = out
        .into_inner()
        .map_err(|e| anyhow!("cannot send to the trainer: {}", e.error()))?;
    sock.shutdown(Shutdown::Write)?;
    let cpu_seconds = common::self_cpu_seconds();
    eprintln!(
        "[separate/stream] sent {rows} rows in {batches} batches, {} lines skipped, {cpu_seconds:.2} CPU s",
        reader.skipped()
    );
    emit(&ChildMsg::StreamDone(StreamDone {
        rows,
        skipped_lines: reader.skipped(),
        cpu_seconds,
        first_ns: first_ns.unwrap_or_else(common::now_ns),
    }))
}

// --------------------------------------------------------------- trainer

/// Keys updated since the last delta: a bitmap over the hashed feature
/// space (one test-and-set per feature occurrence), a hash set for keys
/// outside it (the bias), and the keys in first-update order.
struct DirtyKeys {
    bitmap: Vec<u64>,
    limit: u64,
    others: HashSet<u64>,
    keys: Vec<u64>,
}

impl DirtyKeys {
    fn new(bits: u32) -> Self {
        let limit = if bits <= MAX_BITMAP_BITS {
            1u64 << bits
        } else {
            0
        };
        Self {
            bitmap: vec![0; limit.div_ceil(64) as usize],
            limit,
            others: HashSet::new(),
            keys: Vec::new(),
        }
    }

    #[inline]
    fn mark(&mut self, key: u64) {
        if key < self.limit {
            if let Some(word) = self.bitmap.get_mut((key >> 6) as usize) {
                let bit = 1u64 << (key & 63);
                if *word & bit == 0 {
                    *word |= bit;
                    self.keys.push(key);
                }
            }
        } else if self.others.insert(key) {
            self.keys.push(key);
        }
    }

    /// The keys marked since the last call, which unmarks them.
    fn take(&mut self) -> Vec<u64> {
        for &key in &self.keys {
            if key < self.limit {
                if let Some(word) = self.bitmap.get_mut((key >> 6) as usize) {
                    *word &= !(1u64 << (key & 63));
                }
            }
        }
        self.others.clear();
        std::mem::take(&mut self.keys)
    }
}

/// Reads one frame.
fn read_frame(
    conn: &mut BufReader<TcpStream>,
    buf: &mut Vec<u8>,
) -> anyhow::Result<WireMsg<'static>> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)
        .context("the stream connection ended before its end marker")?;
    let len = u32::from_le_bytes(len) as usize;
    ensure!(len <= MAX_FRAME_BYTES, "frame of {len} bytes");
    buf.resize(len, 0);
    conn.read_exact(buf).context("truncated frame")?;
    codec::decode(buf).context("bad frame")
}

/// Waits up to `timeout` for bytes (or the end) on the connection.
fn readable(sock: &TcpStream, timeout: Duration) -> anyhow::Result<bool> {
    let timeout = Timespec::try_from(timeout).context("poll timeout")?;
    let mut fds = [PollFd::new(sock, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e).context("poll"),
    }
}

struct Publisher {
    dir: PathBuf,
    seq: u64,
    buf: Vec<u8>,
}

impl Publisher {
    fn publish(
        &mut self,
        model: &Model,
        dirty: &mut DirtyKeys,
        batches: Vec<(u64, u64)>,
        version: u64,
        last: bool,
    ) -> anyhow::Result<()> {
        let keys = dirty.take();
        let weights = keys.iter().map(|&k| model.weight(k)).collect();
        let delta = Delta {
            seq: self.seq,
            version,
            last,
            batches,
            keys,
            weights,
        };
        self.buf.clear();
        codec::encode_append(&delta, &mut self.buf)?;
        let tmp = delta_path(&self.dir, self.seq, "tmp");
        let done = delta_path(&self.dir, self.seq, "bin");
        std::fs::write(&tmp, &self.buf)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &done)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), done.display()))?;
        self.seq += 1;
        Ok(())
    }
}

fn trainer_role(args: &RoleArgs) -> anyhow::Result<()> {
    let cfg = &args.cfg;
    let h = cfg.hyper;
    let mut model = Model::with_capacity(
        OptimizerKind::Ftrl(FtrlParams {
            alpha: h.alpha,
            beta: h.beta,
            l1: h.l1,
            l2: h.l2,
        }),
        cfg.capacity,
    )?;
    let mut metrics = Progressive::new(cfg.window);
    let mut scores: Vec<f32> = Vec::new();
    let mut predictions = match &cfg.predictions {
        Some(p) => Some(BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut dirty = DirtyKeys::new(h.bits);
    let mut publisher = Publisher {
        dir: cfg.workdir.clone(),
        seq: 0,
        buf: Vec::new(),
    };

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    emit(&ChildMsg::Ready {
        port: listener.local_addr()?.port(),
    })?;
    let (sock, _) = listener.accept().context("no connection from the stream")?;
    drop(listener);
    let mut conn = BufReader::with_capacity(1 << 20, sock);
    let mut frame = Vec::new();

    let refresh = Duration::from_millis(cfg.refresh_ms.max(1));
    let mut rows = 0u64;
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut next_publish = Instant::now() + refresh;
    let mut next_point = Instant::now() + POINT_INTERVAL;
    let mut point_rows = 0u64;
    let mut point_at = Instant::now();
    let point = |rows: u64, per_s: f64, metrics: &Progressive| {
        emit(&ChildMsg::TrainerPoint {
            t_s: seconds_since(args.start_ns, common::now_ns()),
            rows,
            events_per_s: per_s,
            window_auc: finite(metrics.window_auc()),
            window_logloss: finite(metrics.window_logloss()),
        })
    };
    let end_rows = loop {
        let ready = !conn.buffer().is_empty() || {
            let wait = next_publish
                .min(next_point)
                .saturating_duration_since(Instant::now());
            readable(conn.get_ref(), wait)?
        };
        let msg = if ready {
            Some(read_frame(&mut conn, &mut frame)?)
        } else {
            None
        };
        match msg {
            Some(WireMsg::Batch(wire)) => {
                ensure!(
                    wire.first_row == rows,
                    "batch starts at row {}, expected {rows}",
                    wire.first_row
                );
                let batch = FeatureBatch::from_parts(
                    wire.labels.into_owned(),
                    wire.offsets.into_owned(),
                    wire.ids.into_owned(),
                    wire.values.map(Cow::into_owned),
                )?;
                scores.clear();
                for (label, ids, values) in batch.iter() {
                    let p = model.learn(ids, values, label)?;
                    scores.push(p);
                    if let Some(w) = predictions.as_mut() {
                        writeln!(w, "{p:.6}")?;
                    }
                    for &id in ids {
                        dirty.mark(id);
                    }
                }
                metrics.record_all(batch.labels(), &scores);
                if let Some(bias) = model.bias_key() {
                    dirty.mark(bias);
                }
                rows += batch.rows() as u64;
                pending.push((rows, wire.ingest_ns));
            }
            Some(WireMsg::End { rows }) => break rows,
            None => {}
        }
        let now = Instant::now();
        if now >= next_publish {
            if !pending.is_empty() {
                publisher.publish(
                    &model,
                    &mut dirty,
                    std::mem::take(&mut pending),
                    rows,
                    false,
                )?;
            }
            while next_publish <= now {
                next_publish += refresh;
            }
        }
        if now >= next_point {
            let per_s = (rows - point_rows) as f64 / now.duration_since(point_at).as_secs_f64();
            point(rows, per_s, &metrics)?;
            (point_rows, point_at) = (rows, now);
            while next_point <= now {
                next_point += POINT_INTERVAL;
            }
        }
    };
    let end_ns = common::now_ns();
    ensure!(
        end_rows == rows,
        "the stream sent {end_rows} rows, the trainer got {rows}"
    );
    publisher.publish(&model, &mut dirty, pending, rows, true)?;
    if let Some(mut w) = predictions {
        w.flush()?;
    }
    let per_s = (rows - point_rows) as f64 / point_at.elapsed().as_secs_f64().max(1e-9);
    point(rows, per_s, &metrics)?;
    let cpu_seconds = common::self_cpu_seconds();
    eprintln!(
        "[separate/trainer] {rows} rows, {} deltas, logloss {:.4}, AUC {:.4}, {cpu_seconds:.2} CPU s",
        publisher.seq,
        metrics.logloss(),
        metrics.auc()
    );
    emit(&ChildMsg::TrainerDone(TrainerDone {
        rows,
        logloss: finite(metrics.logloss()),
        auc: finite(metrics.auc()),
        cpu_seconds,
        deltas: publisher.seq,
        end_ns,
    }))
}

// ---------------------------------------------------------------- server

/// The model the server answers with.
struct Serving {
    weights: ParamTable<f32>,
    /// Rows the trainer had trained when it published these weights.
    version: u64,
    /// Ingest time of the newest batch these weights include.
    newest_ingest_ns: u64,
}

/// A batch applied to the serving model whose latency is not known yet.
struct Unserved {
    rows_end: u64,
    ingest_ns: u64,
    rows: u64,
}

struct ServerShared {
    model: RwLock<Serving>,
    /// Pushed before the delta that includes them is applied, so a query
    /// that sees the new version always finds them.
    unserved: Mutex<VecDeque<Unserved>>,
    /// The version of the trainer's last delta once it is applied.
    final_version: AtomicU64,
}

fn serve(weights: &ParamTable<f32>, ids: &[u64], values: Option<&[f32]>) -> f32 {
    let w = |k: u64| weights.get(k).copied().unwrap_or(0.0);
    let mut logit = w(BIAS_KEY);
    match values {
        Some(values) => {
            for (&id, &x) in ids.iter().zip(values) {
                logit += w(id) * x;
            }
        }
        None => {
            for &id in ids {
                logit += w(id);
            }
        }
    }
    sigmoid(logit)
}

struct QueryStats {
    latency: LatencyHistogram,
    lag: LatencyHistogram,
    answers: u64,
}

/// Answers one query a millisecond until the final version has served
/// every batch.
fn query_loop(
    shared: &ServerShared,
    samples: &FeatureBatch,
    start_ns: u64,
) -> anyhow::Result<QueryStats> {
    let mut stats = QueryStats {
        latency: LatencyHistogram::new(),
        lag: LatencyHistogram::new(),
        answers: 0,
    };
    let mut window_latency = LatencyHistogram::new();
    let mut window_lag = LatencyHistogram::new();
    let mut next = Instant::now();
    let mut next_point = Instant::now() + POINT_INTERVAL;
    let mut sink = 0.0f32;
    loop {
        next += QUERY_INTERVAL;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
        let row = samples.row((stats.answers % samples.rows() as u64) as usize);
        let (version, newest_ns, p) = {
            let m = shared
                .model
                .read()
                .map_err(|_| anyhow!("serving model lock poisoned"))?;
            (
                m.version,
                m.newest_ingest_ns,
                serve(&m.weights, row.1, row.2),
            )
        };
        let t_ns = common::now_ns();
        sink += p;
        stats.answers += 1;
        if version > 0 {
            let lag = t_ns.saturating_sub(newest_ns) as f64 / 1e6;
            stats.lag.record_ms(lag);
            window_lag.record_ms(lag);
        }
        let drained = {
            let mut unserved = shared
                .unserved
                .lock()
                .map_err(|_| anyhow!("unserved queue poisoned"))?;
            while unserved.front().is_some_and(|b| b.rows_end <= version) {
                if let Some(b) = unserved.pop_front() {
                    let ms = t_ns.saturating_sub(b.ingest_ns) as f64 / 1e6;
                    for _ in 0..b.rows {
                        stats.latency.record_ms(ms);
                        window_latency.record_ms(ms);
                    }
                }
            }
            unserved.is_empty()
        };
        if Instant::now() >= next_point {
            emit(&ChildMsg::ServerPoint {
                t_s: seconds_since(start_ns, t_ns),
                latency_ms_p99: finite(window_latency.quantile(0.99)),
                model_lag_ms: finite(window_lag.quantile(0.99)),
            })?;
            window_latency = LatencyHistogram::new();
            window_lag = LatencyHistogram::new();
            while next_point <= Instant::now() {
                next_point += POINT_INTERVAL;
            }
        }
        if drained && version >= shared.final_version.load(Ordering::Acquire) {
            break;
        }
    }
    std::hint::black_box(sink);
    Ok(stats)
}

/// Applies the deltas in sequence as they appear; returns how many.
fn poll_loop(shared: &ServerShared, dir: &Path, refresh: Duration) -> anyhow::Result<u64> {
    let mut seq = 0u64;
    let mut prev_end = 0u64;
    let mut next = Instant::now();
    loop {
        loop {
            let path = delta_path(dir, seq, "bin");
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            let delta: Delta =
                codec::decode(&bytes).with_context(|| format!("bad delta {}", path.display()))?;
            ensure!(
                delta.seq == seq,
                "{} holds delta {}",
                path.display(),
                delta.seq
            );
            ensure!(
                delta.keys.len() == delta.weights.len(),
                "{}: keys and weights differ in length",
                path.display()
            );
            {
                let mut unserved = shared
                    .unserved
                    .lock()
                    .map_err(|_| anyhow!("unserved queue poisoned"))?;
                for &(rows_end, ingest_ns) in &delta.batches {
                    unserved.push_back(Unserved {
                        rows_end,
                        ingest_ns,
                        rows: rows_end.saturating_sub(prev_end),
                    });
                    prev_end = rows_end;
                }
            }
            {
                let mut m = shared
                    .model
                    .write()
                    .map_err(|_| anyhow!("serving model lock poisoned"))?;
                for (&k, &w) in delta.keys.iter().zip(&delta.weights) {
                    m.weights.insert(k, w);
                }
                m.version = delta.version;
                if let Some(&(_, ingest_ns)) = delta.batches.last() {
                    m.newest_ingest_ns = ingest_ns;
                }
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            seq += 1;
            if delta.last {
                shared.final_version.store(delta.version, Ordering::Release);
                return Ok(seq);
            }
        }
        next += refresh;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

fn server_role(args: &RoleArgs) -> anyhow::Result<()> {
    let cfg = &args.cfg;
    let mut samples = FeatureBatch::new();
    BatchReader::open(&cfg.input, cfg.rows, cfg.hyper.bits)?.read(&mut samples, SAMPLE_ROWS)?;
    ensure!(!samples.is_empty(), "the input has no rows to query with");
    let shared = Arc::new(ServerShared {
        model: RwLock::new(Serving {
            weights: ParamTable::with_capacity(cfg.capacity),
            version: 0,
            newest_ingest_ns: 0,
        }),
        unserved: Mutex::new(VecDeque::new()),
        final_version: AtomicU64::new(u64::MAX),
    });
    let query = {
        let shared = Arc::clone(&shared);
        let start_ns = args.start_ns;
        thread::Builder::new()
            .name("query".into())
            .spawn(move || query_loop(&shared, &samples, start_ns))?
    };
    emit(&ChildMsg::Ready { port: 0 })?;
    let deltas = poll_loop(
        &shared,
        &cfg.workdir,
        Duration::from_millis(cfg.refresh_ms.max(1)),
    )?;
    let stats = query
        .join()
        .map_err(|_| anyhow!("the query thread panicked"))??;
    let cpu_seconds = common::self_cpu_seconds();
    eprintln!(
        "[separate/server] {deltas} deltas, {} answers, latency p50 {:.2} ms p99 {:.2} ms, lag p99 {:.2} ms, {cpu_seconds:.2} CPU s",
        stats.answers,
        stats.latency.quantile(0.5),
        stats.latency.quantile(0.99),
        stats.lag.quantile(0.99)
    );
    emit(&ChildMsg::ServerDone(ServerDone {
        latency_ms_p50: finite(stats.latency.quantile(0.5)),
        latency_ms_p99: finite(stats.latency.quantile(0.99)),
        model_lag_ms_p99: finite(stats.lag.quantile(0.99)),
        cpu_seconds,
        answers: stats.answers,
        deltas,
    }))
}

// ---------------------------------------------------------------- parent

/// The role processes of one run. Dropping it kills (by pid) and reaps
/// every child not waited for yet.
#[derive(Default)]
struct Procs {
    children: Vec<(Role, Child)>,
}

type LineEvent = (Role, Option<String>);

impl Procs {
    fn spawn(
        &mut self,
        exe: &Path,
        role: Role,
        args: &RoleArgs,
        tx: &Sender<LineEvent>,
    ) -> anyhow::Result<()> {
        let json = serde_json::to_string(args)?;
        let mut child = Command::new(exe)
            .arg(ROLE_FLAG)
            .arg(role.name())
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {} process", role.name()))?;
        let stdout = child.stdout.take();
        self.children.push((role, child));
        let stdout = stdout.context("no stdout pipe")?;
        let tx = tx.clone();
        thread::Builder::new()
            .name(format!("{}-out", role.name()))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((role, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((role, None));
            })?;
        Ok(())
    }

    fn wait(&mut self, role: Role) -> anyhow::Result<ExitStatus> {
        let i = self
            .children
            .iter()
            .position(|(r, _)| *r == role)
            .with_context(|| format!("no {} process", role.name()))?;
        let (_, mut child) = self.children.swap_remove(i);
        Ok(child.wait()?)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the parent collects from the role processes.
#[derive(Default)]
struct Collected {
    port: Option<u16>,
    server_ready: bool,
    timeline: Vec<TimelinePoint>,
    last_latency_p99: Option<f64>,
    last_lag: Option<f64>,
    stream: Option<StreamDone>,
    trainer: Option<TrainerDone>,
    server: Option<ServerDone>,
    exited: Vec<Role>,
}

impl Collected {
    fn handle(
        &mut self,
        procs: &mut Procs,
        (role, line): LineEvent,
        progress: &mut dyn FnMut(&TimelinePoint),
    ) -> anyhow::Result<()> {
        let Some(line) = line else {
            let status = procs.wait(role)?;
            ensure!(
                status.success(),
                "the {} process failed ({status})",
                role.name()
            );
            self.exited.push(role);
            return Ok(());
        };
        let msg: ChildMsg = serde_json::from_str(&line)
            .with_context(|| format!("unexpected output from the {}: {line}", role.name()))?;
        match msg {
            ChildMsg::Ready { port } if role == Role::Trainer => self.port = Some(port),
            ChildMsg::Ready { .. } => self.server_ready = true,
            ChildMsg::TrainerPoint {
                t_s,
                rows,
                events_per_s,
                window_auc,
                window_logloss,
            } => {
                let p = TimelinePoint {
                    t_s,
                    rows,
                    events_per_s,
                    window_auc: window_auc.unwrap_or(f64::NAN),
                    window_logloss: window_logloss.unwrap_or(f64::NAN),
                    latency_ms_p99: self.last_latency_p99.unwrap_or(f64::NAN),
                    model_lag_ms: self.last_lag.unwrap_or(f64::NAN),
                };
                progress(&p);
                self.timeline.push(p);
            }
            ChildMsg::ServerPoint {
                latency_ms_p99,
                model_lag_ms,
                ..
            } => {
                self.last_latency_p99 = latency_ms_p99;
                self.last_lag = model_lag_ms;
            }
            ChildMsg::StreamDone(done) => self.stream = Some(done),
            ChildMsg::TrainerDone(done) => self.trainer = Some(done),
            ChildMsg::ServerDone(done) => self.server = Some(done),
        }
        Ok(())
    }

    fn next(
        &mut self,
        rx: &Receiver<LineEvent>,
        procs: &mut Procs,
        progress: &mut dyn FnMut(&TimelinePoint),
    ) -> anyhow::Result<()> {
        let event = match rx.recv_timeout(STALL_TIMEOUT) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => bail!(
                "the separate-mode processes said nothing for {} s",
                STALL_TIMEOUT.as_secs()
            ),
            Err(RecvTimeoutError::Disconnected) => bail!("lost the separate-mode processes"),
        };
        self.handle(procs, event, progress)
    }
}

/// A run's report plus what [`find_refresh`] judges it by.
struct Outcome {
    report: ModeReport,
    /// Rows over the time from the stream's first row to the trainer's
    /// last: the rate the pipeline sustained, start-up excluded.
    sustained_per_s: f64,
}

fn clear_deltas(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("delta-"));
        if stale {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn run(cfg: &SeparateConfig, progress: &mut dyn FnMut(&TimelinePoint)) -> anyhow::Result<Outcome> {
    clear_deltas(&cfg.workdir)?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let cpu_before = common::children_cpu_seconds();
    let start = Instant::now();
    let mut args = RoleArgs {
        cfg: cfg.clone(),
        start_ns: common::now_ns(),
        parent_pid: std::process::id(),
        port: 0,
    };
    let (tx, rx) = mpsc::channel();
    let mut procs = Procs::default();
    let mut got = Collected::default();

    procs.spawn(&exe, Role::Trainer, &args, &tx)?;
    args.port = loop {
        if let Some(port) = got.port {
            break port;
        }
        got.next(&rx, &mut procs, progress)?;
        ensure!(got.exited.is_empty(), "the trainer exited before listening");
    };
    procs.spawn(&exe, Role::Server, &args, &tx)?;
    while !got.server_ready {
        got.next(&rx, &mut procs, progress)?;
        ensure!(got.exited.is_empty(), "a process exited during start-up");
    }
    procs.spawn(&exe, Role::Stream, &args, &tx)?;
    drop(tx);
    while got.exited.len() < 3 {
        got.next(&rx, &mut procs, progress)?;
    }
    let seconds = start.elapsed().as_secs_f64();

    let stream = got.stream.context("the stream sent no summary")?;
    let trainer = got.trainer.context("the trainer sent no summary")?;
    let server = got.server.context("the server sent no summary")?;
    let rows = stream.rows;
    ensure!(
        rows == trainer.rows,
        "the stream sent {rows} rows, the trainer trained {}",
        trainer.rows
    );
    let reported = stream.cpu_seconds + trainer.cpu_seconds + server.cpu_seconds;
    let waited = common::children_cpu_seconds() - cpu_before;
    let cpu = if waited > 0.0 { waited } else { reported };
    eprintln!(
        "[separate] refresh {} ms: {rows} rows in {seconds:.2} s; CPU s stream {:.2} trainer {:.2} server {:.2} (all children {waited:.2})",
        cfg.refresh_ms, stream.cpu_seconds, trainer.cpu_seconds, server.cpu_seconds
    );
    let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
    let report = ModeReport {
        rows,
        seconds,
        events_per_s: rows as f64 / seconds,
        logloss: nan(trainer.logloss),
        auc: nan(trainer.auc),
        latency_ms_p50: nan(server.latency_ms_p50),
        latency_ms_p99: nan(server.latency_ms_p99),
        model_lag_ms_p99: nan(server.model_lag_ms_p99),
        cpu_seconds_per_million: if rows > 0 {
            cpu / (rows as f64 / 1e6)
        } else {
            f64::NAN
        },
        skipped_lines: stream.skipped_lines,
        timeline: got.timeline,
        edges: Vec::new(),
    };
    Ok(Outcome {
        report,
        sustained_per_s: rows as f64 / seconds_since(stream.first_ns, trainer.end_ns).max(1e-9),
    })
}

/// Runs the separate-systems pipeline once: spawns the stream, trainer
/// and server processes, calls `progress` with each timeline point as it
/// arrives (about every 500 ms), waits for all three and reports. On any
/// failure the processes still running are killed before returning.
///
/// `seconds` runs from the first spawn until all three have exited; CPU
/// seconds count all three processes.
/// Also returns the rate the run sustained, start-up excluded (rows over
/// the time from the stream's first row to the trainer's last).
pub fn run_separate(
    cfg: &SeparateConfig,
    progress: &mut dyn FnMut(&TimelinePoint),
) -> anyhow::Result<(ModeReport, f64)> {
    let out = run(cfg, progress)?;
    Ok((out.report, out.sustained_per_s))
}

/// Whether a run at `refresh_ms` kept up with the offered `rate`: it
/// sustained at least [`KEEP_UP_RATE_FRACTION`] of the rate (rows over the
/// time from the stream's first row to the trainer's last, so start-up
/// does not count against it), and its p99 model lag stayed within
/// [`KEEP_UP_LAG_INTERVALS`] intervals plus [`KEEP_UP_LAG_SLACK_MS`]. With
/// publishing and polling keeping pace, the lag is at most about two
/// intervals (one until the delta is published, one until it is polled)
/// plus the time to write, read and apply it; a lag beyond that bound
/// means deltas queue up.
pub fn keeps_up(refresh_ms: u64, rate: f64, sustained_per_s: f64, model_lag_ms_p99: f64) -> bool {
    sustained_per_s >= KEEP_UP_RATE_FRACTION * rate
        && model_lag_ms_p99 <= KEEP_UP_LAG_INTERVALS * refresh_ms as f64 + KEEP_UP_LAG_SLACK_MS
}

/// Finds the shortest publish/poll interval of [`REFRESH_CANDIDATES_MS`]
/// at which the separate mode keeps up with `rate` rows per second (see
/// [`keeps_up`]), trying them shortest first; returns it with its run's
/// report, or the longest interval and its report when none keeps up.
/// Each try runs in its own subdirectory of `cfg_base.workdir`.
pub fn find_refresh(
    cfg_base: &SeparateConfig,
    rate: f64,
    progress: &mut dyn FnMut(&TimelinePoint),
) -> anyhow::Result<(u64, ModeReport)> {
    let mut last = None;
    for ms in REFRESH_CANDIDATES_MS {
        let cfg = SeparateConfig {
            rate: Some(rate),
            refresh_ms: ms,
            workdir: cfg_base.workdir.join(format!("refresh-{ms}ms")),
            ..cfg_base.clone()
        };
        let out = run(&cfg, progress)?;
        let ok = keeps_up(ms, rate, out.sustained_per_s, out.report.model_lag_ms_p99);
        eprintln!(
            "[separate] refresh {ms} ms at {rate:.0} rows/s: sustained {:.0} rows/s, lag p99 {:.1} ms: {}",
            out.sustained_per_s,
            out.report.model_lag_ms_p99,
            if ok { "keeps up" } else { "falls behind" }
        );
        if ok {
            return Ok((ms, out.report));
        }
        last = Some((ms, out.report));
    }
    last.context("no refresh interval to try")
}
