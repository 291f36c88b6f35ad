#!/usr/bin/env python3
"""Soak with server kills: generator traffic on a two-server test bed for a long time while
server 2 (all its processes: its nfmgr, killed with SIGKILL, takes its vswitch and runtimes
with it) is killed and started again every few seconds, then the accounts (issue 22, "a
soak script", server kills). Not part of CI; needs root (network namespaces).

  scripts/soak-servers.py                  an hour, server 2 killed every 20 s
  scripts/soak-servers.py --minutes 10     shorter
  scripts/soak-servers.py --every 30 --json

The test bed (scripts/testbed.sh): two servers, one runtime each, chain firewall ->
flow_monitor replicated with output commit, server 1's generator (per-flow sequence
numbers) -> server 1's vswitch, which gives flows to the runtimes of both servers -> sink.
Each kill is recovered as the kill-server drill's (the dead server's flows resume on their
replicas on server 1); server 2 comes back a few seconds later as a new incarnation, joins,
becomes a replica again, and is given half the generator's flows back by migration
(`nfmgr migrate`), so that every kill takes flows down with it. The resident memory of every process of server 1 is
sampled every second.

It fails (exit 1) on a buffer leaked on either server (the pool's total less its free
buffers once every process stopped), a duplicated packet, packets that do not add up
(generated = received + lost), a process of server 1 whose memory in the last tenth of the
run passed 1.5 x its peak in the first half, a kill whose server did not come back, or a
recovery that did not happen (server 1's events name a takeover per kill).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from soak import memory_summary, print_memory, rss_kib  # noqa: E402  (the one-server soak)
BIN = os.path.join(ROOT, "target", "release")
NFMGR = os.path.join(BIN, "nfmgr")
TESTBED = os.path.join(ROOT, "scripts", "testbed.sh")


def sh(*args, timeout=60, check=True):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def pid_of(state, server):
    try:
        return int(open(os.path.join(state, f"s{server}.pid")).read().strip())
    except (OSError, ValueError):
        return None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return ") Z " not in f.read()
    except OSError:
        return False


def status(state, server):
    r = sh(NFMGR, "status", "--socket", os.path.join(state, f"s{server}.sock"), "--json",
           check=False, timeout=10)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def start_server(prefix, state, server):
    """Starts the server's nfmgr again; while the kernel still tears the old one down, its
    instance lock may be held a moment longer: tried again for a few seconds."""
    end = time.time() + 10
    while True:
        log = open(os.path.join(state, f"s{server}.log"), "a")
        p = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-s{server}", NFMGR, "start",
                              "--config", os.path.join(state, f"s{server}.toml")],
                             stdout=log, stderr=log, start_new_session=True)
        with open(os.path.join(state, f"s{server}.pid"), "w") as f:
            f.write(str(p.pid))
        time.sleep(0.5)
        if p.poll() is None or time.time() > end:
            return p


def joined(state, server, timeout):
    """Whether `server` is alive in the coordinator's view within `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        st = status(state, 1)
        if st and any(s.get("server") == server and s.get("alive") for s in st.get("servers", [])):
            return True
        time.sleep(0.2)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=20.0, help="seconds between server kills")
    ap.add_argument("--down", type=float, default=3.0, help="seconds server 2 stays dead")
    ap.add_argument("--flows", type=int, default=500)
    ap.add_argument("--rate", type=int, default=50, help="packets/s per flow")
    ap.add_argument("--prefix", default="soaks")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak-servers: needs root (network namespaces)")
    if not os.access(NFMGR, os.X_OK):
        sys.exit("soak-servers: build first (cargo build --release)")
    secs = a.minutes * 60
    state = f"/tmp/nf-testbed-{a.prefix}"
    sh(TESTBED, "down", "--prefix", a.prefix, check=False, timeout=120)
    sh(TESTBED, "up", "--prefix", a.prefix, "--servers", "2", "--runtimes", "1",
       "--bin", BIN, "--chain", "firewall,flow_monitor",
       "--chain-set", 'replication = "output-commit"',
       "--gen", f"{a.flows},{a.rate},{int(secs * 1000)},2000",
       timeout=180)
    kills, not_back, migrations, moved = 0, 0, 0, 0
    samples = {}
    start = time.time()
    next_kill = start + a.every
    s1 = pid_of(state, 1)
    try:
        while s1 and alive(s1):
            now = time.time()
            # The generator is done (it started 2 s in): stop server 1, which writes its
            # report (frames on the cluster link keep it from ever being idle enough to end
            # by itself).
            if now - start > secs + 10:
                sh(NFMGR, "stop", "--socket", os.path.join(state, "s1.sock"), check=False)
                end = time.time() + 30
                while alive(s1) and time.time() < end:
                    time.sleep(0.2)
                break
            st = status(state, 1)
            if st:
                for p in st.get("processes", []):
                    r = rss_kib(p.get("pid") or 0) if p.get("state") == "running" else None
                    if r is not None:
                        samples.setdefault(p["name"], []).append((now - start, r))
            # No kill in the last 20 s: the run ends with both servers up.
            if now >= next_kill and now - start < secs - 20:
                victim = pid_of(state, 2)
                if victim and alive(victim):
                    # The nfmgr itself (`ip netns exec` execs it): its children die with it.
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    end = time.time() + 10
                    while alive(victim) and time.time() < end:
                        time.sleep(0.05)
                time.sleep(a.down)
                start_server(a.prefix, state, 2)
                if not joined(state, 2, 30):
                    not_back += 1
                else:
                    # The generator's flows live on: give half of them back to server 2 so
                    # that its next death has flows to take over (migration, then a kill).
                    time.sleep(2.0)
                    r = sh(NFMGR, "migrate", "--socket", os.path.join(state, "s1.sock"),
                           "--from", "rt0@1", "--to", "rt0@2", "--flows", str(a.flows // 2),
                           "--json", check=False, timeout=60)
                    if r.returncode == 0:
                        migrations += 1
                        try:
                            moved += int(json.loads(r.stdout).get("moved", 0))
                        except (ValueError, AttributeError):
                            pass
                next_kill = time.time() + a.every
            time.sleep(1.0)
        # Server 1 finished (its generator is done): stop server 2 for its report.
        sh(NFMGR, "stop", "--socket", os.path.join(state, "s2.sock"), check=False)
        end = time.time() + 30
        while alive(pid_of(state, 2) or 0) and time.time() < end:
            time.sleep(0.2)
        reports = {}
        for s in (1, 2):
            with open(os.path.join(state, f"s{s}-report.json")) as f:
                reports[s] = json.load(f)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
        sys.exit(f"soak-servers: the run failed ({e}); files in {state}")
    log1 = open(os.path.join(state, "s1.log")).read()
    takeovers = log1.count("took over")
    ports = reports[1].get("ports", {})
    gen, sink = ports.get("gen0", {}), ports.get("sink0", {})
    leaked = {s: r.get("snapshot", {}).get("pool", {}).get("total", 0)
              - r.get("snapshot", {}).get("pool", {}).get("free", 0) for s, r in reports.items()}
    generated = gen.get("sent", 0)
    # Sequence numbers the generator skipped (the vswitch's ring full) count as lost.
    skipped = gen.get("skipped", 0)
    received, lost = sink.get("received", 0), sink.get("lost", 0)
    memory, growing = memory_summary(samples, secs)
    report = {
        "minutes": a.minutes, "kill_every_s": a.every, "server_kills": kills,
        "not_back": not_back, "takeover_events": takeovers,
        "migrations_to_server_2": migrations, "flows_migrated": moved,
        "buffers_leaked": leaked, "generated": generated, "skipped_at_source": skipped,
        "received": received, "lost": lost,
        "duplicates": sink.get("duplicates", 0), "reordered": sink.get("reordered", 0),
        "accounted": generated + skipped == received + lost,
        "memory_server1": memory, "memory_growing": growing, "state": state,
    }
    ok = (all(v == 0 for v in leaked.values()) and report["duplicates"] == 0
          and report["accounted"] and not growing and not_back == 0 and kills > 0
          and takeovers >= min(kills, migrations + 1))
    report["ok"] = ok
    if a.json:
        print(json.dumps(report))
    else:
        print(f"soak-servers: {a.minutes:g} min, {kills} server kills, {not_back} not back, "
              f"{takeovers} takeovers; {migrations} migrations back to server 2 "
              f"({moved} flows)")
        print(f"  buffers leaked: server 1 {leaked[1]}, server 2 {leaked[2]}")
        print(f"  packets: {generated} generated ({skipped} more skipped at the source), "
              f"{received} received, {lost} lost, "
              f"{report['duplicates']} duplicated, {report['reordered']} reordered; "
              f"accounted: {report['accounted']}")
        print_memory(memory)
        print("  OK" if ok else "  FAILED")
    if ok:
        sh(TESTBED, "down", "--prefix", a.prefix, check=False, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
