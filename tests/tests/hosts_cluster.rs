//! A cluster over test hosts that share only a network: the CLI's head on
//! one host, a node on another ([`braid_tests::hosts`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::hosts::{braid_binary, child_role, Host, Hosts};
use std::io::{Read, Write};
use std::process::Output;
use std::time::Duration;

/// Entry point of the processes the tests start on their hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    let at = std::env::var("AT").unwrap();
    let mut conn = std::net::TcpStream::connect(&at).unwrap();
    match role.as_str() {
        // Sends bytes that are no frame of any protocol braid speaks.
        "garbage" => {
            let _ = conn.write_all(&[0xff; 1 << 16]);
        }
        // Sends nothing.
        "silent" => {}
        other => panic!("unknown role {other}"),
    }
    // Whether the server closes the connection (EOF or reset) before
    // long after its handshake deadline.
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break println!("CLOSED"),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break println!("OPEN");
            }
            Err(_) => break println!("CLOSED"),
        }
    }
}

/// Runs this test binary's `child_entry` as `role` on `host`, against `at`;
/// what it printed.
fn child(host: &Host, role: &str, at: &str) -> String {
    let out = host.child(role).unwrap().env("AT", at).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The host's `BRAID_TMPDIR`, in its private `/tmp`. Its name is unique
/// too: the hosts share the machine's processes, and `braid stop` stops
/// those whose `BRAID_TMPDIR` is its own.
fn tmpdir(host: &Host) -> String {
    format!("/tmp/{}", host.netns())
}

/// Runs `braid args…` on `host` with its own `BRAID_TMPDIR`.
fn braid(host: &Host, args: &[&str]) -> Output {
    let out = host
        .command(braid_binary())
        .args(args)
        .env("BRAID_TMPDIR", tmpdir(host))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "braid {args:?} on {}: {}",
        host.netns(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts a head on `host` at its address, with no CPUs of its own; its
/// `HOST:PORT` and token, from its cluster file.
fn start_head(host: &Host) -> (String, String) {
    let ip = host.addr().to_string();
    braid(
        host,
        &[
            "start",
            "--head",
            "--host",
            &ip,
            "--port",
            "0",
            "--num-cpus",
            "0",
        ],
    );
    let file = host
        .command("sh")
        .args([
            "-c",
            &format!("cat {}/braid-*/cluster-*.json", tmpdir(host)),
        ])
        .output()
        .unwrap();
    let file: serde_json::Value = serde_json::from_slice(&file.stdout).expect("a cluster file");
    let address = file["address"].as_str().expect("an address").to_string();
    let token = file["token"].as_str().expect("a token").to_string();
    assert!(address.starts_with(&ip), "{address}");
    (address, token)
}

#[test]
fn hosts_a_head_refuses_strangers_from_another_host_and_keeps_serving() {
    let Some(hosts) = Hosts::for_test(
        "hosts_a_head_refuses_strangers_from_another_host_and_keeps_serving",
        2,
    ) else {
        return;
    };
    let (a, stranger) = (hosts.host(0), hosts.host(1));
    let (address, token) = start_head(a);
    // A wrong token is refused with a message that says so.
    let wrong = stranger
        .command(braid_binary())
        .args(["status", "--address", &address, "--token", "not-the-token"])
        .env("BRAID_TMPDIR", tmpdir(stranger))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    assert!(!wrong.status.success(), "a wrong token was let in");
    assert!(said.contains("token"), "{said}");
    // Garbage, and a connection that says nothing, are closed: by the
    // frame check, and by the handshake deadline.
    assert!(child(stranger, "garbage", &address).contains("CLOSED"));
    assert!(child(stranger, "silent", &address).contains("CLOSED"));
    // The head serves the cluster as before.
    let right = stranger
        .command(braid_binary())
        .args(["status", "--address", &address, "--token", &token])
        .env("BRAID_TMPDIR", tmpdir(stranger))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&right.stdout).contains("1 live node"),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    braid(a, &["stop"]);
}

#[test]
fn hosts_a_node_on_another_host_joins_the_head() {
    let Some(hosts) = Hosts::for_test("hosts_a_node_on_another_host_joins_the_head", 2) else {
        return;
    };
    let (a, b) = (hosts.host(0), hosts.host(1));
    let b_ip = b.addr().to_string();
    // The head's address and token are in its cluster file, on host A only.
    let (address, token) = start_head(a);
    let hidden = b
        .command("test")
        .args(["!", "-e", &tmpdir(a)])
        .status()
        .unwrap();
    assert!(hidden.success(), "host B sees host A's braid files");
    braid(
        b,
        &[
            "start",
            "--address",
            &address,
            "--token",
            &token,
            "--host",
            &b_ip,
        ],
    );
    let status = braid(a, &["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("2 live nodes"), "{status}");
    assert!(
        status.contains("braid-host-0") && status.contains("braid-host-1"),
        "each node on its own host: {status}"
    );
    braid(b, &["stop"]);
    braid(a, &["stop"]);
}
