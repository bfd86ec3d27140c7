//! `braid-store`: runs a braid object store on its own, for tests and
//! benchmarks. (A braid node daemon embeds the same server.)
//!
//! ```text
//! braid-store serve --socket PATH [--capacity BYTES] [--spill-dir DIR] [--headroom BYTES]
//! ```
//!
//! Once listening it prints one line, `ready socket=PATH pid=PID
//! capacity=BYTES`, to stdout, and serves until SIGINT or SIGTERM.

use anyhow::Context;
use braid_store::config::{self, parse_size, StoreConfig, MIN_CAPACITY};
use braid_store::StoreServer;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "braid-store",
    version,
    about = "braid's shared-memory object store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a store on a Unix socket until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Path of the Unix socket to listen on (a stale socket left by a dead
    /// store is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Arena size: bytes, or a size like 4GiB. Default: 30% of physical
    /// memory, at most 64 GiB.
    #[arg(long, value_name = "BYTES", value_parser = parse_capacity)]
    capacity: Option<u64>,
    /// Directory for spilled objects; without it, nothing is spilled.
    #[arg(long, value_name = "DIR", value_parser = parse_spill_dir)]
    spill_dir: Option<PathBuf>,
    /// Bytes of pages to keep allocated above the high-water mark. Default:
    /// a quarter of the capacity, at most 1 GiB.
    #[arg(long, value_name = "BYTES", value_parser = parse_size_arg)]
    headroom: Option<u64>,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn parse_capacity(text: &str) -> Result<u64, String> {
    let bytes = parse_size_arg(text)?;
    let ram = config::physical_memory();
    if bytes < MIN_CAPACITY {
        return Err(format!(
            "{bytes} bytes is below the minimum of {MIN_CAPACITY} (1 MiB)"
        ));
    }
    if bytes > ram {
        return Err(format!(
            "{bytes} bytes is more than this machine's {ram} bytes of memory"
        ));
    }
    Ok(bytes)
}

fn parse_spill_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if text.is_empty() {
        return Err("the spill directory must not be empty".into());
    }
    if path.exists() && !path.is_dir() {
        return Err(format!("{} exists and is not a directory", path.display()));
    }
    Ok(path)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("braid-store: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve(args) = cli.command;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("braid-store")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match args.capacity {
        Some(capacity) => StoreConfig::with_capacity(&args.socket, capacity),
        None => StoreConfig::new(&args.socket),
    };
    if let Some(headroom) = args.headroom {
        config.headroom = headroom;
    }
    config.spill_dir = args.spill_dir;
    let capacity = config.capacity;
    let server = StoreServer::bind(config).await?;
    let handle = server.handle();
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready socket={} pid={} capacity={capacity}",
            server.socket_path().display(),
            std::process::id()
        )?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        handle.shutdown();
    });
    server.run().await?;
    Ok(())
}
