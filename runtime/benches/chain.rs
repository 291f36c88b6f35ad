//! One runtime core running firewall -> flow monitor -> load balancer on 64-byte packets of
//! many concurrent flows: Mpps on that core, and the platform's memory per flow.
//!
//! A harness plays nfmgr and the vswitch: it feeds the runtime's input ring and takes back
//! what the runtime sends, rewriting each packet for the next flow (the load balancer
//! rewrites them) before sending it again. Flows are visited in a random order that is new
//! every round, so neither the flow table nor the functions' states see a friendly pattern.
//!
//! Two modes:
//! - timed (the default): the harness on core 0, the runtime engine on core 1 busy-polling,
//!   as nf-runtime runs it; Mpps over a fixed time after a warm-up.
//! - counted (`NF_BENCH_MODE=count`): one thread alternates harness and runtime over a
//!   fixed number of packets, and the runtime's share of the work runs inside
//!   `measured_step`, so `valgrind --tool=callgrind --toggle-collect='*measured_step*'`
//!   counts exactly the instructions (and simulated cache misses) the runtime spends per
//!   packet. Repeatable to the instruction on a shared machine, where wall-clock figures
//!   swing by a third (`scripts/bench/ab.py` uses it).
//!
//! Environment: `NF_BENCH_FLOWS` (one flow count), `NF_BENCH_SECONDS` (timed, per run),
//! `NF_BENCH_RUNS`, `NF_BENCH_ROUNDS` (counted: rounds of every flow measured, after three
//! warm-up rounds), `NF_BENCH_CHAIN=none` (no functions: the harness and rings alone, the
//! ceiling this bench can show), `NF_BENCH_SMOKE=1` (one short, small case).
//! Prints one JSON line per flow count.

use nf_runtime::io::ShmIo;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nflib::buffer::Desc;
use nflib::endpoint::{Endpoint, BATCH};
use nflib::frame::EndpointAddr;
use nflib::layout::RingId;
use nflib::local::LocalRegion;
use nflib::packet::build::UdpV4;
use nflib::pool::ManagerPool;
use nflib::ring::{Consumer, Producer};
use nflib::slot::ProcessKind;
use nflib::Region;

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

const RT_SLOT: u16 = 2;

fn pin(core: usize) {
    // SAFETY: builds a CPU set and applies it to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A flow's source address and port (every flow sends to the VIP, port 80).
fn flow_source(f: usize) -> ([u8; 4], u16) {
    (
        (0x0a00_0000u32 + 1 + (f as u32 >> 14)).to_be_bytes(),
        1024 + (f as u16 & 0x3fff),
    )
}

/// Flow 0's 64-byte UDP frame to the VIP: every packet is this frame with its flow's source
/// written in (`Frames::write`).
fn base_frame() -> [u8; 64] {
    let mut b = [0u8; 64];
    let (src_ip, src_port) = flow_source(0);
    UdpV4 {
        src_mac: [2, 0, 0, 0, 1, 1],
        dst_mac: [2, 0, 0, 0, 2, 1],
        src_ip,
        dst_ip: [10, 200, 0, 1],
        src_port,
        dst_port: 80,
        payload_len: 22,
    }
    .write(&mut b)
    .expect("64-byte frame");
    b
}

/// Offsets in the base frame (Ethernet, IPv4 without options, UDP).
const IP_CSUM: usize = 24;
const SRC_IP: usize = 26;
const DST_IP: usize = 30;
const SRC_PORT: usize = 34;
const UDP_CSUM: usize = 40;

/// Writes a flow's packet over a buffer the runtime sent back: the fields the chain may have
/// rewritten (destination address; the destination MAC, which the harness addresses to the
/// runtime anyway) and the fields that name the flow, with both checksums updated from the
/// base frame's. A per-flow copy of the whole frame would be a cache miss per packet on the
/// harness's core at a million flows (64 MB of templates), and the harness must stay faster
/// than the runtime it measures.
struct Frames {
    base: [u8; 64],
    ip_csum: u16,
    udp_csum: u16,
}

impl Frames {
    fn new() -> Frames {
        let base = base_frame();
        let at = |i: usize| u16::from_be_bytes([base[i], base[i + 1]]);
        Frames {
            base,
            ip_csum: at(IP_CSUM),
            udp_csum: at(UDP_CSUM),
        }
    }

    fn write(&self, frame: &mut [u8], f: usize, rt_mac: [u8; 6]) {
        use nflib::packet::checksum::{update16, update32};
        let (ip, port) = flow_source(f);
        let (base_ip, base_port) = flow_source(0);
        let ip_csum = update32(self.ip_csum, base_ip, ip);
        let udp_csum = update16(update32(self.udp_csum, base_ip, ip), base_port, port);
        frame[..6].copy_from_slice(&rt_mac);
        frame[IP_CSUM..IP_CSUM + 2].copy_from_slice(&ip_csum.to_be_bytes());
        frame[SRC_IP..SRC_IP + 4].copy_from_slice(&ip);
        frame[DST_IP..DST_IP + 4].copy_from_slice(&self.base[DST_IP..DST_IP + 4]);
        frame[SRC_PORT..SRC_PORT + 2].copy_from_slice(&port.to_be_bytes());
        frame[UDP_CSUM..UDP_CSUM + 2].copy_from_slice(&udp_csum.to_be_bytes());
    }
}

fn with_chain() -> bool {
    std::env::var("NF_BENCH_CHAIN").map_or(true, |v| v != "none")
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The order flows are visited in: a random permutation (xorshift, shuffled once), walked
/// with a stride coprime to the flow count that changes every round, so every round visits
/// every flow once, in an order no round repeats, and no packet waits for a reshuffle (a
/// million-flow shuffle paused the harness for milliseconds a round, starving the runtime).
struct Order {
    order: Vec<u32>,
    /// Position in `order`, the stride, and packets left in the round.
    at: usize,
    step: usize,
    left: usize,
    x: u64,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Order {
    fn new(flows: usize) -> Order {
        let mut o = Order {
            order: (0..flows as u32).collect(),
            at: 0,
            step: 1,
            left: flows,
            x: 0x9e37_79b9_7f4a_7c15,
        };
        for i in (1..o.order.len()).rev() {
            let r = o.random();
            o.order.swap(i, (r % (i as u64 + 1)) as usize);
        }
        o
    }

    fn random(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }

    fn next(&mut self) -> usize {
        let n = self.order.len();
        if self.left == 0 {
            // A new round: a new stride, coprime with n so the walk visits every flow.
            self.left = n;
            self.step = loop {
                let s = 1 + (self.random() % n as u64) as usize;
                if gcd(s, n) == 1 {
                    break s;
                }
            };
        }
        self.left -= 1;
        let f = self.order[self.at] as usize;
        self.at += self.step;
        if self.at >= n {
            self.at -= n;
        }
        f
    }
}

/// nfmgr's and the vswitch's side: templates, the rings to and from the runtime, the pool.
struct Harness {
    region: Region,
    pool: ManagerPool,
    frames: Frames,
    order: Order,
    to_rt: Producer<Desc>,
    from_rt: Consumer<Desc>,
    msgs: Consumer<Desc>,
    mac: [u8; 6],
    descs: [Desc; BATCH],
}

impl Harness {
    fn new(region: &Region, flows: usize) -> Harness {
        let ring = |from, to| RingId::Data { from, to };
        Harness {
            region: region.clone(),
            pool: ManagerPool::new(region, 256),
            frames: Frames::new(),
            order: Order::new(flows),
            to_rt: Producer::new(region.ring::<Desc>(ring(0, RT_SLOT)).expect("ring")),
            from_rt: Consumer::new(region.ring::<Desc>(ring(RT_SLOT, 0)).expect("ring")),
            msgs: Consumer::new(
                region
                    .ring::<Desc>(RingId::Message {
                        from: RT_SLOT,
                        to: 0,
                    })
                    .expect("ring"),
            ),
            mac: EndpointAddr::new(1, RT_SLOT).input_mac(),
            descs: [Desc::default(); BATCH],
        }
    }

    /// Writes the next flow's packet over `p` and sends it to the runtime, addressed as the
    /// vswitch addresses it (the runtime's MAC, the frame's own destination saved aside).
    fn send(&mut self, mut p: nflib::Packet) {
        let f = self.order.next();
        self.frames.write(self.region.data_mut(&mut p), f, self.mac);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&self.frames.base[..6]);
        self.region.meta_of(&p).save_dst_mac(dst);
        // The harness keeps fewer buffers in flight than the ring holds.
        assert!(self.to_rt.push(p.into_desc()), "input ring full");
    }

    fn prime(&mut self, n: usize) {
        for _ in 0..n {
            let mut p = self.pool.alloc().expect("buffer");
            self.region.fill(&mut p, &self.frames.base);
            self.send(p);
        }
    }

    /// Sends back what the runtime returned; frees its messages; serves the pool.
    fn turn(&mut self) -> usize {
        let n = self.from_rt.peek_burst(&mut self.descs);
        for i in 0..n {
            if let Some(p) = self.region.claim(self.descs[i], RT_SLOT as u32, 0) {
                self.send(p);
            }
        }
        self.from_rt.release(n);
        // Alias messages and pool service, as nfmgr's data plane does.
        let m = self.msgs.peek_burst(&mut self.descs);
        for i in 0..m {
            if let Some(p) = self.region.claim(self.descs[i], RT_SLOT as u32, 0) {
                self.pool.free(p);
            }
        }
        self.msgs.release(m);
        self.pool.service(RT_SLOT, true);
        n
    }
}

struct RunResult {
    mpps: f64,
    /// Share of the runtime's loop time spent on bursts that had packets: below 1, the
    /// harness, not the runtime, set the rate.
    busy: f64,
    /// Packets per second of that busy time: what the runtime core does when always fed.
    capacity_mpps: f64,
    platform_bytes_per_flow: f64,
    state_bytes_per_flow: f64,
    flows: usize,
}

/// The bench's region. Flows never time out: under valgrind a round of a million flows takes
/// minutes, longer than the default timeouts. No vswitch answers alias requests here, so
/// packets do not wait for the answer (`alias_wait_ms = 0`; builds from before alias
/// commit, which the A/B script runs too, do not know the key and get the rest).
fn local_region(flows: usize) -> LocalRegion {
    let chain = if with_chain() { CHAIN } else { "" };
    let make = |extra: &str| {
        let cfg_text = format!(
            "instance = \"bench\"\n[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt\"\nmax_flows = {}\nidle_timeout_s = 86400\nunreplied_timeout_s = 86400\n{extra}{chain}",
            flows * 2
        );
        LocalRegion::new(
            "chain",
            &cfg_text,
            &[(RT_SLOT, ProcessKind::Runtime, "rt")],
            |rc| {
                rc.slots = 3;
                rc.buffers = 16384;
                rc.data_ring_size = 2048;
                rc.msg_ring_size = 4096;
            },
        )
    };
    make("alias_wait_ms = 0\n")
        .or_else(|_| make(""))
        .expect("region")
}

/// The runtime's work on one burst, as nf-runtime's loop does it.
#[inline(always)]
fn runtime_step(
    ep: &mut Endpoint,
    rt: &mut nf_runtime::Runtime,
    mb: &mut nflib::mailbox::Mailbox,
    batch: &mut Vec<(u16, nflib::Packet)>,
) -> usize {
    let got = ep.recv_burst(batch, BATCH);
    let now = rt.now_ms();
    let mut io = ShmIo { ep, mb };
    rt.process_batch(&mut io, batch, now);
    rt.expire(&mut io, now);
    rt.flush(&mut io, nflib::time::mono_ns());
    got
}

/// `runtime_step` for the counted part of a counted run: callgrind collects inside this
/// function only. (The warm-up inlines `runtime_step` instead of calling a twin of this
/// function: the compiler merges identical functions into one symbol.)
#[inline(never)]
fn measured_step(
    ep: &mut Endpoint,
    rt: &mut nf_runtime::Runtime,
    mb: &mut nflib::mailbox::Mailbox,
    batch: &mut Vec<(u16, nflib::Packet)>,
) -> usize {
    runtime_step(ep, rt, mb, batch)
}

fn run_timed(flows: usize, seconds: f64) -> RunResult {
    let local = local_region(flows);
    let region = local.region.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let processed = Arc::new(AtomicU64::new(0));
    let busy_ns = Arc::new(AtomicU64::new(0));
    let (stop2, processed2, busy_ns2, region2) = (
        stop.clone(),
        processed.clone(),
        busy_ns.clone(),
        region.clone(),
    );
    let cfg = local.config.clone();
    let worker = std::thread::spawn(move || {
        pin(1);
        let mut ep =
            Endpoint::attach(region2.path(), RT_SLOT, ProcessKind::Runtime).expect("attach");
        let mut rt = nf_runtime::from_region(&ep, &cfg).expect("runtime");
        let mut mb = nf_runtime::mailbox(&ep, &cfg);
        let mut batch = Vec::with_capacity(BATCH);
        let (mut n, mut busy) = (0u64, 0u64);
        let epoch = Instant::now();
        let mut t = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let got = runtime_step(&mut ep, &mut rt, &mut mb, &mut batch) as u64;
            let now = epoch.elapsed().as_nanos() as u64;
            if got > 0 {
                n += got;
                busy += now - t;
                busy_ns2.store(busy, Ordering::Relaxed);
                processed2.store(n, Ordering::Relaxed);
            }
            t = now;
        }
        let mem = rt.platform_memory();
        let state = rt.state_memory();
        let live = rt.flows().len();
        rt.end_all(&mut ShmIo {
            ep: &mut ep,
            mb: &mut mb,
        });
        (mem, state, live)
    });

    pin(0);
    let mut h = Harness::new(&region, flows);
    // Prime: as many buffers in flight as the ring holds, minus a margin.
    h.prime(1536);
    let warm_until = processed.load(Ordering::Relaxed) + 2 * flows as u64;
    let mut t0 = None;
    let (mut c0, mut b0) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut turns = 0u32;
    loop {
        h.turn();
        // The clock costs more than a turn on some VMs: look at it every 64 turns.
        turns = turns.wrapping_add(1);
        if turns % 64 != 0 {
            continue;
        }
        let done = processed.load(Ordering::Relaxed);
        if t0.is_none() && done >= warm_until {
            t0 = Some(Instant::now());
            c0 = done;
            b0 = busy_ns.load(Ordering::Relaxed);
        }
        if let Some(t) = t0 {
            let elapsed = t.elapsed().as_secs_f64();
            if elapsed >= seconds {
                let mpps = (done - c0) as f64 / elapsed / 1e6;
                let busy = (busy_ns.load(Ordering::Relaxed) - b0) as f64 / 1e9;
                stop.store(true, Ordering::Relaxed);
                let (mem, state, live) = worker.join().expect("runtime thread");
                drop(h);
                drop(local);
                return RunResult {
                    mpps,
                    busy: (busy / elapsed).min(1.0),
                    capacity_mpps: (done - c0) as f64 / busy.max(1e-9) / 1e6,
                    platform_bytes_per_flow: mem as f64 / live.max(1) as f64,
                    state_bytes_per_flow: state as f64 / live.max(1) as f64,
                    flows: live,
                };
            }
        }
        assert!(Instant::now() < deadline, "benchmark stalled");
    }
}

/// The counted mode: one thread, three warm-up rounds over every flow, then `rounds` measured.
fn run_counted(flows: usize, rounds: usize) {
    let local = local_region(flows);
    let region = local.region.clone();
    let mut ep = Endpoint::attach(region.path(), RT_SLOT, ProcessKind::Runtime).expect("attach");
    let mut rt = nf_runtime::from_region(&ep, &local.config).expect("runtime");
    let mut mb = nf_runtime::mailbox(&ep, &local.config);
    let mut batch = Vec::with_capacity(BATCH);
    let mut h = Harness::new(&region, flows);
    // A burst's worth in flight, so every step sees a full burst.
    h.prime(BATCH);
    let mut done = 0u64;
    let warm = 3 * flows as u64;
    while done < warm {
        done += runtime_step(&mut ep, &mut rt, &mut mb, &mut batch) as u64;
        h.turn();
    }
    let start = done;
    let end = warm + (rounds * flows) as u64;
    let mut runtime_time = Duration::ZERO;
    while done < end {
        let t = Instant::now();
        done += measured_step(&mut ep, &mut rt, &mut mb, &mut batch) as u64;
        runtime_time += t.elapsed();
        h.turn();
    }
    // The runtime's own time per packet, on one core with the harness's writes still in its
    // cache: an optimistic bound, meaningless under valgrind.
    println!(
        "{{\"bench\":\"runtime_chain_counted\",\"chain\":\"{}\",\"flows\":{flows},\"live_flows\":{},\"measured_packets\":{},\"runtime_ns_per_packet\":{:.1},\"platform_bytes_per_flow\":{:.0}}}",
        if with_chain() { "firewall,flow_monitor,load_balancer" } else { "none" },
        rt.flows().len(),
        done - start,
        runtime_time.as_nanos() as f64 / (done - start).max(1) as f64,
        rt.platform_memory() as f64 / rt.flows().len().max(1) as f64,
    );
    rt.end_all(&mut ShmIo {
        ep: &mut ep,
        mb: &mut mb,
    });
}

fn main() {
    let smoke = std::env::var("NF_BENCH_SMOKE").is_ok();
    let only: Option<usize> = env_num("NF_BENCH_FLOWS");
    let counted = std::env::var("NF_BENCH_MODE").is_ok_and(|m| m == "count");
    let cases: Vec<usize> = match (smoke, only) {
        (_, Some(f)) => vec![f],
        (true, None) => vec![10_000],
        (false, None) => vec![10_000, 100_000, 1_000_000],
    };
    if counted {
        let rounds = env_num("NF_BENCH_ROUNDS").unwrap_or(1);
        for &flows in &cases {
            run_counted(flows, rounds);
        }
        return;
    }
    let secs = env_num("NF_BENCH_SECONDS").unwrap_or(if smoke { 0.5 } else { 3.0 });
    let repeat = env_num("NF_BENCH_RUNS").unwrap_or(if smoke || only.is_some() { 1 } else { 3 });
    for &flows in &cases {
        let mut runs: Vec<RunResult> = (0..repeat).map(|_| run_timed(flows, secs)).collect();
        runs.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
        let med = &runs[runs.len() / 2];
        println!(
            "{{\"bench\":\"runtime_chain\",\"chain\":\"{}\",\"flows\":{flows},\"live_flows\":{},\"runs\":{repeat},\"seconds\":{secs},\"mpps\":{:.3},\"mpps_min\":{:.3},\"mpps_max\":{:.3},\"runtime_busy\":{:.3},\"capacity_mpps\":{:.3},\"platform_bytes_per_flow\":{:.0},\"nf_state_bytes_per_flow\":{:.0}}}",
            if with_chain() { "firewall,flow_monitor,load_balancer" } else { "none" },
            med.flows,
            med.mpps,
            runs[0].mpps,
            runs[runs.len() - 1].mpps,
            med.busy,
            med.capacity_mpps,
            med.platform_bytes_per_flow,
            med.state_bytes_per_flow
        );
    }
}
