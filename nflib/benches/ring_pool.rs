//! Ring and pool micro-benchmarks over a real shared region (in /dev/shm).
//!
//! - ring, two cores: a producer thread on core 0 and a consumer thread on core 1 move
//!   16-byte descriptors through one SPSC ring, in bursts of 1, 8 and 32;
//! - ring, one core: enqueue a burst then dequeue it, on one thread (cost without transfer);
//! - pool: nfmgr's free stack (alloc a burst, free it) and a process's cache (alloc, free).
//!
//! Prints one JSON object per result. `NF_BENCH_SMOKE=1` shortens every run (CI).
//! Compare against DPDK's `ring_perf_autotest` (scripts/bench/run.sh runs both).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nflib::buffer::Desc;
use nflib::layout::{RegionConfig, RingId};
use nflib::pool::{ManagerPool, PoolCache};
use nflib::region::{CreateOptions, Region};
use nflib::ring::{Consumer, Producer};

fn pin(core: usize) {
    // SAFETY: builds a CPU set and applies it to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn cpu_mhz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Runs `f` (which returns operations done and seconds taken) `repeat` times and prints the
/// median with the spread.
fn measure(
    bench: &str,
    mode: &str,
    batch: usize,
    repeat: usize,
    mut f: impl FnMut() -> (u64, f64),
) {
    let mut ns: Vec<f64> = (0..repeat)
        .map(|_| {
            let (ops, secs) = f();
            secs * 1e9 / ops as f64
        })
        .collect();
    ns.sort_by(|a, b| a.total_cmp(b));
    let med = ns[ns.len() / 2];
    let cyc = cpu_mhz() / 1000.0;
    println!(
        "{{\"bench\":\"{bench}\",\"mode\":\"{mode}\",\"batch\":{batch},\"runs\":{repeat},\"mops\":{:.2},\"ns_per_op\":{:.2},\"cycles_per_op\":{:.2},\"cycles_min\":{:.2},\"cycles_max\":{:.2}}}",
        1e3 / med,
        med,
        med * cyc,
        ns[0] * cyc,
        ns[ns.len() - 1] * cyc
    );
}

fn region() -> (Region, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!("/dev/shm/nflib-bench-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let r = Region::create(&CreateOptions {
        path: path.clone(),
        config: RegionConfig {
            slots: 3,
            ports: 0,
            buffers: 65536,
            data_ring_size: 1024,
            pool_ring_size: 1024,
            ..RegionConfig::default()
        },
        instance: "bench".into(),
        page_size: 4096,
        hugetlbfs: false,
    })
    .expect("create region in /dev/shm");
    r.mark_ready();
    (r, path)
}

fn ring_two_cores(r: &Region, batch: usize, total: u64) -> (u64, f64) {
    let ring = RingId::Data { from: 1, to: 2 };
    let mut p = Producer::new(r.ring::<Desc>(ring).unwrap());
    let mut c = Consumer::new(r.ring::<Desc>(ring).unwrap());
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let consumer = std::thread::spawn(move || {
        pin(1);
        while !go2.load(Ordering::Acquire) {}
        let mut out = vec![Desc::default(); batch];
        let mut got = 0u64;
        let mut check = 0u32;
        while got < total {
            let n = c.pop_burst(&mut out);
            for d in &out[..n] {
                assert_eq!(d.buf, check);
                check = check.wrapping_add(1);
            }
            got += n as u64;
        }
    });
    pin(0);
    let items: Vec<Desc> = (0..batch).map(|_| Desc::default()).collect();
    let mut items = items;
    let start = Instant::now();
    go.store(true, Ordering::Release);
    let mut sent = 0u64;
    let mut v = 0u32;
    while sent < total {
        let n = batch.min((total - sent) as usize);
        for d in items[..n].iter_mut() {
            d.buf = v;
            v = v.wrapping_add(1);
        }
        let mut off = 0;
        while off < n {
            off += p.push_burst(&items[off..n]);
        }
        sent += n as u64;
    }
    consumer.join().unwrap();
    (total, start.elapsed().as_secs_f64())
}

fn ring_one_core(r: &Region, batch: usize, total: u64) -> (u64, f64) {
    pin(0);
    let ring = RingId::Data { from: 2, to: 1 };
    let mut p = Producer::new(r.ring::<Desc>(ring).unwrap());
    let mut c = Consumer::new(r.ring::<Desc>(ring).unwrap());
    let items = vec![Desc::default(); batch];
    let mut out = vec![Desc::default(); batch];
    let start = Instant::now();
    let mut done = 0u64;
    while done < total {
        p.push_burst(&items);
        done += c.pop_burst(&mut out) as u64;
    }
    (total, start.elapsed().as_secs_f64())
}

fn pool_manager(r: &Region, batch: usize, rounds: u64) -> (u64, f64) {
    pin(0);
    let mut pool = ManagerPool::new(r, 0);
    let mut held = Vec::with_capacity(batch);
    let start = Instant::now();
    for _ in 0..rounds {
        pool.alloc_burst(batch, &mut held);
        for p in held.drain(..) {
            pool.free(p);
        }
    }
    // One op = one allocation plus its free.
    (rounds * batch as u64, start.elapsed().as_secs_f64())
}

fn pool_cache(r: &Region, batch: usize, rounds: u64) -> (u64, f64) {
    pin(0);
    let mut pool = ManagerPool::new(r, 512);
    pool.service(1, true);
    let mut cache = PoolCache::new(r, 1, 64).unwrap();
    let mut held = Vec::with_capacity(batch);
    let start = Instant::now();
    for _ in 0..rounds {
        for _ in 0..batch {
            match cache.alloc() {
                Some(p) => held.push(p),
                None => break,
            }
        }
        for p in held.drain(..) {
            cache.free(p);
        }
        // nfmgr takes back what was recycled and tops up, as its data plane does.
        pool.service(1, true);
    }
    let secs = start.elapsed().as_secs_f64();
    cache.flush();
    pool.service(1, false);
    (rounds * batch as u64, secs)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is expected.
    let smoke = std::env::var("NF_BENCH_SMOKE").is_ok();
    let (scale, repeat): (u64, usize) = if smoke { (1, 1) } else { (10, 5) };
    let (r, path) = region();
    for batch in [1usize, 8, 32] {
        measure("ring", "two_cores", batch, repeat, || {
            ring_two_cores(&r, batch, 1_000_000 * scale)
        });
    }
    measure("ring", "one_core", 32, repeat, || {
        ring_one_core(&r, 32, 2_000_000 * scale)
    });
    // Each pool run starts from a fresh pool over the same region (all buffers free).
    measure("pool", "manager_stack", 32, repeat, || {
        pool_manager(&r, 32, 100_000 * scale)
    });
    measure("pool", "process_cache", 32, repeat, || {
        pool_cache(&r, 32, 100_000 * scale)
    });
    drop(r);
    let _ = std::fs::remove_file(path);
}
