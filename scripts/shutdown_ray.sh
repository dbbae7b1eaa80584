#!/usr/bin/env bash
# Stop this cluster's Ray processes on THIS host and remove its files.
# Every other host's nodes stop themselves once the stop file exists; this
# script never signals a process recorded by another host.
# Idempotent: safe on a half-started or already stopped cluster.
# Prints RAY_NODE_NOT_STOPPED=name@host for nodes that did not say they stopped.
# usage: shutdown_ray.sh CLUSTER_DIR [keep-dir]
set -euo pipefail
cluster_dir="$1"
[ -e "$cluster_dir/cluster.env" ] || { echo "RAY_STOPPED=already"; exit 0; }
# shellcheck disable=SC1091
. "$cluster_dir/cluster.env"
# shellcheck disable=SC1091
. "$cluster_dir/bin/ray_lib.sh"
ar_request_stop
if [ -e "$AR_CLUSTER_DIR/supervisor.pid" ]; then
    read -r host pgid <"$AR_CLUSTER_DIR/supervisor.pid"
    if [ "$host" = "$(ar_host)" ]; then
        ar_stop_group "$pgid"
    fi
fi
ar_stop_cluster_here
# other hosts' nodes: a job's end or signal stops them at once; one started over ssh sees
# the stop file at its next look (AR_LOOK_EVERY)
for _ in $(seq 1 $(( (AR_LOOK_EVERY + 10) * 5 ))); do
    [ -z "$(ar_nodes_not_stopped)" ] && break
    sleep 0.2
done
ar_nodes_not_stopped | sed 's/^/RAY_NODE_NOT_STOPPED=/'
ar_collect_job_logs
[ "${AR_KEEP_LOGS:-1}" != 1 ] || [ ! -d "${AR_LOGS_DIR:-}" ] || printf 'RAY_LOGS_DIR=%s\n' "$AR_LOGS_DIR"
if [ "${2:-}" != keep-dir ]; then
    rm -rf "$AR_CLUSTER_DIR"
fi
echo "RAY_STOPPED=yes"
