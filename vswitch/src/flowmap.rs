//! The vswitch's flow table: keys to entries, built for a million flows under a packet rate.
//!
//! Entries live in a slab, found through `nflib::index`, the open-addressing index the
//! runtimes use: 8 bytes per key, grown a few buckets at a time, never re-hashed in one go.
//! A packet's lookup touches an index line and an entry, two cache (and, at this size, TLB)
//! misses; the index lets a burst start loading both for all its packets before it reads
//! any (`hash`, `prefetch_bucket`, `prefetch_entry`), and a migration's `SetRuntime` of
//! hundreds of keys does the same. With a hashed map per key those misses came one after
//! another: at 1.2 million flows, looking keys up was most of the vswitch's time.
//!
//! Forgetting idle flows walks the slab in `SWEEP_SLICES` slices, one per call, so no call walks
//! more than a small part of the table (walking all of it at once took 10 ms at 1.2 million
//! flows, during which the input ring overflowed at 100,000 packets a second).

use nflib::flow::FlowKey;
use nflib::hint::prefetch;
use nflib::index::{FlowIndex, KeyHasher};

/// Slices of the slab one round of sweeps walks, a slice per `sweep_next`.
pub const SWEEP_SLICES: usize = 64;

pub struct FlowMap<V> {
    index: FlowIndex,
    /// Seeded per process: keys come from the wire.
    hasher: KeyHasher,
    slab: Vec<Option<(FlowKey, V)>>,
    free: Vec<u32>,
    len: usize,
    /// Where the next sweep starts in the slab.
    cursor: usize,
}

impl<V> Default for FlowMap<V> {
    fn default() -> Self {
        FlowMap {
            index: FlowIndex::new(),
            hasher: KeyHasher::default(),
            slab: Vec::new(),
            free: Vec::new(),
            len: 0,
            cursor: 0,
        }
    }
}

impl<V> FlowMap<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The hash a key is indexed under (computed once, then reused).
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash(key)
    }

    /// Once per burst: moves a resize of the index along (`FlowIndex::step`).
    #[inline]
    pub fn step(&mut self) {
        self.index.step();
    }

    /// Batch lookups, step 1: start loading the index line a key's probe begins on.
    #[inline(always)]
    pub fn prefetch_bucket(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Batch lookups, step 2 (once step 1's line has had time to arrive): start loading
    /// the entry the key probably names.
    #[inline(always)]
    pub fn prefetch_entry(&self, hash: u64) {
        if let Some(e) = self
            .index
            .peek(hash)
            .and_then(|s| self.slab.get(s as usize))
        {
            prefetch(e);
        }
    }

    #[inline]
    fn row_of(&self, key: &FlowKey, hash: u64) -> Option<u32> {
        let slab = &self.slab;
        self.index.find(hash, |s| {
            slab.get(s as usize)
                .and_then(Option::as_ref)
                .is_some_and(|(k, _)| k == key)
        })
    }

    #[inline]
    pub fn get(&self, key: &FlowKey) -> Option<&V> {
        let s = self.row_of(key, self.hash(key))?;
        self.slab[s as usize].as_ref().map(|(_, v)| v)
    }

    /// The key's value, to change, with the key's `hash` known.
    #[inline]
    pub fn get_mut_hashed(&mut self, key: &FlowKey, hash: u64) -> Option<&mut V> {
        let s = self.row_of(key, hash)?;
        self.slab[s as usize].as_mut().map(|(_, v)| v)
    }

    /// Sets the key's value; returns the one it replaced.
    pub fn insert(&mut self, key: FlowKey, v: V) -> Option<V> {
        let hash = self.hash(&key);
        if let Some(s) = self.row_of(&key, hash) {
            let (_, old) = self.slab[s as usize].as_mut()?;
            return Some(std::mem::replace(old, v));
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some((key, v));
                s
            }
            None => {
                self.slab.push(Some((key, v)));
                (self.slab.len() - 1) as u32
            }
        };
        self.index.insert(hash, s);
        self.len += 1;
        None
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<V> {
        let hash = self.hash(key);
        let s = self.row_of(key, hash)?;
        self.index.remove(hash, s);
        self.free.push(s);
        self.len -= 1;
        self.slab[s as usize].take().map(|(_, v)| v)
    }

    /// Walks the next slice of the slab, keeping the entries `keep` says to; returns how
    /// many went. `SWEEP_SLICES` calls walk every entry once (while the slab does not grow).
    pub fn sweep_next(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let slice = self.slab.len().div_ceil(SWEEP_SLICES).max(1);
        let start = self.cursor.min(self.slab.len());
        let end = (start + slice).min(self.slab.len());
        self.cursor = if end >= self.slab.len() { 0 } else { end };
        let mut gone = 0;
        for s in start..end {
            let Some((key, v)) = &self.slab[s] else {
                continue;
            };
            if keep(v) {
                continue;
            }
            let hash = self.hasher.hash(key);
            self.index.remove(hash, s as u32);
            self.slab[s] = None;
            self.free.push(s as u32);
            gone += 1;
        }
        self.len -= gone;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> FlowKey {
        FlowKey::from_tuple(
            4,
            17,
            0,
            (FlowKey::v4([10, 0, 0, 1]), p),
            (FlowKey::v4([10, 0, 0, 2]), 53),
        )
        .0
    }

    #[test]
    fn behaves_as_one_map() {
        let mut m = FlowMap::default();
        for p in 0..10_000u16 {
            assert!(m.insert(key(p), p as u32).is_none());
        }
        assert_eq!(m.insert(key(7), 70), Some(7), "a second insert replaces");
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(&key(7)), Some(&70));
        let h = m.hash(&key(8));
        m.prefetch_bucket(h);
        m.prefetch_entry(h);
        *m.get_mut_hashed(&key(8), h).unwrap() = 80;
        assert_eq!(m.get(&key(8)), Some(&80));
        assert_eq!(m.remove(&key(9)), Some(9));
        assert_eq!(m.remove(&key(9)), None);
        assert_eq!(m.get(&key(9)), None);
        assert_eq!(m.len(), 9_999);
        // A removed entry's room is used again.
        assert!(m.insert(key(60_000), 1).is_none());
        assert_eq!(m.slab.len(), 10_000);
        assert_eq!(m.get(&key(60_000)), Some(&1));
    }

    #[test]
    fn a_full_round_of_sweeps_visits_every_entry_once() {
        let mut m = FlowMap::default();
        for p in 0..5_000u16 {
            m.insert(key(p), p);
        }
        let mut seen = 0;
        let mut gone = 0;
        let mut biggest = 0;
        for _ in 0..SWEEP_SLICES {
            let before = seen;
            gone += m.sweep_next(|v| {
                seen += 1;
                v % 2 == 0
            });
            biggest = biggest.max(seen - before);
        }
        assert_eq!(seen, 5_000);
        assert_eq!(gone, 2_500);
        assert_eq!(m.len(), 2_500);
        assert!(m.get(&key(3)).is_none() && m.get(&key(4)).is_some());
        // No call walks more than its slice.
        assert!(biggest <= 5_000usize.div_ceil(SWEEP_SLICES), "{biggest}");
        // The next round starts again at the beginning.
        let mut again = 0;
        for _ in 0..SWEEP_SLICES {
            m.sweep_next(|_| {
                again += 1;
                true
            });
        }
        assert_eq!(again, 2_500);
    }
}
