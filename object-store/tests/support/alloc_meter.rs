//! A global allocator that meters what the current thread allocates, so a
//! fuzz target can assert that a decoder's memory is bounded by its input
//! and never by a length field it read.
//!
//! Shared by the fuzz targets of every crate (`#[path]`-included); each test
//! binary installs it with `#[global_allocator]`.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// No single allocation may ask for more: the process fails it (and aborts
/// with "memory allocation of N bytes failed") rather than let a decoder
/// take the machine's memory.
pub const HARD_CAP: usize = 1 << 30;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting this thread's live bytes and their peak.
pub struct Meter;

// SAFETY: every method forwards to `System` with the same arguments; the
// bookkeeping touches only const-initialized thread-locals without
// destructors, which never allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HARD_CAP {
            return std::ptr::null_mut();
        }
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

/// Runs `f` and returns its result with the most bytes this thread held
/// at once during it, above what it held before.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, peak.saturating_sub(base))
}

/// Asserts that `f`, decoding `input_len` bytes, held at most a bounded
/// multiple of its input plus `slack` bytes at once.
pub fn assert_bounded<R>(input_len: usize, slack: usize, f: impl FnOnce() -> R) -> R {
    let (out, peak) = measure(f);
    let bound = input_len.saturating_mul(64).saturating_add(slack);
    assert!(
        peak <= bound,
        "decoding {input_len} bytes held {peak} bytes at once (bound {bound})"
    );
    out
}
