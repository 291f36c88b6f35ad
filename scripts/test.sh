#!/usr/bin/env bash
# The test command: everything CI checks, in the order that fails fastest.
#   formatting and lints -> crate layers and module cycles -> one debug build of everything -> unit, integration and
#   cross-process tests (root-only ones run when root; under CI=true a skip is a failure)
#   -> loom model checks of the ring -> short fuzzing of the parsers -> short benchmark
#   smoke runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  printf '\n== %s\n' "$*"
  # CI's disk is not ours alone: say how much is left at each step, so that a full disk
  # shows where it filled.
  if [[ "${CI:-}" == "true" ]]; then df -h --output=avail,target . | tail -1; fi
}

# CI builds everything once from a clean checkout: incremental state (about 1 GB) would
# never be reused, and line tables are all the debug information a failing test's
# backtrace needs (full debug information doubles the size of every test binary). Each
# stage's build that no later stage uses is removed when the stage is done.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi
ci_clean() { if [[ "${CI:-}" == "true" ]]; then rm -rf "$@"; fi; }

# DPDK ports are built and tested wherever DPDK is installed, and always under CI.
features=()
if pkg-config --exists libdpdk 2>/dev/null; then
  features=(--features nf-manager/dpdk)
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI=true but DPDK is missing (apt-get install libdpdk-dev libclang-dev pkg-config)" >&2
  exit 1
else
  echo "SKIP: DPDK is not installed (libdpdk-dev, libclang-dev): dpdk: ports are neither built nor tested"
fi
# The etcd client (cluster.store = "etcd") is built and tested wherever protoc is installed
# (it compiles etcd's protocol definitions), and always under CI.
if command -v protoc >/dev/null; then
  features+=(--features nf-manager/etcd)
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI=true but protoc is missing (apt-get install protobuf-compiler etcd-server)" >&2
  exit 1
else
  echo "SKIP: protoc is not installed (protobuf-compiler): the etcd store is neither built nor tested"
fi

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets "${features[@]}" -q -- -D warnings

step "layers"
python3 scripts/check-layers.py

step "build"
cargo build --workspace --all-targets "${features[@]}" -q
# The end-to-end tests run these binaries; they are fresh now.
export NF_BINS_FRESH=1
# One drill runs at a rate only optimised binaries carry (and the benchmarks use them).
cargo build --release --workspace --bins "${features[@]}" -q
export NF_RELEASE_BINS="$PWD/target/release"

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace "${features[@]}" --no-fail-fast
else
  cargo test --workspace "${features[@]}" --no-fail-fast
fi
# The later stages use their own builds (loom's, the fuzzers', the release one).
ci_clean target/debug

step "loom model checks"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -q -p nf-shm --lib --release loom_tests
ci_clean target/loom

step "fuzz smoke"
scripts/fuzz.sh --smoke
ci_clean fuzz/target

step "benchmark smoke"
python3 scripts/bench/run.py --smoke
# The A/B script (HEAD against the working tree: one short pair, a small instruction count).
if command -v valgrind >/dev/null 2>&1; then
  python3 scripts/bench/ab.py --smoke
elif [[ "${CI:-}" == "true" ]]; then
  echo "CI=true but valgrind is missing (apt-get install valgrind)" >&2
  exit 1
else
  echo "SKIP: valgrind is not installed: the A/B script's smoke run is skipped"
fi

printf '\nall checks passed\n'
