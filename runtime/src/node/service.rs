//! The node's dealings with other nodes and the head: its gRPC face
//! (`braid.v1.Node`: job binaries for nodes that lack them, frees, job
//! cleanup, actor kills, placement-group bundles, and object transfer for
//! pullers without an object plane), and its own calls to other nodes
//! (pulling objects, freeing them everywhere).

use super::{object_plane, Node};
use crate::error::{Error, Result};
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId};
use crate::resources::Resources;
use crate::rpc::proto;
use crate::rpc::NodeClient;
use crate::rpc::{node_service, NodeService};
use braid_store::ObjectId;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

struct NodeGrpc(Arc<Node>);

fn parse<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, Status> {
    text.parse()
        .map_err(|_| Status::invalid_argument(format!("malformed {what}: {text:?}")))
}

fn object_id(bytes: &[u8]) -> Result<ObjectId, Status> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| Status::invalid_argument("object ids are 16 bytes"))?;
    Ok(ObjectId::from_bytes(array))
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<proto::ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeGrpc {
    type PullObjectStream = ChunkStream;

    async fn pull_object(
        &self,
        request: Request<proto::PullObjectRequest>,
    ) -> Result<Response<Self::PullObjectStream>, Status> {
        let id = object_id(&request.get_ref().object_id)?;
        let stream =
            crate::rpc::pull_stream(self.0.store.clone(), id, crate::rpc::DEFAULT_CHUNK_SIZE);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn free_objects(
        &self,
        request: Request<proto::FreeObjectsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let ids = request
            .get_ref()
            .object_ids
            .iter()
            .map(|b| object_id(b))
            .collect::<Result<Vec<_>, _>>()?;
        let node = self.0.clone();
        tokio::task::spawn_blocking(move || node.free_local(&ids))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn job_finished(
        &self,
        request: Request<proto::JobFinishedRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let job: JobId = parse("job id", &request.get_ref().job_id)?;
        self.0.finish_job(job);
        Ok(Response::new(proto::Empty {}))
    }

    async fn kill_actor(
        &self,
        request: Request<proto::NodeKillActorRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let actor: ActorId = parse("actor id", &request.get_ref().actor_id)?;
        self.0.kill_actor(actor);
        Ok(Response::new(proto::Empty {}))
    }

    async fn reserve_bundles(
        &self,
        request: Request<proto::ReserveBundlesRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let req = request.into_inner();
        let pg: PlacementGroupId = parse("placement group id", &req.pg_id)?;
        let bundles = req
            .bundles
            .into_iter()
            .map(|b| (b.index, Resources(b.resources.into_iter().collect())))
            .collect();
        self.0
            .reserve_bundles(pg, bundles)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn release_bundles(
        &self,
        request: Request<proto::ReleaseBundlesRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let pg: PlacementGroupId = parse("placement group id", &request.get_ref().pg_id)?;
        self.0.release_bundles(pg);
        Ok(Response::new(proto::Empty {}))
    }

    async fn ping(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::PingReply>, Status> {
        Ok(Response::new(proto::PingReply {
            node_id: self.0.id.to_string(),
        }))
    }

    type FetchBinaryStream = ChunkStream;

    async fn fetch_binary(
        &self,
        request: Request<proto::FetchBinaryRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let hash = request.into_inner().build_hash;
        let node = self.0.clone();
        let path = {
            let hash = hash.clone();
            tokio::task::spawn_blocking(move || node.binary_of_build(&hash))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        };
        let path = path.ok_or_else(|| {
            Status::not_found(format!(
                "no job on this node runs a binary of build {hash:?}"
            ))
        })?;
        let stream = super::binaries::stream_file(path).await?;
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the node's gRPC service on `listener` until `stop` fires.
pub(super) async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let token = node.config.token.clone();
    let service = match node_service(NodeGrpc(node), &token) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("node gRPC service: {e}");
            return;
        }
    };
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(crate::rpc::incoming(listener), async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!("node gRPC server stopped: {e}");
    }
}

/// Objects across nodes: pulling them into this node's store (over the
/// source's object plane, else gRPC) and freeing them everywhere.
impl super::Node {
    pub(super) async fn grpc_address_of(&self, node: NodeId) -> Result<String> {
        if let Some(a) = self.state.lock().grpc_addresses.get(&node) {
            return Ok(a.clone());
        }
        let nodes = self.head.list_nodes().await?;
        let mut state = self.state.lock();
        for n in &nodes {
            state
                .grpc_addresses
                .insert(n.info.node_id, n.info.grpc_address.clone());
            state
                .object_planes
                .insert(n.info.node_id, n.info.object_plane.clone());
        }
        nodes
            .iter()
            .find(|n| n.info.node_id == node && n.alive)
            .map(|n| n.info.grpc_address.clone())
            .ok_or(Error::NodeDied(node))
    }

    pub(super) async fn node_client(&self, node: NodeId) -> Result<NodeClient> {
        let address = self.grpc_address_of(node).await?;
        NodeClient::connect(&address, &self.config.token).await
    }

    /// Pulls an object into this node's store from one of `from`. Pulls
    /// of one object at once share one transfer: each caller returns when
    /// it ended, with its outcome.
    pub(super) async fn pull(&self, id: ObjectId, from: Vec<NodeId>) -> Result<()> {
        if self.store_handle.contains(&id) {
            return Ok(());
        }
        let transfer = self.pulls.lock().entry(id).or_default().clone();
        let outcome = transfer
            .get_or_init(|| self.pull_once(id, from))
            .await
            .clone();
        {
            let mut pulls = self.pulls.lock();
            if pulls.get(&id).is_some_and(|t| Arc::ptr_eq(t, &transfer)) {
                pulls.remove(&id);
            }
        }
        outcome
    }

    pub(super) async fn pull_once(&self, id: ObjectId, from: Vec<NodeId>) -> Result<()> {
        if self.store_handle.contains(&id) {
            return Ok(());
        }
        let mut last = Error::lost(id);
        for source in from {
            if source == self.id {
                continue;
            }
            // Over the source's object plane when it has one.
            let grpc = self.grpc_address_of(source).await;
            let plane = self.state.lock().object_planes.get(&source).cloned();
            if let (Ok(_), Some(plane)) = (&grpc, plane.filter(|p| !p.is_empty())) {
                match object_plane::pull(&plane, &self.config.token, id, &self.store).await {
                    Ok(bytes) => {
                        self.transfers.received(bytes);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!("pulling {id} from {source}: {e}");
                        last = match e.into() {
                            Error::Unreachable { .. } => Error::lost(id),
                            other => other,
                        };
                        continue;
                    }
                }
            }
            let client = match self.node_client(source).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("pulling {id}: node {source} unreachable: {e}");
                    last = Error::lost(id);
                    continue;
                }
            };
            match crate::rpc::transfer::pull_into(&client, id, &self.store).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!("pulling {id} from {source}: {e}");
                    last = e.into();
                    if matches!(last, Error::Unreachable { .. }) {
                        last = Error::lost(id);
                    }
                }
            }
        }
        Err(last)
    }

    /// Deletes objects here and on the other nodes holding them.
    pub(super) async fn free(&self, list: Vec<(ObjectId, Vec<NodeId>)>) {
        let mut remote: HashMap<NodeId, Vec<ObjectId>> = HashMap::new();
        let mut local = Vec::new();
        for (id, nodes) in list {
            for n in nodes {
                if n == self.id {
                    local.push(id);
                } else {
                    remote.entry(n).or_default().push(id);
                }
            }
        }
        if !local.is_empty() {
            let store = self.store_handle.clone();
            store.delete_many(&local);
        }
        for (node, ids) in remote {
            match self.node_client(node).await {
                Ok(client) => {
                    if let Err(e) = client.free_objects(&ids).await {
                        tracing::debug!("freeing on {node}: {e}");
                    }
                }
                Err(e) => tracing::debug!("freeing on {node}: {e}"),
            }
        }
    }

    /// Deletes objects from this node's store.
    pub(super) fn free_local(&self, ids: &[ObjectId]) {
        self.store_handle.delete_many(ids);
    }
}
