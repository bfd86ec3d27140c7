//! Test hosts on one machine: each a network namespace joined to a bridge
//! of its own by a veth pair, with its own address on a private subnet, a
//! mount namespace of its own with private `/tmp` and `/dev/shm`, and a
//! host name of its own (`braid-host-<i>`). No host
//! sees another's sockets, shared memory or files; they share only the
//! network the harness made, as machines on a LAN do.
//!
//! Making hosts needs root, `ip` (iproute2), `unshare` and `nsenter`
//! (util-linux). Where they cannot be made, [`Hosts::for_test`] prints
//! `SKIPPED: <reason>` and returns `None`, or, with `BRAID_REQUIRE_HOSTS=1`,
//! panics with the reason. Dropping [`Hosts`] kills every process in its
//! namespaces (only processes started there by the test) and removes every
//! namespace and link it made, also when the test panics. Names and
//! subnets are unique per [`Hosts`], so tests may run in parallel.
//!
//! ```no_run
//! use braid_tests::hosts::Hosts;
//!
//! let Some(hosts) = Hosts::for_test("example", 2) else { return };
//! let out = hosts.host(1).command("ip").args(["-4", "addr"]).output().unwrap();
//! assert!(String::from_utf8_lossy(&out.stdout).contains(&hosts.host(1).addr().to_string()));
//! ```

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that turns a skip into a failure.
pub const REQUIRE_VAR: &str = "BRAID_REQUIRE_HOSTS";

/// The environment variable naming the role a test binary plays when a
/// test re-runs it on a host ([`Host::child`], [`child_role`]).
pub const CHILD_VAR: &str = "BRAID_HOSTS_CHILD";

/// The role this process plays if a test started it with [`Host::child`]:
/// what a test file's `child_entry` test acts on (it returns at once
/// when there is none).
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_VAR).ok()
}

/// Why hosts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// Namespaces and links need root.
    #[error("making network namespaces needs root (running as uid {0})")]
    NotRoot(u32),
    /// A tool is missing.
    #[error("`{0}` is not installed")]
    MissingTool(&'static str),
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A host's namespace keeper did not start.
    #[error("host {0} did not start: {1}")]
    NoKeeper(usize, String),
    /// Processes sent `STOP` were still running at the deadline.
    #[error("processes {0:?} did not stop within 10 s")]
    NotStopped(Vec<u32>),
}

/// One test host.
#[derive(Debug)]
pub struct Host {
    netns: String,
    veth: String,
    addr: Ipv4Addr,
    /// Holds the host's mount namespace (private `/tmp`, `/dev/shm`).
    keeper: Option<Child>,
}

impl Host {
    /// The host's address on the harness's subnet.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The name of the host's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A command that runs this test binary's `child_entry` test on this
    /// host, as `role` ([`child_role`]); an error if this process's
    /// executable cannot be found.
    pub fn child(&self, role: &str) -> std::io::Result<Command> {
        let mut cmd = self.command(std::env::current_exe()?);
        cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_VAR, role);
        Ok(cmd)
    }

    /// Sends `signal` to every process running on this host (all started
    /// there by the test) except the keeper of its namespaces; returns how
    /// many it signalled. `KILL` is a host that dies with its processes,
    /// `STOP` one that goes silent (`CONT` wakes it).
    ///
    /// Processes started while it signals (a node spawning a worker) are
    /// signalled too: it lists the host's processes again until a pass
    /// finds none new. For `STOP` it returns once every thread of every
    /// process has stopped, since the kernel stops a process's threads
    /// one after another and a running thread could still answer a call.
    pub fn signal_all(&self, signal: rustix::process::Signal) -> Result<usize, HostsError> {
        let keeper = self.keeper.as_ref().map(Child::id);
        let mut signalled = std::collections::BTreeSet::new();
        loop {
            let listed = run(&["ip", "netns", "pids", &self.netns])?;
            let new: Vec<u32> = listed
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .filter(|p| Some(*p) != keeper && !signalled.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                signalled.insert(pid);
                if let Some(raw) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(raw, signal);
                }
            }
        }
        if signal == rustix::process::Signal::STOP {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let running: Vec<u32> = signalled
                    .iter()
                    .copied()
                    .filter(|&pid| has_running_thread(pid))
                    .collect();
                if running.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(HostsError::NotStopped(running));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(signalled.len())
    }

    /// A command that runs `program` on this host: in its network and
    /// mount namespaces.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        let target = self.keeper.as_ref().map_or(0, Child::id);
        cmd.arg(format!("--target={target}"))
            .args(["--mount", "--net", "--uts", "--"])
            .arg(program);
        cmd
    }
}

/// Hosts made for one test; dropped, they are unmade.
#[derive(Debug)]
pub struct Hosts {
    bridge: String,
    hosts: Vec<Host>,
}

/// Whether a thread of process `pid` is not yet stopped (`T`) or traced
/// (`t`); a process that is gone or a zombie has none.
fn has_running_thread(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which is in parentheses and
        // may itself hold them.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('T' | 't' | 'Z' | 'X') | None)
    })
}

fn run(args: &[&str]) -> Result<String, HostsError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HostsError::Failed {
            command: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HostsError::Failed {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(tool: &'static str) -> Result<(), HostsError> {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        Ok(())
    } else {
        Err(HostsError::MissingTool(tool))
    }
}

/// A tag no other live [`Hosts`] on this machine uses: this process's id
/// and a count, six hex digits.
fn unique_tag() -> u32 {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    (std::process::id().wrapping_mul(64).wrapping_add(n)) & 0xff_ffff
}

impl Hosts {
    /// Makes `n` hosts (at most 200), or says why not.
    pub fn make(n: usize) -> Result<Hosts, HostsError> {
        let uid = rustix::process::getuid().as_raw();
        if uid != 0 {
            return Err(HostsError::NotRoot(uid));
        }
        for tool in ["ip", "unshare", "nsenter"] {
            have(tool)?;
        }
        // Daemons that detach on a host (`braid start`) are adopted by this
        // process, which reaps them when the hosts are dropped.
        static SUBREAPER: std::sync::Once = std::sync::Once::new();
        SUBREAPER.call_once(|| {
            let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
        });
        let tag = unique_tag();
        let mut hosts = Hosts {
            bridge: format!("bb{tag:06x}"),
            hosts: Vec::new(),
        };
        // Each harness has a bridge of its own, with no address in this
        // namespace: its subnet is reachable only from its hosts, so two
        // harnesses never meet even if their subnets coincide.
        let subnet = [10, 200 + (tag >> 16) as u8 % 50, (tag >> 8) as u8];
        run(&["ip", "link", "add", &hosts.bridge, "type", "bridge"])?;
        run(&["ip", "link", "set", &hosts.bridge, "up"])?;
        for i in 0..n.min(200) {
            let host = Host {
                netns: format!("braid-{tag:06x}-{i}"),
                veth: format!("bv{tag:06x}{i}"),
                addr: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], i as u8 + 1),
                keeper: None,
            };
            let peer = format!("bn{tag:06x}{i}");
            run(&["ip", "netns", "add", &host.netns])?;
            hosts.hosts.push(host);
            let host = hosts
                .hosts
                .last_mut()
                .ok_or(HostsError::NoKeeper(i, "gone".into()))?;
            let ns = host.netns.clone();
            run(&[
                "ip", "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
            ])?;
            run(&["ip", "link", "set", &peer, "netns", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            let cidr = format!("{}/24", host.addr);
            run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "link",
                "set",
                &host.veth,
                "master",
                &hosts.bridge,
                "up",
            ])?;
            host.keeper = Some(keeper(i, &ns)?);
        }
        Ok(hosts)
    }

    /// [`Hosts::make`] for test `test`: `None` after printing
    /// `SKIPPED: <reason>` where hosts cannot be made, unless
    /// `BRAID_REQUIRE_HOSTS=1`, which makes that a panic.
    pub fn for_test(test: &str, n: usize) -> Option<Hosts> {
        match Hosts::make(n) {
            Ok(hosts) => Some(hosts),
            Err(e) if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") => {
                panic!("{test}: test hosts are required ({REQUIRE_VAR}=1) but: {e}")
            }
            Err(e) => {
                // Straight to the process's stderr: the test harness
                // captures `println!`, and a skip must show.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {e}");
                None
            }
        }
    }

    /// Host `i`.
    ///
    /// # Panics
    /// If there is no host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// How many hosts there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The bridge the hosts are joined by.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }
}

/// The directories of this build that a host's private `/tmp` would hide
/// (a checkout or target directory under `/tmp`, as in CI): every host
/// sees them at their paths, bound from this mount namespace, so the test
/// binaries, `braid` and the repository's files run there as here.
fn build_dirs() -> Vec<std::path::PathBuf> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf());
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()));
    let hidden = |d: &std::path::PathBuf| d.starts_with("/tmp");
    let mut dirs: Vec<_> = workspace.into_iter().chain(target).filter(hidden).collect();
    dirs.sort();
    // A directory inside another bound one is visible through it.
    dirs.dedup_by(|inner, outer| inner.starts_with(&*outer));
    dirs
}

/// Starts the process that holds host `i`'s mount namespace, in network
/// namespace `ns`, once its `/tmp` and `/dev/shm` are private.
fn keeper(i: usize, ns: &str) -> Result<Child, HostsError> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
        ])
        .args([
            "sh",
            "-c",
            // The build's directories are bound aside (into the new,
            // still empty /dev/shm) before the new /tmp hides them, then
            // moved to their paths in it.
            &format!(
                "mount -t tmpfs tmpfs /dev/shm \
                 && n=0 && for d in \"$@\"; do mkdir /dev/shm/.build$n \
                    && mount --bind \"$d\" /dev/shm/.build$n && n=$((n+1)) || exit 1; done \
                 && mount -t tmpfs tmpfs /tmp \
                 && n=0 && for d in \"$@\"; do mkdir -p \"$d\" \
                    && mount --move /dev/shm/.build$n \"$d\" && rmdir /dev/shm/.build$n \
                    && n=$((n+1)) || exit 1; done \
                 && hostname braid-host-{i} && echo ready && exec sleep infinity"
            ),
            "keeper",
        ])
        .args(build_dirs())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostsError::NoKeeper(i, e.to_string()))?;
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .map(|out| BufReader::new(out).read_line(&mut line));
    if line.trim() != "ready" {
        let _ = child.kill();
        let out = child.wait_with_output();
        let stderr = out
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default();
        return Err(HostsError::NoKeeper(i, format!("{read:?} {stderr}")));
    }
    Ok(child)
}

/// The `braid` binary of this build (`target/<profile>/braid`, beside the
/// test binaries' `deps` directory), which `cargo test --workspace` builds.
///
/// # Panics
/// If it has not been built, saying how to build it.
pub fn braid_binary() -> std::path::PathBuf {
    let path = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("braid")));
    match path {
        Some(path) if path.exists() => path,
        other => panic!(
            "the braid binary is not built ({other:?}): run `cargo build -p braid --bin braid` \
             or `cargo test --workspace`"
        ),
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            // Everything in the namespace was started there by this test
            // (the keeper included); a process that is gone already
            // answers ESRCH, which is fine.
            if let Ok(pids) = run(&["ip", "netns", "pids", &host.netns]) {
                let pids: Vec<_> = pids
                    .split_whitespace()
                    .filter_map(|p| rustix::process::Pid::from_raw(p.parse().ok()?))
                    .collect();
                // Braid daemons that detached on the host were adopted by
                // this process, which reaps them; a process the test
                // started directly is the test's to wait for.
                let daemons: Vec<_> = pids
                    .iter()
                    .copied()
                    .filter(|pid| is_daemon(pid.as_raw_nonzero().get()))
                    .collect();
                for &pid in &pids {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                for pid in daemons {
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
            }
            if let Some(mut keeper) = host.keeper.take() {
                let _ = keeper.kill();
                let _ = keeper.wait();
            }
            let _ = run(&["ip", "link", "del", &host.veth]);
            let _ = run(&["ip", "netns", "del", &host.netns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
        reap_exited_daemons();
    }
}

/// Whether process `pid` is a braid daemon (they name themselves
/// `braid-head`, `braid-node`, `braid-worker`, …).
fn is_daemon(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("braid-"))
}

/// Reaps the braid daemons that exited on a host before the hosts were
/// dropped (`braid stop`) and that this process adopted as their
/// subreaper: zombies whose parent is this process and whose name is a
/// braid daemon's.
fn reap_exited_daemons() {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after
        // its closing parenthesis.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z") && ppid == Some(me) && comm.starts_with("braid-") {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
            }
        }
    }
}
