//! Load balancer: a virtual IP spread over backends. Each new flow to the VIP picks a backend
//! (round robin, or a hash of the flow), kept in the flow's state; packets to the VIP are
//! rewritten to the backend and replies from the backend back to the VIP.
//!
//! ```toml
//! [[chain.nf]]
//! kind = "load_balancer"
//! vip = "10.77.0.50"
//! vip_mac = "02:4c:42:00:00:01"     # answers ARP for the VIP
//! port = 80                          # only this destination port (default: all)
//! method = "round_robin"             # or "hash"
//! backends = [
//!   { ip = "10.77.0.2", mac = "02:..:.." },
//!   { ip = "10.77.0.3", mac = "02:..:.." },
//! ]
//! ```
//!
//! The backend's reply key is registered as an alias of the flow. IPv4 only.

use nflib::flow::{family, FlowKey};
use nflib::net::Mac;
use nflib::nf::{
    BuildError, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage, TypedStage, Verdict,
};
use nflib::packet::proto;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSettings {
    ip: String,
    mac: Mac,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Method {
    #[default]
    RoundRobin,
    Hash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    vip: String,
    vip_mac: Mac,
    port: Option<u16>,
    #[serde(default)]
    method: Method,
    backends: Vec<BackendSettings>,
    #[serde(default = "yes")]
    answer_arp: bool,
}

fn yes() -> bool {
    true
}

struct Backend {
    ip: [u8; 4],
    mac: [u8; 6],
}

pub struct LoadBalancer {
    vip: [u8; 4],
    vip_mac: [u8; 6],
    port: Option<u16>,
    method: Method,
    backends: Vec<Backend>,
    next: usize,
    answer_arp: bool,
    counter_names: &'static [&'static str],
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbState {
    /// The backend of a balanced flow.
    pub backend: Option<u8>,
}

const BALANCED: usize = 1;
const ARP_REPLIES: usize = 2;
/// Counters 3.. count flows per backend.
const FIRST_BACKEND: usize = 3;
const MAX_BACKENDS: usize = 12;

/// Backends, none or more than the balancer takes (the number given).
#[derive(Debug, thiserror::Error)]
#[error("between 1 and {MAX_BACKENDS} backends")]
pub struct BackendCountError(pub usize);

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
    let s: Settings = spec.settings()?;
    let vip = nflib::net::parse_ipv4(&s.vip)
        .map_err(|e| BuildError::invalid(format!("{}.vip", spec.key), e))?;
    if s.backends.is_empty() || s.backends.len() > MAX_BACKENDS {
        let why = BackendCountError(s.backends.len());
        return Err(BuildError::invalid(format!("{}.backends", spec.key), why));
    }
    let mut backends = Vec::new();
    for (i, b) in s.backends.iter().enumerate() {
        let ip = nflib::net::parse_ipv4(&b.ip)
            .map_err(|e| BuildError::invalid(format!("{}.backends[{i}].ip", spec.key), e))?;
        backends.push(Backend { ip, mac: b.mac.0 });
    }
    // Counter names are built once per configuration and live as long as the process.
    let mut names: Vec<&'static str> = vec!["flows_balanced", "arp_replies"];
    for b in &backends {
        let ip = b.ip;
        names.push(Box::leak(
            format!("backend_{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]).into_boxed_str(),
        ));
    }
    Ok(TypedStage::boxed(LoadBalancer {
        vip,
        vip_mac: s.vip_mac.0,
        port: s.port,
        method: s.method,
        backends,
        next: 0,
        answer_arp: s.answer_arp,
        counter_names: Box::leak(names.into_boxed_slice()),
    }))
}

impl LoadBalancer {
    fn for_vip(&self, pkt: &PacketMut<'_>) -> bool {
        let h = pkt.headers();
        pkt.dst_ipv4() == Some(self.vip)
            && matches!(h.proto, proto::TCP | proto::UDP)
            && h.l4_off != 0
            && self.port.is_none_or(|p| p == h.dst_port)
    }

    fn choose(&mut self, key: &FlowKey) -> usize {
        match self.method {
            Method::RoundRobin => {
                let b = self.next % self.backends.len();
                self.next = self.next.wrapping_add(1);
                b
            }
            Method::Hash => {
                // FNV-1a over the key: stable across runtimes and restarts.
                let mut h: u64 = 0xcbf29ce484222325;
                for b in key
                    .a
                    .iter()
                    .chain(&key.b)
                    .chain(&key.a_port.to_be_bytes())
                    .chain(&key.b_port.to_be_bytes())
                {
                    h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
                }
                (h % self.backends.len() as u64) as usize
            }
        }
    }
}

impl NetworkFunction for LoadBalancer {
    type State = LbState;

    fn kind(&self) -> &'static str {
        "load_balancer"
    }

    fn counters(&self) -> &'static [&'static str] {
        self.counter_names
    }

    fn new_flow(&mut self, pkt: &PacketMut<'_>, ctx: &mut NfContext<'_>) -> LbState {
        if !self.for_vip(pkt) {
            return LbState::default();
        }
        let b = self.choose(ctx.key);
        let h = pkt.headers();
        let (reply_key, _) = FlowKey::from_tuple(
            family::IPV4,
            h.proto,
            if h.vlans > 0 { h.outer_vlan } else { 0 },
            (FlowKey::v4(self.backends[b].ip), h.dst_port),
            (h.src_ip, h.src_port),
        );
        ctx.add_alias(reply_key);
        ctx.count(BALANCED, 1);
        ctx.count(FIRST_BACKEND + b, 1);
        LbState {
            backend: Some(b as u8),
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut LbState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        let Some(b) = st.backend.and_then(|b| self.backends.get(b as usize)) else {
            if self.answer_arp && pkt.answer_arp(self.vip, self.vip_mac) {
                ctx.count(ARP_REPLIES, 1);
                return Verdict::SendBack;
            }
            return Verdict::Pass;
        };
        match ctx.dir {
            Dir::Original => {
                pkt.set_dst_ipv4(b.ip);
                pkt.set_eth_dst(b.mac);
            }
            Dir::Reply => {
                pkt.set_src_ipv4(self.vip);
                pkt.set_eth_src(self.vip_mac);
            }
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build, checksums_ok, tcp};
    use nflib::nf::tcp_flags as F;

    const SETTINGS: &str = r#"
        kind = "load_balancer"
        vip = "10.0.0.50"
        vip_mac = "02:00:00:00:00:50"
        port = 80
        backends = [
          { ip = "10.0.0.2", mac = "02:00:00:00:00:02" },
          { ip = "10.0.0.3", mac = "02:00:00:00:00:03" },
        ]
    "#;

    #[test]
    fn spreads_flows_and_rewrites_both_ways() {
        let mut h = build(super::build, SETTINGS).unwrap();
        let vip = ([10, 0, 0, 50], 80);
        let mut seen = Vec::new();
        for port in 1000..1004u16 {
            let c = ([10, 0, 0, 9], port);
            let (v, out) = h.feed(&tcp(c, vip, F::SYN, 1, 0, b""));
            assert_eq!(v, Verdict::Pass);
            let hd = nflib::packet::parse(&out).unwrap();
            assert!(checksums_ok(&out));
            seen.push(hd.dst_ip[3]);
            // The backend answers the client; the reply leaves as the VIP.
            let backend = ([hd.dst_ip[0], hd.dst_ip[1], hd.dst_ip[2], hd.dst_ip[3]], 80);
            let (v, back) = h.feed(&tcp(backend, c, F::SYN | F::ACK, 5, 2, b""));
            assert_eq!(v, Verdict::Pass);
            let bh = nflib::packet::parse(&back).unwrap();
            assert_eq!(&bh.src_ip[..4], &[10, 0, 0, 50]);
            assert_eq!(bh.src_mac, [2, 0, 0, 0, 0, 0x50]);
            assert!(checksums_ok(&back));
        }
        assert_eq!(seen, vec![2, 3, 2, 3]);
        assert_eq!(h.counter("backend_10.0.0.2"), 2);
        assert_eq!(h.counter("backend_10.0.0.3"), 2);
    }

    #[test]
    fn other_traffic_passes_and_arp_for_the_vip_is_answered() {
        let mut h = build(super::build, SETTINGS).unwrap();
        let (v, out) = h.feed(&tcp(
            ([10, 0, 0, 9], 1),
            ([10, 0, 0, 50], 22),
            F::SYN,
            1,
            0,
            b"",
        ));
        assert_eq!(v, Verdict::Pass);
        assert_eq!(nflib::packet::parse(&out).unwrap().dst_ip[3], 50);
        let mut arp = [0u8; 60];
        let n = nflib::packet::arp::request(
            &mut arp,
            [2, 0, 0, 0, 0, 9],
            [10, 0, 0, 9],
            [10, 0, 0, 50],
        )
        .unwrap();
        assert_eq!(h.feed(&arp[..n]).0, Verdict::SendBack);
    }

    #[test]
    fn configuration_errors() {
        let e = build(super::build, "kind = \"load_balancer\"\nvip = \"10.0.0.1\"\nvip_mac = \"02:00:00:00:00:01\"\nbackends = []").err().unwrap().to_string();
        assert_eq!(
            e,
            format!("chain.test.nf[0].backends: between 1 and {MAX_BACKENDS} backends")
        );
        let e = build(
            super::build,
            "kind = \"load_balancer\"\nvip = \"x\"\nvip_mac = \"02:00:00:00:00:01\"\nbackends = []",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.starts_with("chain.test.nf[0].vip: "), "{e}");
        let e = build(super::build, "kind = \"load_balancer\"\nvips = []")
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                crate::testing::HarnessError::Build(BuildError::Settings { .. })
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("chain.test.nf[0]: unknown field `vips`"),
            "{e}"
        );
    }
}
