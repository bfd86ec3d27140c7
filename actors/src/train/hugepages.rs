//! Large arrays that the training loop reads and writes at random (the
//! parameter tables, serving's dense weights) on transparent huge pages.
//!
//! A 32 MiB table touched at random misses the TLB on almost every access
//! with 4 KiB pages, and each first touch of a page faults. Backed by
//! 2 MiB pages it needs 16 faults instead of 8,192 and its translations
//! fit the TLB. Linux applies huge pages to ranges advised with
//! `MADV_HUGEPAGE` when `/sys/kernel/mm/transparent_hugepage/enabled` is
//! `madvise` (the common default) or `always`; elsewhere the advice is
//! refused and the arrays work as before.

/// The huge-page size advised ranges are aligned to.
const HUGE: usize = 2 << 20;

/// Advises the kernel to back `v`'s whole huge pages (of its capacity, not
/// yet touched) with huge pages. Advice only: a refusal changes nothing.
pub(crate) fn advise<T>(v: &Vec<T>) {
    let bytes = v.capacity().saturating_mul(size_of::<T>());
    if bytes < 2 * HUGE {
        return;
    }
    let start = v.as_ptr() as usize;
    let first = start.next_multiple_of(HUGE);
    let end = (start + bytes) / HUGE * HUGE;
    if end <= first {
        return;
    }
    // SAFETY: `[first, end)` lies inside `v`'s allocation (rounded inward
    // to huge-page boundaries, which are page boundaries), which this
    // process owns. MADV_HUGEPAGE only changes how the kernel backs the
    // range with physical pages; it never changes the memory's contents,
    // its validity or who may access it, so no reference is invalidated.
    let advised = unsafe {
        rustix::mm::madvise(
            first as *mut std::ffi::c_void,
            end - first,
            rustix::mm::Advice::LinuxHugepage,
        )
    };
    if let Err(e) = advised {
        tracing::debug!("huge pages not available: {e}");
    }
}

/// `n` copies of `value` in a buffer advised for huge pages before it is
/// first written.
pub(crate) fn filled<T: Copy>(n: usize, value: T) -> Vec<T> {
    filled_with(n, || value)
}

/// `n` values made by `make` in a buffer advised for huge pages before
/// it is first written.
pub(crate) fn filled_with<T>(n: usize, make: impl FnMut() -> T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise(&v);
    v.resize_with(n, make);
    v
}

/// A copy of `items` in a buffer advised for huge pages.
pub(crate) fn copied<T: Copy>(items: &[T]) -> Vec<T> {
    let mut v = Vec::with_capacity(items.len());
    advise(&v);
    v.extend_from_slice(items);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_and_copied_hold_the_values() {
        let v = filled(3 << 20, 7u32);
        assert_eq!(v.len(), 3 << 20);
        assert!(v.iter().all(|&x| x == 7));
        let c = copied(&v);
        assert_eq!(c, v);
        assert_eq!(filled(3, 1u8), vec![1, 1, 1]);
        let mut next = 0;
        let made = filled_with(3 << 20, || {
            next += 1;
            next
        });
        assert_eq!(
            (made.len(), made.first(), made.last()),
            (3 << 20, Some(&1), Some(&(3 << 20)))
        );
    }
}
