//! What the dispatcher needs of the world, as a trait: packet bytes, the rings to the
//! runtimes, counters, actor messages and the runtimes' slots.
//!
//! The dispatcher ([`crate::dispatch::Dispatch`]) reads no clock and touches no shared
//! memory: every call takes the time, and everything else goes through an [`Io`]. The
//! process implements it over its shared-memory endpoint and mailbox ([`ShmIo`]); the
//! dispatcher's unit tests over plain memory. The model is smoltcp's `Device` rather than
//! quinn-proto's returned transmits, for one reason: before it dispatches a packet of an
//! unknown key as a new flow, the dispatcher reads its messages once more (a runtime may
//! have registered the key as an alias just before the packet that needed it), which is
//! I/O in the middle of a burst. The trait is generic, not `dyn`: the packet path is
//! monomorphised and costs what the direct calls cost.

use nflib::buffer::DESC_REMOTE;
use nflib::cluster::TransportCounters;
use nflib::endpoint::Endpoint;
use nflib::frame::EndpointAddr;
use nflib::mailbox::{Envelope, Mailbox};
use nflib::msg::Message;
use nflib::slot::SlotState;
use nflib::stats::ProcCounter;
use nflib::Packet;

/// A runtime's slot as the dispatcher sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// Bumped by nfmgr every time a process starts in the slot.
    pub generation: u32,
    /// Running or starting.
    pub up: bool,
}

pub trait Io {
    /// A packet buffer, owned by the dispatcher between receiving and sending or freeing.
    type Pkt;

    fn data<'a>(&'a self, p: &'a Self::Pkt) -> &'a [u8];
    /// Addresses the frame to `mac` (a runtime's input MAC), keeping its own destination
    /// for the runtime to restore; `remote`: nfmgr carries it to another server.
    fn address(&mut self, p: &mut Self::Pkt, mac: [u8; 6], remote: bool);
    fn free(&mut self, p: Self::Pkt);
    /// Puts a burst on the ring to local slot `via` (nfmgr's, slot 0, for other servers);
    /// what does not fit is freed and counted by the implementation.
    fn send_burst(&mut self, via: u16, pkts: &mut Vec<Self::Pkt>);

    fn count(&mut self, c: ProcCounter, n: u64);
    fn set_count(&mut self, c: ProcCounter, v: u64);
    fn counter(&mut self, c: ProcCounter) -> u64;

    /// Queues an actor message; `false` if the transport refused it.
    fn send(&mut self, to: EndpointAddr, to_actor: u64, m: &Message) -> bool;
    /// Messages delivered since the last call (reads the message rings first).
    fn receive(&mut self, now_ns: u64) -> Vec<Envelope>;
    fn transport(&self) -> TransportCounters;

    /// Local slot `slot`'s state, if the slot exists.
    fn slot(&self, slot: u16) -> Option<SlotView>;
}

/// The process's [`Io`]: its endpoint on the shared region and its mailbox.
pub struct ShmIo<'a> {
    pub ep: &'a mut Endpoint,
    pub mb: &'a mut Mailbox,
}

impl Io for ShmIo<'_> {
    type Pkt = Packet;

    fn data<'a>(&'a self, p: &'a Packet) -> &'a [u8] {
        self.ep.data(p)
    }

    fn address(&mut self, p: &mut Packet, mac: [u8; 6], remote: bool) {
        let region = self.ep.region();
        let data = region.data_mut(p);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&data[..6]);
        data[..6].copy_from_slice(&mac);
        region.meta_of(p).save_dst_mac(dst);
        if remote {
            p.set_flags(p.flags() | DESC_REMOTE);
        }
    }

    fn free(&mut self, p: Packet) {
        self.ep.free(p);
    }

    fn send_burst(&mut self, via: u16, pkts: &mut Vec<Packet>) {
        self.ep.send_burst(via, pkts);
    }

    fn count(&mut self, c: ProcCounter, n: u64) {
        self.ep.counters().add(c as usize, n);
    }

    fn set_count(&mut self, c: ProcCounter, v: u64) {
        self.ep.counters().set(c as usize, v);
    }

    fn counter(&mut self, c: ProcCounter) -> u64 {
        self.ep.counters().get(c as usize)
    }

    fn send(&mut self, to: EndpointAddr, to_actor: u64, m: &Message) -> bool {
        self.mb.send(to, nflib::frame::LIAISON, to_actor, m).is_ok()
    }

    fn receive(&mut self, now_ns: u64) -> Vec<Envelope> {
        self.mb.receive(self.ep, now_ns);
        self.mb.take_inbox()
    }

    fn transport(&self) -> TransportCounters {
        TransportCounters::from(self.mb.transport().stats())
    }

    fn slot(&self, slot: u16) -> Option<SlotView> {
        let r = self.ep.region().slot(slot)?;
        Some(SlotView {
            generation: r.generation.load(std::sync::atomic::Ordering::Relaxed),
            up: matches!(r.state(), SlotState::Running | SlotState::Starting),
        })
    }
}
