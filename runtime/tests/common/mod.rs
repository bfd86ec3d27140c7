//! What the multi-process tests that drive the `braid` binary share: a
//! private `BRAID_TMPDIR` with the commands run under it, child drivers
//! re-executed from the test binary, and waiting on the filesystem or on
//! processes with a deadline.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The `braid` binary.
pub const BRAID: &str = env!("CARGO_BIN_EXE_braid");

/// Environment variable telling a re-executed test binary which child
/// role to play (see each test file's `child_entry`).
pub const CHILD_VAR: &str = "BRAID_TEST_CHILD";

/// A private `BRAID_TMPDIR`, the `braid` commands run with it and the
/// child drivers started under it. Dropping it kills the children it
/// started (by pid), runs `braid stop` and reaps what it stopped.
pub struct Braid {
    /// The private `BRAID_TMPDIR`.
    pub dir: tempfile::TempDir,
    /// Extra environment for every command and child.
    pub env: Vec<(String, String)>,
    seen: RefCell<BTreeSet<u32>>,
    children: RefCell<Vec<Child>>,
}

impl Braid {
    /// A fresh private `BRAID_TMPDIR`.
    pub fn new() -> Braid {
        Braid::with_env(&[])
    }

    /// A fresh private `BRAID_TMPDIR`; `env` is set for every command and
    /// child (and so for the daemons they start).
    pub fn with_env(env: &[(&str, &str)]) -> Braid {
        // Daemons detach from `braid start`, which exits; as a subreaper
        // this test process inherits them and can reap them once stopped.
        static SUBREAPER: Once = Once::new();
        SUBREAPER.call_once(|| {
            let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
        });
        Braid {
            dir: tempfile::tempdir().unwrap(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            seen: RefCell::default(),
            children: RefCell::default(),
        }
    }

    fn command(&self, exe: &Path) -> Command {
        let mut c = Command::new(exe);
        c.env("BRAID_TMPDIR", self.dir.path())
            .env_remove("BRAID_ADDRESS")
            .env_remove("BRAID_TOKEN")
            .env_remove("BRAID_ROLE")
            .env_remove(CHILD_VAR);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `braid args...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command(Path::new(BRAID)).args(args).output().unwrap();
        self.daemons();
        out
    }

    /// Runs `braid args...` and checks it succeeded; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "braid {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `braid status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let text = self.ok(&["status", "--json"]);
        serde_json::from_str(text.trim_end()).unwrap()
    }

    /// Starts a head and its node (1 CPU, a 64 MiB store); returns the
    /// head's address.
    pub fn start_head(&self) -> String {
        self.ok(&[
            "start",
            "--head",
            "--port",
            "0",
            "--num-cpus",
            "1",
            "--object-store-memory",
            "64MiB",
        ]);
        self.status()["address"].as_str().unwrap().to_owned()
    }

    /// This user's braid directory under the private `BRAID_TMPDIR`.
    pub fn user_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("braid-{}", rustix::process::getuid().as_raw()))
    }

    /// The session directories in the user directory.
    pub fn sessions(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.user_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("session-"))
            .map(|e| e.path())
            .collect();
        found.sort();
        found
    }

    /// Starts this test binary as child driver `role` (its `child_entry`
    /// test), joining the cluster at `address` or, without one, starting
    /// an embedded cluster. Its stdin and stdout are piped.
    pub fn child(&self, role: &str, address: Option<&str>) -> ChildDriver {
        let exe = std::env::current_exe().unwrap();
        let mut c = self.command(&exe);
        c.args([
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_VAR, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some(address) = address {
            c.env("BRAID_ADDRESS", address);
        }
        let mut child = c.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        self.children.borrow_mut().push(child);
        ChildDriver { pid, stdout }
    }

    /// Kills child driver `pid` (SIGKILL) and reaps it.
    pub fn kill_child(&self, pid: u32) {
        let mut children = self.children.borrow_mut();
        if let Some(child) = children.iter_mut().find(|c| c.id() == pid) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Tells child driver `pid` to go on (a line on its stdin) and waits
    /// for it to exit; returns its exit status.
    pub fn release_child(&self, pid: u32, line: &str) -> std::process::ExitStatus {
        use std::io::Write;
        let mut children = self.children.borrow_mut();
        let child = children.iter_mut().find(|c| c.id() == pid).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{line}").unwrap();
        drop(stdin);
        child.wait().unwrap()
    }

    /// Live braid daemons and workers started under this `BRAID_TMPDIR`.
    pub fn daemons(&self) -> Vec<(u32, String)> {
        let found = daemons_under(self.dir.path());
        self.seen
            .borrow_mut()
            .extend(found.iter().map(|(pid, _)| *pid));
        found
    }

    /// Remembers `pid` to reap once it has exited.
    pub fn reap_later(&self, pid: u32) {
        self.seen.borrow_mut().insert(pid);
    }

    /// Waits until no braid process runs under this `BRAID_TMPDIR`.
    pub fn wait_no_daemons(&self, limit: Duration) {
        let running = wait_until(limit, || self.daemons().is_empty());
        assert!(running, "still running: {:?}", self.daemons());
    }
}

impl Drop for Braid {
    fn drop(&mut self) {
        for mut child in self.children.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.run(&["stop"]);
        for pid in self.seen.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                // Reaps it if it is our (inherited) child and has exited.
                let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
            }
        }
    }
}

/// A child driver's pid and output.
pub struct ChildDriver {
    /// Its pid.
    pub pid: u32,
    stdout: BufReader<ChildStdout>,
}

impl ChildDriver {
    /// What follows `prefix` on the first line of its output holding it
    /// (the test harness may have printed `test child_entry ... ` before
    /// it on the same line).
    pub fn line(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the child ended before printing {prefix:?}");
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim_end().to_owned();
            }
        }
    }
}

/// Polls `done` every 10 ms until it holds or `limit` passes; whether it
/// held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process's name.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A process's parent.
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in parentheses may hold spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 1..].to_owned();
            rest.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// Live (not zombie) processes of this user named `braid-head`,
/// `braid-node` or `braid-worker` whose environment has
/// `BRAID_TMPDIR=tmpdir`, as (pid, name).
pub fn daemons_under(tmpdir: &Path) -> Vec<(u32, String)> {
    let uid = rustix::process::getuid().as_raw();
    let mut want = b"BRAID_TMPDIR=".to_vec();
    want.extend_from_slice(tmpdir.as_os_str().as_encoded_bytes());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let comm = comm.trim_end().to_owned();
        if !matches!(comm.as_str(), "braid-head" | "braid-node" | "braid-worker") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let zombie = field("State:").starts_with(['Z', 'X']);
        let ours = field("Uid:")
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<u32>().ok())
            == Some(uid);
        if zombie || !ours {
            continue;
        }
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|var| var == want.as_slice()) {
            found.push((pid, comm));
        }
    }
    found
}

/// Every path under `dir` (depth first), with its `symlink_metadata`.
pub fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let is_dir = meta.is_dir();
        out.push((path.clone(), meta));
        if is_dir {
            out.extend(walk(&path));
        }
    }
    out
}
