//! nfmgr's life cycle as an operator sees it: clean shutdown on SIGTERM, recovery from a
//! crashed predecessor's stale region, one nfmgr per instance, clear one-line errors, and an
//! idle platform that sleeps.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{nfmgr_bin, Instance};
use nflib::slot::SlotState;

const PIPELINE: &str = r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "sink0"
spec = "sink:"
"#;

fn region_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".region"))
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn sigterm_stops_everything_and_removes_the_region() {
    let mut inst = Instance::new("term");
    inst.start(PIPELINE);
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes
            .iter()
            .filter(|p| p.name != "nfmgr")
            .all(|p| p.state == SlotState::Running)
    });
    let pids: Vec<u32> = s.processes.iter().map(|p| p.pid).collect();
    drop(region);
    assert_eq!(region_files(&inst.dir).len(), 1);
    assert!(inst.stop().success(), "{}", inst.log());
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived shutdown");
    }
    assert!(region_files(&inst.dir).is_empty(), "region left behind");
    assert!(!inst
        .dir
        .join(format!("run/nfactor-{}.lock", inst.name))
        .exists());
}

#[test]
fn a_crashed_nfmgr_takes_its_children_and_its_successor_cleans_up() {
    let mut inst = Instance::new("stale");
    inst.start(PIPELINE);
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });
    let children: Vec<u32> = s.processes.iter().skip(1).map(|p| p.pid).collect();
    drop(region);
    // SAFETY: kills our own child.
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGKILL) };
    inst.wait_exit(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "children outlived nfmgr");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        region_files(&inst.dir).len(),
        1,
        "the crash leaves a stale region"
    );
    // The next nfmgr for the instance removes it and starts normally.
    inst.start(PIPELINE);
    let region = inst.region(Duration::from_secs(20));
    inst.wait_for(&region, Duration::from_secs(20), "running again", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });
    assert!(
        inst.log().contains("did not shut down cleanly"),
        "{}",
        inst.log()
    );
    drop(region);
    assert!(inst.stop().success());
    assert!(region_files(&inst.dir).is_empty());
}

#[test]
fn one_nfmgr_per_instance() {
    let mut inst = Instance::new("twice");
    inst.start(PIPELINE);
    let _region = inst.region(Duration::from_secs(20));
    let out = Command::new(nfmgr_bin())
        .args(["start", "--config"])
        .arg(inst.path("nfmgr.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(
        err.contains(&inst.pid().to_string()),
        "names the running pid: {err}"
    );
    assert!(inst.stop().success());
}

#[test]
fn errors_are_one_clear_line_and_a_failure_status() {
    let dir = Instance::new("errors");
    // Missing instance.
    let out = Command::new(nfmgr_bin())
        .args(["stats", "--instance", "nosuch", "--dir"])
        .arg(&dir.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is it running"), "{err}");
    // Configuration errors name the key.
    for (body, key) in [
        ("[[vswitch]]\nname = \"v\"\n[[runtime]]\nname = \"r\"\nbogus = 1\n", "bogus"),
        (
            "[[vswitch]]\nname = \"v\"\n[[runtime]]\nname = \"r\"\n[[port]]\nname = \"p\"\nspec = \"gen:\"\nto = \"q\"\n",
            "port.p.to",
        ),
        ("[[vswitch]]\nname = \"v\"\n[[runtime]]\nname = \"r\"\n[region]\nbuffers = 0\n", "region.buffers"),
        (
            "[[vswitch]]\nname = \"v\"\n[[runtime]]\nname = \"r\"\n[[port]]\nname = \"p\"\nspec = \"afpacket:nosuchif0\"\nto = \"p\"\n",
            "nosuchif0",
        ),
    ] {
        let cfg = dir.config(body);
        let out = Command::new(nfmgr_bin())
            .args(["start", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{body}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "error for {key}: {err}");
        assert!(region_files(&dir.dir).is_empty(), "a failed start leaves no region");
    }
}

#[test]
fn an_idle_platform_sleeps() {
    let mut inst = Instance::new("idle");
    inst.start(PIPELINE);
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });
    let pids: Vec<u32> = s.processes.iter().map(|p| p.pid).collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = common::total_cpu_ticks(&pids);
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = common::total_cpu_ticks(&pids) - t0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / hz / wall.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} processes used {:.2}% of one core",
        pids.len(),
        share * 100.0
    );
    assert!(
        share < 0.03,
        "idle platform used {:.1}% of a core",
        share * 100.0
    );
    drop(region);
    assert!(inst.stop().success());
}

#[test]
fn processes_pinned_to_cores_start_and_run() {
    // Pin to the last CPU: a pinned process sees only that CPU, yet must accept the
    // configuration that named it.
    let last = nflib::config::online_cpus() - 1;
    let mut inst = Instance::new("pinned");
    inst.start(&format!("[manager]\ncores = \"{last}\"\n{PIPELINE}"));
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });
    for p in s.processes.iter().skip(1) {
        assert_eq!(p.core, Some(last as u32), "{} pinned", p.name);
        assert_eq!(p.restarts, 0, "{} restarted: {}", p.name, inst.log());
    }
    drop(region);
    assert!(inst.stop().success());
}

#[test]
fn a_paced_generator_sends_exactly_flows_times_rate_times_duration() {
    let mut inst = Instance::new("gencount");
    inst.start(
        r#"
[manager]
exit_when_done = true
report = "report.json"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 100
rate_pps = 1000
duration_ms = 700
[[port]]
name = "sink0"
spec = "sink:"
"#,
    );
    assert!(
        inst.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        inst.log()
    );
    let report = inst.report();
    let snap: nflib::snapshot::RegionSnapshot =
        serde_json::from_value(report["snapshot"].clone()).expect("snapshot");
    let gen = snap.port("gen0").expect("gen0");
    let sink = snap.port("sink0").expect("sink0");
    // 100 flows x 1,000 packets/s x 0.7 s, not one short.
    assert_eq!(
        gen.counters["gen_sent"] + gen.counters.get("gen_skipped").copied().unwrap_or(0),
        70_000,
        "{:#?}",
        gen.counters
    );
    assert_eq!(sink.counters["sink_rx"], gen.counters["gen_sent"]);
}

/// A runtime that dies soon after every start (a crash loop) is restarted with growing
/// delays, not at once forever, and says so (status, events).
#[test]
fn a_crash_looping_runtime_backs_off_and_says_so() {
    let mut inst = Instance::new("crashloop");
    inst.start_with_env(PIPELINE, &[("NF_FAILPOINTS", "crash-after-start")]);
    let started = Instant::now();
    let region = inst.region(Duration::from_secs(20));
    let rt0 = |s: &nflib::snapshot::RegionSnapshot| {
        s.processes
            .iter()
            .find(|p| p.name == "rt0")
            .map(|p| (p.restarts, p.quick_deaths))
            .unwrap_or((0, 0))
    };
    inst.wait_for(&region, Duration::from_secs(20), "a crash loop", |s| {
        rt0(s).1 >= 3
    });
    // Each life lasts about 200 ms; restarted at once, it would have had some 20 lives in
    // 6 s, backing off from 100 ms, 6 or 7.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(started.elapsed()));
    let (restarts, quick) = rt0(&nflib::snapshot::RegionSnapshot::read(&region));
    eprintln!("rt0 after 6 s: {restarts} restarts, {quick} quick deaths in a row");
    assert!(restarts <= 8, "{restarts} restarts in 6 s: no backoff");
    assert!(quick >= 3, "{quick}");
    let log = inst.log();
    assert!(log.contains("crash loop"), "the crash loop is logged");
    drop(region);
    inst.stop();
}

/// A panic in nfmgr's data-plane thread (a bug) must not leave nfmgr up with no packet
/// moving: it exits with an error, its processes follow, and the log says why.
#[test]
fn a_data_plane_panic_fails_loudly() {
    let mut inst = Instance::new("dppanic");
    inst.start_with_env(PIPELINE, &[("NFMGR_FAILPOINTS", "dataplane-panic")]);
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });
    let pids: Vec<u32> = s.processes.iter().skip(1).map(|p| p.pid).collect();
    drop(region);
    let status = inst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(70), "log:\n{}", inst.log());
    assert!(inst.log().contains("the data-plane thread panicked"));
    let t0 = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "children outlived nfmgr"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nfmgr signs what goes to other servers and reads what comes to itself: a frame a local
/// process puts on its message ring with another endpoint's source (a compromised runtime
/// would) is refused and counted, not carried (issue 22, finding 2).
#[test]
fn a_frame_with_a_forged_source_is_refused() {
    let mut inst = Instance::new("forge");
    inst.start_with_env(PIPELINE, &[("NF_FAILPOINTS", "forge-source")]);
    let region = inst.region(Duration::from_secs(20));
    let forged = |s: &nflib::snapshot::RegionSnapshot| s.process_counter("nfmgr", "msg_forged");
    // Each runtime forges one frame 300 ms into its life.
    let s = inst.wait_for(&region, Duration::from_secs(20), "two forged frames", |s| {
        forged(s) >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let s2 = nflib::snapshot::RegionSnapshot::read(&region);
    assert_eq!(forged(&s2), 2, "{:?}", s.processes);
    assert!(
        s2.processes.iter().all(|p| p.restarts == 0),
        "nothing restarted"
    );
    assert!(inst.log().contains("failpoint forge-source"));
    drop(region);
    assert!(inst.stop().success());
}

/// Control calls (a takeover of flows, a workload poll, and the rest) are nfmgr's to make:
/// a runtime making them to another runtime or to the vswitch is refused and counted, and
/// so is a runtime asking the vswitch to move flows between two others (issue 22,
/// finding 9).
#[test]
fn control_calls_from_a_runtime_are_refused() {
    let mut inst = Instance::new("rogue");
    inst.start_with_env(PIPELINE, &[("NF_FAILPOINTS", "rogue-call")]);
    let region = inst.region(Duration::from_secs(20));
    let refused =
        |s: &nflib::snapshot::RegionSnapshot, name: &str| s.process_counter(name, "calls_refused");
    // rt0 asks rt1 to take over its flows; both runtimes poll the vswitch and ask it to
    // move another runtime's flows to a third.
    let s = inst.wait_for(&region, Duration::from_secs(20), "refused calls", |s| {
        refused(s, "rt1") >= 1 && refused(s, "vs0") >= 4
    });
    std::thread::sleep(Duration::from_millis(500));
    let s2 = nflib::snapshot::RegionSnapshot::read(&region);
    assert_eq!(refused(&s2, "rt1"), 1, "{:?}", s.processes);
    assert_eq!(refused(&s2, "vs0"), 4, "{:?}", s.processes);
    assert_eq!(refused(&s2, "rt0"), 0);
    assert!(s2.processes.iter().all(|p| p.restarts == 0));
    assert!(inst.log().contains("failpoint rogue-call"));
    drop(region);
    assert!(inst.stop().success());
}

/// Both generators' 1,000 packets were sent to `sink1` by misrouting runtimes: gen1's go
/// out, gen0's are refused and counted, nothing reaches `sink0`.
fn only_gen1_goes_out(mut inst: Instance) {
    let region = inst.region(Duration::from_secs(20));
    let refused =
        |s: &nflib::snapshot::RegionSnapshot| s.process_counter("nfmgr", "drop_misaddressed");
    let s = inst.wait_for(&region, Duration::from_secs(20), "all sent", |s| {
        refused(s) + s.port_counter("sink1", "tx_pkts") >= 2000
    });
    assert_eq!(refused(&s), 1000, "{:?}", s.processes);
    assert_eq!(s.port_counter("sink1", "tx_pkts"), 1000);
    assert_eq!(s.port_counter("sink0", "tx_pkts"), 0);
    drop(region);
    assert!(inst.stop().success());
}

/// A runtime names the port its output leaves by in the descriptor, which is its to
/// write: nfmgr sends a packet only out of a port it may leave by given the port it came in
/// by (where that port sends, or back), never out of another (issue 22, finding 2). Here a
/// runtime sends all its output to `sink1`: what came from `gen1` (which sends there) goes
/// out, what came from `gen0` (which sends to `sink0`) is refused.
#[test]
fn output_for_a_port_it_may_not_use_is_refused() {
    let mut inst = Instance::new("misroute");
    inst.start_with_env(
        r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 10
rate_pps = 100
duration_ms = 1000
[[port]]
name = "sink0"
spec = "sink:"
[[port]]
name = "gen1"
spec = "gen:"
to = "sink1"
flows = 10
rate_pps = 100
duration_ms = 1000
[[port]]
name = "sink1"
spec = "sink:"
"#,
        &[("NF_FAILPOINTS", "misroute"), ("NF_FAILPOINT_EGRESS", "3")],
    );
    only_gen1_goes_out(inst);
}

/// The port of arrival is the process's to write as well: a runtime that names another
/// port's, one whose frames never reach it, to send where that port's traffic goes is
/// refused (issue 22, finding 2). Two vswitches, each feeding its own runtime; both
/// runtimes name `gen1` as where their output came from and `sink1` as where it goes:
/// rt1's (truly from gen1) goes out, rt0's (from gen0) is refused.
#[test]
fn output_naming_a_port_it_never_receives_from_is_refused() {
    let mut inst = Instance::new("misarrive");
    inst.start_with_env(
        r#"
[[vswitch]]
name = "vs0"
runtimes = ["rt0"]
[[vswitch]]
name = "vs1"
runtimes = ["rt1"]
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
vswitch = "vs0"
flows = 10
rate_pps = 100
duration_ms = 1000
[[port]]
name = "sink0"
spec = "sink:"
[[port]]
name = "gen1"
spec = "gen:"
to = "sink1"
vswitch = "vs1"
flows = 10
rate_pps = 100
duration_ms = 1000
[[port]]
name = "sink1"
spec = "sink:"
"#,
        &[
            ("NF_FAILPOINTS", "misroute"),
            ("NF_FAILPOINT_EGRESS", "3"),
            ("NF_FAILPOINT_INGRESS", "2"),
        ],
    );
    only_gen1_goes_out(inst);
}

/// A runtime whose flow table is full tells the vswitch about the flows it refuses: the
/// vswitch forgets them (their next packets are dispatched afresh) instead of keeping an
/// entry per refused flow until it idles out (issue 22, finding 6).
#[test]
fn flows_a_full_runtime_refuses_leave_no_vswitch_entries() {
    let mut inst = Instance::new("full");
    inst.start(
        r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
max_flows = 8
[[runtime]]
name = "rt1"
max_flows = 8
[[chain]]
name = "main"
[[chain.nf]]
kind = "flow_monitor"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 200
rate_pps = 20
duration_ms = 60000
[[port]]
name = "sink0"
spec = "sink:"
"#,
    );
    let region = inst.region(Duration::from_secs(20));
    let counter = |s: &nflib::snapshot::RegionSnapshot, name: &str, c: &str| {
        s.processes
            .iter()
            .filter(|p| p.name == name)
            .filter_map(|p| p.counters.get(c).copied())
            .sum::<u64>()
    };
    inst.wait_for(&region, Duration::from_secs(20), "refusals", |s| {
        counter(s, "rt0", "drop_flow_table_full") + counter(s, "rt1", "drop_flow_table_full") > 500
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = nflib::snapshot::RegionSnapshot::read(&region);
    let entries = counter(&s, "vs0", "flows_active");
    eprintln!("vswitch entries with 200 flows and room for 16: {entries}");
    assert!(
        entries < 60,
        "{entries} entries: refused flows stayed in the vswitch"
    );
    drop(region);
    assert!(inst.stop().success());
}

/// The fields of /proc/PID/status the sandbox sets, as (name, value) pairs.
fn proc_status(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn status_field(st: &[(String, String)], name: &str) -> String {
    st.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Runtimes and vswitches parse traffic an attacker controls. Once attached they run as an
/// unprivileged user with no capability, cannot read a secret only root may read nor
/// signal nfmgr, and under the system-call filter (the default) such an attempt ends the
/// process, which nfmgr reports and restarts (issue 22, finding 2). Needs root: without it
/// every process already runs as the (unprivileged) user who started nfmgr.
#[test]
fn data_path_processes_run_unprivileged_and_sandboxed() {
    if !common::require_root("switching the data path's user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let probe = |inst: &Instance| {
        let secret = inst.path("cluster.key");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        secret
    };

    // The user alone (filter off): the attempts are refused by the kernel's permissions.
    let mut inst = Instance::new("sbx-user");
    let secret = probe(&inst);
    inst.start_with_env(
        &format!("{PIPELINE}\n[supervisor]\nseccomp = \"off\"\n"),
        &[
            ("NF_FAILPOINTS", "sandbox-probe"),
            ("NF_FAILPOINT_PROBE", secret.to_str().unwrap()),
        ],
    );
    let region = inst.region(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while inst.log().matches("read the secret").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = inst.log();
    assert_eq!(
        log.matches("read the secret: refused (Permission denied")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("signal nfmgr: refused (EPERM").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("trace nfmgr: refused (EPERM").count(),
        2,
        "{log}"
    );
    let s = nflib::snapshot::RegionSnapshot::read(&region);
    let data_path: Vec<_> = s.processes.iter().filter(|p| p.name != "nfmgr").collect();
    assert_eq!(data_path.len(), 3);
    for p in &data_path {
        let st = proc_status(p.pid);
        assert_eq!(
            status_field(&st, "Uid"),
            "65534 65534 65534 65534",
            "{}",
            p.name
        );
        assert_eq!(status_field(&st, "Groups"), "", "{}", p.name);
        assert_eq!(
            status_field(&st, "CapEff"),
            "0000000000000000",
            "{}",
            p.name
        );
        assert_eq!(
            status_field(&st, "CapPrm"),
            "0000000000000000",
            "{}",
            p.name
        );
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{}", p.name);
        assert_eq!(status_field(&st, "Seccomp"), "0", "{}", p.name);
        assert_eq!(p.restarts, 0, "{}", p.name);
    }
    drop(region);
    assert!(inst.stop().success());

    // The default: the filter too. The first forbidden call kills the runtime (SIGSYS).
    let mut inst = Instance::new("sbx-filter");
    let secret = probe(&inst);
    inst.start_with_env(
        PIPELINE,
        &[
            ("NF_FAILPOINTS", "sandbox-probe"),
            ("NF_FAILPOINT_PROBE", secret.to_str().unwrap()),
        ],
    );
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "a runtime's death", |s| {
        s.processes.iter().any(|p| p.restarts > 0)
    });
    let vs = s.processes.iter().find(|p| p.name == "vs0").unwrap();
    let st = proc_status(vs.pid);
    assert_eq!(status_field(&st, "Seccomp"), "2");
    assert_eq!(status_field(&st, "Uid"), "65534 65534 65534 65534");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !inst.log().contains("SIGSYS") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = inst.log();
    assert!(log.contains("killed by SIGSYS"), "{log}");
    assert!(!log.contains("read the secret: read"), "{log}");
    assert!(!log.contains("signal nfmgr: allowed"), "{log}");
    assert!(!log.contains("trace nfmgr: allowed"), "{log}");
    drop(region);
    assert!(inst.stop().success());
}

/// Two roles on the local sockets (issue 22, finding 9): the control socket (nfmgr's user
/// only) takes every request; the monitoring socket beside it, open to
/// `manager.monitor_group`, answers what reads state and refuses what changes the instance.
/// The CLI of a user in that group reads through it without being told. Needs root (to run
/// the CLI as another user).
#[test]
fn the_monitoring_socket_reads_and_refuses_changes() {
    if !common::require_root("the monitoring socket's group") {
        return;
    }
    let mut inst = Instance::new("monitor");
    inst.start(&format!(
        "{PIPELINE}\n[manager]\nmonitor_group = \"nogroup\"\n"
    ));
    let region = inst.region(Duration::from_secs(20));
    let cfg = inst.path("nfmgr.toml");
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "-g", "nogroup", "--"])
            .arg(nfmgr_bin())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("runuser")
    };
    let out = as_nobody(&["status"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("rt0"), "{text}");
    for change in [&["stop"][..], &["kill", "rt0"][..]] {
        let out = as_nobody(change);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{change:?} was allowed");
        assert!(err.contains("read-only monitoring socket"), "{err}");
    }
    // The same requests straight to the sockets, as root: the monitoring one still refuses.
    let monitor = inst
        .dir
        .join("run")
        .join(format!("nfmgr-{}.monitor.sock", inst.name));
    let ask = |path: &Path, req: serde_json::Value| {
        nflib::control_client::call(path, &req, Duration::from_secs(10))
    };
    assert!(ask(&monitor, serde_json::json!({"cmd": "top"})).is_ok());
    let e = ask(
        &monitor,
        serde_json::json!({"cmd": "kill", "process": "rt0"}),
    )
    .unwrap_err();
    assert!(
        matches!(&e, nflib::control_client::ClientError::Refused(why) if why.contains("read-only")),
        "{e}"
    );
    let s = nflib::snapshot::RegionSnapshot::read(&region);
    assert!(
        s.processes.iter().all(|p| p.restarts == 0),
        "something was killed"
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&monitor).unwrap();
    assert_eq!(md.mode() & 0o777, 0o660);
    let admin = inst
        .dir
        .join("run")
        .join(format!("nfmgr-{}.sock", inst.name));
    assert_eq!(std::fs::metadata(&admin).unwrap().mode() & 0o777, 0o600);
    drop(region);
    assert!(inst.stop().success());
    assert!(
        !monitor.exists(),
        "the monitoring socket is removed at exit"
    );
}

/// A vswitch killed under traffic comes back knowing every flow: it asks the runtimes for
/// the flows it fed, holds the packets of keys it does not know until they answered, and
/// sends each flow's packets on to the runtime that has it. Before, the new life dispatched
/// live flows as if new, round robin, and most of them started again on another runtime,
/// their state left behind (issue 24, item 1). Three runtimes and 200 flows: round robin
/// from wherever the generator's round was cannot give every flow its old runtime.
#[test]
fn a_restarted_vswitch_sends_every_flow_where_it_was() {
    let mut inst = Instance::new("vsback");
    inst.start(
        r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[runtime]]
name = "rt2"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 200
rate_pps = 20
duration_ms = 60000
[[port]]
name = "sink0"
spec = "sink:"
[[chain]]
name = "main"
[[chain.nf]]
kind = "flow_monitor"
"#,
    );
    let region = inst.region(Duration::from_secs(20));
    let created = |s: &nflib::snapshot::RegionSnapshot| {
        ["rt0", "rt1", "rt2"]
            .iter()
            .map(|r| s.process_counter(r, "flows_created"))
            .sum::<u64>()
    };
    let s = inst.wait_for(&region, Duration::from_secs(20), "200 flows", |s| {
        created(s) >= 200
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = nflib::snapshot::RegionSnapshot::read(&region);
    assert_eq!(created(&before), 200, "{:?}", s.processes);
    let cfg = inst.path("nfmgr.toml");
    let out = Command::new(nfmgr_bin())
        .args(["kill", "vs0", "--config"])
        .arg(&cfg)
        .output()
        .expect("nfmgr kill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    inst.wait_for(&region, Duration::from_secs(20), "vs0 back", |s| {
        s.process("vs0")
            .is_some_and(|p| p.restarts >= 1 && p.state == SlotState::Running)
    });
    // Every flow has had packets since (20 a second each).
    std::thread::sleep(Duration::from_secs(2));
    let after = nflib::snapshot::RegionSnapshot::read(&region);
    let log = inst.log();
    let rebuilt = log
        .lines()
        .find(|l| l.contains("table rebuilt from the runtimes"))
        .unwrap_or_else(|| panic!("no rebuild in the log:\n{log}"));
    eprintln!("{rebuilt}");
    // nfmgr reports it as an event (the drills' reports carry it): the pause and the flows.
    assert_eq!(after.process_counter("vs0", "vswitch_rebuilds"), 1);
    assert_eq!(after.process_counter("vs0", "vswitch_rebuild_flows"), 200);
    inst.wait_for(
        &region,
        Duration::from_secs(5),
        "the rebuild's event",
        |_| {
            inst.log()
                .contains("rebuilt its table from the runtimes: 200 flows in")
        },
    );
    assert_eq!(
        created(&after),
        200,
        "flows started again on another runtime: {} -> {}",
        created(&before),
        created(&after)
    );
    assert_eq!(after.process_counter("vs0", "flows_active"), 200);
    // Held packets left in the order they came, before the flows' later ones.
    assert_eq!(after.port_counter("sink0", "sink_reordered"), 0);
    assert_eq!(after.port_counter("sink0", "sink_duplicates"), 0);
    drop(region);
    assert!(inst.stop().success());
}
