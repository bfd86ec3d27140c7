//! Ownership and distributed reference counting (after Ray, NSDI'21).
//!
//! The process that creates an object owns it: it records the object's
//! value state (pending, inline bytes, in the stores of some nodes, or
//! failed), counts its own live references, and keeps the set of other
//! processes that borrow it. A borrower counts its own references and
//! tells the owner when it holds none. When the owner's count, its
//! in-flight uses and its borrowers are all gone, it frees the object on
//! every node holding a copy.
//!
//! Races are closed by who holds what while a reference is in flight: a
//! submitter keeps the references of a task's arguments until the task's
//! reply, which lists what the executor still borrows; the submitter
//! registers those borrows with their owners before letting its own go,
//! over the same ordered connection. Borrower counts are signed so that a
//! removal overtaking its addition does not free early.

use crate::address::Address;
use crate::error::Error;
use crate::ids::{NodeId, WorkerId};
use crate::object_ref::RefHandle;
use braid_store::ObjectId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tokio::sync::{mpsc, oneshot};

/// Where an object's value is.
#[derive(Debug, Clone)]
pub enum ValueState {
    /// Not computed yet.
    Pending,
    /// Small: the encoded bytes.
    Inline(Arc<[u8]>),
    /// In the stores of these nodes.
    Stored(Vec<NodeId>),
    /// The task producing it failed.
    Failed(Error),
}

/// Work for the process's runtime, produced when references are dropped.
#[derive(Debug)]
pub enum RefEvent {
    /// An owned object is unreferenced: delete its stored copies.
    Free {
        /// The object.
        id: ObjectId,
        /// Nodes whose stores hold a copy.
        nodes: Vec<NodeId>,
    },
    /// This process no longer borrows `id`: tell its owner.
    Unborrow {
        /// The object.
        id: ObjectId,
        /// Its owner.
        owner: Arc<Address>,
    },
}

struct Entry {
    owner: Arc<Address>,
    owned: bool,
    local: u32,
    borrowers: HashMap<WorkerId, i32>,
    registered: bool,
    state: ValueState,
    waiters: Vec<oneshot::Sender<ValueState>>,
    contained: Vec<Arc<RefHandle>>,
    view: Option<braid_store::ObjectView>,
}

impl Entry {
    fn new(owner: Arc<Address>, owned: bool) -> Entry {
        Entry {
            owner,
            owned,
            local: 0,
            borrowers: HashMap::new(),
            registered: false,
            state: ValueState::Pending,
            waiters: Vec::new(),
            contained: Vec::new(),
            view: None,
        }
    }

    fn releasable(&self) -> bool {
        self.local == 0 && self.borrowers.values().all(|c| *c == 0)
    }
}

/// This process's reference table.
pub struct RefTable {
    me: Arc<Address>,
    entries: Mutex<HashMap<ObjectId, Entry>>,
    events: mpsc::UnboundedSender<RefEvent>,
}

static GLOBAL: OnceLock<Arc<RefTable>> = OnceLock::new();

impl RefTable {
    /// Creates the process's table; events go to `events`. The first table
    /// created becomes the process-global one that deserialized references
    /// register with.
    pub fn install(me: Arc<Address>, events: mpsc::UnboundedSender<RefEvent>) -> Arc<RefTable> {
        let table = Arc::new(RefTable {
            me,
            entries: Mutex::new(HashMap::new()),
            events,
        });
        let _ = GLOBAL.set(table.clone());
        table
    }

    /// The process-global table, once the runtime is up.
    pub fn global() -> Option<Arc<RefTable>> {
        GLOBAL.get().cloned()
    }

    /// This process's address.
    pub fn me(&self) -> &Arc<Address> {
        &self.me
    }

    /// Counts a new local reference.
    pub(crate) fn add_local(&self, id: ObjectId, owner: &Arc<Address>) {
        let mut entries = self.entries.lock();
        let owned = owner.worker == self.me.worker;
        entries
            .entry(id)
            .or_insert_with(|| Entry::new(owner.clone(), owned))
            .local += 1;
    }

    /// Drops a local reference.
    pub(crate) fn remove_local(&self, id: ObjectId) {
        let released = {
            let mut entries = self.entries.lock();
            match entries.get_mut(&id) {
                Some(e) => {
                    e.local = e.local.saturating_sub(1);
                    self.release_if_done(&mut entries, id)
                }
                None => Vec::new(),
            }
        };
        drop(released);
    }

    /// Creates an owned object and its first reference.
    pub(crate) fn new_owned(&self, id: ObjectId, state: ValueState) -> Arc<RefHandle> {
        {
            let mut entries = self.entries.lock();
            let e = entries
                .entry(id)
                .or_insert_with(|| Entry::new(self.me.clone(), true));
            e.state = state;
        }
        RefHandle::new(id, self.me.clone())
    }

    /// Creates a reference to an object whose owner already counts this
    /// process as a borrower (someone registered it on our behalf).
    pub(crate) fn new_registered(&self, id: ObjectId, owner: Arc<Address>) -> Arc<RefHandle> {
        let handle = RefHandle::new(id, owner);
        if let Some(e) = self.entries.lock().get_mut(&id) {
            if e.registered && !e.owned {
                let owner = e.owner.clone();
                let _ = self.events.send(RefEvent::Unborrow { id, owner });
            }
            e.registered = true;
        }
        handle
    }

    /// Keeps `inner` alive as long as `id` is.
    pub(crate) fn set_contained(&self, id: ObjectId, inner: Vec<Arc<RefHandle>>) {
        let mut entries = self.entries.lock();
        if let Some(e) = entries.get_mut(&id) {
            e.contained = inner;
        }
    }

    /// Sets an object's value state and wakes whoever waits for it. If the
    /// object is no longer referenced, a stored value is freed at once.
    pub(crate) fn set_state(&self, id: ObjectId, state: ValueState) {
        let mut entries = self.entries.lock();
        match entries.get_mut(&id) {
            Some(e) => {
                for w in e.waiters.drain(..) {
                    let _ = w.send(state.clone());
                }
                e.state = state;
            }
            None => {
                if let ValueState::Stored(nodes) = state {
                    let _ = self.events.send(RefEvent::Free { id, nodes });
                }
            }
        }
    }

    /// A mapped view of the object kept from an earlier get.
    pub(crate) fn cached_view(&self, id: ObjectId) -> Option<braid_store::ObjectView> {
        self.entries.lock().get(&id).and_then(|e| e.view.clone())
    }

    /// Keeps a view of a small object mapped (and pinned) while this
    /// process references it, so later gets need no store round trip.
    pub(crate) fn cache_view(&self, id: ObjectId, view: &braid_store::ObjectView) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            e.view = Some(view.clone());
        }
    }

    /// Adds a node holding a copy of an owned object.
    pub(crate) fn add_location(&self, id: ObjectId, node: NodeId) {
        let mut entries = self.entries.lock();
        match entries.get_mut(&id) {
            Some(e) => {
                if let ValueState::Stored(nodes) = &mut e.state {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
            }
            None => {
                let _ = self.events.send(RefEvent::Free {
                    id,
                    nodes: vec![node],
                });
            }
        }
    }

    /// Node `node` died: it holds no copy of anything any more. An owned
    /// object left with no copy is `Pending` again and returned, for its
    /// lineage to rebuild or fail; a borrowed one forgets what its owner
    /// said, to ask again.
    pub(crate) fn node_died(&self, node: NodeId) -> Vec<ObjectId> {
        let mut lost = Vec::new();
        let mut entries = self.entries.lock();
        for (id, e) in entries.iter_mut() {
            let ValueState::Stored(nodes) = &mut e.state else {
                continue;
            };
            if !nodes.contains(&node) {
                continue;
            }
            nodes.retain(|n| *n != node);
            if !nodes.is_empty() {
                continue;
            }
            e.view = None;
            e.state = ValueState::Pending;
            if e.owned {
                lost.push(*id);
            }
        }
        lost
    }

    /// No copy of owned object `id` at `nodes` could be read: unless its
    /// state changed meanwhile, it is `Pending` again. True when this call
    /// made it so (the caller then has it rebuilt).
    pub(crate) fn mark_lost(&self, id: ObjectId, nodes: &[NodeId]) -> bool {
        let mut entries = self.entries.lock();
        let Some(e) = entries.get_mut(&id) else {
            return false;
        };
        match &e.state {
            ValueState::Stored(now) if e.owned && now.as_slice() == nodes => {
                e.state = ValueState::Pending;
                e.view = None;
                true
            }
            _ => false,
        }
    }

    /// The current state of an object this process knows about.
    pub(crate) fn state(&self, id: ObjectId) -> Option<ValueState> {
        self.entries.lock().get(&id).map(|e| e.state.clone())
    }

    /// Caches the state of a borrowed object, as its owner reported it.
    pub(crate) fn cache_state(&self, id: ObjectId, state: ValueState) {
        if let Some(e) = self.entries.lock().get_mut(&id) {
            if !e.owned {
                e.state = state;
            }
        }
    }

    /// Waits until an owned object is no longer pending. `None` when this
    /// process does not own it (ask the owner instead).
    pub(crate) fn wait_ready(&self, id: ObjectId) -> Option<oneshot::Receiver<ValueState>> {
        let (tx, rx) = oneshot::channel();
        let mut entries = self.entries.lock();
        let e = entries.get_mut(&id)?;
        if !e.owned {
            return None;
        }
        match &e.state {
            ValueState::Pending => e.waiters.push(tx),
            s => {
                let _ = tx.send(s.clone());
            }
        }
        Some(rx)
    }

    /// Records that `borrower` holds a reference to an owned object.
    pub(crate) fn add_borrower(&self, id: ObjectId, borrower: WorkerId) {
        self.adjust_borrower(id, borrower, 1);
    }

    /// Records that `borrower` holds no reference any more.
    pub(crate) fn remove_borrower(&self, id: ObjectId, borrower: WorkerId) {
        self.adjust_borrower(id, borrower, -1);
    }

    /// Moves `borrower`'s signed count by `delta`, and frees the object if
    /// nothing references it any more.
    fn adjust_borrower(&self, id: ObjectId, borrower: WorkerId, delta: i32) {
        let released = {
            let mut entries = self.entries.lock();
            match entries.get_mut(&id) {
                Some(e) => {
                    let count = e.borrowers.entry(borrower).or_insert(0);
                    *count += delta;
                    if *count == 0 {
                        e.borrowers.remove(&borrower);
                    }
                    self.release_if_done(&mut entries, id)
                }
                None => Vec::new(),
            }
        };
        drop(released);
    }

    /// Drops every borrow held by a process that died.
    pub(crate) fn remove_dead_borrower(&self, borrower: WorkerId) {
        let mut released = Vec::new();
        {
            let mut entries = self.entries.lock();
            let ids: Vec<ObjectId> = entries
                .iter()
                .filter(|(_, e)| e.borrowers.contains_key(&borrower))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(e) = entries.get_mut(&id) {
                    e.borrowers.remove(&borrower);
                }
                released.extend(self.release_if_done(&mut entries, id));
            }
        }
        drop(released);
    }

    /// Borrowed references this process holds that their owners do not
    /// know of yet; marks them known. Called when a task finishes: the
    /// caller registers them.
    pub(crate) fn take_unregistered(&self) -> Vec<(ObjectId, Address)> {
        let mut entries = self.entries.lock();
        entries
            .iter_mut()
            .filter(|(_, e)| !e.owned && !e.registered && e.local > 0)
            .map(|(id, e)| {
                e.registered = true;
                (*id, (*e.owner).clone())
            })
            .collect()
    }

    /// How many objects this process tracks (owned and borrowed).
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether it tracks none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release_if_done(
        &self,
        entries: &mut HashMap<ObjectId, Entry>,
        id: ObjectId,
    ) -> Vec<Arc<RefHandle>> {
        let Some(e) = entries.get(&id) else {
            return Vec::new();
        };
        if !e.releasable() {
            return Vec::new();
        }
        let Some(mut e) = entries.remove(&id) else {
            return Vec::new();
        };
        drop(e.view.take());
        if e.owned {
            if let ValueState::Stored(nodes) = e.state {
                let _ = self.events.send(RefEvent::Free { id, nodes });
            }
        } else if e.registered {
            let _ = self.events.send(RefEvent::Unborrow { id, owner: e.owner });
        }
        e.contained
    }
}
