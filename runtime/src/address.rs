//! Where a braid process can be reached: its worker id, its node, and the
//! endpoint it serves direct calls on (a Unix socket, and a TCP address
//! for other hosts).

use crate::ids::{NodeId, WorkerId};
use crate::wire::Endpoint;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// The address of a driver or worker process.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    /// The process's worker id (drivers have one too).
    pub worker: WorkerId,
    /// The node it runs on.
    pub node: NodeId,
    /// Where it serves direct calls.
    pub endpoint: Endpoint,
    /// Its process id.
    pub pid: u32,
}

impl Address {
    /// The form the head keeps an address in (actor records, jobs'
    /// drivers).
    pub(crate) fn to_head_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`Address::to_head_string`]'s form.
    pub(crate) fn from_head_string(text: &str) -> Option<Address> {
        serde_json::from_str(text).ok()
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{:?}", self.worker, self.endpoint)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.endpoint)
    }
}

/// Shares one allocation among equal addresses, so a value holding ten
/// thousand references owned by one process holds one address.
pub(crate) fn intern(address: Address) -> Arc<Address> {
    static TABLE: OnceLock<Mutex<HashMap<WorkerId, Arc<Address>>>> = OnceLock::new();
    let mut table = TABLE.get_or_init(Default::default).lock();
    match table.get(&address.worker) {
        Some(a) if **a == address => a.clone(),
        _ => {
            let a = Arc::new(address);
            table.insert(a.worker, a.clone());
            a
        }
    }
}
