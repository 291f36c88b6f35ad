#!/usr/bin/env bash
# Failover drill: on a test bed whose cluster state and coordinator election live in etcd
# (three etcd members, `[cluster] store = "etcd"`), kill -9 the coordinator's nfmgr (and
# with it every process of that server: never server 1, the ingress) while its runtime
# carries the test traffic. Another nfmgr must be elected within --max-election-ms, the
# dead server's flows must resume on their replicas with no connection broken, and no
# flow on another server may be held up while the coordinator changes.
#
#   scripts/drill/kill-coordinator.sh [--replication output-commit|periodic|off] [--json]
#                                     [--servers N (3)] [--keep] [--prefix P] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
exec python3 "$(dirname "$0")/drill.py" --fault kill-coordinator "$@"
