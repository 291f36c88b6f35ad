//! Cache hints. Prefetching never faults, whatever the address, and has no effect beyond
//! the cache; taking a reference keeps callers from computing addresses by hand.

/// Starts loading every cache line `r` lies on: the first, and the last when the value
/// straddles a line boundary (an 80-byte flow actor in a slab does, half the time; the
/// chain then waited on the line the prefetch had not asked for).
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let first = r as *const T as *const u8;
        let size = std::mem::size_of::<T>().max(1);
        // SAFETY: prefetch hints on the first and last byte of a live reference.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch(first as *const i8, _MM_HINT_T0);
            let last = first.add(size - 1);
            if (first as usize) >> 6 != (last as usize) >> 6 {
                _mm_prefetch(last as *const i8, _MM_HINT_T0);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Starts loading the cache line holding the byte at `p` (any address: a prefetch never
/// faults).
#[inline(always)]
pub fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch hint; it reads nothing and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
