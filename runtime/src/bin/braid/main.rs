//! The `braid` command line: start a cluster or join one (`braid start`),
//! inspect it (`braid status`, `braid list`, `braid timeline`), stop this
//! user's daemons (`braid stop`) and run Ray's microbenchmarks (`braid
//! microbenchmark`).
//!
//! The same binary is the head, node and worker daemons: started with a
//! braid role in its environment it runs that role instead of `main`.
//!
//! Exit codes: 0 on success, 2 for a usage error (a bad flag or value, a
//! missing token or address), 1 when the command itself fails.

mod cli;
mod client;
mod job;
mod list;
mod logs;
mod microbench;
mod procs;
mod start;
mod status;
mod stop;
mod table;
mod timeline;

use clap::Parser;
use cli::{Cli, Command};

fn main() {
    // The library enters a daemon role from a constructor before `main`;
    // this is the fallback should the linker have dropped it.
    braid::role::enter_role();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Start(args) => start::run(args),
        Command::Status(args) => status::run(args),
        Command::Stop(args) => stop::run(args),
        Command::Microbenchmark(args) => microbench::run(args.json, args.actor_resource),
        Command::List(args) => list::run(args),
        Command::Timeline(args) => timeline::run(args),
        Command::Job(command) => job::run(command),
        Command::Logs(args) => logs::run(args),
    };
    if let Err(e) = result {
        if let Some(usage) = e.downcast_ref::<clap::Error>() {
            usage.exit();
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
