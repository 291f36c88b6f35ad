//! The flow table: flow keys (and their aliases) to flow actors, each held in its flow's
//! record next to the chain's states of the flow (`nflib::records`).
//!
//! Memory matters here (a runtime holds a million flows): the hash index stores only a
//! 4-byte row number per key, and equality is checked against the key kept once in the actor
//! (or in the alias slab), so no key is stored twice. Aliases are chained through their own
//! slab rather than a vector per flow. Each flow row has a record (`nflib::records`): the
//! actor first, then the chain's functions' states, side by side, so creating a flow
//! allocates nothing once the records exist, and a packet finds its actor and its states on
//! a few lines of one page.

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::hint::prefetch;

use nflib::index::{FlowIndex, KeyHasher};
use nflib::records::{Field, FlowRecords};

use crate::migration::{Mark, GROUP_ID_LIMIT};

/// Actor flags.
pub mod flag {
    /// The flow's first packet came from endpoint `a` of its key.
    pub const INITIATOR_IS_A: u8 = 1;
    /// A packet was seen in the reply direction.
    pub const REPLIED: u8 = 2;
    pub const TCP: u8 = 4;
    pub const FIN_ORIG: u8 = 8;
    pub const FIN_REPLY: u8 = 16;
    pub const RST: u8 = 32;
    /// The flow is migrating (out or in): its packets go to the migrator first.
    pub const MIGRATING: u8 = 64;
    /// The slab row holds a live flow.
    pub const LIVE: u8 = 128;
}

const NONE: u32 = u32::MAX;
const ALIAS_BIT: u32 = 1 << 31;

/// Milliseconds from `then`, a flow's time stamp, to `now_ms`. Stamps are the runtime's
/// clock in 32 bits, which wraps after 49.7 days: ages are wrapping differences (an idle
/// flow ends within minutes; a flow older than 49.7 days shows its age modulo that).
#[inline]
pub fn ms_since(now_ms: u64, then: u32) -> u32 {
    (now_ms as u32).wrapping_sub(then)
}

/// What the platform keeps per flow (80 bytes).
#[derive(Clone, Debug)]
pub struct FlowActor {
    pub key: FlowKey,
    /// Unique within this runtime (flow records name it).
    pub id: u64,
    /// Milliseconds since the runtime started.
    pub created_ms: u32,
    pub last_ms: u32,
    /// Generation of the flow's live timer entry.
    pub timer_gen: u32,
    /// First of the flow's aliases in the alias slab.
    first_alias: u32,
    /// The vswitch that feeds it, on this server or another (alias and end messages go
    /// there).
    pub vswitch: EndpointAddr,
    /// The runtime that started it, as an index into the engine's table of homes
    /// (`crate::holds::Homes`; 0 is this runtime): what the flow holds of the functions'
    /// resources (a NAT port) is from that runtime's share, which keeps them reserved while
    /// the flow lives elsewhere. One byte, so that the actor keeps its 80.
    pub home: u8,
    /// Packets run through the chain here (wrapping): migration compares it with what the
    /// vswitch sent.
    pub packets: u32,
    pub flags: u8,
    /// What the migrator marked the flow with while it is diverted ([`Mark`], encoded by
    /// [`FlowActor::set_mark`]): kept here, in room the struct has anyway, rather than in
    /// a map by key that would cost a cache miss per flow moved, in and out.
    mark: u32,
}

/// Set in `FlowActor::mark` for a flow arriving (the rest is its incoming group's id);
/// clear for one moving out (the rest is its group's id, below `GROUP_ID_LIMIT`).
const ARRIVING_BIT: u32 = 1 << 31;

const _: () = assert!(std::mem::size_of::<FlowActor>() == 80);

impl FlowActor {
    pub fn new(
        key: FlowKey,
        id: u64,
        now_ms: u32,
        vswitch: EndpointAddr,
        home: u8,
        flags: u8,
    ) -> FlowActor {
        FlowActor {
            home,
            key,
            id,
            created_ms: now_ms,
            last_ms: now_ms,
            timer_gen: 0,
            first_alias: NONE,
            vswitch,
            packets: 0,
            flags,
            mark: 0,
        }
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// What the migrator marked the flow with, while it is diverted.
    pub fn mark(&self) -> Mark {
        if !self.has(flag::MIGRATING) || self.mark == 0 {
            Mark::None
        } else if self.mark & ARRIVING_BIT != 0 {
            Mark::In(self.mark & !ARRIVING_BIT)
        } else {
            Mark::Out(u64::from(self.mark))
        }
    }

    /// Records `m` (it reads back while the flow is diverted). An id out of range (the
    /// migrator never makes one) reads back as no mark, never as another group.
    pub fn set_mark(&mut self, m: Mark) {
        debug_assert!(match m {
            Mark::Out(g) => g < GROUP_ID_LIMIT,
            Mark::In(id) => u64::from(id) < GROUP_ID_LIMIT,
            Mark::None => true,
        });
        self.mark = match m {
            Mark::None => 0,
            Mark::Out(g) if g < GROUP_ID_LIMIT => g as u32,
            Mark::In(id) if id & ARRIVING_BIT == 0 => ARRIVING_BIT | id,
            Mark::Out(_) | Mark::In(_) => 0,
        };
    }

    /// The migration group the flow is moving out in, while it is diverted for one.
    pub fn moving_out_in(&self) -> Option<u64> {
        match self.mark() {
            Mark::Out(g) => Some(g),
            _ => None,
        }
    }

    pub fn closed(&self) -> bool {
        self.has(flag::RST) || (self.has(flag::FIN_ORIG) && self.has(flag::FIN_REPLY))
    }
}

struct AliasEntry {
    key: FlowKey,
    row: u32,
    next: u32,
}

/// How a packet's key was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Under the flow's own key.
    Key(u32),
    /// Under an alias (a translated reply key): the packet travels in the reply direction.
    Alias(u32),
}

pub struct FlowTable {
    index: FlowIndex,
    /// Seeded per process: keys come from the wire, and a fixed hash would let a sender pick
    /// colliding keys.
    hasher: KeyHasher,
    /// One record per flow row: the actor first, then every function's state of the flow
    /// (fields the chain's functions add), so that a packet finds its actor and states on
    /// the same few lines of one page, asked for with one prefetch.
    records: FlowRecords,
    actor: Field<FlowActor>,
    /// Rows below this have been handed out (records beyond it may exist, made ready by
    /// `reserve`); freed ones wait in `free`.
    next_row: u32,
    free: Vec<u32>,
    aliases: Vec<AliasEntry>,
    free_aliases: Vec<u32>,
    live: usize,
    capacity: usize,
}

/// The key an index value stands for (`None` for a value the index should not hold).
#[inline(always)]
fn key_of<'a>(
    records: &'a FlowRecords,
    actor: &Field<FlowActor>,
    aliases: &'a [AliasEntry],
    v: u32,
) -> Option<&'a FlowKey> {
    if v & ALIAS_BIT != 0 {
        aliases.get((v & !ALIAS_BIT) as usize).map(|e| &e.key)
    } else {
        records.cell(actor, v)?.as_ref().map(|a| &a.key)
    }
}

impl FlowTable {
    /// A table for at most `capacity` flows; memory grows with use, not up front.
    pub fn new(capacity: usize) -> FlowTable {
        let mut records = FlowRecords::new();
        let actor = records
            .add::<FlowActor>()
            .expect("a new table takes fields");
        FlowTable {
            index: FlowIndex::new(),
            hasher: KeyHasher::default(),
            records,
            actor,
            next_row: 0,
            free: Vec::new(),
            aliases: Vec::new(),
            free_aliases: Vec::new(),
            live: 0,
            capacity,
        }
    }

    /// The flows' records, for the chain's functions to add their fields to (before the
    /// first flow) and to find their states in.
    pub fn records_mut(&mut self) -> &mut FlowRecords {
        &mut self.records
    }

    pub fn records(&self) -> &FlowRecords {
        &self.records
    }

    /// Reserves (without touching) room for the table's whole capacity of records, so they
    /// never move. False if the address space could not be had. Call it once the chain's
    /// functions have added their fields.
    pub fn reserve_capacity(&mut self) -> bool {
        self.records.reserve_for(self.capacity)
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn is_full(&self) -> bool {
        self.live >= self.capacity
    }

    /// The hash a key is indexed under (computed once per packet, then reused).
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

    /// Batch lookups, step 2: start loading the record (the actor and the functions'
    /// states; for an alias, its entry too) of the flow the key probably names, and return
    /// its row.
    #[inline(always)]
    pub fn prefetch_entry(&self, hash: u64) -> Option<u32> {
        let v = self.index.peek(hash)?;
        let row = if v & ALIAS_BIT != 0 {
            let e = self.aliases.get((v & !ALIAS_BIT) as usize)?;
            prefetch(e);
            e.row
        } else {
            v
        };
        self.records.prefetch(row);
        Some(row)
    }

    #[inline]
    pub fn find(&self, key: &FlowKey) -> Option<Found> {
        self.find_hashed(key, self.hash(key))
    }

    #[inline]
    pub fn find_hashed(&self, key: &FlowKey, hash: u64) -> Option<Found> {
        let (records, actor, aliases) = (&self.records, &self.actor, &self.aliases);
        self.index
            .find(hash, |v| key_of(records, actor, aliases, v) == Some(key))
            .map(|v| {
                if v & ALIAS_BIT != 0 {
                    Found::Alias(aliases[(v & !ALIAS_BIT) as usize].row)
                } else {
                    Found::Key(v)
                }
            })
    }

    fn index_insert(&mut self, key: &FlowKey, v: u32) {
        let hash = self.hasher.hash(key);
        self.index.insert(hash, v);
    }

    fn index_remove(&mut self, key: &FlowKey, v: u32) {
        let hash = self.hasher.hash(key);
        self.index.remove(hash, v);
    }

    /// Creates a flow actor; `None` when the table is full or the key exists.
    pub fn insert(&mut self, mut actor: FlowActor) -> Option<u32> {
        if self.is_full() || self.find(&actor.key).is_some() {
            return None;
        }
        actor.flags |= flag::LIVE;
        actor.first_alias = NONE;
        let key = actor.key;
        // A freed row, or the next one never handed out; taken only once its record
        // exists (making it can fail for want of memory).
        let (row, fresh) = match self.free.last() {
            Some(&s) => (s, false),
            None => (self.next_row, true),
        };
        let next = if fresh {
            row.checked_add(1)?
        } else {
            self.next_row
        };
        *self.records.entry(&self.actor, row)? = Some(actor);
        if fresh {
            self.next_row = next;
        } else {
            self.free.pop();
        }
        self.index_insert(&key, row);
        self.live += 1;
        Some(row)
    }

    /// Makes `key` lead to `row` too. An alias never replaces a flow's key or another alias.
    pub fn add_alias(&mut self, row: u32, key: FlowKey) -> bool {
        if self.find(&key).is_some() || self.get(row).is_none() {
            return false;
        }
        let Some(next) = self.get(row).map(|a| a.first_alias) else {
            return false;
        };
        let entry = AliasEntry { key, row, next };
        let i = match self.free_aliases.pop() {
            Some(i) => {
                self.aliases[i as usize] = entry;
                i
            }
            None => {
                self.aliases.push(entry);
                (self.aliases.len() - 1) as u32
            }
        };
        if let Some(a) = self.get_mut(row) {
            a.first_alias = i;
        }
        self.index_insert(&key, i | ALIAS_BIT);
        true
    }

    #[inline]
    pub fn get(&self, row: u32) -> Option<&FlowActor> {
        self.records.cell(&self.actor, row)?.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, row: u32) -> Option<&mut FlowActor> {
        self.records.cell_mut(&self.actor, row)?.as_mut()
    }

    /// Removes a flow with its key and aliases; returns the actor and its alias keys.
    pub fn remove(&mut self, row: u32) -> Option<(FlowActor, Vec<FlowKey>)> {
        let actor = self.records.cell_mut(&self.actor, row)?.take()?;
        self.index_remove(&actor.key, row);
        let mut keys = Vec::new();
        let mut a = actor.first_alias;
        while a != NONE {
            let (key, next) = {
                let e = &self.aliases[a as usize];
                (e.key, e.next)
            };
            self.index_remove(&key, a | ALIAS_BIT);
            self.free_aliases.push(a);
            keys.push(key);
            a = next;
        }
        self.free.push(row);
        self.live -= 1;
        Some((actor, keys))
    }

    /// Rows of every live flow.
    pub fn rows(&self) -> Vec<u32> {
        self.live_rows().collect()
    }

    /// Rows of the live flows, in slab order.
    pub fn live_rows(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.slab_len() as u32).filter(|&s| self.get(s).is_some())
    }

    /// Rows handed out, live or free (the bound of a scan by row).
    pub fn slab_len(&self) -> usize {
        self.next_row as usize
    }

    /// Makes room for `additional` more flows (within the capacity) without reallocating
    /// while they arrive. Returns the slab length they will fill it to: the bound below
    /// which the functions' states need room too.
    pub fn reserve(&mut self, additional: usize) -> usize {
        let additional = additional.min(self.capacity.saturating_sub(self.live));
        let new_rows = additional.saturating_sub(self.free.len());
        let len = self.slab_len() + new_rows;
        // Records (empty) written now, so their pages exist before the flows do.
        self.records.reserve(u32::try_from(len).unwrap_or(u32::MAX));
        len
    }

    /// The flow's aliases.
    pub fn aliases_of(&self, row: u32) -> Vec<FlowKey> {
        let mut v = Vec::new();
        let mut a = self.get(row).map(|f| f.first_alias).unwrap_or(NONE);
        while a != NONE {
            v.push(self.aliases[a as usize].key);
            a = self.aliases[a as usize].next;
        }
        v
    }

    /// How many aliases a flow has.
    pub fn alias_count(&self, row: u32) -> u32 {
        let mut n = 0;
        let mut a = self.get(row).map(|f| f.first_alias).unwrap_or(NONE);
        while a != NONE {
            n += 1;
            a = self.aliases[a as usize].next;
        }
        n
    }

    /// Bytes of memory held for the index, the actors and the aliases: the actors' part of
    /// the records written so far (the reserved room past them holds no pages), the rest by
    /// capacity.
    pub fn memory(&self) -> usize {
        self.index.memory()
            + self.records.len() * std::mem::size_of::<Option<FlowActor>>()
            + self.aliases.capacity() * std::mem::size_of::<AliasEntry>()
            + (self.free.capacity() + self.free_aliases.capacity()) * 4
    }

    /// Bytes of the records written so far that hold the functions' states (the records
    /// less the actors).
    pub fn state_memory(&self) -> usize {
        self.records
            .memory()
            .saturating_sub(self.records.len() * std::mem::size_of::<Option<FlowActor>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> FlowKey {
        FlowKey::from_tuple(
            4,
            6,
            0,
            (FlowKey::v4([10, 0, 0, 1]), p),
            (FlowKey::v4([10, 0, 0, 2]), 80),
        )
        .0
    }

    fn actor(k: FlowKey) -> FlowActor {
        FlowActor::new(k, 0, 0, EndpointAddr::new(1, 1), 0, 0)
    }

    #[test]
    fn keys_aliases_removal_and_reuse() {
        let mut t = FlowTable::new(2);
        let a = t.insert(actor(key(1))).unwrap();
        assert!(t.add_alias(a, key(100)));
        assert!(t.add_alias(a, key(101)));
        assert!(!t.add_alias(a, key(1)), "an alias never shadows a key");
        assert_eq!(t.find(&key(1)), Some(Found::Key(a)));
        assert_eq!(t.find(&key(100)), Some(Found::Alias(a)));
        let b = t.insert(actor(key(2))).unwrap();
        assert!(t.insert(actor(key(3))).is_none(), "full");
        let (_, aliases) = t.remove(a).unwrap();
        assert_eq!(aliases.len(), 2);
        assert_eq!(t.find(&key(100)), None);
        assert_eq!(t.find(&key(1)), None);
        let c = t.insert(actor(key(3))).unwrap();
        assert_eq!(c, a, "rows are reused");
        assert!(t.add_alias(c, key(100)), "alias entries are reused");
        assert_ne!(b, c);
        assert_eq!(t.len(), 2);
        assert_eq!(t.find(&key(2)), Some(Found::Key(b)));
    }

    #[test]
    fn room_is_made_within_the_capacity_and_free_slots_count() {
        let mut t = FlowTable::new(10);
        let a = t.insert(actor(key(1))).unwrap();
        t.insert(actor(key(2))).unwrap();
        t.remove(a).unwrap();
        // One free row, one live flow: 9 more fit, 8 of them in new rows.
        assert_eq!(t.reserve(100), 10);
        assert!(t.records.len() >= 10);
        assert_eq!(t.reserve(0), 2);
        for p in 3..12 {
            assert!(t.insert(actor(key(p))).is_some());
        }
        assert!(t.insert(actor(key(12))).is_none(), "full");
        assert_eq!(t.slab_len(), 10);
    }

    #[test]
    fn many_flows_survive_growth() {
        let mut t = FlowTable::new(100_000);
        for p in 0..50_000u16 {
            let s = t.insert(actor(key(p))).unwrap();
            assert!(t.add_alias(
                s,
                FlowKey::from_tuple(
                    4,
                    17,
                    0,
                    (FlowKey::v4([1, 1, 1, 1]), p),
                    (FlowKey::v4([2, 2, 2, 2]), 9)
                )
                .0
            ));
        }
        for p in (0..50_000u16).step_by(2) {
            let Some(Found::Key(s)) = t.find(&key(p)) else {
                panic!("lost {p}")
            };
            t.remove(s).unwrap();
        }
        for p in 0..50_000u16 {
            assert_eq!(t.find(&key(p)).is_some(), p % 2 == 1, "{p}");
        }
        assert_eq!(t.len(), 25_000);
    }

    #[test]
    fn a_mark_reads_back_while_the_flow_is_diverted() {
        let mut a = actor(key(1));
        a.flags |= flag::MIGRATING;
        for m in [
            Mark::Out(1),
            Mark::Out(GROUP_ID_LIMIT - 1),
            Mark::In(0),
            Mark::In(7),
            Mark::In((GROUP_ID_LIMIT - 1) as u32),
            Mark::None,
        ] {
            a.set_mark(m);
            assert_eq!(a.mark(), m);
        }
        a.set_mark(Mark::Out(5));
        assert_eq!(a.moving_out_in(), Some(5));
        a.set_mark(Mark::In(5));
        assert_eq!(a.moving_out_in(), None, "arriving is not moving out");
        // Not diverted: no mark, whatever is recorded.
        a.set_mark(Mark::Out(5));
        a.flags &= !flag::MIGRATING;
        assert_eq!(a.mark(), Mark::None);
    }

    #[test]
    fn actor_is_small() {
        assert!(
            std::mem::size_of::<FlowActor>() <= 80,
            "{}",
            std::mem::size_of::<FlowActor>()
        );
    }
}
