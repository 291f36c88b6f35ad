#!/usr/bin/env bash
# Failover drill: kill -9 a whole server (its nfmgr, and with it every process of that
# server) whose runtime carries the test traffic, or with --cut-link cut its cluster link
# (and heal it --heal-after s later), never server 1 (the ingress, facing the client and
# the server) nor the coordinator; check that no connection breaks and, after a cut link
# heals, that no flow has two owners.
#
#   scripts/drill/kill-server.sh [--cut-link [--heal-after S]]
#                                [--replication output-commit|periodic|off] [--json]
#                                [--keep] [--prefix P] [--no-setup] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
fault=kill-server
args=()
for a in "$@"; do
    if [ "$a" = "--cut-link" ]; then fault=cut-link; else args+=("$a"); fi
done
exec python3 "$(dirname "$0")/drill.py" --fault "$fault" ${args[@]+"${args[@]}"}
