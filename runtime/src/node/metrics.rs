//! A node's `/metrics`: its resources, workers and waiting leases, its
//! object store, the objects it moved to and from other nodes, and the
//! tasks and actor calls of the processes connected to it (each sends a
//! [`Snapshot`] of its recorder; a process that exits leaves its last one
//! in `retired`, so counters never go back).

use super::{Node, WorkerState};
use crate::telemetry::recorder::Snapshot;
use crate::telemetry::{Family, Kind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Objects moved between this node's store and other nodes'.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    pub(crate) in_count: AtomicU64,
    pub(crate) in_bytes: AtomicU64,
    pub(crate) out_count: AtomicU64,
    pub(crate) out_bytes: AtomicU64,
}

impl Transfers {
    /// Counts an object pulled in.
    pub(crate) fn received(&self, bytes: u64) {
        self.in_count.fetch_add(1, Ordering::Relaxed);
        self.in_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts an object sent to another node.
    pub(crate) fn sent(&self, bytes: u64) {
        self.out_count.fetch_add(1, Ordering::Relaxed);
        self.out_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The recorders' snapshots of this node's processes.
#[derive(Debug, Default)]
pub(crate) struct ProcessFigures {
    live: HashMap<u64, Snapshot>,
    retired: Snapshot,
}

impl ProcessFigures {
    /// The process on connection `conn` sent its figures.
    pub(crate) fn report(&mut self, conn: u64, snapshot: Snapshot) {
        self.live.insert(conn, snapshot);
    }

    /// The process on connection `conn` is gone: its figures stay counted.
    pub(crate) fn closed(&mut self, conn: u64) {
        if let Some(last) = self.live.remove(&conn) {
            self.retired.add(&last);
        }
    }

    /// Counts summed over every process that reported, and what the live
    /// ones publish.
    fn total(&self) -> (Snapshot, Vec<Family>) {
        let mut total = self.retired.clone();
        let mut published = Vec::new();
        for snapshot in self.live.values() {
            total.add(snapshot);
            published.extend(snapshot.published.iter().cloned());
        }
        (total, crate::telemetry::published::merge(published))
    }
}

impl Node {
    /// The node's families at this moment.
    pub(crate) fn families(&self) -> Vec<Family> {
        let mut out = Vec::new();
        {
            let state = self.state.lock();
            let total = &state.ledger.total;
            let free = &state.ledger.available;
            let mut capacity = Family::new(
                "braid_node_resource_capacity",
                "Resources this node offers",
                Kind::Gauge,
            );
            let mut used = Family::new(
                "braid_node_resource_used",
                "Resources of this node leased or reserved",
                Kind::Gauge,
            );
            for (name, amount) in total.0.iter() {
                capacity.push(&[("resource", name)], *amount);
                used.push(&[("resource", name)], (amount - free.get(name)).max(0.0));
            }
            out.push(capacity);
            out.push(used);
            let (mut starting, mut idle, mut leased, mut actors) = (0, 0, 0, 0);
            for worker in state.workers.values() {
                match worker.state {
                    WorkerState::Starting => starting += 1,
                    WorkerState::Idle => idle += 1,
                    WorkerState::Leased(_) if worker.actor.is_some() => actors += 1,
                    WorkerState::Leased(_) => leased += 1,
                }
            }
            out.push(
                Family::new(
                    "braid_node_workers",
                    "Worker processes by state",
                    Kind::Gauge,
                )
                .with(&[("state", "starting")], starting as f64)
                .with(&[("state", "idle")], idle as f64)
                .with(&[("state", "leased")], leased as f64)
                .with(&[("state", "actor")], actors as f64),
            );
            out.push(Family::single(
                "braid_node_leases_waiting",
                "Lease requests waiting for resources",
                Kind::Gauge,
                state.queue.len() as f64,
            ));
        }
        let store = self.store_handle.stats();
        let gauge =
            |name: &str, help: &str, v: u64| Family::single(name, help, Kind::Gauge, v as f64);
        let counter =
            |name: &str, help: &str, v: u64| Family::single(name, help, Kind::Counter, v as f64);
        out.extend([
            gauge(
                "braid_store_used_bytes",
                "Object-store bytes allocated",
                store.arena.used,
            ),
            gauge(
                "braid_store_capacity_bytes",
                "Object-store capacity",
                store.arena.capacity,
            ),
            Family::new("braid_store_objects", "Objects by state", Kind::Gauge)
                .with(&[("state", "sealed")], store.sealed_objects as f64)
                .with(&[("state", "unsealed")], store.unsealed_objects as f64)
                .with(&[("state", "spilled")], store.spilled_objects as f64),
            gauge("braid_store_pins", "Pins held by clients", store.pins),
            gauge(
                "braid_store_spilled_bytes",
                "Bytes of objects spilled to disk",
                store.spilled_bytes,
            ),
            gauge(
                "braid_store_clients",
                "Processes connected to the store",
                store.clients,
            ),
            counter("braid_store_evictions", "Objects evicted", store.evictions),
            counter(
                "braid_store_spills",
                "Objects spilled to disk",
                store.spills,
            ),
            counter(
                "braid_store_restores",
                "Objects restored from disk",
                store.restores,
            ),
            counter(
                "braid_store_spill_written_bytes",
                "Bytes spilled to disk",
                store.spilled_bytes_total,
            ),
            counter(
                "braid_store_restore_read_bytes",
                "Bytes restored from disk",
                store.restored_bytes_total,
            ),
        ]);
        let t = &self.transfers;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.push(
            Family::new(
                "braid_store_transfers",
                "Objects moved between nodes",
                Kind::Counter,
            )
            .with(&[("direction", "in")], load(&t.in_count))
            .with(&[("direction", "out")], load(&t.out_count)),
        );
        out.push(
            Family::new(
                "braid_store_transfer_bytes",
                "Bytes of objects moved between nodes",
                Kind::Counter,
            )
            .with(&[("direction", "in")], load(&t.in_bytes))
            .with(&[("direction", "out")], load(&t.out_bytes)),
        );
        let (counts, published) = self.figures.lock().total();
        out.extend(counts.families());
        out.extend(published);
        out
    }
}
