//! A process's attachment to the data plane: everything nf-vswitch and nf-runtime need to
//! receive, send, allocate and free packets, sleep when idle and publish their counters.
//!
//! An endpoint holds the consumer side of every ring addressed to its slot and the producer
//! side of every ring leaving it. Receiving claims each buffer for this slot before releasing
//! the ring slot (see `Region::claim`), so whatever the process holds when it is killed is
//! found and reclaimed by nfmgr. Messages are always read before data.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::buffer::{Desc, Packet};
use crate::doorbell::{DoorbellError, Doorbells};
use crate::layout::RingId;
use crate::pool::PoolCache;
use crate::region::{Region, RegionError};
use crate::ring::{Consumer, Producer};
use crate::slot::{ProcessKind, SlotState};
use crate::stats::{LocalCounters, ProcCounter, PROC_COUNTERS};

/// Descriptors read or written per ring operation.
pub const BURST: usize = 32;

/// Packets a worker takes per loop iteration (several ring bursts).
pub const BATCH: usize = 128;

#[derive(Debug, Error)]
pub enum EndpointError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
    #[error("slot {0} does not exist in this region")]
    NoSuchSlot(u16),
    #[error("slot {slot} is {state:?}, not prepared for a process (was this started by nfmgr?)")]
    NotStarting { slot: u16, state: SlotState },
    #[error("slot {slot} is configured as {found:?}, not {expected:?}")]
    WrongKind {
        slot: u16,
        found: ProcessKind,
        expected: ProcessKind,
    },
    #[error("the rings of slot {0} are missing from the region")]
    MissingRings(u16),
}

struct Input {
    from: u16,
    ring: Consumer<Desc>,
}

pub struct Endpoint {
    region: Region,
    me: u16,
    generation: u32,
    bells: Doorbells,
    data_in: Vec<Input>,
    msg_in: Vec<Input>,
    data_out: Vec<Option<Producer<Desc>>>,
    msg_out: Vec<Option<Producer<Desc>>>,
    pool: PoolCache,
    counters: LocalCounters<PROC_COUNTERS>,
    next_input: usize,
    wake: u64,
    /// Set when a ring this process sent to is more than half full: on a shared core the
    /// consumer needs the CPU, so the loop yields (see `Idle::after`).
    congested: bool,
    started: Instant,
    /// Monotonic nanoseconds by which the loop must run again (a transport timer), if any.
    wake_at_ns: Option<u64>,
}

impl Endpoint {
    /// Attaches to the region as slot `slot`, which nfmgr must have prepared for a process of
    /// kind `kind`.
    pub fn attach(path: &Path, slot: u16, kind: ProcessKind) -> Result<Endpoint, EndpointError> {
        let region = Region::attach(path)?;
        let rec = region.slot(slot).ok_or(EndpointError::NoSuchSlot(slot))?;
        let state = rec.state();
        if state != SlotState::Starting {
            return Err(EndpointError::NotStarting { slot, state });
        }
        if rec.kind() != kind {
            return Err(EndpointError::WrongKind {
                slot,
                found: rec.kind(),
                expected: kind,
            });
        }
        let generation = rec.generation.load(Ordering::Acquire);
        let bells = Doorbells::inherit(&region)?;
        let slots = region.slot_count();
        let mut data_in = Vec::new();
        let mut msg_in = Vec::new();
        let mut data_out = Vec::new();
        let mut msg_out = Vec::new();
        for other in 0..slots {
            if other == slot {
                data_out.push(None);
                msg_out.push(None);
                continue;
            }
            let missing = || EndpointError::MissingRings(slot);
            data_in.push(Input {
                from: other,
                ring: Consumer::new(
                    region
                        .ring(RingId::Data {
                            from: other,
                            to: slot,
                        })
                        .ok_or_else(missing)?,
                ),
            });
            msg_in.push(Input {
                from: other,
                ring: Consumer::new(
                    region
                        .ring(RingId::Message {
                            from: other,
                            to: slot,
                        })
                        .ok_or_else(missing)?,
                ),
            });
            data_out.push(Some(Producer::new(
                region
                    .ring(RingId::Data {
                        from: slot,
                        to: other,
                    })
                    .ok_or_else(missing)?,
            )));
            msg_out.push(Some(Producer::new(
                region
                    .ring(RingId::Message {
                        from: slot,
                        to: other,
                    })
                    .ok_or_else(missing)?,
            )));
        }
        let pool = PoolCache::new(&region, slot, BURST).ok_or(EndpointError::MissingRings(slot))?;
        let counters = LocalCounters::resume(&rec.counters.0);
        Ok(Endpoint {
            region,
            me: slot,
            generation,
            bells,
            data_in,
            msg_in,
            data_out,
            msg_out,
            pool,
            counters,
            next_input: 0,
            wake: 0,
            congested: false,
            started: Instant::now(),
            wake_at_ns: None,
        })
    }

    /// A transport session for this process: above the last one any process in this slot
    /// used, and normally the wall-clock time, so that it also exceeds what a previous nfmgr
    /// run handed out.
    pub fn new_session(&self) -> u64 {
        let Some(rec) = self.region.slot(self.me) else {
            return crate::time::wall_ns();
        };
        let prev = rec.session.load(Ordering::Acquire);
        // Room for the bumps a transport makes when it gives up on a peer.
        let s = crate::time::wall_ns().max(prev + (1 << 20));
        rec.session.store(s, Ordering::Release);
        s
    }

    /// The loop must run again by this monotonic time (None: no deadline), even if no
    /// packet arrives: idle sleeps end then.
    pub fn wake_by(&mut self, at_ns: Option<u64>) {
        self.wake_at_ns = at_ns;
    }

    /// Tells nfmgr this process is up (after its own initialisation).
    pub fn announce_running(&self) {
        if let Some(rec) = self.region.slot(self.me) {
            rec.set_state(SlotState::Running);
        }
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn slot(&self) -> u16 {
        self.me
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn counters(&mut self) -> &mut LocalCounters<PROC_COUNTERS> {
        &mut self.counters
    }

    /// True once nfmgr asked this process to exit (or the region is going away).
    pub fn stop_requested(&self) -> bool {
        let region_down = self.region.header().state() == crate::region::RegionState::ShuttingDown;
        let asked = self
            .region
            .slot(self.me)
            .map(|r| r.stop.load(Ordering::Acquire) != 0)
            .unwrap_or(true);
        region_down || asked
    }

    /// Whether this slot's process busy-polls instead of sleeping.
    pub fn busy_poll(&self) -> bool {
        self.region
            .slot(self.me)
            .map(|r| r.busy_poll.load(Ordering::Relaxed) != 0)
            .unwrap_or(false)
    }

    fn recv_from(
        region: &Region,
        me: u16,
        inputs: &mut [Input],
        start: usize,
        out: &mut Vec<(u16, Packet)>,
        max: usize,
        counters: &mut LocalCounters<PROC_COUNTERS>,
    ) -> usize {
        let mut got = 0;
        let n_inputs = inputs.len();
        let mut descs = [Desc::default(); BURST];
        for k in 0..n_inputs {
            if got >= max {
                break;
            }
            let input = &mut inputs[(start + k) % n_inputs];
            // Several ring bursts from one input per call: more work per wake-up (and per
            // context switch on a shared core), still bounded by `max`.
            while got < max {
                let want = (max - got).min(BURST);
                let n = input.ring.peek_burst(&mut descs[..want]);
                if n == 0 {
                    break;
                }
                for d in &descs[..n] {
                    region.prefetch(d);
                }
                for d in &descs[..n] {
                    match region.claim(*d, input.from as u32, me as u32) {
                        Some(p) => {
                            out.push((input.from, p));
                            got += 1;
                        }
                        None => counters.add(ProcCounter::DropInvalidDesc as usize, 1),
                    }
                }
                input.ring.release(n);
            }
        }
        got
    }

    /// Receives up to `max` data packets, fairly across input rings, with the slot each came
    /// from.
    pub fn recv_burst(&mut self, out: &mut Vec<(u16, Packet)>, max: usize) -> usize {
        let start = self.next_input;
        self.next_input = (self.next_input + 1) % self.data_in.len().max(1);
        let n = Self::recv_from(
            &self.region,
            self.me,
            &mut self.data_in,
            start,
            out,
            max,
            &mut self.counters,
        );
        self.counters.add(ProcCounter::RxPkts as usize, n as u64);
        n
    }

    /// Receives up to `max` messages (always polled before data).
    pub fn recv_messages(&mut self, out: &mut Vec<(u16, Packet)>, max: usize) -> usize {
        let n = Self::recv_from(
            &self.region,
            self.me,
            &mut self.msg_in,
            0,
            out,
            max,
            &mut self.counters,
        );
        self.counters.add(ProcCounter::MsgRx as usize, n as u64);
        n
    }

    fn send_on(&mut self, to: u16, pkts: &mut Vec<Packet>, message: bool) -> usize {
        let mut descs = [Desc::default(); BURST];
        let mut sent = 0;
        let mut bytes = 0u64;
        let mut dropped = Vec::new();
        {
            let ring = if message {
                self.msg_out.get_mut(to as usize)
            } else {
                self.data_out.get_mut(to as usize)
            };
            let Some(Some(ring)) = ring else {
                dropped.append(pkts);
                for p in dropped {
                    self.pool.free(p);
                    self.counters.add(ProcCounter::DropRingFull as usize, 1);
                }
                return 0;
            };
            let mut iter = pkts.drain(..);
            loop {
                let mut n = 0;
                for p in iter.by_ref().take(BURST) {
                    bytes += p.len() as u64;
                    descs[n] = p.into_desc();
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                let pushed = ring.push_burst(&descs[..n]);
                sent += pushed;
                if pushed < n || ring.view().occupancy() > ring.view().capacity() / 2 {
                    self.congested = true;
                }
                for d in &descs[pushed..n] {
                    bytes -= d.len as u64;
                    dropped.push(Packet::from_valid_desc(*d));
                }
            }
        }
        if !dropped.is_empty() {
            // The consumer's overload signal (several producers may add to it).
            if let Some(rec) = self.region.slot(to) {
                rec.input_drops
                    .0
                    .fetch_add(dropped.len() as u64, Ordering::Relaxed);
            }
        }
        for p in dropped {
            self.pool.free(p);
            self.counters.add(ProcCounter::DropRingFull as usize, 1);
        }
        if sent > 0 {
            self.wake |= 1u64 << to;
            if message {
                self.counters.add(ProcCounter::MsgTx as usize, sent as u64);
            } else {
                self.counters.add(ProcCounter::TxPkts as usize, sent as u64);
                self.counters.add(ProcCounter::TxBytes as usize, bytes);
            }
        }
        sent
    }

    /// Sends data packets to slot `to`, in order. What does not fit in the ring is freed and
    /// counted as `drop_ring_full`. `pkts` is emptied. Returns how many were sent.
    pub fn send_burst(&mut self, to: u16, pkts: &mut Vec<Packet>) -> usize {
        self.send_on(to, pkts, false)
    }

    /// Sends messages to slot `to` (same semantics as `send_burst`).
    pub fn send_messages(&mut self, to: u16, pkts: &mut Vec<Packet>) -> usize {
        self.send_on(to, pkts, true)
    }

    /// Whether a consumer's ring filled past half since the last call (and clears the flag).
    pub fn take_congestion(&mut self) -> bool {
        std::mem::take(&mut self.congested)
    }

    /// Free slots in the data ring to `to`.
    pub fn room_to(&mut self, to: u16) -> u32 {
        match self.data_out.get_mut(to as usize) {
            Some(Some(r)) => r.free_space(),
            _ => 0,
        }
    }

    /// Asks the process in `slot` to keep polling, not sleep, until `until_ns` (monotonic),
    /// and wakes it now if it sleeps: for a burst of messages whose every hop would
    /// otherwise start with a wake-up. Costs the other process a core's idle time meanwhile,
    /// so callers ask for milliseconds, renewed while the burst lasts.
    pub fn keep_awake(&mut self, slot: u16, until_ns: u64) {
        let Some(rec) = self.region.slot(slot) else {
            return;
        };
        if rec.awake_until_ns.0.fetch_max(until_ns, Ordering::AcqRel) < until_ns && slot < 64 {
            self.wake |= 1u64 << slot;
        }
    }

    /// Whether a peer asked this process to keep polling (`keep_awake`) until a time not yet
    /// passed.
    pub fn kept_awake(&self) -> bool {
        self.region.slot(self.me).is_some_and(|r| r.kept_awake())
    }

    /// Rings the doorbells of every slot sent to since the last call (if they sleep).
    pub fn flush_wakes(&mut self) {
        let mut w = std::mem::take(&mut self.wake);
        while w != 0 {
            let slot = w.trailing_zeros() as u16;
            self.bells.notify(slot);
            w &= w - 1;
        }
    }

    pub fn alloc(&mut self) -> Option<Packet> {
        let p = self.pool.alloc();
        if self.pool.take_starving() {
            // nfmgr refills caches when it services the pool; if it sleeps, wake it.
            self.wake |= 1u64 << crate::MANAGER_SLOT;
        }
        p
    }

    pub fn free(&mut self, p: Packet) {
        self.pool.free(p);
    }

    pub fn data<'a>(&'a self, p: &'a Packet) -> &'a [u8] {
        self.region.data(p)
    }

    pub fn data_mut<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        self.region.data_mut(p)
    }

    /// Whether any input ring (data or messages) has something.
    pub fn has_input(&mut self) -> bool {
        self.msg_in.iter_mut().any(|i| !i.ring.is_empty())
            || self.data_in.iter_mut().any(|i| !i.ring.is_empty())
    }

    /// Sleeps until a producer rings the doorbell or `timeout` passes, unless input arrived
    /// meanwhile. Returns true if it actually slept.
    pub fn sleep(&mut self, timeout: Duration) -> bool {
        let timeout = match self.wake_at_ns {
            Some(at) => {
                let now = crate::time::mono_ns();
                if at <= now {
                    return false;
                }
                timeout.min(Duration::from_nanos(at - now))
            }
            None => timeout,
        };
        self.bells.prepare_sleep(self.me);
        if self.has_input() || self.stop_requested() {
            self.bells.cancel_sleep(self.me);
            return false;
        }
        let _ = self.bells.wait(self.me, timeout, &[]);
        self.counters.add(ProcCounter::Wakeups as usize, 1);
        true
    }

    /// Publishes the counters (and the buffers held in the pool cache, and a heartbeat).
    pub fn publish(&mut self) {
        self.counters
            .set(ProcCounter::CachedBufs as usize, self.pool.cached() as u64);
        self.counters.set(
            ProcCounter::HeartbeatMs as usize,
            self.started.elapsed().as_millis() as u64,
        );
        if let Some(rec) = self.region.slot(self.me) {
            self.counters.publish(&rec.counters.0);
        }
    }

    /// Returns cached buffers to nfmgr and publishes final counters. Called on clean exit.
    pub fn shutdown(&mut self) {
        self.pool.flush();
        self.publish();
    }
}

/// How a worker loop waits when it finds no work.
#[derive(Clone, Copy, Debug)]
pub struct IdlePolicy {
    /// Keep polling this long after the last work before sleeping.
    pub poll_for: Duration,
    /// Longest sleep (housekeeping such as timers and the stop flag runs at least this often).
    pub max_sleep: Duration,
    /// Never sleep (dedicated cores).
    pub busy_poll: bool,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            poll_for: Duration::from_micros(50),
            max_sleep: Duration::from_millis(100),
            busy_poll: false,
        }
    }
}

/// Tracks idleness for a worker loop.
///
/// While polling without work the loop calls `sched_yield` rather than spinning: on a core
/// of its own that returns at once, and on a core shared with other data-plane processes it
/// hands the CPU to whichever of them has work, instead of burning a scheduler time slice
/// (milliseconds, long enough for a ring to overflow at millions of packets per second).
pub struct Idle {
    policy: IdlePolicy,
    last_work: Instant,
    polls: u32,
}

/// Idle polls between clock reads.
const POLLS_PER_CLOCK_READ: u32 = 16;

impl Idle {
    pub fn new(policy: IdlePolicy) -> Idle {
        Idle {
            policy,
            last_work: Instant::now(),
            polls: 0,
        }
    }

    /// Call after each loop iteration with whether it did any work.
    pub fn after(&mut self, ep: &mut Endpoint, worked: bool) {
        if ep.take_congestion() && !self.policy.busy_poll {
            yield_cpu();
        }
        if worked {
            self.polls = 0;
            return;
        }
        if self.polls == 0 {
            self.last_work = Instant::now();
        }
        self.polls += 1;
        if self.policy.busy_poll {
            std::hint::spin_loop();
            return;
        }
        if self.polls % POLLS_PER_CLOCK_READ != 0 || self.last_work.elapsed() < self.policy.poll_for
        {
            yield_cpu();
            return;
        }
        if ep.kept_awake() {
            yield_cpu();
            return;
        }
        self.polls = 0;
        ep.publish();
        ep.sleep(self.policy.max_sleep);
    }
}

/// Gives the CPU to another runnable task on this core, if there is one.
pub fn yield_cpu() {
    std::thread::yield_now();
}
