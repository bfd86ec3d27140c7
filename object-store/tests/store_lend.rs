//! Lending pins: a reader holds a lent object with no round trip, keeps it
//! after the lender let go, and gives the pin back however the lend and the
//! release meet at the store; tickets for someone else are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_store::protocol::{Reply, Request, WireError};
use braid_store::{AdoptError, LendError, ObjectId, StoreClient};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(5);

fn pins(client: &StoreClient) -> u64 {
    client.stats().unwrap().pins
}

#[test]
fn a_lent_object_outlives_its_lender_and_is_freed_after_the_reader() {
    let store = StoreProcess::start(64 << 20, false);
    let lender = StoreClient::connect(&store.socket).unwrap();
    let reader = StoreClient::connect(&store.socket).unwrap();
    let data = pattern(11, 200_000);
    let id = ObjectId::random();
    let mut buf = lender.create(id, data.len() as u64).unwrap();
    buf.as_mut_slice().copy_from_slice(&data);
    let sealed = buf.seal().unwrap();
    let ticket = sealed.lend_to(&reader.seat()).unwrap();
    assert_eq!((ticket.id(), ticket.len()), (id, data.len() as u64));

    // The lender lets go and deletes the object before the reader adopts.
    drop(sealed);
    lender.delete(id).unwrap();
    let view = reader.adopt(&ticket).unwrap();
    assert_eq!(view.as_bytes(), &data[..]);
    assert_in_range(view.as_bytes().as_ptr(), view.len(), &reader.arena_range());
    assert_eq!(reader.pinned_objects(), 1);
    // The lender's release and delete came after the lend on its
    // connection: the reader's pin is the only one left.
    eventually(WAIT, || pins(&lender) == 1);
    assert!(
        !lender.contains(id).unwrap(),
        "deleted, pending the last pin"
    );

    let clone = view.clone();
    drop(view);
    assert_eq!(clone.as_bytes()[..8], data[..8]);
    drop(clone);
    eventually(WAIT, || {
        let stats = lender.stats().unwrap();
        stats.pins == 0 && stats.sealed_objects == 0
    });
}

#[test]
fn a_release_that_overtakes_its_lend_cancels_it() {
    let store = StoreProcess::start(64 << 20, false);
    let owner = StoreClient::connect(&store.socket).unwrap();
    let mut lender = RawConn::connect(&store.socket);
    let mut reader = RawConn::connect(&store.socket);
    let id = ObjectId::random();
    let created = lender.call(
        1,
        Request::Create {
            id,
            size: 4096,
            evictable: false,
        },
    );
    assert!(
        matches!(created.body, Ok(Reply::Created { .. })),
        "{created:?}"
    );
    assert_eq!(
        lender.call(2, Request::Seal { id, lend_to: None }).body,
        Ok(Reply::Sealed)
    );

    // The reader's release reaches the store first ...
    let released = reader.call(3, Request::ReleaseLent { id });
    assert_eq!(released.body, Ok(Reply::Released));
    assert_eq!(pins(&owner), 1, "only the lender's pin");
    // ... and the lend that follows gives no pin.
    let to = reader.hello.client_id;
    assert_eq!(
        lender.call(4, Request::Lend { id, to }).body,
        Ok(Reply::Lent)
    );
    assert_eq!(pins(&owner), 1);
    assert_eq!(
        lender.call(5, Request::Release { id }).body,
        Ok(Reply::Released)
    );
    assert_eq!(pins(&owner), 0);

    // In the usual order the lend pins and the release unpins.
    assert!(lender
        .call(6, Request::Get { id, timeout_ms: 0 })
        .body
        .is_ok());
    assert_eq!(
        lender.call(7, Request::Lend { id, to }).body,
        Ok(Reply::Lent)
    );
    assert_eq!(pins(&owner), 2);
    assert_eq!(
        lender.call(8, Request::Release { id }).body,
        Ok(Reply::Released)
    );
    assert_eq!(
        reader.call(9, Request::ReleaseLent { id }).body,
        Ok(Reply::Released)
    );
    assert_eq!(pins(&owner), 0);
    // A plain release of a pin the reader does not hold is still an error.
    assert_eq!(
        reader.call(10, Request::Release { id }).body,
        Err(WireError::NotPinned(id))
    );
}

#[test]
fn only_a_pinned_object_may_be_lent_and_a_lend_to_a_gone_client_is_dropped() {
    let store = StoreProcess::start(64 << 20, false);
    let owner = StoreClient::connect(&store.socket).unwrap();
    let mut lender = RawConn::connect(&store.socket);
    let view = owner.put(&pattern(2, 1000)).unwrap();
    let id = view.id();
    let to = owner.client_id();
    assert_eq!(
        lender.call(1, Request::Lend { id, to }).body,
        Err(WireError::NotPinned(id)),
        "the lender does not pin it"
    );

    let gone = RawConn::connect(&store.socket);
    let gone_id = gone.hello.client_id;
    drop(gone);
    eventually(WAIT, || owner.stats().unwrap().clients == 2);
    assert!(lender
        .call(2, Request::Get { id, timeout_ms: 0 })
        .body
        .is_ok());
    assert_eq!(
        lender.call(3, Request::Lend { id, to: gone_id }).body,
        Ok(Reply::Lent)
    );
    assert_eq!(pins(&owner), 2, "the owner's and the lender's");
}

#[test]
fn a_reader_that_disconnects_gives_its_lent_pins_back() {
    let store = StoreProcess::start(64 << 20, false);
    let owner = StoreClient::connect(&store.socket).unwrap();
    let view = owner.put(&pattern(5, 100_000)).unwrap();
    let id = view.id();
    let mut lender = RawConn::connect(&store.socket);
    let reader = RawConn::connect(&store.socket);
    let to = reader.hello.client_id;
    assert!(lender
        .call(1, Request::Get { id, timeout_ms: 0 })
        .body
        .is_ok());
    assert_eq!(
        lender.call(2, Request::Lend { id, to }).body,
        Ok(Reply::Lent)
    );
    assert_eq!(
        lender.call(3, Request::Release { id }).body,
        Ok(Reply::Released)
    );
    assert_eq!(pins(&owner), 2, "the owner's and the reader's");
    drop(reader);
    eventually(WAIT, || pins(&owner) == 1);
    drop(view);
    eventually(WAIT, || pins(&owner) == 0);
}

#[test]
fn tickets_for_another_client_or_store_are_refused() {
    let store = StoreProcess::start(64 << 20, false);
    let other_store = StoreProcess::start(64 << 20, false);
    let lender = StoreClient::connect(&store.socket).unwrap();
    let reader = StoreClient::connect(&store.socket).unwrap();
    let stranger = StoreClient::connect(&other_store.socket).unwrap();
    let view = lender.put(&pattern(9, 3000)).unwrap();

    let ticket = view.lend_to(&reader.seat()).unwrap();
    assert!(matches!(
        lender.adopt(&ticket),
        Err(AdoptError::NotMine { to, .. }) if to == reader.seat()
    ));
    assert!(matches!(
        stranger.adopt(&ticket),
        Err(AdoptError::NotMine { .. })
    ));
    assert!(matches!(
        view.lend_to(&stranger.seat()),
        Err(LendError::OtherStore(seat)) if seat == stranger.seat()
    ));
    // Adopting twice in one process shares one pin at the store.
    let first = reader.adopt(&ticket).unwrap();
    let again = view.lend_to(&reader.seat()).unwrap();
    let second = reader.adopt(&again).unwrap();
    assert_eq!(first.as_bytes(), second.as_bytes());
    assert_eq!(reader.pinned_objects(), 1);
    drop((first, second));
    drop(view);
    eventually(WAIT, || pins(&lender) == 0);
}
