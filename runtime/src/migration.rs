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

use std::collections::{HashMap, VecDeque};

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::msg::{keys_digest, FlowState, Message, MigrateFlow, MigrationReport};

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
        }
    }
}

/// A flow as the migrator names it to its host: its key, and the slot the host said it
/// keeps it in. The slot is a hint the host checks against the key (the flow may have ended
/// and its slot been reused), so a stale or missing one costs a lookup, never a wrong flow;
/// a right one saves a hash probe, a cache miss at a million flows, per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub key: FlowKey,
    pub slot: u32,
}

impl FlowRef {
    /// No slot known: the host looks the key up.
    pub const NO_SLOT: u32 = u32::MAX;

    pub fn key_only(key: FlowKey) -> FlowRef {
        FlowRef {
            key,
            slot: FlowRef::NO_SLOT,
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
    pub slot: u32,
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
    /// `Mark::In(arriving)`), and the slot it is kept in; `None` if the key or an alias
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
    slot: u32,
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
    slot: u32,
}

impl OutFlow {
    fn at(&self) -> FlowRef {
        FlowRef {
            key: self.key,
            slot: self.slot,
        }
    }
}

impl InFlow {
    fn at(&self) -> FlowRef {
        FlowRef {
            key: self.key,
            slot: self.slot,
        }
    }
}

struct InGroup {
    /// This runtime's id for the group, which its pending actors are marked with.
    id: u32,
    deadline_ms: u64,
    flows: Vec<InFlow>,
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

/// Set in the request id of a `SetRuntime` that points flows back at the source.
const ROLLBACK: u64 = 1 << 63;

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
    ) -> Result<u64, String> {
        if target == self.me {
            return Err("a runtime cannot migrate flows to itself".into());
        }
        if self.job.as_ref().is_some_and(|j| !j.report.done) {
            return Err("a migration is already running on this runtime".into());
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
        let orphans: Vec<(EndpointAddr, u64)> = self
            .inb
            .keys()
            .filter(|(s, _)| *s == peer)
            .copied()
            .collect();
        for k in orphans {
            self.drop_in_group(host, k, Release::Discard);
        }
    }

    // ---- source ----

    fn start_groups(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        let in_flight = self.out.len();
        let mut room = self.settings.max_groups.saturating_sub(in_flight);
        while room > 0 {
            let Some(j) = self.job.as_mut() else { return };
            if j.report.done || j.remaining == 0 || now_ms < j.retry_after_ms {
                return;
            }
            let target = j.report.target.unwrap_or(self.me);
            let want = self.settings.group_size.min(j.remaining as usize);
            let rate = self.settings.max_flows_per_s;
            if rate > 0 {
                // Token bucket: a group starts once its flows' worth of time has passed.
                // It holds one group, or two milliseconds' worth if more: the clock ticks
                // in milliseconds, and a bucket of one group would start at most one group
                // a tick (256,000 flows/s by default) whatever the limit said.
                let depth = (self.settings.group_size as f64).max(rate as f64 * 0.002);
                let elapsed = now_ms.saturating_sub(j.tokens_at_ms) as f64 / 1000.0;
                j.tokens = (j.tokens + rate as f64 * elapsed).min(depth);
                j.tokens_at_ms = now_ms;
                if j.tokens < want as f64 {
                    return;
                }
            }
            let mut picked = std::mem::take(&mut self.picked);
            picked.clear();
            if !j.retry.is_empty() {
                let v = j.retry[0].vswitch;
                let mut i = 0;
                while i < j.retry.len() && picked.len() < want {
                    if j.retry[i].vswitch == v {
                        picked.push(j.retry.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            } else if !j.scan_done && !host.pick(want, &mut picked) {
                j.scan_done = true;
            }
            // A group has one vswitch: flows fed by others wait for a later group.
            if let Some(v) = picked.first().map(|c| c.vswitch) {
                let mut i = 0;
                while i < picked.len() {
                    if picked[i].vswitch != v {
                        j.retry.push(picked.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            if picked.is_empty() {
                self.picked = picked;
                return;
            }
            let id = self.next_group;
            let vswitch = picked[0].vswitch;
            let mut flows = Vec::with_capacity(picked.len());
            let mut wire = Vec::with_capacity(picked.len());
            for c in picked.drain(..) {
                let at = FlowRef {
                    key: c.key,
                    slot: c.slot,
                };
                // A flow put back for a retry may have ended since, and its key may even be
                // arriving here from elsewhere now: only a flow still here and not diverted
                // joins the group.
                if !host.divert(&at, Some(id)) {
                    continue;
                }
                wire.push(MigrateFlow {
                    key: c.key,
                    aliases: c.aliases.clone(),
                });
                flows.push(OutFlow {
                    key: c.key,
                    slot: c.slot,
                    aliases: c.aliases,
                    sent: 0,
                    drained: false,
                });
            }
            self.picked = picked;
            if flows.is_empty() {
                continue;
            }
            // Group ids stay below `GROUP_ID_LIMIT`; one wraps after two billion groups,
            // long after any group of that number has ended.
            self.next_group = if id + 1 >= GROUP_ID_LIMIT { 1 } else { id + 1 };
            if let Some(j) = self.job.as_mut() {
                j.remaining = j.remaining.saturating_sub(flows.len() as u32);
                if rate > 0 {
                    j.tokens -= flows.len() as f64;
                }
                j.report.groups += 1;
            }
            // Step 2 follows within a millisecond or so.
            host.keep_awake(vswitch);
            host.send(
                target,
                Message::MigrateInit {
                    group: id,
                    chain: self.chain.clone(),
                    vswitch,
                    flows: wire,
                },
            );
            self.out.insert(
                id,
                OutGroup {
                    target,
                    vswitch,
                    stage: OutStage::Init,
                    target_died: false,
                    deadline_ms: now_ms + self.settings.step_timeout_ms,
                    flows,
                    accepted_digest: 0,
                },
            );
            room -= 1;
        }
    }

    fn finish_job(&mut self, clock_ms: f64) {
        let idle = self.out.is_empty();
        let Some(j) = self.job.as_mut() else { return };
        if j.report.done || !idle {
            return;
        }
        let nothing_left = j.retry.is_empty() && (j.remaining == 0 || j.scan_done);
        if nothing_left || j.report.error.is_some() {
            j.report.done = true;
            j.report.elapsed_us = ((clock_ms - j.started_ms) * 1000.0).max(0.0) as u64;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn source_ready(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        accepted: Vec<bool>,
        refused: Option<String>,
        busy: bool,
        now_ms: u64,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.stage != OutStage::Init || g.target != from {
            return;
        }
        if let Some(reason) = refused {
            let flows = std::mem::take(&mut g.flows);
            let vswitch = g.vswitch;
            self.out.remove(&id);
            for f in &flows {
                undivert(host, f, id);
            }
            if let Some(j) = self.job.as_mut() {
                if busy {
                    // The target's buffer is filling: the same flows, a little later.
                    j.remaining += flows.len() as u32;
                    j.report.groups = j.report.groups.saturating_sub(1);
                    j.retry.extend(flows.into_iter().map(|f| Candidate {
                        key: f.key,
                        slot: f.slot,
                        aliases: f.aliases,
                        vswitch,
                    }));
                    j.retry_after_ms = now_ms + 5;
                } else {
                    j.report.failed += flows.len() as u64;
                    j.report.error = Some(format!("target refused: {reason}"));
                }
            }
            return;
        }
        // Flows the target could not take stay here.
        let mut keep = Vec::with_capacity(g.flows.len());
        let mut failed = 0;
        for (i, f) in std::mem::take(&mut g.flows).into_iter().enumerate() {
            if accepted.get(i).copied().unwrap_or(false) {
                keep.push(f);
            } else {
                undivert(host, &f, id);
                failed += 1;
            }
        }
        if let Some(j) = self.job.as_mut() {
            j.report.failed += failed;
        }
        if keep.is_empty() {
            self.out.remove(&id);
            return;
        }
        let keys = all_keys(&keep);
        g.accepted_digest = keys_digest(keep.iter().map(|f| &f.key));
        g.flows = keep;
        g.stage = OutStage::Switching;
        g.deadline_ms = now_ms + self.settings.step_timeout_ms;
        let (vswitch, target) = (g.vswitch, g.target);
        host.send(
            vswitch,
            Message::SetRuntime {
                keys,
                from: self.me,
                runtime: target,
                request: id,
            },
        );
    }

    fn source_switched(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        request: u64,
        sent: Vec<u32>,
        now_ms: u64,
    ) {
        let id = request & !ROLLBACK;
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.vswitch != from {
            return;
        }
        if request & ROLLBACK != 0 {
            if let OutStage::RollingBack { need_target, .. } = g.stage {
                self.set_rollback(host, id, false, need_target);
            }
            return;
        }
        if g.stage != OutStage::Switching {
            return;
        }
        // `sent` follows the keys in the order they were asked for: each flow's key, then
        // its aliases.
        let mut it = sent.into_iter();
        let mut waiting = 0u64;
        for f in &mut g.flows {
            let n = 1 + f.aliases.len();
            f.sent = it.by_ref().take(n).fold(0u32, |a, b| a.wrapping_add(b));
            f.drained = match host.packets(&f.at()) {
                Some(p) if !later(p, f.sent) => {
                    waiting += f.sent.wrapping_sub(p) as u64;
                    false
                }
                _ => true,
            };
        }
        if let Some(j) = self.job.as_mut() {
            j.report.stragglers_waited += waiting;
        }
        g.stage = OutStage::Draining;
        g.deadline_ms = now_ms + self.settings.straggler_timeout_ms;
        self.check_drained(host, now_ms);
    }

    /// Hands over the groups whose stragglers have all been processed (or waited for long
    /// enough).
    fn check_drained(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        let mut ready = Vec::new();
        for (id, g) in self.out.iter_mut() {
            if g.stage != OutStage::Draining {
                continue;
            }
            let mut all = true;
            for f in g.flows.iter_mut().filter(|f| !f.drained) {
                f.drained = host.packets(&f.at()).is_none_or(|p| later(p, f.sent));
                all &= f.drained;
            }
            if all || now_ms >= g.deadline_ms {
                ready.push(*id);
            }
        }
        for id in ready {
            let Some(g) = self.out.get_mut(&id) else {
                continue;
            };
            let mut states = Vec::with_capacity(g.flows.len());
            let mut blob = Vec::with_capacity(g.flows.len() * STATE_BYTES_GUESS);
            let mut gone = Vec::new();
            // A flow is named by its place in the group as the target accepted it, which
            // is `g.flows` as `source_ready` left it (nothing leaves it before this).
            for (idx, f) in g.flows.iter().enumerate() {
                let missing = if f.drained {
                    0
                } else {
                    host.packets(&f.at())
                        .map(|p| {
                            if later(p, f.sent) {
                                0
                            } else {
                                f.sent.wrapping_sub(p)
                            }
                        })
                        .unwrap_or(0)
                };
                match host.save(&f.at(), &mut blob) {
                    Some(mut st) => {
                        st.idx = idx as u32;
                        st.missing = missing;
                        states.push(st);
                    }
                    // The flow ended while it drained (a close): nothing to move.
                    None => gone.push(f.key),
                }
            }
            if !gone.is_empty() {
                g.flows.retain(|f| !gone.contains(&f.key));
            }
            if states.is_empty() {
                self.out.remove(&id);
                continue;
            }
            g.stage = OutStage::Handover;
            let target = g.target;
            host.send(
                target,
                Message::MigrateState {
                    group: id,
                    accepted_digest: g.accepted_digest,
                    flows: states,
                    states: blob,
                },
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn source_done(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        installed: Vec<bool>,
        buffered: u32,
        dropped: u32,
        now_ms: u64,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.stage != OutStage::Handover || g.target != from {
            return;
        }
        let mut moved = 0u64;
        let mut not_installed = Vec::new();
        for i in 0..g.flows.len() {
            if installed.get(i).copied().unwrap_or(false) {
                moved += 1;
            } else {
                not_installed.push(i);
            }
        }
        // The target had no pending actor for these (it expired): the vswitch points at
        // it, so bring them back.
        let mut back = Vec::new();
        for i in not_installed.into_iter().rev() {
            back.push(g.flows.swap_remove(i));
        }
        let (vswitch, target) = (g.vswitch, g.target);
        self.counters.flows_out += moved;
        if let Some(j) = self.job.as_mut() {
            j.report.moved += moved;
            j.report.failed += back.len() as u64;
            j.report.buffered += buffered as u64;
            j.report.buffer_drops += dropped as u64;
        }
        if !back.is_empty() {
            let keys = all_keys(&back);
            host.send(
                vswitch,
                Message::SetRuntime {
                    keys,
                    from: target,
                    runtime: self.me,
                    request: 0,
                },
            );
            for f in back {
                undivert(host, &f, id);
            }
        }
        if let Some(g) = self.out.remove(&id) {
            let settled = g.flows.iter().all(|f| f.drained);
            self.tombs.insert(
                id,
                Tomb {
                    target: g.target,
                    flows: g.flows.iter().map(OutFlow::at).collect(),
                    settled,
                },
            );
            self.tomb_order
                .push_back((now_ms + self.settings.tombstone_ms, id));
        }
    }

    fn source_aborted(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        id: u64,
        owned: Vec<FlowKey>,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if g.target != from {
            return;
        }
        if let OutStage::RollingBack { need_vswitch, .. } = g.stage {
            if !owned.is_empty() {
                // Installed before the abort arrived: those are the target's now.
                let mut tomb = Vec::new();
                g.flows.retain(|f| {
                    if owned.contains(&f.key) {
                        tomb.push(f.at());
                        false
                    } else {
                        true
                    }
                });
                for f in tomb {
                    host.retire(&f);
                }
            }
            self.set_rollback(host, id, need_vswitch, false);
        }
    }

    /// Undoes a switch: the vswitch points back here, the target returns what it holds;
    /// packets arriving meanwhile are held, then everything resumes in order.
    fn roll_back(&mut self, host: &mut impl FlowHost, id: u64, target_alive: bool, now_ms: u64) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        let keys = all_keys(&g.flows);
        g.deadline_ms = now_ms + self.settings.step_timeout_ms;
        let (vswitch, target) = (g.vswitch, g.target);
        host.send(
            vswitch,
            Message::SetRuntime {
                keys,
                from: target,
                runtime: self.me,
                request: id | ROLLBACK,
            },
        );
        if target_alive {
            host.send(target, Message::MigrateAbort { group: id });
        }
        if let Some(j) = self.job.as_mut() {
            j.report.groups_rolled_back += 1;
        }
        self.set_rollback(host, id, true, target_alive);
    }

    fn set_rollback(
        &mut self,
        host: &mut impl FlowHost,
        id: u64,
        need_vswitch: bool,
        need_target: bool,
    ) {
        let Some(g) = self.out.get_mut(&id) else {
            return;
        };
        if need_vswitch || need_target {
            g.stage = OutStage::RollingBack {
                need_vswitch,
                need_target,
            };
        } else {
            self.resume(host, id, true);
        }
    }

    /// The flows of the group stay here: held packets are processed, diversion ends.
    fn resume(&mut self, host: &mut impl FlowHost, id: u64, rolled_back: bool) {
        let Some(g) = self.out.remove(&id) else {
            return;
        };
        if g.target_died {
            let flows: Vec<MigrateFlow> = g
                .flows
                .iter()
                .map(|f| MigrateFlow {
                    key: f.key,
                    aliases: f.aliases.clone(),
                })
                .collect();
            host.send(
                g.target,
                Message::MigrateForget {
                    group: id,
                    vswitch: g.vswitch,
                    flows: flows.clone(),
                },
            );
            self.forgets.push(Forget {
                target: g.target,
                until_ms: self.now_ms + self.settings.tombstone_ms,
                next_ms: self.now_ms,
                group: id,
                vswitch: g.vswitch,
                flows,
            });
        }
        for f in &g.flows {
            if undivert(host, f, id) {
                host.release_held(&f.at(), Release::Process);
            }
        }
        if rolled_back {
            self.counters.rolled_back += g.flows.len() as u64;
        }
        if let Some(j) = self.job.as_mut() {
            j.report.failed += g.flows.len() as u64;
        }
    }

    fn retire_tomb(&mut self, host: &mut impl FlowHost, id: u64) {
        let Some(t) = self.tombs.remove(&id) else {
            return;
        };
        for f in &t.flows {
            // Not if the flow came back meanwhile (`reclaim`) and is someone else's now.
            if host.group_of(f) == Some(id) {
                host.retire(f);
            }
        }
    }

    /// A flow this runtime handed to `from` is coming back from it before its tombstone
    /// expired: if no straggler of it can still arrive here, drop the tombstone's actor so
    /// a pending one can take its place. Otherwise the flow is refused (it stays at `from`).
    fn reclaim(&mut self, host: &mut impl FlowHost, from: EndpointAddr, key: &FlowKey) {
        let at = FlowRef::key_only(*key);
        let Some(id) = host.group_of(&at) else {
            return;
        };
        if self
            .tombs
            .get(&id)
            .is_some_and(|t| t.target == from && t.settled)
        {
            host.retire(&at);
        }
    }

    fn expire(&mut self, host: &mut impl FlowHost, now_ms: u64) {
        while let Some(&(deadline, id)) = self.tomb_order.front() {
            if deadline > now_ms {
                break;
            }
            self.tomb_order.pop_front();
            self.retire_tomb(host, id);
        }
        let due: Vec<u64> = self
            .out
            .iter()
            .filter(|(_, g)| g.stage != OutStage::Draining && now_ms >= g.deadline_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(g) = self.out.get(&id) else { continue };
            match g.stage {
                OutStage::Init => {
                    let target = g.target;
                    host.send(target, Message::MigrateAbort { group: id });
                    self.resume(host, id, false);
                }
                OutStage::Switching => self.roll_back(host, id, true, now_ms),
                // Only an answer or the target's death ends the handover: the target may
                // have installed the state.
                OutStage::Handover | OutStage::Draining => {}
                // The vswitch or target never answered the rollback: resume anyway.
                OutStage::RollingBack { .. } => self.resume(host, id, true),
            }
        }
        let due: Vec<(EndpointAddr, u64)> = self
            .inb
            .iter()
            .filter(|(_, g)| now_ms >= g.deadline_ms)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            self.drop_in_group(host, k, Release::Discard);
        }
        let done: Vec<FlowKey> = self
            .returning
            .iter()
            .filter(|(_, r)| now_ms >= r.until)
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            self.returning.remove(&k);
            host.remove_pending(&FlowRef::key_only(k));
        }
    }

    // ---- target ----

    #[allow(clippy::too_many_arguments)]
    fn target_init(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        chain: Option<String>,
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
        now_ms: u64,
    ) {
        if self.inb.contains_key(&(from, group)) {
            return; // a repeat
        }
        let refusal = if chain != self.chain {
            Some((
                format!(
                    "the target runs chain `{}`, the flows run `{}`",
                    self.chain.as_deref().unwrap_or("(none)"),
                    chain.as_deref().unwrap_or("(none)")
                ),
                false,
            ))
        } else if self.held >= self.settings.buffer_high_water {
            Some((
                format!("its migration buffer holds {} packets", self.held),
                true,
            ))
        } else {
            None
        };
        if let Some((reason, busy)) = refusal {
            host.send(
                from,
                Message::MigrateReady {
                    group,
                    accepted: Vec::new(),
                    refused: Some(reason),
                    busy,
                },
            );
            return;
        }
        let mut accepted = Vec::with_capacity(flows.len());
        let mut taken = Vec::new();
        let id = self.next_in_id();
        host.prepare_pending(&flows);
        // Only a flow that left this runtime can come back to it: with no tombstone here,
        // there is nothing to reclaim, and no lookup per flow to find that out.
        let reclaiming = !self.tombs.is_empty();
        for f in &flows {
            if reclaiming {
                self.reclaim(host, from, &f.key);
            }
            // The host refuses a key it has, so also one pending already (in this group
            // or another) or one the source took back and that still returns to it.
            let slot = host.create_pending(f, vswitch, id);
            if let Some(slot) = slot {
                taken.push(InFlow { key: f.key, slot });
            }
            accepted.push(slot.is_some());
        }
        if !taken.is_empty() {
            self.in_ids.insert(id, (from, group));
            self.inb.insert(
                (from, group),
                InGroup {
                    id,
                    deadline_ms: now_ms + self.settings.pending_timeout_ms,
                    digest: keys_digest(taken.iter().map(|f| &f.key)),
                    flows: taken,
                    dropped: 0,
                },
            );
        }
        host.send(
            from,
            Message::MigrateReady {
                group,
                accepted,
                refused: None,
                busy: false,
            },
        );
    }

    /// Step 3 for the group `(from, group)`, an incoming group's key.
    fn target_state(
        &mut self,
        host: &mut impl FlowHost,
        (from, group): (EndpointAddr, u64),
        accepted_digest: u64,
        flows: Vec<FlowState>,
        states: &[u8],
        now_ms: u64,
    ) {
        let mut g = self.take_in_group((from, group));
        if let Some(mismatch) = g.take_if(|g| g.digest != accepted_digest) {
            // Source and target do not count this group's flows alike (a stale group, or a
            // bug): matching states by position could install one flow's state in another.
            // None is installed and the source keeps them all, as after an abort: what was
            // held, and what arrives until the vswitch points back, goes back to it.
            self.counters.groups_mismatched += 1;
            self.return_in_group(host, from, group, mismatch, now_ms);
        }
        // Each flow's part of `states`, in order; a part past the end (a malformed
        // message) installs nothing.
        let mut offset = 0usize;
        let mut installed = Vec::with_capacity(flows.len());
        let mut buffered = 0u32;
        // Flows of the group a state arrived for (the rest ended at the source meanwhile).
        let mut arrived = vec![false; g.as_ref().map_or(0, |g| g.flows.len())];
        for st in &flows {
            let end = offset.saturating_add(st.states_len as usize);
            let part = states.get(offset..end);
            offset = end;
            let i = st.idx as usize;
            let ok = match g.as_ref() {
                Some(g) if i < g.flows.len() && !arrived[i] => {
                    arrived[i] = true;
                    let at = g.flows[i].at();
                    let ok = part.is_some_and(|part| host.install(&at, st, part));
                    let how = if ok {
                        Release::Process
                    } else {
                        Release::Return { to: from, group }
                    };
                    let held = host.release_held(&at, how);
                    if ok {
                        buffered += held;
                    } else {
                        host.remove_pending(&at);
                    }
                    self.held = self.held.saturating_sub(held as usize);
                    ok
                }
                _ => false,
            };
            installed.push(ok);
        }
        self.counters.flows_in += installed.iter().filter(|x| **x).count() as u64;
        let dropped = g.as_ref().map(|g| g.dropped).unwrap_or(0);
        // Flows named in step 1 but not in step 3 (they ended at the source meanwhile).
        if let Some(g) = g {
            let left: Vec<InFlow> = g
                .flows
                .into_iter()
                .zip(arrived)
                .filter(|(_, arrived)| !arrived)
                .map(|(f, _)| f)
                .collect();
            if !left.is_empty() {
                self.drop_in_group_flows(host, left, Release::Discard);
            }
        }
        host.send(
            from,
            Message::MigrateDone {
                group,
                installed,
                buffered,
                dropped,
            },
        );
    }

    fn target_abort(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        now_ms: u64,
    ) {
        // The vswitch may point at this runtime a while longer (the source's request to
        // point back travels another path and may be retransmitted): the pending actors
        // stay for as long as one would wait for a state, and whatever reaches them goes
        // back to the source.
        let returned = match self.take_in_group((from, group)) {
            Some(g) => self.return_in_group(host, from, group, g, now_ms),
            None => 0,
        };
        host.send(
            from,
            Message::MigrateAborted {
                group,
                returned,
                owned: Vec::new(),
            },
        );
    }

    /// Gives an incoming group's flows back to the source: what their pending actors hold
    /// goes back now, and what the vswitch still sends here goes back too until the
    /// source has pointed it back (as long as one would wait for a state). Returns how
    /// many packets went back.
    fn return_in_group(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        g: InGroup,
        now_ms: u64,
    ) -> u32 {
        let until = now_ms + self.settings.pending_timeout_ms;
        let mut returned = 0;
        for f in g.flows {
            let n = host.release_held(&f.at(), Release::Return { to: from, group });
            self.held = self.held.saturating_sub(n as usize);
            returned += n;
            // Its actor stays, still marked as arriving in a group that is gone: `on_packet`
            // finds it here first.
            self.returning.insert(
                f.key,
                Returning {
                    to: from,
                    group,
                    until,
                    late: false,
                },
            );
        }
        returned
    }

    /// A later incarnation of a target that died in step 2 or 3 (or, should it have lived,
    /// the same one): none of the group's flows is this runtime's. Actors that packets
    /// meant for the dead incarnation created are ended; packets still on their way go
    /// back to the source for a tombstone's time.
    fn target_forget(
        &mut self,
        host: &mut impl FlowHost,
        from: EndpointAddr,
        group: u64,
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
        now_ms: u64,
    ) {
        if self.inb.contains_key(&(from, group)) {
            self.target_abort(host, from, group, now_ms);
            return;
        }
        let until = now_ms + self.settings.tombstone_ms;
        for f in flows {
            let keys = std::iter::once(&f.key).chain(&f.aliases);
            // A flow pending here (in another group) or returning already keeps its actor:
            // `end_stray` spares diverted flows and `create_pending` refuses its keys.
            if keys.clone().any(|k| self.returning.contains_key(k)) {
                continue;
            }
            for k in keys {
                if host.end_stray(k) {
                    self.counters.strays_ended += 1;
                }
            }
            if host.create_pending(&f, vswitch, 0).is_some() {
                // They may overtake what the vswitch sent the source after pointing back:
                // counted there as late.
                self.returning.insert(
                    f.key,
                    Returning {
                        to: from,
                        group,
                        until,
                        late: true,
                    },
                );
            }
        }
    }

    /// Forgets an incoming group's pending actors, returning their packets to the source
    /// or freeing them. Returns how many were returned.
    fn drop_in_group(
        &mut self,
        host: &mut impl FlowHost,
        k: (EndpointAddr, u64),
        how: Release,
    ) -> u32 {
        match self.take_in_group(k) {
            Some(g) => self.drop_in_group_flows(host, g.flows, how),
            None => 0,
        }
    }

    /// Removes an incoming group (its id no longer names it).
    fn take_in_group(&mut self, k: (EndpointAddr, u64)) -> Option<InGroup> {
        let g = self.inb.remove(&k)?;
        self.in_ids.remove(&g.id);
        Some(g)
    }

    /// An id for a new incoming group that names no other one in flight.
    fn next_in_id(&mut self) -> u32 {
        loop {
            let id = self.next_in;
            self.next_in = if u64::from(id) + 1 >= GROUP_ID_LIMIT {
                1
            } else {
                id + 1
            };
            if !self.in_ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn drop_in_group_flows(
        &mut self,
        host: &mut impl FlowHost,
        flows: Vec<InFlow>,
        how: Release,
    ) -> u32 {
        let mut n = 0;
        for f in flows {
            let released = host.release_held(&f.at(), how);
            self.held = self.held.saturating_sub(released as usize);
            n += released;
            host.remove_pending(&f.at());
        }
        n
    }
}
