//! HTTP/1.x parser: requests (from the flow's initiator) and responses are parsed across TCP
//! segment boundaries and out-of-order delivery; each request's method, host and URI and each
//! response's status are kept in the flow's state and written as one record when it ends.
//!
//! ```toml
//! [[chain.nf]]
//! kind = "http_parser"
//! ports = [80, 8080]        # only flows to these ports (default: every TCP flow)
//! ```
//!
//! Bodies are skipped by `Content-Length`; a chunked or unbounded body ends parsing of that
//! direction (the messages before it stay recorded). Header blocks above 16 KiB are a parse
//! error. The parser never blocks or drops traffic: it only observes.

use httparse::Status;
use nflib::nf::{
    tcp_flags as F, BuildError, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage,
    TypedStage, Verdict,
};
use nflib::stream::{Reassembler, DEFAULT_WINDOW};
use serde::{Deserialize, Serialize};

const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// Messages recorded per flow (later ones are counted, not kept).
const MAX_RECORDED: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    ports: Option<Vec<u16>>,
}

pub struct HttpParser {
    ports: Option<Vec<u16>>,
    /// Bytes delivered in order by a reassembler, before parsing (reused).
    scratch: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    Headers,
    /// Skipping this many body bytes.
    Body(u64),
    /// The rest of the direction is not followed (chunked, unbounded or broken).
    Stopped,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Side {
    stream: Reassembler,
    /// Header bytes not yet parsed.
    buf: Vec<u8>,
    phase: Phase,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    pub host: Option<String>,
    pub uri: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpState {
    /// Whether this flow is parsed at all (port filter).
    pub active: bool,
    sides: [Side; 2],
    pub requests: Vec<Request>,
    pub statuses: Vec<u16>,
    pub messages_not_recorded: u64,
    pub parse_errors: u64,
}

const REQUESTS: usize = 1;
const RESPONSES: usize = 2;
const PARSE_ERRORS: usize = 3;
const STREAM_GAPS: usize = 4;

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
    let s: Settings = spec.settings()?;
    Ok(TypedStage::boxed(HttpParser {
        ports: s.ports,
        scratch: Vec::new(),
    }))
}

enum Parsed {
    Request(Request, u64),
    Response(u16, Phase),
}

/// Parses one message head from `buf`: the bytes it used and what it was, `Ok(None)` if the
/// head is incomplete.
fn parse_head(buf: &[u8], request: bool) -> Result<Option<(usize, Parsed)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let header_value = |hs: &[httparse::Header<'_>], name: &str| {
        hs.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let length = |hs: &[httparse::Header<'_>]| -> Result<Option<u64>, ()> {
        match header_value(hs, "content-length") {
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| ()),
            None => Ok(None),
        }
    };
    let chunked = |hs: &[httparse::Header<'_>]| {
        header_value(hs, "transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false)
    };
    if request {
        let mut r = httparse::Request::new(&mut headers);
        match r.parse(buf) {
            Ok(Status::Complete(n)) => {
                let hs = &r.headers[..];
                let req = Request {
                    method: r.method.unwrap_or("").to_string(),
                    host: header_value(hs, "host"),
                    uri: r.path.unwrap_or("").to_string(),
                };
                let body = if chunked(hs) {
                    u64::MAX
                } else {
                    length(hs)?.unwrap_or(0)
                };
                Ok(Some((n, Parsed::Request(req, body))))
            }
            Ok(Status::Partial) => Ok(None),
            Err(_) => Err(()),
        }
    } else {
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(buf) {
            Ok(Status::Complete(n)) => {
                let hs = &r.headers[..];
                let code = r.code.unwrap_or(0);
                let phase = if (100..200).contains(&code) || code == 204 || code == 304 {
                    Phase::Headers
                } else if chunked(hs) {
                    Phase::Stopped
                } else {
                    match length(hs)? {
                        Some(0) => Phase::Headers,
                        Some(l) => Phase::Body(l),
                        // No length: the body runs until the connection closes.
                        None => Phase::Stopped,
                    }
                };
                Ok(Some((n, Parsed::Response(code, phase))))
            }
            Ok(Status::Partial) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

impl HttpState {
    /// Consumes in-order bytes of one direction.
    fn feed(&mut self, side: usize, mut data: &[u8], ctx: &mut NfContext<'_>) {
        let request = side == 0;
        loop {
            let s = &mut self.sides[side];
            match s.phase {
                Phase::Stopped => {
                    s.buf.clear();
                    return;
                }
                Phase::Body(left) => {
                    let from_buf = (left as usize).min(s.buf.len());
                    s.buf.drain(..from_buf);
                    let mut left = left - from_buf as u64;
                    let take = (left.min(data.len() as u64)) as usize;
                    data = &data[take..];
                    left -= take as u64;
                    if left > 0 {
                        s.phase = Phase::Body(left);
                        return;
                    }
                    s.phase = Phase::Headers;
                }
                Phase::Headers => {
                    let room = MAX_HEADER_BLOCK.saturating_sub(s.buf.len());
                    let take = room.min(data.len());
                    s.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if s.buf.is_empty() {
                        return;
                    }
                    match parse_head(&s.buf, request) {
                        Ok(Some((n, parsed))) => {
                            s.buf.drain(..n);
                            match parsed {
                                Parsed::Request(req, body) => {
                                    s.phase = match body {
                                        0 => Phase::Headers,
                                        u64::MAX => Phase::Stopped,
                                        b => Phase::Body(b),
                                    };
                                    ctx.count(REQUESTS, 1);
                                    if self.requests.len() < MAX_RECORDED {
                                        self.requests.push(req);
                                    } else {
                                        self.messages_not_recorded += 1;
                                    }
                                }
                                Parsed::Response(code, phase) => {
                                    s.phase = phase;
                                    ctx.count(RESPONSES, 1);
                                    if self.statuses.len() < MAX_RECORDED {
                                        self.statuses.push(code);
                                    } else {
                                        self.messages_not_recorded += 1;
                                    }
                                }
                            }
                        }
                        Ok(None) if s.buf.len() < MAX_HEADER_BLOCK => return,
                        _ => {
                            s.phase = Phase::Stopped;
                            self.parse_errors += 1;
                            ctx.count(PARSE_ERRORS, 1);
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl NetworkFunction for HttpParser {
    type State = HttpState;

    fn kind(&self) -> &'static str {
        "http_parser"
    }

    fn counters(&self) -> &'static [&'static str] {
        &["requests", "responses", "parse_errors", "stream_gaps"]
    }

    fn new_flow(&mut self, pkt: &PacketMut<'_>, _ctx: &mut NfContext<'_>) -> HttpState {
        let active = pkt.tcp().is_some()
            && self
                .ports
                .as_ref()
                .is_none_or(|p| p.contains(&pkt.headers().dst_port));
        HttpState {
            active,
            ..HttpState::default()
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut HttpState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        if !st.active {
            return Verdict::Pass;
        }
        let Some(t) = pkt.tcp() else {
            return Verdict::Pass;
        };
        let side = match ctx.dir {
            Dir::Original => 0,
            Dir::Reply => 1,
        };
        if t.flags & F::SYN != 0 {
            st.sides[side].stream.syn(t.seq);
        }
        let payload = pkt.payload();
        if payload.is_empty() {
            return Verdict::Pass;
        }
        self.scratch.clear();
        let scratch = &mut self.scratch;
        let gaps_before = st.sides[side].stream.gaps;
        st.sides[side]
            .stream
            .segment(t.seq, payload, DEFAULT_WINDOW, |b| {
                scratch.extend_from_slice(b)
            });
        ctx.count(STREAM_GAPS, st.sides[side].stream.gaps - gaps_before);
        if !self.scratch.is_empty() {
            let bytes = std::mem::take(&mut self.scratch);
            st.feed(side, &bytes, ctx);
            self.scratch = bytes;
        }
        Verdict::Pass
    }

    fn end_flow(&mut self, st: HttpState, ctx: &mut NfContext<'_>) {
        if !ctx.events_enabled()
            || !st.active
            || (st.requests.is_empty() && st.statuses.is_empty() && st.parse_errors == 0)
        {
            return;
        }
        ctx.emit(
            "http_parser",
            serde_json::json!({
                "flow": ctx.key.to_string(),
                "flow_id": ctx.flow_id,
                "requests": st.requests.iter().map(|r| serde_json::json!({
                    "method": r.method, "host": r.host, "uri": r.uri,
                })).collect::<Vec<_>>(),
                "statuses": st.statuses,
                "not_recorded": st.messages_not_recorded,
                "parse_errors": st.parse_errors,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build as harness, tcp};
    use nflib::nf::tcp_flags as F;

    const C: ([u8; 4], u16) = ([10, 0, 0, 1], 40000);
    const S: ([u8; 4], u16) = ([10, 0, 0, 2], 80);

    #[test]
    fn requests_and_responses_across_segments_and_out_of_order() {
        let mut h = harness(build, "kind = \"http_parser\"").unwrap();
        h.feed(&tcp(C, S, F::SYN, 999, 0, b""));
        h.feed(&tcp(S, C, F::SYN | F::ACK, 4999, 1000, b""));
        let req = b"GET /files/a.bin HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n";
        // The request split in three, the middle piece arriving last.
        h.feed(&tcp(C, S, F::ACK, 1000, 5000, &req[..10]));
        h.feed(&tcp(C, S, F::ACK, 1000 + 30, 5000, &req[30..]));
        h.feed(&tcp(C, S, F::ACK, 1000 + 10, 5000, &req[10..30]));
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        h.feed(&tcp(S, C, F::ACK, 5000, 1000 + req.len() as u32, resp));
        // A second request on the same connection, with a body.
        let req2 = b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc";
        h.feed(&tcp(
            C,
            S,
            F::ACK,
            1000 + req.len() as u32,
            5000 + resp.len() as u32,
            req2,
        ));
        h.end_all();
        let r = &h.events.0[0];
        assert_eq!(r["requests"][0]["method"], "GET");
        assert_eq!(r["requests"][0]["uri"], "/files/a.bin");
        assert_eq!(r["requests"][0]["host"], "example.test");
        assert_eq!(r["requests"][1]["method"], "POST");
        assert_eq!(r["statuses"], serde_json::json!([200]));
        assert_eq!(h.counter("requests"), 2);
        assert_eq!(h.counter("parse_errors"), 0);
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        let mut h = harness(build, "kind = \"http_parser\"").unwrap();
        h.feed(&tcp(C, S, F::SYN, 0, 0, b""));
        h.feed(&tcp(C, S, F::ACK, 1, 0, b"\x00\x01\x02 not http\r\n\r\n"));
        assert_eq!(h.counter("parse_errors"), 1);
        let mut h = harness(build, "kind = \"http_parser\"\nports = [8080]").unwrap();
        h.feed(&tcp(C, S, F::SYN, 0, 0, b""));
        h.feed(&tcp(C, S, F::ACK, 1, 0, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(h.counter("requests"), 0, "port 80 is not parsed");
    }
}
