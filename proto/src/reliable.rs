//! Reliable delivery of actor messages between endpoints, as an I/O-free state machine.
//!
//! The [`Transport`] of an endpoint holds one channel per peer endpoint. It takes frames
//! that arrived and the time, and gives back messages delivered in order, frames to send,
//! and when it next needs to be woken. It never reads a clock or touches a ring, so the tests
//! drive two transports through a simulated network with loss, duplication, reordering and
//! restarts in simulated time, and the processes run exactly the same code.
//!
//! The rules (see docs/MESSAGING.md for the reasoning):
//! - **Sessions.** Each side of a channel has a session number (its process incarnation,
//!   bumped when it gives up on the peer). Every frame carries the sender's session and the
//!   receiver's session as the sender knows it. A stream of sequence numbers exists for one
//!   pair of sessions and starts at 1. Data and acks are accepted only when both sessions
//!   match; a frame for an older session of the receiver is answered with an ack that
//!   carries the current one, so the sender learns it. A frame from an older session of the
//!   sender is stale and dropped.
//! - **First contact** costs one round trip: until the peer's session is known, one frame
//!   is in flight; when it becomes known nothing was accepted yet, so the frames go again
//!   under the right session, none lost.
//! - **Peer restart** (its session grows): what was sent to the old incarnation and not
//!   acknowledged is reported lost ([`PeerEvent::Restarted`]) and both streams start over.
//! - **Sequence numbers, cumulative and selective acks**: a frame is acknowledged by the
//!   cumulative ack (next sequence number expected) or by a bit of the selective ack (the 64
//!   frames after it). Frames after a gap wait in a receive window of `window` frames, so
//!   messages reach actors exactly once and in order.
//! - **Retransmission** after `rto_factor` x the smoothed RTT (the paper: 10 x RTT), bounded
//!   by `min_rto` and `max_rto`, doubling on each expiry; a frame three or more frames behind
//!   one the peer has selectively acknowledged is sent again at once (fast retransmit).
//!   RTT is sampled only from frames sent once (Karn).
//! - **A peer that stopped answering**: frames outstanding, nothing at all heard from the
//!   peer for `dead_after`, and [`MIN_TIMEOUTS_DEAD`] retransmission timeouts in that
//!   silence (or the oldest frame sent [`MAX_TRANSMISSIONS`] times whatever was heard). The channel reports
//!   [`PeerEvent::Dead`], drops what it held, and starts a new session, so if the peer comes
//!   back both sides start clean streams. Silence alone is not enough: on a lossy link with
//!   timeouts near `max_rto`, a few unlucky retransmissions in a row last longer than
//!   `dead_after`, and a live peer must not lose messages to bad luck. Deciding that a
//!   server is down is the cluster membership's job (heartbeats); this only bounds what a
//!   channel holds for a peer that is gone.
//! - **Messages larger than a frame** are split into fragments with consecutive sequence
//!   numbers and reassembled in order.

use std::collections::{HashMap, VecDeque};

use crate::frame::{EndpointAddr, Frame, FrameHeader, FrameKind, MAX_MESSAGE};

/// Selective-ack bits per frame; the receive window cannot be larger.
pub const SACK_BITS: u64 = 64;

/// Fragments ahead of a gap before the frame in the gap is sent again without waiting for
/// its timer.
const FAST_RETRANSMIT_AFTER: u64 = 3;

/// Retransmission timeouts in a row, with nothing heard from the peer, before it may be
/// declared dead. On a link losing 10 % each way a retransmission goes unanswered about one
/// time in five; eight in a row happen about once in 400,000 stalls. With timeouts doubling
/// from `min_rto` this is at least half a second, and about five seconds near `max_rto`.
pub const MIN_TIMEOUTS_DEAD: u32 = 8;

/// Transmissions of one frame without an ack before a peer that still answers is given up
/// on. With timeouts doubling up to `max_rto` this is over ten seconds.
pub const MAX_TRANSMISSIONS: u32 = 16;

/// After a frame could not be emitted, how long a channel waits before trying again.
const EMIT_RETRY_NS: u64 = 1_000_000;

/// Most peers one transport keeps channels for.
const MAX_PEERS: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub struct TransportConfig {
    /// Frames in flight per peer (at most 64).
    pub window: u64,
    /// Retransmission timeout as a multiple of the smoothed RTT.
    pub rto_factor: u64,
    pub min_rto_ns: u64,
    pub max_rto_ns: u64,
    /// Timeout before the first RTT sample.
    pub initial_rto_ns: u64,
    /// Frames outstanding and nothing heard from the peer for this long: it is dead.
    pub dead_after_ns: u64,
    /// Frames queued per peer (in flight and waiting) before `send` refuses.
    pub max_queue_frames: usize,
    /// Payload bytes per frame.
    pub max_payload: usize,
    /// Bytes all peers' messages being reassembled may take together. A message's first
    /// fragment reserves the whole message (fragments x the first's size); one that would
    /// go past this is not accepted (not acknowledged: its sender tries again later), so
    /// peers cannot make a process hold a 4 MiB reassembly each, and one reassembly
    /// started always has room to finish.
    pub reassembly_budget: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            window: 64,
            rto_factor: 10,
            min_rto_ns: 2_000_000,
            max_rto_ns: 1_000_000_000,
            initial_rto_ns: 20_000_000,
            dead_after_ns: 3_000_000_000,
            max_queue_frames: 16_384,
            max_payload: 1500 - crate::frame::HEADER_LEN - crate::frame::TAG_LEN,
            reassembly_budget: 64 << 20,
        }
    }
}

/// A message to send.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub src_actor: u64,
    pub dst_actor: u64,
    pub msg_type: u16,
    pub payload: &'a [u8],
}

/// A message delivered to an actor of this endpoint.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub from: EndpointAddr,
    pub src_actor: u64,
    pub dst_actor: u64,
    pub msg_type: u16,
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer runs a new incarnation; `lost` messages sent to the old one were not
    /// acknowledged and are gone.
    Restarted { peer: EndpointAddr, lost: u64 },
    /// The peer stopped acknowledging; `lost` messages were dropped.
    Dead { peer: EndpointAddr, lost: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The queue to this peer is full; try again after frames are acknowledged.
    QueueFull,
    /// Larger than `frame::MAX_MESSAGE`.
    TooLarge,
    /// Messages to oneself are function calls, not frames.
    ToSelf,
    /// Too many peers.
    TooManyPeers,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::QueueFull => "the queue to this peer is full",
            SendError::TooLarge => "the message is larger than the transport carries",
            SendError::ToSelf => "a message to its own endpoint",
            SendError::TooManyPeers => "too many peers",
        })
    }
}

impl std::error::Error for SendError {}

/// Counters of a transport, summed over its peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    pub msgs_sent: u64,
    pub msgs_delivered: u64,
    pub msgs_lost: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub acks_sent: u64,
    pub retransmits: u64,
    pub fast_retransmits: u64,
    pub timeouts: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub out_of_window: u64,
    /// Frames of an older session of the peer, or for an older session of ours.
    pub stale: u64,
    /// Fragments out of sequence, oversized messages, acks of frames never sent.
    pub malformed: u64,
    /// First fragments not taken because the reassembly budget was spent (their senders
    /// send them again).
    pub reassembly_refused: u64,
    pub peers_dead: u64,
    pub peers_restarted: u64,
}

/// What one peer's channel looks like now (for status output).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PeerInfo {
    pub peer: EndpointAddr,
    pub srtt_ns: u64,
    pub rto_ns: u64,
    pub in_flight: u64,
    pub queued: u64,
    pub my_session: u64,
    pub peer_session: u64,
}

struct SendFrame {
    src_actor: u64,
    dst_actor: u64,
    msg_type: u16,
    frag_index: u16,
    frag_count: u16,
    payload: Vec<u8>,
    last_tx: u64,
    transmissions: u32,
    sacked: bool,
    /// Marked for fast retransmission.
    rtx: bool,
}

struct RecvFrame {
    seq: u64,
    meta: FragMeta,
    payload: Vec<u8>,
    /// Bytes of the reassembly budget it reserved (a first fragment).
    reserved: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FragMeta {
    src_actor: u64,
    dst_actor: u64,
    msg_type: u16,
    frag_index: u16,
    frag_count: u16,
}

struct Reassembly {
    meta: FragMeta,
    next: u16,
    bytes: Vec<u8>,
    /// Bytes of the reassembly budget it holds.
    reserved: usize,
}

struct Channel {
    peer: EndpointAddr,
    my_session: u64,
    peer_session: u64,
    // Sending: sendq[0] has sequence number snd_una; frames before snd_nxt were sent.
    sendq: VecDeque<SendFrame>,
    snd_una: u64,
    snd_nxt: u64,
    srtt: u64,
    rttvar: u64,
    have_rtt: bool,
    rto: u64,
    backoff: u32,
    last_progress: u64,
    /// When the last frame of the peer's current session arrived.
    last_heard: u64,
    /// Retransmission timeouts since then.
    unanswered: u32,
    /// Earliest time a retransmission timer may fire (a scan then finds out).
    timer_at: u64,
    rtx_marked: usize,
    // Receiving.
    rcv_nxt: u64,
    ooo: Vec<Option<RecvFrame>>,
    reasm: Option<Reassembly>,
    /// Bytes of the transport's reassembly budget this channel holds (its reassembly and
    /// first fragments waiting out of order).
    reserved: usize,
    ack_pending: bool,
    /// A frame could not be emitted (no buffer, or one the caller cannot encode): nothing
    /// is tried again before this time, so a caller short of buffers sleeps rather than
    /// spins.
    blocked_until: u64,
}

fn count_messages(q: &VecDeque<SendFrame>) -> u64 {
    let mut n = q.iter().filter(|f| f.frag_index == 0).count() as u64;
    if q.front().is_some_and(|f| f.frag_index > 0) {
        n += 1;
    }
    n
}

impl Channel {
    fn new(peer: EndpointAddr, my_session: u64, cfg: &TransportConfig) -> Channel {
        Channel {
            peer,
            my_session,
            peer_session: 0,
            sendq: VecDeque::new(),
            snd_una: 1,
            snd_nxt: 1,
            srtt: 0,
            rttvar: 0,
            have_rtt: false,
            rto: cfg.initial_rto_ns,
            backoff: 0,
            last_progress: 0,
            last_heard: 0,
            unanswered: 0,
            timer_at: u64::MAX,
            rtx_marked: 0,
            rcv_nxt: 1,
            ooo: (0..cfg.window.min(SACK_BITS)).map(|_| None).collect(),
            reasm: None,
            reserved: 0,
            blocked_until: 0,
            ack_pending: false,
        }
    }

    fn window(&self) -> u64 {
        self.ooo.len() as u64
    }

    fn in_flight(&self) -> u64 {
        self.snd_nxt - self.snd_una
    }

    /// Forgets everything sent; returns how many messages that was.
    fn reset_send(&mut self) -> u64 {
        let lost = count_messages(&self.sendq);
        self.sendq.clear();
        self.snd_una = 1;
        self.snd_nxt = 1;
        self.backoff = 0;
        self.timer_at = u64::MAX;
        self.rtx_marked = 0;
        self.unanswered = 0;
        lost
    }

    fn reset_recv(&mut self) {
        self.rcv_nxt = 1;
        for s in &mut self.ooo {
            *s = None;
        }
        self.reasm = None;
        self.reserved = 0;
    }

    /// Whether the frames outstanding have waited too long (see the module's notes).
    fn given_up(&self, now: u64, cfg: &TransportConfig) -> bool {
        let silent = now.saturating_sub(self.alive_at()) >= cfg.dead_after_ns;
        (silent && self.unanswered >= MIN_TIMEOUTS_DEAD)
            || self.head_transmissions() >= MAX_TRANSMISSIONS
    }

    /// How often the oldest unacknowledged frame was sent.
    fn head_transmissions(&self) -> u32 {
        self.sendq
            .front()
            .filter(|f| !f.sacked)
            .map_or(0, |f| f.transmissions)
    }

    fn alive_at(&self) -> u64 {
        self.last_progress.max(self.last_heard)
    }

    fn effective_rto(&self, cfg: &TransportConfig) -> u64 {
        self.rto
            .saturating_mul(1u64 << self.backoff.min(16))
            .min(cfg.max_rto_ns)
    }

    fn sample_rtt(&mut self, rtt: u64, cfg: &TransportConfig) {
        // RFC 6298 smoothing; the timeout is the paper's multiple of the RTT, never below
        // the usual srtt + 4 rttvar.
        if !self.have_rtt {
            self.srtt = rtt;
            self.rttvar = rtt / 2;
            self.have_rtt = true;
        } else {
            let diff = self.srtt.abs_diff(rtt);
            self.rttvar = (3 * self.rttvar + diff) / 4;
            self.srtt = (7 * self.srtt + rtt) / 8;
        }
        let rto = (cfg.rto_factor * self.srtt).max(self.srtt + 4 * self.rttvar);
        self.rto = rto.clamp(cfg.min_rto_ns, cfg.max_rto_ns);
    }

    fn sack_bits(&self) -> u64 {
        let mut bits = 0u64;
        let w = self.window();
        for i in 0..w.min(SACK_BITS) {
            let seq = self.rcv_nxt + 1 + i;
            if let Some(f) = &self.ooo[(seq % w) as usize] {
                if f.seq == seq {
                    bits |= 1 << i;
                }
            }
        }
        bits
    }

    /// Returns whether the ack told something new (frames acknowledged for the first time).
    fn on_ack(
        &mut self,
        ack: u64,
        sack: u64,
        now: u64,
        cfg: &TransportConfig,
        st: &mut TransportStats,
    ) -> bool {
        if ack > self.snd_nxt || ack == 0 {
            st.malformed += 1;
            return false;
        }
        // RTT is sampled from the most recently sent frame this ack is the first news of,
        // among frames sent once (Karn): a frame selectively acknowledged earlier and now
        // covered by the cumulative ack waited for a gap to fill, not for the network.
        let mut newest_sent = None;
        let mut progress = false;
        let mut news = false;
        if ack > self.snd_una {
            for _ in self.snd_una..ack {
                if let Some(f) = self.sendq.pop_front() {
                    if f.transmissions == 1 && !f.sacked {
                        newest_sent = newest_sent.max(Some(f.last_tx));
                    }
                    if f.rtx {
                        self.rtx_marked -= 1;
                    }
                }
            }
            self.snd_una = ack;
            self.last_progress = now;
            self.backoff = 0;
            progress = true;
        }
        let mut highest = 0;
        for i in 0..SACK_BITS {
            if sack >> i & 1 == 0 {
                continue;
            }
            let seq = ack + 1 + i;
            if seq < self.snd_una || seq >= self.snd_nxt {
                continue;
            }
            if let Some(f) = self.sendq.get_mut((seq - self.snd_una) as usize) {
                if !f.sacked {
                    news = true;
                    f.sacked = true;
                    if f.transmissions == 1 {
                        newest_sent = newest_sent.max(Some(f.last_tx));
                    }
                    if f.rtx {
                        f.rtx = false;
                        self.rtx_marked -= 1;
                    }
                }
                highest = seq;
            }
        }
        if let Some(t) = newest_sent {
            self.sample_rtt(now.saturating_sub(t), cfg);
        }
        if progress {
            // The timer restarts from the last progress.
            self.timer_at = if self.in_flight() > 0 {
                now.saturating_add(self.effective_rto(cfg))
            } else {
                u64::MAX
            };
        }
        // Frames well behind one the peer holds are lost, not late: send them again now,
        // unless they were sent within the last RTT.
        if highest >= self.snd_una + FAST_RETRANSMIT_AFTER {
            let recent = if self.have_rtt { self.srtt } else { self.rto };
            for seq in self.snd_una..=highest - FAST_RETRANSMIT_AFTER {
                if let Some(f) = self.sendq.get_mut((seq - self.snd_una) as usize) {
                    if !f.sacked && !f.rtx && now.saturating_sub(f.last_tx) >= recent {
                        f.rtx = true;
                        self.rtx_marked += 1;
                    }
                }
            }
        }
        progress || news
    }

    /// Handles an in-order fragment: delivers a whole message or adds to the one being
    /// reassembled.
    /// `need` is what this fragment reserved of the reassembly budget (counted in
    /// `reserved` already); a reassembly's share leaves `reserved` with it.
    #[allow(clippy::too_many_arguments)]
    fn consume(
        reasm: &mut Option<Reassembly>,
        reserved: &mut usize,
        need: usize,
        from: EndpointAddr,
        meta: FragMeta,
        payload: &[u8],
        st: &mut TransportStats,
        deliver: &mut dyn FnMut(Delivery<'_>),
    ) {
        let drop_reasm = |reasm: &mut Option<Reassembly>, reserved: &mut usize| {
            if let Some(r) = reasm.take() {
                *reserved = reserved.saturating_sub(r.reserved);
                true
            } else {
                false
            }
        };
        if meta.frag_count == 1 {
            if drop_reasm(reasm, reserved) {
                st.malformed += 1;
            }
            st.msgs_delivered += 1;
            deliver(Delivery {
                from,
                src_actor: meta.src_actor,
                dst_actor: meta.dst_actor,
                msg_type: meta.msg_type,
                payload,
            });
            return;
        }
        if meta.frag_index == 0 {
            if drop_reasm(reasm, reserved) {
                st.malformed += 1;
            }
            *reasm = Some(Reassembly {
                meta,
                next: 1,
                bytes: payload.to_vec(),
                reserved: need,
            });
            return;
        }
        let ok = matches!(reasm, Some(r) if r.next == meta.frag_index
            && r.meta.frag_count == meta.frag_count
            && r.meta.src_actor == meta.src_actor
            && r.meta.dst_actor == meta.dst_actor
            && r.meta.msg_type == meta.msg_type
            && r.bytes.len() + payload.len() <= MAX_MESSAGE);
        if !ok {
            st.malformed += 1;
            drop_reasm(reasm, reserved);
            return;
        }
        let Some(r) = reasm.as_mut() else { return };
        r.bytes.extend_from_slice(payload);
        r.next += 1;
        if r.next == r.meta.frag_count {
            if let Some(r) = reasm.take() {
                *reserved = reserved.saturating_sub(r.reserved);
                st.msgs_delivered += 1;
                deliver(Delivery {
                    from,
                    src_actor: r.meta.src_actor,
                    dst_actor: r.meta.dst_actor,
                    msg_type: r.meta.msg_type,
                    payload: &r.bytes,
                });
            }
        }
    }

    /// `room`: bytes of the reassembly budget this channel may hold in all (what the other
    /// channels leave). Returns whether the frame was new (taken, in order or not).
    fn on_data(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        room: usize,
        st: &mut TransportStats,
        deliver: &mut dyn FnMut(Delivery<'_>),
    ) -> bool {
        self.ack_pending = true;
        let seq = h.seq;
        let w = self.window();
        if seq < self.rcv_nxt {
            st.duplicates += 1;
            return false;
        }
        if seq >= self.rcv_nxt + w {
            st.out_of_window += 1;
            return false;
        }
        let meta = FragMeta {
            src_actor: h.src_actor,
            dst_actor: h.dst_actor,
            msg_type: h.msg_type,
            frag_index: h.frag_index,
            frag_count: h.frag_count,
        };
        // A message's first fragment reserves room for all of it, or is not taken yet.
        let need = if meta.frag_count > 1 && meta.frag_index == 0 {
            payload.len().max(1) * usize::from(meta.frag_count)
        } else {
            0
        };
        let admit = |reserved: usize, st: &mut TransportStats| {
            if need > 0 && reserved + need > room {
                st.reassembly_refused += 1;
                false
            } else {
                true
            }
        };
        if seq > self.rcv_nxt {
            let slot = &mut self.ooo[(seq % w) as usize];
            if slot.as_ref().is_some_and(|f| f.seq == seq) {
                st.duplicates += 1;
                return false;
            } else if admit(self.reserved, st) {
                st.out_of_order += 1;
                if let Some(old) = slot.take() {
                    self.reserved = self.reserved.saturating_sub(old.reserved);
                }
                self.reserved += need;
                *slot = Some(RecvFrame {
                    seq,
                    meta,
                    payload: payload.to_vec(),
                    reserved: need,
                });
                return true;
            }
            return false;
        }
        if !admit(self.reserved, st) {
            return false;
        }
        self.reserved += need;
        Self::consume(
            &mut self.reasm,
            &mut self.reserved,
            need,
            self.peer,
            meta,
            payload,
            st,
            deliver,
        );
        self.rcv_nxt += 1;
        loop {
            let idx = (self.rcv_nxt % w) as usize;
            match self.ooo[idx].take() {
                Some(f) if f.seq == self.rcv_nxt => {
                    Self::consume(
                        &mut self.reasm,
                        &mut self.reserved,
                        f.reserved,
                        self.peer,
                        f.meta,
                        &f.payload,
                        st,
                        deliver,
                    );
                    self.rcv_nxt += 1;
                }
                other => {
                    self.ooo[idx] = other;
                    break;
                }
            }
        }
        true
    }

    fn header(&self, me: EndpointAddr) -> FrameHeader {
        let mut h = FrameHeader::ack(me, self.peer);
        h.src_session = self.my_session;
        h.dst_session = self.peer_session;
        h.ack = self.rcv_nxt;
        h.sack = self.sack_bits();
        h
    }

    fn data_header(&self, me: EndpointAddr, seq: u64, f: &SendFrame) -> FrameHeader {
        let mut h = self.header(me);
        h.kind = FrameKind::Data;
        h.src_actor = f.src_actor;
        h.dst_actor = f.dst_actor;
        h.msg_type = f.msg_type;
        h.frag_index = f.frag_index;
        h.frag_count = f.frag_count;
        h.seq = seq;
        h
    }

    fn transmit(
        &mut self,
        me: EndpointAddr,
        now: u64,
        cfg: &TransportConfig,
        st: &mut TransportStats,
        events: &mut Vec<PeerEvent>,
        emit: &mut dyn FnMut(&FrameHeader, &[u8]) -> bool,
    ) {
        // Judged when the timer fires, before sending again: the last transmission was a
        // whole timeout ago, so nothing of it is still on the way to be delivered after the
        // messages were reported lost.
        if self.in_flight() > 0 && now >= self.timer_at && self.given_up(now, cfg) {
            let lost = self.reset_send();
            st.msgs_lost += lost;
            st.peers_dead += 1;
            events.push(PeerEvent::Dead {
                peer: self.peer,
                lost,
            });
            // A new session: if the peer is still there, it starts clean streams with us.
            self.my_session += 1;
            self.reset_recv();
        }
        let mut emitted = false;
        // Fast retransmissions: frames the peer's selective acks show missing.
        if self.rtx_marked > 0 {
            for i in 0..self.in_flight() as usize {
                if !self.sendq[i].rtx {
                    continue;
                }
                let seq = self.snd_una + i as u64;
                let h = self.data_header(me, seq, &self.sendq[i]);
                if !emit(&h, &self.sendq[i].payload) {
                    self.blocked_until = now.saturating_add(EMIT_RETRY_NS);
                    return;
                }
                emitted = true;
                self.rtx_marked -= 1;
                let f = &mut self.sendq[i];
                f.rtx = false;
                f.last_tx = now;
                f.transmissions += 1;
                st.fast_retransmits += 1;
                st.retransmits += 1;
                st.frames_sent += 1;
            }
        }
        // One timer per channel, as TCP's: when it fires, the oldest frame the peer has not
        // acknowledged goes again (the oldest of all if it selectively acknowledged every
        // one, so a lost cumulative ack is answered), and the timeout doubles. Frames behind
        // it are left to selective acks: a descheduled peer costs one frame per timeout,
        // not a window.
        if self.in_flight() > 0 && now >= self.timer_at {
            let i = (0..self.in_flight() as usize)
                .find(|&i| !self.sendq[i].sacked)
                .unwrap_or(0);
            let seq = self.snd_una + i as u64;
            let h = self.data_header(me, seq, &self.sendq[i]);
            if !emit(&h, &self.sendq[i].payload) {
                self.blocked_until = now.saturating_add(EMIT_RETRY_NS);
                return;
            }
            emitted = true;
            let f = &mut self.sendq[i];
            f.last_tx = now;
            f.transmissions += 1;
            st.timeouts += 1;
            self.unanswered = self.unanswered.saturating_add(1);
            st.retransmits += 1;
            st.frames_sent += 1;
            self.backoff = (self.backoff + 1).min(16);
            self.timer_at = now.saturating_add(self.effective_rto(cfg));
        }
        // Until the peer's session is known, one frame finds it out.
        let limit = if self.peer_session == 0 {
            1
        } else {
            self.window()
        };
        while self.in_flight() < limit && (self.in_flight() as usize) < self.sendq.len() {
            let i = self.in_flight() as usize;
            if i == 0 {
                self.last_progress = now;
                self.timer_at = now.saturating_add(self.effective_rto(cfg));
            }
            let h = self.data_header(me, self.snd_nxt, &self.sendq[i]);
            if !emit(&h, &self.sendq[i].payload) {
                // No buffer: the frame stays unsent and goes on a later call.
                if i == 0 {
                    self.timer_at = u64::MAX;
                }
                self.blocked_until = now.saturating_add(EMIT_RETRY_NS);
                return;
            }
            emitted = true;
            let f = &mut self.sendq[i];
            f.last_tx = now;
            f.transmissions = 1;
            self.snd_nxt += 1;
            st.frames_sent += 1;
        }
        if self.ack_pending && !emitted {
            if !emit(&self.header(me), &[]) {
                self.blocked_until = now.saturating_add(EMIT_RETRY_NS);
                return;
            }
            st.acks_sent += 1;
            st.frames_sent += 1;
        }
        self.ack_pending = false;
    }

    fn next_timeout(&self) -> Option<u64> {
        self.due().map(|t| t.max(self.blocked_until))
    }

    fn due(&self) -> Option<u64> {
        if self.ack_pending || self.rtx_marked > 0 {
            return Some(0);
        }
        if (self.in_flight() as usize) < self.sendq.len() {
            let limit = if self.peer_session == 0 {
                1
            } else {
                self.window()
            };
            if self.in_flight() < limit {
                return Some(0);
            }
        }
        if self.in_flight() == 0 {
            return None;
        }
        Some(self.timer_at)
    }
}

fn channel_of<'a>(
    channels: &'a mut HashMap<EndpointAddr, Channel>,
    peer: EndpointAddr,
    session: u64,
    cfg: &TransportConfig,
) -> Option<&'a mut Channel> {
    if !channels.contains_key(&peer) && channels.len() >= MAX_PEERS {
        return None;
    }
    Some(
        channels
            .entry(peer)
            .or_insert_with(|| Channel::new(peer, session, cfg)),
    )
}

/// The reliable transport of one endpoint: a channel per peer.
pub struct Transport {
    me: EndpointAddr,
    session: u64,
    cfg: TransportConfig,
    channels: HashMap<EndpointAddr, Channel>,
    events: Vec<PeerEvent>,
    stats: TransportStats,
    /// Bytes of `cfg.reassembly_budget` all channels hold together.
    reserved: usize,
}

impl Transport {
    /// `session` must grow from one incarnation of this endpoint to the next (nanoseconds of
    /// wall-clock time at start do).
    pub fn new(me: EndpointAddr, session: u64, cfg: TransportConfig) -> Transport {
        let mut cfg = cfg;
        cfg.window = cfg.window.clamp(1, SACK_BITS);
        cfg.max_payload = cfg.max_payload.max(64);
        Transport {
            me,
            session: session.max(1),
            cfg,
            channels: HashMap::new(),
            events: Vec::new(),
            stats: TransportStats::default(),
            reserved: 0,
        }
    }

    pub fn me(&self) -> EndpointAddr {
        self.me
    }

    pub fn config(&self) -> &TransportConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Bytes of the reassembly budget held now (all peers).
    pub fn reassembly_reserved(&self) -> usize {
        self.reserved
    }

    fn channel(&mut self, peer: EndpointAddr) -> Option<&mut Channel> {
        channel_of(&mut self.channels, peer, self.session, &self.cfg)
    }

    /// Frames that can still be queued to `peer` before `send` refuses.
    pub fn room(&self, peer: EndpointAddr) -> usize {
        let used = self.channels.get(&peer).map(|c| c.sendq.len()).unwrap_or(0);
        self.cfg.max_queue_frames.saturating_sub(used)
    }

    /// Frames a message of `len` bytes takes.
    pub fn frames_for(&self, len: usize) -> usize {
        len.div_ceil(self.cfg.max_payload).max(1)
    }

    /// Queues a message to an actor of `peer`. It leaves on the next `poll_transmit`.
    pub fn send(&mut self, peer: EndpointAddr, msg: Outgoing<'_>) -> Result<(), SendError> {
        if peer == self.me {
            return Err(SendError::ToSelf);
        }
        if msg.payload.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge);
        }
        let frames = self.frames_for(msg.payload.len());
        if frames > self.room(peer) {
            return Err(SendError::QueueFull);
        }
        let max = self.cfg.max_payload;
        let ch = self.channel(peer).ok_or(SendError::TooManyPeers)?;
        for i in 0..frames {
            let chunk = &msg.payload
                [(i * max).min(msg.payload.len())..((i + 1) * max).min(msg.payload.len())];
            ch.sendq.push_back(SendFrame {
                src_actor: msg.src_actor,
                dst_actor: msg.dst_actor,
                msg_type: msg.msg_type,
                frag_index: i as u16,
                frag_count: frames as u16,
                payload: chunk.to_vec(),
                last_tx: 0,
                transmissions: 0,
                sacked: false,
                rtx: false,
            });
        }
        self.stats.msgs_sent += 1;
        Ok(())
    }

    /// Handles a frame addressed to this endpoint; messages it completes are handed to
    /// `deliver`, in order. Returns whether the frame was *fresh*: new data, or an ack of
    /// frames not acknowledged before. A replayed frame never is (its data is a duplicate,
    /// its ack old news), so liveness judged on fresh frames cannot be faked by replaying a
    /// dead peer's frames.
    pub fn handle(
        &mut self,
        frame: &Frame<'_>,
        now: u64,
        deliver: &mut dyn FnMut(Delivery<'_>),
    ) -> bool {
        let h = &frame.header;
        self.stats.frames_received += 1;
        if h.dst != self.me || h.src == self.me {
            self.stats.malformed += 1;
            return false;
        }
        let cfg = self.cfg;
        let Some(ch) = channel_of(&mut self.channels, h.src, self.session, &cfg) else {
            self.stats.malformed += 1;
            return false;
        };
        // What this channel holds of the reassembly budget is kept in the total as it
        // changes (a reset, a reassembly started or finished).
        let before = ch.reserved;
        let others = self.reserved.saturating_sub(before);
        let room = cfg.reassembly_budget.saturating_sub(others);
        let st = &mut self.stats;
        if h.src_session < ch.peer_session || h.src_session == 0 {
            st.stale += 1;
            return false;
        }
        if h.src_session > ch.peer_session {
            if ch.peer_session == 0 {
                // First contact: nothing sent so far was accepted (it named no session of
                // the peer), so it all goes again under the right one.
                ch.snd_nxt = ch.snd_una;
                for f in ch.sendq.iter_mut() {
                    f.transmissions = 0;
                    f.sacked = false;
                    f.rtx = false;
                }
                ch.rtx_marked = 0;
                ch.timer_at = u64::MAX;
            } else {
                let lost = ch.reset_send();
                st.msgs_lost += lost;
                st.peers_restarted += 1;
                self.events.push(PeerEvent::Restarted { peer: h.src, lost });
            }
            ch.reset_recv();
            self.reserved = others;
            ch.peer_session = h.src_session;
        }
        if h.dst_session != ch.my_session {
            // The peer does not know our current session yet: tell it.
            st.stale += 1;
            ch.ack_pending = true;
            return false;
        }
        let mut fresh = ch.on_ack(h.ack, h.sack, now, &cfg, st);
        if h.kind == FrameKind::Data {
            fresh |= ch.on_data(h, frame.payload, room, st, deliver);
        }
        // Only news is hearing from the peer: an ack that acknowledges nothing new, or data
        // already taken, is what anyone who recorded the peer's frames could send (a replay
        // on the link, authentic and tagged), and must not keep a dead peer alive.
        if fresh {
            ch.last_heard = now;
            ch.unanswered = 0;
        }
        self.reserved = others + ch.reserved;
        fresh
    }

    /// Emits every frame due now: retransmissions, new frames the windows allow, and acks.
    pub fn poll_transmit(&mut self, now: u64, emit: &mut dyn FnMut(&FrameHeader, &[u8]) -> bool) {
        let me = self.me;
        for ch in self.channels.values_mut() {
            if ch.next_timeout().is_some_and(|t| t <= now) {
                // A peer given up on has its receiving side reset, and its reservation goes.
                let before = ch.reserved;
                ch.transmit(me, now, &self.cfg, &mut self.stats, &mut self.events, emit);
                self.reserved = self
                    .reserved
                    .saturating_sub(before - ch.reserved.min(before));
            }
        }
    }

    /// When `poll_transmit` next has something to do (0: now), or None.
    pub fn next_timeout(&self) -> Option<u64> {
        self.channels
            .values()
            .filter_map(|c| c.next_timeout())
            .min()
    }

    /// Peer events since the last call.
    pub fn take_events(&mut self) -> Vec<PeerEvent> {
        std::mem::take(&mut self.events)
    }

    /// One peer's channel, if there is one.
    pub fn peer(&self, peer: EndpointAddr) -> Option<PeerInfo> {
        self.channels.get(&peer).map(|c| self.info(c))
    }

    fn info(&self, c: &Channel) -> PeerInfo {
        PeerInfo {
            peer: c.peer,
            srtt_ns: c.srtt,
            rto_ns: c.effective_rto(&self.cfg),
            in_flight: c.in_flight(),
            queued: c.sendq.len() as u64 - c.in_flight(),
            my_session: c.my_session,
            peer_session: c.peer_session,
        }
    }

    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self.channels.values().map(|c| self.info(c)).collect();
        v.sort_by_key(|p| p.peer);
        v
    }
}

#[cfg(test)]
#[path = "reliable_tests.rs"]
mod tests;
