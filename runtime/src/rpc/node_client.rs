//! The client of a node daemon's `Node` service.

use super::channel::{self, AuthChannel, ClientOptions, MAX_MESSAGE};
use super::proto;
use super::proto::node_client::NodeClient as GrpcNodeClient;
use super::types::{Bundle, InvalidMessage};
use crate::error::Error;
use crate::ids::{ActorId, JobId, NodeId, PlacementGroupId};
use braid_store::ObjectId;
use std::sync::Arc;
use tonic::{Status, Streaming};

/// A connection to one node's `Node` service; cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeClient {
    inner: GrpcNodeClient<AuthChannel>,
    address: Arc<str>,
}

impl NodeClient {
    /// Connects to the node at `address` (`"host:port"`) with the default
    /// [`ClientOptions`]: fails with [`Error::Unreachable`] if no connection
    /// is made within a few seconds.
    pub async fn connect(address: &str, token: &str) -> Result<NodeClient, Error> {
        Self::connect_with(address, token, ClientOptions::default()).await
    }

    /// Connects with explicit timeouts.
    pub async fn connect_with(
        address: &str,
        token: &str,
        options: ClientOptions,
    ) -> Result<NodeClient, Error> {
        let channel = channel::connect(address, token, options).await?;
        Ok(Self::wrap(channel, address))
    }

    /// A client that connects on its first call (and reconnects after a
    /// failure); fails only on a malformed address or token.
    pub fn connect_lazy(address: &str, token: &str) -> Result<NodeClient, Error> {
        Self::connect_lazy_with(address, token, ClientOptions::default())
    }

    /// Like [`connect_lazy`](Self::connect_lazy), with explicit timeouts.
    pub fn connect_lazy_with(
        address: &str,
        token: &str,
        options: ClientOptions,
    ) -> Result<NodeClient, Error> {
        let channel = channel::connect_lazy(address, token, options)?;
        Ok(Self::wrap(channel, address))
    }

    fn wrap(channel: AuthChannel, address: &str) -> NodeClient {
        NodeClient {
            inner: GrpcNodeClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            address: address.into(),
        }
    }

    /// The node's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn error(&self, status: &Status) -> Error {
        channel::status_to_error(status, &self.address)
    }

    /// Starts streaming an object out of the node's store; the raw status
    /// is kept so [`pull_into`](super::transfer::pull_into) can tell
    /// `NOT_FOUND` apart.
    pub(crate) async fn pull_raw(
        &self,
        id: ObjectId,
    ) -> Result<Streaming<proto::ObjectChunk>, Status> {
        let request = proto::PullObjectRequest {
            object_id: id.as_bytes().to_vec(),
        };
        Ok(self.inner.clone().pull_object(request).await?.into_inner())
    }

    /// Starts streaming an object out of the node's store. Most callers want
    /// [`pull_into`](super::transfer::pull_into), which checks and stores
    /// the chunks. An object the node does not have is
    /// [`Error::ObjectLost`].
    pub async fn pull_object(&self, id: ObjectId) -> Result<Streaming<proto::ObjectChunk>, Error> {
        self.pull_raw(id).await.map_err(|status| {
            if status.code() == tonic::Code::NotFound {
                Error::lost(id)
            } else {
                self.error(&status)
            }
        })
    }

    /// Starts streaming the executable whose build hash is `build_hash`
    /// out of the node (see [`fetch_binary`](super::transfer::fetch_binary),
    /// which checks and stores it).
    pub(crate) async fn fetch_binary_raw(
        &self,
        build_hash: &str,
    ) -> Result<Streaming<proto::ObjectChunk>, Status> {
        let request = proto::FetchBinaryRequest {
            build_hash: build_hash.to_owned(),
        };
        Ok(self.inner.clone().fetch_binary(request).await?.into_inner())
    }

    /// Tells the node it may drop these objects.
    pub async fn free_objects(&self, ids: &[ObjectId]) -> Result<(), Error> {
        let request = proto::FreeObjectsRequest {
            object_ids: ids.iter().map(|id| id.as_bytes().to_vec()).collect(),
        };
        self.inner
            .clone()
            .free_objects(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Tells the node a job finished.
    pub async fn job_finished(&self, job_id: JobId) -> Result<(), Error> {
        let request = proto::JobFinishedRequest {
            job_id: job_id.to_string(),
        };
        self.inner
            .clone()
            .job_finished(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Tells the node to kill an actor's worker (`worker_pid` 0 when
    /// unknown). `no_restart` says whether the actor is dead for good.
    pub async fn kill_actor(
        &self,
        actor_id: ActorId,
        worker_pid: u32,
        no_restart: bool,
    ) -> Result<(), Error> {
        let request = proto::NodeKillActorRequest {
            actor_id: actor_id.to_string(),
            worker_pid,
            no_restart,
        };
        self.inner
            .clone()
            .kill_actor(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Reserves bundles of a placement group on the node.
    pub async fn reserve_bundles(
        &self,
        pg_id: PlacementGroupId,
        bundles: &[Bundle],
    ) -> Result<(), Error> {
        let request = proto::ReserveBundlesRequest {
            pg_id: pg_id.to_string(),
            bundles: bundles.iter().map(Into::into).collect(),
        };
        self.inner
            .clone()
            .reserve_bundles(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Releases every bundle of a placement group on the node.
    pub async fn release_bundles(&self, pg_id: PlacementGroupId) -> Result<(), Error> {
        let request = proto::ReleaseBundlesRequest {
            pg_id: pg_id.to_string(),
        };
        self.inner
            .clone()
            .release_bundles(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Asks the node who it is.
    pub async fn ping(&self) -> Result<NodeId, Error> {
        let reply = self
            .inner
            .clone()
            .ping(proto::Empty {})
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        super::types::parse_id("node_id", &reply.node_id).map_err(|e: InvalidMessage| {
            Error::Codec(format!("bad reply from {}: {e}", self.address))
        })
    }
}
