//! The node daemon: it embeds the node's object store, schedules leases on
//! its resources, starts and reaps worker processes, moves objects to and
//! from other nodes, and cleans up after jobs. Local processes talk to it
//! over a Unix socket; the head and other nodes over gRPC.

mod binaries;
mod object_plane;
pub(crate) mod scheduler;
mod service;
pub mod worker_pool;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId, WorkerId};
use crate::resources::{Resources, CPU, MEMORY};
use crate::rpc::{HeadClient, NodeClient, NodeHeartbeat, NodeInfo, PickNodeOptions};
use crate::wire::messages::{Hello, JobSpec, Lease, LeaseRequest, NodeSummary};
use crate::wire::transport::{self, Listener};
use crate::wire::{Conn, Endpoint, Handler, MachineId, Message, Reply, Responder};
use braid_store::{ObjectId, StoreClient, StoreConfig, StoreHandle, StoreServer};
use parking_lot::Mutex;
use scheduler::{Ledger, Pool};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use worker_pool::{spawn_worker, BuildHashes, WorkerConfig};

/// How long a placement-group reservation waits for leased resources to
/// come back.
const RESERVE_WAIT: Duration = Duration::from_secs(8);

/// How often a node reports to the head.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// How a node daemon is configured.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The head's gRPC address.
    pub head: String,
    /// The cluster token.
    pub token: String,
    /// Where sockets and logs go.
    pub session_dir: PathBuf,
    /// CPUs offered.
    pub num_cpus: f64,
    /// Object store capacity in bytes (`None`: the store's default).
    pub object_store_memory: Option<u64>,
    /// Custom resources offered.
    pub resources: Resources,
    /// Address to serve gRPC on (port 0 picks one).
    pub grpc_listen: SocketAddr,
    /// Whether this node runs beside the head.
    pub is_head_node: bool,
    /// Warm workers kept per job.
    pub warm_workers: usize,
}

#[derive(Debug)]
enum WorkerState {
    Starting,
    Idle,
    Leased(u64),
}

struct WorkerEntry {
    pid: u32,
    job: JobId,
    conn: Option<Conn>,
    address: Option<Address>,
    state: WorkerState,
    actor: Option<ActorId>,
    detached: bool,
}

struct LeaseEntry {
    worker: WorkerId,
    resources: Resources,
    pool: Pool,
    holder: u64,
}

struct Waiting {
    request: LeaseRequest,
    responder: Responder,
    holder: u64,
}

struct JobEntry {
    spec: JobSpec,
    driver: Option<u64>,
    stamp: String,
}

struct State {
    ledger: Ledger,
    workers: HashMap<WorkerId, WorkerEntry>,
    leases: HashMap<u64, LeaseEntry>,
    queue: VecDeque<Waiting>,
    jobs: HashMap<JobId, JobEntry>,
    conns: HashMap<u64, Conn>,
    next_lease: u64,
    grpc_addresses: HashMap<NodeId, String>,
    object_planes: HashMap<NodeId, String>,
}

/// The running node.
pub(crate) struct Node {
    pub(crate) id: NodeId,
    config: NodeConfig,
    control_socket: PathBuf,
    /// Its control plane's TCP address, for callers on other hosts.
    control_tcp: String,
    /// The address its processes serve direct calls on for other hosts.
    direct_ip: IpAddr,
    /// Where its object plane listens.
    object_plane: String,
    store_socket: PathBuf,
    pub(crate) store: Arc<StoreClient>,
    pub(crate) store_handle: StoreHandle,
    head: HeadClient,
    grpc_address: String,
    state: Mutex<State>,
    hashes: BuildHashes,
    /// Transfers into this node's store under way, shared by every caller
    /// that wants the object meanwhile.
    pulls: Mutex<HashMap<ObjectId, Arc<tokio::sync::OnceCell<Result<()>>>>>,
    /// Job binaries shipped here from the nodes of their drivers.
    binaries: binaries::BinaryCache,
    released: tokio::sync::Notify,
    self_ref: Weak<Node>,
}

/// What a started node reports.
#[derive(Debug, Clone)]
pub struct NodeReady {
    /// The node's id.
    pub node: NodeId,
    /// Its control socket.
    pub control_socket: PathBuf,
    /// Its gRPC address.
    pub grpc_address: String,
}

/// Runs a node daemon until `shutdown` resolves (or it fails). `ready` is
/// called once the node is registered with the head and serving.
pub async fn run_node(
    config: NodeConfig,
    ready: impl FnOnce(&NodeReady),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let id = NodeId::random();
    let dir = config
        .session_dir
        .join(format!("node-{}", &id.to_string()[..8]));
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| Error::io("create node directory", e))?;
    let store_socket = dir.join("store.sock");
    let control_socket = dir.join("node.sock");
    let mut store_config = StoreConfig::new(&store_socket);
    if let Some(bytes) = config.object_store_memory {
        store_config.capacity = bytes;
    }
    let store_server = StoreServer::bind(store_config)
        .await
        .map_err(|e| Error::io("start object store", e))?;
    let store_handle = store_server.handle();
    tokio::spawn(async move {
        if let Err(e) = store_server.run().await {
            tracing::error!("object store stopped: {e}");
        }
    });
    let socket = store_socket.clone();
    let store = tokio::task::spawn_blocking(move || StoreClient::connect(&socket))
        .await
        .map_err(|e| Error::io("connect to store", e))?
        .map_err(|e| Error::io("connect to store", e))?;

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|e| Error::io(format!("bind {}", config.grpc_listen), e))?;
    let grpc_address = advertised(
        grpc_listener
            .local_addr()
            .map_err(|e| Error::io("gRPC address", e))?,
        &config.head,
    );
    let direct_ip = grpc_address.ip();
    let grpc_address = grpc_address.to_string();
    let (tcp_listener, tcp_bound) = Listener::bind_tcp(config.grpc_listen.ip()).await?;
    let control_tcp = advertised(tcp_bound, &config.head).to_string();
    let plane_listener = tokio::net::TcpListener::bind((config.grpc_listen.ip(), 0))
        .await
        .map_err(|e| Error::io(format!("bind {}:0", config.grpc_listen.ip()), e))?;
    let object_plane = advertised(
        plane_listener
            .local_addr()
            .map_err(|e| Error::io("object plane address", e))?,
        &config.head,
    )
    .to_string();

    let head = HeadClient::connect(&config.head, &config.token).await?;
    let mut total = config.resources.clone();
    total.set(CPU, config.num_cpus);
    total.set(MEMORY, crate::cluster::physical_memory() as f64 * 0.7);
    let _ = std::fs::remove_file(&control_socket);
    let listener = tokio::net::UnixListener::bind(&control_socket)
        .map_err(|e| Error::io(format!("bind {}", control_socket.display()), e))?;

    let node = Arc::new_cyclic(|weak| Node {
        id,
        control_socket: control_socket.clone(),
        control_tcp,
        object_plane,
        direct_ip,
        store_socket,
        store: Arc::new(store),
        store_handle: store_handle.clone(),
        head,
        grpc_address: grpc_address.clone(),
        state: Mutex::new(State {
            ledger: Ledger::new(total),
            workers: HashMap::new(),
            leases: HashMap::new(),
            queue: VecDeque::new(),
            jobs: HashMap::new(),
            conns: HashMap::new(),
            next_lease: 1,
            grpc_addresses: HashMap::new(),
            object_planes: HashMap::new(),
        }),
        hashes: BuildHashes::default(),
        pulls: Mutex::new(HashMap::new()),
        binaries: binaries::BinaryCache::new(dir.join("binaries")),
        released: tokio::sync::Notify::new(),
        config,
        self_ref: weak.clone(),
    });
    tokio::spawn(object_plane::serve(
        plane_listener,
        node.config.token.clone(),
        node.store.clone(),
    ));
    let grpc_stop = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(service::serve(node.clone(), grpc_listener, grpc_stop.1));
    node.register().await?;
    tokio::spawn(heartbeat_loop(Arc::downgrade(&node)));
    tokio::spawn(transport::serve(
        Listener::Local(listener),
        "local",
        Arc::new(ControlHandler {
            node: Arc::downgrade(&node),
            remote: false,
        }),
    ));
    tokio::spawn(transport::serve(
        tcp_listener,
        "remote",
        Arc::new(ControlHandler {
            node: Arc::downgrade(&node),
            remote: true,
        }),
    ));
    ready(&NodeReady {
        node: id,
        control_socket,
        grpc_address,
    });
    shutdown.await;
    let _ = grpc_stop.0.send(());
    let _ = node.head.unregister_node(id).await;
    node.kill_all_workers();
    store_handle.shutdown();
    let _ = std::fs::remove_file(&node.control_socket);
    Ok(())
}

async fn heartbeat_loop(node: Weak<Node>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let (available, workers) = {
            let s = node.state.lock();
            (s.ledger.available.clone(), s.workers.len() as u32)
        };
        let stats = node.store_handle.stats();
        let beat = NodeHeartbeat {
            node_id: node.id,
            resources_available: available.0,
            store_used: stats.arena.used,
            store_capacity: stats.arena.capacity,
            num_workers: workers,
        };
        match node.head.heartbeat(&beat).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = node.register().await;
            }
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
    }
}

/// Serves the node's control plane. Its own processes (drivers, workers)
/// connect over the Unix socket; processes on other hosts connect over TCP
/// (`remote`) and may only lease workers and ask what the node has.
struct ControlHandler {
    node: Weak<Node>,
    remote: bool,
}

impl ControlHandler {
    /// Whether a caller on another host may send `message`.
    fn remote_may(message: &Message) -> bool {
        matches!(
            message,
            Message::Hello(Hello::Peer { .. })
                | Message::RequestLease(_)
                | Message::ReturnLease { .. }
                | Message::NodeInfo
        )
    }
}

impl Handler for ControlHandler {
    fn on_request(&self, conn: &Conn, message: Message, responder: Responder) {
        let Some(node) = self.node.upgrade() else {
            responder.respond(Err(Error::NotRunning("node shutting down".into())));
            return;
        };
        if self.remote && !Self::remote_may(&message) {
            responder.respond(Err(Error::BadRequest(format!(
                "a node serves {} to its own processes only, not over TCP",
                crate::wire::conn::message_name(&message)
            ))));
            if matches!(message, Message::Hello(_)) {
                conn.close_after_flush();
            }
            return;
        }
        match message {
            Message::Hello(hello) => node.hello(conn, hello, responder),
            Message::RegisterJob(spec) => {
                let result = node.register_job(conn, spec);
                responder.respond(result.map(|_| Reply::Ok));
            }
            Message::RequestLease(request) => node.request_lease(conn, request, responder),
            Message::PullObject { id, from } => {
                let node2 = node.clone();
                tokio::spawn(async move {
                    responder.respond(node2.pull(id, from).await.map(|_| Reply::Ok));
                });
            }
            Message::NodeInfo => responder.respond(Ok(Reply::Node(node.summary()))),
            other => responder.respond(Err(Error::BadRequest(format!(
                "node does not serve {}",
                crate::wire::conn::message_name(&other)
            )))),
        }
    }

    fn on_message(&self, conn: &Conn, message: Message) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        if self.remote && !Self::remote_may(&message) {
            return;
        }
        match message {
            Message::ReturnLease { lease, kill } => node.return_lease(lease, kill),
            Message::FreeObjects(list) => {
                let node2 = node.clone();
                tokio::spawn(async move { node2.free(list).await });
            }
            Message::Log { .. } => node.forward_log(conn, message),
            Message::WorkerReady => node.worker_ready(conn),
            _ => {}
        }
    }

    fn on_close(&self, conn: &Conn) {
        if let Some(node) = self.node.upgrade() {
            node.conn_closed(conn.id());
        }
    }
}

impl Node {
    fn arc(&self) -> Option<Arc<Node>> {
        self.self_ref.upgrade()
    }

    async fn register(&self) -> Result<()> {
        let total = self.state.lock().ledger.total.clone();
        self.head
            .register_node(&NodeInfo {
                node_id: self.id,
                hostname: crate::cluster::hostname(),
                pid: std::process::id(),
                grpc_address: self.grpc_address.clone(),
                control: Endpoint {
                    machine: MachineId::current().clone(),
                    socket: self.control_socket.display().to_string(),
                    tcp: Some(self.control_tcp.clone()),
                },
                store_socket: self.store_socket.clone(),
                object_plane: self.object_plane.clone(),
                session_dir: self.config.session_dir.clone(),
                resources_total: total.0,
                store_capacity: self.store_handle.stats().arena.capacity,
                is_head_node: self.config.is_head_node,
            })
            .await
            .map(|_| ())
    }

    fn welcome(&self) -> Reply {
        Reply::Welcome {
            node: self.id,
            store_socket: self.store_socket.display().to_string(),
            session_dir: self.config.session_dir.display().to_string(),
            head: self.config.head.clone(),
        }
    }

    fn hello(&self, conn: &Conn, hello: Hello, responder: Responder) {
        let token = match &hello {
            Hello::Driver { token, .. }
            | Hello::Worker { token, .. }
            | Hello::Peer { token, .. } => token,
        };
        if !crate::cluster::token_matches(token, &self.config.token) {
            responder.respond(Err(Error::Unauthenticated("wrong cluster token".into())));
            conn.close_after_flush();
            return;
        }
        let mut state = self.state.lock();
        state.conns.insert(conn.id(), conn.clone());
        if let Hello::Worker {
            address,
            build_hash,
            ..
        } = hello
        {
            let expected = state
                .workers
                .get(&address.worker)
                .and_then(|w| state.jobs.get(&w.job))
                .map(|j| j.spec.build_hash.clone());
            match expected {
                None => {
                    drop(state);
                    responder.respond(Err(Error::BadRequest(
                        "this node did not start that worker".into(),
                    )));
                    conn.close_after_flush();
                    return;
                }
                Some(expected) if expected != build_hash => {
                    drop(state);
                    responder.respond(Err(Error::BuildMismatch {
                        expected,
                        found: build_hash,
                    }));
                    conn.close_after_flush();
                    return;
                }
                Some(_) => {
                    conn.set_authenticated();
                    if let Some(w) = state.workers.get_mut(&address.worker) {
                        w.conn = Some(conn.clone());
                        w.address = Some(Address {
                            node: self.id,
                            ..address
                        });
                    }
                }
            }
            drop(state);
            responder.respond(Ok(self.welcome()));
            return;
        }
        drop(state);
        conn.set_authenticated();
        responder.respond(Ok(self.welcome()));
    }

    fn worker_ready(&self, conn: &Conn) {
        {
            let mut state = self.state.lock();
            if let Some(w) = state
                .workers
                .values_mut()
                .find(|w| w.conn.as_ref().is_some_and(|c| c.id() == conn.id()))
            {
                if matches!(w.state, WorkerState::Starting) {
                    w.state = WorkerState::Idle;
                }
            }
        }
        self.dispatch();
    }

    fn register_job(&self, conn: &Conn, spec: JobSpec) -> Result<()> {
        let stamp = self.hashes.check(&spec)?;
        let job = spec.job;
        {
            let mut state = self.state.lock();
            let driver = match state.jobs.get(&job) {
                Some(existing) => existing.driver,
                None => Some(conn.id()),
            };
            state.jobs.insert(
                job,
                JobEntry {
                    spec,
                    driver,
                    stamp,
                },
            );
        }
        self.top_up(job);
        Ok(())
    }

    /// Registers a job started elsewhere (its driver runs on another node),
    /// from what the head knows of it, so this node can start its workers.
    async fn adopt_job(&self, job: JobId) -> Result<()> {
        let jobs = self.head.list_jobs().await?;
        let record = jobs
            .into_iter()
            .find(|j| j.info.job_id == job && !j.finished)
            .ok_or_else(|| Error::BadRequest(format!("job {job} is unknown or finished")))?;
        let mut spec = JobSpec {
            job,
            exe: record.info.exe_path.display().to_string(),
            build_hash: record.info.build_hash.clone(),
            driver: crate::actor::parse_address(&record.info.driver_address)
                .ok_or_else(|| Error::BadRequest(format!("job {job} has no driver address")))?,
            env: Vec::new(),
        };
        let stamp = match self.hashes.check(&spec) {
            Ok(stamp) => stamp,
            Err(missing) if spec.driver.node != self.id => {
                tracing::info!(
                    "job {job}: {missing}; fetching its binary from node {}",
                    spec.driver.node
                );
                let name = record
                    .info
                    .exe_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let source = self.node_client(spec.driver.node).await?;
                let path = self
                    .binaries
                    .obtain(job, &spec.build_hash, &name, &source)
                    .await?;
                spec.exe = path.display().to_string();
                self.hashes.check(&spec)?
            }
            Err(e) => return Err(e),
        };
        self.state.lock().jobs.entry(job).or_insert(JobEntry {
            spec,
            driver: None,
            stamp,
        });
        Ok(())
    }

    /// The file of a job this node runs whose binary has build hash
    /// `hash`, checked on disk now (it may have been rebuilt since).
    pub(crate) fn binary_of_build(&self, hash: &str) -> Option<PathBuf> {
        let candidates: Vec<String> = self
            .state
            .lock()
            .jobs
            .values()
            .filter(|j| j.spec.build_hash == hash)
            .map(|j| j.spec.exe.clone())
            .collect();
        candidates
            .into_iter()
            .map(PathBuf::from)
            .find(|path| self.hashes.of(path).is_ok_and(|(found, _)| found == hash))
    }

    /// Starts workers until the job has its warm pool.
    fn top_up(&self, job: JobId) {
        let (want, spec, stamp) = {
            let state = self.state.lock();
            let Some(entry) = state.jobs.get(&job) else {
                return;
            };
            let spare = state
                .workers
                .values()
                .filter(|w| {
                    w.job == job && matches!(w.state, WorkerState::Idle | WorkerState::Starting)
                })
                .count();
            let waiting = state.queue.iter().filter(|w| w.request.job == job).count();
            let want = (self.config.warm_workers + waiting).saturating_sub(spare);
            (want, entry.spec.clone(), entry.stamp.clone())
        };
        for _ in 0..want {
            if let Err(e) = self.start_worker(&spec, &stamp) {
                tracing::error!("cannot start a worker for job {job}: {e}");
                self.fail_waiting(job, e);
                return;
            }
        }
    }

    fn start_worker(&self, spec: &JobSpec, stamp: &str) -> Result<()> {
        let fresh = self.hashes.check(spec)?;
        if fresh != stamp {
            if let Some(j) = self.state.lock().jobs.get_mut(&spec.job) {
                j.stamp = fresh.clone();
            }
        }
        let worker = WorkerId::random();
        let config = WorkerConfig {
            node_socket: self.control_socket.clone(),
            token: self.config.token.clone(),
            job: spec.job,
            worker,
            session_dir: self.config.session_dir.clone(),
            exe_stamp: fresh,
            build_hash: spec.build_hash.clone(),
            direct_ip: self.direct_ip,
        };
        let log = self
            .control_socket
            .with_file_name("logs")
            .join(format!("worker-{}.log", &worker.to_string()[..8]));
        let mut child = spawn_worker(spec, &config, &log)?;
        let pid = child.id().unwrap_or(0);
        self.state.lock().workers.insert(
            worker,
            WorkerEntry {
                pid,
                job: spec.job,
                conn: None,
                address: None,
                state: WorkerState::Starting,
                actor: None,
                detached: false,
            },
        );
        let node = self.self_ref.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Some(node) = node.upgrade() {
                node.worker_exited(worker, status.ok());
            }
        });
        Ok(())
    }

    fn fail_waiting(&self, job: JobId, e: Error) {
        let failed: Vec<Waiting> = {
            let mut state = self.state.lock();
            let (fail, keep): (Vec<_>, Vec<_>) =
                state.queue.drain(..).partition(|w| w.request.job == job);
            state.queue = keep.into();
            fail
        };
        for w in failed {
            w.responder.respond(Err(e.clone()));
        }
    }

    fn request_lease(&self, conn: &Conn, request: LeaseRequest, responder: Responder) {
        let feasible = self.state.lock().ledger.feasible(&request);
        match feasible {
            Err(e) => responder.respond(Err(e)),
            Ok(false) if request.strict_node => responder.respond(Err(Error::Infeasible(format!(
                "{} on node {} (it has {})",
                request.resources,
                self.id,
                self.state.lock().ledger.total
            )))),
            Ok(false) => {
                let Some(node) = self.arc() else { return };
                tokio::spawn(async move {
                    let options = PickNodeOptions {
                        resources: request.resources.0.clone(),
                        exclude: vec![node.id],
                        ..Default::default()
                    };
                    let picked = node.head.pick_node(&options).await;
                    responder.respond(picked.map(|n| Reply::Spillback {
                        node: n.node_id,
                        endpoint: n.control,
                    }));
                });
            }
            Ok(true) => {
                let job = request.job;
                let known = self.state.lock().jobs.contains_key(&job);
                if !known {
                    let Some(node) = self.arc() else { return };
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        match node.adopt_job(job).await {
                            Ok(()) => node.request_lease(&conn, request, responder),
                            Err(e) => responder.respond(Err(e)),
                        }
                    });
                    return;
                }
                self.state.lock().queue.push_back(Waiting {
                    request,
                    responder,
                    holder: conn.id(),
                });
                self.dispatch();
                self.top_up(job);
            }
        }
    }

    /// Grants waiting leases, in order, while resources and idle workers
    /// allow.
    fn dispatch(&self) {
        let mut grants = Vec::new();
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let mut i = 0;
            while i < state.queue.len() {
                let job = state.queue[i].request.job;
                let idle = state
                    .workers
                    .iter()
                    .find(|(_, w)| {
                        w.job == job && matches!(w.state, WorkerState::Idle) && w.conn.is_some()
                    })
                    .map(|(id, _)| *id);
                let Some(worker) = idle else {
                    i += 1;
                    continue;
                };
                let Some(pool) = state.ledger.try_acquire(&state.queue[i].request) else {
                    i += 1;
                    continue;
                };
                let Some(waiting) = state.queue.remove(i) else {
                    break;
                };
                let lease = state.next_lease;
                state.next_lease += 1;
                let Some(w) = state.workers.get_mut(&worker) else {
                    continue;
                };
                w.state = WorkerState::Leased(lease);
                w.actor = waiting.request.actor;
                w.detached = waiting.request.detached;
                let Some(address) = w.address.clone() else {
                    continue;
                };
                state.leases.insert(
                    lease,
                    LeaseEntry {
                        worker,
                        resources: waiting.request.resources.clone(),
                        pool,
                        holder: waiting.holder,
                    },
                );
                grants.push((
                    waiting.responder,
                    Lease {
                        lease,
                        worker: address,
                    },
                ));
            }
            if !state.queue.is_empty() {
                let count = |f: fn(&WorkerState) -> bool| {
                    state.workers.values().filter(|w| f(&w.state)).count()
                };
                tracing::debug!(
                    waiting = state.queue.len(),
                    available = %state.ledger.available,
                    idle = count(|s| matches!(s, WorkerState::Idle)),
                    starting = count(|s| matches!(s, WorkerState::Starting)),
                    leased = count(|s| matches!(s, WorkerState::Leased(_))),
                    "leases waiting"
                );
            }
        }
        let granted = !grants.is_empty();
        for (responder, lease) in &grants {
            let _ = responder;
            tracing::debug!(
                lease = lease.lease,
                worker = lease.worker.pid,
                "lease granted"
            );
        }
        for (responder, lease) in grants {
            responder.respond(Ok(Reply::Leased(lease)));
        }
        if granted {
            let jobs: Vec<JobId> = self.state.lock().jobs.keys().copied().collect();
            for job in jobs {
                self.top_up(job);
            }
        }
    }

    fn return_lease(&self, lease: u64, kill: bool) {
        let victim = {
            let mut state = self.state.lock();
            let Some(entry) = state.leases.remove(&lease) else {
                return;
            };
            state.ledger.release(entry.pool, &entry.resources);
            tracing::debug!(lease, kill, available = %state.ledger.available, "lease returned");
            match state.workers.get_mut(&entry.worker) {
                Some(w) if kill || w.actor.is_some() => Some(w.pid),
                Some(w) => {
                    w.state = WorkerState::Idle;
                    None
                }
                None => None,
            }
        };
        if let Some(pid) = victim {
            kill_pid(pid);
        }
        self.released.notify_waiters();
        self.dispatch();
    }

    fn worker_exited(&self, worker: WorkerId, status: Option<std::process::ExitStatus>) {
        let (job, conn) = {
            let mut state = self.state.lock();
            let Some(entry) = state.workers.remove(&worker) else {
                return;
            };
            tracing::debug!("worker pid {} exited: {status:?}", entry.pid);
            if let WorkerState::Leased(lease) = entry.state {
                if let Some(l) = state.leases.remove(&lease) {
                    state.ledger.release(l.pool, &l.resources);
                }
            }
            (entry.job, entry.conn)
        };
        if let Some(conn) = conn {
            conn.close();
        }
        self.released.notify_waiters();
        self.dispatch();
        if self.state.lock().jobs.contains_key(&job) {
            self.top_up(job);
        }
    }

    fn conn_closed(&self, conn: u64) {
        let (finished, leases) = {
            let mut state = self.state.lock();
            state.conns.remove(&conn);
            let finished: Vec<JobId> = state
                .jobs
                .iter()
                .filter(|(_, j)| j.driver == Some(conn))
                .map(|(id, _)| *id)
                .collect();
            let leases: Vec<u64> = state
                .leases
                .iter()
                .filter(|(_, l)| l.holder == conn)
                .map(|(id, _)| *id)
                .collect();
            state.queue.retain(|w| w.holder != conn);
            (finished, leases)
        };
        for lease in leases {
            let detached = {
                let state = self.state.lock();
                state
                    .leases
                    .get(&lease)
                    .and_then(|l| state.workers.get(&l.worker))
                    .is_some_and(|w| w.detached)
            };
            if !detached {
                self.return_lease(lease, true);
            }
        }
        for job in finished {
            self.finish_job(job);
            if let Some(node) = self.arc() {
                tokio::spawn(async move {
                    let _ = node.head.finish_job(job).await;
                });
            }
        }
    }

    /// Cleans up after a job: kills its workers (except those hosting
    /// detached actors), deletes its objects from this node's store and
    /// removes its scratch directory.
    pub(crate) fn finish_job(&self, job: JobId) {
        let victims: Vec<u32> = {
            let mut state = self.state.lock();
            state.jobs.remove(&job);
            self.binaries.release(job);
            state
                .workers
                .values()
                .filter(|w| w.job == job && !w.detached)
                .map(|w| w.pid)
                .collect()
        };
        for pid in victims {
            kill_pid(pid);
        }
        let tag = crate::core::job_tag(job);
        let deleted = self
            .store_handle
            .delete_where(|id| id.as_bytes()[..4] == tag);
        crate::session::remove_scratch_dir(&self.config.session_dir, job);
        tracing::debug!("job {job} finished: {deleted} objects deleted");
    }

    /// Kills the worker hosting an actor.
    pub(crate) fn kill_actor(&self, actor: ActorId) {
        let pid = {
            let state = self.state.lock();
            state
                .workers
                .values()
                .find(|w| w.actor == Some(actor))
                .map(|w| w.pid)
        };
        if let Some(pid) = pid {
            kill_pid(pid);
        }
    }

    /// Reserves placement-group bundles, waiting up to [`RESERVE_WAIT`] for
    /// leases to give the resources back when the node has them in total
    /// but not free now.
    pub(crate) async fn reserve_bundles(
        &self,
        pg: PlacementGroupId,
        bundles: Vec<(u32, Resources)>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + RESERVE_WAIT;
        loop {
            let released = self.released.notified();
            let attempt = {
                let mut state = self.state.lock();
                let mut need = Resources::new();
                for (_, r) in &bundles {
                    for (k, v) in &r.0 {
                        need.set(k, need.get(k) + v);
                    }
                }
                if !state.ledger.total.fits(&need) {
                    return Err(Error::Infeasible(format!(
                        "bundles {need} on a node with {} in total",
                        state.ledger.total
                    )));
                }
                state.ledger.reserve(pg, bundles.clone())
            };
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    pub(crate) fn release_bundles(&self, pg: PlacementGroupId) {
        self.state.lock().ledger.release_group(pg);
        self.dispatch();
    }

    fn kill_all_workers(&self) {
        let pids: Vec<u32> = self.state.lock().workers.values().map(|w| w.pid).collect();
        for pid in pids {
            kill_pid(pid);
        }
    }

    fn forward_log(&self, conn: &Conn, message: Message) {
        let state = self.state.lock();
        let job = state
            .workers
            .values()
            .find(|w| w.conn.as_ref().is_some_and(|c| c.id() == conn.id()))
            .map(|w| w.job);
        let driver = job
            .and_then(|j| state.jobs.get(&j))
            .and_then(|j| j.driver)
            .and_then(|d| state.conns.get(&d))
            .cloned();
        drop(state);
        if let Some(driver) = driver {
            driver.send(message);
        }
    }

    fn summary(&self) -> NodeSummary {
        let state = self.state.lock();
        NodeSummary {
            node: self.id,
            total: state.ledger.total.clone(),
            available: state.ledger.available.clone(),
            workers: state.workers.len() as u32,
            idle_workers: state
                .workers
                .values()
                .filter(|w| matches!(w.state, WorkerState::Idle))
                .count() as u32,
        }
    }

    async fn grpc_address_of(&self, node: NodeId) -> Result<String> {
        if let Some(a) = self.state.lock().grpc_addresses.get(&node) {
            return Ok(a.clone());
        }
        let nodes = self.head.list_nodes().await?;
        let mut state = self.state.lock();
        for n in &nodes {
            state
                .grpc_addresses
                .insert(n.info.node_id, n.info.grpc_address.clone());
            state
                .object_planes
                .insert(n.info.node_id, n.info.object_plane.clone());
        }
        nodes
            .iter()
            .find(|n| n.info.node_id == node && n.alive)
            .map(|n| n.info.grpc_address.clone())
            .ok_or(Error::NodeDied(node))
    }

    async fn node_client(&self, node: NodeId) -> Result<NodeClient> {
        let address = self.grpc_address_of(node).await?;
        NodeClient::connect(&address, &self.config.token).await
    }

    /// Pulls an object into this node's store from one of `from`. Pulls
    /// of one object at once share one transfer: each caller returns when
    /// it ended, with its outcome.
    async fn pull(&self, id: ObjectId, from: Vec<NodeId>) -> Result<()> {
        if self.store_handle.contains(&id) {
            return Ok(());
        }
        let transfer = self.pulls.lock().entry(id).or_default().clone();
        let outcome = transfer
            .get_or_init(|| self.pull_once(id, from))
            .await
            .clone();
        {
            let mut pulls = self.pulls.lock();
            if pulls.get(&id).is_some_and(|t| Arc::ptr_eq(t, &transfer)) {
                pulls.remove(&id);
            }
        }
        outcome
    }

    async fn pull_once(&self, id: ObjectId, from: Vec<NodeId>) -> Result<()> {
        if self.store_handle.contains(&id) {
            return Ok(());
        }
        let mut last = Error::ObjectLost(id);
        for source in from {
            if source == self.id {
                continue;
            }
            // Over the source's object plane when it has one.
            let grpc = self.grpc_address_of(source).await;
            let plane = self.state.lock().object_planes.get(&source).cloned();
            if let (Ok(_), Some(plane)) = (&grpc, plane.filter(|p| !p.is_empty())) {
                match object_plane::pull(&plane, &self.config.token, id, &self.store).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::warn!("pulling {id} from {source}: {e}");
                        last = match e.into() {
                            Error::Unreachable { .. } => Error::ObjectLost(id),
                            other => other,
                        };
                        continue;
                    }
                }
            }
            let client = match self.node_client(source).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("pulling {id}: node {source} unreachable: {e}");
                    last = Error::ObjectLost(id);
                    continue;
                }
            };
            match crate::rpc::transfer::pull_into(&client, id, &self.store).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!("pulling {id} from {source}: {e}");
                    last = e.into();
                    if matches!(last, Error::Unreachable { .. }) {
                        last = Error::ObjectLost(id);
                    }
                }
            }
        }
        Err(last)
    }

    /// Deletes objects here and on the other nodes holding them.
    async fn free(&self, list: Vec<(ObjectId, Vec<NodeId>)>) {
        let mut remote: HashMap<NodeId, Vec<ObjectId>> = HashMap::new();
        let mut local = Vec::new();
        for (id, nodes) in list {
            for n in nodes {
                if n == self.id {
                    local.push(id);
                } else {
                    remote.entry(n).or_default().push(id);
                }
            }
        }
        if !local.is_empty() {
            let store = self.store_handle.clone();
            store.delete_many(&local);
        }
        for (node, ids) in remote {
            match self.node_client(node).await {
                Ok(client) => {
                    if let Err(e) = client.free_objects(&ids).await {
                        tracing::debug!("freeing on {node}: {e}");
                    }
                }
                Err(e) => tracing::debug!("freeing on {node}: {e}"),
            }
        }
    }

    /// Deletes objects from this node's store.
    pub(crate) fn free_local(&self, ids: &[ObjectId]) {
        self.store_handle.delete_many(ids);
    }
}

fn kill_pid(pid: u32) {
    if pid == 0 {
        return;
    }
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// The address other nodes reach a listener on: the bound one, or, for a
/// listener on every interface, the local address that routes to the head
/// (when the head is not on loopback), else this machine's outbound
/// address, else loopback.
fn advertised(bound: std::net::SocketAddr, head: &str) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let route = |target: SocketAddr| -> Option<IpAddr> {
        let any: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any).ok()?;
        socket.connect(target).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    };
    let via_head = head
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .filter(|a| !a.ip().is_loopback() && !a.ip().is_unspecified())
        .and_then(route);
    let outbound = || {
        let probe: SocketAddr = if bound.is_ipv4() {
            (Ipv4Addr::new(192, 0, 2, 1), 9).into()
        } else {
            (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into()
        };
        route(probe)
    };
    let loopback = if bound.is_ipv4() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    };
    let ip = via_head.or_else(outbound).unwrap_or(loopback);
    SocketAddr::new(ip, bound.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod advertise_tests {
    use super::advertised;
    use std::net::SocketAddr;

    #[test]
    fn a_bound_address_is_advertised_as_is() {
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised(a, "127.0.0.1:1"), a);
    }

    #[test]
    fn every_interface_is_advertised_as_a_concrete_address() {
        let a: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let got = advertised(a, "127.0.0.1:1");
        assert!(!got.ip().is_unspecified());
        assert_eq!(got.port(), 4000);
    }
}
