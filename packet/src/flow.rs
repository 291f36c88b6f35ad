//! The flow key: which connection a packet belongs to, the same for both directions.
//!
//! A key holds the two endpoints in a canonical order (the smaller (address, port) first), so
//! a packet and its reply map to one key; `Sender` tells which endpoint sent the packet.
//!
//! Policies, decided here once for the whole platform:
//! - **Fragments**: every fragment of a datagram (the first included) is keyed by addresses
//!   and protocol only, with ports 0. Later fragments carry no ports, and keying the first one
//!   differently would split one datagram across two flows. Such a key is marked `fragment` so
//!   it can never be mistaken for a real flow whose ports happen to be 0.
//! - **VLANs**: the outer VLAN id is part of the key; the same addresses in two VLANs are two
//!   flows.
//! - **Non-IP frames** are keyed by the two MAC addresses and the EtherType (an "L2 flow"), so
//!   they stay in order per pair of stations.

use crate::{Fragment, Headers, L3};

/// Kinds of key, stored in `FlowKey::family`.
pub mod family {
    pub const L2: u8 = 0;
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

#[derive(Clone, Copy, Debug, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct FlowKey {
    /// Lower endpoint: IPv4 in the first 4 bytes, IPv6 in all 16, a MAC in the first 6 (L2).
    #[serde(with = "addr16")]
    pub a: [u8; 16],
    #[serde(with = "addr16")]
    pub b: [u8; 16],
    pub a_port: u16,
    pub b_port: u16,
    pub vlan: u16,
    pub proto: u8,
    pub family: u8,
    /// Set for keys of IP fragments (ports deliberately 0).
    pub fragment: bool,
}

impl FlowKey {
    /// Ports, VLAN, protocol and family in one word (every bit of them).
    #[inline(always)]
    fn small_fields(&self) -> u64 {
        u64::from(self.a_port)
            | u64::from(self.b_port) << 16
            | u64::from(self.vlan) << 32
            | u64::from(self.proto) << 48
            | u64::from(self.family) << 56
    }
}

/// Four compares (two address words, the small fields' word, the fragment mark) instead of
/// ten: every lookup compares keys.
impl PartialEq for FlowKey {
    #[inline(always)]
    fn eq(&self, other: &FlowKey) -> bool {
        u128::from_ne_bytes(self.a) == u128::from_ne_bytes(other.a)
            && u128::from_ne_bytes(self.b) == u128::from_ne_bytes(other.b)
            && self.small_fields() == other.small_fields()
            && self.fragment == other.fragment
    }
}

/// Three words, not the derived ten calls (two length prefixes and every field on its own):
/// every packet's flow lookup, in the vswitch and the runtimes, and every key a migration
/// moves, is hashed. Equal keys write equal words, as `Eq` requires.
impl std::hash::Hash for FlowKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Little-endian everywhere, so that a digest of keys (`msg::keys_digest`) is the
        // same on every server.
        state.write_u128(u128::from_le_bytes(self.a));
        state.write_u128(u128::from_le_bytes(self.b));
        // `family` is 0, 4 or 6: its top bit is free for the fragment mark (a hash may
        // collide; equality compares the mark apart).
        state.write_u64(self.small_fields() | u64::from(self.fragment) << 63);
    }
}

/// A key's addresses as byte strings: in postcard a length byte and one copy, instead of
/// serde's default of sixteen separate elements (migration moves keys by the hundred
/// thousand). Binary formats leave out the trailing zero bytes, which an IPv4 or MAC
/// address always has (a key then takes 18 bytes instead of 42, and migration between
/// servers authenticates and carries a quarter less); reading pads them back, so full
/// 16-byte strings read as before. Self-describing formats show all sixteen numbers.
mod addr16 {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return s.serialize_bytes(v);
        }
        let used = v.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        s.serialize_bytes(&v[..used])
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 16];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("up to 16 address bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<[u8; 16], E> {
                if v.len() > 16 {
                    return Err(E::invalid_length(v.len(), &self));
                }
                let mut out = [0u8; 16];
                out[..v.len()].copy_from_slice(v);
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<[u8; 16], A::Error> {
                let mut out = [0u8; 16];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = a
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                if a.next_element::<u8>()?.is_some() {
                    return Err(A::Error::invalid_length(17, &self));
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Which endpoint of the key sent a packet (the key's order, not the flow's: that is
/// `nf::Dir`, original or reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// From `a` to `b`.
    A,
    /// From `b` to `a`.
    B,
}

impl FlowKey {
    /// The key of a packet from `src:sport` to `dst:dport` (IPv4 in the first 4 bytes of the
    /// addresses), and which of its endpoints sent it. Functions that translate addresses use it to name the
    /// key their translated packets will arrive under.
    pub fn from_tuple(
        family: u8,
        proto: u8,
        vlan: u16,
        src: ([u8; 16], u16),
        dst: ([u8; 16], u16),
    ) -> (FlowKey, Sender) {
        let forward = src <= dst;
        let ((a, a_port), (b, b_port)) = if forward { (src, dst) } else { (dst, src) };
        let key = FlowKey {
            a,
            b,
            a_port,
            b_port,
            vlan,
            proto,
            family,
            fragment: false,
        };
        let sender = if forward { Sender::A } else { Sender::B };
        (key, sender)
    }

    /// An IPv4 address as stored in keys.
    pub fn v4(ip: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&ip);
        a
    }

    /// The key of a parsed packet and the direction it travels in.
    pub fn of(h: &Headers) -> (FlowKey, Sender) {
        let (family, src, dst, sport, dport, proto, fragment) = match h.l3 {
            L3::None => {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s[..6].copy_from_slice(&h.src_mac);
                d[..6].copy_from_slice(&h.dst_mac);
                (family::L2, s, d, h.ethertype, h.ethertype, 0, false)
            }
            L3::Ipv4 | L3::Ipv6 => {
                let fam = if h.l3 == L3::Ipv4 {
                    family::IPV4
                } else {
                    family::IPV6
                };
                let frag = h.fragment != Fragment::No;
                let (sp, dp) = if frag {
                    (0, 0)
                } else {
                    (h.src_port, h.dst_port)
                };
                (fam, h.src_ip, h.dst_ip, sp, dp, h.proto, frag)
            }
        };
        // Byte strings compare as big-endian numbers do: two wide compares, not a loop.
        let forward = (u128::from_be_bytes(src), sport) <= (u128::from_be_bytes(dst), dport);
        let (a, a_port, b, b_port) = if forward {
            (src, sport, dst, dport)
        } else {
            (dst, dport, src, sport)
        };
        let key = FlowKey {
            a,
            b,
            a_port,
            b_port,
            vlan: if h.vlans > 0 { h.outer_vlan } else { 0 },
            proto,
            family,
            fragment,
        };
        let sender = if forward { Sender::A } else { Sender::B };
        (key, sender)
    }
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |x: &[u8; 16]| -> String {
            match self.family {
                family::IPV4 => std::net::Ipv4Addr::new(x[0], x[1], x[2], x[3]).to_string(),
                family::IPV6 => std::net::Ipv6Addr::from(*x).to_string(),
                _ => x[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            }
        };
        match self.family {
            family::L2 => write!(
                f,
                "l2 {} <-> {} type {:#06x}",
                addr(&self.a),
                addr(&self.b),
                self.a_port
            ),
            _ => write!(
                f,
                "proto {} {}:{} <-> {}:{}{}",
                self.proto,
                addr(&self.a),
                self.a_port,
                addr(&self.b),
                self.b_port,
                if self.fragment { " (fragments)" } else { "" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build::UdpV4, parse};

    fn frame(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
        let mut b = vec![0u8; 80];
        let n = UdpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: src,
            dst_ip: dst,
            src_port: sp,
            dst_port: dp,
            payload_len: 4,
        }
        .write(&mut b)
        .unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn both_directions_share_a_key() {
        let f1 = frame([10, 0, 0, 9], 5000, [10, 0, 0, 1], 80);
        let f2 = frame([10, 0, 0, 1], 80, [10, 0, 0, 9], 5000);
        let (k1, d1) = FlowKey::of(&parse(&f1).unwrap());
        let (k2, d2) = FlowKey::of(&parse(&f2).unwrap());
        assert_eq!(k1, k2);
        assert_ne!(d1, d2);
        assert_eq!(k1.to_string(), "proto 17 10.0.0.1:80 <-> 10.0.0.9:5000");
    }

    #[test]
    fn fragments_of_one_datagram_share_a_key_distinct_from_flows() {
        let whole = frame([10, 0, 0, 9], 5000, [10, 0, 0, 1], 80);
        let mut first = whole.clone();
        first[20] = 0x20; // MF
        let mut later = whole.clone();
        later[20] = 0x00;
        later[21] = 0x08;
        let (kf, _) = FlowKey::of(&parse(&first).unwrap());
        let (kl, _) = FlowKey::of(&parse(&later).unwrap());
        let (kw, _) = FlowKey::of(&parse(&whole).unwrap());
        assert_eq!(kf, kl);
        assert!(kf.fragment);
        assert_ne!(kf, kw);
    }

    #[test]
    fn keys_travel_compactly_and_read_back_exactly() {
        let (v4, _) = FlowKey::of(&parse(&frame([10, 0, 0, 9], 5000, [10, 0, 0, 1], 80)).unwrap());
        let bytes = postcard::to_allocvec(&v4).unwrap();
        assert!(bytes.len() <= 20, "{} bytes", bytes.len());
        assert_eq!(postcard::from_bytes::<FlowKey>(&bytes).unwrap(), v4);
        // Trailing zero octets of the address itself, an IPv6 address, all zeros.
        for (a, b) in [
            (FlowKey::v4([10, 0, 0, 0]), FlowKey::v4([0, 0, 0, 0])),
            (
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0xfe; 16],
            ),
        ] {
            let k = FlowKey::from_tuple(family::IPV4, 6, 7, (a, 1), (b, 2)).0;
            let bytes = postcard::to_allocvec(&k).unwrap();
            assert_eq!(postcard::from_bytes::<FlowKey>(&bytes).unwrap(), k);
        }
        // What earlier versions wrote (all sixteen bytes) still reads; seventeen does not.
        let mut full = vec![16];
        full.extend_from_slice(&v4.a);
        full.push(16);
        full.extend_from_slice(&v4.b);
        full.extend_from_slice(&bytes[bytes.len() - 7..]);
        let (mut short, mut long) = (full.clone(), full.clone());
        assert_eq!(postcard::from_bytes::<FlowKey>(&full).unwrap(), v4);
        short.truncate(3);
        assert!(postcard::from_bytes::<FlowKey>(&short).is_err());
        long[0] = 17;
        long.insert(1, 0);
        assert!(postcard::from_bytes::<FlowKey>(&long).is_err());
        // JSON shows the whole address.
        let json = serde_json::to_string(&v4).unwrap();
        assert_eq!(serde_json::from_str::<FlowKey>(&json).unwrap(), v4);
        assert!(
            json.contains("[10,0,0,1,0,0,0,0,0,0,0,0,0,0,0,0]"),
            "{json}"
        );
    }
}
