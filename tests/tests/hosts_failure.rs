//! A test host fails under a running job ([`braid_tests::hosts`]): its
//! processes die (connections close) or it freezes past the head's node
//! timeout. Its actors answer again from another host within their
//! restarts, its tasks retry elsewhere, and an object whose only copy it
//! held is lost with a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Runtime, TaskOptions};
use braid_tests::host_cluster::{nodes_by_host, HostCluster};
use braid_tests::hosts::{child_role, Hosts};
use rustix::process::Signal;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The head's node timeout in these tests, in seconds.
const NODE_TIMEOUT: &str = "3";

/// The host that fails.
const VICTIM: &str = "braid-host-1";

/// Sleeps `ms` milliseconds; says on which host.
#[braid::remote]
fn nap(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    braid::cluster::hostname()
}

/// The size of the objects lost with the host (stored, not inline; the
/// benchmark rebuilds 64 MiB).
const BIG: usize = 4 << 20;

/// A value stored (not inline) on the host that makes it, after `ms`
/// milliseconds of work.
#[braid::remote]
fn make_block(seed: u8, ms: u64) -> Vec<u8> {
    std::thread::sleep(Duration::from_millis(ms));
    vec![seed; BIG]
}

/// A value made from another (its first byte plus one), on the host that
/// runs it.
#[braid::remote]
fn add_one(mut block: Vec<u8>) -> Vec<u8> {
    block[0] = block[0].wrapping_add(1);
    block
}

/// An object `put` by the worker that runs this (its owner), on its host.
#[braid::remote]
fn put_there() -> braid::ObjectRef<Vec<u8>> {
    braid::current().unwrap().put(&vec![3u8; BIG]).unwrap()
}

/// Whether `block` is `BIG` bytes of `seed`, the first plus `first`.
fn is_block(block: &[u8], seed: u8, first: u8) -> bool {
    block.len() == BIG
        && block[0] == seed.wrapping_add(first)
        && block[1..].iter().all(|&b| b == seed)
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
    fn block(&self) -> Vec<u8> {
        vec![5u8; BIG]
    }
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
    let nodes = nodes_by_host(rt).unwrap();
    let victim = nodes[VICTIM];
    let actor = Resident::remote(rt)
        .node_affinity(victim, true)
        .max_restarts(1)
        .spawn_blocking()
        .unwrap();
    assert_eq!(actor.host().blocking().unwrap(), VICTIM);
    let there = TaskOptions::new().node_affinity(victim, true);
    // Outputs of tasks (a chain of two, and one that took a second) with
    // their only copies on the victim, and objects that cannot be rebuilt:
    // a task's marked not deterministic, an actor's result, and a `put` by
    // a worker there.
    let started = Instant::now();
    let slow = make_block::remote_with(rt, &there, 1, 1000).unwrap();
    let first = make_block::remote_with(rt, &there, 2, 0).unwrap();
    let chained = add_one::remote_with(rt, &there, &first).unwrap();
    drop(first);
    let once = make_block::remote_with(rt, &there.clone().deterministic(false), 4, 0).unwrap();
    let from_actor = actor.block().object_ref().unwrap();
    let put = rt
        .get_blocking(&put_there::remote_with(rt, &there).unwrap())
        .unwrap();
    let all = vec![
        slow.clone(),
        chained.clone(),
        once.clone(),
        from_actor.clone(),
    ];
    let (ready, _) = rt.block_on({
        let (r, all) = (rt.clone(), all.clone());
        async move { r.wait(&all, 4, None).await }
    });
    assert_eq!(
        ready.len(),
        4,
        "the objects are made before their host fails"
    );
    let made_in = started.elapsed();
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
    // Rebuilt from lineage: the slow one, and the chain (its lost argument
    // first).
    assert!(is_block(&rt.get_blocking(&slow).unwrap(), 1, 0), "rebuilt");
    println!(
        "REBUILT a one-second task's output {:?} after its host failed \
         (made in {made_in:?} with the others)",
        failed.elapsed()
    );
    assert!(
        is_block(&rt.get_blocking(&chained).unwrap(), 2, 1),
        "rebuilt chain"
    );
    // Not rebuilt: typed losses saying why.
    for (what, lost) in [
        (
            "a task not deterministic",
            rt.get_blocking(&once).map(|v| v.len()),
        ),
        (
            "an actor's result",
            rt.get_blocking(&from_actor).map(|v| v.len()),
        ),
        (
            "a put whose owner died",
            rt.get_blocking(&put).map(|v| v.len()),
        ),
    ] {
        match lost {
            Err(Error::ObjectLost { reason, .. }) => println!("LOST {what}: {reason}"),
            other => panic!("{what} whose only copy died with its host: {other:?}"),
        }
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

/// Runs the `survive` driver on host 0 of three hosts, and fails host 1
/// with `signal` when the driver has placed its work.
fn fail_host(test: &str, signal: Signal) {
    let Some(hosts) = Hosts::for_test(test, 3) else {
        return;
    };
    let cluster = HostCluster::start_with(&hosts, 0, 2, &["--node-timeout", NODE_TIMEOUT]).unwrap();
    // The victim has room for everything the driver places there at once
    // (soft affinity gives way to another node when it must wait).
    cluster.add_node(1, 8, &[]).unwrap();
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
        for tag in ["REBUILT", "LOST"] {
            if let Some((_, rest)) = line.split_once(tag) {
                println!("{test}: {tag} {}", rest.trim());
            }
        }
    }
    let out = driver.wait_with_output().unwrap();
    let _ = done.send(());
    if signal == Signal::STOP {
        let _ = hosts.host(1).signal_all(Signal::CONT);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The driver's panic first, so a truncated log still shows it.
    let why: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .take_while(|l| !l.starts_with("stack backtrace") && !l.starts_with("note:"))
        .collect();
    assert!(
        out.status.success() && seen.contains("DRIVER-OK"),
        "driver failed: {}\n{seen}\n{stderr}",
        why.join("\n")
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
