//! Cache hints. Prefetching never faults, whatever the address, and has no effect beyond
//! the cache; taking a reference keeps callers from computing addresses by hand.

/// Starts loading the cache line holding `r`.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch hint on the address of a live reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch(r as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
