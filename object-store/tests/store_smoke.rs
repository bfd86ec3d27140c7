#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use braid_store::{ObjectId, StoreClient};
use std::time::Duration;
use support::*;

#[test]
fn smoke() {
    let store = StoreProcess::start(64 << 20, true);
    let c = StoreClient::connect(&store.socket).unwrap();
    let id = ObjectId::random();
    let mut buf = c.create(id, 1000).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(1, 1000));
    let v = buf.seal().unwrap();
    assert_eq!(v.as_bytes(), &pattern(1, 1000)[..]);
    let c2 = StoreClient::connect(&store.socket).unwrap();
    let v2 = c2.get(id, Duration::from_secs(1)).unwrap();
    assert_eq!(v2.as_bytes(), &pattern(1, 1000)[..]);
    let small = c.put(b"hello").unwrap();
    let s2 = c2.get(small.id(), Duration::from_secs(1)).unwrap();
    assert_eq!(s2.as_bytes(), b"hello");
    println!("{:?}", c.stats().unwrap());
}
