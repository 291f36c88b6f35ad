#!/usr/bin/env python3
"""A/B of two builds, alternated in one run: the runtime core's chain benchmark, or (with
--migration) the whole platform on the flow-migration benchmark.

  scripts/bench/ab.py                      HEAD against the working tree
  scripts/bench/ab.py --base 1313427       an older commit against the working tree
  scripts/bench/ab.py --base A --new B     two commits
  scripts/bench/ab.py --smoke              one short pair and a small count (checks it runs)
  scripts/bench/ab.py --migration          migration of 1,000 and 600,000 flows (root)
  scripts/bench/ab.py --migration --smoke  one pair at 1,000 flows (checks it runs)

For each flow count, the two binaries of `runtime/benches/chain.rs` (one runtime core,
firewall -> flow monitor -> load balancer, 64-byte packets, flows visited in a new random
order every round) run alternately, at least 7 pairs, the order swapped every pair so that
neither build always runs first. Printed per size: each build's median Mpps, the median of
the per-pair ratios new/base and their spread (min, quartiles, max).

On a shared machine wall-clock rates swing by a third from one run to the next, so each
build is also run once per size in the benchmark's counted mode under valgrind's callgrind,
collecting only inside the runtime's share of the work (`measured_step`): instructions per
packet, and simulated L1 data and L2 cache misses per packet (the cache sizes are fixed
below, not read from the machine, so figures compare across machines). These repeat
to the instruction.

Revisions other than the working tree are checked out under target/ab/src-<sha> and built
in target/ab/build-<sha>; a revision whose benchmark predates the counted mode gets the working
tree's `runtime/benches/chain.rs` (said in the output). Binaries are kept in target/ab/bin.
Every result is one JSON line on stdout and in target/bench/ab-<timestamp>.jsonl.

--migration: the release binaries of the whole workspace (`cargo build --release --bins`, no
extra features) of each revision, built as above (the working tree in its own target
directory) and copied to target/ab/platform-<label>, so that a rebuild during the run changes
neither. For each size of --migration-sizes, at least 7 pairs, the order swapped every pair;
each run is one `scripts/bench/run.py --only migration --no-build --repeat 1 --flows N --path
"one host"` (its own test bed, prefix "bm": one server, two runtimes, rt0's N flows moved to
rt1 under generator traffic) with NF_BENCH_BIN naming that build's binaries. Both builds run
under the working tree's run.py and testbed.sh, so that only the binaries differ. Printed
per size: each build's median time to migrate, the median of the per-pair ratios base
ms / new ms (above 1: new migrates faster, the same sense as the chain's new/base Mpps) and
their spread, and each build's worst sink loss, reordering, duplicates and overload drops
over its runs. A run that fails (run.py exits nonzero, or moves fewer than all the flows)
stops the script with a nonzero status, after writing what it has.
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AB = os.path.join(ROOT, "target", "ab")
BENCH_SRC = os.path.join("runtime", "benches", "chain.rs")
RUN_PY = os.path.join(ROOT, "scripts", "bench", "run.py")
# Cache geometry for the simulation: a 32 KiB 8-way L1d and, as the "last level", a 2 MiB
# 16-way cache, the L2 each core of this machine has to itself (its 32 MiB L3 is shared,
# and would hold every flow of 100,000): a miss there is what a flow table costs once it
# outgrows the core. 64-byte lines.
CACHE = ["--D1=32768,8,64", "--LL=2097152,16,64"]
RESULTS = []


def emit(obj):
    RESULTS.append(obj)
    print(json.dumps(obj), flush=True)


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def build(src, target_dir, label):
    """Builds the chain benchmark in `src` and copies the executable to target/ab/bin."""
    env = dict(os.environ)
    if target_dir:
        env["CARGO_TARGET_DIR"] = target_dir
    print(f"ab: building {label} ...", file=sys.stderr, flush=True)
    out = subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "nf-runtime", "--bench", "chain",
         "--message-format=json"],
        cwd=src, env=env, check=True, capture_output=True, text=True).stdout
    exe = None
    for line in out.splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "chain" \
                and m.get("executable"):
            exe = m["executable"]
    if not exe:
        sys.exit(f"ab: no chain benchmark executable built for {label}")
    os.makedirs(os.path.join(AB, "bin"), exist_ok=True)
    dest = os.path.join(AB, "bin", f"chain-{label}")
    shutil.copy2(exe, dest)
    return dest


def prepare(rev):
    """The benchmark binary of `rev` ("worktree" for the working tree) and a note on how
    it was built."""
    if rev == "worktree":
        return build(ROOT, None, "worktree"), "working tree"
    sha, src = checkout(rev)
    note = f"{rev} ({sha[:12]})"
    bench = os.path.join(src, BENCH_SRC)
    own = subprocess.run(["git", "show", f"{sha}:{BENCH_SRC}"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    if "NF_BENCH_MODE" not in own:
        shutil.copy2(os.path.join(ROOT, BENCH_SRC), bench)
        note += ", with the working tree's benchmark (its own predates the counted mode)"
    # A target directory per revision: cargo reuses a workspace crate built from another
    # checkout of the same name and version.
    return build(src, os.path.join(AB, f"build-{sha[:12]}"), sha[:12]), note


def build_platform(src, target_dir, label):
    """Builds the release binaries of the whole workspace in `src` and copies them to
    target/ab/platform-<label>; returns that directory."""
    env = dict(os.environ)
    if target_dir:
        env["CARGO_TARGET_DIR"] = target_dir
    print(f"ab: building the platform, {label} ...", file=sys.stderr, flush=True)
    out = subprocess.run(
        ["cargo", "build", "--release", "--bins", "-q", "--message-format=json"],
        cwd=src, env=env, check=True, capture_output=True, text=True).stdout
    exes = []
    for line in out.splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            exes.append(m["executable"])
    if not any(os.path.basename(e) == "nfmgr" for e in exes):
        sys.exit(f"ab: no nfmgr built for {label}")
    dest = os.path.join(AB, f"platform-{label}")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for exe in exes:
        shutil.copy2(exe, dest)
    return dest


def checkout(rev):
    """The full sha of `rev`, checked out under target/ab/src-<sha>."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    src = os.path.join(AB, f"src-{sha[:12]}")
    if not os.path.isdir(src):
        os.makedirs(AB, exist_ok=True)
        git("worktree", "add", "--detach", "--force", src, sha)
    return sha, src


def prepare_platform(rev):
    """The directory of the platform's binaries of `rev` ("worktree" for the working tree)
    and a note on how they were built."""
    if rev == "worktree":
        return build_platform(ROOT, None, "worktree"), "working tree"
    sha, src = checkout(rev)
    return (build_platform(src, os.path.join(AB, f"build-{sha[:12]}"), sha[:12]),
            f"{rev} ({sha[:12]})")


def timed(binary, flows, secs):
    env = dict(os.environ, NF_BENCH_FLOWS=str(flows), NF_BENCH_SECONDS=str(secs),
               NF_BENCH_RUNS="1")
    env.pop("NF_BENCH_MODE", None)
    out = subprocess.run([binary], env=env, check=True, capture_output=True, text=True,
                         timeout=600).stdout
    r = [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]
    return r["mpps"], r.get("platform_bytes_per_flow")


def counted(binary, flows, rounds):
    """Instructions and simulated cache misses per packet in the runtime's share."""
    if not shutil.which("valgrind"):
        return None
    env = dict(os.environ, NF_BENCH_FLOWS=str(flows), NF_BENCH_MODE="count",
               NF_BENCH_ROUNDS=str(rounds))
    out_file = os.path.join(AB, f"callgrind-{os.path.basename(binary)}-{flows}.out")
    p = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
         "--toggle-collect=*measured_step*", "--cache-sim=yes", *CACHE, binary],
        env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        sys.exit(f"ab: callgrind of {binary} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"Collected : ([\d ]+)", p.stderr)
    r = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")][-1]
    if not m or not r.get("measured_packets"):
        sys.exit(f"ab: no counts from callgrind of {binary}")
    # Events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw (trailing zeros are left out)
    ev = [int(x) for x in m.group(1).split()]
    ev += [0] * (9 - len(ev))
    pk = r["measured_packets"]
    return {
        "instructions_per_packet": round(ev[0] / pk, 1),
        "d1_misses_per_packet": round((ev[4] + ev[5]) / pk, 2),
        "l2_misses_per_packet": round((ev[7] + ev[8]) / pk, 3),
        "packets": pk,
        "callgrind_out": os.path.relpath(out_file, ROOT),
    }


def quartiles(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def migration_run(bin_dir, flows):
    """One migration of `flows` flows (one host) by the binaries in `bin_dir`: its figures,
    or a string saying why it failed."""
    env = dict(os.environ, NF_BENCH_BIN=bin_dir)
    cmd = [sys.executable, RUN_PY, "--only", "migration", "--no-build", "--repeat", "1",
           "--flows", str(flows), "--path", "one host"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=1800)
    except subprocess.TimeoutExpired:
        # run.py, killed, left its test bed up.
        subprocess.run([os.path.join(ROOT, "scripts", "testbed.sh"), "down", "--prefix", "bm"],
                       cwd=ROOT, capture_output=True)
        return "run.py did not finish within 30 minutes"
    lines = []
    for line in p.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    if p.returncode != 0:
        return f"run.py exited with {p.returncode}:\n{p.stderr.strip()[-2000:]}"
    # With --repeat 1 the run's own line carries what the summary line does, and `moved`.
    run = next((r for r in lines if r.get("bench") == "migration run"), None)
    if run is None:
        return f"no migration result from run.py:\n{p.stderr.strip()[-2000:]}"
    if run["moved"] < flows:
        return f"moved {run['moved']} of {flows} flows: {run}"
    got = {k: run[k] for k in ("ms", "moved", "failed", "sink_lost", "sink_reordered",
                               "sink_duplicates", "overload_drops", "migration_lost",
                               "late_stragglers", "generator_pps")}
    m = re.search(r"bench: results in (\S+)", p.stderr)
    got["results"] = os.path.relpath(m.group(1), ROOT) if m else None
    return got


def migration_ab(args):
    if os.geteuid() != 0:
        sys.exit("ab: --migration needs root (the test bed's network namespaces)")
    if args.smoke:
        args.pairs, args.migration_sizes = 1, "1000"
    sizes = [int(s) for s in args.migration_sizes.split(",") if s]
    base, base_note = prepare_platform(args.base)
    new, new_note = prepare_platform(args.new)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    emit({"bench": "ab", "mode": "migration", "base": base_note, "new": new_note,
          "pairs": args.pairs, "path": "one host",
          "harness": "the working tree's scripts/bench/run.py and scripts/testbed.sh",
          "date": datetime.date.today().isoformat(), "cpus": os.cpu_count()})

    table = []
    for flows in sizes:
        runs = {"base": [], "new": []}
        ratios = []
        for i in range(args.pairs):
            order = [("base", base), ("new", new)]
            if i % 2:
                order.reverse()
            got = {}
            for name, bin_dir in order:
                r = migration_run(bin_dir, flows)
                if isinstance(r, str):
                    emit({"bench": "ab_migration_failed", "flows": flows, "pair": i + 1,
                          "build": name, "error": r})
                    write_results(args.smoke, stamp)
                    sys.exit(f"ab: migration of {flows} flows by {name} "
                             f"({base_note if name == 'base' else new_note}) failed: {r}")
                emit({"bench": "ab_migration_run", "flows": flows, "pair": i + 1,
                      "build": name, **r})
                got[name] = r
                runs[name].append(r)
            ratio = got["base"]["ms"] / got["new"]["ms"] if got["new"]["ms"] else 0.0
            ratios.append(ratio)
            print(f"ab: {flows} flows, pair {i + 1}: base {got['base']['ms']:.3f} new "
                  f"{got['new']['ms']:.3f} ms, base/new {ratio:.3f}", file=sys.stderr,
                  flush=True)
        q1, q3 = quartiles(ratios)
        b_ms = [r["ms"] for r in runs["base"]]
        n_ms = [r["ms"] for r in runs["new"]]
        row = {"bench": "ab_migration", "flows": flows, "path": "one host",
               "pairs": args.pairs,
               "base_ms_median": round(statistics.median(b_ms), 3),
               "new_ms_median": round(statistics.median(n_ms), 3),
               "ratio": "base ms / new ms: above 1, new is faster",
               "ratio_median": round(statistics.median(ratios), 3),
               "ratio_min": round(min(ratios), 3), "ratio_q1": round(q1, 3),
               "ratio_q3": round(q3, 3), "ratio_max": round(max(ratios), 3),
               "base_runs_ms": b_ms, "new_runs_ms": n_ms}
        for name in ("base", "new"):
            for key in ("sink_lost", "sink_reordered", "sink_duplicates", "overload_drops"):
                row[f"{name}_{key}_max"] = max(r[key] for r in runs[name])
        emit(row)
        table.append(row)

    print()
    print(f"base: {base_note}")
    print(f"new:  {new_note}")
    print("each run: scripts/bench/run.py --only migration --repeat 1 --path 'one host' "
          "(the working tree's), NF_BENCH_BIN=the build")
    print("base/new = base ms / new ms: above 1, new migrates faster (the same sense as the "
          "chain's new/base Mpps)")

    def pair(r, key):
        return f"{r[f'base_{key}_max']}/{r[f'new_{key}_max']}"

    print(f"\n{'flows':>9} | {'base ms':>9} | {'new ms':>9} | {'base/new median':>15} | "
          f"{'spread (min, q1-q3, max)':>26} | {'lost b/n':>9} | {'reord b/n':>9} | "
          f"{'dup b/n':>7} | {'overload b/n':>12}")
    for r in table:
        print(f"{r['flows']:>9} | {r['base_ms_median']:>9.3f} | {r['new_ms_median']:>9.3f} | "
              f"{r['ratio_median']:>15.3f} | {r['ratio_min']:.3f}, {r['ratio_q1']:.3f}-"
              f"{r['ratio_q3']:.3f}, {r['ratio_max']:.3f} | {pair(r, 'sink_lost'):>9} | "
              f"{pair(r, 'sink_reordered'):>9} | {pair(r, 'sink_duplicates'):>7} | "
              f"{pair(r, 'overload_drops'):>12}")
    write_results(args.smoke, stamp)


def write_results(smoke, stamp):
    outdir = os.path.join(ROOT, "target", "bench")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"ab-{'smoke-' if smoke else ''}{stamp}.jsonl")
    with open(path, "w") as f:
        for r in RESULTS:
            f.write(json.dumps(r) + "\n")
    print(f"\nab: results in {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="base revision (default HEAD)")
    ap.add_argument("--new", default="worktree",
                    help="new revision (default: the working tree, uncommitted changes included)")
    ap.add_argument("--pairs", type=int, default=7, help="alternated pairs per size (>= 7)")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="flow counts, timed")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run")
    ap.add_argument("--count-sizes", default="10000,100000,1000000",
                    help="flow counts for the instruction counts ('' for none)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="counted: measured rounds over every flow")
    ap.add_argument("--smoke", action="store_true",
                    help="one short pair, a small count (--migration: one pair at 1,000 flows)")
    ap.add_argument("--migration", action="store_true",
                    help="the whole platform on the migration benchmark, not the chain (root)")
    ap.add_argument("--migration-sizes", default="1000,600000",
                    help="--migration: flow counts to migrate")
    args = ap.parse_args()
    if args.pairs < 7 and not args.smoke:
        print("ab: fewer than 7 pairs is not enough to read a ratio on this machine",
              file=sys.stderr)
    if args.migration:
        migration_ab(args)
        return
    if args.smoke:
        args.pairs, args.sizes, args.seconds, args.count_sizes = 1, "10000", 0.3, "2000"

    base, base_note = prepare(args.base)
    new, new_note = prepare(args.new)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    emit({"bench": "ab", "base": base_note, "new": new_note, "pairs": args.pairs,
          "seconds": args.seconds, "date": datetime.date.today().isoformat(),
          "cpus": os.cpu_count()})

    table = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for flows in sizes:
        b_runs, n_runs, ratios = [], [], []
        mem = {}
        for i in range(args.pairs):
            order = [("base", base), ("new", new)]
            if i % 2:
                order.reverse()
            got = {}
            for name, binary in order:
                got[name], mem[name] = timed(binary, flows, args.seconds)
            b_runs.append(got["base"])
            n_runs.append(got["new"])
            ratios.append(got["new"] / got["base"] if got["base"] else 0.0)
            print(f"ab: {flows} flows, pair {i + 1}: base {got['base']:.3f} new "
                  f"{got['new']:.3f} Mpps", file=sys.stderr, flush=True)
        q1, q3 = quartiles(ratios)
        row = {"bench": "ab_timed", "flows": flows, "pairs": args.pairs,
               "base_mpps_median": round(statistics.median(b_runs), 3),
               "new_mpps_median": round(statistics.median(n_runs), 3),
               "ratio_median": round(statistics.median(ratios), 3),
               "ratio_min": round(min(ratios), 3), "ratio_q1": round(q1, 3),
               "ratio_q3": round(q3, 3), "ratio_max": round(max(ratios), 3),
               "base_runs": b_runs, "new_runs": n_runs,
               "base_platform_bytes_per_flow": mem.get("base"),
               "new_platform_bytes_per_flow": mem.get("new")}
        emit(row)
        table.append(row)

    counts = []
    for flows in [int(s) for s in args.count_sizes.split(",") if s]:
        b = counted(base, flows, args.rounds)
        n = counted(new, flows, args.rounds)
        if b is None or n is None:
            print("ab: SKIP: valgrind is not installed; no instruction counts",
                  file=sys.stderr)
            break
        row = {"bench": "ab_counted", "flows": flows, "base": b, "new": n,
               "instructions_ratio": round(n["instructions_per_packet"]
                                           / b["instructions_per_packet"], 4)}
        emit(row)
        counts.append(row)

    print()
    print(f"base: {base_note}")
    print(f"new:  {new_note}")
    if table:
        print(f"\n{'flows':>9} | {'base Mpps':>9} | {'new Mpps':>9} | {'new/base median':>15} | "
              f"{'spread (min, q1-q3, max)':>26}")
        for r in table:
            print(f"{r['flows']:>9} | {r['base_mpps_median']:>9.3f} | {r['new_mpps_median']:>9.3f} | "
                  f"{r['ratio_median']:>15.3f} | {r['ratio_min']:.3f}, {r['ratio_q1']:.3f}-"
                  f"{r['ratio_q3']:.3f}, {r['ratio_max']:.3f}")
    if counts:
        print(f"\n{'flows':>9} | {'instr/pkt base':>14} | {'new':>7} | {'ratio':>6} | "
              f"{'L1d miss/pkt base':>17} | {'new':>6} | {'L2 miss/pkt base':>16} | {'new':>6}")
        for r in counts:
            b, n = r["base"], r["new"]
            print(f"{r['flows']:>9} | {b['instructions_per_packet']:>14.1f} | "
                  f"{n['instructions_per_packet']:>7.1f} | {r['instructions_ratio']:>6.3f} | "
                  f"{b['d1_misses_per_packet']:>17.2f} | {n['d1_misses_per_packet']:>6.2f} | "
                  f"{b['l2_misses_per_packet']:>16.3f} | {n['l2_misses_per_packet']:>6.3f}")
    write_results(args.smoke, stamp)


if __name__ == "__main__":
    main()
