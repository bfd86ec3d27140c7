//! Benchmark of braid-store against the machine's own limits, all measured in
//! one run, against a store server in its own process.
//!
//! ```text
//! cargo run --release -p braid-store --example store_bench -- --json
//! ```
//!
//! Logs go to stderr; the last stdout line is one JSON object. Figures are
//! medians. Names follow Ray's microbenchmark where Ray has the same
//! workload (`single_client_put_calls_Plasma_Store`, ...).

use anyhow::{bail, Context, Result};
use braid_store::{ObjectId, StoreClient, StoreConfig, StoreServer};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BIG: u64 = 800 * MIB;

const USAGE: &str = "\
Usage: store_bench [--json]

Benchmarks braid-store against this machine's own limits (memcpy, a socket
round trip, the spill disk) in one run; logs go to stderr. Needs a few GiB
of memory and takes minutes.

Options:
      --json  Print the figures as one JSON object on the last stdout line
  -h, --help  Print this help";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role") {
        return run_role(&args[1..]);
    }
    let mut json = false;
    for arg in &args {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => {
                eprintln!("error: unexpected argument {other:?}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    run_bench(json)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The spill directory's own limits: median rates of writing `count` fresh
/// `size`-byte extents to a plain file there, in 1 MiB writes as the store
/// does, then reading them back.
fn disk_speed(dir: &Path, size: u64, count: u64) -> Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk-speed");
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let chunk = vec![5u8; MIB as usize];
    let mut back = vec![0u8; MIB as usize];
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    for i in 0..count {
        let base = i * size;
        let t = Instant::now();
        for at in (0..size).step_by(MIB as usize) {
            file.write_all_at(&chunk, base + at)?;
        }
        writes.push(gbps(size, t.elapsed()));
    }
    for i in 0..count {
        let base = i * size;
        let t = Instant::now();
        for at in (0..size).step_by(MIB as usize) {
            file.read_exact_at(&mut back, base + at)?;
        }
        reads.push(gbps(size, t.elapsed()));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok((median(&writes), median(&reads)))
}

/// Median rate of `call` over five 300 ms windows.
fn calls_per_s(mut call: impl FnMut() -> Result<()>) -> Result<f64> {
    let window = Duration::from_millis(300);
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < window {
            for _ in 0..20 {
                call()?;
            }
            n += 20;
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(&rates))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A child process of this example, killed by pid when dropped.
struct Proc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Result<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning a role")?;
        let out = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Proc { child, out })
    }

    /// Waits for a line starting with `tag` and returns the rest.
    fn expect(&mut self, tag: &str) -> Result<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line)? == 0 {
                bail!("child exited before printing {tag}");
            }
            if let Some(rest) = line.trim_end().strip_prefix(tag) {
                return Ok(rest.trim().to_owned());
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("no stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_store(
    dir: &Path,
    name: &str,
    capacity: Option<u64>,
    spill: bool,
) -> Result<(Proc, PathBuf, Duration)> {
    let socket = dir.join(format!("{name}.sock"));
    let socket_s = socket.to_string_lossy().into_owned();
    let spill_s = dir
        .join(format!("{name}-spill"))
        .to_string_lossy()
        .into_owned();
    let cap_s = capacity.map(|c| c.to_string()).unwrap_or_default();
    let mut args = vec!["--role", "server", &socket_s, &cap_s];
    if spill {
        args.push(&spill_s);
    }
    let t = Instant::now();
    let mut p = Proc::spawn(&args)?;
    p.expect("ready")?;
    Ok((p, socket, t.elapsed()))
}

fn run_bench(json: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut out: Vec<(&str, f64)> = Vec::new();

    // Readiness of a store at the default capacity, and of a new client.
    let (default_store, default_socket, ready) = start_store(dir.path(), "default", None, false)?;
    out.push(("store_ready_ms_default_capacity", ready.as_secs_f64() * 1e3));
    let mut connects = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let c = StoreClient::connect(&default_socket)?;
        connects.push(t.elapsed().as_secs_f64() * 1e3);
        drop(c);
    }
    out.push(("client_ready_ms", median(&connects)));
    out.push((
        "default_capacity_bytes",
        braid_store::config::default_capacity() as f64,
    ));
    drop(default_store);

    let (_store, socket, _) = start_store(dir.path(), "main", Some(6 * GIB), false)?;
    let client = StoreClient::connect(&socket)?;
    let socket_s = socket.to_string_lossy().into_owned();

    // The machine's limit: memcpy between pre-faulted buffers of the same size.
    let src = vec![1u8; BIG as usize];
    let mut dst = vec![0u8; BIG as usize];
    let mut memcpy = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpy.push(gbps(BIG, t.elapsed()));
        std::hint::black_box(&dst);
    }
    drop(dst);
    let memcpy = median(&memcpy);
    out.push(("memcpy_gigabytes_per_s", memcpy));
    eprintln!("memcpy {memcpy:.2} GB/s");

    // 800 MiB puts from one client: create, copy in place, seal, release, delete.
    let mut puts = Vec::new();
    let mut cold_put = f64::NAN;
    for i in 0..8 {
        let id = ObjectId::random();
        let t = Instant::now();
        let mut buf = client.create(id, BIG)?;
        buf.as_mut_slice().copy_from_slice(&src);
        let view = buf.seal()?;
        let d = t.elapsed();
        drop(view);
        client.delete(id)?;
        if i == 0 {
            cold_put = gbps(BIG, d);
        } else {
            puts.push(gbps(BIG, d));
        }
    }
    let put = median(&puts);
    out.push(("single_client_put_gigabytes", put));
    out.push(("single_client_put_gigabytes_cold", cold_put));
    out.push(("put_over_memcpy", put / memcpy));
    eprintln!(
        "put {put:.2} GB/s (cold {cold_put:.2}), {:.2}x memcpy",
        put / memcpy
    );
    drop(src);

    // Several client processes putting at once.
    let clients = 4;
    let each: u64 = 200 * MIB;
    let rounds = 6;
    let mut procs = Vec::new();
    for _ in 0..clients {
        let mut p = Proc::spawn(&[
            "--role",
            "putter",
            &socket_s,
            &each.to_string(),
            &rounds.to_string(),
        ])?;
        p.expect("ready")?;
        procs.push(p);
    }
    let t = Instant::now();
    for p in &mut procs {
        p.send("go")?;
    }
    for p in &mut procs {
        p.expect("done")?;
    }
    let multi = gbps(clients * each * rounds, t.elapsed());
    drop(procs);
    out.push(("multi_client_put_gigabytes", multi));
    eprintln!("multi-client put {multi:.2} GB/s");

    // Small synchronous calls, Ray's workloads: put(0) and get of one object.
    let put_calls = calls_per_s(|| {
        drop(client.put(&0u64.to_le_bytes())?);
        Ok(())
    })?;
    out.push(("single_client_put_calls_Plasma_Store", put_calls));
    let value = client.put(&0u64.to_le_bytes())?;
    let get_calls = calls_per_s(|| {
        drop(client.get(value.id(), Duration::from_secs(1))?);
        Ok(())
    })?;
    out.push(("single_client_get_calls_Plasma_Store", get_calls));

    // Gets that each go through the store: another client pins the object,
    // this one takes and drops its own pin every call.
    let reader = StoreClient::connect(&socket)?;
    let socket_calls = calls_per_s(|| {
        drop(reader.get(value.id(), Duration::from_secs(1))?);
        Ok(())
    })?;
    out.push(("single_client_get_calls_via_socket", socket_calls));
    drop(reader);
    drop(value);

    // Get latency from another process, 1 MiB and 1 GiB objects, sampled
    // alternately in one reader so both medians see the same conditions.
    let mut objects = Vec::new();
    for size in [MIB, GIB] {
        let id = ObjectId::random();
        let mut buf = client.create(id, size)?;
        buf.as_mut_slice().fill(7);
        objects.push(buf.seal()?);
    }
    let (small, big) = (objects[0].id().to_string(), objects[1].id().to_string());
    let mut p = Proc::spawn(&["--role", "getter", &socket_s, &small, &big, "1000"])?;
    let line = p.expect("latency")?;
    let figures: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [cold_small, warm_small, cold_big, warm_big] = figures[..] else {
        bail!("getter printed {line:?}");
    };
    out.push(("get_latency_us_1MiB", warm_small));
    out.push(("get_latency_us_1GiB", warm_big));
    out.push(("get_latency_1GiB_over_1MiB", warm_big / warm_small));
    out.push(("get_latency_us_1MiB_cold", cold_small));
    out.push(("get_latency_us_1GiB_cold", cold_big));
    eprintln!(
        "get 1 MiB {warm_small:.1} us, 1 GiB {warm_big:.1} us (first get in a new process: {cold_small:.1} us, {cold_big:.1} us)"
    );
    for view in objects {
        let id = view.id();
        drop(view);
        client.delete(id)?;
    }
    drop(client);

    // Spill and restore: a store that holds one 512 MiB object at a time.
    let (_spill_store, spill_socket, _) = start_store(dir.path(), "spill", Some(768 * MIB), true)?;
    let sc = StoreClient::connect(&spill_socket)?;
    let size = 512 * MIB;
    let mut ids = Vec::new();
    let mut spills = Vec::new();
    for i in 0..5 {
        let id = ObjectId::random();
        let t = Instant::now();
        let mut buf = sc.create(id, size)?;
        let d = t.elapsed();
        buf.as_mut_slice().fill(i as u8);
        drop(buf.seal()?);
        if i > 0 {
            spills.push(gbps(size, d));
        }
        ids.push(id);
    }
    let mut restores = Vec::new();
    let mut resident = *ids.last().context("no objects")?;
    for &id in ids.iter().take(4) {
        sc.delete(resident)?;
        let t = Instant::now();
        let view = sc.get(id, Duration::from_secs(60))?;
        restores.push(gbps(size, t.elapsed()));
        drop(view);
        resident = id;
    }
    drop(sc);
    drop(_spill_store);
    let (disk_write, disk_read) = disk_speed(dir.path(), size, 4)?;
    out.push(("spill_gigabytes_per_s", median(&spills)));
    out.push(("restore_gigabytes_per_s", median(&restores)));
    out.push(("disk_write_gigabytes_per_s", disk_write));
    out.push(("disk_read_gigabytes_per_s", disk_read));
    eprintln!(
        "spill {:.2} GB/s, restore {:.2} GB/s; plain file writes {disk_write:.2} GB/s, reads {disk_read:.2} GB/s",
        median(&spills),
        median(&restores)
    );

    let body: Vec<String> = out
        .iter()
        .map(|(k, v)| {
            if v.is_finite() {
                format!("\"{k}\":{v:.3}")
            } else {
                format!("\"{k}\":null")
            }
        })
        .collect();
    if !json {
        for (k, v) in &out {
            println!("{k:40} {v:.3}");
        }
    }
    println!("{{{}}}", body.join(","));
    Ok(())
}

fn run_role(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("server") => role_server(&args[1..]),
        Some("putter") => role_putter(&args[1..]),
        Some("getter") => role_getter(&args[1..]),
        other => bail!("unknown role {other:?}"),
    }
}

fn role_server(args: &[String]) -> Result<()> {
    let socket = args.first().context("socket")?;
    let mut config = match args.get(1).filter(|s| !s.is_empty()) {
        Some(cap) => StoreConfig::with_capacity(socket, cap.parse()?),
        None => StoreConfig::new(socket),
    };
    if let Some(spill) = args.get(2) {
        config = config.spill_dir(spill);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = StoreServer::bind(config).await?;
        println!("ready");
        server.run().await?;
        anyhow::Ok(())
    })
}

fn role_putter(args: &[String]) -> Result<()> {
    let client = StoreClient::connect(args.first().context("socket")?)?;
    let size: u64 = args.get(1).context("size")?.parse()?;
    let rounds: u64 = args.get(2).context("rounds")?.parse()?;
    let src = vec![3u8; size as usize];
    // Warm this process's mapping of a region, as a long-lived client would.
    let warm = ObjectId::random();
    let mut buf = client.create(warm, size)?;
    buf.as_mut_slice().copy_from_slice(&src);
    drop(buf.seal()?);
    client.delete(warm)?;
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    for _ in 0..rounds {
        let id = ObjectId::random();
        let mut buf = client.create(id, size)?;
        buf.as_mut_slice().copy_from_slice(&src);
        drop(buf.seal()?);
        client.delete(id)?;
    }
    println!("done");
    Ok(())
}

fn role_getter(args: &[String]) -> Result<()> {
    let client = StoreClient::connect(args.first().context("socket")?)?;
    let small: ObjectId = args.get(1).context("id")?.parse()?;
    let big: ObjectId = args.get(2).context("id")?.parse()?;
    let samples: usize = args.get(3).context("samples")?.parse()?;
    let timeout = Duration::from_secs(10);
    let mut cold = Vec::new();
    for id in [small, big] {
        let t = Instant::now();
        let view = client.get(id, timeout)?;
        cold.push(t.elapsed().as_secs_f64() * 1e6);
        drop(view);
    }
    let mut lat = [Vec::with_capacity(samples), Vec::with_capacity(samples)];
    for _ in 0..samples {
        for (i, id) in [small, big].into_iter().enumerate() {
            let t = Instant::now();
            let view = client.get(id, timeout)?;
            lat[i].push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(view.as_bytes().first());
            drop(view);
        }
    }
    println!(
        "latency {} {} {} {}",
        cold[0],
        median(&lat[0]),
        cold[1],
        median(&lat[1])
    );
    Ok(())
}
