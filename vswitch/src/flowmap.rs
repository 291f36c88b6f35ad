//! The vswitch's flow table, split into shards by key hash so that no operation on it ever
//! touches more than a small part of it at once.
//!
//! One map of a million flows has two stalls: forgetting idle flows walks every entry (about
//! 10 ms at 1.2 million, measured, during which the input ring overflows at 100,000 packets
//! a second), and growing re-hashes every entry. With 64 shards, the sweep walks one shard at
//! a time, spread over the sweep period, and a shard grows at 1/64 of the size.

use std::collections::HashMap;
use std::hash::BuildHasher;

use nflib::flow::FlowKey;

/// Shards (a power of two): a shard of a 1.2-million-flow table is about 19,000 entries,
/// a sweep of it well under a millisecond.
pub const SHARDS: usize = 64;

type Shard<V> = HashMap<FlowKey, V, foldhash::fast::RandomState>;

pub struct FlowMap<V> {
    /// Picks the shard; each shard hashes with its own seed (keys come from the wire).
    router: foldhash::fast::RandomState,
    shards: Vec<Shard<V>>,
    len: usize,
    /// The shard the next sweep walks.
    cursor: usize,
}

impl<V> Default for FlowMap<V> {
    fn default() -> Self {
        FlowMap {
            router: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS)
                .map(|_| HashMap::with_hasher(foldhash::fast::RandomState::default()))
                .collect(),
            len: 0,
            cursor: 0,
        }
    }
}

impl<V> FlowMap<V> {
    #[inline]
    fn shard(&self, key: &FlowKey) -> usize {
        (self.router.hash_one(key) >> 58) as usize & (SHARDS - 1)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn get(&self, key: &FlowKey) -> Option<&V> {
        self.shards[self.shard(key)].get(key)
    }

    #[inline]
    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut V> {
        let s = self.shard(key);
        self.shards[s].get_mut(key)
    }

    /// Sets the key's value; returns the one it replaced.
    pub fn insert(&mut self, key: FlowKey, v: V) -> Option<V> {
        let s = self.shard(&key);
        let old = self.shards[s].insert(key, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<V> {
        let s = self.shard(key);
        let old = self.shards[s].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Walks the next shard, keeping the entries `keep` says to; returns how many went.
    pub fn sweep_next(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let shard = &mut self.shards[self.cursor];
        self.cursor = (self.cursor + 1) % SHARDS;
        let before = shard.len();
        shard.retain(|_, v| keep(v));
        let gone = before - shard.len();
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
        *m.get_mut(&key(8)).unwrap() = 80;
        assert_eq!(m.get(&key(8)), Some(&80));
        assert_eq!(m.remove(&key(9)), Some(9));
        assert_eq!(m.remove(&key(9)), None);
        assert_eq!(m.len(), 9_999);
        // Shards are used roughly evenly (a sweep stays small).
        let biggest = m.shards.iter().map(|s| s.len()).max().unwrap();
        assert!(biggest < 2 * 10_000 / SHARDS, "{biggest}");
    }

    #[test]
    fn a_full_round_of_sweeps_visits_every_entry_once() {
        let mut m = FlowMap::default();
        for p in 0..5_000u16 {
            m.insert(key(p), p);
        }
        let mut seen = 0;
        let mut gone = 0;
        for _ in 0..SHARDS {
            gone += m.sweep_next(|v| {
                seen += 1;
                v % 2 == 0
            });
        }
        assert_eq!(seen, 5_000);
        assert_eq!(gone, 2_500);
        assert_eq!(m.len(), 2_500);
        assert!(m.get(&key(3)).is_none() && m.get(&key(4)).is_some());
    }
}
