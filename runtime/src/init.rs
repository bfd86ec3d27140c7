//! `braid::init()`: join a cluster or start an embedded one, and register
//! this program as a job. The cluster is, in this order: an explicit
//! address; `BRAID_ADDRESS` (`auto`: the cluster started on this machine,
//! `local`: a new embedded one); the one cluster this user started on this
//! machine with `braid start` (under the same `BRAID_TMPDIR`); else a new
//! embedded cluster. Options that shape an embedded cluster (CPUs, store
//! size, resources, extra nodes) mean `local`.

use crate::cluster::{self, EmbeddedCluster, ADDRESS_VAR};
use crate::core::{Core, CoreConfig, Role};
use crate::error::{Error, Result};
use crate::ids::{JobId, WorkerId};
use crate::resources::Resources;
use crate::wire::messages::JobSpec;
pub use crate::wire::messages::DRIVER_ENV;
use crate::wire::{Message, Reply};
use crate::Runtime;
use std::path::PathBuf;
use std::sync::Arc;

/// How [`init`] finds or starts a cluster.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    address: Option<String>,
    token: Option<String>,
    num_cpus: Option<f64>,
    object_store_memory: Option<u64>,
    resources: Resources,
    extra_nodes: Vec<(f64, Resources)>,
    env: Vec<(String, String)>,
}

impl InitOptions {
    /// Defaults: see the [module](self) (`BRAID_ADDRESS`, else the
    /// cluster started on this machine, else an embedded cluster with this
    /// machine's CPUs).
    pub fn new() -> Self {
        InitOptions::default()
    }

    /// Join the cluster whose head is at `host:port` (`auto`: the one
    /// started on this machine; `local`: a new embedded cluster).
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// The cluster token (else `BRAID_TOKEN`, else the head's token file
    /// on this machine).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// CPUs of the embedded node.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = Some(n);
        self
    }

    /// Object store capacity of the embedded node, in bytes.
    pub fn object_store_memory(mut self, bytes: u64) -> Self {
        self.object_store_memory = Some(bytes);
        self
    }

    /// A custom resource of the embedded node.
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        self.resources.set(name, amount);
        self
    }

    /// Adds another node to the embedded cluster, with its own object store,
    /// offering `num_cpus` CPUs and `resources`: a multi-node cluster on one
    /// machine.
    pub fn extra_node(mut self, num_cpus: f64, resources: Resources) -> Self {
        self.extra_nodes.push((num_cpus, resources));
        self
    }

    /// Sets `key` to `value` in the environment of this job's workers, on
    /// every node (Ray's `runtime_env={"env_vars": ...}`); beside these,
    /// workers take the driver's [`DRIVER_ENV`] and `BRAID_*` variables.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Whether these options describe an embedded cluster.
    fn shapes_embedded(&self) -> bool {
        self.num_cpus.is_some()
            || self.object_store_memory.is_some()
            || !self.resources.0.is_empty()
            || !self.extra_nodes.is_empty()
    }

    /// The head to join, or `None` for a new embedded cluster.
    fn target(&self) -> Result<Option<String>> {
        let from_env = || std::env::var(ADDRESS_VAR).ok().filter(|a| !a.is_empty());
        let named = match &self.address {
            Some(address) if self.shapes_embedded() && address != LOCAL => {
                return Err(Error::BadRequest(format!(
                    "CPUs, store size, resources and extra nodes shape an embedded cluster; \
                     they cannot apply to the cluster at {address}"
                )))
            }
            Some(address) => Some(address.clone()),
            None if self.shapes_embedded() => None,
            None => from_env(),
        };
        match named.as_deref() {
            Some(LOCAL) => Ok(None),
            Some(AUTO) => match started_here()? {
                Some(address) => Ok(Some(address)),
                None => Err(Error::Unreachable {
                    address: AUTO.into(),
                    message: "no cluster runs on this machine (`braid start --head` starts one)"
                        .into(),
                }),
            },
            Some(address) => Ok(Some(address.to_owned())),
            None if self.shapes_embedded() => Ok(None),
            None => {
                let found = started_here()?;
                if let Some(address) = &found {
                    tracing::info!(
                        "joining the cluster at {address} started on this machine \
                         ({ADDRESS_VAR}=local starts a new one)"
                    );
                }
                Ok(found)
            }
        }
    }

    /// Finds or starts the cluster and joins it as a driver.
    pub async fn init(self) -> Result<Runtime> {
        crate::role::enter_role();
        let address = self.target()?;
        let (cluster, head, token, node_socket, session_dir, direct_ip) = match address {
            Some(address) => {
                let token = match &self.token {
                    Some(t) => t.clone(),
                    None => cluster::token_for(&address)?,
                };
                let client = crate::rpc::HeadClient::connect(&address, &token).await?;
                let nodes = client.list_nodes().await?;
                let host = cluster::hostname();
                let local = nodes
                    .iter()
                    .filter(|n| n.alive && n.info.control.is_local())
                    .filter(|n| std::path::Path::new(&n.info.control.socket).exists())
                    .max_by_key(|n| n.info.is_head_node)
                    .ok_or_else(|| Error::Unreachable {
                        address: address.clone(),
                        message: format!(
                            "the cluster has no node on this machine ({host}); start one with `braid start --address {address}`"
                        ),
                    })?;
                let direct_ip = local
                    .info
                    .grpc_address
                    .parse::<std::net::SocketAddr>()
                    .map(|a| a.ip())
                    .map_err(|e| {
                        Error::BadRequest(format!(
                            "the head lists node {} at {:?}: {e}",
                            local.info.node_id, local.info.grpc_address
                        ))
                    })?;
                (
                    None,
                    address,
                    token,
                    PathBuf::from(&local.info.control.socket),
                    local.info.session_dir.clone(),
                    direct_ip,
                )
            }
            None => {
                let nodes = std::iter::once((self.num_cpus, &self.resources))
                    .chain(self.extra_nodes.iter().map(|(n, r)| (Some(*n), r)));
                for (cpus, resources) in nodes {
                    let cpus = cpus.map(|n| (crate::resources::CPU, n));
                    let custom = resources.0.iter().map(|(k, v)| (k.as_str(), *v));
                    for (name, amount) in cpus.into_iter().chain(custom) {
                        crate::resources::check_offer(name, amount).map_err(Error::BadRequest)?;
                    }
                }
                let cpus = self.num_cpus.unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get() as f64)
                        .unwrap_or(1.0)
                });
                let memory = self.object_store_memory;
                let resources = self.resources.clone();
                let extra = self.extra_nodes.clone();
                let (cluster, head, token, socket) = tokio::task::spawn_blocking(move || {
                    EmbeddedCluster::start(cpus, memory, resources, extra)
                })
                .await
                .map_err(|e| Error::io("start embedded cluster", e))??;
                let session = socket
                    .parent()
                    .and_then(|p| p.parent())
                    .map(PathBuf::from)
                    .unwrap_or_default();
                let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
                (
                    Some(Arc::new(cluster)),
                    head,
                    token,
                    socket,
                    session,
                    loopback,
                )
            }
        };
        // A driver `braid job submit` started registers under its
        // submission's id.
        let job = std::env::var(crate::rpc::job_manager::JOB_ID_VAR)
            .ok()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(JobId::random);
        let core = Core::start(CoreConfig {
            role: Role::Driver,
            job,
            worker: WorkerId::random(),
            token,
            node_socket,
            session_dir,
            direct_ip,
        })
        .await?;
        register_job(&core, &self.env).await?;
        let rt = Runtime::new(core, cluster);
        crate::runtime::set_current(&Runtime {
            cluster: None,
            ..rt.clone()
        });
        let _ = head;
        Ok(rt)
    }
}

/// `BRAID_ADDRESS` (or [`InitOptions::address`]) for a new embedded
/// cluster, as Ray's `address="local"`.
pub const LOCAL: &str = "local";
/// `BRAID_ADDRESS` (or [`InitOptions::address`]) for the cluster started
/// on this machine, as Ray's `address="auto"`.
pub const AUTO: &str = "auto";

/// The head of the one cluster this user started on this machine; an
/// error naming them if there are several.
fn started_here() -> Result<Option<String>> {
    let mut live = cluster::live_clusters();
    match live.len() {
        0 => Ok(None),
        1 => Ok(Some(live.remove(0).address)),
        _ => Err(Error::BadRequest(format!(
            "several clusters run on this machine ({}): set {ADDRESS_VAR} to one of them, \
             or to `local` for a new embedded cluster",
            live.iter()
                .map(|c| c.address.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

async fn register_job(core: &Arc<Core>, declared: &[(String, String)]) -> Result<()> {
    let exe =
        std::fs::read_link("/proc/self/exe").map_err(|e| Error::io("find own executable", e))?;
    // A binary replaced on disk (rebuilt) since this process started: name
    // the path, so the node finds the new file there and refuses it.
    let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    };
    let build_hash = tokio::task::spawn_blocking(|| {
        let exe = std::path::Path::new("/proc/self/exe");
        match crate::session::remembered_build_hash(exe) {
            Some(hash) => {
                crate::registry::set_build_hash(hash);
                crate::registry::build_hash().to_string()
            }
            None => {
                let hash = crate::registry::build_hash().to_string();
                crate::session::remember_build_hash(exe, &hash);
                hash
            }
        }
    })
    .await
    .map_err(|e| Error::io("hash executable", e))?;
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("BRAID_") && k != ADDRESS_VAR) || DRIVER_ENV.contains(&k.as_str())
        })
        .collect();
    for (key, value) in declared {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(Error::BadRequest(format!(
                "environment variable {key:?} cannot be set (empty, or holds '=' or NUL)"
            )));
        }
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    let spec = JobSpec {
        job: core.job,
        exe: exe.display().to_string(),
        build_hash: build_hash.clone(),

        driver: (*core.me).clone(),
        env,
    };
    match core.node.request(Message::RegisterJob(spec)).await? {
        Reply::Ok => {}
        _ => return Err(Error::BadRequest("node answered RegisterJob oddly".into())),
    }
    let head = core.head().await?;
    head.register_job(&crate::rpc::JobInfo {
        job_id: core.job,
        driver_pid: std::process::id(),
        driver_address: core.me.to_head_string(),
        exe_path: exe,
        build_hash,
    })
    .await
}

/// Joins the cluster at `BRAID_ADDRESS`, or starts an embedded one (a head,
/// a node and its workers, stopped when the runtime is dropped or the
/// program exits).
pub async fn init() -> Result<Runtime> {
    InitOptions::new().init().await
}

/// [`init`] for programs that are not async: the runtime runs on its own
/// background threads.
pub fn init_blocking() -> Result<Runtime> {
    init_blocking_with(InitOptions::new())
}

/// [`InitOptions::init`] for programs that are not async.
pub fn init_blocking_with(options: InitOptions) -> Result<Runtime> {
    crate::role::enter_role();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("braid")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start tokio", e))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("braid-runtime".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| Error::io("start runtime thread", e))?;
    crate::runtime::block_on(&handle, options.init())
}
