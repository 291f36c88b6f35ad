//! The multi-server test bed (`scripts/testbed.sh`) from tests: brought up with this build's
//! binaries, queried through each server's control socket, torn down on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Testbed {
    pub prefix: String,
    pub state: PathBuf,
    bin: PathBuf,
    script: PathBuf,
}

impl Testbed {
    /// Brings up `servers` servers (see the script for `extra` options); panics with the
    /// servers' logs if the cluster does not form.
    pub fn up(tag: &str, servers: u32, extra: &[&str]) -> Testbed {
        Testbed::up_with_env(tag, servers, extra, &[])
    }

    /// As `up`, with environment variables every server's processes inherit (failpoints).
    pub fn up_with_env(tag: &str, servers: u32, extra: &[&str], env: &[(&str, &str)]) -> Testbed {
        let bin = super::nfmgr_bin();
        let dir = bin.parent().expect("bin dir").to_path_buf();
        let prefix = format!("t{}{tag}", std::process::id() % 10000);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed.sh");
        let tb = Testbed {
            state: PathBuf::from(format!("/tmp/nf-testbed-{prefix}")),
            prefix,
            bin,
            script,
        };
        let servers = servers.to_string();
        let mut args = vec![
            "up",
            "--prefix",
            &tb.prefix,
            "--servers",
            &servers,
            "--bin",
            dir.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let out = Command::new("bash")
            .arg(&tb.script)
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run testbed.sh");
        assert!(
            out.status.success(),
            "testbed up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tb
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn socket(&self, server: u32) -> PathBuf {
        self.state.join(format!("s{server}.sock"))
    }

    /// Runs an nfmgr CLI subcommand against server `server`.
    pub fn nfmgr(&self, server: u32, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .arg("--socket")
            .arg(self.socket(server))
            .output()
            .expect("run nfmgr")
    }

    /// Starts an nfmgr CLI subcommand against server `server` (output captured).
    #[allow(dead_code)]
    pub fn exec_nfmgr(&self, server: u32, args: &[&str]) -> std::process::Child {
        Command::new(&self.bin)
            .args(args)
            .arg("--socket")
            .arg(self.socket(server))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nfmgr")
    }

    /// The JSON answer of a subcommand (panics on failure, with its error).
    pub fn json(&self, server: u32, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.nfmgr(server, &a);
        assert!(
            out.status.success(),
            "nfmgr {args:?} on server {server}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON answer")
    }

    /// `nfmgr stats --json` of server `server`, read from its region.
    pub fn stats(&self, server: u32) -> serde_json::Value {
        let out = Command::new(&self.bin)
            .args(["stats", "--json", "--instance"])
            .arg(format!("{}-s{server}", self.prefix))
            .arg("--dir")
            .arg(self.state.join(format!("s{server}")))
            .output()
            .expect("run nfmgr stats");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// A process's counter on server `server` (summed over processes of that name).
    pub fn proc_counter(&self, server: u32, name: &str, counter: &str) -> u64 {
        self.stats(server)["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == name)
            .filter_map(|p| p["counters"][counter].as_u64())
            .sum()
    }

    /// A function's counter in runtime `runtime` on server `server`.
    pub fn nf_counter(&self, server: u32, runtime: &str, nf: &str, counter: &str) -> u64 {
        self.stats(server)["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == runtime)
            .flat_map(|p| p["nfs"].as_array().cloned().unwrap_or_default())
            .filter(|n| n["kind"] == nf)
            .filter_map(|n| n["counters"][counter].as_u64())
            .sum()
    }

    /// A counter of port `port` on server `server`.
    pub fn port_counter(&self, server: u32, port: &str, counter: &str) -> u64 {
        let s = self.stats(server);
        s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == port)
            .and_then(|p| p["counters"][counter].as_u64())
            .unwrap_or(0)
    }

    /// The pid of server `server`'s nfmgr.
    pub fn pid(&self, server: u32) -> u32 {
        std::fs::read_to_string(self.state.join(format!("s{server}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("nfmgr pid")
    }

    /// Waits until a killed process has exited (a zombie has released everything).
    pub fn wait_gone(pid: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                {
                    return
                }
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        panic!("process {pid} did not exit");
    }

    /// Starts server `server`'s nfmgr again (after a test killed it and it exited). While
    /// the kernel is still tearing the old one down its instance lock may be held a little
    /// longer: retried for a few seconds.
    pub fn restart(&self, server: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log_path = self.state.join(format!("s{server}.log"));
            let before = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let log = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log_path)
                .expect("log");
            let mut child = Command::new("ip")
                .args(["netns", "exec", &self.ns(&format!("s{server}"))])
                .arg(&self.bin)
                .arg("start")
                .arg("--config")
                .arg(self.state.join(format!("s{server}.toml")))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start nfmgr");
            std::fs::write(
                self.state.join(format!("s{server}.pid")),
                child.id().to_string(),
            )
            .expect("pid file");
            std::thread::sleep(std::time::Duration::from_millis(300));
            match child.try_wait() {
                Ok(None) => {
                    // Running; the test bed's `down` stops it.
                    std::mem::forget(child);
                    return;
                }
                Ok(Some(st)) => {
                    let text = std::fs::read(&log_path).unwrap_or_default();
                    let new = String::from_utf8_lossy(&text[before as usize..]).to_string();
                    if new.contains("already running") && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        continue;
                    }
                    panic!("nfmgr of server {server} exited at once ({st}):\n{new}");
                }
                Err(e) => panic!("cannot watch nfmgr: {e}"),
            }
        }
    }

    pub fn log(&self, server: u32) -> String {
        std::fs::read_to_string(self.state.join(format!("s{server}.log"))).unwrap_or_default()
    }

    /// Runs a command in namespace `<prefix>-<name>`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name)]).args(args);
        c
    }

    /// The cluster key the test bed made.
    pub fn cluster_key(&self) -> Vec<u8> {
        let hex = std::fs::read_to_string(self.state.join("cluster.key")).expect("key");
        let hex = hex.trim();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .args(["down", "--prefix", &self.prefix])
            .output();
    }
}
