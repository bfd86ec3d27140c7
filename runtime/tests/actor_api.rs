//! Actors against a real embedded cluster: state and call order, named
//! actors, handles passed to tasks and actors, async methods with declared
//! concurrency, detached actors outliving their driver, kills, restarts
//! after the actor's process is killed, and per-call timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Runtime, TypedHandle};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A counter whose state lives in its actor process.
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

    /// Adds `by` unless that passes `limit`.
    fn add_within(&mut self, by: u64, limit: u64) -> Result<u64, String> {
        if self.n + by > limit {
            return Err(format!("{} + {by} passes {limit}", self.n));
        }
        self.n += by;
        Ok(self.n)
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn sleep_ms(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

/// Lets calls through only once `parties` of them are inside at once.
#[braid::actor]
pub struct Gate {
    arrived: std::sync::Arc<tokio::sync::Barrier>,
}

#[braid::actor]
impl Gate {
    fn new(parties: usize) -> Self {
        Gate {
            arrived: std::sync::Arc::new(tokio::sync::Barrier::new(parties)),
        }
    }

    /// Returns only once `parties` calls are inside at the same time.
    async fn meet(&self) -> bool {
        self.arrived.wait().await;
        true
    }
}

#[braid::remote]
fn bump(counter: CounterHandle, times: u64) -> u64 {
    let mut last = 0;
    for _ in 0..times {
        last = counter.incr(1).blocking().unwrap();
    }
    last
}

#[braid::remote]
fn lookup_and_bump(name: String) -> u64 {
    let rt = braid::current().unwrap();
    let rt2 = rt.clone();
    let counter: CounterHandle = rt
        .block_on(async move { rt2.get_actor(&name).await })
        .unwrap();
    counter.incr(100).blocking().unwrap()
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).expect("cluster")
    })
}

fn unique(name: &str) -> String {
    format!("{name}-{:08x}", uuid_like())
}

fn uuid_like() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id()
}

#[tokio::test]
async fn an_actor_keeps_state_and_runs_calls_in_order() {
    let rt = rt();
    let c = Counter::remote(rt, 10).spawn().await.unwrap();
    let calls: Vec<_> = (0..200).map(|_| c.incr(1)).collect();
    let values = futures::future::join_all(calls).await;
    let values: Vec<u64> = values.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, (11..=210).collect::<Vec<_>>());
    assert_eq!(c.get().await.unwrap(), 210);
    let r = c.incr(5).object_ref().unwrap();
    assert_eq!(rt.get(&r).await.unwrap(), 215);
    rt.kill_actor(c.raw()).await.unwrap();
}

#[tokio::test]
async fn named_actors_are_found_by_name_from_drivers_and_tasks() {
    let rt = rt();
    let name = unique("counter");
    let c = Counter::remote(rt, 0).name(&name).spawn().await.unwrap();
    let found: CounterHandle = rt.get_actor(&name).await.unwrap();
    assert_eq!(found.incr(1).await.unwrap(), 1);
    let r = lookup_and_bump::remote(rt, name.clone()).unwrap();
    assert_eq!(rt.get(&r).await.unwrap(), 101);
    assert_eq!(c.get().await.unwrap(), 101);

    let taken = Counter::remote(rt, 0).name(&name).spawn().await;
    assert_eq!(taken.err(), Some(Error::NameTaken(name.clone())));
    let wrong: Result<GateHandle, _> = rt.get_actor(&name).await;
    assert!(matches!(wrong, Err(Error::BadRequest(_))));
    assert!(matches!(
        rt.get_actor::<CounterHandle>("no-such-actor").await,
        Err(Error::ActorNotFound(_))
    ));
    rt.kill_actor_by_name(&name).await.unwrap();
    assert!(matches!(c.get().await, Err(Error::ActorDied { .. })));
}

#[tokio::test]
async fn get_if_exists_returns_the_live_actor_of_a_name_or_creates_it() {
    let rt = rt();
    let name = unique("shared");
    // Racing get-or-creates of one name all get the same actor.
    let racers = (0..4).map(|_| Counter::remote(rt, 7).name(&name).get_if_exists().spawn());
    let handles: Vec<CounterHandle> = futures::future::try_join_all(racers).await.unwrap();
    for h in &handles {
        assert_eq!(h.raw().id(), handles[0].raw().id());
    }
    assert_eq!(handles[1].incr(1).await.unwrap(), 8);
    assert_eq!(handles[2].get().await.unwrap(), 8, "one actor's state");
    // A name held by another class is an error, not a second actor.
    let other = Gate::remote(rt, 1)
        .name(&name)
        .get_if_exists()
        .spawn()
        .await;
    assert!(matches!(other, Err(Error::BadRequest(_))), "{other:?}");
    let unnamed = Counter::remote(rt, 0).get_if_exists().spawn().await;
    assert!(matches!(unnamed, Err(Error::BadRequest(_))), "{unnamed:?}");
    // Killed, the name is free: get_if_exists makes a new one.
    handles[0].kill(true).await.unwrap();
    let fresh = Counter::remote(rt, 0)
        .name(&name)
        .get_if_exists()
        .spawn()
        .await
        .unwrap();
    assert_ne!(fresh.raw().id(), handles[0].raw().id());
    assert_eq!(fresh.get().await.unwrap(), 0);
    fresh.kill(true).await.unwrap();
}

#[tokio::test]
async fn kill_on_a_typed_handle_restarts_the_actor_unless_told_not_to() {
    let rt = rt();
    let c = Counter::remote(rt, 0)
        .max_restarts(1)
        .spawn()
        .await
        .unwrap();
    let pid = c.pid().await.unwrap();
    c.kill(false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let new_pid = loop {
        match c.pid().await {
            Ok(p) if p != pid => break p,
            Ok(_) | Err(Error::ActorDied { .. }) => {
                assert!(Instant::now() < deadline, "the actor never came back");
            }
            Err(e) => panic!("after kill(false): {e}"),
        }
    };
    assert_ne!(new_pid, pid, "restarted in a new process");
    c.kill(true).await.unwrap();
    assert!(matches!(c.get().await, Err(Error::ActorDied { .. })));
}

#[tokio::test]
async fn a_method_returning_err_fails_the_call_with_the_applications_error() {
    let rt = rt();
    let c = Counter::remote(rt, 5).spawn().await.unwrap();
    assert_eq!(c.add_within(3, 10).await, Ok(8));
    let e = c.add_within(3, 10).await.unwrap_err();
    assert_eq!(e.downcast::<String>().as_deref(), Some("8 + 3 passes 10"));
    assert!(
        e.to_string().contains("add_within"),
        "names the method: {e}"
    );
    assert_eq!(c.get().await.unwrap(), 8, "the actor lives on");
    c.kill(true).await.unwrap();
}

#[tokio::test]
async fn handles_pass_to_tasks() {
    let rt = rt();
    let c = Counter::remote(rt, 0).spawn().await.unwrap();
    let r = bump::remote(rt, c.clone(), 5).unwrap();
    assert_eq!(rt.get(&r).await.unwrap(), 5);
    assert_eq!(c.get().await.unwrap(), 5);
    rt.kill_actor(c.raw()).await.unwrap();
}

#[tokio::test]
async fn async_methods_run_concurrently_up_to_the_declared_limit() {
    let rt = rt();
    let gate = Gate::remote(rt, 4)
        .max_concurrency(4)
        .spawn()
        .await
        .unwrap();
    let calls: Vec<_> = (0..4).map(|_| gate.meet()).collect();
    let met = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("four concurrent calls meet");
    assert!(met.into_iter().all(|m| m.unwrap()));

    let serial = Gate::remote(rt, 2).spawn().await.unwrap();
    let first = serial.meet().timeout(Duration::from_millis(300));
    assert!(
        matches!(first.await, Err(Error::Timeout(_))),
        "one call at a time cannot meet"
    );
    rt.kill_actor(gate.raw()).await.unwrap();
    rt.kill_actor(serial.raw()).await.unwrap();
}

#[tokio::test]
async fn a_killed_actor_process_restarts_and_later_calls_reach_the_new_instance() {
    let rt = rt();
    let c = Counter::remote(rt, 0)
        .max_restarts(1)
        .spawn()
        .await
        .unwrap();
    assert_eq!(c.incr(3).await.unwrap(), 3);
    let pid = c.pid().await.unwrap();
    let in_flight = c.sleep_ms(5_000);
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(pid);
    let died = in_flight.await.unwrap();
    assert!(matches!(died, Err(Error::ActorDied { .. })), "{died:?}");
    let start = Instant::now();
    let new_pid = c.pid().await.unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(
        c.get().await.unwrap(),
        0,
        "the new instance starts from its constructor"
    );
    assert!(start.elapsed() < Duration::from_secs(10));

    kill(new_pid);
    let after = c.get().await;
    assert!(
        matches!(after, Err(Error::ActorDied { .. })),
        "restarts spent: {after:?}"
    );
}

#[tokio::test]
async fn calls_in_flight_are_retried_when_max_task_retries_allows() {
    let rt = rt();
    let c = Counter::remote(rt, 0)
        .max_restarts(2)
        .max_task_retries(2)
        .spawn()
        .await
        .unwrap();
    let pid = c.pid().await.unwrap();
    let call = tokio::spawn(c.sleep_ms(1_000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(pid);
    assert_eq!(
        call.await.unwrap().unwrap(),
        1_000,
        "retried on the new instance"
    );
    assert_ne!(c.pid().await.unwrap(), pid);
    rt.kill_actor(c.raw()).await.unwrap();
}

#[tokio::test]
async fn calls_ride_through_an_actor_killed_every_200_ms() {
    let rt = rt();
    let c = Counter::remote(rt, 0)
        .max_restarts(1_000)
        .max_task_retries(3)
        .spawn()
        .await
        .unwrap();
    let first = c.pid().await.unwrap();
    let current = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(first));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Kills whichever process the actor last answered from, every 200 ms.
    let killer = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut kills = 0;
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let pid = current.load(std::sync::atomic::Ordering::Relaxed);
                if pid != last {
                    let _ = rustix::process::kill_process(
                        rustix::process::Pid::from_raw(pid as i32).unwrap(),
                        rustix::process::Signal::KILL,
                    );
                    kills += 1;
                    last = pid;
                }
            }
            kills
        })
    };
    let mut failed = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..1_000 {
        match c.pid().await {
            Ok(pid) => {
                current.store(pid, std::sync::atomic::Ordering::Relaxed);
                pids.insert(pid);
            }
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();
    println!(
        "1,000 calls, {kills} kills, {} processes, {} failed",
        pids.len(),
        failed.len()
    );
    assert!(kills >= 5, "the actor was killed {kills} times");
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    c.kill(true).await.unwrap();
}

#[tokio::test]
async fn a_call_made_after_its_actor_died_waits_for_the_restart() {
    let rt = rt();
    // No retries: only calls in flight at a death may fail.
    let c = Counter::remote(rt, 0)
        .max_restarts(10)
        .spawn()
        .await
        .unwrap();
    for _ in 0..5 {
        let pid = c.pid().await.unwrap();
        kill(pid);
        let gone = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(Instant::now() < gone, "the actor's process did not die");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let after = c.pid().await;
        assert!(
            matches!(after, Ok(p) if p != pid),
            "a call made after the death: {after:?}"
        );
    }
    c.kill(true).await.unwrap();
}

fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

const CHILD_VAR: &str = "BRAID_TEST_CHILD_DRIVER";

/// Entry point of the child driver `detached_actors_outlive_their_driver`
/// starts: joins the cluster from `BRAID_ADDRESS`, creates a detached and
/// a non-detached named actor, and exits.
#[test]
fn child_driver_entry() {
    let Ok(prefix) = std::env::var(CHILD_VAR) else {
        return;
    };
    let rt = braid::init_blocking().unwrap();
    let rt2 = rt.clone();
    rt.block_on(async move {
        let d = Counter::remote(&rt2, 7)
            .name(format!("{prefix}-detached"))
            .detached()
            .spawn()
            .await
            .unwrap();
        d.incr(1).await.unwrap();
        let a = Counter::remote(&rt2, 1)
            .name(format!("{prefix}-attached"))
            .spawn()
            .await
            .unwrap();
        a.incr(1).await.unwrap();
        println!("child ready");
    });
    std::process::exit(0);
}

#[tokio::test]
async fn detached_actors_outlive_their_driver_until_killed_by_name() {
    let rt = rt();
    let prefix = unique("job");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_driver_entry", "--nocapture"])
        .env(CHILD_VAR, &prefix)
        .env("BRAID_ADDRESS", rt.address())
        .env("BRAID_TOKEN", rt.token())
        .status()
        .unwrap();
    assert!(status.success());
    let detached: CounterHandle = rt.get_actor(&format!("{prefix}-detached")).await.unwrap();
    assert_eq!(
        detached.incr(1).await.unwrap(),
        9,
        "the detached actor lives on"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rt
            .get_actor::<CounterHandle>(&format!("{prefix}-attached"))
            .await
        {
            Err(Error::ActorNotFound(_)) => break,
            Ok(h) if h.get().await.is_err() => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the driver's own actor outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.kill_actor_by_name(&format!("{prefix}-detached"))
        .await
        .unwrap();
    assert!(matches!(detached.get().await, Err(Error::ActorDied { .. })));
}
