//! The head's `/metrics` families, read from its tables at scrape time:
//! nodes alive and dead, resources offered and in use, stores and workers
//! summed over live nodes, actors by state and their restarts, placement
//! groups and jobs.

use super::{amount, HeadState};
use crate::rpc::types::ActorState;
use crate::telemetry::{Family, Kind};
use std::collections::BTreeMap;

impl HeadState {
    /// Every live node with where it serves `/metrics`.
    pub(crate) fn live_node_metrics(&self) -> Vec<(crate::ids::NodeId, String)> {
        self.nodes
            .values()
            .filter(|n| n.alive && !n.info.metrics_address.is_empty())
            .map(|n| (n.info.node_id, n.info.metrics_address.clone()))
            .collect()
    }

    /// Where the live node beside the head serves `/metrics`.
    pub(crate) fn head_node_metrics(&self) -> Option<String> {
        self.nodes
            .values()
            .find(|n| n.alive && n.info.is_head_node)
            .map(|n| n.info.metrics_address.clone())
    }

    /// The cluster's families at this moment.
    pub(crate) fn families(&self) -> Vec<Family> {
        let alive = self.nodes.values().filter(|n| n.alive).count();
        let dead = self.nodes.len() - alive;
        let mut total: BTreeMap<&str, f64> = BTreeMap::new();
        let mut used: BTreeMap<&str, f64> = BTreeMap::new();
        let (mut store_used, mut store_capacity, mut workers) = (0u64, 0u64, 0u64);
        for node in self.nodes.values().filter(|n| n.alive) {
            for (name, have) in &node.info.resources_total {
                *total.entry(name).or_default() += have;
                *used.entry(name).or_default() += (have - amount(&node.available, name)).max(0.0);
            }
            store_used += node.store_used;
            store_capacity += node.store_capacity;
            workers += u64::from(node.num_workers);
        }
        let mut capacity_family = Family::new(
            "braid_cluster_resource_capacity",
            "Resources the live nodes offer",
            Kind::Gauge,
        );
        let mut used_family = Family::new(
            "braid_cluster_resource_used",
            "Resources of the live nodes leased or reserved",
            Kind::Gauge,
        );
        for (name, have) in &total {
            capacity_family.push(&[("resource", name)], *have);
            used_family.push(
                &[("resource", name)],
                used.get(name).copied().unwrap_or(0.0),
            );
        }
        let mut actors = [0u64; 4];
        for actor in self.actors.values() {
            actors[match actor.state {
                ActorState::Pending => 0,
                ActorState::Alive => 1,
                ActorState::Restarting => 2,
                ActorState::Dead => 3,
            }] += 1;
        }
        let created = self.pgs.values().filter(|pg| pg.committed).count();
        let running = self.jobs.values().filter(|j| !j.finished).count();
        vec![
            Family::new("braid_cluster_nodes", "Nodes by state", Kind::Gauge)
                .with(&[("state", "alive")], alive as f64)
                .with(&[("state", "dead")], dead as f64),
            capacity_family,
            used_family,
            Family::single(
                "braid_cluster_store_used_bytes",
                "Object-store bytes in use over the live nodes",
                Kind::Gauge,
                store_used as f64,
            ),
            Family::single(
                "braid_cluster_store_capacity_bytes",
                "Object-store capacity over the live nodes",
                Kind::Gauge,
                store_capacity as f64,
            ),
            Family::single(
                "braid_cluster_workers",
                "Worker processes over the live nodes",
                Kind::Gauge,
                workers as f64,
            ),
            Family::new(
                "braid_cluster_actors",
                "Actors by state (dead ones as long as the head keeps them)",
                Kind::Gauge,
            )
            .with(&[("state", "PENDING")], actors[0] as f64)
            .with(&[("state", "ALIVE")], actors[1] as f64)
            .with(&[("state", "RESTARTING")], actors[2] as f64)
            .with(&[("state", "DEAD")], actors[3] as f64),
            Family::single(
                "braid_cluster_actor_restarts",
                "Actor restarts since the head started",
                Kind::Counter,
                self.actor_restarts as f64,
            ),
            Family::new(
                "braid_cluster_placement_groups",
                "Placement groups by state",
                Kind::Gauge,
            )
            .with(&[("state", "CREATED")], created as f64)
            .with(&[("state", "PENDING")], (self.pgs.len() - created) as f64),
            Family::new("braid_cluster_jobs", "Jobs by state", Kind::Gauge)
                .with(&[("state", "RUNNING")], running as f64)
                .with(&[("state", "FINISHED")], (self.jobs.len() - running) as f64),
        ]
    }
}
