//! The only node of a cluster SIGKILLed while a streaming job runs: the
//! driver fails the job with a typed error within the resource wait,
//! without spinning (its CPU time over that wait is bounded).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_actors::stream::coordinator::JobError;
use std::time::{Duration, Instant};

braid_actors::stream_job!(NUMBERS, "numbers", support::numbers);

#[test]
fn sigkill_of_the_only_node_ends_the_job_with_a_typed_error_without_spinning() {
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(4.0)).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let job = support::numbers_job(dir.path(), 10_000_000, 5_000.0);
    let (driver, running) = support::run_in_background(&rt, job);
    running
        .recv_timeout(Duration::from_secs(60))
        .expect("the job runs");
    // A checkpoint or two complete first.
    std::thread::sleep(Duration::from_millis(500));
    let nodes = support::children_named("braid-node");
    assert_eq!(nodes.len(), 1, "one node of this test's cluster: {nodes:?}");
    let (cpu_before, killed_at) = (support::cpu_seconds(), Instant::now());
    support::signal(nodes[0], rustix::process::Signal::KILL);
    let outcome = driver.join().unwrap();
    let (waited, cpu) = (killed_at.elapsed(), support::cpu_seconds() - cpu_before);
    eprintln!("typed error {waited:?} after the SIGKILL, driver CPU {cpu:.2} s");
    let err = outcome.unwrap_err();
    assert!(
        matches!(err, JobError::NoResources { .. }),
        "a typed error saying the job has nowhere to run: {err}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "the resource wait (8 s) bounds it: {waited:?}"
    );
    assert!(cpu < 2.0, "the driver does not spin: {cpu:.2} CPU-s");
}
