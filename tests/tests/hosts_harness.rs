//! The test-host harness itself: hosts reach each other at their
//! addresses over their own bridge, keep `/tmp` and `/dev/shm` to
//! themselves, and leave no namespace, link or process behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::hosts::{child_role, Hosts};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};

/// Entry point of the processes the tests start on their hosts.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    let at = std::env::var("AT").unwrap();
    match role.as_str() {
        // Listens at AT, says its port, echoes one line back.
        "listen" => {
            let listener = TcpListener::bind(format!("{at}:0")).unwrap();
            println!("PORT={}", listener.local_addr().unwrap().port());
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            conn.write_all(format!("echo {line}").as_bytes()).unwrap();
        }
        // Sends a line to AT and prints the answer.
        "connect" => {
            let mut conn = TcpStream::connect(&at).unwrap();
            conn.write_all(b"hello\n").unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).unwrap();
            print!("{answer}");
        }
        other => panic!("unknown role {other}"),
    }
}

fn child(hosts: &Hosts, host: usize, role: &str, at: &str) -> Command {
    let mut cmd = hosts.host(host).child(role).unwrap();
    cmd.env("AT", at);
    cmd
}

fn sh(hosts: &Hosts, host: usize, script: &str) -> bool {
    hosts
        .host(host)
        .command("sh")
        .args(["-c", script])
        .status()
        .unwrap()
        .success()
}

#[test]
fn hosts_reach_each_other_over_their_bridge() {
    let Some(hosts) = Hosts::for_test("hosts_reach_each_other_over_their_bridge", 2) else {
        return;
    };
    let a = hosts.host(0).addr().to_string();
    let mut server = child(&hosts, 0, "listen", &a)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port = lines
        .by_ref()
        .find_map(|l| Some(l.ok()?.split_once("PORT=")?.1.trim().to_string()))
        .expect("the listener's port");
    let out = child(&hosts, 1, "connect", &format!("{a}:{port}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("echo hello"),
        "host 1 did not reach host 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.wait().unwrap().success());
    // This namespace has no address on the hosts' subnet: nothing outside
    // them reaches them.
    let ours = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(
        !ours.contains(&a),
        "the hosts' subnet leaked into this namespace: {ours}"
    );
}

#[test]
fn hosts_keep_tmp_and_dev_shm_to_themselves() {
    let Some(hosts) = Hosts::for_test("hosts_keep_tmp_and_dev_shm_to_themselves", 2) else {
        return;
    };
    let name = format!("braid-hosts-{}", std::process::id());
    let write = format!("echo a > /tmp/{name} && echo b > /dev/shm/{name}");
    let absent = format!("test ! -e /tmp/{name} && test ! -e /dev/shm/{name}");
    let present = format!("test -e /tmp/{name} && test -e /dev/shm/{name}");
    assert!(sh(&hosts, 0, &write));
    assert!(
        sh(&hosts, 0, &present),
        "a host keeps its files between commands"
    );
    assert!(sh(&hosts, 1, &absent), "another host sees them");
    assert!(!std::path::Path::new(&format!("/tmp/{name}")).exists());
    assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
}

#[test]
fn dropped_hosts_leave_no_namespace_link_or_process() {
    let Some(hosts) = Hosts::for_test("dropped_hosts_leave_no_namespace_link_or_process", 2) else {
        return;
    };
    let mut sleeper = hosts.host(1).command("sleep").arg("600").spawn().unwrap();
    let netns: Vec<String> = (0..hosts.len())
        .map(|i| hosts.host(i).netns().to_string())
        .collect();
    let bridge = hosts.bridge().to_string();
    drop(hosts);
    assert!(sleeper.wait().is_ok(), "the process on a host was killed");
    let listed = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for ns in &netns {
        assert!(!listed.contains(ns.as_str()), "{ns} is left: {listed}");
    }
    assert!(
        !Command::new("ip")
            .args(["link", "show", &bridge])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "bridge {bridge} is left"
    );
}
