//! Alias commit through a real region: a NAT flow's first packet waits until the vswitch
//! (played here by nfmgr's side of the rings) confirms the translated reply key, leaves when
//! it does, and is dropped with its flow when the key is refused; a refusal for a flow that
//! has ended since changes nothing, and a stray flow under a key a translation needs gives
//! it up.

use nf_runtime::liaison::Liaison;
use nflib::endpoint::Endpoint;
use nflib::flow::FlowKey;
use nflib::frame::EndpointAddr;
use nflib::layout::RingId;
use nflib::local::{LocalManager, LocalRegion};
use nflib::msg::Message;
use nflib::packet::build::UdpV4;
use nflib::ring::{Consumer, Producer};
use nflib::slot::ProcessKind;
use nflib::stats::ProcCounter;
use nflib::Desc;

const RT: u16 = 2;
const EXTERNAL: [u8; 4] = [192, 0, 2, 1];
const SERVER: [u8; 4] = [8, 8, 8, 8];

struct Bed {
    mgr: LocalManager,
    ep: Endpoint,
    rt: nf_runtime::Runtime,
    mb: nflib::mailbox::Mailbox,
    liaison: Liaison,
    to_rt: Producer<Desc>,
    from_rt: Consumer<Desc>,
    batch: Vec<(u16, nflib::Packet)>,
    /// Last: the region outlives what maps it.
    local: LocalRegion,
}

fn bed(tag: &str) -> Bed {
    let cfg = format!(
        r#"
[[vswitch]]
name = "vs"
[[runtime]]
name = "rt"
chain = "nat"
alias_wait_ms = 60000
[[chain]]
name = "nat"
[[chain.nf]]
kind = "nat"
external_ip = "{}.{}.{}.{}"
external_mac = "02:4e:41:54:00:01"
internal = "10.0.0.0/8"
"#,
        EXTERNAL[0], EXTERNAL[1], EXTERNAL[2], EXTERNAL[3]
    );
    let local = LocalRegion::new(tag, &cfg, &[(RT, ProcessKind::Runtime, "rt")], |_| {}).unwrap();
    let mut mgr = LocalManager::new(&local);
    mgr.service();
    let ep = Endpoint::attach(local.path(), RT, ProcessKind::Runtime).unwrap();
    let rt = nf_runtime::from_region(&ep, &local.config).unwrap();
    let mb = nf_runtime::mailbox(&ep, &local.config);
    let r = &local.region;
    let ring = |from, to| r.ring::<Desc>(RingId::Data { from, to }).unwrap();
    Bed {
        to_rt: Producer::new(ring(0, RT)),
        from_rt: Consumer::new(ring(RT, 0)),
        mgr,
        ep,
        rt,
        mb,
        liaison: Liaison::default(),
        batch: Vec::new(),
        local,
    }
}

impl Bed {
    /// Gives the runtime a UDP packet (as the vswitch would) and runs a loop turn.
    fn packet(&mut self, src: ([u8; 4], u16), dst: ([u8; 4], u16)) {
        let mut frame = [0u8; 128];
        let len = UdpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: EndpointAddr::new(self.local.config.cluster.server_id, RT).input_mac(),
            src_ip: src.0,
            dst_ip: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            payload_len: 8,
        }
        .write(&mut frame)
        .unwrap();
        let mut p = self.mgr.pool.alloc().unwrap();
        self.local.region.fill(&mut p, &frame[..len]);
        assert!(self.to_rt.push(p.into_desc()));
        self.turn();
    }

    /// One turn of the runtime's loop: messages, packets, flush.
    fn turn(&mut self) {
        let now_ns = nflib::time::mono_ns();
        nf_runtime::serve_messages(
            &mut self.ep,
            &mut self.rt,
            &mut self.liaison,
            &mut self.mb,
            &mut nf_runtime::Backlog::default(),
            now_ns,
        );
        self.ep.recv_burst(&mut self.batch, 32);
        let now = self.rt.now_ms();
        let mut io = nf_runtime::io::ShmIo {
            ep: &mut self.ep,
            mb: &mut self.mb,
        };
        self.rt.process_batch(&mut io, &mut self.batch, now);
        self.rt.flush(&mut io, nflib::time::mono_ns());
    }

    /// Frames the runtime sent on, with their source ports.
    fn sent(&mut self) -> Vec<u16> {
        let mut ports = Vec::new();
        let mut descs = [Desc::default(); 32];
        loop {
            let n = self.from_rt.peek_burst(&mut descs);
            if n == 0 {
                return ports;
            }
            for d in &descs[..n] {
                let p = self.local.region.claim(*d, u32::from(RT), 0).unwrap();
                let h = nflib::packet::parse(self.local.region.data(&p)).unwrap();
                ports.push(h.src_port);
                self.mgr.pool.free(p);
            }
            self.from_rt.release(n);
        }
    }

    /// The `AddAliases` the runtime sent (after letting it run until one came).
    fn alias_request(&mut self) -> (Vec<(FlowKey, u64)>, u64) {
        for _ in 0..1000 {
            for env in self.mgr.receive() {
                if let Message::AddAliases { aliases, request } = env.msg {
                    return (aliases, request);
                }
            }
            self.turn();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no AddAliases");
    }

    /// Answers as the vswitch and lets the runtime take it in.
    fn answer(&mut self, request: u64, refused: Vec<(FlowKey, u64)>) {
        self.mgr
            .send(RT, &Message::AliasesAdded { request, refused });
        for _ in 0..20 {
            self.turn();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn counter(&mut self, c: ProcCounter) -> u64 {
        self.ep.counters().get(c as usize)
    }
}

fn reply_key(port: u16) -> FlowKey {
    FlowKey::from_tuple(
        4,
        17,
        0,
        (FlowKey::v4(SERVER), 53),
        (FlowKey::v4(EXTERNAL), port),
    )
    .0
}

#[test]
fn a_translated_flows_packet_leaves_once_its_reply_key_is_confirmed() {
    let mut b = bed("aliases");

    // Flow A: held until the vswitch answers.
    b.packet(([10, 0, 0, 1], 1000), (SERVER, 53));
    let (aliases, request) = b.alias_request();
    assert_ne!(request, 0, "a packet waits: an answer is asked for");
    assert_eq!(aliases.len(), 1);
    let (key_a, flow_a) = aliases[0];
    assert!(b.sent().is_empty(), "held");
    b.answer(request, Vec::new());
    let ports = b.sent();
    assert_eq!(ports.len(), 1, "confirmed: the packet left");
    let first = ports[0];
    assert_eq!(key_a, reply_key(first));
    assert_eq!(b.rt.flows().len(), 1);

    // Flow B: its reply key is refused: the packet is dropped and the flow ends.
    b.packet(([10, 0, 0, 1], 1001), (SERVER, 53));
    let (aliases, request) = b.alias_request();
    let (key_b, flow_b) = aliases[0];
    assert_ne!(flow_b, flow_a);
    b.answer(request, vec![(key_b, flow_b)]);
    assert!(b.sent().is_empty(), "refused: dropped");
    assert_eq!(b.rt.flows().len(), 1, "flow B ended");
    assert_eq!(b.counter(ProcCounter::AliasesRefused), 1);

    // Flow C: a refusal naming another flow (one that ended since) changes nothing.
    b.packet(([10, 0, 0, 1], 1002), (SERVER, 53));
    let (aliases, request) = b.alias_request();
    let (key_c, flow_c) = aliases[0];
    b.answer(request, vec![(key_c, flow_c + 1000)]);
    assert_eq!(b.sent().len(), 1, "flow C's packet left");
    assert_eq!(b.rt.flows().len(), 2);
    assert_eq!(b.counter(ProcCounter::AliasesRefused), 1);

    // A stray packet from outside to the port the next translation will take starts a flow
    // of its own; the translation takes the key from it.
    let next = first + 3;
    b.packet((SERVER, 53), (EXTERNAL, next));
    assert_eq!(
        b.sent().len(),
        1,
        "the stray passes (the NAT has no mapping for it)"
    );
    assert_eq!(b.rt.flows().len(), 3);
    b.packet(([10, 0, 0, 2], 2000), (SERVER, 53));
    let (aliases, request) = b.alias_request();
    assert_eq!(aliases[0].0, reply_key(next));
    assert_eq!(b.counter(ProcCounter::StraysTakenOver), 1);
    assert_eq!(
        b.rt.flows().len(),
        3,
        "the stray ended, the new flow holds its key"
    );
    b.answer(request, Vec::new());
    assert_eq!(b.sent(), vec![next]);
    // The reply comes back under the alias to the new flow, translated.
    b.packet((SERVER, 53), (EXTERNAL, next));
    assert_eq!(b.sent(), vec![53]);
    assert_eq!(b.rt.flows().len(), 3);
}
