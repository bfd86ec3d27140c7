//! Objects the subtasks of a job share inside one process, found by name:
//! a parameter-server shard that the training subtasks next to it read in
//! place, or a serving model the driver queries. Entries are typed; a
//! lookup waits (up to a deadline) for an entry another subtask has not
//! registered yet, since subtasks start in no particular order.

use parking_lot::{Condvar, Mutex};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use thiserror::Error;

type Entries = HashMap<String, Arc<dyn Any + Send + Sync>>;

struct Registry {
    entries: Mutex<Entries>,
    added: Condvar,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        entries: Mutex::new(HashMap::new()),
        added: Condvar::new(),
    })
}

/// Why a lookup failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LookupError {
    /// Nothing was registered under the name before the deadline.
    #[error("nothing named {0:?} was registered in this process in time")]
    Missing(String),
    /// The entry has another type.
    #[error("{0:?} is registered with another type")]
    WrongType(String),
}

/// Registers `value` under `name`, replacing an earlier entry.
pub fn register<T: Any + Send + Sync>(name: &str, value: Arc<T>) {
    let r = registry();
    r.entries.lock().insert(name.to_string(), value);
    r.added.notify_all();
}

/// Removes the entry under `name` if it is `value` (an entry registered
/// since by someone else stays).
pub fn unregister<T: Any + Send + Sync>(name: &str, value: &Arc<T>) {
    let mut entries = registry().entries.lock();
    let same = entries
        .get(name)
        .and_then(|e| e.clone().downcast::<T>().ok())
        .is_some_and(|e| Arc::ptr_eq(&e, value));
    if same {
        entries.remove(name);
    }
}

/// The entry under `name`, registering `make()` first if there is none.
pub fn get_or_register<T: Any + Send + Sync>(
    name: &str,
    make: impl FnOnce() -> Arc<T>,
) -> Result<Arc<T>, LookupError> {
    let r = registry();
    let mut entries = r.entries.lock();
    let entry = entries
        .entry(name.to_string())
        .or_insert_with(|| make() as Arc<dyn Any + Send + Sync>)
        .clone();
    drop(entries);
    r.added.notify_all();
    entry
        .downcast::<T>()
        .map_err(|_| LookupError::WrongType(name.to_string()))
}

/// The entry under `name`, if there is one of type `T`.
pub fn get<T: Any + Send + Sync>(name: &str) -> Result<Arc<T>, LookupError> {
    let entry = registry()
        .entries
        .lock()
        .get(name)
        .cloned()
        .ok_or_else(|| LookupError::Missing(name.to_string()))?;
    entry
        .downcast::<T>()
        .map_err(|_| LookupError::WrongType(name.to_string()))
}

/// The entry under `name`, waiting up to `timeout` for it to appear.
pub fn wait_for<T: Any + Send + Sync>(
    name: &str,
    timeout: Duration,
) -> Result<Arc<T>, LookupError> {
    let r = registry();
    let deadline = Instant::now() + timeout;
    let mut entries = r.entries.lock();
    loop {
        if let Some(entry) = entries.get(name) {
            return entry
                .clone()
                .downcast::<T>()
                .map_err(|_| LookupError::WrongType(name.to_string()));
        }
        if r.added.wait_until(&mut entries, deadline).timed_out() {
            return Err(LookupError::Missing(name.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lookup_waits_and_unregisters_only_its_own_entry() {
        let a = Arc::new(5u32);
        let waiter =
            std::thread::spawn(|| wait_for::<u32>("registry-test-a", Duration::from_secs(5)));
        register("registry-test-a", a.clone());
        assert_eq!(waiter.join().ok().and_then(|r| r.ok()).map(|v| *v), Some(5));
        assert_eq!(
            get::<String>("registry-test-a").err(),
            Some(LookupError::WrongType("registry-test-a".into()))
        );
        let b = Arc::new(6u32);
        register("registry-test-a", b.clone());
        unregister("registry-test-a", &a);
        assert_eq!(get::<u32>("registry-test-a").map(|v| *v), Ok(6));
        unregister("registry-test-a", &b);
        assert!(get::<u32>("registry-test-a").is_err());
        assert_eq!(
            wait_for::<u32>("registry-test-b", Duration::from_millis(10)).err(),
            Some(LookupError::Missing("registry-test-b".into()))
        );
    }
}
