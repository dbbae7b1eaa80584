#!/usr/bin/env bash
# One worker node, started on every non-head node by the scheduler's single
# parallel launch (one srun step, pbs_tmrsh/pbsdsh, or ssh fan-out). Blocks while Ray runs.
set -euo pipefail
# started over ssh, its output may be gone (the head's job ended first): a failed write must
# not kill the node's own stop (SIGPIPE) before it removed its temp dir
trap '' PIPE
# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/cluster.env"
# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
ar_worker_began
# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/environment.env"
# the user's setup_commands: a worker started by pbsdsh or ssh has not run the job script
if [ -e "$AR_CLUSTER_DIR/setup_commands.sh" ]; then
    # shellcheck disable=SC1091
    . "$AR_CLUSTER_DIR/bin/site_setup.sh" "$AR_CLUSTER_DIR/setup_commands.sh" "$AR_CLUSTER_DIR/status"
fi
ar_run_node worker "$(hostname -s)"
