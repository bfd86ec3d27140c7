//! Jobs submitted from another host (`braid job submit` on a host that
//! shares only a network with the head): the working directory travels
//! with the job when the head's machine does not have that very
//! directory, even where a directory of the same path exists there, and
//! the uploaded copy goes away when the job ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::host_cluster::HostCluster;
use braid_tests::hosts::Hosts;
use serde_json::Value;
use std::time::{Duration, Instant};

/// `braid job submit --working-dir DIR -- sh -c SCRIPT` on `host`: the job
/// id (the last line) and what the CLI said on stderr.
fn submit(cluster: &HostCluster<'_>, host: usize, dir: &str, script: &str) -> (String, String) {
    let out = cluster
        .braid(
            host,
            &[
                "job",
                "submit",
                "--address",
                cluster.address(),
                "--token",
                cluster.token(),
                "--working-dir",
                dir,
                "--",
                "sh",
                "-c",
                script,
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.trim_end().lines().last().unwrap().trim().to_owned();
    (id, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The job's status once it is over, and its output.
fn finished(cluster: &HostCluster<'_>, host: usize, id: &str) -> (Value, String) {
    let args = ["--address", cluster.address(), "--token", cluster.token()];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut status = vec!["job", "status", id, "--json"];
        status.extend(args);
        let out = cluster.braid(host, &status).unwrap();
        let job: Value = serde_json::from_slice(&out.stdout).unwrap();
        if ["SUCCEEDED", "FAILED", "STOPPED"].contains(&job["state"].as_str().unwrap_or("")) {
            let mut logs = vec!["job", "logs", id];
            logs.extend(args);
            let out = cluster.braid(host, &logs).unwrap();
            return (job, String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert!(Instant::now() < deadline, "job {id} never ended: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `script` in `sh` on `host`; its stdout.
fn sh(hosts: &Hosts, host: usize, script: &str) -> String {
    let out = hosts
        .host(host)
        .command("sh")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn hosts_a_job_submitted_from_another_host_runs_in_its_uploaded_working_dir() {
    let Some(hosts) = Hosts::for_test(
        "hosts_a_job_submitted_from_another_host_runs_in_its_uploaded_working_dir",
        2,
    ) else {
        return;
    };
    let cluster = HostCluster::start(&hosts, 0, 1).unwrap();
    // One path, a directory on each host's private /tmp with its own
    // content; host 1's holds a script and a subdirectory.
    let dir = format!("/tmp/{}-workdir", hosts.host(1).netns());
    for host in [0, 1] {
        sh(
            &hosts,
            host,
            &format!(
                "mkdir -p {dir}/sub && echo from-host-{host} > {dir}/sub/data.txt && \
                 printf '#!/bin/sh\\necho script-ran\\n' > {dir}/run.sh && chmod +x {dir}/run.sh"
            ),
        );
    }
    let script = "cat sub/data.txt; ./run.sh; echo cwd=$(pwd)";

    // From host 1: host 0's directory of that path is another one, so
    // host 1's is uploaded and the job runs in the copy.
    let (id, said) = submit(&cluster, 1, &dir, script);
    assert!(said.contains("Uploading"), "{said}");
    let (job, logs) = finished(&cluster, 1, &id);
    assert_eq!(job["state"], "SUCCEEDED", "{job}\n{logs}");
    assert!(logs.contains("from-host-1"), "{logs}");
    assert!(logs.contains("script-ran"), "modes travel: {logs}");
    let cwd = logs
        .lines()
        .find_map(|l| l.strip_prefix("cwd="))
        .unwrap()
        .to_owned();
    assert_ne!(cwd, dir, "{logs}");
    let package = job["package"].as_str().unwrap();
    assert!(cwd.ends_with(package), "{cwd} is package {package}");
    // The copy goes away once its job is over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh(&hosts, 0, &format!("ls -d {cwd} 2>/dev/null || true"))
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "{cwd} is still on host 0");
        std::thread::sleep(Duration::from_millis(50));
    }

    // From host 0, the head's own machine: the job runs in the directory
    // itself, nothing uploaded.
    let (id, said) = submit(&cluster, 0, &dir, script);
    assert!(!said.contains("Uploading"), "{said}");
    let (job, logs) = finished(&cluster, 0, &id);
    assert_eq!(job["state"], "SUCCEEDED", "{job}\n{logs}");
    assert!(logs.contains("from-host-0"), "{logs}");
    assert!(logs.contains(&format!("cwd={dir}")), "{logs}");
    assert!(job["package"].is_null(), "{job}");
    sh(&hosts, 0, &format!("rm -rf {dir}"));
    sh(&hosts, 1, &format!("rm -rf {dir}"));
}
