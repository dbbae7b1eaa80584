#!/usr/bin/env bash
# activate-ray cluster ar-0123abcd (none)
set -euo pipefail
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
. "$AR_CLUSTER_DIR/bin/launch_workers_direct.sh"
. "$AR_CLUSTER_DIR/bin/cluster_main.sh"
