#!/usr/bin/env python3
"""The failover drills' shared library (docs/DRILLS.md): set-up, traffic, the fault, timing
and the report. Each drill (kill-runtime.sh, kill-vswitch.sh, kill-server.sh [--cut-link],
freeze-runtime.sh, kill-coordinator.sh) is this with its fault and its promises.

What a run does, in order:
  1. brings up the namespaced test bed (scripts/testbed.sh, two servers, chain
     firewall -> nat -> flow_monitor with the chosen replication), or uses a running one
     (--prefix with --no-setup);
  2. drives traffic from before the fault to well after it, all at once, from outside every
     process the fault kills: the generator of server 1 (per-flow sequence numbers, >= 20
     packets/s per flow) into its sink, iperf3 -P N streams, a rate-limited curl download of a
     random file checked by sha256, and tcpdump counting RSTs on the client and server sides;
  3. picks the victim so that the fault hits every kind of traffic (the runtime, or the
     server, that carries the curl download, at least one iperf3 stream and generator flows;
     never server 1, which faces the client and server), injects the fault at --fault-at s,
     and keeps traffic running --after s (a cut link heals --heal-after s after the cut:
     the server must then come back empty, fenced, and no flow may have two owners);
  4. reads the platform's events (`nfmgr top --json`): detection is the first event about
     the fault, takeover the last "took over" event; the sink's per-flow gaps cross-check it;
  5. prints the report (a table, or one JSON object with --json) and exits 1 on any violated
     promise, 2 when the drill itself could not run.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTBED = os.path.join(ROOT, "scripts", "testbed.sh")
SERVER_IP = "10.77.0.2"
HTTP_PORT = 8080


def now_ms():
    return time.time() * 1000.0


class DrillError(Exception):
    """The drill could not run (not a verdict on the platform)."""


class Drill:
    def __init__(self, a):
        self.a = a
        self.prefix = a.prefix
        self.state = f"/tmp/nf-testbed-{self.prefix}"
        self.bin = a.bin or os.path.join(ROOT, "target", "release")
        self.nfmgr_bin = os.path.join(self.bin, "nfmgr")
        self.work = os.path.join(self.state, "drill")
        self.procs = {}
        self.t0 = None
        self.notes = []

    # ---- plumbing ----------------------------------------------------------------------

    def ns(self, name):
        return f"{self.prefix}-{name}"

    def popen(self, ns, cmd, out=None):
        f = open(out, "w") if out else subprocess.DEVNULL
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns(ns)] + cmd,
            stdout=f,
            stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
            start_new_session=True,
        )

    def nfmgr(self, *args, server=1, check=True):
        sock = os.path.join(self.state, f"s{server}.sock")
        r = subprocess.run(
            [self.nfmgr_bin] + list(args) + ["--socket", sock, "--json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if r.returncode != 0:
            if check:
                raise DrillError(f"nfmgr {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return r.stdout

    def log(self, msg):
        if not self.a.json:
            print(f"[{(now_ms() - self.t0) / 1000 if self.t0 else 0:6.1f}s] {msg}", flush=True)

    # ---- set-up and tear-down ----------------------------------------------------------

    def up(self):
        if self.a.no_setup:
            return
        subprocess.run([TESTBED, "down", "--prefix", self.prefix], capture_output=True)
        gen_ms = int((self.a.fault_at + self.a.after + 8) * 1000)
        # The generator's flows are dispatched when they start: on several servers, once
        # the cluster has formed (the test bed returns then, but its first server's nfmgr,
        # where the generator runs, started earlier), so that some land on every server.
        start_after = 2500 if self.a.servers > 1 else 0
        cmd = [
            TESTBED, "up", "--prefix", self.prefix,
            *(["--etcd"] if self.a.fault == "kill-coordinator" else []),
            "--servers", str(self.a.servers), "--runtimes", str(self.a.runtimes),
            "--chain", self.a.chain,
            "--chain-set", f'replication = "{self.a.replication}"',
            "--gen", f"{self.a.gen_flows},{self.a.gen_pps},{gen_ms},{start_after}",
        ]
        if self.a.bin:
            cmd += ["--bin", self.a.bin]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DrillError(f"test bed: {r.stderr.strip() or r.stdout.strip()}")
        os.makedirs(self.work, exist_ok=True)

    def stop_traffic(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def down(self):
        self.stop_traffic()
        if not self.a.no_setup and not self.a.keep:
            subprocess.run([TESTBED, "down", "--prefix", self.prefix], capture_output=True)

    # ---- traffic -----------------------------------------------------------------------

    def start_traffic(self):
        w = self.work
        # A file the download takes about fault_at + after + a few s at the rate limit.
        total_s = self.a.fault_at + self.a.after + 4
        size = int(self.a.curl_rate_kib * 1024 * total_s)
        path = os.path.join(w, "www", "big.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        self.sha_expected = hashlib.sha256(open(path, "rb").read()).hexdigest()
        self.curl_size = size
        self.procs["http"] = self.popen(
            "server",
            ["python3", "-m", "http.server", str(HTTP_PORT), "--bind", SERVER_IP,
             "--directory", os.path.dirname(path)],
            out=os.path.join(w, "http.log"),
        )
        self.procs["iperf_s"] = self.popen(
            "server", ["iperf3", "-s", "-1", "-B", SERVER_IP], out=os.path.join(w, "iperf_s.log")
        )
        for side in ("client", "server"):
            self.procs[f"tcpdump_{side}"] = self.popen(
                side,
                ["tcpdump", "-i", "eth0", "-nn", "-tt", "-l", "-U",
                 "tcp[tcpflags] & tcp-rst != 0"],
                out=os.path.join(w, f"rst_{side}.txt"),
            )
        time.sleep(0.8)
        self.t0 = now_ms()
        duration = int(self.a.fault_at + self.a.after)
        self.procs["iperf"] = self.popen(
            "client",
            ["iperf3", "-c", SERVER_IP, "-P", str(self.a.streams), "-t", str(duration),
             "-b", self.a.iperf_rate, "-i", "1", "-J", "--connect-timeout", "3000"],
            out=os.path.join(w, "iperf.json"),
        )
        self.start_curl()

    def start_curl(self):
        if "curl" in self.procs and self.procs["curl"].poll() is None:
            os.killpg(self.procs["curl"].pid, signal.SIGKILL)
            self.procs["curl"].wait()
        self.curl_out = os.path.join(self.work, "big.got")
        # A download stopped to be placed again ends with the client's RST: what came
        # before this one is not the platform's doing.
        time.sleep(0.2)
        self.curl_started_ms = now_ms()
        self.procs["curl"] = self.popen(
            "client",
            ["curl", "-sS", "--max-time", str(int(self.a.fault_at + self.a.after + 30)),
             "--limit-rate", f"{self.a.curl_rate_kib}K", "-o", self.curl_out,
             "-w", "%{http_code} %{size_download}\n",
             f"http://{SERVER_IP}:{HTTP_PORT}/big.bin"],
            out=os.path.join(self.work, "curl.log"),
        )

    # ---- where the traffic is ----------------------------------------------------------

    def placement(self):
        """Per runtime address ("S/SLOT"): its name@server and which traffic it carries."""
        out = {}
        for rt in self.nfmgr("flows", "--limit", "100000"):
            kinds = {"curl": 0, "iperf": 0, "gen": []}
            for f in rt.get("flows", []):
                k = f["key"]
                if re.search(rf":{HTTP_PORT}(\s|$)", k):
                    kinds["curl"] += 1
                elif re.search(r":5201(\s|$)", k):
                    kinds["iperf"] += 1
                m = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+):(\d+) <-> 10\.255\.255\.1:9", k)
                if m:
                    ip = [int(x) for x in m.groups()[:4]]
                    v = (ip[0] << 24 | ip[1] << 16 | ip[2] << 8 | ip[3]) - 0x0A000001
                    kinds["gen"].append((v << 12) | (int(m.group(5)) - 10000))
            out[rt["addr"]] = kinds
        return out

    def names(self):
        """Runtime address -> NAME@SERVER, from nfmgr runtimes."""
        names = {}
        rts = self.nfmgr("runtimes")
        for e in rts if isinstance(rts, list) else rts.get("endpoints", []):
            addr = e.get("addr")
            if isinstance(addr, dict):
                addr = f"{addr['server']}/{addr['slot']}"
            names[addr] = f"{e.get('name')}@{str(addr).split('/')[0]}"
        return names

    def pick_victim(self):
        """The runtime (kill-runtime) or server (kill-server) carrying curl, an iperf3
        stream and generator flows; restarts curl until its connection lands right."""
        for attempt in range(12):
            time.sleep(1.0)
            pl = self.placement()
            placed = sum(len(k["gen"]) for k in pl.values())
            if placed < 0.98 * self.a.gen_flows and attempt < 11:
                # The generator is still starting its flows: the victim's share is not
                # known yet.
                self.log(f"{placed} of {self.a.gen_flows} generator flows placed; waiting")
                continue
            coordinator = self.coordinator() if self.a.fault == "kill-coordinator" else None
            for addr, k in sorted(pl.items()):
                server = int(addr.split("/")[0])
                if self.a.fault in ("kill-server", "cut-link", "kill-coordinator") and server == 1:
                    continue
                if coordinator is not None and server != coordinator:
                    continue
                if self.a.victim_server is not None and server != self.a.victim_server:
                    continue
                if k["curl"] and k["iperf"] and k["gen"]:
                    return addr, pl
            self.log(f"the download's connection is not where the fault can hit it "
                     f"(attempt {attempt + 1}): restarting curl")
            self.start_curl()
        raise DrillError("could not place the test traffic on a runtime the fault can hit")

    def coordinator(self, server=1):
        """The coordinator as server `server` knows it (None if it cannot say)."""
        st = self.nfmgr("status", server=server, check=False)
        return st.get("coordinator") if isinstance(st, dict) else None

    def watch_election(self, old):
        """Times, from the fault, until server 1 names a coordinator other than `old`."""
        self.elected = None
        def watch():
            end = self.fault_ms + 30000
            while now_ms() < end:
                c = self.coordinator()
                if c is not None and c != old:
                    self.elected = (c, now_ms() - self.fault_ms)
                    return
                time.sleep(0.05)
        self.election_watch = threading.Thread(target=watch, daemon=True)
        self.election_watch.start()

    # ---- the fault ---------------------------------------------------------------------

    def pid_of(self, victim):
        server, slot = (int(x) for x in victim.split("/"))
        st = self.nfmgr("status", server=server)
        for p in st.get("processes", []):
            if int(p.get("slot", -1)) == slot:
                return int(p["pid"])
        raise DrillError(f"no process in slot {slot} of server {server}")

    def inject(self, victim):
        if self.a.fault == "freeze-runtime":
            pid = self.pid_of(victim)
            name = self.names().get(victim) or victim
            self.fault_desc = f"SIGSTOP runtime {name} ({victim}, pid {pid})"
            self.fault_ms = now_ms()
            os.kill(pid, signal.SIGSTOP)
        elif self.a.fault == "kill-runtime":
            name = self.names().get(victim) or victim
            self.fault_desc = f"kill -9 runtime {name} ({victim})"
            self.fault_ms = now_ms()
            self.nfmgr("kill", victim.replace("/", "/"), check=True)
        elif self.a.fault == "kill-vswitch":
            # Server 1's: the vswitch every flow enters by (the victim runtime carries the
            # traffic whose flows it must send on where they were).
            self.fault_desc = "kill -9 vswitch vs0@1 (the ingress server's: it dispatches every flow)"
            self.fault_ms = now_ms()
            self.nfmgr("kill", "vs0@1", check=True)
        elif self.a.fault == "cut-link":
            server = int(victim.split("/")[0])
            port = f"p{server}"
            self.fault_desc = (f"cut server {server}'s cluster link ({port} down on the "
                               f"bridge), healed {self.a.heal_after:g} s later")
            self.fault_ms = now_ms()
            self.set_link(port, "down")
            self.heal = threading.Timer(self.a.heal_after, self.set_link, (port, "up"))
            self.heal.start()
        else:
            server = int(victim.split("/")[0])
            pid = int(open(os.path.join(self.state, f"s{server}.pid")).read())
            self.fault_desc = f"kill -9 nfmgr of server {server} and with it all its processes"
            if self.a.fault == "kill-coordinator":
                self.fault_desc = (f"kill -9 nfmgr of server {server}, the coordinator, and "
                                   f"with it all its processes")
            self.fault_ms = now_ms()
            os.kill(pid, signal.SIGKILL)
            if self.a.fault == "kill-coordinator":
                self.watch_election(server)
        self.log(f"fault: {self.fault_desc}")

    def set_link(self, port, state):
        r = subprocess.run(["ip", "-n", self.ns("net"), "link", "set", port, state],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.notes.append(f"could not set {port} {state}: {r.stderr.strip()}")
        elif state == "up":
            self.log(f"link {port} up again")

    # ---- collection and verdict --------------------------------------------------------

    def events(self):
        # The coordinator gathers every server's events (a new one, after the old died).
        server = self.coordinator() or 1
        top = self.nfmgr("top", server=server, check=False) or self.nfmgr("top")
        return top.get("events", []) if isinstance(top, dict) else []

    def run(self):
        self.up()
        self.start_traffic()
        self.log("traffic started")
        victim, pl_before = self.pick_victim()
        wait = self.t0 + self.a.fault_at * 1000 - now_ms()
        if wait > 0:
            time.sleep(wait / 1000)
        self.inject(victim)
        time.sleep(2.0)
        if self.a.fault == "cut-link":
            # Owners are counted once the cut server is back (fenced and joined again).
            self.heal.join()
            time.sleep(3.0)
        # Where things are after the takeover (two owners?).
        pl_after = self.placement()
        for p in ("iperf", "curl"):
            try:
                self.procs[p].wait(timeout=self.a.after + 15)
            except subprocess.TimeoutExpired:
                self.notes.append(f"{p} did not finish in time")
                os.killpg(self.procs[p].pid, signal.SIGKILL)
        events = self.events()
        # Every live server's coordinator, as its `nfmgr status` names it.
        vserver = int(victim.split("/")[0])
        self.named = {srv: self.coordinator(server=srv)
                      for srv in range(1, self.a.servers + 1) if srv != vserver}
        self.stop_traffic()
        # nfmgr writes its report (the sink's) when it stops.
        if not self.a.no_setup:
            sock = os.path.join(self.state, "s1.sock")
            subprocess.run([self.nfmgr_bin, "stop", "--socket", sock], capture_output=True)
            for _ in range(100):
                if not os.path.exists(sock):
                    break
                time.sleep(0.1)
            time.sleep(0.5)
        return self.report(victim, pl_before, pl_after, events)

    def report(self, victim, pl_before, pl_after, events):
        a = self.a
        fault_rel = self.fault_ms - self.t0
        hit = pl_before[victim]
        violations = []

        # Detection and takeover, from the platform's own events.
        vserver, vslot = victim.split("/")
        later = [e for e in events if e["at_ms"] >= self.fault_ms - 50]
        if a.fault == "freeze-runtime":
            det = [e for e in later if "frozen" in e["what"]]
        elif a.fault == "kill-runtime":
            det = [e for e in later if "killed by" in e["what"] or "died" in e["what"]]
        elif a.fault == "kill-vswitch":
            det = [e for e in later if "killed by" in e["what"] or "died" in e["what"]]
        elif a.fault == "kill-coordinator":
            det = [e for e in later if "lost the coordinator" in e["what"]
                   or (f"server {vserver} " in e["what"] and "down" in e["what"])]
        else:
            det = [e for e in later if f"server {vserver} " in e["what"] and "down" in e["what"]]
        took = [e for e in later if "took over" in e["what"]]
        detection_ms = (det[0]["at_ms"] - self.fault_ms) if det else None
        takeover_ms = (max(e["at_ms"] for e in took) - self.fault_ms) if took else None
        recovered = sum(int(m.group(1)) for e in took
                        for m in [re.search(r"took over (\d+) flows", e["what"])] if m)
        if a.fault == "kill-vswitch":
            # Nothing is taken over: the new vswitch learns the flows from their runtimes.
            took, takeover_ms = [], None
        if a.replication != "off" and a.fault != "kill-vswitch":
            if detection_ms is None:
                violations.append("no_detection_event")
            elif detection_ms > a.max_detection_ms:
                violations.append("detection_too_slow")
            if takeover_ms is None:
                violations.append("no_takeover_event")
            elif takeover_ms > a.max_takeover_ms:
                violations.append("takeover_too_slow")

        # iperf3: stalls after the takeover.
        tcp = {"streams": 0, "stalled": 0, "bytes": 0, "retransmits": 0, "error": None}
        try:
            ip = json.load(open(os.path.join(self.work, "iperf.json")))
        except (OSError, json.JSONDecodeError):
            ip = {"error": "no JSON from iperf3 (it hung or was killed)"}
        if ip.get("error"):
            tcp["error"] = ip["error"]
            violations.append("iperf3_failed")
        else:
            ivs = ip.get("intervals", [])
            n = len(ivs[0]["streams"]) if ivs else 0
            tcp["streams"] = n
            tcp["bytes"] = ip["end"]["sum_sent"]["bytes"]
            tcp["retransmits"] = ip["end"]["sum_sent"].get("retransmits", 0)
            start_rel = ip["start"]["timestamp"]["timesecs"] * 1000 - self.t0
            f_s = (fault_rel - max(start_rel, 0)) / 1000
            tk_s = f_s + ((takeover_ms or 0) / 1000)
            stalled = set()
            for i in range(n):
                before = [iv["streams"][i]["bits_per_second"] for iv in ivs
                          if iv["streams"][i]["end"] <= f_s]
                mean = sum(before) / len(before) if before else 0
                for iv in ivs:
                    s = iv["streams"][i]
                    if s["start"] >= tk_s + 1.0 and s["end"] - s["start"] > 0.9:
                        if s["bits_per_second"] < 0.1 * mean:
                            stalled.add(i)
            tcp["stalled"] = len(stalled)
            if stalled:
                violations.append("stalled_stream")

        # curl and its checksum.
        curl = {"bytes": 0, "sha256_ok": False}
        try:
            data = open(self.curl_out, "rb").read()
            curl["bytes"] = len(data)
            curl["sha256_ok"] = hashlib.sha256(data).hexdigest() == self.sha_expected
        except OSError:
            pass
        if not curl["sha256_ok"]:
            violations.append("curl_failed_or_corrupt")

        # RSTs: the test traffic sends none on purpose while it runs. iperf3's server resets
        # its data connections when a test ends (it closes them with data unread), so what
        # comes after the streams' end is not counted.
        rst = {}
        streams_end_s = (self.t0 + (a.fault_at + a.after) * 1000 - 300) / 1000
        for side in ("client", "server"):
            n = 0
            try:
                for line in open(os.path.join(self.work, f"rst_{side}.txt")):
                    f = line.split()
                    if len(f) > 2 and f[1] == "IP" and "[R" in line:
                        try:
                            if self.curl_started_ms / 1000 <= float(f[0]) < streams_end_s:
                                n += 1
                        except ValueError:
                            n += 1
            except OSError:
                pass
            rst[side] = n
        tcp["resets"] = rst
        if rst["client"] or rst["server"]:
            violations.append("tcp_reset_seen")

        # The sink: generator flows on the victim, their gaps and losses.
        sink = {}
        try:
            rep = json.load(open(os.path.join(self.state, "s1-report.json")))
            sink = next((v for k, v in rep.get("ports", {}).items() if k.startswith("sink")), {})
            pool = rep.get("snapshot", {}).get("pool", {})
        except (OSError, json.JSONDecodeError):
            rep, pool = None, {}
        gaps = sink.get("max_gap_ms", {})
        affected = hit["gen"]
        ag = sorted((gaps.get(str(f), 0.0) for f in affected), reverse=True)
        gap = {
            "max": ag[0] if ag else None,
            "p99": ag[len(ag) // 100] if ag else None,
        }
        resumed = sum(1 for f in affected if str(f) in gaps)
        packets = {k: sink.get(k) for k in ("received", "lost", "duplicates", "reordered")}
        if a.replication != "off" and resumed < len(affected):
            violations.append("generator_flows_lost")
        if rep is None:
            self.notes.append("no report from server 1's nfmgr (sink and pool not checked)")
        elif pool.get("in_use", 0) != 0:
            violations.append("buffers_leaked")

        # The coordinator's loss: another elected in time, and no flow of another server
        # than the dead one held up meanwhile (the data plane never waits on the
        # coordinator).
        coordinator = None
        if a.fault == "kill-coordinator":
            self.election_watch.join(timeout=1)
            elected = getattr(self, "elected", None)
            others = [f for addr, k in pl_before.items()
                      if addr.split("/")[0] != vserver for f in k["gen"]]
            og = max((gaps.get(str(f), 0.0) for f in others), default=None)
            lost_by_flow = sink.get("lost_by_flow", {})
            lost_elsewhere = sum(int(lost_by_flow.get(str(f), 0)) for f in others)
            named = self.named
            coordinator = {"before": int(vserver),
                           "after": elected[0] if elected else None,
                           "elected_ms": round(elected[1]) if elected else None,
                           "named_by": named,
                           "generator_flows_elsewhere": len(others),
                           "max_gap_elsewhere_ms": og,
                           "lost_elsewhere": lost_elsewhere}
            if elected is None:
                violations.append("no_coordinator_elected")
            elif elected[1] > a.max_election_ms:
                violations.append("election_too_slow")
            if elected is not None and any(c != elected[0] for c in named.values()):
                violations.append("coordinator_not_named_everywhere")
            if og is not None and og > a.max_gap_elsewhere_ms:
                violations.append("flow_elsewhere_held_up")
            # Their runtimes live: a coordinator's loss must cost them nothing (under output
            # commit a replica's loss does not either: the held output waits at the primary).
            if lost_elsewhere and a.replication == "output-commit":
                violations.append("packets_lost_elsewhere")

        # No flow with two owners after the takeover.
        owners = {}
        for addr, k in pl_after.items():
            for f in k["gen"]:
                owners.setdefault(f, []).append(addr)
        two = [f for f, o in owners.items() if len(o) > 1]
        if two:
            violations.append("flow_with_two_owners")
        if not (hit["curl"] and hit["iperf"] and hit["gen"]):
            violations.append("fault_missed_traffic")

        report = {
            "drill": a.fault,
            "replication": a.replication,
            "fault": {"what": self.fault_desc, "at_ms": round(fault_rel), "victim": victim},
            "detection_ms": None if detection_ms is None else round(detection_ms, 1),
            "takeover_ms": None if takeover_ms is None else round(takeover_ms, 1),
            "gap_ms": gap,
            "coordinator": coordinator,
            "flows": {"affected_generator": len(affected), "resumed_generator": resumed,
                      "recovered_by_platform": recovered, "two_owners": len(two),
                      "iperf_streams_hit": hit["iperf"], "curl_hit": bool(hit["curl"])},
            "packets": packets,
            "tcp": tcp,
            "curl": curl,
            "events": [dict(e, after_fault_ms=round(e["at_ms"] - self.fault_ms, 1))
                       for e in later if e["at_ms"] <= self.fault_ms + 15000][:20],
            "notes": self.notes,
            "verdict": "pass" if not violations else "fail",
            "violations": violations,
        }
        return report


def print_report(r):
    print()
    print(f"drill        {r['drill']} (replication {r['replication']})")
    print(f"fault        {r['fault']['what']} at {r['fault']['at_ms']} ms")
    print(f"detection    {r['detection_ms']} ms     takeover {r['takeover_ms']} ms "
          f"(platform events)")
    g = r["gap_ms"]
    print(f"gap          max {g['max']} ms, p99 {g['p99']} ms over the affected generator flows")
    f = r["flows"]
    print(f"flows        generator on the victim {f['affected_generator']}, resumed "
          f"{f['resumed_generator']}; taken over by the platform {f['recovered_by_platform']}; "
          f"two owners {f['two_owners']}")
    p = r["packets"]
    print(f"packets      received {p['received']}, lost {p['lost']}, duplicated "
          f"{p['duplicates']}, reordered {p['reordered']} (sink)")
    t = r["tcp"]
    print(f"tcp          {t['streams']} streams, stalled {t['stalled']}, resets client "
          f"{t['resets']['client']} server {t['resets']['server']}, {t['bytes']} bytes, "
          f"{t['retransmits']} retransmits" + (f", error: {t['error']}" if t["error"] else ""))
    c = r["curl"]
    print(f"curl         {c['bytes']} bytes, sha256 {'ok' if c['sha256_ok'] else 'WRONG or missing'}")
    co = r.get("coordinator")
    if co:
        print(f"coordinator  server {co['before']} killed; server {co['after']} elected "
              f"{co['elected_ms']} ms after the fault, named by servers "
              f"{co['named_by']}; {co['generator_flows_elsewhere']} generator flows elsewhere, "
              f"their longest gap {co['max_gap_elsewhere_ms']} ms, {co['lost_elsewhere']} "
              f"packets of them lost")
    for e in r["events"]:
        print(f"  event {e['after_fault_ms']:+8.1f} ms  server {e['server']} {e['source']}: "
              f"{e['what']}")
    for n in r["notes"]:
        print(f"note         {n}")
    print(f"verdict      {r['verdict'].upper()}" +
          (f": {', '.join(r['violations'])}" if r["violations"] else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fault", choices=["kill-runtime", "kill-vswitch", "kill-server", "cut-link",
                                        "kill-coordinator",
                                        "freeze-runtime"], required=True)
    ap.add_argument("--heal-after", type=float, default=3.0,
                    help="cut-link: s until the link is up again")
    ap.add_argument("--replication", default="output-commit",
                    choices=["output-commit", "periodic", "off"])
    ap.add_argument("--prefix", default="drill")
    ap.add_argument("--bin", help="directory of nfmgr and the processes (default target/release)")
    ap.add_argument("--servers", type=int, default=None,
                    help="servers in the test bed (2; 3 for kill-coordinator)")
    ap.add_argument("--runtimes", type=int, default=1, help="runtimes per server")
    ap.add_argument("--chain", default="firewall,nat,flow_monitor")
    ap.add_argument("--streams", type=int, default=4, help="iperf3 -P")
    ap.add_argument("--iperf-rate", default="25M",
                    help="iperf3 -b, per stream: below what the platform carries even with "
                         "one runtime gone, so that a stream slower than a tenth of its mean "
                         "after the takeover is stalled, not starved of capacity")
    ap.add_argument("--gen-flows", type=int, default=200)
    ap.add_argument("--gen-pps", type=int, default=25, help="packets/s per generator flow")
    ap.add_argument("--curl-rate-kib", type=int, default=512)
    ap.add_argument("--fault-at", type=float, default=6.0, help="s after traffic starts")
    ap.add_argument("--victim-server", type=int, default=None,
                    help="kill-runtime, freeze-runtime: a runtime of this server only "
                         "(2: one that the ingress vswitch on server 1 knows only from "
                         "the cluster view)")
    ap.add_argument("--after", type=float, default=12.0, help="s of traffic after the fault")
    ap.add_argument("--max-detection-ms", type=float, default=1000.0)
    ap.add_argument("--max-takeover-ms", type=float, default=2000.0)
    ap.add_argument("--max-election-ms", type=float, default=5000.0,
                    help="kill-coordinator: another coordinator within this long")
    ap.add_argument("--max-gap-elsewhere-ms", type=float, default=1000.0,
                    help="kill-coordinator: longest gap of a generator flow on another server")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--keep", action="store_true", help="leave the test bed up")
    ap.add_argument("--no-setup", action="store_true", help="use a running test bed (--prefix)")
    a = ap.parse_args()
    if a.servers is None:
        a.servers = 3 if a.fault == "kill-coordinator" else 2
    if a.fault == "kill-coordinator" and shutil.which("etcd") is None:
        print("drill: kill-coordinator needs etcd (apt-get install etcd-server)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("drill: needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("iperf3", "curl", "tcpdump", "ip"):
        if shutil.which(tool) is None:
            print(f"drill: {tool} is not installed", file=sys.stderr)
            return 2
    d = Drill(a)
    interrupted = []

    def on_signal(sig, _frame):
        interrupted.append(sig)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        r = d.run()
    except DrillError as e:
        print(f"drill: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drill: interrupted", file=sys.stderr)
        return 2
    finally:
        d.down()
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print_report(r)
    return 0 if r["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
