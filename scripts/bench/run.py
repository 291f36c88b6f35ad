#!/usr/bin/env python3
"""Data-plane benchmarks, each next to a reference measured in the same run on the same cores.

  scripts/bench/run.py            full run (about 5 minutes), results in target/bench/
  scripts/bench/run.py --smoke    a short pass that checks every benchmark still runs (CI)
  scripts/bench/run.py --only messages    just the actor-message benchmark (root: test bed)
  scripts/bench/run.py --only migration   just the flow-migration benchmark (root: test bed)
  scripts/bench/run.py --only dpdk        just the DPDK port benchmark (root, DPDK installed)

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
  - DPDK ports (root, nfmgr built with DPDK): generator -> vswitch -> runtime -> egress, the
    egress being the platform's own null port or a DPDK net_null device (same cores), next
    to testpmd io on net_null in the same run: what the DPDK port costs over no device.
Every result is one JSON line on stdout and in target/bench/results-<timestamp>.jsonl.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

E2E_CONFIG = BENCH_HEAD + """[[vswitch]]
name = "vs0"
core = 1
[[runtime]]
name = "rt0"
core = 1
[[port]]
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


def run_report(template, secs, **fields):
    """Runs nfmgr (release) on `template` filled with `fields` for about `secs` seconds in a
    fresh directory and returns its final report."""
    d = tempfile.mkdtemp(prefix="nfbench-", dir="/dev/shm")
    try:
        cfg = os.path.join(d, "bench.toml")
        with open(cfg, "w") as f:
            f.write(template.format(instance=f"bench{os.getpid()}", dir=d, **fields))
        subprocess.run([os.path.join(ROOT, "target/release/nfmgr"), "start", "-c", cfg],
                       check=True, capture_output=True, timeout=secs + 60)
        with open(os.path.join(d, "report.json")) as f:
            return json.load(f)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def e2e_trial(mpps, secs, flows=1000):
    """One run at `mpps` offered (0 = unpaced)."""
    rep = run_report(E2E_CONFIG, secs, flows=flows, rate=mpps * 1e6 / flows if mpps else 0,
                     ms=int(secs * 1000))
    gen, sink = rep["ports"]["gen0"], rep["ports"]["sink0"]
    offered = gen["sent"] + gen["skipped"]
    delivered = sink["received"]
    return {
        "offered_mpps": round(offered / secs / 1e6, 3),
        "delivered_mpps": round(delivered / secs / 1e6, 3),
        "loss": 1 - delivered / offered if offered else 1.0,
        "duplicates": sink["duplicates"],
        "reordered": sink["reordered"],
        "latency_avg_us": round(sink["latency_avg_ns"] / 1000, 1),
    }


def e2e_search(secs, lo=0.5, hi=10.0, steps=6, max_loss=0.001):
    """Highest offered rate (Mpps) delivered with loss <= max_loss."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        t = e2e_trial(mid, secs)
        if t["loss"] <= max_loss:
            best, lo = (mid, t), mid
        else:
            hi = mid
    return best


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
    return subprocess.run([os.path.join(ROOT, "scripts", "testbed.sh"), *args, "--prefix", "bm"],
                          cwd=ROOT, capture_output=True, text=True)


def in_ns(server, cmd, timeout=60):
    r = subprocess.run(["ip", "netns", "exec", f"bm-s{server}", *cmd], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in bm-s{server}: {r.stderr.strip()[-500:]}")
    return r.stdout


def nfmgr(*args, timeout=120):
    r = subprocess.run([os.path.join(ROOT, "target", "release", "nfmgr"), *args],
                       capture_output=True, text=True, timeout=timeout)
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
            return e["workload"]["flows_active"]
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
        snap[f"rt {e['server']}/{e['slot']} input_overflow"] = e["workload"].get("input_drops", 0)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short runs that only check everything works")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", choices=["messages", "migration", "dpdk"],
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

    for r in cargo_bench("nf-runtime", "chain", smoke):
        if "macswap" in ref:
            r["ratio_to_testpmd_macswap"] = round(r["mpps"] * 1e6 / ref["macswap"], 3)
        emit(r)

    messaging(smoke, repeat)
    migration(smoke, repeat)
    dpdk_ports(smoke, repeat, ref)

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
