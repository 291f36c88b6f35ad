#!/usr/bin/env bash
# Reserves and mounts huge pages as hugepages.conf says. Run as root.
#
#   scripts/setup-hugepages.sh [CONF]          reserve HUGEPAGE_COUNT pages, mount hugetlbfs
#   scripts/setup-hugepages.sh --undo [CONF]   unmount and release the pages
#
# CONF defaults to hugepages.conf at the repository root. The reservation is made on the node
# pool of the given page size (/sys/kernel/mm/hugepages/hugepages-<size>kB), so 2 MiB and
# 1 GiB pages both work. It is idempotent: running it twice changes nothing.
set -euo pipefail

undo=0
if [[ "${1:-}" == "--undo" ]]; then undo=1; shift; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
conf="${1:-$root/hugepages.conf}"
[[ -r "$conf" ]] || { echo "setup-hugepages: cannot read $conf" >&2; exit 1; }

HUGEPAGES_ENABLED=no; HUGEPAGE_SIZE_KB=2048; HUGEPAGE_COUNT=0; HUGEPAGE_MOUNT=""
# shellcheck source=/dev/null
source "$conf"
[[ -n "$HUGEPAGE_MOUNT" ]] || { echo "setup-hugepages: HUGEPAGE_MOUNT is not set in $conf" >&2; exit 1; }
[[ $EUID -eq 0 ]] || { echo "setup-hugepages: must run as root" >&2; exit 1; }

pool="/sys/kernel/mm/hugepages/hugepages-${HUGEPAGE_SIZE_KB}kB/nr_hugepages"
[[ -w "$pool" ]] || { echo "setup-hugepages: this kernel has no ${HUGEPAGE_SIZE_KB} KiB huge pages ($pool)" >&2; exit 1; }

if [[ $undo -eq 1 ]]; then
  if mountpoint -q "$HUGEPAGE_MOUNT"; then umount "$HUGEPAGE_MOUNT"; fi
  echo 0 > "$pool"
  echo "setup-hugepages: unmounted $HUGEPAGE_MOUNT and released ${HUGEPAGE_SIZE_KB} KiB pages"
  exit 0
fi

if [[ "$HUGEPAGES_ENABLED" != "yes" ]]; then
  echo "setup-hugepages: HUGEPAGES_ENABLED is not yes in $conf; nothing to do"
  exit 0
fi

current=$(cat "$pool")
if (( current < HUGEPAGE_COUNT )); then
  echo "$HUGEPAGE_COUNT" > "$pool"
fi
got=$(cat "$pool")
if (( got < HUGEPAGE_COUNT )); then
  echo "setup-hugepages: asked for $HUGEPAGE_COUNT pages of ${HUGEPAGE_SIZE_KB} KiB, the kernel gave $got (memory fragmented? try at boot)" >&2
  exit 1
fi

mkdir -p "$HUGEPAGE_MOUNT"
if ! mountpoint -q "$HUGEPAGE_MOUNT"; then
  mount -t hugetlbfs -o "pagesize=${HUGEPAGE_SIZE_KB}K,mode=0700" nodev "$HUGEPAGE_MOUNT"
fi
free=$(stat -f -c %f "$HUGEPAGE_MOUNT")
echo "setup-hugepages: $got pages of ${HUGEPAGE_SIZE_KB} KiB reserved, hugetlbfs at $HUGEPAGE_MOUNT ($free free)"
