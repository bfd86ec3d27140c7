//! The lean framing braid processes speak to each other: drivers and
//! workers to their node daemon, and callers directly to workers and
//! actors, over Unix sockets (and shared-memory rings) on one machine and
//! over TCP between machines ([`transport`]). Frames are a little-endian `u32` length
//! and a bincode body, at most [`MAX_FRAME`] bytes; a malformed frame closes
//! that connection only. On an accepted connection, until the peer's
//! `Hello` with the cluster token is accepted, frames are capped at
//! [`HELLO_MAX_FRAME`] and the handshake must finish within
//! [`handshake_timeout`]; a connection that sends more, or too little, or
//! nothing is closed.

pub mod conn;
pub mod messages;
pub mod ring;
pub mod transport;

pub use conn::{Conn, Handler, Responder, Transport};
pub use messages::{Body, Frame, Message, Reply};
pub use transport::{Endpoint, MachineId, Route};

/// The largest frame either side accepts. Values above the inline limit
/// travel through the object store, so frames stay small.
pub const MAX_FRAME: usize = 64 << 20;

/// The largest frame an accepted connection may send before it has
/// authenticated (a `Hello` is a few hundred bytes).
pub const HELLO_MAX_FRAME: usize = 64 << 10;

/// Environment variable overriding [`handshake_timeout`], in milliseconds.
pub const HANDSHAKE_TIMEOUT_VAR: &str = "BRAID_HANDSHAKE_TIMEOUT_MS";

/// The handshake timeout unless [`HANDSHAKE_TIMEOUT_VAR`] says otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an accepted connection has, from accept, to have its `Hello`
/// accepted: [`DEFAULT_HANDSHAKE_TIMEOUT`], or [`HANDSHAKE_TIMEOUT_VAR`]
/// milliseconds (read once per process; an unparsable value is ignored
/// with a warning).
pub fn handshake_timeout() -> std::time::Duration {
    static TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *TIMEOUT.get_or_init(|| match std::env::var(HANDSHAKE_TIMEOUT_VAR) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => std::time::Duration::from_millis(ms),
            _ => {
                tracing::warn!(
                    "{HANDSHAKE_TIMEOUT_VAR}={text:?} is not a positive number of milliseconds; \
                     using {DEFAULT_HANDSHAKE_TIMEOUT:?}"
                );
                DEFAULT_HANDSHAKE_TIMEOUT
            }
        },
        Err(_) => DEFAULT_HANDSHAKE_TIMEOUT,
    })
}

/// Values up to this size travel inline in messages; larger ones go through
/// the object store.
pub const INLINE_LIMIT: usize = 100 * 1024;
