//! Driving one function by hand in unit tests: build frames, keep per-flow state, feed
//! packets in either direction.

use nflib::flow::FlowKey;
use nflib::nf::{BuildError, Dir, EventSink, NfContext, NfSpec, PacketMut, Stage, Verdict};
use nflib::records::FlowRecords;
use nflib::stats::NF_COUNTERS;

/// A TCP/IPv4 frame.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload.len()];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[8, 0]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.0);
    ip[16..20].copy_from_slice(&dst.0);
    let c = nflib::packet::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut f[34..54];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f[54..].copy_from_slice(payload);
    nflib::packet::complete_l4_checksum(&mut f);
    f
}

/// A UDP/IPv4 frame.
pub fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 42 + payload.len()];
    let n = nflib::packet::build::UdpV4 {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: src.0,
        dst_ip: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        payload_len: payload.len(),
    }
    .write(&mut b)
    .unwrap();
    b[42..n].copy_from_slice(payload);
    nflib::packet::complete_l4_checksum(&mut b[..n]);
    b.truncate(n);
    b
}

/// Whether the frame's IP and transport checksums verify.
pub fn checksums_ok(f: &[u8]) -> bool {
    let h = nflib::packet::parse(f).unwrap();
    let l3 = h.l3_off as usize;
    if nflib::packet::checksum::checksum(&f[l3..l3 + 20]) != 0 {
        return false;
    }
    let mut copy = f.to_vec();
    let l4 = h.l4_off as usize;
    let field = if h.proto == 6 { 16 } else { 6 };
    let before = [copy[l4 + field], copy[l4 + field + 1]];
    nflib::packet::complete_l4_checksum(&mut copy);
    before == [copy[l4 + field], copy[l4 + field + 1]]
}

#[derive(Default)]
pub struct Records(pub Vec<serde_json::Value>);

impl EventSink for Records {
    fn emit(&mut self, _nf: &'static str, record: serde_json::Value) {
        self.0.push(record);
    }
}

/// One function and the flows it has seen, keyed like the runtime keys them.
pub struct Harness {
    pub stage: Box<dyn Stage>,
    /// The flows' states, as a runtime keeps them.
    pub records: FlowRecords,
    /// Each flow's key and its initiator (source address and port of its first packet).
    flows: Vec<(FlowKey, ([u8; 16], u16))>,
    /// Aliases registered by the function, with the flow they lead to.
    alias_map: Vec<(FlowKey, usize)>,
    pub counters: [u64; NF_COUNTERS],
    pub aliases: Vec<FlowKey>,
    pub events: Records,
}

/// Why a harness was not made: its settings' text, or the function's build.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
}

pub fn build(build: nflib::nf::NfFactory, settings: &str) -> Result<Harness, HarnessError> {
    build_for(build, settings, 0, 1)
}

pub fn build_for(
    build: nflib::nf::NfFactory,
    settings: &str,
    index: u32,
    count: u32,
) -> Result<Harness, HarnessError> {
    let table: toml::Table = toml::from_str(settings)?;
    let spec = NfSpec {
        settings: &table,
        key: "chain.test.nf[0]".into(),
        runtime_index: index,
        runtimes_in_chain: count,
        server_index: 0,
        servers: 1,
        base_dir: std::path::Path::new("."),
        runtime: "rt-test",
    };
    let mut stage = build(&spec)?;
    let mut records = FlowRecords::new();
    assert!(stage.attach(&mut records));
    Ok(Harness {
        stage,
        records,
        flows: Vec::new(),
        alias_map: Vec::new(),
        counters: [0; NF_COUNTERS],
        aliases: Vec::new(),
        events: Records::default(),
    })
}

impl Harness {
    /// Feeds a frame; returns the verdict and the frame as the function left it.
    pub fn feed(&mut self, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = frame.to_vec();
        buf.resize(2048, 0);
        let mut pkt = PacketMut::new(&mut buf, frame.len()).expect("test frame parses");
        let h = *pkt.headers();
        let (key, _) = FlowKey::of(&h);
        let src = (h.src_ip, h.src_port);
        let found = self.flows.iter().position(|(k, _)| *k == key).or_else(|| {
            self.alias_map
                .iter()
                .find(|(a, _)| *a == key)
                .map(|(_, s)| *s)
        });
        let new = found.is_none();
        let row = found.unwrap_or_else(|| {
            self.flows.push((key, src));
            self.flows.len() - 1
        });
        let dir = if src == self.flows[row].1 {
            Dir::Original
        } else {
            Dir::Reply
        };
        let fkey = self.flows[row].0;
        let mut added = Vec::new();
        let mut ctx = NfContext::new(
            0,
            dir,
            &fkey,
            row as u64,
            std::slice::from_mut(&mut self.counters),
            &mut added,
            &mut self.events,
        );
        // As the runtime's flow table does: the flow's record exists before the chain runs.
        self.records.reserve(row as u32 + 1);
        let v = self
            .stage
            .process(&mut self.records, row as u32, new, &mut pkt, &mut ctx);
        let n = pkt.len();
        for a in added {
            self.alias_map.push((a, row));
            self.aliases.push(a);
        }
        buf.truncate(n);
        (v, buf)
    }

    /// Ends every flow (as the runtime does at shutdown).
    pub fn end_all(&mut self) {
        for row in 0..self.flows.len() {
            let key = self.flows[row].0;
            let mut added = Vec::new();
            let mut ctx = NfContext::new(
                0,
                Dir::Original,
                &key,
                row as u64,
                std::slice::from_mut(&mut self.counters),
                &mut added,
                &mut self.events,
            );
            self.stage.end_flow(&mut self.records, row as u32, &mut ctx);
        }
    }

    /// The flow's state in `row`, serialised (as migration sends it).
    pub fn save(&self, row: u32) -> Option<Vec<u8>> {
        let mut v = Vec::new();
        self.stage
            .save_into(&self.records, row, &mut v)
            .then_some(v)
    }

    /// Installs a serialised state for the flow in `row` (the error is the stage's, postcard's).
    pub fn restore(&mut self, row: u32, bytes: &[u8]) -> Result<(), impl std::error::Error> {
        self.records.reserve(row + 1);
        self.stage.restore(&mut self.records, row, bytes)
    }

    /// Tells the function that a flow with this serialised state lives on in another
    /// runtime (`reserve`) or ended there (`!reserve`). The error is the stage's, postcard's.
    pub fn reserve_serialised(
        &mut self,
        bytes: &[u8],
        reserve: bool,
    ) -> Result<(), impl std::error::Error> {
        let (key, _) = FlowKey::from_tuple(0, 0, 0, ([0; 16], 0), ([0; 16], 0));
        let mut added = Vec::new();
        let mut ctx = NfContext::new(
            0,
            Dir::Original,
            &key,
            0,
            std::slice::from_mut(&mut self.counters),
            &mut added,
            &mut self.events,
        );
        self.stage.reserve_serialised(bytes, reserve, &mut ctx)
    }

    pub fn counter(&self, name: &str) -> u64 {
        let i = self
            .stage
            .counter_names()
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"));
        self.counters[i + 1]
    }
}
