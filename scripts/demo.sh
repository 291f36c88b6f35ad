#!/usr/bin/env bash
# The demo: generator -> vswitch -> 2 runtimes -> sink, printing live rates for 10 seconds,
# then a summary (loss, duplicates, reordering, latency, pool). No root, NIC or huge pages.
# Extra arguments go to `nfmgr demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/nfmgr demo "$@"
