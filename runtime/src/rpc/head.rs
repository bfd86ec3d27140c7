//! Starting the head: its gRPC `Head` service ([`super::head_service`]),
//! the node reaper, and its HTTP API ([`super::head_http`]: `/metrics`, the
//! dashboard, jobs), with the job manager that runs submitted jobs.

use super::auth::ServerAuth;
use super::channel::MAX_MESSAGE;
use super::head_service::HeadService;
use super::job_manager::JobManager;
use super::proto::head_server::HeadServer;
use super::server::{self, HeadError, ServerRunning, StopHandle};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How the head is served.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The cluster token every call must carry.
    pub token: String,
    /// A node with no heartbeat for this long is declared dead: its actors
    /// are marked DEAD (cause "node died") and it is no longer picked.
    pub node_timeout: Duration,
    /// Where to serve `/metrics` (port 0 picks one; `None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Where submitted jobs' logs go (`None`: the head runs no jobs).
    pub job_logs: Option<std::path::PathBuf>,
}

impl HeadConfig {
    /// The default node timeout.
    pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);

    /// A configuration with the default node timeout (10 s).
    pub fn new(listen: SocketAddr, token: impl Into<String>) -> HeadConfig {
        HeadConfig {
            listen,
            token: token.into(),
            node_timeout: Self::DEFAULT_NODE_TIMEOUT,
            metrics_listen: None,
            job_logs: None,
        }
    }
}

/// A running head.
#[derive(Debug)]
pub struct HeadRunning {
    /// The address the head listens on (with the real port).
    pub local_addr: SocketAddr,
    /// The cluster's id, as given to registering nodes.
    pub cluster_id: String,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    server: ServerRunning,
    _http: Option<crate::telemetry::http::HttpServer>,
    _jobs: Option<StopJobsOnDrop>,
}

/// Kills the submitted jobs' processes when the head stops.
#[derive(Debug)]
struct StopJobsOnDrop(Arc<JobManager>);

impl Drop for StopJobsOnDrop {
    fn drop(&mut self) {
        self.0.stop_all();
    }
}

impl HeadRunning {
    /// A handle that stops the head from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        self.server.stop_handle()
    }

    /// Stops the head gracefully and waits until it has.
    pub async fn shutdown(self) -> Result<(), HeadError> {
        self.server.shutdown().await
    }

    /// Waits until the head stops.
    pub async fn wait(self) -> Result<(), HeadError> {
        self.server.wait().await
    }
}

/// Serves the head on `config.listen` until stopped. The listener is bound
/// before this returns, so [`HeadRunning::local_addr`] has the real port.
/// Dropping the returned [`HeadRunning`] stops the head.
pub async fn serve_head(config: HeadConfig) -> Result<HeadRunning, HeadError> {
    let auth = ServerAuth::new(&config.token)?;
    let (listener, local_addr) = server::bind(config.listen).await?;
    let cluster_id = uuid::Uuid::new_v4().simple().to_string();
    let mut service = HeadService::new(cluster_id.clone(), config.token.clone());
    let jobs = config.job_logs.clone().map(|dir| {
        let reachable = if local_addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local_addr.port())
        } else {
            local_addr
        };
        JobManager::new(dir, reachable.to_string(), config.token.clone())
    });
    service.set_jobs(jobs.clone());
    let reaper_service = service.clone();
    let service_for_watches = service.clone();
    let node_timeout = config.node_timeout;
    let grpc = HeadServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let grpc = tonic::service::interceptor::InterceptedService::new(grpc, auth);
    let watch_service = service_for_watches.clone();
    let http = match config.metrics_listen {
        Some(listen) => Some(
            crate::telemetry::http::serve(
                listen,
                super::head_http::router(service_for_watches.clone(), &config.token),
            )
            .await?,
        ),
        None => None,
    };
    let metrics_addr = http.as_ref().map(|h| h.local_addr);
    if let Some(addr) = metrics_addr {
        service_for_watches.set_metrics_address(&addr.to_string());
    }
    let server = server::spawn(listener, local_addr, move |incoming, stop| async move {
        // Watch streams last as long as their nodes: end them, or a
        // graceful stop would wait for them.
        let stop = async move {
            stop.await;
            watch_service.end_watches();
        };
        let serve = server::builder()
            .add_service(grpc)
            .serve_with_incoming_shutdown(incoming, stop);
        tokio::select! {
            result = serve => result,
            never = reaper_service.reap(node_timeout) => match never {},
        }
    });
    tracing::info!(%local_addr, %cluster_id, "head serving");
    Ok(HeadRunning {
        local_addr,
        cluster_id,
        metrics_addr,
        server,
        _http: http,
        _jobs: jobs.map(StopJobsOnDrop),
    })
}
