//! Per-flow dispatch: which runtime each flow goes to (the paper's vswitch actors).
//!
//! A new flow is steered to a service chain by the first `[[steer]]` rule its first packet
//! matches (NFLambda's match -> tag -> chain), else the vswitch's default chain, and given to
//! the next live runtime of that chain, round-robin. Every later packet of the flow, either
//! direction, and packets under aliases the runtime registered, go to the same runtime. The
//! frame's destination MAC becomes the runtime's input MAC on the way (the original is kept
//! in the buffer's metadata and restored by the runtime).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nflib::config::{Config, Match, MatchInput};
use nflib::endpoint::{Endpoint, BURST};
use nflib::flow::FlowKey;
use nflib::msg::{self, Message};
use nflib::packet::{self, arp, Headers, ParseError, L3};
use nflib::slot::{input_mac, SlotState};
use nflib::stats::ProcCounter;
use nflib::{Packet, Region};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Keyed with a per-process random seed: flow keys come from the wire, and a fixed hash
    /// would let a sender collide them on purpose.
    table: HashMap<FlowKey, Entry, foldhash::fast::RandomState>,
    steering: Vec<(Match, usize)>,
    default_chain: Option<usize>,
    /// Runtime slots of each chain among this vswitch's targets, and those alive now.
    chain_slots: Vec<Vec<u16>>,
    live: Vec<Vec<u16>>,
    next: Vec<usize>,
    non_ip: NonIp,
    timeout: Duration,
    stage: Vec<Vec<Packet>>,
    epoch: Instant,
    msgs: Vec<(u16, Packet)>,
}

/// What steering looks at in a flow's first packet.
fn match_input(h: &Headers, frame: &[u8]) -> MatchInput {
    if let Some(a) = arp::parse(h, frame) {
        return MatchInput {
            arp: true,
            src: FlowKey::v4(a.spa),
            dst: FlowKey::v4(a.tpa),
            ..MatchInput::default()
        };
    }
    MatchInput {
        ip: h.is_ip(),
        arp: false,
        v6: h.l3 == L3::Ipv6,
        src: h.src_ip,
        dst: h.dst_ip,
        proto: h.proto,
        src_port: h.src_port,
        dst_port: h.dst_port,
    }
}

impl Dispatch {
    /// Builds the dispatcher of the vswitch in slot `me` from the configuration.
    pub fn new(region: &Region, me: u16, cfg: &Config) -> Result<Dispatch, String> {
        let name = region.slot(me).map(|s| s.name.get()).unwrap_or_default();
        let vc = cfg
            .vswitch(&name)
            .ok_or_else(|| format!("no vswitch named `{name}` in the configuration"))?;
        // Chains by index; runtimes without a chain form one more, unnamed group.
        let mut chains: Vec<Option<String>> =
            cfg.chains.iter().map(|c| Some(c.name.clone())).collect();
        chains.push(None);
        let mut chain_slots = vec![Vec::new(); chains.len()];
        let targets = region.slot(me).map(|s| s.targets()).unwrap_or(0);
        for s in 0..region.slot_count().min(64) {
            if targets & (1u64 << s) == 0 {
                continue;
            }
            let rname = region.slot(s).map(|r| r.name.get()).unwrap_or_default();
            let Some(rc) = cfg.runtime(&rname) else {
                continue;
            };
            let chain = cfg.chain_of(rc).map(str::to_string);
            if let Some(i) = chains.iter().position(|c| *c == chain) {
                chain_slots[i].push(s);
            }
        }
        let index = |n: &str| chains.iter().position(|c| c.as_deref() == Some(n));
        let steering = cfg
            .steering
            .iter()
            .filter_map(|r| index(&r.chain).map(|i| (r.matches.clone(), i)))
            .collect();
        let served: Vec<usize> = (0..chains.len())
            .filter(|i| !chain_slots[*i].is_empty())
            .collect();
        let default_chain = match &vc.default_chain {
            Some(c) => index(c),
            None if served.len() == 1 => Some(served[0]),
            None => None,
        };
        let n = chains.len();
        let mut d = Dispatch {
            table: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            steering,
            default_chain,
            chain_slots,
            live: vec![Vec::new(); n],
            next: vec![0; n],
            non_ip: match vc.non_ip {
                nflib::config::NonIpPolicy::Pass => NonIp::Pass,
                nflib::config::NonIpPolicy::Drop => NonIp::Drop,
            },
            timeout: Duration::from_millis(vc.flow_timeout_ms),
            stage: (0..region.slot_count()).map(|_| Vec::new()).collect(),
            epoch: Instant::now(),
            msgs: Vec::with_capacity(BURST),
        };
        d.refresh_targets(region);
        Ok(d)
    }

    /// Re-reads which runtimes are alive.
    pub fn refresh_targets(&mut self, region: &Region) {
        for (c, slots) in self.chain_slots.iter().enumerate() {
            self.live[c].clear();
            for &s in slots {
                let up = region
                    .slot(s)
                    .map(|r| matches!(r.state(), SlotState::Running | SlotState::Starting))
                    .unwrap_or(false);
                if up {
                    self.live[c].push(s);
                }
            }
        }
    }

    /// Reads messages from runtimes: aliases to learn, flows to forget.
    pub fn handle_messages(&mut self, ep: &mut Endpoint) -> usize {
        let n = ep.recv_messages(&mut self.msgs, BURST);
        let now_s = self.epoch.elapsed().as_secs() as u32;
        let mut replies = Vec::new();
        let mut msgs = std::mem::take(&mut self.msgs);
        for (from, m) in msgs.drain(..) {
            match msg::decode(ep.region(), &m) {
                Some(Message::AddAlias { key }) => {
                    self.table.insert(
                        key,
                        Entry {
                            runtime: from,
                            last_seen: now_s,
                        },
                    );
                }
                Some(Message::FlowEnded { keys }) => {
                    for k in keys {
                        if self.table.get(&k).is_some_and(|e| e.runtime == from) {
                            self.table.remove(&k);
                        }
                    }
                }
                Some(Message::SetRuntime {
                    keys,
                    runtime,
                    request,
                }) => {
                    let moved = self.set_runtime(&keys, runtime);
                    replies.push((from, Message::RuntimeSet { request, moved }));
                }
                Some(_) | None => ep.counters().add(ProcCounter::DropInvalidDesc as usize, 1),
            }
            ep.free(m);
        }
        self.msgs = msgs;
        for (to, reply) in replies {
            if let Some(mut buf) = ep.alloc() {
                if msg::encode(ep.region(), &mut buf, &reply) {
                    ep.send_messages(to, &mut vec![buf]);
                } else {
                    ep.free(buf);
                }
            }
        }
        n
    }

    /// Points known flows at another runtime (one of this vswitch's targets). Returns how
    /// many of the keys were known.
    pub fn set_runtime(&mut self, keys: &[FlowKey], runtime: u16) -> u32 {
        if !self.chain_slots.iter().any(|c| c.contains(&runtime)) {
            return 0;
        }
        let mut moved = 0;
        for k in keys {
            if let Some(e) = self.table.get_mut(k) {
                e.runtime = runtime;
                moved += 1;
            }
        }
        moved
    }

    fn chain_for(&self, h: &Headers, frame: &[u8]) -> Option<usize> {
        if self.steering.is_empty() {
            return self.default_chain;
        }
        let input = match_input(h, frame);
        self.steering
            .iter()
            .find(|(m, _)| m.matches(&input))
            .map(|(_, c)| *c)
            .or(self.default_chain)
    }

    fn pick(&mut self, chain: usize) -> Option<u16> {
        let live = &self.live[chain];
        if live.is_empty() {
            return None;
        }
        let rt = live[self.next[chain] % live.len()];
        self.next[chain] = self.next[chain].wrapping_add(1);
        Some(rt)
    }

    fn is_live(&self, rt: u16) -> bool {
        self.live.iter().any(|l| l.contains(&rt))
    }

    pub fn dispatch(&mut self, ep: &mut Endpoint, batch: &mut Vec<(u16, Packet)>, now: Instant) {
        let now_s = now.saturating_duration_since(self.epoch).as_secs() as u32;
        let region = ep.region().clone();
        for (_, mut p) in batch.drain(..) {
            let frame = region.data(&p);
            let h = match packet::parse(frame) {
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
            let mut runtime = self.known(&key, now_s);
            if runtime.is_none() {
                // A runtime may have registered this key (an alias) just before the packet
                // that made it necessary left: read messages once more before deciding.
                self.handle_messages(ep);
                runtime = self.known(&key, now_s);
            }
            let runtime = match runtime {
                Some(rt) => rt,
                None => {
                    let Some(chain) = self.chain_for(&h, region.data(&p)) else {
                        ep.counters().add(ProcCounter::DropNoChain as usize, 1);
                        ep.free(p);
                        continue;
                    };
                    let Some(rt) = self.pick(chain) else {
                        ep.counters().add(ProcCounter::DropNoRuntime as usize, 1);
                        ep.free(p);
                        continue;
                    };
                    let entry = Entry {
                        runtime: rt,
                        last_seen: now_s,
                    };
                    if self.table.insert(key, entry).is_none() {
                        ep.counters().add(ProcCounter::FlowsCreated as usize, 1);
                    }
                    rt
                }
            };
            // Address the frame to the runtime, keeping its own destination for later.
            let data = region.data_mut(&mut p);
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&data[..6]);
            region.meta_of(&p).save_dst_mac(dst);
            region.data_mut(&mut p)[..6].copy_from_slice(&input_mac(0, runtime));
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

    /// The runtime of a known flow, if it is alive (refreshing the flow's last packet time).
    fn known(&mut self, key: &FlowKey, now_s: u32) -> Option<u16> {
        let e = self.table.get_mut(key)?;
        e.last_seen = now_s;
        let rt = e.runtime;
        self.is_live(rt).then_some(rt)
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

#[cfg(test)]
mod tests {
    use super::*;
    use nflib::buffer::Desc;
    use nflib::layout::RingId;
    use nflib::local::LocalRegion;
    use nflib::packet::build::UdpV4;
    use nflib::pool::ManagerPool;
    use nflib::ring::{Consumer, Producer};
    use nflib::slot::ProcessKind;
    use std::sync::atomic::Ordering;

    const CONFIG: &str =
        "[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt0\"\n[[runtime]]\nname = \"rt1\"\n";

    fn frame(port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        UdpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 0, 0, 2],
            src_port: port,
            dst_port: 53,
            payload_len: 22,
        }
        .write(&mut b)
        .unwrap();
        b
    }

    #[test]
    fn a_flow_moves_to_another_runtime_on_request() {
        let local = LocalRegion::new(
            "vsmove",
            CONFIG,
            &[
                (1, ProcessKind::Vswitch, "vs"),
                (2, ProcessKind::Runtime, "rt0"),
                (3, ProcessKind::Runtime, "rt1"),
            ],
            |_| {},
        )
        .unwrap();
        let r = &local.region;
        r.slot(1).unwrap().targets.store(0b1100, Ordering::Relaxed);
        let mut pool = ManagerPool::new(r, 64);
        pool.service(1, true);
        let mut ep = Endpoint::attach(local.path(), 1, ProcessKind::Vswitch).unwrap();
        let mut d = Dispatch::new(r, 1, &local.config).unwrap();
        let mut to_vs = Producer::new(r.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
        let send = |to_vs: &mut Producer<Desc>, pool: &mut ManagerPool| {
            let mut p = pool.alloc().unwrap();
            r.fill(&mut p, &frame(1000));
            assert!(to_vs.push(p.into_desc()));
        };
        let mut batch = Vec::new();
        let occupancy = |rt: u16| {
            r.ring::<Desc>(RingId::Data { from: 1, to: rt })
                .unwrap()
                .occupancy()
        };

        send(&mut to_vs, &mut pool);
        ep.recv_burst(&mut batch, 8);
        d.dispatch(&mut ep, &mut batch, Instant::now());
        let first = if occupancy(2) == 1 { 2 } else { 3 };
        let other = 5 - first;
        assert_eq!(occupancy(first), 1);

        // nfmgr (slot 0) asks for the flow to move.
        let h = packet::parse(&frame(1000)).unwrap();
        let (key, _) = FlowKey::of(&h);
        let mut m = pool.alloc().unwrap();
        assert!(msg::encode(
            r,
            &mut m,
            &Message::SetRuntime {
                keys: vec![key],
                runtime: other,
                request: 42
            }
        ));
        let mut to_vs_msg =
            Producer::new(r.ring::<Desc>(RingId::Message { from: 0, to: 1 }).unwrap());
        assert!(to_vs_msg.push(m.into_desc()));
        assert_eq!(d.handle_messages(&mut ep), 1);
        let mut replies =
            Consumer::new(r.ring::<Desc>(RingId::Message { from: 1, to: 0 }).unwrap());
        let mut out = [Desc::default(); 2];
        assert_eq!(replies.peek_burst(&mut out), 1);
        let reply = r.claim(out[0], 1, 0).unwrap();
        replies.release(1);
        assert_eq!(
            msg::decode(r, &reply),
            Some(Message::RuntimeSet {
                request: 42,
                moved: 1
            })
        );
        pool.free(reply);

        // The flow's next packet goes to the other runtime.
        send(&mut to_vs, &mut pool);
        ep.recv_burst(&mut batch, 8);
        d.dispatch(&mut ep, &mut batch, Instant::now());
        assert_eq!(occupancy(other), 1);
        assert_eq!(occupancy(first), 1, "nothing more to the old runtime");
        // A runtime that is not a target is refused.
        assert_eq!(d.set_runtime(&[key], 9), 0);
    }
}
