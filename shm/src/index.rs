//! An open-addressing hash index from flow keys to 32-bit values, built so a batch of lookups
//! can prefetch the cache line each key's probe starts on before touching any of them.
//!
//! Buckets are 8 bytes: the hash's upper 32 bits as a tag, and the value. Keys are not stored:
//! the caller resolves a value to its key (a runtime's flow actors and aliases, a vswitch's
//! flow entries keep them), so equality is checked only when the tag matches. Linear probing; deletion leaves a tombstone.
//!
//! Resizing never stops the packet path. Above 3/4 full the table doubles (or, when
//! tombstones are what fills it, is rebuilt at its size) *incrementally*: a new bucket array
//! is allocated zeroed (lazily, by the kernel), and each later insert or remove moves a few
//! buckets of the old one across, while lookups look in the new array, then the old. A key's
//! probe starts at the bucket its tag's top bits name, so an entry moves by its tag alone,
//! without reading its key back. Before this, growing at a million flows re-hashed every key
//! in one go, a stall of tens of milliseconds that overflowed the data rings.
//!
//! Inserts and removes alone do not finish a resize: when the flows stop changing (steady
//! traffic over a set of long flows), a resize started by the last new flows would stay
//! half done for good, and every lookup of a key still in the old array would probe the new
//! one to its end first, then the old one, whose line no prefetch had asked for. That cost
//! a quarter of a runtime core at 100,000 flows (docs/PERFORMANCE.md, 2026-12-06). So the
//! owner calls [`FlowIndex::step`] once per burst of packets, which moves a resize along
//! whatever the flows do.

use nf_packet::flow::FlowKey;

/// An empty bucket (zero, so a new array costs no writes).
const EMPTY: u64 = 0;
/// A removed entry: probes go on past it.
const TOMBSTONE: u64 = 1;
/// While resizing, each insert or remove moves up to this many entries of the old array
/// across, looking at up to `SCAN_PER_OP` of its buckets: the new array has room for at
/// least a quarter of its size more entries, so the move ends long before it fills up.
const MOVE_PER_OP: usize = 8;
const SCAN_PER_OP: usize = 64;
/// `FlowIndex::step` moves this many times as much as an insert does: at most 64 entries
/// a burst (a few hundred nanoseconds), so a resize of 786,432 entries (2^20 buckets
/// growing to 2^21) ends within about 12,300 bursts of steps alone, well under a second at
/// the packet rates that need such a table (inserts move entries too).
const OPS_PER_STEP: usize = 8;

#[inline(always)]
fn tag(hash: u64) -> u64 {
    // Never 0, so no entry looks like EMPTY or TOMBSTONE (both have tag 0).
    (hash >> 32).max(1)
}

/// One bucket array.
struct Table {
    buckets: Vec<u64>,
    mask: usize,
    /// 32 - log2(buckets): a tag's home bucket is `tag >> shift`.
    shift: u32,
    len: usize,
    tombstones: usize,
}

impl Table {
    fn new(size: usize) -> Table {
        debug_assert!(size.is_power_of_two() && size >= 16);
        let buckets = vec![EMPTY; size];
        crate::hint::prefer_huge_pages(buckets.as_ptr().cast(), size * 8);
        Table {
            buckets,
            mask: size - 1,
            shift: 32 - size.trailing_zeros(),
            len: 0,
            tombstones: 0,
        }
    }

    #[inline(always)]
    fn home(&self, tag: u64) -> usize {
        (tag >> self.shift) as usize
    }

    #[inline]
    fn find(&self, t: u64, eq: &mut impl FnMut(u32) -> bool) -> Option<u32> {
        let mut i = self.home(t);
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if b >> 32 == t && eq(b as u32) {
                return Some(b as u32);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn peek(&self, t: u64) -> Option<u32> {
        let mut i = self.home(t);
        for _ in 0..4 {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if b >> 32 == t {
                return Some(b as u32);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Stores an entry (tag and value) whose key is absent.
    fn put(&mut self, b: u64) {
        let mut i = self.home(b >> 32);
        loop {
            let cur = self.buckets[i];
            if cur == EMPTY || cur == TOMBSTONE {
                if cur == TOMBSTONE {
                    self.tombstones -= 1;
                }
                self.buckets[i] = b;
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Removes `want`, leaving a tombstone where it was (for an array being emptied into a
    /// new one, whose moved entries are tombstones already).
    fn remove(&mut self, want: u64) -> bool {
        match self.position(want) {
            Some(i) => {
                self.clear_at(i);
                true
            }
            None => false,
        }
    }

    fn position(&self, want: u64) -> Option<usize> {
        let mut i = self.home(want >> 32);
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if b == want {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Removes `want` from an array without tombstones, shifting the entries after it back
    /// to where their probe would find them first (Knuth's algorithm R): no tombstone is
    /// left, so under churn (flows starting and ending by the hundred thousand a second)
    /// probes stay as short as the live entries make them, instead of lengthening until a
    /// rebuild.
    fn remove_shifting(&mut self, want: u64) -> bool {
        let Some(mut hole) = self.position(want) else {
            return false;
        };
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let b = self.buckets[j];
            if b == EMPTY {
                break;
            }
            // An entry whose home lies cyclically in (hole, j] cannot move back to the hole:
            // its probe starts after it.
            let k = self.home(b >> 32);
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if !stays {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn clear_at(&mut self, i: usize) {
        // A tombstone keeps later entries of the probe sequence reachable; if the next
        // bucket is empty, nothing depends on this one.
        if self.buckets[(i + 1) & self.mask] == EMPTY {
            self.buckets[i] = EMPTY;
        } else {
            self.buckets[i] = TOMBSTONE;
            self.tombstones += 1;
        }
        self.len -= 1;
    }

    fn full(&self) -> bool {
        (self.len + self.tombstones + 1) * 4 > self.buckets.len() * 3
    }
}

pub struct FlowIndex {
    cur: Table,
    /// The array being emptied into `cur`, and the next bucket of it to move.
    old: Option<(Table, usize)>,
}

impl Default for FlowIndex {
    fn default() -> Self {
        FlowIndex::new()
    }
}

impl FlowIndex {
    pub fn new() -> FlowIndex {
        FlowIndex {
            cur: Table::new(16),
            old: None,
        }
    }

    pub fn len(&self) -> usize {
        self.cur.len + self.old.as_ref().map_or(0, |(t, _)| t.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory(&self) -> usize {
        (self.cur.buckets.capacity() + self.old.as_ref().map_or(0, |(t, _)| t.buckets.capacity()))
            * 8
    }

    /// Starts loading the bucket `hash`'s probe begins on.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        let t = tag(hash);
        crate::hint::prefetch(&self.cur.buckets[self.cur.home(t)]);
    }

    /// The first value whose tag matches `hash` and which `eq` accepts.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let t = tag(hash);
        if let Some(v) = self.cur.find(t, &mut eq) {
            return Some(v);
        }
        match &self.old {
            Some((old, _)) => old.find(t, &mut eq),
            None => None,
        }
    }

    /// The first value with a matching tag, without checking the key (for prefetching what
    /// it points to).
    #[inline(always)]
    pub fn peek(&self, hash: u64) -> Option<u32> {
        let t = tag(hash);
        self.cur
            .peek(t)
            .or_else(|| self.old.as_ref().and_then(|(old, _)| old.peek(t)))
    }

    /// Inserts `value` under `hash` (the caller checked the key is absent).
    pub fn insert(&mut self, hash: u64, value: u32) {
        self.move_some();
        if self.cur.full() {
            // A resize still under way finishes first (it cannot be, by the sizes above,
            // but a table must never be left full).
            self.move_all();
            let live = self.cur.len + 1;
            let size = if live * 2 > self.cur.buckets.len() {
                self.cur.buckets.len() * 2
            } else {
                self.cur.buckets.len()
            };
            let old = std::mem::replace(&mut self.cur, Table::new(size));
            self.old = Some((old, 0));
            self.move_some();
        }
        self.cur.put(tag(hash) << 32 | value as u64);
    }

    /// Removes `value`, stored under `hash`.
    pub fn remove(&mut self, hash: u64, value: u32) -> bool {
        self.move_some();
        let want = tag(hash) << 32 | value as u64;
        // The current array never holds a tombstone; the old one, being emptied, does.
        if self.cur.remove_shifting(want) {
            return true;
        }
        match &mut self.old {
            Some((old, _)) => old.remove(want),
            None => false,
        }
    }

    /// True while entries are still being moved from an old bucket array to a new one.
    pub fn resizing(&self) -> bool {
        self.old.is_some()
    }

    /// Moves a resize under way along (nothing to do otherwise): called once per burst of
    /// lookups, so that a resize ends even when no key is inserted or removed.
    #[inline]
    pub fn step(&mut self) {
        if self.old.is_some() {
            for _ in 0..OPS_PER_STEP {
                self.move_some();
            }
        }
    }

    /// Moves up to `MOVE_PER_OP` entries of the old array across.
    fn move_some(&mut self) {
        let Some((old, next)) = &mut self.old else {
            return;
        };
        let (mut moved, end) = (0, old.buckets.len().min(*next + SCAN_PER_OP));
        while *next < end && moved < MOVE_PER_OP {
            let b = old.buckets[*next];
            if b != EMPTY && b != TOMBSTONE {
                // Leave a tombstone: entries further along its probe stay reachable.
                old.buckets[*next] = TOMBSTONE;
                old.len -= 1;
                self.cur.put(b);
                moved += 1;
            }
            *next += 1;
        }
        if *next >= old.buckets.len() {
            self.old = None;
        }
    }

    fn move_all(&mut self) {
        while self.old.is_some() {
            self.move_some();
        }
    }
}

/// Hashes flow keys with a per-process random seed (keys come from the wire).
///
/// foldhash's `quality` variant, not `fast`: the index takes a key's home bucket from the
/// hash's top bits, and `fast` leaves those poorly mixed for keys that differ in a port or
/// the low bits of an address. 20,000 such keys found only 7,000-10,000 distinct homes in
/// 32,768 buckets (a uniform hash finds about 15,000), and a lookup walked 8 to 9 buckets
/// instead of 2, about 140 instructions a packet (docs/PERFORMANCE.md, 2026-12-06).
/// `quality` ends with one more multiply.
#[derive(Clone, Default)]
pub struct KeyHasher(foldhash::quality::RandomState);

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
        // Spread hashes, with every three values sharing one (same tag, same home bucket).
        let h = |v: u32| ((v / 3) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for v in 0..10_000u32 {
            ix.insert(h(v), v);
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
                ix.insert(h(v), v);
            }
            for v in 0..1000u32 {
                let v = 100_000 + round * 1000 + v;
                assert!(ix.remove(h(v), v));
            }
        }
        assert!(ix.cur.buckets.len() <= 1 << 15, "{}", ix.cur.buckets.len());
    }

    /// Keys as traffic makes them (one server, consecutive client ports and addresses)
    /// spread over home buckets about as a uniform hash would spread them.
    #[test]
    fn structured_keys_spread_over_home_buckets() {
        let hasher = KeyHasher::default();
        let (n, bits) = (20_000u32, 15u32);
        let mut homes = std::collections::HashSet::new();
        for f in 0..n {
            let client = (0x0a00_0000u32 + 1 + (f >> 14)).to_be_bytes();
            let (k, _) = FlowKey::from_tuple(
                4,
                17,
                0,
                (FlowKey::v4(client), 1024 + (f as u16 & 0x3fff)),
                (FlowKey::v4([10, 200, 0, 1]), 80),
            );
            homes.insert(tag(hasher.hash(&k)) >> (32 - bits));
        }
        // Expected distinct homes: m (1 - e^(-n/m)), about 14,970 here.
        let m = f64::from(1u32 << bits);
        let expected = m * (1.0 - (-f64::from(n) / m).exp());
        assert!(
            homes.len() as f64 > 0.95 * expected,
            "{} distinct homes, {expected:.0} expected",
            homes.len()
        );
    }

    /// Removing by shifting entries back keeps every other key findable, with keys piled on
    /// a few home buckets (long clusters) and on the last buckets (clusters that wrap).
    #[test]
    fn shifting_removals_keep_clusters_whole() {
        let mut ix = FlowIndex::new();
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Hashes whose tags fall on 6 home buckets of a 16-bucket array (top bits), among
        // them the last, and whose low bits tell the keys apart.
        let homes = [0u64, 1, 5, 14, 15, 15];
        let hash = |v: u32| {
            let home = homes[v as usize % homes.len()];
            (home << 60) | (u64::from(v) << 36) | 1 << 32
        };
        let mut live = std::collections::BTreeSet::new();
        for _ in 0..20_000 {
            let v = (next() % 11) as u32;
            if live.contains(&v) {
                assert!(ix.remove(hash(v), v));
                live.remove(&v);
            } else {
                ix.insert(hash(v), v);
                live.insert(v);
            }
            for k in 0..11u32 {
                let found = ix.find(hash(k), |x| x == k);
                assert_eq!(found.is_some(), live.contains(&k), "{k}");
            }
        }
    }

    #[test]
    fn steps_finish_a_resize_without_inserts() {
        let mut ix = FlowIndex::new();
        let h = |v: u32| (v as u64 ^ 0x77).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // Stop inserting right after a resize has started (as a runtime whose last new
        // flow started one does).
        let mut v = 0u32;
        while !(ix.resizing() && v > 1000) {
            ix.insert(h(v), v);
            v += 1;
        }
        let mut steps = 0;
        while ix.resizing() {
            ix.step();
            steps += 1;
            assert!(steps < 10_000, "a resize must end by steps alone");
        }
        assert_eq!(ix.len(), v as usize);
        for k in 0..v {
            assert_eq!(ix.find(h(k), |x| x == k), Some(k));
        }
        ix.step();
        assert!(!ix.resizing());
    }

    #[test]
    fn every_key_stays_findable_while_a_resize_moves_entries() {
        let mut ix = FlowIndex::new();
        let h = |v: u32| (v as u64 ^ 0x5555).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut live = std::collections::BTreeSet::new();
        let mut resizes = 0;
        for v in 0..50_000u32 {
            let was = ix.old.is_some();
            ix.insert(h(v), v);
            live.insert(v);
            if !was && ix.old.is_some() {
                resizes += 1;
            }
            // Remove some as we go (tombstones, removals from the old array mid-move).
            if v % 5 == 4 {
                let gone = v - 2;
                assert!(ix.remove(h(gone), gone));
                live.remove(&gone);
            }
            if v % 97 == 0 || ix.old.is_some() && v % 7 == 0 {
                for &k in live.iter().rev().take(200) {
                    assert_eq!(ix.find(h(k), |x| x == k), Some(k), "{k} after {v}");
                }
                assert_eq!(ix.len(), live.len());
            }
        }
        // Growth happened step by step, never all at once.
        assert!(resizes >= 10, "{resizes}");
        for &k in &live {
            assert_eq!(ix.find(h(k), |x| x == k), Some(k));
        }
        for k in (0..50_000u32).filter(|k| !live.contains(k)) {
            assert_eq!(ix.find(h(k), |x| x == k), None);
        }
    }
}
