//! Lock-free single-producer single-consumer rings.
//!
//! One ring exists per (producer, consumer) pair and per class (data, messages, pool refill,
//! pool recycle), so no ring ever has two writers of the same index. That is what keeps the
//! platform consistent under `kill -9`: a producer that dies in the middle of a burst has
//! written entries but not published its index, so the consumer never sees a half-written
//! descriptor, and a shared multi-producer ring cannot be left with a reserved entry that is
//! never filled.
//!
//! Indices run freely over `u32` and wrap; the capacity is a power of two so an entry is
//! `index & mask`. The producer publishes `prod` with release ordering after writing the
//! entries; the consumer publishes `cons` with release ordering after reading them. Each side
//! keeps a cached copy of the other side's index so the common case touches no line that the
//! other core writes.
//!
//! Consumption is two-phase (`peek_burst` then `release`) so that a consumer can record that
//! it now owns the buffers it read *before* the producer may reuse the entries: a crash between
//! the two steps leaves the descriptors in the ring, where recovery finds them.
//!
//! The other process is not trusted to keep the indices sane: a corrupt index makes the ring
//! look full or empty (or yields descriptors that the caller validates), never an
//! out-of-bounds access.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::sync::{AtomicU32, Cell};

/// Keeps the memory behind a ring alive (the region mapping, or a heap block in tests).
pub type Backing = Arc<dyn Send + Sync>;

#[repr(C, align(64))]
struct Padded<T>(T);

/// The shared part of a ring: the two indices on separate cache lines, then the immutable
/// geometry written once by the region's creator.
#[repr(C, align(64))]
pub struct RingHeader {
    prod: Padded<AtomicU32>,
    cons: Padded<AtomicU32>,
    capacity: u32,
    elem_size: u32,
}

impl RingHeader {
    /// Bytes reserved for a header in front of the entries.
    pub const SIZE: usize = std::mem::size_of::<RingHeader>();

    /// Writes the immutable geometry. Called by the region creator before publishing it.
    pub(crate) fn init(&mut self, capacity: u32, elem_size: u32) {
        self.prod.0.store(0, Ordering::Relaxed);
        self.cons.0.store(0, Ordering::Relaxed);
        self.capacity = capacity;
        self.elem_size = elem_size;
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn elem_size(&self) -> u32 {
        self.elem_size
    }
}

/// A process-local view of one ring: where its header and entries are mapped.
pub struct RingView<T> {
    hdr: NonNull<RingHeader>,
    entries: NonNull<Cell<T>>,
    mask: u32,
    _backing: Backing,
}

// SAFETY: the view only holds addresses into memory kept alive by `_backing`; all access to
// the shared indices is atomic and entry access follows the SPSC protocol, so the view may move
// to another thread. It is deliberately not `Sync` (and neither are the endpoints built on it).
unsafe impl<T: Send> Send for RingView<T> {}

impl<T> fmt::Debug for RingView<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingView")
            .field("capacity", &(self.mask + 1))
            .finish()
    }
}

impl<T: Copy> RingView<T> {
    /// Builds a view over memory owned by `backing`, with `capacity` entries. The capacity is
    /// the caller's (checked against the layout), never re-read from the header: another
    /// process can write the header, and a capacity changed after the check would index
    /// past the entries.
    ///
    /// # Safety
    /// `capacity` must be a power of two; `hdr` must point to an initialised `RingHeader`
    /// followed (at `entries`) by `capacity` entries of `T`, all valid for as long as `backing`
    /// lives. `T` must be valid for every bit pattern, because another process writes the
    /// entries.
    pub(crate) unsafe fn from_raw(
        hdr: NonNull<RingHeader>,
        entries: NonNull<Cell<T>>,
        capacity: u32,
        backing: Backing,
    ) -> Self {
        debug_assert!(capacity.is_power_of_two());
        RingView {
            hdr,
            entries,
            mask: capacity - 1,
            _backing: backing,
        }
    }

    #[inline(always)]
    fn header(&self) -> &RingHeader {
        // SAFETY: `_backing` keeps the header mapped for the life of the view.
        unsafe { self.hdr.as_ref() }
    }

    #[inline(always)]
    fn entry(&self, index: u32) -> &Cell<T> {
        // SAFETY: `index & mask` is below the capacity, and the entries were laid out with that
        // capacity (constructor contract).
        unsafe { &*self.entries.as_ptr().add((index & self.mask) as usize) }
    }

    pub fn capacity(&self) -> u32 {
        self.mask + 1
    }

    /// How many entries the consumer has taken, ever (wrapping): a consumer whose count
    /// stands still while entries wait is not running.
    pub fn consumed(&self) -> u32 {
        self.header().cons.0.load(Ordering::Acquire)
    }

    /// Number of entries published but not yet consumed (a snapshot).
    pub fn occupancy(&self) -> u32 {
        let cons = self.header().cons.0.load(Ordering::Acquire);
        let prod = self.header().prod.0.load(Ordering::Acquire);
        prod.wrapping_sub(cons).min(self.capacity())
    }

    /// Copies the entries currently between the consumer and producer indices, without
    /// consuming them. Used by recovery to learn which buffers a dead producer still has in
    /// flight; the caller must ensure the producer is not running.
    pub fn snapshot(&self, out: &mut Vec<T>) {
        let cons = self.header().cons.0.load(Ordering::Acquire);
        let prod = self.header().prod.0.load(Ordering::Acquire);
        let n = prod.wrapping_sub(cons).min(self.capacity());
        for i in 0..n {
            // SAFETY: entries in [cons, prod) were published by the producer (acquire above).
            out.push(
                self.entry(cons.wrapping_add(i))
                    .with(|p| unsafe { p.read() }),
            );
        }
    }
}

/// The single writer of a ring.
pub struct Producer<T> {
    ring: RingView<T>,
    head: u32,
    cached_cons: u32,
}

impl<T: Copy> Producer<T> {
    /// Takes the producer role. Only one `Producer` may exist per ring at a time, across all
    /// processes; a replacement process resumes from the last published index.
    pub fn new(ring: RingView<T>) -> Self {
        let head = ring.header().prod.0.load(Ordering::Acquire);
        let cached_cons = ring.header().cons.0.load(Ordering::Acquire);
        Producer {
            ring,
            head,
            cached_cons,
        }
    }

    #[inline(always)]
    fn free_with_cached(&self) -> u32 {
        let used = self.head.wrapping_sub(self.cached_cons);
        self.ring.capacity().saturating_sub(used)
    }

    /// Free entries, refreshing the consumer index.
    pub fn free_space(&mut self) -> u32 {
        self.cached_cons = self.ring.header().cons.0.load(Ordering::Acquire);
        self.free_with_cached()
    }

    /// Enqueues as many of `items` as fit, in order, and publishes them at once.
    /// Returns how many were enqueued.
    #[inline]
    pub fn push_burst(&mut self, items: &[T]) -> usize {
        let mut free = self.free_with_cached();
        if (free as usize) < items.len() {
            self.cached_cons = self.ring.header().cons.0.load(Ordering::Acquire);
            free = self.free_with_cached();
        }
        let n = items.len().min(free as usize);
        if n == 0 {
            return 0;
        }
        for (i, item) in items[..n].iter().enumerate() {
            let entry = self.ring.entry(self.head.wrapping_add(i as u32));
            // SAFETY: the entry lies outside [cons, prod) so the consumer does not read it
            // until `prod` is published below.
            entry.with_mut(|p| unsafe { p.write(*item) });
        }
        self.head = self.head.wrapping_add(n as u32);
        self.ring
            .header()
            .prod
            .0
            .store(self.head, Ordering::Release);
        n
    }

    /// Enqueues one item; false when the ring is full.
    #[inline]
    pub fn push(&mut self, item: T) -> bool {
        self.push_burst(std::slice::from_ref(&item)) == 1
    }

    pub fn view(&self) -> &RingView<T> {
        &self.ring
    }

    /// Total entries this ring's producers have published (wrapping).
    pub fn published(&self) -> u32 {
        self.head
    }
}

/// The single reader of a ring.
pub struct Consumer<T> {
    ring: RingView<T>,
    tail: u32,
    cached_prod: u32,
    peeked: u32,
}

impl<T: Copy> Consumer<T> {
    /// Takes the consumer role. Only one `Consumer` may exist per ring at a time, across all
    /// processes; a replacement resumes from the last released index.
    pub fn new(ring: RingView<T>) -> Self {
        let tail = ring.header().cons.0.load(Ordering::Acquire);
        let cached_prod = ring.header().prod.0.load(Ordering::Acquire);
        Consumer {
            ring,
            tail,
            cached_prod,
            peeked: 0,
        }
    }

    #[inline(always)]
    fn avail_with_cached(&self) -> u32 {
        // A producer that published an index more than `capacity` ahead is corrupt; reading
        // at most `capacity` entries keeps us inside the ring (the caller validates contents).
        self.cached_prod
            .wrapping_sub(self.tail)
            .min(self.ring.capacity())
    }

    /// True when nothing is published beyond what this consumer has read.
    #[inline]
    pub fn is_empty(&mut self) -> bool {
        if self.avail_with_cached() > 0 {
            return false;
        }
        self.cached_prod = self.ring.header().prod.0.load(Ordering::Acquire);
        self.avail_with_cached() == 0
    }

    /// Copies up to `out.len()` entries without consuming them. The entries stay reserved for
    /// this consumer until `release`; peeking again returns the same entries.
    #[inline]
    pub fn peek_burst(&mut self, out: &mut [T]) -> usize {
        let mut avail = self.avail_with_cached();
        if (avail as usize) < out.len() {
            self.cached_prod = self.ring.header().prod.0.load(Ordering::Acquire);
            avail = self.avail_with_cached();
        }
        let n = out.len().min(avail as usize);
        for (i, dst) in out[..n].iter_mut().enumerate() {
            let entry = self.ring.entry(self.tail.wrapping_add(i as u32));
            // SAFETY: the entry lies in [cons, prod): published by the producer (acquire above)
            // and not reusable by it until we release.
            *dst = entry.with(|p| unsafe { p.read() });
        }
        self.peeked = n as u32;
        n
    }

    /// Hands the first `n` peeked entries back to the producer.
    #[inline]
    pub fn release(&mut self, n: usize) {
        let n = (n as u32).min(self.peeked);
        self.peeked = 0;
        if n == 0 {
            return;
        }
        self.tail = self.tail.wrapping_add(n);
        self.ring
            .header()
            .cons
            .0
            .store(self.tail, Ordering::Release);
    }

    /// Peek and release in one step, for entries that carry no ownership.
    #[inline]
    pub fn pop_burst(&mut self, out: &mut [T]) -> usize {
        let n = self.peek_burst(out);
        self.release(n);
        n
    }

    pub fn view(&self) -> &RingView<T> {
        &self.ring
    }
}

/// Allocates a ring on the heap, for tests, loom models and in-process benchmarks.
pub fn heap_ring<T: Copy + Default + Send + 'static>(capacity: u32) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity.is_power_of_two(),
        "ring capacity must be a power of two"
    );
    struct HeapRing<T> {
        hdr: Box<RingHeader>,
        entries: Box<[Cell<T>]>,
    }
    // SAFETY: the heap ring is only reached through the SPSC protocol (see `RingView`).
    unsafe impl<T: Send> Sync for HeapRing<T> {}
    // SAFETY: it owns its header and entries; moving it to another thread moves them whole.
    unsafe impl<T: Send> Send for HeapRing<T> {}

    let hdr = Box::new(RingHeader {
        prod: Padded(AtomicU32::new(0)),
        cons: Padded(AtomicU32::new(0)),
        capacity,
        elem_size: std::mem::size_of::<T>() as u32,
    });
    let entries: Box<[Cell<T>]> = (0..capacity).map(|_| Cell::new(T::default())).collect();
    let backing = Arc::new(HeapRing { hdr, entries });
    let hdr_ptr = NonNull::from(&*backing.hdr);
    let entries_ptr = NonNull::new(backing.entries.as_ptr() as *mut Cell<T>).expect("non-null");
    let keep: Backing = backing.clone();
    // SAFETY: header initialised above with a power-of-two capacity; `capacity` entries follow
    // at `entries_ptr`; both live as long as `backing`, which each view holds.
    let (a, b) = unsafe {
        (
            RingView::from_raw(hdr_ptr, entries_ptr, capacity, keep.clone()),
            RingView::from_raw(hdr_ptr, entries_ptr, capacity, keep),
        )
    };
    (Producer::new(a), Consumer::new(b))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn burst_roundtrip_and_wraparound() {
        let (mut p, mut c) = heap_ring::<u64>(8);
        let mut out = [0u64; 8];
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..1000 {
            let burst: Vec<u64> = (next_in..next_in + (round % 7) + 1).collect();
            let n = p.push_burst(&burst);
            next_in += n as u64;
            let m = c.pop_burst(&mut out[..(round as usize % 5) + 1]);
            for v in &out[..m] {
                assert_eq!(*v, next_out);
                next_out += 1;
            }
        }
        while !c.is_empty() {
            let m = c.pop_burst(&mut out);
            for v in &out[..m] {
                assert_eq!(*v, next_out);
                next_out += 1;
            }
        }
        assert_eq!(next_in, next_out);
    }

    #[test]
    fn full_ring_rejects_and_reports_free_space() {
        let (mut p, mut c) = heap_ring::<u32>(4);
        assert_eq!(p.push_burst(&[1, 2, 3, 4, 5]), 4);
        assert!(!p.push(6));
        assert_eq!(p.free_space(), 0);
        let mut out = [0u32; 2];
        assert_eq!(c.pop_burst(&mut out), 2);
        assert_eq!(out, [1, 2]);
        assert_eq!(p.free_space(), 2);
        assert_eq!(p.view().occupancy(), 2);
    }

    #[test]
    fn peek_without_release_keeps_entries() {
        let (mut p, mut c) = heap_ring::<u32>(4);
        p.push_burst(&[7, 8, 9]);
        let mut out = [0u32; 4];
        assert_eq!(c.peek_burst(&mut out), 3);
        assert_eq!(c.peek_burst(&mut out), 3);
        c.release(1);
        assert_eq!(c.peek_burst(&mut out), 2);
        assert_eq!(&out[..2], &[8, 9]);
        let mut snap = Vec::new();
        c.view().snapshot(&mut snap);
        assert_eq!(snap, vec![8, 9]);
    }

    #[test]
    fn replacement_endpoints_resume_from_published_indices() {
        let (mut p, mut c) = heap_ring::<u32>(4);
        p.push_burst(&[1, 2, 3]);
        let mut out = [0u32; 1];
        c.pop_burst(&mut out);
        // A new producer and consumer (as after a process restart) pick up where the
        // published indices are.
        let mut p2 = Producer::new(unsafe_clone_view(p.view()));
        drop(p);
        let mut c2 = Consumer::new(unsafe_clone_view(c.view()));
        drop(c);
        assert_eq!(p2.push_burst(&[4, 5]), 2);
        let mut all = [0u32; 4];
        assert_eq!(c2.pop_burst(&mut all), 4);
        assert_eq!(all, [2, 3, 4, 5]);
    }

    fn unsafe_clone_view<T: Copy>(v: &RingView<T>) -> RingView<T> {
        // SAFETY: same memory, same backing; the test hands roles over sequentially.
        unsafe { RingView::from_raw(v.hdr, v.entries, v.capacity(), v._backing.clone()) }
    }

    #[test]
    fn corrupt_producer_index_is_clamped() {
        let (p, mut c) = heap_ring::<u32>(4);
        p.view().header().prod.0.store(1_000_000, Ordering::Release);
        let mut out = [0u32; 16];
        assert_eq!(c.pop_burst(&mut out), 4);
        let (mut p2, c2) = heap_ring::<u32>(4);
        c2.view().header().cons.0.store(77, Ordering::Release);
        assert_eq!(
            p2.free_space(),
            0,
            "a consumer index ahead of prod reads as full"
        );
        assert_eq!(p2.push_burst(&[1]), 0);
    }
}

#[cfg(loom)]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Every interleaving of a producer pushing bursts and a consumer popping them through a
    /// ring smaller than the total: nothing lost, nothing duplicated, order kept.
    #[test]
    fn spsc_bursts_preserve_order() {
        loom::model(|| {
            let (mut p, mut c) = heap_ring::<u32>(2);
            let t = thread::spawn(move || {
                let items = [1u32, 2, 3];
                let mut sent = 0;
                while sent < items.len() {
                    let n = p.push_burst(&items[sent..]);
                    sent += n;
                    if n == 0 {
                        thread::yield_now();
                    }
                }
            });
            let mut got = Vec::new();
            let mut out = [0u32; 2];
            while got.len() < 3 {
                let n = c.pop_burst(&mut out);
                got.extend_from_slice(&out[..n]);
                if n == 0 {
                    thread::yield_now();
                }
            }
            t.join().unwrap();
            assert_eq!(got, vec![1, 2, 3]);
        });
    }

    /// Two-phase consumption: entries peeked but not released are never overwritten.
    #[test]
    fn peeked_slots_are_not_reused_before_release() {
        loom::model(|| {
            let (mut p, mut c) = heap_ring::<u32>(2);
            assert_eq!(p.push_burst(&[10, 11]), 2);
            let t = thread::spawn(move || {
                // Try to reuse entries while the consumer holds a peek.
                let mut pushed = Vec::new();
                for v in [12u32, 13] {
                    if p.push(v) {
                        pushed.push(v);
                    }
                }
                pushed
            });
            let mut out = [0u32; 2];
            let n = c.peek_burst(&mut out);
            assert_eq!(&out[..n], &[10, 11]);
            let again = c.peek_burst(&mut out);
            assert_eq!(&out[..again], &[10, 11]);
            c.release(2);
            let pushed = t.join().unwrap();
            let mut rest = [0u32; 2];
            let m = c.pop_burst(&mut rest);
            assert_eq!(&rest[..m], &pushed[..]);
        });
    }
}
