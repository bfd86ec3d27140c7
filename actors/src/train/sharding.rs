//! Which parameter-server shard holds a key: consistent hashing with
//! virtual nodes. Each shard owns `replicas` points on a 64-bit ring; a
//! key belongs to the first point at or after its hash. Adding or removing
//! a shard moves only the keys between its points and their predecessors
//! (about 1/N of them), and virtual nodes keep the shares even.

use serde::{Deserialize, Serialize};

/// A shard's index.
pub type ShardId = u32;

/// The placement of keys on shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistentHash {
    points: Vec<(u64, ShardId)>,
    replicas: u32,
}

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
    }

    /// Removes a shard's virtual nodes.
    pub fn remove(&mut self, shard: ShardId) {
        self.points.retain(|(_, s)| *s != shard);
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
        let at = self.points.partition_point(|(p, _)| *p < h);
        let (_, shard) = self.points[at % self.points.len()];
        Some(shard)
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
    fn an_empty_ring_places_nothing() {
        assert_eq!(ConsistentHash::new(0, 8).shard_of(5), None);
    }
}
