//! Identifiers of the things a cluster names: nodes, jobs, workers, actors,
//! tasks and placement groups. Objects use [`ObjectId`](crate::store::ObjectId).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub u128);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                $name(uuid::Uuid::new_v4().as_u128())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:032x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:08x})"), (self.0 >> 96) as u32)
            }
        }

        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                u128::from_str_radix(s, 16).map($name)
            }
        }
    };
}

id_type!(
    /// A node: one daemon with its own object store, scheduler and worker pool.
    NodeId,
    "Node"
);
id_type!(
    /// A job: one driver program and everything it started.
    JobId,
    "Job"
);
id_type!(
    /// A worker process.
    WorkerId,
    "Worker"
);
id_type!(
    /// An actor, stable across its restarts.
    ActorId,
    "Actor"
);
id_type!(
    /// One task or actor call.
    TaskId,
    "Task"
);
id_type!(
    /// A placement group: resource bundles reserved together.
    PlacementGroupId,
    "Pg"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        let id = ActorId::random();
        let back: ActorId = id.to_string().parse().unwrap();
        assert_eq!(id, back);
    }
}
