//! nfmgr's ports: where frames enter and leave the host.
//!
//! Every port kind fills pool buffers on receive and consumes them on transmit; what happens
//! between ports (vswitch, runtimes) only moves descriptors. A port never blocks the
//! data-plane thread: receive takes at most what the vswitch's ring can accept right now,
//! and transmit drops (and counts) what the device cannot take.

pub mod afpacket;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod generator;
pub mod pcap;
pub mod sink;

use std::os::fd::RawFd;
use std::time::Instant;

use nflib::pool::ManagerPool;
use nflib::stats::{LocalCounters, PortCounter, PortKind, PORT_COUNTERS};
use nflib::{Packet, Region};

/// What a port may use while receiving or transmitting.
pub struct PortCtx<'a> {
    pub region: &'a Region,
    pub pool: &'a mut ManagerPool,
    pub counters: &'a mut LocalCounters<PORT_COUNTERS>,
    pub now: Instant,
}

impl PortCtx<'_> {
    pub fn count(&mut self, c: PortCounter, n: u64) {
        self.counters.add(c as usize, n);
    }
}

pub trait Port: Send {
    fn kind(&self) -> PortKind;

    /// Receives up to `max` frames into freshly allocated packets appended to `out`.
    fn rx(&mut self, ctx: &mut PortCtx<'_>, out: &mut Vec<Packet>, max: usize);

    /// Transmits `pkts` (emptying it). Every packet is either sent or dropped and counted;
    /// either way its buffer goes back to the pool.
    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>);

    /// A descriptor that becomes readable when frames arrive (for sleeping).
    fn rx_fd(&self) -> Option<RawFd> {
        None
    }

    /// When this port next has frames to produce by itself (generator pacing, replay timing).
    fn next_wake(&self, _now: Instant) -> Option<Instant> {
        None
    }

    /// A source (generator, replay) that will produce nothing more.
    fn finished(&self) -> bool {
        false
    }

    /// Whether this port produces traffic by itself and eventually finishes.
    fn is_source(&self) -> bool {
        false
    }

    /// Periodic housekeeping off the packet path (device statistics).
    fn housekeeping(&mut self, _counters: &mut LocalCounters<PORT_COUNTERS>) {}

    /// Details for the final report.
    fn report(&self) -> Option<serde_json::Value> {
        None
    }

    /// Flushes and releases the device at shutdown (buffers it returns go to `ctx.pool`).
    fn close(&mut self, _ctx: &mut PortCtx<'_>) {}
}

/// `null:` swallows what it is sent and receives nothing (benchmarks, pure recorders).
pub struct NullPort;

impl Port for NullPort {
    fn kind(&self) -> PortKind {
        PortKind::Null
    }

    fn rx(&mut self, _ctx: &mut PortCtx<'_>, _out: &mut Vec<Packet>, _max: usize) {}

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        discard(ctx, pkts, PortCounter::TxPkts);
    }
}

/// Frees `pkts`, counting them under `counter` (and their bytes as transmitted when the
/// counter is `TxPkts`).
pub fn discard(ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>, counter: PortCounter) {
    let n = pkts.len() as u64;
    let bytes: u64 = pkts.iter().map(|p| p.len() as u64).sum();
    for p in pkts.drain(..) {
        ctx.pool.free(p);
    }
    ctx.count(counter, n);
    if counter == PortCounter::TxPkts {
        ctx.count(PortCounter::TxBytes, bytes);
    }
}

pub use nflib::time::{mono_ns, wall_ns};
