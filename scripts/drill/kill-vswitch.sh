#!/usr/bin/env bash
# Failover drill: kill -9 the vswitch of server 1 (the ingress: every flow enters by it)
# while the test traffic runs (a curl download, iperf3 streams, generator flows, some on
# server 2's runtime), and check that no connection breaks: the new vswitch learns every
# flow from the runtimes that hold it and sends each on where it was (no flow starts again
# on another runtime, no stream stalls, no RST, the download's sha256 matches).
#
#   scripts/drill/kill-vswitch.sh [--replication output-commit|periodic|off] [--json]
#                                 [--keep] [--prefix P] [--no-setup] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
exec python3 "$(dirname "$0")/drill.py" --fault kill-vswitch "$@"
