//! Simulation of replication with output commit: a primary (a `Replicator` and a toy chain
//! of two functions), two replicas (`ReplicaStore`s) and the paths between them, on
//! simulated time.
//!
//! Every path is FIFO and exactly-once while both ends live, as the reliable transport is,
//! with jittery latency and now and then a long hold (a retransmission). What the transport
//! cannot hide is death: a killed process loses everything it held and everything on its
//! way to or from it. The toy chain's first function counts the flow's packets (its state
//! changes with every packet); the second records the first packet's number (it never
//! changes after, so it must cross once). A packet's output is `(flow, its number)`.
//!
//! The promise checked, at every kill of the primary at every step: every packet that left
//! the platform protected has its effect in the state the surviving replica promotes
//! (the promoted count is at least the packet's number), the promoted state is one the
//! primary really had, and nothing a live primary held is stuck once the traffic stops.

use std::collections::{BTreeMap, VecDeque};

use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::msg::Message;

use crate::replication::{
    FlowMeta, Mode, ReplicaStore, Replicator, Sent, Settings, WithoutReplica,
};
use crate::sim_rng::Rng;

const P: EndpointAddr = EndpointAddr { server: 1, slot: 2 };
const R1: EndpointAddr = EndpointAddr { server: 2, slot: 2 };
const R2: EndpointAddr = EndpointAddr { server: 1, slot: 3 };
const NFS: usize = 2;

fn key(f: u32) -> FlowKey {
    FlowKey::from_tuple(
        4,
        6,
        0,
        (FlowKey::v4([10, 0, (f >> 8) as u8, f as u8]), 1000),
        (FlowKey::v4([10, 9, 9, 9]), 80),
    )
    .0
}

/// A message in flight: (delivery time, from, to, message).
type InFlight = (u64, EndpointAddr, EndpointAddr, Message);

struct Net {
    q: Vec<InFlight>,
    /// Messages to an endpoint are lost until this time (µs): a restarted process's
    /// transport drops what was sent to its old life until the sender notices.
    lost_until: BTreeMap<EndpointAddr, u64>,
    /// Per path, the last delivery time (paths are FIFO).
    last: BTreeMap<(EndpointAddr, EndpointAddr), u64>,
}

impl Net {
    fn send(&mut self, rng: &mut Rng, now: u64, from: EndpointAddr, to: EndpointAddr, m: Message) {
        let mut lat = 20 + rng.below(200);
        if rng.chance(3) {
            lat += 2_000 + rng.below(8_000); // a retransmission
        }
        if self.lost_until.get(&to).is_some_and(|&t| now < t) {
            return;
        }
        let last = self.last.entry((from, to)).or_insert(0);
        let at = (now + lat).max(*last);
        *last = at;
        self.q.push((at, from, to, m));
    }

    /// Messages due by `now`, per path in order.
    fn due(&mut self, now: u64) -> Vec<InFlight> {
        let mut due: Vec<InFlight> = Vec::new();
        let mut rest = Vec::new();
        for m in self.q.drain(..) {
            if m.0 <= now {
                due.push(m);
            } else {
                rest.push(m);
            }
        }
        self.q = rest;
        // Stable: equal times keep their sending order.
        due.sort_by_key(|m| m.0);
        due
    }

    /// Everything to or from `a` is gone (it died).
    fn cut(&mut self, a: EndpointAddr) {
        self.q.retain(|m| m.1 != a && m.2 != a);
    }
}

/// The toy primary: flows 0..n in rows 0..n, ids from 1.
struct Primary {
    repl: Replicator<(u32, u32)>,
    /// Per flow: packets processed, and the first packet's number (state of function 1).
    count: Vec<u32>,
    first: Vec<Option<u32>>,
    alive: bool,
}

impl Primary {
    /// Writes the dirty flows and hands the messages to `out`, as many per replica as
    /// `room(replica)` says its transport queue takes now.
    fn flush(
        &mut self,
        now_us: u64,
        out: &mut Vec<(EndpointAddr, Message)>,
        room: &dyn Fn(EndpointAddr) -> usize,
    ) {
        let dirty = self.repl.take_dirty();
        for &row in &dirty {
            let f = row as usize;
            let meta = FlowMeta {
                key: key(row),
                vswitch: EndpointAddr::new(1, 1),
                home: EndpointAddr::new(1, 2),
                flags: 0,
                packets: self.count[f],
                age_ms: 0,
            };
            let count = self.count[f];
            let first = self.first[f];
            self.repl.write_flow(
                row,
                now_us / 1000,
                &meta,
                &Vec::new,
                &mut |i, out| match i {
                    0 => {
                        out.extend_from_slice(&count.to_le_bytes());
                        true
                    }
                    _ => match first {
                        Some(x) => {
                            out.extend_from_slice(&x.to_le_bytes());
                            true
                        }
                        None => false,
                    },
                },
            );
        }
        self.repl.return_dirty(dirty);
        self.repl.flush(now_us * 1000);
        self.repl.transmit(now_us * 1000, &mut |to, m| {
            if out.iter().filter(|(t, _)| *t == to).count() >= room(to) {
                return Sent::Full;
            }
            out.push((to, m.clone()));
            Sent::Taken
        });
    }
}

fn decode_u32(b: &Option<Vec<u8>>) -> Option<u32> {
    b.as_ref()
        .and_then(|v| v.get(..4))
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Kill the primary at this step and check what the replicas promote.
    KillPrimary(u64),
    /// Kill replica R1 at this step (the primary learns it `notice` µs later), then kill
    /// the primary at the end and check.
    KillReplica {
        at: u64,
        notice: u64,
    },
    /// Replica R1 restarts empty at this step (same address).
    RestartReplica {
        at: u64,
        notice: u64,
    },
}

struct Outcome {
    left: Vec<(u32, u32)>,
    unprotected: u64,
    held_at_end: bool,
    messages: u64,
    states_unchanged: u64,
    flows_sent: u64,
}

fn run(seed: u64, flows: u32, steps: u64, fault: Fault) -> Outcome {
    run_with(seed, flows, steps, fault, usize::MAX)
}

/// `run`, with the transport's queue to each replica taking at most `queue` messages not
/// yet delivered (a slow or congested link: the rest must wait, never be lost).
fn run_with(seed: u64, flows: u32, steps: u64, fault: Fault, queue: usize) -> Outcome {
    let mut rng = Rng(seed | 1);
    let settings = Settings {
        mode: Mode::OutputCommit,
        without_replica: WithoutReplica::Wait,
        // Long enough that no packet leaves unprotected while a replica lives.
        commit_wait_ms: 60_000,
        max_replica_flows: 1 << 20,
    };
    let mut p = Primary {
        repl: Replicator::new(settings, 7, NFS),
        count: vec![0; flows as usize],
        first: vec![None; flows as usize],
        alive: true,
    };
    p.repl.set_replicas(&[R1, R2], 0);
    let mut stores: BTreeMap<EndpointAddr, Option<ReplicaStore>> = BTreeMap::new();
    stores.insert(R1, Some(ReplicaStore::new(1 << 20, NFS)));
    stores.insert(R2, Some(ReplicaStore::new(1 << 20, NFS)));
    let mut net = Net {
        q: Vec::new(),
        lost_until: BTreeMap::new(),
        last: BTreeMap::new(),
    };
    let mut left: Vec<(u32, u32)> = Vec::new();
    let mut notices: VecDeque<(u64, EndpointAddr, bool)> = VecDeque::new();
    let mut out = Vec::new();
    let mut msgs = Vec::new();
    let mut now = 0u64; // µs
    let quiet_after = steps;
    let mut step = 0u64;
    loop {
        step += 1;
        now += 1 + rng.below(50);
        // Faults.
        match fault {
            Fault::KillPrimary(at) if at == step => {
                p.alive = false;
                net.cut(P);
            }
            Fault::KillReplica { at, notice } if at == step => {
                stores.insert(R1, None);
                net.cut(R1);
                notices.push_back((now + notice, R1, false));
            }
            Fault::RestartReplica { at, notice } if at == step => {
                stores.insert(R1, Some(ReplicaStore::new(1 << 20, NFS)));
                net.cut(R1);
                net.lost_until.insert(R1, now + notice);
                notices.push_back((now + notice, R1, true));
            }
            _ => {}
        }
        if !p.alive {
            break;
        }
        while notices.front().is_some_and(|n| n.0 <= now) {
            let (_, a, live) = notices.pop_front().unwrap();
            p.repl.replica_lost(a, live, now * 1000);
        }
        // A burst of packets.
        if step <= quiet_after {
            for _ in 0..rng.below(6) {
                let f = rng.below(u64::from(flows)) as usize;
                p.count[f] += 1;
                let n = p.count[f];
                p.first[f].get_or_insert(n);
                let pkt = (f as u32, n);
                if p.repl.touched(f as u32, f as u64 + 1, now / 1000) {
                    if let Some(pkt) = p.repl.hold(f as u32, f as u64 + 1, pkt, now * 1000) {
                        left.push(pkt);
                    }
                } else {
                    left.push(pkt);
                }
            }
        }
        // The flush: messages, then what may leave.
        let q = &net.q;
        p.flush(now, &mut msgs, &|to| {
            let in_flight = q.iter().filter(|m| m.1 == P && m.2 == to).count();
            queue.saturating_sub(in_flight)
        });
        for (to, m) in msgs.drain(..) {
            net.send(&mut rng, now, P, to, m);
        }
        for (_, from, to, m) in net.due(now) {
            if to == P {
                if let Message::Replicated {
                    incarnation,
                    version,
                    refused,
                    missing,
                } = m
                {
                    p.repl.on_replicated(
                        from,
                        incarnation,
                        version,
                        &refused,
                        &missing,
                        now * 1000,
                    );
                }
                continue;
            }
            let Some(Some(store)) = stores.get_mut(&to) else {
                continue;
            };
            if let Message::Replicate {
                incarnation,
                version,
                flows,
                states,
                ended,
            } = m
            {
                if let Some(ans) = store.apply(
                    from,
                    incarnation,
                    version,
                    &flows,
                    &states,
                    &ended,
                    now / 1000,
                ) {
                    net.send(&mut rng, now, to, P, ans);
                }
            }
        }
        p.repl.release(now * 1000, &mut out);
        // Output commit: what leaves is in a live replica now.
        for &(f, n) in &out {
            let covered = stores.values().flatten().any(|st| {
                st.get(P, 7, u64::from(f) + 1)
                    .and_then(|a| decode_u32(&a.states[0]))
                    .is_some_and(|c| c >= n)
            });
            assert!(
                covered,
                "seed {seed}: packet {n} of flow {f} left unprotected"
            );
        }
        left.append(&mut out);
        if step > quiet_after && net.q.is_empty() && notices.is_empty() && !p.repl.busy() {
            break;
        }
        assert!(step < quiet_after + 1_000_000, "seed {seed}: never settled");
        // The promise, checked as if the primary died here (with a replica lost, flows are
        // unprotected until sent whole again: checked once settled).
        let replica_fault = matches!(
            fault,
            Fault::KillReplica { .. } | Fault::RestartReplica { .. }
        );
        if !replica_fault
            && (step % 97 == 0 || matches!(fault, Fault::KillPrimary(at) if at == step + 1))
        {
            check_promoted(seed, &p, &stores, &left);
        }
    }
    if p.alive {
        check_promoted(seed, &p, &stores, &left);
    }
    Outcome {
        left,
        unprotected: p.repl.counters.unprotected,
        held_at_end: p.repl.busy(),
        messages: p.repl.counters.messages,
        states_unchanged: p.repl.counters.states_unchanged,
        flows_sent: p.repl.counters.flows_sent,
    }
}

/// As if the primary died now: what would each flow resume with? Every packet that left
/// must be covered; the promoted state must be one the flow had.
fn check_promoted(
    seed: u64,
    p: &Primary,
    stores: &BTreeMap<EndpointAddr, Option<ReplicaStore>>,
    left: &[(u32, u32)],
) {
    let mut covered: BTreeMap<u32, u32> = BTreeMap::new();
    let mut holders: BTreeMap<u32, u32> = BTreeMap::new();
    for store in stores.values().flatten() {
        // Promote from a copy, so the run goes on.
        let mut probe = store.clone();
        let copies = probe.promote(P, u64::MAX);
        assert!(copies.is_empty() || copies.incarnation == 7);
        for (id, a) in copies.flows {
            let f = (id - 1) as u32;
            let count = decode_u32(&a.states[0]).expect("a promoted flow has its count");
            let first = decode_u32(&a.states[1]);
            assert!(
                count <= p.count[f as usize],
                "seed {seed}: flow {f} ahead of its primary"
            );
            assert_eq!(
                first,
                Some(1),
                "seed {seed}: flow {f} lost its first function's state"
            );
            assert_eq!(
                a.packets, count,
                "seed {seed}: flow {f}'s platform part lags its states"
            );
            let c = covered.entry(f).or_insert(0);
            // With two holders (a copy left on a replica the primary moved away from), the
            // flow resumes from the replica the primary uses; the sim takes the better.
            *c = (*c).max(count);
            *holders.entry(f).or_insert(0) += 1;
        }
    }
    let mut max_left: BTreeMap<u32, u32> = BTreeMap::new();
    for &(f, n) in left {
        let m = max_left.entry(f).or_insert(0);
        *m = (*m).max(n);
    }
    for (f, n) in max_left {
        let c = covered.get(&f).copied().unwrap_or(0);
        assert!(
            c >= n,
            "seed {seed}: packet {n} of flow {f} left, but the replicas hold only {c} packets of it"
        );
    }
}

fn in_order(seed: u64, left: &[(u32, u32)]) {
    let mut last: BTreeMap<u32, u32> = BTreeMap::new();
    for &(f, n) in left {
        let l = last.entry(f).or_insert(0);
        assert_eq!(n, *l + 1, "seed {seed}: flow {f}: packet {n} after {l}");
        *l = n;
    }
}

#[test]
fn output_commit_protects_every_packet_that_leaves() {
    for seed in 1..=40u64 {
        let o = run(seed, 16, 3_000, Fault::None);
        in_order(seed, &o.left);
        assert_eq!(o.unprotected, 0, "seed {seed}");
        assert!(!o.held_at_end, "seed {seed}: packets stuck");
        // One message per flush and replica, not per packet.
        assert!(o.messages < o.left.len() as u64, "seed {seed}");
        // The second function's state crosses once per flow and replica.
        assert!(o.states_unchanged >= o.flows_sent - 2 * 16, "seed {seed}");
    }
}

#[test]
fn a_primary_killed_at_any_step_left_nothing_its_replica_lacks() {
    for seed in 1..=25u64 {
        for at in (3..600).step_by(7) {
            let o = run(seed * 1000 + at, 8, 600, Fault::KillPrimary(at));
            in_order(seed, &o.left);
        }
    }
}

/// Runs every seed with a replica fault (`fault(at, notice)`) at a seed-dependent step,
/// the primary learning of it 0, 0.3 and 5 ms later: every flow's output stays in order,
/// none leaves unprotected, none is left stuck.
fn replica_fault_runs(stride: u64, fault: impl Fn(u64, u64) -> Fault) {
    for seed in 1..=30u64 {
        for &notice in &[0u64, 300, 5_000] {
            let at = 100 + seed * stride % 1500;
            let o = run(seed, 16, 2_000, fault(at, notice));
            in_order(seed, &o.left);
            assert_eq!(o.unprotected, 0, "seed {seed}");
            assert!(!o.held_at_end, "seed {seed}: packets stuck");
        }
    }
}

#[test]
fn a_dead_replicas_flows_and_output_move_to_the_other() {
    replica_fault_runs(37, |at, notice| Fault::KillReplica { at, notice });
}

#[test]
fn a_restarted_replica_is_sent_its_flows_whole_again() {
    replica_fault_runs(53, |at, notice| Fault::RestartReplica { at, notice });
}

/// A replica link whose queue takes one message at a time, with more flows than one
/// message carries: what does not fit waits (the flows' newest state goes when the link
/// drains), and no packet leaves before its state is held, none is stuck. Before, a full
/// queue started the replica over, whose whole copies filled the queue again: the replica
/// stayed at the first message's flows.
#[test]
fn a_congested_replica_link_delays_output_and_loses_no_state() {
    for seed in 1..=12u64 {
        let o = run_with(seed, 300, 3_000, Fault::None, 1);
        in_order(seed, &o.left);
        assert_eq!(o.unprotected, 0, "seed {seed}");
        assert!(!o.held_at_end, "seed {seed}: packets stuck");
        for &notice in &[0u64, 300] {
            let at = 500 + seed * 71 % 1500;
            let o = run_with(seed, 300, 3_000, Fault::RestartReplica { at, notice }, 1);
            in_order(seed, &o.left);
            assert_eq!(o.unprotected, 0, "seed {seed}");
            assert!(!o.held_at_end, "seed {seed}: packets stuck");
        }
    }
}
