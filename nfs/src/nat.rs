//! Source NAT: flows started from inside leave with the NAT's address and a port (or ICMP
//! echo identifier) of its own; replies are translated back.
//!
//! ```toml
//! [[chain.nf]]
//! kind = "nat"
//! external_ip = "10.77.0.100"
//! external_mac = "02:4e:41:54:00:01"   # answers ARP for external_ip with this address
//! internal = "10.77.0.0/24"           # flows started from here are translated (default: all)
//! ports = "20000-59999"               # split by server id (cluster.max_servers shares),
//!                                     # then between the runtimes of the chain
//! ```
//!
//! The translated reply key is registered as an alias of the flow, so replies reach the flow
//! actor that holds the mapping (and the packet that made it leaves only once the vswitch
//! has it). Each server of a cluster takes its share of the port range by server id, and each
//! runtime of the chain its part of that, so no two runtimes anywhere hand out the same port.
//! A flow keeps its port when it moves to another runtime or is taken over there; the
//! runtime whose share it is keeps the port reserved until the flow ends, a restarted one
//! too (`reserve` and `release`, which the platform calls: runtime/src/holds.rs).
//! IPv4 only; IPv6 flows pass untouched.

use std::collections::{HashMap, VecDeque};

use nflib::flow::{family, FlowKey};
use nflib::net::{Mac, PortRange, Prefix};
use nflib::nf::{
    BuildError, Dir, EndReason, NetworkFunction, NfContext, NfSpec, PacketMut, Stage, TypedStage,
    Verdict,
};
use nflib::packet::proto;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    external_ip: String,
    external_mac: Mac,
    internal: Option<Prefix>,
    ports: Option<PortRange>,
    #[serde(default = "yes")]
    answer_arp: bool,
}

fn yes() -> bool {
    true
}

/// Ports handed out by this runtime: its share of the configured range.
///
/// Two habits of a good NAT (RFC 4787 section 4.1; Linux's masquerade keeps ports when it
/// can for the same reason), because servers keep a closed connection's 4-tuple in
/// TIME_WAIT for a minute or two, and answer a new SYN on it with the old connection's ACK
/// when its sequence number does not fit (the client then resets and waits a second to try
/// again):
/// - **Sticky**: a flow from the same inside address and port to the same destination as a
///   flow that ended gets that flow's port back, if it is free, so the server sees the
///   tuple the client meant to reuse, with the client's own sequence numbers.
/// - **Least recently used**: otherwise, the port free the longest, so a port comes back
///   to another inside endpoint as late as the share allows.
struct Ports {
    first: u16,
    used: Vec<bool>,
    /// Per port, bumped each time it is freed: an entry of `free_order` with an older
    /// generation is stale (the port was taken out of turn, sticky, and freed again since).
    generation: Vec<u32>,
    /// Free ports, longest free first, with their generation when freed. Stale entries
    /// are skipped when reached, and dropped once they outnumber the share.
    free_order: VecDeque<(u16, u32)>,
    free: usize,
    /// Where ended flows' ports went: (inside ip, inside port, protocol, destination ip,
    /// destination port) -> port, with the order they ended in (oldest first) to keep the
    /// map no larger than the share.
    last: HashMap<Mapping5, u16>,
    last_order: VecDeque<Mapping5>,
}

/// An inside endpoint and the destination it talked to.
type Mapping5 = ([u8; 4], u16, u8, [u8; 16], u16);

impl Ports {
    fn new(first: u16, share: usize) -> Ports {
        Ports {
            first,
            used: vec![false; share],
            generation: vec![0; share],
            free_order: (0..share as u32).map(|i| (first + i as u16, 0)).collect(),
            free: share,
            last: HashMap::new(),
            last_order: VecDeque::new(),
        }
    }

    fn index(&self, port: u16) -> Option<usize> {
        port.checked_sub(self.first)
            .map(usize::from)
            .filter(|&i| i < self.used.len())
    }

    /// A port for a flow from `who`: the one its last flow had, if free, else the port free
    /// the longest.
    fn alloc(&mut self, who: &Mapping5) -> Option<u16> {
        if self.free == 0 {
            return None;
        }
        if let Some(&port) = self.last.get(who) {
            if let Some(i) = self.index(port).filter(|&i| !self.used[i]) {
                self.used[i] = true;
                self.free -= 1;
                return Some(port);
            }
        }
        while let Some((port, generation)) = self.free_order.pop_front() {
            let Some(i) = self.index(port) else { continue };
            if !self.used[i] && self.generation[i] == generation {
                self.used[i] = true;
                self.free -= 1;
                return Some(port);
            }
        }
        None
    }

    /// Marks `port` taken, by a flow that lives on elsewhere (or was installed here): true if
    /// it was free. A port of another share is not this one's to take.
    fn take(&mut self, port: u16) -> bool {
        let Some(i) = self.index(port).filter(|&i| !self.used[i]) else {
            return false;
        };
        // Its entry in `free_order` is skipped when reached (the port is used).
        self.used[i] = true;
        self.free -= 1;
        true
    }

    /// Frees `port` (true if it was this share's and taken); `who` had it, and gets it back
    /// for its next flow to the same destination if `remember`.
    fn release(&mut self, port: u16, who: Mapping5, remember: bool) -> bool {
        // A port from another runtime's share (a flow that moved here) is not ours to free.
        let Some(i) = self.index(port) else {
            return false;
        };
        if !self.used[i] {
            return false;
        }
        self.used[i] = false;
        self.free += 1;
        self.generation[i] = self.generation[i].wrapping_add(1);
        self.free_order.push_back((port, self.generation[i]));
        if self.free_order.len() > 2 * self.used.len() {
            let (used, generation, first) = (&self.used, &self.generation, self.first);
            self.free_order.retain(|&(p, g)| {
                let i = usize::from(p - first);
                !used[i] && generation[i] == g
            });
        }
        if remember && self.last.insert(who, port).is_none() {
            self.last_order.push_back(who);
            while self.last_order.len() > self.used.len() {
                if let Some(old) = self.last_order.pop_front() {
                    self.last.remove(&old);
                }
            }
        }
        true
    }
}

pub struct Nat {
    external_ip: [u8; 4],
    external_mac: [u8; 6],
    internal: Prefix,
    answer_arp: bool,
    ports: Ports,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub inside_ip: [u8; 4],
    /// Port, or ICMP echo identifier.
    pub inside_port: u16,
    pub outside_port: u16,
    /// The inside host's MAC, restored on replies.
    pub inside_mac: [u8; 6],
    /// The destination (its address, port and the protocol), so that a later flow from
    /// the same inside endpoint to it gets the same port.
    pub proto: u8,
    pub peer: [u8; 16],
    pub peer_port: u16,
}

/// The inside endpoint and destination of a flow's first packet.
fn endpoints(pkt: &PacketMut<'_>) -> Mapping5 {
    let h = pkt.headers();
    (
        pkt.src_ipv4().unwrap_or([0; 4]),
        h.src_port,
        h.proto,
        h.dst_ip,
        h.dst_port,
    )
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatState {
    pub mapping: Option<Mapping>,
    /// The flow needed a mapping and none was free: its packets are dropped.
    pub refused: bool,
}

const TRANSLATED: usize = 1;
const DROP_NO_PORT: usize = 2;
const ARP_REPLIES: usize = 3;
/// Ports marked taken for flows that live on in another runtime (or moved here).
const PORTS_RESERVED: usize = 4;
/// Ports freed when such a flow ended elsewhere.
const PORTS_RELEASED: usize = 5;

/// A port range too small for a port of its own for every server and runtime.
#[derive(Debug, thiserror::Error)]
#[error(
    "{total} ports cannot be shared by {servers} servers (cluster.max_servers) of {runtimes} \
     runtimes"
)]
pub struct PortShareError {
    pub total: usize,
    pub servers: usize,
    pub runtimes: u32,
}

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
    let s: Settings = spec.settings()?;
    let external_ip = nflib::net::parse_ipv4(&s.external_ip)
        .map_err(|e| BuildError::invalid(format!("{}.external_ip", spec.key), e))?;
    let range = s.ports.unwrap_or(PortRange(20000..=59999));
    let total = (*range.0.end() as usize) - (*range.0.start() as usize) + 1;
    // Cluster-wide first (each server id its share), then this server's runtimes: no two
    // runtimes anywhere hand out the same port.
    let servers = spec.servers.max(1) as usize;
    let server_share = total / servers;
    let share = server_share / spec.runtimes_in_chain as usize;
    if share == 0 {
        let runtimes = spec.runtimes_in_chain;
        let why = PortShareError {
            total,
            servers,
            runtimes,
        };
        return Err(BuildError::invalid(format!("{}.ports", spec.key), why));
    }
    let first = *range.0.start() as usize
        + server_share * spec.server_index as usize
        + share * spec.runtime_index as usize;
    Ok(TypedStage::boxed(Nat {
        external_ip,
        external_mac: s.external_mac.0,
        internal: s
            .internal
            .unwrap_or(Prefix::parse("0.0.0.0/0").expect("valid prefix")),
        answer_arp: s.answer_arp,
        ports: Ports::new(first as u16, share),
    }))
}

impl Nat {
    /// Whether this first packet starts a flow to translate.
    fn wants_mapping(&self, pkt: &PacketMut<'_>) -> bool {
        let h = pkt.headers();
        let Some(src) = pkt.src_ipv4() else {
            return false;
        };
        let translatable = match h.proto {
            proto::TCP | proto::UDP => h.l4_off != 0,
            // Echo requests only (identifier in the ports).
            proto::ICMP => h.l4_off != 0 && pkt.frame().get(h.l4_off as usize) == Some(&8),
            _ => false,
        };
        translatable && src != self.external_ip && self.internal.contains(&FlowKey::v4(src), false)
    }
}

impl NetworkFunction for Nat {
    type State = NatState;

    fn kind(&self) -> &'static str {
        "nat"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "translated_flows",
            "drop_no_port",
            "arp_replies",
            "ports_reserved",
            "ports_released",
        ]
    }

    fn new_flow(&mut self, pkt: &PacketMut<'_>, ctx: &mut NfContext<'_>) -> NatState {
        if !self.wants_mapping(pkt) {
            return NatState::default();
        }
        let h = pkt.headers();
        let Some(outside_port) = self.ports.alloc(&endpoints(pkt)) else {
            return NatState {
                mapping: None,
                refused: true,
            };
        };
        let inside_ip = pkt.src_ipv4().unwrap_or([0; 4]);
        ctx.count(TRANSLATED, 1);
        // Replies arrive from the peer to the NAT's address and port.
        let (peer_port, outside) = if h.proto == proto::ICMP {
            (outside_port, outside_port)
        } else {
            (h.dst_port, outside_port)
        };
        let (reply_key, _) = FlowKey::from_tuple(
            family::IPV4,
            h.proto,
            if h.vlans > 0 { h.outer_vlan } else { 0 },
            (h.dst_ip, peer_port),
            (FlowKey::v4(self.external_ip), outside),
        );
        ctx.add_alias(reply_key);
        NatState {
            mapping: Some(Mapping {
                inside_ip,
                inside_port: h.src_port,
                outside_port,
                inside_mac: h.src_mac,
                proto: h.proto,
                peer: h.dst_ip,
                peer_port: h.dst_port,
            }),
            refused: false,
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut NatState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        if st.refused {
            ctx.count(DROP_NO_PORT, 1);
            return Verdict::Drop;
        }
        let Some(m) = &st.mapping else {
            if self.answer_arp && pkt.answer_arp(self.external_ip, self.external_mac) {
                ctx.count(ARP_REPLIES, 1);
                return Verdict::SendBack;
            }
            return Verdict::Pass;
        };
        let icmp = pkt.headers().proto == proto::ICMP;
        match ctx.dir {
            Dir::Original => {
                pkt.set_src_ipv4(self.external_ip);
                if icmp {
                    pkt.set_icmp_echo_id(m.outside_port);
                } else {
                    pkt.set_src_port(m.outside_port);
                }
                pkt.set_eth_src(self.external_mac);
            }
            Dir::Reply => {
                pkt.set_dst_ipv4(m.inside_ip);
                if icmp {
                    pkt.set_icmp_echo_id(m.inside_port);
                } else {
                    pkt.set_dst_port(m.inside_port);
                }
                pkt.set_eth_dst(m.inside_mac);
            }
        }
        Verdict::Pass
    }

    fn end_flow(&mut self, st: NatState, ctx: &mut NfContext<'_>) {
        if let Some(m) = st.mapping {
            // A port whose reply key another runtime holds is not one to hand this endpoint
            // again.
            self.ports.release(
                m.outside_port,
                (m.inside_ip, m.inside_port, m.proto, m.peer, m.peer_port),
                ctx.end_reason() != EndReason::Refused,
            );
        }
    }

    fn reserve(&mut self, st: &NatState, ctx: &mut NfContext<'_>) {
        if let Some(m) = &st.mapping {
            if self.ports.take(m.outside_port) {
                ctx.count(PORTS_RESERVED, 1);
            }
        }
    }

    fn release(&mut self, st: &NatState, ctx: &mut NfContext<'_>) {
        if let Some(m) = &st.mapping {
            let who = (m.inside_ip, m.inside_port, m.proto, m.peer, m.peer_port);
            if self.ports.release(m.outside_port, who, true) {
                ctx.count(PORTS_RELEASED, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build_for, checksums_ok, tcp, udp, Harness};
    use nflib::nf::tcp_flags as F;

    const SETTINGS: &str = r#"
        kind = "nat"
        external_ip = "192.0.2.1"
        external_mac = "02:00:00:00:00:aa"
        internal = "10.0.0.0/8"
        ports = "1000-1003"
    "#;

    fn nat(index: u32, count: u32) -> Harness {
        build_for(build, SETTINGS, index, count).unwrap()
    }

    #[test]
    fn translates_both_directions_with_valid_checksums() {
        let mut h = nat(0, 1);
        let c = ([10, 1, 1, 1], 5555);
        let s = ([198, 51, 100, 7], 80);
        let (v, out) = h.feed(&tcp(c, s, F::SYN, 1, 0, b""));
        assert_eq!(v, Verdict::Pass);
        let hd = nflib::packet::parse(&out).unwrap();
        assert_eq!(&hd.src_ip[..4], &[192, 0, 2, 1]);
        assert_eq!(hd.src_port, 1000);
        assert_eq!(hd.src_mac, [2, 0, 0, 0, 0, 0xaa]);
        assert!(checksums_ok(&out));
        assert_eq!(h.aliases.len(), 1);
        // The reply, to the NAT's address, is translated back to the inside host.
        let (v, back) = h.feed(&tcp(
            s,
            ([192, 0, 2, 1], 1000),
            F::SYN | F::ACK,
            9,
            2,
            b"hi",
        ));
        assert_eq!(v, Verdict::Pass);
        let hd = nflib::packet::parse(&back).unwrap();
        assert_eq!(&hd.dst_ip[..4], &[10, 1, 1, 1]);
        assert_eq!(hd.dst_port, 5555);
        assert_eq!(hd.dst_mac, [2, 0, 0, 0, 0, 1]);
        assert!(checksums_ok(&back));
    }

    #[test]
    fn ports_run_out_and_come_back() {
        let mut h = nat(0, 1);
        for i in 0..4u16 {
            let (v, _) = h.feed(&udp(([10, 0, 0, 1], 100 + i), ([8, 8, 8, 8], 53), b"q"));
            assert_eq!(v, Verdict::Pass);
        }
        let (v, _) = h.feed(&udp(([10, 0, 0, 1], 200), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(v, Verdict::Drop);
        assert_eq!(h.counter("drop_no_port"), 1);
        // Flows end, their ports return.
        h.end_all();
        let (v, _) = h.feed(&udp(([10, 0, 0, 1], 300), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(v, Verdict::Pass);
    }

    /// A reused inside port gets its last translation back (the server may hold that tuple
    /// in TIME_WAIT, and only the client's own sequence numbers reopen it); other
    /// endpoints get the port free the longest.
    #[test]
    fn ports_stick_to_their_endpoint_and_come_back_last_to_others() {
        let mut h = nat(0, 1);
        let src = |h: &mut Harness, port: u16| {
            let (_, out) = h.feed(&udp(([10, 0, 0, 1], port), ([8, 8, 8, 8], 53), b"q"));
            nflib::packet::parse(&out).unwrap().src_port
        };
        assert_eq!(src(&mut h, 100), 1000);
        assert_eq!(src(&mut h, 101), 1001);
        h.end_all();
        // Another endpoint: the port free the longest (1002 was never used).
        assert_eq!(src(&mut h, 102), 1002);
        // The first endpoint again: its own port.
        assert_eq!(src(&mut h, 100), 1000);
        assert_eq!(src(&mut h, 101), 1001);
    }

    /// Sticky ports taken out of turn and freed again leave stale entries in the free
    /// order: they are skipped (the port goes by its latest release) and never pile up.
    #[test]
    fn the_free_order_stays_true_and_bounded_under_sticky_reuse() {
        let mut p = Ports::new(1000, 4);
        let who = ([10, 0, 0, 1], 100, 17, [8; 16], 53);
        let other = ([10, 0, 0, 2], 100, 17, [8; 16], 53);
        let first = p.alloc(&who).unwrap();
        p.release(first, who, true);
        for _ in 0..1000 {
            assert_eq!(p.alloc(&who), Some(first), "sticky");
            p.release(first, who, true);
        }
        assert!(p.free_order.len() <= 8, "{}", p.free_order.len());
        // Others get the ports free the longest: the sticky one was freed last.
        let got: Vec<u16> = (0..4).map(|_| p.alloc(&other).unwrap()).collect();
        assert_eq!(got, vec![1001, 1002, 1003, first]);
        assert_eq!(p.alloc(&other), None);
        // A port released without being remembered does not come back to its endpoint
        // first (remembered, 1001 would).
        p.release(1002, other, false);
        p.release(1001, who, false);
        assert_eq!(p.alloc(&who), Some(1002));
    }

    /// A restarted runtime told of the flows its earlier life translated, which live on in
    /// another runtime, hands none of their ports to a new flow until they end there.
    #[test]
    fn ports_of_flows_living_elsewhere_stay_reserved_until_they_end_there() {
        let mut old = nat(0, 1);
        let port_of = |out: &[u8]| nflib::packet::parse(out).unwrap().src_port;
        let (_, a) = old.feed(&udp(([10, 0, 0, 1], 100), ([8, 8, 8, 8], 53), b"q"));
        let (_, b) = old.feed(&udp(([10, 0, 0, 1], 101), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!((port_of(&a), port_of(&b)), (1000, 1001));
        let (sa, sb) = (old.save(0).unwrap(), old.save(1).unwrap());
        // The new life learns of both flows (twice: harmless).
        let mut new = nat(0, 1);
        for s in [&sa, &sb, &sa] {
            new.reserve_serialised(s, true).unwrap();
        }
        assert_eq!(new.counter("ports_reserved"), 2);
        assert!(new.reserve_serialised(b"\xff\xff\xff", true).is_err());
        let (_, c) = new.feed(&udp(([10, 0, 0, 2], 100), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(port_of(&c), 1002);
        // One of them ends where it lives: its port is free again, and it is not reserved
        // for its endpoint's next flow alone (the free order puts it last).
        new.reserve_serialised(&sa, false).unwrap();
        new.reserve_serialised(&sa, false).unwrap();
        assert_eq!(new.counter("ports_released"), 1);
        let (_, d) = new.feed(&udp(([10, 0, 0, 2], 101), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(port_of(&d), 1003);
        let (_, e) = new.feed(&udp(([10, 0, 0, 2], 102), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(port_of(&e), 1000);
        let (v, _) = new.feed(&udp(([10, 0, 0, 2], 103), ([8, 8, 8, 8], 53), b"q"));
        assert_eq!(
            v,
            Verdict::Drop,
            "1001 is still held by the flow living elsewhere"
        );
        // A state of another share is not this one's to reserve or free.
        let mut other = nat(1, 2);
        other.reserve_serialised(&sb, true).unwrap();
        other.reserve_serialised(&sb, false).unwrap();
        assert_eq!(
            other.counter("ports_reserved") + other.counter("ports_released"),
            0
        );
    }

    #[test]
    fn runtimes_get_disjoint_port_shares() {
        let mut a = nat(0, 2);
        let mut b = nat(1, 2);
        let (_, fa) = a.feed(&udp(([10, 0, 0, 1], 1), ([8, 8, 8, 8], 53), b""));
        let (_, fb) = b.feed(&udp(([10, 0, 0, 1], 1), ([8, 8, 8, 8], 53), b""));
        let pa = nflib::packet::parse(&fa).unwrap().src_port;
        let pb = nflib::packet::parse(&fb).unwrap().src_port;
        assert_eq!((pa, pb), (1000, 1002));
        assert!(
            build_for(build, SETTINGS, 0, 5).is_err(),
            "4 ports cannot serve 5 runtimes"
        );
    }

    #[test]
    fn outside_flows_pass_and_arp_is_answered() {
        let mut h = nat(0, 1);
        let (v, out) = h.feed(&udp(([192, 168, 1, 1], 9), ([10, 0, 0, 1], 9), b""));
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            &nflib::packet::parse(&out).unwrap().src_ip[..4],
            &[192, 168, 1, 1]
        );
        let mut arp = [0u8; 60];
        let n = nflib::packet::arp::request(
            &mut arp,
            [2, 0, 0, 0, 0, 9],
            [198, 51, 100, 7],
            [192, 0, 2, 1],
        )
        .unwrap();
        let (v, reply) = h.feed(&arp[..n]);
        assert_eq!(v, Verdict::SendBack);
        let hd = nflib::packet::parse(&reply).unwrap();
        let a = nflib::packet::arp::parse(&hd, &reply).unwrap();
        assert_eq!(
            (a.op, a.sha, a.spa),
            (2, [2, 0, 0, 0, 0, 0xaa], [192, 0, 2, 1])
        );
        assert_eq!(hd.dst_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(h.counter("arp_replies"), 1);
    }
}
