#!/usr/bin/env bash
# What `python -m flows.ray_cluster logs CLUSTER_ID` prints: the last lines of every
# log a cluster left in its logs dir, node by node (or one node's only).
# usage: show_logs.sh LOGS_DIR TAIL [NODE]
set -euo pipefail
dir="$1" tail="$2" node="${3:-}"
if [ ! -d "$dir" ]; then
    echo "no logs at $dir (kept with keep_logs on, until logs_keep_days or logs_keep_clusters prunes them)" >&2
    exit 3
fi
found=0
for sub in "$dir"/*/; do
    name="$(basename "$sub")"
    [ -z "$node" ] || [ "$name" = "$node" ] || continue
    host=""
    [ ! -f "$sub/HOST" ] || host=" on $(cat "$sub/HOST")"
    for file in "$sub"*.gz; do
        [ -e "$file" ] || continue
        found=1
        printf '===== %s%s: %s\n' "$name" "$host" "$(basename "$file" .gz)"
        zcat "$file" | tail -n "$tail"
    done
    [ ! -f "$sub/CAPPED" ] || printf '===== %s: %s\n' "$name" "$(cat "$sub/CAPPED")"
done
if [ "$found" = 0 ]; then
    echo "no logs of ${node:-any node} in $dir; there: $(find "$dir" -mindepth 1 -maxdepth 1 -printf '%f ')" >&2
    exit 3
fi
