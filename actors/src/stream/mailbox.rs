//! A subtask's mailbox: the shared-memory rings its input channels arrive
//! on when sender and receiver share a machine, read and written by the
//! subtasks' own threads, with no runtime thread and no call in between.
//!
//! The receiving host creates one `memfd` holding a single-producer,
//! single-consumer byte ring per input slot and one doorbell; each sender
//! maps it through `/proc/<pid>/fd/<fd>` (same user only) and writes
//! length-prefixed frames into its slot's ring. Frames larger than a ring
//! are written in pieces as the receiver drains it.
//!
//! * **Wake-ups** follow the event-count protocol of the runtime's
//!   connection rings, with one doorbell for all slots: a receiver about
//!   to sleep sets `sleeping`, then looks at every ring once more; a
//!   sender publishes its bytes, then rings the doorbell only if that flag
//!   was set. A busy receiver costs its senders no system call.
//! * **Credit**: the receiver counts the messages it has taken off each
//!   slot (`taken`), so a sender knows which of its messages' store
//!   objects it may release and how many are still queued; it waits on its
//!   slot's space signal, which the receiver bumps when it frees ring
//!   space or takes a message while the sender waits.
//! * **Failure**: a sender that waits checks every few milliseconds that
//!   the receiver's process still lives, so a dead receiver is an error,
//!   not a hang. A cursor or frame length a hostile peer wrote is an
//!   error for that mailbox only.

use braid::wire::ring::{copy_from_ring, copy_into_ring};
use rustix::fs::MemfdFlags;
use rustix::thread::futex;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const MAGIC: u64 = 0x6272_6169_646d_6278;
/// Bytes of frame data each slot's ring buffers.
pub const SLOT_CAPACITY: u64 = 256 << 10;
/// Bytes of each slot's batch arena: columnar batches built in place for
/// the receiver to read in place (see [`Sender::arena_alloc`]).
pub const ARENA_CAPACITY: u64 = 4 << 20;
/// Arena allocations start on this boundary (Arrow buffers' alignment).
const ARENA_ALIGN: u64 = 64;
/// The largest frame a receiver accepts.
pub const MAX_FRAME: usize = 64 << 20;
/// The most input slots one mailbox holds.
pub const MAX_SLOTS: usize = 4096;
const PAGE: u64 = 4096;
const CONTROL_BYTES: u64 = 512;
/// How often a waiting sender checks that its receiver still lives.
const LIVENESS_CHECK: Duration = Duration::from_millis(20);

/// What went wrong with a mailbox.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The mailbox could not be created or mapped.
    #[error("mailbox {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a mailbox of the expected shape.
    #[error("{0} is not a mailbox of the expected shape")]
    NotAMailbox(String),
    /// A peer wrote cursors or a frame length that cannot be right.
    #[error("mailbox slot {slot} corrupt: {why}")]
    Corrupt {
        /// The slot.
        slot: usize,
        /// What was wrong.
        why: String,
    },
    /// The receiving process is gone.
    #[error("the receiver (process {0}) is gone")]
    ReceiverGone(u32),
    /// No such slot.
    #[error("mailbox has no slot {0}")]
    NoSlot(usize),
}

#[repr(C, align(64))]
struct Line<T>(T);

/// One slot's control words, each on its own cache line.
#[repr(C)]
struct Control {
    tail: Line<AtomicU64>,
    head: Line<AtomicU64>,
    taken: Line<AtomicU64>,
    /// The arena cursor below which the receiver has released every batch.
    arena_head: Line<AtomicU64>,
    space_signal: Line<AtomicU32>,
    sender_waiting: Line<AtomicU32>,
}

#[repr(C)]
struct Header {
    magic: Line<AtomicU64>,
    slots: Line<AtomicU64>,
    doorbell: Line<AtomicU32>,
    sleeping: Line<AtomicU32>,
}

const _: () = assert!(std::mem::size_of::<Header>() as u64 <= PAGE);
const _: () = assert!(std::mem::size_of::<Control>() as u64 <= CONTROL_BYTES);

fn control_region(slots: usize) -> u64 {
    (slots as u64 * CONTROL_BYTES).div_ceil(PAGE) * PAGE
}

fn total_len(slots: usize) -> u64 {
    PAGE + control_region(slots) + slots as u64 * (SLOT_CAPACITY + ARENA_CAPACITY)
}

/// Where a mailbox is: the receiving process and the descriptor it holds
/// the mailbox open as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxAddr {
    /// The receiving process.
    pub pid: u32,
    /// Its descriptor of the mailbox.
    pub fd: i32,
    /// How many slots the mailbox has.
    pub slots: u32,
}

/// A mailbox mapped into this process.
struct Mapping {
    map: memmap2::MmapRaw,
    slots: usize,
}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least one page (`total_len`, checked
        // on open and set on create), page-aligned, and lives as long as
        // `self`. `Header` is only atomics, valid for every bit pattern,
        // so whatever a peer wrote is a valid value; atomics are the right
        // type for memory another process writes concurrently.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn control(&self, slot: usize) -> &Control {
        debug_assert!(slot < self.slots);
        // SAFETY: slot < slots, so the control block at PAGE + slot *
        // CONTROL_BYTES ends within the control region, inside the mapping;
        // it is 64-byte aligned (page + multiple of 512) and, like the
        // header, only atomics.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add((PAGE + slot as u64 * CONTROL_BYTES) as usize)
                as *const Control)
        }
    }

    fn data(&self, slot: usize) -> *mut u8 {
        let at = PAGE + control_region(self.slots) + slot as u64 * SLOT_CAPACITY;
        // SAFETY: for slot < slots, [at, at + SLOT_CAPACITY) is within
        // `total_len(slots)`, the mapping's length.
        unsafe { self.map.as_mut_ptr().add(at as usize) }
    }

    /// The start of `slot`'s arena: page-aligned, `ARENA_CAPACITY` bytes.
    fn arena(&self, slot: usize) -> *mut u8 {
        let at = PAGE
            + control_region(self.slots)
            + self.slots as u64 * SLOT_CAPACITY
            + slot as u64 * ARENA_CAPACITY;
        // SAFETY: for slot < slots, [at, at + ARENA_CAPACITY) is within
        // `total_len(slots)`, the mapping's length.
        unsafe { self.map.as_mut_ptr().add(at as usize) }
    }

    /// Bytes between a slot's cursors. Cursors count every byte that ever
    /// passed, so a tail near `u64::MAX` is as corrupt as a head past the
    /// tail: advancing it would overflow.
    fn used(&self, slot: usize, tail: u64, head: u64) -> Result<u64, MailboxError> {
        match tail.checked_sub(head) {
            Some(u) if u <= SLOT_CAPACITY && tail <= u64::MAX - SLOT_CAPACITY => Ok(u),
            _ => Err(MailboxError::Corrupt {
                slot,
                why: format!("head {head}, tail {tail}"),
            }),
        }
    }

    fn ring_doorbell(&self) {
        let h = self.header();
        fence(Ordering::SeqCst);
        if h.sleeping.0.load(Ordering::Relaxed) == 1 && h.sleeping.0.swap(0, Ordering::AcqRel) == 1
        {
            h.doorbell.0.fetch_add(1, Ordering::Release);
            let _ = futex::wake(&h.doorbell.0, futex::Flags::empty(), 1);
        }
    }

    fn wake_sender(&self, slot: usize) {
        let c = self.control(slot);
        fence(Ordering::SeqCst);
        if c.sender_waiting.0.load(Ordering::Relaxed) == 1
            && c.sender_waiting.0.swap(0, Ordering::AcqRel) == 1
        {
            c.space_signal.0.fetch_add(1, Ordering::Release);
            let _ = futex::wake(&c.space_signal.0, futex::Flags::empty(), 1);
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MailboxError {
    let what = what.into();
    move |source| MailboxError::Io { what, source }
}

/// The receiving end: the mailbox this process created for its input
/// slots. Only one thread reads it.
pub struct Receiver {
    mapping: std::sync::Arc<Mapping>,
    fd: OwnedFd,
    /// Per slot, the frame being read: its length once known, and the
    /// bytes so far.
    partial: Vec<(Option<usize>, Vec<u8>)>,
    /// Per slot, the arena batches handed out and not yet known to be
    /// released, oldest first, and where the next one may start.
    leases: Vec<(std::collections::VecDeque<Lease>, u64)>,
}

/// An arena batch handed out: its cursors, and whether every buffer
/// reading it has been dropped.
struct Lease {
    end: u64,
    released: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What keeps an arena batch's bytes mapped while Arrow buffers read them,
/// and tells the receiver when the last one is gone.
struct ArenaHold {
    _mapping: std::sync::Arc<Mapping>,
    released: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ArenaHold {
    fn drop(&mut self) {
        self.released.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mailbox::Receiver({} slots)", self.mapping.slots)
    }
}

/// A handle that rings a receiver's doorbell from its own process (a
/// command or a message that arrived another way).
#[derive(Clone)]
pub struct Doorbell(std::sync::Arc<Mapping>);

impl Doorbell {
    /// Wakes the receiver if it sleeps.
    pub fn ring(&self) {
        self.0.ring_doorbell();
    }
}

impl Receiver {
    /// Creates a mailbox with `slots` input slots.
    pub fn create(slots: usize) -> Result<Receiver, MailboxError> {
        if slots > MAX_SLOTS {
            return Err(MailboxError::NotAMailbox(format!("{slots} slots")));
        }
        let fd = rustix::fs::memfd_create("braid-mailbox", MemfdFlags::CLOEXEC)
            .map_err(|e| io("create")(e.into()))?;
        rustix::fs::ftruncate(&fd, total_len(slots)).map_err(|e| io("size")(e.into()))?;
        let file = std::fs::File::from(fd.try_clone().map_err(io("clone"))?);
        let map = memmap2::MmapRaw::map_raw(&file).map_err(io("map"))?;
        let mapping = Mapping { map, slots };
        mapping
            .header()
            .slots
            .0
            .store(slots as u64, Ordering::Relaxed);
        mapping.header().magic.0.store(MAGIC, Ordering::Release);
        Ok(Receiver {
            mapping: std::sync::Arc::new(mapping),
            fd,
            partial: (0..slots).map(|_| (None, Vec::new())).collect(),
            leases: (0..slots)
                .map(|_| (std::collections::VecDeque::new(), 0))
                .collect(),
        })
    }

    /// Where senders find this mailbox.
    pub fn addr(&self) -> MailboxAddr {
        MailboxAddr {
            pid: std::process::id(),
            fd: self.fd.as_raw_fd(),
            slots: self.mapping.slots as u32,
        }
    }

    /// A doorbell for this mailbox, to wake its reader from this process.
    pub fn doorbell(&self) -> Result<Doorbell, MailboxError> {
        Ok(Doorbell(std::sync::Arc::new(open_mapping(self.addr())?)))
    }

    /// The next whole frame on `slot`, if one has arrived. Frees the ring
    /// space it read, waking a sender that waits for it.
    pub fn try_frame(&mut self, slot: usize) -> Result<Option<Vec<u8>>, MailboxError> {
        let Some((want, buf)) = self.partial.get_mut(slot) else {
            return Err(MailboxError::NoSlot(slot));
        };
        let mapping = &self.mapping;
        let mut freed = false;
        let result = loop {
            let need = match *want {
                None => 4 - buf.len(),
                Some(len) => len - buf.len(),
            };
            if need > 0 {
                let n = read_up_to(mapping, slot, need, buf)?;
                freed |= n > 0;
                if n < need {
                    break None;
                }
            }
            match *want {
                None => {
                    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if len > MAX_FRAME {
                        return Err(MailboxError::Corrupt {
                            slot,
                            why: format!("a frame of {len} bytes"),
                        });
                    }
                    buf.clear();
                    *want = Some(len);
                }
                Some(_) => {
                    *want = None;
                    break Some(std::mem::take(buf));
                }
            }
        };
        if freed {
            mapping.wake_sender(slot);
        }
        Ok(result)
    }

    /// The batch a sender built in `slot`'s arena at cursor `start`, `len`
    /// bytes, as an Arrow buffer read in place: its bytes stay the
    /// sender's to reuse only once every buffer sliced from it is dropped.
    /// Cursors a hostile sender wrote that overlap what is still leased,
    /// or leave the arena, are an error.
    pub fn arena_batch(
        &mut self,
        slot: usize,
        start: u64,
        len: u64,
    ) -> Result<braid::store::arrow_buffer::Buffer, MailboxError> {
        self.reclaim(slot);
        let Some((leases, next)) = self.leases.get_mut(slot) else {
            return Err(MailboxError::NoSlot(slot));
        };
        let corrupt = |why: String| MailboxError::Corrupt { slot, why };
        let at = start % ARENA_CAPACITY;
        let skipped = start.checked_sub(*next);
        let head = self
            .mapping
            .control(slot)
            .arena_head
            .0
            .load(Ordering::Relaxed);
        let valid =
            matches!(skipped, Some(0)) || (skipped.is_some_and(|s| s < ARENA_CAPACITY) && at == 0);
        if !valid
            || len == 0
            || at % ARENA_ALIGN != 0
            || at + len > ARENA_CAPACITY
            || start + len - head > ARENA_CAPACITY
        {
            return Err(corrupt(format!(
                "an arena batch at {start} of {len} bytes (next {next}, head {head})"
            )));
        }
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end = (start + len).next_multiple_of(ARENA_ALIGN);
        leases.push_back(Lease {
            end,
            released: released.clone(),
        });
        *next = end;
        let hold = ArenaHold {
            _mapping: self.mapping.clone(),
            released,
        };
        // SAFETY: at + len <= ARENA_CAPACITY (checked above), so the bytes
        // lie within the slot's arena, inside the mapping that `hold`
        // keeps alive as long as the buffer. The sender wrote them before
        // it published the frame naming them (the ring's release store,
        // acquired when the frame was read) and does not write them again
        // until `arena_head` passes them, which `reclaim` does only after
        // `hold` (the buffer's owner) is dropped.
        let buffer = unsafe {
            let ptr = std::ptr::NonNull::new_unchecked(self.mapping.arena(slot).add(at as usize));
            braid::store::arrow_buffer::Buffer::from_custom_allocation(
                ptr,
                len as usize,
                std::sync::Arc::new(hold),
            )
        };
        Ok(buffer)
    }

    /// Gives `slot`'s sender back the arena bytes of the oldest batches
    /// whose buffers are all dropped.
    pub fn reclaim(&mut self, slot: usize) {
        let Some((leases, next)) = self.leases.get_mut(slot) else {
            return;
        };
        let mut freed = None;
        while leases
            .front()
            .is_some_and(|l| l.released.load(Ordering::Acquire))
        {
            freed = leases.pop_front().map(|l| l.end);
        }
        if leases.is_empty() {
            freed = Some(*next);
        }
        if let Some(head) = freed {
            let c = self.mapping.control(slot);
            if c.arena_head.0.load(Ordering::Relaxed) != head {
                c.arena_head.0.store(head, Ordering::Release);
            }
        }
    }

    /// Counts one more message taken off `slot`, waking its sender if it
    /// waits for credit.
    pub fn mark_taken(&self, slot: usize) {
        if slot < self.mapping.slots {
            self.mapping
                .control(slot)
                .taken
                .0
                .fetch_add(1, Ordering::Release);
            self.mapping.wake_sender(slot);
        }
    }

    /// Whether any of `slots` has bytes waiting.
    pub fn pending(&self, slots: impl IntoIterator<Item = usize>) -> bool {
        slots.into_iter().any(|slot| {
            slot < self.mapping.slots && {
                let c = self.mapping.control(slot);
                c.tail.0.load(Ordering::Acquire) != c.head.0.load(Ordering::Relaxed)
            }
        })
    }

    /// The receiver's half of the event count: announces that it is about
    /// to sleep and returns the doorbell value to wait on. The caller then
    /// looks at its inputs once more and calls [`Receiver::sleep`] only if
    /// nothing arrived, or [`Receiver::awake`] otherwise.
    pub fn prepare_sleep(&self) -> u32 {
        let h = self.mapping.header();
        let signal = h.doorbell.0.load(Ordering::Acquire);
        h.sleeping.0.store(1, Ordering::SeqCst);
        signal
    }

    /// Sleeps until the doorbell rings after [`Receiver::prepare_sleep`]
    /// returned `signal`, or `timeout` passes; false if it timed out.
    pub fn sleep(&self, signal: u32, timeout: Duration) -> bool {
        let h = self.mapping.header();
        let woken = wait(&h.doorbell.0, signal, timeout);
        h.sleeping.0.store(0, Ordering::Relaxed);
        woken
    }

    /// How many slots the mailbox has.
    pub fn slots(&self) -> usize {
        self.mapping.slots
    }

    /// Withdraws a [`Receiver::prepare_sleep`]: something arrived.
    pub fn awake(&self) {
        self.mapping.header().sleeping.0.store(0, Ordering::Relaxed);
    }
}

/// Appends up to `max` waiting bytes of `slot` to `buf`, frees them in the
/// ring, and returns how many.
fn read_up_to(
    mapping: &Mapping,
    slot: usize,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<usize, MailboxError> {
    let c = mapping.control(slot);
    let tail = c.tail.0.load(Ordering::Acquire);
    let head = c.head.0.load(Ordering::Relaxed);
    let n = (mapping.used(slot, tail, head)? as usize).min(max);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: the slot's ring is SLOT_CAPACITY bytes at `data(slot)`;
    // bytes [head, head + n) were published by the sender's release store
    // of `tail` (acquired above) and it does not touch them until `head`
    // moves past them below.
    unsafe { copy_from_ring(mapping.data(slot), SLOT_CAPACITY, head, n, buf) };
    c.head.0.store(head + n as u64, Ordering::Release);
    Ok(n)
}

fn open_mapping(addr: MailboxAddr) -> Result<Mapping, MailboxError> {
    let slots = addr.slots as usize;
    let path = format!("/proc/{}/fd/{}", addr.pid, addr.fd);
    if slots > MAX_SLOTS {
        return Err(MailboxError::NotAMailbox(path));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(format!("open {path}")))?;
    let len = file.metadata().map_err(io(format!("stat {path}")))?.len();
    if len != total_len(slots) {
        return Err(MailboxError::NotAMailbox(path));
    }
    let map = memmap2::MmapRaw::map_raw(&file).map_err(io(format!("map {path}")))?;
    let mapping = Mapping { map, slots };
    let h = mapping.header();
    if h.magic.0.load(Ordering::Acquire) != MAGIC
        || h.slots.0.load(Ordering::Relaxed) != slots as u64
    {
        return Err(MailboxError::NotAMailbox(path));
    }
    Ok(mapping)
}

/// The sending end of one slot of another subtask's mailbox. Only one
/// thread writes a slot.
pub struct Sender {
    mapping: Mapping,
    slot: usize,
    pid: u32,
    /// The arena cursor the next batch starts at.
    arena_tail: u64,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mailbox::Sender(pid {} slot {})", self.pid, self.slot)
    }
}

impl Sender {
    /// Maps slot `slot` of the mailbox at `addr`.
    pub fn open(addr: MailboxAddr, slot: usize) -> Result<Sender, MailboxError> {
        let mapping = open_mapping(addr)?;
        if slot >= mapping.slots {
            return Err(MailboxError::NoSlot(slot));
        }
        let arena_tail = mapping.control(slot).arena_head.0.load(Ordering::Acquire);
        Ok(Sender {
            mapping,
            slot,
            pid: addr.pid,
            arena_tail,
        })
    }

    /// Sends one frame: writes as much as fits, and waits for the receiver
    /// to drain the rest (an error if it dies meanwhile).
    pub fn send(&self, body: &[u8]) -> Result<(), MailboxError> {
        if body.len() > MAX_FRAME {
            return Err(MailboxError::Corrupt {
                slot: self.slot,
                why: format!("a frame of {} bytes is too large", body.len()),
            });
        }
        let len = (body.len() as u32).to_le_bytes();
        if self.free()? >= (4 + body.len()) as u64 {
            self.write(&len)?;
            self.write(body)?;
        } else {
            self.write_all(&len)?;
            self.write_all(body)?;
        }
        self.mapping.ring_doorbell();
        Ok(())
    }

    /// Room for a batch of `len` bytes in the receiver's arena for this
    /// slot: its cursor, to name it in the frame that follows, and the
    /// bytes to build it in. `None` when the arena has no room now (the
    /// receiver still holds earlier batches): send it another way.
    pub fn arena_alloc(&mut self, len: usize) -> Option<(u64, &mut [u8])> {
        let len = len as u64;
        if len == 0 || len > ARENA_CAPACITY / 2 {
            return None;
        }
        let head = self
            .mapping
            .control(self.slot)
            .arena_head
            .0
            .load(Ordering::Acquire);
        let mut start = self.arena_tail;
        if start % ARENA_CAPACITY + len > ARENA_CAPACITY {
            start = start.next_multiple_of(ARENA_CAPACITY);
        }
        if start.checked_sub(head)? + len > ARENA_CAPACITY {
            return None;
        }
        self.arena_tail = (start + len).next_multiple_of(ARENA_ALIGN);
        let at = (start % ARENA_CAPACITY) as usize;
        // SAFETY: [at, at + len) lies within this slot's arena (at + len <=
        // ARENA_CAPACITY), and the receiver released every batch there:
        // everything from `head` on was handed out by this sender and
        // start + len - head <= ARENA_CAPACITY, so these bytes are before
        // `head` in the previous lap. Only this sender writes the slot's
        // arena, and `&mut self` keeps the slice unique on this side.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.mapping.arena(self.slot).add(at), len as usize)
        };
        Some((start, buf))
    }

    /// Gives back an allocation made at `start` that was not sent (its
    /// batch failed to build), so the next one starts there.
    pub fn arena_abandon(&mut self, start: u64) {
        self.arena_tail = start;
    }

    /// How many messages the receiver has taken off this slot.
    pub fn taken(&self) -> u64 {
        self.mapping
            .control(self.slot)
            .taken
            .0
            .load(Ordering::Acquire)
    }

    /// Waits until the receiver has taken `at_least` messages off this
    /// slot; an error if its process dies first.
    pub fn wait_taken(&self, at_least: u64) -> Result<(), MailboxError> {
        let c = self.mapping.control(self.slot);
        loop {
            let signal = c.space_signal.0.load(Ordering::Acquire);
            c.sender_waiting.0.store(1, Ordering::SeqCst);
            if self.taken() >= at_least {
                c.sender_waiting.0.store(0, Ordering::Relaxed);
                return Ok(());
            }
            if !wait(&c.space_signal.0, signal, LIVENESS_CHECK) {
                self.check_alive()?;
            }
        }
    }

    /// Whether the receiving process still runs.
    pub fn receiver_alive(&self) -> bool {
        self.check_alive().is_ok()
    }

    fn check_alive(&self) -> Result<(), MailboxError> {
        let pid = rustix::process::Pid::from_raw(self.pid as i32);
        match pid.map(rustix::process::test_kill_process) {
            Some(Ok(())) | Some(Err(rustix::io::Errno::PERM)) => Ok(()),
            _ => Err(MailboxError::ReceiverGone(self.pid)),
        }
    }

    fn free(&self) -> Result<u64, MailboxError> {
        let c = self.mapping.control(self.slot);
        let tail = c.tail.0.load(Ordering::Relaxed);
        let head = c.head.0.load(Ordering::Acquire);
        self.mapping
            .used(self.slot, tail, head)
            .map(|u| SLOT_CAPACITY - u)
    }

    /// Writes as much of `bytes` as fits, returning how much.
    fn write(&self, bytes: &[u8]) -> Result<usize, MailboxError> {
        let n = (self.free()? as usize).min(bytes.len());
        if n == 0 {
            return Ok(0);
        }
        let c = self.mapping.control(self.slot);
        let tail = c.tail.0.load(Ordering::Relaxed);
        // SAFETY: the slot's ring is SLOT_CAPACITY bytes at `data(slot)`,
        // and bytes [tail, tail + n) of it are free (n <= free space), so
        // the receiver does not read them until `tail` is published below.
        unsafe {
            copy_into_ring(
                self.mapping.data(self.slot),
                SLOT_CAPACITY,
                tail,
                &bytes[..n],
            )
        };
        c.tail.0.store(tail + n as u64, Ordering::Release);
        Ok(n)
    }

    fn write_all(&self, mut bytes: &[u8]) -> Result<(), MailboxError> {
        while !bytes.is_empty() {
            let n = self.write(bytes)?;
            bytes = &bytes[n..];
            if n > 0 {
                self.mapping.ring_doorbell();
                continue;
            }
            let c = self.mapping.control(self.slot);
            let signal = c.space_signal.0.load(Ordering::Acquire);
            c.sender_waiting.0.store(1, Ordering::SeqCst);
            if self.free()? == 0 && !wait(&c.space_signal.0, signal, LIVENESS_CHECK) {
                self.check_alive()?;
            }
        }
        Ok(())
    }
}

/// Waits on a futex word while it holds `expected`; false if `timeout`
/// passed.
fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs() as futex::Secs,
        tv_nsec: timeout.subsec_nanos() as futex::Nsecs,
    };
    !matches!(
        futex::wait(word, futex::Flags::empty(), expected, Some(&ts)),
        Err(rustix::io::Errno::TIMEDOUT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(slots: usize) -> (Receiver, Vec<Sender>) {
        let rx = Receiver::create(slots).unwrap();
        let senders = (0..slots)
            .map(|s| Sender::open(rx.addr(), s).unwrap())
            .collect();
        (rx, senders)
    }

    fn next(rx: &mut Receiver, slot: usize) -> Vec<u8> {
        loop {
            if let Some(frame) = rx.try_frame(slot).unwrap() {
                return frame;
            }
            let signal = rx.prepare_sleep();
            if rx.pending([slot]) {
                rx.awake();
                continue;
            }
            let _ = rx.sleep(signal, Duration::from_secs(30));
        }
    }

    #[test]
    fn frames_arrive_whole_and_in_order_on_their_own_slot() {
        let (mut rx, tx) = pair(2);
        for round in 0..2_000u32 {
            tx[0].send(&round.to_le_bytes()).unwrap();
            tx[1].send(&vec![round as u8; 300]).unwrap();
            assert_eq!(rx.try_frame(0).unwrap().unwrap(), round.to_le_bytes());
            assert_eq!(rx.try_frame(1).unwrap().unwrap(), vec![round as u8; 300]);
        }
        assert!(rx.try_frame(0).unwrap().is_none());
        assert!(!rx.pending([0, 1]));
    }

    #[test]
    fn a_frame_larger_than_the_ring_crosses_in_pieces() {
        let (mut rx, mut tx) = pair(1);
        let big: Vec<u8> = (0..3 * SLOT_CAPACITY as usize + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let sender = tx.remove(0);
        let expected = big.clone();
        let writer = std::thread::spawn(move || {
            sender.send(&big).unwrap();
            sender.send(b"after").unwrap();
        });
        assert_eq!(next(&mut rx, 0), expected);
        assert_eq!(next(&mut rx, 0), b"after");
        writer.join().unwrap();
    }

    #[test]
    fn a_sleeping_receiver_is_woken_by_a_send_on_any_slot_or_its_doorbell() {
        let (mut rx, mut tx) = pair(3);
        let doorbell = rx.doorbell().unwrap();
        let sender = tx.remove(2);
        let writer = std::thread::spawn(move || {
            for i in 0..100u8 {
                sender.send(&[i]).unwrap();
                std::thread::yield_now();
            }
        });
        for i in 0..100u8 {
            assert_eq!(next(&mut rx, 2), [i]);
        }
        writer.join().unwrap();
        let signal = rx.prepare_sleep();
        let ringer = std::thread::spawn(move || doorbell.ring());
        assert!(rx.sleep(signal, Duration::from_secs(30)));
        ringer.join().unwrap();
    }

    #[test]
    fn a_sender_waits_for_its_messages_to_be_taken() {
        let (mut rx, mut tx) = pair(1);
        let sender = tx.remove(0);
        sender.send(b"one").unwrap();
        assert_eq!(sender.taken(), 0);
        let waiter = std::thread::spawn(move || {
            sender.wait_taken(1).unwrap();
            sender.taken()
        });
        assert_eq!(next(&mut rx, 0), b"one");
        rx.mark_taken(0);
        assert_eq!(waiter.join().unwrap(), 1);
    }

    #[test]
    fn a_sender_whose_receiver_died_gets_an_error_not_a_hang() {
        let (rx, tx) = pair(1);
        // A process id that is no longer running: our own child, reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let addr = MailboxAddr { pid, ..rx.addr() };
        let dead = Sender {
            mapping: open_mapping(rx.addr()).unwrap(),
            slot: 0,
            pid: addr.pid,
            arena_tail: 0,
        };
        tx[0].send(b"x").unwrap();
        assert!(matches!(
            dead.wait_taken(1),
            Err(MailboxError::ReceiverGone(p)) if p == pid
        ));
    }

    #[test]
    fn corrupt_cursors_and_frame_lengths_are_errors() {
        let (mut rx, tx) = pair(2);
        rx.mapping
            .control(0)
            .tail
            .0
            .store(SLOT_CAPACITY * 5, Ordering::Release);
        assert!(matches!(
            rx.try_frame(0),
            Err(MailboxError::Corrupt { slot: 0, .. })
        ));
        assert!(tx[0].send(b"x").is_err());
        tx[1].write(&(MAX_FRAME as u32 + 1).to_le_bytes()).unwrap();
        assert!(matches!(
            rx.try_frame(1),
            Err(MailboxError::Corrupt { slot: 1, .. })
        ));
    }

    #[test]
    fn arena_batches_are_read_in_place_and_their_bytes_come_back_when_dropped() {
        let (mut rx, mut tx) = pair(1);
        let mut sender = tx.remove(0);
        let len = (ARENA_CAPACITY / 4) as usize;
        let mut held = Vec::new();
        for i in 0..4u8 {
            let (start, buf) = sender.arena_alloc(len - 10).expect("room");
            buf.fill(i);
            let buffer = rx.arena_batch(0, start, (len - 10) as u64).unwrap();
            assert!(buffer.iter().all(|b| *b == i));
            assert_eq!(buffer.as_ptr() as usize % ARENA_ALIGN as usize, 0);
            held.push(buffer);
        }
        assert!(
            sender.arena_alloc(len).is_none(),
            "the arena is full while held"
        );
        held.remove(1);
        rx.reclaim(0);
        assert!(
            sender.arena_alloc(len).is_none(),
            "only the oldest batches' bytes come back"
        );
        held.remove(0);
        rx.reclaim(0);
        let (start, buf) = sender.arena_alloc(len).expect("room after the drop");
        buf.fill(9);
        assert_eq!(start % ARENA_CAPACITY, 0, "wrapped to the arena's start");
        let again = rx.arena_batch(0, start, len as u64).unwrap();
        assert!(again.iter().all(|b| *b == 9));
        assert!(held.iter().all(|b| b.iter().all(|x| *x >= 2)));
    }

    #[test]
    fn arena_cursors_a_sender_could_not_have_made_are_errors() {
        let (mut rx, mut tx) = pair(1);
        let (start, _) = tx[0].arena_alloc(1000).unwrap();
        for (start, len) in [
            (start + 64, 100),           // skips ahead without wrapping
            (start + 8, 100),            // unaligned
            (start, ARENA_CAPACITY + 1), // larger than the arena
            (ARENA_CAPACITY - 64, 128),  // leaves the arena
            (start, 0),                  // empty
            (ARENA_CAPACITY * 3, 64),    // laps what is leased
        ] {
            assert!(
                matches!(
                    rx.arena_batch(0, start, len),
                    Err(MailboxError::Corrupt { .. })
                ),
                "{start} {len}"
            );
        }
        assert!(rx.arena_batch(0, start, 1000).is_ok());
    }

    #[test]
    fn a_file_that_is_not_a_mailbox_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(100).unwrap();
        let fd = OwnedFd::from(file);
        let addr = MailboxAddr {
            pid: std::process::id(),
            fd: fd.as_raw_fd(),
            slots: 1,
        };
        assert!(matches!(
            Sender::open(addr, 0),
            Err(MailboxError::NotAMailbox(_))
        ));
        let rx = Receiver::create(2).unwrap();
        assert!(matches!(
            Sender::open(rx.addr(), 2),
            Err(MailboxError::NoSlot(2))
        ));
    }
}
