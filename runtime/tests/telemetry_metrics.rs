//! `/metrics` on a real embedded cluster: the head's endpoint wants the
//! cluster token, serves the cluster's series and its node's, and counts
//! the tasks and actor calls this driver and its workers ran, by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::rpc::HeadClient;
use braid::telemetry::http::get;
use braid::Runtime;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[braid::remote]
fn square(x: u64) -> u64 {
    x * x
}

#[braid::remote]
fn fails(x: u64) -> u64 {
    if x > 0 {
        panic!("refused {x}");
    }
    x
}

/// A running sum in an actor process.
#[braid::actor]
pub struct Tally {
    n: u64,
}

#[braid::actor]
impl Tally {
    fn new() -> Self {
        Tally { n: 0 }
    }

    fn add(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0))
            .expect("embedded cluster")
    })
}

const WAIT: Duration = Duration::from_secs(5);

/// The head's `/metrics` address, from its status.
async fn metrics_address(rt: &Runtime) -> String {
    let head = HeadClient::connect(rt.address(), rt.token()).await.unwrap();
    let status = head.cluster_status().await.unwrap();
    assert!(
        !status.metrics_address.is_empty(),
        "the head reports no /metrics address"
    );
    status.metrics_address
}

/// The value of the sample line that starts with `prefix` (the series
/// name with its labels), if the text has one.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_want_the_token() {
    let rt = rt();
    let address = metrics_address(rt).await;
    let none = get(&address, "/metrics", None, WAIT).await.unwrap();
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.body.contains("token"), "{}", none.body);
    let wrong = get(&address, "/metrics", Some("not-the-token"), WAIT)
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let right = get(&address, "/metrics", Some(rt.token()), WAIT)
        .await
        .unwrap();
    assert_eq!(right.status, 200);
    assert!(right.body.ends_with("# EOF\n"));
    assert_eq!(right.body.matches("# EOF").count(), 1);
}

#[tokio::test]
async fn the_head_serves_the_cluster_and_its_node() {
    let rt = rt();
    let address = metrics_address(rt).await;
    let text = get(&address, "/metrics", Some(rt.token()), WAIT)
        .await
        .unwrap()
        .body;
    assert_eq!(
        sample(&text, "braid_cluster_nodes{state=\"alive\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "braid_cluster_resource_capacity{resource=\"CPU\"}"),
        Some(2.0),
        "{text}"
    );
    // The node's series, fetched by the head.
    assert_eq!(
        sample(&text, "braid_node_resource_capacity{resource=\"CPU\"}"),
        Some(2.0),
        "{text}"
    );
    let capacity = sample(&text, "braid_store_capacity_bytes").unwrap();
    assert!(capacity > 0.0, "{text}");
    assert!(sample(&text, "braid_store_used_bytes").is_some(), "{text}");
    assert!(
        sample(&text, "braid_store_transfers_total{direction=\"in\"}").is_some(),
        "{text}"
    );
}

#[tokio::test]
async fn tasks_and_calls_are_counted_by_name() {
    let rt = rt();
    let refs: Vec<_> = (0..20).map(|i| square::remote(rt, i).unwrap()).collect();
    for r in &refs {
        rt.get(r).await.unwrap();
    }
    let failed = fails::remote(rt, 3).unwrap();
    assert!(rt.get(&failed).await.is_err());
    let tally = Tally::remote(rt).spawn().await.unwrap();
    for _ in 0..7 {
        tally.add(1).await.unwrap();
    }
    let address = metrics_address(rt).await;
    // Workers and this driver report every second: wait for the figures.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = get(&address, "/metrics", Some(rt.token()), WAIT)
            .await
            .unwrap()
            .body;
        let submitted = sample(&text, "braid_tasks_submitted_total{name=\"square\"}");
        let finished = sample(&text, "braid_tasks_finished_total{name=\"square\"}");
        let failed = sample(&text, "braid_tasks_failed_total{name=\"fails\"}");
        let calls = sample(
            &text,
            "braid_actor_calls_finished_total{name=\"Tally.add\"}",
        );
        let call_runs = sample(
            &text,
            "braid_actor_calls_run_seconds_count{name=\"Tally.add\"}",
        );
        let waits = sample(&text, "braid_tasks_queue_seconds_count{name=\"square\"}");
        let settled = submitted >= Some(20.0)
            && finished >= Some(20.0)
            && failed >= Some(1.0)
            && calls >= Some(7.0)
            && call_runs >= Some(7.0)
            && waits >= Some(20.0);
        if settled {
            assert!(
                sample(
                    &text,
                    "braid_tasks_run_seconds_bucket{le=\"+Inf\",name=\"square\"}"
                ) >= Some(20.0),
                "{text}"
            );
            assert!(
                sample(
                    &text,
                    "braid_actor_calls_submitted_total{name=\"Tally.add\"}"
                ) >= Some(7.0),
                "{text}"
            );
            assert!(
                sample(&text, "braid_node_workers{state=\"actor\"}") >= Some(1.0),
                "{text}"
            );
            assert!(
                sample(&text, "braid_cluster_actors{state=\"ALIVE\"}") >= Some(1.0),
                "{text}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the figures never arrived: submitted {submitted:?}, finished {finished:?}, \
             failed {failed:?}, calls {calls:?}, runs {call_runs:?}, waits {waits:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
