//! The node daemon: it embeds the node's object store, schedules leases on
//! its resources (`scheduler`), starts and reaps worker processes
//! (`worker_pool`, `binaries`), moves objects to and from other nodes
//! (`object_plane`, `service`), and cleans up after jobs. This file
//! holds its state, its start-up, its control plane and its heartbeat.
//! Local processes talk to it over a Unix socket, processes on other hosts
//! over TCP (leases only); the head and other nodes over gRPC.

mod binaries;
mod http;
pub use http::WorkerLog;
mod metrics;
mod object_plane;
pub(crate) mod scheduler;
mod service;
pub mod worker_pool;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::ids::{ActorId, JobId, NodeId, WorkerId};
use crate::resources::{Resources, CPU, MEMORY};
use crate::rpc::{HeadClient, NodeHeartbeat, NodeInfo};
use crate::wire::messages::{Hello, JobSpec, LeaseRequest, NodeSummary};
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
use worker_pool::{kill_pid, BuildHashes};

/// How long a placement-group reservation waits for leased resources to
/// come back.
const RESERVE_WAIT: Duration = Duration::from_secs(8);

/// How often a node reports to the head when nothing changes.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// How often a node looks for a change in what it has free (reported to
/// the head at once) and for waiting leases another node could take.
const RESOURCE_REPORT: Duration = Duration::from_millis(100);

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
    /// Port of its `/metrics` endpoint, on the gRPC address's IP (0: any
    /// free port).
    pub metrics_port: u16,
    /// The file its own output goes to, if any (served by `braid logs
    /// --node`).
    pub log_file: Option<PathBuf>,
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
    /// Nodes the head declared dead, as this node heard.
    dead_nodes: std::collections::HashSet<NodeId>,
    /// The node of each process on another host connected to this one.
    peer_nodes: HashMap<u64, NodeId>,
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
    /// Until when the head is known to have no other node with room (it
    /// said so last time): leases stay here without asking again.
    no_room_until: Mutex<Option<tokio::time::Instant>>,
    /// What its processes report of their tasks and calls.
    figures: Mutex<metrics::ProcessFigures>,
    /// The spans of the tasks and calls its processes ran.
    spans: Mutex<crate::telemetry::spans::SpanLog>,
    /// Its workers' logs, live and recent.
    worker_logs: Mutex<http::WorkerLogs>,
    /// Objects moved to and from other nodes.
    transfers: Arc<metrics::Transfers>,
    /// Where its `/metrics` is served (`host:port`).
    metrics_address: String,
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
    /// Where its `/metrics` is served (`host:port`).
    pub metrics_address: String,
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

    let metrics_listen = SocketAddr::new(config.grpc_listen.ip(), config.metrics_port);
    let metrics_source: Arc<Mutex<Weak<Node>>> = Arc::new(Mutex::new(Weak::new()));
    let metrics_server = crate::telemetry::http::serve(
        metrics_listen,
        http::router(&config.token, metrics_source.clone()),
    )
    .await
    .map_err(|e| Error::io("serve /metrics", e))?;
    let metrics_address = advertised(metrics_server.local_addr, &config.head).to_string();
    let head = HeadClient::connect(&config.head, &config.token).await?;
    let mut total = config.resources.clone();
    total.set(CPU, config.num_cpus);
    total.set(MEMORY, crate::cluster::physical_memory() as f64 * 0.7);
    let _ = std::fs::remove_file(&control_socket);
    let listener = braid_store::socket_path::SocketPath::new(&control_socket)
        .and_then(|short| tokio::net::UnixListener::bind(short.as_path()))
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
            dead_nodes: std::collections::HashSet::new(),
            peer_nodes: HashMap::new(),
        }),
        hashes: BuildHashes::default(),
        pulls: Mutex::new(HashMap::new()),
        binaries: binaries::BinaryCache::new(dir.join("binaries")),
        released: tokio::sync::Notify::new(),
        no_room_until: Mutex::new(None),
        figures: Mutex::new(metrics::ProcessFigures::default()),
        spans: Mutex::new(crate::telemetry::spans::SpanLog::default()),
        worker_logs: Mutex::new(http::WorkerLogs::default()),
        transfers: Arc::new(metrics::Transfers::default()),
        metrics_address: metrics_address.clone(),
        config,
        self_ref: weak.clone(),
    });
    *metrics_source.lock() = Arc::downgrade(&node);
    tokio::spawn(object_plane::serve(
        plane_listener,
        node.config.token.clone(),
        node.store.clone(),
        node.transfers.clone(),
    ));
    let grpc_stop = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(service::serve(node.clone(), grpc_listener, grpc_stop.1));
    node.register().await?;
    tokio::spawn(heartbeat_loop(Arc::downgrade(&node)));
    tokio::spawn(watch_loop(Arc::downgrade(&node)));
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
    tracing::info!(
        node = %id,
        head = %node.config.head,
        grpc = %grpc_address,
        "node joined the cluster"
    );
    ready(&NodeReady {
        node: id,
        control_socket,
        grpc_address,
        metrics_address,
    });
    shutdown.await;
    drop(metrics_server);
    let _ = grpc_stop.0.send(());
    let _ = node.head.unregister_node(id).await;
    node.kill_all_workers();
    store_handle.shutdown();
    let _ = std::fs::remove_file(&node.control_socket);
    Ok(())
}

/// Reports the node to the head: every [`HEARTBEAT`], and within
/// [`RESOURCE_REPORT`] of a change in what it has free, so the head's
/// picks follow the cluster's load; moves waiting leases meanwhile.
async fn heartbeat_loop(node: Weak<Node>) {
    let mut tick = tokio::time::interval(RESOURCE_REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Resources, tokio::time::Instant)> = None;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let (available, workers, waiting) = {
            let s = node.state.lock();
            (s.uncommitted(), s.workers.len() as u32, !s.queue.is_empty())
        };
        if waiting {
            node.rebalance().await;
        }
        let due = last
            .as_ref()
            .is_none_or(|(before, at)| *before != available || at.elapsed() >= HEARTBEAT);
        if !due {
            continue;
        }
        last = Some((available.clone(), tokio::time::Instant::now()));
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

/// How long a node waits before watching the head again after its watch
/// stream ended (the head restarting, or not reached).
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// Watches the head's events for as long as the node lives, passing node
/// deaths on to every process connected to this node.
async fn watch_loop(node: Weak<Node>) {
    use futures::StreamExt;
    loop {
        let stream = {
            let Some(node) = node.upgrade() else { return };
            let head = node.head.clone();
            let id = node.id;
            drop(node);
            head.watch(id).await
        };
        match stream {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let Some(node) = node.upgrade() else { return };
                    match event {
                        Ok(dead) => node.nodes_died(&dead),
                        Err(e) => {
                            tracing::debug!("watching the head: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("cannot watch the head: {e}"),
        }
        tokio::time::sleep(WATCH_RETRY).await;
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
            Message::Metrics(snapshot) => node.figures.lock().report(conn.id(), snapshot),
            Message::Spans(spans) => node.spans.lock().add(spans),
            _ => {}
        }
    }

    fn on_close(&self, conn: &Conn) {
        if let Some(node) = self.node.upgrade() {
            node.figures.lock().closed(conn.id());
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
                metrics_address: self.metrics_address.clone(),
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
        if let Hello::Peer { address, .. } = &hello {
            state.peer_nodes.insert(conn.id(), address.node);
        }
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

    fn conn_closed(&self, conn: u64) {
        let (finished, leases) = {
            let mut state = self.state.lock();
            state.conns.remove(&conn);
            state.peer_nodes.remove(&conn);
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

    /// Other nodes the head declared dead: every process of this node
    /// hears of each once.
    /// Connections from processes there close, so leases they hold end
    /// even when the host froze rather than closed them.
    fn nodes_died(&self, dead: &[NodeId]) {
        let (fresh, conns, orphaned) = {
            let mut state = self.state.lock();
            let fresh: Vec<NodeId> = dead
                .iter()
                .copied()
                .filter(|n| *n != self.id && state.dead_nodes.insert(*n))
                .collect();
            let orphaned: Vec<Conn> = state
                .peer_nodes
                .iter()
                .filter(|(_, n)| fresh.contains(n))
                .filter_map(|(c, _)| state.conns.get(c).cloned())
                .collect();
            let conns: Vec<Conn> = state.conns.values().cloned().collect();
            (fresh, conns, orphaned)
        };
        for conn in orphaned {
            conn.close();
        }
        for n in fresh {
            tracing::info!(node = %n, "node declared dead");
            for conn in &conns {
                conn.send(Message::NodeDied(n));
            }
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
