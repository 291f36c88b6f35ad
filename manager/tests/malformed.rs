//! Malformed input (runts, truncated and inconsistent headers, garbage, frames larger than a
//! buffer, link types that cannot be carried, a capture file that breaks off) is dropped and
//! counted by reason; nothing panics, no process restarts, and good frames still flow.

mod common;

use std::time::Duration;

use common::Instance;
use nflib::packet::build::UdpV4;
use nflib::pcap::{linktype, CaptureFormat, CaptureWriter};
use nflib::snapshot::RegionSnapshot;

fn udp() -> Vec<u8> {
    let mut b = vec![0u8; 128];
    let n = UdpV4 {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: [10, 1, 0, 1],
        dst_ip: [10, 1, 0, 2],
        src_port: 4000,
        dst_port: 53,
        payload_len: 30,
    }
    .write(&mut b)
    .unwrap();
    b.truncate(n);
    b
}

fn write_capture(path: &std::path::Path, lt: u32, frames: &[Vec<u8>]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = CaptureWriter::new(f, CaptureFormat::Pcap, lt, 65535).unwrap();
    for (i, fr) in frames.iter().enumerate() {
        w.write_packet(i as u64 * 1000, fr, fr.len() as u32)
            .unwrap();
    }
    w.flush().unwrap();
}

#[test]
fn malformed_frames_are_dropped_and_counted_never_a_panic() {
    let mut inst = Instance::new("malformed");
    let good = udp();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    frames.push(good.clone());
    frames.push(vec![0xff; 10]); // runt
    let mut truncated = good.clone();
    truncated.truncate(30); // IPv4 header cut short
    frames.push(truncated);
    let mut short_total = good.clone();
    short_total[16] = 0x05; // IPv4 total length 1280 > frame
    frames.push(short_total);
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x42; // IHL 2
    frames.push(bad_ihl);
    let mut bad_version = good.clone();
    bad_version[14] = 0x55;
    frames.push(bad_version);
    let mut bad_udp_len = good.clone();
    bad_udp_len[38] = 0;
    bad_udp_len[39] = 3;
    frames.push(bad_udp_len);
    // Garbage claiming to be IPv6, from a fixed-seed generator.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut garbage = vec![0u8; 200];
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    garbage[12] = 0x86;
    garbage[13] = 0xdd;
    frames.push(garbage);
    let mut oversize = good.clone();
    oversize.resize(4000, 0xab);
    frames.push(oversize);
    frames.push(good.clone());
    write_capture(&inst.path("bad.pcap"), linktype::ETHERNET, &frames);
    // A link type the platform cannot carry.
    write_capture(&inst.path("ppi.pcap"), 192, &[good.clone(), good.clone()]);
    // A capture that breaks off inside its second record.
    write_capture(
        &inst.path("cut.pcap"),
        linktype::ETHERNET,
        &[good.clone(), good.clone()],
    );
    let full = std::fs::read(inst.path("cut.pcap")).unwrap();
    std::fs::write(inst.path("cut.pcap"), &full[..full.len() - 20]).unwrap();

    inst.start(&format!(
        r#"
[manager]
exit_when_done = true
report = "report.json"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "bad"
spec = "pcap:{}"
to = "out"
[[port]]
name = "ppi"
spec = "pcap:{}"
to = "out"
[[port]]
name = "cut"
spec = "pcap:{}"
to = "out"
[[port]]
name = "out"
spec = "null:"
"#,
        inst.path("bad.pcap").display(),
        inst.path("ppi.pcap").display(),
        inst.path("cut.pcap").display()
    ));
    assert!(
        inst.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        inst.log()
    );
    let report = inst.report();
    let snap: RegionSnapshot = serde_json::from_value(report["snapshot"].clone()).unwrap();
    let vs = snap.process("vs0").unwrap();
    let c = |k: &str| vs.counters[k];
    assert_eq!(c("drop_runt"), 1, "{:#?}", vs.counters);
    assert_eq!(c("drop_truncated"), 2, "{:#?}", vs.counters);
    assert_eq!(c("drop_malformed"), 4, "{:#?}", vs.counters);
    let bad = snap.port("bad").unwrap();
    assert_eq!(bad.counters["rx_oversize"], 1);
    assert_eq!(snap.port("ppi").unwrap().counters["rx_unsupported"], 2);
    // Good frames: two in bad.pcap, the first of cut.pcap.
    assert_eq!(snap.port("out").unwrap().counters["tx_pkts"], 3);
    assert!(report["ports"]["cut"]["error"]
        .as_str()
        .unwrap_or("")
        .contains("truncated"));
    for p in &snap.processes {
        assert_eq!(p.restarts, 0, "{} restarted", p.name);
    }
    assert_eq!(report["deaths"], 0, "no process died: {}", inst.log());
    assert_eq!(snap.pool.double_frees, 0);
}
