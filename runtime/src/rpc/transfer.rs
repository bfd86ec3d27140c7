//! Moving an object from one node's store to another's.
//!
//! * The node that has the object serves `Node.PullObject` with
//!   [`pull_stream`]: chunks straight out of the sealed object's bytes in
//!   the store's shared memory (the view pins the object while it streams).
//! * The node that wants it calls [`pull_into`]: it checks every chunk
//!   (offset, CRC-32, total size), writes it in place into a new object of
//!   its own store, and seals it only once the whole object arrived intact.
//!   A failed transfer leaves nothing visible: the unsealed object is
//!   aborted.
//!
//! Store calls block on the store's socket (and a create may spill), so they
//! run on tokio's blocking pool.

use super::node_client::NodeClient;
use super::proto::ObjectChunk;
use crate::error::Error;
use braid_store::{
    ConnectionError, CreateError, GetError, ObjectBuf, ObjectId, ObjectView, SealError, StoreClient,
};
use futures::Stream;
use prost::bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status, Streaming};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// How long [`pull_stream`] waits for the object to be in the store. Short:
/// the puller asked because the object is supposed to be here.
const GET_TIMEOUT: Duration = Duration::from_millis(50);

/// How long [`pull_into`] waits for the next chunk before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The object store failed during a transfer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreFailure {
    /// Creating the destination object failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Sealing the destination object failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Talking to the store failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The blocking store call panicked or was cancelled.
    #[error("store call failed: {0}")]
    Task(String),
}

/// Why [`pull_into`] failed. Nothing was stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    /// The node does not have the object.
    #[error("object {0} is not on the node")]
    NotFound(ObjectId),
    /// A chunk was damaged or out of place.
    #[error("corrupt chunk of object {id} from {peer} at offset {offset}: {reason}")]
    Corrupt {
        /// The object.
        id: ObjectId,
        /// The node it came from.
        peer: String,
        /// Offset of the bad chunk.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// The stream ended before the whole object arrived.
    #[error("object {id} from {peer} ended after {received} of {expected} bytes")]
    Truncated {
        /// The object.
        id: ObjectId,
        /// The node it came from.
        peer: String,
        /// Bytes received.
        received: u64,
        /// The object's size.
        expected: u64,
    },
    /// The local store failed.
    #[error("object store: {0}")]
    Store(#[from] StoreFailure),
    /// The node refused the transfer, or its connection failed.
    #[error("pulling object {id} from {peer} failed: {message}")]
    Connection {
        /// The object.
        id: ObjectId,
        /// The node's object-plane address.
        peer: String,
        /// What went wrong.
        message: String,
    },
    /// The call failed.
    #[error("pulling object {id} from {peer} failed: {code:?}: {message}")]
    Rpc {
        /// The object.
        id: ObjectId,
        /// The node called.
        peer: String,
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

impl From<TransferError> for Error {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::NotFound(id) => Error::lost(id),
            TransferError::Rpc {
                code: Code::Unauthenticated,
                message,
                ..
            } => Error::Unauthenticated(message),
            TransferError::Store(StoreFailure::Create(
                full @ (CreateError::StoreFull { .. } | CreateError::TooLarge { .. }),
            )) => Error::StoreFull(full.to_string()),
            TransferError::Store(failure) => Error::Unreachable {
                address: "the local object store".to_owned(),
                message: failure.to_string(),
            },
            ref other @ (TransferError::Corrupt { ref peer, .. }
            | TransferError::Truncated { ref peer, .. }
            | TransferError::Connection { ref peer, .. }
            | TransferError::Rpc { ref peer, .. }) => Error::Unreachable {
                address: peer.clone(),
                message: other.to_string(),
            },
        }
    }
}

/// A range of a pinned object, handed to gRPC without copying.
struct ViewSlice {
    view: Arc<ObjectView>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for ViewSlice {
    fn as_ref(&self) -> &[u8] {
        self.view
            .as_bytes()
            .get(self.start..self.end)
            .unwrap_or(&[])
    }
}

enum PullState {
    Start(Arc<StoreClient>),
    Streaming {
        view: Arc<ObjectView>,
        offset: usize,
    },
    Done,
}

fn get_status(id: ObjectId, e: GetError) -> Status {
    match e {
        GetError::Timeout { .. } | GetError::Lost { .. } | GetError::Deleted(_) => {
            Status::not_found(format!("object {id} is not in this node's store: {e}"))
        }
        GetError::StoreFull(_) => Status::resource_exhausted(e.to_string()),
        GetError::Connection(_) => Status::unavailable(e.to_string()),
    }
}

fn chunk_at(view: Arc<ObjectView>, offset: usize, chunk_size: usize) -> (ObjectChunk, PullState) {
    let total = view.len();
    let end = offset.saturating_add(chunk_size).min(total);
    let data = Bytes::from_owner(ViewSlice {
        view: Arc::clone(&view),
        start: offset,
        end,
    });
    let chunk = ObjectChunk {
        total_size: total as u64,
        offset: offset as u64,
        crc32: crc32fast::hash(&data),
        data,
    };
    (chunk, PullState::Streaming { view, offset: end })
}

/// Serves `Node.PullObject`: the chunks (of `chunk_size` bytes, at least
/// one, see [`DEFAULT_CHUNK_SIZE`]) of the sealed object `id`, straight
/// from the store's memory. The first item is `NOT_FOUND` if the object is
/// not in the store. Every chunk carries the total size and its CRC-32.
pub fn pull_stream(
    store: Arc<StoreClient>,
    id: ObjectId,
    chunk_size: usize,
) -> impl Stream<Item = Result<ObjectChunk, Status>> + Send + 'static {
    let chunk_size = chunk_size.max(1);
    futures::stream::unfold(PullState::Start(store), move |state| async move {
        match state {
            PullState::Start(store) => {
                let got = tokio::task::spawn_blocking(move || store.get(id, GET_TIMEOUT)).await;
                let view = match got {
                    Ok(Ok(view)) => Arc::new(view),
                    Ok(Err(e)) => return Some((Err(get_status(id, e)), PullState::Done)),
                    Err(e) => {
                        return Some((
                            Err(Status::internal(format!("store call failed: {e}"))),
                            PullState::Done,
                        ))
                    }
                };
                // The first chunk goes out even for an empty object, to
                // carry the size.
                let (chunk, next) = chunk_at(view, 0, chunk_size);
                Some((Ok(chunk), next))
            }
            PullState::Streaming { view, offset } if offset < view.len() => {
                let (chunk, next) = chunk_at(view, offset, chunk_size);
                Some((Ok(chunk), next))
            }
            PullState::Streaming { .. } | PullState::Done => None,
        }
    })
}

async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreFailure> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| StoreFailure::Task(e.to_string()))
}

/// Pulls object `id` from the node behind `client` into `store`, checking
/// every chunk, and seals it once complete. Returns `Ok` at once if the
/// store has the object already, or when another puller is creating it
/// (its seal is then awaited by a `get`). On error nothing is stored.
pub async fn pull_into(
    client: &NodeClient,
    id: ObjectId,
    store: &StoreClient,
) -> Result<(), TransferError> {
    let peer = client.address().to_owned();
    let rpc_error = |status: Status| {
        if status.code() == Code::NotFound {
            TransferError::NotFound(id)
        } else {
            TransferError::Rpc {
                id,
                peer: peer.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
    };

    let local = store.clone();
    if blocking(move || local.contains(id))
        .await?
        .map_err(StoreFailure::Connection)?
    {
        return Ok(());
    }
    let mut stream = client.pull_raw(id).await.map_err(rpc_error)?;
    let first = next_chunk(&mut stream).await.map_err(rpc_error)?;
    let Some(first) = first else {
        return Err(TransferError::Truncated {
            id,
            peer,
            received: 0,
            expected: 0,
        });
    };
    let total = first.total_size;
    let local = store.clone();
    let mut buf = match blocking(move || local.create(id, total)).await? {
        Ok(buf) => buf,
        Err(CreateError::AlreadyExists(_)) => return Ok(()),
        Err(e) => return Err(StoreFailure::Create(e).into()),
    };

    let mut received: u64 = 0;
    let mut pending = Some(first);
    loop {
        let chunk = match pending.take() {
            Some(chunk) => chunk,
            None => match next_chunk(&mut stream).await.map_err(rpc_error)? {
                Some(chunk) => chunk,
                None => break,
            },
        };
        write_chunk(&mut buf, &chunk, received, total).map_err(|reason| {
            TransferError::Corrupt {
                id,
                peer: peer.clone(),
                offset: chunk.offset,
                reason,
            }
        })?;
        received += chunk.data.len() as u64;
    }
    if received != total {
        return Err(TransferError::Truncated {
            id,
            peer,
            received,
            expected: total,
        });
    }
    blocking(move || buf.seal().map(drop))
        .await?
        .map_err(StoreFailure::Seal)?;
    Ok(())
}

/// The next chunk, `None` at the end; a stalled stream is an error.
async fn next_chunk(stream: &mut Streaming<ObjectChunk>) -> Result<Option<ObjectChunk>, Status> {
    match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no chunk for {IDLE_TIMEOUT:?}"
        ))),
    }
}

/// Checks a chunk and copies it into place.
fn write_chunk(
    buf: &mut ObjectBuf,
    chunk: &ObjectChunk,
    received: u64,
    total: u64,
) -> Result<(), String> {
    let range = chunk_range(chunk, received, total)?;
    let dst = buf
        .as_mut_slice()
        .get_mut(range.clone())
        .ok_or_else(|| format!("range {range:?} is outside the buffer"))?;
    dst.copy_from_slice(&chunk.data);
    Ok(())
}

/// Checks a chunk a peer sent against the transfer so far (`received`
/// bytes of an object of `total` bytes): the same total as the first
/// chunk, the next offset, no overrun, an intact CRC-32. Returns where its
/// bytes go in the object; the error says what is wrong with it.
pub fn chunk_range(
    chunk: &ObjectChunk,
    received: u64,
    total: u64,
) -> Result<std::ops::Range<usize>, String> {
    if chunk.total_size != total {
        return Err(format!(
            "total size {} differs from the first chunk's {total}",
            chunk.total_size
        ));
    }
    if chunk.offset != received {
        return Err(format!("expected offset {received}"));
    }
    let len = chunk.data.len() as u64;
    let end = received
        .checked_add(len)
        .filter(|&end| end <= total)
        .ok_or_else(|| format!("{len} bytes overrun the object's {total}"))?;
    if crc32fast::hash(&chunk.data) != chunk.crc32 {
        return Err("CRC-32 mismatch".to_owned());
    }
    let start = usize::try_from(received).map_err(|e| e.to_string())?;
    let end = usize::try_from(end).map_err(|e| e.to_string())?;
    Ok(start..end)
}
