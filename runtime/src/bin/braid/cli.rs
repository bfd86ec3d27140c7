//! The command line of `braid`: its subcommands and flags (clap derive),
//! and the parsers that check flag values, so that a bad value is reported
//! by clap, naming the flag, with exit code 2.

use braid::Resources;
use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};
use std::net::{IpAddr, Ipv4Addr};

/// Start, inspect and stop braid clusters (braid: a Ray-style runtime).
#[derive(Debug, Parser)]
#[command(name = "braid", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a cluster's head (`--head`), or a node joining one (`--address`).
    Start(StartArgs),
    /// Show the nodes, actors, placement groups and jobs of a cluster.
    Status(StatusArgs),
    /// Stop every braid head, node and worker this user started on this
    /// machine.
    ///
    /// When BRAID_TMPDIR is set, only the processes started with the same
    /// BRAID_TMPDIR are stopped.
    Stop(StopArgs),
    /// Run Ray's microbenchmark workloads.
    Microbenchmark(MicrobenchArgs),
    /// List the cluster's actors, tasks, objects, nodes, jobs or placement
    /// groups (Ray's state API).
    List(ListArgs),
    /// Write a Chrome trace (chrome://tracing, Perfetto) of the tasks and
    /// actor calls the cluster ran: submit, queue and run of each.
    Timeline(TimelineArgs),
    /// Submit, list, inspect, follow and stop jobs the head runs (as Ray
    /// Jobs).
    #[command(subcommand)]
    Job(JobCommand),
    /// Print the log of an actor's or a task's worker, a node, or a job
    /// (without a selector: the logs there are).
    Logs(LogsArgs),
}

/// Flags of `braid logs`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").args(["actor", "task", "node", "job"])))]
pub struct LogsArgs {
    /// An actor's worker (its id, or a prefix of it, or its name).
    #[arg(long, value_name = "ID|NAME")]
    pub actor: Option<String>,
    /// The worker that ran a task or actor call (its id or a prefix).
    #[arg(long, value_name = "ID")]
    pub task: Option<String>,
    /// A node daemon (its id or a prefix).
    #[arg(long, value_name = "ID")]
    pub node: Option<String>,
    /// A job: a submitted job's output, else every worker of the job.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Keep printing as the log grows, until its process ends.
    #[arg(long)]
    pub follow: bool,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `braid job` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Run COMMAND on the head's machine as a job of the cluster (with
    /// BRAID_ADDRESS set); prints the job id alone on its last line.
    Submit(JobSubmitArgs),
    /// List submitted jobs.
    List(JobListArgs),
    /// A job's state, exit code and times.
    Status(JobIdArgs),
    /// A job's output (its driver's, with its workers' lines).
    Logs(JobLogsArgs),
    /// Stop a job (SIGTERM to its processes, SIGKILL 5 s later).
    Stop(JobIdArgs),
}

/// Flags of `braid job submit`.
#[derive(Debug, Args)]
pub struct JobSubmitArgs {
    /// Directory the command runs in [default: this one]. When the head's
    /// machine does not have this very directory, it is uploaded (at most
    /// 512 MiB) and the job runs in the copy; without the flag the job
    /// then runs in the head's directory.
    #[arg(long, value_name = "DIR")]
    pub working_dir: Option<std::path::PathBuf>,
    /// Follow the job's output until it ends (the id is still printed
    /// last).
    #[arg(long)]
    pub follow: bool,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Flags of `braid job list`.
#[derive(Debug, Args)]
pub struct JobListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// A job's id, and where the cluster is.
#[derive(Debug, Args)]
pub struct JobIdArgs {
    /// The job's id.
    #[arg(value_name = "JOB_ID")]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `braid job logs`.
#[derive(Debug, Args)]
pub struct JobLogsArgs {
    /// The job's id.
    #[arg(value_name = "JOB_ID")]
    pub id: String,
    /// Keep printing output until the job ends.
    #[arg(long)]
    pub follow: bool,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Where a command finds the cluster.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The head's HOST:PORT [default: BRAID_ADDRESS, else the one cluster
    /// started on this machine].
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_address)]
    pub address: Option<String>,
    /// The cluster token [default: BRAID_TOKEN, else this machine's token
    /// file of the cluster].
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// What `braid list` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListKind {
    /// Actors, with their state, node, pid, restarts and death cause.
    Actors,
    /// Tasks and actor calls that ran, with their times.
    Tasks,
    /// Objects in the nodes' stores.
    Objects,
    /// Nodes, alive and dead.
    Nodes,
    /// Jobs (drivers), with their state and times.
    Jobs,
    /// Placement groups.
    PlacementGroups,
}

/// Flags of `braid list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// What to list.
    #[arg(value_enum)]
    pub kind: ListKind,
    /// Keep entries whose field KEY equals VALUE (case-insensitive;
    /// repeat for several), e.g. --filter state=DEAD.
    #[arg(long = "filter", value_name = "KEY=VALUE", value_parser = parse_filter)]
    pub filters: Vec<(String, String)>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List at most this many entries.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: usize,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `braid timeline`.
#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// Only this job's tasks and calls [default: every job's].
    #[arg(long, value_name = "JOB_ID")]
    pub job: Option<String>,
    /// Where to write the trace.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "timeline.json"
    )]
    pub output: std::path::PathBuf,
    /// Where the cluster is.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Checks a `KEY=VALUE` filter.
fn parse_filter(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Flags of `braid start`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("role").required(true).args(["head", "address"])))]
pub struct StartArgs {
    /// Start a new cluster: its head and a node beside it.
    #[arg(long)]
    pub head: bool,
    /// Join the cluster whose head listens at HOST:PORT with a new node.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_address)]
    pub address: Option<String>,
    /// Port the head listens on (0: any free port; the one chosen is
    /// printed).
    #[arg(long, value_name = "PORT", default_value_t = braid::cluster::DEFAULT_PORT, requires = "head")]
    pub port: u16,
    /// IP address to serve on [default: 127.0.0.1 for a head; for a node,
    /// the local address that reaches the head].
    #[arg(long, value_name = "IP", value_parser = parse_host)]
    pub host: Option<IpAddr>,
    /// CPUs the node offers [default: the CPUs available to this process].
    #[arg(long, value_name = "N", value_parser = parse_cpus, allow_negative_numbers = true)]
    pub num_cpus: Option<f64>,
    /// Object-store capacity: bytes, or a size such as 512MiB or 4GiB
    /// [default: 30% of memory, at most 64 GiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_store_size)]
    pub object_store_memory: Option<u64>,
    /// Custom resources the node offers, as a JSON object: '{"GPU": 2}'.
    #[arg(long, value_name = "JSON", value_parser = parse_resources)]
    pub resources: Option<Resources>,
    /// Seconds without a heartbeat after which the head declares a node
    /// dead (a node whose connection to the head closes is declared dead
    /// at once).
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_timeout, requires = "head")]
    pub node_timeout: f64,
    /// The cluster token [default: BRAID_TOKEN, else the token file the
    /// head's `braid start --head` wrote on this machine].
    #[arg(long, value_name = "TOKEN", conflicts_with = "head")]
    pub token: Option<String>,
    /// Port of the `/metrics` endpoint (the head's, with `--head`, which
    /// also serves its node's series; else the node's). 0 picks a free
    /// port; the one chosen is printed and shown by `braid status`.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub metrics_port: u16,
}

/// Flags of `braid status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The head's HOST:PORT [default: BRAID_ADDRESS, else the one cluster
    /// started on this machine].
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_address)]
    pub address: Option<String>,
    /// The cluster token [default: BRAID_TOKEN, else this machine's token
    /// file of the cluster].
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// Flags of `braid stop` (none yet).
#[derive(Debug, Args)]
pub struct StopArgs {}

/// Flags of `braid microbenchmark`.
#[derive(Debug, Args)]
pub struct MicrobenchArgs {
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Place every benchmark actor on nodes offering this custom resource
    /// (each takes a thousandth of a unit), e.g. on another host than the
    /// driver's.
    #[arg(long, value_name = "NAME")]
    pub actor_resource: Option<String>,
}

/// A usage error of subcommand `name` found after parsing (clap's format
/// and exit code 2), such as a token that is needed but nowhere to be
/// found.
pub fn usage_error(name: &str, message: impl std::fmt::Display) -> clap::Error {
    let mut cli = Cli::command();
    cli.build();
    let mut command = cli.find_subcommand(name).cloned().unwrap_or(cli);
    command.error(clap::error::ErrorKind::MissingRequiredArgument, message)
}

/// Checks a `HOST:PORT` address.
fn parse_address(text: &str) -> Result<String, String> {
    let text = text.trim();
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected HOST:PORT, such as 127.0.0.1:6379".into());
    };
    if host.is_empty() {
        return Err("the host is missing (expected HOST:PORT)".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(text.to_owned()),
        _ => Err(format!("{port:?} is not a port number between 1 and 65535")),
    }
}

/// Checks an IP address to serve on.
fn parse_host(text: &str) -> Result<IpAddr, String> {
    let trimmed = text.trim().trim_start_matches('[').trim_end_matches(']');
    if trimmed == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    trimmed
        .parse()
        .map_err(|_| "expected an IP address such as 127.0.0.1 or 0.0.0.0".to_owned())
}

/// Checks a CPU count: a finite, non-negative number.
fn parse_cpus(text: &str) -> Result<f64, String> {
    let n: f64 = text
        .trim()
        .parse()
        .map_err(|_| "expected a number of CPUs, such as 4 or 0.5".to_owned())?;
    braid::resources::check_offer(braid::resources::CPU, n)?;
    Ok(n)
}

/// Checks a timeout in seconds.
fn parse_timeout(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| "expected seconds, such as 10 or 2.5".to_owned())?;
    if !secs.is_finite() || !(0.2..=3600.0).contains(&secs) {
        return Err("the timeout must be between 0.2 and 3600 seconds".into());
    }
    Ok(secs)
}

/// Checks an object-store size.
fn parse_store_size(text: &str) -> Result<u64, String> {
    let bytes = braid::store::config::parse_size(text).map_err(|e| e.to_string())?;
    let min = braid::store::config::MIN_CAPACITY;
    if bytes < min {
        return Err(format!(
            "{bytes} bytes is below the minimum of {min} bytes (1MiB)"
        ));
    }
    Ok(bytes)
}

/// Checks a JSON object of custom resources.
fn parse_resources(text: &str) -> Result<Resources, String> {
    let resources = Resources::parse_json(text)?;
    for reserved in [braid::resources::CPU, braid::resources::MEMORY] {
        if resources.0.contains_key(reserved) {
            return Err(format!(
                "{reserved:?} is not a custom resource (CPUs are set with --num-cpus, memory is measured)"
            ));
        }
    }
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn values_are_checked() {
        assert!(parse_cpus("2").is_ok());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("abc").is_err());
        assert!(parse_cpus("inf").is_err());
        assert!(parse_cpus("1e9").unwrap_err().contains("more than"));
        assert!(parse_cpus("1024").is_ok());
        assert!(parse_resources("{\"GPU\": 1e15}").is_err());
        assert_eq!(parse_store_size("2MiB"), Ok(2 << 20));
        assert!(parse_store_size("lots").is_err());
        assert!(parse_store_size("10").is_err());
        assert!(parse_resources("{\"GPU\": 2}").is_ok());
        assert!(parse_resources("{bad").is_err());
        assert!(parse_resources("{\"CPU\": 2}").is_err());
        assert!(parse_address("10.0.0.1:6379").is_ok());
        assert!(parse_address("[::1]:6379").is_ok());
        assert!(parse_address("10.0.0.1").is_err());
        assert!(parse_address(":6379").is_err());
        assert!(parse_address("h:0").is_err());
        assert!(parse_host("::1").is_ok());
        assert!(parse_host("nope").is_err());
    }
}
