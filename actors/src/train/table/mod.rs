//! A compact open-addressing hash table from `u64` feature keys to a small
//! fixed-size per-key state, the storage behind a parameter-server shard.
//!
//! # Layout and memory
//!
//! Slots are `{ key: u64, state: S }` in one `Vec`, probed linearly from the
//! key's home slot (one cache line per lookup in the common case). With the
//! FTRL state `[f32; 2]` a slot is 16 bytes. The slot count is a power of two
//! and the table doubles as soon as an insert would push the load factor
//! (live keys / slots) above [`MAX_LOAD`] = 3/4. So, while keys are only
//! added, a table that has doubled at least once has a load factor in
//! `(3/8, 3/4]` (removals lower it; the table never shrinks), and
//!
//! ```text
//! bytes per live key = slot size / load factor
//!                    = 16 / load  ∈ [21.3, 42.7)   for 16-byte slots
//!                    ≤ 32          exactly when load ≥ 1/2
//! ```
//!
//! Right after a doubling the load is just above 3/8 (42.7 B/key); it
//! reaches 1/2 (32 B/key) once a third of the new slots have filled, i.e.
//! `len ≥ capacity / 2`. A table that must *hold* the 32 B/key budget keeps
//! its live keys in `[capacity/2, 3/4 · capacity]`: size it up front with
//! [`ParamTable::with_capacity`] (the smallest power of two ≥ 8 with
//! `keys ≤ 3/4 · slots`) and let a capacity-eviction policy cap the live
//! keys at `3/4 · capacity`, which is where the table would otherwise
//! double. [`ParamTable::bytes_per_key`] reports the live figure: heap
//! bytes (all slots, empty ones included) over live keys. The table header
//! (`size_of::<ParamTable<S>>()`, a few dozen bytes) is per table, not per
//! key.
//!
//! A lookup in a table larger than the cache is one cache miss. Row and
//! batch loops call [`ParamTable::prefetch`] on their keys first, so those
//! misses overlap instead of queuing behind the probe loop's branches.
//!
//! # Key 0, removal, hooks
//!
//! * The slot key `0` marks an empty slot; the real key 0 lives in a separate
//!   side slot, so every `u64` is a valid key.
//! * [`ParamTable::remove`] uses *backward-shift deletion* (no tombstones):
//!   the entries after the hole in the same probe run move back when that
//!   shortens their probe distance, so lookups never walk over dead slots and
//!   the load factor counts live keys only.
//! * Admission and eviction policies are left to the caller: a push path
//!   that should admit only keys seen often enough calls
//!   [`ParamTable::get`] first and [`ParamTable::get_or_insert_default`]
//!   only once the key is admitted; eviction (TTL, capacity) is
//!   [`ParamTable::retain`] over a state that carries whatever the policy
//!   needs (e.g. a last-seen epoch).
//!
//! # Snapshots
//!
//! [`ParamTable::to_bytes`] writes the live entries (not the empty slots)
//! with the slot count; [`ParamTable::from_bytes`] rebuilds the same layout,
//! so `to_bytes(from_bytes(b)) == b` byte for byte. (Except for a table
//! both larger than 65,536 slots and more than 16 times sparser than its
//! entries need: the slot count is a length field its entries do not back,
//! so such a table is rebuilt with the slots its entries need.)

mod shared;

use shared::SharedSlots;
pub use shared::{SharedSlotsError, SlotsView};
use std::fmt;
use std::mem::size_of;
use std::os::fd::RawFd;

/// The load factor (live keys / slots) above which the table doubles.
pub const MAX_LOAD: f64 = 0.75;

/// The smallest slot count a table allocates.
const MIN_SLOTS: usize = 8;

/// The slot key that marks an empty slot (the real key 0 lives in a side slot).
const EMPTY: u64 = 0;

/// A snapshot's slot count is kept as written up to this many slots ...
const MAX_TRUSTED_SLOTS: usize = 1 << 16;

/// ... or up to this many times the slots its entries need; a sparser
/// table is rebuilt with the slots its entries need.
const SPARSE_LIMIT: usize = 16;

/// The fewest slots (a power of two, at least [`MIN_SLOTS`]) that hold
/// `entries` keys (one of which may be key 0, kept aside) within the load
/// factor.
fn slots_for(entries: u64) -> usize {
    let mut n = MIN_SLOTS;
    while ((n / 4 * 3) as u64) < entries.saturating_sub(1) {
        match n.checked_mul(2) {
            Some(next) => n = next,
            None => break,
        }
    }
    n
}

/// Snapshot magic: "BRPT" (braid parameter table).
const MAGIC: [u8; 4] = *b"BRPT";

/// Snapshot format version.
const VERSION: u8 = 1;

/// Snapshot header: magic, version, state width (u32), slot count (u64),
/// entry count (u64).
const HEADER_LEN: usize = 4 + 1 + 4 + 8 + 8;

/// A fixed-size, plain per-key state that a [`ParamTable`] stores and can
/// write into a snapshot.
///
/// `Default` must be the state of a key never updated (for the optimizers,
/// weight 0), because readers treat an absent key as the default state.
pub trait SlotState: Copy + Default {
    /// Bytes one state takes in a snapshot.
    const ENCODED_LEN: usize;

    /// Writes exactly [`Self::ENCODED_LEN`] bytes (little-endian) to the
    /// start of `out`, which holds at least that many.
    fn encode(&self, out: &mut [u8]);

    /// Reads a state back from exactly [`Self::ENCODED_LEN`] bytes written by
    /// [`SlotState::encode`].
    fn decode(bytes: &[u8]) -> Self;

    /// The state whose encoding is the [`Self::ENCODED_LEN`]` / 4` 32-bit
    /// words `word(0)`, `word(1)`, …: how a reader of shared memory
    /// builds a state from the words it loaded one at a time.
    fn from_words(mut word: impl FnMut(usize) -> u32) -> Self {
        let bytes: Vec<u8> = (0..Self::ENCODED_LEN / 4)
            .flat_map(|i| word(i).to_le_bytes())
            .collect();
        Self::decode(&bytes)
    }
}

impl SlotState for f32 {
    const ENCODED_LEN: usize = 4;

    fn encode(&self, out: &mut [u8]) {
        if let Some(dst) = out.get_mut(..4) {
            dst.copy_from_slice(&self.to_bits().to_le_bytes());
        }
    }

    fn decode(bytes: &[u8]) -> Self {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[..4]);
        f32::from_bits(u32::from_le_bytes(b))
    }

    #[inline]
    fn from_words(mut word: impl FnMut(usize) -> u32) -> Self {
        f32::from_bits(word(0))
    }
}

impl<const N: usize> SlotState for [f32; N]
where
    [f32; N]: Default,
{
    const ENCODED_LEN: usize = 4 * N;

    fn encode(&self, out: &mut [u8]) {
        for (v, dst) in self.iter().zip(out.chunks_exact_mut(4)) {
            v.encode(dst);
        }
    }

    fn decode(bytes: &[u8]) -> Self {
        let mut s = [0f32; N];
        for (v, chunk) in s.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::decode(chunk);
        }
        s
    }

    #[inline]
    fn from_words(mut word: impl FnMut(usize) -> u32) -> Self {
        std::array::from_fn(|i| f32::from_bits(word(i)))
    }
}

/// Why a snapshot could not be read back by [`ParamTable::from_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the header or an entry does.
    #[error("snapshot truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the snapshot claims to hold.
        needed: usize,
        /// Bytes actually given.
        have: usize,
    },
    /// The bytes go on after the last entry.
    #[error("snapshot has {extra} bytes after its last entry")]
    TrailingBytes {
        /// Bytes after the last entry.
        extra: usize,
    },
    /// The bytes do not start with the parameter-table magic.
    #[error("not a parameter-table snapshot (bad magic)")]
    BadMagic,
    /// The snapshot was written by an unknown format version.
    #[error("unsupported snapshot version {0}")]
    UnsupportedVersion(u8),
    /// The snapshot's per-key state has another size than this table's.
    #[error("snapshot state is {found} bytes per key, this table's is {expected}")]
    StateWidth {
        /// This table's [`SlotState::ENCODED_LEN`].
        expected: usize,
        /// The snapshot's.
        found: usize,
    },
    /// The slot count is not a power of two ≥ 8, or too small for the
    /// entries at the maximum load factor.
    #[error("snapshot slot count {slots} is invalid for {entries} entries")]
    BadCapacity {
        /// Slot count in the snapshot.
        slots: u64,
        /// Entry count in the snapshot.
        entries: u64,
    },
    /// A key appears twice.
    #[error("snapshot holds key {0} twice")]
    DuplicateKey(u64),
}

/// Starts loading the cache line holding `*value` without waiting for it
/// (a no-op off x86_64): for loops that know their next addresses.
#[inline]
pub(crate) fn prefetch_line<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let at: *const T = value;
        // SAFETY: PREFETCHT0 is an SSE instruction, which every x86_64 CPU
        // has (SSE2 is part of the architecture's baseline). It is a hint:
        // it reads nothing the program observes and cannot fault, and `at`
        // comes from a live reference anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                at.cast::<i8>(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// The [`SlotRef`] of key 0's side slot.
const ZERO_SLOT: usize = usize::MAX;

/// Where a key's state lives in a [`ParamTable`]: a slot index, or key 0's
/// side slot. Lets a row loop probe once and update later without a second
/// lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotRef(usize);

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Slot<S> {
    key: u64,
    state: S,
}

/// An open-addressing (linear probing) hash table from `u64` keys to a small
/// `Copy` state; see the [module docs](self) for layout, memory bound,
/// deletion and snapshot format.
///
/// The slot array sits on transparent huge pages where the kernel offers
/// them, and [`Clone::clone_from`] reuses the target's array, so a
/// checkpoint's copy into a kept buffer neither allocates nor faults.
pub struct ParamTable<S> {
    slots: SlotArray<S>,
    /// `slots.len() - 1`; the slot count is a power of two.
    mask: usize,
    /// `64 - log2(slots.len())`: the home slot is the top bits of the hash.
    shift: u32,
    /// Live keys in `slots` (the side slot not counted).
    in_slots: usize,
    /// Inserts allowed before the next doubling: `slots.len() * 3 / 4`.
    max_in_slots: usize,
    /// The state of key 0, which cannot live in `slots` (0 marks empty).
    zero: Option<S>,
}

/// Where a table's slots live: on the heap, or in shared memory that other
/// processes on the machine read ([`ParamTable::share`]).
enum SlotArray<S> {
    Heap(Vec<Slot<S>>),
    Shared(SharedSlots<S>),
}

impl<S: SlotState> SlotArray<S> {
    /// `n` empty slots where `like`'s are: in a new shared file when
    /// `like` is shared (on the heap if that file cannot be made).
    fn empty_like(like: Option<&Self>, n: usize) -> Self {
        let empty = Slot {
            key: EMPTY,
            state: S::default(),
        };
        if let Some(SlotArray::Shared(_)) = like {
            match SharedSlots::empty(n) {
                Ok(shared) => return SlotArray::Shared(shared),
                Err(e) => tracing::warn!("a table's slots stay private: {e}"),
            }
        }
        SlotArray::Heap(super::hugepages::filled(n, empty))
    }

    /// Bytes of memory the slots hold.
    fn bytes(&self) -> usize {
        match self {
            SlotArray::Heap(v) => v.capacity() * size_of::<Slot<S>>(),
            SlotArray::Shared(s) => std::mem::size_of_val(s.slots()),
        }
    }
}

impl<S: SlotState> std::ops::Deref for SlotArray<S> {
    type Target = [Slot<S>];
    fn deref(&self) -> &[Slot<S>] {
        match self {
            SlotArray::Heap(v) => v,
            SlotArray::Shared(s) => s.slots(),
        }
    }
}

impl<S: SlotState> std::ops::DerefMut for SlotArray<S> {
    fn deref_mut(&mut self) -> &mut [Slot<S>] {
        match self {
            SlotArray::Heap(v) => v,
            SlotArray::Shared(s) => s.slots_mut(),
        }
    }
}

/// Mixes a key into a 64-bit hash whose top bits pick the home slot. Keys
/// are usually hashed ids already, but small integers (tests, dense ids)
/// must spread too: fold the high half down, then one odd multiply
/// (Fibonacci hashing) carries every low bit into the top bits. It must
/// differ from the shard-placement hash (`sharding`, splitmix64): a shard
/// owns arcs of that hash's ring, so reusing it here would leave most home
/// slots of a shard's table unused.
#[inline]
fn mix(key: u64) -> u64 {
    (key ^ (key >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<S: SlotState> Clone for ParamTable<S> {
    fn clone(&self) -> Self {
        Self {
            slots: SlotArray::Heap(super::hugepages::copied(&self.slots)),
            mask: self.mask,
            shift: self.shift,
            in_slots: self.in_slots,
            max_in_slots: self.max_in_slots,
            zero: self.zero,
        }
    }

    fn clone_from(&mut self, source: &Self) {
        match &mut self.slots {
            SlotArray::Heap(v) if v.capacity() >= source.slots.len() => {
                v.clear();
                v.extend_from_slice(&source.slots);
            }
            SlotArray::Shared(s) if s.slots().len() == source.slots.len() => {
                s.slots_mut().copy_from_slice(&source.slots);
            }
            _ => {
                *self = source.clone();
                return;
            }
        }
        self.mask = source.mask;
        self.shift = source.shift;
        self.in_slots = source.in_slots;
        self.max_in_slots = source.max_in_slots;
        self.zero = source.zero;
    }
}

impl<S: SlotState> Default for ParamTable<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: SlotState> ParamTable<S> {
    /// An empty table with the minimum slot count (8).
    pub fn new() -> Self {
        Self::with_slots(MIN_SLOTS)
    }

    /// An empty table that holds `keys` live keys without growing: the
    /// smallest power-of-two slot count (≥ 8) with `keys ≤ 3/4 · slots`.
    pub fn with_capacity(keys: usize) -> Self {
        Self::with_slots(Self::slots_for(keys))
    }

    fn slots_for(keys: usize) -> usize {
        // slots * 3 / 4 >= keys  <=>  slots >= ceil(keys * 4 / 3)
        let need = keys.saturating_mul(4).div_ceil(3);
        need.max(MIN_SLOTS).next_power_of_two()
    }

    fn with_slots(n: usize) -> Self {
        Self::with_slots_like(None, n)
    }

    /// An empty table of `n` slots, shared when `like` is.
    fn with_slots_like(like: Option<&SlotArray<S>>, n: usize) -> Self {
        debug_assert!(n.is_power_of_two() && n >= MIN_SLOTS);
        Self {
            slots: SlotArray::empty_like(like, n),
            mask: n - 1,
            shift: 64 - n.trailing_zeros(),
            in_slots: 0,
            max_in_slots: n / 4 * 3,
            zero: None,
        }
    }

    /// Live keys.
    #[inline]
    pub fn len(&self) -> usize {
        self.in_slots + usize::from(self.zero.is_some())
    }

    /// True when no key is live.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot count (a power of two). The table holds `3/4` of this many keys
    /// (plus key 0) before it doubles.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Live keys / slots.
    pub fn load_factor(&self) -> f64 {
        self.in_slots as f64 / self.slots.len() as f64
    }

    /// Bytes the table holds: its slot array.
    pub fn bytes(&self) -> usize {
        self.slots.bytes()
    }

    /// Heap bytes per live key: [`Self::bytes`] (every slot, empty ones
    /// included) over [`Self::len`]; `16 / load factor` for 16-byte slots.
    /// Infinite for an empty table.
    pub fn bytes_per_key(&self) -> f64 {
        self.bytes() as f64 / self.len() as f64
    }

    /// Bytes one slot takes (16 for `[f32; 2]`).
    pub const fn slot_bytes() -> usize {
        size_of::<Slot<S>>()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (mix(key) >> self.shift) as usize
    }

    /// `Ok(slot)` holding `key`, or `Err(slot)`: the empty slot that ends
    /// its probe run. `key` must not be 0. Terminates because the load
    /// factor is ≤ 3/4, so there is always an empty slot.
    #[inline]
    fn find(&self, key: u64) -> Result<usize, usize> {
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Ok(i);
            }
            if k == EMPTY {
                return Err(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The state of `key`, if present.
    #[inline]
    pub fn get(&self, key: u64) -> Option<&S> {
        if key == 0 {
            return self.zero.as_ref();
        }
        match self.find(key) {
            Ok(i) => Some(&self.slots[i].state),
            Err(_) => None,
        }
    }

    /// The state of `key` for update, if present (never inserts).
    #[inline]
    pub fn get_mut(&mut self, key: u64) -> Option<&mut S> {
        if key == 0 {
            return self.zero.as_mut();
        }
        match self.find(key) {
            Ok(i) => Some(&mut self.slots[i].state),
            Err(_) => None,
        }
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// The state of `key`, inserting `S::default()` first if absent (growing
    /// the table if the insert would take the load above 3/4). This is the
    /// admission point: a policy that admits keys only after N sightings
    /// checks before calling this.
    #[inline]
    pub fn get_or_insert_default(&mut self, key: u64) -> &mut S {
        let at = self.locate_or_insert(key);
        self.state_mut(at)
    }

    /// Where `key`'s state lives, inserting the default state first if the
    /// key is absent. The returned [`SlotRef`] stays valid until the next
    /// insert that grows the table, or the next removal; call
    /// [`Self::reserve`] first to hold several across inserts.
    #[inline]
    pub(crate) fn locate_or_insert(&mut self, key: u64) -> SlotRef {
        if key == 0 {
            self.zero.get_or_insert_with(S::default);
            return SlotRef(ZERO_SLOT);
        }
        SlotRef(match self.find(key) {
            Ok(i) => i,
            Err(i) => self.insert_new(key, i),
        })
    }

    /// Where `key`'s state lives, if it is present (never inserts); valid
    /// like [`Self::locate_or_insert`]'s answer.
    #[inline]
    pub(crate) fn locate(&self, key: u64) -> Option<SlotRef> {
        if key == 0 {
            return self.zero.map(|_| SlotRef(ZERO_SLOT));
        }
        self.find(key).ok().map(SlotRef)
    }

    /// True when `additional` more keys fit without the table growing.
    #[inline]
    pub(crate) fn has_room(&self, additional: usize) -> bool {
        self.in_slots.saturating_add(additional) <= self.max_in_slots
    }

    /// The state at `at`, from [`Self::locate_or_insert`] since the last
    /// growth or removal.
    #[inline]
    pub(crate) fn state(&self, at: SlotRef) -> S {
        if at.0 == ZERO_SLOT {
            return self.zero.unwrap_or_default();
        }
        self.slots[at.0].state
    }

    /// The state at `at` for update (see [`Self::state`]).
    #[inline]
    pub(crate) fn state_mut(&mut self, at: SlotRef) -> &mut S {
        if at.0 == ZERO_SLOT {
            return self.zero.get_or_insert_with(S::default);
        }
        &mut self.slots[at.0].state
    }

    /// Loads the home slot of each key, so that the lookups that follow
    /// find them in cache: the loads here carry no data-dependent branch,
    /// so the CPU overlaps their cache misses, which a probe loop's
    /// mispredicted `key ==` branches would otherwise serialize. Worth it
    /// for a row or batch of keys on a table larger than the cache.
    #[inline]
    pub fn prefetch(&self, keys: &[u64]) {
        let mut acc = 0u64;
        for &k in keys {
            acc ^= self.slots[self.home(k)].key;
        }
        std::hint::black_box(acc);
    }

    /// Starts loading `key`'s home slot into the cache without waiting for
    /// it: issued a row ahead, the row's probes then hit the cache, and
    /// unlike [`Self::prefetch`] nothing stalls on the load.
    #[inline]
    pub fn prefetch_ahead(&self, key: u64) {
        prefetch_line(&self.slots[self.home(key)]);
    }

    /// Sets the state of `key`, returning the previous one.
    pub fn insert(&mut self, key: u64, state: S) -> Option<S> {
        if key == 0 {
            return self.zero.replace(state);
        }
        match self.find(key) {
            Ok(i) => Some(std::mem::replace(&mut self.slots[i].state, state)),
            Err(i) => {
                let i = self.insert_new(key, i);
                self.slots[i].state = state;
                None
            }
        }
    }

    /// Writes absent `key` (not 0) with the default state at the empty slot
    /// `empty` found by `find`, growing first if needed; returns its slot.
    #[inline]
    fn insert_new(&mut self, key: u64, empty: usize) -> usize {
        let mut i = empty;
        if self.in_slots >= self.max_in_slots {
            self.grow_to(self.slots.len() * 2);
            i = match self.find(key) {
                Ok(i) | Err(i) => i,
            };
        }
        self.slots[i] = Slot {
            key,
            state: S::default(),
        };
        self.in_slots += 1;
        i
    }

    /// Makes room for `additional` more keys without growing in between.
    #[inline]
    pub fn reserve(&mut self, additional: usize) {
        if self.in_slots.saturating_add(additional) <= self.max_in_slots {
            return;
        }
        let want = Self::slots_for(self.in_slots.saturating_add(additional));
        if want > self.slots.len() {
            self.grow_to(want);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow_to(&mut self, n: usize) {
        let mut bigger = Self::with_slots_like(Some(&self.slots), n);
        for s in self.slots.iter() {
            if s.key != EMPTY {
                if let Err(i) = bigger.find(s.key) {
                    bigger.slots[i] = *s;
                }
            }
        }
        bigger.in_slots = self.in_slots;
        bigger.zero = self.zero;
        *self = bigger;
    }

    /// Removes `key`, returning its state (backward-shift deletion: no
    /// tombstones are left behind).
    pub fn remove(&mut self, key: u64) -> Option<S> {
        if key == 0 {
            return self.zero.take();
        }
        let i = self.find(key).ok()?;
        let state = self.slots[i].state;
        self.remove_at(i);
        Some(state)
    }

    /// Empties slot `hole` and closes the gap: each later entry of the same
    /// probe run whose home lies at or before the hole (cyclically) moves
    /// into it, leaving its own slot as the next hole. Entries only ever
    /// move backwards, into slots at or after `hole`.
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let key = self.slots[j].key;
            if key == EMPTY {
                break;
            }
            let home = self.home(key);
            // The entry at j may fill the hole iff its home is not in the
            // cyclic range (hole, j]: distance home→j ≥ distance hole→j.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = Slot {
            key: EMPTY,
            state: S::default(),
        };
        self.in_slots -= 1;
    }

    /// An empty slot: one exists because the load factor is ≤ 3/4.
    fn an_empty_slot(&self) -> usize {
        self.slots
            .iter()
            .position(|s| s.key == EMPTY)
            .unwrap_or_default()
    }

    /// Keeps only the keys for which `keep(key, &mut state)` returns true,
    /// calling it exactly once per live key (it may also update the state).
    /// The eviction hook: a TTL or capacity policy is a predicate over the
    /// key and a state that carries what the policy needs.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &mut S) -> bool) {
        if let Some(z) = self.zero.as_mut() {
            if !keep(0, z) {
                self.zero = None;
            }
        }
        // Scan cyclically from just after an empty slot: a probe run never
        // crosses an empty slot, so backward shifts only move entries from
        // not-yet-visited slots into the current one, which is re-examined;
        // no entry is visited twice or skipped.
        let n = self.slots.len();
        let start = (self.an_empty_slot() + 1) & self.mask;
        let mut step = 0;
        while step < n {
            let i = (start + step) & self.mask;
            let slot = &mut self.slots[i];
            if slot.key != EMPTY && !keep(slot.key, &mut slot.state) {
                self.remove_at(i);
                continue;
            }
            step += 1;
        }
    }

    /// Moves the slots into shared memory (a `memfd`), where processes on
    /// this machine can map them read-only ([`SlotsView`]); the table grows
    /// into shared memory from then on. A no-op if already shared.
    pub fn share(&mut self) -> Result<(), SharedSlotsError> {
        if let SlotArray::Shared(_) = self.slots {
            return Ok(());
        }
        let mut shared = SharedSlots::empty(self.slots.len())?;
        shared.slots_mut().copy_from_slice(&self.slots);
        shared.set_side(self.zero);
        self.slots = SlotArray::Shared(shared);
        Ok(())
    }

    /// The descriptor of the shared slots ([`Self::share`]), if shared.
    pub fn shared_fd(&self) -> Option<RawFd> {
        match &self.slots {
            SlotArray::Shared(s) => Some(s.fd()),
            SlotArray::Heap(_) => None,
        }
    }

    /// Copies key 0's state into the shared slots' side slot, where
    /// readers look for it (key 0 lives outside the slot array).
    pub fn publish_side(&mut self) {
        if let SlotArray::Shared(s) = &mut self.slots {
            s.set_side(self.zero);
        }
    }

    /// Removes every key, keeping the slot array.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = Slot {
                key: EMPTY,
                state: S::default(),
            };
        }
        self.in_slots = 0;
        self.zero = None;
    }

    /// Every live `(key, &state)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &S)> + '_ {
        self.zero.iter().map(|s| (0, s)).chain(
            self.slots
                .iter()
                .filter(|s| s.key != EMPTY)
                .map(|s| (s.key, &s.state)),
        )
    }

    /// Every live `(key, &mut state)`, in no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut S)> + '_ {
        self.zero.iter_mut().map(|s| (0, s)).chain(
            self.slots
                .iter_mut()
                .filter(|s| s.key != EMPTY)
                .map(|s| (s.key, &mut s.state)),
        )
    }

    /// Bytes [`Self::to_bytes`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.len() * (8 + S::ENCODED_LEN)
    }

    /// A snapshot for checkpoints: header, then every live entry as
    /// `key (u64 LE) ‖ state`. Key 0 comes first; the others in slot order
    /// starting just after an empty slot, which is an order in which
    /// re-inserting them into the same slot count rebuilds the same layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// Appends [`Self::to_bytes`]'s encoding to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(S::ENCODED_LEN as u32).to_le_bytes());
        out.extend_from_slice(&(self.slots.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        let entry = 8 + S::ENCODED_LEN;
        let mut at = out.len();
        let end = at + self.len() * entry;
        // Room for every entry, and one more: every slot is written at the
        // cursor, which moves past it only if the slot is live (a branch on
        // a half-full table would mispredict every other slot).
        out.resize(at + (self.len() + 1) * entry, 0);
        if let Some(z) = &self.zero {
            if let Some(dst) = out.get_mut(at..at + entry) {
                dst[..8].copy_from_slice(&0u64.to_le_bytes());
                z.encode(&mut dst[8..]);
            }
            at += entry;
        }
        let start = (self.an_empty_slot() + 1).min(self.slots.len());
        let (before, after) = self.slots.split_at(start);
        for s in after.iter().chain(before) {
            if let Some(dst) = out.get_mut(at..at + entry) {
                dst[..8].copy_from_slice(&s.key.to_le_bytes());
                s.state.encode(&mut dst[8..]);
            }
            at += entry * usize::from(s.key != EMPTY);
        }
        debug_assert_eq!(at, end, "the live slots are the table's length");
        out.truncate(at);
    }

    /// Reads a snapshot written by [`Self::to_bytes`] back into a table with
    /// the same slot count, contents and layout.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let width = r.u32()? as usize;
        if width != S::ENCODED_LEN {
            return Err(DecodeError::StateWidth {
                expected: S::ENCODED_LEN,
                found: width,
            });
        }
        let slots = r.u64()?;
        let entries = r.u64()?;
        let bad = DecodeError::BadCapacity { slots, entries };
        let n = usize::try_from(slots).map_err(|_| bad.clone())?;
        // Any power of two is a legal slot count (a table never shrinks, so
        // it may be far larger than its entries need) as long as it can be
        // allocated; the entries must fit at the maximum load factor (plus
        // key 0 in its side slot).
        let allocatable = n
            .checked_mul(size_of::<Slot<S>>())
            .is_some_and(|b| b <= isize::MAX as usize);
        if !n.is_power_of_two()
            || n < MIN_SLOTS
            || !allocatable
            || entries.saturating_sub(1) > (n / 4 * 3) as u64
        {
            return Err(bad);
        }
        // A table never shrinks, so a legitimate snapshot may be sparse;
        // but the slot count is a length field the entries do not back. A
        // table much sparser than its entries need is rebuilt with the
        // slots they need, so no snapshot allocates beyond what its bytes
        // justify (found by `train_fuzz`: 25 bytes asked for 2^40 slots).
        let n = if n > MAX_TRUSTED_SLOTS.max(slots_for(entries).saturating_mul(SPARSE_LIMIT)) {
            slots_for(entries)
        } else {
            n
        };
        let entry_len = 8 + S::ENCODED_LEN;
        let needed = usize::try_from(entries)
            .ok()
            .and_then(|e| e.checked_mul(entry_len))
            .and_then(|b| b.checked_add(HEADER_LEN))
            .unwrap_or(usize::MAX);
        if needed > bytes.len() {
            return Err(DecodeError::Truncated {
                needed,
                have: bytes.len(),
            });
        }
        if needed < bytes.len() {
            return Err(DecodeError::TrailingBytes {
                extra: bytes.len() - needed,
            });
        }
        let mut table = Self::with_slots(n);
        for _ in 0..entries {
            let key = r.u64()?;
            let state = S::decode(r.take(S::ENCODED_LEN)?);
            if key == 0 {
                if table.zero.replace(state).is_some() {
                    return Err(DecodeError::DuplicateKey(0));
                }
                continue;
            }
            match table.find(key) {
                Ok(_) => return Err(DecodeError::DuplicateKey(key)),
                Err(i) => {
                    if table.in_slots >= table.max_in_slots {
                        return Err(bad);
                    }
                    table.slots[i] = Slot { key, state };
                    table.in_slots += 1;
                }
            }
        }
        Ok(table)
    }
}

impl<S: SlotState + fmt::Debug> fmt::Debug for ParamTable<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParamTable")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.saturating_add(n);
        let chunk = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated {
                needed: end,
                have: self.bytes.len(),
            })?;
        self.pos = end;
        Ok(chunk)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry is reachable from its home without crossing an empty slot.
    fn check_invariants<S: SlotState>(t: &ParamTable<S>) {
        let mut live = 0;
        for (i, s) in t.slots.iter().enumerate() {
            if s.key == EMPTY {
                continue;
            }
            live += 1;
            let mut j = t.home(s.key);
            while j != i {
                assert_ne!(t.slots[j].key, EMPTY, "gap in the probe run of {}", s.key);
                j = (j + 1) & t.mask;
            }
        }
        assert_eq!(live, t.in_slots);
        assert!(t.in_slots <= t.max_in_slots);
    }

    /// Found by `train_fuzz`: a 25-byte snapshot of no entries claiming
    /// 2^40 slots made `from_bytes` allocate 16 TiB (an abort).
    #[test]
    fn a_huge_slot_count_without_entries_allocates_nothing() {
        let mut bytes = ParamTable::<[f32; 2]>::new().to_bytes();
        bytes[9..17].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let t = ParamTable::<[f32; 2]>::from_bytes(&bytes).unwrap();
        assert_eq!((t.len(), t.capacity()), (0, MIN_SLOTS));
        // A sparse table of a legitimate size keeps its layout.
        let mut t = ParamTable::<f32>::new();
        for k in 1..=40_000u64 {
            t.get_or_insert_default(k);
        }
        t.retain(|k, _| k % 1000 == 0);
        let bytes = t.to_bytes();
        assert_eq!(
            ParamTable::<f32>::from_bytes(&bytes).unwrap().to_bytes(),
            bytes
        );
    }

    #[test]
    fn removes_keep_probe_runs_intact_across_the_wrap() {
        let mut t = ParamTable::<f32>::new();
        // Keys whose homes are the last slot, so their run wraps to slot 0.
        let keys: Vec<u64> = (1..10_000u64).filter(|&k| t.home(k) == 7).take(4).collect();
        for (n, &k) in keys.iter().enumerate() {
            *t.get_or_insert_default(k) = n as f32;
        }
        check_invariants(&t);
        assert_eq!(t.remove(keys[0]), Some(0.0));
        check_invariants(&t);
        for (n, &k) in keys.iter().enumerate().skip(1) {
            assert_eq!(t.get(k), Some(&(n as f32)));
        }
    }

    #[test]
    fn retain_visits_every_key_once_and_keeps_invariants() {
        let mut t = ParamTable::<f32>::new();
        for k in 0..1000u64 {
            *t.get_or_insert_default(k) = k as f32;
        }
        let mut seen = std::collections::HashSet::new();
        t.retain(|k, _| {
            assert!(seen.insert(k), "key {k} visited twice");
            k % 3 != 0
        });
        assert_eq!(seen.len(), 1000);
        check_invariants(&t);
        assert_eq!(t.len(), 1000 - 334);
        assert!(t.iter().all(|(k, s)| k % 3 != 0 && *s == k as f32));
    }

    #[test]
    fn growth_keeps_load_in_range() {
        let mut t = ParamTable::<[f32; 2]>::new();
        assert_eq!(ParamTable::<[f32; 2]>::slot_bytes(), 16);
        for k in 1..=100_000u64 {
            t.get_or_insert_default(k.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let load = t.load_factor();
            assert!(load <= MAX_LOAD);
            if t.capacity() > MIN_SLOTS {
                assert!(load > 0.375);
            }
        }
        check_invariants(&t);
    }
}
