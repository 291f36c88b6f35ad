//! Network namespaces joined by veth pairs, for tests that need real kernel networking.
#![allow(dead_code)]

use std::process::{Command, Output};

pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A bump in the wire: `client` (10.77.0.1) -- [c1 in `mid` s1] -- `server` (10.77.0.2).
/// Offloads are off on every end, as the AF_PACKET port requires.
pub struct BumpInTheWire {
    pub client: String,
    pub mid: String,
    pub server: String,
}

pub const CLIENT_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";

impl BumpInTheWire {
    pub fn new(tag: &str) -> BumpInTheWire {
        let id = std::process::id() % 100000;
        let b = BumpInTheWire {
            client: format!("nfc{tag}{id}"),
            mid: format!("nfm{tag}{id}"),
            server: format!("nfs{tag}{id}"),
        };
        b.cleanup();
        for ns in [&b.client, &b.mid, &b.server] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", "c0", "netns", &b.client, "type", "veth", "peer", "name", "c1",
            "netns", &b.mid,
        ]);
        sh(&[
            "ip", "link", "add", "s0", "netns", &b.server, "type", "veth", "peer", "name", "s1",
            "netns", &b.mid,
        ]);
        sh(&[
            "ip",
            "-n",
            &b.client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "c0",
        ]);
        sh(&[
            "ip",
            "-n",
            &b.server,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "s0",
        ]);
        for (ns, dev) in [
            (&b.client, "c0"),
            (&b.mid, "c1"),
            (&b.mid, "s1"),
            (&b.server, "s0"),
        ] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                "off", "tx", "off",
            ]);
        }
        b
    }

    /// The MAC address of `dev` in `ns`.
    pub fn mac(&self, ns: &str, dev: &str) -> String {
        let out = sh(&["ip", "-n", ns, "-o", "link", "show", dev]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text}"))
            .to_string()
    }

    /// Adds another address to `dev` in `ns`.
    pub fn add_addr(&self, ns: &str, dev: &str, cidr: &str) {
        sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
    }

    /// Runs an HTTP server for `dir` on `ip:port` in `ns` until the returned guard drops.
    pub fn http_server(&self, ns: &str, ip: &str, port: u16, dir: &std::path::Path) -> Server {
        let log = std::fs::File::create(dir.join(format!("../http-{ip}-{port}.log")))
            .expect("server log");
        let child = self
            .exec(
                ns,
                &[
                    "python3",
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    ip,
                ],
            )
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("http server");
        Server(child)
    }

    /// Fetches `url` from the client namespace into `out`, retrying while the server starts.
    pub fn curl(&self, url: &str, out: &std::path::Path, timeout_s: u32) -> Output {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let o = self
                .exec(
                    &self.client,
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        &timeout_s.to_string(),
                        "-o",
                        out.to_str().unwrap(),
                        "-w",
                        "%{http_code}",
                        url,
                    ],
                )
                .output()
                .expect("curl");
            // Connection refused while the server is still starting: try again.
            if o.status.code() != Some(7) || std::time::Instant::now() > deadline {
                return o;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c
    }

    fn cleanup(&self) {
        for ns in [&self.client, &self.mid, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A server process that is killed when dropped.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for BumpInTheWire {
    fn drop(&mut self) {
        self.cleanup();
    }
}
