//! The `braid` command line end to end: `start --head`, `start --address`,
//! `status`, `stop`, and its usage errors. Every test runs the real binary
//! with its own `BRAID_TMPDIR`, so it sees (and stops) only its own
//! clusters, and stops them in a guard even when it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::daemons_under;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Once;

const BRAID: &str = env!("CARGO_BIN_EXE_braid");

/// A private `BRAID_TMPDIR` and the `braid` commands run with it. Dropping
/// it runs `braid stop` and reaps the stopped daemons.
struct Braid {
    dir: tempfile::TempDir,
    /// The `BRAID_TMPDIR`: `dir` or a directory deep inside it.
    root: PathBuf,
    /// Every daemon seen running after a command, to reap once stopped.
    seen: RefCell<BTreeSet<u32>>,
}

impl Braid {
    fn new() -> Braid {
        // Daemons detach from `braid start`, which exits; as a subreaper
        // this test process inherits them and can reap them once stopped.
        static SUBREAPER: Once = Once::new();
        SUBREAPER.call_once(|| {
            let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
        });
        let dir = tempfile::tempdir().unwrap();
        Braid {
            root: dir.path().to_owned(),
            dir,
            seen: RefCell::default(),
        }
    }

    /// A `Braid` whose `BRAID_TMPDIR` path is `len` bytes long.
    fn deep(len: usize) -> Braid {
        let mut braid = Braid::new();
        let base = braid.dir.path().as_os_str().len();
        braid.root = braid.dir.path().join("d".repeat(len - base - 1));
        std::fs::create_dir(&braid.root).unwrap();
        braid
    }

    /// Runs `braid args...` to completion.
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(BRAID)
            .args(args)
            .env("BRAID_TMPDIR", &self.root)
            .env_remove("BRAID_ADDRESS")
            .env_remove("BRAID_TOKEN")
            .env_remove("BRAID_ROLE")
            .output()
            .unwrap();
        self.daemons();
        out
    }

    /// Runs `braid args...` and checks it succeeded.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "braid {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `braid status --json`, parsed; checks it is exactly one line.
    fn status(&self) -> Value {
        let text = self.ok(&["status", "--json"]);
        assert_eq!(text.trim_end().lines().count(), 1, "{text}");
        serde_json::from_str(text.trim_end()).unwrap()
    }

    /// Starts a cluster of one head and its node with `cpus` CPUs; returns
    /// the head's address.
    fn start_head(&self, cpus: &str) -> String {
        let out = self.ok(&[
            "start",
            "--head",
            "--port",
            "0",
            "--num-cpus",
            cpus,
            "--object-store-memory",
            "64MiB",
        ]);
        assert!(out.contains("BRAID_ADDRESS="), "{out}");
        assert!(out.contains("braid stop"), "{out}");
        self.status()["address"].as_str().unwrap().to_owned()
    }

    /// This user's braid directory under the private `BRAID_TMPDIR`.
    fn user_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("braid-{}", rustix::process::getuid().as_raw()))
    }

    /// The cluster file of `address`.
    fn cluster_file(&self, address: &str) -> PathBuf {
        self.user_dir()
            .join(format!("cluster-{}.json", address.replace([':', '/'], "_")))
    }

    /// Live braid processes of this user started with this `BRAID_TMPDIR`.
    fn daemons(&self) -> Vec<(u32, String)> {
        let found = daemons_under(&self.root);
        self.seen
            .borrow_mut()
            .extend(found.iter().map(|(pid, _)| *pid));
        found
    }
}

impl Drop for Braid {
    fn drop(&mut self) {
        let _ = self.run(&["stop"]);
        for pid in self.seen.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                // Reaps it if it is our (inherited) child and has exited.
                let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
            }
        }
    }
}

fn count(daemons: &[(u32, String)], name: &str) -> usize {
    daemons.iter().filter(|(_, n)| n == name).count()
}

fn nodes(status: &Value) -> &Vec<Value> {
    status["nodes"].as_array().unwrap()
}

#[test]
fn start_join_status_and_stop() {
    let braid = Braid::new();
    let address = braid.start_head("2");
    assert!(braid.cluster_file(&address).is_file());

    let status = braid.status();
    assert_eq!(nodes(&status).len(), 1, "{status}");
    let head_node = &nodes(&status)[0];
    assert_eq!(head_node["resources_total"]["CPU"], 2.0, "{status}");
    assert_eq!(head_node["is_head_node"], true);
    assert_eq!(head_node["alive"], true);
    assert_eq!(head_node["store_capacity"], 64u64 << 20);
    assert!(status["cluster_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    for list in ["actors", "placement_groups", "jobs"] {
        assert!(status[list].as_array().is_some(), "{list}: {status}");
    }

    // The token comes from the cluster file the head's start wrote.
    let out = braid.ok(&[
        "start",
        "--address",
        &address,
        "--num-cpus",
        "1",
        "--object-store-memory",
        "64MiB",
        "--resources",
        r#"{"GPU": 1}"#,
    ]);
    let status = braid.status();
    let nodes = nodes(&status);
    assert_eq!(nodes.len(), 2, "{status}");
    let joined = nodes
        .iter()
        .find(|n| n["is_head_node"] == false)
        .expect("the joined node");
    assert!(out.contains(joined["node_id"].as_str().unwrap()), "{out}");
    assert_eq!(joined["resources_total"]["CPU"], 1.0);
    assert_eq!(joined["resources_total"]["GPU"], 1.0);
    assert!(nodes.iter().all(|n| n["alive"] == true));

    let text = braid.ok(&["status"]);
    assert!(text.contains("2 live nodes"), "{text}");
    assert!(text.contains("GPU 0/1"), "{text}");

    let running = braid.daemons();
    assert_eq!(count(&running, "braid-head"), 1, "{running:?}");
    assert_eq!(count(&running, "braid-node"), 2, "{running:?}");

    let out = braid.ok(&["stop"]);
    assert!(out.contains("Stopped 3"), "{out}");
    assert_eq!(braid.daemons(), Vec::new());
    assert!(!braid.cluster_file(&address).exists());
    assert!(!braid.run(&["status"]).status.success());
}

#[test]
fn a_wrong_token_is_refused() {
    let braid = Braid::new();
    let address = braid.start_head("1");
    let out = braid.run(&["start", "--address", &address, "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the token"), "{stderr}");
    let running = braid.daemons();
    assert_eq!(count(&running, "braid-node"), 1, "{running:?}");
    assert_eq!(nodes(&braid.status()).len(), 1);
}

#[test]
fn bad_flags_are_usage_errors() {
    let braid = Braid::new();
    let cases: &[(&[&str], &str)] = &[
        (&["start", "--head", "--num-cpus", "abc"], "--num-cpus"),
        (&["start", "--head", "--num-cpus", "-1"], "--num-cpus"),
        (&["start", "--head", "--num-cpus", "1e9"], "more than"),
        (
            &["start", "--head", "--resources", r#"{"GPU": 1e15}"#],
            "more than",
        ),
        (&["start", "--head", "--resources", "{bad"], "--resources"),
        (&["start", "--head", "--resources", "[1]"], "--resources"),
        (
            &["start", "--head", "--object-store-memory", "lots"],
            "--object-store-memory",
        ),
        (&["start", "--head", "--port", "http"], "--port"),
        (&["start", "--address", "nowhere"], "--address"),
        (&["frobnicate"], "frobnicate"),
        (&["start"], "--head"),
        (
            &["start", "--head", "--address", "127.0.0.1:1"],
            "--address",
        ),
        (&["status", "--verbose"], "--verbose"),
        // No token anywhere for a cluster this machine did not start.
        (&["start", "--address", "127.0.0.1:9"], "--token"),
    ];
    for (args, flag) in cases {
        let out = braid.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "braid {args:?}: {stderr}");
        assert!(stderr.contains(flag), "braid {args:?}: {stderr}");
    }
    assert_eq!(braid.daemons(), Vec::new());
}

#[test]
fn status_without_a_cluster_says_so() {
    let braid = Braid::new();
    for args in [&["status"][..], &["status", "--json"]] {
        let out = braid.run(args);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no cluster"), "{stderr}");
        assert!(stderr.contains("braid start --head"), "{stderr}");
    }
}

#[test]
fn a_failed_start_leaves_nothing_running() {
    let braid = Braid::new();
    // The head cannot listen on a port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = braid.run(&["start", "--head", "--port", &port]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("head did not start"), "{stderr}");
    assert_eq!(braid.daemons(), Vec::new());

    // The head starts but its node cannot map so large a store: the head
    // is stopped again and its cluster file removed.
    let out = braid.run(&[
        "start",
        "--head",
        "--port",
        "0",
        "--object-store-memory",
        "100000TiB",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node did not start"), "{stderr}");
    assert_eq!(braid.daemons(), Vec::new());
    let files: Vec<_> = std::fs::read_dir(braid.user_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cluster-"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

#[test]
fn help_answers_at_once_and_runs_nothing() {
    let braid = Braid::new();
    let commands: [&[&str]; 8] = [
        &["--help"],
        &["-h"],
        &["start", "--help"],
        &["start", "-h"],
        &["status", "--help"],
        &["stop", "--help"],
        &["stop", "-h"],
        &["microbenchmark", "--help"],
    ];
    for args in commands {
        let started = std::time::Instant::now();
        let out = braid.run(args);
        assert!(out.status.success(), "braid {args:?}: {}", out.status);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l.starts_with("Usage:")),
            "braid {args:?} printed no usage line:\n{stdout}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "braid {args:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            braid.daemons(),
            Vec::new(),
            "braid {args:?} started something"
        );
        assert!(
            !braid.user_dir().exists(),
            "braid {args:?} touched the user dir"
        );
    }
}

#[test]
fn start_serves_metrics_on_the_port_asked_and_status_shows_it() {
    let braid = Braid::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = braid.ok(&[
        "start",
        "--head",
        "--port",
        "0",
        "--metrics-port",
        &port.to_string(),
        "--num-cpus",
        "1",
        "--object-store-memory",
        "64MiB",
    ]);
    let url = format!("http://127.0.0.1:{port}/metrics");
    assert!(out.contains(&format!("metrics:     {url}")), "{out}");
    let status = braid.status();
    assert_eq!(status["metrics"].as_str(), Some(url.as_str()), "{status}");
    let node_url = nodes(&status)[0]["metrics"].as_str().unwrap().to_owned();
    assert!(
        node_url.ends_with("/metrics") && node_url != url,
        "{status}"
    );
    assert!(braid.ok(&["status"]).contains(&url));
    let address = status["address"].as_str().unwrap().to_owned();
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(braid.cluster_file(&address)).unwrap())
            .unwrap();
    let token = file["token"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let target = format!("127.0.0.1:{port}");
    let wait = std::time::Duration::from_secs(5);
    let refused = rt
        .block_on(braid::telemetry::http::get(&target, "/metrics", None, wait))
        .unwrap();
    assert_eq!(refused.status, 401);
    let scraped = rt
        .block_on(braid::telemetry::http::get(
            &target,
            "/metrics",
            Some(&token),
            wait,
        ))
        .unwrap();
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .body
            .contains("braid_cluster_nodes{state=\"alive\"} 1.0"),
        "{}",
        scraped.body
    );
    assert!(
        scraped.body.contains("braid_store_capacity_bytes 67108864"),
        "the head's node's series: {}",
        scraped.body
    );
}

#[braid::remote]
fn seven_times(x: u64) -> u64 {
    7 * x
}

/// The driver `jobs_run_on_the_head_and_keep_state_exit_codes_and_output`
/// submits: it joins the cluster in BRAID_ADDRESS, runs a task, and prints
/// its job id and the answer.
#[test]
#[ignore = "a driver that `braid job submit` runs, not a test on its own"]
fn submitted_driver() {
    let rt = braid::init_blocking().unwrap();
    let answer = rt
        .get_blocking(&seven_times::remote(&rt, 6).unwrap())
        .unwrap();
    println!("driver of job {} got {answer}", rt.job_id());
}

impl Braid {
    /// `braid job status ID --json`, once it is in one of `states`.
    fn job_state(&self, id: &str, states: &[&str]) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let job: Value =
                serde_json::from_str(self.ok(&["job", "status", id, "--json"]).trim()).unwrap();
            if states.contains(&job["state"].as_str().unwrap_or_default()) {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} never reached {states:?}: {job}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `braid job submit ARGS` → the job id on its last line.
    fn submit(&self, args: &[&str]) -> String {
        let mut all = vec!["job", "submit"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        out.trim_end().lines().last().unwrap().trim().to_owned()
    }
}

#[test]
fn jobs_run_on_the_head_and_keep_state_exit_codes_and_output() {
    let braid = Braid::new();
    braid.start_head("2");

    let failing = braid.submit(&["--", "sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    assert!(failing.parse::<braid::ids::JobId>().is_ok(), "{failing}");
    let job = braid.job_state(&failing, &["FAILED"]);
    assert_eq!(job["exit_code"], 3, "{job}");
    assert!(job["end_time_ms"].as_u64() >= job["start_time_ms"].as_u64());
    let logs = braid.ok(&["job", "logs", &failing]);
    assert!(logs.contains("hello") && logs.contains("oops"), "{logs}");

    let me = std::env::current_exe().unwrap();
    let driver = braid.submit(&[
        "--",
        me.to_str().unwrap(),
        "--exact",
        "submitted_driver",
        "--ignored",
        "--nocapture",
    ]);
    let job = braid.job_state(&driver, &["SUCCEEDED", "FAILED"]);
    let logs = braid.ok(&["job", "logs", &driver]);
    assert_eq!(job["state"], "SUCCEEDED", "{job}\n{logs}");
    assert_eq!(job["exit_code"], 0);
    assert!(
        logs.contains(&format!("driver of job {driver} got 42")),
        "the driver registers under the submission's id: {logs}"
    );
    let drivers: Vec<Value> =
        serde_json::from_str(braid.ok(&["list", "jobs", "--json"]).trim()).unwrap();
    let listed = drivers
        .iter()
        .find(|j| j["job_id"] == driver.as_str())
        .unwrap_or_else(|| panic!("the driver is not among the jobs: {drivers:?}"));
    assert_eq!(listed["state"], "SUCCEEDED", "{listed}");
    assert_eq!(listed["exit_code"], 0, "{listed}");
    // `braid status` says the same, with times.
    let status = braid.status();
    let in_status = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_id"] == driver.as_str())
        .unwrap_or_else(|| panic!("the driver is not in braid status: {status}"));
    assert_eq!(in_status["state"], "SUCCEEDED", "{in_status}");
    assert_eq!(in_status["exit_code"], 0, "{in_status}");
    let text = braid.ok(&["status"]);
    assert!(
        text.contains("SUCCEEDED") && text.contains("STARTED (UTC)"),
        "{text}"
    );

    let sleeper = braid.submit(&["--", "sleep", "60"]);
    braid.job_state(&sleeper, &["RUNNING"]);
    braid.ok(&["job", "stop", &sleeper]);
    let job = braid.job_state(&sleeper, &["STOPPED"]);
    assert!(job["pid"].is_null(), "{job}");

    let missing = braid.submit(&["--", "/no/such/program"]);
    let job = braid.job_state(&missing, &["FAILED"]);
    assert!(
        job["message"].as_str().unwrap().contains("cannot start"),
        "{job}"
    );

    let listed: Vec<Value> =
        serde_json::from_str(braid.ok(&["job", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    let table = braid.ok(&["job", "list"]);
    assert!(
        table.contains("SUCCEEDED") && table.contains("STOPPED"),
        "{table}"
    );
    let unknown = braid.run(&["job", "status", &braid::ids::JobId::random().to_string()]);
    assert_eq!(unknown.status.code(), Some(1));
    let bad = braid.run(&["job", "status", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// What a worker of the `env_driver` job sees: its `BRAID_TEST_GREETING`
/// and `RUST_BACKTRACE`.
#[braid::remote]
fn worker_env() -> (Option<String>, Option<String>) {
    (
        std::env::var("BRAID_TEST_GREETING").ok(),
        std::env::var("RUST_BACKTRACE").ok(),
    )
}

/// The driver of `workers_take_the_drivers_environment_not_the_nodes`: it
/// declares a variable for its workers and prints what a worker saw.
#[test]
#[ignore = "a driver that a test runs, not a test on its own"]
fn env_driver() {
    let rt =
        braid::init_blocking_with(braid::InitOptions::new().env("BRAID_TEST_GREETING", "hello"))
            .unwrap();
    let (greeting, backtrace) = rt.get_blocking(&worker_env::remote(&rt).unwrap()).unwrap();
    println!("WORKER-ENV greeting={greeting:?} backtrace={backtrace:?}");
}

impl Braid {
    /// Runs the ignored test `name` of this binary as a driver, with this
    /// `BRAID_TMPDIR`, without `RUST_BACKTRACE`, and with `BRAID_ADDRESS`
    /// set to `address` (unset with `None`).
    fn driver(&self, name: &str, address: Option<&str>) -> std::process::Output {
        let mut driver = Command::new(std::env::current_exe().unwrap());
        driver
            .args(["--exact", name, "--ignored", "--nocapture"])
            .env("BRAID_TMPDIR", &self.root)
            .env_remove("RUST_BACKTRACE")
            .env_remove("BRAID_TOKEN")
            .env_remove("BRAID_ADDRESS");
        if let Some(address) = address {
            driver.env("BRAID_ADDRESS", address);
        }
        driver.output().unwrap()
    }

    /// Runs `env_driver`, joining `address` (an embedded cluster of its
    /// own with `None`); returns what it printed, after checking it
    /// succeeded.
    fn env_driver(&self, address: Option<&str>) -> String {
        let out = self.driver("env_driver", address);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

#[test]
fn a_braid_tmpdir_of_200_characters_holds_clusters_and_drivers() {
    let braid = Braid::deep(200);
    let address = braid.start_head("1");
    let joined = braid.env_driver(Some(&address));
    assert!(joined.contains("WORKER-ENV"), "{joined}");
    let embedded = braid.env_driver(None);
    assert!(embedded.contains("WORKER-ENV"), "{embedded}");
}

#[test]
fn workers_take_the_drivers_environment_not_the_nodes() {
    let braid = Braid::new();
    // The daemons run with RUST_BACKTRACE set; the driver without it.
    let out = Command::new(BRAID)
        .args(["start", "--head", "--port", "0", "--num-cpus", "1"])
        .env("BRAID_TMPDIR", &braid.root)
        .env("RUST_BACKTRACE", "full")
        .env_remove("BRAID_ADDRESS")
        .env_remove("BRAID_TOKEN")
        .output()
        .unwrap();
    braid.daemons();
    assert!(out.status.success(), "{out:?}");
    let address = braid.status()["address"].as_str().unwrap().to_owned();
    let stdout = braid.env_driver(Some(&address));
    // The daemons' logs say, at the default level, what happened.
    let mut logs = String::new();
    for entry in walk(&braid.user_dir()) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if name == "head.log" || (name.starts_with("node-") && name.ends_with(".log")) {
            logs.push_str(&std::fs::read_to_string(&entry).unwrap());
        }
    }
    for line in [
        "head serving",
        "node registered",
        "node joined the cluster",
        "job registered",
        "worker started",
    ] {
        assert!(
            logs.contains(line),
            "no {line:?} in the daemons' logs:\n{logs}"
        );
    }
    assert!(!logs.contains('\u{1b}'), "colour codes in a log file");
    assert!(
        stdout.contains(r#"WORKER-ENV greeting=Some("hello") backtrace=None"#),
        "the worker has the declared variable, and not the node's RUST_BACKTRACE: {stdout}"
    );
}

/// The driver of `init_joins_the_cluster_started_on_this_machine`: prints
/// the address it joined and how long `init` and its first task's
/// submission took, or the error of `init`.
#[test]
#[ignore = "a driver that a test runs, not a test on its own"]
fn init_driver() {
    let start = std::time::Instant::now();
    match braid::init_blocking() {
        Ok(rt) => {
            let answer = seven_times::remote(&rt, 1).unwrap();
            let submitted = start.elapsed();
            assert_eq!(rt.get_blocking(&answer).unwrap(), 7);
            println!("JOINED {} {}", rt.address(), submitted.as_micros());
        }
        Err(e) => println!("INIT-ERROR {e}"),
    }
}

impl Braid {
    /// Runs `init_driver` with `BRAID_ADDRESS` set to `address` (unset
    /// with `None`); returns its report line.
    fn init_driver(&self, address: Option<&str>) -> String {
        let out = self.driver("init_driver", address);
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| {
                l.split_once("JOINED ")
                    .or_else(|| l.split_once("INIT-ERROR "))
                    .map(|_| l.trim().to_owned())
            })
            .unwrap_or_else(|| {
                panic!(
                    "the driver said nothing: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}

#[test]
fn init_joins_the_cluster_started_on_this_machine() {
    let braid = Braid::new();
    let none = braid.init_driver(Some("auto"));
    assert!(
        none.contains("INIT-ERROR") && none.contains("no cluster"),
        "{none}"
    );

    let address = braid.start_head("1");
    let mut took = Vec::new();
    for _ in 0..5 {
        let joined = braid.init_driver(None);
        let mut words = joined.rsplit(' ');
        took.push(words.next().unwrap().parse::<u64>().unwrap());
        assert!(
            joined.ends_with(&format!("{address} {}", took.last().unwrap())),
            "{joined}"
        );
    }
    took.sort_unstable();
    println!(
        "init joining a local cluster to the first task submitted: median {} µs",
        took[2]
    );
    let auto = braid.init_driver(Some("auto"));
    assert!(auto.contains(&format!("JOINED {address} ")), "{auto}");
    let local = braid.init_driver(Some("local"));
    assert!(
        local.starts_with("JOINED ") && !local.contains(&address),
        "{local}"
    );

    // Two clusters: plain init names them rather than choosing.
    braid.ok(&["start", "--head", "--port", "0", "--num-cpus", "1"]);
    let two = braid.init_driver(None);
    assert!(
        two.contains("INIT-ERROR") && two.contains("several clusters"),
        "{two}"
    );
    let chosen = braid.init_driver(Some(&address));
    assert!(chosen.contains(&format!("JOINED {address} ")), "{chosen}");
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
