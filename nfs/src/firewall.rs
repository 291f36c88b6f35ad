//! Stateful firewall: ordered rules decide each new flow, then TCP connections are tracked
//! through their handshake and teardown, and packets of connections the firewall did not see
//! open are dropped, as a real stateful firewall does.
//!
//! ```toml
//! [[chain.nf]]
//! kind = "firewall"
//! default = "deny"                 # flows no rule matches
//! non_ip = "allow"                 # ARP and other non-IP frames
//! rules = [
//!   { action = "allow", proto = "tcp", dst_port = 5201 },
//!   { action = "deny",  dst = "10.77.0.0/24", proto = "tcp", dst_port = "1-1023" },
//! ]
//! ```
//!
//! Rules are matched against a flow's first packet, in order; the first match decides the
//! whole flow, in both directions. For allowed TCP flows the first packet must be a SYN, the
//! first reply a SYN-ACK (or RST); after a RST only further RSTs pass.

use nflib::config::{Match, Proto};
use nflib::net::{PortRange, Prefix};
use nflib::nf::{
    tcp_flags as F, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage, TypedStage, Verdict,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSettings {
    action: Action,
    src: Option<Prefix>,
    dst: Option<Prefix>,
    proto: Option<Proto>,
    src_port: Option<PortRange>,
    dst_port: Option<PortRange>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "deny")]
    default: Action,
    #[serde(default = "allow")]
    non_ip: Action,
    #[serde(default)]
    rules: Vec<RuleSettings>,
}

fn deny() -> Action {
    Action::Deny
}
fn allow() -> Action {
    Action::Allow
}

pub struct Firewall {
    rules: Vec<(Action, Match)>,
    default: Action,
    non_ip: Action,
}

/// Where a tracked TCP connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tcp {
    /// The initiator sent its SYN.
    SynSent,
    /// The responder answered SYN-ACK.
    SynReceived,
    Established,
    /// A FIN went one way or both (bit 0: original, bit 1: reply).
    Closing(u8),
    /// Reset: only resets pass.
    Reset,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FwState {
    /// A rule (or the default) denied the flow.
    Denied,
    /// Allowed, not TCP (or not IP): both directions pass.
    Open,
    /// Allowed TCP, tracked.
    Tcp(Tcp),
    /// Allowed by the rules, but its first packet was not a SYN: nothing passes.
    NotOpened,
}

const FLOWS_ALLOWED: usize = 1;
const FLOWS_DENIED: usize = 2;
const DROP_DENIED: usize = 3;
const DROP_NOT_OPENED: usize = 4;
const DROP_INVALID: usize = 5;

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, String> {
    let s: Settings = spec.settings()?;
    let mut rules = Vec::new();
    for (i, r) in s.rules.into_iter().enumerate() {
        let m = Match {
            src: r.src,
            dst: r.dst,
            proto: r.proto,
            src_port: r.src_port,
            dst_port: r.dst_port,
        };
        m.check()
            .map_err(|e| format!("{}.rules[{i}]: {e}", spec.key))?;
        rules.push((r.action, m));
    }
    Ok(TypedStage::boxed(Firewall {
        rules,
        default: s.default,
        non_ip: s.non_ip,
    }))
}

impl Firewall {
    fn decide(&self, pkt: &PacketMut<'_>) -> Action {
        let h = pkt.headers();
        if !h.is_ip() {
            return self.non_ip;
        }
        let input = nflib::config::MatchInput {
            ip: true,
            arp: false,
            v6: h.l3 == nflib::packet::L3::Ipv6,
            src: h.src_ip,
            dst: h.dst_ip,
            proto: h.proto,
            src_port: h.src_port,
            dst_port: h.dst_port,
        };
        self.rules
            .iter()
            .find(|(_, m)| m.matches(&input))
            .map(|(a, _)| *a)
            .unwrap_or(self.default)
    }
}

impl NetworkFunction for Firewall {
    type State = FwState;

    fn kind(&self) -> &'static str {
        "firewall"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "flows_allowed",
            "flows_denied",
            "drop_denied",
            "drop_not_opened",
            "drop_invalid",
        ]
    }

    fn new_flow(&mut self, pkt: &PacketMut<'_>, ctx: &mut NfContext<'_>) -> FwState {
        if self.decide(pkt) == Action::Deny {
            ctx.count(FLOWS_DENIED, 1);
            return FwState::Denied;
        }
        ctx.count(FLOWS_ALLOWED, 1);
        match pkt.tcp() {
            // A SYN without ACK opens a connection; anything else did not start here.
            Some(t) if t.flags & (F::SYN | F::ACK | F::RST) == F::SYN => FwState::Tcp(Tcp::SynSent),
            Some(_) => FwState::NotOpened,
            // Not TCP, or a fragment without its TCP header.
            None => FwState::Open,
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut FwState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        let tcp_state = match st {
            FwState::Open => return Verdict::Forward,
            FwState::Denied => {
                ctx.count(DROP_DENIED, 1);
                return Verdict::Drop;
            }
            FwState::NotOpened => {
                ctx.count(DROP_NOT_OPENED, 1);
                return Verdict::Drop;
            }
            FwState::Tcp(t) => t,
        };
        // Later fragments carry no TCP header: they follow the connection's fate.
        let Some(t) = pkt.tcp() else {
            return Verdict::Forward;
        };
        let f = t.flags;
        let orig = ctx.dir == Dir::Original;
        let next = match (*tcp_state, orig) {
            _ if f & F::RST != 0 => Some(Tcp::Reset),
            (Tcp::Reset, _) => None,
            (Tcp::SynSent, true) if f & F::SYN != 0 && f & F::ACK == 0 => Some(Tcp::SynSent),
            (Tcp::SynSent, false) if f & F::SYN != 0 && f & F::ACK != 0 => Some(Tcp::SynReceived),
            (Tcp::SynSent, _) => None,
            (Tcp::SynReceived, true) if f & F::ACK != 0 && f & F::SYN == 0 => {
                Some(Tcp::Established)
            }
            // Retransmitted SYN or SYN-ACK while the handshake completes.
            (Tcp::SynReceived, true) if f & F::SYN != 0 && f & F::ACK == 0 => {
                Some(Tcp::SynReceived)
            }
            (Tcp::SynReceived, false) if f & F::SYN != 0 => Some(Tcp::SynReceived),
            (Tcp::SynReceived, _) => None,
            (Tcp::Established, _) if f & F::SYN != 0 => None,
            (Tcp::Established, _) if f & F::FIN != 0 => {
                Some(Tcp::Closing(if orig { 1 } else { 2 }))
            }
            (Tcp::Established, _) => Some(Tcp::Established),
            (Tcp::Closing(_), _) if f & F::SYN != 0 => None,
            (Tcp::Closing(bits), _) if f & F::FIN != 0 => {
                Some(Tcp::Closing(bits | if orig { 1 } else { 2 }))
            }
            (Tcp::Closing(bits), _) => Some(Tcp::Closing(bits)),
        };
        match next {
            Some(n) => {
                *tcp_state = n;
                Verdict::Forward
            }
            None => {
                ctx.count(DROP_INVALID, 1);
                Verdict::Drop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build as harness, tcp, udp};

    const C: ([u8; 4], u16) = ([10, 0, 0, 1], 40000);
    const S: ([u8; 4], u16) = ([10, 0, 0, 2], 5201);

    fn fw() -> crate::testing::Harness {
        harness(
            build,
            r#"
            kind = "firewall"
            default = "deny"
            rules = [
              { action = "deny", proto = "tcp", dst_port = 22 },
              { action = "allow", proto = "tcp", dst_port = "5000-6000" },
              { action = "allow", proto = "udp" },
            ]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_full_tcp_connection_passes() {
        let mut h = fw();
        for (frame, dir) in [
            (tcp(C, S, F::SYN, 100, 0, b""), "syn"),
            (tcp(S, C, F::SYN | F::ACK, 500, 101, b""), "syn-ack"),
            (tcp(C, S, F::ACK, 101, 501, b""), "ack"),
            (tcp(C, S, F::ACK | F::PSH, 101, 501, b"hello"), "data"),
            (tcp(S, C, F::ACK, 501, 106, b""), "data ack"),
            (tcp(C, S, F::FIN | F::ACK, 106, 501, b""), "fin"),
            (tcp(S, C, F::FIN | F::ACK, 501, 107, b""), "fin"),
            (tcp(C, S, F::ACK, 107, 502, b""), "last ack"),
        ] {
            assert_eq!(h.feed(&frame).0, Verdict::Forward, "{dir}");
        }
        assert_eq!(h.counter("flows_allowed"), 1);
    }

    #[test]
    fn a_denied_port_and_the_default_deny() {
        let mut h = fw();
        assert_eq!(
            h.feed(&tcp(C, ([10, 0, 0, 2], 22), F::SYN, 1, 0, b"")).0,
            Verdict::Drop
        );
        assert_eq!(
            h.feed(&tcp(C, ([10, 0, 0, 2], 80), F::SYN, 1, 0, b"")).0,
            Verdict::Drop
        );
        assert_eq!(h.counter("flows_denied"), 2);
        assert_eq!(h.counter("drop_denied"), 2);
        // UDP is allowed, both ways.
        assert_eq!(
            h.feed(&udp(C, ([10, 0, 0, 2], 53), b"q")).0,
            Verdict::Forward
        );
        assert_eq!(
            h.feed(&udp(([10, 0, 0, 2], 53), C, b"a")).0,
            Verdict::Forward
        );
    }

    #[test]
    fn packets_of_a_connection_never_opened_are_dropped() {
        let mut h = fw();
        // Mid-stream ACK with data, no SYN seen.
        assert_eq!(
            h.feed(&tcp(C, S, F::ACK | F::PSH, 7, 9, b"x")).0,
            Verdict::Drop
        );
        assert_eq!(h.feed(&tcp(S, C, F::ACK, 9, 8, b"")).0, Verdict::Drop);
        assert_eq!(h.counter("drop_not_opened"), 2);
        // An unsolicited SYN-ACK for a new flow.
        let other = ([10, 0, 0, 1], 40001);
        assert_eq!(
            h.feed(&tcp(S, other, F::SYN | F::ACK, 1, 1, b"")).0,
            Verdict::Drop
        );
    }

    #[test]
    fn handshake_violations_and_resets() {
        let mut h = fw();
        h.feed(&tcp(C, S, F::SYN, 100, 0, b""));
        // Data from the responder before its SYN-ACK.
        assert_eq!(h.feed(&tcp(S, C, F::ACK, 500, 101, b"x")).0, Verdict::Drop);
        assert_eq!(
            h.feed(&tcp(S, C, F::RST | F::ACK, 0, 101, b"")).0,
            Verdict::Forward
        );
        assert_eq!(h.feed(&tcp(C, S, F::ACK, 101, 1, b"late")).0, Verdict::Drop);
        assert_eq!(h.counter("drop_invalid"), 2);
    }

    #[test]
    fn bad_rules_name_their_key() {
        let e = harness(
            build,
            "kind = \"firewall\"\nrules = [{ action = \"allow\", dst_port = 80 }]",
        )
        .err()
        .unwrap();
        assert!(e.contains("rules[0]") && e.contains("ports need"), "{e}");
        let e = harness(
            build,
            "kind = \"firewall\"\nrules = [{ action = \"allow\", dport = 80 }]",
        )
        .err()
        .unwrap();
        assert!(e.contains("dport"), "{e}");
        let e = harness(build, "kind = \"firewall\"\ndefault = \"maybe\"")
            .err()
            .unwrap();
        assert!(e.contains("maybe"), "{e}");
    }
}
