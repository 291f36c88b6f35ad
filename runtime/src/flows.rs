//! The flow table: flow keys (and their aliases) to flow actors held in a slab.
//!
//! A flow actor is small and fixed-size; the per-flow states of the chain's functions live
//! in each function's own slab at the same slot index, so the table stores no function state
//! and creating a flow allocates nothing once the slabs have grown.

use std::collections::HashMap;

use nflib::flow::FlowKey;

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
}

/// What the platform keeps per flow.
#[derive(Clone, Debug)]
pub struct FlowActor {
    pub key: FlowKey,
    /// Unique within this runtime (flow records name it).
    pub id: u64,
    /// Milliseconds since the runtime started.
    pub created_ms: u32,
    pub last_ms: u32,
    /// The vswitch that feeds it (alias and end messages go there).
    pub vswitch: u16,
    pub flags: u8,
    /// Generation of the flow's live timer entry.
    pub timer_gen: u32,
    /// Keys registered by functions that lead here too.
    pub aliases: Option<Box<Vec<FlowKey>>>,
}

impl FlowActor {
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub fn closed(&self) -> bool {
        self.has(flag::RST) || (self.has(flag::FIN_ORIG) && self.has(flag::FIN_REPLY))
    }
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
    /// Keys and aliases to slots; the high bit marks an alias.
    index: HashMap<FlowKey, u32, foldhash::fast::RandomState>,
    actors: Vec<Option<FlowActor>>,
    free: Vec<u32>,
    live: usize,
    capacity: usize,
}

const ALIAS_BIT: u32 = 1 << 31;

impl FlowTable {
    /// A table for at most `capacity` flows; memory grows with use, not up front.
    pub fn new(capacity: usize) -> FlowTable {
        FlowTable {
            // Seeded per process: keys come from the wire, and a fixed hash would let a sender
            // pick colliding keys.
            index: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            actors: Vec::new(),
            free: Vec::new(),
            live: 0,
            capacity,
        }
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

    #[inline]
    pub fn find(&self, key: &FlowKey) -> Option<Found> {
        self.index.get(key).map(|&v| {
            if v & ALIAS_BIT != 0 {
                Found::Alias(v & !ALIAS_BIT)
            } else {
                Found::Key(v)
            }
        })
    }

    /// Creates a flow actor; `None` when the table is full.
    pub fn insert(&mut self, actor: FlowActor) -> Option<u32> {
        if self.is_full() {
            return None;
        }
        let key = actor.key;
        let slot = match self.free.pop() {
            Some(s) => {
                self.actors[s as usize] = Some(actor);
                s
            }
            None => {
                self.actors.push(Some(actor));
                (self.actors.len() - 1) as u32
            }
        };
        self.index.insert(key, slot);
        self.live += 1;
        Some(slot)
    }

    /// Makes `key` lead to `slot` too. An alias never replaces a flow's own key.
    pub fn add_alias(&mut self, slot: u32, key: FlowKey) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        let Some(Some(a)) = self.actors.get_mut(slot as usize) else {
            return false;
        };
        a.aliases.get_or_insert_with(Default::default).push(key);
        self.index.insert(key, slot | ALIAS_BIT);
        true
    }

    pub fn get(&self, slot: u32) -> Option<&FlowActor> {
        self.actors.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut FlowActor> {
        self.actors.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Removes a flow, its key and its aliases; returns the actor.
    pub fn remove(&mut self, slot: u32) -> Option<FlowActor> {
        let actor = self.actors.get_mut(slot as usize)?.take()?;
        self.index.remove(&actor.key);
        if let Some(aliases) = &actor.aliases {
            for a in aliases.iter() {
                if self.index.get(a) == Some(&(slot | ALIAS_BIT)) {
                    self.index.remove(a);
                }
            }
        }
        self.free.push(slot);
        self.live -= 1;
        Some(actor)
    }

    /// Slots of every live flow.
    pub fn slots(&self) -> Vec<u32> {
        self.actors
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_some())
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Approximate bytes of memory used by the table and the actors (for the per-flow
    /// overhead figure).
    pub fn memory(&self) -> usize {
        let entry = std::mem::size_of::<(FlowKey, u32)>() + 1;
        let aliases: usize = self
            .actors
            .iter()
            .flatten()
            .filter_map(|a| a.aliases.as_ref())
            .map(|v| v.capacity() * std::mem::size_of::<FlowKey>() + 24)
            .sum();
        self.index.capacity() * entry
            + self.actors.capacity() * std::mem::size_of::<Option<FlowActor>>()
            + self.free.capacity() * 4
            + aliases
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
        FlowActor {
            key: k,
            id: 0,
            created_ms: 0,
            last_ms: 0,
            vswitch: 1,
            flags: 0,
            timer_gen: 0,
            aliases: None,
        }
    }

    #[test]
    fn keys_aliases_removal_and_reuse() {
        let mut t = FlowTable::new(2);
        let a = t.insert(actor(key(1))).unwrap();
        assert!(t.add_alias(a, key(100)));
        assert!(!t.add_alias(a, key(1)), "an alias never shadows a key");
        assert_eq!(t.find(&key(1)), Some(Found::Key(a)));
        assert_eq!(t.find(&key(100)), Some(Found::Alias(a)));
        let b = t.insert(actor(key(2))).unwrap();
        assert!(t.insert(actor(key(3))).is_none(), "full");
        t.remove(a).unwrap();
        assert_eq!(t.find(&key(100)), None);
        let c = t.insert(actor(key(3))).unwrap();
        assert_eq!(c, a, "slots are reused");
        assert_ne!(b, c);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn actor_is_small() {
        assert!(
            std::mem::size_of::<Option<FlowActor>>() <= 96,
            "{}",
            std::mem::size_of::<Option<FlowActor>>()
        );
    }
}
