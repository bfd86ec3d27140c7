//! The processes of a cluster as an operator sees them: their names, worker
//! output reaching the driver, a killed driver taking its actors and
//! workers along, and a binary rebuilt under a running driver refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Runtime};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CHILD_VAR: &str = "BRAID_TEST_PROCESSES_CHILD";

#[braid::remote]
fn worker_pid() -> u32 {
    std::process::id()
}

#[braid::remote]
fn say(line: String) -> u32 {
    println!("{line}");
    std::process::id()
}

/// Holds nothing; lives in its own worker process.
#[braid::actor]
pub struct Idle;

#[braid::actor]
impl Idle {
    fn new() -> Self {
        Idle
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).expect("cluster")
    })
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

#[tokio::test]
async fn every_process_names_itself() {
    let rt = rt();
    let node = rt.nodes().await.unwrap().remove(0);
    assert_eq!(comm(node.info.pid), "braid-node");
    let parent = std::fs::read_to_string(format!("/proc/{}/stat", node.info.pid)).unwrap();
    let ppid: u32 = parent.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(
        ppid,
        std::process::id(),
        "the embedded node is this driver's child"
    );
    let r = worker_pid::remote(rt).unwrap();
    assert_eq!(comm(rt.get(&r).await.unwrap()), "braid-worker");
}

/// Entry point of the child drivers the tests below start.
#[test]
fn child_entry() {
    let Ok(what) = std::env::var(CHILD_VAR) else {
        return;
    };
    match what.as_str() {
        "print" => {
            let rt = braid::init_blocking().unwrap();
            let r = say::remote(&rt, String::from("hello from a task")).unwrap();
            let pid = rt.get_blocking(&r).unwrap();
            // Output is forwarded asynchronously; the line arrives soon after.
            std::thread::sleep(Duration::from_millis(500));
            println!("worker was {pid}");
        }
        "hold" => {
            let rt = braid::init_blocking().unwrap();
            let rt2 = rt.clone();
            let pid = rt
                .block_on(async move {
                    let a = Idle::remote(&rt2).name("held-by-child").spawn().await?;
                    a.pid().await
                })
                .unwrap();
            println!("actor {pid}");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        "rebuilt" => {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            match braid::init_blocking() {
                Err(Error::BuildMismatch { .. }) => println!("refused: build mismatch"),
                Err(e) => println!("other error: {e}"),
                Ok(_) => println!("accepted"),
            }
        }
        _ => {}
    }
    std::process::exit(0);
}

fn child(rt: &Runtime, what: &str, exe: &std::path::Path) -> Command {
    let mut c = Command::new(exe);
    c.args(["--exact", "child_entry", "--nocapture"])
        .env(CHILD_VAR, what)
        .env("BRAID_ADDRESS", rt.address())
        .env("BRAID_TOKEN", rt.token())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    c
}

#[tokio::test]
async fn worker_output_reaches_the_driver_prefixed_with_task_and_pid() {
    let rt = rt();
    let exe = std::env::current_exe().unwrap();
    let out = child(rt, "print", &exe)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("worker was "))
        .expect("child finished")
        .trim()
        .to_string();
    let expected = format!("(say pid={pid}) hello from a task");
    assert!(
        text.lines().any(|l| l == expected),
        "no {expected:?} in {text}"
    );
}

#[tokio::test]
async fn a_killed_driver_takes_its_actors_and_workers_along() {
    let rt = rt();
    let exe = std::env::current_exe().unwrap();
    let mut c = child(rt, "hold", &exe).spawn().unwrap();
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    let pid: u32 = loop {
        let line = lines.next().expect("child output").unwrap();
        if let Some(p) = line.strip_prefix("actor ") {
            break p.trim().parse().unwrap();
        }
    };
    assert!(alive(pid));
    c.kill().unwrap();
    c.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the dead driver's actor lives on"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    loop {
        match rt.get_actor::<IdleHandle>("held-by-child").await {
            Err(Error::ActorNotFound(_)) => break,
            _ => {
                assert!(Instant::now() < deadline, "the head still lists the actor");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_binary_rebuilt_under_its_driver_is_refused() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("driver-copy");
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    let mut c = child(rt, "rebuilt", &copy).spawn().unwrap();
    // Replace the file (a new inode, as a rebuild does) while the child runs.
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes.extend_from_slice(b"rebuilt");
    let fresh = dir.path().join("fresh");
    std::fs::write(&fresh, &bytes).unwrap();
    std::fs::set_permissions(&fresh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&fresh, &copy).unwrap();
    c.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused: build mismatch"), "{text}");
}
