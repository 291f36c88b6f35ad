//! An open-addressing hash index from flow keys to 32-bit values, built so a batch of lookups
//! can prefetch the cache line each key's probe starts on before touching any of them.
//!
//! Buckets are 8 bytes: the hash's upper 32 bits as a tag, and the value. Keys are not stored:
//! the caller resolves a value to its key (flow actors and aliases keep them), so equality is
//! checked only when the tag matches. Linear probing; deletion leaves a tombstone; the table
//! doubles above 3/4 full and rebuilds in place when tombstones pile up.

use nflib::flow::FlowKey;

const EMPTY: u64 = u64::MAX;
const TOMBSTONE: u64 = u64::MAX - 1;

pub struct FlowIndex {
    buckets: Vec<u64>,
    mask: usize,
    len: usize,
    tombstones: usize,
}

#[inline(always)]
fn tag(hash: u64) -> u64 {
    // Never the tag of EMPTY or TOMBSTONE (both have all-ones tags).
    (hash >> 32).min(0xffff_fffe)
}

impl Default for FlowIndex {
    fn default() -> Self {
        FlowIndex::new()
    }
}

impl FlowIndex {
    pub fn new() -> FlowIndex {
        FlowIndex {
            buckets: vec![EMPTY; 16],
            mask: 15,
            len: 0,
            tombstones: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn memory(&self) -> usize {
        self.buckets.capacity() * 8
    }

    /// Starts loading the bucket `hash`'s probe begins on.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        nflib::hint::prefetch(&self.buckets[hash as usize & self.mask]);
    }

    /// The first value whose tag matches `hash` and which `eq` accepts.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let t = tag(hash);
        let mut i = hash as usize & self.mask;
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if b != TOMBSTONE && b >> 32 == t && eq(b as u32) {
                return Some(b as u32);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The first value with a matching tag, without checking the key (for prefetching what
    /// it points to).
    #[inline(always)]
    pub fn peek(&self, hash: u64) -> Option<u32> {
        let t = tag(hash);
        let mut i = hash as usize & self.mask;
        for _ in 0..4 {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if b != TOMBSTONE && b >> 32 == t {
                return Some(b as u32);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Inserts `value` under `hash` (the caller checked the key is absent). `rehash` gives
    /// the hash of any stored value, for growing.
    pub fn insert(&mut self, hash: u64, value: u32, rehash: impl Fn(u32) -> u64) {
        if (self.len + self.tombstones + 1) * 4 > self.buckets.len() * 3 {
            let grow = (self.len + 1) * 2 > self.buckets.len();
            self.rebuild(
                if grow {
                    self.buckets.len() * 2
                } else {
                    self.buckets.len()
                },
                &rehash,
            );
        }
        let mut i = hash as usize & self.mask;
        loop {
            let b = self.buckets[i];
            if b == EMPTY || b == TOMBSTONE {
                if b == TOMBSTONE {
                    self.tombstones -= 1;
                }
                self.buckets[i] = tag(hash) << 32 | value as u64;
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Removes `value`, stored under `hash`.
    pub fn remove(&mut self, hash: u64, value: u32) -> bool {
        let want = tag(hash) << 32 | value as u64;
        let mut i = hash as usize & self.mask;
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return false;
            }
            if b == want {
                // A tombstone keeps later entries of the probe sequence reachable; if the next
                // bucket is empty, nothing depends on this one.
                if self.buckets[(i + 1) & self.mask] == EMPTY {
                    self.buckets[i] = EMPTY;
                } else {
                    self.buckets[i] = TOMBSTONE;
                    self.tombstones += 1;
                }
                self.len -= 1;
                return true;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn rebuild(&mut self, size: usize, rehash: &impl Fn(u32) -> u64) {
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; size]);
        self.mask = size - 1;
        self.tombstones = 0;
        for b in old {
            if b == EMPTY || b == TOMBSTONE {
                continue;
            }
            let value = b as u32;
            let hash = rehash(value);
            let mut i = hash as usize & self.mask;
            while self.buckets[i] != EMPTY {
                i = (i + 1) & self.mask;
            }
            self.buckets[i] = tag(hash) << 32 | value as u64;
        }
    }
}

/// Hashes flow keys with a per-process random seed (keys come from the wire).
#[derive(Clone, Default)]
pub struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        use std::hash::BuildHasher;
        self.0.hash_one(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_with_collisions_and_growth() {
        let mut ix = FlowIndex::new();
        // Hash = value * a constant, with deliberate collisions on the low bits.
        let h = |v: u32| (v as u64 % 7) | ((v as u64) << 40);
        for v in 0..10_000u32 {
            ix.insert(h(v), v, h);
        }
        for v in 0..10_000u32 {
            assert_eq!(ix.find(h(v), |x| x == v), Some(v));
        }
        for v in (0..10_000u32).step_by(3) {
            assert!(ix.remove(h(v), v));
        }
        for v in 0..10_000u32 {
            assert_eq!(ix.find(h(v), |x| x == v).is_some(), v % 3 != 0, "{v}");
        }
        // Churn: tombstones are reclaimed by rebuilds.
        for round in 0..20u32 {
            for v in 0..1000u32 {
                let v = 100_000 + round * 1000 + v;
                ix.insert(h(v), v, h);
            }
            for v in 0..1000u32 {
                let v = 100_000 + round * 1000 + v;
                assert!(ix.remove(h(v), v));
            }
        }
        assert!(ix.buckets.len() <= 1 << 15, "{}", ix.buckets.len());
    }
}
