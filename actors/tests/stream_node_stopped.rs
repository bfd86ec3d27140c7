//! The only node of a cluster SIGSTOPped past the head's heartbeat
//! timeout while a streaming job runs: its processes' connections stay
//! open, so nothing fails by itself. The driver sees the head declare the
//! node dead, fails the attempt, and ends the job with a typed error once
//! no attempt can be placed, instead of waiting forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_actors::stream::coordinator::JobError;
use std::time::{Duration, Instant};

braid_actors::stream_job!(NUMBERS, "numbers", support::numbers);

/// Resumes and kills the stopped node when the test ends, however it ends.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        support::signal(self.0, rustix::process::Signal::CONT);
        support::signal(self.0, rustix::process::Signal::KILL);
    }
}

#[test]
fn a_node_stopped_past_the_heartbeat_timeout_ends_the_job_with_a_typed_error() {
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(4.0)).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let job = support::numbers_job(dir.path(), 10_000_000, 5_000.0);
    let (driver, running) = support::run_in_background(&rt, job);
    running
        .recv_timeout(Duration::from_secs(60))
        .expect("the job runs");
    let nodes = support::children_named("braid-node");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let (cpu_before, stopped_at) = (support::cpu_seconds(), Instant::now());
    support::signal(nodes[0], rustix::process::Signal::STOP);
    let _stopped = Stopped(nodes[0]);
    let outcome = driver.join().unwrap();
    let (waited, cpu) = (stopped_at.elapsed(), support::cpu_seconds() - cpu_before);
    eprintln!("typed error {waited:?} after the SIGSTOP, driver CPU {cpu:.2} s");
    let err = outcome.unwrap_err();
    assert!(matches!(err, JobError::NoResources { .. }), "{err}");
    // Heartbeat timeout (10 s), then hosts that do not answer a kill (5 s)
    // and the resource wait (8 s).
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    assert!(cpu < 5.0, "the driver does not spin: {cpu:.2} CPU-s");
}
