#!/usr/bin/env python3
"""Soak: generator traffic for a long time while runtimes and the vswitch are killed every
few seconds, then the accounts (issue 22, "a soak script"). Not part of CI.

  scripts/soak.py                     an hour, a kill every 5 s
  scripts/soak.py --minutes 5         shorter
  scripts/soak.py --every 2 --json    a kill every 2 s, the report as one JSON object

One nfmgr (release build), no root needed: a generator (per-flow sequence numbers) ->
vswitch -> 2 runtimes (firewall -> flow monitor) -> sink. Every --every seconds one of
rt0, rt1 and vs0, in turn, is killed with SIGKILL (`nfmgr kill`) and restarted by the
supervisor. Each process's resident memory is sampled every second. At the end nfmgr
stops by itself (the generator is done) and writes its report.

The report: kills, restarts, buffers leaked (the pool's total less its free buffers once
every process stopped), packets generated / received / lost / duplicated / reordered by
the sink (every packet is accounted for when generated + skipped at the source (the
vswitch's ring full) = received + lost and nothing is duplicated), and the peak and last resident memory of every process. It fails (exit 1)
on a leaked buffer, a duplicate, an account that does not add up, or a process whose
resident memory in the last tenth of the run is more than 1.5 x its peak in the first
half (memory that grows without bound).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NFMGR = os.path.join(ROOT, "target", "release", "nfmgr")

CONFIG = """instance = "{instance}"
[region]
dir = "{dir}"
hugepages = "off"
buffers = 16384
[manager]
run_dir = "{dir}/run"
control_socket = "{dir}/ctl.sock"
report = "{dir}/report.json"
exit_when_done = true
[supervisor]
restart = "always"
# Kills every few seconds are the test, not a crash loop to back off from.
stable_after_ms = 0
[[vswitch]]
name = "vs0"
[[runtime]]
name = "rt0"
[[runtime]]
name = "rt1"
[[chain]]
name = "main"
[[chain.nf]]
kind = "firewall"
default = "allow"
[[chain.nf]]
kind = "flow_monitor"
[[port]]
name = "gen0"
spec = "gen:"
to = "sink0"
flows = {flows}
rate_pps = {rate}
duration_ms = {ms}
[[port]]
name = "sink0"
spec = "sink:"
"""


def nfmgr(d, *args):
    return subprocess.run([NFMGR, *args, "--socket", os.path.join(d, "ctl.sock")],
                          capture_output=True, text=True, timeout=30)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_summary(samples, secs):
    """Per process (name -> [(t, rss KiB)]): the peak, the peak of the first half and of
    the last tenth of a run `secs` long; and the processes whose memory grew (last tenth
    above 1.5 x the first half's peak)."""
    memory = {}
    for name, s in samples.items():
        first = [r for t, r in s if t < secs / 2] or [0]
        last = [r for t, r in s if t >= secs * 0.9] or [0]
        memory[name] = {"peak_kib": max(r for _, r in s), "first_half_peak_kib": max(first),
                        "last_tenth_peak_kib": max(last)}
    growing = [n for n, m in memory.items()
               if m["first_half_peak_kib"] and m["last_tenth_peak_kib"] > 1.5 * m["first_half_peak_kib"]]
    return memory, growing


def print_memory(memory):
    for n, m in sorted(memory.items()):
        print(f"  {n:6} RSS peak {m['peak_kib'] / 1024:.1f} MiB (first half "
              f"{m['first_half_peak_kib'] / 1024:.1f}, last tenth "
              f"{m['last_tenth_peak_kib'] / 1024:.1f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between kills")
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=100, help="packets/s per flow")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not os.access(NFMGR, os.X_OK):
        sys.exit("soak: build first (cargo build --release)")
    secs = a.minutes * 60
    d = tempfile.mkdtemp(prefix="nfsoak-", dir="/dev/shm")
    cfg = os.path.join(d, "soak.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(instance=f"soak{os.getpid()}", dir=d, flows=a.flows,
                              rate=a.rate, ms=int(secs * 1000)))
    log = open(os.path.join(d, "nfmgr.log"), "w")
    proc = subprocess.Popen([NFMGR, "start", "-c", cfg], stdout=log, stderr=log)
    victims = ["rt0", "rt1", "vs0"]
    kills, failed_kills = 0, 0
    samples = {}  # name -> [(t, rss)]
    start = time.time()
    next_kill = start + a.every
    try:
        while proc.poll() is None:
            now = time.time()
            st = nfmgr(d, "status", "--json")
            if st.returncode == 0:
                for p in json.loads(st.stdout).get("processes", []):
                    r = rss_kib(p.get("pid") or 0) if p.get("state") == "running" else None
                    if r is not None:
                        samples.setdefault(p["name"], []).append((now - start, r))
            # No kill in the last 5 s: the run ends with everything up.
            if now >= next_kill and now - start < secs - 5:
                out = nfmgr(d, "kill", victims[kills % len(victims)])
                kills += 1
                failed_kills += out.returncode != 0
                next_kill = now + a.every
            time.sleep(1.0)
        proc.wait(timeout=60)
        with open(os.path.join(d, "report.json")) as f:
            rep = json.load(f)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        if proc.poll() is None:
            proc.kill()
        sys.exit(f"soak: the run failed ({e}); files in {d}")
    ports = rep.get("ports", {})
    gen, sink = ports.get("gen0", {}), ports.get("sink0", {})
    pool = rep.get("snapshot", {}).get("pool", {})
    total, free = pool.get("total", 0), pool.get("free", 0)
    # Packets the generator could not put on the vswitch's ring (full, while the vswitch
    # was dead) were never sent, but their sequence numbers were used: the sink counts them
    # lost. Every number is accounted for when sent + skipped = received + lost.
    generated = gen.get("sent", 0)
    skipped = gen.get("skipped", 0)
    received, lost = sink.get("received", 0), sink.get("lost", 0)
    memory, growing = memory_summary(samples, secs)
    report = {
        "minutes": a.minutes, "kill_every_s": a.every, "kills": kills,
        "kills_refused": failed_kills, "restarts": rep.get("restarts"),
        "buffers_total": total, "buffers_leaked": total - free,
        "generated": generated, "skipped_at_source": skipped, "received": received,
        "lost": lost,
        "duplicates": sink.get("duplicates", 0), "reordered": sink.get("reordered", 0),
        "accounted": generated + skipped == received + lost,
        "memory": memory, "memory_growing": growing, "dir": d,
    }
    ok = (report["buffers_leaked"] == 0 and report["duplicates"] == 0 and report["accounted"]
          and not growing and failed_kills == 0)
    report["ok"] = ok
    if a.json:
        print(json.dumps(report))
    else:
        print(f"soak: {a.minutes:g} min, {kills} kills ({failed_kills} refused), "
              f"{report['restarts']} restarts")
        print(f"  buffers: {total} total, {report['buffers_leaked']} leaked")
        print(f"  packets: {generated} generated ({skipped} more skipped at the source), "
              f"{received} received, {lost} lost (the skipped among them), "
              f"{report['duplicates']} duplicated, {report['reordered']} reordered; "
              f"accounted: {report['accounted']}")
        print_memory(memory)
        print("  OK" if ok else "  FAILED")
    if ok:
        shutil.rmtree(d, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
