//! Per-flow replication (paper section 4.1.3), both sides, as I/O-free state machines.
//!
//! **Primary** ([`Replicator`]): every flow gets a replica runtime from the candidates the
//! coordinator gave (`SetReplica`), round-robin. Each flush, the flows whose packets ran
//! since the last one are *dirty*; the engine serialises their functions' states, and the
//! replicator keeps, per function, a hash of what the flow's replica last received, so
//! only the functions whose state changed cross (all of them when the replica does not hold
//! the flow yet). One `Replicate` per replica and flush carries every changed flow of the
//! burst, numbered by a per-replica *version*; the replica answers `Replicated` with the
//! highest version it applied.
//!
//! **Output commit**: a packet of a flow processed in this burst waits for the version that
//! carries the state it produced, and leaves only when its replica acknowledged that
//! version (or after `commit_wait_ms`, counted as unprotected). Packets wait per replica in
//! one queue whose versions never decrease, so they leave in the order they were held; a
//! flow is on one replica at a time, so its packets never overtake one another.
//!
//! **Replica** ([`ReplicaStore`]): per primary incarnation and flow id, the flow's key,
//! aliases, vswitch, flags and every function's state as bytes; no function runs. Bounded
//! (`max_replica_flows`); a flow it cannot take is refused in the answer and counted.
//! `promote` hands the engine every flow of a dead primary's incarnation (`Recover`).
//!
//! No clock and no I/O: the engine gives the time, serialises the states, sends the
//! messages and moves the packets (`runtime::engine`); docs/REPLICATION.md has the why.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::msg::{states, Message, ReplicaFlow, ReplicaNew};
use nflib::nf::MAX_NFS;

/// What a chain's flows are protected by (`[[chain]] replication`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No replica: a runtime's death loses its flows' state.
    Off,
    /// A flow's changes go to its replica after `packets` packets or `interval_ms`,
    /// whichever comes first; output is never held. A takeover resumes from the last copy:
    /// what the flow did since is lost (a firewall may then see mid-stream packets of a
    /// state it has not got, a monitor undercounts).
    Periodic { packets: u32, interval_ms: u32 },
    /// No packet leaves before its flow's replica holds the state the packet produced.
    OutputCommit,
}

/// What output does while its flow has no live replica (under output commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithoutReplica {
    /// Wait, up to `commit_wait_ms`, for a replica to appear and acknowledge.
    Wait,
    /// Leave at once, counted `repl_unprotected`.
    Unprotected,
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub mode: Mode,
    pub without_replica: WithoutReplica,
    /// Longest a packet waits for its replica's acknowledgement: then it leaves unprotected
    /// (counted), so a replica that stops answering costs protection, never the traffic.
    pub commit_wait_ms: u32,
    /// Most flows this runtime holds as a replica of others.
    pub max_replica_flows: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Off,
            without_replica: WithoutReplica::Unprotected,
            commit_wait_ms: 50,
            max_replica_flows: 1 << 20,
        }
    }
}

const NO_LINK: u16 = u16::MAX;

/// Bounds of one `Replicate` (a message is at most 4 MiB; a whole flow's copy is some tens
/// to hundreds of bytes).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// (Smaller under test, so that simulations of some hundred flows split their batches.)
const MAX_BATCH_FLOWS: usize = if cfg!(test) { 64 } else { 8192 };

/// What the replicator keeps per flow row of the engine.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The flow's id (0: the row is not tracked).
    id: u64,
    /// Index of its replica in `links`, or `NO_LINK`.
    link: u16,
    /// The replica has been sent the flow whole (it holds it, unless it refused).
    synced: bool,
    /// In `dirty` already.
    dirty: bool,
    /// The aliases changed since they were last sent.
    aliases_changed: bool,
    /// The replica refused the flow: it goes unprotected until it ends.
    refused: bool,
    /// In `pending` (periodic mode: changed, not yet due).
    pending: bool,
    /// The platform flags the replica holds.
    flags: u8,
    /// Packets since the flow was last written to a batch, and when that was (ms).
    since_packets: u32,
    since_ms: u32,
}

impl Tracked {
    const EMPTY: Tracked = Tracked {
        id: 0,
        link: NO_LINK,
        synced: false,
        dirty: false,
        aliases_changed: false,
        refused: false,
        pending: false,
        flags: 0,
        since_packets: 0,
        since_ms: 0,
    };
}

/// A held packet: the version it waits for, its flow, when it must go at the latest.
struct Held<P> {
    version: u64,
    row: u32,
    id: u64,
    deadline_ns: u64,
    pkt: P,
}

/// One replica runtime, as its primary sees it.
struct Link<P> {
    addr: EndpointAddr,
    live: bool,
    /// The version the batch being built will carry.
    next: u64,
    acked: u64,
    /// Versions sent and not yet acknowledged, with when they were sent.
    unacked: VecDeque<(u64, u64)>,
    flows: Vec<ReplicaFlow>,
    states: Vec<u8>,
    ended: Vec<u64>,
    held: VecDeque<Held<P>>,
    /// Messages made, with their versions, that the transport had no room for yet (sent
    /// in order before anything newer). While any waits the link is *congested*: its
    /// flows' changes are not written (they stay dirty and go, newest, once it drains),
    /// so what waits is at most one flush's worth, and the output waits with them.
    unsent: VecDeque<Message>,
}

impl<P> Link<P> {
    fn new(addr: EndpointAddr) -> Link<P> {
        Link {
            addr,
            live: true,
            next: 1,
            acked: 0,
            unacked: VecDeque::new(),
            flows: Vec::new(),
            states: Vec::new(),
            ended: Vec::new(),
            held: VecDeque::new(),
            unsent: VecDeque::new(),
        }
    }

    fn congested(&self) -> bool {
        !self.unsent.is_empty()
    }

    fn batch_empty(&self) -> bool {
        self.flows.is_empty() && self.ended.is_empty()
    }
}

/// The replicator's counters, for the engine's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrimaryCounters {
    /// `Replicate` messages made, flows and bytes of state in them.
    pub messages: u64,
    pub flows_sent: u64,
    pub state_bytes: u64,
    /// Functions' states found unchanged and not sent.
    pub states_unchanged: u64,
    /// Packets held for an acknowledgement, and those let go without one (timed out, or
    /// no replica).
    pub held: u64,
    pub unprotected: u64,
    /// Flows a replica refused (its table was full), and flows moved to another replica
    /// because theirs was lost.
    pub refused: u64,
    pub moved: u64,
    /// Flows a replica reported missing, sent whole again.
    pub missing: u64,
    /// Times a message waited for room in the transport's queue to its replica (the link
    /// carries state more slowly than it changes; output waits meanwhile).
    pub congested: u64,
    /// Acknowledgement delay, the last one and the largest (ns).
    pub last_lag_ns: u64,
    pub max_lag_ns: u64,
    /// How long flows went without a copy after their replica was lost: from the loss to
    /// the acknowledgement of their whole copies by other replicas (ns), the last time and
    /// the longest.
    pub last_unprotected_ns: u64,
    pub max_unprotected_ns: u64,
}

/// Flows moved off a lost replica, until their new replicas hold them.
#[derive(Clone, Debug)]
struct Reprotect {
    since_ns: u64,
    /// Written to the new replicas: per link, the version their copies went in.
    sent: Option<Vec<(u16, u64)>>,
}

/// What the engine knows of a dirty flow when writing it to a batch.
#[derive(Clone, Debug)]
pub struct FlowMeta {
    pub key: FlowKey,
    pub vswitch: EndpointAddr,
    pub home: EndpointAddr,
    pub flags: u8,
    pub packets: u32,
    pub age_ms: u32,
}

/// What the transport did with a message handed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    Taken,
    /// No room now: try again later.
    Full,
    /// Never (too large, too many peers): the version is lost.
    Refused,
}

/// The primary's side.
pub struct Replicator<P> {
    settings: Settings,
    incarnation: u64,
    nfs: usize,
    links: Vec<Link<P>>,
    /// Round-robin cursor over `links`.
    cursor: usize,
    tracked: Vec<Tracked>,
    /// Per row and function: a hash of the state the replica holds.
    hashes: Vec<u64>,
    dirty: Vec<u32>,
    /// Dirty flows whose replica's link is congested: dirty again when it drains.
    deferred: Vec<u32>,
    /// Periodic mode: flows changed since their last copy, not yet due.
    pending: Vec<u32>,
    next_scan_ms: u64,
    /// Output of flows that have no live replica, waiting for one (`WithoutReplica::Wait`).
    orphans: VecDeque<Held<P>>,
    scratch: Vec<u8>,
    hasher: foldhash::fast::FixedState,
    reprotect: Option<Reprotect>,
    pub counters: PrimaryCounters,
}

impl<P> Replicator<P> {
    pub fn new(settings: Settings, incarnation: u64, nfs: usize) -> Replicator<P> {
        assert!(
            nfs <= MAX_NFS && MAX_NFS <= 8,
            "a flow's changed functions fit a byte"
        );
        Replicator {
            settings,
            incarnation,
            nfs,
            links: Vec::new(),
            cursor: 0,
            tracked: Vec::new(),
            hashes: Vec::new(),
            dirty: Vec::new(),
            deferred: Vec::new(),
            pending: Vec::new(),
            next_scan_ms: 0,
            orphans: VecDeque::new(),
            scratch: Vec::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x7265_706c_6963_6131),
            reprotect: None,
            counters: PrimaryCounters::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.settings.mode
    }

    pub fn enabled(&self) -> bool {
        self.settings.mode != Mode::Off
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The replicas this runtime may use (`SetReplica`), in order of preference. Links to
    /// runtimes no longer named are lost (their flows move, with their output); new ones
    /// start empty.
    pub fn set_replicas(&mut self, replicas: &[EndpointAddr], now_ns: u64) {
        for i in 0..self.links.len() {
            if self.links[i].live && !replicas.contains(&self.links[i].addr) {
                self.lose_link(i, now_ns);
            }
        }
        for r in replicas {
            match self.links.iter().position(|l| l.addr == *r) {
                Some(i) => self.links[i].live = true,
                None => {
                    if self.links.len() < usize::from(NO_LINK) {
                        self.links.push(Link::new(*r));
                    }
                }
            }
        }
        self.adopt_orphans(now_ns);
    }

    fn live_link(&mut self) -> Option<u16> {
        let n = self.links.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if self.links[i].live {
                self.cursor = (i + 1) % n;
                return Some(i as u16);
            }
        }
        None
    }

    fn track(&mut self, row: u32, id: u64) -> &mut Tracked {
        let s = row as usize;
        if self.tracked.len() <= s {
            self.tracked.resize(s + 1, Tracked::EMPTY);
            self.hashes.resize((s + 1) * self.nfs, 0);
        }
        if self.tracked[s].id != id {
            // A new flow in this row (or one never seen): it starts unsynced.
            self.tracked[s] = Tracked {
                id,
                ..Tracked::EMPTY
            };
        }
        &mut self.tracked[s]
    }

    /// A packet of flow (`row`, `id`) ran through the chain at `now_ms`. Returns whether
    /// its output must be held (then pass it to [`Replicator::hold`]).
    #[inline(always)]
    pub fn touched(&mut self, row: u32, id: u64, now_ms: u64) -> bool {
        // Off costs the packet path this compare and nothing else.
        if self.settings.mode == Mode::Off {
            return false;
        }
        self.touched_replicated(row, id, now_ms)
    }

    #[inline(never)]
    fn touched_replicated(&mut self, row: u32, id: u64, now_ms: u64) -> bool {
        let mode = self.settings.mode;
        let t = self.track(row, id);
        t.since_packets = t.since_packets.saturating_add(1);
        let write = match mode {
            Mode::OutputCommit => true,
            Mode::Periodic {
                packets,
                interval_ms,
            } => {
                !t.synced
                    || t.since_packets >= packets
                    || (now_ms as u32).wrapping_sub(t.since_ms) >= interval_ms
            }
            Mode::Off => false,
        };
        if write {
            if !t.dirty {
                t.dirty = true;
                self.dirty.push(row);
            }
        } else if !t.pending {
            t.pending = true;
            self.pending.push(row);
        }
        // A refused flow's output is held all the same (for as long as the queue ahead
        // of it), so that it never overtakes the flow's earlier packets.
        mode == Mode::OutputCommit
    }

    /// Periodic mode: makes the flows whose change has waited `interval_ms` dirty. Scans
    /// the changed flows a few times per interval, not per call.
    pub fn tick(&mut self, now_ms: u64) {
        let Mode::Periodic { interval_ms, .. } = self.settings.mode else {
            return;
        };
        if now_ms < self.next_scan_ms || self.pending.is_empty() {
            return;
        }
        self.next_scan_ms = now_ms + u64::from(interval_ms / 4).max(1);
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain(|&row| {
            let t = &mut self.tracked[row as usize];
            if !t.pending || t.id == 0 {
                t.pending = false;
                return false;
            }
            if t.dirty {
                // Written at the next flush anyway.
                t.pending = false;
                return false;
            }
            if (now_ms as u32).wrapping_sub(t.since_ms) < interval_ms {
                return true;
            }
            t.pending = false;
            t.dirty = true;
            self.dirty.push(row);
            false
        });
        self.pending = pending;
    }

    /// The flow is to be copied whole at the next flush (a flow just taken over).
    pub fn protect(&mut self, row: u32, id: u64) {
        if self.settings.mode == Mode::Off {
            return;
        }
        let t = self.track(row, id);
        t.synced = false;
        if !t.dirty {
            t.dirty = true;
            self.dirty.push(row);
        }
    }

    /// The flow's aliases changed (they go whole with its next change).
    pub fn aliases_changed(&mut self, row: u32, id: u64) {
        if self.settings.mode == Mode::Off {
            return;
        }
        let t = self.track(row, id);
        t.aliases_changed = true;
        if !t.dirty {
            t.dirty = true;
            self.dirty.push(row);
        }
    }

    /// Holds `pkt`, output of flow (`row`, `id`) whose packet was just `touched`, until
    /// its replica holds the state it produced. Returns it if it may leave at once (the
    /// flow has no replica and output is not to wait for one).
    pub fn hold(&mut self, row: u32, id: u64, pkt: P, now_ns: u64) -> Option<P> {
        let deadline_ns =
            now_ns.saturating_add(u64::from(self.settings.commit_wait_ms) * 1_000_000);
        let link = match self.tracked.get(row as usize) {
            Some(t) if t.id == id => t.link,
            // Not tracked (the flow has ended): nothing to protect, but its earlier packets
            // may still wait for their version.
            _ => return self.behind_earlier(id, pkt, deadline_ns),
        };
        let link = if link == NO_LINK || !self.links[link as usize].live {
            match self.live_link() {
                Some(l) => {
                    // Its new replica must get it whole before this packet may go.
                    let t = &mut self.tracked[row as usize];
                    t.link = l;
                    t.synced = false;
                    if !t.dirty {
                        t.dirty = true;
                        self.dirty.push(row);
                    }
                    l
                }
                None => {
                    if self.settings.without_replica == WithoutReplica::Unprotected {
                        self.counters.unprotected += 1;
                        return Some(pkt);
                    }
                    self.counters.held += 1;
                    self.orphans.push_back(Held {
                        version: 0,
                        row,
                        id,
                        deadline_ns,
                        pkt,
                    });
                    return None;
                }
            }
        } else {
            link
        };
        let l = &mut self.links[link as usize];
        self.counters.held += 1;
        l.held.push_back(Held {
            version: l.next,
            row,
            id,
            deadline_ns,
            pkt,
        });
        None
    }

    /// A packet of flow `id`, which has ended, goes behind the flow's packets still held
    /// (at the back of that queue, leaving when all before it may), never ahead of them: a
    /// flow ending within its first round trip had its last packets, released late by the
    /// alias commit, overtake its earlier ones. With none held, it may leave at once.
    fn behind_earlier(&mut self, id: u64, pkt: P, deadline_ns: u64) -> Option<P> {
        for l in self.links.iter_mut() {
            let Some(row) = l.held.iter().rev().find(|h| h.id == id).map(|h| h.row) else {
                continue;
            };
            let version = l.held.back().map_or(l.next, |h| h.version);
            self.counters.held += 1;
            l.held.push_back(Held {
                version,
                row,
                id,
                deadline_ns,
                pkt,
            });
            return None;
        }
        if let Some(row) = self
            .orphans
            .iter()
            .rev()
            .find(|h| h.id == id)
            .map(|h| h.row)
        {
            self.counters.held += 1;
            self.orphans.push_back(Held {
                version: 0,
                row,
                id,
                deadline_ns,
                pkt,
            });
            return None;
        }
        Some(pkt)
    }

    /// Whether `write_dirty` has flows to write.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Takes the dirty flows (row, id) for the engine to write with `write_flow`; the list
    /// it gives back is to be returned with `return_dirty` (kept to avoid allocating).
    pub fn take_dirty(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dirty)
    }

    pub fn return_dirty(&mut self, mut v: Vec<u32>) {
        v.clear();
        if self.dirty.is_empty() {
            self.dirty = v;
        }
    }

    /// The id tracked in `row`, if it is dirty (the engine checks it still holds that
    /// flow before writing it).
    pub fn dirty_id(&self, row: u32) -> Option<u64> {
        self.tracked
            .get(row as usize)
            .filter(|t| t.dirty && t.id != 0)
            .map(|t| t.id)
    }

    /// Writes dirty flow `row` into its replica's batch: the platform's part (`meta`,
    /// `aliases` when they changed) and each function's state that differs from what the
    /// replica holds (`save(i, out)` appends function `i`'s state to `out`, false for
    /// none). A flow without a live replica gets one here.
    pub fn write_flow(
        &mut self,
        row: u32,
        now_ms: u64,
        meta: &FlowMeta,
        aliases: &dyn Fn() -> Vec<FlowKey>,
        save: &mut dyn FnMut(usize, &mut Vec<u8>) -> bool,
    ) {
        let s = row as usize;
        let Some(t) = self.tracked.get(s).copied() else {
            return;
        };
        if !t.dirty {
            // Listed twice (the row's flow changed in between): written already.
            return;
        }
        self.tracked[s].dirty = false;
        if t.id == 0 || t.refused {
            return;
        }
        let link = if t.link != NO_LINK && self.links[t.link as usize].live {
            t.link
        } else {
            match self.live_link() {
                Some(l) => {
                    self.tracked[s].link = l;
                    self.tracked[s].synced = false;
                    l
                }
                // Written again when a replica comes (`adopt_orphans` marks it dirty).
                None => {
                    self.tracked[s].synced = false;
                    return;
                }
            }
        };
        if self.links[link as usize].congested() {
            // Written, newest, once the link drains; its output waits for that.
            self.tracked[s].dirty = true;
            self.deferred.push(row);
            return;
        }
        let t = self.tracked[s];
        let whole = !t.synced;
        let mut changed = 0u8;
        let l = &mut self.links[link as usize];
        let start = l.states.len();
        for i in 0..self.nfs {
            self.scratch.clear();
            let has = save(i, &mut self.scratch);
            let h = if has {
                // 0 is "no state": a state never hashes to it.
                self.hasher.hash_one(&self.scratch[..]) | 1
            } else {
                0
            };
            let row_hash = &mut self.hashes[s * self.nfs + i];
            if !whole && *row_hash == h {
                self.counters.states_unchanged += 1;
                continue;
            }
            *row_hash = h;
            changed |= 1 << i;
            let scratch = &self.scratch;
            states::push(&mut l.states, |out| {
                if has {
                    out.extend_from_slice(scratch);
                }
                has
            });
        }
        let states_len = (l.states.len() - start) as u32;
        let t = &mut self.tracked[s];
        t.since_packets = 0;
        t.since_ms = now_ms as u32;
        t.pending = false;
        if !whole && changed == 0 && !t.aliases_changed && t.flags == meta.flags {
            // Nothing the replica would keep changed (the packet count alone is not
            // worth a message).
            return;
        }
        self.counters.state_bytes += u64::from(states_len);
        self.counters.flows_sent += 1;
        l.flows.push(ReplicaFlow {
            id: t.id,
            new: whole.then_some(ReplicaNew {
                key: meta.key,
                vswitch: meta.vswitch,
                age_ms: meta.age_ms,
                home: meta.home,
            }),
            aliases: (whole || t.aliases_changed).then(aliases),
            flags: meta.flags,
            packets: meta.packets,
            changed,
            states_len,
        });
        let t = &mut self.tracked[s];
        t.synced = true;
        t.pending = false;
        t.aliases_changed = false;
        t.flags = meta.flags;
    }

    /// Flow (`row`, `id`) ended: its replica forgets it. Its held packets stay queued and
    /// leave as they would have.
    #[inline]
    pub fn ended(&mut self, row: u32, id: u64) {
        if self.tracked.is_empty() {
            return;
        }
        let Some(t) = self.tracked.get_mut(row as usize) else {
            return;
        };
        if t.id != id {
            return;
        }
        let (link, synced) = (t.link, t.synced);
        *t = Tracked::EMPTY;
        if synced && link != NO_LINK {
            let l = &mut self.links[link as usize];
            if l.live {
                l.ended.push(id);
            }
        }
    }

    /// Makes this flush's messages, one per replica with a change or with packets waiting
    /// for its version (more if the batch is large); `transmit` hands them to the
    /// transport. A congested replica's link makes none (its flows' changes were
    /// deferred): its packets keep waiting for the version it will make next.
    pub fn flush(&mut self, now_ns: u64) {
        // A replica no longer used is told once which copies to forget (`lose_link`); no
        // answer is awaited (it may be dead).
        for l in self
            .links
            .iter_mut()
            .filter(|l| !l.live && !l.ended.is_empty())
        {
            let version = l.next;
            l.next += 1;
            l.unsent.push_back(Message::Replicate {
                incarnation: self.incarnation,
                version,
                flows: Vec::new(),
                states: Vec::new(),
                ended: std::mem::take(&mut l.ended),
            });
        }
        for l in self.links.iter_mut().filter(|l| l.live && !l.congested()) {
            let waiting = l.held.back().is_some_and(|h| h.version == l.next);
            if l.batch_empty() {
                if waiting {
                    // Nothing changed: the packets need only what was sent before.
                    let prev = l.next - 1;
                    for h in l.held.iter_mut().rev() {
                        if h.version != l.next {
                            break;
                        }
                        h.version = prev;
                    }
                }
                continue;
            }
            // One message per version, each within `MAX_BATCH_BYTES` of state and
            // `MAX_BATCH_FLOWS` flows (a lost replica's flows all go again at once); the
            // packets waiting for this flush wait for the last of them.
            let first = l.next;
            let mut flows = std::mem::take(&mut l.flows);
            let mut states = std::mem::take(&mut l.states);
            let mut ended = std::mem::take(&mut l.ended);
            let (mut at, mut i) = (0usize, 0usize);
            while i < flows.len() || !ended.is_empty() {
                let (mut j, mut bytes) = (i, 0usize);
                while j < flows.len()
                    && j - i < MAX_BATCH_FLOWS
                    && (j == i || bytes + flows[j].states_len as usize <= MAX_BATCH_BYTES)
                {
                    bytes += flows[j].states_len as usize;
                    j += 1;
                }
                let version = l.next;
                l.next += 1;
                l.unacked.push_back((version, now_ns));
                self.counters.messages += 1;
                // The usual flush is one message: its batch moves into it whole.
                let (part_flows, part_states) = if i == 0 && j == flows.len() {
                    (std::mem::take(&mut flows), std::mem::take(&mut states))
                } else {
                    (
                        flows[i..j].to_vec(),
                        states.get(at..at + bytes).unwrap_or_default().to_vec(),
                    )
                };
                l.unsent.push_back(Message::Replicate {
                    incarnation: self.incarnation,
                    version,
                    flows: part_flows,
                    states: part_states,
                    ended: std::mem::take(&mut ended),
                });
                at += bytes;
                i = j;
            }
            let last = l.next - 1;
            if last > first {
                for h in l.held.iter_mut().rev() {
                    if h.version != first {
                        break;
                    }
                    h.version = last;
                }
            }
        }
        // The flows moved off a lost replica went whole in this flush (they were dirty):
        // their new replicas hold them once these versions are acknowledged.
        if let Some(r) = self.reprotect.as_mut().filter(|r| r.sent.is_none()) {
            if self.orphans.is_empty() && self.links.iter().any(|l| l.live) {
                let sent: Vec<(u16, u64)> = self
                    .links
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.live && l.next - 1 > l.acked)
                    .map(|(i, l)| (i as u16, l.next - 1))
                    .collect();
                if sent.is_empty() {
                    // Nothing left to copy (the moved flows ended meanwhile).
                    let window = now_ns.saturating_sub(r.since_ns);
                    self.counters.last_unprotected_ns = window;
                    self.counters.max_unprotected_ns = self.counters.max_unprotected_ns.max(window);
                    self.reprotect = None;
                } else {
                    r.sent = Some(sent);
                }
            }
        }
    }

    /// Hands the messages made to `send`, oldest first per replica, until the transport
    /// has no room for one (`Sent::Full`: it and those after it wait for the next call,
    /// the link congested meanwhile). A message the transport refuses outright is a lost
    /// version: acknowledging a later one must not let go of packets whose state it
    /// carried, so that replica is started over (its flows go whole, their packets wait
    /// for that). A replica no longer used was only being told to forget: its message is
    /// dropped.
    ///
    /// Why waiting, not starting over, when the queue is full: starting over re-sends
    /// every flow whole, which fills the queue again; one full queue then kept a replica
    /// at the first batch of its flows for as long as the traffic lasted.
    pub fn transmit(&mut self, now_ns: u64, send: &mut dyn FnMut(EndpointAddr, &Message) -> Sent) {
        let mut drained = false;
        let mut refused: Vec<EndpointAddr> = Vec::new();
        for l in self.links.iter_mut() {
            let had = l.congested();
            while let Some(m) = l.unsent.front() {
                match send(l.addr, m) {
                    Sent::Taken => {
                        l.unsent.pop_front();
                    }
                    Sent::Full => {
                        self.counters.congested += 1;
                        break;
                    }
                    Sent::Refused => {
                        l.unsent.clear();
                        if l.live {
                            refused.push(l.addr);
                        }
                    }
                }
            }
            drained |= had && !l.congested();
        }
        if drained {
            // Their replica may have drained (or another took them): written next flush.
            let mut deferred = std::mem::take(&mut self.deferred);
            self.dirty.append(&mut deferred);
            self.deferred = deferred;
        }
        for addr in refused {
            self.replica_lost(addr, true, now_ns);
        }
    }

    /// Replica `from` answered: versions up to `version` are applied, but `refused` flows
    /// (its table is full: they go unprotected) and `missing` ones (it lacks them: they
    /// go whole at the next flush, and output waiting for them waits for that).
    pub fn on_replicated(
        &mut self,
        from: EndpointAddr,
        incarnation: u64,
        version: u64,
        refused: &[u64],
        missing: &[u64],
        now_ns: u64,
    ) {
        if incarnation != self.incarnation {
            return;
        }
        let Some(i) = self.links.iter().position(|l| l.addr == from && l.live) else {
            return;
        };
        let l = &mut self.links[i];
        if version >= l.next || version <= l.acked {
            return;
        }
        l.acked = version;
        if let Some(r) = self.reprotect.as_mut() {
            if let Some(sent) = r.sent.as_mut() {
                sent.retain(|&(link, v)| !(link == i as u16 && v <= version));
                if sent.is_empty() {
                    let window = now_ns.saturating_sub(r.since_ns);
                    self.counters.last_unprotected_ns = window;
                    self.counters.max_unprotected_ns = self.counters.max_unprotected_ns.max(window);
                    self.reprotect = None;
                }
            }
        }
        let l = &mut self.links[i];
        while let Some(&(v, sent)) = l.unacked.front() {
            if v > version {
                break;
            }
            let lag = now_ns.saturating_sub(sent);
            self.counters.last_lag_ns = lag;
            self.counters.max_lag_ns = self.counters.max_lag_ns.max(lag);
            l.unacked.pop_front();
        }
        if refused.is_empty() && missing.is_empty() {
            return;
        }
        // Refusals are rare (a full or restarted replica): one scan, with the ids in sets
        // (a full replica may refuse thousands at once).
        let refused: std::collections::HashSet<u64> = refused.iter().copied().collect();
        let missing: std::collections::HashSet<u64> = missing.iter().copied().collect();
        for s in 0..self.tracked.len() {
            let t = &mut self.tracked[s];
            if t.id == 0 || t.link != i as u16 {
                continue;
            }
            if refused.contains(&t.id) {
                t.refused = true;
                t.synced = false;
                self.counters.refused += 1;
            } else if missing.contains(&t.id) {
                t.synced = false;
                self.counters.missing += 1;
                if !t.dirty {
                    t.dirty = true;
                    self.dirty.push(s as u32);
                }
            }
        }
        // Output held for a version this answer covers, of a flow the replica lacks,
        // waits for the whole copy (the next version).
        let l = &mut self.links[i];
        let next = l.next;
        for h in l.held.iter_mut() {
            if h.version <= version && missing.contains(&h.id) {
                h.version = next;
            }
        }
        // Keep the queue's versions in order: a packet behind a moved one waits as long.
        let mut max = 0;
        for h in l.held.iter_mut() {
            max = max.max(h.version);
            h.version = max;
        }
        // A refused flow's packets keep their place (and leave when their version is
        // answered): letting them go at once could overtake the flow's earlier ones.
    }

    /// Replica `addr` is gone (dead, or restarted and empty): its flows go to other
    /// replicas (or itself again, if it lives on) whole, and the output waiting for it
    /// waits for them.
    pub fn replica_lost(&mut self, addr: EndpointAddr, still_live: bool, now_ns: u64) {
        if let Some(i) = self.links.iter().position(|l| l.addr == addr) {
            if !self.links[i].live && !still_live {
                return; // known already
            }
            self.lose_link(i, now_ns);
            if still_live {
                let l = &mut self.links[i];
                l.live = true;
            }
        }
        self.adopt_orphans(now_ns);
    }

    fn lose_link(&mut self, i: usize, now_ns: u64) {
        let had_flows = self.tracked.iter().any(|t| t.id != 0 && t.link == i as u16);
        if had_flows {
            // A loss while an earlier one is being made good counts from the earlier.
            match &mut self.reprotect {
                Some(r) => r.sent = None,
                None => {
                    self.reprotect = Some(Reprotect {
                        since_ns: now_ns,
                        sent: None,
                    })
                }
            }
        }
        let incarnation_next = self.links[i].next;
        {
            let l = &mut self.links[i];
            l.live = false;
            l.flows.clear();
            l.states.clear();
            l.ended.clear();
            l.unacked.clear();
            // Not sent yet, and superseded by the whole copies (a replica sees the gap in
            // versions and applies what comes as is).
            l.unsent.clear();
            // Versions go on from where they were: an answer to an old one is ignored.
            l.acked = incarnation_next - 1;
        }
        let moving: VecDeque<Held<P>> = std::mem::take(&mut self.links[i].held);
        let forget = &mut self.links[i].ended;
        for t in self.tracked.iter_mut() {
            if t.id != 0 && t.link == i as u16 {
                // The replica may be alive (dropped from the list, or one message lost):
                // it is told to forget its copy, which a later `Recover` would otherwise
                // promote next to the flow's new replica's, older.
                forget.push(t.id);
                t.link = NO_LINK;
                t.synced = false;
                // Another replica may have room.
                t.refused = false;
                self.counters.moved += 1;
                if !t.dirty {
                    t.dirty = true;
                }
            }
        }
        // Every moved flow is written whole at the next flush (the deferred too: they
        // are dirty).
        self.deferred.clear();
        self.dirty = (0..self.tracked.len() as u32)
            .filter(|&s| self.tracked[s as usize].dirty)
            .collect();
        for h in moving {
            self.requeue(h);
        }
    }

    /// Puts a held packet behind its flow's (new) replica's next version, or with the
    /// orphans.
    fn requeue(&mut self, mut h: Held<P>) {
        let t = self.tracked.get(h.row as usize).copied();
        let link = match t {
            Some(t) if t.id == h.id && t.link != NO_LINK && self.links[t.link as usize].live => {
                Some(t.link)
            }
            Some(t) if t.id == h.id => {
                let l = self.live_link();
                if let Some(l) = l {
                    let t = &mut self.tracked[h.row as usize];
                    t.link = l;
                    t.synced = false;
                }
                l
            }
            _ => None,
        };
        match link {
            Some(l) => {
                let l = &mut self.links[l as usize];
                h.version = l.next;
                l.held.push_back(h);
            }
            None => self.orphans.push_back(h),
        }
    }

    /// With a live replica, the orphans' flows get one and their output waits for it.
    fn adopt_orphans(&mut self, _now_ns: u64) {
        if self.orphans.is_empty() || !self.links.iter().any(|l| l.live) {
            return;
        }
        let orphans = std::mem::take(&mut self.orphans);
        for h in orphans {
            let row = h.row;
            let mark = self
                .tracked
                .get(row as usize)
                .is_some_and(|t| t.id == h.id && !t.dirty);
            self.requeue(h);
            if mark {
                self.tracked[row as usize].dirty = true;
                self.dirty.push(row);
            }
        }
    }

    /// Whether `addr` is one of the replicas in use and believed alive.
    pub fn is_live(&self, addr: EndpointAddr) -> bool {
        self.links.iter().any(|l| l.addr == addr && l.live)
    }

    /// The packets held, replica by replica, oldest first, with whether their state has
    /// been sent (false: processed, not yet replicated).
    pub fn held(&self) -> impl Iterator<Item = (&P, bool)> {
        self.links
            .iter()
            .flat_map(|l| l.held.iter().map(move |h| (&h.pkt, h.version < l.next)))
            .chain(self.orphans.iter().map(|h| (&h.pkt, false)))
    }

    /// Whether any packet is held.
    pub fn busy(&self) -> bool {
        !self.orphans.is_empty() || self.links.iter().any(|l| !l.held.is_empty())
    }

    /// The earliest deadline of a held packet (ns), for the loop's sleep.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let links = self.links.iter().filter_map(|l| l.held.front());
        links
            .chain(self.orphans.front())
            .map(|h| h.deadline_ns)
            .min()
    }

    /// Moves to `out`, in order, the held packets whose version is acknowledged, and those
    /// past their deadline (counted unprotected).
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<P>) {
        for l in self.links.iter_mut() {
            while let Some(h) = l.held.front() {
                if h.version > l.acked && h.deadline_ns > now_ns {
                    break;
                }
                if h.version > l.acked {
                    self.counters.unprotected += 1;
                }
                if let Some(h) = l.held.pop_front() {
                    out.push(h.pkt);
                }
            }
        }
        while let Some(h) = self.orphans.front() {
            if h.deadline_ns > now_ns {
                break;
            }
            self.counters.unprotected += 1;
            if let Some(h) = self.orphans.pop_front() {
                out.push(h.pkt);
            }
        }
    }

    /// Every held packet, for a runtime that stops.
    pub fn drain(&mut self) -> Vec<P> {
        let mut v: Vec<P> = Vec::new();
        for l in self.links.iter_mut() {
            v.extend(l.held.drain(..).map(|h| h.pkt));
        }
        v.extend(self.orphans.drain(..).map(|h| h.pkt));
        v
    }
}

/// A flow held as a replica: everything needed to run it, no function running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaActor {
    pub key: FlowKey,
    pub vswitch: EndpointAddr,
    /// The runtime that started the flow.
    pub home: EndpointAddr,
    pub aliases: Vec<FlowKey>,
    pub flags: u8,
    pub packets: u32,
    /// Milliseconds of the replica's clock at which the flow was created.
    pub created_ms: u64,
    pub last_ms: u64,
    /// Each function's state, as its primary serialised it (`None`: no state).
    pub states: Vec<Option<Vec<u8>>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    pub messages: u64,
    pub flows_applied: u64,
    /// Flows refused because the table was full, and changes to flows not held (refused
    /// before, or of a malformed message).
    pub refused: u64,
    pub unknown: u64,
    pub malformed: u64,
    pub promoted: u64,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Every copy held of one life (incarnation) of one primary: by the primary's flow id, and
/// every key (own and alias) to its flow's id. The key index is kept as copies change (a
/// new flow, changed aliases, an end: a few per connection), so that a takeover hands the
/// whole life to the engine as it is, with nothing to sort, copy or index.
#[derive(Clone, Debug, Default)]
pub struct Copies {
    pub incarnation: u64,
    pub flows: FastMap<u64, ReplicaActor>,
    /// Every key (own and alias) to its flow's id and the vswitch that feeds the flow: a
    /// takeover groups the keys to re-point by vswitch from this table alone.
    pub keys: FastMap<FlowKey, (u64, EndpointAddr)>,
}

impl Copies {
    fn new(incarnation: u64) -> Copies {
        Copies {
            incarnation,
            ..Copies::default()
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Takes the copy of flow `id` out, with its keys.
    pub fn take(&mut self, id: u64) -> Option<ReplicaActor> {
        let a = self.flows.remove(&id)?;
        self.unindex(id, &a.key);
        for al in &a.aliases {
            self.unindex(id, al);
        }
        Some(a)
    }

    /// Takes the copy that `key` (its own or an alias) names.
    pub fn take_by_key(&mut self, key: &FlowKey) -> Option<ReplicaActor> {
        let (id, _) = *self.keys.get(key)?;
        self.take(id)
    }

    /// Removes `key` from the index if it names flow `id` (a hostile or confused primary
    /// may give two flows one key: the later one holds it, and the earlier one's end must
    /// not take it away).
    fn unindex(&mut self, id: u64, key: &FlowKey) {
        if self.keys.get(key).is_some_and(|e| e.0 == id) {
            self.keys.remove(key);
        }
    }

    /// Puts copy `a` in under `id`, unless `id` or its key is held already (then `a` is
    /// given back).
    pub fn put(&mut self, id: u64, a: ReplicaActor) -> Result<(), ReplicaActor> {
        if self.flows.contains_key(&id) || self.keys.contains_key(&a.key) {
            return Err(a);
        }
        self.keys.insert(a.key, (id, a.vswitch));
        for al in &a.aliases {
            self.keys.entry(*al).or_insert((id, a.vswitch));
        }
        self.flows.insert(id, a);
        Ok(())
    }

    /// Moves every copy of `other` in; a key both hold stays with `self`'s flow.
    fn absorb(&mut self, other: Copies) {
        for (id, a) in other.flows {
            let _ = self.put(id, a);
        }
    }
}

/// Per primary (address): its newest incarnation, the next version expected of it, and
/// the copies of each of its lives still held.
#[derive(Clone, Debug)]
struct Primary {
    incarnation: u64,
    next_version: u64,
    lives: BTreeMap<u64, Copies>,
}

/// The replica's side.
#[derive(Clone)]
pub struct ReplicaStore {
    max_flows: usize,
    nfs: usize,
    /// Copies held over every primary and life.
    held: usize,
    primaries: BTreeMap<EndpointAddr, Primary>,
    pub counters: ReplicaCounters,
}

impl ReplicaStore {
    pub fn new(max_flows: usize, nfs: usize) -> ReplicaStore {
        ReplicaStore {
            max_flows,
            nfs,
            held: 0,
            primaries: BTreeMap::new(),
            counters: ReplicaCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The copy of flow `id` of `primary`'s incarnation `incarnation`.
    pub fn get(&self, primary: EndpointAddr, incarnation: u64, id: u64) -> Option<&ReplicaActor> {
        self.primaries
            .get(&primary)?
            .lives
            .get(&incarnation)?
            .flows
            .get(&id)
    }

    /// Flows held for `primary` (every incarnation).
    pub fn flows_of(&self, primary: EndpointAddr) -> usize {
        self.primaries
            .get(&primary)
            .map_or(0, |p| p.lives.values().map(Copies::len).sum())
    }

    /// Applies a `Replicate` from `from` at `now_ms`; returns the answer, or `None` for a
    /// message of an incarnation older than one already seen (an old life's last words).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        from: EndpointAddr,
        incarnation: u64,
        version: u64,
        flows: &[ReplicaFlow],
        states_buf: &[u8],
        ended: &[u64],
        now_ms: u64,
    ) -> Option<Message> {
        let p = self.primaries.entry(from).or_insert(Primary {
            incarnation,
            next_version: 1,
            lives: BTreeMap::new(),
        });
        // An old life's messages never arrive after a new life's: the transport drops the
        // frames of an older session. So any other incarnation is a new life (nfmgr's
        // restart starts slot generations again from 1: a new life may be numbered lower).
        // The old life's copies stay, for `Recover`, until promoted or forgotten.
        if incarnation != p.incarnation {
            p.incarnation = incarnation;
            p.next_version = 1;
        }
        // The transport delivers in order and once; a gap means the primary lost this
        // replica in between and re-sends what it needs whole, so it is applied as is.
        p.next_version = version.saturating_add(1);
        self.counters.messages += 1;
        let life = p
            .lives
            .entry(incarnation)
            .or_insert_with(|| Copies::new(incarnation));
        let before = life.len();
        for id in ended {
            life.take(*id);
        }
        let mut refused = Vec::new();
        let mut missing = Vec::new();
        let mut at = 0usize;
        for (n, f) in flows.iter().enumerate() {
            let len = f.states_len as usize;
            let Some(part) = at.checked_add(len).and_then(|end| states_buf.get(at..end)) else {
                // Neither this flow nor any after it can be read: none is applied, and the
                // primary is told so (it sends them whole again) rather than acknowledged.
                self.counters.malformed += 1;
                missing.extend(flows[n..].iter().map(|g| g.id));
                break;
            };
            at += len;
            if let Some(n) = &f.new {
                let held_now = self.held + life.len() - before;
                if !life.flows.contains_key(&f.id) && held_now >= self.max_flows {
                    self.counters.refused += 1;
                    refused.push(f.id);
                    continue;
                }
                // Created again whole (the primary lost this replica in between): the old
                // copy's keys go with it.
                life.take(f.id);
                life.keys.insert(n.key, (f.id, n.vswitch));
                life.flows.insert(
                    f.id,
                    ReplicaActor {
                        key: n.key,
                        vswitch: n.vswitch,
                        home: n.home,
                        aliases: Vec::new(),
                        flags: f.flags,
                        packets: f.packets,
                        created_ms: now_ms.saturating_sub(u64::from(n.age_ms)),
                        last_ms: now_ms,
                        states: vec![None; self.nfs],
                    },
                );
            }
            let Some(a) = life.flows.get_mut(&f.id) else {
                self.counters.unknown += 1;
                missing.push(f.id);
                continue;
            };
            if apply_states(a, f.changed, part, self.nfs).is_err() {
                // The flow's copy can no longer be trusted: drop it and have the primary
                // send it whole again rather than promote garbage.
                life.take(f.id);
                self.counters.malformed += 1;
                missing.push(f.id);
                continue;
            }
            a.flags = f.flags;
            a.packets = f.packets;
            a.last_ms = now_ms;
            if let Some(al) = &f.aliases {
                let vswitch = a.vswitch;
                let old = std::mem::replace(&mut a.aliases, al.clone());
                for k in &old {
                    life.unindex(f.id, k);
                }
                for k in al {
                    life.keys.insert(*k, (f.id, vswitch));
                }
            }
            self.counters.flows_applied += 1;
        }
        self.held = self.held + life.len() - before;
        Some(Message::Replicated {
            incarnation,
            version,
            refused,
            missing,
        })
    }

    /// Takes every flow held for `failed` in incarnations up to `incarnation` (the life
    /// that died; `u64::MAX` for all), as one set of copies: the engine makes them live
    /// flows here. A takeover moves the life's tables whole, whatever their size; only
    /// when older lives are still held too (rare) are their copies moved in one by one.
    pub fn promote(&mut self, failed: EndpointAddr, incarnation: u64) -> Copies {
        let Some(p) = self.primaries.get_mut(&failed) else {
            return Copies::new(incarnation);
        };
        let newer = p.lives.split_off(&incarnation.saturating_add(1));
        let mut taken = std::mem::replace(&mut p.lives, newer);
        if incarnation == u64::MAX {
            // `split_off(MAX)` leaves a life numbered MAX behind.
            taken.append(&mut p.lives);
        }
        let mut lives = taken.into_values().rev();
        let mut out = lives.next().unwrap_or_else(|| Copies::new(incarnation));
        for older in lives {
            out.absorb(older);
        }
        let n: usize = out.len();
        self.held = self.held.saturating_sub(n);
        if p.lives.is_empty() {
            self.primaries.remove(&failed);
        }
        self.counters.promoted += n as u64;
        out
    }

    /// Forgets every flow of `primary` below incarnation `below` (it stopped cleanly, or
    /// its old life's flows were recovered elsewhere).
    pub fn forget(&mut self, primary: EndpointAddr, below: u64) -> usize {
        let Some(p) = self.primaries.get_mut(&primary) else {
            return 0;
        };
        let keep = p.lives.split_off(&below);
        let gone: usize = std::mem::replace(&mut p.lives, keep)
            .values()
            .map(Copies::len)
            .sum();
        self.held -= gone;
        gone
    }
}

/// Overwrites the functions named in `changed` with their parts of `part`.
fn apply_states(
    a: &mut ReplicaActor,
    changed: u8,
    part: &[u8],
    nfs: usize,
) -> Result<(), states::Malformed> {
    if (8 - changed.leading_zeros()) as usize > nfs {
        return Err(states::Malformed);
    }
    let mut r = states::Reader::new(part);
    for i in 0..nfs {
        if changed & (1 << i) == 0 {
            continue;
        }
        // A monitor's state changes with every packet: its bytes are overwritten in
        // place, not freed and allocated again each time.
        match (r.next_state()?, &mut a.states[i]) {
            (Some(bytes), Some(held)) => {
                held.clear();
                held.extend_from_slice(bytes);
            }
            (bytes, held) => *held = bytes.map(<[u8]>::to_vec),
        }
    }
    if !r.is_done() {
        return Err(states::Malformed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: EndpointAddr = EndpointAddr { server: 2, slot: 3 };
    const PRIMARY: EndpointAddr = EndpointAddr { server: 1, slot: 2 };

    fn key(n: u8) -> FlowKey {
        FlowKey::from_tuple(
            4,
            17,
            0,
            (FlowKey::v4([10, 0, 0, n]), 1000),
            (FlowKey::v4([10, 9, 9, 9]), 53),
        )
        .0
    }

    fn meta(n: u8) -> FlowMeta {
        FlowMeta {
            key: key(n),
            vswitch: EndpointAddr::new(1, 1),
            home: EndpointAddr::new(1, 2),
            flags: 0,
            packets: 1,
            age_ms: 0,
        }
    }

    fn settings(mode: Mode) -> Settings {
        Settings {
            mode,
            without_replica: WithoutReplica::Wait,
            ..Settings::default()
        }
    }

    /// Writes every dirty flow with states `st[i]` and flushes.
    fn flush(
        r: &mut Replicator<u32>,
        now_ms: u64,
        st: &[Option<&[u8]>],
    ) -> Vec<(EndpointAddr, Message)> {
        let dirty = r.take_dirty();
        for &s in &dirty {
            r.write_flow(
                s,
                now_ms,
                &meta(s as u8),
                &Vec::new,
                &mut |i, out| match st[i] {
                    Some(b) => {
                        out.extend_from_slice(b);
                        true
                    }
                    None => false,
                },
            );
        }
        r.return_dirty(dirty);
        let mut out = Vec::new();
        r.flush(now_ms * 1_000_000);
        r.transmit(now_ms * 1_000_000, &mut |to, m| {
            out.push((to, m.clone()));
            Sent::Taken
        });
        out
    }

    fn apply(store: &mut ReplicaStore, m: &Message) -> Message {
        let Message::Replicate {
            incarnation,
            version,
            flows,
            states,
            ended,
        } = m
        else {
            panic!("not a Replicate: {m:?}");
        };
        store
            .apply(PRIMARY, *incarnation, *version, flows, states, ended, 0)
            .expect("an answer")
    }

    fn answer(r: &mut Replicator<u32>, m: &Message) {
        let Message::Replicated {
            incarnation,
            version,
            refused,
            missing,
        } = m
        else {
            panic!("not an answer: {m:?}");
        };
        r.on_replicated(R, *incarnation, *version, refused, missing, 0);
    }

    #[test]
    fn only_changed_states_cross_and_output_waits_for_the_answer() {
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 2);
        r.set_replicas(&[R], 0);
        let mut store = ReplicaStore::new(10, 2);
        assert!(r.touched(0, 1, 0));
        assert_eq!(r.hold(0, 1, 100, 0), None);
        let msgs = flush(&mut r, 0, &[Some(b"a"), Some(b"x")]);
        assert_eq!(msgs.len(), 1);
        let mut out = Vec::new();
        r.release(1, &mut out);
        assert!(out.is_empty(), "nothing leaves before the answer");
        let ans = apply(&mut store, &msgs[0].1);
        answer(&mut r, &ans);
        r.release(1, &mut out);
        assert_eq!(out, vec![100]);
        // Second packet: only the first function changed.
        assert!(r.touched(0, 1, 1));
        assert_eq!(r.hold(0, 1, 101, 0), None);
        let msgs = flush(&mut r, 1, &[Some(b"b"), Some(b"x")]);
        let Message::Replicate { flows, states, .. } = &msgs[0].1 else {
            panic!()
        };
        assert_eq!(flows[0].changed, 0b01);
        assert!(flows[0].new.is_none());
        assert_eq!(states, &vec![2, b'b']);
        answer(&mut r, &apply(&mut store, &msgs[0].1));
        let a = store.get(PRIMARY, 1, 1).unwrap();
        assert_eq!(a.states, vec![Some(b"b".to_vec()), Some(b"x".to_vec())]);
        // A packet that changed nothing needs no new version.
        assert!(r.touched(0, 1, 2));
        assert_eq!(r.hold(0, 1, 102, 0), None);
        assert!(flush(&mut r, 2, &[Some(b"b"), Some(b"x")]).is_empty());
        out.clear();
        r.release(1, &mut out);
        assert_eq!(out, vec![101, 102]);
        assert_eq!(r.counters.states_unchanged, 3);
    }

    #[test]
    fn a_packet_whose_flow_just_got_a_replica_waits_for_its_whole_copy() {
        // Written before any replica existed (the runtime started before SetReplica), then
        // a packet of the flow comes back from the alias commit once a replica exists.
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.touched(0, 1, 0);
        assert!(flush(&mut r, 0, &[Some(b"a")]).is_empty());
        r.set_replicas(&[R], 0);
        assert_eq!(r.hold(0, 1, 7, 0), None);
        let msgs = flush(&mut r, 1, &[Some(b"a")]);
        assert_eq!(msgs.len(), 1, "the flow goes to its new replica");
        let mut out = Vec::new();
        r.release(1, &mut out);
        assert!(out.is_empty(), "not before the answer");
        let mut store = ReplicaStore::new(4, 1);
        answer(&mut r, &apply(&mut store, &msgs[0].1));
        r.release(1, &mut out);
        assert_eq!(out, vec![7]);
        assert!(store.get(PRIMARY, 1, 1).is_some());
    }

    #[test]
    fn an_ended_flows_late_packet_waits_behind_its_earlier_ones() {
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.set_replicas(&[R], 0);
        assert!(r.touched(0, 1, 0));
        assert_eq!(r.hold(0, 1, 10, 0), None);
        let msgs = flush(&mut r, 0, &[Some(b"a")]);
        // The flow ends before the answer; a packet of it the alias commit held comes now.
        r.ended(0, 1);
        assert_eq!(
            r.hold(0, 1, 11, 0),
            None,
            "behind packet 10, not out before it"
        );
        // A packet of a flow with nothing held leaves at once.
        assert_eq!(r.hold(5, 9, 99, 0), Some(99));
        let mut out = Vec::new();
        r.release(1, &mut out);
        assert!(out.is_empty());
        let mut store = ReplicaStore::new(4, 1);
        answer(&mut r, &apply(&mut store, &msgs[0].1));
        r.release(1, &mut out);
        assert_eq!(out, vec![10, 11]);
    }

    #[test]
    fn a_large_batch_goes_in_bounded_messages_and_output_waits_for_the_last() {
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.set_replicas(&[R], 0);
        let big = vec![7u8; 300 * 1024];
        for s in 0..8u32 {
            r.touched(s, u64::from(s) + 1, 0);
            assert_eq!(r.hold(s, u64::from(s) + 1, s, 0), None);
        }
        let msgs = flush(&mut r, 0, &[Some(&big)]);
        assert!(msgs.len() >= 3, "{} messages", msgs.len());
        let mut store = ReplicaStore::new(16, 1);
        let mut out = Vec::new();
        for (i, (_, m)) in msgs.iter().enumerate() {
            let Message::Replicate { states, .. } = m else {
                panic!()
            };
            assert!(states.len() <= MAX_BATCH_BYTES);
            answer(&mut r, &apply(&mut store, m));
            r.release(1, &mut out);
            if i + 1 < msgs.len() {
                assert!(
                    out.is_empty(),
                    "released after message {i} of {}",
                    msgs.len()
                );
            }
        }
        assert_eq!(out, (0..8).collect::<Vec<u32>>());
        assert_eq!(store.len(), 8);
    }

    #[test]
    fn a_full_replica_refuses_and_the_flow_goes_unprotected_in_order() {
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.set_replicas(&[R], 0);
        let mut store = ReplicaStore::new(1, 1);
        for s in 0..2 {
            r.touched(s, u64::from(s) + 1, 0);
            assert_eq!(r.hold(s, u64::from(s) + 1, s, 0), None);
        }
        let msgs = flush(&mut r, 0, &[Some(b"a")]);
        let ans = apply(&mut store, &msgs[0].1);
        assert!(matches!(&ans, Message::Replicated { refused, .. } if refused == &vec![2]));
        assert_eq!(store.counters.refused, 1);
        answer(&mut r, &ans);
        let mut out = Vec::new();
        r.release(0, &mut out);
        assert_eq!(out, vec![0, 1]);
        assert_eq!(r.counters.refused, 1);
        // The refused flow is not written again.
        r.touched(1, 2, 1);
        assert_eq!(r.hold(1, 2, 7, 0), None);
        assert!(flush(&mut r, 1, &[Some(b"b")]).is_empty());
        r.release(0, &mut out);
        assert_eq!(out, vec![0, 1, 7]);
    }

    #[test]
    fn without_a_replica_output_waits_a_bounded_time_or_leaves_at_once() {
        let mut r = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.touched(0, 1, 0);
        assert_eq!(r.hold(0, 1, 5, 0), None);
        let mut out = Vec::new();
        r.release(49_000_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.next_deadline_ns(), Some(50_000_000));
        r.release(50_000_000, &mut out);
        assert_eq!(out, vec![5]);
        assert_eq!(r.counters.unprotected, 1);
        // A replica appearing adopts what waits.
        r.touched(0, 1, 0);
        assert_eq!(r.hold(0, 1, 6, 60_000_000), None);
        r.set_replicas(&[R], 60_000_000);
        let msgs = flush(&mut r, 60, &[Some(b"a")]);
        assert_eq!(msgs.len(), 1);
        let mut store = ReplicaStore::new(4, 1);
        answer(&mut r, &apply(&mut store, &msgs[0].1));
        out.clear();
        r.release(60_000_001, &mut out);
        assert_eq!(out, vec![6]);
        assert_eq!(r.counters.unprotected, 1);

        let mut u = Replicator::new(
            Settings {
                mode: Mode::OutputCommit,
                without_replica: WithoutReplica::Unprotected,
                ..Settings::default()
            },
            1,
            1,
        );
        u.touched(0, 1, 0);
        assert_eq!(u.hold(0, 1, 9, 0), Some(9));
        assert_eq!(u.counters.unprotected, 1);
    }

    #[test]
    fn periodic_copies_every_k_packets_or_after_the_interval_and_holds_nothing() {
        let mut r: Replicator<u32> = Replicator::new(
            settings(Mode::Periodic {
                packets: 3,
                interval_ms: 100,
            }),
            1,
            1,
        );
        r.set_replicas(&[R], 0);
        // The first packet: the replica gets the flow at once.
        assert!(!r.touched(0, 1, 0));
        assert_eq!(flush(&mut r, 0, &[Some(b"1")]).len(), 1);
        assert!(!r.touched(0, 1, 1));
        assert!(!r.touched(0, 1, 2));
        assert!(flush(&mut r, 2, &[Some(b"3")]).is_empty());
        assert!(!r.touched(0, 1, 3));
        assert_eq!(
            flush(&mut r, 3, &[Some(b"4")]).len(),
            1,
            "third packet since"
        );
        assert!(!r.touched(0, 1, 10));
        r.tick(50);
        assert!(flush(&mut r, 50, &[Some(b"5")]).is_empty());
        r.tick(103);
        assert_eq!(flush(&mut r, 103, &[Some(b"5")]).len(), 1, "interval");
    }

    #[test]
    fn promotion_takes_a_dead_lifes_flows_and_leaves_the_new_ones() {
        let mut store = ReplicaStore::new(10, 1);
        for inc in [1u64, 2] {
            let mut r: Replicator<u32> = Replicator::new(settings(Mode::OutputCommit), inc, 1);
            r.set_replicas(&[R], 0);
            r.touched(0, 1, 0);
            r.touched(1, 2, 0);
            let msgs = flush(&mut r, 0, &[Some(b"s")]);
            apply(&mut store, &msgs[0].1);
        }
        assert_eq!(store.flows_of(PRIMARY), 4);
        let p = store.promote(PRIMARY, 1);
        assert_eq!(p.len(), 2);
        assert_eq!(p.incarnation, 1);
        assert!(p
            .flows
            .values()
            .all(|a| a.states[0].as_deref() == Some(&b"s"[..])));
        assert_eq!(p.keys.len(), 2);
        assert_eq!(store.flows_of(PRIMARY), 2);
        // A lower incarnation after a higher one is a new life (nfmgr restarted and slot
        // generations began again; an old life's frames cannot arrive this late, the
        // transport drops an older session's): answered, and kept apart by incarnation.
        let mut old: Replicator<u32> = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        old.set_replicas(&[R], 0);
        old.touched(5, 6, 0);
        let msgs = flush(&mut old, 0, &[Some(b"s")]);
        let Message::Replicate {
            incarnation,
            version,
            flows,
            states,
            ended,
        } = &msgs[0].1
        else {
            panic!()
        };
        assert!(store
            .apply(PRIMARY, *incarnation, *version, flows, states, ended, 0)
            .is_some());
        assert!(store.get(PRIMARY, 1, 6).is_some());
        assert_eq!(store.forget(PRIMARY, 3), 3);
        assert!(store.is_empty());
    }

    #[test]
    fn the_key_index_follows_new_flows_aliases_and_ends_and_promotion_moves_it_whole() {
        let mut store = ReplicaStore::new(10, 1);
        let new = |id: u64, k: u8, aliases: Option<Vec<FlowKey>>| ReplicaFlow {
            id,
            new: Some(ReplicaNew {
                key: key(k),
                vswitch: EndpointAddr::new(1, 1),
                age_ms: 0,
                home: EndpointAddr::new(1, 2),
            }),
            aliases,
            flags: 0,
            packets: 1,
            changed: 0,
            states_len: 0,
        };
        let f1 = new(1, 1, Some(vec![key(101)]));
        let f2 = new(2, 2, None);
        store.apply(PRIMARY, 1, 1, &[f1, f2], &[], &[], 0).unwrap();
        // Flow 1's alias changes; flow 2 ends; flow 3 comes with the same key as flow 1 (a
        // confused primary): the later holds the key, and flow 1's end must not take it.
        let mut f1 = new(1, 1, Some(vec![key(102)]));
        f1.new = None;
        let f3 = new(3, 1, None);
        store.apply(PRIMARY, 1, 2, &[f1, f3], &[], &[2], 0).unwrap();
        assert_eq!(store.len(), 2);
        store.apply(PRIMARY, 1, 3, &[], &[], &[1], 0).unwrap();
        assert_eq!(store.len(), 1);
        let mut c = store.promote(PRIMARY, 1);
        assert!(store.is_empty());
        assert_eq!(c.len(), 1);
        assert!(!c.keys.contains_key(&key(101)) && !c.keys.contains_key(&key(102)));
        assert!(!c.keys.contains_key(&key(2)));
        let a = c.take_by_key(&key(1)).expect("flow 3 holds the key");
        assert_eq!(a.key, key(1));
        assert!(c.is_empty() && c.keys.is_empty());
    }

    #[test]
    fn a_replica_no_longer_used_is_told_to_forget_its_copies() {
        const B: EndpointAddr = EndpointAddr { server: 3, slot: 1 };
        let mut r: Replicator<u32> = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.set_replicas(&[R, B], 0);
        for s in 0..4u32 {
            r.touched(s, u64::from(s) + 1, 0);
        }
        let mut stores = [ReplicaStore::new(10, 1), ReplicaStore::new(10, 1)];
        for (to, m) in flush(&mut r, 0, &[Some(b"s")]) {
            apply(&mut stores[usize::from(to == B)], &m);
        }
        let on_r = stores[0].len();
        assert!(on_r > 0 && !stores[1].is_empty(), "round-robin over both");
        // R is dropped from the list while alive: its flows go whole to B, and R is told
        // to forget them, once.
        r.set_replicas(&[B], 0);
        let msgs = flush(&mut r, 0, &[Some(b"s")]);
        let to_r: Vec<&Message> = msgs
            .iter()
            .filter(|(to, _)| *to == R)
            .map(|(_, m)| m)
            .collect();
        assert_eq!(to_r.len(), 1);
        assert!(matches!(to_r[0], Message::Replicate { flows, ended, .. }
            if flows.is_empty() && ended.len() == on_r));
        for (to, m) in &msgs {
            apply(&mut stores[usize::from(*to == B)], m);
        }
        assert!(stores[0].is_empty(), "the dropped replica holds nothing");
        assert_eq!(stores[1].len(), 4);
        assert!(flush(&mut r, 0, &[Some(b"s")])
            .iter()
            .all(|(to, _)| *to != R));
    }

    #[test]
    fn a_lost_replicas_flows_are_unprotected_until_their_new_replica_acknowledges_them() {
        const B: EndpointAddr = EndpointAddr { server: 3, slot: 1 };
        let mut r: Replicator<u32> = Replicator::new(settings(Mode::OutputCommit), 1, 1);
        r.set_replicas(&[R, B], 0);
        for s in 0..4u32 {
            r.touched(s, u64::from(s) + 1, 0);
        }
        let msgs = flush(&mut r, 0, &[Some(b"s")]);
        for (to, m) in &msgs {
            let Message::Replicate { version, .. } = m else {
                panic!()
            };
            r.on_replicated(*to, 1, *version, &[], &[], 1_000);
        }
        // R dies at 10 ms; its flows go whole to B at the next flush (11 ms) and B answers
        // at 13 ms.
        r.replica_lost(R, false, 10_000_000);
        let msgs = flush(&mut r, 11, &[Some(b"s")]);
        assert_eq!(r.counters.last_unprotected_ns, 0, "not protected yet");
        let (to, m) = msgs.iter().find(|(to, _)| *to == B).expect("to B");
        let Message::Replicate { version, flows, .. } = m else {
            panic!()
        };
        assert!(flows.iter().all(|f| f.new.is_some()), "whole");
        r.on_replicated(*to, 1, *version, &[], &[], 13_000_000);
        assert_eq!(r.counters.last_unprotected_ns, 3_000_000);
    }

    #[test]
    fn malformed_changes_are_dropped_and_asked_for_whole() {
        let mut store = ReplicaStore::new(10, 1);
        let f = ReplicaFlow {
            id: 1,
            new: Some(ReplicaNew {
                key: key(1),
                vswitch: EndpointAddr::new(1, 1),
                age_ms: 0,
                home: EndpointAddr::new(1, 2),
            }),
            aliases: None,
            flags: 0,
            packets: 1,
            changed: 0b11, // two functions in a chain of one
            states_len: 2,
        };
        let ans = store
            .apply(PRIMARY, 1, 1, std::slice::from_ref(&f), &[1, 9], &[], 0)
            .unwrap();
        assert!(matches!(ans, Message::Replicated { missing, .. } if missing == vec![1]));
        assert!(store.is_empty());
        // A part longer than the buffer stops the message there.
        let f = ReplicaFlow {
            changed: 1,
            states_len: 10,
            ..f
        };
        store.apply(PRIMARY, 1, 2, &[f], &[1, 9], &[], 0).unwrap();
        assert!(store.is_empty());
        assert_eq!(store.counters.malformed, 2);
    }
}
