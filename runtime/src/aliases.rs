//! Alias commit: a packet whose flow has just registered aliases leaves only once the
//! vswitch that feeds the flow has them.
//!
//! A function that rewrites addresses (NAT, a load balancer) registers the translated reply
//! key as an alias of the flow, and the vswitch must dispatch the reply under it to this
//! runtime. The reply can come back as soon as the packet that made the translation leaves.
//! If the vswitch has not learnt the alias by then, the reply starts a flow of its own,
//! somewhere else, and the connection breaks (the firewall there sees a SYN-ACK open a flow
//! and drops it). The alias message is sent before the packet, but that is not enough: the
//! reliable transport may queue it behind a full window, and between servers it travels
//! apart from the packet and may be lost and sent again.
//!
//! So the runtime holds such packets until the vswitch answers (`AddAliases` with a request,
//! answered by `AliasesAdded`). Every flush that registers aliases for a held packet opens
//! an *epoch*; its requests (one per vswitch) carry the epoch's number, and each vswitch's
//! answer is counted once. A packet whose flow registered aliases waits for the current
//! epoch, and so do the flow's later packets while it lasts, so that none overtakes
//! another. Packets leave in the order they were held; an epoch that is not answered within
//! the timeout is let go (and counted): the packets then go out as they did before this
//! existed. A flow whose alias the vswitch refused (another runtime holds the key) has its
//! held packets dropped: sending them would have the replies reach the other flow. Aliases
//! registered by a packet that is not sent (a later function dropped it) open no epoch:
//! their request is 0, which the vswitch answers only with refusals.
//!
//! No I/O and no clock: the engine gives the time and moves the packets.

use std::collections::{HashMap, HashSet, VecDeque};

use nflib::frame::EndpointAddr;

/// Most packets held at once. Past it the oldest epochs are let go (as if timed out): a
/// vswitch that never answers costs reordering-free forwarding of unconfirmed packets,
/// never the runtime's packet buffers.
pub const MAX_HELD: usize = 4096;

/// One flush's alias requests.
#[derive(Debug)]
struct Epoch {
    id: u64,
    /// Vswitches yet to answer.
    outstanding: Vec<EndpointAddr>,
    deadline_ns: u64,
}

/// What became of held packets, for the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitCounters {
    pub held: u64,
    /// Epochs let go unanswered: past their deadline, or to keep within `MAX_HELD`.
    pub timeouts: u64,
    pub refused_flows: u64,
}

pub struct AliasCommit<P> {
    /// The epoch the next flush with held packets opens.
    next: u64,
    /// A packet waits for epoch `next`: the coming flush must ask for answers.
    next_held: bool,
    /// Every epoch below this one is over (answered, timed out, or never needed).
    done_below: u64,
    /// Epochs sent and not over, oldest (lowest id) first.
    epochs: VecDeque<Epoch>,
    /// Flows with held packets: row -> (epoch, flow id).
    waiting: HashMap<u32, (u64, u64)>,
    /// Held packets in the order they are to leave: (epoch, row, flow id, packet). The
    /// epochs never decrease along the queue.
    held: VecDeque<(u64, u32, u64, P)>,
    /// Flows (by id) whose aliases were refused while their packets waited.
    refused: HashSet<u64>,
    timeout_ns: u64,
    max_held: usize,
    pub counters: CommitCounters,
}

impl<P> AliasCommit<P> {
    pub fn new(timeout_ns: u64) -> AliasCommit<P> {
        AliasCommit::with_limit(timeout_ns, MAX_HELD)
    }

    pub fn with_limit(timeout_ns: u64, max_held: usize) -> AliasCommit<P> {
        AliasCommit {
            next: 1,
            next_held: false,
            done_below: 1,
            epochs: VecDeque::new(),
            waiting: HashMap::new(),
            held: VecDeque::new(),
            refused: HashSet::new(),
            timeout_ns,
            max_held,
            counters: CommitCounters::default(),
        }
    }

    /// The epoch a packet of flow (`row`, `flow`) must wait for: the coming one if the
    /// packet registered aliases (`registered`), else the one its flow already waits for,
    /// if that is not over.
    #[inline]
    pub fn hold_for(&mut self, row: u32, flow: u64, registered: bool) -> Option<u64> {
        if registered {
            return Some(self.next);
        }
        if self.waiting.is_empty() {
            return None;
        }
        match self.waiting.get(&row) {
            Some(&(epoch, id)) if id == flow && epoch >= self.done_below => Some(epoch),
            _ => None,
        }
    }

    /// Whether flow (`row`, `flow`) has packets waiting for an epoch.
    pub fn is_waiting(&self, row: u32, flow: u64) -> bool {
        matches!(self.waiting.get(&row), Some(&(e, id)) if id == flow && e >= self.done_below)
    }

    /// Holds `p`, a packet of flow (`row`, `flow`), until `epoch` is over.
    pub fn hold(&mut self, epoch: u64, row: u32, flow: u64, p: P) {
        // Packets leave in queue order, so one queued behind a later epoch's packet waits
        // for that epoch too, and so must its flow's next packets: were they to wait only
        // for `epoch`, they could leave while this one is still queued.
        let epoch = self.held.back().map_or(epoch, |h| h.0.max(epoch));
        if epoch == self.next {
            self.next_held = true;
        }
        self.waiting.insert(row, (epoch, flow));
        self.held.push_back((epoch, row, flow, p));
        self.counters.held += 1;
    }

    /// Opens the epoch of this flush's alias requests, if a packet waits for it, and
    /// returns its number (the request every `AddAliases` of the flush carries). With no
    /// packet waiting, the requests need no answer (request 0): the vswitch still reports
    /// refusals.
    pub fn open(&mut self) -> Option<u64> {
        if !self.next_held {
            return None;
        }
        self.next_held = false;
        let id = self.next;
        self.next += 1;
        Some(id)
    }

    /// Epoch `id`'s requests went out at `now_ns` to `to` (the vswitches that are to
    /// answer).
    pub fn sent(&mut self, id: u64, to: Vec<EndpointAddr>, now_ns: u64) {
        self.epochs.push_back(Epoch {
            id,
            outstanding: to,
            deadline_ns: now_ns.saturating_add(self.timeout_ns),
        });
    }

    /// Vswitch `from` answered request `id`. Unknown or repeated answers change nothing.
    pub fn answered(&mut self, id: u64, from: EndpointAddr) {
        if let Ok(i) = self.epochs.binary_search_by_key(&id, |e| e.id) {
            let o = &mut self.epochs[i].outstanding;
            if let Some(j) = o.iter().position(|v| *v == from) {
                o.swap_remove(j);
            }
        }
    }

    /// The flow's held packets are to be dropped, not sent (its alias was refused).
    pub fn refuse(&mut self, flow: u64) {
        if self.held.iter().any(|(_, _, f, _)| *f == flow) && self.refused.insert(flow) {
            self.counters.refused_flows += 1;
        }
    }

    /// Whether `release` has anything to do.
    pub fn busy(&self) -> bool {
        !self.held.is_empty() || !self.epochs.is_empty()
    }

    /// Ends the epochs that are answered or past their deadline (or, past `MAX_HELD`
    /// packets, the oldest), oldest first, and moves the packets whose epoch is over, in
    /// order, to `out` (or to `dropped` for refused flows).
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<P>, dropped: &mut Vec<P>) {
        self.release_to(now_ns, &mut |_, _, p| out.push(p), dropped);
    }

    /// As `release`, giving each packet to `emit` with its flow (row, id).
    pub fn release_to(
        &mut self,
        now_ns: u64,
        emit: &mut dyn FnMut(u32, u64, P),
        dropped: &mut Vec<P>,
    ) {
        while let Some(e) = self.epochs.front() {
            let waited_out = now_ns >= e.deadline_ns || self.held.len() > self.max_held;
            if !e.outstanding.is_empty() && !waited_out {
                break;
            }
            if !e.outstanding.is_empty() {
                self.counters.timeouts += 1;
            }
            let id = e.id;
            self.epochs.pop_front();
            if self.held.len() > self.max_held {
                // Let go of this epoch's packets before judging the next one.
                self.done_below = id + 1;
                self.release_done(emit, dropped);
            }
        }
        // The oldest epoch not over bounds those that are (an epoch whose requests the
        // mailbox refused went to nobody and is over at once).
        self.done_below = self.epochs.front().map_or(self.next, |e| e.id);
        self.release_done(emit, dropped);
    }

    /// Moves the packets of epochs below `done_below` out.
    fn release_done(&mut self, emit: &mut dyn FnMut(u32, u64, P), dropped: &mut Vec<P>) {
        while let Some(&(epoch, row, flow, _)) = self.held.front() {
            if epoch >= self.done_below {
                break;
            }
            let Some((_, _, _, p)) = self.held.pop_front() else {
                break;
            };
            if self.waiting.get(&row) == Some(&(epoch, flow)) {
                self.waiting.remove(&row);
            }
            if self.refused.contains(&flow) {
                dropped.push(p);
            } else {
                emit(row, flow, p);
            }
        }
        if self.held.is_empty() {
            self.refused.clear();
            self.waiting.clear();
        }
    }

    /// When `release` next has something to do by the clock alone.
    pub fn next_deadline(&self) -> Option<u64> {
        self.epochs.front().map(|e| e.deadline_ns)
    }

    /// Packets held now.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Every held packet, to free (the runtime is stopping).
    pub fn drain(&mut self) -> impl Iterator<Item = P> + '_ {
        self.waiting.clear();
        self.refused.clear();
        self.held.drain(..).map(|(_, _, _, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: EndpointAddr = EndpointAddr { server: 1, slot: 1 };
    const V2: EndpointAddr = EndpointAddr { server: 2, slot: 1 };

    fn release(c: &mut AliasCommit<u32>, now: u64) -> (Vec<u32>, Vec<u32>) {
        let (mut out, mut dropped) = (Vec::new(), Vec::new());
        c.release(now, &mut out, &mut dropped);
        (out, dropped)
    }

    #[test]
    fn packets_wait_for_their_epoch_and_leave_in_order() {
        let mut c = AliasCommit::new(1_000);
        // Flow 7 (row 1) registers an alias: its packet waits.
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 100);
        // Its next packet, before the flush, waits for the same epoch.
        assert_eq!(c.hold_for(1, 7, false), Some(e));
        c.hold(e, 1, 7, 101);
        assert!(c.is_waiting(1, 7));
        // Another flow's packet does not wait.
        assert_eq!(c.hold_for(2, 8, false), None);
        assert_eq!(c.open(), Some(e));
        c.sent(e, vec![V1, V2], 0);
        assert_eq!(release(&mut c, 10), (vec![], vec![]));
        c.answered(e, V1);
        c.answered(e, V1);
        assert_eq!(
            release(&mut c, 10),
            (vec![], vec![]),
            "one of two vswitches answered (twice)"
        );
        c.answered(e, V2);
        assert_eq!(release(&mut c, 10), (vec![100, 101], vec![]));
        assert_eq!(c.hold_for(1, 7, false), None, "the epoch is over");
        assert!(!c.is_waiting(1, 7));
        assert_eq!(c.held_len(), 0);
        assert!(!c.busy());
    }

    #[test]
    fn an_unanswered_epoch_times_out_and_a_later_one_waits_behind_it() {
        let mut c = AliasCommit::new(1_000);
        let e1 = c.hold_for(1, 7, true).unwrap();
        c.hold(e1, 1, 7, 1);
        assert_eq!(c.open(), Some(e1));
        c.sent(e1, vec![V1], 0);
        let e2 = c.hold_for(2, 8, true).unwrap();
        assert!(e2 > e1);
        c.hold(e2, 2, 8, 2);
        assert_eq!(c.open(), Some(e2));
        c.sent(e2, vec![V1], 500);
        c.answered(e2, V1);
        assert_eq!(
            release(&mut c, 999),
            (vec![], vec![]),
            "the first still waits"
        );
        assert_eq!(c.next_deadline(), Some(1_000));
        assert_eq!(release(&mut c, 1_000), (vec![1, 2], vec![]));
        assert_eq!(c.counters.timeouts, 1);
    }

    #[test]
    fn a_packet_queued_behind_a_later_epoch_keeps_its_flow_behind_it() {
        let mut c = AliasCommit::new(1_000);
        // Flow 7 waits for epoch e1.
        let e1 = c.hold_for(1, 7, true).unwrap();
        c.hold(e1, 1, 7, 1);
        assert_eq!(c.open(), Some(e1));
        c.sent(e1, vec![V1], 0);
        // Flow 8 registers in the next flush: e2. Then flow 7's next packet queues behind
        // flow 8's.
        let e2 = c.hold_for(2, 8, true).unwrap();
        c.hold(e2, 2, 8, 2);
        let w = c.hold_for(1, 7, false).unwrap();
        assert_eq!(w, e1);
        c.hold(w, 1, 7, 3);
        assert_eq!(c.open(), Some(e2));
        c.sent(e2, vec![V1], 0);
        // e1 is answered, e2 not: flow 7's queued packet is still held, so its next one
        // must wait as well, or it would overtake it.
        c.answered(e1, V1);
        assert_eq!(release(&mut c, 1), (vec![1], vec![]));
        assert_eq!(c.hold_for(1, 7, false), Some(e2));
        c.hold(e2, 1, 7, 4);
        c.answered(e2, V1);
        assert_eq!(release(&mut c, 2), (vec![2, 3, 4], vec![]));
    }

    #[test]
    fn a_refused_flow_loses_its_held_packets_and_others_go() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        c.hold(e, 2, 8, 2);
        c.hold(e, 1, 7, 3);
        assert_eq!(c.open(), Some(e));
        c.sent(e, vec![V1], 0);
        c.refuse(7);
        c.refuse(99); // nothing held: nothing to do
        c.answered(e, V1);
        assert_eq!(release(&mut c, 1), (vec![2], vec![1, 3]));
        assert_eq!(c.counters.refused_flows, 1);
    }

    #[test]
    fn an_epoch_whose_requests_could_not_be_sent_is_over() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        assert_eq!(c.open(), Some(e));
        c.sent(e, Vec::new(), 0);
        assert_eq!(release(&mut c, 0), (vec![1], vec![]));
    }

    #[test]
    fn aliases_without_a_held_packet_open_no_epoch_and_leave_nothing_to_wake_for() {
        let mut c: AliasCommit<u32> = AliasCommit::new(1_000);
        // The packet that registered was dropped: nothing held.
        assert_eq!(c.hold_for(1, 7, true), Some(1));
        assert_eq!(c.open(), None);
        assert!(!c.busy());
        assert_eq!(c.next_deadline(), None);
        // An epoch answered with nothing held is let go by release all the same.
        let e = c.hold_for(2, 8, true).unwrap();
        c.hold(e, 2, 8, 5);
        assert_eq!(c.open(), Some(e));
        c.sent(e, vec![V1], 0);
        c.refuse(8);
        c.answered(e, V1);
        assert_eq!(release(&mut c, 0), (vec![], vec![5]));
        assert!(!c.busy());
    }

    #[test]
    fn past_the_limit_the_oldest_epochs_are_let_go() {
        let mut c = AliasCommit::with_limit(1_000_000, 4);
        for i in 0..3u32 {
            let e = c.hold_for(i, u64::from(i), true).unwrap();
            c.hold(e, i, u64::from(i), i * 10);
            c.hold(e, i, u64::from(i), i * 10 + 1);
            assert_eq!(c.open(), Some(e));
            c.sent(e, vec![V1], 0);
        }
        // Six held, limit four: the first epoch goes, then the second is within bounds.
        assert_eq!(release(&mut c, 0), (vec![0, 1], vec![]));
        assert_eq!(c.held_len(), 4);
        assert_eq!(c.counters.timeouts, 1);
    }

    #[test]
    fn a_reused_slot_does_not_inherit_the_wait() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        // Flow 7 ended; row 1 now holds flow 9.
        assert_eq!(c.hold_for(1, 9, false), None);
    }

    #[test]
    fn stopping_frees_every_held_packet() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        c.hold(e, 2, 8, 2);
        assert_eq!(c.drain().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(c.held_len(), 0);
    }
}
