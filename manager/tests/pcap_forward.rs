//! Every capture in the shared test data replayed through a vswitch and two runtimes: each
//! frame is either recorded on the way out, byte for byte and in order within its flow, or
//! counted as dropped with a reason. Input = output + counted drops.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::Instance;
use nflib::flow::FlowKey;
use nflib::pcap::{linktype, CaptureReader};
use nflib::snapshot::RegionSnapshot;

/// The frames of a capture as the platform should carry them (Ethernet), in file order, as
/// far as the file reads cleanly; `None` for link types that cannot be carried.
fn expected_frames(path: &Path) -> Vec<Option<Vec<u8>>> {
    let bytes = std::fs::read(path).expect("read capture");
    let mut reader = CaptureReader::new(&bytes[..]).expect("capture header");
    let mut out = Vec::new();
    let mut data = Vec::new();
    while let Ok(Some(info)) = reader.next_record(&mut data) {
        let eth = |et: u16, payload: &[u8]| {
            let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
            f.extend_from_slice(&et.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        out.push(match info.linktype {
            linktype::ETHERNET => Some(data.clone()),
            linktype::IPV4 | linktype::RAW | linktype::IPV6 => match data.first().map(|b| b >> 4) {
                Some(4) => Some(eth(0x0800, &data)),
                Some(6) => Some(eth(0x86dd, &data)),
                _ => None,
            },
            linktype::LINUX_SLL if data.len() >= 16 => {
                let mut f = eth(u16::from_be_bytes([data[14], data[15]]), &data[16..]);
                if u16::from_be_bytes([data[4], data[5]]) == 6 {
                    f[6..12].copy_from_slice(&data[6..12]);
                }
                Some(f)
            }
            _ => None,
        });
    }
    out
}

fn key(frame: &[u8]) -> Option<FlowKey> {
    nflib::packet::parse(frame).ok().map(|h| FlowKey::of(&h).0)
}

fn drop_total(s: &RegionSnapshot) -> u64 {
    let procs: u64 = s.processes.iter().map(common::drops).sum();
    let ports: u64 = s
        .ports
        .iter()
        .map(|p| {
            [
                "rx_oversize",
                "rx_unsupported",
                "rx_drop_ring_full",
                "tx_drop_full",
                "tx_errors",
            ]
            .iter()
            .map(|k| p.counters[*k])
            .sum::<u64>()
        })
        .sum();
    procs + ports
}

fn replay(path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let mut inst = Instance::new("pcap");
    let out = inst.path("out.pcapng");
    inst.start(&format!(
        r#"
[manager]
exit_when_done = true
report = "report.json"
[[vswitch]]
name = "vs0"
non_ip = "pass"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[port]]
name = "in"
spec = "pcap:{}"
to = "out"
[[port]]
name = "out"
spec = "null:"
record = "{}"
"#,
        path.display(),
        out.display()
    ));
    assert!(
        inst.wait_exit(Duration::from_secs(60)).success(),
        "{name}: {}",
        inst.log()
    );
    let report = inst.report();
    let snap: RegionSnapshot =
        serde_json::from_value(report["snapshot"].clone()).unwrap_or_else(|_| panic!("snapshot"));
    let expected = expected_frames(path);
    let got: Vec<Vec<u8>> = nflib::pcap::read_all(&std::fs::read(&out).unwrap()[..])
        .expect("read recording")
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let drops = drop_total(&snap);
    assert_eq!(
        expected.len() as u64,
        got.len() as u64 + drops,
        "{name}: input {} != output {} + drops {drops}\n{}",
        expected.len(),
        got.len(),
        serde_json::to_string_pretty(&report["snapshot"]).unwrap()
    );
    // Frames that parse and fit a buffer must all come out, byte for byte, in order within
    // their flow; the others are exactly the dropped ones.
    let room = nflib::RegionConfig::default().data_room() as usize;
    let mut want: HashMap<Option<FlowKey>, Vec<Vec<u8>>> = HashMap::new();
    let mut unforwardable = 0u64;
    for f in expected.iter() {
        let fits = f.as_ref().filter(|f| f.len() <= room);
        match fits.and_then(|f| key(f).map(|k| (k, f))) {
            Some((k, f)) => want.entry(Some(k)).or_default().push(f.clone()),
            None => unforwardable += 1,
        }
    }
    let mut have: HashMap<Option<FlowKey>, Vec<Vec<u8>>> = HashMap::new();
    for f in &got {
        have.entry(key(f)).or_default().push(f.clone());
    }
    assert_eq!(
        unforwardable, drops,
        "{name}: drops must be exactly the unparseable and oversize frames"
    );
    assert_eq!(want.len(), have.len(), "{name}: flows");
    for (k, frames) in &want {
        assert_eq!(have.get(k), Some(frames), "{name}: flow {k:?} differs");
    }
    eprintln!(
        "{name}: {} frames, {} forwarded in {} flows, {drops} dropped with a reason",
        expected.len(),
        got.len(),
        want.len()
    );
}

#[test]
fn every_shared_capture_is_forwarded_or_accounted_for() {
    let Some(dir) = common::shared_pcap_dir() else {
        return;
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcap" || e == "pcapng"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the shared captures in {}",
        dir.display()
    );
    for f in files {
        replay(&f);
    }
}

/// Every capture through a chain of all the built-in functions: nothing panics or restarts,
/// and every frame is forwarded or counted as dropped (by the platform, with a reason, or by a
/// function).
#[test]
fn every_shared_capture_through_all_functions() {
    let Some(dir) = common::shared_pcap_dir() else {
        return;
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcap" || e == "pcapng"))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let mut inst = Instance::new("allnf");
        let events = inst.path("events-{runtime}.jsonl");
        inst.start(&format!(
            r#"
[manager]
exit_when_done = true
report = "report.json"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
events = "{ev}"
[[runtime]]
name = "rt1"
events = "{ev}"
[[chain]]
name = "all"
[[chain.nf]]
kind = "firewall"
default = "allow"
rules = [ {{ action = "deny", proto = "tcp", dst_port = 23 }} ]
[[chain.nf]]
kind = "flow_monitor"
[[chain.nf]]
kind = "http_parser"
[[chain.nf]]
kind = "ids"
rules = ['alert tcp any any -> any any (msg:"http"; content:"HTTP/1."; sid:1;)', 'alert udp any any -> any 53 (msg:"dns"; content:"|00 01|"; sid:2;)']
[[chain.nf]]
kind = "nat"
external_ip = "192.0.2.1"
external_mac = "02:00:00:00:00:01"
internal = "10.0.0.0/8"
[[chain.nf]]
kind = "load_balancer"
vip = "192.0.2.80"
vip_mac = "02:00:00:00:00:80"
backends = [ {{ ip = "192.0.2.81", mac = "02:00:00:00:00:81" }} ]
[[port]]
name = "in"
spec = "pcap:{}"
to = "out"
[[port]]
name = "out"
spec = "null:"
"#,
            path.display(),
            ev = events.display()
        ));
        assert!(
            inst.wait_exit(Duration::from_secs(60)).success(),
            "{name}: {}",
            inst.log()
        );
        let report = inst.report();
        let snap: RegionSnapshot = serde_json::from_value(report["snapshot"].clone()).unwrap();
        assert_eq!(
            report["deaths"],
            0,
            "{name}: a process died: {}",
            inst.log()
        );
        let input = expected_frames(&path).len() as u64;
        let output = snap.port("out").unwrap().counters["tx_pkts"];
        let nf_drops: u64 = snap
            .processes
            .iter()
            .flat_map(|p| p.nfs.iter())
            .map(|n| n.counters["drops"])
            .sum();
        let drops = drop_total(&snap) + nf_drops;
        assert_eq!(
            input,
            output + drops,
            "{name}: input {input} != output {output} + drops {drops}"
        );
        let vs = snap.process("vs0").unwrap();
        let malformed = vs.counters["drop_runt"]
            + vs.counters["drop_truncated"]
            + vs.counters["drop_malformed"];
        eprintln!("{name}: {input} frames, {output} out, {drops} dropped ({malformed} malformed or truncated, {nf_drops} by functions)");
    }
}
