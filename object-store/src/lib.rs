//! braid-store: the per-node shared-memory object store.
//!
//! (crate docs are written once the client API settles)

pub mod allocator;
pub mod batch;
pub mod codec;
pub mod id;

pub use id::ObjectId;
