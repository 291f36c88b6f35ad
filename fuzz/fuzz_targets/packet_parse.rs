//! Anything a wire can carry: parse it, key it, complete its checksum, and apply every
//! rewrite a function may ask for. None of it may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nflib::flow::FlowKey;
use nflib::nf::PacketMut;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = nflib::packet::parse(data) {
        let _ = FlowKey::of(&h);
        let _ = nflib::packet::arp::parse(&h, data);
    }
    let mut copy = data.to_vec();
    let _ = nflib::packet::complete_l4_checksum(&mut copy);
    let mut room = data.to_vec();
    room.resize(data.len() + 64, 0);
    if let Ok(mut p) = PacketMut::new(&mut room, data.len()) {
        let _ = p.payload().len();
        let _ = p.tcp();
        p.set_src_ipv4([192, 0, 2, 1]);
        p.set_dst_ipv4([198, 51, 100, 2]);
        p.set_src_port(1234);
        p.set_dst_port(80);
        p.set_icmp_echo_id(7);
        p.answer_arp([10, 0, 0, 1], [2, 0, 0, 0, 0, 1]);
        let _ = p.reparse();
    }
});
