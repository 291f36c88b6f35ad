#!/usr/bin/env bash
# Fuzzes what reads bytes from the wire or from files:
#   packet_parse    the packet parser, flow keys, checksums and every rewrite
#   ids_rules       the IDS rule parser (and building its matcher)
#   capture_reader  the pcap/pcapng reader
#   actor_frames    actor frames: parsing, authentication, message decoding and the
#                   reliable transport fed any sequence of them
#   config          the configuration: parsing, validation, and building every chain
#   control_request the control socket's JSON requests
#   peer_frames     the managers' TCP frames: the handshake's plain ones and a session's tagged ones
#
#   scripts/fuzz.sh            each target for 300 s
#   scripts/fuzz.sh 3600       each target for an hour
#   scripts/fuzz.sh --smoke    each target for 15 s (CI)
#
# Needs cargo-fuzz (cargo install cargo-fuzz). It uses nightly-only compiler flags, enabled
# on the stable toolchain with RUSTC_BOOTSTRAP=1. Corpora live in fuzz/corpus (not
# committed), seeded from fuzz/seeds and the shared captures; crashes land in fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=300
case "${1:-}" in
  --smoke) secs=15 ;;
  "") ;;
  *[!0-9]*) echo "usage: scripts/fuzz.sh [--smoke | SECONDS]" >&2; exit 2 ;;
  *) secs=$1 ;;
esac
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1

targets=(packet_parse ids_rules capture_reader actor_frames config control_request peer_frames)
for t in "${targets[@]}"; do mkdir -p "corpus/$t"; done
cp -n seeds/ids_rules/* corpus/ids_rules/ 2>/dev/null || true
cp -n seeds/actor_frames/* corpus/actor_frames/ 2>/dev/null || true
cp -n seeds/config/* corpus/config/ 2>/dev/null || true
cp -n seeds/control_request/* corpus/control_request/ 2>/dev/null || true
cp -n seeds/peer_frames/* corpus/peer_frames/ 2>/dev/null || true
captures="${NF_TESTDATA:-../../shared/testdata/pcap}"
[[ -d "$captures" ]] || captures=/work/shared/testdata/pcap
if [[ -d "$captures" ]]; then
  cp -n "$captures"/*.pcap corpus/capture_reader/ 2>/dev/null || true
  # Ethernet frames from the captures seed the packet parser.
  python3 - "$captures" corpus/packet_parse <<'PY'
import glob, os, struct, sys
src, dst = sys.argv[1], sys.argv[2]
n = 0
for f in sorted(glob.glob(os.path.join(src, "*.pcap"))):
    b = open(f, "rb").read()
    if len(b) < 24 or struct.unpack("<I", b[:4])[0] != 0xA1B2C3D4 or struct.unpack("<I", b[20:24])[0] & 0xFFFF != 1:
        continue
    off = 24
    while off + 16 <= len(b) and n < 400:
        incl = struct.unpack("<I", b[off + 8:off + 12])[0]
        if incl > 65536 or off + 16 + incl > len(b):
            break
        open(os.path.join(dst, f"frame{n:04}"), "wb").write(b[off + 16:off + 16 + incl])
        n += 1
        off += 16 + incl
PY
fi

cargo fuzz build -O
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E "^(Done|stat::number_of_executed_units|==.*ERROR|SUMMARY)" || true
  # libFuzzer leaves a crash-* file when it finds something.
  if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $t found a crash: $(ls artifacts/$t/crash-* | head -1)" >&2
    exit 1
  fi
done
