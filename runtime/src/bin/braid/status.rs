//! `braid status`: what the head knows, as tables or as one JSON object.

use crate::cli::StatusArgs;
use crate::client;
use crate::table::{bytes, short, table, utc};
use braid::dashboard::api::{job_json_with, metrics_url, strategy_name, to_json};
use braid::resources::{CPU, MEMORY};
use braid::rpc::job_manager::Submission;
use braid::rpc::{ClusterStatusRecord, ResourceMap};

/// Runs `braid status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let connected = client::connect_to("status", args.address, args.token)?;
    let address = connected.address().to_owned();
    let status = connected.cluster_status()?;
    let submitted = connected.submitted_jobs();
    if args.json {
        println!("{}", to_json(&address, &status, &submitted));
    } else {
        print!("{}", to_text(&address, &status, &submitted));
    }
    Ok(())
}

/// A resource amount for people: integers without decimals.
fn amount(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{n:.0}")
    } else {
        format!("{n:.2}")
    }
}

/// Used / total of one resource of a node.
fn used(total: &ResourceMap, available: &ResourceMap, name: &str) -> (f64, f64) {
    let t = total.get(name).copied().unwrap_or(0.0);
    let a = available.get(name).copied().unwrap_or(t);
    ((t - a).max(0.0), t)
}

/// The status as tables.
pub fn to_text(address: &str, status: &ClusterStatusRecord, submitted: &[Submission]) -> String {
    let live = status.nodes.iter().filter(|n| n.alive).count();
    let mut out = format!(
        "Cluster {} at {address}: {live} live node{}{}\n",
        short(&status.cluster_id),
        if live == 1 { "" } else { "s" },
        match status.nodes.len() - live {
            0 => String::new(),
            dead => format!(", {dead} dead"),
        }
    );
    if let Some(url) = metrics_url(&status.metrics_address) {
        out.push_str(&format!(
            "Metrics: {url} (head and its node; send Authorization: Bearer TOKEN)\n"
        ));
    }

    out.push_str("\nNodes\n");
    let rows: Vec<Vec<String>> = status
        .nodes
        .iter()
        .map(|n| {
            let total = &n.info.resources_total;
            let avail = &n.resources_available;
            let (cpu_used, cpu_total) = used(total, avail, CPU);
            let (mem_used, mem_total) = used(total, avail, MEMORY);
            let custom: Vec<String> = total
                .keys()
                .filter(|k| *k != CPU && *k != MEMORY)
                .map(|k| {
                    let (u, t) = used(total, avail, k);
                    format!("{k} {}/{}", amount(u), amount(t))
                })
                .collect();
            vec![
                short(&n.info.node_id.to_string()),
                n.info.hostname.clone(),
                if n.info.is_head_node { "yes" } else { "no" }.into(),
                format!("{}/{}", amount(cpu_used), amount(cpu_total)),
                format!("{}/{}", bytes(mem_used), bytes(mem_total)),
                if custom.is_empty() {
                    "-".into()
                } else {
                    custom.join(", ")
                },
                format!(
                    "{}/{}",
                    bytes(n.store_used as f64),
                    bytes(n.store_capacity as f64)
                ),
                n.num_workers.to_string(),
                if n.alive { "yes" } else { "no" }.into(),
                metrics_url(&n.info.metrics_address).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NODE", "HOST", "HEAD", "CPU", "MEMORY", "CUSTOM", "STORE", "WORKERS", "ALIVE",
            "METRICS",
        ],
        &rows,
    ));

    out.push_str(&format!("\nActors: {}\n", status.actors.len()));
    if !status.actors.is_empty() {
        let rows: Vec<Vec<String>> = status
            .actors
            .iter()
            .map(|a| {
                vec![
                    short(&a.spec.actor_id.to_string()),
                    a.spec.class_name.clone(),
                    a.spec.name.clone().unwrap_or_else(|| "-".into()),
                    a.state.to_string(),
                    a.node_id
                        .map(|n| short(&n.to_string()))
                        .unwrap_or_else(|| "-".into()),
                    a.restarts.to_string(),
                    if a.spec.detached { "yes" } else { "no" }.into(),
                    if a.death_cause.is_empty() {
                        "-".into()
                    } else {
                        a.death_cause.clone()
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ACTOR",
                "CLASS",
                "NAME",
                "STATE",
                "NODE",
                "RESTARTS",
                "DETACHED",
                "DEATH CAUSE",
            ],
            &rows,
        ));
    }

    out.push_str(&format!(
        "\nPlacement groups: {}\n",
        status.placement_groups.len()
    ));
    if !status.placement_groups.is_empty() {
        let rows: Vec<Vec<String>> = status
            .placement_groups
            .iter()
            .map(|p| {
                let mut nodes: Vec<String> = p
                    .bundle_nodes
                    .iter()
                    .map(|n| short(&n.to_string()))
                    .collect();
                nodes.dedup();
                vec![
                    short(&p.spec.pg_id.to_string()),
                    p.spec.name.clone().unwrap_or_else(|| "-".into()),
                    strategy_name(p.spec.strategy).into(),
                    p.spec.bundles.len().to_string(),
                    if nodes.is_empty() {
                        "-".into()
                    } else {
                        nodes.join(",")
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["GROUP", "NAME", "STRATEGY", "BUNDLES", "NODES"],
            &rows,
        ));
    }

    let running = status.jobs.iter().filter(|j| !j.finished).count();
    out.push_str(&format!(
        "\nJobs: {} ({running} running)\n",
        status.jobs.len()
    ));
    if !status.jobs.is_empty() {
        let rows: Vec<Vec<String>> = status
            .jobs
            .iter()
            .map(|j| {
                let row = job_json_with(j, submitted);
                vec![
                    short(&j.info.job_id.to_string()),
                    j.info.driver_pid.to_string(),
                    row["state"].as_str().unwrap_or("-").to_owned(),
                    row["exit_code"]
                        .as_i64()
                        .map_or_else(|| "-".into(), |c| c.to_string()),
                    utc(j.start_time_ms),
                    j.end_time_ms.map_or_else(|| "-".into(), utc),
                    j.info
                        .exe_path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| j.info.exe_path.display().to_string()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "JOB",
                "DRIVER PID",
                "STATE",
                "EXIT",
                "STARTED (UTC)",
                "ENDED (UTC)",
                "PROGRAM",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_amounts_read_well() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(2.0 * 1024.0 * 1024.0 * 1024.0), "2.0 GiB");
        assert_eq!(amount(2.0), "2");
        assert_eq!(amount(0.5), "0.50");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "  A    BB\n  xxx  y\n");
    }
}
