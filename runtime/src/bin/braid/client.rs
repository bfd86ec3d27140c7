//! A blocking wrapper over [`HeadClient`] for the commands, with failures
//! explained for people (the [`braid::Error`] stays inside, for
//! `downcast_ref`).

use anyhow::Context;
use braid::rpc::{ClusterStatusRecord, HeadClient, NodeRecord};

/// A connection to a head, with the runtime that drives it.
pub struct Connected {
    rt: tokio::runtime::Runtime,
    client: HeadClient,
    address: String,
}

/// Connects to the head at `address` with `token`.
pub fn connect(address: &str, token: &str) -> anyhow::Result<Connected> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let client = rt
        .block_on(HeadClient::connect(address, token))
        .map_err(|e| explain(e, address))?;
    Ok(Connected {
        rt,
        client,
        address: address.to_owned(),
    })
}

impl Connected {
    /// The nodes the head knows, alive and dead.
    pub fn list_nodes(&self) -> anyhow::Result<Vec<NodeRecord>> {
        self.rt
            .block_on(self.client.list_nodes())
            .map_err(|e| explain(e, &self.address))
    }

    /// Everything the head knows.
    pub fn cluster_status(&self) -> anyhow::Result<ClusterStatusRecord> {
        self.rt
            .block_on(self.client.cluster_status())
            .map_err(|e| explain(e, &self.address))
    }
}

/// Says what a failed call to the head at `address` means.
fn explain(e: braid::Error, address: &str) -> anyhow::Error {
    let what = match &e {
        braid::Error::Unauthenticated(_) => format!("the cluster at {address} refused the token"),
        braid::Error::Unreachable { .. } => format!(
            "cannot reach the cluster's head at {address} (is it running? `braid start --head` starts one)"
        ),
        _ => format!("the head at {address} failed"),
    };
    anyhow::Error::new(e).context(what)
}
