//! A job's binary shipped to a host that lacks it: the driver runs on one
//! test host, its workers on another where the driver's file is missing
//! (an empty file system over its directory) or is another program. The
//! node fetches the binary from the driver's node, runs the verified copy,
//! never the stranger at the path, and removes the copy when the job ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::{child_role, Hosts};
use std::time::{Duration, Instant};

/// Where this process runs: its host and its executable.
#[braid::remote]
fn whoami() -> (String, String) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    (braid::cluster::hostname(), exe)
}

/// Entry point of the processes the test starts on its hosts: a driver
/// that prints where its task ran and how long the first one took.
#[test]
fn child_entry() {
    let Some(role) = child_role() else {
        return;
    };
    assert_eq!(role, "whoami");
    let rt = braid::init_blocking().unwrap();
    let started = Instant::now();
    let (host, exe) = rt.get_blocking(&whoami::remote(&rt).unwrap()).unwrap();
    println!("FIRST-TASK-MS={}", started.elapsed().as_millis());
    println!("HOST={host}");
    println!("EXE={exe}");
}

/// The value of `KEY=` in a driver's output (the test harness may print
/// before it on its line).
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.split_once(&format!("{key}=")).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn hosts_a_job_binary_absent_or_different_on_a_host_is_shipped_verified_and_removed() {
    let Some(hosts) = Hosts::for_test(
        "hosts_a_job_binary_absent_or_different_on_a_host_is_shipped_verified_and_removed",
        2,
    ) else {
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().display().to_string();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    // Host 1 sees an empty directory where the test binaries are.
    let hidden = hosts
        .host(1)
        .command("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "braid-test-hidden", &deps])
        .status()
        .unwrap();
    assert!(hidden.success(), "hiding {deps} on host 1");
    let cluster = HostCluster::start(&hosts, 0, 0).unwrap();
    cluster.add_node(1, 2, &[]).unwrap();
    let marker = "/tmp/the-stranger-ran";
    let binaries = format!("{}/braid-*/session-*/node-*/binaries", cluster.tmpdir(1));

    for case in ["absent", "different"] {
        if case == "different" {
            // Another program at the driver's path, which must never run.
            let script = format!("#!/bin/sh\ntouch {marker}\n");
            let planted = hosts
                .host(1)
                .command("sh")
                .args([
                    "-c",
                    &format!("printf '%s' \"$0\" > {deps}/{name} && chmod +x {deps}/{name}"),
                    &script,
                ])
                .status()
                .unwrap();
            assert!(planted.success());
        }
        let out = cluster.driver(0, "whoami").unwrap().output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{case}: driver failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(field(&stdout, "HOST"), "braid-host-1", "{case}");
        let ran = field(&stdout, "EXE");
        assert!(
            ran.contains("/binaries/") && ran.ends_with(&format!("/{name}")),
            "{case}: the worker ran {ran}, not a shipped copy"
        );
        eprintln!(
            "{case}: first task answered in {} ms through a shipped binary",
            field(&stdout, "FIRST-TASK-MS")
        );
        // The copy goes with the job (the head tells host 1's node that
        // the driver is gone).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = hosts
                .host(1)
                .command("sh")
                .args(["-c", &format!("ls -A {binaries}")])
                .output()
                .unwrap();
            let left = String::from_utf8_lossy(&left.stdout).trim().to_string();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: shipped binary left behind: {left}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let stranger_ran = hosts
        .host(1)
        .command("test")
        .args(["-e", marker])
        .status()
        .unwrap();
    assert!(
        !stranger_ran.success(),
        "the node ran the program of another build"
    );
}
