//! A node hosting many actors holds descriptors per worker: its daemons
//! and workers raise their open-file limit to the hard limit, whatever
//! soft limit they inherit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::rpc::HeadClient;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The soft and hard limits of open files of process `pid`.
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[test]
fn the_node_raises_its_open_file_limit_to_the_hard_limit() {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard <= 256 {
        println!("SKIPPED: the hard open-file limit ({hard}) leaves nothing to raise");
        return;
    }
    // The cluster's daemons inherit a low soft limit from this process.
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let rt = braid::init_blocking_with(braid::InitOptions::new().num_cpus(1.0)).unwrap();
    let status = rt.block_on({
        let (address, token) = (rt.address().to_owned(), rt.token().to_owned());
        async move {
            HeadClient::connect(&address, &token)
                .await
                .unwrap()
                .cluster_status()
                .await
                .unwrap()
        }
    });
    let (soft, hard) = open_files_limit(status.nodes[0].info.pid);
    assert_eq!(soft, hard, "the node kept the soft limit it inherited");
    assert_ne!(soft, "256");
}
