//! The head's dashboard on a real embedded cluster running an actor, a
//! task and an online-learning stream job: its JSON under `/api/` wants
//! the cluster token; `/?token=` trades it for a cookie; and each page,
//! loaded in headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs), shows the cluster's nodes, actors, jobs, the stream job's
//! operators and checkpoints, and the learning curves in its DOM. A
//! screenshot of each page is saved under the target directory. Without a
//! `chromium` binary the test fails and says how to get one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::rpc::HeadClient;
use braid::telemetry::http::get;
use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::train::data::{SyntheticConfig, SyntheticStream};
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::PsConfig;
use braid_tests::browser::{first_view_ms, load};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A gauge of its own in an actor process.
#[braid::actor]
pub struct Meter {
    n: u64,
}

#[braid::actor]
impl Meter {
    fn new() -> Self {
        Meter { n: 0 }
    }

    fn tick(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
}

#[braid::remote]
fn double(x: u64) -> u64 {
    2 * x
}

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The job's name, as its series label it.
const JOB: &str = "dashboard-learning";

/// Synthetic rows until `stop` is set, then the end of the input: the job
/// runs for as long as the test looks at it, however slow the browser.
struct UntilStopped {
    rows: SyntheticReader,
    stop: Arc<AtomicBool>,
}

impl RowReader for UntilStopped {
    fn read(
        &mut self,
        batch: &mut braid_actors::train::data::FeatureBatch,
        max_rows: usize,
    ) -> Result<usize, braid_actors::train::data::DataError> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(0);
        }
        self.rows.read(batch, max_rows)
    }

    fn offset(&self) -> Vec<u8> {
        self.rows.offset()
    }

    fn seek(&mut self, offset: &[u8]) -> Result<(), braid_actors::train::data::DataError> {
        self.rows.seek(offset)
    }
}

/// Starts an online-learning job in this process (local runner):
/// synthetic rows at 20,000 rows/s until the returned flag is set,
/// checkpointed every 200 ms, with a thread querying serving every
/// millisecond until then. Returns the job's thread and the flag.
fn start_learning() -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
    let ftrl = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let mut config = PipelineConfig::new(PsConfig::new(JOB, 2, 2, ftrl));
    config.batch_rows = 256;
    config.rate = Some(20_000.0);
    let env = StreamEnv::new(1);
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let handles = pipeline::build(&env, config, move || {
        let stream = SyntheticStream::new(SyntheticConfig {
            rows: 100_000_000,
            bits: 18,
            ..SyntheticConfig::default()
        })?;
        Ok(Box::new(UntilStopped {
            rows: SyntheticReader(stream),
            stop: stop.clone(),
        }) as Box<dyn RowReader>)
    })
    .unwrap();
    let querying = done.clone();
    let serving = handles.serving.clone();
    std::thread::spawn(move || {
        let ids = [1u64, 7, 42];
        while !querying.load(Ordering::Relaxed) {
            let _ = serving.predict([(&ids[..], None)]);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let plan = Plan::new(env.into_graph());
    let job = std::thread::spawn(move || {
        let mut config = JobConfig::new(CheckpointStorage::in_memory(JOB, 3));
        config.checkpoint_interval = Duration::from_millis(200);
        local::run(&plan, config).unwrap();
    });
    (job, done)
}

/// Waits until the head's `/api/series` has every family in `names` for
/// the learning job.
fn await_series(address: &str, token: &str, names: &[&str]) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = block(get(
            address,
            "/api/series",
            Some(token),
            Duration::from_secs(5),
        ));
        let series: Value = answer
            .ok()
            .and_then(|a| serde_json::from_str(&a.body).ok())
            .unwrap_or(Value::Null);
        let has = |name: &str| {
            series.as_array().is_some_and(|all| {
                all.iter()
                    .any(|s| s["name"] == name && s["labels"]["job"] == JOB)
            })
        };
        if names.iter().all(|n| has(n)) {
            return series;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the series never held {names:?}: {series}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_dashboard_shows_the_cluster_in_a_browser() {
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).unwrap();
    let (learning, stop_queries) = start_learning();
    let meter = block(Meter::remote(&rt).name("dashboard-meter").spawn()).unwrap();
    block(meter.tick()).unwrap();
    let r = double::remote(&rt, 21).unwrap();
    assert_eq!(rt.get_blocking(&r).unwrap(), 42);
    let status = block(async {
        HeadClient::connect(rt.address(), rt.token())
            .await
            .unwrap()
            .cluster_status()
            .await
            .unwrap()
    });
    let address = status.metrics_address.clone();
    let node = status.nodes[0].info.node_id.to_string()[..8].to_string();
    let job = status.jobs[0].info.job_id.to_string()[..8].to_string();
    let wait = Duration::from_secs(5);

    // The JSON wants the token.
    for path in ["/api/nodes", "/api/actors", "/api/jobs", "/api/series", "/"] {
        let refused = block(get(&address, path, None, wait)).unwrap();
        assert_eq!(refused.status, 401, "{path} without the token");
    }
    let actors: Value = serde_json::from_str(
        &block(get(&address, "/api/actors", Some(rt.token()), wait))
            .unwrap()
            .body,
    )
    .unwrap();
    let mine = actors
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "dashboard-meter")
        .cloned()
        .expect("the actor in /api/actors");
    assert_eq!(mine["state"], "ALIVE");
    assert!(mine["worker_pid"].as_u64().unwrap() > 0);
    let series: Value = serde_json::from_str(
        &block(get(&address, "/api/series", Some(rt.token()), wait))
            .unwrap()
            .body,
    )
    .unwrap();
    let names: Vec<&str> = series
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(names.contains(&"braid_cluster_nodes"), "{names:?}");
    assert!(names.contains(&"braid_store_capacity_bytes"), "{names:?}");

    // The stream job's and the learning job's series reach the head from
    // this driver's node.
    let series = await_series(
        &address,
        rt.token(),
        &[
            "braid_stream_records_in",
            "braid_stream_records_out",
            "braid_stream_backpressure_seconds",
            "braid_stream_checkpoint_last_id",
            "braid_learning_rows",
            "braid_learning_auc",
            "braid_learning_model_version",
            "braid_serving_requests",
        ],
    );
    let worker_in = series
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "braid_stream_records_in" && s["labels"]["job"] == JOB)
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum::<f64>();
    assert!(worker_in > 0.0, "no records counted: {series}");

    // Opening the printed URL trades the token for a cookie.
    let login = block(get(
        &address,
        &format!("/?token={}", rt.token()),
        None,
        wait,
    ))
    .unwrap();
    assert!(
        (300..400).contains(&login.status),
        "status {}",
        login.status
    );
    assert_eq!(login.header("location"), Some("/"));
    let cookie = login.header("set-cookie").unwrap_or_default();
    assert!(
        cookie.starts_with(&format!("braid_token={}", rt.token())) && cookie.contains("HttpOnly"),
        "{cookie}"
    );

    // Each page in a browser: its DOM holds the cluster's state.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let pages: [(&str, Vec<String>); 5] = [
        (
            "overview",
            vec![node.clone(), "Object store".into(), "CPU in use".into()],
        ),
        (
            "actors",
            vec![
                "dashboard-meter".into(),
                "Meter".into(),
                "ALIVE".into(),
                node.clone(),
            ],
        ),
        ("jobs", vec![job.clone(), "RUNNING".into()]),
        (
            "streams",
            vec![
                format!("Job {JOB}"),
                "source".into(),
                "Checkpoint history".into(),
                "backpressure".into(),
            ],
        ),
        (
            "learning",
            vec![
                format!("Job {JOB}"),
                "Window AUC".into(),
                "Rows trained".into(),
            ],
        ),
    ];
    let profile = tempfile::tempdir().unwrap();
    for (page, expected) in pages {
        let url = format!("http://{address}/?token={}#{page}", rt.token());
        let dom = load(profile.path(), &url, &["--dump-dom"]);
        assert!(
            dom.contains(&format!("data-view=\"{page}\"")),
            "{page} was not drawn:\n{dom}"
        );
        for text in &expected {
            assert!(dom.contains(text.as_str()), "{page} lacks {text:?}:\n{dom}");
        }
        let drawn_ms = first_view_ms(&dom);
        let drawn_ms = drawn_ms.unwrap_or_else(|| panic!("no first-draw time in {page}:\n{dom}"));
        eprintln!("dashboard {page}: first view drawn {drawn_ms} ms after navigation");
        let shot = shots.join(format!("{page}.png"));
        load(
            profile.path(),
            &url,
            &[
                "--window-size=1280,800",
                &format!("--screenshot={}", shot.display()),
            ],
        );
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "no screenshot of {page} at {}", shot.display());
        eprintln!("screenshot: {}", shot.display());
    }
    stop_queries.store(true, Ordering::Relaxed);
    learning.join().unwrap();
}
