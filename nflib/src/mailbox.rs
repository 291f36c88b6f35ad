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
use crate::msg::Message;
use crate::region::Region;
use crate::reliable::{Outgoing, PeerEvent, SendError, Transport, TransportConfig};
use crate::stats::ProcCounter;
use crate::wire::{write_frame, EndpointAddr, Frame, ETHERTYPE_CONTROL};
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
        if msg.encode(&mut self.encode_buf).is_err() {
            return Err(SendError::TooLarge);
        }
        self.transport.send(
            to,
            Outgoing {
                src_actor,
                dst_actor,
                msg_type: msg.type_id(),
                payload: &self.encode_buf,
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
            let plausible = crate::wire::ethertype(bytes) == Some(ETHERTYPE_CONTROL)
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
