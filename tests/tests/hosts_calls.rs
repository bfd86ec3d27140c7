//! Tasks, actor calls and objects between test hosts that share only a
//! network ([`braid_tests::hosts`]): a head with no CPUs on one host, nodes
//! on others, and a driver that reaches its workers and actors over TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, ObjectRef, Runtime, TaskOptions};
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{child_role, Hosts};

/// The size of the objects that cross hosts.
const BIG: usize = 64 << 20;

/// This process's host name: which test host runs it.
fn host_name() -> String {
    braid::cluster::hostname()
}

#[braid::remote]
fn where_am_i() -> String {
    host_name()
}

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// `BIG` bytes whose every byte depends on its position and `seed`.
fn pattern(seed: u8) -> Vec<u8> {
    (0..BIG)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 20) as u8)
        .collect()
}

/// A checksum that notices a moved, lost or changed byte.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |h, (i, &b)| {
        h.wrapping_mul(1_000_003)
            .wrapping_add(u64::from(b) ^ i as u64)
    })
}

#[braid::remote]
fn make_big(seed: u8) -> Vec<u8> {
    pattern(seed)
}

/// Reads `data` where it runs: its host and checksum.
#[braid::remote]
fn read_big(data: Vec<u8>) -> (String, u64) {
    (host_name(), checksum(&data))
}

/// References owned by the worker that makes them, on its host.
#[braid::remote]
fn make_refs(n: i64) -> Vec<ObjectRef<i64>> {
    let rt = braid::current().unwrap();
    (0..n).map(|i| rt.put(&(i * 10)).unwrap()).collect()
}

/// Calls `counter` from wherever this task runs: its host and the count.
#[braid::remote]
fn bump(counter: CounterHandle, by: u64) -> (String, u64) {
    (host_name(), counter.incr(by).blocking().unwrap())
}

/// A counter whose state lives in its actor process.
#[braid::actor]
pub struct Counter {
    n: u64,
}

#[braid::actor]
impl Counter {
    fn new(start: u64) -> Self {
        Counter { n: start }
    }
    fn incr(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }
    fn host(&self) -> String {
        host_name()
    }
    fn exit(&self) {
        std::process::exit(3);
    }
}

/// Options that place a task on the node offering custom resource `name`.
fn on(name: &str) -> TaskOptions {
    TaskOptions::default().resource(name, 1.0)
}

/// The driver of `hosts_tasks_actor_calls_and_objects_cross_hosts`, on
/// host 0; host 1's node offers `b`, host 2's offers `c`.
fn across(rt: &Runtime) {
    // Tasks run on the host with the resource, and their values come back.
    let b = rt.get_blocking(&where_am_i::remote_with(rt, &on("b")).unwrap());
    let c = rt.get_blocking(&where_am_i::remote_with(rt, &on("c")).unwrap());
    assert_eq!(
        (b.unwrap(), c.unwrap()),
        ("braid-host-1".into(), "braid-host-2".into())
    );
    // A reference owned here is an argument there.
    let x = rt.put(&40i64).unwrap();
    let y = add::remote_with(rt, &on("b"), &x, 2i64).unwrap();
    assert_eq!(rt.get_blocking(&y).unwrap(), 42);
    // References owned by a worker on another host resolve here.
    let refs = rt.get_blocking(&make_refs::remote_with(rt, &on("b"), 3).unwrap());
    let values: Vec<i64> = refs
        .unwrap()
        .iter()
        .map(|r| rt.get_blocking(r).unwrap())
        .collect();
    assert_eq!(values, vec![0, 10, 20]);
    // An object made on one host is read on two others.
    let made = make_big::remote_with(rt, &on("b"), 7).unwrap();
    let want = checksum(&pattern(7));
    let here = rt.get_blocking(&made).unwrap();
    assert_eq!(checksum(&here), want, "read on host 0");
    let there = rt.get_blocking(&read_big::remote_with(rt, &on("c"), &made).unwrap());
    assert_eq!(
        there.unwrap(),
        ("braid-host-2".into(), want),
        "read on host 2"
    );
    // An object put here is read on another host.
    let put = rt.put(&pattern(9)).unwrap();
    let read = rt.get_blocking(&read_big::remote_with(rt, &on("b"), &put).unwrap());
    assert_eq!(
        read.unwrap(),
        ("braid-host-1".into(), checksum(&pattern(9)))
    );
    // An actor on host 1 is called from here and, through its handle, from
    // a task on host 2.
    let counter = Counter::remote(rt, 1)
        .resource("b", 1.0)
        .spawn_blocking()
        .unwrap();
    assert_eq!(counter.host().blocking().unwrap(), "braid-host-1");
    assert_eq!(counter.incr(1).blocking().unwrap(), 2);
    let bumped = bump::remote_with(rt, &on("c"), counter.clone(), 5).unwrap();
    assert_eq!(
        rt.get_blocking(&bumped).unwrap(),
        ("braid-host-2".into(), 7)
    );
    // Its death reaches the caller as a typed error, not a hang.
    let _ = counter.exit().blocking();
    match counter.incr(1).blocking() {
        Err(Error::ActorDied { .. }) => {}
        other => panic!("a call to a dead actor on another host: {other:?}"),
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
        "across" => across(&rt),
        other => panic!("unknown role {other}"),
    }
    println!("DRIVER-OK");
}

#[test]
fn hosts_tasks_actor_calls_and_objects_cross_hosts() {
    let Some(hosts) = Hosts::for_test("hosts_tasks_actor_calls_and_objects_cross_hosts", 3) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 0).unwrap();
    cluster
        .add_node(1, 2, &["--resources", r#"{"b": 4}"#])
        .unwrap();
    cluster
        .add_node(2, 2, &["--resources", r#"{"c": 4}"#])
        .unwrap();
    let out = cluster.driver(0, "across").unwrap().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DRIVER-OK"),
        "driver on host 0 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
