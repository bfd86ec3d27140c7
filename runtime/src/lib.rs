//! braid: a Ray-style runtime for fused computing.
//!
//! This crate will hold the API users import (init, tasks, actors,
//! `ObjectRef<T>`, get/wait/put), the head and node daemons and the `braid`
//! CLI. Today it re-exports the node-local object store, [`store`], which
//! everything else stands on.
//!
//! ```
//! use braid::store::ObjectId;
//! let id = ObjectId::random();
//! assert_eq!(id.as_bytes().len(), 16);
//! ```

pub use braid_store as store;
