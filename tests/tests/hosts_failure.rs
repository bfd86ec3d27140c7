//! A test host fails under a running job ([`braid_tests::hosts`]): its
//! processes die (connections close) or it freezes past the head's node
//! timeout. Its actors answer again from another host within their
//! restarts, its tasks retry elsewhere, and an object whose only copy it
//! held is lost with a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, NodeId, Runtime, TaskOptions};
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{child_role, Hosts};
use rustix::process::Signal;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The head's node timeout in these tests, in seconds.
const NODE_TIMEOUT: &str = "2";

/// The host that fails.
const VICTIM: &str = "braid-host-1";

/// Sleeps `ms` milliseconds; says on which host.
#[braid::remote]
fn nap(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    braid::cluster::hostname()
}

/// A value stored (not inline) on the host that makes it.
#[braid::remote]
fn make_block() -> Vec<u8> {
    vec![7u8; 1 << 20]
}

/// An actor that says where it lives.
#[braid::actor]
pub struct Resident;

#[braid::actor]
impl Resident {
    fn new() -> Self {
        Resident
    }
    fn host(&self) -> String {
        braid::cluster::hostname()
    }
}

fn node_of_host(rt: &Runtime) -> BTreeMap<String, NodeId> {
    let r = rt.clone();
    rt.block_on(async move { r.nodes().await })
        .unwrap()
        .into_iter()
        .filter(|n| n.alive)
        .map(|n| (n.info.hostname.clone(), n.info.node_id))
        .collect()
}

/// Tells the test the job is placed, and waits until it has made the
/// victim fail.
fn hand_over() -> Instant {
    println!("PLACED");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "FAILED", "the test's word");
    Instant::now()
}

/// The driver: an actor, a running task and a stored object on the
/// victim; once it fails, the actor answers from another host, the task
/// retries elsewhere and the object is lost.
fn survive(rt: &Runtime) {
    let nodes = node_of_host(rt);
    let victim = nodes[VICTIM];
    let actor = Resident::remote(rt)
        .node_affinity(victim, true)
        .max_restarts(1)
        .spawn_blocking()
        .unwrap();
    assert_eq!(actor.host().blocking().unwrap(), VICTIM);
    let there = TaskOptions::new().node_affinity(victim, true);
    let block = make_block::remote_with(rt, &there.clone().max_retries(0)).unwrap();
    let (ready, _) = rt.block_on({
        let (r, b) = (rt.clone(), block.clone());
        async move { r.wait(&[b], 1, None).await }
    });
    assert_eq!(ready.len(), 1, "the object is made before its host fails");
    let running = nap::remote_with(rt, &there, 4000).unwrap();
    // The task has started on the victim before it fails.
    std::thread::sleep(Duration::from_millis(500));

    let failed = hand_over();
    let answer = loop {
        match actor.host().blocking() {
            Ok(host) => break host,
            Err(Error::ActorDied { .. }) | Err(Error::Unreachable { .. }) => {
                assert!(failed.elapsed() < Duration::from_secs(30), "no restart");
            }
            Err(e) => panic!("the actor after its host failed: {e}"),
        }
    };
    println!("ANSWERED-AFTER {:?}", failed.elapsed());
    assert_ne!(answer, VICTIM, "the actor restarted on another host");
    let retried = rt.get_blocking(&running).unwrap();
    assert_ne!(retried, VICTIM, "the task retried on another host");
    match rt.get_blocking(&block) {
        Err(Error::ObjectLost(_)) => {}
        other => panic!("an object whose only copy died with its host: {other:?}"),
    }
}

/// Entry point of the processes the tests start on their hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    let rt = braid::init_blocking().unwrap();
    match role.as_str() {
        "survive" => survive(&rt),
        other => panic!("unknown role {other}"),
    }
    println!("DRIVER-OK");
}

/// Runs the `survive` driver on host 0 of three hosts with 2 CPUs each,
/// and fails host 1 with `signal` when the driver has placed its work.
fn fail_host(test: &str, signal: Signal) {
    let Some(hosts) = Hosts::for_test(test, 3) else {
        return;
    };
    let cluster = HostCluster::start_with(&hosts, 0, 2, &["--node-timeout", NODE_TIMEOUT]).unwrap();
    cluster.add_node(1, 2, &[]).unwrap();
    cluster.add_node(2, 2, &[]).unwrap();
    let mut driver = cluster
        .driver(0, "survive")
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A driver that hangs is killed (by its pid), so the test fails with
    // what it printed rather than hanging.
    let pid = driver.id();
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(90)).is_err() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
    });
    let mut stdout = BufReader::new(driver.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        // The test harness's "test child_entry ... " may share the line.
        if line.trim_end().ends_with("PLACED") {
            let n = hosts.host(1).signal_all(signal).unwrap();
            assert!(n > 0, "the victim host runs braid processes");
            writeln!(driver.stdin.as_mut().unwrap(), "FAILED").unwrap();
        }
        if let Some((_, after)) = line.split_once("ANSWERED-AFTER") {
            println!("{test}: the actor answered again {}", after.trim());
        }
    }
    let out = driver.wait_with_output().unwrap();
    let _ = done.send(());
    if signal == Signal::STOP {
        let _ = hosts.host(1).signal_all(Signal::CONT);
    }
    assert!(
        out.status.success() && seen.contains("DRIVER-OK"),
        "driver failed:\n{seen}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hosts_a_host_whose_processes_die_loses_nothing_that_can_be_restarted() {
    fail_host(
        "hosts_a_host_whose_processes_die_loses_nothing_that_can_be_restarted",
        Signal::KILL,
    );
}

#[test]
fn hosts_a_host_frozen_past_the_timeout_is_declared_dead() {
    fail_host(
        "hosts_a_host_frozen_past_the_timeout_is_declared_dead",
        Signal::STOP,
    );
}
