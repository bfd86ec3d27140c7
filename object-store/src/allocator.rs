//! Best-fit allocator for the shared-memory arena.
//!
//! The [`Allocator`] hands out byte ranges ([`Block`]s) of an arena of a fixed
//! capacity; it never touches the memory itself. Every block starts at a
//! multiple of [`ALIGN`] and has a length that is a multiple of [`ALIGN`].
//!
//! Policy: **best fit, ties broken by lowest offset**, with the allocated part
//! taken from the start of the chosen free block, so allocations pack toward
//! the start of the arena. Freed blocks coalesce immediately with adjacent free
//! neighbours, so the free list never holds two touching blocks.
//!
//! All operations are `O(log n)` in the number of free / allocated blocks:
//!
//! * free blocks are indexed by end (`BTreeMap<end, start>`, for coalescing;
//!   keyed by end so that carving an allocation from a block's start updates
//!   its entry in place) and by `(len, start)` (`BTreeSet`, for the best-fit
//!   search);
//! * allocated blocks are indexed by offset (`BTreeMap<offset, len>`), which
//!   validates frees and gives [`Allocator::high_water`] from its last entry.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Alignment of every block, in bytes.
pub const ALIGN: u64 = 64;

/// Mask clearing the sub-[`ALIGN`] bits of an offset or length.
const ALIGN_MASK: u64 = !(ALIGN - 1);

/// A range of the arena handed out by [`Allocator::allocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Block {
    /// Offset of the first byte of the block within the arena (a multiple of
    /// [`ALIGN`]).
    pub offset: u64,
    /// Allocated length in bytes: the requested size rounded up to a multiple
    /// of [`ALIGN`].
    pub len: u64,
}

impl Block {
    /// Offset one past the last byte of the block (`offset + len`).
    ///
    /// Blocks produced by an [`Allocator`] always lie within its capacity, so
    /// this cannot overflow for them; for arbitrary blocks it saturates.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A snapshot of the allocator's occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocStats {
    /// Usable capacity in bytes (the arena size rounded down to [`ALIGN`]).
    pub capacity: u64,
    /// Bytes currently allocated (sum of live block lengths).
    pub used: u64,
    /// Bytes currently free (`capacity - used`).
    pub free: u64,
    /// Length of the largest free block: the largest single allocation that
    /// would currently succeed.
    pub largest_free: u64,
    /// Number of (maximally coalesced) free blocks.
    pub free_blocks: u64,
    /// Number of live allocations.
    pub allocations: u64,
}

/// Why [`Allocator::allocate`] failed. A failed allocation changes nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum AllocError {
    /// No free block is large enough for the (rounded-up) request.
    #[error(
        "cannot allocate {requested} bytes: {free} bytes free, largest free block {largest_free}"
    )]
    NoSpace {
        /// The size that was asked for, before rounding.
        requested: u64,
        /// Total free bytes at the time of the request.
        free: u64,
        /// Length of the largest free block at the time of the request.
        largest_free: u64,
    },
    /// A zero-byte allocation was requested.
    #[error("cannot allocate zero bytes")]
    ZeroSize,
}

/// Why [`Allocator::free`] rejected a block. A rejected free changes nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FreeError {
    /// No live allocation starts at this offset (a double free, or a block
    /// that was never handed out).
    #[error("no allocation starts at offset {offset}")]
    NotAllocated {
        /// Offset of the block that was passed to `free`.
        offset: u64,
    },
    /// An allocation starts at this offset, but with a different length.
    #[error("allocation at offset {offset} has length {expected}, but {given} was given")]
    LengthMismatch {
        /// Offset of the block that was passed to `free`.
        offset: u64,
        /// Length of the live allocation at that offset.
        expected: u64,
        /// Length of the block that was passed to `free`.
        given: u64,
    },
}

/// Best-fit, lowest-offset-tie-break allocator over an arena of fixed
/// capacity. See the [module docs](self) for the policy and complexity.
#[derive(Debug, Clone)]
pub struct Allocator {
    /// Usable capacity (rounded down to [`ALIGN`]).
    capacity: u64,
    /// Sum of live allocation lengths.
    used: u64,
    /// Free blocks as end → start. Keyed by end so that carving an allocation
    /// from the start of a free block updates the entry in place. Never holds
    /// two adjacent blocks.
    free_by_end: BTreeMap<u64, u64>,
    /// Free blocks as `(len, start)`, ordered for best fit with lowest-offset
    /// tie break.
    free_by_size: BTreeSet<(u64, u64)>,
    /// Live allocations as offset → len.
    allocated: BTreeMap<u64, u64>,
}

impl Allocator {
    /// An allocator over an arena of `capacity` bytes.
    ///
    /// The usable capacity is `capacity` rounded down to a multiple of
    /// [`ALIGN`]; initially it is one free block.
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity & ALIGN_MASK;
        let mut free_by_end = BTreeMap::new();
        let mut free_by_size = BTreeSet::new();
        if capacity > 0 {
            free_by_end.insert(capacity, 0);
            free_by_size.insert((capacity, 0));
        }
        Allocator {
            capacity,
            used: 0,
            free_by_end,
            free_by_size,
            allocated: BTreeMap::new(),
        }
    }

    /// Allocate `size` bytes, rounded up to a multiple of [`ALIGN`].
    ///
    /// Picks the smallest free block that fits (lowest offset among equals)
    /// and carves the allocation from its start.
    ///
    /// # Errors
    ///
    /// [`AllocError::ZeroSize`] for `size == 0`; [`AllocError::NoSpace`] if no
    /// free block is large enough (including sizes so large that rounding
    /// them up would overflow). On error nothing changes.
    pub fn allocate(&mut self, size: u64) -> Result<Block, AllocError> {
        if size == 0 {
            return Err(AllocError::ZeroSize);
        }
        let fit = size
            .checked_add(ALIGN - 1)
            .map(|s| s & ALIGN_MASK)
            .and_then(|len| {
                let &(free_len, offset) = self.free_by_size.range((len, 0)..).next()?;
                Some((len, free_len, offset))
            });
        let Some((len, free_len, offset)) = fit else {
            return Err(AllocError::NoSpace {
                requested: size,
                free: self.capacity - self.used,
                largest_free: self.largest_free(),
            });
        };
        self.free_by_size.remove(&(free_len, offset));
        let free_end = offset + free_len;
        if free_len > len {
            let rest = offset + len;
            self.free_by_size.insert((free_len - len, rest));
            if let Some(start) = self.free_by_end.get_mut(&free_end) {
                *start = rest;
            }
        } else {
            self.free_by_end.remove(&free_end);
        }
        self.allocated.insert(offset, len);
        self.used += len;
        Ok(Block { offset, len })
    }

    /// Return `block` to the free pool, coalescing it with free neighbours on
    /// both sides.
    ///
    /// # Errors
    ///
    /// [`FreeError::NotAllocated`] if no live allocation starts at
    /// `block.offset` (e.g. a double free); [`FreeError::LengthMismatch`] if
    /// one does but its length differs from `block.len`. On error nothing
    /// changes.
    pub fn free(&mut self, block: Block) -> Result<(), FreeError> {
        let offset = block.offset;
        match self.allocated.remove(&offset) {
            None => return Err(FreeError::NotAllocated { offset }),
            Some(expected) if expected != block.len => {
                self.allocated.insert(offset, expected);
                return Err(FreeError::LengthMismatch {
                    offset,
                    expected,
                    given: block.len,
                });
            }
            Some(_) => {}
        }
        self.used -= block.len;
        let end = offset + block.len;

        // One search finds both neighbours: the left one (if free) is keyed
        // by its end, which is exactly `offset`; no free block ends inside
        // the freed range, so the next entry is the right neighbour if that
        // one starts at `end`.
        let mut iter = self.free_by_end.range_mut(offset..);
        let mut next = iter.next();
        let mut left_start = None;
        if let Some((&l_end, &mut l_start)) = next {
            if l_end == offset {
                left_start = Some(l_start);
                next = iter.next();
            }
        }
        let start = left_start.unwrap_or(offset);
        // Merge into the right neighbour's entry in place (its end stays).
        let right_end = match next {
            Some((&r_end, r_start)) if *r_start == end => {
                *r_start = start;
                Some(r_end)
            }
            _ => None,
        };

        if let Some(l_start) = left_start {
            self.free_by_end.remove(&offset);
            self.free_by_size.remove(&(offset - l_start, l_start));
        }
        let new_end = match right_end {
            Some(r_end) => {
                self.free_by_size.remove(&(r_end - end, end));
                r_end
            }
            None => {
                self.free_by_end.insert(end, start);
                end
            }
        };
        self.free_by_size.insert((new_end - start, start));
        Ok(())
    }

    /// A snapshot of the allocator's occupancy. `O(log n)`.
    pub fn stats(&self) -> AllocStats {
        AllocStats {
            capacity: self.capacity,
            used: self.used,
            free: self.capacity - self.used,
            largest_free: self.largest_free(),
            free_blocks: self.free_by_end.len() as u64,
            allocations: self.allocated.len() as u64,
        }
    }

    /// End of the highest allocated byte (`0` when nothing is allocated).
    /// `O(log n)`.
    pub fn high_water(&self) -> u64 {
        self.allocated
            .last_key_value()
            .map_or(0, |(&offset, &len)| offset + len)
    }

    /// Usable capacity in bytes (the arena size rounded down to [`ALIGN`]).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether `block` is a live allocation with exactly this offset and
    /// length.
    pub fn is_allocated(&self, block: Block) -> bool {
        self.allocated.get(&block.offset) == Some(&block.len)
    }

    /// Length of the largest free block (0 if none).
    fn largest_free(&self) -> u64 {
        self.free_by_size.last().map_or(0, |&(len, _)| len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Free blocks as `(offset, len)`, in offset order.
    fn free_list(a: &Allocator) -> Vec<(u64, u64)> {
        a.free_by_end.iter().map(|(&e, &s)| (s, e - s)).collect()
    }

    /// Check internal consistency of the indexes.
    fn check(a: &Allocator) {
        assert_eq!(a.free_by_end.len(), a.free_by_size.len());
        for (off, len) in free_list(a) {
            assert!(a.free_by_size.contains(&(len, off)));
        }
        // Free and allocated blocks tile [0, capacity) exactly, with no two
        // adjacent free blocks.
        let mut all: Vec<(u64, u64, bool)> = a
            .free_by_end
            .iter()
            .map(|(&e, &s)| (s, e - s, true))
            .chain(a.allocated.iter().map(|(&o, &l)| (o, l, false)))
            .collect();
        all.sort_unstable();
        let mut pos = 0;
        let mut prev_free = false;
        for (o, l, is_free) in all {
            assert_eq!(o, pos, "gap or overlap at {o}");
            assert!(l > 0 && l % ALIGN == 0 && o % ALIGN == 0);
            assert!(!(prev_free && is_free), "uncoalesced free blocks at {o}");
            prev_free = is_free;
            pos = o + l;
        }
        assert_eq!(pos, a.capacity);
        let used: u64 = a.allocated.values().sum();
        assert_eq!(used, a.used);
        let s = a.stats();
        assert_eq!(s.used + s.free, s.capacity);
    }

    #[test]
    fn basic_allocate_free() {
        let mut a = Allocator::new(4096);
        let b = a.allocate(100).unwrap();
        assert_eq!(
            b,
            Block {
                offset: 0,
                len: 128
            }
        );
        assert_eq!(b.end(), 128);
        assert!(a.is_allocated(b));
        let c = a.allocate(64).unwrap();
        assert_eq!(
            c,
            Block {
                offset: 128,
                len: 64
            }
        );
        let s = a.stats();
        assert_eq!(
            s,
            AllocStats {
                capacity: 4096,
                used: 192,
                free: 4096 - 192,
                largest_free: 4096 - 192,
                free_blocks: 1,
                allocations: 2,
            }
        );
        check(&a);
        a.free(b).unwrap();
        a.free(c).unwrap();
        assert!(!a.is_allocated(b));
        check(&a);
        let s = a.stats();
        assert_eq!(s.used, 0);
        assert_eq!(s.free_blocks, 1);
        assert_eq!(s.largest_free, 4096);
        assert_eq!(s.allocations, 0);
    }

    #[test]
    fn alignment() {
        let mut a = Allocator::new(1 << 20);
        for size in [1, 2, 63, 64, 65, 127, 128, 129, 1000, 4095] {
            let b = a.allocate(size).unwrap();
            assert_eq!(b.offset % ALIGN, 0);
            assert_eq!(b.len % ALIGN, 0);
            assert!(b.len >= size && b.len < size + ALIGN);
        }
        check(&a);
    }

    #[test]
    fn no_space_reports_numbers() {
        let mut a = Allocator::new(1024);
        let x = a.allocate(256).unwrap();
        let _y = a.allocate(256).unwrap();
        a.free(x).unwrap();
        // Free: [0,256) and [512,1024): 768 free, largest 512.
        let before = a.clone();
        let err = a.allocate(513).unwrap_err();
        assert_eq!(
            err,
            AllocError::NoSpace {
                requested: 513,
                free: 768,
                largest_free: 512,
            }
        );
        assert_eq!(
            err.to_string(),
            "cannot allocate 513 bytes: 768 bytes free, largest free block 512"
        );
        assert_eq!(a.stats(), before.stats());
        assert_eq!(free_list(&a), free_list(&before));
        assert_eq!(a.allocated, before.allocated);
        // Exactly the largest block still fits.
        assert_eq!(
            a.allocate(512).unwrap(),
            Block {
                offset: 512,
                len: 512
            }
        );
    }

    #[test]
    fn zero_size() {
        let mut a = Allocator::new(1024);
        assert_eq!(a.allocate(0), Err(AllocError::ZeroSize));
        assert_eq!(a.stats().used, 0);
        let mut empty = Allocator::new(0);
        assert_eq!(empty.allocate(0), Err(AllocError::ZeroSize));
        assert_eq!(
            empty.allocate(1),
            Err(AllocError::NoSpace {
                requested: 1,
                free: 0,
                largest_free: 0,
            })
        );
    }

    #[test]
    fn double_and_wrong_length_free_rejected() {
        let mut a = Allocator::new(4096);
        let b = a.allocate(100).unwrap();
        let c = a.allocate(100).unwrap();
        let snapshot = a.clone();

        let wrong = Block {
            offset: b.offset,
            len: 64,
        };
        assert_eq!(
            a.free(wrong),
            Err(FreeError::LengthMismatch {
                offset: 0,
                expected: 128,
                given: 64,
            })
        );
        assert!(!a.is_allocated(wrong));
        let inside = Block {
            offset: b.offset + 64,
            len: 64,
        };
        assert_eq!(a.free(inside), Err(FreeError::NotAllocated { offset: 64 }));
        let past = Block {
            offset: 1 << 40,
            len: 64,
        };
        assert_eq!(
            a.free(past),
            Err(FreeError::NotAllocated { offset: 1 << 40 })
        );
        assert_eq!(free_list(&a), free_list(&snapshot));
        assert_eq!(a.free_by_size, snapshot.free_by_size);
        assert_eq!(a.allocated, snapshot.allocated);
        assert_eq!(a.stats(), snapshot.stats());

        a.free(b).unwrap();
        let after_first = a.clone();
        assert_eq!(a.free(b), Err(FreeError::NotAllocated { offset: 0 }));
        assert_eq!(free_list(&a), free_list(&after_first));
        assert_eq!(a.allocated, after_first.allocated);
        assert_eq!(a.stats(), after_first.stats());
        assert!(a.is_allocated(c));
        check(&a);
    }

    /// Three adjacent 64-byte blocks followed by a fence, so the tail free
    /// block never touches them.
    fn three_fenced() -> (Allocator, Block, Block, Block) {
        let mut a = Allocator::new(64 * 8);
        let x = a.allocate(64).unwrap();
        let y = a.allocate(64).unwrap();
        let z = a.allocate(64).unwrap();
        let _fence = a.allocate(64).unwrap();
        (a, x, y, z)
    }

    #[test]
    fn coalesce_left() {
        let (mut a, x, y, _z) = three_fenced();
        a.free(x).unwrap();
        a.free(y).unwrap();
        check(&a);
        assert_eq!(free_list(&a)[0], (0, 128));
        assert_eq!(a.stats().free_blocks, 2);
    }

    #[test]
    fn coalesce_right() {
        let (mut a, x, y, _z) = three_fenced();
        a.free(y).unwrap();
        a.free(x).unwrap();
        check(&a);
        assert_eq!(free_list(&a)[0], (0, 128));
        assert_eq!(a.stats().free_blocks, 2);
    }

    #[test]
    fn coalesce_both() {
        let (mut a, x, y, z) = three_fenced();
        a.free(x).unwrap();
        a.free(z).unwrap();
        assert_eq!(a.stats().free_blocks, 3);
        a.free(y).unwrap();
        check(&a);
        assert_eq!(free_list(&a)[0], (0, 192));
        assert_eq!(a.stats().free_blocks, 2);
        assert_eq!(
            a.allocate(192).unwrap(),
            Block {
                offset: 0,
                len: 192
            }
        );
    }

    #[test]
    fn coalesce_everything_back_to_one_block() {
        let mut a = Allocator::new(10_000);
        let blocks: Vec<Block> = (1..=20).map(|i| a.allocate(i * 37).unwrap()).collect();
        for b in blocks
            .iter()
            .step_by(2)
            .chain(blocks.iter().skip(1).step_by(2))
        {
            a.free(*b).unwrap();
            check(&a);
        }
        let s = a.stats();
        assert_eq!(s.free_blocks, 1);
        assert_eq!(s.largest_free, a.capacity());
        assert_eq!(
            a.allocate(a.capacity()).unwrap(),
            Block {
                offset: 0,
                len: a.capacity()
            }
        );
    }

    #[test]
    fn best_fit_and_lowest_offset_tie_break() {
        let mut a = Allocator::new(64 * 100);
        // Layout: [A 256][f1][B 128][f2][C 256][f3][D 128][f4][rest...]
        let big1 = a.allocate(256).unwrap();
        let f1 = a.allocate(64).unwrap();
        let mid1 = a.allocate(128).unwrap();
        let f2 = a.allocate(64).unwrap();
        let big2 = a.allocate(256).unwrap();
        let f3 = a.allocate(64).unwrap();
        let mid2 = a.allocate(128).unwrap();
        let _f4 = a.allocate(64).unwrap();
        for b in [big1, mid1, big2, mid2] {
            a.free(b).unwrap();
        }
        let _ = (f1, f2, f3);
        check(&a);
        // A 100-byte request (128 rounded) fits exactly in mid1, the lower of
        // the two 128-byte holes, not the earlier 256-byte hole.
        assert_eq!(a.allocate(100).unwrap(), mid1);
        // Next one goes to mid2.
        assert_eq!(a.allocate(128).unwrap(), mid2);
        // A 64-byte request now takes the start of the lowest 256-byte hole.
        assert_eq!(
            a.allocate(64).unwrap(),
            Block {
                offset: big1.offset,
                len: 64
            }
        );
        // 192 fits exactly in the remainder of big1.
        assert_eq!(
            a.allocate(192).unwrap(),
            Block {
                offset: big1.offset + 64,
                len: 192
            }
        );
        assert_eq!(a.allocate(256).unwrap(), big2);
        check(&a);
    }

    #[test]
    fn high_water_tracks_highest_block() {
        let mut a = Allocator::new(4096);
        assert_eq!(a.high_water(), 0);
        let x = a.allocate(64).unwrap();
        let y = a.allocate(200).unwrap();
        assert_eq!(a.high_water(), 64 + 256);
        a.free(x).unwrap();
        assert_eq!(a.high_water(), 320);
        a.free(y).unwrap();
        assert_eq!(a.high_water(), 0);
        let z = a.allocate(4096).unwrap();
        assert_eq!(a.high_water(), 4096);
        a.free(z).unwrap();
        assert_eq!(a.high_water(), 0);
    }

    #[test]
    fn capacity_rounded_down() {
        let a = Allocator::new(1000);
        assert_eq!(a.capacity(), 960);
        assert_eq!(a.stats().capacity, 960);
        assert_eq!(a.stats().largest_free, 960);
        assert_eq!(Allocator::new(63).capacity(), 0);
        assert_eq!(Allocator::new(63).stats().free_blocks, 0);
        let mut a = Allocator::new(1000);
        assert!(matches!(a.allocate(961), Err(AllocError::NoSpace { .. })));
        assert_eq!(
            a.allocate(960).unwrap(),
            Block {
                offset: 0,
                len: 960
            }
        );
    }

    #[test]
    fn huge_requests_do_not_overflow() {
        let cap = u64::MAX; // rounds down to u64::MAX - 63
        let mut a = Allocator::new(cap);
        assert_eq!(a.capacity(), u64::MAX - (ALIGN - 1));
        for size in [u64::MAX, u64::MAX - 1, u64::MAX - 62] {
            assert_eq!(
                a.allocate(size),
                Err(AllocError::NoSpace {
                    requested: size,
                    free: a.capacity(),
                    largest_free: a.capacity(),
                })
            );
        }
        // The whole (rounded) arena is allocatable, and high_water is its end.
        let all = a.allocate(u64::MAX - 63).unwrap();
        assert_eq!(all.end(), u64::MAX - (ALIGN - 1));
        assert_eq!(a.high_water(), all.end());
        a.free(all).unwrap();

        // Hundreds of GiB.
        let mut a = Allocator::new(300 << 30);
        let b = a.allocate(200 << 30).unwrap();
        assert_eq!(
            a.allocate(200 << 30),
            Err(AllocError::NoSpace {
                requested: 200 << 30,
                free: 100 << 30,
                largest_free: 100 << 30,
            })
        );
        a.free(b).unwrap();
        assert!(matches!(
            a.allocate(u64::MAX),
            Err(AllocError::NoSpace { .. })
        ));
        check(&a);
    }
}
