//! Finding and mapping objects: where a reference's value is (asking its
//! owner when this process does not own it), and its bytes, mapped from
//! this node's store after pulling them from another node when needed.
//! [`Core`](crate::core::Core) owns one [`Objects`] and hands it to the
//! submitter, the executor, actors and the user's runtime.

use crate::address::Address;
use crate::error::{Error, Result};
use crate::ids::NodeId;
use crate::peers::Peers;
use crate::refs::{RefTable, ValueState};
use crate::wire::messages::ObjectStatus;
use crate::wire::{Conn, Message, Reply};
use braid_store::{GetError, ObjectId, ObjectView, StoreClient};
use std::sync::Arc;
use std::time::Duration;

/// How long a get waits on the local store for an object its owner
/// reported sealed.
const STORE_GET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lent object missing from this node's store is waited for.
const LENT_GET_TIMEOUT: Duration = Duration::from_secs(1);

/// Stored objects up to this size stay mapped and pinned while referenced,
/// so repeated gets are answered in process.
const CACHED_VIEW_LIMIT: usize = 64 * 1024;

/// Object resolution and fetching for one process.
pub(crate) struct Objects {
    me: Arc<Address>,
    node_id: NodeId,
    node: Conn,
    store: Arc<StoreClient>,
    refs: Arc<RefTable>,
    peers: Arc<Peers>,
    rebuilder: crate::lineage::RebuilderSlot,
}

impl Objects {
    pub(crate) fn new(
        me: Arc<Address>,
        node_id: NodeId,
        node: Conn,
        store: Arc<StoreClient>,
        refs: Arc<RefTable>,
        peers: Arc<Peers>,
        rebuilder: crate::lineage::RebuilderSlot,
    ) -> Objects {
        Objects {
            me,
            node_id,
            node,
            store,
            refs,
            peers,
            rebuilder,
        }
    }

    /// The status of an object this process owns, once it is ready.
    pub(crate) async fn status(&self, id: ObjectId) -> Result<ObjectStatus> {
        let rx = self.refs.wait_ready(id).ok_or(Error::lost(id))?;
        let state = rx.await.map_err(|_| Error::lost(id))?;
        match state {
            ValueState::Inline(bytes) => Ok(ObjectStatus::Inline(bytes.to_vec())),
            ValueState::Stored(nodes) => Ok(ObjectStatus::Stored(nodes)),
            ValueState::Failed(e) => Err(e),
            ValueState::Pending => Err(Error::lost(id)),
        }
    }

    /// Waits until the object behind `handle` is ready and says where its
    /// value is.
    pub(crate) async fn resolve(&self, id: ObjectId, owner: &Address) -> Result<ValueState> {
        if owner.worker == self.me.worker {
            let rx = self.refs.wait_ready(id).ok_or(Error::lost(id))?;
            return match rx.await.map_err(|_| Error::lost(id))? {
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
        let owner_gone = |e: Error| {
            Error::lost_because(id, format!("its owner (pid {}) is gone: {e}", owner.pid))
        };
        let conn = self.peers.to(owner).await.map_err(owner_gone)?;
        let state = match conn.request(Message::GetObject(id)).await {
            Ok(Reply::Object(ObjectStatus::Inline(bytes))) => ValueState::Inline(bytes.into()),
            Ok(Reply::Object(ObjectStatus::Stored(nodes))) => ValueState::Stored(nodes),
            Ok(_) => return Err(Error::BadRequest("owner answered oddly".into())),
            Err(e @ Error::Unreachable { .. }) => return Err(owner_gone(e)),
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
            | Err(GetError::Deleted(_)) => Err(Error::lost(id)),
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
                Err(Error::ObjectLost { .. }) | Err(Error::NodeDied(_)) => {
                    return Err(Error::lost(id))
                }
                Err(e) => return Err(e),
            }
            if owner.worker == self.me.worker {
                self.refs.add_location(id, self.node_id);
            } else if let Ok(conn) = self.peers.to(owner).await {
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
            | Err(GetError::Deleted(_)) => Err(Error::lost(id)),
            Err(e) => Err(Error::io("store get", e)),
        }
    }

    /// The encoded bytes of a ready object, wherever they are. An object
    /// this process owns whose copies cannot be read is rebuilt from its
    /// lineage, when it has one, and waited for.
    pub(crate) async fn fetch_bytes(&self, id: ObjectId, owner: &Address) -> Result<ObjectBytes> {
        loop {
            match self.resolve(id, owner).await? {
                ValueState::Inline(bytes) => return Ok(ObjectBytes::Inline(bytes)),
                ValueState::Stored(nodes) => {
                    if let Some(view) = self.refs.cached_view(id) {
                        return Ok(ObjectBytes::Stored(view));
                    }
                    let view = match self.fetch_stored(id, &nodes, owner).await {
                        Ok(view) => view,
                        Err(Error::ObjectLost { .. })
                            if owner.worker == self.me.worker
                                && self.refs.mark_lost(id, &nodes) =>
                        {
                            match self.rebuilder.get() {
                                Some(r) => r.rebuild(vec![id]),
                                None => {
                                    self.refs.set_state(id, ValueState::Failed(Error::lost(id)))
                                }
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if view.len() <= CACHED_VIEW_LIMIT {
                        self.refs.cache_view(id, &view);
                    }
                    return Ok(ObjectBytes::Stored(view));
                }
                ValueState::Failed(e) => return Err(e),
                ValueState::Pending => return Err(Error::lost(id)),
            }
        }
    }
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
