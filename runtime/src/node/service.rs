//! The node's gRPC face (`braid.v1.Node`): object transfer to other nodes,
//! job binaries for nodes that lack them, frees, job cleanup, actor kills
//! and placement-group bundles, called by the head and by other nodes.

use super::Node;
use crate::ids::{ActorId, JobId, PlacementGroupId};
use crate::resources::Resources;
use crate::rpc::proto;
use crate::rpc::{node_service, NodeService};
use braid_store::ObjectId;
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
