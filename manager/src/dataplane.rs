//! nfmgr's data-plane thread: moves frames between ports and process rings, owns the buffer
//! pool, and carries out recovery when the supervisor reports a death.
//!
//! One loop, run to completion:
//! 1. commands from the supervisor (reclaim a dead slot, hand a slot back for a restart);
//! 2. claim what processes sent to nfmgr: actor frames (for nfmgr's own endpoint, or signed
//!    and sent to another server by the relay), then packets, transmitted on the egress port
//!    each descriptor names or wrapped for the server they must go to (see `relay`);
//! 3. unless those rings are backed up, receive from each port into the ring of the vswitch
//!    it feeds, taking no more than the ring can hold right now (backpressure reaches the
//!    port, never a silent drop inside the platform);
//! 4. service the pool (recycle and refill rings) and keep draining dead slots' inputs;
//! 5. ring the doorbells of processes it sent to, publish counters now and then, and sleep
//!    when idle (on its doorbell, the ports' descriptors, and the next port deadline).
//!
//! It is the only thread that touches the free stack, so the pool needs no lock.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nflib::buffer::Desc;
use nflib::doorbell::Doorbells;
use nflib::endpoint::BURST;
use std::collections::VecDeque;

use nflib::pool::{ManagerPool, Reclaim, ReclaimReport};
use nflib::ring::{Consumer, Producer};
use nflib::slot::SlotState;
use nflib::stats::{LocalCounters, PortCounter, ProcCounter, PORT_COUNTERS, PROC_COUNTERS};
use nflib::{Packet, Region, RingId, MANAGER_SLOT};
use nix::sys::eventfd::EventFd;
use ringbuf::traits::{Consumer as _, Producer as _};
use ringbuf::{HeapCons, HeapProd};

use crate::ports::pcap::Recorder;
use crate::ports::{wall_ns, Port, PortCtx};
use crate::relay::{Inbound, Relay};

/// How often the pool's refill and recycle rings are serviced.
const POOL_SERVICE_EVERY: Duration = Duration::from_millis(1);

/// Buffers of a dead slot looked at per loop iteration: each read is the first line of a
/// buffer, most of them cache misses, so a chunk costs some hundreds of microseconds, not
/// the tens of milliseconds a million buffers at once would stall every port for.
const RECLAIM_CHUNK: u32 = 8192;

/// Most frames taken from one port per loop iteration (fairness between ports).
const MAX_RX_PER_PORT: usize = 256;

/// Supervisor -> data plane.
#[derive(Debug)]
pub enum Command {
    /// The process in this slot is dead and reaped: free everything it held.
    Reclaim(u16),
    /// A process is about to start in this slot: stop draining its input rings.
    Revive(u16),
    Shutdown,
}

/// Data plane -> supervisor.
#[derive(Debug)]
pub enum PlaneEvent {
    Reclaimed {
        slot: u16,
        report: ReclaimReport,
    },
    Revived(u16),
    /// Every generator and replay port has finished and the pipeline has drained.
    SourcesDone,
}

pub struct PortSlot {
    pub name: String,
    pub port: Box<dyn Port>,
    /// Port that frames received here leave from.
    pub egress: Option<u8>,
    /// Slot of the vswitch that frames received here go to.
    pub vswitch: u16,
    /// Slots whose processes may hold frames received here (bit `s`: slot `s`): its
    /// vswitch and the runtimes that vswitch feeds.
    pub reaches: u64,
    pub recorder: Option<Recorder>,
    pub counters: LocalCounters<PORT_COUNTERS>,
}

/// How the data-plane loop waits and reports.
pub struct Options {
    /// Keep polling this long after the last work before sleeping.
    pub poll_for: Duration,
    pub busy_poll: bool,
    /// How often counters are published to the region (capped at 250 ms).
    pub publish_every: Duration,
}

pub struct Channels {
    pub commands: HeapCons<Command>,
    pub events: HeapProd<PlaneEvent>,
    /// Rung after pushing an event, to wake the supervisor.
    pub event_bell: Arc<EventFd>,
}

pub struct Dataplane {
    region: Region,
    pool: ManagerPool,
    bells: Arc<Doorbells>,
    ports: Vec<PortSlot>,
    to_proc: Vec<Option<Producer<Desc>>>,
    from_proc: Vec<Option<Consumer<Desc>>>,
    msg_from: Vec<Option<Consumer<Desc>>>,
    msg_to: Vec<Option<Producer<Desc>>>,
    relay: Relay,
    /// Frames waiting for a port (output of runtimes on other servers).
    pending_tx: Vec<Vec<Packet>>,
    /// Dead slots whose buffers are being taken back, a chunk per loop iteration.
    reclaims: VecDeque<Reclaim>,
    /// By the port a packet arrived on: the ports its output may leave by. Where frames
    /// received there go (its `to`), and itself (a function may send a packet back where it
    /// came from); never the cluster port, whose frames nfmgr signs.
    may_leave: Vec<[Option<u8>; 2]>,
    /// By slot: the ports (bit `i`: port `i`) whose frames the process there may hold, so
    /// that the port its output names as its port of arrival, the process's to write, is
    /// one it could have received from.
    arrivals: Vec<u64>,
    /// Counters of the cluster port when there is none (so the relay always has some).
    spare_counters: LocalCounters<PORT_COUNTERS>,
    chan: Channels,
    counters: LocalCounters<PROC_COUNTERS>,
    /// Slots with no process whose input rings nfmgr keeps draining.
    dead: u64,
    wake: u64,
    poll_for: Duration,
    busy_poll: bool,
    publish_every: Duration,
    sources_done_sent: bool,
    quiet_since: Option<Instant>,
}

/// What the data plane hands back when it stops.
pub struct Outcome {
    pub ports: Vec<(String, Option<serde_json::Value>)>,
}

impl Dataplane {
    pub fn new(
        region: &Region,
        pool: ManagerPool,
        bells: Arc<Doorbells>,
        ports: Vec<PortSlot>,
        chan: Channels,
        opts: Options,
        relay: Relay,
    ) -> Dataplane {
        let slots = region.slot_count();
        let mut to_proc = Vec::new();
        let mut from_proc = Vec::new();
        let mut msg_from = Vec::new();
        let mut msg_to = Vec::new();
        for s in 0..slots {
            to_proc.push(
                region
                    .ring(RingId::Data {
                        from: MANAGER_SLOT,
                        to: s,
                    })
                    .map(Producer::new),
            );
            from_proc.push(
                region
                    .ring(RingId::Data {
                        from: s,
                        to: MANAGER_SLOT,
                    })
                    .map(Consumer::new),
            );
            msg_from.push(
                region
                    .ring(RingId::Message {
                        from: s,
                        to: MANAGER_SLOT,
                    })
                    .map(Consumer::new),
            );
            msg_to.push(
                region
                    .ring(RingId::Message {
                        from: MANAGER_SLOT,
                        to: s,
                    })
                    .map(Producer::new),
            );
        }
        let nports = ports.len();
        let counters = region
            .slot(MANAGER_SLOT)
            .map(|s| LocalCounters::resume(&s.counters.0))
            .unwrap_or_default();
        let cluster = relay.port;
        let may_leave = ports
            .iter()
            .enumerate()
            .map(|(i, p)| match p.egress {
                Some(e) if Some(i) != cluster => [
                    Some(e).filter(|e| Some(*e as usize) != cluster),
                    u8::try_from(i).ok(),
                ],
                // A port that receives nothing (a sink, the cluster port) sends nothing back.
                _ => [None, None],
            })
            .collect();
        let mut arrivals = vec![0u64; slots as usize];
        for (i, p) in ports.iter().enumerate() {
            for (s, a) in arrivals.iter_mut().enumerate() {
                if p.reaches & (1u64 << s) != 0 {
                    *a |= 1u64 << i;
                }
            }
        }
        Dataplane {
            region: region.clone(),
            pool,
            bells,
            ports,
            to_proc,
            from_proc,
            msg_from,
            msg_to,
            relay,
            pending_tx: (0..nports).map(|_| Vec::new()).collect(),
            reclaims: VecDeque::new(),
            may_leave,
            arrivals,
            spare_counters: LocalCounters::default(),
            chan,
            counters,
            dead: 0,
            wake: 0,
            poll_for: opts.poll_for,
            busy_poll: opts.busy_poll,
            publish_every: opts.publish_every.min(Duration::from_millis(250)),
            sources_done_sent: false,
            quiet_since: None,
        }
    }

    fn alive(&self, slot: u16) -> bool {
        self.region
            .slot(slot)
            .map(|s| s.state().is_alive())
            .unwrap_or(false)
    }

    fn emit(&mut self, e: PlaneEvent) {
        if self.chan.events.try_push(e).is_err() {
            tracing::error!("supervisor event queue full; event lost");
        }
        // A full counter means the supervisor has not read it yet: it will wake anyway.
        let _ = self.chan.event_bell.write(1);
    }

    /// Whether runtime output `p` may leave by port `egress`, given the port it came in by.
    fn may_leave_by(may_leave: &[[Option<u8>; 2]], p: &Packet, egress: u8) -> bool {
        may_leave
            .get(p.ingress_port() as usize)
            .is_some_and(|m| m.contains(&Some(egress)))
    }

    /// Looks at one chunk of the buffers of the oldest dead slot being reclaimed, and tells
    /// the supervisor when a slot is done. Returns 1 while there is work (the loop does not
    /// sleep on it), else 0.
    fn reclaim_some(&mut self) -> usize {
        let Some(job) = self.reclaims.front_mut() else {
            return 0;
        };
        if self.pool.reclaim_step(job, RECLAIM_CHUNK) {
            if let Some(job) = self.reclaims.pop_front() {
                self.emit(PlaneEvent::Reclaimed {
                    slot: job.dead,
                    report: job.report,
                });
            }
        }
        1
    }

    /// Returns false when asked to shut down.
    fn handle_commands(&mut self) -> bool {
        while let Some(cmd) = self.chan.commands.try_pop() {
            match cmd {
                Command::Reclaim(slot) => {
                    self.dead |= 1u64 << slot;
                    let job = self.pool.reclaim_start(slot);
                    self.reclaims.push_back(job);
                }
                Command::Revive(slot) => {
                    // One last drain, then the new process owns the consumer side.
                    self.pool.drain_inputs(slot);
                    self.dead &= !(1u64 << slot);
                    self.emit(PlaneEvent::Revived(slot));
                }
                Command::Shutdown => {
                    // Every slot was reclaimed first (`stop_all`): finish those steps now.
                    while let Some(mut job) = self.reclaims.pop_front() {
                        while !self.pool.reclaim_step(&mut job, u32::MAX) {}
                        self.emit(PlaneEvent::Reclaimed {
                            slot: job.dead,
                            report: job.report,
                        });
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Ports -> vswitch rings. Returns frames moved.
    fn receive(&mut self, now: Instant, batch: &mut Vec<Packet>) -> usize {
        let mut moved = 0;
        for i in 0..self.ports.len() {
            if self.relay.port == Some(i) {
                moved += self.receive_cluster(i, now, batch);
                continue;
            }
            let (vs, egress) = (self.ports[i].vswitch, self.ports[i].egress);
            let Some(egress) = egress else { continue };
            // Frames wait in the device (or the generator's schedule) until the vswitch runs.
            let running = self
                .region
                .slot(vs)
                .map(|s| s.state() == SlotState::Running)
                .unwrap_or(false);
            if !running {
                continue;
            }
            let Some(Some(ring)) = self.to_proc.get_mut(vs as usize) else {
                continue;
            };
            // The port may take as much as the ring can hold now, so a port that must drop
            // when it cannot deliver (a paced generator) drops only on real backpressure.
            let room = (ring.free_space() as usize).min(MAX_RX_PER_PORT);
            let ps = &mut self.ports[i];
            let mut ctx = PortCtx {
                region: &self.region,
                pool: &mut self.pool,
                counters: &mut ps.counters,
                now,
            };
            batch.clear();
            ps.port.rx(&mut ctx, batch, room);
            if batch.is_empty() {
                continue;
            }
            let mut bytes = 0u64;
            let mut pushed_total = 0;
            while !batch.is_empty() {
                let mut descs = [Desc::default(); BURST];
                let n = batch.len().min(BURST);
                for (d, mut p) in descs.iter_mut().zip(batch.drain(..n)) {
                    p.set_egress_port(egress);
                    p.set_ingress_port(i as u8);
                    bytes += p.len() as u64;
                    *d = p.into_desc();
                }
                let pushed = ring.push_burst(&descs[..n]);
                pushed_total += pushed;
                // The port took no more than the ring's free space, so this cannot happen
                // short of a bug; free rather than leak.
                for d in &descs[pushed..n] {
                    bytes -= d.len as u64;
                    if let Some(p) = self
                        .region
                        .claim(*d, MANAGER_SLOT as u32, MANAGER_SLOT as u32)
                    {
                        self.pool.free(p);
                    }
                    ps.counters.add(PortCounter::RxDropRingFull as usize, 1);
                }
            }
            ps.counters
                .add(PortCounter::RxPkts as usize, pushed_total as u64);
            ps.counters.add(PortCounter::RxBytes as usize, bytes);
            self.counters
                .add(ProcCounter::TxPkts as usize, pushed_total as u64);
            self.wake |= 1u64 << vs;
            moved += pushed_total;
        }
        moved
    }

    /// The cluster port -> message and data rings of local processes, nfmgr's own
    /// endpoint, or (a remote runtime's output) the port the packet leaves from.
    fn receive_cluster(&mut self, i: usize, now: Instant, batch: &mut Vec<Packet>) -> usize {
        let ps = &mut self.ports[i];
        let mut ctx = PortCtx {
            region: &self.region,
            pool: &mut self.pool,
            counters: &mut ps.counters,
            now,
        };
        batch.clear();
        ps.port.rx(&mut ctx, batch, MAX_RX_PER_PORT);
        let n = batch.len();
        if n == 0 {
            return 0;
        }
        ps.counters.add(PortCounter::RxPkts as usize, n as u64);
        let bytes: usize = batch.iter().map(|p| p.len()).sum();
        ps.counters.add(PortCounter::RxBytes as usize, bytes as u64);
        let now_ns = nflib::time::mono_ns();
        let region = self.region.clone();
        let alive = |s: u16| {
            region
                .slot(s)
                .map(|r| r.state() == SlotState::Running)
                .unwrap_or(false)
        };
        for p in batch.drain(..) {
            let c = &mut self.ports[i].counters;
            match self
                .relay
                .on_cluster_frame(&self.region, &mut self.pool, p, now_ns, &alive, c)
            {
                Inbound::Message(slot, p) => {
                    Self::push_one(&mut self.msg_to, &mut self.pool, &self.region, slot, p);
                    self.wake |= 1u64 << slot;
                }
                Inbound::Data(slot, p) => {
                    Self::push_one(&mut self.to_proc, &mut self.pool, &self.region, slot, p);
                    self.wake |= 1u64 << slot;
                }
                Inbound::Port(port, p) => {
                    // Another server's runtime named the port: the same rule as ours.
                    let ok = Self::may_leave_by(&self.may_leave, &p, port);
                    match self.pending_tx.get_mut(port as usize) {
                        Some(q) if ok => q.push(p),
                        _ => {
                            self.counters.add(ProcCounter::DropMisaddressed as usize, 1);
                            self.pool.free(p);
                        }
                    }
                }
                Inbound::Done => {}
            }
        }
        n
    }

    /// Pushes one packet onto a ring of nfmgr's, freeing it if the ring is full (actor
    /// frames are sent again by their transport; data is dropped as at any full ring).
    fn push_one(
        rings: &mut [Option<Producer<Desc>>],
        pool: &mut ManagerPool,
        region: &Region,
        slot: u16,
        p: Packet,
    ) {
        let Some(Some(ring)) = rings.get_mut(slot as usize) else {
            pool.free(p);
            return;
        };
        let d = p.into_desc();
        if !ring.push(d) {
            if let Some(rec) = region.slot(slot) {
                rec.input_drops
                    .0
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(p) = region.claim(d, MANAGER_SLOT as u32, MANAGER_SLOT as u32) {
                pool.free(p);
            }
        }
    }

    /// nfmgr's own endpoint and the relay's commands: frames due now go to local message
    /// rings or the cluster port. Returns work done.
    fn service_relay(&mut self) -> usize {
        let mut work = self.relay.handle_commands();
        let mut local = Vec::new();
        let now_ns = nflib::time::mono_ns();
        self.relay.link_tick(now_ns);
        let c = match self.relay.port {
            Some(i) => &mut self.ports[i].counters,
            None => &mut self.spare_counters,
        };
        self.relay
            .flush(&self.region, &mut self.pool, now_ns, &mut local, c);
        for (slot, p) in local {
            Self::push_one(&mut self.msg_to, &mut self.pool, &self.region, slot, p);
            self.wake |= 1u64 << slot;
            work += 1;
        }
        work
    }

    /// Process rings -> ports. Returns frames moved.
    fn transmit(&mut self, tx: &mut [Vec<Packet>]) -> usize {
        let mut descs = [Desc::default(); BURST];
        let mut moved = 0;
        // Messages first: an alias a runtime registers must leave before the packet that
        // made it (between servers the two share the cluster port, in this order).
        let now_ns = nflib::time::mono_ns();
        for s in 1..self.msg_from.len() {
            let Some(ring) = self.msg_from[s].as_mut() else {
                continue;
            };
            let n = ring.peek_burst(&mut descs);
            for d in &descs[..n] {
                if let Some(p) = self.region.claim(*d, s as u32, MANAGER_SLOT as u32) {
                    // Only the process's own frames: nfmgr signs what goes to other
                    // servers, so a frame naming another endpoint as its source would be
                    // vouched for by this server (one compromised process speaking for
                    // any other, anywhere in the cluster).
                    let own = nflib::frame::Frame::parse(self.region.data(&p)).is_ok_and(|f| {
                        f.header.src == nflib::frame::EndpointAddr::new(self.relay.me, s as u16)
                    });
                    if !own {
                        self.counters.add(ProcCounter::MsgForged as usize, 1);
                        self.pool.free(p);
                        continue;
                    }
                    let c = match self.relay.port {
                        Some(i) => &mut self.ports[i].counters,
                        None => &mut self.spare_counters,
                    };
                    self.relay
                        .on_process_message(&self.region, &mut self.pool, p, now_ns, c);
                }
            }
            ring.release(n);
            self.counters.add(ProcCounter::MsgRx as usize, n as u64);
            moved += n;
        }
        for s in 1..self.from_proc.len() {
            let Some(ring) = self.from_proc[s].as_mut() else {
                continue;
            };
            let n = ring.peek_burst(&mut descs);
            if n == 0 {
                continue;
            }
            for d in &descs[..n] {
                self.region.prefetch(d);
            }
            for d in &descs[..n] {
                let Some(p) = self.region.claim(*d, s as u32, MANAGER_SLOT as u32) else {
                    self.counters.add(ProcCounter::DropInvalidDesc as usize, 1);
                    continue;
                };
                // Packets for (or back to) another server name that server's ports: the
                // relay takes them before the egress port is checked against ours.
                let c = match self.relay.port {
                    Some(i) => &mut self.ports[i].counters,
                    None => &mut self.spare_counters,
                };
                let Some(p) =
                    self.relay
                        .on_process_data(&self.region, &mut self.pool, s as u16, p, c)
                else {
                    continue;
                };
                let egress = p.egress_port() as usize;
                let arrived = self.arrivals.get(s).copied().unwrap_or(0);
                // (A byte from the descriptor: 64 ports at most, so a shift past them is none.)
                let bit = 1u64.checked_shl(p.ingress_port().into()).unwrap_or(0);
                if arrived & bit != 0 && Self::may_leave_by(&self.may_leave, &p, p.egress_port()) {
                    tx[egress].push(p);
                } else {
                    // The descriptor is the process's to write: a port of arrival whose
                    // frames never reach this process, or a port its packet may not leave
                    // by (not where its port of arrival sends, nor back; the cluster port),
                    // is refused.
                    self.counters.add(ProcCounter::DropMisaddressed as usize, 1);
                    self.pool.free(p);
                }
            }
            ring.release(n);
            self.counters.add(ProcCounter::RxPkts as usize, n as u64);
            moved += n;
        }
        for (i, q) in self.pending_tx.iter_mut().enumerate() {
            moved += q.len();
            tx[i].append(q);
        }
        if let Some(i) = self.relay.port {
            tx[i].append(&mut self.relay.cluster_tx);
        }
        let now_ns = if moved > 0 { wall_ns() } else { 0 };
        for (i, pkts) in tx.iter_mut().enumerate() {
            if pkts.is_empty() {
                continue;
            }
            let ps = &mut self.ports[i];
            if let Some(rec) = ps.recorder.as_mut() {
                for p in pkts.iter() {
                    rec.write(now_ns, self.region.data(p));
                }
                ps.counters
                    .set(PortCounter::Recorded as usize, rec.written());
            }
            let mut ctx = PortCtx {
                region: &self.region,
                pool: &mut self.pool,
                counters: &mut ps.counters,
                now: Instant::now(),
            };
            ps.port.tx(&mut ctx, pkts);
        }
        moved
    }

    /// Whether some process's ring to nfmgr is more than half full.
    fn egress_backlogged(&self) -> bool {
        self.from_proc
            .iter()
            .flatten()
            .any(|c| c.view().occupancy() > c.view().capacity() / 2)
    }

    fn service_pool(&mut self) {
        for s in 1..self.region.slot_count() {
            let alive = self.alive(s);
            self.pool.service(s, alive);
            if self.dead & (1u64 << s) != 0 {
                self.pool.drain_inputs(s);
            }
        }
    }

    fn publish(&mut self, started: Instant) {
        for (i, ps) in self.ports.iter_mut().enumerate() {
            ps.port.housekeeping(&mut ps.counters);
            if let Some(rec) = self.region.port(i as u16) {
                ps.counters.publish(&rec.counters.0);
            }
        }
        self.counters.set(
            ProcCounter::HeartbeatMs as usize,
            started.elapsed().as_millis() as u64,
        );
        if let Some(rec) = self.region.slot(MANAGER_SLOT) {
            self.counters.publish(&rec.counters.0);
        }
        self.region.header().manager_heartbeat_ms.store(
            started.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.pool.publish();
    }

    fn has_input(&mut self) -> bool {
        self.from_proc
            .iter_mut()
            .chain(self.msg_from.iter_mut())
            .flatten()
            .any(|c| !c.is_empty())
    }

    /// Sources finished and nothing moved for a while: the pipeline has drained.
    fn check_sources_done(&mut self, worked: bool, now: Instant) {
        if self.sources_done_sent {
            return;
        }
        let mut sources = self.ports.iter().filter(|p| p.port.is_source()).peekable();
        if sources.peek().is_none() || !sources.all(|p| p.port.finished()) {
            return;
        }
        if worked {
            self.quiet_since = None;
            return;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if now.duration_since(since) >= Duration::from_millis(300) {
            self.sources_done_sent = true;
            self.emit(PlaneEvent::SourcesDone);
        }
    }

    fn sleep(&mut self, now: Instant) {
        let mut deadline = now + Duration::from_millis(100);
        let mono = nflib::time::mono_ns();
        for t in [
            self.relay.mailbox.next_timeout(),
            self.relay.link_deadline_ns(),
        ]
        .into_iter()
        .flatten()
        {
            deadline = deadline.min(now + Duration::from_nanos(t.saturating_sub(mono)));
        }
        for p in &self.ports {
            if let Some(t) = p.port.next_wake(now) {
                deadline = deadline.min(t);
            }
        }
        if deadline <= now {
            return;
        }
        // A runtime migrating flows to another server asked the relay to stay ready.
        if self
            .region
            .slot(MANAGER_SLOT)
            .is_some_and(|r| r.kept_awake())
        {
            nflib::endpoint::yield_cpu();
            return;
        }
        self.bells.prepare_sleep(MANAGER_SLOT);
        if self.has_input() {
            self.bells.cancel_sleep(MANAGER_SLOT);
            return;
        }
        let fds: Vec<RawFd> = self.ports.iter().filter_map(|p| p.port.rx_fd()).collect();
        let _ = self.bells.wait(MANAGER_SLOT, deadline - now, &fds);
        self.counters.add(ProcCounter::Wakeups as usize, 1);
    }

    pub fn run(mut self) -> Outcome {
        let started = Instant::now();
        let mut last_publish = started;
        let mut last_service = started;
        let mut last_work = started;
        let mut batch = Vec::with_capacity(BURST);
        let mut tx: Vec<Vec<Packet>> = (0..self.ports.len())
            .map(|_| Vec::with_capacity(BURST))
            .collect();
        // Test hook: the data plane's own failure (a bug), to check that nfmgr fails loudly.
        let panic_at = std::env::var("NFMGR_FAILPOINTS")
            .is_ok_and(|v| v.split(',').any(|f| f.trim() == "dataplane-panic"))
            .then(|| started + Duration::from_secs(1));
        loop {
            if !self.handle_commands() {
                break;
            }
            let now = Instant::now();
            if panic_at.is_some_and(|t| now >= t) {
                panic!("failpoint dataplane-panic");
            }
            // Drain before admitting: packets the processes already worked on are worth more
            // than new ones, and under overload the drop belongs at ingress (the device queue,
            // the generator's schedule), not inside the platform.
            let mut moved = self.transmit(&mut tx);
            moved += self.reclaim_some();
            if !self.egress_backlogged() {
                moved += self.receive(now, &mut batch);
            }
            moved += self.service_relay();
            // Processes allocate rarely and recycle in batches; a millisecond is plenty.
            if now.duration_since(last_service) >= POOL_SERVICE_EVERY {
                self.service_pool();
                last_service = now;
            }
            let mut w = std::mem::take(&mut self.wake);
            while w != 0 {
                self.bells.notify(w.trailing_zeros() as u16);
                w &= w - 1;
            }
            self.counters.add(ProcCounter::Loops as usize, 1);
            if now.duration_since(last_publish) >= self.publish_every {
                self.publish(started);
                last_publish = now;
            }
            let worked = moved > 0;
            self.check_sources_done(worked, now);
            if worked {
                last_work = now;
            } else if !self.busy_poll && now.duration_since(last_work) >= self.poll_for {
                self.service_pool();
                self.publish(started);
                self.sleep(now);
            } else if self.busy_poll {
                std::hint::spin_loop();
            } else {
                nflib::endpoint::yield_cpu();
            }
        }
        // Shutdown: processes are stopped; take back what they sent us, then close ports.
        let mut tx2: Vec<Vec<Packet>> = (0..self.ports.len()).map(|_| Vec::new()).collect();
        while self.transmit(&mut tx2) > 0 {}
        for s in 1..self.region.slot_count() {
            self.pool.service(s, false);
        }
        let now = Instant::now();
        for ps in &mut self.ports {
            let mut ctx = PortCtx {
                region: &self.region,
                pool: &mut self.pool,
                counters: &mut ps.counters,
                now,
            };
            ps.port.close(&mut ctx);
            if let Some(r) = ps.recorder.as_mut() {
                r.close();
            }
        }
        self.publish(started);
        Outcome {
            ports: self
                .ports
                .iter()
                .map(|p| (p.name.clone(), p.port.report()))
                .collect(),
        }
    }
}
