//! A braid cluster over test hosts ([`crate::hosts`]), started with the
//! CLI as an operator would: a head on one host, nodes on others, each
//! listening on its host's address, and drivers run on any host with the
//! head's address and token.
//!
//! Every host's braid files live in a `BRAID_TMPDIR` of its own under its
//! private `/tmp`, named after its namespace: the hosts share the machine's
//! processes, and `braid stop` stops only those whose `BRAID_TMPDIR` is its
//! own. Dropping the cluster stops what it started on every host.
//!
//! ```no_run
//! use braid_tests::{host_cluster::HostCluster, hosts::Hosts};
//!
//! let Some(hosts) = Hosts::for_test("example", 2) else { return };
//! let cluster = HostCluster::start(&hosts, 0, 0).unwrap();
//! cluster.add_node(1, 2, &[]).unwrap();
//! let out = cluster.driver(0, "tasks").unwrap().output().unwrap();
//! assert!(out.status.success());
//! ```

use crate::hosts::{braid_binary, Hosts};
use std::cell::RefCell;
use std::process::{Command, Output};

/// Why a cluster step failed.
#[derive(Debug, thiserror::Error)]
pub enum HostClusterError {
    /// A command could not be run.
    #[error("running {what}: {source}")]
    Io {
        /// What was run.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `braid` exited with an error.
    #[error("`braid {args}` on host {host} failed: {stderr}")]
    Braid {
        /// The arguments.
        args: String,
        /// The host's index.
        host: usize,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The head's cluster file was missing or unreadable.
    #[error("the head's cluster file: {0}")]
    ClusterFile(String),
}

/// The object store each daemon of a test cluster gets: room for the
/// tests' 64 MiB objects, without each node keeping a gigabyte of
/// provisioned pages.
pub const STORE_MEMORY: &str = "512MiB";

/// `extra` flags, with a store of [`STORE_MEMORY`] unless they size it.
fn with_store<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = extra.to_vec();
    if !extra.contains(&"--object-store-memory") {
        args.extend(["--object-store-memory", STORE_MEMORY]);
    }
    args
}

/// A braid cluster whose head and nodes run on test hosts, each daemon
/// with a store of [`STORE_MEMORY`].
pub struct HostCluster<'h> {
    hosts: &'h Hosts,
    address: String,
    token: String,
    head: usize,
    /// Hosts where nodes were started, to stop them at drop.
    nodes: RefCell<Vec<usize>>,
}

impl<'h> HostCluster<'h> {
    /// Starts a head on host `head` at its address, offering `cpus` CPUs
    /// on its own node.
    pub fn start(hosts: &'h Hosts, head: usize, cpus: u32) -> Result<Self, HostClusterError> {
        Self::start_with(hosts, head, cpus, &[])
    }

    /// [`HostCluster::start`] with more `braid start` flags (`--resources`,
    /// `--object-store-memory` instead of [`STORE_MEMORY`]).
    pub fn start_with(
        hosts: &'h Hosts,
        head: usize,
        cpus: u32,
        extra: &[&str],
    ) -> Result<Self, HostClusterError> {
        let ip = hosts.host(head).addr().to_string();
        let cpus = cpus.to_string();
        let mut cluster = HostCluster {
            hosts,
            address: String::new(),
            token: String::new(),
            head,
            nodes: RefCell::new(Vec::new()),
        };
        let mut args = vec![
            "start",
            "--head",
            "--host",
            &ip,
            "--port",
            "0",
            "--num-cpus",
            &cpus,
        ];
        args.extend(with_store(extra));
        cluster.braid(head, &args)?;
        let cat = format!(
            "cat {}/braid-*/cluster-*.json",
            Self::tmpdir_of(hosts, head)
        );
        let file = hosts
            .host(head)
            .command("sh")
            .args(["-c", &cat])
            .output()
            .map_err(|source| HostClusterError::Io {
                what: cat.clone(),
                source,
            })?;
        let file: serde_json::Value = serde_json::from_slice(&file.stdout)
            .map_err(|e| HostClusterError::ClusterFile(e.to_string()))?;
        let field = |name: &str| {
            file[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| HostClusterError::ClusterFile(format!("no {name} in {file}")))
        };
        cluster.address = field("address")?;
        cluster.token = field("token")?;
        Ok(cluster)
    }

    /// Starts a node on host `host` offering `cpus` CPUs, listening on the
    /// host's address and joined to the head; `extra` are more `braid
    /// start` flags (`--resources`, `--object-store-memory` instead of
    /// [`STORE_MEMORY`]).
    pub fn add_node(&self, host: usize, cpus: u32, extra: &[&str]) -> Result<(), HostClusterError> {
        let ip = self.hosts.host(host).addr().to_string();
        self.nodes.borrow_mut().push(host);
        let cpus = cpus.to_string();
        let mut args = vec![
            "start",
            "--address",
            &self.address,
            "--token",
            &self.token,
            "--host",
            &ip,
            "--num-cpus",
            &cpus,
        ];
        args.extend(with_store(extra));
        self.braid(host, &args).map(|_| ())
    }

    /// The head's `HOST:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The cluster token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The `BRAID_TMPDIR` of host `host`.
    pub fn tmpdir(&self, host: usize) -> String {
        Self::tmpdir_of(self.hosts, host)
    }

    fn tmpdir_of(hosts: &Hosts, host: usize) -> String {
        format!("/tmp/{}", hosts.host(host).netns())
    }

    /// Runs `braid args…` on host `host` with its `BRAID_TMPDIR`; its
    /// output if it succeeded.
    pub fn braid(&self, host: usize, args: &[&str]) -> Result<Output, HostClusterError> {
        let out = self
            .hosts
            .host(host)
            .command(braid_binary())
            .args(args)
            .env("BRAID_TMPDIR", self.tmpdir(host))
            .output()
            .map_err(|source| HostClusterError::Io {
                what: format!("braid {args:?}"),
                source,
            })?;
        if !out.status.success() {
            return Err(HostClusterError::Braid {
                args: args.join(" "),
                host,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out)
    }

    /// A command running this test binary's `child_entry` on host `host`
    /// as `role`, as a driver of this cluster (`BRAID_ADDRESS`,
    /// `BRAID_TOKEN` and the host's `BRAID_TMPDIR` set).
    pub fn driver(&self, host: usize, role: &str) -> std::io::Result<Command> {
        let mut cmd = self.hosts.host(host).child(role)?;
        cmd.env("BRAID_ADDRESS", &self.address)
            .env("BRAID_TOKEN", &self.token)
            .env("BRAID_TMPDIR", self.tmpdir(host));
        Ok(cmd)
    }
}

impl Drop for HostCluster<'_> {
    fn drop(&mut self) {
        let mut hosts = self.nodes.borrow().clone();
        hosts.sort_unstable();
        hosts.dedup();
        hosts.retain(|&h| h != self.head);
        // Nodes first, the head last, as an operator would.
        hosts.push(self.head);
        for host in hosts {
            if let Err(e) = self.braid(host, &["stop"]) {
                eprintln!("stopping braid on host {host}: {e}");
            }
        }
    }
}

/// Each live node's id by its host's name (`braid-host-<i>`), as the head
/// lists them to the driver `rt`.
pub fn nodes_by_host(
    rt: &braid::Runtime,
) -> braid::Result<std::collections::BTreeMap<String, braid::NodeId>> {
    let r = rt.clone();
    Ok(rt
        .block_on(async move { r.nodes().await })?
        .into_iter()
        .filter(|n| n.alive)
        .map(|n| (n.info.hostname.clone(), n.info.node_id))
        .collect())
}
