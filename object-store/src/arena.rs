//! The shared-memory arena: one `memfd` per store, mapped by the store and by
//! every client.
//!
//! An anonymous memfd leaves nothing in `/dev/shm` or anywhere else: the
//! kernel frees its pages when the last descriptor and the last mapping are
//! gone, however the processes holding them died.
//!
//! Page faults dominate the cost of shared memory on a small VM (first touch
//! of fresh pages runs at a fraction of a GB/s, memcpy into mapped pages at
//! several GB/s). Two mechanisms keep faults off the hot path:
//!
//! * [`Provisioner`] allocates the memfd's pages ahead of the allocator's
//!   high-water mark with `fallocate`, in the background, so that no writer
//!   ever pays for fresh pages one fault at a time;
//! * [`Mapping::populate`] maps a region's existing pages into this process
//!   with one `MADV_POPULATE_READ` call, the first time the process uses the
//!   region, at [`POPULATE_CHUNK`] granularity. A client connects in
//!   milliseconds because nothing is populated at connect.

use parking_lot::{Condvar, Mutex};
use rustix::fs::{FallocateFlags, MemfdFlags};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Granularity at which a process populates its mapping (2 MiB).
pub const POPULATE_CHUNK: u64 = 2 << 20;

/// Granularity of background page provisioning (64 MiB).
const PROVISION_STEP: u64 = 64 << 20;

/// Errors creating or mapping an arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create a {capacity}-byte memfd arena: {source}")]
    Create {
        /// Requested capacity in bytes.
        capacity: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map the {len}-byte arena: {source}")]
    Map {
        /// Length of the mapping.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel could not back a region with memory.
    #[error("cannot allocate pages for bytes {offset}..{end} of the arena: {source}")]
    Provision {
        /// Start of the region.
        offset: u64,
        /// End of the region.
        end: u64,
        /// The OS error (typically ENOMEM or ENOSPC).
        source: std::io::Error,
    },
}

/// Creates the anonymous memfd that backs an arena of `capacity` bytes.
pub fn create_memfd(capacity: u64) -> Result<OwnedFd, ArenaError> {
    let fd = rustix::fs::memfd_create("braid-arena", MemfdFlags::CLOEXEC).map_err(|e| {
        ArenaError::Create {
            capacity,
            source: e.into(),
        }
    })?;
    rustix::fs::ftruncate(&fd, capacity).map_err(|e| ArenaError::Create {
        capacity,
        source: e.into(),
    })?;
    Ok(fd)
}

/// One process's shared, read-write mapping of the whole arena, with a record
/// of which [`POPULATE_CHUNK`]s it has populated.
#[derive(Debug)]
pub struct Mapping {
    map: memmap2::MmapRaw,
    len: u64,
    populated: Vec<AtomicU64>,
}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write, populating nothing.
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> Result<Mapping, ArenaError> {
        let map_len = usize::try_from(len).map_err(|_| ArenaError::Map {
            len,
            source: std::io::Error::other("arena larger than the address space"),
        })?;
        let map = memmap2::MmapOptions::new()
            .len(map_len)
            .map_raw(&fd)
            .map_err(|source| ArenaError::Map { len, source })?;
        let chunks = len.div_ceil(POPULATE_CHUNK);
        let words = chunks.div_ceil(64) as usize;
        let populated = (0..words).map(|_| AtomicU64::new(0)).collect();
        Ok(Mapping {
            map,
            len,
            populated,
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether `[offset, offset + len)` is a valid range of the arena.
    pub fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Maps the pages of `[offset, offset + len)` into this process in as few
    /// system calls as possible, skipping chunks populated before.
    ///
    /// Failure is not fatal: the pages then fault in lazily on first access.
    pub fn populate(&self, offset: u64, len: u64) {
        if len == 0 || !self.in_bounds(offset, len) {
            return;
        }
        let first = offset / POPULATE_CHUNK;
        let last = (offset + len - 1) / POPULATE_CHUNK;
        let mut run_start: Option<u64> = None;
        for chunk in first..=last + 1 {
            let missing = chunk <= last && !self.is_populated(chunk);
            match (missing, run_start) {
                (true, None) => run_start = Some(chunk),
                (false, Some(start)) => {
                    self.populate_chunks(start, chunk);
                    run_start = None;
                }
                _ => {}
            }
        }
    }

    fn is_populated(&self, chunk: u64) -> bool {
        let word = &self.populated[(chunk / 64) as usize];
        word.load(Ordering::Relaxed) & (1 << (chunk % 64)) != 0
    }

    fn populate_chunks(&self, start: u64, end: u64) {
        let offset = start * POPULATE_CHUNK;
        let len = (end * POPULATE_CHUNK).min(self.len) - offset;
        // Read population maps shmem pages writable (a shared mapping of
        // tmpfs needs no write notification) at under half the cost of
        // MADV_POPULATE_WRITE measured here, and later writes take no fault.
        // SAFETY: `[offset, offset + len)` lies inside the mapping (checked by
        // the caller through `in_bounds` and clamped to `self.len` above), and
        // MADV_POPULATE_READ only faults pages in; it never changes contents.
        let res = unsafe {
            rustix::mm::madvise(
                self.base().add(offset as usize).cast(),
                len as usize,
                rustix::mm::Advice::LinuxPopulateRead,
            )
        };
        if let Err(e) = res {
            tracing::debug!(offset, len, error = %e, "populate failed; pages will fault lazily");
            return;
        }
        for chunk in start..end {
            let word = &self.populated[(chunk / 64) as usize];
            word.fetch_or(1 << (chunk % 64), Ordering::Relaxed);
        }
    }
}

/// Allocates the arena's pages ahead of the allocator, in a background
/// thread and on demand.
///
/// Pages are provisioned from offset 0 upward; the allocator packs objects
/// toward low offsets, so keeping `headroom` bytes provisioned above the
/// high-water mark means writers almost never meet an unallocated page.
#[derive(Debug)]
pub struct Provisioner {
    inner: Arc<ProvisionerInner>,
}

#[derive(Debug)]
struct ProvisionerInner {
    fd: OwnedFd,
    capacity: u64,
    headroom: u64,
    /// Bytes `[0, mark)` are allocated.
    mark: Mutex<u64>,
    high_water: AtomicU64,
    wake: Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl Provisioner {
    /// Starts provisioning `fd` (a clone of the arena's memfd) in the
    /// background, keeping `headroom` bytes ahead of the high-water mark.
    pub fn start(fd: OwnedFd, capacity: u64, headroom: u64) -> std::io::Result<Provisioner> {
        let inner = Arc::new(ProvisionerInner {
            fd,
            capacity,
            headroom,
            mark: Mutex::new(0),
            high_water: AtomicU64::new(0),
            wake: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let worker = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("braid-provision".into())
            .spawn(move || worker.run())?;
        Ok(Provisioner { inner })
    }

    /// Records the allocator's new high-water mark and wakes the background
    /// thread if it has fallen behind.
    pub fn set_high_water(&self, high_water: u64) {
        let old = self.inner.high_water.swap(high_water, Ordering::Relaxed);
        if high_water > old {
            self.inner.wake.notify_one();
        }
    }

    /// Bytes provisioned so far, from offset 0.
    pub fn provisioned(&self) -> u64 {
        *self.inner.mark.lock()
    }

    /// Makes sure `[0, end)` is provisioned, allocating the missing pages now.
    ///
    /// The store calls this before it hands out a block, so that a failure to
    /// find memory is reported as an error to the creator instead of a
    /// SIGBUS in whichever process touches the page first.
    pub fn ensure(&self, end: u64) -> Result<(), ArenaError> {
        let end = end.min(self.inner.capacity);
        let mut mark = self.inner.mark.lock();
        if *mark >= end {
            return Ok(());
        }
        self.inner.fallocate(*mark, end)?;
        *mark = end;
        Ok(())
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        let _guard = self.inner.mark.lock();
        self.inner.wake.notify_all();
    }
}

impl ProvisionerInner {
    fn fallocate(&self, offset: u64, end: u64) -> Result<(), ArenaError> {
        rustix::fs::fallocate(&self.fd, FallocateFlags::empty(), offset, end - offset).map_err(
            |e| ArenaError::Provision {
                offset,
                end,
                source: e.into(),
            },
        )
    }

    fn target(&self) -> u64 {
        let hw = self.high_water.load(Ordering::Relaxed);
        hw.saturating_add(self.headroom).min(self.capacity)
    }

    fn run(&self) {
        loop {
            let mut mark = self.mark.lock();
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let target = self.target();
            if *mark >= target {
                self.wake.wait_for(&mut mark, Duration::from_secs(1));
                continue;
            }
            let end = (*mark + PROVISION_STEP).min(target);
            match self.fallocate(*mark, end) {
                Ok(()) => *mark = end,
                Err(e) => {
                    tracing::warn!(error = %e, "background page provisioning failed; will retry on demand");
                    self.wake.wait_for(&mut mark, Duration::from_secs(1));
                }
            }
        }
    }
}
