//! `braid microbenchmark`: the workloads of Ray's own microbenchmark
//! (`python/ray/_private/ray_perf.py`), same shapes and sizes, reported under
//! Ray's metric names with Ray's multipliers, against an embedded cluster
//! whose workers are separate processes. Beside them it measures the
//! machine's limits in the same run (memcpy, a Unix-socket round trip) and
//! braid's own figures: actor-call latency, actor creations per second and
//! an idle worker's memory.
//!
//! Ray's `timeit` runs a workload for 1 s to warm up, then four 2 s rounds,
//! and prints their mean. This runs a shorter warm-up and five rounds of
//! about [`ROUND`] each, and reports their median. `TESTS_TO_RUN=pattern`
//! runs the metrics whose names contain `pattern` (or any of several
//! comma-separated patterns), as Ray's does. `BRAID_MICROBENCH_CALLS=N`
//! makes each round exactly `N` calls (and the warm-up `N / 5`) instead of
//! a time, so a counter over the whole run (`perf stat -e instructions`)
//! divides into a cost per call. The last stdout line is one JSON object;
//! logs go to stderr.

use anyhow::Context;
use braid::{ActorHandle, ObjectRef, Runtime, TypedHandle};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The custom resource every benchmark actor asks for, if any.
static ACTOR_RESOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `builder`, asking for a thousandth of [`ACTOR_RESOURCE`] when set.
fn place<H: TypedHandle>(builder: braid::ActorBuilder<H>) -> braid::ActorBuilder<H> {
    match ACTOR_RESOURCE.get() {
        Some(name) => builder.resource(name, 0.001),
        None => builder,
    }
}

/// Length of one timed round.
const ROUND: Duration = Duration::from_millis(600);
/// Timed rounds per workload; the median is reported.
const ROUNDS: usize = 5;

/// Ray's `small_value`: returns `b"ok"`.
#[braid::remote]
pub fn small_value() -> Vec<u8> {
    b"ok".to_vec()
}

/// Submits `n` `small_value` tasks and waits for them all.
#[braid::remote]
pub fn small_value_batch(n: u32) -> u32 {
    let Ok(rt) = braid::current() else { return 1 };
    let refs: Vec<ObjectRef<Vec<u8>>> = (0..n)
        .filter_map(|_| small_value::remote(&rt).ok())
        .collect();
    let rt2 = rt.clone();
    let ok = rt.block_on(async move { rt2.get_all(&refs).await.is_ok() });
    u32::from(!ok)
}

/// Puts one hundred small objects.
#[braid::remote]
pub fn do_put_small() -> u32 {
    let Ok(rt) = braid::current() else { return 1 };
    for _ in 0..100 {
        if rt.put(&0i64).is_err() {
            return 1;
        }
    }
    0
}

/// Puts ten 80 MiB arrays.
#[braid::remote]
pub fn do_put() -> u32 {
    let Ok(rt) = braid::current() else { return 1 };
    let array = vec![0i64; 10 * 1024 * 1024];
    for _ in 0..10 {
        if rt.put_array(&array).is_err() {
            return 1;
        }
    }
    0
}

/// Returns ten thousand references to small objects this task put.
#[braid::remote]
pub fn create_object_containing_ref() -> Vec<ObjectRef<i64>> {
    let Ok(rt) = braid::current() else {
        return Vec::new();
    };
    (0..10_000).filter_map(|_| rt.put(&1i64).ok()).collect()
}

/// Calls `small_value` on the actors in turn, `n` times, and waits.
#[braid::remote]
pub fn work(actors: Vec<ActorHandle>, n: u32) -> u32 {
    let Ok(rt) = braid::current() else { return 1 };
    if actors.is_empty() {
        return 1;
    }
    let calls: Vec<_> = (0..n as usize)
        .map(|i| actors[i % actors.len()].call::<Vec<u8>>("small_value", Ok(Vec::new())))
        .collect();
    let ok = rt.block_on(async move {
        futures::future::join_all(calls)
            .await
            .into_iter()
            .all(|r| r.is_ok())
    });
    u32::from(!ok)
}

/// Ray's `Actor` (it holds no CPU).
#[braid::actor]
pub struct BenchActor;

#[braid::actor]
impl BenchActor {
    fn new() -> Self {
        BenchActor
    }

    /// Returns `b"ok"`.
    fn small_value(&self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Returns `b"ok"`, ignoring its argument.
    fn small_value_arg(&self, _x: i64) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Submits `n` `small_value` tasks and waits for them.
    fn small_value_batch(&self, n: u32) -> u32 {
        small_value_batch(n)
    }

    /// The hosting worker's pid.
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// Ray's `AsyncActor`.
#[braid::actor]
pub struct AsyncActor;

#[braid::actor]
impl AsyncActor {
    fn new() -> Self {
        AsyncActor
    }

    /// Returns `b"ok"`.
    async fn small_value(&self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Returns `b"ok"`, ignoring its argument.
    async fn small_value_with_arg(&self, _x: i64) -> Vec<u8> {
        b"ok".to_vec()
    }
}

/// Ray's `Client`: an actor calling other actors.
#[braid::actor]
pub struct Client {
    servers: Vec<ActorHandle>,
}

#[braid::actor]
impl Client {
    fn new(servers: Vec<ActorHandle>) -> Self {
        Client { servers }
    }

    /// Calls `small_value` `n` times on every server and waits.
    fn small_value_batch(&self, n: u32) -> u32 {
        let Ok(rt) = braid::current() else { return 1 };
        let calls: Vec<_> = self
            .servers
            .iter()
            .flat_map(|s| (0..n).map(move |_| s.call::<Vec<u8>>("small_value", Ok(Vec::new()))))
            .collect();
        let ok = rt.block_on(async move {
            futures::future::join_all(calls)
                .await
                .into_iter()
                .all(|r| r.is_ok())
        });
        u32::from(!ok)
    }

    /// Puts a value and passes its reference `n` times to every server.
    fn small_value_batch_arg(&self, n: u32) -> u32 {
        let Ok(rt) = braid::current() else { return 1 };
        let Ok(x) = rt.put(&0i64) else { return 1 };
        let mut calls = Vec::new();
        for s in &self.servers {
            for _ in 0..n {
                let arg = braid::IntoArg::<i64>::into_arg(&x);
                calls.push(s.call::<Vec<u8>>("small_value_arg", arg.map(|a| vec![a])));
            }
        }
        let ok = rt.block_on(async move {
            futures::future::join_all(calls)
                .await
                .into_iter()
                .all(|r| r.is_ok())
        });
        u32::from(!ok)
    }
}

struct Bench {
    results: BTreeMap<String, f64>,
    filter: Option<String>,
    /// `BRAID_MICROBENCH_CALLS`: calls per round instead of [`ROUND`].
    calls: Option<u64>,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| f.split(',').any(|f| name.contains(f)))
    }

    /// Times `f` like Ray's `timeit`: `multiplier` operations per call.
    async fn timeit<F, Fut>(&mut self, name: &str, multiplier: f64, mut f: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        if !self.wanted(name) {
            return Ok(());
        }
        let warm = Instant::now();
        let mut count = 0u64;
        let warm_calls = self.calls.map(|n| (n / 5).max(1));
        while match warm_calls {
            Some(n) => count < n,
            None => warm.elapsed() < ROUND / 3 || count == 0,
        } {
            f().await.with_context(|| format!("{name}: warm-up"))?;
            count += 1;
        }
        let step = match self.calls {
            Some(n) => n,
            None => count / 10 + 1,
        };
        let mut rates = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let mut n = 0u64;
            while n == 0 || (self.calls.is_none() && start.elapsed() < ROUND) {
                for _ in 0..step {
                    f().await.with_context(|| name.to_string())?;
                }
                n += step;
            }
            rates.push(multiplier * n as f64 / start.elapsed().as_secs_f64());
        }
        let rate = median(&mut rates);
        eprintln!("{name} per second {rate:.2}");
        self.results.insert(name.to_string(), rate);
        Ok(())
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn check(code: u32, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(code == 0, "{what} failed inside a worker");
    Ok(())
}

/// Runs the microbenchmark and prints its figures.
pub fn run(json: bool, actor_resource: Option<String>) -> anyhow::Result<()> {
    if let Some(name) = actor_resource {
        let _ = ACTOR_RESOURCE.set(name);
    }
    let rt = braid::init_blocking().context("start an embedded cluster")?;
    let filter = std::env::var("TESTS_TO_RUN").ok().filter(|s| !s.is_empty());
    let rt2 = rt.clone();
    let results = rt.block_on(async move { workloads(rt2, filter).await })?;
    if json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        for (k, v) in &results {
            println!("{k:48} {v:>14.2}");
        }
    }
    Ok(())
}

async fn workloads(rt: Runtime, filter: Option<String>) -> anyhow::Result<BTreeMap<String, f64>> {
    let calls = match std::env::var("BRAID_MICROBENCH_CALLS") {
        Ok(s) => Some(s.parse::<u64>().ok().filter(|&n| n > 0).with_context(|| {
            format!("BRAID_MICROBENCH_CALLS={s:?}: expected a positive number of calls")
        })?),
        Err(_) => None,
    };
    let mut b = Bench {
        results: BTreeMap::new(),
        filter,
        calls,
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let n_cpu = (cpus / 2).max(1);

    if b.wanted("memcpy") {
        b.results
            .insert("memcpy_gigabytes_per_s".into(), memcpy_gigabytes_per_s());
    }
    if b.wanted("uds") {
        b.results
            .insert("uds_round_trip_us".into(), uds_round_trip_us()?);
    }

    let value = rt.put(&0i64)?;
    b.timeit("single_client_get_calls_Plasma_Store", 1.0, || async {
        rt.get(&value).await?;
        Ok(())
    })
    .await?;
    b.timeit("single_client_put_calls_Plasma_Store", 1.0, || async {
        rt.put(&0i64)?;
        Ok(())
    })
    .await?;
    b.timeit("multi_client_put_calls_Plasma_Store", 1000.0, || async {
        let refs: Vec<_> = (0..10)
            .map(|_| do_put_small::remote(&rt))
            .collect::<Result<_, _>>()?;
        for code in rt.get_all(&refs).await? {
            check(code, "do_put_small")?;
        }
        Ok(())
    })
    .await?;
    if b.wanted("single_client_put_gigabytes") {
        let array = vec![0i64; 100 * 1024 * 1024];
        b.timeit("single_client_put_gigabytes", 8.0 * 0.1, || async {
            rt.put_array(&array)?;
            Ok(())
        })
        .await?;
    }
    b.timeit("single_client_tasks_and_get_batch", 1.0, || async {
        let refs: Vec<_> = (0..1000)
            .map(|_| small_value::remote(&rt))
            .collect::<Result<_, _>>()?;
        rt.get_all(&refs).await?;
        Ok(())
    })
    .await?;
    b.timeit("multi_client_put_gigabytes", 10.0 * 8.0 * 0.1, || async {
        let refs: Vec<_> = (0..10)
            .map(|_| do_put::remote(&rt))
            .collect::<Result<_, _>>()?;
        for code in rt.get_all(&refs).await? {
            check(code, "do_put")?;
        }
        Ok(())
    })
    .await?;
    if b.wanted("single_client_get_object_containing_10k_refs") {
        let containing = create_object_containing_ref::remote(&rt)?;
        b.timeit(
            "single_client_get_object_containing_10k_refs",
            1.0,
            || async {
                let refs = rt.get(&containing).await?;
                anyhow::ensure!(
                    refs.len() == 10_000,
                    "expected 10k refs, got {}",
                    refs.len()
                );
                Ok(())
            },
        )
        .await?;
    }
    b.timeit("single_client_wait_1k_refs", 1.0, || async {
        let mut not_ready: Vec<_> = (0..1000)
            .map(|_| small_value::remote(&rt))
            .collect::<Result<_, _>>()?;
        while !not_ready.is_empty() {
            let (_ready, rest) = rt.wait(&not_ready, 1, None).await;
            not_ready = rest;
        }
        Ok(())
    })
    .await?;
    b.timeit("single_client_tasks_sync", 1.0, || async {
        let r = small_value::remote(&rt)?;
        rt.get(&r).await?;
        Ok(())
    })
    .await?;
    b.timeit("single_client_tasks_async", 1000.0, || async {
        let refs: Vec<_> = (0..1000)
            .map(|_| small_value::remote(&rt))
            .collect::<Result<_, _>>()?;
        rt.get_all(&refs).await?;
        Ok(())
    })
    .await?;

    if b.wanted("multi_client_tasks_async") {
        let (n, m) = (10_000u32, 4);
        let actors = spawn_actors(m, || place(BenchActor::remote(&rt))).await?;
        b.timeit(
            "multi_client_tasks_async",
            f64::from(n) * m as f64,
            || async {
                let calls: Vec<_> = actors.iter().map(|a| a.small_value_batch(n)).collect();
                for code in futures::future::join_all(calls).await {
                    check(code?, "small_value_batch")?;
                }
                Ok(())
            },
        )
        .await?;
        kill_all(&rt, &actors).await;
    }

    if b.wanted("1_1_actor_calls_sync") || b.wanted("actor_call_latency") {
        let a = place(BenchActor::remote(&rt)).spawn().await?;
        b.timeit("1_1_actor_calls_sync", 1.0, || async {
            a.small_value().await?;
            Ok(())
        })
        .await?;
        let mut samples = Vec::with_capacity(20_000);
        let start = Instant::now();
        while samples.len() < 20_000 && start.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            a.small_value().await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(|x, y| x.total_cmp(y));
        let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        b.results
            .insert("actor_call_latency_us_p50".into(), pick(0.50));
        b.results
            .insert("actor_call_latency_us_p99".into(), pick(0.99));
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_1_actor_calls_async") {
        let a = place(BenchActor::remote(&rt)).spawn().await?;
        b.timeit("1_1_actor_calls_async", 1000.0, || async {
            let calls: Vec<_> = (0..1000).map(|_| a.small_value()).collect();
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok(())
        })
        .await?;
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_1_actor_calls_concurrent") {
        let a = place(BenchActor::remote(&rt))
            .max_concurrency(16)
            .spawn()
            .await?;
        b.timeit("1_1_actor_calls_concurrent", 1000.0, || async {
            let calls: Vec<_> = (0..1000).map(|_| a.small_value()).collect();
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok(())
        })
        .await?;
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_n_actor_calls_async") {
        let n = 5000u32;
        let servers = spawn_actors(n_cpu, || place(BenchActor::remote(&rt))).await?;
        let raws: Vec<ActorHandle> = servers.iter().map(|s| s.raw().clone()).collect();
        let client = place(Client::remote(&rt, raws)).spawn().await?;
        b.timeit(
            "1_n_actor_calls_async",
            f64::from(n) * n_cpu as f64,
            || async {
                check(
                    client.small_value_batch(n).await?,
                    "Client::small_value_batch",
                )
            },
        )
        .await?;
        kill_all(&rt, &servers).await;
        rt.kill_actor(client.raw()).await?;
    }
    if b.wanted("n_n_actor_calls_async") {
        let (n, m) = (5000u32, 4);
        let actors = spawn_actors(n_cpu, || place(BenchActor::remote(&rt))).await?;
        let raws: Vec<ActorHandle> = actors.iter().map(|s| s.raw().clone()).collect();
        b.timeit("n_n_actor_calls_async", f64::from(n) * m as f64, || async {
            let refs: Vec<_> = (0..m)
                .map(|_| work::remote(&rt, raws.clone(), n))
                .collect::<Result<_, _>>()?;
            for code in rt.get_all(&refs).await? {
                check(code, "work")?;
            }
            Ok(())
        })
        .await?;
        kill_all(&rt, &actors).await;
    }
    if b.wanted("n_n_actor_calls_with_arg_async") {
        let n = 1000u32;
        let actors = spawn_actors(n_cpu, || place(BenchActor::remote(&rt))).await?;
        let mut clients = Vec::new();
        for a in &actors {
            clients.push(
                place(Client::remote(&rt, vec![a.raw().clone()]))
                    .spawn()
                    .await?,
            );
        }
        b.timeit(
            "n_n_actor_calls_with_arg_async",
            f64::from(n) * clients.len() as f64,
            || async {
                let calls: Vec<_> = clients.iter().map(|c| c.small_value_batch_arg(n)).collect();
                for code in futures::future::join_all(calls).await {
                    check(code?, "Client::small_value_batch_arg")?;
                }
                Ok(())
            },
        )
        .await?;
        kill_all(&rt, &actors).await;
        kill_all(&rt, &clients).await;
    }
    if b.wanted("1_1_async_actor_calls_sync") {
        let a = place(AsyncActor::remote(&rt))
            .max_concurrency(1000)
            .spawn()
            .await?;
        b.timeit("1_1_async_actor_calls_sync", 1.0, || async {
            a.small_value().await?;
            Ok(())
        })
        .await?;
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_1_async_actor_calls_async") {
        let a = place(AsyncActor::remote(&rt))
            .max_concurrency(1000)
            .spawn()
            .await?;
        b.timeit("1_1_async_actor_calls_async", 1000.0, || async {
            let calls: Vec<_> = (0..1000).map(|_| a.small_value()).collect();
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok(())
        })
        .await?;
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_1_async_actor_calls_with_args_async") {
        let a = place(AsyncActor::remote(&rt))
            .max_concurrency(1000)
            .spawn()
            .await?;
        b.timeit("1_1_async_actor_calls_with_args_async", 1000.0, || async {
            let calls: Vec<_> = (0..1000)
                .map(|i| a.small_value_with_arg(i as i64))
                .collect();
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok(())
        })
        .await?;
        rt.kill_actor(a.raw()).await?;
    }
    if b.wanted("1_n_async_actor_calls_async") {
        let n = 5000u32;
        let servers = spawn_actors(n_cpu, || {
            place(AsyncActor::remote(&rt)).max_concurrency(1000)
        })
        .await?;
        let raws: Vec<ActorHandle> = servers.iter().map(|s| s.raw().clone()).collect();
        let client = place(Client::remote(&rt, raws)).spawn().await?;
        b.timeit(
            "1_n_async_actor_calls_async",
            f64::from(n) * n_cpu as f64,
            || async {
                check(
                    client.small_value_batch(n).await?,
                    "Client::small_value_batch",
                )
            },
        )
        .await?;
        kill_all(&rt, &servers).await;
        rt.kill_actor(client.raw()).await?;
    }
    if b.wanted("n_n_async_actor_calls_async") {
        let (n, m) = (5000u32, 4);
        let actors = spawn_actors(n_cpu, || {
            place(AsyncActor::remote(&rt)).max_concurrency(1000)
        })
        .await?;
        let raws: Vec<ActorHandle> = actors.iter().map(|s| s.raw().clone()).collect();
        b.timeit(
            "n_n_async_actor_calls_async",
            f64::from(n) * m as f64,
            || async {
                let refs: Vec<_> = (0..m)
                    .map(|_| work::remote(&rt, raws.clone(), n))
                    .collect::<Result<_, _>>()?;
                for code in rt.get_all(&refs).await? {
                    check(code, "work")?;
                }
                Ok(())
            },
        )
        .await?;
        kill_all(&rt, &actors).await;
    }
    if b.wanted("actor_creations_per_s") {
        let mut rates = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let actors = spawn_actors(100, || place(BenchActor::remote(&rt))).await?;
            let calls: Vec<_> = actors.iter().map(|a| a.small_value()).collect();
            for r in futures::future::join_all(calls).await {
                r?;
            }
            rates.push(100.0 / start.elapsed().as_secs_f64());
            kill_all(&rt, &actors).await;
        }
        b.results
            .insert("actor_creations_per_s".into(), median(&mut rates));
    }
    if b.wanted("idle_worker_rss") {
        let a = place(BenchActor::remote(&rt)).spawn().await?;
        let pid = a.pid().await?;
        a.small_value().await?;
        b.results
            .insert("idle_worker_rss_mib".into(), rss_mib(pid)?);
        rt.kill_actor(a.raw()).await?;
    }
    Ok(b.results)
}

async fn spawn_actors<H, F>(n: usize, make: F) -> anyhow::Result<Vec<H>>
where
    H: TypedHandle,
    F: Fn() -> braid::ActorBuilder<H>,
{
    let spawns: Vec<_> = (0..n).map(|_| make().spawn()).collect();
    let mut out = Vec::with_capacity(n);
    for h in futures::future::join_all(spawns).await {
        out.push(h?);
    }
    Ok(out)
}

async fn kill_all<H: TypedHandle>(rt: &Runtime, actors: &[H]) {
    for a in actors {
        let _ = rt.kill_actor(a.raw()).await;
    }
}

/// RssAnon + RssFile of a process, in MiB (the shared arena, RssShmem, is
/// not counted).
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((field("RssAnon:") + field("RssFile:")) / 1024.0)
}

/// memcpy bandwidth into pre-faulted memory, 800 MiB, median of five.
fn memcpy_gigabytes_per_s() -> f64 {
    let len = 800 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            len as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut rates)
}

/// Median round trip of one byte over a Unix socket pair between two
/// threads, each blocking in `read` (the same kernel path as between two
/// processes).
fn uds_round_trip_us() -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (mut a, b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut b = b;
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() {
            if b.write_all(&byte).is_err() {
                return;
            }
        }
    });
    let mut samples = Vec::with_capacity(20_000);
    let mut byte = [7u8; 1];
    for _ in 0..20_000 {
        let t = Instant::now();
        a.write_all(&byte)?;
        a.read_exact(&mut byte)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(a);
    let _ = echo.join();
    Ok(median(&mut samples))
}
