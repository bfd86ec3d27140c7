//! A cluster over test hosts that share only a network: the CLI's head on
//! one host, a node on another ([`braid_tests::hosts`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::hosts::{braid_binary, Host, Hosts};
use std::process::Output;

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

#[test]
fn hosts_a_node_on_another_host_joins_the_head() {
    let Some(hosts) = Hosts::for_test("hosts_a_node_on_another_host_joins_the_head", 2) else {
        return;
    };
    let (a, b) = (hosts.host(0), hosts.host(1));
    let (a_ip, b_ip) = (a.addr().to_string(), b.addr().to_string());
    braid(
        a,
        &[
            "start",
            "--head",
            "--host",
            &a_ip,
            "--port",
            "0",
            "--num-cpus",
            "0",
        ],
    );
    // The head's address and token are in its cluster file, on host A only.
    let file = a
        .command("sh")
        .args(["-c", &format!("cat {}/braid-*/cluster-*.json", tmpdir(a))])
        .output()
        .unwrap();
    let file: serde_json::Value = serde_json::from_slice(&file.stdout).expect("a cluster file");
    let address = file["address"].as_str().expect("an address").to_string();
    let token = file["token"].as_str().expect("a token").to_string();
    assert!(address.starts_with(&a_ip), "{address}");
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
