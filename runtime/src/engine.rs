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

use std::time::Instant;

use nflib::endpoint::Endpoint;
use nflib::flow::{Direction, FlowKey};
use nflib::mailbox::Mailbox;
use nflib::msg::Message;
use nflib::nf::{tcp_flags, Dir, NfContext, PacketMut, Stage, Verdict};
use nflib::packet::ParseError;
use nflib::stats::{ProcCounter, NF_COUNTERS};
use nflib::wire::{EndpointAddr, LIAISON};
use nflib::{Packet, MANAGER_SLOT};

use crate::events::EventLog;
use crate::flows::{flag, FlowActor, FlowTable, Found};
use crate::timers::{Entry, TimerWheel};

/// When flows end.
#[derive(Clone, Copy, Debug)]
pub struct FlowSettings {
    pub max_flows: usize,
    pub idle_ms: u32,
    pub unreplied_ms: u32,
    pub closed_linger_ms: u32,
}

/// Most flows ended per call of `expire`, so a mass expiry cannot stall the packet path.
const EXPIRE_BATCH: usize = 4096;

pub struct Runtime {
    stages: Vec<Box<dyn Stage>>,
    nf_counters: Vec<[u64; NF_COUNTERS]>,
    flows: FlowTable,
    timers: TimerWheel,
    fired: Vec<Entry>,
    pub events: EventLog,
    settings: FlowSettings,
    /// This runtime in the cluster.
    me: EndpointAddr,
    /// The address vswitches give frames they send here.
    mac: [u8; 6],
    epoch: Instant,
    next_id: u64,
    aliases: Vec<FlowKey>,
    out: Vec<Packet>,
    /// Aliases and ended flows to tell the vswitches that feed them (sent by `flush`, one
    /// message per vswitch, before the packets that need them).
    new_aliases: Vec<(EndpointAddr, FlowKey)>,
    ended: Vec<(EndpointAddr, FlowKey)>,
    prepared: Vec<Prepared>,
}

/// A packet parsed and hashed in the first pass of a batch.
struct Prepared {
    /// The vswitch that sent it (through nfmgr when it is on another server).
    vswitch: EndpointAddr,
    pkt: Packet,
    h: nflib::packet::Headers,
    key: FlowKey,
    kdir: Direction,
    hash: u64,
}

impl Runtime {
    pub fn new(
        stages: Vec<Box<dyn Stage>>,
        settings: FlowSettings,
        events: EventLog,
        me: EndpointAddr,
    ) -> Runtime {
        let n = stages.len();
        Runtime {
            stages,
            nf_counters: vec![[0; NF_COUNTERS]; n],
            flows: FlowTable::new(settings.max_flows),
            // 100 ms ticks, a 409.6 s horizon.
            timers: TimerWheel::new(4096, 100, 0),
            fired: Vec::new(),
            events,
            settings,
            me,
            mac: me.input_mac(),
            epoch: Instant::now(),
            next_id: 1,
            aliases: Vec::new(),
            out: Vec::new(),
            new_aliases: Vec::new(),
            ended: Vec::new(),
            prepared: Vec::new(),
        }
    }

    /// Milliseconds since the runtime started (the clock flows and functions see).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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

    /// Processes a batch of packets (with the slot each came from), in three passes so the
    /// cache misses of a large flow table overlap instead of following one another: parse,
    /// hash and prefetch every packet's index line; prefetch the actors and function states
    /// those lines name; then run the chains.
    pub fn process_batch(
        &mut self,
        ep: &mut Endpoint,
        batch: &mut Vec<(u16, Packet)>,
        now_ms: u64,
    ) {
        let region = ep.region().clone();
        let mut prepared = std::mem::take(&mut self.prepared);
        for (from, mut pkt) in batch.drain(..) {
            // Packets from another server's vswitch come through nfmgr, which noted where.
            let vswitch = match region.meta_of(&pkt).route() {
                Some(r) if from == MANAGER_SLOT => EndpointAddr::new(r.server, r.vswitch as u16),
                _ => EndpointAddr::new(self.me.server, from),
            };
            // The vswitch addressed the frame to us; put its own destination back.
            if let Some(orig) = region.meta_of(&pkt).take_dst_mac() {
                let data = region.data_mut(&mut pkt);
                if data.len() >= 6 {
                    if data[..6] != self.mac {
                        ep.counters().add(ProcCounter::DropMisaddressed as usize, 1);
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
                    let (key, kdir) = FlowKey::of(&h);
                    let hash = self.flows.hash(&key);
                    self.flows.prefetch_bucket(hash);
                    prepared.push(Prepared {
                        vswitch,
                        pkt,
                        h,
                        key,
                        kdir,
                        hash,
                    });
                }
                Err(e) => {
                    let c = match e {
                        ParseError::Runt => ProcCounter::DropRunt,
                        ParseError::Truncated(_) => ProcCounter::DropTruncated,
                        ParseError::Malformed(..) => ProcCounter::DropMalformed,
                    };
                    ep.counters().add(c as usize, 1);
                    ep.free(pkt);
                }
            }
        }
        for p in &prepared {
            if let Some(slot) = self.flows.prefetch_entry(p.hash) {
                for s in &self.stages {
                    s.prefetch(slot);
                }
            }
        }
        for p in prepared.drain(..) {
            let Prepared {
                vswitch,
                mut pkt,
                h,
                key,
                kdir,
                hash,
            } = p;
            let len = pkt.len();
            let result = {
                let room = region.room_mut(&mut pkt);
                match PacketMut::with_headers(room, len, h) {
                    Ok(mut pm) => self.run_chain(ep, vswitch, &mut pm, key, kdir, hash, now_ms),
                    Err(_) => None,
                }
            };
            match result {
                None => ep.free(pkt),
                Some((verdict, new_len)) => {
                    region.set_len(&mut pkt, new_len);
                    match verdict {
                        Verdict::Forward => self.out.push(pkt),
                        Verdict::SendBack => {
                            let ingress = pkt.ingress_port();
                            pkt.set_egress_port(ingress);
                            self.out.push(pkt);
                        }
                        Verdict::Drop => ep.free(pkt),
                    }
                }
            }
        }
        self.prepared = prepared;
    }

    /// Finds or creates the flow and runs the chain. `None`: dropped before the chain (table
    /// full).
    #[allow(clippy::too_many_arguments)]
    fn run_chain(
        &mut self,
        ep: &mut Endpoint,
        from: EndpointAddr,
        pm: &mut PacketMut<'_>,
        key: FlowKey,
        kdir: Direction,
        hash: u64,
        now_ms: u64,
    ) -> Option<(Verdict, usize)> {
        let now = now_ms as u32;
        let (slot, new, dir) = match self.flows.find_hashed(&key, hash) {
            Some(Found::Key(s)) => {
                let a = self.flows.get(s)?;
                let from_a = kdir == Direction::Forward;
                let dir = if from_a == a.has(flag::INITIATOR_IS_A) {
                    Dir::Original
                } else {
                    Dir::Reply
                };
                (s, false, dir)
            }
            Some(Found::Alias(s)) => (s, false, Dir::Reply),
            None => {
                let mut flags = 0;
                if kdir == Direction::Forward {
                    flags |= flag::INITIATOR_IS_A;
                }
                let actor = FlowActor::new(key, self.next_id, now, from, flags);
                let Some(s) = self.flows.insert(actor) else {
                    ep.counters()
                        .add(ProcCounter::DropFlowTableFull as usize, 1);
                    return None;
                };
                self.next_id += 1;
                ep.counters().add(ProcCounter::FlowsCreated as usize, 1);
                let deadline = now_ms + self.settings.unreplied_ms as u64;
                self.timers.arm(Entry { slot: s, gen: 0 }, deadline);
                (s, true, Dir::Original)
            }
        };
        // Platform-level flow tracking.
        let actor = self.flows.get_mut(slot)?;
        actor.last_ms = now;
        if dir == Dir::Reply {
            actor.flags |= flag::REPLIED;
        }
        if let Some(t) = pm.tcp() {
            let was_closed = actor.closed();
            actor.flags |= flag::TCP;
            if t.flags & tcp_flags::RST != 0 {
                actor.flags |= flag::RST;
            }
            if t.flags & tcp_flags::FIN != 0 {
                actor.flags |= if dir == Dir::Original {
                    flag::FIN_ORIG
                } else {
                    flag::FIN_REPLY
                };
            }
            if !was_closed && actor.closed() {
                actor.timer_gen = actor.timer_gen.wrapping_add(1);
                let e = Entry {
                    slot,
                    gen: actor.timer_gen,
                };
                self.timers
                    .arm(e, now_ms + self.settings.closed_linger_ms as u64);
            }
        }
        let fkey = actor.key;
        let id = actor.id;
        let vswitch = actor.vswitch;
        let mut verdict = Verdict::Forward;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let mut ctx = NfContext::new(
                now_ms,
                dir,
                &fkey,
                id,
                &mut self.nf_counters[i],
                &mut self.aliases,
                &mut self.events,
            );
            match stage.process(slot, new, pm, &mut ctx) {
                Verdict::Forward => {}
                Verdict::Drop => {
                    self.nf_counters[i][0] += 1;
                    verdict = Verdict::Drop;
                    break;
                }
                Verdict::SendBack => {
                    verdict = Verdict::SendBack;
                    break;
                }
            }
        }
        for alias in self.aliases.drain(..) {
            if self.flows.add_alias(slot, alias) {
                self.new_aliases.push((vswitch, alias));
            }
        }
        Some((verdict, pm.len()))
    }

    fn deadline(&self, a: &FlowActor) -> u64 {
        let wait = if a.closed() {
            self.settings.closed_linger_ms
        } else if !a.has(flag::REPLIED) {
            self.settings.unreplied_ms
        } else {
            self.settings.idle_ms
        };
        a.last_ms as u64 + wait as u64
    }

    /// Ends the flows whose time has come (at most a batch per call).
    pub fn expire(&mut self, ep: &mut Endpoint, now_ms: u64) {
        self.timers.advance(now_ms, &mut self.fired, EXPIRE_BATCH);
        let fired = std::mem::take(&mut self.fired);
        for e in &fired {
            let Some(a) = self.flows.get(e.slot) else {
                continue;
            };
            if a.timer_gen != e.gen {
                continue; // re-armed since
            }
            let deadline = self.deadline(a);
            if deadline > now_ms {
                self.timers.arm(*e, deadline);
                continue;
            }
            self.end_flow(e.slot, now_ms, true);
            ep.counters().add(ProcCounter::FlowsExpired as usize, 1);
        }
        self.fired = fired;
        self.fired.clear();
    }

    fn end_flow(&mut self, slot: u32, now_ms: u64, notify: bool) {
        let Some(a) = self.flows.get(slot) else {
            return;
        };
        let key = a.key;
        let id = a.id;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let mut ctx = NfContext::new(
                now_ms,
                Dir::Original,
                &key,
                id,
                &mut self.nf_counters[i],
                &mut self.aliases,
                &mut self.events,
            );
            stage.end_flow(slot, &mut ctx);
        }
        self.aliases.clear();
        if let Some((a, aliases)) = self.flows.remove(slot) {
            if notify {
                self.ended.push((a.vswitch, a.key));
                self.ended
                    .extend(aliases.into_iter().map(|k| (a.vswitch, k)));
            }
        }
    }

    /// Ends every flow (the runtime is stopping): functions write their last records.
    pub fn end_all(&mut self) {
        let now = self.now_ms();
        for slot in self.flows.slots() {
            self.end_flow(slot, now, false);
        }
        self.new_aliases.clear();
        self.ended.clear();
    }

    /// Sends what processing produced: messages first (so aliases are known before the
    /// packets that need them), then packets to nfmgr.
    pub fn flush(&mut self, ep: &mut Endpoint, mb: &mut Mailbox, now_ns: u64) {
        for (list, aliases) in [(&mut self.new_aliases, true), (&mut self.ended, false)] {
            if list.is_empty() {
                continue;
            }
            // One message per vswitch: a batch of new NAT flows costs a frame or two, not
            // one each.
            list.sort_by_key(|(vs, _)| *vs);
            for group in list.chunk_by(|a, b| a.0 == b.0) {
                let to = group[0].0;
                let keys: Vec<FlowKey> = group.iter().map(|(_, k)| *k).collect();
                let m = if aliases {
                    Message::AddAliases { keys }
                } else {
                    Message::FlowEnded { keys }
                };
                if mb.send(to, LIAISON, LIAISON, &m).is_err() {
                    ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
                }
            }
            list.clear();
        }
        mb.flush(ep, now_ns);
        if !self.out.is_empty() {
            ep.send_burst(MANAGER_SLOT, &mut self.out);
        }
    }

    /// Publishes flow counters and the functions' statistics.
    pub fn publish(&mut self, ep: &mut Endpoint) {
        let live = self.flows.len() as u64;
        let dropped = self.events.dropped;
        let c = ep.counters();
        c.set(ProcCounter::FlowsActive as usize, live);
        c.set(ProcCounter::EventsDropped as usize, dropped);
        let region = ep.region();
        for (i, counters) in self.nf_counters.iter().enumerate() {
            if let Some(rec) = region.nf_stats(ep.slot(), i) {
                for (shared, v) in rec.counters.0.iter().zip(counters) {
                    shared.store(*v, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Names the functions in the region's statistics (once, at start).
    pub fn label_stats(&self, ep: &Endpoint) {
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
        self.stages.iter().map(|s| s.state_memory()).sum()
    }
}
