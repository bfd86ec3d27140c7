//! The client of the head's `Head` service: one method per RPC, taking and
//! returning the records of [`types`](super::types), with failures mapped
//! to [`crate::error::Error`].

use super::channel::{self, AuthChannel, ClientOptions, MAX_MESSAGE};
use super::proto;
use super::proto::head_client::HeadClient as GrpcHeadClient;
use super::types::{
    collect, parse_node_ids, ActorLookup, ActorRecord, ActorSpec, ActorUpdate, ClusterStatusRecord,
    InvalidMessage, JobInfo, JobRecord, NodeHeartbeat, NodeInfo, NodeRecord, PickNodeOptions,
    PlacementGroupRecord, PlacementGroupSpec,
};
use crate::error::Error;
use crate::ids::{JobId, NodeId, PlacementGroupId};
use std::sync::Arc;
use tonic::{Code, Status};

/// A connection to the head; cheap to clone. Every call has a deadline
/// ([`ClientOptions::call_timeout`], 10 s by default), so a dead head fails
/// calls with [`Error::Unreachable`] instead of hanging them.
#[derive(Clone, Debug)]
pub struct HeadClient {
    inner: GrpcHeadClient<AuthChannel>,
    address: Arc<str>,
}

impl HeadClient {
    /// Connects to the head at `address` (`"host:port"`): fails with
    /// [`Error::Unreachable`] if no connection is made within a few seconds.
    /// A wrong token is only noticed at the first call
    /// ([`Error::Unauthenticated`]); an empty one at once.
    pub async fn connect(address: &str, token: &str) -> Result<HeadClient, Error> {
        Self::connect_with(address, token, ClientOptions::default()).await
    }

    /// Connects with explicit timeouts.
    pub async fn connect_with(
        address: &str,
        token: &str,
        options: ClientOptions,
    ) -> Result<HeadClient, Error> {
        let channel = channel::connect(address, token, options).await?;
        Ok(HeadClient {
            inner: GrpcHeadClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            address: address.into(),
        })
    }

    /// The head's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn client(&self) -> GrpcHeadClient<AuthChannel> {
        self.inner.clone()
    }

    fn error(&self, status: &Status) -> Error {
        channel::status_to_error(status, &self.address)
    }

    fn bad_reply(&self, e: InvalidMessage) -> Error {
        Error::Codec(format!("bad reply from the head at {}: {e}", self.address))
    }

    // ------------------------------------------------------------ nodes --

    /// Registers (or re-registers) a node; returns the cluster's id.
    pub async fn register_node(&self, node: &NodeInfo) -> Result<String, Error> {
        let request = proto::RegisterNodeRequest {
            node: Some(node.into()),
        };
        let reply = self
            .client()
            .register_node(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(reply.into_inner().cluster_id)
    }

    /// Sends a heartbeat. `false` means the head does not know the node (it
    /// restarted, or declared the node dead): register again.
    pub async fn heartbeat(&self, beat: &NodeHeartbeat) -> Result<bool, Error> {
        let reply = self
            .client()
            .heartbeat(proto::HeartbeatRequest::from(beat))
            .await
            .map_err(|s| self.error(&s))?;
        Ok(reply.into_inner().known)
    }

    /// The cluster's events for node `node_id`, as they happen: each item
    /// lists nodes declared dead (the first, every one dead so far). The
    /// head declares `node_id` dead when this stream closes and the node
    /// does not answer a ping.
    pub async fn watch(
        &self,
        node_id: NodeId,
    ) -> Result<impl futures::Stream<Item = Result<Vec<NodeId>, Error>> + use<>, Error> {
        let request = proto::WatchRequest {
            node_id: node_id.to_string(),
        };
        let stream = self
            .client()
            .watch(request)
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        let this = self.clone();
        Ok(futures::StreamExt::map(stream, move |event| {
            let event = event.map_err(|s| this.error(&s))?;
            parse_node_ids(&event.dead_nodes).map_err(|e| this.bad_reply(e))
        }))
    }

    /// Takes a node out of the cluster; its actors die.
    pub async fn unregister_node(&self, node_id: NodeId) -> Result<(), Error> {
        let request = proto::UnregisterNodeRequest {
            node_id: node_id.to_string(),
        };
        self.client()
            .unregister_node(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Every node, alive or dead, sorted by id.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        let reply = self
            .client()
            .list_nodes(proto::Empty {})
            .await
            .map_err(|s| self.error(&s))?;
        collect(reply.into_inner().nodes).map_err(|e| self.bad_reply(e))
    }

    // ------------------------------------------------------------- jobs --

    /// Registers a job.
    pub async fn register_job(&self, job: &JobInfo) -> Result<(), Error> {
        let request = proto::RegisterJobRequest {
            job: Some(job.into()),
        };
        self.client()
            .register_job(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Marks a job finished: its non-detached actors are marked dead, its
    /// placement groups removed, and every alive node is told.
    pub async fn finish_job(&self, job_id: JobId) -> Result<(), Error> {
        let request = proto::FinishJobRequest {
            job_id: job_id.to_string(),
        };
        self.client()
            .finish_job(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Every job, oldest first.
    pub async fn list_jobs(&self) -> Result<Vec<JobRecord>, Error> {
        let reply = self
            .client()
            .list_jobs(proto::Empty {})
            .await
            .map_err(|s| self.error(&s))?;
        collect(reply.into_inner().jobs).map_err(|e| self.bad_reply(e))
    }

    // ----------------------------------------------------------- actors --

    /// Registers an actor as PENDING. A name taken by a live actor is
    /// [`Error::NameTaken`].
    pub async fn register_actor(&self, actor: &ActorSpec) -> Result<(), Error> {
        let request = proto::RegisterActorRequest {
            actor: Some(actor.into()),
        };
        self.client()
            .register_actor(request)
            .await
            .map_err(|s| match (s.code(), &actor.name) {
                (Code::AlreadyExists, Some(name)) => Error::NameTaken(name.clone()),
                _ => self.error(&s),
            })?;
        Ok(())
    }

    /// Reports an actor's new state. Once the head has it DEAD (killed, its
    /// job finished, its node died), this fails with [`Error::ActorDied`]
    /// and the actor must not be restarted.
    pub async fn update_actor(&self, update: &ActorUpdate) -> Result<(), Error> {
        self.client()
            .update_actor(proto::UpdateActorRequest::from(update))
            .await
            .map_err(|s| match s.code() {
                Code::FailedPrecondition => Error::ActorDied {
                    actor: update.actor_id,
                    cause: s.message().to_owned(),
                },
                Code::NotFound => Error::ActorNotFound(update.actor_id.to_string()),
                _ => self.error(&s),
            })?;
        Ok(())
    }

    /// Looks an actor up: by id (any state) or by name (live actors only).
    /// Unknown: [`Error::ActorNotFound`].
    pub async fn get_actor(&self, actor: impl Into<ActorLookup>) -> Result<ActorRecord, Error> {
        let lookup = actor.into();
        let request = proto::GetActorRequest {
            actor: Some((&lookup).into()),
        };
        let reply = self
            .client()
            .get_actor(request)
            .await
            .map_err(|s| self.actor_error(&s, &lookup))?;
        ActorRecord::try_from(reply.into_inner()).map_err(|e| self.bad_reply(e))
    }

    /// Every actor, sorted by id.
    pub async fn list_actors(&self) -> Result<Vec<ActorRecord>, Error> {
        let reply = self
            .client()
            .list_actors(proto::Empty {})
            .await
            .map_err(|s| self.error(&s))?;
        collect(reply.into_inner().actors).map_err(|e| self.bad_reply(e))
    }

    /// Kills an actor: it is marked DEAD (cause "killed") and its node is
    /// told to kill the worker. With `no_restart` false and restarts left,
    /// it is marked RESTARTING instead, for its owner to restart. Unknown:
    /// [`Error::ActorNotFound`].
    pub async fn kill_actor(
        &self,
        actor: impl Into<ActorLookup>,
        no_restart: bool,
    ) -> Result<(), Error> {
        let lookup = actor.into();
        let request = proto::KillActorRequest {
            actor: Some((&lookup).into()),
            no_restart,
        };
        self.client()
            .kill_actor(request)
            .await
            .map_err(|s| self.actor_error(&s, &lookup))?;
        Ok(())
    }

    fn actor_error(&self, status: &Status, lookup: &ActorLookup) -> Error {
        if status.code() == Code::NotFound {
            Error::ActorNotFound(lookup.to_string())
        } else {
            self.error(status)
        }
    }

    // ------------------------------------------------------- scheduling --

    /// Chooses a node for `options.resources`. No alive node can ever hold
    /// them: [`Error::Infeasible`].
    pub async fn pick_node(&self, options: &PickNodeOptions) -> Result<NodeInfo, Error> {
        let reply = self
            .client()
            .pick_node(proto::PickNodeRequest::from(options))
            .await
            .map_err(|s| self.error(&s))?;
        let node = reply
            .into_inner()
            .node
            .ok_or_else(|| self.bad_reply(InvalidMessage::new("node", "missing")))?;
        NodeInfo::try_from(node).map_err(|e| self.bad_reply(e))
    }

    // ------------------------------------------------- placement groups --

    /// Creates a placement group, reserving its bundles on the nodes;
    /// returns the node of each bundle. Creating an existing group answers
    /// its placement. A group the nodes can never hold, or cannot hold now,
    /// is [`Error::Infeasible`] (the message tells which).
    pub async fn create_placement_group(
        &self,
        pg: &PlacementGroupSpec,
    ) -> Result<Vec<NodeId>, Error> {
        let request = proto::CreatePlacementGroupRequest {
            pg: Some(pg.into()),
        };
        let reply = self
            .client()
            .create_placement_group(request)
            .await
            .map_err(|s| self.error(&s))?;
        parse_node_ids(&reply.into_inner().bundle_nodes).map_err(|e| self.bad_reply(e))
    }

    /// Removes a placement group and releases its bundles.
    pub async fn remove_placement_group(&self, pg_id: PlacementGroupId) -> Result<(), Error> {
        let request = proto::RemovePlacementGroupRequest {
            pg_id: pg_id.to_string(),
        };
        self.client()
            .remove_placement_group(request)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Looks a placement group up; unknown: [`Error::BadRequest`].
    pub async fn get_placement_group(
        &self,
        pg_id: PlacementGroupId,
    ) -> Result<PlacementGroupRecord, Error> {
        let request = proto::GetPlacementGroupRequest {
            pg_id: pg_id.to_string(),
        };
        let reply = self
            .client()
            .get_placement_group(request)
            .await
            .map_err(|s| self.error(&s))?;
        let pg = reply
            .into_inner()
            .pg
            .ok_or_else(|| self.bad_reply(InvalidMessage::new("pg", "missing")))?;
        PlacementGroupRecord::try_from(pg).map_err(|e| self.bad_reply(e))
    }

    // ----------------------------------------------------------- status --

    /// Everything the head knows, for `braid status`.
    pub async fn cluster_status(&self) -> Result<ClusterStatusRecord, Error> {
        let reply = self
            .client()
            .cluster_status(proto::Empty {})
            .await
            .map_err(|s| self.error(&s))?;
        ClusterStatusRecord::try_from(reply.into_inner()).map_err(|e| self.bad_reply(e))
    }
}
