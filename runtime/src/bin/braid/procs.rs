//! Finding this user's braid processes in `/proc`, signalling them and
//! waiting for them to exit (through pidfds, so a recycled pid is never
//! signalled by mistake).

use braid::cluster::{DaemonConfig, DaemonOptions};
use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a braid process is, by the name it gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `braid-head`.
    Head,
    /// `braid-node`.
    Node,
    /// `braid-worker`.
    Worker,
}

impl Kind {
    /// The kind a process name (`/proc/PID/comm`) stands for.
    fn from_comm(comm: &str) -> Option<Kind> {
        match comm {
            "braid-head" => Some(Kind::Head),
            "braid-node" => Some(Kind::Node),
            "braid-worker" => Some(Kind::Worker),
            _ => None,
        }
    }
}

/// One process found.
#[derive(Debug)]
pub struct Found {
    /// Its pid.
    pub pid: u32,
    /// What it is.
    pub kind: Kind,
    /// The session directory of a head or node (from its configuration).
    pub session_dir: Option<PathBuf>,
    /// A pidfd on it (`None` if the kernel has no pidfds; then the pid is
    /// used).
    pidfd: Option<OwnedFd>,
}

/// The value of `BRAID_TMPDIR` this command runs with, if any.
pub fn own_tmpdir() -> Option<Vec<u8>> {
    std::env::var_os("BRAID_TMPDIR").map(|v| v.into_encoded_bytes())
}

/// Every live (not zombie) braid head, node and worker of this user on
/// this machine. With `tmpdir`, only those started with exactly that
/// `BRAID_TMPDIR` (read from `/proc/PID/environ`).
pub fn find(tmpdir: Option<&[u8]>) -> Vec<Found> {
    let uid = rustix::process::getuid().as_raw();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut found = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        // Open the pidfd first: whatever is checked below then describes the
        // process the pidfd refers to, unless it exited in between (and
        // signalling an exited process through its pidfd does nothing).
        let pidfd = Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok());
        if let Some((kind, session_dir)) = matches(pid, uid, tmpdir) {
            found.push(Found {
                pid,
                kind,
                session_dir,
                pidfd,
            });
        }
    }
    found
}

/// The kind of process `pid` if it is a live braid process of user `uid`
/// (started with `tmpdir`, if given), and its session directory if it is a
/// daemon.
fn matches(pid: u32, uid: u32, tmpdir: Option<&[u8]>) -> Option<(Kind, Option<PathBuf>)> {
    let dir = format!("/proc/{pid}");
    let comm = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
    let kind = Kind::from_comm(comm.trim_end_matches('\n'))?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let mut real_uid = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("State:") {
            if rest.trim_start().starts_with('Z') || rest.trim_start().starts_with('X') {
                return None;
            }
        }
        if let Some(rest) = line.strip_prefix("Uid:") {
            real_uid = rest.split_whitespace().next()?.parse::<u32>().ok();
        }
    }
    if real_uid? != uid {
        return None;
    }
    let environ = std::fs::read(format!("{dir}/environ")).ok();
    let var = |name: &[u8]| {
        environ.as_deref().and_then(|env| {
            env.split(|b| *b == 0)
                .find_map(|var| var.strip_prefix(name))
                .map(<[u8]>::to_vec)
        })
    };
    if let Some(want) = tmpdir {
        if var(b"BRAID_TMPDIR=")?.as_slice() != want {
            return None;
        }
    }
    let session_dir = var(format!("{}=", braid::cluster::DAEMON_VAR).as_bytes())
        .and_then(|json| serde_json::from_slice::<(DaemonConfig, DaemonOptions)>(&json).ok())
        .map(|(config, _)| match config {
            DaemonConfig::Head { session_dir, .. } | DaemonConfig::Node { session_dir, .. } => {
                session_dir
            }
        });
    Some((kind, session_dir))
}

impl Found {
    /// Sends `signal`; false if the process is already gone.
    pub fn signal(&self, signal: Signal) -> bool {
        match &self.pidfd {
            Some(fd) => rustix::process::pidfd_send_signal(fd, signal).is_ok(),
            None => Pid::from_raw(self.pid as i32)
                .is_some_and(|p| rustix::process::kill_process(p, signal).is_ok()),
        }
    }

    /// Whether the process still runs (without a pidfd: whether its pid
    /// is still a live process).
    fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd, PollFlags::IN)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
            }
            None => std::fs::read_to_string(format!("/proc/{}/status", self.pid))
                .map(|s| {
                    !s.lines().any(|l| {
                        l.strip_prefix("State:")
                            .is_some_and(|r| r.trim_start().starts_with(['Z', 'X']))
                    })
                })
                .unwrap_or(false),
        }
    }
}

/// Waits until every process of `procs` exited or `timeout` passed; returns
/// those still running. Waits on the pidfds; processes without one (old
/// kernels) are checked every 20 ms.
pub fn wait_exit(mut procs: Vec<Found>, timeout: Duration) -> Vec<Found> {
    let deadline = Instant::now() + timeout;
    loop {
        procs.retain(Found::alive);
        let now = Instant::now();
        if procs.is_empty() || now >= deadline {
            return procs;
        }
        let mut left = deadline - now;
        if procs.iter().any(|p| p.pidfd.is_none()) {
            left = left.min(Duration::from_millis(20));
        }
        let mut fds: Vec<PollFd<'_>> = procs
            .iter()
            .filter_map(|p| p.pidfd.as_ref())
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let timeout = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        if fds.is_empty() {
            std::thread::sleep(left);
        } else {
            // An interrupted or failed poll just goes round again; `alive`
            // decides.
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
        }
    }
}

/// Stops `procs`: SIGTERM, then after `grace` SIGKILL for the survivors.
/// Returns how many were found running and are gone now.
pub fn terminate(procs: Vec<Found>, grace: Duration) -> usize {
    let procs: Vec<Found> = procs
        .into_iter()
        .filter(|p| p.signal(Signal::TERM))
        .collect();
    let signalled = procs.len();
    let survivors = wait_exit(procs, grace);
    for p in &survivors {
        p.signal(Signal::KILL);
    }
    let stuck = wait_exit(survivors, Duration::from_secs(2));
    for p in &stuck {
        eprintln!("braid: process {} ({:?}) did not exit", p.pid, p.kind);
    }
    signalled - stuck.len()
}

/// The process of a child this command started (to stop it on failure).
pub fn of_child(child: &std::process::Child, kind: Kind) -> Found {
    let pid = child.id();
    Found {
        pid,
        kind,
        session_dir: None,
        pidfd: Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok()),
    }
}
