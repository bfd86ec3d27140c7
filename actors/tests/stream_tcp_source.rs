//! The TCP line source: exactly-once output through the transactional
//! sink with and without a crash, acks sent only when a checkpoint
//! completes and never ahead of what a recovery can restore, reconnection
//! after a lost connection, and its failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::{FaultPoint, JobConfig};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::EventTime;
use braid_actors::stream::plan::Plan;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::{Source, SourcePoll};
use braid_actors::stream::tcp_source::{
    LineServer, ServerEvent, TcpLine, TcpLineSource, TcpSourceError,
};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LINES: u64 = 5_000;

fn build(addr: SocketAddr, out: &Path) -> Plan {
    let env = StreamEnv::new(1);
    let out = out.to_path_buf();
    env.source("tcp", move |_, _| TcpLineSource::new(addr))
        .map(|l: TcpLine| format!("{} {}", l.seq, l.payload))
        .sink("out", move |_| {
            TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
        });
    Plan::new(env.into_graph())
}

fn config(dir: &Path) -> JobConfig {
    let mut config = JobConfig::new(CheckpointStorage::local(dir.join("chk"), "tcp", 3).unwrap());
    config.checkpoint_interval = Duration::from_millis(20);
    config.pace.rate = Some(20_000.0);
    config
}

/// Every line `seq line-seq` of `0..LINES` committed exactly once.
fn check_exactly_once(out: &Path) {
    let lines = committed_lines(out).unwrap();
    let mut seen = vec![0u32; LINES as usize];
    for line in &lines {
        let (seq, payload) = line.split_once(' ').unwrap();
        let seq: u64 = seq.parse().unwrap();
        assert_eq!(payload, format!("line-{seq}"));
        seen[seq as usize] += 1;
    }
    let lost = seen.iter().filter(|n| **n == 0).count();
    let duplicated = seen.iter().filter(|n| **n > 1).count();
    assert!(
        lost == 0 && duplicated == 0 && lines.len() as u64 == LINES,
        "{lost} lines lost, {duplicated} duplicated, {} committed",
        lines.len()
    );
}

/// Acks never decrease, and no connection asked for lines below an ack
/// (the server would have forgotten them).
fn check_acks(server: &LineServer) {
    let events = server.events();
    let mut acked = 0;
    for event in &events {
        match *event {
            ServerEvent::Ack(seq) => {
                assert!(
                    seq >= acked,
                    "ack went back from {acked} to {seq}: {events:?}"
                );
                assert!(seq <= LINES, "ack {seq} beyond the stream: {events:?}");
                acked = seq;
            }
            ServerEvent::From(seq) => {
                assert!(seq >= acked, "FROM {seq} below ack {acked}: {events:?}");
            }
            ServerEvent::Refused(seq) => panic!("FROM {seq} refused: {events:?}"),
        }
    }
}

#[test]
fn every_line_is_committed_once_and_the_last_checkpoint_acks_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = LineServer::start(LINES).unwrap();
    let report =
        braid_actors::stream::local::run(&build(server.addr(), &out), config(dir.path())).unwrap();
    assert_eq!(report.failures, 0, "{report:?}");
    assert!(report.checkpoints >= 2, "{report:?}");
    check_exactly_once(&out);
    assert!(
        server.wait_acked(LINES, Duration::from_secs(5)),
        "the final checkpoint acks every line: {:?}",
        server.events()
    );
    assert_eq!(server.acked(), Some(LINES));
    assert_eq!(server.froms(), vec![0]);
    let acks = server.acks();
    assert!(acks.len() >= 2, "an ack per completed checkpoint: {acks:?}");
    check_acks(&server);
}

#[test]
fn after_a_crash_the_source_replays_from_its_checkpoint_and_acks_stay_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = LineServer::start(LINES).unwrap();
    let mut config = config(dir.path());
    let fired = Arc::new(AtomicU64::new(0));
    let hook_fired = fired.clone();
    config.faults = Some(Arc::new(move |p| {
        p == FaultPoint::BeforeCommit(3) && hook_fired.fetch_add(1, Ordering::SeqCst) == 0
    }));
    let report = braid_actors::stream::local::run(&build(server.addr(), &out), config).unwrap();
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(report.restored_from, vec![2], "{report:?}");
    check_exactly_once(&out);
    assert!(
        server.wait_acked(LINES, Duration::from_secs(5)),
        "{:?}",
        server.events()
    );
    let froms = server.froms();
    assert_eq!(froms.len(), 2, "a fresh start and one replay: {froms:?}");
    assert_eq!(froms[0], 0);
    let acked_before_crash = server
        .events()
        .iter()
        .take_while(|e| **e != ServerEvent::From(froms[1]))
        .filter_map(|e| match e {
            ServerEvent::Ack(seq) => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    assert!(
        acked_before_crash <= froms[1],
        "epoch 3 never completed, so nothing past epoch 2's offset {} was acked, yet {acked_before_crash} was",
        froms[1]
    );
    check_acks(&server);
}

/// Polls `source` until it has emitted `n` more lines, ended, or failed
/// (the bool: it ended or failed; a failure is also the source's `error`).
fn read(source: &mut TcpLineSource, n: usize) -> (Vec<TcpLine>, bool) {
    let mut got: Vec<(TcpLine, Option<EventTime>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ended = false;
    while got.len() < n && Instant::now() < deadline {
        let room = n - got.len();
        match source.poll(&mut got, room) {
            Ok(SourcePoll::Emitted(_)) => {}
            Ok(SourcePoll::Idle) => std::thread::sleep(Duration::from_millis(1)),
            Ok(SourcePoll::Exhausted) => {
                ended = true;
                break;
            }
            Err(e) => {
                assert!(
                    source.error().is_some(),
                    "a failed poll ({e}) names its error"
                );
                ended = true;
                break;
            }
        }
    }
    (got.into_iter().map(|(l, _)| l).collect(), ended)
}

#[test]
fn an_ack_is_sent_when_a_checkpoint_completes_not_at_the_barrier() {
    let server = LineServer::start(100).unwrap();
    let mut source = TcpLineSource::new(server.addr());
    let (first, _) = read(&mut source, 40);
    assert_eq!(first.len(), 40);
    assert_eq!(source.offset(), 40u64.to_le_bytes().to_vec());
    let (rest, _) = read(&mut source, 60);
    assert_eq!(rest.len(), 60);
    assert_eq!(rest[0].seq, 40);
    assert_eq!(source.offset(), 100u64.to_le_bytes().to_vec());
    assert_eq!(
        read(&mut source, 1),
        (Vec::new(), true),
        "END after line 99"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        server.acked(),
        None,
        "offsets taken at barriers ack nothing"
    );

    source.notify_checkpoint_complete(1);
    assert!(server.wait_acked(40, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        server.acked(),
        Some(40),
        "checkpoint 1 covers only its offset"
    );
    source.notify_checkpoint_complete(2);
    assert!(server.wait_acked(100, Duration::from_secs(5)));
    source.notify_checkpoint_complete(3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(server.acks(), vec![40, 100], "no offset left to ack for 3");
}

#[test]
fn a_lost_connection_is_reopened_from_the_offset_without_duplicates() {
    let server = LineServer::start(1_000).unwrap();
    server.cut_next_connection_after(300);
    let mut source = TcpLineSource::new(server.addr());
    let (lines, _) = read(&mut source, 1_000);
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (0..1_000).collect::<Vec<_>>());
    assert!(read(&mut source, 1).1, "END after line 999");
    assert!(source.error().is_none(), "{:?}", source.error());
    assert_eq!(server.froms(), vec![0, 300]);
}

#[test]
fn a_replay_below_what_was_acked_is_refused() {
    let server = LineServer::start(100).unwrap();
    let mut first = TcpLineSource::new(server.addr());
    assert_eq!(read(&mut first, 100).0.len(), 100);
    first.offset();
    first.notify_checkpoint_complete(1);
    assert!(server.wait_acked(100, Duration::from_secs(5)));

    let mut late = TcpLineSource::new(server.addr());
    late.seek(&50u64.to_le_bytes()).unwrap();
    assert_eq!(read(&mut late, 10), (Vec::new(), true));
    assert!(
        matches!(late.error(), Some(TcpSourceError::Refused(_))),
        "{:?}",
        late.error()
    );
    assert!(server.events().contains(&ServerEvent::Refused(50)));

    let mut restored = TcpLineSource::new(server.addr());
    restored.seek(&100u64.to_le_bytes()).unwrap();
    assert_eq!(read(&mut restored, 10), (Vec::new(), true));
    assert!(restored.error().is_none(), "{:?}", restored.error());
}

#[test]
fn a_gap_in_the_stream_fails_the_source() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (stream, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut from = String::new();
        reader.read_line(&mut from).unwrap();
        (&stream).write_all(b"0 a\n1 b\n3 d\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        from
    });
    let mut source = TcpLineSource::new(addr);
    let (lines, exhausted) = read(&mut source, 10);
    assert!(exhausted);
    assert_eq!(
        lines.iter().map(|l| l.payload.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(
        matches!(
            source.error(),
            Some(TcpSourceError::Gap {
                expected: 2,
                got: 3
            })
        ),
        "{:?}",
        source.error()
    );
    assert_eq!(server.join().unwrap(), "FROM 0\n");
}

#[test]
fn an_unreachable_server_fails_the_source_after_its_retries() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut source = TcpLineSource::new(addr).with_max_retries(2);
    let (lines, exhausted) = read(&mut source, 1);
    assert!(lines.is_empty() && exhausted);
    assert!(
        matches!(
            source.error(),
            Some(TcpSourceError::Unreachable { attempts: 3, .. })
        ),
        "{:?}",
        source.error()
    );
}
