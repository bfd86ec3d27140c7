//! `braid logs`: the log of an actor's worker, of the worker that ran a
//! task, of a node daemon, or of a job (a submitted job's output, else its
//! workers' logs), read through the head from the node that holds it;
//! `--follow` keeps printing until the process ends. Without a selector it
//! lists the logs there are.

use crate::cli::{usage_error, LogsArgs};
use crate::client::{self, Connected};
use crate::table::{short, table};
use braid::rpc::job_manager::LogChunk;
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

/// How long one request may take.
const REQUEST: Duration = Duration::from_secs(30);
/// How often `--follow` asks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// One log to print: the API path that serves it (without its offset).
struct Source {
    title: String,
    path: String,
}

/// Runs `braid logs`.
pub fn run(args: LogsArgs) -> anyhow::Result<()> {
    let connected = client::connect_to("logs", args.cluster.address, args.cluster.token)?;
    let sources = if let Some(actor) = &args.actor {
        vec![actor_log(&connected, actor)?]
    } else if let Some(task) = &args.task {
        vec![task_log(&connected, task)?]
    } else if let Some(node) = &args.node {
        vec![Source {
            title: format!("node {node}"),
            path: format!("/api/logs?node={node}"),
        }]
    } else if let Some(job) = &args.job {
        job_logs(&connected, job)?
    } else {
        return list(&connected);
    };
    let several = sources.len() > 1;
    let mut offsets = vec![0u64; sources.len()];
    let mut done = vec![false; sources.len()];
    let mut out = std::io::stdout().lock();
    loop {
        let mut progressed = false;
        for (i, source) in sources.iter().enumerate() {
            if done[i] {
                continue;
            }
            let separator = if source.path.contains('?') { '&' } else { '?' };
            let chunk: LogChunk = serde_json::from_str(&connected.get_api(
                &format!("{}{separator}offset={}", source.path, offsets[i]),
                REQUEST,
            )?)?;
            if several && offsets[i] == 0 && !chunk.text.is_empty() {
                writeln!(out, "==> {} <==", source.title)?;
            }
            out.write_all(chunk.text.as_bytes())?;
            progressed |= chunk.next > offsets[i];
            offsets[i] = chunk.next;
            done[i] = chunk.finished || (!args.follow && chunk.text.is_empty());
        }
        out.flush()?;
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        if !progressed {
            if !args.follow {
                return Ok(());
            }
            std::thread::sleep(FOLLOW_EVERY);
        }
    }
}

fn worker_source(node: &str, pid: u64, title: String) -> Source {
    Source {
        title,
        path: format!("/api/logs?node={node}&pid={pid}"),
    }
}

fn actor_log(connected: &Connected, actor: &str) -> anyhow::Result<Source> {
    let status = connected.cluster_status()?;
    let found: Vec<_> = status
        .actors
        .iter()
        .filter(|a| {
            a.spec.actor_id.to_string().starts_with(actor) || a.spec.name.as_deref() == Some(actor)
        })
        .collect();
    let actor_record = match found.as_slice() {
        [one] => *one,
        [] => anyhow::bail!("no actor {actor:?}"),
        _ => {
            // A name may be reused by a dead actor and a live one: the live.
            found
                .iter()
                .copied()
                .find(|a| a.state != braid::rpc::ActorState::Dead)
                .ok_or_else(|| usage_error("logs", format!("several actors match {actor:?}")))?
        }
    };
    let node = actor_record
        .node_id
        .ok_or_else(|| anyhow::anyhow!("actor {actor:?} has no worker yet"))?;
    Ok(worker_source(
        &node.to_string(),
        u64::from(actor_record.worker_pid),
        format!("actor {actor}"),
    ))
}

/// The node holding worker `pid` of `job`, from the nodes' worker lists.
fn node_of_worker(connected: &Connected, job: &str, pid: u64) -> anyhow::Result<String> {
    let workers: Vec<Value> =
        serde_json::from_str(&connected.get_api(&format!("/api/workers?job={job}"), REQUEST)?)?;
    workers
        .iter()
        .find(|w| w["pid"].as_u64() == Some(pid))
        .and_then(|w| w["node_id"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no node knows worker {pid} any more"))
}

fn task_log(connected: &Connected, task: &str) -> anyhow::Result<Source> {
    let spans: Vec<braid::telemetry::spans::Span> =
        serde_json::from_str(&connected.get_api("/api/tasks", REQUEST)?)?;
    let span = spans
        .iter()
        .find(|s| s.task.to_string().starts_with(task))
        .ok_or_else(|| {
            anyhow::anyhow!("no task {task:?} has run (spans reach the nodes within a second)")
        })?;
    let pid = u64::from(span.pid);
    let node = node_of_worker(connected, &span.job.to_string(), pid)?;
    Ok(worker_source(
        &node,
        pid,
        format!("task {task} ({})", span.name),
    ))
}

fn job_logs(connected: &Connected, job: &str) -> anyhow::Result<Vec<Source>> {
    if job.parse::<braid::ids::JobId>().is_err() {
        return Err(usage_error("logs", format!("--job {job:?} is not a job id")).into());
    }
    if connected
        .get_api(&format!("/api/jobs/submitted/{job}"), REQUEST)
        .is_ok()
    {
        return Ok(vec![Source {
            title: format!("job {job}"),
            path: format!("/api/jobs/submitted/{job}/logs"),
        }]);
    }
    let workers: Vec<Value> =
        serde_json::from_str(&connected.get_api(&format!("/api/workers?job={job}"), REQUEST)?)?;
    if workers.is_empty() {
        anyhow::bail!("job {job} was not submitted and no node has a worker of it");
    }
    Ok(workers
        .iter()
        .filter_map(|w| {
            let node = w["node_id"].as_str()?;
            let pid = w["pid"].as_u64()?;
            Some(worker_source(
                node,
                pid,
                format!("worker {pid} on node {}", short(node)),
            ))
        })
        .collect())
}

fn list(connected: &Connected) -> anyhow::Result<()> {
    let status = connected.cluster_status()?;
    let workers: Vec<Value> = serde_json::from_str(&connected.get_api("/api/workers", REQUEST)?)?;
    let mut rows: Vec<Vec<String>> = status
        .nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| {
            vec![
                "node".into(),
                short(&n.info.node_id.to_string()),
                "-".into(),
                "-".into(),
                format!("braid logs --node {}", short(&n.info.node_id.to_string())),
            ]
        })
        .collect();
    rows.extend(workers.iter().map(|w| {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        vec![
            if w["exited"].as_bool().unwrap_or(false) {
                "worker (exited)".into()
            } else {
                "worker".into()
            },
            short(&text(&w["node_id"])),
            text(&w["pid"]),
            short(&text(&w["job_id"])),
            format!("braid logs --job {}", text(&w["job_id"])),
        ]
    }));
    print!(
        "{}",
        table(&["LOG", "NODE", "PID", "JOB", "READ IT WITH"], &rows)
    );
    Ok(())
}
