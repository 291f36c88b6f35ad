//! Two transports stepped through a simulated network in simulated time: loss, duplication,
//! reordering, restarts and dead peers. Frames go through the real wire encoding.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::*;
use crate::frame::{write_frame, Frame};

const A: EndpointAddr = EndpointAddr::new(1, 2);
const B: EndpointAddr = EndpointAddr::new(2, 3);
const MS: u64 = 1_000_000;

/// xorshift64*: deterministic, seedable, good enough to draw losses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Clone, Copy)]
struct Link {
    loss: f64,
    dup: f64,
    /// Chance a frame is held back by up to `reorder_ns` extra.
    reorder: f64,
    reorder_ns: u64,
    delay_ns: u64,
}

impl Link {
    fn clean() -> Link {
        Link {
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            reorder_ns: 0,
            delay_ns: 50_000,
        }
    }
    fn hostile() -> Link {
        Link {
            loss: 0.10,
            dup: 0.05,
            reorder: 0.25,
            reorder_ns: 400_000,
            delay_ns: 50_000,
        }
    }
}

/// One side: a transport plus what its actors saw.
struct Side {
    t: Transport,
    /// Sequence numbers found in delivered payloads, per sending incarnation.
    got: Vec<u64>,
    events: Vec<PeerEvent>,
}

impl Side {
    fn new(me: EndpointAddr, session: u64, cfg: TransportConfig) -> Side {
        Side {
            t: Transport::new(me, session, cfg),
            got: Vec::new(),
            events: Vec::new(),
        }
    }
}

/// A frame on the simulated wire: (arrival time, tie-break, to B?, bytes).
type InFlight = (u64, u64, bool, Vec<u8>);

struct Sim {
    now: u64,
    rng: Rng,
    link: Link,
    wire: BinaryHeap<Reverse<InFlight>>,
    serial: u64,
    a: Side,
    b: Side,
    /// Frames to a side that is "down" vanish.
    b_down: bool,
    frames_on_wire: u64,
    /// The last frame B sent A (what an on-link attacker would record and replay).
    last_to_a: Option<Vec<u8>>,
}

fn message(seq: u64, size: usize) -> Vec<u8> {
    let mut m = seq.to_be_bytes().to_vec();
    m.resize(size.max(8), (seq % 251) as u8);
    m
}

fn seq_of(payload: &[u8]) -> u64 {
    let seq = u64::from_be_bytes(payload[..8].try_into().unwrap());
    assert!(
        payload[8..].iter().all(|b| *b == (seq % 251) as u8),
        "payload of message {seq} corrupted"
    );
    seq
}

impl Sim {
    fn new(seed: u64, link: Link, cfg: TransportConfig) -> Sim {
        Sim {
            now: 1_000 * MS,
            rng: Rng(seed | 1),
            link,
            wire: BinaryHeap::new(),
            serial: 0,
            a: Side::new(A, 100, cfg),
            b: Side::new(B, 200, cfg),
            b_down: false,
            frames_on_wire: 0,
            last_to_a: None,
        }
    }

    fn put(&mut self, to_b: bool, bytes: Vec<u8>) {
        self.frames_on_wire += 1;
        if !to_b {
            self.last_to_a = Some(bytes.clone());
        }
        if self.rng.chance(self.link.loss) {
            return;
        }
        let copies = if self.rng.chance(self.link.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut at = self.now + self.link.delay_ns;
            if self.rng.chance(self.link.reorder) {
                at += self.rng.below(self.link.reorder_ns);
            }
            self.serial += 1;
            self.wire
                .push(Reverse((at, self.serial, to_b, bytes.clone())));
        }
    }

    fn transmit(&mut self) {
        let now = self.now;
        let mut out: Vec<(bool, Vec<u8>)> = Vec::new();
        for (side, to_b) in [(&mut self.a, true), (&mut self.b, false)] {
            side.t.poll_transmit(now, &mut |h, p| {
                let mut buf = vec![0u8; 14 + 76 + p.len()];
                let n = write_frame(&mut buf, h, p).unwrap();
                buf.truncate(n);
                out.push((to_b, buf));
                true
            });
            side.events.extend(side.t.take_events());
        }
        for (to_b, bytes) in out {
            self.put(to_b, bytes);
        }
    }

    /// Advances to the next thing that happens (at most `limit`); false if nothing will.
    fn step(&mut self, limit: u64) -> bool {
        let mut next = u64::MAX;
        if let Some(Reverse((at, ..))) = self.wire.peek() {
            next = next.min(*at);
        }
        for t in [self.a.t.next_timeout(), self.b.t.next_timeout()]
            .into_iter()
            .flatten()
        {
            next = next.min(t.max(self.now));
        }
        if next == u64::MAX || next > limit {
            return false;
        }
        self.now = self.now.max(next);
        while let Some(Reverse((at, ..))) = self.wire.peek() {
            if *at > self.now {
                break;
            }
            let Some(Reverse((_, _, to_b, bytes))) = self.wire.pop() else {
                break;
            };
            if to_b && self.b_down {
                continue;
            }
            let frame = Frame::parse(&bytes).unwrap();
            let side = if to_b { &mut self.b } else { &mut self.a };
            let got = &mut side.got;
            side.t
                .handle(&frame, self.now, &mut |d| got.push(seq_of(d.payload)));
            side.events.extend(side.t.take_events());
        }
        self.transmit();
        true
    }

    /// A sends messages first..first+count (sizes from `size`), as fast as its queue takes
    /// them, and the simulation runs until all are acknowledged or `deadline` passes.
    fn run_a_to_b(&mut self, first: u64, count: u64, size: &dyn Fn(u64) -> usize, deadline: u64) {
        let mut next = first;
        let end = first + count;
        let deadline = self.now + deadline;
        loop {
            while next < end {
                let m = message(next, size(next));
                match self.a.t.send(
                    B,
                    Outgoing {
                        src_actor: 7,
                        dst_actor: 9,
                        msg_type: 1,
                        payload: &m,
                    },
                ) {
                    Ok(()) => next += 1,
                    Err(SendError::QueueFull) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            self.transmit();
            let idle = next == end && self.a.t.peers().iter().all(|p| p.in_flight + p.queued == 0);
            if idle || !self.step(deadline) {
                break;
            }
        }
    }
}

fn assert_exactly_once_in_order(got: &[u64], first: u64, count: u64) {
    assert_eq!(
        got.len() as u64,
        count,
        "delivered {} of {count}",
        got.len()
    );
    for (i, s) in got.iter().enumerate() {
        assert_eq!(*s, first + i as u64, "message {i} out of order or repeated");
    }
}

fn small_queue() -> TransportConfig {
    TransportConfig {
        max_queue_frames: 256,
        ..TransportConfig::default()
    }
}

#[test]
fn a_clean_link_delivers_everything_in_order() {
    let mut sim = Sim::new(1, Link::clean(), small_queue());
    sim.run_a_to_b(0, 5000, &|_| 64, 60_000 * MS);
    assert_exactly_once_in_order(&sim.b.got, 0, 5000);
    let st = sim.a.t.stats();
    assert_eq!(st.retransmits, 0, "{st:?}");
    assert!(sim.a.events.is_empty() && sim.b.events.is_empty());
}

#[test]
fn loss_duplication_and_reordering_never_break_exactly_once_in_order() {
    for seed in 1..=4u64 {
        let mut sim = Sim::new(seed * 7919, Link::hostile(), small_queue());
        sim.run_a_to_b(0, 20_000, &|_| 100, 600_000 * MS);
        assert_exactly_once_in_order(&sim.b.got, 0, 20_000);
        let st = *sim.a.t.stats();
        assert!(st.retransmits > 0 && st.fast_retransmits > 0, "{st:?}");
        assert!(sim.b.t.stats().duplicates > 0);
        assert!(sim.a.events.is_empty(), "{:?}", sim.a.events);
        // Recovery is mostly fast retransmission, not timeouts.
        assert!(st.timeouts < st.retransmits / 2, "{st:?}");
    }
}

#[test]
fn a_live_peer_behind_a_very_lossy_link_is_never_declared_dead() {
    // A quarter of the frames lost each way and a dead timeout shorter than the shortest
    // retransmission timeout: every timeout is a silence longer than `dead_after`, yet a
    // peer that still answers loses nothing.
    let cfg = TransportConfig {
        dead_after_ns: MS,
        ..small_queue()
    };
    let link = Link {
        loss: 0.25,
        ..Link::hostile()
    };
    let mut sim = Sim::new(4242, link, cfg);
    sim.run_a_to_b(0, 5_000, &|_| 100, 600_000 * MS);
    assert_exactly_once_in_order(&sim.b.got, 0, 5_000);
    assert!(sim.a.events.is_empty(), "{:?}", sim.a.events);
    assert!(sim.a.t.stats().timeouts > 0, "{:?}", sim.a.t.stats());
}

#[test]
fn large_messages_are_fragmented_and_reassembled_under_loss() {
    let mut sim = Sim::new(99, Link::hostile(), small_queue());
    // Sizes from one byte past a frame to a few hundred KiB.
    let size = |s: u64| [1409usize, 5000, 64, 70_000, 3][(s % 5) as usize];
    sim.run_a_to_b(0, 400, &size, 600_000 * MS);
    assert_exactly_once_in_order(&sim.b.got, 0, 400);
    assert_eq!(sim.b.t.stats().malformed, 0);
}

#[test]
fn both_directions_at_once() {
    let mut sim = Sim::new(5, Link::hostile(), small_queue());
    for i in 0..3000u64 {
        let m = message(i, 40);
        let out = Outgoing {
            src_actor: 1,
            dst_actor: 2,
            msg_type: 3,
            payload: &m,
        };
        let _ = sim.a.t.send(B, out);
        let _ = sim.b.t.send(A, out);
        if i % 100 == 99 {
            for _ in 0..2000 {
                if !sim.step(sim.now + 100 * MS) {
                    break;
                }
            }
        }
    }
    while sim.step(sim.now + 10_000 * MS) {
        if sim.a.got.len() == 3000 && sim.b.got.len() == 3000 {
            break;
        }
    }
    // Queues of 256 frames: some sends were refused, the rest arrive in order.
    let check = |got: &[u64]| {
        assert!(got.len() > 1000);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order broken");
    };
    check(&sim.a.got);
    check(&sim.b.got);
}

#[test]
fn the_retransmission_timeout_follows_the_rtt() {
    let mut link = Link::clean();
    link.delay_ns = 5 * MS;
    let mut sim = Sim::new(3, link, small_queue());
    sim.run_a_to_b(0, 200, &|_| 64, 60_000 * MS);
    let p = sim.a.t.peers()[0];
    // RTT is 10 ms (5 each way): 10 x RTT.
    assert!(p.srtt_ns >= 10 * MS && p.srtt_ns < 12 * MS, "{p:?}");
    assert!(p.rto_ns >= 100 * MS && p.rto_ns < 125 * MS, "{p:?}");
}

#[test]
fn a_restarted_peer_is_detected_and_new_messages_flow() {
    let mut sim = Sim::new(11, Link::hostile(), small_queue());
    sim.run_a_to_b(0, 1000, &|_| 64, 600_000 * MS);
    assert_exactly_once_in_order(&sim.b.got, 0, 1000);
    // B restarts: a new incarnation with a larger session, nothing remembered.
    sim.b = Side::new(B, 300, small_queue());
    // Frames of the old incarnation still in flight must not confuse anyone.
    sim.run_a_to_b(1000, 1000, &|_| 64, 600_000 * MS);
    // What A sent before learning of the restart is reported lost, never delivered twice;
    // the rest arrives in order.
    let lost: u64 = sim
        .a
        .events
        .iter()
        .map(|e| match e {
            PeerEvent::Restarted { peer, lost } if *peer == B => *lost,
            other => panic!("unexpected {other:?}"),
        })
        .sum();
    let got = &sim.b.got;
    assert_eq!(got.len() as u64 + lost, 1000, "lost {lost}");
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(got.last(), Some(&1999));
}

#[test]
fn a_silent_peer_is_declared_dead_and_both_recover_when_it_returns() {
    let cfg = TransportConfig {
        dead_after_ns: 500 * MS,
        ..small_queue()
    };
    let mut sim = Sim::new(13, Link::clean(), cfg);
    sim.run_a_to_b(0, 100, &|_| 64, 60_000 * MS);
    sim.b_down = true;
    sim.run_a_to_b(100, 50, &|_| 64, 2_000 * MS);
    assert!(
        matches!(sim.a.events.as_slice(), [PeerEvent::Dead { peer, lost: 50 }] if *peer == B),
        "{:?}",
        sim.a.events
    );
    // B comes back (the same incarnation: it was cut off, not restarted).
    sim.b_down = false;
    sim.run_a_to_b(150, 100, &|_| 64, 60_000 * MS);
    let got = &sim.b.got;
    assert_eq!(&got[..100], &(0..100).collect::<Vec<_>>()[..]);
    assert_eq!(&got[100..], &(150..250).collect::<Vec<_>>()[..]);
    // B saw A's new session and started clean.
    assert!(
        matches!(sim.b.events.as_slice(), [PeerEvent::Restarted { peer, lost: 0 }] if *peer == A),
        "{:?}",
        sim.b.events
    );
}

/// B dies while an on-link attacker replays B's last authentic frame (an ack) to A every
/// 10 ms: A still declares B dead as soon as it would in silence. Replayed acks tell
/// nothing new, so they do not count as hearing from B (they used to reset A's count of
/// unanswered timeouts, putting the death off until sixteen transmissions, seconds later).
#[test]
fn replayed_acks_do_not_keep_a_dead_peer_alive() {
    let cfg = TransportConfig {
        dead_after_ns: 500 * MS,
        ..small_queue()
    };
    let mut sim = Sim::new(17, Link::clean(), cfg);
    sim.run_a_to_b(0, 100, &|_| 64, 60_000 * MS);
    let replay = sim.last_to_a.clone().expect("B acknowledged");
    sim.b_down = true;
    for i in 100..150 {
        let m = message(i, 64);
        let out = Outgoing {
            src_actor: 7,
            dst_actor: 9,
            msg_type: 1,
            payload: &m,
        };
        sim.a.t.send(B, out).unwrap();
    }
    let start = sim.now;
    let mut next_replay = sim.now;
    while sim.a.events.is_empty() && sim.now < start + 5_000 * MS {
        if sim.now >= next_replay {
            sim.serial += 1;
            let at = sim.now + sim.link.delay_ns;
            sim.wire
                .push(Reverse((at, sim.serial, false, replay.clone())));
            next_replay = sim.now + 10 * MS;
        }
        sim.transmit();
        if !sim.step(next_replay) {
            sim.now = next_replay;
        }
    }
    let took = sim.now - start;
    assert!(
        matches!(sim.a.events.as_slice(), [PeerEvent::Dead { peer, lost: 50 }] if *peer == B),
        "{:?} after {} ms",
        sim.a.events,
        took / MS
    );
    assert!(
        took < 2_000 * MS,
        "declared dead only after {} ms",
        took / MS
    );
}

#[test]
fn frames_of_an_older_session_are_ignored() {
    let mut sim = Sim::new(17, Link::clean(), small_queue());
    sim.run_a_to_b(0, 10, &|_| 64, 60_000 * MS);
    // A frame an older incarnation of A sent (session below the current one).
    let mut h = FrameHeader::ack(A, B);
    h.kind = FrameKind::Data;
    h.frag_count = 1;
    h.src_session = 50;
    h.dst_session = 200;
    h.seq = 11;
    let mut buf = vec![0u8; 200];
    let n = write_frame(&mut buf, &h, &message(999, 64)).unwrap();
    let before = sim.b.got.len();
    let stale = sim.b.t.stats().stale;
    let got = &mut sim.b.got;
    sim.b
        .t
        .handle(&Frame::parse(&buf[..n]).unwrap(), sim.now, &mut |d| {
            got.push(seq_of(d.payload))
        });
    assert_eq!(sim.b.got.len(), before);
    assert_eq!(sim.b.t.stats().stale, stale + 1);
}

#[test]
fn fragments_out_of_sequence_are_dropped_and_counted() {
    let mut t = Transport::new(B, 200, TransportConfig::default());
    let mut seq = 0;
    let mut frame = |idx: u16, count: u16| {
        seq += 1;
        let mut h = FrameHeader::ack(A, B);
        h.kind = FrameKind::Data;
        h.frag_index = idx;
        h.frag_count = count;
        h.src_session = 100;
        h.dst_session = 200;
        h.seq = seq;
        h.ack = 1;
        let mut buf = vec![0u8; 200];
        let n = write_frame(&mut buf, &h, b"12345678").unwrap();
        buf.truncate(n);
        buf
    };
    // The first frame only teaches B the session of A (it named none... here it names B's).
    let frames = [frame(0, 3), frame(2, 3), frame(0, 1)];
    let mut delivered = 0;
    for f in &frames {
        t.handle(&Frame::parse(f).unwrap(), 0, &mut |_| delivered += 1);
    }
    assert_eq!(delivered, 1, "only the whole single-frame message");
    assert_eq!(t.stats().malformed, 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    #[test]
    fn any_loss_pattern_keeps_delivery_exact(
        seed in 1u64..u64::MAX,
        loss in 0.0f64..0.3,
        dup in 0.0f64..0.2,
        reorder in 0.0f64..0.5,
        count in 1u64..600,
        size in 1usize..3000,
    ) {
        let link = Link { loss, dup, reorder, reorder_ns: 300_000, delay_ns: 30_000 };
        let mut sim = Sim::new(seed, link, small_queue());
        sim.run_a_to_b(0, count, &|_| size, 3_600_000 * MS);
        // The transport's promise: exactly once and in order, or reported lost. At these
        // loss rates a run of unlucky retransmissions can (rarely: about 0.43^10 per stall
        // at 25 % loss each way) outlast `dead_after` with `MIN_TIMEOUTS_DEAD` timeouts, and
        // the sender then gives the peer up and reports what it had not seen acknowledged.
        let lost: u64 = sim.a.events.iter().map(|e| match e {
            PeerEvent::Dead { lost, .. } | PeerEvent::Restarted { lost, .. } => *lost,
        }).sum();
        if lost == 0 {
            assert_exactly_once_in_order(&sim.b.got, 0, count);
        } else {
            let got = &sim.b.got;
            assert!(got.windows(2).all(|w| w[0] < w[1]), "order broken or repeated");
            assert!(count - got.len() as u64 <= lost, "{} missing, {lost} reported lost", count - got.len() as u64);
        }
    }
}

/// Peers cannot make a process hold more than its reassembly budget: a first fragment that
/// would pass it is not taken (nor acknowledged), and its sender sends it again once the
/// reassembly before it finished; nothing is lost.
#[test]
fn reassembly_stays_within_its_budget_and_loses_nothing() {
    // Room for two 70,000-byte messages, not three.
    let cfg = TransportConfig {
        reassembly_budget: 150_000,
        ..small_queue()
    };
    let mut sim = Sim::new(77, Link::hostile(), cfg);
    sim.run_a_to_b(0, 60, &|_| 70_000, 600_000 * MS);
    assert_exactly_once_in_order(&sim.b.got, 0, 60);
    assert!(sim.b.t.reassembly_reserved() <= 150_000);
    assert_eq!(
        sim.b.t.reassembly_reserved(),
        0,
        "every reservation was given back"
    );
}

#[test]
fn a_message_larger_than_the_budget_is_never_taken() {
    let cfg = TransportConfig {
        reassembly_budget: 50_000,
        ..small_queue()
    };
    let mut sim = Sim::new(78, Link::clean(), cfg);
    sim.run_a_to_b(0, 1, &|_| 70_000, 5_000 * MS);
    assert!(sim.b.got.is_empty());
    assert!(sim.b.t.stats().reassembly_refused > 0);
    assert_eq!(sim.b.t.reassembly_reserved(), 0);
}

/// A frame that cannot be emitted (no buffer, or not encodable) is tried again a little
/// later, not at once: before, the transport said "now" again and again, and the loop that
/// drives it never slept.
#[test]
fn a_frame_that_cannot_be_emitted_waits_before_trying_again() {
    let mut t = Transport::new(A, 100, small_queue());
    let m = message(0, 10);
    t.send(
        B,
        Outgoing {
            src_actor: 1,
            dst_actor: 2,
            msg_type: 3,
            payload: &m,
        },
    )
    .unwrap();
    assert_eq!(t.next_timeout(), Some(0));
    let now = 5 * MS;
    t.poll_transmit(now, &mut |_, _| false);
    assert_eq!(t.next_timeout(), Some(now + MS), "no spinning");
    let mut sent = 0;
    t.poll_transmit(now + MS, &mut |_, _| {
        sent += 1;
        true
    });
    assert_eq!(sent, 1, "it goes once it can");
}

/// Liveness judged on fresh frames cannot be faked: a frame delivered again (an on-link
/// replay) is not fresh, neither its data nor its ack.
#[test]
fn a_replayed_frame_is_not_fresh() {
    let mut a = Transport::new(A, 100, small_queue());
    let mut b = Transport::new(B, 200, small_queue());
    let mut buf = vec![0u8; 2048];
    let mut frames_ab = Vec::new();
    let mut frames_ba = Vec::new();
    let mut last_ack = None;
    let mut deliver = |_: Delivery<'_>| {};
    for i in 0..3u64 {
        let m = message(i, 10);
        a.send(
            B,
            Outgoing {
                src_actor: 1,
                dst_actor: 2,
                msg_type: 3,
                payload: &m,
            },
        )
        .unwrap();
        let now = (i + 1) * MS;
        // Until it knows B's session, A has one frame in flight: let them talk it over.
        for _ in 0..4 {
            a.poll_transmit(now, &mut |h, p| {
                let n = crate::frame::write_frame(&mut buf, h, p).unwrap();
                frames_ab.push(buf[..n].to_vec());
                true
            });
            for f in frames_ab.drain(..) {
                let fr = Frame::parse(&f).unwrap();
                if b.handle(&fr, now, &mut deliver) {
                    // Keep what B took as fresh data, to replay it.
                    frames_ba.push((true, f.clone()));
                }
            }
            b.poll_transmit(now, &mut |h, p| {
                let n = crate::frame::write_frame(&mut buf, h, p).unwrap();
                frames_ba.push((false, buf[..n].to_vec()));
                true
            });
            for (_, f) in frames_ba.iter().filter(|(to_b, _)| !to_b) {
                let fr = Frame::parse(f).unwrap();
                a.handle(&fr, now, &mut deliver);
                last_ack = Some(f.clone());
            }
            frames_ba.retain(|(to_b, _)| *to_b);
        }
    }
    assert_eq!(a.peer(B).map(|p| p.in_flight), Some(0), "all acknowledged");
    // Replays: every data frame B took, again.
    assert!(!frames_ba.is_empty());
    for (_, f) in &frames_ba {
        let fr = Frame::parse(f).unwrap();
        assert!(
            !b.handle(&fr, 10 * MS, &mut deliver),
            "replayed data is not fresh"
        );
    }
    let ack = last_ack.expect("B answered");
    let fr = Frame::parse(&ack).unwrap();
    assert!(
        !a.handle(&fr, 10 * MS, &mut deliver),
        "a replayed ack is not fresh"
    );
}
