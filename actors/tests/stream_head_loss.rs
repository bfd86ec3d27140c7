//! The head of a cluster SIGKILLed while a streaming job runs. The head is
//! on no per-call path: the running attempt goes on and commits every
//! record once. A worker killed afterwards fails the attempt, and with no
//! head to place the next one the job ends with a typed error within the
//! resource wait.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_actors::stream::coordinator::JobError;
use std::time::{Duration, Instant};

braid_actors::stream_job!(NUMBERS, "numbers", support::numbers);

#[test]
fn a_job_outlives_its_head_and_fails_typed_when_it_then_needs_it() {
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(4.0)).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let records = 20_000;
    let job = support::numbers_job(dir.path(), records, 2_000.0);
    let (driver, pids_rx) = support::run_in_background(&rt, job);
    pids_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the job runs");
    let heads = support::children_named("braid-head");
    assert_eq!(heads.len(), 1, "{heads:?}");
    support::signal(heads[0], rustix::process::Signal::KILL);
    let report = driver
        .join()
        .unwrap()
        .expect("the job finishes without its head");
    assert_eq!(report.failures, 0, "{report:?}");
    support::assert_exactly_once(dir.path(), records);

    // A second job, whose worker dies: its next attempt needs the head.
    let dir = tempfile::tempdir().unwrap();
    let job = support::numbers_job(dir.path(), 10_000_000, 2_000.0);
    let (driver, pids_rx) = support::run_in_background(&rt, job);
    match pids_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(pids) => {
            let (cpu_before, killed_at) = (support::cpu_seconds(), Instant::now());
            support::signal(pids[0], rustix::process::Signal::KILL);
            let err = driver.join().unwrap().unwrap_err();
            let (waited, cpu) = (killed_at.elapsed(), support::cpu_seconds() - cpu_before);
            eprintln!("typed error {waited:?} after the worker's SIGKILL, driver CPU {cpu:.2} s");
            assert!(matches!(err, JobError::NoResources { .. }), "{err}");
            assert!(waited < Duration::from_secs(30), "{waited:?}");
            assert!(cpu < 2.0, "{cpu:.2} CPU-s");
        }
        Err(_) => {
            // The job could not even start without the head.
            let err = driver.join().unwrap().unwrap_err();
            assert!(matches!(err, JobError::NoResources { .. }), "{err}");
        }
    }
}
