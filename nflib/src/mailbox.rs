//! An endpoint's mailbox: the reliable transport joined to packet buffers and rings.
//!
//! Sending encodes a [`Message`] with postcard and queues it on the transport; `flush`
//! writes the frames the transport emits into pool buffers and routes them: to a process of
//! this server, straight onto the message ring to its slot; to another server, onto the
//! ring to nfmgr (slot 0), which signs them and sends them out of the cluster port.
//! Receiving parses the frames found on the message rings, feeds them to the transport and
//! decodes the messages it completes into the inbox, in order.
//!
//! nf-runtime and nf-vswitch use it through their [`Endpoint`]; nfmgr's data-plane thread
//! uses the same type with its own rings (`handle_frame`, `build_frames`).

use crate::endpoint::Endpoint;
use crate::frame::{write_frame, EndpointAddr, Frame, ETHERTYPE_CONTROL};
use crate::msg::Message;
use crate::region::Region;
use crate::reliable::{Outgoing, PeerEvent, SendError, Transport, TransportConfig};
use crate::stats::ProcCounter;
use crate::{Packet, MANAGER_SLOT};

/// A message delivered to an actor here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub from: EndpointAddr,
    pub src_actor: u64,
    pub dst_actor: u64,
    pub msg: Message,
}

/// What went wrong with frames and messages, beyond the transport's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MailboxErrors {
    /// Frames that did not parse, or claimed a source their ring cannot carry.
    pub bad_frames: u64,
    /// Messages whose payload did not decode.
    pub undecodable: u64,
    /// Frames not sent for want of a buffer (the transport sends them again).
    pub no_buffer: u64,
}

pub struct Mailbox {
    transport: Transport,
    inbox: Vec<Envelope>,
    encode_buf: Vec<u8>,
    out: Vec<(EndpointAddr, Packet)>,
    events: Vec<PeerEvent>,
    errors: MailboxErrors,
    rx: Vec<(u16, Packet)>,
    staged: Vec<Vec<Packet>>,
}

impl Mailbox {
    pub fn new(me: EndpointAddr, session: u64, cfg: TransportConfig) -> Mailbox {
        Mailbox {
            transport: Transport::new(me, session, cfg),
            inbox: Vec::new(),
            encode_buf: Vec::new(),
            out: Vec::new(),
            events: Vec::new(),
            errors: MailboxErrors::default(),
            rx: Vec::new(),
            staged: Vec::new(),
        }
    }

    /// The mailbox of the process attached as `ep`, on server `server`.
    pub fn for_endpoint(ep: &Endpoint, server: u16, cfg: TransportConfig) -> Mailbox {
        Mailbox::new(EndpointAddr::new(server, ep.slot()), ep.new_session(), cfg)
    }

    pub fn me(&self) -> EndpointAddr {
        self.transport.me()
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn errors(&self) -> MailboxErrors {
        self.errors
    }

    /// Queues `msg` from actor `src_actor` here to actor `dst_actor` of `to`.
    pub fn send(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: &Message,
    ) -> Result<(), SendError> {
        let mut buf = std::mem::take(&mut self.encode_buf);
        let sent = match msg.encode(&mut buf) {
            Ok(()) => self.send_encoded(to, src_actor, dst_actor, msg.type_id(), &buf),
            Err(_) => Err(SendError::TooLarge),
        };
        self.encode_buf = buf;
        sent
    }

    /// Queues a message already encoded (`Paced` keeps messages so, to encode each once).
    pub fn send_encoded(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg_type: u16,
        payload: &[u8],
    ) -> Result<(), SendError> {
        self.transport.send(
            to,
            Outgoing {
                src_actor,
                dst_actor,
                msg_type,
                payload,
            },
        )
    }

    /// Frames that can still be queued to `to`.
    pub fn room(&self, to: EndpointAddr) -> usize {
        self.transport.room(to)
    }

    /// Frames a message of `len` encoded bytes takes.
    pub fn frames_for(&self, len: usize) -> usize {
        self.transport.frames_for(len)
    }

    /// Messages delivered since the last call, in order per sender.
    pub fn take_inbox(&mut self) -> Vec<Envelope> {
        std::mem::take(&mut self.inbox)
    }

    /// Peer restarts and deaths since the last call.
    pub fn take_events(&mut self) -> Vec<PeerEvent> {
        self.events.extend(self.transport.take_events());
        std::mem::take(&mut self.events)
    }

    /// Handles one received frame (Ethernet header included).
    /// Returns whether the frame was fresh (see `Transport::handle`).
    pub fn handle_frame(&mut self, bytes: &[u8], now_ns: u64) -> bool {
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(_) => {
                self.errors.bad_frames += 1;
                return false;
            }
        };
        let inbox = &mut self.inbox;
        let errors = &mut self.errors;
        self.transport
            .handle(&frame, now_ns, &mut |d| match Message::decode(d.payload) {
                Ok(msg) => inbox.push(Envelope {
                    from: d.from,
                    src_actor: d.src_actor,
                    dst_actor: d.dst_actor,
                    msg,
                }),
                Err(_) => errors.undecodable += 1,
            })
    }

    /// Writes the frames due now into buffers from `alloc`; they wait in `take_out`.
    pub fn build_frames(
        &mut self,
        now_ns: u64,
        region: &Region,
        alloc: &mut dyn FnMut() -> Option<Packet>,
        free: &mut dyn FnMut(Packet),
    ) {
        let out = &mut self.out;
        let errors = &mut self.errors;
        self.transport.poll_transmit(now_ns, &mut |h, payload| {
            let Some(mut p) = alloc() else {
                errors.no_buffer += 1;
                return false;
            };
            let n = write_frame(region.room_mut(&mut p), h, payload);
            match n {
                Ok(n) if region.set_len(&mut p, n) => {
                    out.push((h.dst, p));
                    true
                }
                // A frame larger than a buffer: the transport's payload size does not fit
                // the region (configuration validation prevents it).
                _ => {
                    errors.no_buffer += 1;
                    free(p);
                    false
                }
            }
        });
    }

    /// Frames built by `build_frames`, with their destination.
    pub fn take_out(&mut self) -> std::vec::Drain<'_, (EndpointAddr, Packet)> {
        self.out.drain(..)
    }

    /// When the transport next needs to run (monotonic ns), if ever.
    pub fn next_timeout(&self) -> Option<u64> {
        self.transport.next_timeout()
    }

    /// Reads the endpoint's message rings into the inbox. Returns frames read.
    pub fn receive(&mut self, ep: &mut Endpoint, now_ns: u64) -> usize {
        let mut rx = std::mem::take(&mut self.rx);
        let n = ep.recv_messages(&mut rx, crate::endpoint::BURST * 4);
        let me = self.me();
        for (from_slot, pkt) in rx.drain(..) {
            let bytes = ep.data(&pkt);
            // A process's own ring names its sender: frames from another server arrive
            // through nfmgr, anything else must come from the slot it claims.
            let src = (bytes.len() >= 12)
                .then(|| EndpointAddr::from_control_mac(&bytes[6..12]))
                .flatten();
            let plausible = crate::frame::ethertype(bytes) == Some(ETHERTYPE_CONTROL)
                && match src {
                    Some(s) if from_slot == MANAGER_SLOT => {
                        s.server != me.server || s.slot == MANAGER_SLOT
                    }
                    Some(s) => s.server == me.server && s.slot == from_slot,
                    None => false,
                };
            if plausible {
                self.handle_frame(bytes, now_ns);
            } else {
                self.errors.bad_frames += 1;
            }
            ep.free(pkt);
        }
        self.rx = rx;
        n
    }

    /// Sends what the transport has due: frames to processes of this server go onto their
    /// message rings, frames to other servers onto the ring to nfmgr. Sets the endpoint's
    /// next wake-up to the transport's next timer.
    pub fn flush(&mut self, ep: &mut Endpoint, now_ns: u64) {
        let region = ep.region().clone();
        let mut spare = Vec::new();
        self.build_frames(now_ns, &region, &mut || ep.alloc(), &mut |p| spare.push(p));
        for p in spare {
            ep.free(p);
        }
        let me = self.me();
        if self.staged.len() < region.slot_count() as usize {
            self.staged
                .resize_with(region.slot_count() as usize, Vec::new);
        }
        let mut sent = 0u64;
        for (to, p) in self.out.drain(..) {
            let via = if to.server == me.server {
                to.slot
            } else {
                MANAGER_SLOT
            };
            match self.staged.get_mut(via as usize) {
                Some(q) => q.push(p),
                None => ep.free(p),
            }
        }
        for (slot, q) in self.staged.iter_mut().enumerate() {
            if !q.is_empty() {
                sent += ep.send_messages(slot as u16, q) as u64;
            }
        }
        let _ = sent;
        self.events.extend(self.transport.take_events());
        ep.wake_by(self.transport.next_timeout());
        let st = self.transport.stats();
        let c = ep.counters();
        c.set(ProcCounter::ActorMsgsSent as usize, st.msgs_sent);
        c.set(ProcCounter::ActorMsgsDelivered as usize, st.msgs_delivered);
        c.set(ProcCounter::ActorMsgsLost as usize, st.msgs_lost);
        c.set(ProcCounter::ActorRetransmits as usize, st.retransmits);
        c.set(ProcCounter::ActorTimeouts as usize, st.timeouts);
        c.set(
            ProcCounter::ActorBadFrames as usize,
            self.errors.bad_frames + self.errors.undecodable + st.malformed,
        );
    }
}

/// One message waiting in [`Paced`]: its peer, actors, type and encoded payload.
struct Waiting {
    to: EndpointAddr,
    src_actor: u64,
    dst_actor: u64,
    msg_type: u16,
    payload: Vec<u8>,
}

/// Where actor messages are queued for sending: the mailbox, or a test's memory. What
/// [`Paced`] and the runtime's engine send through.
pub trait Outbox {
    fn send(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: &Message,
    ) -> Result<(), SendError>;
    fn send_encoded(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg_type: u16,
        payload: &[u8],
    ) -> Result<(), SendError>;
    /// Frames that can still be queued to `to`.
    fn room(&self, to: EndpointAddr) -> usize;
    /// Frames a message of `len` encoded bytes takes.
    fn frames_for(&self, len: usize) -> usize;
    /// The most frames one peer's queue holds.
    fn max_queue_frames(&self) -> usize;
}

impl Outbox for Mailbox {
    fn send(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: &Message,
    ) -> Result<(), SendError> {
        Mailbox::send(self, to, src_actor, dst_actor, msg)
    }

    fn send_encoded(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg_type: u16,
        payload: &[u8],
    ) -> Result<(), SendError> {
        Mailbox::send_encoded(self, to, src_actor, dst_actor, msg_type, payload)
    }

    fn room(&self, to: EndpointAddr) -> usize {
        Mailbox::room(self, to)
    }

    fn frames_for(&self, len: usize) -> usize {
        Mailbox::frames_for(self, len)
    }

    fn max_queue_frames(&self) -> usize {
        self.transport.config().max_queue_frames
    }
}

/// Messages sent in bulk, whose sum may be more than the transport queues to one peer (a
/// takeover's re-pointing of a million keys, a restarted vswitch's feeds, the holds for a
/// restarted home): they wait here, encoded once, in order per peer, and go as the queue
/// drains. Handed straight to the transport, all but the first tens of megabytes were
/// refused and lost. Bounded by what made them (a table's worth of keys or states).
#[derive(Default)]
pub struct Paced {
    queue: std::collections::VecDeque<Waiting>,
}

impl Paced {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Adds `msg` for actor `dst_actor` of `to`, from `src_actor` here, behind what waits.
    /// `Err` (nothing kept) if it cannot be encoded within the transport's largest message.
    pub fn push(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: &Message,
    ) -> Result<(), SendError> {
        let mut payload = Vec::new();
        if msg.encode(&mut payload).is_err() || payload.len() > crate::frame::MAX_MESSAGE {
            return Err(SendError::TooLarge);
        }
        self.queue.push_back(Waiting {
            to,
            src_actor,
            dst_actor,
            msg_type: msg.type_id(),
            payload,
        });
        Ok(())
    }

    /// Hands the waiting messages to `mb`, in order; a peer whose queue has no room for its
    /// next one keeps it and those after it for a later call (the others go on). Returns
    /// how many the transport refused outright (lost: too many peers, or to itself).
    pub fn send(&mut self, mb: &mut (impl Outbox + ?Sized)) -> u64 {
        let mut blocked: Vec<EndpointAddr> = Vec::new();
        let mut refused = 0;
        self.queue.retain(|w| {
            if blocked.contains(&w.to) {
                return true;
            }
            let frames = mb.frames_for(w.payload.len());
            if frames > mb.max_queue_frames() {
                // No queue this short ever takes it.
                refused += 1;
                return false;
            }
            // Checked first, so a message that waits is not copied into frames each time.
            if mb.room(w.to) < frames {
                blocked.push(w.to);
                return true;
            }
            match mb.send_encoded(w.to, w.src_actor, w.dst_actor, w.msg_type, &w.payload) {
                Ok(()) => false,
                Err(SendError::QueueFull) => {
                    blocked.push(w.to);
                    true
                }
                Err(_) => {
                    refused += 1;
                    false
                }
            }
        });
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowKey;
    use crate::frame::write_frame;

    const A: EndpointAddr = EndpointAddr::new(1, 2);
    const B: EndpointAddr = EndpointAddr::new(1, 3);
    const C: EndpointAddr = EndpointAddr::new(1, 4);

    fn feeds(request: u64, keys: usize) -> Message {
        let key = |i: usize| {
            FlowKey::from_tuple(
                4,
                17,
                0,
                (FlowKey::v4([10, 0, (i >> 8) as u8, i as u8]), 1000),
                (FlowKey::v4([10, 9, 9, 9]), 53),
            )
            .0
        };
        Message::Feeds {
            request,
            keys: (0..keys).map(key).collect(),
            aliases: Vec::new(),
            done: false,
        }
    }

    /// Moves every frame A's mailbox emits to B and B's acks back, until quiet.
    fn pump(a: &mut Mailbox, b: &mut Transport, now: u64, got: &mut Vec<Message>) {
        for _ in 0..1000 {
            let mut to_b = Vec::new();
            a.transport.poll_transmit(now, &mut |h, p| {
                let mut buf = vec![0u8; 14 + 76 + p.len()];
                let n = write_frame(&mut buf, h, p).unwrap();
                buf.truncate(n);
                to_b.push(buf);
                true
            });
            let mut to_a = Vec::new();
            for f in &to_b {
                let frame = Frame::parse(f).unwrap();
                b.handle(&frame, now, &mut |d| {
                    got.push(Message::decode(d.payload).unwrap());
                });
            }
            b.poll_transmit(now, &mut |h, p| {
                let mut buf = vec![0u8; 14 + 76 + p.len()];
                let n = write_frame(&mut buf, h, p).unwrap();
                buf.truncate(n);
                to_a.push(buf);
                true
            });
            for f in &to_a {
                let frame = Frame::parse(f).unwrap();
                a.transport.handle(&frame, now, &mut |_| {});
            }
            if to_b.is_empty() && to_a.is_empty() {
                return;
            }
        }
        panic!("the exchange never went quiet");
    }

    /// Ten messages of tens of frames to a peer whose queue takes 100 frames: straight to
    /// the transport, all but the first few are refused; paced, every one arrives, in
    /// order, and a peer with room is not held up by one without.
    #[test]
    fn paced_messages_wait_for_room_and_arrive_in_order() {
        let cfg = TransportConfig {
            max_queue_frames: 100,
            ..TransportConfig::default()
        };
        let mut a = Mailbox::new(A, 10, cfg);
        let mut len = Vec::new();
        feeds(0, 3000).encode(&mut len).unwrap();
        let fit = 100 / a.frames_for(len.len());
        assert!((1..5).contains(&fit), "{fit} messages fit");
        let mut refused = 0;
        for i in 0..10 {
            if a.send(B, 1, 1, &feeds(i, 3000)).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 10 - fit);
        let mut a = Mailbox::new(A, 11, cfg);
        let mut b_got = Vec::new();
        let mut paced = Paced::default();
        for i in 0..10 {
            paced.push(B, 1, 1, &feeds(i, 3000)).unwrap();
        }
        paced.push(C, 1, 1, &feeds(99, 10)).unwrap();
        let mut now = 1_000_000_000;
        assert_eq!(paced.send(&mut a), 0);
        assert_eq!(paced.len(), 10 - fit, "C's went past the waiting ones");
        assert_eq!(a.room(C), 99);
        let mut b = Transport::new(B, 21, cfg);
        for _ in 0..50 {
            now += 1_000_000;
            pump(&mut a, &mut b, now, &mut b_got);
            assert_eq!(paced.send(&mut a), 0);
            if paced.is_empty() && a.room(B) == 100 {
                break;
            }
        }
        pump(&mut a, &mut b, now + 1_000_000, &mut b_got);
        assert!(paced.is_empty());
        let requests: Vec<u64> = b_got
            .iter()
            .map(|m| match m {
                Message::Feeds { request, keys, .. } => {
                    assert_eq!(keys.len(), 3000);
                    *request
                }
                other => panic!("not feeds: {other:?}"),
            })
            .collect();
        assert_eq!(requests, (0..10).collect::<Vec<u64>>());
    }
}
