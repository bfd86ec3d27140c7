//! Hostile and malformed input against a real embedded cluster: random
//! bytes, oversized length prefixes and garbage frames on every port and
//! socket the cluster listens on, wrong or missing cluster tokens, unknown
//! actor classes and methods, and malformed frames that must close only the
//! connection they arrived on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::address::Address;
use braid::ids::{NodeId, WorkerId};
use braid::rpc::{HeadClient, NodeClient, NodeRecord};
use braid::store::codec;
use braid::wire::messages::{Body, Frame, Hello, Message, Reply};
use braid::{ActorBuilder, Error, Runtime, TypedHandle};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Answers pings; tells its pid.
#[braid::actor]
pub struct Echo {
    calls: u64,
}

#[braid::actor]
impl Echo {
    fn new(start: u64) -> Self {
        Echo { calls: start }
    }

    fn ping(&mut self, x: u64) -> u64 {
        self.calls += 1;
        x
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0))
            .expect("embedded cluster")
    })
}

/// How long any single read on a raw connection may block.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------- helpers --

/// splitmix64: a fixed-seed generator, so every run sends the same bytes.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn encode_frame(frame: &Frame) -> Vec<u8> {
    framed(&codec::encode(frame).unwrap())
}

fn hello(token: &str) -> Frame {
    Frame {
        seq: 1,
        body: Body::Request(Message::Hello(Hello::Peer {
            token: token.to_string(),
            address: Address {
                worker: WorkerId::random(),
                node: NodeId(0),
                endpoint: braid::wire::Endpoint {
                    machine: braid::wire::MachineId::current().clone(),
                    socket: "/nonexistent/cluster_bad_input.sock".into(),
                    tcp: None,
                },
                pid: std::process::id(),
            },
        })),
    }
}

/// One piece of hostile input, and whether the client half-closes after
/// sending it (else the server must close the connection by itself).
struct Probe {
    name: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
}

/// Input for the length-prefixed Unix sockets (the wire protocol and the
/// store's): each malformed frame must make the server close.
fn unix_probes(rng: &mut Rng) -> Vec<Probe> {
    let mut huge = 0xFFFF_FFFFu32.to_le_bytes().to_vec();
    huge.extend(rng.bytes(2048));
    let garbage = framed(&rng.bytes(1000));
    let mut zero = 0u32.to_le_bytes().to_vec();
    zero.extend(rng.bytes(64));
    // A well-formed Hello frame cut short inside its token string.
    let whole = codec::encode(&hello("0123456789abcdef0123456789abcdef")).unwrap();
    let truncated = framed(&whole[..whole.len() / 2]);
    // A request whose inner sequence claims 2^64-1 elements: seq, Body::Request
    // (0), Message::FreeObjects (5), then the length.
    let mut body = 7u64.to_le_bytes().to_vec();
    body.extend(0u32.to_le_bytes());
    body.extend(5u32.to_le_bytes());
    body.extend(u64::MAX.to_le_bytes());
    body.extend(rng.bytes(100));
    let long_seq = framed(&body);
    vec![
        Probe {
            name: "random bytes",
            bytes: rng.bytes(4096),
            half_close: true,
        },
        Probe {
            name: "length prefix 0xFFFFFFFF",
            bytes: huge,
            half_close: false,
        },
        Probe {
            name: "valid length, garbage body",
            bytes: garbage,
            half_close: false,
        },
        Probe {
            name: "zero-length frame",
            bytes: zero,
            half_close: false,
        },
        Probe {
            name: "truncated Hello",
            bytes: truncated,
            half_close: false,
        },
        Probe {
            name: "sequence of 2^64-1 elements",
            bytes: long_seq,
            half_close: false,
        },
    ]
}

/// Input for the gRPC (HTTP/2) TCP ports.
fn tcp_probes(rng: &mut Rng) -> Vec<Probe> {
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(rng.bytes(4096));
    // The preface, then a DATA frame header claiming 16 MiB on stream 1.
    let mut big_frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    big_frame.extend([0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    big_frame.extend(rng.bytes(1024));
    let mut probes = unix_probes(rng);
    probes.push(Probe {
        name: "HTTP/2 preface, then random bytes",
        bytes: preface,
        half_close: true,
    });
    probes.push(Probe {
        name: "HTTP/2 preface, then an oversized frame",
        bytes: big_frame,
        half_close: true,
    });
    // Whether an HTTP/2 server closes on bytes it cannot parse is its own
    // business; here only "nothing crashes" matters, so always half-close.
    for p in &mut probes {
        p.half_close = true;
    }
    probes
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The server closed the connection (end of stream, or a reset).
    Closed,
    /// The connection was still open when the read timed out.
    StillOpen,
}

/// Sends `probe` and reads until the server closes the connection.
fn probe<S: Read + Write>(
    mut stream: S,
    probe: &Probe,
    half_close: impl FnOnce(&mut S),
) -> Outcome {
    let _ = stream.write_all(&probe.bytes);
    let _ = stream.flush();
    if probe.half_close {
        half_close(&mut stream);
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Outcome::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::StillOpen
            }
            Err(_) => return Outcome::Closed,
        }
    }
}

fn probe_unix(path: &Path, p: &Probe) -> Option<Outcome> {
    let stream = UnixStream::connect(path).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    Some(probe(stream, p, |s| {
        let _ = s.shutdown(Shutdown::Write);
    }))
}

fn probe_tcp(address: &str, p: &Probe) -> Outcome {
    let addr = address
        .to_socket_addrs()
        .unwrap()
        .next()
        .expect("a socket address");
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to a gRPC port");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    probe(stream, p, |s| {
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// A raw connection speaking the wire protocol.
struct Wire(UnixStream);

impl Wire {
    fn connect(path: &Path) -> std::io::Result<Wire> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Wire(s))
    }

    fn send(&mut self, frame: &Frame) {
        self.0.write_all(&encode_frame(frame)).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// The next frame, or `None` at end of stream. Panics on a timeout.
    fn recv(&mut self) -> Option<Frame> {
        let mut len = [0u8; 4];
        match self.0.read_exact(&mut len) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("reading a frame: {e}"),
        }
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.0.read_exact(&mut body).expect("a whole frame");
        Some(codec::decode(&body).expect("a well-formed frame from the server"))
    }

    /// The reply to request `seq`.
    fn reply(&mut self, seq: u64) -> Result<Reply, Error> {
        let frame = self.recv().expect("a reply before end of stream");
        assert_eq!(frame.seq, seq, "the reply echoes the request's seq");
        match frame.body {
            Body::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// The state letter of a process (`R`, `S`, `Z`, ...), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

fn alive(pid: u32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Live (non-zombie) children of `parent`.
fn children(parent: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && state != "Z" && state != "X" {
            out.insert(pid);
        }
    }
    out
}

/// The one node of the embedded cluster.
async fn the_node(rt: &Runtime) -> NodeRecord {
    let nodes = rt.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "the embedded cluster has one node");
    nodes.into_iter().next().unwrap()
}

/// Every socket file in the session's `sockets` directory (drivers and
/// workers).
fn process_sockets(node: &NodeRecord) -> Vec<PathBuf> {
    let dir = node.info.session_dir.join("sockets");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    out.sort();
    out
}

// --------------------------------------------------------------- tests --

#[tokio::test]
async fn random_bytes_on_every_listening_port_crash_nothing() {
    let rt = rt();
    let echo = Echo::remote(rt, 0).spawn().await.unwrap();
    let echo_pid = echo.pid().await.unwrap();
    assert_eq!(echo.ping(1).await.unwrap(), 1);
    let node = the_node(rt).await;
    assert!(node.alive);

    let daemons = children(std::process::id());
    assert!(
        daemons.contains(&node.info.pid) && daemons.len() >= 2,
        "the head and the node run as this process's children: {daemons:?}, node {}",
        node.info.pid
    );
    let workers = children(node.info.pid);
    assert!(
        workers.contains(&echo_pid),
        "the actor's worker {echo_pid} is the node's child: {workers:?}"
    );

    let mut rng = Rng(0x5EED_0FBA_D1A9);
    let tcp = tcp_probes(&mut rng);
    let unix = unix_probes(&mut rng);
    let tcp_targets = [
        ("head gRPC", rt.address().to_string()),
        ("node gRPC", node.info.grpc_address.clone()),
    ];
    let mut unix_targets = vec![
        ("node control", PathBuf::from(&node.info.control.socket)),
        ("node store", node.info.store_socket.clone()),
    ];
    let sockets = process_sockets(&node);
    unix_targets.extend(sockets.iter().map(|p| ("process", p.clone())));

    let started = Instant::now();
    let (tcp_results, unix_results) = std::thread::scope(|s| {
        let tcp_threads: Vec<_> = tcp_targets
            .iter()
            .map(|(what, address)| {
                let tcp = &tcp;
                s.spawn(move || {
                    tcp.iter()
                        .map(|p| (*what, address.clone(), p.name, probe_tcp(address, p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let unix_threads: Vec<_> = unix_targets
            .iter()
            .map(|(what, path)| {
                let unix = &unix;
                s.spawn(move || {
                    unix.iter()
                        .map(|p| (*what, path.clone(), p.name, probe_unix(path, p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        (
            tcp_threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect::<Vec<_>>(),
            unix_threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });
    let elapsed = started.elapsed();

    for (what, address, name, outcome) in &tcp_results {
        assert_eq!(
            *outcome,
            Outcome::Closed,
            "{what} at {address} left the connection open after {name:?}"
        );
    }
    let mut reached_processes = 0;
    for (what, path, name, outcome) in &unix_results {
        match outcome {
            Some(o) => assert_eq!(
                *o,
                Outcome::Closed,
                "{what} socket {} did not close the connection after {name:?}",
                path.display()
            ),
            None => assert_eq!(
                *what,
                "process",
                "cannot connect to the {what} socket {}",
                path.display()
            ),
        }
        if *what == "process" && outcome.is_some() {
            reached_processes += 1;
        }
    }
    assert!(
        reached_processes >= 2 * unix.len(),
        "at least the driver's and the actor's sockets were probed: {sockets:?}"
    );
    assert!(elapsed < IO_TIMEOUT, "every connection was closed promptly");

    // Nothing died...
    for pid in daemons.iter().chain(workers.iter()) {
        assert!(
            alive(*pid),
            "process {pid} died of the input (state {:?})",
            process_state(*pid)
        );
    }
    // ...and everything still works.
    let sum = add::remote(rt, 20, 22).unwrap();
    assert_eq!(rt.get(&sum).await.unwrap(), 42);
    assert_eq!(echo.ping(7).await.unwrap(), 7);
    assert_eq!(
        echo.pid().await.unwrap(),
        echo_pid,
        "the same actor process"
    );
    let after = the_node(rt).await;
    assert_eq!(after.info.node_id, node.info.node_id);
    assert!(after.alive, "the node is still alive at the head");
    assert!(alive(after.info.pid));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let rt = rt();
    let node = the_node(rt).await;

    // gRPC: the head and the node refuse a wrong token, and a client
    // refuses to send an empty one.
    let head = HeadClient::connect(rt.address(), "wrong").await.unwrap();
    let refused = head.list_nodes().await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );
    let empty = HeadClient::connect(rt.address(), "").await;
    assert!(matches!(empty, Err(Error::Unauthenticated(_))), "{empty:?}");
    let right = HeadClient::connect(rt.address(), rt.token()).await.unwrap();
    assert!(!right.list_nodes().await.unwrap().is_empty());

    let node_client = NodeClient::connect(&node.info.grpc_address, "wrong")
        .await
        .unwrap();
    let refused = node_client.ping().await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );
    let right = NodeClient::connect(&node.info.grpc_address, rt.token())
        .await
        .unwrap();
    assert_eq!(right.ping().await.unwrap(), node.info.node_id);

    // The wire protocol: a Hello with a wrong token gets `Unauthenticated`,
    // then the connection closes, on the node's control socket and on every
    // driver and worker socket.
    let mut targets = vec![PathBuf::from(&node.info.control.socket)];
    targets.extend(process_sockets(&node));
    let mut refused_on = 0;
    for path in &targets {
        let Ok(mut wire) = Wire::connect(path) else {
            continue;
        };
        wire.send(&hello("wrong"));
        let reply = wire.reply(1);
        assert!(
            matches!(reply, Err(Error::Unauthenticated(_))),
            "{}: {reply:?}",
            path.display()
        );
        assert!(
            wire.recv().is_none(),
            "{} closes the connection after refusing the token",
            path.display()
        );
        refused_on += 1;
    }
    assert!(refused_on >= 2, "the node and at least the driver refused");

    // A driver joining with a wrong token fails at once.
    let joined = tokio::time::timeout(
        Duration::from_secs(10),
        braid::InitOptions::new()
            .address(rt.address())
            .token("wrong")
            .init(),
    )
    .await
    .expect("joining with a wrong token does not hang");
    assert!(
        matches!(joined, Err(Error::Unauthenticated(_))),
        "{:?}",
        joined.err()
    );
}

#[tokio::test]
async fn an_unknown_actor_class_or_method_gets_a_typed_error() {
    let rt = rt();
    let unknown = ActorBuilder::<EchoHandle>::new(rt, "no::such::Class", Ok(vec![]))
        .spawn()
        .await;
    assert!(
        matches!(&unknown, Err(Error::UnknownActorClass(c)) if c == "no::such::Class"),
        "{:?}",
        unknown.err()
    );

    let echo = Echo::remote(rt, 0).spawn().await.unwrap();
    let missing = echo.raw().call::<u64>("no_such_method", Ok(vec![])).await;
    match &missing {
        Err(Error::UnknownMethod { class, method }) => {
            assert_eq!(method, "no_such_method");
            assert_eq!(class, echo.raw().class());
        }
        other => panic!("expected UnknownMethod, got {other:?}"),
    }
    assert_eq!(
        echo.ping(3).await.unwrap(),
        3,
        "the actor still serves its real methods"
    );
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_close_only_that_connection() {
    let rt = rt();
    let node = the_node(rt).await;
    let control = PathBuf::from(&node.info.control.socket);

    let mut bad = Wire::connect(&control).unwrap();
    let mut good = Wire::connect(&control).unwrap();
    for wire in [&mut bad, &mut good] {
        wire.send(&hello(rt.token()));
        match wire.reply(1) {
            Ok(Reply::Welcome { node: id, .. }) => assert_eq!(id, node.info.node_id),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    let mut rng = Rng(0x00F4_A3E5);
    bad.send_raw(&framed(&rng.bytes(512)));
    // Possibly an error reply first; then the end of the stream.
    let mut frames = 0;
    while let Some(frame) = bad.recv() {
        frames += 1;
        assert!(frames <= 1, "at most one error reply");
        assert!(
            matches!(frame.body, Body::Reply(Err(Error::BadRequest(_)))),
            "{frame:?}"
        );
    }

    good.send(&Frame {
        seq: 2,
        body: Body::Request(Message::NodeInfo),
    });
    match good.reply(2) {
        Ok(Reply::Node(summary)) => assert_eq!(summary.node, node.info.node_id),
        other => panic!("expected a node summary, got {other:?}"),
    }
    let sum = add::remote(rt, 1, 2).unwrap();
    assert_eq!(rt.get(&sum).await.unwrap(), 3);
}

/// The Unix socket under `dir` that process `pid` listens on.
fn listening_socket_of(pid: u32, dir: &Path) -> Option<PathBuf> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (inode, path) = (fields.get(6)?, fields.get(7)?);
        (inodes.contains(*inode) && Path::new(path).starts_with(dir)).then(|| PathBuf::from(path))
    })
}

/// A connection is served nothing before a `Hello` with the cluster token
/// has been accepted: the node answers no request, and a worker obeys no
/// `Exit` frame, with or without a wrong-token `Hello` before it.
#[tokio::test]
async fn a_connection_without_an_accepted_hello_is_served_nothing() {
    let rt = rt();
    let node = the_node(rt).await;

    let mut failures = Vec::new();

    // The node answers nothing before a Hello...
    let mut wire = Wire::connect(Path::new(&node.info.control.socket)).unwrap();
    wire.send(&Frame {
        seq: 5,
        body: Body::Request(Message::NodeInfo),
    });
    let reply = wire.recv();
    if !matches!(
        &reply,
        None | Some(Frame {
            body: Body::Reply(Err(_)),
            ..
        })
    ) {
        failures.push(format!(
            "the node served a connection that never said Hello: {reply:?}"
        ));
    }

    // ...and a worker obeys no Exit from a connection without the token.
    let sockets = node.info.session_dir.join("sockets");
    for with_wrong_hello in [false, true] {
        let echo = Echo::remote(rt, 0).spawn().await.unwrap();
        let pid = echo.pid().await.unwrap();
        let socket = listening_socket_of(pid, &sockets).expect("the actor's socket");
        let mut wire = Wire::connect(&socket).unwrap();
        if with_wrong_hello {
            wire.send(&hello("wrong"));
        }
        wire.send(&Frame {
            seq: 0,
            body: Body::OneWay(Message::Exit),
        });
        // The worker reads frames in order: whatever it answers (or its
        // closing the connection) comes after it handled the Exit.
        wire.send(&Frame {
            seq: 9,
            body: Body::Request(Message::NodeInfo),
        });
        while wire.recv().is_some() {}
        let ping = echo.ping(4).await;
        if !alive(pid) || ping != Ok(4) {
            failures.push(format!(
                "an unauthenticated Exit (after a wrong Hello: {with_wrong_hello}) ended \
                 worker {pid}; a later call gave {ping:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn an_embedded_cluster_of_absurd_size_is_refused_before_it_starts() {
    for options in [
        braid::InitOptions::new().num_cpus(1e9),
        braid::InitOptions::new().num_cpus(f64::NAN),
        braid::InitOptions::new().resource("GPU", -1.0),
        braid::InitOptions::new().extra_node(2.0, braid::Resources::new().with("GPU", 1e15)),
    ] {
        match braid::init_blocking_with(options) {
            Err(Error::BadRequest(message)) => {
                assert!(
                    message.contains("more than") || message.contains("finite"),
                    "{message}"
                )
            }
            other => panic!("an absurd cluster was not refused: {:?}", other.map(|_| ())),
        }
    }
}
