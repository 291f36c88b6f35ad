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

impl Drop for BumpInTheWire {
    fn drop(&mut self) {
        self.cleanup();
    }
}
