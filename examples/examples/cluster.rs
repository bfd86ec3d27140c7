//! A driver joining a cluster started with the `braid` CLI: lists the
//! nodes, runs 100 tasks, round-trips an object through the object store
//! and, on request, leaves a detached named actor behind for a later run to
//! find.
//!
//! Start a cluster (a head and a node with 2 CPUs), run this program (it
//! joins the cluster started on this machine, or the one `BRAID_ADDRESS`
//! names), look at the cluster, stop it:
//!
//! ```sh
//! cargo run --release -p braid --bin braid -- start --head --num-cpus 2
//! cargo run --release --example cluster
//! cargo run --release -p braid --bin braid -- status
//! cargo run --release -p braid --bin braid -- stop
//! ```
//!
//! The token is read from the token file `braid start --head` wrote on this
//! machine (or from `BRAID_TOKEN`). Flags:
//!
//! - `--detached`: create a detached actor named `cluster-example-counter`,
//!   which outlives this program (until `--kill` or `braid stop`);
//! - `--lookup`: find that actor by name and call it;
//! - `--kill`: kill it by name.
//!
//! For example `cargo run --release --example cluster -- --detached`, then the same with `-- --lookup` (`braid status` lists the
//! actor in between).

use std::collections::{BTreeMap, BTreeSet};

/// The name of the detached actor `--detached` creates.
const ACTOR_NAME: &str = "cluster-example-counter";

/// A counter, created detached so it outlives the driver.
#[braid::actor]
pub struct Counter {
    n: u64,
}

#[braid::actor]
impl Counter {
    fn new(start: u64) -> Self {
        Counter { n: start }
    }

    fn incr(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }
}

/// Squares `x` and says where it ran: the node and the worker process.
#[braid::remote]
fn square(x: u64) -> (u64, Option<braid::NodeId>, u32) {
    let node = braid::current().ok().map(|rt| rt.node_id());
    (x * x, node, std::process::id())
}

/// A driver joining a cluster started with `braid start --head` (set
/// BRAID_ADDRESS to its address): lists the nodes, runs 100 tasks and
/// round-trips an object.
#[derive(clap::Parser)]
#[command(name = "cluster")]
struct Args {
    /// Create a detached actor named `cluster-example-counter`, which
    /// outlives this program (until `--kill` or `braid stop`).
    #[arg(long)]
    detached: bool,
    /// Find that actor by name and call it.
    #[arg(long)]
    lookup: bool,
    /// Kill it by name.
    #[arg(long)]
    kill: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        detached,
        lookup,
        kill,
    } = clap::Parser::parse();
    let named = std::env::var("BRAID_ADDRESS").is_ok_and(|a| !a.is_empty());
    // Not an embedded cluster: this example joins a running one.
    let options = if named {
        braid::InitOptions::new()
    } else {
        braid::InitOptions::new().address(braid::init::AUTO)
    };
    let rt = match options.init().await {
        Ok(rt) => rt,
        Err(e) if !named => {
            eprintln!(
                "{e}: this example joins a running cluster.\n\
                 \n\
                 1. Start one:\n\
                 \x20  cargo run --release -p braid --bin braid -- start --head --num-cpus 2\n\
                 2. Run this example (BRAID_ADDRESS=HOST:PORT names another cluster):\n\
                 \x20  cargo run --release --example cluster\n\
                 3. Look at the cluster, then stop it:\n\
                 \x20  cargo run --release -p braid --bin braid -- status\n\
                 \x20  cargo run --release -p braid --bin braid -- stop"
            );
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "joined the cluster at {} as job {}",
        rt.address(),
        rt.job_id()
    );

    let nodes = rt.nodes().await?;
    println!("{} node(s):", nodes.len());
    for n in &nodes {
        let cpus = n
            .info
            .resources_total
            .get(braid::resources::CPU)
            .copied()
            .unwrap_or(0.0);
        println!(
            "  {}  {}  {cpus} CPU  {}{}",
            n.info.node_id,
            n.info.hostname,
            if n.info.is_head_node {
                "head node"
            } else {
                "worker node"
            },
            if n.alive { "" } else { "  (dead)" },
        );
    }

    let refs: Vec<_> = (0..100u64)
        .map(|i| square::remote(&rt, i))
        .collect::<Result<_, _>>()?;
    let results = rt.get_all(&refs).await?;
    let sum: u64 = results.iter().map(|(sq, _, _)| sq).sum();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut pids = BTreeSet::new();
    for (_, node, pid) in &results {
        let node = node.map_or_else(|| "?".to_string(), |n| n.to_string());
        *per_node.entry(node).or_default() += 1;
        pids.insert(*pid);
    }
    println!(
        "100 tasks: sum of squares of 0..100 = {sum}, run by {} worker process(es)",
        pids.len()
    );
    for (node, count) in &per_node {
        println!("  {count} on node {node}");
    }

    let value: Vec<String> = (0..1000).map(|i| format!("row-{i}")).collect();
    let r = rt.put(&value)?;
    let back = rt.get(&r).await?;
    println!(
        "put/get: {} strings stored and read back {}",
        value.len(),
        if back == value { "intact" } else { "CHANGED" }
    );
    anyhow::ensure!(back == value, "the object came back changed");

    if detached {
        match Counter::remote(&rt, 0)
            .name(ACTOR_NAME)
            .detached()
            .spawn()
            .await
        {
            Ok(c) => println!(
                "created detached actor {ACTOR_NAME:?}: incr(1) = {}; find it with --lookup",
                c.incr(1).await?
            ),
            Err(braid::Error::BadRequest(e)) => {
                println!(
                    "could not create {ACTOR_NAME:?} ({e}); it may exist already: try --lookup"
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
    if lookup {
        match rt.get_actor::<CounterHandle>(ACTOR_NAME).await {
            Ok(c) => println!("found actor {ACTOR_NAME:?}: incr(1) = {}", c.incr(1).await?),
            Err(braid::Error::ActorNotFound(_)) => {
                println!("no actor named {ACTOR_NAME:?}: create it with --detached")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if kill {
        match rt.kill_actor_by_name(ACTOR_NAME).await {
            Ok(()) => println!("killed actor {ACTOR_NAME:?}"),
            Err(braid::Error::ActorNotFound(_)) => println!("no actor named {ACTOR_NAME:?}"),
            Err(e) => return Err(e.into()),
        }
    }

    rt.shutdown().await;
    Ok(())
}
