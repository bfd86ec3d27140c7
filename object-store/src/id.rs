//! Object identifiers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 16-byte object identifier, unique within a cluster.
///
/// Fresh ids come from [`ObjectId::random`] (UUID v4); callers that derive
/// ids deterministically (a task id and a return index, say) build them with
/// [`ObjectId::from_bytes`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId([u8; 16]);

impl ObjectId {
    /// Number of bytes in an id.
    pub const LEN: usize = 16;

    /// A fresh random id (UUID v4: 122 random bits).
    pub fn random() -> Self {
        ObjectId(*uuid::Uuid::new_v4().as_bytes())
    }

    /// An id from its raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        ObjectId(bytes)
    }

    /// The raw bytes of the id.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl std::str::FromStr for ObjectId {
    type Err = ParseObjectIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(ParseObjectIdError(s.to_owned()));
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| ParseObjectIdError(s.to_owned()))?;
        }
        Ok(ObjectId(out))
    }
}

/// A client connection of one store, numbered by the store from 1 in
/// connection order and never reused while the store runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct ClientId(u64);

impl ClientId {
    /// The id numbered `n`.
    pub const fn new(n: u64) -> Self {
        ClientId(n)
    }

    /// Its number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}", self.0)
    }
}

/// One client connection of one store, as a lender names its reader
/// ([`StoreClient::seat`](crate::StoreClient::seat)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoreSeat {
    pub(crate) arena_id: u64,
    pub(crate) client: ClientId,
}

impl StoreSeat {
    /// The connection.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// Whether `other` is a connection of the same store.
    pub fn same_store(&self, other: &StoreSeat) -> bool {
        self.arena_id == other.arena_id
    }
}

/// The text was not 32 hexadecimal digits.
#[derive(Debug, thiserror::Error)]
#[error("not an object id (expected 32 hex digits): {0:?}")]
pub struct ParseObjectIdError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = ObjectId::random();
        let back: ObjectId = id.to_string().parse().unwrap();
        assert_eq!(id, back);
        assert!("xyz".parse::<ObjectId>().is_err());
    }
}
