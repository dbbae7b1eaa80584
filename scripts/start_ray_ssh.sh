#!/usr/bin/env bash
# Start a whole cluster on this host (no scheduler): the head and
# AR_DIRECT_WORKERS workers, under one detached supervisor. Prints
# RAY_SUPERVISOR_PID=... and then the head's RAY_* lines once it is up.
# usage: start_ray_ssh.sh CLUSTER_DIR
set -euo pipefail
cluster_dir="$1"
# shellcheck disable=SC1091
. "$cluster_dir/cluster.env"
mkdir -p "$AR_CLUSTER_DIR/logs"
setsid nohup bash "$AR_CLUSTER_DIR/bin/job.sh" >"$AR_CLUSTER_DIR/logs/supervisor.log" 2>&1 </dev/null &
printf "%s %s\n" "$(hostname -s)" "$!" >"$AR_CLUSTER_DIR/supervisor.pid"
printf "RAY_SUPERVISOR_PID=%s\n" "$!"
