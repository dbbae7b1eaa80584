#!/usr/bin/env bash
# One worker node, started on every non-head node by the scheduler's single
# parallel launch (one srun step, pbsdsh, or ssh fan-out). Blocks while Ray runs.
set -euo pipefail
# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/cluster.env"
# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
ar_run_node worker "$(hostname -s)"
