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

use nflib::config::NewFlows;
use nflib::nf::tcp_flags as tcp;
use nflib::packet::build::{TcpV4, UdpV4};
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

/// A new-flow generator's state (`port.new_flows`): flows are numbered as they start and
/// never come back (until 2^24 of them wrap); a TCP flow is a whole connection, both ways.
struct Churn {
    mode: NewFlows,
    /// Flows started.
    flows: u64,
    /// The packet of the current TCP connection to send next.
    step: usize,
}

/// The TCP connection a new-flow generator plays for each flow: (from the client, flags,
/// payload). Sequence numbers follow from these.
const TCP_CONNECTION: [(bool, u8, usize); 7] = [
    (true, tcp::SYN, 0),
    (false, tcp::SYN | tcp::ACK, 0),
    (true, tcp::ACK, 0),
    (true, tcp::ACK | tcp::PSH, STAMP_LEN),
    (true, tcp::FIN | tcp::ACK, 0),
    (false, tcp::FIN | tcp::ACK, 0),
    (true, tcp::ACK, 0),
];

/// The client address and port of new flow `n` (in 11.0.0.0/8, apart from the numbered
/// flows' 10.0.0.0/8).
fn churn_tuple(n: u64) -> ([u8; 4], u16) {
    let f = (n & 0xff_ffff) as u32;
    (
        (0x0b00_0001u32 + (f >> 12)).to_be_bytes(),
        10_000 + (f & 0xfff) as u16,
    )
}

pub struct Generator {
    /// First flow id (flow ids are unique across an nfmgr's generators).
    flow_base: u32,
    flows: u32,
    /// Packets per second per flow; 0 = as fast as possible.
    rate: f64,
    size: usize,
    duration: Option<Duration>,
    /// Nothing is sent until this long after the first call.
    delay: Duration,
    first_call: Option<Instant>,
    start: Option<Instant>,
    next_flow: u32,
    seq: Vec<u64>,
    /// Packets due so far (sent + skipped).
    emitted: u64,
    skipped: u64,
    done: bool,
    churn: Option<Churn>,
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
            delay: Duration::ZERO,
            first_call: None,
            start: None,
            next_flow: 0,
            seq: vec![0; flows.max(1) as usize],
            emitted: 0,
            skipped: 0,
            done: false,
            churn: None,
        }
    }

    /// Begins sending `delay` after the port first runs.
    pub fn start_after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Makes this a generator of nothing but new flows; its rate is then the total.
    pub fn new_flows(mut self, mode: NewFlows) -> Self {
        self.churn = Some(Churn {
            mode,
            flows: 0,
            step: 0,
        });
        self.seq = Vec::new();
        self
    }

    fn total_rate(&self) -> f64 {
        if self.churn.is_some() {
            self.rate
        } else {
            self.rate * self.flows as f64
        }
    }

    /// Writes the next packet of the new-flow sequence into `p`.
    fn build_churn(&mut self, ctx: &mut PortCtx<'_>, p: &mut Packet, now_ns: u64) -> bool {
        let Some(c) = self.churn.as_mut() else {
            return false;
        };
        let (client, cport) = churn_tuple(c.flows);
        let room = ctx.region.room_mut(p);
        let len = match c.mode {
            NewFlows::Udp => {
                c.flows += 1;
                UdpV4 {
                    src_mac: GEN_SRC_MAC,
                    dst_mac: GEN_DST_MAC,
                    src_ip: client,
                    dst_ip: GEN_DST_IP,
                    src_port: cport,
                    dst_port: GEN_DST_PORT,
                    payload_len: self.size - UdpV4::HEADER_LEN,
                }
                .write(room)
            }
            NewFlows::Tcp => {
                let (from_client, flags, payload) = TCP_CONNECTION[c.step];
                // Client sequence numbers from 1000, the server's from 5000: each side's
                // SYN and FIN take one, the data its length.
                let sent_before = |client_side: bool| -> u32 {
                    TCP_CONNECTION[..c.step]
                        .iter()
                        .filter(|(fc, _, _)| *fc == client_side)
                        .map(|(_, f, len)| *len as u32 + u32::from(f & (tcp::SYN | tcp::FIN) != 0))
                        .sum()
                };
                let (cseq, sseq) = (1000 + sent_before(true), 5000 + sent_before(false));
                let hdr = if from_client {
                    TcpV4 {
                        src_mac: GEN_SRC_MAC,
                        dst_mac: GEN_DST_MAC,
                        src_ip: client,
                        dst_ip: GEN_DST_IP,
                        src_port: cport,
                        dst_port: GEN_DST_PORT,
                        seq: cseq,
                        ack: if c.step == 0 { 0 } else { sseq },
                        flags,
                        payload_len: payload,
                    }
                } else {
                    TcpV4 {
                        src_mac: GEN_DST_MAC,
                        dst_mac: GEN_SRC_MAC,
                        src_ip: GEN_DST_IP,
                        dst_ip: client,
                        src_port: GEN_DST_PORT,
                        dst_port: cport,
                        seq: sseq,
                        ack: cseq,
                        flags,
                        payload_len: payload,
                    }
                };
                c.step += 1;
                if c.step == TCP_CONNECTION.len() {
                    c.step = 0;
                    c.flows += 1;
                }
                let len = hdr.write(room);
                if payload >= STAMP_LEN {
                    // The data segment carries a stamp (the sink counts its flow).
                    Stamp {
                        flow: u32::MAX,
                        seq: 0,
                        sent_ns: now_ns,
                    }
                    .write(&mut room[TcpV4::HEADER_LEN..]);
                }
                len
            }
        };
        match len {
            Some(len) => ctx.region.set_len(p, len),
            None => false,
        }
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
        let first = *self.first_call.get_or_insert(ctx.now);
        if ctx.now.saturating_duration_since(first) < self.delay {
            return;
        }
        let start = *self.start.get_or_insert(ctx.now);
        let elapsed = ctx.now.saturating_duration_since(start);
        // Packet k (from 0) is due at k / rate: the first at once, and `duration x rate` of
        // them in all (the last one a period before the end), not one short.
        let total = self
            .duration
            .filter(|_| self.rate > 0.0)
            .map(|d| (d.as_secs_f64() * self.total_rate()).round() as u64);
        if let Some(d) = self.duration {
            if elapsed >= d && total.is_none_or(|t| self.emitted >= t) {
                self.done = true;
                ctx.counters.set(PortCounter::GenDone as usize, 1);
                return;
            }
        }
        let (due, may_skip) = if self.rate > 0.0 {
            let target = ((elapsed.as_secs_f64() * self.total_rate()) as u64 + 1)
                .min(total.unwrap_or(u64::MAX));
            (
                (target.saturating_sub(self.emitted) as usize).min(MAX_PER_CALL),
                true,
            )
        } else {
            (max.min(MAX_PER_CALL), false)
        };
        let now_ns = mono_ns();
        if self.churn.is_some() {
            for i in 0..due {
                if i >= max {
                    self.emitted += 1;
                    self.skipped += 1;
                    ctx.count(PortCounter::RxDropRingFull, 1);
                    continue;
                }
                let Some(mut p) = ctx.pool.alloc() else {
                    ctx.count(PortCounter::RxDropNoBuffer, 1);
                    break;
                };
                if !self.build_churn(ctx, &mut p, now_ns) {
                    ctx.pool.free(p);
                    break;
                }
                self.emitted += 1;
                out.push(p);
            }
            ctx.counters
                .set(PortCounter::GenSent as usize, self.emitted - self.skipped);
            ctx.counters.set(
                PortCounter::GenFlows as usize,
                self.churn.as_ref().map_or(0, |c| c.flows),
            );
            return;
        }
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
        let next = Duration::from_secs_f64(self.emitted as f64 / self.total_rate());
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
        if let Some(c) = &self.churn {
            return Some(serde_json::json!({
                "new_flows": format!("{:?}", c.mode).to_lowercase(),
                "flows_started": c.flows,
                "rate_pps": self.rate,
                "sent": self.emitted - self.skipped,
                "skipped": self.skipped,
            }));
        }
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
