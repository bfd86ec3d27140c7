//! The node's HTTP API, behind the cluster token: `/metrics` (OpenMetrics
//! text of [`Node::families`]), and for the head, which gathers them
//! from every node: `/api/families` (the same as JSON), `/api/tasks?job=`
//! (the spans its processes ran), `/api/objects?limit=` (its store's
//! objects), `/api/workers?job=` (its workers, live and recent, with their
//! logs) and `/api/logs?pid=&offset=` (a worker's log, or without `pid`
//! the node daemon's own).

use super::Node;
use crate::rpc::job_manager::{LogChunk, LOG_CHUNK};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// Workers whose logs a node remembers after they exit.
pub(crate) const RECENT_WORKERS: usize = 10_000;

/// A worker process of the node and its log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerLog {
    /// Its pid.
    pub pid: u32,
    /// The job it ran for.
    pub job: crate::ids::JobId,
    /// Its log file (stdout and stderr).
    pub path: PathBuf,
    /// Whether it has exited.
    pub exited: bool,
}

/// The node's workers' logs, newest last.
#[derive(Debug, Default)]
pub(crate) struct WorkerLogs(VecDeque<WorkerLog>);

impl WorkerLogs {
    /// A worker started, logging to `path`.
    pub(crate) fn started(&mut self, pid: u32, job: crate::ids::JobId, path: PathBuf) {
        if self.0.len() >= RECENT_WORKERS {
            self.0.pop_front();
        }
        self.0.push_back(WorkerLog {
            pid,
            job,
            path,
            exited: false,
        });
    }

    /// Worker `pid` exited.
    pub(crate) fn exited(&mut self, pid: u32) {
        if let Some(w) = self.0.iter_mut().rev().find(|w| w.pid == pid) {
            w.exited = true;
        }
    }
}

type Shared = Arc<Mutex<Weak<Node>>>;

fn node_of(shared: &Shared) -> Option<Arc<Node>> {
    shared.lock().upgrade()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "node starting or stopping\n",
    )
        .into_response()
}

/// The node's HTTP routes, behind `token`; `node` is set once the node is
/// built.
pub(crate) fn router(token: &str, node: Shared) -> axum::Router {
    let scrape = node.clone();
    let api = axum::Router::new()
        .route("/api/families", get(families))
        .route("/api/tasks", get(tasks))
        .route("/api/objects", get(objects))
        .route("/api/workers", get(workers))
        .route("/api/logs", get(logs))
        .with_state(node);
    crate::telemetry::http::metrics_router(
        token,
        Arc::new(move || {
            let node = scrape.lock().upgrade();
            Box::pin(async move {
                let families = node.map(|n| n.families()).unwrap_or_default();
                crate::telemetry::family::render(families)
            })
        }),
    )
    .merge(crate::telemetry::http::protect(api, token))
}

async fn families(State(node): State<Shared>) -> Response {
    match node_of(&node) {
        Some(n) => Json(n.families()).into_response(),
        None => unavailable(),
    }
}

async fn tasks(State(node): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let job = q.get("job").and_then(|j| j.parse().ok());
    match node_of(&node) {
        Some(n) => Json(n.spans.lock().of(job)).into_response(),
        None => unavailable(),
    }
}

async fn objects(State(node): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
    match node_of(&node) {
        Some(n) => Json(n.store_handle.objects(limit)).into_response(),
        None => unavailable(),
    }
}

async fn workers(State(node): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let job: Option<crate::ids::JobId> = q.get("job").and_then(|j| j.parse().ok());
    match node_of(&node) {
        Some(n) => {
            let all: Vec<WorkerLog> = n
                .worker_logs
                .lock()
                .0
                .iter()
                .filter(|w| job.is_none_or(|j| w.job == j))
                .cloned()
                .collect();
            Json(all).into_response()
        }
        None => unavailable(),
    }
}

async fn logs(State(node): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(node) = node_of(&node) else {
        return unavailable();
    };
    let offset: u64 = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    let (path, finished) = match q.get("pid") {
        Some(pid) => {
            let pid: Option<u32> = pid.parse().ok();
            let found = node
                .worker_logs
                .lock()
                .0
                .iter()
                .rev()
                .find(|w| Some(w.pid) == pid)
                .map(|w| (w.path.clone(), w.exited));
            match found {
                Some(found) => found,
                None => {
                    return (StatusCode::NOT_FOUND, "no such worker on this node\n").into_response()
                }
            }
        }
        None => match &node.config.log_file {
            Some(path) => (path.clone(), false),
            None => return (StatusCode::NOT_FOUND, "this node logs to no file\n").into_response(),
        },
    };
    match read_chunk(&path, offset) {
        Ok((text, next, at_end)) => Json(LogChunk {
            text,
            next,
            finished: finished && at_end,
        })
        .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}\n", path.display()),
        )
            .into_response(),
    }
}

/// Up to [`LOG_CHUNK`] bytes of `path` from `offset`: the text, the next
/// offset, and whether that is the end of the file.
fn read_chunk(path: &Path, offset: u64) -> std::io::Result<(String, u64, bool)> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = offset.min(len);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(LOG_CHUNK).read_to_end(&mut bytes)?;
    let next = start + bytes.len() as u64;
    Ok((
        String::from_utf8_lossy(&bytes).into_owned(),
        next,
        next >= len,
    ))
}
