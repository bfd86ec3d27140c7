//! Entering a process's braid role. A binary braid re-executes (as a head,
//! a node or a worker) takes its role from the environment before `main`
//! runs — in a constructor, so re-executed test binaries work too — and
//! never returns to `main`.

use crate::cluster::{DaemonConfig, DaemonOptions, DAEMON_VAR};
use crate::core::{Core, CoreConfig, Role};
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::node::worker_pool::{file_stamp, WorkerConfig, ROLE_VAR, WORKER_VAR};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

#[ctor::ctor]
fn enter_role_before_main() {
    enter_role();
}

/// A role runs from a constructor, before the standard library's start-up
/// would set SIGPIPE to be ignored; without this, a write to a socket whose
/// peer was killed would kill the daemon or worker instead of failing with
/// `EPIPE`.
fn ignore_sigpipe() {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code, only a
    // disposition; it is async-signal-safe and affects nothing but how this
    // process treats SIGPIPE, which every braid process wants ignored (as
    // Rust's own `main` does).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Sets the process name (what `ps`, `pgrep` and `braid stop` see).
pub fn set_process_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = rustix::thread::set_name(&name);
    }
}

/// If this process was started with a braid role, runs it and exits;
/// otherwise returns. `braid::init()` calls it too, in case the linker
/// dropped the constructor.
pub fn enter_role() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    ignore_sigpipe();
    let code = match role.as_str() {
        "worker" => {
            set_process_name("braid-worker");
            run_worker()
        }
        "head" | "node" => {
            set_process_name(if role == "head" {
                "braid-head"
            } else {
                "braid-node"
            });
            run_daemon()
        }
        _ => return,
    };
    std::process::exit(code);
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("braid")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start tokio", e))
}

/// Daemons' default log filter: braid's info lines (start, join, workers,
/// leases, deaths) in their log files, only warnings from libraries.
const DAEMON_LOG: &str = "warn,braid=info";
/// Workers' default: their output goes to their driver's terminal.
const WORKER_LOG: &str = "warn";

fn init_tracing(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Raises this process's open-file limit to its hard limit: a node with
/// many actors holds connections and descriptors per worker, as does a
/// worker many peers call.
fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!("cannot raise the open-file limit: {e}");
        }
    }
}

fn run_daemon() -> i32 {
    init_tracing(DAEMON_LOG);
    raise_open_files();
    let parsed: Option<(DaemonConfig, DaemonOptions)> = std::env::var(DAEMON_VAR)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let Some((config, options)) = parsed else {
        println!("failed {DAEMON_VAR} is missing or malformed");
        return 2;
    };
    if options.detach {
        let _ = rustix::process::setsid();
    }
    let session_dir = match &config {
        DaemonConfig::Head { session_dir, .. } | DaemonConfig::Node { session_dir, .. } => {
            session_dir.clone()
        }
    };
    // Held until this process exits: it marks the session live, so no
    // `braid start` or `braid stop` cleans it up under this daemon.
    let _session = match crate::session::SessionLock::hold(&session_dir) {
        Ok(lock) => lock,
        Err(e) => {
            println!("failed {e}");
            return 1;
        }
    };
    let rt = match runtime(2) {
        Ok(rt) => rt,
        Err(e) => {
            println!("failed {e}");
            return 1;
        }
    };
    let result = rt.block_on(async move {
        let stop = stop_signal(options.parent);
        match config {
            DaemonConfig::Head {
                listen,
                token,
                session_dir,
                node_timeout_ms,
                metrics_port,
            } => {
                let listen = listen
                    .parse()
                    .map_err(|e| Error::BadRequest(format!("listen address {listen}: {e}")))?;
                let head = crate::rpc::serve_head(crate::rpc::HeadConfig {
                    listen,
                    token,
                    node_timeout: Duration::from_millis(node_timeout_ms),
                    metrics_listen: Some(std::net::SocketAddr::new(listen.ip(), metrics_port)),
                    job_logs: Some(session_dir.join("logs").join("jobs")),
                })
                .await
                .map_err(|e| Error::io("start head", e))?;
                let metrics = head.metrics_addr.map(|a| a.to_string()).unwrap_or_default();
                report_ready(&format!("{} {metrics}", head.local_addr), &options);
                stop.await;
                let _ = head.shutdown().await;
                if options.parent.is_some() {
                    let _ = std::fs::remove_dir_all(&session_dir);
                }
                Ok(())
            }
            DaemonConfig::Node {
                head,
                token,
                session_dir,
                num_cpus,
                object_store_memory,
                resources,
                host,
                is_head_node,
                metrics_port,
            } => {
                let grpc_listen = format!("{host}:0")
                    .parse()
                    .map_err(|e| Error::BadRequest(format!("host {host}: {e}")))?;
                let config = crate::node::NodeConfig {
                    head,
                    token,
                    session_dir,
                    num_cpus,
                    object_store_memory,
                    resources,
                    grpc_listen,
                    is_head_node,
                    warm_workers: (num_cpus.ceil() as usize).clamp(1, 4),
                    metrics_port,
                    log_file: options.log_file.clone(),
                };
                let opts = options.clone();
                crate::node::run_node(
                    config,
                    |ready| {
                        report_ready(
                            &format!(
                                "{} {} {} {}",
                                ready.control_socket.display(),
                                ready.node,
                                ready.grpc_address,
                                ready.metrics_address
                            ),
                            &opts,
                        )
                    },
                    stop,
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            println!("failed {e}");
            eprintln!("braid daemon failed: {e}");
            1
        }
    }
}

fn report_ready(what: &str, options: &DaemonOptions) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {what}");
    let _ = out.flush();
    drop(out);
    let target = match &options.log_file {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok(),
        None => None,
    };
    match target {
        Some(file) => {
            let _ = rustix::stdio::dup2_stdout(file.as_fd());
        }
        None => {
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = rustix::stdio::dup2_stdout(null.as_fd());
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT, or when `parent` exits.
async fn stop_signal(parent: Option<u32>) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let parent_gone = async move {
        match parent {
            Some(pid) => wait_for_exit(pid).await,
            None => std::future::pending().await,
        }
    };
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = parent_gone => {}
            }
        }
        _ => parent_gone.await,
    }
}

/// Resolves when process `pid` exits (a pidfd becomes readable).
pub(crate) async fn wait_for_exit(pid: u32) {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    // SAFETY: `fd` is an `OwnedFd` moved into the `AsyncFd`: it is open,
    // owned by nothing else, and stays the same descriptor until the
    // `AsyncFd` drops it.
    let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
        return;
    };
    let _ = fd.readable().await;
}

fn run_worker() -> i32 {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    init_tracing(WORKER_LOG);
    crate::panics::install();
    raise_open_files();
    let config: WorkerConfig = match std::env::var(WORKER_VAR)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
    {
        Some(c) => c,
        None => {
            eprintln!("braid worker: {WORKER_VAR} is missing or malformed");
            return 2;
        }
    };
    let own_stamp = std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| file_stamp(&p).ok())
        .unwrap_or_default();
    let hash = if own_stamp == config.exe_stamp {
        config.build_hash.clone()
    } else {
        crate::registry::build_hash().to_string()
    };
    crate::registry::set_build_hash(hash);
    let rt = match runtime(2) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("braid worker: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async move {
        let core = Core::start(CoreConfig {
            role: Role::Worker,
            job: config.job,
            worker: config.worker,
            token: config.token.clone(),
            node_socket: config.node_socket.clone(),
            session_dir: config.session_dir.clone(),
            direct_ip: config.direct_ip,
        })
        .await?;
        let executor = Executor::start(&core);
        let _ = core.inbox.set(executor);
        crate::runtime::set_current(&crate::Runtime::new(core.clone(), None));
        forward_output(&core);
        core.node.send(crate::wire::Message::WorkerReady);
        core.node.closed().await;
        Ok::<(), Error>(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("braid worker failed: {e}");
            1
        }
    }
}

/// Sends everything the worker prints to its job's driver, line by line,
/// labelled with the running task or actor and the pid (as Ray does); a
/// copy still goes to the worker's log.
fn forward_output(core: &std::sync::Arc<Core>) {
    for stderr in [false, true] {
        let Ok((reader, writer)) = rustix::pipe::pipe() else {
            return;
        };
        let original = if stderr {
            rustix::io::dup(std::io::stderr().as_fd())
        } else {
            rustix::io::dup(std::io::stdout().as_fd())
        };
        let redirected = if stderr {
            rustix::stdio::dup2_stderr(writer.as_fd())
        } else {
            rustix::stdio::dup2_stdout(writer.as_fd())
        };
        if redirected.is_err() {
            return;
        }
        drop(writer);
        let node = core.node.clone();
        let pid = std::process::id();
        let copy: Option<OwnedFd> = original.ok();
        let _ = std::thread::Builder::new()
            .name("braid-output".into())
            .spawn(move || {
                let file = std::fs::File::from(reader);
                let mut copy = copy.map(std::fs::File::from);
                let mut lines = std::io::BufReader::new(file);
                let mut line = String::new();
                loop {
                    line.clear();
                    match std::io::BufRead::read_line(&mut lines, &mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if let Some(c) = copy.as_mut() {
                        let _ = c.write_all(line.as_bytes());
                    }
                    let label = crate::executor::current_label().lock().clone();
                    node.send(crate::wire::Message::Log {
                        pid,
                        label,
                        stderr,
                        line: line.trim_end_matches('\n').to_string(),
                    });
                }
            });
    }
}
