//! The store's local wire protocol: length-prefixed frames over a Unix
//! socket.
//!
//! A frame is a little-endian `u32` body length followed by the body, a
//! [`codec`](crate::codec)-encoded [`RequestFrame`] (client to store) or
//! [`ReplyFrame`] (store to client). Bodies are bounded by [`MAX_FRAME`];
//! a zero or oversized length, or a body that does not decode to exactly one
//! message, is malformed: the store answers with
//! [`WireError::Malformed`] and closes that connection only.
//!
//! The first frame on a connection is the store's [`Hello`], sent with the
//! arena's memfd attached (`SCM_RIGHTS`).
//!
//! Requests with `seq == 0` are one-way: the store sends no reply. Clients
//! use them for releases and for sealing objects in leased blocks, which is
//! what keeps small puts and releases off the socket round trip.

use crate::allocator::AllocStats;
use crate::{ClientId, ObjectId};
use serde::{Deserialize, Serialize};

/// Protocol version; a client and a store with different versions refuse
/// each other at the handshake.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame body either side accepts, in bytes.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Length of the frame header (the body length).
pub const HEADER_LEN: usize = 4;

/// The store's greeting, sent with the arena's memfd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the store.
    pub version: u32,
    /// Length of the arena in bytes (the client maps all of it).
    pub arena_len: u64,
    /// The id the store gave this connection.
    pub client_id: ClientId,
    /// Process id of the store.
    pub store_pid: u32,
    /// Largest object the client may place in a leased block.
    pub max_leased_size: u64,
    /// Random number naming this store's arena, so a lend ticket from
    /// another store is refused.
    pub arena_id: u64,
}

/// A request and the sequence number its reply will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Echoed in the reply; 0 asks for no reply.
    pub seq: u64,
    /// The request.
    pub body: Request,
}

/// What a client asks of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Allocate `size` bytes for a new object this client will write.
    Create {
        /// The new object's id.
        id: ObjectId,
        /// Size in bytes.
        size: u64,
        /// Whether the store may drop the object under memory pressure
        /// (a secondary copy) rather than spill it.
        evictable: bool,
    },
    /// Make an object this client created immutable and visible; the client
    /// keeps one pin on it.
    Seal {
        /// The object.
        id: ObjectId,
        /// A client to lend one pin to at once, as [`Request::Lend`] would.
        lend_to: Option<ClientId>,
    },
    /// Discard an unsealed object this client created.
    Abort {
        /// The object.
        id: ObjectId,
    },
    /// Pin a sealed object, waiting up to `timeout_ms` for it to be sealed.
    Get {
        /// The object.
        id: ObjectId,
        /// How long to wait for the object to appear and be sealed.
        timeout_ms: u64,
    },
    /// Drop one pin this client holds.
    Release {
        /// The object.
        id: ObjectId,
    },
    /// Remove an object; its memory is freed once no client pins it.
    Delete {
        /// The object.
        id: ObjectId,
    },
    /// Whether a sealed object with this id exists (resident or spilled).
    Contains {
        /// The object.
        id: ObjectId,
    },
    /// The store's counters.
    Stats,
    /// Reserve `count` blocks of `class` bytes for this client's small puts.
    Lease {
        /// Block size, a power of two.
        class: u64,
        /// Number of blocks.
        count: u32,
    },
    /// Turn a leased block, already written, into a sealed object pinned by
    /// this client.
    PutLeased {
        /// The new object's id.
        id: ObjectId,
        /// Offset of the leased block.
        offset: u64,
        /// Size of the object (at most the block size).
        size: u64,
        /// A client to lend one pin to at once, as [`Request::Lend`] would.
        lend_to: Option<ClientId>,
    },
    /// Give client `to` one pin on an object this client pins, as if `to`
    /// had got it (one-way; see [`crate::lend`]). Ignored when `to` is no
    /// longer connected.
    Lend {
        /// The object.
        id: ObjectId,
        /// The client that will read it.
        to: ClientId,
    },
    /// Drop one pin this client was lent. It may arrive before the
    /// [`Request::Lend`] that gives the pin (the two travel on different
    /// connections); the store then cancels that lend when it arrives.
    ReleaseLent {
        /// The object.
        id: ObjectId,
    },
}

/// A reply and the sequence number of the request it answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplyFrame {
    /// The request's `seq`, or 0 for an error that ends the connection.
    pub seq: u64,
    /// The answer.
    pub body: Result<Reply, WireError>,
}

/// Successful answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The object's block; the client writes `[offset, offset + size)`.
    Created {
        /// Offset in the arena.
        offset: u64,
    },
    /// The object is sealed.
    Sealed,
    /// The unsealed object was discarded.
    Aborted,
    /// The object is pinned for this client.
    Object {
        /// Offset in the arena.
        offset: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The pin is dropped.
    Released,
    /// The pin is lent.
    Lent,
    /// The object is deleted (or will be, once unpinned).
    Deleted,
    /// Answer to [`Request::Contains`].
    Contains(bool),
    /// Answer to [`Request::Stats`].
    Stats(StoreStats),
    /// Offsets of the leased blocks.
    Leased {
        /// Block offsets, each `class` bytes long.
        offsets: Vec<u64>,
    },
}

/// Errors as they cross the socket; the client turns them back into the
/// per-operation error enums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    /// No object with this id in the needed state.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// An object with this id exists already.
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    /// The object is sealed already.
    #[error("object {0} is already sealed")]
    AlreadySealed(ObjectId),
    /// Only the client that created an object may seal or abort it.
    #[error("object {0} was created by another client")]
    NotCreator(ObjectId),
    /// Neither eviction nor spilling could make room.
    #[error("store full: {requested} bytes requested, {free} free, largest free block {largest_free}, {pinned} bytes pinned")]
    StoreFull {
        /// Bytes requested.
        requested: u64,
        /// Bytes free.
        free: u64,
        /// Largest free block.
        largest_free: u64,
        /// Bytes held by pinned or unsealed objects, which cannot move.
        pinned: u64,
    },
    /// The object can never fit.
    #[error("{requested} bytes requested but the store holds only {capacity}")]
    TooLarge {
        /// Bytes requested.
        requested: u64,
        /// Arena capacity.
        capacity: u64,
    },
    /// `get` waited `timeout_ms` and the object was not sealed.
    #[error("object {id} was not sealed within {timeout_ms} ms")]
    Timeout {
        /// The object.
        id: ObjectId,
        /// The timeout that passed.
        timeout_ms: u64,
    },
    /// A spilled object could not be restored (I/O error or checksum
    /// mismatch); it has been removed.
    #[error("object {id} was lost while restoring it from spill: {reason}")]
    Lost {
        /// The object.
        id: ObjectId,
        /// What went wrong.
        reason: String,
    },
    /// A release for an object this client does not pin.
    #[error("object {0} is not pinned by this client")]
    NotPinned(ObjectId),
    /// A lease request or leased put that the store refuses.
    #[error("bad lease: {0}")]
    BadLease(String),
    /// The request could not be parsed; the store closes the connection.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The store failed internally (an I/O error, say).
    #[error("store error: {0}")]
    Internal(String),
}

/// Where an object is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectState {
    /// Its creator is writing it.
    Creating,
    /// Sealed, in memory.
    Sealed,
    /// Sealed, being copied to the spill file.
    Spilling,
    /// Sealed, its bytes only in the spill file.
    Spilled,
    /// Being read back from the spill file.
    Restoring,
}

/// One object of a store, as listed by `StoreHandle::objects`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// The object.
    pub id: crate::ObjectId,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is in its life.
    pub state: ObjectState,
    /// Pins clients hold on it.
    pub pins: u32,
}

/// The store's counters, as reported by [`Request::Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Allocator figures for the arena.
    pub arena: AllocStats,
    /// Sealed objects resident in memory.
    pub sealed_objects: u64,
    /// Objects being written.
    pub unsealed_objects: u64,
    /// Objects spilled to disk.
    pub spilled_objects: u64,
    /// Bytes of spilled objects.
    pub spilled_bytes: u64,
    /// Pins held, summed over clients.
    pub pins: u64,
    /// Bytes in blocks leased to clients and not yet used.
    pub leased_bytes: u64,
    /// Connected clients.
    pub clients: u64,
    /// Objects evicted since start.
    pub evictions: u64,
    /// Objects spilled since start.
    pub spills: u64,
    /// Objects restored since start.
    pub restores: u64,
    /// Bytes written to disk by spills since start.
    pub spilled_bytes_total: u64,
    /// Bytes read back from disk by restores since start.
    pub restored_bytes_total: u64,
    /// Bytes of the arena backed by allocated pages.
    pub provisioned_bytes: u64,
}

/// Errors reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The declared length is zero or above [`MAX_FRAME`].
    #[error("frame length {0} is outside 1..={MAX_FRAME}")]
    BadLength(u32),
    /// The body does not decode to one message.
    #[error("undecodable frame body: {0}")]
    Undecodable(String),
    /// The socket failed, or closed inside a frame.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as a complete frame (header and body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, crate::codec::EncodeError> {
    let body_len = crate::codec::encoded_len(msg)?;
    let mut out = vec![0u8; HEADER_LEN + body_len as usize];
    crate::codec::encode_into(msg, &mut out[HEADER_LEN..])?;
    out[..HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out)
}

/// Validates a frame header, returning the body length.
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::BadLength(len));
    }
    Ok(len as usize)
}

/// Decodes a frame body.
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    crate::codec::decode_bounded(body, u64::from(MAX_FRAME))
        .map_err(|e| FrameError::Undecodable(e.to_string()))
}

/// Reads one frame from a blocking reader.
pub fn read_frame<T: serde::de::DeserializeOwned>(
    r: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = body_len(header)?;
    buf.resize(len, 0);
    r.read_exact(buf)?;
    decode_body(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let msg = RequestFrame {
            seq: 7,
            body: Request::Get {
                id: ObjectId::random(),
                timeout_ms: 5,
            },
        };
        let frame = encode_frame(&msg).unwrap();
        let mut cursor = std::io::Cursor::new(frame);
        let mut buf = Vec::new();
        let back: RequestFrame = read_frame(&mut cursor, &mut buf).unwrap();
        assert_eq!(back, msg);
        assert!(matches!(
            read_frame::<RequestFrame>(&mut cursor, &mut buf),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert!(matches!(body_len([0; 4]), Err(FrameError::BadLength(0))));
        let big = (MAX_FRAME + 1).to_le_bytes();
        assert!(matches!(body_len(big), Err(FrameError::BadLength(_))));
    }

    #[test]
    fn garbage_body_is_undecodable() {
        let r: Result<RequestFrame, _> = decode_body(&[0xff; 40]);
        assert!(matches!(r, Err(FrameError::Undecodable(_))));
    }
}
