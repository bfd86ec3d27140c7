//! braid-store: the per-node shared-memory object store.
//!
//! (crate docs are written once the client API settles)

pub mod allocator;
pub mod arena;
pub mod batch;
pub mod client;
pub mod codec;
pub mod config;
pub mod error;
pub mod id;
pub mod object_table;
pub mod protocol;
pub mod server;
pub mod spill;
pub mod view;

pub use client::StoreClient;
pub use config::StoreConfig;
pub use error::{
    ConnectionError, CreateError, DeleteError, GetError, GetValueError, PutError, SealError,
    ViewError,
};
pub use id::ObjectId;
pub use protocol::StoreStats;
pub use server::{ServeError, StoreHandle, StoreServer};
pub use view::{ObjectBuf, ObjectView};
