//! A blocking wrapper over [`HeadClient`] for the commands, with failures
//! explained for people (the [`braid::Error`] stays inside, for
//! `downcast_ref`).

use crate::cli::usage_error;
use anyhow::{bail, Context};
use braid::cluster::{self, ADDRESS_VAR, TOKEN_VAR};
use braid::rpc::{ClusterStatusRecord, HeadClient, NodeRecord};

/// A connection to a head, with the runtime that drives it.
pub struct Connected {
    rt: tokio::runtime::Runtime,
    client: HeadClient,
    address: String,
    token: String,
    /// The head's HTTP API address, once asked.
    http: parking_lot::Mutex<String>,
}

/// The head to ask: `--address`, else `BRAID_ADDRESS`, else the one cluster
/// this user started on this machine.
fn resolve_address(command: &str, flag: Option<String>) -> anyhow::Result<String> {
    if let Some(address) = flag {
        return Ok(address);
    }
    if let Ok(address) = std::env::var(ADDRESS_VAR) {
        if !address.is_empty() {
            return Ok(address);
        }
    }
    let mut files = cluster::live_clusters();
    match files.len() {
        0 => bail!(
            "no cluster to ask: no --address given, {ADDRESS_VAR} is not set, and no cluster was \
             started on this machine (`braid start --head` starts one)"
        ),
        1 => Ok(files.remove(0).address),
        _ => {
            let addresses: Vec<String> = files.into_iter().map(|f| f.address).collect();
            Err(usage_error(
                command,
                format!(
                    "several clusters run on this machine ({}): pass --address <HOST:PORT>",
                    addresses.join(", ")
                ),
            )
            .into())
        }
    }
}

/// Connects `command` to the head: at `--address`, else `BRAID_ADDRESS`,
/// else the one cluster this user started on this machine; with
/// `--token`, else `BRAID_TOKEN`, else this machine's token file.
pub fn connect_to(
    command: &str,
    address: Option<String>,
    token: Option<String>,
) -> anyhow::Result<Connected> {
    let address = resolve_address(command, address)?;
    let token = match token {
        Some(token) if !token.is_empty() => token,
        Some(_) => return Err(usage_error(command, "the value of --token is empty").into()),
        None => cluster::token_for(&address).map_err(|_| {
            usage_error(
                command,
                format!(
                    "no token for the cluster at {address}: pass --token <TOKEN> or set \
                     {TOKEN_VAR} (the head's machine keeps it in {})",
                    cluster::cluster_file_path(&address).display()
                ),
            )
        })?,
    };
    connect(&address, &token)
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
        token: token.to_owned(),
        http: parking_lot::Mutex::new(String::new()),
    })
}

impl Connected {
    /// The jobs `braid job submit` started, as the head's job manager
    /// keeps them (none if it cannot be asked).
    pub fn submitted_jobs(&self) -> Vec<braid::rpc::job_manager::Submission> {
        self.get_api("/api/jobs/submitted", std::time::Duration::from_secs(10))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// The head's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `GET path` on the head's HTTP API (its dashboard's address), with
    /// the token; the body of a 200, else an error saying what came back.
    pub fn get_api(&self, path: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
        ok_body(path, self.api(path, ApiBody::None, timeout)?)
    }

    /// `POST path` with a JSON body on the head's HTTP API; as
    /// [`get_api`](Self::get_api).
    pub fn post_api(
        &self,
        path: &str,
        json: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<String> {
        ok_body(path, self.api(path, ApiBody::Json(json), timeout)?)
    }

    /// `POST path` with a JSON body on the head's HTTP API: its answer,
    /// whatever its status.
    pub fn post_api_answer(
        &self,
        path: &str,
        json: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<braid::telemetry::http::Answer> {
        self.api(path, ApiBody::Json(json), timeout)
    }

    /// `PUT path` with `bytes` on the head's HTTP API; as
    /// [`get_api`](Self::get_api).
    pub fn put_api(
        &self,
        path: &str,
        bytes: &[u8],
        timeout: std::time::Duration,
    ) -> anyhow::Result<String> {
        ok_body(path, self.api(path, ApiBody::Bytes(bytes), timeout)?)
    }

    fn api(
        &self,
        path: &str,
        body: ApiBody<'_>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<braid::telemetry::http::Answer> {
        let http = {
            let mut cached = self.http.lock();
            if cached.is_empty() {
                let status = self.cluster_status()?;
                if status.metrics_address.is_empty() {
                    bail!("the head at {} serves no HTTP API", self.address);
                }
                cached.clone_from(&status.metrics_address);
            }
            cached.clone()
        };
        use braid::telemetry::http;
        let token = Some(self.token.as_str());
        let request = async {
            match body {
                ApiBody::Json(json) => http::post(&http, path, token, json, timeout).await,
                ApiBody::Bytes(bytes) => http::put(&http, path, token, bytes, timeout).await,
                ApiBody::None => http::get(&http, path, token, timeout).await,
            }
        };
        self.rt
            .block_on(request)
            .with_context(|| format!("ask the head's HTTP API at {http}"))
    }

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

/// What a request to the head's HTTP API carries.
enum ApiBody<'a> {
    None,
    Json(&'a str),
    Bytes(&'a [u8]),
}

/// The body of a 200 answer to `path`, else an error saying what came
/// back.
fn ok_body(path: &str, answer: braid::telemetry::http::Answer) -> anyhow::Result<String> {
    if answer.status != 200 {
        bail!(
            "the head's HTTP API answered {} to {path}: {}",
            answer.status,
            answer.body.trim()
        );
    }
    Ok(answer.body)
}
