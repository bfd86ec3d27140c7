//! Shared fixtures for the store's multi-process tests: a store server in its
//! own process, child processes re-executed from the test binary with a role,
//! and leak checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable carrying a child process's role.
pub const ROLE_VAR: &str = "BRAID_STORE_TEST_ROLE";

/// A `braid-store serve` process with its own temporary directory. Dropping
/// it kills the process (by pid) and removes the directory.
pub struct StoreProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub spill_dir: Option<PathBuf>,
    _stdout: BufReader<ChildStdout>,
}

impl StoreProcess {
    /// Starts a store of `capacity` bytes and waits for its ready line.
    pub fn start(capacity: u64, spill: bool) -> StoreProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("store.sock");
        let spill_dir = spill.then(|| dir.path().join("spill"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_braid-store"));
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--capacity")
            .arg(capacity.to_string())
            .stdout(Stdio::piped())
            .env("RUST_LOG", "warn");
        if let Some(spill_dir) = &spill_dir {
            cmd.arg("--spill-dir").arg(spill_dir);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready "), "store did not start: {line:?}");
        StoreProcess {
            child,
            dir,
            socket,
            spill_dir,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the store and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Re-executes this test binary, running only the test `entry` with
/// [`ROLE_VAR`] set to `role`, plus extra environment.
pub fn spawn_role(entry: &str, role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE_VAR, role)
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Kills a child by pid when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's stdout until a line starting with `prefix`, returning
/// the rest of that line.
pub fn read_tagged(stdout: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited before printing {prefix:?}");
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
}

/// Polls `cond` until it holds, failing the test after `timeout`. Used only
/// where the event happens in another process and has no notification (the
/// store noticing a dead client).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Files in /dev/shm whose name mentions braid.
pub fn braid_shm_files() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.to_lowercase().contains("braid"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deterministic content for object `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
