//! Short connections and TCP tracking with real clients and servers on the test bed
//! (scripts/testbed.sh), issue 20's must-shows. Needs root, nginx, ab (apache2-utils),
//! iperf3, curl and python3-scapy; CI runs them.
//!
//! - Thousands of HTTP requests, one connection each, from a client whose 64 ports are
//!   reused over and over (`tcp_tw_reuse`), through firewall -> NAT -> flow monitor: every
//!   request completes, and no function drops a packet. A new SYN on a port whose previous
//!   connection had just closed used to be refused (`drop_invalid`), costing the client a
//!   one-second retransmission each time.
//! - On two servers, iperf3 with 8 streams and a curl download through firewall -> NAT ->
//!   flow monitor, with flows on the runtimes of both servers: the NAT's ports are unique
//!   across the cluster, and every translated flow's first reply reaches its own runtime.
//! - The firewall's TCP tracking against the kernel's conntrack, packet by packet
//!   (scripts/conntrack_compare.py): the same crafted packets through an nftables namespace
//!   and through the platform.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::testbed::Testbed;
use common::{require_root, require_tool};

fn ready(what: &str, tools: &[&str]) -> bool {
    require_root(what) && tools.iter().all(|t| require_tool(t, what))
}

/// nginx in the test bed's server namespace, serving `dir` on 10.77.0.2:80 with one request
/// per connection (the server closes first, as a web server under load does).
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(tb: &Testbed, dir: &Path) -> Nginx {
        let conf = tb.state.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {state}/nginx.pid;\nerror_log {state}/nginx.err;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; server {{ listen 10.77.0.2:80 backlog=4096; root {root}; \
                 keepalive_timeout 0; }} }}\n",
                state = tb.state.display(),
                root = dir.display()
            ),
        )
        .expect("nginx.conf");
        let child = tb
            .exec("server", &["nginx", "-c", conf.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        // Up when it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = tb
                .exec(
                    "client",
                    &[
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-m",
                        "2",
                        "http://10.77.0.2/small",
                    ],
                )
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "nginx did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        Nginx { child }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files to serve: `small` (1 KiB) and `big` (8 MiB).
fn web_root(tb: &Testbed) -> PathBuf {
    let dir = tb.state.join("www");
    std::fs::create_dir_all(&dir).expect("www");
    std::fs::write(dir.join("small"), vec![b'x'; 1024]).expect("small");
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(dir.join("big"), big).expect("big");
    dir
}

/// Packets every function of every runtime on `server` dropped, by counter.
fn nf_drops(tb: &Testbed, server: u32) -> Vec<(String, u64)> {
    let s = tb.stats(server);
    let mut out = Vec::new();
    for p in s["processes"].as_array().into_iter().flatten() {
        for nf in p["nfs"].as_array().into_iter().flatten() {
            for (k, v) in nf["counters"].as_object().into_iter().flatten() {
                let n = v.as_u64().unwrap_or(0);
                if (k.starts_with("drop") || k == "drops") && n > 0 {
                    out.push((format!("{}.{}.{k}", p["name"], nf["kind"]), n));
                }
            }
        }
    }
    out
}

/// One field of ApacheBench's report.
fn ab_field(report: &str, field: &str) -> Option<f64> {
    report
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn http_connections_reusing_64_ports_all_complete_through_firewall_nat_monitor() {
    if !ready(
        "the short-connection test",
        &["nginx", "ab", "curl", "ethtool"],
    ) {
        return;
    }
    let tb = Testbed::up(
        "sc",
        1,
        &["--runtimes", "2", "--chain", "firewall,nat,flow_monitor"],
    );
    let root = web_root(&tb);
    let _nginx = Nginx::start(&tb, &root);
    // 64 client ports, reused as soon as their connection is in TIME_WAIT: every 5-tuple
    // comes back dozens of times, often within a second of its previous connection's close.
    let st = tb
        .exec(
            "client",
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_local_port_range=40000 40063",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )
        .status()
        .expect("sysctl");
    assert!(st.success());
    let requests = 4000;
    for concurrency in [1, 16] {
        let out = tb
            .exec(
                "client",
                &[
                    "ab",
                    "-n",
                    &requests.to_string(),
                    "-c",
                    &concurrency.to_string(),
                    "-s",
                    "10",
                    "http://10.77.0.2/small",
                ],
            )
            .output()
            .expect("ab");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ab -c {concurrency}: {}\n{report}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            ab_field(&report, "Complete requests"),
            Some(requests as f64),
            "{report}"
        );
        assert_eq!(ab_field(&report, "Failed requests"), Some(0.0), "{report}");
        assert!(!report.contains("Non-2xx"), "{report}");
        // A connection held up by a dropped SYN waits a second for its retransmission.
        let longest = ab_field(&report, "  100%").unwrap_or(0.0);
        eprintln!(
            "ab -c {concurrency}: {} requests/s, longest {longest} ms",
            ab_field(&report, "Requests per second").unwrap_or(0.0)
        );
    }
    let drops = nf_drops(&tb, 1);
    assert!(drops.is_empty(), "functions dropped packets: {drops:?}");
    let reopened = ["rt0", "rt1"]
        .iter()
        .map(|r| tb.proc_counter(1, r, "flows_reopened"))
        .sum::<u64>();
    assert!(reopened > 0, "no port was reused while its flow lingered");
    let translated = ["rt0", "rt1"]
        .iter()
        .map(|r| tb.nf_counter(1, r, "nat", "translated_flows"))
        .sum::<u64>();
    eprintln!("{reopened} flows reopened on a reused port, {translated} translations");
    assert!(translated > 0);
}

#[test]
fn tcp_and_http_through_firewall_nat_monitor_on_two_servers() {
    if !ready(
        "the two-server NAT test",
        &["nginx", "iperf3", "curl", "ethtool"],
    ) {
        return;
    }
    let tb = Testbed::up(
        "sc2",
        2,
        &["--runtimes", "2", "--chain", "firewall,nat,flow_monitor"],
    );
    let root = web_root(&tb);
    let _nginx = Nginx::start(&tb, &root);
    let mut iperf_server = tb
        .exec("server", &["iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(400));
    let iperf = tb
        .exec(
            "client",
            &["iperf3", "-c", "10.77.0.2", "-P", "8", "-t", "4", "--json"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    // A download and a handful of short requests while the streams run.
    let curl = tb
        .exec(
            "client",
            &[
                "curl",
                "-s",
                "-m",
                "30",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                "--limit-rate",
                "4M",
                "http://10.77.0.2/big",
            ],
        )
        .output()
        .expect("curl");
    for _ in 0..20 {
        let st = tb
            .exec(
                "client",
                &[
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    "-o",
                    "/dev/null",
                    "http://10.77.0.2/small",
                ],
            )
            .status()
            .expect("curl");
        assert!(st.success(), "a short request failed");
    }
    let out = iperf.wait_with_output().expect("iperf3");
    let _ = iperf_server.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(report["error"].is_null(), "iperf3: {}", report["error"]);
    let streams = report["end"]["streams"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(streams.len(), 8, "{report}");
    for s in &streams {
        let got = s["receiver"]["bytes"].as_u64().unwrap_or(0);
        assert!(got > 1_000_000, "a stream moved only {got} bytes: {s}");
    }
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        format!("200 {}", 8u32 << 20),
        "the download"
    );
    // Flows ran on both servers' runtimes.
    for server in [1, 2] {
        let created: u64 = ["rt0", "rt1"]
            .iter()
            .map(|r| tb.proc_counter(server, r, "flows_created"))
            .sum();
        assert!(created > 0, "no flow ran on server {server}");
    }
    for server in [1, 2] {
        let drops = nf_drops(&tb, server);
        assert!(drops.is_empty(), "server {server}: {drops:?}");
        let refused: u64 = ["vs0", "rt0", "rt1"]
            .iter()
            .map(|p| tb.proc_counter(server, p, "aliases_refused"))
            .sum();
        assert_eq!(refused, 0, "server {server}: aliases refused");
    }
}

#[test]
fn the_firewall_tracks_tcp_as_the_kernels_conntrack_does() {
    if !ready("the conntrack comparison", &["nft", "ethtool"]) {
        return;
    }
    // Debian's python3-scapy belongs to /usr/bin/python3.
    let scapy = Command::new("/usr/bin/python3")
        .args(["-c", "import scapy.all"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !scapy {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the conntrack comparison needs python3-scapy, and CI=true");
        }
        eprintln!("SKIP: the conntrack comparison needs python3-scapy");
        return;
    }
    let tb = Testbed::up("ct", 1, &["--runtimes", "2", "--chain", "firewall"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/conntrack_compare.py");
    let prefix = format!("c{}", std::process::id() % 10000);
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .args(["--testbed", &tb.prefix, "--prefix", &prefix])
        .output()
        .expect("conntrack_compare.py");
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        out.status.success(),
        "the firewall and conntrack differ:\n{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.lines().count() >= 15, "{table}");
}
