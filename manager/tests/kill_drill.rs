//! `kill -9` of runtimes and the vswitch, 200 times under generator traffic: nfmgr keeps
//! running, replaces every process, and once traffic stops every buffer is back in the pool.

mod common;

use std::time::{Duration, Instant};

use common::Instance;
use nflib::slot::SlotState;

const KILLS: usize = 200;

#[test]
fn two_hundred_kills_leak_nothing() {
    let mut inst = Instance::new("kill");
    inst.start(
        r#"
[region]
buffers = 8192
[manager]
report = "report.json"
[supervisor]
restart = "always"
# Each process is killed as soon as it runs, 200 times: a crash loop to the supervisor,
# whose backoff this test is not about.
stable_after_ms = 0
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 64
rate_pps = 500
duration_ms = 5000
[[port]]
name = "sink0"
spec = "sink:"
"#,
    );
    let region = inst.region(Duration::from_secs(20));
    let targets = ["rt0", "vs0", "rt1"];
    inst.wait_for(&region, Duration::from_secs(20), "all running", |s| {
        targets.iter().all(|t| {
            s.process(t)
                .map(|p| p.state == SlotState::Running)
                .unwrap_or(false)
        })
    });
    let started = Instant::now();
    let mut under_traffic = 0;
    for i in 0..KILLS {
        let name = targets[(i * 7 + i / 3) % targets.len()];
        // Wait until the target runs, then kill it.
        let before = inst.wait_for(&region, Duration::from_secs(20), "target running", |s| {
            s.process(name)
                .map(|p| p.state == SlotState::Running && p.pid != 0)
                .unwrap_or(false)
        });
        let p = before.process(name).expect("target");
        let gen_done = before
            .port("gen0")
            .map(|g| g.counters["gen_done"] == 1)
            .unwrap_or(true);
        if !gen_done {
            under_traffic += 1;
        }
        // SAFETY: sends SIGKILL to a pid nfmgr reported for its own child.
        unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGKILL) };
        let generation = p.generation;
        // Replacement: a new generation in the slot, running.
        inst.wait_for(
            &region,
            Duration::from_secs(20),
            "replacement running",
            |s| {
                s.process(name)
                    .map(|q| q.generation > generation && q.state == SlotState::Running)
                    .unwrap_or(false)
            },
        );
        inst.assert_alive();
    }
    eprintln!(
        "{KILLS} kills in {:.1}s, {under_traffic} of them while the generator ran",
        started.elapsed().as_secs_f64()
    );
    assert!(
        under_traffic >= KILLS / 4,
        "too few kills under traffic ({under_traffic})"
    );

    // Traffic stops; every buffer must come back.
    let snap = inst.wait_for(
        &region,
        Duration::from_secs(60),
        "generator done, pool whole",
        |s| {
            s.port("gen0")
                .map(|g| g.counters["gen_done"] == 1)
                .unwrap_or(false)
                && s.pool.in_use == 0
        },
    );
    assert_eq!(snap.pool.free + snap.pool.cached, snap.pool.total);
    assert_eq!(snap.pool.double_frees, 0, "a buffer was freed twice");
    let restarts: u32 = snap.processes.iter().map(|p| p.restarts).sum();
    assert_eq!(
        restarts as usize, KILLS,
        "every kill was followed by one restart"
    );
    for t in targets {
        assert_eq!(snap.process(t).unwrap().state, SlotState::Running);
    }
    let sink = snap.port("sink0").unwrap();
    assert!(sink.counters["sink_rx"] > 0);
    assert_eq!(
        sink.counters["sink_duplicates"], 0,
        "no packet may be delivered twice"
    );
    eprintln!(
        "pool: {} total, {} reclaimed from killed processes; sink received {} lost {}",
        snap.pool.total, snap.pool.reclaimed, sink.counters["sink_rx"], sink.counters["sink_lost"]
    );
    assert!(
        inst.stop().success(),
        "clean shutdown; log:\n{}",
        inst.log()
    );
    let report = inst.report();
    assert_eq!(report["restarts"], KILLS as u64);
}

#[test]
fn without_restart_a_dead_runtime_is_reported_and_traffic_moves_on() {
    let mut inst = Instance::new("norestart");
    inst.start(
        r#"
[supervisor]
restart = "never"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 32
rate_pps = 200
duration_ms = 60000
[[port]]
name = "sink0"
spec = "sink:"
"#,
    );
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(
        &region,
        Duration::from_secs(20),
        "rt0 carrying traffic",
        |s| {
            s.process("rt0")
                .map(|p| p.counters["rx_pkts"] > 100)
                .unwrap_or(false)
        },
    );
    let pid = s.process("rt0").unwrap().pid;
    // SAFETY: kills nfmgr's child by the pid it reported.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let s = inst.wait_for(&region, Duration::from_secs(20), "rt0 failed", |s| {
        s.process("rt0")
            .map(|p| p.state == SlotState::Failed)
            .unwrap_or(false)
    });
    assert_eq!(s.process("rt0").unwrap().last_exit, Some(-libc::SIGKILL));
    // Its flows move to rt1: the sink keeps receiving every flow.
    let rx_before = s.port("sink0").unwrap().counters["sink_rx"];
    let s = inst.wait_for(&region, Duration::from_secs(20), "traffic continues", |s| {
        s.port("sink0").unwrap().counters["sink_rx"] > rx_before + 2 * 32 * 200
    });
    assert_eq!(s.process("rt1").unwrap().state, SlotState::Running);
    assert!(inst.log().contains("killed by SIGKILL"), "{}", inst.log());
    assert!(inst.stop().success());
}

#[test]
fn kill_signals_the_process_nfmgr_started_whatever_the_pid_word_in_shared_memory_says() {
    let mut inst = Instance::new("kpid");
    inst.start("[[vswitch]]\nname = \"vs0\"\n[[runtime]]\nname = \"rt0\"\n");
    let region = inst.region(Duration::from_secs(20));
    let snap = inst.wait_for(&region, Duration::from_secs(20), "rt0 running", |s| {
        s.process("rt0")
            .map(|p| p.state == SlotState::Running && p.pid != 0)
            .unwrap_or(false)
    });
    let rt0 = snap.process("rt0").expect("rt0");
    let (slot, real, generation) = (rt0.slot, rt0.pid, rt0.generation);
    // Any process of the machine (here one of the test's own) named in the runtime's pid
    // word, which every attached process can write.
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    region
        .slot(slot)
        .expect("rt0's slot")
        .pid
        .store(bystander.id(), std::sync::atomic::Ordering::Relaxed);
    // The control thread lists rt0 a moment after its slot says running.
    let t0 = std::time::Instant::now();
    let out = loop {
        let out = std::process::Command::new(common::nfmgr_bin())
            .args(["kill", "rt0", "--config"])
            .arg(inst.path("nfmgr.toml"))
            .output()
            .expect("nfmgr kill");
        let unknown = String::from_utf8_lossy(&out.stderr).contains("no vswitch or runtime");
        if !unknown || t0.elapsed() > Duration::from_secs(10) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The runtime nfmgr started died (and was replaced); the bystander lives.
    inst.wait_for(&region, Duration::from_secs(20), "rt0 replaced", |s| {
        s.process("rt0")
            .map(|p| p.state == SlotState::Running && p.generation > generation)
            .unwrap_or(false)
    });
    assert!(
        std::fs::metadata(format!("/proc/{real}")).is_err(),
        "the real rt0 (pid {real}) still runs"
    );
    assert!(
        bystander.try_wait().expect("wait").is_none(),
        "the process named by the forged pid word was killed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    inst.stop();
}
