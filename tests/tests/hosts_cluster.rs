//! A cluster over test hosts that share only a network: the CLI's head on
//! one host, a node on another ([`braid_tests::host_cluster`]), and
//! strangers on another host knocking on every port the cluster listens
//! on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::address::Address;
use braid::ids::{NodeId, WorkerId};
use braid::wire::conn::{decode_frame, encode_frame};
use braid::wire::messages::Hello;
use braid::wire::{Body, Endpoint, Frame, MachineId, Message};
use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{braid_binary, child_role, Host, Hosts};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

/// A counter whose state lives in its actor process.
#[braid::actor]
pub struct Counter {
    n: u64,
}

#[braid::actor]
impl Counter {
    fn new() -> Self {
        Counter { n: 0 }
    }
    fn incr(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
}

/// A driver that keeps an actor alive: prints `READY`, and for every line
/// on stdin calls it and prints the count.
fn hold() {
    let rt = braid::init_blocking().unwrap();
    let counter = Counter::remote(&rt).spawn_blocking().unwrap();
    println!("\nREADY {}", counter.incr().blocking().unwrap());
    for _ in std::io::stdin().lock().lines() {
        println!("COUNT {}", counter.incr().blocking().unwrap());
    }
}

/// Knocks on `AT` as a stranger: garbage, silence, or a braid `Hello` with
/// a wrong token. Prints how the server answered: `REFUSED` (an error
/// naming the token), then `CLOSED` or `OPEN`.
fn knock(role: &str) {
    let at = std::env::var("AT").unwrap();
    let mut conn = std::net::TcpStream::connect(&at).unwrap();
    match role {
        // Bytes that are no frame of any protocol braid speaks.
        "garbage" => {
            let _ = conn.write_all(&[0xff; 1 << 16]);
        }
        "silent" => {}
        "wrong-token" => {
            let hello = Frame {
                seq: 1,
                body: Body::Request(Message::Hello(Hello::Peer {
                    token: "not-the-token".into(),
                    address: Address {
                        worker: WorkerId::random(),
                        node: NodeId(0),
                        endpoint: Endpoint {
                            machine: MachineId("stranger".into()),
                            socket: String::new(),
                            tcp: None,
                        },
                        pid: std::process::id(),
                    },
                })),
            };
            let _ = conn.write_all(&encode_frame(&hello).unwrap());
            let mut len = [0u8; 4];
            if conn.read_exact(&mut len).is_ok() {
                let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                if conn.read_exact(&mut body).is_ok() {
                    if let Ok(Frame {
                        body: Body::Reply(Err(braid::Error::Unauthenticated(why))),
                        ..
                    }) = decode_frame(&body)
                    {
                        assert!(why.contains("token"), "{why}");
                        println!("\nREFUSED");
                    }
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
    // Whether the server closes the connection (EOF or reset) before long
    // after its handshake deadline.
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break println!("\nCLOSED"),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break println!("\nOPEN");
            }
            Err(_) => break println!("\nCLOSED"),
        }
    }
}

/// Entry point of the processes the tests start on their hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    match role.as_str() {
        "hold" => hold(),
        knocking => knock(knocking),
    }
}

/// Starts this test binary's `child_entry` as `role` on `host`, against
/// `at`.
fn knock_on(host: &Host, role: &str, at: &str) -> std::process::Child {
    host.child(role)
        .unwrap()
        .env("AT", at)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a knocking child printed.
fn answer(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn hosts_a_head_refuses_strangers_from_another_host_and_keeps_serving() {
    let Some(hosts) = Hosts::for_test(
        "hosts_a_head_refuses_strangers_from_another_host_and_keeps_serving",
        2,
    ) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 0).unwrap();
    let (address, stranger) = (cluster.address().to_string(), hosts.host(1));
    assert!(address.starts_with(&hosts.host(0).addr().to_string()));
    // A wrong token is refused with a message that says so.
    let wrong = stranger
        .command(braid_binary())
        .args(["status", "--address", &address, "--token", "not-the-token"])
        .env("BRAID_TMPDIR", cluster.tmpdir(1))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    assert!(!wrong.status.success(), "a wrong token was let in");
    assert!(said.contains("token"), "{said}");
    // Garbage, and a connection that says nothing, are closed: by the
    // frame check, and by the handshake deadline.
    assert!(answer(knock_on(stranger, "garbage", &address)).contains("CLOSED"));
    assert!(answer(knock_on(stranger, "silent", &address)).contains("CLOSED"));
    // The head serves the cluster as before.
    let right = stranger
        .command(braid_binary())
        .args(["status", "--address", &address, "--token", cluster.token()])
        .env("BRAID_TMPDIR", cluster.tmpdir(1))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&right.stdout).contains("1 live node"),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
}

#[test]
fn hosts_a_node_on_another_host_joins_the_head() {
    let Some(hosts) = Hosts::for_test("hosts_a_node_on_another_host_joins_the_head", 2) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 0).unwrap();
    // The head's address and token are in its cluster file, on host 0 only.
    let hidden = hosts
        .host(1)
        .command("test")
        .args(["!", "-e", &cluster.tmpdir(0)])
        .status()
        .unwrap();
    assert!(hidden.success(), "host 1 sees host 0's braid files");
    cluster.add_node(1, 1, &[]).unwrap();
    let status = cluster.braid(0, &["status"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("2 live nodes"), "{status}");
    assert!(
        status.contains("braid-host-0") && status.contains("braid-host-1"),
        "each node on its own host: {status}"
    );
}

/// The TCP ports processes listen on in `host`'s network namespace.
fn listening_ports(host: &Host) -> Vec<String> {
    let out = host
        .command("ss")
        .args(["-ltnH"])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

#[test]
fn hosts_every_listener_refuses_strangers_from_another_host_and_keeps_serving() {
    let Some(hosts) = Hosts::for_test(
        "hosts_every_listener_refuses_strangers_from_another_host_and_keeps_serving",
        2,
    ) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 2).unwrap();
    // A driver with an actor: the head's, the node's (gRPC and control),
    // the driver's and the workers' listeners are all up.
    let mut driver = cluster
        .driver(0, "hold")
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("READY"));
    assert_eq!(ready.as_deref(), Some("READY 1"));
    let ports = listening_ports(hosts.host(0));
    let a = hosts.host(0).addr().to_string();
    assert!(
        ports.iter().all(|p| p.starts_with(&a)),
        "a listener beyond the host's --host address: {ports:?}"
    );
    assert!(
        ports.len() >= 5,
        "head, node gRPC and control, driver, worker: {ports:?}"
    );

    // Every port at once, so the handshake deadlines run together.
    let stranger = hosts.host(1);
    let knocks: Vec<(String, &str, std::process::Child)> = ports
        .iter()
        .flat_map(|port| {
            ["garbage", "silent", "wrong-token"]
                .map(|role| (port.clone(), role, knock_on(stranger, role, port)))
        })
        .collect();
    let mut refused = 0;
    for (port, role, child) in knocks {
        let said = answer(child);
        assert!(
            said.contains("CLOSED"),
            "{role} on {port} was not closed: {said}"
        );
        refused += usize::from(said.contains("REFUSED"));
    }
    // gRPC ports speak HTTP/2 and close a braid hello unanswered; every
    // braid-frame port (node control, driver, worker) answers it.
    assert!(
        refused >= 3,
        "{refused} ports refused a wrong token by name"
    );

    // The actor, its caller and their node serve on.
    let mut stdin = driver.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let next = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("COUNT"));
    assert_eq!(next.as_deref(), Some("COUNT 2"));
    drop(stdin);
    // Read to the end, so the driver's last lines find a reader.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(driver.wait().unwrap().success(), "{rest:?}");
}
