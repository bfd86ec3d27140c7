//! braid-actors: streaming dataflow graphs, exactly-once checkpoints,
//! parameter servers and FTRL, built on the [`braid`] runtime.
//!
//! The streaming and training layers arrive with later issues; the crate
//! exists now so the workspace has its final shape and dependency direction.
//!
//! ```
//! use braid_actors::braid::store::ObjectId;
//! assert_ne!(ObjectId::random(), ObjectId::random());
//! ```

pub use braid;
