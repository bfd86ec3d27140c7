//! Which parameter-server shard holds a key: consistent hashing with
//! virtual nodes. Each shard owns `replicas` points on a 64-bit ring; a
//! key belongs to the first point at or after its hash. Adding or removing
//! a shard moves only the keys between its points and their predecessors
//! (about 1/N of them), and virtual nodes keep the shares even.
//!
//! A worker places every key occurrence of every row, so the ring keeps
//! an index beside its points: the hash space cut into
//! [`INDEX_BITS`]-bit buckets, each holding its shard when no point falls
//! inside it (nearly all of them), so a key is placed with one load; a
//! key in a bucket with a point searches the points as before. Both give
//! the same shard.

use serde::{Deserialize, Serialize};

/// A shard's index.
pub type ShardId = u32;

/// Bits of a hash that pick its bucket in the ring's index.
pub const INDEX_BITS: u32 = 12;

/// A bucket whose keys need the search (a point falls inside it).
const SEARCH: u16 = u16::MAX;

/// The placement of keys on shards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsistentHash {
    points: Vec<(u64, ShardId)>,
    replicas: u32,
    /// Per bucket of the hash space, its shard, or [`SEARCH`]; empty
    /// until built (a ring read from the wire searches until it changes).
    #[serde(skip)]
    index: Vec<u16>,
}

impl PartialEq for ConsistentHash {
    fn eq(&self, other: &Self) -> bool {
        self.points == other.points && self.replicas == other.replicas
    }
}

impl Eq for ConsistentHash {}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl ConsistentHash {
    /// Shards `0..shards`, each with `replicas` virtual nodes.
    pub fn new(shards: u32, replicas: u32) -> Self {
        let mut ring = ConsistentHash {
            points: Vec::new(),
            replicas: replicas.max(1),
            index: Vec::new(),
        };
        for shard in 0..shards {
            ring.add(shard);
        }
        ring
    }

    /// Adds a shard's virtual nodes.
    pub fn add(&mut self, shard: ShardId) {
        for r in 0..self.replicas {
            let point = mix((u64::from(shard) << 32) | u64::from(r));
            self.points.push((point, shard));
        }
        self.points.sort_unstable();
        self.build_index();
    }

    /// Removes a shard's virtual nodes.
    pub fn remove(&mut self, shard: ShardId) {
        self.points.retain(|(_, s)| *s != shard);
        self.build_index();
    }

    /// Where the point search for `hash` lands.
    fn search(&self, hash: u64) -> usize {
        self.points.partition_point(|(p, _)| *p < hash) % self.points.len()
    }

    /// Fills the index: a bucket's keys all land on one point when the
    /// search from its first and its last hash lands on the same one.
    fn build_index(&mut self) {
        self.index.clear();
        let fits = self.points.iter().all(|(_, s)| *s < u32::from(SEARCH));
        if self.points.is_empty() || !fits {
            return;
        }
        let shift = 64 - INDEX_BITS;
        self.index = (0..1u64 << INDEX_BITS)
            .map(|bucket| {
                let first = bucket << shift;
                let last = first | (u64::MAX >> INDEX_BITS);
                let at = self.search(first);
                if at == self.search(last) {
                    self.points[at].1 as u16
                } else {
                    SEARCH
                }
            })
            .collect();
    }

    /// The shards on the ring, ascending.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self.points.iter().map(|(_, s)| *s).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// The shard holding `key`, or `None` when there are no shards.
    pub fn shard_of(&self, key: u64) -> Option<ShardId> {
        if self.points.is_empty() {
            return None;
        }
        let h = mix(key);
        if let Some(&shard) = self.index.get((h >> (64 - INDEX_BITS)) as usize) {
            if shard != SEARCH {
                return Some(ShardId::from(shard));
            }
        }
        Some(self.points[self.search(h)].1)
    }

    /// Splits `keys` by shard: for each shard on the ring, the positions
    /// (into `keys`) of its keys, in order.
    pub fn split(&self, keys: &[u64]) -> Vec<(ShardId, Vec<usize>)> {
        let shards = self.shards();
        let mut out: Vec<(ShardId, Vec<usize>)> = shards.iter().map(|s| (*s, Vec::new())).collect();
        for (i, key) in keys.iter().enumerate() {
            if let Some(shard) = self.shard_of(*key) {
                if let Ok(slot) = shards.binary_search(&shard) {
                    out[slot].1.push(i);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_adding_a_shard_moves_about_its_share() {
        let ring = ConsistentHash::new(4, 128);
        let mut counts = [0u32; 5];
        let keys: Vec<u64> = (0..100_000).collect();
        for k in &keys {
            counts[ring.shard_of(*k).unwrap_or(0) as usize] += 1;
        }
        for c in &counts[..4] {
            assert!((20_000..30_000).contains(c), "{counts:?}");
        }
        let mut grown = ring.clone();
        grown.add(4);
        let moved = keys
            .iter()
            .filter(|k| ring.shard_of(**k) != grown.shard_of(**k))
            .count();
        assert!((14_000..26_000).contains(&moved), "{moved} keys moved");
        assert!(
            keys.iter()
                .filter(|k| ring.shard_of(**k) != grown.shard_of(**k))
                .all(|k| grown.shard_of(*k) == Some(4)),
            "keys only move to the new shard"
        );
    }

    #[test]
    fn split_covers_every_key_once() {
        let ring = ConsistentHash::new(3, 16);
        let keys: Vec<u64> = (0..1000).map(|i| i * 7919).collect();
        let parts = ring.split(&keys);
        let mut all: Vec<usize> = parts.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        for (shard, positions) in &parts {
            assert!(positions
                .iter()
                .all(|&i| ring.shard_of(keys[i]) == Some(*shard)));
        }
    }

    #[test]
    fn the_index_places_every_key_where_the_search_does() {
        for (shards, replicas) in [(1, 64), (2, 64), (3, 16), (7, 128)] {
            let mut ring = ConsistentHash::new(shards, replicas);
            let searched = |ring: &ConsistentHash, k: u64| ring.points[ring.search(mix(k))].1;
            let indexed = ring.index.iter().filter(|&&s| s != SEARCH).count();
            assert!(
                indexed > ring.index.len() * 3 / 4,
                "{indexed} buckets indexed"
            );
            for k in (0..200_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                assert_eq!(ring.shard_of(k), Some(searched(&ring, k)), "key {k}");
            }
            // Keys at the very edges of buckets holding a point.
            for &(p, _) in &ring.points.clone() {
                for h in [p.wrapping_sub(1), p, p.wrapping_add(1)] {
                    let at = ring.search(h);
                    let bucket = (h >> (64 - INDEX_BITS)) as usize;
                    if ring.index[bucket] != SEARCH {
                        assert_eq!(u32::from(ring.index[bucket]), ring.points[at].1);
                    }
                }
            }
            if shards > 1 {
                ring.remove(0);
                for k in 0..10_000u64 {
                    assert_eq!(ring.shard_of(k), Some(searched(&ring, k)));
                }
            }
            // A ring read from the wire has no index and places the same.
            let wire: ConsistentHash =
                serde_json::from_str(&serde_json::to_string(&ring).expect("encoded"))
                    .expect("decoded");
            assert_eq!(wire, ring);
            for k in 0..10_000u64 {
                assert_eq!(wire.shard_of(k), ring.shard_of(k));
            }
        }
    }

    #[test]
    fn an_empty_ring_places_nothing() {
        assert_eq!(ConsistentHash::new(0, 8).shard_of(5), None);
    }
}
