//! `braid timeline`: the Chrome trace of the tasks and actor calls the
//! cluster ran (the head gathers their spans from every node), written to
//! a file for chrome://tracing or Perfetto.

use crate::cli::{usage_error, TimelineArgs};
use crate::client;
use anyhow::Context;
use std::time::{Duration, Instant};

/// How long the head may take to gather and convert the spans.
const GATHER: Duration = Duration::from_secs(120);

/// Runs `braid timeline`.
pub fn run(args: TimelineArgs) -> anyhow::Result<()> {
    let path = match &args.job {
        Some(job) if job.parse::<braid::ids::JobId>().is_err() => {
            return Err(usage_error("timeline", format!("--job {job:?} is not a job id")).into())
        }
        Some(job) => format!("/api/timeline?job={job}"),
        None => "/api/timeline".to_string(),
    };
    let started = Instant::now();
    let connected = client::connect_to("timeline", args.cluster.address, args.cluster.token)?;
    let trace = connected.get_api(&path, GATHER)?;
    let events = trace.matches("\"ph\":\"X\"").count();
    std::fs::write(&args.output, &trace)
        .with_context(|| format!("write {}", args.output.display()))?;
    println!(
        "Wrote {} ({} events, {} bytes) in {:.2} s; open it in chrome://tracing or https://ui.perfetto.dev",
        args.output.display(),
        events,
        trace.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
