//! The serving model's swap: a read sees one whole version, never a mix
//! of two; with BSP, a version is published only once every shard reached
//! it.

use braid_actors::train::messages::{Delta, ModelVersion};
use braid_actors::train::optimizer::{FtrlParams, OptimizerKind};
use braid_actors::train::ps::{Consistency, PsConfig};
use braid_actors::train::serving::Serving;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn config(name: &str, shards: usize, consistency: Consistency, bits: Option<u32>) -> PsConfig {
    let ftrl = OptimizerKind::Ftrl(FtrlParams {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    });
    let mut c = PsConfig::new(name, 1, shards, ftrl);
    c.consistency = consistency;
    c.feature_bits = bits;
    c
}

fn delta(shard: u32, records: u64, keys: &[u64], value: f32) -> Delta {
    Delta {
        shard,
        version: ModelVersion { epoch: 0, records },
        full: false,
        keys: keys.to_vec().into(),
        weights: vec![value; keys.len()].into(),
        batches: Vec::new(),
    }
}

#[test]
fn readers_never_see_a_half_applied_delta() {
    for bits in [Some(12), None] {
        let serving = Arc::new(Serving::new(&config("swap", 1, Consistency::Asp, bits)));
        let keys: Vec<u64> = (0..2000).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (serving, stop, keys) = (serving.clone(), stop.clone(), keys.clone());
                let checks = checks.clone();
                std::thread::spawn(move || {
                    let mut checked = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let (v, torn) = serving.read(|model| {
                            let v = model.version().records as f32;
                            (v, keys.iter().find(|&&k| model.weight(k) != v).copied())
                        });
                        assert_eq!(torn, None, "a key differs from version {v}");
                        checked += 1;
                        checks.fetch_add(1, Ordering::AcqRel);
                    }
                    checked
                })
            })
            .collect();
        // At least 300 swaps, and on until the readers have checked versions
        // while swaps went on (a fast writer could otherwise finish first).
        let mut published = 0u64;
        while published < 300 || checks.load(Ordering::Acquire) < 20 {
            published += 1;
            serving.apply(delta(0, published, &keys, published as f32));
        }
        stop.store(true, Ordering::Release);
        for r in readers {
            r.join()
                .unwrap_or_else(|_| panic!("a reader saw a torn version"));
        }
        assert!(checks.load(Ordering::Acquire) >= 20);
        assert_eq!(serving.version().records, published);
        assert_eq!(serving.swaps(), published);
    }
}

#[test]
fn bsp_publishes_a_version_only_when_every_shard_has_it() {
    let serving = Serving::new(&config("bsp-swap", 2, Consistency::Bsp, Some(12)));
    let c = config("bsp-swap", 2, Consistency::Bsp, Some(12));
    let ring = c.ring();
    let (k0, k1) = {
        let mut k0 = None;
        let mut k1 = None;
        for k in 0..4096u64 {
            match ring.shard_of(k) {
                Some(0) if k0.is_none() => k0 = Some(k),
                Some(1) if k1.is_none() => k1 = Some(k),
                _ => {}
            }
        }
        (k0.unwrap_or(0), k1.unwrap_or(1))
    };
    serving.apply(delta(0, 10, &[k0], 1.0));
    assert_eq!(serving.swaps(), 0, "shard 1 has not reached version 10");
    serving.apply(delta(1, 10, &[k1], 2.0));
    assert_eq!(serving.swaps(), 1);
    let seen = serving.read(|m| (m.version().records, m.weight(k0), m.weight(k1)));
    assert_eq!(seen, (10, 1.0, 2.0));
    serving.apply(delta(1, 20, &[k1], 3.0));
    serving.apply(delta(1, 30, &[k1], 4.0));
    assert_eq!(serving.read(|m| m.weight(k1)), 2.0);
    serving.apply(delta(0, 20, &[k0], 5.0));
    assert_eq!(serving.version().records, 10);
    serving.apply(delta(0, 30, &[k0], 6.0));
    let seen = serving.read(|m| (m.version().records, m.weight(k0), m.weight(k1)));
    assert_eq!(seen, (30, 6.0, 4.0));
    // A full delta (a restored shard's) replaces what its shard held back.
    serving.apply(delta(0, 40, &[k0], 7.0));
    let mut full = delta(0, 40, &[], 0.0);
    full.full = true;
    serving.apply(full);
    serving.apply(delta(1, 40, &[k1], 8.0));
    let seen = serving.read(|m| (m.version().records, m.weight(k0), m.weight(k1)));
    assert_eq!(seen, (40, 0.0, 8.0));
}

#[test]
fn a_read_that_keeps_overlapping_publishes_is_retried_then_run_under_the_writers_lock() {
    let serving = Serving::new(&config("retry", 1, Consistency::Asp, Some(12)));
    let keys: Vec<u64> = (0..100).collect();
    serving.apply(delta(0, 1, &keys, 1.0));
    let mut runs = 0u64;
    let seen = serving.read(|m| {
        runs += 1;
        let first = m.weight(0);
        // Every optimistic run overlaps a publish, as a slow read under a
        // fast writer would; the run under the writer's lock cannot.
        if runs <= 4 {
            serving.apply(delta(0, 1 + runs, &keys, 1.0 + runs as f32));
        }
        (m.version().records, first, m.weight(99))
    });
    assert_eq!(runs, 5, "four optimistic runs, then one under the lock");
    assert_eq!(seen, (5, 5.0, 5.0));
    assert_eq!(serving.swaps(), 5);
}
