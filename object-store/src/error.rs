//! Client-side errors, one enum per operation.
//!
//! Errors the store reports travel as [`WireError`] and are turned back into
//! these enums, so a caller matches on the same variants whether the failure
//! happened in its own process or in the store.

use crate::arena::ArenaError;
use crate::protocol::WireError;
use crate::{ObjectId, StoreSeat};
use std::path::PathBuf;
use std::time::Duration;

/// The connection to the store failed or was refused; every operation can
/// return it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectionError {
    /// Could not connect to the socket.
    #[error("cannot connect to the store at {path}: {reason}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The store's greeting was missing or malformed.
    #[error("store handshake failed: {0}")]
    Handshake(String),
    /// The store speaks another protocol version.
    #[error("store speaks protocol version {store}, this client {client}")]
    VersionMismatch {
        /// The store's version.
        store: u32,
        /// This client's version.
        client: u32,
    },
    /// The arena could not be mapped.
    #[error("cannot map the store's arena: {0}")]
    Map(String),
    /// The store closed the connection or died.
    #[error("the store connection is closed: {0}")]
    Disconnected(String),
    /// The store sent something this client does not understand, or
    /// refused a request as malformed.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<ArenaError> for ConnectionError {
    fn from(e: ArenaError) -> Self {
        ConnectionError::Map(e.to_string())
    }
}

pub(crate) fn unexpected(e: WireError) -> ConnectionError {
    match e {
        WireError::Malformed(reason) => ConnectionError::Protocol(reason),
        other => ConnectionError::Protocol(format!("unexpected error from the store: {other}")),
    }
}

/// Errors from [`StoreClient::create`](crate::StoreClient::create).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateError {
    /// An object with this id exists.
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    /// Neither eviction nor spilling could make room.
    #[error("store full: {requested} bytes requested, {free} free, largest free block {largest_free}, {pinned} bytes pinned")]
    StoreFull {
        /// Bytes requested.
        requested: u64,
        /// Bytes free.
        free: u64,
        /// Largest free block.
        largest_free: u64,
        /// Bytes held by pinned or unsealed objects.
        pinned: u64,
    },
    /// The object is larger than the whole store.
    #[error("{requested} bytes requested but the store holds only {capacity}")]
    TooLarge {
        /// Bytes requested.
        requested: u64,
        /// The store's capacity.
        capacity: u64,
    },
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<WireError> for CreateError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::AlreadyExists(id) => CreateError::AlreadyExists(id),
            WireError::StoreFull {
                requested,
                free,
                largest_free,
                pinned,
            } => CreateError::StoreFull {
                requested,
                free,
                largest_free,
                pinned,
            },
            WireError::TooLarge {
                requested,
                capacity,
            } => CreateError::TooLarge {
                requested,
                capacity,
            },
            other => CreateError::Connection(unexpected(other)),
        }
    }
}

/// Errors from [`ObjectBuf::seal`](crate::ObjectBuf::seal).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SealError {
    /// The store no longer has the unsealed object.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// The object was sealed already.
    #[error("object {0} is already sealed")]
    AlreadySealed(ObjectId),
    /// Another client created the object.
    #[error("object {0} was created by another client")]
    NotCreator(ObjectId),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<WireError> for SealError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NotFound(id) => SealError::NotFound(id),
            WireError::AlreadySealed(id) => SealError::AlreadySealed(id),
            WireError::NotCreator(id) => SealError::NotCreator(id),
            other => SealError::Connection(unexpected(other)),
        }
    }
}

/// Errors from [`StoreClient::put`](crate::StoreClient::put) and the typed
/// puts: creating, writing and sealing in one call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PutError {
    /// Creating the object failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Sealing the object failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The value could not be encoded.
    #[error("cannot encode the value: {0}")]
    Encode(String),
}

/// Errors from [`StoreClient::build_with_fresh_id`](crate::StoreClient::build_with_fresh_id):
/// the store's, or the caller's filling the object.
#[derive(Debug, thiserror::Error)]
pub enum BuildError<E> {
    /// Creating or sealing the object failed.
    #[error(transparent)]
    Store(#[from] PutError),
    /// The caller's `fill` failed; nothing was stored.
    #[error("filling the object failed")]
    Fill(E),
    /// The object cannot be lent to the reader named.
    #[error(transparent)]
    Lend(LendError),
}

impl From<ConnectionError> for PutError {
    fn from(e: ConnectionError) -> Self {
        PutError::Create(CreateError::Connection(e))
    }
}

/// Errors from [`StoreClient::get`](crate::StoreClient::get).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GetError {
    /// The object was not sealed within the timeout.
    #[error("object {id} was not available within {timeout:?}")]
    Timeout {
        /// The object.
        id: ObjectId,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The object was spilled and could not be restored; it is gone.
    #[error("object {id} was lost: {reason}")]
    Lost {
        /// The object.
        id: ObjectId,
        /// Why.
        reason: String,
    },
    /// The object is spilled and no room could be made to restore it.
    #[error("cannot restore a spilled object: {0}")]
    StoreFull(String),
    /// The object was deleted while it was being restored.
    #[error("object {0} was deleted")]
    Deleted(ObjectId),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<WireError> for GetError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Timeout { id, timeout_ms } => GetError::Timeout {
                id,
                timeout: Duration::from_millis(timeout_ms),
            },
            WireError::Lost { id, reason } => GetError::Lost { id, reason },
            e @ (WireError::StoreFull { .. } | WireError::TooLarge { .. }) => {
                GetError::StoreFull(e.to_string())
            }
            WireError::NotFound(id) => GetError::Deleted(id),
            other => GetError::Connection(unexpected(other)),
        }
    }
}

/// Errors from [`StoreClient::get_value`](crate::StoreClient::get_value).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GetValueError {
    /// Getting the object failed.
    #[error(transparent)]
    Get(#[from] GetError),
    /// The object's bytes are not an encoding of the requested type.
    #[error("cannot decode object {id}: {reason}")]
    Decode {
        /// The object.
        id: ObjectId,
        /// The decoder's message.
        reason: String,
    },
}

/// Errors from [`StoreClient::delete`](crate::StoreClient::delete).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeleteError {
    /// No sealed object with this id.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<WireError> for DeleteError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NotFound(id) => DeleteError::NotFound(id),
            other => DeleteError::Connection(unexpected(other)),
        }
    }
}

/// A typed view of an object's bytes is impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The object's length is not a whole number of elements.
    #[error("object length {len} is not a multiple of the element size {elem}")]
    Length {
        /// Object length in bytes.
        len: usize,
        /// Element size in bytes.
        elem: usize,
    },
    /// The element type needs more alignment than the object has.
    #[error("element alignment {align} exceeds the object's alignment")]
    Alignment {
        /// The element type's alignment.
        align: usize,
    },
}

/// Errors from [`ObjectView::lend_to`](crate::ObjectView::lend_to) and
/// [`ObjectBuf::seal_lent`](crate::ObjectBuf::seal_lent).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LendError {
    /// The reader is a client of another store.
    #[error("{0:?} is a client of another store")]
    OtherStore(StoreSeat),
    /// Sealing the object failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

/// Errors from [`StoreClient::adopt`](crate::StoreClient::adopt).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdoptError {
    /// The ticket lends the pin to another client (of this store or
    /// another).
    #[error("object {id} was lent to {to:?}, not to {me:?}")]
    NotMine {
        /// The object.
        id: ObjectId,
        /// Whom it was lent to.
        to: StoreSeat,
        /// This client.
        me: StoreSeat,
    },
    /// The ticket's bytes lie outside the arena, or disagree with a view
    /// this process holds of the same object.
    #[error("object {id} was lent with bytes {offset}..+{len}, which do not match the arena")]
    BadRange {
        /// The object.
        id: ObjectId,
        /// Offset named by the ticket.
        offset: u64,
        /// Length named by the ticket.
        len: u64,
    },
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}
