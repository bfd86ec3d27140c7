//! [`ObjectRef<T>`]: a counted reference to a value owned by one process.
//!
//! Every live reference is counted by the process holding it (see
//! [`refs`](crate::refs)); when the last one anywhere is dropped the owner
//! frees the object on every node holding a copy. A reference serialized
//! inside a value (a task argument, a return value, a `put`) is noted by
//! `collect_nested`, so whoever ships the value can keep it alive until
//! the receiver has been counted.

use crate::address::Address;
use braid_store::{LendTicket, ObjectId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// One counted reference held by this process. Clones of an [`ObjectRef`]
/// share it; it is released when the last clone drops.
pub struct RefHandle {
    pub(crate) id: ObjectId,
    pub(crate) owner: Arc<Address>,
    pub(crate) table: Option<Arc<crate::refs::RefTable>>,
}

impl RefHandle {
    /// Counts a new reference in this process's table (when there is one).
    pub(crate) fn new(id: ObjectId, owner: Arc<Address>) -> Arc<RefHandle> {
        let table = crate::refs::RefTable::global();
        if let Some(table) = &table {
            table.add_local(id, &owner);
        }
        Arc::new(RefHandle { id, owner, table })
    }

    /// The object.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The process that owns the object.
    pub fn owner(&self) -> &Address {
        &self.owner
    }
}

impl Drop for RefHandle {
    fn drop(&mut self) {
        if let Some(table) = &self.table {
            table.remove_local(self.id);
        }
    }
}

impl fmt::Debug for RefHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectRef({})", self.id)
    }
}

/// A reference to a value of type `T` that a task returned or that was
/// `put`. Cheap to clone; pass it to tasks and actors as an argument (it is
/// resolved to the value before the task runs) or nested inside other
/// values (it stays a reference, and is counted where it lands).
pub struct ObjectRef<T> {
    pub(crate) handle: Arc<RefHandle>,
    _type: PhantomData<fn() -> T>,
}

impl<T> ObjectRef<T> {
    pub(crate) fn from_handle(handle: Arc<RefHandle>) -> Self {
        ObjectRef {
            handle,
            _type: PhantomData,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.handle.id
    }

    /// The address of the process that owns the object.
    pub fn owner(&self) -> &Address {
        &self.handle.owner
    }

    /// The same reference, viewed as another type. Decoding checks nothing
    /// about `U` until the value is read.
    pub fn cast<U>(&self) -> ObjectRef<U> {
        ObjectRef::from_handle(self.handle.clone())
    }

    /// Lends the stored object to another process without counting it
    /// there: the receiver reads it with [`Runtime::get_batch_lent`]
    /// (pinning it in its node's store) and never asks the owner about it.
    /// The lender keeps this reference alive until the receiver has read
    /// the object; a lent object that was freed first is
    /// [`Error::ObjectLost`](crate::Error::ObjectLost) to the receiver.
    ///
    /// [`Runtime::get_batch_lent`]: crate::Runtime::get_batch_lent
    pub fn lend(&self) -> Lent<T> {
        Lent {
            id: self.handle.id,
            owner: (*self.handle.owner).clone(),
            ticket: None,
            _type: PhantomData,
        }
    }

    /// [`ObjectRef::lend`] with a pin already lent to the reader in its
    /// node's store (see [`Runtime::put_batch_lent`]).
    ///
    /// [`Runtime::put_batch_lent`]: crate::Runtime::put_batch_lent
    pub(crate) fn lend_pinned(&self, ticket: LendTicket) -> Lent<T> {
        Lent {
            ticket: Some(ticket),
            ..self.lend()
        }
    }
}

/// A stored object lent by its owner for a moment (see
/// [`ObjectRef::lend`]): its id and owner, uncounted, and, when its reader
/// was known as it was built, the ticket of a store pin lent to that
/// reader.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Lent<T> {
    id: ObjectId,
    owner: Address,
    ticket: Option<LendTicket>,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

impl<T> Lent<T> {
    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The process that owns the object.
    pub fn owner(&self) -> &Address {
        &self.owner
    }

    /// The store pin lent to the reader, if any.
    pub fn ticket(&self) -> Option<&LendTicket> {
        self.ticket.as_ref()
    }
}

impl<T> Clone for Lent<T> {
    fn clone(&self) -> Self {
        Lent {
            id: self.id,
            owner: self.owner.clone(),
            ticket: self.ticket.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Lent<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lent({})", self.id)
    }
}

impl<T> PartialEq for Lent<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.owner == other.owner
    }
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef::from_handle(self.handle.clone())
    }
}

impl<T> fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectRef({})", self.handle.id)
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.handle.id == other.handle.id
    }
}

impl<T> Eq for ObjectRef<T> {}

impl<T> std::hash::Hash for ObjectRef<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.handle.id.hash(state)
    }
}

thread_local! {
    static NESTED: RefCell<Option<Vec<Arc<RefHandle>>>> = const { RefCell::new(None) };
}

/// Runs `f` (which serializes something) and returns, beside its result,
/// every reference it serialized.
pub(crate) fn collect_nested<R>(f: impl FnOnce() -> R) -> (R, Vec<Arc<RefHandle>>) {
    let outer = NESTED.with(|n| n.borrow_mut().replace(Vec::new()));
    let result = f();
    let nested = NESTED.with(|n| std::mem::replace(&mut *n.borrow_mut(), outer));
    (result, nested.unwrap_or_default())
}

#[derive(Serialize, Deserialize)]
struct WireRef {
    id: [u8; 16],
    owner: Address,
}

impl<T> Serialize for ObjectRef<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        NESTED.with(|n| {
            if let Some(list) = n.borrow_mut().as_mut() {
                list.push(self.handle.clone());
            }
        });
        WireRef {
            id: *self.handle.id.as_bytes(),
            owner: (*self.handle.owner).clone(),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for ObjectRef<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireRef::deserialize(deserializer)?;
        let id = ObjectId::from_bytes(wire.id);
        Ok(ObjectRef::from_handle(RefHandle::new(
            id,
            crate::address::intern(wire.owner),
        )))
    }
}
