//! `braid-store` and the store's examples answer `--help` and `-h` with
//! their usage, at once, without starting a store or a benchmark.
//!
//! `store_bench` is found where `cargo test` builds this package's
//! examples (`target/<profile>/examples/`); when only this test was built,
//! build it first with `cargo build -p braid-store --examples`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long printing a usage text may take, even in a debug build on a
/// loaded machine; the benchmark takes minutes.
const LIMIT: Duration = Duration::from_secs(10);

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .unwrap_or_default()
}

/// Runs `exe flag`, killing it if it outlives [`LIMIT`]; checks it exits 0
/// with a `Usage:` line on stdout.
fn answers_help(exe: &Path, flag: &str) {
    assert!(
        exe.is_file(),
        "{} is not built: run `cargo build -p braid-store --examples` first",
        exe.display()
    );
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg(flag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    while child.try_wait().ok().flatten().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {flag} still runs after {LIMIT:?}", exe.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} {flag}: {}\n{stdout}",
        exe.display(),
        out.status
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("Usage:")),
        "{} {flag} printed no usage line:\n{stdout}",
        exe.display()
    );
}

#[test]
fn the_store_binary_and_examples_answer_help_without_running() {
    let store = PathBuf::from(env!("CARGO_BIN_EXE_braid-store"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            (path.extension().is_some_and(|x| x == "rs"))
                .then(|| path.file_stem().map(|n| example(&n.to_string_lossy())))
                .flatten()
        })
        .collect();
    assert!(!examples.is_empty());
    examples.push(store);
    for exe in &examples {
        for flag in ["--help", "-h"] {
            answers_help(exe, flag);
        }
    }
}
