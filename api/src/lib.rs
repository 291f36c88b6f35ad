//! The network-function API (the NFActor paper's Table 1, in Rust terms).
//!
//! An NF is a value holding its shared configuration (rules, pools) plus a per-flow state
//! type. For every flow the platform:
//! - creates the state from the flow's first packet ([`NetworkFunction::new_flow`], the
//!   paper's `allocate_new_fs`),
//! - passes each packet with `&mut` state ([`NetworkFunction::process`], `process_pkt`),
//! - hands the state back when the flow ends ([`NetworkFunction::end_flow`],
//!   `deallocate_fs`).
//!
//! The state type serialises with postcard; that is all the platform needs to move a flow to
//! another runtime or copy it to a replica, and NF code never sees either. An NF author writes
//! one file against this module and adds one line to the registry (`nfs::registry`).
//!
//! The runtime keeps every NF's state of a flow side by side in the flow's record
//! ([`FlowRecords`], indexed by the flow's row; [`TypedStage`] knows where its NF's is): no
//! allocation per flow and per NF, and a packet's chain finds all its states on a line or
//! two.
//!
//! Crate nf-api (`api/`), above the configuration (a chain is built from it) and the
//! shared-memory core (the records); nflib re-exports it as `nflib::nf`.

#![forbid(unsafe_code)]

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use nf_config::{Config, ConfigError};
use nf_packet::flow::FlowKey;
use nf_packet::{self as packet, checksum, Fragment, Headers, ParseError, L3};
use nf_shm::records::{Field, FlowRecords};
use nf_shm::stats::NF_COUNTERS;

pub use nf_shm::limits::MAX_NFS;

/// What happens to a packet after a function saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the next function, then out of the egress port.
    Pass,
    /// Dropped (counted as this function's drop).
    Drop,
    /// Out of the port it arrived on, skipping the rest of the chain (a function that
    /// answered the packet itself, such as an ARP reply).
    SendBack,
}

/// Direction of a packet relative to the flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dir {
    /// Same direction as the flow's first packet (from its initiator).
    Original,
    /// The other way.
    Reply,
}

/// Where functions send records that are not packets (alerts, flow records). The runtime
/// writes them from another thread; emitting never blocks the packet path (when the queue is
/// full the record is counted as dropped).
pub trait EventSink {
    fn emit(&mut self, nf: &'static str, record: serde_json::Value);
    /// Whether records go anywhere: a function skips building one nobody keeps (a flow
    /// record is some thirty allocations and formattings, a third of a runtime's time when
    /// flows come and go by the hundred thousand a second).
    fn enabled(&self) -> bool {
        true
    }
}

/// A sink that discards everything (tests, benchmarks).
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&mut self, _nf: &'static str, _record: serde_json::Value) {}

    fn enabled(&self) -> bool {
        false
    }
}

/// Why a flow ends, as its functions' `end_flow` sees it ([`NfContext::end_reason`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndReason {
    /// Its work is done: idle, closed, or a new connection reopened its addresses.
    #[default]
    Done,
    /// A key it registered (`add_alias`) is another flow's: two translations collided, and
    /// this one, the newcomer, never carried a reply. What it took for the translation (a
    /// port) is best not remembered as the endpoint's.
    Refused,
    /// The runtime is stopping.
    Stopping,
}

/// What a function may see and do besides the packet and its state.
///
/// The runtime makes one per packet for the whole chain and points it at each function's
/// counters in turn ([`NfContext::set_stage`]): building seven fields per function per packet
/// was a measurable share of a packet's time.
pub struct NfContext<'a> {
    /// Milliseconds on the runtime's monotonic clock.
    pub now_ms: u64,
    pub dir: Dir,
    /// The flow's key (canonical, the same for both directions).
    pub key: &'a FlowKey,
    /// A number unique to this flow in this runtime, for records.
    pub flow_id: u64,
    /// Every function's counters, and the one whose turn it is.
    counters: &'a mut [[u64; NF_COUNTERS]],
    stage: usize,
    /// What the public fields were made with: each function sees them so, whatever the
    /// one before it did to them.
    made: (u64, Dir, &'a FlowKey, u64),
    aliases: &'a mut Vec<FlowKey>,
    events: &'a mut dyn EventSink,
    end_reason: EndReason,
}

impl<'a> NfContext<'a> {
    /// A context for the chain whose functions' counters are `counters`, starting with the
    /// first function.
    pub fn new(
        now_ms: u64,
        dir: Dir,
        key: &'a FlowKey,
        flow_id: u64,
        counters: &'a mut [[u64; NF_COUNTERS]],
        aliases: &'a mut Vec<FlowKey>,
        events: &'a mut dyn EventSink,
    ) -> Self {
        NfContext {
            now_ms,
            dir,
            key,
            flow_id,
            counters,
            stage: 0,
            made: (now_ms, dir, key, flow_id),
            aliases,
            events,
            end_reason: EndReason::Done,
        }
    }

    /// Tells `end_flow` why the flow ends (for the platform).
    #[doc(hidden)]
    pub fn set_end_reason(&mut self, reason: EndReason) {
        self.end_reason = reason;
    }

    /// Why the flow ends (in `end_flow`; `Done` elsewhere).
    pub fn end_reason(&self) -> EndReason {
        self.end_reason
    }

    /// Makes the context the `stage`-th function's (for the platform, which runs the
    /// chain: a function has no use for it).
    #[doc(hidden)]
    #[inline(always)]
    pub fn set_stage(&mut self, stage: usize) {
        self.stage = stage;
        (self.now_ms, self.dir, self.key, self.flow_id) = self.made;
    }

    /// Adds to the function's counter `index` (1-based: 0 is the platform's drop count; the
    /// names come from [`NetworkFunction::counters`]).
    #[inline]
    pub fn count(&mut self, index: usize, n: u64) {
        if let Some(c) = self
            .counters
            .get_mut(self.stage)
            .and_then(|c| c.get_mut(index))
        {
            *c += n;
        }
    }

    /// Registers another key under which packets of this flow arrive (a function that
    /// rewrites addresses: the translated reply key), so they reach this flow's actor. The
    /// platform tells the vswitch before the packet that caused it leaves.
    pub fn add_alias(&mut self, key: FlowKey) {
        self.aliases.push(key);
    }

    pub fn emit(&mut self, nf: &'static str, record: serde_json::Value) {
        self.events.emit(nf, record);
    }

    /// Whether records go anywhere: build one only if so.
    pub fn events_enabled(&self) -> bool {
        self.events.enabled()
    }
}

/// A network function.
pub trait NetworkFunction: Send + 'static {
    /// Per-flow state. Serialised when a flow moves or is replicated.
    type State: Serialize + DeserializeOwned + Send + 'static;

    /// The name it is registered under (`"firewall"`).
    fn kind(&self) -> &'static str;

    /// Names of the function's own counters (at most 15), indices 1.. of `NfContext::count`.
    fn counters(&self) -> &'static [&'static str] {
        &[]
    }

    /// State for a new flow, from its first packet (which `process` then sees as usual).
    fn new_flow(&mut self, pkt: &PacketMut<'_>, ctx: &mut NfContext<'_>) -> Self::State;

    /// Processes one packet of the flow.
    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        state: &mut Self::State,
        ctx: &mut NfContext<'_>,
    ) -> Verdict;

    /// The flow ended (idle, closed, or the runtime stops): last look at its state.
    fn end_flow(&mut self, state: Self::State, ctx: &mut NfContext<'_>) {
        let _ = (state, ctx);
    }

    /// A flow with this state lives (here, or in another runtime of the chain that took it
    /// over or was given it): whatever it holds of this instance's resources (a NAT port
    /// from this runtime's share) must stay reserved, and not be handed to a new flow.
    /// Called when a runtime installs a flow that moved or was recovered here, and when a
    /// restarted runtime learns of flows its earlier life started that live on elsewhere.
    /// A state whose resources are not this instance's is ignored; calling it twice is
    /// harmless.
    fn reserve(&mut self, state: &Self::State, ctx: &mut NfContext<'_>) {
        let _ = (state, ctx);
    }

    /// A flow with this state, which held this instance's resources, ended in another
    /// runtime: free them. A state whose resources are not held here is ignored.
    fn release(&mut self, state: &Self::State, ctx: &mut NfContext<'_>) {
        let _ = (state, ctx);
    }
}

/// A function in a chain behind one object-safe interface, with the states of its flows in
/// the chain's [`FlowRecords`] (one record per flow, every function's state side by side).
/// Implemented by [`TypedStage`] for every [`NetworkFunction`].
pub trait Stage: Send {
    fn kind(&self) -> &'static str;
    fn counter_names(&self) -> &'static [&'static str];
    /// Takes a field for the function's per-flow state in `records` (once, before the
    /// first flow). False if the records' layout is already fixed.
    fn attach(&mut self, records: &mut FlowRecords) -> bool;
    /// Runs the function on a packet of the flow in `row` (creating its state first when
    /// `new`, or when it has none).
    fn process(
        &mut self,
        records: &mut FlowRecords,
        row: u32,
        new: bool,
        pkt: &mut PacketMut<'_>,
        ctx: &mut NfContext<'_>,
    ) -> Verdict;
    /// Ends the flow in `row`, if it has state here.
    fn end_flow(&mut self, records: &mut FlowRecords, row: u32, ctx: &mut NfContext<'_>);
    /// Appends the flow's state, serialised, to `out`; false (with `out` as it was) when
    /// the function holds none for it. Migration writes every flow of a group into one
    /// buffer this way.
    fn save_into(&self, records: &FlowRecords, row: u32, out: &mut Vec<u8>) -> bool;
    /// Installs a serialised state for the flow in `row`.
    fn restore(
        &mut self,
        records: &mut FlowRecords,
        row: u32,
        bytes: &[u8],
    ) -> Result<(), postcard::Error>;
    /// Forgets the flow's state without ending it (the flow moved to another runtime, which
    /// ends it there; resources it holds, such as a NAT port, stay reserved here).
    fn discard(&mut self, records: &mut FlowRecords, row: u32);
    /// Keeps reserved what the flow in `row` holds of this instance's resources
    /// ([`NetworkFunction::reserve`]).
    fn reserve(&mut self, records: &FlowRecords, row: u32, ctx: &mut NfContext<'_>);
    /// Reserves (`reserve`) or frees what a flow with this serialised state, living in
    /// another runtime, holds of this instance's resources. A state that does not decode is
    /// an error and changes nothing.
    fn reserve_serialised(
        &mut self,
        bytes: &[u8],
        reserve: bool,
        ctx: &mut NfContext<'_>,
    ) -> Result<(), postcard::Error>;
}

/// Lets postcard append to a buffer it borrows (its `to_extend` takes the writer by
/// value), so a failed write can be cut off without losing what was there before.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// A [`NetworkFunction`] and where its flows' states are in the chain's records.
pub struct TypedStage<N: NetworkFunction> {
    nf: N,
    /// Set by `attach`; until then the function has no state to give a flow, and drops
    /// its packets.
    field: Option<Field<N::State>>,
}

impl<N: NetworkFunction> TypedStage<N> {
    pub fn new(nf: N) -> TypedStage<N> {
        TypedStage { nf, field: None }
    }

    pub fn boxed(nf: N) -> Box<dyn Stage> {
        Box::new(TypedStage::new(nf))
    }
}

impl<N: NetworkFunction> Stage for TypedStage<N> {
    fn kind(&self) -> &'static str {
        self.nf.kind()
    }

    fn counter_names(&self) -> &'static [&'static str] {
        self.nf.counters()
    }

    fn attach(&mut self, records: &mut FlowRecords) -> bool {
        self.field = records.add::<N::State>();
        self.field.is_some()
    }

    #[inline]
    fn process(
        &mut self,
        records: &mut FlowRecords,
        row: u32,
        new: bool,
        pkt: &mut PacketMut<'_>,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        // The flow's record exists: the flow table made it with the flow.
        let Some(cell) = self.field.and_then(|f| records.cell_mut(&f, row)) else {
            return Verdict::Drop;
        };
        let state = match cell {
            Some(st) if !new => st,
            _ => cell.insert(self.nf.new_flow(pkt, ctx)),
        };
        self.nf.process(pkt, state, ctx)
    }

    fn end_flow(&mut self, records: &mut FlowRecords, row: u32, ctx: &mut NfContext<'_>) {
        let taken = self
            .field
            .and_then(|f| records.cell_mut(&f, row))
            .and_then(Option::take);
        if let Some(st) = taken {
            self.nf.end_flow(st, ctx);
        }
    }

    fn save_into(&self, records: &FlowRecords, row: u32, out: &mut Vec<u8>) -> bool {
        let Some(Some(st)) = self.field.and_then(|f| records.cell(&f, row)) else {
            return false;
        };
        let mark = out.len();
        if postcard::to_extend(st, Append(out)).is_err() {
            out.truncate(mark);
            return false;
        }
        true
    }

    fn restore(
        &mut self,
        records: &mut FlowRecords,
        row: u32,
        bytes: &[u8],
    ) -> Result<(), postcard::Error> {
        let st: N::State = postcard::from_bytes(bytes)?;
        match self.field.and_then(|f| records.cell_mut(&f, row)) {
            Some(cell) => {
                *cell = Some(st);
                Ok(())
            }
            // Not attached, or no such flow: there is nowhere to keep the state (postcard's
            // errors have no better word for it; the caller only tells failure apart).
            None => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn discard(&mut self, records: &mut FlowRecords, row: u32) {
        if let Some(cell) = self.field.and_then(|f| records.cell_mut(&f, row)) {
            *cell = None;
        }
    }

    fn reserve(&mut self, records: &FlowRecords, row: u32, ctx: &mut NfContext<'_>) {
        if let Some(Some(st)) = self.field.and_then(|f| records.cell(&f, row)) {
            self.nf.reserve(st, ctx);
        }
    }

    fn reserve_serialised(
        &mut self,
        bytes: &[u8],
        reserve: bool,
        ctx: &mut NfContext<'_>,
    ) -> Result<(), postcard::Error> {
        let st: N::State = postcard::from_bytes(bytes)?;
        if reserve {
            self.nf.reserve(&st, ctx);
        } else {
            self.nf.release(&st, ctx);
        }
        Ok(())
    }
}

/// A packet as a function sees it: its bytes, parsed headers, and rewrites that keep the
/// checksums right.
pub struct PacketMut<'a> {
    /// From the packet's first byte to the end of its buffer.
    room: &'a mut [u8],
    len: usize,
    h: Headers,
}

/// TCP header fields functions commonly need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Offset of the payload in the frame.
    pub payload_off: usize,
}

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

impl<'a> PacketMut<'a> {
    /// Parses the frame in `room[..len]`.
    pub fn new(room: &'a mut [u8], len: usize) -> Result<PacketMut<'a>, ParseError> {
        let len = len.min(room.len());
        let h = packet::parse(&room[..len])?;
        Ok(PacketMut { room, len, h })
    }

    /// A packet whose headers were already parsed from these same bytes (a runtime parses a
    /// batch before running chains). Falls back to parsing if they do not fit the frame.
    pub fn with_headers(
        room: &'a mut [u8],
        len: usize,
        h: Headers,
    ) -> Result<PacketMut<'a>, ParseError> {
        let len = len.min(room.len());
        if (h.l3_end as usize) <= len && (h.l4_off as usize) <= len && (h.l3_off as usize) <= len {
            Ok(PacketMut { room, len, h })
        } else {
            PacketMut::new(room, len)
        }
    }

    pub fn headers(&self) -> &Headers {
        &self.h
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn frame(&self) -> &[u8] {
        &self.room[..self.len]
    }

    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.room[..self.len]
    }

    /// Changes the frame's length (a function building a reply in place); the headers must
    /// be re-read with `reparse` afterwards. False if it does not fit the buffer.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.room.len() {
            return false;
        }
        self.len = len;
        true
    }

    /// Re-reads the headers after the frame was rewritten by hand.
    pub fn reparse(&mut self) -> Result<(), ParseError> {
        self.h = packet::parse(&self.room[..self.len])?;
        Ok(())
    }

    /// The TCP flags, for a TCP packet whose header is here.
    #[inline]
    pub fn tcp_flags(&self) -> Option<u8> {
        if self.h.proto != packet::proto::TCP || self.h.l4_off == 0 {
            return None;
        }
        let t = self.h.l4_off as usize;
        // The parser checked the header is whole; a frame cut since reads as no header.
        self.room[..self.len].get(t + 19).map(|_| self.room[t + 13])
    }

    pub fn tcp(&self) -> Option<TcpInfo> {
        if self.h.proto != packet::proto::TCP || self.h.l4_off == 0 {
            return None;
        }
        let t = self.h.l4_off as usize;
        let b = &self.room[..self.len];
        if b.len() < t + 20 {
            return None;
        }
        let doff = (b[t + 12] >> 4) as usize * 4;
        Some(TcpInfo {
            flags: b[t + 13],
            seq: u32::from_be_bytes([b[t + 4], b[t + 5], b[t + 6], b[t + 7]]),
            ack: u32::from_be_bytes([b[t + 8], b[t + 9], b[t + 10], b[t + 11]]),
            payload_off: (t + doff).min(self.h.l3_end as usize),
        })
    }

    /// The transport payload (TCP or UDP), empty for anything else.
    pub fn payload(&self) -> &[u8] {
        let end = self.h.l3_end as usize;
        let start = match self.h.proto {
            packet::proto::TCP => self.tcp().map(|t| t.payload_off),
            packet::proto::UDP if self.h.l4_off != 0 => Some(self.h.l4_off as usize + 8),
            _ => None,
        };
        match start {
            Some(s) if s <= end && end <= self.len => &self.room[s..end],
            _ => &[],
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.h.l3 == L3::Ipv4
    }

    pub fn src_ipv4(&self) -> Option<[u8; 4]> {
        self.is_ipv4().then(|| {
            [
                self.h.src_ip[0],
                self.h.src_ip[1],
                self.h.src_ip[2],
                self.h.src_ip[3],
            ]
        })
    }

    pub fn dst_ipv4(&self) -> Option<[u8; 4]> {
        self.is_ipv4().then(|| {
            [
                self.h.dst_ip[0],
                self.h.dst_ip[1],
                self.h.dst_ip[2],
                self.h.dst_ip[3],
            ]
        })
    }

    pub fn set_eth_src(&mut self, mac: [u8; 6]) {
        self.room[6..12].copy_from_slice(&mac);
        self.h.src_mac = mac;
    }

    pub fn set_eth_dst(&mut self, mac: [u8; 6]) {
        self.room[0..6].copy_from_slice(&mac);
        self.h.dst_mac = mac;
    }

    /// Where the transport checksum lives and whether it is in use; `None` for later
    /// fragments and protocols without one we update.
    fn l4_csum_at(&self) -> Option<usize> {
        if self.h.l4_off == 0 || self.h.fragment == Fragment::Later {
            return None;
        }
        let t = self.h.l4_off as usize;
        let at = match self.h.proto {
            packet::proto::TCP => t + 16,
            packet::proto::UDP => t + 6,
            _ => return None,
        };
        if at + 2 > self.h.l3_end as usize {
            return None;
        }
        // A UDP checksum of zero over IPv4 means "none": leave it so.
        if self.h.proto == packet::proto::UDP && self.room.get(at..at + 2)? == [0, 0] {
            return None;
        }
        Some(at)
    }

    fn read16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.room[at], self.room[at + 1]])
    }

    fn write16(&mut self, at: usize, v: u16) {
        self.room[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    fn set_ipv4_addr(&mut self, field: usize, ip: [u8; 4]) -> bool {
        if !self.is_ipv4() {
            return false;
        }
        let l4_csum = self.l4_csum_at();
        let l3 = self.h.l3_off as usize;
        // The parser checked the header is in the frame; `get_mut` makes that one check
        // for every access below.
        let Some(hdr) = self.room.get_mut(l3..l3 + 20) else {
            return false;
        };
        let hdr: &mut [u8; 20] = hdr.try_into().expect("20 bytes");
        let at = field.min(16);
        let old = [hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]];
        hdr[at..at + 4].copy_from_slice(&ip);
        // One difference for both checksums: the address is in the transport's
        // pseudo-header too.
        let diff = checksum::diff32(old, ip);
        let c = u16::from_be_bytes([hdr[10], hdr[11]]);
        hdr[10..12].copy_from_slice(&checksum::apply(c, diff).to_be_bytes());
        if let Some(cs) = l4_csum {
            let Some(field) = self.room.get_mut(cs..cs + 2) else {
                return true;
            };
            let mut n = checksum::apply(u16::from_be_bytes([field[0], field[1]]), diff);
            if n == 0 && self.h.proto == packet::proto::UDP {
                n = 0xffff;
            }
            field.copy_from_slice(&n.to_be_bytes());
        }
        true
    }

    /// Rewrites the IPv4 source address (IP and transport checksums updated).
    pub fn set_src_ipv4(&mut self, ip: [u8; 4]) -> bool {
        let ok = self.set_ipv4_addr(12, ip);
        if ok {
            self.h.src_ip[..4].copy_from_slice(&ip);
        }
        ok
    }

    /// Rewrites the IPv4 destination address (IP and transport checksums updated).
    pub fn set_dst_ipv4(&mut self, ip: [u8; 4]) -> bool {
        let ok = self.set_ipv4_addr(16, ip);
        if ok {
            self.h.dst_ip[..4].copy_from_slice(&ip);
        }
        ok
    }

    fn set_port(&mut self, off: usize, port: u16) -> bool {
        if self.h.l4_off == 0 || !matches!(self.h.proto, packet::proto::TCP | packet::proto::UDP) {
            return false;
        }
        let at = self.h.l4_off as usize + off;
        let old = self.read16(at);
        self.write16(at, port);
        if let Some(cs) = self.l4_csum_at() {
            let c = self.read16(cs);
            let mut n = checksum::update16(c, old, port);
            if n == 0 && self.h.proto == packet::proto::UDP {
                n = 0xffff;
            }
            self.write16(cs, n);
        }
        true
    }

    /// Rewrites the TCP/UDP source port (checksum updated).
    pub fn set_src_port(&mut self, port: u16) -> bool {
        let ok = self.set_port(0, port);
        if ok {
            self.h.src_port = port;
        }
        ok
    }

    /// Rewrites the TCP/UDP destination port (checksum updated).
    pub fn set_dst_port(&mut self, port: u16) -> bool {
        let ok = self.set_port(2, port);
        if ok {
            self.h.dst_port = port;
        }
        ok
    }

    /// Rewrites the identifier of an ICMP echo request or reply (checksum updated).
    pub fn set_icmp_echo_id(&mut self, id: u16) -> bool {
        if self.h.proto != packet::proto::ICMP || self.h.l4_off == 0 {
            return false;
        }
        let t = self.h.l4_off as usize;
        if !matches!(self.room[t], 0 | 8) {
            return false;
        }
        let old = self.read16(t + 4);
        self.write16(t + 4, id);
        let c = self.read16(t + 2);
        self.write16(t + 2, checksum::update16(c, old, id));
        self.h.src_port = id;
        self.h.dst_port = id;
        true
    }

    /// If this is an ARP request asking for `ip`, turns it into the reply "`ip` is at `mac`"
    /// (to be sent back). Functions that own an address (NAT, load balancer) answer this way.
    pub fn answer_arp(&mut self, ip: [u8; 4], mac: [u8; 6]) -> bool {
        let Some(arp) = packet::arp::parse(&self.h, self.frame()) else {
            return false;
        };
        if arp.op != 1 || arp.tpa != ip {
            return false;
        }
        let a = arp.offset;
        let requester_mac = arp.sha;
        let requester_ip = arp.spa;
        self.room[a + 6..a + 8].copy_from_slice(&2u16.to_be_bytes());
        self.room[a + 8..a + 14].copy_from_slice(&mac);
        self.room[a + 14..a + 18].copy_from_slice(&ip);
        self.room[a + 18..a + 24].copy_from_slice(&requester_mac);
        self.room[a + 24..a + 28].copy_from_slice(&requester_ip);
        self.set_eth_dst(requester_mac);
        self.set_eth_src(mac);
        true
    }
}

/// What a function's factory gets: its settings and where it runs.
pub struct NfSpec<'a> {
    /// The function's table from the configuration, `kind` included.
    pub settings: &'a toml::Table,
    /// Where the table is, for error messages (`chain.web.nf[1]`).
    pub key: String,
    /// This runtime's position among the runtimes that run the chain, and their number
    /// (functions that partition a resource, like NAT ports, use them).
    pub runtime_index: u32,
    pub runtimes_in_chain: u32,
    /// This server's share of resources split across the cluster (0-based), and how many
    /// shares there are (`cluster.max_servers`; one outside a cluster). A function that
    /// hands out something that must be unique cluster-wide (a NAT's ports) takes share
    /// `server_index` of it, then its runtime's part of that.
    pub server_index: u32,
    pub servers: u32,
    /// Relative paths in settings resolve against this.
    pub base_dir: &'a Path,
    /// The runtime's name (for file names).
    pub runtime: &'a str,
}

impl NfSpec<'_> {
    /// The settings without `kind`, as the function's own configuration type. Unknown keys
    /// and bad values are errors naming the key.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, BuildError> {
        let mut t = self.settings.clone();
        t.remove("kind");
        toml::Value::Table(t)
            .try_into()
            .map_err(|source| BuildError::Settings {
                key: self.key.clone(),
                source,
            })
    }
}

/// Why a function could not be built from its settings: the key at fault (the function's
/// table, `chain.web.nf[1]`, or one of its settings, `chain.web.nf[1].vip`) and what is
/// wrong there.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The table is not the function's settings: an unknown key, a wrong type, a missing
    /// one (toml's message names it).
    #[error("{key}: {}", .source.message())]
    Settings {
        key: String,
        #[source]
        source: toml::de::Error,
    },
    /// A value the function refuses, and why: the function's own error (or a text).
    #[error("{key}: {source}")]
    Invalid {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BuildError {
    /// `key`'s value is refused because of `why`: a typed error of the function's, or a text.
    pub fn invalid(
        key: impl Into<String>,
        why: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BuildError {
        BuildError::Invalid {
            key: key.into(),
            source: why.into(),
        }
    }
}

pub type NfFactory = fn(&NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError>;

/// A function the platform knows by name.
pub struct NfEntry {
    pub kind: &'static str,
    pub about: &'static str,
    pub build: NfFactory,
}

/// The functions that can appear in chains.
pub struct NfRegistry {
    entries: Vec<NfEntry>,
}

impl NfRegistry {
    pub fn new(entries: Vec<NfEntry>) -> NfRegistry {
        NfRegistry { entries }
    }

    pub fn kinds(&self) -> impl Iterator<Item = &NfEntry> {
        self.entries.iter()
    }

    /// Builds the stages of `chain` for the `index`-th of `count` runtimes running it.
    pub fn build_chain(
        &self,
        cfg: &Config,
        chain: &str,
        runtime: &str,
        index: u32,
        count: u32,
    ) -> Result<Vec<Box<dyn Stage>>, ConfigError> {
        let c = cfg
            .chain(chain)
            .ok_or_else(|| ConfigError::NoChain(chain.to_string()))?;
        let mut stages = Vec::new();
        for (i, table) in c.nfs.iter().enumerate() {
            let key = format!("chain.{}.nf[{i}]", c.name);
            let kind = table.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            let entry = self
                .entries
                .iter()
                .find(|e| e.kind == kind)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.entries.iter().map(|e| e.kind).collect();
                    ConfigError::invalid(
                        format!("{key}.kind"),
                        format!("no network function `{kind}` (known: {})", known.join(", ")),
                    )
                })?;
            let spec = NfSpec {
                settings: table,
                key: key.clone(),
                runtime_index: index,
                runtimes_in_chain: count.max(1),
                server_index: cfg.server_share().1,
                servers: cfg.server_share().0,
                base_dir: &cfg.base_dir,
                runtime,
            };
            let stage = (entry.build)(&spec).map_err(|e| ConfigError::Function(Box::new(e)))?;
            if stage.counter_names().len() >= NF_COUNTERS {
                return Err(ConfigError::invalid(key, "too many counters"));
            }
            stages.push(stage);
        }
        Ok(stages)
    }
}
