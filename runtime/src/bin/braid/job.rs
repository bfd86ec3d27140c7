//! `braid job`: jobs the head runs (Ray Jobs). `submit` sends the command
//! to the head, which starts it beside its node with `BRAID_ADDRESS` set
//! and keeps its output; `list`, `status`, `logs [--follow]` and `stop`
//! ask the head about them, over its HTTP API.
//!
//! The job runs in its working directory when the head's machine has that
//! very directory. Otherwise `--working-dir` is packed and uploaded, as
//! Ray uploads a `working_dir`; without the flag the job runs in the
//! head's directory.

use crate::cli::{usage_error, JobCommand, JobIdArgs, JobLogsArgs, JobSubmitArgs};
use crate::client::{self, Connected};
use crate::table::{short, table, utc};
use anyhow::Context;
use braid::rpc::job_manager::{LogChunk, Submission, SubmitRequest};
use braid::rpc::job_package::{self, DirIdentity};
use std::io::Write;
use std::time::Duration;

/// How long one request to the head may take.
const REQUEST: Duration = Duration::from_secs(30);
/// How long uploading a working directory may take.
const UPLOAD: Duration = Duration::from_secs(600);
/// How often `--follow` asks for more output.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Runs `braid job ...`.
pub fn run(command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Submit(args) => submit(args),
        JobCommand::List(args) => {
            let connected = client::connect_to("job", args.cluster.address, args.cluster.token)?;
            let jobs: Vec<Submission> =
                serde_json::from_str(&connected.get_api("/api/jobs/submitted", REQUEST)?)?;
            if args.json {
                println!("{}", serde_json::to_string(&jobs)?);
            } else {
                let rows: Vec<Vec<String>> = jobs.iter().map(row).collect();
                print!(
                    "{}",
                    table(
                        &[
                            "JOB",
                            "STATE",
                            "EXIT",
                            "PID",
                            "STARTED",
                            "ENDED",
                            "ENTRYPOINT"
                        ],
                        &rows
                    )
                );
            }
            Ok(())
        }
        JobCommand::Status(args) => {
            let (connected, id) = connect(&args)?;
            let job = status(&connected, &id)?;
            if args.json {
                println!("{}", serde_json::to_string(&job)?);
            } else {
                print!("{}", describe(&job));
            }
            Ok(())
        }
        JobCommand::Logs(args) => logs(args),
        JobCommand::Stop(args) => {
            let (connected, id) = connect(&args)?;
            let job: Submission = serde_json::from_str(&connected.post_api(
                &format!("/api/jobs/submitted/{id}/stop"),
                "{}",
                REQUEST,
            )?)?;
            println!("Stopping job {} (SIGTERM, SIGKILL in 5 s).", job.job_id);
            Ok(())
        }
    }
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if id.parse::<braid::ids::JobId>().is_err() {
        return Err(usage_error("job", format!("{id:?} is not a job id")).into());
    }
    Ok(())
}

fn connect(args: &JobIdArgs) -> anyhow::Result<(Connected, String)> {
    check_id(&args.id)?;
    let connected = client::connect_to(
        "job",
        args.cluster.address.clone(),
        args.cluster.token.clone(),
    )?;
    Ok((connected, args.id.clone()))
}

fn status(connected: &Connected, id: &str) -> anyhow::Result<Submission> {
    Ok(serde_json::from_str(
        &connected.get_api(&format!("/api/jobs/submitted/{id}"), REQUEST)?,
    )?)
}

fn when(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), utc)
}

fn row(job: &Submission) -> Vec<String> {
    vec![
        job.job_id.to_string(),
        format!("{:?}", job.state).to_uppercase(),
        job.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
        job.pid.map_or_else(|| "-".into(), |p| p.to_string()),
        when(Some(job.start_time_ms)),
        when(job.end_time_ms),
        job.entrypoint.join(" "),
    ]
}

fn describe(job: &Submission) -> String {
    let mut out = format!(
        "Job {}: {}\n  entrypoint:  {}\n",
        job.job_id,
        format!("{:?}", job.state).to_uppercase(),
        job.entrypoint.join(" ")
    );
    if let Some(code) = job.exit_code {
        out.push_str(&format!("  exit code:   {code}\n"));
    }
    if let Some(pid) = job.pid {
        out.push_str(&format!("  pid:         {pid}\n"));
    }
    out.push_str(&format!(
        "  started:     {} (Unix s)\n",
        when(Some(job.start_time_ms))
    ));
    if let Some(end) = job.end_time_ms {
        out.push_str(&format!(
            "  ended:       {} (Unix s), after {:.3} s\n",
            when(Some(end)),
            end.saturating_sub(job.start_time_ms) as f64 / 1e3
        ));
    }
    if !job.message.is_empty() {
        out.push_str(&format!("  message:     {}\n", job.message));
    }
    out.push_str(&format!("  output:      {} bytes\n", job.log_bytes));
    out
}

/// Sends `request`: the submission, or `None` when the head answered
/// `refused_with` (409: the directory is elsewhere; 410: the package is
/// gone).
fn send(
    connected: &Connected,
    request: &SubmitRequest,
    refused_with: u16,
) -> anyhow::Result<Option<Submission>> {
    let path = "/api/jobs/submit";
    let answer = connected.post_api_answer(path, &serde_json::to_string(request)?, REQUEST)?;
    match answer.status {
        200 => Ok(Some(serde_json::from_str(&answer.body)?)),
        status if status == refused_with => Ok(None),
        status => anyhow::bail!(
            "the head's HTTP API answered {status} to {path}: {}",
            answer.body.trim()
        ),
    }
}

/// Packs and uploads `dir`, then submits the job to run in it.
fn upload_and_submit(
    connected: &Connected,
    dir: &std::path::Path,
    mut request: SubmitRequest,
) -> anyhow::Result<Submission> {
    let package = job_package::pack(dir)?;
    eprintln!(
        "Uploading {} ({} bytes) to the head as package {}",
        dir.display(),
        package.bytes.len(),
        short(&package.name)
    );
    request.working_dir = None;
    request.same_as = None;
    request.package = Some(package.name.clone());
    let path = format!("/api/jobs/packages/{}", package.name);
    // A package the head has just removed (its last job ended) is
    // uploaded once more.
    for _ in 0..2 {
        connected.put_api(&path, &package.bytes, UPLOAD)?;
        if let Some(job) = send(connected, &request, 410)? {
            return Ok(job);
        }
    }
    anyhow::bail!(
        "the head removed package {} twice as it was submitted",
        package.name
    )
}

fn submit(args: JobSubmitArgs) -> anyhow::Result<()> {
    let explicit = args.working_dir.is_some();
    let dir = match args.working_dir {
        Some(dir) => std::fs::canonicalize(&dir)
            .map_err(|e| usage_error("job", format!("--working-dir {}: {e}", dir.display())))?,
        None => std::env::current_dir().context("this directory")?,
    };
    let connected = client::connect_to("job", args.cluster.address, args.cluster.token)?;
    let mut request = SubmitRequest {
        entrypoint: args.command,
        working_dir: Some(dir.clone()),
        same_as: DirIdentity::of(&dir).ok(),
        package: None,
        env: Default::default(),
    };
    let job = match send(&connected, &request, 409)? {
        Some(job) => job,
        None if explicit => upload_and_submit(&connected, &dir, request)?,
        None => {
            eprintln!(
                "The head's machine does not have {}; the job runs in the head's directory \
                 (--working-dir uploads one)",
                dir.display()
            );
            request.working_dir = None;
            request.same_as = None;
            connected
                .post_api(
                    "/api/jobs/submit",
                    &serde_json::to_string(&request)?,
                    REQUEST,
                )
                .and_then(|body| Ok(serde_json::from_str(&body)?))?
        }
    };
    println!(
        "Submitted job {} ({}): {}",
        short(&job.job_id.to_string()),
        format!("{:?}", job.state).to_uppercase(),
        job.entrypoint.join(" ")
    );
    if args.follow {
        follow(&connected, &job.job_id.to_string(), true)?;
        let done = status(&connected, &job.job_id.to_string())?;
        print!("{}", describe(&done));
    } else {
        println!(
            "Follow it: braid job logs --follow {0}; its state: braid job status {0}",
            job.job_id
        );
    }
    println!("{}", job.job_id);
    Ok(())
}

fn follow(connected: &Connected, id: &str, until_end: bool) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let chunk: LogChunk = serde_json::from_str(&connected.get_api(
            &format!("/api/jobs/submitted/{id}/logs?offset={offset}"),
            REQUEST,
        )?)?;
        out.write_all(chunk.text.as_bytes())
            .context("write the job's output")?;
        out.flush().ok();
        let progressed = chunk.next > offset;
        offset = chunk.next;
        if chunk.finished || (!until_end && !progressed) {
            return Ok(());
        }
        if !progressed {
            std::thread::sleep(FOLLOW_EVERY);
        }
    }
}

fn logs(args: JobLogsArgs) -> anyhow::Result<()> {
    check_id(&args.id)?;
    let connected = client::connect_to("job", args.cluster.address, args.cluster.token)?;
    follow(&connected, &args.id, args.follow)
}
