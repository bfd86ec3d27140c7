//! The store's bookkeeping: every object's state, every client's pins,
//! creations and leases, the LRU orders and the `get` waiters.
//!
//! The table does no I/O. Operations that must wait for I/O (spilling a
//! victim, restoring a spilled object) are split in two: the table hands the
//! caller a job and moves the object into a transitional state
//! (`Spilling`, `Restoring`), and the caller reports the job's outcome back.
//! Every method runs under the store's one lock and leaves the table
//! consistent, so a client that disconnects at any moment loses its pins and
//! unsealed creations and nothing else.

use crate::allocator::{AllocError, Allocator, Block};
use crate::protocol::{ObjectInfo, ObjectState, Reply, StoreStats, WireError};
use crate::spill::Extent;
use crate::ObjectId;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio::sync::oneshot;

pub use crate::id::ClientId;

/// Where a waiting `get` receives its answer.
pub type WaiterTx = oneshot::Sender<Result<Reply, WireError>>;

/// An object being written by its creator.
#[derive(Debug)]
pub struct Creating {
    block: Block,
    size: u64,
    creator: ClientId,
    evictable: bool,
}

/// A sealed object resident in the arena.
#[derive(Debug)]
pub struct Sealed {
    block: Block,
    size: u64,
    evictable: bool,
    pins: u32,
    /// Position in an LRU order while unpinned.
    lru: Option<u64>,
    delete_pending: bool,
}

/// A sealed object whose bytes live only in the spill file.
#[derive(Clone, Copy, Debug)]
pub struct Spilled {
    extent: Extent,
    size: u64,
    checksum: u32,
}

/// The life of an object, one state per variant.
#[derive(Debug)]
enum Entry {
    Creating(Creating),
    Sealed(Sealed),
    /// Sealed and resident, with its bytes being copied to the spill file.
    Spilling(Sealed),
    Spilled(Spilled),
    /// Being read back from the spill file; waiters are answered when done.
    Restoring {
        spilled: Spilled,
        delete_pending: bool,
    },
}

#[derive(Debug, Default)]
struct ClientRecord {
    pins: HashMap<ObjectId, u32>,
    creating: HashSet<ObjectId>,
    /// Leased blocks not yet used: offset to length.
    leases: HashMap<u64, u64>,
    /// Lent pins this client released before their lend arrived: the
    /// next lends of these objects to it are cancelled instead of pinning.
    released_early: HashMap<ObjectId, u32>,
}

/// Most lent pins a client may release ahead of their lends; beyond it a
/// release of a pin it does not hold is refused as [`WireError::NotPinned`]
/// (a lend and its early release are normally a few microseconds apart).
pub const MAX_EARLY_RELEASES: usize = 4096;

#[derive(Debug)]
struct Waiter {
    waiter: u64,
    client: ClientId,
    tx: WaiterTx,
}

/// A copy of a resident object's bytes to the spill file, to be done without
/// the lock.
#[derive(Clone, Copy, Debug)]
pub struct SpillJob {
    /// The object.
    pub id: ObjectId,
    /// Where its bytes are in the arena.
    pub block: Block,
    /// Its size.
    pub size: u64,
}

/// A read of a spilled object back into the arena.
#[derive(Clone, Copy, Debug)]
pub struct RestoreJob {
    /// The object.
    pub id: ObjectId,
    /// Where its bytes are in the spill file.
    pub extent: Extent,
    /// Its size.
    pub size: u64,
    /// CRC32 of its bytes.
    pub checksum: u32,
}

/// What the table did to make room.
#[derive(Debug)]
pub enum Victim {
    /// An evictable object was dropped; try allocating again.
    Evicted,
    /// A primary object must be spilled first.
    Spill(SpillJob),
    /// Nothing can move.
    None,
}

/// How a `get` proceeds.
#[derive(Debug)]
pub enum GetOutcome {
    /// The object is pinned for the client.
    Ready(Reply),
    /// The caller waits on the receiver; `waiter` cancels it on timeout.
    Wait {
        /// Waiter id for [`ObjectTable::cancel_waiter`].
        waiter: u64,
        /// Receives the answer.
        rx: oneshot::Receiver<Result<Reply, WireError>>,
        /// Set when this get must restore the object from spill first.
        restore: Option<RestoreJob>,
    },
}

/// Counters since start.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    evictions: u64,
    spills: u64,
    restores: u64,
    spilled_bytes: u64,
    restored_bytes: u64,
}

/// The store's state; see the module docs.
#[derive(Debug)]
pub struct ObjectTable {
    alloc: Allocator,
    objects: HashMap<ObjectId, Entry>,
    clients: HashMap<ClientId, ClientRecord>,
    lru_evictable: BTreeMap<u64, ObjectId>,
    lru_primary: BTreeMap<u64, ObjectId>,
    tick: u64,
    waiters: HashMap<ObjectId, Vec<Waiter>>,
    next_waiter: u64,
    next_client: u64,
    counters: Counters,
    spill_enabled: bool,
}

impl ObjectTable {
    /// An empty table over an arena of `capacity` bytes.
    pub fn new(capacity: u64, spill_enabled: bool) -> Self {
        ObjectTable {
            alloc: Allocator::new(capacity),
            objects: HashMap::new(),
            clients: HashMap::new(),
            lru_evictable: BTreeMap::new(),
            lru_primary: BTreeMap::new(),
            tick: 0,
            waiters: HashMap::new(),
            next_waiter: 1,
            next_client: 1,
            counters: Counters::default(),
            spill_enabled,
        }
    }

    /// Usable capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.alloc.capacity()
    }

    /// End of the highest allocated byte.
    pub fn high_water(&self) -> u64 {
        self.alloc.high_water()
    }

    /// Registers a new client connection.
    pub fn connect(&mut self) -> ClientId {
        let id = ClientId::new(self.next_client);
        self.next_client += 1;
        self.clients.insert(id, ClientRecord::default());
        id
    }

    /// Forgets a client: releases its pins, aborts its unsealed creations,
    /// frees its unused leases and drops its waiters.
    pub fn disconnect(&mut self, client: ClientId) {
        let Some(record) = self.clients.remove(&client) else {
            return;
        };
        for (id, count) in record.pins {
            for _ in 0..count {
                self.unpin(id);
            }
        }
        for id in record.creating {
            if let Some(Entry::Creating(c)) = self.objects.remove(&id) {
                self.free_block(c.block);
            }
        }
        for (offset, len) in record.leases {
            self.free_block(Block { offset, len });
        }
        for list in self.waiters.values_mut() {
            list.retain(|w| w.client != client);
        }
        self.waiters.retain(|_, list| !list.is_empty());
    }

    /// Whether an id is taken (in any state).
    pub fn exists(&self, id: &ObjectId) -> bool {
        self.objects.contains_key(id)
    }

    /// Tries to allocate `size` bytes without making room.
    pub fn allocate(&mut self, size: u64) -> Result<Block, AllocError> {
        self.alloc.allocate(size)
    }

    /// Returns a block to the allocator.
    pub fn free_block(&mut self, block: Block) {
        if let Err(e) = self.alloc.free(block) {
            tracing::error!(error = %e, ?block, "allocator refused a free; block leaked");
        }
    }

    /// Records a new unsealed object in `block`, created by `client`.
    pub fn insert_creating(
        &mut self,
        client: ClientId,
        id: ObjectId,
        block: Block,
        size: u64,
        evictable: bool,
    ) -> Result<(), WireError> {
        if self.objects.contains_key(&id) {
            return Err(WireError::AlreadyExists(id));
        }
        let Some(record) = self.clients.get_mut(&client) else {
            return Err(WireError::Internal("client is gone".into()));
        };
        record.creating.insert(id);
        self.objects.insert(
            id,
            Entry::Creating(Creating {
                block,
                size,
                creator: client,
                evictable,
            }),
        );
        Ok(())
    }

    /// Seals an object `client` created; the client keeps one pin, and
    /// `lend_to`, if any, is lent another.
    pub fn seal(
        &mut self,
        client: ClientId,
        id: ObjectId,
        lend_to: Option<ClientId>,
    ) -> Result<(), WireError> {
        let entry = self.objects.get(&id).ok_or(WireError::NotFound(id))?;
        let creating = match entry {
            Entry::Creating(c) if c.creator == client => c,
            Entry::Creating(_) => return Err(WireError::NotCreator(id)),
            _ => return Err(WireError::AlreadySealed(id)),
        };
        let sealed = Sealed {
            block: creating.block,
            size: creating.size,
            evictable: creating.evictable,
            pins: 0,
            lru: None,
            delete_pending: false,
        };
        self.objects.insert(id, Entry::Sealed(sealed));
        if let Some(record) = self.clients.get_mut(&client) {
            record.creating.remove(&id);
        }
        self.pin(client, id);
        self.wake(id);
        match lend_to {
            Some(to) => self.lend(client, id, to),
            None => Ok(()),
        }
    }

    /// Discards an unsealed object `client` created.
    pub fn abort(&mut self, client: ClientId, id: ObjectId) -> Result<(), WireError> {
        match self.objects.get(&id) {
            Some(Entry::Creating(c)) if c.creator == client => {}
            Some(Entry::Creating(_)) => return Err(WireError::NotCreator(id)),
            Some(_) => return Err(WireError::AlreadySealed(id)),
            None => return Err(WireError::NotFound(id)),
        }
        if let Some(Entry::Creating(c)) = self.objects.remove(&id) {
            self.free_block(c.block);
        }
        if let Some(record) = self.clients.get_mut(&client) {
            record.creating.remove(&id);
        }
        Ok(())
    }

    /// Pins a sealed object for `client`, or arranges to answer later.
    pub fn get(&mut self, client: ClientId, id: ObjectId) -> GetOutcome {
        let mut restore = None;
        match self.objects.get_mut(&id) {
            Some(Entry::Sealed(s)) | Some(Entry::Spilling(s)) => {
                let reply = Reply::Object {
                    offset: s.block.offset,
                    size: s.size,
                };
                self.pin(client, id);
                return GetOutcome::Ready(reply);
            }
            Some(entry @ Entry::Spilled(_)) => {
                if let Entry::Spilled(spilled) = *entry {
                    restore = Some(RestoreJob {
                        id,
                        extent: spilled.extent,
                        size: spilled.size,
                        checksum: spilled.checksum,
                    });
                    *entry = Entry::Restoring {
                        spilled,
                        delete_pending: false,
                    };
                }
            }
            Some(Entry::Creating(_)) | Some(Entry::Restoring { .. }) | None => {}
        }
        let (tx, rx) = oneshot::channel();
        let waiter = self.next_waiter;
        self.next_waiter += 1;
        self.waiters
            .entry(id)
            .or_default()
            .push(Waiter { waiter, client, tx });
        GetOutcome::Wait {
            waiter,
            rx,
            restore,
        }
    }

    /// Removes a waiter whose timeout passed. Returns false when it was
    /// answered first (its receiver then holds the answer).
    pub fn cancel_waiter(&mut self, id: ObjectId, waiter: u64) -> bool {
        let Some(list) = self.waiters.get_mut(&id) else {
            return false;
        };
        let before = list.len();
        list.retain(|w| w.waiter != waiter);
        let removed = list.len() < before;
        if list.is_empty() {
            self.waiters.remove(&id);
        }
        removed
    }

    /// Drops one pin `client` holds on `id`.
    pub fn release(&mut self, client: ClientId, id: ObjectId) -> Result<(), WireError> {
        let record = self
            .clients
            .get_mut(&client)
            .ok_or(WireError::NotPinned(id))?;
        match record.pins.get_mut(&id) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                record.pins.remove(&id);
            }
            None => return Err(WireError::NotPinned(id)),
        }
        self.unpin(id);
        Ok(())
    }

    /// Gives `to` one pin on `id`, which `from` pins: a lend (see
    /// [`crate::lend`]). A lend to a client that is gone is dropped, and one
    /// whose pin `to` already released is cancelled against that release.
    pub fn lend(&mut self, from: ClientId, id: ObjectId, to: ClientId) -> Result<(), WireError> {
        let lender_pins = self
            .clients
            .get(&from)
            .is_some_and(|r| r.pins.contains_key(&id));
        if !lender_pins {
            return Err(WireError::NotPinned(id));
        }
        let Some(record) = self.clients.get_mut(&to) else {
            return Ok(());
        };
        if let Some(early) = record.released_early.get_mut(&id) {
            *early -= 1;
            if *early == 0 {
                record.released_early.remove(&id);
            }
            return Ok(());
        }
        self.pin(to, id);
        Ok(())
    }

    /// Drops one pin `client` was lent on `id`, or, if its lend has not
    /// arrived yet, notes the release so that the lend is cancelled.
    pub fn release_lent(&mut self, client: ClientId, id: ObjectId) -> Result<(), WireError> {
        let record = self
            .clients
            .get_mut(&client)
            .ok_or(WireError::NotPinned(id))?;
        if record.pins.contains_key(&id) {
            return self.release(client, id);
        }
        if record.released_early.len() >= MAX_EARLY_RELEASES
            && !record.released_early.contains_key(&id)
        {
            return Err(WireError::NotPinned(id));
        }
        *record.released_early.entry(id).or_insert(0) += 1;
        Ok(())
    }

    /// Up to `limit` objects, in no particular order: id, size, state and
    /// pins.
    pub fn describe(&self, limit: usize) -> Vec<ObjectInfo> {
        self.objects
            .iter()
            .take(limit)
            .map(|(id, entry)| {
                let (state, size, pins) = match entry {
                    Entry::Creating(c) => (ObjectState::Creating, c.size, 0),
                    Entry::Sealed(s) => (ObjectState::Sealed, s.size, s.pins),
                    Entry::Spilling(s) => (ObjectState::Spilling, s.size, s.pins),
                    Entry::Spilled(s) => (ObjectState::Spilled, s.size, 0),
                    Entry::Restoring { spilled, .. } => (ObjectState::Restoring, spilled.size, 0),
                };
                ObjectInfo {
                    id: *id,
                    size,
                    state,
                    pins,
                }
            })
            .collect()
    }

    /// Ids of every object that is sealed (resident, spilling or spilled).
    pub fn sealed_ids(&self) -> Vec<ObjectId> {
        self.objects
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Creating(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Deletes a sealed object now, or when its last pin goes; returns the
    /// spill extent to release if it was spilled.
    pub fn delete(&mut self, id: ObjectId) -> Result<Option<Extent>, WireError> {
        let entry = self.objects.get_mut(&id).ok_or(WireError::NotFound(id))?;
        match entry {
            Entry::Creating(_) => Err(WireError::NotFound(id)),
            Entry::Spilling(s) => {
                s.delete_pending = true;
                Ok(None)
            }
            Entry::Sealed(s) => {
                if s.pins > 0 {
                    s.delete_pending = true;
                } else {
                    self.remove_resident(id);
                }
                Ok(None)
            }
            Entry::Restoring { delete_pending, .. } => {
                *delete_pending = true;
                Ok(None)
            }
            Entry::Spilled(spilled) => {
                let extent = spilled.extent;
                self.objects.remove(&id);
                Ok(Some(extent))
            }
        }
    }

    /// Whether a sealed object exists, resident or spilled.
    pub fn contains(&self, id: &ObjectId) -> bool {
        match self.objects.get(id) {
            Some(Entry::Sealed(s)) | Some(Entry::Spilling(s)) => !s.delete_pending,
            Some(Entry::Spilled(_)) => true,
            Some(Entry::Restoring { delete_pending, .. }) => !delete_pending,
            Some(Entry::Creating(_)) | None => false,
        }
    }

    /// Reserves blocks of `class` bytes for `client`'s small puts, as many of
    /// `count` as fit without making room.
    pub fn lease(
        &mut self,
        client: ClientId,
        class: u64,
        count: u32,
    ) -> Result<Vec<u64>, AllocError> {
        let mut offsets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match self.alloc.allocate(class) {
                Ok(block) => offsets.push(block),
                Err(e) if offsets.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        let Some(record) = self.clients.get_mut(&client) else {
            for block in offsets {
                self.free_block(block);
            }
            return Ok(Vec::new());
        };
        for block in &offsets {
            record.leases.insert(block.offset, block.len);
        }
        Ok(offsets.into_iter().map(|b| b.offset).collect())
    }

    /// Records `block`, allocated by the caller, as leased to `client`.
    pub fn add_lease(&mut self, client: ClientId, block: Block) {
        match self.clients.get_mut(&client) {
            Some(record) => {
                record.leases.insert(block.offset, block.len);
            }
            None => self.free_block(block),
        }
    }

    /// Seals an object written into a block leased to `client`.
    pub fn put_leased(
        &mut self,
        client: ClientId,
        id: ObjectId,
        offset: u64,
        size: u64,
        lend_to: Option<ClientId>,
    ) -> Result<(), WireError> {
        let record = self
            .clients
            .get_mut(&client)
            .ok_or_else(|| WireError::BadLease("client is gone".into()))?;
        let Some(&len) = record.leases.get(&offset) else {
            return Err(WireError::BadLease(format!(
                "no block at offset {offset} is leased to this client"
            )));
        };
        if size > len {
            return Err(WireError::BadLease(format!(
                "object of {size} bytes does not fit its {len}-byte block"
            )));
        }
        if self.objects.contains_key(&id) {
            return Err(WireError::AlreadyExists(id));
        }
        record.leases.remove(&offset);
        self.objects.insert(
            id,
            Entry::Sealed(Sealed {
                block: Block { offset, len },
                size,
                evictable: false,
                pins: 0,
                lru: None,
                delete_pending: false,
            }),
        );
        self.pin(client, id);
        self.wake(id);
        match lend_to {
            Some(to) => self.lend(client, id, to),
            None => Ok(()),
        }
    }

    /// Chooses what to move to make room: the least recently used unpinned
    /// evictable object is dropped at once; failing that, the least recently
    /// used unpinned primary object is handed out to be spilled.
    pub fn pick_victim(&mut self) -> Victim {
        if let Some((_, id)) = self.lru_evictable.pop_first() {
            if let Some(Entry::Sealed(s)) = self.objects.remove(&id) {
                self.free_block(s.block);
                self.counters.evictions += 1;
                return Victim::Evicted;
            }
        }
        if !self.spill_enabled {
            return Victim::None;
        }
        let Some((_, id)) = self.lru_primary.pop_first() else {
            return Victim::None;
        };
        match self.objects.remove(&id) {
            Some(Entry::Sealed(mut s)) => {
                s.lru = None;
                let job = SpillJob {
                    id,
                    block: s.block,
                    size: s.size,
                };
                self.objects.insert(id, Entry::Spilling(s));
                Victim::Spill(job)
            }
            Some(other) => {
                self.objects.insert(id, other);
                Victim::None
            }
            None => Victim::None,
        }
    }

    /// Completes a spill. On success the object's memory is freed unless a
    /// client pinned it meanwhile; returns a spill extent that is no longer
    /// needed, for the caller to release.
    pub fn finish_spill(
        &mut self,
        job: SpillJob,
        result: Result<(Extent, u32), String>,
    ) -> Option<Extent> {
        let Some(Entry::Spilling(s)) = self.objects.remove(&job.id) else {
            return result.ok().map(|(extent, _)| extent);
        };
        match result {
            Ok((extent, checksum)) if s.pins == 0 && !s.delete_pending => {
                self.free_block(s.block);
                self.counters.spills += 1;
                self.counters.spilled_bytes += s.size;
                self.objects.insert(
                    job.id,
                    Entry::Spilled(Spilled {
                        extent,
                        size: s.size,
                        checksum,
                    }),
                );
                None
            }
            Ok((extent, _)) => {
                self.settle_resident(job.id, s);
                Some(extent)
            }
            Err(reason) => {
                tracing::warn!(object = %job.id, %reason, "spill failed; object stays in memory");
                self.settle_resident(job.id, s);
                None
            }
        }
    }

    /// Puts a resident object back in the right place after a spill that did
    /// not free it: pinned, in the LRU, or deleted.
    fn settle_resident(&mut self, id: ObjectId, mut s: Sealed) {
        if s.pins == 0 && s.delete_pending {
            self.free_block(s.block);
            return;
        }
        if s.pins == 0 {
            s.lru = Some(self.push_lru(id, s.evictable));
        }
        self.objects.insert(id, Entry::Sealed(s));
    }

    /// Completes a restore into `block`: the object becomes resident and its
    /// waiters are answered. Returns the spill extent to release.
    pub fn finish_restore(&mut self, id: ObjectId, block: Block) -> Option<Extent> {
        let Some(Entry::Restoring {
            spilled,
            delete_pending,
        }) = self.objects.remove(&id)
        else {
            self.free_block(block);
            return None;
        };
        self.counters.restores += 1;
        self.counters.restored_bytes += spilled.size;
        if delete_pending {
            self.free_block(block);
            self.fail_waiters(id, WireError::NotFound(id));
            return Some(spilled.extent);
        }
        let mut sealed = Sealed {
            block,
            size: spilled.size,
            evictable: false,
            pins: 0,
            lru: None,
            delete_pending: false,
        };
        if !self.waiters.contains_key(&id) {
            sealed.lru = Some(self.push_lru(id, false));
        }
        self.objects.insert(id, Entry::Sealed(sealed));
        self.wake(id);
        Some(spilled.extent)
    }

    /// A restore could not get memory: the object stays spilled and its
    /// waiters get `error`.
    pub fn abort_restore(&mut self, id: ObjectId, error: WireError) {
        if let Some(Entry::Restoring {
            spilled,
            delete_pending,
        }) = self.objects.remove(&id)
        {
            if !delete_pending {
                self.objects.insert(id, Entry::Spilled(spilled));
            }
        }
        self.fail_waiters(id, error);
    }

    /// A restore read corrupt or unreadable data: the object is gone.
    /// Returns its spill extent to release.
    pub fn lose(&mut self, id: ObjectId, block: Block, reason: String) -> Option<Extent> {
        self.free_block(block);
        let extent = match self.objects.remove(&id) {
            Some(Entry::Restoring { spilled, .. }) => Some(spilled.extent),
            _ => None,
        };
        tracing::error!(object = %id, %reason, "spilled object lost");
        self.fail_waiters(id, WireError::Lost { id, reason });
        extent
    }

    /// The error for a create of `requested` bytes that cannot be satisfied.
    pub fn full_error(&self, requested: u64) -> WireError {
        let stats = self.alloc.stats();
        if requested > stats.capacity {
            return WireError::TooLarge {
                requested,
                capacity: stats.capacity,
            };
        }
        let pinned = self
            .objects
            .values()
            .map(|e| match e {
                Entry::Creating(c) => c.block.len,
                Entry::Sealed(s) | Entry::Spilling(s) if s.pins > 0 => s.block.len,
                _ => 0,
            })
            .sum::<u64>()
            + self.leased_bytes();
        WireError::StoreFull {
            requested,
            free: stats.free,
            largest_free: stats.largest_free,
            pinned,
        }
    }

    fn leased_bytes(&self) -> u64 {
        self.clients.values().flat_map(|c| c.leases.values()).sum()
    }

    /// Current counters.
    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            arena: self.alloc.stats(),
            clients: self.clients.len() as u64,
            evictions: self.counters.evictions,
            spills: self.counters.spills,
            restores: self.counters.restores,
            spilled_bytes_total: self.counters.spilled_bytes,
            restored_bytes_total: self.counters.restored_bytes,
            leased_bytes: self.leased_bytes(),
            ..StoreStats::default()
        };
        for entry in self.objects.values() {
            match entry {
                Entry::Creating(_) => stats.unsealed_objects += 1,
                Entry::Sealed(s) | Entry::Spilling(s) => {
                    stats.sealed_objects += 1;
                    stats.pins += u64::from(s.pins);
                }
                Entry::Spilled(s) | Entry::Restoring { spilled: s, .. } => {
                    stats.spilled_objects += 1;
                    stats.spilled_bytes += s.size;
                }
            }
        }
        stats
    }

    fn pin(&mut self, client: ClientId, id: ObjectId) {
        let Some(record) = self.clients.get_mut(&client) else {
            return;
        };
        let sealed = match self.objects.get_mut(&id) {
            Some(Entry::Sealed(s)) | Some(Entry::Spilling(s)) => s,
            _ => return,
        };
        *record.pins.entry(id).or_insert(0) += 1;
        sealed.pins += 1;
        if let Some(tick) = sealed.lru.take() {
            if sealed.evictable {
                self.lru_evictable.remove(&tick);
            } else {
                self.lru_primary.remove(&tick);
            }
        }
    }

    fn unpin(&mut self, id: ObjectId) {
        let (sealed, spilling) = match self.objects.get_mut(&id) {
            Some(Entry::Sealed(s)) => (s, false),
            Some(Entry::Spilling(s)) => (s, true),
            _ => return,
        };
        sealed.pins = sealed.pins.saturating_sub(1);
        if sealed.pins > 0 || spilling {
            return;
        }
        if sealed.delete_pending {
            self.remove_resident(id);
            return;
        }
        let evictable = sealed.evictable;
        let tick = self.push_lru(id, evictable);
        if let Some(Entry::Sealed(s)) = self.objects.get_mut(&id) {
            s.lru = Some(tick);
        }
    }

    fn push_lru(&mut self, id: ObjectId, evictable: bool) -> u64 {
        self.tick += 1;
        if evictable {
            self.lru_evictable.insert(self.tick, id);
        } else {
            self.lru_primary.insert(self.tick, id);
        }
        self.tick
    }

    fn remove_resident(&mut self, id: ObjectId) {
        if let Some(Entry::Sealed(s)) = self.objects.remove(&id) {
            if let Some(tick) = s.lru {
                if s.evictable {
                    self.lru_evictable.remove(&tick);
                } else {
                    self.lru_primary.remove(&tick);
                }
            }
            self.free_block(s.block);
        }
    }

    /// Answers every waiter of a now-resident object, pinning it for each.
    fn wake(&mut self, id: ObjectId) {
        let Some(list) = self.waiters.remove(&id) else {
            return;
        };
        let Some(Entry::Sealed(s)) = self.objects.get(&id) else {
            return;
        };
        let reply = Reply::Object {
            offset: s.block.offset,
            size: s.size,
        };
        for w in list {
            self.pin(w.client, id);
            if w.tx.send(Ok(reply.clone())).is_err() {
                if let Some(record) = self.clients.get_mut(&w.client) {
                    if let Some(n) = record.pins.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            record.pins.remove(&id);
                        }
                    }
                }
                self.unpin(id);
            }
        }
    }

    fn fail_waiters(&mut self, id: ObjectId, error: WireError) {
        for w in self.waiters.remove(&id).unwrap_or_default() {
            let _ = w.tx.send(Err(error.clone()));
        }
    }
}
