#!/usr/bin/env python3
"""Data-plane benchmarks, each next to a reference measured in the same run on the same cores.

  scripts/bench/run.py            full run (about 5 minutes), results in target/bench/
  scripts/bench/run.py --smoke    a short pass that checks every benchmark still runs (CI)

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


E2E_CONFIG = """
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
[[vswitch]]
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


def e2e_trial(mpps, secs, flows=1000):
    """One run at `mpps` offered (0 = unpaced)."""
    d = tempfile.mkdtemp(prefix="nfbench-", dir="/dev/shm")
    try:
        cfg = os.path.join(d, "bench.toml")
        with open(cfg, "w") as f:
            f.write(E2E_CONFIG.format(instance=f"bench{os.getpid()}", dir=d, flows=flows,
                                      rate=mpps * 1e6 / flows if mpps else 0,
                                      ms=int(secs * 1000)))
        subprocess.run([os.path.join(ROOT, "target/release/nfmgr"), "start", "-c", cfg],
                       check=True, capture_output=True, timeout=secs + 60)
        with open(os.path.join(d, "report.json")) as f:
            rep = json.load(f)
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
    finally:
        shutil.rmtree(d, ignore_errors=True)


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


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short runs that only check everything works")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    smoke = args.smoke
    repeat = 1 if smoke else args.repeat

    if not args.no_build:
        subprocess.run(["cargo", "build", "-q", "--release", "--workspace"], cwd=ROOT, check=True)
    mhz = cpu_mhz()
    emit({"machine": {"cpus": os.cpu_count(), "cpu_mhz": mhz, "kernel": os.uname().release}})

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

    for r in cargo_bench("nf-runtime", "chain", smoke):
        if "macswap" in ref:
            r["ratio_to_testpmd_macswap"] = round(r["mpps"] * 1e6 / ref["macswap"], 3)
        emit(r)

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
