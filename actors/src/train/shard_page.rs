//! A shard's page: what a worker in another process on the same machine
//! needs to pull from the shard's table in place, without a call.
//!
//! The shard's process creates one small `memfd` per shard ([`ShardPage`])
//! holding its clocks (each worker's, and the least over the live
//! workers: the step every live worker's pushes are applied up to), a
//! `stopped` flag, a futex word it bumps when either
//! changes, and the descriptor of its table's shared slots
//! ([`ParamTable::share`](super::table::ParamTable::share)), which moves
//! when the table grows. A worker maps the page read-write (it waits on
//! the futex word) and the table read-only ([`PageReader`]).
//!
//! # Consistency
//!
//! The shard writes its table, then stores its clock with release
//! ordering; a worker loads the clock with acquire ordering, waits while
//! its consistency mode requires (`min_clock + τ ≥ step`), then reads.
//! * **BSP** (τ = 0): a worker at step `s` reads once every step below
//!   `s` is applied, and nothing changes the table until every worker has
//!   pushed step `s`, this one included, which it does only after its
//!   read. So the read sees exactly what a pull under the shard's lock
//!   would, and runs stay byte-identical.
//! * **SSP** (τ > 0) and **ASP**: other workers' pushes may be applied
//!   while a worker reads (as with Hogwild); each weight is read whole
//!   (word-atomic loads), the staleness bound on clocks holds, and a key
//!   being inserted or moved by an eviction may read as absent (0).
//! * **A worker's own pushes**, in every mode: a worker at step `s` reads
//!   once its own pushes up to step `s − 3` are applied ([`OWN_LAG`]), so
//!   it computes one step while the shard applies its two previous ones,
//!   but never runs further ahead of its own updates. Without this bound
//!   an ASP worker that outpaces its shard would read weights as many
//!   steps old as its channel's credit allows, and every step's updates
//!   to hot keys (the bias first) would overshoot. Two steps of lag keep
//!   the logloss within 0.0005 of one step's, and let a worker ride out a
//!   shard that was scheduled late (on 2 cores shared by 7 processes, one
//!   step of lag left the graph waiting 38% of the time); four steps did
//!   not add speed and lost up to 0.002.
//!
//! A waiting worker checks that the shard's process lives every few
//! milliseconds and gives up at the pull timeout, so a dead shard is an
//! error, not a hang.

use super::ps::{PullError, PullStats};
use super::table::{SlotState, SlotsView};
use rustix::fs::MemfdFlags;
use rustix::thread::futex;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MAGIC: u64 = 0x6272_6169_6470_6167;
const PAGE: u64 = 4096;
/// Steps of its own pushes a worker may have unapplied when it reads:
/// the two it pushed last.
pub const OWN_LAG: u64 = 2;
/// How often a waiting worker checks that the shard's process lives.
const LIVENESS_CHECK: Duration = Duration::from_millis(20);

#[repr(C)]
struct Page {
    magic: AtomicU64,
    /// Bumped around a table change: odd while `table_fd` is written.
    table_seq: AtomicU64,
    table_fd: AtomicI32,
    stopped: AtomicU32,
    min_clock: AtomicU64,
    /// Bumped at every clock or `stopped` change; workers wait on it.
    signal: AtomicU32,
    waiters: AtomicU32,
    workers: AtomicU64,
}

/// Bytes of a page for `workers` workers: the header, then a clock per
/// worker.
fn page_len(workers: usize) -> Option<u64> {
    let clocks = (workers as u64).checked_mul(8)?;
    Some(
        (std::mem::size_of::<Page>() as u64)
            .checked_add(clocks)?
            .div_ceil(PAGE)
            * PAGE,
    )
}

/// Where a shard's page is: the shard's process and its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageAddr {
    /// The shard's process.
    pub pid: u32,
    /// Its descriptor of the page.
    pub fd: i32,
}

/// Why a shard's page could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The page could not be created, opened or mapped.
    #[error("shard page {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a shard page.
    #[error("{0} is not a shard page")]
    NotAPage(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PageError {
    let what = what.into();
    move |source| PageError::Io { what, source }
}

fn page(map: &memmap2::MmapRaw) -> &Page {
    // SAFETY: every mapping passed here is at least one page long
    // (checked when it is made or opened) and page-aligned; `Page` is
    // atomics only, valid for any bits, and shared memory is only ever
    // accessed through them.
    unsafe { &*(map.as_ptr() as *const Page) }
}

/// Worker `worker`'s clock on a page mapped as `map`, if it has one.
fn worker_clock(map: &memmap2::MmapRaw, worker: usize) -> Option<&AtomicU64> {
    let workers = page(map).workers.load(Ordering::Relaxed);
    let end = page_len(worker.checked_add(1)?)?;
    if worker as u64 >= workers || end > map.len() as u64 {
        return None;
    }
    let at = std::mem::size_of::<Page>() + worker * 8;
    // SAFETY: `at + 8 ≤ page_len(worker + 1) ≤ map.len()`, so the word
    // lies inside the mapping; `size_of::<Page>()` is a multiple of 8 (its
    // fields are 8-byte atomics or pairs of 4-byte ones), so it is
    // aligned; an `AtomicU64` is valid for any bits.
    Some(unsafe { &*(map.as_ptr().add(at) as *const AtomicU64) })
}

/// A shard's page, owned by the shard's process.
pub struct ShardPage {
    fd: OwnedFd,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for ShardPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardPage(fd {})", self.fd.as_raw_fd())
    }
}

impl ShardPage {
    /// A new page for `workers` workers, with no table yet and every
    /// clock 0.
    pub fn create(workers: usize) -> Result<Self, PageError> {
        let len =
            page_len(workers).ok_or_else(|| PageError::NotAPage("too many workers".into()))?;
        let fd = rustix::fs::memfd_create("braid-shard-page", MemfdFlags::CLOEXEC)
            .map_err(|e| io("create")(e.into()))?;
        let file = std::fs::File::from(fd);
        file.set_len(len).map_err(io("size"))?;
        let map = memmap2::MmapRaw::map_raw(&file).map_err(io("map"))?;
        let p = page(&map);
        p.table_fd.store(-1, Ordering::Relaxed);
        p.workers.store(workers as u64, Ordering::Relaxed);
        p.magic.store(MAGIC, Ordering::Release);
        Ok(ShardPage {
            fd: file.into(),
            map,
        })
    }

    /// Where workers find this page.
    pub fn addr(&self) -> PageAddr {
        PageAddr {
            pid: std::process::id(),
            fd: self.fd.as_raw_fd(),
        }
    }

    /// Points workers at the table whose shared slots this process holds
    /// open as `fd` (a no-op if it already does).
    pub fn set_table(&self, fd: RawFd) {
        let p = page(&self.map);
        if p.table_fd.load(Ordering::Relaxed) == fd && p.table_seq.load(Ordering::Relaxed) > 0 {
            return;
        }
        p.table_seq.fetch_add(1, Ordering::AcqRel);
        p.table_fd.store(fd, Ordering::Release);
        p.table_seq.fetch_add(1, Ordering::Release);
    }

    /// Publishes the shard's clocks (each worker's, and the least over
    /// the live workers), after the table writes they cover.
    pub fn set_clocks(&self, min_clock: u64, clocks: &[u64]) {
        let p = page(&self.map);
        let mut changed = false;
        for (w, &c) in clocks.iter().enumerate() {
            if let Some(word) = worker_clock(&self.map, w) {
                if word.load(Ordering::Relaxed) != c {
                    word.store(c, Ordering::Release);
                    changed = true;
                }
            }
        }
        if p.min_clock.load(Ordering::Relaxed) != min_clock {
            p.min_clock.store(min_clock, Ordering::Release);
            changed = true;
        }
        if changed {
            self.signal();
        }
    }

    /// Tells waiting workers the shard has stopped.
    pub fn stop(&self) {
        page(&self.map).stopped.store(1, Ordering::Release);
        self.signal();
    }

    fn signal(&self) {
        let p = page(&self.map);
        p.signal.fetch_add(1, Ordering::Release);
        if p.waiters.load(Ordering::SeqCst) > 0 {
            // The kernel reads the count as an `int`: `u32::MAX` would be
            // -1 and wake one waiter only.
            let _ = futex::wake(&p.signal, futex::Flags::empty(), i32::MAX as u32);
        }
    }
}

/// A worker's mapping of a shard's page and table.
pub struct PageReader<S> {
    addr: PageAddr,
    map: memmap2::MmapRaw,
    table: Option<(u64, SlotsView<S>)>,
}

impl<S: SlotState> PageReader<S> {
    /// Maps the page at `addr`.
    pub fn open(addr: PageAddr) -> Result<Self, PageError> {
        let path = format!("/proc/{}/fd/{}", addr.pid, addr.fd);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(format!("open {path}")))?;
        let len = file.metadata().map_err(io(format!("stat {path}")))?.len();
        if len < PAGE || len % PAGE != 0 {
            return Err(PageError::NotAPage(path));
        }
        let map = memmap2::MmapRaw::map_raw(&file).map_err(io(format!("map {path}")))?;
        let p = page(&map);
        if p.magic.load(Ordering::Acquire) != MAGIC
            || page_len(p.workers.load(Ordering::Relaxed) as usize) != Some(len)
        {
            return Err(PageError::NotAPage(path));
        }
        Ok(PageReader {
            addr,
            map,
            table: None,
        })
    }

    /// The shard's table as of now, mapped anew if it moved.
    fn table(&mut self, shard: usize) -> Result<&SlotsView<S>, PullError> {
        let p = page(&self.map);
        let fresh = |seq: u64, t: &Option<(u64, SlotsView<S>)>| matches!(t, Some((at, view)) if *at == seq && !view.moved());
        let started = Instant::now();
        loop {
            let seq = p.table_seq.load(Ordering::Acquire);
            if fresh(seq, &self.table) {
                break;
            }
            let fd = p.table_fd.load(Ordering::Acquire);
            if seq % 2 == 0 && fd >= 0 && p.table_seq.load(Ordering::Acquire) == seq {
                match SlotsView::open(self.addr.pid, fd) {
                    Ok(view) if !view.moved() => {
                        self.table = Some((seq, view));
                        break;
                    }
                    // Moved between the page's update and this open: the
                    // shard is about to point at the next one.
                    Ok(_) => {}
                    Err(e) if p.table_seq.load(Ordering::Acquire) == seq => {
                        return Err(PullError::Unreachable(shard, e.to_string()));
                    }
                    Err(_) => {}
                }
            }
            if started.elapsed() > LIVENESS_CHECK * 50 {
                return Err(PullError::Unreachable(
                    shard,
                    "the shard's table did not settle".into(),
                ));
            }
            std::thread::yield_now();
        }
        match &self.table {
            Some((_, view)) => Ok(view),
            None => Err(PullError::Unreachable(shard, "no table".into())),
        }
    }

    fn alive(&self) -> bool {
        rustix::process::Pid::from_raw(self.addr.pid as i32)
            .map(rustix::process::test_kill_process)
            .is_some_and(|r| r.is_ok())
    }

    /// Waits until worker `worker`'s step `step` may read shard `shard`
    /// under a staleness bound `staleness` (`None`: ASP, never waits for
    /// other workers) and with its own pushes applied up to [`OWN_LAG`]
    /// steps back, then runs `read` on its table.
    pub fn read<T>(
        &mut self,
        shard: usize,
        worker: usize,
        step: u64,
        staleness: Option<u64>,
        timeout: Duration,
        read: impl FnOnce(&SlotsView<S>) -> T,
    ) -> Result<(PullStats, T), PullError> {
        let started = Instant::now();
        let p = page(&self.map);
        let own = worker_clock(&self.map, worker).ok_or_else(|| {
            PullError::Unreachable(shard, format!("the shard's page has no worker {worker}"))
        })?;
        let min = loop {
            let signal = p.signal.load(Ordering::Acquire);
            if p.stopped.load(Ordering::Acquire) != 0 {
                return Err(PullError::Stopped(shard));
            }
            let min = p.min_clock.load(Ordering::Acquire);
            let mine = own.load(Ordering::Acquire);
            if staleness.is_none_or(|tau| min.saturating_add(tau) >= step)
                && mine.saturating_add(OWN_LAG) >= step
            {
                break min;
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(PullError::Timeout {
                    shard,
                    step,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            if !self.alive() {
                return Err(PullError::Unreachable(
                    shard,
                    format!("the shard's process {} is gone", self.addr.pid),
                ));
            }
            p.waiters.fetch_add(1, Ordering::SeqCst);
            if p.signal.load(Ordering::SeqCst) == signal {
                let nap = LIVENESS_CHECK.min(timeout - waited);
                let ts = futex::Timespec {
                    tv_sec: nap.as_secs() as futex::Secs,
                    tv_nsec: nap.subsec_nanos() as futex::Nsecs,
                };
                let _ = futex::wait(&p.signal, futex::Flags::empty(), signal, Some(&ts));
            }
            p.waiters.fetch_sub(1, Ordering::SeqCst);
        };
        let view = self.table(shard)?;
        let out = read(view);
        Ok((
            PullStats {
                min_clock: min,
                staleness: step.saturating_sub(min.min(step)),
            },
            out,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::table::ParamTable;

    fn shared_table() -> ParamTable<[f32; 2]> {
        let mut table = ParamTable::new();
        table.insert(5, [1.0, 2.0]);
        table.share().expect("shared");
        table
    }

    #[test]
    fn a_reader_waits_for_the_clock_its_step_needs_then_reads_in_place() {
        let table = shared_table();
        let page = ShardPage::create(2).expect("a page");
        page.set_table(table.shared_fd().expect("shared"));
        let mut reader = PageReader::<[f32; 2]>::open(page.addr()).expect("mapped");
        let timeout = Duration::from_secs(30);
        // ASP never waits; step 0 needs nothing under BSP.
        let (stats, got) = reader
            .read(0, 0, 1, None, timeout, |t| t.get(5))
            .expect("read");
        assert_eq!(
            (stats.min_clock, stats.staleness, got),
            (0, 1, Some([1.0, 2.0]))
        );
        let (_, got) = reader
            .read(0, 0, 0, Some(0), timeout, |t| t.get(5))
            .expect("read");
        assert_eq!(got, Some([1.0, 2.0]));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| reader.read(0, 1, 2, Some(0), timeout, |t| t.get(5)));
            page.set_clocks(1, &[1, 1]);
            page.set_clocks(2, &[2, 2]);
            let (stats, got) = waiting.join().expect("joined").expect("read");
            assert_eq!(
                (stats.min_clock, stats.staleness, got),
                (2, 0, Some([1.0, 2.0]))
            );
        });
        // Even under ASP a worker reads only once its own pushes are
        // applied up to OWN_LAG steps back.
        let short = Duration::from_millis(50);
        let ahead = 3 + OWN_LAG;
        assert!(matches!(
            reader.read(0, 0, ahead, None, short, |_| ()),
            Err(PullError::Timeout { step, .. }) if step == ahead
        ));
        page.set_clocks(2, &[3, 2]);
        assert!(reader.read(0, 0, ahead, None, short, |_| ()).is_ok());
        assert!(reader.read(0, 1, ahead, None, short, |_| ()).is_err());
    }

    #[test]
    fn a_stopped_shard_or_a_clock_that_never_comes_is_an_error_not_a_hang() {
        let table = shared_table();
        let page = ShardPage::create(2).expect("a page");
        page.set_table(table.shared_fd().expect("shared"));
        let mut reader = PageReader::<[f32; 2]>::open(page.addr()).expect("mapped");
        let short = Duration::from_millis(50);
        assert!(matches!(
            reader.read(3, 0, 1, Some(0), short, |_| ()),
            Err(PullError::Timeout {
                shard: 3,
                step: 1,
                ..
            })
        ));
        std::thread::scope(|s| {
            let waiting =
                s.spawn(|| reader.read(3, 0, 1, Some(0), Duration::from_secs(30), |_| ()));
            page.stop();
            assert!(matches!(
                waiting.join().expect("joined"),
                Err(PullError::Stopped(3))
            ));
        });
    }

    #[test]
    fn a_file_that_is_not_a_page_is_refused() {
        let file = tempfile::tempfile().expect("a file");
        file.set_len(PAGE).expect("sized");
        // (A page's magic is missing.)
        let addr = PageAddr {
            pid: std::process::id(),
            fd: file.as_raw_fd(),
        };
        assert!(matches!(
            PageReader::<[f32; 2]>::open(addr),
            Err(PageError::NotAPage(_))
        ));
    }
}
