//! `braid list` and `braid timeline` against a real embedded cluster (the
//! CLI given its address and token): actors with their death causes,
//! tasks with their times, objects in the stores, nodes and jobs, filters,
//! JSON, and a Chrome trace that parses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Runtime, TypedHandle};
use serde_json::Value;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BRAID: &str = env!("CARGO_BIN_EXE_braid");

#[braid::remote]
fn triple(x: u64) -> u64 {
    3 * x
}

/// A counter in an actor process.
#[braid::actor]
pub struct Tick {
    n: u64,
}

#[braid::actor]
impl Tick {
    fn new() -> Self {
        Tick { n: 0 }
    }

    fn tick(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    fn say(&self, text: String) -> u32 {
        println!("{text}");
        std::process::id()
    }
}

#[braid::remote]
fn shout(text: String) -> u32 {
    println!("shouting {text}");
    std::process::id()
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0))
            .expect("embedded cluster")
    })
}

/// Runs `braid args... --address A --token T`.
fn braid(rt: &Runtime, args: &[&str]) -> Output {
    Command::new(BRAID)
        .args(args)
        .args(["--address", rt.address(), "--token", rt.token()])
        .env_remove("BRAID_ROLE")
        .output()
        .unwrap()
}

fn json(rt: &Runtime, args: &[&str]) -> Vec<Value> {
    let out = braid(rt, args);
    assert!(
        out.status.success(),
        "braid {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    parsed.as_array().unwrap().clone()
}

#[tokio::test]
async fn list_shows_actors_tasks_objects_nodes_and_jobs() {
    let rt = rt();
    let refs: Vec<_> = (0..40).map(|i| triple::remote(rt, i).unwrap()).collect();
    for r in &refs {
        rt.get(r).await.unwrap();
    }
    let live = Tick::remote(rt).spawn().await.unwrap();
    for _ in 0..3 {
        live.tick().await.unwrap();
    }
    let doomed = Tick::remote(rt).name("list-doomed").spawn().await.unwrap();
    doomed.tick().await.unwrap();
    rt.kill_actor(doomed.raw()).await.unwrap();
    let kept = rt.put(&vec![7u8; 1 << 20]).unwrap();

    // Tasks reach the nodes within about a second of running.
    let deadline = Instant::now() + Duration::from_secs(20);
    let tasks = loop {
        let tasks = json(rt, &["list", "tasks", "--json", "--filter", "name=triple"]);
        if tasks.len() >= 40 {
            break tasks;
        }
        assert!(Instant::now() < deadline, "tasks never listed: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(tasks
        .iter()
        .all(|t| t["state"] == "FINISHED" && t["type"] == "TASK"));
    assert!(tasks.iter().all(|t| t["run_ms"].as_f64().unwrap() >= 0.0));
    // A live actor's calls (a killed one's last second of spans dies with
    // its process).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let calls = json(
            rt,
            &["list", "tasks", "--json", "--filter", "type=actor_call"],
        );
        if calls.iter().filter(|c| c["name"] == "Tick.tick").count() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "calls never listed: {calls:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead = json(rt, &["list", "actors", "--json", "--filter", "state=dead"]);
        if let Some(a) = dead.iter().find(|a| a["name"] == "list-doomed") {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the killed actor is not DEAD: {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!dead["death_cause"].as_str().unwrap().is_empty(), "{dead}");

    let objects = json(rt, &["list", "objects", "--json"]);
    let id = kept.id().to_string();
    let listed = objects.iter().find(|o| o["object_id"] == id.as_str());
    let listed = listed.unwrap_or_else(|| panic!("{id} not listed: {objects:?}"));
    assert_eq!(listed["state"], "SEALED");
    // The encoded value: a MiB of bytes and its length prefix.
    let size = listed["size"].as_u64().unwrap();
    assert!((1 << 20..(1 << 20) + 64).contains(&size), "{listed}");
    let nodes = json(rt, &["list", "nodes", "--json"]);
    assert_eq!(nodes.len(), 1);
    let jobs = json(rt, &["list", "jobs", "--json", "--filter", "state=RUNNING"]);
    assert!(
        jobs.iter()
            .any(|j| j["job_id"] == rt.job_id().to_string().as_str()),
        "{jobs:?}"
    );

    let table = braid(rt, &["list", "actors"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("DEATH CAUSE") && text.contains("list-doomed"),
        "{text}"
    );
    let bad = braid(rt, &["list", "actors", "--filter", "nokey"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn timeline_writes_a_chrome_trace_of_the_job() {
    let rt = rt();
    let refs: Vec<_> = (0..25).map(|i| triple::remote(rt, i).unwrap()).collect();
    for r in &refs {
        rt.get(r).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trace.json");
    let job = rt.job_id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let out = braid(
            rt,
            &["timeline", "--job", &job, "-o", file.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let events = trace["traceEvents"].as_array().unwrap().clone();
        let runs = events.iter().filter(|e| e["name"] == "triple").count();
        if runs >= 25 {
            break events;
        }
        assert!(Instant::now() < deadline, "{runs} runs in the trace");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let run = events.iter().find(|e| e["name"] == "triple").unwrap();
    assert_eq!(run["ph"], "X");
    assert_eq!(run["args"]["job"], job.as_str());
    assert!(events.iter().any(|e| e["name"] == "queue: triple"));
    assert!(events.iter().any(|e| e["name"] == "process_name"));
    let other = braid(
        rt,
        &[
            "timeline",
            "--job",
            &braid::ids::JobId::random().to_string(),
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert!(other.status.success());
    let empty: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(empty["traceEvents"], Value::Array(Vec::new()));
    let bad = braid(rt, &["timeline", "--job", "not-a-job"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Runs `braid logs ARGS` until its output holds `want` (lines reach the
/// log as the worker prints them).
fn logs_until(rt: &Runtime, args: &[&str], want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = braid(rt, args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "braid {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "braid {args:?} never showed {want:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn logs_of_an_actor_a_task_a_job_and_a_node() {
    let rt = rt();
    let speaker = Tick::remote(rt).name("logs-speaker").spawn().await.unwrap();
    speaker.say("the actor speaks".to_string()).await.unwrap();
    let task = shout::remote(rt, "loudly".to_string()).unwrap();
    rt.get(&task).await.unwrap();

    logs_until(rt, &["logs", "--actor", "logs-speaker"], "the actor speaks");
    let job = rt.job_id().to_string();
    let all = logs_until(rt, &["logs", "--job", &job], "shouting loudly");
    assert!(all.contains("==> worker"), "{all}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let task_id = loop {
        let tasks = json(rt, &["list", "tasks", "--json", "--filter", "name=shout"]);
        if let Some(t) = tasks.first() {
            break t["task_id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the task was never listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    logs_until(rt, &["logs", "--task", &task_id[..12]], "shouting loudly");

    let node = json(rt, &["list", "nodes", "--json"])[0]["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = braid(rt, &["logs", "--node", &node[..8]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = braid(rt, &["logs"]);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        text.contains("braid logs --node") && text.contains("worker"),
        "{text}"
    );
    let unknown = braid(rt, &["logs", "--actor", "no-such-actor"]);
    assert_eq!(unknown.status.code(), Some(1));
}
