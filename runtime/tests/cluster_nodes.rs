//! Several nodes on one machine, each with its own object store: arguments
//! transferred between nodes, copies freed everywhere when the last
//! reference goes, placement by custom resources, node affinity and
//! placement groups, infeasible demands, and retries when a worker dies
//! mid-task.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, NodeId, ObjectRef, PlacementStrategy, Resources, Runtime, TaskOptions};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[braid::remote]
fn node_of_task() -> NodeId {
    braid::current().unwrap().node_id()
}

#[braid::remote]
fn sum_on_node(values: Vec<u64>) -> (u64, NodeId) {
    (values.iter().sum(), braid::current().unwrap().node_id())
}

#[braid::remote]
fn hold_then_report(values: Vec<u64>) -> usize {
    values.len()
}

#[braid::remote]
fn pid_then_sleep(marker: String) -> String {
    if std::path::Path::new(&marker).exists() {
        return "retried".into();
    }
    std::fs::write(&marker, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(30));
    "first attempt".into()
}

/// Reports the node it was placed on.
#[braid::actor]
pub struct Where;

#[braid::actor]
impl Where {
    fn new() -> Self {
        Where
    }

    fn node(&self) -> NodeId {
        braid::current().unwrap().node_id()
    }
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(
            braid::InitOptions::new()
                .num_cpus(2.0)
                .extra_node(2.0, Resources::new().with("node_b", 4.0)),
        )
        .expect("cluster")
    })
}

async fn node_b(rt: &Runtime) -> braid::rpc::NodeRecord {
    rt.nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.info.resources_total.contains_key("node_b"))
        .expect("node b")
}

fn on_b() -> TaskOptions {
    TaskOptions::new().resource("node_b", 1.0)
}

#[tokio::test]
async fn two_nodes_each_with_a_store() {
    let rt = rt();
    let nodes = rt.nodes().await.unwrap();
    assert_eq!(nodes.iter().filter(|n| n.alive).count(), 2);
    assert_ne!(nodes[0].info.store_socket, nodes[1].info.store_socket);
}

#[tokio::test]
async fn an_argument_living_on_another_node_is_transferred() {
    let rt = rt();
    let b = node_b(rt).await;
    let values: Vec<u64> = (0..1_000_000).collect();
    let x = rt.put(&values).unwrap();
    let r = sum_on_node::remote_with(rt, &on_b(), &x).unwrap();
    let (total, node) = rt.get(&r).await.unwrap();
    assert_eq!(total, values.iter().sum::<u64>());
    assert_eq!(node, b.info.node_id, "the task ran on node b");
    assert_ne!(node, rt.node_id());
}

#[tokio::test]
async fn copies_on_every_node_are_freed_with_the_last_reference() {
    let rt = rt();
    let b = node_b(rt).await;
    let x = rt.put(&vec![7u64; 500_000]).unwrap();
    let id = x.id();
    let r = hold_then_report::remote_with(rt, &on_b(), &x).unwrap();
    assert_eq!(rt.get(&r).await.unwrap(), 500_000);
    let store_b = braid::store::StoreClient::connect(&b.info.store_socket).unwrap();
    assert!(store_b.contains(id).unwrap(), "node b holds a copy");
    assert!(
        rt.store().contains(id).unwrap(),
        "the driver's node holds the primary"
    );
    drop(x);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.store().contains(id).unwrap() || store_b.contains(id).unwrap() {
        assert!(
            Instant::now() < deadline,
            "a copy outlived the last reference"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn node_affinity_and_custom_resources_decide_placement() {
    let rt = rt();
    let b = node_b(rt).await;
    let opts = TaskOptions::new().node_affinity(rt.node_id(), false);
    let here = node_of_task::remote_with(rt, &opts).unwrap();
    assert_eq!(rt.get(&here).await.unwrap(), rt.node_id());
    let opts = TaskOptions::new().node_affinity(b.info.node_id, false);
    let there = node_of_task::remote_with(rt, &opts).unwrap();
    assert_eq!(rt.get(&there).await.unwrap(), b.info.node_id);
    let by_resource = node_of_task::remote_with(rt, &on_b()).unwrap();
    assert_eq!(rt.get(&by_resource).await.unwrap(), b.info.node_id);
}

#[tokio::test]
async fn an_infeasible_demand_is_a_typed_error() {
    let rt = rt();
    let r: ObjectRef<NodeId> =
        node_of_task::remote_with(rt, &TaskOptions::new().resource("GPU", 1.0)).unwrap();
    assert!(matches!(rt.get(&r).await, Err(Error::Infeasible(_))));
}

#[tokio::test]
async fn placement_groups_pack_or_spread_their_bundles() {
    let rt = rt();
    let bundle = || Resources::cpus(0.5);
    let spread = rt
        .placement_group(vec![bundle(), bundle()], PlacementStrategy::Spread)
        .await
        .unwrap();
    assert_ne!(
        spread.node_of(0),
        spread.node_of(1),
        "spread over two nodes"
    );
    for i in 0..2 {
        let a = Where::remote(rt)
            .placement_group(&spread, i)
            .spawn()
            .await
            .unwrap();
        assert_eq!(Some(a.node().await.unwrap()), spread.node_of(i));
        let t = node_of_task::remote_with(
            rt,
            &TaskOptions::new().num_cpus(0.5).placement_group(&spread, i),
        )
        .unwrap();
        assert_eq!(Some(rt.get(&t).await.unwrap()), spread.node_of(i));
    }
    rt.remove_placement_group(&spread).await.unwrap();

    let pack = rt
        .placement_group(vec![bundle(), bundle()], PlacementStrategy::Pack)
        .await
        .unwrap();
    assert_eq!(pack.node_of(0), pack.node_of(1), "packed on one node");
    rt.remove_placement_group(&pack).await.unwrap();
}

async fn kill_when_started(marker: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Ok(text) = std::fs::read_to_string(marker) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

#[tokio::test]
async fn a_worker_killed_mid_task_is_retried_then_reported() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("first");
    let r = pid_then_sleep::remote(rt, marker.display().to_string()).unwrap();
    kill_when_started(&marker).await;
    assert_eq!(rt.get(&r).await.unwrap(), "retried");

    let marker = dir.path().join("no-retries");
    let opts = TaskOptions::new().max_retries(0);
    let r = pid_then_sleep::remote_with(rt, &opts, marker.display().to_string()).unwrap();
    kill_when_started(&marker).await;
    match rt.get(&r).await {
        Err(Error::WorkerDied {
            function, attempts, ..
        }) => {
            assert!(function.ends_with("pid_then_sleep"));
            assert_eq!(attempts, 1);
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
}
