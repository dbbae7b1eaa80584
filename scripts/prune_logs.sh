#!/usr/bin/env bash
# Logs retention, run before each new cluster: of the clusters' logs under LOGS_ROOT
# (dirs named by cluster id), drop those older than DAYS days, then all but the
# newest KEEP. Nothing else under LOGS_ROOT is touched.
# usage: prune_logs.sh LOGS_ROOT KEEP DAYS
set -euo pipefail
root="$1" keep="$2" days="$3"
[ -d "$root" ] || exit 0
minutes="$(awk -v d="$days" 'BEGIN { printf "%d", d * 1440 }')"
ours=(-mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/ar-[0-9a-f]{32}')
find "$root" "${ours[@]}" -mmin +"$minutes" -exec rm -rf {} +
find "$root" "${ours[@]}" -printf '%T@ %p\n' | sort -rn | tail -n +"$((keep + 1))" | cut -d' ' -f2- |
    while IFS= read -r dir; do rm -rf "$dir"; done
