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
//! answered by `AliasesAdded`). Every flush that registers aliases opens an *epoch*; its
//! requests (one per vswitch) carry the epoch's number. A packet whose flow registered
//! aliases waits for the current epoch, and so do the flow's later packets while it lasts,
//! so that none overtakes another. Packets leave in the order they were held; an epoch that
//! is not answered within the timeout is let go (and counted): the packets then go out as
//! they did before this existed. A flow whose alias the vswitch refused (another runtime
//! holds the key) has its held packets dropped: sending them would have the replies reach
//! the other flow.
//!
//! No I/O and no clock: the engine gives the time and moves the packets.

use std::collections::{HashMap, HashSet, VecDeque};

/// One flush's alias requests.
#[derive(Debug)]
struct Epoch {
    id: u64,
    /// Requests not yet answered.
    outstanding: u32,
    deadline_ns: u64,
}

/// What became of held packets, for the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitCounters {
    pub held: u64,
    pub timeouts: u64,
    pub refused_flows: u64,
}

pub struct AliasCommit<P> {
    /// The epoch the next flush with aliases opens.
    next: u64,
    /// Every epoch below this one is over (answered, timed out, or never needed).
    done_below: u64,
    epochs: VecDeque<Epoch>,
    /// Flows with held packets: slot -> (epoch, flow id).
    waiting: HashMap<u32, (u64, u64)>,
    /// Held packets in the order they are to leave: (epoch, slot, flow id, packet).
    held: VecDeque<(u64, u32, u64, P)>,
    /// Flows (by id) whose aliases were refused while their packets waited.
    refused: HashSet<u64>,
    timeout_ns: u64,
    pub counters: CommitCounters,
}

impl<P> AliasCommit<P> {
    pub fn new(timeout_ns: u64) -> AliasCommit<P> {
        AliasCommit {
            next: 1,
            done_below: 1,
            epochs: VecDeque::new(),
            waiting: HashMap::new(),
            held: VecDeque::new(),
            refused: HashSet::new(),
            timeout_ns,
            counters: CommitCounters::default(),
        }
    }

    /// The epoch a packet of flow (`slot`, `flow`) must wait for: the coming one if the
    /// packet registered aliases (`registered`), else the one its flow already waits for,
    /// if that is not over.
    #[inline]
    pub fn hold_for(&mut self, slot: u32, flow: u64, registered: bool) -> Option<u64> {
        if registered {
            return Some(self.next);
        }
        if self.waiting.is_empty() {
            return None;
        }
        match self.waiting.get(&slot) {
            Some(&(epoch, id)) if id == flow && epoch >= self.done_below => Some(epoch),
            _ => None,
        }
    }

    /// Holds `p`, a packet of flow (`slot`, `flow`), until `epoch` is over.
    pub fn hold(&mut self, epoch: u64, slot: u32, flow: u64, p: P) {
        self.waiting.insert(slot, (epoch, flow));
        // Packets leave in this order; one held behind a later epoch waits for it too.
        self.held.push_back((epoch, slot, flow, p));
        self.counters.held += 1;
    }

    /// Opens the epoch of this flush's alias requests and returns its number (the request
    /// every `AddAliases` of the flush carries).
    pub fn open(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    /// `requests` messages of epoch `id` went out at `now_ns`.
    pub fn sent(&mut self, id: u64, requests: u32, now_ns: u64) {
        self.epochs.push_back(Epoch {
            id,
            outstanding: requests,
            deadline_ns: now_ns.saturating_add(self.timeout_ns),
        });
    }

    /// A vswitch answered request `id`. Unknown or repeated answers change nothing.
    pub fn answered(&mut self, id: u64) {
        if let Some(e) = self.epochs.iter_mut().find(|e| e.id == id) {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
    }

    /// The flow's held packets are to be dropped, not sent (its alias was refused).
    pub fn refuse(&mut self, flow: u64) {
        if self.held.iter().any(|(_, _, f, _)| *f == flow) && self.refused.insert(flow) {
            self.counters.refused_flows += 1;
        }
    }

    /// Ends the epochs that are answered or past their deadline, oldest first, and moves the
    /// packets whose epoch is over, in order, to `out` (or to `dropped` for refused flows).
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<P>, dropped: &mut Vec<P>) {
        while let Some(e) = self.epochs.front() {
            if e.outstanding > 0 && now_ns < e.deadline_ns {
                break;
            }
            if e.outstanding > 0 {
                self.counters.timeouts += 1;
            }
            self.epochs.pop_front();
        }
        // Epochs opened but never sent (every request refused by the mailbox) are over too.
        self.done_below = self.epochs.front().map_or(self.next, |e| e.id);
        while let Some(&(epoch, slot, flow, _)) = self.held.front() {
            if epoch >= self.done_below {
                break;
            }
            let Some((_, _, _, p)) = self.held.pop_front() else {
                break;
            };
            if self.waiting.get(&slot) == Some(&(epoch, flow)) {
                self.waiting.remove(&slot);
            }
            if self.refused.contains(&flow) {
                dropped.push(p);
            } else {
                out.push(p);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(c: &mut AliasCommit<u32>, now: u64) -> (Vec<u32>, Vec<u32>) {
        let (mut out, mut dropped) = (Vec::new(), Vec::new());
        c.release(now, &mut out, &mut dropped);
        (out, dropped)
    }

    #[test]
    fn packets_wait_for_their_epoch_and_leave_in_order() {
        let mut c = AliasCommit::new(1_000);
        // Flow 7 (slot 1) registers an alias: its packet waits.
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 100);
        // Its next packet, before the flush, waits for the same epoch.
        assert_eq!(c.hold_for(1, 7, false), Some(e));
        c.hold(e, 1, 7, 101);
        // Another flow's packet does not wait.
        assert_eq!(c.hold_for(2, 8, false), None);
        assert_eq!(c.open(), e);
        c.sent(e, 2, 0);
        assert_eq!(release(&mut c, 10), (vec![], vec![]));
        c.answered(e);
        assert_eq!(
            release(&mut c, 10),
            (vec![], vec![]),
            "one of two vswitches answered"
        );
        c.answered(e);
        c.answered(e);
        assert_eq!(release(&mut c, 10), (vec![100, 101], vec![]));
        assert_eq!(c.hold_for(1, 7, false), None, "the epoch is over");
        assert_eq!(c.held_len(), 0);
    }

    #[test]
    fn an_unanswered_epoch_times_out_and_a_later_one_waits_behind_it() {
        let mut c = AliasCommit::new(1_000);
        let e1 = c.hold_for(1, 7, true).unwrap();
        c.hold(e1, 1, 7, 1);
        assert_eq!(c.open(), e1);
        c.sent(e1, 1, 0);
        let e2 = c.hold_for(2, 8, true).unwrap();
        assert!(e2 > e1);
        c.hold(e2, 2, 8, 2);
        assert_eq!(c.open(), e2);
        c.sent(e2, 1, 500);
        c.answered(e2);
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
    fn a_refused_flow_loses_its_held_packets_and_others_go() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        c.hold(e, 2, 8, 2);
        c.hold(e, 1, 7, 3);
        assert_eq!(c.open(), e);
        c.sent(e, 1, 0);
        c.refuse(7);
        c.refuse(99); // nothing held: nothing to do
        c.answered(e);
        assert_eq!(release(&mut c, 1), (vec![2], vec![1, 3]));
        assert_eq!(c.counters.refused_flows, 1);
    }

    #[test]
    fn an_epoch_whose_requests_could_not_be_sent_is_over() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        assert_eq!(c.open(), e);
        c.sent(e, 0, 0);
        assert_eq!(release(&mut c, 0), (vec![1], vec![]));
    }

    #[test]
    fn a_reused_slot_does_not_inherit_the_wait() {
        let mut c = AliasCommit::new(1_000);
        let e = c.hold_for(1, 7, true).unwrap();
        c.hold(e, 1, 7, 1);
        // Flow 7 ended; slot 1 now holds flow 9.
        assert_eq!(c.hold_for(1, 9, false), None);
    }
}
