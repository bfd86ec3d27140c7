//! Families a process publishes for its node's `/metrics`, under a source
//! key (a stream job's operators, an online-learning job's figures), each
//! source replaced whole when it publishes again. They travel to the node
//! in the process's [`Snapshot`](super::recorder::Snapshot) and vanish
//! with the process. Publishing takes a lock: it is for figures gathered
//! once a second, not for hot paths (count those in atomics and publish
//! their totals).

use super::family::Family;
use parking_lot::Mutex;
use std::collections::BTreeMap;

static SOURCES: Mutex<BTreeMap<String, Vec<Family>>> = Mutex::new(BTreeMap::new());

/// Publishes `families` as source `source`'s, replacing what it published
/// before.
pub fn publish(source: &str, families: Vec<Family>) {
    SOURCES.lock().insert(source.to_string(), families);
}

/// Takes source `source`'s families back.
pub fn withdraw(source: &str) {
    SOURCES.lock().remove(source);
}

/// Every source's families, merged by name.
pub fn all() -> Vec<Family> {
    let families: Vec<Family> = SOURCES.lock().values().flatten().cloned().collect();
    merge(families)
}

/// Merges families of one name into one (the first one's help and kind),
/// keeping the order names first appear in.
pub fn merge(families: Vec<Family>) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for family in families {
        match index.get(&family.name) {
            Some(&i) => out[i].samples.extend(family.samples),
            None => {
                index.insert(family.name.clone(), out.len());
                out.push(family);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Kind;

    #[test]
    fn sources_replace_their_own_and_merge_by_name() {
        let rows = |job: &str, n: f64| {
            vec![Family::new("published_test_rows", "rows", Kind::Counter).with(&[("job", job)], n)]
        };
        publish("published-test/a", rows("a", 1.0));
        publish("published-test/b", rows("b", 2.0));
        publish("published-test/a", rows("a", 3.0));
        let mine: Vec<Family> = all()
            .into_iter()
            .filter(|f| f.name == "published_test_rows")
            .collect();
        assert_eq!(mine.len(), 1, "one family per name");
        assert_eq!(mine[0].samples.len(), 2);
        withdraw("published-test/a");
        withdraw("published-test/b");
        assert!(!all().iter().any(|f| f.name == "published_test_rows"));
    }
}
