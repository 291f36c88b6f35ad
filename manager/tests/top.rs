//! `nfmgr top` as an operator sees it: the demo runs, the dashboard runs inside tmux, and the
//! screen is read back with `capture-pane`.
//!
//! It shows nonzero rates for the runtimes; a runtime killed from the dashboard (`k`, then
//! `y`) and one killed from a shell (`kill -9`, as drill scripts do) are both reported, and
//! their recoveries too; a lost nfmgr is shown, not a crash; `q` and SIGTERM leave with
//! status 0. The last screens are kept in `target/top-*.txt` (the README's capture is one).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{nfmgr_bin, require_tool};

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        Tmux {
            socket: format!("nftop-{tag}-{}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// Starts `command` in a detached session of the given size.
    fn start(&self, session: &str, w: u16, h: u16, command: &str) {
        let out = self.cmd(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            &w.to_string(),
            "-y",
            &h.to_string(),
            command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Keep the pane after the command exits, so its last screen can be read.
        self.cmd(&["set-option", "-t", session, "remain-on-exit", "on"]);
    }

    fn screen(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", session]).stdout)
            .into_owned()
    }

    /// The screen and what scrolled off it.
    fn history(&self, session: &str) -> String {
        String::from_utf8_lossy(
            &self
                .cmd(&["capture-pane", "-p", "-S", "-100", "-t", session])
                .stdout,
        )
        .into_owned()
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.cmd(&args);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Waits until `pred` holds for the screen; panics with the last screen otherwise.
    fn wait_screen(
        &self,
        session: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen(session);
            if pred(&s) {
                return s;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {what}; the screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The demo's nfmgr, stopped with SIGTERM (cleanly: it removes its region) when dropped.
struct Demo(Option<Child>);

impl Demo {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_demo(instance: &str, log: &Path) -> Demo {
    let out = std::fs::File::create(log).expect("demo log");
    let child = Command::new(nfmgr_bin())
        .args([
            "demo",
            "--instance",
            instance,
            "--duration-secs",
            "300",
            "--flows",
            "64",
            "--rate",
            "200",
        ])
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the demo");
    Demo(Some(child))
}

fn keep(name: &str, screen: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("..");
    let path = dir.join(format!("top-{name}.txt"));
    let _ = std::fs::write(&path, screen);
    path
}

/// The process table row of `name` on server 1: its columns, split on spaces.
fn row<'a>(screen: &'a str, name: &str) -> Option<Vec<&'a str>> {
    screen.lines().find_map(|l| {
        let cols: Vec<&str> = l
            .split(|c: char| c.is_whitespace() || c == '│' || c == '›')
            .filter(|c| !c.is_empty())
            .collect();
        (cols.first() == Some(&name) && cols.get(1) == Some(&"runtime")).then_some(cols)
    })
}

/// RX pps of a runtime in the 80-column process table (NAME KIND SRV STATE RX ...).
fn rx_of(screen: &str, name: &str) -> Option<String> {
    let cols = row(screen, name)?;
    (cols.get(3) == Some(&"running")).then(|| cols[4].to_string())
}

fn pid_of(instance: &str, name: &str) -> u32 {
    let out = Command::new(nfmgr_bin())
        .args(["status", "--instance", instance, "--json"])
        .output()
        .expect("nfmgr status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["pid"].as_u64())
        .expect("pid in status") as u32
}

#[test]
fn top_shows_rates_and_reports_killed_runtimes() {
    if !require_tool("tmux", "the nfmgr top end-to-end test") {
        return;
    }
    let instance = format!("toptest{}", std::process::id());
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let demo_log = tmp.join(format!("{instance}.log"));
    let mut demo = start_demo(&instance, &demo_log);
    let tmux = Tmux::new("e2e");
    let exit_file = tmp.join(format!("{instance}.exit"));
    let _ = std::fs::remove_file(&exit_file);
    let top = format!(
        "{} top --instance {instance}; echo $? > {}",
        nfmgr_bin().display(),
        exit_file.display()
    );
    tmux.start("top", 80, 24, &top);

    // Nonzero rates for both runtimes (the first answer has none: rates need two).
    let s = tmux.wait_screen(
        "top",
        "nonzero runtime rates",
        Duration::from_secs(30),
        |s| {
            ["rt0", "rt1"]
                .iter()
                .all(|r| rx_of(s, r).is_some_and(|rx| rx != "0"))
        },
    );
    assert!(s.contains("LIVE"), "{s}");
    keep("live", &s);

    // Kill rt0 from the dashboard: filter to it, k, see the confirmation, y.
    tmux.keys("top", &["/", "rt0", "Enter"]);
    tmux.keys("top", &["k"]);
    let s = tmux.wait_screen(
        "top",
        "the kill confirmation",
        Duration::from_secs(5),
        |s| s.contains("Kill rt0@1"),
    );
    assert!(s.contains("SIGKILL?"), "{s}");
    tmux.keys("top", &["y"]);
    keep("killed-overview", &tmux.screen("top"));
    // The Events view: the overview's event box at 80x24 holds only the last three.
    // (Escape alone: crossterm reads Escape and a key sent with it as Alt+key.)
    tmux.keys("top", &["Escape"]);
    tmux.keys("top", &["5"]);
    let s = tmux.wait_screen(
        "top",
        "rt0's death in the events",
        Duration::from_secs(10),
        |s| s.contains("rt0@1 killed with SIGKILL by operator") && s.contains("rt0@1 pid"),
    );
    keep("killed", &s);

    // Kill rt1 from a shell, as a drill script would.
    let pid = pid_of(&instance, "rt1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill rt1");
    let s = tmux.wait_screen(
        "top",
        "rt1's death in the events",
        Duration::from_secs(10),
        |s| s.contains(&format!("rt1@1 pid {pid} killed by SIGKILL")),
    );
    keep("killed-from-shell", &s);

    // Both recoveries, with their durations, in the Migrations view; rates come back.
    tmux.keys("top", &["4"]);
    let s = tmux.wait_screen("top", "two recoveries", Duration::from_secs(20), |s| {
        s.matches("recovered").count() >= 2
    });
    assert!(s.contains("rt0@1") && s.contains("rt1@1"), "{s}");
    assert!(s.contains("killed by SIGKILL (9)"), "{s}");
    keep("recoveries", &s);
    tmux.keys("top", &["1"]);
    tmux.wait_screen(
        "top",
        "both running and traffic through them after the restarts",
        Duration::from_secs(30),
        |s| {
            // A dead runtime's flows move to the live one and stay there, so after two
            // kills one runtime may carry every flow.
            let rates: Vec<Option<String>> = ["rt0", "rt1"].iter().map(|r| rx_of(s, r)).collect();
            rates.iter().all(|r| r.is_some()) && rates.iter().flatten().any(|rx| rx != "0")
        },
    );

    // The help lists the keys; q leaves with status 0.
    tmux.keys("top", &["?"]);
    tmux.wait_screen("top", "the help", Duration::from_secs(5), |s| {
        s.contains("Keys")
    });
    tmux.keys("top", &["Escape"]);
    tmux.keys("top", &["q"]);
    let start = Instant::now();
    while !exit_file.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = std::fs::read_to_string(&exit_file).unwrap_or_default();
    assert_eq!(code.trim(), "0", "nfmgr top exit status after q");

    // A second dashboard: nfmgr goes away, the dashboard says so and keeps trying; SIGTERM
    // ends it cleanly.
    let _ = std::fs::remove_file(&exit_file);
    tmux.start("top2", 80, 24, &top);
    tmux.wait_screen(
        "top2",
        "a live second dashboard",
        Duration::from_secs(20),
        |s| s.contains("LIVE"),
    );
    demo.stop();
    let s = tmux.wait_screen(
        "top2",
        "the lost connection",
        Duration::from_secs(20),
        |s| s.contains("NFMGR LOST"),
    );
    assert!(s.contains("retrying"), "{s}");
    keep("lost", &s);
    // The pane runs `sh -c "nfmgr top ...; echo $? > FILE"`: signal the nfmgr, not the shell.
    let out = Command::new("pgrep")
        .args([
            "-f",
            &format!("^{} top --instance {instance}", nfmgr_bin().display()),
        ])
        .output()
        .expect("pgrep");
    let top_pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("one nfmgr top running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(top_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to nfmgr top");
    let start = Instant::now();
    while !exit_file.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = std::fs::read_to_string(&exit_file).unwrap_or_default();
    assert_eq!(code.trim(), "0", "nfmgr top exit status after SIGTERM");
    let s = tmux.history("top2");
    assert!(
        s.contains("stopped by SIGTERM"),
        "the terminal is restored and the reason printed:\n{s}"
    );
}
