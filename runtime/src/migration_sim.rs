//! Simulation of the migration protocol: two runtimes (`Migrator` + a toy engine), a vswitch
//! and a network with per-path latency, run on simulated time.
//!
//! Every path (vswitch -> runtime data, runtime <-> runtime and runtime <-> vswitch
//! messages) is FIFO, as the rings and the reliable transport are, but paths have different
//! and jittery latencies, and messages are sometimes held for long (a retransmission after a
//! loss), so packets the vswitch sent to the source before the switch can arrive after
//! packets it sent to the target, and answers can come after timeouts. The toy engine's
//! "function state" is the list of sequence numbers the flow processed; it moves with the
//! flow, so at the end each flow's list says exactly what was lost, duplicated or reordered.

use std::collections::{BTreeMap, HashMap, VecDeque};

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::msg::{states, FlowState, Message, MigrateFlow, MovedPacket};

use crate::migration::{
    Candidate, FlowHost, FlowRef, Mark, MigrationSettings, Migrator, PacketAction, Release,
    GROUP_ID_LIMIT,
};
use crate::sim_rng::Rng;

const S: EndpointAddr = EndpointAddr { server: 1, slot: 2 };
const T: EndpointAddr = EndpointAddr { server: 2, slot: 2 };
const V: EndpointAddr = EndpointAddr { server: 1, slot: 1 };
/// The vswitch's message path (a path of its own: answers do not queue behind data).
const V_MSG: EndpointAddr = EndpointAddr {
    server: 1,
    slot: 101,
};

fn key(f: u32) -> FlowKey {
    FlowKey::from_tuple(
        4,
        17,
        0,
        (FlowKey::v4([10, 0, (f >> 8) as u8, f as u8]), 1000),
        (FlowKey::v4([10, 9, 9, 9]), 53),
    )
    .0
}

fn alias(f: u32) -> FlowKey {
    FlowKey::from_tuple(
        4,
        17,
        0,
        (FlowKey::v4([192, 0, (f >> 8) as u8, f as u8]), 2000),
        (FlowKey::v4([10, 9, 9, 9]), 53),
    )
    .0
}

#[derive(Default)]
struct ToyFlow {
    log: Vec<u64>,
    packets: u32,
    diverted: bool,
    /// What the migrator marked it with, while diverted.
    mark: Mark,
}

/// The engine of one toy runtime.
#[derive(Default)]
struct Toy {
    flows: HashMap<FlowKey, ToyFlow>,
    aliases: HashMap<FlowKey, FlowKey>,
    held: HashMap<FlowKey, VecDeque<u64>>,
    outbox: Vec<(EndpointAddr, Message)>,
    cursor: Vec<FlowKey>,
    scan_started: bool,
    /// Packets processed by a flow this runtime did not know (a second owner).
    strays: u64,
}

impl Toy {
    fn canonical(&self, k: &FlowKey) -> FlowKey {
        *self.aliases.get(k).unwrap_or(k)
    }

    fn process(&mut self, k: &FlowKey, seq: u64) {
        let f = self.flows.entry(*k).or_default();
        f.log.push(seq);
        f.packets = f.packets.wrapping_add(1);
    }

    /// Toy frames carry the flow's key and the sequence number.
    fn moved(k: &FlowKey, seq: u64) -> MovedPacket {
        MovedPacket {
            ingress: 0,
            egress: 0,
            origin_server: 1,
            origin_vswitch: 1,
            frame: postcard::to_allocvec(&(*k, seq)).unwrap(),
        }
    }
}

impl FlowHost for Toy {
    fn pick(&mut self, n: usize, out: &mut Vec<Candidate>) -> bool {
        if !self.scan_started {
            self.scan_started = true;
            let mut keys: Vec<FlowKey> = self.flows.keys().copied().collect();
            keys.sort();
            self.cursor = keys;
        }
        while out.len() < n {
            let Some(k) = self.cursor.pop() else { break };
            if self.flows.get(&k).is_some_and(|f| !f.diverted) {
                let aliases = self
                    .aliases
                    .iter()
                    .filter(|(_, c)| **c == k)
                    .map(|(a, _)| *a)
                    .collect();
                out.push(Candidate {
                    key: k,
                    // The toy keeps flows by key: no row to name.
                    row: FlowRef::NO_ROW,
                    aliases,
                    vswitch: V,
                });
            }
        }
        !self.cursor.is_empty()
    }

    fn packets(&self, f: &FlowRef) -> Option<u32> {
        self.flows.get(&f.key).map(|f| f.packets)
    }

    fn divert(&mut self, at: &FlowRef, group: Option<u64>) -> bool {
        let Some(f) = self.flows.get_mut(&at.key) else {
            return false;
        };
        assert!(group.is_none_or(|g| g < GROUP_ID_LIMIT));
        if group.is_some() && f.diverted {
            return false;
        }
        f.diverted = group.is_some();
        f.mark = group.map_or(Mark::None, Mark::Out);
        true
    }

    fn save(&mut self, at: &FlowRef, out: &mut Vec<u8>) -> Option<FlowState> {
        let f = self.flows.get(&at.key)?;
        let start = out.len();
        states::push(out, |out| {
            out.extend_from_slice(&postcard::to_allocvec(&f.log).unwrap());
            true
        });
        Some(FlowState {
            idx: 0,
            flags: 0,
            age_ms: 0,
            idle_ms: 0,
            missing: 0,
            states_len: (out.len() - start) as u32,
            home: EndpointAddr::new(1, 9),
        })
    }

    fn group_of(&self, at: &FlowRef) -> Option<u64> {
        self.flows
            .get(&at.key)
            .filter(|f| f.diverted)
            .and_then(|f| match f.mark {
                Mark::Out(g) => Some(g),
                _ => None,
            })
    }

    fn create_pending(
        &mut self,
        flow: &MigrateFlow,
        _vswitch: EndpointAddr,
        arriving: u32,
    ) -> Option<u32> {
        assert!(u64::from(arriving) < GROUP_ID_LIMIT);
        let taken = |k: &FlowKey| self.flows.contains_key(k) || self.aliases.contains_key(k);
        if taken(&flow.key) || flow.aliases.iter().any(taken) {
            return None;
        }
        self.flows.insert(
            flow.key,
            ToyFlow {
                diverted: true,
                mark: Mark::In(arriving),
                ..ToyFlow::default()
            },
        );
        for a in &flow.aliases {
            self.aliases.insert(*a, flow.key);
        }
        Some(FlowRef::NO_ROW)
    }

    fn install(&mut self, at: &FlowRef, _st: &FlowState, part: &[u8]) -> bool {
        let Some(f) = self.flows.get_mut(&at.key) else {
            return false;
        };
        let mut reader = states::Reader::new(part);
        let log = reader.next_state().unwrap().unwrap();
        assert!(reader.is_done());
        f.log = postcard::from_bytes(log).unwrap();
        f.packets = 0;
        f.diverted = false;
        f.mark = Mark::None;
        true
    }

    fn release_held(&mut self, at: &FlowRef, how: Release) -> u32 {
        let key = &at.key;
        let q = self.held.remove(key).unwrap_or_default();
        let n = q.len() as u32;
        match how {
            Release::Process => {
                for seq in q {
                    self.process(key, seq);
                }
            }
            Release::Return { to, group } => {
                if !q.is_empty() {
                    self.outbox.push((
                        to,
                        Message::MigratePackets {
                            group,
                            late: false,
                            packets: q.into_iter().map(|seq| Toy::moved(key, seq)).collect(),
                        },
                    ));
                }
            }
            Release::Discard => {}
        }
        n
    }

    fn remove_pending(&mut self, at: &FlowRef) {
        self.held.remove(&at.key);
        self.flows.remove(&at.key);
        self.aliases.retain(|_, c| *c != at.key);
    }

    fn retire(&mut self, at: &FlowRef) {
        self.remove_pending(at);
    }

    fn end_stray(&mut self, key: &FlowKey) -> bool {
        let k = self.canonical(key);
        if self.flows.get(&k).is_none_or(|f| f.diverted) {
            return false;
        }
        self.remove_pending(&FlowRef::key_only(k));
        true
    }

    fn send(&mut self, to: EndpointAddr, msg: Message) {
        self.outbox.push((to, msg));
    }
}

struct Node {
    mig: Migrator,
    toy: Toy,
    alive: bool,
}

impl Node {
    /// A data packet (or a packet carried in a message, `force`d when returned).
    fn packet(&mut self, k: &FlowKey, seq: u64, force: bool) {
        let k = self.toy.canonical(k);
        let Some(f) = self.toy.flows.get(&k) else {
            // A flow this runtime never had: it becomes its owner (as a runtime does).
            self.toy.strays += 1;
            self.toy.process(&k, seq);
            return;
        };
        if !f.diverted || force {
            self.toy.process(&k, seq);
            return;
        }
        match self.mig.on_packet(&k, f.mark) {
            PacketAction::Process => self.toy.process(&k, seq),
            PacketAction::Hold => self.toy.held.entry(k).or_default().push_back(seq),
            PacketAction::Forward { to, group, late } => self.toy.outbox.push((
                to,
                Message::MigratePackets {
                    group,
                    late,
                    packets: vec![Toy::moved(&k, seq)],
                },
            )),
            PacketAction::Drop => {}
        }
    }
}

enum Ev {
    Data {
        to: EndpointAddr,
        key: FlowKey,
        seq: u64,
    },
    Msg {
        from: EndpointAddr,
        to: EndpointAddr,
        msg: Message,
    },
}

/// What a scenario varies.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    seed: u64,
    flows: u32,
    /// Simulated microseconds between packets (over all flows).
    gap_us: u64,
    /// Latency of the vswitch's path to the source and to the target (base, jitter), us.
    to_source: (u64, u64),
    to_target: (u64, u64),
    /// Message latency (base, jitter), and a chance in 1000 of a long hold (retransmission).
    msg: (u64, u64),
    msg_hold_per_mille: u64,
    msg_hold_us: u64,
    /// The target dies at this time (us), noticed `detect_us` later.
    kill_target_at: Option<u64>,
    detect_us: u64,
    /// A new incarnation of the target starts this long after the kill (empty, at the same
    /// address, as the supervisor restarts it).
    restart_after_us: Option<u64>,
    /// The target sends every flow back to the source at this time (us).
    back_at_us: Option<u64>,
    /// The source dies at this time (us), noticed by the target `detect_us` later (its
    /// flows are then its replica's to take over, which the simulation does not run).
    kill_source_at: Option<u64>,
    /// Step 3 of odd groups names other flows than the target accepted (its digest is
    /// changed on the way).
    mismatch_odd_groups: bool,
    settings: MigrationSettings,
}

impl Scenario {
    fn base(seed: u64) -> Scenario {
        Scenario {
            seed,
            flows: 40,
            gap_us: 20,
            to_source: (5, 5),
            to_target: (5, 5),
            msg: (10, 10),
            msg_hold_per_mille: 0,
            msg_hold_us: 0,
            kill_target_at: None,
            detect_us: 2_000,
            restart_after_us: None,
            back_at_us: None,
            kill_source_at: None,
            mismatch_odd_groups: false,
            settings: MigrationSettings {
                group_size: 8,
                max_groups: 3,
                step_timeout_ms: 50,
                straggler_timeout_ms: 5,
                tombstone_ms: 40,
                pending_timeout_ms: 500,
                buffer_packets: 10_000,
                buffer_high_water: 8_000,
                max_flows_per_s: 0,
                keep_awake_us: 0,
                hand_back: false,
            },
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    /// Per flow: packets missing, duplicated, out of order in its final log.
    lost: u64,
    duplicated: u64,
    reordered: u64,
    moved: u64,
    failed: u64,
    late: u64,
    strays: u64,
    /// Packets the target's actors for unknown flows processed (a restarted target).
    stray_packets: u64,
    /// Flows owned by both runtimes at the end (never allowed).
    two_owners: u64,
    sent_to_dead: u64,
    died_with_target: u64,
    done: bool,
    /// How long the job took (the source's report).
    elapsed_us: u64,
    /// The job back (`back_at_us`): flows moved and refused.
    moved_back: u64,
    failed_back: u64,
    /// A dead source (`kill_source_at`): keys the vswitch sends to the target although
    /// its state never arrived there, keys sent back to the source whose state the target
    /// has (two owners, once the replica takes them over), flows whose key and alias part,
    /// pending actors and held packets left at the target, and the flows it gave back.
    at_target_without_state: u64,
    handed_back_installed: u64,
    split: u64,
    pending_left: u64,
    held_left: usize,
    handed_back: u64,
}

fn run(sc: Scenario) -> Outcome {
    let mut rng = Rng(sc.seed | 1);
    let mut now: u64 = 0; // us
    let mut q: BTreeMap<(u64, u64), Ev> = BTreeMap::new();
    let mut n = 0u64;
    let mut last_on_path: HashMap<(EndpointAddr, EndpointAddr), u64> = HashMap::new();
    // FIFO per path: never earlier than the previous arrival on it.
    let mut schedule = |q: &mut BTreeMap<(u64, u64), Ev>,
                        now: u64,
                        path: (EndpointAddr, EndpointAddr),
                        lat: u64,
                        ev: Ev| {
        let last = last_on_path.entry(path).or_insert(0);
        let at = (now + lat).max(*last);
        *last = at;
        n += 1;
        q.insert((at, n), ev);
    };
    let mut nodes: HashMap<EndpointAddr, Node> = HashMap::new();
    for a in [S, T] {
        nodes.insert(
            a,
            Node {
                mig: Migrator::new(a, Some("c".into()), sc.settings),
                toy: Toy::default(),
                alive: true,
            },
        );
    }
    // The vswitch: runtime and packets given since it was set, per key.
    let mut vs: HashMap<FlowKey, (EndpointAddr, u32)> = HashMap::new();
    let mut next_seq = vec![0u64; sc.flows as usize];
    // Warm up: every flow starts on the source with its alias registered.
    for f in 0..sc.flows {
        vs.insert(key(f), (S, 0));
        vs.insert(alias(f), (S, 0));
        let s = nodes.get_mut(&S).unwrap();
        s.toy.flows.insert(key(f), ToyFlow::default());
        s.toy.aliases.insert(alias(f), key(f));
    }
    let start_at = 2_000;
    let end_at = 400_000;
    let mut started = false;
    let mut back_started = false;
    let mut target_dead = false;
    let mut restarted = false;
    let mut detected = false;
    let mut source_dead = false;
    let mut source_death_seen = false;
    let mut sent_to_dead = 0u64;
    let mut next_gen = 0u64;
    let mut next_tick = 0u64;
    let mut flow_rr = 0u32;
    let lat = |rng: &mut Rng, (b, j): (u64, u64)| b + rng.below(j + 1);
    while now < end_at {
        // The next thing to happen: a packet, a tick, or a queued event.
        let next_ev = q.keys().next().map(|k| k.0).unwrap_or(u64::MAX);
        now = next_ev.min(next_gen).min(next_tick);
        if now >= end_at {
            break;
        }
        if now == next_gen {
            next_gen += sc.gap_us;
            let f = flow_rr % sc.flows;
            flow_rr += 1;
            let seq = next_seq[f as usize];
            next_seq[f as usize] += 1;
            // Half the packets come under the alias (the reply direction).
            let k = if seq % 2 == 0 { key(f) } else { alias(f) };
            let e = vs.get_mut(&k).unwrap();
            let mut to = e.0;
            if to == T && target_dead && detected && sc.restart_after_us.is_none() {
                // The vswitch no longer dispatches to a dead runtime (one that comes back
                // keeps its address, and the vswitch its entries).
                to = S;
            }
            e.1 = e.1.wrapping_add(1);
            if to == T && target_dead {
                sent_to_dead += 1;
                continue;
            }
            let l = if to == S {
                lat(&mut rng, sc.to_source)
            } else {
                lat(&mut rng, sc.to_target)
            };
            schedule(&mut q, now, (V, to), l, Ev::Data { to, key: k, seq });
            continue;
        }
        if now == next_tick {
            next_tick += 500;
            if !started && now >= start_at {
                started = true;
                let s = nodes.get_mut(&S).unwrap();
                s.mig.start_job(T, u32::MAX, now as f64 / 1000.0).unwrap();
            }
            if sc.back_at_us.is_some_and(|b| !back_started && now >= b) {
                back_started = true;
                let t = nodes.get_mut(&T).unwrap();
                t.mig.start_job(S, u32::MAX, now as f64 / 1000.0).unwrap();
            }
            if let Some(k) = sc.kill_source_at {
                if !source_dead && now >= k {
                    source_dead = true;
                    nodes.get_mut(&S).unwrap().alive = false;
                }
                if source_dead && !source_death_seen && now >= k + sc.detect_us {
                    source_death_seen = true;
                    let t = nodes.get_mut(&T).unwrap();
                    t.mig.peer_dead(&mut t.toy, S, now / 1000);
                }
            }
            if let Some(k) = sc.kill_target_at {
                if !target_dead && !restarted && now >= k {
                    target_dead = true;
                    let t = nodes.get_mut(&T).unwrap();
                    t.alive = false;
                    // What it held dies with it.
                    sent_to_dead += t.toy.held.values().map(|q| q.len() as u64).sum::<u64>();
                }
                if let Some(r) = sc.restart_after_us {
                    if target_dead && !restarted && now >= k + r {
                        restarted = true;
                        target_dead = false;
                        nodes.insert(
                            T,
                            Node {
                                mig: Migrator::new(T, Some("c".into()), sc.settings),
                                toy: Toy::default(),
                                alive: true,
                            },
                        );
                        if detected {
                            // The source's transport meets the new incarnation
                            // (`PeerEvent::Restarted`), which the runtime reports as a
                            // death of the old one.
                            let s = nodes.get_mut(&S).unwrap();
                            s.mig.peer_dead(&mut s.toy, T, now / 1000);
                        }
                    }
                }
                if (target_dead || restarted) && !detected && now >= k + sc.detect_us {
                    detected = true;
                    let s = nodes.get_mut(&S).unwrap();
                    s.mig.peer_dead(&mut s.toy, T, now / 1000);
                }
            }
            for a in [S, T] {
                let node = nodes.get_mut(&a).unwrap();
                if node.alive {
                    node.mig
                        .tick(&mut node.toy, now / 1000, now as f64 / 1000.0);
                }
            }
        } else {
            let (_, ev) = q.pop_first().unwrap();
            match ev {
                Ev::Data { to, key, seq } => {
                    let node = nodes.get_mut(&to).unwrap();
                    if node.alive {
                        node.packet(&key, seq, false);
                    } else {
                        // Lost with the dead runtime.
                        sent_to_dead += 1;
                    }
                }
                Ev::Msg { from, to, msg } if to == V => {
                    if let Message::SetRuntime {
                        keys,
                        from: expected,
                        runtime,
                        request,
                    } = msg
                    {
                        let mut sent = Vec::new();
                        let mut moved = 0;
                        for k in &keys {
                            let e = vs.get_mut(k).unwrap();
                            // As the vswitch does: a key sent to a third runtime stays.
                            if e.0 != expected && e.0 != runtime {
                                sent.push(0);
                                continue;
                            }
                            moved += 1;
                            sent.push(e.1);
                            if e.0 != runtime {
                                *e = (runtime, 0);
                            }
                        }
                        let l = lat(&mut rng, sc.msg);
                        schedule(
                            &mut q,
                            now,
                            (V_MSG, from),
                            l,
                            Ev::Msg {
                                from: V,
                                to: from,
                                msg: Message::RuntimeSet {
                                    request,
                                    moved,
                                    sent,
                                    unmoved: Vec::new(),
                                },
                            },
                        );
                    }
                }
                Ev::Msg { from, to, msg } => {
                    let node = nodes.get_mut(&to).unwrap();
                    if !node.alive {
                        if let Message::MigratePackets { packets, .. } = msg {
                            sent_to_dead += packets.len() as u64;
                        }
                        continue;
                    }
                    match msg {
                        Message::MigratePackets { packets, late, .. } => {
                            for p in packets {
                                let (k, seq): (FlowKey, u64) =
                                    postcard::from_bytes(&p.frame).unwrap();
                                node.packet(&k, seq, !late);
                            }
                        }
                        m => {
                            node.mig.on_message(&mut node.toy, from, m, now / 1000);
                        }
                    }
                }
            }
        }
        // Deliver what the runtimes sent.
        for a in [S, T] {
            let out = std::mem::take(&mut nodes.get_mut(&a).unwrap().toy.outbox);
            if !nodes[&a].alive {
                continue;
            }
            for (to, mut msg) in out {
                if let Message::MigrateState {
                    group,
                    accepted_digest,
                    ..
                } = &mut msg
                {
                    if sc.mismatch_odd_groups && *group % 2 == 1 {
                        *accepted_digest ^= 1;
                    }
                }
                let mut l = lat(&mut rng, sc.msg);
                if rng.below(1000) < sc.msg_hold_per_mille {
                    l += sc.msg_hold_us;
                }
                schedule(&mut q, now, (a, to), l, Ev::Msg { from: a, to, msg });
            }
        }
    }
    // Judge each flow by the log of the runtime that owns it at the end.
    let mut o = Outcome {
        sent_to_dead,
        ..Outcome::default()
    };
    let s = &nodes[&S];
    let t = &nodes[&T];
    if sc.kill_source_at.is_some() {
        judge_dead_source(&mut o, t, &vs, sc.flows);
        return o;
    }
    if let Some(r) = s.mig.report(0.0) {
        o.moved = r.moved;
        o.elapsed_us = r.elapsed_us;
        o.failed = r.failed;
        o.late = r.late_stragglers;
        o.done = r.done;
    }
    if let Some(r) = t.mig.report(0.0) {
        o.moved_back = r.moved;
        o.failed_back = r.failed;
    }
    o.strays = s.toy.strays + t.toy.strays;
    o.stray_packets = t.toy.strays;
    // What a migrator counts as held for arriving flows is what their actors hold: the
    // count comes back from `release_held`, and a miscount would refuse groups for ever.
    for n in [s, t].into_iter().filter(|n| n.alive) {
        let arriving: usize = n
            .toy
            .held
            .iter()
            .filter(|(k, _)| {
                n.toy
                    .flows
                    .get(*k)
                    .is_some_and(|f| matches!(f.mark, Mark::In(_)))
            })
            .map(|(_, q)| q.len())
            .sum();
        assert_eq!(n.mig.held(), arriving, "seed {}", sc.seed);
    }
    for f in 0..sc.flows {
        let k = key(f);
        let on_s = s.toy.flows.get(&k).filter(|x| !x.diverted);
        let on_t = t.toy.flows.get(&k).filter(|x| !x.diverted && t.alive);
        let log = match (on_s, on_t) {
            (Some(_), Some(_)) => {
                o.two_owners += 1;
                continue;
            }
            (Some(x), None) | (None, Some(x)) => &x.log,
            (None, None) => continue,
        };
        if log.first() != Some(&0) {
            // Moved to a target that then died: the flow died with it and the vswitch
            // started it afresh elsewhere (replication, not migration, saves those).
            o.died_with_target += 1;
            continue;
        }
        let mut seen = vec![false; next_seq[f as usize] as usize];
        let mut last = None;
        for &seq in log {
            if seen[seq as usize] {
                o.duplicated += 1;
            }
            seen[seq as usize] = true;
            if last.is_some_and(|l| seq < l) {
                o.reordered += 1;
            }
            last = Some(last.map_or(seq, |l: u64| l.max(seq)));
        }
        // Packets still on the way at the end are not lost: only judge what is older than
        // the slowest path.
        let horizon = next_seq[f as usize].saturating_sub(64);
        o.lost += seen[..horizon as usize].iter().filter(|x| !**x).count() as u64;
    }
    o
}

#[test]
fn migrating_every_flow_loses_and_reorders_nothing_across_paths_of_different_speed() {
    for seed in 1..=40u64 {
        let mut sc = Scenario::base(seed * 7919);
        // The path to the source is slower than the one to the target (by up to 0.3 ms):
        // packets sent to the target after the switch overtake stragglers to the source.
        sc.to_source = (50, 250);
        sc.to_target = (5, 20);
        sc.msg = (5, 60);
        let o = run(sc);
        assert!(o.done, "seed {seed}: job not done: {o:?}");
        assert_eq!(o.moved, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!(
            (
                o.lost,
                o.duplicated,
                o.reordered,
                o.two_owners,
                o.strays,
                o.late
            ),
            (0, 0, 0, 0, 0, 0),
            "seed {seed}: {o:?}"
        );
    }
}

#[test]
fn messages_held_by_retransmission_cause_rollbacks_or_waits_never_loss() {
    for seed in 1..=40u64 {
        let mut sc = Scenario::base(seed * 104_729);
        sc.to_source = (20, 200);
        sc.to_target = (5, 50);
        // 5 % of messages wait 60 ms (beyond the 50 ms step timeout): steps time out and
        // roll back, answers arrive after the source gave up.
        sc.msg_hold_per_mille = 50;
        sc.msg_hold_us = 60_000;
        let o = run(sc);
        assert_eq!(o.two_owners, 0, "seed {seed}: {o:?}");
        assert_eq!(o.strays, 0, "seed {seed}: {o:?}");
        assert_eq!(o.duplicated, 0, "seed {seed}: {o:?}");
        assert_eq!(o.lost, 0, "seed {seed}: {o:?}");
        assert_eq!(o.moved + o.failed, sc.flows as u64, "seed {seed}: {o:?}");
    }
}

#[test]
fn a_step_3_naming_other_flows_installs_none_and_loses_nothing() {
    for seed in 1..=20u64 {
        let mut sc = Scenario::base(seed * 4_099);
        sc.to_source = (20, 100);
        sc.mismatch_odd_groups = true;
        let o = run(sc);
        assert!(o.done, "seed {seed}: {o:?}");
        // Odd groups stay on the source whole; even ones move.
        assert!(o.failed > 0 && o.moved > 0, "seed {seed}: {o:?}");
        assert_eq!(o.moved + o.failed, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!(
            (o.lost, o.duplicated, o.reordered, o.two_owners, o.strays),
            (0, 0, 0, 0, 0),
            "seed {seed}: {o:?}"
        );
    }
}

#[test]
fn a_straggler_slower_than_the_wait_is_forwarded_and_counted_not_lost() {
    let mut late = 0;
    for seed in 1..=20u64 {
        let mut sc = Scenario::base(seed * 31);
        // The source's path sometimes takes 8 ms, beyond the 5 ms straggler wait.
        sc.to_source = (10, 8_000);
        sc.to_target = (5, 5);
        let o = run(sc);
        assert_eq!(o.moved, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!(
            (o.lost, o.duplicated, o.two_owners, o.strays),
            (0, 0, 0, 0),
            "{o:?}"
        );
        // Every packet out of order is one the source forwarded late, and counted.
        assert!(o.reordered <= o.late, "seed {seed}: {o:?}");
        late += o.late;
    }
    assert!(late > 0, "the scenario should produce late stragglers");
}

/// After the source died: every key the vswitch sends to the target has its state there;
/// every key sent back to the source (for its replica) has none there.
fn judge_dead_source(
    o: &mut Outcome,
    t: &Node,
    vs: &HashMap<FlowKey, (EndpointAddr, u32)>,
    flows: u32,
) {
    let with_state = |k: &FlowKey| {
        t.toy
            .flows
            .get(&t.toy.canonical(k))
            .is_some_and(|x| !x.diverted && x.log.first() == Some(&0))
    };
    for f in 0..flows {
        let (k, a) = (key(f), alias(f));
        if vs[&k].0 != vs[&a].0 {
            o.split += 1;
        }
        match vs[&k].0 {
            T if !with_state(&k) => o.at_target_without_state += 1,
            S if with_state(&k) => o.handed_back_installed += 1,
            _ => {}
        }
    }
    o.pending_left = t
        .toy
        .flows
        .values()
        .filter(|x| x.diverted && matches!(x.mark, Mark::In(_)))
        .count() as u64;
    o.held_left = t.mig.held();
    o.handed_back = t.mig.counters.flows_handed_back;
}

/// The source dies after switching flows to the target and before sending their state
/// (and at every other step): with replicas (`hand_back`), the target gives back exactly
/// the flows whose state never came, key and alias, so that the source's replica can take
/// them over, and keeps those it installed. Without, they stay at the target stateless.
#[test]
fn a_source_that_dies_mid_migration_gets_back_the_flows_whose_state_never_left() {
    let mut handed_back = 0;
    let mut stateless_without = 0;
    for seed in 1..=30u64 {
        let mut sc = Scenario::base(seed * 40_503);
        sc.to_source = (20, 100);
        sc.msg = (20, 200);
        sc.kill_source_at = Some(2_000 + seed * 150);
        sc.detect_us = 3_000;
        sc.settings.hand_back = true;
        let o = run(sc);
        assert_eq!(o.at_target_without_state, 0, "seed {seed}: {o:?}");
        assert_eq!(o.handed_back_installed, 0, "seed {seed}: {o:?}");
        assert_eq!(o.split, 0, "seed {seed}: {o:?}");
        assert_eq!(o.pending_left, 0, "seed {seed}: {o:?}");
        assert_eq!(o.held_left, 0, "seed {seed}: {o:?}");
        handed_back += o.handed_back;
        sc.settings.hand_back = false;
        stateless_without += run(sc).at_target_without_state;
    }
    assert!(
        handed_back > 0,
        "no source died between the switch and the state"
    );
    assert!(
        stateless_without > 0,
        "without replicas the same runs leave flows stateless"
    );
}

#[test]
fn a_target_that_dies_mid_migration_leaves_every_flow_on_the_source() {
    for seed in 1..=30u64 {
        let mut sc = Scenario::base(seed * 65_537);
        sc.to_source = (20, 100);
        sc.msg = (20, 200);
        // Killed while groups are in every step (the job starts at 2 ms).
        sc.kill_target_at = Some(2_000 + seed * 150);
        sc.detect_us = 3_000;
        let o = run(sc);
        assert_eq!(o.two_owners, 0, "seed {seed}: {o:?}");
        assert_eq!(o.duplicated, 0, "seed {seed}: {o:?}");
        // Flows the target had already taken die with it; all others stay on the source
        // and lose only what the vswitch sent to the dead target.
        assert!(o.lost <= o.sent_to_dead, "seed {seed}: {o:?}");
        assert!(o.died_with_target <= o.moved, "seed {seed}: {o:?}");
        assert_eq!(o.moved + o.failed, sc.flows as u64, "seed {seed}: {o:?}");
        assert!(o.done, "seed {seed}: {o:?}");
    }
}

#[test]
fn a_target_restarted_mid_migration_keeps_no_flow_the_source_still_owns() {
    for seed in 1..=30u64 {
        let mut sc = Scenario::base(seed * 7_777);
        sc.to_source = (20, 100);
        sc.msg = (20, 200);
        // Killed while groups are in every step; back (empty) before or after the source
        // notices, and fed by the vswitch's entries that still point at its address.
        sc.kill_target_at = Some(2_000 + seed * 150);
        sc.restart_after_us = Some(500 + (seed % 5) * 1_000);
        sc.detect_us = 3_000;
        let o = run(sc);
        assert_eq!(o.two_owners, 0, "seed {seed}: {o:?}");
        assert_eq!(o.duplicated, 0, "seed {seed}: {o:?}");
        assert!(
            o.lost <= o.sent_to_dead + o.stray_packets,
            "seed {seed}: {o:?}"
        );
        assert_eq!(o.moved + o.failed, sc.flows as u64, "seed {seed}: {o:?}");
        assert!(o.done, "seed {seed}: {o:?}");
    }
}

#[test]
fn a_rate_limit_spreads_the_migration_and_still_loses_nothing() {
    for seed in 1..=10u64 {
        let mut sc = Scenario::base(seed * 31);
        // 40 flows in groups of 8 at 1,000 flows a second: the first group at once, the
        // other four 8 ms apart, so at least 32 ms in all.
        sc.settings.max_flows_per_s = 1000;
        let o = run(sc);
        assert!(o.done, "seed {seed}: {o:?}");
        assert_eq!(o.moved, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!(
            (o.lost, o.duplicated, o.reordered, o.two_owners),
            (0, 0, 0, 0),
            "seed {seed}: {o:?}"
        );
        assert!(
            o.elapsed_us >= 32_000,
            "seed {seed}: took only {} us",
            o.elapsed_us
        );
        // Unlimited, the same migration takes a few milliseconds.
        let mut fast = Scenario::base(seed * 31);
        fast.settings.max_flows_per_s = 0;
        let f = run(fast);
        assert!(f.done && f.elapsed_us < o.elapsed_us, "seed {seed}: {f:?}");
    }
}

#[test]
fn a_rate_limit_above_one_group_a_millisecond_is_not_cut_to_one() {
    for seed in 1..=10u64 {
        // 1,000,000 flows/s is 125 groups of 8 a millisecond: the limit should not slow 40
        // flows at all, where one group per millisecond tick would take 4 ms or more.
        let mut sc = Scenario::base(seed * 53);
        sc.settings.max_flows_per_s = 1_000_000;
        let o = run(sc);
        let mut fast = Scenario::base(seed * 53);
        fast.settings.max_flows_per_s = 0;
        let f = run(fast);
        assert!(o.done && f.done, "seed {seed}: {o:?} {f:?}");
        assert_eq!(o.moved, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!((o.lost, o.reordered), (0, 0), "seed {seed}: {o:?}");
        assert!(
            o.elapsed_us <= f.elapsed_us + 1_000,
            "seed {seed}: limited {} us, unlimited {} us",
            o.elapsed_us,
            f.elapsed_us
        );
    }
}

#[test]
fn flows_sent_straight_back_return_when_no_straggler_can_follow_them() {
    for seed in 1..=20u64 {
        // The flows come back 20 ms after leaving, well within the source's 40 ms
        // tombstone. Both paths are quick and the source waits for every straggler, so
        // nothing late can reach it: all of them are taken back.
        let mut sc = Scenario::base(seed * 4_099);
        sc.back_at_us = Some(20_000);
        let o = run(sc);
        assert!(o.done, "seed {seed}: {o:?}");
        assert_eq!(o.moved, sc.flows as u64, "seed {seed}: {o:?}");
        assert_eq!(
            (o.moved_back, o.failed_back),
            (sc.flows as u64, 0),
            "seed {seed}: {o:?}"
        );
        assert_eq!(
            (o.lost, o.duplicated, o.reordered, o.two_owners, o.strays),
            (0, 0, 0, 0, 0),
            "seed {seed}: {o:?}"
        );
    }
}

#[test]
fn flows_whose_stragglers_may_still_come_are_refused_on_the_way_back_and_lose_nothing() {
    let mut refused = 0;
    for seed in 1..=20u64 {
        // Stragglers to the source can take 8 ms, beyond its 5 ms wait: groups handed over
        // with one outstanding stay where they are until the tombstone is gone.
        let mut sc = Scenario::base(seed * 31);
        sc.to_source = (10, 8_000);
        sc.back_at_us = Some(20_000);
        let o = run(sc);
        assert_eq!(
            o.moved_back + o.failed_back,
            sc.flows as u64,
            "seed {seed}: {o:?}"
        );
        assert_eq!(
            (o.lost, o.duplicated, o.two_owners, o.strays),
            (0, 0, 0, 0),
            "seed {seed}: {o:?}"
        );
        assert!(o.reordered <= o.late, "seed {seed}: {o:?}");
        refused += o.failed_back;
    }
    assert!(
        refused > 0,
        "the scenario should leave some groups unsettled"
    );
}

#[test]
fn a_flow_waiting_to_retry_that_comes_back_as_an_arriving_flow_stays_arriving() {
    // Another runtime that sends this one a flow while it migrates its own.
    const R: EndpointAddr = EndpointAddr { server: 3, slot: 2 };
    let settings = Scenario::base(1).settings;
    let mut mig = Migrator::new(S, None, settings);
    let mut toy = Toy::default();
    toy.process(&key(0), 0);
    toy.process(&key(1), 0);
    mig.start_job(T, u32::MAX, 0.0).unwrap();
    mig.tick(&mut toy, 0, 0.0);
    let group = toy
        .outbox
        .iter()
        .find_map(|(to, m)| match m {
            Message::MigrateInit { group, flows, .. } if *to == T => {
                assert_eq!(flows.len(), 2);
                Some(*group)
            }
            _ => None,
        })
        .expect("step 1 sent");
    toy.outbox.clear();
    // The target is busy: both flows wait to be tried again.
    let ready = Message::MigrateReady {
        group,
        accepted: Vec::new(),
        refused: Some("busy".into()),
        busy: true,
    };
    assert!(mig.on_message(&mut toy, T, ready, 1));
    // Meanwhile flow 0 ends here and arrives again from R, and a packet of it is held.
    toy.remove_pending(&FlowRef::key_only(key(0)));
    let init = Message::MigrateInit {
        group: 9,
        chain: None,
        vswitch: V,
        flows: vec![MigrateFlow {
            key: key(0),
            aliases: Vec::new(),
        }],
    };
    assert!(mig.on_message(&mut toy, R, init, 2));
    let mark = toy.flows[&key(0)].mark;
    assert!(matches!(mark, Mark::In(id) if id != 0), "{mark:?}");
    assert_eq!(mig.on_packet(&key(0), mark), PacketAction::Hold);
    toy.held.entry(key(0)).or_default().push_back(1);
    // The retry moves flow 1 only; flow 0 keeps arriving, and its held packet counted.
    mig.tick(&mut toy, 100, 100.0);
    let retried: Vec<Vec<FlowKey>> = toy
        .outbox
        .iter()
        .filter_map(|(to, m)| match m {
            Message::MigrateInit { flows, .. } if *to == T => {
                Some(flows.iter().map(|f| f.key).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(retried, vec![vec![key(1)]]);
    assert_eq!(toy.flows[&key(0)].mark, mark);
    assert_eq!(mig.held(), 1);
}
