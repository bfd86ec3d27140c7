//! A node killed outright: objects whose only copy lived in its store, made
//! by a task that needs a resource only that node had (so lineage cannot
//! rebuild them), are lost, and `get` says so with a typed error instead of
//! hanging; the rest of the cluster keeps working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Resources, TaskOptions};
use std::time::Duration;

#[braid::remote]
fn big_on_node(len: usize) -> Vec<u8> {
    vec![3u8; len]
}

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[tokio::test]
async fn get_on_a_dead_nodes_objects_returns_object_lost() {
    let rt = braid::InitOptions::new()
        .num_cpus(2.0)
        .extra_node(1.0, Resources::new().with("doomed", 1.0))
        .init()
        .await
        .unwrap();
    let opts = TaskOptions::new().resource("doomed", 1.0);
    let r = big_on_node::remote_with(&rt, &opts, 2 << 20).unwrap();
    let (ready, _) = rt
        .wait(std::slice::from_ref(&r), 1, Some(Duration::from_secs(30)))
        .await;
    assert_eq!(ready.len(), 1, "the task finished on the doomed node");
    let doomed = rt
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.info.resources_total.contains_key("doomed"))
        .unwrap();
    let pid = rustix::process::Pid::from_raw(doomed.info.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();

    let got = tokio::time::timeout(Duration::from_secs(30), rt.get(&r))
        .await
        .expect("get returns instead of hanging");
    assert!(matches!(got.unwrap_err(), Error::ObjectLost { id, .. } if id == r.id()));

    let still = add::remote(&rt, 1, 2).unwrap();
    assert_eq!(
        rt.get(&still).await.unwrap(),
        3,
        "the surviving node keeps serving"
    );
    rt.shutdown().await;
}
