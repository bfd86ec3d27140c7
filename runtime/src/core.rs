//! The per-process runtime every driver and worker runs: its address and
//! listeners for direct calls, its connection to the node, its store
//! client, its reference table, its peers ([`crate::peers`]) and object
//! fetching ([`crate::objects`]). The layers above (the submitter, actor
//! clients, the executor, the user's `Runtime`) use a `Core`; it knows
//! none of them: calls addressed to this process go to whatever
//! [`Inbox`] the worker installed.

use crate::address::Address;
use crate::error::{Error, Result};
use crate::ids::{JobId, NodeId, TaskId, WorkerId};
use crate::objects::Objects;
use crate::peers::Peers;
use crate::refs::{RefEvent, RefTable};
use crate::wire::messages::Hello;
use crate::wire::transport::{self, Listener, Route};
use crate::wire::{Conn, Endpoint, Handler, MachineId, Message, Reply, Responder};
use braid_store::{ObjectId, StoreClient};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, OnceCell};

/// Whether this process is a driver or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The user's program.
    Driver,
    /// A worker the node started.
    Worker,
}

/// Everything a braid process needs to talk to the cluster.
pub struct Core {
    pub(crate) me: Arc<Address>,
    pub(crate) job: JobId,
    pub(crate) token: String,
    pub(crate) node_id: NodeId,
    pub(crate) node: Conn,
    pub(crate) store: Arc<StoreClient>,
    pub(crate) refs: Arc<RefTable>,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) head_address: String,
    /// The session directory, as the node names it (its scratch
    /// directories are the node's to remove).
    pub(crate) session_dir: PathBuf,
    /// Connections to other processes and nodes.
    pub(crate) peers: Arc<Peers>,
    /// Where objects are, and their bytes.
    pub(crate) objects: Objects,
    /// Where tasks and actor calls addressed to this process go (a
    /// worker's executor; drivers have none).
    pub(crate) inbox: OnceCell<Arc<dyn Inbox>>,
    /// Who rebuilds owned objects lost with their node (the runtime's task
    /// submitter, once it is up).
    pub(crate) rebuilder: crate::lineage::RebuilderSlot,
    pub(crate) head: OnceCell<crate::rpc::HeadClient>,
}

/// Serves the tasks and actor calls other processes send this one.
pub(crate) trait Inbox: Send + Sync {
    /// A `PushTask`, `CreateActor` or `CallActor`; answer it through
    /// `responder`.
    fn on_request(&self, message: Message, responder: Responder);
    /// The caller cancelled `task`.
    fn cancel(&self, task: TaskId);
    /// The caller cancelled `task` by force: a synchronous run of it ends
    /// with this process.
    fn cancel_force(&self, task: TaskId);
}

/// What [`Core::start`] needs.
pub(crate) struct CoreConfig {
    pub role: Role,
    pub job: JobId,
    pub worker: WorkerId,
    pub token: String,
    pub node_socket: PathBuf,
    pub session_dir: PathBuf,
    /// The address of this node's host that other hosts reach its
    /// processes on (loopback for a cluster on one machine).
    pub direct_ip: IpAddr,
}

/// Handles everything arriving on this process's connections.
pub(crate) struct CoreHandler {
    core: OnceCell<Weak<Core>>,
    token: String,
    role: Role,
    peers: Mutex<HashMap<u64, WorkerId>>,
}

impl CoreHandler {
    fn core(&self) -> Option<Arc<Core>> {
        self.core.get().and_then(Weak::upgrade)
    }
}

impl Handler for CoreHandler {
    fn on_request(&self, conn: &Conn, message: Message, responder: Responder) {
        if let Message::Hello(hello) = &message {
            let token = match hello {
                Hello::Driver { token, .. }
                | Hello::Worker { token, .. }
                | Hello::Peer { token, .. } => token,
            };
            if crate::cluster::token_matches(token, &self.token) {
                conn.set_authenticated();
                if let Hello::Peer { address, .. } = hello {
                    self.peers.lock().insert(conn.id(), address.worker);
                }
                responder.respond(Ok(Reply::Ok));
            } else {
                responder.respond(Err(Error::Unauthenticated("wrong cluster token".into())));
                conn.close_after_flush();
            }
            return;
        }
        let Some(core) = self.core() else {
            responder.respond(Err(Error::NotRunning("process is shutting down".into())));
            return;
        };
        match message {
            Message::GetObject(id) => {
                let core2 = core.clone();
                core.handle.spawn(async move {
                    responder.respond(core2.objects.status(id).await.map(Reply::Object));
                });
            }
            Message::PushTask(_) | Message::CreateActor(_) | Message::CallActor(_) => {
                match core.inbox.get() {
                    Some(inbox) => inbox.on_request(message, responder),
                    None => responder.respond(Err(Error::BadRequest(
                        "this process runs no tasks (it is a driver)".into(),
                    ))),
                }
            }
            other => responder.respond(Err(Error::BadRequest(format!(
                "unexpected request {}",
                crate::wire::conn::message_name(&other)
            )))),
        }
    }

    fn on_close(&self, conn: &Conn) {
        let peer = self.peers.lock().remove(&conn.id());
        if let (Some(worker), Some(core)) = (peer, self.core()) {
            core.refs.remove_dead_borrower(worker);
        }
    }

    fn on_message(&self, _conn: &Conn, message: Message) {
        let Some(core) = self.core() else { return };
        match message {
            Message::AddBorrower { id, borrower } => core.refs.add_borrower(id, borrower.worker),
            Message::RemoveBorrower { id, borrower } => core.refs.remove_borrower(id, borrower),
            Message::AddLocation { id, node } => core.refs.add_location(id, node),
            Message::Cancel(task) => {
                if let Some(inbox) = core.inbox.get() {
                    inbox.cancel(task);
                }
            }
            Message::CancelForce(task) => {
                if let Some(inbox) = core.inbox.get() {
                    inbox.cancel_force(task);
                }
            }
            Message::Log {
                pid,
                label,
                stderr,
                line,
            } => {
                use std::io::Write;
                if stderr {
                    let _ = writeln!(std::io::stderr().lock(), "({label} pid={pid}) {line}");
                } else {
                    let _ = writeln!(std::io::stdout().lock(), "({label} pid={pid}) {line}");
                }
            }
            Message::NodeDied(node) => {
                core.peers.close_node(node);
                let lost = core.refs.node_died(node);
                if !lost.is_empty() {
                    tracing::info!(%node, lost = lost.len(), "objects lost with their node");
                    core.rebuild(
                        lost,
                        &format!("its only copy was on node {node}, which died"),
                    );
                }
            }
            Message::Exit => {
                if self.role == Role::Worker {
                    std::process::exit(0);
                }
            }
            other => tracing::debug!("ignoring {}", crate::wire::conn::message_name(&other)),
        }
    }
}

impl Core {
    /// Brings the process's runtime up: binds its listeners (its socket,
    /// and TCP on its node's address), connects to its node (as a driver or
    /// a worker), and opens the store.
    pub(crate) async fn start(config: CoreConfig) -> Result<Arc<Core>> {
        let socket_dir = config.session_dir.join("sockets");
        // Not `create_dir_all`: a process still starting while its cluster
        // stops must not bring back the session directory just removed.
        match std::fs::create_dir(&socket_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "create socket directory {} (has the cluster stopped?)",
                        socket_dir.display()
                    ),
                    e,
                ))
            }
        }
        let socket = socket_dir.join(format!("{}.sock", config.worker));
        let _ = std::fs::remove_file(&socket);
        let listener = braid_store::socket_path::SocketPath::new(&socket)
            .and_then(|short| tokio::net::UnixListener::bind(short.as_path()))
            .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
        let (tcp_listener, tcp) = match Listener::bind_tcp(config.direct_ip).await {
            Ok(bound) => bound,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };

        let handler = Arc::new(CoreHandler {
            core: OnceCell::new(),
            token: config.token.clone(),
            role: config.role,
            peers: Mutex::new(HashMap::new()),
        });
        let mut me = Address {
            worker: config.worker,
            node: NodeId(0),
            endpoint: Endpoint {
                machine: MachineId::current().clone(),
                socket: socket.display().to_string(),
                tcp: Some(tcp.to_string()),
            },
            pid: std::process::id(),
        };
        let hello = match config.role {
            Role::Driver => Hello::Driver {
                token: config.token.clone(),
                address: me.clone(),
            },
            Role::Worker => Hello::Worker {
                token: config.token.clone(),
                address: me.clone(),
                build_hash: crate::registry::build_hash().to_string(),
            },
        };
        let (node, welcome) = match transport::dial(
            &Route::Local(config.node_socket.clone()),
            Message::Hello(hello),
            handler.clone(),
        )
        .await
        {
            Ok(connected) => connected,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        let Reply::Welcome {
            node: node_id,
            store_socket,
            session_dir,
            head,
        } = welcome
        else {
            return Err(Error::BadRequest("node answered hello oddly".into()));
        };
        me.node = node_id;
        let store = tokio::task::spawn_blocking(move || StoreClient::connect(&store_socket))
            .await
            .map_err(|e| Error::io("connect to store", e))?
            .map_err(|e| Error::io("connect to store", e))?;
        let me = crate::address::intern(me);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let refs = RefTable::install(me.clone(), events_tx);
        let store = Arc::new(store);
        let handle = tokio::runtime::Handle::current();
        let core = Arc::new_cyclic(|weak: &Weak<Core>| {
            let for_peers = weak.clone();
            let (token, role) = (config.token.clone(), config.role);
            let peers = Arc::new(Peers::new(
                me.clone(),
                config.token.clone(),
                handle.clone(),
                Box::new(move || -> Arc<dyn Handler> {
                    Arc::new(CoreHandler {
                        core: OnceCell::new_with(Some(for_peers.clone())),
                        token: token.clone(),
                        role,
                        peers: Mutex::new(HashMap::new()),
                    })
                }),
            ));
            let rebuilder = crate::lineage::RebuilderSlot::default();
            let objects = Objects::new(
                me.clone(),
                node_id,
                node.clone(),
                store.clone(),
                refs.clone(),
                peers.clone(),
                rebuilder.clone(),
            );
            Core {
                me,
                job: config.job,
                token: config.token,
                node_id,
                node,
                store,
                refs,
                handle,
                head_address: head,
                session_dir: PathBuf::from(session_dir),
                peers: peers.clone(),
                objects,
                inbox: OnceCell::new(),
                rebuilder,
                head: OnceCell::new(),
            }
        });
        let _ = handler.core.set(Arc::downgrade(&core));
        tokio::spawn(transport::serve(
            Listener::Local(listener),
            "peer",
            handler.clone(),
        ));
        tokio::spawn(transport::serve(tcp_listener, "peer", handler));
        // Frees run on their own thread: a task that never yields (a tight
        // loop of puts) must not hold back the frees its drops queued, which
        // tokio would run on that task's worker.
        let handle = tokio::runtime::Handle::current();
        let weak = Arc::downgrade(&core);
        std::thread::Builder::new()
            .name("braid-refs".into())
            .spawn(move || handle.block_on(ref_event_loop(weak, events_rx)))
            .map_err(|e| Error::io("spawn the reference thread", e))?;
        tokio::spawn(report_figures(Arc::downgrade(&core)));
        Ok(core)
    }

    /// The head's client, connected on first use.
    pub(crate) async fn head(&self) -> Result<crate::rpc::HeadClient> {
        self.head
            .get_or_try_init(|| crate::rpc::HeadClient::connect(&self.head_address, &self.token))
            .await
            .cloned()
    }

    /// Has lost owned objects (now `Pending`) rebuilt from their lineage;
    /// without a rebuilder (the runtime is not up) they fail with
    /// `ObjectLost` and `reason`.
    pub(crate) fn rebuild(&self, lost: Vec<ObjectId>, reason: &str) {
        match self.rebuilder.get() {
            Some(r) => r.rebuild(lost),
            None => {
                for id in lost {
                    self.refs.set_state(
                        id,
                        crate::refs::ValueState::Failed(Error::lost_because(id, reason)),
                    );
                }
            }
        }
    }

    /// A fresh object id tagged with this job, so the node can delete the
    /// job's objects when it ends.
    pub(crate) fn new_object_id(&self) -> ObjectId {
        job_object_id(self.job)
    }
}

/// A fresh object id whose first four bytes are the job's tag.
pub(crate) fn job_object_id(job: JobId) -> ObjectId {
    let mut bytes = *ObjectId::random().as_bytes();
    bytes[..4].copy_from_slice(&job_tag(job));
    ObjectId::from_bytes(bytes)
}

/// The four bytes every object id of `job` starts with.
pub(crate) fn job_tag(job: JobId) -> [u8; 4] {
    (job.0 as u32).to_le_bytes()
}

async fn ref_event_loop(core: Weak<Core>, mut events: mpsc::UnboundedReceiver<RefEvent>) {
    while let Some(first) = events.recv().await {
        let Some(core) = core.upgrade() else { return };
        let mut frees = Vec::new();
        let mut batch = vec![first];
        while let Ok(more) = events.try_recv() {
            batch.push(more);
        }
        for event in batch {
            match event {
                RefEvent::Free { id, nodes } => frees.push((id, nodes)),
                RefEvent::Unborrow { id, owner } => {
                    if let Ok(conn) = core.peers.to(&owner).await {
                        conn.send(Message::RemoveBorrower {
                            id,
                            borrower: core.me.worker,
                        });
                    }
                }
            }
        }
        if !frees.is_empty() {
            core.node.send(Message::FreeObjects(frees));
        }
    }
}

/// Spans per message to the node (a span is about 100 bytes).
const SPANS_PER_MESSAGE: usize = 10_000;

/// How often a process sends its node what its recorder counted.
const FIGURES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends the process's task and call figures to its node every
/// [`FIGURES_EVERY`] while they change, for the node's `/metrics`, and
/// the spans of what it ran since the last time.
async fn report_figures(core: std::sync::Weak<Core>) {
    use crate::telemetry::recorder::Snapshot;
    let mut last = Snapshot::default();
    let mut tick = tokio::time::interval(FIGURES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        if core.node.is_closed() {
            return;
        }
        let mut now = Snapshot::now();
        now.spans_dropped = crate::telemetry::spans::dropped();
        if now != last {
            core.node.send(crate::wire::Message::Metrics(now.clone()));
            last = now;
        }
        let mut spans = crate::telemetry::spans::take();
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(SPANS_PER_MESSAGE));
            core.node.send(crate::wire::Message::Spans(spans));
            spans = rest;
        }
    }
}
