#!/usr/bin/env python3
"""Data-plane benchmarks, each next to a reference measured in the same run on the same cores.

  scripts/bench/run.py            full run (about 5 minutes), results in target/bench/
  scripts/bench/run.py --smoke    a short pass that checks every benchmark still runs (CI)
  scripts/bench/run.py --only messages    just the actor-message benchmark (root: test bed)
  scripts/bench/run.py --only migration   just the flow-migration benchmark (root: test bed)
  scripts/bench/run.py --only dpdk        just the DPDK port benchmark (root, DPDK installed)
  scripts/bench/run.py --only cps         just the connections-per-second benchmark (root)
  scripts/bench/run.py --only newflows    just the new-flow rate benchmark (root)
  scripts/bench/run.py --only replication just the replication benchmark (takeover: root)

References (../shared/design/BENCHMARKS.md):
  - dpdk-testpmd, macswap and io forwarding on two net_null ports, lcores 0-1;
  - DPDK's ring_perf_autotest (rte_ring with 16-byte elements between two cores).
Ours:
  - ring and pool micro-benchmarks (nflib/benches/ring_pool.rs);
  - one runtime core (core 1, the core testpmd forwards on) running firewall -> flow monitor
    -> load balancer on 64-byte packets of 10k, 100k and 1M flows, with the platform's memory
    per flow (runtime/benches/chain.rs);
  - end to end: generator -> vswitch -> runtime -> sink, 64-byte packets, 1000 flows, nfmgr on
    core 0 and the vswitch and runtime sharing core 1, two figures, each repeated (median and
    spread):
      capacity: the rate delivered with the generator unpaced (always more offered than the
        platform takes, as testpmd on net_null always has packets): compare with testpmd;
      loss-bounded: the highest paced rate delivered with at most 0.1 % loss (binary search).
  - actor messages (root; the test bed of scripts/testbed.sh, two servers of two runtimes):
    throughput (messages/s and Gbit/s) by message size and one-way latency (one message
    outstanding), between two runtimes of one host (shared-memory rings through nfmgr) and
    between two servers (signed raw frames over veth and a bridge). References over the same
    paths in the same run: iperf3 TCP (Gbit/s), iperf3 UDP with 64-byte datagrams
    (datagrams/s) and ping (half the round trip); loopback stands in for "one host".
  - flow migration (root; the test bed): time to move 500 to 600,000 flows from one runtime
    to another of the same server, and to a runtime of another server, under generator
    traffic, with the sink counting loss and reordering per flow. References (published, not
    re-run: no OpenNF or NFActor build exists for this machine): NFActor 1.5 ms for 1,000
    flows and about 700 ms for 600,000 over 3 runtime pairs; OpenNF 217 ms for 1,000 flows.
  - connections per second (root; the test bed, nginx and ApacheBench): HTTP requests of a
    1 KiB file, one new TCP connection each, at 1, 8, 32 and 128 concurrent clients,
    through chains `firewall` and `firewall -> nat -> flow_monitor`, next to the kernel
    forwarding between namespaces with an nftables conntrack firewall, alternated in one
    run: requests/s, the client's retransmissions, CPU seconds per 1,000 requests (all
    cores), and every platform drop counter that moved.
  - new flows (root): flows set up and torn down a second by one runtime core (firewall ->
    flow monitor; UDP with every packet a new flow, ending by timeout, and TCP with every
    7 packets a whole connection, SYN to last ACK), next to the kernel's conntrack on one
    core setting up the same generated flows (a router namespace with an nftables
    stateful ruleset, its receive work steered to one core).
  - DPDK ports (root, nfmgr built with DPDK): generator -> vswitch -> runtime -> egress, the
    egress being the platform's own null port or a DPDK net_null device (same cores), next
    to testpmd io on net_null in the same run: what the DPDK port costs over no device.
  - replication: generator -> vswitch -> two runtimes of firewall -> flow_monitor that
    replicate to each other -> sink, one host (nfmgr on core 0, the rest on core 1), with
    replication off, periodic and output-commit in the same run: loss-bounded throughput
    (<= 0.1 % sink loss) and its ratio to off, latency p50/p99 at 10 % and 50 % of off's
    loss-bounded rate; and (root, the test bed) detection and takeover of a killed
    runtime's 10,000, 50,000 and 100,000 flows (one host), and of a server's 10,000 and
    50,000 flows killed (kill -9 of its nfmgr) or cut off (its cluster link down), from
    the platform's events, with false link-down detections counted.
Every result is one JSON line on stdout and in target/bench/results-<timestamp>.jsonl.

NF_BENCH_BIN=DIR runs the platform's binaries (nfmgr, nf-runtime, nf-vswitch ...) from DIR
instead of target/release: the test bed's (testbed.sh --bin) and every nfmgr call. The build
step still builds target/release, so pass --no-build with it (scripts/bench/ab.py --migration
does, to alternate two builds).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The platform's binaries: NF_BENCH_BIN, else the workspace's release build.
BIN = os.path.abspath(os.environ.get("NF_BENCH_BIN") or os.path.join(ROOT, "target", "release"))
NFMGR = os.path.join(BIN, "nfmgr")
RESULTS = []


def emit(obj):
    obj.setdefault("date", datetime.date.today().isoformat())
    RESULTS.append(obj)
    print(json.dumps(obj), flush=True)


def have(tool):
    return shutil.which(tool) is not None


def require(tool, smoke):
    """Missing references are fatal in CI, a warning otherwise."""
    if have(tool):
        return True
    msg = f"{tool} is not installed (apt-get install dpdk-dev); its reference is skipped"
    if os.environ.get("CI") == "true":
        sys.exit(f"bench: {msg}, and CI=true")
    print(f"bench: SKIP: {msg}", file=sys.stderr)
    return False


# ---------------------------------------------------------------- references

def testpmd(mode, secs):
    """Median per-port Rx pps of testpmd forwarding between two net_null ports."""
    cmd = [
        "dpdk-testpmd", "-l", "0-1", "--no-pci", "--no-huge", "-m", "1024",
        "--vdev=net_null0,copy=1", "--vdev=net_null1,copy=1", "--",
        "--total-num-mbufs=16384", f"--forward-mode={mode}", "-a", "--stats-period", "1",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 2).stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    # Stats blocks alternate port 0, port 1; take port 0's, skipping samples from before
    # forwarding started and the first (partial) second.
    rates = [int(v) for v in re.findall(r"Rx-pps:\s+(\d+)", out)]
    port0 = [r for r in rates[0::2] if r > 0][1:]
    if not port0:
        raise RuntimeError(f"no rates from testpmd:\n{out[-2000:]}")
    return statistics.median(port0)


def ring_perf():
    """rte_ring, 16-byte elements, SP/SC bulk between two cores: cycles per element."""
    out = subprocess.run(
        ["dpdk-test", "-l", "0-1", "--no-pci", "--no-huge", "-m", "512"],
        input="ring_perf_autotest\n", capture_output=True, text=True, timeout=300,
    ).stdout
    res = {}
    section = None
    for line in out.splitlines():
        if "Testing using two physical cores" in line:
            section = "two_cores"
        elif line.startswith("###"):
            section = None
        m = re.match(r"elem APIs: element size 16B: SP/SC: bulk \(size: (\d+)\): ([\d.]+)", line)
        if m and section == "two_cores":
            res[int(m.group(1))] = float(m.group(2))
    return res


# ---------------------------------------------------------------- ours

def cpu_mhz():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return 0.0


def cargo_bench(package, bench, smoke):
    env = dict(os.environ)
    if smoke:
        env["NF_BENCH_SMOKE"] = "1"
    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", package, "--bench", bench],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


# nfmgr on core 0, until the generator is done, with a report: shared by the end-to-end
# and DPDK port configurations.
BENCH_HEAD = """
instance = "{instance}"
[region]
dir = "{dir}"
hugepages = "off"
buffers = 65536
data_ring_size = 16384
[manager]
core = 0
exit_when_done = true
report = "report.json"
idle_poll_us = 20
"""

# A generator into a sink, through whatever the configuration puts between them.
GEN_SINK_PORTS = """[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = {flows}
rate_pps = {rate}
packet_size = 64
duration_ms = {ms}
[[port]]
name = "sink0"
spec = "sink:"
"""

E2E_CONFIG = BENCH_HEAD + """[[vswitch]]
name = "vs0"
core = 1
[[runtime]]
name = "rt0"
core = 1
""" + GEN_SINK_PORTS


def run_report(template, secs, **fields):
    """Runs nfmgr (of BIN) on `template` filled with `fields` for about `secs` seconds in a
    fresh directory and returns its final report."""
    d = tempfile.mkdtemp(prefix="nfbench-", dir="/dev/shm")
    try:
        cfg = os.path.join(d, "bench.toml")
        with open(cfg, "w") as f:
            f.write(template.format(instance=f"bench{os.getpid()}", dir=d, **fields))
        subprocess.run([NFMGR, "start", "-c", cfg], check=True, capture_output=True,
                       timeout=secs + 60)
        with open(os.path.join(d, "report.json")) as f:
            return json.load(f)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def gen_sink_figures(rep, secs):
    """Offered and delivered rates, loss and the sink's latency from a generator -> sink
    run's report."""
    gen, sink = rep["ports"]["gen0"], rep["ports"]["sink0"]
    offered = gen["sent"] + gen["skipped"]
    delivered = sink["received"]
    return {
        "offered_mpps": round(offered / secs / 1e6, 3),
        "delivered_mpps": round(delivered / secs / 1e6, 3),
        "loss": 1 - delivered / offered if offered else 1.0,
        "latency_p50_us": round(sink.get("latency_p50_ns", 0) / 1000, 1),
        "latency_p99_us": round(sink.get("latency_p99_ns", 0) / 1000, 1),
        "latency_avg_us": round(sink["latency_avg_ns"] / 1000, 1),
    }


def e2e_trial(mpps, secs, flows=1000):
    """One run at `mpps` offered (0 = unpaced)."""
    rep = run_report(E2E_CONFIG, secs, flows=flows, rate=mpps * 1e6 / flows if mpps else 0,
                     ms=int(secs * 1000))
    sink = rep["ports"]["sink0"]
    return {
        **gen_sink_figures(rep, secs),
        "duplicates": sink["duplicates"],
        "reordered": sink["reordered"],
    }


def loss_bounded(trial, lo, hi, steps, max_loss=0.001):
    """Bisects for the highest offered rate (Mpps) that `trial(rate)` carries with loss <=
    max_loss; returns (rate, that trial's figures), or None if even `lo`'s half fails."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        t = trial(mid)
        if t["loss"] <= max_loss:
            best, lo = (mid, t), mid
        else:
            hi = mid
    return best


def e2e_search(secs, lo=0.5, hi=10.0, steps=6, max_loss=0.001):
    """Highest offered rate (Mpps) delivered with loss <= max_loss."""
    return loss_bounded(lambda r: e2e_trial(r, secs), lo, hi, steps, max_loss)


# ---------------------------------------------------------------- DPDK ports

DPDK_CONFIG = BENCH_HEAD + """[dpdk]
lcores = "0"
vdevs = ["net_null0,no-rx=1"]
[[vswitch]]
name = "vs0"
core = 1
[[runtime]]
name = "rt0"
core = 1
[[port]]
name = "gen0"
spec = "gen:"
to = "out"
flows = {flows}
rate_pps = 0
packet_size = 64
duration_ms = {ms}
[[port]]
name = "out"
spec = "{egress}"
{to_line}
"""


def dpdk_available():
    return subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode == 0


def egress_trial(egress, secs, flows=1000):
    """Unpaced generator -> vswitch -> runtime -> `egress`; the rate the egress port sent."""
    rep = run_report(DPDK_CONFIG, secs, flows=flows, ms=int(secs * 1000), egress=egress,
                     # A DPDK port also receives (nothing: no-rx=1).
                     to_line='to = "out"' if egress.startswith("dpdk:") else "")
    out = next(p for p in rep["snapshot"]["ports"] if p["name"] == "out")["counters"]
    gen = rep["ports"]["gen0"]
    return {
        "egress": egress,
        "sent_mpps": round(out["tx_pkts"] / secs / 1e6, 3),
        "offered_mpps": round((gen["sent"] + gen["skipped"]) / secs / 1e6, 3),
        "tx_dropped": out.get("tx_drop_full", 0),
        "device_errors": out.get("dev_oerrors", 0),
    }


def dpdk_ports(smoke, repeat, ref):
    """The same pipeline ending at the platform's own null port and at a DPDK net_null
    device: the difference is what the DPDK port costs (no copy: mbufs are pinned to the
    region's buffers)."""
    if not dpdk_available() or os.geteuid() != 0:
        msg = "the DPDK port benchmark needs root and nfmgr built with DPDK (libdpdk-dev)"
        if os.environ.get("CI") == "true":
            sys.exit(f"bench: {msg}, and CI=true")
        print(f"bench: SKIP {msg}", file=sys.stderr)
        return
    secs = 1 if smoke else 4
    rates = {}
    for egress in ("null:", "dpdk:net_null0"):
        runs = [egress_trial(egress, secs, flows=100 if smoke else 1000) for _ in range(repeat)]
        for t in runs:
            emit({"bench": "dpdk port", "mode": "trial", **t})
        rates[egress] = statistics.median(t["sent_mpps"] for t in runs)
        if smoke and runs[0]["sent_mpps"] <= 0:
            sys.exit(f"bench: nothing left through {egress}")
    summary = {"bench": "dpdk port", "mode": "summary",
               "platform_null_mpps": rates["null:"], "dpdk_net_null_mpps": rates["dpdk:net_null0"],
               "dpdk_over_platform": round(rates["dpdk:net_null0"] / rates["null:"], 3)
               if rates["null:"] else None}
    if "io" in ref:
        summary["testpmd_io_net_null_mpps"] = round(ref["io"] / 1e6, 2)
    emit(summary)


# ---------------------------------------------------------------- main

# ---------------------------------------------------------------- actor messages

MSG_SIZES = (64, 256, 1024, 4096, 16384)


def testbed(*args):
    return subprocess.run([os.path.join(ROOT, "scripts", "testbed.sh"), *args, "--prefix", "bm",
                           "--bin", BIN],
                          cwd=ROOT, capture_output=True, text=True)


def in_ns(server, cmd, timeout=60):
    r = subprocess.run(["ip", "netns", "exec", f"bm-s{server}", *cmd], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in bm-s{server}: {r.stderr.strip()[-500:]}")
    return r.stdout


def nfmgr(*args, timeout=120):
    r = subprocess.run([NFMGR, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"nfmgr {' '.join(args)}: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def msgtest(frm, to, count, size, depth=0):
    r = nfmgr("msgtest", "--socket", "/tmp/nf-testbed-bm/s1.sock", "--from", frm, "--to", to,
              "--count", str(count), "--size", str(size), "--depth", str(depth), "--json",
              "--timeout-s", "120", timeout=200)
    if not r["exactly_once_in_order"]:
        raise RuntimeError(f"msgtest {frm} -> {to} was not exact: {r}")
    return r


def ping_one_way_us(server, addr, count):
    """Half the average round trip of ICMP echo (56 bytes), sent every 2 ms."""
    out = in_ns(server, ["ping", "-q", "-n", "-c", str(count), "-i", "0.002", addr])
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise RuntimeError(f"no ping summary: {out}")
    return float(m.group(1)) * 1000 / 2


def iperf3(server, addr, secs, udp_size=None):
    """TCP Gbit/s, or for UDP datagrams of udp_size bytes, datagrams/s received."""
    srv = subprocess.Popen(["ip", "netns", "exec", "bm-s2" if addr != "127.0.0.1" else
                            f"bm-s{server}", "iperf3", "-s", "-1", "-p", "5299"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        cmd = ["iperf3", "-c", addr, "-p", "5299", "-t", str(secs), "-J"]
        if udp_size:
            cmd += ["-u", "-b", "0", "-l", str(udp_size)]
        r = json.loads(in_ns(server, cmd, timeout=secs + 30))
    finally:
        srv.wait(timeout=10)
    end = r["end"]
    if udp_size:
        s = end["sum"]
        secs_ = s["seconds"] or secs
        return (s["packets"] - s["lost_packets"]) / secs_
    return end["sum_received"]["bits_per_second"] / 1e9


def messaging(smoke, repeat):
    """Actor message throughput and one-way latency on the test bed, next to the kernel's
    TCP, UDP and ICMP over the same paths."""
    if os.geteuid() != 0 or not have("iperf3"):
        msg = "the messaging benchmark needs root (network namespaces) and iperf3"
        if os.environ.get("CI") == "true":
            sys.exit(f"bench: {msg}, and CI=true")
        print(f"bench: SKIP: {msg}", file=sys.stderr)
        return
    testbed("down")
    up = testbed("up", "--servers", "2", "--runtimes", "2")
    if up.returncode != 0:
        sys.exit(f"bench: testbed did not come up: {up.stderr[-2000:]}")
    try:
        secs = 2 if smoke else 5
        sizes = (64, 4096) if smoke else MSG_SIZES
        # Same host: the two runtimes of server 1, over shared-memory rings through nfmgr.
        # Between servers: runtime 0 of server 1 to runtime 0 of server 2, as raw frames over
        # the veth/bridge link of the test bed (MTU 1500 frames, every frame signed).
        paths = (("one host", "rt0@1", "rt1@1", 1, "127.0.0.1"),
                 ("two servers", "rt0@1", "rt0@2", 1, "10.99.0.2"))
        for where, frm, to, server, addr in paths:
            tcp = statistics.median(iperf3(server, addr, secs) for _ in range(repeat))
            udp = statistics.median(iperf3(server, addr, secs, udp_size=64) for _ in range(repeat))
            emit({"bench": "reference", "what": f"kernel over the same path ({where}, {addr})",
                  "iperf3_tcp_gbit_s": round(tcp, 3), "iperf3_udp64_datagrams_s": round(udp),
                  "ping_one_way_us": round(ping_one_way_us(server, addr, 100 if smoke else 1000), 1)})
            for size in sizes:
                budget = 2e6 if smoke else (400e6 if where == "one host" else 150e6)
                count = int(max(2000, min(400_000, budget / size)))
                runs = [msgtest(frm, to, count, size) for _ in range(repeat)]
                rates = sorted(r["msgs_per_s"] for r in runs)
                med = sorted(runs, key=lambda r: r["msgs_per_s"])[len(runs) // 2]
                emit({"bench": "messages", "path": where, "from": frm, "to": to, "size": size,
                      "count": count, "msgs_per_s": round(med["msgs_per_s"]),
                      "gbit_s": round(med["gbit_per_s"], 3),
                      "runs_msgs_per_s": [round(x) for x in rates],
                      "retransmits": med["retransmits"],
                      "ratio_to_iperf3_tcp": round(med["gbit_per_s"] / tcp, 3) if tcp else None,
                      "ratio_to_udp64": round(med["msgs_per_s"] / udp, 3) if size == 64 and udp else None,
                      "latency_under_load_avg_us": round(med["latency_avg_us"], 1)})
            lat = [msgtest(frm, to, 200 if smoke else 5000, 64, depth=1) for _ in range(repeat)]
            med = sorted(lat, key=lambda r: r["latency_avg_us"])[len(lat) // 2]
            emit({"bench": "message latency", "path": where, "size": 64, "depth": 1,
                  "one_way_min_us": round(med["latency_min_us"], 1),
                  "one_way_avg_us": round(med["latency_avg_us"], 1),
                  "one_way_max_us": round(med["latency_max_us"], 1),
                  "runs_avg_us": sorted(round(r["latency_avg_us"], 1) for r in lat)})
    finally:
        testbed("down")


# ---------------------------------------------------------------- flow migration

MIGRATION_SIZES = (500, 1_000, 10_000, 100_000, 600_000)


def testbed_stats(server):
    return nfmgr("stats", "--json", "--instance", f"bm-s{server}", "--dir",
                 f"/tmp/nf-testbed-bm/s{server}")


def flows_on(addr):
    for e in nfmgr("runtimes", "--json", "--socket", "/tmp/nf-testbed-bm/s1.sock"):
        if f"{e['server']}/{e['slot']}" == addr:
            # A runtime whose workload poll did not answer (another server's, just after
            # the cluster formed) has none yet.
            return (e.get("workload") or {}).get("flows_active", 0)
    return 0


def loss_snapshot(servers):
    """The sink's counters, the generator's skipped packets and the platform's overload drops
    (no ring room or no buffer) of every process and port."""
    snap = {}
    for server in range(1, servers + 1):
        st = testbed_stats(server)
        for p in st["processes"]:
            for k in ("drop_ring_full", "drop_no_buffer", "drop_migration_buffer"):
                snap[f"{p['name']}@{server} {k}"] = p["counters"].get(k, 0)
        for p in st["ports"]:
            for k, v in p["counters"].items():
                if k.startswith("sink_") and "latency" not in k or "drop" in k or k == "gen_sent":
                    snap[f"{p['name']}@{server} {k}"] = v
    # Which runtime's input ring overflowed (the vswitch's drop_ring_full, by consumer);
    # named without "drop" so that the overload sum counts each drop once.
    for e in nfmgr("runtimes", "--json", "--socket", "/tmp/nf-testbed-bm/s1.sock"):
        snap[f"rt {e['server']}/{e['slot']} input_overflow"] = (e.get("workload") or {}).get("input_drops", 0)
    return snap


def migration_trial(where, flows, total_pps, migrate=True, pin=False, rate=0):
    """One test bed, one migration of `flows` flows under the generator; the sink judges."""
    # One host: two runtimes share the generator's 2N flows round-robin, and rt0's N move to
    # rt1. Two servers: server 1's only runtime holds all N and they move to server 2's.
    if where == "one host":
        servers, runtimes, gen_flows, frm, to, src = 1, 2, 2 * flows, "rt0@1", "rt1@1", "1/2"
    else:
        servers, runtimes, gen_flows, frm, to, src = 2, 1, flows, "rt0@1", "rt0@2", "1/2"
    per_flow = total_pps / gen_flows
    # Every flow has sent a packet after 1/per_flow seconds; then the migration, then 3 s.
    warm = 1.0 / per_flow + 1.5
    dur_ms = int((2 * warm + 60) * 1000)
    testbed("down")
    up = testbed("up", "--servers", str(servers), "--runtimes", str(runtimes), "--scope", "local",
                 "--chain", "firewall,flow_monitor", "--gen", f"{gen_flows},{per_flow:.6f},{dur_ms}",
                 "--runtime-set", "max_flows = 2000000",
                 # One-way UDP flows sending every 12 s at 600,000: they must not end as
                 # unreplied (30 s) and come back on the other runtime while we wait.
                 "--runtime-set", "unreplied_timeout_s = 600",
                 *(["--pin-runtimes"] if pin else []),
                 *(["--migration-set", f"max_flows_per_s = {rate}"] if rate else []))
    if up.returncode != 0:
        raise RuntimeError(f"testbed did not come up: {up.stderr[-2000:]}")
    try:
        deadline = time.time() + warm + 30
        while flows_on(src) < flows:
            if time.time() > deadline:
                raise RuntimeError(f"{src} holds {flows_on(src)} flows, expected {flows}")
            time.sleep(0.5)
        # The sink sees a flow's loss at its next packet: wait one packet interval so that
        # what warming up lost is counted before the first snapshot, and after the
        # migration so that what it lost is counted in the second.
        interval = 1.0 / per_flow + 1.0
        time.sleep(interval)
        before = loss_snapshot(servers)
        if migrate:
            r = nfmgr("migrate", "--socket", "/tmp/nf-testbed-bm/s1.sock", "--from", frm,
                      "--to", to, "--all", "--json", "--timeout-s", "120", timeout=200)
        else:
            # The control: the same window without a migration.
            r = None
        time.sleep(max(3.0, interval))
        after = loss_snapshot(servers)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return r, {k: v for k, v in delta.items() if v}
    finally:
        testbed("down")


def migration(smoke, repeat, sizes=None, paths=None, pin=False, rate=0):
    """Time to migrate N flows between two runtimes of one host and of two servers, under
    generator traffic; loss and reordering from the sink."""
    if os.geteuid() != 0:
        msg = "the migration benchmark needs root (network namespaces)"
        if os.environ.get("CI") == "true":
            sys.exit(f"bench: {msg}, and CI=true")
        print(f"bench: SKIP: {msg}", file=sys.stderr)
        return
    sizes = sizes or ((1_000,) if smoke else MIGRATION_SIZES)
    for where, total_pps in (("one host", 100_000), ("two servers", 50_000)):
        if paths and where not in paths:
            continue
        for n in sizes:
            runs = []
            for _ in range(repeat):
                r, delta = migration_trial(where, n, 20_000 if smoke else total_pps, pin=pin,
                                           rate=rate)
                lost = delta.pop("sink0@1 sink_lost", 0)
                overload = sum(v for k, v in delta.items()
                               if "drop" in k and "migration" not in k)
                run = {"ms": r["ms"], "moved": r["moved"], "failed": r["failed"],
                       "groups": r["groups"], "rolled_back": r["groups_rolled_back"],
                       "buffered": r["buffered"], "migration_lost": r["lost"],
                       "late_stragglers": r["reordered"],
                       "stragglers_waited": r["stragglers_waited"],
                       "sink_rx": delta.pop("sink0@1 sink_rx", 0), "sink_lost": lost,
                       "sink_reordered": delta.pop("sink0@1 sink_reordered", 0),
                       "sink_duplicates": delta.pop("sink0@1 sink_duplicates", 0),
                       "overload_drops": overload, "counters": delta}
                runs.append(run)
                emit({"bench": "migration run", "path": where, "flows": n, "pinned": pin,
                      "max_flows_per_s": rate,
                      "generator_pps": 20_000 if smoke else total_pps, **run})
                if r["error"] or r["moved"] < n * 0.999:
                    sys.exit(f"bench: migration of {n} flows ({where}) failed: {r}")
            ms = sorted(x["ms"] for x in runs)
            emit({"bench": "migration", "path": where, "flows": n, "pinned": pin,
                  "max_flows_per_s": rate,
                  "median_ms": ms[len(ms) // 2],
                  "runs_ms": ms,
                  "lost": max(x["sink_lost"] for x in runs),
                  "overload_drops": max(x["overload_drops"] for x in runs),
                  "reordered": max(x["sink_reordered"] for x in runs),
                  "reference": "NFActor 1.5 ms / 1,000 flows, ~700 ms / 600,000 (3 pairs); "
                               "OpenNF 217 ms / 1,000"})


# ---------------------------------------------------------------- short connections

CPS_CHAINS = ("firewall", "firewall,nat,flow_monitor")
CPS_CLIENTS = (1, 8, 32, 128)

KERNEL_RULES = """
table inet cps {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ct state new tcp flags & (syn | ack | rst | fin) == syn accept
  }
}
"""


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def kernel_router(prefix="cpsk"):
    """client (10.66.1.1) -- router with nftables conntrack -- server (10.66.2.2): the kernel
    doing the firewall's job, on veths with the test bed's offload settings."""
    c, r, srv = f"{prefix}-c", f"{prefix}-r", f"{prefix}-s"
    for ns in (c, r, srv):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "rc", "netns", r)
    sh("ip", "link", "add", "eth0", "netns", srv, "type", "veth", "peer", "name", "rs",
       "netns", r)
    for ns, dev in ((c, "eth0"), (srv, "eth0"), (r, "rc"), (r, "rs")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
           "off", "tx", "off", "rx", "off", check=False)
    sh("ip", "-n", c, "addr", "add", "10.66.1.1/24", "dev", "eth0")
    sh("ip", "-n", c, "route", "add", "default", "via", "10.66.1.254")
    sh("ip", "-n", srv, "addr", "add", "10.66.2.2/24", "dev", "eth0")
    sh("ip", "-n", srv, "route", "add", "default", "via", "10.66.2.254")
    sh("ip", "-n", r, "addr", "add", "10.66.1.254/24", "dev", "rc")
    sh("ip", "-n", r, "addr", "add", "10.66.2.254/24", "dev", "rs")
    sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", r, "nft", "-f", "-", input=KERNEL_RULES)
    return c, r, srv


class Web:
    """nginx serving a 1 KiB file in namespace `ns` on `addr`:80, one request per connection."""

    def __init__(self, ns, addr, tag):
        self.dir = tempfile.mkdtemp(prefix=f"nfcps-{tag}-")
        with open(os.path.join(self.dir, "1k"), "wb") as f:
            f.write(b"x" * 1024)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"worker_processes 1;\ndaemon off;\npid {self.dir}/nginx.pid;\n"
                    f"error_log {self.dir}/err;\nevents {{ worker_connections 8192; }}\n"
                    f"http {{ access_log off; server {{ listen {addr}:80 backlog=8192; "
                    f"root {self.dir}; keepalive_timeout 0; }} }}\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nginx", "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_busy_s():
    """CPU seconds every core spent not idle, so far (what both paths use: client, server,
    and the forwarding in between)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def retrans(ns):
    """The client's TCP segments retransmitted so far."""
    out = sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").stdout.splitlines()
    tcp = [l.split() for l in out if l.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("RetransSegs")])


def ab_run(ns, url, n, c):
    t0 = cpu_busy_s()
    r0 = retrans(ns)
    p = subprocess.run(["ip", "netns", "exec", ns, "ab", "-q", "-r", "-s", "20", "-n", str(n),
                        "-c", str(c), url], capture_output=True, text=True, timeout=600)
    cpu = cpu_busy_s() - t0
    field = lambda name: next((float(l.split(":")[1].split()[0]) for l in p.stdout.splitlines()
                               if l.startswith(name)), 0.0)
    done = field("Complete requests")
    return {"requests_per_s": round(field("Requests per second"), 1),
            "complete": int(done), "failed": int(field("Failed requests")),
            "client_retransmits": retrans(ns) - r0,
            "cpu_s_per_1000_requests": round(cpu * 1000 / max(done, 1), 3),
            "p99_ms": next((float(l.split()[1]) for l in p.stdout.splitlines()
                            if l.strip().startswith("99%")), None)}


def platform_drops(before, after):
    """Every drop counter (processes, functions, ports) that moved between two snapshots."""
    return {k: after[k] - before.get(k, 0) for k in after
            if "drop" in k and after[k] > before.get(k, 0)}


def flat_counters(server=1, prefix="bm"):
    r = subprocess.run([NFMGR, "stats", "--json", "--instance", f"{prefix}-s{server}", "--dir",
                        f"/tmp/nf-testbed-{prefix}/s{server}"], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    d = json.loads(r.stdout)
    out = {}
    for p in d.get("processes", []):
        for k, v in p.get("counters", {}).items():
            out[f"{p['name']} {k}"] = out.get(f"{p['name']} {k}", 0) + v
        for nf in p.get("nfs", []):
            for k, v in nf.get("counters", {}).items():
                key = f"{p['name']} {nf['kind']} {k}"
                out[key] = out.get(key, 0) + v
    for p in d.get("ports", []):
        for k, v in p.get("counters", {}).items():
            out[f"{p['name']} {k}"] = v
    return out


def cps(smoke, repeat):
    """Connections per second: HTTP requests, one new TCP connection each (ApacheBench
    against nginx with a 1 KiB file), through the platform's chains and through the kernel
    with an nftables conntrack firewall, alternated in one run."""
    need = ("nginx", "ab", "nft")
    if os.geteuid() != 0 or not all(have(t) for t in need):
        msg = "the connections-per-second benchmark needs root, nginx, ab and nft"
        if os.environ.get("CI") == "true":
            sys.exit(f"bench: {msg}, and CI=true")
        print(f"bench: SKIP: {msg}", file=sys.stderr)
        return
    chains = CPS_CHAINS[:1] if smoke else CPS_CHAINS
    clients = (8,) if smoke else CPS_CLIENTS
    kc, _kr, ks = kernel_router()
    kweb = Web(ks, "10.66.2.2", "k")
    platform = {"web": None}

    def platform_up(chain):
        if platform["web"]:
            platform["web"].stop()
        testbed("down")
        # One server, every NAT port its own (a cluster's default splits them 8 ways).
        up = testbed("up", "--servers", "1", "--runtimes", "2", "--chain", chain,
                     "--cluster-set", "max_servers = 1")
        if up.returncode != 0:
            raise RuntimeError(f"testbed did not come up: {up.stderr[-2000:]}")
        platform["web"] = Web("bm-server", "10.77.0.2", "p")

    try:
        for chain in chains:
            # A NAT hands each new connection to one server a port of its own; the server
            # keeps each closed connection's tuple in TIME_WAIT for a minute, and answers a
            # new SYN on a port handed out again meanwhile with the old connection's ACK
            # half the time (a second's wait for the client). The 40,000 ports of the test
            # bed's two runtimes cover one run, not a minute of runs: each NAT run gets a
            # fresh server (docs/PERFORMANCE.md says what this means for a NAT's sustained
            # rate to one server).
            fresh = "nat" in chain
            platform_up(chain)
            for c in clients:
                # Enough requests for about 2 s at the kernel's rate.
                n = 300 if smoke else (3_000 if c == 1 else 20_000)
                rows = {"kernel": [], "platform": []}
                for i in range(repeat):
                    order = ("kernel", "platform") if i % 2 == 0 else ("platform", "kernel")
                    for path in order:
                        if path == "kernel":
                            r = ab_run(kc, "http://10.66.2.2/1k", n, c)
                        else:
                            if fresh and (i > 0 or c != clients[0]):
                                platform_up(chain)
                            before = flat_counters()
                            r = ab_run("bm-client", "http://10.77.0.2/1k", n, c)
                            r["drops"] = platform_drops(before, flat_counters())
                        rows[path].append(r)
                        emit({"bench": "cps run", "chain": chain, "clients": c, "path": path,
                              "requests": n, "fresh_server": fresh and path == "platform",
                              **r})
                med = lambda path, k: statistics.median(x[k] for x in rows[path])
                k_rps, p_rps = med("kernel", "requests_per_s"), med("platform",
                                                                     "requests_per_s")
                emit({"bench": "cps", "chain": chain, "clients": c, "runs": repeat,
                      "kernel_requests_per_s": k_rps, "platform_requests_per_s": p_rps,
                      "ratio": round(p_rps / k_rps, 3) if k_rps else None,
                      "kernel_retransmits": max(x["client_retransmits"] for x in rows["kernel"]),
                      "platform_retransmits": max(x["client_retransmits"]
                                                  for x in rows["platform"]),
                      "kernel_cpu_s_per_1000": med("kernel", "cpu_s_per_1000_requests"),
                      "platform_cpu_s_per_1000": med("platform", "cpu_s_per_1000_requests"),
                      "platform_failed": sum(x["failed"] for x in rows["platform"]),
                      "platform_drops": {k: v for x in rows["platform"]
                                         for k, v in x["drops"].items()}})
    finally:
        if platform["web"]:
            platform["web"].stop()
        testbed("down")
        kweb.stop()
        for ns in ("cpsk-c", "cpsk-r", "cpsk-s"):
            sh("ip", "netns", "del", ns, check=False)


# ---------------------------------------------------------------- new flows

NEWFLOW_CONFIG = BENCH_HEAD + """[[vswitch]]
name = "vs0"
core = 0
flow_timeout_ms = 1000
[[runtime]]
name = "rt0"
core = 1
unreplied_timeout_s = 1
closed_linger_ms = 100
max_flows = 4000000
[[chain]]
name = "c"
[[chain.nf]]
kind = "firewall"
default = "allow"
[[chain.nf]]
kind = "flow_monitor"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
new_flows = "{mode}"
rate_pps = 0
packet_size = 64
duration_ms = {ms}
[[port]]
name = "sink0"
spec = "sink:"
"""

# The same generator, through a runtime without a chain, out of a veth into the kernel.
INJECTOR_CONFIG = BENCH_HEAD + """[[vswitch]]
name = "vs0"
core = 0
flow_timeout_ms = 1000
[[runtime]]
name = "rt0"
core = 0
unreplied_timeout_s = 1
closed_linger_ms = 100
max_flows = 4000000
[[port]]
name = "gen0"
spec = "gen:"
to = "out"
new_flows = "{mode}"
rate_pps = 0
packet_size = 64
duration_ms = {ms}
[[port]]
name = "out"
spec = "afpacket:out"
to = "drop"
[[port]]
name = "drop"
spec = "null:"
"""

KERNEL_NEWFLOW_RULES = """
table inet nf {
  counter new_flows { }
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ct state new tcp flags & (syn | ack | rst | fin) == syn counter name new_flows accept
    ct state new meta l4proto udp counter name new_flows accept
  }
}
"""


def proc_counter(rep, name, key):
    return sum(p["counters"].get(key, 0) for p in rep["snapshot"]["processes"]
               if p["name"] == name)


def newflow_platform(mode, secs):
    """New flows a second through one runtime core (firewall -> flow monitor), every packet
    a new UDP flow or every 7 packets a whole TCP connection, unpaced; nfmgr and the vswitch
    on core 0, the runtime on core 1."""
    rep = run_report(NEWFLOW_CONFIG, secs, mode=mode, ms=int(secs * 1000))
    created = proc_counter(rep, "rt0", "flows_created")
    busy_s = proc_counter(rep, "rt0", "busy_ns") / 1e9
    gen = rep["ports"]["gen0"]
    return {"flows_per_s": round(created / secs), "flows_per_busy_s": round(created / busy_s)
            if busy_s else None, "runtime_busy": round(busy_s / secs, 3),
            "offered_flows": gen["flows_started"], "runtime_flows": created,
            "vswitch_ring_drops": proc_counter(rep, "vs0", "drop_ring_full"),
            "ended": proc_counter(rep, "rt0", "flows_expired")}


def newflow_kernel(mode, secs):
    """The kernel's conntrack setting up the same flows on one core: the generator (core 0)
    feeds a router namespace (nftables conntrack; its receive work in a NAPI thread pinned to
    core 1), which counts the new connections it accepts."""
    inj, r, out = "nfk-i", "nfk-r", "nfk-o"
    for ns in (inj, r, out):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    try:
        sh("ip", "link", "add", "out", "netns", inj, "type", "veth", "peer", "name", "rc",
           "netns", r)
        sh("ip", "link", "add", "eth0", "netns", out, "type", "veth", "peer", "name", "rs",
           "netns", r)
        # The generator addresses its frames to 02:00:00:00:00:02 (and its replies to
        # ...:01): the router answers to the first on its ingress.
        sh("ip", "-n", r, "link", "set", "rc", "address", "02:00:00:00:00:02")
        for ns, dev in ((inj, "out"), (out, "eth0"), (r, "rc"), (r, "rs")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", r, "addr", "add", "10.255.0.254/16", "dev", "rs")
        sh("ip", "-n", r, "addr", "add", "192.168.255.254/24", "dev", "rc")
        # Static neighbours: no ARP for the generator's millions of addresses.
        sh("ip", "-n", r, "neigh", "add", "10.255.255.1", "lladdr", "02:00:00:00:00:99",
           "dev", "rs")
        sh("ip", "-n", r, "neigh", "add", "192.168.255.1", "lladdr", "02:00:00:00:00:01",
           "dev", "rc")
        sh("ip", "-n", r, "route", "add", "11.0.0.0/8", "via", "192.168.255.1", "dev", "rc")
        # The ruleset first: it loads conntrack, whose settings exist only then.
        sh("ip", "netns", "exec", r, "nft", "-f", "-", input=KERNEL_NEWFLOW_RULES)
        for path, value in (("/proc/sys/net/netfilter/nf_conntrack_max", "4194304"),
                            ("/sys/module/nf_conntrack/parameters/hashsize", "1048576")):
            with open(path, "w") as f:
                f.write(value)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.rc.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                    "net.netfilter.nf_conntrack_udp_timeout=1",
                    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
                    "net.netfilter.nf_conntrack_tcp_timeout_close=1"):
            sh("ip", "netns", "exec", r, "sysctl", "-qw", key)
        # The router's receive work on core 1, the generator on core 0: with GRO on, a
        # veth receives through NAPI, which runs in a kernel thread of its own when
        # threaded, and that thread is pinned. (RPS to core 1 throttled the veth to a
        # thousand packets a second here.)
        sh("ip", "netns", "exec", r, "ethtool", "-K", "rc", "gro", "on")
        sh("ip", "netns", "exec", r, "sh", "-c", "echo 1 > /sys/class/net/rc/threaded")
        time.sleep(0.3)
        napi = [line.split()[0] for line in sh("ps", "-eo", "pid,comm").stdout.splitlines()
                if "napi/rc-" in line]
        if not napi:
            raise RuntimeError("no NAPI thread for the router's veth")
        for pid in napi:
            sh("taskset", "-pc", "1", pid)
        d = tempfile.mkdtemp(prefix="nfbench-", dir="/dev/shm")
        cfg = os.path.join(d, "inj.toml")
        with open(cfg, "w") as f:
            f.write(INJECTOR_CONFIG.format(instance=f"inj{os.getpid()}", dir=d, mode=mode,
                                           ms=int(secs * 1000)))
        run = subprocess.run(["ip", "netns", "exec", inj, NFMGR, "start", "-c", cfg],
                             capture_output=True, text=True, timeout=secs + 60)
        if run.returncode != 0:
            raise RuntimeError(f"the injector failed: {run.stderr[-1500:]}")
        with open(os.path.join(d, "report.json")) as f:
            rep = json.load(f)
        shutil.rmtree(d, ignore_errors=True)
        listing = sh("ip", "netns", "exec", r, "nft", "-j", "list", "counter", "inet", "nf",
                     "new_flows").stdout
        accepted = next(x["counter"]["packets"] for x in json.loads(listing)["nftables"]
                        if "counter" in x)
        sent = rep["ports"]["gen0"]["sent"]
        link = json.loads(sh("ip", "-j", "-n", r, "-s", "link", "show", "rc").stdout)[0]
        return {"flows_per_s": round(accepted / secs),
                "router_rx": link["stats64"]["rx"]["packets"],
                "router_rx_dropped": link["stats64"]["rx"]["dropped"],
                "offered_flows": rep["ports"]["gen0"]["flows_started"],
                "injected_pps": round(sent / secs)}
    finally:
        for ns in (inj, r, out):
            sh("ip", "netns", "del", ns, check=False)


def newflows(smoke, repeat):
    """How fast flows come and go: one runtime core against the kernel's conntrack on one
    core, the same generated flows (UDP, one packet each; TCP, a whole connection each)."""
    if os.geteuid() != 0 or not have("nft"):
        msg = "the new-flow benchmark needs root and nft"
        if os.environ.get("CI") == "true":
            sys.exit(f"bench: {msg}, and CI=true")
        print(f"bench: SKIP: {msg}", file=sys.stderr)
        return
    secs = 1 if smoke else 5
    for mode in ("udp",) if smoke else ("udp", "tcp"):
        plat, kern = [], []
        for _ in range(repeat):
            plat.append(newflow_platform(mode, secs))
            kern.append(newflow_kernel(mode, secs))
            emit({"bench": "new flows run", "mode": mode, "platform": plat[-1],
                  "kernel": kern[-1]})
        pf = statistics.median(x["flows_per_s"] for x in plat)
        kf = statistics.median(x["flows_per_s"] for x in kern)
        emit({"bench": "new flows", "mode": mode, "runs": repeat,
              "platform_flows_per_s": pf, "kernel_flows_per_s": kf,
              "ratio": round(pf / kf, 3) if kf else None,
              "platform_flows_per_busy_s": statistics.median(
                  x["flows_per_busy_s"] or 0 for x in plat),
              "kernel_injected_pps": statistics.median(x["injected_pps"] for x in kern)})


# ---------------------------------------------------------------- replication

REPL_CONFIG = BENCH_HEAD + """[[vswitch]]
name = "vs0"
core = 1
[[runtime]]
name = "rt0"
core = 1
[[runtime]]
name = "rt1"
core = 1
[[chain]]
name = "main"
replication = "{mode}"
[[chain.nf]]
kind = "firewall"
default = "allow"
[[chain.nf]]
kind = "flow_monitor"
""" + GEN_SINK_PORTS


def repl_trial(mode, mpps, secs, flows=1000):
    """One run of generator -> vswitch -> two runtimes replicating to each other -> sink."""
    rep = run_report(REPL_CONFIG, secs, mode=mode, flows=flows,
                     rate=mpps * 1e6 / flows if mpps else 0, ms=int(secs * 1000))
    procs = {p["name"]: p["counters"] for p in rep["snapshot"]["processes"]}
    rt = [procs.get(n, {}) for n in ("rt0", "rt1")]
    return {
        **gen_sink_figures(rep, secs),
        "repl_messages": sum(c.get("repl_messages", 0) for c in rt),
        "repl_state_bytes": sum(c.get("repl_state_bytes", 0) for c in rt),
        "repl_unprotected": sum(c.get("repl_unprotected", 0) for c in rt),
    }


def repl_bed_up(servers, runtimes, gen_flows, pps_per_flow, watch, want, start_after_ms=0):
    """Brings up the test bed with `runtimes` runtimes per server under output commit and
    `gen_flows` generator flows of `pps_per_flow` each from server 1, and returns once
    runtime `watch` ("server/slot") holds `want` of them and each has sent once more."""
    warm = 1.0 / pps_per_flow + 2.0
    testbed("down")
    up = testbed("up", "--servers", str(servers), "--runtimes", str(runtimes),
                 "--chain", "firewall,flow_monitor",
                 "--chain-set", 'replication = "output-commit"',
                 "--gen", f"{gen_flows},{pps_per_flow},{int((warm + 40) * 1000)},{start_after_ms}",
                 "--runtime-set", "max_flows = 2000000",
                 "--runtime-set", "unreplied_timeout_s = 600")
    if up.returncode != 0:
        raise RuntimeError(f"testbed did not come up: {up.stderr[-2000:]}")
    deadline = time.time() + warm + 40
    while flows_on(watch) < want * 0.95:
        if time.time() > deadline:
            testbed("down")
            raise RuntimeError(f"{watch} holds {flows_on(watch)} flows, expected {want}")
        time.sleep(0.5)
    time.sleep(1.0 / pps_per_flow + 0.5)


def takeover_events(events, fault):
    """The "took over" events from `fault` (ms) on, and the flows they took over."""
    took = [e for e in events if e["at_ms"] >= fault - 50 and "took over" in e["what"]]
    n = sum(int(m.group(1)) for e in took
            for m in [re.search(r"took over (\d+) flows", e["what"])] if m)
    return took, n


def repl_takeover(flows_per_runtime, pps_per_flow=1.0):
    """Test bed, one server, two runtimes with output commit, 2N generator flows: kill rt0
    and read the platform's events: detection (the death) and takeover (the last answer
    to Recover)."""
    repl_bed_up(1, 2, 2 * flows_per_runtime, pps_per_flow, "1/2", flows_per_runtime)
    sock = "/tmp/nf-testbed-bm/s1.sock"
    try:
        fault = time.time() * 1000
        nfmgr("kill", "rt0", "--socket", sock, "--json")
        time.sleep(3.0)
        events = nfmgr("top", "--json", "--socket", sock).get("events", [])
        later = [e for e in events if e["at_ms"] >= fault - 50]
        # The fault is the platform's SIGKILL (not this script's call, which waits for a
        # CLI process to start).
        killed = [e for e in later if "killed with SIGKILL" in e["what"]]
        if killed:
            fault = killed[0]["at_ms"]
        died = [e for e in later if "killed by" in e["what"] or "died" in e["what"]]
        took, n = takeover_events(events, fault)
        return {
            "flows_on_killed_runtime": flows_per_runtime,
            "detection_ms": round(died[0]["at_ms"] - fault, 1) if died else None,
            "takeover_ms": round(max(e["at_ms"] for e in took) - fault, 1) if took else None,
            "flows_taken_over": n,
        }
    finally:
        testbed("down")


def repl_replica_loss(flows_per_runtime, pps_per_flow=1.0):
    """Test bed, one server, three runtimes under output commit, 3N generator flows: kill
    rt1 and read how long the flows whose replica it was went without a copy (each
    surviving runtime's `repl_unprotected_us`: from the loss to their new replica's
    acknowledgement of their whole copies)."""
    repl_bed_up(1, 3, 3 * flows_per_runtime, pps_per_flow, "1/3", flows_per_runtime)
    try:
        nfmgr("kill", "rt1", "--socket", "/tmp/nf-testbed-bm/s1.sock", "--json")
        time.sleep(3.0)
        windows = {}
        for p in testbed_stats(1)["processes"]:
            if p["name"] in ("rt0", "rt2"):
                windows[p["name"]] = p["counters"].get("repl_unprotected_us", 0) / 1000
        return {
            "flows_per_runtime": flows_per_runtime,
            "unprotected_ms": {k: round(v, 1) for k, v in windows.items()},
        }
    finally:
        testbed("down")


def repl_server_takeover(flows_per_runtime, how, pps_per_flow=1.0):
    """Test bed, two servers with one runtime each under output commit (each the other's
    replica), 2N generator flows from server 1: kill server 2 (`how` = "kill": its nfmgr
    with SIGKILL, and with it every process of it) or cut its cluster link ("cut").
    Detection is the coordinator's "server 2 ... is down" event, takeover the last answer
    to Recover; a link-down event before the fault is a false detection."""
    # The flows start once the cluster has formed, so that half land on server 2.
    repl_bed_up(2, 1, 2 * flows_per_runtime, pps_per_flow, "2/2", flows_per_runtime, 2500)
    sock = "/tmp/nf-testbed-bm/s1.sock"
    try:
        fault = time.time() * 1000
        if how == "kill":
            pid = int(open("/tmp/nf-testbed-bm/s2.pid").read())
            os.kill(pid, signal.SIGKILL)
        else:
            subprocess.run(["ip", "-n", "bm-net", "link", "set", "p2", "down"], check=True)
        time.sleep(3.0)
        events = nfmgr("top", "--json", "--socket", sock).get("events", [])
        died = [e for e in events if e["at_ms"] >= fault - 50
                and "server 2 " in e["what"] and "is down" in e["what"]]
        took, n = takeover_events(events, fault)
        false = [e for e in events if e["at_ms"] < fault - 50
                 and "not heard on the cluster link" in e["what"]]
        return {
            "flows_on_killed_server": flows_per_runtime,
            "fault": "kill -9 nfmgr" if how == "kill" else "cluster link cut",
            "detection_ms": round(died[0]["at_ms"] - fault, 1) if died else None,
            "takeover_ms": round(max(e["at_ms"] for e in took) - fault, 1) if took else None,
            "flows_taken_over": n,
            "false_detections": len(false),
        }
    finally:
        testbed("down")


def repl_tb_trial(mode, mpps, secs, flows=1000):
    """Between servers: the test bed's two servers with one runtime each, replicating to
    each other over the cluster link; server 1's generator offers `mpps` over `flows`
    flows, which its vswitch spreads over both runtimes, into server 1's sink."""
    per_flow = mpps * 1e6 / flows
    testbed("down")
    up = testbed("up", "--servers", "2", "--runtimes", "1", "--chain", "firewall,flow_monitor",
                 "--chain-set", f'replication = "{mode}"',
                 "--gen", f"{flows},{per_flow:.3f},{int((secs + 12) * 1000)},2500")
    if up.returncode != 0:
        raise RuntimeError(f"testbed did not come up: {up.stderr[-2000:]}")
    try:
        time.sleep(2.5 + 2.0)
        before = loss_snapshot(2)
        time.sleep(secs)
        after = loss_snapshot(2)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        offered = sum(v for k, v in d.items() if k.endswith(" gen_sent"))
        delivered = sum(v for k, v in d.items() if k.endswith(" sink_rx"))
        # A rate the generator could not offer (it shares the two cores with both
        # servers) was not carried either: the search must not climb past it.
        capped = offered < 0.95 * mpps * 1e6 * secs
        return {
            "offered_mpps": round(offered / secs / 1e6, 3),
            "delivered_mpps": round(delivered / secs / 1e6, 3),
            "loss": 1.0 if capped or not offered else max(0.0, 1 - delivered / offered),
            "generator_capped": capped,
        }
    finally:
        testbed("down")


def replication(smoke, repeat):
    """Loss-bounded throughput and latency under output commit, periodic and off (one host,
    two runtimes replicating to each other, both present in every run), and detection and
    takeover of a killed runtime's flows."""
    secs = 1 if smoke else 3
    steps = 1 if smoke else 6
    bounded = {}
    for mode in ("off", "periodic", "output-commit"):
        rates = []
        for _ in range(repeat):
            best = loss_bounded(lambda r: repl_trial(mode, r, secs), 0.05, 4.0, steps)
            rate, t = best if best else (0.0, {})
            rates.append(rate)
            emit({"bench": "replication", "mode": mode, "what": "loss-bounded (<= 0.1 %)",
                  "max_mpps": round(rate, 3), **t})
        bounded[mode] = statistics.median(rates)
    for mode in ("periodic", "output-commit"):
        if bounded["off"]:
            emit({"bench": "replication", "mode": mode, "what": "summary",
                  "median_mpps": round(bounded[mode], 3),
                  "ratio_to_off": round(bounded[mode] / bounded["off"], 3)})
    base = bounded["off"] or 0.2
    for load in (0.1, 0.5):
        for mode in ("off", "output-commit"):
            t = repl_trial(mode, base * load, secs)
            emit({"bench": "replication", "mode": mode, "what": f"latency at {load:.0%} of off's "
                  "loss-bounded rate", **t})
    if os.geteuid() != 0:
        print("bench: replication takeover needs root (test bed); skipped", file=sys.stderr)
        return
    between = {}
    for mode in ("off", "periodic", "output-commit"):
        best = loss_bounded(lambda r: repl_tb_trial(mode, r, secs), 0.05,
                            0.3 if smoke else 1.0, 1 if smoke else 5)
        rate, t = best if best else (0.0, {})
        between[mode] = rate
        emit({"bench": "replication", "mode": mode, "path": "two servers",
              "what": "loss-bounded (<= 0.1 %)", "max_mpps": round(rate, 3), **t})
    for mode in ("periodic", "output-commit"):
        if between["off"]:
            emit({"bench": "replication", "mode": mode, "path": "two servers",
                  "what": "summary", "ratio_to_off": round(between[mode] / between["off"], 3)})
    for n in ((2000,) if smoke else (10_000, 50_000, 100_000)):
        emit({"bench": "replication", "what": "kill a runtime (one host)",
              **repl_takeover(n, 2.0 if smoke else 1.0)})
    for n in ((2000,) if smoke else (10_000, 50_000)):
        emit({"bench": "replication", "what": "a replica killed (one host)",
              **repl_replica_loss(n, 2.0 if smoke else 1.0)})
    for how in ("kill", "cut"):
        for n in ((2000,) if smoke else (10_000, 50_000)):
            emit({"bench": "replication", "what": "kill a server (two servers)",
                  **repl_server_takeover(n, how, 2.0 if smoke else 1.0)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short runs that only check everything works")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", choices=["messages", "migration", "dpdk", "cps", "newflows",
                                       "replication"],
                    help="run only this benchmark")
    ap.add_argument("--flows", type=int, action="append",
                    help="migration: only this many flows (repeatable)")
    ap.add_argument("--path", action="append", choices=["one host", "two servers"],
                    help="migration: only this path (repeatable)")
    ap.add_argument("--pin-runtimes", action="store_true",
                    help="migration: pin runtime N of every server to core N mod CPUs "
                         "(nfmgr and vswitches still float)")
    ap.add_argument("--max-flows-per-s", type=int, default=0,
                    help="migration: the [migration] rate limit (0: none)")
    args = ap.parse_args()
    smoke = args.smoke
    repeat = 1 if smoke else args.repeat

    if not args.no_build:
        features = ["--features", "nf-manager/dpdk"] if dpdk_available() else []
        subprocess.run(["cargo", "build", "-q", "--release", "--workspace", *features],
                       cwd=ROOT, check=True)
    mhz = cpu_mhz()
    emit({"machine": {"cpus": os.cpu_count(), "cpu_mhz": mhz, "kernel": os.uname().release}})
    if args.only == "messages":
        messaging(smoke, repeat)
        finish(smoke)
        return
    if args.only == "migration":
        migration(smoke, repeat, args.flows, args.path, args.pin_runtimes, args.max_flows_per_s)
        finish(smoke)
        return
    if args.only == "cps":
        cps(smoke, repeat)
        finish(smoke)
        return
    if args.only == "newflows":
        newflows(smoke, repeat)
        finish(smoke)
        return
    if args.only == "replication":
        replication(smoke, repeat)
        finish(smoke)
        return
    if args.only == "dpdk":
        ref = {"io": testpmd("io", 5 if smoke else 10)} if have("dpdk-testpmd") else {}
        if ref:
            emit({"bench": "reference", "what": "testpmd io net_null, lcores 0-1",
                  "mpps_per_port": round(ref["io"] / 1e6, 2)})
        dpdk_ports(smoke, repeat, ref)
        finish(smoke)
        return

    ref = {}
    if require("dpdk-testpmd", smoke):
        for mode in ("macswap", "io"):
            runs = [testpmd(mode, 5 if smoke else 10) for _ in range(repeat)]
            ref[mode] = statistics.median(runs)
            emit({"bench": "reference", "what": f"testpmd {mode} net_null, lcores 0-1",
                  "mpps_per_port": round(ref[mode] / 1e6, 2),
                  "runs_mpps": [round(r / 1e6, 2) for r in runs]})
    if require("dpdk-test", smoke) and not smoke:
        runs = [ring_perf() for _ in range(repeat)]
        for size in sorted(runs[0]):
            cyc = sorted(r[size] for r in runs if size in r)
            med = statistics.median(cyc)
            emit({"bench": "reference", "what": f"rte_ring 16B SP/SC bulk {size}, two cores",
                  "cycles_per_op": med, "cycles_min": cyc[0], "cycles_max": cyc[-1],
                  "ns_per_op": round(med * 1000 / mhz, 2) if mhz else None})

    for r in cargo_bench("nflib", "ring_pool", smoke):
        emit(r)
    for r in cargo_bench("nflib", "migration_codec", smoke):
        emit(r)
    for r in cargo_bench("nflib", "flow_key", smoke):
        emit(r)
    for r in cargo_bench("nflib", "journal", smoke):
        emit(r)

    for r in cargo_bench("nf-runtime", "chain", smoke):
        if "macswap" in ref:
            r["ratio_to_testpmd_macswap"] = round(r["mpps"] * 1e6 / ref["macswap"], 3)
        emit(r)

    messaging(smoke, repeat)
    migration(smoke, repeat)
    cps(smoke, repeat)
    newflows(smoke, repeat)
    dpdk_ports(smoke, repeat, ref)
    replication(smoke, repeat)

    if smoke:
        t = e2e_trial(0.1, 1, flows=100)
        emit({"bench": "e2e", "mode": "smoke", **t})
        if t["loss"] > 0.01:
            sys.exit(f"bench: e2e smoke lost {t['loss']:.2%} at 0.1 Mpps")
    else:
        capacity = []
        for _ in range(repeat):
            t = e2e_trial(0, 4)
            capacity.append(t["delivered_mpps"])
            emit({"bench": "e2e", "mode": "capacity (unpaced generator)", **t})
        bounded = []
        for _ in range(repeat):
            best = e2e_search(4)
            rate, t = best if best else (0.0, {})
            bounded.append(rate)
            emit({"bench": "e2e", "mode": "loss-bounded (<= 0.1 %)",
                  "max_mpps": round(rate, 3), **t})
        for name, rates in (("capacity", capacity), ("loss_bounded", bounded)):
            med = statistics.median(rates)
            summary = {"bench": "e2e", "mode": f"summary {name}", "median_mpps": round(med, 3),
                       "min_mpps": round(min(rates), 3), "max_mpps": round(max(rates), 3)}
            if "macswap" in ref:
                summary["ratio_to_testpmd_macswap"] = round(med * 1e6 / ref["macswap"], 3)
                summary["ratio_to_testpmd_io"] = round(med * 1e6 / ref["io"], 3)
            emit(summary)

    finish(smoke)


def finish(smoke):
    outdir = os.path.join(ROOT, "target", "bench")
    os.makedirs(outdir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(outdir, f"results-{'smoke-' if smoke else ''}{stamp}.jsonl")
    with open(path, "w") as f:
        for r in RESULTS:
            f.write(json.dumps(r) + "\n")
    print(f"bench: results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
