//! Connections that have not authenticated: on `node.sock` (and every
//! socket speaking braid frames) the first frame is capped at 64 KiB and
//! the `Hello` must be accepted within the handshake deadline; on the gRPC
//! ports the HTTP/2 preface must arrive within it. A connection that sends
//! nothing, a truncated frame or an oversized one is closed, while a
//! well-behaved client of the same node is served. The cluster runs under
//! a private `BRAID_TMPDIR` with a short deadline
//! (`BRAID_HANDSHAKE_TIMEOUT_MS`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use braid::address::Address;
use braid::ids::{NodeId, WorkerId};
use braid::store::codec;
use braid::wire::messages::{Body, Frame, Hello, Message, Reply};
use common::Braid;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The handshake deadline the test cluster runs with.
const DEADLINE: Duration = Duration::from_millis(1500);

/// Slack for a loaded machine on top of the deadline.
const SLACK: Duration = Duration::from_secs(4);

fn cluster() -> Braid {
    let ms = DEADLINE.as_millis().to_string();
    let braid = Braid::with_env(&[(braid::wire::HANDSHAKE_TIMEOUT_VAR, &ms)]);
    braid.start_head();
    braid
}

/// The node's control socket and the cluster token.
fn node_socket_and_token(braid: &Braid) -> (PathBuf, String) {
    let session = braid.sessions().pop().expect("a session");
    let node_dir = std::fs::read_dir(&session)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("node-") && e.path().is_dir())
        .expect("the node's directory");
    let cluster_file = std::fs::read_dir(braid.user_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("cluster-"))
        .expect("the token file");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cluster_file.path()).unwrap()).unwrap();
    (
        node_dir.path().join("node.sock"),
        file["token"].as_str().unwrap().to_owned(),
    )
}

fn framed(frame: &Frame) -> Vec<u8> {
    let body = codec::encode(frame).unwrap();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn read_frame(s: &mut UnixStream) -> Frame {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    codec::decode(&body).unwrap()
}

/// A client that says hello with the right token, as a peer would.
fn authenticated(socket: &PathBuf, token: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(SLACK)).unwrap();
    let hello = Frame {
        seq: 1,
        body: Body::Request(Message::Hello(Hello::Peer {
            token: token.to_owned(),
            address: Address {
                worker: WorkerId::random(),
                node: NodeId(0),
                endpoint: braid::wire::Endpoint {
                    machine: braid::wire::MachineId::current().clone(),
                    socket: "/nonexistent/cluster_handshake.sock".into(),
                    tcp: None,
                },
                pid: std::process::id(),
            },
        })),
    };
    s.write_all(&framed(&hello)).unwrap();
    match read_frame(&mut s).body {
        Body::Reply(Ok(Reply::Welcome { .. })) => s,
        other => panic!("hello answered with {other:?}"),
    }
}

/// Asks the node for its summary over an authenticated connection.
fn node_info(s: &mut UnixStream, seq: u64) {
    let started = Instant::now();
    s.write_all(&framed(&Frame {
        seq,
        body: Body::Request(Message::NodeInfo),
    }))
    .unwrap();
    let reply = read_frame(s);
    assert_eq!(reply.seq, seq);
    assert!(
        matches!(reply.body, Body::Reply(Ok(Reply::Node(_)))),
        "{:?}",
        reply.body
    );
    assert!(started.elapsed() < SLACK, "served slowly");
}

/// Waits for the server to close `s` (end of stream or a reset), reading
/// and discarding whatever it sends first; how long that took.
fn time_to_close(s: &mut impl Read, since: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return since.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("still open {limit:?} after connecting")
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn silent_and_truncated_connections_are_closed_at_the_deadline_while_others_are_served() {
    let braid = cluster();
    let (socket, token) = node_socket_and_token(&braid);
    let limit = DEADLINE + SLACK;
    let connected = Instant::now();
    // Sends nothing; sends 3 bytes of a length prefix; sends a whole
    // prefix and part of its body.
    let mut silent = UnixStream::connect(&socket).unwrap();
    let mut prefix = UnixStream::connect(&socket).unwrap();
    prefix.write_all(&[16, 0, 0]).unwrap();
    let mut body = UnixStream::connect(&socket).unwrap();
    body.write_all(&100u32.to_le_bytes()).unwrap();
    body.write_all(&[0u8; 10]).unwrap();
    for s in [&silent, &prefix, &body] {
        s.set_read_timeout(Some(limit)).unwrap();
    }

    // Meanwhile a client that says hello is served, before and after the
    // deadline (an authenticated connection has none).
    let mut good = authenticated(&socket, &token);
    node_info(&mut good, 2);

    for (name, s) in [
        ("silent", &mut silent),
        ("3-byte prefix", &mut prefix),
        ("truncated body", &mut body),
    ] {
        let took = time_to_close(s, connected, limit);
        assert!(
            took >= DEADLINE.mul_f64(0.9) && took <= limit,
            "the {name} connection closed after {took:?} (deadline {DEADLINE:?})"
        );
    }
    node_info(&mut good, 3);
    let mut late = authenticated(&socket, &token);
    node_info(&mut late, 2);
}

#[test]
fn an_oversized_frame_before_hello_is_refused_unread_and_after_hello_accepted() {
    let braid = cluster();
    let (socket, token) = node_socket_and_token(&braid);

    // A 1 MiB length prefix and nothing else: the node closes at once,
    // without waiting for (or buffering) the body it announced.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(DEADLINE + SLACK)).unwrap();
    let sent = Instant::now();
    s.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    let took = time_to_close(&mut s, sent, DEADLINE + SLACK);
    assert!(took < DEADLINE / 2, "closed only after {took:?}");

    // Just over the pre-hello cap is refused too.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(DEADLINE + SLACK)).unwrap();
    let sent = Instant::now();
    let cap = braid::wire::HELLO_MAX_FRAME as u32;
    s.write_all(&(cap + 1).to_le_bytes()).unwrap();
    let took = time_to_close(&mut s, sent, DEADLINE + SLACK);
    assert!(took < DEADLINE / 2, "closed only after {took:?}");

    // After an accepted hello, frames may be large: a 190 KiB message,
    // then a request on the same connection, answered.
    let mut good = authenticated(&socket, &token);
    let frees: Vec<_> = (0..8000)
        .map(|_| (braid::store::ObjectId::random(), Vec::new()))
        .collect();
    let big = framed(&Frame {
        seq: 0,
        body: Body::OneWay(Message::FreeObjects(frees)),
    });
    assert!(
        big.len() > 2 * braid::wire::HELLO_MAX_FRAME,
        "{}",
        big.len()
    );
    good.write_all(&big).unwrap();
    node_info(&mut good, 2);
}

#[test]
fn grpc_ports_close_connections_that_send_no_preface() {
    let braid = cluster();
    let status = braid.status();
    let head = status["address"].as_str().unwrap().to_owned();
    let node = status["nodes"][0]["grpc_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let limit = DEADLINE + SLACK;
    for address in [head, node] {
        let connected = Instant::now();
        let mut silent = TcpStream::connect(&address).unwrap();
        silent.set_read_timeout(Some(limit)).unwrap();
        let mut partial = TcpStream::connect(&address).unwrap();
        partial.set_read_timeout(Some(limit)).unwrap();
        partial.write_all(b"PRI * HTTP/2.0").unwrap();
        // The cluster answers meanwhile (`braid status` is gRPC calls).
        assert_eq!(braid.status()["nodes"][0]["alive"], true);
        for (name, s) in [("silent", &mut silent), ("partial preface", &mut partial)] {
            let took = time_to_close(s, connected, limit);
            assert!(
                took >= DEADLINE.mul_f64(0.9) && took <= limit,
                "{address}: the {name} connection closed after {took:?}"
            );
        }
    }
    assert_eq!(braid.status()["nodes"][0]["alive"], true);
}
