//! `sink:` counts what it receives per generated flow: loss, duplicates, reordering and
//! latency, from the stamps `gen:` writes. Frames without a stamp are counted as foreign.
//!
//! Per flow the sink keeps the next expected sequence number and a 128-bit window of which
//! recent numbers arrived. A gap is counted as loss when it appears; a number that arrives
//! late (inside the window) turns one lost packet into a reordered one; a number seen twice is
//! a duplicate. Beyond the window a late packet still counts as reordered (it cannot be
//! checked for duplication).

use nflib::packet::{self, proto};
use nflib::stats::{PortCounter, PortKind};
use nflib::Packet;

use super::generator::Stamp;
use super::{mono_ns, Port, PortCtx};

/// Flow ids above this are treated as foreign (bounds the per-flow table).
const MAX_FLOWS: usize = 1 << 24;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTrack {
    pub next: u64,
    window: u128,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// When its last packet arrived, and the longest silence between two of its packets
    /// (a failover drill's per-flow gap).
    pub last_ns: u64,
    pub max_gap_ns: u64,
}

impl FlowTrack {
    /// Notes an arrival at `now_ns` for the flow's longest silence.
    pub fn arrived(&mut self, now_ns: u64) {
        if self.last_ns != 0 {
            self.max_gap_ns = self.max_gap_ns.max(now_ns.saturating_sub(self.last_ns));
        }
        self.last_ns = now_ns;
    }

    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
            self.window = (self.window << 1) | 1;
        } else if seq > self.next {
            let gap = seq - self.next;
            self.lost += gap;
            self.window = if gap + 1 >= 128 {
                1
            } else {
                (self.window << (gap + 1)) | 1
            };
            self.next = seq + 1;
        } else {
            let d = self.next - 1 - seq;
            if d >= 128 {
                self.reordered += 1;
                self.lost = self.lost.saturating_sub(1);
            } else if self.window & (1u128 << d) != 0 {
                self.duplicates += 1;
            } else {
                self.window |= 1u128 << d;
                self.reordered += 1;
                self.lost = self.lost.saturating_sub(1);
            }
        }
    }
}

#[derive(Default)]
pub struct Sink {
    flows: Vec<FlowTrack>,
    active: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    foreign: u64,
    latency_sum: u64,
    latency_max: u64,
    /// Latencies, log-linear: 8 buckets per power of two (within 12.5 %), for percentiles.
    latency_hist: Vec<u64>,
}

/// The histogram bucket of a latency of `ns`.
fn bucket(ns: u64) -> usize {
    if ns < 8 {
        return ns as usize;
    }
    let b = 63 - ns.leading_zeros() as usize;
    b * 8 + ((ns >> (b - 3)) & 7) as usize
}

/// The smallest latency that falls in bucket `i`.
fn bucket_floor(i: usize) -> u64 {
    if i < 8 {
        return i as u64;
    }
    let (b, m) = (i / 8, (i % 8) as u64);
    (8 + m) << (b - 3)
}

impl Sink {
    pub fn new() -> Sink {
        Sink::default()
    }

    fn stamp_of(frame: &[u8]) -> Option<Stamp> {
        let h = packet::parse(frame).ok()?;
        if h.proto != proto::UDP || h.l4_off == 0 {
            return None;
        }
        let start = h.l4_off as usize + 8;
        frame.get(start..h.l3_end as usize).and_then(Stamp::read)
    }

    fn account(&mut self, s: Stamp, now_ns: u64) {
        let f = s.flow as usize;
        if f >= MAX_FLOWS {
            self.foreign += 1;
            return;
        }
        if f >= self.flows.len() {
            self.flows
                .resize((f + 1).next_power_of_two(), FlowTrack::default());
        }
        let t = &mut self.flows[f];
        if t.received == 0 {
            self.active += 1;
        }
        let before = (t.lost, t.duplicates, t.reordered);
        t.record(s.seq);
        t.arrived(now_ns);
        self.lost = self.lost + t.lost - before.0;
        self.duplicates += t.duplicates - before.1;
        self.reordered += t.reordered - before.2;
        self.received += 1;
        let lat = now_ns.saturating_sub(s.sent_ns);
        self.latency_sum += lat;
        self.latency_max = self.latency_max.max(lat);
        if self.latency_hist.is_empty() {
            self.latency_hist = vec![0; 64 * 8];
        }
        self.latency_hist[bucket(lat)] += 1;
    }

    /// The latency below which fraction `q` of packets arrived (bucket floor).
    fn latency_quantile(&self, q: f64) -> u64 {
        let total: u64 = self.latency_hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.latency_hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return bucket_floor(i);
            }
        }
        self.latency_max
    }

    /// Per-flow state, for reports and tests.
    pub fn flows(&self) -> impl Iterator<Item = (u32, &FlowTrack)> {
        self.flows
            .iter()
            .enumerate()
            .filter(|(_, t)| t.received > 0)
            .map(|(i, t)| (i as u32, t))
    }
}

impl Port for Sink {
    fn kind(&self) -> PortKind {
        PortKind::Sink
    }

    fn rx(&mut self, _ctx: &mut PortCtx<'_>, _out: &mut Vec<Packet>, _max: usize) {}

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        let now = mono_ns();
        let mut bytes = 0;
        let n = pkts.len() as u64;
        for p in pkts.drain(..) {
            bytes += p.len() as u64;
            match Self::stamp_of(ctx.region.data(&p)) {
                Some(s) => self.account(s, now),
                None => self.foreign += 1,
            }
            ctx.pool.free(p);
        }
        ctx.count(PortCounter::TxPkts, n);
        ctx.count(PortCounter::TxBytes, bytes);
        let c = &mut ctx.counters;
        c.set(PortCounter::SinkRx as usize, self.received);
        c.set(PortCounter::SinkFlows as usize, self.active);
        c.set(PortCounter::SinkLost as usize, self.lost);
        c.set(PortCounter::SinkDuplicates as usize, self.duplicates);
        c.set(PortCounter::SinkReordered as usize, self.reordered);
        c.set(PortCounter::SinkForeign as usize, self.foreign);
        c.set(PortCounter::SinkLatencyNsSum as usize, self.latency_sum);
        c.set(PortCounter::SinkLatencyNsMax as usize, self.latency_max);
    }

    fn report(&self) -> Option<serde_json::Value> {
        let affected = |f: fn(&FlowTrack) -> u64| self.flows().filter(|(_, t)| f(t) > 0).count();
        // The flows that suffered most, for a first look at what went wrong.
        let mut worst: Vec<(u32, &FlowTrack)> = self
            .flows()
            .filter(|(_, t)| t.lost + t.duplicates + t.reordered > 0)
            .collect();
        worst.sort_by_key(|(_, t)| std::cmp::Reverse(t.lost + t.duplicates + t.reordered));
        let worst: Vec<serde_json::Value> = worst
            .iter()
            .take(10)
            .map(|(f, t)| {
                serde_json::json!({
                    "flow": f, "received": t.received, "lost": t.lost,
                    "duplicates": t.duplicates, "reordered": t.reordered,
                })
            })
            .collect();
        Some(serde_json::json!({
            "flows": self.active,
            "received": self.received,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "foreign": self.foreign,
            "flows_with_loss": affected(|t| t.lost),
            "flows_with_duplicates": affected(|t| t.duplicates),
            "flows_with_reordering": affected(|t| t.reordered),
            "worst_flows": worst,
            "latency_avg_ns": self.latency_sum.checked_div(self.received).unwrap_or(0),
            "latency_max_ns": self.latency_max,
            "latency_p50_ns": self.latency_quantile(0.5),
            "latency_p99_ns": self.latency_quantile(0.99),
            // Per flow (by id), its longest silence, for drills (bounded: a million flows
            // would make the report tens of megabytes).
            "max_gap_ms": self
                .flows()
                .take(200_000)
                .map(|(f, t)| (f.to_string(), serde_json::json!(t.max_gap_ns as f64 / 1e6)))
                .collect::<serde_json::Map<_, _>>(),
            // Per flow that lost packets, how many (drills tell the flows a fault hit from
            // the others).
            "lost_by_flow": self
                .flows()
                .filter(|(_, t)| t.lost > 0)
                .take(200_000)
                .map(|(f, t)| (f.to_string(), serde_json::json!(t.lost)))
                .collect::<serde_json::Map<_, _>>(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_within_an_eighth() {
        for ns in [0u64, 7, 8, 9, 100, 1_000, 12_345, 1 << 40] {
            let f = bucket_floor(bucket(ns));
            assert!(f <= ns && ns - f <= ns / 8, "{ns} -> {f}");
        }
        let mut s = Sink::new();
        for (i, lat) in [10_000u64, 20_000, 30_000, 1_000_000].iter().enumerate() {
            s.account(
                Stamp {
                    flow: 0,
                    seq: i as u64,
                    sent_ns: 1,
                },
                1 + lat,
            );
        }
        assert!((9_000..=10_000).contains(&s.latency_quantile(0.25)));
        assert!(s.latency_quantile(0.99) > 800_000);
    }

    fn run(seqs: &[u64]) -> FlowTrack {
        let mut t = FlowTrack::default();
        for s in seqs {
            t.record(*s);
        }
        t
    }

    #[test]
    fn in_order_is_clean() {
        let t = run(&[0, 1, 2, 3]);
        assert_eq!((t.lost, t.duplicates, t.reordered), (0, 0, 0));
    }

    #[test]
    fn gaps_late_arrivals_and_duplicates() {
        assert_eq!(run(&[0, 2, 3]).lost, 1);
        let t = run(&[0, 2, 1, 3]);
        assert_eq!((t.lost, t.reordered, t.duplicates), (0, 1, 0));
        let t = run(&[0, 1, 1, 2]);
        assert_eq!((t.lost, t.reordered, t.duplicates), (0, 0, 1));
        let t = run(&[0, 3, 1, 1]);
        assert_eq!((t.lost, t.reordered, t.duplicates), (1, 1, 1));
        let t = run(&[0, 500, 1]);
        assert_eq!((t.lost, t.reordered), (498, 1));
    }
}
