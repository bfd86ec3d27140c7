//! Recovery of the streaming engine: generation fencing of zombie sinks,
//! idempotent re-commit of pre-committed files on restore, recovery from
//! the previous checkpoint when the newest one is corrupt or half written,
//! and the recovery time the report gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::store::codec;
use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::context::TaskContext;
use braid_actors::stream::coordinator::{FaultPoint, JobConfig};
use braid_actors::stream::functions::{KeyedProcessFunction, ProcessContext};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{EventTime, Operator};
use braid_actors::stream::plan::Plan;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::GeneratorSource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------
// The sink, driven directly through the Operator trait.
// ---------------------------------------------------------------------------

type LineSink = TransactionalFileSink<String, fn(&String) -> String>;

/// A sink for subtask 0 of 1 of `generation`, built with that context
/// entered on this thread (as the runtime does before calling a factory).
fn sink_of_generation(dir: &Path, generation: u64) -> LineSink {
    TaskContext {
        subtask: 0,
        parallelism: 1,
        generation,
        restored_epoch: 0,
    }
    .enter();
    let sink: LineSink = TransactionalFileSink::new(dir, |s: &String| s.clone());
    assert_eq!(sink.error(), None, "sink of generation {generation}");
    sink
}

fn feed(sink: &mut LineSink, lines: &[&str]) {
    let mut out: Vec<((), Option<EventTime>)> = Vec::new();
    for l in lines {
        sink.process((*l).to_string(), None, &mut out).unwrap();
    }
}

/// Names of the files directly in `dir` (sorted).
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The pending record files (`e<epoch>-s<subtask>-g<generation>`) in
/// `<dir>/.pending`.
fn pending_files(dir: &Path) -> Vec<String> {
    names_in(&dir.join(".pending"))
        .into_iter()
        .filter(|n| n.starts_with('e'))
        .collect()
}

fn pending_name(epoch: u64, generation: u64) -> String {
    format!("e{epoch:020}-s0000-g{generation}")
}

fn part_name(epoch: u64) -> String {
    format!("part-{epoch:020}-0000")
}

#[test]
fn a_zombie_sink_of_an_older_generation_cannot_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");

    // Generation 1 writes epoch 1 and pre-commits it at the barrier.
    let mut a = sink_of_generation(&dir, 1);
    feed(&mut a, &["a1", "a2"]);
    let a_snapshot = a.snapshot().unwrap().encode().unwrap();
    assert_eq!(pending_files(&dir), vec![pending_name(1, 1)]);
    assert!(
        committed_lines(&dir).unwrap().is_empty(),
        "nothing before notify"
    );

    // Generation 2 starts (raising the fence) and restores A's snapshot:
    // the pre-committed epoch 1 is committed, since only completed
    // checkpoints are restored.
    let mut b = sink_of_generation(&dir, 2);
    assert_eq!(
        std::fs::read_to_string(dir.join("_FENCE")).unwrap().trim(),
        "2"
    );
    b.restore(&a_snapshot).unwrap();
    assert_eq!(committed_lines(&dir).unwrap(), vec!["a1", "a2"]);

    // Zombie A keeps running: writes epoch 2, pre-commits it and is told
    // epoch 2 completed. It must not publish.
    feed(&mut a, &["zombie1", "zombie2"]);
    let _ = a.snapshot().unwrap().encode().unwrap();
    assert!(
        pending_files(&dir).contains(&pending_name(2, 1)),
        "{:?}",
        pending_files(&dir)
    );
    let refused = a.notify_checkpoint_complete(2).unwrap_err();
    assert!(refused.to_string().contains("fenced off"), "{refused}");
    let lines = committed_lines(&dir).unwrap();
    assert_eq!(lines, vec!["a1", "a2"], "the zombie published nothing");
    assert!(
        pending_files(&dir).contains(&pending_name(2, 1)),
        "the zombie's pending file stays pending: {:?}",
        pending_files(&dir)
    );
    assert!(
        !names_in(&dir).contains(&part_name(2)),
        "no part file for epoch 2: {:?}",
        names_in(&dir)
    );

    // B commits its own epoch 2.
    feed(&mut b, &["b1", "b2", "b3"]);
    let _ = b.snapshot().unwrap().encode().unwrap();
    b.notify_checkpoint_complete(2).unwrap();
    assert_eq!(
        committed_lines(&dir).unwrap(),
        vec!["a1", "a2", "b1", "b2", "b3"]
    );
    assert_eq!(b.error(), None);

    // A zombie retrying its commit afterwards must not replace B's part
    // file of the same epoch either.
    assert!(a.notify_checkpoint_complete(2).is_err());
    assert!(a.notify_checkpoint_complete(3).is_err());
    assert_eq!(
        committed_lines(&dir).unwrap(),
        vec!["a1", "a2", "b1", "b2", "b3"]
    );
    assert!(pending_files(&dir).contains(&pending_name(2, 1)));
}

#[test]
fn restore_commits_what_the_checkpoint_pre_committed_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");

    // Generation 1 pre-commits epoch 1, writes on into epoch 2, and
    // crashes before the checkpoint's completion reaches it.
    let mut first = sink_of_generation(&dir, 1);
    feed(&mut first, &["l1", "l2", "l3"]);
    let snapshot = first.snapshot().unwrap().encode().unwrap();
    feed(&mut first, &["after-snapshot-g1"]);
    drop(first);
    assert_eq!(
        pending_files(&dir),
        vec![pending_name(1, 1), pending_name(2, 1)]
    );
    assert!(committed_lines(&dir).unwrap().is_empty());

    // Generation 2 restores: epoch 1 is committed once, the stray epoch 2
    // file of generation 1 is deleted.
    let mut second = sink_of_generation(&dir, 2);
    second.restore(&snapshot).unwrap();
    assert_eq!(committed_lines(&dir).unwrap(), vec!["l1", "l2", "l3"]);
    assert!(
        pending_files(&dir).is_empty(),
        "strays of the failed generation deleted: {:?}",
        pending_files(&dir)
    );
    // It writes a little, then crashes too (before any checkpoint).
    feed(&mut second, &["after-restore-g2"]);
    drop(second);
    assert_eq!(pending_files(&dir), vec![pending_name(2, 2)]);

    // Generation 3 restores the same snapshot again: nothing duplicated,
    // generation 2's stray deleted.
    let mut third = sink_of_generation(&dir, 3);
    third.restore(&snapshot).unwrap();
    assert_eq!(committed_lines(&dir).unwrap(), vec!["l1", "l2", "l3"]);
    assert!(pending_files(&dir).is_empty(), "{:?}", pending_files(&dir));
    assert_eq!(
        names_in(&dir)
            .into_iter()
            .filter(|n| n.starts_with("part-"))
            .collect::<Vec<_>>(),
        vec![part_name(1)]
    );

    // And it goes on normally from epoch 2.
    feed(&mut third, &["l4"]);
    let _ = third.snapshot().unwrap().encode().unwrap();
    third.notify_checkpoint_complete(2).unwrap();
    assert_eq!(committed_lines(&dir).unwrap(), vec!["l1", "l2", "l3", "l4"]);
    assert_eq!(third.error(), None);
}

// ---------------------------------------------------------------------------
// Whole jobs, run in-process (the counting job of stream_local.rs).
// ---------------------------------------------------------------------------

const KEYS: u64 = 17;
const RECORDS: u64 = 20_000;

fn key_of(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7) % KEYS
}

/// Counts records per key and emits `key count`.
struct CountPerKey;

impl KeyedProcessFunction<u64, u64> for CountPerKey {
    type State = u64;
    type Out = String;

    fn process(
        &mut self,
        key: &u64,
        _index: u64,
        _time: Option<EventTime>,
        count: &mut u64,
        ctx: &mut ProcessContext<'_, u64, String>,
    ) {
        *count += 1;
        ctx.emit(format!("{key} {count}"), None);
    }
}

fn build(records: u64, out: &Path, parallelism: usize) -> Plan {
    let env = StreamEnv::new(parallelism);
    let out = out.to_path_buf();
    env.source("numbers", move |s, p| {
        GeneratorSource::new(records, s, p, |i| i)
    })
    .key_by(|i: &u64| key_of(*i))
    .process(|| CountPerKey)
    .sink("out", move |_| {
        TransactionalFileSink::new(out.clone(), |line: &String| line.clone())
    });
    Plan::new(env.into_graph())
}

fn expected(records: u64) -> HashMap<u64, u64> {
    let mut n = HashMap::new();
    for i in 0..records {
        *n.entry(key_of(i)).or_insert(0) += 1;
    }
    n
}

/// Committed counts per key, sorted (duplicates kept).
fn committed_counts(out: &Path) -> HashMap<u64, Vec<u64>> {
    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    for line in committed_lines(out).unwrap() {
        let mut parts = line.split_whitespace();
        let key: u64 = parts.next().unwrap().parse().unwrap();
        let count: u64 = parts.next().unwrap().parse().unwrap();
        seen.entry(key).or_default().push(count);
    }
    for counts in seen.values_mut() {
        counts.sort_unstable();
    }
    seen
}

/// Every key's counts are 1..=n, each at least once; returns how many
/// lines are duplicates.
fn check_nothing_lost(out: &Path, records: u64) -> usize {
    let mut seen = committed_counts(out);
    let mut duplicates = 0;
    for (key, n) in expected(records) {
        let mut got = seen.remove(&key).unwrap_or_default();
        let all = got.len();
        got.dedup();
        duplicates += all - got.len();
        let lost: Vec<u64> = (1..=n).filter(|c| got.binary_search(c).is_err()).collect();
        assert!(
            lost.is_empty(),
            "key {key}: counts {lost:?} lost ({} of {n} present)",
            got.len()
        );
        assert!(
            got.iter().all(|c| (1..=n).contains(c)),
            "key {key}: a count beyond {n}: {got:?}"
        );
    }
    assert!(seen.is_empty(), "unexpected keys {:?}", seen.keys());
    duplicates
}

/// Every key's counts are exactly 1..=n, each once.
fn check_exactly_once(out: &Path, records: u64) {
    let lines = committed_lines(out).unwrap().len() as u64;
    let duplicates = check_nothing_lost(out, records);
    assert_eq!(duplicates, 0, "duplicated lines");
    assert_eq!(lines, records, "one committed line per record");
}

fn config(dir: &Path) -> JobConfig {
    let mut config = JobConfig::new(CheckpointStorage::local(dir.join("chk"), "test", 3).unwrap());
    config.checkpoint_interval = Duration::from_millis(20);
    config.pace.rate = Some(40_000.0);
    config
}

/// `<dir>/chk/test/chk-<epoch>` of every epoch that has a commit marker,
/// oldest first.
fn committed_checkpoint_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let job = dir.join("chk").join("test");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&job)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let epoch: u64 = name.strip_prefix("chk-")?.parse().ok()?;
            e.path()
                .join("_COMMITTED")
                .exists()
                .then(|| (epoch, e.path()))
        })
        .collect();
    found.sort();
    found
}

#[derive(Debug, Clone, Copy)]
enum Corruption {
    /// Flip the bytes of one state blob (same length, wrong CRC).
    StateBlob,
    /// Cut the manifest in half.
    TruncatedManifest,
}

/// Corrupts the newest committed checkpoint under `dir`; returns its
/// epoch.
fn corrupt_newest(dir: &Path, how: Corruption) -> u64 {
    let (epoch, chk) = committed_checkpoint_dirs(dir)
        .pop()
        .expect("a committed checkpoint");
    match how {
        Corruption::StateBlob => {
            let state = chk.join("state");
            let blob = names_in(&state)
                .into_iter()
                .map(|n| state.join(n))
                .find(|p| p.is_file())
                .expect("a state blob");
            let mut bytes = std::fs::read(&blob).unwrap();
            assert!(!bytes.is_empty());
            for b in bytes.iter_mut().rev().take(4) {
                *b ^= 0xFF;
            }
            std::fs::write(&blob, bytes).unwrap();
        }
        Corruption::TruncatedManifest => {
            let manifest = chk.join("manifest.json");
            let bytes = std::fs::read(&manifest).unwrap();
            std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
        }
    }
    epoch
}

#[test]
fn a_corrupt_latest_checkpoint_is_skipped_for_the_previous_one() {
    for how in [Corruption::StateBlob, Corruption::TruncatedManifest] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let plan = build(RECORDS, &out, 2);
        let mut config = config(tmp.path());
        // Epoch of the checkpoint the hook corrupted (0: not fired yet).
        let corrupted = Arc::new(AtomicU64::new(0));
        let hook_corrupted = corrupted.clone();
        let hook_dir = tmp.path().to_path_buf();
        config.faults = Some(Arc::new(move |p| {
            // Checkpoints 1..=3 are committed before barrier 4 is due.
            if p != FaultPoint::BeforeBarrier(4) || hook_corrupted.load(Ordering::SeqCst) != 0 {
                return false;
            }
            let epoch = corrupt_newest(&hook_dir, how);
            hook_corrupted.store(epoch, Ordering::SeqCst);
            true
        }));
        let report = braid_actors::stream::local::run(&plan, config)
            .unwrap_or_else(|e| panic!("{how:?}: the job failed: {e}"));
        let corrupt_epoch = corrupted.load(Ordering::SeqCst);
        assert_eq!(corrupt_epoch, 3, "{how:?}: the hook fired: {report:?}");
        assert_eq!(report.failures, 1, "{how:?}: {report:?}");
        assert_eq!(
            report.restored_from,
            vec![corrupt_epoch - 1],
            "{how:?}: recovery skipped the corrupt checkpoint {corrupt_epoch}"
        );
        // Not exactly once: the sinks of generation 1 may already have
        // published epoch 3 (its checkpoint completed, and only then was it
        // corrupted on disk). Generation 2 restores the state of epoch 2 and
        // replays epoch 3's input; its epoch 3 is cut at a different point
        // of the stream, so part of what generation 1 published for epoch 3
        // may be published again in epoch 4 or later. A fall-back to an
        // older checkpoint than the sinks already published is inherently
        // at-least-once. Nothing may be lost, though.
        let duplicates = check_nothing_lost(&out, RECORDS);
        let lines = committed_lines(&out).unwrap().len();
        assert_eq!(lines, RECORDS as usize + duplicates, "{how:?}");
    }
}

#[test]
fn a_half_written_checkpoint_is_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = build(RECORDS, &out, 2);
    let mut config = config(tmp.path());
    let fired = Arc::new(AtomicU64::new(0));
    let hook_fired = fired.clone();
    let hook_dir = tmp.path().to_path_buf();
    config.faults = Some(Arc::new(move |p| {
        if p != FaultPoint::BeforeCommit(3) || hook_fired.fetch_add(1, Ordering::SeqCst) != 0 {
            return false;
        }
        // Epoch 3's state blobs are written, its manifest and marker not.
        let chk3 = hook_dir
            .join("chk")
            .join("test")
            .join(format!("chk-{:020}", 3));
        assert!(
            !names_in(&chk3.join("state")).is_empty(),
            "state of epoch 3 written"
        );
        assert!(!chk3.join("manifest.json").exists());
        assert!(!chk3.join("_COMMITTED").exists());
        true
    }));
    let report = braid_actors::stream::local::run(&plan, config).unwrap();
    assert!(fired.load(Ordering::SeqCst) >= 1, "the hook fired");
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(report.restored_from, vec![2], "{report:?}");
    check_exactly_once(&out, RECORDS);
}

#[test]
fn recovery_time_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = build(RECORDS, &out, 2);
    let mut config = config(tmp.path());
    let fired = Arc::new(AtomicU64::new(0));
    let hook_fired = fired.clone();
    config.faults = Some(Arc::new(move |p| {
        p == FaultPoint::BeforeBarrier(3) && hook_fired.fetch_add(1, Ordering::SeqCst) == 0
    }));
    let report = braid_actors::stream::local::run(&plan, config).unwrap();
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(report.recovery_ms.len(), 1, "{report:?}");
    assert!(
        report.recovery_ms[0] < 2_000,
        "recovery took {} ms",
        report.recovery_ms[0]
    );
    check_exactly_once(&out, RECORDS);
}

#[test]

fn a_failed_commit_keeps_its_epochs_pending_for_a_later_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let mut sink = sink_of_generation(&dir, 1);
    feed(&mut sink, &["e1"]);
    let _ = sink.snapshot().unwrap().encode().unwrap();
    feed(&mut sink, &["e2"]);
    let _ = sink.snapshot().unwrap().encode().unwrap();
    // Epoch 1's commit fails: its final name is taken by a non-empty
    // directory, so the rename is refused (a stand-in for any transient
    // I/O error).
    let blocker = dir.join(part_name(1));
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let failed = sink.notify_checkpoint_complete(1).unwrap_err();
    assert!(failed.to_string().contains("commit"), "{failed}");
    assert!(!dir.join(part_name(2)).exists(), "nothing committed");
    assert_eq!(
        pending_files(&dir),
        vec![pending_name(1, 1), pending_name(2, 1)]
    );
    std::fs::remove_dir_all(&blocker).unwrap();
    // Checkpoint 3 is taken; the job then crashes before its completion
    // reaches the sink, and the next generation restores it. Epochs 1
    // and 2 completed, so their records must be published, once.
    feed(&mut sink, &["e3"]);
    let snapshot = sink.snapshot().unwrap().encode().unwrap();
    drop(sink);
    let mut next = sink_of_generation(&dir, 2);
    next.restore(&snapshot).unwrap();
    assert_eq!(committed_lines(&dir).unwrap(), vec!["e1", "e2", "e3"]);
}

#[test]
fn a_restored_snapshot_listing_a_file_outside_the_sinks_pending_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let victim = tmp.path().join("elsewhere");
    std::fs::write(&victim, "not the sink's").unwrap();
    // The sink's state as the codec lays it out: its pending files, then
    // its epoch.
    let forged = codec::encode(&(vec![(1u64, victim.clone())], 1u64)).unwrap();
    let mut sink = sink_of_generation(&dir, 2);
    let err = sink.restore(&forged).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(victim.exists(), "nothing was renamed");
    assert!(committed_lines(&dir).unwrap().is_empty());
}
