//! What the flow engine needs of the world, as traits: packet buffers ([`Buffers`]), and
//! the pool, the rings, counters, wake-ups and actor messages ([`Io`]).
//!
//! The engine ([`crate::engine::Runtime`]) owns no shared memory and no mailbox: the
//! process gives it [`ShmIo`] (its endpoint on the region and its mailbox), and the
//! engine's unit tests give it packets in plain memory. As with the vswitch's dispatcher,
//! the model is smoltcp's `Device` (the engine calls out, generic, monomorphised) rather
//! than returned transmits: a burst's packets run the chain in buffers the engine borrows
//! from the pool, and migration and recovery send messages in the middle of a step.
//!
//! `Buffers` is apart from `Io` so that a packet's bytes can be borrowed (from the region,
//! through a cheap handle) while the engine goes on using `Io` mutably, as the chain does.

use nflib::buffer::Route;
use nflib::endpoint::Endpoint;
use nflib::frame::EndpointAddr;
use nflib::mailbox::{Mailbox, Outbox};
use nflib::msg::Message;
use nflib::reliable::SendError;
use nflib::stats::ProcCounter;
use nflib::{Packet, Region};

/// Access to packet buffers' bytes and metadata.
pub trait Buffers: Clone {
    type Pkt;

    fn data<'a>(&'a self, p: &'a Self::Pkt) -> &'a [u8];
    fn data_mut<'a>(&'a self, p: &'a mut Self::Pkt) -> &'a mut [u8];
    /// The frame and the room after it: functions may grow a frame up to its end.
    fn room_mut<'a>(&'a self, p: &'a mut Self::Pkt) -> &'a mut [u8];
    fn set_len(&self, p: &mut Self::Pkt, len: usize) -> bool;
    /// The frame's length.
    fn len(&self, p: &Self::Pkt) -> usize;
    /// Copies `frame` in as the packet's whole frame; false if it does not fit.
    fn fill(&self, p: &mut Self::Pkt, frame: &[u8]) -> bool;
    /// What arrived with the packet: the route nfmgr noted (a packet from another server's
    /// vswitch), and the destination MAC the vswitch saved when it addressed the frame
    /// here (taken: the runtime puts it back).
    fn arrival(&self, p: &Self::Pkt) -> (Option<Route>, Option<[u8; 6]>);
    fn route(&self, p: &Self::Pkt) -> Option<Route>;
    fn set_route(&self, p: &Self::Pkt, r: Route);
    fn ingress_port(&self, p: &Self::Pkt) -> u8;
    fn egress_port(&self, p: &Self::Pkt) -> u8;
    fn set_ingress_port(&self, p: &mut Self::Pkt, port: u8);
    fn set_egress_port(&self, p: &mut Self::Pkt, port: u8);
}

/// The rest of the engine's world. Messages go through the [`Outbox`] it extends.
pub trait Io: Outbox {
    type Pkt;
    type Bufs: Buffers<Pkt = Self::Pkt>;

    /// The monotonic clock (ns): the only clock the engine reads.
    fn now_ns(&self) -> u64;

    fn buffers(&self) -> Self::Bufs;
    fn alloc(&mut self) -> Option<Self::Pkt>;
    fn free(&mut self, p: Self::Pkt);
    /// Puts packets on the ring to local slot `to`; what does not fit is freed and counted.
    fn send_burst(&mut self, to: u16, pkts: &mut Vec<Self::Pkt>);

    fn count(&mut self, c: ProcCounter, n: u64);
    fn set_count(&mut self, c: ProcCounter, v: u64);
    /// Function `nf`'s counters, for the statistics others read.
    fn publish_nf(&mut self, nf: usize, counters: &[u64]);

    /// Asks local slot `slot` to poll rather than sleep until `until_ns`.
    fn keep_awake(&mut self, slot: u16, until_ns: u64);
    /// Rings the doorbells of the slots given work.
    fn flush_wakes(&mut self);
    /// Hands the messages the transport has due to the rings.
    fn transmit(&mut self, now_ns: u64);
}

impl Buffers for Region {
    type Pkt = Packet;

    #[inline]
    fn data<'a>(&'a self, p: &'a Packet) -> &'a [u8] {
        Region::data(self, p)
    }

    #[inline]
    fn data_mut<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        Region::data_mut(self, p)
    }

    #[inline]
    fn room_mut<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        Region::room_mut(self, p)
    }

    #[inline]
    fn set_len(&self, p: &mut Packet, len: usize) -> bool {
        Region::set_len(self, p, len)
    }

    #[inline]
    fn len(&self, p: &Packet) -> usize {
        p.len()
    }

    fn fill(&self, p: &mut Packet, frame: &[u8]) -> bool {
        Region::fill(self, p, frame)
    }

    #[inline]
    fn arrival(&self, p: &Packet) -> (Option<Route>, Option<[u8; 6]>) {
        let meta = self.meta_of(p);
        (meta.route(), meta.take_dst_mac())
    }

    fn route(&self, p: &Packet) -> Option<Route> {
        self.meta_of(p).route()
    }

    fn set_route(&self, p: &Packet, r: Route) {
        self.meta_of(p).set_route(r);
    }

    #[inline]
    fn ingress_port(&self, p: &Packet) -> u8 {
        p.ingress_port()
    }

    #[inline]
    fn egress_port(&self, p: &Packet) -> u8 {
        p.egress_port()
    }

    #[inline]
    fn set_ingress_port(&self, p: &mut Packet, port: u8) {
        p.set_ingress_port(port);
    }

    #[inline]
    fn set_egress_port(&self, p: &mut Packet, port: u8) {
        p.set_egress_port(port);
    }
}

/// The process's [`Io`]: its endpoint on the shared region and its mailbox.
pub struct ShmIo<'a> {
    pub ep: &'a mut Endpoint,
    pub mb: &'a mut Mailbox,
}

impl Outbox for ShmIo<'_> {
    fn send(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: &Message,
    ) -> Result<(), SendError> {
        self.mb.send(to, src_actor, dst_actor, msg)
    }

    fn send_encoded(
        &mut self,
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg_type: u16,
        payload: &[u8],
    ) -> Result<(), SendError> {
        self.mb
            .send_encoded(to, src_actor, dst_actor, msg_type, payload)
    }

    fn room(&self, to: EndpointAddr) -> usize {
        self.mb.room(to)
    }

    fn frames_for(&self, len: usize) -> usize {
        self.mb.frames_for(len)
    }

    fn max_queue_frames(&self) -> usize {
        Outbox::max_queue_frames(&*self.mb)
    }
}

impl Io for ShmIo<'_> {
    type Pkt = Packet;
    type Bufs = Region;

    #[inline]
    fn now_ns(&self) -> u64 {
        nflib::time::mono_ns()
    }

    #[inline]
    fn buffers(&self) -> Region {
        self.ep.region().clone()
    }

    fn alloc(&mut self) -> Option<Packet> {
        self.ep.alloc()
    }

    #[inline]
    fn free(&mut self, p: Packet) {
        self.ep.free(p);
    }

    fn send_burst(&mut self, to: u16, pkts: &mut Vec<Packet>) {
        self.ep.send_burst(to, pkts);
    }

    #[inline]
    fn count(&mut self, c: ProcCounter, n: u64) {
        self.ep.counters().add(c as usize, n);
    }

    fn set_count(&mut self, c: ProcCounter, v: u64) {
        self.ep.counters().set(c as usize, v);
    }

    fn publish_nf(&mut self, nf: usize, counters: &[u64]) {
        if let Some(rec) = self.ep.region().nf_stats(self.ep.slot(), nf) {
            for (shared, v) in rec.counters.0.iter().zip(counters) {
                shared.store(*v, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn keep_awake(&mut self, slot: u16, until_ns: u64) {
        self.ep.keep_awake(slot, until_ns);
    }

    fn flush_wakes(&mut self) {
        self.ep.flush_wakes();
    }

    fn transmit(&mut self, now_ns: u64) {
        self.mb.flush(self.ep, now_ns);
    }
}

/// The engine's world in plain memory, for its unit tests: packets own their bytes, rings
/// are vectors, messages are kept decoded, the pool is a count.
#[cfg(test)]
pub(crate) mod mem {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use super::*;

    /// Room of a packet buffer (as the region's buffers, less headroom).
    const ROOM: usize = 2048;

    #[derive(Clone, Debug)]
    pub struct MemPacket {
        bytes: Vec<u8>,
        len: usize,
        route: Cell<Option<Route>>,
        saved_dst: Cell<Option<[u8; 6]>>,
        pub ingress: u8,
        pub egress: u8,
    }

    impl MemPacket {
        /// `frame` as a vswitch hands it over: addressed to `mac`, its own destination
        /// kept aside.
        pub fn addressed(frame: &[u8], mac: [u8; 6]) -> MemPacket {
            let mut bytes = vec![0; ROOM];
            bytes[..frame.len()].copy_from_slice(frame);
            let mut dst = [0; 6];
            dst.copy_from_slice(&frame[..6]);
            bytes[..6].copy_from_slice(&mac);
            MemPacket {
                bytes,
                len: frame.len(),
                route: Cell::new(None),
                saved_dst: Cell::new(Some(dst)),
                ingress: 0,
                egress: 0,
            }
        }

        pub fn frame(&self) -> &[u8] {
            &self.bytes[..self.len]
        }
    }

    #[derive(Clone, Copy, Debug, Default)]
    pub struct MemBufs;

    impl Buffers for MemBufs {
        type Pkt = MemPacket;

        fn data<'a>(&'a self, p: &'a MemPacket) -> &'a [u8] {
            &p.bytes[..p.len]
        }

        fn data_mut<'a>(&'a self, p: &'a mut MemPacket) -> &'a mut [u8] {
            &mut p.bytes[..p.len]
        }

        fn room_mut<'a>(&'a self, p: &'a mut MemPacket) -> &'a mut [u8] {
            &mut p.bytes[..]
        }

        fn set_len(&self, p: &mut MemPacket, len: usize) -> bool {
            if len > p.bytes.len() {
                return false;
            }
            p.len = len;
            true
        }

        fn len(&self, p: &MemPacket) -> usize {
            p.len
        }

        fn fill(&self, p: &mut MemPacket, frame: &[u8]) -> bool {
            if frame.len() > p.bytes.len() {
                return false;
            }
            p.bytes[..frame.len()].copy_from_slice(frame);
            p.len = frame.len();
            true
        }

        fn arrival(&self, p: &MemPacket) -> (Option<Route>, Option<[u8; 6]>) {
            (p.route.get(), p.saved_dst.take())
        }

        fn route(&self, p: &MemPacket) -> Option<Route> {
            p.route.get()
        }

        fn set_route(&self, p: &MemPacket, r: Route) {
            p.route.set(Some(r));
        }

        fn ingress_port(&self, p: &MemPacket) -> u8 {
            p.ingress
        }

        fn egress_port(&self, p: &MemPacket) -> u8 {
            p.egress
        }

        fn set_ingress_port(&self, p: &mut MemPacket, port: u8) {
            p.ingress = port;
        }

        fn set_egress_port(&self, p: &mut MemPacket, port: u8) {
            p.egress = port;
        }
    }

    pub struct MemIo {
        /// Buffers the pool still has.
        pub pool: usize,
        pub freed: usize,
        /// Packets put on the ring to each local slot.
        pub rings: BTreeMap<u16, Vec<MemPacket>>,
        pub counters: Vec<u64>,
        /// Messages sent, decoded, in order.
        pub sent: Vec<(EndpointAddr, Message)>,
        /// Frames each peer's queue takes.
        pub room: usize,
        pub awake: Vec<u16>,
        /// The clock the engine reads (ns); the test moves it.
        pub now_ns: u64,
    }

    impl Default for MemIo {
        fn default() -> MemIo {
            MemIo {
                pool: 1024,
                freed: 0,
                rings: BTreeMap::new(),
                counters: vec![0; nflib::stats::PROC_COUNTERS],
                sent: Vec::new(),
                room: 4096,
                awake: Vec::new(),
                now_ns: nflib::time::mono_ns(),
            }
        }
    }

    impl MemIo {
        pub fn count_of(&self, c: ProcCounter) -> u64 {
            self.counters[c as usize]
        }

        /// Takes the messages sent so far.
        pub fn take_sent(&mut self) -> Vec<(EndpointAddr, Message)> {
            std::mem::take(&mut self.sent)
        }

        /// Takes the packets put on the ring to `slot`.
        pub fn take_ring(&mut self, slot: u16) -> Vec<MemPacket> {
            self.rings.remove(&slot).unwrap_or_default()
        }
    }

    impl Outbox for MemIo {
        fn send(
            &mut self,
            to: EndpointAddr,
            _src_actor: u64,
            _dst_actor: u64,
            msg: &Message,
        ) -> Result<(), SendError> {
            self.sent.push((to, msg.clone()));
            Ok(())
        }

        fn send_encoded(
            &mut self,
            to: EndpointAddr,
            _src_actor: u64,
            _dst_actor: u64,
            _msg_type: u16,
            payload: &[u8],
        ) -> Result<(), SendError> {
            let m = Message::decode(payload).expect("a message the engine encoded");
            self.sent.push((to, m));
            Ok(())
        }

        fn room(&self, _to: EndpointAddr) -> usize {
            self.room
        }

        fn frames_for(&self, len: usize) -> usize {
            len / 1400 + 1
        }

        fn max_queue_frames(&self) -> usize {
            4096
        }
    }

    impl Io for MemIo {
        type Pkt = MemPacket;
        type Bufs = MemBufs;

        fn now_ns(&self) -> u64 {
            self.now_ns
        }

        fn buffers(&self) -> MemBufs {
            MemBufs
        }

        fn alloc(&mut self) -> Option<MemPacket> {
            self.pool = self.pool.checked_sub(1)?;
            Some(MemPacket {
                bytes: vec![0; ROOM],
                len: 0,
                route: Cell::new(None),
                saved_dst: Cell::new(None),
                ingress: 0,
                egress: 0,
            })
        }

        fn free(&mut self, _: MemPacket) {
            self.freed += 1;
            self.pool += 1;
        }

        fn send_burst(&mut self, to: u16, pkts: &mut Vec<MemPacket>) {
            self.rings.entry(to).or_default().append(pkts);
        }

        fn count(&mut self, c: ProcCounter, n: u64) {
            self.counters[c as usize] += n;
        }

        fn set_count(&mut self, c: ProcCounter, v: u64) {
            self.counters[c as usize] = v;
        }

        fn publish_nf(&mut self, _nf: usize, _counters: &[u64]) {}

        fn keep_awake(&mut self, slot: u16, _until_ns: u64) {
            self.awake.push(slot);
        }

        fn flush_wakes(&mut self) {}

        fn transmit(&mut self, _now_ns: u64) {}
    }
}
