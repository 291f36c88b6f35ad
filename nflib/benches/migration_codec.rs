//! What encoding and decoding migration's bulk messages costs per flow: `MigrateInit`
//! (step 1), `SetRuntime` (step 2) and `MigrateState` (step 3) for a group of 256 flows,
//! with flow states the size of firewall -> flow monitor's.
//!
//! Prints one JSON line per message. `NF_BENCH_SMOKE=1` runs a few iterations only.

use std::hint::black_box;
use std::time::Instant;

use nflib::flow::{family, FlowKey};
use nflib::frame::EndpointAddr;
use nflib::msg::{states, FlowState, Message, MigrateFlow};

const GROUP: usize = 256;

fn key(i: usize) -> FlowKey {
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a[..4].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
    b[..4].copy_from_slice(&[10, 1, 0, 1]);
    FlowKey {
        a,
        b,
        a_port: 1024 + (i % 50_000) as u16,
        b_port: 9,
        vlan: 0,
        proto: 17,
        family: family::IPV4,
        fragment: false,
    }
}

fn messages() -> Vec<(&'static str, Message)> {
    let init = Message::MigrateInit {
        group: 7,
        chain: Some("main".into()),
        vswitch: EndpointAddr::new(1, 1),
        flows: (0..GROUP)
            .map(|i| MigrateFlow {
                key: key(i),
                aliases: Vec::new(),
            })
            .collect(),
    };
    let set = Message::SetRuntime {
        keys: (0..GROUP).map(key).collect(),
        from: EndpointAddr::new(1, 2),
        runtime: EndpointAddr::new(1, 3),
        request: 7,
    };
    // A firewall's verdict and a flow monitor's counters, laid out as a flow's states.
    let mut states = Vec::new();
    let mut lens = Vec::new();
    for _ in 0..GROUP {
        let start = states.len();
        states::push(&mut states, |out| {
            out.extend_from_slice(&[1, 0, 3]);
            true
        });
        states::push(&mut states, |out| {
            out.extend((0..40).map(|b| b as u8));
            true
        });
        lens.push((states.len() - start) as u32);
    }
    let state = Message::MigrateState {
        group: 7,
        accepted_digest: nflib::msg::keys_digest(&(0..GROUP).map(key).collect::<Vec<_>>()),
        flows: (0..GROUP)
            .map(|i| FlowState {
                idx: i as u32,
                flags: 1,
                age_ms: 12_345,
                idle_ms: 20,
                missing: 0,
                states_len: lens[i],
                home: nflib::frame::EndpointAddr::new(1, 3),
            })
            .collect(),
        states,
    };
    vec![
        ("MigrateInit", init),
        ("SetRuntime", set),
        ("MigrateState", state),
    ]
}

fn main() {
    let smoke = std::env::var_os("NF_BENCH_SMOKE").is_some();
    let iters = if smoke { 10 } else { 2_000 };
    for (name, msg) in messages() {
        let mut buf = Vec::new();
        msg.encode(&mut buf).unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            msg.encode(&mut buf).unwrap();
            black_box(&buf);
        }
        let enc = t.elapsed().as_nanos() as f64 / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            black_box(Message::decode(black_box(&buf)).unwrap());
        }
        let dec = t.elapsed().as_nanos() as f64 / iters as f64;
        println!(
            "{{\"bench\": \"migration codec\", \"message\": \"{name}\", \"flows\": {GROUP}, \"bytes\": {}, \"encode_ns_per_flow\": {:.1}, \"decode_ns_per_flow\": {:.1}}}",
            buf.len(),
            enc / GROUP as f64,
            dec / GROUP as f64
        );
    }
}
