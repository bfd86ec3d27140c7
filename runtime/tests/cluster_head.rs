//! The head's gRPC service and the node-to-node object transfer, over real sockets on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::error::Error;
use braid::ids::{ActorId, JobId, NodeId, PlacementGroupId};
use braid::rpc::proto::{self, ObjectChunk};
use braid::rpc::{
    pull_into, pull_stream, serve_head, serve_node, ActorLookup, ActorSpec, ActorState,
    ActorUpdate, HeadClient, HeadConfig, HeadRunning, JobInfo, NodeClient, NodeHeartbeat, NodeInfo,
    NodeRunning, NodeService, PickNodeOptions, PlacementGroupSpec, PlacementStrategy, ResourceMap,
    SchedulingStrategy, TransferError,
};
use braid_store::{ObjectId, StoreClient, StoreConfig, StoreHandle, StoreServer};
use futures::{Stream, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Response, Status};

const TOKEN: &str = "test-cluster-token";

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_head(node_timeout: Duration) -> (HeadRunning, HeadClient) {
    let head = serve_head(HeadConfig {
        listen: localhost(),
        token: TOKEN.into(),
        node_timeout,
        metrics_listen: None,
        job_logs: None,
    })
    .await
    .unwrap();
    let client = HeadClient::connect(&head.local_addr.to_string(), TOKEN)
        .await
        .unwrap();
    (head, client)
}

fn cpus(n: f64) -> ResourceMap {
    ResourceMap::from([("CPU".to_owned(), n)])
}

/// What the fake node was asked to do.
#[derive(Debug, Default)]
struct Calls {
    reserved: Vec<(String, Vec<u32>)>,
    released: Vec<String>,
    killed: Vec<(String, u32, bool)>,
    jobs_finished: Vec<String>,
}

/// A `Node` service that records the head's calls and serves objects from
/// a store (optionally corrupting one byte of the second chunk).
#[derive(Clone, Default)]
struct FakeNode {
    node_id: Option<NodeId>,
    calls: Arc<Mutex<Calls>>,
    store: Option<Arc<StoreClient>>,
    chunk_size: usize,
    corrupt: bool,
    refuse_bundles: bool,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for FakeNode {
    type PullObjectStream = ChunkStream;

    async fn pull_object(
        &self,
        request: Request<proto::PullObjectRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let id = braid::rpc::types::parse_object_id(&request.into_inner().object_id)?;
        let store = self
            .store
            .clone()
            .ok_or_else(|| Status::not_found("no store"))?;
        let stream = pull_stream(store, id, self.chunk_size);
        if !self.corrupt {
            return Ok(Response::new(Box::pin(stream)));
        }
        let corrupted = stream.enumerate().map(|(i, chunk)| {
            let mut chunk = chunk?;
            if i == 1 {
                let mut data = chunk.data.to_vec();
                data[7] ^= 0x40;
                chunk.data = data.into();
            }
            Ok(chunk)
        });
        Ok(Response::new(Box::pin(corrupted)))
    }

    async fn free_objects(
        &self,
        _request: Request<proto::FreeObjectsRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        Ok(Response::new(proto::Empty {}))
    }

    async fn job_finished(
        &self,
        request: Request<proto::JobFinishedRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let job = request.into_inner().job_id;
        self.calls.lock().unwrap().jobs_finished.push(job);
        Ok(Response::new(proto::Empty {}))
    }

    async fn kill_actor(
        &self,
        request: Request<proto::NodeKillActorRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.calls
            .lock()
            .unwrap()
            .killed
            .push((r.actor_id, r.worker_pid, r.no_restart));
        Ok(Response::new(proto::Empty {}))
    }

    async fn reserve_bundles(
        &self,
        request: Request<proto::ReserveBundlesRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        if self.refuse_bundles {
            return Err(Status::resource_exhausted("no room"));
        }
        let r = request.into_inner();
        let indices = r.bundles.iter().map(|b| b.index).collect();
        self.calls.lock().unwrap().reserved.push((r.pg_id, indices));
        Ok(Response::new(proto::Empty {}))
    }

    async fn release_bundles(
        &self,
        request: Request<proto::ReleaseBundlesRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let pg = request.into_inner().pg_id;
        self.calls.lock().unwrap().released.push(pg);
        Ok(Response::new(proto::Empty {}))
    }

    async fn ping(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::PingReply>, Status> {
        Ok(Response::new(proto::PingReply {
            node_id: self.node_id.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    type FetchBinaryStream = ChunkStream;

    async fn fetch_binary(
        &self,
        _request: Request<proto::FetchBinaryRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Err(Status::not_found("a fake node runs no jobs"))
    }
}

/// A fake node, served, and its registration.
struct TestNode {
    info: NodeInfo,
    calls: Arc<Mutex<Calls>>,
    _server: NodeRunning,
}

async fn start_node(cpu: f64, fake: FakeNode) -> TestNode {
    let node_id = NodeId::random();
    let fake = FakeNode {
        node_id: Some(node_id),
        ..fake
    };
    let calls = Arc::clone(&fake.calls);
    let server = serve_node(localhost(), TOKEN, fake).await.unwrap();
    let info = NodeInfo {
        node_id,
        hostname: "localhost".into(),
        pid: std::process::id(),
        grpc_address: server.local_addr.to_string(),
        control: braid::wire::Endpoint {
            machine: braid::wire::MachineId("elsewhere".into()),
            socket: "/nowhere".into(),
            tcp: None,
        },
        store_socket: "/nowhere/store.sock".into(),
        object_plane: String::new(),
        session_dir: "/nowhere".into(),
        resources_total: cpus(cpu),
        store_capacity: 1 << 30,
        is_head_node: false,
        metrics_address: String::new(),
    };
    TestNode {
        info,
        calls,
        _server: server,
    }
}

async fn register(head: &HeadClient, cpu: f64) -> TestNode {
    let node = start_node(cpu, FakeNode::default()).await;
    head.register_node(&node.info).await.unwrap();
    node
}

fn actor(job: JobId, name: Option<&str>, detached: bool) -> ActorSpec {
    ActorSpec {
        actor_id: ActorId::random(),
        job_id: job,
        class_name: "Counter".into(),
        name: name.map(str::to_owned),
        detached,
        owner_address: "127.0.0.1:1".into(),
        max_restarts: 0,
        resources: cpus(1.0),
    }
}

fn alive_on(actor: &ActorSpec, node: NodeId, pid: u32) -> ActorUpdate {
    ActorUpdate {
        actor_id: actor.actor_id,
        state: ActorState::Alive,
        node_id: Some(node),
        worker_address: "127.0.0.1:2".into(),
        worker_pid: pid,
        restarts: 0,
        death_cause: String::new(),
    }
}

fn pg(bundles: usize, cpu: f64, strategy: PlacementStrategy) -> PlacementGroupSpec {
    PlacementGroupSpec {
        pg_id: PlacementGroupId::random(),
        name: None,
        bundles: vec![cpus(cpu); bundles],
        strategy,
        job_id: None,
    }
}

#[tokio::test]
async fn calls_need_the_cluster_token() {
    let (head, good) = start_head(Duration::from_secs(10)).await;
    let address = head.local_addr.to_string();
    assert!(good.list_nodes().await.unwrap().is_empty());

    let wrong = HeadClient::connect(&address, "not-the-token")
        .await
        .unwrap();
    assert!(matches!(
        wrong.list_nodes().await,
        Err(Error::Unauthenticated(_))
    ));
    assert!(matches!(
        HeadClient::connect(&address, "").await,
        Err(Error::Unauthenticated(_))
    ));

    // A client that sends no token at all.
    let mut bare = proto::head_client::HeadClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let status = bare.list_nodes(proto::Empty {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The node service checks the token too.
    let node = start_node(1.0, FakeNode::default()).await;
    let client = NodeClient::connect(&node.info.grpc_address, "nope")
        .await
        .unwrap();
    assert!(matches!(
        client.ping().await,
        Err(Error::Unauthenticated(_))
    ));
    let client = NodeClient::connect(&node.info.grpc_address, TOKEN)
        .await
        .unwrap();
    assert_eq!(client.ping().await.unwrap(), node.info.node_id);

    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreachable_head_is_reported() {
    // Bind a port, then free it: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    assert!(matches!(
        HeadClient::connect(&address, TOKEN).await,
        Err(Error::Unreachable { .. })
    ));
}

#[tokio::test]
async fn nodes_register_heartbeat_and_get_picked() {
    let (head, client) = start_head(Duration::from_secs(10)).await;
    let small = register(&client, 4.0).await;
    let big = register(&client, 8.0).await;
    assert_eq!(
        client.register_node(&small.info).await.unwrap(),
        head.cluster_id,
        "re-registering replaces the node"
    );

    let nodes = client.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n.alive));
    let stranger = NodeHeartbeat {
        node_id: NodeId::random(),
        resources_available: cpus(1.0),
        store_used: 0,
        store_capacity: 0,
        num_workers: 0,
    };
    assert!(!client.heartbeat(&stranger).await.unwrap());

    // The big node reports it is busy: the small one has more CPU free.
    let busy = NodeHeartbeat {
        node_id: big.info.node_id,
        resources_available: cpus(1.0),
        store_used: 1234,
        store_capacity: 1 << 30,
        num_workers: 7,
    };
    assert!(client.heartbeat(&busy).await.unwrap());
    let record = client
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.info.node_id == big.info.node_id)
        .unwrap();
    assert_eq!(record.store_used, 1234);
    assert_eq!(record.num_workers, 7);
    assert_eq!(record.resources_available, cpus(1.0));

    let two = PickNodeOptions {
        resources: cpus(2.0),
        ..Default::default()
    };
    assert_eq!(
        client.pick_node(&two).await.unwrap().node_id,
        small.info.node_id
    );
    // Only the big node can ever run 6 CPUs, busy or not.
    let six = PickNodeOptions {
        resources: cpus(6.0),
        ..Default::default()
    };
    assert_eq!(
        client.pick_node(&six).await.unwrap().node_id,
        big.info.node_id
    );
    let sixteen = PickNodeOptions {
        resources: cpus(16.0),
        ..Default::default()
    };
    assert!(matches!(
        client.pick_node(&sixteen).await,
        Err(Error::Infeasible(_))
    ));
    let gpu = PickNodeOptions {
        resources: ResourceMap::from([("GPU".to_owned(), 1.0)]),
        ..Default::default()
    };
    assert!(matches!(
        client.pick_node(&gpu).await,
        Err(Error::Infeasible(_))
    ));

    // SPREAD alternates between the two nodes.
    let spread = PickNodeOptions {
        resources: ResourceMap::new(),
        strategy: SchedulingStrategy::Spread,
        ..Default::default()
    };
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(client.pick_node(&spread).await.unwrap().node_id);
    }
    assert_ne!(picks[0], picks[1]);
    assert_eq!(picks[0], picks[2]);
    assert_eq!(picks[1], picks[3]);

    // Excluded nodes are not picked.
    let not_small = PickNodeOptions {
        resources: cpus(1.0),
        exclude: vec![small.info.node_id],
        ..Default::default()
    };
    assert_eq!(
        client.pick_node(&not_small).await.unwrap().node_id,
        big.info.node_id
    );

    // A node that leaves is no longer picked and must register again.
    client.unregister_node(big.info.node_id).await.unwrap();
    assert!(matches!(
        client.pick_node(&six).await,
        Err(Error::Infeasible(_))
    ));
    assert!(!client.heartbeat(&busy).await.unwrap());
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.cluster_id, head.cluster_id);
    assert_eq!(status.nodes.iter().filter(|n| n.alive).count(), 1);

    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn actor_names_lookup_and_kill() {
    let (head, client) = start_head(Duration::from_secs(10)).await;
    let node = register(&client, 4.0).await;
    let job = JobId::random();

    let counter = actor(job, Some("counter"), false);
    client.register_actor(&counter).await.unwrap();
    // Registering the same actor again is a retried call, not a conflict.
    client.register_actor(&counter).await.unwrap();
    let rival = actor(job, Some("counter"), false);
    assert_eq!(
        client.register_actor(&rival).await,
        Err(Error::NameTaken("counter".into()))
    );

    let found = client.get_actor("counter").await.unwrap();
    assert_eq!(found.spec, counter);
    assert_eq!(found.state, ActorState::Pending);
    assert_eq!(
        client.get_actor("nope").await,
        Err(Error::ActorNotFound("nope".into()))
    );
    let unknown = ActorId::random();
    assert!(matches!(
        client.get_actor(unknown).await,
        Err(Error::ActorNotFound(_))
    ));

    client
        .update_actor(&alive_on(&counter, node.info.node_id, 4242))
        .await
        .unwrap();
    let found = client.get_actor(counter.actor_id).await.unwrap();
    assert_eq!(found.state, ActorState::Alive);
    assert_eq!(found.node_id, Some(node.info.node_id));
    assert_eq!(found.worker_pid, 4242);

    client.kill_actor("counter", true).await.unwrap();
    assert_eq!(
        node.calls.lock().unwrap().killed,
        vec![(counter.actor_id.to_string(), 4242, true)]
    );
    let dead = client.get_actor(counter.actor_id).await.unwrap();
    assert_eq!(dead.state, ActorState::Dead);
    assert_eq!(dead.death_cause, "killed");
    // Dead is final, and frees the name.
    assert!(matches!(
        client
            .update_actor(&alive_on(&counter, node.info.node_id, 1))
            .await,
        Err(Error::ActorDied { .. })
    ));
    assert!(matches!(
        client.get_actor("counter").await,
        Err(Error::ActorNotFound(_))
    ));
    client.register_actor(&rival).await.unwrap();
    assert!(matches!(
        client
            .kill_actor(ActorLookup::Name("ghost".into()), true)
            .await,
        Err(Error::ActorNotFound(_))
    ));

    // Killing with restarts allowed leaves it RESTARTING for its owner.
    let mut phoenix = actor(job, None, false);
    phoenix.max_restarts = -1;
    client.register_actor(&phoenix).await.unwrap();
    client
        .update_actor(&alive_on(&phoenix, node.info.node_id, 77))
        .await
        .unwrap();
    client.kill_actor(phoenix.actor_id, false).await.unwrap();
    let restarting = client.get_actor(phoenix.actor_id).await.unwrap();
    assert_eq!(restarting.state, ActorState::Restarting);
    assert_eq!(
        node.calls.lock().unwrap().killed.last().unwrap(),
        &(phoenix.actor_id.to_string(), 77, false)
    );

    assert_eq!(client.list_actors().await.unwrap().len(), 3);
    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn finishing_a_job_kills_its_actors_and_tells_every_node() {
    let (head, client) = start_head(Duration::from_secs(10)).await;
    let a = register(&client, 4.0).await;
    let b = register(&client, 4.0).await;
    let job = JobId::random();
    client
        .register_job(&JobInfo {
            job_id: job,
            driver_pid: 1,
            driver_address: "127.0.0.1:3".into(),
            exe_path: "/bin/driver".into(),
            build_hash: "abc".into(),
        })
        .await
        .unwrap();

    let worker = actor(job, Some("worker"), false);
    let service = actor(job, Some("service"), true);
    let other_job = actor(JobId::random(), None, false);
    for spec in [&worker, &service, &other_job] {
        client.register_actor(spec).await.unwrap();
        client
            .update_actor(&alive_on(spec, a.info.node_id, 10))
            .await
            .unwrap();
    }
    let mut group = pg(1, 1.0, PlacementStrategy::Pack);
    group.job_id = Some(job);
    let placed = client.create_placement_group(&group).await.unwrap();

    client.finish_job(job).await.unwrap();

    let worker = client.get_actor(worker.actor_id).await.unwrap();
    assert_eq!(worker.state, ActorState::Dead);
    assert_eq!(worker.death_cause, "owner job finished");
    let service = client.get_actor("service").await.unwrap();
    assert_eq!(service.state, ActorState::Alive, "detached actors survive");
    let other = client.get_actor(other_job.actor_id).await.unwrap();
    assert_eq!(other.state, ActorState::Alive, "other jobs' actors survive");

    for node in [&a, &b] {
        assert_eq!(
            node.calls.lock().unwrap().jobs_finished,
            vec![job.to_string()]
        );
    }
    // The job's placement group went with it.
    let holder = if placed[0] == a.info.node_id { &a } else { &b };
    assert_eq!(
        holder.calls.lock().unwrap().released,
        vec![group.pg_id.to_string()]
    );
    assert!(client.get_placement_group(group.pg_id).await.is_err());

    let jobs = client.list_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].finished);
    assert!(jobs[0].end_time_ms.is_some());
    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn placement_groups_pack_spread_and_fail() {
    let (head, client) = start_head(Duration::from_secs(10)).await;
    let a = register(&client, 4.0).await;

    // One node: STRICT_SPREAD of two bundles is impossible.
    let strict = pg(2, 1.0, PlacementStrategy::StrictSpread);
    assert!(matches!(
        client.create_placement_group(&strict).await,
        Err(Error::Infeasible(_))
    ));
    assert!(a.calls.lock().unwrap().reserved.is_empty());

    let b = register(&client, 4.0).await;
    let node_of = |id: NodeId| if id == a.info.node_id { &a } else { &b };

    // PACK: both bundles on one node, reserved in one call.
    let packed = pg(2, 1.0, PlacementStrategy::Pack);
    let placement = client.create_placement_group(&packed).await.unwrap();
    assert_eq!(placement.len(), 2);
    assert_eq!(placement[0], placement[1]);
    assert_eq!(
        node_of(placement[0]).calls.lock().unwrap().reserved,
        vec![(packed.pg_id.to_string(), vec![0, 1])]
    );
    let record = client.get_placement_group(packed.pg_id).await.unwrap();
    assert_eq!(record.bundle_nodes, placement);
    assert_eq!(record.spec, packed);

    // SPREAD: one bundle per node.
    let spread = pg(2, 1.0, PlacementStrategy::Spread);
    let placement = client.create_placement_group(&spread).await.unwrap();
    assert_ne!(placement[0], placement[1]);
    for (index, node) in placement.iter().enumerate() {
        let calls = node_of(*node).calls.lock().unwrap();
        assert!(calls
            .reserved
            .contains(&(spread.pg_id.to_string(), vec![index as u32])));
    }
    // Creating it again answers the same placement.
    assert_eq!(
        client.create_placement_group(&spread).await.unwrap(),
        placement
    );

    // STRICT_SPREAD now fits; a third bundle would not.
    client
        .create_placement_group(&pg(2, 1.0, PlacementStrategy::StrictSpread))
        .await
        .unwrap();
    assert!(matches!(
        client
            .create_placement_group(&pg(3, 0.5, PlacementStrategy::StrictSpread))
            .await,
        Err(Error::Infeasible(_))
    ));
    // STRICT_PACK beyond one node's CPUs is impossible.
    assert!(matches!(
        client
            .create_placement_group(&pg(2, 3.0, PlacementStrategy::StrictPack))
            .await,
        Err(Error::Infeasible(_))
    ));
    // Bundles held by the groups above: 4 of the 8 CPUs; 5 more do not fit.
    assert!(matches!(
        client
            .create_placement_group(&pg(5, 1.0, PlacementStrategy::Pack))
            .await,
        Err(Error::Infeasible(_))
    ));

    // Removing releases the bundles on their nodes.
    client.remove_placement_group(packed.pg_id).await.unwrap();
    let holder = node_of(record.bundle_nodes[0]);
    assert_eq!(
        holder.calls.lock().unwrap().released,
        vec![packed.pg_id.to_string()]
    );
    assert!(client.get_placement_group(packed.pg_id).await.is_err());
    assert_eq!(
        client
            .cluster_status()
            .await
            .unwrap()
            .placement_groups
            .len(),
        2
    );

    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_reservation_is_rolled_back() {
    let (head, client) = start_head(Duration::from_secs(10)).await;
    let good = register(&client, 4.0).await;
    let bad = start_node(
        4.0,
        FakeNode {
            refuse_bundles: true,
            ..Default::default()
        },
    )
    .await;
    client.register_node(&bad.info).await.unwrap();

    let spread = pg(2, 1.0, PlacementStrategy::StrictSpread);
    assert!(matches!(
        client.create_placement_group(&spread).await,
        Err(Error::Unreachable { .. })
    ));
    let id = spread.pg_id.to_string();
    {
        let calls = good.calls.lock().unwrap();
        assert_eq!(calls.reserved.len(), 1);
        assert_eq!(calls.reserved[0].0, id);
        assert_eq!(calls.reserved[0].1.len(), 1, "one bundle per node");
    }
    assert_eq!(good.calls.lock().unwrap().released, vec![id.clone()]);
    assert!(client.get_placement_group(spread.pg_id).await.is_err());
    // Nothing stays reserved in the head's books: with the refusing node
    // gone, all of the good node's CPUs can be reserved.
    client.unregister_node(bad.info.node_id).await.unwrap();
    let whole = pg(1, 4.0, PlacementStrategy::Pack);
    assert_eq!(
        client.create_placement_group(&whole).await.unwrap(),
        vec![good.info.node_id]
    );
    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn silent_nodes_are_declared_dead_with_their_actors() {
    let (head, client) = start_head(Duration::from_millis(300)).await;
    let node = register(&client, 4.0).await;
    let job = JobId::random();
    let spec = actor(job, Some("doomed"), false);
    client.register_actor(&spec).await.unwrap();
    client
        .update_actor(&alive_on(&spec, node.info.node_id, 5))
        .await
        .unwrap();

    // Wait (polling, as there is no event to await) for the node to time out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = client.list_nodes().await.unwrap();
        if !nodes[0].alive {
            assert!(nodes[0].since_heartbeat >= Duration::from_millis(300));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node never timed out"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let dead = client.get_actor(spec.actor_id).await.unwrap();
    assert_eq!(dead.state, ActorState::Dead);
    assert_eq!(dead.death_cause, "node died");
    let beat = NodeHeartbeat {
        node_id: node.info.node_id,
        resources_available: cpus(4.0),
        store_used: 0,
        store_capacity: 0,
        num_workers: 0,
    };
    assert!(!client.heartbeat(&beat).await.unwrap(), "must re-register");
    assert!(matches!(
        client
            .pick_node(&PickNodeOptions {
                resources: cpus(1.0),
                ..Default::default()
            })
            .await,
        Err(Error::Infeasible(_))
    ));
    // Registering again brings it back.
    client.register_node(&node.info).await.unwrap();
    assert!(client.heartbeat(&beat).await.unwrap());
    head.shutdown().await.unwrap();
}

#[tokio::test]
async fn garbage_on_the_port_does_not_hurt_the_head() {
    let (head, client) = start_head(Duration::from_secs(10)).await;

    // Random bytes, then an HTTP/2 preface followed by junk frames.
    let mut seed: u32 = 0x9e37_79b9;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
        .collect();
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&junk[..4096]);
    for payload in [junk.clone(), preface] {
        let mut stream = tokio::net::TcpStream::connect(head.local_addr)
            .await
            .unwrap();
        // The head may close the connection before reading everything.
        let _ = stream.write_all(&payload).await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink));
        assert!(read.await.is_ok(), "the head should drop the connection");
    }

    // A well-formed gRPC call whose body is not the expected message.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", head.local_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = braid::rpc::ClientAuth::new(TOKEN).unwrap();
    let mut grpc = tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
        channel, auth,
    ));
    grpc.ready().await.unwrap();
    let wrong_body = ObjectChunk {
        total_size: 5,
        offset: 1 << 40,
        data: vec![0xff; 100].into(),
        crc32: 7,
    };
    let codec = tonic_prost::ProstCodec::<ObjectChunk, proto::RegisterNodeReply>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/braid.v1.Head/RegisterNode");
    let status = grpc
        .unary(Request::new(wrong_body), path, codec)
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);

    // A well-formed message with a malformed id.
    let mut raw = proto::head_client::HeadClient::with_interceptor(
        tonic::transport::Endpoint::from_shared(format!("http://{}", head.local_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        braid::rpc::ClientAuth::new(TOKEN).unwrap(),
    );
    let status = raw
        .register_node(proto::RegisterNodeRequest {
            node: Some(proto::NodeInfo {
                node_id: "not hex".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The head still answers.
    assert!(client.list_nodes().await.unwrap().is_empty());
    let fresh = HeadClient::connect(&head.local_addr.to_string(), TOKEN)
        .await
        .unwrap();
    assert!(fresh.cluster_status().await.is_ok());
    head.shutdown().await.unwrap();
}

struct Store {
    client: StoreClient,
    handle: StoreHandle,
}

async fn start_store(dir: &std::path::Path, name: &str) -> Store {
    let socket = dir.join(name);
    let server = StoreServer::bind(StoreConfig::with_capacity(&socket, 64 << 20))
        .await
        .unwrap();
    let handle = server.handle();
    tokio::spawn(server.run());
    let client = tokio::task::spawn_blocking(move || StoreClient::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    Store { client, handle }
}

fn put_pattern(store: &StoreClient, len: usize, salt: u8) -> (ObjectId, Vec<u8>) {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 12) as u8)
        .collect();
    let id = ObjectId::random();
    let mut buf = store.create(id, len as u64).unwrap();
    buf.as_mut_slice().copy_from_slice(&bytes);
    drop(buf.seal().unwrap());
    (id, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_move_between_stores_intact() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_store(dir.path(), "a.sock").await;
    let b = start_store(dir.path(), "b.sock").await;
    let (id, bytes) = put_pattern(&a.client, 5 << 20, 3);

    let source = start_node(
        1.0,
        FakeNode {
            store: Some(Arc::new(a.client.clone())),
            chunk_size: braid::rpc::DEFAULT_CHUNK_SIZE,
            ..Default::default()
        },
    )
    .await;
    let node = NodeClient::connect(&source.info.grpc_address, TOKEN)
        .await
        .unwrap();

    pull_into(&node, id, &b.client).await.unwrap();
    let view = b.client.get(id, Duration::from_secs(1)).unwrap();
    assert_eq!(view.len(), bytes.len());
    assert!(view.as_bytes() == bytes.as_slice());
    drop(view);
    // Pulling what the store has already is a no-op.
    pull_into(&node, id, &b.client).await.unwrap();

    // An odd chunk size, and an object smaller than one chunk.
    let odd = start_node(
        1.0,
        FakeNode {
            store: Some(Arc::new(a.client.clone())),
            chunk_size: 100_003,
            ..Default::default()
        },
    )
    .await;
    let odd_client = NodeClient::connect(&odd.info.grpc_address, TOKEN)
        .await
        .unwrap();
    let (big, big_bytes) = put_pattern(&a.client, 1_000_000, 9);
    let (small, small_bytes) = put_pattern(&a.client, 10, 1);
    pull_into(&odd_client, big, &b.client).await.unwrap();
    pull_into(&odd_client, small, &b.client).await.unwrap();
    for (id, bytes) in [(big, big_bytes), (small, small_bytes)] {
        let view = b.client.get(id, Duration::from_secs(1)).unwrap();
        assert!(view.as_bytes() == bytes.as_slice());
    }

    // An object the node does not have.
    let missing = ObjectId::random();
    let err = pull_into(&node, missing, &b.client).await.unwrap_err();
    assert!(matches!(err, TransferError::NotFound(m) if m == missing));
    assert!(matches!(Error::from(err), Error::ObjectLost { id, .. } if id == missing));
    assert!(!b.client.contains(missing).unwrap());

    // A node reached with the wrong token.
    let intruder = NodeClient::connect(&source.info.grpc_address, "wrong")
        .await
        .unwrap();
    let (other, _) = put_pattern(&a.client, 1000, 5);
    let err = pull_into(&intruder, other, &b.client).await.unwrap_err();
    assert!(matches!(
        err,
        TransferError::Rpc {
            code: Code::Unauthenticated,
            ..
        }
    ));
    assert!(!b.client.contains(other).unwrap());

    a.handle.shutdown();
    b.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_store(dir.path(), "a.sock").await;
    let b = start_store(dir.path(), "b.sock").await;
    let (id, _) = put_pattern(&a.client, 3 << 20, 7);

    let liar = start_node(
        1.0,
        FakeNode {
            store: Some(Arc::new(a.client.clone())),
            chunk_size: 1 << 20,
            corrupt: true,
            ..Default::default()
        },
    )
    .await;
    let node = NodeClient::connect(&liar.info.grpc_address, TOKEN)
        .await
        .unwrap();
    let err = pull_into(&node, id, &b.client).await.unwrap_err();
    assert!(
        matches!(err, TransferError::Corrupt { offset, .. } if offset == 1 << 20),
        "{err:?}"
    );
    assert!(matches!(Error::from(err), Error::Unreachable { .. }));
    assert!(!b.client.contains(id).unwrap());

    // The aborted object left no trace: an honest pull succeeds afterwards.
    let honest = start_node(
        1.0,
        FakeNode {
            store: Some(Arc::new(a.client.clone())),
            chunk_size: 1 << 20,
            ..Default::default()
        },
    )
    .await;
    let node = NodeClient::connect(&honest.info.grpc_address, TOKEN)
        .await
        .unwrap();
    pull_into(&node, id, &b.client).await.unwrap();
    assert!(b.client.contains(id).unwrap());

    a.handle.shutdown();
    b.handle.shutdown();
}
