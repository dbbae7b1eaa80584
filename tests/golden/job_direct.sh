#!/usr/bin/env bash
# activate-ray cluster ar-0123abcd (none)
set -euo pipefail
trap '' USR2  # the teardown's "look now": heard once the cluster watches (ray_lib.sh)
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
. "$AR_CLUSTER_DIR/bin/launch_workers_direct.sh"
. "$AR_CLUSTER_DIR/bin/cluster_main.sh"
