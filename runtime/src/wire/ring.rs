//! Shared-memory rings for connections between processes on one machine.
//!
//! A [`RingPair`] is one `memfd` holding two single-producer,
//! single-consumer byte rings, one per direction. The process that dials a
//! connection creates it and the peer maps it through `/proc/<pid>/fd/<fd>`
//! (same user only), after the connection has authenticated. Frames keep
//! the socket framing (`u32` length, bincode body); the socket stays open
//! as the liveness signal and for the handshake.
//!
//! Wake-ups follow an event-count protocol on futex words in the shared
//! page: a consumer that is about to sleep sets `consumer_sleeping`, then
//! re-checks the ring; a producer publishes its bytes, then wakes the
//! consumer only if that flag was set. Each side's store precedes its load
//! with sequential consistency, so one of the two always sees the other and
//! no frame waits for a timeout. A busy consumer never costs the producer a
//! system call.

use crate::error::{Error, Result};
use memmap2::MmapRaw;
use rustix::fs::MemfdFlags;
use rustix::thread::futex;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const MAGIC: u64 = 0x6272_6169_6472_6e67;
/// Bytes of frame data each direction buffers.
pub const RING_CAPACITY: u64 = 256 << 10;
const HEADER: u64 = 4096;
const TOTAL: u64 = HEADER + 2 * RING_CAPACITY;

#[repr(C, align(64))]
struct Line<T>(T);

/// One direction's control words, each on its own cache line.
#[repr(C)]
struct Control {
    tail: Line<AtomicU64>,
    head: Line<AtomicU64>,
    data_signal: Line<AtomicU32>,
    consumer_sleeping: Line<AtomicU32>,
    space_signal: Line<AtomicU32>,
    producer_waiting: Line<AtomicU32>,
}

#[repr(C)]
struct Header {
    magic: Line<AtomicU64>,
    rings: [Control; 2],
}

const _: () = assert!(std::mem::size_of::<Header>() as u64 <= HEADER);

/// Both rings of one connection, mapped into this process.
pub struct RingPair {
    map: MmapRaw,
    /// Which ring this side writes: 0 for the dialing side, 1 for the peer.
    side: usize,
}

impl std::fmt::Debug for RingPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingPair(side {})", self.side)
    }
}

/// How a ring wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// Signalled, or something may have changed.
    Signalled,
    /// The wait timed out.
    TimedOut,
}

impl RingPair {
    /// Creates a pair for a connection this process dialed, returning it
    /// and the memfd to hand to the peer.
    pub fn create() -> Result<(RingPair, OwnedFd)> {
        let fd = rustix::fs::memfd_create("braid-ring", MemfdFlags::CLOEXEC)
            .map_err(|e| Error::io("create ring memfd", std::io::Error::from(e)))?;
        rustix::fs::ftruncate(&fd, TOTAL)
            .map_err(|e| Error::io("size ring memfd", std::io::Error::from(e)))?;
        let file = std::fs::File::from(
            fd.try_clone()
                .map_err(|e| Error::io("clone ring memfd", e))?,
        );
        let map = MmapRaw::map_raw(&file).map_err(|e| Error::io("map ring", e))?;
        let pair = RingPair { map, side: 0 };
        pair.header().magic.0.store(MAGIC, Ordering::Release);
        Ok((pair, fd))
    }

    /// Maps the pair a peer process created and holds open as `fd`.
    pub fn open(pid: u32, fd: i32) -> Result<RingPair> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {path}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {path}"), e))?
            .len();
        if len != TOTAL {
            return Err(Error::BadRequest(format!(
                "{path} is {len} bytes, not a ring pair"
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| Error::io("map ring", e))?;
        let pair = RingPair { map, side: 1 };
        if pair.header().magic.0.load(Ordering::Acquire) != MAGIC {
            return Err(Error::BadRequest(format!("{path} is not a ring pair")));
        }
        Ok(pair)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is `TOTAL` bytes (checked on open, set on
        // create), page-aligned, and lives as long as `self`. `Header` is
        // only atomics, valid for every bit pattern, so whatever the peer
        // wrote is a valid value; atomics are the right type for memory
        // another process writes concurrently.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn control(&self, ring: usize) -> &Control {
        &self.header().rings[ring]
    }

    fn data(&self, ring: usize) -> *mut u8 {
        // SAFETY: HEADER + ring * RING_CAPACITY + RING_CAPACITY <= TOTAL,
        // the mapping's length, for ring 0 and 1.
        unsafe {
            self.map
                .as_mut_ptr()
                .add((HEADER + ring as u64 * RING_CAPACITY) as usize)
        }
    }

    fn out_ring(&self) -> usize {
        self.side
    }

    fn in_ring(&self) -> usize {
        1 - self.side
    }

    /// Bytes this side may still write without waiting.
    fn free(&self) -> Result<u64> {
        let c = self.control(self.out_ring());
        let tail = c.tail.0.load(Ordering::Relaxed);
        let head = c.head.0.load(Ordering::Acquire);
        used(tail, head).map(|u| RING_CAPACITY - u)
    }

    /// Writes as much of `bytes` as fits, returning how much; wakes the
    /// consumer if it sleeps. Only one thread may write at a time.
    pub fn write_some(&self, bytes: &[u8]) -> Result<usize> {
        let n = (self.free()? as usize).min(bytes.len());
        if n == 0 {
            return Ok(0);
        }
        let ring = self.out_ring();
        let c = self.control(ring);
        let tail = c.tail.0.load(Ordering::Relaxed);
        // SAFETY: the ring's data is RING_CAPACITY bytes at `data(ring)`,
        // and bytes [tail, tail + n) of it are free (n <= free space), so
        // the consumer does not read them until `tail` is published below.
        unsafe { copy_into_ring(self.data(ring), RING_CAPACITY, tail, &bytes[..n]) };
        c.tail.0.store(tail + n as u64, Ordering::Release);
        fence(Ordering::SeqCst);
        if c.consumer_sleeping.0.load(Ordering::Relaxed) == 1
            && c.consumer_sleeping.0.swap(0, Ordering::AcqRel) == 1
        {
            c.data_signal.0.fetch_add(1, Ordering::Release);
            let _ = futex::wake(&c.data_signal.0, futex::Flags::empty(), 1);
        }
        Ok(n)
    }

    /// How many bytes of this side's ring the peer has read, ever: a frame
    /// written at a position at or past it never reached the peer.
    pub fn consumed(&self) -> u64 {
        self.control(self.out_ring()).head.0.load(Ordering::Acquire)
    }

    /// Whether a whole frame of `len` bytes fits now.
    pub fn fits(&self, len: usize) -> Result<bool> {
        Ok(self.free()? >= len as u64)
    }

    /// Waits until the consumer frees space or `timeout` passes.
    pub fn wait_for_space(&self, timeout: Duration) -> Result<Woken> {
        let c = self.control(self.out_ring());
        let signal = c.space_signal.0.load(Ordering::Acquire);
        c.producer_waiting.0.store(1, Ordering::SeqCst);
        if self.free()? > 0 {
            return Ok(Woken::Signalled);
        }
        Ok(wait(&c.space_signal.0, signal, timeout))
    }

    /// Bytes waiting to be read.
    pub fn available(&self) -> Result<u64> {
        let c = self.control(self.in_ring());
        let tail = c.tail.0.load(Ordering::Acquire);
        let head = c.head.0.load(Ordering::Relaxed);
        used(tail, head)
    }

    /// Appends everything waiting to `buf` and frees it in the ring.
    /// Returns the number of bytes read. Only one thread may read at a
    /// time.
    pub fn read_into(&self, buf: &mut Vec<u8>) -> Result<usize> {
        let n = self.available()? as usize;
        if n == 0 {
            return Ok(0);
        }
        let ring = self.in_ring();
        let c = self.control(ring);
        let head = c.head.0.load(Ordering::Relaxed);
        // SAFETY: the ring's data is RING_CAPACITY bytes at `data(ring)`;
        // bytes [head, head + n) were published by the producer's release
        // store of `tail` (acquired in `available`) and it does not touch
        // them until `head` moves past them below.
        unsafe { copy_from_ring(self.data(ring), RING_CAPACITY, head, n, buf) };
        c.head.0.store(head + n as u64, Ordering::Release);
        fence(Ordering::SeqCst);
        if c.producer_waiting.0.load(Ordering::Relaxed) == 1
            && c.producer_waiting.0.swap(0, Ordering::AcqRel) == 1
        {
            c.space_signal.0.fetch_add(1, Ordering::Release);
            let _ = futex::wake(&c.space_signal.0, futex::Flags::empty(), 1);
        }
        Ok(n)
    }

    /// The consumer's half of the event count: announces that it is about
    /// to sleep and returns the signal value to wait on, or `None` if data
    /// arrived meanwhile.
    pub fn prepare_sleep(&self) -> Result<Option<u32>> {
        let c = self.control(self.in_ring());
        let signal = c.data_signal.0.load(Ordering::Acquire);
        c.consumer_sleeping.0.store(1, Ordering::SeqCst);
        if self.available()? > 0 {
            c.consumer_sleeping.0.store(0, Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some(signal))
    }

    /// Sleeps until the producer signals after `prepare_sleep` returned
    /// `signal`, or `timeout` passes.
    pub fn sleep(&self, signal: u32, timeout: Duration) -> Woken {
        wait(&self.control(self.in_ring()).data_signal.0, signal, timeout)
    }

    /// Tells producers that a reader is actively polling, so they need
    /// not wake anyone.
    pub fn mark_polling(&self) {
        self.control(self.in_ring())
            .consumer_sleeping
            .0
            .store(0, Ordering::SeqCst);
    }

    /// Ends active polling: the ring's sleeping reader becomes responsible
    /// again, and is woken if data is already waiting.
    pub fn end_polling(&self) -> Result<()> {
        let c = self.control(self.in_ring());
        c.consumer_sleeping.0.store(1, Ordering::SeqCst);
        if self.available()? > 0 {
            self.wake_reader();
        }
        Ok(())
    }

    /// Wakes this side's sleeping reader (on close, or to hand it data).
    pub fn wake_reader(&self) {
        let c = self.control(self.in_ring());
        c.consumer_sleeping.0.store(0, Ordering::Relaxed);
        c.data_signal.0.fetch_add(1, Ordering::Release);
        let _ = futex::wake(&c.data_signal.0, futex::Flags::empty(), i32::MAX as u32);
        let out = self.control(self.out_ring());
        out.space_signal.0.fetch_add(1, Ordering::Release);
        let _ = futex::wake(&out.space_signal.0, futex::Flags::empty(), i32::MAX as u32);
    }
}

/// Copies `bytes` into a ring of `capacity` bytes at `data`, at cursor
/// `pos` (which counts every byte that ever passed), wrapping at its end.
/// Shared by every byte ring in shared memory (connections' rings, stream
/// mailboxes).
///
/// # Safety
///
/// `data` is valid for writes of `capacity` bytes, `bytes.len() <=
/// capacity`, and no one else reads or writes the bytes at `[pos, pos +
/// bytes.len())` (modulo `capacity`) until the caller publishes them.
pub unsafe fn copy_into_ring(data: *mut u8, capacity: u64, pos: u64, bytes: &[u8]) {
    let n = bytes.len();
    let at = (pos % capacity) as usize;
    let first = n.min(capacity as usize - at);
    // SAFETY: `at + first <= capacity`, and the wrapped rest, `n - first`
    // bytes with `n <= capacity`, starts at offset 0; the caller promises
    // the range is valid and ours alone.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.add(at), first);
        std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), data, n - first);
    }
}

/// Appends `n` bytes of a ring of `capacity` bytes at `data`, from cursor
/// `pos`, to `out` (see [`copy_into_ring`]).
///
/// # Safety
///
/// `data` is valid for reads of `capacity` bytes, `n <= capacity`, and
/// the bytes at `[pos, pos + n)` (modulo `capacity`) were published to
/// this thread and are not written until the caller releases them.
pub unsafe fn copy_from_ring(
    data: *const u8,
    capacity: u64,
    pos: u64,
    n: usize,
    out: &mut Vec<u8>,
) {
    let at = (pos % capacity) as usize;
    let first = n.min(capacity as usize - at);
    let start = out.len();
    out.reserve(n);
    // SAFETY: `at + first <= capacity` and the wrapped rest starts at
    // offset 0; the caller promises the source range; `out` has `n`
    // reserved bytes after `start`, which `set_len` then covers.
    unsafe {
        let dst = out.as_mut_ptr().add(start);
        std::ptr::copy_nonoverlapping(data.add(at), dst, first);
        std::ptr::copy_nonoverlapping(data, dst.add(first), n - first);
        out.set_len(start + n);
    }
}

/// The fd number a peer opens through `/proc`.
pub fn raw_fd(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

/// Bytes between a ring's cursors, which the peer may have written
/// anything into. Cursors count every byte that ever passed through the
/// ring, so a tail within a ring's length of `u64::MAX` (2^64 bytes on) is
/// as corrupt as a head past the tail: advancing it would overflow.
fn used(tail: u64, head: u64) -> Result<u64> {
    match tail.checked_sub(head) {
        Some(u) if u <= RING_CAPACITY && tail <= u64::MAX - RING_CAPACITY => Ok(u),
        _ => Err(Error::BadRequest(format!(
            "ring corrupt: head {head}, tail {tail}"
        ))),
    }
}

fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> Woken {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs() as futex::Secs,
        tv_nsec: timeout.subsec_nanos() as futex::Nsecs,
    };
    match futex::wait(word, futex::Flags::empty(), expected, Some(&ts)) {
        Err(rustix::io::Errno::TIMEDOUT) => Woken::TimedOut,
        _ => Woken::Signalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (RingPair, RingPair, OwnedFd) {
        let (a, fd) = RingPair::create().unwrap();
        let b = RingPair::open(std::process::id(), raw_fd(&fd)).unwrap();
        (a, b, fd)
    }

    #[test]
    fn bytes_cross_in_both_directions_and_wrap() {
        let (a, b, _fd) = pair();
        let mut buf = Vec::new();
        let chunk: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        for round in 0..10 {
            assert_eq!(a.write_some(&chunk).unwrap(), chunk.len());
            buf.clear();
            assert_eq!(b.read_into(&mut buf).unwrap(), chunk.len(), "round {round}");
            assert_eq!(buf, chunk);
            assert_eq!(b.write_some(&chunk[..10]).unwrap(), 10);
            buf.clear();
            a.read_into(&mut buf).unwrap();
            assert_eq!(buf, &chunk[..10]);
        }
    }

    #[test]
    fn a_full_ring_takes_only_what_fits() {
        let (a, b, _fd) = pair();
        let big = vec![1u8; RING_CAPACITY as usize + 10];
        assert_eq!(a.write_some(&big).unwrap(), RING_CAPACITY as usize);
        assert_eq!(a.write_some(&big).unwrap(), 0);
        assert!(!a.fits(1).unwrap());
        let mut buf = Vec::new();
        b.read_into(&mut buf).unwrap();
        assert!(a.fits(RING_CAPACITY as usize).unwrap());
    }

    #[test]
    fn a_sleeping_reader_is_woken_by_a_write() {
        let (a, b, _fd) = pair();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                b.read_into(&mut buf).unwrap();
                if buf.len() >= 3 {
                    return buf;
                }
                if let Some(signal) = b.prepare_sleep().unwrap() {
                    b.sleep(signal, Duration::from_secs(30));
                }
            }
        });
        for byte in [1u8, 2, 3] {
            std::thread::yield_now();
            a.write_some(&[byte]).unwrap();
        }
        assert_eq!(reader.join().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_corrupt_cursor_is_an_error() {
        let (a, b, _fd) = pair();
        b.control(0)
            .tail
            .0
            .store(RING_CAPACITY * 5, Ordering::Release);
        assert!(b.available().is_err());
        assert!(a.free().is_err());
    }

    /// Found by `wire_fuzz::ring_with_hostile_cursors`: a peer that set
    /// both cursors of the ring this side writes near `u64::MAX` made the
    /// next write overflow the tail (a panic in debug builds, a wrapped
    /// cursor in release).
    #[test]
    fn cursors_at_the_top_of_the_range_are_an_error() {
        let (a, b, _fd) = pair();
        for c in [b.control(1), a.control(0)] {
            c.tail.0.store(u64::MAX - 10, Ordering::Release);
            c.head.0.store(u64::MAX - 20, Ordering::Release);
        }
        assert!(b.write_some(&[1; 64]).is_err());
        assert!(b.fits(1).is_err());
        assert!(a.write_some(&[1; 64]).is_err());
        assert!(b.read_into(&mut Vec::new()).is_err());
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(100).unwrap();
        let fd = OwnedFd::from(file);
        assert!(RingPair::open(std::process::id(), raw_fd(&fd)).is_err());
    }
}
