#!/usr/bin/env bash
# Stop this cluster's Ray processes on this host and remove its files.
# Idempotent: safe on a half-started or already stopped cluster.
# usage: shutdown_ray.sh CLUSTER_DIR [keep-dir]
set -euo pipefail
cluster_dir="$1"
[ -e "$cluster_dir/cluster.env" ] || { echo "RAY_STOPPED=already"; exit 0; }
# shellcheck disable=SC1091
. "$cluster_dir/cluster.env"
# shellcheck disable=SC1091
. "$cluster_dir/bin/ray_lib.sh"
touch "$AR_CLUSTER_DIR/stop"
if [ -e "$AR_CLUSTER_DIR/supervisor.pid" ]; then
    ar_stop_group "$(cat "$AR_CLUSTER_DIR/supervisor.pid")"
fi
ar_stop_cluster_here
if [ "${2:-}" != keep-dir ]; then
    rm -rf "$AR_CLUSTER_DIR"
fi
echo "RAY_STOPPED=yes"
