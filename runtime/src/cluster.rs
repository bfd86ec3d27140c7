//! Finding or starting a cluster: session directories, the cluster token
//! and its file, the embedded cluster `braid::init()` starts when given no
//! address, and joining a running one.

use crate::error::{Error, Result};
use crate::node::worker_pool::ROLE_VAR;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Environment variable carrying a daemon's configuration (JSON).
pub const DAEMON_VAR: &str = "BRAID_DAEMON";
/// Environment variable naming the cluster's head (`host:port`; `auto`:
/// the cluster started on this machine; `local`: a new embedded one).
pub const ADDRESS_VAR: &str = "BRAID_ADDRESS";
/// The port `braid start --head` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 6380;
/// Environment variable carrying the cluster token.
pub const TOKEN_VAR: &str = "BRAID_TOKEN";

pub use crate::session::{new_session_dir, user_dir};

/// Creates a directory readable by this user only.
pub fn private_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

/// A fresh random cluster token.
pub fn new_token() -> String {
    format!("{:032x}", uuid::Uuid::new_v4().as_u128())
}

/// What `braid start --head` records about a cluster it started, in a
/// 0600 file, so later commands on this machine find the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The head's gRPC address.
    pub address: String,
    /// The cluster token.
    pub token: String,
    /// The session directory.
    pub session_dir: PathBuf,
}

/// Where the token file of the cluster at `address` lives.
pub fn cluster_file_path(address: &str) -> PathBuf {
    user_dir().join(format!("cluster-{}.json", address.replace([':', '/'], "_")))
}

/// Writes a cluster file, readable by this user only.
pub fn write_cluster_file(file: &ClusterFile) -> Result<PathBuf> {
    crate::session::private_user_dir()?;
    let path = cluster_file_path(&file.address);
    let text = serde_json::to_string(file).map_err(|e| Error::Codec(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(path)
}

/// Reads the cluster file for `address`, if this machine has one (and
/// the per-user directory is private to this user).
pub fn read_cluster_file(address: &str) -> Option<ClusterFile> {
    crate::session::existing_user_dir().ok()??;
    let text = std::fs::read_to_string(cluster_file_path(address)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every cluster file of this user.
pub fn cluster_files() -> Vec<(PathBuf, ClusterFile)> {
    let Ok(Some(dir)) = crate::session::existing_user_dir() else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cluster-") && n.ends_with(".json"))
        })
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            Some((p, serde_json::from_str(&text).ok()?))
        })
        .collect()
}

/// The cluster files of this user's clusters that run on this machine
/// (under this `BRAID_TMPDIR`): those whose session a daemon holds.
pub fn live_clusters() -> Vec<ClusterFile> {
    let mut live: Vec<ClusterFile> = cluster_files()
        .into_iter()
        .map(|(_, file)| file)
        .filter(|file| crate::session::is_held(&file.session_dir))
        .collect();
    live.sort_by(|a, b| a.address.cmp(&b.address));
    live
}

/// The token for `address`: `BRAID_TOKEN`, else this machine's token file.
pub fn token_for(address: &str) -> Result<String> {
    if let Ok(token) = std::env::var(TOKEN_VAR) {
        if !token.is_empty() {
            return Ok(token);
        }
    }
    crate::session::existing_user_dir()?;
    read_cluster_file(address).map(|f| f.token).ok_or_else(|| {
        Error::Unauthenticated(format!(
            "no token for {address}: set {TOKEN_VAR} (the head's machine keeps it in {})",
            cluster_file_path(address).display()
        ))
    })
}

/// This machine's host name.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Physical memory in bytes.
pub fn physical_memory() -> u64 {
    braid_store::config::physical_memory()
}

/// How a daemon process started by braid is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DaemonConfig {
    /// The head.
    Head {
        /// Address to listen on.
        listen: String,
        /// The cluster token.
        token: String,
        /// The session directory.
        session_dir: PathBuf,
        /// Milliseconds without a heartbeat after which a node is dead.
        node_timeout_ms: u64,
        /// Port of `/metrics` on the listen address's IP (0: any).
        #[serde(default)]
        metrics_port: u16,
    },
    /// A node.
    Node {
        /// The head's address.
        head: String,
        /// The cluster token.
        token: String,
        /// The session directory.
        session_dir: PathBuf,
        /// CPUs offered.
        num_cpus: f64,
        /// Store capacity.
        object_store_memory: Option<u64>,
        /// Custom resources.
        resources: crate::resources::Resources,
        /// Host to serve gRPC on.
        host: String,
        /// Whether it runs beside the head.
        is_head_node: bool,
        /// Port of `/metrics` on `host` (0: any).
        #[serde(default)]
        metrics_port: u16,
    },
}

/// Extra settings for a daemon process: who to watch and where to log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonOptions {
    /// Exit when this process exits (embedded clusters).
    pub parent: Option<u32>,
    /// After reporting ready, send stdout and stderr here.
    pub log_file: Option<PathBuf>,
    /// Start a new session (detach from the terminal).
    pub detach: bool,
}

/// A daemon process started by this process.
pub struct Daemon {
    /// Its process.
    pub child: Child,
    /// What it printed as ready (after `ready `).
    pub ready: String,
}

/// Starts `exe` as a braid daemon and waits for its ready line.
pub fn start_daemon(exe: &Path, config: &DaemonConfig, options: &DaemonOptions) -> Result<Daemon> {
    let role = match config {
        DaemonConfig::Head { .. } => "head",
        DaemonConfig::Node { .. } => "node",
    };
    let json =
        serde_json::to_string(&(config, options)).map_err(|e| Error::Codec(e.to_string()))?;
    let mut command = Command::new(exe);
    command
        .env(ROLE_VAR, role)
        .env(DAEMON_VAR, json)
        .env_remove(ADDRESS_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(match &options.log_file {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::inherit()),
            None => Stdio::inherit(),
        });
    let mut child = command
        .spawn()
        .map_err(|e| Error::io(format!("start {role} from {}", exe.display()), e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::io("start daemon", "no stdout pipe"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("ready ") {
                    return Ok(Daemon {
                        child,
                        ready: rest.to_string(),
                    });
                }
                if let Some(rest) = line.strip_prefix("failed ") {
                    let _ = child.wait();
                    return Err(Error::io(format!("start {role}"), rest));
                }
            }
            _ => {
                let status = child.wait().ok();
                return Err(Error::io(
                    format!("start {role}"),
                    format!("it exited before it was ready ({status:?})"),
                ));
            }
        }
    }
}

/// The head and node processes `braid::init()` started for this driver.
/// Stopped when the last runtime handle drops (and, should the driver be
/// killed, they notice and exit on their own).
pub struct EmbeddedCluster {
    children: parking_lot::Mutex<Vec<Child>>,
    session: crate::session::SessionDir,
}

impl EmbeddedCluster {
    /// Starts a head and one node from this process's own binary.
    pub(crate) fn start(
        num_cpus: f64,
        object_store_memory: Option<u64>,
        resources: crate::resources::Resources,
        extra_nodes: Vec<(f64, crate::resources::Resources)>,
    ) -> Result<(EmbeddedCluster, String, String, PathBuf)> {
        let exe = std::env::current_exe().map_err(|e| Error::io("find own executable", e))?;
        let session = new_session_dir()?;
        let session_dir = session.path().to_path_buf();
        let token = new_token();
        let options = DaemonOptions {
            parent: Some(std::process::id()),
            log_file: Some(session_dir.join("daemons.log")),
            detach: false,
        };
        let head = start_daemon(
            &exe,
            &DaemonConfig::Head {
                listen: "127.0.0.1:0".into(),
                token: token.clone(),
                session_dir: session_dir.clone(),
                node_timeout_ms: 10_000,
                metrics_port: 0,
            },
            &options,
        )?;
        let address = head
            .ready
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let cluster = EmbeddedCluster {
            children: parking_lot::Mutex::new(vec![head.child]),
            session,
        };
        let start_node =
            |num_cpus: f64, resources: crate::resources::Resources, is_head_node: bool| {
                start_daemon(
                    &exe,
                    &DaemonConfig::Node {
                        head: address.clone(),
                        token: token.clone(),
                        session_dir: session_dir.clone(),
                        num_cpus,
                        object_store_memory,
                        resources,
                        host: "127.0.0.1".into(),
                        is_head_node,
                        metrics_port: 0,
                    },
                    &options,
                )
            };
        let node = start_node(num_cpus, resources, true)?;
        let socket = PathBuf::from(node.ready.split_whitespace().next().unwrap_or_default());
        cluster.children.lock().push(node.child);
        for (num_cpus, resources) in extra_nodes {
            let node = start_node(num_cpus, resources, false)?;
            cluster.children.lock().push(node.child);
        }
        Ok((cluster, address, token, socket))
    }

    /// Stops the daemons and removes the session directory.
    pub fn stop(&self) {
        let mut children = self.children.lock();
        for child in children.iter_mut().rev() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for child in children.iter_mut().rev() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
        children.clear();
        let _ = std::fs::remove_dir_all(self.session.path());
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Compares a presented token with the cluster's in time that does not
/// depend on where they differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
