//! Lending a pinned object to another client of the same store, so the
//! reader holds it without a round trip to the store.
//!
//! A `get` asks the store to pin an object and waits for its answer: tens
//! of microseconds when the store's thread is busy. A process that hands
//! an object it pins to a known reader (a stream channel's sender, say)
//! can instead lend it:
//!
//! 1. The lender calls [`ObjectView::lend_to`] (or seals the object with
//!    [`ObjectBuf::seal_lent`], or builds it with
//!    [`StoreClient::build_lent_with_fresh_id`], which lend in the same
//!    message) with the reader's
//!    [`StoreSeat`] (its store and connection): a one-way [`Request::Lend`] asks the store to give the
//!    reader one pin, and the returned [`LendTicket`] (id, offset, length)
//!    travels to the reader by any means (a ring, a call).
//! 2. The reader calls [`StoreClient::adopt`] with the ticket and holds an
//!    [`ObjectView`] at once, checked against its mapping of the arena.
//!    When its last view goes, the pin is released with
//!    [`Request::ReleaseLent`].
//!
//! Why the bytes stay put in between: the lender's pin is released on the
//! lender's connection, after the lend it sent on the same connection, so
//! the store gives the reader its pin before it can drop the lender's. The
//! reader's release travels on another connection and may reach the store
//! first; the store then notes it and cancels the lend when it arrives. A
//! reader that dies drops its pins with its connection, and a lend to a
//! client that is gone is dropped.
//!
//! Lending trusts the lender as `get` trusts the store: every process on
//! the node maps the same arena. A ticket of another store, or for another
//! client, is refused.
//!
//! [`Request::Lend`]: crate::protocol::Request::Lend
//! [`Request::ReleaseLent`]: crate::protocol::Request::ReleaseLent

use crate::client::StoreClient;
use crate::error::{AdoptError, BuildError, LendError, PutError};
use crate::protocol::Request;
use crate::view::{ObjectBuf, ObjectView};
use crate::{ObjectId, StoreSeat};
use serde::{Deserialize, Serialize};

/// What a reader needs to hold an object lent to it: see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LendTicket {
    id: ObjectId,
    offset: u64,
    len: u64,
    to: StoreSeat,
}

impl LendTicket {
    /// The lent object.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the object has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The client the pin was lent to.
    pub fn to(&self) -> StoreSeat {
        self.to
    }
}

impl LendTicket {
    fn of(view: &ObjectView, to: StoreSeat) -> LendTicket {
        LendTicket {
            id: view.id(),
            offset: view.offset(),
            len: view.len() as u64,
            to,
        }
    }
}

impl ObjectBuf {
    /// Seals the object and lends it to `to` in the same request (see
    /// [`ObjectView::lend_to`]): the reader's pin exists from the moment
    /// the object is sealed, so this process may drop its view at once.
    pub fn seal_lent(self, to: &StoreSeat) -> Result<(ObjectView, LendTicket), LendError> {
        if to.arena_id != self.client().arena_id() {
            return Err(LendError::OtherStore(*to));
        }
        let view = self.seal_lending(Some(to.client))?;
        let ticket = LendTicket::of(&view, *to);
        Ok((view, ticket))
    }
}

impl ObjectView {
    /// Lends this object to `to`, a client of the same store: `to` gets
    /// one pin without asking the store, by [adopting](StoreClient::adopt)
    /// the returned ticket. Costs one one-way message to the store. Keep
    /// this view (or another of the object) until the ticket has been
    /// sent: the lend travels before this process's release of the object.
    pub fn lend_to(&self, to: &StoreSeat) -> Result<LendTicket, LendError> {
        let client = self.client();
        if to.arena_id != client.arena_id() {
            return Err(LendError::OtherStore(*to));
        }
        client.send_oneway(Request::Lend {
            id: self.id(),
            to: to.client,
        })?;
        Ok(LendTicket::of(self, *to))
    }
}

impl StoreClient {
    /// [`StoreClient::build_with_fresh_id`], lending the object to `to` as
    /// it is sealed (see [`ObjectBuf::seal_lent`]). An object of up to the
    /// store's leased size costs no round trip to the store, lend included.
    pub fn build_lent_with_fresh_id<E>(
        &self,
        id: ObjectId,
        size: u64,
        to: &StoreSeat,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(ObjectView, LendTicket), BuildError<E>> {
        if to.arena_id != self.inner().arena_id() {
            return Err(BuildError::Lend(LendError::OtherStore(*to)));
        }
        if self.fits_lease(size) {
            let view = self.build_leased(id, size, fill, Some(to.client))?;
            let ticket = LendTicket::of(&view, *to);
            return Ok((view, ticket));
        }
        let mut buf = self.create(id, size).map_err(PutError::from)?;
        fill(buf.as_mut_slice()).map_err(BuildError::Fill)?;
        buf.seal_lent(to).map_err(BuildError::Lend)
    }

    /// This connection, as a lender names it.
    pub fn seat(&self) -> StoreSeat {
        let inner = self.inner();
        StoreSeat {
            arena_id: inner.arena_id(),
            client: inner.client_id(),
        }
    }

    /// Holds an object lent to this client (see the [module](crate::lend)
    /// docs): returns a view of it at once, with no round trip to the
    /// store. The ticket must be adopted exactly once.
    pub fn adopt(&self, ticket: &LendTicket) -> Result<ObjectView, AdoptError> {
        let inner = self.inner();
        let me = self.seat();
        if ticket.to != me {
            return Err(AdoptError::NotMine {
                id: ticket.id,
                to: ticket.to,
                me,
            });
        }
        let held = inner.pinned_range(ticket.id);
        let adopted = match held {
            Some(range) if range != (ticket.offset, ticket.len) => Err(()),
            _ => inner
                .adopt_lent(ticket.id, ticket.offset, ticket.len)
                .map_err(|_| ()),
        };
        if adopted.is_err() {
            // The pin was lent all the same: hand it back.
            let _ = inner.send_oneway(Request::ReleaseLent { id: ticket.id });
            return Err(AdoptError::BadRange {
                id: ticket.id,
                offset: ticket.offset,
                len: ticket.len,
            });
        }
        Ok(ObjectView::new(
            std::sync::Arc::clone(inner),
            ticket.id,
            ticket.offset,
            ticket.len,
        ))
    }
}
