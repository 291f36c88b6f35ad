#!/usr/bin/env bash
# Failover drill: kill -9 the runtime that carries the test traffic (a curl download, iperf3
# streams, generator flows) while it runs, and check that no connection breaks: every flow
# resumes on its replica, no stream stalls, no RST, the download's sha256 matches.
#
#   scripts/drill/kill-runtime.sh [--replication output-commit|periodic|off] [--json]
#                                 [--keep] [--prefix P] [--no-setup] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
exec python3 "$(dirname "$0")/drill.py" --fault kill-runtime "$@"
