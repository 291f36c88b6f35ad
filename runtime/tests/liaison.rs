//! The runtime's liaison actor answers over real message rings in a real region.

use nf_runtime::liaison::Liaison;
use nflib::buffer::Desc;
use nflib::endpoint::Endpoint;
use nflib::layout::RingId;
use nflib::local::LocalRegion;
use nflib::msg::{self, Message};
use nflib::pool::ManagerPool;
use nflib::ring::{Consumer, Producer};
use nflib::slot::ProcessKind;

#[test]
fn ping_gets_pong_with_the_flow_count() {
    let local = LocalRegion::new(
        "liaison",
        "[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt\"\n",
        &[(2, ProcessKind::Runtime, "rt")],
        |_| {},
    )
    .unwrap();
    let region = &local.region;
    let mut pool = ManagerPool::new(region, 64);
    pool.service(2, true);
    let mut ep = Endpoint::attach(local.path(), 2, ProcessKind::Runtime).unwrap();
    let mut rt = nf_runtime::from_region(&ep).unwrap();
    let mut liaison = Liaison::default();

    // nfmgr (slot 0) sends a Ping.
    let mut buf = pool.alloc().unwrap();
    assert!(msg::encode(region, &mut buf, &Message::Ping { seq: 7 }));
    let mut to_rt = Producer::new(
        region
            .ring::<Desc>(RingId::Message { from: 0, to: 2 })
            .unwrap(),
    );
    assert!(to_rt.push(buf.into_desc()));

    let mut scratch = Vec::new();
    assert_eq!(
        nf_runtime::serve_messages(&mut ep, &mut rt, &mut liaison, &mut scratch),
        1
    );
    rt.flush(&mut ep);

    let mut from_rt = Consumer::new(
        region
            .ring::<Desc>(RingId::Message { from: 2, to: 0 })
            .unwrap(),
    );
    let mut out = [Desc::default(); 4];
    let n = from_rt.peek_burst(&mut out);
    assert_eq!(n, 1);
    let reply = region.claim(out[0], 2, 0).unwrap();
    from_rt.release(n);
    assert_eq!(
        msg::decode(region, &reply),
        Some(Message::Pong { seq: 7, flows: 0 })
    );
    pool.free(reply);
    assert_eq!(liaison.unknown, 0);
}
