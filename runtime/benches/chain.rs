//! One runtime core running firewall -> flow monitor -> load balancer on 64-byte packets of
//! many concurrent flows: Mpps on that core, and the platform's memory per flow.
//!
//! A harness thread on core 0 plays nfmgr and the vswitch: it feeds the runtime's input ring
//! and takes back what the runtime sends, restoring each packet from its flow's template
//! (the load balancer rewrites them) before sending it again. The runtime, on core 1, runs the
//! same engine as nf-runtime, busy-polling. Flows are visited in a shuffled order, so the
//! flow table is exercised as with real traffic rather than one hot entry.
//!
//! Prints one JSON line per flow count. `NF_BENCH_SMOKE=1` runs one short, small case.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nflib::buffer::Desc;
use nflib::endpoint::{Endpoint, BATCH};
use nflib::layout::RingId;
use nflib::local::LocalRegion;
use nflib::packet::build::UdpV4;
use nflib::pool::ManagerPool;
use nflib::ring::{Consumer, Producer};
use nflib::slot::ProcessKind;
use nflib::wire::EndpointAddr;

const CHAIN: &str = r#"
[[chain]]
name = "bench"
[[chain.nf]]
kind = "firewall"
default = "deny"
rules = [ { action = "deny", proto = "tcp", dst_port = 23 }, { action = "allow", proto = "udp" } ]
[[chain.nf]]
kind = "flow_monitor"
[[chain.nf]]
kind = "load_balancer"
vip = "10.200.0.1"
vip_mac = "02:00:00:00:02:01"
port = 80
backends = [
  { ip = "10.201.0.1", mac = "02:00:00:00:02:11" },
  { ip = "10.201.0.2", mac = "02:00:00:00:02:12" },
  { ip = "10.201.0.3", mac = "02:00:00:00:02:13" },
  { ip = "10.201.0.4", mac = "02:00:00:00:02:14" },
]
"#;

fn pin(core: usize) {
    // SAFETY: builds a CPU set and applies it to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// 64-byte UDP frames to the VIP, one per flow.
fn templates(flows: usize) -> Vec<[u8; 64]> {
    (0..flows)
        .map(|f| {
            let mut b = [0u8; 64];
            UdpV4 {
                src_mac: [2, 0, 0, 0, 1, 1],
                dst_mac: [2, 0, 0, 0, 2, 1],
                src_ip: (0x0a00_0000u32 + 1 + (f as u32 >> 14)).to_be_bytes(),
                dst_ip: [10, 200, 0, 1],
                src_port: 1024 + (f as u16 & 0x3fff),
                dst_port: 80,
                payload_len: 22,
            }
            .write(&mut b)
            .expect("64-byte frame");
            b
        })
        .collect()
}

struct Result {
    mpps: f64,
    platform_bytes_per_flow: f64,
    state_bytes_per_flow: f64,
    flows: usize,
}

fn run(flows: usize, seconds: f64) -> Result {
    let cfg_text = format!(
        "instance = \"bench\"\n[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt\"\nmax_flows = {}\n{CHAIN}",
        flows * 2
    );
    let rt_slot = 2u16;
    let local = LocalRegion::new(
        "chain",
        &cfg_text,
        &[(rt_slot, ProcessKind::Runtime, "rt")],
        |rc| {
            rc.slots = 3;
            rc.buffers = 16384;
            rc.data_ring_size = 2048;
            rc.msg_ring_size = 4096;
        },
    )
    .expect("region");
    let region = local.region.clone();
    let mut pool = ManagerPool::new(&region, 256);
    let tpl = templates(flows);
    // A shuffled visiting order (xorshift), the same for every round.
    let mut order: Vec<u32> = (0..flows as u32).collect();
    let mut x = 0x9e3779b97f4a7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let processed = Arc::new(AtomicU64::new(0));
    let (stop2, processed2, region2) = (stop.clone(), processed.clone(), region.clone());
    let cfg = local.config.clone();
    let worker = std::thread::spawn(move || {
        pin(1);
        let mut ep =
            Endpoint::attach(region2.path(), rt_slot, ProcessKind::Runtime).expect("attach");
        let mut rt = nf_runtime::from_region(&ep, &cfg).expect("runtime");
        let mut mb = nf_runtime::mailbox(&ep, &cfg);
        let mut batch = Vec::with_capacity(BATCH);
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let got = ep.recv_burst(&mut batch, BATCH);
            let now = rt.now_ms();
            rt.process_batch(&mut ep, &mut batch, now);
            rt.expire(&mut ep, now);
            rt.flush(&mut ep, &mut mb, nflib::time::mono_ns());
            n += got as u64;
            processed2.store(n, Ordering::Relaxed);
        }
        let mem = rt.platform_memory();
        let state = rt.state_memory();
        let live = rt.flows().len();
        rt.end_all();
        (mem, state, live)
    });

    // The harness: vswitch side (0 -> runtime) and nfmgr side (runtime -> 0).
    pin(0);
    let mut to_rt = Producer::new(
        region
            .ring::<Desc>(RingId::Data {
                from: 0,
                to: rt_slot,
            })
            .unwrap(),
    );
    let mut from_rt = Consumer::new(
        region
            .ring::<Desc>(RingId::Data {
                from: rt_slot,
                to: 0,
            })
            .unwrap(),
    );
    let mut msgs = Consumer::new(
        region
            .ring::<Desc>(RingId::Message {
                from: rt_slot,
                to: 0,
            })
            .unwrap(),
    );
    let mac = EndpointAddr::new(1, rt_slot).input_mac();
    let mut next = 0usize;
    let mut descs = [Desc::default(); 64];
    let send = |p: nflib::Packet, to_rt: &mut Producer<Desc>, next: &mut usize| {
        let f = order[*next] as usize;
        *next = (*next + 1) % order.len();
        let mut p = p;
        region.fill(&mut p, &tpl[f]);
        // As the vswitch does: address it to the runtime, keep the destination.
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&tpl[f][..6]);
        region.meta_of(&p).save_dst_mac(dst);
        region.data_mut(&mut p)[..6].copy_from_slice(&mac);
        // The harness keeps fewer buffers in flight than the ring holds.
        assert!(to_rt.push(p.into_desc()), "input ring full");
    };
    // Prime: as many buffers in flight as the ring holds, minus a margin.
    for _ in 0..1536 {
        let p = pool.alloc().expect("buffer");
        send(p, &mut to_rt, &mut next);
    }
    let warm_until = processed.load(Ordering::Relaxed) + 2 * flows as u64;
    let mut t0 = None;
    let mut c0 = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = from_rt.peek_burst(&mut descs);
        for d in &descs[..n] {
            if let Some(p) = region.claim(*d, rt_slot as u32, 0) {
                send(p, &mut to_rt, &mut next);
            }
        }
        from_rt.release(n);
        // Alias messages and pool service, as nfmgr's data plane does.
        let m = msgs.peek_burst(&mut descs);
        for d in &descs[..m] {
            if let Some(p) = region.claim(*d, rt_slot as u32, 0) {
                pool.free(p);
            }
        }
        msgs.release(m);
        pool.service(rt_slot, true);
        let done = processed.load(Ordering::Relaxed);
        if t0.is_none() && done >= warm_until {
            t0 = Some(Instant::now());
            c0 = done;
        }
        if let Some(t) = t0 {
            if t.elapsed().as_secs_f64() >= seconds {
                let mpps = (done - c0) as f64 / t.elapsed().as_secs_f64() / 1e6;
                stop.store(true, Ordering::Relaxed);
                let (mem, state, live) = worker.join().expect("runtime thread");
                drop(local);
                return Result {
                    mpps,
                    platform_bytes_per_flow: mem as f64 / live.max(1) as f64,
                    state_bytes_per_flow: state as f64 / live.max(1) as f64,
                    flows: live,
                };
            }
        }
        assert!(Instant::now() < deadline, "benchmark stalled");
    }
}

fn main() {
    let smoke = std::env::var("NF_BENCH_SMOKE").is_ok();
    let only: Option<usize> = std::env::var("NF_BENCH_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok());
    let cases: Vec<(usize, f64)> = match (smoke, only) {
        (_, Some(f)) => vec![(f, 3.0)],
        (true, None) => vec![(10_000, 0.5)],
        (false, None) => vec![(10_000, 3.0), (100_000, 3.0), (1_000_000, 3.0)],
    };
    let repeat = if smoke || only.is_some() { 1 } else { 3 };
    for &(flows, secs) in &cases {
        let mut runs: Vec<Result> = (0..repeat).map(|_| run(flows, secs)).collect();
        runs.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
        let med = &runs[runs.len() / 2];
        println!(
            "{{\"bench\":\"runtime_chain\",\"chain\":\"firewall,flow_monitor,load_balancer\",\"flows\":{flows},\"live_flows\":{},\"runs\":{repeat},\"mpps\":{:.3},\"mpps_min\":{:.3},\"mpps_max\":{:.3},\"platform_bytes_per_flow\":{:.0},\"nf_state_bytes_per_flow\":{:.0}}}",
            med.flows,
            med.mpps,
            runs[0].mpps,
            runs[runs.len() - 1].mpps,
            med.platform_bytes_per_flow,
            med.state_bytes_per_flow
        );
    }
}
