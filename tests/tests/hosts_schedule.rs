//! Scheduling over test hosts that share only a network
//! ([`braid_tests::hosts`]): the default hybrid policy spreads a burst of
//! independent tasks over every host, SPREAD and node affinity place tasks
//! and actors where asked, and a STRICT_SPREAD placement group takes one
//! host per bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, NodeId, PlacementStrategy, Resources, Runtime, TaskOptions};
use braid_tests::host_cluster::{nodes_by_host, HostCluster};
use braid_tests::hosts::{child_role, Hosts};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The test hosts' names, host 0 first.
const HOSTS: [&str; 3] = ["braid-host-0", "braid-host-1", "braid-host-2"];

/// Sleeps `ms` milliseconds; says on which host.
#[braid::remote]
fn nap(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    braid::cluster::hostname()
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

/// How many of `names` ran on each host.
fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_insert(0) += 1;
    }
    counts
}

/// The driver of `hosts_a_burst_of_tasks_spreads_over_every_host`, on host
/// 0 of three hosts with 2 CPUs each: 12 one-second tasks, submitted at
/// once.
fn burst(rt: &Runtime) {
    let start = Instant::now();
    let refs: Vec<_> = (0..12).map(|_| nap::remote(rt, 1000).unwrap()).collect();
    let names: Vec<String> = refs.iter().map(|r| rt.get_blocking(r).unwrap()).collect();
    let took = start.elapsed();
    let counts = tally(&names);
    println!("12 one-second tasks on 3 hosts x 2 CPUs: {took:?}, {counts:?}");
    for host in HOSTS {
        assert!(
            counts.get(host).copied().unwrap_or(0) >= 2,
            "every host runs a share of the burst: {counts:?}"
        );
    }
}

/// The driver of `hosts_spread_and_affinity_place_tasks_and_actors`.
fn strategies(rt: &Runtime) {
    let nodes = nodes_by_host(rt).unwrap();
    assert_eq!(nodes.len(), 3, "three live nodes: {nodes:?}");

    // SPREAD: tasks and actors go round-robin over the hosts. Three
    // half-CPU tasks would all fit on host 0 under the default policy
    // (which keeps two there, up to half its CPUs); spread, each has a
    // host of its own.
    let spread = TaskOptions::new().num_cpus(0.5).spread();
    let refs: Vec<_> = (0..3)
        .map(|_| nap::remote_with(rt, &spread, 1000).unwrap())
        .collect();
    let names: Vec<String> = refs.iter().map(|r| rt.get_blocking(r).unwrap()).collect();
    let counts = tally(&names);
    assert_eq!(counts.len(), 3, "SPREAD tasks reach every host: {counts:?}");
    let actors: Vec<_> = (0..3)
        .map(|_| Resident::remote(rt).spread().spawn_blocking().unwrap())
        .collect();
    let homes: BTreeSet<String> = actors
        .iter()
        .map(|a| a.host().blocking().unwrap())
        .collect();
    assert_eq!(homes.len(), 3, "SPREAD actors on three hosts: {homes:?}");

    // Node affinity, hard: there and nowhere else.
    let on2 = TaskOptions::new().node_affinity(nodes[HOSTS[2]], false);
    for _ in 0..3 {
        let name = rt.get_blocking(&nap::remote_with(rt, &on2, 1).unwrap());
        assert_eq!(name.unwrap(), HOSTS[2]);
    }
    let actor = Resident::remote(rt)
        .node_affinity(nodes[HOSTS[1]], false)
        .spawn_blocking()
        .unwrap();
    assert_eq!(actor.host().blocking().unwrap(), HOSTS[1]);
    // Hard affinity to a node that does not exist is an error.
    let nowhere = TaskOptions::new().node_affinity(NodeId::random(), false);
    match rt.get_blocking(&nap::remote_with(rt, &nowhere, 1).unwrap()) {
        Err(Error::NodeDied(_)) | Err(Error::Infeasible(_)) => {}
        other => panic!("hard affinity to no node: {other:?}"),
    }
    // Soft affinity: there when it can, elsewhere when the node is gone.
    let soft1 = TaskOptions::new().node_affinity(nodes[HOSTS[1]], true);
    let name = rt.get_blocking(&nap::remote_with(rt, &soft1, 1).unwrap());
    assert_eq!(name.unwrap(), HOSTS[1]);
    let soft_nowhere = TaskOptions::new().node_affinity(NodeId::random(), true);
    let name = rt.get_blocking(&nap::remote_with(rt, &soft_nowhere, 1).unwrap());
    assert!(HOSTS.contains(&name.unwrap().as_str()));
}

/// The driver of `hosts_a_strict_spread_group_takes_one_host_per_bundle`.
fn strict_spread(rt: &Runtime) {
    let bundles = vec![Resources::cpus(1.0); 3];
    let r = rt.clone();
    let group = rt
        .block_on(async move {
            r.placement_group(bundles, PlacementStrategy::StrictSpread)
                .await
        })
        .unwrap();
    let distinct: BTreeSet<NodeId> = group.nodes().iter().copied().collect();
    assert_eq!(
        distinct.len(),
        3,
        "one node per bundle: {:?}",
        group.nodes()
    );
    let mut hosts = BTreeSet::new();
    for i in 0..3 {
        let opts = TaskOptions::new().placement_group(&group, i);
        hosts.insert(
            rt.get_blocking(&nap::remote_with(rt, &opts, 1).unwrap())
                .unwrap(),
        );
        let actor = Resident::remote(rt)
            .num_cpus(1.0)
            .placement_group(&group, i)
            .spawn_blocking()
            .unwrap();
        let home = actor.host().blocking().unwrap();
        assert!(hosts.contains(&home), "the bundle's actor shares its host");
    }
    assert_eq!(hosts.len(), 3, "bundles' tasks on three hosts: {hosts:?}");
    let r = rt.clone();
    rt.block_on(async move { r.remove_placement_group(&group).await })
        .unwrap();
    // Four bundles cannot each have a host of their own among three.
    let r = rt.clone();
    let four = rt.block_on(async move {
        r.placement_group(
            vec![Resources::cpus(1.0); 4],
            PlacementStrategy::StrictSpread,
        )
        .await
    });
    assert!(
        matches!(four, Err(Error::Infeasible(_))),
        "STRICT_SPREAD over more hosts than there are: {four:?}"
    );
}

/// Entry point of the processes the tests start on their hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    let rt = braid::init_blocking().unwrap();
    match role.as_str() {
        "burst" => burst(&rt),
        "strategies" => strategies(&rt),
        "strict_spread" => strict_spread(&rt),
        other => panic!("unknown role {other}"),
    }
    println!("DRIVER-OK");
}

/// Starts a head with 2 CPUs on host 0 and nodes with 2 CPUs on hosts 1
/// and 2, then runs `role` as a driver on host 0.
fn run_on_three_hosts(test: &str, role: &str) {
    let Some(hosts) = Hosts::for_test(test, 3) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 2).unwrap();
    cluster.add_node(1, 2, &[]).unwrap();
    cluster.add_node(2, 2, &[]).unwrap();
    let out = cluster.driver(0, role).unwrap().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter(|l| l.contains("one-second")) {
        println!("{line}");
    }
    assert!(
        out.status.success() && stdout.contains("DRIVER-OK"),
        "driver {role} on host 0 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hosts_a_burst_of_tasks_spreads_over_every_host() {
    run_on_three_hosts("hosts_a_burst_of_tasks_spreads_over_every_host", "burst");
}

#[test]
fn hosts_spread_and_affinity_place_tasks_and_actors() {
    run_on_three_hosts(
        "hosts_spread_and_affinity_place_tasks_and_actors",
        "strategies",
    );
}

#[test]
fn hosts_a_strict_spread_group_takes_one_host_per_bundle() {
    run_on_three_hosts(
        "hosts_a_strict_spread_group_takes_one_host_per_bundle",
        "strict_spread",
    );
}
