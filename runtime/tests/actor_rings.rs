//! Calls between processes on one machine travel over shared-memory rings:
//! the rings are set up, calls run in order and exclusively however many
//! callers an actor has, bursts that overflow a ring and frames larger than
//! it arrive whole and in order, and a ring actor's death still reaches its
//! callers as a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, Runtime, TypedHandle};
use std::sync::OnceLock;

/// Records the order calls reach it in.
#[braid::actor]
pub struct Recorder {
    seen: Vec<u64>,
    n: u64,
}

#[braid::actor]
impl Recorder {
    fn new() -> Self {
        Recorder {
            seen: Vec::new(),
            n: 0,
        }
    }

    /// Adds one; returns the new count.
    fn incr(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    /// Records `seq` and returns it with a checksum of `data`.
    fn take(&mut self, seq: u64, data: Vec<u8>) -> (u64, u64, usize) {
        self.seen.push(seq);
        let sum = data.iter().map(|&b| u64::from(b)).sum();
        (seq, sum, data.len())
    }

    fn seen(&self) -> Vec<u64> {
        self.seen.clone()
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn exit(&self) -> u32 {
        std::process::exit(3)
    }
}

#[braid::remote]
fn bump_many(recorder: RecorderHandle, times: u64) -> u64 {
    let mut last = 0;
    for _ in 0..times {
        last = recorder.incr().blocking().unwrap();
    }
    last
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0)).expect("cluster")
    })
}

fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                names.push(comm.trim().to_string());
            }
        }
    }
    names
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 31 + seq) as u8).collect()
}

#[tokio::test]
async fn calls_run_over_a_ring_in_order_and_one_at_a_time_from_every_caller() {
    let rt = rt();
    let r = Recorder::remote(rt).spawn().await.unwrap();
    let pid = r.pid().await.unwrap();
    assert!(
        thread_names(pid).iter().any(|n| n == "braid-ring"),
        "the actor serves its caller from a ring reader thread"
    );
    assert!(
        thread_names(std::process::id())
            .iter()
            .any(|n| n == "braid-ring"),
        "the driver reads its replies from a ring"
    );

    for expected in 1..=300u64 {
        assert_eq!(r.incr().await.unwrap(), expected, "sync calls in order");
    }
    let tasks: Vec<_> = (0..2)
        .map(|_| bump_many::remote(rt, r.clone(), 200).unwrap())
        .collect();
    let mine: Vec<_> = (0..200).map(|_| r.incr()).collect();
    let mine: Vec<u64> = futures::future::join_all(mine)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        mine.windows(2).all(|w| w[0] < w[1]),
        "one caller's calls run in the order sent"
    );
    for t in &tasks {
        rt.get(t).await.unwrap();
    }
    assert_eq!(
        r.incr().await.unwrap(),
        300 + 3 * 200 + 1,
        "calls from three callers never overlapped or got lost"
    );
    rt.kill_actor(r.raw()).await.unwrap();
}

#[tokio::test]
async fn bursts_that_overflow_the_ring_arrive_whole_and_in_order() {
    let rt = rt();
    let r = Recorder::remote(rt).spawn().await.unwrap();
    let len = 95 * 1024;
    let calls: Vec<_> = (0..48u64)
        .map(|seq| r.take(seq, payload(seq, len)))
        .collect();
    let replies = futures::future::join_all(calls).await;
    for (seq, reply) in replies.into_iter().enumerate() {
        let (got_seq, sum, got_len) = reply.unwrap();
        let expected: u64 = payload(seq as u64, len).iter().map(|&b| u64::from(b)).sum();
        assert_eq!((got_seq, sum, got_len), (seq as u64, expected, len));
    }
    assert_eq!(r.seen().await.unwrap(), (0..48).collect::<Vec<u64>>());
    rt.kill_actor(r.raw()).await.unwrap();
}

#[tokio::test]
async fn an_actor_dying_mid_call_fails_the_call_instead_of_hanging() {
    let rt = rt();
    let r = Recorder::remote(rt).spawn().await.unwrap();
    assert_eq!(r.incr().await.unwrap(), 1);
    let pending: Vec<_> = (0..20).map(|_| r.incr()).collect();
    let died = r.exit().await;
    assert!(matches!(died, Err(Error::ActorDied { .. })), "got {died:?}");
    for call in futures::future::join_all(pending).await {
        assert!(
            call.is_ok(),
            "calls sent before the fatal one were answered"
        );
    }
    let after = r.incr().await;
    assert!(
        matches!(after, Err(Error::ActorDied { .. })),
        "got {after:?}"
    );
}
