//! Actor frames arrive from other servers and other processes: parsing, authenticating,
//! decoding and feeding them to the reliable transport must never panic, whatever the bytes,
//! and a transport fed garbage must keep working.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nflib::msg::Message;
use nflib::reliable::{Transport, TransportConfig};
use nflib::frame::{self, auth, DataEncap, EndpointAddr, Frame};

fuzz_target!(|data: &[u8]| {
    // The input is a sequence of frames, each after a two-byte little-endian length, as
    // they would reach endpoint 2/3 one after another, a millisecond apart.
    let me = EndpointAddr::new(2, 3);
    let mut transport = Transport::new(me, 77, TransportConfig::default());
    let key = auth::FrameKey::derive(b"the fuzzing cluster key");
    let mut now = 1_000_000_000u64;
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let bytes = &rest[2..2 + n];
        rest = &rest[2 + n..];
        let _ = DataEncap::parse(bytes);
        let _ = auth::check_tag(&key, bytes);
        if let Ok(frame) = Frame::parse(bytes) {
            let _ = auth::verify(&key, &frame);
            let _ = Message::decode(frame.payload);
            transport.handle(&frame, now, &mut |d| {
                let _ = Message::decode(d.payload);
            });
        }
        now += 1_000_000;
        let mut buf = vec![0u8; 2048];
        transport.poll_transmit(now, &mut |h, p| {
            // What the transport sends must always be a frame that parses back.
            let n = frame::write_frame(&mut buf, h, p).expect("own frames fit");
            assert!(Frame::parse(&buf[..n]).is_ok());
            true
        });
        let _ = transport.take_events();
    }
});
