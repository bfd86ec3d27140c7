//! The head's `Head` service: the cluster's metadata, kept in memory, and
//! the calls it makes to nodes (kill an actor's worker, job finished,
//! reserve and release placement-group bundles). [`super::head`] serves
//! it, beside the head's HTTP API.

use super::channel::ClientOptions;
use super::head_state::{HeadState, NodeTarget, PgPlan, Refusal, KEEP_ENDED};
use super::node_client::NodeClient;
use super::proto;
use super::proto::head_server::Head;
use super::types::{
    parse_id, ActorLookup, ActorSpec, ActorUpdate, Bundle, JobInfo, NodeHeartbeat, NodeInfo,
    PickNodeOptions, PlacementGroupSpec,
};
use crate::error::Error;
use crate::ids::{NodeId, PlacementGroupId};
use futures::future::join_all;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::{Request, Response, Status};

/// How long the head waits for a node to answer.
const NODE_CALL_OPTIONS: ClientOptions = ClientOptions {
    connect_timeout: Duration::from_secs(2),
    call_timeout: Duration::from_secs(5),
};

/// How long the head waits for its node's `/metrics`.
const LOCAL_NODE_SCRAPE: Duration = Duration::from_secs(2);

/// How long the head waits for a node's HTTP API (spans may be its whole
/// log).
const NODE_API: Duration = Duration::from_secs(30);

/// The `Head` service.
#[derive(Clone)]
pub(crate) struct HeadService {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<HeadState>,
    token: String,
    /// Lazily connected clients of the nodes, by gRPC address.
    nodes: Mutex<HashMap<String, NodeClient>>,
    /// The nodes' open watch streams: each with a number telling a stream
    /// from the one it replaced.
    watches: Mutex<HashMap<NodeId, (u64, mpsc::Sender<proto::ClusterEvent>)>>,
    next_watch: AtomicU64,
    /// Set when the head stops: every watch stream ends.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Where the head serves `/metrics` (empty: nowhere).
    metrics_address: Mutex<String>,
    /// Submitted jobs, if this head runs them.
    jobs: Mutex<Option<Arc<super::job_manager::JobManager>>>,
}

/// How long a node whose watch stream closed has to answer a ping before
/// it is declared dead.
const LOST_NODE_PING: ClientOptions = ClientOptions {
    connect_timeout: Duration::from_secs(1),
    call_timeout: Duration::from_secs(1),
};

/// Events queued per watch stream before a slow node misses some (it then
/// learns of deaths from its peers' closed connections and heartbeats).
const WATCH_QUEUE: usize = 256;

fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::AlreadyExists(m) => Status::already_exists(m),
        Refusal::Infeasible(m) => Status::failed_precondition(format!("infeasible: {m}")),
        Refusal::NotNow(m) => Status::resource_exhausted(m),
        Refusal::ActorDead(cause) => Status::failed_precondition(cause),
        Refusal::Invalid(m) => Status::invalid_argument(m),
    }
}

fn required<T>(field: &'static str, value: Option<T>) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("invalid {field}: missing")))
}

impl HeadService {
    pub(super) fn new(cluster_id: String, token: String) -> HeadService {
        HeadService {
            shared: Arc::new(Shared {
                state: Mutex::new(HeadState::new(cluster_id)),
                token,
                nodes: Mutex::new(HashMap::new()),
                watches: Mutex::new(HashMap::new()),
                next_watch: AtomicU64::new(1),
                stopping: tokio::sync::watch::Sender::new(false),
                metrics_address: Mutex::new(String::new()),
                jobs: Mutex::new(None),
            }),
        }
    }

    /// The head's `/metrics` text: its families, then those of the node
    /// beside it (fetched now; left out if it does not answer in time).
    pub(crate) async fn metrics_text(&self) -> String {
        let (families, local) = {
            let state = self.shared.state.lock();
            (state.families(), state.head_node_metrics())
        };
        let own = crate::telemetry::family::render(families);
        let Some(local) = local.filter(|a| !a.is_empty()) else {
            return own;
        };
        match crate::telemetry::http::get(
            &local,
            "/metrics",
            Some(&self.shared.token),
            LOCAL_NODE_SCRAPE,
        )
        .await
        {
            Ok(answer) if answer.status == 200 => {
                crate::telemetry::family::join(&[&own, &answer.body])
            }
            Ok(answer) => {
                tracing::debug!("the head's node answered /metrics with {}", answer.status);
                own
            }
            Err(e) => {
                tracing::debug!("the head's node's /metrics: {e}");
                own
            }
        }
    }

    pub(super) fn set_jobs(&mut self, jobs: Option<Arc<super::job_manager::JobManager>>) {
        *self.shared.jobs.lock() = jobs;
    }

    /// Records where the head serves `/metrics`, for its status.
    pub(super) fn set_metrics_address(&self, address: &str) {
        address.clone_into(&mut self.shared.metrics_address.lock());
    }

    /// The head's submitted jobs, if it runs them.
    pub(crate) fn jobs(&self) -> Option<Arc<super::job_manager::JobManager>> {
        self.shared.jobs.lock().clone()
    }

    /// The head's tables now, with where it serves `/metrics`.
    pub(crate) fn status_now(&self) -> super::types::ClusterStatusRecord {
        let mut status = self.shared.state.lock().status(Instant::now());
        status
            .metrics_address
            .clone_from(&self.shared.metrics_address.lock());
        status
    }

    /// The head's families (under `head`) and each live node's (under its
    /// short id), fetched from the nodes at once; a node that does not
    /// answer in time is left out.
    pub(crate) async fn all_families(&self) -> Vec<(String, Vec<crate::telemetry::Family>)> {
        let (own, nodes) = {
            let state = self.shared.state.lock();
            (state.families(), state.live_node_metrics())
        };
        let token = self.shared.token.clone();
        let fetches = nodes.into_iter().map(|(node, address)| {
            let token = token.clone();
            async move {
                let answer = crate::telemetry::http::get(
                    &address,
                    "/api/families",
                    Some(&token),
                    LOCAL_NODE_SCRAPE,
                )
                .await
                .ok()
                .filter(|a| a.status == 200)?;
                let families = serde_json::from_str(&answer.body).ok()?;
                Some((node.to_string()[..8].to_string(), families))
            }
        });
        let mut out = vec![("head".to_string(), own)];
        out.extend(join_all(fetches).await.into_iter().flatten());
        out
    }

    /// What every live node answers at `path` of its HTTP API (a JSON
    /// list), with the node; a node that does not answer in time is left
    /// out.
    pub(crate) async fn gather<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Vec<(NodeId, Vec<T>)> {
        let nodes = self.shared.state.lock().live_node_metrics();
        let token = self.shared.token.clone();
        let fetches = nodes.into_iter().map(|(node, address)| {
            let token = token.clone();
            async move {
                let answer = crate::telemetry::http::get(&address, path, Some(&token), NODE_API)
                    .await
                    .ok()
                    .filter(|a| a.status == 200)?;
                Some((node, serde_json::from_str::<Vec<T>>(&answer.body).ok()?))
            }
        });
        join_all(fetches).await.into_iter().flatten().collect()
    }

    /// `GET path` on the HTTP API of the live node whose id starts with
    /// `node`.
    pub(crate) async fn node_api(
        &self,
        node: &str,
        path: &str,
    ) -> Result<crate::telemetry::http::Answer, String> {
        let matches: Vec<(NodeId, String)> = self
            .shared
            .state
            .lock()
            .live_node_metrics()
            .into_iter()
            .filter(|(id, _)| id.to_string().starts_with(node))
            .collect();
        let (_, address) = match matches.as_slice() {
            [one] => one.clone(),
            [] => return Err(format!("no live node {node}")),
            _ => return Err(format!("several nodes start with {node}")),
        };
        crate::telemetry::http::get(&address, path, Some(&self.shared.token), NODE_API)
            .await
            .map_err(|e| e.to_string())
    }

    /// The spans of job `job` (every job's with `None`) from every live
    /// node, by start time.
    pub(crate) async fn all_spans(
        &self,
        job: Option<crate::ids::JobId>,
    ) -> Vec<crate::telemetry::spans::Span> {
        let path = match job {
            Some(job) => format!("/api/tasks?job={job}"),
            None => "/api/tasks".to_string(),
        };
        let mut spans: Vec<crate::telemetry::spans::Span> = self
            .gather(&path)
            .await
            .into_iter()
            .flat_map(|(_, spans)| spans)
            .collect();
        spans.sort_by_key(|s| s.started_ns);
        spans
    }

    /// Tells every watching node that `node_id` died.
    fn announce_death(&self, node_id: NodeId) {
        let event = proto::ClusterEvent {
            dead_nodes: vec![node_id.to_string()],
        };
        let mut watches = self.shared.watches.lock();
        watches.remove(&node_id);
        for (_, tx) in watches.values() {
            let _ = tx.try_send(event.clone());
        }
    }

    /// Ends every watch stream (the head is stopping).
    pub(super) fn end_watches(&self) {
        self.shared.stopping.send_replace(true);
        self.shared.watches.lock().clear();
    }

    /// A node's watch stream closed: if it is still the node's latest and
    /// the node does not answer a ping, the node is dead.
    async fn watch_closed(&self, node_id: NodeId, number: u64) {
        let address = {
            let mut watches = self.shared.watches.lock();
            if watches.get(&node_id).map(|(n, _)| *n) != Some(number) {
                return;
            }
            watches.remove(&node_id);
            self.shared.state.lock().grpc_address(node_id)
        };
        let Some(address) = address else { return };
        let answered =
            match NodeClient::connect_lazy_with(&address, &self.shared.token, LOST_NODE_PING) {
                Ok(client) => client.ping().await.is_ok_and(|id| id == node_id),
                Err(_) => false,
            };
        if answered {
            return;
        }
        let died = self
            .shared
            .state
            .lock()
            .declare_dead(node_id, super::head_state::CAUSE_NODE_LOST);
        if let Some(actors) = died {
            tracing::warn!(
                %node_id,
                dead_actors = actors.len(),
                "node's connection closed and it does not answer; declared dead"
            );
            self.announce_death(node_id);
        }
    }

    /// Declares dead the nodes that stopped heartbeating, and forgets what
    /// ended more than [`KEEP_ENDED`] ago, forever.
    pub(super) async fn reap(&self, timeout: Duration) -> std::convert::Infallible {
        let period = (timeout / 4).max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let died = {
                let mut state = self.shared.state.lock();
                let now = Instant::now();
                state.forget_ended(now, super::head_state::unix_millis(), KEEP_ENDED);
                state.expire_nodes(now, timeout)
            };
            for (node_id, actors) in died {
                tracing::warn!(
                    %node_id,
                    dead_actors = actors.len(),
                    "node missed heartbeats for {timeout:?}; declared dead"
                );
                self.announce_death(node_id);
            }
        }
    }

    fn node_client(&self, address: &str) -> Result<NodeClient, Error> {
        let mut nodes = self.shared.nodes.lock();
        if let Some(client) = nodes.get(address) {
            return Ok(client.clone());
        }
        let client = NodeClient::connect_lazy_with(address, &self.shared.token, NODE_CALL_OPTIONS)?;
        nodes.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// Tells every target to release a group's bundles, logging failures.
    async fn release_bundles(&self, pg_id: PlacementGroupId, targets: &[NodeTarget]) {
        join_all(targets.iter().map(|target| async move {
            let result = match self.node_client(&target.address) {
                Ok(client) => client.release_bundles(pg_id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(node_id = %target.node_id, %pg_id, "cannot release bundles: {e}");
            }
        }))
        .await;
    }
}

#[tonic::async_trait]
impl Head for HeadService {
    async fn register_node(
        &self,
        request: Request<proto::RegisterNodeRequest>,
    ) -> Result<Response<proto::RegisterNodeReply>, Status> {
        let node = NodeInfo::try_from(required("node", request.into_inner().node)?)?;
        tracing::info!(node_id = %node.node_id, address = %node.grpc_address, "node registered");
        let mut state = self.shared.state.lock();
        state.register_node(node, Instant::now());
        Ok(Response::new(proto::RegisterNodeReply {
            cluster_id: state.cluster_id().to_owned(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let beat = NodeHeartbeat::try_from(request.into_inner())?;
        let known = self.shared.state.lock().heartbeat(beat, Instant::now());
        Ok(Response::new(proto::HeartbeatReply { known }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<proto::ClusterEvent, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node_id = parse_id("node_id", &request.into_inner().node_id)?;
        let dead = {
            let state = self.shared.state.lock();
            if !state.is_alive(node_id) {
                return Err(Status::failed_precondition(format!(
                    "node {node_id} is not registered"
                )));
            }
            state.dead_nodes()
        };
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let _ = tx.try_send(proto::ClusterEvent {
            dead_nodes: dead.iter().map(ToString::to_string).collect(),
        });
        let number = self.shared.next_watch.fetch_add(1, Ordering::Relaxed);
        self.shared
            .watches
            .lock()
            .insert(node_id, (number, tx.clone()));
        let service = self.clone();
        let mut stopping = self.shared.stopping.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = tx.closed() => service.watch_closed(node_id, number).await,
                () = async move {
                    let _ = stopping.wait_for(|s| *s).await.map(|_| ());
                } => {}
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn unregister_node(
        &self,
        request: Request<proto::UnregisterNodeRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let node_id = parse_id("node_id", &request.into_inner().node_id)?;
        // Unregistering an unknown node is a no-op.
        let left = self.shared.state.lock().unregister_node(node_id);
        if let Ok(actors) = left {
            tracing::info!(%node_id, dead_actors = actors.len(), "node unregistered");
            self.announce_death(node_id);
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::ListNodesReply>, Status> {
        let nodes = self.shared.state.lock().list_nodes(Instant::now());
        Ok(Response::new(proto::ListNodesReply {
            nodes: nodes.iter().map(Into::into).collect(),
        }))
    }

    async fn register_job(
        &self,
        request: Request<proto::RegisterJobRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let job = JobInfo::try_from(required("job", request.into_inner().job)?)?;
        tracing::info!(job_id = %job.job_id, "job registered");
        self.shared.state.lock().register_job(job);
        Ok(Response::new(proto::Empty {}))
    }

    async fn finish_job(
        &self,
        request: Request<proto::FinishJobRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let job_id = parse_id("job_id", &request.into_inner().job_id)?;
        let cleanup = self.shared.state.lock().finish_job(job_id);
        tracing::info!(
            %job_id,
            dead_actors = cleanup.dead_actors.len(),
            placement_groups = cleanup.placement_groups.len(),
            "job finished"
        );
        let notify = join_all(cleanup.nodes.iter().map(|target| async move {
            let result = match self.node_client(&target.address) {
                Ok(client) => client.job_finished(job_id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(node_id = %target.node_id, %job_id, "cannot tell the node the job finished: {e}");
            }
        }));
        let release = join_all(
            cleanup
                .placement_groups
                .iter()
                .map(|(pg_id, targets)| self.release_bundles(*pg_id, targets)),
        );
        futures::join!(notify, release);
        Ok(Response::new(proto::Empty {}))
    }

    async fn list_jobs(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::ListJobsReply>, Status> {
        let jobs = self.shared.state.lock().list_jobs();
        Ok(Response::new(proto::ListJobsReply {
            jobs: jobs.iter().map(Into::into).collect(),
        }))
    }

    async fn register_actor(
        &self,
        request: Request<proto::RegisterActorRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let spec = ActorSpec::try_from(required("actor", request.into_inner().actor)?)?;
        self.shared
            .state
            .lock()
            .register_actor(spec)
            .map_err(refusal)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn update_actor(
        &self,
        request: Request<proto::UpdateActorRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let update = ActorUpdate::try_from(request.into_inner())?;
        self.shared
            .state
            .lock()
            .update_actor(update)
            .map_err(refusal)?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_actor(
        &self,
        request: Request<proto::GetActorRequest>,
    ) -> Result<Response<proto::ActorInfo>, Status> {
        let lookup = ActorLookup::try_from(request.into_inner().actor)?;
        let actor = self
            .shared
            .state
            .lock()
            .get_actor(&lookup)
            .map_err(refusal)?;
        Ok(Response::new((&actor).into()))
    }

    async fn list_actors(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::ListActorsReply>, Status> {
        let actors = self.shared.state.lock().list_actors();
        Ok(Response::new(proto::ListActorsReply {
            actors: actors.iter().map(Into::into).collect(),
        }))
    }

    async fn kill_actor(
        &self,
        request: Request<proto::KillActorRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let lookup = ActorLookup::try_from(request.actor)?;
        let order = self
            .shared
            .state
            .lock()
            .kill_actor(&lookup, request.no_restart)
            .map_err(refusal)?;
        if let Some(order) = order {
            tracing::info!(actor_id = %order.actor_id, node_id = %order.node.node_id, "killing actor");
            let result = match self.node_client(&order.node.address) {
                Ok(client) => {
                    client
                        .kill_actor(order.actor_id, order.worker_pid, order.no_restart)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(actor_id = %order.actor_id, node_id = %order.node.node_id, "cannot tell the node to kill the actor: {e}");
            }
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn pick_node(
        &self,
        request: Request<proto::PickNodeRequest>,
    ) -> Result<Response<proto::PickNodeReply>, Status> {
        let options = PickNodeOptions::try_from(request.into_inner())?;
        let node = self
            .shared
            .state
            .lock()
            .pick_node(&options)
            .map_err(refusal)?;
        Ok(Response::new(proto::PickNodeReply {
            node: Some((&node).into()),
        }))
    }

    async fn create_placement_group(
        &self,
        request: Request<proto::CreatePlacementGroupRequest>,
    ) -> Result<Response<proto::CreatePlacementGroupReply>, Status> {
        let spec = PlacementGroupSpec::try_from(required("pg", request.into_inner().pg)?)?;
        let pg_id = spec.pg_id;
        let plan = self
            .shared
            .state
            .lock()
            .plan_placement_group(spec)
            .map_err(refusal)?;
        let (bundle_nodes, reservations) = match plan {
            PgPlan::Existing(bundle_nodes) => {
                return Ok(Response::new(proto::CreatePlacementGroupReply {
                    bundle_nodes: bundle_nodes.iter().map(ToString::to_string).collect(),
                }))
            }
            PgPlan::New {
                bundle_nodes,
                reservations,
            } => (bundle_nodes, reservations),
        };
        let results = join_all(reservations.iter().map(|(target, bundles)| async move {
            let bundles: Vec<Bundle> = bundles
                .iter()
                .map(|(index, resources)| Bundle {
                    index: *index,
                    resources: resources.clone(),
                })
                .collect();
            let result = match self.node_client(&target.address) {
                Ok(client) => client.reserve_bundles(pg_id, &bundles).await,
                Err(e) => Err(e),
            };
            result.map_err(|e| (target.node_id, e))
        }))
        .await;
        let targets: Vec<NodeTarget> = reservations.into_iter().map(|(t, _)| t).collect();
        if let Some((node_id, e)) = results.into_iter().find_map(Result::err) {
            tracing::warn!(%pg_id, %node_id, "cannot reserve bundles; rolling back: {e}");
            self.shared.state.lock().remove_placement_group(pg_id);
            self.release_bundles(pg_id, &targets).await;
            return Err(Status::unavailable(format!(
                "node {node_id} could not reserve the bundles of placement group {pg_id}: {e}"
            )));
        }
        if !self.shared.state.lock().commit_placement_group(pg_id) {
            // Removed while its bundles were being reserved.
            self.release_bundles(pg_id, &targets).await;
            return Err(Status::aborted(format!(
                "placement group {pg_id} was removed while being created"
            )));
        }
        tracing::info!(%pg_id, nodes = targets.len(), "placement group created");
        Ok(Response::new(proto::CreatePlacementGroupReply {
            bundle_nodes: bundle_nodes.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn remove_placement_group(
        &self,
        request: Request<proto::RemovePlacementGroupRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let pg_id = parse_id("pg_id", &request.into_inner().pg_id)?;
        // Removing an unknown group is a no-op.
        let targets = self.shared.state.lock().remove_placement_group(pg_id);
        if let Some(targets) = targets {
            self.release_bundles(pg_id, &targets).await;
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_placement_group(
        &self,
        request: Request<proto::GetPlacementGroupRequest>,
    ) -> Result<Response<proto::GetPlacementGroupReply>, Status> {
        let pg_id = parse_id("pg_id", &request.into_inner().pg_id)?;
        let pg = self
            .shared
            .state
            .lock()
            .get_placement_group(pg_id)
            .map_err(refusal)?;
        Ok(Response::new(proto::GetPlacementGroupReply {
            pg: Some((&pg).into()),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::ClusterStatusReply>, Status> {
        let status = self.status_now();
        Ok(Response::new((&status).into()))
    }
}
