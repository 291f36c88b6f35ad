//! The packet buffer pool and its recovery after a process dies.
//!
//! nfmgr's data-plane thread is the only owner of the global free stack ([`ManagerPool`]).
//! Other processes never touch it: each keeps a [`PoolCache`] fed through its *refill* ring
//! (nfmgr -> process) and drained through its *recycle* ring (process -> nfmgr). Every hop is
//! an SPSC ring, so no lock or compare-and-swap can be left half-done by a `kill -9`.
//!
//! Ownership is recorded in each buffer's metadata line:
//! - nfmgr sets it to itself on allocation, to the process on refill, to `OWNER_FREE` on free;
//! - a consumer sets it to itself when it claims a descriptor, *before* releasing the ring
//!   slot (see `Region::claim`), so a buffer is always either in a ring or owned by a slot.
//!
//! When a process dies, [`ManagerPool::reclaim`] frees everything in its input rings and
//! refill ring, then every buffer still owned by it that is not in flight in one of its output
//! rings (those belong to their consumers once claimed). After any number of crashes the free
//! count returns to its initial value once traffic stops.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::buffer::{Desc, Packet, OWNER_FREE};
use crate::layout::{RingId, MANAGER_SLOT};
use crate::region::Region;
use crate::ring::{Consumer, Producer};
use crate::stats::ProcCounter;

/// What recovery found and freed after a process died.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimReport {
    /// Descriptors drained from the dead process's input rings (data and messages).
    pub drained_inputs: u64,
    /// Free buffers drained from its refill ring.
    pub drained_refill: u64,
    /// Buffers it owned (being processed, or in its cache) that went back to the pool.
    pub owned: u64,
    /// Buffers it had sent that are still queued to live consumers (left for them).
    pub in_flight: u64,
}

impl ReclaimReport {
    pub fn freed(&self) -> u64 {
        self.drained_inputs + self.drained_refill + self.owned
    }
}

/// The recovery of a dead slot under way (`ManagerPool::reclaim_start`).
pub struct Reclaim {
    pub dead: u16,
    /// The next buffer to look at.
    next: u32,
    /// Buffers it had sent that were queued to others when it was found dead.
    in_flight: HashSet<u32>,
    pub report: ReclaimReport,
}

/// nfmgr's side of the pool: the free stack, refill and recycle service, and recovery.
pub struct ManagerPool {
    region: Region,
    free: Vec<u32>,
    refill: Vec<Option<Producer<u32>>>,
    recycle: Vec<Option<Consumer<u32>>>,
    refill_level: u32,
    double_frees: u64,
    reclaimed: u64,
    scratch: Vec<u32>,
}

impl ManagerPool {
    /// Takes over a freshly created region's buffers (all free) and the producer side of every
    /// refill ring and the consumer side of every recycle ring.
    pub fn new(region: &Region, refill_level: u32) -> ManagerPool {
        let n = region.buffer_count();
        let slots = region.slot_count();
        let mut refill = Vec::with_capacity(slots as usize);
        let mut recycle = Vec::with_capacity(slots as usize);
        for s in 0..slots {
            refill.push(region.ring(RingId::Refill { to: s }).map(Producer::new));
            recycle.push(region.ring(RingId::Recycle { from: s }).map(Consumer::new));
        }
        let level = refill_level.min(region.config().pool_ring_size);
        ManagerPool {
            region: region.clone(),
            // Low indices on top: consecutive allocations touch neighbouring memory.
            free: (0..n).rev().collect(),
            refill,
            recycle,
            refill_level: level,
            double_frees: 0,
            reclaimed: 0,
            scratch: Vec::with_capacity(region.config().pool_ring_size as usize),
        }
    }

    pub fn total(&self) -> u32 {
        self.region.buffer_count()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Allocates one buffer owned by nfmgr, with default headroom and length 0.
    #[inline]
    pub fn alloc(&mut self) -> Option<Packet> {
        let index = self.free.pop()?;
        if let Some(meta) = self.region.buf_meta(index) {
            meta.owner.store(MANAGER_SLOT as u32, Ordering::Relaxed);
        }
        Some(self.region.fresh_packet(index))
    }

    /// Allocates up to `n` buffers into `out`; returns how many.
    pub fn alloc_burst(&mut self, n: usize, out: &mut Vec<Packet>) -> usize {
        let mut got = 0;
        while got < n {
            match self.alloc() {
                Some(p) => {
                    out.push(p);
                    got += 1;
                }
                None => break,
            }
        }
        got
    }

    #[inline]
    pub fn free(&mut self, p: Packet) {
        self.free_index(p.buf_index());
    }

    /// Returns a buffer to the stack unless it is already free (counted, then ignored: pushing
    /// it twice would hand one buffer to two owners later).
    fn free_index(&mut self, index: u32) -> bool {
        let Some(meta) = self.region.buf_meta(index) else {
            return false;
        };
        if meta.owner.swap(OWNER_FREE, Ordering::AcqRel) == OWNER_FREE {
            self.double_frees += 1;
            return false;
        }
        // A freed buffer forgets any saved address (the line is being written anyway).
        meta.clear_l2();
        self.free.push(index);
        true
    }

    /// Takes back what `slot` recycled and, if it is alive, tops up its refill ring when it is
    /// below half the refill level. Cheap when there is nothing to do.
    pub fn service(&mut self, slot: u16, alive: bool) {
        let s = slot as usize;
        if let Some(mut rc) = self.recycle.get_mut(s).and_then(Option::take) {
            let mut buf = [0u32; 64];
            loop {
                let n = rc.pop_burst(&mut buf);
                if n == 0 {
                    break;
                }
                for &i in &buf[..n] {
                    self.free_index_from(i, slot);
                }
            }
            self.recycle[s] = Some(rc);
        }
        if !alive {
            return;
        }
        let level = self.refill_level;
        let Some(Some(rf)) = self.refill.get_mut(s) else {
            return;
        };
        let occupied = rf.view().occupancy();
        if occupied >= level / 2 {
            return;
        }
        let want = (level - occupied) as usize;
        self.scratch.clear();
        while self.scratch.len() < want {
            let Some(i) = self.free.pop() else { break };
            if let Some(meta) = self.region.buf_meta(i) {
                meta.owner.store(slot as u32, Ordering::Relaxed);
            }
            self.scratch.push(i);
        }
        let pushed = rf.push_burst(&self.scratch);
        for &i in &self.scratch[pushed..] {
            if let Some(meta) = self.region.buf_meta(i) {
                meta.owner.store(OWNER_FREE, Ordering::Relaxed);
            }
            self.free.push(i);
        }
    }

    /// A recycled index must be owned by the slot that recycled it; anything else is a faulty
    /// peer and is ignored rather than corrupting the stack.
    /// Frees `index` if one of `owners` owns it, in one atomic step (true then); counts a
    /// refusal otherwise.
    fn free_owned_by(&mut self, index: u32, owners: &[u16]) -> bool {
        let Some(meta) = self.region.buf_meta(index) else {
            return false;
        };
        let freed = owners.iter().any(|&o| {
            meta.owner
                .compare_exchange(o as u32, OWNER_FREE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if !freed {
            self.double_frees += 1;
            return false;
        }
        meta.clear_l2();
        self.free.push(index);
        true
    }

    fn free_index_from(&mut self, index: u32, slot: u16) {
        match self.region.buf_meta(index) {
            Some(meta) if meta.owner.load(Ordering::Acquire) == slot as u32 => {
                self.free_index(index);
            }
            _ => self.double_frees += 1,
        }
    }

    /// Frees whatever is queued to a dead slot: its data and message input rings. nfmgr takes
    /// the consumer role of those rings while the slot has no process, so this may be called
    /// repeatedly (producers may not have noticed the death yet).
    pub fn drain_inputs(&mut self, dead: u16) -> u64 {
        let mut drained = 0;
        let mut buf = [Desc::default(); 64];
        for from in 0..self.region.slot_count() {
            for id in [
                RingId::Data { from, to: dead },
                RingId::Message { from, to: dead },
            ] {
                let Some(view) = self.region.ring::<Desc>(id) else {
                    continue;
                };
                let mut c = Consumer::new(view);
                loop {
                    let n = c.pop_burst(&mut buf);
                    if n == 0 {
                        break;
                    }
                    for d in &buf[..n] {
                        // A buffer queued here is still its producer's, or the dead
                        // process's if it claimed it before releasing the ring's slot (a
                        // claim comes before the release). One of anybody else (a faulty
                        // or hostile producer queued another process's buffer) is left
                        // alone, or it would be free and in use at once.
                        if self.region.check_desc(d) && self.free_owned_by(d.buf, &[from, dead]) {
                            drained += 1;
                        }
                    }
                }
            }
        }
        self.reclaimed += drained;
        drained
    }

    /// Full recovery of a dead slot at once (`reclaim_start`, then every step). Must run
    /// after the process is known dead (reaped) and before a replacement starts.
    pub fn reclaim(&mut self, dead: u16) -> ReclaimReport {
        let mut job = self.reclaim_start(dead);
        while !self.reclaim_step(&mut job, u32::MAX) {}
        job.report
    }

    /// Starts the recovery of a dead slot: what was queued to it, its refill ring and what
    /// it recycled go back now (bounded by the rings' sizes); the buffers it held are found
    /// by `reclaim_step`, a chunk at a time, so that a region of a million buffers does not
    /// stall every port while its buffers' first lines are read. Must run after the process
    /// is known dead (reaped) and before a replacement starts; the slot stays dead until
    /// the last step.
    pub fn reclaim_start(&mut self, dead: u16) -> Reclaim {
        let mut report = ReclaimReport {
            drained_inputs: self.drain_inputs(dead),
            ..ReclaimReport::default()
        };
        // Its refill ring: nfmgr is the producer; with the consumer dead it may read it too.
        if let Some(view) = self.region.ring::<u32>(RingId::Refill { to: dead }) {
            let mut c = Consumer::new(view);
            let mut buf = [0u32; 64];
            loop {
                let n = c.pop_burst(&mut buf);
                if n == 0 {
                    break;
                }
                for &i in &buf[..n] {
                    if self.free_index(i) {
                        report.drained_refill += 1;
                    }
                }
            }
        }
        // What it recycled before dying.
        self.service(dead, false);
        // Buffers it sent that are still queued: their consumers will claim them.
        let mut in_flight: HashSet<u32> = HashSet::new();
        let mut snap = Vec::new();
        for to in 0..self.region.slot_count() {
            for id in [
                RingId::Data { from: dead, to },
                RingId::Message { from: dead, to },
            ] {
                if let Some(view) = self.region.ring::<Desc>(id) {
                    snap.clear();
                    view.snapshot(&mut snap);
                    in_flight.extend(snap.iter().map(|d| d.buf));
                }
            }
        }
        Reclaim {
            dead,
            next: 0,
            in_flight,
            report,
        }
    }

    /// Looks at up to `budget` more buffers for those the dead process held (being
    /// processed when it died, or in its cache) and frees them. Returns true when every
    /// buffer has been looked at (the job's report is then complete).
    pub fn reclaim_step(&mut self, job: &mut Reclaim, budget: u32) -> bool {
        let total = self.region.buffer_count();
        let end = job.next.saturating_add(budget).min(total);
        let dead = job.dead;
        for i in job.next..end {
            let Some(meta) = self.region.buf_meta(i) else {
                continue;
            };
            if meta.owner.load(Ordering::Acquire) != dead as u32 {
                continue;
            }
            // Sent, and still queued to a live consumer, which will claim it.
            if job.in_flight.contains(&i) {
                job.report.in_flight += 1;
            } else if self.free_owned_by(i, &[dead]) {
                job.report.owned += 1;
            }
        }
        job.next = end;
        if end < total {
            return false;
        }
        // Refill-ring buffers were free all along; only packets and held buffers count.
        self.reclaimed += job.report.owned;
        if let Some(slot) = self.region.slot(dead) {
            slot.counters.0[ProcCounter::CachedBufs as usize].store(0, Ordering::Relaxed);
        }
        true
    }

    /// Publishes the pool's counters in the region header. `cached` is the number of free
    /// buffers parked in live processes (refill rings plus their caches).
    pub fn publish(&self) {
        let h = self.region.header();
        let mut cached = 0u64;
        for (s, rf) in self.refill.iter().enumerate() {
            let Some(rf) = rf else { continue };
            let Some(slot) = self.region.slot(s as u16) else {
                continue;
            };
            if slot.state().is_alive() {
                cached += rf.view().occupancy() as u64;
                cached += slot.counters.0[ProcCounter::CachedBufs as usize].load(Ordering::Relaxed);
            }
        }
        h.pool_free.store(self.free.len() as u64, Ordering::Relaxed);
        h.pool_cached.store(cached, Ordering::Relaxed);
        h.pool_reclaimed.store(self.reclaimed, Ordering::Relaxed);
        h.pool_double_frees
            .store(self.double_frees, Ordering::Relaxed);
    }

    pub fn double_frees(&self) -> u64 {
        self.double_frees
    }
}

/// A process's side of the pool: a local cache fed by its refill ring and spilled to its
/// recycle ring. Never blocks and never loses a buffer: when the recycle ring is full the
/// buffers stay cached.
pub struct PoolCache {
    region: Region,
    me: u16,
    refill: Consumer<u32>,
    recycle: Producer<u32>,
    cache: Vec<u32>,
    batch: usize,
    refused: u64,
    /// The refill ring gave less than asked: nfmgr should service the pool soon.
    starving: bool,
}

impl PoolCache {
    pub fn new(region: &Region, me: u16, batch: usize) -> Option<PoolCache> {
        Some(PoolCache {
            region: region.clone(),
            me,
            refill: Consumer::new(region.ring(RingId::Refill { to: me })?),
            recycle: Producer::new(region.ring(RingId::Recycle { from: me })?),
            cache: Vec::with_capacity(batch * 3),
            batch: batch.max(1),
            refused: 0,
            starving: false,
        })
    }

    /// A buffer owned by this process, or `None` if the pool is exhausted right now.
    #[inline]
    pub fn alloc(&mut self) -> Option<Packet> {
        if self.cache.is_empty() {
            self.fill();
        }
        let i = self.cache.pop()?;
        Some(self.region.fresh_packet(i))
    }

    fn fill(&mut self) {
        let mut buf = [0u32; 64];
        let want = self.batch.min(buf.len());
        let n = self.refill.pop_burst(&mut buf[..want]);
        if n < want || self.refill.view().occupancy() < want as u32 {
            self.starving = true;
        }
        for &i in &buf[..n] {
            // nfmgr marks refill buffers as ours before sending them; refuse anything else.
            match self.region.buf_meta(i) {
                Some(m) if m.owner.load(Ordering::Acquire) == self.me as u32 => self.cache.push(i),
                _ => self.refused += 1,
            }
        }
    }

    #[inline]
    pub fn free(&mut self, p: Packet) {
        // The process owned the buffer, so its metadata line is at hand: forget any saved
        // address now rather than on every allocation.
        self.region.meta_of(&p).clear_l2();
        self.cache.push(p.buf_index());
        if self.cache.len() >= 2 * self.batch {
            self.spill(self.batch);
        }
    }

    fn spill(&mut self, n: usize) {
        let n = n.min(self.cache.len());
        let start = self.cache.len() - n;
        let pushed = self.recycle.push_burst(&self.cache[start..]);
        // The ring took the first `pushed` of the tail; the rest stay cached.
        self.cache.drain(start..start + pushed);
    }

    /// Returns every cached buffer to nfmgr (as far as the recycle ring allows).
    pub fn flush(&mut self) {
        self.spill(self.cache.len());
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache ran low since the last call (and clears the flag).
    pub fn take_starving(&mut self) -> bool {
        std::mem::take(&mut self.starving)
    }

    /// Refill entries refused because they were not marked as ours.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RegionConfig;
    use crate::region::{CreateOptions, Region};

    fn region(buffers: u32) -> (Region, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "nflib-pool-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let r = Region::create(&CreateOptions {
            path: path.clone(),
            config: RegionConfig {
                slots: 4,
                ports: 1,
                buffers,
                pool_ring_size: 32,
                data_ring_size: 16,
                ..RegionConfig::default()
            },
            instance: "pool".into(),
            page_size: 4096,
            hugetlbfs: false,
        })
        .unwrap();
        r.mark_ready();
        (r, path)
    }
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    #[test]
    fn alloc_free_and_double_free_detection() {
        let (r, path) = region(8);
        let mut pool = ManagerPool::new(&r, 4);
        let mut got = Vec::new();
        assert_eq!(pool.alloc_burst(10, &mut got), 8);
        assert!(pool.alloc().is_none());
        let idx = got[0].buf_index();
        for p in got {
            pool.free(p);
        }
        assert_eq!(pool.free_count(), 8);
        assert!(!pool.free_index(idx));
        assert_eq!(pool.double_frees(), 1);
        assert_eq!(pool.free_count(), 8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn cache_refill_and_recycle_roundtrip() {
        let (r, path) = region(64);
        let mut pool = ManagerPool::new(&r, 16);
        let mut cache = PoolCache::new(&r, 2, 4).unwrap();
        assert!(cache.alloc().is_none(), "nothing refilled yet");
        pool.service(2, true);
        assert_eq!(pool.free_count(), 48);
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(cache.alloc().unwrap());
        }
        for p in held {
            cache.free(p);
        }
        cache.flush();
        pool.service(2, false);
        // 16 went out, what came back is at the pool; the rest sits in refill ring or cache.
        let refill_left = r.ring::<u32>(RingId::Refill { to: 2 }).unwrap().occupancy() as usize;
        assert_eq!(pool.free_count() + refill_left + cache.cached(), 64);
        std::fs::remove_file(path).unwrap();
    }

    /// A reclaim in chunks (nfmgr looks at a chunk of buffers per loop iteration) finds
    /// what one at once finds, and ends after as many steps as chunks.
    #[test]
    fn a_reclaim_in_steps_frees_the_same_as_one_at_once() {
        let (r, path) = region(64);
        let mut pool = ManagerPool::new(&r, 8);
        pool.service(1, true);
        let mut cache = PoolCache::new(&r, 1, 4).unwrap();
        let held: Vec<Packet> = (0..6).map(|_| cache.alloc().unwrap()).collect();
        // Dies holding six buffers and its cache.
        drop((held, cache));
        let mut job = pool.reclaim_start(1);
        let mut steps = 1;
        while !pool.reclaim_step(&mut job, 7) {
            steps += 1;
        }
        assert_eq!(steps, 64usize.div_ceil(7));
        assert_eq!(job.report.owned, 6 + 2, "six held, two left in its cache");
        assert_eq!(job.report.in_flight, 0);
        assert_eq!(pool.free_count(), 64, "every buffer is back");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reclaim_frees_what_a_dead_process_held_but_not_what_it_sent() {
        let (r, path) = region(64);
        let mut pool = ManagerPool::new(&r, 8);
        // nfmgr sends 6 packets to slot 1.
        let mut to1 = Producer::new(r.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
        for _ in 0..6 {
            let p = pool.alloc().unwrap();
            assert!(to1.push(p.into_desc()));
        }
        pool.service(1, true);
        // Slot 1 claims 4, forwards 1 to slot 2, keeps 3 (being processed), leaves 2 queued.
        let mut in1 = Consumer::new(r.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
        let mut out12 = Producer::new(r.ring::<Desc>(RingId::Data { from: 1, to: 2 }).unwrap());
        let mut buf = [Desc::default(); 4];
        let n = in1.peek_burst(&mut buf);
        let mut held: Vec<Packet> = buf[..n]
            .iter()
            .map(|d| r.claim(*d, 0, 1).unwrap())
            .collect();
        in1.release(n);
        assert!(out12.push(held.pop().unwrap().into_desc()));
        let mut cache = PoolCache::new(&r, 1, 4).unwrap();
        let extra = cache.alloc().unwrap();
        // ... and dies here, holding `held`, `extra` and its cache (nothing is freed).
        drop((held, extra, in1, out12, cache));

        let report = pool.reclaim(1);
        assert_eq!(report.drained_inputs, 2);
        assert_eq!(report.in_flight, 1);
        // Refill level 8: the cache took a batch of 4, leaving 4 in the ring.
        assert_eq!(report.drained_refill, 4);
        // 3 being processed, 1 allocated, 3 still cached.
        assert_eq!(report.owned, 3 + 1 + 3);
        // Slot 2 claims the forwarded packet normally, and frees it through nfmgr.
        let mut in2 = Consumer::new(r.ring::<Desc>(RingId::Data { from: 1, to: 2 }).unwrap());
        let n = in2.peek_burst(&mut buf);
        assert_eq!(n, 1);
        let p = r.claim(buf[0], 1, 2).unwrap();
        in2.release(1);
        r.buf_meta(p.buf_index())
            .unwrap()
            .owner
            .store(0, Ordering::Relaxed);
        pool.free(p);
        assert_eq!(pool.free_count(), 64);
        assert_eq!(pool.double_frees(), 0);
        std::fs::remove_file(path).unwrap();
    }

    /// A producer that queues another process's buffer to a slot that then dies must not
    /// get that buffer freed while its owner still uses it.
    #[test]
    fn reclaim_frees_only_what_a_ring_producer_owned() {
        let (r, path) = region(64);
        let mut pool = ManagerPool::new(&r, 8);
        // Slot 3 holds a buffer; slot 2 (hostile) queues a descriptor of it to slot 1,
        // and one of its own.
        let theirs = pool.alloc().unwrap();
        let mine = pool.alloc().unwrap();
        r.buf_meta(theirs.buf_index())
            .unwrap()
            .owner
            .store(3, Ordering::Release);
        r.buf_meta(mine.buf_index())
            .unwrap()
            .owner
            .store(2, Ordering::Release);
        let mut out21 = Producer::new(r.ring::<Desc>(RingId::Data { from: 2, to: 1 }).unwrap());
        let theirs_index = theirs.buf_index();
        assert!(out21.push(theirs.into_desc()));
        assert!(out21.push(mine.into_desc()));
        // Slot 1 dies with both queued to it.
        let report = pool.reclaim(1);
        assert_eq!(
            report.drained_inputs, 1,
            "only the producer's own buffer is freed"
        );
        assert_eq!(
            r.buf_meta(theirs_index)
                .unwrap()
                .owner
                .load(Ordering::Acquire),
            3,
            "slot 3 still owns its buffer"
        );
        assert_eq!(pool.double_frees(), 1, "the refusal is counted");
        std::fs::remove_file(path).unwrap();
    }
}
