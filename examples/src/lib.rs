//! Shared helpers for the braid examples.

/// Sends SIGKILL to process `pid`: how the examples simulate a crashed
/// process. A pid that cannot name a process is refused as invalid input.
pub fn sigkill(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad pid {pid}"))
        })?;
    rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
    Ok(())
}

/// Logs to stderr: `RUST_LOG` if set, else warnings and errors, and the
/// streaming engine's recoveries at info, so a failure and what the job
/// did about it are never silent.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,braid_actors::stream=info"));
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
