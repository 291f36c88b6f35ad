//! The SPSC ring across real processes: a producer process and this (consumer) process map
//! the same region at different addresses. Checks exact, in-order delivery, and that a
//! producer killed with SIGKILL in the middle of its bursts leaves the ring consistent for a
//! replacement producer, with nothing lost, duplicated or half-written.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nf_shm::buffer::Desc;
use nf_shm::layout::{RegionConfig, RingId};
use nf_shm::region::{CreateOptions, Region};
use nf_shm::ring::{Consumer, Producer};

const RING: RingId = RingId::Data { from: 1, to: 2 };

/// Runs only when spawned by the tests below: produces values equal to their ring index.
#[test]
fn child_producer() {
    let Ok(path) = std::env::var("NFLIB_RING_CHILD") else {
        return;
    };
    let count: u64 = std::env::var("NFLIB_RING_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let region = Region::attach(std::path::Path::new(&path)).expect("attach");
    let mut p = Producer::new(region.ring::<Desc>(RING).expect("ring"));
    // Values equal ring indices: a replacement resumes from the published index.
    let start = p.published() as u64;
    let mut next = start;
    let end = start.saturating_add(count);
    let mut burst = 1usize;
    while next < end {
        let n = burst.min((end - next) as usize);
        let items: Vec<Desc> = (0..n)
            .map(|i| Desc {
                buf: (next + i as u64) as u32,
                meta: !((next + i as u64) as u32),
                ..Desc::default()
            })
            .collect();
        let pushed = p.push_burst(&items);
        next += pushed as u64;
        burst = burst % 31 + 1;
        if pushed == 0 {
            std::thread::yield_now();
        }
    }
}

fn region(tag: &str) -> (Region, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/nflib-ringproc-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let r = Region::create(&CreateOptions {
        path: path.clone(),
        config: RegionConfig {
            slots: 3,
            ports: 0,
            buffers: 16,
            data_ring_size: 64,
            ..RegionConfig::default()
        },
        instance: "ringproc".into(),
        page_size: 4096,
        hugetlbfs: false,
    })
    .unwrap();
    r.mark_ready();
    (r, path)
}

fn spawn_producer(path: &std::path::Path, count: Option<u64>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "child_producer",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("NFLIB_RING_CHILD", path);
    if let Some(n) = count {
        c.env("NFLIB_RING_COUNT", n.to_string());
    }
    c.spawn().expect("spawn producer")
}

/// Consumes until `until` values have been seen or `deadline`, checking each is the next.
fn consume(c: &mut Consumer<Desc>, expected: &mut u64, until: u64, deadline: Instant) {
    let mut out = [Desc::default(); 32];
    while *expected < until && Instant::now() < deadline {
        let n = c.pop_burst(&mut out);
        for d in &out[..n] {
            assert_eq!(d.buf as u64, *expected, "out of order or lost");
            assert_eq!(d.meta, !d.buf, "half-written descriptor");
            *expected += 1;
        }
        if n == 0 {
            std::thread::yield_now();
        }
    }
}

#[test]
fn a_million_descriptors_cross_processes_in_order() {
    let (r, path) = region("order");
    let mut c = Consumer::new(r.ring::<Desc>(RING).unwrap());
    let mut child = spawn_producer(&path, Some(1_000_000));
    let mut expected = 0;
    consume(
        &mut c,
        &mut expected,
        1_000_000,
        Instant::now() + Duration::from_secs(120),
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(expected, 1_000_000);
    assert!(c.is_empty());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_producer_killed_mid_burst_leaves_the_ring_consistent() {
    let (r, path) = region("kill");
    let mut c = Consumer::new(r.ring::<Desc>(RING).unwrap());
    let mut expected = 0;
    for round in 0..5 {
        // Unbounded producer, killed after a while at an arbitrary point in its loop.
        let mut child = spawn_producer(&path, None);
        let target = expected + 20_000;
        consume(
            &mut c,
            &mut expected,
            target,
            Instant::now() + Duration::from_secs(60),
        );
        // SAFETY: kills our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        child.wait().unwrap();
        // Whatever it published is intact and in order; nothing half-written shows up.
        let mut out = [Desc::default(); 32];
        loop {
            let n = c.pop_burst(&mut out);
            if n == 0 {
                break;
            }
            for d in &out[..n] {
                assert_eq!(d.buf as u64, expected, "round {round}");
                assert_eq!(d.meta, !d.buf, "round {round}: half-written descriptor");
                expected += 1;
            }
        }
    }
    // A replacement producer carries on from the published index.
    let mut child = spawn_producer(&path, Some(10_000));
    let target = expected + 10_000;
    consume(
        &mut c,
        &mut expected,
        target,
        Instant::now() + Duration::from_secs(60),
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(expected, target);
    std::fs::remove_file(path).unwrap();
}
