# shellcheck shell=bash
# The body of a `check --on-nodes` job (sourced by its job script after ar_launch_workers was
# defined, like cluster_main.sh): every node of a small job runs the checks a real node runs
# before `ray start` (ar_run_node with AR_CHECK_ONLY=1: node_check.sh, then the node-to-node
# reach), each writing <cluster dir>/checks/NAME.rows; no Ray is started. Ends once every
# node is done; the flow reads the rows and removes the cluster dir.

# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
mkdir -p "$AR_CLUSTER_DIR/logs" "$AR_CLUSTER_DIR/nodes" "$AR_CLUSTER_DIR/checks"
touch "$AR_CLUSTER_DIR/heartbeat"
ar_wait_for_environment || exit 1
# the head's launcher starts ray_worker.sh on every other node, which runs ar_run_node there
ar_launch_workers
ar_run_node head head || true
# the workers' launches (srun, pbs_tmrsh, ssh) end once their checks did
wait
ar_log "node checks of $AR_CLUSTER_ID done"
exit 0
