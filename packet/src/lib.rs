//! nf-packet: typed views over packet bytes, the flow key, capture files and TCP stream
//! reassembly. Everything here reads bytes it does not trust and owns no memory but its
//! own: no shared memory, no I/O but the `Read`/`Write` a caller hands to [`pcap`], no
//! unsafe. Every other layer of the platform builds on it (nflib re-exports it as
//! `nflib::packet`, with `flow`, `pcap` and `stream` beside it).
//!
//! - this module: reading packet headers: Ethernet (with up to two VLAN tags and PPPoE
//!   sessions), IPv4 and IPv6 (with extension headers and fragments), and the transport
//!   ports of TCP, UDP, SCTP and ICMP echo;
//! - [`build`], [`arp`], [`checksum`]: writing frames, answering ARP, incremental checksums;
//! - [`flow`]: the flow key, one per connection for both directions;
//! - [`pcap`]: pcap and pcapng files;
//! - [`stream`]: in-order delivery of one direction of a TCP stream.
//!
//! [`parse`] validates every length it relies on once and records offsets in [`Headers`];
//! malformed or truncated input is an `Err` that says which layer failed and why, never a
//! panic and never an out-of-bounds read. Frames that are not IP parse successfully with
//! `l3 == L3::None` (what to do with them is a policy of the caller).

#![forbid(unsafe_code)]

pub mod arp;
pub mod build;
pub mod checksum;
pub mod flow;
pub mod pcap;
pub mod stream;

use thiserror::Error;

pub const ETH_HDR_LEN: usize = 14;

pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
    pub const PPPOE_SESSION: u16 = 0x8864;
    pub const QINQ: u16 = 0x88a8;
    pub const QINQ_LEGACY: u16 = 0x9100;
}

pub mod proto {
    pub const HOPOPT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT: u8 = 59;
    pub const DSTOPTS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// The protocol layer at which parsing failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Ethernet,
    Vlan,
    Pppoe,
    Ipv4,
    Ipv6,
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::Ethernet => "Ethernet",
            Layer::Vlan => "VLAN",
            Layer::Pppoe => "PPPoE",
            Layer::Ipv4 => "IPv4",
            Layer::Ipv6 => "IPv6",
            Layer::Tcp => "TCP",
            Layer::Udp => "UDP",
            Layer::Sctp => "SCTP",
            Layer::Icmp => "ICMP",
        })
    }
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("frame shorter than an Ethernet header")]
    Runt,
    #[error("{0} header truncated")]
    Truncated(Layer),
    #[error("malformed {0} header: {1}")]
    Malformed(Layer, &'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3 {
    /// Not IP (ARP, LLDP, ...), or IP inside an encapsulation this parser does not open.
    None,
    Ipv4,
    Ipv6,
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    No,
    /// The fragment at offset 0 (it carries the transport header).
    First,
    /// A later fragment (no transport header).
    Later,
}

/// What `parse` found: addresses, ports and the offset of every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Number of VLAN tags (0 to 2).
    pub vlans: u8,
    /// VLAN id of the outer tag, when there is one.
    pub outer_vlan: u16,
    /// The EtherType after VLAN tags (for PPPoE, the session EtherType).
    pub ethertype: u16,
    pub l3: L3,
    /// Offset of the IP header (for other frames, of the payload after the EtherType).
    pub l3_off: u16,
    /// End of the IP datagram (Ethernet padding excluded); for other frames the frame's end.
    pub l3_end: u16,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the transport header, 0 when absent (later fragments, unknown protocols).
    pub l4_off: u16,
    /// IPv4 addresses occupy the first 4 bytes.
    pub src_ip: [u8; 16],
    pub dst_ip: [u8; 16],
    /// Transport ports (ICMP echo: the identifier in both).
    pub src_port: u16,
    pub dst_port: u16,
    pub fragment: Fragment,
}

impl Headers {
    fn non_ip(dst_mac: [u8; 6], src_mac: [u8; 6], vlans: u8, outer_vlan: u16, et: u16) -> Self {
        Headers {
            dst_mac,
            src_mac,
            vlans,
            outer_vlan,
            ethertype: et,
            l3: L3::None,
            l3_off: 0,
            l3_end: 0,
            proto: 0,
            l4_off: 0,
            src_ip: [0; 16],
            dst_ip: [0; 16],
            src_port: 0,
            dst_port: 0,
            fragment: Fragment::No,
        }
    }

    pub fn is_ip(&self) -> bool {
        self.l3 != L3::None
    }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Most extension headers an IPv6 packet may carry before we call it malformed (RFC 8200
/// recommends each appear at most once; a longer chain is an attack on parsers).
const MAX_IPV6_EXT: usize = 8;

/// Parses an Ethernet frame.
#[inline]
pub fn parse(frame: &[u8]) -> Result<Headers, ParseError> {
    match parse_common(frame) {
        Some(h) => Ok(h),
        None => parse_any(frame),
    }
}

/// The common frame in a few dozen instructions: untagged Ethernet, IPv4 without options,
/// not a fragment, a whole TCP or UDP header. Anything else, and anything wrong with these,
/// is left to [`parse_any`], which reads every frame this accepts to the same `Headers`
/// (a property test holds the two to that). Parsing was the largest single item of a
/// runtime's time per packet.
#[inline(always)]
fn parse_common(frame: &[u8]) -> Option<Headers> {
    // Ethernet (14), IPv4 (20), the UDP header (8): the least a frame here has.
    let f: &[u8; 42] = frame.get(..42)?.try_into().ok()?;
    if be16(f, 12) != ethertype::IPV4 || f[14] != 0x45 {
        return None;
    }
    let total = be16(f, 16) as usize;
    // More fragments, or an offset: a fragment.
    if total < 28 || frame.len() < ETH_HDR_LEN + total || be16(f, 20) & 0x3fff != 0 {
        return None;
    }
    let proto = f[23];
    let avail = total - 20;
    match proto {
        proto::TCP => {
            let doff = (*frame.get(46)? >> 4) as usize * 4;
            if avail < 20 || doff < 20 || doff > avail {
                return None;
            }
        }
        proto::UDP => {
            let ulen = be16(f, 38) as usize;
            if ulen < 8 || ulen > avail {
                return None;
            }
        }
        _ => return None,
    }
    let mut src_ip = [0u8; 16];
    let mut dst_ip = [0u8; 16];
    src_ip[..4].copy_from_slice(&f[26..30]);
    dst_ip[..4].copy_from_slice(&f[30..34]);
    Some(Headers {
        dst_mac: [f[0], f[1], f[2], f[3], f[4], f[5]],
        src_mac: [f[6], f[7], f[8], f[9], f[10], f[11]],
        vlans: 0,
        outer_vlan: 0,
        ethertype: ethertype::IPV4,
        l3: L3::Ipv4,
        l3_off: ETH_HDR_LEN as u16,
        l3_end: (ETH_HDR_LEN + total) as u16,
        proto,
        l4_off: 34,
        src_ip,
        dst_ip,
        src_port: be16(f, 34),
        dst_port: be16(f, 36),
        fragment: Fragment::No,
    })
}

/// Parses any Ethernet frame (`parse` tries the common case first).
fn parse_any(frame: &[u8]) -> Result<Headers, ParseError> {
    if frame.len() < ETH_HDR_LEN {
        return Err(ParseError::Runt);
    }
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let mut et = be16(frame, 12);
    let mut off = ETH_HDR_LEN;
    let mut vlans = 0u8;
    let mut outer_vlan = 0u16;
    while matches!(
        et,
        ethertype::VLAN | ethertype::QINQ | ethertype::QINQ_LEGACY
    ) {
        if vlans == 2 {
            return Err(ParseError::Malformed(Layer::Vlan, "more than two tags"));
        }
        if frame.len() < off + 4 {
            return Err(ParseError::Truncated(Layer::Vlan));
        }
        if vlans == 0 {
            outer_vlan = be16(frame, off) & 0x0fff;
        }
        et = be16(frame, off + 2);
        off += 4;
        vlans += 1;
    }
    let l3 = match et {
        ethertype::IPV4 => L3::Ipv4,
        ethertype::IPV6 => L3::Ipv6,
        ethertype::PPPOE_SESSION => {
            if frame.len() < off + 8 {
                return Err(ParseError::Truncated(Layer::Pppoe));
            }
            if frame[off] != 0x11 {
                return Err(ParseError::Malformed(Layer::Pppoe, "version/type"));
            }
            let inner = match be16(frame, off + 6) {
                0x0021 => L3::Ipv4,
                0x0057 => L3::Ipv6,
                _ => L3::None,
            };
            off += 8;
            inner
        }
        _ => L3::None,
    };
    let mut h = Headers::non_ip(dst_mac, src_mac, vlans, outer_vlan, et);
    match l3 {
        L3::None => {
            // Where the L2 payload starts (ARP, for instance).
            h.l3_off = off as u16;
            h.l3_end = frame.len() as u16;
            Ok(h)
        }
        L3::Ipv4 => {
            parse_ipv4(frame, off, &mut h)?;
            Ok(h)
        }
        L3::Ipv6 => {
            parse_ipv6(frame, off, &mut h)?;
            Ok(h)
        }
    }
}

fn parse_ipv4(frame: &[u8], off: usize, h: &mut Headers) -> Result<(), ParseError> {
    if frame.len() < off + 20 {
        return Err(ParseError::Truncated(Layer::Ipv4));
    }
    let b = &frame[off..];
    if b[0] >> 4 != 4 {
        return Err(ParseError::Malformed(Layer::Ipv4, "version is not 4"));
    }
    let ihl = (b[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed(Layer::Ipv4, "header length below 20"));
    }
    let total = be16(b, 2) as usize;
    if total < ihl {
        return Err(ParseError::Malformed(
            Layer::Ipv4,
            "total length below header length",
        ));
    }
    if b.len() < total {
        return Err(ParseError::Truncated(Layer::Ipv4));
    }
    let flags_frag = be16(b, 6);
    let more = flags_frag & 0x2000 != 0;
    let frag_off = flags_frag & 0x1fff;
    h.l3 = L3::Ipv4;
    h.l3_off = off as u16;
    h.l3_end = (off + total) as u16;
    h.proto = b[9];
    h.src_ip[..4].copy_from_slice(&b[12..16]);
    h.dst_ip[..4].copy_from_slice(&b[16..20]);
    h.fragment = match (frag_off, more) {
        (0, false) => Fragment::No,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    if h.fragment == Fragment::Later {
        return Ok(());
    }
    parse_l4(frame, off + ihl, off + total, h)
}

fn parse_ipv6(frame: &[u8], off: usize, h: &mut Headers) -> Result<(), ParseError> {
    if frame.len() < off + 40 {
        return Err(ParseError::Truncated(Layer::Ipv6));
    }
    let b = &frame[off..];
    if b[0] >> 4 != 6 {
        return Err(ParseError::Malformed(Layer::Ipv6, "version is not 6"));
    }
    let payload = be16(b, 4) as usize;
    if payload == 0 && b[6] != proto::NO_NEXT {
        return Err(ParseError::Malformed(
            Layer::Ipv6,
            "jumbograms are not supported",
        ));
    }
    let end = off + 40 + payload;
    if frame.len() < end {
        return Err(ParseError::Truncated(Layer::Ipv6));
    }
    h.l3 = L3::Ipv6;
    h.l3_off = off as u16;
    h.l3_end = end as u16;
    h.src_ip.copy_from_slice(&b[8..24]);
    h.dst_ip.copy_from_slice(&b[24..40]);
    let mut next = b[6];
    let mut at = off + 40;
    for _ in 0..=MAX_IPV6_EXT {
        match next {
            proto::HOPOPT | proto::ROUTING | proto::DSTOPTS | proto::MOBILITY => {
                if end < at + 8 {
                    return Err(ParseError::Truncated(Layer::Ipv6));
                }
                let len = (frame[at + 1] as usize + 1) * 8;
                if end < at + len {
                    return Err(ParseError::Truncated(Layer::Ipv6));
                }
                next = frame[at];
                at += len;
            }
            proto::AH => {
                if end < at + 8 {
                    return Err(ParseError::Truncated(Layer::Ipv6));
                }
                let len = (frame[at + 1] as usize + 2) * 4;
                if end < at + len {
                    return Err(ParseError::Truncated(Layer::Ipv6));
                }
                next = frame[at];
                at += len;
            }
            proto::FRAGMENT => {
                if end < at + 8 {
                    return Err(ParseError::Truncated(Layer::Ipv6));
                }
                let fo = be16(frame, at + 2);
                let frag_off = fo >> 3;
                let more = fo & 1 != 0;
                next = frame[at];
                at += 8;
                h.fragment = match (frag_off, more) {
                    (0, false) => Fragment::No, // atomic fragment (RFC 6946)
                    (0, true) => Fragment::First,
                    _ => Fragment::Later,
                };
                if h.fragment == Fragment::Later {
                    h.proto = next;
                    return Ok(());
                }
            }
            _ => {
                h.proto = next;
                return parse_l4(frame, at, end, h);
            }
        }
    }
    Err(ParseError::Malformed(
        Layer::Ipv6,
        "too many extension headers",
    ))
}

fn parse_l4(frame: &[u8], at: usize, end: usize, h: &mut Headers) -> Result<(), ParseError> {
    // A first fragment may legitimately end before a full transport header; only whole
    // datagrams must carry one.
    let whole = h.fragment == Fragment::No;
    let avail = end.saturating_sub(at);
    match h.proto {
        proto::TCP => {
            if avail < 20 {
                return if whole {
                    Err(ParseError::Truncated(Layer::Tcp))
                } else {
                    Ok(())
                };
            }
            let doff = (frame[at + 12] >> 4) as usize * 4;
            if doff < 20 {
                return Err(ParseError::Malformed(Layer::Tcp, "data offset below 5"));
            }
            if whole && doff > avail {
                return Err(ParseError::Truncated(Layer::Tcp));
            }
            h.src_port = be16(frame, at);
            h.dst_port = be16(frame, at + 2);
        }
        proto::UDP | proto::UDPLITE => {
            if avail < 8 {
                return if whole {
                    Err(ParseError::Truncated(Layer::Udp))
                } else {
                    Ok(())
                };
            }
            if h.proto == proto::UDP && whole {
                let ulen = be16(frame, at + 4) as usize;
                if ulen < 8 {
                    return Err(ParseError::Malformed(Layer::Udp, "length below 8"));
                }
                if ulen > avail {
                    return Err(ParseError::Truncated(Layer::Udp));
                }
            }
            h.src_port = be16(frame, at);
            h.dst_port = be16(frame, at + 2);
        }
        proto::SCTP => {
            if avail < 12 {
                return if whole {
                    Err(ParseError::Truncated(Layer::Sctp))
                } else {
                    Ok(())
                };
            }
            h.src_port = be16(frame, at);
            h.dst_port = be16(frame, at + 2);
        }
        proto::ICMP | proto::ICMPV6 => {
            if avail < 8 {
                return if whole {
                    Err(ParseError::Truncated(Layer::Icmp))
                } else {
                    Ok(())
                };
            }
            let ty = frame[at];
            let echo = match h.proto {
                proto::ICMP => ty == 0 || ty == 8,
                _ => ty == 128 || ty == 129,
            };
            if echo {
                let id = be16(frame, at + 4);
                h.src_port = id;
                h.dst_port = id;
            }
        }
        _ => {}
    }
    h.l4_off = at as u16;
    Ok(())
}

/// Recomputes the TCP or UDP checksum of a whole datagram in place. Used for frames the
/// kernel hands over with a partial checksum (checksum offload not yet done). Returns false
/// when the frame is not a TCP/UDP datagram this can fix.
pub fn complete_l4_checksum(frame: &mut [u8]) -> bool {
    let Ok(h) = parse(frame) else { return false };
    if h.fragment != Fragment::No || h.l4_off == 0 {
        return false;
    }
    let field = match h.proto {
        proto::TCP => 16,
        proto::UDP => 6,
        _ => return false,
    };
    let (l4, l3end) = (h.l4_off as usize, h.l3_end as usize);
    let len = l3end - l4;
    if len < field + 2 {
        return false;
    }
    frame[l4 + field] = 0;
    frame[l4 + field + 1] = 0;
    let pseudo = match h.l3 {
        L3::Ipv4 => {
            let mut s = [0u8; 4];
            let mut d = [0u8; 4];
            s.copy_from_slice(&h.src_ip[..4]);
            d.copy_from_slice(&h.dst_ip[..4]);
            checksum::pseudo_v4(s, d, h.proto, len as u16)
        }
        L3::Ipv6 => checksum::pseudo_v6(h.src_ip, h.dst_ip, h.proto, len as u32),
        L3::None => return false,
    };
    let mut c = checksum::finish(checksum::sum(pseudo, &frame[l4..l3end]));
    if c == 0 {
        // Same value in one's complement; for UDP a zero would mean "no checksum".
        c = 0xffff;
    }
    frame[l4 + field..l4 + field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use build::UdpV4;

    fn udp_frame() -> Vec<u8> {
        let mut buf = vec![0u8; 128];
        let n = UdpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 0, 0, 2],
            src_port: 1234,
            dst_port: 80,
            payload_len: 22,
        }
        .write(&mut buf)
        .unwrap();
        buf.truncate(n);
        buf
    }

    /// The common-case parser accepts only what the general one reads the same way.
    #[test]
    fn the_fast_path_agrees_with_the_general_parser() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seeds = vec![udp_frame()];
        // A TCP segment with 5 payload bytes (checksums do not matter to parsing).
        let mut tcp = vec![0u8; 59];
        tcp[12..14].copy_from_slice(&[8, 0]);
        tcp[14] = 0x45;
        tcp[16..18].copy_from_slice(&45u16.to_be_bytes());
        tcp[23] = proto::TCP;
        tcp[26..34].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        tcp[34..38].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        tcp[46] = 5 << 4;
        tcp[47] = 2;
        seeds.push(tcp);
        let (mut fast, mut agreed) = (0, 0);
        for i in 0..200_000 {
            let mut f = seeds[i % seeds.len()].clone();
            // Flip bytes where the fast path decides, sometimes cut or pad the frame.
            for _ in 0..(next() % 4) {
                let at = (next() % 56) as usize % f.len();
                f[at] = next() as u8;
            }
            match next() % 8 {
                0 => f.truncate((next() as usize) % (f.len() + 1)),
                1 => f.extend_from_slice(&[0; 7]),
                _ => {}
            }
            if let Some(h) = parse_common(&f) {
                fast += 1;
                assert_eq!(Ok(h), parse_any(&f), "{f:02x?}");
            } else if parse_any(&f).is_ok_and(|h| {
                h.vlans == 0 && h.l3 == L3::Ipv4 && h.l4_off == 34 && h.fragment == Fragment::No
            }) {
                agreed += 1;
            }
        }
        assert!(fast > 50_000, "the fast path took {fast}");
        let _ = agreed;
    }

    #[test]
    fn parses_udp_v4() {
        let f = udp_frame();
        let h = parse(&f).unwrap();
        assert_eq!(h.l3, L3::Ipv4);
        assert_eq!(h.proto, proto::UDP);
        assert_eq!((h.src_port, h.dst_port), (1234, 80));
        assert_eq!(&h.src_ip[..4], &[10, 0, 0, 1]);
        assert_eq!(h.l3_end as usize, f.len());
        assert_eq!(h.l4_off, 34);
    }

    #[test]
    fn vlan_and_qinq_tags_are_skipped() {
        let f = udp_frame();
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xa8, 0x00, 0x64, 0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f[12..]);
        let h = parse(&tagged).unwrap();
        assert_eq!(h.vlans, 2);
        assert_eq!(h.outer_vlan, 100);
        assert_eq!((h.src_port, h.dst_port), (1234, 80));
    }

    #[test]
    fn truncation_and_malformation_are_reported_per_layer() {
        let f = udp_frame();
        assert_eq!(parse(&f[..10]), Err(ParseError::Runt));
        assert_eq!(parse(&f[..30]), Err(ParseError::Truncated(Layer::Ipv4)));
        let mut bad = f.clone();
        bad[14] = 0x43; // IHL 3
        assert!(matches!(
            parse(&bad),
            Err(ParseError::Malformed(Layer::Ipv4, _))
        ));
        let mut bad = f.clone();
        bad[38] = 0;
        bad[39] = 4; // UDP length 4
        assert!(matches!(
            parse(&bad),
            Err(ParseError::Malformed(Layer::Udp, _))
        ));
    }

    #[test]
    fn later_fragments_carry_no_ports() {
        let mut f = udp_frame();
        f[20] = 0x00;
        f[21] = 0x10; // fragment offset 16
        let h = parse(&f).unwrap();
        assert_eq!(h.fragment, Fragment::Later);
        assert_eq!((h.src_port, h.dst_port, h.l4_off), (0, 0, 0));
    }

    #[test]
    fn non_ip_frames_parse_without_l3() {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        let h = parse(&f).unwrap();
        assert_eq!(h.l3, L3::None);
        assert_eq!(h.ethertype, ethertype::ARP);
    }

    #[test]
    fn completes_partial_checksums() {
        let mut f = udp_frame();
        let l4 = 34;
        f[l4 + 6] = 0x12;
        f[l4 + 7] = 0x34;
        assert!(complete_l4_checksum(&mut f));
        let h = parse(&f).unwrap();
        let pseudo = checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], proto::UDP, 30);
        assert_eq!(
            checksum::finish(checksum::sum(pseudo, &f[l4..h.l3_end as usize])),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse(&bytes);
            let mut b = bytes.clone();
            let _ = complete_l4_checksum(&mut b);
        }

        #[test]
        fn never_panics_on_mutated_ip_frames(pos in 12usize..70, val in proptest::num::u8::ANY, cut in 0usize..80) {
            let mut f = udp_frame();
            if pos < f.len() { f[pos] = val; }
            f.truncate(f.len().min(cut.max(14)));
            let _ = parse(&f);
        }
    }
}
