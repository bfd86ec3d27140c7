//! The lean framing braid processes on one machine speak to each other over
//! Unix sockets: drivers and workers to their node daemon, and callers
//! directly to workers and actors. Frames are a little-endian `u32` length
//! and a bincode body, at most [`MAX_FRAME`] bytes; a malformed frame closes
//! that connection only.

pub mod conn;
pub mod messages;
pub mod ring;

pub use conn::{Conn, Handler, Responder};
pub use messages::{Body, Frame, Message, Reply};

/// The largest frame either side accepts. Values above the inline limit
/// travel through the object store, so frames stay small.
pub const MAX_FRAME: usize = 64 << 20;

/// Values up to this size travel inline in messages; larger ones go through
/// the object store.
pub const INLINE_LIMIT: usize = 100 * 1024;
