//! Packet buffers and the descriptors that carry them through rings.
//!
//! A buffer is a fixed-size block of the region addressed by index. Its first cache line is
//! [`BufMeta`], which records the slot that currently owns the buffer; then comes the
//! headroom, then the packet. Descriptors name a buffer and the packet's offset and length
//! inside it; they are all that moves between processes (the bytes never do).
//!
//! Within a process a buffer is held as a [`Packet`], which is neither `Copy` nor `Clone`:
//! the type system keeps one owner per buffer inside the process, and the ownership word in
//! `BufMeta` extends that across processes so that nfmgr can reclaim what a dead process held.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Owner value of a buffer that sits in nfmgr's free stack.
pub const OWNER_FREE: u32 = u32::MAX;

/// First cache line of every buffer.
#[repr(C, align(64))]
pub struct BufMeta {
    /// Slot index of the process holding the buffer, or `OWNER_FREE`.
    pub(crate) owner: AtomicU32,
    /// The frame's destination MAC before the vswitch addressed it to a runtime (low 48
    /// bits), with bit 63 set while it is rewritten. Touched only by the buffer's owner.
    l2: AtomicU64,
    /// Where a packet that came from another server must go back to (see [`Route`]), with
    /// bit 63 set when there is one. Touched only by the buffer's owner.
    route: AtomicU64,
}

/// The server a packet entered the cluster at, for a packet a runtime processes on behalf of
/// a vswitch on another server: its output goes back there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub server: u16,
    /// The slot of the vswitch that dispatched it (messages about the flow go there).
    pub vswitch: u8,
    /// The port it leaves from on that server.
    pub egress: u8,
    /// The port it arrived on there.
    pub ingress: u8,
}

const ROUTE_SET: u64 = 1 << 63;

const L2_REWRITTEN: u64 = 1 << 63;

impl BufMeta {
    /// Records the original destination MAC before the frame is readdressed.
    pub fn save_dst_mac(&self, mac: [u8; 6]) {
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(&mac);
        self.l2
            .store(u64::from_le_bytes(v) | L2_REWRITTEN, Ordering::Relaxed);
    }

    /// Takes back the original destination MAC, if the frame was readdressed.
    #[inline]
    pub fn take_dst_mac(&self) -> Option<[u8; 6]> {
        // A load and a store, not a swap: only the buffer's owner touches this word, and an
        // atomic exchange is a locked, fencing instruction on x86, paid for every packet
        // a runtime receives.
        let v = self.l2.load(Ordering::Relaxed);
        if v & L2_REWRITTEN == 0 {
            return None;
        }
        self.l2.store(0, Ordering::Relaxed);
        let b = v.to_le_bytes();
        Some([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Records where the packet came from (nfmgr, when it unwraps a packet from another
    /// server).
    pub fn set_route(&self, r: Route) {
        let v = ROUTE_SET
            | (r.server as u64) << 24
            | (r.vswitch as u64) << 16
            | (r.egress as u64) << 8
            | r.ingress as u64;
        self.route.store(v, Ordering::Relaxed);
    }

    /// Where the packet came from, if another server.
    pub fn route(&self) -> Option<Route> {
        let v = self.route.load(Ordering::Relaxed);
        (v & ROUTE_SET != 0).then_some(Route {
            server: (v >> 24) as u16,
            vswitch: (v >> 16) as u8,
            egress: (v >> 8) as u8,
            ingress: v as u8,
        })
    }

    /// Forgets the saved MAC and route (done when the buffer is freed).
    pub fn clear_l2(&self) {
        self.l2.store(0, Ordering::Relaxed);
        self.route.store(0, Ordering::Relaxed);
    }
}

/// A ring entry: which buffer, where the packet is inside it, and per-packet metadata.
/// 16 bytes, four to a cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Buffer index in the pool.
    pub buf: u32,
    /// Offset of the first packet byte from the start of the buffer.
    pub off: u16,
    /// Packet length in bytes.
    pub len: u16,
    /// Free for the stage that fills it (flow hash, message type).
    pub meta: u32,
    /// Port the packet leaves from when it reaches nfmgr.
    pub egress: u8,
    /// Port the packet arrived on (where a reply is sent back).
    pub ingress: u8,
    /// `DESC_*` flags.
    pub flags: u16,
}

const _: () = assert!(std::mem::size_of::<Desc>() == 16);

/// `Desc::flags`: a data packet for a runtime on another server (its destination MAC names
/// the runtime); nfmgr wraps it and sends it there.
pub const DESC_REMOTE: u16 = 1;

/// An owned packet buffer. Created only by allocation or by a validated dequeue; consumed by
/// enqueueing or freeing. Dropping one without freeing it leaks the buffer until its process
/// exits (nfmgr then reclaims it), so code paths hand every packet on explicitly.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    desc: Desc,
}

impl Packet {
    /// Wraps a descriptor whose bounds were checked against the region.
    pub(crate) fn from_valid_desc(desc: Desc) -> Packet {
        Packet { desc }
    }

    pub fn desc(&self) -> &Desc {
        &self.desc
    }

    /// Gives up the in-process handle, to enqueue the descriptor (the buffer's ownership
    /// now travels with it).
    pub fn into_desc(self) -> Desc {
        self.desc
    }

    pub fn buf_index(&self) -> u32 {
        self.desc.buf
    }

    pub fn len(&self) -> usize {
        self.desc.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.desc.len == 0
    }

    pub fn egress_port(&self) -> u8 {
        self.desc.egress
    }

    pub fn set_egress_port(&mut self, port: u8) {
        self.desc.egress = port;
    }

    pub fn ingress_port(&self) -> u8 {
        self.desc.ingress
    }

    pub fn set_ingress_port(&mut self, port: u8) {
        self.desc.ingress = port;
    }

    pub fn meta(&self) -> u32 {
        self.desc.meta
    }

    pub fn set_meta(&mut self, meta: u32) {
        self.desc.meta = meta;
    }

    pub fn flags(&self) -> u16 {
        self.desc.flags
    }

    pub fn set_flags(&mut self, flags: u16) {
        self.desc.flags = flags;
    }

    pub(crate) fn desc_mut(&mut self) -> &mut Desc {
        &mut self.desc
    }
}
