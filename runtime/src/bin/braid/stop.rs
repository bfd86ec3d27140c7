//! `braid stop`: stops the braid daemons this user started on this machine,
//! and only those, then removes this user's cluster files.
//!
//! Processes are found in `/proc` by the name braid processes give
//! themselves (`braid-head`, `braid-node`, `braid-worker`) and by their
//! real uid. When `BRAID_TMPDIR` is set, only processes whose environment
//! holds the same `BRAID_TMPDIR` are stopped (read from
//! `/proc/PID/environ`), so a test or a second installation with its own
//! `BRAID_TMPDIR` never stops anyone else's cluster; without it, every
//! braid process of this user is stopped.
//!
//! Nodes get SIGTERM first (they unregister from their head and stop their
//! workers), then heads; whatever has not exited after the grace period is
//! killed, and so is any worker left over.
//!
//! Then it cleans up: the session directories of what it stopped, and
//! every other session of this user directory no daemon runs in any more
//! (a head that died, an embedded cluster whose driver was killed), lose
//! their sockets, scratch directories and lock files; their logs move to
//! `logs/` in the user directory, where the newest sessions' logs are kept
//! within [`session::LOG_BUDGET`].

use crate::cli::StopArgs;
use crate::procs::{self, Kind};
use braid::session;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// How long nodes, then heads, get to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// How long left-over workers get after SIGTERM.
const WORKER_GRACE: Duration = Duration::from_secs(2);

/// Runs `braid stop`.
pub fn run(_args: StopArgs) -> anyhow::Result<()> {
    let tmpdir = procs::own_tmpdir();
    let tmpdir = tmpdir.as_deref();
    let mut sessions = BTreeSet::new();
    let (mut heads, mut nodes) = (0, 0);
    for (kind, count) in [(Kind::Node, &mut nodes), (Kind::Head, &mut heads)] {
        let found: Vec<_> = procs::find(tmpdir)
            .into_iter()
            .filter(|p| p.kind == kind)
            .collect();
        sessions.extend(found.iter().filter_map(|p| p.session_dir.clone()));
        *count = procs::terminate(found, GRACE);
    }
    // Workers normally die with their node; stop any left over.
    let workers = procs::terminate(
        procs::find(tmpdir)
            .into_iter()
            .filter(|p| p.kind == Kind::Worker)
            .collect(),
        WORKER_GRACE,
    );

    // The sessions of what was stopped (wherever their `BRAID_TMPDIR`),
    // then every other ended session of this user directory.
    let mut ended = 0;
    let mut logs_removed = 0;
    for dir in &sessions {
        match session::end_if_unheld(dir) {
            Ok(true) => ended += 1,
            Ok(false) => {}
            Err(e) => eprintln!("braid: cannot clean up {}: {e}", dir.display()),
        }
        if let Some(user_dir) = dir.parent() {
            logs_removed +=
                session::rotate_logs(&user_dir.join(session::LOGS_DIR), session::LOG_BUDGET);
        }
    }
    let user_dir = match session::existing_user_dir() {
        Ok(Some(dir)) => dir,
        other => {
            report(
                heads,
                nodes,
                workers,
                0,
                ended,
                logs_removed,
                &session::user_dir(),
            );
            return other.map(|_| ()).map_err(Into::into);
        }
    };
    let cleanup = session::clean_up(&user_dir);
    ended += cleanup.ended.len();
    logs_removed += cleanup.logs_removed;

    let mut files = 0;
    if let Ok(entries) = std::fs::read_dir(&user_dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_cluster_file =
                name.starts_with("cluster-") && (name.ends_with(".json") || name.ends_with(".tmp"));
            if is_cluster_file && std::fs::remove_file(entry.path()).is_ok() {
                files += 1;
            }
        }
    }
    report(
        heads,
        nodes,
        workers,
        files + cleanup.cluster_files_removed,
        ended,
        logs_removed,
        &user_dir,
    );
    Ok(())
}

/// Prints what `braid stop` did.
fn report(
    heads: usize,
    nodes: usize,
    workers: usize,
    files: usize,
    ended: usize,
    logs_removed: usize,
    user_dir: &Path,
) {
    let total = heads + nodes + workers;
    if total == 0 {
        println!("No braid processes of this user were running.");
    } else {
        println!(
            "Stopped {total} braid process{} ({heads} head{}, {nodes} node{}, {workers} worker{}).",
            if total == 1 { "" } else { "es" },
            plural(heads),
            plural(nodes),
            plural(workers),
        );
    }
    if files > 0 {
        println!(
            "Removed {files} cluster file{} from {}.",
            plural(files),
            user_dir.display()
        );
    }
    if ended > 0 {
        println!(
            "Cleaned up {ended} session director{} (sockets, scratch); their logs are in {}.",
            if ended == 1 { "y" } else { "ies" },
            user_dir.join(session::LOGS_DIR).display()
        );
    }
    if logs_removed > 0 {
        println!(
            "Removed the logs of {logs_removed} older session{} (kept: the newest within {} MiB).",
            plural(logs_removed),
            session::LOG_BUDGET >> 20
        );
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
