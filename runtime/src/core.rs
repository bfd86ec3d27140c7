//! The per-process runtime every driver and worker runs: its address and
//! listener for direct calls, its connection to the node, its store client,
//! its reference table, the task submitter, actor clients, and (in workers)
//! the executor.

use crate::address::Address;
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::ids::{ActorId, JobId, NodeId, WorkerId};
use crate::refs::{RefEvent, RefTable, ValueState};
use crate::submit::Submitter;
use crate::wire::messages::{Hello, ObjectStatus};
use crate::wire::transport::{self, Listener, Route};
use crate::wire::{Conn, Endpoint, Handler, MachineId, Message, Reply, Responder};
use braid_store::{GetError, ObjectId, ObjectView, StoreClient};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};

/// How long a get waits on the local store for an object its owner
/// reported sealed.
const STORE_GET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lent object missing from this node's store is waited for.
const LENT_GET_TIMEOUT: Duration = Duration::from_secs(1);

/// Stored objects up to this size stay mapped and pinned while referenced,
/// so repeated gets are answered in process.
const CACHED_VIEW_LIMIT: usize = 64 * 1024;

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
    pub(crate) role: Role,
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
    peers: Mutex<HashMap<Route, Arc<OnceCell<Conn>>>>,
    pub(crate) submitter: Submitter,
    pub(crate) actors: Mutex<HashMap<ActorId, Arc<crate::actor::ActorClient>>>,
    pub(crate) executor: OnceCell<Arc<Executor>>,
    pub(crate) head: OnceCell<crate::rpc::HeadClient>,
    pub(crate) self_ref: Weak<Core>,
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
                    responder.respond(core2.object_status(id).await.map(Reply::Object));
                });
            }
            Message::PushTask(_) | Message::CreateActor(_) | Message::CallActor(_) => {
                match core.executor.get() {
                    Some(executor) => executor.on_request(message, responder),
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
                if let Some(executor) = core.executor.get() {
                    executor.cancel(task);
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
        let listener = tokio::net::UnixListener::bind(&socket)
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
        let core = Arc::new_cyclic(|weak| Core {
            me,
            role: config.role,
            job: config.job,
            token: config.token,
            node_id,
            node,
            store: Arc::new(store),
            refs,
            handle: tokio::runtime::Handle::current(),
            head_address: head,
            session_dir: PathBuf::from(session_dir),
            peers: Mutex::new(HashMap::new()),
            submitter: Submitter::new(weak.clone()),
            actors: Mutex::new(HashMap::new()),
            executor: OnceCell::new(),
            head: OnceCell::new(),
            self_ref: weak.clone(),
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
        Ok(core)
    }

    /// A connection to another braid process, opened on first use: over
    /// its socket and a ring on this machine, over TCP from another.
    pub(crate) async fn peer(&self, address: &Address) -> Result<Conn> {
        let route = address.endpoint.route()?;
        let cell = {
            let mut peers = self.peers.lock();
            let cell = peers.entry(route.clone()).or_default();
            if cell.get().is_some_and(Conn::is_closed) {
                *cell = Arc::new(OnceCell::new());
            }
            cell.clone()
        };
        let conn = cell
            .get_or_try_init(|| async {
                let handler: Arc<dyn Handler> = Arc::new(CoreHandler {
                    core: OnceCell::new_with(Some(self.self_ref.clone())),
                    token: self.token.clone(),
                    role: self.role,
                    peers: Mutex::new(HashMap::new()),
                });
                let hello = Message::Hello(Hello::Peer {
                    token: self.token.clone(),
                    address: (*self.me).clone(),
                });
                let (conn, _) = self
                    .handle
                    .spawn(async move {
                        let (conn, reply) = transport::dial(&route, hello, handler).await?;
                        if matches!(route, Route::Local(_)) {
                            if let Err(e) = conn.open_ring().await {
                                tracing::debug!(?conn, "staying on the socket: {e}");
                            }
                        }
                        Ok::<_, Error>((conn, reply))
                    })
                    .await
                    .map_err(|e| Error::io("connect", e))??;
                Ok::<Conn, Error>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// The head's client, connected on first use.
    pub(crate) async fn head(&self) -> Result<crate::rpc::HeadClient> {
        self.head
            .get_or_try_init(|| crate::rpc::HeadClient::connect(&self.head_address, &self.token))
            .await
            .cloned()
    }

    /// The status of an object this process owns, once it is ready.
    pub(crate) async fn object_status(&self, id: ObjectId) -> Result<ObjectStatus> {
        let rx = self.refs.wait_ready(id).ok_or(Error::ObjectLost(id))?;
        let state = rx.await.map_err(|_| Error::ObjectLost(id))?;
        match state {
            ValueState::Inline(bytes) => Ok(ObjectStatus::Inline(bytes.to_vec())),
            ValueState::Stored(nodes) => Ok(ObjectStatus::Stored(nodes)),
            ValueState::Failed(e) => Err(e),
            ValueState::Pending => Err(Error::ObjectLost(id)),
        }
    }

    /// Waits until the object behind `handle` is ready and says where its
    /// value is.
    pub(crate) async fn resolve(&self, id: ObjectId, owner: &Address) -> Result<ValueState> {
        if owner.worker == self.me.worker {
            let rx = self.refs.wait_ready(id).ok_or(Error::ObjectLost(id))?;
            return match rx.await.map_err(|_| Error::ObjectLost(id))? {
                ValueState::Failed(e) => Err(e),
                s => Ok(s),
            };
        }
        if let Some(state) = self.refs.state(id) {
            if !matches!(state, ValueState::Pending) {
                return match state {
                    ValueState::Failed(e) => Err(e),
                    s => Ok(s),
                };
            }
        }
        let conn = self.peer(owner).await.map_err(|_| Error::ObjectLost(id))?;
        let state = match conn.request(Message::GetObject(id)).await {
            Ok(Reply::Object(ObjectStatus::Inline(bytes))) => ValueState::Inline(bytes.into()),
            Ok(Reply::Object(ObjectStatus::Stored(nodes))) => ValueState::Stored(nodes),
            Ok(_) => return Err(Error::BadRequest("owner answered oddly".into())),
            Err(Error::Unreachable { .. }) => return Err(Error::ObjectLost(id)),
            Err(e) => return Err(e),
        };
        self.refs.cache_state(id, state.clone());
        Ok(state)
    }

    /// Maps an object its owner lent, pulling it from the owner's node
    /// first if that is another. The owner sealed it before lending it, but
    /// a small one is sealed by a one-way message the store may read after
    /// this process's get: a missing object is waited for briefly, then
    /// lost.
    pub(crate) async fn fetch_lent(&self, id: ObjectId, owner: &Address) -> Result<ObjectView> {
        if owner.node != self.node_id {
            return self.fetch_stored(id, &[owner.node], owner).await;
        }
        match self.store.get(id, LENT_GET_TIMEOUT) {
            Ok(view) => Ok(view),
            Err(GetError::Timeout { .. })
            | Err(GetError::Lost { .. })
            | Err(GetError::Deleted(_)) => Err(Error::ObjectLost(id)),
            Err(e) => Err(Error::io("store get", e)),
        }
    }

    /// Maps a stored object into this process, pulling it to this node
    /// first if it lives elsewhere.
    pub(crate) async fn fetch_stored(
        &self,
        id: ObjectId,
        nodes: &[NodeId],
        owner: &Address,
    ) -> Result<ObjectView> {
        if !nodes.contains(&self.node_id) {
            match self
                .node
                .request(Message::PullObject {
                    id,
                    from: nodes.to_vec(),
                })
                .await
            {
                Ok(_) => {}
                Err(Error::ObjectLost(_)) | Err(Error::NodeDied(_)) => {
                    return Err(Error::ObjectLost(id))
                }
                Err(e) => return Err(e),
            }
            if owner.worker == self.me.worker {
                self.refs.add_location(id, self.node_id);
            } else if let Ok(conn) = self.peer(owner).await {
                conn.send(Message::AddLocation {
                    id,
                    node: self.node_id,
                });
            }
        }
        let store = self.store.clone();
        let timeout = if nodes.contains(&self.node_id) {
            STORE_GET_TIMEOUT
        } else {
            Duration::from_secs(1)
        };
        match store.get(id, timeout) {
            Ok(view) => Ok(view),
            Err(GetError::Timeout { .. })
            | Err(GetError::Lost { .. })
            | Err(GetError::Deleted(_)) => Err(Error::ObjectLost(id)),
            Err(e) => Err(Error::io("store get", e)),
        }
    }

    /// The encoded bytes of a ready object, wherever they are.
    pub(crate) async fn fetch_bytes(&self, id: ObjectId, owner: &Address) -> Result<ObjectBytes> {
        match self.resolve(id, owner).await? {
            ValueState::Inline(bytes) => Ok(ObjectBytes::Inline(bytes)),
            ValueState::Stored(nodes) => {
                if let Some(view) = self.refs.cached_view(id) {
                    return Ok(ObjectBytes::Stored(view));
                }
                let view = self.fetch_stored(id, &nodes, owner).await?;
                if view.len() <= CACHED_VIEW_LIMIT {
                    self.refs.cache_view(id, &view);
                }
                Ok(ObjectBytes::Stored(view))
            }
            ValueState::Failed(e) => Err(e),
            ValueState::Pending => Err(Error::ObjectLost(id)),
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

/// A ready object's bytes: inline, or mapped from the store.
pub(crate) enum ObjectBytes {
    Inline(Arc<[u8]>),
    Stored(ObjectView),
}

impl ObjectBytes {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            ObjectBytes::Inline(b) => b,
            ObjectBytes::Stored(v) => v.as_bytes(),
        }
    }
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
                    if let Ok(conn) = core.peer(&owner).await {
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
