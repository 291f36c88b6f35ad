#!/usr/bin/env bash
# Failover drill: freeze (SIGSTOP) the runtime that carries the test traffic. A frozen
# runtime is a failure too: its nfmgr sees packets wait on its input without it taking any
# for [supervisor] frozen_after_ms, kills it, and its flows go on from their replicas.
#
#   scripts/drill/freeze-runtime.sh [--replication output-commit|periodic|off] [--json]
#                                   [--keep] [--prefix P] [--no-setup] [...]
#
# Exit status: 0 pass, 1 a promise was broken (the report names it), 2 the drill could not
# run. See docs/DRILLS.md; `scripts/drill/drill.py --help` lists every option.
set -euo pipefail
exec python3 "$(dirname "$0")/drill.py" --fault freeze-runtime "$@"
