//! The node's resource ledger and lease queue: what is free on the node and
//! in each placement-group bundle, and which lease requests wait for it, in
//! arrival order.

use crate::error::{Error, Result};
use crate::ids::PlacementGroupId;
use crate::resources::Resources;
use crate::wire::messages::LeaseRequest;
use std::collections::HashMap;

/// Resources reserved for one placement-group bundle.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    pub total: Resources,
    pub available: Resources,
}

/// The node's resources.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub total: Resources,
    pub available: Resources,
    pub bundles: HashMap<(PlacementGroupId, u32), Bundle>,
}

/// Where a lease's resources come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    Node,
    Bundle(PlacementGroupId, u32),
}

impl Ledger {
    pub(crate) fn new(total: Resources) -> Ledger {
        Ledger {
            available: total.clone(),
            total,
            bundles: HashMap::new(),
        }
    }

    fn pool_of(request: &LeaseRequest) -> Pool {
        match request.bundle {
            Some((pg, i)) => Pool::Bundle(pg, i),
            None => Pool::Node,
        }
    }

    /// Whether the request could ever be granted here.
    pub(crate) fn feasible(&self, request: &LeaseRequest) -> Result<bool> {
        match Self::pool_of(request) {
            Pool::Node => Ok(self.total.fits(&request.resources)),
            Pool::Bundle(pg, i) => match self.bundles.get(&(pg, i)) {
                Some(b) => {
                    if b.total.fits(&request.resources) {
                        Ok(true)
                    } else {
                        Err(Error::Infeasible(format!(
                            "{} in bundle {i} of placement group {pg}, which holds {}",
                            request.resources, b.total
                        )))
                    }
                }
                None => Err(Error::BadRequest(format!(
                    "bundle {i} of placement group {pg} is not on this node"
                ))),
            },
        }
    }

    /// Takes the request's resources if they are free now.
    pub(crate) fn try_acquire(&mut self, request: &LeaseRequest) -> Option<Pool> {
        let pool = Self::pool_of(request);
        let avail = match pool {
            Pool::Node => &mut self.available,
            Pool::Bundle(pg, i) => &mut self.bundles.get_mut(&(pg, i))?.available,
        };
        if avail.fits(&request.resources) {
            avail.subtract(&request.resources);
            Some(pool)
        } else {
            None
        }
    }

    /// Gives a lease's resources back.
    pub(crate) fn release(&mut self, pool: Pool, resources: &Resources) {
        match pool {
            Pool::Node => self.available.add(resources, &self.total),
            Pool::Bundle(pg, i) => {
                if let Some(b) = self.bundles.get_mut(&(pg, i)) {
                    b.available.add(resources, &b.total);
                }
            }
        }
    }

    /// Reserves bundles out of the node's resources.
    pub(crate) fn reserve(
        &mut self,
        pg: PlacementGroupId,
        bundles: Vec<(u32, Resources)>,
    ) -> Result<()> {
        let mut need = Resources::new();
        for (_, r) in &bundles {
            for (k, v) in &r.0 {
                need.set(k, need.get(k) + v);
            }
        }
        if !self.available.fits(&need) {
            return Err(Error::Infeasible(format!(
                "bundles {need} on a node with {} free",
                self.available
            )));
        }
        self.available.subtract(&need);
        for (i, r) in bundles {
            self.bundles.insert(
                (pg, i),
                Bundle {
                    total: r.clone(),
                    available: r,
                },
            );
        }
        Ok(())
    }

    /// Releases every bundle of a placement group. Resources still leased
    /// from a bundle return to the node when those leases end.
    pub(crate) fn release_group(&mut self, pg: PlacementGroupId) {
        let keys: Vec<_> = self
            .bundles
            .keys()
            .filter(|(g, _)| *g == pg)
            .copied()
            .collect();
        for key in keys {
            if let Some(b) = self.bundles.remove(&key) {
                self.available.add(&b.available, &self.total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    fn req(cpus: f64, bundle: Option<(PlacementGroupId, u32)>) -> LeaseRequest {
        LeaseRequest {
            job: JobId(1),
            resources: Resources::cpus(cpus),
            bundle,
            actor: None,
            detached: false,
            strict_node: false,
        }
    }

    #[test]
    fn bundles_carve_out_node_resources() {
        let mut l = Ledger::new(Resources::cpus(4.0));
        let pg = PlacementGroupId(7);
        l.reserve(pg, vec![(0, Resources::cpus(2.0))]).unwrap();
        assert!(l.try_acquire(&req(3.0, None)).is_none());
        let p = l.try_acquire(&req(2.0, Some((pg, 0)))).unwrap();
        assert!(l.try_acquire(&req(1.0, Some((pg, 0)))).is_none());
        l.release(p, &Resources::cpus(2.0));
        l.release_group(pg);
        assert_eq!(l.available, Resources::cpus(4.0));
        assert!(l.feasible(&req(5.0, None)).is_ok_and(|f| !f));
    }
}
