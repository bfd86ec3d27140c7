//! The cluster's state as JSON: what `braid status --json` prints and the
//! dashboard's `/api/*` serve, one definition for both.

use crate::rpc::job_manager::Submission;
use crate::rpc::{
    ActorRecord, ClusterStatusRecord, JobRecord, NodeRecord, PlacementGroupRecord,
    PlacementStrategy,
};
use crate::telemetry::family::{Family, Value as Sample};
use axum::Json;
use serde_json::{json, Value};

/// The `/metrics` URL of an endpoint's `host:port` (none when empty).
pub fn metrics_url(address: &str) -> Option<String> {
    (!address.is_empty()).then(|| format!("http://{address}/metrics"))
}

/// `/api/nodes`: every node, live and dead.
pub fn nodes(status: &ClusterStatusRecord) -> Json<Value> {
    Json(Value::Array(status.nodes.iter().map(node_json).collect()))
}

/// `/api/actors`: every actor the head keeps.
pub fn actors(status: &ClusterStatusRecord) -> Json<Value> {
    Json(Value::Array(status.actors.iter().map(actor_json).collect()))
}

/// `/api/jobs`: every job.
pub fn jobs(status: &ClusterStatusRecord) -> Json<Value> {
    Json(Value::Array(status.jobs.iter().map(job_json).collect()))
}

/// `/api/placement_groups`: every created group.
pub fn placement_groups(status: &ClusterStatusRecord) -> Json<Value> {
    Json(Value::Array(
        status.placement_groups.iter().map(pg_json).collect(),
    ))
}

/// `/api/series`: one object per sample, `{node, name, kind, labels,
/// value}` (a histogram's value is `{count, sum}`).
pub fn series(by_node: Vec<(String, Vec<Family>)>) -> Json<Value> {
    let mut out = Vec::new();
    for (node, families) in by_node {
        for family in families {
            for (labels, value) in family.samples {
                let labels: serde_json::Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                let value = match value {
                    Sample::Number(v) => json!(v),
                    Sample::Histogram { sum, count, .. } => json!({"sum": sum, "count": count}),
                };
                out.push(json!({
                    "node": node,
                    "name": family.name,
                    "kind": format!("{:?}", family.kind),
                    "labels": labels,
                    "value": value,
                }));
            }
        }
    }
    Json(Value::Array(out))
}

/// The status as one JSON object (live nodes under `nodes`, dead ones
/// under `dead_nodes`).
pub fn to_json(address: &str, status: &ClusterStatusRecord, submitted: &[Submission]) -> Value {
    let (alive, dead): (Vec<&NodeRecord>, Vec<&NodeRecord>) =
        status.nodes.iter().partition(|n| n.alive);
    json!({
        "cluster_id": status.cluster_id,
        "address": address,
        "metrics": metrics_url(&status.metrics_address),
        "nodes": alive.iter().map(|n| node_json(n)).collect::<Vec<_>>(),
        "dead_nodes": dead.iter().map(|n| node_json(n)).collect::<Vec<_>>(),
        "actors": status.actors.iter().map(actor_json).collect::<Vec<_>>(),
        "placement_groups": status.placement_groups.iter().map(pg_json).collect::<Vec<_>>(),
        "jobs": status.jobs.iter().map(|j| job_json_with(j, submitted)).collect::<Vec<_>>(),
    })
}

/// A node as JSON.
pub fn node_json(n: &NodeRecord) -> Value {
    json!({
        "node_id": n.info.node_id.to_string(),
        "hostname": n.info.hostname,
        "pid": n.info.pid,
        "grpc_address": n.info.grpc_address,
        "metrics": metrics_url(&n.info.metrics_address),
        "is_head_node": n.info.is_head_node,
        "alive": n.alive,
        "resources_total": n.info.resources_total,
        "resources_available": n.resources_available,
        "store_used": n.store_used,
        "store_capacity": n.store_capacity,
        "num_workers": n.num_workers,
        "millis_since_heartbeat": u64::try_from(n.since_heartbeat.as_millis()).unwrap_or(u64::MAX),
    })
}

/// An actor as JSON (state, node, pid, restarts, death cause).
pub fn actor_json(a: &ActorRecord) -> Value {
    json!({
        "actor_id": a.spec.actor_id.to_string(),
        "job_id": a.spec.job_id.to_string(),
        "class": a.spec.class_name,
        "name": a.spec.name,
        "state": a.state.to_string(),
        "node_id": a.node_id.map(|n| n.to_string()),
        "worker_pid": a.worker_pid,
        "restarts": a.restarts,
        "detached": a.spec.detached,
        "death_cause": a.death_cause,
    })
}

/// A placement strategy's name, as Ray spells it.
pub fn strategy_name(s: PlacementStrategy) -> &'static str {
    match s {
        PlacementStrategy::Pack => "PACK",
        PlacementStrategy::Spread => "SPREAD",
        PlacementStrategy::StrictPack => "STRICT_PACK",
        PlacementStrategy::StrictSpread => "STRICT_SPREAD",
    }
}

/// A placement group as JSON.
pub fn pg_json(p: &PlacementGroupRecord) -> Value {
    json!({
        "pg_id": p.spec.pg_id.to_string(),
        "name": p.spec.name,
        "strategy": strategy_name(p.spec.strategy),
        "bundles": p.spec.bundles,
        "bundle_nodes": p.bundle_nodes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "job_id": p.spec.job_id.map(|j| j.to_string()),
        "created_ms": p.created_ms,
    })
}

/// A job as JSON, with what the head's job manager saw of its driver's
/// process if `braid job submit` started it: its final state
/// (`SUCCEEDED`, `FAILED`, `STOPPED`), exit code and command.
pub fn job_json_with(j: &JobRecord, submitted: &[Submission]) -> Value {
    let mut row = job_json(j);
    if let Some(s) = submitted.iter().find(|s| s.job_id == j.info.job_id) {
        if s.state.is_terminal() {
            row["state"] = json!(format!("{:?}", s.state).to_uppercase());
        }
        row["exit_code"] = json!(s.exit_code);
        row["entrypoint"] = json!(s.entrypoint.join(" "));
    }
    row
}

/// A job as JSON.
pub fn job_json(j: &JobRecord) -> Value {
    json!({
        "job_id": j.info.job_id.to_string(),
        "driver_pid": j.info.driver_pid,
        "driver_address": j.info.driver_address,
        "exe_path": j.info.exe_path.display().to_string(),
        "state": if j.finished { "FINISHED" } else { "RUNNING" },
        "finished": j.finished,
        "start_time_ms": j.start_time_ms,
        "end_time_ms": j.end_time_ms,
    })
}
