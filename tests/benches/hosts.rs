//! Braid between test hosts that share only a network, beside the same
//! network's raw limits measured in the same run: a 1 GiB object pulled
//! across hosts against a raw TCP blast of 1 GiB, an actor call against a
//! plain TCP request/response, `braid microbenchmark` with its workers on
//! another host beside the same host, and the first task of a job on a
//! host that lacked its binary beside one that had it.
//!
//! Needs root (network namespaces) and a release `braid` binary:
//! `cargo build --release -p braid --bin braid && cargo bench -p
//! braid-tests --bench hosts`. Prints progress on stderr and one JSON line
//! on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Array, ObjectRef, TaskOptions};
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{braid_binary, child_role, Hosts};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Instant;

/// The size of the objects and blasts.
const GIB: usize = 1 << 30;
/// Transfers timed (after one to warm the pages); the median is reported.
const TRANSFERS: usize = 3;
/// Round trips timed for latencies.
const TRIPS: usize = 3000;
/// Bytes of a request and of its answer in the TCP round trip.
const MESSAGE: usize = 64;

/// Host and executable of the process running it.
#[braid::remote]
fn whoami() -> String {
    braid::cluster::hostname()
}

/// Maps the array behind `r` here (pulling it to this host first);
/// seconds taken and the bytes seen.
#[braid::remote]
fn pull(r: Vec<ObjectRef<Array<u8>>>) -> (f64, usize) {
    let rt = braid::current().unwrap();
    let started = Instant::now();
    let rt2 = rt.clone();
    let view = rt
        .block_on(async move { rt2.get_array(&r[0]).await })
        .unwrap();
    (started.elapsed().as_secs_f64(), view.len())
}

/// An actor answering at once.
#[braid::actor]
pub struct Echo;

#[braid::actor]
impl Echo {
    fn new() -> Self {
        Echo
    }
    fn ping(&self, x: u64) -> u64 {
        x
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Options placing a task on the node offering `resource` (and no CPU,
/// so host 2's node, which offers none, takes no other task).
fn on(resource: &str) -> TaskOptions {
    TaskOptions::default().num_cpus(0.0).resource(resource, 1.0)
}

/// The driver on host 0: first tasks on a host with and without the
/// binary, then transfers and calls to host 1.
fn drive() {
    let rt = braid::init_blocking().unwrap();
    let mut report = serde_json::Map::new();
    // The job's first tasks on both hosts at once, each timed to its
    // answer: both hosts start the job's workers; one first fetches the
    // binary.
    let started = Instant::now();
    let had = whoami::remote_with(&rt, &on("b")).unwrap();
    let lacked = whoami::remote_with(&rt, &on("c")).unwrap();
    let rt2 = rt.clone();
    let (had, lacked) = rt.block_on(async move {
        let timed = |r: ObjectRef<String>| {
            let rt = rt2.clone();
            async move {
                let name = rt.get(&r).await.unwrap();
                (name, started.elapsed().as_secs_f64() * 1e3)
            }
        };
        futures::join!(timed(had), timed(lacked))
    });
    for (which, (name, ms)) in [("had", had), ("lacked", lacked)] {
        eprintln!("first task on {name}, which {which} the binary: {ms:.0} ms");
        report.insert(format!("first_task_ms_host_{which}_binary"), json!(ms));
    }
    let data = vec![7u8; GIB];
    // Rounds of TRANSFERS objects alive at once: the first round has
    // host 1's store provision and map the pages they take, the next ones
    // reuse them once the last round's objects are freed.
    let mut seconds = Vec::new();
    for round in 0..3 {
        let refs: Vec<_> = (0..TRANSFERS)
            .map(|_| rt.put_array(&data).unwrap())
            .collect();
        for r in &refs {
            let (s, len) = rt
                .get_blocking(&pull::remote_with(&rt, &on("b"), vec![r.clone()]).unwrap())
                .unwrap();
            assert_eq!(len, GIB);
            println!("\nTRANSFER round {round}: 1 GiB in {s:.3} s");
            if round > 0 {
                seconds.push(s);
            }
        }
        drop(refs);
        // Frees travel asynchronously; give them time to land.
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    report.insert("transfer_1gib_s".into(), json!(median(seconds)));
    let echo = Echo::remote(&rt)
        .resource("b", 1.0)
        .spawn_blocking()
        .unwrap();
    for i in 0..200 {
        echo.ping(i).blocking().unwrap();
    }
    let mut micros = Vec::with_capacity(TRIPS);
    for i in 0..TRIPS as u64 {
        let started = Instant::now();
        echo.ping(i).blocking().unwrap();
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    report.insert("actor_call_p50_us".into(), json!(median(micros)));
    println!("\nREPORT {}", serde_json::Value::Object(report));
}

/// A buffer of `len` bytes whose pages are all faulted in.
fn prefaulted(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for page in buf.chunks_mut(4096) {
        page[0] = 1;
    }
    buf
}

/// Host 1's end of the raw TCP measurements: receives 1 GiB blasts into
/// a pre-faulted buffer (printing each one's seconds), then echoes
/// messages.
fn raw_server() {
    let listener = TcpListener::bind(std::env::var("AT").unwrap()).unwrap();
    println!("\nLISTENING");
    let mut buf = prefaulted(GIB);
    for _ in 0..=TRANSFERS {
        let (mut conn, _) = listener.accept().unwrap();
        let started = Instant::now();
        conn.read_exact(&mut buf).unwrap();
        println!("\nBLAST {}", started.elapsed().as_secs_f64());
        conn.write_all(b"k").unwrap();
    }
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_nodelay(true).unwrap();
    let mut message = [0u8; MESSAGE];
    while conn.read_exact(&mut message).is_ok() {
        conn.write_all(&message).unwrap();
    }
}

/// Host 0's end: blasts, then timed round trips; prints the round trips'
/// median in microseconds.
fn raw_client() {
    let at = std::env::var("AT").unwrap();
    let data = prefaulted(GIB);
    for _ in 0..=TRANSFERS {
        let mut conn = TcpStream::connect(&at).unwrap();
        conn.write_all(&data).unwrap();
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack).unwrap();
    }
    let mut conn = TcpStream::connect(&at).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut message = [0u8; MESSAGE];
    let mut micros = Vec::with_capacity(TRIPS);
    for i in 0..200 + TRIPS {
        let started = Instant::now();
        conn.write_all(&message).unwrap();
        conn.read_exact(&mut message).unwrap();
        if i >= 200 {
            micros.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!("\nRTT {}", median(micros));
}

/// The value after `KEY ` on a line of `out`.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
        .to_string()
}

/// The last line of `braid microbenchmark --json`, run on `host`.
fn microbenchmark(cluster: &HostCluster<'_>, hosts: &Hosts, host: usize) -> serde_json::Value {
    let out = hosts
        .host(host)
        .command(braid_binary())
        .args(["microbenchmark", "--json", "--actor-resource", "b"])
        .env("BRAID_ADDRESS", cluster.address())
        .env("BRAID_TOKEN", cluster.token())
        .env("BRAID_TMPDIR", cluster.tmpdir(host))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "microbenchmark on host {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn main() {
    if let Some(role) = child_role() {
        match role.as_str() {
            "drive" => drive(),
            "raw-server" => raw_server(),
            "raw-client" => raw_client(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let Some(hosts) = Hosts::for_test("bench hosts", 3) else {
        return;
    };
    // Host 2 lacks this binary: an empty file system over its directory.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().display().to_string();
    let binary_bytes = std::fs::metadata(&exe).unwrap().len();
    let hidden = hosts
        .host(2)
        .command("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "braid-bench-hidden", &deps])
        .status()
        .unwrap();
    assert!(hidden.success());

    let store = ["--object-store-memory", "8GiB"];
    let cluster = HostCluster::start_with(&hosts, 0, 0, &store).unwrap();
    cluster
        .add_node(
            1,
            2,
            &[&["--resources", r#"{"b": 8}"#][..], &store].concat(),
        )
        .unwrap();
    cluster
        .add_node(2, 0, &["--resources", r#"{"c": 8}"#])
        .unwrap();

    eprintln!("braid: first tasks, transfers, calls");
    let out = cluster.driver(0, "drive").unwrap().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "driver: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let braid: serde_json::Value = serde_json::from_str(&field(&stdout, "REPORT")).unwrap();
    for line in stdout.lines().filter(|l| l.starts_with("TRANSFER")) {
        eprintln!("{line}");
    }

    eprintln!("microbenchmark, driver beside its workers (host 1)");
    let same = microbenchmark(&cluster, &hosts, 1);
    eprintln!("microbenchmark, driver on host 0, workers on host 1");
    let across = microbenchmark(&cluster, &hosts, 0);

    eprintln!("raw TCP between the same hosts");
    let at = format!("{}:7411", hosts.host(1).addr());
    let mut server = hosts
        .host(1)
        .child("raw-server")
        .unwrap()
        .env("AT", &at)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    assert!(lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l == "LISTENING"));
    // Host 1's buffer must not sit on tmpfs: it is process memory.
    let client = hosts
        .host(0)
        .child("raw-client")
        .unwrap()
        .env("AT", &at)
        .output()
        .unwrap();
    let client = String::from_utf8_lossy(&client.stdout).into_owned();
    let blasts: Vec<f64> = lines
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("BLAST ").and_then(|s| s.parse().ok()))
        .collect();
    let _ = server.wait();
    let blast = median(blasts[1..].to_vec());
    let rtt: f64 = field(&client, "RTT").parse().unwrap();

    let transfer = braid["transfer_1gib_s"].as_f64().unwrap();
    let call = braid["actor_call_p50_us"].as_f64().unwrap();
    let line = json!({
        "bench": "hosts",
        "transfer_1gib_s": transfer,
        "raw_tcp_1gib_s": blast,
        "transfer_vs_raw_tcp": blast / transfer,
        "actor_call_p50_us": call,
        "tcp_rtt_p50_us": rtt,
        "actor_call_vs_tcp_rtt": call / rtt,
        "first_task_ms_host_had_binary": braid["first_task_ms_host_had_binary"],
        "first_task_ms_host_lacked_binary": braid["first_task_ms_host_lacked_binary"],
        "binary_bytes": binary_bytes,
        "microbenchmark_same_host": same,
        "microbenchmark_driver_on_other_host": across,
    });
    println!("{line}");
}
