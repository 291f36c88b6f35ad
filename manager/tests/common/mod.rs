//! Test harness: runs a real nfmgr (with real nf-vswitch and nf-runtime processes) from a
//! configuration, reads its region directly for statistics, and cleans up after itself.
#![allow(dead_code)]

pub mod netns;
pub mod testbed;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nflib::region::Region;
use nflib::snapshot::RegionSnapshot;

/// nfmgr, with nf-runtime and nf-vswitch built beside it.
///
/// `cargo test -p nf-manager` builds only this package's binaries, which would leave the
/// children stale, so they are built once per test process (a no-op when fresh).
/// `scripts/test.sh` builds the whole workspace first and sets `NF_BINS_FRESH=1` to skip it.
pub fn nfmgr_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nfmgr"));
    let dir = bin.parent().expect("bin dir").to_path_buf();
    let fresh = std::env::var("NF_BINS_FRESH").as_deref() == Ok("1")
        && dir.join("nf-runtime").is_file()
        && dir.join("nf-vswitch").is_file();
    if !fresh {
        BUILT.call_once(|| {
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "-q", "-p", "nf-runtime", "-p", "nf-vswitch"]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "building nf-runtime and nf-vswitch failed");
        });
    }
    bin
}

/// True when running as root. Otherwise prints why the test is skipped, and fails the test
/// when CI=true (CI runs as root, so a skip there is a broken CI).
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} needs root, and CI=true: CI must run it");
    }
    eprintln!("SKIP: {what} needs root (network namespaces, AF_PACKET)");
    false
}

/// Fails (under CI) or skips when a tool is missing.
pub fn require_tool(tool: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} needs `{tool}`, and CI=true: .ci/run must install it");
    }
    eprintln!("SKIP: {what} needs `{tool}` (not installed)");
    false
}

/// The shared captures: `NF_TESTDATA`, else `../shared/testdata/pcap` beside the project, else
/// the workplace's copy at `/work/shared/testdata/pcap`; `None` with a skip message when none
/// exists (a failure under CI).
pub fn shared_pcap_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NF_TESTDATA").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/pcap")),
        Some(PathBuf::from("/work/shared/testdata/pcap")),
    ];
    if let Some(dir) = candidates.iter().flatten().find(|d| d.is_dir()) {
        return Some(dir.clone());
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("shared captures not found (set NF_TESTDATA), and CI=true");
    }
    eprintln!("SKIP: shared captures not found beside the project (set NF_TESTDATA)");
    None
}

/// One nfmgr instance with its own directory (lock, region, reports) under /dev/shm.
pub struct Instance {
    pub name: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Instance {
    pub fn new(tag: &str) -> Instance {
        let name = format!("t{}-{}", std::process::id() % 100000, tag);
        let name: String = name.chars().take(31).collect();
        let dir = PathBuf::from(format!("/dev/shm/nftest-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        Instance {
            name,
            dir,
            child: None,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes the configuration (the instance name and directories are prepended).
    pub fn config(&self, body: &str) -> PathBuf {
        let text = format!("instance = \"{}\"\n{body}", self.name);
        // Tests keep the region in their own directory and off huge pages unless they say.
        let mut region = format!("[region]\ndir = \"{}\"", self.dir.display());
        if !body.contains("hugepages") {
            region += "\nhugepages = \"off\"";
        }
        let text = if text.contains("[region]") {
            text.replacen("[region]", &region, 1)
        } else {
            format!("{text}\n{region}\n")
        };
        // The lock and the control socket in the test's own directory too.
        let run = format!(
            "[manager]\nrun_dir = \"{}\"",
            self.dir.join("run").display()
        );
        let text = if text.contains("[manager]") {
            text.replacen("[manager]", &run, 1)
        } else {
            format!("{text}\n{run}\n")
        };
        let path = self.dir.join("nfmgr.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn start(&mut self, body: &str) {
        self.start_in(None, body)
    }

    /// Starts nfmgr with extra environment variables its processes inherit (failpoints).
    #[allow(dead_code)]
    pub fn start_with_env(&mut self, body: &str, env: &[(&str, &str)]) {
        let cfg = self.config(body);
        let log = std::fs::File::create(self.path("nfmgr.log")).expect("log");
        let child = Command::new(nfmgr_bin())
            .args(["start", "--config"])
            .arg(&cfg)
            .env("NFMGR_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn nfmgr");
        self.child = Some(child);
    }

    /// Starts nfmgr, inside network namespace `netns` if given.
    pub fn start_in(&mut self, netns: Option<&str>, body: &str) {
        let cfg = self.config(body);
        let log = std::fs::File::create(self.path("nfmgr.log")).expect("log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(nfmgr_bin());
                c
            }
            None => Command::new(nfmgr_bin()),
        };
        let child = cmd
            .args(["start", "--config"])
            .arg(&cfg)
            .env("NFMGR_LOG", "info")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn nfmgr");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("nfmgr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The region of the running instance, once it is ready.
    pub fn region(&self, timeout: Duration) -> Region {
        let deadline = Instant::now() + timeout;
        let lock = self.dir.join(format!("run/nfactor-{}.lock", self.name));
        loop {
            let ours = format!("pid={}", self.pid());
            if let Ok(text) = std::fs::read_to_string(&lock) {
                let region = text.lines().find_map(|l| l.strip_prefix("region="));
                if let Some(r) = region.filter(|_| text.lines().any(|l| l == ours)) {
                    if let Ok(region) = Region::attach(Path::new(r)) {
                        return region;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "nfmgr did not come up; log:\n{}",
                self.log()
            );
            self.assert_alive();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn assert_alive(&self) {
        if let Some(c) = &self.child {
            let alive = Path::new(&format!("/proc/{}", c.id())).exists()
                && !std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true);
            assert!(alive, "nfmgr exited; log:\n{}", self.log());
        }
    }

    /// Polls the region until `pred` holds, returning the snapshot that satisfied it.
    pub fn wait_for(
        &self,
        region: &Region,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&RegionSnapshot) -> bool,
    ) -> RegionSnapshot {
        let deadline = Instant::now() + timeout;
        loop {
            let s = RegionSnapshot::read(region);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last snapshot:\n{}\nlog:\n{}",
                serde_json::to_string_pretty(&s).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for nfmgr to exit by itself (exit_when_done).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("started");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let mut log = String::new();
                let _ = std::fs::File::open(self.dir.join("nfmgr.log"))
                    .and_then(|mut f| f.read_to_string(&mut log));
                panic!("nfmgr did not exit in {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait.
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path("report.json"))
            .unwrap_or_else(|e| panic!("no report: {e}; log:\n{}", self.log()));
        serde_json::from_str(&text).expect("report is JSON")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sum of the `drop_*` counters of a snapshot's process.
pub fn drops(p: &nflib::snapshot::ProcessSnapshot) -> u64 {
    p.counters
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| *v)
        .sum()
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime and stime are fields 14 and 15 of the
    // whole line, i.e. [11] and [12] here.
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ut + st
}

/// CPU time of a process including its threads is in /proc/PID/stat already; this adds the
/// given processes up.
pub fn total_cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}
