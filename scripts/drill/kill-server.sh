#!/usr/bin/env bash
# Failover drill: kill -9 a whole server (its nfmgr, and with it every process of that
# server) whose runtime carries the test traffic, never server 1 (the ingress, facing the
# client and the server) nor the coordinator; check that no connection breaks.
#
#   scripts/drill/kill-server.sh [--replication output-commit|periodic|off] [--json]
#                                [--keep] [--prefix P] [--no-setup] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
exec python3 "$(dirname "$0")/drill.py" --fault kill-server "$@"
