#!/usr/bin/env bash
# Submit a Ray job from the head node with the cluster's token, for users who
# prefer the CLI over the flow's job submission. The flow itself uses Ray's
# JobSubmissionClient through an SSH tunnel.
# usage: submit_job.sh CLUSTER_DIR SCRIPT [ARGS...]
set -euo pipefail
cluster_dir="$1"
shift
# shellcheck disable=SC1091
. "$cluster_dir/cluster.env"
# shellcheck disable=SC1091
. "$cluster_dir/environment.env"
if [ -e "$cluster_dir/setup_commands.sh" ]; then
    # shellcheck disable=SC1091
    . "$cluster_dir/bin/site_setup.sh" "$cluster_dir/setup_commands.sh"
fi
# shellcheck disable=SC1091
. "$cluster_dir/head.env"
exec "$AR_RAY" job submit --address "http://127.0.0.1:$RAY_DASHBOARD_PORT" -- "$AR_PYTHON" "$@"
