//! A subset of the Snort/Suricata rule language:
//!
//! ```text
//! alert tcp $ANY any -> 10.0.0.0/8 [80,8080] (msg:"evil"; flow:to_server,established;
//!     content:"GET /evil"; nocase; offset:0; depth:64; content:"|0d 0a|"; sid:100001; rev:1;)
//! ```
//!
//! - action: `alert`;
//! - protocol: `tcp`, `udp`, `icmp` or `ip`;
//! - addresses: `any`, an address, a prefix, a `[list]`, each optionally negated with `!`;
//! - ports: `any`, `N`, `N:M`, `N:`, `:M`, a `[list]`, optionally negated;
//! - direction: `->` or `<>`;
//! - options: `msg`, `content` (with `|hex|` bytes and `\"`, `\\`, `\;` escapes) followed by its
//!   modifiers `nocase`, `offset`, `depth`; `flow` (`to_server`, `to_client`, `from_client`,
//!   `from_server`, `established`, `stateless`); `sid` (required), `rev`; and `classtype`,
//!   `priority`, `reference`, `metadata`, `gid`, accepted and ignored. Anything else is an
//!   error, so a rule never silently means less than it says.
//!
//! Lines that are empty or start with `#` are skipped. Errors name the line.

use nflib::net::{AddressError, Prefix};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleProto {
    Tcp,
    Udp,
    Icmp,
    Ip,
}

/// A list of (negated, prefix); empty means any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addrs(pub Vec<(bool, Prefix)>);

/// A list of (negated, first, last); empty means any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<(bool, u16, u16)>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub bytes: Vec<u8>,
    pub nocase: bool,
    /// Where the match may start, counted from the start of the stream (TCP) or payload.
    pub offset: Option<u64>,
    /// How many bytes from `offset` the match must lie within.
    pub depth: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowOpt {
    /// Some(true): only from the client (the flow's initiator); Some(false): only to it.
    pub to_server: Option<bool>,
    pub established: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub proto: RuleProto,
    pub src: Addrs,
    pub src_ports: Ports,
    pub bidirectional: bool,
    pub dst: Addrs,
    pub dst_ports: Ports,
    pub msg: String,
    pub contents: Vec<Content>,
    pub flow: FlowOpt,
    pub sid: u32,
    pub rev: u32,
}

/// A rules text refused ([`parse_rules`]): the line, and what is wrong with its rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule on line {line}: {error}")]
pub struct RulesError {
    pub line: usize,
    #[source]
    pub error: RuleError,
}

/// What is wrong with a rule; each carries the text at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("missing `(` before the options")]
    NoOpening,
    #[error("missing `)` after the options")]
    NoClosing,
    #[error("text after the closing `)`")]
    AfterOptions,
    /// The part before the options, which does not have its seven fields.
    #[error("header `{0}` must be: action proto src sport direction dst dport")]
    Header(String),
    #[error("action `{0}`: only `alert` is supported")]
    Action(String),
    #[error("protocol `{0}`: use tcp, udp, icmp or ip")]
    Protocol(String),
    #[error("direction `{0}`: use -> or <>")]
    Direction(String),
    #[error("unclosed list `{0}`")]
    UnclosedList(String),
    /// `!any` (or a negated variable, which means any).
    #[error("`!{0}` matches nothing")]
    NegatedAny(String),
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("`{0}` is not a port or range")]
    NotPort(String),
    #[error("port range `{0}` is reversed")]
    ReversedPorts(String),
    #[error("trailing backslash")]
    TrailingBackslash,
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    #[error("option `{0}` is not terminated by `;`")]
    UnterminatedOption(String),
    #[error("option `{0}` is not supported")]
    UnknownOption(String),
    /// An option that takes a value, without one.
    #[error("{0} needs a value")]
    NoValue(&'static str),
    #[error("expected a quoted string, got `{0}`")]
    NotQuoted(String),
    /// A content modifier before any content.
    #[error("`{0}` must follow a content")]
    NoContent(&'static str),
    #[error("negated content is not supported")]
    NegatedContent,
    #[error("unknown escape `\\{0}`")]
    UnknownEscape(char),
    #[error("unterminated |hex| bytes")]
    UnterminatedHex,
    #[error("`{0}` is not a hex byte")]
    NotHexByte(String),
    #[error("unescaped `\"` inside content")]
    UnescapedQuote,
    #[error("empty content")]
    EmptyContent,
    /// A numeric option (`offset`, `depth`, `sid`, `rev`) and its value.
    #[error("{option}: `{value}` is not a number")]
    NotNumber { option: &'static str, value: String },
    #[error("{0} out of range")]
    OutOfRange(&'static str),
    #[error("depth {0} is shorter than its content")]
    DepthShorterThanContent(u64),
    #[error("flow option `{0}` is not supported")]
    FlowOption(String),
    #[error("every rule needs a sid")]
    NoSid,
    #[error("flow:established applies to tcp rules")]
    EstablishedNotTcp,
}

impl Addrs {
    pub fn matches(&self, ip: &[u8; 16], v6: bool) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let positives: Vec<_> = self.0.iter().filter(|(neg, _)| !neg).collect();
        let in_pos = positives.is_empty() || positives.iter().any(|(_, p)| p.contains(ip, v6));
        let in_neg = self.0.iter().any(|(neg, p)| *neg && p.contains(ip, v6));
        in_pos && !in_neg
    }
}

impl Ports {
    pub fn matches(&self, port: u16) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let positives: Vec<_> = self.0.iter().filter(|(neg, _, _)| !neg).collect();
        let in_pos =
            positives.is_empty() || positives.iter().any(|(_, a, b)| (*a..=*b).contains(&port));
        let in_neg = self
            .0
            .iter()
            .any(|(neg, a, b)| *neg && (*a..=*b).contains(&port));
        in_pos && !in_neg
    }
}

/// Parses a rules text (one rule per line).
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, RulesError> {
    let mut rules = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        rules.push(parse_rule(line).map_err(|error| RulesError { line: i + 1, error })?);
    }
    Ok(rules)
}

fn split_list(s: &str) -> Result<Vec<&str>, RuleError> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| RuleError::UnclosedList(s.to_string()))?;
        Ok(inner.split(',').map(str::trim).collect())
    } else {
        Ok(vec![s])
    }
}

fn parse_addrs(s: &str) -> Result<Addrs, RuleError> {
    let mut out = Vec::new();
    for item in split_list(s)? {
        let (neg, item) = match item.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, item),
        };
        if item.eq_ignore_ascii_case("any") || item.starts_with('$') {
            // Variables are not expanded: `$HOME_NET` and friends mean any.
            if neg {
                return Err(RuleError::NegatedAny(item.to_string()));
            }
            continue;
        }
        out.push((neg, Prefix::parse(item)?));
    }
    Ok(Addrs(out))
}

fn parse_ports(s: &str) -> Result<Ports, RuleError> {
    let mut out = Vec::new();
    for item in split_list(s)? {
        let (neg, item) = match item.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, item),
        };
        if item.eq_ignore_ascii_case("any") || item.starts_with('$') {
            if neg {
                return Err(RuleError::NegatedAny(item.to_string()));
            }
            continue;
        }
        let num = |v: &str, default: u16| -> Result<u16, RuleError> {
            if v.is_empty() {
                Ok(default)
            } else {
                v.parse().map_err(|_| RuleError::NotPort(item.to_string()))
            }
        };
        let (a, b) = match item.split_once(':') {
            Some((a, b)) => (num(a, 0)?, num(b, u16::MAX)?),
            None => {
                let p = num(item, 0)?;
                (p, p)
            }
        };
        if a > b {
            return Err(RuleError::ReversedPorts(item.to_string()));
        }
        out.push((neg, a, b));
    }
    Ok(Ports(out))
}

/// Splits the option block at `;` outside quotes (honouring backslash escapes).
fn split_options(s: &str) -> Result<Vec<String>, RuleError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                match chars.next() {
                    Some(n) => cur.push(n),
                    None => return Err(RuleError::TrailingBackslash),
                }
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => {
                out.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(RuleError::UnterminatedQuote);
    }
    if !cur.trim().is_empty() {
        return Err(RuleError::UnterminatedOption(cur.trim().to_string()));
    }
    Ok(out)
}

fn unquote(v: &str) -> Result<&str, RuleError> {
    v.trim()
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .ok_or_else(|| RuleError::NotQuoted(v.to_string()))
}

/// The bytes of a content string: text, `|hex bytes|`, and `\"`, `\\`, `\;`, `\|` escapes.
pub fn content_bytes(s: &str) -> Result<Vec<u8>, RuleError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\' | ';' | '|' | ':')) => {
                    let mut b = [0u8; 4];
                    out.extend_from_slice(e.encode_utf8(&mut b).as_bytes());
                }
                other => return Err(RuleError::UnknownEscape(other.unwrap_or(' '))),
            },
            '|' => {
                let mut hex = String::new();
                loop {
                    match chars.next() {
                        Some('|') => break,
                        Some(h) => hex.push(h),
                        None => return Err(RuleError::UnterminatedHex),
                    }
                }
                for byte in hex.split_whitespace() {
                    let not_hex = || RuleError::NotHexByte(byte.to_string());
                    if byte.len() != 2 {
                        return Err(not_hex());
                    }
                    out.push(u8::from_str_radix(byte, 16).map_err(|_| not_hex())?);
                }
            }
            '"' => return Err(RuleError::UnescapedQuote),
            _ => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    if out.is_empty() {
        return Err(RuleError::EmptyContent);
    }
    Ok(out)
}

fn number(option: &'static str, v: &str) -> Result<u64, RuleError> {
    v.trim().parse().map_err(|_| RuleError::NotNumber {
        option,
        value: v.trim().to_string(),
    })
}

fn parse_rule(line: &str) -> Result<Rule, RuleError> {
    let open = line.find('(').ok_or(RuleError::NoOpening)?;
    let close = line.rfind(')').ok_or(RuleError::NoClosing)?;
    if close < open || !line[close + 1..].trim().is_empty() {
        return Err(RuleError::AfterOptions);
    }
    let header: Vec<&str> = line[..open].split_whitespace().collect();
    if header.len() != 7 {
        return Err(RuleError::Header(line[..open].trim().to_string()));
    }
    if header[0] != "alert" {
        return Err(RuleError::Action(header[0].to_string()));
    }
    let proto = match header[1].to_ascii_lowercase().as_str() {
        "tcp" => RuleProto::Tcp,
        "udp" => RuleProto::Udp,
        "icmp" => RuleProto::Icmp,
        "ip" => RuleProto::Ip,
        p => return Err(RuleError::Protocol(p.to_string())),
    };
    let bidirectional = match header[4] {
        "->" => false,
        "<>" => true,
        d => return Err(RuleError::Direction(d.to_string())),
    };
    let mut rule = Rule {
        proto,
        src: parse_addrs(header[2])?,
        src_ports: parse_ports(header[3])?,
        bidirectional,
        dst: parse_addrs(header[5])?,
        dst_ports: parse_ports(header[6])?,
        msg: String::new(),
        contents: Vec::new(),
        flow: FlowOpt::default(),
        sid: 0,
        rev: 1,
    };
    for opt in split_options(&line[open + 1..close])? {
        let opt = opt.trim();
        if opt.is_empty() {
            continue;
        }
        let (name, value) = match opt.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (opt, None),
        };
        let need = |what: &'static str| value.ok_or(RuleError::NoValue(what));
        let last = |r: &mut Rule, what: &'static str| -> Result<usize, RuleError> {
            r.contents
                .len()
                .checked_sub(1)
                .ok_or(RuleError::NoContent(what))
        };
        match name {
            "msg" => rule.msg = unquote(need("msg")?)?.replace("\\\"", "\""),
            "content" => {
                let v = need("content")?;
                if v.starts_with('!') {
                    return Err(RuleError::NegatedContent);
                }
                rule.contents.push(Content {
                    bytes: content_bytes(unquote(v)?)?,
                    nocase: false,
                    offset: None,
                    depth: None,
                });
            }
            "nocase" => {
                let i = last(&mut rule, "nocase")?;
                rule.contents[i].nocase = true;
            }
            "offset" => {
                let i = last(&mut rule, "offset")?;
                rule.contents[i].offset = Some(number("offset", need("offset")?)?);
            }
            "depth" => {
                let i = last(&mut rule, "depth")?;
                let d = number("depth", need("depth")?)?;
                if d < rule.contents[i].bytes.len() as u64 {
                    return Err(RuleError::DepthShorterThanContent(d));
                }
                rule.contents[i].depth = Some(d);
            }
            "flow" => {
                for part in need("flow")?.split(',').map(str::trim) {
                    match part {
                        "to_server" | "from_client" => rule.flow.to_server = Some(true),
                        "to_client" | "from_server" => rule.flow.to_server = Some(false),
                        "established" => rule.flow.established = true,
                        "stateless" => {}
                        other => return Err(RuleError::FlowOption(other.to_string())),
                    }
                }
            }
            "sid" => {
                rule.sid = u32::try_from(number("sid", need("sid")?)?)
                    .map_err(|_| RuleError::OutOfRange("sid"))?
            }
            "rev" => {
                rule.rev = u32::try_from(number("rev", need("rev")?)?)
                    .map_err(|_| RuleError::OutOfRange("rev"))?
            }
            "classtype" | "priority" | "reference" | "metadata" | "gid" => {}
            other => return Err(RuleError::UnknownOption(other.to_string())),
        }
    }
    if rule.sid == 0 {
        return Err(RuleError::NoSid);
    }
    if rule.proto != RuleProto::Tcp && rule.flow.established {
        return Err(RuleError::EstablishedNotTcp);
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_rule() {
        let r = parse_rules(
            r#"alert tcp any any -> [10.0.0.0/8,!10.9.0.0/16] [80,8000:8100] (msg:"bad \"thing\""; flow:to_server,established; content:"GET /x|0d 0a|"; nocase; offset:0; depth:100; content:"a\;b"; sid:42; rev:3; classtype:web;)"#,
        )
        .unwrap();
        let r = &r[0];
        assert_eq!(r.sid, 42);
        assert_eq!(r.rev, 3);
        assert_eq!(r.msg, "bad \"thing\"");
        assert_eq!(r.contents[0].bytes, b"GET /x\r\n");
        assert!(r.contents[0].nocase);
        assert_eq!(r.contents[0].depth, Some(100));
        assert_eq!(r.contents[1].bytes, b"a;b");
        assert_eq!(r.flow.to_server, Some(true));
        assert!(r.flow.established);
        assert!(r.dst_ports.matches(8050) && !r.dst_ports.matches(81));
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert!(r.dst.matches(&ip, false));
        ip[..4].copy_from_slice(&[10, 9, 2, 3]);
        assert!(!r.dst.matches(&ip, false));
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let text = "# comment\n\nalert tcp any any -> any any (msg:\"x\"; sid:1;)\nalert tcp any any -> any any (msg:\"x\"; content:\"a\"; pcre:\"/x/\"; sid:2;)";
        let e = parse_rules(text).unwrap_err();
        assert_eq!(e.line, 4);
        assert_eq!(e.error, RuleError::UnknownOption("pcre".into()));
        assert_eq!(
            e.to_string(),
            "rule on line 4: option `pcre` is not supported"
        );
        for (bad, why) in [
            ("alert tcp any any -> any any (msg:\"x\";)", "sid"),
            (
                "alert tcp any any -> any any (nocase; sid:1;)",
                "follow a content",
            ),
            ("drop tcp any any -> any any (sid:1;)", "only `alert`"),
            (
                "alert tcp any any -> any any (content:\"|4|\"; sid:1;)",
                "hex",
            ),
            ("alert tcp any any => any any (sid:1;)", "direction"),
            (
                "alert tcp any any -> any any (content:\"abc\"; sid:1)",
                "terminated",
            ),
            (
                "alert tcp any any -> any any (content:\"abc; sid:1;)",
                "unterminated",
            ),
            ("alert tcp any 90:80 -> any any (sid:1;)", "reversed"),
            (
                "alert udp any any -> any any (flow:established; sid:1;)",
                "tcp rules",
            ),
        ] {
            let e = parse_rules(bad).unwrap_err();
            assert!(e.error.to_string().contains(why), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "[ -~\\n]{0,200}") {
            let _ = parse_rules(&text);
        }

        #[test]
        fn never_panics_on_rule_shaped_text(opts in "[a-z:;\"|0-9 ,!\\\\]{0,80}") {
            let _ = parse_rules(&format!("alert tcp any any -> any any ({opts})"));
        }
    }
}
