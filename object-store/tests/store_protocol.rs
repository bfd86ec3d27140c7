//! The wire protocol under abuse: malformed frames are answered with
//! `Malformed` and end only their own connection; requests a client is not
//! entitled to get typed errors; a waiting `get` does not hold up the
//! requests behind it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use braid_store::protocol::{Reply, ReplyFrame, Request, WireError, MAX_FRAME};
use braid_store::{CreateError, DeleteError, ObjectId, StoreClient};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(5);

/// A store with one well-behaved client connected before any abuse.
struct Fixture {
    store: StoreProcess,
    client: StoreClient,
}

impl Fixture {
    fn new() -> Fixture {
        let store = StoreProcess::start_with(StoreOptions {
            // Every refused frame is logged as a warning; keep the output
            // readable.
            log: "error",
            ..StoreOptions::default()
        });
        let client = StoreClient::connect(&store.socket).unwrap();
        Fixture { store, client }
    }

    fn raw(&self) -> RawConn {
        RawConn::connect(&self.store.socket)
    }

    /// The store is alive, the old client works and a new one connects.
    fn assert_healthy(&self) {
        assert!(alive(self.store.pid()));
        let view = self.client.put(&pattern(3, 5000)).unwrap();
        let other = StoreClient::connect(&self.store.socket).unwrap();
        let seen = other.get(view.id(), WAIT).unwrap();
        assert_eq!(seen.as_bytes(), &pattern(3, 5000)[..]);
        drop((seen, other, view));
        let created = ObjectId::random();
        let mut buf = self.client.create(created, 100_000).unwrap();
        buf.as_mut_slice().fill(1);
        drop(buf.seal().unwrap());
        self.client.delete(created).unwrap();
    }
}

/// Reads the store's answer to a malformed frame, then end of file.
fn assert_refused(conn: &mut RawConn) -> String {
    let reply = conn.recv();
    let reason = match reply {
        ReplyFrame {
            seq: 0,
            body: Err(WireError::Malformed(reason)),
        } => reason,
        other => panic!("expected a Malformed reply, got {other:?}"),
    };
    conn.assert_closed();
    reason
}

#[test]
fn zero_length_frame_is_refused() {
    let f = Fixture::new();
    let mut conn = f.raw();
    conn.send_bytes(&0u32.to_le_bytes());
    let reason = assert_refused(&mut conn);
    assert!(reason.contains("length 0"), "{reason}");
    f.assert_healthy();
}

#[test]
fn oversized_frame_is_refused() {
    let f = Fixture::new();
    for len in [MAX_FRAME + 1, u32::MAX] {
        let mut conn = f.raw();
        conn.send_bytes(&len.to_le_bytes());
        let reason = assert_refused(&mut conn);
        assert!(reason.contains(&len.to_string()), "{reason}");
    }
    f.assert_healthy();
}

#[test]
fn truncated_frame_is_refused() {
    let f = Fixture::new();
    let mut conn = f.raw();
    let mut frame = 100u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 10]);
    conn.send_bytes(&frame);
    conn.shutdown_write();
    let reason = assert_refused(&mut conn);
    assert!(reason.contains("truncated"), "{reason}");
    f.assert_healthy();
}

#[test]
fn garbage_body_is_refused() {
    let f = Fixture::new();
    let mut conn = f.raw();
    let mut frame = 40u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 40]);
    conn.send_bytes(&frame);
    assert_refused(&mut conn);

    // A valid request with a byte too many is not one message either.
    let mut conn = f.raw();
    let mut frame = braid_store::protocol::encode_frame(&braid_store::protocol::RequestFrame {
        seq: 1,
        body: Request::Stats,
    })
    .unwrap();
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    conn.send_bytes(&frame);
    assert_refused(&mut conn);
    f.assert_healthy();
}

#[test]
fn random_bytes_are_refused() {
    let f = Fixture::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..50 {
        let len = 1 + (next() % 2048) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the time, a plausible length so the body is what is judged.
        if round % 2 == 0 && len > 4 {
            let body = (len - 4) as u32;
            bytes[..4].copy_from_slice(&body.to_le_bytes());
        }
        let mut conn = f.raw();
        conn.send_bytes(&bytes);
        conn.shutdown_write();
        assert_refused(&mut conn);
    }
    f.assert_healthy();
}

#[test]
fn requests_a_client_is_not_entitled_to_get_typed_errors() {
    let f = Fixture::new();
    let owned = ObjectId::random();
    let mut buf = f.client.create(owned, 1000).unwrap();
    let mut raw = f.raw();

    // Releasing an object it does not pin.
    let sealed = f.client.put(&pattern(1, 100_000)).unwrap();
    let reply = raw.call(1, Request::Release { id: sealed.id() });
    assert_eq!(reply.body, Err(WireError::NotPinned(sealed.id())));
    let ghost = ObjectId::random();
    let reply = raw.call(2, Request::Release { id: ghost });
    assert_eq!(reply.body, Err(WireError::NotPinned(ghost)));

    // Sealing or aborting another client's object.
    let reply = raw.call(
        3,
        Request::Seal {
            id: owned,
            lend_to: None,
        },
    );
    assert_eq!(reply.body, Err(WireError::NotCreator(owned)));
    let reply = raw.call(4, Request::Abort { id: owned });
    assert_eq!(reply.body, Err(WireError::NotCreator(owned)));

    // Sealing twice, sealing what does not exist.
    let reply = raw.call(
        5,
        Request::Seal {
            id: sealed.id(),
            lend_to: None,
        },
    );
    assert_eq!(reply.body, Err(WireError::AlreadySealed(sealed.id())));
    let reply = raw.call(
        6,
        Request::Seal {
            id: ghost,
            lend_to: None,
        },
    );
    assert_eq!(reply.body, Err(WireError::NotFound(ghost)));

    // Duplicate ids, unsealed or sealed, from the creator or anyone else.
    for id in [owned, sealed.id()] {
        match f.client.create(id, 10) {
            Err(CreateError::AlreadyExists(dup)) => assert_eq!(dup, id),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        let reply = raw.call(
            7,
            Request::Create {
                id,
                size: 10,
                evictable: false,
            },
        );
        assert_eq!(reply.body, Err(WireError::AlreadyExists(id)));
    }

    // Empty objects are objects like any other.
    let empty = f
        .client
        .create(ObjectId::random(), 0)
        .unwrap()
        .seal()
        .unwrap();
    assert!(empty.is_empty());
    let put_empty = f.client.put(&[]).unwrap();
    assert!(f.client.contains(put_empty.id()).unwrap());
    for view in [empty, put_empty] {
        let id = view.id();
        drop(view);
        f.client.delete(id).unwrap();
    }
    let raw_empty = ObjectId::random();
    let reply = raw.call(
        8,
        Request::Create {
            id: raw_empty,
            size: 0,
            evictable: false,
        },
    );
    assert!(matches!(reply.body, Ok(Reply::Created { .. })), "{reply:?}");
    let reply = raw.call(8, Request::Abort { id: raw_empty });
    assert_eq!(reply.body, Ok(Reply::Aborted));

    // Leases: bad block sizes, and blocks that were never leased.
    for class in [3, 32, 512 << 10] {
        let reply = raw.call(8, Request::Lease { class, count: 1 });
        assert!(
            matches!(reply.body, Err(WireError::BadLease(_))),
            "{reply:?}"
        );
    }
    let reply = raw.call(
        9,
        Request::PutLeased {
            id: ObjectId::random(),
            offset: sealed.offset(),
            size: 10,
            lend_to: None,
        },
    );
    assert!(
        matches!(reply.body, Err(WireError::BadLease(_))),
        "{reply:?}"
    );

    // Deleting what does not exist.
    match f.client.delete(ghost) {
        Err(DeleteError::NotFound(id)) => assert_eq!(id, ghost),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // None of it cost the raw connection, and nothing changed hands.
    let reply = raw.call(10, Request::Contains { id: sealed.id() });
    assert_eq!(reply.body, Ok(Reply::Contains(true)));
    let stats = f.client.stats().unwrap();
    assert_eq!(stats.unsealed_objects, 1);
    assert_eq!(stats.pins, 1);
    buf.as_mut_slice().fill(2);
    drop(buf.seal().unwrap());
    drop(sealed);
    f.assert_healthy();
}

#[test]
fn waiting_get_does_not_hold_up_its_connection() {
    let f = Fixture::new();
    let id = ObjectId::random();
    let mut buf = f.client.create(id, 4096).unwrap();
    let mut raw = f.raw();
    raw.send(
        1,
        Request::Get {
            id,
            timeout_ms: 30_000,
        },
    );
    raw.send(2, Request::Stats);
    // The store handles a connection's requests in order: the get is
    // registered as a waiter before the stats are taken.
    let reply = raw.recv();
    assert_eq!(
        reply.seq, 2,
        "the stats reply waited for the get: {reply:?}"
    );
    assert!(matches!(reply.body, Ok(Reply::Stats(_))));
    let reply = raw.call(3, Request::Contains { id });
    assert_eq!(reply.body, Ok(Reply::Contains(false)));

    buf.as_mut_slice().fill(9);
    let view = buf.seal().unwrap();
    let reply = raw.recv();
    assert_eq!(reply.seq, 1);
    assert_eq!(
        reply.body,
        Ok(Reply::Object {
            offset: view.offset(),
            size: 4096
        })
    );
    assert_eq!(f.client.stats().unwrap().pins, 2);

    // Closing the raw connection gives its pin back.
    drop(raw);
    eventually(Duration::from_secs(10), || {
        f.client.stats().unwrap().clients == 1
    });
    assert_eq!(f.client.stats().unwrap().pins, 1);
    drop(view);
    f.assert_healthy();
}
