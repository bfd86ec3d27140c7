//! The `online_learning` example as a user runs it: the fused mode with
//! its summary, plot and predictions; the separate mode; recovery from a
//! crashed shard, and from a SIGKILLed job process, with a bitwise-identical
//! BSP result; the actor runner (every subtask a process) predicting what
//! the local runner does, through SIGKILLs of a worker, a shard and
//! serving; bad flags refused.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    profile_dir.join("examples").join("online_learning")
}

/// Runs the example, killing it (by pid) if it outlives `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(example())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", example().display()));
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let out = child.wait_with_output().ok();
                panic!(
                    "online_learning {args:?} ran over {limit:?}; stderr: {}",
                    out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                        .unwrap_or_default()
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for the example: {e}"),
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collecting the example's output: {e}"))
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line {last:?} is not JSON: {e}"))
}

const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn fused_mode_trains_serves_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out_dir = dir.path().join("out");
    let predictions = dir.path().join("predictions.txt");
    let j = json_of(&run(
        &[
            "--rows",
            "20000",
            "--json",
            "--out-dir",
            out_dir.to_str().unwrap_or_default(),
            "--predictions",
            predictions.to_str().unwrap_or_default(),
        ],
        LIMIT,
    ));
    assert_eq!(j["rows"], 20000);
    for field in [
        "seconds",
        "events_per_s",
        "logloss",
        "auc",
        "latency_ms_p50",
        "latency_ms_p99",
        "model_lag_ms_p99",
        "cpu_seconds_per_million",
    ] {
        assert!(j[field].is_number(), "{field} missing in {j}");
    }
    assert!(j["auc"].as_f64().unwrap_or(0.0) > 0.55, "{j}");
    // The driver's queries through the job's actor: the last one, after the
    // input ended, is answered by the version holding every row.
    assert!(j["remote_predictions"].as_u64().unwrap_or(0) >= 1, "{j}");
    assert_eq!(j["remote_version_records"], 20000, "{j}");
    let lines = std::fs::read_to_string(&predictions).unwrap_or_default();
    assert_eq!(lines.lines().count(), 20000);
    assert!(lines
        .lines()
        .all(|l| l.parse::<f32>().is_ok_and(|p| (0.0..=1.0).contains(&p))));
    assert!(out_dir.join("summary.json").exists());
    let svg = std::fs::read_to_string(out_dir.join("online_learning.svg")).unwrap_or_default();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"), "no plot");
}

#[test]
fn separate_mode_runs_as_three_processes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let j = json_of(&run(
        &[
            "--mode",
            "separate",
            "--rows",
            "20000",
            "--json",
            "--out-dir",
            dir.path().to_str().unwrap_or_default(),
        ],
        LIMIT,
    ));
    assert_eq!(j["rows"], 20000);
    assert!(j["auc"].as_f64().unwrap_or(0.0) > 0.55, "{j}");
}

/// A 40,000-row BSP run with two workers and two shards, throttled and
/// checkpointed often enough that a failure falls between checkpoints.
fn bsp_recovery_args(out_dir: &str) -> Vec<&str> {
    vec![
        "--rows",
        "40000",
        "--sync",
        "bsp",
        "--workers",
        "2",
        "--shards",
        "2",
        "--rate",
        "40000",
        "--checkpoint-ms",
        "50",
        "--json",
        "--out-dir",
        out_dir,
    ]
}

#[test]
fn a_crashed_shard_recovers_to_the_same_bsp_model() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let common = bsp_recovery_args(dir.path().to_str().unwrap_or_default());
    let clean = json_of(&run(&common, LIMIT));
    let mut crashed_args = common.clone();
    crashed_args.extend(["--crash", "shard:1:40"]);
    let crashed = json_of(&run(&crashed_args, LIMIT));
    assert_eq!(crashed["failures"], 1, "{crashed}");
    assert_eq!(crashed["rows"], 40000);
    assert_eq!(clean["failures"], 0);
    assert_eq!(
        crashed["logloss"], clean["logloss"],
        "BSP replay after the crash differs"
    );
    assert_eq!(crashed["auc"], clean["auc"]);
}

#[test]
fn a_killed_job_process_is_restarted_from_its_checkpoint_to_the_same_bsp_run() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (clean_predictions, killed_predictions, out_dir) =
        (path("clean.txt"), path("killed.txt"), path("out"));
    let common = bsp_recovery_args(&out_dir);
    let mut clean_args = common.clone();
    clean_args.extend(["--predictions", &clean_predictions]);
    let clean = json_of(&run(&clean_args, LIMIT));
    let mut killed_args = common;
    killed_args.extend([
        "--predictions",
        &killed_predictions,
        "--kill-job-at-rows",
        "20000",
    ]);
    let killed = json_of(&run(&killed_args, LIMIT));
    assert_eq!(killed["failures"], 1, "{killed}");
    assert!(
        killed["resumed_from_epoch"].as_u64().is_some_and(|e| e > 0),
        "the new process started over instead of from a checkpoint: {killed}"
    );
    assert_eq!(killed["rows"], 40000);
    assert_eq!(killed["logloss"], clean["logloss"], "BSP replay differs");
    assert_eq!(killed["auc"], clean["auc"]);
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (clean_bytes, killed_bytes) = (read(&clean_predictions), read(&killed_predictions));
    assert_eq!(clean_bytes.iter().filter(|&&b| b == b'\n').count(), 40000);
    assert!(
        clean_bytes == killed_bytes,
        "the predictions file after the restart differs from the clean run's"
    );
}

/// A 60,000-row BSP run of two workers and two shards on the actor
/// runner, throttled so that the driver sees it midway, checkpointed
/// every 50 ms, writing its predictions to `predictions`.
fn actor_runner_args<'a>(out_dir: &'a str, predictions: &'a str) -> Vec<&'a str> {
    vec![
        "--runner",
        "cluster",
        "--rows",
        "60000",
        "--sync",
        "bsp",
        "--workers",
        "2",
        "--shards",
        "2",
        "--rate",
        "30000",
        "--checkpoint-ms",
        "50",
        "--predictions",
        predictions,
        "--json",
        "--out-dir",
        out_dir,
    ]
}

#[test]
fn the_actor_runner_predicts_what_the_local_runner_does_through_sigkills() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let out_dir = path("out");
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));

    let local_predictions = path("local.txt");
    let mut local_args = actor_runner_args(&out_dir, &local_predictions);
    local_args[1] = "local";
    let local = json_of(&run(&local_args, LIMIT));
    let expected = read(&local_predictions);
    assert_eq!(expected.iter().filter(|&&b| b == b'\n').count(), 60000);

    let clean_predictions = path("actors.txt");
    let clean = json_of(&run(
        &actor_runner_args(&out_dir, &clean_predictions),
        LIMIT,
    ));
    assert_eq!(clean["runner"], "cluster", "{clean}");
    assert_eq!(clean["rows"], 60000);
    assert_eq!(clean["failures"], 0, "{clean}");
    assert_eq!(clean["logloss"], local["logloss"], "{clean}\n{local}");
    assert!(
        read(&clean_predictions) == expected,
        "the actor runner's predictions differ from the local runner's"
    );
    // The driver, another process, queried serving all along: versions
    // never went back, and the last answer came from the final model.
    assert!(
        clean["remote_predictions"].as_u64().unwrap_or(0) > 0,
        "{clean}"
    );
    assert_eq!(clean["remote_versions_went_back"], 0, "{clean}");
    assert!(clean["ps_keys"].as_u64().unwrap_or(0) > 0, "{clean}");
    let edges = clean["edges"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        edges.len(),
        4,
        "source→worker, worker→shard, shard→serving, worker→eval: {clean}"
    );
    for edge in &edges {
        assert!(edge["batches"].as_u64().unwrap_or(0) > 0, "{edge}");
        assert_eq!(edge["codec_bytes"], 0, "{edge}");
        assert_eq!(edge["copied_bytes"], 0, "{edge}");
    }

    for victim in ["worker", "shard", "serving"] {
        let predictions = path(&format!("killed-{victim}.txt"));
        let mut args = actor_runner_args(&out_dir, &predictions);
        args.extend(["--kill-job-at-rows", "15000", "--kill-subtask", victim]);
        let killed = json_of(&run(&args, LIMIT));
        assert_eq!(killed["failures"], 1, "{victim}: {killed}");
        assert_eq!(killed["rows"], 60000, "{victim}: {killed}");
        assert!(
            read(&predictions) == expected,
            "after {victim} 0's process was killed, the predictions differ"
        );
    }
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    for (args, needle) in [
        (&["--sync", "sometimes"][..], "sync"),
        (&["--mode", "both"][..], "mode"),
        (&["--rate=-5"][..], "rate"),
        (
            &["--input", "/nonexistent/braid/ctr.txt", "--rows", "10"][..],
            "nonexistent",
        ),
    ] {
        let out = run(args, LIMIT);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn criteo_input_skips_and_reports_malformed_lines() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("criteo.tsv");
    let mut text = String::new();
    for i in 0..3000u32 {
        let ints: Vec<String> = (0..13).map(|f| ((i * 7 + f) % 50).to_string()).collect();
        let cats: Vec<String> = (0..26)
            .map(|f| format!("{:08x}", (i % 97) * 31 + f))
            .collect();
        let label = u32::from(i % 5 == 0);
        text.push_str(&format!(
            "{label}\t{}\t{}\n",
            ints.join("\t"),
            cats.join("\t")
        ));
        if i % 1000 == 0 {
            text.push_str("not a criteo line\n");
            text.push_str("2\t1\t2\n");
        }
    }
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    for mode in ["fused", "separate"] {
        let j = json_of(&run(
            &[
                "--criteo",
                path.to_str().unwrap_or_default(),
                "--mode",
                mode,
                "--json",
                "--out-dir",
                dir.path().to_str().unwrap_or_default(),
            ],
            LIMIT,
        ));
        assert_eq!(j["rows"], 3000, "{mode}: {j}");
        assert_eq!(j["skipped_lines"], 6, "{mode}: {j}");
    }
}

/// This process's child named `comm` whose parent is `parent`.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
        let ppid: u32 = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (name == comm && ppid == parent).then_some(pid)
    })
}

#[test]
fn the_node_dying_ends_the_run_with_an_error_not_a_hang() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(example())
        .args(["--rows", "100000000", "--rate", "50000"])
        .env("BRAID_TMPDIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", example().display()));
    let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // The job runs once its progress line shows.
    let deadline = Instant::now() + LIMIT;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("no progress line: {e}"));
        if line.starts_with("fused") {
            break;
        }
    }
    let node = child_named(child.id(), "braid-node").unwrap_or_else(|| panic!("no node"));
    let _ = Command::new("kill")
        .args(["-9", &node.to_string()])
        .status();
    let killed = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the example outlived its node by a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    let said: Vec<String> = lines.try_iter().collect();
    assert!(!status.success(), "a run whose node died cannot succeed");
    assert!(
        said.iter().any(|l| l.starts_with("Error")),
        "it says why: {said:?}"
    );
}
