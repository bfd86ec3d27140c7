//! The head's dashboard on a real embedded cluster: its JSON under `/api/`
//! wants the cluster token; `/?token=` trades it for a cookie; and each
//! page, loaded in headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs), shows the cluster's nodes, actors and jobs in its DOM. A
//! screenshot of each page is saved under the target directory. Without a
//! `chromium` binary the test fails and says how to get one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::rpc::HeadClient;
use braid::telemetry::http::get;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
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

/// The Chromium binary: `BRAID_CHROMIUM`, else `chromium` or
/// `chromium-browser` on `PATH`.
fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("BRAID_CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| [dir.join("chromium"), dir.join("chromium-browser")])
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!(
            "no `chromium` binary on PATH: install Debian's chromium package \
             (apt-get install chromium; .ci/run does) or set BRAID_CHROMIUM"
        ),
    }
}

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout.
fn run_chromium(profile: &Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn the_dashboard_shows_the_cluster_in_a_browser() {
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).unwrap();
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
        ("streams", vec!["Stream jobs".into()]),
        ("learning", vec!["Online learning".into()]),
    ];
    let profile = tempfile::tempdir().unwrap();
    for (page, expected) in pages {
        let url = format!("http://{address}/?token={}#{page}", rt.token());
        let dom = run_chromium(profile.path(), &url, &["--dump-dom"]);
        assert!(
            dom.contains(&format!("data-view=\"{page}\"")),
            "{page} was not drawn:\n{dom}"
        );
        for text in &expected {
            assert!(dom.contains(text.as_str()), "{page} lacks {text:?}:\n{dom}");
        }
        let drawn_ms: Option<u64> = dom
            .split("id=\"load-ms\" data-done=\"1\">")
            .nth(1)
            .and_then(|rest| rest.split('<').next())
            .and_then(|ms| ms.trim().parse().ok());
        let drawn_ms = drawn_ms.unwrap_or_else(|| panic!("no first-draw time in {page}:\n{dom}"));
        eprintln!("dashboard {page}: first view drawn {drawn_ms} ms after navigation");
        let shot = shots.join(format!("{page}.png"));
        run_chromium(
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
}
