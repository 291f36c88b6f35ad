#!/usr/bin/env python3
"""A/B of the runtime core: two builds of the chain benchmark, alternated in one run.

  scripts/bench/ab.py                      HEAD against the working tree
  scripts/bench/ab.py --base 1313427       an older commit against the working tree
  scripts/bench/ab.py --base A --new B     two commits
  scripts/bench/ab.py --smoke              one short pair and a small count (checks it runs)

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
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    src = os.path.join(AB, f"src-{sha[:12]}")
    if not os.path.isdir(src):
        os.makedirs(AB, exist_ok=True)
        git("worktree", "add", "--detach", "--force", src, sha)
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
    ap.add_argument("--smoke", action="store_true", help="one short pair, a small count")
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.sizes, args.seconds, args.count_sizes = 1, "10000", 0.3, "2000"
    elif args.pairs < 7:
        print("ab: fewer than 7 pairs is not enough to read a ratio on this machine",
              file=sys.stderr)

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
    outdir = os.path.join(ROOT, "target", "bench")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"ab-{'smoke-' if args.smoke else ''}{stamp}.jsonl")
    with open(path, "w") as f:
        for r in RESULTS:
            f.write(json.dumps(r) + "\n")
    print(f"\nab: results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
