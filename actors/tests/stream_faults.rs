//! Faults dealt from outside the program to a streaming job in one
//! process: a full disk under the sink (a write and a pre-commit failing
//! with ENOSPC), a read-only sink directory at commit, a vanished sink
//! directory, read-only checkpoint storage, a hung snapshot, and a corrupt
//! newest checkpoint (state blob and manifest). Each ends exactly as
//! stated: the job recovers with every record committed once, or stops
//! with a typed error naming the operator, the phase and the epoch.
//!
//! The disk faults are real: a small tmpfs filled up, a read-only bind
//! mount. They need root (CI runs as root); elsewhere those tests say they
//! are skipped, and why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::{FaultPoint, JobConfig, JobError};
use braid_actors::stream::failure::{AttemptFailure, Phase, StageError, TaskError};
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::operator::{Collector, EventTime, Operator, OperatorError, Snapshot};
use braid_actors::stream::plan::Plan;
use braid_actors::stream::restart::RestartStrategy;
use braid_actors::stream::sink::{committed_lines, TransactionalFileSink};
use braid_actors::stream::source::{FileSource, GeneratorSource};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records `0..records` through a channel into a file sink named `out`
/// writing `dir`, one line per record. With a long checkpoint interval
/// the source is exhausted before the first checkpoint, so every record
/// belongs to epoch 1: a fault at that epoch's barrier or commit hits a
/// known set of records, whatever the timing.
fn job(records: u64, dir: &Path) -> Plan {
    let env = StreamEnv::new(1);
    let dir = dir.to_path_buf();
    env.source("numbers", move |s, p| {
        GeneratorSource::new(records, s, p, |i| i)
    })
    .rebalance()
    .sink("out", move |_| {
        TransactionalFileSink::new(dir.clone(), |i: &u64| i.to_string())
    });
    Plan::new(env.into_graph())
}

fn config(chk: &Path, restart: RestartStrategy) -> JobConfig {
    let mut config = JobConfig::new(CheckpointStorage::local(chk, "faults", 3).unwrap());
    config.checkpoint_interval = Duration::from_secs(60);
    config.restart = restart;
    config
}

fn with_hook(
    mut config: JobConfig,
    hook: impl Fn(FaultPoint) -> bool + Send + Sync + 'static,
) -> JobConfig {
    config.faults = Some(Arc::new(hook));
    config
}

/// Every record `0..records` committed exactly once.
fn assert_exactly_once(dir: &Path, records: u64) {
    let mut got: Vec<u64> = committed_lines(dir)
        .unwrap()
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    got.sort_unstable();
    let before = got.len();
    got.dedup();
    assert_eq!(before - got.len(), 0, "duplicated records");
    assert_eq!(
        got,
        (0..records).collect::<Vec<_>>(),
        "every record committed once"
    );
}

/// The operator failure a job stopped with.
fn operator_failure(err: &JobError) -> (String, Phase, u64, String) {
    match err {
        JobError::TooManyFailures {
            last:
                AttemptFailure::Subtask {
                    error:
                        TaskError::Stage(StageError::Operator {
                            operator,
                            phase,
                            epoch,
                            cause,
                        }),
                    ..
                },
            ..
        } => (operator.clone(), *phase, *epoch, cause.clone()),
        other => panic!("expected an operator failure, got {other:?}"),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! needs_root {
    () => {
        if !is_root() {
            eprintln!(
                "SKIPPED: this test mounts a tmpfs or a read-only bind mount, which needs root"
            );
            return;
        }
    };
}

/// A mount this test made, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `bytes` at `at`.
    fn tmpfs(at: &Path, bytes: u64) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "tmpfs",
                path(at),
            ],
        );
        Mount(at.to_path_buf())
    }

    /// `at` remounted read-only on itself.
    fn read_only(at: &Path) -> Mount {
        run("mount", &["--bind", path(at), path(at)]);
        let mount = Mount(at.to_path_buf());
        run("mount", &["-o", "remount,bind,ro", path(at), path(at)]);
        mount
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

/// Fills the tmpfs at `at` until `free_pages` pages of 4 KiB are left,
/// with a file removed when the returned path is.
fn fill(at: &Path, free_pages: u64) -> PathBuf {
    let stat = rustix::fs::statvfs(at).unwrap();
    let free = stat.f_bavail * stat.f_frsize;
    let filler = at.join("filler");
    std::fs::write(&filler, vec![7u8; (free - free_pages * 4096) as usize]).unwrap();
    filler
}

/// A sink directory on a 256 KiB tmpfs: the sink starts (raising its
/// fence takes a page), then the disk is filled to one free page.
struct FullDisk {
    // Unmounted before the directory under it is removed.
    _mount: Mount,
    _tmp: tempfile::TempDir,
    out: PathBuf,
    chk: PathBuf,
    filler: PathBuf,
}

fn full_disk() -> FullDisk {
    let tmp = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&tmp.path().join("disk"), 256 << 10);
    let out = tmp.path().join("disk").join("out");
    std::fs::create_dir_all(out.join(".pending")).unwrap();
    std::fs::write(out.join("_FENCE"), "0").unwrap();
    let filler = fill(&tmp.path().join("disk"), 1);
    FullDisk {
        chk: tmp.path().join("chk"),
        _tmp: tmp,
        _mount: mount,
        out,
        filler,
    }
}

#[test]
fn a_pre_commit_on_a_full_disk_fails_the_checkpoint_with_the_sinks_name_then_recovers_once() {
    needs_root!();
    let disk = full_disk();
    // 1,500 short lines stay in the sink's 8 KiB buffer until the barrier,
    // whose flush meets the full disk.
    let records = 1_500;
    let err = braid_actors::stream::local::run(
        &job(records, &disk.out),
        config(&disk.chk, RestartStrategy::NoRestart),
    )
    .unwrap_err();
    let (operator, phase, epoch, cause) = operator_failure(&err);
    assert!(operator.contains("out"), "{err}");
    assert_eq!((phase, epoch), (Phase::Snapshot, 1), "{err}");
    assert!(cause.contains("No space left"), "{err}");
    assert!(
        CheckpointStorage::local(&disk.chk, "faults", 3)
            .unwrap()
            .committed_epochs()
            .await_blocking()
            .unwrap()
            .is_empty(),
        "no checkpoint completes over a failed pre-commit"
    );
    assert!(committed_lines(&disk.out).unwrap().is_empty());

    std::fs::remove_file(&disk.filler).unwrap();
    let report = braid_actors::stream::local::run(
        &job(records, &disk.out),
        config(&disk.chk, RestartStrategy::NoRestart),
    )
    .unwrap();
    assert_eq!(report.failures, 0);
    assert_exactly_once(&disk.out, records);
}

#[test]
fn a_write_on_a_full_disk_fails_the_attempt_and_the_restart_after_the_space_is_freed_loses_nothing()
{
    needs_root!();
    let disk = full_disk();
    // 20,000 lines overflow the sink's buffer: a write fails.
    let records = 20_000;
    let filler = disk.filler.clone();
    let freed = Arc::new(AtomicBool::new(false));
    let freed2 = freed.clone();
    let restarting = with_hook(
        config(
            &disk.chk,
            RestartStrategy::fixed(3, Duration::from_millis(10)),
        ),
        move |point| {
            if point == FaultPoint::BeforeAttempt(2) {
                std::fs::remove_file(&filler).unwrap();
                freed2.store(true, Ordering::SeqCst);
            }
            false
        },
    );
    let report = braid_actors::stream::local::run(&job(records, &disk.out), restarting).unwrap();
    assert!(freed.load(Ordering::SeqCst));
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(report.restored_from, vec![0], "nothing had been committed");
    assert_exactly_once(&disk.out, records);

    // The same fault with no restart names the write.
    let disk = full_disk();
    let err = braid_actors::stream::local::run(
        &job(records, &disk.out),
        config(&disk.chk, RestartStrategy::NoRestart),
    )
    .unwrap_err();
    let (_, phase, epoch, cause) = operator_failure(&err);
    assert_eq!((phase, epoch), (Phase::Process, 1), "{err}");
    assert!(cause.contains("No space left"), "{err}");
}

#[test]
fn a_commit_into_a_read_only_directory_fails_the_attempt_and_the_restore_commits_it_again() {
    needs_root!();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let records = 5_000;
    let mount: Arc<std::sync::Mutex<Option<Mount>>> = Arc::default();
    let (m1, dir) = (mount.clone(), out.clone());
    let restarting = with_hook(
        config(
            &tmp.path().join("chk"),
            RestartStrategy::fixed(3, Duration::from_millis(10)),
        ),
        move |point| {
            match point {
                // Every sink acknowledged epoch 1 (its file is synced);
                // the commit marker is next, then the sink's rename.
                FaultPoint::BeforeCommit(1) => {
                    *m1.lock().unwrap() = Some(Mount::read_only(&dir));
                }
                FaultPoint::BeforeAttempt(2) => {
                    m1.lock().unwrap().take();
                }
                _ => {}
            }
            false
        },
    );
    let report = braid_actors::stream::local::run(&job(records, &out), restarting).unwrap();
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(
        report.restored_from,
        vec![1],
        "the completed checkpoint is restored, and its files committed then"
    );
    assert_exactly_once(&out, records);

    // Without restarts the job stops, naming the commit; a later run
    // resumes from the checkpoint and publishes it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let chk = tmp.path().join("chk");
    let mount: Arc<std::sync::Mutex<Option<Mount>>> = Arc::default();
    let (m1, dir) = (mount.clone(), out.clone());
    let stopped = with_hook(config(&chk, RestartStrategy::NoRestart), move |point| {
        if point == FaultPoint::BeforeCommit(1) {
            *m1.lock().unwrap() = Some(Mount::read_only(&dir));
        }
        false
    });
    let err = braid_actors::stream::local::run(&job(records, &out), stopped).unwrap_err();
    let (operator, phase, epoch, cause) = operator_failure(&err);
    assert!(operator.contains("out"), "{err}");
    assert_eq!((phase, epoch), (Phase::Commit, 1), "{err}");
    assert!(cause.contains("Read-only"), "{err}");
    assert!(committed_lines(&out).unwrap().is_empty());
    mount.lock().unwrap().take();
    let report = braid_actors::stream::local::run(
        &job(records, &out),
        config(&chk, RestartStrategy::NoRestart),
    )
    .unwrap();
    assert_eq!(report.resumed_from, Some(1));
    assert_exactly_once(&out, records);
}

#[test]
fn a_sink_directory_that_vanished_with_pre_committed_data_stops_the_job_with_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = out.clone();
    let config = with_hook(
        config(
            &tmp.path().join("chk"),
            RestartStrategy::fixed(2, Duration::from_millis(10)),
        ),
        move |point| {
            if point == FaultPoint::BeforeCommit(1) {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            false
        },
    );
    let started = Instant::now();
    let err = braid_actors::stream::local::run(&job(1_000, &out), config).unwrap_err();
    let JobError::TooManyFailures { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        *failures, 3,
        "the restart strategy's two restarts, then the end"
    );
    let (_, phase, epoch, cause) = operator_failure(&err);
    assert_eq!((phase, epoch), (Phase::Restore, 1), "{err}");
    assert!(cause.contains("missing"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn read_only_checkpoint_storage_fails_the_attempt_and_nothing_is_published_twice() {
    needs_root!();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let chk = tmp.path().join("chk");
    std::fs::create_dir_all(chk.join("faults")).unwrap();
    let records = 5_000;
    let mount: Arc<std::sync::Mutex<Option<Mount>>> = Arc::default();
    let (m1, dir) = (mount.clone(), chk.join("faults"));
    let dealt = AtomicBool::new(false);
    let config = with_hook(
        config(&chk, RestartStrategy::fixed(3, Duration::from_millis(10))),
        move |point| {
            match point {
                // The first attempt's first barrier only: the next
                // attempt takes checkpoint 1 again.
                FaultPoint::BeforeBarrier(1) if !dealt.swap(true, Ordering::SeqCst) => {
                    *m1.lock().unwrap() = Some(Mount::read_only(&dir));
                }
                FaultPoint::BeforeAttempt(2) => {
                    m1.lock().unwrap().take();
                }
                _ => {}
            }
            false
        },
    );
    let report = braid_actors::stream::local::run(&job(records, &out), config).unwrap();
    assert_eq!(report.failures, 1, "{report:?}");
    assert_eq!(report.restored_from, vec![0]);
    assert_exactly_once(&out, records);
}

/// A sink whose pre-commit hangs (a stuck fsync) for `hang`.
struct Hung(Duration);

impl Operator for Hung {
    type In = u64;
    type Out = ();
    fn process(
        &mut self,
        _v: u64,
        _t: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        Ok(())
    }
    fn snapshot(&mut self) -> Result<Snapshot, OperatorError> {
        std::thread::sleep(self.0);
        Ok(Snapshot::empty())
    }
}

#[test]
fn a_checkpoint_that_hangs_past_its_timeout_fails_the_attempt() {
    let tmp = tempfile::tempdir().unwrap();
    let env = StreamEnv::new(1);
    env.source("numbers", |s, p| GeneratorSource::new(100, s, p, |i| i))
        .rebalance()
        .sink("hung", |_| Hung(Duration::from_secs(3)));
    let mut config = config(&tmp.path().join("chk"), RestartStrategy::NoRestart);
    config.checkpoint_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = braid_actors::stream::local::run(&Plan::new(env.into_graph()), config).unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TooManyFailures {
                last: AttemptFailure::CheckpointTimeout {
                    epoch: 1,
                    timeout_ms: 300
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_input_that_cannot_be_read_fails_the_job_naming_the_source_instead_of_ending_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.txt");
    // A directory opens, and fails at the first read (EISDIR).
    let directory = tmp.path().join("a-directory");
    std::fs::create_dir(&directory).unwrap();
    for (input, what) in [(&missing, "open"), (&directory, "read")] {
        let env = StreamEnv::new(1);
        let path = input.clone();
        env.source("lines", move |s, p| FileSource::new(path.clone(), s, p))
            .rebalance()
            .sink("out", |_| Discard::<String>::default());
        let config = config(
            &tmp.path().join(format!("chk-{what}")),
            RestartStrategy::fixed(1, Duration::from_millis(10)),
        );
        let err =
            braid_actors::stream::local::run(&Plan::new(env.into_graph()), config).unwrap_err();
        let JobError::TooManyFailures { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*failures, 2, "the one restart reads the same input again");
        let (operator, phase, epoch, cause) = operator_failure(&err);
        assert_eq!(
            (operator.as_str(), phase, epoch),
            ("lines", Phase::Read, 1),
            "{err}"
        );
        assert!(
            cause.contains(&format!("{what} {}", input.display())),
            "{err}"
        );
    }
}

#[test]
fn an_operator_that_could_not_be_built_fails_its_subtask_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let env = StreamEnv::new(1);
    env.source("numbers", |s, p| GeneratorSource::new(100, s, p, |i| i))
        .rebalance()
        .sink("unbuilt", |_| -> Result<Discard<u64>, OperatorError> {
            Err(OperatorError::Failed("no memory for its table".into()))
        });
    let config = config(&tmp.path().join("chk"), RestartStrategy::NoRestart);
    let err = braid_actors::stream::local::run(&Plan::new(env.into_graph()), config).unwrap_err();
    let (operator, phase, _, cause) = operator_failure(&err);
    assert_eq!(
        (operator.as_str(), phase),
        ("unbuilt", Phase::Process),
        "{err}"
    );
    assert!(
        cause.contains("could not be built: no memory for its table"),
        "{err}"
    );
}

/// A sink that takes every record and keeps nothing.
struct Discard<T>(std::marker::PhantomData<fn(T)>);

impl<T> Default for Discard<T> {
    fn default() -> Self {
        Discard(std::marker::PhantomData)
    }
}

impl<T: Send + 'static> Operator for Discard<T> {
    type In = T;
    type Out = ();

    fn process(
        &mut self,
        _value: T,
        _time: Option<EventTime>,
        _out: &mut dyn Collector<()>,
    ) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// Runs `records` records at a throttled rate with checkpoints every 30 ms
/// and crashes (no restart) before barrier `crash_at`: checkpoints
/// `1..crash_at` are committed and published.
fn run_until_crash(records: u64, out: &Path, chk: &Path, crash_at: u64) {
    let mut config = with_hook(config(chk, RestartStrategy::NoRestart), move |point| {
        point == FaultPoint::BeforeBarrier(crash_at)
    });
    config.checkpoint_interval = Duration::from_millis(30);
    config.pace.rate = Some(50_000.0);
    let err = braid_actors::stream::local::run(&job(records, out), config).unwrap_err();
    assert!(
        matches!(
            err,
            JobError::TooManyFailures {
                last: AttemptFailure::Injected(_),
                ..
            }
        ),
        "{err}"
    );
}

/// Flips 8 bytes in the middle of `file`.
fn flip(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    let end = (at + 8).min(bytes.len());
    for b in &mut bytes[at..end] {
        *b ^= 0xff;
    }
    std::fs::write(file, bytes).unwrap();
}

fn checkpoint_dir(chk: &Path, epoch: u64) -> PathBuf {
    chk.join("faults").join(format!("chk-{epoch:020}"))
}

fn resume_past_a_corrupt_newest_checkpoint(corrupt: impl Fn(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let (out, chk) = (tmp.path().join("out"), tmp.path().join("chk"));
    let records = 20_000;
    run_until_crash(records, &out, &chk, 5);
    let newest = checkpoint_dir(&chk, 4);
    assert!(newest.join("_COMMITTED").exists());
    corrupt(&newest);

    let mut config = config(&chk, RestartStrategy::NoRestart);
    config.checkpoint_interval = Duration::from_millis(30);
    let report = braid_actors::stream::local::run(&job(records, &out), config).unwrap();
    assert_eq!(report.resumed_from, Some(3), "{report:?}");
    assert_eq!(
        report.republished_epochs,
        vec![4],
        "the fallback past a published epoch is reported"
    );
    assert!(
        report.generation > 1,
        "generations continue above the crashed run's"
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(chk.join("faults").join("corrupt"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].join("REASON").exists());
    assert!(aside[0].join("_COMMITTED").exists(), "kept for inspection");
    // The file sink names its output by epoch: the replayed epoch 4
    // replaces the one published before, so nothing is duplicated.
    assert_exactly_once(&out, records);
}

#[test]
fn a_corrupt_newest_state_blob_is_moved_aside_and_the_job_resumes_from_the_one_before() {
    resume_past_a_corrupt_newest_checkpoint(|dir| {
        let blob = std::fs::read_dir(dir.join("state"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .next()
            .unwrap();
        flip(&blob);
    });
}

#[test]
fn a_corrupt_newest_manifest_is_moved_aside_and_the_job_resumes_from_the_one_before() {
    resume_past_a_corrupt_newest_checkpoint(|dir| flip(&dir.join("manifest.json")));
}

/// Blocks on a storage future from a test.
trait AwaitBlocking: std::future::Future + Sized {
    fn await_blocking(self) -> Self::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(self)
    }
}

impl<F: std::future::Future> AwaitBlocking for F {}
