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

use crate::cli::StopArgs;
use crate::procs::{self, Kind};
use std::time::Duration;

/// How long nodes, then heads, get to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// How long left-over workers get after SIGTERM.
const WORKER_GRACE: Duration = Duration::from_secs(2);

/// Runs `braid stop`.
pub fn run(_args: StopArgs) -> anyhow::Result<()> {
    let tmpdir = procs::own_tmpdir();
    let tmpdir = tmpdir.as_deref();
    let (mut heads, mut nodes) = (0, 0);
    for (kind, count) in [(Kind::Node, &mut nodes), (Kind::Head, &mut heads)] {
        let found = procs::find(tmpdir)
            .into_iter()
            .filter(|p| p.kind == kind)
            .collect();
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

    let mut files = 0;
    let user_dir = braid::cluster::user_dir();
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
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
