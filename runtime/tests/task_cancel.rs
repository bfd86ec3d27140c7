//! Forced cancel and task timeouts on a cluster of one CPU: a synchronous
//! task cancelled by force, or past its timeout, ends with its worker
//! process, so the CPU it held runs the next task at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Runtime, TaskOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Creates `started`, then sleeps `ms` milliseconds without yielding.
#[braid::remote]
fn hold_cpu(started: PathBuf, ms: u64) -> u64 {
    std::fs::write(&started, b"").unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(1.0)).expect("cluster")
    })
}

/// Waits until the task writing `path` has started.
async fn started(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One test at a time holds the only CPU.
static CPU: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_task_cancelled_by_force_gives_its_cpu_back_at_once() {
    let _cpu = CPU.lock().await;
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let long = hold_cpu::remote(rt, mark.clone(), 60_000).unwrap();
    started(&mark).await;
    let next = add::remote(rt, 1, 2).unwrap();
    let cancelled = Instant::now();
    assert!(rt.cancel_force(&long));
    assert_eq!(rt.get(&long).await.unwrap_err(), Error::Cancelled);
    assert_eq!(rt.get(&next).await.unwrap(), 3);
    println!(
        "forced cancel: the next task ran {:?} after cancel_force",
        cancelled.elapsed()
    );
    assert!(
        cancelled.elapsed() < Duration::from_secs(30),
        "the CPU came back"
    );
}

#[tokio::test]
async fn a_task_past_its_timeout_gives_its_cpu_back_at_once() {
    let _cpu = CPU.lock().await;
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let opts = TaskOptions::new().timeout(Duration::from_millis(500));
    let long = hold_cpu::remote_with(rt, &opts, mark.clone(), 60_000).unwrap();
    started(&mark).await;
    let next = add::remote(rt, 2, 3).unwrap();
    assert!(matches!(rt.get(&long).await, Err(Error::Timeout(_))));
    let timed_out = Instant::now();
    assert_eq!(rt.get(&next).await.unwrap(), 5);
    println!(
        "timeout: the next task ran {:?} after the timeout",
        timed_out.elapsed()
    );
    assert!(
        timed_out.elapsed() < Duration::from_secs(30),
        "the CPU came back"
    );
}
