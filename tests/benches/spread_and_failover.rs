//! Work spreading over test hosts and surviving one's failure, with the
//! issue's ideals beside the figures: the makespan of independent
//! one-second tasks on 3 hosts × 2 CPUs against tasks × 1 s / 6, how soon
//! an actor answers again after its host's processes die and after its host
//! freezes past the node timeout, and how soon a lost 64 MiB task output is
//! rebuilt against the task's own run time plus its transfer.
//!
//! Needs root (network namespaces) and a release `braid` binary:
//! `cargo build --release -p braid --bin braid && cargo bench -p
//! braid-tests --bench spread_and_failover`. Prints progress on stderr and
//! one JSON line on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{NodeId, Runtime, TaskOptions};
use braid_tests::host_cluster::{nodes_by_host, HostCluster};
use braid_tests::hosts::{child_role, Hosts};
use rustix::process::Signal;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The head's node timeout, in seconds.
const NODE_TIMEOUT: f64 = 2.0;
/// The size of the output rebuilt from lineage.
const BIG: usize = 64 << 20;
/// How long the task making it works first.
const WORK: Duration = Duration::from_secs(1);
/// Task counts whose makespans are timed.
const BURSTS: [usize; 2] = [12, 24];

/// Sleeps `ms` milliseconds; says on which host.
#[braid::remote]
fn nap(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    braid::cluster::hostname()
}

/// A 64 MiB output, after a second of work.
#[braid::remote]
fn make_big() -> Vec<u8> {
    std::thread::sleep(WORK);
    vec![9u8; BIG]
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

/// Host 1's node.
fn victim(rt: &Runtime) -> NodeId {
    nodes_by_host(rt).unwrap()["braid-host-1"]
}

/// Makespans of bursts of one-second tasks.
fn burst(rt: &Runtime) {
    for n in BURSTS {
        let start = Instant::now();
        let refs: Vec<_> = (0..n).map(|_| nap::remote(rt, 1000).unwrap()).collect();
        for r in &refs {
            rt.get_blocking(r).unwrap();
        }
        println!("MAKESPAN {n} {}", start.elapsed().as_secs_f64());
        // Let idle leases go back before the next burst.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An actor and a 64 MiB task output on host 1; after it fails, how soon
/// the actor answers again and the output is back.
fn failover(rt: &Runtime) {
    let there = victim(rt);
    let actor = Resident::remote(rt)
        .node_affinity(there, true)
        .max_restarts(1)
        .spawn_blocking()
        .unwrap();
    assert_eq!(actor.host().blocking().unwrap(), "braid-host-1");
    let opts = TaskOptions::new().node_affinity(there, true);
    let made = Instant::now();
    let big = make_big::remote_with(rt, &opts).unwrap();
    let (ready, _) = rt.block_on({
        let (r, b) = (rt.clone(), big.clone());
        async move { r.wait(&[b], 1, None).await }
    });
    assert_eq!(ready.len(), 1);
    let run = made.elapsed();
    // A transfer of the same size, timed on a second output.
    let other = make_big::remote_with(rt, &opts).unwrap();
    let (r, o) = (rt.clone(), other.clone());
    rt.block_on(async move { r.wait(&[o], 1, None).await });
    let fetch = Instant::now();
    assert_eq!(rt.get_blocking(&other).unwrap().len(), BIG);
    let transfer = fetch.elapsed();

    println!("PLACED");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let failed = Instant::now();
    let answered = loop {
        if let Ok(host) = actor.host().blocking() {
            assert_ne!(host, "braid-host-1");
            break failed.elapsed();
        }
    };
    assert_eq!(rt.get_blocking(&big).unwrap().len(), BIG);
    let rebuilt = failed.elapsed();
    println!(
        "FAILOVER {} {} {} {}",
        answered.as_secs_f64(),
        rebuilt.as_secs_f64(),
        run.as_secs_f64(),
        transfer.as_secs_f64()
    );
}

/// The numbers after `key` on the line that has it.
fn field(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .find_map(|l| l.split_once(&format!("{key} ")).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// Starts a cluster of three hosts × 2 CPUs.
fn cluster(hosts: &Hosts) -> HostCluster<'_> {
    let timeout = NODE_TIMEOUT.to_string();
    let cluster = HostCluster::start_with(hosts, 0, 2, &["--node-timeout", &timeout]).unwrap();
    cluster.add_node(1, 2, &[]).unwrap();
    cluster.add_node(2, 2, &[]).unwrap();
    cluster
}

/// Runs the failover driver and fails host 1 with `signal` once it has
/// placed its work: (answered again, rebuilt, task run, transfer) seconds.
fn failover_with(signal: Signal) -> Vec<f64> {
    let hosts = Hosts::for_test("bench failover", 3).unwrap();
    let cluster = cluster(&hosts);
    let mut driver = cluster
        .driver(0, "failover")
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    for line in BufReader::new(driver.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if line.ends_with("PLACED") {
            hosts.host(1).signal_all(signal).unwrap();
            writeln!(driver.stdin.as_mut().unwrap(), "FAILED").unwrap();
        }
        out.push_str(&line);
        out.push('\n');
    }
    assert!(driver.wait().unwrap().success(), "failover driver:\n{out}");
    if signal == Signal::STOP {
        let _ = hosts.host(1).signal_all(Signal::CONT);
    }
    field(&out, "FAILOVER")
}

fn main() {
    if let Some(role) = child_role() {
        let rt = braid::init_blocking().unwrap();
        match role.as_str() {
            "burst" => burst(&rt),
            "failover" => failover(&rt),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let Some(hosts) = Hosts::for_test("bench spread", 3) else {
        return;
    };
    eprintln!("makespans of one-second tasks on 3 hosts x 2 CPUs");
    let spans = {
        let cluster = cluster(&hosts);
        let out = cluster.driver(0, "burst").unwrap().output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        BURSTS
            .iter()
            .map(|n| {
                let span = out
                    .lines()
                    .find_map(|l| l.split_once(&format!("MAKESPAN {n} ")).map(|(_, s)| s))
                    .unwrap_or_else(|| panic!("no makespan of {n} in:\n{out}"))
                    .trim()
                    .parse::<f64>()
                    .unwrap();
                let ideal = *n as f64 / 6.0;
                eprintln!("{n} tasks: {span:.2} s (ideal {ideal:.2} s)");
                json!({"tasks": n, "makespan_s": span, "ideal_s": ideal, "ratio": span / ideal})
            })
            .collect::<Vec<_>>()
    };
    drop(hosts);
    eprintln!("host 1's processes killed");
    let killed = failover_with(Signal::KILL);
    eprintln!("host 1 frozen");
    let frozen = failover_with(Signal::STOP);
    let line = json!({
        "bench": "spread_and_failover",
        "makespans": spans,
        "node_timeout_s": NODE_TIMEOUT,
        "actor_answers_after_kill_s": killed[0],
        "actor_answers_after_freeze_s": frozen[0],
        "rebuilt_64mib_after_kill_s": killed[1],
        "rebuilt_64mib_after_freeze_s": frozen[1],
        "task_run_s": killed[2],
        "transfer_64mib_s": killed[3],
        "rebuild_vs_run_plus_transfer": killed[1] / (killed[2] + killed[3]),
    });
    println!("{line}");
}
