//! Memory hints. Prefetching never faults, whatever the address, and has no effect beyond
//! the cache; taking a reference keeps callers from computing addresses by hand. Huge-page
//! advice changes only how the kernel backs memory.

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

/// Size of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the 2 MiB-aligned stretches of `len` bytes from `start` with
/// transparent huge pages (`madvise(MADV_HUGEPAGE)`; Debian's default is to use them only
/// where asked). For a runtime's flow records and index, read at random one line a packet
/// over up to hundreds of megabytes: with 4 KiB pages almost every such read is also a TLB
/// miss and a page walk, with 2 MiB pages the TLB covers gigabytes. The kernel also tears
/// a killed process down faster when it maps fewer, larger pages (its death is seen only
/// after that). Best effort: where huge pages are off, or the call fails, nothing changes.
/// On a VM whose hypervisor takes back free 2 MiB blocks (virtio-balloon free page
/// reporting), a huge page's first touch also faults in the host, several times slower
/// than zeroing it: docs/PERFORMANCE.md, twenty-first run.
pub fn prefer_huge_pages(start: *const u8, len: usize) {
    let begin = (start as usize).next_multiple_of(HUGE_PAGE);
    let end = (start as usize).saturating_add(len) & !(HUGE_PAGE - 1);
    if end <= begin {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: MADV_HUGEPAGE changes how the kernel backs the (page-aligned) range, never
    // what it holds or whether it is mapped; on memory that is not ours it fails or is
    // without effect on this process's values.
    unsafe {
        libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_HUGEPAGE);
    }
}
