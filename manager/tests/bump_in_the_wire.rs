//! Real TCP through the platform: client -> [port, vswitch, runtime, port] -> server, in
//! network namespaces, with AF_PACKET ports and with DPDK ports (`net_af_packet` virtual
//! devices on the same veths, nfmgr built with `--features dpdk`). An iperf3 TCP test and a
//! curl download complete, and the download arrives intact. Needs root (skipped with a
//! reason otherwise; CI runs both).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::{BumpInTheWire, SERVER_IP};
use common::{require_root, require_tool, Instance};
use nflib::slot::SlotState;

const PROCESSES: &str = r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
"#;

#[test]
fn iperf3_and_curl_through_the_bump_in_the_wire() {
    let ports = r#"
[[port]]
name = "client"
spec = "afpacket:c1"
to = "server"
[[port]]
name = "server"
spec = "afpacket:s1"
to = "client"
"#;
    let _ = through_the_wire("w", "AF_PACKET", &format!("{PROCESSES}{ports}"));
}

#[test]
fn iperf3_and_curl_through_dpdk_ports() {
    if !cfg!(feature = "dpdk") {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the DPDK bump-in-the-wire test needs nfmgr built with --features dpdk, and CI=true");
        }
        eprintln!("SKIP: the DPDK bump-in-the-wire test needs nfmgr built with --features dpdk");
        return;
    }
    let ports = r#"
[dpdk]
vdevs = ["net_af_packet0,iface=c1", "net_af_packet1,iface=s1"]
[[port]]
name = "client"
spec = "dpdk:net_af_packet0"
to = "server"
[[port]]
name = "server"
spec = "dpdk:net_af_packet1"
to = "client"
"#;
    let Some(s) = through_the_wire("d", "DPDK", &format!("{PROCESSES}{ports}")) else {
        return;
    };
    // Zero copy: every frame the devices received was written into a region buffer and
    // handed on by its index; none came from elsewhere.
    for name in ["client", "server"] {
        let c = &s.port(name).unwrap().counters;
        assert_eq!(
            c["dpdk_rx_in_region"],
            c["rx_pkts"] + c["rx_drop_ring_full"],
            "{name}: {c:?}"
        );
        assert_eq!(c["dpdk_rx_foreign"], 0, "{name}");
        assert!(c["dev_ipackets"] >= c["rx_pkts"], "{name}: {c:?}");
    }
}

/// Runs iperf3 and a curl download through an nfmgr started with `config` in the middle
/// namespace; returns its last snapshot.
fn through_the_wire(
    tag: &str,
    kind: &str,
    config: &str,
) -> Option<nflib::snapshot::RegionSnapshot> {
    let what = format!("the {kind} bump-in-the-wire test");
    if !require_root(&what)
        || !require_tool("iperf3", &what)
        || !require_tool("curl", &what)
        || !require_tool("ethtool", &what)
    {
        return None;
    }
    let net = BumpInTheWire::new(tag);
    let mut inst = Instance::new(&format!("wire{tag}"));
    inst.start_in(Some(&net.mid), config);
    let region = inst.region(Duration::from_secs(20));
    inst.wait_for(&region, Duration::from_secs(20), "running", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
    });

    // iperf3, 3 seconds of TCP.
    let mut server = net
        .exec(&net.server, &["iperf3", "-s", "-1", "-B", SERVER_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = net
        .exec(&net.client, &["iperf3", "-c", SERVER_IP, "-t", "3", "-J"])
        .output()
        .expect("iperf3 client");
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            inst.log()
        )
    });
    assert!(json["error"].is_null(), "iperf3: {}", json["error"]);
    let received = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    eprintln!(
        "{kind} ports, iperf3: {received} bytes, {:.2} Gbit/s, {retrans} retransmits",
        bps / 1e9
    );
    assert!(received > 1_000_000, "iperf3 moved only {received} bytes");

    // curl: an 8 MB download over HTTP, compared byte for byte.
    let www = inst.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("blob.bin"), &blob).unwrap();
    let mut http = net
        .exec(
            &net.server,
            &["python3", "-m", "http.server", "8080", "--bind", SERVER_IP],
        )
        .current_dir(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("http server");
    let got = inst.path("got.bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = net
            .exec(
                &net.client,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "30",
                    "-o",
                    got.to_str().unwrap(),
                    "-w",
                    "%{http_code}",
                    &format!("http://{SERVER_IP}:8080/blob.bin"),
                ],
            )
            .output()
            .expect("curl");
        // The HTTP server may still be starting.
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = http.kill();
    let _ = http.wait();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        std::fs::read(&got).unwrap() == blob,
        "download differs from the original"
    );

    let s = nflib::snapshot::RegionSnapshot::read(&region);
    for p in &s.processes {
        assert_eq!(p.counters["drop_invalid_desc"], 0);
        assert_eq!(p.restarts, 0);
    }
    let c = s.port("client").unwrap();
    assert!(c.counters["rx_pkts"] > 1000 && c.counters["tx_pkts"] > 1000);
    drop(region);
    assert!(inst.stop().success(), "{}", inst.log());
    Some(s)
}
