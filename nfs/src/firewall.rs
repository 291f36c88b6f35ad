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
//! whole flow, in both directions. An allowed TCP flow must open with a SYN, and is then
//! tracked with conntrack's states and transitions, so that it passes and drops what a
//! stateful nftables firewall passes and drops: docs/FIREWALL.md lists the cases, checked
//! against the kernel by scripts/conntrack_compare.py, and the one known difference
//! (sequence windows are not checked).

use nflib::config::{Match, Proto};
use nflib::net::{PortRange, Prefix};
use nflib::nf::{
    tcp_flags as F, BuildError, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage,
    TypedStage, Verdict,
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

/// Where a tracked TCP connection is: conntrack's states, named after the packets seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tcp {
    /// The initiator sent its SYN.
    SynSent,
    /// The responder sent a SYN of its own (simultaneous open).
    SynSent2,
    /// A SYN-ACK answered.
    SynRecv,
    Established,
    /// One side sent a FIN.
    FinWait,
    /// Its FIN was acknowledged.
    CloseWait,
    /// FINs went both ways.
    LastAck,
    /// The last FIN was acknowledged.
    TimeWait,
    /// Reset.
    Close,
}

/// A tracked connection: its state, and what a SYN the tracking let through without acting
/// on (in a state where a SYN is out of place) must be answered with for the tracking to
/// resynchronise: the SYN-ACK of a connection the two ends reopened while the firewall held
/// the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpTrack {
    pub state: Tcp,
    /// The initiator's first sequence number.
    pub isn: u32,
    /// The responder answered the SYN (a SYN-ACK, or a SYN of its own).
    pub answered: bool,
    /// The responder sent anything at all.
    pub heard: bool,
    /// An ignored SYN: whether it came from the initiator, and the acknowledgement number
    /// that answers it.
    pub ignored_syn: Option<(bool, u32)>,
}

impl TcpTrack {
    /// A connection the initiator's SYN with sequence number `isn` opens.
    fn opened(isn: u32) -> TcpTrack {
        TcpTrack {
            state: Tcp::SynSent,
            isn,
            answered: false,
            heard: false,
            ignored_syn: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FwState {
    /// A rule (or the default) denied the flow.
    Denied,
    /// Allowed, not TCP (or not IP): both directions pass.
    Open,
    /// Allowed TCP, tracked.
    Tcp(TcpTrack),
    /// Allowed by the rules, but its first packet was not a SYN: nothing passes until the
    /// initiator's SYN opens it.
    NotOpened,
}

/// What a TCP packet is, for the tracking (conntrack's classes: RST first, then SYN with or
/// without ACK, FIN, ACK, nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Syn,
    SynAck,
    Fin,
    Ack,
    Rst,
    None,
}

/// Whether a TCP header's flags make sense, as conntrack judges them before anything else
/// (PSH, ECE and CWR aside): SYN, SYN-ACK, RST (with or without ACK), FIN-ACK, ACK, any
/// with URG where URG can go. A SYN-FIN, a FIN without ACK, a null or a Christmas-tree
/// packet is invalid, in any state.
fn valid_flags(flags: u8) -> bool {
    const SYN: u8 = F::SYN;
    const SYN_URG: u8 = F::SYN | F::URG;
    const SYN_ACK: u8 = F::SYN | F::ACK;
    const RST: u8 = F::RST;
    const RST_ACK: u8 = F::RST | F::ACK;
    const FIN_ACK: u8 = F::FIN | F::ACK;
    const FIN_ACK_URG: u8 = F::FIN | F::ACK | F::URG;
    const ACK: u8 = F::ACK;
    const ACK_URG: u8 = F::ACK | F::URG;
    matches!(
        flags & !(F::PSH | F::ECE | F::CWR),
        SYN | SYN_URG | SYN_ACK | RST | RST_ACK | FIN_ACK | FIN_ACK_URG | ACK | ACK_URG
    )
}

/// Whether a packet with these flags may open a connection: a valid SYN, no ACK.
fn opens(flags: u8) -> bool {
    valid_flags(flags) && class(flags) == Class::Syn
}

fn class(flags: u8) -> Class {
    if flags & F::RST != 0 {
        Class::Rst
    } else if flags & F::SYN != 0 {
        if flags & F::ACK != 0 {
            Class::SynAck
        } else {
            Class::Syn
        }
    } else if flags & F::FIN != 0 {
        Class::Fin
    } else if flags & F::ACK != 0 {
        Class::Ack
    } else {
        Class::None
    }
}

/// What the tracking does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Pass, and the connection is now in this state.
    To(Tcp),
    /// Pass without changing the state: it may be valid for the ends, out of sync with the
    /// firewall (a retransmission, a SYN reopening a connection), and the answer tells.
    Ignore,
    /// Drop.
    Invalid,
}

/// The transition for a packet of `class` from the initiator (`orig`) or the responder in
/// `state`, as conntrack's TCP table has it (docs/FIREWALL.md lists the table and where
/// this firewall differs from conntrack).
fn step(state: Tcp, class: Class, orig: bool) -> Step {
    use Step::{Ignore as IG, Invalid as IV, To};
    use Tcp::*;
    match (class, orig, state) {
        (Class::Rst, _, _) => To(Close),
        (Class::None, _, _) => IV,
        // The initiator's SYN: retransmitted while opening, out of place in a live
        // connection (ignored: the ends may have reopened it), reopening a closed one.
        (Class::Syn, true, SynSent | TimeWait | Close) => To(SynSent),
        (Class::Syn, true, SynSent2) => To(SynSent2),
        (Class::Syn, true, _) => IG,
        // The responder's SYN: a simultaneous open.
        (Class::Syn, false, SynSent | SynSent2) => To(SynSent2),
        (Class::Syn, false, _) => IV,
        (Class::SynAck, false, SynSent | SynSent2) => To(SynRecv),
        (Class::SynAck, false, _) => IG,
        (Class::SynAck, true, SynSent2 | SynRecv) => To(SynRecv),
        (Class::SynAck, true, _) => IV,
        (Class::Fin, _, SynSent | SynSent2) => IV,
        (Class::Fin, _, SynRecv | Established) => To(FinWait),
        (Class::Fin, _, FinWait | CloseWait | LastAck) => To(LastAck),
        (Class::Fin, _, s @ (TimeWait | Close)) => To(s),
        (Class::Ack, true, SynSent | SynSent2) => IV,
        (Class::Ack, false, SynSent | SynSent2) => IG,
        (Class::Ack, true, SynRecv) => To(Established),
        (Class::Ack, false, SynRecv) => To(SynRecv),
        (Class::Ack, _, Established) => To(Established),
        (Class::Ack, _, FinWait | CloseWait) => To(CloseWait),
        (Class::Ack, _, LastAck | TimeWait) => To(TimeWait),
        (Class::Ack, _, Close) => To(Close),
    }
}

const FLOWS_ALLOWED: usize = 1;
const FLOWS_DENIED: usize = 2;
const DROP_DENIED: usize = 3;
const DROP_NOT_OPENED: usize = 4;
const DROP_INVALID: usize = 5;
/// Packets passed without acting on them (a SYN in a live connection, a late SYN-ACK).
const IGNORED: usize = 6;

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
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
            .map_err(|e| BuildError::invalid(format!("{}.rules[{i}]", spec.key), e))?;
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
            "ignored",
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
            Some(t) if opens(t.flags) => FwState::Tcp(TcpTrack::opened(t.seq)),
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
        let track = match st {
            FwState::Open => return Verdict::Pass,
            FwState::Denied => {
                ctx.count(DROP_DENIED, 1);
                return Verdict::Drop;
            }
            FwState::NotOpened => {
                // The initiator's SYN after a stray packet on its addresses (conntrack
                // tracked nothing for the stray, and the SYN opens a connection).
                match pkt.tcp() {
                    Some(t) if opens(t.flags) && ctx.dir == Dir::Original => {
                        *st = FwState::Tcp(TcpTrack::opened(t.seq));
                        return Verdict::Pass;
                    }
                    _ => {
                        ctx.count(DROP_NOT_OPENED, 1);
                        return Verdict::Drop;
                    }
                }
            }
            FwState::Tcp(t) => t,
        };
        // Later fragments carry no TCP header: they follow the connection's fate.
        let Some(t) = pkt.tcp() else {
            return Verdict::Pass;
        };
        if !valid_flags(t.flags) {
            ctx.count(DROP_INVALID, 1);
            return Verdict::Drop;
        }
        let orig = ctx.dir == Dir::Original;
        let c = class(t.flags);
        if !track.answered {
            // The initiator resetting a connection nothing came back on: conntrack forgets
            // the connection and drops the RST (there is nothing at the other end to
            // reset). A RST answering something the responder sent (a stray ACK from an
            // old connection's TIME_WAIT, say) passes.
            if c == Class::Rst && orig && track.state == Tcp::SynSent && !track.heard {
                track.state = Tcp::Close;
                ctx.count(DROP_INVALID, 1);
                return Verdict::Drop;
            }
            // A connection reset before the responder ever answered has no window for
            // anything but a new SYN (or another RST) to fall in.
            if track.state == Tcp::Close && c != Class::Syn && c != Class::Rst {
                ctx.count(DROP_INVALID, 1);
                return Verdict::Drop;
            }
        }
        if !orig {
            track.heard = true;
        }
        match step(track.state, c, orig) {
            Step::To(next) => {
                if next == Tcp::SynSent && orig {
                    // A retransmitted SYN may carry a new sequence number; a reopening one
                    // starts over.
                    track.isn = t.seq;
                    if track.state != Tcp::SynSent {
                        track.answered = false;
                        track.heard = false;
                    }
                }
                if !orig && matches!(c, Class::SynAck | Class::Syn) {
                    track.answered = true;
                }
                track.state = next;
                track.ignored_syn = None;
                Verdict::Pass
            }
            Step::Ignore => {
                if c == Class::Syn {
                    // The answer acknowledges the SYN and any data it carried (TCP Fast
                    // Open), as conntrack expects.
                    let end = t
                        .seq
                        .wrapping_add(pkt.payload().len() as u32)
                        .wrapping_add(1);
                    track.ignored_syn = Some((orig, end));
                } else if c == Class::SynAck && track.ignored_syn == Some((!orig, t.ack)) {
                    // The other end answered a SYN this firewall let through: the two
                    // ends reopened the connection. Follow them.
                    track.state = Tcp::SynRecv;
                    track.answered = true;
                    track.ignored_syn = None;
                    if !orig {
                        // The SYN came from the initiator: it stays the initiator.
                        track.isn = t.ack.wrapping_sub(1);
                    }
                }
                ctx.count(IGNORED, 1);
                Verdict::Pass
            }
            Step::Invalid => {
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
            assert_eq!(h.feed(&frame).0, Verdict::Pass, "{dir}");
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
        assert_eq!(h.feed(&udp(C, ([10, 0, 0, 2], 53), b"q")).0, Verdict::Pass);
        assert_eq!(h.feed(&udp(([10, 0, 0, 2], 53), C, b"a")).0, Verdict::Pass);
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
    fn the_initiators_syn_opens_a_flow_a_stray_started() {
        let mut h = fw();
        assert_eq!(h.feed(&tcp(C, S, F::ACK, 7, 9, b"")).0, Verdict::Drop);
        assert_eq!(h.feed(&tcp(C, S, F::SYN, 100, 0, b"")).0, Verdict::Pass);
        assert_eq!(
            h.feed(&tcp(S, C, F::SYN | F::ACK, 500, 101, b"")).0,
            Verdict::Pass
        );
        assert_eq!(h.feed(&tcp(C, S, F::ACK, 101, 501, b"")).0, Verdict::Pass);
    }

    /// Flag combinations no TCP sends are invalid wherever they come (conntrack's table of
    /// valid flags), and a SYN carrying another of FIN, RST or ACK opens nothing.
    #[test]
    fn nonsense_flags_are_invalid_in_any_state() {
        assert!(opens(F::SYN) && opens(F::SYN | F::URG) && opens(F::SYN | F::ECE | F::CWR));
        for f in [
            F::SYN | F::FIN,
            F::SYN | F::RST,
            F::SYN | F::ACK,
            F::FIN,
            F::FIN | F::PSH | F::URG,
            0,
            0xff,
        ] {
            assert!(!opens(f), "{f:#x} opens");
        }
        let mut h = fw();
        assert_eq!(
            h.feed(&tcp(C, S, F::SYN | F::FIN, 100, 0, b"")).0,
            Verdict::Drop
        );
        let other = ([10, 0, 0, 1], 40001);
        h.feed(&tcp(other, S, F::SYN, 100, 0, b""));
        h.feed(&tcp(S, other, F::SYN | F::ACK, 500, 101, b""));
        h.feed(&tcp(other, S, F::ACK, 101, 501, b""));
        for f in [
            F::FIN | F::RST,
            F::FIN | F::PSH | F::URG,
            F::FIN,
            F::SYN | F::RST,
            0xff,
        ] {
            assert_eq!(
                h.feed(&tcp(other, S, f, 101, 501, b"")).0,
                Verdict::Drop,
                "{f:#x}"
            );
        }
        // The connection is untouched: data still flows.
        assert_eq!(
            h.feed(&tcp(other, S, F::ACK | F::PSH, 101, 501, b"x")).0,
            Verdict::Pass
        );
    }

    /// A SYN ignored on a live connection carries data (TCP Fast Open): the SYN-ACK that
    /// acknowledges the data too is the answer that resynchronises.
    #[test]
    fn an_ignored_syn_with_data_is_answered_past_its_data() {
        let mut h = fw();
        h.feed(&tcp(C, S, F::SYN, 100, 0, b""));
        h.feed(&tcp(S, C, F::SYN | F::ACK, 500, 101, b""));
        h.feed(&tcp(C, S, F::ACK, 101, 501, b""));
        h.feed(&tcp(C, S, F::SYN, 9000, 0, b"hello"));
        h.feed(&tcp(S, C, F::SYN | F::ACK, 7000, 9006, b""));
        // Resynchronised: the handshake's last ACK moves the connection on, and a FIN is
        // valid.
        h.feed(&tcp(C, S, F::ACK, 9006, 7001, b""));
        assert_eq!(
            h.feed(&tcp(C, S, F::FIN | F::ACK, 9006, 7001, b"")).0,
            Verdict::Pass
        );
        assert_eq!(h.counter("drop_invalid"), 0);
    }

    /// The transitions conntrack makes on these packets (checked against the kernel by
    /// scripts/conntrack_compare.py, which the root tests run against this firewall in the
    /// test bed): these tests keep the unit-level behaviour pinned.
    #[test]
    fn handshake_violations_and_resets() {
        let mut h = fw();
        h.feed(&tcp(C, S, F::SYN, 100, 0, b""));
        // Data from the responder before its SYN-ACK: conntrack lets it through unjudged.
        assert_eq!(h.feed(&tcp(S, C, F::ACK, 500, 101, b"x")).0, Verdict::Pass);
        // A FIN before the handshake completes is invalid.
        assert_eq!(
            h.feed(&tcp(C, S, F::FIN | F::ACK, 101, 0, b"")).0,
            Verdict::Drop
        );
        // The responder resets the SYN; nothing but a new SYN passes after that.
        assert_eq!(
            h.feed(&tcp(S, C, F::RST | F::ACK, 0, 101, b"")).0,
            Verdict::Pass
        );
        assert_eq!(h.feed(&tcp(C, S, F::ACK, 101, 1, b"late")).0, Verdict::Drop);
        assert_eq!(h.counter("drop_invalid"), 2);
        assert_eq!(h.counter("ignored"), 1);
    }

    #[test]
    fn simultaneous_open_and_retransmitted_handshake() {
        let mut h = fw();
        for (frame, what) in [
            (tcp(C, S, F::SYN, 100, 0, b""), "syn"),
            (tcp(C, S, F::SYN, 100, 0, b""), "retransmitted syn"),
            (tcp(S, C, F::SYN, 500, 0, b""), "the server's own syn"),
            (tcp(C, S, F::SYN | F::ACK, 100, 501, b""), "syn-ack"),
            (tcp(S, C, F::SYN | F::ACK, 500, 101, b""), "syn-ack"),
            (tcp(C, S, F::ACK, 101, 501, b""), "ack"),
            (tcp(S, C, F::SYN | F::ACK, 500, 101, b""), "late syn-ack"),
            (tcp(C, S, F::ACK | F::PSH, 101, 501, b"data"), "data"),
        ] {
            assert_eq!(h.feed(&frame).0, Verdict::Pass, "{what}");
        }
        assert_eq!(h.counter("drop_invalid"), 0);
    }

    #[test]
    fn a_syn_on_a_live_connection_passes_and_a_syn_ack_answering_it_resyncs() {
        let mut h = fw();
        h.feed(&tcp(C, S, F::SYN, 100, 0, b""));
        h.feed(&tcp(S, C, F::SYN | F::ACK, 500, 101, b""));
        h.feed(&tcp(C, S, F::ACK, 101, 501, b""));
        // The client lost its end and opens again on the same port.
        assert_eq!(h.feed(&tcp(C, S, F::SYN, 9000, 0, b"")).0, Verdict::Pass);
        assert_eq!(
            h.feed(&tcp(S, C, F::SYN | F::ACK, 7000, 9001, b"")).0,
            Verdict::Pass
        );
        assert_eq!(h.feed(&tcp(C, S, F::ACK, 9001, 7001, b"")).0, Verdict::Pass);
        // A FIN is valid from the new connection's handshake on.
        assert_eq!(
            h.feed(&tcp(C, S, F::FIN | F::ACK, 9001, 7001, b"")).0,
            Verdict::Pass
        );
        assert_eq!(h.counter("drop_invalid"), 0);
    }

    #[test]
    fn the_initiator_resetting_an_unanswered_syn_ends_it() {
        let mut h = fw();
        h.feed(&tcp(C, S, F::SYN, 100, 0, b""));
        assert_eq!(h.feed(&tcp(C, S, F::RST, 101, 0, b"")).0, Verdict::Drop);
        assert_eq!(
            h.feed(&tcp(S, C, F::SYN | F::ACK, 500, 101, b"")).0,
            Verdict::Drop
        );
        // A new SYN opens it again.
        assert_eq!(h.feed(&tcp(C, S, F::SYN, 900, 0, b"")).0, Verdict::Pass);
        assert_eq!(
            h.feed(&tcp(S, C, F::SYN | F::ACK, 500, 901, b"")).0,
            Verdict::Pass
        );
    }

    #[test]
    fn bad_rules_name_their_key() {
        let e = harness(
            build,
            "kind = \"firewall\"\nrules = [{ action = \"allow\", dst_port = 80 }]",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("rules[0]") && e.contains("ports need"), "{e}");
        let e = harness(
            build,
            "kind = \"firewall\"\nrules = [{ action = \"allow\", dport = 80 }]",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("dport"), "{e}");
        let e = harness(build, "kind = \"firewall\"\ndefault = \"maybe\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
    }
}
