//! Model-based property tests for `braid_store::allocator`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_store::allocator::{AllocError, AllocStats, Allocator, Block, FreeError, ALIGN};
use proptest::prelude::*;

/// One step of a random workload.
#[derive(Clone, Debug)]
enum Op {
    /// Allocate this many bytes.
    Alloc(u64),
    /// Free the live block at this index (modulo the number of live blocks).
    Free(usize),
    /// Free the most recently freed block again.
    DoubleFree,
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1u64..=512,
        3 => 1u64..=4096,
        1 => 1u64..=40_000,
        1 => prop_oneof![Just(u64::MAX), Just(u64::MAX - 62), Just(1u64 << 63)],
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => size_strategy().prop_map(Op::Alloc),
        4 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::DoubleFree),
    ]
}

fn round_up(size: u64) -> Option<u64> {
    size.checked_add(ALIGN - 1).map(|s| s / ALIGN * ALIGN)
}

/// Free gaps `(offset, len)` between the live blocks, in offset order.
fn gaps(capacity: u64, live: &[Block]) -> Vec<(u64, u64)> {
    let mut sorted = live.to_vec();
    sorted.sort_by_key(|b| b.offset);
    let mut out = Vec::new();
    let mut pos = 0;
    for b in &sorted {
        if b.offset > pos {
            out.push((pos, b.offset - pos));
        }
        pos = b.end();
    }
    if capacity > pos {
        out.push((pos, capacity - pos));
    }
    out
}

/// Check the allocator against the model (the list of live blocks).
fn check(a: &Allocator, live: &[Block]) {
    let cap = a.capacity();
    assert_eq!(cap % ALIGN, 0);
    let mut sorted = live.to_vec();
    sorted.sort_by_key(|b| b.offset);
    for b in &sorted {
        assert_eq!(b.offset % ALIGN, 0, "unaligned offset {b:?}");
        assert_eq!(b.len % ALIGN, 0, "unaligned len {b:?}");
        assert!(b.len > 0);
        assert!(b.end() <= cap, "{b:?} beyond capacity {cap}");
        assert!(a.is_allocated(*b), "{b:?} not allocated");
    }
    for w in sorted.windows(2) {
        assert!(w[0].end() <= w[1].offset, "overlap: {:?} {:?}", w[0], w[1]);
    }
    let used: u64 = live.iter().map(|b| b.len).sum();
    let g = gaps(cap, live);
    let s = a.stats();
    assert_eq!(
        s,
        AllocStats {
            capacity: cap,
            used,
            free: cap - used,
            largest_free: g.iter().map(|&(_, l)| l).max().unwrap_or(0),
            // Coalescing is immediate, so each maximal gap is one free block.
            free_blocks: g.len() as u64,
            allocations: live.len() as u64,
        }
    );
    assert_eq!(s.used + s.free, s.capacity);
    assert_eq!(
        a.high_water(),
        sorted.last().map_or(0, |b| b.end()),
        "high_water"
    );
}

/// Snapshot of everything observable, to check that failed operations change
/// nothing.
fn observe(a: &Allocator, live: &[Block]) -> (AllocStats, u64, Vec<bool>) {
    (
        a.stats(),
        a.high_water(),
        live.iter().map(|b| a.is_allocated(*b)).collect(),
    )
}

fn run(capacity: u64, ops: &[Op]) {
    let mut a = Allocator::new(capacity);
    assert_eq!(a.capacity(), capacity / ALIGN * ALIGN);
    let mut live: Vec<Block> = Vec::new();
    let mut last_freed: Option<Block> = None;
    check(&a, &live);

    for op in ops {
        match *op {
            Op::Alloc(size) => {
                let g = gaps(a.capacity(), &live);
                // Expected best fit: smallest gap that fits, lowest offset
                // among equals (gaps are in offset order, min_by_key keeps the
                // first).
                let want = round_up(size).and_then(|len| {
                    g.iter()
                        .filter(|&&(_, gl)| gl >= len)
                        .min_by_key(|&&(_, gl)| gl)
                        .map(|&(off, _)| Block { offset: off, len })
                });
                let before = observe(&a, &live);
                match a.allocate(size) {
                    Ok(b) => {
                        assert_eq!(Some(b), want, "allocate({size})");
                        assert!(b.len >= size && b.len - size < ALIGN);
                        live.push(b);
                    }
                    Err(e) => {
                        assert_eq!(want, None, "allocate({size}) failed: {e}");
                        assert_eq!(
                            e,
                            AllocError::NoSpace {
                                requested: size,
                                free: before.0.free,
                                largest_free: before.0.largest_free,
                            }
                        );
                        assert_eq!(observe(&a, &live), before, "failed alloc changed state");
                    }
                }
            }
            Op::Free(i) => {
                if live.is_empty() {
                    continue;
                }
                let b = live.swap_remove(i % live.len());
                a.free(b).unwrap();
                assert!(!a.is_allocated(b));
                last_freed = Some(b);
            }
            Op::DoubleFree => {
                let Some(b) = last_freed else { continue };
                let expected = match live.iter().find(|l| l.offset == b.offset) {
                    None => FreeError::NotAllocated { offset: b.offset },
                    Some(l) if l.len != b.len => FreeError::LengthMismatch {
                        offset: b.offset,
                        expected: l.len,
                        given: b.len,
                    },
                    // Reallocated identically: freeing it would be legal.
                    Some(_) => continue,
                };
                let before = observe(&a, &live);
                assert_eq!(a.free(b), Err(expected));
                assert_eq!(observe(&a, &live), before, "rejected free changed state");
            }
        }
        check(&a, &live);
    }

    // Free everything: every freed byte must be reusable after coalescing.
    while let Some(b) = live.pop() {
        a.free(b).unwrap();
        check(&a, &live);
    }
    let s = a.stats();
    assert_eq!(s.used, 0);
    assert_eq!(s.allocations, 0);
    assert_eq!(s.largest_free, a.capacity());
    assert_eq!(s.free_blocks, u64::from(a.capacity() > 0));
    if a.capacity() > 0 {
        assert_eq!(
            a.allocate(a.capacity()),
            Ok(Block {
                offset: 0,
                len: a.capacity()
            })
        );
        assert_eq!(a.high_water(), a.capacity());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random allocate/free workloads agree with a simple model.
    #[test]
    fn matches_model(
        capacity in prop_oneof![0u64..=200, 0u64..=20_000, 0u64..=100_000],
        ops in prop::collection::vec(op_strategy(), 0..200),
    ) {
        run(capacity, &ops);
    }

    /// After an arbitrary workload, a failing allocation changes nothing.
    #[test]
    fn failed_allocation_changes_nothing(
        capacity in 0u64..=20_000,
        sizes in prop::collection::vec(1u64..=2_000, 0..60),
        frees in prop::collection::vec(any::<usize>(), 0..30),
        slack in 1u64..=1_000_000,
    ) {
        let mut a = Allocator::new(capacity);
        let mut live = Vec::new();
        for s in sizes {
            if let Ok(b) = a.allocate(s) {
                live.push(b);
            }
        }
        for i in frees {
            if live.is_empty() {
                break;
            }
            let b = live.swap_remove(i % live.len());
            a.free(b).unwrap();
        }
        check(&a, &live);
        let before = observe(&a, &live);
        let too_big = before.0.largest_free.saturating_add(slack);
        let err = a.allocate(too_big).unwrap_err();
        prop_assert_eq!(
            err,
            AllocError::NoSpace {
                requested: too_big,
                free: before.0.free,
                largest_free: before.0.largest_free,
            }
        );
        prop_assert_eq!(a.allocate(0), Err(AllocError::ZeroSize));
        prop_assert!(a.allocate(u64::MAX).is_err());
        prop_assert_eq!(observe(&a, &live), before);
        check(&a, &live);
    }
}
