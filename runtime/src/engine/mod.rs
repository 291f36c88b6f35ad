//! The runtime engine: one flow actor per flow running the whole service chain, run to
//! completion, on one thread (the paper's sections 3.2-3.4).
//!
//! For each packet: undo the vswitch's addressing (restore the destination MAC it saved),
//! parse, find the flow actor by key (an alias leads to its flow and means the reply
//! direction) or create one, run every function of the chain in order on the packet and the
//! flow's state, then forward, drop or send the packet back. Aliases functions register are
//! sent to the vswitch that feeds the flow before the packet that caused them leaves, so the
//! first translated reply already finds its way here.
//!
//! Flows end when idle (`idle_timeout_s`), when they never got a reply
//! (`unreplied_timeout_s`), or `closed_linger_ms` after a TCP close (FIN both ways or RST);
//! each function then sees `end_flow`, and the vswitch is told to forget the flow's keys.

use std::collections::{HashMap, VecDeque};

use nflib::buffer::Route;
use nflib::flow::{FlowKey, Sender};
use nflib::frame::{EndpointAddr, LIAISON};
use nflib::mailbox::Paced;
use nflib::msg::{states, FlowState, Message, MigrateFlow, MovedPacket};
use nflib::nf::{tcp_flags, Dir, EndReason, NfContext, PacketMut, Stage, Verdict};
use nflib::records::FlowRecords;
use nflib::reliable::SendError;
use nflib::stats::{ProcCounter, NF_COUNTERS};
use nflib::{Packet, MANAGER_SLOT};

use crate::aliases::AliasCommit;
use crate::events::EventLog;
use crate::flows::{flag, ms_since, FlowActor, FlowTable, Found};
use crate::holds::{self, Homes, HERE};
use crate::io::{Buffers, Io};
use crate::migration::{
    Candidate, FlowHost, FlowRef, Mark, MigrationSettings, Migrator, PacketAction, Release,
};
use crate::replication::{self, Copies, FlowMeta, ReplicaActor, ReplicaStore, Replicator};
use crate::timers::{Entry, TimerWheel};

/// When flows end.
#[derive(Clone, Copy, Debug)]
pub struct FlowSettings {
    pub max_flows: usize,
    pub idle_ms: u32,
    pub unreplied_ms: u32,
    pub closed_linger_ms: u32,
    /// Longest a packet waits for the vswitch to confirm its flow's new aliases.
    pub alias_wait_ms: u32,
}

/// How many packets ahead of the one whose chain runs its flow's actor and states are asked
/// for (its index line twice as far ahead): enough to cover a miss to memory, few enough
/// that a core keeps every line asked for in flight (`process_batch`).
const AHEAD: usize = 8;

/// How long copies a takeover's vswitch gave to a third runtime wait for that runtime to
/// give them back (`drop_unmoved`): longer than the vswitch keeps the claim (2 s).
const TAKEOVER_PARK_NS: u64 = 2_500_000_000;
/// How long a primary and its replica keep polling after a replication message under
/// output commit (their loops yield instead of sleeping): the answer's round trip then costs
/// no wake-up.
const REPL_KEEP_AWAKE_NS: u64 = 1_000_000;

/// Most flows ended per call of `expire`, so a mass expiry cannot stall the packet path.
const EXPIRE_BATCH: usize = 4096;

/// The most flows `Runtime::prepare_for` makes room for (writes actors and records, taking
/// their page faults): a millisecond or so of this loop's time.
const MAX_PREPARED_FLOWS: usize = 16_384;

/// The flow engine over packets of type `P` (the region's `Packet` in the process; plain
/// memory in the engine's tests), doing its I/O through an [`Io`].
pub struct Runtime<P = Packet> {
    stages: Vec<Box<dyn Stage>>,
    nf_counters: Vec<[u64; NF_COUNTERS]>,
    /// The flows: their keys, and each flow's record (its actor and every function's state
    /// of it, side by side).
    flows: FlowTable,
    timers: TimerWheel,
    fired: Vec<Entry>,
    pub events: EventLog,
    settings: FlowSettings,
    /// This runtime in the cluster.
    me: EndpointAddr,
    /// The address vswitches give frames they send here.
    mac: [u8; 6],
    /// The monotonic clock's reading (ns) when the runtime started: its milliseconds count
    /// from here.
    epoch_ns: u64,
    next_id: u64,
    aliases: Vec<FlowKey>,
    out: Vec<P>,
    /// Aliases (with the vswitch that feeds the flow and the flow's id) and ended flows to
    /// tell the vswitches (sent by `flush`, one message per vswitch, before the packets
    /// that need them).
    new_aliases: Vec<(EndpointAddr, FlowKey, u64)>,
    ended: Vec<Ended>,
    /// Packets waiting for the vswitch to confirm their flows' new aliases.
    alias_commit: AliasCommit<P>,
    prepared: Vec<Prepared>,
    /// The packets of `prepared`, in the same order.
    prepared_pkts: Vec<P>,
    /// Flow migration, both as source and as target.
    pub migrator: Migrator,
    /// Packets held for flows under migration, by flow row, in arrival order.
    held: HashMap<u32, VecDeque<P>>,
    /// Late stragglers to forward to the runtime that now owns their flow (sent by `flush`).
    forwards: Vec<(EndpointAddr, u64, bool, MovedPacket)>,
    /// Where the scan for flows to migrate continues.
    pick_cursor: u32,
    /// Replication of this runtime's flows to their replicas (`replication`), and the
    /// copies it holds of other runtimes' flows.
    pub repl: Replicator<P>,
    pub replica: ReplicaStore,
    /// The loop's clock (`nflib::time::mono_ns`) as of the current batch.
    now_ns: u64,
    /// Copies taken over (`recover`) and already re-pointed here, not yet live flows: made
    /// live a batch per loop (`adopt_recovered`), or at once when a packet of one comes.
    /// Re-pointing first keeps a takeover as short as its messages.
    /// One set of copies per takeover (nearly always one).
    recovered: Vec<Copies>,
    recovered_lost: u64,
    /// Copies whose keys a takeover's vswitch gave to a third runtime (`drop_unmoved`),
    /// kept until `parked_until_ns` in case that runtime gives them back (it was a
    /// migration's target and the dead runtime, its source, never sent the state): made
    /// live only when a packet of one comes. Under ids of their own (`parked_ids`).
    parked: Copies,
    parked_until_ns: u64,
    parked_ids: u64,
    /// A takeover's re-pointing is under way: the copies wait for their first packet or
    /// its end rather than being made live in the background, so that this loop stays
    /// short and the vswitches' answers are read at once.
    pub repointing: bool,
    /// The runtimes that started the flows held here (`holds`), and what to tell them of
    /// the flows that hold their resources (sent by `flush`).
    homes: Homes,
    holds: holds::Outbox,
    /// Bulk messages (re-pointing, feeds, holds) waiting for room in the transport.
    paced: Paced,
}

/// Recovered flows made live per loop iteration in the background (about a millisecond).
const ADOPT_PER_LOOP: usize = 2048;

/// How long a takeover keeps this runtime and the vswitches it re-points polling.
const REPOINT_AWAKE_NS: u64 = 20_000_000;

/// A key of an ended flow, for the vswitch that fed it to forget.
struct Ended {
    vswitch: EndpointAddr,
    key: FlowKey,
    /// An alias (or a key the flow no longer needs): forgotten whatever its last packet.
    alias: bool,
    /// How long the flow had had no packet when it ended.
    idle_ms: u32,
}

/// Whom to tell that a flow ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Notify {
    /// Nobody (the runtime is stopping).
    Nobody,
    /// The vswitch that feeds the flow: every key.
    Vswitch,
    /// The vswitch, of every key but this one, which a new flow takes over at once (a port
    /// reused after a close).
    VswitchBut(FlowKey),
}

/// What running the chain on a packet came to.
enum Ran {
    /// The verdict, the packet's new length, its flow (row and id), the alias epoch it
    /// must wait for, if any, and whether it waits for its replica (output commit).
    Done(Verdict, usize, (u32, u64), Option<u64>, bool),
    /// Dropped before the chain (table full).
    Dropped,
    /// The flow is migrating: the migrator decides (its row and key).
    Diverted(u32, FlowKey),
}

/// What the first pass of a batch learnt of a packet: parsed and hashed. Kept apart from
/// the packet itself so the last pass reads it in place (moving it into a call copied its
/// hundred-odd bytes for every packet).
struct Prepared {
    /// The vswitch that sent it (through nfmgr when it is on another server).
    vswitch: EndpointAddr,
    h: nflib::packet::Headers,
    key: FlowKey,
    sender: Sender,
    hash: u64,
}

/// The local slot that carries messages from `me` to `peer`: the peer's own on this
/// server; another server's endpoints are reached through this server's nfmgr.
fn slot_toward(me: EndpointAddr, peer: EndpointAddr) -> u16 {
    if peer.server == me.server {
        peer.slot
    } else {
        MANAGER_SLOT
    }
}

impl<P> Runtime<P> {
    pub fn new(
        stages: Vec<Box<dyn Stage>>,
        settings: FlowSettings,
        events: EventLog,
        me: EndpointAddr,
    ) -> Runtime<P> {
        let n = stages.len();
        let mut stages = stages;
        let mut flows = FlowTable::new(settings.max_flows);
        // Room for every flow the runtime may hold, reserved now and backed by pages only as
        // flows arrive: the arrays never move (a move of a large one stalls the loop).
        for s in &mut stages {
            // A new table takes every field.
            let attached = s.attach(flows.records_mut());
            debug_assert!(attached);
        }
        let reserved = flows.reserve_capacity();
        if !reserved {
            eprintln!(
                "nf-runtime: could not reserve address space for max_flows = {}; flow \
                 arrays will grow (and move) as flows arrive",
                settings.max_flows
            );
        }
        Runtime {
            stages,
            nf_counters: vec![[0; NF_COUNTERS]; n],
            flows,
            // 100 ms ticks, a 409.6 s horizon.
            timers: TimerWheel::new(4096, 100, 0),
            fired: Vec::new(),
            events,
            settings,
            me,
            mac: me.input_mac(),
            epoch_ns: nflib::time::mono_ns(),
            next_id: 1,
            aliases: Vec::new(),
            out: Vec::new(),
            new_aliases: Vec::new(),
            ended: Vec::new(),
            alias_commit: AliasCommit::new(u64::from(settings.alias_wait_ms) * 1_000_000),
            prepared: Vec::new(),
            prepared_pkts: Vec::new(),
            migrator: Migrator::new(me, None, MigrationSettings::default()),
            held: HashMap::new(),
            forwards: Vec::new(),
            pick_cursor: 0,
            repl: Replicator::new(replication::Settings::default(), 0, n),
            replica: ReplicaStore::new(0, n),
            now_ns: nflib::time::mono_ns(),
            recovered: Vec::new(),
            recovered_lost: 0,
            parked: Copies::default(),
            parked_until_ns: 0,
            parked_ids: 0,
            repointing: false,
            homes: Homes::new(me),
            holds: holds::Outbox::default(),
            paced: Paced::default(),
        }
    }

    /// Sets how this runtime's flows are replicated (its chain's mode), its incarnation
    /// (the slot's generation: a restart makes a new one) and how many copies of other
    /// runtimes' flows it holds.
    pub fn set_replication(&mut self, settings: replication::Settings, incarnation: u64) {
        let n = self.stages.len();
        self.repl = Replicator::new(settings, incarnation, n);
        self.replica = ReplicaStore::new(settings.max_replica_flows, n);
    }

    /// Sets what migration needs to know: the chain this runtime runs and the tunables.
    pub fn set_migration(&mut self, chain: Option<String>, settings: MigrationSettings) {
        self.migrator = Migrator::new(self.me, chain, settings);
    }

    /// Milliseconds since the runtime started (the clock flows and functions see).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(nflib::time::mono_ns())
    }

    /// The monotonic clock's reading (ns) when the runtime started.
    pub fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    /// Milliseconds since the runtime started, at `now_ns` on the monotonic clock.
    pub fn ms_at(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.epoch_ns) / 1_000_000
    }

    pub fn stages(&self) -> &[Box<dyn Stage>] {
        &self.stages
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    pub fn me(&self) -> EndpointAddr {
        self.me
    }

    /// Processes a batch of packets (with the row each came from): parse and hash them all,
    /// then run the chains in order while loading the lines of the packets a few places
    /// ahead, so the cache misses of a large flow table overlap instead of following one
    /// another. A packet's index line is asked for `2 * AHEAD` packets before its chain
    /// runs, the actor and function states that line names `AHEAD` packets before.
    ///
    /// Why a distance and not whole passes (every index line of the burst, then every
    /// actor and state, then the chains, as this did until 2026-12-06): a burst asked for
    /// some 600 lines at once, far more than a core keeps in flight; the rest were dropped or
    /// queued, and the chains then waited on the actors' lines one by one. At a million
    /// flows, a third of the runtime's time was that wait (sampled with perf).
    pub fn process_batch<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        batch: &mut Vec<(u16, P)>,
        now_ms: u64,
    ) {
        let region = io.buffers();
        self.flows.step();
        if self.repl.enabled() {
            self.now_ns = io.now_ns();
        }
        let mut prepared = std::mem::take(&mut self.prepared);
        let mut pkts = std::mem::take(&mut self.prepared_pkts);
        for (from, mut pkt) in batch.drain(..) {
            let (route, saved_dst) = region.arrival(&pkt);
            // Packets from another server's vswitch come through nfmgr, which noted where.
            let vswitch = match route {
                Some(r) if from == MANAGER_SLOT => EndpointAddr::new(r.server, r.vswitch as u16),
                _ => EndpointAddr::new(self.me.server, from),
            };
            // The vswitch addressed the frame to us; put its own destination back.
            if let Some(orig) = saved_dst {
                let data = region.data_mut(&mut pkt);
                if data.len() >= 6 {
                    if data[..6] != self.mac {
                        io.count(ProcCounter::DropMisaddressed, 1);
                    }
                    data[..6].copy_from_slice(&orig);
                }
            }
            if self.stages.is_empty() {
                self.out.push(pkt);
                continue;
            }
            match nflib::packet::parse(region.data(&pkt)) {
                Ok(h) => {
                    let (key, sender) = FlowKey::of(&h);
                    let hash = self.flows.hash(&key);
                    pkts.push(pkt);
                    prepared.push(Prepared {
                        vswitch,
                        h,
                        key,
                        sender,
                        hash,
                    });
                }
                Err(e) => {
                    io.count(ProcCounter::of_parse_error(&e), 1);
                    io.free(pkt);
                }
            }
        }
        for p in prepared.iter().take(2 * AHEAD) {
            self.flows.prefetch_bucket(p.hash);
        }
        for p in prepared.iter().take(AHEAD) {
            self.prefetch_flow(p.hash);
        }
        for (i, pkt) in pkts.drain(..).enumerate() {
            if let Some(p) = prepared.get(i + 2 * AHEAD) {
                self.flows.prefetch_bucket(p.hash);
            }
            if let Some(p) = prepared.get(i + AHEAD) {
                self.prefetch_flow(p.hash);
            }
            self.run_prepared(io, &region, pkt, &prepared[i], now_ms, false);
        }
        prepared.clear();
        self.prepared = prepared;
        self.prepared_pkts = pkts;
    }

    /// Starts loading the actor and the function states of the flow whose key hashes to
    /// `hash` (its index line should be in cache by now).
    #[inline(always)]
    fn prefetch_flow(&self, hash: u64) {
        self.flows.prefetch_entry(hash);
    }

    /// Runs the chain on a parsed packet and sends it on; a packet of a migrating flow goes
    /// to the migrator first unless `force`.
    fn run_prepared<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        region: &I::Bufs,
        mut pkt: P,
        p: &Prepared,
        now_ms: u64,
        force: bool,
    ) {
        let Prepared {
            vswitch,
            ref h,
            ref key,
            sender,
            hash,
        } = *p;
        let len = region.len(&pkt);
        let mut force = force;
        loop {
            let result = {
                let room = region.room_mut(&mut pkt);
                match PacketMut::with_headers(room, len, *h) {
                    Ok(mut pm) => {
                        self.run_chain(io, vswitch, &mut pm, key, sender, hash, now_ms, force)
                    }
                    Err(_) => Ran::Dropped,
                }
            };
            match result {
                Ran::Dropped => io.free(pkt),
                Ran::Diverted(row, fkey) => {
                    let mark = self.flows.get(row).map_or(Mark::None, FlowActor::mark);
                    match self.migrator.on_packet(&fkey, mark) {
                        PacketAction::Process => {
                            force = true;
                            continue;
                        }
                        PacketAction::Hold => self.held.entry(row).or_default().push_back(pkt),
                        PacketAction::Forward { to, group, late } => {
                            let moved = self.moved_packet(region, &pkt, vswitch);
                            self.forwards.push((to, group, late, moved));
                            io.free(pkt);
                        }
                        PacketAction::Drop => {
                            io.count(ProcCounter::DropMigrationBuffer, 1);
                            io.free(pkt);
                        }
                    }
                }
                Ran::Done(verdict, new_len, (row, flow), wait, commit) => {
                    region.set_len(&mut pkt, new_len);
                    if verdict == Verdict::Drop {
                        io.free(pkt);
                        return;
                    }
                    if verdict == Verdict::SendBack {
                        let ingress = region.ingress_port(&pkt);
                        region.set_egress_port(&mut pkt, ingress);
                    }
                    match wait {
                        // Then, if it must, it waits for its replica (`flush`).
                        Some(epoch) => self.alias_commit.hold(epoch, row, flow, pkt),
                        None if commit => {
                            // Packets run from messages come outside a batch's clock.
                            let now_ns = if force { io.now_ns() } else { self.now_ns };
                            if let Some(p) = self.repl.hold(row, flow, pkt, now_ns) {
                                self.out.push(p);
                            }
                        }
                        None => self.out.push(pkt),
                    }
                }
            }
            return;
        }
    }

    /// Parses a packet that did not come through `process_batch` (held, or carried in a
    /// message). Frees it when it does not parse.
    fn prepare<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        region: &I::Bufs,
        pkt: P,
        vswitch: EndpointAddr,
    ) -> Option<(P, Prepared)> {
        match nflib::packet::parse(region.data(&pkt)) {
            Ok(h) => {
                let (key, sender) = FlowKey::of(&h);
                let hash = self.flows.hash(&key);
                Some((
                    pkt,
                    Prepared {
                        vswitch,
                        h,
                        key,
                        sender,
                        hash,
                    },
                ))
            }
            Err(_) => {
                io.count(ProcCounter::DropMalformed, 1);
                io.free(pkt);
                None
            }
        }
    }

    /// A packet as a message carries it to another runtime.
    fn moved_packet<B: Buffers<Pkt = P>>(
        &self,
        region: &B,
        pkt: &P,
        vswitch: EndpointAddr,
    ) -> MovedPacket {
        let (origin_server, origin_vswitch) = match region.route(pkt) {
            Some(r) => (r.server, r.vswitch),
            None => (vswitch.server, vswitch.slot as u8),
        };
        MovedPacket {
            ingress: region.ingress_port(pkt),
            egress: region.egress_port(pkt),
            origin_server,
            origin_vswitch,
            frame: region.data(pkt).to_vec(),
        }
    }

    /// Rebuilds a packet another runtime sent in a message and runs it (`force`: even if
    /// its flow is migrating, the packets a target returns precede those held here).
    fn run_moved<I: Io<Pkt = P>>(&mut self, io: &mut I, m: MovedPacket, now_ms: u64, force: bool) {
        let region = io.buffers();
        let Some(mut pkt) = io.alloc() else {
            io.count(ProcCounter::DropNoBuffer, 1);
            return;
        };
        if !region.fill(&mut pkt, &m.frame) {
            io.count(ProcCounter::DropTruncated, 1);
            io.free(pkt);
            return;
        }
        region.set_ingress_port(&mut pkt, m.ingress);
        region.set_egress_port(&mut pkt, m.egress);
        if m.origin_server != self.me.server {
            region.set_route(
                &pkt,
                Route {
                    server: m.origin_server,
                    vswitch: m.origin_vswitch,
                    egress: m.egress,
                    ingress: m.ingress,
                },
            );
        }
        let vswitch = EndpointAddr::new(m.origin_server, m.origin_vswitch as u16);
        if let Some((pkt, p)) = self.prepare(io, &region, pkt, vswitch) {
            self.run_prepared(io, &region, pkt, &p, now_ms, force);
        }
    }

    /// Handles a migration message (see `migration`); false if `msg` is not one.
    pub fn on_migration_message<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        from: EndpointAddr,
        msg: Message,
        now_ms: u64,
    ) -> bool {
        match msg {
            Message::MigratePackets { late, packets, .. } => {
                if late {
                    io.count(ProcCounter::MigrationLateStragglers, packets.len() as u64);
                }
                for m in packets {
                    self.run_moved(io, m, now_ms, !late);
                }
                true
            }
            m if m.is_migration() => {
                self.with_migrator(io, now_ms, |mig, host| {
                    mig.on_message(host, from, m, now_ms);
                });
                true
            }
            _ => false,
        }
    }

    /// Migration timers and the next groups of a running job; `dead` peers lost whatever
    /// they held of a migration.
    pub fn migration_tick<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        dead: &[EndpointAddr],
        now_ms: u64,
    ) {
        if !self.migrator.busy() && dead.is_empty() {
            return;
        }
        let clock = self.clock_ms();
        self.with_migrator(io, now_ms, |mig, host| {
            for d in dead {
                mig.peer_dead(host, *d, now_ms);
            }
            mig.tick(host, now_ms, clock);
        });
    }

    /// Makes room for `flows` flows about to arrive by migration (`PrepareMigration`): the
    /// flow slab and the flows' records, so that the first groups do not fault on memory
    /// while they are timed.
    /// At most `MAX_PREPARED_FLOWS`: a larger migration amortises its growth, and the
    /// work here holds up this loop.
    pub fn prepare_for(&mut self, flows: u32) {
        let n = (flows as usize).min(MAX_PREPARED_FLOWS);
        self.flows.reserve(n);
    }

    /// A new migration job scans the flow table from its start.
    pub fn restart_scan(&mut self) {
        self.pick_cursor = 0;
    }

    /// Milliseconds (fractional) on the runtime's clock, for migration reports.
    pub fn clock_ms(&self) -> f64 {
        nflib::time::mono_ns().saturating_sub(self.epoch_ns) as f64 / 1e6
    }

    /// Runs `f` with the migrator and the engine as its `FlowHost` (the migrator is moved
    /// out for the call, since the host borrows the rest of the runtime).
    fn with_migrator<I: Io<Pkt = P>, R>(
        &mut self,
        io: &mut I,
        now_ms: u64,
        f: impl FnOnce(&mut Migrator, &mut EngineHost<'_, I>) -> R,
    ) -> R {
        let idle = Migrator::new(self.me, None, *self.migrator.settings());
        let mut mig = std::mem::replace(&mut self.migrator, idle);
        let r = f(
            &mut mig,
            &mut EngineHost {
                rt: self,
                io,
                now_ms,
            },
        );
        self.migrator = mig;
        r
    }

    /// Finds or creates the flow and runs the chain.
    #[allow(clippy::too_many_arguments)]
    fn run_chain<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        from: EndpointAddr,
        pm: &mut PacketMut<'_>,
        key: &FlowKey,
        sender: Sender,
        hash: u64,
        now_ms: u64,
        force: bool,
    ) -> Ran {
        let now = now_ms as u32;
        let mut found = self.flows.find_hashed(key, hash);
        // A flow taken over from a dead runtime and not live yet: now it is.
        if found.is_none()
            && (!self.recovered.is_empty() || !self.parked.is_empty())
            && self.adopt_recovered_key(io, key, from, now_ms)
        {
            found = self.flows.find_hashed(key, hash);
        }
        // A SYN on a TCP flow that closed (FIN both ways, or RST) opens a new connection on
        // the same addresses and ports (a client reusing its port): the old flow ends, in
        // every function, and this packet starts a new one. Conntrack reopens a connection
        // in TIME_WAIT or CLOSE the same way (docs/FIREWALL.md).
        if let Some(Found::Key(s) | Found::Alias(s)) = found {
            let reopens = self
                .flows
                .get(s)
                .is_some_and(|a| a.has(flag::TCP) && a.closed() && !a.has(flag::MIGRATING))
                && pm.tcp_flags().is_some_and(|f| {
                    f & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
                        == tcp_flags::SYN
                });
            if reopens {
                self.end_flow(s, now_ms, Notify::VswitchBut(*key), EndReason::Done);
                io.count(ProcCounter::FlowsReopened, 1);
                found = None;
            }
        }
        // The direction: an alias names the reply direction, a new flow's first packet the
        // original one; under the flow's own key it depends on who opened the flow.
        let (row, new, known_dir) = match found {
            Some(Found::Key(s)) => (s, false, None),
            Some(Found::Alias(s)) => (s, false, Some(Dir::Reply)),
            None if self.migrator.gave_back(key, now_ms) => {
                // Sent here before the vswitch took the hand-back: the flow's state is
                // with the dead source's replica, which the next packets reach.
                io.count(ProcCounter::DropAwaitingRecovery, 1);
                return Ran::Dropped;
            }
            None => {
                let mut flags = 0;
                if sender == Sender::A {
                    flags |= flag::INITIATOR_IS_A;
                }
                let actor = FlowActor::new(*key, self.next_id, now, from, HERE, flags);
                let Some(s) = self.flows.insert(actor) else {
                    io.count(ProcCounter::DropFlowTableFull, 1);
                    // The vswitch forgets the key (it is no flow here): its next packet is
                    // dispatched afresh, maybe to a runtime with room, and a flood of new
                    // keys does not leave the vswitch an entry each until they idle out.
                    if self.ended.len() < EXPIRE_BATCH {
                        self.ended.push(Ended {
                            vswitch: from,
                            key: *key,
                            alias: false,
                            idle_ms: 0,
                        });
                    }
                    return Ran::Dropped;
                };
                self.next_id += 1;
                io.count(ProcCounter::FlowsCreated, 1);
                let deadline = now_ms + self.settings.unreplied_ms as u64;
                self.timers.arm(Entry { row: s, gen: 0 }, deadline);
                (s, true, Some(Dir::Original))
            }
        };
        // Platform-level flow tracking.
        let Some(actor) = self.flows.get_mut(row) else {
            return Ran::Dropped;
        };
        let dir = known_dir.unwrap_or(
            if (sender == Sender::A) == actor.has(flag::INITIATOR_IS_A) {
                Dir::Original
            } else {
                Dir::Reply
            },
        );
        if actor.has(flag::MIGRATING) && !force {
            return Ran::Diverted(row, actor.key);
        }
        actor.packets = actor.packets.wrapping_add(1);
        actor.last_ms = now;
        if dir == Dir::Reply {
            actor.flags |= flag::REPLIED;
        }
        if let Some(tf) = pm.tcp_flags() {
            let was_closed = actor.closed();
            actor.flags |= flag::TCP;
            if tf & tcp_flags::RST != 0 {
                actor.flags |= flag::RST;
            }
            if tf & tcp_flags::FIN != 0 {
                actor.flags |= if dir == Dir::Original {
                    flag::FIN_ORIG
                } else {
                    flag::FIN_REPLY
                };
            }
            if !was_closed && actor.closed() {
                actor.timer_gen = actor.timer_gen.wrapping_add(1);
                let e = Entry {
                    row,
                    gen: actor.timer_gen,
                };
                self.timers
                    .arm(e, now_ms + self.settings.closed_linger_ms as u64);
            }
        }
        let fkey = actor.key;
        let id = actor.id;
        let vswitch = actor.vswitch;
        let mut verdict = Verdict::Pass;
        let mut dropped_by = None;
        let mut ctx = NfContext::new(
            now_ms,
            dir,
            &fkey,
            id,
            &mut self.nf_counters,
            &mut self.aliases,
            &mut self.events,
        );
        for (i, stage) in self.stages.iter_mut().enumerate() {
            ctx.set_stage(i);
            match stage.process(self.flows.records_mut(), row, new, pm, &mut ctx) {
                Verdict::Pass => {}
                Verdict::Drop => {
                    dropped_by = Some(i);
                    verdict = Verdict::Drop;
                    break;
                }
                Verdict::SendBack => {
                    verdict = Verdict::SendBack;
                    break;
                }
            }
        }
        if let Some(i) = dropped_by {
            self.nf_counters[i][0] += 1;
        }
        let mut registered = false;
        if !self.aliases.is_empty() {
            match self.register_aliases(io, row, id, vswitch, now_ms) {
                Some(r) => registered = r,
                None => return Ran::Done(Verdict::Drop, pm.len(), (row, id), None, false),
            }
            if registered {
                self.repl.aliases_changed(row, id);
            }
        }
        // The packet changed the flow's state (or may have): its replica is to learn it.
        let commit = self.repl.touched(row, id, now_ms) && verdict != Verdict::Drop;
        let wait = if verdict == Verdict::Drop {
            None
        } else {
            self.alias_commit.hold_for(row, id, registered)
        };
        Ran::Done(verdict, pm.len(), (row, id), wait, commit)
    }

    /// Makes the keys the chain asked for (`self.aliases`) lead to flow `row` (`id`), to
    /// be told to its vswitch. Returns whether any is new, or `None` if the flow had to end:
    /// a key is another flow's alias here (two translations to one reply key; the packet is
    /// dropped and the newcomer ends, as when the vswitch refuses it). A key that is a
    /// stray flow's own (a reply that came before its translation was known, and started a
    /// flow of its own) is taken from it: that flow ends.
    fn register_aliases<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        row: u32,
        id: u64,
        vswitch: EndpointAddr,
        now_ms: u64,
    ) -> Option<bool> {
        let mut aliases = std::mem::take(&mut self.aliases);
        let mut registered = false;
        let mut refused = false;
        for &alias in &aliases {
            match self.flows.find(&alias) {
                None => {}
                Some(Found::Key(s) | Found::Alias(s)) if s == row => continue,
                Some(Found::Key(s))
                    if self.flows.get(s).is_some_and(|a| !a.has(flag::MIGRATING)) =>
                {
                    // The stray's key stays at the vswitch: it is this flow's now.
                    self.end_flow(s, now_ms, Notify::VswitchBut(alias), EndReason::Done);
                    io.count(ProcCounter::StraysTakenOver, 1);
                }
                Some(_) => {
                    refused = true;
                    break;
                }
            }
            if self.flows.add_alias(row, alias) {
                self.new_aliases.push((vswitch, alias, id));
                registered = true;
            }
        }
        aliases.clear();
        self.aliases = aliases;
        if refused {
            io.count(ProcCounter::AliasesRefused, 1);
            self.end_flow(row, now_ms, Notify::Vswitch, EndReason::Refused);
            return None;
        }
        Some(registered)
    }

    fn deadline(&self, a: &FlowActor, now_ms: u64) -> u64 {
        let wait = if a.closed() {
            self.settings.closed_linger_ms
        } else if !a.has(flag::REPLIED) {
            self.settings.unreplied_ms
        } else {
            self.settings.idle_ms
        };
        (now_ms + u64::from(wait)).saturating_sub(u64::from(ms_since(now_ms, a.last_ms)))
    }

    /// Ends the flows whose time has come (at most a batch per call).
    pub fn expire<I: Io<Pkt = P>>(&mut self, io: &mut I, now_ms: u64) {
        self.timers.advance(now_ms, &mut self.fired, EXPIRE_BATCH);
        let fired = std::mem::take(&mut self.fired);
        for e in &fired {
            let Some(a) = self.flows.get(e.row) else {
                continue;
            };
            if a.timer_gen != e.gen {
                continue; // re-armed since
            }
            // A migrating flow ends only once the migration is over.
            let deadline = if a.has(flag::MIGRATING) {
                now_ms + 1000
            } else {
                self.deadline(a, now_ms)
            };
            if deadline > now_ms {
                self.timers.arm(*e, deadline);
                continue;
            }
            self.end_flow(e.row, now_ms, Notify::Vswitch, EndReason::Done);
            io.count(ProcCounter::FlowsExpired, 1);
        }
        self.fired = fired;
        self.fired.clear();
    }

    fn end_flow(&mut self, row: u32, now_ms: u64, notify: Notify, reason: EndReason) {
        let Some(a) = self.flows.get(row) else {
            return;
        };
        let key = a.key;
        let id = a.id;
        let home = a.home;
        let idle_ms = ms_since(now_ms, a.last_ms);
        self.repl.ended(row, id);
        if home != HERE && notify != Notify::Nobody {
            // Its resources are its home's: free them there.
            let (stages, records) = (&self.stages, self.flows.records());
            self.holds.push(self.homes.addr(home), false, |out| {
                write_states(stages, records, row, out)
            });
        }
        // Aliases it registered that the vswitch has not been told of stay untold.
        if !self.new_aliases.is_empty() {
            self.new_aliases.retain(|(_, _, f)| *f != id);
        }
        let mut ctx = NfContext::new(
            now_ms,
            Dir::Original,
            &key,
            id,
            &mut self.nf_counters,
            &mut self.aliases,
            &mut self.events,
        );
        ctx.set_end_reason(reason);
        for (i, stage) in self.stages.iter_mut().enumerate() {
            ctx.set_stage(i);
            stage.end_flow(self.flows.records_mut(), row, &mut ctx);
        }
        self.aliases.clear();
        let Some((a, aliases)) = self.flows.remove(row) else {
            return;
        };
        let keep = match notify {
            Notify::Nobody => return,
            Notify::Vswitch => None,
            Notify::VswitchBut(k) => Some(k),
        };
        let vswitch = a.vswitch;
        if keep != Some(a.key) {
            self.ended.push(Ended {
                vswitch,
                key: a.key,
                // A key given up while the flow lives on under another is not a matter of
                // idleness.
                alias: keep.is_some(),
                idle_ms,
            });
        }
        for k in aliases.into_iter().filter(|k| keep != Some(*k)) {
            self.ended.push(Ended {
                vswitch,
                key: k,
                alias: true,
                idle_ms,
            });
        }
    }

    /// Ends every flow (the runtime is stopping): functions write their last records, and
    /// the packets still held go back to the pool.
    pub fn end_all<I: Io<Pkt = P>>(&mut self, io: &mut I) {
        let now = self.ms_at(io.now_ns());
        for row in self.flows.rows() {
            self.end_flow(row, now, Notify::Nobody, EndReason::Stopping);
        }
        self.new_aliases.clear();
        self.ended.clear();
        for p in self.alias_commit.drain() {
            io.free(p);
        }
        for (_, q) in self.held.drain() {
            for p in q {
                io.free(p);
            }
        }
        for p in self.repl.drain() {
            io.free(p);
        }
        self.recovered.clear();
        self.parked = Copies::default();
        for p in self.out.drain(..) {
            io.free(p);
        }
    }

    /// Sends what processing produced: messages first (so aliases are known before the
    /// packets that need them), then packets to nfmgr.
    pub fn flush<I: Io<Pkt = P>>(&mut self, io: &mut I, now_ns: u64) {
        // One message per vswitch: a batch of new NAT flows costs a frame or two, not one
        // each. Ended flows first: a key a flow gave up may be a new flow's alias in the same
        // flush (a NAT port freed and handed out again).
        if !self.ended.is_empty() {
            let mut ended = std::mem::take(&mut self.ended);
            // Keys of no idleness (flows refused for a full table, or just closed) go in a
            // message of their own: the least idle key of a message bounds which recent
            // packets keep a key, and one of them would make it none for the others.
            ended.sort_by_key(|e| (e.vswitch, e.idle_ms == 0));
            for group in ended
                .chunk_by(|a, b| a.vswitch == b.vswitch && (a.idle_ms == 0) == (b.idle_ms == 0))
            {
                let (aliases, keys): (Vec<&Ended>, Vec<&Ended>) =
                    group.iter().partition(|e| e.alias);
                let m = Message::FlowEnded {
                    keys: keys.iter().map(|e| e.key).collect(),
                    aliases: aliases.iter().map(|e| e.key).collect(),
                    // The least idle flow of the group bounds what counts as a new packet.
                    idle_ms: keys.iter().map(|e| e.idle_ms).min().unwrap_or(0),
                };
                if io.send(group[0].vswitch, LIAISON, LIAISON, &m).is_err() {
                    io.count(ProcCounter::ActorSendRefused, 1);
                }
            }
            ended.clear();
            self.ended = ended;
        }
        if !self.new_aliases.is_empty() {
            // An answer is asked for only if a packet waits for it.
            let epoch = self.alias_commit.open();
            let mut to = Vec::new();
            self.new_aliases.sort_by_key(|(vs, _, _)| *vs);
            for group in self.new_aliases.chunk_by(|a, b| a.0 == b.0) {
                let m = Message::AddAliases {
                    aliases: group.iter().map(|(_, k, id)| (*k, *id)).collect(),
                    request: epoch.unwrap_or(0),
                };
                if io.send(group[0].0, LIAISON, LIAISON, &m).is_ok() {
                    to.push(group[0].0);
                } else {
                    io.count(ProcCounter::ActorSendRefused, 1);
                }
            }
            if let Some(epoch) = epoch {
                self.alias_commit.sent(epoch, to, now_ns);
            }
            self.new_aliases.clear();
        }
        self.adopt_recovered(io);
        for (home, m) in self.holds.drain() {
            if self.paced.push(home, LIAISON, LIAISON, &m).is_err() {
                io.count(ProcCounter::ActorSendRefused, 1);
            }
        }
        self.send_paced(io);
        // Packets whose aliases the vswitches confirmed first: under output commit they then
        // wait for this flush's replication, not the next one's.
        self.release_held_aliases(io, now_ns);
        if self.repl.enabled() {
            self.now_ns = now_ns;
            if crate::failpoint::armed() && self.repl.busy() {
                let region = io.buffers();
                let held = self
                    .repl
                    .held()
                    .filter(|(_, sent)| !sent)
                    .map(|(p, _)| region.data(p));
                crate::failpoint::replicate_crash(self.me.slot, self.ms_at(now_ns), held);
            }
            self.replicate(io, now_ns);
        }
        if self.repl.busy() {
            self.repl.release(now_ns, &mut self.out);
        }
        if !self.forwards.is_empty() {
            // Late stragglers, one message per (runtime, group); after the state they follow.
            let mut fw = std::mem::take(&mut self.forwards);
            // Stable: packets of one flow keep their order.
            fw.sort_by_key(|(to, g, late, _)| (*to, *g, *late));
            let mut it = fw.drain(..).peekable();
            while let Some((to, group, late, first)) = it.next() {
                let mut packets = vec![first];
                while let Some((_, _, _, p)) =
                    it.next_if(|(t, g, l, _)| *t == to && *g == group && *l == late)
                {
                    packets.push(p);
                }
                let m = Message::MigratePackets {
                    group,
                    late,
                    packets,
                };
                if io.send(to, LIAISON, LIAISON, &m).is_err() {
                    io.count(ProcCounter::ActorSendRefused, 1);
                }
            }
            drop(it);
            self.forwards = fw;
        }
        io.transmit(now_ns);
        if !self.out.is_empty() {
            if let Some((egress, ingress)) = crate::failpoint::armed()
                .then(crate::failpoint::misroute)
                .flatten()
            {
                let region = io.buffers();
                for p in &mut self.out {
                    region.set_egress_port(p, egress);
                    if let Some(i) = ingress {
                        region.set_ingress_port(p, i);
                    }
                }
            }
            io.send_burst(MANAGER_SLOT, &mut self.out);
        }
    }

    /// Lets the functions reserve what the flow in `row`, just installed here, holds of
    /// this runtime's share (`holds`).
    fn reserve_here(&mut self, row: u32, now_ms: u64) {
        let Some(a) = self.flows.get(row) else {
            return;
        };
        let (key, id) = (a.key, a.id);
        let mut ctx = NfContext::new(
            now_ms,
            Dir::Original,
            &key,
            id,
            &mut self.nf_counters,
            &mut self.aliases,
            &mut self.events,
        );
        for (i, stage) in self.stages.iter_mut().enumerate() {
            ctx.set_stage(i);
            stage.reserve(self.flows.records(), row, &mut ctx);
        }
        self.aliases.clear();
    }

    /// Applies a `Holds` from `from`: flows this runtime (or an earlier life of it) started
    /// live there (reserve what they hold of this runtime's share) or ended there (free
    /// it). A malformed part ends the reading, counted.
    pub fn on_holds<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        flows: &[(bool, u32)],
        states_buf: &[u8],
    ) {
        let now_ms = self.ms_at(io.now_ns());
        let (key, _) = FlowKey::from_tuple(0, 0, 0, ([0; 16], 0), ([0; 16], 0));
        let mut ctx = NfContext::new(
            now_ms,
            Dir::Original,
            &key,
            0,
            &mut self.nf_counters,
            &mut self.aliases,
            &mut self.events,
        );
        let mut malformed = false;
        'flows: for part in holds::parts(flows, states_buf) {
            let Ok((reserve, part)) = part else {
                malformed = true;
                break;
            };
            let mut reader = states::Reader::new(part);
            for (i, stage) in self.stages.iter_mut().enumerate() {
                ctx.set_stage(i);
                match reader.next_state() {
                    Ok(Some(bytes)) => {
                        if stage.reserve_serialised(bytes, reserve, &mut ctx).is_err() {
                            malformed = true;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => {
                        malformed = true;
                        break 'flows;
                    }
                }
            }
        }
        self.aliases.clear();
        if malformed {
            io.count(ProcCounter::HoldsMalformed, 1);
        }
    }

    /// Vswitch `from` has just started and asks which flows it feeds are here
    /// (`FeedQuery`): their keys and aliases, in messages of at most `FEED_CHUNK` keys, the
    /// last one marked done. Only the asker's own flows: a vswitch learns nothing of
    /// others'.
    pub fn on_feed_query<I: Io<Pkt = P>>(&mut self, io: &mut I, from: EndpointAddr, request: u64) {
        const FEED_CHUNK: usize = 16_384;
        let mut keys = Vec::new();
        let mut aliases = Vec::new();
        let paced = &mut self.paced;
        let mut send = |keys: &mut Vec<FlowKey>, aliases: &mut Vec<FlowKey>, done: bool| {
            let m = Message::Feeds {
                request,
                keys: std::mem::take(keys),
                aliases: std::mem::take(aliases),
                done,
            };
            // Paced: a million flows' keys are more than the transport queues at once.
            if paced.push(from, LIAISON, LIAISON, &m).is_err() {
                io.count(ProcCounter::ActorSendRefused, 1);
            }
        };
        for row in self.flows.live_rows() {
            let Some(a) = self.flows.get(row) else {
                continue;
            };
            if a.vswitch != from {
                continue;
            }
            keys.push(a.key);
            aliases.extend(self.flows.aliases_of(row));
            if keys.len() + aliases.len() >= FEED_CHUNK {
                send(&mut keys, &mut aliases, false);
            }
        }
        send(&mut keys, &mut aliases, true);
        self.send_paced(io);
    }

    /// Hands the paced messages the transport has room for to it.
    fn send_paced<I: Io<Pkt = P>>(&mut self, io: &mut I) {
        if !self.paced.is_empty() {
            let lost = self.paced.send(io);
            io.count(ProcCounter::ActorSendRefused, lost);
        }
    }

    /// `from` has just started and asks for the flows its earlier lives started that live
    /// here (`HoldsQuery`): each is sent to be reserved there.
    pub fn on_holds_query(&mut self, from: EndpointAddr) {
        let Some(home) = self.homes.find(from).filter(|&h| h != HERE) else {
            return;
        };
        let (stages, records) = (&self.stages, self.flows.records());
        for row in self.flows.rows() {
            if self.flows.get(row).is_some_and(|a| a.home == home) {
                self.holds
                    .push(from, true, |out| write_states(stages, records, row, out));
            }
        }
    }

    /// Applies a `Replicate` from primary `from` and answers it.
    #[allow(clippy::too_many_arguments)]
    pub fn on_replicate<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        from: EndpointAddr,
        incarnation: u64,
        version: u64,
        flows: &[nflib::msg::ReplicaFlow],
        states_buf: &[u8],
        ended: &[u64],
    ) {
        let now_ms = self.ms_at(io.now_ns());
        let answer =
            self.replica
                .apply(from, incarnation, version, flows, states_buf, ended, now_ms);
        if let Some(m) = answer {
            if io.send(from, LIAISON, LIAISON, &m).is_err() {
                io.count(ProcCounter::ActorSendRefused, 1);
            }
        }
    }

    /// Takes over the flows this runtime holds copies of for `failed`'s lives up to
    /// `incarnation` (`Recover`): every vswitch that fed them is asked at once to send them
    /// (keys and aliases) here instead of to `failed`, and each becomes a live flow here
    /// with its functions' states, in the background or when its first packet comes
    /// (`adopt_recovered`; a copy that turns out not installable is reported then).
    /// Returns the flows taken over and the re-pointing messages sent (each is answered
    /// with `RuntimeSet` carrying `request`).
    pub fn recover<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        failed: EndpointAddr,
        incarnation: u64,
        request: u64,
    ) -> (usize, usize) {
        // Flows `failed` was migrating here whose state never came go back to it at the
        // vswitch before this takeover's request (same path, so in order), which then
        // moves them here with the rest: the takeover cannot find them here first.
        let now_ms = self.ms_at(io.now_ns());
        self.with_migrator(io, now_ms, |mig, host| {
            mig.source_died(host, failed, now_ms)
        });
        let promoted = self.replica.promote(failed, incarnation);
        let flows = promoted.len();
        // Few vswitches, many keys: grouped in one pass over the key index (compact, and it
        // names each key's vswitch), without sorting.
        let mut by_vswitch: Vec<(EndpointAddr, Vec<FlowKey>)> = Vec::new();
        for (k, &(_, vswitch)) in &promoted.keys {
            let i = match by_vswitch.iter().position(|(v, _)| *v == vswitch) {
                Some(i) => i,
                None => {
                    by_vswitch.push((vswitch, Vec::new()));
                    by_vswitch.len() - 1
                }
            };
            by_vswitch[i].1.push(*k);
        }
        if !promoted.is_empty() {
            self.recovered.push(promoted);
        }
        let mut sent = 0;
        // Every hop of the re-pointing's messages would otherwise start with a wake-up.
        let awake = io.now_ns().saturating_add(REPOINT_AWAKE_NS);
        io.keep_awake(self.me.slot, awake);
        for (vswitch, keys) in by_vswitch {
            io.keep_awake(self.slot_toward(vswitch), awake);
            // A message is at most 4 MiB; a key takes about 40 bytes. A million keys are
            // more than the transport queues at once: they go paced.
            for chunk in keys.chunks(16_384) {
                let m = Message::SetRuntime {
                    keys: chunk.to_vec(),
                    from: failed,
                    runtime: self.me,
                    request,
                };
                if self.paced.push(vswitch, LIAISON, LIAISON, &m).is_err() {
                    io.count(ProcCounter::ActorSendRefused, 1);
                } else {
                    sent += 1;
                }
            }
        }
        self.send_paced(io);
        if flows > 0 {
            eprintln!(
                "nf-runtime {}: took over {flows} flows of {failed} (re-pointing them; each \
                 made live in the background or at its first packet)",
                self.me
            );
        }
        (flows, sent)
    }

    /// A takeover's vswitch did not move these keys here: it knows no such key, or gives it
    /// to a third runtime (a migration moved the flow away before its source died, and the
    /// source's replica still had its copy). The copies they are the keys of are not this
    /// runtime's to make live in the background: made live, they would sit idle here and,
    /// ending, free resources their real owner still holds. They are parked for
    /// `TAKEOVER_PARK_NS`: the third runtime, should the migration's state never have
    /// reached it, gives the keys back and the vswitch sends them here (`hand_back`); then
    /// each is made live at its first packet. The rest are dropped then, counted
    /// `recovered_not_ours`. (One already made live, when the answer came after the 1 s
    /// wait, is left to end.)
    pub fn drop_unmoved<I: Io<Pkt = P>>(&mut self, io: &mut I, keys: &[FlowKey]) {
        if !keys.is_empty() {
            self.parked_until_ns = io.now_ns().saturating_add(TAKEOVER_PARK_NS);
        }
        for k in keys {
            let Some(i) = self.recovered.iter().position(|c| {
                c.keys
                    .get(k)
                    .is_some_and(|&(id, _)| c.flows.get(&id).is_some_and(|a| a.key == *k))
            }) else {
                continue;
            };
            if let Some(a) = self.recovered[i].take_by_key(k) {
                self.parked_ids += 1;
                if self.parked.put(self.parked_ids, a).is_err() {
                    io.count(ProcCounter::RecoveredNotOurs, 1);
                }
            }
            if self.recovered[i].is_empty() {
                self.recovered.swap_remove(i);
            }
        }
    }

    /// The vswitch `from` gave this runtime keys of parked copies (their migration's
    /// target gave them back): those copies, of flows `from` feeds, are made live like
    /// any taken over.
    pub fn unpark<I: Io<Pkt = P>>(&mut self, io: &mut I, from: EndpointAddr, keys: &[FlowKey]) {
        let mut given = Copies::default();
        for k in keys {
            if self.parked.keys.get(k).is_none_or(|&(_, v)| v != from) {
                continue;
            }
            if let Some(a) = self.parked.take_by_key(k) {
                self.parked_ids += 1;
                if given.put(self.parked_ids, a).is_err() {
                    io.count(ProcCounter::RecoveredNotOurs, 1);
                }
            }
        }
        if !given.is_empty() {
            self.recovered.push(given);
        }
    }

    /// Drops the parked copies whose time is up (none was given back).
    fn expire_parked<I: Io<Pkt = P>>(&mut self, io: &mut I) {
        if !self.parked.is_empty() && io.now_ns() >= self.parked_until_ns {
            io.count(ProcCounter::RecoveredNotOurs, self.parked.len() as u64);
            self.parked = Copies::default();
        }
    }

    /// Makes the taken-over flow under `key` (its own or an alias) live, if there is one;
    /// true if it is live now. `vswitch` sent the packet that asks.
    fn adopt_recovered_key<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        key: &FlowKey,
        vswitch: EndpointAddr,
        now_ms: u64,
    ) -> bool {
        let Some(i) = self.recovered.iter().position(|c| c.keys.contains_key(key)) else {
            // A parked copy given back by a migration's target: its packets come from the
            // vswitch that fed it.
            if self.parked.keys.get(key).is_none_or(|&(_, v)| v != vswitch) {
                return false;
            }
            let Some(a) = self.parked.take_by_key(key) else {
                return false;
            };
            let ok = self.adopt(io, a, now_ms).is_some();
            if !ok {
                self.recovered_lost += 1;
            }
            return ok;
        };
        let Some(a) = self.recovered[i].take_by_key(key) else {
            return false;
        };
        self.adopt_copy(io, i, a, now_ms)
    }

    /// Makes copy `a`, just taken out of `self.recovered[i]`, a live flow.
    fn adopt_copy<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        i: usize,
        a: ReplicaActor,
        now_ms: u64,
    ) -> bool {
        let ok = self.adopt(io, a, now_ms).is_some();
        if !ok {
            self.recovered_lost += 1;
        }
        if self.recovered[i].is_empty() {
            self.recovered.swap_remove(i);
        }
        if self.recovered.is_empty() && self.recovered_lost > 0 {
            eprintln!(
                "nf-runtime {}: {} recovered flows could not be installed (malformed state, \
                 or no room)",
                self.me, self.recovered_lost
            );
            self.recovered_lost = 0;
        }
        ok
    }

    /// Makes up to `ADOPT_PER_LOOP` taken-over flows live (the rest wait for the next loop
    /// or for their first packet).
    pub fn adopt_recovered<I: Io<Pkt = P>>(&mut self, io: &mut I) {
        self.expire_parked(io);
        if self.repointing {
            return;
        }
        let Some(c) = self.recovered.last() else {
            return;
        };
        // One pass over the table per loop: picking one id at a time would scan the
        // emptied front of the table again for every flow.
        let ids: Vec<u64> = c.flows.keys().take(ADOPT_PER_LOOP).copied().collect();
        let now_ms = self.ms_at(io.now_ns());
        for id in ids {
            let Some(i) = self.recovered.len().checked_sub(1) else {
                break;
            };
            if let Some(a) = self.recovered[i].take(id) {
                self.adopt_copy(io, i, a, now_ms);
            }
        }
    }

    /// The local slot that carries messages to `peer`: its own on this server; another
    /// server's endpoints are reached through this server's nfmgr.
    fn slot_toward(&self, peer: EndpointAddr) -> u16 {
        slot_toward(self.me, peer)
    }

    /// Makes a replica copy a live flow here (with its aliases); `None` if it cannot be
    /// installed (malformed state, or no room).
    fn adopt<I: Io<Pkt = P>>(&mut self, io: &mut I, a: ReplicaActor, now_ms: u64) -> Option<()> {
        // A flow here under the key already is a stray: the vswitch gave this runtime a
        // packet of the dead runtime's flow before it was re-pointed, and a fresh flow with
        // no state was made of it. The copy knows better.
        // But a flow that came here from elsewhere (its home is another runtime: a migration
        // from the dead runtime installed it just before it died, too late to tell its
        // replica to forget it) is newer than the copy: the copy goes.
        if let Some(Found::Key(s) | Found::Alias(s)) = self.flows.find(&a.key) {
            match self.flows.get(s) {
                Some(f) if f.home != HERE && !f.has(flag::MIGRATING) => {
                    io.count(ProcCounter::RecoveredNotOurs, 1);
                    return Some(());
                }
                Some(f) if !f.has(flag::MIGRATING) => {
                    self.end_flow(s, now_ms, Notify::Nobody, EndReason::Done);
                    io.count(ProcCounter::StraysTakenOver, 1);
                }
                _ => return None,
            }
        }
        let now = now_ms as u32;
        let mut actor = FlowActor::new(
            a.key,
            self.next_id,
            now.wrapping_sub(
                u32::try_from(now_ms.saturating_sub(a.created_ms)).unwrap_or(u32::MAX),
            ),
            a.vswitch,
            self.homes.index(a.home),
            a.flags & !(flag::LIVE | flag::MIGRATING),
        );
        actor.last_ms = now;
        let row = self.flows.insert(actor)?;
        self.next_id += 1;
        let mut ok = true;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            if let Some(Some(bytes)) = a.states.get(i) {
                if stage.restore(self.flows.records_mut(), row, bytes).is_err() {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            for s in self.stages.iter_mut() {
                s.discard(self.flows.records_mut(), row);
            }
            self.flows.remove(row);
            return None;
        }
        for al in &a.aliases {
            if let Some(Found::Key(s) | Found::Alias(s)) = self.flows.find(al) {
                if s != row {
                    self.end_flow(s, now_ms, Notify::Nobody, EndReason::Done);
                    io.count(ProcCounter::StraysTakenOver, 1);
                }
            }
            self.flows.add_alias(row, *al);
        }
        self.reserve_here(row, now_ms);
        if a.home != self.me {
            // Its home may be the dead runtime's new life, whose functions know nothing of
            // it: what it holds there stays reserved while it lives here.
            self.holds.push(a.home, true, |out| {
                for s in &a.states {
                    states::push(out, |out| match s {
                        Some(bytes) => {
                            out.extend_from_slice(bytes);
                            true
                        }
                        None => false,
                    });
                }
            });
        }
        let f = self.flows.get(row)?;
        let id = f.id;
        // Protected again at once, whole, not at its next packet.
        self.repl.protect(row, id);
        let f = self.flows.get(row)?;
        let deadline = self.deadline(f, now_ms);
        self.timers
            .arm(Entry { row, gen: 0 }, deadline.max(now_ms + 1));
        Some(())
    }

    /// Writes the flows whose packets ran since the last flush to their replicas' batches
    /// (the functions' states that changed) and sends one message per replica.
    fn replicate<I: Io<Pkt = P>>(&mut self, io: &mut I, now_ns: u64) {
        let now_ms = self.ms_at(io.now_ns());
        self.repl.tick(now_ms);
        if self.repl.has_dirty() {
            let dirty = self.repl.take_dirty();
            let (flows, stages, homes) = (&self.flows, &self.stages, &self.homes);
            for &row in &dirty {
                let Some(id) = self.repl.dirty_id(row) else {
                    continue;
                };
                let Some(a) = flows.get(row).filter(|a| a.id == id) else {
                    continue;
                };
                let meta = FlowMeta {
                    key: a.key,
                    vswitch: a.vswitch,
                    home: homes.addr(a.home),
                    flags: a.flags & !(flag::LIVE | flag::MIGRATING),
                    packets: a.packets,
                    age_ms: ms_since(now_ms, a.created_ms),
                };
                self.repl.write_flow(
                    row,
                    now_ms,
                    &meta,
                    &|| flows.aliases_of(row),
                    &mut |i, out| stages[i].save_into(flows.records(), row, out),
                );
            }
            self.repl.return_dirty(dirty);
        }
        self.repl.flush(now_ns);
        let commit = self.repl.mode() == replication::Mode::OutputCommit;
        let me = self.me;
        self.repl.transmit(now_ns, &mut |to, m| {
            // Without encoding a message that cannot fit now (a congested link is tried
            // at every turn of the loop): its states and ended ids alone need this much.
            if let Message::Replicate { states, ended, .. } = m {
                // (One too large for any queue is left to `send` to refuse.)
                let least = states.len() + ended.len() * 8;
                if least <= nflib::frame::MAX_MESSAGE && io.room(to) < io.frames_for(least) {
                    return replication::Sent::Full;
                }
            }
            match io.send(to, LIAISON, LIAISON, m) {
                Ok(()) => {
                    if commit {
                        // Output waits for the answer: neither side should pay a
                        // wake-up from its doorbell sleep for it (hundreds of
                        // microseconds on a VM whose idle vCPU halts). Both poll,
                        // yielding, for a moment; renewed by every message.
                        let until = now_ns.saturating_add(REPL_KEEP_AWAKE_NS);
                        io.keep_awake(slot_toward(me, to), until);
                        io.keep_awake(me.slot, until);
                    }
                    replication::Sent::Taken
                }
                Err(SendError::QueueFull) => replication::Sent::Full,
                Err(_) => {
                    io.count(ProcCounter::ActorSendRefused, 1);
                    replication::Sent::Refused
                }
            }
        });
    }

    /// Moves packets whose alias epoch is over on (dropping those of flows whose alias was
    /// refused): to the output, or to wait for their replica under output commit.
    fn release_held_aliases<I: Io<Pkt = P>>(&mut self, io: &mut I, now_ns: u64) {
        if !self.alias_commit.busy() {
            return;
        }
        let mut dropped = Vec::new();
        let (out, repl) = (&mut self.out, &mut self.repl);
        let commit = repl.mode() == replication::Mode::OutputCommit;
        self.alias_commit.release_to(
            now_ns,
            &mut |row, flow, p| {
                if !commit {
                    out.push(p);
                } else if let Some(p) = repl.hold(row, flow, p, now_ns) {
                    out.push(p);
                }
            },
            &mut dropped,
        );
        for p in dropped {
            io.free(p);
        }
    }

    /// Vswitch `from` answered alias request `request` (0: none was asked for); `refused`
    /// are keys that are another runtime's aliases, with the flows that asked for them. Such
    /// a flow's held packets are dropped and it ends: its replies would reach the other
    /// flow. (A flow migrating away is left to finish moving; the vswitch keeps the key with
    /// its owner all the same.) A refusal for a flow that has ended since changes nothing.
    pub fn on_aliases_added<I: Io<Pkt = P>>(
        &mut self,
        io: &mut I,
        from: EndpointAddr,
        request: u64,
        refused: &[(FlowKey, u64)],
        now_ms: u64,
    ) {
        for &(k, flow) in refused {
            let Some(Found::Alias(row)) = self.flows.find(&k) else {
                continue;
            };
            let Some(a) = self.flows.get(row).filter(|a| a.id == flow) else {
                continue;
            };
            let migrating = a.has(flag::MIGRATING);
            self.alias_commit.refuse(flow);
            io.count(ProcCounter::AliasesRefused, 1);
            if !migrating {
                // Forget every key but the refused one, which is another runtime's.
                self.end_flow(row, now_ms, Notify::VswitchBut(k), EndReason::Refused);
            }
        }
        if request != 0 {
            self.alias_commit.answered(request, from);
        }
    }

    /// When the loop must run again even with nothing to receive (an alias epoch's
    /// deadline), in nanoseconds of `nflib::time::mono_ns`.
    pub fn next_wake_ns(&self, now_ns: u64) -> Option<u64> {
        if !self.recovered.is_empty() {
            // Taken-over flows wait to be made live: no sleeping.
            return Some(0);
        }
        if !self.paced.is_empty() {
            // The acknowledgements that make room wake the loop; this is a backstop.
            return Some(now_ns.saturating_add(1_000_000));
        }
        let mut a = self.alias_commit.next_deadline();
        if !self.parked.is_empty() {
            a = Some(a.map_or(self.parked_until_ns, |a| a.min(self.parked_until_ns)));
        }
        match self.repl.next_deadline_ns() {
            Some(r) => Some(a.map_or(r, |a| a.min(r))),
            None => a,
        }
    }

    /// Publishes flow counters and the functions' statistics.
    pub fn publish<I: Io<Pkt = P>>(&mut self, io: &mut I) {
        let live = self.flows.len() as u64;
        let dropped = self.events.dropped;
        io.set_count(ProcCounter::FlowsActive, live);
        io.set_count(ProcCounter::EventsDropped, dropped);
        let m = self.migrator.counters;
        io.set_count(ProcCounter::MigratedOut, m.flows_out);
        io.set_count(ProcCounter::MigratedIn, m.flows_in);
        io.set_count(ProcCounter::MigrationRolledBack, m.rolled_back);
        io.set_count(ProcCounter::MigrationHeld, m.held);
        io.set_count(ProcCounter::MigrationStraysEnded, m.strays_ended);
        io.set_count(ProcCounter::MigrationGroupsMismatched, m.groups_mismatched);
        io.set_count(ProcCounter::MigrationHandedBack, m.flows_handed_back);
        let a = self.alias_commit.counters;
        io.set_count(ProcCounter::AliasesHeld, a.held);
        io.set_count(ProcCounter::AliasCommitTimeouts, a.timeouts);
        let r = self.repl.counters;
        io.set_count(ProcCounter::ReplMessages, r.messages);
        io.set_count(ProcCounter::ReplStateBytes, r.state_bytes);
        io.set_count(ProcCounter::ReplHeld, r.held);
        io.set_count(ProcCounter::ReplUnprotected, r.unprotected);
        io.set_count(ProcCounter::ReplRefused, r.refused);
        io.set_count(ProcCounter::ReplFlowsMoved, r.moved);
        io.set_count(ProcCounter::ReplCongested, r.congested);
        io.set_count(ProcCounter::ReplLagUs, r.last_lag_ns / 1000);
        io.set_count(ProcCounter::ReplUnprotectedUs, r.last_unprotected_ns / 1000);
        let rc = self.replica.counters;
        io.set_count(ProcCounter::ReplicaFlows, self.replica.len() as u64);
        io.set_count(ProcCounter::ReplicaRefused, rc.refused);
        io.set_count(ProcCounter::ReplicaMalformed, rc.malformed);
        io.set_count(ProcCounter::FlowsRecovered, rc.promoted);
        for (i, counters) in self.nf_counters.iter().enumerate() {
            io.publish_nf(i, counters);
        }
    }

    /// Names the functions in the region's statistics (once, at start).
    pub fn label_stats(&self, ep: &nflib::endpoint::Endpoint) {
        for (i, s) in self.stages.iter().enumerate() {
            if let Some(rec) = ep.region().nf_stats(ep.slot(), i) {
                rec.kind.set(s.kind());
                rec.set_labels(s.counter_names());
            }
        }
    }

    /// Bytes of platform memory held for flows (table, actors, timers), excluding the
    /// functions' own state.
    pub fn platform_memory(&self) -> usize {
        self.flows.memory() + self.timers.len() * std::mem::size_of::<Entry>()
    }

    /// Bytes held by the functions' per-flow states.
    pub fn state_memory(&self) -> usize {
        self.flows.state_memory()
    }
}

/// The runtime as migration sees it (`migration::FlowHost`): flows, held packets, messages.
struct EngineHost<'a, I: Io> {
    rt: &'a mut Runtime<I::Pkt>,
    io: &'a mut I,
    now_ms: u64,
}

impl<I: Io> EngineHost<'_, I> {
    fn row_of(&self, key: &FlowKey) -> Option<u32> {
        match self.rt.flows.find(key)? {
            Found::Key(s) => Some(s),
            Found::Alias(_) => None,
        }
    }

    /// The row of a flow migration names: its hint when that row still holds the key
    /// (no hash probe), else a lookup.
    fn row_at(&self, f: &FlowRef) -> Option<u32> {
        match self.rt.flows.get(f.row) {
            Some(a) if a.key == f.key => Some(f.row),
            _ => self.row_of(&f.key),
        }
    }

    fn aliases_of(&self, row: u32) -> Vec<FlowKey> {
        self.rt.flows.aliases_of(row)
    }
}

impl<I: Io> FlowHost for EngineHost<'_, I> {
    fn keep_awake(&mut self, peer: EndpointAddr) {
        // A few steps' worth (`keep_awake_us`), renewed by every message of the migration.
        // (While the migrator works, `rt.migrator` is its stand-in with the same settings.)
        // Saturating: the setting comes from the configuration, unbounded.
        let keep_ns = self
            .rt
            .migrator
            .settings()
            .keep_awake_us
            .saturating_mul(1000);
        if keep_ns == 0 {
            return;
        }
        let until = self.io.now_ns().saturating_add(keep_ns);
        self.io.keep_awake(self.rt.slot_toward(peer), until);
    }

    fn pick(&mut self, n: usize, out: &mut Vec<Candidate>) -> bool {
        let end = self.rt.flows.slab_len() as u32;
        while self.rt.pick_cursor < end && out.len() < n {
            let row = self.rt.pick_cursor;
            self.rt.pick_cursor += 1;
            let Some(a) = self.rt.flows.get(row) else {
                continue;
            };
            // A flow whose packets wait for its aliases to be confirmed moves once they are.
            if a.has(flag::MIGRATING) || a.closed() || self.rt.alias_commit.is_waiting(row, a.id) {
                continue;
            }
            let (key, vswitch) = (a.key, a.vswitch);
            out.push(Candidate {
                key,
                row,
                aliases: self.aliases_of(row),
                vswitch,
            });
        }
        if self.rt.pick_cursor >= end {
            // The scan is over; the next job starts from the beginning.
            self.rt.pick_cursor = 0;
            return false;
        }
        true
    }

    fn packets(&self, f: &FlowRef) -> Option<u32> {
        let s = self.row_at(f)?;
        self.rt.flows.get(s).map(|a| a.packets)
    }

    fn divert(&mut self, f: &FlowRef, group: Option<u64>) -> bool {
        let Some(row) = self.row_at(f) else {
            return false;
        };
        let Some(a) = self.rt.flows.get_mut(row) else {
            return false;
        };
        match group {
            Some(_) if a.has(flag::MIGRATING) => return false,
            Some(g) => {
                a.flags |= flag::MIGRATING;
                a.set_mark(Mark::Out(g));
            }
            None => {
                a.flags &= !flag::MIGRATING;
                a.set_mark(Mark::None);
                // The flow stays (its migration was undone). If its state was already
                // saved for the target, its replica was told to forget it (`save`): it is
                // protected again, whole, now rather than at its next packet.
                let id = a.id;
                self.rt.repl.protect(row, id);
            }
        }
        true
    }

    fn group_of(&self, f: &FlowRef) -> Option<u64> {
        self.rt.flows.get(self.row_at(f)?)?.moving_out_in()
    }

    fn save(&mut self, f: &FlowRef, out: &mut Vec<u8>) -> Option<FlowState> {
        let row = self.row_at(f)?;
        let a = self.rt.flows.get(row)?;
        // The flow is the target's from here: its copy here must not be promoted should
        // this runtime die (the target replicates it afresh, whole, as it installs it).
        // Should the hand-over fail, the flow's next packet sends it whole again.
        self.rt.repl.ended(row, a.id);
        let now = self.now_ms;
        let start = out.len();
        write_states(&self.rt.stages, self.rt.flows.records(), row, out);
        Some(FlowState {
            idx: 0,
            flags: a.flags & !(flag::LIVE | flag::MIGRATING),
            age_ms: u64::from(ms_since(now, a.created_ms)),
            idle_ms: u64::from(ms_since(now, a.last_ms)),
            missing: 0,
            // A group's message cannot come near 4 GiB; a flow whose states did would read
            // back as malformed and stay with the source.
            states_len: u32::try_from(out.len() - start).unwrap_or(u32::MAX),
            home: self.rt.homes.addr(a.home),
        })
    }

    fn prepare_pending(&mut self, flows: &[MigrateFlow]) {
        // Each insert first probes the index for the key, a cache miss per flow at a
        // million flows: start every probe's line loading before the first insert.
        for f in flows {
            let h = self.rt.flows.hash(&f.key);
            self.rt.flows.prefetch_bucket(h);
        }
    }

    fn create_pending(
        &mut self,
        flow: &MigrateFlow,
        vswitch: EndpointAddr,
        arriving: u32,
    ) -> Option<u32> {
        // The insert itself refuses an existing key; aliases are checked first so that
        // nothing needs undoing.
        if flow.aliases.iter().any(|k| self.rt.flows.find(k).is_some()) {
            return None;
        }
        let now = self.now_ms as u32;
        // Its home is the source's word, in step 3 (`install`).
        let mut actor = FlowActor::new(
            flow.key,
            self.rt.next_id,
            now,
            vswitch,
            HERE,
            flag::MIGRATING,
        );
        actor.set_mark(Mark::In(arriving));
        let row = self.rt.flows.insert(actor)?;
        self.rt.next_id += 1;
        for k in &flow.aliases {
            self.rt.flows.add_alias(row, *k);
        }
        Some(row)
    }

    fn install(&mut self, f: &FlowRef, st: &FlowState, part: &[u8]) -> bool {
        let Some(row) = self.row_at(f) else {
            return false;
        };
        // One state per function, then nothing: anything else is malformed, and what was
        // restored before finding out is discarded again.
        let mut reader = states::Reader::new(part);
        let mut ok = true;
        for stage in self.rt.stages.iter_mut() {
            ok = match reader.next_state() {
                Ok(Some(bytes)) => stage
                    .restore(self.rt.flows.records_mut(), row, bytes)
                    .is_ok(),
                Ok(None) => true,
                Err(_) => false,
            };
            if !ok {
                break;
            }
        }
        if !ok || !reader.is_done() {
            for s in self.rt.stages.iter_mut() {
                s.discard(self.rt.flows.records_mut(), row);
            }
            return false;
        }
        let now = self.now_ms;
        let home = self.rt.homes.index(st.home);
        self.rt.reserve_here(row, now);
        let Some(a) = self.rt.flows.get_mut(row) else {
            return false;
        };
        a.home = home;
        a.flags = (st.flags & !flag::MIGRATING) | flag::LIVE;
        a.set_mark(Mark::None);
        // Stamps are wrapping milliseconds (`ms_since`).
        a.created_ms = (now as u32).wrapping_sub(u32::try_from(st.age_ms).unwrap_or(u32::MAX));
        a.last_ms = (now as u32).wrapping_sub(u32::try_from(st.idle_ms).unwrap_or(u32::MAX));
        // Counting starts again with the vswitch's count for this runtime.
        a.packets = 0;
        a.timer_gen = a.timer_gen.wrapping_add(1);
        let e = Entry {
            row,
            gen: a.timer_gen,
        };
        let a = a.clone();
        let deadline = self.rt.deadline(&a, now);
        self.rt.timers.arm(e, deadline.max(now + 1));
        // Protected at once, whole, not at its first packet here: the source's copy was
        // dropped at hand-over, and an idle flow would otherwise have no replica until
        // its next packet (this runtime's death meanwhile would lose it).
        self.rt.repl.protect(row, a.id);
        true
    }

    fn release_held(&mut self, f: &FlowRef, how: Release) -> u32 {
        let Some(row) = self.row_at(f) else {
            return 0;
        };
        let Some(q) = self.rt.held.remove(&row) else {
            return 0;
        };
        let n = q.len() as u32;
        let region = self.io.buffers();
        match how {
            Release::Process => {
                let vswitch = self
                    .rt
                    .flows
                    .get(row)
                    .map(|a| a.vswitch)
                    .unwrap_or(self.rt.me);
                for pkt in q {
                    if let Some((pkt, p)) = self.rt.prepare(self.io, &region, pkt, vswitch) {
                        self.rt
                            .run_prepared(self.io, &region, pkt, &p, self.now_ms, true);
                    }
                }
            }
            Release::Return { to, group } => {
                let vswitch = self
                    .rt
                    .flows
                    .get(row)
                    .map(|a| a.vswitch)
                    .unwrap_or(self.rt.me);
                let mut packets = Vec::with_capacity(q.len());
                for pkt in q {
                    packets.push(self.rt.moved_packet(&region, &pkt, vswitch));
                    self.io.free(pkt);
                }
                // Many packets: several messages, each well under the message limit.
                for chunk in packets.chunks(256) {
                    let m = Message::MigratePackets {
                        group,
                        late: false,
                        packets: chunk.to_vec(),
                    };
                    if self.io.send(to, LIAISON, LIAISON, &m).is_err() {
                        self.io.count(ProcCounter::ActorSendRefused, 1);
                    }
                }
            }
            Release::Discard => {
                for pkt in q {
                    self.io.free(pkt);
                }
            }
        }
        n
    }

    fn remove_pending(&mut self, f: &FlowRef) {
        if let Some(row) = self.row_at(f) {
            if let Some(q) = self.rt.held.remove(&row) {
                for pkt in q {
                    self.io.free(pkt);
                }
            }
            for s in self.rt.stages.iter_mut() {
                s.discard(self.rt.flows.records_mut(), row);
            }
            self.rt.flows.remove(row);
        }
    }

    fn retire(&mut self, f: &FlowRef) {
        self.remove_pending(f);
    }

    fn end_stray(&mut self, key: &FlowKey) -> bool {
        let row = match self.rt.flows.find(key) {
            Some(Found::Key(s)) | Some(Found::Alias(s)) => s,
            None => return false,
        };
        if self
            .rt
            .flows
            .get(row)
            .is_none_or(|a| a.has(flag::MIGRATING))
        {
            return false;
        }
        self.rt
            .end_flow(row, self.now_ms, Notify::Vswitch, EndReason::Done);
        true
    }

    fn send(&mut self, to: EndpointAddr, msg: Message) {
        self.keep_awake(to);
        self.keep_awake(self.rt.me);
        if self.io.send(to, LIAISON, LIAISON, &msg).is_err() {
            self.io.count(ProcCounter::ActorSendRefused, 1);
        }
        // Out at once, not at the end of the loop: the peer works on this group while this
        // runtime prepares the next.
        let now_ns = self.io.now_ns();
        self.io.transmit(now_ns);
        self.io.flush_wakes();
        if crate::failpoint::armed() {
            crate::failpoint::migrate_state_sent(&msg);
        }
    }
}

/// The flow's states in `row`, function by function, in the layout of `nflib::msg::states`.
fn write_states(stages: &[Box<dyn Stage>], records: &FlowRecords, row: u32, out: &mut Vec<u8>) {
    for stage in stages {
        states::push(out, |out| stage.save_into(records, row, out));
    }
}

#[cfg(test)]
mod tests;
