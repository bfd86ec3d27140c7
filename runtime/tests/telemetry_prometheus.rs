//! A real Prometheus (Debian's `prometheus`, which `.ci/run` installs)
//! scrapes an embedded cluster's head and node with the cluster token, and
//! its query API then holds braid's series with plausible values. Without
//! a `prometheus` binary the test fails and says how to get one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::rpc::HeadClient;
use braid::telemetry::http::get;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[braid::remote]
fn cube(x: u64) -> u64 {
    x * x * x
}

/// The `prometheus` binary: `BRAID_PROMETHEUS`, else on `PATH`.
fn prometheus_binary() -> PathBuf {
    if let Ok(path) = std::env::var("BRAID_PROMETHEUS") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!(
            "no `prometheus` binary on PATH: install Debian's prometheus package \
             (apt-get install prometheus; .ci/run does) or set BRAID_PROMETHEUS"
        ),
    }
}

/// A Prometheus server this test started; killed (by pid) and reaped on
/// drop.
struct Prometheus {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on loopback now (Prometheus takes no port 0 it would
/// report back).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn start_prometheus(dir: &std::path::Path, config: &str) -> Prometheus {
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let binary = prometheus_binary();
    let mut last = String::new();
    for attempt in 0..3 {
        let address = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("prometheus-{attempt}.log"));
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join(format!("data-{attempt}")).display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut server = Prometheus {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                last = format!(
                    "prometheus exited with {status}: {}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
                break;
            }
            let ready = tokio_block(get(
                &server.address,
                "/-/ready",
                None,
                Duration::from_secs(2),
            ));
            if matches!(ready, Ok(ref a) if a.status == 200) {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not get ready: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("prometheus did not start: {last}");
}

fn tokio_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// `query` percent-encoded for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; returns each result's labels and value.
fn query(server: &Prometheus, promql: &str) -> Vec<(Value, f64)> {
    let answer = tokio_block(get(
        &server.address,
        &format!("/api/v1/query?query={}", encode(promql)),
        None,
        Duration::from_secs(5),
    ))
    .unwrap();
    assert_eq!(answer.status, 200, "{promql}: {}", answer.body);
    let json: Value = serde_json::from_str(&answer.body).unwrap();
    json["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap().parse().unwrap();
            (r["metric"].clone(), value)
        })
        .collect()
}

/// Waits until `promql` returns a sample whose value satisfies `good`.
fn await_value(server: &Prometheus, promql: &str, good: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let results = query(server, promql);
        if let Some((_, v)) = results.iter().find(|(_, v)| good(*v)) {
            return *v;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never had a fitting {promql}: {results:?}\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_the_head_and_the_node() {
    let binary = prometheus_binary();
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).unwrap();
    let status = tokio_block(async {
        let head = HeadClient::connect(rt.address(), rt.token()).await.unwrap();
        head.cluster_status().await.unwrap()
    });
    let head_metrics = status.metrics_address.clone();
    let node_metrics = status.nodes[0].info.metrics_address.clone();
    assert!(!head_metrics.is_empty() && !node_metrics.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n\
         \x20 - job_name: braid-head\n    authorization:\n      credentials: {token}\n    static_configs:\n      - targets: ['{head_metrics}']\n\
         \x20 - job_name: braid-node\n    authorization:\n      credentials: {token}\n    static_configs:\n      - targets: ['{node_metrics}']\n\
         \x20 - job_name: braid-no-token\n    static_configs:\n      - targets: ['{head_metrics}']\n",
        token = rt.token()
    );
    let server = start_prometheus(dir.path(), &config);
    eprintln!("prometheus {} at {}", binary.display(), server.address);

    let refs: Vec<_> = (0..30).map(|i| cube::remote(&rt, i).unwrap()).collect();
    for r in &refs {
        rt.get_blocking(r).unwrap();
    }

    // Both targets are up with the token; without it the head refuses.
    await_value(&server, "up{job=\"braid-head\"}", |v| v == 1.0);
    await_value(&server, "up{job=\"braid-node\"}", |v| v == 1.0);
    await_value(&server, "up{job=\"braid-no-token\"}", |v| v == 0.0);

    // Named series with plausible values.
    await_value(
        &server,
        "braid_cluster_nodes{job=\"braid-head\",state=\"alive\"}",
        |v| v == 1.0,
    );
    await_value(
        &server,
        "braid_cluster_resource_capacity{job=\"braid-head\",resource=\"CPU\"}",
        |v| v == 2.0,
    );
    let capacity = await_value(
        &server,
        "braid_store_capacity_bytes{job=\"braid-node\"}",
        |v| v > 0.0,
    );
    await_value(&server, "braid_store_used_bytes{job=\"braid-node\"}", |v| {
        (0.0..=capacity).contains(&v)
    });
    await_value(
        &server,
        "braid_tasks_finished_total{job=\"braid-node\",name=\"cube\"}",
        |v| v >= 30.0,
    );
    await_value(
        &server,
        "braid_tasks_submitted_total{job=\"braid-head\",name=\"cube\"}",
        |v| v >= 30.0,
    );
    await_value(
        &server,
        "histogram_quantile(0.5, braid_tasks_run_seconds_bucket{job=\"braid-node\",name=\"cube\"})",
        |v| v > 0.0 && v < 10.0,
    );
    drop(server);
}
