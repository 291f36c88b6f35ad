//! The region on huge pages: scripts/setup-hugepages.sh reserves and mounts them as a
//! hugepages.conf says, nfmgr places the region there and says so, and `hugepages = "on"`
//! without usable pages is a clear error. Needs root.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{nfmgr_bin, require_root, Instance};
use nflib::slot::SlotState;

const PIPELINE: &str = r#"
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = 4
rate_pps = 100
duration_ms = 500
[[port]]
name = "sink0"
spec = "sink:"
"#;

/// Undoes the reservation and the mount however the test ends.
struct Reservation {
    conf: std::path::PathBuf,
    nr_before: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("--undo")
            .arg(&self.conf)
            .output();
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.nr_before.trim());
    }
}

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-hugepages.sh")
}

#[test]
fn region_on_hugetlbfs_as_hugepages_conf_says() {
    if !require_root("the hugepages test") {
        return;
    }
    let mut inst = Instance::new("huge");
    let mount = inst.path("huge");
    let conf = inst.path("hugepages.conf");
    std::fs::write(
        &conf,
        format!(
            "HUGEPAGES_ENABLED=yes\nHUGEPAGE_SIZE_KB=2048\nHUGEPAGE_COUNT=64\nHUGEPAGE_MOUNT={}\n",
            mount.display()
        ),
    )
    .unwrap();
    let _reservation = Reservation {
        conf: conf.clone(),
        nr_before: std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap(),
    };
    let out = Command::new("bash")
        .arg(script())
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup-hugepages.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let body = format!(
        "[region]\nbuffers = 8192\nhugepages = \"on\"\nhugepages_conf = \"{}\"\n{PIPELINE}",
        conf.display()
    );
    inst.start(&body);
    let region = inst.region(Duration::from_secs(20));
    let s = inst.wait_for(&region, Duration::from_secs(20), "traffic through", |s| {
        s.processes.iter().all(|p| p.state == SlotState::Running)
            && s.port("sink0").unwrap().counters["sink_rx"] > 0
    });
    assert!(s.hugetlbfs, "the region header says hugetlbfs");
    assert!(
        s.region.starts_with(mount.to_str().unwrap()),
        "{}",
        s.region
    );
    assert!(inst.log().contains("hugetlbfs at"), "{}", inst.log());
    drop(region);
    assert!(inst.stop().success());

    // DPDK's own memory on the same huge pages, next to the region: traffic leaves through
    // a DPDK device.
    if cfg!(feature = "dpdk") {
        let dpdk = format!(
            "[region]\nbuffers = 8192\nhugepages = \"on\"\nhugepages_conf = \"{}\"\n\
             [dpdk]\nmemory = \"hugepages\"\nmemory_mb = 64\nvdevs = [\"net_null0,no-rx=1\"]\n\
             [[vswitch]]\nname = \"vs0\"\n[[runtime]]\nname = \"rt0\"\n\
             [[port]]\nname = \"gen0\"\nspec = \"gen:\"\nto = \"out\"\nflows = 4\nrate_pps = 100\n\
             [[port]]\nname = \"out\"\nspec = \"dpdk:net_null0\"\nto = \"out\"\n",
            conf.display()
        );
        inst.start(&dpdk);
        let region = inst.region(Duration::from_secs(20));
        inst.wait_for(
            &region,
            Duration::from_secs(20),
            "traffic out of DPDK",
            |s| s.port("out").is_some_and(|p| p.counters["tx_pkts"] > 0),
        );
        drop(region);
        assert!(inst.stop().success(), "{}", inst.log());
    } else {
        eprintln!("not checked: DPDK on huge pages (nfmgr built without --features dpdk)");
    }

    // All pages in use: "on" fails with the reason, "auto" falls back to /dev/shm.
    let hog = Command::new("bash")
        .arg("-c")
        .arg(format!("fallocate -l 128M {}/hog", mount.display()))
        .status()
        .unwrap();
    assert!(hog.success());
    let cfg = inst.config(&body);
    let out = Command::new(nfmgr_bin())
        .args(["start", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("free pages"), "{err}");
    std::fs::remove_file(mount.join("hog")).unwrap();
    let undo = Command::new("bash")
        .arg(script())
        .arg("--undo")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        undo.status.success(),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
}
