//! nfmgr's listeners against clients that connect and then do nothing useful (issue 22,
//! finding 1): thousands of idle connections to the cluster port cost a bounded number of
//! threads and descriptors, so the process can still restart a runtime; a client that
//! trickles its handshake a byte at a time is cut off at the handshake's deadline; the
//! control socket and the metrics port keep answering under the same abuse.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::require_root;
use common::testbed::Testbed;

/// Opens `n` connections to `addr` inside the server's namespace and holds them, then
/// (6 s later) one that trickles a byte every 0.5 s after reading the coordinator's
/// hello; prints `open N` once they are open, `hello N` with the hello's size, and
/// `trickle closed after S` when the server closes the trickler (or `trickle alive`
/// after 12 s).
const HOSTILE: &str = r#"
import resource, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 64
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
conns = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        conns.append(s)
    except OSError:
        pass
print("open", len(conns), flush=True)
# The idle ones had their handshake's 5 s (or were closed at once, past the limit).
time.sleep(6)
t = socket.create_connection((host, port), timeout=5)
print("hello", len(t.recv(4096)), flush=True)
t.setblocking(False)
# A join frame of 1,000 bytes, announced and then sent a byte at a time.
trickle = iter(b"\x00\x00\x03\xe8" + b"\x00" * 1000)
start = time.time()
while time.time() - start < 12:
    try:
        t.send(bytes([next(trickle)]))
    except OSError:
        break
    time.sleep(0.5)
    try:
        if t.recv(4096) == b"":
            break
    except BlockingIOError:
        pass
    except OSError:
        break
else:
    print("trickle alive", flush=True)
    time.sleep(1)
    sys.exit(0)
print("trickle closed after %.1f" % (time.time() - start), flush=True)
time.sleep(1)
"#;

fn threads_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn spawn_hostile(tb: &Testbed, n: u32) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &tb.ns("s1"), "python3", "-c", HOSTILE])
        .args(["10.99.0.1", "7700", &n.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python3")
}

#[test]
fn idle_and_trickling_connections_to_the_cluster_port_cost_a_bounded_share() {
    if !require_root("the listener abuse test") || !common::require_tool("python3", "it") {
        return;
    }
    let tb = Testbed::up("ls", 1, &["--runtimes", "1"]);
    let pid = tb.pid(1);
    // A descriptor limit a stock system gives: a thread and a descriptor per connection
    // would run out long before 2,000.
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=1024:1024")
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit failed");
    let threads_before = threads_of(pid);
    let mut hostile = spawn_hostile(&tb, 2000);
    let mut out = hostile.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(&mut out)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| eprintln!("hostile: {l}"))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(4));
    let threads = threads_of(pid);
    eprintln!("nfmgr threads: {threads_before} before, {threads} under 2,000 idle connections");
    assert!(
        threads < threads_before + 40,
        "nfmgr grew from {threads_before} to {threads} threads"
    );
    // The process still does its job: a runtime killed is restarted, and the control
    // socket answers.
    let out = tb.nfmgr(1, &["kill", "rt0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    loop {
        let st = tb.json(1, &["status"]);
        let restarted = st["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "rt0" && p["state"] == "running" && p["restarts"] == 1);
        if restarted {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rt0 was not restarted: {st}\n{}",
            tb.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The trickler is cut off at the handshake's deadline (5 s), not kept forever.
    let _ = hostile.wait();
    let lines = lines.join().expect("reader");
    let closed = lines
        .iter()
        .find_map(|l| l.strip_prefix("trickle closed after "))
        .and_then(|s| s.parse::<f64>().ok());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hello ") && l != "hello 0"),
        "the trickler got a hello (a handshake place): {lines:?}"
    );
    assert!(
        closed.is_some_and(|s| (3.0..9.0).contains(&s)),
        "the trickling client was not cut off at the deadline: {lines:?}"
    );
    assert!(
        tb.log(1)
            .contains("handshakes under way; closing new connections"),
        "the refusals are logged"
    );
}
