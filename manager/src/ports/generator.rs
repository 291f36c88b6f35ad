//! `gen:` a traffic generator of N UDP flows at a rate per flow, like the paper's generators.
//!
//! Each packet carries, right after the UDP header, a 22-byte stamp: a magic byte and
//! version, the flow id, a per-flow sequence number and the send time. The `sink:` port reads
//! the stamp to count loss, duplicates and reordering per flow, whatever NFs rewrote the
//! headers on the way.
//!
//! With a rate, packets are due on a schedule; packets the vswitch ring cannot take when they
//! are due are dropped (their sequence numbers are skipped, so the sink sees the loss). With
//! rate 0 the generator sends as fast as the ring accepts, never skipping a sequence number
//! (throughput benchmarks).

use std::time::{Duration, Instant};

use nflib::packet::build::UdpV4;
use nflib::stats::{PortCounter, PortKind};
use nflib::Packet;

use super::{discard, mono_ns, Port, PortCtx};

pub const STAMP_MAGIC: u8 = 0xa5;
pub const STAMP_VERSION: u8 = 1;
pub const STAMP_LEN: usize = 22;

/// The stamp a generator writes into each payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub flow: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

impl Stamp {
    pub fn write(&self, out: &mut [u8]) {
        out[0] = STAMP_MAGIC;
        out[1] = STAMP_VERSION;
        out[2..6].copy_from_slice(&self.flow.to_be_bytes());
        out[6..14].copy_from_slice(&self.seq.to_be_bytes());
        out[14..22].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    pub fn read(payload: &[u8]) -> Option<Stamp> {
        if payload.len() < STAMP_LEN || payload[0] != STAMP_MAGIC || payload[1] != STAMP_VERSION {
            return None;
        }
        Some(Stamp {
            flow: u32::from_be_bytes(payload[2..6].try_into().ok()?),
            seq: u64::from_be_bytes(payload[6..14].try_into().ok()?),
            sent_ns: u64::from_be_bytes(payload[14..22].try_into().ok()?),
        })
    }
}

/// Addresses of generated flow `f` (unique 5-tuples for up to 2^24 flows).
pub fn flow_tuple(f: u32) -> ([u8; 4], u16) {
    let ip = 0x0a00_0001u32 + (f >> 12);
    (ip.to_be_bytes(), 10_000 + (f & 0xfff) as u16)
}

pub const GEN_DST_IP: [u8; 4] = [10, 255, 255, 1];
pub const GEN_DST_PORT: u16 = 9;
pub const GEN_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GEN_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub struct Generator {
    /// First flow id (flow ids are unique across an nfmgr's generators).
    flow_base: u32,
    flows: u32,
    /// Packets per second per flow; 0 = as fast as possible.
    rate: f64,
    size: usize,
    duration: Option<Duration>,
    start: Option<Instant>,
    next_flow: u32,
    seq: Vec<u64>,
    /// Packets due so far (sent + skipped).
    emitted: u64,
    skipped: u64,
    done: bool,
}

/// Most packets produced per call (keeps one port from monopolising the loop).
const MAX_PER_CALL: usize = 64;

impl Generator {
    pub fn new(
        flow_base: u32,
        flows: u32,
        rate: f64,
        size: usize,
        duration: Option<Duration>,
    ) -> Self {
        Generator {
            flow_base,
            flows: flows.max(1),
            rate,
            size: size.max(UdpV4::HEADER_LEN + STAMP_LEN),
            duration,
            start: None,
            next_flow: 0,
            seq: vec![0; flows.max(1) as usize],
            emitted: 0,
            skipped: 0,
            done: false,
        }
    }

    fn total_rate(&self) -> f64 {
        self.rate * self.flows as f64
    }

    fn build(
        &mut self,
        ctx: &mut PortCtx<'_>,
        p: &mut Packet,
        f: u32,
        seq: u64,
        now_ns: u64,
    ) -> bool {
        let (src_ip, src_port) = flow_tuple(self.flow_base + f);
        let hdr = UdpV4 {
            src_mac: GEN_SRC_MAC,
            dst_mac: GEN_DST_MAC,
            src_ip,
            dst_ip: GEN_DST_IP,
            src_port,
            dst_port: GEN_DST_PORT,
            payload_len: self.size - UdpV4::HEADER_LEN,
        };
        let room = ctx.region.room_mut(p);
        let Some(len) = hdr.write(room) else {
            return false;
        };
        Stamp {
            flow: self.flow_base + f,
            seq,
            sent_ns: now_ns,
        }
        .write(&mut room[UdpV4::HEADER_LEN..]);
        ctx.region.set_len(p, len)
    }
}

impl Port for Generator {
    fn kind(&self) -> PortKind {
        PortKind::Generator
    }

    fn rx(&mut self, ctx: &mut PortCtx<'_>, out: &mut Vec<Packet>, max: usize) {
        if self.done {
            return;
        }
        let start = *self.start.get_or_insert(ctx.now);
        let elapsed = ctx.now.saturating_duration_since(start);
        if let Some(d) = self.duration {
            if elapsed >= d {
                self.done = true;
                ctx.counters.set(PortCounter::GenDone as usize, 1);
                return;
            }
        }
        let (due, may_skip) = if self.rate > 0.0 {
            let target = (elapsed.as_secs_f64() * self.total_rate()) as u64;
            (
                (target.saturating_sub(self.emitted) as usize).min(MAX_PER_CALL),
                true,
            )
        } else {
            (max.min(MAX_PER_CALL), false)
        };
        let now_ns = mono_ns();
        for i in 0..due {
            let f = self.next_flow;
            self.next_flow = (self.next_flow + 1) % self.flows;
            let seq = self.seq[f as usize];
            if i >= max {
                // The vswitch cannot take it now: with a schedule, the packet is lost.
                debug_assert!(may_skip);
                self.seq[f as usize] += 1;
                self.emitted += 1;
                self.skipped += 1;
                ctx.count(PortCounter::RxDropRingFull, 1);
                continue;
            }
            let Some(mut p) = ctx.pool.alloc() else {
                ctx.count(PortCounter::RxDropNoBuffer, 1);
                if may_skip {
                    self.seq[f as usize] += 1;
                    self.emitted += 1;
                    self.skipped += 1;
                    continue;
                }
                // Undo the flow advance so the sequence stays gap-free.
                self.next_flow = f;
                break;
            };
            if !self.build(ctx, &mut p, f, seq, now_ns) {
                ctx.pool.free(p);
                break;
            }
            self.seq[f as usize] += 1;
            self.emitted += 1;
            out.push(p);
        }
        ctx.counters
            .set(PortCounter::GenSent as usize, self.emitted - self.skipped);
        ctx.counters
            .set(PortCounter::GenFlows as usize, self.flows as u64);
    }

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        // A generator is not a destination; count what was sent to it as errors.
        discard(ctx, pkts, PortCounter::TxErrors);
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        if self.done {
            return None;
        }
        let start = self.start?;
        if self.rate <= 0.0 {
            return Some(now);
        }
        let next = Duration::from_secs_f64((self.emitted + 1) as f64 / self.total_rate());
        let mut at = start + next;
        if let Some(d) = self.duration {
            at = at.min(start + d);
        }
        Some(at)
    }

    fn finished(&self) -> bool {
        self.done
    }

    fn is_source(&self) -> bool {
        true
    }

    fn report(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "flows": self.flows,
            "flow_base": self.flow_base,
            "rate_pps_per_flow": self.rate,
            "packet_size": self.size,
            "sent": self.emitted - self.skipped,
            "skipped": self.skipped,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let s = Stamp {
            flow: 77,
            seq: 1 << 40,
            sent_ns: 123,
        };
        let mut b = [0u8; STAMP_LEN];
        s.write(&mut b);
        assert_eq!(Stamp::read(&b), Some(s));
        b[0] = 0;
        assert_eq!(Stamp::read(&b), None);
    }

    #[test]
    fn flow_tuples_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for f in (0..1 << 24).step_by(4093) {
            assert!(seen.insert(flow_tuple(f)));
        }
    }
}
