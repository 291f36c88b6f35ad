#!/usr/bin/env python3
"""Checks that the code stays in layers (issue 23):

1. No crate of the workspace depends on one above it. The order, bottom up, is LAYERS
   below; a crate may depend only on crates of lower layers (from `cargo metadata`).
2. No two top-level modules of a crate import each other, directly or through others: for
   each crate, an edge A -> B for every `crate::B` that module A (its file, or its folder)
   names, then any cycle among them is an error (Tarjan's strongly connected components).
   Test-only modules (`*_tests.rs`, `*_sim.rs`) and the crate root are left out.

  scripts/check-layers.py          exit 1 and the cycles or bad edges, if any

Run by scripts/test.sh (CI) after clippy.
"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom up; crates on one line are one layer and may not depend on each other.
LAYERS = [
    ["dpdk-sys", "nf-packet"],
    ["nf-proto"],
    ["nf-shm"],
    ["nf-config"],
    ["nf-api"],
    ["nflib"],
    ["nfs"],
    ["nf-runtime", "nf-vswitch", "nf-tui"],
    ["nf-manager"],
]

USE = re.compile(r"\bcrate::(\{[^}]*\}|[a-z_][a-z0-9_]*)", re.S)


def crate_order_errors():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
        cwd=ROOT))
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    names = {p["name"] for p in meta["packages"]}
    errors = []
    for p in meta["packages"]:
        if p["name"] not in layer:
            errors.append(f"crate {p['name']} is in no layer of scripts/check-layers.py")
            continue
        for d in p["dependencies"]:
            if d["name"] not in names or d.get("kind") == "dev":
                continue
            if layer.get(d["name"], 99) >= layer[p["name"]]:
                errors.append(f"crate {p['name']} depends on {d['name']}, which is not below it")
    return meta, errors


def modules_of(src):
    """Top-level modules of a crate's src folder: name -> files."""
    mods = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs"):
            name = entry[:-3]
            if name in ("lib", "main") or name.endswith("_tests") or name.endswith("_sim"):
                continue
            mods.setdefault(name, []).append(path)
        elif os.path.isdir(path):
            for dirpath, _, files in os.walk(path):
                for f in files:
                    if f.endswith(".rs"):
                        mods.setdefault(entry, []).append(os.path.join(dirpath, f))
    return mods


def strip_tests(text):
    """The text without `#[cfg(test)] mod ... { ... }` blocks (tests may import freely)."""
    out, i = [], 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k = text.find("{", j)
        semi = text.find(";", j)
        if k < 0 or (0 <= semi < k):
            i = j + len("#[cfg(test)]")
            continue
        depth, m = 0, k
        while m < len(text):
            if text[m] == "{":
                depth += 1
            elif text[m] == "}":
                depth -= 1
                if depth == 0:
                    break
            m += 1
        i = m + 1


def edges_of(mods):
    edges = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = strip_tests(open(f, encoding="utf-8").read())
            text = re.sub(r"//[^\n]*", "", text)
            for hit in USE.findall(text):
                names = re.findall(r"\b([a-z_][a-z0-9_]*)\b", hit) if hit.startswith("{") else [hit]
                for n in names:
                    if n in mods and n != m:
                        edges[m].add(n)
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    meta, errors = crate_order_errors()
    for p in meta["packages"]:
        src = os.path.join(os.path.dirname(p["manifest_path"]), "src")
        if not os.path.isdir(src):
            continue
        edges = edges_of(modules_of(src))
        for comp in cycles(edges):
            inside = {m: sorted(edges[m] & set(comp)) for m in comp}
            detail = "; ".join(f"{m} -> {', '.join(t)}" for m, t in inside.items())
            errors.append(f"crate {p['name']}: modules import each other in a cycle: {detail}")
    if errors:
        for e in errors:
            print(f"layers: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"layers: {len(meta['packages'])} crates in order, no module cycles")


if __name__ == "__main__":
    main()
