//! This process's connections to other braid processes and to other nodes'
//! control planes, opened on first use and kept by route: a Unix socket
//! (then a shared-memory ring) for a process on this machine, TCP for one
//! on another ([`crate::wire::transport`]). [`Core`](crate::core::Core)
//! owns one [`Peers`] and hands it to everyone who calls another process.

use crate::address::Address;
use crate::error::{Error, Result};
use crate::ids::NodeId;
use crate::wire::conn::NoHandler;
use crate::wire::messages::Hello;
use crate::wire::transport::{self, Route};
use crate::wire::{Conn, Endpoint, Handler, Message};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// Makes the handler for what a peer sends on a connection this process
/// opened (requests to this process, one-way messages).
pub(crate) type HandlerFactory = Box<dyn Fn() -> Arc<dyn Handler> + Send + Sync>;

/// A connection being opened or open, shared by everyone who wants it.
type Slot = Arc<OnceCell<Conn>>;

/// Connections to other processes, by route.
pub(crate) struct Peers {
    me: Arc<Address>,
    token: String,
    handle: tokio::runtime::Handle,
    handler: HandlerFactory,
    /// Connections by route, each with the node of the process it reaches.
    conns: Mutex<HashMap<Route, (NodeId, Slot)>>,
    /// Nodes the head declared dead: their processes are not dialed.
    dead: Mutex<std::collections::HashSet<NodeId>>,
}

impl Peers {
    /// Peers of the process at `me`, presenting `token`; connections run
    /// on `handle` and serve what arrives with handlers from `handler`.
    pub(crate) fn new(
        me: Arc<Address>,
        token: String,
        handle: tokio::runtime::Handle,
        handler: HandlerFactory,
    ) -> Peers {
        Peers {
            me,
            token,
            handle,
            handler,
            conns: Mutex::new(HashMap::new()),
            dead: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello::Peer {
            token: self.token.clone(),
            address: (*self.me).clone(),
        })
    }

    /// The connection to the process at `address`, opened on first use
    /// (again after it closed).
    pub(crate) async fn to(&self, address: &Address) -> Result<Conn> {
        if self.dead.lock().contains(&address.node) {
            return Err(Error::Unreachable {
                address: address.endpoint.to_string(),
                message: format!("its node {} died", address.node),
            });
        }
        let route = address.endpoint.route()?;
        let cell = {
            let mut conns = self.conns.lock();
            let (node, cell) = conns
                .entry(route.clone())
                .or_insert_with(|| (address.node, Arc::default()));
            if cell.get().is_some_and(Conn::is_closed) {
                *cell = Arc::new(OnceCell::new());
                *node = address.node;
            }
            cell.clone()
        };
        let conn = cell
            .get_or_try_init(|| async {
                let handler = (self.handler)();
                let hello = self.hello();
                // On the runtime's own threads: a connection outlives the
                // caller's task.
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

    /// Closes every connection to a process on `node` (the head declared
    /// it dead): calls waiting on them fail at once, and the next call to
    /// such a process dials again.
    pub(crate) fn close_node(&self, node: NodeId) {
        self.dead.lock().insert(node);
        let closing: Vec<Conn> = {
            let mut conns = self.conns.lock();
            let routes: Vec<Route> = conns
                .iter()
                .filter(|(_, (n, _))| *n == node)
                .map(|(r, _)| r.clone())
                .collect();
            routes
                .into_iter()
                .filter_map(|r| conns.remove(&r))
                .filter_map(|(_, cell)| cell.get().cloned())
                .collect()
        };
        for conn in closing {
            conn.close();
        }
    }

    /// A new connection to the control plane of another node at
    /// `endpoint` (for leases), which sends nothing this process serves.
    pub(crate) async fn node(&self, endpoint: &Endpoint) -> Result<Conn> {
        let (conn, _) =
            transport::dial(&endpoint.route()?, self.hello(), Arc::new(NoHandler)).await?;
        Ok(conn)
    }
}
