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
