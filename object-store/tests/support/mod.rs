//! Shared fixtures for the store's multi-process tests: a store server in its
//! own process, child processes re-executed from the test binary with a role,
//! and leak checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use braid_store::protocol::{self, FrameError, Hello, ReplyFrame, Request, RequestFrame};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable carrying a child process's role.
pub const ROLE_VAR: &str = "BRAID_STORE_TEST_ROLE";

/// How to start a [`StoreProcess`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Arena size in bytes.
    pub capacity: u64,
    /// Whether to give the store a spill directory (`<dir>/spill`).
    pub spill: bool,
    /// Socket path; by default `<dir>/store.sock` in the store's own
    /// temporary directory.
    pub socket: Option<PathBuf>,
    /// The store's `RUST_LOG` (its log goes to the test's stderr).
    pub log: &'static str,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            capacity: 16 << 20,
            spill: false,
            socket: None,
            log: "warn",
        }
    }
}

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
        Self::start_with(StoreOptions {
            capacity,
            spill,
            ..StoreOptions::default()
        })
    }

    /// Starts a store as `options` say and waits for its ready line.
    pub fn start_with(options: StoreOptions) -> StoreProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = options
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("store.sock"));
        let spill_dir = options.spill.then(|| dir.path().join("spill"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_braid-store"));
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--capacity")
            .arg(options.capacity.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .env("RUST_LOG", options.log);
        if let Some(spill_dir) = &spill_dir {
            cmd.arg("--spill-dir").arg(spill_dir);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if !line.starts_with("ready ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("store did not start: {line:?}");
        }
        StoreProcess {
            child,
            dir,
            socket,
            spill_dir,
            _stdout: stdout,
        }
    }

    /// The store's pid.
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

/// A command that re-executes this test binary, running only the test
/// `entry` with [`ROLE_VAR`] set to `role`, plus extra environment. Its
/// stdout is piped and its stdin is null.
pub fn role_command(entry: &str, role: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE_VAR, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Re-executes this test binary, running only the test `entry` with
/// [`ROLE_VAR`] set to `role`, plus extra environment.
pub fn spawn_role(entry: &str, role: &str, env: &[(&str, String)]) -> Child {
    role_command(entry, role, env).spawn().unwrap()
}

/// The role this process was started with by [`spawn_role`], if any.
pub fn current_role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// Blocks until stdin reaches end of file: a child role that must stay alive
/// (holding pins, say) until its parent kills it or goes away.
pub fn block_on_stdin() {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
}

/// Kills a child by pid when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the child to exit and returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let _ = self.0.kill();
        self.0.wait().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child re-executed with a role (see [`spawn_role`]), with its stdout
/// kept open until it exits (closing it early would make the child's test
/// harness fail on a broken pipe). Dropping it kills the child by pid.
pub struct RoleChild {
    out: BufReader<ChildStdout>,
    guard: ChildGuard,
}

impl RoleChild {
    /// Spawns this test binary running only `entry` as `role`.
    pub fn spawn(entry: &str, role: &str, env: &[(&str, String)]) -> RoleChild {
        Self::from_command(role_command(entry, role, env))
    }

    /// Spawns a prepared [`role_command`], perhaps with stdin or stderr
    /// changed.
    pub fn from_command(mut cmd: Command) -> RoleChild {
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        RoleChild {
            out,
            guard: ChildGuard(child),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Reads stdout up to a line starting with `prefix`; returns the rest.
    pub fn read_tagged(&mut self, prefix: &str) -> String {
        read_tagged(&mut self.out, prefix)
    }

    /// The child's stdin, if it was piped.
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.guard.0.stdin.as_mut()
    }

    /// Reads stdout to its end, then reaps the child.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        self.guard.wait()
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        self.guard.kill()
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
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
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

/// Deterministic content for object `seed` (xorshift64, eight bytes a step:
/// fast enough for megabytes in a debug build).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// A connection to the store that speaks the wire protocol by hand, for
/// sending what [`braid_store::StoreClient`] never would.
pub struct RawConn {
    pub stream: UnixStream,
    pub hello: Hello,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects and reads the hello frame. A plain read discards the arena
    /// memfd the store attaches to it.
    pub fn connect(socket: &Path) -> RawConn {
        let mut stream = UnixStream::connect(socket).unwrap();
        // A safety net so that a store bug fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = Vec::new();
        let hello: Hello = protocol::read_frame(&mut stream, &mut buf).unwrap();
        RawConn { stream, hello, buf }
    }

    /// Sends one well-formed request frame.
    pub fn send(&mut self, seq: u64, body: Request) {
        let frame = protocol::encode_frame(&RequestFrame { seq, body }).unwrap();
        self.stream.write_all(&frame).unwrap();
    }

    /// Sends arbitrary bytes in one write.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one reply frame.
    pub fn recv(&mut self) -> ReplyFrame {
        self.try_recv().unwrap()
    }

    /// Reads one reply frame, or why there is none.
    pub fn try_recv(&mut self) -> Result<ReplyFrame, FrameError> {
        protocol::read_frame(&mut self.stream, &mut self.buf)
    }

    /// Sends a request and reads the reply, which must carry the same seq.
    pub fn call(&mut self, seq: u64, body: Request) -> ReplyFrame {
        self.send(seq, body);
        let reply = self.recv();
        assert_eq!(reply.seq, seq, "reply to another request: {reply:?}");
        reply
    }

    /// Closes the writing half, so the store reads end of file.
    pub fn shutdown_write(&mut self) {
        self.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Asserts the store closed the connection: the next read is end of file.
    pub fn assert_closed(&mut self) {
        let mut byte = [0u8; 1];
        let n = self.stream.read(&mut byte).unwrap();
        assert_eq!(n, 0, "expected end of file, read {:?}", &byte[..n]);
    }
}

/// Asserts `ptr..ptr + len` lies inside `range` (a client's arena mapping).
pub fn assert_in_range(ptr: *const u8, len: usize, range: &std::ops::Range<usize>) {
    let start = ptr as usize;
    assert!(
        range.start <= start && start + len <= range.end,
        "{start:#x}..+{len} is outside the arena mapping {:#x}..{:#x}",
        range.start,
        range.end
    );
}
