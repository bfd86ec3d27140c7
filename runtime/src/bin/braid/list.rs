//! `braid list`: the cluster's actors, tasks, objects, nodes, jobs or
//! placement groups, as a table or JSON, filtered by field (Ray's state
//! API). Actors, nodes, jobs and groups come from the head's tables
//! (dead actors as long as the head keeps them); tasks and objects from
//! every node, through the head's HTTP API.

use crate::cli::{ListArgs, ListKind};
use crate::client;
use crate::table::{bytes, short, table};
use braid::dashboard::api::{actor_json, job_json_with, node_json, pg_json};
use braid::telemetry::spans::Span;
use serde_json::{json, Value};
use std::time::Duration;

/// How long the head may take to gather tasks or objects.
const GATHER: Duration = Duration::from_secs(60);

/// Runs `braid list`.
pub fn run(args: ListArgs) -> anyhow::Result<()> {
    let connected = client::connect_to("list", args.cluster.address, args.cluster.token)?;
    let mut rows: Vec<Value> = match args.kind {
        ListKind::Actors => connected
            .cluster_status()?
            .actors
            .iter()
            .map(actor_json)
            .collect(),
        ListKind::Nodes => connected
            .cluster_status()?
            .nodes
            .iter()
            .map(node_json)
            .collect(),
        ListKind::Jobs => {
            // A submitted job's driver: its state and exit code as the head's
            // job manager saw its process end.
            let submitted = connected.submitted_jobs();
            connected
                .cluster_status()?
                .jobs
                .iter()
                .map(|j| job_json_with(j, &submitted))
                .collect()
        }
        ListKind::PlacementGroups => connected
            .cluster_status()?
            .placement_groups
            .iter()
            .map(pg_json)
            .collect(),
        ListKind::Tasks => {
            let spans: Vec<Span> = serde_json::from_str(&connected.get_api("/api/tasks", GATHER)?)?;
            spans.iter().map(task_json).collect()
        }
        ListKind::Objects => serde_json::from_str(
            &connected.get_api(&format!("/api/objects?limit={}", args.limit), GATHER)?,
        )?,
    };
    rows.retain(|row| {
        args.filters.iter().all(|(key, want)| {
            let have = match &row[key] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            have.eq_ignore_ascii_case(want)
        })
    });
    rows.truncate(args.limit);
    if args.json {
        println!("{}", Value::Array(rows));
    } else {
        print!("{}", render(args.kind, &rows));
    }
    Ok(())
}

/// A span as a listed task.
fn task_json(s: &Span) -> Value {
    let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    json!({
        "task_id": s.task.to_string(),
        "name": s.name,
        "type": match s.work {
            braid::telemetry::recorder::Work::Task => "TASK",
            braid::telemetry::recorder::Work::ActorCall => "ACTOR_CALL",
        },
        "job_id": s.job.to_string(),
        "pid": s.pid,
        "state": if s.ok { "FINISHED" } else { "FAILED" },
        "submitted_ms": s.submitted_ns / 1_000_000,
        "queue_ms": ms(s.received_ns, s.started_ns),
        "run_ms": ms(s.started_ns, s.ended_ns),
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn render(kind: ListKind, rows: &[Value]) -> String {
    let id = |v: &Value| short(&text(v));
    let (headers, cells): (&[&str], Vec<Vec<String>>) = match kind {
        ListKind::Actors => (
            &[
                "ACTOR",
                "CLASS",
                "NAME",
                "STATE",
                "NODE",
                "PID",
                "RESTARTS",
                "DEATH CAUSE",
            ],
            rows.iter()
                .map(|r| {
                    vec![
                        id(&r["actor_id"]),
                        text(&r["class"]),
                        text(&r["name"]),
                        text(&r["state"]),
                        id(&r["node_id"]),
                        text(&r["worker_pid"]),
                        text(&r["restarts"]),
                        text(&r["death_cause"]),
                    ]
                })
                .collect(),
        ),
        ListKind::Tasks => (
            &[
                "TASK", "TYPE", "NAME", "STATE", "JOB", "PID", "QUEUE MS", "RUN MS",
            ],
            rows.iter()
                .map(|r| {
                    vec![
                        id(&r["task_id"]),
                        text(&r["type"]),
                        text(&r["name"]),
                        text(&r["state"]),
                        id(&r["job_id"]),
                        text(&r["pid"]),
                        format!("{:.3}", r["queue_ms"].as_f64().unwrap_or(0.0)),
                        format!("{:.3}", r["run_ms"].as_f64().unwrap_or(0.0)),
                    ]
                })
                .collect(),
        ),
        ListKind::Objects => (
            &["OBJECT", "NODE", "STATE", "SIZE", "PINS"],
            rows.iter()
                .map(|r| {
                    vec![
                        text(&r["object_id"]),
                        id(&r["node_id"]),
                        text(&r["state"]),
                        bytes(r["size"].as_f64().unwrap_or(0.0)),
                        text(&r["pins"]),
                    ]
                })
                .collect(),
        ),
        ListKind::Nodes => (
            &["NODE", "HOST", "HEAD", "ALIVE", "PID", "WORKERS", "METRICS"],
            rows.iter()
                .map(|r| {
                    vec![
                        id(&r["node_id"]),
                        text(&r["hostname"]),
                        text(&r["is_head_node"]),
                        text(&r["alive"]),
                        text(&r["pid"]),
                        text(&r["num_workers"]),
                        text(&r["metrics"]),
                    ]
                })
                .collect(),
        ),
        ListKind::Jobs => (
            &["JOB", "STATE", "EXIT", "DRIVER PID", "START MS", "END MS"],
            rows.iter()
                .map(|r| {
                    vec![
                        id(&r["job_id"]),
                        text(&r["state"]),
                        text(&r["exit_code"]),
                        text(&r["driver_pid"]),
                        text(&r["start_time_ms"]),
                        text(&r["end_time_ms"]),
                    ]
                })
                .collect(),
        ),
        ListKind::PlacementGroups => (
            &["GROUP", "NAME", "STRATEGY", "BUNDLES", "JOB"],
            rows.iter()
                .map(|r| {
                    vec![
                        id(&r["pg_id"]),
                        text(&r["name"]),
                        text(&r["strategy"]),
                        r["bundles"].as_array().map_or(0, Vec::len).to_string(),
                        id(&r["job_id"]),
                    ]
                })
                .collect(),
        ),
    };
    format!("{} entries\n{}", cells.len(), table(headers, &cells))
}
