//! braid-store: the per-node shared-memory object store of braid.
//!
//! Every braid node runs one store. Its memory is a single anonymous `memfd`
//! arena, mapped by the store and by every local process, so an object
//! written by one process is read by another in place: no serialization, no
//! copy. A streaming operator hands a feature batch to a training actor this
//! way.
//!
//! * [`StoreServer`] owns the arena, the [allocator], the
//!   [object table](object_table) and the [spill file](spill), and serves
//!   clients over a Unix socket ([protocol]). The node daemon embeds it;
//!   `braid-store serve` runs it alone.
//! * [`StoreClient`] connects, receives the arena's descriptor (SCM_RIGHTS),
//!   maps it, and hands out [`ObjectBuf`]s to write and [`ObjectView`]s to
//!   read: bytes, `&[T]` for plain-old-data `T`, or a columnar
//!   [batch]. Other values go through the [codec].
//! * An object lives `create` → written in place → `seal` (immutable) →
//!   `get` (waits until sealed, with a timeout) → views dropped (`release`)
//!   → `delete`. Pins are counted per connection; a client that exits, panics
//!   or is killed loses its pins and its unsealed objects with its socket.
//! * A process handing an object to a reader it knows (a stream channel's
//!   sender) [lends](lend) the reader a pin as it seals the object; the
//!   reader adopts the [`LendTicket`] and holds the object with no round
//!   trip to the store.
//! * Under memory pressure the store evicts unpinned evictable copies in LRU
//!   order, spills unpinned primary objects to disk and restores them on
//!   `get`, and answers [`CreateError::StoreFull`] only when nothing can move.
//!   It never lets a process touch a page it could not back (no SIGBUS).
//!
//! ```
//! use braid_store::{ObjectId, StoreClient, StoreConfig, StoreServer};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let socket = dir.path().join("store.sock");
//!
//! // A store with a 64 MiB arena, served from a background runtime.
//! let runtime = tokio::runtime::Runtime::new()?;
//! let server = runtime.block_on(StoreServer::bind(StoreConfig::with_capacity(&socket, 64 << 20)))?;
//! let handle = server.handle();
//! runtime.spawn(server.run());
//!
//! // Write an array in place and seal it.
//! let writer = StoreClient::connect(&socket)?;
//! let id = ObjectId::random();
//! let mut buf = writer.create(id, 4 * 1024)?;
//! buf.as_mut_typed::<f32>()?.fill(0.5);
//! let _pinned = buf.seal()?;
//!
//! // Any other client on the node (usually another process) reads it in place.
//! let reader = StoreClient::connect(&socket)?;
//! let view = reader.get(id, Duration::from_secs(1))?;
//! let values: &[f32] = view.as_slice()?;
//! assert_eq!(values.len(), 1024);
//! assert!(reader.arena_range().contains(&(values.as_ptr() as usize)));
//!
//! handle.shutdown();
//! # Ok(())
//! # }
//! ```

pub mod allocator;
pub mod arena;
pub mod batch;
pub mod client;
pub mod codec;
pub mod config;
pub mod error;
pub mod id;
pub mod lend;
pub mod object_table;
pub mod protocol;
pub mod server;
pub mod socket_path;
pub mod spill;
pub mod view;

pub use client::StoreClient;
pub use config::StoreConfig;
pub use error::{
    AdoptError, BuildError, ConnectionError, CreateError, DeleteError, GetError, GetValueError,
    LendError, PutError, SealError, ViewError,
};
pub use id::{ClientId, ObjectId, StoreSeat};
pub use lend::LendTicket;
pub use protocol::{ObjectInfo, ObjectState, StoreStats};
pub use server::{ServeError, StoreHandle, StoreServer};
pub use view::{ObjectBuf, ObjectView};
/// Arrow, braid's columnar format, as the store reads and writes it.
pub use {arrow_array, arrow_buffer, arrow_schema};
