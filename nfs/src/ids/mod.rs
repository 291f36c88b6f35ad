//! Intrusion detection with Snort-style signatures (see [`rules`] for the language).
//!
//! ```toml
//! [[chain.nf]]
//! kind = "ids"
//! rules_file = "local.rules"        # one rule per line
//! rules = ['alert tcp any any -> any 80 (msg:"probe"; content:"/etc/passwd"; sid:1000001;)']
//! ```
//!
//! All contents of all rules go into two Aho-Corasick automata (case-sensitive and `nocase`),
//! so every byte is inspected once whatever the number of rules. For TCP the automata run
//! over each direction's reassembled stream and their state is kept in the flow's state
//! between packets, so a content split across segments (or arriving out of order) is found;
//! `offset` and `depth` count from the start of that direction's stream. For other protocols
//! each packet's payload is inspected on its own. A rule alerts at most once per flow.
//!
//! Alerts go to the runtime's event log (written by another thread) and to the `alerts`
//! counter; the IDS never drops traffic.

pub mod rules;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind};
use nflib::nf::{
    tcp_flags as F, BuildError, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage,
    TypedStage, Verdict,
};
use nflib::packet::{proto, L3};
use nflib::stream::{Reassembler, DEFAULT_WINDOW};
use serde::{Deserialize, Serialize};

use rules::{Rule, RuleProto};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    rules: Vec<String>,
    rules_file: Option<std::path::PathBuf>,
}

/// Which content of which rule a pattern of an automaton is.
#[derive(Clone, Copy, Debug)]
struct PatternRef {
    rule: u32,
    content: u32,
}

/// The rules' contents could not be compiled into the matching automata.
#[derive(Debug, thiserror::Error)]
pub enum AutomatonError {
    #[error("cannot build the pattern automaton: {0}")]
    Build(#[source] aho_corasick::BuildError),
    #[error("cannot build the pattern automaton: {0}")]
    Start(#[source] aho_corasick::MatchError),
}

struct Matcher {
    dfa: DFA,
    patterns: Vec<PatternRef>,
    start: StateID,
}

impl Matcher {
    fn build(
        patterns: Vec<(Vec<u8>, PatternRef)>,
        nocase: bool,
    ) -> Result<Option<Matcher>, AutomatonError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(nocase)
            .build(patterns.iter().map(|(p, _)| p))
            .map_err(AutomatonError::Build)?;
        let start = dfa
            .start_state(Anchored::No)
            .map_err(AutomatonError::Start)?;
        Ok(Some(Matcher {
            dfa,
            patterns: patterns.into_iter().map(|(_, r)| r).collect(),
            start,
        }))
    }
}

pub struct Ids {
    rules: Vec<Rule>,
    cs: Option<Matcher>,
    ci: Option<Matcher>,
    /// Rules without content: decided on header and flow options alone.
    contentless: Vec<u32>,
    /// Matches found in the current packet (reused).
    hits: Vec<(PatternRef, u64)>,
    scratch: Vec<u8>,
}

/// One direction's inspection state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scan {
    stream: Reassembler,
    cs: u32,
    ci: u32,
    /// Bytes of the stream inspected so far.
    pos: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdsState {
    /// bit 0: SYN from the initiator, bit 1: SYN-ACK back.
    handshake: u8,
    established: bool,
    scans: [Scan; 2],
    /// Contents matched so far per direction, as `rule << 16 | content`.
    satisfied: [Vec<u32>; 2],
    /// Rules that alerted in this flow (by index).
    alerted: Vec<u32>,
    /// Automaton states are valid for this process's automata. False after the state was
    /// moved here from elsewhere: the scan restarts from the start state rather than trust a
    /// number from another process (a pattern straddling the move may be missed).
    #[serde(skip)]
    states_valid: bool,
}

const ALERTS: usize = 1;
const STREAM_GAPS: usize = 2;

/// Why the settings give the IDS no rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesSourceError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no rules (set rules or rules_file)")]
    NoRules,
}

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
    let s: Settings = spec.settings()?;
    let mut text = s.rules.join("\n");
    if let Some(f) = &s.rules_file {
        let path = spec.base_dir.join(f);
        let file = std::fs::read_to_string(&path).map_err(|source| {
            let why = RulesSourceError::Read { path, source };
            BuildError::invalid(format!("{}.rules_file", spec.key), why)
        })?;
        text.push('\n');
        text.push_str(&file);
    }
    let rules = rules::parse_rules(&text).map_err(|e| BuildError::invalid(&spec.key, e))?;
    if rules.is_empty() {
        return Err(BuildError::invalid(&spec.key, RulesSourceError::NoRules));
    }
    let ids = Ids::new(rules).map_err(|e| BuildError::invalid(&spec.key, e))?;
    Ok(TypedStage::boxed(ids))
}

impl Ids {
    pub fn new(rules: Vec<Rule>) -> Result<Ids, AutomatonError> {
        let mut cs = Vec::new();
        let mut ci = Vec::new();
        let mut contentless = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            if rule.contents.is_empty() {
                contentless.push(r as u32);
            }
            for (c, content) in rule.contents.iter().enumerate() {
                let pr = PatternRef {
                    rule: r as u32,
                    content: c as u32,
                };
                if content.nocase {
                    ci.push((content.bytes.clone(), pr));
                } else {
                    cs.push((content.bytes.clone(), pr));
                }
            }
        }
        Ok(Ids {
            rules,
            cs: Matcher::build(cs, false)?,
            ci: Matcher::build(ci, true)?,
            contentless,
            hits: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn start_states(&self) -> (u32, u32) {
        (
            self.cs.as_ref().map(|m| m.start.as_u32()).unwrap_or(0),
            self.ci.as_ref().map(|m| m.start.as_u32()).unwrap_or(0),
        )
    }

    /// Runs both automata over `bytes`, continuing from `scan`, collecting content matches
    /// that satisfy their offset and depth.
    fn scan(&mut self, scan: &mut Scan, bytes: &[u8]) {
        for (m, state) in [(&self.cs, &mut scan.cs), (&self.ci, &mut scan.ci)] {
            let Some(m) = m else { continue };
            let mut sid = StateID::new(*state as usize).unwrap_or(m.start);
            for (i, &b) in bytes.iter().enumerate() {
                sid = m.dfa.next_state(Anchored::No, sid, b);
                if m.dfa.is_match(sid) {
                    let end = scan.pos + i as u64 + 1;
                    for k in 0..m.dfa.match_len(sid) {
                        let pid = m.dfa.match_pattern(sid, k);
                        if let Some(pr) = m.patterns.get(pid.as_usize()) {
                            self.hits.push((*pr, end));
                        }
                    }
                }
            }
            *state = sid.as_u32();
        }
        scan.pos += bytes.len() as u64;
    }

    fn content_fits(&self, pr: PatternRef, end: u64) -> bool {
        let Some(c) = self
            .rules
            .get(pr.rule as usize)
            .and_then(|r| r.contents.get(pr.content as usize))
        else {
            return false;
        };
        let start = end.saturating_sub(c.bytes.len() as u64);
        let offset = c.offset.unwrap_or(0);
        start >= offset && c.depth.is_none_or(|d| end <= offset + d)
    }

    fn header_matches(&self, rule: &Rule, pkt: &PacketMut<'_>, dir: Dir, st: &IdsState) -> bool {
        let h = pkt.headers();
        let proto_ok = match rule.proto {
            RuleProto::Tcp => h.proto == proto::TCP,
            RuleProto::Udp => h.proto == proto::UDP,
            RuleProto::Icmp => h.proto == proto::ICMP || h.proto == proto::ICMPV6,
            RuleProto::Ip => true,
        };
        let v6 = h.l3 == L3::Ipv6;
        let fwd = rule.src.matches(&h.src_ip, v6)
            && rule.src_ports.matches(h.src_port)
            && rule.dst.matches(&h.dst_ip, v6)
            && rule.dst_ports.matches(h.dst_port);
        let rev = rule.bidirectional
            && rule.src.matches(&h.dst_ip, v6)
            && rule.src_ports.matches(h.dst_port)
            && rule.dst.matches(&h.src_ip, v6)
            && rule.dst_ports.matches(h.src_port);
        let dir_ok = match rule.flow.to_server {
            Some(true) => dir == Dir::Original,
            Some(false) => dir == Dir::Reply,
            None => true,
        };
        proto_ok && (fwd || rev) && dir_ok && (!rule.flow.established || st.established)
    }

    fn alert(&self, r: u32, pkt: &PacketMut<'_>, st: &mut IdsState, ctx: &mut NfContext<'_>) {
        if st.alerted.contains(&r) {
            return;
        }
        st.alerted.push(r);
        let rule = &self.rules[r as usize];
        ctx.count(ALERTS, 1);
        if !ctx.events_enabled() {
            return;
        }
        let h = pkt.headers();
        ctx.emit(
            "ids",
            serde_json::json!({
                "alert": rule.msg,
                "sid": rule.sid,
                "rev": rule.rev,
                "flow": ctx.key.to_string(),
                "flow_id": ctx.flow_id,
                "dir": match ctx.dir { Dir::Original => "to_server", Dir::Reply => "to_client" },
                "proto": h.proto,
                "ms": ctx.now_ms,
            }),
        );
    }
}

impl NetworkFunction for Ids {
    type State = IdsState;

    fn kind(&self) -> &'static str {
        "ids"
    }

    fn counters(&self) -> &'static [&'static str] {
        &["alerts", "stream_gaps"]
    }

    fn new_flow(&mut self, _pkt: &PacketMut<'_>, _ctx: &mut NfContext<'_>) -> IdsState {
        let (cs, ci) = self.start_states();
        let scan = Scan {
            cs,
            ci,
            ..Scan::default()
        };
        IdsState {
            scans: [scan.clone(), scan],
            states_valid: true,
            ..IdsState::default()
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut IdsState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        if !st.states_valid {
            let (cs, ci) = self.start_states();
            for s in &mut st.scans {
                s.cs = cs;
                s.ci = ci;
            }
            st.states_valid = true;
        }
        let side = match ctx.dir {
            Dir::Original => 0,
            Dir::Reply => 1,
        };
        let tcp = pkt.tcp();
        if let Some(t) = tcp {
            // Handshake: SYN from the initiator, SYN-ACK back, then the initiator's ACK.
            if t.flags & F::SYN != 0 {
                st.scans[side].stream.syn(t.seq);
                st.handshake |= if side == 0 { 1 } else { 2 };
            } else if side == 0 && st.handshake == 3 && t.flags & F::ACK != 0 {
                st.established = true;
            }
        }
        self.hits.clear();
        let payload = pkt.payload();
        if !payload.is_empty() {
            match tcp {
                Some(t) => {
                    self.scratch.clear();
                    let scratch = &mut self.scratch;
                    let gaps = st.scans[side].stream.gaps;
                    st.scans[side]
                        .stream
                        .segment(t.seq, payload, DEFAULT_WINDOW, |b| {
                            scratch.extend_from_slice(b)
                        });
                    ctx.count(STREAM_GAPS, st.scans[side].stream.gaps - gaps);
                    let bytes = std::mem::take(&mut self.scratch);
                    let mut scan = std::mem::take(&mut st.scans[side]);
                    self.scan(&mut scan, &bytes);
                    st.scans[side] = scan;
                    self.scratch = bytes;
                }
                None => {
                    // Each datagram on its own.
                    let (cs, ci) = self.start_states();
                    let mut scan = Scan {
                        cs,
                        ci,
                        ..Scan::default()
                    };
                    let mut bytes = std::mem::take(&mut self.scratch);
                    bytes.clear();
                    bytes.extend_from_slice(payload);
                    self.scan(&mut scan, &bytes);
                    self.scratch = bytes;
                }
            }
        }
        // Nothing matched and every rule needs a content: the common case, done.
        if self.hits.is_empty() && self.contentless.is_empty() {
            return Verdict::Pass;
        }
        // Contents found: record them, then see which rules are now complete.
        let hits = std::mem::take(&mut self.hits);
        let per_packet = tcp.is_none();
        let mut matched_now: Vec<u32> = Vec::new();
        for (pr, end) in &hits {
            if !self.content_fits(*pr, *end) {
                continue;
            }
            let tag = pr.rule << 16 | pr.content;
            if per_packet {
                if !matched_now.contains(&tag) {
                    matched_now.push(tag);
                }
            } else if !st.satisfied[side].contains(&tag) {
                st.satisfied[side].push(tag);
            }
        }
        self.hits = hits;
        let mut candidates: Vec<u32> = self
            .hits
            .iter()
            .map(|(pr, _)| pr.rule)
            .chain(self.contentless.iter().copied())
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        for r in candidates {
            if st.alerted.contains(&r) {
                continue;
            }
            let rule = &self.rules[r as usize];
            let have = if per_packet {
                &matched_now
            } else {
                &st.satisfied[side]
            };
            let complete = (0..rule.contents.len() as u32).all(|c| have.contains(&(r << 16 | c)));
            if complete && self.header_matches(rule, pkt, ctx.dir, st) {
                self.alert(r, pkt, st, ctx);
            }
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build as harness, tcp, udp, Harness};

    const C: ([u8; 4], u16) = ([10, 0, 0, 1], 40000);
    const S: ([u8; 4], u16) = ([10, 0, 0, 2], 80);

    fn ids(rules: &str) -> Harness {
        harness(build, &format!("kind = \"ids\"\nrules = [{rules}]")).unwrap()
    }

    fn open(h: &mut Harness) {
        h.feed(&tcp(C, S, F::SYN, 99, 0, b""));
        h.feed(&tcp(S, C, F::SYN | F::ACK, 499, 100, b""));
        h.feed(&tcp(C, S, F::ACK, 100, 500, b""));
    }

    const RULE: &str = r#"'alert tcp any any -> any 80 (msg:"passwd probe"; flow:to_server,established; content:"/etc/passwd"; nocase; sid:1000001; rev:2;)'"#;

    #[test]
    fn alerts_on_content_in_one_segment() {
        let mut h = ids(RULE);
        open(&mut h);
        h.feed(&tcp(
            C,
            S,
            F::ACK | F::PSH,
            100,
            500,
            b"GET /../ETC/PASSWD HTTP/1.1\r\n\r\n",
        ));
        assert_eq!(h.counter("alerts"), 1);
        assert_eq!(h.events.0[0]["sid"], 1000001);
        assert_eq!(h.events.0[0]["dir"], "to_server");
    }

    #[test]
    fn alerts_on_content_split_across_segments_even_out_of_order() {
        let mut h = ids(RULE);
        open(&mut h);
        let data = b"GET /etc/passwd HTTP/1.1\r\n\r\n";
        // "/etc/pa" | "sswd ..." with the second half arriving first.
        h.feed(&tcp(C, S, F::ACK, 100 + 11, 500, &data[11..]));
        assert_eq!(h.counter("alerts"), 0);
        h.feed(&tcp(C, S, F::ACK, 100, 500, &data[..11]));
        assert_eq!(h.counter("alerts"), 1);
        // Once per flow.
        h.feed(&tcp(
            C,
            S,
            F::ACK,
            100 + data.len() as u32,
            500,
            b"/etc/passwd",
        ));
        assert_eq!(h.counter("alerts"), 1);
    }

    #[test]
    fn silent_on_clean_traffic_and_the_wrong_direction() {
        let mut h = ids(RULE);
        open(&mut h);
        h.feed(&tcp(
            C,
            S,
            F::ACK,
            100,
            500,
            b"GET /index.html HTTP/1.1\r\n\r\n",
        ));
        // The content in the reply direction does not match a to_server rule.
        h.feed(&tcp(S, C, F::ACK, 500, 130, b"your /etc/passwd is safe"));
        assert_eq!(h.counter("alerts"), 0);
        // Before the handshake completes, `established` is not met.
        let mut h = ids(RULE);
        h.feed(&tcp(C, S, F::SYN, 0, 0, b""));
        h.feed(&tcp(C, S, F::ACK, 1, 0, b"/etc/passwd"));
        assert_eq!(h.counter("alerts"), 0);
    }

    #[test]
    fn offsets_depths_multiple_contents_and_udp() {
        let rules = r#"'alert tcp any any -> any any (msg:"m"; content:"AB"; offset:2; depth:4; content:"zz"; sid:7;)',
                       'alert udp any any -> any 53 (msg:"d"; content:"|de ad|"; sid:8;)'"#;
        let mut h = ids(rules);
        open(&mut h);
        h.feed(&tcp(C, S, F::ACK, 100, 500, b"ABxxzz"));
        assert_eq!(h.counter("alerts"), 0, "AB at 0 is before offset 2");
        let mut h = ids(rules);
        open(&mut h);
        h.feed(&tcp(C, S, F::ACK, 100, 500, b"xxAB"));
        assert_eq!(h.counter("alerts"), 0, "zz not seen yet");
        h.feed(&tcp(C, S, F::ACK, 104, 500, b"..zz"));
        assert_eq!(h.counter("alerts"), 1);
        let mut h = ids(rules);
        h.feed(&udp(
            ([10, 0, 0, 1], 5000),
            ([10, 0, 0, 2], 53),
            &[1, 0xde, 0xad, 2],
        ));
        assert_eq!(h.counter("alerts"), 1);
    }

    #[test]
    fn a_state_moved_from_elsewhere_restarts_the_automata() {
        let mut h = ids(RULE);
        open(&mut h);
        let saved = h.save(0).unwrap();
        h.restore(0, &saved).unwrap();
        h.feed(&tcp(C, S, F::ACK, 100, 500, b"/etc/passwd"));
        assert_eq!(h.counter("alerts"), 1);
    }
}
