//! Every example answers `--help` and `-h` with its usage, at once, and
//! runs nothing: exit 0, a `Usage:` line on stdout, well within a few
//! seconds, and no braid cluster started (its private `BRAID_TMPDIR` stays
//! empty).
//!
//! The examples are the binaries `cargo test` builds beside this test
//! (`target/<profile>/examples/`); when only this test was built, build
//! them first with `cargo build -p braid-examples --examples`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long printing a usage text may take, even in a debug build on a
/// loaded machine; running any example takes far longer.
const LIMIT: Duration = Duration::from_secs(10);

/// Where cargo puts this profile's example binaries.
fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples"))
        .unwrap_or_default()
}

/// Every example of this package: `examples/NAME.rs` and
/// `examples/NAME/main.rs`.
fn example_names() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            if path.is_dir() && path.join("main.rs").is_file() {
                path.file_name().map(|n| n.to_string_lossy().into_owned())
            } else if path.extension().is_some_and(|x| x == "rs") {
                path.file_stem().map(|n| n.to_string_lossy().into_owned())
            } else {
                None
            }
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_example_answers_help_without_running() {
    let names = example_names();
    assert!(names.len() >= 9, "{names:?}");
    for name in &names {
        let exe = examples_dir().join(name);
        assert!(
            exe.is_file(),
            "{} is not built: run `cargo build -p braid-examples --examples` first",
            exe.display()
        );
        for flag in ["--help", "-h"] {
            let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let started = Instant::now();
            let mut child = Command::new(&exe)
                .arg(flag)
                .env("BRAID_TMPDIR", tmp.path())
                .env_remove("BRAID_ADDRESS")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            while child.try_wait().ok().flatten().is_none() {
                if started.elapsed() > LIMIT {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{name} {flag} still runs after {LIMIT:?}: it ignored {flag}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let out = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name} {flag}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.lines().any(|l| l.starts_with("Usage:")),
                "{name} {flag} printed no usage line:\n{stdout}"
            );
            let left: Vec<_> = std::fs::read_dir(tmp.path())
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{name} {flag} started something: {left:?}");
        }
    }
}
