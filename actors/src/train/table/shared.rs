//! A table's slots in shared memory, so that processes on the same machine
//! read a shard's parameters in place ([`SlotsView`]) while the shard's own
//! process updates them ([`SharedSlots`], one writer).
//!
//! The slots live in a `memfd` after a one-page header: the slot count,
//! the slot size, a `moved` flag and, after the `n` slots, key 0's side
//! slot (its key field 1 when key 0 is present). The owner writes with
//! plain stores through its exclusive `&mut` (the only writable mapping);
//! readers map the file read-only through `/proc/<pid>/fd/<fd>` and load
//! each word atomically, so a read racing an update sees each word either
//! before or after it, never an invalid value. When the table grows, the
//! owner moves its slots into a new file and sets the old one's `moved`
//! flag, and readers follow the shard's page
//! ([`ShardPage`](crate::train::shard_page)) to the new one.
//!
//! Whether a read sees a consistent table is up to the caller: a shard
//! publishes its clocks after its updates (a release store) and a reader
//! reads after it has seen the clock it needs (an acquire load).

use super::{mix, Slot, SlotState, EMPTY};
use rustix::fs::MemfdFlags;
use std::marker::PhantomData;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: u64 = 0x6272_6169_6473_6c74;
const PAGE: usize = 4096;
/// The largest slot a view reads (bytes).
const MAX_SLOT_BYTES: usize = 256;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    slots: AtomicU64,
    slot_bytes: AtomicU64,
    moved: AtomicU32,
}

const _: () = assert!(size_of::<Header>() <= PAGE);

/// Why a table's shared slots could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum SharedSlotsError {
    /// The file could not be created, opened or mapped.
    #[error("shared table {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a table of this slot type.
    #[error("{0} is not a shared table of the expected shape")]
    NotATable(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SharedSlotsError {
    let what = what.into();
    move |source| SharedSlotsError::Io { what, source }
}

/// Takes the answer to advice that the table's pages be huge: where the
/// kernel backs shared memory with huge pages on advice
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise` or
/// `within_size`), random probes miss the TLB far less, as the private
/// tables' do ([`hugepages`](crate::train::hugepages)); elsewhere the
/// table works on small pages.
fn huge_pages(advised: std::io::Result<()>) {
    if let Err(e) = advised {
        tracing::debug!("a shared table stays on small pages: {e}");
    }
}

fn file_len<S>(slots: usize) -> Option<usize> {
    slots
        .checked_add(1)?
        .checked_mul(size_of::<Slot<S>>())?
        .checked_add(PAGE)
}

/// A table's slot array in a `memfd` this process owns and writes.
pub(crate) struct SharedSlots<S> {
    fd: OwnedFd,
    map: memmap2::MmapRaw,
    len: usize,
    _slots: PhantomData<S>,
}

impl<S: SlotState> SharedSlots<S> {
    /// `n` empty slots (key [`EMPTY`], the default state).
    pub(crate) fn empty(n: usize) -> Result<Self, SharedSlotsError> {
        let len = file_len::<S>(n).ok_or_else(|| SharedSlotsError::NotATable("too big".into()))?;
        let fd = rustix::fs::memfd_create("braid-table", MemfdFlags::CLOEXEC)
            .map_err(|e| io("create")(e.into()))?;
        let file = std::fs::File::from(fd);
        file.set_len(len as u64).map_err(io("size"))?;
        let map = memmap2::MmapRaw::map_raw(&file).map_err(io("map"))?;
        huge_pages(map.advise(memmap2::Advice::HugePage));
        let mut shared = SharedSlots {
            fd: file.into(),
            map,
            len: n,
            _slots: PhantomData,
        };
        let empty = Slot {
            key: EMPTY,
            state: S::default(),
        };
        // A new file reads as zeros; write the empty slot only when it is
        // not all zero bits.
        let zero_bits = {
            let mut bytes = vec![0u8; S::ENCODED_LEN];
            S::default().encode(&mut bytes);
            bytes.iter().all(|b| *b == 0)
        };
        if !zero_bits {
            shared.slots_mut().fill(empty);
        }
        shared.set_side(None);
        let h = shared.header();
        h.slots.store(n as u64, Ordering::Relaxed);
        h.slot_bytes
            .store(size_of::<Slot<S>>() as u64, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(shared)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least one page long and page-aligned,
        // and `Header` (atomics only, valid for any bits) fits in a page.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn slot_ptr(&self) -> *mut Slot<S> {
        // SAFETY: the slots start one page into a mapping of
        // `file_len(len)` bytes.
        unsafe { self.map.as_mut_ptr().add(PAGE) as *mut Slot<S> }
    }

    /// The slots.
    pub(crate) fn slots(&self) -> &[Slot<S>] {
        // SAFETY: `len` slots follow the header page in the mapping, which
        // is page-aligned, so they are aligned for `Slot<S>` (a `u64` and
        // floats). Every bit pattern is a valid slot (a key and floats).
        // Only this process maps the file writable, and it writes only
        // through `slots_mut`'s exclusive borrow, so no write happens
        // while this shared borrow lives; other processes only read.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(), self.len) }
    }

    /// The slots, to update.
    pub(crate) fn slots_mut(&mut self) -> &mut [Slot<S>] {
        // SAFETY: as in `slots`; `&mut self` makes this the only borrow
        // of the slots in this process, and no other process writes them.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(), self.len) }
    }

    /// Writes key 0's state (or its absence) into the side slot.
    pub(crate) fn set_side(&mut self, zero: Option<S>) {
        let side = Slot {
            key: u64::from(zero.is_some()),
            state: zero.unwrap_or_default(),
        };
        // SAFETY: the side slot is the one after the `len` slots, inside
        // the mapping (`file_len` counts `len + 1` slots); `&mut self`
        // excludes every other borrow in this process.
        unsafe { self.slot_ptr().add(self.len).write(side) };
    }

    /// The descriptor readers open the file through.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl<S> Drop for SharedSlots<S> {
    fn drop(&mut self) {
        // SAFETY: the header sits at the start of the mapping, which lives
        // until this drop ends.
        let h = unsafe { &*(self.map.as_ptr() as *const Header) };
        h.moved.store(1, Ordering::Release);
    }
}

/// Another process's shared table, mapped read-only.
pub struct SlotsView<S> {
    map: memmap2::Mmap,
    len: usize,
    mask: usize,
    shift: u32,
    _slots: PhantomData<S>,
}

impl<S: SlotState> SlotsView<S> {
    /// Maps the table process `pid` holds open as `fd`.
    pub fn open(pid: u32, fd: RawFd) -> Result<Self, SharedSlotsError> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let not = || SharedSlotsError::NotATable(path.clone());
        if S::ENCODED_LEN != size_of::<S>() || size_of::<Slot<S>>() > MAX_SLOT_BYTES {
            return Err(not());
        }
        let file = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
        let len = file.metadata().map_err(io(format!("stat {path}")))?.len() as usize;
        if len < PAGE {
            return Err(not());
        }
        // SAFETY: a read-only shared mapping. The owner changes the file's
        // contents while it is mapped, so the bytes are never read through
        // a plain reference: `Header` is atomics, and slots are read word
        // by word with atomic loads (`word`). The file's size never changes
        // (the owner makes a new file to grow).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(format!("map {path}")))?;
        huge_pages(map.advise(memmap2::Advice::HugePage));
        let mut view = SlotsView {
            map,
            len: 0,
            mask: 0,
            shift: 0,
            _slots: PhantomData,
        };
        let h = view.header();
        let slots = h.slots.load(Ordering::Acquire) as usize;
        if h.magic.load(Ordering::Acquire) != MAGIC
            || h.slot_bytes.load(Ordering::Relaxed) != size_of::<Slot<S>>() as u64
            || !slots.is_power_of_two()
            || file_len::<S>(slots) != Some(len)
        {
            return Err(not());
        }
        view.len = slots;
        view.mask = slots - 1;
        view.shift = 64 - slots.trailing_zeros();
        Ok(view)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least a page long and page-aligned;
        // `Header` is atomics, valid for any bits.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// Whether the owner has moved the table to a bigger file (or dropped
    /// it): this view no longer sees its updates.
    pub fn moved(&self) -> bool {
        self.header().moved.load(Ordering::Acquire) != 0
    }

    fn slot_word<T>(&self, slot: usize, offset: usize) -> &T {
        debug_assert!(slot <= self.len && offset + size_of::<T>() <= size_of::<Slot<S>>());
        // SAFETY: `slot ≤ len` (the side slot is `len`), so the word lies
        // inside the mapping (`file_len(len)` bytes, checked at `open`); it
        // is aligned because the slots start on a page and a slot is a
        // `u64` followed by 4-byte words, and `T` is an atomic of that
        // size, valid for any bits.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(PAGE + slot * size_of::<Slot<S>>() + offset) as *const T)
        }
    }

    fn key_at(&self, slot: usize) -> u64 {
        self.slot_word::<AtomicU64>(slot, 0).load(Ordering::Relaxed)
    }

    #[inline]
    fn state_at(&self, slot: usize) -> S {
        S::from_words(|i| {
            // A state's words lie within its slot (checked at `open`); a
            // `from_words` asking past them reads 0.
            if i >= S::ENCODED_LEN / 4 {
                return 0;
            }
            self.slot_word::<AtomicU32>(slot, size_of::<u64>() + 4 * i)
                .load(Ordering::Relaxed)
        })
    }

    /// The state of `key`, if present. A probe that meets no empty slot
    /// (a table changing under it) gives up after every slot.
    #[inline]
    pub fn get(&self, key: u64) -> Option<S> {
        if key == 0 {
            return (self.key_at(self.len) != 0).then(|| self.state_at(self.len));
        }
        let mut i = (mix(key) >> self.shift) as usize;
        for _ in 0..self.len {
            let k = self.key_at(i);
            if k == key {
                return Some(self.state_at(i));
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Starts loading the home slots of `keys` (see
    /// [`ParamTable::prefetch`](super::ParamTable::prefetch)).
    #[inline]
    pub fn prefetch(&self, keys: &[u64]) {
        let mut acc = 0u64;
        for &k in keys {
            acc ^= self.key_at((mix(k) >> self.shift) as usize);
        }
        std::hint::black_box(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::super::ParamTable;
    use super::*;

    fn view(table: &ParamTable<[f32; 2]>) -> SlotsView<[f32; 2]> {
        let fd = table.shared_fd().expect("shared");
        SlotsView::open(std::process::id(), fd).expect("a view")
    }

    #[test]
    fn a_view_reads_what_the_owner_wrote_and_follows_nothing_after_a_move() {
        let mut table = ParamTable::<[f32; 2]>::new();
        for k in 1..5u64 {
            table.insert(k, [k as f32, 1.0]);
        }
        table.share().expect("shared");
        table.insert(0, [7.0, 8.0]);
        table.publish_side();
        let before = view(&table);
        for k in 1..5u64 {
            assert_eq!(before.get(k), Some([k as f32, 1.0]));
        }
        assert_eq!(before.get(0), Some([7.0, 8.0]));
        assert_eq!(before.get(99), None);
        table.get_or_insert_default(3)[0] = 30.0;
        assert_eq!(before.get(3), Some([30.0, 1.0]), "updates show in place");
        assert!(!before.moved());
        // Growing moves the slots into a new file; the old view says so.
        for k in 100..200u64 {
            table.insert(k, [k as f32, 0.0]);
        }
        assert!(before.moved());
        table.publish_side();
        let after = view(&table);
        for k in (1..5u64).chain(100..200) {
            assert_eq!(after.get(k), table.get(k).copied(), "key {k}");
        }
        assert_eq!(after.get(0), Some([7.0, 8.0]));
        // A copy (a checkpoint's) is private.
        assert!(table.clone().shared_fd().is_none());
    }

    #[test]
    fn a_file_that_is_not_a_table_of_this_slot_type_is_refused() {
        let mut table = ParamTable::<[f32; 4]>::new();
        table.share().expect("shared");
        let fd = table.shared_fd().expect("shared");
        assert!(matches!(
            SlotsView::<[f32; 2]>::open(std::process::id(), fd),
            Err(SharedSlotsError::NotATable(_))
        ));
        let file = tempfile::tempfile().expect("a file");
        assert!(SlotsView::<[f32; 2]>::open(std::process::id(), file.as_raw_fd()).is_err());
    }
}
