//! Per-flow dispatch: which runtime each flow goes to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nflib::endpoint::Endpoint;
use nflib::flow::FlowKey;
use nflib::packet::{self, ParseError};
use nflib::slot::SlotState;
use nflib::stats::ProcCounter;
use nflib::{Packet, Region};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NonIp {
    Pass,
    Drop,
}

struct Entry {
    runtime: u16,
    /// Seconds since the dispatcher started, when the flow last had a packet.
    last_seen: u32,
}

pub struct Dispatch {
    me: u16,
    /// Keyed with a per-process random seed: flow keys come from the wire, and a fixed hash
    /// would let a sender collide them on purpose.
    table: HashMap<FlowKey, Entry, foldhash::fast::RandomState>,
    live: Vec<u16>,
    next: usize,
    non_ip: NonIp,
    timeout: Duration,
    stage: Vec<Vec<Packet>>,
    epoch: Instant,
}

impl Dispatch {
    pub fn new(region: &Region, me: u16, non_ip: NonIp, timeout: Duration) -> Dispatch {
        let mut d = Dispatch {
            me,
            table: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            live: Vec::new(),
            next: 0,
            non_ip,
            timeout,
            stage: (0..region.slot_count()).map(|_| Vec::new()).collect(),
            epoch: Instant::now(),
        };
        d.refresh_targets(region);
        d
    }

    /// Re-reads which of this vswitch's runtimes are alive.
    pub fn refresh_targets(&mut self, region: &Region) {
        let mask = region.slot(self.me).map(|s| s.targets()).unwrap_or(0);
        self.live.clear();
        for s in 0..region.slot_count().min(64) {
            if mask & (1u64 << s) == 0 {
                continue;
            }
            let up = region
                .slot(s)
                .map(|r| matches!(r.state(), SlotState::Running | SlotState::Starting))
                .unwrap_or(false);
            if up {
                self.live.push(s);
            }
        }
    }

    fn pick(&mut self) -> Option<u16> {
        if self.live.is_empty() {
            return None;
        }
        let rt = self.live[self.next % self.live.len()];
        self.next = self.next.wrapping_add(1);
        Some(rt)
    }

    pub fn dispatch(&mut self, ep: &mut Endpoint, batch: &mut Vec<(u16, Packet)>, now: Instant) {
        let now_s = now.saturating_duration_since(self.epoch).as_secs() as u32;
        for (_, p) in batch.drain(..) {
            let h = match packet::parse(ep.data(&p)) {
                Ok(h) => h,
                Err(e) => {
                    let c = match e {
                        ParseError::Runt => ProcCounter::DropRunt,
                        ParseError::Truncated(_) => ProcCounter::DropTruncated,
                        ParseError::Malformed(..) => ProcCounter::DropMalformed,
                    };
                    ep.counters().add(c as usize, 1);
                    ep.free(p);
                    continue;
                }
            };
            if !h.is_ip() && self.non_ip == NonIp::Drop {
                ep.counters().add(ProcCounter::DropNonIp as usize, 1);
                ep.free(p);
                continue;
            }
            let (key, _) = FlowKey::of(&h);
            // One lookup for the common case: a known flow on a live runtime.
            if let Some(e) = self.table.get_mut(&key) {
                if self.live.contains(&e.runtime) {
                    e.last_seen = now_s;
                    self.stage[e.runtime as usize].push(p);
                    continue;
                }
            }
            // New flow, or its runtime died: pick the next live one.
            let Some(runtime) = self.pick() else {
                ep.counters().add(ProcCounter::DropNoRuntime as usize, 1);
                ep.free(p);
                continue;
            };
            let entry = Entry {
                runtime,
                last_seen: now_s,
            };
            if self.table.insert(key, entry).is_none() {
                ep.counters().add(ProcCounter::FlowsCreated as usize, 1);
            }
            self.stage[runtime as usize].push(p);
        }
        for rt in 0..self.stage.len() {
            if !self.stage[rt].is_empty() {
                let mut out = std::mem::take(&mut self.stage[rt]);
                ep.send_burst(rt as u16, &mut out);
                self.stage[rt] = out;
            }
        }
        ep.counters()
            .set(ProcCounter::FlowsActive as usize, self.table.len() as u64);
    }

    /// Forgets flows idle for longer than the timeout.
    pub fn expire(&mut self, ep: &mut Endpoint, now: Instant) {
        let before = self.table.len();
        let now_s = now.saturating_duration_since(self.epoch).as_secs() as u32;
        // Whole seconds: a flow lives between `timeout` and `timeout` + 1 s after its last packet.
        let timeout_s = self.timeout.as_secs().max(1) as u32;
        self.table
            .retain(|_, e| now_s.saturating_sub(e.last_seen) < timeout_s);
        let expired = (before - self.table.len()) as u64;
        ep.counters()
            .add(ProcCounter::FlowsExpired as usize, expired);
        ep.counters()
            .set(ProcCounter::FlowsActive as usize, self.table.len() as u64);
    }
}
