//! Actors on an embedded cluster: a stateful counter, a named actor found by
//! name, a handle passed to a task that calls the actor, an async actor
//! serving several calls at once, and an actor restarted after its process
//! is killed.
//!
//! Run: `cargo run --release --example actors`

use braid::TypedHandle;
use std::time::{Duration, Instant};

/// A counter: `&mut self` methods run one at a time, in call order.
#[braid::actor]
pub struct Counter {
    n: u64,
}

#[braid::actor]
impl Counter {
    fn new(start: u64) -> Self {
        Counter { n: start }
    }

    fn incr(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }

    fn get(&self) -> u64 {
        self.n
    }

    /// The process the actor lives in.
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn sleep_ms(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

/// An async actor: its `async fn(&self)` methods may overlap, up to the
/// `max_concurrency` it was created with.
#[braid::actor]
pub struct Fetcher {
    delay: Duration,
}

#[braid::actor]
impl Fetcher {
    fn new(delay_ms: u64) -> Self {
        Fetcher {
            delay: Duration::from_millis(delay_ms),
        }
    }

    /// Pretends to fetch item `id`, waiting without blocking a thread.
    async fn fetch(&self, id: u32) -> String {
        tokio::time::sleep(self.delay).await;
        format!("item-{id}")
    }
}

/// A task that receives an actor handle and calls the actor `times` times.
/// Code inside a task is synchronous, so it waits with `.blocking()`.
#[braid::remote]
fn bump(counter: CounterHandle, times: u64) -> Result<u64, String> {
    let mut last = 0;
    for _ in 0..times {
        last = counter.incr(1).blocking().map_err(|e| e.to_string())?;
    }
    Ok(last)
}

/// Actors on an embedded cluster: a counter, a named actor, a handle passed
/// to a task, an async actor, and a restart after a kill. Takes no
/// arguments.
#[derive(clap::Parser)]
#[command(name = "actors")]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {} = clap::Parser::parse();
    let rt = braid::init().await?;

    // A counter: calls from one caller run in order.
    let c = Counter::remote(&rt, 10).spawn().await?;
    let calls: Vec<_> = (0..5).map(|_| c.incr(1)).collect();
    let mut seen = Vec::new();
    for call in calls {
        seen.push(call.await?);
    }
    println!("counter: five incr(1) calls returned {seen:?}");
    println!("counter: get() = {}", c.get().await?);

    // A named actor, found by name (from here, or from any task or driver
    // of the cluster).
    let named = Counter::remote(&rt, 0).name("hits").spawn().await?;
    named.incr(7).await?;
    let found: CounterHandle = rt.get_actor("hits").await?;
    println!(
        "named: looked up \"hits\", incr(1) = {}",
        found.incr(1).await?
    );

    // A handle passed to a remote task, which calls the actor itself.
    let r = bump::remote(&rt, named.clone(), 5)?;
    // Its `Err(String)` would arrive as `braid::Error::Application`.
    let last = rt.get(&r).await?;
    println!(
        "task: bumped \"hits\" five times, last value {last}; get() = {}",
        named.get().await?
    );

    // An async actor: four 300 ms calls overlap with max_concurrency(4)
    // and run one after another with the default of 1.
    for concurrency in [4, 1] {
        let f = Fetcher::remote(&rt, 300)
            .max_concurrency(concurrency)
            .spawn()
            .await?;
        let start = Instant::now();
        let calls: Vec<_> = (0..4).map(|i| f.fetch(i)).collect();
        let mut items = Vec::new();
        for call in calls {
            items.push(call.await?);
        }
        println!(
            "async: max_concurrency({concurrency}) fetched {items:?} in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        rt.kill_actor(f.raw()).await?;
    }

    // Restarts: the actor's process is killed; the owner starts a new
    // instance (from the constructor, so its state starts over) and later
    // calls reach it.
    let phoenix = Counter::remote(&rt, 0).max_restarts(1).spawn().await?;
    phoenix.incr(3).await?;
    let pid = phoenix.pid().await?;
    println!("restart: actor runs in process {pid}, count 3; killing it");
    let in_flight = tokio::spawn(phoenix.sleep_ms(5_000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    braid_examples::sigkill(pid)?;
    match in_flight.await? {
        Err(e) => println!("restart: the call in flight failed: {e}"),
        Ok(_) => println!("restart: the call in flight finished (unexpected)"),
    }
    let new_pid = phoenix.pid().await?;
    println!(
        "restart: the next call reached a new instance in process {new_pid}, count {}",
        phoenix.get().await?
    );

    for handle in [&c, &named, &phoenix] {
        rt.kill_actor(handle.raw()).await?;
    }
    rt.shutdown().await;
    Ok(())
}
