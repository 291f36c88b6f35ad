//! The operator's view of one running instance: the control socket's CLI subcommands (tables
//! and JSON), the Prometheus metrics, `nfmgr stop`, and clear errors once it is gone.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::{nfmgr_bin, Instance};
use nflib::slot::SlotState;

fn nfmgr(cfg: &std::path::Path, args: &[&str]) -> Output {
    Command::new(nfmgr_bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("run nfmgr")
}

fn json(cfg: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = nfmgr(cfg, &a);
    assert!(
        out.status.success(),
        "nfmgr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn the_cli_and_metrics_describe_a_running_instance_and_fail_cleanly_without_one() {
    let mut inst = Instance::new("cli");
    let metrics = format!("127.0.0.1:{}", free_port());
    let body = format!(
        r#"
[manager]
metrics_listen = "{metrics}"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[chain]]
name = "main"
[[chain.nf]]
kind = "flow_monitor"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 8
rate_pps = 50
[[port]]
name = "sink0"
spec = "sink:"
"#
    );
    inst.start(&body);
    let cfg = inst.path("nfmgr.toml");
    let region = inst.region(Duration::from_secs(20));
    inst.wait_for(
        &region,
        Duration::from_secs(20),
        "flows on both runtimes",
        |s| {
            s.processes
                .iter()
                .filter(|p| p.name != "nfmgr")
                .all(|p| p.state == SlotState::Running)
                && s.processes
                    .iter()
                    .filter(|p| p.name.starts_with("rt"))
                    .all(|p| p.counters.get("flows_active").is_some_and(|&n| n > 0))
        },
    );
    drop(region);

    // The socket is the operator's alone.
    let sock = inst.path(&format!("run/nfmgr-{}.sock", inst.name));
    let mode = std::fs::metadata(&sock)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let st = json(&cfg, &["status"]);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for n in ["nfmgr", "vs0", "rt0", "rt1"] {
        assert!(names.contains(&n), "{n} missing from {st}");
    }

    // Asked until the runtimes hold all 8 flows: under load a runtime can be slow enough to
    // start that the supervisor replaces it, and its flows come back with the next packets.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (eps, flows) = loop {
        let eps = json(&cfg, &["runtimes"]);
        let runtimes: Vec<&serde_json::Value> = eps
            .as_array()
            .expect("a list")
            .iter()
            .filter(|e| e["kind"] == "runtime")
            .collect();
        assert_eq!(runtimes.len(), 2, "{eps}");
        let flows: u64 = runtimes
            .iter()
            .map(|e| e["workload"]["flows_active"].as_u64().unwrap_or(0))
            .sum();
        if flows == 8 || std::time::Instant::now() > deadline {
            break (eps, flows);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(flows, 8, "the generator's 8 flows, spread over both: {eps}");

    let table = String::from_utf8(nfmgr(&cfg, &["runtimes"]).stdout).unwrap();
    assert!(table.contains("FLOWS") && table.contains("rt0") && table.contains("rt1"));

    let listed = json(&cfg, &["flows", "--runtime", "rt0"]);
    let n = listed[0]["flows"].as_array().map_or(0, |f| f.len());
    assert!(n > 0, "{listed}");

    let text = http_get(&metrics, "/metrics");
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    for family in [
        "nfactor_port_",
        "nfactor_process_up",
        "nfactor_chain_rx_pkts_total{",
        "nfactor_nf_bytes_total{",
        "nf=\"flow_monitor\"",
    ] {
        assert!(text.contains(family), "{family} missing from the metrics");
    }
    assert!(http_get(&metrics, "/nothing").starts_with("HTTP/1.0 404"));

    // `nfmgr stop` stops it as SIGTERM would.
    let out = nfmgr(&cfg, &["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inst.wait_exit(Duration::from_secs(20)).success());

    // Gone: every subcommand is one clear line and status 1.
    for cmd in ["status", "runtimes", "flows", "stop"] {
        let out = nfmgr(&cfg, &[cmd]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{cmd}: {err}");
        assert!(err.contains("not running"), "{cmd}: {err}");
    }
}
