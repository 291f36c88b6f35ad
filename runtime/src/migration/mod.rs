//! Flow migration (paper 4.2, Fig. 4; decisions in docs/MIGRATION.md): the protocol's state
//! machines, for both roles a runtime plays, free of I/O.
//!
//! The source (MS) moves flows to a target runtime (MT) in three request-response steps:
//! 1. `MigrateInit` to the target's liaison, which creates a pending actor per flow (its
//!    packets will be buffered) and answers `MigrateReady`. The source keeps processing.
//! 2. `SetRuntime` to the vswitch feeding the flows, answered by `RuntimeSet` with, per key,
//!    the packets it gave the source before the switch. The source processes until it has
//!    seen that many (stragglers still on the way), or the straggler timeout passes.
//! 3. `MigrateState` with every function's state; the target installs it, processes its
//!    buffer in order and answers `MigrateDone`. The source keeps a tombstone for a while
//!    that forwards late stragglers to the target, then retires the flow.
//!
//! Flows move in groups (up to `group_size` flows with the same target and vswitch share
//! each message), a bounded number of groups at a time, so a migration of 600,000 flows is a
//! few thousand messages and never starves the packet path.
//!
//! Exactly one runtime owns a flow at any moment: the source until the target says it
//! installed the state, the target after. The source gives up only on positive knowledge:
//! an answer, or the other side declared dead. Then it points the vswitch back at itself
//! and resumes with the state it never released.
//!
//! The runtime engine does the packet work through [`FlowHost`]; the simulation in
//! `migration_sim` (tests) plays the same role with a toy engine, a vswitch and a network.
//! The source's side is in `source.rs`, the target's in `target.rs`; the entry points
//! (a job, a packet, a message, the timers, a dead peer) are here.

use std::collections::{HashMap, VecDeque};

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::msg::{keys_digest, FlowState, Message, MigrateFlow, MigrationReport};

// The two roles, each an `impl Migrator` of its own: what a runtime does as the source of
// a migration, and as its target.
mod source;
mod target;

/// Tunables (`[migration]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationSettings {
    /// Flows per group (one message per step for all of them).
    pub group_size: usize,
    /// Groups in flight at once per source.
    pub max_groups: usize,
    /// How long steps 1 and 2 may take before the source rolls back.
    pub step_timeout_ms: u64,
    /// How long the source waits for packets sent before the switch before it hands over.
    pub straggler_timeout_ms: u64,
    /// How long the source forwards late stragglers after the handover.
    pub tombstone_ms: u64,
    /// A pending target actor whose state never came expires after this long.
    pub pending_timeout_ms: u64,
    /// Packets a target may hold for flows arriving, over all of them.
    pub buffer_packets: usize,
    /// Above this many held packets a target refuses new groups (the source retries).
    pub buffer_high_water: usize,
    /// At most this many flows a second start moving (0: as fast as the pipeline of
    /// `max_groups` goes), for operators who prefer headroom on the packet path to speed.
    pub max_flows_per_s: u64,
    /// How long a migration message keeps its peer and its sender polling (0: not at all).
    pub keep_awake_us: u64,
    /// A source that dies after the switch (step 2) and before its state came (step 3)
    /// gets its flows' keys back at the vswitch, for its replicas' takeover to move (true
    /// where the chain is replicated: the source's replicas still hold those flows' state,
    /// and this runtime has none).
    pub hand_back: bool,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            group_size: 256,
            max_groups: 8,
            step_timeout_ms: 1000,
            straggler_timeout_ms: 20,
            tombstone_ms: 2000,
            pending_timeout_ms: 10_000,
            buffer_packets: 65_536,
            buffer_high_water: 49_152,
            max_flows_per_s: 0,
            keep_awake_us: 5000,
            hand_back: false,
        }
    }
}

/// A flow as the migrator names it to its host: its key, and the row the host said it
/// keeps it in. The row is a hint the host checks against the key (the flow may have ended
/// and its row been reused), so a stale or missing one costs a lookup, never a wrong flow;
/// a right one saves a hash probe, a cache miss at a million flows, per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub key: FlowKey,
    pub row: u32,
}

impl FlowRef {
    /// No row known: the host looks the key up.
    pub const NO_ROW: u32 = u32::MAX;

    pub fn key_only(key: FlowKey) -> FlowRef {
        FlowRef {
            key,
            row: FlowRef::NO_ROW,
        }
    }
}

/// What the migrator marks a diverted flow with, and the host keeps in the flow's actor and
/// hands back with each of its packets (`on_packet`): the group it is moving in, found
/// without a lookup by key, a cache miss per flow at hundreds of thousands of flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mark {
    #[default]
    None,
    /// Moving out in this group (`FlowHost::divert`), an id below [`GROUP_ID_LIMIT`].
    Out(u64),
    /// Arriving in the incoming group this runtime gave this id (`FlowHost::create_pending`),
    /// below [`GROUP_ID_LIMIT`]; 0 for none (a flow the source took back).
    In(u32),
}

/// Group ids, both the source's and a target's own for incoming groups, stay below this
/// (31 bits), so a host can keep either, and which it is, in one 32-bit word per flow.
pub const GROUP_ID_LIMIT: u64 = 1 << 31;

/// A flow the host offers for migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub key: FlowKey,
    /// Where the host keeps it (see [`FlowRef`]).
    pub row: u32,
    pub aliases: Vec<FlowKey>,
    pub vswitch: EndpointAddr,
}

/// What happens to a packet of a flow under migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketAction {
    /// Run the chain on it here, as usual.
    Process,
    /// Keep it in order until the flow's fate is known (target waiting for the state, or
    /// source rolling back).
    Hold,
    /// The flow's state has left (`late`: the packet is a straggler the new owner will
    /// process after its buffer), or its migration was called off at the target and the
    /// vswitch may still send a few packets here: send the packet to its owner.
    Forward {
        to: EndpointAddr,
        group: u64,
        late: bool,
    },
    /// The migration buffer is full: drop it (counted).
    Drop,
}

/// What becomes of held packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Run them through the chain here, now.
    Process,
    /// Send them to the source of `group` (`MigratePackets`), which processes them.
    Return { to: EndpointAddr, group: u64 },
    /// Free them (their flow's other side is gone).
    Discard,
}

/// The engine side of migration: everything that touches flows and packets.
pub trait FlowHost {
    /// Flows to migrate, all fed by one vswitch, not already migrating, continuing a scan of
    /// the flow table. Returns false once the scan has seen every flow.
    fn pick(&mut self, n: usize, out: &mut Vec<Candidate>) -> bool;
    /// Packets the flow's actor has run through the chain here (wrapping), if it exists.
    fn packets(&self, f: &FlowRef) -> Option<u32>;
    /// Sends the flow's packets to the migrator (`on_packet`, with the mark
    /// `Mark::Out(group)`) instead of the chain; `None` stops. Returns false, changing
    /// nothing, for a flow that is gone, or (with a group) that is diverted already.
    fn divert(&mut self, f: &FlowRef, group: Option<u64>) -> bool;
    /// The group the flow was diverted for (`divert`), if it is diverted as moving out.
    fn group_of(&self, f: &FlowRef) -> Option<u64>;
    /// The flow's state for step 3 (the flow stays, diverted, until it is retired): its
    /// functions' states are appended to `states` (laid out as `nflib::msg::states`
    /// describes), and `states_len` says how many bytes they took (`idx` and `missing`
    /// are the migrator's to fill). `None`, with `states` as it was, if the flow is gone.
    fn save(&mut self, f: &FlowRef, states: &mut Vec<u8>) -> Option<FlowState>;
    /// Target, step 1, before `create_pending` for each of `flows`: a chance to start
    /// loading what those calls will touch.
    fn prepare_pending(&mut self, _flows: &[MigrateFlow]) {}
    /// Target, step 1: a pending actor under the key and aliases (diverted, marked
    /// `Mark::In(arriving)`), and the row it is kept in; `None` if the key or an alias
    /// exists or the table is full.
    fn create_pending(
        &mut self,
        flow: &MigrateFlow,
        vswitch: EndpointAddr,
        arriving: u32,
    ) -> Option<u32>;
    /// Target, step 3: installs the state (and the functions' states, `states`) in the
    /// pending actor `f` and stops diverting it.
    fn install(&mut self, f: &FlowRef, state: &FlowState, states: &[u8]) -> bool;
    /// Lets go of the packets held for the flow, in order. Returns how many (the migrator
    /// counts what it holds by these).
    fn release_held(&mut self, f: &FlowRef, how: Release) -> u32;
    /// Removes a pending actor that never got its state (nothing is ended).
    fn remove_pending(&mut self, f: &FlowRef);
    /// Source: the flow lives elsewhere now; remove it without ending it.
    fn retire(&mut self, f: &FlowRef);
    /// Ends (as expiry would) a flow that is not migrating and owns `key` as its key or an
    /// alias; false if there is none.
    fn end_stray(&mut self, key: &FlowKey) -> bool;
    /// Sends a migration message from this runtime's liaison to `to`'s (and keeps `to`, and
    /// this runtime, polling for the next few milliseconds: the answer is on its way).
    fn send(&mut self, to: EndpointAddr, msg: Message);
    /// `peer` will hear from this runtime within milliseconds: keep it polling.
    fn keep_awake(&mut self, _peer: EndpointAddr) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutStage {
    /// Step 1 sent.
    Init,
    /// Step 2 sent.
    Switching,
    /// The vswitch switched; processing stragglers sent before the switch.
    Draining,
    /// Step 3 sent; the source no longer processes, only forwards.
    Handover,
    /// The switch is being undone; packets are held until the vswitch and the target have
    /// answered (or the target is dead).
    RollingBack {
        need_vswitch: bool,
        need_target: bool,
    },
}

struct OutFlow {
    key: FlowKey,
    row: u32,
    aliases: Vec<FlowKey>,
    /// Packets the vswitch gave this runtime before the switch (all keys).
    sent: u32,
    /// Every packet of `sent` has been processed here (or the flow is gone): the flow
    /// waits for no straggler. Checked once when the vswitch answers, then only for the
    /// flows still waiting, so a draining group costs nothing per loop when none does.
    drained: bool,
}

struct OutGroup {
    target: EndpointAddr,
    vswitch: EndpointAddr,
    stage: OutStage,
    /// The target died after the switch may have reached the vswitch: once the vswitch
    /// points back, a later incarnation at the target's address is told to forget the
    /// flows (`MigrateForget`).
    target_died: bool,
    deadline_ms: u64,
    flows: Vec<OutFlow>,
    /// `keys_digest` of `flows` as the target accepted them (set in step 1's answer).
    accepted_digest: u64,
}

/// A group whose flows the target owns: the source forwards their late stragglers.
struct Tomb {
    target: EndpointAddr,
    flows: Vec<FlowRef>,
    /// Every flow of the group had all its packets processed here before the handover, so
    /// no straggler of theirs can still arrive: the target may send them straight back.
    settled: bool,
}

/// Maps keyed by flow keys and group ids, hashed fast (the keys come from this runtime's
/// own tables and its peers, not from packets an attacker chooses freely).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct InFlow {
    key: FlowKey,
    row: u32,
}

impl OutFlow {
    fn at(&self) -> FlowRef {
        FlowRef {
            key: self.key,
            row: self.row,
        }
    }
}

impl InFlow {
    fn at(&self) -> FlowRef {
        FlowRef {
            key: self.key,
            row: self.row,
        }
    }
}

struct InGroup {
    /// This runtime's id for the group, which its pending actors are marked with.
    id: u32,
    deadline_ms: u64,
    /// The vswitch that feeds the flows.
    vswitch: EndpointAddr,
    flows: Vec<InFlow>,
    /// The aliases of `flows` (which the vswitch moved with their keys).
    aliases: Vec<FlowKey>,
    /// `keys_digest` of `flows`, which step 3 must name.
    digest: u64,
    dropped: u32,
}

/// The job `SetMigrationTarget` started.
struct Job {
    report: MigrationReport,
    started_ms: f64,
    remaining: u32,
    /// Flows a busy target sent back, tried again first.
    retry: Vec<Candidate>,
    retry_after_ms: u64,
    scan_done: bool,
    /// The rate limit's token bucket (flows that may start now), and when it was filled.
    tokens: f64,
    tokens_at_ms: u64,
}

/// Why a migration job was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobRefused {
    #[error("a runtime cannot migrate flows to itself")]
    ToItself,
    #[error("a migration is already running on this runtime")]
    AlreadyRunning,
}

/// Set in the request id of a `SetRuntime` that points flows back at the source. Not
/// `RECOVERY_REQUEST`'s bit (63): a rollback is no takeover (the vswitch holds the two to
/// different rules), and its answer is the migrator's, not the liaison's.
pub(crate) const ROLLBACK: u64 = 1 << 62;
const _: () = assert!(ROLLBACK & nflib::msg::HAND_BACK_REQUEST == 0);
/// How long a target drops packets of flows it gave back to their dead source
/// (`gave_back`): those the vswitch sent before it took the hand-back arrive within
/// milliseconds.
pub(crate) const GAVE_BACK_DROP_MS: u64 = 1_000;
const _: () = assert!(ROLLBACK & nflib::msg::RECOVERY_REQUEST == 0);

/// Bytes of functions' states per flow a step-3 buffer starts with room for (a firewall's
/// and a monitor's states with their lengths take about 60).
const STATE_BYTES_GUESS: usize = 64;

/// A flow this runtime no longer takes part in migrating: what still arrives for it goes
/// back to the source until `until` (ms).
struct Returning {
    to: EndpointAddr,
    group: u64,
    until: u64,
    late: bool,
}

/// Counters of both roles (published with the runtime's statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCounters {
    pub flows_out: u64,
    pub flows_in: u64,
    pub rolled_back: u64,
    pub held: u64,
    /// Flows a restarted target had created from packets meant for its dead incarnation.
    pub strays_ended: u64,
    /// Step-3 groups that named other flows than step 1 left here (none installed).
    pub groups_mismatched: u64,
    /// Flows whose source died before their state came, given back to it at the vswitch
    /// for its replicas' takeover (`MigrationSettings::hand_back`).
    pub flows_handed_back: u64,
}

pub struct Migrator {
    me: EndpointAddr,
    chain: Option<String>,
    settings: MigrationSettings,
    next_group: u64,
    /// Groups in flight (at most `max_groups`, plus those rolling back).
    out: Map<u64, OutGroup>,
    /// Groups the target owns now; their late stragglers are forwarded until the deadline.
    /// Kept apart from `out` so that the per-loop work stays proportional to the groups in
    /// flight, not to the thousands a large job leaves behind for `tombstone_ms`.
    tombs: Map<u64, Tomb>,
    /// Tombstones by deadline (all last `tombstone_ms`, so the order of creation).
    tomb_order: VecDeque<(u64, u64)>,
    /// Incoming groups by their source's name, and that name by this runtime's id (a few
    /// entries each: groups in flight).
    inb: Map<(EndpointAddr, u64), InGroup>,
    in_ids: Map<u32, (EndpointAddr, u64)>,
    next_in: u32,
    /// Target: flows whose migration the source called off, with the deadline until which
    /// packets the vswitch still sends here go back to the source.
    returning: Map<FlowKey, Returning>,
    /// Target: keys given back to a dead source (`hand_back`), with the deadline until
    /// which packets the vswitch sent here before it took them are dropped: made a new flow
    /// here, such a packet would leave a stateless second owner beside the replica.
    gave_back: Map<FlowKey, u64>,
    /// Packets held at this runtime as a target.
    held: usize,
    job: Option<Job>,
    jobs: u64,
    pub counters: MigrationCounters,
    picked: Vec<Candidate>,
    /// `MigrateForget`s sent lately, for a tombstone's time: sent again if their target
    /// turns out to have restarted meanwhile. One sent before the supervisor had restarted
    /// the target is lost with the old incarnation, while the new one may have run packets
    /// its ring still held for the old one and kept their flows.
    forgets: Vec<Forget>,
    /// The latest time the migrator was told (`tick`, `on_message`, `peer_dead`).
    now_ms: u64,
}

/// The least time between two sendings of one `MigrateForget`.
const FORGET_RESEND_MS: u64 = 50;

struct Forget {
    target: EndpointAddr,
    until_ms: u64,
    /// Not sent again before this: a target that stays down is reported dead on every
    /// loop while another group still names it.
    next_ms: u64,
    group: u64,
    vswitch: EndpointAddr,
    flows: Vec<MigrateFlow>,
}

/// The keys the vswitch knows the flows under: each flow's key, then its aliases (the order
/// `RuntimeSet::sent` follows).
fn all_keys(flows: &[OutFlow]) -> Vec<FlowKey> {
    flows
        .iter()
        .flat_map(|f| std::iter::once(f.key).chain(f.aliases.iter().copied()))
        .collect()
}

/// Stops diverting a flow of the outgoing group `id`, if it is still marked with that group
/// (its actor may have ended, and its key come back as another flow, meanwhile). Returns
/// whether it was.
fn undivert(host: &mut impl FlowHost, f: &OutFlow, id: u64) -> bool {
    host.group_of(&f.at()) == Some(id) && host.divert(&f.at(), None)
}

fn later(a: u32, b: u32) -> bool {
    // `a` has reached `b`, counting modulo 2^32.
    (a.wrapping_sub(b) as i32) >= 0
}

impl Migrator {
    pub fn new(me: EndpointAddr, chain: Option<String>, settings: MigrationSettings) -> Migrator {
        Migrator {
            me,
            chain,
            settings,
            next_group: 1,
            out: Map::default(),
            tombs: Map::default(),
            tomb_order: VecDeque::new(),
            inb: Map::default(),
            in_ids: Map::default(),
            next_in: 1,
            returning: Map::default(),
            gave_back: Map::default(),
            held: 0,
            job: None,
            jobs: 0,
            counters: MigrationCounters::default(),
            picked: Vec::new(),
            forgets: Vec::new(),
            now_ms: 0,
        }
    }

    pub fn settings(&self) -> &MigrationSettings {
        &self.settings
    }

    /// Packets held as a target now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The endpoints migrations under way depend on (targets, vswitches, sources).
    pub fn peers(&self) -> Vec<EndpointAddr> {
        let mut v: Vec<EndpointAddr> = self
            .out
            .values()
            .flat_map(|g| [g.target, g.vswitch])
            .chain(self.inb.keys().map(|(s, _)| *s))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether anything is under way (the loop then must not sleep long).
    pub fn busy(&self) -> bool {
        !self.out.is_empty()
            || !self.tombs.is_empty()
            || !self.inb.is_empty()
            || !self.returning.is_empty()
            || !self.gave_back.is_empty()
            // The transport's news of a restarted target is only read while busy.
            || !self.forgets.is_empty()
            || self.job.as_ref().is_some_and(|j| !j.report.done)
    }

    /// `SetMigrationTarget`: moves `count` flows (`u32::MAX`: all) to `target`.
    pub fn start_job(
        &mut self,
        target: EndpointAddr,
        count: u32,
        now_ms: f64,
    ) -> Result<u64, JobRefused> {
        if target == self.me {
            return Err(JobRefused::ToItself);
        }
        if self.job.as_ref().is_some_and(|j| !j.report.done) {
            return Err(JobRefused::AlreadyRunning);
        }
        self.jobs += 1;
        self.job = Some(Job {
            report: MigrationReport {
                job: self.jobs,
                target: Some(target),
                requested: count,
                ..MigrationReport::default()
            },
            started_ms: now_ms,
            remaining: count,
            retry: Vec::new(),
            retry_after_ms: 0,
            scan_done: false,
            // The first group may start at once.
            tokens: self.settings.group_size as f64,
            tokens_at_ms: now_ms as u64,
        });
        Ok(self.jobs)
    }

    pub fn report(&self, now_ms: f64) -> Option<MigrationReport> {
        let j = self.job.as_ref()?;
        let mut r = j.report.clone();
        if !r.done {
            r.elapsed_us = ((now_ms - j.started_ms) * 1000.0).max(0.0) as u64;
        }
        Some(r)
    }

    /// What to do with a packet of a diverted flow, marked `mark`.
    /// The target's side of `peer_dead`, alone: the groups `peer` was migrating here that
    /// wait for their state. (`Recover` of a runtime's life runs this first: the rest of
    /// `peer_dead` is for the transport's, the slots' and the view's news of the peer,
    /// whose new life may be alive by then.)
    pub fn source_died(&mut self, host: &mut impl FlowHost, peer: EndpointAddr, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        // Flows it was handing over here whose state never came: this runtime cannot run
        // them. Where the chain is replicated, the source's replicas hold their state and
        // take over the source's flows by asking the vswitch to move the keys it sends to
        // the source: the keys go back to it first (the vswitch gives them to the replica
        // that already asked, if one did). Without replicas they stay here and start
        // afresh, as they would have on any runtime.
        let orphans: Vec<(EndpointAddr, u64)> = self
            .inb
            .keys()
            .filter(|(s, _)| *s == peer)
            .copied()
            .collect();
        for k in orphans {
            let Some(g) = self.take_in_group(k) else {
                continue;
            };
            if self.settings.hand_back {
                let mut keys: Vec<FlowKey> = g.flows.iter().map(|f| f.key).collect();
                keys.extend_from_slice(&g.aliases);
                self.counters.flows_handed_back += g.flows.len() as u64;
                let until = now_ms + GAVE_BACK_DROP_MS;
                self.gave_back.extend(keys.iter().map(|k| (*k, until)));
                host.send(
                    g.vswitch,
                    Message::SetRuntime {
                        keys,
                        from: self.me,
                        runtime: peer,
                        request: nflib::msg::HAND_BACK_REQUEST,
                    },
                );
            }
            self.drop_in_group_flows(host, g.flows, Release::Discard);
        }
    }

    /// Whether a packet under `key`, which names no flow here, is of a flow given back to
    /// its dead source (`hand_back`) and must be dropped rather than start a flow.
    pub fn gave_back(&self, key: &FlowKey, now_ms: u64) -> bool {
        !self.gave_back.is_empty() && self.gave_back.get(key).is_some_and(|&u| u > now_ms)
    }

    pub fn on_packet(&mut self, key: &FlowKey, mark: Mark) -> PacketAction {
        let group = match mark {
            Mark::Out(g) => Some(g),
            _ => None,
        };
        if let Some(g) = group.and_then(|id| self.out.get(&id).map(|g| (id, g))) {
            let (id, g) = g;
            return match g.stage {
                OutStage::Init | OutStage::Switching | OutStage::Draining => PacketAction::Process,
                OutStage::Handover => {
                    if let Some(j) = self.job.as_mut() {
                        j.report.late_stragglers += 1;
                    }
                    PacketAction::Forward {
                        to: g.target,
                        group: id,
                        late: true,
                    }
                }
                OutStage::RollingBack { .. } => PacketAction::Hold,
            };
        }
        if let Some((id, t)) = group.and_then(|id| self.tombs.get(&id).map(|t| (id, t))) {
            if let Some(j) = self.job.as_mut() {
                j.report.late_stragglers += 1;
            }
            return PacketAction::Forward {
                to: t.target,
                group: id,
                late: true,
            };
        }
        if let Some(r) = self.returning.get(key) {
            return PacketAction::Forward {
                to: r.to,
                group: r.group,
                late: r.late,
            };
        }
        if let Some(name) = match mark {
            Mark::In(id) => self.in_ids.get(&id),
            _ => None,
        } {
            if self.held >= self.settings.buffer_packets {
                if let Some(g) = self.inb.get_mut(name) {
                    g.dropped += 1;
                }
                return PacketAction::Drop;
            }
            self.held += 1;
            self.counters.held += 1;
            return PacketAction::Hold;
        }
        PacketAction::Process
    }

    /// Handles a migration message; false if it is not one.
    pub fn on_message(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        msg: Message,
        now_ms: u64,
    ) -> bool {
        self.now_ms = self.now_ms.max(now_ms);
        match msg {
            Message::MigrateInit {
                group,
                chain,
                vswitch,
                flows,
            } => self.target_init(host, from, group, chain, vswitch, flows, now_ms),
            Message::MigrateReady {
                group,
                accepted,
                refused,
                busy,
            } => self.source_ready(host, from, group, accepted, refused, busy, now_ms),
            Message::RuntimeSet { request, sent, .. } => {
                self.source_switched(host, from, request, sent, now_ms)
            }
            Message::MigrateState {
                group,
                accepted_digest,
                flows,
                states,
            } => self.target_state(host, (from, group), accepted_digest, flows, &states, now_ms),
            Message::MigrateDone {
                group,
                installed,
                buffered,
                dropped,
            } => self.source_done(host, from, group, installed, buffered, dropped, now_ms),
            Message::MigrateAbort { group } => self.target_abort(host, from, group, now_ms),
            Message::MigrateAborted { group, owned, .. } => {
                self.source_aborted(host, from, group, owned)
            }
            Message::MigrateForget {
                group,
                vswitch,
                flows,
            } => self.target_forget(host, from, group, vswitch, flows, now_ms),
            _ => return false,
        }
        true
    }

    /// Timers, the job's next groups, and groups that finished draining.
    pub fn tick(&mut self, host: &mut impl FlowHost, now_ms: u64, clock_ms: f64) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.forgets.is_empty() {
            self.forgets.retain(|f| f.until_ms > now_ms);
        }
        if !self.gave_back.is_empty() {
            self.gave_back.retain(|_, until| *until > now_ms);
        }
        self.expire(host, now_ms);
        self.check_drained(host, now_ms);
        self.start_groups(host, now_ms);
        self.finish_job(clock_ms);
    }

    /// Another endpoint died or restarted (transport, supervisor or cluster view): what it
    /// held of a migration is gone.
    pub fn peer_dead(&mut self, host: &mut impl FlowHost, peer: EndpointAddr, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        // A new incarnation of a target told to forget: tell it (again). Forgetting twice
        // is harmless (`target_forget` skips flows it already returns).
        for f in self
            .forgets
            .iter_mut()
            .filter(|f| f.target == peer && f.until_ms > now_ms && now_ms >= f.next_ms)
        {
            f.next_ms = now_ms + FORGET_RESEND_MS;
            host.send(
                f.target,
                Message::MigrateForget {
                    group: f.group,
                    vswitch: f.vswitch,
                    flows: f.flows.clone(),
                },
            );
        }
        // Flows the target owned die with it.
        let dead: Vec<u64> = self
            .tombs
            .iter()
            .filter(|(_, t)| t.target == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.retire_tomb(host, id);
        }
        let ids: Vec<u64> = self.out.keys().copied().collect();
        for id in ids {
            let Some(g) = self.out.get(&id) else { continue };
            if g.target == peer {
                if let Some(g) = self.out.get_mut(&id) {
                    g.target_died = g.stage != OutStage::Init;
                }
                let Some(g) = self.out.get(&id) else { continue };
                match g.stage {
                    OutStage::Init => self.resume(host, id, false),
                    OutStage::Switching | OutStage::Draining | OutStage::Handover => {
                        self.roll_back(host, id, false, now_ms)
                    }
                    OutStage::RollingBack { need_vswitch, .. } => {
                        self.set_rollback(host, id, need_vswitch, false)
                    }
                }
            } else if g.vswitch == peer {
                match g.stage {
                    OutStage::Init | OutStage::Switching | OutStage::Draining => {
                        let target = g.target;
                        host.send(target, Message::MigrateAbort { group: id });
                        // The vswitch restarts with an empty table: nothing to undo there.
                        self.set_rollback(host, id, false, true);
                    }
                    OutStage::RollingBack { need_target, .. } => {
                        self.set_rollback(host, id, false, need_target)
                    }
                    OutStage::Handover => {}
                }
            }
        }
        self.source_died(host, peer, now_ms);
    }
}
